//! Device keys and CSRs (rcgen on ring) and checks of PEM material (rustls and its webpki).
//!
//! Formats: rcgen writes PKCS#8 (`BEGIN PRIVATE KEY`); AWS's CreateKeysAndCertificate returns
//! PKCS#1 RSA keys (`BEGIN RSA PRIVATE KEY`); devices often hold SEC1 EC keys
//! (`BEGIN EC PRIVATE KEY`). TLS accepts all three; CSRs are signed with PKCS#8 P-256/P-384 only.
//!
//! Nothing here puts key material in an error, a `Debug` string or a panic message, and the
//! copies of private keys this module makes are wiped when dropped (see [`DeviceKey`] for the
//! limits of that).

mod der;
pub mod remote;
pub mod signer;
#[cfg(test)]
mod tests;

use std::fmt;
use std::sync::Arc;

use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{
    CertificateDer, CertificateSigningRequestDer, PrivateKeyDer, PrivatePkcs8KeyDer,
};
use rustls::sign::SigningKey;
use zeroize::Zeroizing;

use crate::secret::Secret;
use der::{Algorithm, Curve};

/// Why key material was refused. The messages describe the problem (format, algorithm, size)
/// and never contain key material.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyError {
    /// The text is not PEM, has no block of the kind expected, or a block is damaged
    /// (corrupt base64, missing END line).
    InvalidPem(String),
    /// A CERTIFICATE block is not a well-formed X.509 certificate.
    InvalidCertificate(String),
    /// A private key block is malformed, or the crypto provider rejected the key.
    InvalidKey(String),
    /// A CERTIFICATE REQUEST block is not a well-formed PKCS#10 request, or the text holds
    /// more than the CSR.
    InvalidCsr(String),
    /// A well-formed key of a kind this library cannot use (encrypted, P-521, RSA-1024,
    /// or for CSRs anything but PKCS#8 P-256/P-384).
    UnsupportedKey(String),
    /// The certificate is not for this private key.
    Mismatch,
    /// Generating a key or a CSR failed.
    Generation(String),
    /// An argument is out of range (a CSR's common name).
    InvalidArgument(String),
    /// A key behind a signing function (a secure element) could not sign: the function failed,
    /// or its signature does not verify with the key's public half.
    Signer(String),
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
            KeyError::Signer(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for KeyError {}

/// The kinds of key the device can generate and sign CSRs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KeyType {
    /// ECDSA on NIST P-256 (secp256r1) with SHA-256. The default.
    #[default]
    P256,
    /// ECDSA on NIST P-384 (secp384r1) with SHA-384.
    P384,
}

impl KeyType {
    fn algorithm(self) -> &'static rcgen::SignatureAlgorithm {
        match self {
            KeyType::P256 => &rcgen::PKCS_ECDSA_P256_SHA256,
            KeyType::P384 => &rcgen::PKCS_ECDSA_P384_SHA384,
        }
    }
}

/// A key generated on (or loaded into) the device: PKCS#8 PEM held as a [`Secret`].
///
/// Only the PEM is kept, and it is wiped on drop. rcgen and ring make short-lived copies of
/// their own while generating a key or signing a CSR, which they do not wipe.
/// `Debug` shows the key type only.
pub struct DeviceKey {
    kind: KeyType,
    pem: Secret,
}

impl fmt::Debug for DeviceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DeviceKey({:?}, <redacted>)", self.kind)
    }
}

impl DeviceKey {
    /// Generates a new key with the system's random number generator.
    pub fn generate(kind: KeyType) -> Result<DeviceKey, KeyError> {
        let pair = rcgen::KeyPair::generate_for(kind.algorithm())
            .map_err(|e| KeyError::Generation(e.to_string()))?;
        Ok(DeviceKey {
            kind,
            pem: Secret::new(pair.serialize_pem()),
        })
    }

