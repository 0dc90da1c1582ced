//! Self-healing: berth recovers from crashes and faults of its stores without a restart, and
//! start-up that cannot succeed fails fast.

mod common;

use std::time::{Duration, Instant};

use berth::meta::redb::RedbStore;
use berth::meta::{MetaStore, UploadSession};
use common::{client, error_code, free_port, Berth, PseudoRandom};
use reqwest::blocking::{Client, Response};

const MIB: u64 = 1024 * 1024;

fn random_bytes(seed: u64, len: u64) -> Vec<u8> {
    let mut v = vec![0u8; len as usize];
    std::io::Read::read_exact(&mut PseudoRandom::new(seed, len), &mut v).unwrap();
    v
}

fn header(r: &Response, name: &str) -> String {
    r.headers()
        .get(name)
        .unwrap_or_else(|| panic!("no {name} header"))
        .to_str()
        .unwrap()
        .to_string()
}

/// POST a new session; its absolute upload URL.
fn start_upload(c: &Client, berth: &Berth, repo: &str) -> String {
    let r = c
        .post(berth.url(&format!("/v2/{repo}/blobs/uploads/")))
        .send()
        .unwrap();
    assert_eq!(r.status(), 202, "start upload: {}", berth.log());
    berth.url(&header(&r, "location"))
}

/// PATCH `bytes` at `start`; the next upload URL.
fn patch(c: &Client, berth: &Berth, url: &str, start: u64, bytes: Vec<u8>) -> String {
    let end = start + bytes.len() as u64 - 1;
    let r = c
        .patch(url)
        .header("Content-Type", "application/octet-stream")
        .header("Content-Range", format!("{start}-{end}"))
        .body(bytes)
        .send()
        .unwrap();
    assert_eq!(r.status(), 202, "PATCH: {}", berth.log());
    berth.url(&header(&r, "location"))
}

fn session_id(url: &str) -> String {
    url.rsplit('/')
        .next()
        .unwrap()
        .split('?')
        .next()
        .unwrap()
        .to_string()
}

/// The files of the local store's multipart uploads (`objects/.uploads/<id>/...`), and of
/// interrupted writes (`objects/.tmp/`).
fn multipart_files(berth: &Berth) -> Vec<String> {
    let objects = berth.data_path().join("objects");
    let mut out = Vec::new();
    for dir in [".uploads", ".tmp"] {
        let Ok(entries) = std::fs::read_dir(objects.join(dir)) else {
            continue;
        };
        for e in entries.flatten() {
            let name = format!("{dir}/{}", e.file_name().to_string_lossy());
            match std::fs::read_dir(e.path()) {
                Ok(files) => out.extend(
                    files
                        .flatten()
                        .map(|f| format!("{name}/{}", f.file_name().to_string_lossy())),
                ),
                Err(_) => out.push(name),
            }
        }
    }
    out
}

/// The session's multipart upload id, read from the metadata store (berth must be stopped).
fn multipart_id(berth: &Berth, id: &str) -> String {
    let store = RedbStore::open(&berth.data_path().join("meta.redb")).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let session = rt.block_on(store.upload(id)).unwrap().expect("session");
    session.multipart_id.expect("a multipart upload")
}

/// An upload the object store no longer knows, its part files still on disk: the local
/// store's record of the upload (its `key` file) removed.
fn forget_upload_record(berth: &Berth, multipart_id: &str) {
    let record = berth
        .data_path()
        .join("objects/.uploads")
        .join(multipart_id)
        .join("key");
    std::fs::remove_file(&record).unwrap();
}

