//! A card processor that misbehaves on purpose: the sandbox behind a slow
//! or lossy network.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use billing::gateway::{
    CardSource, Charge, ChargeRequest, GatewayError, Outcome, PaymentGateway, SandboxGateway, Setup,
};
use sqlx::PgPool;

pub struct TestProcessor {
    sandbox: SandboxGateway,
    /// Charges, 3-D Secure answers and detaches are answered this late
    /// (set-ups are not, so a test adds its cards at once).
    stall: Duration,
    /// The next this many charges are lost on the way: the processor never
    /// sees them, and the caller gets an error (the outcome is unknown).
    lost_charges: AtomicUsize,
}

impl TestProcessor {
    pub fn new(pool: PgPool) -> Self {
        Self {
            sandbox: SandboxGateway::new(pool),
            stall: Duration::ZERO,
            lost_charges: AtomicUsize::new(0),
        }
    }

    pub fn stalling(mut self, stall: Duration) -> Self {
        self.stall = stall;
        self
    }

    pub fn losing_charges(self, count: usize) -> Self {
        self.lost_charges.store(count, Ordering::SeqCst);
        self
    }

    async fn stall(&self) {
        tokio::time::sleep(self.stall).await;
    }
}

#[async_trait]
impl PaymentGateway for TestProcessor {
    fn name(&self) -> &'static str {
        self.sandbox.name()
    }
    async fn setup_card(&self, account: &str, source: CardSource) -> Result<Setup, GatewayError> {
        self.sandbox.setup_card(account, source).await
    }
    async fn confirm_setup(&self, token: &str, passed: bool) -> Result<Outcome, GatewayError> {
        self.stall().await;
        self.sandbox.confirm_setup(token, passed).await
    }
    async fn charge(&self, request: ChargeRequest) -> Result<Charge, GatewayError> {
        self.stall().await;
        let lost = self
            .lost_charges
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if lost {
            return Err(GatewayError::Unexpected(anyhow::anyhow!(
                "connection reset before the request reached the processor"
            )));
        }
        self.sandbox.charge(request).await
    }
    async fn find_charge(&self, key: &str) -> Result<Option<Charge>, GatewayError> {
        self.sandbox.find_charge(key).await
    }
    async fn confirm_charge(&self, key: &str, passed: bool) -> Result<Charge, GatewayError> {
        self.stall().await;
        self.sandbox.confirm_charge(key, passed).await
    }
    async fn detach(&self, token: &str) -> Result<(), GatewayError> {
        self.stall().await;
        self.sandbox.detach(token).await
    }
}
