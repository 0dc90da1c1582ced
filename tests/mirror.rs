//! Pull-through mirrors against real upstream registries on loopback:
//! - CNCF distribution 2.8.2 (Debian's `docker-registry`) with htpasswd (Basic auth), its
//!   requests counted in its access log;
//! - another berth in Docker token mode (the bearer flow), with a token service here;
//! - a test upstream that serves a layer with one byte flipped.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::credentials::*;
use common::*;
use reqwest::blocking::Client;
use serde_json::json;

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

/// distribution 2.8.2 serving a filesystem root, with htpasswd auth.
struct Distribution {
    child: Child,
    port: u16,
    log: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Distribution {
    fn start(user: &str, password: &str) -> Option<Distribution> {
        if !have_tool("docker-registry", "docker-registry") {
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let htpasswd = htpasswd_file(dir.path(), &[(user, password)]);
        let port = free_port();
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: info\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\nauth:\n  htpasswd:\n    realm: upstream\n    path: {}\n",
                dir.path().join("root").display(),
                htpasswd.display()
            ),
        )
        .unwrap();
        let log = dir.path().join("registry.log");
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .env_remove("AWS_CA_BUNDLE")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("start docker-registry");
        let d = Distribution {
            child,
            port,
            log,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(r) = client().get(d.url("/v2/")).send() {
                if r.status() == 401 {
                    return Some(d);
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("docker-registry did not start:\n{}", d.log_text());
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Blob GETs of `repo` the upstream served, from its access log.
    fn blob_gets(&self, repo: &str, digest: &str) -> usize {
        let needle = format!("\"GET /v2/{repo}/blobs/{digest} ");
        self.log_text().matches(&needle).count()
    }

    fn all_blob_gets(&self) -> usize {
        self.log_text()
            .lines()
            .filter(|l| l.contains("\"GET /v2/") && l.contains("/blobs/sha256:"))
            .count()
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Distribution {
    fn drop(&mut self) {
        self.stop();
    }
}

/// An image pushed upstream: its manifest and blobs.
struct Image {
    manifest: Vec<u8>,
    manifest_digest: String,
    /// (digest, bytes), config first.
    blobs: Vec<(String, Vec<u8>)>,
}

fn image(seed: u64, layer_sizes: &[usize]) -> Image {
    let config =
        serde_json::to_vec(&json!({"architecture": "amd64", "os": "linux", "seed": seed})).unwrap();
    let mut blobs = vec![(sha256_digest(&config), config)];
    for (i, size) in layer_sizes.iter().enumerate() {
        let mut bytes = vec![0u8; *size];
        PseudoRandom::new(seed * 100 + i as u64, *size as u64)
            .read_exact(&mut bytes)
            .unwrap();
        blobs.push((sha256_digest(&bytes), bytes));
    }
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": blobs[0].0, "size": blobs[0].1.len()},
        "layers": blobs[1..].iter().map(|(d, b)| json!({"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": d, "size": b.len()})).collect::<Vec<_>>(),
    }))
    .unwrap();
    Image {
        manifest_digest: sha256_digest(&manifest),
        manifest,
        blobs,
    }
}

/// Pushes `img` to `base` as `repo:tag` (POST, then PUT ?digest= with the body).
fn push(c: &Client, base: &str, auth: Option<&str>, repo: &str, tag: &str, img: &Image) {
    let with = |r: reqwest::blocking::RequestBuilder| match auth {
        Some(a) => r.header("Authorization", a),
        None => r,
    };
    for (digest, bytes) in &img.blobs {
        let r = with(c.post(format!("{base}/v2/{repo}/blobs/uploads/")))
            .send()
            .unwrap();
        assert_eq!(r.status(), 202, "start upload: {}", r.text().unwrap());
        let loc = r.headers()["location"].to_str().unwrap().to_string();
        let loc = if loc.starts_with("http") {
            loc
        } else {
            format!("{base}{loc}")
        };
        let sep = if loc.contains('?') { '&' } else { '?' };
        let r = with(c.put(format!("{loc}{sep}digest={digest}")))
            .body(bytes.clone())
            .send()
            .unwrap();
        assert_eq!(r.status(), 201, "finish upload: {}", r.text().unwrap());
    }
    let r = with(c.put(format!("{base}/v2/{repo}/manifests/{tag}")))
        .header("Content-Type", OCI_MANIFEST)
        .body(img.manifest.clone())
        .send()
        .unwrap();
    assert_eq!(r.status(), 201, "manifest: {}", r.text().unwrap());
}

/// Pulls `repo:tag` from berth and checks every byte against `img`.
fn pull_and_check(c: &Client, berth: &Berth, repo: &str, tag: &str, img: &Image) {
    let r = c
        .get(berth.url(&format!("/v2/{repo}/manifests/{tag}")))
        .header("Accept", OCI_MANIFEST)
        .send()
        .unwrap();
    assert_eq!(
        r.status(),
        200,
        "manifest {repo}:{tag}: {}",
        r.text().unwrap()
    );
    assert_eq!(
        r.headers()["docker-content-digest"],
        img.manifest_digest.as_str()
    );
    assert_eq!(r.bytes().unwrap().as_ref(), img.manifest.as_slice());
    for (digest, bytes) in &img.blobs {
        let r = c
            .get(berth.url(&format!("/v2/{repo}/blobs/{digest}")))
            .send()
            .unwrap();
        assert_eq!(r.status(), 200, "blob {digest}");
        let body = r.bytes().unwrap();
        assert!(
            body.as_ref() == bytes.as_slice(),
            "blob {digest}: {} bytes, want {}",
            body.len(),
            bytes.len()
        );
    }
}

fn mirror_yaml(prefix: &str, url: &str, credentials: Option<(&str, &str)>, ttl: &str) -> String {
    let mut y = format!("proxy:\n  - prefix: {prefix}\n    remoteurl: {url}\n    ttl: {ttl}\n");
    if let Some((u, p)) = credentials {
        y.push_str(&format!("    username: {u}\n    password: {p}\n"));
    }
    y
}

fn basic(user: &str, pw: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pw}"))
    )
}

#[test]
fn mirror_of_distribution_caches_refreshes_and_survives_the_upstream() {
    let Some(mut upstream) = Distribution::start("puller", "s3cret") else {
        return;
    };
    let c = client();
    let auth = basic("puller", "s3cret");
    let v1 = image(1, &[300_000, 2 << 20]);
    push(&c, &upstream.url(""), Some(&auth), "library/app", "v1", &v1);

    let berth = Berth::start(&mirror_yaml(
        "hub/",
        &upstream.url(""),
        Some(("puller", "s3cret")),
        "2s",
    ));

    // First pull: every blob comes from upstream once.
    pull_and_check(&c, &berth, "hub/library/app", "v1", &v1);
    for (d, _) in &v1.blobs {
        assert_eq!(upstream.blob_gets("library/app", d), 1, "{d}");
    }
    // Second pull: no upstream blob request.
    let before = upstream.all_blob_gets();
    pull_and_check(&c, &berth, "hub/library/app", "v1", &v1);
    assert_eq!(upstream.all_blob_gets(), before);

    // Writes under the mirror prefix: 405 UNSUPPORTED.
    let r = c
        .post(berth.url("/v2/hub/library/app/blobs/uploads/"))
        .send()
        .unwrap();
    assert_eq!(r.status(), 405);
    assert_eq!(error_code(&r.text().unwrap()), "UNSUPPORTED");
    let r = c
        .put(berth.url("/v2/hub/library/app/manifests/v1"))
        .header("Content-Type", OCI_MANIFEST)
        .body(v1.manifest.clone())
        .send()
        .unwrap();
    assert_eq!(r.status(), 405);
    let r = c
        .delete(berth.url(&format!(
            "/v2/hub/library/app/manifests/{}",
            v1.manifest_digest
        )))
        .send()
        .unwrap();
    assert_eq!(r.status(), 405);

    // The tag moves upstream: seen once the ttl has passed, and only its new blobs are fetched.
    let v2 = image(2, &[100_000]);
    push(&c, &upstream.url(""), Some(&auth), "library/app", "v1", &v2);
    std::thread::sleep(Duration::from_millis(2200));
    pull_and_check(&c, &berth, "hub/library/app", "v1", &v2);
    pull_and_check(&c, &berth, "hub/library/app", &v1.manifest_digest, &v1);

    // Upstream gone: cached content still pulls, the tag is served stale.
    upstream.stop();
    std::thread::sleep(Duration::from_millis(2200));
    pull_and_check(&c, &berth, "hub/library/app", "v1", &v2);
    pull_and_check(&c, &berth, "hub/library/app", &v1.manifest_digest, &v1);
    assert!(
        berth.log().contains("serving the cached"),
        "{}",
        berth.log()
    );
    // Never cached and upstream gone: 503 with an OCI error.
    let r = c
        .get(berth.url("/v2/hub/library/other/manifests/latest"))
        .send()
        .unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(error_code(&r.text().unwrap()), "UNAVAILABLE");
}

#[test]
fn concurrent_misses_fetch_each_blob_once() {
    let Some(upstream) = Distribution::start("puller", "s3cret") else {
        return;
    };
    let c = client();
    let img = image(3, &[3 << 20, 1 << 20]);
    push(
        &c,
        &upstream.url(""),
        Some(&basic("puller", "s3cret")),
        "team/tool",
        "1.0",
        &img,
    );
    let berth = Arc::new(Berth::start(&mirror_yaml(
        "up/",
        &upstream.url(""),
        Some(("puller", "s3cret")),
        "10m",
    )));
    let img = Arc::new(img);
    let pulls: Vec<_> = (0..20)
        .map(|_| {
            let berth = berth.clone();
            let img = img.clone();
            std::thread::spawn(move || {
                pull_and_check(&client(), &berth, "up/team/tool", "1.0", &img)
            })
        })
        .collect();
    for p in pulls {
        p.join().unwrap();
    }
    for (d, _) in &img.blobs {
        assert_eq!(upstream.blob_gets("team/tool", d), 1, "{d}");
    }
}

#[test]
fn skopeo_pulls_through_the_mirror() {
    if !have_tool("skopeo", "skopeo") {
        return;
    }
    let Some(upstream) = Distribution::start("puller", "s3cret") else {
        return;
    };
    let c = client();
    let img = image(4, &[500_000]);
    push(
        &c,
        &upstream.url(""),
        Some(&basic("puller", "s3cret")),
        "library/base",
        "stable",
        &img,
    );
    let berth = Berth::start(&mirror_yaml(
        "hub/",
        &upstream.url(""),
        Some(("puller", "s3cret")),
        "10m",
    ));
    let out = tempfile::tempdir().unwrap();
    let dest = out.path().join("img");
    let status = Command::new("skopeo")
        .args([
            "copy",
            "--src-tls-verify=false",
            "--dest-oci-accept-uncompressed-layers",
        ])
        .arg(format!(
            "docker://{}",
            berth
                .url("/hub/library/base:stable")
                .trim_start_matches("http://")
        ))
        .arg(format!("oci:{}:stable", dest.display()))
        .status()
        .unwrap();
    assert!(status.success());
    for (d, bytes) in &img.blobs {
        let path = dest.join("blobs/sha256").join(&d[7..]);
        assert_eq!(&std::fs::read(&path).unwrap(), bytes, "{d}");
    }
}

/// A one-thread HTTP/1.1 server: each request is answered by `handler(method, path,
/// headers)` and the connection closed.
fn tiny_server(
    handler: impl Fn(&str, &str, &str) -> (u16, Vec<(String, String)>, Vec<u8>) + Send + 'static,
) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut request_line = String::new();
            if reader.read_line(&mut request_line).is_err() {
                continue;
            }
            let mut headers = String::new();
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                headers.push_str(&line.to_ascii_lowercase());
            }
            let mut parts = request_line.split_whitespace();
            let method = parts.next().unwrap_or("").to_string();
            let path = parts.next().unwrap_or("").to_string();
            let (status, extra, body) = handler(&method, &path, &headers);
            let mut head = format!(
                "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n",
                body.len()
            );
            for (k, v) in extra {
                head.push_str(&format!("{k}: {v}\r\n"));
            }
            head.push_str("\r\n");
            let _ = stream.write_all(head.as_bytes());
            if method != "HEAD" {
                let _ = stream.write_all(&body);
            }
        }
    });
    port
}

