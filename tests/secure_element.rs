//! Keys that never leave a secure element, against the emulator over TLS on loopback: the claim
//! key behind a signer (P-256, P-384 and RSA-2048, over TLS 1.3 and TLS 1.2), the device key
//! behind a signer for the CSR and the verification connection, rotation in which the old device
//! key signs the handshake, and signers that fail or sign wrongly.
//!
//! The "token" here is a ring key in the test process, reached only through the signer
//! traits, as a PKCS#11 token is: the C and Python suites do the same with SoftHSM2.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use fleetprov::keys::signer::{ExternalKey, Signer};
use fleetprov::protocol::Format;
use fleetprov::provision::Hooks;
use fleetprov::{Config, Error, Method, RemoteKey, Request, Scheme, TlsSigner};
use fleetprov_emulator::pki::Ca;
use fleetprov_emulator::{Config as EmuConfig, Emulator, KeyKind};
use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair, KeyPair, RsaKeyPair};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::PrivateKeyDer;

mod common;

/// What a token does when asked to sign.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Sign,
    /// Returns an error, as C_Sign returning CKR_FUNCTION_FAILED.
    Refuse,
    /// Signs other bytes: a signature that does not verify.
    Wrong,
}

/// A key in a software token: signs through the traits only, and counts the signatures.
struct Token {
    key: Key,
    mode: std::sync::Mutex<Mode>,
    /// Sign this many times, then refuse (usize::MAX: never).
    refuse_after: AtomicUsize,
    calls: AtomicUsize,
}

enum Key {
    Ec(EcdsaKeyPair),
    Rsa(RsaKeyPair),
}

impl Token {
    fn sign_as(&self, scheme: Option<Scheme>, message: &[u8]) -> Result<Vec<u8>, String> {
        let n = self.calls.fetch_add(1, Ordering::SeqCst);
        let mode = *self.mode.lock().unwrap();
        if mode == Mode::Refuse || n >= self.refuse_after.load(Ordering::SeqCst) {
            return Err("CKR_FUNCTION_FAILED".into());
        }
        let m: &[u8] = if mode == Mode::Wrong {
            b"else"
        } else {
            message
        };
        let rng = SystemRandom::new();
        match &self.key {
            Key::Ec(pair) => Ok(pair.sign(&rng, m).map_err(|_| "ec")?.as_ref().to_vec()),
            Key::Rsa(pair) => {
                let padding: &'static dyn signature::RsaEncoding = match scheme {
                    Some(Scheme::RsaPssSha256) => &signature::RSA_PSS_SHA256,
                    _ => &signature::RSA_PKCS1_SHA256,
                };
                let mut sig = vec![0; pair.public().modulus_len()];
                pair.sign(padding, &rng, m, &mut sig).map_err(|_| "rsa")?;
                Ok(sig)
            }
        }
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    fn set(&self, mode: Mode) {
        *self.mode.lock().unwrap() = mode;
    }
}

impl TlsSigner for Token {
    fn sign(&self, scheme: Scheme, message: &[u8], _digest: &[u8]) -> Result<Vec<u8>, String> {
        self.sign_as(Some(scheme), message)
    }
}

impl Signer for Token {
    fn sign(&self, message: &[u8], _digest: &[u8]) -> Result<Vec<u8>, String> {
        self.sign_as(None, message)
    }
}

