//! Durable by the bucket: every acknowledged write is recorded in the object store before the
//! client's success answer, and the metadata store is rebuilt from the bucket alone (`berth
//! recover`, or by itself at start). Every test runs berth against a separate S3 server
//! (s3s-fs in the test process), never its embedded store.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{client, sha256_digest, Berth, PseudoRandom, S3Server};
use reqwest::blocking::{Client, Response};
use serde_json::{json, Value};

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";
const MIB: usize = 1 << 20;
/// The smallest part size S3 allows: a 6 MiB layer is then a two-part multipart upload.
const SMALL_PARTS: &str = "upload:\n  part_size: 5MiB\n";

/// Distinct seeds give distinct bytes (PseudoRandom ignores a seed's lowest bit).
fn bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    std::io::Read::read_exact(&mut PseudoRandom::new(seed * 2 + 1, len as u64), &mut out).unwrap();
    out
}

/// A pushed image: what a pull must give back.
#[derive(Debug, Clone, PartialEq)]
struct Image {
    digest: String,
    manifest: Vec<u8>,
    media_type: String,
    /// Digests of the config and layers, with their bytes.
    blobs: Vec<(String, Vec<u8>)>,
}

struct Reg<'a> {
    /// `http://127.0.0.1:PORT`
    base: String,
    /// For berth's log in failure messages.
    b: Option<&'a Berth>,
    c: Client,
}

impl<'a> Reg<'a> {
    fn new(b: &'a Berth) -> Self {
        Reg {
            base: b.url(""),
            b: Some(b),
            c: client(),
        }
    }

    /// A client of whatever berth listens at `base` (one that is killed and restarted).
    fn at(base: &str) -> Self {
        Reg {
            base: base.to_string(),
            b: None,
            c: client(),
        }
    }

    fn url(&self, p: &str) -> String {
        format!("{}{p}", self.base)
    }

    fn log(&self) -> String {
        self.b.map(|b| b.log()).unwrap_or_default()
    }

    /// Uploads a blob as skopeo and docker do: POST, PATCH with the whole body (with its
    /// Content-Length), PUT ?digest= without a body. Bytes of a layer larger than a part go
    /// out as a multipart upload; smaller ones stay in memory and are stored at finish.
    fn push_chunked(&self, repo: &str, data: &[u8]) -> Result<String, String> {
        let digest = sha256_digest(data);
        let r = self
            .c
            .post(self.url(&format!("/v2/{repo}/blobs/uploads/")))
            .send()
            .map_err(|e| e.to_string())?;
        if r.status() != 202 {
            return Err(format!("POST upload: {}", r.status()));
        }
        let loc = self.url(r.headers()["location"].to_str().unwrap());
        let r = self
            .c
            .patch(&loc)
            .header("Content-Type", "application/octet-stream")
            .body(data.to_vec())
            .send()
            .map_err(|e| e.to_string())?;
        if r.status() != 202 {
            return Err(format!("PATCH: {}", r.status()));
        }
        let loc = self.url(r.headers()["location"].to_str().unwrap());
        let sep = if loc.contains('?') { '&' } else { '?' };
        let r = self
            .c
            .put(format!("{loc}{sep}digest={digest}"))
            .send()
            .map_err(|e| e.to_string())?;
        if r.status() != 201 {
            return Err(format!("PUT ?digest: {} {}", r.status(), r.text().unwrap()));
        }
        Ok(digest)
    }

    /// Monolithic upload (`POST ?digest=` with the body): streamed to the bucket.
    fn push_monolithic(&self, repo: &str, data: &[u8]) -> Result<String, String> {
        let digest = sha256_digest(data);
        let r = self
            .c
            .post(self.url(&format!("/v2/{repo}/blobs/uploads/?digest={digest}")))
            .header("Content-Type", "application/octet-stream")
            .body(data.to_vec())
            .send()
            .map_err(|e| e.to_string())?;
        if r.status() != 201 {
            return Err(format!("monolithic POST: {}", r.status()));
        }
        Ok(digest)
    }

