//! The tables garbage collection relies on, kept in the same transactions as the registry's
//! writes: the reference index, the reverse blob links, tag times and the candidate queue.
//!
//! | table           | key                                   | value                            |
//! |-----------------|---------------------------------------|----------------------------------|
//! | `refs`          | `(digest, repo)`                      | manifests of repo referencing it |
//! | `manifest_refs` | `(repo, manifest digest)`             | its references, space-separated  |
//! | `blob_links`    | `(digest, repo)`                      | `()` (`repo_blobs` reversed)     |
//! | `tag_times`     | `(repo, tag)`                         | unix seconds of the last PUT     |
//! | `gc_queue`      | `(kind, repo or "", digest)`          | unix seconds last touched        |
//! | `gc_due`        | `(kind, since, repo or "", digest)`   | `()` (the queue in time order)   |
//! | `gc_schema`     | `"version"`                           | 1 once the tables were built     |
//!
//! Blob candidates have the empty repository (no repository name is empty).

use ::redb::{ReadableTable, TableDefinition, WriteTransaction};
use bytes::Bytes;

use super::{ctx, parse_digest, wtable, MANIFESTS, REFERRERS, REPOSITORIES, REPO_BLOBS, TAGS};
use super::{RepoKey, BLOBS};
use crate::meta::{Candidate, CandidateKind, ManifestRecord, MetaResult};
use crate::registry::names::Digest;

pub(super) const REFS: TableDefinition<(&str, &str), u64> = TableDefinition::new("refs");
pub(super) const MANIFEST_REFS: TableDefinition<RepoKey, &str> =
    TableDefinition::new("manifest_refs");
pub(super) const BLOB_LINKS: TableDefinition<(&str, &str), ()> = TableDefinition::new("blob_links");
pub(super) const TAG_TIMES: TableDefinition<(&str, &str), u64> = TableDefinition::new("tag_times");
pub(super) const GC_QUEUE: TableDefinition<(u8, &str, &str), u64> =
    TableDefinition::new("gc_queue");
pub(super) const GC_DUE: TableDefinition<(u8, u64, &str, &str), ()> =
    TableDefinition::new("gc_due");
const GC_SCHEMA: TableDefinition<&str, u64> = TableDefinition::new("gc_schema");

pub(super) const BLOB: u8 = 0;
pub(super) const MANIFEST: u8 = 1;

pub(super) fn kind_code(kind: CandidateKind) -> u8 {
    match kind {
        CandidateKind::Blob => BLOB,
        CandidateKind::Manifest => MANIFEST,
    }
}

/// `(kind, repo or "", digest)` of a candidate.
pub(super) fn candidate_key(c: &Candidate) -> (u8, &str, &str) {
    match c {
        Candidate::Blob(d) => (BLOB, "", d.as_str()),
        Candidate::Manifest { repo, digest } => (MANIFEST, repo.as_str(), digest.as_str()),
    }
}

pub(super) fn candidate(kind: u8, repo: &str, digest: &str) -> MetaResult<Candidate> {
    let digest = parse_digest("gc_queue", digest)?;
    Ok(if kind == BLOB {
        Candidate::Blob(digest)
    } else {
        Candidate::Manifest {
            repo: repo.to_owned(),
            digest,
        }
    })
}

pub(super) fn encode_refs(refs: &[Digest]) -> String {
    let mut s = String::with_capacity(refs.len() * 72);
    for (i, d) in refs.iter().enumerate() {
        if i > 0 {
            s.push(' ');
        }
        s.push_str(d.as_str());
    }
    s
}

pub(super) fn decode_refs(s: &str) -> MetaResult<Vec<Digest>> {
    s.split(' ')
        .filter(|d| !d.is_empty())
        .map(|d| parse_digest("manifest_refs", d))
        .collect()
}