fn wait_until(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn metric(c: &Client, metrics_port: u16, name: &str) -> f64 {
    let text = c
        .get(format!("http://127.0.0.1:{metrics_port}/metrics"))
        .send()
        .unwrap()
        .text()
        .unwrap();
    text.lines()
        .find(|l| l.split_whitespace().next() == Some(name))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in /metrics"))
}

/// One expiry pass meets a session it cannot discard, a session whose multipart upload the
/// embedded store forgot, and a healthy one: the failure is logged with its cause and
/// counted, the pass goes on, and the forgotten upload's part files are reclaimed.
#[test]
fn expiry_goes_on_past_a_failing_session_and_reclaims_forgotten_uploads() {
    let mut berth = Berth::start("");
    let c = client();
    let forgotten = start_upload(&c, &berth, "heal/forgotten");
    let forgotten = patch(&c, &berth, &forgotten, 0, random_bytes(1, 9 * MIB));
    let healthy = start_upload(&c, &berth, "heal/healthy");
    let healthy = patch(&c, &berth, &healthy, 0, random_bytes(2, 9 * MIB));
    berth.kill();

    forget_upload_record(&berth, &multipart_id(&berth, &session_id(&forgotten)));
    // A session whose abort the object store fails: its upload's directory is a file.
    let refused = "0b5f0a4e-6a43-4a8e-9c1e-2f4d1c0a9b7e";
    std::fs::write(
        berth.data_path().join("objects/.uploads").join(refused),
        b"x",
    )
    .unwrap();
    let store = RedbStore::open(&berth.data_path().join("meta.redb")).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(store.create_upload(&UploadSession {
        id: "refused-by-the-store".into(),
        repo: "heal/refused".into(),
        key: "blobs/refused-by-the-store".into(),
        multipart_id: Some(refused.into()),
        ..Default::default()
    }))
    .unwrap();
    drop(store);

    let metrics_port = free_port();
    berth.rewrite_config(&format!(
        "upload:\n  session_expiry: 2s\nmetrics:\n  listen: 127.0.0.1:{metrics_port}\n"
    ));
    berth.restart();
    let unknown = |url: &str| c.get(url).send().unwrap().status() == 404;
    wait_until("both sessions to expire", Duration::from_secs(20), || {
        unknown(&forgotten) && unknown(&healthy)
    });
    let r = c.get(&healthy).send().unwrap();
    assert_eq!(error_code(&r.text().unwrap()), "BLOB_UPLOAD_UNKNOWN");
    assert_eq!(
        multipart_files(&berth),
        [format!(".uploads/{refused}")],
        "multipart files left behind"
    );
    wait_until("the failure to be counted", Duration::from_secs(10), || {
        metric(&c, metrics_port, "berth_upload_expiry_failures_total") >= 1.0
    });
    let log = berth.log();
    let line = log
        .lines()
        .find(|l| l.contains("session refused-by-the-store"))
        .unwrap_or_else(|| panic!("no log line for the failing session:\n{log}"));
    assert!(
        line.contains("Not a directory"),
        "the cause is not logged: {line}"
    );
    assert!(metric(&c, metrics_port, "berth_uploads_total{outcome=\"expired\"}") >= 2.0);
}

/// A client retrying `PUT ?digest=` on a session whose multipart upload is gone (berth was
/// killed inside the completion) gets 404 BLOB_UPLOAD_UNKNOWN, not a 500 forever; the
/// session and its stranded parts are gone, and a new upload of the same blob succeeds.
#[test]
fn finishing_a_session_whose_upload_is_gone_is_upload_unknown() {
    let mut berth = Berth::start("");
    let c = client();
    let data = random_bytes(3, 9 * MIB + 17);
    let digest = common::sha256_digest(&data);
    let url = start_upload(&c, &berth, "heal/retry");
    let url = patch(&c, &berth, &url, 0, data.clone());
    berth.kill();
    forget_upload_record(&berth, &multipart_id(&berth, &session_id(&url)));
    berth.restart();

    for _ in 0..2 {
        let sep = if url.contains('?') { '&' } else { '?' };
        let r = c
            .put(format!("{url}{sep}digest={digest}"))
            .header("Content-Length", "0")
            .send()
            .unwrap();
        assert_eq!(
            r.status(),
            404,
            "PUT ?digest= on a lost upload: {}",
            berth.log()
        );
        assert_eq!(error_code(&r.text().unwrap()), "BLOB_UPLOAD_UNKNOWN");
    }
    assert_eq!(c.get(&url).send().unwrap().status(), 404);
    assert!(
        multipart_files(&berth).is_empty(),
        "stranded parts left: {:?}",
        multipart_files(&berth)
    );
    // The client starts over.
    let again = start_upload(&c, &berth, "heal/retry");
    let again = patch(&c, &berth, &again, 0, data.clone());
    let sep = if again.contains('?') { '&' } else { '?' };
    let r = c
        .put(format!("{again}{sep}digest={digest}"))
        .header("Content-Length", "0")
        .send()
        .unwrap();
    assert_eq!(r.status(), 201, "{}", berth.log());
    let got = c
        .get(berth.url(&format!("/v2/heal/retry/blobs/{digest}")))
        .send()
        .unwrap()
        .bytes()
        .unwrap();
    assert!(got[..] == data[..], "blob differs");
}

// ---------------------------------------------------------------------------------------------
// start-up that cannot succeed, and shutdown

#[track_caller]
fn assert_fails_fast(exited: Option<common::Exited>, says: &str) {
    let e = exited.expect("berth still runs after 5 s");
    assert!(
        !e.status.success(),
        "exit status {}: {}",
        e.status,
        e.output
    );
    assert!(
        e.after < Duration::from_secs(1),
        "took {:?} to give up: {}",
        e.after,
        e.output
    );
    let line = e
        .output
        .lines()
        .find(|l| l.starts_with("berth: cannot start"))
        .unwrap_or_else(|| panic!("no 'berth: cannot start' line: {}", e.output));
    assert!(line.contains(says), "{line:?} does not say {says:?}");
    assert!(!e.output.contains("listening on"), "{}", e.output);
}

#[test]
fn second_berth_on_a_used_port_exits_at_once() {
    let berth = Berth::start("");
    let data = tempfile::tempdir().unwrap();
    let exited = common::serve_until_exit("", berth.port, data.path(), Duration::from_secs(5));
    assert_fails_fast(
        exited,
        &format!("cannot listen on 127.0.0.1:{}", berth.port),
    );
    // The first one is untouched.
    assert_eq!(
        client().get(berth.url("/v2/")).send().unwrap().status(),
        200
    );
}

#[test]
fn second_berth_on_a_data_directory_in_use_exits_at_once() {
    let berth = Berth::start("");
    let exited =
        common::serve_until_exit("", free_port(), &berth.data_path(), Duration::from_secs(5));
    assert_fails_fast(exited, "in use by another process");
    assert_eq!(
        client().get(berth.url("/v2/")).send().unwrap().status(),
        200
    );
}

#[test]
fn unwritable_data_directory_exits_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let mounted = root
        && std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "ro,size=1m", "tmpfs"])
            .arg(&data)
            .status()
            .is_ok_and(|s| s.success());
    if !mounted {
        if root {
            eprintln!("SKIPPED: cannot mount a read-only tmpfs (root cannot be denied writes)");
            return;
        }
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o555)).unwrap();
    }
    let exited = common::serve_until_exit("", free_port(), &data, Duration::from_secs(5));
    if mounted {
        let _ = std::process::Command::new("umount").arg(&data).status();
    }
    assert_fails_fast(exited, "data directory");
}

