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
//! # Claims
//!
//! redb lets one process open the file, so that process is every writer there is: claims
//! ([`MetaStore::claim`]) live in its memory, not in the file, and end with it.

use std::collections::HashMap;
use std::fmt::Display;
use std::ops::Bound;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ::redb::{
    Database, Key, ReadOnlyTable, ReadTransaction, ReadableDatabase, ReadableTable, Table,
    TableDefinition, TableHandle, Value, WriteTransaction,
};
use async_trait::async_trait;
use bytes::Bytes;

use super::{
    upload_claim, BlobRecord, Linked, ManifestRecord, MetaError, MetaResult, MetaStore,
    PendingChange, Referrer, UploadSession,
};
use crate::registry::names::Digest;

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

/// The embedded metadata store. Cheap to clone (the database is shared).
#[derive(Clone)]
pub struct RedbStore {
    db: Arc<Database>,
    /// Claim name -> (holder, expiry).
    claims: Arc<Mutex<HashMap<String, (String, Instant)>>>,
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

/// Maps any redb (or other displayable) error to a [`MetaError`] with context.
fn ctx<E: Display>(what: &'static str) -> impl FnOnce(E) -> MetaError {
    move |e| MetaError::Failed(format!("{what}: {e}"))
}

fn corrupt(what: &str, detail: impl Display) -> MetaError {
    MetaError::Failed(format!("corrupt record in {what}: {detail}"))
}

fn parse_digest(table: &str, s: &str) -> MetaResult<Digest> {
    Digest::parse(s).ok_or_else(|| corrupt(table, format_args!("bad digest {s:?}")))
}

fn decode_session(bytes: &[u8]) -> MetaResult<UploadSession> {
    serde_json::from_slice(bytes).map_err(|e| corrupt("uploads", e))
}

fn encode_session(session: &UploadSession) -> MetaResult<Vec<u8>> {
    serde_json::to_vec(session).map_err(ctx("encode upload session"))
}

fn wtable<'t, K: Key + 'static, V: Value + 'static>(
    txn: &'t WriteTransaction,
    def: TableDefinition<K, V>,
) -> MetaResult<Table<'t, K, V>> {
    txn.open_table(def)
        .map_err(|e| MetaError::Failed(format!("open table {}: {e}", def.name())))
}

fn rtable<K: Key + 'static, V: Value + 'static>(
    txn: &ReadTransaction,
    def: TableDefinition<K, V>,
) -> MetaResult<ReadOnlyTable<K, V>> {
    txn.open_table(def)
        .map_err(|e| MetaError::Failed(format!("open table {}: {e}", def.name())))
}

/// Removes all pending chunks of upload `id`.
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
    Ok(Some(ManifestRecord {
        media_type: media_type.to_owned(),
        body: Bytes::copy_from_slice(body),
        subject: subject.map(|s| parse_digest("manifests", s)).transpose()?,
    }))
}

fn clear_pending(pending: &mut Table<'_, (&str, u32), &[u8]>, id: &str) -> MetaResult<()> {
    pending
        .retain_in((id, 0u32)..=(id, u32::MAX), |_, _| false)
        .map_err(ctx("clear pending bytes"))
}

impl RedbStore {
    /// Creates or opens the database file at `path` (its directory must exist) and creates any
    /// missing table.
    pub fn open(path: &Path) -> MetaResult<RedbStore> {
        let db = Database::create(path)
            .map_err(|e| MetaError::Failed(format!("open {}: {e}", path.display())))?;
        let txn = db.begin_write().map_err(ctx("create tables"))?;
        wtable(&txn, BLOBS)?;
        wtable(&txn, REPO_BLOBS)?;
        wtable(&txn, MANIFESTS)?;
        wtable(&txn, TAGS)?;
        wtable(&txn, REPOSITORIES)?;
        wtable(&txn, REFERRERS)?;
        wtable(&txn, UPLOADS)?;
        wtable(&txn, UPLOAD_PENDING)?;
        txn.commit().map_err(ctx("create tables"))?;
        Ok(RedbStore {
            db: Arc::new(db),
            claims: Arc::default(),
        })
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
        self.claims.lock().unwrap_or_else(|p| p.into_inner())
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
        self.db.begin_read().map_err(ctx("begin read transaction"))
    }

