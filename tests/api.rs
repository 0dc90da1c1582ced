//! The OCI distribution API over real HTTP, against berth and a real S3 server.
//!
//! Every test starts its own berth (embedded object store unless it says otherwise) and talks
//! to it with a blocking client that does not follow redirects.

mod common;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::time::Duration;

use common::*;
use reqwest::blocking::{Body, Client, Response};
use serde_json::{json, Value};

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const OCI_EMPTY: &str = "application/vnd.oci.empty.v1+json";
const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
const DOCKER_LAYER: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
const EMPTY_SHA256: &str =
    "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
const MIB: usize = 1 << 20;

// ---------------------------------------------------------------------------------------------
// helpers
// ---------------------------------------------------------------------------------------------

/// A berth and a client.
struct Reg {
    berth: Berth,
    c: Client,
}

impl Reg {
    fn start() -> Reg {
        Reg::with("")
    }

    fn with(extra_yaml: &str) -> Reg {
        Reg {
            berth: Berth::start(extra_yaml),
            c: client(),
        }
    }

    fn against(s3: &S3Server) -> Reg {
        Reg {
            berth: Berth::start_with("", Some(s3)),
            c: client(),
        }
    }

    /// `path` relative to berth, or an absolute URL as is (a Location may be either).
    fn url(&self, path: &str) -> String {
        if path.starts_with("http://") || path.starts_with("https://") {
            path.to_string()
        } else {
            self.berth.url(path)
        }
    }

    fn get(&self, path: &str) -> Response {
        self.c.get(self.url(path)).send().unwrap()
    }

    fn head(&self, path: &str) -> Response {
        self.c.head(self.url(path)).send().unwrap()
    }

    fn delete(&self, path: &str) -> Response {
        self.c.delete(self.url(path)).send().unwrap()
    }

    /// Monolithic upload (`POST ?digest=` with the body); asserts 201, returns the digest.
    #[track_caller]
    fn push_blob(&self, repo: &str, bytes: &[u8]) -> String {
        self.berth.push_blob(&self.c, repo, bytes)
    }

    /// `POST .../blobs/uploads/`; asserts 202 and returns the session's Location.
    #[track_caller]
    fn start_upload(&self, repo: &str) -> String {
        let r = self
            .c
            .post(self.url(&format!("/v2/{repo}/blobs/uploads/")))
            .send()
            .unwrap();
        assert_eq!(r.status(), 202, "start upload: {}", r.text().unwrap());
        assert_api_version(&r);
        let loc = hdr(&r, "location");
        assert!(
            loc.contains(&format!("/v2/{repo}/blobs/uploads/")),
            "Location {loc}"
        );
        assert_eq!(hdr(&r, "range"), "0-0");
        let uuid = hdr(&r, "docker-upload-uuid");
        assert!(loc.ends_with(&uuid), "Location {loc} lacks the UUID {uuid}");
        loc
    }

    /// PATCH with a sized body and a Content-Range; asserts 202 and returns the new Location.
    #[track_caller]
    fn patch(&self, loc: &str, start: usize, bytes: &[u8]) -> String {
        let end = start + bytes.len() - 1;
        let r = self
            .c
            .patch(self.url(loc))
            .header("Content-Type", "application/octet-stream")
            .header("Content-Range", format!("{start}-{end}"))
            .body(bytes.to_vec())
            .send()
            .unwrap();
        assert_eq!(
            r.status(),
            202,
            "PATCH {start}-{end}: {}",
            r.text().unwrap()
        );
        assert_api_version(&r);
        assert_eq!(hdr(&r, "range"), format!("0-{end}"));
        hdr(&r, "location")
    }

    /// `PUT <loc>?digest=` closing an upload session, with `last` (if not empty) as its body.
    fn finish_upload(&self, loc: &str, digest: &str, last: &[u8]) -> Response {
        let put = self
            .c
            .put(self.url(&with_query(loc, &format!("digest={digest}"))));
        if last.is_empty() {
            put
        } else {
            put.body(last.to_vec())
        }
        .send()
        .unwrap()
    }

    /// GETs a blob; asserts 200 and that its bytes are `want`.
    #[track_caller]
    fn assert_blob(&self, repo: &str, digest: &str, want: &[u8]) {
        let r = self.get(&format!("/v2/{repo}/blobs/{digest}"));
        assert_eq!(r.status(), 200, "GET {repo}@{digest}");
        let got = r.bytes().unwrap();
        assert!(
            got.as_ref() == want,
            "GET {repo}@{digest}: {} bytes that differ from the {} pushed",
            got.len(),
            want.len()
        );
    }

    fn put_manifest(&self, repo: &str, reference: &str, media_type: &str, body: &[u8]) -> Response {
        self.c
            .put(self.url(&format!("/v2/{repo}/manifests/{reference}")))
            .header("Content-Type", media_type)
            .body(body.to_vec())
            .send()
            .unwrap()
    }

    /// Pushes a config and two layers, then an OCI image manifest tagged `tag`. Returns the
    /// manifest's digest and bytes.
    fn push_image(&self, repo: &str, tag: &str, seed: u8) -> (String, Vec<u8>) {
        let config = format!("{{\"architecture\":\"amd64\",\"os\":\"linux\",\"seed\":{seed}}}");
        let l1 = pseudo_bytes(seed as u64 * 2 + 1, 1000 + seed as usize);
        let l2 = pseudo_bytes(seed as u64 * 2 + 2, 3000 + seed as usize);
        let cd = self.push_blob(repo, config.as_bytes());
        let d1 = self.push_blob(repo, &l1);
        let d2 = self.push_blob(repo, &l2);
        let body = image_manifest(
            OCI_MANIFEST,
            (OCI_CONFIG, &cd, config.len()),
            &[(OCI_LAYER, &d1, l1.len()), (OCI_LAYER, &d2, l2.len())],
        );
        let r = self.put_manifest(repo, tag, OCI_MANIFEST, &body);
        assert_eq!(r.status(), 201, "push manifest: {}", r.text().unwrap());
        (sha256_digest(&body), body)
    }
}

fn pseudo_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    PseudoRandom::new(seed, len as u64)
        .read_exact(&mut v)
        .unwrap();
    v
}

/// An image manifest; pretty-printed with a trailing newline, so that the bytes are not what
/// a re-serialization would give (byte-exact storage shows).
fn image_manifest(
    media_type: &str,
    config: (&str, &str, usize),
    layers: &[(&str, &str, usize)],
) -> Vec<u8> {
    let layers: Vec<Value> = layers
        .iter()
        .map(|(mt, d, s)| json!({"mediaType": mt, "digest": d, "size": s}))
        .collect();
    let m = json!({
        "schemaVersion": 2,
        "mediaType": media_type,
        "config": {"mediaType": config.0, "digest": config.1, "size": config.2},
        "layers": layers,
    });
    let mut body = serde_json::to_vec_pretty(&m).unwrap();
    body.push(b'\n');
    body
}

/// reqwest is built without its `json` feature.
trait JsonBody {
    fn json_value(self) -> Value;
}

