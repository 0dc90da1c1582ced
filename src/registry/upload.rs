//! Blob uploads: bytes stream to the object store as they arrive, and finishing an upload is a
//! metadata operation (no server-side copy).
//!
//! The byte stream of a session is cut into multipart parts at fixed boundaries
//! (`k * part_size`), so every non-final part has the same size (R2 requires it) and a part's
//! number follows from its offset. A part whose start is at a boundary and whose bytes are all
//! announced by Content-Length streams straight into UploadPart; otherwise bytes gather in a
//! part buffer, at most two parts in memory per upload (one filling, one uploading), and all
//! part buffers together within the upload buffer budget ([`super::budget`]). Bytes of
//! an incomplete part outlive the request as the session's pending bytes in the metadata store,
//! together with the sha256 state, so any berth process can continue the session.
//!
//! State is committed at part boundaries and at the end of each request: a client that goes
//! away mid-request finds the session at the last commit (`GET` status tells where).

use bytes::{Bytes, BytesMut};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::budget::BudgetGrant;
use super::hasher::BlobHasher;
use super::names::Digest;
use super::pacing::Pacer;
use super::{unix_now, BodySource, Registry, RegistryError, RegistryResult};
use crate::config::MAX_PARTS;
use std::sync::Arc;
use std::time::Duration;

use crate::meta::{
    upload_claim, BlobRecord, Linked, MetaStore, Part, PendingChange, UploadSession,
};
use crate::metrics::{BLOBS, UPLOADS};
use crate::storage::{ObjectBody, StorageError};

/// S3's limit for a single PutObject.
const MAX_PUT_OBJECT: u64 = 5 * 1024 * 1024 * 1024;
/// Chunks queued between the request body and a streaming S3 request.
const STREAM_QUEUE: usize = 8;

impl Registry {
    pub async fn start_upload(&self, repo: &str) -> RegistryResult<UploadSession> {
        let id = uuid::Uuid::new_v4().to_string();
        let now = unix_now();
        let session = UploadSession {
            key: self.store.blob_key(&id),
            id,
            repo: repo.to_string(),
            multipart_id: None,
            parts: Vec::new(),
            offset: 0,
            hasher: BlobHasher::default().save(),
            created: now,
            updated: now,
            writer: None,
        };
        self.meta.create_upload(&session).await?;
        UPLOADS.started.inc();
        Ok(session)
    }

    pub async fn upload_status(&self, repo: &str, id: &str) -> RegistryResult<UploadSession> {
        match self.meta.upload(id).await? {
            Some(s) if s.repo == repo => Ok(s),
            _ => Err(RegistryError::BlobUploadUnknown),
        }
    }

    /// PATCH: appends the body. `range_start` is the start of Content-Range if sent; it must
    /// equal the bytes received so far.
    pub async fn append_upload(
        &self,
        repo: &str,
        id: &str,
        range_start: Option<u64>,
        content_length: Option<u64>,
        body: &mut dyn BodySource,
    ) -> RegistryResult<UploadSession> {
        let _room = self.budget.admit().await;
        let claim = self.claim_upload(id).await?;
        let result = self
            .append_claimed(repo, id, &claim, range_start, content_length, body)
            .await;
        claim.release().await;
        result
    }

    async fn append_claimed(
        &self,
        repo: &str,
        id: &str,
        claim: &UploadClaim,
        range_start: Option<u64>,
        content_length: Option<u64>,
        body: &mut dyn BodySource,
    ) -> RegistryResult<UploadSession> {
        let session = claim.session(self.upload_status(repo, id).await?);
        if let Some(start) = range_start {
            if start != session.offset {
                return Err(RegistryError::RangeInvalid {
                    offset: session.offset,
                });
            }
        }
        let appended = async {
            let mut w = PartWriter::resume(self, session, content_length).await?;
            w.write_body(body, content_length).await?;
            w.commit_tail().await?;
            Ok(std::mem::take(&mut w.session))
        }
        .await;
        self.forget_if_vanished(id, appended).await
    }

