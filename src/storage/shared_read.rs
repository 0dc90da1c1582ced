//! Coalesced reads: concurrent GETs of the same whole object share one object-store GET.
//!
//! A rollout pulls one new layer on a hundred nodes in the same second; without this, each
//! is a GetObject that the bucket bills and throttles. The first reader of a key opens the
//! object; readers that arrive while the read still holds the object's first byte join it.
//! There is no background task: whichever reader needs a chunk nobody has read yet reads it
//! from the object store (so the fastest client sets the pace), and a chunk stays in memory
//! until every reader has passed it. The fastest reader may run at most `window` bytes ahead
//! of the slowest; when it would run further, it waits for the slowest a moment
//! ([`LAG_GRACE`]: clients on one machine or network jitter past each other), then cuts the
//! slowest loose to read the rest on its own (a ranged GET from where it is). So a stalled
//! client holds the others back for that moment at most, and memory stays within `window`
//! per object read however many clients share it.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::Notify;

use super::{ObjectStore, ObjectStream};

/// Longest wait for the next chunk from the object store before the read is abandoned.
const READ_TIMEOUT: Duration = Duration::from_secs(60);

/// The object's first bytes stay in memory this long after the read opens, even when its
/// reader has passed them, so that clients arriving a moment later can still join (the GETs
/// of a rollout arrive over some milliseconds, not at once)...
const JOIN_PERIOD: Duration = Duration::from_millis(25);
/// ...up to this much while one client reads (a lone GET holds little for others that may
/// never come), up to the window once another has joined; each join extends the period.
const LONE_PIN: u64 = 4 * 1024 * 1024;
/// No read keeps its first bytes for joiners longer than this after it opened.
const LONGEST_PIN: Duration = Duration::from_secs(1);
/// How long the readers ahead wait for the slowest when the window is full, before cutting
/// it loose.
const LAG_GRACE: Duration = Duration::from_millis(250);

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
    opened_at: Instant,
    /// Until then (and within its byte limit), the first bytes are kept for joiners.
    pin_until: Instant,
    joins: u64,
    /// Since when a reader ahead has been waiting for the slowest (the window is full).
    full_since: Option<Instant>,
}

impl Default for State {
    fn default() -> Self {
        let now = Instant::now();
        State {
            opened: None,
            chunks: VecDeque::new(),
            base: 0,
            head: 0,
            readers: HashMap::new(),
            next_id: 0,
            end: None,
            opened_at: now,
            pin_until: now + JOIN_PERIOD,
            joins: 0,
            full_since: None,
        }
    }
}

impl State {
    /// A joiner starts at the first byte: only while that is kept, and within the window or
    /// while the readers wait for joiners.
    fn joinable(&self, window: u64) -> bool {
        self.base == 0
            && (self.head < window || self.holding_for_joiners(window))
            && !matches!(self.opened, Some(Err(_)))
            && !matches!(self.end, Some(Err(_)))
    }

    fn slowest(&self) -> Option<u64> {
        self.readers.values().min().copied()
    }

    /// Whether reading another chunk would take the fastest reader past the window.
    fn full(&self, window: u64) -> bool {
        self.slowest()
            .is_some_and(|slowest| self.head - slowest >= window)
    }

    /// A client joining the read: the first bytes are kept a while longer for more.
    fn join(&mut self) -> u64 {
        self.joins += 1;
        let until = (Instant::now() + 4 * JOIN_PERIOD).min(self.opened_at + LONGEST_PIN);
        self.pin_until = self.pin_until.max(until);
        self.add_reader()
    }

    /// Whether the readers stop at the window's edge for more joiners: once others have joined
    /// (a burst of GETs is under way), the read does not go past its first window until the
    /// burst has had its moment; so the clients of a rollout share one read instead of
    /// starting a new one each time the last has moved on.
    fn holding_for_joiners(&self, window: u64) -> bool {
        self.joins > 0 && self.base == 0 && self.head >= window && Instant::now() < self.pin_until
    }

    /// Whether the object's first bytes are still kept for joiners.
    fn pinned(&self) -> bool {
        // Once others have joined, reading stops at the window's edge while pinned.
        self.base == 0
            && (self.joins > 0 || self.head <= LONE_PIN)
            && Instant::now() < self.pin_until
    }

    fn add_reader(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.readers.insert(id, 0);
        id
    }

    /// Cuts the slowest readers loose: they read the rest on their own.
    fn cut_slowest(&mut self) {
        if let Some(slowest) = self.slowest() {
            self.readers.retain(|_, pos| *pos != slowest);
        }
        self.full_since = None;
    }

