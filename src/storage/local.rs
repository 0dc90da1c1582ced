//! The local object store: berth's embedded default (no `storage.endpoint`), objects as plain
//! files under `<data_dir>/objects`. Blob GETs read the file directly in large reads, with no
//! HTTP hop; uploads write parts as files and finish with an in-kernel copy and a rename.
//!
//! On-disk layout (`root` is `<data_dir>/objects`):
//! - `root/<bucket>/<key>`: an object's bytes, the key's `/` as directories. This is the
//!   layout berth 0.1's embedded S3 endpoint (s3s-fs) used, so its objects stay readable, and
//!   `berth import --from-dir` links distribution's files straight into it.
//! - `root/.uploads/<id>/`: a multipart upload: `key` (the object it becomes), `part-size` (the
//!   size of part 1) and `data`, where part n is written at (n - 1) × part-size. berth cuts
//!   parts at fixed boundaries (every part but the last has part 1's size), so the parts are
//!   the object's bytes in place: completing syncs `data`, renames it onto the object's path
//!   and removes the directory; nothing is copied. A part that breaks the layout is refused.
//! - `root/.tmp/<random>`: a PutObject being written; renamed into place once whole and
//!   synced.
//!
//! What a crash can leave, and who reclaims it: a file in `.tmp` (removed by [`sweep`] at
//! start), an upload directory no session names (also [`sweep`]), or one a session still names
//! (resumed by its client, or aborted by upload expiry). A partial write never appears under an
//! object's key: every object arrives by rename. Synced are whole objects (and their directory
//! entries), not parts: after a power cut an upload may have to start over, but an object that
//! was acknowledged is on disk. Writeback of each part starts as soon as it is written
//! (`sync_file_range`), so the sync at completion waits for little.
//!
//! All file I/O runs on tokio's blocking pool, a batch of chunks or one read at a time; a blob
//! GET reads its next chunk while the previous one is being sent.

use std::collections::HashSet;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue};

use super::{ListPage, MultipartInfo, MultipartPage, ObjectBody, ObjectInfo, StorageError};

/// Bytes of one chunk of a blob GET: large enough that per-chunk costs vanish, small enough
/// that many concurrent GETs hold little memory. A multiple of the page size.
const READ_CHUNK: usize = 1024 * 1024;
/// Streamed bodies are written in batches of about this many bytes (one blocking-pool task
/// each).
const WRITE_BATCH: usize = 1024 * 1024;
/// Keys per listing page, as S3's default.
const PAGE: usize = 1000;
const UPLOADS: &str = ".uploads";
const TMP: &str = ".tmp";
/// An upload's bytes, parts at their offsets, until completion renames them onto the object.
const DATA: &str = "data";
/// The size of an upload's part 1: every part but the last has it.
const PART_SIZE: &str = "part-size";

pub struct LocalStore {
    root: PathBuf,
    bucket: String,
    bucket_dir: PathBuf,
}

impl LocalStore {
    /// The store rooted at `root` (created if missing) for `bucket`.
    pub fn open(root: &Path, bucket: &str) -> std::io::Result<LocalStore> {
        let bucket_dir = root.join(bucket);
        for dir in [&bucket_dir, &root.join(UPLOADS), &root.join(TMP)] {
            std::fs::create_dir_all(dir)?;
        }
        Ok(LocalStore {
            root: root.to_path_buf(),
            bucket: bucket.to_string(),
            bucket_dir,
        })
    }

    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn object_path(&self, key: &str) -> Result<PathBuf, StorageError> {
        if key.is_empty()
            || key.starts_with('/')
            || key.ends_with('/')
            || key
                .split('/')
                .any(|c| c.is_empty() || c == "." || c == "..")
        {
            return Err(StorageError::Failed {
                status: 400,
                code: "InvalidKey".into(),
                message: format!("{key:?} is not an object key of the local store"),
            });
        }
        Ok(self.bucket_dir.join(key))
    }

    fn upload_dir(&self, upload_id: &str) -> Result<PathBuf, StorageError> {
        if !is_upload_id(upload_id) {
            return Err(StorageError::UploadGone {
                upload_id: upload_id.to_string(),
            });
        }
        Ok(self.root.join(UPLOADS).join(upload_id))
    }

    /// The bucket directory is there.
    pub async fn check(&self) -> Result<(), StorageError> {
        let dir = self.bucket_dir.clone();
        let bucket = self.bucket.clone();
        blocking(move || match std::fs::metadata(&dir) {
            Ok(m) if m.is_dir() => Ok(()),
            Ok(_) => Err(StorageError::NoSuchBucket { bucket }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(StorageError::NoSuchBucket { bucket })
            }
            Err(e) => Err(io_error(&dir, e)),
        })
        .await
    }

    pub async fn put_object(&self, key: &str, body: ObjectBody) -> Result<(), StorageError> {
        let path = self.object_path(key)?;
        let tmp = self
            .root
            .join(TMP)
            .join(uuid::Uuid::new_v4().simple().to_string());
        let written = write_file(&tmp, body).await;
        let placed = match written {
            Ok(()) => {
                let from = tmp.clone();
                blocking(move || {
                    sync_path(&from)?;
                    place(&from, &path)
                })
                .await
            }
            Err(e) => Err(e),
        };
        if placed.is_err() {
            let _ =
                blocking(move || std::fs::remove_file(&tmp).map_err(|e| io_error(&tmp, e))).await;
        }
        placed
    }

