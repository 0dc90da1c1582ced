//! Upload sessions and their index by last update, so that expiry ([`idle`]) reads only the
//! sessions that are idle instead of decoding every open one.
//!
//! | table             | key                  | value                          |
//! |-------------------|----------------------|--------------------------------|
//! | `uploads`         | session id           | the session (JSON)             |
//! | `upload_times`    | session id           | its `updated` (unix seconds)   |
//! | `uploads_by_time` | `(updated, id)`      | `()` (`upload_times` reversed) |
//!
//! Every write of a session goes through [`put`] and [`remove`], in the transaction that writes
//! it; [`upgrade`] builds the index at open for a file written before it existed.

use ::redb::WriteTransaction;
use ::redb::{ReadTransaction, ReadableTable, ReadableTableMetadata, TableDefinition};

use super::{ctx, rtable, wtable, UPLOADS};
use crate::meta::MetaResult;

pub(super) const UPLOAD_TIMES: TableDefinition<&str, u64> = TableDefinition::new("upload_times");
pub(super) const UPLOADS_BY_TIME: TableDefinition<(u64, &str), ()> =
    TableDefinition::new("uploads_by_time");

/// Stores the session `json` of `id`, last updated at `updated`.
pub(super) fn put(txn: &WriteTransaction, id: &str, updated: u64, json: &[u8]) -> MetaResult<()> {
    wtable(txn, UPLOADS)?
        .insert(id, json)
        .map_err(ctx("insert session"))?;
    reindex(txn, id, Some(updated))
}

/// Removes the session `id`; whether there was one.
pub(super) fn remove(txn: &WriteTransaction, id: &str) -> MetaResult<bool> {
    let existed = wtable(txn, UPLOADS)?
        .remove(id)
        .map_err(ctx("remove session"))?
        .is_some();
    reindex(txn, id, None)?;
    Ok(existed)
}

fn reindex(txn: &WriteTransaction, id: &str, updated: Option<u64>) -> MetaResult<()> {
    let mut times = wtable(txn, UPLOAD_TIMES)?;
    let mut by_time = wtable(txn, UPLOADS_BY_TIME)?;
    let old = match updated {
        Some(t) => times.insert(id, t),
        None => times.remove(id),
    }
    .map_err(ctx("index session"))?
    .map(|g| g.value());
    if let Some(old) = old {
        by_time.remove((old, id)).map_err(ctx("index session"))?;
    }
    if let Some(t) = updated {
        by_time.insert((t, id), ()).map_err(ctx("index session"))?;
    }
    Ok(())
}

/// Ids of the sessions last updated before `cutoff`, oldest first.
pub(super) fn idle(txn: &ReadTransaction, cutoff: u64) -> MetaResult<Vec<String>> {
    let by_time = rtable(txn, UPLOADS_BY_TIME)?;
    let mut ids = Vec::new();
    for entry in by_time.range(..(cutoff, "")).map_err(ctx("idle_uploads"))? {
        let (k, _) = entry.map_err(ctx("idle_uploads"))?;
        ids.push(k.value().1.to_owned());
    }
    Ok(ids)
}

/// Builds the index of a file whose sessions were written before it existed (its tables
/// then hold fewer entries than `uploads`).
pub(super) fn upgrade(txn: &WriteTransaction) -> MetaResult<()> {
    let sessions: Vec<(String, u64)> = {
        let uploads = wtable(txn, UPLOADS)?;
        let times = wtable(txn, UPLOAD_TIMES)?;
        let indexed = times.len().map_err(ctx("count sessions"))?;
        if uploads.len().map_err(ctx("count sessions"))? == indexed {
            return Ok(());
        }
        let mut out = Vec::new();
        for entry in uploads.iter().map_err(ctx("scan sessions"))? {
            let (k, v) = entry.map_err(ctx("scan sessions"))?;
            let session = super::decode_session(v.value())?;
            out.push((k.value().to_owned(), session.updated));
        }
        out
    };
    let mut times = wtable(txn, UPLOAD_TIMES)?;
    let mut by_time = wtable(txn, UPLOADS_BY_TIME)?;
    times.retain(|_, _| false).map_err(ctx("clear index"))?;
    by_time.retain(|_, _| false).map_err(ctx("clear index"))?;
    for (id, updated) in &sessions {
        times
            .insert(id.as_str(), *updated)
            .map_err(ctx("index session"))?;
        by_time
            .insert((*updated, id.as_str()), ())
            .map_err(ctx("index session"))?;
    }
    Ok(())
}
