//! Remote keys: what a certificate's key may be, and signatures checked before TLS uses them.

use super::*;
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, RsaKeyPair};

/// A software token: a ring key, signing what it is asked (or something else when `wrong`).
enum Token {
    Ec(EcdsaKeyPair, bool),
    Rsa(RsaKeyPair),
    Fails,
}

impl TlsSigner for Token {
    fn sign(&self, scheme: Scheme, message: &[u8], digest: &[u8]) -> Result<Vec<u8>, String> {
        assert_eq!(
            digest,
            ring::digest::digest(scheme.digest_algorithm(), message).as_ref()
        );
        let rng = SystemRandom::new();
        match self {
            Token::Ec(pair, wrong) => {
                let m: &[u8] = if *wrong { b"other" } else { message };
                Ok(pair.sign(&rng, m).map_err(|_| "ec")?.as_ref().to_vec())
            }
            Token::Rsa(pair) => {
                let padding: &'static dyn signature::RsaEncoding = match scheme {
                    Scheme::RsaPssSha256 => &signature::RSA_PSS_SHA256,
                    _ => &signature::RSA_PKCS1_SHA256,
                };
                let mut sig = vec![0; pair.public().modulus_len()];
                pair.sign(padding, &rng, message, &mut sig)
                    .map_err(|_| "rsa")?;
                Ok(sig)
            }
            Token::Fails => Err("CKR_USER_NOT_LOGGED_IN".into()),
        }
    }
}

/// A self-signed certificate for `pair`'s key (rcgen), PEM.
fn certificate(pair: &rcgen::KeyPair) -> String {
    rcgen::CertificateParams::new(vec!["claim".into()])
        .unwrap()
        .self_signed(pair)
        .unwrap()
        .pem()
}

fn ec(alg: &'static rcgen::SignatureAlgorithm, fixed: bool, wrong: bool) -> (String, Token) {
    let pair = rcgen::KeyPair::generate_for(alg).unwrap();
    let ring_alg = match (alg == &rcgen::PKCS_ECDSA_P256_SHA256, fixed) {
        (true, false) => &signature::ECDSA_P256_SHA256_ASN1_SIGNING,
        (true, true) => &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
        (false, false) => &signature::ECDSA_P384_SHA384_ASN1_SIGNING,
        (false, true) => &signature::ECDSA_P384_SHA384_FIXED_SIGNING,
    };
    let ring =
        EcdsaKeyPair::from_pkcs8(ring_alg, &pair.serialize_der(), &SystemRandom::new()).unwrap();
    (certificate(&pair), Token::Ec(ring, wrong))
}

fn rsa() -> (String, Token) {
    let pem = include_str!("../testdata/rsa-pkcs8.key");
    let der = rustls::pki_types::PrivateKeyDer::from_pem_slice(pem.as_bytes()).unwrap();
    let pair = rcgen::KeyPair::try_from(&der).unwrap();
    let ring = match &der {
        rustls::pki_types::PrivateKeyDer::Pkcs1(k) => RsaKeyPair::from_der(k.secret_pkcs1_der()),
        rustls::pki_types::PrivateKeyDer::Pkcs8(k) => RsaKeyPair::from_pkcs8(k.secret_pkcs8_der()),
        _ => unreachable!(),
    }
    .unwrap();
    (certificate(&pair), Token::Rsa(ring))
}

use rustls::pki_types::pem::PemObject;

#[test]
fn each_key_type_signs_its_schemes_and_the_signature_verifies() {
    let cases = [
        (ec(&rcgen::PKCS_ECDSA_P256_SHA256, false, false), "P-256"),
        (ec(&rcgen::PKCS_ECDSA_P256_SHA256, true, false), "P-256"),
        (ec(&rcgen::PKCS_ECDSA_P384_SHA384, true, false), "P-384"),
        (rsa(), "RSA-2048"),
    ];
    for ((cert, token), kind) in cases {
        let key = RemoteKey::new(&cert, Arc::new(token), "claim key").unwrap();
        assert_eq!(key.key_kind(), kind);
        assert!(format!("{key:?}").contains(kind));
        for &scheme in key.schemes() {
            // Raw r || s signatures come back as DER, which TLS sends.
            for _ in 0..20 {
                let sig = key
                    .sign(scheme, b"TLS 1.3, client CertificateVerify")
                    .unwrap();
                if kind.starts_with('P') {
                    assert_eq!(sig[0], 0x30);
                }
            }
        }
        let other = if kind.starts_with('P') {
            Scheme::RsaPssSha256
        } else {
            Scheme::EcdsaP256Sha256
        };
        let err = key.sign(other, b"m").unwrap_err();
        assert!(err.0.contains("cannot sign with"), "{err}");
    }
}

#[test]
fn a_failing_or_wrong_signer_is_a_signer_failure_naming_the_key() {
    let (cert, token) = ec(&rcgen::PKCS_ECDSA_P256_SHA256, true, true);
    let key = RemoteKey::new(&cert, Arc::new(token), "claim key").unwrap();
    let err = key.sign(Scheme::EcdsaP256Sha256, b"m").unwrap_err();
    assert!(err
        .0
        .contains("claim key's signer returned a signature that does not verify"));
    let key = RemoteKey::new(&cert, Arc::new(Token::Fails), "device key").unwrap();
    let err = key.sign(Scheme::EcdsaP256Sha256, b"m").unwrap_err();
    assert_eq!(
        err.0,
        "the device key's signer failed: CKR_USER_NOT_LOGGED_IN"
    );
    // rustls' view: the failure travels as Error::Other, typed.
    let signing = key.certified_key();
    let signer = signing
        .key
        .choose_scheme(&[rustls::SignatureScheme::ECDSA_NISTP256_SHA256])
        .unwrap();
    match signer.sign(b"m") {
        Err(rustls::Error::Other(o)) => assert!(o.0.downcast_ref::<SignerFailure>().is_some()),
        other => panic!("{other:?}"),
    }
    // Not offered the key's scheme: no signer, so rustls sends no certificate.
    assert!(signing
        .key
        .choose_scheme(&[rustls::SignatureScheme::RSA_PSS_SHA256])
        .is_none());
}

#[test]
fn unsupported_key_types_are_refused_saying_which() {
    let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    let err = RemoteKey::new(&certificate(&pair), Arc::new(Token::Fails), "claim key").unwrap_err();
    assert!(matches!(err, KeyError::UnsupportedKey(_)), "{err}");
    assert!(err.to_string().contains("Ed25519"), "{err}");
    let err = RemoteKey::new("not pem", Arc::new(Token::Fails), "claim key").unwrap_err();
    assert!(matches!(err, KeyError::InvalidPem(_)), "{err}");
}
