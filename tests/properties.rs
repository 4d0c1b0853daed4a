//! Property tests of the parsers every client string goes through first:
//! money amounts and card data. Arbitrary input never panics; what is
//! accepted is well-formed; what is printed never shows a card number or CVC.

use billing::card::{Brand, CardDetails, CardNumber, Cvc, Expiry};
use billing::gateway::CardSource;
use billing::money::{AmountError, Currency, MAX_INTEGER_DIGITS, USAGE_SCALE, parse_amount};
use chrono::NaiveDate;
use proptest::prelude::*;
use rust_decimal::Decimal;

const CURRENCY_CODES: [&str; 4] = ["USD", "EUR", "GBP", "JPY"];

fn currency() -> impl Strategy<Value = Currency> {
    proptest::sample::select(CURRENCY_CODES.to_vec())
        .prop_map(|code| Currency::parse(code).unwrap())
}

/// Strings that look almost like amounts, plus anything at all.
fn amount_like_text() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[-+ 0-9.,eE_\u{0660}-\u{0669}\u{FF10}-\u{FF19}]{0,40}",
        "[0-9]{0,30}(\\.[0-9]{0,30})?",
        Just("-0".to_owned()),
        Just("0.".to_owned()),
        Just("1e28".to_owned()),
        Just("79228162514264337593543950336".to_owned()),
    ]
}

/// A plain decimal that the contract says must be accepted with `max_scale` digits.
fn valid_decimal(max_scale: u32) -> impl Strategy<Value = String> {
    let integer = prop_oneof![
        Just("0".to_owned()),
        regex(&format!("[1-9][0-9]{{0,{}}}", MAX_INTEGER_DIGITS - 1)),
    ];
    let fraction = if max_scale == 0 {
        Just(String::new()).boxed()
    } else {
        proptest::option::of(regex(&format!("[0-9]{{1,{max_scale}}}")))
            .prop_map(|f| f.map(|f| format!(".{f}")).unwrap_or_default())
            .boxed()
    };
    (integer, fraction).prop_map(|(i, f)| format!("{i}{f}"))
}

fn regex(pattern: &str) -> impl Strategy<Value = String> + use<> {
    proptest::string::string_regex(pattern).expect("a valid regex")
}

fn fractional_digits(text: &str) -> usize {
    text.split_once('.').map_or(0, |(_, f)| f.len())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn parsing_any_string_as_an_amount_never_panics(text in amount_like_text(), scale in 0u32..=8) {
        let _ = parse_amount(&text, scale);
        for code in CURRENCY_CODES {
            let _ = Currency::parse(code).unwrap().parse_charge_amount(&text);
        }
    }

    #[test]
    fn an_accepted_usage_amount_round_trips_through_format(
        text in amount_like_text(),
        currency in currency(),
    ) {
        if let Ok(amount) = parse_amount(&text, USAGE_SCALE) {
            prop_assert!(fractional_digits(&text) <= USAGE_SCALE as usize, "{text:?}");
            prop_assert!(amount.scale() <= USAGE_SCALE, "{text:?} -> {amount}");
            prop_assert!(amount >= Decimal::ZERO, "{text:?}");
            let formatted = currency.format(amount);
            prop_assert_eq!(parse_amount(&formatted, USAGE_SCALE), Ok(amount), "{:?} -> {:?}", text, formatted);
        }
    }

    #[test]
    fn an_accepted_charge_amount_is_positive_whole_minor_units_and_round_trips(
        text in amount_like_text(),
        currency in currency(),
    ) {
        if let Ok(amount) = currency.parse_charge_amount(&text) {
            prop_assert!(fractional_digits(&text) <= currency.minor_units() as usize, "{text:?}");
            prop_assert!(amount > Decimal::ZERO, "{text:?}");
            let formatted = currency.format(amount);
            prop_assert_eq!(currency.parse_charge_amount(&formatted), Ok(amount), "{:?} -> {:?}", text, formatted);
        }
    }

    #[test]
    fn every_plain_decimal_within_the_limits_is_accepted(
        (scale, text) in (0u32..=USAGE_SCALE).prop_flat_map(|s| (Just(s), valid_decimal(s))),
        currency in currency(),
    ) {
        let expected = text.parse::<Decimal>().unwrap();
        prop_assert_eq!(parse_amount(&text, scale), Ok(expected), "{:?}", text);
        let formatted = currency.format(expected);
        prop_assert_eq!(parse_amount(&formatted, USAGE_SCALE), Ok(expected));
    }

    #[test]
    fn a_decimal_with_one_digit_too_many_is_too_precise(
        (scale, text) in (0u32..USAGE_SCALE).prop_flat_map(|s| (Just(s), valid_decimal(s))),
        extra in "[0-9]",
    ) {
        let with_fraction = if text.contains('.') {
            // Pad to exactly scale + 1 fractional digits.
            let missing = scale as usize + 1 - fractional_digits(&text);
            format!("{text}{}", extra.repeat(missing))
        } else {
            format!("{text}.{}", extra.repeat(scale as usize + 1))
        };
        prop_assert_eq!(parse_amount(&with_fraction, scale), Err(AmountError::TooPrecise(scale)));
    }
}

// ---------------------------------------------------------------------------
// Cards

fn today() -> NaiveDate {
    NaiveDate::from_ymd_opt(2026, 5, 15).unwrap()
}