    /// A small object read whole (journal records). A missing key is `Failed { status: 404 }`.
    pub async fn get_object(&self, key: &str) -> Result<Bytes, StorageError> {
        let path = self.object_path(key)?;
        blocking(move || match std::fs::read(&path) {
            Ok(b) => Ok(Bytes::from(b)),
            Err(e) => Err(io_error(&path, e)),
        })
        .await
    }

    /// Objects under the key prefix `prefix` in key order, strictly after `after` (the
    /// continuation token is the last key of the previous page).
    pub async fn list_objects(
        &self,
        prefix: &str,
        after: Option<&str>,
    ) -> Result<ListPage, StorageError> {
        let bucket_dir = self.bucket_dir.clone();
        let prefix = prefix.to_string();
        let after = after.map(str::to_string);
        blocking(move || list(&bucket_dir, &prefix, after.as_deref())).await
    }

    pub async fn create_multipart(&self, key: &str) -> Result<String, StorageError> {
        self.object_path(key)?;
        let id = uuid::Uuid::new_v4().to_string();
        let dir = self.upload_dir(&id)?;
        let key = key.to_string();
        blocking(move || {
            std::fs::create_dir(&dir).map_err(|e| io_error(&dir, e))?;
            let key_file = dir.join("key");
            std::fs::write(&key_file, key).map_err(|e| io_error(&key_file, e))
        })
        .await?;
        Ok(id)
    }

    /// Writes part `number` at its offset in the upload's data file; its ETag is its size
    /// (what completion checks). Part 1 comes first and sets the part size.
    pub async fn upload_part(
        &self,
        upload_id: &str,
        number: u32,
        body: ObjectBody,
    ) -> Result<String, StorageError> {
        let dir = self.upload_dir(upload_id)?;
        let len = match &body {
            ObjectBody::Bytes(b) => b.len() as u64,
            ObjectBody::Stream { len, .. } => *len,
        };
        let d = dir.clone();
        let id = upload_id.to_string();
        let (file, offset) = blocking(move || {
            if !d.join("key").exists() {
                return Err(StorageError::UploadGone { upload_id: id });
            }
            let part_size = d.join(PART_SIZE);
            let offset = if number == 1 {
                std::fs::write(&part_size, len.to_string()).map_err(|e| io_error(&part_size, e))?;
                0
            } else {
                let size = read_part_size(&d)
                    .ok_or_else(|| invalid_part(number, "part 1 was not uploaded first"))?;
                if len > size {
                    return Err(invalid_part(number, "larger than part 1"));
                }
                (number as u64 - 1) * size
            };
            let data = d.join(DATA);
            let file = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .open(&data)
                .map_err(|e| io_error(&data, e))?;
            Ok((file, offset))
        })
        .await?;
        let data = dir.join(DATA);
        match write_at(file, &data, offset, body).await {
            Ok(file) => {
                // Start the part's writeback now: completion's sync then has little left.
                // Only a hint: an error here changes nothing the sync does not repeat.
                // SAFETY: a plain syscall on a file descriptor we own.
                unsafe {
                    libc::sync_file_range(
                        std::os::fd::AsRawFd::as_raw_fd(&file),
                        offset as libc::off64_t,
                        len as libc::off64_t,
                        libc::SYNC_FILE_RANGE_WRITE,
                    );
                }
                Ok(format!("\"{len}\""))
            }
            Err(e) => Err(gone_if_missing(e, &dir, upload_id)),
        }
    }

    /// Makes the parts the object: checks them against the layout, syncs the data file and
    /// renames it onto the object's key. Done again after a crash, it succeeds: the data is
    /// still there, or the object already is, with the parts' total size.
    pub async fn complete_multipart(
        &self,
        key: &str,
        upload_id: &str,
        parts: &[(u32, String)],
    ) -> Result<(), StorageError> {
        let path = self.object_path(key)?;
        let dir = self.upload_dir(upload_id)?;
        let mut sizes = Vec::with_capacity(parts.len());
        for (number, etag) in parts {
            let size = etag
                .trim_matches('"')
                .parse::<u64>()
                .map_err(|_| invalid_part(*number, "an ETag the local store did not give"))?;
            sizes.push((*number, size));
        }
        let upload_id = upload_id.to_string();
        blocking(move || assemble(&dir, &path, &sizes, &upload_id)).await
    }

