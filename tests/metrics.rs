//! Observability over real HTTP against the real binary: Prometheus metrics (exact deltas after
//! pushes and pulls, checked against what a separate S3 server counted), `/healthz` and
//! `/readyz` following the object store, JSON access logs, `promtool check metrics`, a real
//! Prometheus scraping berth with `deploy/prometheus.yml`, and `deploy/grafana-dashboard.json`
//! using only metrics berth exports.
//!
//! `prometheus` and `promtool` must be installed (Debian: `apt-get install -y prometheus`; CI
//! installs it). To run without them, set `BERTH_SKIP_CLIENT_TESTS=1`: the tests that need
//! them then pass after saying they skipped.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Cursor, Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use berth::http::endpoint::ROUTES;
use common::forward::Forwarder;
use common::prom::Exposition;
use common::*;
use reqwest::blocking::{Body, Client, Response};
use serde_json::{json, Value};

const MIB: usize = 1 << 20;
/// A repository name that must never show up in a label.
const REPO: &str = "obs-test/widget";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

const R_BASE: &str = "/";
const R_V2: &str = "/v2/";
const R_TAGS: &str = "/v2/{name}/tags/list";
const R_MANIFEST: &str = "/v2/{name}/manifests/{reference}";
const R_BLOB: &str = "/v2/{name}/blobs/{digest}";
const R_UPLOADS: &str = "/v2/{name}/blobs/uploads/";
const R_UPLOAD: &str = "/v2/{name}/blobs/uploads/{uuid}";
const R_UNMATCHED: &str = "unmatched";

// ---------------------------------------------------------------------------------------------
// helpers
// ---------------------------------------------------------------------------------------------

/// berth with its operations listener on a free loopback port, and a client.
struct Observed {
    berth: Berth,
    metrics_port: u16,
    c: Client,
}

impl Observed {
    fn start(extra_yaml: &str, s3: Option<&S3Server>) -> Observed {
        let metrics_port = free_port();
        let yaml = format!("metrics:\n  listen: 127.0.0.1:{metrics_port}\n{extra_yaml}");
        let o = Observed {
            berth: Berth::start_with(&yaml, s3),
            metrics_port,
            c: client(),
        };
        // The ops listener starts with the registry listener; wait until it answers too.
        wait_until(Duration::from_secs(10), "the ops listener answers", || {
            o.c.get(o.ops_url("/healthz"))
                .send()
                .ok()
                .filter(|r| r.status() == 200)
        });
        // The harness's `GET /v2/` is counted before any test takes a baseline.
        o.scrape_counted(1.0);
        o
    }

    fn url(&self, path: &str) -> String {
        if path.starts_with("http://") {
            path.to_string()
        } else {
            self.berth.url(path)
        }
    }

    fn ops_url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.metrics_port)
    }

    fn ops_get(&self, path: &str) -> (u16, String) {
        let r = self.c.get(self.ops_url(path)).send().unwrap();
        (r.status().as_u16(), r.text().unwrap())
    }

    /// `/metrics` as text; asserts 200 and the content type.
    fn metrics_text(&self) -> String {
        let r = self.c.get(self.ops_url("/metrics")).send().unwrap();
        assert_eq!(r.status(), 200);
        let ct = r.headers()["content-type"].to_str().unwrap().to_string();
        assert!(
            ct.starts_with("text/plain; version=0.0.4"),
            "Content-Type {ct}"
        );
        r.text().unwrap()
    }

    /// `/metrics` once at least `n` registry requests are counted in all (a request is
    /// counted when its response is done, which the client may see first).
    fn scrape_counted(&self, n: f64) -> Exposition {
        wait_until(
            Duration::from_secs(10),
            &format!("{n} requests are counted"),
            || {
                let m = self.scrape();
                (m.sum("berth_http_requests_total", &[]) >= n).then_some(m)
            },
        )
    }

    /// `/metrics`, parsed strictly.
    fn scrape(&self) -> Exposition {
        let text = self.metrics_text();
        Exposition::parse(&text).unwrap_or_else(|e| panic!("/metrics does not parse: {e}\n{text}"))
    }

    fn get(&self, path: &str) -> Response {
        self.c.get(self.url(path)).send().unwrap()
    }

    fn head(&self, path: &str) -> Response {
        self.c.head(self.url(path)).send().unwrap()
    }

    /// `POST .../blobs/uploads/`; asserts 202, returns the Location.
    #[track_caller]
    fn start_upload(&self, repo: &str) -> String {
        let r = self
            .c
            .post(self.url(&format!("/v2/{repo}/blobs/uploads/")))
            .send()
            .unwrap();
        assert_eq!(r.status(), 202, "start upload: {}", r.text().unwrap());
        hdr(&r, "location")
    }

    /// PATCH with a sized body and Content-Range; asserts 202, returns the new Location.
    #[track_caller]
    fn patch(&self, loc: &str, start: usize, bytes: &[u8]) -> String {
        let r = self
            .c
            .patch(self.url(loc))
            .header("Content-Type", "application/octet-stream")
            .header(
                "Content-Range",
                format!("{start}-{}", start + bytes.len() - 1),
            )
            .body(bytes.to_vec())
            .send()
            .unwrap();
        assert_eq!(r.status(), 202, "PATCH: {}", r.text().unwrap());
        hdr(&r, "location")
    }

    /// Monolithic upload (`POST ?digest=` with the body); asserts 201, returns the digest.
    #[track_caller]
    fn push_blob(&self, repo: &str, bytes: &[u8]) -> String {
        self.berth.push_blob(&self.c, repo, bytes)
    }

    #[track_caller]
    fn put_manifest(&self, repo: &str, tag: &str, body: &[u8]) {
        let r = self
            .c
            .put(self.url(&format!("/v2/{repo}/manifests/{tag}")))
            .header("Content-Type", OCI_MANIFEST)
            .body(body.to_vec())
            .send()
            .unwrap();
        assert_eq!(r.status(), 201, "push manifest: {}", r.text().unwrap());
    }
}

