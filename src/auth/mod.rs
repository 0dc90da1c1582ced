//! Authentication, authorization and limits: everything a request must pass before its
//! handler runs ([`Guard::admit`], called from the pingora service for every routed request).
//!
//! - [`access`]: what each endpoint needs (pull / push / delete / catalog) and what a caller
//!   is granted.
//! - [`htpasswd`]: `auth.htpasswd` (HTTP Basic, bcrypt entries).
//! - [`token`]: `auth.token` (Docker token protocol, bearer JWTs).
//! - [`limits`]: `limits.*` (header size, timeouts, concurrent uploads, blob size).
//!
//! Answers: 401 UNAUTHORIZED with a `WWW-Authenticate` challenge for missing or invalid
//! credentials; 403 DENIED for valid credentials without the access (with a bearer challenge
//! naming the scope and `error="insufficient_scope"` in token mode). Credentials and tokens
//! never reach a log line; failed logins count in `berth_auth_failures_total`.

pub mod access;
pub mod htpasswd;
pub mod limits;
pub mod token;

use std::sync::{Arc, LazyLock};

use async_trait::async_trait;
use base64::Engine as _;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use pingora_http::RequestHeader;
use pingora_proxy::Session;
use prometheus::{IntCounter, IntCounterVec, Opts};
use tokio::sync::OwnedSemaphorePermit;

use crate::config::{AuthMode, Config, LimitsConfig};
use crate::http::endpoint::Endpoint;
use crate::registry::{RegistryError, RegistryResult};
use access::{AnonymousPull, Need, Principal};
use limits::{BlobLimit, Limits};

/// Failed logins by reason: `bad_credentials` (htpasswd user or password), `invalid_token`
/// (signature, expiry, issuer, audience), `malformed` (an Authorization header berth cannot
/// read, or of the wrong scheme).
pub struct AuthFailures {
    pub bad_credentials: IntCounter,
    pub invalid_token: IntCounter,
    pub malformed: IntCounter,
}

pub static AUTH_FAILURES: LazyLock<AuthFailures> = LazyLock::new(|| {
    let c = IntCounterVec::new(
        Opts::new(
            "berth_auth_failures_total",
            "Requests refused for invalid credentials, by reason: bad_credentials, invalid_token, malformed.",
        ),
        &["reason"],
    )
    .expect("metric");
    crate::metrics::REGISTRY
        .register(Box::new(c.clone()))
        .expect("register berth_auth_failures_total");
    AuthFailures {
        bad_credentials: c.with_label_values(&["bad_credentials"]),
        invalid_token: c.with_label_values(&["invalid_token"]),
        malformed: c.with_label_values(&["malformed"]),
    }
});

enum Authenticator {
    None,
    Htpasswd {
        realm: String,
        file: htpasswd::Htpasswd,
    },
    Token {
        realm: String,
        service: String,
        verifier: token::TokenVerifier,
    },
}

/// The checks every request passes before its handler.
pub struct Guard {
    auth: Authenticator,
    anonymous: AnonymousPull,
    pub limits: Limits,
}

/// A request let through; holds its upload slot, if it takes one, until dropped.
pub struct Admission {
    /// The verified user name or token subject, for the access log.
    pub user: Option<String>,
    _upload_slot: Option<OwnedSemaphorePermit>,
}

enum Credentials {
    None,
    Basic { user: String, password: String },
    Bearer(String),
    Malformed,
}

impl Guard {
    /// No authentication, default limits.
    pub fn open() -> Guard {
        Guard {
            auth: Authenticator::None,
            anonymous: AnonymousPull::default(),
            limits: Limits::new(&LimitsConfig::default()),
        }
    }

