//! Test harness: runs the real `berth` binary on a loopback port, against its embedded object
//! store or a separate S3 server (s3s-fs) started in the test process, and talks to it over
//! real HTTP.
//!
//! Metadata backend: redb unless `BERTH_TEST_METADATA=postgres`, which gives every berth
//! started here (without a `metadata:` section of its own) a fresh database on a real
//! PostgreSQL server ([`pg::PgServer::shared`]): the same tests run on both backends.
//!
//! Object store: a berth started without an S3 server of the test's own runs on its embedded
//! default, the local store under its data dir, unless `BERTH_TEST_STORAGE=s3`, which gives
//! every such berth (whose config names no `endpoint:`) an S3 server of its own
//! ([`S3Server::start`]): the same tests run on both object-store backends.
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
use std::sync::{Arc, Mutex};
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
    /// The request log of a server from [`S3Server::start_for_distribution`].
    operations: Option<Arc<Mutex<Vec<S3Op>>>>,
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
            operations: None,
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

// ---------------------------------------------------------------------------------------------
// An S3 server CNCF distribution's S3 driver can write to

/// One request an [`S3Server::start_for_distribution`] server served: the S3 operation's
/// name (`PutObject`, `CopyObject`, `UploadPart`...) and the key (or bucket) it named.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct S3Op {
    pub op: String,
    pub key: String,
}

impl S3Server {
    /// An S3 server that CNCF distribution 2.8.2's S3 driver (`storage.s3`) can store into:
    /// s3s-fs as [`S3Server::start`] runs it, plus what that driver needs and s3s-fs 0.14.1
    /// lacks (`for_distribution::ForDistribution`): ListMultipartUploads, which distribution
    /// calls to resume every blob upload (each PATCH and the final PUT; s3s-fs answers 501
    /// NotImplemented, distribution 500), a ListParts it can read, and PUTs of long keys. It
    /// counts requests as [`S3Server::start`] does and logs each one
    /// ([`S3Server::operations`]).
    pub fn start_for_distribution() -> S3Server {
        use s3s::auth::SimpleAuth;
        use s3s::service::S3ServiceBuilder;

        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join(S3_BUCKET)).unwrap();
        let requests = Arc::new(AtomicU64::new(0));
        let writes_refused = Arc::new(AtomicBool::new(false));
        let operations = Arc::new(Mutex::new(Vec::new()));
        let service = {
            let mut b = S3ServiceBuilder::new(for_distribution::ForDistribution {
                fs: s3s_fs::FileSystem::new(root.path()).unwrap(),
                root: root.path().to_path_buf(),
            });
            b.set_auth(SimpleAuth::from_single(S3_ACCESS_KEY, S3_SECRET_KEY));
            b.set_access(for_distribution::Recorder {
                requests: requests.clone(),
                operations: operations.clone(),
                writes_refused: writes_refused.clone(),
            });
            b.build()
        };
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        std::thread::spawn(move || {
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                let builder = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                );
                while let Ok((socket, _)) = listener.accept().await {
                    let _ = socket.set_nodelay(true);
                    let conn = builder
                        .serve_connection(hyper_util::rt::TokioIo::new(socket), service.clone())
                        .into_owned();
                    tokio::spawn(conn);
                }
            })
        });
        S3Server {
            endpoint,
            requests,
            root,
            writes_refused,
            operations: Some(operations),
        }
    }

    /// Every request served so far, in order (a server from
    /// [`S3Server::start_for_distribution`] only).
    pub fn operations(&self) -> Vec<S3Op> {
        self.operations
            .as_ref()
            .expect("only a server from S3Server::start_for_distribution logs operations")
            .lock()
            .unwrap()
            .clone()
    }
}

/// The S3 service of [`S3Server::start_for_distribution`].
mod for_distribution {
    use super::*;
    use s3s::dto::*;
    use s3s::{S3Request, S3Response, S3Result};