    /// PUT ?digest=: appends the (optional) final body, verifies the digest and links the blob.
    pub async fn finish_upload(
        &self,
        repo: &str,
        id: &str,
        digest: &Digest,
        content_length: Option<u64>,
        body: &mut dyn BodySource,
    ) -> RegistryResult<()> {
        let result = self
            .finish_upload_inner(repo, id, digest, content_length, body)
            .await;
        match &result {
            Ok(()) => UPLOADS.finished.inc(),
            // Unknown or busy sessions are not uploads that failed.
            Err(RegistryError::BlobUploadUnknown | RegistryError::UploadBusy) => {}
            Err(_) => UPLOADS.failed.inc(),
        }
        result
    }

    async fn finish_upload_inner(
        &self,
        repo: &str,
        id: &str,
        digest: &Digest,
        content_length: Option<u64>,
        body: &mut dyn BodySource,
    ) -> RegistryResult<()> {
        // A PUT with no body holds no body buffers.
        let _room = match content_length {
            Some(0) => None,
            _ => self.budget.admit().await,
        };
        let claim = self.claim_upload(id).await?;
        let result = self
            .finish_claimed(repo, id, &claim, digest, content_length, body)
            .await;
        claim.release().await;
        result
    }

    async fn finish_claimed(
        &self,
        repo: &str,
        id: &str,
        claim: &UploadClaim,
        digest: &Digest,
        content_length: Option<u64>,
        body: &mut dyn BodySource,
    ) -> RegistryResult<()> {
        let session = claim.session(self.upload_status(repo, id).await?);
        let finished = match content_length {
            // The whole blob in one request of known length: one streaming PutObject. Not when
            // an earlier request began a multipart upload (and went away before committing
            // anything): the parts path completes that upload instead of orphaning it.
            Some(len)
                if session.offset == 0
                    && session.multipart_id.is_none()
                    && len > 0
                    && len <= MAX_PUT_OBJECT =>
            {
                self.put_whole(session, digest, len, body).await
            }
            _ => {
                async {
                    let mut w = PartWriter::resume(self, session, content_length).await?;
                    if content_length != Some(0) {
                        w.write_body(body, content_length).await?;
                    }
                    w.finish(digest).await
                }
                .await
            }
        };
        self.forget_if_vanished(id, finished).await
    }

    /// POST ?digest=: a monolithic upload.
    pub async fn monolithic_upload(
        &self,
        repo: &str,
        digest: &Digest,
        content_length: Option<u64>,
        body: &mut dyn BodySource,
    ) -> RegistryResult<()> {
        let session = self.start_upload(repo).await?;
        let id = session.id.clone();
        let result = self
            .finish_upload(repo, &id, digest, content_length, body)
            .await;
        if result.is_err() {
            // Nobody knows this session's id: don't leave it behind. (Counted as failed by
            // finish_upload, not as cancelled.)
            if let Ok(Some(session)) = self.meta.upload(&id).await {
                let _ = self.discard_session(&session).await;
            }
        }
        result
    }

    /// DELETE on an upload: aborts the multipart upload and forgets the session.
    pub async fn cancel_upload(&self, repo: &str, id: &str) -> RegistryResult<()> {
        let claim = self.claim_upload(id).await?;
        let result = match self.upload_status(repo, id).await {
            Ok(session) => self.discard_session(&session).await,
            Err(e) => Err(e),
        };
        claim.release().await;
        result?;
        UPLOADS.cancelled.inc();
        Ok(())
    }

    /// Cross-repository mount: links `digest` into `repo` if `from` has it. False when it
    /// does not (the client then uploads normally).
    pub async fn mount_blob(
        &self,
        repo: &str,
        from: &str,
        digest: &Digest,
    ) -> RegistryResult<bool> {
        if self.meta.repo_blob(from, digest).await?.is_none() {
            return Ok(false);
        }
        Ok(self.meta.link_blob(repo, digest).await?)
    }

    /// Aborts sessions idle longer than the configured expiry, each on its own: one that
    /// cannot be discarded is logged with its cause, counted, and retried on the next pass.
    /// Err only when the idle sessions cannot be listed.
    pub async fn expire_uploads(&self) -> RegistryResult<Expired> {
        let cutoff = unix_now().saturating_sub(self.settings.session_expiry.as_secs());
        let mut pass = Expired::default();
        for session in self.meta.idle_uploads(cutoff).await? {
            let claim = match self.claim_upload(&session.id).await {
                Ok(claim) => claim,
                // Being written right now (on any node): not idle.
                Err(RegistryError::UploadBusy) => continue,
                Err(e) => return Err(e),
            };
            let expired = self.expire_session(&session).await;
            claim.release().await;
            match expired {
                Ok(()) => {
                    UPLOADS.expired.inc();
                    pass.expired += 1;
                }
                Err(e) => {
                    log::warn!("upload expiry: session {}: {}", session.id, cause(&e));
                    UPLOADS.expiry_failures.inc();
                    pass.failed += 1;
                }
            }
        }
        Ok(pass)
    }