    fn put_manifest(&self, repo: &str, reference: &str, media_type: &str, body: &[u8]) -> Response {
        self.c
            .put(self.url(&format!("/v2/{repo}/manifests/{reference}")))
            .header("Content-Type", media_type)
            .body(body.to_vec())
            .send()
            .unwrap()
    }

    /// Pushes config and layers (`layers[i]` chunked when `chunked[i]`, else monolithic),
    /// then the manifest under `reference`. Err on any non-success answer or transport error
    /// (berth killed under it).
    fn try_push_image(
        &self,
        repo: &str,
        reference: &str,
        config: &[u8],
        layers: &[(Vec<u8>, bool)],
        subject: Option<&Image>,
    ) -> Result<Image, String> {
        let cd = self.push_chunked(repo, config)?;
        let mut blobs = vec![(cd.clone(), config.to_vec())];
        let mut descs = Vec::new();
        for (data, chunked) in layers {
            let d = if *chunked {
                self.push_chunked(repo, data)?
            } else {
                self.push_monolithic(repo, data)?
            };
            descs.push(json!({"mediaType": OCI_LAYER, "digest": d, "size": data.len()}));
            blobs.push((d, data.clone()));
        }
        let mut m = json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": cd, "size": config.len()},
            "layers": descs,
        });
        if let Some(s) = subject {
            m["artifactType"] = json!("application/vnd.example.sbom");
            m["subject"] =
                json!({"mediaType": OCI_MANIFEST, "digest": s.digest, "size": s.manifest.len()});
        }
        let body = serde_json::to_vec_pretty(&m).unwrap();
        let r = self
            .c
            .put(self.url(&format!("/v2/{repo}/manifests/{reference}")))
            .header("Content-Type", OCI_MANIFEST)
            .body(body.clone())
            .send()
            .map_err(|e| e.to_string())?;
        if r.status() != 201 {
            return Err(format!("PUT manifest: {}", r.status()));
        }
        Ok(Image {
            digest: sha256_digest(&body),
            manifest: body,
            media_type: OCI_MANIFEST.into(),
            blobs,
        })
    }

    #[track_caller]
    fn push_image(&self, repo: &str, reference: &str, seed: u64, subject: Option<&Image>) -> Image {
        let config = format!("{{\"architecture\":\"amd64\",\"os\":\"linux\",\"seed\":{seed}}}");
        let layers = vec![
            (bytes(seed * 3 + 1, 6 * MIB + seed as usize), true),
            (bytes(seed * 3 + 2, 2000 + seed as usize), false),
        ];
        self.try_push_image(repo, reference, config.as_bytes(), &layers, subject)
            .unwrap_or_else(|e| panic!("push {repo}:{reference}: {e}\n{}", self.log()))
    }

    fn push_index(&self, repo: &str, tag: &str, children: &[&Image]) -> Image {
        let manifests: Vec<Value> = children
            .iter()
            .map(|c| {
                json!({"mediaType": c.media_type, "digest": c.digest, "size": c.manifest.len(),
                            "platform": {"architecture": "amd64", "os": "linux"}})
            })
            .collect();
        let body = serde_json::to_vec(&json!({
            "schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests,
        }))
        .unwrap();
        let r = self.put_manifest(repo, tag, OCI_INDEX, &body);
        assert_eq!(r.status(), 201, "push index: {}", r.text().unwrap());
        Image {
            digest: sha256_digest(&body),
            manifest: body,
            media_type: OCI_INDEX.into(),
            blobs: Vec::new(),
        }
    }

    fn get(&self, path: &str) -> Response {
        self.c.get(self.url(path)).send().unwrap()
    }

    fn delete(&self, path: &str) -> u16 {
        self.c
            .delete(self.url(path))
            .send()
            .unwrap()
            .status()
            .as_u16()
    }

    /// Everything a client can see of `repos`: tags, what each tag and each known digest
    /// serves, referrers of each digest, and the catalog.
    fn snapshot(&self, repos: &[&str], digests: &[&str]) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        out.insert("catalog".into(), self.get("/v2/_catalog").text().unwrap());
        for repo in repos {
            let tags = self.get(&format!("/v2/{repo}/tags/list")).text().unwrap();
            out.insert(format!("{repo} tags"), tags.clone());
            let tags: Value = serde_json::from_str(&tags).unwrap();
            for t in tags["tags"].as_array().into_iter().flatten() {
                let t = t.as_str().unwrap();
                out.insert(format!("{repo}:{t}"), self.manifest_view(repo, t));
            }
            for d in digests {
                out.insert(format!("{repo}@{d}"), self.manifest_view(repo, d));
                let r = self.get(&format!("/v2/{repo}/referrers/{d}"));
                out.insert(
                    format!("{repo} referrers of {d}"),
                    format!("{} {}", r.status(), r.text().unwrap()),
                );
            }
        }
        out
    }

    fn manifest_view(&self, repo: &str, reference: &str) -> String {
        let r = self.get(&format!("/v2/{repo}/manifests/{reference}"));
        let status = r.status();
        let ct = r
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default();
        let digest = r
            .headers()
            .get("docker-content-digest")
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default();
        let body = if status == 200 {
            sha256_digest(&r.bytes().unwrap())
        } else {
            String::new()
        };
        format!("{status} {ct} {digest} body {body}")
    }

    /// The image pulls byte-identical: manifest by digest and every blob.
    #[track_caller]
    fn assert_pulls(&self, repo: &str, reference: &str, img: &Image) {
        let r = self.get(&format!("/v2/{repo}/manifests/{reference}"));
        assert_eq!(r.status(), 200, "{repo}:{reference}\n{}", self.log());
        assert_eq!(r.headers()["content-type"], img.media_type.as_str());
        assert_eq!(
            r.bytes().unwrap().as_ref(),
            &img.manifest[..],
            "{repo}:{reference}"
        );
        for (d, data) in &img.blobs {
            let r = self.get(&format!("/v2/{repo}/blobs/{d}"));
            assert_eq!(r.status(), 200, "{repo} blob {d}");
            let got = r.bytes().unwrap();
            assert!(got.as_ref() == &data[..], "{repo} blob {d}: other bytes");
        }
    }
}