    /// Loads a PKCS#8 P-256 or P-384 key, what this library can sign CSRs with. Other keys,
    /// including SEC1 or PKCS#1 ones that TLS would accept, are [`KeyError::UnsupportedKey`]
    /// (`openssl pkcs8 -topk8 -nocrypt` converts an EC key). The PEM is kept normalised:
    /// one `PRIVATE KEY` block, nothing else.
    pub fn from_pem(pem: &str) -> Result<DeviceKey, KeyError> {
        let key = read_private_key(pem)?;
        let PrivateKeyDer::Pkcs8(pkcs8) = &*key else {
            return Err(KeyError::UnsupportedKey(format!(
                "{} keys cannot sign CSRs here; a PKCS#8 P-256 or P-384 key is needed",
                format_name(&key)
            )));
        };
        let kind = match der::pkcs8_algorithm(pkcs8.secret_pkcs8_der()) {
            Some(Algorithm::Ec(Curve::P256)) => KeyType::P256,
            Some(Algorithm::Ec(Curve::P384)) => KeyType::P384,
            Some(other) => {
                return Err(KeyError::UnsupportedKey(format!(
                    "{} keys cannot sign CSRs here; P-256 and P-384 keys can",
                    other.name()
                )));
            }
            None => return Err(malformed("PKCS#8")),
        };
        let pair = rcgen::KeyPair::from_pkcs8_der_and_sign_algo(pkcs8, kind.algorithm())
            .map_err(|_| rejected("PKCS#8", Algorithm::Ec(curve_of(kind))))?;
        Ok(DeviceKey {
            kind,
            pem: Secret::new(pair.serialize_pem()),
        })
    }

    /// Which kind of key this is.
    pub fn key_type(&self) -> KeyType {
        self.kind
    }

    /// The key as PKCS#8 PEM (`BEGIN PRIVATE KEY`).
    pub fn private_key_pem(&self) -> &Secret {
        &self.pem
    }

    /// A PEM CSR (`BEGIN CERTIFICATE REQUEST`) for this key, with the subject's common name
    /// `common_name`: 1 to 64 characters (X.520's upper bound), no NUL.
    pub fn csr_pem(&self, common_name: &str) -> Result<String, KeyError> {
        check_common_name(common_name)?;
        let pkcs8 = PrivatePkcs8KeyDer::from_pem_slice(self.pem.expose().as_bytes())
            .map(Zeroizing::new)
            .map_err(|_| KeyError::Generation("the device key could not be read back".into()))?;
        let pair = rcgen::KeyPair::from_pkcs8_der_and_sign_algo(&pkcs8, self.kind.algorithm())
            .map_err(|_| KeyError::Generation("the device key could not be read back".into()))?;
        let mut params = rcgen::CertificateParams::default();
        // The default names rcgen itself; the subject is the common name alone.
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, common_name);
        params
            .serialize_request(&pair)
            .and_then(|csr| csr.pem())
            .map_err(|e| KeyError::Generation(format!("signing the CSR: {e}")))
    }
}

/// A CSR subject's common name: 1 to 64 characters (X.520's upper bound), no NUL.
pub(crate) fn check_common_name(common_name: &str) -> Result<(), KeyError> {
    let chars = common_name.chars().count();
    if chars == 0 || chars > 64 {
        return Err(KeyError::InvalidArgument(format!(
            "the CSR's common name must be 1 to 64 characters, not {chars}"
        )));
    }
    if common_name.contains('\0') {
        return Err(KeyError::InvalidArgument(
            "the CSR's common name must not contain NUL".into(),
        ));
    }
    Ok(())
}

/// The public key of a PEM CSR, as the bytes a certificate for that key contains (see
/// [`certificate_contains_key`]).
pub fn csr_public_key(csr_pem: &str) -> Result<Vec<u8>, KeyError> {
    let der = rustls::pki_types::CertificateSigningRequestDer::from_pem_slice(csr_pem.as_bytes())
        .map_err(pem_error)?;
    der::csr_public_key_bits(der.as_ref())
        .filter(|bits| bits.len() > 8)
        .map(<[u8]>::to_vec)
        .ok_or_else(|| malformed("CSR"))
}