impl JsonBody for Response {
    fn json_value(self) -> Value {
        let url = self.url().to_string();
        let body = self.text().unwrap();
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{url}: not JSON ({e}): {body}"))
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

#[track_caller]
fn assert_api_version(r: &Response) {
    assert_eq!(
        r.headers()
            .get("docker-distribution-api-version")
            .map(|v| v.to_str().unwrap()),
        Some("registry/2.0"),
        "{} {} lacks Docker-Distribution-API-Version",
        r.url(),
        r.status()
    );
}

/// Asserts an OCI error answer: status, API version header, JSON body with `code`.
#[track_caller]
fn expect_error(r: Response, status: u16, code: &str) -> Value {
    let url = r.url().to_string();
    assert_eq!(r.status(), status, "{url}");
    assert_api_version(&r);
    assert!(
        hdr(&r, "content-type").starts_with("application/json"),
        "{url}: error content type"
    );
    let body = r.text().unwrap();
    assert_eq!(error_code(&body), code, "{url}: {body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert!(v["errors"][0]["message"].is_string(), "{body}");
    v
}

/// An error answer to a HEAD: status, API version header, no body.
#[track_caller]
fn expect_head_error(r: Response, status: u16) {
    let url = r.url().to_string();
    assert_eq!(r.status(), status, "HEAD {url}");
    assert_api_version(&r);
    assert!(r.bytes().unwrap().is_empty(), "HEAD {url} has a body");
}

/// Adds a query parameter to a URL or path that may already have a query.
fn with_query(loc: &str, param: &str) -> String {
    let sep = if loc.contains('?') { '&' } else { '?' };
    format!("{loc}{sep}{param}")
}

/// The target of a `Link: <...>; rel="next"` header, if any.
fn next_link(r: &Response) -> Option<String> {
    let link = r.headers().get("link")?.to_str().unwrap().to_string();
    assert!(link.contains("rel=\"next\""), "{link}");
    let start = link.find('<').unwrap() + 1;
    let end = link.find('>').unwrap();
    Some(link[start..end].to_string())
}

/// Follows `Link` headers from `path`, collecting `key` from every page.
fn collect_pages(reg: &Reg, path: &str, key: &str) -> (Vec<String>, usize) {
    let mut all = Vec::new();
    let mut next = Some(path.to_string());
    let mut pages = 0;
    while let Some(p) = next {
        pages += 1;
        assert!(pages < 100, "pagination does not end");
        let r = reg.get(&p);
        assert_eq!(r.status(), 200, "{p}");
        assert_api_version(&r);
        next = next_link(&r);
        let v: Value = r.json_value();
        for t in v[key].as_array().unwrap() {
            all.push(t.as_str().unwrap().to_string());
        }
    }
    (all, pages)
}

type RawResponse = (u16, Vec<(String, String)>, Vec<u8>);

/// One raw HTTP/1.1 request on a fresh connection (for requests reqwest won't make, e.g. a
/// Content-Length announcing a body that is never sent). Returns status, lowercase header
/// pairs and body.
fn raw_request(port: u16, request: &str) -> RawResponse {
    let mut s = raw_connect(port);
    s.write_all(request.as_bytes()).unwrap();
    read_raw_response(&mut s, &mut Vec::new())
}

fn raw_connect(port: u16) -> std::net::TcpStream {
    let s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

/// Reads one response (head, then a Content-Length body); `buf` holds bytes read but not yet
/// used, between calls.
fn read_raw_response(s: &mut std::net::TcpStream, buf: &mut Vec<u8>) -> RawResponse {
    read_raw(s, buf, false)
}

/// As [`read_raw_response`]; for a HEAD, no body follows whatever Content-Length says.
fn read_raw(s: &mut std::net::TcpStream, buf: &mut Vec<u8>, is_head: bool) -> RawResponse {
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        let n = s.read(&mut chunk).unwrap();
        assert!(n > 0, "connection closed before the response head");
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8(buf[..head_end].to_vec()).unwrap();
    buf.drain(..head_end + 4);
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let len: usize = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .map(|(_, v)| v.parse().unwrap())
        .filter(|_| !is_head && status >= 200 && status != 204 && status != 304)
        .unwrap_or(0);
    while buf.len() < len {
        let n = s.read(&mut chunk).unwrap();
        assert!(n > 0, "connection closed inside the body");
        buf.extend_from_slice(&chunk[..n]);
    }
    let body: Vec<u8> = buf.drain(..len).collect();
    (status, headers, body)
}

fn raw_header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

// ---------------------------------------------------------------------------------------------
// base
// ---------------------------------------------------------------------------------------------

#[test]
fn base_endpoint_and_banner() {
    let reg = Reg::start();
    for path in ["/v2/", "/v2"] {
        let r = reg.get(path);
        assert_eq!(r.status(), 200, "{path}");
        assert_api_version(&r);
        assert_eq!(hdr(&r, "content-type"), "application/json");
        assert_eq!(r.text().unwrap(), "{}");
    }
    let r = reg.head("/v2/");
    assert_eq!(r.status(), 200);
    assert_api_version(&r);
    assert_eq!(hdr(&r, "content-length"), "2");
    assert!(r.bytes().unwrap().is_empty());

    let r = reg.get("/");
    assert_eq!(r.status(), 200);
    assert_api_version(&r);
    assert!(hdr(&r, "content-type").starts_with("text/plain"));
    let banner = r.text().unwrap();
    assert!(banner.starts_with("berth registry server "), "{banner}");
    assert!(banner.ends_with('\n'));

    // Only GET/HEAD there.
    let r = reg.c.post(reg.url("/v2/")).send().unwrap();
    expect_error(r, 405, "UNSUPPORTED");
    let r = reg.c.delete(reg.url("/")).send().unwrap();
    expect_error(r, 405, "UNSUPPORTED");
}

/// Every answer carries `Docker-Distribution-API-Version`, errors and HEADs included.
#[test]
fn api_version_header_on_every_response() {
    let reg = Reg::start();
    let (mdigest, _) = reg.push_image("ver/repo", "v1", 1);
    let blob = reg.push_blob("ver/repo", b"some bytes");
    let loc = reg.start_upload("ver/repo");
    let missing = sha256_digest(b"missing");
    let mut responses = vec![
        reg.get("/v2/"),
        reg.get("/"),
        reg.get("/v2/_catalog"),
        reg.get("/v2/ver/repo/tags/list"),
        reg.get("/v2/ver/repo/manifests/v1"),
        reg.head("/v2/ver/repo/manifests/v1"),
        reg.get(&format!("/v2/ver/repo/blobs/{blob}")),
        reg.head(&format!("/v2/ver/repo/blobs/{blob}")),
        reg.get(&format!("/v2/ver/repo/referrers/{mdigest}")),
        reg.get(&loc),
        // errors
        reg.get("/v3/"),
        reg.get("/nope"),
        reg.get("/v2/Bad/tags/list"),
        reg.get("/v2/ver/repo/manifests/nope"),
        reg.head("/v2/ver/repo/manifests/nope"),
        reg.get(&format!("/v2/ver/repo/blobs/{missing}")),
        reg.head(&format!("/v2/ver/repo/blobs/{missing}")),
        reg.get("/v2/ver/repo/blobs/uploads/no-such-session"),
        reg.get("/v2/unknown/tags/list"),
        reg.get("/v2/_catalog?n=x"),
        reg.c
            .post(reg.url("/v2/ver/repo/manifests/v1"))
            .send()
            .unwrap(),
        reg.c
            .patch(reg.url(&loc))
            .header("Content-Range", "5-9")
            .body(vec![0u8; 5])
            .send()
            .unwrap(),
        reg.c
            .get(reg.url(&format!("/v2/ver/repo/blobs/{blob}")))
            .header("Range", "bytes=1000-2000")
            .send()
            .unwrap(),
    ];
    responses.push(reg.delete(&format!("/v2/ver/repo/manifests/{mdigest}")));
    responses.push(reg.delete(&loc));
    for r in &responses {
        assert_api_version(r);
    }
    let statuses: BTreeSet<u16> = responses.iter().map(|r| r.status().as_u16()).collect();
    for s in [200, 202, 204, 400, 404, 405, 416] {
        assert!(statuses.contains(&s), "no {s} among {statuses:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// blob uploads
// ---------------------------------------------------------------------------------------------

#[test]
fn monolithic_upload() {
    let reg = Reg::start();
    let data = pseudo_bytes(1, 100_000);
    let digest = sha256_digest(&data);
    let r = reg
        .c
        .post(reg.url(&format!("/v2/library/mono/blobs/uploads/?digest={digest}")))
        .header("Content-Type", "application/octet-stream")
        .body(data.clone())
        .send()
        .unwrap();
    assert_eq!(r.status(), 201);
    assert_api_version(&r);
    assert_eq!(
        hdr(&r, "location"),
        format!("/v2/library/mono/blobs/{digest}")
    );
    assert_eq!(hdr(&r, "docker-content-digest"), digest);
    assert_eq!(hdr(&r, "content-length"), "0");

    let r = reg.get(&hdr(&r, "location"));
    assert_eq!(r.status(), 200);
    assert_eq!(hdr(&r, "docker-content-digest"), digest);
    assert_eq!(r.bytes().unwrap().as_ref(), &data[..]);

    // The digest parameter percent-encoded, as some clients send it.
    let data = pseudo_bytes(2, 1000);
    let digest = sha256_digest(&data);
    let r = reg
        .c
        .post(reg.url(&format!(
            "/v2/library/mono/blobs/uploads/?digest={}",
            digest.replace(':', "%3A")
        )))
        .body(data.clone())
        .send()
        .unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(hdr(&r, "docker-content-digest"), digest);
    assert_eq!(
        reg.head(&format!("/v2/library/mono/blobs/{digest}"))
            .status(),
        200
    );
}

/// A larger monolithic upload streamed with a known length (one streaming PutObject), and one
/// with chunked framing (no length: it goes through parts).
#[test]
fn monolithic_upload_streamed_sized_and_chunked() {
    let reg = Reg::start();
    for (seed, chunked) in [(11u64, false), (12u64, true)] {
        let len = 9 * MIB as u64 + 123;
        let digest = PseudoRandom::digest(seed, len);
        let body = if chunked {
            Body::new(PseudoRandom::new(seed, len))
        } else {
            Body::sized(PseudoRandom::new(seed, len), len)
        };
        let r = reg
            .c
            .post(reg.url(&format!("/v2/stream/blobs/uploads/?digest={digest}")))
            .body(body)
            .send()
            .unwrap();
        assert_eq!(r.status(), 201, "chunked={chunked}: {}", r.text().unwrap());
        let r = reg.head(&format!("/v2/stream/blobs/{digest}"));
        assert_eq!(r.status(), 200);
        assert_eq!(hdr(&r, "content-length"), len.to_string());
        let got = reg
            .get(&format!("/v2/stream/blobs/{digest}"))
            .bytes()
            .unwrap();
        assert_eq!(got.len() as u64, len);
        assert_eq!(sha256_digest(&got), digest, "chunked={chunked}");
    }
}

/// POST, one PATCH with chunked transfer encoding (length unknown, crossing a part boundary),
/// then PUT ?digest= with no body.
#[test]
fn chunked_patch_then_put_without_body() {
    let reg = Reg::start();
    let len = 10 * MIB as u64 + 7;
    let digest = PseudoRandom::digest(21, len);
    let loc = reg.start_upload("chunked/patch");
    let r = reg
        .c
        .patch(reg.url(&loc))
        .header("Content-Type", "application/octet-stream")
        .body(Body::new(PseudoRandom::new(21, len)))
        .send()
        .unwrap();
    assert_eq!(r.status(), 202, "{}", r.text().unwrap());
    assert_api_version(&r);
    assert_eq!(hdr(&r, "range"), format!("0-{}", len - 1));
    assert_eq!(hdr(&r, "content-length"), "0");
    let loc = hdr(&r, "location");

    let r = reg.finish_upload(&loc, &digest, &[]);
    assert_eq!(r.status(), 201, "{}", r.text().unwrap());
    assert_eq!(
        hdr(&r, "location"),
        format!("/v2/chunked/patch/blobs/{digest}")
    );
    assert_eq!(hdr(&r, "docker-content-digest"), digest);

    let got = reg
        .get(&format!("/v2/chunked/patch/blobs/{digest}"))
        .bytes()
        .unwrap();
    assert_eq!(got.len() as u64, len);
    assert_eq!(sha256_digest(&got), digest);
    // The session is finished.
    expect_error(reg.get(&loc), 404, "BLOB_UPLOAD_UNKNOWN");
}

/// 7 PATCHes of 3 MiB (each smaller than S3's 5 MiB minimum part; 21 MiB in all, crossing the
/// 8 MiB part size twice), each with Content-Range and Content-Length; Range checked after
/// each, by the PATCH answer and by GET status.
#[test]
fn chunked_upload_many_small_patches() {
    let reg = Reg::start();
    let chunk = 3 * MIB;
    let data = pseudo_bytes(31, 7 * chunk);
    let digest = sha256_digest(&data);
    let mut loc = reg.start_upload("many/patches");
    let uuid = loc.rsplit('/').next().unwrap().to_string();
    for i in 0..7 {
        let start = i * chunk;
        loc = reg.patch(&loc, start, &data[start..start + chunk]);
        let end = start + chunk - 1;
        let r = reg.get(&loc);
        assert_eq!(r.status(), 204);
        assert_api_version(&r);
        assert_eq!(hdr(&r, "range"), format!("0-{end}"), "after PATCH {i}");
        assert_eq!(hdr(&r, "docker-upload-uuid"), uuid);
    }
    let r = reg.finish_upload(&loc, &digest, &[]);
    assert_eq!(r.status(), 201, "{}", r.text().unwrap());
    assert_eq!(hdr(&r, "docker-content-digest"), digest);

    let r = reg.head(&format!("/v2/many/patches/blobs/{digest}"));
    assert_eq!(r.status(), 200);
    assert_eq!(hdr(&r, "content-length"), data.len().to_string());
    reg.assert_blob("many/patches", &digest, &data);
}

/// PATCHes of mixed sizes that start and end on and off the 8 MiB part boundaries (whole
/// parts streamed straight through, partial parts buffered), ending exactly on a boundary.
#[test]
fn chunked_upload_mixed_sizes_across_part_boundaries() {
    let reg = Reg::start();
    let sizes = [3 * MIB, 13 * MIB, 16 * MIB, 1, 8 * MIB - 1, 8 * MIB];
    let total: usize = sizes.iter().sum();
    assert_eq!(total, 48 * MIB);
    let data = pseudo_bytes(35, total);
    let digest = sha256_digest(&data);
    let mut loc = reg.start_upload("mixed/sizes");
    let mut at = 0;
    for n in sizes {
        loc = reg.patch(&loc, at, &data[at..at + n]);
        at += n;
        assert_eq!(hdr(&reg.get(&loc), "range"), format!("0-{}", at - 1));
    }
    let r = reg.finish_upload(&loc, &digest, &[]);
    assert_eq!(r.status(), 201, "{}", r.text().unwrap());
    let r = reg.head(&format!("/v2/mixed/sizes/blobs/{digest}"));
    assert_eq!(hdr(&r, "content-length"), total.to_string());
    reg.assert_blob("mixed/sizes", &digest, &data);
    // A range deep inside, across a part boundary.
    let r = reg
        .c
        .get(reg.url(&format!("/v2/mixed/sizes/blobs/{digest}")))
        .header("Range", format!("bytes={}-{}", 8 * MIB - 10, 8 * MIB + 9))
        .send()
        .unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(
        r.bytes().unwrap().as_ref(),
        &data[8 * MIB - 10..8 * MIB + 10]
    );
}

/// PATCHes, then the last chunk in the PUT body.
#[test]
fn put_with_final_chunk_in_body() {
    let reg = Reg::start();
    // Small: everything stays below one part.
    let data = pseudo_bytes(41, 50_000);
    let digest = sha256_digest(&data);
    let loc = reg.start_upload("final/chunk");
    let loc = reg.patch(&loc, 0, &data[..20_000]);
    let loc = reg.patch(&loc, 20_000, &data[20_000..30_000]);
    let r = reg
        .c
        .put(reg.url(&with_query(&loc, &format!("digest={digest}"))))
        .header("Content-Type", "application/octet-stream")
        .body(data[30_000..].to_vec())
        .send()
        .unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().unwrap());
    assert_eq!(hdr(&r, "docker-content-digest"), digest);
    reg.assert_blob("final/chunk", &digest, &data);

    // Larger: a part already uploaded, the final body completes the next one.
    let data = pseudo_bytes(42, 12 * MIB);
    let digest = sha256_digest(&data);
    let loc = reg.start_upload("final/chunk");
    let loc = reg.patch(&loc, 0, &data[..9 * MIB]);
    let r = reg.finish_upload(&loc, &digest, &data[9 * MIB..]);
    assert_eq!(r.status(), 201, "{}", r.text().unwrap());
    reg.assert_blob("final/chunk", &digest, &data);
}

/// POST then PUT with the whole blob in the body (nothing PATCHed).
#[test]
fn post_then_put_whole_blob() {
    let reg = Reg::start();
    let data = pseudo_bytes(51, 70_000);
    let digest = sha256_digest(&data);
    let loc = reg.start_upload("two/step");
    let r = reg.finish_upload(&loc, &digest, &data);
    assert_eq!(r.status(), 201, "{}", r.text().unwrap());
    assert_eq!(hdr(&r, "location"), format!("/v2/two/step/blobs/{digest}"));
    reg.assert_blob("two/step", &digest, &data);
    expect_error(reg.get(&loc), 404, "BLOB_UPLOAD_UNKNOWN");
}

#[test]
fn upload_status() {
    let reg = Reg::start();
    let loc = reg.start_upload("status/repo");
    let uuid = loc.rsplit('/').next().unwrap().to_string();
    let r = reg.get(&loc);
    assert_eq!(r.status(), 204);
    assert_api_version(&r);
    assert_eq!(hdr(&r, "range"), "0-0");
    assert_eq!(hdr(&r, "docker-upload-uuid"), uuid);
    assert_eq!(hdr(&r, "location"), loc);
    assert_eq!(hdr(&r, "content-length"), "0");
    assert!(r.bytes().unwrap().is_empty());

    // A PATCH without Content-Range appends too.
    let r = reg
        .c
        .patch(reg.url(&loc))
        .body(vec![7u8; 1234])
        .send()
        .unwrap();
    assert_eq!(r.status(), 202);
    assert_eq!(hdr(&r, "range"), "0-1233");
    assert_eq!(hdr(&r, "docker-upload-uuid"), uuid);
    let r = reg.get(&loc);
    assert_eq!(r.status(), 204);
    assert_eq!(hdr(&r, "range"), "0-1233");
}

/// A chunk whose Content-Range does not start where the session stands: 416 with the
/// session's Range; the session is unharmed and goes on with the right chunk.
#[test]
fn out_of_order_patch_is_416() {
    let reg = Reg::start();
    let data = pseudo_bytes(61, 300);
    let digest = sha256_digest(&data);
    let loc = reg.start_upload("order/repo");
    let loc = reg.patch(&loc, 0, &data[..100]);

    for (start, end) in [(200usize, 299usize), (50, 149), (0, 99)] {
        let r = reg
            .c
            .patch(reg.url(&loc))
            .header("Content-Range", format!("{start}-{end}"))
            .body(data[start..=end].to_vec())
            .send()
            .unwrap();
        assert_eq!(r.status(), 416, "{start}-{end}");
        assert_eq!(hdr(&r, "range"), "0-99");
        expect_error(r, 416, "BLOB_UPLOAD_INVALID");
    }
    // Nothing of the refused chunks landed.
    assert_eq!(hdr(&reg.get(&loc), "range"), "0-99");
    let loc = reg.patch(&loc, 100, &data[100..]);
    let r = reg.finish_upload(&loc, &digest, &[]);
    assert_eq!(r.status(), 201);
    reg.assert_blob("order/repo", &digest, &data);

    // A malformed Content-Range is a 400, not a 416.
    let loc = reg.start_upload("order/repo");
    // A chunk not as long as its Content-Range says: 400 SIZE_INVALID (as distribution), and
    // nothing of it lands.
    for (range, len) in [("0-99", 3usize), ("0-1", 3)] {
        let r = reg
            .c
            .patch(reg.url(&loc))
            .header("Content-Range", range)
            .body(vec![9u8; len])
            .send()
            .unwrap();
        expect_error(r, 400, "SIZE_INVALID");
    }
    assert_eq!(hdr(&reg.get(&loc), "range"), "0-0");
    let r = reg
        .c
        .patch(reg.url(&loc))
        .header("Content-Range", "9-3")
        .body(vec![0u8; 7])
        .send()
        .unwrap();
    expect_error(r, 400, "BLOB_UPLOAD_INVALID");
}

/// The wrong digest at the end of an upload: 400 DIGEST_INVALID, nothing served under either
/// digest, and the session is gone. For each way of finishing an upload.
#[test]
fn digest_mismatch_stores_nothing_and_ends_the_session() {
    let reg = Reg::start();
    let repo = "mismatch/repo";
    let check_nothing_served = |data: &[u8], claimed: &str| {
        for d in [claimed.to_string(), sha256_digest(data)] {
            expect_head_error(reg.head(&format!("/v2/{repo}/blobs/{d}")), 404);
            expect_error(
                reg.get(&format!("/v2/{repo}/blobs/{d}")),
                404,
                "BLOB_UNKNOWN",
            );
        }
    };

    // Monolithic POST.
    let data = pseudo_bytes(71, 5000);
    let claimed = sha256_digest(b"something else");
    let r = reg
        .c
        .post(reg.url(&format!("/v2/{repo}/blobs/uploads/?digest={claimed}")))
        .body(data.clone())
        .send()
        .unwrap();
    let v = expect_error(r, 400, "DIGEST_INVALID");
    assert!(
        v["errors"][0]["detail"]
            .as_str()
            .unwrap()
            .contains(&claimed),
        "{v}"
    );
    check_nothing_served(&data, &claimed);

    // POST, then PUT with the whole body.
    let loc = reg.start_upload(repo);
    let r = reg.finish_upload(&loc, &claimed, &data);
    expect_error(r, 400, "DIGEST_INVALID");
    expect_error(reg.get(&loc), 404, "BLOB_UPLOAD_UNKNOWN");
    check_nothing_served(&data, &claimed);

    // PATCH (pending bytes only), PUT without body.
    let loc = reg.start_upload(repo);
    let loc = reg.patch(&loc, 0, &data);
    let r = reg.finish_upload(&loc, &claimed, &[]);
    expect_error(r, 400, "DIGEST_INVALID");
    expect_error(reg.get(&loc), 404, "BLOB_UPLOAD_UNKNOWN");
    expect_error(
        reg.c
            .patch(reg.url(&loc))
            .body(vec![1u8; 10])
            .send()
            .unwrap(),
        404,
        "BLOB_UPLOAD_UNKNOWN",
    );
    check_nothing_served(&data, &claimed);

    // PATCH across a part boundary (a multipart upload exists), PUT with a last chunk.
    let big = pseudo_bytes(72, 9 * MIB);
    let loc = reg.start_upload(repo);
    let loc = reg.patch(&loc, 0, &big[..8 * MIB + 5]);
    let r = reg.finish_upload(&loc, &claimed, &big[8 * MIB + 5..]);
    expect_error(r, 400, "DIGEST_INVALID");
    expect_error(reg.get(&loc), 404, "BLOB_UPLOAD_UNKNOWN");
    check_nothing_served(&big, &claimed);

    // The claimed digest is a blob the registry already stores (in another repository): the
    // client must not get it linked without having its bytes.
    let stored = pseudo_bytes(73, 4000);
    let stored_digest = reg.push_blob("other/repo", &stored);
    let loc = reg.start_upload(repo);
    let r = reg.finish_upload(&loc, &stored_digest, &data);
    expect_error(r, 400, "DIGEST_INVALID");
    expect_error(reg.get(&loc), 404, "BLOB_UPLOAD_UNKNOWN");
    check_nothing_served(&data, &stored_digest);
    let r = reg
        .c
        .post(reg.url(&format!("/v2/{repo}/blobs/uploads/?digest={stored_digest}")))
        .body(data.clone())
        .send()
        .unwrap();
    expect_error(r, 400, "DIGEST_INVALID");
    check_nothing_served(&data, &stored_digest);
    // The stored blob itself is untouched.
    reg.assert_blob("other/repo", &stored_digest, &stored);
}

#[test]
fn cancel_upload() {
    let reg = Reg::start();
    let loc = reg.start_upload("cancel/repo");
    let loc = reg.patch(&loc, 0, &pseudo_bytes(81, 9 * MIB));
    let r = reg.delete(&loc);
    assert_eq!(r.status(), 204);
    assert_api_version(&r);
    expect_error(reg.get(&loc), 404, "BLOB_UPLOAD_UNKNOWN");
    expect_error(reg.delete(&loc), 404, "BLOB_UPLOAD_UNKNOWN");
    let r = reg.finish_upload(&loc, EMPTY_SHA256, &[]);
    expect_error(r, 404, "BLOB_UPLOAD_UNKNOWN");
}

#[test]
fn unknown_upload_session() {
    let reg = Reg::start();
    // The repository exists; the session does not.
    reg.push_blob("sess/repo", b"x");
    for id in ["00000000-0000-0000-0000-000000000000", "not-a-session"] {
        let loc = format!("/v2/sess/repo/blobs/uploads/{id}");
        expect_error(reg.get(&loc), 404, "BLOB_UPLOAD_UNKNOWN");
        let r = reg
            .c
            .patch(reg.url(&loc))
            .body(vec![1u8; 3])
            .send()
            .unwrap();
        expect_error(r, 404, "BLOB_UPLOAD_UNKNOWN");
        let r = reg
            .c
            .put(reg.url(&format!("{loc}?digest={}", sha256_digest(b"abc"))))
            .body(b"abc".to_vec())
            .send()
            .unwrap();
        expect_error(r, 404, "BLOB_UPLOAD_UNKNOWN");
        expect_error(reg.delete(&loc), 404, "BLOB_UPLOAD_UNKNOWN");
    }
}

/// A session belongs to the repository it was started in.
#[test]
fn upload_session_is_bound_to_its_repository() {
    let reg = Reg::start();
    let data = b"bound to a repository".to_vec();
    let digest = sha256_digest(&data);
    let loc = reg.start_upload("owner/a");
    let loc = reg.patch(&loc, 0, &data[..5]);
    let id = loc.rsplit('/').next().unwrap().to_string();
    let other = format!("/v2/owner/b/blobs/uploads/{id}");
    expect_error(reg.get(&other), 404, "BLOB_UPLOAD_UNKNOWN");
    let r = reg
        .c
        .patch(reg.url(&other))
        .header("Content-Range", "5-9")
        .body(data[5..10].to_vec())
        .send()
        .unwrap();
    expect_error(r, 404, "BLOB_UPLOAD_UNKNOWN");
    let r = reg
        .c
        .put(reg.url(&format!("{other}?digest={digest}")))
        .body(data[5..].to_vec())
        .send()
        .unwrap();
    expect_error(r, 404, "BLOB_UPLOAD_UNKNOWN");
    expect_error(reg.delete(&other), 404, "BLOB_UPLOAD_UNKNOWN");
    expect_head_error(reg.head(&format!("/v2/owner/b/blobs/{digest}")), 404);

    // Unharmed in its own repository.
    assert_eq!(hdr(&reg.get(&loc), "range"), "0-4");
    let r = reg.finish_upload(&loc, &digest, &data[5..]);
    assert_eq!(r.status(), 201);
    reg.assert_blob("owner/a", &digest, &data);
}

#[test]
fn same_bytes_pushed_to_two_repositories() {
    let reg = Reg::start();
    let data = pseudo_bytes(91, 40_000);
    let d1 = reg.push_blob("twice/one", &data);
    let d2 = reg.push_blob("twice/two", &data);
    assert_eq!(d1, d2);
    // And a third time through a chunked session.
    let loc = reg.start_upload("twice/three");
    let loc = reg.patch(&loc, 0, &data);
    let r = reg.finish_upload(&loc, &d1, &[]);
    assert_eq!(r.status(), 201);
    for repo in ["twice/one", "twice/two", "twice/three"] {
        let r = reg.get(&format!("/v2/{repo}/blobs/{d1}"));
        assert_eq!(r.status(), 200, "{repo}");
        assert_eq!(r.bytes().unwrap().as_ref(), &data[..], "{repo}");
    }
    // Deleting it from one leaves the others.
    assert_eq!(
        reg.delete(&format!("/v2/twice/one/blobs/{d1}")).status(),
        202
    );
    expect_error(
        reg.get(&format!("/v2/twice/one/blobs/{d1}")),
        404,
        "BLOB_UNKNOWN",
    );
    for repo in ["twice/two", "twice/three"] {
        assert_eq!(
            reg.get(&format!("/v2/{repo}/blobs/{d1}"))
                .bytes()
                .unwrap()
                .as_ref(),
            &data[..]
        );
    }
}

#[test]
fn empty_blob() {
    let reg = Reg::start();
    assert_eq!(sha256_digest(b""), EMPTY_SHA256);
    // Monolithic, with an empty body.
    let r = reg
        .c
        .post(reg.url(&format!(
            "/v2/empty/mono/blobs/uploads/?digest={EMPTY_SHA256}"
        )))
        .body(Vec::new())
        .send()
        .unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().unwrap());
    assert_eq!(hdr(&r, "docker-content-digest"), EMPTY_SHA256);
    // POST then PUT with no body at all.
    let loc = reg.start_upload("empty/session");
    let r = reg.finish_upload(&loc, EMPTY_SHA256, &[]);
    assert_eq!(r.status(), 201, "{}", r.text().unwrap());
    for repo in ["empty/mono", "empty/session"] {
        let r = reg.head(&format!("/v2/{repo}/blobs/{EMPTY_SHA256}"));
        assert_eq!(r.status(), 200);
        assert_eq!(hdr(&r, "content-length"), "0");
        assert_eq!(hdr(&r, "docker-content-digest"), EMPTY_SHA256);
        let r = reg.get(&format!("/v2/{repo}/blobs/{EMPTY_SHA256}"));
        assert_eq!(r.status(), 200);
        assert_api_version(&r);
        assert!(r.bytes().unwrap().is_empty());
    }
    // A wrong digest for empty content.
    let r = reg
        .c
        .post(reg.url(&format!(
            "/v2/empty/mono/blobs/uploads/?digest={}",
            sha256_digest(b"x")
        )))
        .body(Vec::new())
        .send()
        .unwrap();
    expect_error(r, 400, "DIGEST_INVALID");
}

// ---------------------------------------------------------------------------------------------
// blob GET / HEAD / DELETE
// ---------------------------------------------------------------------------------------------

#[test]
fn blob_head_get_and_ranges() {
    let reg = Reg::start();
    let data = pseudo_bytes(101, 1000);
    let digest = reg.push_blob("get/repo", &data);
    let path = format!("/v2/get/repo/blobs/{digest}");

    let r = reg.head(&path);
    assert_eq!(r.status(), 200);
    assert_api_version(&r);
    assert_eq!(hdr(&r, "content-length"), "1000");
    assert_eq!(hdr(&r, "docker-content-digest"), digest);
    assert_eq!(hdr(&r, "etag"), format!("\"{digest}\""));
    assert!(r.bytes().unwrap().is_empty());

    let r = reg.get(&path);
    assert_eq!(r.status(), 200);
    assert_api_version(&r);
    assert_eq!(hdr(&r, "content-length"), "1000");
    assert_eq!(hdr(&r, "docker-content-digest"), digest);
    assert_eq!(hdr(&r, "content-type"), "application/octet-stream");
    assert_eq!(hdr(&r, "etag"), format!("\"{digest}\""));
    for (name, _) in r.headers() {
        assert!(
            !name.as_str().starts_with("x-amz"),
            "object store header {name} leaked"
        );
    }
    assert_eq!(r.bytes().unwrap().as_ref(), &data[..]);
    // The client's credentials for berth are not forwarded to the object store (S3 refuses a
    // request with two authentication mechanisms).
    let r = reg
        .c
        .get(reg.url(&path))
        .header("Authorization", "Bearer some-registry-token")
        .header("Cookie", "session=abc")
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().unwrap().as_ref(), &data[..]);

    let range = |spec: &str| {
        reg.c
            .get(reg.url(&path))
            .header("Range", spec)
            .send()
            .unwrap()
    };
    let r = range("bytes=10-99");
    assert_eq!(r.status(), 206);
    assert_api_version(&r);
    assert_eq!(hdr(&r, "content-range"), "bytes 10-99/1000");
    assert_eq!(hdr(&r, "content-length"), "90");
    assert_eq!(hdr(&r, "docker-content-digest"), digest);
    assert_eq!(r.bytes().unwrap().as_ref(), &data[10..100]);

    let r = range("bytes=990-");
    assert_eq!(r.status(), 206);
    assert_eq!(hdr(&r, "content-range"), "bytes 990-999/1000");
    assert_eq!(r.bytes().unwrap().as_ref(), &data[990..]);

    let r = range("bytes=-5");
    assert_eq!(r.status(), 206);
    assert_eq!(r.bytes().unwrap().as_ref(), &data[995..]);

    expect_error(range("bytes=5000-6000"), 416, "RANGE_INVALID");

    // Unknown digest.
    let unknown = sha256_digest(b"never pushed");
    expect_error(
        reg.get(&format!("/v2/get/repo/blobs/{unknown}")),
        404,
        "BLOB_UNKNOWN",
    );
    let r = reg.head(&format!("/v2/get/repo/blobs/{unknown}"));
    assert_eq!(r.status(), 404);
    assert_api_version(&r);
    assert!(r.bytes().unwrap().is_empty());
}

#[test]
fn blob_is_only_visible_in_its_repository() {
    let reg = Reg::start();
    let data = b"repo a only".to_vec();
    let digest = reg.push_blob("iso/a", &data);
    reg.push_blob("iso/b", b"something else in b");
    expect_error(
        reg.get(&format!("/v2/iso/b/blobs/{digest}")),
        404,
        "BLOB_UNKNOWN",
    );
    expect_error(
        reg.get(&format!("/v2/never/pushed/blobs/{digest}")),
        404,
        "BLOB_UNKNOWN",
    );
    let r = reg.head(&format!("/v2/iso/b/blobs/{digest}"));
    assert_eq!(r.status(), 404);
    assert_api_version(&r);
    assert!(r.bytes().unwrap().is_empty());
    expect_error(
        reg.delete(&format!("/v2/iso/b/blobs/{digest}")),
        404,
        "BLOB_UNKNOWN",
    );
    // A manifest in b cannot reference it either.
    let body = image_manifest(OCI_MANIFEST, (OCI_CONFIG, &digest, data.len()), &[]);
    expect_error(
        reg.put_manifest("iso/b", "t", OCI_MANIFEST, &body),
        400,
        "MANIFEST_BLOB_UNKNOWN",
    );
    reg.assert_blob("iso/a", &digest, &data);
}

#[test]
fn delete_blob() {
    let reg = Reg::start();
    let data = b"to be deleted".to_vec();
    let digest = reg.push_blob("del/repo", &data);
    let path = format!("/v2/del/repo/blobs/{digest}");
    let r = reg.delete(&path);
    assert_eq!(r.status(), 202);
    assert_api_version(&r);
    expect_error(reg.get(&path), 404, "BLOB_UNKNOWN");
    assert_eq!(reg.head(&path).status(), 404);
    expect_error(reg.delete(&path), 404, "BLOB_UNKNOWN");
    // Pushing it again brings it back.
    reg.push_blob("del/repo", &data);
    assert_eq!(reg.get(&path).bytes().unwrap().as_ref(), &data[..]);
}

// ---------------------------------------------------------------------------------------------
// redirect mode
// ---------------------------------------------------------------------------------------------

/// Redirect mode needs an S3 endpoint: the local store has no URLs.
#[test]
fn redirect_mode_with_the_local_store_is_refused_at_start() {
    if test_storage_is_s3() {
        eprintln!("SKIPPED: BERTH_TEST_STORAGE=s3 (a test of the local store)");
        return;
    }
    let (status, log) = Berth::start_expecting_exit(
        "storage:\n  blob_serving: redirect\n",
        None,
        Duration::from_secs(10),
    )
    .expect("berth must refuse to start");
    assert!(!status.success());
    assert!(
        log.contains("storage.blob_serving") && log.contains("needs an S3 endpoint"),
        "{log}"
    );
}

#[test]
fn redirect_mode_serves_presigned_urls() {
    let s3 = S3Server::start();
    let reg = Reg::with(&format!(
        "{}  blob_serving: redirect\n  presign_ttl: 2s\n",
        s3.storage_yaml()
    ));
    let data = pseudo_bytes(111, 50_000);
    let digest = reg.push_blob("redir/repo", &data);
    let path = format!("/v2/redir/repo/blobs/{digest}");

    // HEAD is answered by berth itself.
    let r = reg.head(&path);
    assert_eq!(r.status(), 200);
    assert_eq!(hdr(&r, "content-length"), "50000");

    let r = reg.get(&path);
    assert_eq!(r.status(), 307);
    assert_api_version(&r);
    assert_eq!(hdr(&r, "docker-content-digest"), digest);
    let location = hdr(&r, "location");
    let url = reqwest::Url::parse(&location).unwrap();
    assert_eq!(url.host_str(), Some("127.0.0.1"), "{location}");
    assert_ne!(url.port(), Some(reg.berth.port), "{location}");
    assert!(location.contains("X-Amz-Signature="), "{location}");
    assert!(location.contains("X-Amz-Expires=2"), "{location}");

    let r = reg.c.get(&location).send().unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().unwrap().as_ref(), &data[..]);
    // Ranges work against the presigned URL too.
    let r = reg
        .c
        .get(&location)
        .header("Range", "bytes=10-99")
        .send()
        .unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(r.bytes().unwrap().as_ref(), &data[10..100]);

    // Unknown blobs are still berth's 404.
    expect_error(
        reg.get(&format!("/v2/redir/repo/blobs/{}", sha256_digest(b"no"))),
        404,
        "BLOB_UNKNOWN",
    );

    // presign_ttl: 2s is respected.
    std::thread::sleep(Duration::from_secs(3));
    let r = reg.c.get(&location).send().unwrap();
    assert_eq!(r.status(), 403, "an expired presigned URL must be refused");
    // A fresh redirect works again.
    let fresh = hdr(&reg.get(&path), "location");
    assert_ne!(fresh, location);
    assert_eq!(
        reg.c.get(&fresh).send().unwrap().bytes().unwrap().as_ref(),
        &data[..]
    );
}

// ---------------------------------------------------------------------------------------------
// cross-repository mount
// ---------------------------------------------------------------------------------------------

#[test]
fn cross_repository_mount() {
    let reg = Reg::start();
    let data = pseudo_bytes(121, 20_000);
    let digest = reg.push_blob("mount/src", &data);

    let r = reg
        .c
        .post(reg.url(&format!(
            "/v2/mount/dst/blobs/uploads/?mount={digest}&from=mount/src"
        )))
        .send()
        .unwrap();
    assert_eq!(r.status(), 201);
    assert_api_version(&r);
    assert_eq!(hdr(&r, "location"), format!("/v2/mount/dst/blobs/{digest}"));
    assert_eq!(hdr(&r, "docker-content-digest"), digest);
    reg.assert_blob("mount/dst", &digest, &data);
    // Percent-encoded parameters, as clients send them.
    let r = reg
        .c
        .post(reg.url(&format!(
            "/v2/mount/dst2/blobs/uploads/?mount={}&from=mount%2Fsrc",
            digest.replace(':', "%3A")
        )))
        .send()
        .unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(
        reg.head(&format!("/v2/mount/dst2/blobs/{digest}")).status(),
        200
    );

    // The mounted copy is the repository's own: deleting it in dst leaves src.
    assert_eq!(
        reg.delete(&format!("/v2/mount/dst/blobs/{digest}"))
            .status(),
        202
    );
    assert_eq!(
        reg.head(&format!("/v2/mount/src/blobs/{digest}")).status(),
        200
    );

    // Fallbacks to a new upload session: the source lacks the blob, the source is not named,
    // the digest is unknown everywhere.
    reg.push_blob("mount/empty", b"other");
    let unknown = sha256_digest(b"unknown anywhere");
    for query in [
        format!("mount={digest}&from=mount/empty"),
        format!("mount={digest}&from=mount/never"),
        format!("mount={digest}"),
        format!("mount={unknown}&from=mount/src"),
    ] {
        let r = reg
            .c
            .post(reg.url(&format!("/v2/mount/fallback/blobs/uploads/?{query}")))
            .send()
            .unwrap();
        assert_eq!(r.status(), 202, "{query}");
        assert_api_version(&r);
        let loc = hdr(&r, "location");
        assert!(
            loc.starts_with("/v2/mount/fallback/blobs/uploads/"),
            "{loc}"
        );
        assert!(!hdr(&r, "docker-upload-uuid").is_empty());
        assert_eq!(hdr(&r, "range"), "0-0");
        assert_eq!(reg.get(&loc).status(), 204);
    }
    // The fallback session takes the upload.
    let r = reg
        .c
        .post(reg.url(&format!(
            "/v2/mount/fallback/blobs/uploads/?mount={digest}&from=mount/empty"
        )))
        .send()
        .unwrap();
    let loc = hdr(&r, "location");
    let r = reg.finish_upload(&loc, &digest, &data);
    assert_eq!(r.status(), 201);
    reg.assert_blob("mount/fallback", &digest, &data);

    // A malformed mount digest.
    let r = reg
        .c
        .post(reg.url("/v2/mount/dst/blobs/uploads/?mount=sha256:nothex&from=mount/src"))
        .send()
        .unwrap();
    expect_error(r, 400, "DIGEST_INVALID");
}

// ---------------------------------------------------------------------------------------------
// manifests
// ---------------------------------------------------------------------------------------------

#[test]
fn manifest_put_get_head() {
    let reg = Reg::start();
    let config = br#"{"architecture":"arm64","os":"linux"}"#;
    let layer = pseudo_bytes(131, 2048);
    let cd = reg.push_blob("man/repo", config);
    let ld = reg.push_blob("man/repo", &layer);
    let body = image_manifest(
        OCI_MANIFEST,
        (OCI_CONFIG, &cd, config.len()),
        &[(OCI_LAYER, &ld, layer.len())],
    );
    let digest = sha256_digest(&body);

    let r = reg.put_manifest("man/repo", "v1.0", OCI_MANIFEST, &body);
    assert_eq!(r.status(), 201, "{}", r.text().unwrap());
    assert_api_version(&r);
    assert_eq!(
        hdr(&r, "location"),
        format!("/v2/man/repo/manifests/{digest}")
    );
    assert_eq!(hdr(&r, "docker-content-digest"), digest);
    assert!(r.headers().get("oci-subject").is_none());

    for reference in ["v1.0", digest.as_str()] {
        let path = format!("/v2/man/repo/manifests/{reference}");
        let r = reg
            .c
            .get(reg.url(&path))
            .header("Accept", OCI_MANIFEST)
            .send()
            .unwrap();
        assert_eq!(r.status(), 200, "{reference}");
        assert_api_version(&r);
        assert_eq!(hdr(&r, "content-type"), OCI_MANIFEST);
        assert_eq!(hdr(&r, "docker-content-digest"), digest);
        assert_eq!(hdr(&r, "etag"), format!("\"{digest}\""));
        assert_eq!(hdr(&r, "content-length"), body.len().to_string());
        assert_eq!(
            r.bytes().unwrap().as_ref(),
            &body[..],
            "byte-identical by {reference}"
        );

        let r = reg.head(&path);
        assert_eq!(r.status(), 200);
        assert_api_version(&r);
        assert_eq!(hdr(&r, "content-type"), OCI_MANIFEST);
        assert_eq!(hdr(&r, "docker-content-digest"), digest);
        assert_eq!(hdr(&r, "etag"), format!("\"{digest}\""));
        assert_eq!(hdr(&r, "content-length"), body.len().to_string());
        assert!(r.bytes().unwrap().is_empty());
    }

    // PUT by digest works too, and without a tag the tag list is unchanged.
    let r = reg.put_manifest("man/repo", &digest, OCI_MANIFEST, &body);
    assert_eq!(r.status(), 201);
    assert_eq!(hdr(&r, "docker-content-digest"), digest);

    // Moving a tag: v1.0 now names another manifest; the old one stays by digest.
    let body2 = image_manifest(OCI_MANIFEST, (OCI_CONFIG, &cd, config.len()), &[]);
    let digest2 = sha256_digest(&body2);
    assert_eq!(
        reg.put_manifest("man/repo", "v1.0", OCI_MANIFEST, &body2)
            .status(),
        201
    );
    assert_eq!(
        hdr(
            &reg.head("/v2/man/repo/manifests/v1.0"),
            "docker-content-digest"
        ),
        digest2
    );
    assert_eq!(
        reg.get(&format!("/v2/man/repo/manifests/{digest}"))
            .bytes()
            .unwrap()
            .as_ref(),
        &body[..]
    );

    // Media type from the body when Content-Type is generic.
    let r = reg.put_manifest("man/repo", "generic", "application/json", &body);
    assert_eq!(r.status(), 201);
    assert_eq!(
        hdr(&reg.get("/v2/man/repo/manifests/generic"), "content-type"),
        OCI_MANIFEST
    );
    // Content-Type parameters are not part of the type.
    let r = reg.put_manifest(
        "man/repo",
        "charset",
        &format!("{OCI_MANIFEST}; charset=utf-8"),
        &body,
    );
    assert_eq!(r.status(), 201);
    assert_eq!(
        hdr(&reg.get("/v2/man/repo/manifests/charset"), "content-type"),
        OCI_MANIFEST
    );
}

#[test]
fn manifest_referencing_unknown_blobs_is_refused() {
    let reg = Reg::start();
    let config = b"{}".to_vec();
    let layer = pseudo_bytes(141, 500);
    let cd = reg.push_blob("refs/repo", &config);
    let ld = sha256_digest(&layer); // never pushed
    let body = image_manifest(OCI_MANIFEST, (OCI_CONFIG, &cd, 2), &[(OCI_LAYER, &ld, 500)]);
    let v = expect_error(
        reg.put_manifest("refs/repo", "t", OCI_MANIFEST, &body),
        400,
        "MANIFEST_BLOB_UNKNOWN",
    );
    assert!(
        v["errors"][0]["detail"].as_str().unwrap().contains(&ld),
        "{v}"
    );
    // Missing config.
    let ld = reg.push_blob("refs/repo", &layer);
    let missing_config = sha256_digest(b"no config");
    let body = image_manifest(
        OCI_MANIFEST,
        (OCI_CONFIG, &missing_config, 9),
        &[(OCI_LAYER, &ld, 500)],
    );
    expect_error(
        reg.put_manifest("refs/repo", "t", OCI_MANIFEST, &body),
        400,
        "MANIFEST_BLOB_UNKNOWN",
    );
    // A blob of another repository does not count.
    let elsewhere = reg.push_blob("refs/other", b"elsewhere");
    let body = image_manifest(
        OCI_MANIFEST,
        (OCI_CONFIG, &cd, 2),
        &[(OCI_LAYER, &elsewhere, 9)],
    );
    expect_error(
        reg.put_manifest("refs/repo", "t", OCI_MANIFEST, &body),
        400,
        "MANIFEST_BLOB_UNKNOWN",
    );
    // A wrong size for a known blob.
    let body = image_manifest(OCI_MANIFEST, (OCI_CONFIG, &cd, 2), &[(OCI_LAYER, &ld, 501)]);
    expect_error(
        reg.put_manifest("refs/repo", "t", OCI_MANIFEST, &body),
        400,
        "MANIFEST_INVALID",
    );
    // Nothing got tagged.
    expect_error(
        reg.get("/v2/refs/repo/manifests/t"),
        404,
        "MANIFEST_UNKNOWN",
    );
    // With everything present it goes in.
    let body = image_manifest(OCI_MANIFEST, (OCI_CONFIG, &cd, 2), &[(OCI_LAYER, &ld, 500)]);
    assert_eq!(
        reg.put_manifest("refs/repo", "t", OCI_MANIFEST, &body)
            .status(),
        201
    );
}

/// Non-distributable layers (with `urls`) live elsewhere: they need not be in the repository.
#[test]
fn foreign_layers_need_not_be_pushed() {
    let reg = Reg::start();
    let cd = reg.push_blob("foreign/repo", b"{}");
    let foreign = sha256_digest(b"a windows base layer");
    let m = json!({
        "schemaVersion": 2,
        "mediaType": DOCKER_MANIFEST,
        "config": {"mediaType": DOCKER_CONFIG, "digest": cd, "size": 2},
        "layers": [{
            "mediaType": "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
            "digest": foreign,
            "size": 12345,
            "urls": ["https://example.invalid/layer"],
        }],
    });
    let body = serde_json::to_vec(&m).unwrap();
    let r = reg.put_manifest("foreign/repo", "ltsc", DOCKER_MANIFEST, &body);
    assert_eq!(r.status(), 201, "{}", r.text().unwrap());
    assert_eq!(
        reg.get("/v2/foreign/repo/manifests/ltsc")
            .bytes()
            .unwrap()
            .as_ref(),
        &body[..]
    );
    // The same layer without urls must be in the repository.
    let mut m = m;
    m["layers"][0].as_object_mut().unwrap().remove("urls");
    let body = serde_json::to_vec(&m).unwrap();
    expect_error(
        reg.put_manifest("foreign/repo", "ltsc2", DOCKER_MANIFEST, &body),
        400,
        "MANIFEST_BLOB_UNKNOWN",
    );
}

#[test]
fn invalid_manifests_are_refused() {
    let reg = Reg::start();
    let cd = reg.push_blob("inv/repo", b"{}");
    let good = image_manifest(OCI_MANIFEST, (OCI_CONFIG, &cd, 2), &[]);
    for (what, ct, body) in [
        ("not JSON", OCI_MANIFEST, b"this is not json".to_vec()),
        ("truncated JSON", OCI_MANIFEST, good[..good.len() / 2].to_vec()),
        ("empty body", OCI_MANIFEST, Vec::new()),
        ("schema 1", OCI_MANIFEST, br#"{"schemaVersion":1,"name":"x","tag":"y","fsLayers":[]}"#.to_vec()),
        ("no config", OCI_MANIFEST, br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","layers":[]}"#.to_vec()),
        ("content type differs from mediaType", DOCKER_MANIFEST, good.clone()),
        ("unsupported media type", "text/plain", br#"{"schemaVersion":2}"#.to_vec()),
        (
            "bad digest in a descriptor",
            OCI_MANIFEST,
            serde_json::to_vec(&json!({"schemaVersion":2,"mediaType":OCI_MANIFEST,
                "config":{"mediaType":OCI_CONFIG,"digest":"sha256:short","size":2},"layers":[]}))
            .unwrap(),
        ),
    ] {
        let r = reg.put_manifest("inv/repo", "t", ct, &body);
        assert_eq!(r.status(), 400, "{what}");
        expect_error(r, 400, "MANIFEST_INVALID");
    }
    expect_error(reg.get("/v2/inv/repo/manifests/t"), 404, "MANIFEST_UNKNOWN");
    assert_eq!(
        reg.put_manifest("inv/repo", "t", OCI_MANIFEST, &good)
            .status(),
        201
    );
}

/// More than 4 MiB: 413, whether announced by Content-Length (refused before the body is
/// read) or found while reading a chunked body.
#[test]
fn oversized_manifest_is_413() {
    let reg = Reg::start();
    let (status, headers, body) = raw_request(
        reg.berth.port,
        &format!(
            "PUT /v2/big/manifest/manifests/latest HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {OCI_MANIFEST}\r\nContent-Length: {}\r\n\r\n",
            4 * MIB + 1
        ),
    );
    assert_eq!(status, 413);
    assert_eq!(
        raw_header(&headers, "docker-distribution-api-version"),
        Some("registry/2.0")
    );
    assert_eq!(
        error_code(std::str::from_utf8(&body).unwrap()),
        "SIZE_INVALID"
    );

    // Chunked: the body is read up to the limit. Berth may close the connection with the rest
    // of the body unread, so the client may see the answer or a reset; never a 201.
    let mut big = br#"{"schemaVersion":2,"pad":""#.to_vec();
    big.resize(4 * MIB + 100, b'a');
    big.extend_from_slice(b"\"}");
    let r = reg
        .c
        .put(reg.url("/v2/big/manifest/manifests/latest"))
        .header("Content-Type", OCI_MANIFEST)
        .body(Body::new(std::io::Cursor::new(big)))
        .send();
    if let Ok(r) = r {
        expect_error(r, 413, "SIZE_INVALID");
    }
    expect_error(
        reg.get("/v2/big/manifest/manifests/latest"),
        404,
        "MANIFEST_UNKNOWN",
    );
    // Exactly at the limit is fine as far as size goes (this one is then invalid JSON).
    let mut at_limit = vec![b' '; 4 * MIB];
    at_limit[0] = b'x';
    expect_error(
        reg.put_manifest("big/manifest", "latest", OCI_MANIFEST, &at_limit),
        400,
        "MANIFEST_INVALID",
    );
}

#[test]
fn put_manifest_by_wrong_digest() {
    let reg = Reg::start();
    let cd = reg.push_blob("wrongd/repo", b"{}");
    let body = image_manifest(OCI_MANIFEST, (OCI_CONFIG, &cd, 2), &[]);
    let wrong = sha256_digest(b"not the manifest");
    let v = expect_error(
        reg.put_manifest("wrongd/repo", &wrong, OCI_MANIFEST, &body),
        400,
        "DIGEST_INVALID",
    );
    assert!(
        v["errors"][0]["detail"].as_str().unwrap().contains(&wrong),
        "{v}"
    );
    expect_error(
        reg.get(&format!("/v2/wrongd/repo/manifests/{wrong}")),
        404,
        "MANIFEST_UNKNOWN",
    );
    let right = sha256_digest(&body);
    expect_error(
        reg.get(&format!("/v2/wrongd/repo/manifests/{right}")),
        404,
        "MANIFEST_UNKNOWN",
    );
    let r = reg.put_manifest("wrongd/repo", &right, OCI_MANIFEST, &body);
    assert_eq!(r.status(), 201);
    assert_eq!(
        hdr(&r, "location"),
        format!("/v2/wrongd/repo/manifests/{right}")
    );
}

#[test]
fn image_index_requires_its_children() {
    let reg = Reg::start();
    let cd = reg.push_blob("idx/repo", b"{}");
    let child_amd = image_manifest(OCI_MANIFEST, (OCI_CONFIG, &cd, 2), &[]);
    let child_arm = {
        let mut b = child_amd.clone();
        b.extend_from_slice(b"\n"); // different bytes, different digest
        b
    };
    let index = |children: &[&[u8]]| {
        let manifests: Vec<Value> = children
            .iter()
            .zip(["amd64", "arm64"])
            .map(|(c, arch)| {
                json!({"mediaType": OCI_MANIFEST, "digest": sha256_digest(c), "size": c.len(),
                       "platform": {"architecture": arch, "os": "linux"}})
            })
            .collect();
        serde_json::to_vec(
            &json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}),
        )
        .unwrap()
    };
    let body = index(&[&child_amd, &child_arm]);

    let v = expect_error(
        reg.put_manifest("idx/repo", "multi", OCI_INDEX, &body),
        400,
        "MANIFEST_BLOB_UNKNOWN",
    );
    assert!(
        v["errors"][0]["detail"]
            .as_str()
            .unwrap()
            .contains(&sha256_digest(&child_amd)),
        "{v}"
    );
    // One child only: still refused.
    assert_eq!(
        reg.put_manifest(
            "idx/repo",
            &sha256_digest(&child_amd),
            OCI_MANIFEST,
            &child_amd
        )
        .status(),
        201
    );
    expect_error(
        reg.put_manifest("idx/repo", "multi", OCI_INDEX, &body),
        400,
        "MANIFEST_BLOB_UNKNOWN",
    );
    // A child pushed to another repository does not count.
    reg.push_blob("idx/other", b"{}");
    assert_eq!(
        reg.put_manifest(
            "idx/other",
            &sha256_digest(&child_arm),
            OCI_MANIFEST,
            &child_arm
        )
        .status(),
        201
    );
    let v = expect_error(
        reg.put_manifest("idx/repo", "multi", OCI_INDEX, &body),
        400,
        "MANIFEST_BLOB_UNKNOWN",
    );
    assert!(
        v["errors"][0]["detail"]
            .as_str()
            .unwrap()
            .contains(&sha256_digest(&child_arm)),
        "{v}"
    );
    // Both children present.
    assert_eq!(
        reg.put_manifest(
            "idx/repo",
            &sha256_digest(&child_arm),
            OCI_MANIFEST,
            &child_arm
        )
        .status(),
        201
    );
    let r = reg.put_manifest("idx/repo", "multi", OCI_INDEX, &body);
    assert_eq!(r.status(), 201, "{}", r.text().unwrap());
    assert_eq!(hdr(&r, "docker-content-digest"), sha256_digest(&body));
    let r = reg.get("/v2/idx/repo/manifests/multi");
    assert_eq!(r.status(), 200);
    assert_eq!(hdr(&r, "content-type"), OCI_INDEX);
    assert_eq!(r.bytes().unwrap().as_ref(), &body[..]);
    // An index without mediaType and with a generic Content-Type is still an index.
    let bare = serde_json::to_vec(&json!({"schemaVersion": 2, "manifests": []})).unwrap();
    assert_eq!(
        reg.put_manifest("idx/repo", "bare", "application/json", &bare)
            .status(),
        201
    );
    assert_eq!(
        hdr(&reg.head("/v2/idx/repo/manifests/bare"), "content-type"),
        OCI_INDEX
    );
    // A docker manifest list is held to the same rule.
    let list_type = "application/vnd.docker.distribution.manifest.list.v2+json";
    let list = |child: &str| {
        serde_json::to_vec(
            &json!({"schemaVersion": 2, "mediaType": list_type, "manifests": [
            {"mediaType": DOCKER_MANIFEST, "digest": child, "size": 10,
             "platform": {"architecture": "amd64", "os": "linux"}}]}),
        )
        .unwrap()
    };
    let missing = sha256_digest(b"no such child");
    expect_error(
        reg.put_manifest("idx/repo", "dlist", list_type, &list(&missing)),
        400,
        "MANIFEST_BLOB_UNKNOWN",
    );
    let ok = list(&sha256_digest(&child_amd));
    assert_eq!(
        reg.put_manifest("idx/repo", "dlist", list_type, &ok)
            .status(),
        201
    );
    let r = reg.get("/v2/idx/repo/manifests/dlist");
    assert_eq!(hdr(&r, "content-type"), list_type);
    assert_eq!(r.bytes().unwrap().as_ref(), &ok[..]);
}

#[test]
fn docker_schema2_manifest_round_trips() {
    let reg = Reg::start();
    let config =
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
    let layer = pseudo_bytes(151, 777);
    let cd = reg.push_blob("docker/img", config);
    let ld = reg.push_blob("docker/img", &layer);
    let body = image_manifest(
        DOCKER_MANIFEST,
        (DOCKER_CONFIG, &cd, config.len()),
        &[(DOCKER_LAYER, &ld, layer.len())],
    );
    let digest = sha256_digest(&body);
    let r = reg.put_manifest("docker/img", "latest", DOCKER_MANIFEST, &body);
    assert_eq!(r.status(), 201, "{}", r.text().unwrap());
    assert_eq!(hdr(&r, "docker-content-digest"), digest);
    let r = reg
        .c
        .get(reg.url("/v2/docker/img/manifests/latest"))
        .header("Accept", DOCKER_MANIFEST)
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(hdr(&r, "content-type"), DOCKER_MANIFEST);
    assert_eq!(hdr(&r, "docker-content-digest"), digest);
    assert_eq!(r.bytes().unwrap().as_ref(), &body[..]);
}

/// Documented decision: manifests are served as pushed, whatever Accept lists.
#[test]
fn manifest_served_as_pushed_whatever_accept_says() {
    let reg = Reg::start();
    let (digest, body) = reg.push_image("accept/repo", "latest", 3);
    for accept in [
        DOCKER_MANIFEST,
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "text/plain",
        "*/*",
    ] {
        let r = reg
            .c
            .get(reg.url("/v2/accept/repo/manifests/latest"))
            .header("Accept", accept)
            .send()
            .unwrap();
        assert_eq!(r.status(), 200, "Accept: {accept}");
        assert_eq!(hdr(&r, "content-type"), OCI_MANIFEST);
        assert_eq!(hdr(&r, "docker-content-digest"), digest);
        assert_eq!(r.bytes().unwrap().as_ref(), &body[..]);
    }
}

#[test]
fn delete_manifest_by_tag_and_by_digest() {
    let reg = Reg::start();
    let (digest, body) = reg.push_image("delm/repo", "one", 4);
    for tag in ["two", "three"] {
        assert_eq!(
            reg.put_manifest("delm/repo", tag, OCI_MANIFEST, &body)
                .status(),
            201
        );
    }
    let (other, _) = reg.push_image("delm/repo", "other", 5);

    // By tag: the tag goes, the manifest stays.
    let r = reg.delete("/v2/delm/repo/manifests/one");
    assert_eq!(r.status(), 202);
    assert_api_version(&r);
    expect_error(
        reg.get("/v2/delm/repo/manifests/one"),
        404,
        "MANIFEST_UNKNOWN",
    );
    expect_error(
        reg.delete("/v2/delm/repo/manifests/one"),
        404,
        "MANIFEST_UNKNOWN",
    );
    assert_eq!(
        reg.get(&format!("/v2/delm/repo/manifests/{digest}"))
            .bytes()
            .unwrap()
            .as_ref(),
        &body[..]
    );
    assert_eq!(reg.get("/v2/delm/repo/manifests/two").status(), 200);
    let tags: Value = reg.get("/v2/delm/repo/tags/list").json_value();
    assert_eq!(tags["tags"], json!(["other", "three", "two"]));

    // By digest: the manifest and all its tags go.
    let r = reg.delete(&format!("/v2/delm/repo/manifests/{digest}"));
    assert_eq!(r.status(), 202);
    for reference in [digest.as_str(), "two", "three"] {
        expect_error(
            reg.get(&format!("/v2/delm/repo/manifests/{reference}")),
            404,
            "MANIFEST_UNKNOWN",
        );
        let r = reg.head(&format!("/v2/delm/repo/manifests/{reference}"));
        assert_eq!(r.status(), 404);
        assert_api_version(&r);
    }
    expect_error(
        reg.delete(&format!("/v2/delm/repo/manifests/{digest}")),
        404,
        "MANIFEST_UNKNOWN",
    );
    let tags: Value = reg.get("/v2/delm/repo/tags/list").json_value();
    assert_eq!(tags["tags"], json!(["other"]));
    // The other manifest is untouched.
    assert_eq!(
        hdr(
            &reg.head("/v2/delm/repo/manifests/other"),
            "docker-content-digest"
        ),
        other
    );
    // The blobs are still there (manifest deletion does not delete blobs).
    let m: Value = serde_json::from_slice(&body).unwrap();
    let layer = m["layers"][0]["digest"].as_str().unwrap();
    assert_eq!(
        reg.head(&format!("/v2/delm/repo/blobs/{layer}")).status(),
        200
    );
}

#[test]
fn unknown_manifests() {
    let reg = Reg::start();
    reg.push_image("unk/repo", "exists", 6);
    expect_error(
        reg.get("/v2/unk/repo/manifests/nope"),
        404,
        "MANIFEST_UNKNOWN",
    );
    let d = sha256_digest(b"nope");
    expect_error(
        reg.get(&format!("/v2/unk/repo/manifests/{d}")),
        404,
        "MANIFEST_UNKNOWN",
    );
    expect_error(
        reg.delete(&format!("/v2/unk/repo/manifests/{d}")),
        404,
        "MANIFEST_UNKNOWN",
    );
    // A tag or digest of another repository is not visible here.
    expect_error(
        reg.get("/v2/unk/other/manifests/exists"),
        404,
        "MANIFEST_UNKNOWN",
    );
    let d = hdr(
        &reg.head("/v2/unk/repo/manifests/exists"),
        "docker-content-digest",
    );
    expect_error(
        reg.get(&format!("/v2/unk/other/manifests/{d}")),
        404,
        "MANIFEST_UNKNOWN",
    );
    expect_error(
        reg.delete(&format!("/v2/unk/other/manifests/{d}")),
        404,
        "MANIFEST_UNKNOWN",
    );
    assert_eq!(
        reg.get(&format!("/v2/unk/repo/manifests/{d}")).status(),
        200
    );
}

// ---------------------------------------------------------------------------------------------
// tags and catalog
// ---------------------------------------------------------------------------------------------

#[test]
fn tags_list_and_pagination() {
    let reg = Reg::start();
    let (_, body) = reg.push_image("tags/repo", "latest", 7);
    let mut tags = vec!["latest", "b", "a", "v1.10", "v1.2", "V2", "_x", "c", "a-b"];
    for t in &tags[1..] {
        assert_eq!(
            reg.put_manifest("tags/repo", t, OCI_MANIFEST, &body)
                .status(),
            201
        );
    }
    // Another repository's tags are not listed.
    reg.push_image("tags/repo2", "zzz", 8);
    tags.sort();
    let expected: Vec<String> = tags.iter().map(|s| s.to_string()).collect();

    let r = reg.get("/v2/tags/repo/tags/list");
    assert_eq!(r.status(), 200);
    assert_api_version(&r);
    assert_eq!(hdr(&r, "content-type"), "application/json");
    assert!(r.headers().get("link").is_none());
    let v: Value = r.json_value();
    assert_eq!(v["name"], "tags/repo");
    assert_eq!(v["tags"], json!(expected));

    let (all, pages) = collect_pages(&reg, "/v2/tags/repo/tags/list?n=2", "tags");
    assert_eq!(all, expected);
    assert_eq!(pages, expected.len().div_ceil(2));

    let r = reg.get("/v2/tags/repo/tags/list?n=2&last=b");
    assert_eq!(r.status(), 200);
    let link = next_link(&r).expect("a next link after b,c");
    assert!(link.starts_with("/v2/tags/repo/tags/list?"), "{link}");
    assert!(link.contains("n=2"), "{link}");
    let v: Value = r.json_value();
    let after_b: Vec<String> = expected
        .iter()
        .filter(|t| t.as_str() > "b")
        .take(2)
        .cloned()
        .collect();
    assert_eq!(v["tags"], json!(after_b));

    // The last page has no Link.
    let last = expected.last().unwrap();
    let r = reg.get(&format!(
        "/v2/tags/repo/tags/list?n=2&last={}",
        expected[expected.len() - 2]
    ));
    assert!(r.headers().get("link").is_none());
    let v: Value = r.json_value();
    assert_eq!(v["tags"], json!([last]));
    let v: Value = reg
        .get(&format!("/v2/tags/repo/tags/list?last={last}"))
        .json_value();
    assert_eq!(v["tags"], json!([]));
    // n larger than the list.
    let r = reg.get("/v2/tags/repo/tags/list?n=1000");
    assert!(r.headers().get("link").is_none());
    let v: Value = r.json_value();
    assert_eq!(v["tags"], json!(expected));

    // A repository with blobs but no tags has an empty list.
    reg.push_blob("tags/blobonly", b"b");
    let v: Value = reg.get("/v2/tags/blobonly/tags/list").json_value();
    assert_eq!(v["tags"], json!([]));

    expect_error(reg.get("/v2/tags/unknown/tags/list"), 404, "NAME_UNKNOWN");
    expect_error(
        reg.get("/v2/tags/repo/tags/list?n=abc"),
        400,
        "PAGINATION_NUMBER_INVALID",
    );
    expect_error(
        reg.get("/v2/tags/repo/tags/list?n=-1"),
        400,
        "PAGINATION_NUMBER_INVALID",
    );
}

#[test]
fn catalog_and_pagination() {
    let reg = Reg::start();
    let v: Value = reg.get("/v2/_catalog").json_value();
    assert_eq!(v["repositories"], json!([]));

    let mut repos = [
        "zeta",
        "alpha",
        "library/ubuntu",
        "library/alpine",
        "a/b/c/d",
        "a/b",
        "my-app",
        "x.y/z_w",
    ];
    for (i, r) in repos.iter().enumerate() {
        if i % 2 == 0 {
            reg.push_image(r, "latest", i as u8);
        } else {
            reg.push_blob(r, r.as_bytes());
        }
    }
    repos.sort();
    let expected: Vec<String> = repos.iter().map(|s| s.to_string()).collect();

    let r = reg.get("/v2/_catalog");
    assert_eq!(r.status(), 200);
    assert_api_version(&r);
    assert_eq!(hdr(&r, "content-type"), "application/json");
    assert!(r.headers().get("link").is_none());
    let v: Value = r.json_value();
    assert_eq!(v["repositories"], json!(expected));

    for n in [1, 2, 3] {
        let (all, pages) = collect_pages(&reg, &format!("/v2/_catalog?n={n}"), "repositories");
        assert_eq!(all, expected, "n={n}");
        assert_eq!(pages, expected.len().div_ceil(n), "n={n}");
    }
    let r = reg.get("/v2/_catalog?n=2&last=a/b/c/d");
    let link = next_link(&r).unwrap();
    assert!(link.starts_with("/v2/_catalog?"), "{link}");
    let v: Value = r.json_value();
    assert_eq!(v["repositories"], json!(["alpha", "library/alpine"]));
    let v: Value = reg.get("/v2/_catalog?last=zeta").json_value();
    assert_eq!(v["repositories"], json!([]));

    expect_error(
        reg.get("/v2/_catalog?n=abc"),
        400,
        "PAGINATION_NUMBER_INVALID",
    );
    expect_error(
        reg.c.post(reg.url("/v2/_catalog")).send().unwrap(),
        405,
        "UNSUPPORTED",
    );
}

// ---------------------------------------------------------------------------------------------
// referrers
// ---------------------------------------------------------------------------------------------

#[test]
fn referrers_api() {
    let reg = Reg::start();
    let repo = "ref/repo";
    let (subject, subject_body) = reg.push_image(repo, "v1", 9);
    let empty = reg.push_blob(repo, b"{}");
    let sig_blob = reg.push_blob(repo, b"signature bytes");
    let sbom_blob = reg.push_blob(repo, b"sbom bytes");
    let sbom_config = reg.push_blob(repo, b"{\"sbom\":true}");
    let subject_desc =
        json!({"mediaType": OCI_MANIFEST, "digest": subject, "size": subject_body.len()});

    // An artifact with artifactType.
    let sig = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": "application/vnd.example.sig",
        "config": {"mediaType": OCI_EMPTY, "digest": empty, "size": 2},
        "layers": [{"mediaType": "application/octet-stream", "digest": sig_blob, "size": 15}],
        "subject": subject_desc,
        "annotations": {"org.example.signer": "alice"},
    }))
    .unwrap();
    // One whose type comes from its config's mediaType.
    let sbom = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.example.sbom.config+json", "digest": sbom_config, "size": 13},
        "layers": [{"mediaType": "application/spdx+json", "digest": sbom_blob, "size": 10}],
        "subject": subject_desc,
    }))
    .unwrap();
    let sig_digest = sha256_digest(&sig);
    let sbom_digest = sha256_digest(&sbom);
    for (body, digest) in [(&sig, &sig_digest), (&sbom, &sbom_digest)] {
        let r = reg.put_manifest(repo, digest, OCI_MANIFEST, body);
        assert_eq!(r.status(), 201, "{}", r.text().unwrap());
        assert_eq!(hdr(&r, "oci-subject"), subject);
        assert_eq!(hdr(&r, "docker-content-digest"), *digest);
    }

    let r = reg.get(&format!("/v2/{repo}/referrers/{subject}"));
    assert_eq!(r.status(), 200);
    assert_api_version(&r);
    assert_eq!(hdr(&r, "content-type"), OCI_INDEX);
    assert!(r.headers().get("oci-filters-applied").is_none());
    let v: Value = r.json_value();
    assert_eq!(v["schemaVersion"], 2);
    assert_eq!(v["mediaType"], OCI_INDEX);
    let list = v["manifests"].as_array().unwrap();
    assert_eq!(list.len(), 2, "{v}");
    let find = |d: &str| {
        list.iter()
            .find(|m| m["digest"] == d)
            .unwrap_or_else(|| panic!("{d} not in {v}"))
            .clone()
    };
    let s = find(&sig_digest);
    assert_eq!(s["mediaType"], OCI_MANIFEST);
    assert_eq!(s["size"], sig.len());
    assert_eq!(s["artifactType"], "application/vnd.example.sig");
    assert_eq!(s["annotations"]["org.example.signer"], "alice");
    let b = find(&sbom_digest);
    assert_eq!(b["mediaType"], OCI_MANIFEST);
    assert_eq!(b["size"], sbom.len());
    assert_eq!(
        b["artifactType"],
        "application/vnd.example.sbom.config+json"
    );

    // An index can refer to a subject too.
    let bundle = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "artifactType": "application/vnd.example.bundle",
        "manifests": [{"mediaType": OCI_MANIFEST, "digest": sig_digest, "size": sig.len()}],
        "subject": subject_desc,
    }))
    .unwrap();
    let bundle_digest = sha256_digest(&bundle);
    let r = reg.put_manifest(repo, &bundle_digest, OCI_INDEX, &bundle);
    assert_eq!(r.status(), 201, "{}", r.text().unwrap());
    assert_eq!(hdr(&r, "oci-subject"), subject);
    let v: Value = reg
        .get(&format!("/v2/{repo}/referrers/{subject}"))
        .json_value();
    let list = v["manifests"].as_array().unwrap();
    assert_eq!(list.len(), 3, "{v}");
    let x = list
        .iter()
        .find(|m| m["digest"] == bundle_digest.as_str())
        .unwrap();
    assert_eq!(x["mediaType"], OCI_INDEX);
    assert_eq!(x["artifactType"], "application/vnd.example.bundle");
    assert_eq!(x["size"], bundle.len());
    assert_eq!(
        reg.delete(&format!("/v2/{repo}/manifests/{bundle_digest}"))
            .status(),
        202
    );

    // Filtered.
    let r = reg.get(&format!(
        "/v2/{repo}/referrers/{subject}?artifactType=application/vnd.example.sig"
    ));
    assert_eq!(r.status(), 200);
    assert_eq!(hdr(&r, "oci-filters-applied"), "artifactType");
    let v: Value = r.json_value();
    assert_eq!(v["manifests"].as_array().unwrap().len(), 1, "{v}");
    assert_eq!(v["manifests"][0]["digest"], sig_digest);
    // A '+' in the type, percent-encoded as clients encode query values.
    let r = reg.get(&format!(
        "/v2/{repo}/referrers/{subject}?artifactType=application%2Fvnd.example.sbom.config%2Bjson"
    ));
    assert_eq!(hdr(&r, "oci-filters-applied"), "artifactType");
    let v: Value = r.json_value();
    assert_eq!(v["manifests"].as_array().unwrap().len(), 1, "{v}");
    assert_eq!(v["manifests"][0]["digest"], sbom_digest);
    let r = reg.get(&format!(
        "/v2/{repo}/referrers/{subject}?artifactType=application%2Fvnd.example.none"
    ));
    assert_eq!(hdr(&r, "oci-filters-applied"), "artifactType");
    let v: Value = r.json_value();
    assert_eq!(v["manifests"], json!([]));

    // An empty artifactType is no filter.
    let r = reg.get(&format!("/v2/{repo}/referrers/{subject}?artifactType="));
    assert_eq!(r.status(), 200);
    assert!(r.headers().get("oci-filters-applied").is_none());
    assert_eq!(r.json_value()["manifests"].as_array().unwrap().len(), 2);

    // Unknown subject: an empty index, not an error.
    let unknown = sha256_digest(b"no such subject");
    let r = reg.get(&format!("/v2/{repo}/referrers/{unknown}"));
    assert_eq!(r.status(), 200);
    assert_eq!(hdr(&r, "content-type"), OCI_INDEX);
    let v: Value = r.json_value();
    assert_eq!(v["manifests"], json!([]));
    // Referrers are per repository.
    let v: Value = reg
        .get(&format!("/v2/ref/other/referrers/{subject}"))
        .json_value();
    assert_eq!(v["manifests"], json!([]));
    expect_error(
        reg.get(&format!("/v2/{repo}/referrers/sha256:bad")),
        400,
        "DIGEST_INVALID",
    );

    // Deleting a referrer removes it from the list.
    assert_eq!(
        reg.delete(&format!("/v2/{repo}/manifests/{sig_digest}"))
            .status(),
        202
    );
    let v: Value = reg
        .get(&format!("/v2/{repo}/referrers/{subject}"))
        .json_value();
    let list = v["manifests"].as_array().unwrap();
    assert_eq!(list.len(), 1, "{v}");
    assert_eq!(list[0]["digest"], sbom_digest);
    // Pushed by tag, a referrer is listed as well; re-pushing is idempotent.
    assert_eq!(
        reg.put_manifest(repo, "sig", OCI_MANIFEST, &sig).status(),
        201
    );
    assert_eq!(
        reg.put_manifest(repo, "sig", OCI_MANIFEST, &sig).status(),
        201
    );
    let v: Value = reg
        .get(&format!("/v2/{repo}/referrers/{subject}"))
        .json_value();
    assert_eq!(v["manifests"].as_array().unwrap().len(), 2, "{v}");
    // Deleting it by tag only keeps it listed (the manifest still exists).
    assert_eq!(
        reg.delete(&format!("/v2/{repo}/manifests/sig")).status(),
        202
    );
    let v: Value = reg
        .get(&format!("/v2/{repo}/referrers/{subject}"))
        .json_value();
    assert_eq!(v["manifests"].as_array().unwrap().len(), 2, "{v}");
}

