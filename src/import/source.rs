//! Where distribution's layout is read from: the bucket berth uses ([`BucketSource`]) or a
//! filesystem root ([`DirSource`]). Keys are relative to distribution's root directory and
//! start with `docker/registry/v2/`. Only listings and small objects (link files, manifests)
//! are read; blob bytes never are.

use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

use super::ImportError;
use crate::storage::ObjectStore;

/// How a blob's data became available to berth.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdoptedObject {
    /// The object key berth records for the blob.
    pub key: String,
    /// Bytes copied to get it there (0 unless a hard link was impossible).
    pub copied: u64,
}

#[async_trait]
pub trait Source: Send + Sync {
    /// For the summary: where the layout is.
    fn describe(&self) -> String;
    /// Every object below `prefix`, with its size, in no particular order.
    async fn list(&self, prefix: &str) -> Result<Vec<(String, u64)>, ImportError>;
    /// A small object (a link file or a manifest).
    async fn read(&self, key: &str) -> Result<Bytes, ImportError>;
    /// Makes the blob data at `key` (`size` bytes) available to berth's object store without
    /// reading it.
    async fn adopt(&self, key: &str, size: u64) -> Result<AdoptedObject, ImportError>;
}

/// distribution's S3 layout in the bucket berth uses: blobs are recorded under distribution's
/// own keys, nothing is written to the bucket.
pub struct BucketSource {
    pub store: Arc<ObjectStore>,
    /// distribution's `rootdirectory`, as a key prefix: "" or ending in '/'.
    pub root: String,
}

impl BucketSource {
    pub fn new(store: Arc<ObjectStore>, root_directory: &str) -> Self {
        let trimmed = root_directory.trim_matches('/');
        let root = if trimmed.is_empty() {
            String::new()
        } else {
            format!("{trimmed}/")
        };
        BucketSource { store, root }
    }
}

#[async_trait]
impl Source for BucketSource {
    fn describe(&self) -> String {
        format!("bucket {:?}, root {:?}", self.store.bucket(), self.root)
    }

    async fn list(&self, prefix: &str) -> Result<Vec<(String, u64)>, ImportError> {
        let full = format!("{}{prefix}", self.root);
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let page = self.store.list_objects(&full, token.as_deref()).await?;
            for o in page.objects {
                if let Some(key) = o.key.strip_prefix(&self.root) {
                    out.push((key.to_string(), o.size));
                }
            }
            match page.next {
                Some(t) => token = Some(t),
                None => return Ok(out),
            }
        }
    }

    async fn read(&self, key: &str) -> Result<Bytes, ImportError> {
        Ok(self
            .store
            .get_object(&format!("{}{key}", self.root))
            .await?)
    }

    async fn adopt(&self, key: &str, _size: u64) -> Result<AdoptedObject, ImportError> {
        Ok(AdoptedObject {
            key: format!("{}{key}", self.root),
            copied: 0,
        })
    }
}

/// distribution's filesystem layout, adopted into berth's embedded object store: each blob's
/// `data` file is hard-linked to the same relative path in the store's bucket directory (the
/// same inode: no byte is copied, and distribution deleting its name later leaves berth's).
/// Only across filesystems is the file copied, and the summary says how much.
pub struct DirSource {
    /// distribution's `rootdirectory`.
    pub root: PathBuf,
    /// The embedded store's directory for berth's bucket (`<data_dir>/objects/<bucket>`).
    pub bucket_dir: PathBuf,
}

#[async_trait]
impl Source for DirSource {
    fn describe(&self) -> String {
        format!("directory {}", self.root.display())
    }

    async fn list(&self, prefix: &str) -> Result<Vec<(String, u64)>, ImportError> {
        let root = self.root.clone();
        let prefix = prefix.to_string();
        tokio::task::spawn_blocking(move || {
            let mut out = Vec::new();
            walk(&root.join(&prefix), &prefix, &mut out)?;
            Ok(out)
        })
        .await
        .map_err(|e| ImportError(format!("listing task failed: {e}")))?
    }

    async fn read(&self, key: &str) -> Result<Bytes, ImportError> {
        let path = self.root.join(key);
        tokio::fs::read(&path)
            .await
            .map(Bytes::from)
            .map_err(|e| ImportError::io(&path, e))
    }

