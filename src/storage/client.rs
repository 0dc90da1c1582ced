//! Sending presigned S3 requests: one pooled reqwest client, bounded retries with exponential
//! backoff for re-sendable requests, and S3's XML error bodies mapped into [`StorageError`].

use std::time::Duration;

use bytes::Bytes;
use futures_util::stream;
use http::{HeaderMap, Method, StatusCode};
use serde::Deserialize;

use super::sigv4::Signer;
use super::{ListPage, ObjectBody, ObjectInfo, StorageError};

/// How internal requests are presigned: long enough for a slow part upload to start.
const REQUEST_TTL: Duration = Duration::from_secs(15 * 60);

#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Total attempts, including the first.
    pub attempts: u32,
    /// Sleep before the second attempt; doubles after each further attempt (plus jitter).
    pub base: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts: 3,
            base: Duration::from_millis(100),
        }
    }
}

/// A request body as the sender sees it.
pub enum SendBody {
    Empty,
    Bytes(Bytes),
    Stream {
        len: u64,
        chunks: tokio::sync::mpsc::Receiver<Result<Bytes, std::io::Error>>,
    },
}

impl From<ObjectBody> for SendBody {
    fn from(b: ObjectBody) -> Self {
        match b {
            ObjectBody::Bytes(b) => SendBody::Bytes(b),
            ObjectBody::Stream { len, chunks } => SendBody::Stream { len, chunks },
        }
    }
}

/// A 2xx response, body read.
pub struct Response {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// The result of one attempt.
enum Attempt {
    Done(Response),
    /// Transient: retry if the body can be sent again and attempts remain.
    Transient(StorageError),
    Fatal(StorageError),
}

pub struct Sender {
    pub http: reqwest::Client,
    pub signer: Signer,
    pub endpoint: String,
    pub bucket: String,
    pub retry: RetryPolicy,
}

impl Sender {
    pub fn new_http_client() -> Result<reqwest::Client, reqwest::Error> {
        Self::new_http_client_with_ca(None)
    }

    /// `ca_bundle`: PEM certificates that replace the system roots (`storage.ca_bundle`, for
    /// an object store with a private CA). Certificates are verified either way.
    pub fn new_http_client_with_ca(
        ca_bundle: Option<&[u8]>,
    ) -> Result<reqwest::Client, reqwest::Error> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut builder = reqwest::Client::builder();
        if let Some(pem) = ca_bundle {
            builder = builder.tls_certs_only(reqwest::Certificate::from_pem_bundle(pem)?);
        }
        builder
            // A presigned URL is only valid for its own host and path: never follow.
            .redirect(reqwest::redirect::Policy::none())
            // Deterministic: no HTTP(S)_PROXY from the environment.
            .no_proxy()
            .connect_timeout(Duration::from_secs(10))
            // S3 closes idle connections after ~20 s; reusing one it already closed fails a
            // request we may not be able to resend (a streamed body).
            .pool_idle_timeout(Duration::from_secs(15))
            .tcp_nodelay(true)
            .build()
    }

    /// Sends `method` on `key` (None: the bucket) with the request's own query parameters.
    /// Requests without a body or with an in-memory body are retried on connection errors,
    /// 500/502/503/504 and SlowDown; streamed bodies are sent once.
    pub async fn send(
        &self,
        method: Method,
        key: Option<&str>,
        query: &[(&str, &str)],
        body: SendBody,
    ) -> Result<Response, StorageError> {
        let resendable: Option<Option<Bytes>> = match &body {
            SendBody::Empty => Some(None),
            SendBody::Bytes(b) => Some(Some(b.clone())),
            SendBody::Stream { .. } => None,
        };
        let Some(resend) = resendable else {
            return match self.attempt(&method, key, query, body).await {
                Attempt::Done(r) => Ok(r),
                Attempt::Transient(e) | Attempt::Fatal(e) => Err(e),
            };
        };
        let attempts = self.retry.attempts.max(1);
        let mut n = 0;
        loop {
            n += 1;
            let body = match &resend {
                None => SendBody::Empty,
                Some(b) => SendBody::Bytes(b.clone()),
            };
            match self.attempt(&method, key, query, body).await {
                Attempt::Done(r) => return Ok(r),
                Attempt::Fatal(e) => return Err(e),
                Attempt::Transient(e) => {
                    if n >= attempts {
                        return Err(e);
                    }
                    let backoff = self.retry.base * 2u32.pow(n - 1);
                    let jitter_ms = self.retry.base.as_millis() as u64 / 2;
                    let jitter = if jitter_ms > 0 {
                        Duration::from_millis(rand::random_range(0..jitter_ms))
                    } else {
                        Duration::ZERO
                    };
                    log::debug!(
                        "object store: {method} attempt {n} failed ({e}); retrying in {:?}",
                        backoff + jitter
                    );
                    tokio::time::sleep(backoff + jitter).await;
                }
            }
        }
    }