/// Queues `(kind, repo, digest)` at `now`, replacing an earlier time.
pub(super) fn touch(
    txn: &WriteTransaction,
    kind: u8,
    repo: &str,
    digest: &str,
    now: u64,
) -> MetaResult<()> {
    // Replaying the bucket journal re-applies writes that (mostly) happened already: they
    // must not restart every recent candidate's grace, so a replayed touch only queues what
    // is not queued yet.
    if REPLAYING.get() && queued(txn, kind, repo, digest)?.is_some() {
        return Ok(());
    }
    let mut queue = wtable(txn, GC_QUEUE)?;
    let mut due = wtable(txn, GC_DUE)?;
    let old = queue
        .insert((kind, repo, digest), now)
        .map_err(ctx("queue candidate"))?
        .map(|g| g.value());
    if let Some(old) = old {
        due.remove((kind, old, repo, digest))
            .map_err(ctx("queue candidate"))?;
    }
    due.insert((kind, now, repo, digest), ())
        .map_err(ctx("queue candidate"))?;
    Ok(())
}

thread_local! {
    /// Set by the store around a write transaction while the journal is replayed.
    pub(super) static REPLAYING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Queues at `now` unless queued already.
pub(super) fn enqueue_if_absent(
    txn: &WriteTransaction,
    kind: u8,
    repo: &str,
    digest: &str,
    now: u64,
) -> MetaResult<bool> {
    if queued(txn, kind, repo, digest)?.is_some() {
        return Ok(false);
    }
    touch(txn, kind, repo, digest, now)?;
    Ok(true)
}

/// When the candidate was last touched, if queued.
pub(super) fn queued(
    txn: &WriteTransaction,
    kind: u8,
    repo: &str,
    digest: &str,
) -> MetaResult<Option<u64>> {
    let queue = wtable(txn, GC_QUEUE)?;
    let since = queue
        .get((kind, repo, digest))
        .map_err(ctx("read queue"))?
        .map(|g| g.value());
    Ok(since)
}

pub(super) fn dequeue(
    txn: &WriteTransaction,
    kind: u8,
    repo: &str,
    digest: &str,
) -> MetaResult<()> {
    let mut queue = wtable(txn, GC_QUEUE)?;
    let old = queue
        .remove((kind, repo, digest))
        .map_err(ctx("dequeue"))?
        .map(|g| g.value());
    if let Some(old) = old {
        let mut due = wtable(txn, GC_DUE)?;
        due.remove((kind, old, repo, digest))
            .map_err(ctx("dequeue"))?;
    }
    Ok(())
}

/// Whether a `(repo, _)`-keyed table has any entry of `repo`.
fn repo_has_any<V: ::redb::Value + 'static>(
    table: &impl ReadableTable<(&'static str, &'static str), V>,
    repo: &str,
) -> MetaResult<bool> {
    let mut range = table
        .range::<(&str, &str)>((repo, "")..)
        .map_err(ctx("scan repository"))?;
    Ok(match range.next() {
        Some(entry) => entry.map_err(ctx("scan repository"))?.0.value().0 == repo,
        None => false,
    })
}

/// Removes `repo` from the catalog if it has no manifest and no blob link. True if it did.
pub(super) fn prune_if_empty(txn: &WriteTransaction, repo: &str) -> MetaResult<bool> {
    if repo_has_any(&wtable(txn, MANIFESTS)?, repo)?
        || repo_has_any(&wtable(txn, REPO_BLOBS)?, repo)?
    {
        return Ok(false);
    }
    let mut repos = wtable(txn, REPOSITORIES)?;
    let removed = repos
        .remove(repo)
        .map_err(ctx("remove repository"))?
        .is_some();
    Ok(removed)
}

/// Whether any manifest of any repository references `digest`.
pub(super) fn referenced_anywhere(
    refs: &impl ReadableTable<(&'static str, &'static str), u64>,
    digest: &str,
) -> MetaResult<bool> {
    let mut range = refs
        .range::<(&str, &str)>((digest, "")..)
        .map_err(ctx("scan refs"))?;
    Ok(match range.next() {
        Some(entry) => entry.map_err(ctx("scan refs"))?.0.value().0 == digest,
        None => false,
    })
}

