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

pub fn optional_time(
    field: &str,
    value: Option<prost_types::Timestamp>,
) -> Result<Option<DateTime<Utc>>, BillingError> {
    value
        .map(|ts| {
            u32::try_from(ts.nanos)
                .ok()
                .and_then(|nanos| DateTime::from_timestamp(ts.seconds, nanos))
                .ok_or_else(|| BillingError::invalid(field, "is not a valid timestamp"))
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