    /// A GET of `key` whose body is left unread, for streaming. Sent once: the transfer is
    /// the client's, and the client retries it. The status is the caller's to interpret.
    pub async fn get_unread(
        &self,
        key: &str,
        range: Option<&http::HeaderValue>,
    ) -> Result<reqwest::Response, StorageError> {
        let presigned = self
            .signer
            .presign(&Method::GET, Some(key), &[], REQUEST_TTL);
        let mut req = self.http.get(presigned.url);
        if let Some(range) = range {
            req = req.header(http::header::RANGE, range);
        }
        req.send().await.map_err(|e| match self.transport_error(e) {
            Attempt::Done(_) => unreachable!("transport_error never answers Done"),
            Attempt::Transient(e) | Attempt::Fatal(e) => e,
        })
    }

    async fn attempt(
        &self,
        method: &Method,
        key: Option<&str>,
        query: &[(&str, &str)],
        body: SendBody,
    ) -> Attempt {
        let presigned = self.signer.presign(method, key, query, REQUEST_TTL);
        let mut req = self.http.request(method.clone(), presigned.url);
        req = match body {
            SendBody::Empty => {
                if *method == Method::PUT || *method == Method::POST {
                    req.header(http::header::CONTENT_LENGTH, 0)
                        .body(Bytes::new())
                } else {
                    req
                }
            }
            SendBody::Bytes(b) => req.header(http::header::CONTENT_LENGTH, b.len()).body(b),
            SendBody::Stream { len, chunks } => req
                .header(http::header::CONTENT_LENGTH, len)
                .body(reqwest::Body::wrap_stream(exact_len_stream(len, chunks))),
        };
        let resp = match req.send().await {
            Ok(r) => r,
            Err(e) => return self.transport_error(e),
        };
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = match resp.bytes().await {
            Ok(b) => b,
            Err(e) => return self.transport_error(e),
        };
        if status.is_success() {
            // CompleteMultipartUpload (and CopyObject) may answer 200 with an error document.
            if *method == Method::POST && root_element(&body) == Some("Error") {
                let (code, message) = parse_error(&body);
                return self.classify(StatusCode::INTERNAL_SERVER_ERROR, code, message);
            }
            return Attempt::Done(Response {
                status,
                headers,
                body,
            });
        }
        let (code, message) = if body.is_empty() {
            // HEAD has no body; some servers name the code in a header.
            let code = headers
                .get("x-amz-error-code")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string();
            let mut message = status.canonical_reason().unwrap_or_default().to_string();
            if let Some(region) = headers
                .get("x-amz-bucket-region")
                .and_then(|v| v.to_str().ok())
            {
                message.push_str(&format!(" (the bucket is in region {region})"));
            }
            (code, message)
        } else {
            parse_error(&body)
        };
        self.classify(status, code, message)
    }

    fn transport_error(&self, e: reqwest::Error) -> Attempt {
        let cause = error_chain(&e);
        if e.is_connect() || e.is_timeout() {
            Attempt::Transient(StorageError::Unreachable {
                endpoint: self.endpoint.clone(),
                cause,
            })
        } else if e.is_builder() {
            Attempt::Fatal(StorageError::Failed {
                status: 0,
                code: "RequestError".into(),
                message: cause,
            })
        } else {
            // The connection broke mid-request (e.g. a pooled connection the server had
            // closed), or a streamed body failed (only re-sendable bodies are retried).
            Attempt::Transient(StorageError::Failed {
                status: 0,
                code: "RequestError".into(),
                message: cause,
            })
        }
    }

