//! Property tests (proptest) on untrusted input: request routing, names, tags, digests, and
//! the manifest PUT path. Each property runs a bounded number of cases in `cargo test`;
//! a longer run:
//!
//! ```sh
//! PROPTEST_CASES=100000 cargo test --release --test fuzz
//! ```

mod common;

use std::sync::{Arc, OnceLock};

use berth::config::{Config, Overrides};
use berth::http::endpoint::Endpoint;
use berth::meta::redb::RedbStore;
use berth::registry::names::{valid_tag, Digest, Reference};
use berth::registry::{BodySource, Registry, RegistryError, RegistrySettings};
use berth::storage::ObjectStore;
use bytes::Bytes;
use common::*;
use proptest::prelude::*;
use serde_json::{json, Value};

/// The OCI distribution spec's repository name grammar.
const NAME_RE: &str = r"^[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*(/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)*$";
const TAG_RE: &str = r"^[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}$";
const DIGEST_RE: &str = r"^sha256:[a-f0-9]{64}$";

fn cases(default: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(default);
    ProptestConfig {
        cases,
        ..ProptestConfig::default()
    }
}

fn re(s: &str) -> regex::Regex {
    regex::Regex::new(s).unwrap()
}

fn name_of(ep: &Endpoint) -> Option<&str> {
    use Endpoint::*;
    match ep {
        Banner | ApiBase | Catalog(_) => None,
        TagsList { name, .. }
        | GetManifest { name, .. }
        | PutManifest { name, .. }
        | DeleteManifest { name, .. }
        | GetBlob { name, .. }
        | DeleteBlob { name, .. }
        | StartUpload { name, .. }
        | UploadStatus { name, .. }
        | PatchUpload { name, .. }
        | FinishUpload { name, .. }
        | CancelUpload { name, .. }
        | Referrers { name, .. } => Some(name),
    }
}

/// Path segments that steer routing, mixed with arbitrary ones.
fn segment() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("v2".to_string()),
        Just("blobs".to_string()),
        Just("uploads".to_string()),
        Just("manifests".to_string()),
        Just("tags".to_string()),
        Just("list".to_string()),
        Just("referrers".to_string()),
        Just("_catalog".to_string()),
        Just(String::new()),
        Just(format!("sha256:{}", "a".repeat(64))),
        "[a-z0-9._-]{1,12}",
        ".{0,12}",
        "[a-zA-Z0-9:%+._-]{0,70}",
    ]
}

fn method() -> impl Strategy<Value = http::Method> {
    prop_oneof![
        Just(http::Method::GET),
        Just(http::Method::HEAD),
        Just(http::Method::PUT),
        Just(http::Method::POST),
        Just(http::Method::PATCH),
        Just(http::Method::DELETE),
        Just(http::Method::OPTIONS),
    ]
}

fn query() -> impl Strategy<Value = Option<String>> {
    let kv = prop_oneof![
        Just("n".to_string()),
        Just("last".to_string()),
        Just("digest".to_string()),
        Just("mount".to_string()),
        Just("from".to_string()),
        Just("artifactType".to_string()),
        ".{0,6}",
    ];
    let value = prop_oneof![
        "[0-9]{0,25}",
        ".{0,40}",
        "%[0-9A-Fa-f]{0,2}.{0,10}",
        Just(format!("sha256%3A{}", "b".repeat(64))),
        Just("a%2Fb".to_string()),
    ];
    proptest::option::of(
        proptest::collection::vec((kv, value), 0..5).prop_map(|pairs| {
            pairs
                .into_iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join("&")
        }),
    )
}

