//! Manifests: validation on push, byte-exact storage, tags, deletes and the referrers index.
//!
//! Accept negotiation: berth serves a manifest as pushed, with its own media type, whatever
//! the Accept header says. It never converts between formats (there is nothing to convert an
//! OCI manifest into), and current clients (docker, containerd, podman, skopeo) all read OCI
//! and docker v2 alike, so refusing an OCI manifest to a client that only listed the docker v2
//! type would only break pulls. Clients check the media type they receive.

use bytes::Bytes;
use serde::Deserialize;

use super::names::{Digest, Reference};
use super::{Registry, RegistryError, RegistryResult};
use crate::meta::{ManifestPut, ManifestRecord, Referrer};

/// Largest manifest accepted (distribution's limit).
pub const MAX_MANIFEST_BYTES: usize = 4 * 1024 * 1024;

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Descriptor {
    media_type: Option<String>,
    digest: String,
    size: Option<i64>,
    #[serde(default)]
    urls: Vec<String>,
}

/// The fields of any manifest or index that berth looks at.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ManifestFields {
    schema_version: Option<i64>,
    media_type: Option<String>,
    artifact_type: Option<String>,
    config: Option<Descriptor>,
    layers: Option<Vec<Descriptor>>,
    manifests: Option<Vec<Descriptor>>,
    subject: Option<Descriptor>,
    annotations: Option<serde_json::Map<String, serde_json::Value>>,
}

/// A stored manifest, ready to serve.
pub struct FoundManifest {
    pub digest: Digest,
    pub record: ManifestRecord,
}

/// What a successful push reports back.
pub struct PushedManifest {
    pub digest: Digest,
    pub subject: Option<Digest>,
}

/// A manifest body checked for size, digest, JSON shape and media type.
struct Parsed {
    digest: Digest,
    media_type: String,
    fields: ManifestFields,
    body: Bytes,
}

impl Parsed {
    fn new(
        content_type: Option<&str>,
        body: Bytes,
        expected: Option<&Digest>,
    ) -> RegistryResult<Parsed> {
        if body.len() > MAX_MANIFEST_BYTES {
            return Err(RegistryError::TooLarge(format!(
                "manifest is {} bytes, the limit is {MAX_MANIFEST_BYTES}",
                body.len()
            )));
        }
        // Pushed by digest: that digest's algorithm; by tag: sha256.
        let digest = match expected {
            Some(d) => Digest::of(d.algorithm(), &body),
            None => Digest::sha256_of(&body),
        };
        if let Some(d) = expected {
            if d != &digest {
                return Err(RegistryError::DigestInvalid(format!(
                    "manifest digest is {digest}, URL says {d}"
                )));
            }
        }
        let fields: ManifestFields = serde_json::from_slice(&body)
            .map_err(|e| RegistryError::ManifestInvalid(format!("not a JSON manifest: {e}")))?;
        let media_type = media_type_of(content_type, &fields)?;
        Ok(Parsed {
            digest,
            media_type,
            fields,
            body,
        })
    }
}

impl Registry {
    pub async fn get_manifest(
        &self,
        repo: &str,
        reference: &Reference,
    ) -> RegistryResult<FoundManifest> {
        let found = match reference {
            Reference::Digest(d) => self
                .meta
                .manifest(repo, d)
                .await?
                .map(|record| (d.clone(), record)),
            Reference::Tag(t) => self.meta.tagged_manifest(repo, t).await?,
        };
        let (digest, record) = found.ok_or(RegistryError::ManifestUnknown)?;
        Ok(FoundManifest { digest, record })
    }

    /// PUT manifest. `content_type` is the request's Content-Type.
    pub async fn put_manifest(
        &self,
        repo: &str,
        reference: &Reference,
        content_type: Option<&str>,
        body: Bytes,
    ) -> RegistryResult<PushedManifest> {
        let expected = match reference {
            Reference::Digest(d) => Some(d),
            Reference::Tag(_) => None,
        };
        let m = Parsed::new(content_type, body, expected)?;
        self.check_references(repo, &m.media_type, &m.fields)
            .await?;
        let tag = match reference {
            Reference::Tag(t) => Some(t.as_str()),
            Reference::Digest(_) => None,
        };
        let (digest, record) = self.store_parsed(repo, m, tag, false).await?;
        Ok(PushedManifest {
            digest,
            subject: record.subject,
        })
    }

    /// Stores a manifest a mirror fetched from its upstream. Its blobs are not checked: a
    /// mirror fetches them on demand.
    pub(crate) async fn store_mirrored_manifest(
        &self,
        repo: &str,
        tag: Option<&str>,
        fetched: crate::mirror::upstream::UpstreamManifest,
    ) -> RegistryResult<FoundManifest> {
        let m = Parsed::new(
            fetched.media_type.as_deref(),
            fetched.body,
            Some(&fetched.digest),
        )?;
        let (digest, record) = self.store_parsed(repo, m, tag, true).await?;
        Ok(FoundManifest { digest, record })
    }