/// A token holding the PKCS#8 or PKCS#1 key `pem`, and the key's SubjectPublicKeyInfo.
fn token(pem: &str) -> (Arc<Token>, Vec<u8>) {
    let der = PrivateKeyDer::from_pem_slice(pem.as_bytes()).unwrap();
    let spki =
        rcgen::PublicKeyData::subject_public_key_info(&rcgen::KeyPair::try_from(&der).unwrap());
    let rng = SystemRandom::new();
    let key = match &der {
        PrivateKeyDer::Pkcs8(k) => {
            let p256 = &signature::ECDSA_P256_SHA256_FIXED_SIGNING;
            let p384 = &signature::ECDSA_P384_SHA384_ASN1_SIGNING;
            match EcdsaKeyPair::from_pkcs8(p256, k.secret_pkcs8_der(), &rng)
                .or_else(|_| EcdsaKeyPair::from_pkcs8(p384, k.secret_pkcs8_der(), &rng))
            {
                Ok(pair) => Key::Ec(pair),
                Err(_) => Key::Rsa(RsaKeyPair::from_pkcs8(k.secret_pkcs8_der()).unwrap()),
            }
        }
        PrivateKeyDer::Pkcs1(k) => Key::Rsa(RsaKeyPair::from_der(k.secret_pkcs1_der()).unwrap()),
        _ => panic!("unexpected key format"),
    };
    let token = Arc::new(Token {
        key,
        mode: std::sync::Mutex::new(Mode::Sign),
        refuse_after: AtomicUsize::new(usize::MAX),
        calls: AtomicUsize::new(0),
    });
    (token, spki)
}

/// A new P-256 device key in a token.
fn device_token() -> (Arc<Token>, ExternalKey) {
    let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let (token, _) = token(&pair.serialize_pem());
    let Key::Ec(ec) = &token.key else {
        unreachable!()
    };
    let key = ExternalKey::new(ec.public_key().as_ref(), token.clone()).unwrap();
    (token, key)
}

/// The emulator with a claim key of `kind` ("P-256" is the emulator's own), optionally
/// offering TLS 1.2 only, and the claim key's token and certificate.
fn emulator(name: &str, kind: &str, tls12_only: bool) -> (Emulator, Arc<Token>, String) {
    let dir = common::scratch("secure_element", name);
    let mut config = EmuConfig::new(dir.join("emulator"));
    config.key_kind = KeyKind::EcP256;
    config.ca_key_kind = KeyKind::EcP256;
    config.tls12_only = tls12_only;
    let emu = Emulator::start(config.clone()).expect("emulator starts");
    let paths = emu.paths().clone();
    let emu = if kind == "P-256" {
        emu
    } else {
        // A claim certificate for another key, issued by the emulator's CA and registered
        // when it starts again.
        emu.stop();
        let key_pem = match kind {
            "P-384" => rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384)
                .unwrap()
                .serialize_pem(),
            "RSA-2048" => include_str!("../src/keys/testdata/rsa-pkcs8.key").to_owned(),
            other => panic!("{other}"),
        };
        let (_, spki) = token(&key_pem);
        let read = |p: &std::path::Path| std::fs::read_to_string(p).unwrap();
        let ca = Ca::from_pem(&read(&paths.ca_cert), &read(&paths.ca_key)).unwrap();
        let issued = ca.issue_claim_cert_for(&spki).unwrap();
        std::fs::write(&paths.claim_cert, issued.pem).unwrap();
        std::fs::write(&paths.claim_key, &key_pem).unwrap();
        Emulator::start(config).expect("emulator starts again")
    };
    let (claim, _) = token(&std::fs::read_to_string(&paths.claim_key).unwrap());
    let cert = std::fs::read_to_string(&paths.claim_cert).unwrap();
    (emu, claim, cert)
}

/// A connection that authenticates with the claim certificate and the token's key.
fn connection(emu: &Emulator, cert: &str, claim: Arc<Token>, format: Format) -> Config {
    let base = common::connection(emu, format);
    let mut c = Config::with_signer(
        "localhost",
        RemoteKey::new(cert, claim, "claim key").unwrap(),
    );
    c.port = base.port;
    c.roots = base.roots;
    c.format = format;
    c.step_timeout = base.step_timeout;
    c.overall_timeout = base.overall_timeout;
    c
}

fn request(config: Config, serial: &str, method: Method) -> Request {
    let mut r = Request::new(config, "DemoTemplate", method);
    r.parameters.insert("SerialNumber".into(), serial.into());
    r
}

