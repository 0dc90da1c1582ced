//! `limits`: bounds against abuse, with clear errors.
//!
//! - `max_concurrent_uploads`: requests streaming upload bytes at once (PATCH, PUT with the
//!   final chunk, monolithic POST). Over it: 429 TOOMANYREQUESTS with Retry-After. (Memory is
//!   bounded by `upload.buffer_budget` whatever this says.)
//! - `max_blob_size`: checked against Content-Length (plus what the session already holds)
//!   before any byte is read, and counted while the body streams: 413 SIZE_INVALID.
//! - `max_header_bytes`: request line + headers: 431.
//! - `read_timeout` (each read of a request body) and `idle_timeout` (keep-alive wait for the
//!   next request) against slow clients.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use pingora_http::RequestHeader;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::LimitsConfig;
use crate::http::endpoint::Endpoint;
use crate::registry::{BodySource, Registry, RegistryError, RegistryResult};

pub struct Limits {
    pub max_blob_size: Option<u64>,
    pub max_header_bytes: usize,
    pub read_timeout: Duration,
    pub idle_timeout: Duration,
    uploads: Option<(usize, Arc<Semaphore>)>,
}

impl Limits {
    pub fn new(c: &LimitsConfig) -> Limits {
        Limits {
            max_blob_size: c.max_blob_size,
            max_header_bytes: c.max_header_bytes,
            read_timeout: c.read_timeout,
            idle_timeout: c.idle_timeout,
            uploads: c
                .max_concurrent_uploads
                .map(|n| (n, Arc::new(Semaphore::new(n)))),
        }
    }

    /// 431 when the request line and headers are larger than `max_header_bytes`.
    pub fn check_header(&self, req: &RequestHeader) -> RegistryResult<()> {
        let size = header_size(req);
        if size > self.max_header_bytes {
            return Err(RegistryError::HeadersTooLarge(format!(
                "request headers are {size} bytes, the limit is {}",
                self.max_header_bytes
            )));
        }
        Ok(())
    }

    /// A slot for a request that streams upload bytes; None for other requests. 429 when
    /// all slots are taken.
    pub fn upload_slot(&self, ep: &Endpoint) -> RegistryResult<Option<OwnedSemaphorePermit>> {
        let writes = matches!(
            ep,
            Endpoint::PatchUpload { .. }
                | Endpoint::FinishUpload { .. }
                | Endpoint::StartUpload {
                    digest: Some(_),
                    mount: None,
                    ..
                }
        );
        let Some((max, slots)) = self.uploads.as_ref().filter(|_| writes) else {
            return Ok(None);
        };
        match slots.clone().try_acquire_owned() {
            Ok(p) => Ok(Some(p)),
            Err(_) => Err(RegistryError::TooManyRequests(format!(
                "{max} uploads are in progress (limits.max_concurrent_uploads); retry later"
            ))),
        }
    }
}

/// Bytes of the request line and headers as sent (HTTP/1.1 framing).
pub fn header_size(req: &RequestHeader) -> usize {
    let line = req.method.as_str().len() + req.uri.to_string().len() + 11;
    req.headers
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 4)
        .sum::<usize>()
        + line
}

/// `limits.max_blob_size` applied to one request that adds bytes to a blob.
#[derive(Debug, Clone, Copy)]
pub struct BlobLimit(pub Option<u64>);

impl BlobLimit {
    /// How many bytes this request may add to upload `id` (None: a new blob), or 413 when
    /// its Content-Length already says more. None when there is no limit.
    pub async fn allowance(
        &self,
        reg: &Registry,
        repo: &str,
        id: Option<&str>,
        content_length: Option<u64>,
    ) -> RegistryResult<Option<u64>> {
        let Some(max) = self.0 else { return Ok(None) };
        let held = match id {
            Some(id) => reg.upload_status(repo, id).await?.offset,
            None => 0,
        };
        let allowed = max.saturating_sub(held);
        if let Some(len) = content_length {
            if len > allowed {
                return Err(too_large(max));
            }
        }
        Ok(Some(allowed))
    }