    /// Loads the htpasswd file or the token root certificates the config names.
    pub fn from_config(c: &Config) -> Result<Guard, String> {
        let auth = match &c.auth.mode {
            AuthMode::None => Authenticator::None,
            AuthMode::Htpasswd { realm, path } => Authenticator::Htpasswd {
                realm: realm.clone(),
                file: htpasswd::Htpasswd::load(path)?,
            },
            AuthMode::Token {
                realm,
                service,
                issuer,
                root_cert_bundle,
            } => Authenticator::Token {
                realm: realm.clone(),
                service: service.clone(),
                verifier: token::TokenVerifier::load(root_cert_bundle, issuer, service)?,
            },
        };
        if !matches!(auth, Authenticator::None) {
            LazyLock::force(&AUTH_FAILURES);
        }
        Ok(Guard {
            auth,
            anonymous: AnonymousPull::new(&c.auth.anonymous_pull),
            limits: Limits::new(&c.limits),
        })
    }

    /// Re-reads the htpasswd file or the token root certificates (SIGHUP). On error the
    /// previous ones stay in force.
    pub fn reload(&self) -> Result<Option<String>, String> {
        match &self.auth {
            Authenticator::None => Ok(None),
            Authenticator::Htpasswd { file, .. } => {
                file.reload().map(|n| Some(format!("htpasswd: {n} users")))
            }
            Authenticator::Token { verifier, .. } => verifier
                .reload()
                .map(|n| Some(format!("token root certificates: {n} keys"))),
        }
    }

    pub fn blob_limit(&self) -> BlobLimit {
        BlobLimit(self.limits.max_blob_size)
    }

    /// Applies the timeouts, checks header size, credentials and access, and takes an upload
    /// slot if the request streams upload bytes. May turn a cross-repository mount into a
    /// plain upload when the caller may not pull the source.
    pub async fn admit(
        &self,
        session: &mut Session,
        ep: &mut Endpoint,
    ) -> RegistryResult<Admission> {
        session.set_read_timeout(Some(self.limits.read_timeout));
        session.set_keepalive(Some(self.limits.idle_timeout.as_secs().max(1)));
        self.limits.check_header(session.req_header())?;
        let principal = self.authorize(session.req_header(), ep).await?;
        let user = match principal {
            Principal::Anonymous => None,
            Principal::User(name) => Some(name),
            Principal::Token { subject, .. } => Some(subject).filter(|s| !s.is_empty()),
        }
        // One token in a log line, whatever the name holds.
        .map(|u| u.replace(|c: char| c.is_whitespace() || c.is_control(), "_"));
        Ok(Admission {
            user,
            _upload_slot: self.limits.upload_slot(ep)?,
        })
    }

    /// Who is asking and whether they may; see the module documentation for the answers.
    pub async fn authorize(
        &self,
        req: &RequestHeader,
        ep: &mut Endpoint,
    ) -> RegistryResult<Principal> {
        let principal = {
            let need = access::need(ep);
            if matches!(self.auth, Authenticator::None) || need == Need::Nothing {
                return Ok(Principal::Anonymous);
            }
            let from = access::mount_source(ep);
            let principal = self.authenticate(req, &need, from).await?;
            if !principal.satisfies(&need, &self.anonymous) {
                return Err(if principal.is_anonymous() {
                    RegistryError::Unauthorized {
                        challenge: self.challenge(&need, from, None),
                    }
                } else {
                    RegistryError::Denied {
                        challenge: match self.auth {
                            Authenticator::Token { .. } => {
                                Some(self.challenge(&need, from, Some("insufficient_scope")))
                            }
                            _ => None,
                        },
                    }
                });
            }
            principal
        };
        // A mount from a repository the caller may not pull becomes a plain upload: the
        // blob's presence there is not revealed.
        let may_pull_source = access::mount_source(ep)
            .is_none_or(|from| principal.may(from, access::Action::Pull, &self.anonymous));
        if !may_pull_source {
            access::drop_mount_source(ep);
        }
        Ok(principal)
    }

