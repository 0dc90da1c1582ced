//! One handler per endpoint: call the registry, write the answer.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use pingora_proxy::Session;

use super::blob_proxy::stream_blob;
use super::endpoint::{Endpoint, Mount, Page, MAX_PAGE};
use super::response::{header, range_value, send, send_empty, set, JSON};
use super::transfers;
use crate::auth::limits::{BlobLimit, LimitedBody};
use crate::meta::UploadSession;
use crate::metrics::BLOBS;
use crate::registry::manifest::{MAX_MANIFEST_BYTES, OCI_INDEX};
use crate::registry::names::Digest;
use crate::registry::{BlobGet, BodySource, Registry, RegistryError, RegistryResult};

const BANNER: &str = concat!("berth registry server ", env!("CARGO_PKG_VERSION"), "\n");

/// Answers `ep`. Ok: the response is written (or the client went away). Err: nothing is
/// written yet, and the service answers with the error. `blob`: `limits.max_blob_size`,
/// applied to every request that adds bytes to a blob.
pub async fn handle(
    reg: &Arc<Registry>,
    s: &mut Session,
    ep: Endpoint,
    blob: BlobLimit,
) -> RegistryResult<()> {
    if !reg.mirrors.is_empty()
        && ep
            .repository()
            .is_some_and(|n| reg.mirrors.route(n).is_some())
    {
        if let Some(ep) = super::mirror::handle(reg, s, ep).await? {
            return handle_local(reg, s, ep, blob).await;
        }
        return Ok(());
    }
    handle_local(reg, s, ep, blob).await
}

/// Answers `ep` from what berth holds.
async fn handle_local(
    reg: &Arc<Registry>,
    s: &mut Session,
    ep: Endpoint,
    blob: BlobLimit,
) -> RegistryResult<()> {
    match ep {
        Endpoint::Banner => {
            let mut h = header(200);
            set(&mut h, "Content-Type", "text/plain; charset=utf-8");
            reply(send(s, h, Bytes::from_static(BANNER.as_bytes()), false).await)
        }
        Endpoint::ApiBase => {
            let mut h = header(200);
            set(&mut h, "Content-Type", JSON);
            reply(send(s, h, Bytes::from_static(b"{}"), false).await)
        }
        Endpoint::Catalog(page) => {
            let (limit, fetch) = limits(&page);
            let mut repos = reg.repositories(page.last.as_deref(), fetch).await?;
            let next = truncate(&mut repos, limit);
            let body =
                serde_json::to_vec(&serde_json::json!({ "repositories": repos })).expect("json");
            let mut h = header(200);
            set(&mut h, "Content-Type", JSON);
            if let Some(last) = next {
                set(&mut h, "Link", link("/v2/_catalog", limit, &last));
            }
            reply(send(s, h, body.into(), false).await)
        }
        Endpoint::TagsList { name, page } => {
            let (limit, fetch) = limits(&page);
            let mut tags = reg.tags(&name, page.last.as_deref(), fetch).await?;
            let next = truncate(&mut tags, limit);
            let body = serde_json::to_vec(&serde_json::json!({ "name": name, "tags": tags }))
                .expect("json");
            let mut h = header(200);
            set(&mut h, "Content-Type", JSON);
            if let Some(last) = next {
                set(
                    &mut h,
                    "Link",
                    link(&format!("/v2/{name}/tags/list"), limit, &last),
                );
            }
            reply(send(s, h, body.into(), false).await)
        }
        Endpoint::GetManifest {
            name,
            reference,
            head,
        } => {
            let found = reg.get_manifest(&name, &reference).await?;
            send_manifest(s, found, head).await
        }
        Endpoint::PutManifest { name, reference } => {
            let content_type = header_str(s, "content-type").map(str::to_string);
            let body = read_small_body(s, MAX_MANIFEST_BYTES).await?;
            let pushed = reg
                .put_manifest(&name, &reference, content_type.as_deref(), body)
                .await?;
            let mut h = header(201);
            set(
                &mut h,
                "Location",
                format!("/v2/{name}/manifests/{}", pushed.digest),
            );
            set(&mut h, "Docker-Content-Digest", pushed.digest.as_str());
            if let Some(subject) = &pushed.subject {
                set(&mut h, "OCI-Subject", subject.as_str());
            }
            reply(send_empty(s, h, None).await)
        }
        Endpoint::DeleteManifest { name, reference } => {
            reg.delete_manifest(&name, &reference).await?;
            reply(send_empty(s, header(202), None).await)
        }
        Endpoint::GetBlob {
            name,
            digest,
            head: true,
        } => {
            let record = reg.stat_blob(&name, &digest).await?;
            send_blob_head(s, &digest, record.size).await
        }
        Endpoint::GetBlob {
            name,
            digest,
            head: false,
        } => match reg.get_blob(&name, &digest).await? {
            BlobGet::Proxy { record } => {
                BLOBS.get_proxy.inc();
                stream_blob(s, &reg.store, &record, &digest).await
            }
            BlobGet::Redirect { url, .. } => {
                BLOBS.get_redirect.inc();
                let mut h = header(307);
                set(&mut h, "Location", url);
                set(&mut h, "Docker-Content-Digest", digest.as_str());
                reply(send_empty(s, h, None).await)
            }
        },
        Endpoint::DeleteBlob { name, digest } => {
            reg.delete_blob(&name, &digest).await?;
            reply(send_empty(s, header(202), None).await)
        }
        Endpoint::StartUpload {
            name,
            digest,
            mount,
        } => start_upload(reg, s, name, digest, mount, blob).await,
        Endpoint::UploadStatus { name, id } => {
            let session = reg.upload_status(&name, &id).await?;
            reply(send_empty(s, upload_header(204, &session), None).await)
        }
        Endpoint::PatchUpload { name, id } => {
            let range = content_range(s)?;
            let length = content_length(s)?;
            // As distribution: a chunk must be as long as its Content-Range says.
            if let (Some((start, end)), Some(len)) = (range, length) {
                if end - start + 1 != len {
                    return Err(RegistryError::SizeInvalid(format!(
                        "Content-Range {start}-{end} with Content-Length {len}"
                    )));
                }
            }
            let range_start = range.map(|(start, _)| start);
            let allowed = blob.allowance(reg, &name, Some(&id), length).await?;
            let mut body = LimitedBody::new(DownstreamBody(s), allowed);
            let result = transfers::run(&mut body, {
                let (reg, name, id) = (reg.clone(), name.clone(), id.clone());
                move |mut body| async move {
                    reg.append_upload(&name, &id, range_start, length, &mut body)
                        .await
                }
            })
            .await;
            let session = blob.outcome(result, body.exceeded)?;
            reply(send_empty(s, upload_header(202, &session), None).await)
        }
        Endpoint::FinishUpload { name, id, digest } => {
            let length = content_length(s)?;
            let allowed = blob.allowance(reg, &name, Some(&id), length).await?;
            let mut body = LimitedBody::new(DownstreamBody(s), allowed);
            let result = transfers::run(&mut body, {
                let (reg, name, digest) = (reg.clone(), name.clone(), digest.clone());
                move |mut body| async move {
                    reg.finish_upload(&name, &id, &digest, length, &mut body)
                        .await
                }
            })
            .await;
            blob.outcome(result, body.exceeded)?;
            reply(send_empty(s, blob_created(&name, &digest), None).await)
        }
        Endpoint::CancelUpload { name, id } => {
            reg.cancel_upload(&name, &id).await?;
            reply(send_empty(s, header(204), None).await)
        }
        Endpoint::Referrers {
            name,
            digest,
            artifact_type,
        } => {
            let body = reg
                .referrers(&name, &digest, artifact_type.as_deref())
                .await?;
            let mut h = header(200);
            set(&mut h, "Content-Type", OCI_INDEX);
            if artifact_type.is_some() {
                set(&mut h, "OCI-Filters-Applied", "artifactType");
            }
            reply(send(s, h, body.into(), false).await)
        }
    }
}

