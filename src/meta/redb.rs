//! [`RedbStore`]: the embedded [`MetaStore`] on redb, a single-file ACID key-value store.
//!
//! # Layout
//!
//! Every table is created when the store is opened, so read transactions never meet a missing
//! table. Keys are redb tuples, which order element by element (strings by their bytes), so
//! everything of one repository is a contiguous, lexically ordered range.
//!
//! | table            | key                                  | value                                        |
//! |------------------|--------------------------------------|----------------------------------------------|
//! | `blobs`          | digest                               | `(size, object key)`                         |
//! | `repo_blobs`     | `(repo, digest)`                     | `()`                                         |
//! | `manifests`      | `(repo, digest)`                     | `(media type, subject digest?, raw body)`    |
//! | `tags`           | `(repo, tag)`                        | digest                                       |
//! | `repositories`   | repo                                 | `()`                                         |
//! | `referrers`      | `(repo, subject, referrer digest)`   | descriptor JSON bytes                        |
//! | `uploads`        | session id                           | [`UploadSession`] as JSON                    |
//! | `upload_pending` | `(session id, chunk sequence u32)`   | chunk bytes                                  |
//! | `journal`        | `"watermark"`                        | the bucket journal's watermark               |
//! | `write_probe`    | `"probe"`                            | bytes, only while probing after an I/O error |
//!
//! plus the index of sessions by last update described in [`sessions`], and the
//! garbage-collection tables (reference index, queue) described in [`gc`].
//!
//! Digests are stored as their `sha256:<hex>` strings. The manifest body is stored raw, exactly
//! as pushed, since it is served byte-exact. Pending upload bytes are kept as appended chunks
//! (sequence numbers from 0, in append order) so that an append never rewrites earlier bytes.
//!
//! # Transactions
//!
//! Every [`MetaStore`] method is exactly one redb transaction. Writes commit with redb's default
//! `Immediate` durability (fsync before `commit` returns) and therefore run on tokio's blocking
//! pool; reads are a few microseconds and run inline on the calling task.
//!
//! # I/O errors
//!
//! After an I/O error (disk full) redb refuses every later operation, reads included, until
//! the database is closed and opened again; a failed commit leaves the file at the last
//! committed transaction. So a write that fails on I/O reopens the database at once (reads go
//! on), and writes are then answered [`MetaError::Unavailable`] for [`WRITE_RETRY`] before
//! the next one is tried. [`MetaStore::check_writable`] probes with a write of
//! [`PROBE_BYTES`] meanwhile, so that the store heals, and says so, without client writes.
//!
//! # Claims
//!
//! redb lets one process open the file, so that process is every writer there is: claims
//! ([`MetaStore::claim`]) live in its memory, not in the file, and end with it.

use std::collections::HashMap;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use ::redb::{
    Database, Durability, Key, ReadOnlyTable, ReadTransaction, ReadableDatabase, ReadableTable,
    ReadableTableMetadata, Table, TableDefinition, TableHandle, Value, WriteTransaction,
};
use async_trait::async_trait;
use bytes::Bytes;

mod gc;
mod sessions;

use super::{
    upload_claim, BlobCollection, BlobRecord, Candidate, CandidateKind, Linked, ManifestPut,
    ManifestRecord, MetaError, MetaResult, MetaStore, PendingChange, QueuedCandidate, Referrer,
    TagInfo, UploadSession,
};
use crate::registry::names::Digest;
use crate::registry::unix_now;
use gc::{BLOB, BLOB_LINKS, GC_DUE, GC_QUEUE, MANIFEST, MANIFEST_REFS, REFS, TAG_TIMES};

/// `(repo, digest)` / `(repo, tag)`.
type RepoKey = (&'static str, &'static str);
/// `(media type, subject, raw body)`.
type ManifestValue = (&'static str, Option<&'static str>, &'static [u8]);

/// digest -> (size, object key)
const BLOBS: TableDefinition<&str, (u64, &str)> = TableDefinition::new("blobs");
/// (repo, digest) -> ()
const REPO_BLOBS: TableDefinition<(&str, &str), ()> = TableDefinition::new("repo_blobs");
/// (repo, digest) -> (media type, subject, raw body)
const MANIFESTS: TableDefinition<RepoKey, ManifestValue> = TableDefinition::new("manifests");
/// (repo, tag) -> digest
const TAGS: TableDefinition<(&str, &str), &str> = TableDefinition::new("tags");
/// repo -> ()
const REPOSITORIES: TableDefinition<&str, ()> = TableDefinition::new("repositories");
/// (repo, subject, referrer digest) -> descriptor
const REFERRERS: TableDefinition<(&str, &str, &str), &[u8]> = TableDefinition::new("referrers");
/// session id -> UploadSession (JSON)
const UPLOADS: TableDefinition<&str, &[u8]> = TableDefinition::new("uploads");
/// (session id, sequence) -> chunk
const UPLOAD_PENDING: TableDefinition<(&str, u32), &[u8]> = TableDefinition::new("upload_pending");
/// "watermark" -> the bucket journal's watermark (see [`MetaStore::journal_watermark`])
const JOURNAL: TableDefinition<&str, &str> = TableDefinition::new("journal");
/// "probe" -> bytes, written and removed again by [`MetaStore::check_writable`] after an
/// I/O error; empty otherwise.
const WRITE_PROBE: TableDefinition<&str, &[u8]> = TableDefinition::new("write_probe");

/// After a write failed on I/O, how long further writes are refused before one is tried.
pub const WRITE_RETRY: Duration = Duration::from_secs(1);
/// Size of the write that tells whether the store can write again: large enough to need new
/// space in the file, as a manifest or an upload's pending bytes do.
const PROBE_BYTES: usize = 1 << 20;

/// The embedded metadata store. Cheap to clone (the database is shared).
#[derive(Clone)]
pub struct RedbStore {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    /// None while the file could not be opened again after an I/O error.
    db: RwLock<Option<Arc<Database>>>,
    /// The last write that failed on I/O, until a write commits again.
    write_failure: Mutex<Option<WriteFailure>>,
    /// When the database was last opened again (reads retry at most every [`WRITE_RETRY`]).
    reopened: Mutex<Instant>,
    /// Bulk loading (a rebuild from the bucket): commits skip the fsync until it ends.
    bulk: AtomicBool,
    /// Replaying the bucket journal: GC touches keep a candidate's queued time.
    replaying: AtomicBool,
    /// Claim name -> (holder, expiry).
    claims: Mutex<HashMap<String, (String, Instant)>>,
}

struct WriteFailure {
    cause: String,
    at: Instant,
}

impl std::fmt::Debug for RedbStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedbStore").finish_non_exhaustive()
    }
}

/// What a write closure wants done with its transaction.
enum Outcome<T> {
    Commit(T),
    /// Nothing changed: abort rather than pay for a durable commit.
    Abort(T),
}

/// Maps a redb error to a [`MetaError`] with context: I/O errors (disk full, and redb's
/// "previous I/O error" until the database is reopened) are [`MetaError::Unavailable`].
fn ctx<E: Into<::redb::Error>>(what: &'static str) -> impl FnOnce(E) -> MetaError {
    move |e| {
        let e: ::redb::Error = e.into();
        let message = format!("{what}: {e}");
        match e {
            ::redb::Error::Io(_) | ::redb::Error::PreviousIo => MetaError::Unavailable(message),
            _ => MetaError::Failed(message),
        }
    }
}

fn corrupt(what: &str, detail: impl std::fmt::Display) -> MetaError {
    MetaError::Failed(format!("corrupt record in {what}: {detail}"))
}

fn parse_digest(table: &str, s: &str) -> MetaResult<Digest> {
    Digest::parse(s).ok_or_else(|| corrupt(table, format_args!("bad digest {s:?}")))
}

fn decode_session(bytes: &[u8]) -> MetaResult<UploadSession> {
    serde_json::from_slice(bytes).map_err(|e| corrupt("uploads", e))
}

fn encode_session(session: &UploadSession) -> MetaResult<Vec<u8>> {
    serde_json::to_vec(session)
        .map_err(|e| MetaError::Failed(format!("encode upload session: {e}")))
}

fn wtable<'t, K: Key + 'static, V: Value + 'static>(
    txn: &'t WriteTransaction,
    def: TableDefinition<K, V>,
) -> MetaResult<Table<'t, K, V>> {
    txn.open_table(def)
        .map_err(|e| ctx("open table")(e).context(def.name()))
}

fn rtable<K: Key + 'static, V: Value + 'static>(
    txn: &ReadTransaction,
    def: TableDefinition<K, V>,
) -> MetaResult<ReadOnlyTable<K, V>> {
    txn.open_table(def)
        .map_err(|e| ctx("open table")(e).context(def.name()))
}

fn read_manifest(
    txn: &ReadTransaction,
    repo: &str,
    digest: &str,
) -> MetaResult<Option<ManifestRecord>> {
    let manifests = rtable(txn, MANIFESTS)?;
    let Some(g) = manifests.get((repo, digest)).map_err(ctx("manifest"))? else {
        return Ok(None);
    };
    let (media_type, subject, body) = g.value();
    let refs = rtable(txn, MANIFEST_REFS)?;
    let references = match refs.get((repo, digest)).map_err(ctx("manifest refs"))? {
        Some(r) => gc::decode_refs(r.value())?,
        None => Vec::new(),
    };
    Ok(Some(ManifestRecord {
        media_type: media_type.to_owned(),
        body: Bytes::copy_from_slice(body),
        subject: subject.map(|s| parse_digest("manifests", s)).transpose()?,
        references,
    }))
}

fn blob_value((size, key): (u64, &str)) -> BlobRecord {
    BlobRecord {
        key: key.to_owned(),
        size,
    }
}

/// Removes all pending chunks of upload `id`.
fn clear_pending(pending: &mut Table<'_, (&str, u32), &[u8]>, id: &str) -> MetaResult<()> {
    pending
        .retain_in((id, 0u32)..=(id, u32::MAX), |_, _| false)
        .map_err(ctx("clear pending bytes"))
}

/// Links `digest` into `repo` (both directions), lists the repository, and touches the blob's
/// candidate so that collection waits a grace from now.
fn link(txn: &WriteTransaction, repo: &str, digest: &str) -> MetaResult<()> {
    wtable(txn, REPO_BLOBS)?
        .insert((repo, digest), ())
        .map_err(ctx("insert link"))?;
    wtable(txn, BLOB_LINKS)?
        .insert((digest, repo), ())
        .map_err(ctx("insert link"))?;
    wtable(txn, REPOSITORIES)?
        .insert(repo, ())
        .map_err(ctx("insert repository"))?;
    gc::touch(txn, BLOB, "", digest, unix_now())
}

/// Deletes `repo:tag` (only if it points at `expected`, when given), its time, and queues the
/// manifest it pointed at. False if there was no such tag.
fn untag(
    txn: &WriteTransaction,
    repo: &str,
    tag: &str,
    expected: Option<&Digest>,
) -> MetaResult<bool> {
    let mut tags = wtable(txn, TAGS)?;
    let current = tags
        .get((repo, tag))
        .map_err(ctx("read tag"))?
        .map(|g| g.value().to_owned());
    let Some(current) = current else {
        return Ok(false);
    };
    if expected.is_some_and(|e| e.as_str() != current) {
        return Ok(false);
    }
    tags.remove((repo, tag)).map_err(ctx("remove tag"))?;
    drop(tags);
    wtable(txn, TAG_TIMES)?
        .remove((repo, tag))
        .map_err(ctx("remove tag time"))?;
    gc::touch(txn, MANIFEST, repo, &current, unix_now())?;
    Ok(true)
}

