//! Garbage collection end to end: a real berth process against a real S3 server (s3s-fs in
//! this process), objects counted in the bucket. Passes run through `berth gc` (which asks the
//! running server on its ops listener, or opens the stores itself when berth is stopped) or
//! `gc.interval`.

mod common;

use std::collections::BTreeSet;
use std::io::Read;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{client, free_port, sha256_digest, Berth, PseudoRandom, S3Server};
use serde_json::{json, Value};

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";

fn bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    PseudoRandom::new(seed, len as u64)
        .read_exact(&mut v)
        .unwrap();
    v
}

/// An image: config and layers, with its manifest.
#[derive(Clone)]
struct Image {
    config: Vec<u8>,
    layers: Vec<Vec<u8>>,
    manifest: Vec<u8>,
}

impl Image {
    fn new(config_seed: u64, layers: Vec<Vec<u8>>) -> Image {
        let config = format!("{{\"os\":\"linux\",\"seed\":{config_seed}}}").into_bytes();
        let ls: Vec<Value> = layers
            .iter()
            .map(|l| json!({"mediaType": OCI_LAYER, "digest": sha256_digest(l), "size": l.len()}))
            .collect();
        let manifest = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": sha256_digest(&config), "size": config.len()},
            "layers": ls,
        }))
        .unwrap();
        Image {
            config,
            layers,
            manifest,
        }
    }

    fn digest(&self) -> String {
        sha256_digest(&self.manifest)
    }

    fn blobs(&self) -> impl Iterator<Item = &Vec<u8>> {
        std::iter::once(&self.config).chain(self.layers.iter())
    }
}

/// Pushes the image's blobs and its manifest under `tag`; the manifest PUT's status and body.
fn push(
    b: &Berth,
    c: &reqwest::blocking::Client,
    repo: &str,
    tag: &str,
    img: &Image,
) -> (u16, String) {
    for blob in img.blobs() {
        b.push_blob(c, repo, blob);
    }
    let r = c
        .put(b.url(&format!("/v2/{repo}/manifests/{tag}")))
        .header("Content-Type", OCI_MANIFEST)
        .body(img.manifest.clone())
        .send()
        .unwrap();
    (r.status().as_u16(), r.text().unwrap())
}

#[track_caller]
fn push_ok(b: &Berth, c: &reqwest::blocking::Client, repo: &str, tag: &str, img: &Image) {
    let (status, body) = push(b, c, repo, tag, img);
    assert_eq!(status, 201, "push {repo}:{tag}: {body}");
}

/// Pulls `repo:reference` and checks the manifest and every blob byte for byte.
#[track_caller]
fn assert_pulls(
    b: &Berth,
    c: &reqwest::blocking::Client,
    repo: &str,
    reference: &str,
    img: &Image,
) {
    let r = c
        .get(b.url(&format!("/v2/{repo}/manifests/{reference}")))
        .header("Accept", OCI_MANIFEST)
        .send()
        .unwrap();
    assert_eq!(r.status(), 200, "GET manifest {repo}:{reference}");
    assert_eq!(
        r.bytes().unwrap(),
        img.manifest,
        "manifest {repo}:{reference}"
    );
    for blob in img.blobs() {
        let d = sha256_digest(blob);
        let r = c
            .get(b.url(&format!("/v2/{repo}/blobs/{d}")))
            .send()
            .unwrap();
        assert_eq!(r.status(), 200, "GET blob {repo}@{d}:\n{}", b.log());
        assert!(r.bytes().unwrap() == *blob, "blob {repo}@{d} differs");
    }
}

fn delete_manifest(b: &Berth, c: &reqwest::blocking::Client, repo: &str, digest: &str) {
    let r = c
        .delete(b.url(&format!("/v2/{repo}/manifests/{digest}")))
        .send()
        .unwrap();
    assert_eq!(r.status(), 202, "DELETE {repo}@{digest}");
}

fn status(c: &reqwest::blocking::Client, url: &str) -> u16 {
    c.head(url).send().unwrap().status().as_u16()
}

