//! TLS, authentication and limits over real HTTP against the real berth binary.
//!
//! - htpasswd mode (bcrypt file written here, as `htpasswd -B` would) and Docker token mode
//!   (a test issuer signs ES256/RS256 JWTs with keys generated here; its self-signed
//!   certificate is berth's `rootcertbundle`);
//! - TLS with a CA and certificate generated here (rcgen): HTTP/1.1, HTTP/2 by ALPN, mTLS,
//!   certificate reload on SIGHUP; skopeo over TLS with credentials;
//! - an object store behind TLS with a private CA (`storage.ca_bundle`);
//! - limits: blob size (413), concurrent uploads (429), header size (431).

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::credentials::*;
use common::*;
use reqwest::blocking::{Client, RequestBuilder, Response};
use serde_json::{json, Value};

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const REALM: &str = "https://auth.example.test/token";

// ---------------------------------------------------------------------------------------------
// helpers

fn hdr(r: &Response, name: &str) -> String {
    r.headers()
        .get(name)
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default()
}

/// Status, OCI error code (or "" for a success without one), WWW-Authenticate.
fn outcome(r: Response) -> (u16, String, String) {
    let status = r.status().as_u16();
    let challenge = hdr(&r, "www-authenticate");
    let body = r.text().unwrap();
    let code = if status >= 400 {
        error_code(&body)
    } else {
        String::new()
    };
    (status, code, challenge)
}

/// An htpasswd file with bcrypt entries in `htpasswd -B` form (`$2y$`, cost 5).
fn basic(user: &str, pw: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pw}"))
    )
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// A registry client that adds one Authorization header (or none) to every request.
struct Api {
    c: Client,
    base: String,
    auth: Option<String>,
}

impl Api {
    fn new(berth: &Berth, auth: Option<String>) -> Api {
        Api {
            c: client(),
            base: berth.url(""),
            auth,
        }
    }

    fn as_(&self, auth: Option<String>) -> Api {
        Api {
            c: self.c.clone(),
            base: self.base.clone(),
            auth,
        }
    }

    fn req(&self, method: reqwest::Method, path: &str) -> RequestBuilder {
        let url = if path.starts_with("http") {
            path.to_string()
        } else {
            format!("{}{path}", self.base)
        };
        let b = self.c.request(method, url);
        match &self.auth {
            Some(a) => b.header("Authorization", a),
            None => b,
        }
    }

    fn get(&self, path: &str) -> Response {
        self.req(reqwest::Method::GET, path).send().unwrap()
    }

    /// Monolithic blob upload: the response.
    fn post_blob(&self, repo: &str, bytes: &[u8]) -> Response {
        let digest = sha256_digest(bytes);
        self.req(
            reqwest::Method::POST,
            &format!("/v2/{repo}/blobs/uploads/?digest={digest}"),
        )
        .body(bytes.to_vec())
        .send()
        .unwrap()
    }

    #[track_caller]
    fn push_blob(&self, repo: &str, bytes: &[u8]) -> String {
        let r = self.post_blob(repo, bytes);
        assert_eq!(r.status(), 201, "push blob: {}", r.text().unwrap());
        sha256_digest(bytes)
    }

    /// Pushes a one-layer image under `tag`; returns the manifest digest.
    #[track_caller]
    fn push_image(&self, repo: &str, tag: &str) -> String {
        let config = self.push_blob(repo, b"{}");
        let layer = self.push_blob(repo, format!("layer of {repo}").as_bytes());
        let manifest = manifest(&config, 2, &layer, format!("layer of {repo}").len());
        let r = self
            .req(reqwest::Method::PUT, &format!("/v2/{repo}/manifests/{tag}"))
            .header("Content-Type", OCI_MANIFEST)
            .body(manifest.clone())
            .send()
            .unwrap();
        assert_eq!(r.status(), 201, "push manifest: {}", r.text().unwrap());
        sha256_digest(&manifest)
    }

    /// `POST .../blobs/uploads/`: the response.
    fn start_upload(&self, repo: &str) -> Response {
        self.req(reqwest::Method::POST, &format!("/v2/{repo}/blobs/uploads/"))
            .send()
            .unwrap()
    }
}

fn manifest(config: &str, config_size: usize, layer: &str, layer_size: usize) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config, "size": config_size},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer, "size": layer_size}],
    }))
    .unwrap()
}

fn token_yaml(bundle: &Path, extra: &str) -> String {
    format!(
        "auth:\n  token:\n    realm: {REALM}\n    service: {SERVICE}\n    issuer: {ISSUER}\n    rootcertbundle: {}\n{extra}",
        bundle.display()
    )
}

/// berth in token mode with `issuers` trusted.
fn token_berth(issuers: &[&Issuer], extra: &str) -> (Berth, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("bundle.pem");
    let pems: String = issuers.iter().map(|i| i.cert_pem.clone()).collect();
    std::fs::write(&bundle, pems).unwrap();
    (Berth::start(&token_yaml(&bundle, extra)), dir)
}

fn htpasswd_berth(users: &[(&str, &str)], extra: &str) -> (Berth, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = htpasswd_file(dir.path(), users);
    let yaml = format!(
        "auth:\n  htpasswd:\n    realm: berth-test\n    path: {}\n{extra}",
        path.display()
    );
    (Berth::start(&yaml), dir)
}