/// A subject need not exist when its referrer is pushed (OCI 1.1).
#[test]
fn referrer_pushed_before_its_subject() {
    let reg = Reg::start();
    let empty = reg.push_blob("ref/early", b"{}");
    let subject = sha256_digest(b"a manifest pushed later");
    let art = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": "application/vnd.example.sig",
        "config": {"mediaType": OCI_EMPTY, "digest": empty, "size": 2},
        "layers": [],
        "subject": {"mediaType": OCI_MANIFEST, "digest": subject, "size": 100},
    }))
    .unwrap();
    let r = reg.put_manifest("ref/early", "sig", OCI_MANIFEST, &art);
    assert_eq!(r.status(), 201, "{}", r.text().unwrap());
    assert_eq!(hdr(&r, "oci-subject"), subject);
    let v: Value = reg
        .get(&format!("/v2/ref/early/referrers/{subject}"))
        .json_value();
    assert_eq!(v["manifests"][0]["digest"], sha256_digest(&art));
}

// ---------------------------------------------------------------------------------------------
// bad input
// ---------------------------------------------------------------------------------------------

#[test]
fn invalid_repository_names() {
    let reg = Reg::start();
    let d = sha256_digest(b"x");
    for name in [
        "UPPER",
        "Library/ubuntu",
        "a//b",
        "abc-",
        "-abc",
        "a/b-",
        "a..b",
        "a___b",
        "a_.b",
    ] {
        let paths = [
            format!("/v2/{name}/tags/list"),
            format!("/v2/{name}/manifests/latest"),
            format!("/v2/{name}/blobs/{d}"),
            format!("/v2/{name}/referrers/{d}"),
            format!("/v2/{name}/blobs/uploads/some-id"),
        ];
        for p in &paths {
            expect_error(reg.get(p), 400, "NAME_INVALID");
        }
        expect_error(
            reg.c
                .post(reg.url(&format!("/v2/{name}/blobs/uploads/")))
                .send()
                .unwrap(),
            400,
            "NAME_INVALID",
        );
        expect_error(
            reg.put_manifest(name, "latest", OCI_MANIFEST, b"{}"),
            400,
            "NAME_INVALID",
        );
    }
    // Over 255 characters.
    let long = format!("{}/{}", "a".repeat(200), "b".repeat(60));
    expect_error(
        reg.get(&format!("/v2/{long}/tags/list")),
        400,
        "NAME_INVALID",
    );
    // Valid odd names are fine (an unknown one is NAME_UNKNOWN, not NAME_INVALID).
    for name in ["a__b", "a--b", "a.b/c_d/e-f", "0/1/2"] {
        expect_error(
            reg.get(&format!("/v2/{name}/tags/list")),
            404,
            "NAME_UNKNOWN",
        );
    }
}

