//! Requests parsed once into an [`Endpoint`]: method + path + query, names and digests
//! validated. Handlers then work on typed values only.

use http::Method;
use percent_encoding::percent_decode_str;

use crate::registry::names::{looks_like_digest, valid_repository, Digest, Reference};
use crate::registry::RegistryError;

/// Pagination: the most entries one page returns, whatever `n` asks.
pub const MAX_PAGE: usize = 10_000;

/// Route templates, the label values of per-route metrics. The last one stands for requests
/// that matched no route.
pub const ROUTES: [&str; 10] = [
    "/",
    "/v2/",
    "/v2/_catalog",
    "/v2/{name}/tags/list",
    "/v2/{name}/manifests/{reference}",
    "/v2/{name}/blobs/{digest}",
    "/v2/{name}/blobs/uploads/",
    "/v2/{name}/blobs/uploads/{uuid}",
    "/v2/{name}/referrers/{digest}",
    "unmatched",
];

/// Index in [`ROUTES`] of requests that matched no route.
pub const UNMATCHED_ROUTE: usize = ROUTES.len() - 1;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    /// Requested page size, capped at [`MAX_PAGE`]; None when `n` was not given.
    pub n: Option<usize>,
    pub last: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// `GET /`: a one-line banner.
    Banner,
    /// `GET /v2/`
    ApiBase,
    Catalog(Page),
    TagsList {
        name: String,
        page: Page,
    },
    GetManifest {
        name: String,
        reference: Reference,
        head: bool,
    },
    PutManifest {
        name: String,
        reference: Reference,
    },
    DeleteManifest {
        name: String,
        reference: Reference,
    },
    GetBlob {
        name: String,
        digest: Digest,
        head: bool,
    },
    DeleteBlob {
        name: String,
        digest: Digest,
    },
    /// `POST .../blobs/uploads/`, optionally monolithic (`?digest=`) or a mount.
    StartUpload {
        name: String,
        digest: Option<Digest>,
        mount: Option<Mount>,
    },
    UploadStatus {
        name: String,
        id: String,
    },
    PatchUpload {
        name: String,
        id: String,
    },
    FinishUpload {
        name: String,
        id: String,
        digest: Digest,
    },
    CancelUpload {
        name: String,
        id: String,
    },
    Referrers {
        name: String,
        digest: Digest,
        artifact_type: Option<String>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub digest: Digest,
    pub from: Option<String>,
}

impl Endpoint {
    /// Whether the request carries a body berth reads (for `Expect: 100-continue`).
    pub fn reads_body(&self) -> bool {
        matches!(
            self,
            Endpoint::PutManifest { .. }
                | Endpoint::StartUpload { .. }
                | Endpoint::PatchUpload { .. }
                | Endpoint::FinishUpload { .. }
        )
    }

    /// The repository the request is about, if any.
    pub fn repository(&self) -> Option<&str> {
        match self {
            Endpoint::Banner | Endpoint::ApiBase | Endpoint::Catalog(_) => None,
            Endpoint::TagsList { name, .. }
            | Endpoint::GetManifest { name, .. }
            | Endpoint::PutManifest { name, .. }
            | Endpoint::DeleteManifest { name, .. }
            | Endpoint::GetBlob { name, .. }
            | Endpoint::DeleteBlob { name, .. }
            | Endpoint::StartUpload { name, .. }
            | Endpoint::UploadStatus { name, .. }
            | Endpoint::PatchUpload { name, .. }
            | Endpoint::FinishUpload { name, .. }
            | Endpoint::CancelUpload { name, .. }
            | Endpoint::Referrers { name, .. } => Some(name),
        }
    }

