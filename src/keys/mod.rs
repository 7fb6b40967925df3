//! Device keys and CSRs (rcgen, ring) and checks of PEM material (rustls).

use std::fmt;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::secret::Secret;

/// Why key material was refused. Messages never contain key material.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyError {
    InvalidPem(String),
    InvalidCertificate(String),
    InvalidKey(String),
    InvalidCsr(String),
    UnsupportedKey(String),
    /// The certificate is not for this key.
    Mismatch,
    Generation(String),
    InvalidArgument(String),
}

impl fmt::Display for KeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyError::InvalidPem(m) => write!(f, "invalid PEM: {m}"),
            KeyError::InvalidCertificate(m) => write!(f, "invalid certificate: {m}"),
            KeyError::InvalidKey(m) => write!(f, "invalid private key: {m}"),
            KeyError::InvalidCsr(m) => write!(f, "invalid CSR: {m}"),
            KeyError::UnsupportedKey(m) => write!(f, "unsupported key: {m}"),
            KeyError::Mismatch => f.write_str("the certificate does not match the private key"),
            KeyError::Generation(m) => write!(f, "key generation failed: {m}"),
            KeyError::InvalidArgument(m) => write!(f, "invalid argument: {m}"),
        }
    }
}

impl std::error::Error for KeyError {}

/// Keys the device can generate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KeyType {
    #[default]
    P256,
    P384,
}

/// A key generated on (or loaded into) the device: PKCS#8, held as a [`Secret`].
pub struct DeviceKey {
    pair: rcgen::KeyPair,
    pem: Secret,
}

impl fmt::Debug for DeviceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DeviceKey(<redacted>)")
    }
}

impl DeviceKey {
    /// Generates a key.
    pub fn generate(kind: KeyType) -> Result<DeviceKey, KeyError> {
        let alg = match kind {
            KeyType::P256 => &rcgen::PKCS_ECDSA_P256_SHA256,
            KeyType::P384 => &rcgen::PKCS_ECDSA_P384_SHA384,
        };
        let pair =
            rcgen::KeyPair::generate_for(alg).map_err(|e| KeyError::Generation(e.to_string()))?;
        let pem = Secret::new(pair.serialize_pem());
        Ok(DeviceKey { pair, pem })
    }

    /// Loads a PKCS#8 P-256 or P-384 key (what this library can sign CSRs with).
    pub fn from_pem(pem: &str) -> Result<DeviceKey, KeyError> {
        let pair = rcgen::KeyPair::from_pem(pem)
            .map_err(|_| KeyError::InvalidKey("not a PKCS#8 P-256 or P-384 key".into()))?;
        if !pair.is_compatible(&rcgen::PKCS_ECDSA_P256_SHA256)
            && !pair.is_compatible(&rcgen::PKCS_ECDSA_P384_SHA384)
        {
            return Err(KeyError::UnsupportedKey(
                "only P-256 and P-384 keys can sign CSRs here".into(),
            ));
        }
        Ok(DeviceKey {
            pem: Secret::new(pair.serialize_pem()),
            pair,
        })
    }

    /// The key as PKCS#8 PEM.
    pub fn private_key_pem(&self) -> &Secret {
        &self.pem
    }

    /// A PEM CSR for this key with subject CN `common_name` (1-64 characters, no NUL).
    pub fn csr_pem(&self, common_name: &str) -> Result<String, KeyError> {
        if common_name.is_empty() || common_name.chars().count() > 64 || common_name.contains('\0')
        {
            return Err(KeyError::InvalidArgument(
                "the CSR's common name must be 1-64 characters without NUL".into(),
            ));
        }
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())
            .map_err(|e| KeyError::Generation(e.to_string()))?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, common_name);
        params
            .serialize_request(&self.pair)
            .and_then(|csr| csr.pem())
            .map_err(|e| KeyError::Generation(e.to_string()))
    }
}

/// The CERTIFICATE blocks of a PEM text, each a well-formed X.509 certificate.
pub fn parse_certificate_pem(pem: &str) -> Result<Vec<CertificateDer<'static>>, KeyError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| KeyError::InvalidPem("a CERTIFICATE block is malformed".into()))?;
    if certs.is_empty() {
        return Err(KeyError::InvalidPem("no CERTIFICATE block".into()));
    }
    for cert in &certs {
        // rustls-webpki's parser, the one TLS uses.
        rustls::server::ParsedCertificate::try_from(cert)
            .map_err(|e| KeyError::InvalidCertificate(e.to_string()))?;
    }
    Ok(certs)
}

/// A private key usable for TLS: PKCS#1 RSA (what AWS's CreateKeysAndCertificate returns),
/// SEC1 EC or PKCS#8.
pub fn parse_private_key_pem(pem: &str) -> Result<PrivateKeyDer<'static>, KeyError> {
    let key = PrivateKeyDer::from_pem_slice(pem.as_bytes())
        .map_err(|_| KeyError::InvalidPem("no PKCS#1, SEC1 or PKCS#8 private key block".into()))?;
    rustls::crypto::ring::default_provider()
        .key_provider
        .load_private_key(key.clone_key())
        .map_err(|_| KeyError::InvalidKey("the key cannot be used for TLS".into()))?;
    Ok(key)
}

/// A PEM CSR (label CERTIFICATE REQUEST, DER a SEQUENCE), e.g. from a secure element.
pub fn check_csr_pem(pem: &str) -> Result<(), KeyError> {
    use rustls::pki_types::CertificateSigningRequestDer;
    let csr = CertificateSigningRequestDer::from_pem_slice(pem.as_bytes())
        .map_err(|_| KeyError::InvalidCsr("no CERTIFICATE REQUEST block".into()))?;
    let der = csr.as_ref();
    if der.len() < 16 || der[0] != 0x30 {
        return Err(KeyError::InvalidCsr("the CSR is not a DER SEQUENCE".into()));
    }
    Ok(())
}

/// Whether the (first) certificate is for this private key.
pub fn certificate_matches_key(cert_pem: &str, key_pem: &str) -> Result<(), KeyError> {
    let certs = parse_certificate_pem(cert_pem)?;
    let key = parse_private_key_pem(key_pem)?;
    let signing = rustls::crypto::ring::default_provider()
        .key_provider
        .load_private_key(key)
        .map_err(|_| KeyError::InvalidKey("the key cannot be used for TLS".into()))?;
    let certified = rustls::sign::CertifiedKey::new(certs, signing);
    match certified.keys_match() {
        Ok(()) => Ok(()),
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
            Err(KeyError::Mismatch)
        }
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => Err(
            KeyError::UnsupportedKey("cannot tell which public key this private key has".into()),
        ),
        Err(e) => Err(KeyError::InvalidCertificate(e.to_string())),
    }
}

/// certificateId: lowercase hex SHA-256 of the first certificate's DER.
pub fn certificate_id(cert_pem: &str) -> Result<String, KeyError> {
    let certs = parse_certificate_pem(cert_pem)?;
    let digest = ring_sha256(certs[0].as_ref());
    Ok(digest.iter().map(|b| format!("{b:02x}")).collect())
}

fn ring_sha256(data: &[u8]) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, data)
        .as_ref()
        .to_vec()
}

#[cfg(test)]
mod tests;