    /// Removes the upload and its parts; an upload already gone counts as success.
    pub async fn abort_multipart(&self, upload_id: &str) -> Result<(), StorageError> {
        let Ok(dir) = self.upload_dir(upload_id) else {
            return Ok(()); // never one of this store's
        };
        blocking(move || match std::fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_error(&dir, e)),
        })
        .await
    }

    /// Uploads whose key starts with `prefix`, ordered by (key, id), after `next`.
    pub async fn list_multipart_uploads(
        &self,
        prefix: &str,
        next: Option<&(String, String)>,
    ) -> Result<MultipartPage, StorageError> {
        let uploads = self.root.join(UPLOADS);
        let prefix = prefix.to_string();
        let next = next.cloned();
        blocking(move || {
            let mut all = Vec::new();
            for entry in std::fs::read_dir(&uploads).map_err(|e| io_error(&uploads, e))? {
                let entry = entry.map_err(|e| io_error(&uploads, e))?;
                let Some(id) = entry.file_name().to_str().map(str::to_string) else {
                    continue;
                };
                if !is_upload_id(&id) {
                    continue;
                }
                // An upload being created has no key yet; one just aborted is gone.
                let Ok(key) = std::fs::read_to_string(entry.path().join("key")) else {
                    continue;
                };
                if !key.starts_with(&prefix) {
                    continue;
                }
                let initiated = entry.metadata().ok().and_then(|m| m.modified().ok());
                all.push(MultipartInfo {
                    key,
                    upload_id: id,
                    initiated,
                });
            }
            all.sort_by(|a, b| (&a.key, &a.upload_id).cmp(&(&b.key, &b.upload_id)));
            if let Some((key, id)) = &next {
                all.retain(|u| (&u.key, &u.upload_id) > (key, id));
            }
            let more = all.len() > PAGE;
            all.truncate(PAGE);
            let next = if more {
                all.last().map(|u| (u.key.clone(), u.upload_id.clone()))
            } else {
                None
            };
            Ok(MultipartPage { uploads: all, next })
        })
        .await
    }

    /// Removes the object (a missing one counts as success) and the directories it leaves
    /// empty.
    pub async fn delete_object(&self, key: &str) -> Result<(), StorageError> {
        let path = self.object_path(key)?;
        let bucket_dir = self.bucket_dir.clone();
        blocking(move || {
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(io_error(&path, e)),
            }
            let mut dir = path.parent();
            while let Some(d) = dir.filter(|d| *d != bucket_dir) {
                // Fails, as it should, on a directory that still holds something.
                if std::fs::remove_dir(d).is_err() {
                    break;
                }
                dir = d.parent();
            }
            Ok(())
        })
        .await
    }

    /// Opens `key` for a blob GET, honouring a single `Range` (`bytes=a-b`, `a-`, `-n`); any
    /// other range header is ignored, as S3 does. Answers 404 or 416 as a status, like S3.
    pub async fn read(
        &self,
        key: &str,
        range: Option<&HeaderValue>,
    ) -> Result<FileStream, StorageError> {
        let path = self.object_path(key)?;
        let range = range.and_then(|r| r.to_str().ok()).map(str::to_string);
        blocking(move || {
            let file = match File::open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Ok(FileStream::status(404))
                }
                Err(e) => return Err(io_error(&path, e)),
            };
            let meta = file.metadata().map_err(|e| io_error(&path, e))?;
            let size = meta.len();
            let mut headers = HeaderMap::new();
            headers.insert(
                http::header::ACCEPT_RANGES,
                HeaderValue::from_static("bytes"),
            );
            if let Ok(modified) = meta.modified() {
                if let Ok(v) = HeaderValue::from_str(&httpdate::fmt_http_date(modified)) {
                    headers.insert(http::header::LAST_MODIFIED, v);
                }
            }
            let (status, start, end) = match range.as_deref().map(|r| parse_range(r, size)) {
                None | Some(Range::Ignored) => (200, 0, size),
                Some(Range::Unsatisfiable) => {
                    headers.insert(
                        http::header::CONTENT_RANGE,
                        header_value(format!("bytes */{size}")),
                    );
                    let mut unsatisfiable = FileStream::status(416);
                    unsatisfiable.headers = headers;
                    return Ok(unsatisfiable);
                }
                Some(Range::Bytes(start, end)) => {
                    headers.insert(
                        http::header::CONTENT_RANGE,
                        header_value(format!("bytes {start}-{}/{size}", end - 1)),
                    );
                    (206, start, end)
                }
            };
            headers.insert(http::header::CONTENT_LENGTH, header_value(end - start));
            Ok(FileStream {
                status,
                headers,
                file: Some(Arc::new(file)),
                pos: start,
                end,
                next: None,
            })
        })
        .await
    }
}

/// An object being read for a blob GET: the next read runs while the chunk before it is
/// sent.
pub struct FileStream {
    status: u16,
    headers: HeaderMap,
    file: Option<Arc<File>>,
    /// Where the next read starts, and the end of the range.
    pos: u64,
    end: u64,
    next: Option<tokio::task::JoinHandle<Result<Bytes, StorageError>>>,
}

impl FileStream {
    fn status(status: u16) -> FileStream {
        FileStream {
            status,
            headers: HeaderMap::new(),
            file: None,
            pos: 0,
            end: 0,
            next: None,
        }
    }

    pub fn status_code(&self) -> u16 {
        self.status
    }

    pub fn headers(&self) -> &HeaderMap {
        &self.headers
    }

    /// The next read, up to [`READ_CHUNK`] bytes; None at the end. A file that became
    /// shorter than it was when opened is an error, never a short body passed off as whole.
    pub async fn chunk(&mut self) -> Result<Option<Bytes>, StorageError> {
        let Some(read) = self.next.take().or_else(|| self.start_read()) else {
            return Ok(None);
        };
        let chunk = read.await.unwrap_or_else(|e| {
            Err(StorageError::Failed {
                status: 0,
                code: "ReadError".into(),
                message: format!("file read task failed: {e}"),
            })
        })?;
        self.next = self.start_read();
        Ok(Some(chunk))
    }