#[test]
fn invalid_tags() {
    let reg = Reg::start();
    let (_, body) = reg.push_image("tagv/repo", "ok", 10);
    let too_long = "a".repeat(129);
    for tag in [
        "-bad",
        ".bad",
        ".INVALID_MANIFEST_NAME",
        too_long.as_str(),
        "b%C3%BC",
    ] {
        // No manifest can exist under it: a read says unknown (the conformance suite's
        // expectation), a write says the tag is invalid.
        expect_error(
            reg.get(&format!("/v2/tagv/repo/manifests/{tag}")),
            404,
            "MANIFEST_UNKNOWN",
        );
        let r = reg.head(&format!("/v2/tagv/repo/manifests/{tag}"));
        assert_eq!(r.status(), 404, "HEAD {tag}");
        expect_error(
            reg.put_manifest("tagv/repo", tag, OCI_MANIFEST, &body),
            400,
            "TAG_INVALID",
        );
        expect_error(
            reg.delete(&format!("/v2/tagv/repo/manifests/{tag}")),
            400,
            "TAG_INVALID",
        );
    }
    // 128 characters is the maximum.
    let max = "a".repeat(128);
    assert_eq!(
        reg.put_manifest("tagv/repo", &max, OCI_MANIFEST, &body)
            .status(),
        201
    );
    assert_eq!(
        reg.get(&format!("/v2/tagv/repo/manifests/{max}")).status(),
        200
    );
}

