//! Writing responses from berth itself (everything but proxied blob bodies).

use bytes::Bytes;
use pingora_error::Result;
use pingora_http::ResponseHeader;
use pingora_proxy::Session;

use crate::registry::RegistryError;

pub const API_VERSION_HEADER: &str = "Docker-Distribution-API-Version";
pub const API_VERSION: &str = "registry/2.0";
pub const JSON: &str = "application/json";
/// Seconds a client should wait before retrying after a 503.
pub const RETRY_AFTER_SECS: &str = "2";

/// A response header with the headers every answer carries.
pub fn header(status: u16) -> ResponseHeader {
    let mut h = ResponseHeader::build(status, Some(8)).expect("valid status");
    h.insert_header(API_VERSION_HEADER, API_VERSION)
        .expect("static header");
    h
}

/// Adds a header whose value comes from the request or the store; values that cannot be a
/// header are dropped rather than failing the request.
pub fn set(h: &mut ResponseHeader, name: &'static str, value: impl AsRef<str>) {
    if let Err(e) = h.insert_header(name, value.as_ref()) {
        log::warn!("dropping header {name}: {e}");
    }
}

/// Writes a complete response. For HEAD the Content-Length is that of `body`, and no body
/// goes out.
pub async fn send(
    session: &mut Session,
    mut h: ResponseHeader,
    body: Bytes,
    head: bool,
) -> Result<()> {
    set(&mut h, "Content-Length", body.len().to_string());
    let empty = head || body.is_empty();
    session.write_response_header(Box::new(h), empty).await?;
    if !empty {
        session.write_response_body(Some(body), true).await?;
    }
    Ok(())
}

/// A response with no body; `length` is the Content-Length to announce (HEAD of a blob).
pub async fn send_empty(
    session: &mut Session,
    mut h: ResponseHeader,
    length: Option<u64>,
) -> Result<()> {
    set(&mut h, "Content-Length", length.unwrap_or(0).to_string());
    session.write_response_header(Box::new(h), true).await
}

/// The OCI error body with its status.
pub async fn send_error(session: &mut Session, err: &RegistryError, head: bool) -> Result<()> {
    let mut h = header(err.status().as_u16());
    set(&mut h, "Content-Type", JSON);
    match err {
        RegistryError::RangeInvalid { offset } => set(&mut h, "Range", range_value(*offset)),
        // The object store was busy or away after berth's own retries: ask for a retry.
        RegistryError::Unavailable(_) => set(&mut h, "Retry-After", RETRY_AFTER_SECS),
        RegistryError::Unauthorized { challenge }
        | RegistryError::Denied {
            challenge: Some(challenge),
        } => set(&mut h, "WWW-Authenticate", challenge),
        RegistryError::TooManyRequests(_) => set(&mut h, "Retry-After", RETRY_AFTER_SECS),
        _ => {}
    }
    send(session, h, Bytes::from(err.body()), head).await
}

/// The `Range` header of an upload session: bytes `0-(offset-1)` received. With nothing
/// received, distribution answers `0-0` too; clients read it as "start at 0".
pub fn range_value(offset: u64) -> String {
    format!("0-{}", offset.saturating_sub(1))
}