/// Polls `f` until it returns Some, at most `limit`; panics naming `what` after that.
#[track_caller]
fn wait_until<T>(limit: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting until {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[track_caller]
fn hdr(r: &Response, name: &str) -> String {
    r.headers()
        .get(name)
        .unwrap_or_else(|| panic!("no {name} header in {} {:?}", r.status(), r.headers()))
        .to_str()
        .unwrap()
        .to_string()
}

fn with_query(loc: &str, param: &str) -> String {
    let sep = if loc.contains('?') { '&' } else { '?' };
    format!("{loc}{sep}{param}")
}

fn pseudo_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    PseudoRandom::new(seed, len as u64)
        .read_exact(&mut v)
        .unwrap();
    v
}

fn image_manifest(config: (&str, usize), layers: &[(&str, usize)]) -> Vec<u8> {
    let layers: Vec<Value> = layers
        .iter()
        .map(|(d, s)| json!({"mediaType": OCI_LAYER, "digest": d, "size": s}))
        .collect();
    serde_json::to_vec_pretty(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": config.0, "size": config.1},
        "layers": layers,
    }))
    .unwrap()
}

fn delta(before: &Exposition, after: &Exposition, name: &str, labels: &[(&str, &str)]) -> f64 {
    after.value_or_zero(name, labels) - before.value_or_zero(name, labels)
}

/// `berth_http_requests_total` deltas by (method, route, status), zero deltas left out.
fn request_deltas(
    before: &Exposition,
    after: &Exposition,
) -> BTreeMap<(String, String, String), f64> {
    let mut out = BTreeMap::new();
    for s in after.series("berth_http_requests_total") {
        let l = |k: &str| s.labels.get(k).cloned().unwrap_or_default();
        let was = before
            .series("berth_http_requests_total")
            .find(|b| b.labels == s.labels)
            .map_or(0.0, |b| b.value);
        if s.value != was {
            out.insert((l("method"), l("route"), l("status")), s.value - was);
        }
    }
    out
}

fn expected_requests(list: &[(&str, &str, u16, u32)]) -> BTreeMap<(String, String, String), f64> {
    list.iter()
        .map(|(m, r, s, n)| ((m.to_string(), r.to_string(), s.to_string()), *n as f64))
        .collect()
}

fn repo_file(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// A request body that sends `first`, then blocks until the gate opens, then sends `rest`
/// (sent chunked: no Content-Length).
struct Gated {
    first: Cursor<Vec<u8>>,
    gate: Option<std::sync::mpsc::Receiver<()>>,
    rest: Cursor<Vec<u8>>,
}

impl Read for Gated {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.first.read(buf)?;
        if n > 0 {
            return Ok(n);
        }
        if let Some(gate) = self.gate.take() {
            let _ = gate.recv();
        }
        self.rest.read(buf)
    }
}

// ---------------------------------------------------------------------------------------------
// the exposition parser itself
// ---------------------------------------------------------------------------------------------

