//! The pingora service. Every request is parsed into an [`Endpoint`] in `request_filter` and
//! answered there, except blob GETs in proxy mode: those go upstream to a presigned object-store
//! URL, and pingora streams the bytes through.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_error::{Error, ErrorType, Result};
use pingora_http::{RequestHeader, ResponseHeader};
use pingora_proxy::{FailToProxy, ProxyHttp, Session};

use super::access_log::{AccessLog, Entry};
use super::endpoint::{Endpoint, ROUTES, UNMATCHED_ROUTE};
use super::handlers::{handle, Outcome};
use super::response::{send_error, set, API_VERSION, API_VERSION_HEADER, JSON, RETRY_AFTER_SECS};
use crate::auth::Guard;
use crate::metrics::{StoreOp, BLOBS, HTTP, STORE};
use crate::registry::names::Digest;
use crate::registry::{Registry, RegistryError};
use crate::storage::Upstream;

/// How long a resolved object-store address is reused before resolving again.
const RESOLVE_TTL: Duration = Duration::from_secs(30);

pub struct BerthService {
    registry: Arc<Registry>,
    /// Authentication, access and limits, checked before every handler.
    guard: Arc<Guard>,
    access_log: AccessLog,
    upstream: Upstream,
    resolved: Mutex<Option<(Instant, SocketAddr)>>,
}

/// Per-request state.
pub struct RequestCtx {
    start: Instant,
    /// Index into [`ROUTES`].
    route_index: usize,
    route: &'static str,
    /// Set for a proxied blob GET.
    proxy: Option<ProxyTarget>,
    /// The authenticated user, for the access log.
    pub user: Option<String>,
    /// Replaces the upstream body when the object store answered with an error.
    error_body: Option<Bytes>,
}

struct ProxyTarget {
    path_and_query: String,
    digest: Digest,
    /// When the upstream request went out (GetObject is timed to its response header).
    sent: Option<Instant>,
}

impl BerthService {
    pub fn new(registry: Arc<Registry>) -> Self {
        let upstream = registry.store.upstream().clone();
        BerthService {
            registry,
            guard: Arc::new(Guard::open()),
            access_log: AccessLog::new(None),
            upstream,
            resolved: Mutex::new(None),
        }
    }

    /// Writes an access-log line per request to `log` (none by default).
    pub fn with_access_log(mut self, log: AccessLog) -> Self {
        self.access_log = log;
        self
    }

    /// Replaces the default guard (no authentication, default limits).
    pub fn with_guard(mut self, guard: Arc<Guard>) -> Self {
        self.guard = guard;
        self
    }

    async fn upstream_addr(&self) -> Result<SocketAddr> {
        if let Ok(ip) = self.upstream.host.parse::<std::net::IpAddr>() {
            return Ok(SocketAddr::new(ip, self.upstream.port));
        }
        if let Some((at, addr)) = *self.resolved.lock().expect("resolved") {
            if at.elapsed() < RESOLVE_TTL {
                return Ok(addr);
            }
        }
        let addr = tokio::net::lookup_host((self.upstream.host.as_str(), self.upstream.port))
            .await
            .ok()
            .and_then(|mut a| a.next())
            .ok_or_else(|| {
                Error::explain(
                    ErrorType::ConnectNoRoute,
                    format!("cannot resolve {}", self.upstream.host),
                )
            })?;
        *self.resolved.lock().expect("resolved") = Some((Instant::now(), addr));
        Ok(addr)
    }
}

#[async_trait]
impl ProxyHttp for BerthService {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx {
            start: Instant::now(),
            route_index: UNMATCHED_ROUTE,
            route: ROUTES[UNMATCHED_ROUTE],
            proxy: None,
            user: None,
            error_body: None,
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        let req = session.req_header();
        let head = req.method == http::Method::HEAD;
        let endpoint = Endpoint::parse(&req.method, req.uri.path(), req.uri.query());
        let mut endpoint = match endpoint {
            Ok(e) => e,
            Err(err) => {
                session.set_keepalive(None); // an unread body may follow
                send_error(session, &err, head).await?;
                return Ok(true);
            }
        };
        ctx.route_index = endpoint.route_index();
        ctx.route = endpoint.route();
        let reads_body = endpoint.reads_body();
        let result = match self.guard.admit(session, &mut endpoint).await {
            // The admission (an upload slot) is held until the handler is done.
            Ok(admission) => {
                ctx.user = admission.user.clone();
                if reads_body && expects_continue(session.req_header()) {
                    session.write_continue_response().await?;
                }
                let blob_limit = self.guard.blob_limit();
                handle(&self.registry, session, endpoint, blob_limit).await
            }
            Err(err) => Err(err),
        };
        match result {
            Ok(Outcome::Done) => Ok(true),
            Ok(Outcome::Proxy {
                path_and_query,
                digest,
            }) => {
                ctx.proxy = Some(ProxyTarget {
                    path_and_query,
                    digest,
                    sent: None,
                });
                Ok(false)
            }
            Err(err) => {
                match &err {
                    RegistryError::Internal(cause) => log::error!("{}: {cause}", ctx.route),
                    RegistryError::Unavailable(cause) => log::warn!("{}: {cause}", ctx.route),
                    _ => {}
                }
                if reads_body {
                    // The body may be partly unread: don't reuse the connection.
                    session.set_keepalive(None);
                }
                send_error(session, &err, head).await?;
                Ok(true)
            }
        }
    }

