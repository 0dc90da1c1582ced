//! Coalesced reads: concurrent GETs of the same whole object share one object-store GET.
//!
//! A rollout pulls one new layer on a hundred nodes in the same second; without this, each
//! is a GetObject that the bucket bills and throttles. The first reader of a key opens the
//! object; readers that arrive while the read still holds the object's first byte join it.
//! There is no background task: whichever reader needs a chunk nobody has read yet reads it
//! from the object store (so the fastest client sets the pace), and a chunk stays in memory
//! until every reader has passed it. A reader more than `window` bytes behind the fastest is
//! cut loose and reads the rest on its own (a ranged GET from where it is): a slow client
//! never holds the others back, and memory stays within `window` per object read however
//! many clients share it.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::Notify;

use super::{ObjectStore, ObjectStream};

/// Longest wait for the next chunk from the object store before the read is abandoned.
const READ_TIMEOUT: Duration = Duration::from_secs(60);

/// The reads in flight, by object key.
#[derive(Default)]
pub struct SharedReads {
    window: u64,
    open: Mutex<HashMap<String, Weak<Shared>>>,
}

/// Why a shared read could not start: what the object store answered, or how it failed.
#[derive(Debug, Clone)]
pub enum OpenError {
    Status(u16),
    Failed(String),
}

/// What [`SharedReader::next`] gives.
pub enum Next {
    Chunk(Bytes),
    End,
    /// The object store failed mid-read.
    Failed(String),
    /// Cut loose at this offset: read the rest with a GET of its own.
    Behind(u64),
}

struct Shared {
    state: Mutex<State>,
    /// Woken when the read opens, gains a chunk or ends.
    changed: Notify,
    /// The object being read; held by the reader that is fetching the next chunk.
    stream: tokio::sync::Mutex<Option<ObjectStream>>,
}

#[derive(Default)]
struct State {
    /// None until the object store has answered.
    opened: Option<Result<Option<http::HeaderValue>, OpenError>>,
    /// Bytes `base..head` of the object, in the order read.
    chunks: VecDeque<Bytes>,
    base: u64,
    head: u64,
    /// Reader id -> offset it has consumed up to.
    readers: HashMap<u64, u64>,
    next_id: u64,
    /// Set when the object store's body ended or failed.
    end: Option<Result<(), String>>,
}

impl State {
    fn joinable(&self) -> bool {
        self.base == 0 && !matches!(self.opened, Some(Err(_))) && !matches!(self.end, Some(Err(_)))
    }

    fn add_reader(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.readers.insert(id, 0);
        id
    }

    /// Cuts loose the readers more than `window` behind the head, then drops the chunks
    /// every remaining reader has passed.
    fn settle(&mut self, window: u64) {
        while let Some(&slowest) = self.readers.values().min() {
            if self.head - slowest <= window {
                break;
            }
            self.readers.retain(|_, pos| *pos != slowest);
        }
        let keep_from = self.readers.values().min().copied().unwrap_or(self.head);
        while let Some(front) = self.chunks.front() {
            let end = self.base + front.len() as u64;
            if end > keep_from {
                break;
            }
            self.base = end;
            self.chunks.pop_front();
        }
    }
}

impl SharedReads {
    /// `window`: bytes a reader may fall behind the fastest one; 0 turns coalescing off.
    pub fn new(window: u64) -> Self {
        SharedReads {
            window,
            open: Mutex::default(),
        }
    }

    pub fn enabled(&self) -> bool {
        self.window > 0
    }

    /// A reader of the whole object at `key`, from its first byte: joins the read in flight
    /// when it still holds that byte, else starts one. Returns the object's Last-Modified.
    pub async fn open(
        &self,
        store: &ObjectStore,
        key: &str,
    ) -> Result<(SharedReader, Option<http::HeaderValue>), OpenError> {
        let (shared, id, leader) = {
            let mut open = self.open.lock().expect("shared reads lock");
            let joined = open.get(key).and_then(Weak::upgrade).and_then(|shared| {
                let mut st = shared.state.lock().expect("shared read lock");
                if !st.joinable() {
                    return None;
                }
                let id = st.add_reader();
                drop(st);
                Some((shared, id))
            });
            match joined {
                Some((shared, id)) => (shared, id, false),
                None => {
                    open.retain(|_, w| w.strong_count() > 0);
                    let shared = Arc::new(Shared {
                        state: Mutex::default(),
                        changed: Notify::new(),
                        stream: tokio::sync::Mutex::new(None),
                    });
                    let id = shared.state.lock().expect("shared read lock").add_reader();
                    open.insert(key.to_string(), Arc::downgrade(&shared));
                    (shared, id, true)
                }
            }
        };
        let reader = SharedReader {
            shared,
            id,
            pos: 0,
            window: self.window,
        };
        if leader {
            reader.open_object(store, key).await;
        } else {
            crate::metrics::BLOBS.coalesced.inc();
        }
        let opened = reader.opened().await;
        if opened.is_err() {
            // A failed open is not shared with later GETs: they try again.
            let mut open = self.open.lock().expect("shared reads lock");
            if open
                .get(key)
                .is_some_and(|w| std::ptr::eq(w.as_ptr(), Arc::as_ptr(&reader.shared)))
            {
                open.remove(key);
            }
        }
        opened.map(|last_modified| (reader, last_modified))
    }
}

