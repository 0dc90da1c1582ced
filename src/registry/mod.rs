//! Registry logic: what each OCI distribution operation means, independent of HTTP.
//!
//! [`Registry`] ties the metadata store (every metadata answer) to the object store (blob
//! bytes only). The HTTP layer parses a request into an endpoint, calls one method here, and
//! writes the result.

pub mod budget;
pub mod error;
pub mod hasher;
pub mod manifest;
pub mod names;
pub mod pacing;
pub mod upload;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use crate::config::{BlobServing, Config};
use crate::meta::{BlobRecord, MetaStore};
use crate::storage::ObjectStore;
pub use error::RegistryError;
use names::Digest;

pub type RegistryResult<T> = Result<T, RegistryError>;

/// A request body, read chunk by chunk as it arrives (the HTTP layer implements it on the
/// downstream session, tests on plain buffers).
#[async_trait::async_trait]
pub trait BodySource: Send {
    /// The next chunk, or None at the end of the body. A read error means the client went
    /// away or broke the framing.
    async fn next_chunk(&mut self) -> std::io::Result<Option<Bytes>>;
}

/// Settings the registry logic needs, taken from [`Config`].
#[derive(Debug, Clone)]
pub struct RegistrySettings {
    pub part_size: u64,
    pub blob_serving: BlobServing,
    pub presign_ttl: Duration,
    pub session_expiry: Duration,
    pub buffer_budget: u64,
}

impl RegistrySettings {
    pub fn from_config(c: &Config) -> Self {
        RegistrySettings {
            part_size: c.upload.part_size,
            blob_serving: c.storage.blob_serving,
            presign_ttl: c.storage.presign_ttl,
            session_expiry: c.upload.session_expiry,
            buffer_budget: c.upload.buffer_budget,
        }
    }
}

pub struct Registry {
    pub meta: Arc<dyn MetaStore>,
    pub store: Arc<ObjectStore>,
    pub settings: RegistrySettings,
    /// Pull-through mirrors (none unless configured).
    pub mirrors: crate::mirror::Mirrors,
    /// Memory for part buffers, shared by all uploads.
    budget: budget::UploadBudget,
}

/// How to serve a blob GET.
pub enum BlobGet {
    /// Stream the object's bytes through berth.
    Proxy { record: BlobRecord },
    /// 307 to this presigned URL.
    Redirect { record: BlobRecord, url: String },
}

impl Registry {
    pub fn new(
        meta: Arc<dyn MetaStore>,
        store: Arc<ObjectStore>,
        settings: RegistrySettings,
    ) -> Self {
        Registry {
            meta,
            store,
            budget: budget::UploadBudget::new(settings.buffer_budget, settings.part_size),
            settings,
            mirrors: Default::default(),
        }
    }

    pub fn with_mirrors(mut self, mirrors: crate::mirror::Mirrors) -> Self {
        self.mirrors = mirrors;
        self
    }

    /// HEAD blob: answered from metadata alone.
    pub async fn stat_blob(&self, repo: &str, digest: &Digest) -> RegistryResult<BlobRecord> {
        self.meta
            .repo_blob(repo, digest)
            .await?
            .ok_or(RegistryError::BlobUnknown)
    }

    pub async fn get_blob(&self, repo: &str, digest: &Digest) -> RegistryResult<BlobGet> {
        let record = self.stat_blob(repo, digest).await?;
        Ok(match self.settings.blob_serving {
            BlobServing::Proxy => BlobGet::Proxy { record },
            BlobServing::Redirect => {
                // The config refuses redirect mode with the local store, which has no URLs.
                let url = self
                    .store
                    .presign(&http::Method::GET, &record.key, self.settings.presign_ttl)
                    .ok_or_else(|| {
                        RegistryError::Internal("the local object store has no URLs".into())
                    })?
                    .url;
                BlobGet::Redirect { record, url }
            }
        })
    }

    /// DELETE blob: removes the repository's link. The bytes stay until garbage collection
    /// (other repositories may link the same digest).
    pub async fn delete_blob(&self, repo: &str, digest: &Digest) -> RegistryResult<()> {
        if self.meta.unlink_blob(repo, digest).await? {
            Ok(())
        } else {
            Err(RegistryError::BlobUnknown)
        }
    }

    pub async fn tags(
        &self,
        repo: &str,
        last: Option<&str>,
        limit: usize,
    ) -> RegistryResult<Vec<String>> {
        if !self.meta.repository_exists(repo).await? {
            return Err(RegistryError::NameUnknown);
        }
        Ok(self.meta.tags(repo, last, limit).await?)
    }

    pub async fn repositories(
        &self,
        last: Option<&str>,
        limit: usize,
    ) -> RegistryResult<Vec<String>> {
        Ok(self.meta.repositories(last, limit).await?)
    }
}

pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
