//! Key, CSR and PEM checks. The vectors in testdata/ are test keys, used nowhere else, made once
//! with OpenSSL 3.0:
//!
//! - `rsa.key`: `openssl genrsa -traditional 2048` (PKCS#1); `rsa.pem`: `openssl req -x509` for it;
//!   `rsa-pkcs8.key`: `openssl pkcs8 -topk8 -nocrypt` of it; `rsa.csr`: `openssl req -new` for
//!   it; `rsa-v1.pem`: `openssl x509 -req` of that CSR (a version 1 certificate).
//! - `ec.key`: `openssl ecparam -name prime256v1 -genkey -noout` (SEC1); `ec.pem` for it;
//!   `ec-pkcs8.key`: `openssl pkcs8 -topk8 -nocrypt` of it.
//! - `ec-p384.key` / `ec-p384.pem`: the same for secp384r1; `ec-p521.key` for secp521r1 and
//!   `ec-secp256k1.key` for secp256k1.
//! - `ed25519.key`, `ed448.key`: `openssl genpkey -algorithm ...` (PKCS#8).
//! - `rsa-1024.key`: `openssl genrsa -traditional 1024`.
//! - `encrypted-pkcs8.key`: `openssl pkcs8 -topk8 -v2 aes-256-cbc`; `encrypted-legacy.key`:
//!   `openssl ec -aes128` (a `Proc-Type: 4,ENCRYPTED` header).

use super::*;

const RSA_KEY: &str = include_str!("testdata/rsa.key");
const RSA_CERT: &str = include_str!("testdata/rsa.pem");
const RSA_PKCS8_KEY: &str = include_str!("testdata/rsa-pkcs8.key");
const RSA_CSR: &str = include_str!("testdata/rsa.csr");
const RSA_V1_CERT: &str = include_str!("testdata/rsa-v1.pem");
const RSA_1024_KEY: &str = include_str!("testdata/rsa-1024.key");
const EC_KEY: &str = include_str!("testdata/ec.key");
const EC_CERT: &str = include_str!("testdata/ec.pem");
const EC_PKCS8_KEY: &str = include_str!("testdata/ec-pkcs8.key");
const EC_P384_KEY: &str = include_str!("testdata/ec-p384.key");
const EC_P384_CERT: &str = include_str!("testdata/ec-p384.pem");
const EC_P521_KEY: &str = include_str!("testdata/ec-p521.key");
const EC_SECP256K1_KEY: &str = include_str!("testdata/ec-secp256k1.key");
const ED25519_KEY: &str = include_str!("testdata/ed25519.key");
const ED448_KEY: &str = include_str!("testdata/ed448.key");
const ENCRYPTED_PKCS8_KEY: &str = include_str!("testdata/encrypted-pkcs8.key");
const ENCRYPTED_LEGACY_KEY: &str = include_str!("testdata/encrypted-legacy.key");
/// What `openssl ecparam -genkey` (without `-noout`) puts before the SEC1 key.
const EC_PARAMS: &str =
    "-----BEGIN EC PARAMETERS-----\nBggqhkjOPQMBBw==\n-----END EC PARAMETERS-----\n";

/// `openssl x509 -in X -outform der | sha256sum`, computed once.
const RSA_CERT_ID: &str = "fa27b7bd9cc86ecae72333e2a8676a6a0c9bd9cef01ef9d680fd624d7b46440f";
const EC_CERT_ID: &str = "57314901a6b652372828d5b3786f3b734e959b935c32c426b9ecb1ceb1442fa8";
const EC_P384_CERT_ID: &str = "66c24c3bc063328c733990abef69132a2e5392d27cc200a3714f0d4316d5a53c";
const RSA_V1_CERT_ID: &str = "32533b749a5debc1fc3ea525de521fa7529a767d3071fbdfe3b2563e21102a5b";