    /// s3s-fs, plus ListMultipartUploads over s3s-fs's own files, ListParts as distribution
    /// reads it, and PutObject of long keys. Every other operation is s3s-fs's, unchanged.
    ///
    /// ListMultipartUploads: s3s-fs keeps an open multipart upload as `root/.upload-<id>.json` and, from
    /// CreateMultipartUpload until Complete or Abort, its object attributes in
    /// `root/.bucket-<base64 bucket>.object-<base64 key>.upload-<id>.metadata.json`: those name
    /// every open upload's bucket and key, which is all ListMultipartUploads answers (one page,
    /// in key then upload id order; no delimiter or markers, which distribution does not send).
    ///
    /// PutObject: s3s-fs names two side files of every object (attributes, checksum) after the
    /// base64 of its bucket and key, in `root` itself, and fails the PUT (InternalError, once
    /// the object is written) when that name exceeds 255 bytes (in bucket `registry`: keys over 160 bytes), as
    /// distribution's tag link of a cosign-style tag (`.../_manifests/tags/sha256-<hex>.sig/
    /// index/sha256/<hex>/link`, 222 bytes here). For such a key the object is stored alone,
    /// as s3s-fs serves one without side files (ETag: the MD5 of its bytes; no content type
    /// or user metadata, which distribution does not set on links).
    ///
    /// ListParts: s3s-fs leaves out IsTruncated, which distribution dereferences (a nil pointer
    /// panic: distribution's handler dies, skopeo's upload fails), and lists parts in directory
    /// order, where distribution takes the last one listed as the last part.
    pub(super) struct ForDistribution {
        pub(super) fs: s3s_fs::FileSystem,
        pub(super) root: PathBuf,
    }

    #[async_trait::async_trait]
    impl s3s::S3 for ForDistribution {
        async fn list_multipart_uploads(
            &self,
            req: S3Request<ListMultipartUploadsInput>,
        ) -> S3Result<S3Response<ListMultipartUploadsOutput>> {
            use base64::Engine as _;
            let input = req.input;
            let prefix = input.prefix.unwrap_or_default();
            let decode = |s: &str| {
                let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .decode(s)
                    .ok()?;
                String::from_utf8(bytes).ok()
            };
            let mut uploads = Vec::new();
            let entries =
                std::fs::read_dir(&self.root).map_err(|e| s3s::s3_error!(e, InternalError))?;
            for entry in entries.flatten() {
                let name = entry.file_name();
                let Some(name) = name.to_str() else { continue };
                let Some((bucket, key, id)) = name
                    .strip_prefix(".bucket-")
                    .and_then(|r| r.strip_suffix(".metadata.json"))
                    .and_then(|r| r.split_once(".object-"))
                    .and_then(|(b, r)| r.split_once(".upload-").map(|(k, id)| (b, k, id)))
                else {
                    continue;
                };
                let (Some(bucket), Some(key)) = (decode(bucket), decode(key)) else {
                    continue;
                };
                let open = self.root.join(format!(".upload-{id}.json")).exists();
                if bucket == input.bucket && key.starts_with(&prefix) && open {
                    uploads.push(MultipartUpload {
                        key: Some(key),
                        upload_id: Some(id.to_string()),
                        initiated: entry
                            .metadata()
                            .and_then(|m| m.modified())
                            .ok()
                            .map(Timestamp::from),
                        ..Default::default()
                    });
                }
            }
            uploads.sort_by(|a, b| (&a.key, &a.upload_id).cmp(&(&b.key, &b.upload_id)));
            Ok(S3Response::new(ListMultipartUploadsOutput {
                bucket: Some(input.bucket),
                prefix: Some(prefix),
                is_truncated: Some(false),
                uploads: Some(uploads),
                ..Default::default()
            }))
        }

        async fn list_parts(
            &self,
            req: S3Request<ListPartsInput>,
        ) -> S3Result<S3Response<ListPartsOutput>> {
            let mut r = self.fs.list_parts(req).await?;
            if let Some(parts) = &mut r.output.parts {
                parts.sort_by_key(|p| p.part_number);
            }
            r.output.is_truncated = Some(false);
            Ok(r)
        }

        async fn create_bucket(
            &self,
            req: S3Request<CreateBucketInput>,
        ) -> S3Result<S3Response<CreateBucketOutput>> {
            self.fs.create_bucket(req).await
        }

