//! End-to-end tests: a real server on port 0, a fresh Postgres database per
//! test, called through tonic clients. `TEST_LOG=1` shows the server's logs.

mod alerts;
mod balances;
mod events;
mod helpers;
mod keys;
mod limits;
mod notifications;
mod payment_methods;
mod permissions;
mod stripe;
mod subscribers;
mod top_ups;
