//! Garbage collection: online, incremental, through the [`MetaStore`] trait and the
//! [`ObjectStore`] only, so it works on every metadata backend.
//!
//! # What is garbage
//! - A **blob** no manifest of any repository references (config, layers, manifests an index
//!   lists) that has stayed so for `gc.blob_grace` since it was last touched: uploaded,
//!   mounted, unlinked, or freed by a manifest delete. A repository's **link** to a blob that
//!   none of that repository's manifests references goes after the same grace.
//! - With `gc.untagged_manifests: delete`, a **manifest** no tag points at, that no index of its
//!   repository lists and whose subject (if any) is not a manifest of the repository, untagged
//!   for `gc.untagged_grace`. Deleting it may free its blobs (after their own grace).
//! - **Tags** a retention rule (`gc.retention`) says go ([`policy`]).
//! - With `--orphans`: **objects** under the bucket prefix with no blob record and no upload
//!   session, older than `gc.blob_grace` (a crash between storing and linking), and
//!   **incomplete multipart uploads** with no session, where the store lists them ([`orphans`]).
//! - A **repository** with no manifest and no blob link leaves the catalog.
//!
//! # Why it is race-free
//! The store keeps a reference index and a queue of candidates in the same transactions as
//! the registry's writes (a delete or untag queues what it may have freed; an upload, mount or
//! unlink touches the blob). The decision and the metadata delete are one transaction
//! ([`MetaStore::collect_blob`], batched by [`MetaStore::collect_blobs`]) that re-checks references and the candidate's time; the object
//! is deleted only after its record is gone. A manifest PUT re-checks its references in its own
//! transaction, so it either commits first (the blob is referenced and stays) or finds the
//! blob gone and fails with MANIFEST_BLOB_UNKNOWN.
//!
//! # Incremental
//! A pass reads only due candidates from the queue: it costs what changed. `--full` also walks
//! every blob (and, with untagged deletion, every manifest) and queues strays the queue does not
//! hold (from before the index existed, or after a restore); they are collected one grace later.

pub mod command;
pub mod orphans;
pub mod policy;

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

use crate::config::{GcConfig, UntaggedManifests};
use crate::meta::{Candidate, CandidateKind, MetaError, MetaStore};
use crate::metrics::GC;
use crate::registry::names::Digest;
use crate::registry::unix_now;
use crate::storage::{ObjectStore, StorageError};

/// Candidates read from the queue at a time.
const BATCH: usize = 500;
/// Blobs collected in one metadata transaction: one commit and one journal record for all,
/// while journaled writes of the same blobs' stripes wait that long.
const COLLECT_BATCH: usize = 100;
/// Object deletes in flight at once after a batch.
const PARALLEL_DELETES: usize = 16;
/// While the registry is busy a pass rests this many times as long as each batch took: it
/// keeps to a quarter of a core, which pushes on a 2-core machine do not notice (bench/).
const REST_FACTOR: u32 = 3;
/// The longest rest after one batch while the registry is busy.
const MAX_REST: std::time::Duration = std::time::Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum GcError {
    #[error("{0}")]
    Meta(#[from] MetaError),
    #[error("{0}")]
    Storage(#[from] StorageError),
}

/// What to do in a pass.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GcOptions {
    /// Decide and report, change nothing.
    pub dry_run: bool,
    /// Also walk everything and queue strays the queue does not hold.
    pub full: bool,
    /// Also scan the bucket prefix for orphan objects and multipart uploads.
    pub orphans: bool,
}

/// A count and the bytes it stands for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tally {
    pub count: u64,
    pub bytes: u64,
}

impl Tally {
    fn add(&mut self, bytes: u64) {
        self.count += 1;
        self.bytes += bytes;
    }
}

/// What a pass deleted (or, in a dry run, would delete), by kind.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GcReport {
    pub dry_run: bool,
    /// Tags removed by retention rules.
    pub tags: u64,
    /// Manifests (bytes: their bodies).
    pub manifests: Tally,
    /// Blob records whose objects were deleted (bytes: blob sizes).
    pub blobs: Tally,
    /// Repository links to blobs that stayed referenced elsewhere.
    pub links: u64,
    /// Orphan objects.
    pub objects: Tally,
    /// Incomplete multipart uploads aborted.
    pub multipart_uploads: u64,
    /// Repositories that left the catalog.
    pub repositories: u64,
    /// Strays queued by a full pass (collected one grace later).
    pub queued: u64,
    /// Candidates still queued after the pass.
    pub queue_length: u64,
    pub seconds: f64,
    /// Things the pass could not do (e.g. the store cannot list multipart uploads).
    pub notes: Vec<String>,
}