        async fn copy_object(
            &self,
            req: S3Request<CopyObjectInput>,
        ) -> S3Result<S3Response<CopyObjectOutput>> {
            self.fs.copy_object(req).await
        }

        async fn delete_bucket(
            &self,
            req: S3Request<DeleteBucketInput>,
        ) -> S3Result<S3Response<DeleteBucketOutput>> {
            self.fs.delete_bucket(req).await
        }

        async fn delete_object(
            &self,
            req: S3Request<DeleteObjectInput>,
        ) -> S3Result<S3Response<DeleteObjectOutput>> {
            self.fs.delete_object(req).await
        }

        async fn delete_objects(
            &self,
            req: S3Request<DeleteObjectsInput>,
        ) -> S3Result<S3Response<DeleteObjectsOutput>> {
            self.fs.delete_objects(req).await
        }

        async fn get_bucket_location(
            &self,
            req: S3Request<GetBucketLocationInput>,
        ) -> S3Result<S3Response<GetBucketLocationOutput>> {
            self.fs.get_bucket_location(req).await
        }

        async fn get_object(
            &self,
            req: S3Request<GetObjectInput>,
        ) -> S3Result<S3Response<GetObjectOutput>> {
            self.fs.get_object(req).await
        }

        async fn head_bucket(
            &self,
            req: S3Request<HeadBucketInput>,
        ) -> S3Result<S3Response<HeadBucketOutput>> {
            self.fs.head_bucket(req).await
        }

        async fn head_object(
            &self,
            req: S3Request<HeadObjectInput>,
        ) -> S3Result<S3Response<HeadObjectOutput>> {
            self.fs.head_object(req).await
        }

        async fn list_buckets(
            &self,
            req: S3Request<ListBucketsInput>,
        ) -> S3Result<S3Response<ListBucketsOutput>> {
            self.fs.list_buckets(req).await
        }

        async fn list_objects(
            &self,
            req: S3Request<ListObjectsInput>,
        ) -> S3Result<S3Response<ListObjectsOutput>> {
            self.fs.list_objects(req).await
        }

        async fn list_objects_v2(
            &self,
            req: S3Request<ListObjectsV2Input>,
        ) -> S3Result<S3Response<ListObjectsV2Output>> {
            self.fs.list_objects_v2(req).await
        }

        async fn put_object(
            &self,
            req: S3Request<PutObjectInput>,
        ) -> S3Result<S3Response<PutObjectOutput>> {
            use base64::Engine as _;
            use futures_util::StreamExt as _;
            use s3s::crypto::Checksum as _;
            let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
            let input = &req.input;
            let side_file = format!(
                ".bucket-{}.object-{}.metadata.json",
                b64(&input.bucket),
                b64(&input.key)
            );
            if side_file.len() <= 255 {
                return self.fs.put_object(req).await;
            }
            if input.if_match.is_some() || input.if_none_match.is_some() {
                return Err(s3s::s3_error!(
                    NotImplemented,
                    "conditional PUT of a long key"
                ));
            }
            let key = Path::new(&input.key);
            if key.is_absolute() || key.components().any(|c| c.as_os_str() == "..") {
                return Err(s3s::s3_error!(InvalidArgument, "key outside the bucket"));
            }
            let path = self.root.join(&input.bucket).join(key);
            let mut body = req
                .input
                .body
                .ok_or_else(|| s3s::s3_error!(IncompleteBody))?;
            let mut bytes = Vec::new();
            while let Some(chunk) = body.next().await {
                bytes.extend_from_slice(&chunk.map_err(|e| s3s::s3_error!(IncompleteBody, "{e}"))?);
            }
            // As s3s-fs writes: a temporary file (a name its start-up sweep removes), renamed.
            let tmp = self
                .root
                .join(format!(".tmp.long-{}.internal.part", uuid::Uuid::new_v4()));
            let written = std::fs::create_dir_all(path.parent().unwrap())
                .and_then(|()| std::fs::write(&tmp, &bytes))
                .and_then(|()| std::fs::rename(&tmp, &path));
            written.map_err(|e| s3s::s3_error!(e, InternalError))?;
            let mut md5 = s3s::crypto::Md5::new();
            md5.update(&bytes);
            Ok(S3Response::new(PutObjectOutput {
                e_tag: Some(ETag::Strong(hex::encode(md5.finalize()))),
                ..Default::default()
            }))
        }

