//! One access-log line per request on stdout: plain text by default, JSON lines by config.
//! The path is the client's (with its query: digest, mount, pagination); presigned upstream
//! URLs and credentials never appear.

use std::io::Write;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::config::LogFormat;

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
    /// The authenticated user, once authentication exists.
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

pub struct AccessLog {
    format: Option<LogFormat>,
}

impl AccessLog {
    /// `format` None: no access log.
    pub fn new(format: Option<LogFormat>) -> Self {
        AccessLog { format }
    }

    pub fn write(&self, e: &Entry<'_>) {
        let Some(format) = self.format else {
            return;
        };
        let mut out = std::io::stdout().lock();
        // A full or closed stdout must not fail requests: the line is dropped.
        let _ = match format {
            LogFormat::Json => serde_json::to_writer(&mut out, e)
                .map_err(std::io::Error::from)
                .and_then(|_| out.write_all(b"\n")),
            LogFormat::Text => writeln!(
                out,
                "{} {} \"{} {}\" {} in={} out={} {:.6}s route={} user={}{}{}",
                humantime::format_rfc3339_millis(e.time),
                e.client.map_or_else(|| "-".to_string(), |a| a.to_string()),
                e.method,
                e.path,
                e.status,
                e.bytes_in,
                e.bytes_out,
                e.duration.as_secs_f64(),
                e.route,
                e.user.unwrap_or("-"),
                if e.error.is_some() { " error=" } else { "" },
                e.error.unwrap_or(""),
            ),
        };
    }
}
