//! Configuration: the YAML file (`conf/berth.yaml` documents every key), `_env:NAME`
//! indirection, and validation.
//!
//! Unknown keys and bad values fail at start with a message naming the key. A value written
//! `_env:NAME` is read from the environment, the original docker-registry's convention; it works
//! for any scalar value (strings, sizes, durations, booleans, numbers).

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// The smallest multipart part S3 accepts (all but the last part of an upload).
pub const MIN_PART_SIZE: u64 = 5 * 1024 * 1024;
/// S3's part-number limit bounds the blob size: part_size * 10,000.
pub const MAX_PARTS: u64 = 10_000;

#[derive(Debug, thiserror::Error)]
#[error("config: {key}: {message}")]
pub struct ConfigError {
    pub key: String,
    pub message: String,
}

impl ConfigError {
    fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            key: key.into(),
            message: message.into(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    /// Worker threads for the HTTP service (pingora's default is 1).
    pub threads: usize,
    pub storage: StorageConfig,
    pub upload: UploadConfig,
    pub log_level: String,
    /// On SIGTERM: how long running requests may go on after the listener closes.
    pub shutdown_grace: Duration,
    pub log_format: LogFormat,
    /// One access-log line per request.
    pub access_log: bool,
    pub metrics: MetricsConfig,
    /// Downstream TLS; plain HTTP when None.
    pub tls: Option<TlsConfig>,
    pub auth: AuthConfig,
    pub limits: LimitsConfig,
    pub journal: JournalConfig,
    pub gc: GcConfig,
    pub metadata: MetadataConfig,
    /// Pull-through mirrors (`proxy:`), most specific prefix first at lookup.
    pub proxy: Vec<MirrorConfig>,
}

/// One `proxy:` entry: repositories under `prefix` mirror `remote_url`.
#[derive(Clone)]
pub struct MirrorConfig {
    /// Empty (the whole registry, distribution's form) or ending in '/'.
    pub prefix: String,
    pub remote_url: String,
    pub username: Option<String>,
    pub password: Option<String>,
    /// How long a cached tag is trusted before the upstream is asked again.
    pub ttl: Duration,
}

impl fmt::Debug for MirrorConfig {
    // The password never reaches a log or `check-config`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MirrorConfig")
            .field("prefix", &self.prefix)
            .field("remote_url", &self.remote_url)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("ttl", &self.ttl)
            .finish()
    }
}

/// `metadata:`: where registry metadata lives.
#[derive(Debug, Clone, Default)]
pub enum MetadataConfig {
    /// `backend: redb`: `<data_dir>/meta.redb`, one node.
    #[default]
    Redb,
    /// `backend: postgres`: one database shared by every node.
    Postgres(PostgresConfig),
}

#[derive(Clone)]
pub struct PostgresConfig {
    /// `postgres://user:password@host:port/db?sslmode=...` (or libpq's `key=value` form).
    pub url: String,
    /// Connections this node keeps at most.
    pub max_connections: usize,
    /// The server cancels a statement running longer (PostgreSQL's `statement_timeout`).
    pub statement_timeout: Duration,
    /// Connecting, or waiting for a free pooled connection, longer than this fails the call
    /// with 503.
    pub connect_timeout: Duration,
    /// PEM CA bundle that replaces the system roots for verifying the server's certificate.
    pub ca_bundle: Option<PathBuf>,
}

// Hand-written so the password in the URL never reaches a log line.
impl fmt::Debug for PostgresConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresConfig")
            .field("url", &redact_password(&self.url))
            .field("max_connections", &self.max_connections)
            .field("statement_timeout", &self.statement_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("ca_bundle", &self.ca_bundle)
            .finish()
    }
}

/// `journal:`: the bucket journal (meta::journal), the bucket's record of every acknowledged
/// metadata write.
#[derive(Debug, Clone)]
pub struct JournalConfig {
    /// Off: nothing but blob bytes goes to the bucket, and the metadata store cannot be
    /// rebuilt from it (for comparisons; not for production).
    pub enabled: bool,
    /// Journal records read at once when rebuilding or catching up.
    pub rebuild_concurrency: usize,
}

impl Default for JournalConfig {
    fn default() -> Self {
        JournalConfig {
            enabled: true,
            rebuild_concurrency: 32,
        }
    }
}

/// `gc:`: garbage collection (what is garbage: src/gc/mod.rs).
#[derive(Debug, Clone)]
pub struct GcConfig {
    /// Run a pass this often inside `berth serve`; never when None.
    pub interval: Option<Duration>,
    /// How long a blob must have stayed unreferenced (since its upload, mount, unlink or the
    /// delete that freed it) before it is collected: longer than the slowest push.
    pub blob_grace: Duration,
    /// Delete manifests no tag, index or live subject keeps.
    pub untagged_manifests: UntaggedManifests,
    /// How long such a manifest must have stayed untagged.
    pub untagged_grace: Duration,
    /// Applied by every pass, in order; a repository takes the first rule that matches it.
    pub retention: Vec<RetentionRule>,
}

