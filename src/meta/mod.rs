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
    /// The same error with `what` in front of its message.
    pub fn context(self, what: &str) -> MetaError {
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
    /// Removes `repo`'s link to the blob. False if it was not linked.
    async fn unlink_blob(&self, repo: &str, digest: &Digest) -> MetaResult<bool>;

    // ---- manifests and tags ----
    /// Stores the manifest under `repo`, points `tag` at it if given, and records it in the
    /// referrers index when it has a subject. Re-putting the same digest replaces the record.
    async fn put_manifest(
        &self,
        repo: &str,
        digest: &Digest,
        record: ManifestRecord,
        tag: Option<&str>,
        referrer: Option<Referrer>,
    ) -> MetaResult<()>;
    async fn manifest(&self, repo: &str, digest: &Digest) -> MetaResult<Option<ManifestRecord>>;
    /// The manifest `tag` points at in `repo`, with its digest, read in one snapshot (a
    /// concurrent re-tag or delete never yields a digest without its manifest).
    async fn tagged_manifest(
        &self,
        repo: &str,
        tag: &str,
    ) -> MetaResult<Option<(Digest, ManifestRecord)>>;
    /// Deletes the manifest, every tag of `repo` pointing at it, and its referrers entry.
    async fn delete_manifest(&self, repo: &str, digest: &Digest) -> MetaResult<bool>;
    async fn delete_tag(&self, repo: &str, tag: &str) -> MetaResult<bool>;
    /// Tags of `repo` in lexical order, strictly after `last`, at most `limit`.
    async fn tags(&self, repo: &str, last: Option<&str>, limit: usize) -> MetaResult<Vec<String>>;
    /// Repositories (any that ever had a blob linked or a manifest put) in lexical order,
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
}