const ALL_KEYS: &[&str] = &[
    RSA_KEY,
    RSA_PKCS8_KEY,
    RSA_1024_KEY,
    EC_KEY,
    EC_PKCS8_KEY,
    EC_P384_KEY,
    EC_P521_KEY,
    EC_SECP256K1_KEY,
    ED25519_KEY,
    ED448_KEY,
    ENCRYPTED_PKCS8_KEY,
    ENCRYPTED_LEGACY_KEY,
];

const NO_CERT: &str = "no CERTIFICATE block";
const NO_CERT_BUT_KEY: &str = "no CERTIFICATE block (the text holds a private key)";
const NO_KEY: &str = "no private key block (PKCS#1, SEC1 or PKCS#8)";
const NO_CSR: &str = "no CERTIFICATE REQUEST block";
const NO_END: &str = "a PEM block has no END line (truncated?)";
const BAD_BASE64: &str = "a PEM block's base64 is corrupt (truncated?)";
const BAD_BEGIN: &str = "a PEM BEGIN line is malformed";
const NOT_X509: &str = "not a well-formed X.509 certificate";
const ENCRYPTED: &str = "the private key is encrypted; decrypt it first (openssl pkey)";
const KEY_IN_CSR: &str = "the text holds a private key; pass the CSR alone";

fn invalid_pem(m: &str) -> KeyError {
    KeyError::InvalidPem(m.into())
}
fn invalid_cert(m: &str) -> KeyError {
    KeyError::InvalidCertificate(m.into())
}
fn invalid_key(m: &str) -> KeyError {
    KeyError::InvalidKey(m.into())
}
fn invalid_csr(m: &str) -> KeyError {
    KeyError::InvalidCsr(m.into())
}
fn unsupported(m: &str) -> KeyError {
    KeyError::UnsupportedKey(m.into())
}

/// A PEM block for `der` (base64 written here, so tests can build any DER they like).
fn pem_block(label: &str, der: &[u8]) -> String {
    const B64: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut body = String::new();
    for chunk in der.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                body.push(char::from(B64[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                body.push('=');
            }
        }
    }
    let lines: Vec<&str> = body
        .as_bytes()
        .chunks(64)
        .map(|l| std::str::from_utf8(l).unwrap())
        .collect();
    format!(
        "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
        lines.join("\n")
    )
}

fn der_of_key(pem: &str) -> Vec<u8> {
    parse_private_key_pem(pem).unwrap().secret_der().to_vec()
}

fn der_of_cert(pem: &str) -> Vec<u8> {
    parse_certificate_pem(pem).unwrap()[0].to_vec()
}

fn der_of_csr(pem: &str) -> Vec<u8> {
    CertificateSigningRequestDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .as_ref()
        .to_vec()
}

/// The PEM with its middle base64 lines dropped: still PEM, but the DER is cut short.
fn drop_middle_lines(pem: &str) -> String {
    let lines: Vec<&str> = pem.lines().collect();
    let keep = [&lines[..2], &lines[lines.len() - 2..]].concat();
    keep.join("\n") + "\n"
}

fn crlf(pem: &str) -> String {
    pem.replace('\n', "\r\n")
}

/// A self-signed certificate for a key rcgen can sign with (PKCS#8).
fn self_signed(key_pem: &str) -> String {
    let pair = rcgen::KeyPair::from_pem(key_pem).unwrap();
    rcgen::CertificateParams::new(vec!["device.test".to_string()])
        .unwrap()
        .self_signed(&pair)
        .unwrap()
        .pem()
}

/// No PEM label and no 12-character run of any key's base64 in `text`.
fn assert_no_key_material(text: &str) {
    assert!(!text.contains("PRIVATE KEY"), "{text}");
    for key in ALL_KEYS {
        for line in key.lines().filter(|l| !l.starts_with("-----")) {
            for start in (0..line.len().saturating_sub(12)).step_by(6) {
                let run = &line[start..start + 12];
                assert!(!text.contains(run), "{text} quotes {run}");
            }
        }
    }
}

