//! The three fleet provisioning APIs as a device sees them over TLS: the exact payload shapes in
//! JSON and CBOR, the certificates issued, the CSR key types accepted, the keys made by
//! CreateKeysAndCertificate, and the ownership token's life (opaque, single use, bound to its
//! certificate, expiring, raced by two connections).

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use fleetprov_emulator::wire::Version;
use fleetprov_emulator::{Config, Format, KeyKind};
use rcgen::{
    CertificateParams, DnType, KeyPair, PublicKeyData, SignatureAlgorithm, SigningKey,
    PKCS_ECDSA_P256_SHA256, PKCS_ECDSA_P384_SHA384, PKCS_ED25519, PKCS_RSA_SHA256,
};
use rsa::pkcs1::{DecodeRsaPrivateKey, EncodeRsaPublicKey};
use rsa::pkcs8::{EncodePrivateKey, LineEnding};
use rsa::traits::PublicKeyParts;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use serde_json::{json, Value};
use x509_parser::certificate::X509Certificate;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::prelude::FromDer;

mod common;
use common::*;

const FORMATS: [Format; 2] = [Format::Json, Format::Cbor];

const BAD_TOKEN: &str = "Certificate ownership token is invalid, expired or already used.";
const EMPTY_TOKEN: &str = "Certificate ownership token cannot be empty.";
const ITOKEN: &str = "InvalidCertificateOwnershipToken";
const ICSR: &str = "InvalidCertificateSigningRequest";

/// `openssl req -new -key p521.key -subj "/CN=p521 device/O=openssl test vector" -sha256` with an
/// `openssl ecparam -name secp521r1 -genkey` key (the vector of pki.rs's unit tests).
const OPENSSL_P521_SHA256_CSR: &str = "\
-----BEGIN CERTIFICATE REQUEST-----
MIIBdzCB2QIBADA0MRQwEgYDVQQDDAtwNTIxIGRldmljZTEcMBoGA1UECgwTb3Bl
bnNzbCB0ZXN0IHZlY3RvcjCBmzAQBgcqhkjOPQIBBgUrgQQAIwOBhgAEAGOft4mo
L2WiuHgc3O9k1FJCXchMK6wYxJnQWpoWccV1l0XlPrt4oNDhdRFEBqH6+mLQw/zE
a5T55jBSmV8zOY5DAffQHMKl/deMMRq6cXXtsJXwDdJBlyIuv6lU4JGnFK7ymo5f
gq3JMgUYCn6QYnAF788SPHmIfhCtfaIsLiC8BsNJoAAwCgYIKoZIzj0EAwIDgYwA
MIGIAkIBWTaj9eXFAum7Tu2DLGTQlk9dhiQnQlnAHckgaBjEIglKm8+3yYkD0wYs
wFG7tY+dIR8TQnwapWNPyhvxYt9hKqgCQgCj9TSmIcPwSZL2rP9oJWju6l8MjwXb
5d1dUY1UspHJLyV+SkXXcYlPWJ50H3UoQv1f9QlBNx+syXY9WWYZKnv+zA==
-----END CERTIFICATE REQUEST-----
";

// ---------------------------------------------------------------------------------------------
// Helpers

/// Subscribes to both replies of `topic`, publishes `payload` at QoS 1 and returns whether the
/// reply came on `/accepted`, with its raw bytes.
async fn raw_request(c: &mut Client, topic: &str, payload: &[u8]) -> (bool, Bytes) {
    let codes = c
        .subscribe(&[
            (&format!("{topic}/accepted"), 1),
            (&format!("{topic}/rejected"), 1),
        ])
        .await;
    assert_eq!(codes, vec![Ok(1), Ok(1)]);
    c.publish(topic, payload.to_vec(), 1).await;
    let (reply_topic, body) = c.next_publish().await;
    let accepted = match reply_topic.strip_prefix(topic) {
        Some("/accepted") => true,
        Some("/rejected") => false,
        _ => panic!("reply to {topic} on {reply_topic}"),
    };
    (accepted, body)
}