    fn classify(&self, status: StatusCode, code: String, message: String) -> Attempt {
        let s = status.as_u16();
        if matches!(s, 500 | 502 | 503 | 504) || code == "SlowDown" {
            let code = if code.is_empty() {
                status.to_string()
            } else {
                code
            };
            return Attempt::Transient(StorageError::Unavailable { status: s, code });
        }
        Attempt::Fatal(map_error(status, code, message, &self.bucket))
    }
}

/// Maps a non-retryable S3 error response into a [`StorageError`].
pub fn map_error(status: StatusCode, code: String, message: String, bucket: &str) -> StorageError {
    match code.as_str() {
        "NoSuchBucket" => {
            return StorageError::NoSuchBucket {
                bucket: bucket.to_string(),
            }
        }
        "AccessDenied" | "InvalidAccessKeyId" | "SignatureDoesNotMatch" | "NotSignedUp" => {
            return StorageError::AccessDenied { code, message }
        }
        _ => {}
    }
    if status == StatusCode::FORBIDDEN {
        let code = if code.is_empty() {
            "AccessDenied".into()
        } else {
            code
        };
        return StorageError::AccessDenied { code, message };
    }
    StorageError::Failed {
        status: status.as_u16(),
        code,
        message,
    }
}

/// The reqwest error and its sources, for a log line. The URL is left out: it is presigned,
/// and its query string is a credential until it expires.
pub(crate) fn error_chain(e: &reqwest::Error) -> String {
    let mut s = match e.url() {
        Some(url) => e.to_string().replace(url.as_str(), url.path()),
        None => e.to_string(),
    };
    let mut src = std::error::Error::source(e);
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

/// The channel as a stream of exactly `len` bytes: fewer (the sender went away) or more is an
/// error, so a short body never reaches S3 as a complete object.
fn exact_len_stream(
    len: u64,
    chunks: tokio::sync::mpsc::Receiver<Result<Bytes, std::io::Error>>,
) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static {
    stream::unfold(
        (chunks, 0u64, false),
        move |(mut rx, sent, done)| async move {
            if done {
                return None;
            }
            match rx.recv().await {
                Some(Ok(chunk)) => {
                    let sent = sent + chunk.len() as u64;
                    if sent > len {
                        let e = std::io::Error::new(
                            std::io::ErrorKind::InvalidData,
                            format!("request body longer than its declared {len} bytes"),
                        );
                        Some((Err(e), (rx, sent, true)))
                    } else {
                        Some((Ok(chunk), (rx, sent, false)))
                    }
                }
                Some(Err(e)) => Some((Err(e), (rx, sent, true))),
                None if sent < len => {
                    let e = std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        format!("request body ended after {sent} of {len} bytes"),
                    );
                    Some((Err(e), (rx, sent, true)))
                }
                None => None,
            }
        },
    )
}

// ---- XML ----

#[derive(Deserialize, Default)]
struct ErrorXml {
    #[serde(rename = "Code", default)]
    code: String,
    #[serde(rename = "Message", default)]
    message: String,
}

/// (Code, Message) of an S3 error document; an unparsable body becomes the message.
pub fn parse_error(body: &[u8]) -> (String, String) {
    let text = String::from_utf8_lossy(body);
    match quick_xml::de::from_str::<ErrorXml>(&text) {
        Ok(e) if !e.code.is_empty() => (e.code, e.message),
        _ => {
            let mut t = text.trim().to_string();
            if t.len() > 200 {
                let mut cut = 200;
                while !t.is_char_boundary(cut) {
                    cut -= 1;
                }
                t.truncate(cut);
            }
            (String::new(), t)
        }
    }
}

/// Name of the document's root element, skipping the XML declaration, comments and whitespace.
pub fn root_element(body: &[u8]) -> Option<&str> {
    let text = std::str::from_utf8(body).ok()?;
    let mut rest = text;
    loop {
        rest = rest.trim_start();
        if let Some(r) = rest.strip_prefix("<?") {
            rest = &r[r.find("?>")? + 2..];
        } else if let Some(r) = rest.strip_prefix("<!--") {
            rest = &r[r.find("-->")? + 3..];
        } else if let Some(r) = rest.strip_prefix('<') {
            let end = r
                .find(|c: char| c.is_whitespace() || c == '>' || c == '/')
                .unwrap_or(r.len());
            return Some(&r[..end]);
        } else {
            return None;
        }
    }
}