impl GcReport {
    /// The report as printed by `berth gc`.
    pub fn render(&self) -> String {
        let verb = if self.dry_run {
            "would delete"
        } else {
            "deleted"
        };
        let mut s = format!(
            "berth gc{}: {:.2}s\n",
            if self.dry_run { " (dry run)" } else { "" },
            self.seconds
        );
        let rows: [(&str, u64, Option<u64>); 8] = [
            ("tags", self.tags, None),
            (
                "manifests",
                self.manifests.count,
                Some(self.manifests.bytes),
            ),
            ("blobs", self.blobs.count, Some(self.blobs.bytes)),
            ("repository links", self.links, None),
            (
                "orphan objects",
                self.objects.count,
                Some(self.objects.bytes),
            ),
            ("multipart uploads", self.multipart_uploads, None),
            ("repositories", self.repositories, None),
            ("queued strays", self.queued, None),
        ];
        for (kind, n, bytes) in rows {
            let kind_verb = if kind == "queued strays" {
                "queued"
            } else {
                verb
            };
            match bytes {
                Some(b) => s.push_str(&format!(
                    "{kind_verb:>12} {kind:<18} {n:>8} {b:>14} bytes\n"
                )),
                None => s.push_str(&format!("{kind_verb:>12} {kind:<18} {n:>8}\n")),
            }
        }
        s.push_str(&format!(
            "{:>12} {:<18} {:>8}\n",
            "still", "queued", self.queue_length
        ));
        for n in &self.notes {
            s.push_str(&format!("note: {n}\n"));
        }
        s
    }
}

/// Whether the registry is answering clients right now ([`Collector::yielding_to`]).
pub type Busy = Arc<dyn Fn() -> bool + Send + Sync>;

/// Runs passes, one at a time per process.
pub struct Collector {
    meta: Arc<dyn MetaStore>,
    store: Arc<ObjectStore>,
    config: GcConfig,
    running: tokio::sync::Mutex<()>,
    busy: Option<Busy>,
}

impl Collector {
    pub fn new(meta: Arc<dyn MetaStore>, store: Arc<ObjectStore>, config: GcConfig) -> Self {
        Collector {
            meta,
            store,
            config,
            running: tokio::sync::Mutex::new(()),
            busy: None,
        }
    }

    /// A pass inside `berth serve` yields to traffic: while `busy` says requests are being
    /// answered, it rests after each batch [`REST_FACTOR`] times as long as the batch took,
    /// so pushes keep their throughput during collection.
    pub fn yielding_to(mut self, busy: Busy) -> Self {
        self.busy = Some(busy);
        self
    }

    /// Called after a batch of work that started at `worked`.
    async fn rest(&self, worked: Instant) {
        if self.busy.as_ref().is_some_and(|busy| busy()) {
            tokio::time::sleep((worked.elapsed() * REST_FACTOR).min(MAX_REST)).await;
        }
    }

    pub fn config(&self) -> &GcConfig {
        &self.config
    }

    /// One pass: retention, (full: queue strays), untagged manifests, blobs, (orphans).
    pub async fn run(&self, opts: GcOptions) -> Result<GcReport, GcError> {
        let _one_at_a_time = self.running.lock().await;
        let started = Instant::now();
        let mut report = GcReport {
            dry_run: opts.dry_run,
            ..GcReport::default()
        };
        let result = self.pass(opts, &mut report).await;
        report.seconds = started.elapsed().as_secs_f64();
        if let Ok(n) = self.meta.gc_queue_len().await {
            report.queue_length = n;
            GC.queue_length.set(n as i64);
        }
        if !opts.dry_run {
            GC.runs.inc();
            GC.duration.observe(report.seconds);
        }
        result?;
        log::info!(
            "gc{}: {} tags, {} manifests, {} blobs ({} bytes), {} links, {} objects ({} bytes), \
             {} multipart uploads, {} repositories in {:.2}s",
            if opts.dry_run { " (dry run)" } else { "" },
            report.tags,
            report.manifests.count,
            report.blobs.count,
            report.blobs.bytes,
            report.links,
            report.objects.count,
            report.objects.bytes,
            report.multipart_uploads,
            report.repositories,
            report.seconds
        );
        Ok(report)
    }