#[test]
fn generated_keys_make_csrs_and_match_self_signed_certificates() {
    for kind in [KeyType::P256, KeyType::P384] {
        let key = DeviceKey::generate(kind).unwrap();
        assert_eq!(key.key_type(), kind);
        let pem = key.private_key_pem().expose();
        assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----\n"), "{kind:?}");
        assert!(pem.trim_end().ends_with("-----END PRIVATE KEY-----"));
        assert!(matches!(
            parse_private_key_pem(pem),
            Ok(PrivateKeyDer::Pkcs8(_))
        ));

        let csr = key.csr_pem("device-1").unwrap();
        assert!(csr.starts_with("-----BEGIN CERTIFICATE REQUEST-----"));
        check_csr_pem(&csr).unwrap();
        let csr_der = der_of_csr(&csr);
        assert_eq!(csr_der.first(), Some(&0x30));
        assert!(csr_der.windows(8).any(|w| w == b"device-1"));
        assert!(
            !csr_der.windows(5).any(|w| w == b"rcgen"),
            "rcgen's default name"
        );

        // The CSR carries this key's public key: the one in a certificate for the key.
        let cert = self_signed(pem);
        certificate_matches_key(&cert, pem).unwrap();
        let cert_der = parse_certificate_pem(&cert).unwrap().remove(0);
        let spki = rustls::server::ParsedCertificate::try_from(&cert_der)
            .unwrap()
            .subject_public_key_info();
        assert!(csr_der.windows(spki.len()).any(|w| w == spki.as_ref()));

        // Reloading gives the same key; a second key is different.
        let reloaded = DeviceKey::from_pem(pem).unwrap();
        assert_eq!(reloaded.private_key_pem(), key.private_key_pem());
        assert_eq!(reloaded.key_type(), kind);
        certificate_matches_key(&cert, reloaded.private_key_pem().expose()).unwrap();
        let other = DeviceKey::generate(kind).unwrap();
        assert_ne!(other.private_key_pem(), key.private_key_pem());
        assert_eq!(
            certificate_matches_key(&cert, other.private_key_pem().expose()),
            Err(KeyError::Mismatch)
        );
    }
}

#[test]
fn csr_common_name_table() {
    let key = DeviceKey::generate(KeyType::P256).unwrap();
    let arg = |m: &str| Err(KeyError::InvalidArgument(m.into()));
    let rows: Vec<(String, Result<(), KeyError>)> = vec![
        ("a".into(), Ok(())),
        ("x".repeat(64), Ok(())),
        ("é".repeat(64), Ok(())), // 64 characters, 128 bytes
        ("thing with spaces/and:punctuation".into(), Ok(())),
        (
            String::new(),
            arg("the CSR's common name must be 1 to 64 characters, not 0"),
        ),
        (
            "x".repeat(65),
            arg("the CSR's common name must be 1 to 64 characters, not 65"),
        ),
        (
            "é".repeat(65),
            arg("the CSR's common name must be 1 to 64 characters, not 65"),
        ),
        (
            "a\0b".into(),
            arg("the CSR's common name must not contain NUL"),
        ),
    ];
    for (cn, want) in rows {
        let got = key.csr_pem(&cn).map(|csr| check_csr_pem(&csr).unwrap());
        assert_eq!(got, want, "{cn:?}");
    }
}