impl Default for GcConfig {
    fn default() -> Self {
        GcConfig {
            interval: None,
            blob_grace: Duration::from_secs(24 * 3600),
            untagged_manifests: UntaggedManifests::Keep,
            untagged_grace: Duration::from_secs(24 * 3600),
            retention: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UntaggedManifests {
    Keep,
    Delete,
}

/// `gc.retention[]`: which tags of matching repositories go.
#[derive(Debug, Clone)]
pub struct RetentionRule {
    /// Repository pattern (`*` matches any run of characters).
    pub repositories: String,
    /// The tags this rule judges (all when None); others are left alone.
    pub tags: Option<regex::Regex>,
    /// Keep the N most recently pushed judged tags.
    pub keep_last: Option<usize>,
    /// Delete judged tags last pushed longer ago than this (outside the kept N).
    pub older_than: Option<Duration>,
    /// Tags matching this are never deleted (wins over everything).
    pub keep: Option<regex::Regex>,
}

/// The connection string with its password replaced by `<redacted>`, in either form
/// (`scheme://user:password@host` or `password=...`).
pub fn redact_password(url: &str) -> String {
    if let Some((scheme, rest)) = url.split_once("://") {
        let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, tail) = rest.split_at(authority_end);
        if let Some((userinfo, host)) = authority.rsplit_once('@') {
            if let Some((user, _)) = userinfo.split_once(':') {
                return format!("{scheme}://{user}:<redacted>@{host}{tail}");
            }
        }
        // A password may also be a query parameter.
        return match tail.split_once('?') {
            Some((path, query)) => {
                let query: Vec<String> = query
                    .split('&')
                    .map(|kv| match kv.split_once('=') {
                        Some(("password", _)) => "password=<redacted>".to_string(),
                        _ => kv.to_string(),
                    })
                    .collect();
                format!("{scheme}://{authority}{path}?{}", query.join("&"))
            }
            None => url.to_string(),
        };
    }
    url.split_whitespace()
        .map(|kv| match kv.split_once('=') {
            Some(("password", _)) => "password=<redacted>".to_string(),
            _ => kv.to_string(),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// `tls:`: the registry listener speaks HTTPS (HTTP/1.1 and HTTP/2 via ALPN).
#[derive(Debug, Clone)]
pub struct TlsConfig {
    /// PEM certificate chain, leaf first.
    pub certificate: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// PEM CA bundles for client certificates; when not empty, clients must present a
    /// certificate signed by one of them (mTLS).
    pub client_cas: Vec<PathBuf>,
}

/// `auth:`: who may do what. Absent (or `auth: none`): everyone may do everything.
#[derive(Debug, Clone, Default)]
pub struct AuthConfig {
    pub mode: AuthMode,
    /// Repository patterns (`*` matches any run of characters) anyone may pull without
    /// credentials.
    pub anonymous_pull: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum AuthMode {
    #[default]
    None,
    /// `auth.htpasswd`: HTTP Basic against an htpasswd file of bcrypt entries.
    Htpasswd { realm: String, path: PathBuf },
    /// `auth.token`: Docker token authentication (bearer JWTs from an external issuer).
    Token {
        realm: String,
        service: String,
        issuer: String,
        root_cert_bundle: PathBuf,
    },
}

/// `limits:`: bounds against abuse.
#[derive(Debug, Clone)]
pub struct LimitsConfig {
    /// Largest blob accepted; None: only S3's own limit (10,000 parts).
    pub max_blob_size: Option<u64>,
    /// Requests writing upload bytes at the same time; None: unbounded.
    pub max_concurrent_uploads: Option<usize>,
    /// Largest request header section (request line + headers).
    pub max_header_bytes: usize,
    /// A request body read that waits longer than this fails the request.
    pub read_timeout: Duration,
    /// How long an idle keep-alive connection waits for its next request.
    pub idle_timeout: Duration,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_blob_size: None,
            max_concurrent_uploads: None,
            max_header_bytes: 64 * 1024,
            read_timeout: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    /// JSON lines.
    Json,
}

#[derive(Debug, Clone, Default)]
pub struct MetricsConfig {
    /// Address of the operations listener (`/metrics`, `/healthz`, `/readyz`); off when None.
    pub listen: Option<SocketAddr>,
}

/// Default `storage.coalesce_window`: a few of the object store's reads behind the fastest
/// client; 32 clients on one layer share one read within this much memory.
pub const DEFAULT_COALESCE_WINDOW: u64 = 16 * 1024 * 1024;

#[derive(Clone)]
pub struct StorageConfig {
    /// None: start the embedded S3 endpoint under `<data_dir>/objects`.
    pub endpoint: Option<String>,
    pub region: String,
    pub bucket: String,
    /// Key prefix inside the bucket, e.g. `berth/`. Empty or ending in `/`.
    pub prefix: String,
    pub access_key: String,
    pub secret_key: String,
    pub path_style: bool,
    pub blob_serving: BlobServing,
    pub presign_ttl: Duration,
    /// PEM CA bundle trusted for an `https://` endpoint instead of the system roots.
    pub ca_bundle: Option<PathBuf>,
    /// Bytes a client of a shared (coalesced) blob read may fall behind the fastest; 0: off.
    pub coalesce_window: u64,
}

// Hand-written so the secret key never reaches a log line.
impl fmt::Debug for StorageConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StorageConfig")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix)
            .field("access_key", &"<redacted>")
            .field("secret_key", &"<redacted>")
            .field("path_style", &self.path_style)
            .field("blob_serving", &self.blob_serving)
            .field("presign_ttl", &self.presign_ttl)
            .field("ca_bundle", &self.ca_bundle)
            .field("coalesce_window", &self.coalesce_window)
            .finish()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlobServing {
    /// pingora proxies blob GETs to a presigned URL.
    Proxy,
    /// 307 to a presigned URL.
    Redirect,
}

#[derive(Debug, Clone)]
pub struct UploadConfig {
    pub part_size: u64,
    pub session_expiry: Duration,
    /// Memory all part buffers together may use; uploads wait for room beyond it.
    pub buffer_budget: u64,
    /// Nice value of the threads doing upload byte work (0–19): how far behind request
    /// handling the OS schedules them when CPUs are contended.
    pub transfer_nice: i32,
}

// ---- the file as written: every scalar is a string or a YAML scalar, resolved below ----

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    listen: Option<serde_yaml::Value>,
    data_dir: Option<serde_yaml::Value>,
    threads: Option<serde_yaml::Value>,
    log_level: Option<serde_yaml::Value>,
    shutdown_grace: Option<serde_yaml::Value>,
    log_format: Option<serde_yaml::Value>,
    access_log: Option<serde_yaml::Value>,
    #[serde(default)]
    metrics: RawMetrics,
    tls: Option<RawTls>,
    /// `none` or a mapping (see [`RawAuth`]).
    auth: Option<serde_yaml::Value>,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    storage: RawStorage,
    #[serde(default)]
    upload: RawUpload,
    /// A list of mirrors, or distribution's single `proxy: {remoteurl: ...}`.
    proxy: Option<serde_yaml::Value>,
    #[serde(default)]
    journal: RawJournal,
    #[serde(default)]
    gc: RawGc,
    #[serde(default)]
    metadata: RawMetadata,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMirror {
    prefix: Option<serde_yaml::Value>,
    remoteurl: Option<serde_yaml::Value>,
    username: Option<serde_yaml::Value>,
    password: Option<serde_yaml::Value>,
    ttl: Option<serde_yaml::Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetadata {
    backend: Option<serde_yaml::Value>,
    postgres: Option<RawPostgres>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGc {
    interval: Option<serde_yaml::Value>,
    blob_grace: Option<serde_yaml::Value>,
    untagged_manifests: Option<serde_yaml::Value>,
    untagged_grace: Option<serde_yaml::Value>,
    #[serde(default)]
    retention: Vec<RawRetention>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawJournal {
    enabled: Option<serde_yaml::Value>,
    rebuild_concurrency: Option<serde_yaml::Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRetention {
    repositories: Option<serde_yaml::Value>,
    tags: Option<serde_yaml::Value>,
    keep_last: Option<serde_yaml::Value>,
    older_than: Option<serde_yaml::Value>,
    keep: Option<serde_yaml::Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPostgres {
    url: Option<serde_yaml::Value>,
    max_connections: Option<serde_yaml::Value>,
    statement_timeout: Option<serde_yaml::Value>,
    connect_timeout: Option<serde_yaml::Value>,
    ca_bundle: Option<serde_yaml::Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStorage {
    endpoint: Option<serde_yaml::Value>,
    region: Option<serde_yaml::Value>,
    bucket: Option<serde_yaml::Value>,
    prefix: Option<serde_yaml::Value>,
    access_key: Option<serde_yaml::Value>,
    secret_key: Option<serde_yaml::Value>,
    path_style: Option<serde_yaml::Value>,
    blob_serving: Option<serde_yaml::Value>,
    presign_ttl: Option<serde_yaml::Value>,
    ca_bundle: Option<serde_yaml::Value>,
    coalesce_window: Option<serde_yaml::Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    certificate: Option<serde_yaml::Value>,
    key: Option<serde_yaml::Value>,
    clientcas: Option<serde_yaml::Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAuth {
    htpasswd: Option<RawHtpasswd>,
    token: Option<RawToken>,
    anonymous_pull: Option<serde_yaml::Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHtpasswd {
    realm: Option<serde_yaml::Value>,
    path: Option<serde_yaml::Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawToken {
    realm: Option<serde_yaml::Value>,
    service: Option<serde_yaml::Value>,
    issuer: Option<serde_yaml::Value>,
    rootcertbundle: Option<serde_yaml::Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_blob_size: Option<serde_yaml::Value>,
    max_concurrent_uploads: Option<serde_yaml::Value>,
    max_header_bytes: Option<serde_yaml::Value>,
    read_timeout: Option<serde_yaml::Value>,
    idle_timeout: Option<serde_yaml::Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    listen: Option<serde_yaml::Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpload {
    part_size: Option<serde_yaml::Value>,
    session_expiry: Option<serde_yaml::Value>,
    buffer_budget: Option<serde_yaml::Value>,
    transfer_nice: Option<serde_yaml::Value>,
}

/// Overrides from the command line; they win over the file.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub listen: Option<SocketAddr>,
    pub data_dir: Option<PathBuf>,
}

impl Config {
    /// Loads `path` (or the built-in defaults when None) and applies the overrides.
    pub fn load(path: Option<&Path>, overrides: &Overrides) -> Result<Config, ConfigError> {
        let text = match path {
            Some(p) => std::fs::read_to_string(p)
                .map_err(|e| ConfigError::new(p.display().to_string(), e.to_string()))?,
            None => String::new(),
        };
        Self::from_yaml(&text, overrides, &|name| std::env::var(name).ok())
    }

    /// Parses YAML text; `env` resolves `_env:NAME` (injected so tests need no process env).
    pub fn from_yaml(
        text: &str,
        overrides: &Overrides,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let raw: RawConfig = if text.trim().is_empty() {
            RawConfig::default()
        } else {
            serde_yaml::from_str(text).map_err(|e| {
                // serde_yaml names the unknown field and its location.
                ConfigError::new("file", e.to_string())
            })?
        };
        let r = Resolver { env };

        let listen = match &overrides.listen {
            Some(a) => *a,
            None => r
                .string("listen", raw.listen)?
                .unwrap_or_else(|| "127.0.0.1:5000".into())
                .parse()
                .map_err(|e| ConfigError::new("listen", format!("not an address: {e}")))?,
        };
        let data_dir = match &overrides.data_dir {
            Some(d) => d.clone(),
            None => PathBuf::from(
                r.string("data_dir", raw.data_dir)?
                    .unwrap_or_else(|| "./data".into()),
            ),
        };
        let threads = match r.string("threads", raw.threads)? {
            Some(t) => t
                .parse::<usize>()
                .ok()
                .filter(|t| *t >= 1)
                .ok_or_else(|| ConfigError::new("threads", "expected a whole number >= 1"))?,
            None => std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
        };
        let log_level = r
            .string("log_level", raw.log_level)?
            .unwrap_or_else(|| "info".into());
        if !["error", "warn", "info", "debug", "trace", "off"].contains(&log_level.as_str()) {
            return Err(ConfigError::new(
                "log_level",
                "expected one of error, warn, info, debug, trace, off",
            ));
        }

        let shutdown_grace = r
            .duration("shutdown_grace", raw.shutdown_grace)?
            .unwrap_or(Duration::from_secs(10));

        let log_format = match r.string("log_format", raw.log_format)?.as_deref() {
            None | Some("text") => LogFormat::Text,
            Some("json") => LogFormat::Json,
            Some(other) => {
                return Err(ConfigError::new(
                    "log_format",
                    format!("expected text or json, got {other:?}"),
                ))
            }
        };
        let access_log = r.bool("access_log", raw.access_log)?.unwrap_or(true);
        let metrics = MetricsConfig {
            listen: r
                .string("metrics.listen", raw.metrics.listen)?
                .map(|a| {
                    a.parse().map_err(|e| {
                        ConfigError::new("metrics.listen", format!("not an address: {e}"))
                    })
                })
                .transpose()?,
        };

        let s = raw.storage;
        let endpoint = r.string("storage.endpoint", s.endpoint)?;
        if let Some(e) = &endpoint {
            if !(e.starts_with("http://") || e.starts_with("https://")) {
                return Err(ConfigError::new(
                    "storage.endpoint",
                    "expected a URL starting with http:// or https://",
                ));
            }
        }
        let embedded = endpoint.is_none();
        let access_key = r.string("storage.access_key", s.access_key)?;
        let secret_key = r.string("storage.secret_key", s.secret_key)?;
        if !embedded && (access_key.is_none() || secret_key.is_none()) {
            return Err(ConfigError::new(
                "storage.access_key",
                "storage.access_key and storage.secret_key are required with storage.endpoint",
            ));
        }
        let mut prefix = r.string("storage.prefix", s.prefix)?.unwrap_or_default();
        if prefix.starts_with('/') {
            return Err(ConfigError::new(
                "storage.prefix",
                "must not start with '/'",
            ));
        }
        if !prefix.is_empty() && !prefix.ends_with('/') {
            prefix.push('/');
        }
        let bucket = r
            .string("storage.bucket", s.bucket)?
            .unwrap_or_else(|| "registry".into());
        if bucket.is_empty() || bucket.contains('/') {
            return Err(ConfigError::new("storage.bucket", "not a bucket name"));
        }
        let blob_serving = match r.string("storage.blob_serving", s.blob_serving)?.as_deref() {
            None | Some("proxy") => BlobServing::Proxy,
            Some("redirect") if embedded => {
                return Err(ConfigError::new(
                    "storage.blob_serving",
                    "redirect needs an S3 endpoint (storage.endpoint): the local object store \
                     under data_dir has no URLs to redirect to, and serves blobs itself (proxy)",
                ))
            }
            Some("redirect") => BlobServing::Redirect,
            Some(other) => {
                return Err(ConfigError::new(
                    "storage.blob_serving",
                    format!("expected proxy or redirect, got {other:?}"),
                ))
            }
        };
        let presign_ttl = r
            .duration("storage.presign_ttl", s.presign_ttl)?
            .unwrap_or(Duration::from_secs(15 * 60));
        if presign_ttl < Duration::from_secs(1) || presign_ttl > Duration::from_secs(7 * 86400) {
            return Err(ConfigError::new(
                "storage.presign_ttl",
                "must be between 1s and 7d (SigV4's limit)",
            ));
        }
        let storage = StorageConfig {
            endpoint,
            region: r
                .string("storage.region", s.region)?
                .unwrap_or_else(|| "us-east-1".into()),
            bucket,
            prefix,
            access_key: access_key.unwrap_or_default(),
            secret_key: secret_key.unwrap_or_default(),
            path_style: r.bool("storage.path_style", s.path_style)?.unwrap_or(true),
            blob_serving,
            presign_ttl,
            ca_bundle: r
                .string("storage.ca_bundle", s.ca_bundle)?
                .map(PathBuf::from),
            coalesce_window: r
                .size("storage.coalesce_window", s.coalesce_window)?
                .unwrap_or(DEFAULT_COALESCE_WINDOW),
        };

        let u = raw.upload;
        let part_size = r
            .size("upload.part_size", u.part_size)?
            .unwrap_or(8 * 1024 * 1024);
        if part_size < MIN_PART_SIZE {
            return Err(ConfigError::new(
                "upload.part_size",
                "must be at least 5MiB (S3's minimum part size)",
            ));
        }
        if part_size > 5 * 1024 * 1024 * 1024 {
            return Err(ConfigError::new(
                "upload.part_size",
                "must be at most 5GiB (S3's maximum part size)",
            ));
        }
        let session_expiry = r
            .duration("upload.session_expiry", u.session_expiry)?
            .unwrap_or(Duration::from_secs(24 * 3600));
        if session_expiry < Duration::from_secs(1) {
            return Err(ConfigError::new(
                "upload.session_expiry",
                "must be at least 1s",
            ));
        }
        let buffer_budget = r
            .size("upload.buffer_budget", u.buffer_budget)?
            .unwrap_or(256 * 1024 * 1024);
        if buffer_budget < part_size {
            return Err(ConfigError::new(
                "upload.buffer_budget",
                "must be at least upload.part_size (a part buffer must fit)",
            ));
        }
        let transfer_nice = match r.string("upload.transfer_nice", u.transfer_nice)? {
            Some(n) => n
                .parse::<i32>()
                .ok()
                .filter(|n| (0..=19).contains(n))
                .ok_or_else(|| {
                    ConfigError::new("upload.transfer_nice", "expected a whole number 0-19")
                })?,
            None => 19,
        };

        Ok(Config {
            listen,
            data_dir,
            threads,
            storage,
            upload: UploadConfig {
                part_size,
                session_expiry,
                buffer_budget,
                transfer_nice,
            },
            log_level,
            shutdown_grace,
            log_format,
            access_log,
            metrics,
            tls: tls_config(&r, raw.tls)?,
            auth: auth_config(&r, raw.auth)?,
            limits: limits_config(&r, raw.limits)?,
            proxy: proxy_config(&r, raw.proxy)?,
            journal: journal_config(&r, raw.journal)?,
            gc: gc_config(&r, raw.gc)?,
            metadata: metadata_config(&r, raw.metadata)?,
        })
    }
}

fn proxy_config(
    r: &Resolver,
    raw: Option<serde_yaml::Value>,
) -> Result<Vec<MirrorConfig>, ConfigError> {
    use serde_yaml::Value;
    let parse = |key: &str, v: Value| -> Result<RawMirror, ConfigError> {
        serde_yaml::from_value(v).map_err(|e| ConfigError::new(key, e.to_string()))
    };
    let raws: Vec<(String, RawMirror, bool)> = match raw {
        None | Some(Value::Null) => return Ok(Vec::new()),
        // distribution's form: the whole registry mirrors one upstream.
        Some(v @ Value::Mapping(_)) => vec![("proxy".to_string(), parse("proxy", v)?, false)],
        Some(Value::Sequence(items)) => items
            .into_iter()
            .enumerate()
            .map(|(i, v)| {
                let key = format!("proxy[{i}]");
                parse(&key, v).map(|m| (key, m, true))
            })
            .collect::<Result<_, _>>()?,
        Some(_) => {
            return Err(ConfigError::new(
                "proxy",
                "expected a list of mirrors or a mapping with remoteurl",
            ))
        }
    };
    let mut out: Vec<MirrorConfig> = Vec::with_capacity(raws.len());
    for (key, m, listed) in raws {
        let mut prefix = r
            .string(&format!("{key}.prefix"), m.prefix)?
            .unwrap_or_default();
        if listed && prefix.is_empty() {
            return Err(ConfigError::new(
                format!("{key}.prefix"),
                "required in the list form (e.g. dockerhub/)",
            ));
        }
        if !prefix.is_empty() && !prefix.ends_with('/') {
            prefix.push('/');
        }
        if prefix.starts_with('/') || prefix.contains("//") {
            return Err(ConfigError::new(
                format!("{key}.prefix"),
                "must be a repository path like dockerhub/",
            ));
        }
        if out.iter().any(|o| o.prefix == prefix) {
            return Err(ConfigError::new(
                format!("{key}.prefix"),
                format!("{prefix:?} is mirrored twice"),
            ));
        }
        let remote_url = required(
            &format!("{key}.remoteurl"),
            r.string(&format!("{key}.remoteurl"), m.remoteurl)?,
        )?;
        if !(remote_url.starts_with("http://") || remote_url.starts_with("https://"))
            || remote_url.parse::<http::Uri>().is_err()
        {
            return Err(ConfigError::new(
                format!("{key}.remoteurl"),
                "expected a URL starting with http:// or https://",
            ));
        }
        let username = r.string(&format!("{key}.username"), m.username)?;
        let password = r.string(&format!("{key}.password"), m.password)?;
        if password.is_some() && username.is_none() {
            return Err(ConfigError::new(
                format!("{key}.username"),
                "a password needs a username",
            ));
        }
        let ttl = r
            .duration(&format!("{key}.ttl"), m.ttl)?
            .unwrap_or(Duration::from_secs(600));
        out.push(MirrorConfig {
            prefix,
            remote_url,
            username,
            password,
            ttl,
        });
    }
    if out.len() > 1 && out.iter().any(|m| m.prefix.is_empty()) {
        return Err(ConfigError::new(
            "proxy",
            "a whole-registry mirror cannot have siblings",
        ));
    }
    Ok(out)
}

fn journal_config(r: &Resolver, raw: RawJournal) -> Result<JournalConfig, ConfigError> {
    let d = JournalConfig::default();
    let rebuild_concurrency = match r
        .string("journal.rebuild_concurrency", raw.rebuild_concurrency)?
    {
        Some(n) => n
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=1024).contains(n))
            .ok_or_else(|| ConfigError::new("journal.rebuild_concurrency", "expected 1 to 1024"))?,
        None => d.rebuild_concurrency,
    };
    Ok(JournalConfig {
        enabled: r.bool("journal.enabled", raw.enabled)?.unwrap_or(d.enabled),
        rebuild_concurrency,
    })
}

fn metadata_config(r: &Resolver, m: RawMetadata) -> Result<MetadataConfig, ConfigError> {
    let backend = r.string("metadata.backend", m.backend)?;
    match backend.as_deref() {
        None | Some("redb") => {
            if m.postgres.is_some() {
                return Err(ConfigError::new(
                    "metadata.postgres",
                    "set metadata.backend: postgres to use it",
                ));
            }
            Ok(MetadataConfig::Redb)
        }
        Some("postgres") => {
            let p = m.postgres.unwrap_or_default();
            let url = required(
                "metadata.postgres.url",
                r.string("metadata.postgres.url", p.url)?,
            )?;
            let max_connections =
                match r.string("metadata.postgres.max_connections", p.max_connections)? {
                    Some(n) => n.parse::<usize>().ok().filter(|n| *n >= 1).ok_or_else(|| {
                        ConfigError::new(
                            "metadata.postgres.max_connections",
                            "expected a whole number >= 1",
                        )
                    })?,
                    None => 16,
                };
            let statement_timeout = r
                .duration("metadata.postgres.statement_timeout", p.statement_timeout)?
                .unwrap_or(Duration::from_secs(10));
            let connect_timeout = r
                .duration("metadata.postgres.connect_timeout", p.connect_timeout)?
                .unwrap_or(Duration::from_secs(5));
            for (key, d) in [
                ("metadata.postgres.statement_timeout", statement_timeout),
                ("metadata.postgres.connect_timeout", connect_timeout),
            ] {
                if d < Duration::from_millis(1) {
                    return Err(ConfigError::new(key, "must be at least 1ms"));
                }
            }
            Ok(MetadataConfig::Postgres(PostgresConfig {
                url,
                max_connections,
                statement_timeout,
                connect_timeout,
                ca_bundle: r
                    .string("metadata.postgres.ca_bundle", p.ca_bundle)?
                    .map(PathBuf::from),
            }))
        }
        Some(other) => Err(ConfigError::new(
            "metadata.backend",
            format!("expected redb or postgres, got {other:?}"),
        )),
    }
}

fn required(key: &str, v: Option<String>) -> Result<String, ConfigError> {
    v.filter(|s| !s.is_empty())
        .ok_or_else(|| ConfigError::new(key, "required"))
}

fn tls_config(r: &Resolver, raw: Option<RawTls>) -> Result<Option<TlsConfig>, ConfigError> {
    let Some(t) = raw else { return Ok(None) };
    Ok(Some(TlsConfig {
        certificate: required(
            "tls.certificate",
            r.string("tls.certificate", t.certificate)?,
        )?
        .into(),
        key: required("tls.key", r.string("tls.key", t.key)?)?.into(),
        client_cas: r
            .list("tls.clientcas", t.clientcas)?
            .into_iter()
            .map(PathBuf::from)
            .collect(),
    }))
}

fn auth_config(r: &Resolver, raw: Option<serde_yaml::Value>) -> Result<AuthConfig, ConfigError> {
    use serde_yaml::Value;
    let raw: RawAuth = match raw {
        None | Some(Value::Null) => return Ok(AuthConfig::default()),
        Some(v @ Value::Mapping(_)) => {
            serde_yaml::from_value(v).map_err(|e| ConfigError::new("auth", e.to_string()))?
        }
        Some(v) => {
            return match r.string("auth", Some(v))?.as_deref() {
                Some("none") => Ok(AuthConfig::default()),
                _ => Err(ConfigError::new(
                    "auth",
                    "expected none, or a mapping with htpasswd or token",
                )),
            }
        }
    };
    let mode = match (raw.htpasswd, raw.token) {
        (Some(_), Some(_)) => {
            return Err(ConfigError::new(
                "auth",
                "configure one of auth.htpasswd and auth.token, not both",
            ))
        }
        (Some(h), None) => AuthMode::Htpasswd {
            realm: r
                .string("auth.htpasswd.realm", h.realm)?
                .unwrap_or_else(|| "berth".into()),
            path: required(
                "auth.htpasswd.path",
                r.string("auth.htpasswd.path", h.path)?,
            )?
            .into(),
        },
        (None, Some(t)) => AuthMode::Token {
            realm: required("auth.token.realm", r.string("auth.token.realm", t.realm)?)?,
            service: required(
                "auth.token.service",
                r.string("auth.token.service", t.service)?,
            )?,
            issuer: required(
                "auth.token.issuer",
                r.string("auth.token.issuer", t.issuer)?,
            )?,
            root_cert_bundle: required(
                "auth.token.rootcertbundle",
                r.string("auth.token.rootcertbundle", t.rootcertbundle)?,
            )?
            .into(),
        },
        (None, None) => AuthMode::None,
    };
    if let AuthMode::Htpasswd { realm, .. } | AuthMode::Token { realm, .. } = &mode {
        // The realm goes into a quoted header parameter.
        if realm.contains(['"', '\\']) || realm.chars().any(|c| c.is_control()) {
            return Err(ConfigError::new(
                "auth.realm",
                "must not contain quotes, backslashes or control characters",
            ));
        }
    }
    let anonymous_pull = r.list("auth.anonymous_pull", raw.anonymous_pull)?;
    for p in &anonymous_pull {
        let ok = !p.is_empty()
            && p.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-/*".contains(&b));
        if !ok {
            return Err(ConfigError::new(
                "auth.anonymous_pull",
                format!("{p:?} is not a repository pattern (lower-case name characters and *)"),
            ));
        }
    }
    if !anonymous_pull.is_empty() && mode == AuthMode::None {
        return Err(ConfigError::new(
            "auth.anonymous_pull",
            "needs auth.htpasswd or auth.token (without auth everyone may pull already)",
        ));
    }
    Ok(AuthConfig {
        mode,
        anonymous_pull,
    })
}

fn limits_config(r: &Resolver, l: RawLimits) -> Result<LimitsConfig, ConfigError> {
    let d = LimitsConfig::default();
    let max_blob_size = r.size("limits.max_blob_size", l.max_blob_size)?;
    if max_blob_size == Some(0) {
        return Err(ConfigError::new("limits.max_blob_size", "must be above 0"));
    }
    let max_concurrent_uploads =
        match r.string("limits.max_concurrent_uploads", l.max_concurrent_uploads)? {
            None => None,
            Some(n) => Some(n.parse::<usize>().ok().filter(|n| *n >= 1).ok_or_else(|| {
                ConfigError::new(
                    "limits.max_concurrent_uploads",
                    "expected a whole number >= 1",
                )
            })?),
        };
    let max_header_bytes = r
        .size("limits.max_header_bytes", l.max_header_bytes)?
        .map_or(d.max_header_bytes, |n| n as usize);
    if !(1024..=1024 * 1024).contains(&max_header_bytes) {
        return Err(ConfigError::new(
            "limits.max_header_bytes",
            "must be between 1KiB and 1MiB (pingora's own limit)",
        ));
    }
    let read_timeout = r
        .duration("limits.read_timeout", l.read_timeout)?
        .unwrap_or(d.read_timeout);
    let idle_timeout = r
        .duration("limits.idle_timeout", l.idle_timeout)?
        .unwrap_or(d.idle_timeout);
    for (key, v) in [
        ("limits.read_timeout", read_timeout),
        ("limits.idle_timeout", idle_timeout),
    ] {
        if v < Duration::from_secs(1) {
            return Err(ConfigError::new(key, "must be at least 1s"));
        }
    }
    Ok(LimitsConfig {
        max_blob_size,
        max_concurrent_uploads,
        max_header_bytes,
        read_timeout,
        idle_timeout,
    })
}

fn gc_config(r: &Resolver, raw: RawGc) -> Result<GcConfig, ConfigError> {
    let d = GcConfig::default();
    let interval = r.duration("gc.interval", raw.interval)?;
    if interval.is_some_and(|i| i.is_zero()) {
        return Err(ConfigError::new("gc.interval", "must be more than 0"));
    }
    let untagged_manifests = match r
        .string("gc.untagged_manifests", raw.untagged_manifests)?
        .as_deref()
    {
        None | Some("keep") => UntaggedManifests::Keep,
        Some("delete") => UntaggedManifests::Delete,
        Some(other) => {
            return Err(ConfigError::new(
                "gc.untagged_manifests",
                format!("expected keep or delete, got {other:?}"),
            ))
        }
    };
    let regex = |key: &str, v| -> Result<Option<regex::Regex>, ConfigError> {
        r.string(key, v)?
            .map(|s| {
                // Anchored: `v1.*` means tags that start (and end) as written.
                regex::Regex::new(&format!("^(?:{s})$"))
                    .map_err(|e| ConfigError::new(key, format!("not a regular expression: {e}")))
            })
            .transpose()
    };
    let mut retention = Vec::new();
    for (i, rule) in raw.retention.into_iter().enumerate() {
        let key = |k: &str| format!("gc.retention[{i}].{k}");
        let keep_last = match r.string(&key("keep_last"), rule.keep_last)? {
            None => None,
            Some(n) => Some(
                n.parse::<usize>()
                    .map_err(|_| ConfigError::new(key("keep_last"), "expected a whole number"))?,
            ),
        };
        let older_than = r.duration(&key("older_than"), rule.older_than)?;
        if keep_last.is_none() && older_than.is_none() {
            return Err(ConfigError::new(
                key("keep_last"),
                "a rule needs keep_last, older_than or both",
            ));
        }
        retention.push(RetentionRule {
            repositories: required(
                &key("repositories"),
                r.string(&key("repositories"), rule.repositories)?,
            )?,
            tags: regex(&key("tags"), rule.tags)?,
            keep_last,
            older_than,
            keep: regex(&key("keep"), rule.keep)?,
        });
    }
    Ok(GcConfig {
        interval,
        blob_grace: r
            .duration("gc.blob_grace", raw.blob_grace)?
            .unwrap_or(d.blob_grace),
        untagged_manifests,
        untagged_grace: r
            .duration("gc.untagged_grace", raw.untagged_grace)?
            .unwrap_or(d.untagged_grace),
        retention,
    })
}

/// Turns raw YAML scalars into typed values, resolving `_env:NAME` first.
struct Resolver<'a> {
    env: &'a dyn Fn(&str) -> Option<String>,
}

impl Resolver<'_> {
    fn string(
        &self,
        key: &str,
        value: Option<serde_yaml::Value>,
    ) -> Result<Option<String>, ConfigError> {
        use serde_yaml::Value;
        let text = match value {
            None | Some(Value::Null) => return Ok(None),
            Some(Value::String(s)) => s,
            Some(Value::Bool(b)) => b.to_string(),
            Some(Value::Number(n)) => n.to_string(),
            Some(_) => return Err(ConfigError::new(key, "expected a single value")),
        };
        match text.strip_prefix("_env:") {
            Some(name) => match (self.env)(name) {
                Some(v) => Ok(Some(v)),
                None => Err(ConfigError::new(
                    key,
                    format!("environment variable {name} is not set"),
                )),
            },
            None => Ok(Some(text)),
        }
    }

    /// A list of scalars, or one scalar as a list of one.
    fn list(
        &self,
        key: &str,
        value: Option<serde_yaml::Value>,
    ) -> Result<Vec<String>, ConfigError> {
        match value {
            Some(serde_yaml::Value::Sequence(items)) => items
                .into_iter()
                .map(|v| self.string(key, Some(v)).map(Option::unwrap_or_default))
                .collect(),
            other => Ok(self.string(key, other)?.into_iter().collect()),
        }
    }

    fn bool(
        &self,
        key: &str,
        value: Option<serde_yaml::Value>,
    ) -> Result<Option<bool>, ConfigError> {
        match self.string(key, value)?.as_deref() {
            None => Ok(None),
            Some("true") => Ok(Some(true)),
            Some("false") => Ok(Some(false)),
            Some(other) => Err(ConfigError::new(
                key,
                format!("expected true or false, got {other:?}"),
            )),
        }
    }

    fn duration(
        &self,
        key: &str,
        value: Option<serde_yaml::Value>,
    ) -> Result<Option<Duration>, ConfigError> {
        match self.string(key, value)? {
            None => Ok(None),
            Some(s) => humantime::parse_duration(&s).map(Some).map_err(|e| {
                ConfigError::new(key, format!("expected a duration like 15m or 24h: {e}"))
            }),
        }
    }

    fn size(
        &self,
        key: &str,
        value: Option<serde_yaml::Value>,
    ) -> Result<Option<u64>, ConfigError> {
        match self.string(key, value)? {
            None => Ok(None),
            Some(s) => parse_size(&s).map(Some).ok_or_else(|| {
                ConfigError::new(key, format!("expected a size like 8MiB, got {s:?}"))
            }),
        }
    }
}

/// Parses `8MiB`, `8MB` (decimal), `5242880`, `512KiB`, `1GiB`.
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" | "Ki" => 1 << 10,
        "MiB" | "Mi" => 1 << 20,
        "GiB" | "Gi" => 1 << 30,
        "KB" | "K" | "k" => 1_000,
        "MB" | "M" => 1_000_000,
        "GB" | "G" => 1_000_000_000,
        _ => return None,
    };
    n.checked_mul(mult)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn defaults_are_embedded_localhost() {
        let c = Config::from_yaml("", &Overrides::default(), &no_env).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:5000");
        assert_eq!(c.data_dir, PathBuf::from("./data"));
        assert!(c.storage.endpoint.is_none());
        assert_eq!(c.upload.part_size, 8 << 20);
        assert_eq!(c.upload.buffer_budget, 256 << 20);
        assert_eq!(c.upload.transfer_nice, 19);
        assert_eq!(c.storage.blob_serving, BlobServing::Proxy);
        assert_eq!(c.storage.presign_ttl, Duration::from_secs(900));
        assert!(c.journal.enabled);
        assert_eq!(c.journal.rebuild_concurrency, 32);
    }

    #[test]
    fn journal_section() {
        let yaml = "journal:\n  enabled: false\n  rebuild_concurrency: 8\n";
        let c = Config::from_yaml(yaml, &Overrides::default(), &no_env).unwrap();
        assert!(!c.journal.enabled);
        assert_eq!(c.journal.rebuild_concurrency, 8);
        let yaml = "journal:\n  rebuild_concurrency: 0\n";
        let e = Config::from_yaml(yaml, &Overrides::default(), &no_env).unwrap_err();
        assert_eq!(e.key, "journal.rebuild_concurrency");
    }

    #[test]
    fn proxy_list_and_distribution_forms() {
        let yaml = "proxy:\n  - prefix: hub\n    remoteurl: https://registry-1.docker.io\n    username: u\n    password: _env:PW\n    ttl: 5m\n  - prefix: ghcr/\n    remoteurl: https://ghcr.io\n";
        let env = |n: &str| (n == "PW").then(|| "hunter2-pw".to_string());
        let c = Config::from_yaml(yaml, &Overrides::default(), &env).unwrap();
        assert_eq!(c.proxy.len(), 2);
        assert_eq!(c.proxy[0].prefix, "hub/");
        assert_eq!(c.proxy[0].password.as_deref(), Some("hunter2-pw"));
        assert_eq!(c.proxy[0].ttl, Duration::from_secs(300));
        assert_eq!(c.proxy[1].ttl, Duration::from_secs(600));
        assert!(
            !format!("{c:?}").contains("hunter2-pw"),
            "password in Debug output"
        );

        let c = Config::from_yaml(
            "proxy:\n  remoteurl: http://127.0.0.1:5001\n",
            &Overrides::default(),
            &no_env,
        )
        .unwrap();
        assert_eq!(c.proxy[0].prefix, "");

        for (bad, key) in [
            ("proxy:\n  - remoteurl: https://x.test\n", "proxy[0].prefix"),
            ("proxy:\n  - prefix: a/\n    remoteurl: ftp://x\n", "proxy[0].remoteurl"),
            ("proxy:\n  - prefix: a/\n    remoteurl: https://x.test\n  - prefix: a\n    remoteurl: https://y.test\n", "proxy[1].prefix"),
            ("proxy:\n  - prefix: a/\n    remoteurl: https://x.test\n    password: p\n", "proxy[0].username"),
            ("proxy: 3\n", "proxy"),
        ] {
            let e = Config::from_yaml(bad, &Overrides::default(), &no_env).unwrap_err();
            assert_eq!(e.key, key, "{bad}: {e}");
        }
    }

    #[test]
    fn env_indirection_resolves_and_missing_env_names_the_key() {
        let yaml = "storage:\n  endpoint: http://127.0.0.1:3900\n  access_key: _env:AK\n  secret_key: _env:SK\n";
        let env = |n: &str| match n {
            "AK" => Some("ak1".to_string()),
            "SK" => Some("sk1".to_string()),
            _ => None,
        };
        let c = Config::from_yaml(yaml, &Overrides::default(), &env).unwrap();
        assert_eq!(c.storage.access_key, "ak1");
        assert_eq!(c.storage.secret_key, "sk1");
        let err = Config::from_yaml(yaml, &Overrides::default(), &no_env).unwrap_err();
        assert_eq!(err.key, "storage.access_key");
        assert!(err.message.contains("AK"), "{err}");
    }

    #[test]
    fn env_works_for_non_string_values() {
        let yaml = "upload:\n  part_size: _env:PS\nstorage:\n  path_style: _env:PSTYLE\n";
        let env = |n: &str| match n {
            "PS" => Some("16MiB".to_string()),
            "PSTYLE" => Some("false".to_string()),
            _ => None,
        };
        let c = Config::from_yaml(yaml, &Overrides::default(), &env).unwrap();
        assert_eq!(c.upload.part_size, 16 << 20);
        assert!(!c.storage.path_style);
    }

    #[test]
    fn unknown_keys_fail_naming_the_key() {
        let err = Config::from_yaml("storage:\n  bukket: x\n", &Overrides::default(), &no_env)
            .unwrap_err();
        assert!(err.to_string().contains("bukket"), "{err}");
        let err = Config::from_yaml("lisen: x\n", &Overrides::default(), &no_env).unwrap_err();
        assert!(err.to_string().contains("lisen"), "{err}");
    }

    #[test]
    fn bad_values_fail_naming_the_key() {
        let cases = [
            ("upload:\n  part_size: 1MiB\n", "upload.part_size"),
            ("upload:\n  part_size: lots\n", "upload.part_size"),
            (
                "upload:\n  part_size: 16MiB\n  buffer_budget: 8MiB\n",
                "upload.buffer_budget",
            ),
            (
                "storage:\n  blob_serving: teleport\n",
                "storage.blob_serving",
            ),
            ("storage:\n  presign_ttl: soon\n", "storage.presign_ttl"),
            ("listen: nowhere\n", "listen"),
            ("storage:\n  endpoint: ftp://x\n", "storage.endpoint"),
            (
                "storage:\n  endpoint: http://127.0.0.1:1\n",
                "storage.access_key",
            ),
            ("threads: 0\n", "threads"),
            ("upload:\n  transfer_nice: 20\n", "upload.transfer_nice"),
            ("upload:\n  transfer_nice: -5\n", "upload.transfer_nice"),
            ("log_format: xml\n", "log_format"),
            ("metrics:\n  listen: here\n", "metrics.listen"),
        ];
        for (yaml, key) in cases {
            let err = Config::from_yaml(yaml, &Overrides::default(), &no_env).unwrap_err();
            assert_eq!(err.key, key, "{yaml}: {err}");
        }
    }

    #[test]
    fn gc_section_parses_and_checks_its_values() {
        let c = Config::from_yaml("", &Overrides::default(), &no_env).unwrap();
        assert_eq!(c.gc.interval, None);
        assert_eq!(c.gc.blob_grace, Duration::from_secs(86400));
        assert_eq!(c.gc.untagged_manifests, UntaggedManifests::Keep);
        let yaml = "gc:\n  interval: 10m\n  blob_grace: 2h\n  untagged_manifests: delete\n  untagged_grace: 1h\n  retention:\n    - repositories: \"ci/*\"\n      tags: \"pr-.*\"\n      keep_last: 3\n      older_than: 7d\n      keep: \"release\"\n";
        let c = Config::from_yaml(yaml, &Overrides::default(), &no_env).unwrap();
        assert_eq!(c.gc.interval, Some(Duration::from_secs(600)));
        assert_eq!(c.gc.untagged_manifests, UntaggedManifests::Delete);
        let r = &c.gc.retention[0];
        assert_eq!((r.repositories.as_str(), r.keep_last), ("ci/*", Some(3)));
        assert_eq!(r.older_than, Some(Duration::from_secs(7 * 86400)));
        // Anchored: the whole tag must match.
        let tags = r.tags.as_ref().unwrap();
        assert!(tags.is_match("pr-12") && !tags.is_match("xpr-12"));
        assert!(!r.keep.as_ref().unwrap().is_match("release-1"));
        let cases = [
            ("gc:\n  interval: 0s\n", "gc.interval"),
            (
                "gc:\n  untagged_manifests: maybe\n",
                "gc.untagged_manifests",
            ),
            ("gc:\n  blob_grace: soon\n", "gc.blob_grace"),
            (
                "gc:\n  retention:\n    - repositories: x\n",
                "gc.retention[0].keep_last",
            ),
            (
                "gc:\n  retention:\n    - repositories: x\n      keep_last: 1\n      tags: \"(\"\n",
                "gc.retention[0].tags",
            ),
            (
                "gc:\n  retention:\n    - keep_last: 1\n",
                "gc.retention[0].repositories",
            ),
        ];
        for (yaml, key) in cases {
            let err = Config::from_yaml(yaml, &Overrides::default(), &no_env).unwrap_err();
            assert_eq!(err.key, key, "{yaml}: {err}");
        }
    }

    #[test]
    fn overrides_win_over_the_file() {
        let o = Overrides {
            listen: Some("127.0.0.1:6000".parse().unwrap()),
            data_dir: Some("/tmp/x".into()),
        };
        let c = Config::from_yaml("listen: 127.0.0.1:5000\ndata_dir: /y\n", &o, &no_env).unwrap();
        assert_eq!(c.listen.port(), 6000);
        assert_eq!(c.data_dir, PathBuf::from("/tmp/x"));
    }

    #[test]
    fn secrets_do_not_reach_debug_output() {
        let yaml = "storage:\n  endpoint: http://127.0.0.1:3900\n  access_key: AKIDSECRET\n  secret_key: verysecret\n";
        let c = Config::from_yaml(yaml, &Overrides::default(), &no_env).unwrap();
        let dbg = format!("{c:?}");
        assert!(
            !dbg.contains("verysecret") && !dbg.contains("AKIDSECRET"),
            "{dbg}"
        );
    }

    #[test]
    fn security_sections_default_to_off() {
        let c = Config::from_yaml("", &Overrides::default(), &no_env).unwrap();
        assert!(c.tls.is_none());
        assert_eq!(c.auth.mode, AuthMode::None);
        assert!(c.limits.max_blob_size.is_none());
        assert!(c.limits.max_concurrent_uploads.is_none());
        assert!(c.storage.ca_bundle.is_none());
        let c = Config::from_yaml("auth: none\n", &Overrides::default(), &no_env).unwrap();
        assert_eq!(c.auth.mode, AuthMode::None);
    }

    #[test]
    fn security_sections_parse() {
        let yaml = "tls:\n  certificate: /c.pem\n  key: _env:KEY\n  clientcas: [/ca1.pem, /ca2.pem]\n\
                    auth:\n  htpasswd:\n    realm: reg\n    path: /h\n  anonymous_pull: [\"public/*\", lib]\n\
                    limits:\n  max_blob_size: 1GiB\n  max_concurrent_uploads: 4\n  max_header_bytes: 16KiB\n  read_timeout: 30s\n  idle_timeout: 5s\n\
                    storage:\n  ca_bundle: /ca.pem\n";
        let env = |n: &str| (n == "KEY").then(|| "/k.pem".to_string());
        let c = Config::from_yaml(yaml, &Overrides::default(), &env).unwrap();
        let tls = c.tls.unwrap();
        assert_eq!(tls.key, PathBuf::from("/k.pem"));
        assert_eq!(tls.client_cas.len(), 2);
        assert_eq!(
            c.auth.mode,
            AuthMode::Htpasswd {
                realm: "reg".into(),
                path: "/h".into()
            }
        );
        assert_eq!(c.auth.anonymous_pull, vec!["public/*", "lib"]);
        assert_eq!(c.limits.max_blob_size, Some(1 << 30));
        assert_eq!(c.limits.max_concurrent_uploads, Some(4));
        assert_eq!(c.limits.max_header_bytes, 16 << 10);
        assert_eq!(c.limits.read_timeout, Duration::from_secs(30));
        assert_eq!(c.limits.idle_timeout, Duration::from_secs(5));
        assert_eq!(c.storage.ca_bundle, Some(PathBuf::from("/ca.pem")));

        let yaml = "auth:\n  token:\n    realm: https://auth/token\n    service: reg\n    issuer: iss\n    rootcertbundle: /b.pem\n";
        let c = Config::from_yaml(yaml, &Overrides::default(), &no_env).unwrap();
        assert!(matches!(c.auth.mode, AuthMode::Token { ref service, .. } if service == "reg"));
        // One client CA may be given as a plain string.
        let c = Config::from_yaml(
            "tls:\n  certificate: c\n  key: k\n  clientcas: /ca.pem\n",
            &Overrides::default(),
            &no_env,
        )
        .unwrap();
        assert_eq!(c.tls.unwrap().client_cas, vec![PathBuf::from("/ca.pem")]);
    }

    #[test]
    fn bad_security_values_fail_naming_the_key() {
        let cases = [
            ("tls:\n  key: k\n", "tls.certificate"),
            ("tls:\n  certificate: c\n", "tls.key"),
            ("auth: basic\n", "auth"),
            ("auth:\n  htpasswd:\n    realm: r\n", "auth.htpasswd.path"),
            ("auth:\n  htpasswd:\n    path: p\n    relm: r\n", "auth"),
            (
                "auth:\n  token:\n    realm: r\n    service: s\n    issuer: i\n",
                "auth.token.rootcertbundle",
            ),
            (
                "auth:\n  htpasswd:\n    path: p\n  token:\n    realm: r\n",
                "auth",
            ),
            (
                "auth:\n  htpasswd:\n    path: p\n    realm: 'a\"b'\n",
                "auth.realm",
            ),
            (
                "auth:\n  htpasswd:\n    path: p\n  anonymous_pull: [\"Public/*\"]\n",
                "auth.anonymous_pull",
            ),
            (
                "auth:\n  anonymous_pull: [\"a/*\"]\n",
                "auth.anonymous_pull",
            ),
            ("limits:\n  max_blob_size: 0\n", "limits.max_blob_size"),
            ("limits:\n  max_blob_size: huge\n", "limits.max_blob_size"),
            (
                "limits:\n  max_concurrent_uploads: 0\n",
                "limits.max_concurrent_uploads",
            ),
            (
                "limits:\n  max_header_bytes: 10\n",
                "limits.max_header_bytes",
            ),
            ("limits:\n  read_timeout: 0s\n", "limits.read_timeout"),
            ("limits:\n  idle_timeout: x\n", "limits.idle_timeout"),
        ];
        for (yaml, key) in cases {
            let err = Config::from_yaml(yaml, &Overrides::default(), &no_env).unwrap_err();
            assert_eq!(err.key, key, "{yaml}: {err}");
        }
    }

    #[test]
    fn metadata_section() {
        let c = Config::from_yaml("", &Overrides::default(), &no_env).unwrap();
        assert!(matches!(c.metadata, MetadataConfig::Redb));
        let yaml = "metadata:\n  backend: postgres\n  postgres:\n    url: _env:PGURL\n    max_connections: 4\n    statement_timeout: 2s\n    ca_bundle: /ca.pem\n";
        let env = |n: &str| {
            (n == "PGURL")
                .then(|| "postgres://berth:s3cret@db:5432/berth?sslmode=verify-full".into())
        };
        let c = Config::from_yaml(yaml, &Overrides::default(), &env).unwrap();
        let MetadataConfig::Postgres(p) = &c.metadata else {
            panic!("{:?}", c.metadata)
        };
        assert_eq!(
            p.url,
            "postgres://berth:s3cret@db:5432/berth?sslmode=verify-full"
        );
        assert_eq!(p.max_connections, 4);
        assert_eq!(p.statement_timeout, Duration::from_secs(2));
        assert_eq!(p.connect_timeout, Duration::from_secs(5));
        assert_eq!(p.ca_bundle.as_deref(), Some(Path::new("/ca.pem")));
        let debug = format!("{c:?}");
        assert!(!debug.contains("s3cret"), "{debug}");
        assert!(debug.contains("postgres://berth:<redacted>@db:5432/berth?sslmode=verify-full"));

        for (yaml, key) in [
            ("metadata:\n  backend: mysql\n", "metadata.backend"),
            ("metadata:\n  backend: postgres\n", "metadata.postgres.url"),
            (
                "metadata:\n  backend: postgres\n  postgres:\n    url: x\n    max_connections: 0\n",
                "metadata.postgres.max_connections",
            ),
            (
                "metadata:\n  postgres:\n    url: postgres://h/db\n",
                "metadata.postgres",
            ),
        ] {
            let err = Config::from_yaml(yaml, &Overrides::default(), &no_env).unwrap_err();
            assert_eq!(err.key, key, "{yaml}: {err}");
        }
    }

    #[test]
    fn passwords_are_redacted_in_both_url_forms() {
        for (url, want) in [
            ("postgres://u:p@h/db", "postgres://u:<redacted>@h/db"),
            (
                "postgresql://u:p%40ss@h:5/db?sslmode=require",
                "postgresql://u:<redacted>@h:5/db?sslmode=require",
            ),
            (
                "postgres://u@h/db?password=p&sslmode=require",
                "postgres://u@h/db?password=<redacted>&sslmode=require",
            ),
            (
                "host=h user=u password=p dbname=d",
                "host=h user=u password=<redacted> dbname=d",
            ),
            ("postgres://h/db", "postgres://h/db"),
        ] {
            assert_eq!(redact_password(url), want);
        }
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("8MiB"), Some(8 << 20));
        assert_eq!(parse_size("5242880"), Some(5 << 20));
        assert_eq!(parse_size("1GiB"), Some(1 << 30));
        assert_eq!(parse_size("10MB"), Some(10_000_000));
        assert_eq!(parse_size("x"), None);
    }
}
