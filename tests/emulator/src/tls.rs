//! TLS 1.2 and 1.3 with client certificates that the registry holds as ACTIVE.

use std::sync::Arc;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, ServerConfig, SignatureScheme,
};

use crate::pki::certificate_id;
use crate::store::{Store, ACTIVE};

/// The ALPN protocol AWS IoT uses for MQTT on port 443.
pub const ALPN_MQTT: &[u8] = b"x-amzn-mqtt-ca";

/// Accepts a client certificate exactly when the registry holds it as ACTIVE, as AWS IoT does
/// (whoever issued it), and checks the handshake signature made with its key.
#[derive(Debug)]
struct RegistryVerifier {
    store: Arc<Store>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ClientCertVerifier for RegistryVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        match self.store.certificate_status(&certificate_id(end_entity)) {
            Ok(Some(status)) if status == ACTIVE => Ok(ClientCertVerified::assertion()),
            Ok(Some(_)) => Err(rustls::Error::InvalidCertificate(CertificateError::Revoked)),
            Ok(None) => Err(rustls::Error::InvalidCertificate(
                CertificateError::UnknownIssuer,
            )),
            Err(e) => Err(rustls::Error::General(e.to_string())),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

const TLS12_ONLY: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS12];
const TLS13_AND_12: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

/// The server's TLS configuration; `tls12_only` offers TLS 1.2 alone (as an AWS IoT domain
/// configuration with a TLS 1.2-only security policy does), else 1.3 and 1.2.
pub fn server_config(
    cert_pem: &str,
    key_pem: &str,
    store: Arc<Store>,
    tls12_only: bool,
) -> Result<Arc<ServerConfig>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("server.pem: {e}"))?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|_| "server.key: not a usable private key".to_string())?;
    let verifier = Arc::new(RegistryVerifier {
        store,
        algorithms: provider.signature_verification_algorithms,
    });
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(if tls12_only { TLS12_ONLY } else { TLS13_AND_12 })
        .map_err(|e| e.to_string())?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(|e| format!("server certificate: {e}"))?;
    cfg.alpn_protocols = vec![ALPN_MQTT.to_vec()];
    Ok(Arc::new(cfg))
}