/// Whether the first certificate in `cert_pem` carries `public_key` (from [`csr_public_key`],
/// or an EC key's uncompressed point): a certificate for another key cannot contain these
/// bytes as its key.
pub fn certificate_contains_key(cert_pem: &str, public_key: &[u8]) -> bool {
    let Ok(certs) = parse_certificate_pem(cert_pem) else {
        return false;
    };
    certs.first().is_some_and(|c| {
        !public_key.is_empty() && c.windows(public_key.len()).any(|w| w == public_key)
    })
}

/// Parses a PEM certificate chain: at least one CERTIFICATE block, each a well-formed X.509
/// certificate as rustls' webpki parses it (version 1 certificates, which webpki accepts only
/// as trust anchors, pass too). Text around the blocks and blocks of other kinds are ignored.
/// Returns the DER certificates, in order.
pub fn parse_certificate_pem(pem: &str) -> Result<Vec<CertificateDer<'static>>, KeyError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem_error)?;
    if certs.is_empty() {
        return Err(KeyError::InvalidPem(if has_private_key_label(pem) {
            "no CERTIFICATE block (the text holds a private key)".into()
        } else {
            "no CERTIFICATE block".into()
        }));
    }
    let count = certs.len();
    for (i, cert) in certs.iter().enumerate() {
        check_certificate(cert).map_err(|e| {
            KeyError::InvalidCertificate(if count == 1 {
                e
            } else {
                format!("certificate {} of {count}: {e}", i + 1)
            })
        })?;
    }
    Ok(certs)
}

/// Checks that a PEM private key is usable for TLS and returns it: PKCS#1 RSA (what AWS's
/// CreateKeysAndCertificate returns), SEC1 EC or PKCS#8, as rustls' ring provider loads them
/// (RSA 2048 to 4096 bits, P-256, P-384, Ed25519). The first private key block is used.
///
/// The returned DER is not wiped on drop by itself: wrap it in [`zeroize::Zeroizing`] if it
/// is kept, or hand it to rustls, which does.
pub fn parse_private_key_pem(pem: &str) -> Result<PrivateKeyDer<'static>, KeyError> {
    let key = read_private_key(pem)?;
    load_signing_key(&key)?;
    Ok(key.clone_key())
}

/// Checks a PEM CSR such as a secure element produces: exactly one PEM block, labelled
/// CERTIFICATE REQUEST, whose DER has the outline of a PKCS#10 request (the signature is not
/// verified; AWS does that). Text holding a private key as well is refused, since a CSR is
/// sent to AWS as given.
pub fn check_csr_pem(pem: &str) -> Result<(), KeyError> {
    if has_private_key_label(pem) {
        return Err(KeyError::InvalidCsr(
            "the text holds a private key; pass the CSR alone".into(),
        ));
    }
    let csr =
        CertificateSigningRequestDer::from_pem_slice(pem.as_bytes()).map_err(|e| match e {
            pem::Error::NoItemsFound => KeyError::InvalidPem("no CERTIFICATE REQUEST block".into()),
            e => pem_error(e),
        })?;
    let blocks = pem
        .lines()
        .filter(|line| line.starts_with("-----BEGIN "))
        .count();
    if blocks != 1 {
        return Err(KeyError::InvalidCsr(format!(
            "expected one PEM block, found {blocks}"
        )));
    }
    der::check_csr_outline(csr.as_ref()).map_err(|m| KeyError::InvalidCsr(m.into()))
}

