//! A throwaway PostgreSQL cluster for tests, shared by one test process:
//! `initdb` into a temporary folder, `postgres` on a free 127.0.0.1 port,
//! run as an unprivileged user when the tests run as root (PostgreSQL
//! refuses root). It dies with the test process (a parent-death signal), and
//! the next run removes the folders of dead ones. Without PostgreSQL's
//! binaries, [`cluster`] says the tests are skipped and returns `None`.
//!
//! Used by the store's unit tests and, through `#[path]`, by `tests/`.

#![allow(dead_code)]

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The user the cluster runs as when the tests run as root.
const NOBODY: u32 = 65534;

pub struct Cluster {
    pub port: u16,
    bin: PathBuf,
    dir: PathBuf,
    databases: AtomicU32,
    /// The running `postgres`; [`Cluster::restart`] replaces it.
    server: Mutex<u32>,
}

/// The bin folder of the newest PostgreSQL installed (`HOOKRELAY_PG_BIN`
/// overrides), or `None`.
pub fn bin_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("HOOKRELAY_PG_BIN") {
        return Some(PathBuf::from(dir));
    }
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, bin)| bin)
}

/// The cluster of this test process, started on first use, or `None` (said
/// on stderr, with `what` the tests skipped) when PostgreSQL is not installed.
pub fn cluster(what: &str) -> Option<&'static Cluster> {
    static CLUSTER: OnceLock<Option<Cluster>> = OnceLock::new();
    let cluster = CLUSTER
        .get_or_init(|| {
            let bin = bin_dir()?;
            Some(Cluster::start(bin).unwrap_or_else(|e| panic!("starting a throwaway PostgreSQL: {e}")))
        })
        .as_ref();
    if cluster.is_none() {
        eprintln!("SKIPPED {what}: PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb; `apt-get install postgresql`)");
    }
    cluster
}

fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    // /proc/self belongs to the process's effective user.
    std::fs::metadata("/proc/self").map(|m| m.uid() == 0).unwrap_or(false)
}

/// A command run as the cluster's user.
fn as_owner(program: PathBuf) -> Command {
    let mut cmd = Command::new(program);
    if is_root() {
        cmd.uid(NOBODY).gid(NOBODY);
    }
    cmd.env_clear().env("PATH", "/usr/bin:/bin").env("LC_ALL", "C.UTF-8").current_dir("/");
    cmd
}

fn free_port() -> Result<u16, String> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    l.local_addr().map(|a| a.port()).map_err(|e| e.to_string())
}

/// Removes the folders of clusters whose test process is gone.
fn sweep(tmp: &Path) {
    let Ok(entries) = std::fs::read_dir(tmp) else { return };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.strip_prefix("hookrelay-pg-")) else { continue };
        if !Path::new("/proc").join(pid).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