#[test]
fn device_key_from_pem_table() {
    let p256 = DeviceKey::generate(KeyType::P256).unwrap();
    let p384 = DeviceKey::generate(KeyType::P384).unwrap();
    let mut corrupt = der_of_key(p256.private_key_pem().expose());
    if let Some(last) = corrupt.last_mut() {
        *last ^= 1; // the public key no longer matches the private one
    }
    let corrupt = pem_block("PRIVATE KEY", &corrupt);
    let with_params = format!("{EC_PARAMS}{EC_PKCS8_KEY}");
    let rows: Vec<(&str, Result<KeyType, KeyError>)> = vec![
        (p256.private_key_pem().expose(), Ok(KeyType::P256)),
        (p384.private_key_pem().expose(), Ok(KeyType::P384)),
        (EC_PKCS8_KEY, Ok(KeyType::P256)),
        (&with_params, Ok(KeyType::P256)),
        (
            RSA_KEY,
            Err(unsupported(
                "PKCS#1 RSA keys cannot sign CSRs here; a PKCS#8 P-256 or P-384 key is needed",
            )),
        ),
        (
            EC_KEY,
            Err(unsupported(
                "SEC1 EC keys cannot sign CSRs here; a PKCS#8 P-256 or P-384 key is needed",
            )),
        ),
        (
            RSA_PKCS8_KEY,
            Err(unsupported(
                "RSA-2048 keys cannot sign CSRs here; P-256 and P-384 keys can",
            )),
        ),
        (
            ED25519_KEY,
            Err(unsupported(
                "Ed25519 keys cannot sign CSRs here; P-256 and P-384 keys can",
            )),
        ),
        (ENCRYPTED_PKCS8_KEY, Err(unsupported(ENCRYPTED))),
        ("", Err(invalid_pem(NO_KEY))),
        ("garbage", Err(invalid_pem(NO_KEY))),
        (RSA_CERT, Err(invalid_pem(NO_KEY))),
        (
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
            Err(invalid_key("the PKCS#8 key is not well-formed DER")),
        ),
        (
            &corrupt,
            Err(invalid_key(
                "the PKCS#8 key (P-256) is inconsistent or corrupt",
            )),
        ),
    ];
    for (pem, want) in rows {
        let got = DeviceKey::from_pem(pem);
        if let Ok(key) = &got {
            // Normalised to one PKCS#8 block, and usable.
            let text = key.private_key_pem().expose();
            assert!(
                text.starts_with("-----BEGIN PRIVATE KEY-----\n"),
                "{pem:.40}"
            );
            assert_eq!(text.matches("-----BEGIN").count(), 1);
            check_csr_pem(&key.csr_pem("x").unwrap()).unwrap();
        }
        if let Err(e) = &got {
            assert_no_key_material(&format!("{e} {e:?}"));
        }
        assert_eq!(got.map(|k| k.key_type()), want, "{pem:.40}");
    }
    // A key loaded from OpenSSL's PKCS#8 is the one in the OpenSSL certificate.
    let loaded = DeviceKey::from_pem(EC_PKCS8_KEY).unwrap();
    certificate_matches_key(EC_CERT, loaded.private_key_pem().expose()).unwrap();
}

#[test]
fn certificate_pem_table() {
    let chain = format!("{RSA_CERT}{EC_CERT}");
    let around = format!("subject=CN = rsa-test\n\n{RSA_CERT}\n# trailing comment\n");
    let with_key = format!("{EC_KEY}{EC_CERT}");
    let rsa_crlf = crlf(RSA_CERT);
    let truncated = &RSA_CERT[..RSA_CERT.len() / 2];
    let short_der = drop_middle_lines(RSA_CERT);
    let bad_char = RSA_CERT.replacen("MII", "M!I", 1);
    let bad_begin = RSA_CERT.replacen(
        "-----BEGIN CERTIFICATE-----",
        "-----BEGIN CERTIFICATE----",
        1,
    );
    let mut trailing = der_of_cert(RSA_CERT);
    trailing.extend_from_slice(&[0, 0]);
    let trailing = pem_block("CERTIFICATE", &trailing);
    let bad_second = format!("{RSA_CERT}{}", pem_block("CERTIFICATE", &[0x30, 0x00]));
    let csr_as_cert = pem_block("CERTIFICATE", &der_of_csr(RSA_CSR));
    let rows: Vec<(&str, Result<usize, KeyError>)> = vec![
        (RSA_CERT, Ok(1)),
        (EC_CERT, Ok(1)),
        (EC_P384_CERT, Ok(1)),
        (RSA_V1_CERT, Ok(1)),
        (&chain, Ok(2)),
        (&around, Ok(1)),
        (&with_key, Ok(1)),
        (&rsa_crlf, Ok(1)),
        ("", Err(invalid_pem(NO_CERT))),
        ("garbage", Err(invalid_pem(NO_CERT))),
        (RSA_CSR, Err(invalid_pem(NO_CERT))),
        (RSA_KEY, Err(invalid_pem(NO_CERT_BUT_KEY))),
        (EC_KEY, Err(invalid_pem(NO_CERT_BUT_KEY))),
        (RSA_PKCS8_KEY, Err(invalid_pem(NO_CERT_BUT_KEY))),
        (truncated, Err(invalid_pem(NO_END))),
        (&bad_char, Err(invalid_pem(BAD_BASE64))),
        (&bad_begin, Err(invalid_pem(BAD_BEGIN))),
        (&short_der, Err(invalid_cert(NOT_X509))),
        (&trailing, Err(invalid_cert(NOT_X509))),
        (&csr_as_cert, Err(invalid_cert(NOT_X509))),
        (
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
            Err(invalid_cert(NOT_X509)),
        ),
        (
            &bad_second,
            Err(invalid_cert(
                "certificate 2 of 2: not a well-formed X.509 certificate",
            )),
        ),
    ];
    for (pem, want) in rows {
        let got = parse_certificate_pem(pem);
        if let Err(e) = &got {
            assert_no_key_material(&format!("{e} {e:?}"));
        }
        assert_eq!(got.map(|c| c.len()), want, "{pem:.60}");
    }
    // The DER is returned in order.
    let certs = parse_certificate_pem(&chain).unwrap();
    assert_eq!(certs[0].as_ref(), der_of_cert(RSA_CERT));
    assert_eq!(certs[1].as_ref(), der_of_cert(EC_CERT));
}

