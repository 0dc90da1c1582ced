//! SigV4 presigning for S3 (aws-sigv4): every request berth sends to the object store, and every
//! URL it hands out or proxies to, is a presigned URL with `UNSIGNED-PAYLOAD`.
//!
//! The signed headers are only `host`, so a presigned request can be replayed by any HTTP client
//! (reqwest, pingora's upstream, a registry client following a 307) as long as it sends the same
//! `Host` value: [`Signer::host_header`].

use std::borrow::Cow;
use std::time::{Duration, SystemTime};

use aws_credential_types::Credentials;
use aws_sigv4::http_request::{
    sign, PercentEncodingMode, SignableBody, SignableRequest, SignatureLocation, SigningSettings,
    UriPathNormalizationMode,
};
use aws_sigv4::sign::v4;
use aws_smithy_runtime_api::client::identity::Identity;
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

use super::Presigned;

/// Everything but the unreserved characters of RFC 3986 (`A-Z a-z 0-9 - . _ ~`): what SigV4
/// calls URI-encoding. Used for query names and values.
const QUERY_SET: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Object keys in the path: as [`QUERY_SET`] but '/' stays as it is.
const PATH_SET: &AsciiSet = &QUERY_SET.remove(b'/');

/// SigV4 allows at most 7 days.
pub const MAX_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

/// Percent-encodes an object key for the URL path: all but unreserved characters and '/'.
pub fn encode_key(key: &str) -> Cow<'_, str> {
    utf8_percent_encode(key, PATH_SET).into()
}

/// Percent-encodes a query parameter name or value: all but unreserved characters.
pub fn encode_query(value: &str) -> Cow<'_, str> {
    utf8_percent_encode(value, QUERY_SET).into()
}

/// Signs requests for one bucket on one endpoint. Built once; `presign` is cheap and `&self`.
pub struct Signer {
    identity: Identity,
    region: String,
    /// `http` or `https`.
    scheme: &'static str,
    /// `host` or `host:port` (port only when not the scheme's default): both the signed `host`
    /// and the authority of the URL.
    host_header: String,
    /// Path before the key, without a trailing '/': `<endpoint path>/<bucket>` in path style,
    /// `<endpoint path>` (often empty) in virtual-host style.
    base_path: String,
}

impl Signer {
    pub fn new(
        access_key: &str,
        secret_key: &str,
        region: &str,
        scheme: &'static str,
        host_header: String,
        base_path: String,
    ) -> Signer {
        let identity: Identity =
            Credentials::new(access_key, secret_key, None, None, "berth-config").into();
        Signer {
            identity,
            region: region.to_string(),
            scheme,
            host_header,
            base_path,
        }
    }

    pub fn host_header(&self) -> &str {
        &self.host_header
    }

    /// Presigns `method` on `key` (None: the bucket itself) with the request's own query
    /// parameters `query` (e.g. `("uploadId", id)`; an empty value is written as a bare name,
    /// `?uploads`), valid for `ttl` (clamped to 1 s ..= 7 days).
    pub fn presign(
        &self,
        method: &http::Method,
        key: Option<&str>,
        query: &[(&str, &str)],
        ttl: Duration,
    ) -> Presigned {
        self.presign_at(method, key, query, ttl, SystemTime::now())
    }

