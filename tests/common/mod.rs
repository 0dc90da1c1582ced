//! Test harness: runs the real `berth` binary on a loopback port, against its embedded object
//! store or a separate S3 server (s3s-fs) started in the test process, and talks to it over
//! real HTTP.
//!
//! Metadata backend: redb unless `BERTH_TEST_METADATA=postgres`, which gives every berth
//! started here (without a `metadata:` section of its own) a fresh database on a real
//! PostgreSQL server ([`pg::PgServer::shared`]): the same tests run on both backends.
#![allow(dead_code)]

pub mod credentials;
pub mod forward;
pub mod pg;
pub mod prom;

use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use berth::storage::embedded::{EmbeddedOptions, EmbeddedS3};
use sha2::{Digest as _, Sha256};

pub const S3_ACCESS_KEY: &str = "testaccesskey";
pub const S3_SECRET_KEY: &str = "testsecretkey0123456789";
pub const S3_BUCKET: &str = "registry";

/// An S3 server (s3s-fs) on a loopback port, counting the requests it serves.
pub struct S3Server {
    pub endpoint: String,
    pub requests: Arc<AtomicU64>,
    pub root: tempfile::TempDir,
    /// While set, the server answers every write with 503 (see [`S3Server::refuse_writes`]).
    writes_refused: Arc<AtomicBool>,
}

impl S3Server {
    pub fn start() -> S3Server {
        let root = tempfile::tempdir().unwrap();
        let requests = Arc::new(AtomicU64::new(0));
        let writes_refused = Arc::new(AtomicBool::new(false));
        let s3 = EmbeddedS3::start(EmbeddedOptions {
            root: root.path().to_path_buf(),
            bucket: S3_BUCKET.into(),
            listen: "127.0.0.1:0".parse().unwrap(),
            access_key: S3_ACCESS_KEY.into(),
            secret_key: S3_SECRET_KEY.into(),
            request_counter: Some(requests.clone()),
            refuse_writes: Some(writes_refused.clone()),
        })
        .unwrap();
        S3Server {
            endpoint: s3.endpoint,
            requests,
            root,
            writes_refused,
        }
    }

    /// From now on (until called with false) every PUT, POST and DELETE gets 503
    /// ServiceUnavailable; reads still work.
    pub fn refuse_writes(&self, refuse: bool) {
        self.writes_refused.store(refuse, Ordering::SeqCst);
    }

    pub fn request_count(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }

    /// The `storage:` section pointing berth at this server.
    pub fn storage_yaml(&self) -> String {
        format!(
            "storage:\n  endpoint: {}\n  region: us-east-1\n  bucket: {S3_BUCKET}\n  prefix: berth/\n  access_key: {S3_ACCESS_KEY}\n  secret_key: {S3_SECRET_KEY}\n  path_style: true\n",
            self.endpoint
        )
    }

    /// Files of blob objects (under `berth/blobs/`; not the journal's records).
    pub fn blob_files(&self) -> Vec<PathBuf> {
        let mut out = Vec::new();
        walk(
            &self.root.path().join(S3_BUCKET).join("berth").join("blobs"),
            &mut out,
        );
        out
    }

    /// Files of the bucket journal's records (under `berth/journal/`).
    pub fn journal_files(&self) -> Vec<PathBuf> {
        let mut out = Vec::new();
        walk(
            &self
                .root
                .path()
                .join(S3_BUCKET)
                .join("berth")
                .join("journal"),
            &mut out,
        );
        out
    }

    /// Files under the bucket (objects), for asserting what was stored.
    pub fn object_files(&self) -> Vec<PathBuf> {
        let mut out = Vec::new();
        walk(&self.root.path().join(S3_BUCKET), &mut out);
        out
    }
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            walk(&p, out);
        } else {
            out.push(p);
        }
    }
}

/// A running berth process.
pub struct Berth {
    child: Option<Child>,
    pub port: u16,
    pub data_dir: tempfile::TempDir,
    config_path: PathBuf,
    log_path: PathBuf,
    /// Extra environment for the berth process (kept across restarts).
    env: Vec<(String, String)>,
    /// Set when berth serves TLS: how clients reach it.
    tls: Option<TlsClient>,
}