#[test]
fn private_key_pem_table() {
    let p256 = DeviceKey::generate(KeyType::P256).unwrap();
    let p384 = DeviceKey::generate(KeyType::P384).unwrap();
    let ec_with_params = format!("{EC_PARAMS}{EC_KEY}");
    let cert_then_key = format!("{RSA_CERT}{RSA_KEY}");
    let rsa_crlf = crlf(RSA_KEY);
    let truncated = &RSA_KEY[..RSA_KEY.len() / 2];
    let short_der = drop_middle_lines(RSA_KEY);
    let bad_char = RSA_KEY.replacen("MII", "M!I", 1);
    // Structurally fine, mathematically wrong: an even modulus; a public point off the curve.
    let mut rsa_bad = der_of_key(RSA_KEY);
    if let Some(b) = rsa_bad.get_mut(4 + 3 + 4 + 1 + 255) {
        *b ^= 1;
    }
    let rsa_bad = pem_block("RSA PRIVATE KEY", &rsa_bad);
    let mut ec_bad = der_of_key(EC_KEY);
    if let Some(b) = ec_bad.last_mut() {
        *b ^= 1;
    }
    let ec_bad = pem_block("EC PRIVATE KEY", &ec_bad);
    let unknown_alg = pem_block(
        "PRIVATE KEY",
        // PrivateKeyInfo { 0, { OID 1.2.3 }, OCTET STRING {} }
        &[
            0x30, 0x0b, 0x02, 0x01, 0x00, 0x30, 0x04, 0x06, 0x02, 0x2a, 0x03, 0x04, 0x00,
        ],
    );
    let rows: Vec<(&str, Result<&str, KeyError>)> = vec![
        (RSA_KEY, Ok("PKCS#1 RSA")),
        (&rsa_crlf, Ok("PKCS#1 RSA")),
        (&cert_then_key, Ok("PKCS#1 RSA")),
        (RSA_PKCS8_KEY, Ok("PKCS#8")),
        (EC_KEY, Ok("SEC1 EC")),
        (&ec_with_params, Ok("SEC1 EC")),
        (EC_P384_KEY, Ok("SEC1 EC")),
        (EC_PKCS8_KEY, Ok("PKCS#8")),
        (p256.private_key_pem().expose(), Ok("PKCS#8")),
        (p384.private_key_pem().expose(), Ok("PKCS#8")),
        (ED25519_KEY, Ok("PKCS#8")),
        (
            EC_P521_KEY,
            Err(unsupported(
                "P-521 keys are not supported (P-256 and P-384 are)",
            )),
        ),
        (
            EC_SECP256K1_KEY,
            Err(unsupported(
                "secp256k1 keys are not supported (P-256 and P-384 are)",
            )),
        ),
        (ED448_KEY, Err(unsupported("Ed448 keys are not supported"))),
        (
            RSA_1024_KEY,
            Err(unsupported(
                "1024-bit RSA keys are not supported (2048 to 4096 bits are)",
            )),
        ),
        (
            &unknown_alg,
            Err(unsupported(
                "the PKCS#8 key's algorithm is not supported (RSA, P-256, P-384 and Ed25519 are)",
            )),
        ),
        (ENCRYPTED_PKCS8_KEY, Err(unsupported(ENCRYPTED))),
        (ENCRYPTED_LEGACY_KEY, Err(unsupported(ENCRYPTED))),
        ("", Err(invalid_pem(NO_KEY))),
        ("garbage", Err(invalid_pem(NO_KEY))),
        (RSA_CERT, Err(invalid_pem(NO_KEY))),
        (RSA_CSR, Err(invalid_pem(NO_KEY))),
        (EC_PARAMS, Err(invalid_pem(NO_KEY))),
        (truncated, Err(invalid_pem(NO_END))),
        (&bad_char, Err(invalid_pem(BAD_BASE64))),
        (
            &short_der,
            Err(invalid_key("the PKCS#1 RSA key is not well-formed DER")),
        ),
        (
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
            Err(invalid_key("the PKCS#8 key is not well-formed DER")),
        ),
        (
            "-----BEGIN EC PRIVATE KEY-----\nMAA=\n-----END EC PRIVATE KEY-----\n",
            Err(invalid_key("the SEC1 EC key is not well-formed DER")),
        ),
        (
            &rsa_bad,
            Err(invalid_key(
                "the PKCS#1 RSA key (RSA-2048) is inconsistent or corrupt",
            )),
        ),
        (
            &ec_bad,
            Err(invalid_key(
                "the SEC1 EC key (P-256) is inconsistent or corrupt",
            )),
        ),
    ];
    for (pem, want) in rows {
        let got = parse_private_key_pem(pem);
        if let Err(e) = &got {
            assert_no_key_material(&format!("{e} {e:?}"));
        }
        assert_eq!(
            got.as_ref().map(format_name),
            want.as_ref().copied(),
            "{pem:.60}"
        );
    }
}

