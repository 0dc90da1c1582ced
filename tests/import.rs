//! `berth import` against a real CNCF distribution 2.8.2 (Debian `docker-registry`): skopeo
//! (and plain HTTP, for an artifact with a subject) pushes into distribution, berth adopts its
//! storage in place, and every image pulls back from berth byte-identical. A re-run adds
//! nothing; a push to distribution followed by a re-run adds exactly that tag.
//!
//! Two layouts: distribution's filesystem root, adopted into berth's embedded object store by
//! hard links; and a bucket distribution writes through its own S3 driver (`storage.s3`, on the
//! s3s-fs server of tests/common, [`S3Server::start_for_distribution`]), adopted with no blob
//! written, copied or read.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;

const MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const INDEX: &str = "application/vnd.oci.image.index.v1+json";
const CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const LAYER: &str = "application/vnd.oci.image.layer.v1.tar";

#[track_caller]
fn run(cmd: &mut Command) -> Output {
    let shown = format!("{cmd:?}");
    let out = cmd.output().unwrap_or_else(|e| panic!("{shown}: {e}"));
    assert!(
        out.status.success(),
        "{shown} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// skopeo with an empty blob-info cache of its own (see FIELD-NOTES: a shared cache turns
/// pushes into cross-repository mounts of what other tests uploaded) and no policy file.
fn skopeo(args: &[&str]) -> Output {
    run(Command::new("unshare").args([
        "-m",
        "sh",
        "-c",
        "mkdir -p /var/lib/containers/cache && mount -t tmpfs tmpfs /var/lib/containers/cache && exec skopeo --insecure-policy \"$@\"",
        "skopeo",
    ])
    .args(args))
}

// ---------------------------------------------------------------------------------------------
// images, as an OCI layout skopeo copies from

struct Layout {
    dir: PathBuf,
    index: Vec<serde_json::Value>,
}

impl Layout {
    fn new(dir: &Path) -> Layout {
        std::fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
        std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
        Layout {
            dir: dir.to_path_buf(),
            index: Vec::new(),
        }
    }

    fn blob(&self, bytes: &[u8]) -> serde_json::Value {
        let digest = sha256_digest(bytes);
        std::fs::write(self.path(&digest), bytes).unwrap();
        serde_json::json!({ "digest": digest, "size": bytes.len() })
    }

    fn path(&self, digest: &str) -> PathBuf {
        self.dir
            .join("blobs/sha256")
            .join(digest.trim_start_matches("sha256:"))
    }

    /// An image manifest of `layers` (pseudo-random bytes of the given sizes) for `arch`.
    fn image(&self, arch: &str, seed: u64, layers: &[usize]) -> (serde_json::Value, Vec<u8>) {
        let mut descriptors = Vec::new();
        for (i, &len) in layers.iter().enumerate() {
            let mut bytes = vec![0u8; len];
            std::io::Read::read_exact(
                &mut PseudoRandom::new(seed * 100 + i as u64, len as u64),
                &mut bytes,
            )
            .unwrap();
            let mut d = self.blob(&bytes);
            d["mediaType"] = LAYER.into();
            descriptors.push(d);
        }
        let diff_ids: Vec<_> = descriptors.iter().map(|d| d["digest"].clone()).collect();
        let config = serde_json::to_vec(&serde_json::json!({
            "architecture": arch, "os": "linux",
            "rootfs": { "type": "layers", "diff_ids": diff_ids },
        }))
        .unwrap();
        let mut c = self.blob(&config);
        c["mediaType"] = CONFIG.into();
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2, "mediaType": MANIFEST, "config": c, "layers": descriptors,
        }))
        .unwrap();
        let mut d = self.blob(&manifest);
        d["mediaType"] = MANIFEST.into();
        (d, manifest)
    }

    /// Names `descriptor` `tag` in index.json.
    fn tag(&mut self, tag: &str, mut descriptor: serde_json::Value) {
        descriptor["annotations"] = serde_json::json!({ "org.opencontainers.image.ref.name": tag });
        self.index.push(descriptor);
        std::fs::write(
            self.dir.join("index.json"),
            serde_json::to_vec(&serde_json::json!({
                "schemaVersion": 2, "mediaType": INDEX, "manifests": self.index,
            }))
            .unwrap(),
        )
        .unwrap();
    }
}