    fn start_read(&mut self) -> Option<tokio::task::JoinHandle<Result<Bytes, StorageError>>> {
        let file = self.file.clone()?;
        if self.pos >= self.end {
            return None;
        }
        let want = (self.end - self.pos).min(READ_CHUNK as u64) as usize;
        let pos = self.pos;
        self.pos += want as u64;
        Some(tokio::task::spawn_blocking(move || {
            read_chunk(&file, pos, want)
        }))
    }
}

impl Drop for FileStream {
    fn drop(&mut self) {
        if let Some(read) = self.next.take() {
            read.abort();
        }
    }
}

/// The file's bytes `[pos, pos + want)` as a chunk: a memory map of them, its pages read in
/// here (on the blocking pool) so that sending it never waits for the disk. The socket write
/// copies from the page cache: no copy into a buffer of ours, no buffer to zero. Each chunk
/// maps only itself and unmaps when sent, so a GET holds a chunk or two, whatever the blob's
/// size. Objects are never written in place (they arrive by rename, leave by unlink), so a
/// mapped file does not shrink under the map.
fn read_chunk(file: &File, pos: u64, want: usize) -> Result<Bytes, StorageError> {
    let failed = |message: String| StorageError::Failed {
        status: 0,
        code: "ReadError".into(),
        message,
    };
    let size = file.metadata().map_err(|e| failed(e.to_string()))?.len();
    if pos + want as u64 > size {
        return Err(failed("the object's file ended early".into()));
    }
    // SAFETY: the map is read only and the file is not written or truncated while berth
    // serves it (see above); the bytes are only read. (memmap2 aligns the offset itself.)
    let map = unsafe {
        memmap2::MmapOptions::new()
            .offset(pos)
            .len(want)
            .populate()
            .map(file)
    }
    .map_err(|e| failed(e.to_string()))?;
    Ok(Bytes::from_owner(map))
}

#[derive(Debug, PartialEq, Eq)]
enum Range {
    /// `[start, end)`.
    Bytes(u64, u64),
    Unsatisfiable,
    /// Not one byte range: the whole object is sent.
    Ignored,
}

fn parse_range(header: &str, size: u64) -> Range {
    let Some(spec) = header.trim().strip_prefix("bytes=") else {
        return Range::Ignored;
    };
    if spec.contains(',') {
        return Range::Ignored;
    }
    let Some((first, last)) = spec.trim().split_once('-') else {
        return Range::Ignored;
    };
    let (first, last) = (first.trim(), last.trim());
    if first.is_empty() {
        // The last n bytes.
        return match last.parse::<u64>() {
            Ok(n) if n > 0 && size > 0 => Range::Bytes(size.saturating_sub(n), size),
            Ok(_) => Range::Unsatisfiable,
            Err(_) => Range::Ignored,
        };
    }
    let Ok(start) = first.parse::<u64>() else {
        return Range::Ignored;
    };
    let end = if last.is_empty() {
        size
    } else {
        match last.parse::<u64>() {
            Ok(l) if l < start => return Range::Ignored,
            Ok(l) => (l + 1).min(size),
            Err(_) => return Range::Ignored,
        }
    };
    if start >= size {
        return Range::Unsatisfiable;
    }
    Range::Bytes(start, end)
}

/// At start, before the store serves: removes what interrupted writes left (`.tmp`), the
/// uploads no session names (`live`), and the state files of berth 0.1's s3s-fs store
/// (files directly under `root`: none of the local store's are there). Returns how many
/// entries it removed.
pub fn sweep(root: &Path, live: &HashSet<String>) -> std::io::Result<usize> {
    if !root.exists() {
        return Ok(0);
    }
    let mut n = 0;
    for entry in std::fs::read_dir(root)? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            remove(&entry.path(), &mut n)?;
        }
    }
    for (dir, doomed) in [(root.join(TMP), None), (root.join(UPLOADS), Some(live))] {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name();
            let keep = doomed.is_some_and(|live| name.to_str().is_some_and(|id| live.contains(id)));
            if keep {
                continue;
            }
            if entry.file_type()?.is_dir() {
                std::fs::remove_dir_all(entry.path())?;
                n += 1;
            } else {
                remove(&entry.path(), &mut n)?;
            }
        }
    }
    Ok(n)
}

fn remove(path: &Path, n: &mut usize) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => *n += 1,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    Ok(())
}

fn is_upload_id(id: &str) -> bool {
    id.len() == 36 && id.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')
}

/// Writes `body` to a new file at `path`: exactly its declared length, or an error (and
/// whatever was written stays for the caller to remove).
async fn write_file(path: &Path, body: ObjectBody) -> Result<(), StorageError> {
    let target = path.to_path_buf();
    let file = blocking(move || File::create(&target).map_err(|e| io_error(&target, e))).await?;
    write_at(file, path, 0, body).await.map(drop)
}

