//! A minimal, bounds-checked DER reader: enough to say what kind of private key a caller gave us
//! (for clear error messages) and to check the outline of a CSR. It never panics on any input,
//! never copies bytes, and its results say nothing secret: an algorithm, a curve, a bit length.

const SEQUENCE: u8 = 0x30;
const INTEGER: u8 = 0x02;
const BIT_STRING: u8 = 0x03;
const OCTET_STRING: u8 = 0x04;
const OID: u8 = 0x06;
/// `[0]`, constructed: SEC1's curve parameters, a CSR's attributes.
const CONTEXT_0: u8 = 0xa0;

// Object identifiers, as the contents of their DER encoding.
/// 1.2.840.113549.1.1.1
const OID_RSA_ENCRYPTION: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];
/// 1.2.840.113549.1.1.10
const OID_RSASSA_PSS: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0a];
/// 1.2.840.10045.2.1
const OID_EC_PUBLIC_KEY: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
/// 1.2.840.10045.3.1.7 (prime256v1, secp256r1)
const OID_P256: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
/// 1.3.132.0.34 (secp384r1)
const OID_P384: &[u8] = &[0x2b, 0x81, 0x04, 0x00, 0x22];
/// 1.3.132.0.35 (secp521r1)
const OID_P521: &[u8] = &[0x2b, 0x81, 0x04, 0x00, 0x23];
/// 1.3.132.0.10 (secp256k1, the Bitcoin curve; some secure elements offer it)
const OID_SECP256K1: &[u8] = &[0x2b, 0x81, 0x04, 0x00, 0x0a];
/// 1.3.101.112
const OID_ED25519: &[u8] = &[0x2b, 0x65, 0x70];
/// 1.3.101.113
const OID_ED448: &[u8] = &[0x2b, 0x65, 0x71];

/// What a private key is, as far as its encoding tells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Algorithm {
    /// RSA with a modulus of this many bits.
    Rsa {
        bits: usize,
    },
    /// ECDSA on this curve.
    Ec(Curve),
    Ed25519,
    Ed448,
    /// An algorithm identifier we do not know.
    Unknown,
}

/// An elliptic curve named in a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Curve {
    P256,
    P384,
    P521,
    Secp256k1,
    /// Some other named curve (brainpool, ...).
    Other,
    /// The key does not name its curve (SEC1 keys may leave it to the context).
    Unnamed,
}

impl Algorithm {
    /// A short human name: "RSA-2048", "P-256", "Ed25519".
    pub(super) fn name(self) -> String {
        match self {
            Algorithm::Rsa { bits } => format!("RSA-{bits}"),
            Algorithm::Ec(Curve::P256) => "P-256".into(),
            Algorithm::Ec(Curve::P384) => "P-384".into(),
            Algorithm::Ec(Curve::P521) => "P-521".into(),
            Algorithm::Ec(Curve::Secp256k1) => "secp256k1".into(),
            Algorithm::Ec(Curve::Other) => "elliptic-curve (unsupported curve)".into(),
            Algorithm::Ec(Curve::Unnamed) => "elliptic-curve".into(),
            Algorithm::Ed25519 => "Ed25519".into(),
            Algorithm::Ed448 => "Ed448".into(),
            Algorithm::Unknown => "unknown-algorithm".into(),
        }
    }
}

/// Reads one element that must have tag `tag`: its contents and the input after it.
/// Only definite, minimal lengths of up to four bytes are accepted (that is DER).
fn read(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    let (&found, rest) = input.split_first()?;
    if found != tag {
        return None;
    }
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let count = usize::from(first & 0x7f);
        // 0 is BER's indefinite length; more than 4 bytes is more than 4 GiB.
        if count == 0 || count > 4 {
            return None;
        }
        if rest.len() < count {
            return None;
        }
        let (bytes, rest) = rest.split_at(count);
        if bytes.first() == Some(&0) {
            return None; // not minimal
        }
        let len = bytes.iter().fold(0u64, |acc, &b| (acc << 8) | u64::from(b));
        if len < 0x80 {
            return None; // not minimal
        }
        (usize::try_from(len).ok()?, rest)
    };
    (rest.len() >= len).then(|| rest.split_at(len))
}