    async fn store_parsed(
        &self,
        repo: &str,
        m: Parsed,
        tag: Option<&str>,
        mirrored: bool,
    ) -> RegistryResult<(Digest, ManifestRecord)> {
        let subject = match &m.fields.subject {
            Some(s) => Some(Digest::parse(&s.digest).ok_or_else(|| {
                RegistryError::ManifestInvalid("subject digest is invalid".into())
            })?),
            None => None,
        };
        let referrer = subject.as_ref().map(|s| Referrer {
            subject: s.clone(),
            descriptor: referrer_descriptor(&m.media_type, &m.digest, m.body.len(), &m.fields),
        });
        // A mirror stores a manifest before it has fetched its blobs, so it records no
        // references (GC then treats mirrored blobs as a cache: collected after the grace,
        // fetched again on demand).
        let references = if mirrored {
            Vec::new()
        } else {
            references_of(&m.media_type, &m.fields)
        };
        let record = ManifestRecord {
            references,
            media_type: m.media_type,
            body: m.body,
            subject,
        };
        match self
            .meta
            .put_manifest(repo, &m.digest, record.clone(), tag, referrer)
            .await?
        {
            ManifestPut::Stored => Ok((m.digest, record)),
            // Collected (or unlinked, deleted) after check_references: the push loses.
            ManifestPut::MissingReference(d) => Err(RegistryError::ManifestBlobUnknown(format!(
                "{d} is unknown to {repo}"
            ))),
        }
    }

    /// DELETE by digest removes the manifest and its tags; by tag, only the tag.
    pub async fn delete_manifest(&self, repo: &str, reference: &Reference) -> RegistryResult<()> {
        let deleted = match reference {
            Reference::Digest(d) => self.meta.delete_manifest(repo, d).await?,
            Reference::Tag(t) => self.meta.delete_tag(repo, t).await?,
        };
        if deleted {
            Ok(())
        } else {
            Err(RegistryError::ManifestUnknown)
        }
    }