/// What a client needs to talk to a berth that serves TLS.
#[derive(Clone)]
pub struct TlsClient {
    /// PEM of the CA that signed berth's certificate.
    pub ca_pem: Vec<u8>,
    /// PEM certificate + key to present (mTLS), if berth asks for one.
    pub identity_pem: Option<Vec<u8>>,
}

/// A client trusting `tls.ca_pem` only (and presenting its identity, if any), not following
/// redirects.
pub fn tls_client(tls: &TlsClient) -> reqwest::blocking::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut b = reqwest::blocking::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(600))
        .tls_certs_only(reqwest::Certificate::from_pem_bundle(&tls.ca_pem).unwrap());
    if let Some(id) = &tls.identity_pem {
        b = b.identity(reqwest::Identity::from_pem(id).unwrap());
    }
    b.build().unwrap()
}

impl Berth {
    /// berth with its embedded object store and `extra_yaml` appended to the config.
    pub fn start(extra_yaml: &str) -> Berth {
        Self::start_with(extra_yaml, None)
    }

    /// berth against `s3` (or its embedded store when None).
    pub fn start_with(extra_yaml: &str, s3: Option<&S3Server>) -> Berth {
        Self::start_with_env(extra_yaml, s3, &[])
    }

    /// As [`Berth::start_with`], with extra environment variables for the berth process
    /// (e.g. glibc malloc tunables for memory measurements).
    pub fn start_with_env(extra_yaml: &str, s3: Option<&S3Server>, env: &[(&str, &str)]) -> Berth {
        Self::start_full(extra_yaml, s3, env, None)
    }

    /// A berth against `s3` that is not started yet (e.g. to run `berth recover` first; then
    /// [`Berth::start_again`]).
    pub fn stopped_with(extra_yaml: &str, s3: Option<&S3Server>) -> Berth {
        Self::prepare(extra_yaml, s3, &[], None)
    }

    /// berth serving TLS (`extra_yaml` has the `tls:` section); `tls` is how to reach it.
    pub fn start_tls(extra_yaml: &str, tls: TlsClient) -> Berth {
        Self::start_full(extra_yaml, None, &[], Some(tls))
    }