/// Whether the first certificate of `cert_pem` carries the public key of `key_pem`: rustls'
/// `CertifiedKey::keys_match`, which compares the certificate's SubjectPublicKeyInfo with the
/// one derived from the private key. `Ok(())` when they match, [`KeyError::Mismatch`] when they
/// do not, another error when either cannot be parsed.
pub fn certificate_matches_key(cert_pem: &str, key_pem: &str) -> Result<(), KeyError> {
    let certs = parse_certificate_pem(cert_pem)?;
    if let Some(Err(e)) = certs
        .first()
        .map(rustls::server::ParsedCertificate::try_from)
    {
        // Well-formed, but only as a trust anchor (a version 1 certificate).
        return Err(KeyError::InvalidCertificate(format!(
            "the certificate cannot be a device certificate ({})",
            webpki_reason(&e)
        )));
    }
    let key = read_private_key(key_pem)?;
    let signing = load_signing_key(&key)?;
    match rustls::sign::CertifiedKey::new(certs, signing).keys_match() {
        Ok(()) => Ok(()),
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
            Err(KeyError::Mismatch)
        }
        Err(rustls::Error::InconsistentKeys(_)) => Err(KeyError::UnsupportedKey(
            "cannot derive this key's public key to compare it".into(),
        )),
        Err(e) => Err(KeyError::InvalidCertificate(format!(
            "cannot compare the certificate with the key: {e}"
        ))),
    }
}

/// The certificateId AWS IoT uses: the lowercase hex SHA-256 of the first certificate's DER.
pub fn certificate_id(cert_pem: &str) -> Result<String, KeyError> {
    let certs = parse_certificate_pem(cert_pem)?;
    let first = certs
        .first()
        .ok_or_else(|| KeyError::InvalidPem("no CERTIFICATE block".into()))?;
    let digest = ring::digest::digest(&ring::digest::SHA256, first.as_ref());
    Ok(hex(digest.as_ref()))
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        // Writing to a String cannot fail.
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// Well-formed as an end-entity certificate, or failing that as a (version 1) trust anchor.
/// The error is webpki's reason, which names no certificate content.
fn check_certificate(cert: &CertificateDer<'_>) -> Result<(), String> {
    let end_entity = match rustls::server::ParsedCertificate::try_from(cert) {
        Ok(_) => return Ok(()),
        Err(e) => e,
    };
    let anchor = match rustls::RootCertStore::empty().add(cert.clone().into_owned()) {
        Ok(()) => return Ok(()),
        Err(e) => e,
    };
    let bad_encoding = |e: &rustls::Error| {
        matches!(
            e,
            rustls::Error::InvalidCertificate(rustls::CertificateError::BadEncoding)
        )
    };
    Err(if bad_encoding(&end_entity) || bad_encoding(&anchor) {
        "not a well-formed X.509 certificate".into()
    } else {
        format!(
            "not a usable X.509 certificate ({})",
            webpki_reason(&end_entity)
        )
    })
}

/// webpki's name for a certificate problem, without rustls' wrapping.
fn webpki_reason(e: &rustls::Error) -> String {
    match e {
        rustls::Error::InvalidCertificate(rustls::CertificateError::Other(other)) => {
            other.to_string()
        }
        rustls::Error::InvalidCertificate(e) => e.to_string(),
        e => e.to_string(),
    }
}

/// The first private key block of `pem` (PKCS#1, SEC1 or PKCS#8), held so that it is wiped.
fn read_private_key(pem: &str) -> Result<Zeroizing<PrivateKeyDer<'static>>, KeyError> {
    if pem.contains("-----BEGIN ENCRYPTED PRIVATE KEY-----")
        || pem.contains("Proc-Type: 4,ENCRYPTED")
    {
        return Err(KeyError::UnsupportedKey(
            "the private key is encrypted; decrypt it first (openssl pkey)".into(),
        ));
    }
    PrivateKeyDer::from_pem_slice(pem.as_bytes())
        .map(Zeroizing::new)
        .map_err(|e| match e {
            pem::Error::NoItemsFound => {
                KeyError::InvalidPem("no private key block (PKCS#1, SEC1 or PKCS#8)".into())
            }
            e => pem_error(e),
        })
}

