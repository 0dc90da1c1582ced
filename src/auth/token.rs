//! `auth.token`: Docker token authentication. Clients get a JWT from the token server named by
//! `realm` and send it as `Authorization: Bearer`; berth verifies it offline:
//!
//! - signature: RS256/RS384/RS512 or ES256/ES384 by the public key of one of the certificates
//!   in `rootcertbundle` (the token server's signing certificates). A `kid` header in
//!   libtrust form (what distribution's token servers send) picks the key; otherwise every
//!   key of the token's algorithm is tried. `x5c` chains are not followed: the signing
//!   certificate itself must be in the bundle;
//! - `iss` must equal `issuer`, `aud` must contain `service`;
//! - `exp` is required; `exp` and `nbf` are checked with [`LEEWAY_SECS`] of clock skew;
//! - `access` lists what the token grants (`[{"type","name","actions"}]`).

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use serde::Deserialize;
use sha2::{Digest as _, Sha256};

use super::access::Grant;

/// Clock skew allowed on `exp` and `nbf`, in seconds.
pub const LEEWAY_SECS: u64 = 30;

const RSA_ALGS: &[Algorithm] = &[Algorithm::RS256, Algorithm::RS384, Algorithm::RS512];
const P256_ALGS: &[Algorithm] = &[Algorithm::ES256];
const P384_ALGS: &[Algorithm] = &[Algorithm::ES384];

struct TrustedKey {
    key: DecodingKey,
    algs: &'static [Algorithm],
    /// libtrust key id of the certificate's public key.
    kid: String,
}

pub struct TokenVerifier {
    path: PathBuf,
    issuer: String,
    service: String,
    keys: RwLock<Arc<Vec<TrustedKey>>>,
}

/// A verified token.
#[derive(Debug, Clone)]
pub struct Verified {
    pub subject: String,
    pub grants: Vec<Grant>,
}

#[derive(Deserialize)]
struct Claims {
    #[serde(default)]
    sub: String,
    #[serde(default)]
    access: Vec<Grant>,
}

impl TokenVerifier {
    pub fn load(bundle: &Path, issuer: &str, service: &str) -> Result<TokenVerifier, String> {
        Ok(TokenVerifier {
            path: bundle.to_path_buf(),
            issuer: issuer.to_string(),
            service: service.to_string(),
            keys: RwLock::new(Arc::new(load_bundle(bundle)?)),
        })
    }

    /// Reads the bundle again; on error the old keys stay.
    pub fn reload(&self) -> Result<usize, String> {
        let keys = load_bundle(&self.path)?;
        let n = keys.len();
        *self.keys.write().expect("keys") = Arc::new(keys);
        Ok(n)
    }

    /// Verifies `token`. The error says why, for berth's log (never the token itself).
    pub fn verify(&self, token: &str) -> Result<Verified, String> {
        let header = jsonwebtoken::decode_header(token).map_err(|e| format!("header: {e}"))?;
        if !RSA_ALGS
            .iter()
            .chain(P256_ALGS)
            .chain(P384_ALGS)
            .any(|a| *a == header.alg)
        {
            return Err(format!("algorithm {:?} is not accepted", header.alg));
        }
        let mut validation = Validation::new(header.alg);
        validation.leeway = LEEWAY_SECS;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.set_issuer(&[&self.issuer]);
        validation.set_audience(&[&self.service]);
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);

        let keys = self.keys.read().expect("keys").clone();
        let usable = keys.iter().filter(|k| k.algs.contains(&header.alg));
        let by_kid: Vec<&TrustedKey> = match &header.kid {
            Some(kid) => usable.clone().filter(|k| &k.kid == kid).collect(),
            None => Vec::new(),
        };
        let candidates: Vec<&TrustedKey> = if by_kid.is_empty() {
            usable.collect()
        } else {
            by_kid
        };
        if candidates.is_empty() {
            return Err(format!("no trusted key for {:?}", header.alg));
        }
        let mut last = String::from("signature does not verify");
        for k in candidates {
            match jsonwebtoken::decode::<Claims>(token, &k.key, &validation) {
                Ok(data) => {
                    return Ok(Verified {
                        subject: data.claims.sub,
                        grants: data.claims.access,
                    })
                }
                Err(e) => match e.kind() {
                    jsonwebtoken::errors::ErrorKind::InvalidSignature => {
                        last = "signature does not verify".into();
                    }
                    // The signature verified with this key: the claims are what is wrong.
                    _ => return Err(e.to_string()),
                },
            }
        }
        Err(last)
    }
}

