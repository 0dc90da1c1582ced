//! `berth import`: adopts a CNCF distribution registry's storage where it lies.
//!
//! berth records metadata whose blob keys are distribution's own `data` objects: in the bucket
//! berth uses ([`source::BucketSource`]: nothing is written to the bucket), or hard-linked
//! from distribution's filesystem root into the embedded store ([`source::DirSource`]). No
//! blob byte is read; only listings, link files and manifests are.
//!
//! Safe while distribution serves: the layout is only read, repositories are listed before
//! blobs (distribution writes a blob's data before linking it, so every link listed has its
//! data in the blob listing unless it was deleted since), and a manifest is recorded only once
//! every blob it names is linked. Idempotent and incremental: what berth already has is
//! skipped by metadata reads alone, so a re-run adds only what distribution took since (the
//! final catch-up before a cut-over). Metadata is written through the [`MetaStore`] seam only:
//! blobs with [`MetaStore::adopt_blobs`], manifests and tags through the same
//! [`Registry::put_manifest`] a push uses (same validation, referrers index, and whatever the
//! store records for a manifest).

pub mod command;
pub mod layout;
pub mod source;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::Path;

use bytes::Bytes;
use futures_util::stream::{self, StreamExt};

use crate::meta::{BlobRecord, Linked};
use crate::registry::names::{Digest, Reference};
use crate::registry::{Registry, RegistryError};
use layout::{blob_data_key, tag_link_key, Layout, V2};
use source::Source;

/// Link files and manifests read at once.
const READ_CONCURRENCY: usize = 16;
/// Blobs adopted per metadata transaction.
const ADOPT_BATCH: usize = 512;

#[derive(Debug, thiserror::Error)]
#[error("import: {0}")]
pub struct ImportError(pub String);

impl ImportError {
    fn io(path: &Path, e: std::io::Error) -> Self {
        ImportError(format!("{}: {e}", path.display()))
    }
}

impl From<crate::storage::StorageError> for ImportError {
    fn from(e: crate::storage::StorageError) -> Self {
        ImportError(e.to_string())
    }
}

impl From<crate::meta::MetaError> for ImportError {
    fn from(e: crate::meta::MetaError) -> Self {
        ImportError(e.to_string())
    }
}

/// What an import did. Counts are of what this run added; "present" counts what berth had.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Summary {
    pub source: String,
    pub repositories: u64,
    pub repositories_new: u64,
    pub tags_added: u64,
    /// Tags berth had pointing at another manifest than distribution's now.
    pub tags_moved: u64,
    pub tags_present: u64,
    pub manifests_added: u64,
    pub manifests_present: u64,
    /// Blob links added to repositories.
    pub blobs_linked: u64,
    /// Of those, blobs new to berth's index, and their bytes (adopted where they lie).
    pub blobs_new: u64,
    pub bytes_adopted: u64,
    pub blobs_present: u64,
    /// Bytes copied because a hard link was impossible (another filesystem); 0 on S3.
    pub bytes_copied: u64,
    /// Layout entries berth could not place (not uploads or tag history).
    pub ignored_keys: u64,
    /// What was left out, and why.
    pub skipped: Vec<String>,
}

impl Summary {
    /// Whether the run added anything.
    pub fn changed(&self) -> bool {
        self.tags_added + self.tags_moved + self.manifests_added + self.blobs_linked > 0
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "imported from {}", self.source)?;
        writeln!(
            f,
            "repositories: {} ({} new)",
            self.repositories, self.repositories_new
        )?;
        writeln!(
            f,
            "tags: {} added, {} moved, {} already present",
            self.tags_added, self.tags_moved, self.tags_present
        )?;
        writeln!(
            f,
            "manifests: {} added, {} already present",
            self.manifests_added, self.manifests_present
        )?;
        writeln!(
            f,
            "blobs: {} links added, {} new blobs ({} bytes adopted in place), {} already present",
            self.blobs_linked, self.blobs_new, self.bytes_adopted, self.blobs_present
        )?;
        writeln!(f, "bytes copied: {}", self.bytes_copied)?;
        if self.ignored_keys > 0 {
            writeln!(
                f,
                "keys not part of distribution's layout, ignored: {}",
                self.ignored_keys
            )?;
        }
        writeln!(f, "skipped: {}", self.skipped.len())?;
        for s in &self.skipped {
            writeln!(f, "  {s}")?;
        }
        Ok(())
    }
}

