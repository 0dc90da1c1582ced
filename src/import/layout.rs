//! CNCF distribution's storage layout (registry/storage/paths.go), read from object keys alone.
//!
//! Below distribution's root (`<rootdirectory>/docker/registry/v2/`):
//! - `repositories/<name>/_layers/sha256/<hex>/link`: a blob linked into the repository;
//! - `repositories/<name>/_manifests/revisions/sha256/<hex>/link`: a manifest of the repository;
//! - `repositories/<name>/_manifests/tags/<tag>/current/link`: the tag (the file holds the
//!   manifest's digest);
//! - `blobs/sha256/<hex[..2]>/<hex>/data`: the bytes of every blob and manifest.
//!
//! Everything else (uploads in progress, tag history under `tags/<tag>/index/`) is ignored.
//! Repository name components never start with `_`, so the first `/_layers/` or `/_manifests/`
//! ends the name.

use std::collections::{BTreeMap, BTreeSet};

use crate::registry::names::{valid_repository, valid_tag, Digest};

/// Where distribution's tree starts below its root directory.
pub const V2: &str = "docker/registry/v2/";

/// The key (below distribution's root) of a blob's bytes.
pub fn blob_data_key(digest: &Digest) -> String {
    let hex = digest.hex();
    format!("{V2}blobs/sha256/{}/{hex}/data", &hex[..2])
}

/// What one key of the layout is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    Layer {
        repo: String,
        digest: Digest,
    },
    Revision {
        repo: String,
        digest: Digest,
    },
    Tag {
        repo: String,
        tag: String,
    },
    BlobData {
        digest: Digest,
    },
    /// Part of the layout berth does not need (uploads, tag index, `_manifests` of a name
    /// berth would refuse...).
    Other,
}

/// Parses a key relative to distribution's root (starting with [`V2`]).
pub fn parse(key: &str) -> Entry {
    let Some(rest) = key.strip_prefix(V2) else {
        return Entry::Other;
    };
    if let Some(rest) = rest.strip_prefix("blobs/sha256/") {
        // <xx>/<hex>/data
        let mut parts = rest.split('/');
        return match (parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some(xx), Some(hex), Some("data"), None) if hex.starts_with(xx) && xx.len() == 2 => {
                match Digest::parse(&format!("sha256:{hex}")) {
                    Some(digest) => Entry::BlobData { digest },
                    None => Entry::Other,
                }
            }
            _ => Entry::Other,
        };
    }
    let Some(rest) = rest.strip_prefix("repositories/") else {
        return Entry::Other;
    };
    let (repo, what) = match (rest.find("/_layers/"), rest.find("/_manifests/")) {
        (Some(l), Some(m)) if l < m => (&rest[..l], &rest[l + 1..]),
        (_, Some(m)) => (&rest[..m], &rest[m + 1..]),
        (Some(l), None) => (&rest[..l], &rest[l + 1..]),
        (None, None) => return Entry::Other,
    };
    if !valid_repository(repo) {
        return Entry::Other;
    }
    let repo = repo.to_string();
    let linked = |path: &str| -> Option<Digest> {
        let hex = path.strip_prefix("sha256/")?.strip_suffix("/link")?;
        Digest::parse(&format!("sha256:{hex}"))
    };
    if let Some(path) = what.strip_prefix("_layers/") {
        return match linked(path) {
            Some(digest) => Entry::Layer { repo, digest },
            None => Entry::Other,
        };
    }
    if let Some(path) = what.strip_prefix("_manifests/revisions/") {
        return match linked(path) {
            Some(digest) => Entry::Revision { repo, digest },
            None => Entry::Other,
        };
    }
    if let Some(tag) = what
        .strip_prefix("_manifests/tags/")
        .and_then(|p| p.strip_suffix("/current/link"))
    {
        if valid_tag(tag) {
            return Entry::Tag {
                repo,
                tag: tag.to_string(),
            };
        }
    }
    Entry::Other
}

/// One repository as distribution keeps it.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Repository {
    pub layers: BTreeSet<Digest>,
    pub revisions: BTreeSet<Digest>,
    pub tags: BTreeSet<String>,
}

