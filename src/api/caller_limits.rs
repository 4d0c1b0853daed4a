//! Per-caller limits, kept in this replica's memory (each replica counts
//! for itself): open `WatchBalanceEvents` streams per caller and per
//! replica, and token-bucket rates (`governor`) on `SendTestNotification`
//! and on notification-settings changes, per account.
//!
//! A refusal is `RESOURCE_EXHAUSTED` whose message names the limit, with
//! the machine-readable `billing-limit` metadata (the limit's name) and,
//! for rates, `billing-retry-after-secs`; its rich details are an
//! `ErrorInfo` (`STREAM_LIMIT_REACHED` or `RATE_LIMITED`, the limit's name
//! in `metadata["limit"]`) and a `RetryInfo` (a rate's exact wait).

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use tonic::Status;

use super::error::limit_refusal;
use crate::error::Reason;
use crate::telemetry::limit_log::LimitLog;

/// The metadata key naming the limit that refused a call.
pub const LIMIT_METADATA_KEY: &str = "billing-limit";
/// The metadata key of a rate limit's wait, in whole seconds (rounded up).
pub const RETRY_AFTER_METADATA_KEY: &str = "billing-retry-after-secs";

/// The limits' values (`billing serve` flags).
#[derive(Debug, Clone)]
pub struct CallerLimitSettings {
    /// Open `WatchBalanceEvents` streams of one caller (token subject and
    /// watched account) on this replica.
    pub streams_per_caller: usize,
    /// Open `WatchBalanceEvents` streams on this replica, all callers.
    pub streams_per_replica: usize,
    /// `SendTestNotification` calls per account per hour (the bucket's size too).
    pub test_notifications_per_hour: u32,
    /// `UpdateNotificationSettings` calls per account per hour (the bucket's size too).
    pub settings_changes_per_hour: u32,
}

impl Default for CallerLimitSettings {
    fn default() -> Self {
        Self {
            streams_per_caller: 50,
            streams_per_replica: 10_000,
            test_notifications_per_hour: 5,
            settings_changes_per_hour: 30,
        }
    }
}

/// Every per-caller limit of one replica; cheap to clone (shared state).
#[derive(Clone)]
pub struct CallerLimits {
    streams: Arc<StreamLimits>,
    test_notifications: Arc<RateLimit>,
    settings_changes: Arc<RateLimit>,
}

impl CallerLimits {
    pub fn new(settings: &CallerLimitSettings) -> CallerLimits {
        CallerLimits {
            streams: Arc::new(StreamLimits {
                per_caller: settings.streams_per_caller.max(1),
                per_replica: settings.streams_per_replica.max(1),
                open: Mutex::new(OpenStreams::default()),
            }),
            test_notifications: Arc::new(RateLimit::new(
                "test_notifications_per_account",
                "test notifications",
                settings.test_notifications_per_hour,
                &TEST_NOTIFICATIONS_LOG,
            )),
            settings_changes: Arc::new(RateLimit::new(
                "notification_settings_changes_per_account",
                "notification settings changes",
                settings.settings_changes_per_hour,
                &SETTINGS_CHANGES_LOG,
            )),
        }
    }

    /// A slot for one more stream of `subject` watching `account` (`None`:
    /// every account), held until the permit is dropped.
    pub fn open_stream(
        &self,
        subject: &str,
        account: Option<&str>,
    ) -> Result<StreamPermit, Status> {
        self.streams.acquire(subject, account.unwrap_or("*"))
    }

    /// One `SendTestNotification` of `account`, if its bucket has a token.
    pub fn test_notification(&self, account: &str) -> Result<(), Status> {
        self.test_notifications.check(account)
    }

    /// One notification-settings change of `account`, if its bucket has a token.
    pub fn settings_change(&self, account: &str) -> Result<(), Status> {
        self.settings_changes.check(account)
    }
}

