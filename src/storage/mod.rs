//! The object store: blob bytes (and the bucket journal's records) live in an S3-compatible
//! bucket, or, with no `storage.endpoint`, in the local store under `<data_dir>/objects`.
//! [`ObjectStore`] is the one interface for both; each operation goes to its backend.
//!
//! S3: every request is signed with SigV4 as a presigned URL (`UNSIGNED-PAYLOAD`), so one
//! signing path serves berth's own calls, proxied blob GETs ([`ObjectStore::get_stream`]) and
//! 307 redirects. Requests go through one pooled `reqwest::Client` (client.rs); presigning is
//! in sigv4.rs. The local store (local.rs) reads and writes files directly. embedded.rs is an
//! S3 endpoint on s3s-fs, the tests' in-process S3 server.
//!
//! Requests per operation (without retries): every method below makes exactly one S3 request.
//! Requests without a body or with [`ObjectBody::Bytes`] are retried (3 attempts in all,
//! 100 ms, 200 ms backoff plus jitter) on connection errors, 500/502/503/504 and SlowDown.

pub mod client;
pub mod embedded;
pub mod local;
pub mod shared_read;
pub mod sigv4;

use std::time::Duration;

use bytes::Bytes;

use http::Method;

use crate::config::StorageConfig;
use crate::metrics::{StoreOp, STORE};
use client::{RetryPolicy, SendBody, Sender};
use sigv4::Signer;

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// Connection refused, DNS failure, timeout: the endpoint cannot be reached.
    #[error("object store unreachable at {endpoint}: {cause}")]
    Unreachable { endpoint: String, cause: String },
    #[error("bucket {bucket:?} does not exist")]
    NoSuchBucket { bucket: String },
    /// 403 / InvalidAccessKeyId / SignatureDoesNotMatch.
    #[error("object store refused the credentials: {code}: {message}")]
    AccessDenied { code: String, message: String },
    /// 503 / SlowDown / 5xx still failing after the bounded retries: clients should retry.
    #[error("object store unavailable: HTTP {status} {code}")]
    Unavailable { status: u16, code: String },
    /// The multipart upload is not in the object store any more (NoSuchUpload; or, from
    /// s3s-fs, AccessDenied while the credentials still work: it forgot the upload).
    #[error("multipart upload {upload_id} is gone from the object store")]
    UploadGone { upload_id: String },
    /// Anything else (the S3 error code and message, for the log).
    #[error("object store error: HTTP {status} {code}: {message}")]
    Failed {
        status: u16,
        code: String,
        message: String,
    },
}

/// A request body for PutObject / UploadPart: always of known length (real S3 requires
/// Content-Length, no chunked encoding).
pub enum ObjectBody {
    /// In memory; re-sendable, so the request is retried on transient errors.
    Bytes(Bytes),
    /// Streamed from a channel as it arrives; exactly `len` bytes; not retried.
    Stream {
        len: u64,
        chunks: tokio::sync::mpsc::Receiver<Result<Bytes, std::io::Error>>,
    },
}

/// A presigned request.
pub struct Presigned {
    /// Absolute URL (for 307 redirects).
    pub url: String,
    /// Path and query only, starting with '/'.
    pub path_and_query: String,
}

/// One object of a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    /// Full object key (prefix included).
    pub key: String,
    pub size: u64,
    /// As the store sent it (ISO 8601).
    pub last_modified: String,
}

/// A page of [`ObjectStore::list_objects`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListPage {
    pub objects: Vec<ObjectInfo>,
    /// Continuation token for the next page; None on the last page.
    pub next: Option<String>,
}

/// An object being read: see [`ObjectStore::get_stream`].
pub enum ObjectStream {
    Remote(reqwest::Response),
    Local(local::FileStream),
}

impl ObjectStream {
    pub fn status(&self) -> u16 {
        match self {
            ObjectStream::Remote(r) => r.status().as_u16(),
            ObjectStream::Local(f) => f.status_code(),
        }
    }

    pub fn headers(&self) -> &http::HeaderMap {
        match self {
            ObjectStream::Remote(r) => r.headers(),
            ObjectStream::Local(f) => f.headers(),
        }
    }

