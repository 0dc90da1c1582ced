//! The client for one upstream registry: manifest and blob requests with the upstream's own
//! authentication, learned from its first 401 (anonymous, Basic, or the Docker token flow).
//!
//! Bearer tokens are cached per scope (`repository:<name>:pull`) until shortly before they
//! expire, so a pull costs one token request per repository, not one per blob.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine as _;
use http::{HeaderValue, Method, StatusCode};

use crate::metrics::MIRROR;
use crate::registry::names::Digest;
use crate::registry::RegistryError;

/// Accept header for manifests: every type berth stores.
const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
    application/vnd.oci.image.manifest.v1+json, \
    application/vnd.docker.distribution.manifest.list.v2+json, \
    application/vnd.docker.distribution.manifest.v2+json";

/// Tokens without `expires_in` last 60 s (the Docker token spec's default).
const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(60);
/// A token is renewed this long before it expires.
const TOKEN_MARGIN: Duration = Duration::from_secs(10);

pub struct Upstream {
    /// `https://host[:port]`, no trailing slash.
    base: String,
    http: reqwest::Client,
    /// Basic credentials, already encoded (`Basic dXNlcjpwYXNz`).
    basic: Option<HeaderValue>,
    /// What the upstream asked for on its last 401.
    scheme: Mutex<Scheme>,
    tokens: Mutex<HashMap<String, (HeaderValue, Instant)>>,
}

#[derive(Clone, Default)]
enum Scheme {
    #[default]
    Anonymous,
    Basic,
    Bearer {
        realm: String,
        service: Option<String>,
    },
}

/// A manifest as the upstream served it.
pub struct UpstreamManifest {
    pub digest: Digest,
    pub media_type: Option<String>,
    pub body: bytes::Bytes,
}