#[test]
fn exposition_parser_is_strict_and_handles_escapes() {
    let text = r#"# HELP esc_total A backslash \\ and a newline \n in help.
# TYPE esc_total counter
esc_total{path="/v2/{name}/x",q="a \"quoted\" value, with = and }",nl="line\nbreak",bs="C:\\dir",} 3
esc_total{path="b"} 1.5e3 1700000000000
# a plain comment
# TYPE h histogram
h_bucket{route="/a/{b}",le="0.1"} 1
h_bucket{route="/a/{b}",le="1"} 3
h_bucket{route="/a/{b}",le="+Inf"} 4
h_sum{route="/a/{b}"} 2.5
h_count{route="/a/{b}"} 4
# TYPE g gauge
g -Inf
"#;
    let e = Exposition::parse(text).unwrap();
    assert_eq!(
        e.help["esc_total"],
        "A backslash \\ and a newline \n in help."
    );
    assert_eq!(e.types["esc_total"], "counter");
    assert_eq!(
        e.value(
            "esc_total",
            &[
                ("path", "/v2/{name}/x"),
                ("q", "a \"quoted\" value, with = and }"),
                ("nl", "line\nbreak"),
                ("bs", "C:\\dir"),
            ]
        ),
        3.0
    );
    let s = e.series("esc_total").nth(1).unwrap();
    assert_eq!((s.value, s.timestamp_ms), (1500.0, Some(1_700_000_000_000)));
    let h = e.histogram("h", &[("route", "/a/{b}")]);
    assert_eq!(
        h.buckets,
        vec![(0.1, 1.0), (1.0, 3.0), (f64::INFINITY, 4.0)]
    );
    assert_eq!((h.sum, h.count), (2.5, 4.0));
    assert_eq!(e.value("g", &[]), f64::NEG_INFINITY);
    assert_eq!(e.sum("esc_total", &[]), 1503.0);

    let bad = [
        ("x{a=\"1\"} nope\n", "not a number"),
        ("x{a=\"1} 1\n", "unterminated"),
        ("x{a=\"\\t\"} 1\n", "bad escape"),
        ("x{a=1} 1\n", "not quoted"),
        ("x{a=\"1\",a=\"2\"} 1\n", "twice"),
        ("x 1\nx 2\n", "duplicate"),
        ("x 1 2 3\n", "unexpected"),
        ("1x 1\n", "metric name"),
        ("# TYPE x countr\n", "unknown type"),
        ("x 1\n# TYPE x counter\n", "after its samples"),
        (
            "# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_sum 1\nh_count 1\n",
            "cumulative",
        ),
        (
            "# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_bucket{le=\"+Inf\"} 2\nh_sum 1\nh_count 3\n",
            "+Inf bucket",
        ),
        ("# TYPE h histogram\nh_bucket 1\n", "le"),
        ("# TYPE h histogram\nh_count 1\n", "incomplete"),
    ];
    for (input, why) in bad {
        let err = Exposition::parse(input).expect_err(input);
        assert!(
            err.contains(why),
            "{input:?}: error {err:?} should mention {why:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// metrics after a push and a pull
// ---------------------------------------------------------------------------------------------

/// A push (POST + chunked PATCHes + PUT, a monolithic POST, a manifest PUT, a failed and a
/// cancelled upload) and a pull (manifest GET, proxied blob GETs) against a separate S3 server:
/// every metric moves by exactly what happened, labels are route templates, and berth's
/// object-store counters agree with the requests the S3 server counted.
#[test]
fn push_and_pull_move_every_metric_exactly() {
    let s3 = S3Server::start();
    let o = Observed::start("upload:\n  part_size: 5MiB\n", Some(&s3));
    let before = o.scrape();
    let mut upload_ids = Vec::new();

    // A layer: POST, a 6 MiB PATCH (one 5 MiB part streams straight to UploadPart), a small
    // PATCH, then PUT with the last bytes (the last part, then CompleteMultipartUpload).
    let layer = pseudo_bytes(1, 7 * MIB + 1123);
    let layer_digest = sha256_digest(&layer);
    let loc = o.start_upload(REPO);
    upload_ids.push(loc.rsplit('/').next().unwrap().to_string());
    let loc = o.patch(&loc, 0, &layer[..6 * MIB]);
    let loc = o.patch(&loc, 6 * MIB, &layer[6 * MIB..7 * MIB + 123]);
    let r =
        o.c.put(o.url(&with_query(&loc, &format!("digest={layer_digest}"))))
            .body(layer[7 * MIB + 123..].to_vec())
            .send()
            .unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().unwrap());

    // The config: a monolithic POST ?digest= (one PutObject).
    let config = br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers"}}"#.to_vec();
    let config_digest = o.push_blob(REPO, &config);

    let manifest = image_manifest(
        (&config_digest, config.len()),
        &[(&layer_digest, layer.len())],
    );
    o.put_manifest(REPO, "v1", &manifest);

    // A failed upload: the whole body in the PUT, under a digest it does not have (PutObject,
    // then DeleteObject of the bytes).
    let wrong = pseudo_bytes(2, 4000);
    let loc = o.start_upload(REPO);
    upload_ids.push(loc.rsplit('/').next().unwrap().to_string());
    let r =
        o.c.put(o.url(&with_query(
            &loc,
            &format!("digest={}", sha256_digest(b"something else")),
        )))
        .body(wrong.clone())
        .send()
        .unwrap();
    assert_eq!(r.status(), 400, "{}", r.text().unwrap());

    // A cancelled upload: a chunked PATCH of one whole part, held open half way to look at
    // the gauges, then DELETE (AbortMultipartUpload).
    let cancelled = pseudo_bytes(3, 5 * MIB);
    let loc = o.start_upload(REPO);
    upload_ids.push(loc.rsplit('/').next().unwrap().to_string());
    let (open_gate, gate) = std::sync::mpsc::channel();
    let patch = {
        let c = o.c.clone();
        let url = o.url(&loc);
        let body = Gated {
            first: Cursor::new(cancelled[..MIB].to_vec()),
            gate: Some(gate),
            rest: Cursor::new(cancelled[MIB..].to_vec()),
        };
        std::thread::spawn(move || {
            let r = c.patch(url).body(Body::new(body)).send().unwrap();
            (r.status().as_u16(), r.headers().get("location").cloned())
        })
    };
    let during = wait_until(Duration::from_secs(10), "an upload is in progress", || {
        let m = o.scrape();
        (m.value("berth_uploads_in_progress", &[]) == 1.0
            && m.value("berth_upload_buffered_bytes", &[]) >= MIB as f64)
            .then_some(m)
    });
    // No content length: a whole part is reserved for the bytes to come.
    assert!(
        during.value("berth_upload_buffered_bytes", &[]) >= (5 * MIB) as f64,
        "buffered {}",
        during.value("berth_upload_buffered_bytes", &[])
    );
    open_gate.send(()).unwrap();
    let (status, location) = patch.join().unwrap();
    assert_eq!(status, 202);
    let loc = location.unwrap().to_str().unwrap().to_string();
    let r = o.c.delete(o.url(&loc)).send().unwrap();
    assert_eq!(r.status(), 204);

    // The pull.
    let r = o.get(&format!("/v2/{REPO}/manifests/v1"));
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().unwrap().as_ref(), &manifest[..]);
    assert_eq!(o.head(&format!("/v2/{REPO}/manifests/v1")).status(), 200);
    let r = o.get(&format!("/v2/{REPO}/blobs/{layer_digest}"));
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().unwrap().as_ref(), &layer[..]);
    let r = o.get(&format!("/v2/{REPO}/blobs/{config_digest}"));
    assert_eq!(r.bytes().unwrap().as_ref(), &config[..]);
    assert_eq!(
        o.head(&format!("/v2/{REPO}/blobs/{layer_digest}")).status(),
        200
    );
    let unknown = sha256_digest(b"never pushed");
    assert_eq!(o.get(&format!("/v2/{REPO}/blobs/{unknown}")).status(), 404);
    assert_eq!(o.get(&format!("/v2/{REPO}/tags/list")).status(), 200);
    assert_eq!(o.get(&format!("/v2/nothing/{REPO}")).status(), 404);
    assert_eq!(o.get("/").status(), 200);

    let expected = expected_requests(&[
        ("POST", R_UPLOADS, 202, 3),
        ("POST", R_UPLOADS, 201, 1),
        ("PATCH", R_UPLOAD, 202, 3),
        ("PUT", R_UPLOAD, 201, 1),
        ("PUT", R_UPLOAD, 400, 1),
        ("DELETE", R_UPLOAD, 204, 1),
        ("PUT", R_MANIFEST, 201, 1),
        ("GET", R_MANIFEST, 200, 1),
        ("HEAD", R_MANIFEST, 200, 1),
        ("GET", R_BLOB, 200, 2),
        ("HEAD", R_BLOB, 200, 1),
        ("GET", R_BLOB, 404, 1),
        ("GET", R_TAGS, 200, 1),
        ("GET", R_UNMATCHED, 404, 1),
        ("GET", R_BASE, 200, 1),
    ]);
    let total: f64 = expected.values().sum();
    // A request is counted once its response is done, which the client may see first.
    let after = wait_until(Duration::from_secs(10), "all requests are counted", || {
        let m = o.scrape();
        (request_deltas(&before, &m).values().sum::<f64>() >= total).then_some(m)
    });

    // HTTP requests by (method, route template, status): exactly these.
    assert_eq!(request_deltas(&before, &after), expected);
    // Durations: one observation per request, per route.
    let by_route = expected
        .iter()
        .fold(BTreeMap::new(), |mut m, ((_, r, _), n)| {
            *m.entry(r.clone()).or_insert(0.0) += n;
            m
        });
    for route in ROUTES {
        let d = delta(
            &before,
            &after,
            "berth_http_request_duration_seconds_count",
            &[("route", route)],
        );
        assert_eq!(
            d,
            by_route.get(route).copied().unwrap_or(0.0),
            "duration count of {route}"
        );
        let h = after.histogram("berth_http_request_duration_seconds", &[("route", route)]);
        let was = before.histogram("berth_http_request_duration_seconds", &[("route", route)]);
        if d > 0.0 {
            assert!(h.sum > was.sum, "duration sum of {route} did not move");
        }
    }

    // Labels are templates: no repository name, digest or upload id anywhere.
    let routes: BTreeSet<&str> = ROUTES.into_iter().collect();
    for s in &after.samples {
        for (k, v) in &s.labels {
            assert!(
                !v.contains(REPO) && !v.contains("obs-test") && !v.contains("sha256:"),
                "{}{{{k}={v:?}}} leaks a name or digest",
                s.name
            );
            for id in &upload_ids {
                assert!(
                    !v.contains(id.as_str()),
                    "{}{{{k}={v:?}}} leaks an upload id",
                    s.name
                );
            }
            if k == "route" {
                assert!(
                    routes.contains(v.as_str()),
                    "route label {v:?} is not a template"
                );
            }
        }
    }

    // Blob bytes, exactly.
    let received = layer.len() + config.len() + wrong.len() + cancelled.len();
    assert_eq!(
        delta(&before, &after, "berth_blob_received_bytes_total", &[]),
        received as f64
    );
    assert_eq!(
        delta(&before, &after, "berth_blob_sent_bytes_total", &[]),
        (layer.len() + config.len()) as f64
    );
    assert_eq!(
        delta(
            &before,
            &after,
            "berth_blob_gets_total",
            &[("mode", "proxy")]
        ),
        2.0
    );
    assert_eq!(
        delta(
            &before,
            &after,
            "berth_blob_gets_total",
            &[("mode", "redirect")]
        ),
        0.0
    );

    // Uploads.
    for (outcome, n) in [
        ("started", 4.0),
        ("finished", 2.0),
        ("failed", 1.0),
        ("cancelled", 1.0),
        ("expired", 0.0),
    ] {
        assert_eq!(
            delta(
                &before,
                &after,
                "berth_uploads_total",
                &[("outcome", outcome)]
            ),
            n,
            "uploads {outcome}"
        );
    }
    assert_eq!(after.value("berth_uploads_in_progress", &[]), 0.0);
    assert_eq!(after.value("berth_upload_buffered_bytes", &[]), 0.0);

    // Object-store operations, exactly (HeadBucket is the readiness probe's, every 2 s).
    for (op, n) in [
        // The config's and the failed upload's bytes, and three bucket journal records: the
        // layer's link, the config's link, the manifest.
        ("PutObject", 5.0),
        ("DeleteObject", 1.0),
        ("CreateMultipartUpload", 2.0),
        ("UploadPart", 3.0),
        ("CompleteMultipartUpload", 1.0),
        ("AbortMultipartUpload", 1.0),
    ] {
        let ok = delta(
            &before,
            &after,
            "berth_object_store_requests_total",
            &[("operation", op), ("outcome", "ok")],
        );
        assert_eq!(ok, n, "object-store {op} ok");
        assert_eq!(
            delta(
                &before,
                &after,
                "berth_object_store_request_duration_seconds_count",
                &[("operation", op)]
            ),
            n,
            "object-store {op} duration count"
        );
    }
    assert_eq!(
        after.sum("berth_object_store_requests_total", &[("outcome", "error")]),
        0.0,
        "object-store errors"
    );
    // Proxied blob GETs are pingora's upstream requests, not the S3 client's: one GetObject
    // each, timed to the response header.
    let get_object = after.value(
        "berth_object_store_requests_total",
        &[("operation", "GetObject"), ("outcome", "ok")],
    );
    let proxied = after.value("berth_blob_gets_total", &[("mode", "proxy")]);
    assert!(
        get_object == proxied && proxied > 0.0,
        "GetObject {get_object}, proxied GETs {proxied}"
    );

    // What the S3 server counted equals berth's operations (all of them since berth started,
    // probes included) plus the proxied GETs. Compared at a moment without a probe in flight.
    let (counted, recorded) = wait_until(
        Duration::from_secs(10),
        "the S3 server's count matches berth's",
        || {
            let c1 = s3.request_count();
            let m = o.scrape();
            let c2 = s3.request_count();
            let ops = m.sum("berth_object_store_requests_total", &[])
                - m.value(
                    "berth_object_store_requests_total",
                    &[("operation", "GetObject"), ("outcome", "ok")],
                );
            let proxied = m.value("berth_blob_gets_total", &[("mode", "proxy")]);
            let recorded = (ops + proxied) as u64;
            (c1 == c2 && c1 == recorded).then_some((c1, recorded))
        },
    );
    assert_eq!(counted, recorded);
    eprintln!(
        "S3 server counted {counted} requests = berth's object-store operations + {proxied} \
         proxied GETs (GetObject series: {get_object})"
    );
    assert!(
        after.value(
            "berth_object_store_requests_total",
            &[("operation", "HeadBucket"), ("outcome", "ok")]
        ) >= 1.0,
        "the start-up check is a HeadBucket"
    );

    // Metadata store.
    for (op, n) in [
        ("put_manifest", 1.0),
        ("create_upload", 4.0),
        ("finish_upload", 2.0),
    ] {
        assert_eq!(
            delta(
                &before,
                &after,
                "berth_metadata_operation_duration_seconds_count",
                &[("operation", op)]
            ),
            n,
            "metadata {op}"
        );
    }

    // Process metrics, compared with /proc.
    for (name, ty) in [
        ("process_resident_memory_bytes", "gauge"),
        ("process_open_fds", "gauge"),
        ("process_cpu_seconds_total", "counter"),
    ] {
        assert_eq!(
            after.types.get(name).map(String::as_str),
            Some(ty),
            "{name}"
        );
        assert!(after.value(name, &[]) >= 0.0, "{name}");
    }
    let rss = after.value("process_resident_memory_bytes", &[]);
    let proc_rss = (o.berth.rss_kib() * 1024) as f64;
    assert!(
        rss > proc_rss / 2.0 && rss < proc_rss * 2.0,
        "RSS {rss} vs /proc {proc_rss}"
    );
    let fds = after.value("process_open_fds", &[]);
    let proc_fds = std::fs::read_dir(format!("/proc/{}/fd", o.berth.pid()))
        .unwrap()
        .count() as f64;
    assert!(
        fds > 0.0 && (fds - proc_fds).abs() <= 32.0,
        "fds {fds} vs /proc {proc_fds}"
    );

    // Text access log (the default format): one line per request, the client's path.
    let log = o.berth.log();
    let manifest_put = format!("\"PUT /v2/{REPO}/manifests/v1\" 201 ");
    let line = log
        .lines()
        .find(|l| l.contains(&manifest_put))
        .unwrap_or_else(|| panic!("no access line for the manifest PUT in:\n{log}"));
    assert!(
        line.contains(" route=/v2/{name}/manifests/{reference} "),
        "{line}"
    );
    assert!(
        line.contains(&format!(" in={} out=0 ", manifest.len())),
        "{line}"
    );
    assert!(!log.contains("X-Amz-"), "presigned URL in the log:\n{log}");
    assert!(!log.contains(S3_SECRET_KEY), "secret key in the log");
}