#[test]
fn sigterm_on_an_idle_server_exits_at_once() {
    let mut berth = Berth::start("shutdown_grace: 30s\n");
    let c = client();
    // A connection kept alive after its request is not a request in flight.
    assert_eq!(c.get(berth.url("/v2/")).send().unwrap().status(), 200);
    berth.signal(libc::SIGTERM);
    let status = berth.wait_exit(Duration::from_secs(1));
    assert!(status.success(), "{status}");
}

/// A request body that trickles in: `chunks` pieces of 64 KiB, `pause` apart.
struct Trickle {
    chunks: usize,
    pause: Duration,
    sent: usize,
}

impl std::io::Read for Trickle {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.sent == self.chunks {
            return Ok(0);
        }
        std::thread::sleep(self.pause);
        self.sent += 1;
        let n = buf.len().min(64 * 1024);
        buf[..n].fill(self.sent as u8);
        Ok(n)
    }
}

#[test]
fn sigterm_waits_for_the_requests_running() {
    let mut berth = Berth::start("shutdown_grace: 30s\n");
    let c = client();
    let url = start_upload(&c, &berth, "heal/drain");
    let patch = std::thread::spawn({
        let c = c.clone();
        move || {
            let body = Trickle {
                chunks: 15,
                pause: Duration::from_millis(100),
                sent: 0,
            };
            c.patch(&url)
                .body(reqwest::blocking::Body::new(body))
                .send()
                .map(|r| r.status().as_u16())
        }
    });
    std::thread::sleep(Duration::from_millis(500));
    let signalled = Instant::now();
    berth.signal(libc::SIGTERM);
    let status = berth.wait_exit(Duration::from_secs(20));
    assert!(status.success(), "{status}");
    assert_eq!(
        patch.join().unwrap().unwrap(),
        202,
        "the running PATCH was cut"
    );
    assert!(
        signalled.elapsed() < Duration::from_secs(10),
        "waited {:?}, far past the PATCH's end",
        signalled.elapsed()
    );
}

// ---------------------------------------------------------------------------------------------
// a full disk

fn manifest_json(config: &str, layer: &str, note_len: usize) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config, "size": 2},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer, "size": 4096}],
        "annotations": {"note": "n".repeat(note_len)},
    }))
    .unwrap()
}