#[derive(Deserialize)]
struct InitiateXml {
    #[serde(rename = "UploadId")]
    upload_id: String,
}

/// UploadId of an InitiateMultipartUploadResult.
pub fn parse_upload_id(body: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(body).ok()?;
    quick_xml::de::from_str::<InitiateXml>(text)
        .ok()
        .map(|r| r.upload_id)
        .filter(|id| !id.is_empty())
}

#[derive(Deserialize)]
struct ListXml {
    #[serde(rename = "Contents", default)]
    contents: Vec<ContentsXml>,
    #[serde(rename = "IsTruncated", default)]
    is_truncated: bool,
    #[serde(rename = "NextContinuationToken", default)]
    next_continuation_token: Option<String>,
}

#[derive(Deserialize)]
struct ContentsXml {
    #[serde(rename = "Key")]
    key: String,
    #[serde(rename = "Size", default)]
    size: u64,
    #[serde(rename = "LastModified", default)]
    last_modified: String,
}

/// A ListBucketResult (ListObjectsV2) page.
pub fn parse_list(body: &[u8]) -> Option<ListPage> {
    let text = std::str::from_utf8(body).ok()?;
    if root_element(body) != Some("ListBucketResult") {
        return None;
    }
    let l: ListXml = quick_xml::de::from_str(text).ok()?;
    Some(ListPage {
        objects: l
            .contents
            .into_iter()
            .map(|c| ObjectInfo {
                key: c.key,
                size: c.size,
                last_modified: c.last_modified,
            })
            .collect(),
        next: l
            .next_continuation_token
            .filter(|t| l.is_truncated && !t.is_empty()),
    })
}

#[derive(Deserialize)]
struct ListUploadsXml {
    #[serde(rename = "Upload", default)]
    uploads: Vec<UploadXml>,
    #[serde(rename = "IsTruncated", default)]
    truncated: Option<bool>,
    #[serde(rename = "NextKeyMarker", default)]
    next_key: Option<String>,
    #[serde(rename = "NextUploadIdMarker", default)]
    next_upload: Option<String>,
}

#[derive(Deserialize)]
struct UploadXml {
    #[serde(rename = "Key")]
    key: String,
    #[serde(rename = "UploadId")]
    upload_id: String,
    #[serde(rename = "Initiated", default)]
    initiated: Option<String>,
}

/// A ListMultipartUploads result page.
pub fn parse_list_uploads(body: &[u8]) -> Option<super::MultipartPage> {
    let text = std::str::from_utf8(body).ok()?;
    let r: ListUploadsXml = quick_xml::de::from_str(text).ok()?;
    let next = match (r.truncated, r.next_key, r.next_upload) {
        (Some(true), Some(k), u) => Some((k, u.unwrap_or_default())),
        _ => None,
    };
    Some(super::MultipartPage {
        uploads: r
            .uploads
            .into_iter()
            .map(|u| super::MultipartInfo {
                initiated: u.initiated.as_deref().and_then(parse_time),
                key: u.key,
                upload_id: u.upload_id,
            })
            .collect(),
        next,
    })
}

/// S3's ISO 8601 times (`2026-12-02T16:00:00.000Z`).
pub fn parse_time(s: &str) -> Option<std::time::SystemTime> {
    humantime::parse_rfc3339_weak(s.trim_end_matches('Z')).ok()
}