#[test]
fn malformed_digests_everywhere() {
    let reg = Reg::start();
    let good = reg.push_blob("dig/repo", b"content");
    let loc = reg.start_upload("dig/repo");
    let bad_digests = [
        "sha256:zz".to_string(),
        format!("sha256:{}", "A".repeat(64)),
        format!("sha256:{}", "a".repeat(63)),
        format!("md5:{}", "a".repeat(32)),
        format!("sha512:{}", "a".repeat(64)),
        "sha256:".to_string(),
    ];
    for bad in &bad_digests {
        let v = expect_error(
            reg.get(&format!("/v2/dig/repo/blobs/{bad}")),
            400,
            "DIGEST_INVALID",
        );
        assert_eq!(v["errors"][0]["message"], "invalid digest", "{v}");
        assert_eq!(reg.head(&format!("/v2/dig/repo/blobs/{bad}")).status(), 400);
        expect_error(
            reg.delete(&format!("/v2/dig/repo/blobs/{bad}")),
            400,
            "DIGEST_INVALID",
        );
        expect_error(
            reg.get(&format!("/v2/dig/repo/manifests/{bad}")),
            404,
            "MANIFEST_UNKNOWN",
        );
        expect_error(
            reg.delete(&format!("/v2/dig/repo/manifests/{bad}")),
            400,
            "DIGEST_INVALID",
        );
        expect_error(
            reg.put_manifest("dig/repo", bad, OCI_MANIFEST, b"{}"),
            400,
            "DIGEST_INVALID",
        );
        expect_error(
            reg.get(&format!("/v2/dig/repo/referrers/{bad}")),
            400,
            "DIGEST_INVALID",
        );
        let r = reg
            .c
            .post(reg.url(&format!("/v2/dig/repo/blobs/uploads/?digest={bad}")))
            .body(b"content".to_vec())
            .send()
            .unwrap();
        expect_error(r, 400, "DIGEST_INVALID");
        let r = reg.finish_upload(&loc, bad, b"content");
        expect_error(r, 400, "DIGEST_INVALID");
        let r = reg
            .c
            .post(reg.url(&format!(
                "/v2/dig/other/blobs/uploads/?mount={bad}&from=dig/repo"
            )))
            .send()
            .unwrap();
        expect_error(r, 400, "DIGEST_INVALID");
    }
    // A blob route with a tag-like reference: the digest is malformed (not "did not match").
    let v = expect_error(reg.get("/v2/dig/repo/blobs/latest"), 400, "DIGEST_INVALID");
    assert_eq!(v["errors"][0]["message"], "invalid digest", "{v}");
    let v = expect_error(
        reg.get("/v2/dig/repo/referrers/latest"),
        400,
        "DIGEST_INVALID",
    );
    assert_eq!(v["errors"][0]["message"], "invalid digest", "{v}");
    // PUT on a session without ?digest=.
    let r = reg
        .c
        .put(reg.url(&loc))
        .body(b"content".to_vec())
        .send()
        .unwrap();
    expect_error(r, 400, "DIGEST_INVALID");
    let r = reg
        .c
        .put(reg.url(&with_query(&loc, "digest=")))
        .send()
        .unwrap();
    expect_error(r, 400, "DIGEST_INVALID");
    // None of that harmed the session, which still finishes.
    assert_eq!(reg.get(&loc).status(), 204);
    let r = reg.finish_upload(&loc, &good, b"content");
    assert_eq!(r.status(), 201);
}