// ---------------------------------------------------------------------------------------------
// distribution

struct Distribution {
    child: Child,
    port: u16,
    /// The filesystem driver's root directory (with the S3 driver: unused). Its config is
    /// `<root>.yml`, its log (level debug) `<root>.log`, shown when a test fails.
    root: PathBuf,
}

impl Distribution {
    /// distribution with its filesystem driver, storing below `root`.
    fn start(root: &Path) -> Distribution {
        let storage = format!("  filesystem:\n    rootdirectory: {}\n", root.display());
        Self::start_with(root, &storage)
    }

    /// distribution with its S3 driver, storing into `s3`'s bucket below `rootdirectory`.
    fn start_s3(root: &Path, s3: &S3Server, rootdirectory: &str) -> Distribution {
        let storage = format!(
            "  s3:\n    regionendpoint: {}\n    region: us-east-1\n    bucket: {S3_BUCKET}\n    accesskey: {S3_ACCESS_KEY}\n    secretkey: {S3_SECRET_KEY}\n    secure: false\n    v4auth: true\n    rootdirectory: /{rootdirectory}\n",
            s3.endpoint
        );
        Self::start_with(root, &storage)
    }

    fn start_with(root: &Path, storage: &str) -> Distribution {
        let port = free_port();
        let config = root.with_extension("yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: debug\nstorage:\n{storage}  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n",
            ),
        )
        .unwrap();
        let log = std::fs::File::create(root.with_extension("log")).unwrap();
        // With AWS_CA_BUNDLE set, distribution 2.8.2 panics at start.
        let mut child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .env_remove("AWS_CA_BUNDLE")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn docker-registry");
        let c = client();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if c.get(format!("http://127.0.0.1:{port}/v2/"))
                .send()
                .is_ok_and(|r| r.status() == 200)
            {
                return Distribution {
                    child,
                    port,
                    root: root.to_path_buf(),
                };
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("distribution did not answer on 127.0.0.1:{port}");
    }

    /// skopeo copy of `tag` from the layout (`--all`: an index with its manifests).
    fn push(&self, layout: &Layout, tag: &str, repo: &str) {
        skopeo(&[
            "copy",
            "--all",
            "--preserve-digests",
            "--dest-tls-verify=false",
            &format!("oci:{}:{tag}", layout.dir.display()),
            &format!("docker://127.0.0.1:{}/{repo}:{tag}", self.port),
        ]);
    }
}

impl Drop for Distribution {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(self.root.with_extension("log")).unwrap_or_default();
            let errors: Vec<&str> = log
                .lines()
                .filter(|l| l.contains("level=error") || l.contains("level=panic"))
                .filter(|l| !l.contains("http.response.status=404"))
                .collect();
            eprintln!("distribution's errors:\n{}", errors.join("\n"));
        }
    }
}

