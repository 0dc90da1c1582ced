//! The metadata store: repositories, tags, manifests, the blob index, upload sessions and
//! referrers. Every metadata call the registry answers is served from here, never from the
//! object store.
//!
//! [`MetaStore`] is the seam between backends and the HTTP and registry layers, which only see
//! this trait. [`redb::RedbStore`] is the embedded default for one node;
//! [`postgres::PgStore`] lets many berth nodes share one database.
//!
//! Every method is one atomic transaction: a crash leaves either the old or the new state.

pub mod copy;
pub mod instrumented;
pub mod journal;
pub mod postgres;
pub mod redb;

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::registry::names::Digest;

#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    /// Anything that is not the store being away: a bug, a corrupt record (500).
    #[error("metadata store: {0}")]
    Failed(String),
    /// The store cannot serve this now (disk full, database down): clients retry (503).
    #[error("metadata store unavailable: {0}")]
    Unavailable(String),
}

impl MetaError {
    /// The same kind of error, its message prefixed with `what`.
    pub fn context(self, what: impl std::fmt::Display) -> MetaError {
        match self {
            MetaError::Failed(m) => MetaError::Failed(format!("{what}: {m}")),
            MetaError::Unavailable(m) => MetaError::Unavailable(format!("{what}: {m}")),
        }
    }
}

pub type MetaResult<T> = Result<T, MetaError>;

/// Where a blob's bytes live in the bucket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobRecord {
    /// Full object key (prefix included).
    pub key: String,
    pub size: u64,
}

/// A manifest as pushed: served back byte-exact with its media type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestRecord {
    pub media_type: String,
    pub body: Bytes,
    /// The manifest's `subject`, if any (it is then listed by the referrers API).
    pub subject: Option<Digest>,
    /// What the manifest references, deduplicated, in first-seen order: an image manifest's
    /// config and layers (not foreign ones, which live elsewhere), an index's manifests. Not
    /// the subject. Computed once at PUT ([`crate::registry::manifest::references`]); the
    /// reference index that garbage collection relies on is kept from it.
    pub references: Vec<Digest>,
}

/// What [`MetaStore::put_manifest`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ManifestPut {
    Stored,
    /// Nothing changed: this reference is, at commit, neither a blob linked to the repository
    /// nor a manifest of it (collected, unlinked or deleted since the registry checked).
    MissingReference(Digest),
}

/// Something the collector must look at again: a blob (its record and all its repository
/// links) or one repository's manifest.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Candidate {
    Blob(Digest),
    Manifest { repo: String, digest: Digest },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CandidateKind {
    Blob,
    Manifest,
}

impl Candidate {
    pub fn kind(&self) -> CandidateKind {
        match self {
            Candidate::Blob(_) => CandidateKind::Blob,
            Candidate::Manifest { .. } => CandidateKind::Manifest,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuedCandidate {
    pub candidate: Candidate,
    /// Unix seconds it was last touched (queued or queued again).
    pub since: u64,
}

/// A tag with what retention policies look at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TagInfo {
    pub tag: String,
    pub digest: Digest,
    /// Unix seconds of the last PUT that pointed the tag (tags older than the reference index:
    /// the time it was built).
    pub updated: u64,
}

/// What [`MetaStore::collect_blob`] did, in one transaction.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BlobCollection {
    /// Repositories whose link was removed (none of their manifests references the blob).
    pub unlinked: Vec<String>,
    /// The blob's record, now gone from the index: its object may be deleted. None when the
    /// blob is still referenced, not due, or unknown.
    pub deleted: Option<BlobRecord>,
    /// Repositories that left the catalog (nothing left in them).
    pub pruned: Vec<String>,
}

/// An entry for the referrers index: the descriptor (JSON object, ready to embed in the
/// referrers response) of a manifest whose `subject` is `subject`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Referrer {
    pub subject: Digest,
    pub descriptor: Bytes,
}

/// One uploaded multipart part.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Part {
    pub number: u32,
    pub etag: String,
    pub size: u64,
}