/// Stops berth (SIGKILL), deletes meta.redb, runs `berth recover`, starts berth again.
fn lose_metadata_and_recover(b: &mut Berth) -> String {
    b.kill();
    let db = b.data_path().join("meta.redb");
    std::fs::remove_file(&db).unwrap();
    let (status, out) = b.recover();
    assert!(status.success(), "berth recover: {status}\n{out}");
    b.start_again();
    out
}

#[test]
fn recover_rebuilds_every_acknowledged_write_from_the_bucket() {
    let s3 = S3Server::start();
    let mut b = Berth::start_with(SMALL_PARTS, Some(&s3));
    let (snapshot, digests, kept) = {
        let reg = Reg::new(&b);
        let v1 = reg.push_image("app", "v1", 1, None);
        let v2 = reg.push_image("app", "v2", 2, None);
        // A tag moved twice, a tag deleted, a manifest deleted (with its tag).
        assert_eq!(
            reg.put_manifest("app", "latest", OCI_MANIFEST, &v1.manifest)
                .status(),
            201
        );
        assert_eq!(
            reg.put_manifest("app", "latest", OCI_MANIFEST, &v2.manifest)
                .status(),
            201
        );
        assert_eq!(
            reg.put_manifest("app", "gone", OCI_MANIFEST, &v1.manifest)
                .status(),
            201
        );
        assert_eq!(reg.delete("/v2/app/manifests/gone"), 202);
        let old = reg.push_image("app", "old", 3, None);
        assert_eq!(
            reg.delete(&format!("/v2/app/manifests/{}", old.digest)),
            202
        );
        // An index, and a referrer of v1 pushed by digest.
        let index = reg.push_index("app", "multi", &[&v1, &v2]);
        let sbom = reg.push_image("app", "placeholder", 4, Some(&v1));
        assert_eq!(reg.delete("/v2/app/manifests/placeholder"), 202);
        // A second repository: a mounted layer, a deleted blob link.
        let layer = &v1.blobs[1].0;
        let r = reg
            .c
            .post(reg.url(&format!("/v2/other/blobs/uploads/?mount={layer}&from=app")))
            .send()
            .unwrap();
        assert_eq!(r.status(), 201, "mount");
        let stray = reg
            .push_monolithic("other", b"a blob deleted again")
            .unwrap();
        assert_eq!(reg.delete(&format!("/v2/other/blobs/{stray}")), 202);
        let x = reg.push_image("other", "x", 5, None);

        let digests: Vec<String> = [&v1, &v2, &old, &index, &sbom, &x]
            .iter()
            .map(|i| i.digest.clone())
            .collect();
        let ds: Vec<&str> = digests.iter().map(String::as_str).collect();
        let snapshot = reg.snapshot(&["app", "other"], &ds);
        assert!(snapshot[&format!("app referrers of {}", v1.digest)].contains(&sbom.digest));
        assert!(snapshot[&format!("app@{}", old.digest)].starts_with("404"));
        let r = reg.get(&format!("/v2/other/blobs/{layer}"));
        assert_eq!(r.status(), 200);
        (
            snapshot,
            digests,
            vec![
                ("app", "v1", v1),
                ("app", "v2", v2),
                ("other", "x", x),
                ("app", "latest", sbom.clone()),
            ],
        )
    };
    let stray_digest = sha256_digest(b"a blob deleted again");

    let out = lose_metadata_and_recover(&mut b);
    assert!(out.contains("rebuild: done"), "{out}");
    assert!(out.contains("recovered in"), "{out}");

    let reg = Reg::new(&b);
    let ds: Vec<&str> = digests.iter().map(String::as_str).collect();
    let after = reg.snapshot(&["app", "other"], &ds);
    assert_eq!(after, snapshot);
    for (repo, tag, img) in &kept[..3] {
        reg.assert_pulls(repo, tag, img);
        reg.assert_pulls(repo, &img.digest, img);
    }
    let sbom = &kept[3].2;
    reg.assert_pulls("app", &sbom.digest, sbom);
    // The mount survived, the deleted blob link stayed deleted.
    let layer = &kept[0].2.blobs[1].0;
    assert_eq!(reg.get(&format!("/v2/other/blobs/{layer}")).status(), 200);
    assert_eq!(
        reg.get(&format!("/v2/other/blobs/{stray_digest}")).status(),
        404
    );

    // A second recover refuses to overwrite a store that is not empty.
    b.kill();
    let (status, out) = b.recover();
    assert!(!status.success(), "{out}");
    assert!(out.contains("is not empty"), "{out}");
}