/// Pushes an artifact whose subject is `subject` over plain HTTP, tagged the way cosign tags
/// signatures (`sha256-<hex>.sig`). Returns (tag, manifest bytes).
fn push_signature(registry: &str, repo: &str, subject: &serde_json::Value) -> (String, Vec<u8>) {
    let c = client();
    let payload = br#"{"critical":{"identity":{"docker-reference":"example"}}}"#;
    let empty = b"{}";
    for blob in [&payload[..], &empty[..]] {
        let r = c
            .post(format!("http://{registry}/v2/{repo}/blobs/uploads/"))
            .send()
            .unwrap();
        assert_eq!(r.status(), 202, "start upload");
        let location = r.headers()["location"].to_str().unwrap().to_string();
        let sep = if location.contains('?') { '&' } else { '?' };
        let url = if location.starts_with("http") {
            location
        } else {
            format!("http://{registry}{location}")
        };
        let r = c
            .put(format!("{url}{sep}digest={}", sha256_digest(blob)))
            .header("Content-Type", "application/octet-stream")
            .body(blob.to_vec())
            .send()
            .unwrap();
        assert_eq!(r.status(), 201, "finish upload: {}", r.text().unwrap());
    }
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST,
        "artifactType": "application/vnd.example.signature.v1+json",
        "config": { "mediaType": "application/vnd.oci.empty.v1+json", "digest": sha256_digest(empty), "size": 2 },
        "layers": [{ "mediaType": "application/vnd.example.signature.v1+json", "digest": sha256_digest(payload), "size": payload.len() }],
        "subject": { "mediaType": subject["mediaType"], "digest": subject["digest"], "size": subject["size"] },
        "annotations": { "org.example.signed-by": "import-test" },
    }))
    .unwrap();
    let tag = format!(
        "sha256-{}.sig",
        subject["digest"]
            .as_str()
            .unwrap()
            .trim_start_matches("sha256:")
    );
    let r = c
        .put(format!("http://{registry}/v2/{repo}/manifests/{tag}"))
        .header("Content-Type", MANIFEST)
        .body(manifest.clone())
        .send()
        .unwrap();
    assert_eq!(r.status(), 201, "push signature: {}", r.text().unwrap());
    (tag, manifest)
}

// ---------------------------------------------------------------------------------------------
// berth import

/// The summary's numbers by line label (`tags`, `manifests`, `blobs`, `skipped`...): the
/// first number after the label, and the whole line.
fn summary(out: &Output) -> BTreeMap<String, (u64, String)> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let (label, rest) = l.split_once(": ")?;
            let n = rest.split_whitespace().next()?.parse().ok()?;
            Some((label.trim().to_string(), (n, rest.to_string())))
        })
        .collect()
}

/// Runs `berth import` on berth's config and data directory (berth itself stopped).
fn import(berth: &Berth, from: &[&str]) -> (Output, BTreeMap<String, (u64, String)>) {
    let out = run(Command::new(env!("CARGO_BIN_EXE_berth"))
        .arg("import")
        .arg("--config")
        .arg(berth.data_dir.path().join("berth.yaml"))
        .arg("--data-dir")
        .arg(berth.data_dir.path().join("data"))
        .args(from));
    eprintln!("berth import:\n{}", String::from_utf8_lossy(&out.stdout));
    let s = summary(&out);
    (out, s)
}

fn line<'a>(s: &'a BTreeMap<String, (u64, String)>, label: &str) -> &'a str {
    &s.get(label)
        .unwrap_or_else(|| panic!("no {label:?} in the summary: {s:?}"))
        .1
}

/// What distribution holds after the first pushes, and how to check berth serves it.
struct Pushed {
    layout: Layout,
    /// (repo, tag, top-level manifest bytes)
    images: Vec<(String, String, Vec<u8>)>,
    /// The single-arch image's descriptor (the signature's subject).
    subject: serde_json::Value,
    /// Bytes of every layer and config pushed.
    layer_bytes: u64,
}

fn push_everything(dist: &Distribution, tmp: &Path) -> Pushed {
    let mut layout = Layout::new(&tmp.join("layout"));
    let (single, single_bytes) = layout.image("amd64", 1, &[3 << 20, 700_000]);
    layout.tag("v1", single.clone());
    let (amd, _) = layout.image("amd64", 2, &[1 << 20]);
    let (arm, _) = layout.image("arm64", 3, &[1 << 20, 2000]);
    let mut platforms = Vec::new();
    for (d, arch) in [(&amd, "amd64"), (&arm, "arm64")] {
        let mut d = d.clone();
        d["platform"] = serde_json::json!({ "architecture": arch, "os": "linux" });
        platforms.push(d);
    }
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2, "mediaType": INDEX, "manifests": platforms,
    }))
    .unwrap();
    let mut index_descriptor = layout.blob(&index);
    index_descriptor["mediaType"] = INDEX.into();
    layout.tag("multi", index_descriptor);

    dist.push(&layout, "v1", "team/app");
    dist.push(&layout, "multi", "team/multi");
    // The same image in a second repository: its blobs are shared, adopted once.
    dist.push(&layout, "v1", "other/app");
    let registry = format!("127.0.0.1:{}", dist.port);
    let (sig_tag, sig) = push_signature(&registry, "team/app", &single);
    let layer_bytes = (3 << 20) + 700_000 + (1 << 20) + (1 << 20) + 2000;
    Pushed {
        layout,
        images: vec![
            ("team/app".into(), "v1".into(), single_bytes.clone()),
            ("team/multi".into(), "multi".into(), index),
            ("other/app".into(), "v1".into(), single_bytes),
            ("team/app".into(), sig_tag, sig),
        ],
        subject: single,
        layer_bytes,
    }
}