/// The first of `references` that is neither a blob linked to `repo` nor a manifest of it.
fn missing_reference(
    txn: &WriteTransaction,
    repo: &str,
    references: &[Digest],
) -> MetaResult<Option<Digest>> {
    if references.is_empty() {
        return Ok(None);
    }
    let links = wtable(txn, REPO_BLOBS)?;
    let manifests = wtable(txn, MANIFESTS)?;
    for r in references {
        let key = (repo, r.as_str());
        if links.get(key).map_err(ctx("check reference"))?.is_none()
            && manifests
                .get(key)
                .map_err(ctx("check reference"))?
                .is_none()
        {
            return Ok(Some(r.clone()));
        }
    }
    Ok(None)
}

/// Opens (creating if need be) the database file and every table.
fn open_database(path: &Path) -> MetaResult<Database> {
    let db = Database::builder()
        .set_cache_size(CACHE_BYTES)
        .create(path)
        .map_err(|e| match e {
            ::redb::DatabaseError::DatabaseAlreadyOpen => MetaError::Failed(format!(
                "{} is in use by another process (another berth on this data directory?)",
                path.display()
            )),
            e => ctx("open")(e).context(path.display()),
        })?;
    let txn = db.begin_write().map_err(ctx("create tables"))?;
    wtable(&txn, BLOBS)?;
    wtable(&txn, REPO_BLOBS)?;
    wtable(&txn, MANIFESTS)?;
    wtable(&txn, TAGS)?;
    wtable(&txn, REPOSITORIES)?;
    wtable(&txn, REFERRERS)?;
    wtable(&txn, UPLOADS)?;
    wtable(&txn, UPLOAD_PENDING)?;
    wtable(&txn, WRITE_PROBE)?;
    wtable(&txn, JOURNAL)?;
    wtable(&txn, REFS)?;
    wtable(&txn, MANIFEST_REFS)?;
    wtable(&txn, BLOB_LINKS)?;
    wtable(&txn, TAG_TIMES)?;
    wtable(&txn, GC_QUEUE)?;
    wtable(&txn, GC_DUE)?;
    wtable(&txn, sessions::UPLOAD_TIMES)?;
    wtable(&txn, sessions::UPLOADS_BY_TIME)?;
    gc::upgrade(&txn, unix_now())?;
    sessions::upgrade(&txn)?;
    txn.commit().map_err(ctx("create tables"))?;
    Ok(db)
}

/// redb's page cache. Its default (1 GiB) fills with the pending bytes of upload sessions
/// (up to a part each, written at the end of every chunked PATCH and read back by the next
/// request), so memory would grow with the number of uploads past `upload.buffer_budget`.
/// Metadata proper is small; pages outside the cache are read from the file (the OS page cache).
const CACHE_BYTES: usize = 16 * 1024 * 1024;

impl RedbStore {
    /// Creates or opens the database file at `path` (its directory must exist), creates any
    /// missing table, and builds the garbage-collection tables once for a database written
    /// before they existed (see [`gc::upgrade`]).
    pub fn open(path: &Path) -> MetaResult<RedbStore> {
        let db = open_database(path)?;
        Ok(RedbStore {
            inner: Arc::new(Inner {
                path: path.to_path_buf(),
                db: RwLock::new(Some(Arc::new(db))),
                write_failure: Mutex::new(None),
                reopened: Mutex::new(Instant::now()),
                bulk: AtomicBool::new(false),
                replaying: AtomicBool::new(false),
                claims: Mutex::default(),
            }),
        })
    }

    /// Replay of the bucket journal on or off (see [`gc::touch`]).
    pub fn set_replaying(&self, on: bool) {
        self.inner.replaying.store(on, Ordering::SeqCst);
    }

    /// Bulk loading on: every commit until [`RedbStore::end_bulk`] skips its fsync (a rebuild
    /// applies thousands of records; a crash in between leaves the store as it was before,
    /// and the rebuild runs again).
    pub fn begin_bulk(&self) {
        self.inner.bulk.store(true, Ordering::SeqCst);
    }

    /// Bulk loading off: one durable commit makes everything before it durable.
    pub async fn end_bulk(&self) -> MetaResult<()> {
        self.inner.bulk.store(false, Ordering::SeqCst);
        self.write("end bulk load", |_| Ok(Outcome::Commit(())))
            .await
    }

    /// Every row, read in one transaction (`berth metadata copy`).
    pub fn export(&self) -> MetaResult<super::copy::Snapshot> {
        let txn = self.read()?;
        let mut out = super::copy::Snapshot::default();
        let e = ctx("export");
        for entry in rtable(&txn, REPOSITORIES)?.iter().map_err(e)? {
            let (k, _) = entry.map_err(ctx("export repositories"))?;
            out.repositories.push(k.value().to_owned());
        }
        for entry in rtable(&txn, BLOBS)?.iter().map_err(ctx("export"))? {
            let (k, v) = entry.map_err(ctx("export blobs"))?;
            let (size, key) = v.value();
            out.blobs.push((
                k.value().to_owned(),
                BlobRecord {
                    key: key.to_owned(),
                    size,
                },
            ));
        }
        for entry in rtable(&txn, REPO_BLOBS)?.iter().map_err(ctx("export"))? {
            let (k, _) = entry.map_err(ctx("export links"))?;
            let (repo, digest) = k.value();
            out.links.push((repo.to_owned(), digest.to_owned()));
        }
        for entry in rtable(&txn, MANIFESTS)?.iter().map_err(ctx("export"))? {
            let (k, _) = entry.map_err(ctx("export manifests"))?;
            let (repo, digest) = k.value();
            let record = read_manifest(&txn, repo, digest)?
                .ok_or_else(|| corrupt("manifests", "vanished during export"))?;
            out.manifests
                .push((repo.to_owned(), digest.to_owned(), record));
        }
        for entry in rtable(&txn, TAGS)?.iter().map_err(ctx("export"))? {
            let (k, v) = entry.map_err(ctx("export tags"))?;
            let (repo, tag) = k.value();
            out.tags
                .push((repo.to_owned(), tag.to_owned(), v.value().to_owned()));
        }
        for entry in rtable(&txn, REFERRERS)?.iter().map_err(ctx("export"))? {
            let (k, v) = entry.map_err(ctx("export referrers"))?;
            let (repo, subject, digest) = k.value();
            out.referrers.push((
                repo.to_owned(),
                subject.to_owned(),
                digest.to_owned(),
                Bytes::copy_from_slice(v.value()),
            ));
        }
        let pending = rtable(&txn, UPLOAD_PENDING)?;
        for entry in rtable(&txn, UPLOADS)?.iter().map_err(ctx("export"))? {
            let (_, v) = entry.map_err(ctx("export uploads"))?;
            let session = decode_session(v.value())?;
            let mut bytes = Vec::new();
            for chunk in pending
                .range((session.id.as_str(), 0u32)..=(session.id.as_str(), u32::MAX))
                .map_err(ctx("export pending"))?
            {
                let (_, c) = chunk.map_err(ctx("export pending"))?;
                bytes.extend_from_slice(c.value());
            }
            out.uploads.push((session, Bytes::from(bytes)));
        }
        Ok(out)
    }

    fn claims(&self) -> std::sync::MutexGuard<'_, HashMap<String, (String, Instant)>> {
        // A panic while holding the map cannot leave it half-updated: every change is one
        // insert or remove.
        self.inner.claims.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether `session` may be saved: unfenced, or its writer still holds the claim.
    fn may_save(&self, session: &UploadSession) -> bool {
        let Some(writer) = &session.writer else {
            return true;
        };
        self.claims()
            .get(&upload_claim(&session.id))
            .is_some_and(|(holder, until)| holder == writer && *until > Instant::now())
    }

    fn read(&self) -> MetaResult<ReadTransaction> {
        if let Some(db) = self.inner.db.read().expect("database lock").as_ref() {
            return db.begin_read().map_err(ctx("begin read transaction"));
        }
        self.inner.reopen_if_due();
        match self.inner.db.read().expect("database lock").as_ref() {
            Some(db) => db.begin_read().map_err(ctx("begin read transaction")),
            None => Err(self.inner.closed()),
        }
    }

    /// Runs `f` in one write transaction on the blocking pool, committing (durably) or aborting
    /// as `f` says. An error aborts.
    async fn write<T, F>(&self, what: &'static str, f: F) -> MetaResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&WriteTransaction) -> MetaResult<Outcome<T>> + Send + 'static,
    {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || inner.write(what, f))
            .await
            .map_err(|e| MetaError::Failed(format!("{what}: write task failed: {e}")))?
    }
}