    async fn authenticate(
        &self,
        req: &RequestHeader,
        need: &Need<'_>,
        from: Option<&str>,
    ) -> RegistryResult<Principal> {
        let unauthorized = |error: Option<&str>| RegistryError::Unauthorized {
            challenge: self.challenge(need, from, error),
        };
        match (&self.auth, credentials(req)) {
            (_, Credentials::None) => Ok(Principal::Anonymous),
            (Authenticator::Htpasswd { file, .. }, Credentials::Basic { user, password }) => {
                if file.verify(&user, &password).await {
                    Ok(Principal::User(user))
                } else {
                    AUTH_FAILURES.bad_credentials.inc();
                    log::info!("authentication failed: wrong user name or password");
                    Err(unauthorized(None))
                }
            }
            (Authenticator::Token { verifier, .. }, Credentials::Bearer(t)) => {
                match verifier.verify(&t) {
                    Ok(v) => Ok(Principal::Token {
                        subject: v.subject,
                        grants: v.grants,
                    }),
                    Err(why) => {
                        AUTH_FAILURES.invalid_token.inc();
                        log::info!("authentication failed: invalid token: {why}");
                        Err(unauthorized(Some("invalid_token")))
                    }
                }
            }
            _ => {
                AUTH_FAILURES.malformed.inc();
                log::info!(
                    "authentication failed: unreadable Authorization header or wrong scheme"
                );
                Err(unauthorized(None))
            }
        }
    }

    /// The WWW-Authenticate value for `need` (and a mount's source).
    fn challenge(&self, need: &Need, from: Option<&str>, error: Option<&str>) -> String {
        match &self.auth {
            Authenticator::None => String::new(),
            Authenticator::Htpasswd { realm, .. } => format!("Basic realm=\"{realm}\""),
            Authenticator::Token { realm, service, .. } => {
                let mut scopes: Vec<String> = access::scope(need).into_iter().collect();
                if let Some(from) = from {
                    scopes.push(format!("repository:{from}:pull"));
                }
                let mut c = format!("Bearer realm=\"{realm}\",service=\"{service}\"");
                if !scopes.is_empty() {
                    c.push_str(&format!(",scope=\"{}\"", scopes.join(" ")));
                }
                if let Some(e) = error {
                    c.push_str(&format!(",error=\"{e}\""));
                }
                c
            }
        }
    }
}

/// Reads the Authorization header. Basic with an empty user name and password (what
/// containers/image sends when it has no credentials) counts as no credentials.
fn credentials(req: &RequestHeader) -> Credentials {
    let Some(value) = req.headers.get(http::header::AUTHORIZATION) else {
        return Credentials::None;
    };
    let Ok(value) = value.to_str() else {
        return Credentials::Malformed;
    };
    let Some((scheme, rest)) = value.trim().split_once(' ') else {
        return Credentials::Malformed;
    };
    let rest = rest.trim();
    if scheme.eq_ignore_ascii_case("basic") {
        let Ok(raw) = base64::engine::general_purpose::STANDARD.decode(rest) else {
            return Credentials::Malformed;
        };
        let Ok(text) = String::from_utf8(raw) else {
            return Credentials::Malformed;
        };
        match text.split_once(':') {
            Some(("", "")) => Credentials::None,
            Some((user, password)) => Credentials::Basic {
                user: user.to_string(),
                password: password.to_string(),
            },
            None => Credentials::Malformed,
        }
    } else if scheme.eq_ignore_ascii_case("bearer") && !rest.is_empty() {
        Credentials::Bearer(rest.to_string())
    } else {
        Credentials::Malformed
    }
}

/// SIGHUP: reload the TLS certificate and key, the client CAs, and the htpasswd file or the
/// token root certificates. What fails to load is logged and the previous version stays in
/// force.
pub struct HangupReload {
    pub guard: Arc<Guard>,
    pub tls: Option<Arc<crate::tls::TlsFiles>>,
}

impl HangupReload {
    pub fn reload(&self) {
        for outcome in self.tls.iter().flat_map(|tls| tls.reload()) {
            match outcome {
                Ok(what) => log::info!("SIGHUP: {what} reloaded"),
                Err(e) => log::error!("SIGHUP: {e}"),
            }
        }
        match self.guard.reload() {
            Ok(Some(what)) => log::info!("SIGHUP: reloaded {what}"),
            Ok(None) => {}
            Err(e) => log::error!("SIGHUP: authentication not reloaded: {e}"),
        }
    }
}

