//! Pull-through mirrors: repositories under a configured prefix are read from an upstream
//! registry on a miss and kept as ordinary content (the same metadata store and bucket, so GC
//! and retention treat them like anything pushed).
//!
//! - Manifests by digest are cached for good (content-addressed).
//! - Manifests by tag are trusted for `ttl`, then re-checked with a HEAD; the body is fetched
//!   only when the digest moved. An unreachable upstream leaves the cached tag served (stale,
//!   with a warning); never cached, the client gets 503.
//! - Blobs stream from the upstream to the client and into the bucket at once
//!   ([`crate::http::mirror_blob`]); the digest is verified before the blob is recorded.
//!   Concurrent misses of one blob make one upstream fetch ([`Mirror::fetch_lock`]).
//! - Writes under a mirror prefix answer 405 UNSUPPORTED, as distribution does.

pub mod upstream;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::config::MirrorConfig;
use crate::meta::BlobRecord;
use crate::metrics::MIRROR;
use crate::registry::manifest::FoundManifest;
use crate::registry::names::{Digest, Reference};
use crate::registry::{Registry, RegistryError, RegistryResult};
use upstream::Upstream;

/// Every configured mirror, longest prefix first (the most specific one wins).
#[derive(Default)]
pub struct Mirrors {
    list: Vec<Mirror>,
}

pub struct Mirror {
    /// Repository prefix, empty (the whole registry) or ending in '/'.
    pub prefix: String,
    pub upstream: Upstream,
    pub ttl: Duration,
    /// When each cached tag (local repository, tag) was last confirmed upstream.
    confirmed: Mutex<HashMap<(String, String), Instant>>,
    /// One lock per blob being fetched: followers wait for the leader's fetch to finish.
    fetches: Mutex<HashMap<Digest, Arc<tokio::sync::Mutex<()>>>>,
}

/// A repository name resolved to its mirror.
pub struct Routed<'a> {
    pub mirror: &'a Mirror,
    /// The repository's name upstream (the local name less the prefix).
    pub upstream_repo: &'a str,
}

impl Mirrors {
    pub fn from_config(configs: &[MirrorConfig]) -> Result<Mirrors, String> {
        let mut list = Vec::with_capacity(configs.len());
        for c in configs {
            let upstream =
                Upstream::new(&c.remote_url, c.username.as_deref(), c.password.as_deref())
                    .map_err(|e| format!("proxy {}: {e}", c.remote_url))?;
            list.push(Mirror {
                prefix: c.prefix.clone(),
                upstream,
                ttl: c.ttl,
                confirmed: Mutex::new(HashMap::new()),
                fetches: Mutex::new(HashMap::new()),
            });
        }
        list.sort_by_key(|m| std::cmp::Reverse(m.prefix.len()));
        Ok(Mirrors { list })
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// The mirror `repo` lives under, if any.
    pub fn route<'a>(&'a self, repo: &'a str) -> Option<Routed<'a>> {
        self.list.iter().find_map(|m| {
            let rest = repo.strip_prefix(m.prefix.as_str())?;
            (!rest.is_empty()).then_some(Routed {
                mirror: m,
                upstream_repo: rest,
            })
        })
    }
}

impl Mirror {
    fn fresh(&self, repo: &str, tag: &str) -> bool {
        let confirmed = self.confirmed.lock().expect("mirror lock");
        confirmed
            .get(&(repo.to_string(), tag.to_string()))
            .is_some_and(|at| at.elapsed() < self.ttl)
    }

    fn confirm(&self, repo: &str, tag: &str) {
        self.confirmed
            .lock()
            .expect("mirror lock")
            .insert((repo.to_string(), tag.to_string()), Instant::now());
    }

    /// The lock that serializes fetches of `digest` (held by the one fetching it).
    pub fn fetch_lock(&self, digest: &Digest) -> Arc<tokio::sync::Mutex<()>> {
        self.fetches
            .lock()
            .expect("mirror lock")
            .entry(digest.clone())
            .or_default()
            .clone()
    }