fn load_bundle(path: &Path) -> Result<Vec<TrustedKey>, String> {
    let err = |m: String| format!("auth.token.rootcertbundle {}: {m}", path.display());
    let pem = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    let mut keys = Vec::new();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| err(format!("PEM: {e}")))?;
        keys.push(trusted_key(&cert).map_err(err)?);
    }
    if keys.is_empty() {
        return Err(err("no certificate in the bundle".into()));
    }
    Ok(keys)
}

const OID_RSA: &str = "1.2.840.113549.1.1.1";
const OID_EC: &str = "1.2.840.10045.2.1";
const OID_P256: &str = "1.2.840.10045.3.1.7";
const OID_P384: &str = "1.3.132.0.34";

fn trusted_key(cert: &CertificateDer) -> Result<TrustedKey, String> {
    let (_, x509) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| format!("certificate: {e}"))?;
    let spki = x509.public_key();
    let alg = spki.algorithm.algorithm.to_id_string();
    let bits = spki.subject_public_key.data.as_ref();
    let (key, algs) = if alg == OID_RSA {
        // The key bits of an RSA SubjectPublicKeyInfo are the PKCS#1 RSAPublicKey.
        (DecodingKey::from_rsa_der(bits), RSA_ALGS)
    } else if alg == OID_EC {
        let curve = spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok())
            .map(|o| o.to_id_string());
        let algs = match curve.as_deref() {
            Some(OID_P256) => P256_ALGS,
            Some(OID_P384) => P384_ALGS,
            other => return Err(format!("unsupported EC curve {other:?} (P-256 or P-384)")),
        };
        (DecodingKey::from_ec_der(bits), algs)
    } else {
        return Err(format!(
            "unsupported key type {alg} (RSA, or EC P-256/P-384)"
        ));
    };
    Ok(TrustedKey {
        key,
        algs,
        kid: libtrust_kid(spki.raw),
    })
}

