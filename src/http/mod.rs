//! The HTTP surface: the OCI distribution API on pingora.
//!
//! - [`endpoint`]: method + path + query parsed once into a typed [`endpoint::Endpoint`].
//! - [`handlers`]: one handler per endpoint, calling into [`crate::registry`].
//! - [`blob_proxy`]: blob GETs in proxy mode, streamed from the object store.
//! - [`response`]: response headers every answer carries, and the OCI error body.
//! - [`access_log`]: one line per request, text or JSON.
//! - [`drain`]: on SIGTERM, exit as soon as no request is in flight.
//! - [`ops`]: the operations listener: `/metrics`, `/healthz`, `/readyz`.
//! - [`transfers`]: upload byte work on a runtime of its own, fed the body chunk by chunk.
//! - [`service`]: the pingora `ProxyHttp` implementation that ties them together.

pub mod access_log;
pub mod blob_proxy;
pub mod drain;
pub mod endpoint;
pub mod handlers;
pub mod mirror;
pub mod ops;
pub mod response;
pub mod service;
pub mod transfers;
