//! Money: strict decimal-string parsing, currencies and formatting.
//!
//! Amounts travel as decimal strings (`"12.50"`) and are parsed strictly:
//! ASCII digits, at most one `.` followed by at least one digit, no sign, no
//! exponent, no spaces, no more fractional digits than the operation allows.
//! Usage may carry up to [`USAGE_SCALE`] fractional digits; card charges and
//! refills are whole minor units of the account's currency.

use std::fmt;

use rust_decimal::Decimal;

/// Fractional digits allowed on usage debits and credits (e.g. `0.0035`).
pub const USAGE_SCALE: u32 = 6;
/// Integer digits allowed in an amount: up to 999,999,999,999.
pub const MAX_INTEGER_DIGITS: usize = 12;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AmountError {
    #[error("is required")]
    Empty,
    #[error("must be a plain decimal number such as \"12.50\"")]
    Malformed,
    #[error("must not be negative")]
    Negative,
    #[error("allows at most {0} fractional digits")]
    TooPrecise(u32),
    #[error("is too large (at most {MAX_INTEGER_DIGITS} integer digits)")]
    TooLarge,
    #[error("must be greater than zero")]
    NotPositive,
}

/// Parses a non-negative amount with at most `max_scale` fractional digits.
pub fn parse_amount(text: &str, max_scale: u32) -> Result<Decimal, AmountError> {
    if text.is_empty() {
        return Err(AmountError::Empty);
    }
    if text.starts_with('-') {
        return Err(AmountError::Negative);
    }
    let (integer_part, fraction_part) = match text.split_once('.') {
        Some((integer, fraction)) => (integer, Some(fraction)),
        None => (text, None),
    };
    let all_ascii_digits =
        |part: &str| !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit());
    if !all_ascii_digits(integer_part) {
        return Err(AmountError::Malformed);
    }
    if integer_part.len() > 1 && integer_part.starts_with('0') {
        return Err(AmountError::Malformed);
    }
    if let Some(fraction) = fraction_part {
        if !all_ascii_digits(fraction) {
            return Err(AmountError::Malformed);
        }
        if fraction.len() > max_scale as usize {
            return Err(AmountError::TooPrecise(max_scale));
        }
    }
    if integer_part.len() > MAX_INTEGER_DIGITS {
        return Err(AmountError::TooLarge);
    }
    // Both parts are short runs of ASCII digits, so this cannot fail.
    text.parse::<Decimal>().map_err(|_| AmountError::Malformed)
}

/// Parses an amount that must be greater than zero.
pub fn parse_positive_amount(text: &str, max_scale: u32) -> Result<Decimal, AmountError> {
    let amount = parse_amount(text, max_scale)?;
    if amount.is_zero() {
        return Err(AmountError::NotPositive);
    }
    Ok(amount)
}

/// An ISO 4217 currency this service accepts, with its minor units.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Currency {
    code: &'static str,
    minor_units: u32,
}

const SUPPORTED_CURRENCIES: &[(&str, u32)] = &[
    ("USD", 2),
    ("EUR", 2),
    ("GBP", 2),
    ("CHF", 2),
    ("CAD", 2),
    ("AUD", 2),
    ("NZD", 2),
    ("SEK", 2),
    ("NOK", 2),
    ("DKK", 2),
    ("PLN", 2),
    ("CZK", 2),
    ("SGD", 2),
    ("HKD", 2),
    ("BRL", 2),
    ("MXN", 2),
    ("INR", 2),
    ("ZAR", 2),
    ("JPY", 0),
];

impl Currency {
    pub const USD: Currency = Currency {
        code: "USD",
        minor_units: 2,
    };

    /// Accepts an upper-case ISO 4217 code from the supported list.
    pub fn parse(code: &str) -> Result<Currency, String> {
        SUPPORTED_CURRENCIES
            .iter()
            .find(|(known, _)| *known == code)
            .map(|&(code, minor_units)| Currency { code, minor_units })
            .ok_or_else(|| {
                let known: Vec<&str> = SUPPORTED_CURRENCIES.iter().map(|(c, _)| *c).collect();
                format!(
                    "must be an upper-case ISO 4217 code, one of {}",
                    known.join(", ")
                )
            })
    }

    pub fn code(&self) -> &'static str {
        self.code
    }

    /// Fractional digits of a card charge in this currency (2 for USD, 0 for JPY).
    pub fn minor_units(&self) -> u32 {
        self.minor_units
    }

    /// Parses a card-charge amount: positive, whole minor units.
    pub fn parse_charge_amount(&self, text: &str) -> Result<Decimal, AmountError> {
        parse_positive_amount(text, self.minor_units)
    }

    /// The wire form of an amount: at least the currency's minor units,
    /// more only when the amount carries them (usage), never `-0`.
    pub fn format(&self, amount: Decimal) -> String {
        if amount.is_zero() {
            return Decimal::new(0, self.minor_units).to_string();
        }
        let mut normalized = amount.normalize();
        if normalized.scale() < self.minor_units {
            normalized.rescale(self.minor_units);
        }
        normalized.to_string()
    }

    /// For people: `"12.50 USD"`.
    pub fn display(&self, amount: Decimal) -> String {
        format!("{} {}", self.format(amount), self.code)
    }
}

impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    fn dec(text: &str) -> Decimal {
        Decimal::from_str(text).unwrap()
    }

    #[test]
    fn plain_decimals_are_accepted() {
        assert_eq!(parse_amount("12.50", 6), Ok(dec("12.50")));
        assert_eq!(parse_amount("0", 6), Ok(dec("0")));
        assert_eq!(parse_amount("0.0035", 6), Ok(dec("0.0035")));
        assert_eq!(parse_amount("0.000001", 6), Ok(dec("0.000001")));
        assert_eq!(
            parse_amount("999999999999.999999", 6),
            Ok(dec("999999999999.999999"))
        );
    }

    #[test]
    fn exponent_is_rejected() {
        assert_eq!(parse_amount("1e3", 6), Err(AmountError::Malformed));
        assert_eq!(parse_amount("1E3", 6), Err(AmountError::Malformed));
    }

    #[test]
    fn explicit_plus_sign_is_rejected() {
        assert_eq!(parse_amount("+1", 6), Err(AmountError::Malformed));
    }

    #[test]
    fn negative_zero_is_rejected_as_negative() {
        assert_eq!(parse_amount("-0", 6), Err(AmountError::Negative));
        assert_eq!(parse_amount("-5.00", 6), Err(AmountError::Negative));
    }

    #[test]
    fn seven_fractional_digits_are_too_precise_for_usage() {
        assert_eq!(
            parse_amount("0.0000001", USAGE_SCALE),
            Err(AmountError::TooPrecise(6))
        );
    }

    #[test]
    fn card_charges_are_whole_cents() {
        assert_eq!(
            Currency::USD.parse_charge_amount("10.001"),
            Err(AmountError::TooPrecise(2))
        );
        assert_eq!(Currency::USD.parse_charge_amount("10.01"), Ok(dec("10.01")));
        assert_eq!(
            Currency::USD.parse_charge_amount("0"),
            Err(AmountError::NotPositive)
        );
        let yen = Currency::parse("JPY").unwrap();
        assert_eq!(
            yen.parse_charge_amount("100.5"),
            Err(AmountError::TooPrecise(0))
        );
    }

    #[test]
    fn full_width_digits_are_rejected() {
        assert_eq!(parse_amount("１２", 6), Err(AmountError::Malformed));
    }

    #[test]
    fn surrounding_whitespace_is_rejected() {
        assert_eq!(parse_amount(" 1", 6), Err(AmountError::Malformed));
        assert_eq!(parse_amount("1 ", 6), Err(AmountError::Malformed));
        assert_eq!(parse_amount("1\n", 6), Err(AmountError::Malformed));
    }

    #[test]
    fn dangling_or_leading_point_is_rejected() {
        assert_eq!(parse_amount("1.", 6), Err(AmountError::Malformed));
        assert_eq!(parse_amount(".5", 6), Err(AmountError::Malformed));
        assert_eq!(parse_amount("1.2.3", 6), Err(AmountError::Malformed));
        assert_eq!(parse_amount("1,50", 6), Err(AmountError::Malformed));
    }

    #[test]
    fn thirty_digit_values_are_too_large() {
        assert_eq!(parse_amount(&"9".repeat(30), 6), Err(AmountError::TooLarge));
        assert_eq!(
            parse_amount(&format!("1{}", "0".repeat(29)), 6),
            Err(AmountError::TooLarge)
        );
        assert_eq!(parse_amount("1000000000000", 6), Err(AmountError::TooLarge));
    }

    #[test]
    fn empty_string_is_required() {
        assert_eq!(parse_amount("", 6), Err(AmountError::Empty));
    }

    #[test]
    fn leading_zeros_are_rejected_but_zero_point_is_fine() {
        assert_eq!(parse_amount("007", 6), Err(AmountError::Malformed));
        assert_eq!(parse_amount("0.50", 6), Ok(dec("0.50")));
    }

    #[test]
    fn zero_is_not_a_positive_amount() {
        assert_eq!(
            parse_positive_amount("0.000", 6),
            Err(AmountError::NotPositive)
        );
    }

    #[test]
    fn currencies_are_strict_iso_codes() {
        assert_eq!(Currency::parse("EUR").unwrap().code(), "EUR");
        assert!(Currency::parse("usd").is_err());
        assert!(Currency::parse("XXX").is_err());
        assert!(Currency::parse("").is_err());
    }

    #[test]
    fn formatting_keeps_minor_units_and_usage_digits() {
        let usd = Currency::USD;
        assert_eq!(usd.format(dec("12.5")), "12.50");
        assert_eq!(usd.format(dec("12.003500")), "12.0035");
        assert_eq!(usd.format(dec("-0.000")), "0.00");
        assert_eq!(usd.format(dec("-3")), "-3.00");
        assert_eq!(Currency::parse("JPY").unwrap().format(dec("100")), "100");
        assert_eq!(usd.display(dec("55")), "55.00 USD");
    }
}