    async fn expire_session(&self, session: &UploadSession) -> RegistryResult<()> {
        if session.multipart_id.is_none() {
            // A crash after a whole-blob PutObject and before the link leaves the object
            // behind with nothing naming it but this session.
            self.store.delete_object(&session.key).await?;
        }
        self.discard_session(session).await
    }

    /// `result` of writing session `id`: BLOB_UPLOAD_UNKNOWN there means its multipart upload
    /// is gone from the object store (a crash inside its completion, or the store lost it).
    /// Its bytes cannot be finished, so the session goes too and the client starts over.
    async fn forget_if_vanished<T>(
        &self,
        id: &str,
        result: RegistryResult<T>,
    ) -> RegistryResult<T> {
        if !matches!(result, Err(RegistryError::BlobUploadUnknown)) {
            return result;
        }
        let Ok(Some(session)) = self.meta.upload(id).await else {
            return result;
        };
        log::warn!(
            "upload {id}: its multipart upload is gone from the object store; session discarded"
        );
        // The completion may have assembled the object before the crash: nothing links it.
        let deleted = self.store.delete_object(&session.key).await;
        if let Err(e) = deleted.map_err(RegistryError::from) {
            log::warn!("upload {id}: {}", cause(&e));
        }
        if let Err(e) = self.discard_session(&session).await {
            log::warn!("upload {id}: session not discarded: {}", cause(&e));
        }
        result
    }

    async fn discard_session(&self, session: &UploadSession) -> RegistryResult<()> {
        if let Some(mp) = &session.multipart_id {
            self.store.abort_multipart(&session.key, mp).await?;
        }
        self.meta.delete_upload(&session.id).await?;
        Ok(())
    }

    /// The whole blob arrives in one request of known length and nothing came before.
    async fn put_whole(
        &self,
        session: UploadSession,
        digest: &Digest,
        len: u64,
        body: &mut dyn BodySource,
    ) -> RegistryResult<()> {
        // Already stored: verify the client really has these bytes, but don't store them again.
        if self.meta.blob(digest).await?.is_some() {
            let mut hasher = BlobHasher::new(digest.algorithm());
            let mut n = 0u64;
            while let Some(chunk) = body.next_chunk().await.map_err(client_gone)? {
                BLOBS.bytes_received.inc_by(chunk.len() as u64);
                hasher.update(&chunk);
                n += chunk.len() as u64;
            }
            check_length(n, len)?;
            if let Err(e) = check_digest(&hasher, digest) {
                // As below (and as distribution does): a digest mismatch ends the session.
                self.meta.delete_upload(&session.id).await?;
                return Err(e);
            }
            if !self.link_existing(&session, digest).await? {
                // Collected since it was looked up, and these bytes were not kept.
                self.meta.delete_upload(&session.id).await?;
                return Err(RegistryError::Unavailable(format!(
                    "blob {digest} was garbage-collected during the upload: upload it again"
                )));
            }
            return Ok(());
        }

        let (tx, rx) = mpsc::channel(STREAM_QUEUE);
        let store = self.store.clone();
        let key = session.key.clone();
        let put = tokio::spawn(async move {
            store
                .put_object(&key, ObjectBody::Stream { len, chunks: rx })
                .await
        });
        let mut hasher = BlobHasher::new(digest.algorithm());
        let mut n = 0u64;
        let mut pacer = Pacer::default();
        let read = async {
            while let Some(chunk) = body.next_chunk().await.map_err(client_gone)? {
                pacer.moved(chunk.len()).await;
                BLOBS.bytes_received.inc_by(chunk.len() as u64);
                n += chunk.len() as u64;
                if n > len {
                    return Err(RegistryError::SizeInvalid(
                        "body longer than Content-Length".into(),
                    ));
                }
                hasher.update(&chunk);
                if tx.send(Ok(chunk)).await.is_err() {
                    // The PUT failed; its error is reported below, not the short read.
                    return Ok(false);
                }
            }
            Ok(true)
        }
        .await;
        drop(tx);
        let stored = join(put).await;
        let outcome = match read {
            Ok(false) => stored.and_then(|_| check_length(n, len)),
            read => read
                .and_then(|_| check_length(n, len))
                .and(stored)
                .and_then(|_| check_digest(&hasher, digest)),
        };
        if let Err(e) = outcome {
            // Never leave bytes where they could be served under a digest they don't have.
            let _ = self.store.delete_object(&session.key).await;
            if matches!(e, RegistryError::DigestInvalid(_)) {
                self.meta.delete_upload(&session.id).await?;
            }
            return Err(e);
        }
        self.link_finished(&session, &session.key, digest, len)
            .await
    }

