//! Prometheus metrics. Every metric berth exports is defined here, registered in one registry
//! ([`REGISTRY`]), and recorded through handles resolved once: the hot path (per request, per
//! chunk) does an atomic add, no label lookup, no allocation, no lock.
//!
//! Label cardinality stays bounded: routes are templates (`/v2/{name}/manifests/{reference}`),
//! never repository names or digests.

use std::sync::LazyLock;
use std::time::Duration;

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

use crate::http::endpoint::ROUTES;
use crate::meta::postgres::PoolStatus;

pub static REGISTRY: LazyLock<Registry> = LazyLock::new(|| {
    let r = Registry::new();
    #[cfg(target_os = "linux")]
    r.register(Box::new(
        prometheus::process_collector::ProcessCollector::for_self(),
    ))
    .expect("process collector");
    r
});

/// Buckets that resolve sub-millisecond metadata calls and multi-second blob transfers.
const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];

fn counter(name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).expect("metric");
    REGISTRY.register(Box::new(c.clone())).expect("register");
    c
}

fn counter_vec(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("metric");
    REGISTRY.register(Box::new(c.clone())).expect("register");
    c
}

/// A gauge registered in [`REGISTRY`].
pub fn gauge(name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).expect("metric");
    REGISTRY.register(Box::new(g.clone())).expect("register");
    g
}

fn histogram(name: &str, help: &str) -> Histogram {
    let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec()))
        .expect("metric");
    REGISTRY.register(Box::new(h.clone())).expect("register");
    h
}

fn histogram_vec(name: &str, help: &str, labels: &[&str]) -> HistogramVec {
    let h = HistogramVec::new(
        HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec()),
        labels,
    )
    .expect("metric");
    REGISTRY.register(Box::new(h.clone())).expect("register");
    h
}

/// HTTP methods berth distinguishes in labels; anything else counts as "other".
const METHODS: [&str; 7] = ["GET", "HEAD", "PUT", "POST", "PATCH", "DELETE", "other"];
/// Statuses berth answers with; any other counts under its exact code on a slow path.
const STATUSES: [u16; 18] = [
    200, 201, 202, 204, 206, 307, 400, 401, 403, 404, 405, 409, 413, 416, 499, 500, 502, 503,
];

pub struct HttpMetrics {
    requests: IntCounterVec,
    /// `requests` handles by [route][method][status index], resolved on first use.
    request_handles: Vec<[[std::sync::OnceLock<IntCounter>; STATUSES.len()]; METHODS.len()]>,
    duration: Vec<Histogram>,
}

impl HttpMetrics {
    fn new() -> Self {
        let requests = counter_vec(
            "berth_http_requests_total",
            "HTTP requests answered, by method, route template and status.",
            &["method", "route", "status"],
        );
        let duration_vec = histogram_vec(
            "berth_http_request_duration_seconds",
            "Time from request start to the end of the response, by route template.",
            &["route"],
        );
        let duration = ROUTES
            .iter()
            .map(|r| duration_vec.with_label_values(&[r]))
            .collect();
        let request_handles = ROUTES
            .iter()
            .map(|_| std::array::from_fn(|_| std::array::from_fn(|_| std::sync::OnceLock::new())))
            .collect();
        HttpMetrics {
            requests,
            request_handles,
            duration,
        }
    }

    /// Records one answered request. `route` is an index into [`ROUTES`].
    pub fn observe(&self, route: usize, method: &http::Method, status: u16, elapsed: Duration) {
        let m = METHODS
            .iter()
            .position(|m| *m == method.as_str())
            .unwrap_or(METHODS.len() - 1);
        match STATUSES.iter().position(|s| *s == status) {
            Some(s) => self.request_handles[route][m][s]
                .get_or_init(|| {
                    self.requests.with_label_values(&[
                        METHODS[m],
                        ROUTES[route],
                        &status.to_string(),
                    ])
                })
                .inc(),
            None => self
                .requests
                .with_label_values(&[METHODS[m], ROUTES[route], &status.to_string()])
                .inc(),
        }
        self.duration[route].observe(elapsed.as_secs_f64());
    }
}

pub static HTTP: LazyLock<HttpMetrics> = LazyLock::new(HttpMetrics::new);

pub struct BlobMetrics {
    pub bytes_sent: IntCounter,
    pub bytes_received: IntCounter,
    pub get_redirect: IntCounter,
    pub get_proxy: IntCounter,
    /// Proxied GETs served from another GET's object-store read.
    pub coalesced: IntCounter,
    /// Coalesced GETs that fell behind the shared read and read the rest on their own.
    pub coalesce_fallbacks: IntCounter,
}

