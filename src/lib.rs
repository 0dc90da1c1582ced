//! berth: an OCI Distribution v1.1 registry gateway.
//!
//! Registry **metadata** (repositories, tags, manifests, the blob index, upload sessions,
//! referrers) lives in berth's own store and is answered without touching the object store.
//! **Blob bytes** live in an S3-compatible bucket and stream between client and bucket.
//!
//! Layout, outside in:
//! - [`server`]: start-up (metadata store, embedded or remote object store, bucket check) and
//!   the pingora server with its background tasks.
//! - [`http`]: the HTTP surface: request → [`http::endpoint::Endpoint`] → handler → response;
//!   proxied blob GETs; the access log; the operations listener (`/metrics`, `/healthz`,
//!   `/readyz`).
//! - [`registry`]: what each operation means: names, manifests, uploads, errors.
//! - [`meta`]: the [`meta::MetaStore`] trait, its embedded redb backend, a timing decorator,
//!   and the bucket journal (a decorator recording every acknowledged write in the bucket).
//! - [`recover`]: `berth recover`, a metadata store rebuilt from the bucket alone.
//! - [`storage`]: the S3 client (SigV4 presigning, multipart) and the embedded S3 endpoint.
//! - [`config`]: the YAML config with `_env:NAME` values.
//! - [`import`]: `berth import`, adopting a CNCF distribution registry's storage in place.
//! - [`metrics`]: every Prometheus metric berth exports, recorded through pre-resolved handles.
//! - [`mirror`]: pull-through mirrors of upstream registries under a repository prefix.
//! - [`gc`]: garbage collection (reference index in the store, candidate queue, retention,
//!   orphan scan), run by `gc.interval`, `POST /gc` on the ops listener, or `berth gc`.
//! - [`auth`]: authentication (htpasswd, Docker tokens), per-repository access, limits.
//! - [`tls`]: downstream TLS (certificate reload on SIGHUP, mTLS).

pub mod auth;
pub mod config;
pub mod gc;
pub mod http;
pub mod import;
pub mod meta;
pub mod metrics;
pub mod mirror;
pub mod recover;
pub mod registry;
pub mod server;
pub mod storage;
pub mod tls;