    /// The route template, for logs and metrics (never the name or digest).
    pub fn route(&self) -> &'static str {
        ROUTES[self.route_index()]
    }

    /// Index of [`Endpoint::route`] in [`ROUTES`].
    pub fn route_index(&self) -> usize {
        match self {
            Endpoint::Banner => 0,
            Endpoint::ApiBase => 1,
            Endpoint::Catalog(_) => 2,
            Endpoint::TagsList { .. } => 3,
            Endpoint::GetManifest { .. }
            | Endpoint::PutManifest { .. }
            | Endpoint::DeleteManifest { .. } => 4,
            Endpoint::GetBlob { .. } | Endpoint::DeleteBlob { .. } => 5,
            Endpoint::StartUpload { .. } => 6,
            Endpoint::UploadStatus { .. }
            | Endpoint::PatchUpload { .. }
            | Endpoint::FinishUpload { .. }
            | Endpoint::CancelUpload { .. } => 7,
            Endpoint::Referrers { .. } => 8,
        }
    }

    pub fn parse(
        method: &Method,
        path: &str,
        query: Option<&str>,
    ) -> Result<Endpoint, RegistryError> {
        let q = Query(query.unwrap_or(""));
        let head = method == Method::HEAD;
        let get = method == Method::GET || head;

        if path == "/" {
            return if get {
                Ok(Endpoint::Banner)
            } else {
                Err(RegistryError::Unsupported)
            };
        }
        if path == "/v2" || path == "/v2/" {
            return if get {
                Ok(Endpoint::ApiBase)
            } else {
                Err(RegistryError::Unsupported)
            };
        }
        let rest = path
            .strip_prefix("/v2/")
            .ok_or(RegistryError::RouteUnknown)?;
        if rest == "_catalog" {
            return if get {
                Ok(Endpoint::Catalog(q.page()?))
            } else {
                Err(RegistryError::Unsupported)
            };
        }

        // The route is in the last two or three segments; the name is everything before.
        let mut tail = rest.rsplit('/');
        let (last, prev, prev2) = (tail.next().unwrap_or(""), tail.next(), tail.next());
        let (tail_len, route) = match (prev2, prev, last) {
            (_, Some("tags"), "list") => (2, Route::Tags),
            (Some("blobs"), Some("uploads"), id) => (3, Route::Upload(id)),
            (_, Some("blobs"), "uploads") => (2, Route::Upload("")),
            (_, Some("manifests"), r) => (2, Route::Manifest(r)),
            (_, Some("blobs"), d) => (2, Route::Blob(d)),
            (_, Some("referrers"), d) => (2, Route::Referrers(d)),
            _ => return Err(RegistryError::RouteUnknown),
        };
        let name = name_before(rest, tail_len).ok_or(RegistryError::RouteUnknown)?;
        if !valid_repository(name) {
            return Err(RegistryError::NameInvalid);
        }
        let name = name.to_owned();

        match route {
            Route::Tags if get => Ok(Endpoint::TagsList {
                name,
                page: q.page()?,
            }),
            Route::Manifest(r) => {
                let reference = match parse_reference(r) {
                    Ok(reference) => reference,
                    // No manifest can exist under it: for a read that is "unknown" (as the
                    // conformance suite expects); a write is told what is wrong with it.
                    Err(_) if get => return Err(RegistryError::ManifestUnknown),
                    Err(e) => return Err(e),
                };
                match *method {
                    Method::GET | Method::HEAD => Ok(Endpoint::GetManifest {
                        name,
                        reference,
                        head,
                    }),
                    Method::PUT => Ok(Endpoint::PutManifest { name, reference }),
                    Method::DELETE => Ok(Endpoint::DeleteManifest { name, reference }),
                    _ => Err(RegistryError::Unsupported),
                }
            }
            Route::Blob(d) => {
                let digest = parse_digest(d)?;
                match *method {
                    Method::GET | Method::HEAD => Ok(Endpoint::GetBlob { name, digest, head }),
                    Method::DELETE => Ok(Endpoint::DeleteBlob { name, digest }),
                    _ => Err(RegistryError::Unsupported),
                }
            }
            Route::Upload("") if method == Method::POST => {
                let digest = q.get("digest").map(|d| parse_digest(&d)).transpose()?;
                let mount = match q.get("mount") {
                    Some(m) => Some(Mount {
                        digest: parse_digest(&m)?,
                        from: q.get("from").filter(|f| valid_repository(f)),
                    }),
                    None => None,
                };
                Ok(Endpoint::StartUpload {
                    name,
                    digest,
                    mount,
                })
            }
            Route::Upload(id) if !id.is_empty() => {
                let id = id.to_string();
                match *method {
                    Method::GET => Ok(Endpoint::UploadStatus { name, id }),
                    Method::PATCH => Ok(Endpoint::PatchUpload { name, id }),
                    Method::PUT => {
                        let digest = q.get("digest").ok_or_else(|| {
                            RegistryError::DigestMalformed(
                                "the digest parameter is required".into(),
                            )
                        })?;
                        Ok(Endpoint::FinishUpload {
                            name,
                            id,
                            digest: parse_digest(&digest)?,
                        })
                    }
                    Method::DELETE => Ok(Endpoint::CancelUpload { name, id }),
                    _ => Err(RegistryError::Unsupported),
                }
            }
            Route::Referrers(d) if get => Ok(Endpoint::Referrers {
                name,
                digest: parse_digest(d)?,
                // An empty value is no filter (as distribution).
                artifact_type: q.get("artifactType").filter(|a| !a.is_empty()),
            }),
            _ => Err(RegistryError::Unsupported),
        }
    }
}