/// An upload session. Bytes received are either in uploaded `parts` or, for the part not yet
/// complete, in the store's pending bytes for the session (`offset - sum(parts.size)` bytes).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UploadSession {
    /// UUID, as in the upload URL.
    pub id: String,
    pub repo: String,
    /// Object key the bytes are written to; becomes the blob's key when the upload finishes.
    pub key: String,
    /// S3 multipart upload id, once the first part has been started.
    pub multipart_id: Option<String>,
    pub parts: Vec<Part>,
    /// Bytes received so far.
    pub offset: u64,
    /// Serialized sha256 state over the first `offset` bytes.
    pub hasher: Vec<u8>,
    /// Unix seconds.
    pub created: u64,
    /// Unix seconds of the last change (idle sessions expire from here).
    pub updated: u64,
    /// The holder of the session's claim ([`upload_claim`]) this copy is written under: a save
    /// is refused once that claim has passed to another writer, so two writers (on two nodes)
    /// never both commit. None: unfenced. Not stored.
    #[serde(skip)]
    pub writer: Option<String>,
}

/// The claim name ([`MetaStore::claim`]) that makes one request the only writer of upload `id`.
pub fn upload_claim(id: &str) -> String {
    format!("upload:{id}")
}

/// What to do with a session's pending (not yet uploaded as a part) bytes when saving it.
#[derive(Debug, Clone, Default)]
pub struct PendingChange {
    /// Drop the pending bytes stored so far (they went into an uploaded part).
    pub clear: bool,
    /// Then append these bytes.
    pub append: Option<Bytes>,
}

/// Outcome of linking a finished upload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Linked {
    /// The digest is new: its bytes are the record given.
    New,
    /// The digest was already stored: the repository now links to this existing record and
    /// the caller's new copy is redundant (delete it).
    Existing(BlobRecord),
}