impl Inner {
    fn write<T, F>(&self, what: &'static str, f: F) -> MetaResult<T>
    where
        F: FnOnce(&WriteTransaction) -> MetaResult<Outcome<T>>,
    {
        if let Some(failure) = self.write_failure.lock().expect("failure lock").as_ref() {
            if failure.at.elapsed() < WRITE_RETRY {
                return Err(MetaError::Unavailable(format!(
                    "{what}: writes failing: {}",
                    failure.cause
                )));
            }
        }
        let db = self.database()?;
        gc::REPLAYING.set(self.replaying.load(Ordering::SeqCst));
        let result = transact(&db, what, self.bulk.load(Ordering::SeqCst), f);
        gc::REPLAYING.set(false);
        drop(db); // reopening needs the only reference
        match &result {
            Err(MetaError::Unavailable(cause)) => self.write_failed(cause),
            Ok(_) => self.write_succeeded(),
            Err(MetaError::Failed(_)) => {}
        }
        result
    }

    /// The open database, opening it again if an earlier attempt failed.
    fn database(&self) -> MetaResult<Arc<Database>> {
        if let Some(db) = self.db.read().expect("database lock").as_ref() {
            return Ok(db.clone());
        }
        self.reopen();
        self.db
            .read()
            .expect("database lock")
            .clone()
            .ok_or_else(|| self.closed())
    }

    fn closed(&self) -> MetaError {
        let cause = match self.write_failure.lock().expect("failure lock").as_ref() {
            Some(f) => f.cause.clone(),
            None => "closed".to_string(),
        };
        MetaError::Unavailable(format!("{} is not open: {cause}", self.path.display()))
    }

    fn write_failed(&self, cause: &str) {
        let mut failure = self.write_failure.lock().expect("failure lock");
        if failure.is_none() {
            log::error!(
                "metadata store: a write failed on I/O ({cause}); writes answer 503 until one \
                 commits again"
            );
        }
        *failure = Some(WriteFailure {
            cause: cause.to_string(),
            at: Instant::now(),
        });
        drop(failure);
        self.reopen();
    }

    fn write_succeeded(&self) {
        let mut failure = self.write_failure.lock().expect("failure lock");
        if failure.take().is_some() {
            log::info!("metadata store: writes commit again");
        }
    }

    fn reopen_if_due(&self) {
        if self.reopened.lock().expect("reopen lock").elapsed() >= WRITE_RETRY {
            self.reopen();
        }
    }

    /// Closes the database and opens it again: redb's way out of a previous I/O error. Left
    /// alone while another write still holds the database; that one reopens when it fails.
    fn reopen(&self) {
        let mut slot = self.db.write().expect("database lock");
        *self.reopened.lock().expect("reopen lock") = Instant::now();
        if let Some(old) = slot.take() {
            match Arc::try_unwrap(old) {
                // Its error is the one being handled.
                Ok(db) => drop(db.close()),
                Err(in_use) => {
                    *slot = Some(in_use);
                    return;
                }
            }
        }
        match open_database(&self.path) {
            Ok(db) => *slot = Some(Arc::new(db)),
            Err(e) => log::warn!("metadata store: cannot open it again yet: {e}"),
        }
    }
}

/// One write transaction: committed or aborted as `f` says; an error aborts.
fn transact<T, F>(db: &Database, what: &'static str, bulk: bool, f: F) -> MetaResult<T>
where
    F: FnOnce(&WriteTransaction) -> MetaResult<Outcome<T>>,
{
    let mut txn = db.begin_write().map_err(ctx(what))?;
    if bulk {
        txn.set_durability(Durability::None)
            .map_err(|e| MetaError::Failed(format!("{what}: {e}")))?;
    }
    match f(&txn) {
        Ok(Outcome::Commit(out)) => {
            txn.commit().map_err(ctx(what))?;
            Ok(out)
        }
        Ok(Outcome::Abort(out)) => {
            txn.abort().map_err(ctx(what))?;
            Ok(out)
        }
        Err(e) => {
            // The original error matters more than a failure to abort.
            let _ = txn.abort();
            Err(e.context(what))
        }
    }
}

#[async_trait]
impl MetaStore for RedbStore {
    // ---- claims ----

    async fn claim(&self, name: &str, holder: &str, ttl: Duration) -> MetaResult<bool> {
        let now = Instant::now();
        let mut claims = self.claims();
        match claims.get_mut(name) {
            Some((h, until)) if h != holder && *until > now => Ok(false),
            Some((h, until)) if h == holder => {
                *until = now + ttl;
                Ok(true)
            }
            _ => {
                claims.insert(name.to_owned(), (holder.to_owned(), now + ttl));
                Ok(true)
            }
        }
    }

    async fn release(&self, name: &str, holder: &str) -> MetaResult<()> {
        let mut claims = self.claims();
        if claims.get(name).is_some_and(|(h, _)| h == holder) {
            claims.remove(name);
        }
        Ok(())
    }
    // ---- blobs ----

    async fn blob(&self, digest: &Digest) -> MetaResult<Option<BlobRecord>> {
        let txn = self.read()?;
        let blobs = rtable(&txn, BLOBS)?;
        let rec = blobs.get(digest.as_str()).map_err(ctx("blob"))?;
        Ok(rec.map(|g| {
            let (size, key) = g.value();
            BlobRecord {
                key: key.to_owned(),
                size,
            }
        }))
    }

    async fn repo_blob(&self, repo: &str, digest: &Digest) -> MetaResult<Option<BlobRecord>> {
        let txn = self.read()?;
        let links = rtable(&txn, REPO_BLOBS)?;
        if links
            .get((repo, digest.as_str()))
            .map_err(ctx("repo_blob"))?
            .is_none()
        {
            return Ok(None);
        }
        let blobs = rtable(&txn, BLOBS)?;
        let rec = blobs.get(digest.as_str()).map_err(ctx("repo_blob"))?;
        Ok(rec.map(|g| {
            let (size, key) = g.value();
            BlobRecord {
                key: key.to_owned(),
                size,
            }
        }))
    }

    async fn link_blob(&self, repo: &str, digest: &Digest) -> MetaResult<bool> {
        let repo = repo.to_owned();
        let digest = digest.clone();
        self.write("link_blob", move |txn| {
            let blobs = wtable(txn, BLOBS)?;
            if blobs
                .get(digest.as_str())
                .map_err(ctx("get blob"))?
                .is_none()
            {
                return Ok(Outcome::Abort(false));
            }
            drop(blobs);
            link(txn, &repo, digest.as_str())?;
            Ok(Outcome::Commit(true))
        })
        .await
    }

    async fn adopt_blobs(
        &self,
        repo: &str,
        blobs: &[(Digest, BlobRecord)],
    ) -> MetaResult<Vec<Linked>> {
        let repo = repo.to_owned();
        let adopted = blobs.to_vec();
        self.write("adopt_blobs", move |txn| {
            let mut out = Vec::with_capacity(adopted.len());
            for (digest, record) in &adopted {
                let mut index = wtable(txn, BLOBS)?;
                let existing = index
                    .get(digest.as_str())
                    .map_err(ctx("get blob"))?
                    .map(|g| blob_value(g.value()));
                out.push(match existing {
                    Some(existing) => Linked::Existing(existing),
                    None => {
                        index
                            .insert(digest.as_str(), (record.size, record.key.as_str()))
                            .map_err(ctx("insert blob"))?;
                        Linked::New
                    }
                });
                drop(index);
                // Both link directions, the catalog, and the blob's GC candidate (an adopted
                // blob no manifest references is collected after the grace like any other).
                link(txn, &repo, digest.as_str())?;
            }
            Ok(Outcome::Commit(out))
        })
        .await
    }

    async fn unlink_blob(&self, repo: &str, digest: &Digest) -> MetaResult<bool> {
        let repo = repo.to_owned();
        let digest = digest.clone();
        self.write("unlink_blob", move |txn| {
            let (repo, digest) = (repo.as_str(), digest.as_str());
            let existed = wtable(txn, REPO_BLOBS)?
                .remove((repo, digest))
                .map_err(ctx("remove link"))?
                .is_some();
            if !existed {
                return Ok(Outcome::Abort(false));
            }
            wtable(txn, BLOB_LINKS)?
                .remove((digest, repo))
                .map_err(ctx("remove link"))?;
            gc::touch(txn, BLOB, "", digest, unix_now())?;
            gc::prune_if_empty(txn, repo)?;
            Ok(Outcome::Commit(true))
        })
        .await
    }

    // ---- manifests and tags ----

    async fn put_manifest(
        &self,
        repo: &str,
        digest: &Digest,
        record: ManifestRecord,
        tag: Option<&str>,
        referrer: Option<Referrer>,
    ) -> MetaResult<ManifestPut> {
        let repo = repo.to_owned();
        let digest = digest.clone();
        let tag = tag.map(str::to_owned);
        self.write("put_manifest", move |txn| {
            let repo = repo.as_str();
            let digest = digest.as_str();
            // Decided here, in the transaction a concurrent collection serializes with.
            if let Some(missing) = missing_reference(txn, repo, &record.references)? {
                return Ok(Outcome::Abort(ManifestPut::MissingReference(missing)));
            }
            let now = unix_now();
            let mut referrers = wtable(txn, REFERRERS)?;
            let is_new = {
                let mut manifests = wtable(txn, MANIFESTS)?;
                let value = (
                    record.media_type.as_str(),
                    record.subject.as_ref().map(Digest::as_str),
                    &record.body[..],
                );
                let old = manifests
                    .insert((repo, digest), value)
                    .map_err(ctx("insert manifest"))?;
                // A replaced record whose subject no longer holds leaves no stale referrer.
                if let Some(old) = &old {
                    if let (_, Some(old_subject), _) = old.value() {
                        let still = referrer
                            .as_ref()
                            .is_some_and(|r| r.subject.as_str() == old_subject);
                        if !still {
                            referrers
                                .remove((repo, old_subject, digest))
                                .map_err(ctx("remove old referrer"))?;
                        }
                    }
                }
                old.is_none()
            };
            if let Some(r) = &referrer {
                referrers
                    .insert((repo, r.subject.as_str(), digest), &r.descriptor[..])
                    .map_err(ctx("insert referrer"))?;
            }
            drop(referrers);
            // Same digest, same body, same references: counted once.
            if is_new {
                gc::add_references(txn, repo, digest, &record.references)?;
            }
            match &tag {
                Some(tag) => {
                    let moved_from = wtable(txn, TAGS)?
                        .insert((repo, tag.as_str()), digest)
                        .map_err(ctx("insert tag"))?
                        .map(|g| g.value().to_owned());
                    wtable(txn, TAG_TIMES)?
                        .insert((repo, tag.as_str()), now)
                        .map_err(ctx("insert tag time"))?;
                    if let Some(old) = moved_from.filter(|old| old != digest) {
                        gc::touch(txn, MANIFEST, repo, &old, now)?;
                    }
                }
                None => gc::touch(txn, MANIFEST, repo, digest, now)?,
            }
            let mut repos = wtable(txn, REPOSITORIES)?;
            repos.insert(repo, ()).map_err(ctx("insert repository"))?;
            Ok(Outcome::Commit(ManifestPut::Stored))
        })
        .await
    }

    async fn manifest(&self, repo: &str, digest: &Digest) -> MetaResult<Option<ManifestRecord>> {
        let txn = self.read()?;
        read_manifest(&txn, repo, digest.as_str())
    }

    async fn tagged_manifest(
        &self,
        repo: &str,
        tag: &str,
    ) -> MetaResult<Option<(Digest, ManifestRecord)>> {
        let txn = self.read()?;
        let tags = rtable(&txn, TAGS)?;
        let Some(g) = tags.get((repo, tag)).map_err(ctx("tagged_manifest"))? else {
            return Ok(None);
        };
        let digest = g.value();
        let Some(record) = read_manifest(&txn, repo, digest)? else {
            // Tags are removed with their manifest in one transaction.
            return Err(corrupt(
                "tags",
                format!("{repo}:{tag} -> {digest} has no manifest"),
            ));
        };
        Ok(Some((parse_digest("tags", digest)?, record)))
    }

    async fn delete_manifest(&self, repo: &str, digest: &Digest) -> MetaResult<bool> {
        let repo = repo.to_owned();
        let digest = digest.clone();
        self.write("delete_manifest", move |txn| {
            Ok(
                match gc::remove_manifest(txn, &repo, digest.as_str(), unix_now())? {
                    Some(_) => Outcome::Commit(true),
                    None => Outcome::Abort(false),
                },
            )
        })
        .await
    }

    async fn delete_tag(&self, repo: &str, tag: &str) -> MetaResult<bool> {
        let repo = repo.to_owned();
        let tag = tag.to_owned();
        self.write("delete_tag", move |txn| {
            Ok(if untag(txn, &repo, &tag, None)? {
                Outcome::Commit(true)
            } else {
                Outcome::Abort(false)
            })
        })
        .await
    }

    async fn tags(&self, repo: &str, last: Option<&str>, limit: usize) -> MetaResult<Vec<String>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let txn = self.read()?;
        let tags = rtable(&txn, TAGS)?;
        let start = match last {
            Some(last) => Bound::Excluded((repo, last)),
            None => Bound::Included((repo, "")),
        };
        let mut out = Vec::new();
        for entry in tags
            .range::<(&str, &str)>((start, Bound::Unbounded))
            .map_err(ctx("tags"))?
        {
            let (k, _) = entry.map_err(ctx("tags"))?;
            let (r, t) = k.value();
            if r != repo {
                break;
            }
            out.push(t.to_owned());
            if out.len() == limit {
                break;
            }
        }
        Ok(out)
    }

    async fn repositories(&self, last: Option<&str>, limit: usize) -> MetaResult<Vec<String>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let txn = self.read()?;
        let repos = rtable(&txn, REPOSITORIES)?;
        let start = match last {
            Some(last) => Bound::Excluded(last),
            None => Bound::Unbounded,
        };
        let mut out = Vec::new();
        for entry in repos
            .range::<&str>((start, Bound::Unbounded))
            .map_err(ctx("repositories"))?
            .take(limit)
        {
            let (k, _) = entry.map_err(ctx("repositories"))?;
            out.push(k.value().to_owned());
        }
        Ok(out)
    }