/// What garbage collection deleted stays deleted after a rebuild: its batch records replay,
/// no rebuilt record points at a deleted object, and the emptied repository stays out of the
/// catalog.
#[test]
fn gc_collections_survive_a_rebuild() {
    let s3 = S3Server::start();
    let mut b = Berth::start_with(&format!("{SMALL_PARTS}gc:\n  blob_grace: 1s\n"), Some(&s3));
    let (v1, v2, x) = {
        let reg = Reg::new(&b);
        let v1 = reg.push_image("app", "v1", 1, None);
        let v2 = reg.push_image("app", "v2", 2, None);
        let x = reg.push_image("other", "x", 3, None);
        assert_eq!(reg.delete(&format!("/v2/app/manifests/{}", v2.digest)), 202);
        assert_eq!(
            reg.delete(&format!("/v2/other/manifests/{}", x.digest)),
            202
        );
        (v1, v2, x)
    };
    std::thread::sleep(Duration::from_millis(2100));
    b.kill();
    let out = b.gc(&["--json"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "berth gc: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(report["blobs"]["count"], 6, "{report}");
    b.start_again();

    let out = lose_metadata_and_recover(&mut b);
    assert!(out.contains("rebuild: done"), "{out}");
    let reg = Reg::new(&b);
    reg.assert_pulls("app", "v1", &v1);
    for (repo, img) in [("app", &v2), ("other", &x)] {
        assert_eq!(
            reg.get(&format!("/v2/{repo}/manifests/{}", img.digest))
                .status(),
            404
        );
        for (d, _) in &img.blobs {
            assert_eq!(
                reg.get(&format!("/v2/{repo}/blobs/{d}")).status(),
                404,
                "{d}"
            );
        }
    }
    let catalog: Value = serde_json::from_slice(&reg.get("/v2/_catalog").bytes().unwrap()).unwrap();
    assert_eq!(catalog["repositories"], json!(["app"]));
}

#[test]
fn a_node_with_an_empty_data_dir_rebuilds_itself_at_start() {
    let s3 = S3Server::start();
    let first = Berth::start_with(SMALL_PARTS, Some(&s3));
    let reg = Reg::new(&first);
    let v1 = reg.push_image("lib/alpine", "3", 7, None);
    let v2 = reg.push_image("lib/alpine", "edge", 8, None);
    assert_eq!(
        reg.put_manifest("lib/alpine", "latest", OCI_MANIFEST, &v2.manifest)
            .status(),
        201
    );
    assert_eq!(reg.delete("/v2/lib/alpine/manifests/edge"), 202);
    let ds = [v1.digest.as_str(), v2.digest.as_str()];
    let snapshot = reg.snapshot(&["lib/alpine"], &ds);
    drop(reg);
    drop(first);

    // A new node: fresh data dir, same bucket.
    let second = Berth::start_with(SMALL_PARTS, Some(&s3));
    let log = second.log();
    assert!(log.contains("rebuilding it from the bucket"), "{log}");
    assert!(
        log.contains("metadata store rebuilt from the bucket"),
        "{log}"
    );
    let reg = Reg::new(&second);
    assert_eq!(reg.snapshot(&["lib/alpine"], &ds), snapshot);
    reg.assert_pulls("lib/alpine", "3", &v1);
    reg.assert_pulls("lib/alpine", "latest", &v2);
    assert_eq!(reg.get("/v2/lib/alpine/manifests/edge").status(), 404);
}

/// A record in the bucket whose local commit never happened (the node died in between) is
/// applied when berth starts again.
#[test]
fn a_crash_between_record_and_commit_is_repaired_at_start() {
    use berth::config::{Config, Overrides};
    use berth::meta::journal::Op;
    use berth::storage::{ObjectBody, ObjectStore};

    let s3 = S3Server::start();
    let mut b = Berth::start_with(SMALL_PARTS, Some(&s3));
    let reg = Reg::new(&b);
    let v1 = reg.push_image("crash", "latest", 11, None);
    let v2 = reg.push_image(
        "crash",
        &sha256_digest(b"unused").replace("sha256:", "t"),
        12,
        None,
    );
    drop(reg);
    b.kill();

    // What the node wrote just before it died: latest -> v2, not committed locally.
    let cfg = Config::from_yaml(&s3.storage_yaml(), &Overrides::default(), &|_| None).unwrap();
    let store = ObjectStore::new(&cfg.storage).unwrap();
    let op = Op::PutManifest {
        repo: "crash".into(),
        digest: v2.digest.clone(),
        media_type: OCI_MANIFEST.into(),
        subject: None,
        tag: Some("latest".into()),
        referrer: None,
    };
    let now = humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
    let key = format!("berth/journal/{now}-deadbeef-00000001/manifest/crash:latest");
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(store.put_object(&key, ObjectBody::Bytes(op.encode(&v2.manifest))))
        .unwrap();

    b.start_again();
    assert!(b.log().contains("caught up from the bucket"), "{}", b.log());
    let reg = Reg::new(&b);
    reg.assert_pulls("crash", "latest", &v2);
    reg.assert_pulls("crash", &v1.digest, &v1);
}

/// berth killed (SIGKILL) at random moments while images are pushed: after losing the
/// metadata and recovering, every push that was answered 201 pulls byte-identical, and every
/// tag there is resolves to a whole image.
#[test]
fn kill_during_pushes_then_rebuild_keeps_every_acknowledged_push() {
    let s3 = S3Server::start();
    let b = Arc::new(Mutex::new(Berth::start_with(SMALL_PARTS, Some(&s3))));
    let url = b.lock().unwrap().url("");
    let acked: Arc<Mutex<Vec<(String, Image)>>> = Default::default();
    let stop = Arc::new(AtomicBool::new(false));
    let pusher = {
        let (acked, stop, url) = (acked.clone(), stop.clone(), url.clone());
        std::thread::spawn(move || {
            let reg = Reg::at(&url);
            let mut seed = 100u64;
            while !stop.load(Ordering::SeqCst) {
                seed += 1;
                let tag = format!("t{seed}");
                let config = format!("{{\"seed\":{seed}}}");
                // Every third image has a multipart layer.
                let big = if seed.is_multiple_of(3) {
                    6 * MIB
                } else {
                    70_000
                };
                let layers = vec![(bytes(seed, big), true), (bytes(seed + 1000, 3000), false)];
                match reg.try_push_image("kill/app", &tag, config.as_bytes(), &layers, None) {
                    Ok(img) => acked.lock().unwrap().push((tag, img)),
                    // berth was killed under the push: the push was never acknowledged.
                    Err(_) => std::thread::sleep(Duration::from_millis(50)),
                }
            }
        })
    };
    let pseudo_random_ms = |i: u64| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos() as u64;
        150 + (nanos ^ (i * 7919)) % 600
    };
    for i in 0..4 {
        std::thread::sleep(Duration::from_millis(pseudo_random_ms(i)));
        let mut g = b.lock().unwrap();
        g.kill();
        g.start_again();
    }
    // At least one push gets through after the last restart.
    let before = acked.lock().unwrap().len();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while acked.lock().unwrap().len() == before && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(pseudo_random_ms(9)));
    {
        // The last kill comes mid-push too.
        b.lock().unwrap().kill();
    }
    stop.store(true, Ordering::SeqCst);
    pusher.join().unwrap();
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() > 1, "only {} pushes acknowledged", acked.len());

    let mut g = b.lock().unwrap();
    std::fs::remove_file(g.data_path().join("meta.redb")).unwrap();
    let (status, out) = g.recover();
    assert!(status.success(), "{out}");
    g.start_again();
    let reg = Reg::new(&g);
    for (tag, img) in &acked {
        reg.assert_pulls("kill/app", tag, img);
    }
    // Nothing half-written: every tag there is resolves to a manifest whose blobs all pull
    // with their digests.
    let tags: Value =
        serde_json::from_str(&reg.get("/v2/kill/app/tags/list").text().unwrap()).unwrap();
    for t in tags["tags"].as_array().unwrap() {
        let r = reg.get(&format!("/v2/kill/app/manifests/{}", t.as_str().unwrap()));
        assert_eq!(r.status(), 200);
        let m: Value = serde_json::from_slice(&r.bytes().unwrap()).unwrap();
        let mut ds = vec![m["config"]["digest"].as_str().unwrap().to_string()];
        for l in m["layers"].as_array().unwrap() {
            ds.push(l["digest"].as_str().unwrap().to_string());
        }
        for d in ds {
            let r = reg.get(&format!("/v2/kill/app/blobs/{d}"));
            assert_eq!(r.status(), 200, "tag {t} blob {d}");
            assert_eq!(sha256_digest(&r.bytes().unwrap()), d);
        }
    }
}