    /// The next chunk of the body; None at its end.
    pub async fn chunk(&mut self) -> Result<Option<Bytes>, StorageError> {
        match self {
            ObjectStream::Remote(r) => r.chunk().await.map_err(|e| StorageError::Failed {
                status: 0,
                code: "ReadError".into(),
                message: client::error_chain(&e),
            }),
            ObjectStream::Local(f) => f.chunk().await,
        }
    }
}

/// Where verified blobs live, under the prefix: see [`ObjectStore::verified_blob_key`].
pub const VERIFIED_BLOBS: &str = "blobs/sha256/";
/// The longest key berth gives a record (a verified blob, a journal record). S3 allows 1,024
/// bytes, but s3s-fs (the embedded store) names a metadata file after the base64 of the key,
/// which caps its keys at about 160 bytes.
pub const MAX_RECORD_KEY: usize = 160;

/// An incomplete multipart upload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MultipartInfo {
    pub key: String,
    pub upload_id: String,
    pub initiated: Option<std::time::SystemTime>,
}

/// A page of [`ObjectStore::list_multipart_uploads`]; `next` is (key marker, upload id marker).
#[derive(Debug, Clone, Default)]
pub struct MultipartPage {
    pub uploads: Vec<MultipartInfo>,
    pub next: Option<(String, String)>,
}

pub struct ObjectStore {
    backend: Backend,
    prefix: String,
    /// Whole-object GETs in flight, which concurrent blob GETs of the same object share.
    shared_reads: shared_read::SharedReads,
}

enum Backend {
    S3(Sender),
    Local(local::LocalStore),
}

/// The parts of `storage.endpoint` the store needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub tls: bool,
    /// Without IPv6 brackets.
    pub host: String,
    pub port: u16,
    /// Whether the URL named the port (it then still may be the default one).
    pub default_port: bool,
    /// Path prefix of the endpoint without a trailing '/' (usually empty).
    pub path: String,
}

impl Endpoint {
    pub fn parse(url: &str) -> Result<Endpoint, String> {
        let uri: http::Uri = url.parse().map_err(|e| format!("not a URL: {e}"))?;
        let tls = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err("expected a URL starting with http:// or https://".into()),
        };
        let host = uri
            .host()
            .filter(|h| !h.is_empty())
            .ok_or("no host in the URL")?;
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let default = if tls { 443 } else { 80 };
        let port = uri.port_u16().unwrap_or(default);
        if uri.query().is_some() {
            return Err("the URL must not have a query".into());
        }
        let path = uri.path().trim_end_matches('/').to_string();
        Ok(Endpoint {
            tls,
            host,
            port,
            default_port: port == default,
            path,
        })
    }

    /// `host` or `host:port` (port only when it is not the scheme's default), IPv6 in brackets.
    pub fn host_header(&self, host: &str) -> String {
        let host = if host.contains(':') {
            format!("[{host}]")
        } else {
            host.to_string()
        };
        if self.default_port {
            host
        } else {
            format!("{host}:{}", self.port)
        }
    }
}

fn config_error(message: String) -> StorageError {
    StorageError::Failed {
        status: 0,
        code: "InvalidConfig".into(),
        message,
    }
}

impl ObjectStore {
    /// Builds the signer (credentials once) and the pooled HTTP client; no request is sent.
    /// `cfg.endpoint` must be set (for the embedded store, to its `http://127.0.0.1:PORT`).
    pub fn new(cfg: &StorageConfig) -> Result<ObjectStore, StorageError> {
        Self::with_retry(cfg, RetryPolicy::default())
    }

