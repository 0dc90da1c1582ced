//! The bucket journal: a [`MetaStore`] decorator that makes the bucket the durable record of
//! every acknowledged metadata write, so that any node's metadata store can be rebuilt from
//! the bucket alone.
//!
//! # What is recorded, and where
//!
//! For each mutating, acknowledged operation the record is written to the bucket FIRST, then
//! the operation is delegated to the inner store; if the record cannot be written the call
//! fails with [`MetaError::Unavailable`] (the client gets 503 + Retry-After) and the local
//! commit does not happen. Reads, and upload sessions (open sessions may be lost), pass
//! through untouched: a manifest GET makes no S3 request.
//!
//! - `<prefix>blobs/sha256/<hex>/<repo>`: bytes of a blob that berth verified before writing
//!   them (a finish whose bytes were in memory, see `registry::upload`). The key itself is the
//!   record: digest, uploading repository, and the size in the listing. No extra request.
//! - `<prefix>journal/<time>-<node>-<seq>/<what>`: one small object per other write, never
//!   overwritten (the node id is random per process, the sequence per node), listed in key
//!   order = time order. `<what>` is for people (`aws s3 ls --recursive`); the body is the
//!   record: one JSON line ([`Op`]), then for a manifest its body byte-exact.
//!
//! # Order
//!
//! Records and commits on the same tag, manifest or blob digest are serialized inside the
//! node (striped locks), so the bucket's order is the store's order. Across nodes (one
//! PostgreSQL database) the store orders them ([`MetaStore::journal_order`]): a write holds
//! its stripes in the database from before its record until after its commit, and its record
//! time is after the previous record of those stripes, whatever the nodes' clocks say. So for
//! writes to the same items, key order is commit order on every node.
//!
//! # Repair and rebuild
//!
//! The store keeps a watermark: every record with a time before it is applied. At start the
//! store catches up by replaying the records from the watermark (less [`CATCH_UP_MARGIN`])
//! on: a crash between a record and its commit is repaired. Replays are idempotent (every
//! record sets or removes state). On a store shared by nodes the others serve meanwhile, so a
//! record replayed may be older than what another node has committed to the same items since:
//! each record is replayed under its order stripes ([`MetaStore::journal_stripes`]), and a
//! part whose stripe has a later record is left out (the store has that newer state already).
//! A fresh store is rebuilt from the verified blobs and the whole journal ([`rebuild`]).

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};

use super::{
    BlobCollection, BlobRecord, Candidate, CandidateKind, Linked, ManifestPut, ManifestRecord,
    MetaError, MetaResult, MetaStore, PendingChange, QueuedCandidate, Referrer, TagInfo,
    UploadSession,
};
use crate::registry::names::Digest;
use crate::storage::{ObjectBody, ObjectStore, StorageError, MAX_RECORD_KEY, VERIFIED_BLOBS};

/// Journal records live under `<prefix>journal/`.
pub const JOURNAL: &str = "journal/";
/// Catch-up replays from this long before the watermark: records of other nodes written just
/// before it may still have been committing, and clocks differ a little.
pub const CATCH_UP_MARGIN: Duration = Duration::from_secs(60);
/// `<time>-<node>-<seq>/` in a journal key.
const UNIQUE_PART: usize = 24 + 1 + 8 + 1 + 8 + 1;
/// Stripes ordering record + commit across nodes ([`MetaStore::journal_order`]). A stable
/// hash of the item: every node (every berth version) maps an item to the same stripe.
pub const ORDER_STRIPES: u32 = 1024;
/// Lock stripes for serializing record + commit inside the node: `order stripe % STRIPES`
/// (two writes that share an order stripe share a local one, and wait for each other here).
const STRIPES: usize = 64;
/// Session id that no session has: a replayed link is a `finish_upload` without a session.
const NO_SESSION: &str = "";

/// One journal record (the first line of its object, as JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    /// The manifest body follows the JSON line.
    PutManifest {
        repo: String,
        digest: String,
        media_type: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        subject: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tag: Option<String>,
        /// The referrers-index descriptor (JSON text) when the manifest has a subject.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        referrer: Option<String>,
    },
    DeleteManifest {
        repo: String,
        digest: String,
    },
    DeleteTag {
        repo: String,
        tag: String,
    },
    /// `repo` links `digest`, whose bytes are at `key` (the index keeps the first key it saw).
    Link {
        repo: String,
        digest: String,
        key: String,
        size: u64,
    },
    Unlink {
        repo: String,
        digest: String,
    },
    /// Garbage collection removed these links of `digest` and, when `deleted`, its record
    /// (its object is deleted only after this record exists).
    Collected {
        digest: String,
        unlinked: Vec<String>,
        deleted: bool,
    },
    /// One GC batch: [`Op::Collected`] for each blob, committed together.
    CollectedBlobs {
        blobs: Vec<CollectedBlob>,
    },
    /// `berth import`: `repo` adopts blobs whose bytes already lie at `key` (another
    /// registry's objects), all in one record.
    Adopt {
        repo: String,
        blobs: Vec<AdoptedBlob>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CollectedBlob {
    pub digest: String,
    pub unlinked: Vec<String>,
    pub deleted: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdoptedBlob {
    pub digest: String,
    pub key: String,
    pub size: u64,
}

impl Op {
    /// The record's object body: the JSON line, then `payload`.
    pub fn encode(&self, payload: &[u8]) -> Bytes {
        let mut out = serde_json::to_vec(self).expect("journal op serializes");
        out.reserve(1 + payload.len());
        out.push(b'\n');
        out.extend_from_slice(payload);
        Bytes::from(out)
    }

    pub fn decode(body: &Bytes) -> Result<(Op, Bytes), String> {
        let nl = body
            .iter()
            .position(|&b| b == b'\n')
            .ok_or("no JSON line")?;
        let op = serde_json::from_slice(&body[..nl]).map_err(|e| e.to_string())?;
        Ok((op, body.slice(nl + 1..)))
    }

    /// The items the write that wrote this record held the order stripes of: the same
    /// helpers as the write path (a GC batch held the stripes of every blob it looked at; the
    /// record names those it collected).
    fn items(&self) -> Vec<Item<'_>> {
        match self {
            Op::PutManifest {
                repo, digest, tag, ..
            } => put_manifest_items(repo, digest, tag.as_deref()),
            Op::DeleteManifest { repo, digest } => vec![manifest_item(repo, digest)],
            Op::DeleteTag { repo, tag } => vec![tag_item(repo, tag)],
            Op::Link { digest, .. } | Op::Unlink { digest, .. } | Op::Collected { digest, .. } => {
                vec![blob_item(digest)]
            }
            Op::CollectedBlobs { blobs } => blobs.iter().map(|b| blob_item(&b.digest)).collect(),
            Op::Adopt { blobs, .. } => blobs.iter().map(|b| blob_item(&b.digest)).collect(),
        }
    }

    /// The human part of the record's key.
    fn describe(&self) -> String {
        match self {
            Op::PutManifest {
                repo,
                digest,
                tag: Some(tag),
                ..
            } => format!("manifest/{repo}:{tag}@{digest}"),
            Op::PutManifest { repo, digest, .. } => format!("manifest/{repo}@{digest}"),
            Op::DeleteManifest { repo, digest } => format!("delete-manifest/{repo}@{digest}"),
            Op::DeleteTag { repo, tag } => format!("delete-tag/{repo}:{tag}"),
            Op::Link { repo, digest, .. } => format!("link/{repo}@{digest}"),
            Op::Unlink { repo, digest } => format!("unlink/{repo}@{digest}"),
            Op::Adopt { repo, blobs } => format!("adopt/{repo}+{}", blobs.len()),
            Op::Collected { digest, .. } => format!("collected/{digest}"),
            Op::CollectedBlobs { blobs } => match blobs.first() {
                Some(first) => format!("collected/{}+{}", first.digest, blobs.len()),
                None => "collected/none".to_owned(),
            },
        }
    }
}

fn failed(what: impl std::fmt::Display) -> MetaError {
    MetaError::Failed(format!("journal: {what}"))
}

fn digest(s: &str) -> MetaResult<Digest> {
    Digest::parse(s).ok_or_else(|| failed(format!("record names an invalid digest {s:?}")))
}

/// `2026-12-02T16:21:50.123Z`: fixed width, so keys sort in time order.
fn format_time(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

fn parse_time(s: &str) -> Option<SystemTime> {
    humantime::parse_rfc3339(s).ok()
}

/// The time part of a journal key (`<prefix>journal/<time>-...`).
fn key_time<'k>(prefix: &str, key: &'k str) -> Option<&'k str> {
    let rest = key.strip_prefix(prefix)?.strip_prefix(JOURNAL)?;
    rest.get(..24)
}

