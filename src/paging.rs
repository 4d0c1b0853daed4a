//! Page size and opaque page tokens shared by every list RPC.

use crate::error::BillingError;

pub const DEFAULT_PAGE_SIZE: i64 = 50;
pub const MAX_PAGE_SIZE: i64 = 200;

/// A validated page request: how many rows, and the key to continue after.
#[derive(Debug, Clone, Copy)]
pub struct Page {
    pub size: i64,
    /// Rows strictly before (older than) this id; `None` starts at the newest.
    pub after_id: Option<i64>,
}

impl Page {
    /// Both fields are checked; the error names each bad one.
    pub fn parse(page_size: i32, page_token: &str) -> Result<Page, BillingError> {
        let mut violations = crate::error::Violations::new();
        let size = match page_size {
            0 => DEFAULT_PAGE_SIZE,
            n if n < 0 => {
                violations.add("page_size", "must not be negative");
                DEFAULT_PAGE_SIZE
            }
            n => i64::from(n).min(MAX_PAGE_SIZE),
        };
        let after_id = if page_token.is_empty() {
            None
        } else {
            violations.check(decode_token(page_token))
        };
        violations.finish()?;
        Ok(Page { size, after_id })
    }
}

const TOKEN_PREFIX: &str = "p1.";

pub fn encode_token(last_id: i64) -> String {
    format!("{TOKEN_PREFIX}{last_id:x}")
}

fn decode_token(token: &str) -> Result<i64, BillingError> {
    token
        .strip_prefix(TOKEN_PREFIX)
        .and_then(|hex| i64::from_str_radix(hex, 16).ok())
        .filter(|id| *id > 0)
        .ok_or_else(|| BillingError::invalid("page_token", "is not a token this service issued"))
}

/// The next page token when a page came back full.
pub fn next_token(rows_returned: usize, page: &Page, last_id: Option<i64>) -> String {
    match last_id {
        Some(id) if rows_returned as i64 == page.size => encode_token(id),
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_garbage_is_refused() {
        let page = Page::parse(10, &encode_token(1234)).unwrap();
        assert_eq!(page.after_id, Some(1234));
        assert!(Page::parse(10, "nonsense").is_err());
        assert!(Page::parse(10, "p1.-5").is_err());
        assert!(Page::parse(-1, "").is_err());
        assert_eq!(Page::parse(100_000, "").unwrap().size, MAX_PAGE_SIZE);
    }
}
