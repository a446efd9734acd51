//! The rustls connector a shard's pool connects through, built from its [`ShardTls`].
//!
//! One connector type serves every mode, so `ShardActor` has one pool type: for a Unix
//! socket it is never used (tokio-postgres is told `sslmode=disable`). TLS 1.2 is the
//! minimum and 1.3 preferred (rustls' safe defaults), with the aws-lc-rs provider.
//!
//! Reading the CA file is the only I/O here. It must never accept a certificate it was
//! not told to: `verify-ca` forgives only a host-name mismatch, after the chain has been
//! verified; `require` authenticates nobody, which is why the node warns about it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio_postgres_rustls::MakeRustlsConnect;

use super::{ShardTls, TlsMode};

/// The ALPN protocol PostgreSQL 17 asks for on direct TLS connections; older servers ignore it.
const ALPN_POSTGRESQL: &[u8] = b"postgresql";

/// A CA file (or the TLS setup built on it) that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CaFileError {
    #[error("cannot read the shard CA file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("the shard CA file {path} holds no usable PEM certificate")]
    NoCertificate { path: PathBuf },
    #[error("cannot set up TLS to the shards: {0}")]
    Tls(String),
}

/// The connector for a shard's pool.
pub fn connector(tls: &ShardTls) -> Result<MakeRustlsConnect, CaFileError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| CaFileError::Tls(e.to_string()))?;
    // The config layer guarantees a CA file for the verifying modes; without one the trust
    // store is empty and every server is refused.
    let roots = || tls.ca_file.as_deref().map_or_else(|| Ok(RootCertStore::empty()), load_roots);
    let lenient = |chain| {
        let verifier = Arc::new(Lenient { chain, provider: provider.clone() });
        builder.clone().dangerous().with_custom_certificate_verifier(verifier).with_no_client_auth()
    };
    let mut config = match tls.mode {
        TlsMode::VerifyFull => builder.clone().with_root_certificates(roots()?).with_no_client_auth(),
        TlsMode::VerifyCa => lenient(Some(
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots()?), provider.clone())
                .build()
                .map_err(|e| CaFileError::Tls(e.to_string()))?,
        )),
        TlsMode::Require => lenient(None),
        // Never used for a Unix socket; an empty trust store would refuse every server.
        TlsMode::Off => builder.clone().with_root_certificates(RootCertStore::empty()).with_no_client_auth(),
    };
    config.alpn_protocols = vec![ALPN_POSTGRESQL.to_vec()];
    Ok(MakeRustlsConnect::new(config))
}

fn load_roots(path: &Path) -> Result<RootCertStore, CaFileError> {
    let pem = std::fs::read(path).map_err(|source| CaFileError::Read { path: path.to_owned(), source })?;
    let no_cert = || CaFileError::NoCertificate { path: path.to_owned() };
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(&pem).collect::<Result<_, _>>().map_err(|_| no_cert())?;
    let mut roots = RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(certs);
    if added == 0 {
        return Err(no_cert());
    }
    Ok(roots)
}

/// The verifier of the two modes that check less than WebPKI does. With a `chain`
/// (`verify-ca`) it runs the full WebPKI check and forgives only a certificate issued for
/// another name — rustls checks the chain before the name, so a name error means the chain
/// was good. Without one (`require` with no CA) it accepts any certificate, as libpq does.
/// Either way the handshake signatures are checked, so the session belongs to whoever
/// holds the certificate's key.
#[derive(Debug)]
struct Lenient {
    chain: Option<Arc<WebPkiServerVerifier>>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Lenient {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(chain) = &self.chain else { return Ok(ServerCertVerified::assertion()) };
        match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_file_problems_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let garbage = dir.path().join("garbage.pem");
        std::fs::write(&garbage, "not a certificate").unwrap();
        for path in [missing, garbage] {
            let tls = ShardTls { mode: TlsMode::VerifyFull, ca_file: Some(path.clone()) };
            let err = connector(&tls).err().expect("an unusable CA file is refused").to_string();
            assert!(err.contains(&*path.to_string_lossy()), "{err}");
        }
    }

    /// A CA called `ca_name` and a certificate it signed for `localhost` only.
    fn ca_and_leaf(ca_name: &str) -> (rcgen::Certificate, CertificateDer<'static>) {
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.distinguished_name.push(rcgen::DnType::CommonName, ca_name);
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = rcgen::CertifiedIssuer::self_signed(ca, rcgen::KeyPair::generate().unwrap()).unwrap();
        let leaf_key = rcgen::KeyPair::generate().unwrap();
        let leaf = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        let leaf = leaf.signed_by(&leaf_key, &ca).unwrap();
        (ca.as_ref().clone(), leaf.der().clone())
    }

    /// What a verifier built like `connector` says about `leaf` presented as `name`.
    fn verdict(verifier: &dyn ServerCertVerifier, leaf: &CertificateDer<'_>, name: &str) -> Result<(), String> {
        let name = ServerName::try_from(name.to_owned()).unwrap();
        verifier.verify_server_cert(leaf, &[], &name, &[], UnixTime::now()).map(|_| ()).map_err(|e| e.to_string())
    }

    #[test]
    fn verify_ca_forgives_the_name_only_and_verify_full_nothing() {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let (ca, leaf) = ca_and_leaf("shard CA");
        let (other_ca, _) = ca_and_leaf("another CA");
        let webpki = |ca: &rcgen::Certificate| {
            let mut roots = RootCertStore::empty();
            roots.add(ca.der().clone()).unwrap();
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone()).build().unwrap()
        };
        let full = webpki(&ca);
        let chain_only = Lenient { chain: Some(webpki(&ca)), provider: provider.clone() };
        assert_eq!(verdict(full.as_ref(), &leaf, "localhost"), Ok(()));
        assert!(verdict(full.as_ref(), &leaf, "127.0.0.1").is_err());
        assert_eq!(verdict(&chain_only, &leaf, "localhost"), Ok(()));
        assert_eq!(verdict(&chain_only, &leaf, "127.0.0.1"), Ok(()));
        // A chain to another CA is refused by both, whatever the name.
        for name in ["localhost", "127.0.0.1"] {
            let other = Lenient { chain: Some(webpki(&other_ca)), provider: provider.clone() };
            let err = verdict(&other, &leaf, name).unwrap_err();
            assert!(err.contains("UnknownIssuer"), "{err}");
            assert!(verdict(webpki(&other_ca).as_ref(), &leaf, name).is_err());
        }
        // require without a CA authenticates nobody: that is why the node warns about it.
        assert_eq!(verdict(&Lenient { chain: None, provider }, &leaf, "127.0.0.1"), Ok(()));
    }

    #[test]
    fn every_mode_builds_with_a_real_ca() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, ca_and_leaf("shard CA").0.pem()).unwrap();
        for mode in [TlsMode::Off, TlsMode::Require, TlsMode::VerifyCa, TlsMode::VerifyFull] {
            let ca_file = (mode != TlsMode::Require).then(|| ca.clone());
            connector(&ShardTls { mode, ca_file }).unwrap_or_else(|e| panic!("{mode:?}: {e}"));
        }
    }
}