/// Holds stripes of the journal's order for the other nodes ([`MetaStore::journal_order`]).
/// Release it explicitly (after the local commit, and on failure); dropped instead, it must
/// still let the stripes go (e.g. by closing its database connection).
#[async_trait]
pub trait OrderGuard: Send + Sync {
    /// The time (unix ms) of the records written under the guard.
    fn time_ms(&self) -> u64;
    async fn release(self: Box<Self>);
}

/// Order stripes a catch-up holds while it replays one record ([`MetaStore::journal_stripes`]).
pub struct HeldStripes {
    /// Holds the stripes against the other nodes' writes (its time means nothing): release it
    /// once the record is applied.
    pub guard: Box<dyn OrderGuard>,
    /// `last_ms` of each stripe that has one: the time of its newest record, whose write has
    /// committed (or its node died) since no write holds the stripe now.
    pub last_ms: BTreeMap<u32, u64>,
}

/// The order stripe of an item (FNV-1a over its parts: stable across builds).
fn order_stripe(item: &(&str, &str, &str)) -> u32 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in [item.0, item.1, item.2] {
        for b in part.bytes().chain(std::iter::once(0)) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    (h % u64::from(ORDER_STRIPES)) as u32
}

/// An item a write touches (its order stripe orders its records across nodes). The write path
/// locks these, and a replay checks the same ones ([`Op::items`]): one definition for both.
type Item<'a> = (&'a str, &'a str, &'a str);

/// A blob digest: its record in the index and every repository's link of it.
fn blob_item(digest: &str) -> Item<'_> {
    ("blob", digest, "")
}

fn manifest_item<'a>(repo: &'a str, digest: &'a str) -> Item<'a> {
    ("manifest", repo, digest)
}

fn tag_item<'a>(repo: &'a str, tag: &'a str) -> Item<'a> {
    ("tag", repo, tag)
}

/// What a manifest PUT touches: the manifest, and the tag when it sets one.
fn put_manifest_items<'a>(repo: &'a str, digest: &'a str, tag: Option<&'a str>) -> Vec<Item<'a>> {
    let mut items = vec![manifest_item(repo, digest)];
    items.extend(tag.map(|t| tag_item(repo, t)));
    items
}

/// The order stripes of `items`, sorted and deduplicated.
fn order_stripes(items: &[Item<'_>]) -> Vec<u32> {
    let mut order: Vec<u32> = items.iter().map(order_stripe).collect();
    order.sort_unstable();
    order.dedup();
    order
}

fn now_ms() -> u64 {
    unix_ms(SystemTime::now())
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The stripes a write holds: in the node, and (on a shared store) across nodes.
struct Held<'j> {
    _local: Vec<tokio::sync::MutexGuard<'j, ()>>,
    order: Option<Box<dyn OrderGuard>>,
}

impl Held<'_> {
    /// The time the records written under these stripes must carry (None: the node's clock).
    fn time(&self) -> Option<u64> {
        self.order.as_ref().map(|g| g.time_ms())
    }

    /// Lets the stripes go: across nodes first, then in the node.
    async fn release(self) {
        if let Some(g) = self.order {
            g.release().await;
        }
    }
}

/// Writes records: the node's identity, its clock and sequence, the locks, and what is in
/// flight (for the watermark).
pub struct Journal {
    store: Arc<ObjectStore>,
    /// Random per process: keys of two processes never collide.
    node: String,
    clock: Mutex<Clock>,
    stripes: Vec<tokio::sync::Mutex<()>>,
    /// Times of records written (or being written) whose local commit has not succeeded,
    /// with their count. A failed commit stays here until the process ends, so the
    /// watermark never passes it and the next start replays it.
    in_flight: Mutex<BTreeMap<String, u32>>,
    records: AtomicU64,
    /// Why the last record could not be written, until one is written again (readiness).
    write_failure: Mutex<Option<String>>,
}

struct Clock {
    last_ms: u64,
    seq: u64,
}

/// A record in flight: [`Ticket::committed`] once the local commit succeeded.
struct Ticket<'j> {
    journal: &'j Journal,
    time: String,
}

impl Ticket<'_> {
    fn committed(self) {
        let mut in_flight = self.journal.in_flight.lock().expect("in_flight poisoned");
        if let Some(n) = in_flight.get_mut(&self.time) {
            *n -= 1;
            if *n == 0 {
                in_flight.remove(&self.time);
            }
        }
    }
}

impl Journal {
    pub fn new(store: Arc<ObjectStore>) -> Journal {
        Journal {
            store,
            node: format!("{:08x}", rand::random::<u32>()),
            clock: Mutex::new(Clock { last_ms: 0, seq: 0 }),
            stripes: (0..STRIPES).map(|_| tokio::sync::Mutex::new(())).collect(),
            in_flight: Mutex::new(BTreeMap::new()),
            records: AtomicU64::new(0),
            write_failure: Mutex::new(None),
        }
    }

    /// Ok when records can be written: after a failed record, a small probe object is written
    /// (at most once per readiness check) until one succeeds.
    pub async fn check_writable(&self) -> MetaResult<()> {
        let failing = self.write_failure.lock().expect("failure lock").clone();
        let Some(cause) = failing else {
            return Ok(());
        };
        let probe = self.store.key("journal-write-probe");
        match self
            .store
            .put_object(&probe, ObjectBody::Bytes(Bytes::from_static(b"ok")))
            .await
        {
            Ok(()) => {
                log::info!("journal: the bucket takes records again");
                *self.write_failure.lock().expect("failure lock") = None;
                Ok(())
            }
            Err(_) => Err(MetaError::Unavailable(format!(
                "bucket cannot take journal records: {cause}"
            ))),
        }
    }

    /// Records written by this process.
    pub fn records_written(&self) -> u64 {
        self.records.load(Ordering::Relaxed)
    }

