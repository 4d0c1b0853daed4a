//! proto <-> domain conversions shared by the adapters.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Utc};

use crate::error::BillingError;
use crate::ids::parse_text;

pub fn timestamp(time: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: time.timestamp(),
        nanos: time.timestamp_subsec_nanos() as i32,
    }
}

/// The range of a valid `google.protobuf.Timestamp`: 0001-01-01T00:00:00Z
/// to 9999-12-31T23:59:59.999999999Z (its definition), in seconds since
/// the Unix epoch. Postgres stores every instant of it.
const TIMESTAMP_SECONDS: std::ops::RangeInclusive<i64> = -62_135_596_800..=253_402_300_799;

/// An optional `google.protobuf.Timestamp` filter field. Errors:
/// `INVALID_ARGUMENT` naming `field` when it is outside the Timestamp's
/// valid range (years 1 to 9999) or its `nanos` are not 0 to 999,999,999.
pub fn optional_time(
    field: &str,
    value: Option<prost_types::Timestamp>,
) -> Result<Option<DateTime<Utc>>, BillingError> {
    value
        .map(|ts| {
            TIMESTAMP_SECONDS
                .contains(&ts.seconds)
                .then_some(())
                .and_then(|()| u32::try_from(ts.nanos).ok())
                .filter(|nanos| *nanos < 1_000_000_000)
                .and_then(|nanos| DateTime::from_timestamp(ts.seconds, nanos))
                .ok_or_else(|| {
                    BillingError::invalid(
                        field,
                        "is not a valid timestamp: it must lie between \
                         0001-01-01T00:00:00Z and 9999-12-31T23:59:59Z",
                    )
                })
        })
        .transpose()
}

pub const MAX_METADATA_ENTRIES: usize = 32;

/// Caller-supplied metadata: at most 32 pairs, keys 1-64 and values 0-512 characters.
pub fn metadata(
    field: &str,
    map: HashMap<String, String>,
) -> Result<BTreeMap<String, String>, BillingError> {
    if map.len() > MAX_METADATA_ENTRIES {
        return Err(BillingError::invalid(
            field,
            format!("has more than {MAX_METADATA_ENTRIES} entries"),
        ));
    }
    let mut parsed = BTreeMap::new();
    for (key, value) in map {
        if key.is_empty() {
            return Err(BillingError::invalid(field, "keys must not be empty"));
        }
        let key = parse_text(&format!("{field} key"), &key, 64)?;
        let value = parse_text(&format!("{field}[{key}]"), &value, 512)?;
        parsed.insert(key, value);
    }
    Ok(parsed)
}

pub(crate) fn required_id(field: &str, text: &str) -> Result<String, BillingError> {
    if text.is_empty() {
        return Err(BillingError::invalid(field, "is required"));
    }
    checked_id(field, text)
}

/// Any short printable text is looked up (what does not exist is NOT_FOUND);
/// control characters (Postgres refuses NUL in text) or huge values cannot
/// name a stored row and are refused before the database sees them.
pub(crate) fn checked_id(field: &str, text: &str) -> Result<String, BillingError> {
    if text.len() > MAX_ID_BYTES || text.chars().any(char::is_control) {
        return Err(BillingError::invalid(field, "is not a valid id"));
    }
    Ok(text.to_owned())
}

const MAX_ID_BYTES: usize = 128;

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: i64, nanos: i32) -> Option<prost_types::Timestamp> {
        Some(prost_types::Timestamp { seconds, nanos })
    }

    #[test]
    fn a_timestamp_filter_outside_years_1_to_9999_is_invalid_argument_naming_the_field() {
        let first = *TIMESTAMP_SECONDS.start();
        let last = *TIMESTAMP_SECONDS.end();
        assert!(
            optional_time("created_after", at(first, 0))
                .unwrap()
                .is_some()
        );
        assert!(
            optional_time("created_after", at(last, 999_999_999))
                .unwrap()
                .is_some()
        );
        assert_eq!(optional_time("created_after", None).unwrap(), None);
        for (seconds, nanos) in [
            (first - 1, 0),
            (last + 1, 0),
            (-210_866_805_745, 864_902_792),
            (i64::MIN, 0),
            (i64::MAX, 0),
            (0, -1),
            (0, 1_000_000_000),
        ] {
            let error = optional_time("created_before", at(seconds, nanos))
                .expect_err("outside the Timestamp's range");
            let text = error.to_string();
            assert!(text.contains("created_before"), "{text}");
        }
    }
}