/// `rest` without its last `segments` path segments; None if no name is left.
fn name_before(rest: &str, segments: usize) -> Option<&str> {
    let mut end = rest.len();
    for _ in 0..segments {
        end = rest[..end].rfind('/')?;
    }
    (end > 0).then(|| &rest[..end])
}

enum Route<'a> {
    Tags,
    Manifest(&'a str),
    Blob(&'a str),
    Upload(&'a str),
    Referrers(&'a str),
}

fn parse_digest(s: &str) -> Result<Digest, RegistryError> {
    Digest::parse(s).ok_or_else(|| RegistryError::DigestMalformed(format!("{s:?} is not a digest")))
}

fn parse_reference(s: &str) -> Result<Reference, RegistryError> {
    Reference::parse(s).ok_or_else(|| {
        if looks_like_digest(s) {
            RegistryError::DigestMalformed(format!("{s:?} is not a digest"))
        } else {
            RegistryError::TagInvalid
        }
    })
}

/// A raw query string; values are percent-decoded on access.
struct Query<'a>(&'a str);

impl Query<'_> {
    fn get(&self, key: &str) -> Option<String> {
        self.0.split('&').find_map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (k == key).then(|| {
                // '+' is a space in form encoding; digests and names never contain either.
                percent_decode_str(&v.replace('+', " "))
                    .decode_utf8_lossy()
                    .into_owned()
            })
        })
    }

    fn page(&self) -> Result<Page, RegistryError> {
        let n = match self.get("n") {
            None => None,
            Some(n) => Some(
                n.parse::<usize>()
                    .map_err(|_| RegistryError::PaginationInvalid(format!("n={n:?}")))?
                    .min(MAX_PAGE),
            ),
        };
        Ok(Page {
            n,
            last: self.get("last").filter(|l| !l.is_empty()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d() -> String {
        format!("sha256:{}", "a".repeat(64))
    }

    fn parse(m: Method, p: &str, q: Option<&str>) -> Result<Endpoint, RegistryError> {
        Endpoint::parse(&m, p, q)
    }

    #[test]
    fn routes() {
        assert_eq!(parse(Method::GET, "/v2/", None).unwrap(), Endpoint::ApiBase);
        assert_eq!(parse(Method::GET, "/", None).unwrap(), Endpoint::Banner);
        assert!(matches!(
            parse(Method::GET, "/v2/_catalog", Some("n=2&last=a")).unwrap(),
            Endpoint::Catalog(Page { n: Some(2), last: Some(ref l) }) if l == "a"
        ));
        assert!(matches!(
            parse(Method::GET, "/v2/a/b/c/tags/list", None).unwrap(),
            Endpoint::TagsList { ref name, .. } if name == "a/b/c"
        ));
        assert!(matches!(
            parse(Method::HEAD, "/v2/lib/x/manifests/latest", None).unwrap(),
            Endpoint::GetManifest { head: true, reference: Reference::Tag(ref t), .. } if t == "latest"
        ));
        assert!(matches!(
            parse(Method::PUT, &format!("/v2/x/manifests/{}", d()), None).unwrap(),
            Endpoint::PutManifest {
                reference: Reference::Digest(_),
                ..
            }
        ));
        assert!(matches!(
            parse(Method::GET, &format!("/v2/x/blobs/{}", d()), None).unwrap(),
            Endpoint::GetBlob { head: false, .. }
        ));
        assert!(matches!(
            parse(Method::POST, "/v2/x/blobs/uploads/", None).unwrap(),
            Endpoint::StartUpload {
                digest: None,
                mount: None,
                ..
            }
        ));
        assert!(matches!(
            parse(
                Method::POST,
                "/v2/x/blobs/uploads",
                Some(&format!("digest={}", d()))
            )
            .unwrap(),
            Endpoint::StartUpload {
                digest: Some(_),
                ..
            }
        ));
        let mount = parse(
            Method::POST,
            "/v2/x/blobs/uploads/",
            Some(&format!(
                "mount={}&from=other%2Frepo",
                d().replace(':', "%3A")
            )),
        )
        .unwrap();
        assert!(matches!(
            mount,
            Endpoint::StartUpload { mount: Some(Mount { from: Some(ref f), .. }), .. } if f == "other/repo"
        ));
        assert!(matches!(
            parse(Method::PATCH, "/v2/x/blobs/uploads/abc", None).unwrap(),
            Endpoint::PatchUpload { ref id, .. } if id == "abc"
        ));
        assert!(matches!(
            parse(
                Method::PUT,
                "/v2/x/blobs/uploads/abc",
                Some(&format!("digest={}", d()))
            )
            .unwrap(),
            Endpoint::FinishUpload { .. }
        ));
        assert!(matches!(
            parse(Method::GET, &format!("/v2/x/referrers/{}", d()), Some("artifactType=a%2Fb")).unwrap(),
            Endpoint::Referrers { artifact_type: Some(ref a), .. } if a == "a/b"
        ));
        // A repository may itself have components named like route keywords.
        assert!(matches!(
            parse(Method::GET, "/v2/blobs/manifests/tags/list", None).unwrap(),
            Endpoint::TagsList { ref name, .. } if name == "blobs/manifests"
        ));
    }

    #[test]
    fn bad_input() {
        let code = |m, p: &str, q| parse(m, p, q).unwrap_err().code();
        assert_eq!(
            code(Method::GET, "/v2/UPPER/manifests/x", None),
            "NAME_INVALID"
        );
        // Reads of a manifest that cannot exist: unknown; writes: what is wrong.
        for m in [Method::GET, Method::HEAD] {
            for r in ["-bad", ".INVALID_MANIFEST_NAME", "sha256:zz"] {
                let e = parse(m.clone(), &format!("/v2/x/manifests/{r}"), None).unwrap_err();
                assert_eq!((e.status().as_u16(), e.code()), (404, "MANIFEST_UNKNOWN"));
            }
        }
        for m in [Method::PUT, Method::DELETE] {
            assert_eq!(code(m.clone(), "/v2/x/manifests/-bad", None), "TAG_INVALID");
            assert_eq!(code(m, "/v2/x/manifests/sha256:zz", None), "DIGEST_INVALID");
        }
        let e = parse(Method::GET, "/v2/x/blobs/latest", None).unwrap_err();
        assert_eq!(e.code(), "DIGEST_INVALID");
        assert_eq!(e.to_string(), "invalid digest");
        assert_eq!(
            code(Method::PUT, "/v2/x/blobs/uploads/abc", None),
            "DIGEST_INVALID"
        );
        assert_eq!(
            code(Method::POST, "/v2/x/manifests/latest", None),
            "UNSUPPORTED"
        );
        assert_eq!(
            code(Method::GET, "/v2/_catalog", Some("n=many")),
            "PAGINATION_NUMBER_INVALID"
        );
        assert_eq!(parse(Method::GET, "/v3/", None).unwrap_err().status(), 404);
        assert_eq!(
            parse(Method::GET, "/v2/x/unknown/route", None)
                .unwrap_err()
                .status(),
            404
        );
        assert_eq!(
            parse(Method::GET, "/v2/manifests/latest", None)
                .unwrap_err()
                .status(),
            404
        );
    }

    #[test]
    fn page_size_is_capped() {
        assert!(matches!(
            parse(Method::GET, "/v2/_catalog", Some("n=99999999")).unwrap(),
            Endpoint::Catalog(Page {
                n: Some(MAX_PAGE),
                ..
            })
        ));
    }
}