pub static BLOBS: LazyLock<BlobMetrics> = LazyLock::new(|| {
    let gets = counter_vec(
        "berth_blob_gets_total",
        "Blob GETs answered, by how: 307 redirect to the object store or proxied through berth.",
        &["mode"],
    );
    BlobMetrics {
        bytes_sent: counter(
            "berth_blob_sent_bytes_total",
            "Blob bytes sent to clients through berth (proxy mode).",
        ),
        bytes_received: counter(
            "berth_blob_received_bytes_total",
            "Blob bytes received from clients in uploads.",
        ),
        get_redirect: gets.with_label_values(&["redirect"]),
        get_proxy: gets.with_label_values(&["proxy"]),
        coalesced: counter(
            "berth_blob_coalesced_gets_total",
            "Proxied blob GETs that joined another GET's object-store read instead of making one.",
        ),
        coalesce_fallbacks: counter(
            "berth_blob_coalesce_fallbacks_total",
            "Coalesced blob GETs that fell more than storage.coalesce_window behind and read the \
             rest with an object-store GET of their own.",
        ),
    }
});

/// Pull-through mirrors (`proxy:`).
pub struct MirrorMetrics {
    upstream_ok: IntCounter,
    upstream_not_found: IntCounter,
    upstream_unauthorized: IntCounter,
    upstream_error: IntCounter,
    upstream_token: IntCounter,
    manifest_hits: IntCounter,
    manifest_misses: IntCounter,
    blob_hits: IntCounter,
    blob_misses: IntCounter,
    /// Cached tags served because the upstream could not be asked.
    pub stale: IntCounter,
    /// Bytes read from upstream registries (manifests and blobs).
    pub upstream_bytes: IntCounter,
}

impl MirrorMetrics {
    /// Upstream requests by outcome: ok, not_found, unauthorized, error, token.
    pub fn upstream_requests(&self, outcome: &str) -> &IntCounter {
        match outcome {
            "ok" => &self.upstream_ok,
            "not_found" => &self.upstream_not_found,
            "unauthorized" => &self.upstream_unauthorized,
            "token" => &self.upstream_token,
            _ => &self.upstream_error,
        }
    }

    /// A request served from what the mirror holds (`manifest` or `blob`).
    pub fn hit(&self, kind: &str) -> &IntCounter {
        if kind == "blob" {
            &self.blob_hits
        } else {
            &self.manifest_hits
        }
    }

    /// A request that had to go upstream.
    pub fn miss(&self, kind: &str) -> &IntCounter {
        if kind == "blob" {
            &self.blob_misses
        } else {
            &self.manifest_misses
        }
    }
}

pub static MIRROR: LazyLock<MirrorMetrics> = LazyLock::new(|| {
    let upstream = counter_vec(
        "berth_mirror_upstream_requests_total",
        "Requests to upstream registries, by outcome (token: token-service requests).",
        &["outcome"],
    );
    let cache = counter_vec(
        "berth_mirror_cache_total",
        "Mirror reads by kind (manifest, blob) and result (hit: served from berth, miss: fetched upstream).",
        &["kind", "result"],
    );
    MirrorMetrics {
        upstream_ok: upstream.with_label_values(&["ok"]),
        upstream_not_found: upstream.with_label_values(&["not_found"]),
        upstream_unauthorized: upstream.with_label_values(&["unauthorized"]),
        upstream_error: upstream.with_label_values(&["error"]),
        upstream_token: upstream.with_label_values(&["token"]),
        manifest_hits: cache.with_label_values(&["manifest", "hit"]),
        manifest_misses: cache.with_label_values(&["manifest", "miss"]),
        blob_hits: cache.with_label_values(&["blob", "hit"]),
        blob_misses: cache.with_label_values(&["blob", "miss"]),
        stale: counter(
            "berth_mirror_stale_total",
            "Cached tags served stale because the upstream could not be reached.",
        ),
        upstream_bytes: counter(
            "berth_mirror_upstream_bytes_total",
            "Bytes fetched from upstream registries.",
        ),
    }
});

pub struct UploadMetrics {
    /// Requests writing an upload right now.
    pub in_progress: IntGauge,
    pub started: IntCounter,
    pub finished: IntCounter,
    pub cancelled: IntCounter,
    pub expired: IntCounter,
    pub failed: IntCounter,
    /// Sessions an expiry pass could not discard (retried on the next pass).
    pub expiry_failures: IntCounter,
    /// Bytes held in part buffers right now (within `upload.buffer_budget`).
    pub buffered_bytes: IntGauge,
    /// `upload.buffer_budget`, as configured.
    pub budget_bytes: IntGauge,
    /// Budget granted to part buffers right now.
    pub budget_in_use: IntGauge,
    /// Uploads waiting for budget right now (not reading their request bodies).
    pub budget_waiting: IntGauge,
    /// How long uploads that had to wait for budget waited.
    pub budget_wait: Histogram,
}

