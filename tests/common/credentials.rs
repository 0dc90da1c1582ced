//! Credentials for auth tests: an htpasswd file and a Docker token issuer.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

pub const ISSUER: &str = "test-issuer";
pub const SERVICE: &str = "berth-test";

/// An htpasswd file of bcrypt hashes (as `htpasswd -B` writes) in `dir`.
pub fn htpasswd_file(dir: &Path, users: &[(&str, &str)]) -> PathBuf {
    let mut text = String::new();
    for (user, pw) in users {
        let h = bcrypt::hash_with_result(pw, 5)
            .unwrap()
            .format_for_version(bcrypt::Version::TwoY);
        text.push_str(&format!("{user}:{h}\n"));
    }
    let p = dir.join("htpasswd");
    std::fs::write(&p, text).unwrap();
    p
}

/// A token issuer: an EC P-256 key and its self-signed certificate (berth's rootcertbundle).
pub struct Issuer {
    pub key: rcgen::KeyPair,
    pub cert_pem: String,
}

impl Issuer {
    pub fn new() -> Issuer {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["token-issuer".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        Issuer {
            cert_pem: cert.pem(),
            key,
        }
    }

    pub fn sign(&self, claims: &Value) -> String {
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256),
            claims,
            &jsonwebtoken::EncodingKey::from_ec_der(&self.key.serialize_der()),
        )
        .unwrap()
    }

    /// Standard claims (valid for 5 minutes) granting `access`: (type, name, actions).
    pub fn claims(access: &[(&str, &str, &[&str])]) -> Value {
        let now = jsonwebtoken::get_current_timestamp();
        json!({
            "iss": ISSUER,
            "sub": "tester",
            "aud": SERVICE,
            "exp": now + 300,
            "nbf": now - 1,
            "iat": now,
            "jti": format!("{now}"),
            "access": access.iter().map(|(t, n, a)| json!({"type": t, "name": n, "actions": a})).collect::<Vec<_>>(),
        })
    }

    pub fn token(&self, access: &[(&str, &str, &[&str])]) -> String {
        self.sign(&Self::claims(access))
    }

    pub fn auth(&self, access: &[(&str, &str, &[&str])]) -> Option<String> {
        Some(format!("Bearer {}", self.token(access)))
    }
}