    async fn repository_exists(&self, repo: &str) -> MetaResult<bool> {
        let txn = self.read()?;
        let repos = rtable(&txn, REPOSITORIES)?;
        Ok(repos.get(repo).map_err(ctx("repository_exists"))?.is_some())
    }

    async fn referrers(&self, repo: &str, subject: &Digest) -> MetaResult<Vec<Bytes>> {
        let txn = self.read()?;
        let referrers = rtable(&txn, REFERRERS)?;
        let subject = subject.as_str();
        let mut out = Vec::new();
        for entry in referrers
            .range::<(&str, &str, &str)>((repo, subject, "")..)
            .map_err(ctx("referrers"))?
        {
            let (k, v) = entry.map_err(ctx("referrers"))?;
            let (r, s, _) = k.value();
            if r != repo || s != subject {
                break;
            }
            out.push(Bytes::copy_from_slice(v.value()));
        }
        Ok(out)
    }

    // ---- upload sessions ----

    async fn create_upload(&self, session: &UploadSession) -> MetaResult<()> {
        let id = session.id.clone();
        let updated = session.updated;
        let json = encode_session(session)?;
        self.write("create_upload", move |txn| {
            sessions::put(txn, &id, updated, &json)?;
            // A fresh session starts with no pending bytes, whatever a reused id left.
            let mut pending = wtable(txn, UPLOAD_PENDING)?;
            clear_pending(&mut pending, &id)?;
            Ok(Outcome::Commit(()))
        })
        .await
    }

    async fn upload(&self, id: &str) -> MetaResult<Option<UploadSession>> {
        let txn = self.read()?;
        let uploads = rtable(&txn, UPLOADS)?;
        let found = uploads.get(id).map_err(ctx("upload"))?;
        found.map(|g| decode_session(g.value())).transpose()
    }

    async fn pending(&self, id: &str) -> MetaResult<Bytes> {
        let txn = self.read()?;
        let pending = rtable(&txn, UPLOAD_PENDING)?;
        let mut chunks = pending
            .range((id, 0u32)..=(id, u32::MAX))
            .map_err(ctx("pending"))?;
        let Some(first) = chunks.next() else {
            return Ok(Bytes::new());
        };
        let (_, first) = first.map_err(ctx("pending"))?;
        let mut out = first.value().to_vec();
        for entry in chunks {
            let (_, v) = entry.map_err(ctx("pending"))?;
            out.extend_from_slice(v.value());
        }
        Ok(Bytes::from(out))
    }

    async fn save_upload(&self, session: &UploadSession, change: PendingChange) -> MetaResult<()> {
        // Checked before the write: the claim's holder is the only caller that could take it
        // back, and it is the one saving.
        if !self.may_save(session) {
            return Err(MetaError::Unavailable(format!(
                "upload {}: claimed by another writer",
                session.id
            )));
        }
        let id = session.id.clone();
        let updated = session.updated;
        let json = encode_session(session)?;
        self.write("save_upload", move |txn| {
            let id = id.as_str();
            sessions::put(txn, id, updated, &json)?;
            let mut pending = wtable(txn, UPLOAD_PENDING)?;
            if change.clear {
                clear_pending(&mut pending, id)?;
            }
            if let Some(bytes) = change.append.as_ref().filter(|b| !b.is_empty()) {
                let next = match pending
                    .range((id, 0u32)..=(id, u32::MAX))
                    .map_err(ctx("scan pending"))?
                    .next_back()
                {
                    Some(entry) => {
                        let (k, _) = entry.map_err(ctx("scan pending"))?;
                        k.value().1.checked_add(1).ok_or_else(|| {
                            MetaError::Failed(format!("upload {id}: too many pending chunks"))
                        })?
                    }
                    None => 0,
                };
                pending
                    .insert((id, next), &bytes[..])
                    .map_err(ctx("append pending"))?;
            }
            Ok(Outcome::Commit(()))
        })
        .await
    }

    async fn delete_upload(&self, id: &str) -> MetaResult<bool> {
        let claim = upload_claim(id);
        let id = id.to_owned();
        let deleted = self
            .write("delete_upload", move |txn| {
                let existed = sessions::remove(txn, &id)?;
                let mut pending = wtable(txn, UPLOAD_PENDING)?;
                clear_pending(&mut pending, &id)?;
                Ok(Outcome::Commit(existed))
            })
            .await;
        // After the commit: a writer claiming it now finds no session.
        self.claims().remove(&claim);
        deleted
    }

    async fn idle_uploads(&self, cutoff: u64) -> MetaResult<Vec<UploadSession>> {
        let txn = self.read()?;
        let uploads = rtable(&txn, UPLOADS)?;
        let mut out = Vec::new();
        // Only the idle ones are read and decoded (the index by time).
        for id in sessions::idle(&txn, cutoff)? {
            if let Some(v) = uploads.get(id.as_str()).map_err(ctx("idle_uploads"))? {
                out.push(decode_session(v.value())?);
            }
        }
        Ok(out)
    }

    async fn finish_upload(
        &self,
        id: &str,
        repo: &str,
        digest: &Digest,
        record: BlobRecord,
    ) -> MetaResult<Linked> {
        let claim = upload_claim(id);
        let id = id.to_owned();
        let repo = repo.to_owned();
        let digest = digest.clone();
        let linked = self
            .write("finish_upload", move |txn| {
                let repo = repo.as_str();
                let digest = digest.as_str();
                {
                    sessions::remove(txn, &id)?;
                    let mut pending = wtable(txn, UPLOAD_PENDING)?;
                    clear_pending(&mut pending, &id)?;
                }
                let mut blobs = wtable(txn, BLOBS)?;
                let existing = blobs
                    .get(digest)
                    .map_err(ctx("get blob"))?
                    .map(|g| blob_value(g.value()));
                let linked = match existing {
                    Some(existing) => Linked::Existing(existing),
                    None => {
                        blobs
                            .insert(digest, (record.size, record.key.as_str()))
                            .map_err(ctx("insert blob"))?;
                        Linked::New
                    }
                };
                drop(blobs);
                link(txn, repo, digest)?;
                Ok(Outcome::Commit(linked))
            })
            .await;
        self.claims().remove(&claim);
        linked
    }

    // ---- bucket journal ----

    async fn journal_watermark(&self) -> MetaResult<Option<String>> {
        let txn = self.read()?;
        let journal = rtable(&txn, JOURNAL)?;
        Ok(journal
            .get("watermark")
            .map_err(ctx("journal_watermark"))?
            .map(|g| g.value().to_owned()))
    }

    async fn set_journal_watermark(&self, watermark: &str) -> MetaResult<()> {
        let watermark = watermark.to_owned();
        self.write("set_journal_watermark", move |txn| {
            let mut journal = wtable(txn, JOURNAL)?;
            journal
                .insert("watermark", watermark.as_str())
                .map_err(ctx("set watermark"))?;
            Ok(Outcome::Commit(()))
        })
        .await
    }

    // ---- garbage collection ----

    async fn gc_candidates(
        &self,
        kind: CandidateKind,
        cutoff: u64,
        limit: usize,
    ) -> MetaResult<Vec<QueuedCandidate>> {
        let txn = self.read()?;
        let due = rtable(&txn, GC_DUE)?;
        let k = gc::kind_code(kind);
        let mut out = Vec::new();
        if limit == 0 {
            return Ok(out);
        }
        let end = (k, cutoff.saturating_add(1), "", "");
        let range = if cutoff == u64::MAX {
            due.range::<(u8, u64, &str, &str)>((k, 0, "", "")..)
        } else {
            due.range::<(u8, u64, &str, &str)>((k, 0, "", "")..end)
        }
        .map_err(ctx("gc_candidates"))?;
        for entry in range {
            let (key, _) = entry.map_err(ctx("gc_candidates"))?;
            let (kind, since, repo, digest) = key.value();
            if kind != k {
                break;
            }
            out.push(QueuedCandidate {
                candidate: gc::candidate(kind, repo, digest)?,
                since,
            });
            if out.len() == limit {
                break;
            }
        }
        Ok(out)
    }

    async fn gc_queue_len(&self) -> MetaResult<u64> {
        let txn = self.read()?;
        let queue = rtable(&txn, GC_QUEUE)?;
        queue.len().map_err(ctx("gc_queue_len"))
    }

    async fn gc_enqueue(&self, candidates: &[Candidate], now: u64) -> MetaResult<u64> {
        if candidates.is_empty() {
            return Ok(0);
        }
        let candidates = candidates.to_vec();
        self.write("gc_enqueue", move |txn| {
            let mut queued = 0;
            for c in &candidates {
                let (kind, repo, digest) = gc::candidate_key(c);
                queued += u64::from(gc::enqueue_if_absent(txn, kind, repo, digest, now)?);
            }
            Ok(if queued > 0 {
                Outcome::Commit(queued)
            } else {
                Outcome::Abort(0)
            })
        })
        .await
    }

    async fn check_writable(&self) -> MetaResult<()> {
        let failing = self
            .inner
            .write_failure
            .lock()
            .expect("failure lock")
            .is_some();
        if !failing {
            return Ok(());
        }
        // A write that needs new space in the file, then its removal: a disk that is still
        // full fails the first.
        self.write("check_writable", |txn| {
            let mut probe = wtable(txn, WRITE_PROBE)?;
            let bytes = vec![0u8; PROBE_BYTES];
            probe
                .insert("probe", &bytes[..])
                .map_err(ctx("insert probe"))?;
            Ok(Outcome::Commit(()))
        })
        .await?;
        self.write("check_writable", |txn| {
            let mut probe = wtable(txn, WRITE_PROBE)?;
            probe.remove("probe").map_err(ctx("remove probe"))?;
            Ok(Outcome::Commit(()))
        })
        .await
    }

    async fn gc_dequeue(&self, candidates: &[Candidate]) -> MetaResult<()> {
        let candidates = candidates.to_vec();
        self.write("gc_dequeue", move |txn| {
            for candidate in &candidates {
                let (kind, repo, digest) = gc::candidate_key(candidate);
                gc::dequeue(txn, kind, repo, digest)?;
            }
            Ok(Outcome::Commit(()))
        })
        .await
    }

    async fn collect_blob(&self, digest: &Digest, cutoff: u64) -> MetaResult<BlobCollection> {
        let digest = digest.clone();
        self.write("collect_blob", move |txn| {
            Ok(match collect_one(txn, digest.as_str(), cutoff)? {
                Some(out) => Outcome::Commit(out),
                None => Outcome::Abort(BlobCollection::default()),
            })
        })
        .await
    }

