//! Card data as it arrives from a client, parsed once: number (Luhn, brand),
//! expiry (not in the past), CVC shape. These checks run before any gateway
//! is called, and report every bad field of the card at once. [`CardNumber`] and [`Cvc`] never print their digits: their
//! `Debug` shows only the last 4 (or nothing), and they have no `Display`,
//! so neither can end up in a log line or an error message by accident.

use std::fmt;

use chrono::{Datelike, NaiveDate};
use sha2::{Digest, Sha256};

use crate::error::{BillingError, Reason, Violations};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Brand {
    Visa,
    Mastercard,
    Amex,
    Discover,
    DinersClub,
    Jcb,
    UnionPay,
}

impl Brand {
    pub fn as_str(self) -> &'static str {
        match self {
            Brand::Visa => "visa",
            Brand::Mastercard => "mastercard",
            Brand::Amex => "amex",
            Brand::Discover => "discover",
            Brand::DinersClub => "diners",
            Brand::Jcb => "jcb",
            Brand::UnionPay => "unionpay",
        }
    }

    /// The brand of a card number by its issuer prefix (IIN ranges).
    fn detect(digits: &str) -> Option<Brand> {
        let prefix = |n: usize| digits.get(..n).and_then(|p| p.parse::<u32>().ok());
        let in_range =
            |n: usize, low: u32, high: u32| prefix(n).is_some_and(|p| (low..=high).contains(&p));
        if digits.starts_with('4') {
            Some(Brand::Visa)
        } else if in_range(2, 51, 55) || in_range(4, 2221, 2720) {
            Some(Brand::Mastercard)
        } else if in_range(2, 34, 34) || in_range(2, 37, 37) {
            Some(Brand::Amex)
        } else if digits.starts_with("6011") || in_range(3, 644, 649) || in_range(2, 65, 65) {
            Some(Brand::Discover)
        } else if in_range(2, 36, 36) || in_range(3, 300, 305) || in_range(2, 38, 39) {
            Some(Brand::DinersClub)
        } else if in_range(4, 3528, 3589) {
            Some(Brand::Jcb)
        } else if in_range(2, 62, 62) {
            Some(Brand::UnionPay)
        } else {
            None
        }
    }
}

/// A card number that passed the Luhn check and belongs to a known brand.
#[derive(Clone, PartialEq, Eq)]
pub struct CardNumber {
    digits: String,
    brand: Brand,
}

/// Fixed salt of card fingerprints: duplicate detection without storing numbers.
const FINGERPRINT_SALT: &str = "billing.card-fingerprint.v1";

impl CardNumber {
    /// Accepts 12-19 digits, optionally grouped by single spaces or dashes.
    pub fn parse(text: &str) -> Result<CardNumber, BillingError> {
        const FIELD: &str = "card.number";
        if text.is_empty() {
            return Err(BillingError::invalid(FIELD, "is required"));
        }
        if !text
            .chars()
            .all(|c| c.is_ascii_digit() || c == ' ' || c == '-')
        {
            return Err(BillingError::invalid(FIELD, "may only contain digits"));
        }
        // Groups of digits, each separator single and between digits.
        if text.split([' ', '-']).any(str::is_empty) {
            return Err(BillingError::invalid(
                FIELD,
                "may group its digits only by single spaces or dashes between them",
            ));
        }
        let digits: String = text.chars().filter(char::is_ascii_digit).collect();
        if !(12..=19).contains(&digits.len()) {
            return Err(BillingError::invalid(FIELD, "must have 12 to 19 digits"));
        }
        if !luhn_valid(&digits) {
            return Err(BillingError::invalid(
                FIELD,
                "is not a valid card number (check digit mismatch)",
            ));
        }
        let brand = Brand::detect(&digits).ok_or_else(|| {
            BillingError::invalid(FIELD, "is not from a card brand this service accepts")
        })?;
        Ok(CardNumber { digits, brand })
    }

    pub fn brand(&self) -> Brand {
        self.brand
    }

    pub fn last4(&self) -> &str {
        &self.digits[self.digits.len() - 4..]
    }

    /// sha256 of the number with a fixed salt: equal cards, equal fingerprints.
    pub fn fingerprint(&self) -> String {
        let mut hasher = Sha256::new();
        hasher.update(FINGERPRINT_SALT.as_bytes());
        hasher.update(self.digits.as_bytes());
        hex::encode(hasher.finalize())
    }

    /// The digits, for the one place that sends them to a processor.
    pub fn expose_digits(&self) -> &str {
        &self.digits
    }
}

impl fmt::Debug for CardNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "CardNumber({} **** {})",
            self.brand.as_str(),
            self.last4()
        )
    }
}

