//! The pingora service. Every request is parsed into an [`Endpoint`] in `request_filter` and
//! answered there, blob GETs in proxy mode included (see [`super::blob_proxy`]): berth never
//! hands a request to pingora's upstream proxying.

use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_error::{Error, ErrorType, Result};
use pingora_http::RequestHeader;
use pingora_proxy::{ProxyHttp, Session};

use super::access_log::{AccessLog, Entry};
use super::drain::{InFlight, Request};
use super::endpoint::{Endpoint, ROUTES, UNMATCHED_ROUTE};
use super::handlers::handle;
use super::response::send_error;
use crate::auth::Guard;
use crate::metrics::HTTP;
use crate::registry::{Registry, RegistryError};

pub struct BerthService {
    registry: Arc<Registry>,
    /// Authentication, access and limits, checked before every handler.
    guard: Arc<Guard>,
    access_log: AccessLog,
    in_flight: InFlight,
}

/// Per-request state.
pub struct RequestCtx {
    start: Instant,
    /// Index into [`ROUTES`].
    route_index: usize,
    route: &'static str,
    /// The authenticated user, for the access log.
    pub user: Option<String>,
    /// Counts this request as in flight until it is done (graceful shutdown waits for it).
    _in_flight: Request,
}

impl BerthService {
    pub fn new(registry: Arc<Registry>) -> Self {
        BerthService {
            registry,
            guard: Arc::new(Guard::open()),
            access_log: AccessLog::new(None),
            in_flight: InFlight::default(),
        }
    }

    /// Counts the requests being answered in `in_flight`.
    pub fn with_in_flight(mut self, in_flight: InFlight) -> Self {
        self.in_flight = in_flight;
        self
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
}

#[async_trait]
impl ProxyHttp for BerthService {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx {
            start: Instant::now(),
            route_index: UNMATCHED_ROUTE,
            route: ROUTES[UNMATCHED_ROUTE],
            user: None,
            _in_flight: self.in_flight.enter(),
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
            Ok(()) => Ok(true),
            Err(err) => {
                match &err {
                    RegistryError::Internal(cause) => log::error!("{}: {cause}", ctx.route),
                    RegistryError::Unavailable(cause) => log::warn!("{}: {cause}", ctx.route),
                    _ => {}
                }
                if reads_body {
                    // The body may be partly unread: don't reuse the connection.
                    session.set_keepalive(None);
                    discard_body(session).await;
                }
                send_error(session, &err, head).await?;
                Ok(true)
            }
        }
    }

    /// Never called: `request_filter` answers every request.
    async fn upstream_peer(
        &self,
        _s: &mut Session,
        _ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        Error::e_explain(ErrorType::InternalError, "berth has no upstream peer")
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

/// Reads and drops what is left of a refused request's body, a little and briefly: a client
/// that sends its whole body before it reads the answer (most HTTP/1.1 clients) sees a broken
/// pipe instead of berth's error when the connection closes on an unread body.
async fn discard_body(session: &mut Session) {
    const MOST: usize = 8 * 1024 * 1024;
    const LONGEST: std::time::Duration = std::time::Duration::from_secs(2);
    let mut left = MOST;
    let _ = tokio::time::timeout(LONGEST, async {
        while !session.is_body_done() {
            match session.read_request_body().await {
                Ok(Some(chunk)) if chunk.len() <= left => left -= chunk.len(),
                _ => break,
            }
        }
    })
    .await;
}
