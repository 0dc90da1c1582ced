//! ObjectStore against a real S3 server (the embedded s3s-fs on a loopback port), plus a fake
//! server for the retry policy.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::client::RetryPolicy;
use super::embedded::{EmbeddedOptions, EmbeddedS3};
use super::*;
use crate::config::{BlobServing, StorageConfig};

const BUCKET: &str = "registry";

struct Env {
    dir: tempfile::TempDir,
    s3: EmbeddedS3,
    counter: Arc<AtomicU64>,
}

impl Env {
    fn start() -> Env {
        let dir = tempfile::tempdir().unwrap();
        let (ak, sk) = EmbeddedS3::random_keys();
        let counter = Arc::new(AtomicU64::new(0));
        let s3 = start_on(dir.path(), &ak, &sk, Some(counter.clone()));
        Env { dir, s3, counter }
    }

    fn cfg(&self) -> StorageConfig {
        cfg(
            &self.s3.endpoint,
            BUCKET,
            &self.s3.access_key,
            &self.s3.secret_key,
        )
    }

    fn store(&self) -> ObjectStore {
        ObjectStore::new(&self.cfg()).unwrap()
    }

    fn count(&self) -> u64 {
        self.counter.load(Ordering::SeqCst)
    }
}

fn start_on(
    root: &std::path::Path,
    ak: &str,
    sk: &str,
    counter: Option<Arc<AtomicU64>>,
) -> EmbeddedS3 {
    EmbeddedS3::start(EmbeddedOptions {
        root: root.to_path_buf(),
        bucket: BUCKET.into(),
        listen: "127.0.0.1:0".parse().unwrap(),
        access_key: ak.into(),
        secret_key: sk.into(),
        request_counter: counter,
        refuse_writes: None,
    })
    .unwrap()
}

fn cfg(endpoint: &str, bucket: &str, ak: &str, sk: &str) -> StorageConfig {
    StorageConfig {
        endpoint: Some(endpoint.into()),
        region: "us-east-1".into(),
        bucket: bucket.into(),
        prefix: "berth/".into(),
        access_key: ak.into(),
        secret_key: sk.into(),
        path_style: true,
        blob_serving: BlobServing::Proxy,
        presign_ttl: Duration::from_secs(900),
        ca_bundle: None,
        coalesce_window: crate::config::DEFAULT_COALESCE_WINDOW,
    }
}

fn http() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder().no_proxy().build().unwrap()
}

async fn get(store: &ObjectStore, key: &str) -> (u16, Bytes) {
    let p = store
        .presign(&http::Method::GET, key, Duration::from_secs(60))
        .unwrap();
    let r = http().get(&p.url).send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.bytes().await.unwrap())
}

fn pattern(len: usize, seed: u8) -> Bytes {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect::<Vec<u8>>()
        .into()
}

