//! An S3 endpoint (s3s + s3s-fs) inside the process: the real S3 server of berth's tests
//! (`tests/common`, the storage unit tests), on a loopback port. berth itself no longer runs
//! it: its embedded default is the local store ([`super::local`]), which has no HTTP hop.
//!
//! s3s-fs keeps all state on disk under `root` (objects in `root/<bucket>/<key>`, and multipart
//! uploads as `root/.upload-<id>.json` holding the access key that created the upload, parts as
//! `root/.upload_id-<id>.part-<n>`): an upload in progress survives a restart of the server, but
//! only if the same access key continues it (s3s-fs answers AccessDenied to any other key).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use rand::distr::{Alphanumeric, SampleString};
use s3s::access::{S3Access, S3AccessContext};
use s3s::auth::{S3Auth, SecretKey, SimpleAuth};
use s3s::service::S3ServiceBuilder;
use s3s::S3Result;

pub struct EmbeddedOptions {
    /// Objects live under `root/<bucket>/...` (s3s-fs maps buckets to directories).
    pub root: PathBuf,
    pub bucket: String,
    /// 127.0.0.1:0 for a free port.
    pub listen: SocketAddr,
    pub access_key: String,
    pub secret_key: String,
    /// Counts every S3 request served (tests and benchmarks read it).
    pub request_counter: Option<Arc<AtomicU64>>,
    /// While true, every request that writes (PUT, POST, DELETE) is refused with 503
    /// ServiceUnavailable (tests of a store that takes no writes).
    pub refuse_writes: Option<Arc<AtomicBool>>,
}

pub struct EmbeddedS3 {
    /// `http://127.0.0.1:PORT`
    pub endpoint: String,
    pub access_key: String,
    pub secret_key: String,
}

impl EmbeddedS3 {
    /// Starts the server on its own thread and tokio runtime; creates the bucket if missing.
    /// Returns once the socket is bound. The server lives until the process exits.
    pub fn start(opts: EmbeddedOptions) -> std::io::Result<EmbeddedS3> {
        std::fs::create_dir_all(opts.root.join(&opts.bucket))?;
        let fs = s3s_fs::FileSystem::new(&opts.root).map_err(|e| {
            std::io::Error::other(format!("s3s-fs at {}: {e:?}", opts.root.display()))
        })?;
        let service = {
            let mut b = S3ServiceBuilder::new(fs);
            let auth = SimpleAuth::from_single(opts.access_key.clone(), opts.secret_key.clone());
            match opts.request_counter {
                Some(counter) => b.set_auth(CountingAuth {
                    inner: auth,
                    counter,
                }),
                None => b.set_auth(auth),
            }
            if let Some(refuse) = opts.refuse_writes {
                b.set_access(WriteSwitch { refuse });
            }
            b.build()
        };

        let listener = std::net::TcpListener::bind(opts.listen)?;
        listener.set_nonblocking(true)?;
        let local = listener.local_addr()?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("berth-s3")
            .enable_all()
            .build()?;
        std::thread::Builder::new()
            .name("berth-s3-accept".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let listener = match tokio::net::TcpListener::from_std(listener) {
                        Ok(l) => l,
                        Err(e) => {
                            log::error!("embedded S3: cannot listen on {local}: {e}");
                            return;
                        }
                    };
                    let builder = hyper_util::server::conn::auto::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    );
                    loop {
                        let (socket, _) = match listener.accept().await {
                            Ok(c) => c,
                            Err(e) => {
                                // EMFILE and the like: do not spin.
                                log::warn!("embedded S3: accept failed: {e}");
                                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                                continue;
                            }
                        };
                        // s3s-fs writes small chunks: without this Nagle delays responses.
                        let _ = socket.set_nodelay(true);
                        let conn = builder
                            .serve_connection(hyper_util::rt::TokioIo::new(socket), service.clone())
                            .into_owned();
                        tokio::spawn(async move {
                            if let Err(e) = conn.await {
                                log::debug!("embedded S3: connection: {e}");
                            }
                        });
                    }
                })
            })?;

        Ok(EmbeddedS3 {
            endpoint: format!("http://{local}"),
            access_key: opts.access_key,
            secret_key: opts.secret_key,
        })
    }

    /// Random access/secret key pair (one per berth start).
    ///
    /// Note: s3s-fs binds a multipart upload to the access key that created it, so an upload
    /// started under one key pair cannot be continued, completed or aborted under another.
    pub fn random_keys() -> (String, String) {
        let mut rng = rand::rng();
        (
            Alphanumeric.sample_string(&mut rng, 20),
            Alphanumeric.sample_string(&mut rng, 40),
        )
    }
}

/// SimpleAuth that counts requests. s3s asks for the secret key exactly once per signed
/// request, before checking the signature, so this counts every signed request (including
/// those that then fail the signature check); it misses anonymous requests and presigned URLs
/// rejected as expired before the key lookup. (Counting at the hyper service instead needs
/// `hyper` as a direct dependency.)
struct CountingAuth {
    inner: SimpleAuth,
    counter: Arc<AtomicU64>,
}

#[async_trait::async_trait]
impl S3Auth for CountingAuth {
    async fn get_secret_key(&self, access_key: &str) -> S3Result<SecretKey> {
        self.counter.fetch_add(1, Ordering::Relaxed);
        self.inner.get_secret_key(access_key).await
    }
}

/// Refuses writes while `refuse` is set (see [`EmbeddedOptions::refuse_writes`]).
struct WriteSwitch {
    refuse: Arc<AtomicBool>,
}

#[async_trait::async_trait]
impl S3Access for WriteSwitch {
    async fn check(&self, cx: &mut S3AccessContext<'_>) -> S3Result<()> {
        check_access(cx, &self.refuse)
    }
}

/// The embedded endpoint's access rule, for other s3s services that keep it (the tests'):
/// signed requests only, and writes answered 503 while `refuse_writes` is set.
pub fn check_access(cx: &S3AccessContext<'_>, refuse_writes: &AtomicBool) -> S3Result<()> {
    let writes = *cx.method() != http::Method::GET && *cx.method() != http::Method::HEAD;
    if writes && refuse_writes.load(Ordering::SeqCst) {
        return Err(s3s::s3_error!(
            ServiceUnavailable,
            "writes are switched off"
        ));
    }
    if cx.credentials().is_none() {
        return Err(s3s::s3_error!(AccessDenied, "Signature is required"));
    }
    Ok(())
}
