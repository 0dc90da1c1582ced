//! Downstream TLS (`tls:`): rustls through pingora, HTTP/2 and HTTP/1.1 by ALPN, optional
//! client certificates (mTLS). The certificate and key are served by a resolver, and client
//! certificates checked by a verifier, that SIGHUP reloads ([`crate::auth::HangupReload`],
//! [`TlsFiles::reload`]): new connections get the new files, established ones keep theirs.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use pingora_core::listeners::tls::TlsSettings;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};

use crate::config::TlsConfig;

/// Serves the current certificate; [`CertResolver::reload`] swaps it.
#[derive(Debug)]
pub struct CertResolver {
    certificate: PathBuf,
    key: PathBuf,
    current: RwLock<Arc<CertifiedKey>>,
}

impl CertResolver {
    pub fn load(certificate: &Path, key: &Path) -> Result<CertResolver, String> {
        Ok(CertResolver {
            certificate: certificate.to_path_buf(),
            key: key.to_path_buf(),
            current: RwLock::new(Arc::new(certified_key(certificate, key)?)),
        })
    }

    /// Reads the files again; on error the current certificate stays.
    pub fn reload(&self) -> Result<(), String> {
        let k = certified_key(&self.certificate, &self.key)?;
        *self.current.write().expect("certificate") = Arc::new(k);
        Ok(())
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().expect("certificate").clone())
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_certs(path: &Path, key: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("{key} {}: {e}", path.display()))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{key} {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{key} {}: no PEM certificate", path.display()));
    }
    Ok(certs)
}

/// Certificate chain and key from PEM files; the key must belong to the certificate.
fn certified_key(certificate: &Path, key: &Path) -> Result<CertifiedKey, String> {
    let certs = read_certs(certificate, "tls.certificate")?;
    let pem = std::fs::read(key).map_err(|e| format!("tls.key {}: {e}", key.display()))?;
    let private = PrivateKeyDer::from_pem_slice(&pem)
        .map_err(|e| format!("tls.key {}: {e}", key.display()))?;
    CertifiedKey::from_der(certs, private, &provider())
        .map_err(|e| format!("tls.certificate / tls.key: {e}"))
}

/// Checks client certificates against the CAs of `tls.clientcas`, which
/// [`ClientCas::reload`] reads again.
#[derive(Debug)]
pub struct ClientCas {
    paths: Vec<PathBuf>,
    current: RwLock<Arc<dyn ClientCertVerifier>>,
}

impl ClientCas {
    pub fn load(paths: &[PathBuf]) -> Result<ClientCas, String> {
        Ok(ClientCas {
            paths: paths.to_vec(),
            current: RwLock::new(client_verifier(paths)?),
        })
    }

    /// Reads the files again; on error the current CAs stay.
    pub fn reload(&self) -> Result<(), String> {
        let v = client_verifier(&self.paths)?;
        *self.current.write().expect("client CAs") = v;
        Ok(())
    }

    fn current(&self) -> Arc<dyn ClientCertVerifier> {
        self.current.read().expect("client CAs").clone()
    }
}

fn client_verifier(paths: &[PathBuf]) -> Result<Arc<dyn ClientCertVerifier>, String> {
    let mut roots = RootCertStore::empty();
    for path in paths {
        for cert in read_certs(path, "tls.clientcas")? {
            roots
                .add(cert)
                .map_err(|e| format!("tls.clientcas {}: {e}", path.display()))?;
        }
    }
    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .build()
        .map_err(|e| format!("tls.clientcas: {e}"))
}

impl ClientCertVerifier for ClientCas {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    /// No CA names in the certificate request: they would have to outlive a reload, and the
    /// clients of a registry (Go's crypto/tls, rustls, OpenSSL) present their one
    /// certificate without them.
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.current()
            .verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.current().verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.current().verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.current().supported_verify_schemes()
    }
}

/// What SIGHUP reloads of `tls:`: the certificate and key, and the client CAs if set.
pub struct TlsFiles {
    pub certificate: Arc<CertResolver>,
    pub client_cas: Option<Arc<ClientCas>>,
}

impl TlsFiles {
    /// Reloads each; what fails to load keeps its previous version. One line per part.
    pub fn reload(&self) -> Vec<Result<&'static str, String>> {
        let mut out = vec![self
            .certificate
            .reload()
            .map(|()| "TLS certificate")
            .map_err(|e| format!("TLS certificate not reloaded: {e}"))];
        if let Some(cas) = &self.client_cas {
            out.push(
                cas.reload()
                    .map(|()| "tls.clientcas")
                    .map_err(|e| format!("tls.clientcas not reloaded: {e}")),
            );
        }
        out
    }
}

/// The listener's TLS settings and the files SIGHUP reloads.
pub fn settings(c: &TlsConfig) -> Result<(TlsSettings, Arc<TlsFiles>), String> {
    let resolver = Arc::new(CertResolver::load(&c.certificate, &c.key)?);
    let mut s =
        TlsSettings::intermediate(&c.certificate.to_string_lossy(), &c.key.to_string_lossy())
            .map_err(|e| format!("tls: {e}"))?;
    s.set_cert_resolver(resolver.clone());
    s.enable_h2();
    let client_cas = if c.client_cas.is_empty() {
        None
    } else {
        let cas = Arc::new(ClientCas::load(&c.client_cas)?);
        s.set_client_cert_verifier(cas.clone());
        Some(cas)
    };
    Ok((
        s,
        Arc::new(TlsFiles {
            certificate: resolver,
            client_cas,
        }),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_cert(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec![name.into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let (c, k) = (
            dir.join(format!("{name}.crt")),
            dir.join(format!("{name}.key")),
        );
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c, k)
    }

    #[test]
    fn loads_reloads_and_names_the_key_on_error() {
        let dir = tempfile::tempdir().unwrap();
        let (c1, k1) = write_cert(dir.path(), "one");
        let (c2, k2) = write_cert(dir.path(), "two");
        let r = CertResolver::load(&c1, &k1).unwrap();
        let first = r.current.read().unwrap().cert[0].clone();
        // A key that does not match the certificate is refused; the old pair stays.
        std::fs::copy(&k2, &k1).unwrap();
        assert!(r.reload().unwrap_err().contains("tls."));
        assert_eq!(r.current.read().unwrap().cert[0], first);
        std::fs::copy(&c2, &c1).unwrap();
        r.reload().unwrap();
        assert_ne!(r.current.read().unwrap().cert[0], first);

        let e = CertResolver::load(&dir.path().join("missing"), &k1).unwrap_err();
        assert!(e.starts_with("tls.certificate"), "{e}");
        std::fs::write(dir.path().join("empty"), "").unwrap();
        let e = CertResolver::load(&c1, &dir.path().join("empty")).unwrap_err();
        assert!(e.starts_with("tls.key"), "{e}");
        let cfg = TlsConfig {
            certificate: c1.clone(),
            key: k1.clone(),
            client_cas: vec![dir.path().join("empty")],
        };
        assert!(settings(&cfg).err().unwrap().starts_with("tls.clientcas"));
    }
}