    pub fn with_retry(
        cfg: &StorageConfig,
        retry: RetryPolicy,
    ) -> Result<ObjectStore, StorageError> {
        let url = cfg.endpoint.as_deref().ok_or_else(|| {
            config_error("storage.endpoint is not set (start the embedded S3 first)".into())
        })?;
        let ep = Endpoint::parse(url)
            .map_err(|m| config_error(format!("storage.endpoint {url:?}: {m}")))?;
        if cfg.bucket.is_empty() || cfg.bucket.contains('/') {
            return Err(config_error(format!(
                "storage.bucket {:?} is not a bucket name",
                cfg.bucket
            )));
        }
        let (host, base_path) = if cfg.path_style {
            (
                ep.host.clone(),
                format!("{}/{}", ep.path, sigv4::encode_key(&cfg.bucket)),
            )
        } else {
            (format!("{}.{}", cfg.bucket, ep.host), ep.path.clone())
        };
        let host_header = ep.host_header(&host);
        let signer = Signer::new(
            &cfg.access_key,
            &cfg.secret_key,
            &cfg.region,
            if ep.tls { "https" } else { "http" },
            host_header.clone(),
            base_path,
        );
        let ca_bundle =
            match &cfg.ca_bundle {
                Some(path) => Some(std::fs::read(path).map_err(|e| {
                    config_error(format!("storage.ca_bundle {}: {e}", path.display()))
                })?),
                None => None,
            };
        let http = Sender::new_http_client_with_ca(ca_bundle.as_deref()).map_err(|e| {
            StorageError::Failed {
                status: 0,
                code: "HttpClient".into(),
                message: match &cfg.ca_bundle {
                    Some(_) => format!("storage.ca_bundle: {e}"),
                    None => e.to_string(),
                },
            }
        })?;
        Ok(ObjectStore {
            backend: Backend::S3(Sender {
                http,
                signer,
                endpoint: url.to_string(),
                bucket: cfg.bucket.clone(),
                retry,
            }),
            prefix: cfg.prefix.clone(),
            shared_reads: shared_read::SharedReads::new(cfg.coalesce_window),
        })
    }

    /// The local store rooted at `root` (see [`local`]), with `cfg`'s bucket and prefix.
    /// Concurrent GETs of a blob share the page cache, not a read: no coalescing.
    pub fn local(root: &std::path::Path, cfg: &StorageConfig) -> Result<ObjectStore, StorageError> {
        let store = local::LocalStore::open(root, &cfg.bucket)
            .map_err(|e| config_error(format!("local object store at {}: {e}", root.display())))?;
        Ok(ObjectStore {
            backend: Backend::Local(store),
            prefix: cfg.prefix.clone(),
            shared_reads: shared_read::SharedReads::new(0),
        })
    }

    /// Whether this is the local store (no presigned URLs, files read directly).
    pub fn is_local(&self) -> bool {
        matches!(self.backend, Backend::Local(_))
    }

    /// Startup check: can we reach the endpoint, does the bucket exist, are the credentials
    /// accepted? The error says which. One HeadBucket request (plus retries).
    pub async fn check(&self) -> Result<(), StorageError> {
        timed(StoreOp::HeadBucket, async {
            let sender = match &self.backend {
                Backend::S3(sender) => sender,
                Backend::Local(local) => return local.check().await,
            };
            match sender.send(Method::HEAD, None, &[], SendBody::Empty).await {
                Ok(_) => Ok(()),
                // HEAD has no body: a bare 404 is the bucket.
                Err(StorageError::Failed { status: 404, .. }) => Err(StorageError::NoSuchBucket {
                    bucket: sender.bucket.clone(),
                }),
                Err(e) => Err(e),
            }
        })
        .await
    }

    /// Object key for the bytes of upload `id`: `<prefix>blobs/<id>`.
    pub fn blob_key(&self, upload_id: &str) -> String {
        let mut k = String::with_capacity(self.prefix.len() + 6 + upload_id.len());
        k.push_str(&self.prefix);
        k.push_str("blobs/");
        k.push_str(upload_id);
        k
    }

    /// Object key for blob bytes that were verified before they were written:
    /// `<prefix>blobs/sha256/<hex>/<repo>`. The key itself records the blob (digest, the
    /// repository that uploaded it, and its size in the listing), so it needs no journal record.
    /// None when that key would be longer than [`MAX_RECORD_KEY`] (a long repository name).
    pub fn verified_blob_key(
        &self,
        digest: &crate::registry::names::Digest,
        repo: &str,
    ) -> Option<String> {
        let len = self.prefix.len() + VERIFIED_BLOBS.len() + 65 + repo.len();
        if len > MAX_RECORD_KEY {
            return None;
        }
        let mut k = String::with_capacity(len);
        k.push_str(&self.prefix);
        k.push_str(VERIFIED_BLOBS);
        k.push_str(digest.hex());
        k.push('/');
        k.push_str(repo);
        Some(k)
    }