    /// The result of a request read through a [`LimitedBody`]: 413 when the body went past
    /// the limit (the registry only saw its read fail).
    pub fn outcome<T>(&self, r: RegistryResult<T>, exceeded: bool) -> RegistryResult<T> {
        match (self.0, exceeded) {
            (Some(max), true) => Err(too_large(max)),
            _ => r,
        }
    }
}

fn too_large(max: u64) -> RegistryError {
    RegistryError::TooLarge(format!(
        "the blob would exceed {max} bytes (limits.max_blob_size)"
    ))
}

/// A body that fails once more than `allowed` bytes came through.
pub struct LimitedBody<B> {
    inner: B,
    allowed: Option<u64>,
    read: u64,
    pub exceeded: bool,
}

impl<B> LimitedBody<B> {
    pub fn new(inner: B, allowed: Option<u64>) -> Self {
        LimitedBody {
            inner,
            allowed,
            read: 0,
            exceeded: false,
        }
    }
}

#[async_trait::async_trait]
impl<B: BodySource> BodySource for LimitedBody<B> {
    async fn next_chunk(&mut self) -> std::io::Result<Option<Bytes>> {
        let chunk = self.inner.next_chunk().await?;
        if let (Some(c), Some(allowed)) = (&chunk, self.allowed) {
            self.read += c.len() as u64;
            if self.read > allowed {
                self.exceeded = true;
                return Err(std::io::Error::other("blob exceeds limits.max_blob_size"));
            }
        }
        Ok(chunk)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Chunks(Vec<Bytes>);

    #[async_trait::async_trait]
    impl BodySource for Chunks {
        async fn next_chunk(&mut self) -> std::io::Result<Option<Bytes>> {
            Ok(if self.0.is_empty() {
                None
            } else {
                Some(self.0.remove(0))
            })
        }
    }

    #[tokio::test]
    async fn limited_body_stops_past_the_allowance() {
        let mk = || {
            Chunks(vec![
                Bytes::from_static(b"abcd"),
                Bytes::from_static(b"efgh"),
            ])
        };
        let mut b = LimitedBody::new(mk(), Some(8));
        assert!(b.next_chunk().await.unwrap().is_some());
        assert!(b.next_chunk().await.unwrap().is_some());
        assert!(b.next_chunk().await.unwrap().is_none());
        assert!(!b.exceeded);
        let mut b = LimitedBody::new(mk(), Some(7));
        assert!(b.next_chunk().await.unwrap().is_some());
        assert!(b.next_chunk().await.is_err());
        assert!(b.exceeded);
        let r: RegistryResult<()> = Err(RegistryError::BlobUploadInvalid("read".into()));
        let e = BlobLimit(Some(7)).outcome(r, b.exceeded).unwrap_err();
        assert_eq!((e.status().as_u16(), e.code()), (413, "SIZE_INVALID"));
        let mut b = LimitedBody::new(mk(), None);
        assert!(b.next_chunk().await.unwrap().is_some());
        assert!(b.next_chunk().await.unwrap().is_some());
    }

    #[test]
    fn upload_slots() {
        let l = Limits::new(&LimitsConfig {
            max_concurrent_uploads: Some(1),
            ..LimitsConfig::default()
        });
        let patch = Endpoint::parse(&http::Method::PATCH, "/v2/a/blobs/uploads/x", None).unwrap();
        let get = Endpoint::parse(&http::Method::GET, "/v2/a/tags/list", None).unwrap();
        let first = l.upload_slot(&patch).unwrap();
        assert!(first.is_some());
        let e = l.upload_slot(&patch).unwrap_err();
        assert_eq!((e.status().as_u16(), e.code()), (429, "TOOMANYREQUESTS"));
        assert!(l.upload_slot(&get).unwrap().is_none());
        drop(first);
        assert!(l.upload_slot(&patch).unwrap().is_some());
    }

    #[test]
    fn header_limit() {
        let l = Limits::new(&LimitsConfig {
            max_header_bytes: 1024,
            ..LimitsConfig::default()
        });
        let mut req = RequestHeader::build("GET", b"/v2/", None).unwrap();
        req.insert_header("Authorization", "Bearer x").unwrap();
        assert!(l.check_header(&req).is_ok());
        req.insert_header("X-Big", "a".repeat(2000)).unwrap();
        assert_eq!(l.check_header(&req).unwrap_err().status(), 431);
    }
}
