//! TLS for the ext_proc port: a provided certificate reloaded when its files change, or a self-signed one.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rustls::crypto::ring::sign::any_supported_type;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use thiserror::Error;
use tokio_rustls::TlsAcceptor;

/// A certificate could not be loaded or made.
#[derive(Debug, Error)]
pub enum TlsError {
    #[error(
        "--cert-path {dir}: {problem}; give a directory holding tls.crt and tls.key (a mounted kubernetes.io/tls Secret), or leave --cert-path out for a self-signed certificate"
    )]
    CertDir { dir: String, problem: &'static str },
    #[error("--cert-path: reading {path}: {message}")]
    Read { path: String, message: String },
    #[error("generating a self-signed certificate: {0}")]
    SelfSigned(String),
    #[error("unusable private key: {0}")]
    Key(String),
    #[error(
        "{key} is not the private key of the certificate in {cert}; give the pair issued together"
    )]
    Mismatch { cert: String, key: String },
}

fn load(cert: &Path, key: &Path) -> Result<CertifiedKey, TlsError> {
    let read_err = |p: &Path, e: &dyn std::fmt::Display| TlsError::Read {
        path: p.display().to_string(),
        message: e.to_string(),
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| read_err(cert, &e))?
        .collect::<Result<_, _>>()
        .map_err(|e| read_err(cert, &e))?;
    if certs.is_empty() {
        return Err(read_err(cert, &"no certificate in the file"));
    }
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| read_err(key, &e))?;
    let signing = any_supported_type(&key_der).map_err(|e| TlsError::Key(e.to_string()))?;
    let ck = CertifiedKey::new(certs, signing);
    // A mismatched pair loads fine and then fails every handshake: refuse it here.
    if let Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) =
        ck.keys_match()
    {
        return Err(TlsError::Mismatch {
            cert: cert.display().to_string(),
            key: key.display().to_string(),
        });
    }
    Ok(ck)
}

fn self_signed() -> Result<CertifiedKey, TlsError> {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".into(), "epp".into()])
        .map_err(|e| TlsError::SelfSigned(e.to_string()))?;
    let key = PrivateKeyDer::try_from(ck.signing_key.serialize_der())
        .map_err(|e| TlsError::Key(e.to_string()))?;
    let signing = any_supported_type(&key).map_err(|e| TlsError::Key(e.to_string()))?;
    Ok(CertifiedKey::new(vec![ck.cert.der().clone()], signing))
}

/// Serves the current certificate; a background task swaps in a new one when the files change.
#[derive(Debug)]
struct Resolver(ArcSwap<CertifiedKey>);

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.load_full())
    }
}

fn mtime(p: &Path) -> Option<SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

/// The acceptor for `--secure-serving` (`None` when it is off), certificates re-read every 10 s.
pub fn serving_acceptor(
    secure: bool,
    cert_dir: Option<&Path>,
) -> Result<Option<TlsAcceptor>, TlsError> {
    secure
        .then(|| acceptor(cert_dir, Duration::from_secs(10)))
        .transpose()
}

/// Builds the acceptor: `cert_dir/tls.crt` + `cert_dir/tls.key` (upstream's `--cert-path`
/// layout), re-read every `reload_every` when they change; or a self-signed certificate.
pub fn acceptor(cert_dir: Option<&Path>, reload_every: Duration) -> Result<TlsAcceptor, TlsError> {
    let resolver = match cert_dir {
        Some(dir) => {
            check_dir(dir)?;
            let (cert, key) = (dir.join("tls.crt"), dir.join("tls.key"));
            let r = Arc::new(Resolver(ArcSwap::from_pointee(load(&cert, &key)?)));
            spawn_reloader(r.clone(), cert, key, reload_every);
            r
        }
        None => Arc::new(Resolver(ArcSwap::from_pointee(self_signed()?))),
    };
    let mut cfg = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    // gRPC is HTTP/2.
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(cfg)))
}

/// A `--cert-path` that is not there, not a directory, or holds neither file gets an error
/// that says so, rather than one about a file inside it.
fn check_dir(dir: &Path) -> Result<(), TlsError> {
    let problem = match std::fs::metadata(dir) {
        Err(_) => "no such directory",
        Ok(m) if !m.is_dir() => "not a directory",
        Ok(_) if !dir.join("tls.crt").exists() && !dir.join("tls.key").exists() => {
            "the directory holds neither tls.crt nor tls.key"
        }
        Ok(_) => return Ok(()),
    };
    Err(TlsError::CertDir {
        dir: dir.display().to_string(),
        problem,
    })
}