/// Writes `body` into `file` from `offset` on: exactly its declared length, or an error.
/// Returns the file.
async fn write_at(
    file: File,
    path: &Path,
    offset: u64,
    body: ObjectBody,
) -> Result<File, StorageError> {
    let target = path.to_path_buf();
    match body {
        ObjectBody::Bytes(bytes) => {
            blocking(move || {
                file.write_all_at(&bytes, offset)
                    .map_err(|e| io_error(&target, e))?;
                Ok(file)
            })
            .await
        }
        ObjectBody::Stream { len, mut chunks } => {
            let mut file = file;
            let mut written = 0u64;
            let mut batch: Vec<Bytes> = Vec::new();
            let mut batched = 0usize;
            let mut ended = false;
            while !ended {
                match chunks.recv().await {
                    Some(Ok(chunk)) => {
                        if written + (batched + chunk.len()) as u64 > len {
                            return Err(length_error(len, "more"));
                        }
                        batched += chunk.len();
                        batch.push(chunk);
                    }
                    Some(Err(e)) => {
                        return Err(StorageError::Failed {
                            status: 0,
                            code: "IncompleteBody".into(),
                            message: e.to_string(),
                        })
                    }
                    None => ended = true,
                }
                if batched >= WRITE_BATCH || (ended && !batch.is_empty()) {
                    let chunks = std::mem::take(&mut batch);
                    let at = offset + written;
                    written += batched as u64;
                    batched = 0;
                    let t = target.clone();
                    file = blocking(move || {
                        let mut at = at;
                        for c in &chunks {
                            file.write_all_at(c, at).map_err(|e| io_error(&t, e))?;
                            at += c.len() as u64;
                        }
                        Ok(file)
                    })
                    .await?;
                }
            }
            if written != len {
                return Err(length_error(len, "fewer"));
            }
            Ok(file)
        }
    }
}

fn length_error(len: u64, what: &str) -> StorageError {
    StorageError::Failed {
        status: 400,
        code: "IncompleteBody".into(),
        message: format!("the body had {what} bytes than its declared {len}"),
    }
}

/// Syncs a file's bytes to disk.
fn sync_path(path: &Path) -> Result<(), StorageError> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| io_error(path, e))
}

/// Renames `from` onto `to`, making `to`'s directories, and syncs the directory entry.
fn place(from: &Path, to: &Path) -> Result<(), StorageError> {
    let parent = to.parent().expect("object paths have a parent");
    // A concurrent delete may remove an emptied directory between the two steps: try again.
    let mut tries = 0;
    loop {
        std::fs::create_dir_all(parent).map_err(|e| io_error(parent, e))?;
        match std::fs::rename(from, to) {
            Ok(()) => break,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && tries < 3 => tries += 1,
            Err(e) => return Err(io_error(to, e)),
        }
    }
    File::open(parent)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_error(parent, e))
}

fn read_part_size(dir: &Path) -> Option<u64> {
    std::fs::read_to_string(dir.join(PART_SIZE))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// [`LocalStore::complete_multipart`] on the blocking pool.
fn assemble(
    dir: &Path,
    object: &Path,
    parts: &[(u32, u64)],
    upload_id: &str,
) -> Result<(), StorageError> {
    let total: u64 = parts.iter().map(|(_, s)| s).sum();
    let data = dir.join(DATA);
    // Completed before a crash: the object is there (and the directory may be left).
    let done = || std::fs::metadata(object).is_ok_and(|m| m.len() == total);
    if !dir.join("key").exists() || !data.exists() {
        return if done() {
            let _ = std::fs::remove_dir_all(dir);
            Ok(())
        } else {
            Err(StorageError::UploadGone {
                upload_id: upload_id.to_string(),
            })
        };
    }
    let Some(((last, _), rest)) = parts.split_last() else {
        return Err(invalid_part(0, "no parts"));
    };
    let part_size = read_part_size(dir).ok_or_else(|| invalid_part(1, "never uploaded"))?;
    for (i, (number, size)) in rest.iter().enumerate() {
        if *number != i as u32 + 1 || *size != part_size {
            return Err(invalid_part(*number, "not in the upload's layout"));
        }
    }
    if *last != parts.len() as u32 || parts.last().is_some_and(|(_, s)| *s > part_size) {
        return Err(invalid_part(*last, "not in the upload's layout"));
    }
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&data)
        .map_err(|e| io_error(&data, e))?;
    let len = file.metadata().map_err(|e| io_error(&data, e))?.len();
    if len < total {
        return Err(invalid_part(*last, "fewer bytes on disk than uploaded"));
    }
    file.set_len(total).map_err(|e| io_error(&data, e))?;
    file.sync_all().map_err(|e| io_error(&data, e))?;
    drop(file);
    place(&data, object)?;
    std::fs::remove_dir_all(dir).map_err(|e| io_error(dir, e))
}

fn invalid_part(number: u32, why: &str) -> StorageError {
    StorageError::Failed {
        status: 400,
        code: "InvalidPart".into(),
        message: format!("part {number}: {why}"),
    }
}

/// A write that failed because its upload's directory went away is [`StorageError::UploadGone`].
fn gone_if_missing(e: StorageError, dir: &Path, upload_id: &str) -> StorageError {
    if dir.exists() {
        e
    } else {
        StorageError::UploadGone {
            upload_id: upload_id.to_string(),
        }
    }
}

/// The listing of [`LocalStore::list_objects`] on the blocking pool: walks only the
/// directories that can hold keys after `after` under `prefix`.
fn list(bucket_dir: &Path, prefix: &str, after: Option<&str>) -> Result<ListPage, StorageError> {
    // The deepest directory every key with this prefix lies in.
    let base = match prefix.rfind('/') {
        Some(i) => &prefix[..=i],
        None => "",
    };
    let mut found = Vec::new();
    let start = bucket_dir.join(base);
    walk(&start, base, prefix, after, &mut found)?;
    found.sort_by(|a: &ObjectInfo, b| a.key.cmp(&b.key));
    let more = found.len() > PAGE;
    found.truncate(PAGE);
    let next = if more {
        found.last().map(|o| o.key.clone())
    } else {
        None
    };
    Ok(ListPage {
        objects: found,
        next,
    })
}