    async fn upstream_peer(
        &self,
        _s: &mut Session,
        _ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        let addr = self.upstream_addr().await?;
        let sni = if self.upstream.tls {
            self.upstream.host.clone()
        } else {
            String::new()
        };
        Ok(Box::new(HttpPeer::new(addr, self.upstream.tls, sni)))
    }

    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        upstream: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let target = ctx
            .proxy
            .as_mut()
            .ok_or_else(|| Error::explain(ErrorType::InternalError, "no proxy target"))?;
        target.sent = Some(Instant::now());
        let uri: http::Uri = target
            .path_and_query
            .parse()
            .map_err(|e| Error::because(ErrorType::InternalError, "presigned path", e))?;
        upstream.set_uri(uri);
        upstream.set_method(http::Method::GET);
        // The signature covers the host; the object store must not see the client's
        // credentials (S3 rejects two authentication mechanisms).
        upstream.insert_header("Host", self.upstream.host_header.as_str())?;
        upstream.remove_header("Authorization");
        upstream.remove_header("Cookie");
        Ok(())
    }

    async fn upstream_response_filter(
        &self,
        _session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let status = resp.status.as_u16();
        if let Some(sent) = ctx.proxy.as_ref().and_then(|t| t.sent) {
            STORE.observe(StoreOp::GetObject, status < 400, sent.elapsed());
        }
        let error = match status {
            200 | 206 => None,
            304 => None,
            416 => Some(RegistryError::RangeNotSatisfiable),
            404 => {
                log::error!("blob indexed but missing from the object store (HTTP 404)");
                Some(RegistryError::BlobUnknown)
            }
            500..=599 => Some(RegistryError::Unavailable(format!(
                "object store HTTP {status}"
            ))),
            _ => {
                log::error!("object store answered a blob GET with HTTP {status}");
                Some(RegistryError::Internal(format!(
                    "object store HTTP {status}"
                )))
            }
        };
        // Keep only what a registry client needs; S3's own headers stay behind.
        let keep = [
            "content-length",
            "content-range",
            "accept-ranges",
            "last-modified",
        ];
        let drop: Vec<http::HeaderName> = resp
            .headers
            .keys()
            .filter(|k| !keep.contains(&k.as_str()))
            .cloned()
            .collect();
        for name in drop {
            resp.remove_header(&name);
        }
        resp.insert_header(API_VERSION_HEADER, API_VERSION)?;
        if let Some(err) = error {
            let body = Bytes::from(err.body());
            resp.set_status(err.status())?;
            resp.remove_header("Content-Range");
            resp.insert_header("Content-Type", JSON)?;
            resp.insert_header("Content-Length", body.len().to_string())?;
            if matches!(err, RegistryError::Unavailable(_)) {
                resp.insert_header("Retry-After", RETRY_AFTER_SECS)?;
            }
            ctx.error_body = Some(body);
            return Ok(());
        }
        if let Some(target) = &ctx.proxy {
            set(resp, "Docker-Content-Digest", target.digest.as_str());
            set(resp, "ETag", format!("\"{}\"", target.digest));
        }
        resp.insert_header("Content-Type", "application/octet-stream")?;
        Ok(())
    }

    fn upstream_response_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<Option<Duration>> {
        if ctx.error_body.is_some() {
            *body = if end_of_stream {
                ctx.error_body.take()
            } else {
                None
            };
        } else if let Some(b) = body {
            BLOBS.bytes_sent.inc_by(b.len() as u64);
        }
        Ok(None)
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy
    where
        RequestCtx: Send + Sync,
    {
        let already_answered = session.response_written().is_some();
        if let Some(sent) = ctx.proxy.as_ref().and_then(|t| t.sent) {
            if !already_answered {
                STORE.observe(StoreOp::GetObject, false, sent.elapsed());
            }
        }
        let error_code = if already_answered {
            0
        } else {
            log::warn!("{}: object store: {e}", ctx.route);
            let err = RegistryError::Unavailable(e.to_string());
            let head = session.req_header().method == http::Method::HEAD;
            if send_error(session, &err, head).await.is_err() {
                0
            } else {
                err.status().as_u16()
            }
        };
        FailToProxy {
            error_code,
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut RequestCtx) {
        let elapsed = ctx.start.elapsed();
        // No response written: the client went away first (nginx's 499).
        let status = session
            .response_written()
            .map_or(499, |r| r.status.as_u16());
        let req = session.req_header();
        HTTP.observe(ctx.route_index, &req.method, status, elapsed);
        let error = e.map(|e| e.to_string());
        self.access_log.write(&Entry {
            time: std::time::SystemTime::now(),
            client: session.client_addr().and_then(|a| a.as_inet()).copied(),
            method: req.method.as_str(),
            path: req.uri.path_and_query().map_or("", |p| p.as_str()),
            status,
            bytes_in: session.body_bytes_read(),
            bytes_out: session.body_bytes_sent(),
            duration: elapsed,
            route: ctx.route,
            user: ctx.user.as_deref(),
            error: error.as_deref(),
        });
    }
}

fn expects_continue(req: &RequestHeader) -> bool {
    req.headers
        .get("expect")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("100-continue"))
}
