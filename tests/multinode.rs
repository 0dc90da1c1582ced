//! Several berth nodes on one PostgreSQL database and one S3 bucket (a separate s3s-fs
//! server): what one node acknowledges, every node serves; an upload session moves between
//! nodes; racing writers never corrupt a tag or a session; the database going away is a 503,
//! not a restart; schema migrations; the redb -> PostgreSQL copy.

mod common;

use std::io::Read;
use std::sync::Barrier;
use std::time::{Duration, Instant};

use common::pg::PgServer;
use common::*;
use reqwest::blocking::{Client, Response};
use serde_json::json;

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const MIB: usize = 1 << 20;

fn bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    PseudoRandom::new(seed, len as u64)
        .read_exact(&mut v)
        .unwrap();
    v
}

/// `n` nodes on a fresh database of `pg` and on `s3`, started at the same time (their schema
/// migrations race).
fn nodes(pg: &PgServer, s3: &S3Server, n: usize, extra_yaml: &str) -> (String, Vec<Berth>) {
    let db = pg.create_database();
    let yaml = format!("{}{extra_yaml}", pg.metadata_yaml(&db));
    let nodes = std::thread::scope(|scope| {
        let started: Vec<_> = (0..n)
            .map(|_| scope.spawn(|| Berth::start_with(&yaml, Some(s3))))
            .collect();
        started.into_iter().map(|h| h.join().unwrap()).collect()
    });
    (db, nodes)
}

fn location(berth: &Berth, r: &Response) -> String {
    let loc = r.headers()["location"].to_str().unwrap();
    if loc.starts_with("http") {
        loc.to_string()
    } else {
        berth.url(loc)
    }
}

/// The same upload URL on another node.
fn on(berth: &Berth, loc: &str) -> String {
    let path = &loc[loc.find("/v2/").unwrap()..];
    berth.url(path)
}

/// An image of one layer and a config; pushes the blobs through `berth`, returns the manifest
/// and its digest.
fn push_image_blobs(berth: &Berth, c: &Client, repo: &str, seed: u64) -> (Vec<u8>, String) {
    let config = format!("{{\"seed\":{seed}}}").into_bytes();
    let layer = bytes(seed, 64 * 1024 + seed as usize);
    let config_digest = berth.push_blob(c, repo, &config);
    let layer_digest = berth.push_blob(c, repo, &layer);
    let manifest = serde_json::to_vec_pretty(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": config_digest, "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": layer_digest, "size": layer.len()}],
    }))
    .unwrap();
    let digest = sha256_digest(&manifest);
    (manifest, digest)
}

#[track_caller]
fn put_manifest(berth: &Berth, c: &Client, repo: &str, reference: &str, manifest: &[u8]) {
    let r = c
        .put(berth.url(&format!("/v2/{repo}/manifests/{reference}")))
        .header("Content-Type", OCI_MANIFEST)
        .body(manifest.to_vec())
        .send()
        .unwrap();
    assert_eq!(r.status(), 201, "PUT manifest: {}", r.text().unwrap());
}

/// Pulls `repo:reference` and every blob it references through `berth`; returns the manifest
/// digest. Asserts that each blob's bytes have its digest.
#[track_caller]
fn pull(berth: &Berth, c: &Client, repo: &str, reference: &str) -> String {
    let r = c
        .get(berth.url(&format!("/v2/{repo}/manifests/{reference}")))
        .header("Accept", OCI_MANIFEST)
        .send()
        .unwrap();
    assert_eq!(r.status(), 200, "GET {repo}:{reference}");
    let body = r.bytes().unwrap();
    let m: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let mut blobs = vec![m["config"]["digest"].as_str().unwrap().to_string()];
    for l in m["layers"].as_array().unwrap() {
        blobs.push(l["digest"].as_str().unwrap().to_string());
    }
    for d in blobs {
        let r = c
            .get(berth.url(&format!("/v2/{repo}/blobs/{d}")))
            .send()
            .unwrap();
        assert_eq!(r.status(), 200, "GET blob {d}");
        assert_eq!(sha256_digest(&r.bytes().unwrap()), d);
    }
    sha256_digest(&body)
}

