//! `berth metadata copy --from redb:PATH --to postgres:URL`: moving from one node to many.
//!
//! The redb file is read in one read transaction (a consistent snapshot) and written to
//! PostgreSQL in one transaction: the database has either all of it or none. Every row is an
//! upsert, so running the copy again is harmless (and brings changes made since).

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;

use super::postgres::{migrate, PgStore};
use super::redb::RedbStore;
use super::{BlobRecord, ManifestRecord, UploadSession};
use crate::config::PostgresConfig;

/// Everything a metadata store holds, as rows.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub repositories: Vec<String>,
    /// `(digest, record)`.
    pub blobs: Vec<(String, BlobRecord)>,
    /// `(repo, digest)`.
    pub links: Vec<(String, String)>,
    /// `(repo, digest, record)`.
    pub manifests: Vec<(String, String, ManifestRecord)>,
    /// `(repo, tag, digest)`.
    pub tags: Vec<(String, String, String)>,
    /// `(repo, subject, digest, descriptor)`.
    pub referrers: Vec<(String, String, String, Bytes)>,
    /// Open sessions with their pending bytes.
    pub uploads: Vec<(UploadSession, Bytes)>,
}

impl Snapshot {
    pub fn summary(&self) -> String {
        format!(
            "{} repositories, {} blob records, {} blob links, {} manifests, {} tags, {} referrers, {} upload sessions",
            self.repositories.len(),
            self.blobs.len(),
            self.links.len(),
            self.manifests.len(),
            self.tags.len(),
            self.referrers.len(),
            self.uploads.len()
        )
    }
}

/// The command: `from` is `redb:PATH`, `to` is `postgres:URL` (`postgres:_env:NAME` reads the
/// URL from the environment).
pub fn copy_command(from: &str, to: &str) -> Result<String, String> {
    let path = from
        .strip_prefix("redb:")
        .ok_or_else(|| format!("--from {from:?}: expected redb:PATH"))?;
    let url = to
        .strip_prefix("postgres:")
        .ok_or_else(|| "--to: expected postgres:URL".to_string())?;
    let url = match url.strip_prefix("_env:") {
        Some(name) => std::env::var(name)
            .map_err(|_| format!("--to: environment variable {name} is not set"))?,
        None => url.to_string(),
    };
    let pg = PostgresConfig {
        url,
        max_connections: 1,
        // One transaction with every manifest in it.
        statement_timeout: Duration::from_secs(3600),
        connect_timeout: Duration::from_secs(10),
        ca_bundle: None,
    };
    let source = RedbStore::open(Path::new(path))
        .map_err(|e| format!("{e} (is a berth still running on it? stop it before copying)"))?;
    let snapshot = source.export().map_err(|e| e.to_string())?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async {
        migrate(&pg).await?;
        PgStore::connect(&pg)?.import(&snapshot).await
    })
    .map_err(|e| e.to_string())?;
    Ok(format!("copied {}", snapshot.summary()))
}