    /// [`Signer::presign`] at a given signing time (tests).
    pub fn presign_at(
        &self,
        method: &http::Method,
        key: Option<&str>,
        query: &[(&str, &str)],
        ttl: Duration,
        time: SystemTime,
    ) -> Presigned {
        let ttl = ttl.clamp(Duration::from_secs(1), MAX_TTL);

        // Path and the request's own query, already encoded: this is what gets signed.
        let mut pq =
            String::with_capacity(self.base_path.len() + key.map_or(1, |k| k.len() + 1) + 48 + 400);
        pq.push_str(&self.base_path);
        match key {
            Some(k) => {
                pq.push('/');
                pq.push_str(&encode_key(k));
            }
            None if self.base_path.is_empty() => pq.push('/'),
            None => {}
        }
        let mut sep = '?';
        for (name, value) in query {
            pq.push(sep);
            sep = '&';
            pq.push_str(&encode_query(name));
            if !value.is_empty() {
                pq.push('=');
                pq.push_str(&encode_query(value));
            }
        }

        let mut settings = SigningSettings::default();
        settings.percent_encoding_mode = PercentEncodingMode::Single;
        settings.uri_path_normalization_mode = UriPathNormalizationMode::Disabled;
        settings.signature_location = SignatureLocation::QueryParams;
        settings.expires_in = Some(ttl);
        // Only `host` is ever passed in; nothing to exclude.
        settings.excluded_headers = None;
        let params = v4::SigningParams::builder()
            .identity(&self.identity)
            .region(&self.region)
            .name("s3")
            .time(time)
            .settings(settings)
            .build()
            .expect("all signing parameters are set")
            .into();
        let request = SignableRequest::new(
            method.as_str(),
            pq.as_str(),
            std::iter::once(("host", self.host_header.as_str())),
            SignableBody::UnsignedPayload,
        )
        .expect("an encoded path and query is a valid URI");
        let (instructions, _signature) = sign(request, &params)
            .expect("signing with static credentials and an encoded URI cannot fail")
            .into_parts();
        let (_headers, signed_params) = instructions.into_parts();
        for (name, value) in signed_params {
            pq.push(sep);
            sep = '&';
            pq.push_str(name);
            pq.push('=');
            pq.push_str(&encode_query(&value));
        }

        let mut url =
            String::with_capacity(self.scheme.len() + 3 + self.host_header.len() + pq.len());
        url.push_str(self.scheme);
        url.push_str("://");
        url.push_str(&self.host_header);
        url.push_str(&pq);
        Presigned {
            url,
            path_and_query: pq,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signer(host_header: &str, base_path: &str, scheme: &'static str) -> Signer {
        Signer::new(
            "AKIDEXAMPLE",
            "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
            "us-east-1",
            scheme,
            host_header.to_string(),
            base_path.to_string(),
        )
    }

    fn query_map(pq: &str) -> Vec<(String, String)> {
        let q = pq.split_once('?').map(|(_, q)| q).unwrap_or("");
        q.split('&')
            .map(|kv| match kv.split_once('=') {
                Some((k, v)) => (k.to_string(), v.to_string()),
                None => (kv.to_string(), String::new()),
            })
            .collect()
    }

    #[test]
    fn keys_keep_unreserved_and_slash() {
        assert_eq!(
            encode_key("berth/blobs/abc-DEF_1.2~3"),
            "berth/blobs/abc-DEF_1.2~3"
        );
        assert_eq!(
            encode_key("a b+c=d&e?f#g%h"),
            "a%20b%2Bc%3Dd%26e%3Ff%23g%25h"
        );
        assert_eq!(encode_key("sha256:ab/x"), "sha256%3Aab/x");
        assert_eq!(encode_key("ü"), "%C3%BC");
        assert_eq!(encode_key("a//b/./c"), "a//b/./c");
    }

    #[test]
    fn query_values_encode_slash_and_plus() {
        assert_eq!(
            encode_query("AKID/20240101/us-east-1/s3/aws4_request"),
            "AKID%2F20240101%2Fus-east-1%2Fs3%2Faws4_request"
        );
        assert_eq!(encode_query("a+b c"), "a%2Bb%20c");
        assert_eq!(encode_query("2~x.y_z-w"), "2~x.y_z-w");
    }

    #[test]
    fn path_style_url_shape() {
        let s = signer("127.0.0.1:9000", "/bucket", "http");
        let p = s.presign(
            &http::Method::GET,
            Some("pre/blobs/a b"),
            &[],
            Duration::from_secs(60),
        );
        assert!(
            p.url.starts_with(
                "http://127.0.0.1:9000/bucket/pre/blobs/a%20b?X-Amz-Algorithm=AWS4-HMAC-SHA256&"
            ),
            "{}",
            p.url
        );
        assert_eq!(p.url, format!("http://127.0.0.1:9000{}", p.path_and_query));
        let q = query_map(&p.path_and_query);
        let names: Vec<&str> = q.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            names,
            [
                "X-Amz-Algorithm",
                "X-Amz-Credential",
                "X-Amz-Date",
                "X-Amz-Expires",
                "X-Amz-SignedHeaders",
                "X-Amz-Signature"
            ]
        );
        let get = |n: &str| q.iter().find(|(k, _)| k == n).unwrap().1.clone();
        assert_eq!(get("X-Amz-Expires"), "60");
        assert_eq!(get("X-Amz-SignedHeaders"), "host");
        assert!(get("X-Amz-Credential").starts_with("AKIDEXAMPLE%2F"));
        assert!(get("X-Amz-Credential").ends_with("%2Fus-east-1%2Fs3%2Faws4_request"));
        assert_eq!(get("X-Amz-Signature").len(), 64);
    }

    #[test]
    fn virtual_host_url_shape_and_bucket_root() {
        let s = signer("registry.s3.example.test", "", "https");
        let p = s.presign(&http::Method::PUT, Some("k"), &[], Duration::from_secs(60));
        assert!(
            p.url
                .starts_with("https://registry.s3.example.test/k?X-Amz-"),
            "{}",
            p.url
        );
        let p = s.presign(&http::Method::HEAD, None, &[], Duration::from_secs(60));
        assert!(
            p.path_and_query.starts_with("/?X-Amz-"),
            "{}",
            p.path_and_query
        );
        // Path style: the bucket without a trailing slash.
        let s = signer("127.0.0.1:9000", "/bucket", "http");
        let p = s.presign(&http::Method::HEAD, None, &[], Duration::from_secs(60));
        assert!(
            p.path_and_query.starts_with("/bucket?X-Amz-"),
            "{}",
            p.path_and_query
        );
    }

    #[test]
    fn request_query_comes_first_and_is_signed() {
        let s = signer("127.0.0.1:9000", "/bucket", "http");
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let a = s.presign_at(
            &http::Method::POST,
            Some("k"),
            &[("uploads", "")],
            Duration::from_secs(60),
            t,
        );
        assert!(
            a.path_and_query.starts_with("/bucket/k?uploads&X-Amz-"),
            "{}",
            a.path_and_query
        );
        let b = s.presign_at(
            &http::Method::PUT,
            Some("k"),
            &[("partNumber", "1"), ("uploadId", "a+b/c")],
            Duration::from_secs(60),
            t,
        );
        assert!(
            b.path_and_query
                .starts_with("/bucket/k?partNumber=1&uploadId=a%2Bb%2Fc&X-Amz-"),
            "{}",
            b.path_and_query
        );
        let c = s.presign_at(
            &http::Method::PUT,
            Some("k"),
            &[("partNumber", "2"), ("uploadId", "a+b/c")],
            Duration::from_secs(60),
            t,
        );
        let sig = |p: &Presigned| {
            p.path_and_query
                .rsplit_once("X-Amz-Signature=")
                .unwrap()
                .1
                .to_string()
        };
        assert_ne!(
            sig(&b),
            sig(&c),
            "the query must be covered by the signature"
        );
    }

    #[test]
    fn signing_is_deterministic_and_ttl_is_clamped() {
        let s = signer("127.0.0.1:9000", "/bucket", "http");
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let a = s.presign_at(
            &http::Method::GET,
            Some("k"),
            &[],
            Duration::from_secs(60),
            t,
        );
        let b = s.presign_at(
            &http::Method::GET,
            Some("k"),
            &[],
            Duration::from_secs(60),
            t,
        );
        assert_eq!(a.url, b.url);
        assert!(a.url.contains("X-Amz-Date=20231114T221320Z"), "{}", a.url);
        let h = s.presign_at(
            &http::Method::HEAD,
            Some("k"),
            &[],
            Duration::from_secs(60),
            t,
        );
        assert_ne!(a.url, h.url, "the method is signed");
        let long = s.presign_at(
            &http::Method::GET,
            Some("k"),
            &[],
            Duration::from_secs(30 * 86400),
            t,
        );
        assert!(long.url.contains("X-Amz-Expires=604800&"), "{}", long.url);
        let zero = s.presign_at(&http::Method::GET, Some("k"), &[], Duration::ZERO, t);
        assert!(zero.url.contains("X-Amz-Expires=1&"), "{}", zero.url);
    }

    /// The AWS documentation's presigned GET example (examplebucket/test.txt, 2013-05-24).
    #[test]
    fn matches_the_aws_documentation_example() {
        let s = Signer::new(
            "AKIAIOSFODNN7EXAMPLE",
            "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
            "us-east-1",
            "https",
            "examplebucket.s3.amazonaws.com".to_string(),
            String::new(),
        );
        // 20130524T000000Z
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_369_353_600);
        let p = s.presign_at(
            &http::Method::GET,
            Some("test.txt"),
            &[],
            Duration::from_secs(86400),
            t,
        );
        assert!(
            p.url.ends_with(
                "X-Amz-Signature=aeeed9bbccd4d02ee5c0109b86d86835f995330da4c265957d157751f604d404"
            ),
            "{}",
            p.url
        );
    }
}