/// Loads the key with rustls' ring provider, as TLS will; a refusal is explained.
fn load_signing_key(key: &PrivateKeyDer<'static>) -> Result<Arc<dyn SigningKey>, KeyError> {
    rustls::crypto::ring::default_provider()
        .key_provider
        .load_private_key(key.clone_key())
        .map_err(|_| explain_refusal(key))
}

/// Why ring refused a key, from what its encoding says.
fn explain_refusal(key: &PrivateKeyDer<'_>) -> KeyError {
    let format = format_name(key);
    let algorithm = match key {
        PrivateKeyDer::Pkcs1(k) => {
            der::pkcs1_rsa_bits(k.secret_pkcs1_der()).map(|bits| Algorithm::Rsa { bits })
        }
        PrivateKeyDer::Sec1(k) => der::sec1_curve(k.secret_sec1_der()).map(Algorithm::Ec),
        PrivateKeyDer::Pkcs8(k) => der::pkcs8_algorithm(k.secret_pkcs8_der()),
        _ => None,
    };
    let Some(algorithm) = algorithm else {
        return malformed(format);
    };
    match algorithm {
        Algorithm::Rsa { bits } if !(2048..=4096).contains(&bits) => KeyError::UnsupportedKey(
            format!("{bits}-bit RSA keys are not supported (2048 to 4096 bits are)"),
        ),
        Algorithm::Ec(Curve::P521) => {
            KeyError::UnsupportedKey("P-521 keys are not supported (P-256 and P-384 are)".into())
        }
        Algorithm::Ec(Curve::Other) => KeyError::UnsupportedKey(
            "this elliptic curve is not supported (P-256 and P-384 are)".into(),
        ),
        Algorithm::Ec(Curve::Secp256k1) => KeyError::UnsupportedKey(
            "secp256k1 keys are not supported (P-256 and P-384 are)".into(),
        ),
        Algorithm::Ed448 => KeyError::UnsupportedKey("Ed448 keys are not supported".into()),
        Algorithm::Unknown => KeyError::UnsupportedKey(format!(
            "the {format} key's algorithm is not supported (RSA, P-256, P-384 and Ed25519 are)"
        )),
        known => rejected(format, known),
    }
}

fn malformed(format: &str) -> KeyError {
    KeyError::InvalidKey(format!("the {format} key is not well-formed DER"))
}

fn rejected(format: &str, algorithm: Algorithm) -> KeyError {
    KeyError::InvalidKey(format!(
        "the {format} key ({}) is inconsistent or corrupt",
        algorithm.name()
    ))
}

fn curve_of(kind: KeyType) -> Curve {
    match kind {
        KeyType::P256 => Curve::P256,
        KeyType::P384 => Curve::P384,
    }
}

fn format_name(key: &PrivateKeyDer<'_>) -> &'static str {
    match key {
        PrivateKeyDer::Pkcs1(_) => "PKCS#1 RSA",
        PrivateKeyDer::Sec1(_) => "SEC1 EC",
        PrivateKeyDer::Pkcs8(_) => "PKCS#8",
        _ => "unknown-format",
    }
}

/// A PEM parse error, described without quoting the text (which may be a key).
fn pem_error(e: pem::Error) -> KeyError {
    KeyError::InvalidPem(
        match e {
            pem::Error::NoItemsFound => "no PEM block of the expected kind",
            pem::Error::MissingSectionEnd { .. } => "a PEM block has no END line (truncated?)",
            pem::Error::IllegalSectionStart { .. } => "a PEM BEGIN line is malformed",
            pem::Error::Base64Decode(_) => "a PEM block's base64 is corrupt (truncated?)",
            pem::Error::SectionTooLarge => "a PEM block is too large",
            _ => "the PEM text could not be read",
        }
        .into(),
    )
}

/// Whether the text has a BEGIN line of any private key block.
fn has_private_key_label(pem: &str) -> bool {
    pem.lines()
        .any(|l| l.starts_with("-----BEGIN ") && l.trim_end().ends_with("PRIVATE KEY-----"))
}