/// In redirect mode a blob GET is a 307 counted as `mode="redirect"`, and no bytes go through
/// berth.
#[test]
fn redirect_mode_counts_redirects() {
    let s3 = S3Server::start();
    let o = Observed::start(
        &format!("{}  blob_serving: redirect\n", s3.storage_yaml()),
        None,
    );
    let data = pseudo_bytes(4, 30_000);
    let digest = o.push_blob(REPO, &data);
    // GET /v2/ and the push.
    let before = o.scrape_counted(2.0);
    let r = o.get(&format!("/v2/{REPO}/blobs/{digest}"));
    assert_eq!(r.status(), 307);
    let location = hdr(&r, "location");
    // The client fetches the bytes from the object store itself.
    assert_eq!(
        o.c.get(&location).send().unwrap().bytes().unwrap().as_ref(),
        &data[..]
    );
    let after = wait_until(Duration::from_secs(10), "the GET is counted", || {
        let m = o.scrape();
        (!request_deltas(&before, &m).is_empty()).then_some(m)
    });
    assert_eq!(
        request_deltas(&before, &after),
        expected_requests(&[("GET", R_BLOB, 307, 1)])
    );
    assert_eq!(
        delta(
            &before,
            &after,
            "berth_blob_gets_total",
            &[("mode", "redirect")]
        ),
        1.0
    );
    assert_eq!(
        delta(
            &before,
            &after,
            "berth_blob_gets_total",
            &[("mode", "proxy")]
        ),
        0.0
    );
    assert_eq!(
        delta(&before, &after, "berth_blob_sent_bytes_total", &[]),
        0.0
    );
    assert_eq!(
        delta(&before, &after, "berth_blob_received_bytes_total", &[]),
        0.0
    );
}