        async fn create_multipart_upload(
            &self,
            req: S3Request<CreateMultipartUploadInput>,
        ) -> S3Result<S3Response<CreateMultipartUploadOutput>> {
            self.fs.create_multipart_upload(req).await
        }

        async fn upload_part(
            &self,
            req: S3Request<UploadPartInput>,
        ) -> S3Result<S3Response<UploadPartOutput>> {
            self.fs.upload_part(req).await
        }

        async fn upload_part_copy(
            &self,
            req: S3Request<UploadPartCopyInput>,
        ) -> S3Result<S3Response<UploadPartCopyOutput>> {
            self.fs.upload_part_copy(req).await
        }

        async fn complete_multipart_upload(
            &self,
            req: S3Request<CompleteMultipartUploadInput>,
        ) -> S3Result<S3Response<CompleteMultipartUploadOutput>> {
            self.fs.complete_multipart_upload(req).await
        }

        async fn abort_multipart_upload(
            &self,
            req: S3Request<AbortMultipartUploadInput>,
        ) -> S3Result<S3Response<AbortMultipartUploadOutput>> {
            self.fs.abort_multipart_upload(req).await
        }
    }

    /// Counts and logs every request; refuses writes while `writes_refused` is set (as
    /// [`S3Server::refuse_writes`] says); denies unsigned requests (as berth's embedded store).
    pub(super) struct Recorder {
        pub(super) requests: Arc<AtomicU64>,
        pub(super) operations: Arc<Mutex<Vec<S3Op>>>,
        pub(super) writes_refused: Arc<AtomicBool>,
    }

    #[async_trait::async_trait]
    impl s3s::access::S3Access for Recorder {
        async fn check(&self, cx: &mut s3s::access::S3AccessContext<'_>) -> S3Result<()> {
            self.requests.fetch_add(1, Ordering::SeqCst);
            let key = match cx.s3_path() {
                s3s::path::S3Path::Root => String::new(),
                s3s::path::S3Path::Bucket { bucket } => bucket.to_string(),
                s3s::path::S3Path::Object { key, .. } => key.to_string(),
            };
            self.operations.lock().unwrap().push(S3Op {
                op: cx.s3_op().name().to_string(),
                key,
            });
            berth::storage::embedded::check_access(cx, &self.writes_refused)
        }
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
    /// The S3 server `BERTH_TEST_STORAGE=s3` gave this berth (dropped after it).
    own_s3: Option<S3Server>,
}

/// Whether berths without an object store of the test's own get an S3 server
/// (`BERTH_TEST_STORAGE=s3`) rather than the local store.
pub fn test_storage_is_s3() -> bool {
    std::env::var("BERTH_TEST_STORAGE").as_deref() == Ok("s3")
}

/// `extra_yaml` on `s3`: its `storage:` keys (if any) join the server's section.
fn with_s3_storage(s3: &S3Server, extra_yaml: &str) -> String {
    let storage = s3.storage_yaml();
    if let Some(rest) = extra_yaml.strip_prefix("storage:\n") {
        return format!("{storage}{rest}");
    }
    match extra_yaml.find("\nstorage:\n") {
        Some(i) => format!(
            "{}\n{storage}{}",
            &extra_yaml[..i],
            &extra_yaml[i + "\nstorage:\n".len()..]
        ),
        None => format!("{storage}{extra_yaml}"),
    }
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
        let own_s3 = (s3.is_none() && test_storage_is_s3() && !extra_yaml.contains("endpoint:"))
            .then(S3Server::start);
        let mut yaml = match s3.or(own_s3.as_ref()) {
            Some(s3) => with_s3_storage(s3, extra_yaml),
            None => extra_yaml.to_string(),
        };
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
            own_s3,
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