    /// The configured key prefix (`storage.prefix`), ending in '/' unless empty.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// `<prefix><rel>`.
    pub fn key(&self, rel: &str) -> String {
        let mut k = String::with_capacity(self.prefix.len() + rel.len());
        k.push_str(&self.prefix);
        k.push_str(rel);
        k
    }

    /// Presigned URL for `method` on `key` (no request is made); None from the local store,
    /// which has no URLs (the config refuses `blob_serving: redirect` with it).
    pub fn presign(&self, method: &http::Method, key: &str, ttl: Duration) -> Option<Presigned> {
        match &self.backend {
            Backend::S3(sender) => Some(sender.signer.presign(method, Some(key), &[], ttl)),
            Backend::Local(_) => None,
        }
    }

    /// As [`ObjectStore::presign`] with extra query parameters that are signed too (e.g.
    /// `response-content-type`, `partNumber`, `uploadId`).
    pub fn presign_with_query(
        &self,
        method: &http::Method,
        key: &str,
        query: &[(&str, &str)],
        ttl: Duration,
    ) -> Option<Presigned> {
        match &self.backend {
            Backend::S3(sender) => Some(sender.signer.presign(method, Some(key), query, ttl)),
            Backend::Local(_) => None,
        }
    }

    /// Opens `key` (or the `range` of it) for streaming to a client. The object store's
    /// status and headers come back as they are; the body is read chunk by chunk, each chunk
    /// in the buffer the HTTP client read it into (no copy).
    pub async fn get_stream(
        &self,
        key: &str,
        range: Option<&http::HeaderValue>,
    ) -> Result<ObjectStream, StorageError> {
        let start = std::time::Instant::now();
        let result = match &self.backend {
            Backend::S3(sender) => sender
                .get_unread(key, range)
                .await
                .map(ObjectStream::Remote),
            Backend::Local(local) => local.read(key, range).await.map(ObjectStream::Local),
        };
        // Timed to the response header, like the other operations; an error status counts.
        let ok = matches!(&result, Ok(r) if r.status() < 400);
        STORE.observe(StoreOp::GetObject, ok, start.elapsed());
        result
    }

    /// The reads concurrent blob GETs share (see [`shared_read`]).
    pub fn shared_reads(&self) -> &shared_read::SharedReads {
        &self.shared_reads
    }

    pub fn bucket(&self) -> &str {
        match &self.backend {
            Backend::S3(sender) => &sender.bucket,
            Backend::Local(local) => local.bucket(),
        }
    }

    /// PutObject, with Content-Length. One request.
    pub async fn put_object(&self, key: &str, body: ObjectBody) -> Result<(), StorageError> {
        timed(StoreOp::PutObject, async {
            match &self.backend {
                Backend::S3(sender) => sender
                    .send(Method::PUT, Some(key), &[], body.into())
                    .await
                    .map(|_| ()),
                Backend::Local(local) => local.put_object(key, body).await,
            }
        })
        .await
    }

    /// GetObject of a small object, read whole into memory (journal records; never blob
    /// bytes). A missing key is `Failed { status: 404 }`. One request (plus retries).
    pub async fn get_object(&self, key: &str) -> Result<Bytes, StorageError> {
        timed(StoreOp::GetObject, async {
            match &self.backend {
                Backend::S3(sender) => sender
                    .send(Method::GET, Some(key), &[], SendBody::Empty)
                    .await
                    .map(|r| r.body),
                Backend::Local(local) => local.get_object(key).await,
            }
        })
        .await
    }

    /// ListObjectsV2: up to 1,000 keys under `prefix` (full key prefix), in key order, from
    /// `continuation` (the previous page's `next`). One request (plus retries).
    pub async fn list_objects(
        &self,
        prefix: &str,
        continuation: Option<&str>,
    ) -> Result<ListPage, StorageError> {
        self.list_objects_after(prefix, None, continuation).await
    }