    async fn adopt(&self, key: &str, size: u64) -> Result<AdoptedObject, ImportError> {
        let from = self.root.join(key);
        let to = self.bucket_dir.join(key);
        let key = key.to_string();
        tokio::task::spawn_blocking(move || {
            let copied = link_or_copy(&from, &to, size)?;
            Ok(AdoptedObject { key, copied })
        })
        .await
        .map_err(|e| ImportError(format!("link task failed: {e}")))?
    }
}

/// Files below `dir` as keys `prefix/...` with their sizes. A missing `dir` is empty.
fn walk(dir: &Path, prefix: &str, out: &mut Vec<(String, u64)>) -> Result<(), ImportError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(ImportError::io(dir, e)),
    };
    for entry in entries {
        let entry = entry.map_err(|e| ImportError::io(dir, e))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let key = if prefix.is_empty() || prefix.ends_with('/') {
            format!("{prefix}{name}")
        } else {
            format!("{prefix}/{name}")
        };
        let kind = entry
            .file_type()
            .map_err(|e| ImportError::io(&entry.path(), e))?;
        if kind.is_dir() {
            walk(&entry.path(), &key, out)?;
        } else if kind.is_file() {
            // A file distribution removed meanwhile is simply not listed.
            if let Ok(meta) = entry.metadata() {
                out.push((key, meta.len()));
            }
        }
    }
    Ok(())
}

/// Hard-links `from` to `to` (an existing `to` of the same size is kept: an earlier run's
/// link). Across filesystems the file is copied through a temporary name. Returns the bytes
/// copied.
fn link_or_copy(from: &Path, to: &Path, size: u64) -> Result<u64, ImportError> {
    if let Ok(meta) = std::fs::metadata(to) {
        if meta.len() == size {
            return Ok(0);
        }
        return Err(ImportError(format!(
            "{} exists with {} bytes, distribution's blob has {size}",
            to.display(),
            meta.len()
        )));
    }
    let parent = to.parent().expect("an object path has a parent");
    std::fs::create_dir_all(parent).map_err(|e| ImportError::io(parent, e))?;
    match std::fs::hard_link(from, to) {
        Ok(()) => Ok(0),
        Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(0),
        Err(e) if e.kind() == ErrorKind::CrossesDevices => {
            let tmp = to.with_extension(format!("import-{}", uuid::Uuid::new_v4()));
            let copied = std::fs::copy(from, &tmp).map_err(|e| ImportError::io(from, e))?;
            std::fs::rename(&tmp, to).map_err(|e| ImportError::io(to, e))?;
            Ok(copied)
        }
        Err(e) => Err(ImportError::io(from, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_keeps_the_inode_and_an_existing_link() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let from = dir.path().join("dist/data");
        std::fs::create_dir_all(from.parent().unwrap()).unwrap();
        std::fs::write(&from, b"layer bytes").unwrap();
        let to = dir.path().join("objects/registry/docker/x/data");
        assert_eq!(link_or_copy(&from, &to, 11).unwrap(), 0);
        assert_eq!(
            std::fs::metadata(&from).unwrap().ino(),
            std::fs::metadata(&to).unwrap().ino()
        );
        // Again: nothing to do.
        assert_eq!(link_or_copy(&from, &to, 11).unwrap(), 0);
        // A different file under the name is an error, never overwritten.
        let err = link_or_copy(&from, &to, 12).unwrap_err();
        assert!(err.0.contains("exists with 11 bytes"), "{err}");
        assert_eq!(std::fs::read(&to).unwrap(), b"layer bytes");
    }

    #[tokio::test]
    async fn dir_source_lists_keys_below_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir
            .path()
            .join("docker/registry/v2/repositories/a/_layers/sha256/ab/link");
        std::fs::create_dir_all(f.parent().unwrap()).unwrap();
        std::fs::write(&f, b"sha256:ab").unwrap();
        let s = DirSource {
            root: dir.path().to_path_buf(),
            bucket_dir: dir.path().join("objects"),
        };
        let listed = s.list("docker/registry/v2/repositories/").await.unwrap();
        assert_eq!(
            listed,
            vec![(
                "docker/registry/v2/repositories/a/_layers/sha256/ab/link".to_string(),
                9
            )]
        );
        assert!(s
            .list("docker/registry/v2/blobs/")
            .await
            .unwrap()
            .is_empty());
        assert_eq!(
            &s.read("docker/registry/v2/repositories/a/_layers/sha256/ab/link")
                .await
                .unwrap()[..],
            b"sha256:ab"
        );
    }
}