#[test]
fn csr_pem_table() {
    let p256 = DeviceKey::generate(KeyType::P256)
        .unwrap()
        .csr_pem("a")
        .unwrap();
    let p384 = DeviceKey::generate(KeyType::P384)
        .unwrap()
        .csr_pem("b")
        .unwrap();
    let csr_crlf = crlf(RSA_CSR);
    let around = format!("Subject: CN=rsa-csr\n{RSA_CSR}\n");
    let two = format!("{p256}{p384}");
    let with_cert = format!("{RSA_CSR}{RSA_CERT}");
    let with_key = format!("{RSA_CSR}{RSA_KEY}");
    let key_first = format!("{EC_KEY}{RSA_CSR}");
    let truncated = &RSA_CSR[..RSA_CSR.len() / 2];
    let mut trailing = der_of_csr(RSA_CSR);
    trailing.push(0);
    let trailing = pem_block("CERTIFICATE REQUEST", &trailing);
    let cert_as_csr = pem_block("CERTIFICATE REQUEST", &der_of_cert(RSA_CERT));
    let csr = |der: &[u8]| pem_block("CERTIFICATE REQUEST", der);
    let empty_seq = csr(&[0x30, 0x00]);
    let no_signature = csr(&[0x30, 0x06, 0x30, 0x00, 0x30, 0x02, 0x06, 0x00]);
    let rows: Vec<(&str, Result<(), KeyError>)> = vec![
        (&p256, Ok(())),
        (&p384, Ok(())),
        (RSA_CSR, Ok(())),
        (&csr_crlf, Ok(())),
        (&around, Ok(())),
        ("", Err(invalid_pem(NO_CSR))),
        ("garbage", Err(invalid_pem(NO_CSR))),
        (RSA_CERT, Err(invalid_pem(NO_CSR))),
        (RSA_KEY, Err(invalid_csr(KEY_IN_CSR))),
        (EC_PKCS8_KEY, Err(invalid_csr(KEY_IN_CSR))),
        (&with_key, Err(invalid_csr(KEY_IN_CSR))),
        (&key_first, Err(invalid_csr(KEY_IN_CSR))),
        (&two, Err(invalid_csr("expected one PEM block, found 2"))),
        (
            &with_cert,
            Err(invalid_csr("expected one PEM block, found 2")),
        ),
        (truncated, Err(invalid_pem(NO_END))),
        (
            "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
            Err(invalid_csr("the CSR is not one DER SEQUENCE")),
        ),
        (
            &trailing,
            Err(invalid_csr("the CSR is not one DER SEQUENCE")),
        ),
        (
            &empty_seq,
            Err(invalid_csr(
                "the CSR has no CertificationRequestInfo SEQUENCE",
            )),
        ),
        (&no_signature, Err(invalid_csr("the CSR has no signature"))),
        (&cert_as_csr, Err(invalid_csr("the CSR has no version"))),
    ];
    for (pem, want) in rows {
        let got = check_csr_pem(pem);
        if let Err(e) = &got {
            assert_no_key_material(&format!("{e} {e:?}"));
        }
        assert_eq!(got, want, "{pem:.60}");
    }
}

