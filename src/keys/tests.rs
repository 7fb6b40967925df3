//! Key, CSR and PEM checks. The RSA (PKCS#1) and EC (SEC1) vectors in testdata/ were made with
//! `openssl genrsa -traditional 2048`, `openssl ecparam -genkey -noout` and `openssl req -x509`;
//! they are test keys, used nowhere else.

use super::*;

const RSA_KEY: &str = include_str!("testdata/rsa.key");
const RSA_CERT: &str = include_str!("testdata/rsa.pem");
const EC_KEY: &str = include_str!("testdata/ec.key");
const EC_CERT: &str = include_str!("testdata/ec.pem");
/// `openssl x509 -in rsa.pem -outform der | sha256sum`
const RSA_CERT_ID: &str = "fa27b7bd9cc86ecae72333e2a8676a6a0c9bd9cef01ef9d680fd624d7b46440f";

fn self_signed(key: &DeviceKey) -> String {
    let pair = rcgen::KeyPair::from_pem(key.private_key_pem().expose()).unwrap();
    rcgen::CertificateParams::new(vec!["d".to_string()])
        .unwrap()
        .self_signed(&pair)
        .unwrap()
        .pem()
}

#[test]
fn generated_keys_make_csrs_and_match_their_certificates() {
    for kind in [KeyType::P256, KeyType::P384] {
        let key = DeviceKey::generate(kind).unwrap();
        assert!(
            key.private_key_pem()
                .expose()
                .starts_with("-----BEGIN PRIVATE KEY-----")
        );
        let csr = key.csr_pem("device-1").unwrap();
        check_csr_pem(&csr).unwrap();
        let cert = self_signed(&key);
        certificate_matches_key(&cert, key.private_key_pem().expose()).unwrap();
        let reloaded = DeviceKey::from_pem(key.private_key_pem().expose()).unwrap();
        assert_eq!(reloaded.private_key_pem(), key.private_key_pem());
        let other = DeviceKey::generate(kind).unwrap();
        assert_eq!(
            certificate_matches_key(&cert, other.private_key_pem().expose()),
            Err(KeyError::Mismatch)
        );
        assert!(!format!("{key:?}").contains("PRIVATE"));
    }
}

#[test]
fn csr_common_names() {
    let key = DeviceKey::generate(KeyType::P256).unwrap();
    for (cn, ok) in [
        ("a", true),
        (&*"x".repeat(64), true),
        ("", false),
        (&*"x".repeat(65), false),
        ("a\0b", false),
    ] {
        assert_eq!(key.csr_pem(cn).is_ok(), ok, "{cn:?}");
    }
}

#[test]
fn matching_across_key_formats() {
    // (certificate, key, matches)
    let p8 = DeviceKey::generate(KeyType::P256).unwrap();
    let p8_cert = self_signed(&p8);
    let rows = [
        (RSA_CERT, RSA_KEY, Ok(())),
        (EC_CERT, EC_KEY, Ok(())),
        (p8_cert.as_str(), p8.private_key_pem().expose(), Ok(())),
        (RSA_CERT, EC_KEY, Err(KeyError::Mismatch)),
        (EC_CERT, RSA_KEY, Err(KeyError::Mismatch)),
        (p8_cert.as_str(), EC_KEY, Err(KeyError::Mismatch)),
    ];
    for (cert, key, want) in rows {
        assert_eq!(certificate_matches_key(cert, key), want);
    }
}

#[test]
fn certificate_pem_table() {
    let chain = format!("{RSA_CERT}{EC_CERT}");
    let truncated = &RSA_CERT[..RSA_CERT.len() / 2];
    let corrupt = RSA_CERT.replacen("MII", "MIJ", 1);
    let rows: Vec<(&str, Result<usize, ()>)> = vec![
        (RSA_CERT, Ok(1)),
        (&chain, Ok(2)),
        ("", Err(())),
        ("garbage", Err(())),
        (RSA_KEY, Err(())),
        (truncated, Err(())),
        (&corrupt, Err(())),
        (
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
            Err(()),
        ),
    ];
    for (pem, want) in rows {
        assert_eq!(
            parse_certificate_pem(pem).map(|c| c.len()).map_err(|_| ()),
            want,
            "{pem:.40}"
        );
    }
}

#[test]
fn private_key_pem_table() {
    let p8 = DeviceKey::generate(KeyType::P384).unwrap();
    let rows: Vec<(&str, bool)> = vec![
        (RSA_KEY, true),
        (EC_KEY, true),
        (p8.private_key_pem().expose(), true),
        ("", false),
        ("garbage", false),
        (RSA_CERT, false),
        (
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
            false,
        ),
        (&RSA_KEY[..RSA_KEY.len() / 2], false),
    ];
    for (pem, ok) in rows {
        let got = parse_private_key_pem(pem);
        assert_eq!(got.is_ok(), ok, "{pem:.40}");
        if let Err(e) = got {
            // The error never quotes the key.
            assert!(!e.to_string().contains("MII"), "{e}");
        }
    }
    // DeviceKey only takes what it can sign CSRs with.
    assert!(DeviceKey::from_pem(RSA_KEY).is_err());
    assert!(DeviceKey::from_pem("").is_err());
}

#[test]
fn csr_pem_table() {
    let csr = DeviceKey::generate(KeyType::P256)
        .unwrap()
        .csr_pem("x")
        .unwrap();
    let rows: Vec<(&str, bool)> = vec![
        (&csr, true),
        ("", false),
        ("garbage", false),
        (RSA_CERT, false),
        (
            "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
            false,
        ),
    ];
    for (pem, ok) in rows {
        assert_eq!(check_csr_pem(pem).is_ok(), ok, "{pem:.40}");
    }
}

#[test]
fn certificate_ids() {
    assert_eq!(certificate_id(RSA_CERT).unwrap(), RSA_CERT_ID);
    assert!(certificate_id("").is_err());
}
