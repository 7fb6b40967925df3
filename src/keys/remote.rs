//! TLS client authentication with a key the library never sees: the claim key (or, when
//! rotating, the device's current key) in a secure element, a TPM or an HSM, reached through
//! a signing function (PKCS#11's `C_Sign`, say). The library holds the certificate; rustls asks
//! for one signature per handshake (TLS 1.3 CertificateVerify, or TLS 1.2's), which goes to the
//! signer with the scheme to use, is checked against the certificate's public key, and only then
//! goes on the wire: a token that signs with the wrong key or garbles a signature is a
//! [`SignerFailure`] here, not a TLS alert from the server later.
//!
//! Without the cargo feature `transport` nothing here makes a TLS connection (the firmware's
//! stack does, with its own keys), so the rustls side is unused.
#![cfg_attr(not(feature = "transport"), allow(dead_code))]

use std::fmt;
use std::sync::Arc;

use ring::signature::{self, UnparsedPublicKey};
use rustls::pki_types::CertificateDer;
use rustls::sign::CertifiedKey;

use super::der::{self, Algorithm, Curve};
use super::signer::{raw_to_der, Signer};
use super::{KeyError, KeyType};

/// A signature scheme a remote key is asked to sign with: the ones TLS 1.2 and 1.3 client
/// authentication needs for P-256, P-384 and RSA keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// ECDSA on P-256 with SHA-256: DER `ECDSA-Sig-Value` or raw `r || s` (64 bytes).
    EcdsaP256Sha256,
    /// ECDSA on P-384 with SHA-384: DER or raw `r || s` (96 bytes).
    EcdsaP384Sha384,
    /// RSASSA-PKCS1-v1_5 with SHA-256 (TLS 1.2): PKCS#11 `CKM_SHA256_RSA_PKCS` over the message,
    /// or `CKM_RSA_PKCS` over the DigestInfo of the digest.
    RsaPkcs1Sha256,
    /// RSASSA-PSS with SHA-256, MGF1-SHA-256 and a 32-byte salt (TLS 1.3; the key is an
    /// ordinary rsaEncryption key): PKCS#11 `CKM_SHA256_RSA_PKCS_PSS`, or `CKM_RSA_PKCS_PSS` over
    /// the digest.
    RsaPssSha256,
}

impl Scheme {
    /// The hash of the message the signer is given along with it.
    pub fn digest_algorithm(self) -> &'static ring::digest::Algorithm {
        match self {
            Scheme::EcdsaP384Sha384 => &ring::digest::SHA384,
            _ => &ring::digest::SHA256,
        }
    }

    fn rustls(self) -> rustls::SignatureScheme {
        match self {
            Scheme::EcdsaP256Sha256 => rustls::SignatureScheme::ECDSA_NISTP256_SHA256,
            Scheme::EcdsaP384Sha384 => rustls::SignatureScheme::ECDSA_NISTP384_SHA384,
            Scheme::RsaPkcs1Sha256 => rustls::SignatureScheme::RSA_PKCS1_SHA256,
            Scheme::RsaPssSha256 => rustls::SignatureScheme::RSA_PSS_SHA256,
        }
    }
}

/// Signs for TLS client authentication with a key the library never sees.
pub trait TlsSigner: Send + Sync {
    /// Signs `message` with `scheme`; `digest` is the scheme's hash of `message`, for signers
    /// that take a digest (most secure elements). ECDSA signatures may be DER or raw `r || s`;
    /// RSA signatures are as long as the modulus.
    fn sign(&self, scheme: Scheme, message: &[u8], digest: &[u8]) -> Result<Vec<u8>, String>;
}

/// A device key's CSR signer ([`Signer`], ECDSA) as a [`TlsSigner`]: the scheme is the one of
/// its curve, the only one a key of that curve is asked for.
pub(crate) struct EcSigner(pub Arc<dyn Signer>);

impl TlsSigner for EcSigner {
    fn sign(&self, _scheme: Scheme, message: &[u8], digest: &[u8]) -> Result<Vec<u8>, String> {
        self.0.sign(message, digest)
    }
}