    /// A watermark that is safe to store now: before every record still in flight, else now.
    pub fn safe_watermark(&self) -> String {
        let in_flight = self.in_flight.lock().expect("in_flight poisoned");
        match in_flight.keys().next() {
            Some(oldest) => oldest.clone(),
            None => format_time(SystemTime::now()),
        }
    }

    /// Holds the stripes of `items` in the node, then across nodes when `meta` orders them
    /// (both sorted, so two callers never deadlock).
    async fn lock(&self, meta: &dyn MetaStore, items: &[Item<'_>]) -> MetaResult<Held<'_>> {
        let order = order_stripes(items);
        let mut idx: Vec<usize> = order.iter().map(|&o| o as usize % STRIPES).collect();
        idx.sort_unstable();
        idx.dedup();
        let mut local = Vec::with_capacity(idx.len());
        for i in idx {
            local.push(self.stripes[i].lock().await);
        }
        let at = {
            let c = self.clock.lock().expect("clock poisoned");
            c.last_ms.max(now_ms())
        };
        let order = meta.journal_order(&order, at).await?;
        Ok(Held {
            _local: local,
            order,
        })
    }

    /// Writes the record, at time `at` (unix ms) when the store orders records across nodes
    /// (else by the node's clock); the caller commits locally only if this succeeded.
    async fn write(&self, op: &Op, payload: &[u8], at: Option<u64>) -> MetaResult<Ticket<'_>> {
        let (time, seq) = {
            let mut c = self.clock.lock().expect("clock poisoned");
            // Never backwards, so that this node's records stay in order. A time the store
            // gave is kept as given: it is what the stripe's next record comes after.
            c.last_ms = c.last_ms.max(at.unwrap_or_else(now_ms));
            c.seq += 1;
            let time = format_time(UNIX_EPOCH + Duration::from_millis(at.unwrap_or(c.last_ms)));
            *self
                .in_flight
                .lock()
                .expect("in_flight poisoned")
                .entry(time.clone())
                .or_insert(0) += 1;
            (time, c.seq)
        };
        let mut key = self.store.key(&format!(
            "{JOURNAL}{time}-{}-{seq:08}/{}",
            self.node,
            op.describe()
        ));
        // The human part may be cut: the body is the record; time, node and sequence make
        // the key unique. (All of it is ASCII: names, tags and digests are.)
        let unique = self.store.prefix().len() + JOURNAL.len() + UNIQUE_PART;
        key.truncate(key.len().min(MAX_RECORD_KEY.max(unique)));
        match self
            .store
            .put_object(&key, ObjectBody::Bytes(op.encode(payload)))
            .await
        {
            Ok(()) => {
                self.records.fetch_add(1, Ordering::Relaxed);
                *self.write_failure.lock().expect("failure lock") = None;
                Ok(Ticket {
                    journal: self,
                    time,
                })
            }
            // The record may have been stored all the same (a timeout after the write): its
            // time stays in flight, so the next start replays it if it exists.
            Err(e) => {
                *self.write_failure.lock().expect("failure lock") = Some(e.to_string());
                Err(MetaError::Unavailable(format!(
                    "journal record {key} not written: {e}"
                )))
            }
        }
    }
}

/// How often the decorator stores the watermark (a start replays at most the records since).
const WATERMARK_EVERY: Duration = Duration::from_secs(10);

/// The decorator: see the module documentation.
pub struct Journaled<M> {
    inner: M,
    journal: Arc<Journal>,
    /// When the watermark was last stored.
    watermark_stored: Mutex<Instant>,
}

impl<M: MetaStore> Journaled<M> {
    pub fn new(inner: M, journal: Arc<Journal>) -> Self {
        Journaled {
            inner,
            journal,
            watermark_stored: Mutex::new(Instant::now()),
        }
    }

    /// The record's local commit succeeded; now and then the watermark moves up (one small
    /// write every [`WATERMARK_EVERY`] at most, only while records are written).
    async fn committed(&self, ticket: Ticket<'_>) {
        ticket.committed();
        {
            let mut at = self.watermark_stored.lock().expect("watermark poisoned");
            if at.elapsed() < WATERMARK_EVERY {
                return;
            }
            *at = Instant::now();
        }
        let watermark = self.journal.safe_watermark();
        if let Err(e) = self.inner.set_journal_watermark(&watermark).await {
            log::warn!("journal: storing the watermark {watermark}: {e}");
        }
    }