/// The contents of the one element with tag `tag` that makes up all of `input`.
fn only(input: &[u8], tag: u8) -> Option<&[u8]> {
    match read(input, tag)? {
        (contents, []) => Some(contents),
        _ => None,
    }
}

/// The number of significant bits of a DER INTEGER's contents (read as unsigned).
fn bit_length(int: &[u8]) -> usize {
    let mut rest = int;
    while let [0, tail @ ..] = rest {
        rest = tail;
    }
    match rest.first() {
        None => 0,
        Some(&b) => (rest.len() - 1)
            .saturating_mul(8)
            .saturating_add(8 - b.leading_zeros() as usize),
    }
}

fn curve(oid: &[u8]) -> Curve {
    match oid {
        OID_P256 => Curve::P256,
        OID_P384 => Curve::P384,
        OID_P521 => Curve::P521,
        OID_SECP256K1 => Curve::Secp256k1,
        _ => Curve::Other,
    }
}

/// PKCS#1 `RSAPrivateKey ::= SEQUENCE { version, modulus, ... }`: the modulus size in bits.
pub(super) fn pkcs1_rsa_bits(der: &[u8]) -> Option<usize> {
    let body = only(der, SEQUENCE)?;
    let (_version, rest) = read(body, INTEGER)?;
    let (modulus, _) = read(rest, INTEGER)?;
    Some(bit_length(modulus))
}

/// SEC1 `ECPrivateKey ::= SEQUENCE { version, privateKey, [0] parameters OPTIONAL, ... }`:
/// the curve.
pub(super) fn sec1_curve(der: &[u8]) -> Option<Curve> {
    let body = only(der, SEQUENCE)?;
    let (_version, rest) = read(body, INTEGER)?;
    let (_key, rest) = read(rest, OCTET_STRING)?;
    match read(rest, CONTEXT_0) {
        Some((params, _)) => Some(only(params, OID).map_or(Curve::Other, curve)),
        None => Some(Curve::Unnamed),
    }
}

/// X.509 `SubjectPublicKeyInfo ::= SEQUENCE { AlgorithmIdentifier, BIT STRING }` of an EC key:
/// its curve and its uncompressed point (`04 || X || Y`).
pub(super) fn ec_spki(der: &[u8]) -> Option<(Curve, &[u8])> {
    let body = only(der, SEQUENCE)?;
    let (algorithm_id, rest) = read(body, SEQUENCE)?;
    let (key_bits, []) = read(rest, BIT_STRING)? else {
        return None;
    };
    let (oid, params) = read(algorithm_id, OID)?;
    if oid != OID_EC_PUBLIC_KEY {
        return None;
    }
    let named = only(params, OID).map_or(Curve::Unnamed, curve);
    match key_bits {
        [0, point @ ..] => Some((named, point)),
        _ => None,
    }
}

/// X.509 `SubjectPublicKeyInfo` of any key: its algorithm (an RSA key's modulus size, an EC
/// key's curve) and the key itself: the uncompressed point of an EC key, the PKCS#1
/// `RSAPublicKey` of an RSA key (what ring's verifiers take).
pub(super) fn spki_key(der: &[u8]) -> Option<(Algorithm, &[u8])> {
    let body = only(der, SEQUENCE)?;
    let (algorithm_id, rest) = read(body, SEQUENCE)?;
    let (key_bits, []) = read(rest, BIT_STRING)? else {
        return None;
    };
    let [0, key @ ..] = key_bits else {
        return None;
    };
    let (oid, params) = read(algorithm_id, OID)?;
    let algorithm = match oid {
        OID_RSA_ENCRYPTION => {
            let body = only(key, SEQUENCE)?;
            let (modulus, rest) = read(body, INTEGER)?;
            let (_exponent, []) = read(rest, INTEGER)? else {
                return None;
            };
            Algorithm::Rsa {
                bits: bit_length(modulus),
            }
        }
        OID_EC_PUBLIC_KEY => Algorithm::Ec(only(params, OID).map_or(Curve::Unnamed, curve)),
        OID_ED25519 => Algorithm::Ed25519,
        OID_ED448 => Algorithm::Ed448,
        _ => Algorithm::Unknown,
    };
    Some((algorithm, key))
}