/// Why a remote key's signer failed a TLS handshake: carried through rustls (as
/// `rustls::Error::Other`) and the MQTT client to the connection's error, which becomes
/// [`crate::Error::Signer`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignerFailure(pub String);

impl fmt::Display for SignerFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for SignerFailure {}

/// The public half of a remote key, as its certificate carries it.
#[derive(Clone, PartialEq, Eq)]
enum Public {
    /// The uncompressed point.
    Ec(KeyType, Vec<u8>),
    /// PKCS#1 `RSAPublicKey`.
    Rsa(Vec<u8>),
}

/// A certificate whose private key is reached through a [`TlsSigner`]: TLS client credentials
/// for the built-in transport. `Debug` names the key type only.
#[derive(Clone)]
pub struct RemoteKey {
    chain: Vec<CertificateDer<'static>>,
    public: Public,
    /// "P-256", "RSA-2048": for messages.
    kind: String,
    /// "claim key", "device key": for messages.
    role: &'static str,
    signer: Arc<dyn TlsSigner>,
}

impl fmt::Debug for RemoteKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RemoteKey")
            .field("kind", &self.kind)
            .field("role", &self.role)
            .finish_non_exhaustive()
    }
}

impl RemoteKey {
    /// The certificate (chain, PEM; the first is the key's) and the signer of its key, which
    /// must be P-256, P-384 or RSA with 2048 to 4096 bits. `role` names the key in messages
    /// ("claim key").
    pub fn new(
        certificate_pem: &str,
        signer: Arc<dyn TlsSigner>,
        role: &'static str,
    ) -> Result<RemoteKey, KeyError> {
        let chain = super::parse_certificate_pem(certificate_pem)?;
        let spki = chain
            .first()
            .map(rustls::server::ParsedCertificate::try_from)
            .and_then(Result::ok)
            .map(|c| c.subject_public_key_info())
            .ok_or_else(|| {
                KeyError::InvalidCertificate(
                    "the certificate cannot be a client certificate (not X.509 version 3)".into(),
                )
            })?;
        let (algorithm, key) = der::spki_key(spki.as_ref())
            .ok_or_else(|| KeyError::InvalidCertificate("malformed public key".into()))?;
        let public = match algorithm {
            Algorithm::Ec(Curve::P256) if key.len() == 65 && key[0] == 4 => {
                Public::Ec(KeyType::P256, key.to_vec())
            }
            Algorithm::Ec(Curve::P384) if key.len() == 97 && key[0] == 4 => {
                Public::Ec(KeyType::P384, key.to_vec())
            }
            Algorithm::Rsa { bits } if (2048..=4096).contains(&bits) => Public::Rsa(key.to_vec()),
            other => {
                return Err(KeyError::UnsupportedKey(format!(
                    "the certificate's key is {}: a {role} behind a signer must be P-256, P-384 \
                     or RSA with 2048 to 4096 bits",
                    other.name()
                )));
            }
        };
        Ok(RemoteKey {
            chain,
            public,
            kind: algorithm.name(),
            role,
            signer,
        })
    }

    /// "P-256", "RSA-2048".
    pub fn key_kind(&self) -> &str {
        &self.kind
    }