    async fn pass(&self, opts: GcOptions, report: &mut GcReport) -> Result<(), GcError> {
        let now = unix_now();
        policy::apply(
            &*self.meta,
            &self.config.retention,
            now,
            opts.dry_run,
            report,
        )
        .await?;
        if opts.full {
            self.queue_strays(now, opts.dry_run, report).await?;
        }
        self.collect_manifests(now, opts.dry_run, report).await?;
        self.collect_blobs(now, opts.dry_run, report).await?;
        if opts.orphans {
            let grace = self.config.blob_grace;
            orphans::scan(&*self.meta, &self.store, grace, opts.dry_run, report).await?;
        }
        Ok(())
    }

    /// Full pass: every unreferenced blob (and, with untagged deletion, every manifest) that the
    /// queue does not hold is queued now.
    async fn queue_strays(
        &self,
        now: u64,
        dry_run: bool,
        report: &mut GcReport,
    ) -> Result<(), GcError> {
        let mut after = None;
        loop {
            let worked = Instant::now();
            let page = self.meta.blobs(after.as_ref(), BATCH).await?;
            let Some((last, _)) = page.last() else { break };
            after = Some(last.clone());
            let digests: Vec<Digest> = page.into_iter().map(|(digest, _)| digest).collect();
            let strays: Vec<Candidate> = self
                .meta
                .unreferenced(&digests)
                .await?
                .into_iter()
                .map(Candidate::Blob)
                .collect();
            // A dry run cannot tell which strays the queue holds already: it counts them all.
            report.queued += if dry_run {
                strays.len() as u64
            } else {
                self.meta.gc_enqueue(&strays, now).await?
            };
            self.rest(worked).await;
        }
        if self.config.untagged_manifests == UntaggedManifests::Keep {
            return Ok(());
        }
        let mut last_repo: Option<String> = None;
        loop {
            let repos = self.meta.repositories(last_repo.as_deref(), BATCH).await?;
            let Some(last) = repos.last() else { break };
            last_repo = Some(last.clone());
            for repo in &repos {
                let mut after = None;
                loop {
                    let page = self
                        .meta
                        .repo_manifests(repo, after.as_ref(), BATCH)
                        .await?;
                    let Some(last) = page.last() else { break };
                    after = Some(last.clone());
                    // Tagged ones are dequeued again when looked at.
                    let candidates: Vec<Candidate> = page
                        .into_iter()
                        .map(|digest| Candidate::Manifest {
                            repo: repo.clone(),
                            digest,
                        })
                        .collect();
                    if !dry_run {
                        self.meta.gc_enqueue(&candidates, now).await?;
                    }
                }
            }
        }
        Ok(())
    }

    async fn collect_manifests(
        &self,
        now: u64,
        dry_run: bool,
        report: &mut GcReport,
    ) -> Result<(), GcError> {
        let kind = CandidateKind::Manifest;
        if self.config.untagged_manifests == UntaggedManifests::Keep {
            // The store queues them whatever the setting: let them go.
            if !dry_run {
                loop {
                    let due = self.meta.gc_candidates(kind, u64::MAX, BATCH).await?;
                    if due.is_empty() {
                        break;
                    }
                    let due: Vec<Candidate> = due.into_iter().map(|q| q.candidate).collect();
                    self.meta.gc_dequeue(&due).await?;
                }
            }
            return Ok(());
        }
        let cutoff = due_cutoff(now, self.config.untagged_grace);
        if dry_run {
            return policy::preview_untagged(&*self.meta, cutoff, report).await;
        }
        loop {
            let due = self.meta.gc_candidates(kind, cutoff, BATCH).await?;
            if due.is_empty() {
                break;
            }
            for q in due {
                let Candidate::Manifest { repo, digest } = &q.candidate else {
                    continue;
                };
                if let Some(record) = self.meta.collect_manifest(repo, digest, cutoff).await? {
                    log::info!(
                        "gc: deleted manifest {repo}@{digest} ({} bytes): untagged",
                        record.body.len()
                    );
                    report.manifests.add(record.body.len() as u64);
                    GC.manifests_deleted.inc();
                    if !self.meta.repository_exists(repo).await? {
                        report.repositories += 1;
                    }
                }
            }
        }
        Ok(())
    }