#[test]
fn a_bucket_refusing_writes_gets_503_and_the_tag_stays() {
    let s3 = S3Server::start();
    let b = Berth::start_with(SMALL_PARTS, Some(&s3));
    let reg = Reg::new(&b);
    let v1 = reg.push_image("ro", "latest", 21, None);
    let v2 = reg.push_image("ro", "v2", 22, None);

    s3.refuse_writes(true);
    let r = reg.put_manifest("ro", "latest", OCI_MANIFEST, &v2.manifest);
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"));
    assert_eq!(common::error_code(&r.text().unwrap()), "UNAVAILABLE");
    // Reads still come from the local store; nothing moved.
    reg.assert_pulls("ro", "latest", &v1);
    // Deletes are refused the same way and leave everything in place.
    let r = reg.c.delete(reg.url("/v2/ro/manifests/v2")).send().unwrap();
    assert_eq!(r.status(), 503);
    reg.assert_pulls("ro", "v2", &v2);
    s3.refuse_writes(false);

    assert_eq!(
        reg.put_manifest("ro", "latest", OCI_MANIFEST, &v2.manifest)
            .status(),
        201
    );
    reg.assert_pulls("ro", "latest", &v2);
}

/// What the journal costs one skopeo-like push (config + 3 multipart layers + a tagged
/// manifest): one record per multipart layer and one for the manifest; the config's bytes
/// are their own record. And a manifest GET makes no S3 request.
#[test]
fn journal_request_count_for_one_push() {
    let count = |journal: bool| -> (u64, u64) {
        let s3 = S3Server::start();
        let yaml = format!("{SMALL_PARTS}journal:\n  enabled: {journal}\n");
        let b = Berth::start_with(&yaml, Some(&s3));
        let reg = Reg::new(&b);
        let config = b"{\"architecture\":\"amd64\",\"os\":\"linux\"}";
        let layers: Vec<(Vec<u8>, bool)> = (0..3).map(|i| (bytes(40 + i, 6 * MIB), true)).collect();
        let before = s3.request_count();
        let img = reg
            .try_push_image("count", "latest", config, &layers, None)
            .unwrap();
        let push = s3.request_count() - before;
        let before = s3.request_count();
        for _ in 0..5 {
            let r = reg.get("/v2/count/manifests/latest");
            assert_eq!(r.bytes().unwrap().as_ref(), &img.manifest[..]);
        }
        (push, s3.request_count() - before)
    };
    let (without, _) = count(false);
    let (with, manifest_gets) = count(true);
    eprintln!("S3 requests for one push: {without} without the journal, {with} with it");
    // 3 x (CreateMultipartUpload + 2 UploadPart + CompleteMultipartUpload) + 1 PutObject.
    assert_eq!(without, 13);
    assert_eq!(with, without + 4);
    assert_eq!(manifest_gets, 0);
}