/// The CompleteMultipartUpload request document.
pub fn complete_body(parts: &[(u32, String)]) -> String {
    let mut s = String::with_capacity(100 + parts.len() * 90);
    s.push_str(r#"<CompleteMultipartUpload xmlns="http://s3.amazonaws.com/doc/2006-03-01/">"#);
    for (n, etag) in parts {
        s.push_str("<Part><PartNumber>");
        s.push_str(&n.to_string());
        s.push_str("</PartNumber><ETag>");
        xml_escape_into(&mut s, etag);
        s.push_str("</ETag></Part>");
    }
    s.push_str("</CompleteMultipartUpload>");
    s
}

fn xml_escape_into(out: &mut String, text: &str) {
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_s3_error_documents() {
        let body = br#"<?xml version="1.0" encoding="UTF-8"?>
<Error><Code>NoSuchKey</Code><Message>The resource you requested does not exist &amp; never did</Message><Resource>/b/k</Resource><RequestId>4442587FB7D0A2F9</RequestId></Error>"#;
        let (code, message) = parse_error(body);
        assert_eq!(code, "NoSuchKey");
        assert_eq!(
            message,
            "The resource you requested does not exist & never did"
        );
        assert_eq!(root_element(body), Some("Error"));
        let (code, message) = parse_error(b"<html>bad gateway</html>");
        assert_eq!(code, "");
        assert!(message.contains("bad gateway"));
    }

    #[test]
    fn parses_upload_id_and_root() {
        let body = br#"<?xml version="1.0" encoding="UTF-8"?>
<!-- c --><InitiateMultipartUploadResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><Bucket>b</Bucket><Key>k</Key><UploadId>VXBsb2FkIElE.ZW-x_y</UploadId></InitiateMultipartUploadResult>"#;
        assert_eq!(
            parse_upload_id(body).as_deref(),
            Some("VXBsb2FkIElE.ZW-x_y")
        );
        assert_eq!(root_element(body), Some("InitiateMultipartUploadResult"));
        assert_eq!(parse_upload_id(b"<Error><Code>x</Code></Error>"), None);
    }

    #[test]
    fn parses_list_pages() {
        let body = br#"<?xml version="1.0" encoding="UTF-8"?>
<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><Name>b</Name><Prefix>p/</Prefix><KeyCount>2</KeyCount><MaxKeys>2</MaxKeys><IsTruncated>true</IsTruncated><Contents><Key>p/a&amp;b</Key><LastModified>2026-12-02T16:20:00.000Z</LastModified><ETag>"x"</ETag><Size>12</Size><StorageClass>STANDARD</StorageClass></Contents><Contents><Key>p/c</Key><LastModified>2026-12-02T16:21:00.000Z</LastModified><Size>0</Size></Contents><NextContinuationToken>tok/en=</NextContinuationToken></ListBucketResult>"#;
        let page = parse_list(body).unwrap();
        assert_eq!(page.objects.len(), 2);
        assert_eq!(page.objects[0].key, "p/a&b");
        assert_eq!(page.objects[0].size, 12);
        assert_eq!(page.objects[1].last_modified, "2026-12-02T16:21:00.000Z");
        assert_eq!(page.next.as_deref(), Some("tok/en="));
        let last = br#"<ListBucketResult><IsTruncated>false</IsTruncated></ListBucketResult>"#;
        let page = parse_list(last).unwrap();
        assert!(page.objects.is_empty() && page.next.is_none());
        assert!(parse_list(b"<Error><Code>x</Code></Error>").is_none());
    }

    #[test]
    fn complete_document_escapes_etags() {
        let s = complete_body(&[(1, "\"abc\"".into()), (2, "x<y".into())]);
        assert!(
            s.contains("<Part><PartNumber>1</PartNumber><ETag>&quot;abc&quot;</ETag></Part>"),
            "{s}"
        );
        assert!(s.contains("<ETag>x&lt;y</ETag>"), "{s}");
    }

    #[test]
    fn maps_error_codes() {
        let m = |s: u16, c: &str| {
            map_error(
                StatusCode::from_u16(s).unwrap(),
                c.into(),
                String::new(),
                "b",
            )
        };
        assert!(matches!(
            m(404, "NoSuchBucket"),
            StorageError::NoSuchBucket { .. }
        ));
        assert!(matches!(
            m(403, "SignatureDoesNotMatch"),
            StorageError::AccessDenied { .. }
        ));
        assert!(matches!(m(403, ""), StorageError::AccessDenied { .. }));
        assert!(matches!(
            m(400, "InvalidAccessKeyId"),
            StorageError::AccessDenied { .. }
        ));
        assert!(matches!(
            m(404, "NoSuchKey"),
            StorageError::Failed { status: 404, .. }
        ));
    }
}