impl Upstream {
    pub fn new(
        remote_url: &str,
        username: Option<&str>,
        password: Option<&str>,
    ) -> Result<Upstream, String> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder()
            // Registries redirect blob GETs to their object store.
            .redirect(reqwest::redirect::Policy::limited(5))
            .no_proxy()
            .connect_timeout(Duration::from_secs(10))
            .pool_idle_timeout(Duration::from_secs(30))
            .tcp_nodelay(true)
            .build()
            .map_err(|e| e.to_string())?;
        let basic = match (username, password) {
            (Some(u), p) => {
                let raw = format!("{u}:{}", p.unwrap_or(""));
                let encoded = base64::engine::general_purpose::STANDARD.encode(raw);
                Some(
                    HeaderValue::from_str(&format!("Basic {encoded}"))
                        .map_err(|e| e.to_string())?,
                )
            }
            (None, _) => None,
        };
        Ok(Upstream {
            base: remote_url.trim_end_matches('/').to_string(),
            http,
            basic,
            scheme: Mutex::new(Scheme::Anonymous),
            tokens: Mutex::new(HashMap::new()),
        })
    }

    /// HEAD of a manifest: its digest (Docker-Content-Digest), None when the upstream has none.
    pub async fn manifest_digest(
        &self,
        repo: &str,
        reference: &str,
    ) -> Result<Option<Digest>, RegistryError> {
        let url = format!("{}/v2/{repo}/manifests/{reference}", self.base);
        let r = self.send(Method::HEAD, &url, repo, true).await?;
        match r.status() {
            StatusCode::OK => Ok(r
                .headers()
                .get("docker-content-digest")
                .and_then(|v| v.to_str().ok())
                .and_then(Digest::parse)),
            StatusCode::NOT_FOUND => Ok(None),
            s => Err(unexpected("manifest HEAD", s)),
        }
    }

    /// GET of a manifest; its digest is computed from the body (never trusted from a header).
    pub async fn manifest(
        &self,
        repo: &str,
        reference: &str,
    ) -> Result<Option<UpstreamManifest>, RegistryError> {
        let url = format!("{}/v2/{repo}/manifests/{reference}", self.base);
        let r = self.send(Method::GET, &url, repo, true).await?;
        match r.status() {
            StatusCode::OK => {
                let media_type = r
                    .headers()
                    .get(http::header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                let body = r
                    .bytes()
                    .await
                    .map_err(|e| upstream_error("manifest body", &e))?;
                MIRROR.upstream_bytes.inc_by(body.len() as u64);
                Ok(Some(UpstreamManifest {
                    digest: Digest::sha256_of(&body),
                    media_type,
                    body,
                }))
            }
            StatusCode::NOT_FOUND => Ok(None),
            s => Err(unexpected("manifest GET", s)),
        }
    }

    /// HEAD of a blob: its size, None when the upstream has none.
    pub async fn blob_size(
        &self,
        repo: &str,
        digest: &Digest,
    ) -> Result<Option<u64>, RegistryError> {
        let url = format!("{}/v2/{repo}/blobs/{digest}", self.base);
        let r = self.send(Method::HEAD, &url, repo, false).await?;
        match r.status() {
            StatusCode::OK => Ok(r
                .headers()
                .get(http::header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok())),
            StatusCode::NOT_FOUND => Ok(None),
            s => Err(unexpected("blob HEAD", s)),
        }
    }

    /// GET of a blob, body unread (streamed by the caller). None when the upstream has none.
    pub async fn blob(
        &self,
        repo: &str,
        digest: &Digest,
    ) -> Result<Option<reqwest::Response>, RegistryError> {
        let url = format!("{}/v2/{repo}/blobs/{digest}", self.base);
        let r = self.send(Method::GET, &url, repo, false).await?;
        match r.status() {
            StatusCode::OK => Ok(Some(r)),
            StatusCode::NOT_FOUND => Ok(None),
            s => Err(unexpected("blob GET", s)),
        }
    }

    /// Sends with the credentials the upstream wants; on a 401 learns its scheme and tries once
    /// more.
    async fn send(
        &self,
        method: Method,
        url: &str,
        repo: &str,
        manifest: bool,
    ) -> Result<reqwest::Response, RegistryError> {
        let mut learned = false;
        loop {
            let mut req = self.http.request(method.clone(), url);
            if manifest {
                req = req.header(http::header::ACCEPT, MANIFEST_ACCEPT);
            }
            if let Some(auth) = self.authorization(repo).await? {
                req = req.header(http::header::AUTHORIZATION, auth);
            }
            let r = match req.send().await {
                Ok(r) => r,
                Err(e) => {
                    MIRROR.upstream_requests("error").inc();
                    return Err(upstream_error("request", &e));
                }
            };
            if r.status() == StatusCode::UNAUTHORIZED && !learned {
                learned = true;
                let challenge = r
                    .headers()
                    .get(http::header::WWW_AUTHENTICATE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("");
                let scheme = parse_challenge(challenge);
                // A Basic challenge without credentials to offer cannot be answered.
                if matches!(scheme, Scheme::Basic) && self.basic.is_none() {
                    MIRROR.upstream_requests("unauthorized").inc();
                    return Err(RegistryError::Unavailable(
                        "the upstream registry wants credentials (proxy.username/password)".into(),
                    ));
                }
                *self.scheme.lock().expect("scheme lock") = scheme;
                self.tokens.lock().expect("token lock").remove(repo);
                continue;
            }
            let outcome = match r.status().as_u16() {
                200..=299 => "ok",
                404 => "not_found",
                401 | 403 => "unauthorized",
                _ => "error",
            };
            MIRROR.upstream_requests(outcome).inc();
            return Ok(r);
        }
    }

    async fn authorization(&self, repo: &str) -> Result<Option<HeaderValue>, RegistryError> {
        let scheme = self.scheme.lock().expect("scheme lock").clone();
        match scheme {
            Scheme::Anonymous => Ok(None),
            Scheme::Basic => Ok(self.basic.clone()),
            Scheme::Bearer { realm, service } => {
                if let Some((token, until)) = self.tokens.lock().expect("token lock").get(repo) {
                    if Instant::now() < *until {
                        return Ok(Some(token.clone()));
                    }
                }
                let (token, until) = self.fetch_token(&realm, service.as_deref(), repo).await?;
                self.tokens
                    .lock()
                    .expect("token lock")
                    .insert(repo.to_string(), (token.clone(), until));
                Ok(Some(token))
            }
        }
    }

    /// The Docker token flow: GET realm?service=..&scope=repository:<repo>:pull, with Basic
    /// credentials when configured.
    async fn fetch_token(
        &self,
        realm: &str,
        service: Option<&str>,
        repo: &str,
    ) -> Result<(HeaderValue, Instant), RegistryError> {
        let mut url = reqwest::Url::parse(realm).map_err(|e| {
            RegistryError::Unavailable(format!("the upstream's token realm {realm:?}: {e}"))
        })?;
        {
            let mut q = url.query_pairs_mut();
            q.append_pair("scope", &format!("repository:{repo}:pull"));
            if let Some(s) = service {
                q.append_pair("service", s);
            }
        }
        let mut req = self.http.get(url);
        if let Some(b) = &self.basic {
            req = req.header(http::header::AUTHORIZATION, b.clone());
        }
        let r = req.send().await.map_err(|e| {
            MIRROR.upstream_requests("error").inc();
            upstream_error("token request", &e)
        })?;
        if !r.status().is_success() {
            MIRROR.upstream_requests("unauthorized").inc();
            return Err(RegistryError::Unavailable(format!(
                "the upstream's token service answered HTTP {}",
                r.status().as_u16()
            )));
        }
        MIRROR.upstream_requests("token").inc();
        #[derive(serde::Deserialize)]
        struct TokenResponse {
            token: Option<String>,
            access_token: Option<String>,
            expires_in: Option<u64>,
        }
        let body = r
            .bytes()
            .await
            .map_err(|e| upstream_error("token response", &e))?;
        let t: TokenResponse = serde_json::from_slice(&body).map_err(|e| {
            RegistryError::Unavailable(format!("the upstream's token service: {e}"))
        })?;
        let token = t.token.or(t.access_token).ok_or_else(|| {
            RegistryError::Unavailable("the upstream's token service sent no token".into())
        })?;
        let lifetime = t
            .expires_in
            .map(Duration::from_secs)
            .unwrap_or(DEFAULT_TOKEN_LIFETIME);
        let header = HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| {
            RegistryError::Unavailable("the upstream sent an unusable token".into())
        })?;
        Ok((
            header,
            Instant::now() + lifetime.saturating_sub(TOKEN_MARGIN),
        ))
    }
}