static STREAMS_PER_CALLER_LOG: LimitLog = LimitLog::new(
    "streams_per_caller",
    "event stream refused: the caller has the most open streams allowed",
);
static STREAMS_PER_REPLICA_LOG: LimitLog = LimitLog::new(
    "streams_per_replica",
    "event stream refused: this replica has the most open streams allowed",
);
static TEST_NOTIFICATIONS_LOG: LimitLog = LimitLog::new(
    "test_notifications_per_account",
    "SendTestNotification refused: the account's rate limit is used up",
);
static SETTINGS_CHANGES_LOG: LimitLog = LimitLog::new(
    "notification_settings_changes_per_account",
    "UpdateNotificationSettings refused: the account's rate limit is used up",
);

/// RESOURCE_EXHAUSTED naming `limit`: in `ErrorInfo` (with `reason`) and
/// `RetryInfo` (see `api::error::limit_refusal`), and in the trailers.
fn refusal(
    reason: Reason,
    limit: &'static str,
    message: String,
    retry_after: Option<Duration>,
) -> Status {
    let mut status = limit_refusal(reason, limit, message, retry_after);
    let metadata = status.metadata_mut();
    metadata.insert(LIMIT_METADATA_KEY, limit.parse().expect("ASCII limit name"));
    if let Some(wait) = retry_after {
        let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        metadata.insert(
            RETRY_AFTER_METADATA_KEY,
            secs.to_string().parse().expect("digits"),
        );
    }
    status
}

#[derive(Default)]
struct OpenStreams {
    total: usize,
    per_caller: HashMap<(String, String), usize>,
}

struct StreamLimits {
    per_caller: usize,
    per_replica: usize,
    open: Mutex<OpenStreams>,
}

impl StreamLimits {
    fn acquire(self: &Arc<Self>, subject: &str, account: &str) -> Result<StreamPermit, Status> {
        let key = (subject.to_owned(), account.to_owned());
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if open.total >= self.per_replica {
            drop(open);
            STREAMS_PER_REPLICA_LOG.refused(&self.per_replica);
            return Err(refusal(
                Reason::StreamLimitReached,
                "streams_per_replica",
                format!(
                    "too many open event streams on this replica (limit: {} per replica); retry later",
                    self.per_replica
                ),
                None,
            ));
        }
        let mine = open.per_caller.get(&key).copied().unwrap_or(0);
        if mine >= self.per_caller {
            drop(open);
            STREAMS_PER_CALLER_LOG.refused(&self.per_caller);
            return Err(refusal(
                Reason::StreamLimitReached,
                "streams_per_caller",
                format!(
                    "too many open event streams for this caller (limit: {} per token subject and account); close one first",
                    self.per_caller
                ),
                None,
            ));
        }
        open.total += 1;
        *open.per_caller.entry(key.clone()).or_default() += 1;
        Ok(StreamPermit {
            limits: self.clone(),
            key,
        })
    }

    fn release(&self, key: &(String, String)) {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        open.total = open.total.saturating_sub(1);
        if let Some(count) = open.per_caller.get_mut(key) {
            *count -= 1;
            if *count == 0 {
                open.per_caller.remove(key);
            }
        }
    }
}

/// One open stream counted against its caller and the replica, until dropped.
pub struct StreamPermit {
    limits: Arc<StreamLimits>,
    key: (String, String),
}

impl Drop for StreamPermit {
    fn drop(&mut self) {
        self.limits.release(&self.key);
    }
}

/// A keyed token bucket: `per_hour` calls at once, then one more every
/// hour / `per_hour`.
struct RateLimit {
    name: &'static str,
    what: &'static str,
    per_hour: u32,
    limiter: DefaultKeyedRateLimiter<String>,
    log: &'static LimitLog,
}

/// Keys kept before forgetting those whose buckets are full again.
const RETAIN_RECENT_ABOVE: usize = 10_000;