    /// As [`ObjectStore::list_objects`], starting strictly after the key `start_after` (S3
    /// ignores it once a continuation token is given).
    pub async fn list_objects_after(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        continuation: Option<&str>,
    ) -> Result<ListPage, StorageError> {
        timed(StoreOp::ListObjectsV2, async {
            let sender = match &self.backend {
                Backend::S3(sender) => sender,
                // The local store's continuation token is the last key it gave.
                Backend::Local(local) => {
                    return local
                        .list_objects(prefix, continuation.or(start_after))
                        .await
                }
            };
            let mut query: Vec<(&str, &str)> = vec![("list-type", "2")];
            if !prefix.is_empty() {
                query.push(("prefix", prefix));
            }
            if let Some(token) = continuation {
                query.push(("continuation-token", token));
            } else if let Some(after) = start_after {
                query.push(("start-after", after));
            }
            let r = sender
                .send(Method::GET, None, &query, SendBody::Empty)
                .await?;
            client::parse_list(&r.body).ok_or_else(|| StorageError::Failed {
                status: r.status.as_u16(),
                code: "MalformedResponse".into(),
                message: format!(
                    "not a ListBucketResult: {}",
                    String::from_utf8_lossy(&r.body[..r.body.len().min(200)])
                ),
            })
        })
        .await
    }

    /// CreateMultipartUpload; returns the UploadId. One request.
    pub async fn create_multipart(&self, key: &str) -> Result<String, StorageError> {
        timed(StoreOp::CreateMultipart, async {
            let sender = match &self.backend {
                Backend::S3(sender) => sender,
                Backend::Local(local) => return local.create_multipart(key).await,
            };
            let r = sender
                .send(Method::POST, Some(key), &[("uploads", "")], SendBody::Empty)
                .await?;
            client::parse_upload_id(&r.body).ok_or_else(|| StorageError::Failed {
                status: r.status.as_u16(),
                code: "MalformedResponse".into(),
                message: format!(
                    "no UploadId in the CreateMultipartUpload response: {}",
                    String::from_utf8_lossy(&r.body[..r.body.len().min(200)])
                ),
            })
        })
        .await
    }

    /// UploadPart, with Content-Length. Returns the part's ETag as S3 sent it (with its
    /// quotes), to be passed back to [`ObjectStore::complete_multipart`]. One request.
    pub async fn upload_part(
        &self,
        key: &str,
        upload_id: &str,
        part_number: u32,
        body: ObjectBody,
    ) -> Result<String, StorageError> {
        timed(StoreOp::UploadPart, async {
            let sender = match &self.backend {
                Backend::S3(sender) => sender,
                Backend::Local(local) => {
                    return local.upload_part(upload_id, part_number, body).await
                }
            };
            let n = part_number.to_string();
            let sent = sender
                .send(
                    Method::PUT,
                    Some(key),
                    &[("partNumber", &n), ("uploadId", upload_id)],
                    body.into(),
                )
                .await;
            let r = self.upload_outcome(upload_id, sent).await?;
            r.headers
                .get(http::header::ETAG)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
                .ok_or_else(|| StorageError::Failed {
                    status: r.status.as_u16(),
                    code: "MalformedResponse".into(),
                    message: "no ETag in the UploadPart response".into(),
                })
        })
        .await
    }

    /// CompleteMultipartUpload with `(part number, ETag)` in ascending part order. One request
    /// (a 200 carrying an error document counts as that error).
    pub async fn complete_multipart(
        &self,
        key: &str,
        upload_id: &str,
        parts: &[(u32, String)],
    ) -> Result<(), StorageError> {
        timed(StoreOp::CompleteMultipart, async {
            let sender = match &self.backend {
                Backend::S3(sender) => sender,
                Backend::Local(local) => {
                    return local.complete_multipart(key, upload_id, parts).await
                }
            };
            let body = Bytes::from(client::complete_body(parts));
            let sent = sender
                .send(
                    Method::POST,
                    Some(key),
                    &[("uploadId", upload_id)],
                    SendBody::Bytes(body),
                )
                .await;
            self.upload_outcome(upload_id, sent).await.map(|_| ())
        })
        .await
    }

