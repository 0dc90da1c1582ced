//! Blob GETs in proxy mode: the object store's response streamed to the client as it arrives.
//!
//! berth reads the object with its own S3 client (presigned GET, the client's `Range` passed
//! on) and writes each chunk to the client through pingora's session. The chunks are the HTTP
//! client's own read buffers, handed over as `Bytes`: no copy in user space, and reads as
//! large as the socket has data for. (pingora's upstream proxy path reads 64 KiB at a time
//! and copies every chunk twice.) Nothing is buffered beyond the chunk in hand: a slow client
//! slows the read from the object store.
//!
//! A GET of a whole blob (no `Range`) shares its object-store read with the concurrent GETs
//! of the same blob ([`crate::storage::shared_read`]); a client cut loose from a shared read
//! for falling behind gets the rest with a ranged GET of its own.

use std::time::Duration;

use pingora_proxy::Session;

use super::response::{header, set};
use crate::meta::BlobRecord;
use crate::metrics::BLOBS;
use crate::registry::names::Digest;
use crate::registry::pacing::Pacer;
use crate::registry::{RegistryError, RegistryResult};
use crate::storage::shared_read::{Next, OpenError};
use crate::storage::{ObjectStore, ObjectStream};

/// Longest wait for the next chunk from the object store before the transfer is abandoned.
const READ_TIMEOUT: Duration = Duration::from_secs(60);

/// Headers of the object store's answer a registry client needs; S3's own stay behind.
static KEPT: [http::HeaderName; 4] = [
    http::header::CONTENT_LENGTH,
    http::header::CONTENT_RANGE,
    http::header::ACCEPT_RANGES,
    http::header::LAST_MODIFIED,
];

pub async fn stream_blob(
    s: &mut Session,
    store: &ObjectStore,
    record: &BlobRecord,
    digest: &Digest,
) -> RegistryResult<()> {
    let range = s.req_header().headers.get(http::header::RANGE).cloned();
    if range.is_none() && store.shared_reads().enabled() {
        return stream_shared(s, store, record, digest).await;
    }
    let object = store
        .get_stream(&record.key, range.as_ref())
        .await
        // Whatever broke the request (refused, reset, timed out), the client may retry.
        .map_err(|e| RegistryError::Unavailable(e.to_string()))?;
    let status = object.status();
    if !matches!(status, 200 | 206) {
        return Err(status_error(status, digest));
    }

    let mut h = header(status);
    for name in &KEPT {
        if let Some(v) = object.headers().get(name) {
            set(&mut h, name.as_str(), v.to_str().unwrap_or_default());
        }
    }
    if !send_header(s, h, digest).await {
        return Ok(());
    }

    pump(s, object, digest).await;
    Ok(())
}

/// What an object-store status other than 200/206 means for the client.
fn status_error(status: u16, digest: &Digest) -> RegistryError {
    match status {
        416 => RegistryError::RangeNotSatisfiable,
        404 => {
            log::error!("blob {digest} indexed but missing from the object store (HTTP 404)");
            RegistryError::BlobUnknown
        }
        500..=599 => RegistryError::Unavailable(format!("object store HTTP {status}")),
        _ => RegistryError::Internal(format!(
            "object store answered a blob GET with HTTP {status}"
        )),
    }
}

/// A whole-blob GET on a read shared with the concurrent GETs of the same blob.
async fn stream_shared(
    s: &mut Session,
    store: &ObjectStore,
    record: &BlobRecord,
    digest: &Digest,
) -> RegistryResult<()> {
    let (mut reader, last_modified) = match store.shared_reads().open(store, &record.key).await {
        Ok(opened) => opened,
        Err(OpenError::Status(status)) => return Err(status_error(status, digest)),
        Err(OpenError::Failed(e)) => return Err(RegistryError::Unavailable(e)),
    };
    let mut h = header(200);
    set(&mut h, "Content-Length", record.size.to_string());
    set(&mut h, "Accept-Ranges", "bytes");
    if let Some(v) = last_modified {
        set(&mut h, "Last-Modified", v.to_str().unwrap_or_default());
    }
    if !send_header(s, h, digest).await {
        return Ok(());
    }
    let mut pacer = Pacer::default();
    loop {
        let chunk = match reader.next().await {
            Next::Chunk(chunk) => chunk,
            Next::End => break,
            Next::Failed(e) => {
                abandon(s, digest, &e);
                return Ok(());
            }
            Next::Behind(at) => {
                drop(reader);
                BLOBS.coalesce_fallbacks.inc();
                let range = http::HeaderValue::from_str(&format!("bytes={at}-"))
                    .expect("a range header is ASCII");
                match store.get_stream(&record.key, Some(&range)).await {
                    Ok(object) if object.status() == 206 => pump(s, object, digest).await,
                    Ok(object) => abandon(s, digest, &format!("HTTP {}", object.status())),
                    Err(e) => abandon(s, digest, &e.to_string()),
                }
                return Ok(());
            }
        };
        if !send(s, chunk, &mut pacer).await {
            return Ok(());
        }
    }
    if let Err(e) = s.write_response_body(None, true).await {
        log::debug!("blob GET: finishing the response: {e}");
    }
    Ok(())
}

/// Sends the blob response header with the headers every blob GET has; false when the client
/// went away.
async fn send_header(
    s: &mut Session,
    mut h: pingora_http::ResponseHeader,
    digest: &Digest,
) -> bool {
    set(&mut h, "Content-Type", "application/octet-stream");
    set(&mut h, "Docker-Content-Digest", digest.as_str());
    set(&mut h, "ETag", format!("\"{digest}\""));
    if let Err(e) = s.write_response_header(Box::new(h), false).await {
        log::debug!("blob GET: client gone before the header: {e}");
        return false;
    }
    true
}

/// Sends one chunk; false when the client went away.
async fn send(s: &mut Session, chunk: bytes::Bytes, pacer: &mut Pacer) -> bool {
    let len = chunk.len() as u64;
    if let Err(e) = s.write_response_body(Some(chunk), false).await {
        // The client went away; the caller drops its read, which closes the upstream.
        log::debug!("blob GET: client gone: {e}");
        s.set_keepalive(None);
        return false;
    }
    BLOBS.bytes_sent.inc_by(len);
    pacer.moved(len as usize).await;
    true
}

/// Streams the rest of `object` to the client and ends the response.
async fn pump(s: &mut Session, mut object: ObjectStream, digest: &Digest) {
    let mut pacer = Pacer::default();
    loop {
        let chunk = match tokio::time::timeout(READ_TIMEOUT, object.chunk()).await {
            Ok(Ok(Some(chunk))) => chunk,
            Ok(Ok(None)) => break,
            Ok(Err(e)) => {
                abandon(s, digest, &e.to_string());
                return;
            }
            Err(_) => {
                abandon(s, digest, "no data from the object store for 60 s");
                return;
            }
        };
        if !send(s, chunk, &mut pacer).await {
            return;
        }
    }
    if let Err(e) = s.write_response_body(None, true).await {
        log::debug!("blob GET: finishing the response: {e}");
    }
}

/// The object store failed after the header went out: the only honest signal left is to close
/// the connection short of the announced length, so the client sees a truncated transfer.
fn abandon(s: &mut Session, digest: &Digest, cause: &str) {
    log::warn!("blob GET {digest}: object store failed mid-transfer: {cause}");
    s.set_keepalive(None);
}