    async fn collect_blobs(
        &self,
        digests: &[Digest],
        cutoff: u64,
    ) -> MetaResult<Vec<BlobCollection>> {
        let digests = digests.to_vec();
        // One commit (one fsync) for the batch: GC's cost per blob was its commit.
        self.write("collect_blobs", move |txn| {
            let mut changed = false;
            let mut out = Vec::with_capacity(digests.len());
            for digest in &digests {
                let one = collect_one(txn, digest.as_str(), cutoff)?;
                changed |= one.is_some();
                out.push(one.unwrap_or_default());
            }
            Ok(if changed {
                Outcome::Commit(out)
            } else {
                Outcome::Abort(out)
            })
        })
        .await
    }

    async fn collect_manifest(
        &self,
        repo: &str,
        digest: &Digest,
        cutoff: u64,
    ) -> MetaResult<Option<ManifestRecord>> {
        let repo = repo.to_owned();
        let digest = digest.clone();
        self.write("collect_manifest", move |txn| {
            let (repo, digest) = (repo.as_str(), digest.as_str());
            match gc::queued(txn, MANIFEST, repo, digest)? {
                Some(since) if since <= cutoff => {}
                _ => return Ok(Outcome::Abort(None)),
            }
            gc::dequeue(txn, MANIFEST, repo, digest)?;
            let subject = {
                let manifests = wtable(txn, MANIFESTS)?;
                let found = manifests
                    .get((repo, digest))
                    .map_err(ctx("read manifest"))?;
                match found {
                    None => return Ok(Outcome::Commit(None)),
                    Some(g) => g.value().1.map(str::to_owned),
                }
            };
            let live_subject = match &subject {
                Some(s) => wtable(txn, MANIFESTS)?
                    .get((repo, s.as_str()))
                    .map_err(ctx("read subject"))?
                    .is_some(),
                None => false,
            };
            let listed = wtable(txn, REFS)?
                .get((digest, repo))
                .map_err(ctx("read refs"))?
                .is_some();
            if live_subject || listed || !gc::tags_pointing_at(txn, repo, digest)?.is_empty() {
                // Alive; an untag, an index delete or its subject's delete queues it again.
                return Ok(Outcome::Commit(None));
            }
            let removed = gc::remove_manifest(txn, repo, digest, unix_now())?;
            Ok(Outcome::Commit(removed))
        })
        .await
    }

    async fn blobs(
        &self,
        after: Option<&Digest>,
        limit: usize,
    ) -> MetaResult<Vec<(Digest, BlobRecord)>> {
        let txn = self.read()?;
        let blobs = rtable(&txn, BLOBS)?;
        let start = match after {
            Some(d) => Bound::Excluded(d.as_str()),
            None => Bound::Unbounded,
        };
        let mut out = Vec::new();
        for entry in blobs
            .range::<&str>((start, Bound::Unbounded))
            .map_err(ctx("blobs"))?
            .take(limit)
        {
            let (k, v) = entry.map_err(ctx("blobs"))?;
            out.push((parse_digest("blobs", k.value())?, blob_value(v.value())));
        }
        Ok(out)
    }

    async fn is_referenced(&self, digest: &Digest) -> MetaResult<bool> {
        let txn = self.read()?;
        let refs = rtable(&txn, REFS)?;
        gc::referenced_anywhere(&refs, digest.as_str())
    }

    async fn unreferenced(&self, digests: &[Digest]) -> MetaResult<Vec<Digest>> {
        let txn = self.read()?;
        let refs = rtable(&txn, REFS)?;
        let mut out = Vec::new();
        for digest in digests {
            if !gc::referenced_anywhere(&refs, digest.as_str())? {
                out.push(digest.clone());
            }
        }
        Ok(out)
    }

    async fn repo_manifests(
        &self,
        repo: &str,
        after: Option<&Digest>,
        limit: usize,
    ) -> MetaResult<Vec<Digest>> {
        let txn = self.read()?;
        let manifests = rtable(&txn, MANIFESTS)?;
        let start = match after {
            Some(d) => Bound::Excluded((repo, d.as_str())),
            None => Bound::Included((repo, "")),
        };
        let mut out = Vec::new();
        if limit == 0 {
            return Ok(out);
        }
        for entry in manifests
            .range::<(&str, &str)>((start, Bound::Unbounded))
            .map_err(ctx("repo_manifests"))?
        {
            let (k, _) = entry.map_err(ctx("repo_manifests"))?;
            let (r, d) = k.value();
            if r != repo {
                break;
            }
            out.push(parse_digest("manifests", d)?);
            if out.len() == limit {
                break;
            }
        }
        Ok(out)
    }

    async fn tag_details(
        &self,
        repo: &str,
        last: Option<&str>,
        limit: usize,
    ) -> MetaResult<Vec<TagInfo>> {
        let txn = self.read()?;
        let tags = rtable(&txn, TAGS)?;
        let times = rtable(&txn, TAG_TIMES)?;
        let start = match last {
            Some(last) => Bound::Excluded((repo, last)),
            None => Bound::Included((repo, "")),
        };
        let mut out = Vec::new();
        if limit == 0 {
            return Ok(out);
        }
        for entry in tags
            .range::<(&str, &str)>((start, Bound::Unbounded))
            .map_err(ctx("tag_details"))?
        {
            let (k, v) = entry.map_err(ctx("tag_details"))?;
            let (r, t) = k.value();
            if r != repo {
                break;
            }
            let updated = times
                .get((r, t))
                .map_err(ctx("tag_details"))?
                .map_or(0, |g| g.value());
            out.push(TagInfo {
                tag: t.to_owned(),
                digest: parse_digest("tags", v.value())?,
                updated,
            });
            if out.len() == limit {
                break;
            }
        }
        Ok(out)
    }

    async fn delete_tag_if(&self, repo: &str, tag: &str, digest: &Digest) -> MetaResult<bool> {
        let repo = repo.to_owned();
        let tag = tag.to_owned();
        let digest = digest.clone();
        self.write("delete_tag_if", move |txn| {
            Ok(if untag(txn, &repo, &tag, Some(&digest))? {
                Outcome::Commit(true)
            } else {
                Outcome::Abort(false)
            })
        })
        .await
    }
}