    /// AbortMultipartUpload. An upload that is already gone counts as success. One request
    /// (two when AccessDenied needs telling apart).
    pub async fn abort_multipart(&self, key: &str, upload_id: &str) -> Result<(), StorageError> {
        timed(StoreOp::AbortMultipart, async {
            let sender = match &self.backend {
                Backend::S3(sender) => sender,
                Backend::Local(local) => return local.abort_multipart(upload_id).await,
            };
            let sent = sender
                .send(
                    Method::DELETE,
                    Some(key),
                    &[("uploadId", upload_id)],
                    SendBody::Empty,
                )
                .await;
            match self.upload_outcome(upload_id, sent).await {
                Ok(_) | Err(StorageError::UploadGone { .. }) => Ok(()),
                Err(e) => Err(e),
            }
        })
        .await
    }

    /// ListMultipartUploads under `prefix`, one page, continuing from `next` of the previous
    /// page. Not every store has it (s3s-fs answers NotImplemented): the error says so. One
    /// request.
    pub async fn list_multipart_uploads(
        &self,
        prefix: &str,
        next: Option<&(String, String)>,
    ) -> Result<MultipartPage, StorageError> {
        timed(StoreOp::ListMultipartUploads, async {
            let sender = match &self.backend {
                Backend::S3(sender) => sender,
                Backend::Local(local) => return local.list_multipart_uploads(prefix, next).await,
            };
            let mut query = vec![("prefix", prefix), ("uploads", "")];
            if let Some((key, upload)) = next {
                query.push(("key-marker", key));
                query.push(("upload-id-marker", upload));
            }
            let r = sender
                .send(Method::GET, None, &query, SendBody::Empty)
                .await?;
            client::parse_list_uploads(&r.body)
                .ok_or_else(|| malformed("ListMultipartUploads", &r.body))
        })
        .await
    }

    /// Tells an operation on multipart upload `upload_id` that failed because the upload is
    /// gone ([`StorageError::UploadGone`]) from other failures. s3s-fs answers AccessDenied
    /// for an upload it no longer knows; real S3 does so for bad credentials, so AccessDenied
    /// only means "gone" when the bucket still answers.
    async fn upload_outcome(
        &self,
        upload_id: &str,
        sent: Result<client::Response, StorageError>,
    ) -> Result<client::Response, StorageError> {
        let gone = || StorageError::UploadGone {
            upload_id: upload_id.to_string(),
        };
        match sent {
            Err(StorageError::Failed { status: 404, .. }) => Err(gone()),
            Err(StorageError::Failed { code, .. }) if code == "NoSuchUpload" => Err(gone()),
            Err(e @ StorageError::AccessDenied { .. }) => match self.check().await {
                Ok(()) => Err(gone()),
                Err(_) => Err(e),
            },
            other => other,
        }
    }

    /// DeleteObject. A missing object counts as success. One request.
    pub async fn delete_object(&self, key: &str) -> Result<(), StorageError> {
        timed(StoreOp::DeleteObject, async {
            let sender = match &self.backend {
                Backend::S3(sender) => sender,
                Backend::Local(local) => return local.delete_object(key).await,
            };
            match sender
                .send(Method::DELETE, Some(key), &[], SendBody::Empty)
                .await
            {
                Ok(_) => Ok(()),
                Err(StorageError::Failed { status: 404, .. }) => Ok(()),
                Err(e) => Err(e),
            }
        })
        .await
    }
}

fn malformed(what: &str, body: &[u8]) -> StorageError {
    StorageError::Failed {
        status: 200,
        code: "MalformedResponse".into(),
        message: format!(
            "unreadable {what} response: {}",
            String::from_utf8_lossy(&body[..body.len().min(200)])
        ),
    }
}

/// Runs one object-store operation and records its outcome and duration.
async fn timed<T>(
    op: StoreOp,
    request: impl std::future::Future<Output = Result<T, StorageError>>,
) -> Result<T, StorageError> {
    let start = std::time::Instant::now();
    let result = request.await;
    STORE.observe(op, result.is_ok(), start.elapsed());
    result
}

#[cfg(test)]
mod tests;