#[test]
fn unsupported_methods_and_unknown_routes() {
    let reg = Reg::start();
    let (digest, _) = reg.push_image("meth/repo", "latest", 11);
    let loc = reg.start_upload("meth/repo");
    let c = &reg.c;
    for r in [
        c.post(reg.url("/v2/meth/repo/manifests/latest"))
            .body(b"{}".to_vec())
            .send()
            .unwrap(),
        c.patch(reg.url("/v2/meth/repo/manifests/latest"))
            .send()
            .unwrap(),
        c.put(reg.url(&format!("/v2/meth/repo/blobs/{digest}")))
            .body(b"x".to_vec())
            .send()
            .unwrap(),
        c.post(reg.url(&format!("/v2/meth/repo/blobs/{digest}")))
            .send()
            .unwrap(),
        c.delete(reg.url("/v2/meth/repo/tags/list")).send().unwrap(),
        c.put(reg.url("/v2/meth/repo/tags/list")).send().unwrap(),
        c.get(reg.url("/v2/meth/repo/blobs/uploads/"))
            .send()
            .unwrap(),
        c.patch(reg.url("/v2/meth/repo/blobs/uploads/"))
            .send()
            .unwrap(),
        c.post(reg.url(&loc)).send().unwrap(),
        c.delete(reg.url(&format!("/v2/meth/repo/referrers/{digest}")))
            .send()
            .unwrap(),
        c.delete(reg.url("/v2/_catalog")).send().unwrap(),
    ] {
        expect_error(r, 405, "UNSUPPORTED");
    }
    for path in [
        "/v3/",
        "/favicon.ico",
        "/v2/meth/repo",
        "/v2/meth/repo/unknown/route",
        "/v2/manifests/latest",
        "/v2/meth/repo/tags",
    ] {
        let v = expect_error(reg.get(path), 404, "UNSUPPORTED");
        assert!(v["errors"].is_array());
    }
    // The manifest and the session are untouched.
    assert_eq!(reg.get("/v2/meth/repo/manifests/latest").status(), 200);
    assert_eq!(reg.get(&loc).status(), 204);
}