/// Rebuild speed: 1,000 images of 10 blobs each (a config at its verified key, 9 layers with
/// journal link records, a tagged manifest record), written straight into the bucket, then
/// `berth recover`. Slow to set up (21,000 objects), so run by hand:
/// `cargo test --release --test durability -- --ignored --nocapture rebuild_of_1000_images`.
#[test]
#[ignore]
fn rebuild_of_1000_images() {
    use berth::config::{Config, Overrides};
    use berth::meta::journal::Op;
    use berth::storage::{ObjectBody, ObjectStore};
    use futures_util::StreamExt;

    const IMAGES: usize = 1000;
    const LAYERS: usize = 9;
    let s3 = S3Server::start();
    let cfg = Config::from_yaml(&s3.storage_yaml(), &Overrides::default(), &|_| None).unwrap();
    let store = ObjectStore::new(&cfg.storage).unwrap();
    let t0 = std::time::SystemTime::now() - Duration::from_secs(3600);
    let mut objects: Vec<(String, Vec<u8>)> = Vec::new();
    let mut seq = 0u64;
    let mut record = |objects: &mut Vec<(String, Vec<u8>)>, op: Op, payload: &[u8]| {
        seq += 1;
        let t = humantime::format_rfc3339_millis(t0 + Duration::from_millis(seq)).to_string();
        let key = format!("berth/journal/{t}-0badc0de-{seq:08}/bench");
        objects.push((key, op.encode(payload).to_vec()));
    };
    for i in 0..IMAGES {
        let repo = format!("rebuild/r{}", i % 100);
        let config = format!("{{\"image\":{i}}}");
        let cd = sha256_digest(config.as_bytes());
        objects.push((
            format!("berth/blobs/sha256/{}/{repo}", &cd[7..]),
            config.clone().into_bytes(),
        ));
        let mut layers = Vec::new();
        for l in 0..LAYERS {
            let data = format!("layer {l} of image {i}").into_bytes();
            let d = sha256_digest(&data);
            let key = format!("berth/blobs/{i:06}-{l}");
            record(
                &mut objects,
                Op::Link {
                    repo: repo.clone(),
                    digest: d.clone(),
                    key: key.clone(),
                    size: data.len() as u64,
                },
                &[],
            );
            layers.push(json!({"mediaType": OCI_LAYER, "digest": d, "size": data.len()}));
            objects.push((key, data));
        }
        let body = serde_json::to_vec(&json!({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": cd, "size": config.len()},
            "layers": layers,
        }))
        .unwrap();
        let op = Op::PutManifest {
            repo: repo.clone(),
            digest: sha256_digest(&body),
            media_type: OCI_MANIFEST.into(),
            subject: None,
            tag: Some(format!("t{i}")),
            referrer: None,
        };
        record(&mut objects, op, &body);
    }
    let n = objects.len();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let started = std::time::Instant::now();
    rt.block_on(
        futures_util::stream::iter(objects.into_iter().map(|(k, v)| {
            let store = &store;
            async move { store.put_object(&k, ObjectBody::Bytes(v.into())).await }
        }))
        .buffer_unordered(32)
        .for_each(|r| {
            r.unwrap();
            async {}
        }),
    );
    eprintln!("wrote {n} objects in {:.1?}", started.elapsed());

    let mut b = Berth::stopped_with("", Some(&s3));
    let started = std::time::Instant::now();
    let (status, out) = b.recover();
    let took = started.elapsed();
    assert!(status.success(), "{out}");
    eprintln!(
        "{out}\nberth recover: {IMAGES} images, {} blobs in {took:.1?}",
        IMAGES * (LAYERS + 1)
    );
    b.start_again();
    let reg = Reg::new(&b);
    let mut tags = 0;
    for r in 0..100 {
        let v: Value = serde_json::from_str(
            &reg.get(&format!("/v2/rebuild/r{r}/tags/list"))
                .text()
                .unwrap(),
        )
        .unwrap();
        tags += v["tags"].as_array().unwrap().len();
    }
    assert_eq!(tags, IMAGES);
    let r = reg.get("/v2/rebuild/r7/manifests/t107");
    assert_eq!(r.status(), 200);
    let m: Value = serde_json::from_slice(&r.bytes().unwrap()).unwrap();
    for l in m["layers"].as_array().unwrap() {
        let d = l["digest"].as_str().unwrap();
        let r = reg.get(&format!("/v2/rebuild/r7/blobs/{d}"));
        assert_eq!(sha256_digest(&r.bytes().unwrap()), d);
    }
}