fn catalog(b: &Berth, c: &reqwest::blocking::Client) -> Vec<String> {
    let v: Value = serde_json::from_slice(
        &c.get(b.url("/v2/_catalog"))
            .send()
            .unwrap()
            .bytes()
            .unwrap(),
    )
    .unwrap();
    v["repositories"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap().to_owned())
        .collect()
}

fn tags(b: &Berth, c: &reqwest::blocking::Client, repo: &str) -> Vec<String> {
    let v: Value = serde_json::from_slice(
        &c.get(b.url(&format!("/v2/{repo}/tags/list")))
            .send()
            .unwrap()
            .bytes()
            .unwrap(),
    )
    .unwrap();
    let mut t: Vec<String> = v["tags"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap().to_owned())
        .collect();
    t.sort();
    t
}

/// Runs `berth gc <args> --json` and returns its report.
#[track_caller]
fn gc(b: &Berth, args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.push("--json");
    let out = b.gc(&all);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "berth gc {args:?}: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("berth gc report ({e}): {stdout}"))
}

fn count(report: &Value, kind: &str) -> u64 {
    match &report[kind] {
        Value::Object(t) => t["count"].as_u64().unwrap(),
        v => v.as_u64().unwrap_or_else(|| panic!("{kind} in {report}")),
    }
}

/// Config with an ops listener (so `berth gc` can ask the server) and short graces.
fn gc_yaml(ops: u16, extra: &str) -> String {
    format!(
        "metrics:\n  listen: 127.0.0.1:{ops}\ngc:\n  blob_grace: 1s\n  untagged_grace: 1s\n{extra}"
    )
}

/// Grace periods are in whole seconds: wait until a 1 s grace has surely passed.
fn outlast_grace() {
    std::thread::sleep(Duration::from_millis(2100));
}

#[test]
fn deleted_image_frees_unique_blobs_keeps_shared_and_leaves_catalog() {
    let s3 = S3Server::start();
    let b = Berth::start_with(&gc_yaml(free_port(), ""), Some(&s3));
    let c = client();
    let shared = bytes(1, 3000);
    let a = Image::new(1, vec![shared.clone(), bytes(2, 2000)]);
    let other = Image::new(2, vec![shared.clone(), bytes(3, 1000)]);
    push_ok(&b, &c, "app/a", "v1", &a);
    push_ok(&b, &c, "app/b", "v1", &other);
    // shared, a's layer and config, b's layer and config.
    assert_eq!(s3.blob_files().len(), 5);

    // Nothing is garbage yet: a pass deletes nothing.
    outlast_grace();
    let r = gc(&b, &[]);
    assert_eq!(count(&r, "blobs"), 0, "{r}");
    assert_eq!(s3.blob_files().len(), 5);

    delete_manifest(&b, &c, "app/a", &a.digest());
    // Within the grace a pass leaves the freed blobs alone.
    let r = gc(&b, &[]);
    assert_eq!(count(&r, "blobs"), 0, "{r}");
    assert_eq!(s3.blob_files().len(), 5);

    outlast_grace();
    let r = gc(&b, &[]);
    assert_eq!(count(&r, "blobs"), 2, "{r}");
    assert_eq!(
        r["blobs"]["bytes"].as_u64().unwrap(),
        (2000 + a.config.len()) as u64
    );
    assert_eq!(count(&r, "repositories"), 1, "{r}");
    assert_eq!(s3.blob_files().len(), 3, "unique layer and config gone");
    assert_pulls(&b, &c, "app/b", "v1", &other);
    for blob in a.blobs() {
        let url = b.url(&format!("/v2/app/a/blobs/{}", sha256_digest(blob)));
        assert_eq!(status(&c, &url), 404);
    }
    // Emptied: out of the catalog, and unknown.
    assert_eq!(catalog(&b, &c), vec!["app/b"]);
    let r = c.get(b.url("/v2/app/a/tags/list")).send().unwrap();
    assert_eq!(r.status(), 404);
    // One log line per deleted object.
    let log = b.log();
    for blob in [&a.config, &a.layers[1]] {
        let d = sha256_digest(blob);
        assert_eq!(
            log.lines()
                .filter(|l| l.contains("gc: deleted blob") && l.contains(&d))
                .count(),
            1,
            "{log}"
        );
    }
    // The repository can be pushed to again, the shared layer re-uploaded from scratch.
    push_ok(&b, &c, "app/a", "v2", &a);
    assert_pulls(&b, &c, "app/a", "v2", &a);
    assert_eq!(s3.blob_files().len(), 5);
}