/// Every image pulls from berth byte-identical: the manifest served by tag is the bytes
/// pushed, and skopeo pulls every manifest and blob (`--all`) with the digests of the source.
fn assert_berth_serves(berth: &Berth, pushed: &Pushed, tmp: &Path) {
    let c = client();
    for (repo, tag, manifest) in &pushed.images {
        let r = c
            .get(berth.url(&format!("/v2/{repo}/manifests/{tag}")))
            .header("Accept", format!("{MANIFEST}, {INDEX}"))
            .send()
            .unwrap();
        assert_eq!(r.status(), 200, "{repo}:{tag}");
        assert!(
            r.bytes().unwrap()[..] == manifest[..],
            "{repo}:{tag}: manifest bytes differ"
        );
        if tag.ends_with(".sig") {
            continue;
        }
        let out = tmp.join(format!("pulled-{}-{tag}", repo.replace('/', "_")));
        skopeo(&[
            "copy",
            "--all",
            "--preserve-digests",
            "--src-tls-verify=false",
            "--dest-oci-accept-uncompressed-layers",
            &format!("docker://127.0.0.1:{}/{repo}:{tag}", berth.port),
            &format!("oci:{}:{tag}", out.display()),
        ]);
        let mut n = 0;
        for entry in std::fs::read_dir(out.join("blobs/sha256"))
            .unwrap()
            .flatten()
        {
            let digest = format!("sha256:{}", entry.file_name().to_string_lossy());
            let pulled = std::fs::read(entry.path()).unwrap();
            assert_eq!(sha256_digest(&pulled), digest);
            assert!(
                pulled == std::fs::read(pushed.layout.path(&digest)).unwrap(),
                "{repo}:{tag}: {digest} differs from what was pushed"
            );
            n += 1;
        }
        assert!(n >= 4, "{repo}:{tag}: only {n} blobs pulled");
    }
    // The signature is listed as a referrer of its subject.
    let subject = pushed.subject["digest"].as_str().unwrap();
    let r: serde_json::Value = serde_json::from_slice(
        &c.get(berth.url(&format!("/v2/team/app/referrers/{subject}")))
            .send()
            .unwrap()
            .bytes()
            .unwrap(),
    )
    .unwrap();
    let referrers = r["manifests"].as_array().unwrap();
    assert_eq!(referrers.len(), 1, "{r}");
    assert_eq!(
        referrers[0]["artifactType"],
        "application/vnd.example.signature.v1+json"
    );
}

/// The summary of a re-run after distribution took one more tag (`team/app:v2`, one layer).
#[track_caller]
fn assert_added_one_tag(s: &BTreeMap<String, (u64, String)>) {
    assert_eq!(line(s, "repositories"), "3 (0 new)");
    assert_eq!(line(s, "tags"), "1 added, 0 moved, 4 already present");
    assert_eq!(line(s, "manifests"), "1 added, 6 already present");
    assert!(
        line(s, "blobs").starts_with("2 links added, 2 new blobs"),
        "{s:?}"
    );
}

