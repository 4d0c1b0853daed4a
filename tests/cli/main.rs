//! Tests that run the real `billing` binary: grpcurl against `serve`, the
//! embedded-Postgres default, and health following a private cluster.

mod embedded_default;
mod grpcurl;
mod health;
mod process;