/// [`MetaStore::collect_blob`]'s decision and delete inside `txn`; None (and nothing written)
/// when the blob is not queued or was touched within the grace.
fn collect_one(
    txn: &WriteTransaction,
    digest: &str,
    cutoff: u64,
) -> MetaResult<Option<BlobCollection>> {
    match gc::queued(txn, BLOB, "", digest)? {
        Some(since) if since <= cutoff => {}
        // Touched within the grace (an upload, a mount, an unlink), or not queued.
        _ => return Ok(None),
    }
    let mut out = BlobCollection::default();
    let (linked, referencing) = {
        let links = wtable(txn, BLOB_LINKS)?;
        let refs = wtable(txn, REFS)?;
        (gc::repos_of(&links, digest)?, gc::repos_of(&refs, digest)?)
    };
    {
        let mut links = wtable(txn, REPO_BLOBS)?;
        let mut reverse = wtable(txn, BLOB_LINKS)?;
        for repo in linked {
            if referencing.contains(&repo) {
                continue;
            }
            links
                .remove((repo.as_str(), digest))
                .map_err(ctx("remove link"))?;
            reverse
                .remove((digest, repo.as_str()))
                .map_err(ctx("remove link"))?;
            out.unlinked.push(repo);
        }
    }
    if referencing.is_empty() {
        out.deleted = wtable(txn, BLOBS)?
            .remove(digest)
            .map_err(ctx("remove blob"))?
            .map(|g| blob_value(g.value()));
    }
    gc::dequeue(txn, BLOB, "", digest)?;
    for repo in &out.unlinked {
        if gc::prune_if_empty(txn, repo)? {
            out.pruned.push(repo.clone());
        }
    }
    Ok(Some(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The digest `tag` resolves to, checking that the manifest read with it is the one
    /// stored under that digest.
    async fn resolve_tag(s: &RedbStore, repo: &str, tag: &str) -> Option<Digest> {
        let (digest, record) = s.tagged_manifest(repo, tag).await.unwrap()?;
        assert_eq!(s.manifest(repo, &digest).await.unwrap(), Some(record));
        Some(digest)
    }

    fn digest(n: u8) -> Digest {
        Digest::parse(&format!("sha256:{}", format!("{n:02x}").repeat(32))).unwrap()
    }

    fn store() -> (tempfile::TempDir, RedbStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(&dir.path().join("meta.redb")).unwrap();
        (dir, store)
    }

    fn manifest(body: &str, subject: Option<Digest>) -> ManifestRecord {
        ManifestRecord {
            media_type: "application/vnd.oci.image.manifest.v1+json".to_owned(),
            body: Bytes::copy_from_slice(body.as_bytes()),
            subject,
            references: Vec::new(),
        }
    }

    fn session(id: &str, updated: u64) -> UploadSession {
        UploadSession {
            id: id.to_owned(),
            repo: "library/alpine".to_owned(),
            key: format!("uploads/{id}"),
            multipart_id: Some("mp-1".to_owned()),
            parts: vec![crate::meta::Part {
                number: 1,
                etag: "\"abc\"".to_owned(),
                size: 5 << 20,
            }],
            offset: (5 << 20) + 3,
            hasher: vec![1, 2, 3, 4],
            created: updated.saturating_sub(10),
            updated,
            writer: None,
        }
    }

    fn blob(key: &str, size: u64) -> BlobRecord {
        BlobRecord {
            key: key.to_owned(),
            size,
        }
    }

    #[tokio::test]
    async fn open_creates_tables_for_reads() {
        let (_dir, s) = store();
        assert_eq!(s.blob(&digest(1)).await.unwrap(), None);
        assert_eq!(s.repo_blob("a", &digest(1)).await.unwrap(), None);
        assert_eq!(s.manifest("a", &digest(1)).await.unwrap(), None);
        assert_eq!(resolve_tag(&s, "a", "latest").await, None);
        assert!(s.tags("a", None, 10).await.unwrap().is_empty());
        assert!(s.repositories(None, 10).await.unwrap().is_empty());
        assert!(!s.repository_exists("a").await.unwrap());
        assert!(s.referrers("a", &digest(1)).await.unwrap().is_empty());
        assert_eq!(s.upload("x").await.unwrap(), None);
        assert!(s.pending("x").await.unwrap().is_empty());
        assert!(s.idle_uploads(u64::MAX).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn adopt_blobs_keeps_existing_records_and_links_all() {
        let (_dir, s) = store();
        let (a, b) = (digest(1), digest(2));
        s.adopt_blobs("old/app", &[(a.clone(), blob("docker/a/data", 10))])
            .await
            .unwrap();
        let linked = s
            .adopt_blobs(
                "new/app",
                &[
                    (a.clone(), blob("docker/a-again/data", 10)),
                    (b.clone(), blob("docker/b/data", 20)),
                ],
            )
            .await
            .unwrap();
        assert_eq!(
            linked,
            vec![Linked::Existing(blob("docker/a/data", 10)), Linked::New]
        );
        assert_eq!(s.blob(&a).await.unwrap(), Some(blob("docker/a/data", 10)));
        assert_eq!(
            s.repo_blob("new/app", &b).await.unwrap(),
            Some(blob("docker/b/data", 20))
        );
        assert_eq!(s.repo_blob("old/app", &b).await.unwrap(), None);
        assert!(s.repository_exists("new/app").await.unwrap());
        assert_eq!(s.adopt_blobs("new/app", &[]).await.unwrap(), vec![]);
    }

    #[tokio::test]
    async fn finish_upload_new_then_existing_and_links() {
        let (_dir, s) = store();
        let d = digest(7);
        s.create_upload(&session("u1", 100)).await.unwrap();
        s.save_upload(
            &session("u1", 101),
            PendingChange {
                clear: false,
                append: Some(Bytes::from_static(b"abc")),
            },
        )
        .await
        .unwrap();

        let linked = s
            .finish_upload("u1", "team/app", &d, blob("blobs/first", 42))
            .await
            .unwrap();
        assert_eq!(linked, Linked::New);
        assert_eq!(s.upload("u1").await.unwrap(), None);
        assert!(s.pending("u1").await.unwrap().is_empty());
        assert_eq!(s.blob(&d).await.unwrap(), Some(blob("blobs/first", 42)));
        assert_eq!(
            s.repo_blob("team/app", &d).await.unwrap(),
            Some(blob("blobs/first", 42))
        );
        assert!(s.repository_exists("team/app").await.unwrap());

        // Same digest uploaded into another repo: the first record wins.
        s.create_upload(&session("u2", 100)).await.unwrap();
        let linked = s
            .finish_upload("u2", "other", &d, blob("blobs/second", 42))
            .await
            .unwrap();
        assert_eq!(linked, Linked::Existing(blob("blobs/first", 42)));
        assert_eq!(s.upload("u2").await.unwrap(), None);
        assert_eq!(s.blob(&d).await.unwrap(), Some(blob("blobs/first", 42)));
        assert_eq!(
            s.repo_blob("other", &d).await.unwrap(),
            Some(blob("blobs/first", 42))
        );
        assert_eq!(
            s.repositories(None, 10).await.unwrap(),
            vec!["other".to_owned(), "team/app".to_owned()]
        );
    }

    #[tokio::test]
    async fn link_and_unlink_blob() {
        let (_dir, s) = store();
        let d = digest(1);
        let missing = digest(2);
        s.finish_upload("u", "src", &d, blob("k1", 10))
            .await
            .unwrap();

        // Not in the global index: no link, no repository.
        assert!(!s.link_blob("dst", &missing).await.unwrap());
        assert!(!s.repository_exists("dst").await.unwrap());
        assert_eq!(s.repo_blob("dst", &missing).await.unwrap(), None);

        // Mount from another repo.
        assert_eq!(s.repo_blob("dst", &d).await.unwrap(), None);
        assert!(s.link_blob("dst", &d).await.unwrap());
        assert!(s.repository_exists("dst").await.unwrap());
        assert_eq!(s.repo_blob("dst", &d).await.unwrap(), Some(blob("k1", 10)));

        // Unlink removes only that repo's link; the global record stays. The repository,
        // with nothing left in it, leaves the catalog.
        assert!(s.unlink_blob("dst", &d).await.unwrap());
        assert!(!s.unlink_blob("dst", &d).await.unwrap());
        assert_eq!(s.repo_blob("dst", &d).await.unwrap(), None);
        assert_eq!(s.repo_blob("src", &d).await.unwrap(), Some(blob("k1", 10)));
        assert_eq!(s.blob(&d).await.unwrap(), Some(blob("k1", 10)));
        assert!(!s.repository_exists("dst").await.unwrap());
        assert!(s.repository_exists("src").await.unwrap());
    }

    #[tokio::test]
    async fn manifests_tags_and_delete() {
        let (_dir, s) = store();
        let (m1, m2) = (digest(0x11), digest(0x22));
        let body1 = "{\"schemaVersion\":2, \"x\": 1 }";
        s.put_manifest("repo", &m1, manifest(body1, None), Some("v1"), None)
            .await
            .unwrap();
        s.put_manifest("repo", &m1, manifest(body1, None), Some("latest"), None)
            .await
            .unwrap();
        s.put_manifest("repo", &m2, manifest("{}", None), Some("v2"), None)
            .await
            .unwrap();
        // Same tag name in another repo must be untouched by deletes here.
        s.put_manifest("repo2", &m1, manifest(body1, None), Some("v1"), None)
            .await
            .unwrap();

        let got = s.manifest("repo", &m1).await.unwrap().unwrap();
        assert_eq!(got, manifest(body1, None));
        assert_eq!(&got.body[..], body1.as_bytes());
        assert_eq!(resolve_tag(&s, "repo", "v1").await, Some(m1.clone()));
        assert_eq!(resolve_tag(&s, "repo", "latest").await, Some(m1.clone()));
        assert_eq!(resolve_tag(&s, "repo", "v2").await, Some(m2.clone()));
        assert_eq!(resolve_tag(&s, "repo", "nope").await, None);
        assert_eq!(s.manifest("repo3", &m1).await.unwrap(), None);

        // Retagging moves the tag.
        s.put_manifest("repo", &m2, manifest("{}", None), Some("latest"), None)
            .await
            .unwrap();
        assert_eq!(resolve_tag(&s, "repo", "latest").await, Some(m2.clone()));
        s.put_manifest("repo", &m1, manifest(body1, None), Some("latest"), None)
            .await
            .unwrap();

        assert!(s.delete_manifest("repo", &m1).await.unwrap());
        assert!(!s.delete_manifest("repo", &m1).await.unwrap());
        assert_eq!(s.manifest("repo", &m1).await.unwrap(), None);
        assert_eq!(resolve_tag(&s, "repo", "v1").await, None);
        assert_eq!(resolve_tag(&s, "repo", "latest").await, None);
        assert_eq!(resolve_tag(&s, "repo", "v2").await, Some(m2.clone()));
        assert_eq!(s.tags("repo", None, 10).await.unwrap(), vec!["v2"]);
        assert_eq!(resolve_tag(&s, "repo2", "v1").await, Some(m1.clone()));
        assert!(s.manifest("repo2", &m1).await.unwrap().is_some());

        assert!(s.delete_tag("repo", "v2").await.unwrap());
        assert!(!s.delete_tag("repo", "v2").await.unwrap());
        assert_eq!(resolve_tag(&s, "repo", "v2").await, None);
        // Deleting the tag leaves the manifest.
        assert!(s.manifest("repo", &m2).await.unwrap().is_some());
        // The repository is still listed.
        assert!(s.repository_exists("repo").await.unwrap());
    }

    #[tokio::test]
    async fn referrers_index() {
        let (_dir, s) = store();
        let subject = digest(0x01);
        let other_subject = digest(0x02);
        let (ra, rb, rc) = (digest(0xaa), digest(0xbb), digest(0xcc));
        let desc = |d: &Digest| Bytes::from(format!("{{\"digest\":\"{d}\"}}"));
        s.put_manifest("repo", &subject, manifest("{}", None), Some("t"), None)
            .await
            .unwrap();
        // Inserted out of order: listed by digest.
        for r in [&rb, &ra] {
            s.put_manifest(
                "repo",
                r,
                manifest("{\"subject\":1}", Some(subject.clone())),
                None,
                Some(Referrer {
                    subject: subject.clone(),
                    descriptor: desc(r),
                }),
            )
            .await
            .unwrap();
        }
        s.put_manifest(
            "repo",
            &rc,
            manifest("{\"subject\":2}", Some(other_subject.clone())),
            Some("sig"),
            Some(Referrer {
                subject: other_subject.clone(),
                descriptor: desc(&rc),
            }),
        )
        .await
        .unwrap();
        // Same referrer digest in another repo.
        s.put_manifest(
            "repo-b",
            &ra,
            manifest("{\"subject\":1}", Some(subject.clone())),
            None,
            Some(Referrer {
                subject: subject.clone(),
                descriptor: desc(&ra),
            }),
        )
        .await
        .unwrap();

        assert_eq!(
            s.referrers("repo", &subject).await.unwrap(),
            vec![desc(&ra), desc(&rb)]
        );
        assert_eq!(
            s.referrers("repo", &other_subject).await.unwrap(),
            vec![desc(&rc)]
        );
        assert_eq!(
            s.manifest("repo", &ra).await.unwrap().unwrap().subject,
            Some(subject.clone())
        );

        assert!(s.delete_manifest("repo", &ra).await.unwrap());
        assert_eq!(
            s.referrers("repo", &subject).await.unwrap(),
            vec![desc(&rb)]
        );
        assert_eq!(
            s.referrers("repo-b", &subject).await.unwrap(),
            vec![desc(&ra)]
        );
        assert!(s.delete_manifest("repo", &rc).await.unwrap());
        assert!(s
            .referrers("repo", &other_subject)
            .await
            .unwrap()
            .is_empty());
        assert_eq!(s.tags("repo", None, 10).await.unwrap(), vec!["t"]);
    }

    #[tokio::test]
    async fn tag_and_repository_pagination() {
        let (_dir, s) = store();
        let d = digest(3);
        for tag in ["b", "a", "c10", "c2", "Z", "d"] {
            s.put_manifest("app", &d, manifest("{}", None), Some(tag), None)
                .await
                .unwrap();
        }
        // Neighbouring repositories must not leak into "app"'s tag listing.
        for repo in ["ap", "app/sub", "app-x", "aaa", "zzz"] {
            s.put_manifest(repo, &d, manifest("{}", None), Some("zz"), None)
                .await
                .unwrap();
        }
        s.put_manifest("app0", &d, manifest("{}", None), Some("a"), None)
            .await
            .unwrap();

        let all = s.tags("app", None, 100).await.unwrap();
        assert_eq!(all, vec!["Z", "a", "b", "c10", "c2", "d"]);
        assert_eq!(s.tags("app", None, 2).await.unwrap(), vec!["Z", "a"]);
        assert_eq!(s.tags("app", Some("a"), 2).await.unwrap(), vec!["b", "c10"]);
        assert_eq!(s.tags("app", Some("c2"), 10).await.unwrap(), vec!["d"]);
        // `last` need not be an existing tag.
        assert_eq!(
            s.tags("app", Some("bb"), 10).await.unwrap(),
            vec!["c10", "c2", "d"]
        );
        assert!(s.tags("app", Some("d"), 10).await.unwrap().is_empty());
        assert!(s.tags("app", None, 0).await.unwrap().is_empty());
        assert!(s.tags("nothing", None, 10).await.unwrap().is_empty());

        // Full walk by pages.
        let mut walked = Vec::new();
        let mut last: Option<String> = None;
        loop {
            let page = s.tags("app", last.as_deref(), 4).await.unwrap();
            if page.is_empty() {
                break;
            }
            last = page.last().cloned();
            walked.extend(page);
        }
        assert_eq!(walked, all);

        let repos = s.repositories(None, 100).await.unwrap();
        assert_eq!(
            repos,
            vec!["aaa", "ap", "app", "app-x", "app/sub", "app0", "zzz"]
        );
        assert_eq!(
            s.repositories(None, 3).await.unwrap(),
            vec!["aaa", "ap", "app"]
        );
        assert_eq!(
            s.repositories(Some("app"), 2).await.unwrap(),
            vec!["app-x", "app/sub"]
        );
        assert_eq!(s.repositories(Some("b"), 10).await.unwrap(), vec!["zzz"]);
        assert!(s.repositories(Some("zzz"), 10).await.unwrap().is_empty());
        assert!(s.repositories(None, 0).await.unwrap().is_empty());
        assert!(s.repository_exists("app/sub").await.unwrap());
        assert!(!s.repository_exists("app/su").await.unwrap());
    }

    #[tokio::test]
    async fn upload_sessions_and_pending_bytes() {
        let (_dir, s) = store();
        let mut sess = session("up", 1000);
        s.create_upload(&sess).await.unwrap();
        assert_eq!(s.upload("up").await.unwrap(), Some(sess.clone()));
        assert!(s.pending("up").await.unwrap().is_empty());

        let append = |b: &'static [u8]| PendingChange {
            clear: false,
            append: Some(Bytes::from_static(b)),
        };
        s.save_upload(&sess, append(b"hello ")).await.unwrap();
        s.save_upload(&sess, append(b"")).await.unwrap();
        s.save_upload(&sess, PendingChange::default())
            .await
            .unwrap();
        s.save_upload(&sess, append(b"world")).await.unwrap();
        assert_eq!(&s.pending("up").await.unwrap()[..], b"hello world");

        // Many chunks keep their order (sequence numbers sort numerically, past 9 and 255).
        let mut expected = b"hello world".to_vec();
        for i in 0..300u32 {
            let chunk = format!("<{i}>");
            expected.extend_from_slice(chunk.as_bytes());
            s.save_upload(
                &sess,
                PendingChange {
                    clear: false,
                    append: Some(Bytes::from(chunk)),
                },
            )
            .await
            .unwrap();
        }
        assert_eq!(s.pending("up").await.unwrap(), Bytes::from(expected));

        // Clear then append, in one save, with the session updated.
        sess.offset = 99;
        sess.updated = 2000;
        sess.parts.push(crate::meta::Part {
            number: 2,
            etag: "e2".to_owned(),
            size: 7,
        });
        s.save_upload(
            &sess,
            PendingChange {
                clear: true,
                append: Some(Bytes::from_static(b"tail")),
            },
        )
        .await
        .unwrap();
        assert_eq!(&s.pending("up").await.unwrap()[..], b"tail");
        assert_eq!(s.upload("up").await.unwrap(), Some(sess.clone()));
        s.save_upload(&sess, append(b"+more")).await.unwrap();
        assert_eq!(&s.pending("up").await.unwrap()[..], b"tail+more");

        // Clear only.
        s.save_upload(
            &sess,
            PendingChange {
                clear: true,
                append: None,
            },
        )
        .await
        .unwrap();
        assert!(s.pending("up").await.unwrap().is_empty());

        // Pending bytes are per session; ids that share a prefix do not mix.
        s.create_upload(&session("up2", 1000)).await.unwrap();
        s.save_upload(&session("up2", 1000), append(b"other"))
            .await
            .unwrap();
        s.save_upload(&sess, append(b"mine")).await.unwrap();
        assert_eq!(&s.pending("up").await.unwrap()[..], b"mine");
        assert_eq!(&s.pending("up2").await.unwrap()[..], b"other");

        assert!(s.delete_upload("up").await.unwrap());
        assert!(!s.delete_upload("up").await.unwrap());
        assert_eq!(s.upload("up").await.unwrap(), None);
        assert!(s.pending("up").await.unwrap().is_empty());
        assert_eq!(&s.pending("up2").await.unwrap()[..], b"other");
    }

    #[tokio::test]
    async fn idle_uploads_cutoff() {
        let (_dir, s) = store();
        for (id, updated) in [("a", 100), ("b", 200), ("c", 300)] {
            s.create_upload(&session(id, updated)).await.unwrap();
        }
        let ids = |v: Vec<UploadSession>| {
            let mut ids: Vec<String> = v.into_iter().map(|s| s.id).collect();
            ids.sort();
            ids
        };
        assert!(s.idle_uploads(100).await.unwrap().is_empty());
        assert_eq!(ids(s.idle_uploads(101).await.unwrap()), vec!["a"]);
        assert_eq!(ids(s.idle_uploads(300).await.unwrap()), vec!["a", "b"]);
        assert_eq!(ids(s.idle_uploads(301).await.unwrap()), vec!["a", "b", "c"]);
        let full = s.idle_uploads(101).await.unwrap();
        assert_eq!(full, vec![session("a", 100)]);

        // Touching a session moves it out of the idle set.
        s.save_upload(&session("a", 500), PendingChange::default())
            .await
            .unwrap();
        assert_eq!(ids(s.idle_uploads(301).await.unwrap()), vec!["b", "c"]);
        assert!(s.delete_upload("b").await.unwrap());
        assert_eq!(ids(s.idle_uploads(u64::MAX).await.unwrap()), vec!["a", "c"]);

        // A file written before the index by time: its sessions are indexed at open.
        drop(s);
        let path = _dir.path().join("meta.redb");
        {
            let db = Database::create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            txn.delete_table(sessions::UPLOAD_TIMES).unwrap();
            txn.delete_table(sessions::UPLOADS_BY_TIME).unwrap();
            txn.commit().unwrap();
        }
        let s = RedbStore::open(&path).unwrap();
        assert_eq!(ids(s.idle_uploads(301).await.unwrap()), vec!["c"]);
        assert_eq!(ids(s.idle_uploads(u64::MAX).await.unwrap()), vec!["a", "c"]);
    }

    #[tokio::test]
    async fn persists_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta.redb");
        let (d, r) = (digest(9), digest(8));
        {
            let s = RedbStore::open(&path).unwrap();
            s.finish_upload("u", "lib/x", &d, blob("obj/9", 9))
                .await
                .unwrap();
            s.put_manifest(
                "lib/x",
                &r,
                manifest("{\"raw\": true}", Some(d.clone())),
                Some("stable"),
                Some(Referrer {
                    subject: d.clone(),
                    descriptor: Bytes::from_static(b"{\"d\":1}"),
                }),
            )
            .await
            .unwrap();
            s.create_upload(&session("open", 50)).await.unwrap();
            s.save_upload(
                &session("open", 60),
                PendingChange {
                    clear: false,
                    append: Some(Bytes::from_static(b"partial")),
                },
            )
            .await
            .unwrap();
        }
        let s = RedbStore::open(&path).unwrap();
        assert_eq!(s.blob(&d).await.unwrap(), Some(blob("obj/9", 9)));
        assert_eq!(
            s.repo_blob("lib/x", &d).await.unwrap(),
            Some(blob("obj/9", 9))
        );
        assert_eq!(resolve_tag(&s, "lib/x", "stable").await, Some(r.clone()));
        assert_eq!(
            s.manifest("lib/x", &r).await.unwrap(),
            Some(manifest("{\"raw\": true}", Some(d.clone())))
        );
        assert_eq!(
            s.referrers("lib/x", &d).await.unwrap(),
            vec![Bytes::from_static(b"{\"d\":1}")]
        );
        assert_eq!(s.repositories(None, 10).await.unwrap(), vec!["lib/x"]);
        assert_eq!(s.upload("open").await.unwrap(), Some(session("open", 60)));
        assert_eq!(&s.pending("open").await.unwrap()[..], b"partial");
        assert_eq!(s.tags("lib/x", None, 10).await.unwrap(), vec!["stable"]);
        assert_eq!(s.idle_uploads(61).await.unwrap(), vec![session("open", 60)]);

        // A second writer on the same file is refused while the first is open.
        assert!(RedbStore::open(&path).is_err());
    }

    #[tokio::test]
    async fn claims_exclude_other_holders_and_fence_saves() {
        let (_dir, s) = store();
        let ttl = Duration::from_secs(60);
        let name = upload_claim("up");
        s.create_upload(&session("up", 1)).await.unwrap();
        assert!(s.claim(&name, "w1", ttl).await.unwrap());
        assert!(s.claim(&name, "w1", ttl).await.unwrap(), "renewal");
        assert!(!s.claim(&name, "w2", ttl).await.unwrap());

        let mut by_w1 = session("up", 2);
        by_w1.writer = Some("w1".into());
        s.save_upload(&by_w1, PendingChange::default())
            .await
            .unwrap();
        let mut by_w2 = session("up", 3);
        by_w2.writer = Some("w2".into());
        let err = s.save_upload(&by_w2, PendingChange::default()).await;
        assert!(matches!(err, Err(MetaError::Unavailable(_))), "{err:?}");
        assert_eq!(s.upload("up").await.unwrap().unwrap().updated, 2);

        // Another holder's release changes nothing; the holder's own frees it.
        s.release(&name, "w2").await.unwrap();
        assert!(!s.claim(&name, "w2", ttl).await.unwrap());
        s.release(&name, "w1").await.unwrap();
        assert!(s.claim(&name, "w2", ttl).await.unwrap());
        // An expired claim passes to the next claimer.
        assert!(s.claim("task", "n1", Duration::ZERO).await.unwrap());
        assert!(s.claim("task", "n2", ttl).await.unwrap());
        // Finishing the upload ends its claim.
        s.finish_upload("up", "r", &digest(1), blob("k", 1))
            .await
            .unwrap();
        assert!(s.claim(&name, "w3", ttl).await.unwrap());
    }

    #[tokio::test]
    async fn concurrent_writes_all_land() {
        let (_dir, s) = store();
        let mut handles = Vec::new();
        for i in 0..16u8 {
            let s = s.clone();
            handles.push(tokio::spawn(async move {
                let tag = format!("t{i:02}");
                s.put_manifest("c", &digest(i), manifest("{}", None), Some(&tag), None)
                    .await
                    .unwrap();
            }));
        }
        for h in handles {
            h.await.unwrap();
        }
        let tags = s.tags("c", None, 100).await.unwrap();
        assert_eq!(tags.len(), 16);
        assert_eq!(tags[0], "t00");
        assert_eq!(tags[15], "t15");
        assert_eq!(resolve_tag(&s, "c", "t07").await, Some(digest(7)));
    }

    fn with_refs(body: &str, refs: &[&Digest]) -> ManifestRecord {
        ManifestRecord {
            references: refs.iter().map(|d| (*d).clone()).collect(),
            ..manifest(body, None)
        }
    }

    async fn upload(s: &RedbStore, repo: &str, d: &Digest) {
        let id = format!("u-{repo}-{}", &d.as_str()[7..15]);
        s.create_upload(&session(&id, 1)).await.unwrap();
        s.finish_upload(&id, repo, d, blob(&format!("blobs/{id}"), 10))
            .await
            .unwrap();
    }

    fn due(q: Vec<QueuedCandidate>) -> Vec<Candidate> {
        q.into_iter().map(|q| q.candidate).collect()
    }

    #[tokio::test]
    async fn put_manifest_needs_its_references_at_commit() {
        let (_dir, s) = store();
        let (layer, m) = (digest(1), digest(2));
        let put = s
            .put_manifest("r", &m, with_refs("{}", &[&layer]), Some("t"), None)
            .await
            .unwrap();
        assert_eq!(put, ManifestPut::MissingReference(layer.clone()));
        assert_eq!(s.manifest("r", &m).await.unwrap(), None);
        assert!(!s.repository_exists("r").await.unwrap());
        // Linked in another repository is not enough.
        upload(&s, "other", &layer).await;
        let put = s
            .put_manifest("r", &m, with_refs("{}", &[&layer]), Some("t"), None)
            .await
            .unwrap();
        assert_eq!(put, ManifestPut::MissingReference(layer.clone()));
        upload(&s, "r", &layer).await;
        let put = s
            .put_manifest("r", &m, with_refs("{}", &[&layer]), Some("t"), None)
            .await
            .unwrap();
        assert_eq!(put, ManifestPut::Stored);
        assert_eq!(
            s.manifest("r", &m).await.unwrap().unwrap().references,
            vec![layer.clone()]
        );
        // An index's children are manifests of the repository.
        let index = digest(3);
        let put = s
            .put_manifest(
                "r",
                &index,
                with_refs("{\"i\":1}", &[&m]),
                Some("multi"),
                None,
            )
            .await
            .unwrap();
        assert_eq!(put, ManifestPut::Stored);
        assert!(s.is_referenced(&m).await.unwrap());
    }

    #[tokio::test]
    async fn collect_blob_waits_for_the_grace_and_references() {
        let (_dir, s) = store();
        let (shared, only_a, ma, mb) = (digest(1), digest(2), digest(3), digest(4));
        for d in [&shared, &only_a] {
            upload(&s, "a", d).await;
        }
        upload(&s, "b", &shared).await;
        s.put_manifest(
            "a",
            &ma,
            with_refs("{\"a\":1}", &[&shared, &only_a]),
            Some("v1"),
            None,
        )
        .await
        .unwrap();
        s.put_manifest(
            "b",
            &mb,
            with_refs("{\"b\":1}", &[&shared]),
            Some("v1"),
            None,
        )
        .await
        .unwrap();
        let now = unix_now();
        // Uploads queue their blobs: referenced ones are dequeued when looked at.
        let queued = due(s
            .gc_candidates(CandidateKind::Blob, now, 100)
            .await
            .unwrap());
        assert!(queued.contains(&Candidate::Blob(shared.clone())));
        assert_eq!(
            s.collect_blob(&shared, now).await.unwrap(),
            BlobCollection::default()
        );
        assert!(!due(s
            .gc_candidates(CandidateKind::Blob, now, 100)
            .await
            .unwrap())
        .contains(&Candidate::Blob(shared.clone())));

        assert!(s.delete_manifest("a", &ma).await.unwrap());
        assert!(!s.is_referenced(&only_a).await.unwrap());
        assert!(s.is_referenced(&shared).await.unwrap());
        // Touched by the delete just now: not due with a cutoff before now.
        let early = now.saturating_sub(10);
        assert_eq!(
            s.collect_blob(&only_a, early).await.unwrap(),
            BlobCollection::default()
        );
        assert!(s.blob(&only_a).await.unwrap().is_some());

        // Both in one batch (one transaction): each decided as if alone, in order.
        let late = unix_now();
        let mut batch = s
            .collect_blobs(&[only_a.clone(), shared.clone()], late)
            .await
            .unwrap()
            .into_iter();
        let got = batch.next().unwrap();
        assert_eq!(got.deleted.as_ref().map(|r| r.size), Some(10));
        assert_eq!(got.unlinked, vec!["a".to_owned()]);
        assert!(got.pruned.is_empty(), "a still links shared");
        assert_eq!(s.blob(&only_a).await.unwrap(), None);
        // Shared: a's link goes (no manifest of a uses it), b keeps it and the record.
        let got = batch.next().unwrap();
        assert_eq!(got.deleted, None);
        assert_eq!(got.unlinked, vec!["a".to_owned()]);
        assert_eq!(got.pruned, vec!["a".to_owned()]);
        assert!(!s.repository_exists("a").await.unwrap());
        assert!(s.repo_blob("b", &shared).await.unwrap().is_some());
        assert_eq!(s.repositories(None, 10).await.unwrap(), vec!["b"]);
        // The queue is empty again.
        assert_eq!(s.gc_queue_len().await.unwrap(), 0);

        // A manifest PUT after the collection loses: the blob is gone from the repository.
        let again = s
            .put_manifest(
                "a",
                &ma,
                with_refs("{\"a\":1}", &[&shared, &only_a]),
                None,
                None,
            )
            .await
            .unwrap();
        assert!(matches!(again, ManifestPut::MissingReference(_)));
        // A mount of a collected blob fails; a mount touches a live one.
        assert!(!s.link_blob("c", &only_a).await.unwrap());
        assert!(s.link_blob("c", &shared).await.unwrap());
        let queued = s
            .gc_candidates(CandidateKind::Blob, u64::MAX, 10)
            .await
            .unwrap();
        assert_eq!(queued.len(), 1);
        assert!(queued[0].since >= late);
    }

    #[tokio::test]
    async fn untagged_manifests_and_their_keepers() {
        let (_dir, s) = store();
        let layer = digest(1);
        upload(&s, "r", &layer).await;
        let (child, index, sig, plain) = (digest(2), digest(3), digest(4), digest(5));
        s.put_manifest("r", &child, with_refs("{\"c\":1}", &[&layer]), None, None)
            .await
            .unwrap();
        s.put_manifest(
            "r",
            &index,
            with_refs("{\"i\":1}", &[&child]),
            Some("multi"),
            None,
        )
        .await
        .unwrap();
        s.put_manifest(
            "r",
            &sig,
            ManifestRecord {
                subject: Some(index.clone()),
                ..with_refs("{\"s\":1}", &[&layer])
            },
            None,
            Some(Referrer {
                subject: index.clone(),
                descriptor: Bytes::from_static(b"{}"),
            }),
        )
        .await
        .unwrap();
        s.put_manifest(
            "r",
            &plain,
            with_refs("{\"p\":1}", &[&layer]),
            Some("v1"),
            None,
        )
        .await
        .unwrap();
        let now = unix_now();
        // Listed by an index, a referrer of a live manifest, tagged: all stay.
        for d in [&child, &sig, &plain, &index] {
            assert_eq!(s.collect_manifest("r", d, now).await.unwrap(), None, "{d}");
        }
        assert_eq!(
            s.gc_candidates(CandidateKind::Manifest, u64::MAX, 10)
                .await
                .unwrap(),
            vec![]
        );
        // A retention delete that lost the race to a re-push deletes nothing.
        assert!(!s.delete_tag_if("r", "v1", &child).await.unwrap());
        assert!(s.delete_tag_if("r", "v1", &plain).await.unwrap());
        // Untagged now: queued, and collected once due.
        let got = s.collect_manifest("r", &plain, unix_now()).await.unwrap();
        assert_eq!(got.unwrap().references, vec![layer.clone()]);
        // Deleting the index frees its child and orphans its referrer.
        assert!(s.delete_manifest("r", &index).await.unwrap());
        let queued = due(s
            .gc_candidates(CandidateKind::Manifest, u64::MAX, 10)
            .await
            .unwrap());
        assert!(queued.contains(&Candidate::Manifest {
            repo: "r".into(),
            digest: child.clone()
        }));
        assert!(queued.contains(&Candidate::Manifest {
            repo: "r".into(),
            digest: sig.clone()
        }));
        let t = unix_now();
        assert!(s.collect_manifest("r", &child, t).await.unwrap().is_some());
        assert!(s.collect_manifest("r", &sig, t).await.unwrap().is_some());
        // The layer is free now; nothing else is left but its link.
        assert!(!s.is_referenced(&layer).await.unwrap());
        let got = s.collect_blob(&layer, unix_now()).await.unwrap();
        assert!(got.deleted.is_some());
        assert_eq!(got.pruned, vec!["r".to_owned()]);
        assert!(s.repositories(None, 10).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn tag_details_have_push_times() {
        let (_dir, s) = store();
        let d = digest(1);
        let before = unix_now();
        s.put_manifest("r", &d, manifest("{}", None), Some("a"), None)
            .await
            .unwrap();
        let got = s.tag_details("r", None, 10).await.unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!((got[0].tag.as_str(), &got[0].digest), ("a", &d));
        assert!(got[0].updated >= before && got[0].updated <= unix_now());
        assert_eq!(
            s.repo_manifests("r", None, 10).await.unwrap(),
            vec![d.clone()]
        );
        assert!(s
            .repo_manifests("r", Some(&d), 10)
            .await
            .unwrap()
            .is_empty());
        assert_eq!(s.blobs(None, 10).await.unwrap(), vec![]);
    }

    #[tokio::test]
    async fn database_from_before_the_reference_index_is_upgraded_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta.redb");
        let (layer, stray, m) = (digest(1), digest(2), digest(3));
        let body = format!(
            r#"{{"schemaVersion":2,"config":{{"digest":"{layer}","size":10}},"layers":[{{"digest":"{layer}","size":10}},{{"digest":"{stray}","size":1,"urls":["http://x"]}}]}}"#
        );
        {
            // The tables as main wrote them, and nothing else.
            let db = Database::create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            txn.open_table(BLOBS)
                .unwrap()
                .insert(layer.as_str(), (10, "blobs/l"))
                .unwrap();
            txn.open_table(BLOBS)
                .unwrap()
                .insert(stray.as_str(), (1, "blobs/s"))
                .unwrap();
            for d in [&layer, &stray] {
                txn.open_table(REPO_BLOBS)
                    .unwrap()
                    .insert(("r", d.as_str()), ())
                    .unwrap();
            }
            txn.open_table(MANIFESTS)
                .unwrap()
                .insert(("r", m.as_str()), (OCI, None, body.as_bytes()))
                .unwrap();
            txn.open_table(TAGS)
                .unwrap()
                .insert(("r", "v1"), m.as_str())
                .unwrap();
            txn.open_table(REPOSITORIES)
                .unwrap()
                .insert("r", ())
                .unwrap();
            txn.commit().unwrap();
        }
        let s = RedbStore::open(&path).unwrap();
        let got = s.manifest("r", &m).await.unwrap().unwrap();
        // The foreign layer is not a reference; the config and layer count once.
        assert_eq!(got.references, vec![layer.clone()]);
        assert!(s.is_referenced(&layer).await.unwrap());
        assert!(!s.is_referenced(&stray).await.unwrap());
        let queued = due(s
            .gc_candidates(CandidateKind::Blob, u64::MAX, 10)
            .await
            .unwrap());
        assert_eq!(queued, vec![Candidate::Blob(stray.clone())]);
        let t = s.tag_details("r", None, 10).await.unwrap();
        assert_eq!(t[0].digest, m);
        assert!(t[0].updated > 0);
        // Reverse links were built: collecting the stray removes its link.
        let got = s.collect_blob(&stray, u64::MAX).await.unwrap();
        assert_eq!(got.unlinked, vec!["r".to_owned()]);
        assert!(got.deleted.is_some());
        drop(s);
        // Upgraded once: reopening changes nothing.
        let s = RedbStore::open(&path).unwrap();
        assert_eq!(
            s.manifest("r", &m).await.unwrap().unwrap().references,
            vec![layer]
        );
        assert_eq!(s.blob(&stray).await.unwrap(), None);
    }

    const OCI: &str = "application/vnd.oci.image.manifest.v1+json";
}
