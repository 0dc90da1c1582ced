//! One access-log line per request on stdout: plain text by default, JSON lines by config.
//! The path is the client's (with its query: digest, mount, pagination); presigned upstream
//! URLs and credentials never appear.
//!
//! Lines are formatted into a shared buffer and written by a flusher thread: every
//! [`FLUSH_EVERY`], or sooner once [`FLUSH_AT`] bytes are waiting. A `write(2)` per request
//! cost a fifth of berth's small-request throughput; batching makes it one per many lines. A
//! request never waits on stdout: if stdout stalls and [`MAX_BUFFERED`] bytes pile up, new
//! lines are dropped and counted in `berth_access_log_dropped_lines_total`. [`AccessLog::flush`]
//! writes what is left when the server stops.

use std::fmt;
use std::io::Write;
use std::mem::ManuallyDrop;
use std::net::SocketAddr;
use std::os::fd::FromRawFd;
use std::sync::{Arc, Condvar, LazyLock, Mutex};
use std::time::{Duration, SystemTime};

use prometheus::IntCounter;
use serde::Serialize;

use crate::config::LogFormat;

/// Longest a line waits in the buffer.
const FLUSH_EVERY: Duration = Duration::from_millis(100);
/// Buffered bytes that wake the flusher early.
const FLUSH_AT: usize = 64 * 1024;
/// Buffered bytes past which lines are dropped (stdout is not keeping up).
const MAX_BUFFERED: usize = 8 * 1024 * 1024;

static DROPPED: LazyLock<IntCounter> = LazyLock::new(|| {
    let c = IntCounter::new(
        "berth_access_log_dropped_lines_total",
        "Access-log lines dropped because stdout did not keep up.",
    )
    .expect("metric");
    crate::metrics::REGISTRY
        .register(Box::new(c.clone()))
        .expect("register berth_access_log_dropped_lines_total");
    c
});

#[derive(Serialize)]
pub struct Entry<'a> {
    #[serde(serialize_with = "rfc3339")]
    pub time: SystemTime,
    pub client: Option<SocketAddr>,
    pub method: &'a str,
    pub path: &'a str,
    pub status: u16,
    pub bytes_in: usize,
    pub bytes_out: usize,
    #[serde(rename = "duration_seconds", serialize_with = "seconds")]
    pub duration: Duration,
    pub route: &'a str,
    /// The authenticated user, if any.
    pub user: Option<&'a str>,
    /// Why the request failed, if it did (pingora's error, never a credential).
    pub error: Option<&'a str>,
}

fn rfc3339<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_rfc3339_millis(*t))
}

fn seconds<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

/// `-` for a missing value, without allocating.
struct OrDash<T>(Option<T>);

impl<T: fmt::Display> fmt::Display for OrDash<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Some(v) => v.fmt(f),
            None => f.write_str("-"),
        }
    }
}

/// The access log: cheap to clone, all clones share one buffer and flusher.
#[derive(Clone)]
pub struct AccessLog {
    inner: Option<(LogFormat, Arc<Buffer>)>,
}

struct Buffer {
    lines: Mutex<Vec<u8>>,
    /// Wakes the flusher early when [`FLUSH_AT`] bytes are waiting.
    full: Condvar,
}

impl AccessLog {
    /// `format` None: no access log. Otherwise starts the flusher thread.
    pub fn new(format: Option<LogFormat>) -> Self {
        let Some(format) = format else {
            return AccessLog { inner: None };
        };
        let log = AccessLog::unflushed(format, Vec::with_capacity(FLUSH_AT * 2));
        let (_, buffer) = log.inner.clone().expect("just built");
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || buffer.run())
            .expect("spawn access-log thread");
        log
    }

    /// The log without its flusher thread, holding `lines` already.
    fn unflushed(format: LogFormat, lines: Vec<u8>) -> Self {
        LazyLock::force(&DROPPED);
        AccessLog {
            inner: Some((
                format,
                Arc::new(Buffer {
                    lines: Mutex::new(lines),
                    full: Condvar::new(),
                }),
            )),
        }
    }

    pub fn write(&self, e: &Entry<'_>) {
        let Some((format, buffer)) = &self.inner else {
            return;
        };
        let mut lines = buffer.lines.lock().unwrap_or_else(|p| p.into_inner());
        if lines.len() >= MAX_BUFFERED {
            DROPPED.inc();
            return;
        }
        let start = lines.len();
        let written = match format {
            LogFormat::Json => serde_json::to_writer(&mut *lines, e)
                .map_err(std::io::Error::from)
                .and_then(|_| lines.write_all(b"\n")),
            LogFormat::Text => writeln!(
                lines,
                "{} {} \"{} {}\" {} in={} out={} {:.6}s route={} user={}{}{}",
                humantime::format_rfc3339_millis(e.time),
                OrDash(e.client),
                e.method,
                e.path,
                e.status,
                e.bytes_in,
                e.bytes_out,
                e.duration.as_secs_f64(),
                e.route,
                OrDash(e.user),
                if e.error.is_some() { " error=" } else { "" },
                e.error.unwrap_or(""),
            ),
        };
        if written.is_err() {
            // Never leave half a line behind.
            lines.truncate(start);
        }
        if lines.len() >= FLUSH_AT {
            buffer.full.notify_one();
        }
    }

    /// Writes every buffered line now (at shutdown).
    pub fn flush(&self) {
        if let Some((_, buffer)) = &self.inner {
            let mut spare = Vec::new();
            buffer.swap_and_write(&mut spare);
        }
    }
}