/// The keys of a reply and the kind of each value, read from the raw bytes, which must be
/// exactly one item in `format`.
fn shape(format: Format, body: &[u8]) -> BTreeMap<String, &'static str> {
    match format {
        Format::Json => {
            let value: Value = serde_json::from_slice(body).expect("a JSON reply");
            let Value::Object(map) = value else {
                panic!("the reply is not a JSON object: {value}");
            };
            map.iter().map(|(k, v)| (k.clone(), json_kind(v))).collect()
        }
        Format::Cbor => {
            assert!(
                serde_json::from_slice::<Value>(body).is_err(),
                "a reply to a CBOR request is not JSON"
            );
            let mut rest = body;
            let value: ciborium::Value = ciborium::de::from_reader(&mut rest).expect("CBOR reply");
            assert!(rest.is_empty(), "the reply is one CBOR item");
            let ciborium::Value::Map(entries) = value else {
                panic!("the reply is not a CBOR map: {value:?}");
            };
            entries
                .iter()
                .map(|(k, v)| (k.as_text().expect("text keys").to_owned(), cbor_kind(v)))
                .collect()
        }
    }
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::String(_) => "text",
        Value::Number(n) if n.is_u64() => "unsigned integer",
        Value::Object(m) if m.values().all(Value::is_string) => "map of text",
        _ => "other",
    }
}

fn cbor_kind(v: &ciborium::Value) -> &'static str {
    use ciborium::Value as C;
    match v {
        C::Text(_) => "text",
        // ciborium reads a non-negative Integer only from major type 0 (major type 1 is always
        // negative; a float would be Float).
        C::Integer(i) if i128::from(*i) >= 0 => "unsigned integer",
        C::Map(entries) if entries.iter().all(|(k, v)| k.is_text() && v.is_text()) => "map of text",
        _ => "other",
    }
}

fn kinds(entries: &[(&str, &'static str)]) -> BTreeMap<String, &'static str> {
    entries.iter().map(|(k, v)| (k.to_string(), *v)).collect()
}

fn rejection_shape() -> BTreeMap<String, &'static str> {
    kinds(&[
        ("statusCode", "unsigned integer"),
        ("errorCode", "text"),
        ("errorMessage", "text"),
    ])
}

/// The exact rejection payload.
fn rejection(status: u16, code: &str, message: &str) -> Value {
    json!({"statusCode": status, "errorCode": code, "errorMessage": message})
}

fn register_payload(format: Format, token: &str, serial: &str) -> Vec<u8> {
    enc(
        format,
        &json!({"certificateOwnershipToken": token, "parameters": {"SerialNumber": serial}}),
    )
}

/// RegisterThing with the demo template.
async fn register(c: &mut Client, format: Format, token: &str, serial: &str) -> (bool, Value) {
    c.request(
        &register_topic("DemoTemplate", format),
        format,
        &register_payload(format, token, serial),
    )
    .await
}

fn cert_der(pem: &str) -> Vec<u8> {
    CertificateDer::from_pem_slice(pem.as_bytes())
        .expect("a PEM certificate")
        .to_vec()
}

fn sha256_hex(data: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, data)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn parse_cert(der: &[u8]) -> X509Certificate<'_> {
    let (rest, cert) = X509Certificate::from_der(der).expect("the certificate parses");
    assert!(rest.is_empty());
    cert
}

/// `pem` is a certificate whose id is `id`, with AWS's subject, issued and signed by the
/// emulator's CA; returns its DER.
fn assert_issued_by_emulator(env: &Env, pem: &str, id: &str) -> Vec<u8> {
    let der = cert_der(pem);
    assert_eq!(sha256_hex(&der), id, "certificateId = SHA-256 of the DER");
    assert!(
        id.len() == 64
            && id
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
        "lowercase hex: {id}"
    );
    let cert = parse_cert(&der);
    let cns: Vec<&str> = cert
        .subject()
        .iter_common_name()
        .map(|cn| cn.as_str().unwrap())
        .collect();
    assert_eq!(cns, ["AWS IoT Certificate"]);
    let ca_der = cert_der(&env.ca_pem());
    let ca = parse_cert(&ca_der);
    assert_eq!(cert.issuer(), ca.subject(), "issued by the emulator CA");
    ring::signature::UnparsedPublicKey::new(
        &ring::signature::ECDSA_P256_SHA256_ASN1,
        &ca.public_key().subject_public_key.data,
    )
    .verify(cert.tbs_certificate.as_ref(), &cert.signature_value.data)
    .expect("signed by the emulator CA's key");
    der
}

fn status_of(env: &Env, id: &str) -> Option<String> {
    env.certificate(id)
        .map(|c| c["status"].as_str().unwrap().to_owned())
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

// ---------------------------------------------------------------------------------------------
// CSR makers

fn csr_with(key: &impl SigningKey) -> String {
    let mut params = CertificateParams::new(vec!["device.example.com".to_string()]).unwrap();
    params
        .distinguished_name
        .push(DnType::CommonName, "device CSR");
    params.serialize_request(key).unwrap().pem().unwrap()
}

fn rcgen_csr(alg: &'static SignatureAlgorithm) -> String {
    csr_with(&KeyPair::generate_for(alg).unwrap())
}

fn rsa_key(bits: usize) -> rsa::RsaPrivateKey {
    rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, bits).unwrap()
}

/// An RSA CSR signed by rcgen (ring) with a key made by the `rsa` crate.
fn rsa_rcgen_csr(bits: usize) -> String {
    let pem = rsa_key(bits).to_pkcs8_pem(LineEnding::LF).unwrap();
    csr_with(&KeyPair::from_pem_and_sign_algo(&pem, &PKCS_RSA_SHA256).unwrap())
}

/// Signs PKCS#1 v1.5 SHA-256 with the `rsa` crate: ring refuses keys below 2048 bits.
struct RsaCrateSigner {
    key: rsa::RsaPrivateKey,
    public_der: Vec<u8>,
}

impl PublicKeyData for RsaCrateSigner {
    fn der_bytes(&self) -> &[u8] {
        &self.public_der
    }

    fn algorithm(&self) -> &'static SignatureAlgorithm {
        &PKCS_RSA_SHA256
    }
}