/// The key id docker/libtrust derives from a public key: SHA-256 of the DER
/// SubjectPublicKeyInfo, first 240 bits, base32, in groups of four joined by ':'.
pub fn libtrust_kid(spki_der: &[u8]) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let hash = Sha256::digest(spki_der);
    let bytes = &hash[..30];
    let mut out = String::with_capacity(59);
    let (mut acc, mut nbits) = (0u32, 0u32);
    let mut n = 0;
    for &b in bytes {
        acc = (acc << 8) | b as u32;
        nbits += 8;
        while nbits >= 5 {
            nbits -= 5;
            if n > 0 && n % 4 == 0 {
                out.push(':');
            }
            out.push(ALPHABET[((acc >> nbits) & 31) as usize] as char);
            n += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libtrust_kid_shape() {
        let kid = libtrust_kid(b"some key");
        // 240 bits = 48 base32 characters = 12 groups of 4.
        assert_eq!(kid.len(), 48 + 11);
        assert_eq!(kid.split(':').count(), 12);
        assert!(kid.split(':').all(|g| g.len() == 4
            && g.bytes()
                .all(|b| b.is_ascii_uppercase() || (b'2'..=b'7').contains(&b))));
    }

    #[test]
    fn bundle_errors_name_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("b.pem");
        std::fs::write(&p, "not a pem").unwrap();
        let e = TokenVerifier::load(&p, "i", "s").err().unwrap();
        assert!(e.contains("auth.token.rootcertbundle"), "{e}");
        assert!(e.contains("no certificate"), "{e}");
        let e = TokenVerifier::load(&dir.path().join("missing"), "i", "s")
            .err()
            .unwrap();
        assert!(e.contains("auth.token.rootcertbundle"), "{e}");
    }

    fn ec_cert() -> (rcgen::KeyPair, String) {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["issuer".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        (key, cert.pem())
    }

    fn sign(key: &rcgen::KeyPair, kid: Option<String>, claims: serde_json::Value) -> String {
        let mut h = jsonwebtoken::Header::new(Algorithm::ES256);
        h.kid = kid;
        jsonwebtoken::encode(
            &h,
            &claims,
            &jsonwebtoken::EncodingKey::from_ec_der(&key.serialize_der()),
        )
        .unwrap()
    }

    #[test]
    fn verifies_es256_and_checks_claims() {
        let dir = tempfile::tempdir().unwrap();
        let (key, pem) = ec_cert();
        let (other, other_pem) = ec_cert();
        let p = dir.path().join("b.pem");
        std::fs::write(&p, format!("{other_pem}{pem}")).unwrap();
        let v = TokenVerifier::load(&p, "iss", "svc").unwrap();
        let now = jsonwebtoken::get_current_timestamp();
        let good = serde_json::json!({
            "iss": "iss", "aud": "svc", "sub": "u", "exp": now + 300, "nbf": now - 5,
            "access": [{"type": "repository", "name": "a/b", "actions": ["pull", "push"]}],
        });
        let t = v.verify(&sign(&key, None, good.clone())).unwrap();
        assert_eq!(t.subject, "u");
        assert_eq!(t.grants[0].name, "a/b");
        // kid in libtrust form picks the key directly.
        use rcgen::PublicKeyData;
        let kid = libtrust_kid(&key.subject_public_key_info());
        assert!(v.verify(&sign(&key, Some(kid), good.clone())).is_ok());
        // The other trusted key works too.
        assert!(v.verify(&sign(&other, None, good.clone())).is_ok());

        let bad = |patch: serde_json::Value| {
            let mut c = good.clone();
            for (k, val) in patch.as_object().unwrap() {
                c[k] = val.clone();
            }
            v.verify(&sign(&key, None, c)).unwrap_err()
        };
        assert!(bad(serde_json::json!({"exp": now - 120})).contains("Expired"));
        assert!(bad(serde_json::json!({"nbf": now + 120})).contains("Immature"));
        assert!(bad(serde_json::json!({"aud": "other"})).contains("Audience"));
        assert!(bad(serde_json::json!({"iss": "other"})).contains("Issuer"));
        // Within the leeway.
        let mut c = good.clone();
        c["exp"] = serde_json::json!(now - 5);
        assert!(v.verify(&sign(&key, None, c)).is_ok());
        // No exp at all.
        let mut c = good.clone();
        c.as_object_mut().unwrap().remove("exp");
        assert!(v.verify(&sign(&key, None, c)).is_err());

        // An untrusted key.
        let (stranger, _) = ec_cert();
        assert!(v
            .verify(&sign(&stranger, None, good.clone()))
            .unwrap_err()
            .contains("signature"));
        // Tampered payload.
        let t = sign(&key, None, good.clone());
        let mut parts: Vec<&str> = t.split('.').collect();
        let forged = jsonwebtoken::encode(
            &jsonwebtoken::Header::new(Algorithm::ES256),
            &serde_json::json!({"iss": "iss", "aud": "svc", "exp": now + 300,
                "access": [{"type": "repository", "name": "x", "actions": ["*"]}]}),
            &jsonwebtoken::EncodingKey::from_ec_der(&stranger.serialize_der()),
        )
        .unwrap();
        let forged_payload = forged.split('.').nth(1).unwrap().to_string();
        parts[1] = &forged_payload;
        assert!(v.verify(&parts.join(".")).is_err());
        // alg=none and HMAC are refused.
        let none = format!(
            "{}.{}.",
            base64url(br#"{"alg":"none","typ":"JWT"}"#),
            base64url(good.to_string().as_bytes())
        );
        assert!(v.verify(&none).is_err());
        let hs = jsonwebtoken::encode(
            &jsonwebtoken::Header::new(Algorithm::HS256),
            &good,
            &jsonwebtoken::EncodingKey::from_secret(pem.as_bytes()),
        )
        .unwrap();
        assert!(v.verify(&hs).unwrap_err().contains("not accepted"));
        assert!(v.verify("garbage").is_err());
    }

    fn base64url(b: &[u8]) -> String {
        use std::fmt::Write;
        // Tiny encoder for the test (no padding).
        const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let mut out = String::new();
        for chunk in b.chunks(3) {
            let n =
                chunk.iter().fold(0u32, |acc, &x| (acc << 8) | x as u32) << (8 * (3 - chunk.len()));
            for i in 0..=chunk.len() {
                let _ = out.write_char(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
            }
        }
        out
    }

    #[test]
    fn verifies_rs256() {
        use rsa::pkcs1::EncodeRsaPrivateKey;
        use rsa::pkcs8::EncodePrivateKey;
        let rsa_key = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048).unwrap();
        let pkcs8 = rsa_key.to_pkcs8_der().unwrap();
        let key = rcgen::KeyPair::try_from(pkcs8.as_bytes()).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["issuer".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("b.pem");
        std::fs::write(&p, cert.pem()).unwrap();
        let v = TokenVerifier::load(&p, "iss", "svc").unwrap();
        let now = jsonwebtoken::get_current_timestamp();
        let claims = serde_json::json!({"iss": "iss", "aud": ["x", "svc"], "exp": now + 60});
        let t = jsonwebtoken::encode(
            &jsonwebtoken::Header::new(Algorithm::RS256),
            &claims,
            &jsonwebtoken::EncodingKey::from_rsa_der(rsa_key.to_pkcs1_der().unwrap().as_bytes()),
        )
        .unwrap();
        assert!(v.verify(&t).unwrap().grants.is_empty());
        // An RSA key does not verify ES256.
        let (ec, _) = ec_cert();
        assert!(v.verify(&sign(&ec, None, claims)).is_err());
    }
}