proptest! {
    #![proptest_config(cases(2048))]

    /// Any method, path and query: parsing never panics, and every accepted repository name
    /// matches the spec's grammar and distribution's 255-byte limit.
    #[test]
    fn endpoint_parse_never_panics(
        m in method(),
        segments in proptest::collection::vec(segment(), 0..9),
        raw in ".{0,80}",
        use_raw in any::<bool>(),
        q in query(),
    ) {
        let path = if use_raw { raw } else { format!("/{}", segments.join("/")) };
        if let Ok(ep) = Endpoint::parse(&m, &path, q.as_deref()) {
            if let Some(name) = name_of(&ep) {
                prop_assert!(re(NAME_RE).is_match(name), "accepted name {name:?} from {path:?}");
                prop_assert!(name.len() <= 255);
            }
            if let Endpoint::StartUpload { mount: Some(mount), .. } = &ep {
                if let Some(from) = &mount.from {
                    prop_assert!(re(NAME_RE).is_match(from), "accepted from={from:?}");
                }
            }
            let _ = ep.route();
        }
    }

    /// Every name the grammar allows (up to 255 bytes) routes, and comes back unchanged.
    #[test]
    fn spec_names_are_accepted(name in "[a-z0-9]{1,8}((\\.|_|__|-{1,3})[a-z0-9]{1,8}){0,3}(/[a-z0-9]{1,8}((\\.|_|__|-{1,3})[a-z0-9]{1,8}){0,2}){0,8}") {
        let r = Endpoint::parse(&http::Method::GET, &format!("/v2/{name}/tags/list"), None);
        if name.len() <= 255 {
            match r {
                Ok(Endpoint::TagsList { name: n, .. }) => prop_assert_eq!(n, name),
                other => prop_assert!(false, "{name:?}: {other:?}"),
            }
        } else {
            prop_assert!(r.is_err());
        }
    }

    /// Digests and tags: accepted exactly when they match their grammar.
    #[test]
    fn digests_and_tags_match_their_grammar(
        s in prop_oneof![".{0,80}", "sha256:[a-f0-9]{62,66}", "sha256:[a-fA-F0-9:]{64}", "[a-zA-Z0-9_.-]{0,130}"],
    ) {
        prop_assert_eq!(Digest::parse(&s).is_some(), re(DIGEST_RE).is_match(&s), "{:?}", s);
        prop_assert_eq!(valid_tag(&s), re(TAG_RE).is_match(&s), "{:?}", s);
        match Reference::parse(&s) {
            Some(Reference::Digest(d)) => prop_assert_eq!(d.as_str(), s.as_str()),
            Some(Reference::Tag(t)) => prop_assert!(re(TAG_RE).is_match(&t)),
            None => prop_assert!(!re(TAG_RE).is_match(&s) || s.contains(':')),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// manifests

struct Fixture {
    rt: tokio::runtime::Runtime,
    reg: Registry,
    /// Digests and sizes of blobs stored in repository `fz`.
    blobs: Vec<(String, u64)>,
    _s3: S3Server,
    _dir: tempfile::TempDir,
}

struct Once(Option<Bytes>);

#[async_trait::async_trait]
impl BodySource for Once {
    async fn next_chunk(&mut self) -> std::io::Result<Option<Bytes>> {
        Ok(self.0.take())
    }
}

/// A registry on a real metadata store and S3 server, with two blobs in repository `fz`.
fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let s3 = S3Server::start();
        let dir = tempfile::tempdir().unwrap();
        let yaml = s3.storage_yaml();
        let config = Config::from_yaml(&yaml, &Overrides::default(), &|_| None).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let meta = RedbStore::open(&dir.path().join("meta.redb")).unwrap();
        let store = ObjectStore::new(&config.storage).unwrap();
        let reg = Registry::new(
            Arc::new(meta),
            Arc::new(store),
            RegistrySettings::from_config(&config),
        );
        let mut blobs = Vec::new();
        for content in [&b"{}"[..], b"layer bytes"] {
            let d = Digest::sha256_of(content);
            rt.block_on(reg.monolithic_upload(
                "fz",
                &d,
                Some(content.len() as u64),
                &mut Once(Some(Bytes::copy_from_slice(content))),
            ))
            .unwrap();
            blobs.push((d.to_string(), content.len() as u64));
        }
        Fixture {
            rt,
            reg,
            blobs,
            _s3: s3,
            _dir: dir,
        }
    })
}

fn media_type() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(json!("application/vnd.oci.image.manifest.v1+json")),
        Just(json!("application/vnd.oci.image.index.v1+json")),
        Just(json!(
            "application/vnd.docker.distribution.manifest.v2+json"
        )),
        Just(json!(
            "application/vnd.docker.distribution.manifest.list.v2+json"
        )),
        Just(json!("application/vnd.oci.image.config.v1+json")),
        ".{0,20}".prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        Just(Value::Null),
    ]
}

fn digest_value() -> impl Strategy<Value = Value> {
    let known = fixture().blobs.clone();
    prop_oneof![
        proptest::sample::select(known).prop_map(|(d, _)| Value::from(d)),
        "sha256:[a-f0-9]{64}".prop_map(Value::from),
        ".{0,72}".prop_map(Value::from),
        any::<u32>().prop_map(Value::from),
        Just(Value::Null),
    ]
}

