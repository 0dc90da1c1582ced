//! The registry's error enum, one variant per OCI error code, mapped once to wire errors:
//! status + `{"errors":[{"code","message","detail"}]}`.

use http::StatusCode;

use crate::meta::MetaError;
use crate::storage::StorageError;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("blob unknown to registry")]
    BlobUnknown,
    #[error("blob upload invalid: {0}")]
    BlobUploadInvalid(String),
    #[error("blob upload unknown to registry")]
    BlobUploadUnknown,
    #[error("provided digest did not match uploaded content")]
    DigestInvalid(String),
    #[error("manifest references a blob unknown to the repository: {0}")]
    ManifestBlobUnknown(String),
    #[error("manifest invalid: {0}")]
    ManifestInvalid(String),
    #[error("manifest unknown to registry")]
    ManifestUnknown,
    #[error("invalid repository name")]
    NameInvalid,
    #[error("repository name not known to registry")]
    NameUnknown,
    #[error("provided length did not match content length: {0}")]
    SizeInvalid(String),
    #[error("payload too large: {0}")]
    TooLarge(String),
    #[error("manifest tag did not match URI")]
    TagInvalid,
    #[error("the operation is unsupported")]
    Unsupported,
    /// Upload chunk out of order: `offset` is where the session stands.
    #[error("requested range not satisfiable")]
    RangeInvalid { offset: u64 },
    /// A blob GET with a Range beyond the blob.
    #[error("requested range not satisfiable")]
    RangeNotSatisfiable,
    #[error("no such route")]
    RouteUnknown,
    #[error("upload is being written by another request")]
    UploadBusy,
    #[error("invalid pagination parameter: {0}")]
    PaginationInvalid(String),
    #[error("object store unavailable, retry later")]
    Unavailable(String),
    /// Missing or invalid credentials; `challenge` is the WWW-Authenticate value.
    #[error("authentication required")]
    Unauthorized { challenge: String },
    /// Valid credentials without the access the request needs; `challenge` (bearer tokens)
    /// names the scope to ask for.
    #[error("requested access to the resource is denied")]
    Denied { challenge: Option<String> },
    #[error("too many requests")]
    TooManyRequests(String),
    #[error("request header fields too large")]
    HeadersTooLarge(String),
    #[error("internal error")]
    Internal(String),
}

impl RegistryError {
    pub fn status(&self) -> StatusCode {
        use RegistryError::*;
        match self {
            BlobUnknown | BlobUploadUnknown | ManifestUnknown | NameUnknown | RouteUnknown => {
                StatusCode::NOT_FOUND
            }
            BlobUploadInvalid(_)
            | DigestInvalid(_)
            | ManifestBlobUnknown(_)
            | ManifestInvalid(_)
            | NameInvalid
            | SizeInvalid(_)
            | TagInvalid
            | PaginationInvalid(_) => StatusCode::BAD_REQUEST,
            TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Unsupported => StatusCode::METHOD_NOT_ALLOWED,
            RangeInvalid { .. } | RangeNotSatisfiable => StatusCode::RANGE_NOT_SATISFIABLE,
            UploadBusy => StatusCode::CONFLICT,
            Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            Unauthorized { .. } => StatusCode::UNAUTHORIZED,
            Denied { .. } => StatusCode::FORBIDDEN,
            TooManyRequests(_) => StatusCode::TOO_MANY_REQUESTS,
            HeadersTooLarge(_) => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        }
    }