    /// Drops the chunks every reader has passed (unless kept for joiners).
    fn settle(&mut self) {
        let keep_from = if self.pinned() {
            0
        } else {
            self.slowest().unwrap_or(self.head)
        };
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
                if !st.joinable(self.window) {
                    return None;
                }
                let id = st.join();
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

/// What a reader does next, decided under the state lock.
enum Step {
    /// Fetch the chunk at this offset (the head) from the object store.
    Pull(u64),
    /// The window is full: wait for the slowest reader until then.
    WaitUntil(Instant),
    Again,
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
            // Decided under the lock, awaited after it (a std guard must not live across an await).
            let step = {
                let mut st = self.shared.state.lock().expect("shared read lock");
                if !st.readers.contains_key(&self.id) {
                    return Next::Behind(self.pos);
                }
                if self.pos < st.head {
                    // From the head back: readers are mostly near it, so this is a step or
                    // two, not a walk over the whole window per chunk.
                    let mut end = st.head;
                    let mut found = None;
                    for chunk in st.chunks.iter().rev() {
                        let start = end - chunk.len() as u64;
                        if self.pos >= start {
                            found = Some(chunk.slice((self.pos - start) as usize..));
                            break;
                        }
                        end = start;
                    }
                    let Some(chunk) = found else {
                        // Cannot happen: chunks a reader has not passed are kept.
                        st.readers.remove(&self.id);
                        return Next::Behind(self.pos);
                    };
                    self.pos += chunk.len() as u64;
                    st.readers.insert(self.id, self.pos);
                    st.settle();
                    if st.full_since.is_some() {
                        // A reader ahead waits for the slowest: this may have been it.
                        drop(st);
                        self.shared.changed.notify_waiters();
                    }
                    return Next::Chunk(chunk);
                }
                match &st.end {
                    Some(Ok(())) => return Next::End,
                    Some(Err(e)) => return Next::Failed(e.clone()),
                    None => {}
                }
                if st.holding_for_joiners(self.window) {
                    Step::WaitUntil(st.pin_until)
                } else if st.full(self.window) {
                    // Wait for the slowest a moment, then cut it loose.
                    let since = *st.full_since.get_or_insert_with(Instant::now);
                    if since.elapsed() < LAG_GRACE {
                        Step::WaitUntil(since + LAG_GRACE)
                    } else {
                        st.cut_slowest();
                        st.settle();
                        Step::Again
                    }
                } else {
                    st.full_since = None;
                    Step::Pull(st.head)
                }
            };
            let head = match step {
                Step::Pull(head) => head,
                Step::Again => continue,
                Step::WaitUntil(deadline) => {
                    tokio::select! {
                        _ = &mut notified => {}
                        _ = tokio::time::sleep_until(tokio::time::Instant::from_std(deadline)) => {}
                    }
                    continue;
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
                        st.settle();
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
            st.settle();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(readers: &[u64], chunks: &[usize]) -> State {
        let mut st = State {
            pin_until: Instant::now(), // no pin: see the pin's own test
            ..State::default()
        };
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
        st.settle();
        assert_eq!((st.base, st.chunks.len()), (0, 3));
        let mut st = state(&[5, 10], &[5, 5, 5]);
        st.settle();
        assert_eq!((st.base, st.chunks.len()), (5, 2));
    }

    #[test]
    fn the_window_fills_then_the_slowest_is_cut_loose() {
        let mut st = state(&[0, 12], &[4, 4, 4, 4]);
        assert!(st.full(16));
        assert!(!st.full(17));
        st.cut_slowest();
        st.settle();
        // The reader at 0 is out; the one at 12 keeps the last chunk.
        assert_eq!(st.readers.values().copied().collect::<Vec<_>>(), vec![12]);
        assert_eq!((st.base, st.chunks.len()), (12, 1));
        assert!(!st.full(16));
        assert!(!st.joinable(16));
    }

    #[test]
    fn first_bytes_kept_for_joiners_a_moment_and_within_limits() {
        let pinned = |readers: &[u64], chunks: &[usize], joins: u64| {
            let mut st = state(readers, chunks);
            st.pin_until = Instant::now() + Duration::from_secs(60);
            st.joins = joins;
            st.settle();
            st.base
        };
        // A lone reader past the first chunk: kept while within LONE_PIN.
        assert_eq!(pinned(&[10], &[5, 5], 0), 0);
        // Past LONE_PIN alone: dropped; with a joiner, kept up to the window.
        let big = LONE_PIN as usize;
        assert_eq!(pinned(&[big as u64], &[big, 5], 0), big as u64);
        let mut st = state(&[big as u64 + 5, big as u64 + 5], &[big, 5]);
        st.pin_until = Instant::now() + Duration::from_secs(60);
        st.joins = 1;
        st.settle();
        assert_eq!(st.base, 0);
        // Once the period is over, passed chunks go.
        assert_eq!(pinned(&[10], &[5, 5], 0), 0);
        let mut st = state(&[10], &[5, 5]);
        st.settle();
        assert_eq!(st.base, 10);
    }

    #[test]
    fn joinable_only_while_the_first_byte_is_held() {
        let st = state(&[0], &[4]);
        assert!(st.joinable(100));
        assert!(!st.joinable(4)); // the first byte is there, but a joiner would be past the window
        let mut st = state(&[4], &[4, 4]);
        st.settle();
        assert!(!st.joinable(100));
    }
}