// ---------------------------------------------------------------------------------------------
// health and readiness
// ---------------------------------------------------------------------------------------------

/// `/readyz` turns 503 when the object store goes away (connections refused) and 200 again
/// when it is back; `/healthz` stays 200; the `_up` gauges follow.
#[test]
fn readiness_follows_the_object_store() {
    let s3 = S3Server::start();
    let target: SocketAddr = s3.endpoint.trim_start_matches("http://").parse().unwrap();
    let fwd = Forwarder::start(target);
    let storage = format!(
        "storage:\n  endpoint: {}\n  region: us-east-1\n  bucket: {S3_BUCKET}\n  access_key: \
         {S3_ACCESS_KEY}\n  secret_key: {S3_SECRET_KEY}\n  path_style: true\n",
        fwd.endpoint()
    );
    let o = Observed::start(&storage, None);

    assert_eq!(o.ops_get("/healthz"), (200, "ok\n".to_string()));
    wait_until(Duration::from_secs(10), "/readyz is 200", || {
        (o.ops_get("/readyz") == (200, "ready\n".to_string())).then_some(())
    });
    let m = o.scrape();
    assert_eq!(m.value("berth_object_store_up", &[]), 1.0);
    assert_eq!(m.value("berth_metadata_store_up", &[]), 1.0);
    // Other paths and methods on the ops listener.
    assert_eq!(o.ops_get("/nope").0, 404);
    let r = o.c.post(o.ops_url("/metrics")).send().unwrap();
    assert_eq!(r.status(), 405);

    // The object store goes away.
    fwd.stop();
    assert_eq!(
        std::net::TcpStream::connect(("127.0.0.1", fwd.port))
            .unwrap_err()
            .kind(),
        std::io::ErrorKind::ConnectionRefused
    );
    let stopped = Instant::now();
    let (_, body) = wait_until(Duration::from_secs(15), "/readyz is 503", || {
        let (status, body) = o.ops_get("/readyz");
        (status == 503).then_some((status, body))
    });
    assert_eq!(body, "not ready: object store unreachable\n");
    eprintln!("not ready after {:?}", stopped.elapsed());
    assert_eq!(o.ops_get("/healthz").0, 200, "the process itself is fine");
    let m = o.scrape();
    assert_eq!(m.value("berth_object_store_up", &[]), 0.0);
    assert_eq!(m.value("berth_metadata_store_up", &[]), 1.0);
    assert!(
        m.value(
            "berth_object_store_requests_total",
            &[("operation", "HeadBucket"), ("outcome", "error")]
        ) >= 1.0
    );

    // A push meanwhile fails (PutObject cannot connect), and is counted as a failed upload.
    let data = pseudo_bytes(7, 10_000);
    let r =
        o.c.post(o.url(&format!(
            "/v2/{REPO}/blobs/uploads/?digest={}",
            sha256_digest(&data)
        )))
        .body(data)
        .send()
        .unwrap();
    let status = r.status().as_u16();
    eprintln!("push during the outage: {status} {}", r.text().unwrap());
    let after = o.scrape_counted(m.sum("berth_http_requests_total", &[]) + 1.0);
    assert_eq!(
        request_deltas(&m, &after),
        expected_requests(&[("POST", R_UPLOADS, status, 1)])
    );
    assert_eq!(status, 503);
    for (outcome, n) in [("started", 1.0), ("failed", 1.0), ("finished", 0.0)] {
        assert_eq!(
            delta(&m, &after, "berth_uploads_total", &[("outcome", outcome)]),
            n,
            "{outcome}"
        );
    }
    // Not asserted: `cancelled` moves too (monolithic_upload cleans up through cancel_upload,
    // which counts the session as cancelled as well as failed).
    eprintln!(
        "cancelled moved by {} for that failed monolithic upload",
        delta(
            &m,
            &after,
            "berth_uploads_total",
            &[("outcome", "cancelled")]
        )
    );
    assert!(
        delta(
            &m,
            &after,
            "berth_object_store_requests_total",
            &[("operation", "PutObject"), ("outcome", "error")]
        ) == 1.0
    );

    // It comes back on the same port.
    fwd.resume();
    let resumed = Instant::now();
    wait_until(Duration::from_secs(15), "/readyz is 200 again", || {
        (o.ops_get("/readyz").0 == 200).then_some(())
    });
    eprintln!("ready again after {:?}", resumed.elapsed());
    assert_eq!(o.scrape().value("berth_object_store_up", &[]), 1.0);
    // And berth uses it again.
    o.push_blob(REPO, b"after the outage");
}