impl RateLimit {
    fn new(name: &'static str, what: &'static str, per_hour: u32, log: &'static LimitLog) -> Self {
        let per_hour = per_hour.max(1);
        let quota = Quota::per_hour(NonZeroU32::new(per_hour).expect("at least 1"));
        RateLimit {
            name,
            what,
            per_hour,
            limiter: RateLimiter::keyed(quota),
            log,
        }
    }

    fn check(&self, account: &str) -> Result<(), Status> {
        if self.limiter.len() > RETAIN_RECENT_ABOVE {
            self.limiter.retain_recent();
        }
        match self.limiter.check_key(&account.to_owned()) {
            Ok(()) => Ok(()),
            Err(not_until) => {
                let wait = not_until.wait_time_from(DefaultClock::default().now());
                self.log.refused(&self.per_hour);
                Err(refusal(
                    Reason::RateLimited,
                    self.name,
                    format!(
                        "rate limit: at most {} {} per hour per account; retry in {} s",
                        self.per_hour,
                        self.what,
                        wait.as_secs() + u64::from(wait.subsec_nanos() > 0)
                    ),
                    Some(wait),
                ))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use tonic_types::StatusExt;

    use super::*;

    /// The refusal's `ErrorInfo` reason, its `limit` metadata, and whether
    /// it carries a `RetryInfo` delay.
    fn details_of(status: &Status) -> (String, String, Option<Duration>) {
        let details = status.get_error_details();
        let info = details.error_info().expect("ErrorInfo");
        let delay = details.retry_info().and_then(|retry| retry.retry_delay);
        (
            info.reason.clone(),
            info.metadata.get("limit").cloned().unwrap_or_default(),
            delay,
        )
    }

    #[test]
    fn a_caller_past_its_stream_limit_is_refused_until_one_closes() {
        let limits = CallerLimits::new(&CallerLimitSettings {
            streams_per_caller: 2,
            streams_per_replica: 3,
            ..CallerLimitSettings::default()
        });
        let first = limits.open_stream("ann", Some("acme")).unwrap();
        let _second = limits.open_stream("ann", Some("acme")).unwrap();
        let refused = limits.open_stream("ann", Some("acme")).err().unwrap();
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert!(
            refused.message().contains("per token subject and account"),
            "{}",
            refused.message()
        );
        assert_eq!(
            refused.metadata().get(LIMIT_METADATA_KEY).unwrap(),
            "streams_per_caller"
        );
        let (reason, limit, delay) = details_of(&refused);
        assert_eq!(
            (reason.as_str(), limit.as_str()),
            ("STREAM_LIMIT_REACHED", "streams_per_caller")
        );
        assert!(delay.is_some(), "a stream refusal says when to retry");
        let _bob = limits.open_stream("bob", Some("acme")).unwrap();
        let replica = limits.open_stream("cid", Some("acme")).err().unwrap();
        assert!(
            replica.message().contains("per replica"),
            "{}",
            replica.message()
        );
        drop(first);
        assert!(limits.open_stream("ann", Some("acme")).is_ok());
    }

    #[test]
    fn an_accounts_rate_limit_does_not_touch_another_account() {
        let limits = CallerLimits::new(&CallerLimitSettings {
            test_notifications_per_hour: 2,
            ..CallerLimitSettings::default()
        });
        limits.test_notification("acme").unwrap();
        limits.test_notification("acme").unwrap();
        let refused = limits.test_notification("acme").unwrap_err();
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert!(
            refused
                .message()
                .contains("at most 2 test notifications per hour")
        );
        assert!(refused.metadata().get(RETRY_AFTER_METADATA_KEY).is_some());
        let (reason, limit, delay) = details_of(&refused);
        assert_eq!(
            (reason.as_str(), limit.as_str()),
            ("RATE_LIMITED", "test_notifications_per_account")
        );
        let delay = delay.expect("RetryInfo");
        assert!(
            delay > Duration::ZERO && delay <= Duration::from_secs(3600),
            "the bucket's own wait: {delay:?}"
        );
        limits.test_notification("initech").unwrap();
    }
}
