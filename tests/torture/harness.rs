//! What the torture run controls: a private Postgres cluster, three
//! `billing serve` processes on fixed ports, and an SMTP sink that refuses
//! some messages.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const SECRET: &str = "torture-secret-0123456789abcdef";

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A free port for a server that is killed and restarted on the same
/// address: below the kernel's ephemeral range, so no outgoing connection
/// of this machine (the run's own clients reconnect thousands of times) can
/// be given it while the server is down and make the restart's bind fail.
pub fn restartable_port() -> u16 {
    let ephemeral_low: u16 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768);
    // Each call starts its search after the previous one's port: a port
    // that is free now is handed out once (the servers bind later, and with
    // SO_REUSEPORT three servers would share one port without an error).
    static HANDED_OUT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let low = 10_000u16.min(ephemeral_low / 2);
    let span = u32::from(ephemeral_low - low);
    let seed = std::process::id() % span;
    loop {
        let n = HANDED_OUT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        assert!(n < span, "no free port below the ephemeral range");
        let port = low + ((seed + n * 7919) % span) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

pub struct Server {
    pub index: usize,
    pub address: SocketAddr,
    child: Option<Child>,
    database_url: String,
    smtp_port: u16,
    dir: PathBuf,
    pub starts: usize,
}

impl Server {
    pub fn new(index: usize, database_url: &str, smtp_port: u16, dir: &Path) -> Server {
        Server {
            index,
            address: format!("127.0.0.1:{}", restartable_port()).parse().unwrap(),
            child: None,
            database_url: database_url.to_owned(),
            smtp_port,
            dir: dir.join(format!("server-{index}")),
            starts: 0,
        }
    }

    pub fn start(&mut self) {
        std::fs::create_dir_all(&self.dir).unwrap();
        self.starts += 1;
        let log =
            std::fs::File::create(self.dir.join(format!("serve-{}.log", self.starts))).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_billing"))
            .arg("serve")
            .env("BILLING_LISTEN", self.address.to_string())
            .env(
                "BILLING_METRICS_LISTEN",
                format!("127.0.0.1:{}", free_port()),
            )
            .env("DATABASE_URL", &self.database_url)
            .env("BILLING_JWT_SECRET", SECRET)
            .env("BILLING_DATA_DIR", &self.dir)
            .env("BILLING_DB_MAX_CONNECTIONS", "10")
            .env("BILLING_SMTP_HOST", "127.0.0.1")
            .env("BILLING_SMTP_PORT", self.smtp_port.to_string())
            .env("BILLING_SMTP_SECURITY", "none")
            .env("BILLING_MAIL_RETRY_SECS", "1,1,1,1,1,1,1,1,1,1,1,1,1,1,1")
            .env("BILLING_OUTBOX_POLL_MS", "100")
            .env("BILLING_MAIL_CLAIM_SECS", "30")
            .env("BILLING_TOP_UP_RETRY_SECS", "1,2,2")
            .env("BILLING_TOP_UP_RECONCILE_SECS", "1")
            .env("BILLING_TOP_UP_LEASE_SECS", "3")
            .env("BILLING_TOP_UP_ABANDONED_SECS", "15")
            .env("BILLING_HEALTH_INTERVAL_MS", "500")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn billing serve");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        while std::net::TcpStream::connect(self.address).is_err() {
            assert!(
                self.is_running(),
                "server {} exited at start {} (its log: {})",
                self.index,
                self.starts,
                self.dir
                    .join(format!("serve-{}.log", self.starts))
                    .display()
            );
            assert!(
                Instant::now() < deadline,
                "server {} did not come back",
                self.index
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(
            self.is_running(),
            "server {} exited, yet something answers on {}",
            self.index,
            self.address
        );
    }

    /// kill -9: no shutdown, no drain, transactions cut mid-way.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

pub struct Sink {
    child: Child,
    pub port: u16,
    pub folder: tempfile::TempDir,
}

#[derive(Debug)]
pub struct Received {
    pub message_id: String,
    /// When the SMTP server stored it.
    pub at: std::time::SystemTime,
}

impl Sink {
    pub fn start(fail_rate: f64) -> Sink {
        use std::io::BufRead;
        let port = free_port();
        let folder = tempfile::tempdir().unwrap();
        let mut child = Command::new("python3")
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/support/smtp_sink.py"
            ))
            .arg(port.to_string())
            .arg(folder.path())
            .arg(fail_rate.to_string())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3 with aiosmtpd");
        let mut ready = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut ready)
            .unwrap();
        assert_eq!(ready.trim(), "READY");
        Sink {
            child,
            port,
            folder,
        }
    }

    pub fn received(&self) -> Vec<Received> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(self.folder.path()).unwrap().flatten() {
            let path = entry.path();
            if path.extension().is_none_or(|e| e != "eml") {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            let message_id = text
                .lines()
                .find_map(|l| l.strip_prefix("Message-ID: "))
                .unwrap_or_default()
                .trim()
                .to_owned();
            let at = std::fs::metadata(&path)
                .and_then(|m| m.modified())
                .unwrap_or(std::time::UNIX_EPOCH);
            out.push(Received { message_id, at });
        }
        out
    }

    pub fn rejected(&self) -> u64 {
        std::fs::read_to_string(self.folder.path().join("rejected"))
            .ok()
            .and_then(|t| t.trim().parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