#[test]
fn pushed_through_one_node_pulled_through_the_other() {
    let pg = PgServer::shared();
    let s3 = S3Server::start();
    let (_, n) = nodes(pg, &s3, 2, "");
    let (a, b) = (&n[0], &n[1]);
    let c = client();

    let (manifest, digest) = push_image_blobs(a, &c, "team/app", 1);
    put_manifest(a, &c, "team/app", "v1", &manifest);
    // Served by B as soon as A's PUT returned.
    assert_eq!(pull(b, &c, "team/app", "v1"), digest);
    let tags: serde_json::Value = c
        .get(b.url("/v2/team/app/tags/list"))
        .send()
        .unwrap()
        .json_value();
    assert_eq!(tags["tags"], json!(["v1"]));

    // A tag moved on B is seen moved on A; a delete on A is seen on B.
    let (manifest2, digest2) = push_image_blobs(b, &c, "team/app", 2);
    put_manifest(b, &c, "team/app", "v1", &manifest2);
    assert_eq!(pull(a, &c, "team/app", "v1"), digest2);
    let r = c
        .delete(a.url(&format!("/v2/team/app/manifests/{digest2}")))
        .send()
        .unwrap();
    assert_eq!(r.status(), 202);
    let r = c.get(b.url("/v2/team/app/manifests/v1")).send().unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(pull(b, &c, "team/app", &digest), digest);
}

#[test]
fn upload_started_on_one_node_continued_on_the_other_finished_on_the_first() {
    let pg = PgServer::shared();
    let s3 = S3Server::start();
    let (_, n) = nodes(pg, &s3, 2, "upload:\n  part_size: 5MiB\n");
    let (a, b) = (&n[0], &n[1]);
    let c = client();
    let blob = bytes(7, 11 * MIB + 3);
    let digest = sha256_digest(&blob);

    let r = c.post(a.url("/v2/moved/blobs/uploads/")).send().unwrap();
    assert_eq!(r.status(), 202);
    let loc = location(a, &r);
    // A keeps 3 MiB pending (less than a part); B completes part 1 from A's pending bytes and
    // keeps 1 MiB of part 2 pending; A finishes with the rest.
    let cuts = [(a, 0, 3 * MIB), (b, 3 * MIB, 6 * MIB + 1)];
    for (node, start, end) in cuts {
        let r = c
            .patch(on(node, &loc))
            .header("Content-Type", "application/octet-stream")
            .header("Content-Range", format!("{start}-{}", end - 1))
            .body(blob[start..end].to_vec())
            .send()
            .unwrap();
        assert_eq!(
            r.status(),
            202,
            "PATCH {start}..{end}: {}",
            r.text().unwrap()
        );
    }
    let r = c.get(on(a, &loc)).send().unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(r.headers()["range"], format!("0-{}", 6 * MIB));
    let sep = if loc.contains('?') { '&' } else { '?' };
    let r = c
        .put(format!("{}{sep}digest={digest}", on(a, &loc)))
        .header("Content-Type", "application/octet-stream")
        .body(blob[6 * MIB + 1..].to_vec())
        .send()
        .unwrap();
    assert_eq!(r.status(), 201, "PUT: {}", r.text().unwrap());
    let r = c
        .get(b.url(&format!("/v2/moved/blobs/{digest}")))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.bytes().unwrap() == blob, "bytes differ");
}

