//! Requests under a mirror prefix (see [`crate::mirror`]).
//!
//! A blob the mirror lacks is fetched once from the upstream and *teed*: each chunk goes to
//! the client and into the bucket (the registry's ordinary upload path, which verifies the
//! digest before it records the blob). The two are paced together by a small queue. The last
//! chunk is held back until the digest is verified: on a mismatch the connection is closed
//! short, so the client sees a failed transfer, never a complete wrong blob, and nothing is
//! recorded (the next pull fetches again).

use std::time::Duration;

use bytes::Bytes;
use pingora_proxy::Session;
use tokio::sync::{mpsc, oneshot};

use super::endpoint::Endpoint;
use super::handlers::{send_blob_head, send_manifest};
use super::response::{header, set};
use crate::metrics::{BLOBS, MIRROR};
use crate::mirror::Routed;
use crate::registry::names::Digest;
use crate::registry::{BodySource, Registry, RegistryError, RegistryResult};

/// Chunks queued between the upstream read and the client write.
const TEE_QUEUE: usize = 4;
/// Longest wait for the next chunk from the upstream.
const UPSTREAM_READ_TIMEOUT: Duration = Duration::from_secs(60);

/// Answers `ep` (whose repository is under a mirror prefix). Some(ep): berth already holds
/// what it asks for, or it is not a mirror matter (tags, referrers): answer it locally.
pub async fn handle(
    reg: &Registry,
    s: &mut Session,
    ep: Endpoint,
) -> RegistryResult<Option<Endpoint>> {
    match ep {
        Endpoint::GetManifest {
            name,
            reference,
            head,
        } => {
            let routed = route(reg, &name)?;
            let found = reg.mirror_manifest(&routed, &name, &reference).await?;
            send_manifest(s, found, head).await?;
            Ok(None)
        }
        Endpoint::GetBlob { name, digest, head } => {
            if reg.mirror_local_blob(&name, &digest).await?.is_some() {
                MIRROR.hit("blob").inc();
                return Ok(Some(Endpoint::GetBlob { name, digest, head }));
            }
            let routed = route(reg, &name)?;
            if head {
                let size = routed
                    .mirror
                    .upstream
                    .blob_size(routed.upstream_repo, &digest)
                    .await?
                    .ok_or(RegistryError::BlobUnknown)?;
                send_blob_head(s, &digest, size).await?;
                return Ok(None);
            }
            // One fetch per blob: whoever waited here finds it stored when the lock is theirs.
            let lock = routed.mirror.fetch_lock(&digest);
            let _fetching = lock.lock().await;
            if reg.mirror_local_blob(&name, &digest).await?.is_some() {
                MIRROR.hit("blob").inc();
                return Ok(Some(Endpoint::GetBlob { name, digest, head }));
            }
            MIRROR.miss("blob").inc();
            let result = fetch_and_tee(reg, s, &routed, &name, &digest).await;
            routed.mirror.fetch_done(&digest);
            result.map(|()| None)
        }
        Endpoint::PutManifest { .. }
        | Endpoint::DeleteManifest { .. }
        | Endpoint::DeleteBlob { .. }
        | Endpoint::StartUpload { .. }
        | Endpoint::UploadStatus { .. }
        | Endpoint::PatchUpload { .. }
        | Endpoint::FinishUpload { .. }
        | Endpoint::CancelUpload { .. } => Err(RegistryError::Unsupported),
        other => Ok(Some(other)),
    }
}

fn route<'a>(reg: &'a Registry, name: &'a str) -> RegistryResult<Routed<'a>> {
    reg.mirrors
        .route(name)
        .ok_or_else(|| RegistryError::Internal(format!("{name} is not under a mirror")))
}

async fn fetch_and_tee(
    reg: &Registry,
    s: &mut Session,
    routed: &Routed<'_>,
    repo: &str,
    digest: &Digest,
) -> RegistryResult<()> {
    let response = routed
        .mirror
        .upstream
        .blob(routed.upstream_repo, digest)
        .await?
        .ok_or(RegistryError::BlobUnknown)?;
    let len = response.content_length();

    let mut h = header(200);
    set(&mut h, "Content-Type", "application/octet-stream");
    set(&mut h, "Docker-Content-Digest", digest.as_str());
    set(&mut h, "ETag", format!("\"{digest}\""));
    if let Some(len) = len {
        set(&mut h, "Content-Length", len.to_string());
    }
    // A client gone already does not stop the fetch: the blob is cached for the next one.
    let mut client = s.write_response_header(Box::new(h), false).await.is_ok();

    let (tx, mut rx) = mpsc::channel::<Bytes>(TEE_QUEUE);
    let (verified_tx, verified_rx) = oneshot::channel::<bool>();
    let store = async move {
        let mut body = UpstreamBody {
            response,
            client: Some(tx),
        };
        let result = reg.monolithic_upload(repo, digest, len, &mut body).await;
        drop(body); // closes the queue
        let _ = verified_tx.send(result.is_ok());
        result
    };
    let deliver = async {
        let mut held: Option<Bytes> = None;
        while let Some(chunk) = rx.recv().await {
            if let Some(previous) = held.replace(chunk) {
                client = client && write(s, previous).await;
            }
        }
        let verified = verified_rx.await.unwrap_or(false);
        if !client {
            return;
        }
        if verified {
            if let Some(last) = held {
                if !write(s, last).await {
                    return;
                }
            }
            if let Err(e) = s.write_response_body(None, true).await {
                log::debug!("mirror blob GET: finishing the response: {e}");
            }
        } else {
            // Short of the announced length: the client sees a failed transfer.
            s.set_keepalive(None);
        }
    };
    let (stored, ()) = tokio::join!(store, deliver);
    if let Err(e) = stored {
        log::warn!(
            "mirror: fetching {digest} from upstream {} failed, nothing recorded: {e}",
            routed.upstream_repo
        );
    }
    Ok(())
}

async fn write(s: &mut Session, chunk: Bytes) -> bool {
    let len = chunk.len() as u64;
    match s.write_response_body(Some(chunk), false).await {
        Ok(()) => {
            BLOBS.bytes_sent.inc_by(len);
            true
        }
        Err(e) => {
            log::debug!("mirror blob GET: client gone: {e}");
            s.set_keepalive(None);
            false
        }
    }
}

/// The upstream's blob body as an upload body, copying each chunk (a refcount, not the bytes)
/// to the client's queue while the client is there.
struct UpstreamBody {
    response: reqwest::Response,
    client: Option<mpsc::Sender<Bytes>>,
}

#[async_trait::async_trait]
impl BodySource for UpstreamBody {
    async fn next_chunk(&mut self) -> std::io::Result<Option<Bytes>> {
        let chunk = tokio::time::timeout(UPSTREAM_READ_TIMEOUT, self.response.chunk())
            .await
            .map_err(|_| std::io::Error::other("no data from the upstream for 60 s"))?
            .map_err(|e| std::io::Error::other(crate::storage::client::error_chain(&e)))?;
        let Some(chunk) = chunk else { return Ok(None) };
        MIRROR.upstream_bytes.inc_by(chunk.len() as u64);
        if let Some(tx) = &self.client {
            if tx.send(chunk.clone()).await.is_err() {
                self.client = None;
            }
        }
        Ok(Some(chunk))
    }
}