/// Imports everything `source` holds that berth does not have yet.
pub async fn run(registry: &Registry, source: &dyn Source) -> Result<Summary, ImportError> {
    let mut summary = Summary {
        source: source.describe(),
        ..Summary::default()
    };

    // Repositories first, then the blob data (see the module comment).
    let mut layout = Layout::default();
    for (key, size) in source.list(&format!("{V2}repositories/")).await? {
        layout.add(&key, size);
    }
    for (key, size) in source.list(&format!("{V2}blobs/")).await? {
        layout.add(&key, size);
    }
    summary.ignored_keys = layout.ignored;
    summary.repositories = layout.repositories.len() as u64;

    // What distribution's tags point at now (one small read per tag).
    let tag_jobs: Vec<(String, String)> = layout
        .repositories
        .iter()
        .flat_map(|(repo, r)| r.tags.iter().map(move |t| (repo.clone(), t.clone())))
        .collect();
    let tag_targets: Vec<((String, String), Result<Digest, String>)> = stream::iter(tag_jobs)
        .map(|(repo, tag)| async move {
            let target = match source.read(&tag_link_key(&repo, &tag)).await {
                Ok(link) => parse_link(&link),
                Err(e) => Err(e.to_string()),
            };
            ((repo, tag), target)
        })
        .buffer_unordered(READ_CONCURRENCY)
        .collect()
        .await;
    let mut tags: BTreeMap<String, Vec<(String, Digest)>> = BTreeMap::new();
    for ((repo, tag), target) in tag_targets {
        match target {
            Ok(d) => tags.entry(repo).or_default().push((tag, d)),
            // A tag deleted while we listed, or a damaged link file.
            Err(e) => summary.skipped.push(format!("{repo}:{tag}: {e}")),
        }
    }

    // The manifests berth lacks, read (they are small) from distribution's blob store.
    let mut missing: Vec<(String, Digest)> = Vec::new();
    for (repo, r) in &layout.repositories {
        for digest in &r.revisions {
            if registry.meta.manifest(repo, digest).await?.is_some() {
                summary.manifests_present += 1;
            } else if !layout.blobs.contains_key(digest) {
                summary.skipped.push(format!(
                    "{repo}@{digest}: manifest revision without data in distribution's blob store"
                ));
            } else {
                missing.push((repo.clone(), digest.clone()));
            }
        }
    }
    let read: Vec<((String, Digest), Result<Bytes, String>)> = stream::iter(missing)
        .map(|(repo, digest)| async move {
            let body = source
                .read(&blob_data_key(&digest))
                .await
                .map_err(|e| e.to_string())
                .and_then(|b| {
                    // Never record bytes under a digest they do not have.
                    if Digest::sha256_of(&b) == digest {
                        Ok(b)
                    } else {
                        Err("its data does not match its digest".to_string())
                    }
                });
            ((repo, digest), body)
        })
        .buffer_unordered(READ_CONCURRENCY)
        .collect()
        .await;
    let mut bodies: BTreeMap<String, Vec<(Digest, Bytes)>> = BTreeMap::new();
    for ((repo, digest), body) in read {
        match body {
            Ok(b) => bodies.entry(repo).or_default().push((digest, b)),
            Err(e) => summary.skipped.push(format!("{repo}@{digest}: {e}")),
        }
    }

    for (repo, r) in &layout.repositories {
        if !registry.meta.repository_exists(repo).await? {
            summary.repositories_new += 1;
        }
        adopt_blobs(
            registry,
            source,
            repo,
            &r.layers,
            &layout.blobs,
            &mut summary,
        )
        .await?;
        put_manifests(
            registry,
            repo,
            bodies.remove(repo).unwrap_or_default(),
            &mut summary,
        )
        .await?;
        put_tags(
            registry,
            repo,
            tags.remove(repo).unwrap_or_default(),
            &mut summary,
        )
        .await?;
    }
    Ok(summary)
}

/// A link file: the digest it holds.
fn parse_link(link: &[u8]) -> Result<Digest, String> {
    let text = std::str::from_utf8(link).unwrap_or("").trim();
    Digest::parse(text).ok_or_else(|| format!("link file holds {text:?}, not a sha256 digest"))
}

