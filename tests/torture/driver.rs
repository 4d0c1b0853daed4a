//! The load: concurrent random operations against random replicas, with
//! every request that may have failed in transit retried with the same
//! idempotency key, and repeats of earlier requests checked for the same
//! answer.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use billing::proto::payment_methods_client::PaymentMethodsClient;
use billing::proto::{
    self, balance_policy_client::BalancePolicyClient, balances_client::BalancesClient,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tonic::transport::Channel;
use tonic::{Code, Status};

pub const CARDS: [&str; 4] = [
    "4242424242424242",
    "4000000000000341",
    "4000000000009904",
    "4000000000004954",
];

#[derive(Default)]
pub struct Tally {
    pub operations: u64,
    pub transient_errors: u64,
    pub repeats_checked: u64,
    pub violations: Vec<String>,
    /// Debit/credit keys and the transaction id the first success returned.
    pub postings: HashMap<(String, String), String>,
    /// Add Funds requests whose outcome was still unknown.
    pub unsettled_funds: Vec<(String, proto::AddFundsRequest)>,
    /// Every settings change: account, auto refill on, when sent, when
    /// answered, whether it took effect (for "no automatic charge while auto
    /// refill is off").
    pub settings_changes: Vec<SettingsChange>,
}

#[derive(Debug, Clone)]
pub struct SettingsChange {
    pub account: String,
    pub auto_refill: bool,
    pub sent: std::time::SystemTime,
    /// `None` when the outcome is unknown (it may have taken effect).
    pub answered: Option<std::time::SystemTime>,
    pub applied: bool,
}

pub struct Driver {
    pub channels: Vec<Channel>,
    pub accounts: Vec<String>,
    pub service_token: String,
    pub admin_tokens: HashMap<String, String>,
    pub tally: Arc<Mutex<Tally>>,
}

fn transient(status: &Status) -> bool {
    matches!(
        status.code(),
        Code::Unavailable
            | Code::Unknown
            | Code::Cancelled
            | Code::DeadlineExceeded
            | Code::ResourceExhausted
            | Code::Internal
    )
}

pub fn authed<T>(token: &str, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    request.set_timeout(Duration::from_secs(10));
    request
}

impl Driver {
    fn channel(&self, rng: &mut StdRng) -> Channel {
        self.channels[rng.random_range(0..self.channels.len())].clone()
    }

    /// Sends `call` (to random replicas) until it answers with a non-transient status.
    async fn until_definitive<T, F, Fut>(&self, rng: &mut StdRng, mut call: F) -> Result<T, Status>
    where
        F: FnMut(Channel) -> Fut,
        Fut: std::future::Future<Output = Result<T, Status>>,
    {
        let mut last = Status::unavailable("not sent");
        for _ in 0..40 {
            match call(self.channel(rng)).await {
                Ok(value) => return Ok(value),
                Err(status) if transient(&status) => {
                    self.tally.lock().unwrap().transient_errors += 1;
                    last = status;
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                Err(status) => return Err(status),
            }
        }
        Err(last)
    }

    pub async fn run(&self, worker: u64, seed: u64, until: Instant) {
        let mut rng = StdRng::seed_from_u64(seed ^ (worker * 7919));
        let mut own_keys: Vec<(String, proto::DebitRequest)> = Vec::new();
        let mut n = 0u64;
        while Instant::now() < until {
            n += 1;
            let account = self.accounts[rng.random_range(0..self.accounts.len())].clone();
            let roll = rng.random_range(0..100);
            match roll {
                0..=49 => {
                    self.debit(&mut rng, &account, worker, n, &mut own_keys)
                        .await
                }
                50..=59 if !own_keys.is_empty() => {
                    let (_, request) = own_keys[rng.random_range(0..own_keys.len())].clone();
                    self.send_debit(&mut rng, request).await;
                    self.tally.lock().unwrap().repeats_checked += 1;
                }
                50..=64 => self.credit(&mut rng, &account, worker, n).await,
                65..=72 => self.change_settings(&mut rng, &account).await,
                73..=80 => self.add_card(&mut rng, &account, worker, n).await,
                81..=85 => self.remove_or_reorder(&mut rng, &account).await,
                _ => self.add_funds(&mut rng, &account, worker, n).await,
            }
            self.tally.lock().unwrap().operations += 1;
        }
    }

    async fn debit(
        &self,
        rng: &mut StdRng,
        account: &str,
        worker: u64,
        n: u64,
        keys: &mut Vec<(String, proto::DebitRequest)>,
    ) {
        let cents = rng.random_range(1..1500);
        let micro = if rng.random_bool(0.3) {
            format!("{:04}", rng.random_range(0..10_000))
        } else {
            String::new()
        };
        let amount = format!("{}.{:02}{micro}", cents / 100, cents % 100);
        let request = proto::DebitRequest {
            account_id: account.to_owned(),
            amount,
            idempotency_key: format!("w{worker}-d{n}"),
            description: "torture".into(),
            allow_overdraft: rng.random_bool(0.2),
            ..Default::default()
        };
        keys.push((account.to_owned(), request.clone()));
        self.send_debit(rng, request).await;
    }

    async fn send_debit(&self, rng: &mut StdRng, request: proto::DebitRequest) {
        let token = self.service_token.clone();
        let answer = self
            .until_definitive(rng, |channel| {
                let request = request.clone();
                let token = token.clone();
                async move {
                    BalancesClient::new(channel)
                        .debit(authed(&token, request))
                        .await
                        .map(|r| r.into_inner())
                }
            })
            .await;
        if let Ok(response) = answer {
            self.remember(
                &request.account_id,
                &request.idempotency_key,
                response.transaction.map(|t| t.transaction_id),
            );
        }
    }

    fn remember(&self, account: &str, key: &str, transaction_id: Option<String>) {
        let Some(transaction_id) = transaction_id else {
            return;
        };
        let mut tally = self.tally.lock().unwrap();
        let entry = tally
            .postings
            .entry((account.to_owned(), key.to_owned()))
            .or_insert_with(|| transaction_id.clone());
        if *entry != transaction_id {
            let message =
                format!("idempotency: {account}/{key} answered {transaction_id} after {entry}");
            tally.violations.push(message);
        }
    }

    async fn credit(&self, rng: &mut StdRng, account: &str, worker: u64, n: u64) {
        let request = proto::CreditRequest {
            account_id: account.to_owned(),
            amount: format!(
                "{}.{:02}",
                rng.random_range(1..40),
                rng.random_range(0..100)
            ),
            kind: proto::TransactionKind::Adjustment as i32,
            idempotency_key: format!("w{worker}-c{n}"),
            ..Default::default()
        };
        let token = self.service_token.clone();
        let answer = self
            .until_definitive(rng, |channel| {
                let request = request.clone();
                let token = token.clone();
                async move {
                    BalancesClient::new(channel)
                        .credit(authed(&token, request))
                        .await
                        .map(|r| r.into_inner())
                }
            })
            .await;
        if let Ok(response) = answer {
            self.remember(
                account,
                &request.idempotency_key,
                response.transaction.map(|t| t.transaction_id),
            );
        }
    }

    async fn change_settings(&self, rng: &mut StdRng, account: &str) {
        let request = proto::ApplyLowBalanceSettingsRequest {
            account_id: account.to_owned(),
            auto_refill_enabled: rng.random_bool(0.85),
            threshold: ["20.00", "30.00", "40.00"][rng.random_range(0..3)].into(),
            refill_amount: ["30.00", "50.00"][rng.random_range(0..2)].into(),
            notification_enabled: rng.random_bool(0.8),
            notification_threshold: ["25.00", "45.00"][rng.random_range(0..2)].into(),
            ..Default::default()
        };
        let token = self.admin_tokens[account].clone();
        let auto_refill = request.auto_refill_enabled;
        let sent = std::time::SystemTime::now();
        // FAILED_PRECONDITION (no active auto-charge card right now) is a fine answer.
        let answer = self
            .until_definitive(rng, |channel| {
                let request = request.clone();
                let token = token.clone();
                async move {
                    BalancePolicyClient::new(channel)
                        .apply_low_balance_settings(authed(&token, request))
                        .await
                }
            })
            .await;
        let definitive = answer
            .as_ref()
            .map_or_else(|status| !transient(status), |_| true);
        self.tally
            .lock()
            .unwrap()
            .settings_changes
            .push(SettingsChange {
                account: account.to_owned(),
                auto_refill,
                sent,
                answered: definitive.then(std::time::SystemTime::now),
                applied: answer.is_ok() || !definitive,
            });
    }

    async fn add_card(&self, rng: &mut StdRng, account: &str, worker: u64, n: u64) {
        let number = CARDS[rng.random_range(0..CARDS.len())];
        let request = proto::AddCardRequest {
            account_id: account.to_owned(),
            source: Some(proto::add_card_request::Source::Card(proto::CardDetails {
                number: number.into(),
                exp_month: 12,
                exp_year: 2035,
                cvc: "123".into(),
                holder_name: "Torture".into(),
            })),
            idempotency_key: format!("w{worker}-card{n}"),
            ..Default::default()
        };
        let token = self.admin_tokens[account].clone();
        let added = self
            .until_definitive(rng, |channel| {
                let request = request.clone();
                let token = token.clone();
                async move {
                    PaymentMethodsClient::new(channel)
                        .add_card(authed(&token, request))
                        .await
                        .map(|r| r.into_inner())
                }
            })
            .await;
        if let Ok(added) = added {
            if let Some(method) = added.payment_method {
                let enable = proto::SetAutoChargeRequest {
                    account_id: account.to_owned(),
                    payment_method_id: method.payment_method_id,
                    enabled: true,
                };
                let _ = self
                    .until_definitive(rng, |channel| {
                        let request = enable.clone();
                        let token = token.clone();
                        async move {
                            PaymentMethodsClient::new(channel)
                                .set_auto_charge(authed(&token, request))
                                .await
                        }
                    })
                    .await;
            }
        }
    }

    async fn methods(&self, rng: &mut StdRng, account: &str) -> Vec<proto::PaymentMethod> {
        let token = self.admin_tokens[account].clone();
        let request = proto::ListPaymentMethodsRequest {
            account_id: account.to_owned(),
            ..Default::default()
        };
        self.until_definitive(rng, |channel| {
            let request = request.clone();
            let token = token.clone();
            async move {
                PaymentMethodsClient::new(channel)
                    .list_payment_methods(authed(&token, request))
                    .await
                    .map(|r| r.into_inner().payment_methods)
            }
        })
        .await
        .unwrap_or_default()
    }

    async fn remove_or_reorder(&self, rng: &mut StdRng, account: &str) {
        let methods = self.methods(rng, account).await;
        if methods.len() < 2 {
            return;
        }
        let token = self.admin_tokens[account].clone();
        if rng.random_bool(0.4) {
            let victim = methods[rng.random_range(0..methods.len())]
                .payment_method_id
                .clone();
            let request = proto::RemovePaymentMethodRequest {
                account_id: account.to_owned(),
                payment_method_id: victim,
            };
            let _ = self
                .until_definitive(rng, |channel| {
                    let request = request.clone();
                    let token = token.clone();
                    async move {
                        PaymentMethodsClient::new(channel)
                            .remove_payment_method(authed(&token, request))
                            .await
                    }
                })
                .await;
        } else {
            let mut ids: Vec<String> = methods.into_iter().map(|m| m.payment_method_id).collect();
            ids.rotate_left(1);
            let request = proto::ReorderPaymentMethodsRequest {
                account_id: account.to_owned(),
                payment_method_ids: ids,
            };
            // INVALID_ARGUMENT when a concurrent add/remove changed the set: fine.
            let _ = self
                .until_definitive(rng, |channel| {
                    let request = request.clone();
                    let token = token.clone();
                    async move {
                        PaymentMethodsClient::new(channel)
                            .reorder_payment_methods(authed(&token, request))
                            .await
                    }
                })
                .await;
        }
    }

    async fn add_funds(&self, rng: &mut StdRng, account: &str, worker: u64, n: u64) {
        let request = proto::AddFundsRequest {
            account_id: account.to_owned(),
            amount: format!("{}.00", rng.random_range(5..60)),
            idempotency_key: format!("w{worker}-f{n}"),
            ..Default::default()
        };
        self.send_add_funds(rng, account, request).await;
    }

    pub async fn send_add_funds(
        &self,
        rng: &mut StdRng,
        account: &str,
        request: proto::AddFundsRequest,
    ) -> bool {
        let token = self.admin_tokens[account].clone();
        let answer = self
            .until_definitive(rng, |channel| {
                let request = request.clone();
                let token = token.clone();
                async move {
                    PaymentMethodsClient::new(channel)
                        .add_funds(authed(&token, request))
                        .await
                        .map(|r| r.into_inner())
                }
            })
            .await;
        let settled = match &answer {
            Ok(response) => response.top_up.as_ref().is_none_or(|t| {
                t.status != proto::TopUpStatus::Unknown as i32
                    && t.status != proto::TopUpStatus::Pending as i32
            }),
            // No primary card / card pending: nothing was charged.
            Err(status) => status.code() != Code::Unavailable,
        };
        if !settled {
            self.tally
                .lock()
                .unwrap()
                .unsettled_funds
                .push((account.to_owned(), request));
        }
        settled
    }
}

pub fn seeded(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}