/// PKCS#8 `PrivateKeyInfo ::= SEQUENCE { version, AlgorithmIdentifier, privateKey, ... }`:
/// the algorithm (and for RSA the modulus size, read from the wrapped PKCS#1 key).
pub(super) fn pkcs8_algorithm(der: &[u8]) -> Option<Algorithm> {
    let body = only(der, SEQUENCE)?;
    let (_version, rest) = read(body, INTEGER)?;
    let (algorithm_id, rest) = read(rest, SEQUENCE)?;
    let (private_key, _) = read(rest, OCTET_STRING)?;
    let (oid, params) = read(algorithm_id, OID)?;
    Some(match oid {
        OID_RSA_ENCRYPTION | OID_RSASSA_PSS => Algorithm::Rsa {
            bits: pkcs1_rsa_bits(private_key)?,
        },
        OID_EC_PUBLIC_KEY => Algorithm::Ec(only(params, OID).map_or(Curve::Other, curve)),
        OID_ED25519 => Algorithm::Ed25519,
        OID_ED448 => Algorithm::Ed448,
        _ => Algorithm::Unknown,
    })
}

/// The contents of a CSR's public key BIT STRING (the unused-bits byte, then the key): the
/// bytes a certificate for the same key carries verbatim in its SubjectPublicKeyInfo.
pub(super) fn csr_public_key_bits(der: &[u8]) -> Option<&[u8]> {
    let body = only(der, SEQUENCE)?;
    let (info, _) = read(body, SEQUENCE)?;
    let (_version, rest) = read(info, INTEGER)?;
    let (_subject, rest) = read(rest, SEQUENCE)?;
    let (spki, _) = read(rest, SEQUENCE)?;
    let (_algorithm, public_key) = read(spki, SEQUENCE)?;
    only(public_key, BIT_STRING)
}