    /// Starts berth without waiting for it to answer (for configurations that must fail at
    /// start); returns its exit status and log once it exits, or None if it still runs
    /// after `wait`.
    pub fn start_expecting_exit(
        extra_yaml: &str,
        s3: Option<&S3Server>,
        wait: Duration,
    ) -> Option<(std::process::ExitStatus, String)> {
        let mut b = Self::prepare(extra_yaml, s3, &[], None);
        b.spawn_process();
        let deadline = Instant::now() + wait;
        while Instant::now() < deadline {
            if let Some(status) = b.child.as_mut().unwrap().try_wait().unwrap() {
                b.child = None;
                return Some((status, b.log()));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    fn start_full(
        extra_yaml: &str,
        s3: Option<&S3Server>,
        env: &[(&str, &str)],
        tls: Option<TlsClient>,
    ) -> Berth {
        let mut b = Self::prepare(extra_yaml, s3, env, tls);
        b.spawn();
        b
    }

    fn prepare(
        extra_yaml: &str,
        s3: Option<&S3Server>,
        env: &[(&str, &str)],
        tls: Option<TlsClient>,
    ) -> Berth {
        let data_dir = tempfile::tempdir().unwrap();
        let config_path = data_dir.path().join("berth.yaml");
        let log_path = data_dir.path().join("berth.log");
        let mut yaml = String::new();
        if let Some(s3) = s3 {
            yaml.push_str(&s3.storage_yaml());
        }
        yaml.push_str(extra_yaml);
        if pg::test_backend_is_postgres() && !extra_yaml.contains("metadata:") {
            let server = pg::PgServer::shared();
            if !yaml.ends_with('\n') && !yaml.is_empty() {
                yaml.push('\n');
            }
            yaml.push_str(&server.metadata_yaml(&server.create_database()));
        }
        std::fs::write(&config_path, yaml).unwrap();
        Berth {
            child: None,
            port: free_port(),
            data_dir,
            config_path,
            log_path,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            tls,
        }
    }

    fn spawn(&mut self) {
        self.spawn_process();
        self.wait_ready();
    }

    fn spawn_process(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_berth"))
            .arg("serve")
            .arg("--config")
            .arg(&self.config_path)
            .arg("--listen")
            .arg(format!("127.0.0.1:{}", self.port))
            .arg("--data-dir")
            .arg(self.data_dir.path().join("data"))
            .env("RUST_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn berth");
        self.child = Some(child);
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let url = self.url("/v2/");
        let client = match &self.tls {
            Some(t) => tls_client(t),
            None => client(),
        };
        while Instant::now() < deadline {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("berth exited with {status} at start:\n{}", self.log());
            }
            if let Ok(r) = client.get(&url).timeout(Duration::from_secs(2)).send() {
                // 401: authentication is on, and berth answers.
                if r.status() == 200 || r.status() == 401 {
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("berth not ready after 30s:\n{}", self.log());
    }

    pub fn url(&self, path: &str) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}{}", self.port, path)
    }

    /// Sends `signal` (e.g. `libc::SIGHUP`) to the berth process.
    /// Monolithic upload (`POST ?digest=` with the body); asserts 201 (berth's log in the failure
    /// when it answered 5xx) and returns the digest.
    #[track_caller]
    pub fn push_blob(&self, c: &reqwest::blocking::Client, repo: &str, bytes: &[u8]) -> String {
        let digest = sha256_digest(bytes);
        let r = c
            .post(self.url(&format!("/v2/{repo}/blobs/uploads/?digest={digest}")))
            .header("Content-Type", "application/octet-stream")
            .body(bytes.to_vec())
            .send()
            .unwrap();
        if r.status() != 201 {
            let status = r.status();
            let log = if status.is_server_error() {
                self.log()
            } else {
                String::new()
            };
            panic!(
                "push blob to {repo}: {status}: {}\n{log}",
                r.text().unwrap()
            );
        }
        digest
    }

    /// The config file berth runs with.
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// berth's data directory (`--data-dir`): meta.redb lives here.
    pub fn data_path(&self) -> PathBuf {
        self.data_dir.path().join("data")
    }

    /// Starts berth again (after [`Berth::kill`]) on the same port, config and data directory.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "berth is still running");
        self.spawn();
    }

    /// Runs `berth recover` on this berth's config and data directory (berth must not be
    /// running); returns its exit status and output (stdout, then stderr).
    pub fn recover(&self) -> (std::process::ExitStatus, String) {
        let out = Command::new(env!("CARGO_BIN_EXE_berth"))
            .arg("recover")
            .arg("--config")
            .arg(&self.config_path)
            .arg("--data-dir")
            .arg(self.data_path())
            .env("RUST_LOG", "info")
            .output()
            .expect("run berth recover");
        let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&out.stderr));
        (out.status, text)
    }

    /// Runs `berth gc <args>` with this berth's config and data directory (it asks the
    /// running server through `metrics.listen` when that answers, else opens the stores).
    pub fn gc(&self, args: &[&str]) -> std::process::Output {
        Command::new(env!("CARGO_BIN_EXE_berth"))
            .arg("gc")
            .arg("--config")
            .arg(&self.config_path)
            .arg("--data-dir")
            .arg(self.data_dir.path().join("data"))
            .args(args)
            .env("RUST_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .output()
            .expect("run berth gc")
    }

    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child's pid.
        let rc = unsafe { libc::kill(self.pid() as i32, signal) };
        assert_eq!(rc, 0, "kill({}, {signal})", self.pid());
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Replaces the config (`extra_yaml` as in [`Berth::start`]); takes effect at the next
    /// [`Berth::restart`].
    pub fn rewrite_config(&self, extra_yaml: &str) {
        std::fs::write(&self.config_path, extra_yaml).unwrap();
    }

    /// Kills berth abruptly (no graceful shutdown) and starts it again on the same port and
    /// data directory.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits up to `timeout` for berth to exit (after a signal) and returns its exit status.
    pub fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut().expect("berth is running");
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "berth did not exit in {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Peak resident set size of the berth process so far, in KiB (VmHWM).
    pub fn peak_rss_kib(&self) -> u64 {
        proc_status_kib(self.pid(), "VmHWM:")
    }

    pub fn rss_kib(&self) -> u64 {
        proc_status_kib(self.pid(), "VmRSS:")
    }

    /// Resets VmHWM to the current RSS.
    pub fn reset_peak_rss(&self) {
        std::fs::write(format!("/proc/{}/clear_refs", self.pid()), "5").unwrap();
    }
}

impl Drop for Berth {
    fn drop(&mut self) {
        self.kill();
    }
}

fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{field} not in /proc/{pid}/status"))
}

