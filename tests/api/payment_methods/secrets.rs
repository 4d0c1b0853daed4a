//! No full card number and no CVC anywhere: not in any column of any table,
//! not in the server's logs (captured at TRACE level).

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};

use billing::proto;

use super::*;
use crate::helpers::authed;

#[derive(Clone, Default)]
struct CapturedLogs(Arc<Mutex<Vec<u8>>>);

impl Write for CapturedLogs {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl CapturedLogs {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// Every row of every table in `public`, as JSON text.
async fn dump_database(app: &TestApp) -> Vec<String> {
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT table_name::text FROM information_schema.tables \
          WHERE table_schema = 'public' AND table_type = 'BASE TABLE'",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    assert!(tables.iter().any(|t| t == "sandbox_cards"), "{tables:?}");
    let mut rows = Vec::new();
    for table in tables {
        let sql = format!("SELECT row_to_json(t)::text FROM \"{table}\" t");
        let table_rows: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
            .fetch_all(&app.pool)
            .await
            .unwrap();
        rows.extend(table_rows);
    }
    rows
}

/// Every scalar of a JSON value, as text, and every key.
fn scalars(value: &serde_json::Value, out: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, inner) in map {
                out.push(key.clone());
                scalars(inner, out);
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|i| scalars(i, out)),
        serde_json::Value::String(text) => out.push(text.clone()),
        other => out.push(other.to_string()),
    }
}

/// A process-wide TRACE subscriber writing into memory. Scoped subscribers
/// (`set_default`) miss events whose callsites other tests running in
/// parallel registered first, so this one is global; it captures every
/// test's logs, which only makes the check stricter. `None` when another
/// global subscriber was installed first (`TEST_LOG=1`).
fn global_log_capture() -> Option<CapturedLogs> {
    static CAPTURE: OnceLock<Option<CapturedLogs>> = OnceLock::new();
    CAPTURE
        .get_or_init(|| {
            let logs = CapturedLogs::default();
            let writer = logs.clone();
            let subscriber = tracing_subscriber::fmt()
                .with_max_level(tracing::Level::TRACE)
                .with_ansi(false)
                .with_writer(move || writer.clone())
                .finish();
            tracing::subscriber::set_global_default(subscriber)
                .ok()
                .map(|_| logs)
        })
        .clone()
}

#[tokio::test]
async fn no_card_number_or_cvc_is_stored_or_logged() {
    let logs = global_log_capture();
    let (app, token) = app_with_accounts().await;
    let used = [
        (VISA, "731"),
        (AMEX, "6543"),
        (SETUP_3DS, "852"),
        (DECLINED_AT_SETUP, "913"),
    ];
    for (n, (number, cvc)) in used.iter().enumerate() {
        let card = proto::CardDetails {
            cvc: cvc.to_string(),
            ..card(number)
        };
        let added = client(&app)
            .add_card(authed(
                &token,
                add_card_request(ACCT, card, &format!("secret-{n}")),
            ))
            .await
            .unwrap()
            .into_inner();
        if added.next_action.is_some() {
            let id = added.payment_method.unwrap().payment_method_id;
            confirm(&app, &token, ACCT, &id, true).await.unwrap();
        }
    }
    // A duplicate and a bad check digit go through the error paths.
    let duplicate = proto::CardDetails {
        cvc: "731".into(),
        ..card(VISA)
    };
    client(&app)
        .add_card(authed(
            &token,
            add_card_request(ACCT, duplicate, "secret-dup"),
        ))
        .await
        .unwrap_err();
    let bad = proto::CardDetails {
        number: "4242424242424241".into(),
        cvc: "731".into(),
        ..card(VISA)
    };
    client(&app)
        .add_card(authed(&token, add_card_request(ACCT, bad, "secret-bad")))
        .await
        .unwrap_err();
    add_funds(&app, &token, funds("20.00", "", "secret-funds"))
        .await
        .unwrap();

    let numbers = [VISA, AMEX, SETUP_3DS, DECLINED_AT_SETUP, "4242424242424241"];
    let cvcs = ["731", "6543", "852", "913"];
    let rows = dump_database(&app).await;
    assert!(
        rows.iter().any(|r| r.contains("\"last4\":\"4242\"")),
        "the dump has the cards"
    );
    for row in &rows {
        for number in numbers {
            assert!(!row.contains(number), "a card number is stored: {row}");
        }
        let mut values = Vec::new();
        scalars(&serde_json::from_str(row).unwrap(), &mut values);
        for value in values {
            assert!(!cvcs.contains(&value.as_str()), "a CVC is stored: {row}");
            assert!(
                !value.to_lowercase().contains("cvc"),
                "something CVC-like is stored: {row}"
            );
        }
    }

    let Some(logs) = logs else {
        eprintln!("TEST_LOG installed its own subscriber: the log check is skipped");
        app.stop().await;
        return;
    };
    let log = logs.text();
    assert!(
        log.contains("card added"),
        "the logs were captured: {} bytes",
        log.len()
    );
    for number in numbers {
        assert!(!log.contains(number), "a card number was logged");
    }
    for line in log.lines() {
        // The HTTP/2 layers (h2, hyper) log frame metadata only — stream ids,
        // window sizes — never a message's bytes, and their numbers (of every
        // test running in this process) would match a 3-digit CVC by chance.
        let target = line.split_whitespace().nth(2).unwrap_or("");
        if target.starts_with("h2::") || target.starts_with("hyper") {
            continue;
        }
        // Timestamps and measured durations are digits by nature; everything else is checked.
        let fields = line
            .split_whitespace()
            .skip(1)
            .filter(|field| !field.starts_with("elapsed"));
        for word in fields.flat_map(|f| f.split(|c: char| !c.is_ascii_alphanumeric())) {
            assert!(!cvcs.contains(&word), "a CVC was logged: {line}");
        }
    }
    app.stop().await;
}
