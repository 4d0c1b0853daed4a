//! Tests that run the real `billing` binary: grpcurl against `serve`, the
//! embedded-Postgres default, health following a private cluster, and the
//! deployment rules (`deploy`).

mod deploy;
mod embedded_default;
mod grpcurl;
mod health;
mod process;
mod proto_compatibility;
mod python_client;
#[path = "../support/test_db.rs"]
mod test_db;
mod token;