pub static UPLOADS: LazyLock<UploadMetrics> = LazyLock::new(|| {
    let outcomes = counter_vec(
        "berth_uploads_total",
        "Upload sessions by outcome: started, finished (blob stored), cancelled, expired, failed.",
        &["outcome"],
    );
    UploadMetrics {
        in_progress: gauge(
            "berth_uploads_in_progress",
            "Requests streaming upload bytes right now.",
        ),
        started: outcomes.with_label_values(&["started"]),
        finished: outcomes.with_label_values(&["finished"]),
        cancelled: outcomes.with_label_values(&["cancelled"]),
        expired: outcomes.with_label_values(&["expired"]),
        failed: outcomes.with_label_values(&["failed"]),
        expiry_failures: counter(
            "berth_upload_expiry_failures_total",
            "Idle upload sessions an expiry pass failed to discard (logged with the cause).",
        ),
        buffered_bytes: gauge(
            "berth_upload_buffered_bytes",
            "Upload bytes held in memory in part buffers right now.",
        ),
        budget_bytes: gauge(
            "berth_upload_budget_bytes",
            "upload.buffer_budget: the memory all part buffers together may use.",
        ),
        budget_in_use: gauge(
            "berth_upload_budget_in_use_bytes",
            "Budget granted right now: a whole part per part buffer (given before it fills), and 256 KiB per upload request reading its body.",
        ),
        budget_waiting: gauge(
            "berth_upload_budget_waiting",
            "Uploads waiting for budget right now; they do not read their request bodies meanwhile.",
        ),
        budget_wait: histogram(
            "berth_upload_budget_wait_seconds",
            "How long uploads that found the budget spent waited for room (a part buffer, or a request's own 256 KiB).",
        ),
    }
});

/// Object-store operations berth performs.
#[derive(Debug, Clone, Copy)]
pub enum StoreOp {
    HeadBucket,
    PutObject,
    CreateMultipart,
    UploadPart,
    CompleteMultipart,
    AbortMultipart,
    DeleteObject,
    /// A proxied blob GET (timed until the response headers arrive), or an object read into
    /// memory.
    GetObject,
    ListObjectsV2,
    ListMultipartUploads,
}

const STORE_OPS: [&str; 10] = [
    "HeadBucket",
    "PutObject",
    "CreateMultipartUpload",
    "UploadPart",
    "CompleteMultipartUpload",
    "AbortMultipartUpload",
    "DeleteObject",
    "GetObject",
    "ListObjectsV2",
    "ListMultipartUploads",
];

pub struct StoreMetrics {
    ok: Vec<IntCounter>,
    error: Vec<IntCounter>,
    duration: Vec<Histogram>,
}

impl StoreMetrics {
    pub fn observe(&self, op: StoreOp, ok: bool, elapsed: Duration) {
        let i = op as usize;
        if ok {
            self.ok[i].inc();
        } else {
            self.error[i].inc();
        }
        self.duration[i].observe(elapsed.as_secs_f64());
    }
}

pub static STORE: LazyLock<StoreMetrics> = LazyLock::new(|| {
    let requests = counter_vec(
        "berth_object_store_requests_total",
        "Requests to the object store by operation and outcome (ok or error, after retries).",
        &["operation", "outcome"],
    );
    let duration = histogram_vec(
        "berth_object_store_request_duration_seconds",
        "Object-store request duration by operation (retries included).",
        &["operation"],
    );
    StoreMetrics {
        ok: STORE_OPS
            .iter()
            .map(|op| requests.with_label_values(&[op, "ok"]))
            .collect(),
        error: STORE_OPS
            .iter()
            .map(|op| requests.with_label_values(&[op, "error"]))
            .collect(),
        duration: STORE_OPS
            .iter()
            .map(|op| duration.with_label_values(&[op]))
            .collect(),
    }
});

/// Metadata-store operations, timed per call.
pub struct MetaMetrics {
    duration: HistogramVec,
}

impl MetaMetrics {
    /// The histogram of one operation; resolve once and keep it where the call is hot.
    pub fn op(&self, name: &str) -> Histogram {
        self.duration.with_label_values(&[name])
    }
}