/// Checks the outline of a PKCS#10 CSR (RFC 2986) without verifying its signature:
/// `SEQUENCE { CertificationRequestInfo, AlgorithmIdentifier, BIT STRING }` spanning all of
/// `der`, where the request info is `SEQUENCE { INTEGER 0, Name, SubjectPublicKeyInfo,
/// [0] attributes }`. The error says which part is wrong.
pub(super) fn check_csr_outline(der: &[u8]) -> Result<(), &'static str> {
    let body = only(der, SEQUENCE).ok_or("the CSR is not one DER SEQUENCE")?;
    let (info, rest) =
        read(body, SEQUENCE).ok_or("the CSR has no CertificationRequestInfo SEQUENCE")?;
    let (signature_algorithm, rest) =
        read(rest, SEQUENCE).ok_or("the CSR has no signature algorithm")?;
    let (signature, rest) = read(rest, BIT_STRING).ok_or("the CSR has no signature")?;
    if !rest.is_empty() {
        return Err("the CSR has data after its signature");
    }
    read(signature_algorithm, OID).ok_or("the CSR's signature algorithm has no identifier")?;
    if signature.len() < 2 {
        return Err("the CSR's signature is empty");
    }

    let (version, rest) = read(info, INTEGER).ok_or("the CSR has no version")?;
    if version != [0] {
        return Err("the CSR's version is not 1");
    }
    let (_subject, rest) = read(rest, SEQUENCE).ok_or("the CSR has no subject name")?;
    let (spki, rest) = read(rest, SEQUENCE).ok_or("the CSR has no public key")?;
    let (_algorithm, public_key) =
        read(spki, SEQUENCE).ok_or("the CSR's public key has no algorithm")?;
    only(public_key, BIT_STRING).ok_or("the CSR's public key is malformed")?;
    match read(rest, CONTEXT_0) {
        Some((_attributes, [])) => Ok(()),
        Some(_) => Err("the CSR's request info has data after its attributes"),
        None => Err("the CSR has no attributes field"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (input, tag, expected contents and rest)
    type ReadRow<'a> = (&'a [u8], u8, Option<(&'a [u8], &'a [u8])>);

    #[test]
    fn read_table() {
        let long = [vec![0x04, 0x81, 0x80], vec![7; 0x80]].concat();
        let rows: Vec<ReadRow<'_>> = vec![
            (&[], SEQUENCE, None),
            (&[0x30], SEQUENCE, None),
            (&[0x30, 0x00], SEQUENCE, Some((&[], &[]))),
            (&[0x30, 0x00, 0x01], SEQUENCE, Some((&[], &[0x01]))),
            (&[0x30, 0x01, 0x05], SEQUENCE, Some((&[0x05], &[]))),
            (&[0x30, 0x02, 0x05], SEQUENCE, None), // length past the end
            (&[0x02, 0x00], SEQUENCE, None),       // wrong tag
            (&[0x30, 0x80, 0x00, 0x00], SEQUENCE, None), // indefinite length
            (&[0x30, 0x81, 0x01, 0x00], SEQUENCE, None), // long form for a short length
            (&[0x30, 0x82, 0x00, 0x80], SEQUENCE, None), // leading zero length byte
            (&[0x30, 0x85, 1, 1, 1, 1, 1], SEQUENCE, None), // 5 length bytes
            (&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff], SEQUENCE, None), // 4 GiB claimed
            (&long, OCTET_STRING, Some((&long[3..], &[]))),
        ];
        for (input, tag, want) in rows {
            assert_eq!(read(input, tag), want, "{input:02x?}");
        }
    }

    #[test]
    fn bit_lengths() {
        for (int, bits) in [
            (&[][..], 0),
            (&[0][..], 0),
            (&[1][..], 1),
            (&[0x00, 0x80][..], 8),
            (&[0x01, 0x00][..], 9),
            (&[0x00, 0x00, 0xff, 0xff][..], 16),
        ] {
            assert_eq!(bit_length(int), bits, "{int:02x?}");
        }
    }

    #[test]
    fn never_panics_on_prefixes_or_garbage() {
        // A well-formed CSR outline, then every prefix of it, then noise.
        let csr = [
            0x30, 0x1a, // CSR
            0x30, 0x10, // info
            0x02, 0x01, 0x00, // version
            0x30, 0x00, // subject
            0x30, 0x07, 0x30, 0x02, 0x06, 0x00, 0x03, 0x01, 0x00, // spki
            0xa0, 0x00, // attributes
            0x30, 0x02, 0x06, 0x00, // signature algorithm
            0x03, 0x02, 0x00, 0x01, // signature
        ];
        assert_eq!(check_csr_outline(&csr), Ok(()));
        for n in 0..csr.len() {
            assert!(check_csr_outline(&csr[..n]).is_err(), "prefix {n}");
            let _ = pkcs8_algorithm(&csr[..n]);
            let _ = sec1_curve(&csr[..n]);
            let _ = pkcs1_rsa_bits(&csr[..n]);
        }
        let mut x: u32 = 0x1234_5678;
        for round in 0..4000 {
            let mut bytes: Vec<u8> = (0..64)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    x.to_le_bytes()[0]
                })
                .collect();
            if round % 2 == 0 {
                // A SEQUENCE spanning the rest, so the readers go deeper than the first byte.
                bytes[0] = SEQUENCE;
                bytes[1] = 62;
            }
            let _ = check_csr_outline(&bytes);
            let _ = pkcs8_algorithm(&bytes);
            let _ = sec1_curve(&bytes);
            let _ = pkcs1_rsa_bits(&bytes);
        }
    }
}