fn put_manifest(c: &Client, berth: &Berth, tag: &str, body: &[u8]) -> Response {
    c.put(berth.url(&format!("/v2/heal/full/manifests/{tag}")))
        .header("Content-Type", "application/vnd.oci.image.manifest.v1+json")
        .body(body.to_vec())
        .send()
        .unwrap()
}

fn readyz(c: &Client, port: u16) -> (u16, String) {
    let r = c
        .get(format!("http://127.0.0.1:{port}/readyz"))
        .send()
        .unwrap();
    (r.status().as_u16(), r.text().unwrap())
}

/// The data directory on a small tmpfs that fills up: pushes fail cleanly (503 with
/// Retry-After), pulls go on, /readyz says the metadata store cannot write, and once space is
/// freed pushes succeed again without a restart.
#[test]
fn full_disk_fails_writes_cleanly_and_heals_without_restart() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED: mounting a small tmpfs needs root");
        return;
    }
    let mut berth = Berth::start("");
    berth.kill();
    let data = berth.data_path();
    std::fs::remove_dir_all(&data).unwrap();
    std::fs::create_dir(&data).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=48m", "tmpfs"])
        .arg(&data)
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        eprintln!("SKIPPED: cannot mount a tmpfs here");
        return;
    }
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }
    let _unmount = Unmount(data.clone());
    let metrics_port = free_port();
    berth.rewrite_config(&format!("metrics:\n  listen: 127.0.0.1:{metrics_port}\n"));
    berth.restart();
    let c = client();
    let config = berth.push_blob(&c, "heal/full", b"{}");
    let layer_bytes = random_bytes(7, 4096);
    let layer = berth.push_blob(&c, "heal/full", &layer_bytes);
    let first = manifest_json(&config, &layer, 10);
    assert_eq!(put_manifest(&c, &berth, "first", &first).status(), 201);

    // Fill the disk.
    let filler = data.join("filler");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).unwrap();
        let chunk = vec![0u8; 1 << 20];
        while f.write_all(&chunk).and_then(|_| f.flush()).is_ok() {}
    }

    let big = manifest_json(&config, &layer, 2 << 20);
    let r = put_manifest(&c, &berth, "big", &big);
    assert_eq!(
        r.status(),
        503,
        "manifest push on a full disk: {}",
        berth.log()
    );
    assert!(r.headers().contains_key("retry-after"));
    assert_eq!(error_code(&r.text().unwrap()), "UNAVAILABLE");
    let r = c
        .post(berth.url(&format!(
            "/v2/heal/full/blobs/uploads/?digest={}",
            common::sha256_digest(&random_bytes(8, 2 * MIB))
        )))
        .body(random_bytes(8, 2 * MIB))
        .send();
    // Refused, possibly before the whole body was sent (the connection then closes).
    if let Ok(r) = r {
        let status = r.status();
        assert!(
            status.is_server_error(),
            "blob push on a full disk: {status}: {}",
            r.text().unwrap_or_default()
        );
    }

    // Pulls go on.
    let r = c
        .get(berth.url("/v2/heal/full/manifests/first"))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200, "{}", berth.log());
    assert_eq!(r.bytes().unwrap()[..], first[..]);
    let got = c
        .get(berth.url(&format!("/v2/heal/full/blobs/{layer}")))
        .send()
        .unwrap()
        .bytes()
        .unwrap();
    assert!(got[..] == layer_bytes[..]);
    wait_until(
        "/readyz to report the store",
        Duration::from_secs(15),
        || {
            let (status, body) = readyz(&c, metrics_port);
            status == 503 && body.contains("metadata store cannot write")
        },
    );

    std::fs::remove_file(&filler).unwrap();
    wait_until("a push to succeed again", Duration::from_secs(15), || {
        put_manifest(&c, &berth, "big", &big).status() == 201
    });
    let r = c
        .get(berth.url("/v2/heal/full/manifests/big"))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().unwrap()[..], big[..]);
    wait_until("/readyz to be ready again", Duration::from_secs(15), || {
        readyz(&c, metrics_port).0 == 200
    });
}

/// A pushed image: its tag and manifest.
type Pushed = (String, Vec<u8>);

