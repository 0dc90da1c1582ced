//! Real clients against berth: skopeo (containers/image) pushes an OCI image layout, pulls it
//! back, inspects it, lists tags and copies between repositories; podman pulls; skopeo pushes
//! through one of two nodes on PostgreSQL and pulls through the other.
//!
//! The tools must be installed (CI installs them). To run without them, set
//! `BERTH_SKIP_CLIENT_TESTS=1`: the tests then pass after saying they skipped.

mod common;

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::*;

const MIB: usize = 1 << 20;
const MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";

// ---------------------------------------------------------------------------------------------
// tools

/// Runs a command, failing the test with its output (and berth's log) if it fails.
fn run(cmd: &mut Command, berth: &Berth) -> Output {
    let shown = format!("{cmd:?}");
    let out = cmd.output().unwrap_or_else(|e| panic!("{shown}: {e}"));
    if !out.status.success() {
        panic!(
            "{shown} failed ({}):\nstdout: {}\nstderr: {}\nberth log:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            berth.log()
        );
    }
    out
}

/// skopeo with no dependency on the machine's policy or credentials.
fn skopeo(auth_file: &Path) -> Command {
    let mut c = Command::new("skopeo");
    c.arg("--insecure-policy")
        .env("REGISTRY_AUTH_FILE", auth_file);
    c
}

// ---------------------------------------------------------------------------------------------
// an OCI image layout written from Rust

/// A tar archive with one regular file: a real layer that unpacks.
fn tar_layer(file_name: &str, content: &[u8]) -> Vec<u8> {
    let mut h = [0u8; 512];
    let put = |h: &mut [u8; 512], at: usize, s: &[u8]| h[at..at + s.len()].copy_from_slice(s);
    put(&mut h, 0, file_name.as_bytes());
    put(&mut h, 100, b"0000644\0");
    put(&mut h, 108, b"0000000\0");
    put(&mut h, 116, b"0000000\0");
    put(&mut h, 124, format!("{:011o}\0", content.len()).as_bytes());
    put(&mut h, 136, b"14500000000\0"); // mtime: fixed, so the layer is reproducible
    put(&mut h, 148, b"        "); // checksum field counts as spaces
    h[156] = b'0';
    put(&mut h, 257, b"ustar\0");
    put(&mut h, 263, b"00");
    put(&mut h, 265, b"root");
    put(&mut h, 297, b"root");
    let sum: u32 = h.iter().map(|&b| b as u32).sum();
    put(&mut h, 148, format!("{sum:06o}\0 ").as_bytes());
    let mut out = Vec::with_capacity(content.len() + 2048);
    out.extend_from_slice(&h);
    out.extend_from_slice(content);
    out.resize(out.len().div_ceil(512) * 512, 0);
    out.extend_from_slice(&[0u8; 1024]); // end of archive
    out
}

fn random(seed: u64, len: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(len);
    PseudoRandom::new(seed, len as u64)
        .read_to_end(&mut v)
        .unwrap();
    v
}

struct Image {
    manifest_digest: String,
    manifest: Vec<u8>,
    config_digest: String,
    layer_digests: Vec<String>,
}