#[test]
fn dry_run_deletes_nothing_then_stopped_berth_collects_offline() {
    let s3 = S3Server::start();
    let mut b = Berth::start_with(
        &gc_yaml(free_port(), "  untagged_manifests: delete\n"),
        Some(&s3),
    );
    let c = client();
    let img = Image::new(7, vec![bytes(70, 1500), bytes(71, 2500)]);
    let kept = Image::new(8, vec![bytes(80, 500)]);
    push_ok(&b, &c, "dry/run", "v1", &img);
    push_ok(&b, &c, "dry/run", "kept", &kept);
    // Untag v1: its manifest becomes collectable (untagged_manifests: delete).
    let r = c.delete(b.url("/v2/dry/run/manifests/v1")).send().unwrap();
    assert_eq!(r.status(), 202);
    outlast_grace();

    let before = s3.blob_files().len();
    let r = gc(&b, &["--dry-run", "--full", "--orphans"]);
    assert_eq!(r["dry_run"], true);
    assert_eq!(count(&r, "manifests"), 1, "{r}");
    assert_eq!(count(&r, "blobs"), 0, "{r}");
    assert_eq!(s3.blob_files().len(), before);
    let url = b.url(&format!("/v2/dry/run/manifests/{}", img.digest()));
    assert_eq!(status(&c, &url), 200, "a dry run deleted the manifest");

    // Now for real: the manifest goes; its blobs were freed by that delete, so they wait a
    // grace of their own.
    let r = gc(&b, &[]);
    assert_eq!(count(&r, "manifests"), 1, "{r}");
    assert_eq!(count(&r, "blobs"), 0, "{r}");
    assert_eq!(status(&c, &url), 404);
    outlast_grace();
    let r = gc(&b, &["--dry-run"]);
    assert_eq!(count(&r, "blobs"), 3, "{r}");
    assert_eq!(s3.blob_files().len(), before);

    // berth stopped: the command opens the redb file itself.
    b.kill();
    let r = gc(&b, &[]);
    assert_eq!(count(&r, "blobs"), 3, "{r}");
    assert_eq!(s3.blob_files().len(), before - 3);
    b.start_again();
    assert_pulls(&b, &c, "dry/run", "kept", &kept);
    assert_eq!(catalog(&b, &c), vec!["dry/run"]);
}