/// Links the repository's blobs that berth lacks, adopting their data where it lies.
async fn adopt_blobs(
    registry: &Registry,
    source: &dyn Source,
    repo: &str,
    layers: &BTreeSet<Digest>,
    data: &BTreeMap<Digest, u64>,
    summary: &mut Summary,
) -> Result<(), ImportError> {
    let mut batch: Vec<(Digest, BlobRecord)> = Vec::new();
    for digest in layers {
        if registry.meta.repo_blob(repo, digest).await?.is_some() {
            summary.blobs_present += 1;
            continue;
        }
        let Some(&size) = data.get(digest) else {
            summary.skipped.push(format!(
                "{repo}@{digest}: blob linked in the repository, without data in distribution's blob store"
            ));
            continue;
        };
        let key = match registry.meta.blob(digest).await? {
            // Known to berth already (another repository): link it, adopt nothing.
            Some(existing) => existing.key,
            None => {
                let adopted = source.adopt(&blob_data_key(digest), size).await?;
                summary.bytes_copied += adopted.copied;
                adopted.key
            }
        };
        batch.push((digest.clone(), BlobRecord { key, size }));
        if batch.len() == ADOPT_BATCH {
            record_blobs(registry, repo, std::mem::take(&mut batch), summary).await?;
        }
    }
    record_blobs(registry, repo, batch, summary).await
}

async fn record_blobs(
    registry: &Registry,
    repo: &str,
    batch: Vec<(Digest, BlobRecord)>,
    summary: &mut Summary,
) -> Result<(), ImportError> {
    if batch.is_empty() {
        return Ok(());
    }
    let linked = registry.meta.adopt_blobs(repo, &batch).await?;
    for ((_, record), l) in batch.iter().zip(linked) {
        summary.blobs_linked += 1;
        if l == Linked::New {
            summary.blobs_new += 1;
            summary.bytes_adopted += record.size;
        }
    }
    Ok(())
}

/// Records the repository's new manifests through the push path. An index names manifests
/// that must be recorded first: whatever fails for a missing reference is tried again after
/// the others, until a round makes no progress.
async fn put_manifests(
    registry: &Registry,
    repo: &str,
    mut pending: Vec<(Digest, Bytes)>,
    summary: &mut Summary,
) -> Result<(), ImportError> {
    while !pending.is_empty() {
        let mut waiting = Vec::new();
        let mut reasons = Vec::new();
        let before = pending.len();
        for (digest, body) in pending {
            let reference = Reference::Digest(digest.clone());
            match registry
                .put_manifest(repo, &reference, None, body.clone())
                .await
            {
                Ok(_) => summary.manifests_added += 1,
                Err(RegistryError::ManifestBlobUnknown(why)) => {
                    reasons.push(why);
                    waiting.push((digest, body));
                }
                Err(e) if is_store_failure(&e) => return Err(ImportError(e.to_string())),
                Err(e) => summary.skipped.push(format!("{repo}@{digest}: {e}")),
            }
        }
        if waiting.len() == before {
            for ((digest, _), why) in waiting.iter().zip(reasons) {
                summary.skipped.push(format!(
                    "{repo}@{digest}: {why} (missing in distribution's storage)"
                ));
            }
            return Ok(());
        }
        pending = waiting;
    }
    Ok(())
}

/// Points berth's tags where distribution's point (distribution stays the source of truth until
/// the cut-over).
async fn put_tags(
    registry: &Registry,
    repo: &str,
    tags: Vec<(String, Digest)>,
    summary: &mut Summary,
) -> Result<(), ImportError> {
    for (tag, digest) in tags {
        let current = registry.meta.tagged_manifest(repo, &tag).await?;
        if current.as_ref().is_some_and(|(d, _)| *d == digest) {
            summary.tags_present += 1;
            continue;
        }
        let Some(record) = registry.meta.manifest(repo, &digest).await? else {
            summary.skipped.push(format!(
                "{repo}:{tag}: points at {digest}, which was not imported"
            ));
            continue;
        };
        let reference = Reference::Tag(tag.clone());
        match registry
            .put_manifest(repo, &reference, Some(&record.media_type), record.body)
            .await
        {
            Ok(_) if current.is_some() => summary.tags_moved += 1,
            Ok(_) => summary.tags_added += 1,
            Err(e) if is_store_failure(&e) => return Err(ImportError(e.to_string())),
            Err(e) => summary.skipped.push(format!("{repo}:{tag}: {e}")),
        }
    }
    Ok(())
}

/// Errors of the stores themselves stop the import (a re-run continues); the others concern
/// one manifest and are reported in the summary.
fn is_store_failure(e: &RegistryError) -> bool {
    e.status().is_server_error()
}
