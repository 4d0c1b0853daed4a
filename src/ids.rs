//! Identifiers and short text fields that arrive from clients, parsed once.

use std::fmt;

use crate::error::BillingError;

/// An account id chosen by the caller: 1-64 characters of `[A-Za-z0-9._:-]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct AccountId(String);

impl AccountId {
    pub const MAX_LEN: usize = 64;

    pub fn parse(text: &str) -> Result<AccountId, BillingError> {
        if text.is_empty() {
            return Err(BillingError::invalid("account_id", "is required"));
        }
        if text.len() > Self::MAX_LEN {
            return Err(BillingError::invalid(
                "account_id",
                "is longer than 64 characters",
            ));
        }
        let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-');
        if !text.chars().all(allowed) {
            return Err(BillingError::invalid(
                "account_id",
                "may only contain letters, digits, '.', '_', ':' and '-'",
            ));
        }
        Ok(AccountId(text.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for AccountId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A client's idempotency key: 1-128 printable ASCII characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    pub fn parse(text: &str) -> Result<IdempotencyKey, BillingError> {
        if text.is_empty() {
            return Err(BillingError::invalid("idempotency_key", "is required"));
        }
        if text.len() > 128 {
            return Err(BillingError::invalid(
                "idempotency_key",
                "is longer than 128 characters",
            ));
        }
        if !text.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(BillingError::invalid(
                "idempotency_key",
                "may only contain printable ASCII characters without spaces",
            ));
        }
        Ok(IdempotencyKey(text.to_owned()))
    }

    /// A key the service makes for its own records (e.g. the ledger credit of
    /// a top-up): `"<namespace> <id>"`. It contains a space, which [`parse`]
    /// refuses, so no client key can ever equal an internal one, whatever
    /// the client sends.
    ///
    /// [`parse`]: IdempotencyKey::parse
    pub fn internal(namespace: &str, id: &str) -> IdempotencyKey {
        debug_assert!(!namespace.contains(' ') && !id.contains(' '));
        IdempotencyKey(format!("{namespace} {id}"))
    }

    /// True for keys made by [`IdempotencyKey::internal`].
    pub fn is_internal(&self) -> bool {
        self.0.contains(' ')
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Free text a person typed (names, descriptions): bounded, no control characters.
pub fn parse_text(field: &str, text: &str, max_chars: usize) -> Result<String, BillingError> {
    if text.chars().count() > max_chars {
        return Err(BillingError::invalid(
            field,
            format!("is longer than {max_chars} characters"),
        ));
    }
    if text.chars().any(|c| c.is_control()) {
        return Err(BillingError::invalid(
            field,
            "must not contain control characters",
        ));
    }
    if text.chars().any(is_bidi_override) {
        return Err(BillingError::invalid(
            field,
            "must not contain bidirectional embedding, override or isolate characters (U+202A-U+202E, U+2066-U+2069)",
        ));
    }
    Ok(text.to_owned())
}

/// The Unicode bidirectional embeddings, overrides and isolates: they
/// reorder what follows them on screen, so a name shown in an email or the
/// panel could read as something else ("Trojan Source", CVE-2021-42574).
/// The marks U+200E/U+200F stay allowed: right-to-left text needs them.
fn is_bidi_override(c: char) -> bool {
    matches!(c, '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
}

/// An email address as the mailer will take it: lettre's own [`Address`]
/// parser must accept it (so `ops,team@…`, `x<y@…`, `a;b@…`,
/// `a(comment)@…` and display names are refused), and on top of it: at
/// most 254 characters, no whitespace or control characters, and a domain
/// with a dot. The error names `field` (e.g. `recipients[2]`).
///
/// [`Address`]: lettre::Address
pub fn parse_email(field: &str, text: &str) -> Result<String, BillingError> {
    // Echo a bounded prefix only: a 10k-character value must not become a
    // 10k-character grpc-message header (clients reset such streams).
    let invalid = || {
        let shown: String = text.chars().take(64).collect();
        let ellipsis = if text.chars().count() > 64 { "…" } else { "" };
        BillingError::invalid(
            field,
            format!("{shown:?}{ellipsis} is not a valid email address"),
        )
    };
    if text.len() > 254 || text.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(invalid());
    }
    let address: lettre::Address = text.parse().map_err(|_| invalid())?;
    let domain = address.domain();
    let domain_ok = domain.contains('.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && !domain.contains("..")
        && domain
            .chars()
            .all(|c| c.is_alphanumeric() || c == '.' || c == '-');
    if address.user().len() > 64 || !domain_ok {
        return Err(invalid());
    }
    Ok(text.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_client_key_can_equal_an_internal_key() {
        let internal = IdempotencyKey::internal("top-up", "tu_0190");
        assert!(internal.is_internal());
        assert!(IdempotencyKey::parse(internal.as_str()).is_err());
        assert!(IdempotencyKey::parse("top-up:tu_0190").is_ok_and(|k| !k.is_internal()));
    }

    #[test]
    fn text_that_would_reorder_itself_on_screen_is_refused() {
        for spoof in ["\u{202E}moc.elpmaxe", "Acme\u{2066}Ltd", "a\u{202A}b"] {
            let error = parse_text("display_name", spoof, 200).unwrap_err();
            assert!(error.to_string().contains("display_name"), "{error}");
        }
        // Right-to-left text and its marks are names like any other.
        assert!(
            parse_text(
                "display_name",
                "\u{5E9}\u{5DC}\u{5D5}\u{5DD} \u{200F}Ltd",
                200
            )
            .is_ok()
        );
    }

    #[test]
    fn account_ids_are_bounded_and_plain() {
        assert!(AccountId::parse("acme-42").is_ok());
        assert!(AccountId::parse("").is_err());
        assert!(AccountId::parse("a b").is_err());
        assert!(AccountId::parse("x'; DROP TABLE accounts;--").is_err());
        assert!(AccountId::parse(&"a".repeat(65)).is_err());
    }

    #[test]
    fn emails_need_a_local_part_and_a_dotted_domain() {
        assert!(parse_email("e", "ops@example.com").is_ok());
        for bad in [
            "",
            "a",
            "a@b",
            "@b.com",
            "a@.com",
            "a b@c.com",
            "a@b..com",
            "a@b.com\r\nBcc: x@y.z",
        ] {
            assert!(parse_email("e", bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn emails_the_mailer_would_refuse_are_refused_here() {
        for bad in [
            "ops,team@a.example",
            "x<y@a.example",
            "a;b@a.example",
            "a(comment)@a.example",
            "Ops <ops@a.example>",
            "\"a b\"@a.example",
        ] {
            let error = parse_email("recipients[2]", bad).unwrap_err();
            assert!(error.to_string().starts_with("recipients[2]"), "{error}");
        }
        for good in ["ops+alerts@a.example", "o.p-s_1@mail.a-b.example"] {
            assert_eq!(parse_email("e", good).unwrap(), good);
        }
    }
}