    /// The schemes this key signs with, the preferred first: PSS before PKCS#1 (TLS 1.3 takes
    /// only PSS).
    pub fn schemes(&self) -> &'static [Scheme] {
        match self.public {
            Public::Ec(KeyType::P256, _) => &[Scheme::EcdsaP256Sha256],
            Public::Ec(KeyType::P384, _) => &[Scheme::EcdsaP384Sha384],
            Public::Rsa(_) => &[Scheme::RsaPssSha256, Scheme::RsaPkcs1Sha256],
        }
    }

    /// Signs `message` with `scheme` through the signer and checks the signature with the
    /// certificate's public key: a signature as TLS sends it (DER for ECDSA).
    pub fn sign(&self, scheme: Scheme, message: &[u8]) -> Result<Vec<u8>, SignerFailure> {
        let role = self.role;
        if !self.schemes().contains(&scheme) {
            return Err(SignerFailure(format!(
                "the {role} ({}) cannot sign with {scheme:?}",
                self.kind
            )));
        }
        let digest = ring::digest::digest(scheme.digest_algorithm(), message);
        let raw = self
            .signer
            .sign(scheme, message, digest.as_ref())
            .map_err(|e| SignerFailure(format!("the {role}'s signer failed: {e}")))?;
        let wrong = || {
            SignerFailure(format!(
                "the {role}'s signer returned a signature that does not verify with the \
                 certificate's public key ({}, {scheme:?}): the signer uses another key, or \
                 another signature scheme",
                self.kind
            ))
        };
        match &self.public {
            Public::Ec(kind, point) => {
                let (alg, width): (&'static dyn signature::VerificationAlgorithm, usize) =
                    match kind {
                        KeyType::P256 => (&signature::ECDSA_P256_SHA256_ASN1, 32),
                        KeyType::P384 => (&signature::ECDSA_P384_SHA384_ASN1, 48),
                    };
                // Raw r || s and DER cannot always be told apart by looking: take the reading
                // that verifies.
                let key = UnparsedPublicKey::new(alg, point);
                let candidates = [
                    (raw.first() == Some(&0x30)).then(|| raw.clone()),
                    (raw.len() == 2 * width).then(|| raw_to_der(&raw, width)),
                ];
                candidates
                    .into_iter()
                    .flatten()
                    .find(|sig| key.verify(message, sig).is_ok())
                    .ok_or_else(wrong)
            }
            Public::Rsa(public) => {
                let alg: &'static dyn signature::VerificationAlgorithm = match scheme {
                    Scheme::RsaPssSha256 => &signature::RSA_PSS_2048_8192_SHA256,
                    _ => &signature::RSA_PKCS1_2048_8192_SHA256,
                };
                UnparsedPublicKey::new(alg, public)
                    .verify(message, &raw)
                    .map_err(|_| wrong())?;
                Ok(raw)
            }
        }
    }

    /// The rustls credentials: the chain and this key.
    pub(crate) fn certified_key(&self) -> Arc<CertifiedKey> {
        Arc::new(CertifiedKey::new(
            self.chain.clone(),
            Arc::new(TlsKey(self.clone())),
        ))
    }
}

/// rustls' view of a [`RemoteKey`].
#[derive(Debug)]
struct TlsKey(RemoteKey);

impl rustls::sign::SigningKey for TlsKey {
    fn choose_scheme(
        &self,
        offered: &[rustls::SignatureScheme],
    ) -> Option<Box<dyn rustls::sign::Signer>> {
        let scheme = self
            .0
            .schemes()
            .iter()
            .copied()
            .find(|s| offered.contains(&s.rustls()))?;
        Some(Box::new(TlsSign {
            key: self.0.clone(),
            scheme,
        }))
    }

    fn algorithm(&self) -> rustls::SignatureAlgorithm {
        match self.0.public {
            Public::Ec(..) => rustls::SignatureAlgorithm::ECDSA,
            Public::Rsa(_) => rustls::SignatureAlgorithm::RSA,
        }
    }
}

#[derive(Debug)]
struct TlsSign {
    key: RemoteKey,
    scheme: Scheme,
}

impl rustls::sign::Signer for TlsSign {
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, rustls::Error> {
        self.key
            .sign(self.scheme, message)
            .map_err(|e| rustls::Error::Other(rustls::OtherError(Arc::new(e))))
    }

    fn scheme(&self) -> rustls::SignatureScheme {
        self.scheme.rustls()
    }
}

/// Hands rustls the one remote key, whatever the server asks.
#[derive(Debug)]
pub(crate) struct Resolver(pub Arc<CertifiedKey>);

impl rustls::client::ResolvesClientCert for Resolver {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests;
