//! The audit trail through `Audit.ListAuditEvents`: who may read it (the
//! account's admin and the service role, nobody else's), what an event
//! holds (actor, action, targets, time, idempotency key, trace id — and no
//! card data), filters and paging, and the engine's own changes.

use billing::proto::{self, ActorType, audit_client::AuditClient};
use tonic::Code;

use crate::helpers::{TestApp, authed, spawn_app};
use crate::payment_methods::{add_card_request, card, client as payment_methods};

const OWN: &str = "own-acct";
const OTHER: &str = "other-acct";
const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

fn audit(app: &TestApp) -> AuditClient<tonic::transport::Channel> {
    AuditClient::new(app.channel.clone())
}

fn request(account: &str) -> proto::ListAuditEventsRequest {
    proto::ListAuditEventsRequest {
        account_id: account.into(),
        ..Default::default()
    }
}

async fn list(
    app: &TestApp,
    token: &str,
    request: proto::ListAuditEventsRequest,
) -> Result<proto::ListAuditEventsResponse, tonic::Status> {
    audit(app)
        .list_audit_events(authed(token, request))
        .await
        .map(|response| response.into_inner())
}

/// Every event of `account` matching `request`'s filters, page after page.
async fn list_all(
    app: &TestApp,
    token: &str,
    mut request: proto::ListAuditEventsRequest,
) -> Vec<proto::AuditEvent> {
    let mut events = Vec::new();
    for _ in 0..100 {
        let page = list(app, token, request.clone()).await.expect("list");
        events.extend(page.events);
        if page.next_page_token.is_empty() {
            return events;
        }
        request.page_token = page.next_page_token;
    }
    panic!("more than 100 pages");
}

fn actions(events: &[proto::AuditEvent]) -> Vec<&str> {
    events.iter().map(|e| e.action.as_str()).collect()
}

/// A credit of `amount` by a service token, with `key` and a W3C traceparent.
async fn credit(app: &TestApp, token: &str, account: &str, amount: &str, key: &str) {
    let mut call = authed(
        token,
        proto::CreditRequest {
            account_id: account.into(),
            amount: amount.into(),
            kind: proto::TransactionKind::Adjustment as i32,
            idempotency_key: key.into(),
            ..Default::default()
        },
    );
    call.metadata_mut().insert(
        "traceparent",
        format!("00-{TRACE_ID}-00f067aa0ba902b7-01")
            .parse()
            .unwrap(),
    );
    app.balances().credit(call).await.expect("credit");
}