// ---------------------------------------------------------------------------------------------
// access log
// ---------------------------------------------------------------------------------------------

fn access_lines(log: &str) -> Vec<Value> {
    log.lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

/// `log_format: json`: one JSON object per request on stdout with the documented fields; a
/// proxied blob GET logs the client's path, not the presigned upstream URL; no secret.
#[test]
fn access_log_json_lines() {
    let s3 = S3Server::start();
    let o = Observed::start("log_format: json\n", Some(&s3));
    let data = pseudo_bytes(5, 12_345);
    let digest = o.push_blob(REPO, &data);
    assert_eq!(o.head(&format!("/v2/{REPO}/blobs/{digest}")).status(), 200);
    let r = o.get(&format!("/v2/{REPO}/blobs/{digest}"));
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().unwrap().len(), data.len());
    let missing = sha256_digest(b"missing");
    assert_eq!(o.get(&format!("/v2/{REPO}/blobs/{missing}")).status(), 404);
    // The scrape is not a registry request: it is not logged.
    o.scrape();

    // GET /v2/ (the harness's readiness check) and the four above.
    let lines = wait_until(Duration::from_secs(10), "5 access lines", || {
        let l = access_lines(&o.berth.log());
        (l.len() >= 5).then_some(l)
    });
    let log = o.berth.log();
    assert_eq!(lines.len(), 5, "{log}");
    let keys: BTreeSet<&str> = [
        "time",
        "client",
        "method",
        "path",
        "status",
        "bytes_in",
        "bytes_out",
        "duration_seconds",
        "route",
        "user",
        "error",
    ]
    .into();
    for l in &lines {
        let have: BTreeSet<&str> = l.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(have, keys, "{l}");
        let time = humantime::parse_rfc3339(l["time"].as_str().unwrap()).unwrap();
        let age = std::time::SystemTime::now()
            .duration_since(time)
            .unwrap_or_default();
        assert!(age < Duration::from_secs(120), "{l}");
        let client: SocketAddr = l["client"].as_str().unwrap().parse().unwrap();
        assert!(client.ip().is_loopback(), "{l}");
        assert!(l["path"].as_str().unwrap().starts_with('/'), "{l}");
        assert!(ROUTES.contains(&l["route"].as_str().unwrap()), "{l}");
        let d = l["duration_seconds"].as_f64().unwrap();
        assert!((0.0..60.0).contains(&d), "{l}");
        assert!(l["bytes_in"].is_u64() && l["bytes_out"].is_u64() && l["status"].is_u64());
        assert!(l["user"].is_null(), "no authentication: {l}");
    }
    let find = |method: &str, path: &str| -> &Value {
        lines
            .iter()
            .find(|l| l["method"] == method && l["path"] == path)
            .unwrap_or_else(|| panic!("no {method} {path} line in:\n{log}"))
    };
    let l = find("GET", "/v2/");
    assert_eq!(
        (l["status"].as_u64(), l["route"].as_str()),
        (Some(200), Some(R_V2))
    );
    let l = find(
        "POST",
        &format!("/v2/{REPO}/blobs/uploads/?digest={digest}"),
    );
    assert_eq!(l["status"], 201);
    assert_eq!(l["bytes_in"], data.len());
    assert_eq!(l["route"], R_UPLOADS);
    assert!(l["error"].is_null(), "{l}");
    let blob_path = format!("/v2/{REPO}/blobs/{digest}");
    let l = find("HEAD", &blob_path);
    assert_eq!(
        (l["status"].as_u64(), l["bytes_out"].as_u64()),
        (Some(200), Some(0))
    );
    let l = find("GET", &blob_path);
    assert_eq!(l["status"], 200);
    assert_eq!(l["bytes_out"], data.len(), "the proxied body");
    assert_eq!(l["bytes_in"], 0);
    assert_eq!(l["route"], R_BLOB);
    let l = find("GET", &format!("/v2/{REPO}/blobs/{missing}"));
    assert_eq!(l["status"], 404);
    assert!(l["bytes_out"].as_u64().unwrap() > 0, "an error body: {l}");

    // The proxied GET went upstream with a presigned URL; none of it reaches the log.
    assert!(
        !log.to_ascii_lowercase().contains("x-amz-"),
        "presigned query in:\n{log}"
    );
    assert!(
        !log.contains(S3_SECRET_KEY),
        "the secret key is in the log:\n{log}"
    );

    // access_log: false: requests, no access lines.
    let quiet = Observed::start("log_format: json\naccess_log: false\n", Some(&s3));
    quiet.push_blob(REPO, &data);
    let r = quiet.get(&format!("/v2/{REPO}/blobs/{digest}"));
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().unwrap().len(), data.len());
    // Lines are written right after each response; give a stray one time to show.
    std::thread::sleep(Duration::from_millis(500));
    let log = quiet.berth.log();
    assert!(access_lines(&log).is_empty(), "{log}");
    // Nor text lines.
    assert!(!log.contains("route="), "{log}");
    assert!(
        !log.contains(&format!("\"GET /v2/{REPO}/blobs/{digest}\"")),
        "{log}"
    );
}

/// Access lines are written in batches; the last batch is written when berth stops, not lost.
#[test]
fn access_log_is_flushed_at_shutdown() {
    let mut o = Observed::start("log_format: json\nshutdown_grace: 0s\n", None);
    for _ in 0..20 {
        assert_eq!(o.get("/v2/_catalog").status(), 200);
    }
    o.berth.signal(libc::SIGTERM);
    let status = o.berth.wait_exit(Duration::from_secs(20));
    assert!(status.success(), "{status}");
    let log = o.berth.log();
    let catalog = access_lines(&log)
        .iter()
        .filter(|l| l["path"] == "/v2/_catalog" && l["status"] == 200)
        .count();
    assert_eq!(catalog, 20, "{log}");
}