fn luhn_valid(digits: &str) -> bool {
    let sum: u32 = digits
        .bytes()
        .rev()
        .enumerate()
        .map(|(index, byte)| {
            let digit = u32::from(byte - b'0');
            if index % 2 == 1 {
                let doubled = digit * 2;
                if doubled > 9 { doubled - 9 } else { doubled }
            } else {
                digit
            }
        })
        .sum();
    sum % 10 == 0
}

/// A card security code: 3 digits, 4 for American Express.
#[derive(Clone, PartialEq, Eq)]
pub struct Cvc(String);

impl Cvc {
    pub fn parse(text: &str, brand: Brand) -> Result<Cvc, BillingError> {
        let expected = if brand == Brand::Amex { 4 } else { 3 };
        if text.len() != expected || !text.bytes().all(|b| b.is_ascii_digit()) {
            return Err(BillingError::invalid(
                "card.cvc",
                format!("must be {expected} digits for this card"),
            ));
        }
        Ok(Cvc(text.to_owned()))
    }

    /// The shape any brand accepts (3 or 4 digits), for a card whose number
    /// is itself invalid: its CVC is still checked, so both are reported.
    fn check_any_brand(text: &str) -> Result<(), BillingError> {
        if !(3..=4).contains(&text.len()) || !text.bytes().all(|b| b.is_ascii_digit()) {
            return Err(BillingError::invalid("card.cvc", "must be 3 or 4 digits"));
        }
        Ok(())
    }

    pub fn expose_digits(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Cvc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Cvc(***)")
    }
}

/// A card's expiry month; valid through the last day of that month.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expiry {
    pub month: u32,
    pub year: i32,
}

impl Expiry {
    /// Month and year are both checked: a bad month and a bad year are both
    /// reported. An expiry in the past is `CARD_EXPIRED`.
    pub fn parse(month: i32, year: i32, today: NaiveDate) -> Result<Expiry, BillingError> {
        let mut violations = Violations::new();
        let month = u32::try_from(month).ok().filter(|m| (1..=12).contains(m));
        if month.is_none() {
            violations.add("card.exp_month", "must be 1 to 12");
        }
        let year_valid = (2000..=2100).contains(&year);
        if !year_valid {
            violations.add("card.exp_year", "must be a four-digit year");
        }
        let (Some(month), true) = (month, year_valid) else {
            return Err(violations.into_error());
        };
        if year < today.year() {
            return Err(BillingError::invalid_because(
                Reason::CardExpired,
                "card.exp_year",
                "the card has expired",
            ));
        }
        if year == today.year() && month < today.month() {
            return Err(BillingError::invalid_because(
                Reason::CardExpired,
                "card.exp_month",
                "the card has expired",
            ));
        }
        Ok(Expiry { month, year })
    }
}

/// A raw card, checked: what the sandbox gateway receives.
#[derive(Debug, Clone)]
pub struct CardDetails {
    pub number: CardNumber,
    pub expiry: Expiry,
    pub cvc: Cvc,
    pub holder_name: String,
}