    /// Holds the stripes of `items`, in the node and across nodes (see [`Journal::lock`]):
    /// release them after the local commit.
    async fn lock(&self, items: &[Item<'_>]) -> MetaResult<Held<'_>> {
        self.journal.lock(&self.inner, items).await
    }

    /// Whether `record` is a blob at its verified key (the key is the record).
    fn is_verified_key(&self, repo: &str, digest: &Digest, record: &BlobRecord) -> bool {
        self.journal.store.verified_blob_key(digest, repo).as_ref() == Some(&record.key)
    }
}

#[async_trait]
impl<M: MetaStore> MetaStore for Journaled<M> {
    // Claims coordinate live writers; they are not acknowledged state (not journaled).
    async fn claim(&self, name: &str, holder: &str, ttl: Duration) -> MetaResult<bool> {
        self.inner.claim(name, holder, ttl).await
    }

    async fn release(&self, name: &str, holder: &str) -> MetaResult<()> {
        self.inner.release(name, holder).await
    }

    async fn blob(&self, digest: &Digest) -> MetaResult<Option<BlobRecord>> {
        self.inner.blob(digest).await
    }

    async fn repo_blob(&self, repo: &str, digest: &Digest) -> MetaResult<Option<BlobRecord>> {
        self.inner.repo_blob(repo, digest).await
    }

    async fn link_blob(&self, repo: &str, digest: &Digest) -> MetaResult<bool> {
        let held = self.lock(&[blob_item(digest.as_str())]).await?;
        let out = async {
            let Some(blob) = self.inner.blob(digest).await? else {
                return Ok(false);
            };
            if self.inner.repo_blob(repo, digest).await?.is_some() {
                // Already linked: nothing changes that the bucket does not already say.
                return self.inner.link_blob(repo, digest).await;
            }
            let op = Op::Link {
                repo: repo.to_owned(),
                digest: digest.to_string(),
                key: blob.key,
                size: blob.size,
            };
            let ticket = self.journal.write(&op, &[], held.time()).await?;
            let out = self.inner.link_blob(repo, digest).await?;
            self.committed(ticket).await;
            Ok(out)
        }
        .await;
        held.release().await;
        out
    }

    async fn unlink_blob(&self, repo: &str, digest: &Digest) -> MetaResult<bool> {
        let held = self.lock(&[blob_item(digest.as_str())]).await?;
        let out = async {
            if self.inner.repo_blob(repo, digest).await?.is_none() {
                return Ok(false);
            }
            let op = Op::Unlink {
                repo: repo.to_owned(),
                digest: digest.to_string(),
            };
            let ticket = self.journal.write(&op, &[], held.time()).await?;
            let out = self.inner.unlink_blob(repo, digest).await?;
            self.committed(ticket).await;
            Ok(out)
        }
        .await;
        held.release().await;
        out
    }

    async fn put_manifest(
        &self,
        repo: &str,
        digest: &Digest,
        record: ManifestRecord,
        tag: Option<&str>,
        referrer: Option<Referrer>,
    ) -> MetaResult<ManifestPut> {
        let held = self
            .lock(&put_manifest_items(repo, digest.as_str(), tag))
            .await?;
        let out = async {
            // A re-push that changes nothing needs no record.
            let unchanged = match tag {
                Some(t) => self
                    .inner
                    .tagged_manifest(repo, t)
                    .await?
                    .is_some_and(|(d, r)| &d == digest && r == record),
                None => self
                    .inner
                    .manifest(repo, digest)
                    .await?
                    .is_some_and(|r| r == record),
            };
            if unchanged {
                return self
                    .inner
                    .put_manifest(repo, digest, record, tag, referrer)
                    .await;
            }
            let op = Op::PutManifest {
                repo: repo.to_owned(),
                digest: digest.to_string(),
                media_type: record.media_type.clone(),
                subject: record.subject.as_ref().map(Digest::to_string),
                tag: tag.map(str::to_owned),
                referrer: referrer
                    .as_ref()
                    .map(|r| String::from_utf8_lossy(&r.descriptor).into_owned()),
            };
            let ticket = self.journal.write(&op, &record.body, held.time()).await?;
            // MissingReference (GC took a blob after the registry checked) changes nothing here;
            // its record stays in the bucket and is skipped on replay the same way.
            let out = self
                .inner
                .put_manifest(repo, digest, record, tag, referrer)
                .await?;
            self.committed(ticket).await;
            Ok(out)
        }
        .await;
        held.release().await;
        out
    }

    async fn manifest(&self, repo: &str, digest: &Digest) -> MetaResult<Option<ManifestRecord>> {
        self.inner.manifest(repo, digest).await
    }

    async fn tagged_manifest(
        &self,
        repo: &str,
        tag: &str,
    ) -> MetaResult<Option<(Digest, ManifestRecord)>> {
        self.inner.tagged_manifest(repo, tag).await
    }

    async fn delete_manifest(&self, repo: &str, digest: &Digest) -> MetaResult<bool> {
        let held = self.lock(&[manifest_item(repo, digest.as_str())]).await?;
        let out = async {
            if self.inner.manifest(repo, digest).await?.is_none() {
                return Ok(false);
            }
            let op = Op::DeleteManifest {
                repo: repo.to_owned(),
                digest: digest.to_string(),
            };
            let ticket = self.journal.write(&op, &[], held.time()).await?;
            let out = self.inner.delete_manifest(repo, digest).await?;
            self.committed(ticket).await;
            Ok(out)
        }
        .await;
        held.release().await;
        out
    }

    async fn delete_tag(&self, repo: &str, tag: &str) -> MetaResult<bool> {
        let held = self.lock(&[tag_item(repo, tag)]).await?;
        let out = async {
            if self.inner.tagged_manifest(repo, tag).await?.is_none() {
                return Ok(false);
            }
            let op = Op::DeleteTag {
                repo: repo.to_owned(),
                tag: tag.to_owned(),
            };
            let ticket = self.journal.write(&op, &[], held.time()).await?;
            let out = self.inner.delete_tag(repo, tag).await?;
            self.committed(ticket).await;
            Ok(out)
        }
        .await;
        held.release().await;
        out
    }

    async fn tags(&self, repo: &str, last: Option<&str>, limit: usize) -> MetaResult<Vec<String>> {
        self.inner.tags(repo, last, limit).await
    }

    async fn repositories(&self, last: Option<&str>, limit: usize) -> MetaResult<Vec<String>> {
        self.inner.repositories(last, limit).await
    }

    async fn repository_exists(&self, repo: &str) -> MetaResult<bool> {
        self.inner.repository_exists(repo).await
    }

    async fn referrers(&self, repo: &str, subject: &Digest) -> MetaResult<Vec<Bytes>> {
        self.inner.referrers(repo, subject).await
    }

    // ---- upload sessions: not journaled (open sessions may be lost) ----

    async fn create_upload(&self, session: &UploadSession) -> MetaResult<()> {
        self.inner.create_upload(session).await
    }

    async fn upload(&self, id: &str) -> MetaResult<Option<UploadSession>> {
        self.inner.upload(id).await
    }

    async fn pending(&self, id: &str) -> MetaResult<Bytes> {
        self.inner.pending(id).await
    }

    async fn save_upload(&self, session: &UploadSession, pending: PendingChange) -> MetaResult<()> {
        self.inner.save_upload(session, pending).await
    }

    async fn delete_upload(&self, id: &str) -> MetaResult<bool> {
        self.inner.delete_upload(id).await
    }

    async fn idle_uploads(&self, cutoff: u64) -> MetaResult<Vec<UploadSession>> {
        self.inner.idle_uploads(cutoff).await
    }

    /// The blob record and the repository link are journaled; the session is not.
    async fn finish_upload(
        &self,
        id: &str,
        repo: &str,
        digest: &Digest,
        record: BlobRecord,
    ) -> MetaResult<Linked> {
        // By digest, across repositories: the first finish of a digest decides its key.
        let held = self.lock(&[blob_item(digest.as_str())]).await?;
        let out = async {
            let link = |key: String, size: u64| Op::Link {
                repo: repo.to_owned(),
                digest: digest.to_string(),
                key,
                size,
            };
            let existing = self.inner.blob(digest).await?;
            let linked = self.inner.repo_blob(repo, digest).await?.is_some();
            // The key the bucket states for this link once the record (if any) is written.
            let (ticket, stated) = match existing {
                // A new blob at its verified key: the object is the record.
                None if self.is_verified_key(repo, digest, &record) => (None, record.key.clone()),
                // A re-push: nothing changes that the bucket does not already say.
                Some(e) if linked => (None, e.key),
                other => {
                    let b = other.unwrap_or_else(|| record.clone());
                    let ticket = self
                        .journal
                        .write(&link(b.key.clone(), b.size), &[], held.time())
                        .await?;
                    (Some(ticket), b.key)
                }
            };
            let out = self.inner.finish_upload(id, repo, digest, record).await?;
            if let Some(t) = ticket {
                self.committed(t).await;
            }
            if let Linked::Existing(e) = &out {
                if e.key != stated {
                    // Another node stored the digest first: the caller deletes this copy next, so
                    // the bucket must first say which key the link points to (on error the copy
                    // stays, and with it what the bucket said).
                    let t = self
                        .journal
                        .write(&link(e.key.clone(), e.size), &[], held.time())
                        .await?;
                    self.committed(t).await;
                }
            }
            Ok(out)
        }
        .await;
        held.release().await;
        out
    }

    async fn adopt_blobs(
        &self,
        repo: &str,
        blobs: &[(Digest, BlobRecord)],
    ) -> MetaResult<Vec<Linked>> {
        if blobs.is_empty() {
            return self.inner.adopt_blobs(repo, blobs).await;
        }
        let stripes: Vec<Item<'_>> = blobs.iter().map(|(d, _)| blob_item(d.as_str())).collect();
        let held = self.lock(&stripes).await?;
        let out = async {
            // A re-run of an import: nothing changes that the bucket does not already say.
            let mut all_linked = true;
            for (d, _) in blobs {
                if self.inner.repo_blob(repo, d).await?.is_none() {
                    all_linked = false;
                    break;
                }
            }
            if all_linked {
                return self.inner.adopt_blobs(repo, blobs).await;
            }
            let op = Op::Adopt {
                repo: repo.to_owned(),
                blobs: blobs
                    .iter()
                    .map(|(d, r)| AdoptedBlob {
                        digest: d.to_string(),
                        key: r.key.clone(),
                        size: r.size,
                    })
                    .collect(),
            };
            let ticket = self.journal.write(&op, &[], held.time()).await?;
            let out = self.inner.adopt_blobs(repo, blobs).await?;
            self.committed(ticket).await;
            Ok(out)
        }
        .await;
        held.release().await;
        out
    }

    // ---- garbage collection ----
    // The queue is derived state: not journaled. Collection deletes acknowledged state, so its
    // outcome is recorded after the local commit and before the caller deletes any object: a
    // crash in between leaves the object and a record that still names it (garbage again,
    // never a record pointing at a deleted object).

    async fn gc_candidates(
        &self,
        kind: CandidateKind,
        cutoff: u64,
        limit: usize,
    ) -> MetaResult<Vec<QueuedCandidate>> {
        self.inner.gc_candidates(kind, cutoff, limit).await
    }

    async fn gc_queue_len(&self) -> MetaResult<u64> {
        self.inner.gc_queue_len().await
    }

    async fn gc_enqueue(&self, candidates: &[Candidate], now: u64) -> MetaResult<u64> {
        self.inner.gc_enqueue(candidates, now).await
    }

    async fn gc_dequeue(&self, candidates: &[Candidate]) -> MetaResult<()> {
        self.inner.gc_dequeue(candidates).await
    }

    async fn collect_blob(&self, digest: &Digest, cutoff: u64) -> MetaResult<BlobCollection> {
        let held = self.lock(&[blob_item(digest.as_str())]).await?;
        let out = async {
            let out = self.inner.collect_blob(digest, cutoff).await?;
            if !out.unlinked.is_empty() || out.deleted.is_some() {
                let op = Op::Collected {
                    digest: digest.to_string(),
                    unlinked: out.unlinked.clone(),
                    deleted: out.deleted.is_some(),
                };
                let ticket = self.journal.write(&op, &[], held.time()).await?;
                self.committed(ticket).await;
            }
            Ok(out)
        }
        .await;
        held.release().await;
        out
    }

    async fn collect_blobs(
        &self,
        digests: &[Digest],
        cutoff: u64,
    ) -> MetaResult<Vec<BlobCollection>> {
        let items: Vec<_> = digests.iter().map(|d| blob_item(d.as_str())).collect();
        let held = self.lock(&items).await?;
        let out = async {
            let out = self.inner.collect_blobs(digests, cutoff).await?;
            let blobs: Vec<CollectedBlob> = digests
                .iter()
                .zip(&out)
                .filter(|(_, c)| !c.unlinked.is_empty() || c.deleted.is_some())
                .map(|(d, c)| CollectedBlob {
                    digest: d.to_string(),
                    unlinked: c.unlinked.clone(),
                    deleted: c.deleted.is_some(),
                })
                .collect();
            if !blobs.is_empty() {
                let ticket = self
                    .journal
                    .write(&Op::CollectedBlobs { blobs }, &[], held.time())
                    .await?;
                self.committed(ticket).await;
            }
            Ok(out)
        }
        .await;
        held.release().await;
        out
    }

    async fn collect_manifest(
        &self,
        repo: &str,
        digest: &Digest,
        cutoff: u64,
    ) -> MetaResult<Option<ManifestRecord>> {
        let held = self.lock(&[manifest_item(repo, digest.as_str())]).await?;
        let out = async {
            let out = self.inner.collect_manifest(repo, digest, cutoff).await?;
            if out.is_some() {
                let op = Op::DeleteManifest {
                    repo: repo.to_owned(),
                    digest: digest.to_string(),
                };
                let ticket = self.journal.write(&op, &[], held.time()).await?;
                self.committed(ticket).await;
            }
            Ok(out)
        }
        .await;
        held.release().await;
        out
    }

    async fn blobs(
        &self,
        after: Option<&Digest>,
        limit: usize,
    ) -> MetaResult<Vec<(Digest, BlobRecord)>> {
        self.inner.blobs(after, limit).await
    }

    async fn is_referenced(&self, digest: &Digest) -> MetaResult<bool> {
        self.inner.is_referenced(digest).await
    }

    async fn unreferenced(&self, digests: &[Digest]) -> MetaResult<Vec<Digest>> {
        self.inner.unreferenced(digests).await
    }

    async fn repo_manifests(
        &self,
        repo: &str,
        after: Option<&Digest>,
        limit: usize,
    ) -> MetaResult<Vec<Digest>> {
        self.inner.repo_manifests(repo, after, limit).await
    }

    async fn tag_details(
        &self,
        repo: &str,
        last: Option<&str>,
        limit: usize,
    ) -> MetaResult<Vec<TagInfo>> {
        self.inner.tag_details(repo, last, limit).await
    }

    async fn delete_tag_if(&self, repo: &str, tag: &str, digest: &Digest) -> MetaResult<bool> {
        let held = self.lock(&[tag_item(repo, tag)]).await?;
        let out = async {
            let deleted = self.inner.delete_tag_if(repo, tag, digest).await?;
            if deleted {
                let op = Op::DeleteTag {
                    repo: repo.to_owned(),
                    tag: tag.to_owned(),
                };
                let ticket = self.journal.write(&op, &[], held.time()).await?;
                self.committed(ticket).await;
            }
            Ok(deleted)
        }
        .await;
        held.release().await;
        out
    }

    async fn check_writable(&self) -> MetaResult<()> {
        self.inner.check_writable().await?;
        self.journal.check_writable().await
    }

    async fn journal_watermark(&self) -> MetaResult<Option<String>> {
        self.inner.journal_watermark().await
    }

    async fn set_journal_watermark(&self, watermark: &str) -> MetaResult<()> {
        self.inner.set_journal_watermark(watermark).await
    }
}

// ---- replay ----

/// What a replay did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplayStats {
    /// Blobs at verified keys applied.
    pub verified_blobs: u64,
    /// Journal records applied, by operation.
    pub records: BTreeMap<&'static str, u64>,
    /// Records, or parts of records (a manifest PUT's tag, blobs of a GC batch), not applied
    /// by a catch-up on a store shared by nodes: a newer write of their items was committed
    /// since (the store has its state, the bucket its record).
    pub superseded: u64,
    /// Time of the newest record replayed (the next watermark).
    pub newest: Option<String>,
}

impl ReplayStats {
    pub fn total_records(&self) -> u64 {
        self.records.values().sum()
    }
}

impl std::fmt::Display for ReplayStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} verified blobs, {} journal records",
            self.verified_blobs,
            self.total_records()
        )?;
        if !self.records.is_empty() {
            let parts: Vec<String> = self
                .records
                .iter()
                .map(|(op, n)| format!("{op} {n}"))
                .collect();
            write!(f, " ({})", parts.join(", "))?;
        }
        if self.superseded > 0 {
            write!(
                f,
                ", {} superseded by newer writes of other nodes",
                self.superseded
            )?;
        }
        Ok(())
    }
}