impl Buffer {
    fn run(&self) {
        let mut spare = Vec::with_capacity(FLUSH_AT * 2);
        loop {
            {
                let lines = self.lines.lock().unwrap_or_else(|p| p.into_inner());
                if lines.len() < FLUSH_AT {
                    drop(
                        self.full
                            .wait_timeout(lines, FLUSH_EVERY)
                            .unwrap_or_else(|p| p.into_inner()),
                    );
                }
            }
            self.swap_and_write(&mut spare);
        }
    }

    /// Takes the buffered lines (leaving `spare`'s allocation in their place) and writes them
    /// to stdout outside the lock.
    fn swap_and_write(&self, spare: &mut Vec<u8>) {
        {
            let mut lines = self.lines.lock().unwrap_or_else(|p| p.into_inner());
            if lines.is_empty() {
                return;
            }
            std::mem::swap(&mut *lines, spare);
        }
        // fd 1 directly: std's stdout would add a line-buffering pass and a lock of its own.
        // SAFETY: fd 1 stays open for the life of the process; ManuallyDrop never closes it.
        let mut stdout = ManuallyDrop::new(unsafe { std::fs::File::from_raw_fd(1) });
        // A full or closed stdout must not stop the server: the lines are lost.
        let _ = stdout.write_all(spare);
        spare.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry<'a>(user: Option<&'a str>, error: Option<&'a str>) -> Entry<'a> {
        Entry {
            time: SystemTime::UNIX_EPOCH,
            client: Some("127.0.0.1:5000".parse().unwrap()),
            method: "GET",
            path: "/v2/a/manifests/latest",
            status: 200,
            bytes_in: 0,
            bytes_out: 42,
            duration: Duration::from_micros(1500),
            route: "/v2/{name}/manifests/{reference}",
            user,
            error,
        }
    }

    fn buffered(log: &AccessLog) -> String {
        let (_, b) = log.inner.as_ref().unwrap();
        String::from_utf8(b.lines.lock().unwrap().clone()).unwrap()
    }

    #[test]
    fn text_lines() {
        let log = AccessLog::unflushed(LogFormat::Text, Vec::new());
        log.write(&entry(None, None));
        log.write(&entry(Some("alice"), Some("boom")));
        assert_eq!(
            buffered(&log),
            "1970-01-01T00:00:00.000Z 127.0.0.1:5000 \"GET /v2/a/manifests/latest\" 200 in=0 \
             out=42 0.001500s route=/v2/{name}/manifests/{reference} user=-\n\
             1970-01-01T00:00:00.000Z 127.0.0.1:5000 \"GET /v2/a/manifests/latest\" 200 in=0 \
             out=42 0.001500s route=/v2/{name}/manifests/{reference} user=alice error=boom\n"
        );
    }

    #[test]
    fn json_lines() {
        let log = AccessLog::unflushed(LogFormat::Json, Vec::new());
        log.write(&entry(None, None));
        let text = buffered(&log);
        assert_eq!(text.lines().count(), 1);
        let v: serde_json::Value = serde_json::from_str(text.trim_end()).unwrap();
        assert_eq!(v["status"], 200);
        assert_eq!(v["client"], "127.0.0.1:5000");
        assert_eq!(v["duration_seconds"], 0.0015);
        assert_eq!(v["user"], serde_json::Value::Null);
    }

    #[test]
    fn flush_empties_the_buffer() {
        let log = AccessLog::unflushed(LogFormat::Text, Vec::new());
        log.write(&entry(None, None));
        log.flush();
        assert_eq!(buffered(&log), "");
    }

    #[test]
    fn no_format_no_log() {
        let log = AccessLog::new(None);
        log.write(&entry(None, None));
        log.flush();
        assert!(log.inner.is_none());
    }

    #[test]
    fn lines_past_the_cap_are_dropped_and_counted() {
        // stdout stalled: the buffer is at the cap.
        let log = AccessLog::unflushed(LogFormat::Text, vec![b'x'; MAX_BUFFERED]);
        let before = DROPPED.get();
        log.write(&entry(None, None));
        assert_eq!(DROPPED.get(), before + 1);
        assert_eq!(buffered(&log).len(), MAX_BUFFERED);
    }
}