pub(super) async fn send_manifest(
    s: &mut Session,
    found: crate::registry::manifest::FoundManifest,
    head: bool,
) -> RegistryResult<()> {
    let mut h = header(200);
    set(&mut h, "Content-Type", &found.record.media_type);
    set(&mut h, "Docker-Content-Digest", found.digest.as_str());
    set(&mut h, "ETag", format!("\"{}\"", found.digest));
    reply(send(s, h, found.record.body, head).await)
}

pub(super) async fn send_blob_head(
    s: &mut Session,
    digest: &Digest,
    size: u64,
) -> RegistryResult<()> {
    let mut h = header(200);
    set(&mut h, "Content-Type", "application/octet-stream");
    set(&mut h, "Docker-Content-Digest", digest.as_str());
    set(&mut h, "ETag", format!("\"{digest}\""));
    set(&mut h, "Accept-Ranges", "bytes");
    reply(send_empty(s, h, Some(size)).await)
}

async fn start_upload(
    reg: &Arc<Registry>,
    s: &mut Session,
    name: String,
    digest: Option<Digest>,
    mount: Option<Mount>,
    blob: BlobLimit,
) -> RegistryResult<()> {
    if let Some(Mount { digest, from }) = mount {
        // Without `from` (or when the source lacks it), fall back to a new session.
        if let Some(from) = from {
            if reg.mount_blob(&name, &from, &digest).await? {
                return reply(send_empty(s, blob_created(&name, &digest), None).await);
            }
        }
    } else if let Some(digest) = digest {
        let length = content_length(s)?;
        let allowed = blob.allowance(reg, &name, None, length).await?;
        let mut body = LimitedBody::new(DownstreamBody(s), allowed);
        let result = transfers::run(&mut body, {
            let (reg, name, digest) = (reg.clone(), name.clone(), digest.clone());
            move |mut body| async move {
                reg.monolithic_upload(&name, &digest, length, &mut body)
                    .await
            }
        })
        .await;
        blob.outcome(result, body.exceeded)?;
        return reply(send_empty(s, blob_created(&name, &digest), None).await);
    }
    let session = reg.start_upload(&name).await?;
    reply(send_empty(s, upload_header(202, &session), None).await)
}