    /// Runs `f` in one write transaction on the blocking pool, committing (durably) or aborting
    /// as `f` says. An error aborts.
    async fn write<T, F>(&self, what: &'static str, f: F) -> MetaResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&WriteTransaction) -> MetaResult<Outcome<T>> + Send + 'static,
    {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || {
            let txn = db.begin_write().map_err(ctx(what))?;
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
        })
        .await
        .map_err(|e| MetaError::Failed(format!("{what}: write task failed: {e}")))?
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
            let mut links = wtable(txn, REPO_BLOBS)?;
            links
                .insert((repo.as_str(), digest.as_str()), ())
                .map_err(ctx("insert link"))?;
            let mut repos = wtable(txn, REPOSITORIES)?;
            repos
                .insert(repo.as_str(), ())
                .map_err(ctx("insert repository"))?;
            Ok(Outcome::Commit(true))
        })
        .await
    }

    async fn unlink_blob(&self, repo: &str, digest: &Digest) -> MetaResult<bool> {
        let repo = repo.to_owned();
        let digest = digest.clone();
        self.write("unlink_blob", move |txn| {
            let mut links = wtable(txn, REPO_BLOBS)?;
            let existed = links
                .remove((repo.as_str(), digest.as_str()))
                .map_err(ctx("remove link"))?
                .is_some();
            Ok(if existed {
                Outcome::Commit(true)
            } else {
                Outcome::Abort(false)
            })
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
    ) -> MetaResult<()> {
        let repo = repo.to_owned();
        let digest = digest.clone();
        let tag = tag.map(str::to_owned);
        self.write("put_manifest", move |txn| {
            let repo = repo.as_str();
            let digest = digest.as_str();
            let mut referrers = wtable(txn, REFERRERS)?;
            {
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
                if let Some(old) = old {
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
            }
            if let Some(r) = &referrer {
                referrers
                    .insert((repo, r.subject.as_str(), digest), &r.descriptor[..])
                    .map_err(ctx("insert referrer"))?;
            }
            if let Some(tag) = &tag {
                let mut tags = wtable(txn, TAGS)?;
                tags.insert((repo, tag.as_str()), digest)
                    .map_err(ctx("insert tag"))?;
            }
            let mut repos = wtable(txn, REPOSITORIES)?;
            repos.insert(repo, ()).map_err(ctx("insert repository"))?;
            Ok(Outcome::Commit(()))
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
            let repo = repo.as_str();
            let digest = digest.as_str();
            let mut manifests = wtable(txn, MANIFESTS)?;
            let Some(old) = manifests
                .remove((repo, digest))
                .map_err(ctx("remove manifest"))?
            else {
                return Ok(Outcome::Abort(false));
            };
            if let (_, Some(subject), _) = old.value() {
                let mut referrers = wtable(txn, REFERRERS)?;
                referrers
                    .remove((repo, subject, digest))
                    .map_err(ctx("remove referrer"))?;
            }
            drop(old);
            let mut tags = wtable(txn, TAGS)?;
            // All of the repo's tags: from (repo, "") while the repo matches.
            let mut doomed = Vec::new();
            for entry in tags
                .range::<(&str, &str)>((repo, "")..)
                .map_err(ctx("scan tags"))?
            {
                let (k, v) = entry.map_err(ctx("scan tags"))?;
                let (r, t) = k.value();
                if r != repo {
                    break;
                }
                if v.value() == digest {
                    doomed.push(t.to_owned());
                }
            }
            for t in &doomed {
                tags.remove((repo, t.as_str())).map_err(ctx("remove tag"))?;
            }
            Ok(Outcome::Commit(true))
        })
        .await
    }

    async fn delete_tag(&self, repo: &str, tag: &str) -> MetaResult<bool> {
        let repo = repo.to_owned();
        let tag = tag.to_owned();
        self.write("delete_tag", move |txn| {
            let mut tags = wtable(txn, TAGS)?;
            let existed = tags
                .remove((repo.as_str(), tag.as_str()))
                .map_err(ctx("remove tag"))?
                .is_some();
            Ok(if existed {
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
        let json = encode_session(session)?;
        self.write("create_upload", move |txn| {
            let mut uploads = wtable(txn, UPLOADS)?;
            uploads
                .insert(id.as_str(), &json[..])
                .map_err(ctx("insert session"))?;
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
        let json = encode_session(session)?;
        self.write("save_upload", move |txn| {
            let id = id.as_str();
            let mut uploads = wtable(txn, UPLOADS)?;
            uploads
                .insert(id, &json[..])
                .map_err(ctx("insert session"))?;
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
                let mut uploads = wtable(txn, UPLOADS)?;
                let existed = uploads
                    .remove(id.as_str())
                    .map_err(ctx("remove session"))?
                    .is_some();
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
        for entry in uploads.iter().map_err(ctx("idle_uploads"))? {
            let (_, v) = entry.map_err(ctx("idle_uploads"))?;
            let session = decode_session(v.value())?;
            if session.updated < cutoff {
                out.push(session);
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
                    let mut uploads = wtable(txn, UPLOADS)?;
                    uploads.remove(id.as_str()).map_err(ctx("remove session"))?;
                    let mut pending = wtable(txn, UPLOAD_PENDING)?;
                    clear_pending(&mut pending, &id)?;
                }
                let mut blobs = wtable(txn, BLOBS)?;
                let existing = blobs.get(digest).map_err(ctx("get blob"))?.map(|g| {
                    let (size, key) = g.value();
                    BlobRecord {
                        key: key.to_owned(),
                        size,
                    }
                });
                let linked = match existing {
                    Some(existing) => Linked::Existing(existing),
                    None => {
                        blobs
                            .insert(digest, (record.size, record.key.as_str()))
                            .map_err(ctx("insert blob"))?;
                        Linked::New
                    }
                };
                let mut links = wtable(txn, REPO_BLOBS)?;
                links
                    .insert((repo, digest), ())
                    .map_err(ctx("insert link"))?;
                let mut repos = wtable(txn, REPOSITORIES)?;
                repos.insert(repo, ()).map_err(ctx("insert repository"))?;
                Ok(Outcome::Commit(linked))
            })
            .await;
        self.claims().remove(&claim);
        linked
    }
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

        // Unlink removes only that repo's link; the global record and the repository stay.
        assert!(s.unlink_blob("dst", &d).await.unwrap());
        assert!(!s.unlink_blob("dst", &d).await.unwrap());
        assert_eq!(s.repo_blob("dst", &d).await.unwrap(), None);
        assert_eq!(s.repo_blob("src", &d).await.unwrap(), Some(blob("k1", 10)));
        assert_eq!(s.blob(&d).await.unwrap(), Some(blob("k1", 10)));
        assert!(s.repository_exists("dst").await.unwrap());
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
}
