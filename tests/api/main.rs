//! End-to-end tests: a real server on port 0, a fresh Postgres database per
//! test, called through tonic clients. `TEST_LOG=1` shows the server's logs.

mod abuse;
mod alerts;
mod audit;
mod auth_attacks;
mod balances;
mod caller_goes_away;
mod database;
mod events;
mod group_commit;
mod helpers;
mod hostile_input;
mod identity;
mod keys;
mod limits;
mod model;
mod notifications;
mod payment_methods;
mod permissions;
mod processor;
mod rich_errors;
mod stripe;
mod subscribers;
mod telemetry;
#[path = "../support/test_db.rs"]
mod test_db;
mod top_ups;