#[test]
fn collector_during_concurrent_pushes_and_deletes_loses_nothing() {
    let s3 = S3Server::start();
    // The grace must outlast a push (blobs first, manifest last) on a busy machine.
    let yaml = format!(
        "metrics:\n  listen: 127.0.0.1:{}\ngc:\n  interval: 100ms\n  blob_grace: 4s\n  untagged_manifests: delete\n  untagged_grace: 1s\n",
        free_port()
    );
    let b = Arc::new(Berth::start_with(&yaml, Some(&s3)));
    let shared: Arc<Vec<Vec<u8>>> =
        Arc::new((0..4).map(|i| bytes(1000 + i, 4096 + i as usize)).collect());
    let outcome: Arc<Mutex<Vec<Pushed>>> = Arc::default();
    let mut threads = Vec::new();
    for t in 0..10u64 {
        let (b, shared, outcome) = (b.clone(), shared.clone(), outcome.clone());
        threads.push(std::thread::spawn(move || {
            let c = client();
            for i in 0..5u64 {
                let n = t * 5 + i;
                let repo = format!("stress/r{}", n % 5);
                let tag = format!("t{n}");
                let layers = vec![
                    shared[(n % 4) as usize].clone(),
                    shared[((n + 1) % 4) as usize].clone(),
                    bytes(5000 + n, 2048 + n as usize),
                ];
                let img = Image::new(100 + n, layers);
                let (status, body) = push(&b, &c, &repo, &tag, &img);
                if status != 201 {
                    // Allowed only as the documented loss of a race with collection.
                    assert_eq!(
                        common::error_code(&body),
                        "MANIFEST_BLOB_UNKNOWN",
                        "push {repo}:{tag}: {status} {body}"
                    );
                    continue;
                }
                let deleted = n % 3 == 0;
                if deleted {
                    delete_manifest(&b, &c, &repo, &img.digest());
                }
                outcome.lock().unwrap().push((repo, tag, img, deleted));
            }
        }));
    }
    for t in threads {
        t.join().unwrap();
    }
    let outcome = outcome.lock().unwrap().clone();
    assert!(
        outcome.len() >= 45,
        "only {} of 50 pushes acknowledged",
        outcome.len()
    );
    let c = client();
    let check_live = |when: &str| {
        for (repo, tag, img, deleted) in &outcome {
            if !deleted {
                assert_pulls(&b, &c, repo, tag, img);
            }
            // Never a record pointing at a missing object: whatever answers HEAD serves bytes.
            for blob in img.blobs() {
                let url = b.url(&format!("/v2/{repo}/blobs/{}", sha256_digest(blob)));
                if status(&c, &url) == 200 {
                    let got = c.get(&url).send().unwrap();
                    assert_eq!(got.status(), 200, "{when}: {url}");
                    assert!(got.bytes().unwrap() == *blob, "{when}: {url} differs");
                }
            }
        }
    };
    check_live("right after the pushes");
    // After the grace and a few passes: exactly the blobs of live images are in the bucket.
    std::thread::sleep(Duration::from_secs(6));
    check_live("after collection");
    let live: BTreeSet<String> = outcome
        .iter()
        .filter(|o| !o.3)
        .flat_map(|o| o.2.blobs().map(|b| sha256_digest(b)).collect::<Vec<_>>())
        .collect();
    let files = s3.blob_files().len();
    assert_eq!(
        files,
        live.len(),
        "bucket holds {files} objects, {} live blobs",
        live.len()
    );
    let m = c
        .get(format!("http://{}/metrics", ops_addr(&yaml)))
        .send()
        .unwrap()
        .text()
        .unwrap();
    let runs = metric(&m, "berth_gc_runs_total");
    assert!(runs >= 10.0, "gc runs {runs}");
    assert!(
        metric(&m, "berth_gc_deleted_total{kind=\"blob\"}") >= 1.0,
        "{m}"
    );
    assert!(metric(&m, "berth_gc_freed_bytes_total") >= 2048.0);
    assert!(m.contains("berth_gc_queue_length"));
    assert!(m.contains("berth_gc_pass_duration_seconds_count"));
}

/// An acknowledged push: (repo, tag, image, deleted afterwards).
type Pushed = (String, String, Image, bool);

fn ops_addr(yaml: &str) -> String {
    yaml.lines()
        .find_map(|l| l.trim().strip_prefix("listen: "))
        .unwrap()
        .to_owned()
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
        .unwrap_or_else(|| panic!("{name} not in metrics"))
}

