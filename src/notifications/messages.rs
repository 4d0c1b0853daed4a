//! What each email says: a subject and a plain-text body naming the
//! account, the balance, the threshold, the amounts, the card (brand and
//! last 4 only) and what to do next. Money is formatted with its currency.

use std::fmt;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;

use super::NotificationKind;
use crate::ledger::Account;

/// A card as people see it: "Visa ending in 4242". Never more of the number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CardLabel {
    pub brand: String,
    pub last4: String,
}

impl fmt::Display for CardLabel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut brand = self.brand.clone();
        if let Some(first) = brand.get_mut(0..1) {
            first.make_ascii_uppercase();
        }
        write!(f, "{brand} ending in {}", self.last4)
    }
}

/// A reason to email the customer, with the facts the message needs.
#[derive(Debug, Clone)]
pub enum Notice {
    LowBalance {
        total_balance: Decimal,
        threshold: Decimal,
        auto_refill: Option<Decimal>,
    },
    TopUpReceipt {
        top_up_id: String,
        amount: Decimal,
        card: CardLabel,
        balance_after: Decimal,
    },
    TopUpFailed {
        top_up_id: String,
        amount: Decimal,
        reason: String,
        next_attempt_at: Option<DateTime<Utc>>,
    },
    PaymentMethodDisabled {
        card: CardLabel,
        reason: String,
    },
    AuthenticationRequired {
        top_up_id: String,
        amount: Decimal,
        card: CardLabel,
        /// Where the customer confirms it: the panel's URL with the top-up
        /// id, when `--panel-url` is configured.
        action_url: Option<String>,
    },
    CardExpiring {
        card: CardLabel,
        exp_month: u32,
        exp_year: i32,
    },
    BalanceDepleted {
        total_balance: Decimal,
    },
    TopUpCapReached {
        cap: String,
        total_balance: Decimal,
    },
    Test,
}

impl Notice {
    pub fn kind(&self) -> NotificationKind {
        match self {
            Notice::LowBalance { .. } => NotificationKind::LowBalance,
            Notice::TopUpReceipt { .. } => NotificationKind::TopUpReceipt,
            Notice::TopUpFailed { .. } => NotificationKind::TopUpFailed,
            Notice::PaymentMethodDisabled { .. } => NotificationKind::PaymentMethodDisabled,
            Notice::AuthenticationRequired { .. } => NotificationKind::AuthenticationRequired,
            Notice::CardExpiring { .. } => NotificationKind::CardExpiring,
            Notice::BalanceDepleted { .. } => NotificationKind::BalanceDepleted,
            Notice::TopUpCapReached { .. } => NotificationKind::TopUpCapReached,
            Notice::Test => NotificationKind::Test,
        }
    }