impl SigningKey for RsaCrateSigner {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        const SHA256_DIGEST_INFO: &[u8] = &[
            0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02,
            0x01, 0x05, 0x00, 0x04, 0x20,
        ];
        let digest = ring::digest::digest(&ring::digest::SHA256, msg);
        self.key
            .sign(
                rsa::Pkcs1v15Sign::new_unprefixed(),
                &[SHA256_DIGEST_INFO, digest.as_ref()].concat(),
            )
            .map_err(|_| rcgen::Error::RingUnspecified)
    }
}

fn rsa_small_csr(bits: usize) -> String {
    let key = rsa_key(bits);
    let public_der = key.to_public_key().to_pkcs1_der().unwrap().into_vec();
    csr_with(&RsaCrateSigner { key, public_der })
}

/// A key whose signatures have their last byte flipped.
struct CorruptSigner(KeyPair);

impl PublicKeyData for CorruptSigner {
    fn der_bytes(&self) -> &[u8] {
        self.0.der_bytes()
    }

    fn algorithm(&self) -> &'static SignatureAlgorithm {
        self.0.algorithm()
    }
}

impl SigningKey for CorruptSigner {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        let mut sig = self.0.sign(msg)?;
        *sig.last_mut().unwrap() ^= 0x01;
        Ok(sig)
    }
}

fn csr_spki(csr_pem: &str) -> Vec<u8> {
    let der = rustls::pki_types::CertificateSigningRequestDer::from_pem_slice(csr_pem.as_bytes())
        .unwrap();
    let (_, csr) = X509CertificationRequest::from_der(der.as_ref()).unwrap();
    csr.certification_request_info.subject_pki.raw.to_vec()
}

