//! A private Postgres cluster in the data directory, started from the
//! installed binaries when no server is configured or running locally.
//!
//! It listens on a Unix socket inside its own directory only (no TCP port to
//! collide with). When this process runs as root, the cluster runs as the
//! `postgres` user, because Postgres refuses to run as root.

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, bail};
use sqlx::postgres::PgConnectOptions;

const SOCKET_PORT: u16 = 5432;

/// The directory holding `initdb`, `pg_ctl` and `postgres`: `configured` when
/// given (and only it), else `pg_config --bindir`, `/usr/lib/postgresql/*/bin`, `PATH`.
pub fn find_binaries(configured: Option<&Path>) -> Option<PathBuf> {
    let has_tools = |dir: &Path| dir.join("initdb").is_file() && dir.join("pg_ctl").is_file();
    if let Some(dir) = configured {
        return has_tools(dir).then(|| dir.to_owned());
    }
    if let Ok(output) = Command::new("pg_config").arg("--bindir").output() {
        let dir = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
        if has_tools(&dir) {
            return Some(dir);
        }
    }
    let mut versioned: Vec<PathBuf> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| entry.path().join("bin"))
        .filter(|dir| has_tools(dir))
        .collect();
    versioned.sort_by_key(|dir| {
        dir.parent()
            .and_then(|p| p.file_name())
            .and_then(|n| n.to_str())
            .and_then(|n| n.parse::<u32>().ok())
            .unwrap_or(0)
    });
    if let Some(newest) = versioned.pop() {
        return Some(newest);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).find(|dir| has_tools(dir))
}

/// A cluster this process started (or found already running in its directory).
#[derive(Debug)]
pub struct PrivateCluster {
    binaries: PathBuf,
    data_dir: PathBuf,
    run_as: Option<(u32, u32)>,
}

impl PrivateCluster {
    /// Initialises the cluster if needed and starts it; waits until it accepts connections.
    pub fn start(binaries: &Path, data_dir: &Path) -> anyhow::Result<PrivateCluster> {
        fs::create_dir_all(data_dir).map_err(|error| {
            anyhow::anyhow!(
                "cannot create the private Postgres cluster's directory {} as user {}: {error}; \
                 choose a writable --data-dir (BILLING_DATA_DIR) or set DATABASE_URL",
                data_dir.display(),
                current_user()
            )
        })?;
        let data_dir = fs::canonicalize(data_dir)?;
        let run_as = postgres_user_if_root()?;
        if let Some((uid, gid)) = run_as {
            let_postgres_traverse_parent(&data_dir, gid)?;
            check_reachable_by(&data_dir, uid, gid)?;
        }
        let fresh = !data_dir.join("PG_VERSION").exists();
        if let (Some((uid, gid)), true) = (run_as, fresh) {
            chown_recursive(&data_dir, uid, gid)?;
            fs::set_permissions(
                &data_dir,
                std::os::unix::fs::PermissionsExt::from_mode(0o700),
            )?;
        }
        let cluster = PrivateCluster {
            binaries: binaries.to_owned(),
            data_dir,
            run_as,
        };
        if !cluster.data_dir.join("PG_VERSION").exists() {
            cluster.initdb()?;
        }
        if !cluster.is_running() {
            cluster.pg_ctl_start()?;
        }
        tracing::info!(data_dir = %cluster.data_dir.display(), "private postgres cluster running");
        Ok(cluster)
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    pub fn connect_options(&self) -> PgConnectOptions {
        PgConnectOptions::new()
            .socket(&self.data_dir)
            .port(SOCKET_PORT)
            .username("postgres")
            .database("postgres")
    }

    pub fn is_running(&self) -> bool {
        self.pg_ctl()
            .arg("status")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|status| status.success())
    }