/// One image pushed as docker and podman do (chunked blob uploads, then the manifest) to
/// `base`; what berth acknowledged, None when any step failed (berth was killed under it).
fn try_push(c: &Client, base: &str, repo: &str, tag: &str, seed: u64) -> Option<Pushed> {
    let push_blob = |bytes: &[u8]| -> Option<String> {
        let digest = common::sha256_digest(bytes);
        let r = c
            .post(format!("{base}/v2/{repo}/blobs/uploads/"))
            .send()
            .ok()?;
        if r.status() != 202 {
            return None;
        }
        let mut url = format!("{base}{}", r.headers().get("location")?.to_str().ok()?);
        // Two PATCHes: the kill may land between them, inside one, or in the completion.
        let half = bytes.len() / 2;
        for (start, chunk) in [(0, &bytes[..half]), (half, &bytes[half..])] {
            let r = c
                .patch(&url)
                .header("Content-Type", "application/octet-stream")
                .header(
                    "Content-Range",
                    format!("{start}-{}", start + chunk.len() - 1),
                )
                .body(chunk.to_vec())
                .send()
                .ok()?;
            if r.status() != 202 {
                return None;
            }
            url = format!("{base}{}", r.headers().get("location")?.to_str().ok()?);
        }
        let sep = if url.contains('?') { '&' } else { '?' };
        let r = c.put(format!("{url}{sep}digest={digest}")).send().ok()?;
        (r.status() == 201).then_some(digest)
    };
    let config = format!("{{\"seed\":{seed}}}").into_bytes();
    let layer = random_bytes(seed, 6 * MIB + seed % 4096);
    let config_digest = push_blob(&config)?;
    let layer_digest = push_blob(&layer)?;
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": config_digest, "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": layer_digest, "size": layer.len()}],
    }))
    .unwrap();
    let r = c
        .put(format!("{base}/v2/{repo}/manifests/{tag}"))
        .header("Content-Type", "application/vnd.oci.image.manifest.v1+json")
        .body(manifest.clone())
        .send()
        .ok()?;
    (r.status() == 201).then_some((tag.to_string(), manifest))
}

/// `kill -9` every 1–2.5 s during four clients' chunked pushes (5 MiB parts: each layer is a
/// multipart upload), eight times: every image berth acknowledged pulls byte-identical, and
/// once the sessions the kills abandoned expire, no staged multipart bytes stay on disk.
#[test]
fn repeated_kill_9_during_chunked_pushes_loses_nothing_and_strands_nothing() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};

    let mut berth = Berth::start("upload:\n  part_size: 5MiB\n  session_expiry: 2s\n");
    let base = berth.url("");
    let stop = Arc::new(AtomicBool::new(false));
    let acknowledged: Arc<Mutex<Vec<Pushed>>> = Arc::default();
    let pushers: Vec<_> = (0..4u64)
        .map(|t| {
            let (base, stop, acknowledged) = (base.clone(), stop.clone(), acknowledged.clone());
            std::thread::spawn(move || {
                let c = reqwest::blocking::Client::builder()
                    .timeout(Duration::from_secs(30))
                    .build()
                    .unwrap();
                let mut i = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    i += 1;
                    let tag = format!("t{t}-{i}");
                    match try_push(&c, &base, "heal/kill", &tag, t * 10_000 + i) {
                        Some(done) => acknowledged.lock().unwrap().push(done),
                        None => std::thread::sleep(Duration::from_millis(50)),
                    }
                }
            })
        })
        .collect();
    for k in 0..8u64 {
        std::thread::sleep(Duration::from_millis(1000 + (k * 7919) % 1500));
        berth.kill();
        berth.start_again();
    }
    // A last round with berth up: pushes complete again after the kills.
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::SeqCst);
    for p in pushers {
        p.join().unwrap();
    }
    let acknowledged = acknowledged.lock().unwrap().clone();
    assert!(
        acknowledged.len() >= 4,
        "only {} pushes succeeded",
        acknowledged.len()
    );
    let c = client();
    for (tag, manifest) in &acknowledged {
        let r = c
            .get(berth.url(&format!("/v2/heal/kill/manifests/{tag}")))
            .header("Accept", "application/vnd.oci.image.manifest.v1+json")
            .send()
            .unwrap();
        assert_eq!(r.status(), 200, "{tag}");
        assert!(
            r.bytes().unwrap()[..] == manifest[..],
            "{tag}: other manifest"
        );
        let m: serde_json::Value = serde_json::from_slice(manifest).unwrap();
        for d in [&m["config"]["digest"], &m["layers"][0]["digest"]] {
            let d = d.as_str().unwrap();
            let r = c
                .get(berth.url(&format!("/v2/heal/kill/blobs/{d}")))
                .send()
                .unwrap();
            assert_eq!(r.status(), 200, "{tag} blob {d}");
            assert_eq!(common::sha256_digest(&r.bytes().unwrap()), d, "{tag}");
        }
    }
    wait_until(
        "the abandoned sessions' multipart files to be reclaimed",
        Duration::from_secs(30),
        || multipart_files(&berth).is_empty(),
    );
}