/// berth serves that tag byte-exact, beside the two it had.
#[track_caller]
fn assert_serves_v2(berth: &Berth, v2_bytes: &[u8]) {
    let r = client()
        .get(berth.url("/v2/team/app/manifests/v2"))
        .header("Accept", MANIFEST)
        .send()
        .unwrap();
    assert!(r.bytes().unwrap()[..] == v2_bytes[..]);
    let tags: serde_json::Value = serde_json::from_slice(
        &client()
            .get(berth.url("/v2/team/app/tags/list"))
            .send()
            .unwrap()
            .bytes()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(tags["tags"].as_array().unwrap().len(), 3, "{tags}");
}

fn tools() -> bool {
    have_tool("docker-registry", "docker-registry") && have_tool("skopeo", "skopeo")
}

#[test]
fn import_from_distribution_filesystem_by_hard_links() {
    if !tools() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dist = Distribution::start(&tmp.path().join("dist"));
    let pushed = push_everything(&dist, tmp.path());

    // The berth data directory on the same filesystem as distribution's, so links work.
    let mut berth = Berth::start("");
    berth.kill();
    // distribution keeps serving during the import: it is only read.
    let (_, s) = import(&berth, &["--from-dir", dist.root.to_str().unwrap()]);
    assert_eq!(line(&s, "repositories"), "3 (3 new)");
    assert_eq!(line(&s, "tags"), "4 added, 0 moved, 0 already present");
    // v1 (twice), the index and its two platforms, the signature.
    assert_eq!(line(&s, "manifests"), "6 added, 0 already present");
    assert_eq!(s["bytes copied"].0, 0);
    assert_eq!(s["skipped"].0, 0);
    let blobs = line(&s, "blobs");
    // Layers + configs: team/app 2+1 and the signature's 2, other/app the same 3 again
    // (links, not new blobs), team/multi 3 layers + 2 configs.
    assert!(blobs.starts_with("13 links added, 10 new blobs"), "{blobs}");
    let signature_bytes =
        2 + br#"{"critical":{"identity":{"docker-reference":"example"}}}"#.len() as u64;
    let adopted: u64 = blobs
        .split('(')
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(adopted > pushed.layer_bytes + signature_bytes, "{blobs}");

    // Adopted by hard link: berth's object is distribution's file (same inode).
    use std::os::unix::fs::MetadataExt;
    let manifest: serde_json::Value = serde_json::from_slice(&pushed.images[0].2).unwrap();
    let layer = pushed
        .layout
        .path(manifest["layers"][0]["digest"].as_str().unwrap());
    let hex = layer.file_name().unwrap().to_str().unwrap();
    let key = format!("docker/registry/v2/blobs/sha256/{}/{hex}/data", &hex[..2]);
    let ours = berth
        .data_dir
        .path()
        .join("data/objects")
        .join(S3_BUCKET)
        .join(&key);
    let theirs = dist.root.join(&key);
    assert_eq!(
        std::fs::metadata(&ours).unwrap().ino(),
        std::fs::metadata(&theirs).unwrap().ino()
    );

    berth.restart();
    assert_berth_serves(&berth, &pushed, tmp.path());

    // A re-run adds nothing.
    berth.kill();
    let (_, s) = import(&berth, &["--from-dir", dist.root.to_str().unwrap()]);
    assert_eq!(line(&s, "tags"), "0 added, 0 moved, 4 already present");
    assert_eq!(line(&s, "manifests"), "0 added, 6 already present");
    assert!(
        line(&s, "blobs").starts_with("0 links added, 0 new blobs"),
        "{s:?}"
    );

    // distribution takes one more push: the re-run adds exactly that tag.
    let mut more = Layout::new(&tmp.path().join("more"));
    let (v2, v2_bytes) = more.image("amd64", 9, &[500_000]);
    more.tag("v2", v2);
    dist.push(&more, "v2", "team/app");
    let (_, s) = import(&berth, &["--from-dir", dist.root.to_str().unwrap()]);
    assert_added_one_tag(&s);
    berth.restart();
    assert_serves_v2(&berth, &v2_bytes);

    // An image whose layer distribution lost: its blob link, manifest and tag are skipped,
    // each with its reason, and nothing of it is served.
    berth.kill();
    let mut broken = Layout::new(&tmp.path().join("broken"));
    let (image, _) = broken.image("amd64", 11, &[300_000]);
    broken.tag("v1", image.clone());
    dist.push(&broken, "v1", "broken/app");
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(broken.path(image["digest"].as_str().unwrap())).unwrap(),
    )
    .unwrap();
    let lost = manifest["layers"][0]["digest"].as_str().unwrap();
    let hex = lost.trim_start_matches("sha256:");
    std::fs::remove_file(dist.root.join(format!(
        "docker/registry/v2/blobs/sha256/{}/{hex}/data",
        &hex[..2]
    )))
    .unwrap();
    let (out, s) = import(&berth, &["--from-dir", dist.root.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(s["skipped"].0, 3, "{text}");
    assert!(
        text.contains(&format!(
            "broken/app@{lost}: blob linked in the repository, without data"
        )),
        "{text}"
    );
    assert!(
        text.contains("(missing in distribution's storage)"),
        "{text}"
    );
    assert!(text.contains("broken/app:v1: points at"), "{text}");
    assert_eq!(line(&s, "tags"), "0 added, 0 moved, 5 already present");
    assert_eq!(line(&s, "manifests"), "0 added, 7 already present");
    berth.restart();
    let r = client()
        .get(berth.url("/v2/broken/app/manifests/v1"))
        .send()
        .unwrap();
    assert_eq!(r.status(), 404);
}

/// The requests in `ops` other than reads of distribution's metadata (listings, links, and
/// manifests, which distribution keeps as blobs: their digests are `manifests`) and journal
/// records (berth's own PUTs under `berth/journal/`): writes of any other kind, and reads of
/// layer or config bytes.
fn not_metadata<'a>(ops: &'a [S3Op], manifests: &[String]) -> Vec<&'a S3Op> {
    ops.iter()
        .filter(|o| {
            let read = matches!(
                o.op.as_str(),
                "HeadBucket" | "ListObjects" | "ListObjectsV2" | "HeadObject" | "GetObject"
            );
            let blob = o.key.contains("/blobs/")
                && !manifests.iter().any(|m| {
                    o.key
                        .ends_with(&format!("/{}/data", m.trim_start_matches("sha256:")))
                });
            let journal = o.op == "PutObject" && o.key.starts_with("berth/journal/");
            let metadata_read = read && !blob;
            !metadata_read && !journal
        })
        .collect()
}