/// `Bearer realm="https://auth",service="registry"` or `Basic realm="x"`.
fn parse_challenge(h: &str) -> Scheme {
    let (kind, params) = h.trim().split_once(' ').unwrap_or((h.trim(), ""));
    if kind.eq_ignore_ascii_case("basic") {
        return Scheme::Basic;
    }
    if !kind.eq_ignore_ascii_case("bearer") {
        return Scheme::Anonymous;
    }
    let mut realm = None;
    let mut service = None;
    for part in split_params(params) {
        if let Some((k, v)) = part.split_once('=') {
            let v = v.trim().trim_matches('"').to_string();
            match k.trim() {
                "realm" => realm = Some(v),
                "service" => service = Some(v),
                _ => {}
            }
        }
    }
    match realm {
        Some(realm) => Scheme::Bearer { realm, service },
        None => Scheme::Anonymous,
    }
}

/// Splits `a="x,y",b="z"` at the commas outside quotes.
fn split_params(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut start, mut quoted) = (0, false);
    for (i, c) in s.char_indices() {
        match c {
            '"' => quoted = !quoted,
            ',' if !quoted => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out
}

fn upstream_error(what: &str, e: &reqwest::Error) -> RegistryError {
    RegistryError::Unavailable(format!(
        "upstream registry {what}: {}",
        crate::storage::client::error_chain(e)
    ))
}

fn unexpected(what: &str, status: StatusCode) -> RegistryError {
    RegistryError::Unavailable(format!(
        "upstream registry answered the {what} with HTTP {}",
        status.as_u16()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges() {
        match parse_challenge(
            r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a:pull,push""#,
        ) {
            Scheme::Bearer { realm, service } => {
                assert_eq!(realm, "https://auth.example/token");
                assert_eq!(service.as_deref(), Some("registry.example"));
            }
            _ => panic!("not bearer"),
        }
        assert!(matches!(
            parse_challenge(r#"Basic realm="x""#),
            Scheme::Basic
        ));
        assert!(matches!(parse_challenge(""), Scheme::Anonymous));
        assert!(matches!(
            parse_challenge("Bearer service=\"x\""),
            Scheme::Anonymous
        ));
    }
}
