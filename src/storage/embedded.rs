//! The embedded S3 endpoint (s3s + s3s-fs) started inside the berth process when the config
//! names no `storage.endpoint`. berth then talks to it exactly as to any other S3.
//!
//! s3s-fs keeps all state on disk under `root` (objects in `root/<bucket>/<key>`, and multipart
//! uploads as `root/.upload-<id>.json` holding the access key that created the upload, parts as
//! `root/.upload_id-<id>.part-<n>`): an upload in progress survives a restart of the server, but
//! only if the same access key continues it (s3s-fs answers AccessDenied to any other key).
//!
//! What a crash can strand there, and who reclaims it: s3s-fs writes every object and part
//! to `root/.tmp.<n>.internal.part` first and renames it into place, and on
//! CompleteMultipartUpload drops the upload's record before it assembles the parts (a kill in
//! between leaves the part files with no upload, and aborting it then fails with
//! AccessDenied). [`sweep`] runs at start, before the store serves: it removes temp files and
//! the files of every upload no session names. [`remove_upload_files`] removes one forgotten
//! upload's files when its session is discarded.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
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

/// The upload id a file of s3s-fs's multipart state belongs to: `.upload-<id>.json`,
/// `.upload_id-<id>.part-<n>`, `.bucket-..object-..upload-<id>.metadata.json`.
fn upload_of(file_name: &str) -> Option<&str> {
    let rest = match file_name.split_once(".upload_id-") {
        Some((_, rest)) => rest,
        None => file_name.split_once(".upload-")?.1,
    };
    let id = &rest[..rest.find('.')?];
    is_upload_id(id).then_some(id)
}

/// s3s-fs upload ids are UUIDs; anything else never names a file here.
fn is_upload_id(id: &str) -> bool {
    id.len() == 36 && id.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')
}

/// Removes the files `root` holds for multipart upload `upload_id` (its record, parts and
/// attributes). Returns how many.
pub fn remove_upload_files(root: &Path, upload_id: &str) -> std::io::Result<usize> {
    if !is_upload_id(upload_id) {
        return Ok(0);
    }
    remove_files(root, |name| upload_of(name) == Some(upload_id))
}

/// At start, before the store serves: removes temp files of interrupted writes and the files
/// of multipart uploads that no upload session names (`live`). Returns how many.
pub fn sweep(root: &Path, live: &HashSet<String>) -> std::io::Result<usize> {
    if !root.exists() {
        return Ok(0);
    }
    remove_files(root, |name| {
        let temp = name.starts_with(".tmp.") && name.ends_with(".internal.part");
        temp || upload_of(name).is_some_and(|id| !live.contains(id))
    })
}

fn remove_files(root: &Path, doomed: impl Fn(&str) -> bool) -> std::io::Result<usize> {
    let mut n = 0;
    for entry in std::fs::read_dir(root)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if doomed(name) && entry.file_type()?.is_file() {
            match std::fs::remove_file(entry.path()) {
                Ok(()) => n += 1,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "0b5f0a4e-6a43-4a8e-9c1e-2f4d1c0a9b7e";
    const OTHER: &str = "1c6e1b5f-7b54-4b9f-8d2f-3e5e2d1b0c8f";

    #[test]
    fn files_of_an_upload() {
        assert_eq!(upload_of(&format!(".upload-{ID}.json")), Some(ID));
        assert_eq!(upload_of(&format!(".upload_id-{ID}.part-12")), Some(ID));
        assert_eq!(
            upload_of(&format!(
                ".bucket-cmVn.object-YmxvYnM.upload-{ID}.metadata.json"
            )),
            Some(ID)
        );
        assert_eq!(upload_of(".bucket-cmVn.object-YmxvYnM.internal.json"), None);
        assert_eq!(upload_of(".upload-../../etc.json"), None);
    }

    #[test]
    fn sweep_keeps_live_uploads_and_objects() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir(root.join("bucket")).unwrap();
        let names = [
            format!(".upload-{ID}.json"),
            format!(".upload_id-{ID}.part-1"),
            format!(".upload-{OTHER}.json"),
            format!(".upload_id-{OTHER}.part-1"),
            format!(".upload_id-{OTHER}.part-2"),
            ".tmp.3.internal.part".to_string(),
            ".bucket-cmVn.object-YmxvYnM.internal.json".to_string(),
        ];
        for n in &names {
            std::fs::write(root.join(n), b"x").unwrap();
        }
        std::fs::write(root.join("bucket").join("blob"), b"object").unwrap();
        let live = HashSet::from([ID.to_string()]);
        assert_eq!(sweep(root, &live).unwrap(), 4);
        let mut left: Vec<String> = std::fs::read_dir(root)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        let mut want = vec![
            format!(".upload-{ID}.json"),
            format!(".upload_id-{ID}.part-1"),
            ".bucket-cmVn.object-YmxvYnM.internal.json".to_string(),
            "bucket".to_string(),
        ];
        want.sort();
        assert_eq!(left, want);
        assert_eq!(remove_upload_files(root, ID).unwrap(), 2);
        assert_eq!(remove_upload_files(root, "../x").unwrap(), 0);
        assert!(root.join("bucket").join("blob").exists());
    }
}