fn walk(
    dir: &Path,
    dir_key: &str,
    prefix: &str,
    after: Option<&str>,
    found: &mut Vec<ObjectInfo>,
) -> Result<(), StorageError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_error(dir, e)),
    };
    for entry in entries {
        let entry = entry.map_err(|e| io_error(dir, e))?;
        let Some(name) = entry.file_name().to_str().map(str::to_string) else {
            continue;
        };
        let key = format!("{dir_key}{name}");
        let Ok(kind) = entry.file_type() else {
            continue;
        };
        if kind.is_dir() {
            let sub = format!("{key}/");
            // Every key below `sub` starts with it: skip the directory when none can match
            // the prefix or come after `after`.
            let matches = sub.starts_with(prefix) || prefix.starts_with(&sub);
            let passed = after.is_some_and(|a| a > sub.as_str() && !a.starts_with(&sub));
            if matches && !passed {
                walk(&entry.path(), &sub, prefix, after, found)?;
            }
        } else if kind.is_file()
            && key.starts_with(prefix)
            && after.is_none_or(|a| key.as_str() > a)
        {
            let Ok(meta) = entry.metadata() else { continue };
            found.push(ObjectInfo {
                key,
                size: meta.len(),
                last_modified: meta
                    .modified()
                    .map(|t| humantime::format_rfc3339_millis(t).to_string())
                    .unwrap_or_default(),
            });
        }
    }
    Ok(())
}

fn header_value(v: impl ToString) -> HeaderValue {
    HeaderValue::from_str(&v.to_string()).expect("digits are a header value")
}

/// An I/O error of the local store as the object store errors the registry maps: a missing
/// file is S3's 404, a full disk or quota a 503 that clients retry, the rest a failure.
fn io_error(path: &Path, e: std::io::Error) -> StorageError {
    match e.raw_os_error() {
        _ if e.kind() == std::io::ErrorKind::NotFound => StorageError::Failed {
            status: 404,
            code: "NoSuchKey".into(),
            message: format!("{}: {e}", path.display()),
        },
        Some(libc::ENOSPC) | Some(libc::EDQUOT) => StorageError::Unavailable {
            status: 507,
            code: format!("InsufficientStorage ({}: {e})", path.display()),
        },
        _ => StorageError::Failed {
            status: 500,
            code: "IoError".into(),
            message: format!("{}: {e}", path.display()),
        },
    }
}