    /// The subject and the plain-text body for `account`.
    pub fn render(&self, account: &Account) -> (String, String) {
        let money = |amount: Decimal| account.currency.display(amount);
        let name = if account.display_name.is_empty() {
            account.account_id.clone()
        } else {
            format!("{} ({})", account.display_name, account.account_id)
        };
        let (subject, lines): (String, Vec<String>) = match self {
            Notice::LowBalance {
                total_balance,
                threshold,
                auto_refill,
            } => (
                format!("Low balance: {} on account {}", money(*total_balance), account.account_id),
                vec![
                    format!("The balance of account {name} is {}, below your alert threshold of {}.", money(*total_balance), money(*threshold)),
                    match auto_refill {
                        Some(refill) => format!("Auto top-up is on: your cards will be charged {} when the balance falls below the top-up threshold.", money(*refill)),
                        None => "Auto top-up is off. Add funds on the Payment Methods page to keep your services running.".into(),
                    },
                ],
            ),
            Notice::TopUpReceipt {
                top_up_id,
                amount,
                card,
                balance_after,
            } => (
                format!("Receipt: {} added to account {}", money(*amount), account.account_id),
                vec![
                    format!("We charged {} to your {card} and added it to account {name}.", money(*amount)),
                    format!("New balance: {}.", money(*balance_after)),
                    format!("Top-up reference: {top_up_id}."),
                ],
            ),
            Notice::TopUpFailed {
                top_up_id,
                amount,
                reason,
                next_attempt_at,
            } => (
                format!("Top-up of {} failed on account {}", money(*amount), account.account_id),
                vec![
                    format!("We could not charge {} to any of your cards for account {name}: {reason}.", money(*amount)),
                    match next_attempt_at {
                        Some(at) => format!("We will try again at {} UTC.", at.format("%Y-%m-%d %H:%M")),
                        None => "We will not try again automatically.".into(),
                    },
                    format!("Current balance: {}. Add funds or update your cards on the Payment Methods page.", money(account.total_balance())),
                    format!("Top-up reference: {top_up_id}."),
                ],
            ),
            Notice::PaymentMethodDisabled { card, reason } => (
                format!("Your {card} was disabled for auto-charge"),
                vec![
                    format!("An automatic charge to your {card} on account {name} was declined ({reason})."),
                    "The card is temporarily disabled for auto-charge; your other cards are tried in priority order.".into(),
                    "Retry the card on the Payment Methods page to restore auto-charge.".into(),
                ],
            ),
            Notice::AuthenticationRequired { top_up_id, amount, card, action_url } => (
                format!("Action needed: authenticate a payment of {}", money(*amount)),
                vec![
                    format!("Your bank asks you to authenticate a charge of {} to your {card} for account {name}.", money(*amount)),
                    match action_url {
                        Some(url) => format!("To complete it, open {url} and pass your bank's check (3-D Secure) within 24 hours."),
                        None => "To complete it, open the Payment Methods page of your panel and confirm the pending top-up within 24 hours.".into(),
                    },
                    "We never force such charges; you can also add funds by hand on the Payment Methods page (Add Funds).".into(),
                    format!("Current balance: {}. Top-up reference: {top_up_id}.", money(account.total_balance())),
                ],
            ),
            Notice::CardExpiring { card, exp_month, exp_year } => (
                format!("Your {card} expires soon"),
                vec![
                    format!("Your {card} saved on account {name} expires at the end of {exp_month:02}/{exp_year}."),
                    "Add a new card on the Payment Methods page so automatic top-ups keep working.".into(),
                ],
            ),
            Notice::BalanceDepleted { total_balance } => (
                format!("Balance depleted on account {}", account.account_id),
                vec![
                    format!("The balance of account {name} is {}: services that need credit may stop.", money(*total_balance)),
                    "Add funds on the Payment Methods page to restore them.".into(),
                ],
            ),
            Notice::TopUpCapReached { cap, total_balance } => (
                format!("Auto top-up limit reached on account {}", account.account_id),
                vec![
                    format!("Auto top-up did not charge your cards for account {name}: {cap}."),
                    format!("Current balance: {}. Add funds by hand, or raise the limit in the Low Balance Settings.", money(*total_balance)),
                ],
            ),
            Notice::Test => (
                format!("Test notification for account {}", account.account_id),
                vec![
                    format!("This is a test email for account {name}. Notifications reach you at this address."),
                    format!("Current balance: {}.", money(account.total_balance())),
                ],
            ),
        };
        let mut body = String::from("Hello,\n\n");
        for line in lines {
            body.push_str(&line);
            body.push_str("\n\n");
        }
        body.push_str("— Billing\n");
        (subject, body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::money::Currency;
    use std::str::FromStr;

    fn account() -> Account {
        Account {
            account_id: "acme".into(),
            currency: Currency::parse("EUR").unwrap(),
            display_name: "ACME".into(),
            billing_email: "b@acme.example".into(),
            balance: Decimal::from_str("5").unwrap(),
            credit_limit: Decimal::ZERO,
            version: 3,
            created_at: Utc::now(),
        }
    }

    #[test]
    fn receipt_names_amount_card_and_new_balance_with_currency() {
        let (subject, body) = Notice::TopUpReceipt {
            top_up_id: "tu_1".into(),
            amount: Decimal::from(50),
            card: CardLabel {
                brand: "visa".into(),
                last4: "4242".into(),
            },
            balance_after: Decimal::from(55),
        }
        .render(&account());
        assert_eq!(subject, "Receipt: 50.00 EUR added to account acme");
        assert!(body.contains("Visa ending in 4242"), "{body}");
        assert!(body.contains("New balance: 55.00 EUR."), "{body}");
    }

    #[test]
    fn low_balance_says_balance_threshold_and_what_next() {
        let (subject, body) = Notice::LowBalance {
            total_balance: Decimal::from(5),
            threshold: Decimal::from(20),
            auto_refill: None,
        }
        .render(&account());
        assert!(subject.contains("5.00 EUR"), "{subject}");
        assert!(
            body.contains("below your alert threshold of 20.00 EUR"),
            "{body}"
        );
        assert!(body.contains("Add funds"), "{body}");
    }
}