#[test]
fn a_corrupted_layer_is_refused_and_not_recorded() {
    let img = Arc::new(image(5, &[1 << 20]));
    let layer = img.blobs[1].0.clone();
    let gets = Arc::new(AtomicU64::new(0));
    let port = {
        let img = img.clone();
        let gets = gets.clone();
        let layer = layer.clone();
        tiny_server(move |method, path, _| {
            if path == "/v2/" {
                return (200, vec![], b"{}".to_vec());
            }
            if path.contains("/manifests/") {
                return (
                    200,
                    vec![
                        ("Content-Type".into(), OCI_MANIFEST.into()),
                        ("Docker-Content-Digest".into(), img.manifest_digest.clone()),
                    ],
                    img.manifest.clone(),
                );
            }
            for (d, bytes) in &img.blobs {
                if path.ends_with(d.as_str()) {
                    if method == "GET" {
                        gets.fetch_add(1, Ordering::SeqCst);
                    }
                    let mut b = bytes.clone();
                    if *d == layer {
                        b[1000] ^= 0x01; // one flipped bit
                    }
                    return (200, vec![], b);
                }
            }
            (404, vec![], b"{}".to_vec())
        })
    };
    let berth = Berth::start(&mirror_yaml(
        "bad/",
        &format!("http://127.0.0.1:{port}"),
        None,
        "10m",
    ));
    let c = client();
    let url = berth.url(&format!("/v2/bad/app/blobs/{layer}"));
    for attempt in 1..=2 {
        // The transfer fails: cut short, so the body never arrives whole.
        let got = c.get(&url).send().and_then(|r| r.bytes());
        if let Ok(body) = &got {
            assert_ne!(body.as_ref(), img.blobs[1].1.as_slice());
            assert!(body.len() < img.blobs[1].1.len(), "a whole body arrived");
        }
        // Nothing recorded: the next GET goes upstream again.
        assert_eq!(gets.load(Ordering::SeqCst), attempt);
    }
    assert!(berth.log().contains("nothing recorded"), "{}", berth.log());
    // The intact config blob is cached.
    let config = &img.blobs[0];
    let r = c
        .get(berth.url(&format!("/v2/bad/app/blobs/{}", config.0)))
        .send()
        .unwrap();
    assert_eq!(r.bytes().unwrap().as_ref(), config.1.as_slice());
    let r = c
        .get(berth.url(&format!("/v2/bad/app/blobs/{}", config.0)))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(gets.load(Ordering::SeqCst), 3);
}