// ---------------------------------------------------------------------------------------------
// promtool, a real Prometheus, the Grafana dashboard
// ---------------------------------------------------------------------------------------------

/// Some traffic, so that labelled series exist: uploads, a proxied GET, a 404, an unmatched
/// route.
fn some_traffic(o: &Observed) {
    let data = pseudo_bytes(6, 20_000);
    let config = b"{}".to_vec();
    let d = o.push_blob(REPO, &data);
    let c = o.push_blob(REPO, &config);
    o.put_manifest(
        REPO,
        "v1",
        &image_manifest((&c, config.len()), &[(&d, data.len())]),
    );
    assert_eq!(o.get(&format!("/v2/{REPO}/manifests/v1")).status(), 200);
    assert_eq!(
        o.get(&format!("/v2/{REPO}/blobs/{d}"))
            .bytes()
            .unwrap()
            .len(),
        data.len()
    );
    assert_eq!(o.get(&format!("/v2/{REPO}/manifests/nope")).status(), 404);
    assert_eq!(o.get("/nothing/here").status(), 404);
}

#[test]
fn promtool_accepts_the_exposition() {
    if !have_tool("promtool", "prometheus") {
        return;
    }
    let o = Observed::start("", None);
    some_traffic(&o);
    let text = o.metrics_text();
    // Our parser agrees it is well-formed; promtool lints it.
    Exposition::parse(&text).unwrap();
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{said}\n{text}"
    );
    assert_eq!(said.trim(), "", "promtool has remarks:\n{said}");
}

/// A Prometheus process, killed on drop.
struct Prometheus {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
    c: Client,
}