/// Digests of every manifest pushed: the top-level ones and the index's platforms.
fn manifest_digests(pushed: &Pushed) -> Vec<String> {
    let mut out = Vec::new();
    for (_, _, manifest) in &pushed.images {
        out.push(sha256_digest(manifest));
        let v: serde_json::Value = serde_json::from_slice(manifest).unwrap();
        for m in v["manifests"].as_array().into_iter().flatten() {
            out.push(m["digest"].as_str().unwrap().to_string());
        }
    }
    out
}

#[test]
fn import_from_distribution_writing_s3_through_its_own_driver() {
    if !tools() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    // distribution's S3 driver stores into the bucket berth uses, below rootdirectory
    // "legacy"; berth keeps its own objects below `berth/`.
    let s3 = S3Server::start_for_distribution();
    let dist = Distribution::start_s3(&tmp.path().join("dist"), &s3, "legacy");
    let pushed = push_everything(&dist, tmp.path());
    let mut manifests = manifest_digests(&pushed);
    let objects_before = s3.object_files().len();
    let records_before = s3.journal_files().len();

    let mut berth = Berth::start_with("", Some(&s3));
    berth.kill();
    // distribution keeps serving during the import: it is only read.
    let ops_before = s3.operations().len();
    let requests_before = s3.request_count();
    let (_, s) = import(&berth, &["--from-bucket", "--root-directory", "legacy"]);
    let requests = s3.request_count() - requests_before;
    let ops = s3.operations()[ops_before..].to_vec();
    assert_eq!(line(&s, "repositories"), "3 (3 new)");
    assert_eq!(line(&s, "tags"), "4 added, 0 moved, 0 already present");
    assert_eq!(line(&s, "manifests"), "6 added, 0 already present");
    assert!(
        line(&s, "blobs").starts_with("13 links added, 10 new blobs"),
        "{s:?}"
    );
    assert_eq!(s["bytes copied"].0, 0);
    assert_eq!(s["skipped"].0, 0);
    let adopted: u64 = line(&s, "blobs")
        .split('(')
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap();
    assert!(adopted > pushed.layer_bytes, "{s:?}");
    // No blob PUT, no copy, no multipart upload, not one blob byte read: besides the
    // journal's records of what was adopted, only reads of distribution's listings, links
    // and manifests.
    assert_eq!(not_metadata(&ops, &manifests), Vec::<&S3Op>::new());
    // One HeadBucket (start-up check), one listing of the journal (catch-up), one listing
    // page for repositories and one for blobs, a link file per tag, a manifest per revision.
    let records = (s3.journal_files().len() - records_before) as u64;
    assert!(
        records > 0,
        "the adoption is recorded in the bucket journal"
    );
    assert_eq!(
        requests - records,
        1 + 1 + 2 + 4 + 6,
        "S3 requests of the import besides its {records} journal records: {ops:#?}"
    );
    assert_eq!(
        s3.object_files().len() as u64 - records,
        objects_before as u64,
        "the import wrote something besides journal records to the bucket"
    );

    berth.restart();
    assert_berth_serves(&berth, &pushed, tmp.path());

    // A re-run adds nothing and writes nothing. It reads distribution's listings and tag
    // links, and at start the journal's catch-up re-reads the records of the last minute (all
    // of them here).
    berth.kill();
    let ops_before = s3.operations().len();
    let records_before = s3.journal_files().len();
    let (_, s) = import(&berth, &["--from-bucket", "--root-directory", "legacy"]);
    let ops = s3.operations()[ops_before..].to_vec();
    assert_eq!(line(&s, "tags"), "0 added, 0 moved, 4 already present");
    assert_eq!(line(&s, "manifests"), "0 added, 6 already present");
    assert!(
        line(&s, "blobs").starts_with("0 links added, 0 new blobs"),
        "{s:?}"
    );
    assert_eq!(not_metadata(&ops, &manifests), Vec::<&S3Op>::new());
    assert_eq!(s3.journal_files().len(), records_before);
    assert!(
        ops.len() <= 1 + 1 + records_before + 2 + 4,
        "{} S3 requests for a re-run: {ops:#?}",
        ops.len()
    );

    // distribution takes one more push (through its S3 driver): the re-run adds exactly that
    // tag, again with no blob written or copied.
    let mut more = Layout::new(&tmp.path().join("more"));
    let (v2, v2_bytes) = more.image("amd64", 9, &[500_000]);
    manifests.push(v2["digest"].as_str().unwrap().to_string());
    more.tag("v2", v2);
    dist.push(&more, "v2", "team/app");
    let ops_before = s3.operations().len();
    let (_, s) = import(&berth, &["--from-bucket", "--root-directory", "legacy"]);
    let ops = s3.operations()[ops_before..].to_vec();
    assert_added_one_tag(&s);
    assert_eq!(s["bytes copied"].0, 0);
    assert_eq!(not_metadata(&ops, &manifests), Vec::<&S3Op>::new());
    berth.restart();
    assert_serves_v2(&berth, &v2_bytes);
    skopeo(&[
        "copy",
        "--preserve-digests",
        "--src-tls-verify=false",
        "--dest-oci-accept-uncompressed-layers",
        &format!("docker://127.0.0.1:{}/team/app:v2", berth.port),
        &format!("oci:{}:v2", tmp.path().join("pulled-v2").display()),
    ]);
    for entry in std::fs::read_dir(tmp.path().join("pulled-v2/blobs/sha256"))
        .unwrap()
        .flatten()
    {
        let digest = format!("sha256:{}", entry.file_name().to_string_lossy());
        assert!(
            std::fs::read(entry.path()).unwrap() == std::fs::read(more.path(&digest)).unwrap(),
            "team/app:v2: {digest} differs from what was pushed"
        );
    }
}