    /// Forgets the lock of a finished fetch (waiters still hold their clone of it).
    pub fn fetch_done(&self, digest: &Digest) {
        self.fetches.lock().expect("mirror lock").remove(digest);
    }
}

impl Registry {
    /// GET/HEAD manifest under a mirror prefix.
    pub async fn mirror_manifest(
        &self,
        routed: &Routed<'_>,
        repo: &str,
        reference: &Reference,
    ) -> RegistryResult<FoundManifest> {
        let m = routed.mirror;
        let up = routed.upstream_repo;
        match reference {
            Reference::Digest(d) => {
                if let Some(record) = self.meta.manifest(repo, d).await? {
                    MIRROR.hit("manifest").inc();
                    return Ok(FoundManifest {
                        digest: d.clone(),
                        record,
                    });
                }
                MIRROR.miss("manifest").inc();
                let fetched = m
                    .upstream
                    .manifest(up, d.as_str())
                    .await?
                    .ok_or(RegistryError::ManifestUnknown)?;
                if &fetched.digest != d {
                    return Err(RegistryError::Unavailable(format!(
                        "the upstream served {} for manifest {d}",
                        fetched.digest
                    )));
                }
                self.store_mirrored_manifest(repo, None, fetched).await
            }
            Reference::Tag(tag) => {
                let cached = self.meta.tagged_manifest(repo, tag).await?;
                if let Some((digest, record)) = &cached {
                    if m.fresh(repo, tag) {
                        MIRROR.hit("manifest").inc();
                        return Ok(FoundManifest {
                            digest: digest.clone(),
                            record: record.clone(),
                        });
                    }
                    match m.upstream.manifest_digest(up, tag).await {
                        Ok(Some(d)) if &d == digest => {
                            m.confirm(repo, tag);
                            MIRROR.hit("manifest").inc();
                            return Ok(FoundManifest {
                                digest: d,
                                record: record.clone(),
                            });
                        }
                        Ok(Some(_)) => {} // moved upstream: fetch the new one below
                        Ok(None) => {
                            // Gone upstream: the mirror follows.
                            log::info!(
                                "mirror: {up}:{tag} is gone upstream; untagging {repo}:{tag}"
                            );
                            self.meta.delete_tag(repo, tag).await?;
                            return Err(RegistryError::ManifestUnknown);
                        }
                        Err(e) => return Ok(stale(repo, tag, &e, cached.expect("cached"))),
                    }
                }
                MIRROR.miss("manifest").inc();
                let fetched = match m.upstream.manifest(up, tag).await {
                    Ok(Some(f)) => f,
                    Ok(None) => return Err(RegistryError::ManifestUnknown),
                    Err(e) => {
                        return match cached {
                            Some(c) => Ok(stale(repo, tag, &e, c)),
                            None => Err(e),
                        }
                    }
                };
                let found = self
                    .store_mirrored_manifest(repo, Some(tag), fetched)
                    .await?;
                m.confirm(repo, tag);
                Ok(found)
            }
        }
    }

    /// The blob if `repo` has it, else links it from another repository that holds the same
    /// digest (content-addressed: the bytes are the same).
    pub async fn mirror_local_blob(
        &self,
        repo: &str,
        digest: &Digest,
    ) -> RegistryResult<Option<BlobRecord>> {
        if let Some(r) = self.meta.repo_blob(repo, digest).await? {
            return Ok(Some(r));
        }
        if self.meta.blob(digest).await?.is_some() && self.meta.link_blob(repo, digest).await? {
            return Ok(self.meta.repo_blob(repo, digest).await?);
        }
        Ok(None)
    }
}

fn stale(
    repo: &str,
    tag: &str,
    cause: &RegistryError,
    (digest, record): (Digest, crate::meta::ManifestRecord),
) -> FoundManifest {
    log::warn!(
        "mirror: upstream unreachable for {repo}:{tag}, serving the cached {digest}: {cause}"
    );
    MIRROR.stale.inc();
    FoundManifest { digest, record }
}