#[async_trait]
impl BackgroundService for HangupReload {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        use tokio::signal::unix::{signal, SignalKind};
        let mut hup = match signal(SignalKind::hangup()) {
            Ok(s) => s,
            Err(e) => {
                log::error!("cannot listen for SIGHUP: {e}");
                return;
            }
        };
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                got = hup.recv() => match got {
                    Some(()) => self.reload(),
                    None => return,
                },
            }
        }
    }
}

/// Until the SIGHUP listener runs, a SIGHUP must not end the process (its default action).
pub fn ignore_sighup_until_listening() {
    // SAFETY: setting a signal disposition to SIG_IGN has no memory-safety requirements.
    unsafe {
        libc::signal(libc::SIGHUP, libc::SIG_IGN);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Overrides;

    fn guard(yaml: &str) -> Guard {
        let c = Config::from_yaml(yaml, &Overrides::default(), &|_| None).unwrap();
        Guard::from_config(&c).unwrap()
    }

    fn req(path: &str, auth: Option<&str>) -> RequestHeader {
        let mut r = RequestHeader::build("GET", path.as_bytes(), None).unwrap();
        if let Some(a) = auth {
            r.insert_header("Authorization", a).unwrap();
        }
        r
    }

    fn basic(user: &str, pw: &str) -> String {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pw}"))
        )
    }

    #[tokio::test]
    async fn htpasswd_mode() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("h");
        std::fs::write(&p, format!("u:{}\n", bcrypt::hash("pw", 4).unwrap())).unwrap();
        let g = guard(&format!(
            "auth:\n  htpasswd:\n    realm: reg\n    path: {}\n  anonymous_pull: [\"pub/*\"]\n",
            p.display()
        ));
        let mut ep = Endpoint::parse(&http::Method::GET, "/v2/a/tags/list", None).unwrap();
        let e = g.authorize(&req("/", None), &mut ep).await.unwrap_err();
        assert!(
            matches!(e, RegistryError::Unauthorized { ref challenge } if challenge == "Basic realm=\"reg\"")
        );
        let e = g
            .authorize(&req("/", Some(&basic("u", "bad"))), &mut ep)
            .await
            .unwrap_err();
        assert_eq!(e.status(), 401);
        assert!(g
            .authorize(&req("/", Some(&basic("u", "pw"))), &mut ep)
            .await
            .is_ok());
        let e = g
            .authorize(&req("/", Some("Bearer abc")), &mut ep)
            .await
            .unwrap_err();
        assert_eq!(e.status(), 401);
        // Anonymous pull of a public repository, with no header or with empty Basic.
        let mut public = Endpoint::parse(&http::Method::GET, "/v2/pub/x/tags/list", None).unwrap();
        assert!(g.authorize(&req("/", None), &mut public).await.is_ok());
        assert!(g
            .authorize(&req("/", Some(&basic("", ""))), &mut public)
            .await
            .is_ok());
        // The banner stays open; /v2/ needs credentials.
        let mut banner = Endpoint::parse(&http::Method::GET, "/", None).unwrap();
        assert!(g.authorize(&req("/", None), &mut banner).await.is_ok());
        let mut base = Endpoint::parse(&http::Method::GET, "/v2/", None).unwrap();
        assert_eq!(
            g.authorize(&req("/", None), &mut base)
                .await
                .unwrap_err()
                .status(),
            401
        );
    }

    #[test]
    fn credential_parsing() {
        assert!(matches!(credentials(&req("/", None)), Credentials::None));
        assert!(matches!(
            credentials(&req("/", Some(&basic("a", "b:c")))),
            Credentials::Basic { ref user, ref password } if user == "a" && password == "b:c"
        ));
        assert!(matches!(
            credentials(&req("/", Some("Basic !!!"))),
            Credentials::Malformed
        ));
        assert!(matches!(
            credentials(&req("/", Some("bearer tok"))),
            Credentials::Bearer(ref t) if t == "tok"
        ));
        assert!(matches!(
            credentials(&req("/", Some("Bearer "))),
            Credentials::Malformed
        ));
        assert!(matches!(
            credentials(&req("/", Some("Digest x"))),
            Credentials::Malformed
        ));
    }
}