fn blob_created(name: &str, digest: &Digest) -> pingora_http::ResponseHeader {
    let mut h = header(201);
    set(&mut h, "Location", format!("/v2/{name}/blobs/{digest}"));
    set(&mut h, "Docker-Content-Digest", digest.as_str());
    h
}

fn upload_header(status: u16, session: &UploadSession) -> pingora_http::ResponseHeader {
    let mut h = header(status);
    set(
        &mut h,
        "Location",
        format!("/v2/{}/blobs/uploads/{}", session.repo, session.id),
    );
    set(&mut h, "Docker-Upload-UUID", &session.id);
    set(&mut h, "Range", range_value(session.offset));
    h
}

/// A write error means the client is gone: nothing more to answer.
fn reply(r: pingora_error::Result<()>) -> RegistryResult<()> {
    if let Err(e) = r {
        log::debug!("writing response: {e}");
    }
    Ok(())
}

/// Page size to return and how many entries to fetch (one more, to know if there is a next).
fn limits(page: &Page) -> (usize, usize) {
    let limit = page.n.unwrap_or(MAX_PAGE);
    (limit, limit + 1)
}

/// Cuts `items` to `limit`; returns the last returned entry when there are more.
fn truncate(items: &mut Vec<String>, limit: usize) -> Option<String> {
    if items.len() > limit {
        items.truncate(limit);
        items.last().cloned()
    } else {
        None
    }
}

fn link(path: &str, n: usize, last: &str) -> String {
    let last = percent_encoding::utf8_percent_encode(last, percent_encoding::NON_ALPHANUMERIC);
    format!("<{path}?n={n}&last={last}>; rel=\"next\"")
}

fn header_str<'a>(s: &'a Session, name: &str) -> Option<&'a str> {
    s.req_header()
        .headers
        .get(name)
        .and_then(|v| v.to_str().ok())
}

fn content_length(s: &Session) -> RegistryResult<Option<u64>> {
    // With chunked framing the length is unknown whatever Content-Length says.
    if header_str(s, "transfer-encoding").is_some() {
        return Ok(None);
    }
    match header_str(s, "content-length") {
        None => Ok(None),
        Some(v) => v
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| RegistryError::SizeInvalid(format!("Content-Length {v:?}"))),
    }
}

/// `Content-Range: <start>-<end>` on a PATCH (docker sends it without the `bytes ` unit).
fn content_range(s: &Session) -> RegistryResult<Option<(u64, u64)>> {
    let Some(v) = header_str(s, "content-range") else {
        return Ok(None);
    };
    let spec = v
        .trim()
        .trim_start_matches("bytes")
        .trim_start_matches([' ', '=']);
    let malformed = || RegistryError::BlobUploadInvalid(format!("Content-Range {v:?}"));
    let (start, end) = spec.split_once('-').ok_or_else(malformed)?;
    let end = end.split('/').next().unwrap_or(end);
    match (start.trim().parse::<u64>(), end.trim().parse::<u64>()) {
        (Ok(start), Ok(end)) if end >= start => Ok(Some((start, end))),
        _ => Err(malformed()),
    }
}

/// Reads a body that must fit in memory (manifests), refusing more than `limit` bytes.
async fn read_small_body(s: &mut Session, limit: usize) -> RegistryResult<Bytes> {
    if let Some(len) = content_length(s)? {
        if len as usize > limit {
            return Err(RegistryError::TooLarge(format!(
                "{len} bytes, the limit is {limit}"
            )));
        }
    }
    let mut out = BytesMut::new();
    let mut body = DownstreamBody(s);
    while let Some(chunk) = body
        .next_chunk()
        .await
        .map_err(|e| RegistryError::ManifestInvalid(format!("reading the request body: {e}")))?
    {
        if out.len() + chunk.len() > limit {
            return Err(RegistryError::TooLarge(format!("more than {limit} bytes")));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out.freeze())
}

/// The downstream request body, chunk by chunk as pingora reads it.
pub struct DownstreamBody<'a>(pub &'a mut Session);

#[async_trait::async_trait]
impl BodySource for DownstreamBody<'_> {
    async fn next_chunk(&mut self) -> std::io::Result<Option<Bytes>> {
        self.0
            .read_request_body()
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))
    }
}