/// Repositories that have an entry under `digest` in a `(digest, repo)`-keyed table.
pub(super) fn repos_of<V: ::redb::Value + 'static>(
    table: &impl ReadableTable<(&'static str, &'static str), V>,
    digest: &str,
) -> MetaResult<Vec<String>> {
    let mut out = Vec::new();
    for entry in table
        .range::<(&str, &str)>((digest, "")..)
        .map_err(ctx("scan by digest"))?
    {
        let (k, _) = entry.map_err(ctx("scan by digest"))?;
        let (d, repo) = k.value();
        if d != digest {
            break;
        }
        out.push(repo.to_owned());
    }
    Ok(out)
}

/// Tags of `repo` that point at `digest`.
pub(super) fn tags_pointing_at(
    txn: &WriteTransaction,
    repo: &str,
    digest: &str,
) -> MetaResult<Vec<String>> {
    let tags = wtable(txn, TAGS)?;
    let mut out = Vec::new();
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
            out.push(t.to_owned());
        }
    }
    Ok(out)
}

/// Adds a new manifest's references to the index.
pub(super) fn add_references(
    txn: &WriteTransaction,
    repo: &str,
    digest: &str,
    references: &[Digest],
) -> MetaResult<()> {
    let mut manifest_refs = wtable(txn, MANIFEST_REFS)?;
    manifest_refs
        .insert((repo, digest), encode_refs(references).as_str())
        .map_err(ctx("insert manifest refs"))?;
    let mut refs = wtable(txn, REFS)?;
    for r in references {
        let n = refs
            .get((r.as_str(), repo))
            .map_err(ctx("read refs"))?
            .map_or(0, |g| g.value());
        refs.insert((r.as_str(), repo), n + 1)
            .map_err(ctx("insert refs"))?;
    }
    Ok(())
}

/// Deletes a manifest with its tags, tag times, referrers entry and references; queues what
/// that may have freed; prunes an emptied repository. None if there was no such manifest.
pub(super) fn remove_manifest(
    txn: &WriteTransaction,
    repo: &str,
    digest: &str,
    now: u64,
) -> MetaResult<Option<ManifestRecord>> {
    let (media_type, subject, body) = {
        let mut manifests = wtable(txn, MANIFESTS)?;
        let Some(old) = manifests
            .remove((repo, digest))
            .map_err(ctx("remove manifest"))?
        else {
            return Ok(None);
        };
        let (media_type, subject, body) = old.value();
        (
            media_type.to_owned(),
            subject.map(str::to_owned),
            Bytes::copy_from_slice(body),
        )
    };
    {
        let mut referrers = wtable(txn, REFERRERS)?;
        if let Some(subject) = &subject {
            referrers
                .remove((repo, subject.as_str(), digest))
                .map_err(ctx("remove referrer"))?;
        }
    }
    let doomed = tags_pointing_at(txn, repo, digest)?;
    {
        let mut tags = wtable(txn, TAGS)?;
        let mut times = wtable(txn, TAG_TIMES)?;
        for t in &doomed {
            tags.remove((repo, t.as_str())).map_err(ctx("remove tag"))?;
            times
                .remove((repo, t.as_str()))
                .map_err(ctx("remove tag time"))?;
        }
    }
    let references = {
        let mut manifest_refs = wtable(txn, MANIFEST_REFS)?;
        let old = manifest_refs
            .remove((repo, digest))
            .map_err(ctx("remove manifest refs"))?;
        match old {
            Some(g) => decode_refs(g.value())?,
            None => Vec::new(),
        }
    };
    // References no manifest of the repository holds any more.
    let mut freed = Vec::new();
    {
        let mut refs = wtable(txn, REFS)?;
        for r in &references {
            let n = refs
                .get((r.as_str(), repo))
                .map_err(ctx("read refs"))?
                .map_or(0, |g| g.value());
            if n > 1 {
                refs.insert((r.as_str(), repo), n - 1)
                    .map_err(ctx("update refs"))?;
            } else {
                refs.remove((r.as_str(), repo))
                    .map_err(ctx("remove refs"))?;
                freed.push(r.as_str());
            }
        }
    }
    for r in freed {
        let is_blob = wtable(txn, BLOBS)?
            .get(r)
            .map_err(ctx("read blob"))?
            .is_some();
        if is_blob {
            touch(txn, BLOB, "", r, now)?;
        }
        let is_manifest = wtable(txn, MANIFESTS)?
            .get((repo, r))
            .map_err(ctx("read manifest"))?
            .is_some();
        if is_manifest {
            touch(txn, MANIFEST, repo, r, now)?;
        }
    }
    // Its referrers lost their subject.
    let orphaned: Vec<String> = {
        let referrers = wtable(txn, REFERRERS)?;
        let mut out = Vec::new();
        for entry in referrers
            .range::<(&str, &str, &str)>((repo, digest, "")..)
            .map_err(ctx("scan referrers"))?
        {
            let (k, _) = entry.map_err(ctx("scan referrers"))?;
            let (r, s, x) = k.value();
            if r != repo || s != digest {
                break;
            }
            out.push(x.to_owned());
        }
        out
    };
    for x in &orphaned {
        touch(txn, MANIFEST, repo, x, now)?;
    }
    prune_if_empty(txn, repo)?;
    Ok(Some(ManifestRecord {
        media_type,
        body,
        subject: subject.map(|s| parse_digest("manifests", &s)).transpose()?,
        references,
    }))
}