/// The value of a metric line (`name{labels} value`) in berth's /metrics, if exported.
fn metric(metrics_port: u16, line_prefix: &str) -> Option<f64> {
    let text = client()
        .get(format!("http://127.0.0.1:{metrics_port}/metrics"))
        .send()
        .ok()?
        .text()
        .ok()?;
    text.lines()
        .find(|l| l.starts_with(line_prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

// ---------------------------------------------------------------------------------------------
// htpasswd

#[test]
fn htpasswd_mode_requires_valid_credentials() {
    let metrics_port = free_port();
    let (berth, _dir) = htpasswd_berth(
        &[("alice", "s3cret-pass"), ("bob", "other")],
        &format!("metrics:\n  listen: 127.0.0.1:{metrics_port}\n"),
    );
    let anon = Api::new(&berth, None);
    let alice = anon.as_(Some(basic("alice", "s3cret-pass")));

    // The banner stays open; /v2/ is the authentication probe.
    assert_eq!(anon.get("/").status(), 200);
    let (status, code, challenge) = outcome(anon.get("/v2/"));
    assert_eq!((status, code.as_str()), (401, "UNAUTHORIZED"));
    assert_eq!(challenge, "Basic realm=\"berth-test\"");
    assert_eq!(alice.get("/v2/").status(), 200);

    // Anonymous push: refused before any byte is stored.
    let (status, code, challenge) = outcome(anon.post_blob("app", b"layer"));
    assert_eq!((status, code.as_str()), (401, "UNAUTHORIZED"));
    assert!(challenge.starts_with("Basic realm="), "{challenge}");
    assert_eq!(outcome(anon.start_upload("app")).0, 401);

    // Wrong password, unknown user, garbage header.
    for wrong in [
        basic("alice", "wrong"),
        basic("alice", ""),
        basic("mallory", "s3cret-pass"),
        "Basic !!notbase64".to_string(),
        "Negotiate abc".to_string(),
    ] {
        let (status, code, challenge) = outcome(anon.as_(Some(wrong)).post_blob("app", b"x"));
        assert_eq!((status, code.as_str()), (401, "UNAUTHORIZED"));
        assert!(challenge.starts_with("Basic "), "{challenge}");
    }

    // Right password: push and pull a whole image, list the catalog.
    let digest = alice.push_image("team/app", "v1");
    let r = alice.get("/v2/team/app/manifests/v1");
    assert_eq!(r.status(), 200);
    assert_eq!(hdr(&r, "docker-content-digest"), digest);
    assert_eq!(alice.get("/v2/_catalog").status(), 200);
    let bob = anon.as_(Some(basic("bob", "other")));
    assert_eq!(bob.get("/v2/team/app/manifests/v1").status(), 200);
    // Reads without credentials are refused too.
    assert_eq!(outcome(anon.get("/v2/team/app/manifests/v1")).0, 401);
    assert_eq!(outcome(anon.get("/v2/_catalog")).0, 401);
    assert_eq!(outcome(anon.get("/v2/team/app/tags/list")).0, 401);

    // No password or token in the log.
    let log = berth.log();
    assert!(
        !log.contains("s3cret-pass") && !log.contains("mallory"),
        "{log}"
    );
    // Failed logins are counted (5 bad attempts + garbage headers).
    assert_eq!(
        metric(
            metrics_port,
            "berth_auth_failures_total{reason=\"bad_credentials\"}"
        ),
        Some(3.0)
    );
    assert_eq!(
        metric(
            metrics_port,
            "berth_auth_failures_total{reason=\"malformed\"}"
        ),
        Some(2.0)
    );
}

#[test]
fn htpasswd_reload_on_sighup() {
    let (berth, dir) = htpasswd_berth(&[("alice", "old-pass")], "");
    let api = Api::new(&berth, Some(basic("alice", "old-pass")));
    assert_eq!(api.get("/v2/").status(), 200);
    htpasswd_file(dir.path(), &[("alice", "new-pass")]);
    berth.signal(libc::SIGHUP);
    let new = api.as_(Some(basic("alice", "new-pass")));
    let deadline = Instant::now() + Duration::from_secs(10);
    while new.get("/v2/").status() != 200 {
        assert!(Instant::now() < deadline, "not reloaded:\n{}", berth.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(api.get("/v2/").status(), 401);
    assert!(berth.log().contains("SIGHUP: reloaded htpasswd"));
}

// ---------------------------------------------------------------------------------------------
// tokens

#[test]
fn token_mode_rejects_invalid_tokens() {
    let issuer = Issuer::new();
    let stranger = Issuer::new();
    let (berth, _dir) = token_berth(&[&issuer], "");
    let anon = Api::new(&berth, None);
    let push: &[(&str, &str, &[&str])] = &[("repository", "app", &["pull", "push"])];

    // No token: the challenge names realm, service and the scope to ask for.
    let (status, code, challenge) = outcome(anon.post_blob("app", b"layer"));
    assert_eq!((status, code.as_str()), (401, "UNAUTHORIZED"));
    assert_eq!(
        challenge,
        format!(
            "Bearer realm=\"{REALM}\",service=\"{SERVICE}\",scope=\"repository:app:pull,push\""
        )
    );
    let (status, _, challenge) = outcome(anon.get("/v2/"));
    assert_eq!(status, 401);
    assert_eq!(
        challenge,
        format!("Bearer realm=\"{REALM}\",service=\"{SERVICE}\"")
    );

    let now = jsonwebtoken::get_current_timestamp();
    let with = |patch: Value| {
        let mut c = Issuer::claims(push);
        for (k, v) in patch.as_object().unwrap() {
            c[k] = v.clone();
        }
        issuer.sign(&c)
    };
    let cases = [
        ("expired", with(json!({"exp": now - 3600}))),
        ("not yet valid", with(json!({"nbf": now + 3600}))),
        ("wrong audience", with(json!({"aud": "another-registry"}))),
        ("wrong issuer", with(json!({"iss": "someone-else"}))),
        ("wrong key", stranger.token(push)),
        ("not a JWT", "abc.def.ghi".to_string()),
    ];
    for (what, token) in cases {
        let (status, code, challenge) =
            outcome(anon.as_(Some(bearer(&token))).post_blob("app", b"layer"));
        assert_eq!((status, code.as_str()), (401, "UNAUTHORIZED"), "{what}");
        assert!(
            challenge.ends_with(",error=\"invalid_token\""),
            "{what}: {challenge}"
        );
    }
    // A Basic header in token mode is not a credential.
    assert_eq!(
        outcome(anon.as_(Some(basic("a", "b"))).post_blob("app", b"x")).0,
        401
    );
    // The right token works.
    let ok = anon.as_(issuer.auth(push));
    ok.push_blob("app", b"layer");
    let log = berth.log();
    assert!(!log.contains(&issuer.token(push)[..40]), "token in log");
}

#[test]
fn token_scopes_are_enforced_per_repository() {
    let issuer = Issuer::new();
    let (berth, _dir) = token_berth(&[&issuer], "");
    let api = Api::new(&berth, None);
    let owner = api.as_(issuer.auth(&[
        ("repository", "team/app", &["pull", "push", "delete"]),
        ("registry", "catalog", &["*"]),
    ]));
    let digest = owner.push_image("team/app", "v1");

    // Pull-only token: reads work, writes are DENIED with the scope to ask for.
    let reader = api.as_(issuer.auth(&[("repository", "team/app", &["pull"])]));
    assert_eq!(reader.get("/v2/team/app/manifests/v1").status(), 200);
    assert_eq!(reader.get("/v2/team/app/tags/list").status(), 200);
    assert_eq!(reader.get("/v2/").status(), 200);
    let (status, code, challenge) = outcome(reader.post_blob("team/app", b"new layer"));
    assert_eq!((status, code.as_str()), (403, "DENIED"));
    assert_eq!(
        challenge,
        format!("Bearer realm=\"{REALM}\",service=\"{SERVICE}\",scope=\"repository:team/app:pull,push\",error=\"insufficient_scope\"")
    );
    let r = reader
        .req(reqwest::Method::PUT, "/v2/team/app/manifests/v2")
        .header("Content-Type", OCI_MANIFEST)
        .body("{}")
        .send()
        .unwrap();
    assert_eq!(outcome(r).1, "DENIED");
    // Its grant is for one repository only.
    assert_eq!(outcome(reader.get("/v2/team/other/tags/list")).1, "DENIED");
    assert_eq!(
        outcome(reader.get("/v2/team/app2/manifests/v1")).1,
        "DENIED"
    );
    // Catalog needs registry:catalog:*.
    let (status, code, challenge) = outcome(reader.get("/v2/_catalog"));
    assert_eq!((status, code.as_str()), (403, "DENIED"));
    assert!(
        challenge.contains("scope=\"registry:catalog:*\""),
        "{challenge}"
    );
    assert_eq!(owner.get("/v2/_catalog").status(), 200);

    // Deleting needs delete: pull,push is not enough.
    let pusher = api.as_(issuer.auth(&[("repository", "team/app", &["pull", "push"])]));
    let r = pusher
        .req(
            reqwest::Method::DELETE,
            &format!("/v2/team/app/manifests/{digest}"),
        )
        .send()
        .unwrap();
    let (status, code, challenge) = outcome(r);
    assert_eq!((status, code.as_str()), (403, "DENIED"));
    assert!(
        challenge.contains("repository:team/app:delete"),
        "{challenge}"
    );
    let r = owner
        .req(
            reqwest::Method::DELETE,
            &format!("/v2/team/app/manifests/{digest}"),
        )
        .send()
        .unwrap();
    assert_eq!(r.status(), 202);

    // "*" as action grants everything on that repository.
    let star = api.as_(issuer.auth(&[("repository", "x", &["*"])]));
    star.push_blob("x", b"star");
}

#[test]
fn rs256_tokens_and_several_signing_certificates() {
    use rsa::pkcs1::EncodeRsaPrivateKey;
    use rsa::pkcs8::EncodePrivateKey;
    let rsa_key = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048).unwrap();
    let key = rcgen::KeyPair::try_from(rsa_key.to_pkcs8_der().unwrap().as_bytes()).unwrap();
    let cert = rcgen::CertificateParams::new(vec!["rsa-issuer".into()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let ec = Issuer::new();
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("bundle.pem");
    std::fs::write(&bundle, format!("{}{}", ec.cert_pem, cert.pem())).unwrap();
    let berth = Berth::start(&token_yaml(&bundle, ""));
    let claims = Issuer::claims(&[("repository", "rsa", &["pull", "push"])]);
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_rsa_der(rsa_key.to_pkcs1_der().unwrap().as_bytes()),
    )
    .unwrap();
    let api = Api::new(&berth, Some(bearer(&token)));
    api.push_blob("rsa", b"signed with RSA");
    Api::new(&berth, Some(bearer(&ec.sign(&claims)))).push_blob("rsa", b"signed with EC");
}

#[test]
fn upload_sessions_belong_to_their_repository() {
    let issuer = Issuer::new();
    let (berth, _dir) = token_berth(&[&issuer], "");
    let api = Api::new(&berth, None);
    let alice = api.as_(issuer.auth(&[
        ("repository", "alice/app", &["pull", "push"]),
        ("repository", "shared", &["pull", "push"]),
    ]));
    let mallory = api.as_(issuer.auth(&[("repository", "mallory/app", &["pull", "push"])]));
    let r = alice.start_upload("alice/app");
    assert_eq!(r.status(), 202);
    let location = hdr(&r, "location");
    let id = hdr(&r, "docker-upload-uuid");

    // Mallory, with push rights on her own repository only, names alice's session under
    // her repository: the session is not hers.
    let hijack = format!("/v2/mallory/app/blobs/uploads/{id}");
    for method in [
        reqwest::Method::GET,
        reqwest::Method::PATCH,
        reqwest::Method::DELETE,
    ] {
        let (status, code, _) = outcome(
            mallory
                .req(method.clone(), &hijack)
                .body("evil")
                .send()
                .unwrap(),
        );
        assert_eq!(
            (status, code.as_str()),
            (404, "BLOB_UPLOAD_UNKNOWN"),
            "{method}"
        );
    }
    let evil = b"evil bytes";
    let r = mallory
        .req(
            reqwest::Method::PUT,
            &format!("{hijack}?digest={}", sha256_digest(evil)),
        )
        .body(evil.to_vec())
        .send()
        .unwrap();
    assert_eq!(outcome(r).1, "BLOB_UPLOAD_UNKNOWN");
    // Under alice's repository she has no rights at all.
    for method in [
        reqwest::Method::GET,
        reqwest::Method::PATCH,
        reqwest::Method::DELETE,
    ] {
        let (status, code, _) = outcome(
            mallory
                .req(method.clone(), &location)
                .body("evil")
                .send()
                .unwrap(),
        );
        assert_eq!((status, code.as_str()), (403, "DENIED"), "{method}");
    }
    // Alice herself cannot move the session to another repository she may push to.
    let moved = format!("/v2/shared/blobs/uploads/{id}");
    assert_eq!(
        outcome(
            alice
                .req(reqwest::Method::PATCH, &moved)
                .body("x")
                .send()
                .unwrap()
        )
        .1,
        "BLOB_UPLOAD_UNKNOWN"
    );
    // The session is intact and finishes normally.
    let bytes = b"alice's layer";
    let r = alice
        .req(
            reqwest::Method::PUT,
            &format!("{location}?digest={}", sha256_digest(bytes)),
        )
        .body(bytes.to_vec())
        .send()
        .unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().unwrap());
}

#[test]
fn mount_needs_pull_on_the_source() {
    let issuer = Issuer::new();
    let (berth, _dir) = token_berth(&[&issuer], "");
    let api = Api::new(&berth, None);
    let secret = b"secret layer of src";
    let digest = api
        .as_(issuer.auth(&[("repository", "src", &["pull", "push"])]))
        .push_blob("src", secret);
    let mount = format!("/v2/dst/blobs/uploads/?mount={digest}&from=src");

    // Push on dst only: no mount, a plain upload session instead (distribution's answer),
    // which says nothing about whether src has the blob.
    let dst_only = api.as_(issuer.auth(&[("repository", "dst", &["pull", "push"])]));
    let r = dst_only.req(reqwest::Method::POST, &mount).send().unwrap();
    assert_eq!(r.status(), 202);
    assert!(hdr(&r, "location").contains("/v2/dst/blobs/uploads/"));
    let head = dst_only
        .req(reqwest::Method::HEAD, &format!("/v2/dst/blobs/{digest}"))
        .send()
        .unwrap();
    assert_eq!(head.status(), 404);
    // Without credentials the challenge asks for both scopes.
    let (status, _, challenge) = outcome(api.req(reqwest::Method::POST, &mount).send().unwrap());
    assert_eq!(status, 401);
    assert!(
        challenge.contains("scope=\"repository:dst:pull,push repository:src:pull\""),
        "{challenge}"
    );
    // Pull on src and push on dst: mounted.
    let both = api.as_(issuer.auth(&[
        ("repository", "dst", &["pull", "push"]),
        ("repository", "src", &["pull"]),
    ]));
    let r = both.req(reqwest::Method::POST, &mount).send().unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(both.get(&format!("/v2/dst/blobs/{digest}")).status(), 200);
    // Pull on src without push on dst: denied.
    let src_only = api.as_(issuer.auth(&[("repository", "src", &["pull"])]));
    assert_eq!(
        outcome(src_only.req(reqwest::Method::POST, &mount).send().unwrap()).1,
        "DENIED"
    );
}

#[test]
fn anonymous_pull_patterns() {
    // htpasswd mode.
    let (berth, _dir) = htpasswd_berth(
        &[("alice", "pw")],
        "  anonymous_pull: [\"public/*\", \"docs\"]\n",
    );
    let anon = Api::new(&berth, None);
    let alice = anon.as_(Some(basic("alice", "pw")));
    alice.push_image("public/app", "v1");
    alice.push_image("public/deep/app", "v1");
    alice.push_image("docs", "v1");
    alice.push_image("private/app", "v1");
    for repo in ["public/app", "public/deep/app", "docs"] {
        assert_eq!(
            anon.get(&format!("/v2/{repo}/manifests/v1")).status(),
            200,
            "{repo}"
        );
        assert_eq!(
            anon.get(&format!("/v2/{repo}/tags/list")).status(),
            200,
            "{repo}"
        );
        // containers/image sends empty Basic credentials when it has none.
        let empty = anon.as_(Some(basic("", "")));
        assert_eq!(empty.get(&format!("/v2/{repo}/manifests/v1")).status(), 200);
    }
    for repo in ["private/app", "publicity", "docs2"] {
        let (status, _, challenge) = outcome(anon.get(&format!("/v2/{repo}/manifests/v1")));
        assert_eq!(status, 401, "{repo}");
        assert!(challenge.starts_with("Basic"));
    }
    // Pull only: no anonymous push, delete or catalog.
    assert_eq!(outcome(anon.post_blob("public/app", b"x")).0, 401);
    let r = anon
        .req(reqwest::Method::DELETE, "/v2/public/app/manifests/v1")
        .send()
        .unwrap();
    assert_eq!(outcome(r).0, 401);
    assert_eq!(outcome(anon.get("/v2/_catalog")).0, 401);
    // Wrong credentials are not anonymous.
    assert_eq!(
        outcome(
            anon.as_(Some(basic("alice", "nope")))
                .get("/v2/public/app/manifests/v1")
        )
        .0,
        401
    );

    // Token mode: public repositories need no token; others answer the bearer challenge.
    let issuer = Issuer::new();
    let (berth, _dir) = token_berth(&[&issuer], "  anonymous_pull: [\"public/*\"]\n");
    let anon = Api::new(&berth, None);
    anon.as_(issuer.auth(&[("repository", "public/x", &["pull", "push"])]))
        .push_image("public/x", "v1");
    assert_eq!(anon.get("/v2/public/x/manifests/v1").status(), 200);
    // A token for something else still pulls public repositories.
    let other = anon.as_(issuer.auth(&[("repository", "mine", &["pull"])]));
    assert_eq!(other.get("/v2/public/x/manifests/v1").status(), 200);
    let (status, _, challenge) = outcome(anon.get("/v2/private/x/manifests/v1"));
    assert_eq!(status, 401);
    assert!(
        challenge.contains("scope=\"repository:private/x:pull\""),
        "{challenge}"
    );
    assert_eq!(outcome(anon.post_blob("public/x", b"y")).0, 401);
}

// ---------------------------------------------------------------------------------------------
// TLS

/// A CA and a server certificate for 127.0.0.1 / localhost signed by it.
struct Pki {
    ca_pem: String,
    ca_params: rcgen::CertificateParams,
    ca_key: rcgen::KeyPair,
}

impl Pki {
    fn new(name: &str) -> Pki {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = params.self_signed(&ca_key).unwrap();
        Pki {
            ca_pem: ca_cert.pem(),
            ca_params: params,
            ca_key,
        }
    }

    /// (certificate PEM, key PEM) for `sans` (IP addresses or DNS names).
    fn issue(&self, sans: &[&str], client: bool) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params =
            rcgen::CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        params.extended_key_usages = vec![if client {
            rcgen::ExtendedKeyUsagePurpose::ClientAuth
        } else {
            rcgen::ExtendedKeyUsagePurpose::ServerAuth
        }];
        let issuer = rcgen::Issuer::from_params(&self.ca_params, &self.ca_key);
        let cert = params.signed_by(&key, &issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    /// Writes a server certificate for 127.0.0.1 and localhost into `dir`.
    fn write_server(&self, dir: &Path) -> (PathBuf, PathBuf) {
        let (cert, key) = self.issue(&["127.0.0.1", "localhost"], false);
        let (c, k) = (dir.join("server.crt"), dir.join("server.key"));
        std::fs::write(&c, cert).unwrap();
        std::fs::write(&k, key).unwrap();
        (c, k)
    }
}

fn tls_yaml(cert: &Path, key: &Path, extra: &str) -> String {
    format!(
        "tls:\n  certificate: {}\n  key: {}\n{extra}",
        cert.display(),
        key.display()
    )
}

#[test]
fn tls_http1_http2_and_reload() {
    let pki = Pki::new("berth test CA");
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = pki.write_server(dir.path());
    let tls = TlsClient {
        ca_pem: pki.ca_pem.clone().into_bytes(),
        identity_pem: None,
    };
    let berth = Berth::start_tls(&tls_yaml(&cert, &key, ""), tls.clone());
    let url = berth.url("/v2/");
    assert!(url.starts_with("https://"));

    // HTTP/1.1 and HTTP/2 (ALPN) with the CA trusted.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let h1 = reqwest::blocking::Client::builder()
        .tls_certs_only(reqwest::Certificate::from_pem_bundle(&tls.ca_pem).unwrap())
        .http1_only()
        .build()
        .unwrap();
    let r = h1.get(&url).send().unwrap();
    assert_eq!(
        (r.status().as_u16(), r.version()),
        (200, reqwest::Version::HTTP_11)
    );
    let c = tls_client(&tls);
    let r = c.get(&url).send().unwrap();
    assert_eq!(
        (r.status().as_u16(), r.version()),
        (200, reqwest::Version::HTTP_2)
    );
    // A push and pull over HTTP/2.
    let api = Api {
        c: c.clone(),
        base: berth.url(""),
        auth: None,
    };
    let digest = api.push_image("tls/app", "v1");
    let r = api.get("/v2/tls/app/manifests/v1");
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    assert_eq!(hdr(&r, "docker-content-digest"), digest);
    let blob = api.get(&format!(
        "/v2/tls/app/blobs/{}",
        sha256_digest(b"layer of tls/app")
    ));
    assert_eq!(blob.bytes().unwrap().as_ref(), b"layer of tls/app");

    // Without the CA the certificate is refused; plain HTTP gets no HTTP answer.
    assert!(client().get(&url).send().is_err());
    assert!(client()
        .get(url.replace("https://", "http://"))
        .timeout(Duration::from_secs(5))
        .send()
        .map(|r| r.status() != 200)
        .unwrap_or(true));

    // SIGHUP: a certificate from another CA replaces the first one for new connections.
    let pki2 = Pki::new("second CA");
    pki2.write_server(dir.path());
    berth.signal(libc::SIGHUP);
    let tls2 = TlsClient {
        ca_pem: pki2.ca_pem.clone().into_bytes(),
        identity_pem: None,
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(r) = tls_client(&tls2).get(&url).send() {
            assert_eq!(r.status(), 200);
            break;
        }
        assert!(Instant::now() < deadline, "not reloaded:\n{}", berth.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(tls_client(&tls).get(&url).send().is_err());
    // A broken certificate file: the reload is refused and the current one stays.
    std::fs::write(&cert, "garbage").unwrap();
    berth.signal(libc::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !berth.log().contains("TLS certificate not reloaded") {
        assert!(Instant::now() < deadline, "{}", berth.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(tls_client(&tls2).get(&url).send().unwrap().status(), 200);
}

#[test]
fn mtls_requires_a_client_certificate() {
    let pki = Pki::new("server CA");
    let clients = Pki::new("client CA");
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = pki.write_server(dir.path());
    let client_ca = dir.path().join("clients.pem");
    std::fs::write(&client_ca, &clients.ca_pem).unwrap();
    let (ccert, ckey) = clients.issue(&["client.example"], true);
    let tls = TlsClient {
        ca_pem: pki.ca_pem.clone().into_bytes(),
        identity_pem: Some(format!("{ccert}{ckey}").into_bytes()),
    };
    let yaml = tls_yaml(
        &cert,
        &key,
        &format!("  clientcas: [{}]\n", client_ca.display()),
    );
    let berth = Berth::start_tls(&yaml, tls.clone());
    let url = berth.url("/v2/");
    assert_eq!(tls_client(&tls).get(&url).send().unwrap().status(), 200);
    // No client certificate, or one from another CA: the handshake fails.
    let no_id = TlsClient {
        identity_pem: None,
        ..tls.clone()
    };
    assert!(tls_client(&no_id).get(&url).send().is_err());
    let (scert, skey) = pki.issue(&["client.example"], true);
    let wrong = TlsClient {
        identity_pem: Some(format!("{scert}{skey}").into_bytes()),
        ..tls.clone()
    };
    assert!(tls_client(&wrong).get(&url).send().is_err());

    // SIGHUP with another client CA in the file: its certificates are let in on new
    // connections, the old CA's are not.
    let others = Pki::new("second client CA");
    std::fs::write(&client_ca, &others.ca_pem).unwrap();
    let (ocert, okey) = others.issue(&["client.example"], true);
    let other = TlsClient {
        identity_pem: Some(format!("{ocert}{okey}").into_bytes()),
        ..tls.clone()
    };
    berth.signal(libc::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(10);
    while tls_client(&other).get(&url).send().is_err() {
        assert!(
            Instant::now() < deadline,
            "client CAs not reloaded:\n{}",
            berth.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(berth.log().contains("SIGHUP: tls.clientcas reloaded"));
    assert!(tls_client(&tls).get(&url).send().is_err());
    // A broken CA file: refused, the CAs in force stay.
    std::fs::write(&client_ca, "garbage").unwrap();
    berth.signal(libc::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !berth.log().contains("tls.clientcas not reloaded") {
        assert!(Instant::now() < deadline, "{}", berth.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(tls_client(&other).get(&url).send().unwrap().status(), 200);
}

#[test]
fn bad_tls_or_auth_files_stop_berth_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.pem");
    let cases = [
        (tls_yaml(&missing, &missing, ""), "tls.certificate"),
        (
            format!("auth:\n  htpasswd:\n    path: {}\n", missing.display()),
            "auth.htpasswd.path",
        ),
        (token_yaml(&missing, ""), "auth.token.rootcertbundle"),
    ];
    for (yaml, key) in cases {
        let (status, log) = Berth::start_expecting_exit(&yaml, None, Duration::from_secs(30))
            .unwrap_or_else(|| panic!("berth kept running with {yaml}"));
        assert!(!status.success());
        assert!(log.contains(key), "{key}: {log}");
    }
    // A non-bcrypt htpasswd entry.
    let p = dir.path().join("htpasswd");
    std::fs::write(&p, "alice:{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=\n").unwrap();
    let (_, log) = Berth::start_expecting_exit(
        &format!("auth:\n  htpasswd:\n    path: {}\n", p.display()),
        None,
        Duration::from_secs(30),
    )
    .unwrap();
    assert!(log.contains("only bcrypt"), "{log}");
}

// ---------------------------------------------------------------------------------------------
// skopeo over TLS with credentials

fn have_skopeo() -> bool {
    let ok = Command::new("skopeo")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        if std::env::var("BERTH_SKIP_CLIENT_TESTS").as_deref() == Ok("1") {
            eprintln!("SKIPPED: skopeo is not installed (BERTH_SKIP_CLIENT_TESTS=1)");
            return false;
        }
        panic!(
            "skopeo is not installed (apt-get install -y skopeo), or set BERTH_SKIP_CLIENT_TESTS=1"
        );
    }
    true
}

/// A one-image OCI layout (uncompressed tar layer) tagged `tag`; returns the layer digest.
fn oci_layout(dir: &Path, tag: &str) -> String {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let add = |bytes: &[u8]| {
        let d = sha256_digest(bytes);
        std::fs::write(blobs.join(&d[7..]), bytes).unwrap();
        d
    };
    // A tar with one file.
    let content = b"hello from an authenticated push\n";
    let mut h = [0u8; 512];
    h[..9].copy_from_slice(b"hello.txt");
    h[100..108].copy_from_slice(b"0000644\0");
    h[108..116].copy_from_slice(b"0000000\0");
    h[116..124].copy_from_slice(b"0000000\0");
    h[124..136].copy_from_slice(format!("{:011o}\0", content.len()).as_bytes());
    h[136..148].copy_from_slice(b"14500000000\0");
    h[148..156].copy_from_slice(b"        ");
    h[156] = b'0';
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    let sum: u32 = h.iter().map(|&b| b as u32).sum();
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    let mut tar = h.to_vec();
    tar.extend_from_slice(content);
    tar.resize(1024 + 1024, 0);
    let layer = add(&tar);
    let config = serde_json::to_vec(&json!({
        "architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [layer]},
    }))
    .unwrap();
    let config_digest = add(&config);
    let m = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer, "size": tar.len()}],
    }))
    .unwrap();
    let md = add(&m);
    let index = json!({
        "schemaVersion": 2,
        "manifests": [{"mediaType": OCI_MANIFEST, "digest": md, "size": m.len(),
            "annotations": {"org.opencontainers.image.ref.name": tag}}],
    });
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    layer
}

#[test]
fn skopeo_over_tls_with_htpasswd_credentials() {
    if !have_skopeo() {
        return;
    }
    let pki = Pki::new("skopeo test CA");
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = pki.write_server(dir.path());
    let users = htpasswd_file(dir.path(), &[("pusher", "correct horse")]);
    let certs_dir = dir.path().join("certs.d");
    std::fs::create_dir_all(&certs_dir).unwrap();
    std::fs::write(certs_dir.join("ca.crt"), &pki.ca_pem).unwrap();
    let yaml = tls_yaml(
        &cert,
        &key,
        &format!(
            "auth:\n  htpasswd:\n    realm: berth\n    path: {}\n",
            users.display()
        ),
    );
    let tls = TlsClient {
        ca_pem: pki.ca_pem.clone().into_bytes(),
        identity_pem: None,
    };
    let berth = Berth::start_tls(&yaml, tls);
    let layout = dir.path().join("layout");
    let layer = oci_layout(&layout, "v1");
    let auth_file = dir.path().join("auth.json");
    std::fs::write(&auth_file, "{}").unwrap();
    let target = format!("docker://127.0.0.1:{}/secure/app:v1", berth.port);
    let skopeo = |args: &[&str]| {
        let out = Command::new("skopeo")
            .arg("--insecure-policy")
            .args(args)
            .env("REGISTRY_AUTH_FILE", &auth_file)
            .output()
            .unwrap();
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };
    let certs = certs_dir.to_str().unwrap();
    let src = format!("oci:{}:v1", layout.display());

    // Wrong password: the push fails with an authentication error.
    let (ok, out) = skopeo(&[
        "copy",
        "--dest-cert-dir",
        certs,
        "--dest-creds",
        "pusher:wrong",
        &src,
        &target,
    ]);
    assert!(!ok, "push with wrong credentials succeeded: {out}");
    assert!(
        out.to_lowercase().contains("unauthorized") || out.contains("401"),
        "{out}"
    );
    // No credentials at all.
    let (ok, out) = skopeo(&["copy", "--dest-cert-dir", certs, &src, &target]);
    assert!(!ok, "anonymous push succeeded: {out}");
    // The CA not trusted.
    let (ok, out) = skopeo(&[
        "copy",
        "--dest-creds",
        "pusher:correct horse",
        &src,
        &target,
    ]);
    assert!(!ok, "push without the CA succeeded: {out}");
    assert!(out.contains("certificate"), "{out}");

    // Right credentials over TLS: push, then pull back.
    let (ok, out) = skopeo(&[
        "copy",
        "--preserve-digests",
        "--dest-cert-dir",
        certs,
        "--dest-creds",
        "pusher:correct horse",
        &src,
        &target,
    ]);
    assert!(ok, "push failed: {out}\nberth log:\n{}", berth.log());
    let pulled = dir.path().join("pulled");
    let dest = format!("oci:{}:v1", pulled.display());
    let (ok, out) = skopeo(&[
        "copy",
        "--dest-oci-accept-uncompressed-layers",
        "--src-cert-dir",
        certs,
        "--src-creds",
        "pusher:correct horse",
        &target,
        &dest,
    ]);
    assert!(ok, "pull failed: {out}\nberth log:\n{}", berth.log());
    assert!(pulled.join("blobs/sha256").join(&layer[7..]).exists());
    let (ok, out) = skopeo(&[
        "copy",
        "--src-cert-dir",
        certs,
        "--src-creds",
        "pusher:wrong",
        &target,
        &dest,
    ]);
    assert!(!ok, "pull with wrong credentials succeeded: {out}");
}

// ---------------------------------------------------------------------------------------------
// the object store behind TLS with a private CA

/// A TLS terminator in front of a plain-HTTP S3 server: an https:// object store.
struct TlsFront {
    port: u16,
    _rt: tokio::runtime::Runtime,
}

impl TlsFront {
    fn start(backend: &str, cert_pem: &str, key_pem: &str) -> TlsFront {
        use rustls::pki_types::pem::PemObject;
        let _ = rustls::crypto::ring::default_provider().install_default();
        let certs: Vec<_> = rustls::pki_types::CertificateDer::pem_slice_iter(cert_pem.as_bytes())
            .collect::<Result<_, _>>()
            .unwrap();
        let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap();
        let config = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
        let backend = backend.trim_start_matches("http://").to_string();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let port = listener.local_addr().unwrap().port();
        rt.spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let acceptor = acceptor.clone();
                let backend = backend.clone();
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let Ok(mut plain) = tokio::net::TcpStream::connect(&backend).await else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
                });
            }
        });
        TlsFront { port, _rt: rt }
    }
}

#[test]
fn object_store_over_tls_with_a_private_ca() {
    let s3 = S3Server::start();
    let pki = Pki::new("object store CA");
    let (cert, key) = pki.issue(&["127.0.0.1"], false);
    let front = TlsFront::start(&s3.endpoint, &cert, &key);
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("s3-ca.pem");
    std::fs::write(&ca, &pki.ca_pem).unwrap();
    let storage = |extra: &str| {
        format!(
            "storage:\n  endpoint: https://127.0.0.1:{}\n  region: us-east-1\n  bucket: {S3_BUCKET}\n  access_key: {S3_ACCESS_KEY}\n  secret_key: {S3_SECRET_KEY}\n  path_style: true\n{extra}",
            front.port
        )
    };

    // Without the CA the object store's certificate is not trusted: berth does not start.
    let (status, log) = Berth::start_expecting_exit(&storage(""), None, Duration::from_secs(60))
        .expect("berth started against an untrusted object store");
    assert!(!status.success());
    assert!(
        log.to_lowercase().contains("certificate") || log.contains("object store"),
        "{log}"
    );

    // With storage.ca_bundle: uploads (reqwest) and proxied blob GETs (pingora) both verify
    // against the private CA.
    let berth = Berth::start(&storage(&format!("  ca_bundle: {}\n", ca.display())));
    let api = Api::new(&berth, None);
    let layer = vec![7u8; 300_000];
    let digest = api.push_blob("tls-store/app", &layer);
    let r = api.get(&format!("/v2/tls-store/app/blobs/{digest}"));
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().unwrap().len(), layer.len());
    // The bytes really went through the TLS front into the S3 server.
    assert!(!s3.object_files().is_empty());

    // A bundle that is not the object store's CA: berth refuses to start.
    let other = Pki::new("unrelated CA");
    std::fs::write(&ca, &other.ca_pem).unwrap();
    let (status, _) = Berth::start_expecting_exit(
        &storage(&format!("  ca_bundle: {}\n", ca.display())),
        None,
        Duration::from_secs(60),
    )
    .expect("berth started with the wrong CA bundle");
    assert!(!status.success());
}

// ---------------------------------------------------------------------------------------------
// limits

#[test]
fn max_blob_size_is_enforced_up_front_and_while_streaming() {
    let berth = Berth::start("limits:\n  max_blob_size: 1KiB\n");
    let api = Api::new(&berth, None);
    // Exactly at the limit: fine.
    api.push_blob("lim", &[1u8; 1024]);
    // Monolithic with Content-Length over the limit: refused before reading.
    let (status, code, _) = outcome(api.post_blob("lim", &[2u8; 1025]));
    assert_eq!((status, code.as_str()), (413, "SIZE_INVALID"));

    // Chunked (no Content-Length): refused once the bytes pass the limit.
    let r = api.start_upload("lim");
    assert_eq!(r.status(), 202);
    let loc = hdr(&r, "location");
    let body = reqwest::blocking::Body::new(std::io::Cursor::new(vec![3u8; 4096]));
    let r = api
        .req(reqwest::Method::PATCH, &loc)
        .body(body)
        .send()
        .unwrap();
    assert_eq!(outcome(r).1, "SIZE_INVALID");

    // Chunks that add up past the limit: the second is refused by its Content-Length.
    let r = api.start_upload("lim");
    let loc = hdr(&r, "location");
    let r = api
        .req(reqwest::Method::PATCH, &loc)
        .body(vec![4u8; 1000])
        .send()
        .unwrap();
    assert_eq!(r.status(), 202);
    let loc = hdr(&r, "location");
    let r = api
        .req(reqwest::Method::PATCH, &loc)
        .header("Content-Range", "1000-1099")
        .body(vec![4u8; 100])
        .send()
        .unwrap();
    let (status, code, _) = outcome(r);
    assert_eq!((status, code.as_str()), (413, "SIZE_INVALID"));
    // The final PUT too.
    let mut whole = vec![4u8; 1000];
    whole.extend_from_slice(&[5u8; 100]);
    let r = api
        .req(
            reqwest::Method::PUT,
            &format!("{loc}?digest={}", sha256_digest(&whole)),
        )
        .body(vec![5u8; 100])
        .send()
        .unwrap();
    assert_eq!(outcome(r).1, "SIZE_INVALID");
    // Within the limit the session still finishes.
    let mut fits = vec![4u8; 1000];
    fits.extend_from_slice(&[6u8; 24]);
    let r = api
        .req(
            reqwest::Method::PUT,
            &format!("{loc}?digest={}", sha256_digest(&fits)),
        )
        .body(vec![6u8; 24])
        .send()
        .unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().unwrap());
}

#[test]
fn max_concurrent_uploads_answers_429() {
    let berth = Berth::start("limits:\n  max_concurrent_uploads: 1\n");
    let api = Api::new(&berth, None);
    let first = hdr(&api.start_upload("busy"), "location");
    let second = hdr(&api.start_upload("busy"), "location");

    // A chunked PATCH that keeps its upload slot: headers and one chunk, then nothing.
    let hold_slot = || {
        let mut slow = TcpStream::connect(("127.0.0.1", berth.port)).unwrap();
        write!(
            slow,
            "PATCH {first} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\n\r\n400\r\n{}\r\n",
            "a".repeat(1024)
        )
        .unwrap();
        slow.flush().unwrap();
        slow
    };
    let mut slow = hold_slot();

    // Meanwhile another upload request is refused with 429 and Retry-After. The probe and
    // the slow PATCH race for the one slot: if the probe won, the slow PATCH was the one
    // refused (it has an answer waiting) and is sent again.
    let deadline = Instant::now() + Duration::from_secs(10);
    let refused = loop {
        let r = api
            .req(reqwest::Method::PATCH, &second)
            .body(vec![1u8; 10])
            .send()
            .unwrap();
        if r.status() == 429 {
            break r;
        }
        assert!(Instant::now() < deadline, "never refused: {}", r.status());
        slow.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let mut answer = [0u8; 12];
        match slow.read(&mut answer) {
            Ok(_) => {
                assert_eq!(&answer, b"HTTP/1.1 429", "the slow PATCH was answered");
                slow = hold_slot();
            }
            Err(e) => assert!(
                matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ),
                "{e}"
            ),
        }
        slow.set_read_timeout(None).unwrap();
    };
    assert_eq!(hdr(&refused, "retry-after"), "2");
    let body = refused.text().unwrap();
    assert_eq!(error_code(&body), "TOOMANYREQUESTS");
    assert!(body.contains("max_concurrent_uploads"), "{body}");
    // Reads are not uploads: not limited.
    assert_eq!(api.get("/v2/busy/tags/list").status(), 404);
    let (status, code, _) = outcome(api.post_blob("busy", b"mono"));
    assert_eq!((status, code.as_str()), (429, "TOOMANYREQUESTS"));

    // The slow upload finishes; its slot is free again.
    write!(slow, "0\r\n\r\n").unwrap();
    let mut resp = [0u8; 12];
    slow.read_exact(&mut resp).unwrap();
    assert_eq!(&resp, b"HTTP/1.1 202");
    drop(slow);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = api.post_blob("busy", b"mono");
        if r.status() == 201 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "slot not released: {}",
            r.status()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn oversized_headers_answer_431() {
    let berth = Berth::start("limits:\n  max_header_bytes: 4KiB\n");
    let api = Api::new(&berth, None);
    let r = api
        .req(reqwest::Method::GET, "/v2/")
        .header("X-Padding", "p".repeat(8 * 1024))
        .send()
        .unwrap();
    let (status, code, _) = outcome(r);
    assert_eq!((status, code.as_str()), (431, "SIZE_INVALID"));
    let r = api
        .req(reqwest::Method::GET, "/v2/")
        .header("X-Padding", "p".repeat(1024))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[test]
fn slow_clients_are_cut_off() {
    let berth = Berth::start("limits:\n  read_timeout: 1s\n  idle_timeout: 1s\n");
    let api = Api::new(&berth, None);
    let loc = hdr(&api.start_upload("slow"), "location");

    // A request body that stalls: the request fails after read_timeout (pingora's default
    // is 60 s) and the connection closes.
    let mut s = TcpStream::connect(("127.0.0.1", berth.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(
        s,
        "PATCH {loc} HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n"
    )
    .unwrap();
    let start = Instant::now();
    let mut answer = Vec::new();
    s.read_to_end(&mut answer).unwrap();
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(10),
        "{waited:?}"
    );
    let answer = String::from_utf8_lossy(&answer);
    assert!(!answer.starts_with("HTTP/1.1 202"), "{answer}");

    // An idle keep-alive connection is closed after idle_timeout (pingora's default: 60 s).
    let mut s = TcpStream::connect(("127.0.0.1", berth.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(s, "GET /v2/ HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").unwrap();
    let start = Instant::now();
    let mut answer = Vec::new();
    s.read_to_end(&mut answer).unwrap();
    let waited = start.elapsed();
    assert!(String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 200"));
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(10),
        "{waited:?}"
    );
}