/// Runs file I/O on the blocking pool.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StorageError> + Send + 'static,
) -> Result<T, StorageError> {
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|e| {
        Err(StorageError::Failed {
            status: 500,
            code: "IoError".into(),
            message: format!("file I/O task failed: {e}"),
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::ObjectStore;

    fn store(dir: &Path) -> ObjectStore {
        let cfg = crate::config::StorageConfig {
            endpoint: None,
            region: "us-east-1".into(),
            bucket: "registry".into(),
            prefix: "p/".into(),
            access_key: String::new(),
            secret_key: String::new(),
            path_style: true,
            blob_serving: crate::config::BlobServing::Proxy,
            presign_ttl: std::time::Duration::from_secs(900),
            ca_bundle: None,
            coalesce_window: 0,
        };
        ObjectStore::local(&dir.join("objects"), &cfg).unwrap()
    }

    fn pattern(len: usize) -> Bytes {
        (0..len).map(|i| (i * 7 % 251) as u8).collect()
    }

    fn stream(data: Bytes, declared: u64) -> ObjectBody {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            for c in data.chunks(100_000) {
                let _ = tx.send(Ok(Bytes::copy_from_slice(c))).await;
            }
        });
        ObjectBody::Stream {
            len: declared,
            chunks: rx,
        }
    }

    async fn read_all(s: &ObjectStore, key: &str, range: Option<&str>) -> (u16, Vec<u8>) {
        let range = range.map(|r| HeaderValue::from_str(r).unwrap());
        let mut st = s.get_stream(key, range.as_ref()).await.unwrap();
        let status = st.status();
        let mut body = Vec::new();
        while let Some(c) = st.chunk().await.unwrap() {
            body.extend_from_slice(&c);
        }
        if status == 200 || status == 206 {
            let len: usize = st.headers()["content-length"]
                .to_str()
                .unwrap()
                .parse()
                .unwrap();
            assert_eq!(len, body.len());
        }
        (status, body)
    }

    fn files_under(dir: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        if let Ok(rd) = std::fs::read_dir(dir) {
            for e in rd.flatten() {
                if e.file_type().unwrap().is_dir() {
                    out.extend(files_under(&e.path()));
                } else {
                    out.push(e.path());
                }
            }
        }
        out
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn put_then_read_whole_and_ranges() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        s.check().await.unwrap();
        let data = pattern(1_300_000);
        s.put_object("p/blobs/a", stream(data.clone(), data.len() as u64))
            .await
            .unwrap();
        s.put_object(
            "p/journal/x/y",
            ObjectBody::Bytes(Bytes::from_static(b"rec")),
        )
        .await
        .unwrap();
        assert_eq!(s.get_object("p/journal/x/y").await.unwrap(), "rec");
        // The object is a plain file at <root>/<bucket>/<key>.
        let file = dir.path().join("objects/registry/p/blobs/a");
        assert_eq!(std::fs::read(file).unwrap(), data);

        let (st, body) = read_all(&s, "p/blobs/a", None).await;
        assert_eq!((st, body.as_slice()), (200, &data[..]));
        let (st, body) = read_all(&s, "p/blobs/a", Some("bytes=10-19")).await;
        assert_eq!((st, body.as_slice()), (206, &data[10..20]));
        let (st, body) = read_all(&s, "p/blobs/a", Some("bytes=1000000-")).await;
        assert_eq!((st, body.as_slice()), (206, &data[1_000_000..]));
        let (st, body) = read_all(&s, "p/blobs/a", Some("bytes=-5")).await;
        assert_eq!((st, body.as_slice()), (206, &data[data.len() - 5..]));
        let (st, body) = read_all(&s, "p/blobs/a", Some("bytes=2000000-")).await;
        assert_eq!((st, body.len()), (416, 0));
        let (st, _) = read_all(&s, "p/blobs/missing", None).await;
        assert_eq!(st, 404);
        match s.get_object("p/missing").await {
            Err(StorageError::Failed { status: 404, .. }) => {}
            other => panic!("{:?}", other.map(|_| ())),
        }
        assert!(s
            .presign(
                &http::Method::GET,
                "p/blobs/a",
                std::time::Duration::from_secs(9)
            )
            .is_none());
        // Keys that would leave the bucket directory are refused.
        for bad in ["../x", "p//x", "/x", "p/./x"] {
            assert!(s
                .put_object(bad, ObjectBody::Bytes(Bytes::new()))
                .await
                .is_err());
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stream_shorter_or_longer_than_declared_stores_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let data = pattern(300_000);
        assert!(s
            .put_object("p/short", stream(data.clone(), 300_001))
            .await
            .is_err());
        assert!(s
            .put_object("p/long", stream(data.clone(), 299_999))
            .await
            .is_err());
        assert_eq!(
            files_under(&dir.path().join("objects")),
            Vec::<PathBuf>::new()
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn multipart_round_trip_retry_and_abort() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let data = pattern(2_500_000);
        let key = "p/blobs/upload-1";
        let id = s.create_multipart(key).await.unwrap();
        let mut parts = Vec::new();
        for (i, c) in data.chunks(1_000_000).enumerate() {
            let n = i as u32 + 1;
            let body = if n == 2 {
                stream(Bytes::copy_from_slice(c), c.len() as u64)
            } else {
                ObjectBody::Bytes(Bytes::copy_from_slice(c))
            };
            parts.push((n, s.upload_part(key, &id, n, body).await.unwrap()));
        }
        // A part uploaded again (a resumed upload) replaces the first copy.
        let again = ObjectBody::Bytes(Bytes::copy_from_slice(&data[1_000_000..2_000_000]));
        parts[1].1 = s.upload_part(key, &id, 2, again).await.unwrap();
        let listed = s.list_multipart_uploads("p/blobs/", None).await.unwrap();
        assert_eq!(listed.uploads.len(), 1);
        assert_eq!(
            (
                listed.uploads[0].key.as_str(),
                listed.uploads[0].upload_id.as_str()
            ),
            (key, id.as_str())
        );
        assert!(s
            .list_multipart_uploads("p/other/", None)
            .await
            .unwrap()
            .uploads
            .is_empty());

        // A wrong size never assembles.
        let mut wrong = parts.clone();
        wrong[0].1 = "\"5\"".into();
        assert!(matches!(
            s.complete_multipart(key, &id, &wrong).await,
            Err(StorageError::Failed { status: 400, .. })
        ));
        s.complete_multipart(key, &id, &parts).await.unwrap();
        let (st, body) = read_all(&s, key, None).await;
        assert_eq!((st, body.as_slice()), (200, &data[..]));
        // Completing again (the client retried after a crash) succeeds: the object is there.
        s.complete_multipart(key, &id, &parts).await.unwrap();
        // A kill between the rename and the directory's removal: the retry finishes the job.
        let upload = dir.path().join("objects/.uploads").join(&id);
        std::fs::create_dir(&upload).unwrap();
        std::fs::write(upload.join("key"), key).unwrap();
        std::fs::write(upload.join(PART_SIZE), "1000000").unwrap();
        s.complete_multipart(key, &id, &parts).await.unwrap();
        assert!(!upload.exists());
        let (st, body) = read_all(&s, key, None).await;
        assert_eq!((st, body.as_slice()), (200, &data[..]));
        assert!(s
            .list_multipart_uploads("", None)
            .await
            .unwrap()
            .uploads
            .is_empty());

        let id2 = s.create_multipart("p/blobs/upload-2").await.unwrap();
        s.upload_part(
            "p/blobs/upload-2",
            &id2,
            1,
            ObjectBody::Bytes(data.slice(..10)),
        )
        .await
        .unwrap();
        // A part larger than part 1 does not fit the layout.
        assert!(matches!(
            s.upload_part(
                "p/blobs/upload-2",
                &id2,
                2,
                ObjectBody::Bytes(data.slice(..11))
            )
            .await,
            Err(StorageError::Failed { status: 400, .. })
        ));
        s.abort_multipart("p/blobs/upload-2", &id2).await.unwrap();
        s.abort_multipart("p/blobs/upload-2", &id2).await.unwrap();
        // Part 1 sets the layout: a part 2 first is refused.
        let id3 = s.create_multipart("p/blobs/upload-3").await.unwrap();
        assert!(matches!(
            s.upload_part(
                "p/blobs/upload-3",
                &id3,
                2,
                ObjectBody::Bytes(data.slice(..10))
            )
            .await,
            Err(StorageError::Failed { status: 400, .. })
        ));
        s.abort_multipart("p/blobs/upload-3", &id3).await.unwrap();
        assert!(matches!(
            s.upload_part(
                "p/blobs/upload-2",
                &id2,
                2,
                ObjectBody::Bytes(data.slice(..10))
            )
            .await,
            Err(StorageError::UploadGone { .. })
        ));
        assert!(matches!(
            s.complete_multipart("p/blobs/upload-2", &id2, &[(1, "\"10\"".into())])
                .await,
            Err(StorageError::UploadGone { .. })
        ));
        assert!(matches!(
            s.complete_multipart("p/blobs/x", "not-an-id", &[]).await,
            Err(StorageError::UploadGone { .. })
        ));
        // Only the finished object is left.
        assert_eq!(
            files_under(&dir.path().join("objects")),
            vec![dir.path().join("objects/registry/p/blobs/upload-1")]
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn listing_is_in_key_order_paged_and_deletes_prune_directories() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let mut keys: Vec<String> = (0..1105).map(|i| format!("p/journal/{i:05}/r")).collect();
        // '-' sorts before '/': a key order, not a directory walk order.
        keys.push("p/journal/00001-b".into());
        keys.push("p/blobs/sha256/ab/lib/x".into());
        for k in &keys {
            s.put_object(k, ObjectBody::Bytes(Bytes::from_static(b"12")))
                .await
                .unwrap();
        }
        let mut got = Vec::new();
        let mut token: Option<String> = None;
        let mut pages = 0;
        loop {
            let page = s
                .list_objects("p/journal/", token.as_deref())
                .await
                .unwrap();
            pages += 1;
            got.extend(page.objects.iter().map(|o| {
                assert_eq!(o.size, 2);
                o.key.clone()
            }));
            match page.next {
                Some(t) => token = Some(t),
                None => break,
            }
        }
        let mut want: Vec<String> = keys
            .iter()
            .filter(|k| k.starts_with("p/journal/"))
            .cloned()
            .collect();
        want.sort();
        assert_eq!(pages, 2);
        assert_eq!(got, want);
        assert_eq!(got[1], "p/journal/00001-b");
        let after = s
            .list_objects_after("p/journal/0110", Some("p/journal/01102/r"), None)
            .await
            .unwrap();
        let after: Vec<&str> = after.objects.iter().map(|o| o.key.as_str()).collect();
        assert_eq!(after, ["p/journal/01103/r", "p/journal/01104/r"]);

        s.delete_object("p/blobs/sha256/ab/lib/x").await.unwrap();
        s.delete_object("p/blobs/sha256/ab/lib/x").await.unwrap();
        assert!(!dir.path().join("objects/registry/p/blobs").exists());
        assert!(dir.path().join("objects/registry").exists());
    }

    #[test]
    fn sweep_keeps_objects_and_live_uploads() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("objects");
        LocalStore::open(&root, "registry").unwrap();
        let live = "0b5f0a4e-6a43-4a8e-9c1e-2f4d1c0a9b7e";
        let dead = "1c6e1b5f-7b54-4b9f-8d2f-3e5e2d1b0c8f";
        for id in [live, dead] {
            std::fs::create_dir(root.join(UPLOADS).join(id)).unwrap();
            std::fs::write(root.join(UPLOADS).join(id).join("1"), b"part").unwrap();
        }
        std::fs::write(root.join(TMP).join("abc"), b"half").unwrap();
        // berth 0.1's s3s-fs state beside the bucket.
        std::fs::write(root.join(format!(".upload-{dead}.json")), b"{}").unwrap();
        std::fs::write(root.join("registry/blob"), b"object").unwrap();
        let n = sweep(&root, &HashSet::from([live.to_string()])).unwrap();
        assert_eq!(n, 3);
        assert!(root.join(UPLOADS).join(live).join("1").exists());
        assert!(!root.join(UPLOADS).join(dead).exists());
        assert!(root.join("registry/blob").exists());
        assert_eq!(std::fs::read_dir(root.join(TMP)).unwrap().count(), 0);
    }

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-0", 10), Range::Bytes(0, 1));
        assert_eq!(parse_range("bytes=5-", 10), Range::Bytes(5, 10));
        assert_eq!(parse_range("bytes=5-100", 10), Range::Bytes(5, 10));
        assert_eq!(parse_range("bytes=-3", 10), Range::Bytes(7, 10));
        assert_eq!(parse_range("bytes=-30", 10), Range::Bytes(0, 10));
        assert_eq!(parse_range("bytes=10-", 10), Range::Unsatisfiable);
        assert_eq!(parse_range("bytes=-0", 10), Range::Unsatisfiable);
        assert_eq!(parse_range("bytes=0-", 0), Range::Unsatisfiable);
        assert_eq!(parse_range("bytes=4-2", 10), Range::Ignored);
        assert_eq!(parse_range("bytes=0-1,4-5", 10), Range::Ignored);
        assert_eq!(parse_range("items=0-1", 10), Range::Ignored);
    }
}