/// The whole layout: repositories by name, and the blobs whose data exists (with its size).
#[derive(Debug, Default, Clone)]
pub struct Layout {
    pub repositories: BTreeMap<String, Repository>,
    pub blobs: BTreeMap<Digest, u64>,
    /// Keys of the layout berth could not place (see [`Entry::Other`]), for the summary.
    pub ignored: u64,
}

impl Layout {
    /// Adds one listed object (key relative to the root, size in bytes).
    pub fn add(&mut self, key: &str, size: u64) {
        match parse(key) {
            Entry::Layer { repo, digest } => {
                self.repositories
                    .entry(repo)
                    .or_default()
                    .layers
                    .insert(digest);
            }
            Entry::Revision { repo, digest } => {
                self.repositories
                    .entry(repo)
                    .or_default()
                    .revisions
                    .insert(digest);
            }
            Entry::Tag { repo, tag } => {
                self.repositories.entry(repo).or_default().tags.insert(tag);
            }
            Entry::BlobData { digest } => {
                self.blobs.insert(digest, size);
            }
            Entry::Other => {
                let uploads = key.contains("/_uploads/") || key.contains("/index/sha256/");
                if !uploads {
                    self.ignored += 1;
                }
            }
        }
    }
}

/// The key (below distribution's root) of a tag's `current/link`.
pub fn tag_link_key(repo: &str, tag: &str) -> String {
    format!("{V2}repositories/{repo}/_manifests/tags/{tag}/current/link")
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "4c2b7d4cde4d7a3f9e5e4a0c3b2a1d0e9f8c7b6a5d4e3f2a1b0c9d8e7f6a5b4c";

    fn d() -> Digest {
        Digest::parse(&format!("sha256:{HEX}")).unwrap()
    }

    #[test]
    fn parses_every_kind_of_key() {
        assert_eq!(
            parse(&format!(
                "{V2}repositories/team/app/_layers/sha256/{HEX}/link"
            )),
            Entry::Layer {
                repo: "team/app".into(),
                digest: d()
            }
        );
        assert_eq!(
            parse(&format!(
                "{V2}repositories/a/_manifests/revisions/sha256/{HEX}/link"
            )),
            Entry::Revision {
                repo: "a".into(),
                digest: d()
            }
        );
        assert_eq!(
            parse(&format!(
                "{V2}repositories/x/y/z/_manifests/tags/v1.0_rc-1/current/link"
            )),
            Entry::Tag {
                repo: "x/y/z".into(),
                tag: "v1.0_rc-1".into()
            }
        );
        assert_eq!(
            parse(&format!("{V2}blobs/sha256/4c/{HEX}/data")),
            Entry::BlobData { digest: d() }
        );
        assert_eq!(
            blob_data_key(&d()),
            format!("{V2}blobs/sha256/4c/{HEX}/data")
        );
        assert_eq!(
            tag_link_key("x/y", "latest"),
            format!("{V2}repositories/x/y/_manifests/tags/latest/current/link")
        );
    }

    #[test]
    fn ignores_what_berth_does_not_need() {
        for key in [
            format!("{V2}repositories/a/_uploads/0f1e/data"),
            format!("{V2}repositories/a/_manifests/tags/v1/index/sha256/{HEX}/link"),
            format!("{V2}blobs/sha256/ff/{HEX}/data"),
            format!("{V2}blobs/sha256/4c/{HEX}/other"),
            format!("{V2}repositories/Bad/_layers/sha256/{HEX}/link"),
            format!("{V2}repositories/a/_layers/sha256/short/link"),
            "elsewhere/file".to_string(),
        ] {
            assert_eq!(parse(&key), Entry::Other, "{key}");
        }
    }

    #[test]
    fn layout_groups_by_repository() {
        let mut l = Layout::default();
        l.add(&format!("{V2}repositories/a/_layers/sha256/{HEX}/link"), 71);
        l.add(
            &format!("{V2}repositories/a/_manifests/tags/v1/current/link"),
            71,
        );
        l.add(&format!("{V2}blobs/sha256/4c/{HEX}/data"), 1234);
        l.add(&format!("{V2}repositories/a/_uploads/u/startedat"), 20);
        l.add(&format!("{V2}repositories/a/junk"), 1);
        let a = &l.repositories["a"];
        assert!(a.layers.contains(&d()));
        assert!(a.tags.contains("v1"));
        assert_eq!(l.blobs[&d()], 1234);
        assert_eq!(l.ignored, 1);
    }
}