/// Builds the GC tables for a database written before they existed, once: the references of
/// every stored manifest (parsed from its body), the reverse links, tag times (now) and the
/// queue (every manifest and every unreferenced blob, at now: nothing is collected before a
/// grace has passed since the upgrade).
pub(super) fn upgrade(txn: &WriteTransaction, now: u64) -> MetaResult<()> {
    let mut schema = wtable(txn, GC_SCHEMA)?;
    if schema
        .get("version")
        .map_err(ctx("read gc schema"))?
        .is_some()
    {
        return Ok(());
    }
    let manifests: Vec<(String, String, Vec<Digest>)> = {
        let table = wtable(txn, MANIFESTS)?;
        let mut out = Vec::new();
        for entry in table.iter().map_err(ctx("scan manifests"))? {
            let (k, v) = entry.map_err(ctx("scan manifests"))?;
            let (repo, digest) = k.value();
            let (media_type, _, body) = v.value();
            let refs = crate::registry::manifest::references(media_type, body);
            out.push((repo.to_owned(), digest.to_owned(), refs));
        }
        out
    };
    for (repo, digest, refs) in &manifests {
        add_references(txn, repo, digest, refs)?;
        touch(txn, MANIFEST, repo, digest, now)?;
    }
    {
        let links = wtable(txn, REPO_BLOBS)?;
        let mut reverse = wtable(txn, BLOB_LINKS)?;
        for entry in links.iter().map_err(ctx("scan links"))? {
            let (k, _) = entry.map_err(ctx("scan links"))?;
            let (repo, digest) = k.value();
            reverse
                .insert((digest, repo), ())
                .map_err(ctx("insert blob link"))?;
        }
    }
    {
        let tags = wtable(txn, TAGS)?;
        let mut times = wtable(txn, TAG_TIMES)?;
        for entry in tags.iter().map_err(ctx("scan tags"))? {
            let (k, _) = entry.map_err(ctx("scan tags"))?;
            times
                .insert(k.value(), now)
                .map_err(ctx("insert tag time"))?;
        }
    }
    let unreferenced: Vec<String> = {
        let blobs = wtable(txn, BLOBS)?;
        let refs = wtable(txn, REFS)?;
        let mut out = Vec::new();
        for entry in blobs.iter().map_err(ctx("scan blobs"))? {
            let (k, _) = entry.map_err(ctx("scan blobs"))?;
            if !referenced_anywhere(&refs, k.value())? {
                out.push(k.value().to_owned());
            }
        }
        out
    };
    for d in &unreferenced {
        touch(txn, BLOB, "", d, now)?;
    }
    if !manifests.is_empty() || !unreferenced.is_empty() {
        log::info!(
            "metadata: built the reference index ({} manifests, {} unreferenced blobs queued)",
            manifests.len(),
            unreferenced.len()
        );
    }
    schema
        .insert("version", 1)
        .map_err(ctx("write gc schema"))?;
    Ok(())
}