#[test]
fn four_clients_racing_one_tag_through_both_nodes() {
    let pg = PgServer::shared();
    let s3 = S3Server::start();
    let (_, n) = nodes(pg, &s3, 2, "");
    let barrier = Barrier::new(4);
    let pushed: Vec<String> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..4u64)
            .map(|i| {
                let (node, barrier) = (&n[i as usize % 2], &barrier);
                scope.spawn(move || {
                    let c = client();
                    let (manifest, digest) = push_image_blobs(node, &c, "race", 10 + i);
                    barrier.wait();
                    put_manifest(node, &c, "race", "latest", &manifest);
                    digest
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let c = client();
    let on_a = pull(&n[0], &c, "race", "latest");
    let on_b = pull(&n[1], &c, "race", "latest");
    assert_eq!(on_a, on_b);
    assert!(pushed.contains(&on_a), "{on_a} is none of {pushed:?}");
    // Every image pushed is whole by digest.
    for d in &pushed {
        assert_eq!(pull(&n[1], &c, "race", d), *d);
    }
}

#[test]
fn concurrent_patches_of_one_session_through_both_nodes_never_interleave() {
    let pg = PgServer::shared();
    let s3 = S3Server::start();
    let (_, n) = nodes(pg, &s3, 2, "upload:\n  part_size: 5MiB\n");
    let c = client();
    for round in 0..4u64 {
        let r = c
            .post(n[0].url("/v2/contended/blobs/uploads/"))
            .send()
            .unwrap();
        assert_eq!(r.status(), 202);
        let loc = location(&n[0], &r);
        // Both write bytes 0.. of the session at once, one through each node, each more than
        // a part so that both would upload part 1.
        let bodies = [bytes(100 + round, 6 * MIB), bytes(200 + round, 6 * MIB)];
        let barrier = Barrier::new(2);
        let statuses: Vec<u16> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..2)
                .map(|i| {
                    let (node, body, loc, barrier) = (&n[i], &bodies[i], &loc, &barrier);
                    scope.spawn(move || {
                        let c = client();
                        barrier.wait();
                        let r = c
                            .patch(on(node, loc))
                            .header("Content-Type", "application/octet-stream")
                            .header("Content-Range", format!("0-{}", body.len() - 1))
                            .body(body.clone())
                            .send();
                        // Refused before the body was sent: berth answers and closes the
                        // connection, which the client may see as a send error.
                        r.map_or(0, |r| r.status().as_u16())
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let winners: Vec<usize> = (0..2).filter(|i| statuses[*i] == 202).collect();
        assert_eq!(winners.len(), 1, "round {round}: statuses {statuses:?}");
        let loser = statuses[1 - winners[0]];
        assert!(
            [0, 409, 416, 503].contains(&loser),
            "round {round}: loser answered {loser}"
        );
        // The session holds exactly the winner's bytes: finishing with their digest works
        // and the blob pulls byte-identical.
        let body = &bodies[winners[0]];
        let digest = sha256_digest(body);
        let sep = if loc.contains('?') { '&' } else { '?' };
        let r = c
            .put(format!("{}{sep}digest={digest}", on(&n[1], &loc)))
            .send()
            .unwrap();
        assert_eq!(r.status(), 201, "round {round}: PUT: {}", r.text().unwrap());
        let got = c
            .get(n[0].url(&format!("/v2/contended/blobs/{digest}")))
            .send()
            .unwrap()
            .bytes()
            .unwrap();
        assert!(got == *body, "round {round}: bytes differ");
    }
}

#[test]
fn node_killed_mid_patch_the_client_continues_on_another() {
    let pg = PgServer::shared();
    let s3 = S3Server::start();
    let (_, mut n) = nodes(pg, &s3, 2, "upload:\n  part_size: 5MiB\n");
    let c = client();
    let blob = bytes(9, 14 * MIB);
    let digest = sha256_digest(&blob);
    let r = c
        .post(n[0].url("/v2/survivor/blobs/uploads/"))
        .send()
        .unwrap();
    let loc = location(&n[0], &r);
    // 2 MiB committed on A, then a PATCH that A never finishes: its body stalls after 11 MiB
    // until A is killed (a part is committed when the next one starts: part 1 is).
    let r = c
        .patch(on(&n[0], &loc))
        .header("Content-Range", format!("0-{}", 2 * MIB - 1))
        .body(blob[..2 * MIB].to_vec())
        .send()
        .unwrap();
    assert_eq!(r.status(), 202);
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    struct Stalling {
        data: Vec<u8>,
        at: usize,
        stop_at: usize,
        release: std::sync::mpsc::Receiver<()>,
    }
    impl Read for Stalling {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            if self.at == self.stop_at {
                let _ = self.release.recv();
                return Err(std::io::Error::other("client gave up"));
            }
            let n = buf.len().min(self.stop_at - self.at);
            buf[..n].copy_from_slice(&self.data[self.at..self.at + n]);
            self.at += n;
            Ok(n)
        }
    }
    let stalled = Stalling {
        data: blob.clone(),
        at: 2 * MIB,
        stop_at: 11 * MIB,
        release: rx,
    };
    let url = on(&n[0], &loc);
    let stuck = std::thread::spawn(move || {
        let _ = client()
            .patch(url)
            .body(reqwest::blocking::Body::new(stalled))
            .send();
    });
    // Part 1 (bytes 0..5 MiB) gets committed by A while the body stalls.
    let deadline = Instant::now() + Duration::from_secs(30);
    let committed = loop {
        let r = c.get(on(&n[1], &loc)).send().unwrap();
        let range = r.headers()["range"].to_str().unwrap().to_string();
        let end: usize = range.split('-').nth(1).unwrap().parse().unwrap();
        if end + 1 >= 5 * MIB {
            break end + 1;
        }
        assert!(
            Instant::now() < deadline,
            "A never committed part 1: {range}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    n[0].kill();
    drop(tx);
    stuck.join().unwrap();
    // The client goes on from the committed offset on B. A's claim on the session lapses
    // (it cannot be released by a dead node): until then B says the session is busy.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = c
            .patch(on(&n[1], &loc))
            .header("Content-Range", format!("{committed}-{}", blob.len() - 1))
            .body(blob[committed..].to_vec())
            .send();
        match r.as_ref().map(|r| r.status().as_u16()) {
            Ok(202) => break,
            // Busy (the connection may close before the whole body is sent).
            Ok(409) | Err(_) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(500))
            }
            other => panic!("PATCH on B: {other:?}"),
        }
    }
    let sep = if loc.contains('?') { '&' } else { '?' };
    let r = c
        .put(format!("{}{sep}digest={digest}", on(&n[1], &loc)))
        .send()
        .unwrap();
    assert_eq!(r.status(), 201, "PUT: {}", r.text().unwrap());
    let got = c
        .get(n[1].url(&format!("/v2/survivor/blobs/{digest}")))
        .send()
        .unwrap()
        .bytes()
        .unwrap();
    assert!(got == blob, "bytes differ");
}

/// Polls `url` until it answers `status`.
#[track_caller]
fn wait_status(c: &Client, url: &str, status: u16, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let got = c.get(url).send().map(|r| r.status().as_u16());
        if got.as_ref().ok() == Some(&status) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{url}: {got:?}, expected {status}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn database_down_is_503_and_berth_recovers_without_a_restart() {
    let pg = PgServer::start();
    let s3 = S3Server::start();
    let ops = free_port();
    let (_, n) = nodes(
        &pg,
        &s3,
        1,
        &format!("metrics:\n  listen: 127.0.0.1:{ops}\n"),
    );
    let node = &n[0];
    let c = client();
    let readyz = format!("http://127.0.0.1:{ops}/readyz");
    wait_status(&c, &readyz, 200, Duration::from_secs(10));

    let mut acknowledged = Vec::new();
    for round in 0..3u64 {
        let (manifest, digest) = push_image_blobs(node, &c, "loop", 50 + round);
        put_manifest(node, &c, "loop", &format!("r{round}"), &manifest);
        acknowledged.push((format!("r{round}"), digest));
        for (tag, digest) in &acknowledged {
            assert_eq!(pull(node, &c, "loop", tag), *digest);
        }
        if round == 1 {
            pg.stop();
            let r = c.get(node.url("/v2/loop/manifests/r0")).send().unwrap();
            assert_eq!(r.status(), 503, "{}", r.text().unwrap());
            assert!(r.headers().contains_key("retry-after"));
            assert_eq!(error_code(&r.text().unwrap()), "UNAVAILABLE");
            let r = c.post(node.url("/v2/loop/blobs/uploads/")).send().unwrap();
            assert_eq!(r.status(), 503);
            wait_status(&c, &readyz, 503, Duration::from_secs(15));
            pg.restart();
            wait_status(&c, &readyz, 200, Duration::from_secs(15));
        }
    }
    for (tag, digest) in &acknowledged {
        assert_eq!(pull(node, &c, "loop", tag), *digest);
    }
    // The pool's gauges are exported.
    let metrics = c
        .get(format!("http://127.0.0.1:{ops}/metrics"))
        .send()
        .unwrap()
        .text()
        .unwrap();
    for series in [
        "berth_metadata_pool_connections{state=\"in_use\"}",
        "berth_metadata_pool_connections{state=\"idle\"}",
        "berth_metadata_pool_waiting",
        "berth_metadata_pool_max_connections 16",
        "berth_metadata_operation_duration_seconds_count{operation=\"tagged_manifest\"}",
    ] {
        assert!(metrics.contains(series), "{series} not in /metrics");
    }
}

fn berth_command(args: &[&str], env: &[(&str, &str)]) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_berth"))
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn migrations_fresh_up_to_date_and_newer_refused() {
    let pg = PgServer::shared();
    let db = pg.create_database();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("berth.yaml");
    std::fs::write(
        &config,
        "metadata:\n  backend: postgres\n  postgres:\n    url: _env:BERTH_PG_URL\n",
    )
    .unwrap();
    let config = config.to_str().unwrap();
    let url = pg.url(&db);
    let env = [("BERTH_PG_URL", url.as_str())];

    let (ok, out) = berth_command(&["migrate", "--config", config], &env);
    assert!(ok, "{out}");
    assert!(out.contains("schema version 0 -> 3"), "{out}");
    let tables = pg.sql(
        &db,
        "SELECT count(*) FROM pg_tables WHERE schemaname = 'public' AND tablename IN \
         ('blobs','repo_blobs','manifests','tags','referrers','repositories','uploads','upload_pending','claims',\
          'manifest_references','gc_queue','journal_watermark','journal_order')",
    );
    assert_eq!(tables, "13");
    let (ok, out) = berth_command(&["migrate", "--config", config], &env);
    assert!(ok, "{out}");
    assert!(out.contains("up to date"), "{out}");

    // A newer berth migrated the database: this one refuses it, to migrate and to serve.
    pg.sql(
        &db,
        "INSERT INTO berth_schema_migrations (version, name) VALUES (99, 'from the future')",
    );
    let (ok, out) = berth_command(&["migrate", "--config", config], &env);
    assert!(!ok);
    assert!(
        out.contains("schema is version 99, newer than this berth knows (3)"),
        "{out}"
    );
    let (status, log) =
        Berth::start_expecting_exit(&pg.metadata_yaml(&db), None, Duration::from_secs(20))
            .expect("berth must refuse to start");
    assert!(!status.success());
    assert!(log.contains("newer than this berth knows"), "{log}");

    // check-config never prints the password.
    let env = [("BERTH_PG_URL", "postgres://berth:hunter2@127.0.0.1:1/x")];
    let (ok, out) = berth_command(&["check-config", "--config", config], &env);
    assert!(ok, "{out}");
    assert!(!out.contains("hunter2"), "{out}");
    assert!(out.contains("<redacted>"), "{out}");
}

#[test]
fn redb_metadata_copied_to_postgres_pulls_through_the_new_nodes() {
    let pg = PgServer::shared();
    let s3 = S3Server::start();
    let c = client();
    let mut old = Berth::start_with(
        "metadata:\n  backend: redb\nupload:\n  part_size: 5MiB\n",
        Some(&s3),
    );
    let mut images = Vec::new();
    for (i, repo) in ["lib/a", "lib/a", "lib/b"].iter().enumerate() {
        let (manifest, digest) = push_image_blobs(&old, &c, repo, 70 + i as u64);
        put_manifest(&old, &c, repo, &format!("t{i}"), &manifest);
        images.push((repo.to_string(), format!("t{i}"), digest));
    }
    // An open session with committed pending bytes, to be finished after the move.
    let blob = bytes(77, 2 * MIB + 5);
    let r = c.post(old.url("/v2/lib/b/blobs/uploads/")).send().unwrap();
    let loc = location(&old, &r);
    let r = c
        .patch(&loc)
        .header("Content-Range", format!("0-{}", MIB - 1))
        .body(blob[..MIB].to_vec())
        .send()
        .unwrap();
    assert_eq!(r.status(), 202);
    let redb = old.data_dir.path().join("data/meta.redb");
    old.kill();

    let db = pg.create_database();
    let to = format!("postgres:{}", pg.url(&db));
    let from = format!("redb:{}", redb.display());
    for _ in 0..2 {
        let (ok, out) = berth_command(&["metadata", "copy", "--from", &from, "--to", &to], &[]);
        assert!(ok, "{out}");
        assert!(out.contains("2 repositories"), "{out}");
        assert!(out.contains("3 manifests, 3 tags"), "{out}");
        assert!(out.contains("1 upload sessions"), "{out}");
    }
    let new = Berth::start_with(&pg.metadata_yaml(&db), Some(&s3));
    for (repo, tag, digest) in &images {
        assert_eq!(pull(&new, &c, repo, tag), *digest);
    }
    let r = c
        .patch(on(&new, &loc))
        .header("Content-Range", format!("{MIB}-{}", blob.len() - 1))
        .body(blob[MIB..].to_vec())
        .send()
        .unwrap();
    assert_eq!(r.status(), 202, "{}", r.text().unwrap());
    let digest = sha256_digest(&blob);
    let sep = if loc.contains('?') { '&' } else { '?' };
    let r = c
        .put(format!("{}{sep}digest={digest}", on(&new, &loc)))
        .send()
        .unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().unwrap());
    drop(old);
}

/// Two nodes with `gc.interval` on one database: one node collects at a time (the pass claim),
/// and each decision is one transaction, so every freed blob is deleted once — one
/// "deleted blob" line across both nodes' logs — its object leaves the bucket, and the images
/// kept still pull through either node.
#[test]
fn two_collecting_nodes_delete_each_freed_blob_once() {
    let pg = PgServer::shared();
    let s3 = S3Server::start();
    let (_, n) = nodes(pg, &s3, 2, "gc:\n  interval: 100ms\n  blob_grace: 1s\n");
    let c = client();
    let mut images = Vec::new();
    for i in 0..8u64 {
        let node = &n[i as usize % 2];
        let repo = format!("gc/app{}", i % 3);
        let (manifest, digest) = push_image_blobs(node, &c, &repo, 100 + i);
        put_manifest(node, &c, &repo, &format!("v{i}"), &manifest);
        let m: serde_json::Value = serde_json::from_slice(&manifest).unwrap();
        let blobs = [&m["config"]["digest"], &m["layers"][0]["digest"]]
            .map(|d| d.as_str().unwrap().to_string());
        images.push((repo, format!("v{i}"), digest, blobs));
    }
    // Delete every other image, each through the node that did not push it.
    let (deleted, kept): (Vec<_>, Vec<_>) = images
        .into_iter()
        .partition(|(_, tag, _, _)| tag[1..].parse::<u64>().unwrap() % 2 == 0);
    let before = s3.blob_files().len();
    for (i, (repo, _, digest, _)) in deleted.iter().enumerate() {
        let r = c
            .delete(n[(i + 1) % 2].url(&format!("/v2/{repo}/manifests/{digest}")))
            .send()
            .unwrap();
        assert_eq!(r.status(), 202);
    }
    // Every image's blobs are its own (seeded config and layer): all of the deleted ones go.
    let freed: Vec<&String> = deleted.iter().flat_map(|(.., b)| b).collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    while s3.blob_files().len() > before - freed.len() {
        assert!(
            Instant::now() < deadline,
            "freed blobs still in the bucket after 30 s"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // A few more passes on both nodes: nothing is collected twice.
    std::thread::sleep(Duration::from_millis(1500));
    let logs = [n[0].log(), n[1].log()];
    for d in &freed {
        let lines: usize = logs
            .iter()
            .map(|log| {
                log.lines()
                    .filter(|l| l.contains("gc: deleted blob") && l.contains(d.as_str()))
                    .count()
            })
            .sum();
        assert_eq!(
            lines, 1,
            "{d} deleted {lines} times:\n{}\n{}",
            logs[0], logs[1]
        );
    }
    assert_eq!(s3.blob_files().len(), before - freed.len());
    for (repo, tag, digest, _) in &kept {
        assert_eq!(pull(&n[0], &c, repo, tag), *digest);
        assert_eq!(pull(&n[1], &c, repo, tag), *digest);
    }
}

trait JsonBody {
    fn json_value(self) -> serde_json::Value;
}

impl JsonBody for Response {
    fn json_value(self) -> serde_json::Value {
        serde_json::from_str(&self.text().unwrap()).unwrap()
    }
}

/// The digest `repo:tag` resolves to through `berth`, None when the tag is not there.
#[track_caller]
fn tag_digest(berth: &Berth, c: &Client, repo: &str, tag: &str) -> Option<String> {
    let r = c
        .get(berth.url(&format!("/v2/{repo}/manifests/{tag}")))
        .header("Accept", OCI_MANIFEST)
        .send()
        .unwrap();
    match r.status().as_u16() {
        200 => Some(sha256_digest(&r.bytes().unwrap())),
        404 => None,
        s => panic!("GET {repo}:{tag}: {s}: {}", r.text().unwrap()),
    }
}

/// `berth recover` into a new, empty database of `pg` from `s3`'s bucket; returns a node
/// started on it afterwards, and what recover printed.
fn recover_into_new_database(pg: &PgServer, s3: &S3Server) -> (Berth, String, String) {
    let db = pg.create_database();
    let mut b = Berth::stopped_with(&pg.metadata_yaml(&db), Some(s3));
    let (status, out) = b.recover();
    assert!(status.success(), "berth recover: {status}\n{out}");
    assert!(out.contains("recovered in"), "{out}");
    b.start_again();
    (b, db, out)
}

/// Two nodes, each tag raced by a client on each node with different manifests (and some by a
/// delete): records of the same tag from the two nodes are in the bucket in the order the
/// database committed them, so a rebuild from the bucket gives every tag the digest the
/// database has.
#[test]
fn tags_raced_through_two_nodes_rebuild_to_what_the_database_has() {
    const TAGS: usize = 40;
    const ROUNDS: usize = 3;
    let pg = PgServer::shared();
    let s3 = S3Server::start();
    let (_, n) = nodes(pg, &s3, 2, "");
    let repo = "twin/app";
    // Two images per tag, their blobs pushed before the race.
    let images: Vec<[(Vec<u8>, String); 2]> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..TAGS)
            .map(|i| {
                let n = &n;
                scope.spawn(move || {
                    let c = client();
                    let seed = 1000 + 2 * i as u64;
                    [
                        push_image_blobs(&n[0], &c, repo, seed),
                        push_image_blobs(&n[1], &c, repo, seed + 1),
                    ]
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for round in 0..ROUNDS {
        // Every third tag is also deleted, through either node, while the puts race.
        let deletes = (0..TAGS).filter(|i| (i + round) % 3 == 0).count();
        let barrier = Barrier::new(2 * TAGS + deletes);
        std::thread::scope(|scope| {
            for (i, pair) in images.iter().enumerate() {
                let tag = format!("t{i}");
                for (side, (manifest, _)) in pair.iter().enumerate() {
                    let (node, barrier, tag) = (&n[(side + round) % 2], &barrier, tag.clone());
                    scope.spawn(move || {
                        let c = client();
                        barrier.wait();
                        put_manifest(node, &c, repo, &tag, manifest);
                    });
                }
                if (i + round) % 3 == 0 {
                    let (node, barrier) = (&n[(i + round) % 2], &barrier);
                    scope.spawn(move || {
                        let c = client();
                        barrier.wait();
                        let r = c
                            .delete(node.url(&format!("/v2/{repo}/manifests/{tag}")))
                            .send()
                            .unwrap();
                        // 404: the delete came before both puts.
                        assert!(
                            [202, 404].contains(&r.status().as_u16()),
                            "DELETE {tag}: {}",
                            r.status()
                        );
                    });
                }
            }
        });
    }
    let c = client();
    let expected: Vec<Option<String>> = (0..TAGS)
        .map(|i| {
            let tag = format!("t{i}");
            let on_a = tag_digest(&n[0], &c, repo, &tag);
            assert_eq!(on_a, tag_digest(&n[1], &c, repo, &tag), "{tag}");
            if let Some(d) = &on_a {
                assert!(
                    images[i].iter().any(|(_, pushed)| pushed == d),
                    "{tag}: {d}"
                );
            }
            on_a
        })
        .collect();
    assert!(expected.iter().any(Option::is_some), "every tag deleted");

    let (rebuilt, _, _) = recover_into_new_database(pg, &s3);
    let mismatched: Vec<String> = (0..TAGS)
        .filter_map(|i| {
            let tag = format!("t{i}");
            let got = tag_digest(&rebuilt, &c, repo, &tag);
            (got != expected[i])
                .then(|| format!("{tag}: database {:?}, rebuilt {got:?}", expected[i]))
        })
        .collect();
    assert!(
        mismatched.is_empty(),
        "{} of {TAGS} tags differ after the rebuild:\n{}",
        mismatched.len(),
        mismatched.join("\n")
    );
    for (i, d) in expected.iter().enumerate() {
        if let Some(d) = d {
            assert_eq!(pull(&rebuilt, &c, repo, &format!("t{i}")), *d);
        }
    }
}

/// `berth recover` into an empty PostgreSQL database, and berth rebuilding one by itself when
/// it starts on an empty database: the images pull; a database that is not empty is refused.
#[test]
fn recover_into_postgres_and_rebuild_at_start() {
    let pg = PgServer::shared();
    let s3 = S3Server::start();
    let (_, n) = nodes(pg, &s3, 1, "");
    let c = client();
    let mut images = Vec::new();
    for i in 0..3u64 {
        let repo = format!("rec/app{}", i % 2);
        let (manifest, digest) = push_image_blobs(&n[0], &c, &repo, 300 + i);
        put_manifest(&n[0], &c, &repo, &format!("v{i}"), &manifest);
        images.push((repo, format!("v{i}"), digest));
    }
    let r = c
        .delete(n[0].url("/v2/rec/app0/manifests/v0"))
        .send()
        .unwrap();
    assert_eq!(r.status(), 202);

    let (mut rebuilt, db, out) = recover_into_new_database(pg, &s3);
    assert!(
        out.contains(&format!("PostgreSQL database \"{db}\"")),
        "{out}"
    );
    assert!(out.contains("2 repositories"), "{out}");
    assert_eq!(tag_digest(&rebuilt, &c, "rec/app0", "v0"), None);
    // Every stripe's next record sorts after the newest record replayed, whatever the clock of
    // the node that writes it.
    let newest = s3
        .journal_files()
        .iter()
        .filter_map(|f| {
            // .../journal/<time>-<node>-<seq>/<what>
            let mut parts = f.iter().skip_while(|p| *p != "journal");
            let unique = parts.nth(1)?.to_str()?;
            Some(unique.get(..24)?.to_owned())
        })
        .max()
        .unwrap();
    let order = pg.sql(
        &db,
        &format!(
            "SELECT count(*), bool_and(last_ms > extract(epoch FROM '{newest}'::timestamptz) * 1000) \
             FROM journal_order"
        ),
    );
    assert_eq!(order, "1024|t", "newest record {newest}");
    for (repo, tag, digest) in &images[1..] {
        assert_eq!(pull(&rebuilt, &c, repo, tag), *digest);
    }
    // The rebuilt database is not fresh any more: a second recover into it is refused.
    rebuilt.kill();
    let (status, out) = rebuilt.recover();
    assert!(!status.success(), "{out}");
    assert!(out.contains("is not empty"), "{out}");
    assert!(out.contains(&db), "{out}");
    assert!(
        !out.contains("postgres://"),
        "the URL is not printed: {out}"
    );

    // A node started on an empty database with records in the bucket rebuilds it by itself.
    let started = Berth::start_with(&pg.metadata_yaml(&pg.create_database()), Some(&s3));
    assert!(
        started.log().contains("rebuilding it from the bucket"),
        "{}",
        started.log()
    );
    assert_eq!(tag_digest(&started, &c, "rec/app0", "v0"), None);
    for (repo, tag, digest) in &images[1..] {
        assert_eq!(pull(&started, &c, repo, tag), *digest);
    }
}

/// The bucket journal's records of `repo:tag`, as (key, time) in key order.
fn tag_records(s3: &S3Server, repo: &str, tag: &str) -> Vec<(String, String)> {
    let bucket = s3.root.path().join(S3_BUCKET);
    let mut out: Vec<(String, String)> = s3
        .journal_files()
        .iter()
        .filter_map(|f| {
            let key = f.strip_prefix(&bucket).ok()?.to_str()?.to_owned();
            // berth/journal/<time>-<node>-<seq>/manifest/<repo>:<tag>@<digest>
            let (unique, what) = key.strip_prefix("berth/journal/")?.split_once('/')?;
            let (named, _) = what.strip_prefix("manifest/")?.split_once('@')?;
            let time = unique.get(..24)?.to_owned();
            (named == format!("{repo}:{tag}")).then_some((key, time))
        })
        .collect();
    out.sort();
    out
}

/// Issue 15, "two writers": a node that starts while another serves catches up from the
/// bucket journal on the shared database, and must not put back what an older record says
/// over a newer write another node committed to the same tag. Here A's catch-up sees A's
/// record of t -> M1 but not B's later record of t -> M2 (removed from the bucket: as if A
/// listed the journal just before B wrote it, and replayed t -> M1 after B's commit). A record
/// whose items nobody wrote since is still applied (a crash between record and commit is
/// still repaired).
#[test]
fn catch_up_keeps_a_newer_write_of_another_node() {
    use berth::config::{Config, Overrides};
    use berth::meta::journal::Op;
    use berth::storage::{ObjectBody, ObjectStore};

    let pg = PgServer::shared();
    let s3 = S3Server::start();
    let (_, mut n) = nodes(pg, &s3, 2, "");
    let c = client();
    let repo = "two/writers";
    let (m1, d1) = push_image_blobs(&n[0], &c, repo, 401);
    let (m2, d2) = push_image_blobs(&n[1], &c, repo, 402);
    put_manifest(&n[0], &c, repo, "t", &m1);
    put_manifest(&n[1], &c, repo, "t", &m2);
    assert_eq!(tag_digest(&n[0], &c, repo, "t").as_deref(), Some(&*d2));
    n[0].kill();

    let records = tag_records(&s3, repo, "t");
    assert_eq!(records.len(), 2, "{records:?}");
    let ((older, t1), (newer, _)) = (&records[0], &records[1]);
    assert!(older.ends_with(&d1) && newer.ends_with(&d2), "{records:?}");
    let cfg = Config::from_yaml(&s3.storage_yaml(), &Overrides::default(), &|_| None).unwrap();
    let store = ObjectStore::new(&cfg.storage).unwrap();
    // A record of u -> M1 whose commit never happened (its node died in between), from the
    // time of A's record.
    let planted = Op::PutManifest {
        repo: repo.into(),
        digest: d1.clone(),
        media_type: OCI_MANIFEST.into(),
        subject: None,
        tag: Some("u".into()),
        referrer: None,
    };
    let planted_key = format!("berth/journal/{t1}-deadbeef-00000001/manifest/{repo}:u");
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            store.delete_object(newer).await?;
            store
                .put_object(&planted_key, ObjectBody::Bytes(planted.encode(&m1)))
                .await
        })
        .unwrap();
    assert_eq!(tag_records(&s3, repo, "t").len(), 1);

    n[0].start_again();
    for node in &n {
        assert_eq!(pull(node, &c, repo, "t"), d2, "t on {}", node.url(""));
        assert_eq!(pull(node, &c, repo, "u"), d1, "u on {}", node.url(""));
    }
    let log = n[0].log();
    assert!(log.contains("caught up from the bucket"), "{log}");
    assert!(log.contains("superseded by newer writes"), "{log}");
}