/// An OCI image layout directory that can hold several tagged images.
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

    fn add_blob(&self, bytes: &[u8]) -> String {
        let digest = sha256_digest(bytes);
        let hex = digest.strip_prefix("sha256:").unwrap();
        std::fs::write(self.dir.join("blobs/sha256").join(hex), bytes).unwrap();
        digest
    }

    /// Adds an image of uncompressed tar layers (one file each) under `tag`.
    fn add_image(&mut self, tag: &str, layers: &[(&str, u64, usize)]) -> Image {
        let mut descriptors = Vec::new();
        let mut layer_digests = Vec::new();
        for &(name, seed, len) in layers {
            let tar = tar_layer(name, &random(seed, len));
            let digest = self.add_blob(&tar);
            descriptors.push(serde_json::json!({
                "mediaType": LAYER_TAR, "digest": digest, "size": tar.len(),
            }));
            layer_digests.push(digest);
        }
        let config = serde_json::to_vec(&serde_json::json!({
            "created": "2024-01-01T00:00:00Z",
            "architecture": "amd64",
            "os": "linux",
            "config": { "Cmd": ["/bin/true"] },
            // Uncompressed layers: the diff IDs are the layer digests.
            "rootfs": { "type": "layers", "diff_ids": layer_digests },
            "history": layers.iter().map(|(name, _, _)| serde_json::json!({
                "created": "2024-01-01T00:00:00Z", "created_by": format!("ADD {name}"),
            })).collect::<Vec<_>>(),
        }))
        .unwrap();
        let config_digest = self.add_blob(&config);
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": MANIFEST,
            "config": { "mediaType": CONFIG, "digest": config_digest, "size": config.len() },
            "layers": descriptors,
        }))
        .unwrap();
        let manifest_digest = self.add_blob(&manifest);
        self.index.push(serde_json::json!({
            "mediaType": MANIFEST,
            "digest": manifest_digest,
            "size": manifest.len(),
            "annotations": { "org.opencontainers.image.ref.name": tag },
        }));
        std::fs::write(
            self.dir.join("index.json"),
            serde_json::to_vec(&serde_json::json!({
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.index.v1+json",
                "manifests": self.index,
            }))
            .unwrap(),
        )
        .unwrap();
        Image {
            manifest_digest,
            manifest,
            config_digest,
            layer_digests,
        }
    }
}

/// Blobs of a layout: digest -> bytes.
fn blobs(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir.join("blobs/sha256"))
        .unwrap()
        .flatten()
        .map(|e| {
            (
                format!("sha256:{}", e.file_name().to_string_lossy()),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect()
}

/// The manifest digest a layout's index.json names for `tag`.
fn tagged_digest(dir: &Path, tag: &str) -> String {
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("index.json")).unwrap()).unwrap();
    index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == tag)
        .unwrap_or_else(|| panic!("no {tag} in {index}"))["digest"]
        .as_str()
        .unwrap()
        .to_string()
}

fn json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

/// The image of the tests: three uncompressed layers, one of them larger than a part.
fn image_v1(layout: &mut Layout) -> Image {
    layout.add_image(
        "v1",
        &[
            ("small.bin", 1, 3 * 1024),
            ("medium.bin", 2, 3 * MIB / 2),
            ("large.bin", 3, 12 * MIB + 5),
        ],
    )
}

// ---------------------------------------------------------------------------------------------
// skopeo