/// One client's place in a shared read. Dropping it lets the read forget it.
pub struct SharedReader {
    shared: Arc<Shared>,
    id: u64,
    pos: u64,
    window: u64,
}

impl SharedReader {
    async fn open_object(&self, store: &ObjectStore, key: &str) {
        // Held while opening: joiners wait for the answer instead of reading.
        let mut stream = self.shared.stream.lock().await;
        let opened = match store.get_stream(key, None).await {
            Ok(object) if object.status() == 200 => {
                let last_modified = object.headers().get(http::header::LAST_MODIFIED).cloned();
                *stream = Some(object);
                Ok(last_modified)
            }
            Ok(object) => Err(OpenError::Status(object.status())),
            Err(e) => Err(OpenError::Failed(e.to_string())),
        };
        self.shared.state.lock().expect("shared read lock").opened = Some(opened);
        drop(stream);
        self.shared.changed.notify_waiters();
    }

    async fn opened(&self) -> Result<Option<http::HeaderValue>, OpenError> {
        loop {
            let notified = self.shared.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(opened) = &self.shared.state.lock().expect("shared read lock").opened {
                return opened.clone();
            }
            notified.await;
        }
    }

    /// The next chunk for this reader.
    pub async fn next(&mut self) -> Next {
        loop {
            let notified = self.shared.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let head = {
                let mut st = self.shared.state.lock().expect("shared read lock");
                if !st.readers.contains_key(&self.id) {
                    return Next::Behind(self.pos);
                }
                if self.pos < st.head {
                    let mut at = st.base;
                    let mut found = None;
                    for chunk in &st.chunks {
                        let end = at + chunk.len() as u64;
                        if self.pos < end {
                            found = Some(chunk.slice((self.pos - at) as usize..));
                            break;
                        }
                        at = end;
                    }
                    let Some(chunk) = found else {
                        // Cannot happen: chunks a reader has not passed are kept.
                        st.readers.remove(&self.id);
                        return Next::Behind(self.pos);
                    };
                    self.pos += chunk.len() as u64;
                    st.readers.insert(self.id, self.pos);
                    st.settle(self.window);
                    return Next::Chunk(chunk);
                }
                match &st.end {
                    Some(Ok(())) => return Next::End,
                    Some(Err(e)) => return Next::Failed(e.clone()),
                    None => st.head,
                }
            };
            // Nobody has this chunk yet: fetch it, unless another reader already is.
            let Ok(mut stream) = self.shared.stream.try_lock() else {
                notified.await;
                continue;
            };
            if self.shared.state.lock().expect("shared read lock").head != head {
                continue; // fetched meanwhile
            }
            let Some(object) = stream.as_mut() else {
                return Next::Failed("the object store read did not open".into());
            };
            let read = tokio::time::timeout(READ_TIMEOUT, object.chunk()).await;
            {
                let mut st = self.shared.state.lock().expect("shared read lock");
                match read {
                    Ok(Ok(Some(chunk))) => {
                        st.head += chunk.len() as u64;
                        st.chunks.push_back(chunk);
                        st.settle(self.window);
                    }
                    Ok(Ok(None)) => st.end = Some(Ok(())),
                    Ok(Err(e)) => st.end = Some(Err(e.to_string())),
                    Err(_) => st.end = Some(Err("no data from the object store for 60 s".into())),
                }
                if st.end.is_some() {
                    *stream = None; // the connection goes back (or away) now
                }
            }
            drop(stream);
            self.shared.changed.notify_waiters();
        }
    }
}

impl Drop for SharedReader {
    fn drop(&mut self) {
        if let Ok(mut st) = self.shared.state.lock() {
            st.readers.remove(&self.id);
            st.settle(self.window);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(readers: &[u64], chunks: &[usize]) -> State {
        let mut st = State::default();
        for &len in chunks {
            st.head += len as u64;
            st.chunks.push_back(Bytes::from(vec![0u8; len]));
        }
        for &pos in readers {
            let id = st.add_reader();
            st.readers.insert(id, pos);
        }
        st
    }

    #[test]
    fn chunks_stay_until_every_reader_passed_them() {
        let mut st = state(&[0, 10], &[5, 5, 5]);
        st.settle(100);
        assert_eq!((st.base, st.chunks.len()), (0, 3));
        let mut st = state(&[5, 10], &[5, 5, 5]);
        st.settle(100);
        assert_eq!((st.base, st.chunks.len()), (5, 2));
    }

    #[test]
    fn a_reader_past_the_window_is_cut_loose() {
        let mut st = state(&[0, 12], &[4, 4, 4, 4]);
        st.settle(10);
        // The reader at 0 is 16 behind the head: cut; the one at 12 keeps the last chunk.
        assert_eq!(st.readers.values().copied().collect::<Vec<_>>(), vec![12]);
        assert_eq!((st.base, st.chunks.len()), (12, 1));
        assert!(!st.joinable());
    }

    #[test]
    fn joinable_only_while_the_first_byte_is_held() {
        let st = state(&[0], &[4]);
        assert!(st.joinable());
        let mut st = state(&[4], &[4, 4]);
        st.settle(100);
        assert!(!st.joinable());
    }
}