#[test]
fn the_claim_key_signs_through_its_signer_for_each_key_type_and_tls_version() {
    for kind in ["P-256", "P-384", "RSA-2048"] {
        for tls12 in [false, true] {
            let name = format!("{kind}-{}", if tls12 { "tls12" } else { "tls13" });
            let (emu, claim, cert) = emulator(&name, kind, tls12);
            let (device, key) = device_token();
            let config = connection(&emu, &cert, claim.clone(), Format::Json);
            let r = request(config, &name, Method::ExternalKey(key.clone()));
            let p = fleetprov::provision(&r, &Hooks::default())
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            // One handshake with the claim key; the CSR and the verification connection's
            // handshake with the device key.
            assert_eq!(claim.calls(), 1, "{name}");
            assert_eq!(device.calls(), 2, "{name}");
            assert!(p.private_key_pem.is_none());
            assert!(fleetprov::keys::certificate_contains_key(
                &p.certificate_pem,
                key.public_point()
            ));
            // (The first start's P-256 claim certificate is registered too.)
            assert!(common::device_certificates(&emu)
                .contains(&(p.certificate_id.clone(), "ACTIVE".to_owned())));
            emu.stop();
        }
    }
}

#[test]
fn a_claim_signer_with_a_device_key_made_here_and_cbor() {
    let (emu, claim, cert) = emulator("csr-cbor", "P-256", false);
    let config = connection(&emu, &cert, claim.clone(), Format::Cbor);
    let r = request(
        config,
        "cbor-1",
        Method::Csr(fleetprov::keys::KeyType::P256),
    );
    let p = fleetprov::provision(&r, &Hooks::default()).unwrap();
    assert!(p.private_key_pem.is_some());
    assert_eq!(claim.calls(), 1);
    emu.stop();
}

#[test]
fn a_claim_signer_that_refuses_or_signs_wrongly_is_a_signer_error_and_nothing_is_created() {
    let (emu, claim, cert) = emulator("claim-broken", "P-256", false);
    for (mode, expected) in [
        (
            Mode::Refuse,
            "the claim key's signer failed: CKR_FUNCTION_FAILED",
        ),
        (
            Mode::Wrong,
            "does not verify with the certificate's public key",
        ),
    ] {
        claim.set(mode);
        let config = connection(&emu, &cert, claim.clone(), Format::Json);
        let r = request(
            config,
            "broken",
            Method::Csr(fleetprov::keys::KeyType::P256),
        );
        let err = fleetprov::provision(&r, &Hooks::default()).unwrap_err();
        match &err {
            Error::Signer(m) => assert!(m.contains(expected), "{mode:?}: {m}"),
            other => panic!("{mode:?}: {other:?}"),
        }
        assert!(!err.is_retryable());
    }
    assert!(common::device_certificates(&emu).is_empty());
    emu.stop();
}

#[test]
fn unsupported_claim_keys_are_refused_before_connecting() {
    let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    let cert = rcgen::CertificateParams::new(vec!["claim".into()])
        .unwrap()
        .self_signed(&pair)
        .unwrap()
        .pem();
    let (token, _) = device_token();
    let err = RemoteKey::new(&cert, token, "claim key").unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("Ed25519") && text.contains("P-256, P-384 or RSA"),
        "{text}"
    );
}