#[async_trait]
pub trait MetaStore: Send + Sync + 'static {
    // ---- claims: one holder at a time, across every node sharing the store ----
    /// Makes `holder` the only holder of `name` until `ttl` from now, or renews the claim it
    /// already has. False if another holder's claim has not expired. Claims name an upload
    /// session's writer ([`upload_claim`]) or the node running a background task.
    async fn claim(&self, name: &str, holder: &str, ttl: Duration) -> MetaResult<bool>;
    /// Ends `holder`'s claim on `name`, if it still has it.
    async fn release(&self, name: &str, holder: &str) -> MetaResult<()>;

    // ---- blobs ----
    /// The global blob index, whatever repository links it.
    async fn blob(&self, digest: &Digest) -> MetaResult<Option<BlobRecord>>;
    /// The blob if (and only if) `repo` links it.
    async fn repo_blob(&self, repo: &str, digest: &Digest) -> MetaResult<Option<BlobRecord>>;
    /// Links an already-stored blob into `repo` (cross-repository mount). False if the digest
    /// is not in the global index.
    async fn link_blob(&self, repo: &str, digest: &Digest) -> MetaResult<bool>;
    /// Adopts blobs whose bytes are already in the bucket under the keys given (`berth
    /// import`: another registry's objects): for each, adds `digest -> record` to the global
    /// index unless the digest is already there (the stored record then stays), and links the
    /// digest into `repo`. The whole batch is one transaction. Returns, in order, what each
    /// digest was.
    async fn adopt_blobs(
        &self,
        repo: &str,
        blobs: &[(Digest, BlobRecord)],
    ) -> MetaResult<Vec<Linked>>;
    /// Removes `repo`'s link to the blob (queueing the blob for collection). False if it was
    /// not linked.
    async fn unlink_blob(&self, repo: &str, digest: &Digest) -> MetaResult<bool>;

    // ---- manifests and tags ----
    /// Stores the manifest under `repo`, points `tag` at it if given, and records it in the
    /// referrers index when it has a subject. Re-putting the same digest replaces the record.
    /// Every reference must, at commit, be a blob linked to `repo` or a manifest of `repo`
    /// (else [`ManifestPut::MissingReference`] and nothing changes): a blob collected between
    /// the registry's check and this commit never ends up under a stored manifest.
    async fn put_manifest(
        &self,
        repo: &str,
        digest: &Digest,
        record: ManifestRecord,
        tag: Option<&str>,
        referrer: Option<Referrer>,
    ) -> MetaResult<ManifestPut>;
    async fn manifest(&self, repo: &str, digest: &Digest) -> MetaResult<Option<ManifestRecord>>;
    /// The manifest `tag` points at in `repo`, with its digest, read in one snapshot (a
    /// concurrent re-tag or delete never yields a digest without its manifest).
    async fn tagged_manifest(
        &self,
        repo: &str,
        tag: &str,
    ) -> MetaResult<Option<(Digest, ManifestRecord)>>;
    /// Deletes the manifest, every tag of `repo` pointing at it, and its referrers entry;
    /// queues what that may have freed (references no longer referenced in `repo`, its
    /// referrers); an emptied repository leaves the catalog.
    async fn delete_manifest(&self, repo: &str, digest: &Digest) -> MetaResult<bool>;
    /// Deletes the tag, queueing the manifest it pointed at.
    async fn delete_tag(&self, repo: &str, tag: &str) -> MetaResult<bool>;
    /// Tags of `repo` in lexical order, strictly after `last`, at most `limit`.
    async fn tags(&self, repo: &str, last: Option<&str>, limit: usize) -> MetaResult<Vec<String>>;
    /// Repositories (any with a blob linked or a manifest; emptied ones leave) in lexical order,
    /// strictly after `last`, at most `limit`.
    async fn repositories(&self, last: Option<&str>, limit: usize) -> MetaResult<Vec<String>>;
    async fn repository_exists(&self, repo: &str) -> MetaResult<bool>;
    /// Descriptors of the manifests in `repo` whose subject is `subject`, ordered by digest.
    async fn referrers(&self, repo: &str, subject: &Digest) -> MetaResult<Vec<Bytes>>;

    // ---- upload sessions ----
    async fn create_upload(&self, session: &UploadSession) -> MetaResult<()>;
    async fn upload(&self, id: &str) -> MetaResult<Option<UploadSession>>;
    /// Pending bytes of the session, concatenated in the order they were appended.
    async fn pending(&self, id: &str) -> MetaResult<Bytes>;
    /// Saves the session and applies `pending` in the same transaction. With `session.writer`
    /// set, fails with [`MetaError::Unavailable`] (the client may retry) unless that writer
    /// still holds the session's claim.
    async fn save_upload(&self, session: &UploadSession, pending: PendingChange) -> MetaResult<()>;
    /// Removes the session, its pending bytes and its claim. False if there was no such session.
    async fn delete_upload(&self, id: &str) -> MetaResult<bool>;
    /// Sessions whose `updated` is older than `cutoff` (unix seconds).
    async fn idle_uploads(&self, cutoff: u64) -> MetaResult<Vec<UploadSession>>;
    /// Finishes an upload atomically: deletes the session, its pending bytes and claim, adds
    /// `digest -> record` to the global index unless the digest is already there, and links
    /// the digest into `repo`.
    async fn finish_upload(
        &self,
        id: &str,
        repo: &str,
        digest: &Digest,
        record: BlobRecord,
    ) -> MetaResult<Linked>;

    // ---- bucket journal (meta::journal) ----
    /// The journal watermark: every bucket journal record whose key sorts at or before
    /// `journal/<watermark>` has been applied to this store. None for a store that never
    /// applied or wrote one (a fresh store).
    async fn journal_watermark(&self) -> MetaResult<Option<String>>;
    async fn set_journal_watermark(&self, watermark: &str) -> MetaResult<()>;
    /// Orders the journal records of writes to the same items across every node sharing this
    /// store: holds `stripes` (sorted, deduplicated) against the other nodes until the guard is
    /// released (after the local commit), and names the time (unix ms) the records written
    /// under it carry: at or after `at_ms`, and after every earlier record of these stripes,
    /// whichever node wrote it and whatever its clock. None (the default): one process writes
    /// the store (redb), and the journal's own locks order its records.
    async fn journal_order(
        &self,
        _stripes: &[u32],
        _at_ms: u64,
    ) -> MetaResult<Option<Box<dyn journal::OrderGuard>>> {
        Ok(None)
    }
    /// For a catch-up replaying a record while other nodes serve: holds `stripes` (sorted,
    /// deduplicated) against the other nodes as [`MetaStore::journal_order`] does, but does not
    /// move them, and says each one's last record time. None (the default): one process writes
    /// the store, and nobody wrote it since the records were.
    async fn journal_stripes(&self, _stripes: &[u32]) -> MetaResult<Option<journal::HeldStripes>> {
        Ok(None)
    }

    // ---- garbage collection (see src/gc/mod.rs for what is garbage) ----
    /// Queued candidates of `kind` touched at or before `cutoff`, oldest first, at most
    /// `limit`.
    async fn gc_candidates(
        &self,
        kind: CandidateKind,
        cutoff: u64,
        limit: usize,
    ) -> MetaResult<Vec<QueuedCandidate>>;
    /// Number of queued candidates (both kinds).
    async fn gc_queue_len(&self) -> MetaResult<u64>;
    /// Queues each candidate at `now` unless it is queued already (its time then stays);
    /// returns how many were not queued before.
    async fn gc_enqueue(&self, candidates: &[Candidate], now: u64) -> MetaResult<u64>;
    /// Removes the candidates from the queue where they are there.
    async fn gc_dequeue(&self, candidates: &[Candidate]) -> MetaResult<()>;
    /// The collection decision and the metadata delete in one transaction. Nothing changes
    /// unless the blob is queued with a time at or before `cutoff`. Then: every link whose
    /// repository has no manifest referencing the blob goes; if no manifest anywhere
    /// references it, its record and remaining links go too (returned in `deleted`: delete
    /// the object only now); the candidate is dequeued; emptied repositories leave the catalog.
    async fn collect_blob(&self, digest: &Digest, cutoff: u64) -> MetaResult<BlobCollection>;
    /// [`MetaStore::collect_blob`] for each digest, in order; a backend may do them all in one
    /// transaction (one commit instead of one per blob). Each blob's decision is its own: one
    /// not due, or still referenced, changes nothing for the others.
    async fn collect_blobs(
        &self,
        digests: &[Digest],
        cutoff: u64,
    ) -> MetaResult<Vec<BlobCollection>> {
        let mut out = Vec::with_capacity(digests.len());
        for digest in digests {
            out.push(self.collect_blob(digest, cutoff).await?);
        }
        Ok(out)
    }
    /// In one transaction: deletes the manifest (as [`MetaStore::delete_manifest`] does) if it
    /// is queued with a time at or before `cutoff`, no tag points at it, no manifest of `repo`
    /// references it and its subject is not a manifest of `repo`; returns its record. Otherwise
    /// None, and the candidate is dequeued unless it was merely not due.
    async fn collect_manifest(
        &self,
        repo: &str,
        digest: &Digest,
        cutoff: u64,
    ) -> MetaResult<Option<ManifestRecord>>;
    /// Blob records in digest order, strictly after `after`, at most `limit`.
    async fn blobs(
        &self,
        after: Option<&Digest>,
        limit: usize,
    ) -> MetaResult<Vec<(Digest, BlobRecord)>>;
    /// Whether any manifest in any repository references `digest`.
    async fn is_referenced(&self, digest: &Digest) -> MetaResult<bool>;
    /// Those of `digests` no manifest references, in order ([`MetaStore::is_referenced`] for
    /// each; a backend may answer them all in one read).
    async fn unreferenced(&self, digests: &[Digest]) -> MetaResult<Vec<Digest>> {
        let mut out = Vec::new();
        for digest in digests {
            if !self.is_referenced(digest).await? {
                out.push(digest.clone());
            }
        }
        Ok(out)
    }
    /// Digests of `repo`'s manifests in order, strictly after `after`, at most `limit`.
    async fn repo_manifests(
        &self,
        repo: &str,
        after: Option<&Digest>,
        limit: usize,
    ) -> MetaResult<Vec<Digest>>;
    /// As [`MetaStore::tags`], with each tag's digest and update time.
    async fn tag_details(
        &self,
        repo: &str,
        last: Option<&str>,
        limit: usize,
    ) -> MetaResult<Vec<TagInfo>>;
    /// Deletes `tag` only if it still points at `digest` (a tag re-pushed after a retention
    /// decision stays), queueing the manifest like [`MetaStore::delete_tag`].
    async fn delete_tag_if(&self, repo: &str, tag: &str, digest: &Digest) -> MetaResult<bool>;

    // ---- health ----
    /// Ok when a write could commit now. The readiness probe calls it every few seconds; a
    /// backend that heals itself (redb: reopening the database after an I/O error) does it
    /// here too, so that it recovers even when no client writes.
    async fn check_writable(&self) -> MetaResult<()>;
}