    /// Links the already stored `digest` into the session's repository and ends the session.
    /// False (the session stays) if the digest is no longer stored: garbage collection took it
    /// after it was looked up. The link is made in the store's transaction, never from a
    /// record read earlier, so a collected blob's record never comes back.
    async fn link_existing(
        &self,
        session: &UploadSession,
        digest: &Digest,
    ) -> RegistryResult<bool> {
        if !self.meta.link_blob(&session.repo, digest).await? {
            return Ok(false);
        }
        self.meta.delete_upload(&session.id).await?;
        Ok(true)
    }

    /// Records the finished blob, its bytes at `key`.
    async fn link_finished(
        &self,
        session: &UploadSession,
        key: &str,
        digest: &Digest,
        size: u64,
    ) -> RegistryResult<()> {
        let record = BlobRecord {
            key: key.to_owned(),
            size,
        };
        match self
            .meta
            .finish_upload(&session.id, &session.repo, digest, record)
            .await?
        {
            Linked::New => Ok(()),
            // Someone stored the same bytes first: this copy is redundant (unless it is the
            // very object the index points to: the same verified key written twice).
            Linked::Existing(existing) => {
                if existing.key != key {
                    if let Err(e) = self.store.delete_object(key).await {
                        log::warn!("could not delete redundant copy {key}: {e}");
                    }
                }
                Ok(())
            }
        }
    }

    /// Reads the object at `key` back and checks that its bytes have `digest`.
    async fn verify_stored(&self, key: &str, digest: &Digest) -> RegistryResult<()> {
        let mut stream = self.store.get_stream(key, None).await?;
        if stream.status() != 200 {
            return Err(RegistryError::Internal(format!(
                "reading {key} back to verify it: HTTP {}",
                stream.status()
            )));
        }
        let mut hasher = BlobHasher::new(digest.algorithm());
        while let Some(chunk) = stream.chunk().await? {
            hasher.update(&chunk);
        }
        check_digest(&hasher, digest)
    }

    /// Makes this request the only writer of the session, on every node sharing the
    /// metadata store, until the claim is released (or its node dies and it expires).
    async fn claim_upload(&self, id: &str) -> RegistryResult<UploadClaim> {
        let name = upload_claim(id);
        let holder = uuid::Uuid::new_v4().to_string();
        if !self.meta.claim(&name, &holder, CLAIM_TTL).await? {
            return Err(RegistryError::UploadBusy);
        }
        UPLOADS.in_progress.inc();
        // Renewed while the request runs, however slowly its client sends.
        let renew = tokio::spawn({
            let (meta, name, holder) = (self.meta.clone(), name.clone(), holder.clone());
            async move {
                let mut tick = tokio::time::interval(CLAIM_RENEW);
                tick.tick().await;
                loop {
                    tick.tick().await;
                    match meta.claim(&name, &holder, CLAIM_TTL).await {
                        Ok(true) => {}
                        // Expired and taken: this writer's next save is refused.
                        Ok(false) => return log::warn!("{name}: claim lost to another writer"),
                        Err(e) => log::warn!("{name}: claim not renewed: {e}"),
                    }
                }
            }
        });
        Ok(UploadClaim {
            meta: self.meta.clone(),
            name,
            holder,
            renew,
            released: false,
        })
    }
}

/// What one expiry pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Expired {
    pub expired: usize,
    /// Sessions that could not be discarded (logged; retried on the next pass).
    pub failed: usize,
}