#[test]
fn certificate_matches_key_table() {
    let p256 = DeviceKey::generate(KeyType::P256).unwrap();
    let p256_cert = self_signed(p256.private_key_pem().expose());
    let p384 = DeviceKey::generate(KeyType::P384).unwrap();
    let p384_cert = self_signed(p384.private_key_pem().expose());
    let ed_cert = self_signed(ED25519_KEY);
    let ec_params = format!("{EC_PARAMS}{EC_KEY}");
    let ec_first = format!("{EC_CERT}{RSA_CERT}");
    let rsa_first = format!("{RSA_CERT}{EC_CERT}");
    // (certificate, key, expected)
    let rows: Vec<(&str, &str, Result<(), KeyError>)> = vec![
        (RSA_CERT, RSA_KEY, Ok(())),
        (RSA_CERT, RSA_PKCS8_KEY, Ok(())),
        (EC_CERT, EC_KEY, Ok(())),
        (EC_CERT, &ec_params, Ok(())),
        (EC_CERT, EC_PKCS8_KEY, Ok(())),
        (EC_P384_CERT, EC_P384_KEY, Ok(())),
        (&p256_cert, p256.private_key_pem().expose(), Ok(())),
        (&p384_cert, p384.private_key_pem().expose(), Ok(())),
        (&ed_cert, ED25519_KEY, Ok(())),
        (&ec_first, EC_KEY, Ok(())), // the first certificate is the device's
        (&rsa_first, EC_KEY, Err(KeyError::Mismatch)),
        (RSA_CERT, EC_KEY, Err(KeyError::Mismatch)),
        (RSA_CERT, EC_PKCS8_KEY, Err(KeyError::Mismatch)),
        (EC_CERT, RSA_KEY, Err(KeyError::Mismatch)),
        (EC_CERT, RSA_PKCS8_KEY, Err(KeyError::Mismatch)),
        (EC_CERT, EC_P384_KEY, Err(KeyError::Mismatch)),
        (EC_P384_CERT, EC_KEY, Err(KeyError::Mismatch)),
        (&p256_cert, EC_KEY, Err(KeyError::Mismatch)),
        (&p256_cert, EC_PKCS8_KEY, Err(KeyError::Mismatch)),
        (
            &p384_cert,
            p256.private_key_pem().expose(),
            Err(KeyError::Mismatch),
        ),
        (&ed_cert, EC_KEY, Err(KeyError::Mismatch)),
        ("", RSA_KEY, Err(invalid_pem(NO_CERT))),
        (RSA_KEY, RSA_CERT, Err(invalid_pem(NO_CERT_BUT_KEY))),
        (RSA_CERT, "", Err(invalid_pem(NO_KEY))),
        (
            RSA_CERT,
            RSA_1024_KEY,
            Err(unsupported(
                "1024-bit RSA keys are not supported (2048 to 4096 bits are)",
            )),
        ),
        (RSA_CERT, ENCRYPTED_LEGACY_KEY, Err(unsupported(ENCRYPTED))),
        (
            RSA_V1_CERT,
            RSA_KEY,
            Err(invalid_cert(
                "the certificate cannot be a device certificate (UnsupportedCertVersion)",
            )),
        ),
    ];
    for (cert, key, want) in rows {
        let got = certificate_matches_key(cert, key);
        if let Err(e) = &got {
            assert_no_key_material(&format!("{e} {e:?}"));
        }
        assert_eq!(got, want, "{cert:.40} / {key:.40}");
    }
}