#[test]
fn token_flow_against_a_berth_upstream() {
    let issuer = Issuer::new();
    let tokens = Arc::new(AtomicU64::new(0));
    let token_port = {
        let tokens = tokens.clone();
        let key_der = issuer.key.serialize_der();
        tiny_server(move |_, path, _| {
            tokens.fetch_add(1, Ordering::SeqCst);
            // scope=repository:<name>:pull
            let scope = path
                .split("scope=")
                .nth(1)
                .unwrap_or("")
                .split('&')
                .next()
                .unwrap_or("");
            let scope = percent_decode(scope);
            let name = scope.split(':').nth(1).unwrap_or("").to_string();
            let now = jsonwebtoken::get_current_timestamp();
            let claims = json!({
                "iss": ISSUER, "sub": "mirror", "aud": SERVICE, "exp": now + 300, "nbf": now - 1,
                "iat": now, "jti": format!("{now}"),
                "access": [{"type": "repository", "name": name, "actions": ["pull", "push"]}],
            });
            let token = jsonwebtoken::encode(
                &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256),
                &claims,
                &jsonwebtoken::EncodingKey::from_ec_der(&key_der),
            )
            .unwrap();
            (
                200,
                vec![("Content-Type".into(), "application/json".into())],
                serde_json::to_vec(&json!({"token": token, "expires_in": 300})).unwrap(),
            )
        })
    };
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("bundle.pem");
    std::fs::write(&bundle, &issuer.cert_pem).unwrap();
    let upstream = Berth::start(&format!(
        "auth:\n  token:\n    realm: http://127.0.0.1:{token_port}/token\n    service: {SERVICE}\n    issuer: {ISSUER}\n    rootcertbundle: {}\n",
        bundle.display()
    ));
    let img = image(6, &[200_000, 400_000]);
    let push_token = issuer.token(&[("repository", "org/svc", &["pull", "push"])]);
    push(
        &client(),
        &upstream.url(""),
        Some(&format!("Bearer {push_token}")),
        "org/svc",
        "v1",
        &img,
    );

    let berth = Berth::start(&mirror_yaml("up/", &upstream.url(""), None, "10m"));
    let c = client();
    pull_and_check(&c, &berth, "up/org/svc", "v1", &img);
    // One token for the repository, reused for the manifest and every blob.
    assert_eq!(tokens.load(Ordering::SeqCst), 1);
}

fn percent_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}