/// The cause of an error for the log: the internal detail, not just the client message.
fn cause(e: &RegistryError) -> String {
    match e {
        RegistryError::Internal(c) | RegistryError::Unavailable(c) => c.clone(),
        other => other.to_string(),
    }
}

/// How long a writer's claim on a session lasts unrenewed: the longest a session stays busy
/// after its writer's node died.
const CLAIM_TTL: Duration = Duration::from_secs(10);
const CLAIM_RENEW: Duration = Duration::from_secs(3);

/// One writer per session at a time. [`UploadClaim::release`] ends it before the response is
/// sent (the client's next request may reach another node at once); a claim dropped without
/// it (a panic) is released in the background.
struct UploadClaim {
    meta: Arc<dyn MetaStore>,
    name: String,
    holder: String,
    renew: JoinHandle<()>,
    released: bool,
}

impl UploadClaim {
    /// `session`, to be saved under this claim.
    fn session(&self, mut session: UploadSession) -> UploadSession {
        session.writer = Some(self.holder.clone());
        session
    }

    async fn release(mut self) {
        self.renew.abort();
        if let Err(e) = self.meta.release(&self.name, &self.holder).await {
            // It expires by itself.
            log::warn!("{}: release: {e}", self.name);
        }
        self.released = true;
    }
}

impl Drop for UploadClaim {
    fn drop(&mut self) {
        UPLOADS.in_progress.dec();
        if self.released {
            return;
        }
        self.renew.abort();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let (meta, name, holder) = (self.meta.clone(), self.name.clone(), self.holder.clone());
            rt.spawn(async move { meta.release(&name, &holder).await });
        }
    }
}

/// Bytes of a full part on their way to the object store, in `berth_upload_buffered_bytes`
/// until they are freed.
struct HeldBytes(u64);

impl HeldBytes {
    fn new(n: u64) -> Self {
        UPLOADS.buffered_bytes.add(n as i64);
        HeldBytes(n)
    }
}

impl Drop for HeldBytes {
    fn drop(&mut self) {
        UPLOADS.buffered_bytes.sub(self.0 as i64);
    }
}

/// A part being uploaded while the next one fills.
struct InFlight {
    handle: JoinHandle<Result<String, StorageError>>,
    number: u32,
    size: u64,
    /// Session offset and hasher state once this part is stored.
    end_offset: u64,
    hasher_state: Vec<u8>,
}

/// Streams a request body into the session's parts.
struct PartWriter<'a> {
    reg: &'a Registry,
    session: UploadSession,
    hasher: BlobHasher,
    part_size: u64,
    /// Bytes received, committed or not.
    received: u64,
    /// Bytes of the current part not yet uploaded (starts with the stored pending bytes).
    buf: BytesMut,
    /// The budget for `buf`'s memory; None while there is no part buffer.
    grant: Option<BudgetGrant>,
    /// `buf[fresh_from..]` is not in the store's pending bytes yet.
    fresh_from: usize,
    /// The store holds pending bytes that are now part of `buf`.
    pending_stored: bool,
    in_flight: Option<InFlight>,
    /// A part streaming straight from the body: its channel and bytes still to send.
    direct: Option<(mpsc::Sender<std::io::Result<Bytes>>, u64)>,
    /// What this writer adds to `berth_upload_buffered_bytes` now.
    buffered_reported: u64,
}

impl Drop for PartWriter<'_> {
    fn drop(&mut self) {
        UPLOADS.buffered_bytes.sub(self.buffered_reported as i64);
    }
}