#[test]
fn a_device_signer_failing_at_the_verification_connection_resumes_with_the_same_certificate() {
    let (emu, claim, cert) = emulator("verify-broken", "P-256", false);
    let state = common::scratch("secure_element", "verify-broken-state");
    let (device, key) = device_token();
    // The CSR is signed; the verification connection's handshake is refused.
    device.refuse_after.store(1, Ordering::SeqCst);
    let config = connection(&emu, &cert, claim.clone(), Format::Json);
    let mut r = request(config, "resume-1", Method::ExternalKey(key.clone()));
    r.state_dir = Some(state.clone());
    let err = fleetprov::provision(&r, &Hooks::default()).unwrap_err();
    assert!(
        matches!(&err, Error::Signer(m) if m.contains("device key's signer failed")),
        "{err:?}"
    );
    let first = common::device_certificates(&emu);
    assert_eq!(first.len(), 1, "{first:?}");
    // The token works again: the next call resumes with the journaled certificate.
    device.refuse_after.store(usize::MAX, Ordering::SeqCst);
    let p = fleetprov::provision(&r, &Hooks::default()).unwrap();
    assert!(p.resumed);
    assert_eq!(p.certificate_id, first[0].0);
    assert_eq!(common::device_certificates(&emu).len(), 1);
    emu.stop();
}

#[test]
fn rotation_signs_the_handshake_with_the_old_device_key_and_registers_the_new_one() {
    let (emu, claim, cert) = emulator("rotation", "P-256", false);
    let (old_token, old_key) = device_token();
    let config = connection(&emu, &cert, claim, Format::Json);
    let first = fleetprov::provision(
        &request(config, "rotate-1", Method::ExternalKey(old_key)),
        &Hooks::default(),
    )
    .unwrap();
    let calls = old_token.calls();
    // The current certificate with the old key's signer takes the claim's place.
    let (new_token, new_key) = device_token();
    let mut config = connection(
        &emu,
        &first.certificate_pem,
        old_token.clone(),
        Format::Cbor,
    );
    config.client_id = first.thing_name.clone();
    config.certificate_name = "device's current certificate".into();
    let mut r = Request::new(
        config,
        "RotationTemplate",
        Method::ExternalKey(new_key.clone()),
    );
    r.parameters
        .insert("ThingName".into(), first.thing_name.clone());
    let second = fleetprov::provision(&r, &Hooks::default()).unwrap();
    assert_eq!(old_token.calls(), calls + 1);
    assert_eq!(new_token.calls(), 2);
    assert_eq!(second.thing_name, first.thing_name);
    assert_ne!(second.certificate_id, first.certificate_id);
    assert!(fleetprov::keys::certificate_contains_key(
        &second.certificate_pem,
        new_key.public_point()
    ));
    emu.stop();
}

mod c_api {
    //! The claim signer through the C API: the callback, its result codes and its errors.

    use std::ffi::{c_void, CString};
    use std::ptr;

    use fleetprov::ffi::*;

    use super::*;

    /// fleetprov_tls_sign_callback over a [`Token`].
    unsafe extern "C" fn token_sign(
        userdata: *mut c_void,
        scheme: fleetprov_signature_scheme,
        message: *const u8,
        message_len: usize,
        digest: *const u8,
        digest_len: usize,
        signature: *mut u8,
        signature_len: *mut usize,
    ) -> i32 {
        // SAFETY: the userdata is the test's Token, alive for the config's life; the buffers
        // are valid for the call, per the header.
        let (token, message, digest) = unsafe {
            (
                &*(userdata as *const Token),
                std::slice::from_raw_parts(message, message_len),
                std::slice::from_raw_parts(digest, digest_len),
            )
        };
        let scheme = match scheme {
            fleetprov_signature_scheme::FLEETPROV_SIGNATURE_ECDSA_P256_SHA256 => {
                Scheme::EcdsaP256Sha256
            }
            other => panic!("unexpected scheme {other:?}"),
        };
        match TlsSigner::sign(token, scheme, message, digest) {
            // SAFETY: room for *signature_len bytes, per the header.
            Ok(sig) if sig.len() <= unsafe { *signature_len } => unsafe {
                ptr::copy_nonoverlapping(sig.as_ptr(), signature, sig.len());
                *signature_len = sig.len();
                0
            },
            _ => 7,
        }
    }