#[test]
fn certificate_id_table() {
    let ec_first = format!("{EC_CERT}{RSA_CERT}");
    let rows: Vec<(&str, Result<&str, KeyError>)> = vec![
        (RSA_CERT, Ok(RSA_CERT_ID)),
        (EC_CERT, Ok(EC_CERT_ID)),
        (EC_P384_CERT, Ok(EC_P384_CERT_ID)),
        (RSA_V1_CERT, Ok(RSA_V1_CERT_ID)),
        (&ec_first, Ok(EC_CERT_ID)),
        ("", Err(invalid_pem(NO_CERT))),
        (RSA_KEY, Err(invalid_pem(NO_CERT_BUT_KEY))),
        (
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
            Err(invalid_cert(NOT_X509)),
        ),
    ];
    for (pem, want) in rows {
        assert_eq!(certificate_id(pem), want.map(str::to_string), "{pem:.40}");
    }
}

#[test]
fn debug_and_errors_never_show_key_material() {
    for kind in [KeyType::P256, KeyType::P384] {
        let key = DeviceKey::generate(kind).unwrap();
        for text in [format!("{key:?}"), format!("{key:#?}")] {
            assert!(!text.contains("PRIVATE KEY"), "{text}");
            for line in key.private_key_pem().expose().lines() {
                if !line.starts_with("-----") && line.len() >= 12 {
                    assert!(!text.contains(&line[..12]), "{text}");
                }
            }
        }
        assert_eq!(
            format!("{key:?}"),
            format!("DeviceKey({kind:?}, <redacted>)")
        );
    }
    // Every error variant, shown every way.
    for e in [
        invalid_pem("x"),
        invalid_cert("x"),
        invalid_key("x"),
        invalid_csr("x"),
        unsupported("x"),
        KeyError::Mismatch,
        KeyError::Generation("x".into()),
        KeyError::InvalidArgument("x".into()),
    ] {
        let shown = format!("{e} {e:?}");
        assert_no_key_material(&shown);
        assert!(!e.to_string().is_empty());
    }
    // Errors from each private key vector with its PEM damaged in various ways.
    for key in ALL_KEYS {
        for damaged in [
            key[..key.len() / 2].to_string(),
            drop_middle_lines(key),
            key.replacen('A', "!", 1),
            key.replace("PRIVATE KEY", "CERTIFICATE"),
            key.replace("PRIVATE KEY", "CERTIFICATE REQUEST"),
        ] {
            let errors = [
                parse_private_key_pem(&damaged).err(),
                DeviceKey::from_pem(&damaged).err(),
                parse_certificate_pem(&damaged).err(),
                check_csr_pem(&damaged).err(),
                certificate_matches_key(RSA_CERT, &damaged).err(),
            ];
            for e in errors.into_iter().flatten() {
                assert_no_key_material(&format!("{e} {e:?}"));
            }
        }
    }
}
