//! CSRs signed by a key the library never sees (a secure element, an HSM, a TPM): the host
//! gives the public key and a function that signs a digest; the library builds the CSR around
//! it, checks the signature against the public key, and sends it.

use std::fmt;
use std::sync::Arc;

use ring::signature::{self, UnparsedPublicKey};

use super::der::{self, Curve};
use super::{KeyError, KeyType};

/// Signs with the device's private key.
pub trait Signer: Send + Sync {
    /// Signs `message` with ECDSA (SHA-256 for P-256, SHA-384 for P-384); `digest` is that hash
    /// of `message`, for signers that take a digest (most secure elements). Returns the
    /// signature as DER (`ECDSA-Sig-Value`) or as the raw `r || s` of fixed width.
    fn sign(&self, message: &[u8], digest: &[u8]) -> Result<Vec<u8>, String>;
}

/// An external key: its public half and what signs with the private half.
#[derive(Clone)]
pub struct ExternalKey {
    kind: KeyType,
    /// The uncompressed point, `04 || X || Y`.
    point: Vec<u8>,
    signer: Arc<dyn Signer>,
}

impl fmt::Debug for ExternalKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExternalKey")
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

impl ExternalKey {
    /// `public_key` is the key's SubjectPublicKeyInfo (DER, as OpenSSL's `i2d_PUBKEY` writes
    /// it) or its uncompressed point (65 bytes for P-256, 97 for P-384).
    pub fn new(public_key: &[u8], signer: Arc<dyn Signer>) -> Result<ExternalKey, KeyError> {
        let (kind, point) = match der::ec_spki(public_key) {
            Some((Curve::P256, p)) => (KeyType::P256, p),
            Some((Curve::P384, p)) => (KeyType::P384, p),
            Some(_) => {
                return Err(KeyError::UnsupportedKey(
                    "the external key must be P-256 or P-384".into(),
                ));
            }
            None => match public_key.len() {
                65 => (KeyType::P256, public_key),
                97 => (KeyType::P384, public_key),
                _ => {
                    return Err(KeyError::InvalidArgument(
                        "the public key is neither an EC SubjectPublicKeyInfo nor an \
                         uncompressed P-256/P-384 point"
                            .into(),
                    ));
                }
            },
        };
        let width = coordinate_len(kind);
        if point.len() != 1 + 2 * width || point[0] != 4 {
            return Err(KeyError::InvalidArgument(
                "the public key's point is not uncompressed or has the wrong size".into(),
            ));
        }
        Ok(ExternalKey {
            kind,
            point: point.to_vec(),
            signer,
        })
    }

    pub fn key_type(&self) -> KeyType {
        self.kind
    }

    /// What signs with the private half.
    #[cfg_attr(not(feature = "transport"), allow(dead_code))]
    pub(crate) fn signer(&self) -> Arc<dyn Signer> {
        self.signer.clone()
    }

    /// A PEM CSR for this key with subject CN `common_name`, signed through the signer.
    pub fn csr_pem(&self, common_name: &str) -> Result<String, KeyError> {
        super::check_common_name(common_name)?;
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, common_name);
        let remote = Remote {
            key: self,
            failure: std::sync::Mutex::new(None),
        };
        let csr = params.serialize_request(&remote).and_then(|csr| csr.pem());
        csr.map_err(|e| {
            let why = remote.failure.lock().ok().and_then(|mut f| f.take());
            match why {
                Some(why) => KeyError::Signer(why),
                None => KeyError::Generation(format!("signing the CSR: {e}")),
            }
        })
    }

    /// The uncompressed point (`04 || X || Y`), which a certificate for this key contains.
    pub fn public_point(&self) -> &[u8] {
        &self.point
    }
}

fn coordinate_len(kind: KeyType) -> usize {
    match kind {
        KeyType::P256 => 32,
        KeyType::P384 => 48,
    }
}

/// rcgen's view of the external key; `failure` keeps why signing failed (rcgen's error has no
/// room for it).
struct Remote<'a> {
    key: &'a ExternalKey,
    failure: std::sync::Mutex<Option<String>>,
}

impl Remote<'_> {
    fn fail(&self, why: String) -> rcgen::Error {
        if let Ok(mut f) = self.failure.lock() {
            *f = Some(why);
        }
        rcgen::Error::RemoteKeyError
    }
}

impl rcgen::PublicKeyData for Remote<'_> {
    fn der_bytes(&self) -> &[u8] {
        &self.key.point
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        self.key.kind.algorithm()
    }
}

impl rcgen::SigningKey for Remote<'_> {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        let (digest_alg, verify_alg): (_, &'static dyn signature::VerificationAlgorithm) =
            match self.key.kind {
                KeyType::P256 => (&ring::digest::SHA256, &signature::ECDSA_P256_SHA256_ASN1),
                KeyType::P384 => (&ring::digest::SHA384, &signature::ECDSA_P384_SHA384_ASN1),
            };
        let digest = ring::digest::digest(digest_alg, msg);
        let raw = self
            .key
            .signer
            .sign(msg, digest.as_ref())
            .map_err(|e| self.fail(format!("the external signer failed: {e}")))?;
        // Raw r || s and DER cannot always be told apart by looking (a raw signature may start
        // with 0x30): take whichever reading verifies. A wrong key or a bad signature is caught
        // here, not by the service.
        let key = UnparsedPublicKey::new(verify_alg, &self.key.point);
        let width = coordinate_len(self.key.kind);
        let candidates = [
            (raw.first() == Some(&0x30)).then(|| raw.clone()),
            (raw.len() == 2 * width).then(|| raw_to_der(&raw, width)),
        ];
        if candidates.iter().all(Option::is_none) {
            return Err(self.fail("the external signer returned no ECDSA signature".into()));
        }
        candidates
            .into_iter()
            .flatten()
            .find(|sig| key.verify(msg, sig).is_ok())
            .ok_or_else(|| {
                self.fail(
                    "the external signer's signature does not verify with its public key".into(),
                )
            })
    }
}