/// Whether `tool` runs. When it does not: a failure naming the Debian `package` to install,
/// unless BERTH_SKIP_CLIENT_TESTS=1, which makes the caller skip its test.
pub fn have_tool(tool: &str, package: &str) -> bool {
    let ok = Command::new(tool)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if ok {
        return true;
    }
    if std::env::var("BERTH_SKIP_CLIENT_TESTS").as_deref() == Ok("1") {
        eprintln!("SKIPPED: {tool} is not installed (BERTH_SKIP_CLIENT_TESTS=1)");
        return false;
    }
    panic!(
        "{tool} is not installed or does not run (`{tool} --version` failed). Install it \
         (Debian/Ubuntu: apt-get install -y {package}) or set BERTH_SKIP_CLIENT_TESTS=1 to skip \
         the tests that need it."
    );
}

/// How a `berth serve` that was expected to stop on its own ended.
pub struct Exited {
    pub status: std::process::ExitStatus,
    /// stdout and stderr.
    pub output: String,
    /// From spawn to exit.
    pub after: Duration,
}

/// Runs `berth serve` with the config `yaml` on `127.0.0.1:port` with `data_dir` until it
/// exits; None (and killed) if it still runs after `wait`. For start-ups that must fail.
pub fn serve_until_exit(yaml: &str, port: u16, data_dir: &Path, wait: Duration) -> Option<Exited> {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("berth.yaml");
    std::fs::write(&config, yaml).unwrap();
    let start = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_berth"))
        .arg("serve")
        .arg("--config")
        .arg(&config)
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--data-dir")
        .arg(data_dir)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn berth");
    while start.elapsed() < wait {
        if let Some(status) = child.try_wait().unwrap() {
            let after = start.elapsed();
            let mut output = String::new();
            child
                .stdout
                .take()
                .unwrap()
                .read_to_string(&mut output)
                .unwrap();
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut output)
                .unwrap();
            return Some(Exited {
                status,
                output,
                after,
            });
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A client that does not follow redirects (tests look at the 307 themselves).
pub fn client() -> reqwest::blocking::Client {
    // reqwest is built without a default TLS crypto provider; berth uses ring.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::blocking::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(600))
        .build()
        .unwrap()
}

pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// Deterministic pseudo-random bytes (xorshift), so large blobs need no memory to describe.
///
/// The stream does not depend on how it is read: bytes of a word that one `read` could not
/// take are handed out by the next (readers such as reqwest's use buffers of any size).
pub struct PseudoRandom {
    state: u64,
    left: u64,
    /// The current word; `word[used..]` not handed out yet.
    word: [u8; 8],
    used: usize,
}

impl PseudoRandom {
    pub fn new(seed: u64, len: u64) -> Self {
        PseudoRandom {
            state: seed | 1,
            left: len,
            word: [0; 8],
            used: 8,
        }
    }

    /// sha256 digest of the whole stream, computed without holding it.
    pub fn digest(seed: u64, len: u64) -> String {
        let mut r = PseudoRandom::new(seed, len);
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = r.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
        format!("sha256:{}", hex::encode(h.finalize()))
    }
}

impl Read for PseudoRandom {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = (buf.len() as u64).min(self.left) as usize;
        let mut i = 0;
        while i < n {
            if self.used == 8 {
                self.state ^= self.state << 13;
                self.state ^= self.state >> 7;
                self.state ^= self.state << 17;
                self.word = self.state.to_le_bytes();
                self.used = 0;
            }
            let k = (n - i).min(8 - self.used);
            buf[i..i + k].copy_from_slice(&self.word[self.used..self.used + k]);
            self.used += k;
            i += k;
        }
        self.left -= n as u64;
        Ok(n)
    }
}

/// The OCI error code of an error response body.
pub fn error_code(body: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(body)
        .unwrap_or_else(|e| panic!("error body is not JSON ({e}): {body}"));
    v["errors"][0]["code"]
        .as_str()
        .unwrap_or_else(|| panic!("no errors[0].code in {body}"))
        .to_string()
}