#[test]
fn retention_keep_last_older_than_and_keep_pattern() {
    let s3 = S3Server::start();
    let rules = "  retention:\n\
                 \x20   - repositories: \"ret/last\"\n\
                 \x20     tags: \"v.*\"\n\
                 \x20     keep_last: 2\n\
                 \x20     keep: \"v1\"\n\
                 \x20   - repositories: \"ret/old*\"\n\
                 \x20     older_than: 2s\n\
                 \x20     keep: \"keep-.*\"\n";
    let b = Berth::start_with(&gc_yaml(free_port(), rules), Some(&s3));
    let c = client();
    let img = Image::new(9, vec![bytes(90, 100)]);
    // Tag times are whole seconds: one push per second orders them.
    for tag in ["v1", "v2", "v3", "v4"] {
        push_ok(&b, &c, "ret/last", tag, &img);
        std::thread::sleep(Duration::from_millis(1100));
    }
    push_ok(&b, &c, "ret/last", "latest", &img);
    push_ok(&b, &c, "ret/old", "old", &img);
    push_ok(&b, &c, "ret/old", "keep-old", &img);
    push_ok(&b, &c, "other", "ancient", &img);
    std::thread::sleep(Duration::from_millis(3100));
    push_ok(&b, &c, "ret/old", "new", &img);

    let r = gc(&b, &["--dry-run"]);
    assert_eq!(count(&r, "tags"), 2, "{r}");
    assert_eq!(tags(&b, &c, "ret/last"), ["latest", "v1", "v2", "v3", "v4"]);
    assert!(b.log().contains("would delete tag ret/last:v2"));
    assert!(b.log().contains("would delete tag ret/old:old"));

    let r = gc(&b, &[]);
    assert_eq!(count(&r, "tags"), 2, "{r}");
    // v1 kept by the keep pattern, latest not judged, v3 and v4 the 2 most recent.
    assert_eq!(tags(&b, &c, "ret/last"), ["latest", "v1", "v3", "v4"]);
    // old went; keep-old is as old but kept; new is too young.
    assert_eq!(tags(&b, &c, "ret/old"), ["keep-old", "new"]);
    // No rule for this repository.
    assert_eq!(tags(&b, &c, "other"), ["ancient"]);
    assert_pulls(&b, &c, "ret/last", "v1", &img);
}

#[test]
fn orphans_after_kill_mid_upload_and_session_expiry() {
    let s3 = S3Server::start();
    let yaml = gc_yaml(
        free_port(),
        "upload:\n  part_size: 5MiB\n  session_expiry: 1s\n",
    );
    let mut b = Berth::start_with(&yaml, Some(&s3));
    let c = client();
    let img = Image::new(11, vec![bytes(110, 1000)]);
    push_ok(&b, &c, "orph/app", "v1", &img);
    let baseline: BTreeSet<_> = s3.blob_files().into_iter().collect();

    // An upload that crosses a part boundary (a multipart upload with one part stored), then
    // berth is killed with SIGKILL in the middle of it.
    let r = c.post(b.url("/v2/orph/app/blobs/uploads/")).send().unwrap();
    assert_eq!(r.status(), 202);
    let location = r.headers()["location"].to_str().unwrap().to_owned();
    let chunk = bytes(111, 6 << 20);
    let r = c
        .patch(b.url(&location))
        .header("Content-Type", "application/octet-stream")
        .body(chunk)
        .send()
        .unwrap();
    assert_eq!(r.status(), 202);
    b.kill();

    // What a crash between storing a blob's bytes and linking them leaves: an object under
    // the blob prefix with no record and no session.
    let orphan = write_object(
        &s3,
        "berth/blobs/11111111-2222-3333-4444-555555555555",
        b"lost",
    );
    b.start_again();
    // Session expiry (1 s) aborts the killed upload's multipart upload.
    std::thread::sleep(Duration::from_millis(2500));
    let r = gc(&b, &["--orphans"]);
    assert_eq!(count(&r, "objects"), 1, "{r}");
    assert_eq!(r["objects"]["bytes"], 4);
    assert!(!orphan.exists(), "orphan object still there");
    // s3s-fs cannot list multipart uploads: said, not failed.
    let notes = r["notes"].to_string();
    assert!(notes.contains("multipart"), "{r}");
    let now: BTreeSet<_> = s3.blob_files().into_iter().collect();
    assert_eq!(
        now, baseline,
        "the bucket holds exactly the image's objects again"
    );
    assert_pulls(&b, &c, "orph/app", "v1", &img);
    assert!(b.log().contains("gc: deleted object berth/blobs/11111111"));
}

