//! The operations listener, separate from the registry API: `/metrics` (Prometheus text
//! format), `/healthz` (the process answers), `/readyz` (metadata store readable and
//! writable, object store reachable, as last seen by [`ReadinessProbe`]; a scrape never
//! touches either) and `POST /gc` (one garbage-collection pass, `?dry_run=&full=&orphans=`;
//! answers its JSON report). The listener is for operators: bind it to loopback or a private
//! network.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use http::Response;
use pingora_core::apps::http_app::ServeHttp;
use pingora_core::protocols::http::ServerSession;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use prometheus::IntGauge;

use crate::gc::Collector;
use crate::metrics;
use crate::registry::Registry;

/// How often the readiness probe runs.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(2);

/// What the last probe found.
pub struct Readiness {
    metadata: AtomicBool,
    metadata_writable: AtomicBool,
    object_store: AtomicBool,
    metadata_up: IntGauge,
    metadata_writable_gauge: IntGauge,
    object_store_up: IntGauge,
}

impl Readiness {
    pub fn new() -> Arc<Self> {
        Arc::new(Readiness {
            metadata: AtomicBool::new(false),
            metadata_writable: AtomicBool::new(false),
            object_store: AtomicBool::new(false),
            metadata_up: metrics::gauge(
                "berth_metadata_store_up",
                "1 if the last readiness probe could read the metadata store.",
            ),
            metadata_writable_gauge: metrics::gauge(
                "berth_metadata_store_writable",
                "1 if the last readiness probe found the metadata store able to write.",
            ),
            object_store_up: metrics::gauge(
                "berth_object_store_up",
                "1 if the last readiness probe reached the bucket.",
            ),
        })
    }

    fn set(&self, metadata: bool, writable: bool, object_store: bool) {
        self.metadata.store(metadata, Ordering::Relaxed);
        self.metadata_writable.store(writable, Ordering::Relaxed);
        self.object_store.store(object_store, Ordering::Relaxed);
        self.metadata_up.set(metadata as i64);
        self.metadata_writable_gauge.set(writable as i64);
        self.object_store_up.set(object_store as i64);
    }

    /// None when ready, else what is wrong.
    pub fn problem(&self) -> Option<String> {
        let mut problems = Vec::new();
        if !self.metadata.load(Ordering::Relaxed) {
            problems.push("metadata store unavailable");
        } else if !self.metadata_writable.load(Ordering::Relaxed) {
            problems.push("metadata store cannot write (reads go on)");
        }
        if !self.object_store.load(Ordering::Relaxed) {
            problems.push("object store unreachable");
        }
        (!problems.is_empty()).then(|| problems.join(", "))
    }
}

/// Background task: probes both stores every [`PROBE_INTERVAL`].
pub struct ReadinessProbe {
    pub registry: Arc<Registry>,
    pub readiness: Arc<Readiness>,
}

impl ReadinessProbe {
    pub async fn probe_once(&self) {
        let metadata = self.registry.meta.repository_exists("").await.is_ok();
        let writable = match self.registry.meta.check_writable().await {
            Ok(()) => true,
            Err(e) => {
                log::warn!("readiness: {e}");
                false
            }
        };
        let object_store = match self.registry.store.check().await {
            Ok(()) => true,
            Err(e) => {
                log::warn!("readiness: {e}");
                false
            }
        };
        self.readiness.set(metadata, writable, object_store);
    }
}

#[async_trait]
impl BackgroundService for ReadinessProbe {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut tick = tokio::time::interval(PROBE_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tick.tick() => self.probe_once().await,
            }
        }
    }
}

pub struct OpsApp {
    pub readiness: Arc<Readiness>,
    pub gc: Arc<Collector>,
}

impl OpsApp {
    async fn gc(&self, query: Option<&str>) -> (u16, &'static str, Vec<u8>) {
        let opts = match crate::gc::command::parse_query(query) {
            Ok(o) => o,
            Err(e) => return (400, "text/plain", format!("{e}\n").into_bytes()),
        };
        match self.gc.run(opts).await {
            Ok(report) => (
                200,
                "application/json",
                serde_json::to_vec(&report).expect("json of a report"),
            ),
            Err(e) => {
                log::warn!("gc: {e}");
                (503, "text/plain", format!("gc failed: {e}\n").into_bytes())
            }
        }
    }
}

#[async_trait]
impl ServeHttp for OpsApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let get = matches!(
            session.req_header().method,
            http::Method::GET | http::Method::HEAD
        );
        let post = session.req_header().method == http::Method::POST;
        let uri = session.req_header().uri.clone();
        let (status, content_type, body) = match uri.path() {
            "/gc" if post => self.gc(uri.query()).await,
            _ if !get => (405, "text/plain", b"method not allowed\n".to_vec()),
            "/metrics" => (
                200,
                "text/plain; version=0.0.4; charset=utf-8",
                metrics::render(),
            ),
            "/healthz" => (200, "text/plain", b"ok\n".to_vec()),
            "/readyz" => match self.readiness.problem() {
                None => (200, "text/plain", b"ready\n".to_vec()),
                Some(p) => (503, "text/plain", format!("not ready: {p}\n").into_bytes()),
            },
            _ => (404, "text/plain", b"not found\n".to_vec()),
        };
        Response::builder()
            .status(status)
            .header("Content-Type", content_type)
            .header("Content-Length", body.len())
            .body(body)
            .expect("valid response")
    }
}
