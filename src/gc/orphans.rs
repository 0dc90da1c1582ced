//! The orphan scan (`berth gc --orphans`): objects under the bucket's blob prefix that no blob
//! record names and no upload session owns, and incomplete multipart uploads no session owns,
//! older than the grace. They come from a crash between storing bytes and linking them, or an
//! upload whose abort failed.
//!
//! Why the grace makes the scan safe: an object's last-modified time is when its bytes were
//! completed, and the upload links it (or deletes it) right after. An object older than the
//! grace that has no record and no session at the time of the check will never get one.

use std::collections::HashSet;
use std::time::{Duration, SystemTime};

use super::{GcError, GcReport};
use crate::meta::MetaStore;
use crate::metrics::GC;
use crate::storage::{ObjectStore, StorageError};

const PAGE: usize = 1000;

/// Every blob record's object key.
async fn recorded_keys(meta: &dyn MetaStore) -> Result<HashSet<String>, GcError> {
    let mut keys = HashSet::new();
    let mut after = None;
    loop {
        let page = meta.blobs(after.as_ref(), PAGE).await?;
        let Some((last, _)) = page.last() else { break };
        after = Some(last.clone());
        keys.extend(page.into_iter().map(|(_, r)| r.key));
    }
    Ok(keys)
}

fn older_than(t: Option<SystemTime>, cutoff: SystemTime) -> bool {
    // No time from the store: not provably old, so not an orphan.
    t.is_some_and(|t| t < cutoff)
}

pub async fn scan(
    meta: &dyn MetaStore,
    store: &ObjectStore,
    grace: Duration,
    dry_run: bool,
    report: &mut GcReport,
) -> Result<(), GcError> {
    let prefix = store.blob_key("");
    let cutoff = SystemTime::now() - grace;
    let mut token: Option<String> = None;
    let mut recorded: Option<HashSet<String>> = None;
    loop {
        let page = store.list_objects(&prefix, token.as_deref()).await?;
        if recorded.is_none() && !page.objects.is_empty() {
            // Read once, after the first listing (the grace covers what comes later).
            recorded = Some(recorded_keys(meta).await?);
        }
        let recorded = recorded.as_ref();
        for obj in &page.objects {
            if recorded.is_some_and(|r| r.contains(&obj.key))
                || !older_than(
                    crate::storage::client::parse_time(&obj.last_modified),
                    cutoff,
                )
            {
                continue;
            }
            let id = &obj.key[prefix.len()..];
            if meta.upload(id).await?.is_some() {
                continue;
            }
            if dry_run {
                log::info!(
                    "gc (dry run): would delete object {} ({} bytes): orphan",
                    obj.key,
                    obj.size
                );
            } else {
                store.delete_object(&obj.key).await?;
                log::info!(
                    "gc: deleted object {} ({} bytes): orphan (no blob record, no upload)",
                    obj.key,
                    obj.size
                );
                GC.objects_deleted.inc();
                GC.bytes_freed.inc_by(obj.size);
            }
            report.objects.add(obj.size);
        }
        match page.next {
            Some(t) => token = Some(t),
            None => break,
        }
    }
    abort_stale_multipart(meta, store, &prefix, cutoff, dry_run, report).await
}

async fn abort_stale_multipart(
    meta: &dyn MetaStore,
    store: &ObjectStore,
    prefix: &str,
    cutoff: SystemTime,
    dry_run: bool,
    report: &mut GcReport,
) -> Result<(), GcError> {
    let mut next: Option<(String, String)> = None;
    loop {
        let page = match store.list_multipart_uploads(prefix, next.as_ref()).await {
            Ok(p) => p,
            Err(StorageError::Failed { status, code, .. })
                if status == 501 || code == "NotImplemented" =>
            {
                report.notes.push(
                    "the object store cannot list multipart uploads (NotImplemented): \
                     incomplete multipart uploads were not scanned"
                        .into(),
                );
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        };
        for up in &page.uploads {
            if !up.key.starts_with(prefix) || !older_than(up.initiated, cutoff) {
                continue;
            }
            let id = &up.key[prefix.len()..];
            let owned = meta
                .upload(id)
                .await?
                .is_some_and(|s| s.multipart_id.as_deref() == Some(up.upload_id.as_str()));
            if owned {
                continue;
            }
            if dry_run {
                log::info!(
                    "gc (dry run): would abort multipart upload {} of {}: no session",
                    up.upload_id,
                    up.key
                );
            } else {
                store.abort_multipart(&up.key, &up.upload_id).await?;
                log::info!(
                    "gc: aborted multipart upload {} of {}: no session",
                    up.upload_id,
                    up.key
                );
            }
            report.multipart_uploads += 1;
        }
        match page.next {
            Some(n) => next = Some(n),
            None => return Ok(()),
        }
    }
}