#[test]
fn skopeo_push_pull_inspect_list_and_cross_repo_copy() {
    if !have_tool("skopeo", "skopeo") {
        return;
    }
    let s3 = S3Server::start();
    let berth = Berth::start_with_env("", Some(&s3), &[("RUST_LOG", "info,berth=debug")]);
    let tmp = tempfile::tempdir().unwrap();
    let auth = tmp.path().join("auth.json");
    std::fs::write(&auth, br#"{"auths":{}}"#).unwrap();
    let reg = format!("127.0.0.1:{}", berth.port);
    let dir1 = tmp.path().join("src");
    let mut layout = Layout::new(&dir1);
    let v1 = image_v1(&mut layout);

    // Push: oci layout -> berth, digests as they are (uncompressed layers stay uncompressed).
    let before = s3.request_count();
    run(
        skopeo(&auth).args([
            "copy",
            "--preserve-digests",
            "--dest-tls-verify=false",
            &format!("oci:{}:v1", dir1.display()),
            &format!("docker://{reg}/test/img:v1"),
        ]),
        &berth,
    );
    let push_requests = s3.request_count() - before;
    eprintln!("[skopeo] push of v1 (3 layers + config): {push_requests} S3 requests");
    // One PutObject each for config, 3 KiB and 1.5 MiB layers (at their digest keys, which are
    // the bucket's record of them); the 12 MiB layer goes as multipart: create + 8 MiB part +
    // 4 MiB part + complete; then two bucket journal records: the 12 MiB layer's link and the
    // manifest.
    assert_eq!(push_requests, 9, "S3 requests for the push of v1");

    // berth has exactly these bytes under these digests.
    let c = client();
    let r = c
        .get(berth.url("/v2/test/img/manifests/v1"))
        .header("Accept", MANIFEST)
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["docker-content-digest"],
        v1.manifest_digest.as_str()
    );
    assert_eq!(r.bytes().unwrap().as_ref(), v1.manifest.as_slice());

    // Pull: berth -> a second oci layout. Every blob byte-identical, same manifest digest.
    let dir2 = tmp.path().join("pulled");
    run(
        skopeo(&auth).args([
            "copy",
            "--src-tls-verify=false",
            "--dest-oci-accept-uncompressed-layers",
            &format!("docker://{reg}/test/img:v1"),
            &format!("oci:{}:v1", dir2.display()),
        ]),
        &berth,
    );
    let (b1, b2) = (blobs(&dir1), blobs(&dir2));
    assert_eq!(
        b1.keys().collect::<Vec<_>>(),
        b2.keys().collect::<Vec<_>>(),
        "the pulled layout has other blobs"
    );
    for (digest, bytes) in &b1 {
        assert!(
            &b2[digest] == bytes,
            "blob {digest} differs after the round trip"
        );
        assert_eq!(&sha256_digest(&b2[digest]), digest);
    }
    assert_eq!(tagged_digest(&dir2, "v1"), v1.manifest_digest);

    // inspect: parsed and raw.
    let out = run(
        skopeo(&auth).args([
            "inspect",
            "--tls-verify=false",
            &format!("docker://{reg}/test/img:v1"),
        ]),
        &berth,
    );
    let info = json(&out);
    assert_eq!(info["Digest"], v1.manifest_digest.as_str(), "{info}");
    assert_eq!(
        info["Layers"],
        serde_json::json!(v1.layer_digests),
        "{info}"
    );
    assert_eq!(info["Os"], "linux");
    assert_eq!(info["Architecture"], "amd64");
    let out = run(
        skopeo(&auth).args([
            "inspect",
            "--raw",
            "--tls-verify=false",
            &format!("docker://{reg}/test/img:v1"),
        ]),
        &berth,
    );
    assert_eq!(
        out.stdout, v1.manifest,
        "inspect --raw is not the pushed manifest"
    );
    let out = run(
        skopeo(&auth).args([
            "inspect",
            "--config",
            "--raw",
            "--tls-verify=false",
            &format!("docker://{reg}/test/img:v1"),
        ]),
        &berth,
    );
    assert_eq!(sha256_digest(&out.stdout), v1.config_digest);

    // A second tag: v2 shares the small and the large layer with v1. Only the new layer and
    // the new config reach the object store (skopeo finds the others by HEAD).
    let v2 = layout.add_image(
        "v2",
        &[
            ("small.bin", 1, 3 * 1024),
            ("other.bin", 4, 2 * MIB),
            ("large.bin", 3, 12 * MIB + 5),
        ],
    );
    let before = s3.request_count();
    run(
        skopeo(&auth).args([
            "copy",
            "--preserve-digests",
            "--dest-tls-verify=false",
            &format!("oci:{}:v2", dir1.display()),
            &format!("docker://{reg}/test/img:v2"),
        ]),
        &berth,
    );
    let v2_requests = s3.request_count() - before;
    eprintln!("[skopeo] push of v2 (1 new layer of 2 MiB + config): {v2_requests} S3 requests");
    // The new layer and the config (PutObject each), the manifest's journal record.
    assert_eq!(v2_requests, 3, "shared layers were uploaded again");

    let out = run(
        skopeo(&auth).args([
            "list-tags",
            "--tls-verify=false",
            &format!("docker://{reg}/test/img"),
        ]),
        &berth,
    );
    let tags = json(&out);
    assert_eq!(tags["Tags"], serde_json::json!(["v1", "v2"]), "{tags}");

    // docker:// -> docker:// into another repository of berth: the layers are mounted from
    // test/img (POST ?mount=&from= -> 201), no layer byte moves.
    let before = s3.request_count();
    for tag in ["v1", "v2"] {
        run(
            skopeo(&auth).args([
                "copy",
                "--preserve-digests",
                "--src-tls-verify=false",
                "--dest-tls-verify=false",
                &format!("docker://{reg}/test/img:{tag}"),
                &format!("docker://{reg}/prod/app:{tag}"),
            ]),
            &berth,
        );
    }
    let copy_requests = s3.request_count() - before;
    eprintln!("[skopeo] copy of v1 and v2 to prod/app: {copy_requests} S3 requests");
    let log = berth.log();
    // containers/image never mounts a config blob: per image it GETs the config from the
    // source and uploads it again (1 GetObject; berth stores the chunked upload with 1
    // PutObject, finds the digest already stored and deletes the redundant copy: 1
    // DeleteObject). So 3 per image, 6 in all. A layer copied instead of mounted would add at
    // least 3 (GetObject, PutObject, DeleteObject), the 12 MiB one 7.
    // With the bucket journal, each mount, config link and manifest adds one record: 10
    // requests measured; a layer fetched from the source instead of mounted adds its GetObject.
    assert!(
        copy_requests <= 10,
        "the cross-repository copy moved layer bytes instead of mounting: {copy_requests} S3 \
         requests\n{log}"
    );
    for (tag, image) in [("v1", &v1), ("v2", &v2)] {
        let out = run(
            skopeo(&auth).args([
                "inspect",
                "--tls-verify=false",
                &format!("docker://{reg}/prod/app:{tag}"),
            ]),
            &berth,
        );
        assert_eq!(json(&out)["Digest"], image.manifest_digest.as_str());
        for d in &image.layer_digests {
            let r = c
                .head(berth.url(&format!("/v2/prod/app/blobs/{d}")))
                .send()
                .unwrap();
            assert_eq!(r.status(), 200, "{d} not linked into prod/app\n{log}");
        }
    }

    // And the copy pulls back byte-exact from the new repository.
    let dir3 = tmp.path().join("from-prod");
    run(
        skopeo(&auth).args([
            "copy",
            "--src-tls-verify=false",
            "--dest-oci-accept-uncompressed-layers",
            &format!("docker://{reg}/prod/app:v2"),
            &format!("oci:{}:v2", dir3.display()),
        ]),
        &berth,
    );
    assert_eq!(tagged_digest(&dir3, "v2"), v2.manifest_digest);
    let source = blobs(&dir1);
    let pulled = blobs(&dir3);
    assert_eq!(pulled.len(), 5, "v2: manifest, config, 3 layers");
    for (digest, bytes) in pulled {
        assert!(
            source[&digest] == bytes,
            "blob {digest} differs from prod/app"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// podman

/// Pushes a layout's image over plain HTTP (monolithic uploads, then the manifest).
fn push_over_http(berth: &Berth, layout: &Layout, repo: &str, tag: &str, image: &Image) {
    let c = client();
    let all = blobs(&layout.dir);
    for digest in std::iter::once(&image.config_digest).chain(&image.layer_digests) {
        assert_eq!(&berth.push_blob(&c, repo, &all[digest]), digest);
    }
    let r = c
        .put(berth.url(&format!("/v2/{repo}/manifests/{tag}")))
        .header("Content-Type", MANIFEST)
        .body(image.manifest.clone())
        .send()
        .unwrap();
    assert_eq!(r.status(), 201, "push manifest: {}", r.text().unwrap());
}

/// podman with its own storage (vfs: works inside containers, where overlay-on-overlay may
/// not) so the test neither needs nor touches the machine's image store.
fn podman(storage: &Path) -> Command {
    let mut c = Command::new("podman");
    c.arg("--root")
        .arg(storage.join("root"))
        .arg("--runroot")
        .arg(storage.join("run"))
        .arg("--storage-driver=vfs")
        .arg("--events-backend=none")
        .arg("--cgroup-manager=cgroupfs");
    c
}

#[test]
fn podman_pull() {
    if !have_tool("podman", "podman") {
        return;
    }
    let berth = Berth::start_with_env("", None, &[("RUST_LOG", "info,berth=debug")]);
    let tmp = tempfile::tempdir().unwrap();
    let mut layout = Layout::new(&tmp.path().join("src"));
    let v1 = image_v1(&mut layout);
    push_over_http(&berth, &layout, "test/img", "v1", &v1);
    let reference = format!("127.0.0.1:{}/test/img:v1", berth.port);
    let storage = tmp.path().join("podman");

    run(
        podman(&storage).args(["pull", "--tls-verify=false", &reference]),
        &berth,
    );
    let out = run(
        podman(&storage).args(["image", "inspect", &reference]),
        &berth,
    );
    let info = json(&out);
    assert_eq!(info[0]["Digest"], v1.manifest_digest.as_str(), "{info}");
    assert_eq!(
        info[0]["RootFS"]["Layers"],
        serde_json::json!(v1.layer_digests),
        "{info}"
    );
    // The layers unpacked: the files in the image are the bytes that were pushed.
    let out = run(podman(&storage).args(["create", &reference]), &berth);
    let container = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let extracted = tmp.path().join("large.bin");
    run(
        podman(&storage).args([
            "cp",
            &format!("{container}:/large.bin"),
            extracted.to_str().unwrap(),
        ]),
        &berth,
    );
    assert!(
        std::fs::read(&extracted).unwrap() == random(3, 12 * MIB + 5),
        "large.bin in the pulled image differs"
    );
    run(podman(&storage).args(["rm", &container]), &berth);
    run(podman(&storage).args(["rmi", &reference]), &berth);
}

/// Two berth nodes on one PostgreSQL database and one bucket (as behind a load balancer):
/// skopeo pushes through one and pulls through the other, which serves the image as soon as
/// the push has returned; the tag list and a second push through B are seen on A.
#[test]
fn skopeo_pushes_through_one_node_and_pulls_through_another() {
    if !have_tool("skopeo", "skopeo") {
        return;
    }
    let pg = common::pg::PgServer::shared();
    let s3 = S3Server::start();
    let yaml = pg.metadata_yaml(&pg.create_database());
    let a = Berth::start_with(&yaml, Some(&s3));
    let b = Berth::start_with(&yaml, Some(&s3));
    let tmp = tempfile::tempdir().unwrap();
    let auth = tmp.path().join("auth.json");
    std::fs::write(&auth, br#"{"auths":{}}"#).unwrap();
    let (reg_a, reg_b) = (
        format!("127.0.0.1:{}", a.port),
        format!("127.0.0.1:{}", b.port),
    );
    let src = tmp.path().join("src");
    let mut layout = Layout::new(&src);
    let v1 = image_v1(&mut layout);

    run(
        skopeo(&auth).args([
            "copy",
            "--preserve-digests",
            "--dest-tls-verify=false",
            &format!("oci:{}:v1", src.display()),
            &format!("docker://{reg_a}/team/img:v1"),
        ]),
        &a,
    );
    let pulled = tmp.path().join("pulled");
    run(
        skopeo(&auth).args([
            "copy",
            "--src-tls-verify=false",
            "--dest-oci-accept-uncompressed-layers",
            &format!("docker://{reg_b}/team/img:v1"),
            &format!("oci:{}:v1", pulled.display()),
        ]),
        &b,
    );
    let (sent, got) = (blobs(&src), blobs(&pulled));
    assert_eq!(
        sent.keys().collect::<Vec<_>>(),
        got.keys().collect::<Vec<_>>()
    );
    for (digest, bytes) in &sent {
        assert!(&got[digest] == bytes, "blob {digest} differs through B");
    }
    assert_eq!(tagged_digest(&pulled, "v1"), v1.manifest_digest);

    // B copies the image to a second tag (its layers found by HEAD, none sent again); A lists it.
    run(
        skopeo(&auth).args([
            "copy",
            "--src-tls-verify=false",
            "--dest-tls-verify=false",
            &format!("docker://{reg_b}/team/img:v1"),
            &format!("docker://{reg_b}/team/img:v2"),
        ]),
        &b,
    );
    let out = run(
        skopeo(&auth).args([
            "list-tags",
            "--tls-verify=false",
            &format!("docker://{reg_a}/team/img"),
        ]),
        &a,
    );
    assert_eq!(json(&out)["Tags"], serde_json::json!(["v1", "v2"]));
    let out = run(
        skopeo(&auth).args([
            "inspect",
            "--tls-verify=false",
            "--raw",
            &format!("docker://{reg_a}/team/img:v2"),
        ]),
        &a,
    );
    assert_eq!(out.stdout, v1.manifest);
}
