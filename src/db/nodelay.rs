//! `TCP_NODELAY` on this process's connections to Postgres.
//!
//! sqlx 0.9.0 opens its TCP connections without `TCP_NODELAY`
//! (transact-rs/sqlx#4335, a regression of #4022; fixed upstream by #4336,
//! in no release yet). Over TLS — `sslmode=prefer`, the default, uses it
//! whenever the server offers it — a message larger than one TLS record
//! (16 KiB of plaintext: the write of a debit batch of a few dozen debits)
//! leaves in two `write`s; Nagle's algorithm holds the second until Postgres
//! acknowledges the first, and Linux delays that acknowledgement by up to
//! 40 ms. Every large batch then waited 40 ms with both processes idle:
//! 64 callers debiting one account got ~700 debits/s at p50 95 ms, and
//! ~8,500/s at p50 7 ms once the option was set (`BENCHMARKS.md`).
//!
//! sqlx has no hook on its socket, so after each new connection the pool
//! calls [`set_on_sockets_to`], which sets the option on every TCP socket
//! of this process whose peer port is the database's. Another socket that
//! happens to match (an accepted gRPC connection from that port) gets
//! `TCP_NODELAY` too, which changes nothing for it: the gRPC listener sets
//! it on every connection anyway. Remove this module once a sqlx release
//! sets the option itself.

use std::os::fd::{BorrowedFd, RawFd};

use nix::sys::socket::{SockaddrStorage, getpeername, setsockopt, sockopt};

/// Sets `TCP_NODELAY` on every TCP socket of this process whose peer port
/// is `port`; returns how many sockets it set it on (0 where
/// `/proc/self/fd` cannot be read: not Linux). Never fails: a socket that
/// closes meanwhile is skipped.
pub fn set_on_sockets_to(port: u16) -> usize {
    let Ok(entries) = std::fs::read_dir("/proc/self/fd") else {
        return 0;
    };
    let mut set = 0;
    for entry in entries.flatten() {
        let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|name| name.parse::<RawFd>().ok())
        else {
            continue;
        };
        if peer_port(fd) != Some(port) {
            continue;
        }
        // SAFETY: the borrow lives for this one `setsockopt` call. If
        // another thread closed `fd` since `getpeername` (and the number
        // was reused), the call fails (`ENOTSOCK`, `EBADF`) or sets
        // `TCP_NODELAY` on another TCP socket of this process: no memory
        // is touched and nothing else changes.
        let socket = unsafe { BorrowedFd::borrow_raw(fd) };
        if setsockopt(&socket, sockopt::TcpNoDelay, &true).is_ok() {
            set += 1;
        }
    }
    set
}

/// The port of the peer of `fd`, when `fd` is a connected IPv4/IPv6 socket.
fn peer_port(fd: RawFd) -> Option<u16> {
    let peer = getpeername::<SockaddrStorage>(fd).ok()?;
    match (peer.as_sockaddr_in(), peer.as_sockaddr_in6()) {
        (Some(v4), _) => Some(v4.port()),
        (_, Some(v6)) => Some(v6.port()),
        _ => None,
    }
}