// ---------------------------------------------------------------------------------------------
// against a separate S3 server
// ---------------------------------------------------------------------------------------------

/// Metadata is answered without touching the object store: after a push, manifest GET/HEAD,
/// blob HEAD, tags list, catalog and referrers make no S3 request at all; a blob GET makes one.
#[test]
fn metadata_never_touches_the_object_store() {
    let s3 = S3Server::start();
    let reg = Reg::against(&s3);
    let before = s3.request_count();

    let config = br#"{"architecture":"amd64","os":"linux"}"#;
    let l1 = pseudo_bytes(161, 10_000);
    let l2 = pseudo_bytes(162, 20_000);
    let cd = reg.push_blob("s3/img", config);
    let d1 = reg.push_blob("s3/img", &l1);
    let d2 = reg.push_blob("s3/img", &l2);
    let after_blobs = s3.request_count();
    // Each: one PutObject of the bytes, one bucket journal record of the blob's link.
    assert_eq!(
        after_blobs - before,
        6,
        "one PutObject and one record per small blob"
    );

    let body = image_manifest(
        OCI_MANIFEST,
        (OCI_CONFIG, &cd, config.len()),
        &[(OCI_LAYER, &d1, l1.len()), (OCI_LAYER, &d2, l2.len())],
    );
    let digest = sha256_digest(&body);
    assert_eq!(
        reg.put_manifest("s3/img", "v1", OCI_MANIFEST, &body)
            .status(),
        201
    );
    assert_eq!(
        s3.request_count(),
        after_blobs + 1,
        "a manifest PUT writes one journal record"
    );
    let after_manifest = s3.request_count();

    let r = reg.get("/v2/s3/img/manifests/v1");
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().unwrap().as_ref(), &body[..]);
    assert_eq!(
        reg.head(&format!("/v2/s3/img/manifests/{digest}")).status(),
        200
    );
    for d in [&cd, &d1, &d2] {
        let r = reg.head(&format!("/v2/s3/img/blobs/{d}"));
        assert_eq!(r.status(), 200);
    }
    assert_eq!(
        reg.head(&format!("/v2/s3/img/blobs/{}", sha256_digest(b"x")))
            .status(),
        404
    );
    let v: Value = reg.get("/v2/s3/img/tags/list").json_value();
    assert_eq!(v["tags"], json!(["v1"]));
    let v: Value = reg.get("/v2/_catalog").json_value();
    assert_eq!(v["repositories"], json!(["s3/img"]));
    assert_eq!(
        reg.get(&format!("/v2/s3/img/referrers/{digest}")).status(),
        200
    );
    assert_eq!(
        s3.request_count(),
        after_manifest,
        "reads reached the object store"
    );
    // Mounting, tagging and deleting a tag each write one journal record; an upload session
    // none.
    let r = reg
        .c
        .post(reg.url(&format!(
            "/v2/s3/copy/blobs/uploads/?mount={d1}&from=s3/img"
        )))
        .send()
        .unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(
        reg.put_manifest("s3/img", "v2", OCI_MANIFEST, &body)
            .status(),
        201
    );
    assert_eq!(reg.delete("/v2/s3/img/manifests/v2").status(), 202);
    let loc = reg.start_upload("s3/img");
    assert_eq!(reg.get(&loc).status(), 204);
    assert_eq!(reg.delete(&loc).status(), 204);
    assert_eq!(
        s3.request_count(),
        after_manifest + 3,
        "one journal record per mount, tag and tag delete"
    );

    // Bytes the registry already stores, pushed to another repository: verified, linked, not
    // stored again.
    reg.push_blob("s3/other", &l2);
    assert_eq!(
        s3.request_count(),
        after_manifest + 4,
        "an already stored blob was stored again (one journal record for its link)"
    );

    // A blob GET is one proxied request.
    reg.assert_blob("s3/img", &d1, &l1);
    assert_eq!(s3.request_count(), after_manifest + 5);
}

#[test]
fn objects_in_the_bucket() {
    let s3 = S3Server::start();
    let reg = Reg::against(&s3);
    let blob_dir = s3.root.path().join(S3_BUCKET).join("berth").join("blobs");
    let files =
        |s3: &S3Server| -> BTreeSet<std::path::PathBuf> { s3.blob_files().into_iter().collect() };
    assert!(files(&s3).is_empty(), "{:?}", files(&s3));

    // A monolithic upload: one object, under the prefix, holding the bytes.
    let data = pseudo_bytes(171, 30_000);
    let digest = reg.push_blob("obj/repo", &data);
    let after_push = files(&s3);
    assert_eq!(after_push.len(), 1, "{after_push:?}");
    let object = after_push.iter().next().unwrap();
    assert!(
        object.starts_with(&blob_dir),
        "{object:?} not under {blob_dir:?}"
    );
    assert_eq!(std::fs::read(object).unwrap(), data);

    // The same bytes again (another repository): no second object.
    reg.push_blob("obj/other", &data);
    let r = reg.start_upload("obj/third");
    let r = reg.patch(&r, 0, &data);
    assert_eq!(
        reg.c
            .put(reg.url(&with_query(&r, &format!("digest={digest}"))))
            .send()
            .unwrap()
            .status(),
        201
    );
    assert_eq!(files(&s3), after_push, "duplicate bytes were stored twice");

    // Digest mismatches leave no object behind, whichever way the upload went.
    let wrong = sha256_digest(b"wrong");
    let other = pseudo_bytes(172, 40_000);
    let r = reg
        .c
        .post(reg.url(&format!("/v2/obj/repo/blobs/uploads/?digest={wrong}")))
        .body(other.clone())
        .send()
        .unwrap();
    expect_error(r, 400, "DIGEST_INVALID");
    assert_eq!(files(&s3), after_push);
    let loc = reg.start_upload("obj/repo");
    let r = reg.finish_upload(&loc, &wrong, &other);
    expect_error(r, 400, "DIGEST_INVALID");
    assert_eq!(files(&s3), after_push);
    let big = pseudo_bytes(173, 9 * MIB);
    let loc = reg.start_upload("obj/repo");
    let loc = reg.patch(&loc, 0, &big);
    let r = reg.finish_upload(&loc, &wrong, &[]);
    expect_error(r, 400, "DIGEST_INVALID");
    assert_eq!(files(&s3), after_push);

    // A chunked upload across parts becomes one object with all the bytes.
    let big_digest = sha256_digest(&big);
    let loc = reg.start_upload("obj/repo");
    let loc = reg.patch(&loc, 0, &big[..4 * MIB]);
    let loc = reg.patch(&loc, 4 * MIB, &big[4 * MIB..]);
    assert_eq!(
        reg.c
            .put(reg.url(&with_query(&loc, &format!("digest={big_digest}"))))
            .send()
            .unwrap()
            .status(),
        201
    );
    let now = files(&s3);
    let new: Vec<_> = now.difference(&after_push).collect();
    assert_eq!(new.len(), 1, "{now:?}");
    assert!(new[0].starts_with(&blob_dir));
    assert!(std::fs::read(new[0]).unwrap() == big, "object bytes differ");
    // A cancelled session leaves nothing either.
    let loc = reg.start_upload("obj/repo");
    reg.patch(&loc, 0, &pseudo_bytes(174, 9 * MIB));
    assert_eq!(reg.delete(&loc).status(), 204);
    assert_eq!(files(&s3), now);
}

// ---------------------------------------------------------------------------------------------
// session life: 100-continue, one writer at a time, interrupted requests, expiry
// ---------------------------------------------------------------------------------------------

/// `Expect: 100-continue` (docker sends it): berth says 100 before reading the body; a request
/// refused up front gets its error instead of a 100.
#[test]
fn expect_100_continue() {
    let reg = Reg::start();
    let data = pseudo_bytes(181, 3000);
    let digest = sha256_digest(&data);
    let mut s = raw_connect(reg.berth.port);
    s.write_all(
        format!(
            "POST /v2/cont/repo/blobs/uploads/?digest={digest} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {}\r\nExpect: 100-continue\r\n\r\n",
            data.len()
        )
        .as_bytes(),
    )
    .unwrap();
    let mut buf = Vec::new();
    let (status, _, body) = read_raw_response(&mut s, &mut buf);
    assert_eq!(status, 100);
    assert!(body.is_empty());
    s.write_all(&data).unwrap();
    let (status, headers, _) = read_raw_response(&mut s, &mut buf);
    assert_eq!(status, 201);
    assert_eq!(
        raw_header(&headers, "docker-content-digest"),
        Some(digest.as_str())
    );
    assert_eq!(
        raw_header(&headers, "docker-distribution-api-version"),
        Some("registry/2.0")
    );
    reg.assert_blob("cont/repo", &digest, &data);

    // An invalid name: the error straight away, no 100.
    let (status, headers, body) = raw_request(
        reg.berth.port,
        &format!(
            "POST /v2/Bad/blobs/uploads/?digest={digest} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {}\r\nExpect: 100-continue\r\n\r\n",
            data.len()
        ),
    );
    assert_eq!(status, 400);
    assert_eq!(
        raw_header(&headers, "docker-distribution-api-version"),
        Some("registry/2.0")
    );
    assert_eq!(
        error_code(std::str::from_utf8(&body).unwrap()),
        "NAME_INVALID"
    );
}

/// A body whose chunks come from a channel: the request stays open until the sender goes.
struct GatedBody {
    rx: std::sync::mpsc::Receiver<Vec<u8>>,
    started: Option<std::sync::mpsc::Sender<()>>,
    cur: Vec<u8>,
    pos: usize,
}