pub static META: LazyLock<MetaMetrics> = LazyLock::new(|| MetaMetrics {
    duration: histogram_vec(
        "berth_metadata_operation_duration_seconds",
        "Metadata-store operation duration by operation.",
        &["operation"],
    ),
});

/// Garbage collection.
pub struct GcMetrics {
    pub runs: IntCounter,
    pub manifests_deleted: IntCounter,
    pub blobs_deleted: IntCounter,
    pub objects_deleted: IntCounter,
    pub tags_deleted: IntCounter,
    pub bytes_freed: IntCounter,
    pub duration: Histogram,
    pub queue_length: IntGauge,
}

pub static GC: LazyLock<GcMetrics> = LazyLock::new(|| {
    let deleted = counter_vec(
        "berth_gc_deleted_total",
        "What garbage collection deleted, by kind (manifest, blob, object, tag).",
        &["kind"],
    );
    GcMetrics {
        runs: counter(
            "berth_gc_runs_total",
            "Garbage-collection passes run (not dry runs).",
        ),
        manifests_deleted: deleted.with_label_values(&["manifest"]),
        blobs_deleted: deleted.with_label_values(&["blob"]),
        objects_deleted: deleted.with_label_values(&["object"]),
        tags_deleted: deleted.with_label_values(&["tag"]),
        bytes_freed: counter(
            "berth_gc_freed_bytes_total",
            "Bytes of blobs and orphan objects garbage collection deleted from the bucket.",
        ),
        duration: {
            let h = Histogram::with_opts(
                HistogramOpts::new(
                    "berth_gc_pass_duration_seconds",
                    "Duration of a garbage-collection pass.",
                )
                .buckets(LATENCY_BUCKETS.to_vec()),
            )
            .expect("metric");
            REGISTRY.register(Box::new(h.clone())).expect("register");
            h
        },
        queue_length: gauge(
            "berth_gc_queue_length",
            "Candidates waiting in the collection queue, after the last pass.",
        ),
    }
});

/// The metadata store's connection pool (PostgreSQL), read from the pool at each scrape: no
/// cost per call.
struct PoolCollector {
    status: Box<dyn Fn() -> PoolStatus + Send + Sync>,
    connections: IntGaugeVec,
    waiting: IntGauge,
    max: IntGauge,
}

impl Collector for PoolCollector {
    fn desc(&self) -> Vec<&Desc> {
        let mut d = self.connections.desc();
        d.extend(self.waiting.desc());
        d.extend(self.max.desc());
        d
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let s = (self.status)();
        self.connections
            .with_label_values(&["in_use"])
            .set(s.in_use as i64);
        self.connections
            .with_label_values(&["idle"])
            .set(s.idle as i64);
        self.waiting.set(s.waiting as i64);
        self.max.set(s.max as i64);
        let mut families = self.connections.collect();
        families.extend(self.waiting.collect());
        families.extend(self.max.collect());
        families
    }
}

/// Exports `berth_metadata_pool_connections{state="in_use"|"idle"}`,
/// `berth_metadata_pool_waiting` and `berth_metadata_pool_max_connections`, read from
/// `status` at each scrape. Once per process.
pub fn register_metadata_pool(status: impl Fn() -> PoolStatus + Send + Sync + 'static) {
    let collector = PoolCollector {
        status: Box::new(status),
        connections: IntGaugeVec::new(
            Opts::new(
                "berth_metadata_pool_connections",
                "Connections to the metadata database, by state (in_use, idle).",
            ),
            &["state"],
        )
        .expect("metric"),
        waiting: IntGauge::new(
            "berth_metadata_pool_waiting",
            "Metadata calls waiting for a free database connection.",
        )
        .expect("metric"),
        max: IntGauge::new(
            "berth_metadata_pool_max_connections",
            "Connections this node opens to the metadata database at most.",
        )
        .expect("metric"),
    };
    REGISTRY
        .register(Box::new(collector))
        .expect("register the metadata pool metrics once");
}

/// Touches every metric so that all series exist from the start (a scrape right after start
/// shows zeros rather than nothing).
pub fn init() {
    LazyLock::force(&HTTP);
    LazyLock::force(&BLOBS);
    LazyLock::force(&UPLOADS);
    LazyLock::force(&STORE);
    LazyLock::force(&META);
    LazyLock::force(&MIRROR);
    LazyLock::force(&GC);
}

/// The registry in Prometheus text format.
pub fn render() -> Vec<u8> {
    use prometheus::Encoder;
    let mut out = Vec::with_capacity(16 * 1024);
    prometheus::TextEncoder::new()
        .encode(&REGISTRY.gather(), &mut out)
        .expect("text encoding");
    out
}