// ---------------------------------------------------------------------------------------------
// Payload shapes

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_have_exactly_the_documented_keys_in_the_request_format() {
    let env = Env::start();
    for format in FORMATS {
        let fmt = format_name(format);
        let mut c = env
            .claim_client(Version::V5, &format!("shapes-{fmt}"))
            .await;

        // CreateKeysAndCertificate
        let (ok, body) = raw_request(&mut c, &keys_topic(format), b"").await;
        assert!(ok, "{fmt}");
        assert_eq!(
            shape(format, &body),
            kinds(&[
                ("certificateId", "text"),
                ("certificatePem", "text"),
                ("privateKey", "text"),
                ("certificateOwnershipToken", "text"),
            ]),
            "{fmt} CreateKeysAndCertificate accepted"
        );
        let (ok, body) = raw_request(&mut c, &keys_topic(format), &enc(format, &json!([1]))).await;
        assert!(!ok);
        assert_eq!(shape(format, &body), rejection_shape(), "{fmt}");
        assert_eq!(
            fleetprov_emulator::decode(format, &body).unwrap(),
            rejection(400, "InvalidPayload", "The payload must be an object")
        );

        // CreateCertificateFromCsr
        let (_, csr) = p256_csr();
        let (ok, body) = raw_request(
            &mut c,
            &csr_topic(format),
            &enc(format, &json!({"certificateSigningRequest": csr})),
        )
        .await;
        assert!(ok, "{fmt}");
        assert_eq!(
            shape(format, &body),
            kinds(&[
                ("certificateOwnershipToken", "text"),
                ("certificateId", "text"),
                ("certificatePem", "text"),
            ]),
            "{fmt} CreateCertificateFromCsr accepted"
        );
        let token = fleetprov_emulator::decode(format, &body).unwrap()["certificateOwnershipToken"]
            .as_str()
            .unwrap()
            .to_owned();
        let (ok, body) = raw_request(
            &mut c,
            &csr_topic(format),
            &enc(format, &json!({"certificateSigningRequest": "garbage"})),
        )
        .await;
        assert!(!ok);
        assert_eq!(shape(format, &body), rejection_shape(), "{fmt}");
        let v = fleetprov_emulator::decode(format, &body).unwrap();
        assert_eq!(
            (&v["statusCode"], &v["errorCode"]),
            (&json!(400), &json!(ICSR))
        );

        // RegisterThing
        let topic = register_topic("DemoTemplate", format);
        let serial = format!("shape-{fmt}");
        let (ok, body) =
            raw_request(&mut c, &topic, &register_payload(format, &token, &serial)).await;
        assert!(ok, "{fmt}");
        assert_eq!(
            shape(format, &body),
            kinds(&[
                ("deviceConfiguration", "map of text"),
                ("thingName", "text")
            ]),
            "{fmt} RegisterThing accepted"
        );
        let v = fleetprov_emulator::decode(format, &body).unwrap();
        assert_eq!(v["thingName"], json!(format!("demo-{serial}")));
        let (ok, body) =
            raw_request(&mut c, &topic, &register_payload(format, &token, &serial)).await;
        assert!(!ok);
        assert_eq!(shape(format, &body), rejection_shape(), "{fmt}");
        assert_eq!(
            fleetprov_emulator::decode(format, &body).unwrap(),
            rejection(400, ITOKEN, BAD_TOKEN)
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Certificates

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issued_certificates_are_pending_aws_style_and_signed_by_the_ca() {
    let env = Env::start();
    let mut c = env.claim_client(Version::V4, "issued").await;
    let mut ids = Vec::new();
    for format in FORMATS {
        for api in [CertApi::Keys, CertApi::Csr] {
            let (id, pem, _, token) = create_certificate(&mut c, api, format).await;
            assert_issued_by_emulator(&env, &pem, &id);
            let cert = env.certificate(&id).expect("in the registry");
            assert_eq!(cert["status"], "PENDING_ACTIVATION", "{api:?} {format:?}");
            assert!(!token.is_empty());
            ids.push(id);
        }
    }
    let mut unique = ids.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), ids.len(), "every certificate is new");
}

/// How a CSR row must end.
#[derive(Debug)]
enum CsrOutcome {
    Accepted,
    /// errorCode and a fragment of errorMessage (status 400).
    Rejected(&'static str, &'static str),
    /// errorCode and the exact errorMessage (status 400).
    RejectedExactly(&'static str, &'static str),
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn csr_key_types() {
    use CsrOutcome::*;
    let env = Env::start();
    let (claim_pem, _) = env.claim();
    let rows: Vec<(&str, String, CsrOutcome)> = vec![
        ("P-256", rcgen_csr(&PKCS_ECDSA_P256_SHA256), Accepted),
        ("P-384", rcgen_csr(&PKCS_ECDSA_P384_SHA384), Accepted),
        (
            "P-521 (OpenSSL)",
            OPENSSL_P521_SHA256_CSR.to_owned(),
            Accepted,
        ),
        ("RSA-2048", rsa_rcgen_csr(2048), Accepted),
        (
            "RSA-1024",
            rsa_small_csr(1024),
            Rejected(ICSR, "RSA key of 1024 bits is too small"),
        ),
        (
            "Ed25519",
            rcgen_csr(&PKCS_ED25519),
            Rejected(ICSR, "Ed25519 keys are not accepted"),
        ),
        (
            "corrupted signature",
            csr_with(&CorruptSigner(
                KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap(),
            )),
            Rejected(ICSR, "the CSR signature does not verify"),
        ),
        (
            "garbage",
            "this is not a CSR".to_owned(),
            Rejected(ICSR, "no PEM block"),
        ),
        (
            "empty",
            String::new(),
            RejectedExactly(ICSR, "Certificate signing request cannot be empty."),
        ),
        (
            "whitespace",
            " \n".to_owned(),
            RejectedExactly(ICSR, "the certificate signing request is empty"),
        ),
        (
            "a certificate instead of a CSR",
            claim_pem,
            Rejected(ICSR, "found a CERTIFICATE"),
        ),
    ];
    for format in FORMATS {
        let mut c = env
            .claim_client(Version::V5, &format!("csr-{}", format_name(format)))
            .await;
        let topic = csr_topic(format);
        for (what, csr, want) in &rows {
            let payload = enc(format, &json!({"certificateSigningRequest": csr}));
            let (ok, v) = c.request(&topic, format, &payload).await;
            let row = format!("{what} ({format:?}): {v}");
            match want {
                Accepted => {
                    assert!(ok, "{row}");
                    let id = v["certificateId"].as_str().unwrap();
                    let der =
                        assert_issued_by_emulator(&env, v["certificatePem"].as_str().unwrap(), id);
                    assert_eq!(
                        parse_cert(&der).public_key().raw,
                        csr_spki(csr).as_slice(),
                        "the certificate holds the CSR's key: {row}"
                    );
                    assert_eq!(status_of(&env, id).as_deref(), Some("PENDING_ACTIVATION"));
                }
                Rejected(code, fragment) => {
                    assert!(!ok, "{row}");
                    assert_eq!(
                        (&v["statusCode"], &v["errorCode"]),
                        (&json!(400), &json!(code)),
                        "{row}"
                    );
                    assert!(
                        v["errorMessage"].as_str().unwrap().contains(fragment),
                        "{row}"
                    );
                }
                RejectedExactly(code, message) => {
                    assert!(!ok, "{row}");
                    assert_eq!(v, rejection(400, code, message), "{row}");
                }
            }
        }
    }
    // Only the accepted rows created certificates: claim + 4 per format.
    let registry = env.emu.registry().unwrap();
    assert_eq!(
        registry["certificates"].as_array().unwrap().len(),
        1 + 2 * 4
    );
}

// ---------------------------------------------------------------------------------------------
// CreateKeysAndCertificate keys

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_keys_default_is_pkcs1_rsa_2048_matching_the_certificate() {
    // The emulator's default (common::Env picks EC keys for speed).
    let default = fleetprov_emulator::Config::new("/unused").key_kind;
    assert_eq!(default, KeyKind::Rsa2048);
    let env = Env::start_with(|c| c.key_kind = default);
    for format in FORMATS {
        let mut c = env
            .claim_client(Version::V4, &format!("rsa-{}", format_name(format)))
            .await;
        let (id, pem, key_pem, _) = create_certificate(&mut c, CertApi::Keys, format).await;
        assert!(
            key_pem.starts_with("-----BEGIN RSA PRIVATE KEY-----\n"),
            "PKCS#1 PEM: {}",
            key_pem.lines().next().unwrap_or("")
        );
        let key = rsa::RsaPrivateKey::from_pkcs1_pem(&key_pem).expect("a PKCS#1 RSA key");
        assert_eq!(key.n().bits(), 2048);
        let der = assert_issued_by_emulator(&env, &pem, &id);
        assert_eq!(
            parse_cert(&der)
                .public_key()
                .subject_public_key
                .data
                .as_ref(),
            key.to_public_key().to_pkcs1_der().unwrap().as_bytes(),
            "the certificate holds the private key's public half"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_keys_with_ec_p256_gives_a_p256_key_matching_the_certificate() {
    let env = Env::start_with(|c| c.key_kind = KeyKind::EcP256);
    for format in FORMATS {
        let mut c = env
            .claim_client(Version::V5, &format!("ec-{}", format_name(format)))
            .await;
        let (id, pem, key_pem, _) = create_certificate(&mut c, CertApi::Keys, format).await;
        let key = KeyPair::from_pem(&key_pem).expect("a PKCS#8 key");
        assert_eq!(key.algorithm(), &PKCS_ECDSA_P256_SHA256);
        let der = assert_issued_by_emulator(&env, &pem, &id);
        assert_eq!(
            parse_cert(&der)
                .public_key()
                .subject_public_key
                .data
                .as_ref(),
            key.public_key_raw()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Ownership token

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ownership_token_is_opaque_and_single_use() {
    let env = Env::start();
    for format in FORMATS {
        let fmt = format_name(format);
        let mut c = env.claim_client(Version::V4, &format!("once-{fmt}")).await;
        for api in [CertApi::Keys, CertApi::Csr] {
            let (id, _, _, token) = create_certificate(&mut c, api, format).await;
            assert!(
                !token.contains(&id) && !token.contains(&id[..16]) && !token.contains(&id[48..]),
                "the token does not reveal the certificate id"
            );
            let serial = format!("once-{fmt}-{api:?}");
            let (ok, v) = register(&mut c, format, &token, &serial).await;
            assert!(ok, "{v}");
            assert_eq!(status_of(&env, &id).as_deref(), Some("ACTIVE"));
            let again = format!("{serial}-again");
            let (ok, v) = register(&mut c, format, &token, &again).await;
            assert!(!ok);
            assert_eq!(v, rejection(400, ITOKEN, BAD_TOKEN), "second use ({fmt})");
            assert!(env.thing(&format!("demo-{again}")).is_none());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_token_registers_its_own_certificate() {
    let env = Env::start();
    for format in FORMATS {
        let fmt = format_name(format);
        let mut c = env.claim_client(Version::V5, &format!("bound-{fmt}")).await;
        let (id_a, _, _, token_a) = create_certificate(&mut c, CertApi::Csr, format).await;
        let (id_b, _, _, token_b) = create_certificate(&mut c, CertApi::Keys, format).await;
        assert_ne!(token_a, token_b);
        // Registered in the opposite order of creation.
        let (ok, _) = register(&mut c, format, &token_b, &format!("bound-b-{fmt}")).await;
        assert!(ok);
        let (ok, _) = register(&mut c, format, &token_a, &format!("bound-a-{fmt}")).await;
        assert!(ok);
        for (serial, id) in [("a", &id_a), ("b", &id_b)] {
            let thing = env.thing(&format!("demo-bound-{serial}-{fmt}")).unwrap();
            assert_eq!(thing["certificates"], json!([id]), "{serial} {fmt}");
            assert_eq!(status_of(&env, id).as_deref(), Some("ACTIVE"));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_are_rejected() {
    let env = Env::start();
    let params = json!({"SerialNumber": "bad-token"});
    let rows: Vec<(&str, Value, Value)> = vec![
        (
            "unknown",
            json!({"certificateOwnershipToken": "ab".repeat(48), "parameters": params}),
            rejection(400, ITOKEN, BAD_TOKEN),
        ),
        (
            "empty",
            json!({"certificateOwnershipToken": "", "parameters": params}),
            rejection(400, ITOKEN, EMPTY_TOKEN),
        ),
        (
            "missing",
            json!({"parameters": params}),
            rejection(400, ITOKEN, EMPTY_TOKEN),
        ),
        (
            "null",
            json!({"certificateOwnershipToken": null, "parameters": params}),
            rejection(400, ITOKEN, EMPTY_TOKEN),
        ),
        (
            "a number",
            json!({"certificateOwnershipToken": 7, "parameters": params}),
            rejection(
                400,
                "InvalidPayload",
                "certificateOwnershipToken must be a string",
            ),
        ),
    ];
    for format in FORMATS {
        let mut c = env
            .claim_client(Version::V4, &format!("bad-token-{}", format_name(format)))
            .await;
        let topic = register_topic("DemoTemplate", format);
        for (what, payload, want) in &rows {
            let (ok, v) = c.request(&topic, format, &enc(format, payload)).await;
            assert!(!ok, "{what}");
            assert_eq!(&v, want, "{what} ({format:?})");
        }
    }
    assert!(env.emu.registry().unwrap()["things"]
        .as_array()
        .unwrap()
        .is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_register_thing_does_not_consume_the_token() {
    let env = Env::start();
    for format in FORMATS {
        let fmt = format_name(format);
        let mut c = env.claim_client(Version::V5, &format!("retry-{fmt}")).await;
        let (id, _, _, token) = create_certificate(&mut c, CertApi::Csr, format).await;
        let topic = register_topic("DemoTemplate", format);
        let failures: Vec<(Value, Value)> = vec![
            (
                json!({"certificateOwnershipToken": token}),
                rejection(400, "InvalidParameters", "Missing parameter: SerialNumber"),
            ),
            (
                json!({"certificateOwnershipToken": token, "parameters": {"Location": "lab"}}),
                rejection(400, "InvalidParameters", "Missing parameter: SerialNumber"),
            ),
            (
                json!({"certificateOwnershipToken": token, "parameters": {"SerialNumber": 5}}),
                rejection(
                    400,
                    "InvalidPayload",
                    "parameters.SerialNumber must be a string",
                ),
            ),
        ];
        for (payload, want) in &failures {
            let (ok, v) = c.request(&topic, format, &enc(format, payload)).await;
            assert!(!ok);
            assert_eq!(&v, want, "{payload}");
            assert_eq!(status_of(&env, &id).as_deref(), Some("PENDING_ACTIVATION"));
        }
        let serial = format!("retry-{fmt}");
        let (ok, v) = register(&mut c, format, &token, &serial).await;
        assert!(ok, "the corrected retry succeeds: {v}");
        assert_eq!(v["thingName"], json!(format!("demo-{serial}")));
        assert_eq!(status_of(&env, &id).as_deref(), Some("ACTIVE"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_token_is_rejected_and_its_pending_certificate_deleted() {
    const TTL: Duration = Duration::from_millis(1500);
    let env = Env::start_with(|c| c.token_ttl = TTL);
    let format = Format::Cbor;
    let mut c = env.claim_client(Version::V5, "expiry").await;
    let (kept, _, _, kept_token) = create_certificate(&mut c, CertApi::Csr, format).await;
    let (expiring, _, _, expiring_token) = create_certificate(&mut c, CertApi::Keys, format).await;
    let (ok, v) = register(&mut c, format, &kept_token, "expiry-kept").await;
    assert!(ok, "registered within the token's lifetime: {v}");

    let cert = env.certificate(&expiring).unwrap();
    assert_eq!(cert["status"], "PENDING_ACTIVATION");
    let expires_at = cert["tokenExpiresAt"].as_i64().unwrap();
    assert_eq!(
        expires_at - cert["createdAt"].as_i64().unwrap(),
        TTL.as_millis() as i64
    );
    // Waiting past the token's lifetime is the behaviour under test.
    let left = expires_at + 100 - now_ms();
    if left > 0 {
        tokio::time::sleep(Duration::from_millis(left as u64)).await;
    }
    let (ok, v) = register(&mut c, format, &expiring_token, "expiry-late").await;
    assert!(!ok);
    assert_eq!(v, rejection(400, ITOKEN, BAD_TOKEN));
    assert!(env.thing("demo-expiry-late").is_none());

    // The emulator's own sweep deletes the unregistered certificate.
    let deadline = std::time::Instant::now() + WAIT;
    while env.certificate(&expiring).is_some() {
        assert!(
            std::time::Instant::now() < deadline,
            "the expired PENDING certificate was not deleted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A sweep now finds nothing more, and never touches the registered certificate.
    assert_eq!(env.emu.sweep_expired(), Ok(0));
    assert_eq!(status_of(&env, &kept).as_deref(), Some("ACTIVE"));
    assert_eq!(
        env.thing("demo-expiry-kept").unwrap()["certificates"],
        json!([kept])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_token_raced_by_two_connections_is_accepted_once() {
    let env = Env::start();
    let mut owner = env.claim_client(Version::V5, "race-owner").await;
    for round in 0..6 {
        let format = FORMATS[round % 2];
        let (id, _, _, token) = create_certificate(&mut owner, CertApi::Csr, format).await;
        let topic = register_topic("DemoTemplate", format);
        let mut racers = Vec::new();
        for side in ["a", "b"] {
            let mut r = env
                .claim_client(Version::V4, &format!("race-{round}-{side}"))
                .await;
            r.subscribe(&[
                (&format!("{topic}/accepted"), 1),
                (&format!("{topic}/rejected"), 1),
            ])
            .await;
            racers.push(r);
        }
        let serial = format!("race-{round}");
        let payload = register_payload(format, &token, &serial);
        let [a, b] = racers.as_mut_slice() else {
            unreachable!("two racers")
        };
        let (ra, rb) = tokio::join!(
            a.request_subscribed(&topic, format, &payload),
            b.request_subscribed(&topic, format, &payload),
        );
        let accepted = [&ra, &rb].iter().filter(|(ok, _)| *ok).count();
        assert_eq!(accepted, 1, "round {round}: {ra:?} {rb:?}");
        let loser = if ra.0 { &rb.1 } else { &ra.1 };
        assert_eq!(loser, &rejection(400, ITOKEN, BAD_TOKEN));
        assert_eq!(status_of(&env, &id).as_deref(), Some("ACTIVE"));
        assert_eq!(
            env.thing(&format!("demo-{serial}")).unwrap()["certificates"],
            json!([id])
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_ca_is_rsa_2048_and_tokens_are_long_base64() {
    // The defaults (an RSA-2048 CA), not the fast test settings.
    let env = Env::start_with(|c| c.ca_key_kind = KeyKind::Rsa2048);
    let ca_der = cert_der(&env.ca_pem());
    let ca = parse_cert(&ca_der);
    let (_, ca_spki) =
        x509_parser::x509::SubjectPublicKeyInfo::from_der(ca.public_key().raw).unwrap();
    match ca_spki.parsed().unwrap() {
        x509_parser::public_key::PublicKey::RSA(rsa) => assert_eq!(rsa.key_size(), 2048),
        other => panic!("CA key: {other:?}"),
    }
    assert_eq!(
        Config::new("x").ca_key_kind,
        KeyKind::Rsa2048,
        "the default"
    );
    let mut c = env.claim_client(Version::V4, "rsa-ca").await;
    for api in [CertApi::Keys, CertApi::Csr] {
        let (id, pem, _, token) = create_certificate(&mut c, api, Format::Json).await;
        let der = cert_der(&pem);
        let cert = parse_cert(&der);
        assert_eq!(
            cert.signature_algorithm.algorithm.to_id_string(),
            "1.2.840.113549.1.1.11",
            "{api:?}: sha256WithRSAEncryption"
        );
        assert_eq!(cert.issuer(), ca.subject());
        ring::signature::UnparsedPublicKey::new(
            &ring::signature::RSA_PKCS1_2048_8192_SHA256,
            &ca.public_key().subject_public_key.data,
        )
        .verify(cert.tbs_certificate.as_ref(), &cert.signature_value.data)
        .expect("signed by the CA's RSA key");
        assert_eq!(sha256_hex(&der), id);
        // Several hundred characters of the base64 alphabet (inferred from AWS's demos'
        // 512-byte buffers).
        assert_eq!(token.len(), 460, "{api:?}");
        assert!(token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/'));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_json_changes_the_rejections_of_a_code() {
    let env = Env::start_with(|c| {
        std::fs::create_dir_all(&c.data_dir).unwrap();
        std::fs::write(
            c.data_dir.join("errors.json"),
            r#"{"InvalidPayload": {"statusCode": 422, "errorCode": "InvalidRequest", "errorMessage": "as seen on AWS: {message}"},
                "ResourceNotFound": {"errorMessage": "Template not found"}}"#,
        )
        .unwrap();
    });
    let mut c = env.claim_client(Version::V4, "errors-json").await;
    let (ok, reply) = c
        .request(&csr_topic(Format::Json), Format::Json, b"{")
        .await;
    assert!(!ok);
    assert_eq!(
        reply,
        json!({"statusCode": 422, "errorCode": "InvalidRequest",
               "errorMessage": "as seen on AWS: The payload is not valid JSON (line 1, column 1)."})
    );
    let (_, _, _, token) = create_certificate(&mut c, CertApi::Csr, Format::Json).await;
    let (ok, reply) = register_in(&mut c, "NoSuchTemplate", &token).await;
    assert!(!ok);
    assert_eq!(
        reply,
        json!({"statusCode": 404, "errorCode": "ResourceNotFound", "errorMessage": "Template not found"})
    );
    // Codes without an entry are unchanged.
    let (ok, reply) = register_in(&mut c, "DemoTemplate", "").await;
    assert!(!ok);
    assert_eq!(
        reply["errorCode"],
        json!("InvalidCertificateOwnershipToken")
    );

    // A file the emulator cannot use stops the start, naming it.
    let dir = TempDir::new("errors-json");
    std::fs::create_dir_all(dir.path()).unwrap();
    std::fs::write(dir.path().join("errors.json"), r#"{"Teapot": {}}"#).unwrap();
    let err = fleetprov_emulator::Emulator::start(Config::new(dir.path())).unwrap_err();
    assert!(
        err.contains("errors.json") && err.contains("Teapot"),
        "{err}"
    );
}

async fn register_in(c: &mut Client, template: &str, token: &str) -> (bool, Value) {
    c.request(
        &register_topic(template, Format::Json),
        Format::Json,
        &enc(
            Format::Json,
            &json!({"certificateOwnershipToken": token, "parameters": {"SerialNumber": "e"}}),
        ),
    )
    .await
}
