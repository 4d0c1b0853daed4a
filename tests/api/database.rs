//! The pool's connections to Postgres.

use std::os::fd::{BorrowedFd, RawFd};

use nix::sys::socket::{SockaddrStorage, getsockname, getsockopt, sockopt};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use crate::helpers::{drop_database, fresh_database};

/// This process's socket whose local port is `port` (the client port
/// Postgres sees: the test server is on loopback, no NAT in between).
fn socket_with_local_port(port: u16) -> Option<RawFd> {
    std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd lists this process's descriptors")
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<RawFd>().ok())
        .find(|fd| {
            getsockname::<SockaddrStorage>(*fd).is_ok_and(|local| {
                local.as_sockaddr_in().map(|a| a.port()) == Some(port)
                    || local.as_sockaddr_in6().map(|a| a.port()) == Some(port)
            })
        })
}

/// `TCP_NODELAY` of each connection of a pool made with `options`, read on
/// this process's socket of each (3 connections held at once).
async fn nodelay_of_connections(
    pool_options: PgPoolOptions,
    options: &PgConnectOptions,
) -> Vec<bool> {
    let pool = pool_options
        .max_connections(3)
        .connect_with(options.clone())
        .await
        .expect("connect to the test database");
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(pool.acquire().await.expect("a connection"));
    }
    let mut nodelay = Vec::new();
    for connection in &mut held {
        let port: i32 = sqlx::query_scalar("SELECT inet_client_port()")
            .fetch_one(&mut **connection)
            .await
            .expect("a TCP connection has a client port");
        let fd = socket_with_local_port(u16::try_from(port).unwrap())
            .expect("the connection's socket is one of this process's");
        // SAFETY: the connection is held above, so its socket stays open
        // for this one call.
        let socket = unsafe { BorrowedFd::borrow_raw(fd) };
        nodelay.push(getsockopt(&socket, sockopt::TcpNoDelay).expect("a TCP socket"));
    }
    drop(held);
    pool.close().await;
    nodelay
}

/// sqlx 0.9.0 leaves Nagle's algorithm on: over TLS a statement larger than
/// one record (a debit batch's write) waited for Postgres's delayed ACK,
/// 40 ms per batch. The product's pool sets `TCP_NODELAY` after each connect.
/// (No control without the hook: the other tests' pools, in this process,
/// set it on every socket to the same port.)
#[tokio::test]
async fn every_tcp_connection_of_the_pool_has_nagles_algorithm_off() {
    let (bootstrap, options) = fresh_database().await;
    let name = options.get_database().unwrap().to_owned();
    bootstrap.close().await;

    let product = nodelay_of_connections(
        PgPoolOptions::new().after_connect(billing::db::after_connect(&options)),
        &options,
    )
    .await;
    assert_eq!(
        product,
        vec![true; 3],
        "every connection of the product's pool"
    );

    drop_database(&name);
}