    pub fn code(&self) -> &'static str {
        use RegistryError::*;
        match self {
            BlobUnknown => "BLOB_UNKNOWN",
            BlobUploadInvalid(_) | UploadBusy | RangeInvalid { .. } => "BLOB_UPLOAD_INVALID",
            BlobUploadUnknown => "BLOB_UPLOAD_UNKNOWN",
            DigestInvalid(_) => "DIGEST_INVALID",
            ManifestBlobUnknown(_) => "MANIFEST_BLOB_UNKNOWN",
            ManifestInvalid(_) => "MANIFEST_INVALID",
            ManifestUnknown => "MANIFEST_UNKNOWN",
            NameInvalid => "NAME_INVALID",
            NameUnknown => "NAME_UNKNOWN",
            SizeInvalid(_) | TooLarge(_) | HeadersTooLarge(_) => "SIZE_INVALID",
            TagInvalid => "TAG_INVALID",
            Unsupported | RouteUnknown => "UNSUPPORTED",
            RangeNotSatisfiable => "RANGE_INVALID",
            PaginationInvalid(_) => "PAGINATION_NUMBER_INVALID",
            Unavailable(_) => "UNAVAILABLE",
            Internal(_) => "UNKNOWN",
            Unauthorized { .. } => "UNAUTHORIZED",
            Denied { .. } => "DENIED",
            TooManyRequests(_) => "TOOMANYREQUESTS",
        }
    }

    /// The detail shown to clients. Internal causes are logged, not sent.
    fn detail(&self) -> Option<&str> {
        use RegistryError::*;
        match self {
            BlobUploadInvalid(d)
            | DigestInvalid(d)
            | ManifestBlobUnknown(d)
            | ManifestInvalid(d)
            | SizeInvalid(d)
            | TooLarge(d)
            | PaginationInvalid(d)
            | TooManyRequests(d)
            | HeadersTooLarge(d) => Some(d),
            _ => None,
        }
    }

    /// The OCI error body.
    pub fn body(&self) -> Vec<u8> {
        let message = match self {
            // The Display of these carries the detail; keep the message short.
            RegistryError::DigestInvalid(_) => {
                "provided digest did not match uploaded content".to_string()
            }
            other => other.to_string(),
        };
        let v = serde_json::json!({
            "errors": [{
                "code": self.code(),
                "message": message,
                "detail": self.detail(),
            }]
        });
        serde_json::to_vec(&v).expect("json of a json value")
    }
}

impl From<MetaError> for RegistryError {
    fn from(e: MetaError) -> Self {
        match e {
            MetaError::Unavailable(_) => RegistryError::Unavailable(e.to_string()),
            MetaError::Failed(_) => RegistryError::Internal(e.to_string()),
        }
    }
}

impl From<StorageError> for RegistryError {
    fn from(e: StorageError) -> Self {
        match e {
            StorageError::Unreachable { .. } | StorageError::Unavailable { .. } => {
                RegistryError::Unavailable(e.to_string())
            }
            other => RegistryError::Internal(other.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_format() {
        let e = RegistryError::DigestInvalid("expected sha256:aa".into());
        assert_eq!(e.status(), 400);
        let v: serde_json::Value = serde_json::from_slice(&e.body()).unwrap();
        assert_eq!(v["errors"][0]["code"], "DIGEST_INVALID");
        assert_eq!(v["errors"][0]["detail"], "expected sha256:aa");
        assert!(v["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("digest"));
    }

    #[test]
    fn internal_causes_stay_out_of_the_body() {
        let e = RegistryError::Internal("redb: disk on fire at /secret/path".into());
        assert_eq!(e.status(), 500);
        let body = String::from_utf8(e.body()).unwrap();
        assert!(!body.contains("secret"), "{body}");
    }

    #[test]
    fn storage_errors_map_to_503_or_500() {
        let e: RegistryError = StorageError::Unavailable {
            status: 503,
            code: "SlowDown".into(),
        }
        .into();
        assert_eq!(e.status(), 503);
        let e: RegistryError = StorageError::Failed {
            status: 400,
            code: "InvalidPart".into(),
            message: "x".into(),
        }
        .into();
        assert_eq!(e.status(), 500);
    }

    #[test]
    fn statuses() {
        assert_eq!(RegistryError::BlobUnknown.status(), 404);
        assert_eq!(RegistryError::Unsupported.status(), 405);
        assert_eq!(RegistryError::RangeInvalid { offset: 3 }.status(), 416);
        assert_eq!(RegistryError::TooLarge("x".into()).status(), 413);
        assert_eq!(RegistryError::NameInvalid.code(), "NAME_INVALID");
        let e = RegistryError::Unauthorized {
            challenge: "Basic realm=\"r\"".into(),
        };
        assert_eq!((e.status().as_u16(), e.code()), (401, "UNAUTHORIZED"));
        assert!(!String::from_utf8(e.body()).unwrap().contains("realm"));
        let e = RegistryError::Denied { challenge: None };
        assert_eq!((e.status().as_u16(), e.code()), (403, "DENIED"));
        let e = RegistryError::TooManyRequests("4 uploads".into());
        assert_eq!((e.status().as_u16(), e.code()), (429, "TOOMANYREQUESTS"));
        assert_eq!(RegistryError::HeadersTooLarge("x".into()).status(), 431);
    }
}