impl Cluster {
    fn start(bin: PathBuf) -> Result<Cluster, String> {
        let tmp = std::env::temp_dir();
        sweep(&tmp);
        let dir = tmp.join(format!("hookrelay-pg-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        if is_root() {
            std::os::unix::fs::chown(&dir, Some(NOBODY), Some(NOBODY)).map_err(|e| e.to_string())?;
        }
        let out = as_owner(bin.join("initdb"))
            .args(["-D", "data", "-U", "hookrelay", "-A", "trust", "-E", "UTF8", "--no-sync", "--no-instructions"])
            .current_dir(&dir)
            .output()
            .map_err(|e| format!("initdb: {e}"))?;
        if !out.status.success() {
            return Err(format!("initdb failed: {}", String::from_utf8_lossy(&out.stderr)));
        }
        let port = free_port()?;
        let cluster = Cluster { port, bin, dir, databases: AtomicU32::new(0), server: Mutex::new(0) };
        cluster.launch()?;
        Ok(cluster)
    }

    /// Starts `postgres` from a thread that lives as long as the process,
    /// so that the parent-death signal fires when the process ends.
    fn launch(&self) -> Result<(), String> {
        // setpriv sets the parent-death signal (SIGQUIT: an immediate
        // shutdown that also ends the backends), then becomes postgres.
        let mut cmd = as_owner(PathBuf::from("/usr/bin/setpriv"));
        cmd.args(["--pdeathsig", "QUIT", "--"])
            .arg(self.bin.join("postgres"))
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-p", &self.port.to_string(), "-c", "listen_addresses=127.0.0.1", "-c", "max_connections=300"])
            .arg("-c")
            .arg(format!("unix_socket_directories={}", self.dir.display()))
            .stdin(Stdio::null());
        let log = std::fs::File::create(self.dir.join("log")).map_err(|e| e.to_string())?;
        cmd.stdout(log.try_clone().map_err(|e| e.to_string())?).stderr(log);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let spawned = cmd.spawn().map_err(|e| format!("postgres: {e}"));
            let child = spawned.as_ref().map(|c| c.id()).map_err(Clone::clone);
            let _ = tx.send(child);
            if let Ok(mut c) = spawned {
                let _ = c.wait();
            }
            loop {
                std::thread::park();
            }
        });
        let pid = rx.recv().map_err(|e| e.to_string())??;
        *self.server.lock().unwrap_or_else(|p| p.into_inner()) = pid;
        self.wait_ready(Duration::from_secs(30))
    }

    fn psql(&self, db: &str, sql: &str) -> std::io::Result<std::process::Output> {
        as_owner(self.bin.join("psql"))
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", "hookrelay", "-d", db, "-Atqc", sql])
            .output()
    }

    fn wait_ready(&self, limit: Duration) -> Result<(), String> {
        let start = Instant::now();
        while start.elapsed() < limit {
            if self.psql("postgres", "select 1").map(|o| o.status.success()).unwrap_or(false) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let log = std::fs::read_to_string(self.dir.join("log")).unwrap_or_default();
        Err(format!("PostgreSQL did not accept connections within {limit:?}: {log}"))
    }

    /// A new, empty database on the cluster; its URL.
    pub fn database(&self) -> String {
        let name = format!("t{}", self.databases.fetch_add(1, Ordering::SeqCst));
        let out = self.psql("postgres", &format!("create database {name}")).expect("psql");
        assert!(out.status.success(), "create database: {}", String::from_utf8_lossy(&out.stderr));
        self.url(&name)
    }

    pub fn url(&self, database: &str) -> String {
        format!("postgres://hookrelay@127.0.0.1:{}/{database}?sslmode=disable", self.port)
    }

    /// Runs `sql` on `database` and returns what it printed, one line per row.
    pub fn query(&self, database: &str, sql: &str) -> String {
        let out = self.psql(database, sql).expect("psql");
        assert!(out.status.success(), "{sql}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Turns TLS on with this certificate and key (PEM), for connections
    /// that ask for it; others stay plain.
    pub fn enable_tls(&self, cert_pem: &str, key_pem: &str) {
        let (cert, key) = (self.dir.join("server.crt"), self.dir.join("server.key"));
        std::fs::write(&cert, cert_pem).expect("server.crt");
        std::fs::write(&key, key_pem).expect("server.key");
        if is_root() {
            for f in [&cert, &key] {
                std::os::unix::fs::chown(f, Some(NOBODY), Some(NOBODY)).expect("chown");
            }
        }
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        for sql in [
            format!("alter system set ssl_cert_file = '{}'", cert.display()),
            format!("alter system set ssl_key_file = '{}'", key.display()),
            "alter system set ssl = on".to_string(),
            "select pg_reload_conf()".to_string(),
        ] {
            self.query("postgres", &sql);
        }
    }

    /// The postmaster's process id (its backends are its children).
    pub fn server_pid(&self) -> u32 {
        *self.server.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stops the server at once (as a crash would), leaving it down.
    pub fn kill(&self) {
        let pid = *self.server.lock().unwrap_or_else(|p| p.into_inner());
        let _ = Command::new("kill").args(["-QUIT", &pid.to_string()]).status();
        let start = Instant::now();
        while Path::new("/proc").join(pid.to_string()).exists() && start.elapsed() < Duration::from_secs(30) {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts the server again after [`Cluster::kill`], on the same port.
    pub fn restart(&self) {
        self.launch().expect("restarting PostgreSQL");
    }
}