impl Prometheus {
    fn start(config_yaml: &str) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(&config, config_yaml).unwrap();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let port = free_port();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start prometheus");
        let mut p = Prometheus {
            child,
            port,
            dir,
            c: client(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = p.child.try_wait().unwrap() {
                panic!("prometheus exited with {status}:\n{}", p.log());
            }
            let ready =
                p.c.get(format!("http://127.0.0.1:{port}/-/ready"))
                    .send()
                    .is_ok_and(|r| r.status() == 200);
            if ready {
                return p;
            }
            assert!(
                Instant::now() < deadline,
                "prometheus not ready:\n{}",
                p.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// An instant query; returns `data.result`. Panics unless the query succeeds.
    fn query(&self, promql: &str) -> Vec<Value> {
        let q = percent_encoding::utf8_percent_encode(promql, percent_encoding::NON_ALPHANUMERIC);
        let r = self
            .c
            .get(format!(
                "http://127.0.0.1:{}/api/v1/query?query={q}",
                self.port
            ))
            .send()
            .unwrap();
        let status = r.status();
        let body = r.text().unwrap();
        let v: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
        assert!(
            status == 200 && v["status"] == "success",
            "query {promql:?}: {status} {body}"
        );
        v["data"]["result"].as_array().cloned().unwrap_or_default()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The series of a query result as (labels without __name__, value).
fn prom_series(result: &[Value]) -> BTreeMap<BTreeMap<String, String>, f64> {
    result
        .iter()
        .map(|s| {
            let labels = s["metric"]
                .as_object()
                .unwrap()
                .iter()
                .filter(|(k, _)| k.as_str() != "__name__")
                .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
                .collect();
            let value = s["value"][1].as_str().unwrap().parse::<f64>().unwrap();
            (labels, value)
        })
        .collect()
}

/// The dashboard's PromQL expressions (targets and variable queries).
fn dashboard_exprs(d: &Value) -> Vec<String> {
    let mut out = Vec::new();
    for p in d["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().into_iter().flatten() {
            out.push(t["expr"].as_str().unwrap().to_string());
        }
    }
    out
}

fn dashboard() -> Value {
    let path = repo_file("deploy/grafana-dashboard.json");
    let text = std::fs::read_to_string(&path).unwrap();
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `deploy/prometheus.yml` (with berth's ops port as target and a 1 s scrape interval) makes
/// a real Prometheus scrape berth: the series a push produced are there, with berth's values,
/// and every PromQL expression of the Grafana dashboard evaluates.
#[test]
fn real_prometheus_scrapes_berth() {
    if !have_tool("prometheus", "prometheus") || !have_tool("promtool", "prometheus") {
        return;
    }
    let shipped = repo_file("deploy/prometheus.yml");
    let out = Command::new("promtool")
        .args(["check", "config"])
        .arg(&shipped)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "promtool check config deploy/prometheus.yml:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let mut config: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(&shipped).unwrap()).unwrap();
    let job = &mut config["scrape_configs"][0];
    assert_eq!(job["job_name"].as_str(), Some("berth"));
    assert_eq!(job["metrics_path"].as_str(), Some("/metrics"));
    let targets = &mut job["static_configs"][0]["targets"];
    assert_eq!(
        targets,
        &serde_yaml::Value::Sequence(vec!["127.0.0.1:9090".into()]),
        "the shipped default target"
    );

    let o = Observed::start("", None);
    *targets = serde_yaml::Value::Sequence(vec![format!("127.0.0.1:{}", o.metrics_port).into()]);
    config["global"]["scrape_interval"] = "1s".into();
    config["global"]["evaluation_interval"] = "1s".into();
    let prom = Prometheus::start(&serde_yaml::to_string(&config).unwrap());

    some_traffic(&o);
    let instance = format!("127.0.0.1:{}", o.metrics_port);
    let with_target = |labels: &BTreeMap<String, String>| {
        let mut l = labels.clone();
        l.insert("job".into(), "berth".into());
        l.insert("instance".into(), instance.clone());
        l
    };
    // berth's own values once the traffic is counted (nothing else happens afterwards).
    let direct = wait_until(Duration::from_secs(10), "the traffic is counted", || {
        let m = o.scrape();
        (m.sum("berth_http_requests_total", &[]) >= 8.0).then_some(m)
    });
    let want: BTreeMap<_, _> = direct
        .series("berth_http_requests_total")
        .map(|s| (with_target(&s.labels), s.value))
        .collect();
    let got = wait_until(
        Duration::from_secs(20),
        "Prometheus has berth's berth_http_requests_total",
        || {
            let got = prom_series(&prom.query("berth_http_requests_total"));
            (got == want).then_some(got)
        },
    );
    let key = |m: &str, r: &str, s: &str| {
        with_target(
            &[("method", m), ("route", r), ("status", s)]
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    };
    assert_eq!(got[&key("PUT", R_MANIFEST, "201")], 1.0);
    assert_eq!(got[&key("POST", R_UPLOADS, "201")], 2.0);
    assert_eq!(got[&key("GET", R_BLOB, "200")], 1.0);
    assert_eq!(got[&key("GET", R_MANIFEST, "404")], 1.0);
    assert_eq!(got[&key("GET", R_UNMATCHED, "404")], 1.0);

    let finished = prom_series(&prom.query(r#"berth_uploads_total{outcome="finished"}"#));
    let mut l = BTreeMap::new();
    l.insert("outcome".to_string(), "finished".to_string());
    assert_eq!(finished, BTreeMap::from([(with_target(&l), 2.0)]));
    let up = prom_series(&prom.query(r#"up{job="berth"}"#));
    assert_eq!(up.values().copied().collect::<Vec<_>>(), vec![1.0]);
    let ready = prom_series(&prom.query("berth_object_store_up"));
    assert_eq!(ready.values().copied().collect::<Vec<_>>(), vec![1.0]);

    // Every dashboard expression is valid PromQL that Prometheus evaluates, with Grafana's
    // variables filled in as Grafana would.
    let d = dashboard();
    for expr in dashboard_exprs(&d) {
        let q = expr
            .replace("$__rate_interval", "1m")
            .replace("$job", "berth")
            .replace("$instance", ".*");
        prom.query(&q);
    }
    // With two scrapes after the traffic, the request-rate panel shows the routes pushed to.
    let rates = wait_until(Duration::from_secs(10), "request rates", || {
        let r = prom_series(&prom.query(
            r#"sum by (route) (rate(berth_http_requests_total{job=~"berth", instance=~".*"}[1m]))"#,
        ));
        (r.len() >= 4).then_some(r)
    });
    assert!(
        rates.keys().all(|l| ROUTES.contains(&l["route"].as_str())),
        "{rates:?}"
    );
    drop(prom);
}

/// Every metric name the dashboard uses is one berth exports (histograms through their
/// `_bucket`/`_sum`/`_count` series), and the dashboard has the panels it promises.
#[test]
fn dashboard_uses_only_exported_metrics() {
    let d = dashboard();
    // Importable: a Prometheus datasource input used by every panel and target.
    let inputs = d["__inputs"].as_array().unwrap();
    assert!(
        inputs
            .iter()
            .any(|i| i["name"] == "DS_PROMETHEUS" && i["pluginId"] == "prometheus"),
        "{inputs:?}"
    );
    let mut ids = BTreeSet::new();
    for p in d["panels"].as_array().unwrap() {
        assert!(
            ids.insert(p["id"].as_u64().unwrap()),
            "duplicate panel id {}",
            p["id"]
        );
        let g = &p["gridPos"];
        assert!(
            g["x"].as_u64().unwrap() + g["w"].as_u64().unwrap() <= 24,
            "{}",
            p["title"]
        );
        if p["type"] == "row" {
            continue;
        }
        assert_eq!(p["datasource"]["uid"], "${DS_PROMETHEUS}", "{}", p["title"]);
        let targets = p["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{}", p["title"]);
        for t in targets {
            assert_eq!(t["datasource"]["uid"], "${DS_PROMETHEUS}", "{}", p["title"]);
        }
    }

    // Every metric-looking name in any string of the dashboard.
    let mut strings = Vec::new();
    fn collect<'a>(v: &'a Value, out: &mut Vec<&'a str>) {
        match v {
            Value::String(s) => out.push(s),
            Value::Array(a) => a.iter().for_each(|v| collect(v, out)),
            Value::Object(o) => o.values().for_each(|v| collect(v, out)),
            _ => {}
        }
    }
    collect(&d, &mut strings);
    let mut used = BTreeSet::new();
    for s in strings {
        for prefix in ["berth_", "process_"] {
            let mut from = 0;
            while let Some(i) = s[from..].find(prefix) {
                let start = from + i;
                let before_ok = s[..start]
                    .chars()
                    .next_back()
                    .is_none_or(|c| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'));
                let end = s[start..]
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
                    .map_or(s.len(), |e| start + e);
                if before_ok {
                    used.insert(s[start..end].to_string());
                }
                from = end;
            }
        }
    }

    let o = Observed::start("", None);
    let m = o.scrape();
    let exported: BTreeSet<String> = m
        .sample_names()
        .into_iter()
        .chain(m.types.keys().cloned())
        .collect();
    let missing: Vec<_> = used.iter().filter(|n| !exported.contains(*n)).collect();
    assert!(
        missing.is_empty(),
        "the dashboard uses metrics berth does not export: {missing:?}"
    );

    for required in [
        "berth_http_requests_total",
        "berth_http_request_duration_seconds_bucket",
        "berth_blob_received_bytes_total",
        "berth_blob_sent_bytes_total",
        "berth_uploads_in_progress",
        "berth_uploads_total",
        "berth_upload_buffered_bytes",
        "berth_object_store_requests_total",
        "berth_object_store_request_duration_seconds_bucket",
        "berth_metadata_operation_duration_seconds_bucket",
        "berth_object_store_up",
        "berth_metadata_store_up",
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
        "process_open_fds",
    ] {
        assert!(used.contains(required), "no panel uses {required}");
    }
    let exprs = dashboard_exprs(&d);
    for q in ["0.5", "0.9", "0.99"] {
        let prefix = format!("histogram_quantile({q}, sum by (route, le) (rate(berth_http_request_duration_seconds_bucket");
        assert!(
            exprs.iter().any(|e| e.starts_with(&prefix)),
            "no p{q} latency by route"
        );
    }
    for (metric, by) in [
        (
            "berth_object_store_request_duration_seconds_bucket",
            "operation",
        ),
        (
            "berth_metadata_operation_duration_seconds_bucket",
            "operation",
        ),
    ] {
        let prefix = format!("histogram_quantile(0.99, sum by ({by}, le) (rate({metric}");
        assert!(
            exprs.iter().any(|e| e.starts_with(&prefix)),
            "no p99 of {metric}"
        );
    }
    assert!(
        exprs
            .iter()
            .any(|e| e.contains("berth_http_requests_total") && e.contains(r#"status=~"5..""#)),
        "no 5xx panel"
    );
}