fn size_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        (0u64..20).prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| json!(f)),
        ".{0,5}".prop_map(Value::from),
    ]
}

fn descriptor() -> impl Strategy<Value = Value> {
    (
        proptest::option::of(media_type()),
        digest_value(),
        proptest::option::of(size_value()),
        proptest::option::of(proptest::collection::vec(".{0,10}", 0..2)),
        proptest::option::of(".{0,10}"),
    )
        .prop_map(|(mt, digest, size, urls, at)| {
            let mut d = json!({ "digest": digest });
            if let Some(mt) = mt {
                d["mediaType"] = mt;
            }
            if let Some(s) = size {
                d["size"] = s;
            }
            if let Some(u) = urls {
                d["urls"] = json!(u);
            }
            if let Some(a) = at {
                d["artifactType"] = json!(a);
            }
            d
        })
}

/// Manifest-shaped JSON with every field optional and often of the wrong type.
fn manifest_json() -> impl Strategy<Value = Value> {
    (
        prop_oneof![
            Just(json!(2)),
            Just(json!(1)),
            any::<i64>().prop_map(Value::from),
            Just(json!("2"))
        ],
        proptest::option::of(media_type()),
        proptest::option::of(descriptor()),
        proptest::option::of(proptest::collection::vec(descriptor(), 0..4)),
        proptest::option::of(proptest::collection::vec(descriptor(), 0..3)),
        proptest::option::of(descriptor()),
        proptest::option::of(proptest::collection::btree_map(".{0,8}", ".{0,8}", 0..3)),
        proptest::option::of(".{0,12}"),
    )
        .prop_map(|(sv, mt, config, layers, manifests, subject, ann, at)| {
            let mut m = json!({ "schemaVersion": sv });
            let mut set = |k: &str, v: Option<Value>| {
                if let Some(v) = v {
                    m[k] = v;
                }
            };
            set("mediaType", mt);
            set("config", config);
            set("layers", layers.map(Value::from));
            set("manifests", manifests.map(Value::from));
            set("subject", subject);
            set("annotations", ann.map(|a| json!(a)));
            set("artifactType", at.map(Value::from));
            m
        })
}

fn manifest_body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        6 => manifest_json().prop_map(|v| serde_json::to_vec(&v).unwrap()),
        // Structured, then damaged: truncated or with a byte changed.
        2 => (manifest_json(), any::<prop::sample::Index>(), any::<u8>()).prop_map(|(v, i, b)| {
            let mut bytes = serde_json::to_vec(&v).unwrap();
            let at = i.index(bytes.len());
            if b % 2 == 0 { bytes.truncate(at) } else { bytes[at] = b }
            bytes
        }),
        1 => proptest::collection::vec(any::<u8>(), 0..64),
        1 => ".{0,64}".prop_map(String::into_bytes),
    ]
}

proptest! {
    #![proptest_config(cases(512))]

    /// The manifest PUT path never panics, and whatever the body, the answer is a client
    /// error or success: never a 500.
    #[test]
    fn put_manifest_never_panics(
        body in manifest_body(),
        content_type in proptest::option::of(prop_oneof![
            Just("application/vnd.oci.image.manifest.v1+json".to_string()),
            Just("application/vnd.oci.image.index.v1+json".to_string()),
            Just("application/json; charset=utf-8".to_string()),
            ".{0,30}",
        ]),
        tag in prop_oneof!["[a-z0-9]{1,8}", Just("latest".to_string())],
        by_digest in any::<bool>(),
    ) {
        let f = fixture();
        let reference = if by_digest {
            Reference::Digest(Digest::sha256_of(&body))
        } else {
            Reference::Tag(tag)
        };
        let r = f.rt.block_on(f.reg.put_manifest("fz", &reference, content_type.as_deref(), Bytes::from(body.clone())));
        match r {
            Ok(pushed) => {
                // What was accepted is served back byte for byte.
                let got = f.rt.block_on(f.reg.get_manifest("fz", &Reference::Digest(pushed.digest.clone()))).unwrap();
                prop_assert_eq!(got.record.body.as_ref(), &body[..]);
            }
            Err(e) => {
                prop_assert!(e.status().is_client_error(), "{:?} -> {} {:?}", String::from_utf8_lossy(&body), e.status(), e);
                prop_assert!(!matches!(e, RegistryError::Internal(_)));
            }
        }
    }
}