/// A Stream body fed from a task in uneven chunks.
fn stream_body(data: Bytes, chunk: usize) -> ObjectBody {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let len = data.len() as u64;
    tokio::spawn(async move {
        let mut off = 0;
        while off < data.len() {
            let end = (off + chunk).min(data.len());
            if tx.send(Ok(data.slice(off..end))).await.is_err() {
                return;
            }
            off = end;
        }
    });
    ObjectBody::Stream { len, chunks: rx }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_ok_and_the_counter_counts_one_request() {
    let env = Env::start();
    let store = env.store();
    assert_eq!(env.count(), 0);
    store.check().await.unwrap();
    assert_eq!(env.count(), 1, "HeadBucket is one request");
    let p = store
        .presign(&http::Method::GET, "k", Duration::from_secs(60))
        .unwrap();
    assert!(p
        .url
        .starts_with(&format!("{}/{BUCKET}/k?", env.s3.endpoint)));
    assert_eq!(store.blob_key("u1"), "berth/blobs/u1");
    assert!(env.dir.path().join(BUCKET).is_dir());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_with_a_wrong_secret_is_access_denied() {
    let env = Env::start();
    let mut c = env.cfg();
    c.secret_key = "not-the-secret".into();
    let err = ObjectStore::new(&c).unwrap().check().await.unwrap_err();
    assert!(matches!(err, StorageError::AccessDenied { .. }), "{err:?}");
    let mut c = env.cfg();
    c.access_key = "UNKNOWNKEY".into();
    let err = ObjectStore::new(&c).unwrap().check().await.unwrap_err();
    assert!(matches!(err, StorageError::AccessDenied { .. }), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_on_a_missing_bucket_is_no_such_bucket() {
    let env = Env::start();
    let mut c = env.cfg();
    c.bucket = "missing-bucket".into();
    let err = ObjectStore::new(&c).unwrap().check().await.unwrap_err();
    match err {
        StorageError::NoSuchBucket { bucket } => assert_eq!(bucket, "missing-bucket"),
        e => panic!("{e:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_on_a_closed_port_is_unreachable() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let c = cfg(&format!("http://127.0.0.1:{port}"), BUCKET, "ak", "sk");
    let t = Instant::now();
    let err = ObjectStore::new(&c).unwrap().check().await.unwrap_err();
    assert!(matches!(err, StorageError::Unreachable { .. }), "{err:?}");
    // The message reaches logs: no presigned query string (a credential) in it.
    let text = err.to_string();
    assert!(
        !text.contains("X-Amz-Signature") && !text.contains("X-Amz-Credential"),
        "{text}"
    );
    // Retried: 100 ms + 200 ms of backoff at least.
    assert!(
        t.elapsed() >= Duration::from_millis(300),
        "{:?}",
        t.elapsed()
    );
    assert!(
        err.to_string().contains(&format!("127.0.0.1:{port}")),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_rejects_bad_endpoints() {
    let mut c = cfg("http://127.0.0.1:1", BUCKET, "ak", "sk");
    c.endpoint = None;
    assert!(ObjectStore::new(&c).is_err());
    c.endpoint = Some("ftp://127.0.0.1".into());
    assert!(ObjectStore::new(&c).is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_bytes_and_stream_then_get_the_presigned_url() {
    let env = Env::start();
    let store = env.store();

    let key = store.blob_key("a b+c=d&é");
    store
        .put_object(&key, ObjectBody::Bytes(Bytes::from_static(b"hello, world")))
        .await
        .unwrap();
    assert_eq!(env.count(), 1);
    let (status, body) = get(&store, &key).await;
    assert_eq!(status, 200);
    assert_eq!(&body[..], b"hello, world");

    let data = pattern(3 * 1024 * 1024 + 17, 7);
    let key2 = store.blob_key("streamed");
    store
        .put_object(&key2, stream_body(data.clone(), 64 * 1024 + 3))
        .await
        .unwrap();
    let (status, body) = get(&store, &key2).await;
    assert_eq!(status, 200);
    assert_eq!(body.len(), data.len());
    assert!(body == data);

    // An empty object.
    let key3 = store.blob_key("empty");
    store
        .put_object(&key3, ObjectBody::Bytes(Bytes::new()))
        .await
        .unwrap();
    let (status, body) = get(&store, &key3).await;
    assert_eq!((status, body.len()), (200, 0));

    // HEAD needs its own presigned URL (the method is signed).
    let head = store
        .presign(&http::Method::HEAD, &key2, Duration::from_secs(60))
        .unwrap();
    let r = http().head(&head.url).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(
        r.headers()[http::header::CONTENT_LENGTH].to_str().unwrap(),
        data.len().to_string()
    );
    let get_url = store
        .presign(&http::Method::GET, &key2, Duration::from_secs(60))
        .unwrap();
    let r = http().head(&get_url.url).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 403);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_shorter_or_longer_than_declared_fails_and_stores_nothing() {
    let env = Env::start();
    let store = env.store();
    let key = store.blob_key("short");
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(Ok(Bytes::from_static(b"12345"))).await.unwrap();
    drop(tx);
    let err = store
        .put_object(
            &key,
            ObjectBody::Stream {
                len: 10,
                chunks: rx,
            },
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, StorageError::Failed { status: 0, .. }),
        "{err:?}"
    );
    assert_eq!(get(&store, &key).await.0, 404);

    let key = store.blob_key("long");
    let err = store
        .put_object(&key, stream_body(pattern(100, 1), 30).with_len(50))
        .await
        .unwrap_err();
    assert!(
        matches!(err, StorageError::Failed { status: 0, .. }),
        "{err:?}"
    );
    assert_eq!(get(&store, &key).await.0, 404);

    // An error from the producer aborts the request too.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(Ok(Bytes::from_static(b"12345"))).await.unwrap();
    tx.send(Err(std::io::Error::other("client went away")))
        .await
        .unwrap();
    let key = store.blob_key("broken");
    assert!(store
        .put_object(
            &key,
            ObjectBody::Stream {
                len: 10,
                chunks: rx
            }
        )
        .await
        .is_err());
    assert_eq!(get(&store, &key).await.0, 404);
}

impl ObjectBody {
    fn with_len(self, new_len: u64) -> ObjectBody {
        match self {
            ObjectBody::Stream { chunks, .. } => ObjectBody::Stream {
                len: new_len,
                chunks,
            },
            b => b,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_or_expired_presigned_urls_get_403() {
    let env = Env::start();
    let store = env.store();
    let key = store.blob_key("signed");
    store
        .put_object(&key, ObjectBody::Bytes(Bytes::from_static(b"x")))
        .await
        .unwrap();

    let p = store
        .presign(&http::Method::GET, &key, Duration::from_secs(60))
        .unwrap();
    assert_eq!(
        http().get(&p.url).send().await.unwrap().status().as_u16(),
        200
    );
    // Flip the last hex digit of the signature.
    let mut tampered = p.url.clone();
    let last = tampered.pop().unwrap();
    tampered.push(if last == '0' { '1' } else { '0' });
    assert_eq!(
        http()
            .get(&tampered)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16(),
        403
    );
    // Another key under the same signature.
    let other = p.url.replace("/blobs/signed?", "/blobs/signed2?");
    assert_eq!(
        http().get(&other).send().await.unwrap().status().as_u16(),
        403
    );
    // A Host header other than the signed one.
    let r = http()
        .get(&p.url)
        .header(http::header::HOST, "localhost")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 403);

    let p = store
        .presign(&http::Method::GET, &key, Duration::from_secs(1))
        .unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        http().get(&p.url).send().await.unwrap().status().as_u16(),
        403
    );
}

/// `get_stream`: status and headers as the object store sent them, the body in chunks; a
/// Range is passed on; a missing key is the object store's 404, not an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_stream_whole_range_and_missing() {
    let env = Env::start();
    let store = env.store();
    let key = store.blob_key("streamed");
    let data = pattern(3 * 1024 * 1024 + 7, 9);
    store
        .put_object(&key, ObjectBody::Bytes(data.clone()))
        .await
        .unwrap();

    let mut o = store.get_stream(&key, None).await.unwrap();
    assert_eq!(o.status(), 200);
    assert_eq!(
        o.headers()["content-length"],
        data.len().to_string().as_str()
    );
    let mut got = Vec::new();
    while let Some(chunk) = o.chunk().await.unwrap() {
        got.extend_from_slice(&chunk);
    }
    assert!(got == data, "streamed bytes differ");

    let range = http::HeaderValue::from_static("bytes=10-19");
    let mut o = store.get_stream(&key, Some(&range)).await.unwrap();
    assert_eq!(o.status(), 206);
    let mut got = Vec::new();
    while let Some(chunk) = o.chunk().await.unwrap() {
        got.extend_from_slice(&chunk);
    }
    assert_eq!(got, &data[10..20]);

    let o = store
        .get_stream(&store.blob_key("absent"), None)
        .await
        .unwrap();
    assert_eq!(o.status(), 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multipart_upload_round_trip() {
    let env = Env::start();
    let store = env.store();
    let key = store.blob_key("multi");
    let part1 = pattern(5 * 1024 * 1024, 3);
    let part2 = pattern(777_777, 9);

    let before = env.count();
    let id = store.create_multipart(&key).await.unwrap();
    let e1 = store
        .upload_part(&key, &id, 1, ObjectBody::Bytes(part1.clone()))
        .await
        .unwrap();
    let e2 = store
        .upload_part(&key, &id, 2, stream_body(part2.clone(), 100_000))
        .await
        .unwrap();
    assert!(e1.starts_with('"') && e1 != e2, "{e1} {e2}");
    store
        .complete_multipart(&key, &id, &[(1, e1), (2, e2)])
        .await
        .unwrap();
    assert_eq!(env.count() - before, 4, "create + 2 parts + complete");

    let (status, body) = get(&store, &key).await;
    assert_eq!(status, 200);
    assert_eq!(body.len(), part1.len() + part2.len());
    assert!(body[..part1.len()] == part1[..]);
    assert!(body[part1.len()..] == part2[..]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multipart_complete_with_a_small_first_part_fails() {
    let env = Env::start();
    let store = env.store();
    let key = store.blob_key("small");
    let id = store.create_multipart(&key).await.unwrap();
    let e1 = store
        .upload_part(&key, &id, 1, ObjectBody::Bytes(pattern(1000, 1)))
        .await
        .unwrap();
    let e2 = store
        .upload_part(&key, &id, 2, ObjectBody::Bytes(pattern(1000, 2)))
        .await
        .unwrap();
    let err = store
        .complete_multipart(&key, &id, &[(1, e1), (2, e2)])
        .await
        .unwrap_err();
    match err {
        StorageError::Failed { status, code, .. } => {
            assert_eq!((status, code.as_str()), (400, "EntityTooSmall"))
        }
        e => panic!("{e:?}"),
    }
    // s3s-fs deletes the upload id before it assembles the parts: after a failed complete the
    // upload is gone (an abort has nothing left to do), and the unread part files stay behind
    // (the embedded store's sweep removes them).
    store.abort_multipart(&key, &id).await.unwrap();
    let leftovers: Vec<_> = std::fs::read_dir(env.dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(&id))
        .collect();
    assert!(!leftovers.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_multipart_discards_the_upload() {
    let env = Env::start();
    let store = env.store();
    let key = store.blob_key("aborted");
    let id = store.create_multipart(&key).await.unwrap();
    store
        .upload_part(&key, &id, 1, ObjectBody::Bytes(pattern(1000, 1)))
        .await
        .unwrap();
    let before = env.count();
    store.abort_multipart(&key, &id).await.unwrap();
    assert_eq!(env.count() - before, 1);
    // The upload is gone: s3s-fs answers AccessDenied (not NoSuchUpload) for unknown ids,
    // which the client tells from bad credentials by the bucket still answering.
    let err = store
        .upload_part(&key, &id, 2, ObjectBody::Bytes(pattern(10, 1)))
        .await
        .unwrap_err();
    assert!(matches!(err, StorageError::UploadGone { .. }), "{err:?}");
    assert_eq!(get(&store, &key).await.0, 404);
    // No part files left behind.
    let leftovers: Vec<_> = std::fs::read_dir(env.dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(&id))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_object_and_missing_keys_are_ok() {
    let env = Env::start();
    let store = env.store();
    store
        .delete_object(&store.blob_key("never-existed"))
        .await
        .unwrap();
    let key = store.blob_key("doomed");
    store
        .put_object(&key, ObjectBody::Bytes(Bytes::from_static(b"bye")))
        .await
        .unwrap();
    assert_eq!(get(&store, &key).await.0, 200);
    let before = env.count();
    store.delete_object(&key).await.unwrap();
    assert_eq!(env.count() - before, 1);
    assert_eq!(get(&store, &key).await.0, 404);
    store.delete_object(&key).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_objects_by_prefix_and_get_object_reads_whole() {
    let env = Env::start();
    let store = env.store();
    for key in ["docker/a/link", "docker/b/c/data", "other/x"] {
        store
            .put_object(key, ObjectBody::Bytes(Bytes::from(key.as_bytes().to_vec())))
            .await
            .unwrap();
    }
    let before = env.count();
    let page = store.list_objects("docker/", None).await.unwrap();
    assert_eq!(env.count() - before, 1);
    let keys: Vec<(&str, u64)> = page
        .objects
        .iter()
        .map(|o| (o.key.as_str(), o.size))
        .collect();
    assert_eq!(keys, vec![("docker/a/link", 13), ("docker/b/c/data", 15)]);
    assert!(page.next.is_none());
    assert!(page.objects.iter().all(|o| !o.last_modified.is_empty()));
    assert!(store
        .list_objects("none/", None)
        .await
        .unwrap()
        .objects
        .is_empty());
    assert_eq!(
        &store.get_object("docker/b/c/data").await.unwrap()[..],
        b"docker/b/c/data"
    );
    match store.get_object("docker/missing").await {
        Err(StorageError::Failed { status: 404, .. }) => {}
        other => panic!("missing key: {other:?}"),
    }
}

/// A multipart upload survives a restart of the embedded S3 (a second server on the same root:
/// a fresh s3s-fs instance with no memory of the first) if the access key stays the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multipart_state_is_on_disk_and_bound_to_the_access_key() {
    let env = Env::start();
    let store = env.store();
    let key = store.blob_key("restart");
    let part1 = pattern(5 * 1024 * 1024, 5);
    let part2 = pattern(1234, 6);
    let id = store.create_multipart(&key).await.unwrap();
    let e1 = store
        .upload_part(&key, &id, 1, ObjectBody::Bytes(part1.clone()))
        .await
        .unwrap();

    // Same root, new keys: the upload cannot be continued (nor aborted).
    let (ak, sk) = EmbeddedS3::random_keys();
    let other = start_on(env.dir.path(), &ak, &sk, None);
    let other_store = ObjectStore::new(&cfg(&other.endpoint, BUCKET, &ak, &sk)).unwrap();
    let err = other_store
        .upload_part(&key, &id, 2, ObjectBody::Bytes(part2.clone()))
        .await
        .unwrap_err();
    assert!(matches!(err, StorageError::UploadGone { .. }), "{err:?}");
    // For these keys the upload does not exist: nothing to abort.
    other_store.abort_multipart(&key, &id).await.unwrap();

    // Same root, same keys: it can.
    let again = start_on(env.dir.path(), &env.s3.access_key, &env.s3.secret_key, None);
    let again_store = ObjectStore::new(&cfg(
        &again.endpoint,
        BUCKET,
        &env.s3.access_key,
        &env.s3.secret_key,
    ))
    .unwrap();
    let e2 = again_store
        .upload_part(&key, &id, 2, ObjectBody::Bytes(part2.clone()))
        .await
        .unwrap();
    again_store
        .complete_multipart(&key, &id, &[(1, e1), (2, e2)])
        .await
        .unwrap();
    let (status, body) = get(&store, &key).await;
    assert_eq!(status, 200);
    assert_eq!(body.len(), part1.len() + part2.len());
}

#[test]
fn random_keys_are_alphanumeric_and_distinct() {
    let (a, s) = EmbeddedS3::random_keys();
    assert_eq!((a.len(), s.len()), (20, 40));
    assert!(a
        .chars()
        .chain(s.chars())
        .all(|c| c.is_ascii_alphanumeric()));
    assert_ne!(EmbeddedS3::random_keys(), (a, s));
}

#[test]
fn endpoints_parse_into_upstreams() {
    let e = Endpoint::parse("https://s3.eu-west-1.amazonaws.com").unwrap();
    assert_eq!((e.tls, e.port, e.default_port), (true, 443, true));
    assert_eq!(
        e.host_header("b.s3.eu-west-1.amazonaws.com"),
        "b.s3.eu-west-1.amazonaws.com"
    );
    let e = Endpoint::parse("http://127.0.0.1:3900/").unwrap();
    assert_eq!(
        (e.tls, e.port, e.default_port, e.path.as_str()),
        (false, 3900, false, "")
    );
    assert_eq!(e.host_header("127.0.0.1"), "127.0.0.1:3900");
    let e = Endpoint::parse("http://[::1]:9000/s3").unwrap();
    assert_eq!((e.host.as_str(), e.path.as_str()), ("::1", "/s3"));
    assert_eq!(e.host_header("::1"), "[::1]:9000");
    let e = Endpoint::parse("http://127.0.0.1:80").unwrap();
    assert_eq!(e.host_header("127.0.0.1"), "127.0.0.1");
    assert!(Endpoint::parse("127.0.0.1:9000").is_err());
    assert!(Endpoint::parse("http://127.0.0.1:9000/?x=1").is_err());
}

#[tokio::test]
async fn url_shapes_path_and_virtual_host() {
    let c = cfg("http://127.0.0.1:9000", BUCKET, "ak", "sk");
    let s = ObjectStore::new(&c).unwrap();
    let p = s
        .presign(
            &http::Method::GET,
            "berth/blobs/x y",
            Duration::from_secs(60),
        )
        .unwrap();
    assert!(
        p.url
            .starts_with("http://127.0.0.1:9000/registry/berth/blobs/x%20y?X-Amz-"),
        "{}",
        p.url
    );
    assert!(p.path_and_query.starts_with("/registry/berth/blobs/x%20y?"));

    let mut c = cfg("https://s3.example.test", BUCKET, "ak", "sk");
    c.path_style = false;
    let s = ObjectStore::new(&c).unwrap();
    let p = s
        .presign(&http::Method::GET, "berth/blobs/x", Duration::from_secs(60))
        .unwrap();
    assert!(
        p.url
            .starts_with("https://registry.s3.example.test/berth/blobs/x?X-Amz-"),
        "{}",
        p.url
    );

    let mut c = cfg("http://127.0.0.1:9000/base/", BUCKET, "ak", "sk");
    c.path_style = false;
    let s = ObjectStore::new(&c).unwrap();
    let p = s
        .presign(&http::Method::GET, "k", Duration::from_secs(60))
        .unwrap();
    assert!(
        p.url
            .starts_with("http://registry.127.0.0.1:9000/base/k?X-Amz-"),
        "{}",
        p.url
    );
    assert!(
        p.path_and_query.starts_with("/base/k?X-Amz-"),
        "{}",
        p.path_and_query
    );
}

#[tokio::test]
async fn presign_is_cheap() {
    let s = ObjectStore::new(&cfg(
        "http://127.0.0.1:9000",
        BUCKET,
        "AKIDEXAMPLE",
        "secret",
    ))
    .unwrap();
    let key = s.blob_key("3f1c2a9e-6b7d-4c1e-9a55-0123456789ab");
    let n = 20_000;
    let t = Instant::now();
    let mut total = 0;
    for _ in 0..n {
        total += s
            .presign(&http::Method::GET, &key, Duration::from_secs(900))
            .unwrap()
            .url
            .len();
    }
    let per = t.elapsed() / n;
    println!("presign: {per:?} per URL ({total} bytes)");
    assert!(per < Duration::from_micros(200), "{per:?}");
}

// ---- retries, against a fake server ----

/// Answers every request with `status` and `body` (Connection: close) and counts requests.
async fn fake_server(status: u16, body: &'static str) -> (String, Arc<AtomicU64>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let n = Arc::new(AtomicU64::new(0));
    let count = n.clone();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            let count = count.clone();
            tokio::spawn(async move {
                // Read the head and the body (Content-Length) so the client sees a response,
                // not a reset.
                let mut buf = Vec::new();
                let mut tmp = [0u8; 8192];
                let head_end = loop {
                    let k = s.read(&mut tmp).await.unwrap_or(0);
                    if k == 0 {
                        return;
                    }
                    buf.extend_from_slice(&tmp[..k]);
                    if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        break p + 4;
                    }
                };
                let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .map(|v| v.trim().parse().unwrap())
                    .unwrap_or(0);
                let mut have = buf.len() - head_end;
                while have < len {
                    let k = s.read(&mut tmp).await.unwrap_or(0);
                    if k == 0 {
                        break;
                    }
                    have += k;
                }
                count.fetch_add(1, Ordering::SeqCst);
                let resp = format!(
                    "HTTP/1.1 {status} X\r\ncontent-type: application/xml\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    });
    (format!("http://{addr}"), n)
}

const SLOWDOWN: &str =
    "<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_errors_are_retried_for_resendable_bodies_only() {
    let (ep, n) = fake_server(503, SLOWDOWN).await;
    let retry = RetryPolicy {
        attempts: 3,
        base: Duration::from_millis(10),
    };
    let s = ObjectStore::with_retry(&cfg(&ep, BUCKET, "ak", "sk"), retry).unwrap();

    let err = s
        .put_object("k", ObjectBody::Bytes(Bytes::from_static(b"abc")))
        .await
        .unwrap_err();
    match err {
        StorageError::Unavailable { status, code } => {
            assert_eq!((status, code.as_str()), (503, "SlowDown"))
        }
        e => panic!("{e:?}"),
    }
    assert_eq!(n.load(Ordering::SeqCst), 3);

    n.store(0, Ordering::SeqCst);
    let err = s
        .put_object("k", stream_body(pattern(1000, 1), 100))
        .await
        .unwrap_err();
    assert!(
        matches!(err, StorageError::Unavailable { status: 503, .. }),
        "{err:?}"
    );
    assert_eq!(n.load(Ordering::SeqCst), 1, "a streamed body is sent once");

    n.store(0, Ordering::SeqCst);
    assert!(matches!(
        s.check().await.unwrap_err(),
        StorageError::Unavailable { .. }
    ));
    assert_eq!(n.load(Ordering::SeqCst), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_errors_are_not_retried() {
    let (ep, n) = fake_server(
        400,
        "<Error><Code>InvalidArgument</Code><Message>bad part</Message></Error>",
    )
    .await;
    let s = ObjectStore::new(&cfg(&ep, BUCKET, "ak", "sk")).unwrap();
    let err = s
        .upload_part("k", "id", 1, ObjectBody::Bytes(Bytes::from_static(b"abc")))
        .await
        .unwrap_err();
    match err {
        StorageError::Failed {
            status,
            code,
            message,
        } => {
            assert_eq!(
                (status, code.as_str(), message.as_str()),
                (400, "InvalidArgument", "bad part")
            )
        }
        e => panic!("{e:?}"),
    }
    assert_eq!(n.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_200_with_an_error_document_on_complete_is_an_error() {
    let (ep, n) = fake_server(
        200,
        "<?xml version=\"1.0\"?>\n<Error><Code>InternalError</Code><Message>oops</Message></Error>",
    )
    .await;
    let retry = RetryPolicy {
        attempts: 2,
        base: Duration::from_millis(10),
    };
    let s = ObjectStore::with_retry(&cfg(&ep, BUCKET, "ak", "sk"), retry).unwrap();
    let err = s
        .complete_multipart("k", "id", &[(1, "\"e\"".into())])
        .await
        .unwrap_err();
    assert!(matches!(err, StorageError::Unavailable { .. }), "{err:?}");
    assert_eq!(n.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_and_delete_treat_404_as_success() {
    let (ep, _) = fake_server(
        404,
        "<Error><Code>NoSuchUpload</Code><Message>gone</Message></Error>",
    )
    .await;
    let s = ObjectStore::new(&cfg(&ep, BUCKET, "ak", "sk")).unwrap();
    s.abort_multipart("k", "id").await.unwrap();
    s.delete_object("k").await.unwrap();
    let err = s.create_multipart("k").await.unwrap_err();
    assert!(
        matches!(err, StorageError::Failed { status: 404, .. }),
        "{err:?}"
    );
}