/// Progress of a long replay, for the operator.
pub trait Progress: Send + Sync {
    fn report(&self, line: &str);
}

/// Progress lines into the log.
pub struct LogProgress;

impl Progress for LogProgress {
    fn report(&self, line: &str) {
        log::info!("{line}");
    }
}

/// Replays journal records and verified blobs into a store through its trait.
pub struct Replayer<'a> {
    pub store: &'a ObjectStore,
    pub meta: &'a dyn MetaStore,
    /// GetObject requests in flight.
    pub concurrency: usize,
    pub progress: &'a dyn Progress,
}

/// Links whose key is gone from the bucket (the loser of a race on a new digest, whose copy
/// was deleted): the link is applied at the end, to whatever key the index then has.
#[derive(Default)]
struct DeferredLinks {
    links: HashSet<(String, String)>,
}

impl Replayer<'_> {
    /// The store is fresh: applies every verified blob, then the whole journal.
    pub async fn rebuild(&self) -> MetaResult<ReplayStats> {
        let started = Instant::now();
        let mut stats = ReplayStats::default();
        let blobs_prefix = self.store.key("blobs/");
        let all_blobs = self.list_all(&blobs_prefix, None).await?;
        let existing: HashSet<&str> = all_blobs.iter().map(|o| o.key.as_str()).collect();
        self.progress.report(&format!(
            "rebuild: {} blob objects in the bucket",
            all_blobs.len()
        ));
        let verified_prefix = self.store.key(VERIFIED_BLOBS);
        for o in &all_blobs {
            let Some(rest) = o.key.strip_prefix(&verified_prefix) else {
                continue;
            };
            let Some((hex, repo)) = rest.split_once('/') else {
                continue;
            };
            let d = digest(&format!("sha256:{hex}"))?;
            let record = BlobRecord {
                key: o.key.clone(),
                size: o.size,
            };
            self.meta
                .finish_upload(NO_SESSION, repo, &d, record)
                .await?;
            stats.verified_blobs += 1;
        }
        self.progress.report(&format!(
            "rebuild: {} verified blobs applied in {:.1?}",
            stats.verified_blobs,
            started.elapsed()
        ));
        self.replay_journal(None, Some(&existing), false, &mut stats)
            .await?;
        self.progress.report(&format!(
            "rebuild: done in {:.1?}: {stats}",
            started.elapsed()
        ));
        Ok(stats)
    }

    /// Replays the records from `watermark` (less [`CATCH_UP_MARGIN`]) on; everything when
    /// None. On a store shared by nodes ([`MetaStore::journal_stripes`]) each record is
    /// replayed under its items' order stripes, and what a newer write of the same items has
    /// committed since is not replayed over it: other nodes serve while this one catches up.
    pub async fn catch_up(&self, watermark: Option<&str>) -> MetaResult<ReplayStats> {
        let from = watermark.and_then(parse_time).map(|t| {
            self.store
                .key(&format!("{JOURNAL}{}", format_time(t - CATCH_UP_MARGIN)))
        });
        let mut stats = ReplayStats::default();
        self.replay_journal(from.as_deref(), None, true, &mut stats)
            .await?;
        Ok(stats)
    }

    async fn list_all(
        &self,
        prefix: &str,
        start_after: Option<&str>,
    ) -> MetaResult<Vec<crate::storage::ObjectInfo>> {
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let page = self
                .store
                .list_objects_after(prefix, start_after, token.as_deref())
                .await
                .map_err(storage)?;
            out.extend(page.objects);
            match page.next {
                Some(t) => token = Some(t),
                None => return Ok(out),
            }
        }
    }

    /// Applies the journal records after `start_after`, in key order. `blob_keys` (rebuild
    /// only): the blob objects that exist, to defer links to deleted copies. `ordered`
    /// (catch-up): each record under its order stripes, less what newer writes superseded.
    async fn replay_journal(
        &self,
        start_after: Option<&str>,
        blob_keys: Option<&HashSet<&str>>,
        ordered: bool,
        stats: &mut ReplayStats,
    ) -> MetaResult<()> {
        let started = Instant::now();
        let prefix = self.store.key(JOURNAL);
        let keys = self.list_all(&prefix, start_after).await?;
        if keys.is_empty() {
            return Ok(());
        }
        self.progress.report(&format!(
            "journal: {} records to replay{}",
            keys.len(),
            start_after.map_or(String::new(), |s| format!(" after {s}"))
        ));
        let store = self.store;
        let mut bodies = futures_util::stream::iter(keys.iter().map(|o| async move {
            store
                .get_object(&o.key)
                .await
                .map(|b| (o.key.as_str(), b))
                .map_err(storage)
        }))
        .buffered(self.concurrency.max(1));
        let mut deferred = DeferredLinks::default();
        let mut last_report = Instant::now();
        let mut done = 0usize;
        while let Some((key, body)) = bodies.try_next().await? {
            let (op, payload) =
                Op::decode(&body).map_err(|e| failed(format!("record {key}: {e}")))?;
            let time = key_time(store.prefix(), key);
            let record_ms = time.and_then(parse_time).map(unix_ms);
            let held = match record_ms {
                Some(ms) if ordered => self
                    .meta
                    .journal_stripes(&order_stripes(&op.items()))
                    .await?
                    .map(|h| (h, ms)),
                _ => None,
            };
            let applied = async {
                let (op, superseded) = match &held {
                    Some((h, ms)) => self.unsuperseded(op, h, *ms).await?,
                    None => (Some(op), false),
                };
                let name = match op {
                    Some(op) => Some(self.apply(op, payload, blob_keys, &mut deferred).await?),
                    None => None,
                };
                MetaResult::Ok((name, superseded))
            }
            .await;
            if let Some((h, _)) = held {
                h.guard.release().await;
            }
            let (name, superseded) = applied?;
            if let Some(name) = name {
                *stats.records.entry(name).or_insert(0) += 1;
            }
            stats.superseded += u64::from(superseded);
            // Superseded or not, the record is in the bucket: stripes move past it below.
            if let Some(t) = time {
                stats.newest = Some(t.to_owned());
            }
            done += 1;
            if last_report.elapsed() >= Duration::from_secs(1) {
                last_report = Instant::now();
                let rate = done as f64 / started.elapsed().as_secs_f64();
                self.progress.report(&format!(
                    "journal: {done}/{} records applied ({rate:.0}/s)",
                    keys.len()
                ));
            }
        }
        for (repo, d) in deferred.links {
            // False when no record with an existing key ever came: nothing to link.
            self.meta.link_blob(&repo, &digest(&d)?).await?;
        }
        if let Some(newest) = stats.newest.as_deref().and_then(parse_time) {
            self.order_after(newest).await?;
        }
        Ok(())
    }

    /// On a store that orders records across nodes: every stripe's next record comes after
    /// `newest` (a rebuilt database starts with no order, and this node's clock may be behind
    /// the times of the records replayed). In chunks, each held only for its one update.
    async fn order_after(&self, newest: SystemTime) -> MetaResult<()> {
        let ms = unix_ms(newest);
        let all: Vec<u32> = (0..ORDER_STRIPES).collect();
        for chunk in all.chunks(64) {
            match self.meta.journal_order(chunk, ms).await? {
                Some(guard) => guard.release().await,
                None => return Ok(()),
            }
        }
        Ok(())
    }

    /// What of `op`, written at `record_ms`, a catch-up still applies while `held` holds its
    /// stripes, and whether any of it was left out: a part is left out when a stripe of its
    /// items has a later record (a newer write of those items, or of others on the same
    /// stripe, has committed; the store has that state and the bucket says it after this
    /// record). Nothing moves under the held stripes meanwhile.
    async fn unsuperseded(
        &self,
        op: Op,
        held: &HeldStripes,
        record_ms: u64,
    ) -> MetaResult<(Option<Op>, bool)> {
        let newer = |item: Item<'_>| {
            held.last_ms
                .get(&order_stripe(&item))
                .is_some_and(|&ms| ms > record_ms)
        };
        let kept = |op: Op| Ok((Some(op), false));
        match op {
            Op::PutManifest {
                repo,
                digest: d,
                media_type,
                subject,
                tag,
                referrer,
            } => {
                let manifest_newer = newer(manifest_item(&repo, &d));
                let tag_newer = tag.as_deref().is_some_and(|t| newer(tag_item(&repo, t)));
                let keep_tag = match (manifest_newer, tag_newer) {
                    (false, false) => {
                        return kept(Op::PutManifest {
                            repo,
                            digest: d,
                            media_type,
                            subject,
                            tag,
                            referrer,
                        })
                    }
                    (false, true) => false,
                    (true, true) => return Ok((None, true)),
                    // The tag is as this record left it (or as before it): it moves to the
                    // manifest if the manifest is there (put again since: the same bytes),
                    // not if it was deleted since.
                    (true, false) => {
                        if tag.is_none() || self.meta.manifest(&repo, &digest(&d)?).await?.is_none()
                        {
                            return Ok((None, true));
                        }
                        true
                    }
                };
                let op = Op::PutManifest {
                    repo,
                    digest: d,
                    media_type,
                    subject,
                    tag: if keep_tag { tag } else { None },
                    referrer,
                };
                Ok((Some(op), !keep_tag))
            }
            Op::CollectedBlobs { blobs } => {
                let n = blobs.len();
                let blobs: Vec<CollectedBlob> = blobs
                    .into_iter()
                    .filter(|b| !newer(blob_item(&b.digest)))
                    .collect();
                let superseded = blobs.len() < n;
                Ok((
                    (!blobs.is_empty()).then_some(Op::CollectedBlobs { blobs }),
                    superseded,
                ))
            }
            Op::Adopt { repo, blobs } => {
                let n = blobs.len();
                let blobs: Vec<AdoptedBlob> = blobs
                    .into_iter()
                    .filter(|b| !newer(blob_item(&b.digest)))
                    .collect();
                let superseded = blobs.len() < n;
                Ok((
                    (!blobs.is_empty()).then_some(Op::Adopt { repo, blobs }),
                    superseded,
                ))
            }
            // One item each.
            op => {
                if op.items().into_iter().any(newer) {
                    Ok((None, true))
                } else {
                    kept(op)
                }
            }
        }
    }

    async fn apply_collected(
        &self,
        c: CollectedBlob,
        deferred: &mut DeferredLinks,
    ) -> MetaResult<()> {
        let d = digest(&c.digest)?;
        for repo in &c.unlinked {
            deferred.links.remove(&(repo.clone(), c.digest.clone()));
            self.meta.unlink_blob(repo, &d).await?;
        }
        if c.deleted {
            // Nothing references it at this point of the history: collect it as then.
            let candidate = Candidate::Blob(d.clone());
            self.meta
                .gc_enqueue(std::slice::from_ref(&candidate), 0)
                .await?;
            self.meta.collect_blob(&d, u64::MAX).await?;
        }
        Ok(())
    }

    async fn apply(
        &self,
        op: Op,
        payload: Bytes,
        blob_keys: Option<&HashSet<&str>>,
        deferred: &mut DeferredLinks,
    ) -> MetaResult<&'static str> {
        Ok(match op {
            Op::PutManifest {
                repo,
                digest: d,
                media_type,
                subject,
                tag,
                referrer,
            } => {
                let d = digest(&d)?;
                let subject = subject.as_deref().map(digest).transpose()?;
                let referrer = match (&subject, referrer) {
                    (Some(s), Some(desc)) => Some(Referrer {
                        subject: s.clone(),
                        descriptor: Bytes::from(desc),
                    }),
                    _ => None,
                };
                let record = ManifestRecord {
                    references: crate::registry::manifest::references(&media_type, &payload),
                    media_type,
                    body: payload,
                    subject,
                };
                match self
                    .meta
                    .put_manifest(&repo, &d, record, tag.as_deref(), referrer)
                    .await?
                {
                    ManifestPut::Stored => "put_manifest",
                    // The push lost to a collection when it happened, and loses again.
                    ManifestPut::MissingReference(_) => "put_manifest_lost",
                }
            }
            Op::DeleteManifest { repo, digest: d } => {
                self.meta.delete_manifest(&repo, &digest(&d)?).await?;
                "delete_manifest"
            }
            Op::DeleteTag { repo, tag } => {
                self.meta.delete_tag(&repo, &tag).await?;
                "delete_tag"
            }
            Op::Link {
                repo,
                digest: d,
                key,
                size,
            } => {
                if blob_keys.is_some_and(|k| !k.contains(key.as_str())) {
                    deferred.links.insert((repo, d));
                } else {
                    deferred.links.remove(&(repo.clone(), d.clone()));
                    let record = BlobRecord { key, size };
                    self.meta
                        .finish_upload(NO_SESSION, &repo, &digest(&d)?, record)
                        .await?;
                }
                "link"
            }
            Op::Unlink { repo, digest: d } => {
                deferred.links.remove(&(repo.clone(), d.clone()));
                self.meta.unlink_blob(&repo, &digest(&d)?).await?;
                "unlink"
            }
            Op::Collected {
                digest,
                unlinked,
                deleted,
            } => {
                let c = CollectedBlob {
                    digest,
                    unlinked,
                    deleted,
                };
                self.apply_collected(c, deferred).await?;
                "collected"
            }
            Op::CollectedBlobs { blobs } => {
                for c in blobs {
                    self.apply_collected(c, deferred).await?;
                }
                "collected"
            }
            // Adopted objects lie outside berth's blob prefix: applied as recorded.
            Op::Adopt { repo, blobs } => {
                let blobs = blobs
                    .into_iter()
                    .map(|b| {
                        Ok((
                            digest(&b.digest)?,
                            BlobRecord {
                                key: b.key,
                                size: b.size,
                            },
                        ))
                    })
                    .collect::<MetaResult<Vec<_>>>()?;
                self.meta.adopt_blobs(&repo, &blobs).await?;
                "adopt"
            }
        })
    }
}