    async fn collect_blobs(
        &self,
        now: u64,
        dry_run: bool,
        report: &mut GcReport,
    ) -> Result<(), GcError> {
        let cutoff = due_cutoff(now, self.config.blob_grace);
        let kind = CandidateKind::Blob;
        if dry_run {
            // Only reads: the due candidates no manifest references.
            let mut seen = 0;
            loop {
                let due = self.meta.gc_candidates(kind, cutoff, seen + BATCH).await?;
                let fresh = &due[seen.min(due.len())..];
                if fresh.is_empty() {
                    break;
                }
                seen = due.len();
                for q in fresh {
                    let Candidate::Blob(digest) = &q.candidate else {
                        continue;
                    };
                    if self.meta.is_referenced(digest).await? {
                        continue;
                    }
                    if let Some(record) = self.meta.blob(digest).await? {
                        log::info!(
                            "gc (dry run): would delete blob {digest} {} ({} bytes): unreferenced",
                            record.key,
                            record.size
                        );
                        report.blobs.add(record.size);
                    }
                }
            }
            return Ok(());
        }
        loop {
            let due = self.meta.gc_candidates(kind, cutoff, BATCH).await?;
            if due.is_empty() {
                break;
            }
            let digests: Vec<Digest> = due
                .into_iter()
                .filter_map(|q| match q.candidate {
                    Candidate::Blob(digest) => Some(digest),
                    Candidate::Manifest { .. } => None,
                })
                .collect();
            for batch in digests.chunks(COLLECT_BATCH) {
                let worked = Instant::now();
                self.collect_blob_batch(batch, cutoff, report).await?;
                self.rest(worked).await;
            }
        }
        Ok(())
    }

    /// One metadata transaction (and one journal record) for the batch, then the objects of
    /// the blobs whose records went, deleted a few at a time.
    async fn collect_blob_batch(
        &self,
        digests: &[Digest],
        cutoff: u64,
        report: &mut GcReport,
    ) -> Result<(), GcError> {
        let done = self.meta.collect_blobs(digests, cutoff).await?;
        let mut deleted = Vec::new();
        for (digest, done) in digests.iter().zip(done) {
            report.repositories += done.pruned.len() as u64;
            for repo in &done.pruned {
                log::info!("gc: repository {repo} left the catalog: nothing left in it");
            }
            match done.deleted {
                Some(record) => deleted.push((digest.clone(), record)),
                None => {
                    report.links += done.unlinked.len() as u64;
                    for repo in &done.unlinked {
                        log::info!("gc: unlinked {digest} from {repo}: no manifest there uses it");
                    }
                }
            }
        }
        // The records are gone: nothing can reach these bytes any more.
        let store = self.store.clone();
        let mut deletes = futures_util::stream::iter(deleted)
            .map(move |(digest, record)| {
                let store = store.clone();
                async move {
                    let result = store.delete_object(&record.key).await;
                    (digest, record, result)
                }
            })
            .buffer_unordered(PARALLEL_DELETES);
        while let Some((digest, record, result)) = deletes.next().await {
            match result {
                Ok(()) => {
                    log::info!(
                        "gc: deleted blob {digest} {} ({} bytes): unreferenced",
                        record.key,
                        record.size
                    );
                    report.blobs.add(record.size);
                    GC.blobs_deleted.inc();
                    GC.bytes_freed.inc_by(record.size);
                }
                // Left as an orphan object; `--orphans` removes it later.
                Err(e) => log::warn!(
                    "gc: blob {digest} record removed, object {} not deleted: {e}",
                    record.key
                ),
            }
        }
        Ok(())
    }
}

/// The newest queue time that is due at `now` after `grace`. Queue times are whole seconds,
/// floored: a candidate stamped `q` was queued in `[q, q + 1)`, so only `q + grace < now`
/// guarantees that a whole `grace` has passed (`q + grace == now` may be a fraction of a second).
/// A zero grace promises no wait: everything queued so far is due.
fn due_cutoff(now: u64, grace: Duration) -> u64 {
    match grace.as_secs() {
        0 => now,
        secs => now.saturating_sub(secs).saturating_sub(1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn due_cutoff_never_shortens_the_grace() {
        // Queued at 10.9 (stamped 10), a 1 s grace: not due at 11.0 (stamp 11), due at 12.
        let grace = Duration::from_secs(1);
        assert!(10 > due_cutoff(11, grace));
        assert!(10 <= due_cutoff(12, grace));
        // No grace: due at once.
        assert!(11 <= due_cutoff(11, Duration::ZERO));
    }
}