fn luhn_valid(digits: &str) -> bool {
    let mut sum = 0;
    for (index, byte) in digits.bytes().rev().enumerate() {
        let mut digit = u32::from(byte - b'0');
        if index % 2 == 1 {
            digit *= 2;
            if digit > 9 {
                digit -= 9;
            }
        }
        sum += digit;
    }
    sum % 10 == 0
}

/// The digit that makes `body` pass Luhn.
fn with_check_digit(body: &str) -> String {
    (0..10)
        .map(|d| format!("{body}{d}"))
        .find(|candidate| luhn_valid(candidate))
        .unwrap()
}

/// Numbers that pass Luhn, from brand prefixes and anywhere else.
fn luhn_numbers() -> impl Strategy<Value = String> {
    let prefix = prop_oneof![
        Just("4"),
        Just("51"),
        Just("55"),
        Just("2221"),
        Just("34"),
        Just("37"),
        Just("6011"),
        Just("65"),
        Just("36"),
        Just("3528"),
        Just("62"),
        Just("9"),
        Just("1"),
        Just("0"),
    ];
    (prefix, 11usize..=18)
        .prop_flat_map(|(prefix, length)| {
            let body_len = length - prefix.len();
            (Just(prefix), proptest::collection::vec(0u8..10, body_len))
        })
        .prop_map(|(prefix, body)| {
            let body: String = body.iter().map(|d| char::from(b'0' + d)).collect();
            with_check_digit(&format!("{prefix}{body}"))
        })
}

fn card_number_text() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[0-9 -]{0,30}",
        "[0-9]{10,21}",
        luhn_numbers(),
        luhn_numbers().prop_map(|n| n
            .as_bytes()
            .chunks(4)
            .map(|c| std::str::from_utf8(c).unwrap())
            .collect::<Vec<_>>()
            .join(" ")),
    ]
}

fn brand() -> impl Strategy<Value = Brand> {
    proptest::sample::select(vec![
        Brand::Visa,
        Brand::Mastercard,
        Brand::Amex,
        Brand::Discover,
        Brand::DinersClub,
        Brand::Jcb,
        Brand::UnionPay,
    ])
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn parsing_any_card_input_never_panics(
        number in card_number_text(),
        month in any::<i32>(),
        year in prop_oneof![any::<i32>(), 1990i32..2110],
        cvc in prop_oneof![any::<String>(), "[0-9]{0,6}"],
        holder in any::<String>(),
        brand in brand(),
    ) {
        let _ = CardNumber::parse(&number);
        let _ = Expiry::parse(month, year, today());
        let _ = Cvc::parse(&cvc, brand);
        let _ = CardDetails::parse(&number, month, year, &cvc, &holder, today());
    }

    #[test]
    fn an_accepted_card_number_passes_luhn_and_keeps_its_last_four(number in card_number_text()) {
        if let Ok(parsed) = CardNumber::parse(&number) {
            let digits: String = number.chars().filter(char::is_ascii_digit).collect();
            prop_assert!((12..=19).contains(&digits.len()), "{number:?}");
            prop_assert!(luhn_valid(&digits), "{number:?}");
            prop_assert_eq!(parsed.expose_digits(), digits.as_str());
            prop_assert_eq!(parsed.last4(), &digits[digits.len() - 4..]);
        }
    }

    #[test]
    fn a_luhn_number_of_a_known_brand_is_accepted(number in luhn_numbers()) {
        let known_prefix = !number.starts_with(['9', '1', '0']);
        if known_prefix && number.len() >= 12 {
            prop_assert!(CardNumber::parse(&number).is_ok(), "{number:?}");
        }
    }

    #[test]
    fn debug_output_never_shows_the_number_or_the_cvc(
        number in luhn_numbers().prop_filter("accepted", |n| CardNumber::parse(n).is_ok()),
        cvc_digits in "[0-9]{4}",
        holder in "[A-Za-z .'-]{1,40}",
    ) {
        let parsed = CardNumber::parse(&number).unwrap();
        let cvc_text = if parsed.brand() == Brand::Amex { cvc_digits.clone() } else { cvc_digits[..3].to_owned() };
        let card = CardDetails::parse(&number, 12, 2030, &cvc_text, &holder, today()).unwrap();

        let number_debug = format!("{:?}", card.number);
        let cvc_debug = format!("{:?}", card.cvc);
        let card_debug = format!("{card:?}");
        let source_debug = format!("{:?}", CardSource::Card(card.clone()));
        prop_assert!(number_debug.chars().filter(char::is_ascii_digit).count() <= 4, "{number_debug}");
        prop_assert!(!cvc_debug.chars().any(|c| c.is_ascii_digit()), "{cvc_debug}");
        for printed in [&card_debug, &source_debug] {
            prop_assert!(!printed.contains(&number), "{printed}");
            // Only the expiry and the last 4 may print digits; the CVC never does.
            let without_known = printed
                .replacen(&number_debug, "", 1)
                .replacen("2030", "", 1)
                .replacen("12", "", 1);
            prop_assert!(!without_known.contains(&cvc_text), "{printed}");
        }
    }

    #[test]
    fn a_refused_card_number_is_not_repeated_in_the_error(digits in "[0-9]{6,25}") {
        if let Err(error) = CardNumber::parse(&digits) {
            prop_assert!(!error.to_string().contains(&digits), "{error}");
        }
    }
}