#[tokio::test]
async fn list_audit_events_for_every_role_on_own_and_other_accounts() {
    let app = spawn_app().await;
    app.account_with_balance(OWN, "10.00").await;
    app.account_with_balance(OTHER, "10.00").await;
    let mut failures = Vec::new();
    let tokens = [
        ("admin", app.token("admin", Some(OWN))),
        ("commercial", app.token("commercial", Some(OWN))),
        ("billing", app.token("billing", Some(OWN))),
        ("viewer", app.token("viewer", Some(OWN))),
        ("service", app.service_token()),
        (
            "service bound to own",
            app.keys.mint("meter", "service", Some(OWN), 600).unwrap(),
        ),
    ];
    for (role, token) in &tokens {
        for (account, own) in [(OWN, true), (OTHER, false)] {
            let want = match (*role, own) {
                ("service", _) => Code::Ok,
                ("admin" | "service bound to own", true) => Code::Ok,
                ("admin" | "service bound to own", false) => Code::NotFound,
                _ => Code::PermissionDenied,
            };
            let got = match list(&app, token, request(account)).await {
                Ok(page) => {
                    if page.events.iter().any(|e| e.account_id != account) {
                        failures.push(format!("{role} on {account}: another account's events"));
                    }
                    Code::Ok
                }
                Err(status) => status.code(),
            };
            if got != want {
                failures.push(format!("{role} own={own}: got {got:?}, want {want:?}"));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    app.stop().await;
}

#[tokio::test]
async fn an_event_names_actor_action_targets_idempotency_key_and_trace_id_and_no_card_data() {
    let app = spawn_app().await;
    app.account_with_balance(OWN, "0").await;
    let service = app.keys.mint("usage-meter", "service", None, 600).unwrap();
    credit(&app, &service, OWN, "5.00", "credit-key-1").await;
    let admin = app.keys.mint("alice", "admin", Some(OWN), 600).unwrap();
    let added = payment_methods(&app)
        .add_card(authed(
            &admin,
            add_card_request(OWN, card("4242424242424242"), "card-key-1"),
        ))
        .await
        .unwrap()
        .into_inner();
    let card_id = added.payment_method.unwrap().payment_method_id;

    let events = list_all(&app, &admin, request(OWN)).await;
    assert_eq!(
        actions(&events),
        vec!["add_card", "credit", "create_account"],
        "newest first"
    );

    let add_card = &events[0];
    let actor = add_card.actor.as_ref().unwrap();
    assert_eq!(actor.subject, "alice");
    assert_eq!(actor.roles, vec!["admin"]);
    assert_eq!(actor.r#type, ActorType::User as i32);
    assert_eq!(add_card.account_id, OWN);
    assert_eq!(add_card.idempotency_key, "card-key-1");
    assert_eq!(
        add_card
            .targets
            .iter()
            .map(|t| (t.kind.as_str(), t.id.as_str()))
            .collect::<Vec<_>>(),
        vec![("payment_method", card_id.as_str())]
    );
    assert!(add_card.created_at.is_some());
    // No card data: the card is named by its id only.
    for event in &events {
        for (key, value) in &event.details {
            assert!(
                !["brand", "last4", "number", "cvc", "exp_month", "exp_year"]
                    .contains(&key.as_str()),
                "{key} in the trail"
            );
            for card_data in ["4242", "visa", "Visa", "Ada Lovelace"] {
                assert!(!value.contains(card_data), "{key}={value} in the trail");
            }
        }
    }

    let credit = &events[1];
    let actor = credit.actor.as_ref().unwrap();
    assert_eq!(
        (actor.subject.as_str(), actor.r#type),
        ("usage-meter", ActorType::Service as i32)
    );
    assert_eq!(credit.idempotency_key, "credit-key-1");
    assert_eq!(credit.trace_id, TRACE_ID);
    assert_eq!(
        credit.details.get("amount").map(String::as_str),
        Some("5.00")
    );
    assert!(credit.targets.iter().any(|t| t.kind == "transaction"));
    app.stop().await;
}

#[tokio::test]
async fn audit_events_filter_by_actor_action_and_time_and_page() {
    let app = spawn_app().await;
    app.account_with_balance(OWN, "0").await;
    app.account_with_balance(OTHER, "0").await;
    let meter = app.keys.mint("meter", "service", None, 600).unwrap();
    for n in 0..5 {
        credit(&app, &meter, OWN, "1.00", &format!("c-{n}")).await;
    }
    credit(&app, &meter, OTHER, "1.00", "other-1").await;
    let admin = app.keys.mint("alice", "admin", Some(OWN), 600).unwrap();
    for _ in 0..2 {
        proto::notifications_client::NotificationsClient::new(app.channel.clone())
            .update_notification_settings(authed(
                &admin,
                proto::UpdateNotificationSettingsRequest {
                    account_id: OWN.into(),
                    ..Default::default()
                },
            ))
            .await
            .unwrap();
    }

    let everything = list_all(&app, &admin, request(OWN)).await;
    assert_eq!(everything.len(), 8, "create_account, 5 credits, 2 settings");

    let by_alice = list_all(
        &app,
        &admin,
        proto::ListAuditEventsRequest {
            actor_subject: "alice".into(),
            ..request(OWN)
        },
    )
    .await;
    assert_eq!(actions(&by_alice), vec!["update_notification_settings"; 2]);

    let credits = list_all(
        &app,
        &admin,
        proto::ListAuditEventsRequest {
            action: "credit".into(),
            ..request(OWN)
        },
    )
    .await;
    assert_eq!(credits.len(), 5);
    assert!(credits.iter().all(|e| e.account_id == OWN));

    // Time: from the third credit on (inclusive), and before it (exclusive).
    let third_credit = credits[2].created_at.unwrap();
    let since = list_all(
        &app,
        &admin,
        proto::ListAuditEventsRequest {
            created_after: Some(third_credit),
            ..request(OWN)
        },
    )
    .await;
    let until = list_all(
        &app,
        &admin,
        proto::ListAuditEventsRequest {
            created_before: Some(third_credit),
            ..request(OWN)
        },
    )
    .await;
    let to_seconds = |e: &proto::AuditEvent| {
        let t = e.created_at.unwrap();
        (t.seconds, t.nanos)
    };
    let at = (third_credit.seconds, third_credit.nanos);
    assert!(since.iter().all(|e| to_seconds(e) >= at));
    assert!(until.iter().all(|e| to_seconds(e) < at));
    assert_eq!(since.len() + until.len(), everything.len());
    assert!(
        since
            .iter()
            .any(|e| e.audit_event_id == credits[2].audit_event_id)
    );

    // Paging: pages of 3 give every event once, newest first.
    let mut paged = Vec::new();
    let mut page_request = proto::ListAuditEventsRequest {
        page_size: 3,
        ..request(OWN)
    };
    let mut pages = 0;
    loop {
        let page = list(&app, &admin, page_request.clone()).await.unwrap();
        assert!(page.events.len() <= 3);
        pages += 1;
        paged.extend(page.events);
        if page.next_page_token.is_empty() {
            break;
        }
        page_request.page_token = page.next_page_token;
    }
    assert_eq!(pages, 3);
    assert_eq!(paged, everything);

    // Bad filters are refused, naming the field.
    for (bad, field) in [
        (
            proto::ListAuditEventsRequest {
                page_size: -1,
                ..request(OWN)
            },
            "page_size",
        ),
        (
            proto::ListAuditEventsRequest {
                page_token: "not-a-token".into(),
                ..request(OWN)
            },
            "page_token",
        ),
        (
            proto::ListAuditEventsRequest {
                action: "credit\n".into(),
                ..request(OWN)
            },
            "action",
        ),
        (
            proto::ListAuditEventsRequest {
                actor_subject: "x".repeat(300),
                ..request(OWN)
            },
            "actor_subject",
        ),
    ] {
        let error = list(&app, &admin, bad).await.unwrap_err();
        assert_eq!(error.code(), Code::InvalidArgument, "{field}");
        assert!(error.message().contains(field), "{error:?}");
    }
    app.stop().await;
}

#[tokio::test]
async fn an_automatic_top_up_and_a_disabled_card_are_in_the_trail_with_the_engine_as_actor() {
    use crate::top_ups::{ACCT, DECLINES, VISA, apply, debit, scenario, settings, wait_for_top_up};
    let (s, cards) = scenario("12.00", &[DECLINES, VISA]).await;
    apply(&s, settings("10.00", "50.00")).await;
    debit(&s.app, "7.00", "call-1").await;
    let top_up = wait_for_top_up(&s, proto::TopUpStatus::Succeeded).await;

    let events = list_all(&s.app, &s.admin, request(ACCT)).await;
    let by_engine: Vec<&proto::AuditEvent> = events
        .iter()
        .filter(|e| e.actor.as_ref().unwrap().r#type == ActorType::Engine as i32)
        .collect();
    assert!(
        by_engine
            .iter()
            .all(|e| e.actor.as_ref().unwrap().subject == "auto-top-up-engine")
    );
    let targets = |e: &proto::AuditEvent, kind: &str| -> Vec<String> {
        e.targets
            .iter()
            .filter(|t| t.kind == kind)
            .map(|t| t.id.clone())
            .collect()
    };
    let step = |action: &str| {
        by_engine
            .iter()
            .find(|e| e.action == action)
            .unwrap_or_else(|| panic!("no {action} by the engine in {:?}", actions(&events)))
    };
    let started = step("start_top_up");
    assert_eq!(targets(started, "top_up"), vec![top_up.top_up_id.clone()]);
    let disabled = step("disable_payment_method");
    assert_eq!(targets(disabled, "payment_method"), vec![cards[0].clone()]);
    assert_eq!(
        disabled.details.get("reason").map(String::as_str),
        Some("card_declined")
    );
    let credited = step("credit");
    let amount: rust_decimal::Decimal = credited.details["amount"].parse().unwrap();
    assert_eq!(amount, rust_decimal::Decimal::from(50));
    assert_eq!(
        credited.idempotency_key, "",
        "an engine step has no request key"
    );
    let finished = step("finish_top_up");
    assert_eq!(targets(finished, "top_up"), vec![top_up.top_up_id.clone()]);
    assert_eq!(
        finished.details.get("status").map(String::as_str),
        Some("SUCCEEDED")
    );
    // Newest first: the top-up ended after it started.
    let position = |e: &proto::AuditEvent| events.iter().position(|x| x == e).unwrap();
    assert!(position(finished) < position(started));
    // The engine's steps are filtered by actor like anyone's.
    let engine_only = list_all(
        &s.app,
        &s.admin,
        proto::ListAuditEventsRequest {
            actor_subject: "auto-top-up-engine".into(),
            ..request(ACCT)
        },
    )
    .await;
    assert_eq!(engine_only.len(), by_engine.len());
    s.app.stop().await;
}
