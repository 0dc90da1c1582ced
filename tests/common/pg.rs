//! A real PostgreSQL server for tests (Debian's `postgresql` package): initdb + postgres in a
//! directory of its own, on a loopback port, with trust authentication for user `berth`.
//!
//! [`PgServer::shared`] is one server per test process (each test takes a fresh database
//! from it); [`PgServer::start`] is a server of the test's own, for tests that stop it.
//! Run as root (CI), the server runs as the `postgres` user: PostgreSQL refuses root.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

pub struct PgServer {
    pub port: u16,
    dir: PathBuf,
    bin: PathBuf,
    child: Mutex<Option<Child>>,
    /// `postgres` user's (uid, gid) when the tests run as root.
    run_as: Option<(u32, u32)>,
}

static SHARED: OnceLock<PgServer> = OnceLock::new();
static DATABASES: AtomicU64 = AtomicU64::new(0);

/// The directory with initdb, postgres and psql: `BERTH_TEST_PG_BIN`, else the newest
/// `/usr/lib/postgresql/*/bin`.
fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("BERTH_TEST_PG_BIN") {
        return PathBuf::from(dir);
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse().ok()?;
            Some((v, e.path().join("bin")))
        })
        .filter(|(_, bin)| bin.join("postgres").exists())
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin).unwrap_or_else(|| {
        panic!(
            "PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/postgres). Install it \
             (Debian/Ubuntu: apt-get install -y postgresql) or set BERTH_TEST_PG_BIN."
        )
    })
}

fn postgres_ids() -> Option<(u32, u32)> {
    // SAFETY: getuid has no preconditions.
    if unsafe { libc::getuid() } != 0 {
        return None;
    }
    let id = |flag: &str| -> u32 {
        let out = Command::new("id")
            .arg(flag)
            .arg("postgres")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "no postgres user (apt-get install postgresql)"
        );
        String::from_utf8(out.stdout)
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    Some((id("-u"), id("-g")))
}

/// Removes data directories of test processes that are gone (killed before cleaning up).
fn remove_stale_dirs() {
    for e in std::fs::read_dir(std::env::temp_dir())
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = e.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix("berth-pg-")) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<i32>().ok()) else {
            continue;
        };
        // SAFETY: kill with signal 0 only checks that the process exists.
        if unsafe { libc::kill(pid, 0) } != 0 {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

impl PgServer {
    /// The test process's server, started on first use. It is stopped when the process
    /// exits (parent-death signal).
    pub fn shared() -> &'static PgServer {
        SHARED.get_or_init(|| {
            // The parent-death signal fires when the spawning *thread* ends: spawn from a
            // thread that lives as long as the process.
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let server = PgServer::init();
                server.start_process();
                tx.send(server).unwrap();
                loop {
                    std::thread::park();
                }
            });
            rx.recv().unwrap()
        })
    }

    /// A server of the caller's own (stopped and removed on drop). Spawned by the calling
    /// thread, which must outlive it.
    pub fn start() -> PgServer {
        let server = PgServer::init();
        server.start_process();
        server
    }

    fn init() -> PgServer {
        static N: AtomicU64 = AtomicU64::new(0);
        remove_stale_dirs();
        let bin = bin_dir();
        let run_as = postgres_ids();
        let dir = std::env::temp_dir().join(format!(
            "berth-pg-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        if let Some((uid, gid)) = run_as {
            std::os::unix::fs::chown(&dir, Some(uid), Some(gid)).unwrap();
        }
        let data = dir.join("data");
        let mut initdb = Command::new(bin.join("initdb"));
        initdb
            .arg("-D")
            .arg(&data)
            .args(["-U", "berth", "-A", "trust", "--no-sync", "-E", "UTF8"])
            .stdin(Stdio::null());
        if let Some((uid, gid)) = run_as {
            initdb.uid(uid).gid(gid);
        }
        let out = initdb.output().expect("run initdb");
        assert!(
            out.status.success(),
            "initdb failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        PgServer {
            port: super::free_port(),
            dir,
            bin,
            child: Mutex::new(None),
            run_as,
        }
    }

    fn start_process(&self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("postgres.log"))
            .unwrap();
        let mut cmd = Command::new(self.bin.join("postgres"));
        cmd.arg("-D")
            .arg(self.dir.join("data"))
            .args(["-p", &self.port.to_string(), "-k"])
            .arg(&self.dir)
            .args([
                "-c",
                "listen_addresses=127.0.0.1",
                // Test data: no fsync (a clean stop still writes everything).
                "-c",
                "fsync=off",
                "-c",
                "max_connections=200",
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        if let Some((uid, gid)) = self.run_as {
            cmd.uid(uid).gid(gid);
        }
        // SAFETY: prctl only sets this process's parent-death signal; async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGQUIT);
                Ok(())
            });
        }
        *self.child.lock().unwrap() = Some(cmd.spawn().expect("spawn postgres"));
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if self.try_sql("postgres", "SELECT 1").is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("postgres not ready after 30s:\n{}", self.log());
    }

    /// Stops the server (fast shutdown: sessions are cut, everything committed is kept).
    pub fn stop(&self) {
        if let Some(mut child) = self.child.lock().unwrap().take() {
            // SAFETY: kill(2) on our own child.
            unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
            let _ = child.wait();
        }
    }

    /// Starts it again after [`PgServer::stop`], on the same port and data.
    pub fn restart(&self) {
        self.stop();
        self.start_process();
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("postgres.log")).unwrap_or_default()
    }

    /// A new, empty database; returns its name.
    pub fn create_database(&self) -> String {
        let name = format!(
            "t{}_{}",
            std::process::id(),
            DATABASES.fetch_add(1, Ordering::SeqCst)
        );
        self.sql("postgres", &format!("CREATE DATABASE {name}"));
        name
    }

    pub fn url(&self, database: &str) -> String {
        format!("postgres://berth@127.0.0.1:{}/{database}", self.port)
    }

    /// The `metadata:` section for berth on `database`.
    pub fn metadata_yaml(&self, database: &str) -> String {
        format!(
            "metadata:\n  backend: postgres\n  postgres:\n    url: {}\n    connect_timeout: 2s\n",
            self.url(database)
        )
    }

    /// Runs `sql` with psql; the rows, one a line, columns separated by `|`. Panics on error.
    pub fn sql(&self, database: &str, sql: &str) -> String {
        self.try_sql(database, sql)
            .unwrap_or_else(|e| panic!("psql {sql:?}: {e}"))
    }

    pub fn try_sql(&self, database: &str, sql: &str) -> Result<String, String> {
        let out = Command::new(self.bin.join("psql"))
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "berth",
            ])
            .args([
                "-d",
                database,
                "-v",
                "ON_ERROR_STOP=1",
                "-X",
                "-A",
                "-t",
                "-c",
                sql,
            ])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Which metadata backend [`super::Berth`] runs on: `BERTH_TEST_METADATA=postgres` puts
/// every berth the tests start on a fresh database of the shared server.
pub fn test_backend_is_postgres() -> bool {
    match std::env::var("BERTH_TEST_METADATA").as_deref() {
        Ok("postgres") => true,
        Ok("redb") | Err(_) => false,
        Ok(other) => panic!("BERTH_TEST_METADATA={other:?}: expected redb or postgres"),
    }
}