impl Read for GatedBody {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if let Some(started) = self.started.take() {
            let _ = started.send(());
        }
        if self.pos == self.cur.len() {
            match self.rx.recv() {
                Ok(v) => {
                    self.cur = v;
                    self.pos = 0;
                }
                Err(_) => return Ok(0),
            }
        }
        let n = buf.len().min(self.cur.len() - self.pos);
        buf[..n].copy_from_slice(&self.cur[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// One writer per session: while a PATCH streams, another PATCH, a PUT or a DELETE on the
/// same session is refused (409); status still answers.
#[test]
fn one_writer_per_session() {
    let reg = Reg::start();
    let data = pseudo_bytes(191, 2000);
    let digest = sha256_digest(&data);
    let loc = reg.start_upload("busy/repo");
    let (tx, rx) = std::sync::mpsc::channel();
    let (started_tx, started_rx) = std::sync::mpsc::channel();
    tx.send(data[..1000].to_vec()).unwrap();
    let url = reg.url(&loc);
    let first = std::thread::spawn(move || {
        let body = GatedBody {
            rx,
            started: Some(started_tx),
            cur: Vec::new(),
            pos: 0,
        };
        let r = client().patch(url).body(Body::new(body)).send().unwrap();
        (r.status().as_u16(), hdr(&r, "range"))
    });
    started_rx.recv_timeout(Duration::from_secs(10)).unwrap();
    // The request head is out; give berth a moment to take the session.
    std::thread::sleep(Duration::from_millis(200));

    let r = reg
        .c
        .patch(reg.url(&loc))
        .body(vec![0u8; 10])
        .send()
        .unwrap();
    expect_error(r, 409, "BLOB_UPLOAD_INVALID");
    let r = reg.finish_upload(&loc, &digest, &[]);
    expect_error(r, 409, "BLOB_UPLOAD_INVALID");
    expect_error(reg.delete(&loc), 409, "BLOB_UPLOAD_INVALID");
    let r = reg.get(&loc);
    assert_eq!(r.status(), 204);
    assert_eq!(hdr(&r, "range"), "0-0", "nothing is committed mid-request");

    tx.send(data[1000..].to_vec()).unwrap();
    drop(tx);
    let (status, range) = first.join().unwrap();
    assert_eq!(status, 202);
    assert_eq!(range, "0-1999");
    let r = reg.finish_upload(&loc, &digest, &[]);
    assert_eq!(r.status(), 201);
    reg.assert_blob("busy/repo", &digest, &data);
}

/// A body that fails after `ok` bytes (the client gives up mid-request).
struct FailingBody {
    inner: std::io::Cursor<Vec<u8>>,
    ok: usize,
}

impl Read for FailingBody {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = self.ok - self.inner.position() as usize;
        if left == 0 {
            return Err(std::io::Error::other("client gives up"));
        }
        let n = buf.len().min(left);
        self.inner.read(&mut buf[..n])
    }
}

/// A PATCH cut off mid-body leaves the session at its last committed state (a part boundary
/// at least); the client resumes from the Range status reports, and the blob is whole.
#[test]
fn interrupted_patch_resumes_from_the_committed_range() {
    let reg = Reg::start();
    let data = pseudo_bytes(201, 12 * MIB);
    let digest = sha256_digest(&data);
    let loc = reg.start_upload("resume/repo");
    let cut = 9 * MIB;
    let r = reg
        .c
        .patch(reg.url(&loc))
        .body(Body::new(FailingBody {
            inner: std::io::Cursor::new(data.clone()),
            ok: cut,
        }))
        .send();
    assert!(r.is_err(), "the request should fail on the client side");

    // berth may still be settling the request: resume from what status says, retrying while
    // the session is busy or its Range moves.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let (loc, offset) = loop {
        assert!(std::time::Instant::now() < deadline, "could not resume");
        let r = reg.get(&loc);
        assert_eq!(r.status(), 204);
        let range = hdr(&r, "range");
        let end: usize = range.strip_prefix("0-").unwrap().parse().unwrap();
        let offset = if range == "0-0" { 0 } else { end + 1 };
        let r = reg
            .c
            .patch(reg.url(&loc))
            .header("Content-Range", format!("{offset}-{}", data.len() - 1))
            .body(data[offset..].to_vec())
            .send();
        match r {
            Ok(r) if r.status() == 202 => break (hdr(&r, "location"), offset),
            Ok(r) if r.status() == 409 || r.status() == 416 => {}
            Ok(r) => panic!("resume PATCH: {} {}", r.status(), r.text().unwrap()),
            // Refused (409/416) before the body was sent: berth closed the connection.
            Err(e) => assert!(e.is_request(), "{e}"),
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        offset == 8 * MIB || offset == cut,
        "resumed at {offset}: the part boundary (8 MiB) or all bytes sent ({cut}) expected"
    );
    let r = reg.finish_upload(&loc, &digest, &[]);
    assert_eq!(r.status(), 201, "{}", r.text().unwrap());
    reg.assert_blob("resume/repo", &digest, &data);
}

/// Idle sessions expire (`upload.session_expiry`), and their multipart upload is aborted.
#[test]
fn idle_upload_sessions_expire() {
    let s3 = S3Server::start();
    let reg = Reg {
        berth: Berth::start_with("upload:\n  session_expiry: 1s\n", Some(&s3)),
        c: client(),
    };
    let in_progress = |s3: &S3Server| -> usize {
        std::fs::read_dir(s3.root.path())
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(".upload"))
            .count()
    };
    let loc = reg.start_upload("expiry/repo");
    reg.patch(&loc, 0, &pseudo_bytes(211, 9 * MIB));
    assert!(
        in_progress(&s3) > 0,
        "a multipart upload should be in progress"
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let r = reg.get(&loc);
        if r.status() == 404 {
            expect_error(r, 404, "BLOB_UPLOAD_UNKNOWN");
            break;
        }
        assert_eq!(r.status(), 204);
        assert!(
            std::time::Instant::now() < deadline,
            "the session did not expire"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(in_progress(&s3), 0, "the multipart upload was not aborted");
}

/// An object gone from the bucket under berth's feet: a blob GET is a JSON 404, not S3's
/// error document.
#[test]
fn blob_missing_from_the_bucket_is_blob_unknown() {
    let s3 = S3Server::start();
    let reg = Reg::against(&s3);
    let digest = reg.push_blob("gone/repo", b"soon gone");
    let files = s3.blob_files();
    assert_eq!(files.len(), 1);
    std::fs::remove_file(&files[0]).unwrap();
    let r = reg.get(&format!("/v2/gone/repo/blobs/{digest}"));
    let v = expect_error(r, 404, "BLOB_UNKNOWN");
    assert!(!v.to_string().contains("NoSuchKey"), "{v}");
}

/// HEAD answers carry the GET's headers and no body, so the connection stays usable: many
/// HEADs then a GET on one connection, each answer where it belongs.
#[test]
fn head_requests_keep_the_connection_usable() {
    let reg = Reg::start();
    let (mdigest, mbody) = reg.push_image("head/repo", "v1", 12);
    let blob = reg.push_blob("head/repo", b"0123456789");
    let missing = sha256_digest(b"missing");
    let mut s = raw_connect(reg.berth.port);
    let mut buf = Vec::new();
    let cases = [
        ("/v2/".to_string(), 200, Some("2".to_string())),
        ("/".to_string(), 200, None),
        ("/v2/_catalog".to_string(), 200, None),
        ("/v2/head/repo/tags/list".to_string(), 200, None),
        (
            "/v2/head/repo/manifests/v1".to_string(),
            200,
            Some(mbody.len().to_string()),
        ),
        (format!("/v2/head/repo/referrers/{mdigest}"), 200, None),
        (
            format!("/v2/head/repo/blobs/{blob}"),
            200,
            Some("10".to_string()),
        ),
        (format!("/v2/head/repo/blobs/{missing}"), 404, None),
        ("/v2/head/repo/manifests/nope".to_string(), 404, None),
        ("/v2/head/unknown/tags/list".to_string(), 404, None),
    ];
    for (path, status, length) in &cases {
        s.write_all(format!("HEAD {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
            .unwrap();
        let (got, headers, _) = read_raw(&mut s, &mut buf, true);
        assert_eq!(got, *status, "HEAD {path}");
        assert_eq!(
            raw_header(&headers, "docker-distribution-api-version"),
            Some("registry/2.0"),
            "HEAD {path}"
        );
        if let Some(length) = length {
            assert_eq!(
                raw_header(&headers, "content-length"),
                Some(length.as_str()),
                "HEAD {path}"
            );
        }
        assert!(
            buf.is_empty(),
            "HEAD {path}: body bytes followed: {:?}",
            String::from_utf8_lossy(&buf)
        );
    }
    s.write_all(b"GET /v2/head/repo/manifests/v1 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .unwrap();
    let (status, _, body) = read_raw_response(&mut s, &mut buf);
    assert_eq!(status, 200);
    assert_eq!(body, mbody);

    // Requests that do not parse close the connection (a body may follow unread): they say
    // so, and send no body to a HEAD either.
    for (path, status) in [("/v2/Bad/tags/list", 400), ("/v3/", 404)] {
        let mut s = raw_connect(reg.berth.port);
        s.write_all(format!("HEAD {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
            .unwrap();
        let mut buf = Vec::new();
        let (got, headers, _) = read_raw(&mut s, &mut buf, true);
        assert_eq!(got, status, "HEAD {path}");
        assert_eq!(
            raw_header(&headers, "docker-distribution-api-version"),
            Some("registry/2.0")
        );
        assert_eq!(
            raw_header(&headers, "connection"),
            Some("close"),
            "HEAD {path}"
        );
        s.read_to_end(&mut buf).unwrap();
        assert!(buf.is_empty(), "HEAD {path}: a body followed");
    }
}

/// Repository names may have components named like the route keywords.
#[test]
fn repository_names_with_route_keywords() {
    let reg = Reg::start();
    for repo in [
        "blobs",
        "manifests",
        "tags/list",
        "a/blobs/uploads",
        "x/manifests/y",
        "referrers/v2",
    ] {
        let (digest, body) = reg.push_image(repo, "latest", 13);
        let r = reg.get(&format!("/v2/{repo}/manifests/latest"));
        assert_eq!(r.status(), 200, "{repo}");
        assert_eq!(r.bytes().unwrap().as_ref(), &body[..], "{repo}");
        let v: Value = reg.get(&format!("/v2/{repo}/tags/list")).json_value();
        assert_eq!(v["name"], *repo);
        assert_eq!(v["tags"], json!(["latest"]));
        let loc = reg.start_upload(repo);
        let data = format!("data of {repo}").into_bytes();
        let d = sha256_digest(&data);
        let loc = reg.patch(&loc, 0, &data);
        assert_eq!(
            reg.c
                .put(reg.url(&with_query(&loc, &format!("digest={d}"))))
                .send()
                .unwrap()
                .status(),
            201,
            "{repo}"
        );
        assert_eq!(
            reg.get(&format!("/v2/{repo}/blobs/{d}"))
                .bytes()
                .unwrap()
                .as_ref(),
            &data[..],
            "{repo}"
        );
        assert_eq!(
            reg.get(&format!("/v2/{repo}/referrers/{digest}")).status(),
            200,
            "{repo}"
        );
    }
    let v: Value = reg.get("/v2/_catalog").json_value();
    assert_eq!(
        v["repositories"],
        json!([
            "a/blobs/uploads",
            "blobs",
            "manifests",
            "referrers/v2",
            "tags/list",
            "x/manifests/y"
        ])
    );
}

/// A monolithic upload whose body ends before its Content-Length: refused, nothing served,
/// no object left in the bucket.
#[test]
fn truncated_upload_body_stores_nothing() {
    let s3 = S3Server::start();
    let reg = Reg::against(&s3);
    let data = pseudo_bytes(221, 100_000);
    let digest = sha256_digest(&data);
    for (method, path) in [
        (
            "POST",
            format!("/v2/trunc/repo/blobs/uploads/?digest={digest}"),
        ),
        (
            "PUT",
            with_query(&reg.start_upload("trunc/repo"), &format!("digest={digest}")),
        ),
    ] {
        let mut s = raw_connect(reg.berth.port);
        s.write_all(
            format!(
                "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {}\r\n\r\n",
                data.len()
            )
            .as_bytes(),
        )
        .unwrap();
        s.write_all(&data[..60_000]).unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut buf = Vec::new();
        let (status, headers, body) = read_raw_response(&mut s, &mut buf);
        assert_eq!(status, 400, "{method}: {}", String::from_utf8_lossy(&body));
        assert_eq!(
            raw_header(&headers, "docker-distribution-api-version"),
            Some("registry/2.0")
        );
        let code = error_code(std::str::from_utf8(&body).unwrap());
        assert!(
            code == "SIZE_INVALID" || code == "BLOB_UPLOAD_INVALID",
            "{method}: {code}"
        );
        expect_head_error(reg.head(&format!("/v2/trunc/repo/blobs/{digest}")), 404);
        assert!(
            s3.blob_files().is_empty(),
            "{method}: {:?}",
            s3.blob_files()
        );
    }
    // The whole body then goes in.
    reg.push_blob("trunc/repo", &data);
    reg.assert_blob("trunc/repo", &digest, &data);
    assert_eq!(s3.blob_files().len(), 1);
}

fn sha512_digest(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    format!("sha512:{}", hex::encode(sha2::Sha512::digest(bytes)))
}

/// `sha512:` digests round trip: monolithic and chunked uploads (one below a part, one over
/// several parts), blob GET/HEAD, mount, manifests pushed by a sha512 digest; a wrong sha512
/// is refused and nothing is served under it.
#[test]
fn sha512_round_trips() {
    let reg = Reg::with("upload:\n  part_size: 5MiB\n");
    let small = b"sha512 content".to_vec();
    let d = sha512_digest(&small);
    let r = reg
        .c
        .post(reg.url(&format!("/v2/s512/repo/blobs/uploads/?digest={d}")))
        .body(small.clone())
        .send()
        .unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().unwrap());
    assert_eq!(hdr(&r, "docker-content-digest"), d);
    let r = reg.get(&format!("/v2/s512/repo/blobs/{d}"));
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().unwrap()[..], small[..]);
    let r = reg.head(&format!("/v2/s512/repo/blobs/{d}"));
    assert_eq!(hdr(&r, "content-length"), small.len().to_string());

    // Chunked: 2 PATCHes under one part, and 11 MiB over three parts.
    for len in [3000usize, 11 * 1024 * 1024 + 5] {
        let data: Vec<u8> = (0..len).map(|i| (i * 31 % 253) as u8).collect();
        let d = sha512_digest(&data);
        let loc = reg.start_upload("s512/repo");
        let half = len / 2;
        let loc = reg.patch(&loc, 0, &data[..half]);
        let loc = reg.patch(&loc, half, &data[half..]);
        // A wrong sha512 first: refused, and the session is gone with its bytes.
        let wrong = sha512_digest(b"other bytes");
        expect_error(reg.finish_upload(&loc, &wrong, b""), 400, "DIGEST_INVALID");
        expect_error(
            reg.get(&format!("/v2/s512/repo/blobs/{wrong}")),
            404,
            "BLOB_UNKNOWN",
        );
        let loc = reg.start_upload("s512/repo");
        let loc = reg.patch(&loc, 0, &data);
        let r = reg.finish_upload(&loc, &d, b"");
        assert_eq!(r.status(), 201, "{len} bytes: {}", r.text().unwrap());
        let got = reg
            .get(&format!("/v2/s512/repo/blobs/{d}"))
            .bytes()
            .unwrap();
        assert!(got[..] == data[..], "{len} bytes differ");
    }

    // Mount into another repository.
    let r = reg
        .c
        .post(reg.url(&format!(
            "/v2/s512/other/blobs/uploads/?mount={d}&from=s512/repo"
        )))
        .send()
        .unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(reg.get(&format!("/v2/s512/other/blobs/{d}")).status(), 200);

    // A manifest pushed by its sha512 digest, referencing the sha512 blob.
    let config = reg.push_blob("s512/repo", b"{}");
    let body = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config, "size": 2},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": d, "size": small.len()}],
    }))
    .unwrap();
    let md = sha512_digest(&body);
    let r = reg.put_manifest("s512/repo", &md, OCI_MANIFEST, &body);
    assert_eq!(r.status(), 201);
    assert_eq!(hdr(&r, "docker-content-digest"), md);
    let r = reg.get(&format!("/v2/s512/repo/manifests/{md}"));
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().unwrap()[..], body[..]);
    // The wrong sha512 in the URL is refused.
    let wrong = sha512_digest(b"not this manifest");
    expect_error(
        reg.put_manifest("s512/repo", &wrong, OCI_MANIFEST, &body),
        400,
        "DIGEST_INVALID",
    );
}

/// The harness runs the object store it says: a pushed blob's bytes are under the data dir
/// (the local store) by default, and nowhere there with `BERTH_TEST_STORAGE=s3`.
#[test]
fn the_harness_runs_the_object_store_it_says() {
    let reg = Reg::with("");
    reg.push_blob("harness/repo", &pseudo_bytes(7, 10_000));
    let blobs = reg.berth.data_path().join("objects/registry/blobs");
    let local_files = std::fs::read_dir(&blobs).map_or(0, |d| d.count());
    assert_eq!(
        local_files > 0,
        !test_storage_is_s3(),
        "{}",
        blobs.display()
    );
}
