//! Refill bounds per currency: the smallest and largest refill amount
//! "Apply Changes" accepts, the largest single automatic charge, and what
//! Retry charges when neither the request nor the settings name an amount.

use std::collections::HashMap;

use rust_decimal::Decimal;

use crate::money::Currency;

/// Bounds in whole units of each currency (`min` > 0, `min` ≤ `max`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefillBounds {
    by_currency: HashMap<&'static str, (Decimal, Decimal)>,
}

/// Defaults: about 30–10,000 USD in every currency the service accepts.
const DEFAULT_BOUNDS: &[(&str, i64, i64)] = &[
    ("USD", 30, 10_000),
    ("EUR", 30, 10_000),
    ("GBP", 25, 8_000),
    ("CHF", 30, 10_000),
    ("CAD", 40, 14_000),
    ("AUD", 45, 15_000),
    ("NZD", 50, 17_000),
    ("SEK", 300, 100_000),
    ("NOK", 300, 100_000),
    ("DKK", 200, 70_000),
    ("PLN", 120, 40_000),
    ("CZK", 700, 230_000),
    ("SGD", 40, 13_000),
    ("HKD", 250, 80_000),
    ("BRL", 150, 50_000),
    ("MXN", 500, 180_000),
    ("INR", 2_500, 800_000),
    ("ZAR", 500, 180_000),
    ("JPY", 3_000, 1_500_000),
];

impl Default for RefillBounds {
    fn default() -> Self {
        let by_currency = DEFAULT_BOUNDS
            .iter()
            .filter_map(|&(code, min, max)| {
                let currency = Currency::parse(code).ok()?;
                Some((currency.code(), (Decimal::from(min), Decimal::from(max))))
            })
            .collect();
        Self { by_currency }
    }
}

impl RefillBounds {
    /// `(min, max)` of `currency`; a currency without bounds of its own
    /// takes USD's.
    pub fn of(&self, currency: Currency) -> (Decimal, Decimal) {
        self.by_currency
            .get(currency.code())
            .or_else(|| self.by_currency.get("USD"))
            .copied()
            .unwrap_or((Decimal::from(30), Decimal::from(10_000)))
    }

    /// Replaces the bounds of one currency.
    pub fn set(&mut self, currency: Currency, min: Decimal, max: Decimal) -> Result<(), String> {
        if min <= Decimal::ZERO {
            return Err(format!(
                "{}: the smallest refill must be greater than zero",
                currency.code()
            ));
        }
        if max < min {
            return Err(format!(
                "{}: the largest refill ({max}) is below the smallest ({min})",
                currency.code()
            ));
        }
        self.by_currency.insert(currency.code(), (min, max));
        Ok(())
    }
}

/// Parses `CUR=MIN..MAX` items separated by commas, e.g.
/// `"USD=30.00..10000.00,JPY=3000..1500000"`, over the defaults.
pub fn parse_refill_bounds(text: &str) -> Result<RefillBounds, String> {
    let mut bounds = RefillBounds::default();
    for item in text.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let (code, range) = item
            .split_once('=')
            .ok_or_else(|| format!("{item:?}: expected CUR=MIN..MAX"))?;
        let currency = Currency::parse(code).map_err(|e| format!("{code:?}: {e}"))?;
        let (min, max) = range
            .split_once("..")
            .ok_or_else(|| format!("{item:?}: expected CUR=MIN..MAX"))?;
        let amount = |text: &str| {
            currency
                .parse_charge_amount(text)
                .map_err(|e| format!("{item:?}: {text:?} {e}"))
        };
        bounds.set(currency, amount(min)?, amount(max)?)?;
    }
    Ok(bounds)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(text: &str) -> Decimal {
        text.parse().unwrap()
    }

    #[test]
    fn every_accepted_currency_has_sensible_default_bounds() {
        let bounds = RefillBounds::default();
        for code in ["USD", "EUR", "JPY", "INR", "GBP"] {
            let (min, max) = bounds.of(Currency::parse(code).unwrap());
            assert!(min > Decimal::ZERO && min < max, "{code}");
        }
        assert_eq!(bounds.of(Currency::USD), (d("30"), d("10000")));
        assert_eq!(
            bounds.of(Currency::parse("JPY").unwrap()),
            (d("3000"), d("1500000"))
        );
    }

    #[test]
    fn bounds_are_configurable_per_currency_and_must_be_positive() {
        let bounds = parse_refill_bounds("EUR=20.00..500.00, JPY=1000..2000").unwrap();
        assert_eq!(
            bounds.of(Currency::parse("EUR").unwrap()),
            (d("20.00"), d("500.00"))
        );
        assert_eq!(bounds.of(Currency::USD), (d("30"), d("10000")));
        assert!(parse_refill_bounds("USD=0..10").is_err());
        assert!(parse_refill_bounds("USD=10..5").is_err());
        assert!(parse_refill_bounds("USD=10").is_err());
        assert!(parse_refill_bounds("XXX=1..2").is_err());
        assert!(parse_refill_bounds("JPY=1.5..20").is_err());
    }
}