/// A raw `r || s` ECDSA signature (each `width` bytes) as DER `ECDSA-Sig-Value`.
pub(super) fn raw_to_der(sig: &[u8], width: usize) -> Vec<u8> {
    let (r, s) = sig.split_at(width.min(sig.len()));
    let int = |v: &[u8]| {
        let mut v: Vec<u8> = v.iter().copied().skip_while(|b| *b == 0).collect();
        if v.first().map_or(true, |b| b & 0x80 != 0) {
            v.insert(0, 0);
        }
        // At most 49 bytes for P-384: a short-form length.
        let mut out = vec![0x02, v.len() as u8];
        out.extend(v);
        out
    };
    let body: Vec<u8> = [int(r), int(s)].concat();
    let mut out = vec![0x30];
    if body.len() >= 0x80 {
        out.push(0x81);
    }
    out.push(body.len() as u8);
    out.extend(body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::rand::SystemRandom;
    use ring::signature::{EcdsaKeyPair, KeyPair};

    /// A software "secure element": a ring key, signing raw (r || s) or DER.
    struct Element {
        pair: EcdsaKeyPair,
        /// Sign something else than asked (a broken element).
        wrong: bool,
    }

    impl Signer for Element {
        fn sign(&self, message: &[u8], digest: &[u8]) -> Result<Vec<u8>, String> {
            assert!(digest.len() == 32 || digest.len() == 48);
            let m: &[u8] = if self.wrong { b"other" } else { message };
            self.pair
                .sign(&SystemRandom::new(), m)
                .map(|s| s.as_ref().to_vec())
                .map_err(|_| "no".into())
        }
    }

    fn element(kind: KeyType, fixed: bool, wrong: bool) -> (Vec<u8>, Arc<Element>) {
        let alg = match (kind, fixed) {
            (KeyType::P256, false) => &signature::ECDSA_P256_SHA256_ASN1_SIGNING,
            (KeyType::P256, true) => &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            (KeyType::P384, false) => &signature::ECDSA_P384_SHA384_ASN1_SIGNING,
            (KeyType::P384, true) => &signature::ECDSA_P384_SHA384_FIXED_SIGNING,
        };
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(alg, &rng).unwrap();
        let pair = EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng).unwrap();
        (
            pair.public_key().as_ref().to_vec(),
            Arc::new(Element { pair, wrong }),
        )
    }

    #[test]
    fn csrs_signed_externally_pass_the_csr_check_in_both_signature_forms() {
        for kind in [KeyType::P256, KeyType::P384] {
            for fixed in [false, true] {
                let (point, el) = element(kind, fixed, false);
                let key = ExternalKey::new(&point, el).unwrap();
                assert_eq!(key.key_type(), kind);
                // Enough signatures that some raw ones start with 0x30, like DER.
                for _ in 0..64 {
                    let csr = key.csr_pem("device-1").unwrap();
                    crate::keys::check_csr_pem(&csr).unwrap();
                }
                // The same key given as a SubjectPublicKeyInfo.
                let spki = rcgen::PublicKeyData::subject_public_key_info(&Remote {
                    key: &key,
                    failure: std::sync::Mutex::new(None),
                });
                let again = ExternalKey::new(&spki, key.signer.clone()).unwrap();
                assert_eq!(again.point, key.point);
            }
        }
    }

    #[test]
    fn a_signer_that_signs_wrongly_or_fails_is_a_clear_error() {
        let (point, el) = element(KeyType::P256, true, true);
        let err = ExternalKey::new(&point, el)
            .unwrap()
            .csr_pem("d")
            .unwrap_err();
        assert!(err.to_string().contains("does not verify"), "{err}");
        struct Fails;
        impl Signer for Fails {
            fn sign(&self, _: &[u8], _: &[u8]) -> Result<Vec<u8>, String> {
                Err("element busy".into())
            }
        }
        let err = ExternalKey::new(&point, Arc::new(Fails))
            .unwrap()
            .csr_pem("d")
            .unwrap_err();
        assert!(err.to_string().contains("element busy"), "{err}");
    }

    #[test]
    fn bad_public_keys_are_refused() {
        let (point, el) = element(KeyType::P256, true, false);
        let mut compressed = point.clone();
        compressed[0] = 2;
        for bad in [
            &b""[..],
            &point[..64],
            &compressed[..],
            &[0x30, 0x03, 0x02, 0x01, 0x00][..],
        ] {
            assert!(ExternalKey::new(bad, el.clone()).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn raw_signatures_become_der_that_verifies() {
        let rng = SystemRandom::new();
        for kind in [KeyType::P256, KeyType::P384] {
            let (point, el) = element(kind, true, false);
            for _ in 0..300 {
                let raw = el.pair.sign(&rng, b"message").unwrap();
                let der = raw_to_der(raw.as_ref(), coordinate_len(kind));
                let alg: &dyn signature::VerificationAlgorithm = match kind {
                    KeyType::P256 => &signature::ECDSA_P256_SHA256_ASN1,
                    KeyType::P384 => &signature::ECDSA_P384_SHA384_ASN1,
                };
                UnparsedPublicKey::new(alg, &point)
                    .verify(b"message", &der)
                    .unwrap();
            }
        }
    }
}