fn spawn_reloader(r: Arc<Resolver>, cert: PathBuf, key: PathBuf, every: Duration) {
    tokio::spawn(async move {
        let mut seen = (mtime(&cert), mtime(&key));
        loop {
            tokio::time::sleep(every).await;
            let now = (mtime(&cert), mtime(&key));
            if now == seen {
                continue;
            }
            seen = now;
            match load(&cert, &key) {
                Ok(ck) => {
                    r.0.store(Arc::new(ck));
                    tracing::info!(cert = %cert.display(), "TLS certificate reloaded");
                }
                Err(e) => {
                    tracing::error!(error = %e, "new TLS certificate rejected; keeping the current one")
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn self_signed_and_files() {
        crate::runtime::install_crypto_provider();
        assert!(self_signed().is_ok());
        let dir = tempfile::tempdir().unwrap();
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        std::fs::write(dir.path().join("tls.crt"), ck.cert.pem()).unwrap();
        std::fs::write(dir.path().join("tls.key"), ck.signing_key.serialize_pem()).unwrap();
        assert!(load(&dir.path().join("tls.crt"), &dir.path().join("tls.key")).is_ok());
        let e = load(&dir.path().join("nope.crt"), &dir.path().join("tls.key")).unwrap_err();
        assert!(e.to_string().contains("nope.crt"));
    }

    fn write_pair(dir: &Path, name: &str) -> Vec<u8> {
        let ck = rcgen::generate_simple_self_signed(vec![name.into()]).unwrap();
        std::fs::write(dir.join("tls.crt"), ck.cert.pem()).unwrap();
        std::fs::write(dir.join("tls.key"), ck.signing_key.serialize_pem()).unwrap();
        ck.cert.der().to_vec()
    }

    #[tokio::test]
    async fn certificate_is_reloaded_when_files_change() {
        crate::runtime::install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        let first = write_pair(dir.path(), "one");
        let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
        let r = Arc::new(Resolver(ArcSwap::from_pointee(load(&cert, &key).unwrap())));
        spawn_reloader(r.clone(), cert, key, Duration::from_millis(20));
        assert_eq!(r.0.load().cert[0].as_ref(), first.as_slice());
        // A different modification time is needed on coarse-grained filesystems.
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let second = write_pair(dir.path(), "two");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while r.0.load().cert[0].as_ref() != second.as_slice() {
            assert!(
                std::time::Instant::now() < deadline,
                "certificate not reloaded"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // A broken replacement keeps the current certificate.
        std::fs::write(dir.path().join("tls.crt"), "garbage").unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(r.0.load().cert[0].as_ref(), second.as_slice());
        // So does a pair that does not match (a new certificate, the old key).
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let other = rcgen::generate_simple_self_signed(vec!["three".into()]).unwrap();
        std::fs::write(dir.path().join("tls.crt"), other.cert.pem()).unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(r.0.load().cert[0].as_ref(), second.as_slice());
    }

    #[test]
    fn mismatched_pair_is_refused_naming_both_files() {
        crate::runtime::install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        let a = rcgen::generate_simple_self_signed(vec!["a".into()]).unwrap();
        let b = rcgen::generate_simple_self_signed(vec!["b".into()]).unwrap();
        std::fs::write(dir.path().join("tls.crt"), a.cert.pem()).unwrap();
        std::fs::write(dir.path().join("tls.key"), b.signing_key.serialize_pem()).unwrap();
        let e = load(&dir.path().join("tls.crt"), &dir.path().join("tls.key"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("tls.key is not the private key") && e.contains("tls.crt"),
            "{e}"
        );
        // At start this is an error of the acceptor (the process exits with it).
        assert!(acceptor(Some(dir.path()), Duration::from_secs(10)).is_err());
    }

    #[test]
    fn a_missing_or_empty_cert_dir_is_named_with_the_flag() {
        crate::runtime::install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        let e = check_dir(&dir.path().join("nope")).unwrap_err().to_string();
        assert!(
            e.starts_with("--cert-path ") && e.contains("no such directory"),
            "{e}"
        );
        let e = check_dir(dir.path()).unwrap_err().to_string();
        assert!(e.contains("holds neither tls.crt nor tls.key"), "{e}");
        std::fs::write(dir.path().join("f"), "").unwrap();
        let e = check_dir(&dir.path().join("f")).unwrap_err().to_string();
        assert!(e.contains("not a directory"), "{e}");
    }
}