impl CardDetails {
    /// Every field of the card is checked; the error names each bad one.
    pub fn parse(
        number: &str,
        exp_month: i32,
        exp_year: i32,
        cvc: &str,
        holder_name: &str,
        today: NaiveDate,
    ) -> Result<CardDetails, BillingError> {
        let mut violations = Violations::new();
        let number = violations.check(CardNumber::parse(number));
        let expiry = violations.check(Expiry::parse(exp_month, exp_year, today));
        let cvc = match &number {
            Some(number) => violations.check(Cvc::parse(cvc, number.brand())),
            None => {
                violations.check(Cvc::check_any_brand(cvc));
                None
            }
        };
        let holder_name =
            violations.check(crate::ids::parse_text("card.holder_name", holder_name, 200));
        let (Some(number), Some(expiry), Some(cvc), Some(holder_name)) =
            (number, expiry, cvc, holder_name)
        else {
            return Err(violations.into_error());
        };
        Ok(CardDetails {
            number,
            expiry,
            cvc,
            holder_name,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn today() -> NaiveDate {
        NaiveDate::from_ymd_opt(2026, 5, 15).unwrap()
    }

    fn fields_of(error: BillingError) -> Vec<String> {
        match error {
            BillingError::InvalidArgument(violations) => {
                violations.into_iter().map(|v| v.field).collect()
            }
            other => panic!("not invalid argument: {other:?}"),
        }
    }

    fn field_of(error: BillingError) -> String {
        let fields = fields_of(error);
        assert_eq!(fields.len(), 1, "{fields:?}");
        fields[0].clone()
    }

    #[test]
    fn every_bad_field_of_a_card_is_reported_not_only_the_first() {
        let error =
            CardDetails::parse("4242424242424242", 13, 2030, "1", "Ada", today()).unwrap_err();
        assert_eq!(fields_of(error), ["card.exp_month", "card.cvc"]);
        let error =
            CardDetails::parse("4242424242424241", 0, 30, "12345", "A\u{0}", today()).unwrap_err();
        assert_eq!(
            fields_of(error),
            [
                "card.number",
                "card.exp_month",
                "card.exp_year",
                "card.cvc",
                "card.holder_name"
            ]
        );
    }

    #[test]
    fn a_number_is_grouped_only_by_single_spaces_or_dashes_between_digits() {
        for grouped in [
            "4242 4242 4242 4242",
            "4242-4242-4242-4242",
            "4242424242424242",
        ] {
            assert_eq!(CardNumber::parse(grouped).unwrap().last4(), "4242");
        }
        for loose in [
            "4242  4242 4242 4242",
            " 4242424242424242",
            "4242424242424242-",
            "4242 -4242 4242 4242",
        ] {
            assert!(CardNumber::parse(loose).is_err(), "{loose:?}");
        }
    }

    #[test]
    fn an_expiry_in_the_past_is_card_expired() {
        let error = Expiry::parse(4, 2026, today()).unwrap_err();
        assert_eq!(error.reason(), Reason::CardExpired);
        let error = Expiry::parse(13, 2026, today()).unwrap_err();
        assert_eq!(error.reason(), Reason::InvalidField);
    }

    #[test]
    fn test_cards_pass_luhn_and_get_their_brand() {
        for (number, brand) in [
            ("4242424242424242", Brand::Visa),
            ("4242 4242 4242 4242", Brand::Visa),
            ("5555555555554444", Brand::Mastercard),
            ("2223003122003222", Brand::Mastercard),
            ("378282246310005", Brand::Amex),
            ("6011111111111117", Brand::Discover),
            ("3566002020360505", Brand::Jcb),
        ] {
            assert_eq!(
                CardNumber::parse(number).unwrap().brand(),
                brand,
                "{number}"
            );
        }
    }

    #[test]
    fn bad_check_digit_or_garbage_is_refused_naming_the_field() {
        for bad in [
            "4242424242424241",
            "",
            "4242x42424242424",
            "1234",
            "9999999999999995",
        ] {
            assert_eq!(field_of(CardNumber::parse(bad).unwrap_err()), "card.number");
        }
    }

    #[test]
    fn errors_and_debug_never_show_the_full_number() {
        let number = CardNumber::parse("4242424242424242").unwrap();
        let printed = format!("{number:?}");
        assert!(!printed.contains("4242424242424242"));
        assert!(printed.ends_with("4242)"));
        let error = CardNumber::parse("4242424242424241").unwrap_err();
        assert!(!error.to_string().contains("424242424242"));
        assert_eq!(
            format!("{:?}", Cvc::parse("123", Brand::Visa).unwrap()),
            "Cvc(***)"
        );
    }

    #[test]
    fn amex_needs_four_cvc_digits_others_three() {
        assert!(Cvc::parse("1234", Brand::Amex).is_ok());
        assert!(Cvc::parse("123", Brand::Amex).is_err());
        assert!(Cvc::parse("123", Brand::Visa).is_ok());
        assert_eq!(
            field_of(Cvc::parse("12", Brand::Visa).unwrap_err()),
            "card.cvc"
        );
    }

    #[test]
    fn expiry_this_month_is_fine_last_month_is_not() {
        assert!(Expiry::parse(5, 2026, today()).is_ok());
        assert_eq!(
            field_of(Expiry::parse(4, 2026, today()).unwrap_err()),
            "card.exp_month"
        );
        assert_eq!(
            field_of(Expiry::parse(12, 2025, today()).unwrap_err()),
            "card.exp_year"
        );
        assert_eq!(
            field_of(Expiry::parse(13, 2030, today()).unwrap_err()),
            "card.exp_month"
        );
        assert_eq!(
            field_of(Expiry::parse(1, 30, today()).unwrap_err()),
            "card.exp_year"
        );
    }

    #[test]
    fn fingerprints_are_stable_and_do_not_contain_the_number() {
        let a = CardNumber::parse("4242424242424242").unwrap();
        let b = CardNumber::parse("4242-4242-4242-4242").unwrap();
        assert_eq!(a.fingerprint(), b.fingerprint());
        assert!(!a.fingerprint().contains("4242424242424242"));
    }
}