/// Puts an object into the test S3 server through berth's own S3 client.
fn write_object(s3: &S3Server, key: &str, body: &'static [u8]) -> std::path::PathBuf {
    let yaml = s3.storage_yaml();
    let config = berth::config::Config::from_yaml(&yaml, &Default::default(), &|_| None).unwrap();
    let store = berth::storage::ObjectStore::new(&config.storage).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(store.put_object(
        key,
        berth::storage::ObjectBody::Bytes(bytes::Bytes::from_static(body)),
    ))
    .unwrap();
    let before = s3.blob_files();
    let path = before
        .into_iter()
        .find(|p| p.to_string_lossy().ends_with(key))
        .expect("object file");
    // Old enough to be an orphan (grace 1 s).
    std::thread::sleep(Duration::from_millis(1100));
    path
}

/// The local object store (berth's embedded default) lists its multipart uploads: `--orphans`
/// aborts one no session owns (what a crash before the session was saved leaves) and keeps
/// the one a session still owns.
#[test]
fn orphan_multipart_uploads_of_the_local_store_are_aborted() {
    if common::test_storage_is_s3() {
        eprintln!("SKIPPED: BERTH_TEST_STORAGE=s3 (a test of the local store)");
        return;
    }
    let yaml = gc_yaml(free_port(), "upload:\n  part_size: 5MiB\n");
    let b = Berth::start(&yaml);
    let c = client();
    let img = Image::new(12, vec![bytes(120, 1000)]);
    push_ok(&b, &c, "orph/local", "v1", &img);
    // A session with a multipart upload in progress (one part stored).
    let r = c
        .post(b.url("/v2/orph/local/blobs/uploads/"))
        .send()
        .unwrap();
    assert_eq!(r.status(), 202);
    let location = r.headers()["location"].to_str().unwrap().to_owned();
    let r = c
        .patch(b.url(&location))
        .header("Content-Type", "application/octet-stream")
        .body(bytes(121, 6 << 20))
        .send()
        .unwrap();
    assert_eq!(r.status(), 202);
    // An upload no session names, made through the local store itself.
    let config = berth::config::Config::from_yaml(
        &std::fs::read_to_string(b.config_path()).unwrap(),
        &Default::default(),
        &|_| None,
    )
    .unwrap();
    let objects = b.data_path().join("objects");
    let store = berth::storage::ObjectStore::local(&objects, &config.storage).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let orphan = rt
        .block_on(store.create_multipart("blobs/00000000-1111-2222-3333-444444444444"))
        .unwrap();
    rt.block_on(store.upload_part(
        "blobs/00000000-1111-2222-3333-444444444444",
        &orphan,
        1,
        berth::storage::ObjectBody::Bytes(bytes::Bytes::from_static(b"stranded")),
    ))
    .unwrap();
    let uploads = || -> BTreeSet<String> {
        std::fs::read_dir(objects.join(".uploads"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect()
    };
    assert_eq!(uploads().len(), 2);
    outlast_grace();

    let r = gc(&b, &["--orphans"]);
    assert_eq!(count(&r, "multipart_uploads"), 1, "{r}");
    assert!(!r["notes"].to_string().contains("multipart"), "{r}");
    let left = uploads();
    assert_eq!(left.len(), 1, "{left:?}");
    assert!(!left.contains(&orphan), "the orphan upload is still there");
    // The session's upload goes on.
    let r = c
        .put(format!(
            "{}{}digest={}",
            b.url(&location),
            if location.contains('?') { '&' } else { '?' },
            sha256_digest(&bytes(121, 6 << 20))
        ))
        .header("Content-Length", "0")
        .send()
        .unwrap();
    assert_eq!(r.status(), 201, "{}", b.log());
    assert_pulls(&b, &c, "orph/local", "v1", &img);
}
