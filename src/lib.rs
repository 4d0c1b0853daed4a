//! billing: a prepaid-billing gRPC service.
//!
//! The domain lives in one folder per capability (`ledger`, `auth`, ...);
//! `api` holds the thin gRPC adapters; `server` wires the router, the tower
//! layers, health and reflection; `db` finds or starts Postgres.

pub mod api;
pub mod audit;
pub mod auth;
pub mod bench;
pub mod card;
pub mod codec;
pub mod config;
pub mod db;
pub mod error;
pub mod events;
pub mod gateway;
pub mod http;
pub mod ids;
pub mod ledger;
pub mod limits;
pub mod money;
pub mod notifications;
pub mod paging;
pub mod payment_methods;
pub mod proto;
pub mod server;
pub mod tasks;
pub mod telemetry;
pub mod topup;
pub mod transport;

pub use error::BillingError;