impl<'a> PartWriter<'a> {
    /// `content_length`: of the request about to be written, if known (sizes the part buffer
    /// that the session's pending bytes start).
    async fn resume(
        reg: &'a Registry,
        session: UploadSession,
        content_length: Option<u64>,
    ) -> RegistryResult<PartWriter<'a>> {
        let hasher = BlobHasher::resume(&session.hasher)
            .ok_or_else(|| RegistryError::Internal("unreadable hasher state".into()))?;
        let in_parts: u64 = session.parts.iter().map(|p| p.size).sum();
        let pending_len = session.offset - in_parts;
        let part_size = reg.settings.part_size;
        let mut buf = BytesMut::new();
        let mut grant = None;
        if pending_len > 0 {
            // Room for the whole part first (see budget.rs), then the stored bytes.
            let want = content_length.map_or(part_size, |n| (pending_len + n).min(part_size));
            grant = Some(reg.budget.acquire(want).await);
            buf.reserve(want as usize);
            let pending = reg.meta.pending(&session.id).await?;
            if pending.len() as u64 != pending_len {
                return Err(RegistryError::Internal(format!(
                    "upload {}: {} pending bytes stored, {} expected",
                    session.id,
                    pending.len(),
                    pending_len
                )));
            }
            buf.extend_from_slice(&pending);
        }
        Ok(PartWriter {
            reg,
            part_size,
            received: session.offset,
            fresh_from: buf.len(),
            pending_stored: pending_len > 0,
            buf,
            grant,
            hasher,
            session,
            in_flight: None,
            direct: None,
            buffered_reported: 0,
        })
        .map(|mut w: PartWriter<'a>| {
            w.report_buffered();
            w
        })
    }

    /// Reads the whole body into parts. On error the session keeps its last committed state.
    async fn write_body(
        &mut self,
        body: &mut dyn BodySource,
        content_length: Option<u64>,
    ) -> RegistryResult<()> {
        let result = self.pump(body, content_length).await;
        // Ends a direct part's request; one that lacks bytes then fails and is not committed.
        self.direct = None;
        let settled = self.settle_in_flight().await;
        result?;
        settled
    }

    async fn pump(
        &mut self,
        body: &mut dyn BodySource,
        content_length: Option<u64>,
    ) -> RegistryResult<()> {
        let mut remaining = content_length;
        let mut pacer = Pacer::default();
        while let Some(mut chunk) = body.next_chunk().await.map_err(client_gone)? {
            pacer.moved(chunk.len()).await;
            BLOBS.bytes_received.inc_by(chunk.len() as u64);
            if let Some(r) = remaining.as_mut() {
                *r = r.checked_sub(chunk.len() as u64).ok_or_else(|| {
                    RegistryError::SizeInvalid("body longer than Content-Length".into())
                })?;
            }
            while !chunk.is_empty() {
                // At a part boundary with the whole part announced: stream it straight through.
                let at_boundary = self.buf.is_empty() && self.direct.is_none();
                let announced = chunk.len() as u64 + remaining.unwrap_or(0);
                if at_boundary && content_length.is_some() && announced >= self.part_size {
                    self.start_direct_part().await?;
                }
                if let Some((tx, left)) = self.direct.as_mut() {
                    let n = (*left).min(chunk.len() as u64) as usize;
                    let piece = chunk.split_to(n);
                    *left -= n as u64;
                    let done = *left == 0;
                    self.hasher.update(&piece);
                    self.received += n as u64;
                    if tx.send(Ok(piece)).await.is_err() {
                        // The part request failed; settle_in_flight reports why.
                        return Ok(());
                    }
                    if done {
                        // The part has all its bytes: this is its committed state.
                        self.direct = None;
                        if let Some(part) = self.in_flight.as_mut() {
                            part.hasher_state = self.hasher.save();
                        }
                    }
                    continue;
                }
                if self.grant.is_none() {
                    // A new part buffer: its whole size is granted before it starts filling,
                    // and meanwhile the body is not read.
                    let want = match remaining {
                        Some(r) => (chunk.len() as u64 + r).min(self.part_size),
                        None => self.part_size,
                    };
                    self.grant = Some(self.reg.budget.acquire(want).await);
                    self.buf.reserve(want as usize);
                    self.report_buffered();
                }
                let room = (self.part_size - self.buf.len() as u64) as usize;
                let piece = chunk.split_to(room.min(chunk.len()));
                self.hasher.update(&piece);
                self.buf.extend_from_slice(&piece);
                self.received += piece.len() as u64;
                if self.buf.len() as u64 == self.part_size {
                    let part = std::mem::take(&mut self.buf).freeze();
                    let grant = self.grant.take().expect("a filling buffer has its grant");
                    self.fresh_from = 0;
                    self.start_buffered_part(part, grant).await?;
                }
            }
        }
        if remaining.is_some_and(|r| r > 0) {
            return Err(RegistryError::SizeInvalid(
                "body shorter than Content-Length".into(),
            ));
        }
        Ok(())
    }

    /// Number of the part that starts at `received`.
    fn next_part_number(&self, part_len: u64) -> RegistryResult<u32> {
        let start = self.received - part_len;
        let number = start / self.part_size + 1;
        if number > MAX_PARTS {
            return Err(RegistryError::SizeInvalid(format!(
                "blob exceeds {} parts of {} bytes",
                MAX_PARTS, self.part_size
            )));
        }
        Ok(number as u32)
    }

    async fn multipart_id(&mut self) -> RegistryResult<String> {
        if let Some(id) = &self.session.multipart_id {
            return Ok(id.clone());
        }
        let id = self.reg.store.create_multipart(&self.session.key).await?;
        self.session.multipart_id = Some(id.clone());
        self.session.updated = unix_now();
        // Saved at once so that cancel or expiry can abort it.
        self.reg
            .meta
            .save_upload(&self.session, PendingChange::default())
            .await?;
        Ok(id)
    }

    /// Uploads a full part buffer; its grant ends with the upload, when the bytes are freed.
    async fn start_buffered_part(&mut self, part: Bytes, grant: BudgetGrant) -> RegistryResult<()> {
        // The bytes leave this writer's buffer; they stay counted until freed, as the grant.
        let held = HeldBytes::new(part.len() as u64);
        self.report_buffered();
        self.settle_in_flight().await?;
        let size = part.len() as u64;
        let number = self.next_part_number(size)?;
        let upload_id = self.multipart_id().await?;
        let store = self.reg.store.clone();
        let key = self.session.key.clone();
        let handle = tokio::spawn(async move {
            let stored = store
                .upload_part(&key, &upload_id, number, ObjectBody::Bytes(part))
                .await;
            drop((grant, held));
            stored
        });
        self.in_flight = Some(InFlight {
            handle,
            number,
            size,
            end_offset: self.received,
            hasher_state: self.hasher.save(),
        });
        Ok(())
    }

    async fn start_direct_part(&mut self) -> RegistryResult<()> {
        self.settle_in_flight().await?;
        let size = self.part_size;
        let number = self.next_part_number(0)?;
        let upload_id = self.multipart_id().await?;
        let (tx, rx) = mpsc::channel(STREAM_QUEUE);
        let store = self.reg.store.clone();
        let key = self.session.key.clone();
        let handle = tokio::spawn(async move {
            let body = ObjectBody::Stream {
                len: size,
                chunks: rx,
            };
            store.upload_part(&key, &upload_id, number, body).await
        });
        self.in_flight = Some(InFlight {
            handle,
            number,
            size,
            end_offset: self.received + size,
            hasher_state: Vec::new(), // set when the part's last byte has been hashed
        });
        self.direct = Some((tx, size));
        Ok(())
    }

    /// Brings `berth_upload_buffered_bytes` up to date with this writer's buffers.
    fn report_buffered(&mut self) {
        let now = self.buf.capacity() as u64;
        let delta = now as i64 - self.buffered_reported as i64;
        if delta != 0 {
            UPLOADS.buffered_bytes.add(delta);
            self.buffered_reported = now;
        }
    }

    /// Waits for the part in flight and commits it.
    async fn settle_in_flight(&mut self) -> RegistryResult<()> {
        let Some(part) = self.in_flight.take() else {
            return Ok(());
        };
        // A direct part gets its hasher state only once all its bytes went through.
        let complete = !part.hasher_state.is_empty();
        let result = join(part.handle).await;
        if !complete {
            return Err(result
                .err()
                .unwrap_or_else(|| RegistryError::SizeInvalid("body ended inside a part".into())));
        }
        let etag = result?;
        self.session.parts.push(Part {
            number: part.number,
            etag,
            size: part.size,
        });
        self.session.offset = part.end_offset;
        self.session.hasher = part.hasher_state;
        self.session.updated = unix_now();
        let clear = std::mem::take(&mut self.pending_stored);
        self.reg
            .meta
            .save_upload(
                &self.session,
                PendingChange {
                    clear,
                    append: None,
                },
            )
            .await?;
        Ok(())
    }

    /// End of a PATCH: the bytes of the incomplete part become pending bytes in the store.
    async fn commit_tail(&mut self) -> RegistryResult<()> {
        let fresh = self.buf.split_off(self.fresh_from).freeze();
        self.session.offset = self.received;
        self.session.hasher = self.hasher.save();
        self.session.updated = unix_now();
        self.reg
            .meta
            .save_upload(
                &self.session,
                PendingChange {
                    clear: false,
                    append: (!fresh.is_empty()).then_some(fresh),
                },
            )
            .await?;
        Ok(())
    }

    /// PUT ?digest=: the buffered bytes are the last part; verify, complete, link.
    async fn finish(mut self, digest: &Digest) -> RegistryResult<()> {
        // Sessions hash sha256 as bytes arrive: the algorithm is only known now. Another one
        // is verified by reading the stored bytes back once, before they are linked.
        let hashed = self.hasher.algorithm() == digest.algorithm();
        if hashed {
            if let Err(e) = check_digest(&self.hasher, digest) {
                self.reg.discard_session(&self.session).await?;
                return Err(e);
            }
        }
        let key = self.session.key.clone();
        // The bytes are already stored (a re-push): link those and drop this copy before it is
        // ever completed, rather than writing it and deleting it again. If they were collected
        // in between, this copy is completed as a new blob below. (Not for a digest hashed
        // only after the upload: these bytes are unverified until read back.)
        if hashed
            && self.reg.meta.blob(digest).await?.is_some()
            && self.reg.link_existing(&self.session, digest).await?
        {
            if let Some(upload_id) = &self.session.multipart_id {
                if let Err(e) = self.reg.store.abort_multipart(&key, upload_id).await {
                    log::warn!("could not abort redundant upload {key}: {e}");
                }
            }
            return Ok(());
        }
        let last = self.buf.split().freeze();
        let mut key = key;
        match self.session.multipart_id.clone() {
            None => {
                // Smaller than one part: a single PutObject. The bytes are in memory and
                // verified, so they go to their digest's key, which is itself the bucket's
                // record of the blob (no journal record needed). Unverified ones (a digest
                // hashed only after the upload) keep the session's key.
                if hashed {
                    if let Some(verified) =
                        self.reg.store.verified_blob_key(digest, &self.session.repo)
                    {
                        key = verified;
                    }
                }
                self.reg
                    .store
                    .put_object(&key, ObjectBody::Bytes(last))
                    .await?;
            }
            Some(upload_id) => {
                if !last.is_empty() {
                    let size = last.len() as u64;
                    let number = self.next_part_number(size)?;
                    let etag = self
                        .reg
                        .store
                        .upload_part(&key, &upload_id, number, ObjectBody::Bytes(last))
                        .await?;
                    self.session.parts.push(Part { number, etag, size });
                }
                let parts: Vec<(u32, String)> = self
                    .session
                    .parts
                    .iter()
                    .map(|p| (p.number, p.etag.clone()))
                    .collect();
                self.reg
                    .store
                    .complete_multipart(&key, &upload_id, &parts)
                    .await?;
            }
        }
        if !hashed {
            if let Err(e) = self.reg.verify_stored(&key, digest).await {
                // Never leave bytes where they could be served under a digest they don't have.
                let _ = self.reg.store.delete_object(&key).await;
                if matches!(e, RegistryError::DigestInvalid(_)) {
                    self.reg.meta.delete_upload(&self.session.id).await?;
                }
                return Err(e);
            }
        }
        self.reg
            .link_finished(&self.session, &key, digest, self.received)
            .await
    }
}

fn check_digest(hasher: &BlobHasher, expected: &Digest) -> RegistryResult<()> {
    let actual = hasher.digest();
    if &actual == expected {
        Ok(())
    } else {
        Err(RegistryError::DigestInvalid(format!(
            "expected {expected}, content has {actual}"
        )))
    }
}

fn check_length(actual: u64, announced: u64) -> RegistryResult<()> {
    if actual == announced {
        Ok(())
    } else {
        Err(RegistryError::SizeInvalid(format!(
            "Content-Length {announced}, body {actual} bytes"
        )))
    }
}

fn client_gone(e: std::io::Error) -> RegistryError {
    RegistryError::BlobUploadInvalid(format!("reading the request body: {e}"))
}

async fn join<T>(h: JoinHandle<Result<T, StorageError>>) -> Result<T, RegistryError> {
    match h.await {
        Ok(r) => r.map_err(RegistryError::from),
        Err(e) => Err(RegistryError::Internal(format!("upload task: {e}"))),
    }
}