fn storage(e: StorageError) -> MetaError {
    match e {
        StorageError::Unreachable { .. } | StorageError::Unavailable { .. } => {
            MetaError::Unavailable(format!("journal: {e}"))
        }
        e => failed(e),
    }
}

/// Whether the bucket holds any record (a journal record or a verified blob): one or two
/// ListObjectsV2 requests.
pub async fn bucket_has_records(store: &ObjectStore) -> MetaResult<bool> {
    for rel in [JOURNAL, VERIFIED_BLOBS] {
        let page = store
            .list_objects(&store.key(rel), None)
            .await
            .map_err(storage)?;
        if !page.objects.is_empty() {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Whether `meta` is a fresh store: no watermark and no repository.
pub async fn is_fresh(meta: &dyn MetaStore) -> MetaResult<bool> {
    Ok(meta.journal_watermark().await?.is_none() && meta.repositories(None, 1).await?.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_round_trip_keeps_the_body_byte_exact() {
        let op = Op::PutManifest {
            repo: "a/b".into(),
            digest: format!("sha256:{}", "a".repeat(64)),
            media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            subject: None,
            tag: Some("v1".into()),
            referrer: None,
        };
        let body = b"{\n  \"schemaVersion\": 2\n}\n\n";
        let encoded = op.encode(body);
        let (back, payload) = Op::decode(&encoded).unwrap();
        assert_eq!(back, op);
        assert_eq!(&payload[..], &body[..]);
        assert_eq!(
            op.describe(),
            format!("manifest/a/b:v1@sha256:{}", "a".repeat(64))
        );
    }

    #[test]
    fn order_stripes_are_stable() {
        // Every node, whatever its build, maps an item to the same stripe: these values are
        // part of the format (the database orders records by them).
        assert_ne!(
            order_stripe(&("tag", "a/b", "v1")),
            order_stripe(&("tag", "a/bv", "1"))
        );
        assert_eq!(order_stripe(&("tag", "a/b", "v1")), 538);
        let blob = format!("sha256:{}", "a".repeat(64));
        assert_eq!(order_stripe(&("blob", &blob, "")), 929);
    }

    #[test]
    fn a_record_names_the_items_its_write_held() {
        let d = format!("sha256:{}", "a".repeat(64));
        let put = |tag: Option<&str>| Op::PutManifest {
            repo: "r".into(),
            digest: d.clone(),
            media_type: "m".into(),
            subject: None,
            tag: tag.map(str::to_owned),
            referrer: None,
        };
        assert_eq!(
            put(Some("t")).items(),
            vec![("manifest", "r", d.as_str()), ("tag", "r", "t")]
        );
        assert_eq!(put(None).items(), vec![("manifest", "r", d.as_str())]);
        let unlink = Op::Unlink {
            repo: "r".into(),
            digest: d.clone(),
        };
        assert_eq!(unlink.items(), vec![("blob", d.as_str(), "")]);
        let tag = Op::DeleteTag {
            repo: "r".into(),
            tag: "t".into(),
        };
        assert_eq!(tag.items(), vec![("tag", "r", "t")]);
    }

    struct NoGuard;

    #[async_trait]
    impl OrderGuard for NoGuard {
        fn time_ms(&self) -> u64 {
            0
        }
        async fn release(self: Box<Self>) {}
    }

    /// Stripes at `ms` of these items, the rest never written.
    fn held(items: &[Item<'_>], ms: u64) -> HeldStripes {
        HeldStripes {
            guard: Box::new(NoGuard),
            last_ms: order_stripes(items).into_iter().map(|s| (s, ms)).collect(),
        }
    }

    #[tokio::test]
    async fn a_catch_up_leaves_out_what_newer_writes_superseded() {
        let dir = tempfile::tempdir().unwrap();
        let meta = super::super::redb::RedbStore::open(&dir.path().join("meta.redb")).unwrap();
        let store = ObjectStore::new(&crate::config::StorageConfig {
            endpoint: Some("http://127.0.0.1:9".into()),
            region: "us-east-1".into(),
            bucket: "b".into(),
            prefix: "berth/".into(),
            access_key: "k".into(),
            secret_key: "s".into(),
            path_style: true,
            blob_serving: crate::config::BlobServing::Proxy,
            presign_ttl: Duration::from_secs(900),
            ca_bundle: None,
            coalesce_window: 0,
        })
        .unwrap();
        let replayer = Replayer {
            store: &store,
            meta: &meta,
            concurrency: 1,
            progress: &LogProgress,
        };
        let (repo, there, gone) = (
            "r",
            format!("sha256:{}", "1".repeat(64)),
            format!("sha256:{}", "2".repeat(64)),
        );
        let record = ManifestRecord {
            media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            body: Bytes::from_static(b"{}"),
            references: Vec::new(),
            subject: None,
        };
        meta.put_manifest(repo, &digest(&there).unwrap(), record, None, None)
            .await
            .unwrap();
        let put = |d: &str| Op::PutManifest {
            repo: repo.into(),
            digest: d.to_owned(),
            media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            subject: None,
            tag: Some("t".into()),
            referrer: None,
        };
        let untagged = |d: &str| match put(d) {
            Op::PutManifest {
                repo,
                digest,
                media_type,
                subject,
                referrer,
                ..
            } => Op::PutManifest {
                repo,
                digest,
                media_type,
                subject,
                tag: None,
                referrer,
            },
            _ => unreachable!(),
        };
        let replayer = &replayer;
        let keep = |op: &Op, h: HeldStripes, ms: u64| {
            let op = op.clone();
            async move { replayer.unsuperseded(op, &h, ms).await.unwrap() }
        };
        let tag = [tag_item(repo, "t")];
        let m_there = [manifest_item(repo, &there)];
        let m_gone = [manifest_item(repo, &gone)];
        let op = put(&there);
        // Nothing newer: all of it; the record's own time is not newer.
        assert_eq!(keep(&op, held(&[], 0), 10).await, (Some(op.clone()), false));
        assert_eq!(
            keep(&op, held(&tag, 10), 10).await,
            (Some(op.clone()), false)
        );
        // The tag moved since: the manifest only.
        assert_eq!(
            keep(&op, held(&tag, 11), 10).await,
            (Some(untagged(&there)), true)
        );
        // The manifest was written since: the tag moves to it if it is there, not if it went.
        assert_eq!(keep(&op, held(&m_there, 11), 10).await, (Some(op), false));
        assert_eq!(keep(&put(&gone), held(&m_gone, 11), 10).await, (None, true));
        // A GC batch: the blobs written since are left out.
        let (b1, b2) = (there.clone(), gone.clone());
        let collected = |ds: &[&String]| Op::CollectedBlobs {
            blobs: ds
                .iter()
                .map(|d| CollectedBlob {
                    digest: (*d).clone(),
                    unlinked: vec![repo.into()],
                    deleted: true,
                })
                .collect(),
        };
        let batch = collected(&[&b1, &b2]);
        assert_eq!(
            keep(&batch, held(&[blob_item(&b2)], 11), 10).await,
            (Some(collected(&[&b1])), true)
        );
        let both = [blob_item(&b1), blob_item(&b2)];
        assert_eq!(keep(&batch, held(&both, 11), 10).await, (None, true));
        let delete = Op::DeleteTag {
            repo: repo.into(),
            tag: "t".into(),
        };
        assert_eq!(keep(&delete, held(&tag, 11), 10).await, (None, true));
    }

    #[test]
    fn times_sort_as_keys_and_parse_back() {
        let t = UNIX_EPOCH + Duration::from_millis(1_795_000_000_123);
        let s = format_time(t);
        assert_eq!(s.len(), 24, "{s}");
        assert_eq!(parse_time(&s), Some(t));
        let later = format_time(t + Duration::from_millis(1));
        assert!(later > s);
        let key = format!("p/journal/{s}-0000abcd-00000001/link/x@y");
        assert_eq!(key_time("p/", &key), Some(s.as_str()));
        assert_eq!(key_time("q/", &key), None);
    }
}