    /// The referrers of `subject` as an OCI image index, filtered by artifact type if asked.
    pub async fn referrers(
        &self,
        repo: &str,
        subject: &Digest,
        artifact_type: Option<&str>,
    ) -> RegistryResult<Vec<u8>> {
        let descriptors = self.meta.referrers(repo, subject).await?;
        let mut out =
            Vec::with_capacity(128 + descriptors.iter().map(|d| d.len() + 1).sum::<usize>());
        out.extend_from_slice(br#"{"schemaVersion":2,"mediaType":""#);
        out.extend_from_slice(OCI_INDEX.as_bytes());
        out.extend_from_slice(br#"","manifests":["#);
        let mut first = true;
        for d in &descriptors {
            if let Some(want) = artifact_type {
                let v: serde_json::Value = serde_json::from_slice(d)
                    .map_err(|e| RegistryError::Internal(format!("stored descriptor: {e}")))?;
                if v.get("artifactType").and_then(|a| a.as_str()) != Some(want) {
                    continue;
                }
            }
            if !first {
                out.push(b',');
            }
            first = false;
            out.extend_from_slice(d);
        }
        out.extend_from_slice(b"]}");
        Ok(out)
    }

    /// Every blob a manifest names must be in the repository; every child of an index too.
    async fn check_references(
        &self,
        repo: &str,
        media_type: &str,
        m: &ManifestFields,
    ) -> RegistryResult<()> {
        if is_index(media_type) {
            for child in m.manifests.iter().flatten() {
                let d = descriptor_digest(child)?;
                if self.meta.manifest(repo, &d).await?.is_none() {
                    return Err(RegistryError::ManifestBlobUnknown(format!(
                        "index references manifest {d}, unknown to {repo}"
                    )));
                }
            }
            return Ok(());
        }
        let config = m
            .config
            .as_ref()
            .ok_or_else(|| RegistryError::ManifestInvalid("manifest has no config".into()))?;
        let layers = m
            .layers
            .as_ref()
            .ok_or_else(|| RegistryError::ManifestInvalid("manifest has no layers".into()))?;
        for blob in std::iter::once(config).chain(layers.iter()) {
            let d = descriptor_digest(blob)?;
            if blob.size.is_some_and(|s| s < 0) {
                return Err(RegistryError::ManifestInvalid(format!(
                    "negative size for {d}"
                )));
            }
            // Foreign (non-distributable) layers live elsewhere, named by their urls.
            if !blob.urls.is_empty() {
                continue;
            }
            match self.meta.repo_blob(repo, &d).await? {
                None => {
                    return Err(RegistryError::ManifestBlobUnknown(format!(
                        "blob {d} is unknown to {repo}"
                    )))
                }
                Some(rec) => {
                    if blob.size.is_some_and(|s| s as u64 != rec.size) {
                        return Err(RegistryError::ManifestInvalid(format!(
                            "blob {d} is {} bytes, the manifest says {}",
                            rec.size,
                            blob.size.unwrap_or(0)
                        )));
                    }
                }
            }
        }
        Ok(())
    }
}

fn is_index(media_type: &str) -> bool {
    media_type == OCI_INDEX || media_type == DOCKER_LIST
}

/// What a manifest references (see [`ManifestRecord::references`]): an index's manifests; an
/// image manifest's config and layers, without foreign layers. Deduplicated, first-seen order.
fn references_of(media_type: &str, m: &ManifestFields) -> Vec<Digest> {
    let descriptors: Vec<&Descriptor> = if is_index(media_type) {
        m.manifests.iter().flatten().collect()
    } else {
        m.config
            .iter()
            .chain(m.layers.iter().flatten())
            .filter(|d| d.urls.is_empty())
            .collect()
    };
    let mut out: Vec<Digest> = Vec::with_capacity(descriptors.len());
    for d in descriptors {
        if let Some(d) = Digest::parse(&d.digest) {
            if !out.contains(&d) {
                out.push(d);
            }
        }
    }
    out
}

/// The references of a stored manifest body (for a reference index built after the fact);
/// empty if the body does not parse.
pub fn references(media_type: &str, body: &[u8]) -> Vec<Digest> {
    match serde_json::from_slice::<ManifestFields>(body) {
        Ok(fields) => references_of(media_type, &fields),
        Err(_) => Vec::new(),
    }
}

fn descriptor_digest(d: &Descriptor) -> RegistryResult<Digest> {
    Digest::parse(&d.digest).ok_or_else(|| {
        RegistryError::ManifestInvalid(format!("invalid digest {:?} in manifest", d.digest))
    })
}

/// The manifest's media type: Content-Type and the body's `mediaType` must agree when both are
/// given; one of them must name a supported type.
fn media_type_of(content_type: Option<&str>, m: &ManifestFields) -> RegistryResult<String> {
    if m.schema_version != Some(2) {
        return Err(RegistryError::ManifestInvalid(
            "schemaVersion must be 2 (schema 1 manifests are not supported)".into(),
        ));
    }
    // Parameters (e.g. "; charset=utf-8") are not part of the type.
    let header = content_type
        .map(|c| c.split(';').next().unwrap_or("").trim())
        .filter(|c| !c.is_empty() && *c != "application/json" && *c != "application/octet-stream");
    let media_type = match (header, m.media_type.as_deref()) {
        (Some(h), Some(b)) if h != b => {
            return Err(RegistryError::ManifestInvalid(format!(
                "Content-Type {h} does not match the manifest's mediaType {b}"
            )))
        }
        (Some(h), _) => h,
        (None, Some(b)) => b,
        // OCI manifests may omit mediaType: tell them apart by shape.
        (None, None) if m.manifests.is_some() => OCI_INDEX,
        (None, None) => OCI_MANIFEST,
    };
    match media_type {
        OCI_MANIFEST | OCI_INDEX | DOCKER_MANIFEST | DOCKER_LIST => Ok(media_type.to_string()),
        other => Err(RegistryError::ManifestInvalid(format!(
            "unsupported manifest media type {other}"
        ))),
    }
}

/// The descriptor listed by the referrers API for a manifest with a subject.
fn referrer_descriptor(
    media_type: &str,
    digest: &Digest,
    size: usize,
    m: &ManifestFields,
) -> Bytes {
    let artifact_type = m
        .artifact_type
        .clone()
        .or_else(|| m.config.as_ref().and_then(|c| c.media_type.clone()));
    let mut d = serde_json::json!({
        "mediaType": media_type,
        "digest": digest.as_str(),
        "size": size,
    });
    if let Some(a) = artifact_type {
        d["artifactType"] = serde_json::Value::String(a);
    }
    if let Some(ann) = &m.annotations {
        d["annotations"] = serde_json::Value::Object(ann.clone());
    }
    Bytes::from(serde_json::to_vec(&d).expect("json of a json value"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(json: &str) -> ManifestFields {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn media_type_from_header_or_body() {
        let m = fields(
            r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json"}"#,
        );
        assert_eq!(media_type_of(None, &m).unwrap(), OCI_MANIFEST);
        assert_eq!(media_type_of(Some(OCI_MANIFEST), &m).unwrap(), OCI_MANIFEST);
        assert!(media_type_of(Some(DOCKER_MANIFEST), &m).is_err());
        let bare = fields(r#"{"schemaVersion":2,"manifests":[]}"#);
        assert_eq!(media_type_of(None, &bare).unwrap(), OCI_INDEX);
        let v1 = fields(r#"{"schemaVersion":1}"#);
        assert!(media_type_of(None, &v1).is_err());
        let odd = fields(r#"{"schemaVersion":2}"#);
        assert!(media_type_of(Some("text/plain"), &odd).is_err());
    }

    #[test]
    fn referrer_descriptor_takes_artifact_type_or_config_type() {
        let m = fields(
            r#"{"schemaVersion":2,"config":{"mediaType":"application/x.sig","digest":"sha256:00","size":2},"annotations":{"k":"v"}}"#,
        );
        let d = Digest::sha256_of(b"x");
        let v: serde_json::Value =
            serde_json::from_slice(&referrer_descriptor(OCI_MANIFEST, &d, 10, &m)).unwrap();
        assert_eq!(v["artifactType"], "application/x.sig");
        assert_eq!(v["annotations"]["k"], "v");
        assert_eq!(v["size"], 10);
    }
}