    /// Stops the cluster (fast mode: rolls back open transactions).
    pub fn stop(&self) {
        let stopped = self
            .pg_ctl()
            .args(["stop", "-m", "fast", "-w"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        match stopped {
            Ok(status) if status.success() => tracing::info!("private postgres cluster stopped"),
            _ => {
                tracing::warn!(data_dir = %self.data_dir.display(), "private postgres cluster did not stop cleanly")
            }
        }
    }

    /// Starts a stopped cluster again (tests use it to simulate an outage).
    pub fn restart_if_stopped(&self) -> anyhow::Result<()> {
        if !self.is_running() {
            self.pg_ctl_start()?;
        }
        Ok(())
    }

    fn initdb(&self) -> anyhow::Result<()> {
        let output = self
            .command("initdb")
            .arg("-D")
            .arg(&self.data_dir)
            .args([
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-instructions",
            ])
            .output()
            .map_err(|error| {
                anyhow::anyhow!(
                    "running {} as user {} for the private cluster in {}: {error}",
                    self.binaries.join("initdb").display(),
                    self.user_name(),
                    self.data_dir.display()
                )
            })?;
        if !output.status.success() {
            bail!(
                "initdb of the private cluster in {} (as user {}) failed: {}",
                self.data_dir.display(),
                self.user_name(),
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(())
    }

    fn pg_ctl_start(&self) -> anyhow::Result<()> {
        let options = format!(
            "-c listen_addresses='' -k {} -p {SOCKET_PORT} -c max_connections=200",
            self.data_dir.display()
        );
        let output = self
            .pg_ctl()
            .args(["start", "-w", "-t", "60", "-l"])
            .arg(self.data_dir.join("server.log"))
            .arg("-o")
            .arg(options)
            .stdin(Stdio::null())
            .output()
            .map_err(|error| {
                anyhow::anyhow!(
                    "running {} as user {}: {error}",
                    self.binaries.join("pg_ctl").display(),
                    self.user_name()
                )
            })?;
        if !output.status.success() {
            bail!(
                "pg_ctl start failed: {} (see {})",
                String::from_utf8_lossy(&output.stderr).trim(),
                self.data_dir.join("server.log").display()
            );
        }
        Ok(())
    }

    fn pg_ctl(&self) -> Command {
        let mut command = self.command("pg_ctl");
        command.arg("-D").arg(&self.data_dir);
        command
    }

    fn command(&self, program: &str) -> Command {
        let mut command = Command::new(self.binaries.join(program));
        command.current_dir(&self.data_dir);
        if let Some((uid, gid)) = self.run_as {
            command.uid(uid).gid(gid);
            command.env("HOME", &self.data_dir);
        }
        command
    }
}

impl PrivateCluster {
    fn user_name(&self) -> String {
        match self.run_as {
            Some((uid, _)) => user_name(uid),
            None => current_user(),
        }
    }
}

fn user_name(uid: u32) -> String {
    nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
        .ok()
        .flatten()
        .map(|user| user.name)
        .unwrap_or_else(|| format!("uid {uid}"))
}

fn current_user() -> String {
    user_name(nix::unistd::Uid::effective().as_raw())
}

/// Running as root: the billing data directory (the cluster's parent, 0700
/// and ours) becomes traversable by the postgres group only (0710), not readable.
fn let_postgres_traverse_parent(cluster_dir: &Path, gid: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let Some(parent) = cluster_dir.parent() else {
        return Ok(());
    };
    let metadata = fs::metadata(parent)?;
    if metadata.uid() == nix::unistd::Uid::effective().as_raw() && metadata.mode() & 0o011 == 0 {
        std::os::unix::fs::chown(parent, None, Some(gid))
            .with_context(|| format!("chown {}", parent.display()))?;
        fs::set_permissions(parent, fs::Permissions::from_mode(0o710))
            .with_context(|| format!("chmod {}", parent.display()))?;
    }
    Ok(())
}

/// The `postgres` user (uid, gid) must be able to traverse every directory
/// above the cluster; else an error naming the blocking directory and the user.
fn check_reachable_by(cluster_dir: &Path, uid: u32, gid: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt;
    for ancestor in cluster_dir.ancestors().skip(1) {
        let Ok(metadata) = fs::metadata(ancestor) else {
            continue;
        };
        let mode = metadata.mode();
        let can_traverse = (metadata.uid() == uid && mode & 0o100 != 0)
            || (metadata.gid() == gid && mode & 0o010 != 0)
            || mode & 0o001 != 0;
        if !can_traverse {
            bail!(
                "the private Postgres cluster runs as user {} (billing runs as root), and that user \
                 cannot reach {}: {} is mode {:o} (owner uid {}); choose a --data-dir (BILLING_DATA_DIR) \
                 outside it (e.g. /var/lib/billing), give {} access (chmod o+x {}), or set DATABASE_URL",
                user_name(uid),
                cluster_dir.display(),
                ancestor.display(),
                mode & 0o7777,
                metadata.uid(),
                user_name(uid),
                ancestor.display()
            );
        }
    }
    Ok(())
}

fn postgres_user_if_root() -> anyhow::Result<Option<(u32, u32)>> {
    if !nix::unistd::Uid::effective().is_root() {
        return Ok(None);
    }
    let user = nix::unistd::User::from_name("postgres")
        .context("looking up the postgres user")?
        .context(
            "running as root, and there is no `postgres` user to run the private cluster as",
        )?;
    Ok(Some((user.uid.as_raw(), user.gid.as_raw())))
}

fn chown_recursive(path: &Path, uid: u32, gid: u32) -> anyhow::Result<()> {
    std::os::unix::fs::chown(path, Some(uid), Some(gid))
        .with_context(|| format!("chown {}", path.display()))?;
    if path.is_dir() {
        for entry in fs::read_dir(path)? {
            chown_recursive(&entry?.path(), uid, gid)?;
        }
    }
    Ok(())
}