    fn config(
        emu: &Emulator,
        cert: &str,
        token: &Arc<Token>,
        serial: &str,
    ) -> *mut fleetprov_config {
        let mut c = ptr::null_mut();
        let s = |v: &str| CString::new(v).unwrap();
        let ca = emu.paths().ca_cert.to_str().unwrap().to_owned();
        // SAFETY: a new config, pointers valid for each call; the token outlives the config.
        unsafe {
            common::ok(fleetprov_config_new(&mut c));
            common::ok(fleetprov_config_set_endpoint(
                c,
                s("localhost").as_ptr(),
                emu.port(),
            ));
            common::ok(fleetprov_config_set_ca_file(c, s(&ca).as_ptr()));
            common::ok(fleetprov_config_set_template(c, s("DemoTemplate").as_ptr()));
            common::ok(fleetprov_config_set_parameter(
                c,
                s("SerialNumber").as_ptr(),
                s(serial).as_ptr(),
            ));
            common::ok(fleetprov_config_set_claim_signer(
                c,
                s(cert).as_ptr(),
                Some(token_sign),
                Arc::as_ptr(token) as *mut c_void,
                None,
            ));
        }
        c
    }

    #[test]
    fn provisions_with_the_claim_key_behind_the_c_callback_and_reports_its_failure() {
        let (emu, claim, cert) = emulator("c-api", "P-256", false);
        let c = config(&emu, &cert, &claim, "c-1");
        let mut p = ptr::null_mut();
        // SAFETY: a live config and an out pointer.
        unsafe { common::ok(fleetprov_provision(c, &mut p)) };
        assert_eq!(claim.calls(), 1);
        // SAFETY: a live result, freed once.
        unsafe { fleetprov_provisioned_free(p) };

        claim.set(Mode::Refuse);
        let mut p = ptr::null_mut();
        // SAFETY: as above.
        let r = unsafe { fleetprov_provision(c, &mut p) };
        assert_eq!(
            r,
            fleetprov_result::FLEETPROV_SIGNER,
            "{}",
            common::last_error()
        );
        assert!(p.is_null());
        let text = common::last_error();
        assert!(text.contains("the claim key's signer failed"), "{text}");
        // SAFETY: a static string.
        let name = unsafe { std::ffi::CStr::from_ptr(fleetprov_result_name(18)) };
        assert_eq!(name.to_str().unwrap(), "FLEETPROV_SIGNER");
        // SAFETY: freed once.
        unsafe { fleetprov_config_free(c) };
        assert_eq!(common::device_certificates(&emu).len(), 1);
        emu.stop();
    }

    #[test]
    fn bad_claim_signer_arguments_are_invalid_arguments() {
        let (token, _) = device_token();
        let mut c = ptr::null_mut();
        let ed = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let ed_cert = rcgen::CertificateParams::new(vec!["claim".into()])
            .unwrap()
            .self_signed(&ed)
            .unwrap()
            .pem();
        let ed_cert = CString::new(ed_cert).unwrap();
        let user = Arc::as_ptr(&token) as *mut c_void;
        // SAFETY: a new config; NULL and bad arguments are what is tested.
        unsafe {
            common::ok(fleetprov_config_new(&mut c));
            let r = fleetprov_config_set_claim_signer(c, ed_cert.as_ptr(), None, user, None);
            assert_eq!(r, fleetprov_result::FLEETPROV_INVALID_ARGUMENT);
            assert!(common::last_error().contains("sign is NULL"));
            let r = fleetprov_config_set_claim_signer(c, ptr::null(), Some(token_sign), user, None);
            assert_eq!(r, fleetprov_result::FLEETPROV_INVALID_ARGUMENT);
            let r = fleetprov_config_set_claim_signer(
                c,
                ed_cert.as_ptr(),
                Some(token_sign),
                user,
                None,
            );
            assert_eq!(r, fleetprov_result::FLEETPROV_INVALID_ARGUMENT);
            let text = common::last_error();
            assert!(text.contains("Ed25519"), "{text}");
            fleetprov_config_free(c);
        }
    }
}
