//! Request payloads out, reply payloads in, in JSON or CBOR.
//!
//! Replies are decoded into typed structs; unknown fields are ignored (AWS may add some), missing
//! or mistyped required fields are a [`DecodeError`]. Error texts name the field, never its
//! value, so a private key or token cannot leak through them.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::error::ServiceError;
use super::topics::{Api, Format};
use crate::secret::Secret;

/// A reply that is not what the API promises.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError {
    /// Which reply (e.g. `CreateKeysAndCertificate accepted`).
    pub what: String,
    /// What is wrong with it (never the payload's content).
    pub reason: String,
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "malformed {} reply: {}", self.what, self.reason)
    }
}

impl std::error::Error for DecodeError {}

fn encode<T: Serialize>(format: Format, value: &T) -> Vec<u8> {
    match format {
        // Serializing plain structs of strings cannot fail.
        Format::Json => serde_json::to_vec(value).unwrap_or_default(),
        Format::Cbor => {
            let mut out = Vec::new();
            let _ = ciborium::ser::into_writer(value, &mut out);
            out
        }
    }
}

fn decode<T: DeserializeOwned>(
    format: Format,
    payload: &[u8],
    what: &str,
) -> Result<T, DecodeError> {
    let fail = |reason: String| DecodeError {
        what: what.to_owned(),
        reason,
    };
    match format {
        Format::Json => serde_json::from_slice(payload).map_err(|e| {
            let kind = match e.classify() {
                serde_json::error::Category::Io => "unreadable",
                serde_json::error::Category::Syntax => "invalid JSON",
                serde_json::error::Category::Eof => "truncated JSON",
                serde_json::error::Category::Data => "missing field or wrong type",
            };
            fail(format!("{kind} at line {} column {}", e.line(), e.column()))
        }),
        Format::Cbor => {
            let mut rest = payload;
            let value = ciborium::de::from_reader(&mut rest).map_err(|e| {
                fail(match e {
                    ciborium::de::Error::Io(_) => "truncated CBOR".to_owned(),
                    ciborium::de::Error::Syntax(at) => format!("invalid CBOR at byte {at}"),
                    ciborium::de::Error::Semantic(Some(at), _) => {
                        format!("missing field or wrong type at byte {at}")
                    }
                    ciborium::de::Error::Semantic(None, _) => "missing field or wrong type".into(),
                    ciborium::de::Error::RecursionLimitExceeded => "nested too deeply".into(),
                })
            })?;
            if !rest.is_empty() {
                return Err(fail(format!("{} bytes after the CBOR item", rest.len())));
            }
            Ok(value)
        }
    }
}

/// CreateKeysAndCertificate request: an empty map (`{}` / CBOR `a0`).
pub fn encode_create_keys_request(format: Format) -> Vec<u8> {
    encode(format, &BTreeMap::<String, String>::new())
}

/// CreateCertificateFromCsr request.
pub fn encode_csr_request(format: Format, csr_pem: &str) -> Vec<u8> {
    #[derive(Serialize)]
    struct Req<'a> {
        #[serde(rename = "certificateSigningRequest")]
        csr: &'a str,
    }
    encode(format, &Req { csr: csr_pem })
}

/// RegisterThing request. The payload holds the ownership token, so it is wiped on drop.
pub fn encode_register_request(
    format: Format,
    token: &Secret,
    parameters: &BTreeMap<String, String>,
) -> Zeroizing<Vec<u8>> {
    #[derive(Serialize)]
    struct Req<'a> {
        #[serde(rename = "certificateOwnershipToken")]
        token: &'a str,
        parameters: &'a BTreeMap<String, String>,
    }
    Zeroizing::new(encode(
        format,
        &Req {
            token: token.expose(),
            parameters,
        },
    ))
}

/// The accepted reply of either certificate API.
#[derive(Debug, Clone, PartialEq)]
pub struct CreatedCertificate {
    pub certificate_id: String,
    pub certificate_pem: String,
    /// Only from CreateKeysAndCertificate.
    pub private_key: Option<Secret>,
    pub ownership_token: Secret,
}

#[derive(Deserialize)]
struct CertReply {
    #[serde(rename = "certificateId")]
    certificate_id: String,
    #[serde(rename = "certificatePem")]
    certificate_pem: String,
    #[serde(rename = "privateKey", default)]
    private_key: Option<String>,
    #[serde(rename = "certificateOwnershipToken")]
    token: String,
}

/// Decodes the accepted reply of `api` (one of the certificate APIs).
pub fn decode_certificate_reply(
    api: &Api,
    format: Format,
    payload: &[u8],
) -> Result<CreatedCertificate, DecodeError> {
    let what = format!("{} accepted", api.name());
    let r: CertReply = decode(format, payload, &what)?;
    // Move the secrets into wiping containers straight away.
    let token = Secret::new(r.token);
    let private_key = r.private_key.map(Secret::new);
    let fail = |reason: &str| DecodeError {
        what: what.clone(),
        reason: reason.to_owned(),
    };
    if r.certificate_id.is_empty() || !r.certificate_id.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err(fail("certificateId is empty or not an identifier"));
    }
    if !r.certificate_pem.contains("-----BEGIN CERTIFICATE-----") {
        return Err(fail("certificatePem is not a PEM certificate"));
    }
    if token.is_empty() {
        return Err(fail("certificateOwnershipToken is empty"));
    }
    match (api, &private_key) {
        (Api::CreateKeysAndCertificate, None) => return Err(fail("privateKey is missing")),
        (Api::CreateKeysAndCertificate, Some(k)) if !k.expose().contains("PRIVATE KEY-----") => {
            return Err(fail("privateKey is not a PEM private key"));
        }
        _ => {}
    }
    Ok(CreatedCertificate {
        certificate_id: r.certificate_id,
        certificate_pem: r.certificate_pem,
        private_key: match api {
            Api::CreateKeysAndCertificate => private_key,
            _ => None,
        },
        ownership_token: token,
    })
}

/// The accepted reply of RegisterThing.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Registered {
    /// Absent when the template creates no thing.
    pub thing_name: Option<String>,
    pub device_configuration: BTreeMap<String, String>,
}

#[derive(Deserialize)]
struct RegisterReply {
    #[serde(rename = "thingName", default)]
    thing_name: Option<String>,
    #[serde(rename = "deviceConfiguration", default)]
    device_configuration: Option<BTreeMap<String, String>>,
}

/// Decodes RegisterThing's accepted reply.
pub fn decode_register_reply(format: Format, payload: &[u8]) -> Result<Registered, DecodeError> {
    let r: RegisterReply = decode(format, payload, "RegisterThing accepted")?;
    Ok(Registered {
        thing_name: r.thing_name,
        device_configuration: r.device_configuration.unwrap_or_default(),
    })
}

#[derive(Deserialize)]
struct Rejection {
    #[serde(rename = "statusCode")]
    status_code: u16,
    #[serde(rename = "errorCode", default)]
    error_code: String,
    #[serde(rename = "errorMessage", default)]
    error_message: String,
}

/// Decodes a `/rejected` payload of `api`.
pub fn decode_rejection(
    api: &Api,
    format: Format,
    payload: &[u8],
) -> Result<ServiceError, DecodeError> {
    let r: Rejection = decode(format, payload, &format!("{} rejected", api.name()))?;
    Ok(ServiceError {
        status_code: r.status_code,
        error_code: r.error_code,
        error_message: r.error_message,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    const PEM: &str = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
    const KEY: &str = "-----BEGIN RSA PRIVATE KEY-----\nMIIE\n-----END RSA PRIVATE KEY-----\n";

    fn both(v: &Value) -> [(Format, Vec<u8>); 2] {
        let mut cbor = Vec::new();
        ciborium::ser::into_writer(v, &mut cbor).unwrap();
        [
            (Format::Json, serde_json::to_vec(v).unwrap()),
            (Format::Cbor, cbor),
        ]
    }

    fn as_value(format: Format, bytes: &[u8]) -> Value {
        match format {
            Format::Json => serde_json::from_slice(bytes).unwrap(),
            Format::Cbor => ciborium::de::from_reader(bytes).unwrap(),
        }
    }

    #[test]
    fn requests() {
        assert_eq!(encode_create_keys_request(Format::Json), b"{}");
        assert_eq!(encode_create_keys_request(Format::Cbor), vec![0xa0]);
        for format in [Format::Json, Format::Cbor] {
            let csr = encode_csr_request(format, "-----BEGIN CERTIFICATE REQUEST-----");
            assert_eq!(
                as_value(format, &csr),
                json!({"certificateSigningRequest": "-----BEGIN CERTIFICATE REQUEST-----"})
            );
            let params = BTreeMap::from([("SerialNumber".to_string(), "A1".to_string())]);
            let reg = encode_register_request(format, &Secret::new("tok".into()), &params);
            assert_eq!(
                as_value(format, &reg),
                json!({"certificateOwnershipToken": "tok", "parameters": {"SerialNumber": "A1"}})
            );
            let empty = encode_register_request(format, &Secret::new("t".into()), &BTreeMap::new());
            assert_eq!(
                as_value(format, &empty),
                json!({"certificateOwnershipToken": "t", "parameters": {}})
            );
        }
    }

    #[test]
    fn certificate_replies_table() {
        let good_keys = json!({"certificateId": "ab12", "certificatePem": PEM, "privateKey": KEY,
            "certificateOwnershipToken": "tok", "extra": {"nested": [1, 2]}});
        let good_csr = json!({"certificateId": "ab12", "certificatePem": PEM, "certificateOwnershipToken": "tok"});
        let keys = Api::CreateKeysAndCertificate;
        let csr = Api::CreateCertificateFromCsr;
        // (api, payload, Ok(has private key) | Err(reason fragment))
        let rows: Vec<(&Api, Value, Result<bool, &str>)> = vec![
            (&keys, good_keys.clone(), Ok(true)),
            (&csr, good_csr.clone(), Ok(false)),
            (&csr, good_keys.clone(), Ok(false)),
            (&keys, good_csr.clone(), Err("privateKey is missing")),
            (
                &keys,
                json!({"certificateId": "ab12", "certificatePem": PEM, "privateKey": "x", "certificateOwnershipToken": "t"}),
                Err("privateKey is not"),
            ),
            (
                &csr,
                json!({"certificatePem": PEM, "certificateOwnershipToken": "t"}),
                Err("missing field"),
            ),
            (
                &csr,
                json!({"certificateId": "ab12", "certificateOwnershipToken": "t"}),
                Err("missing field"),
            ),
            (
                &csr,
                json!({"certificateId": "ab12", "certificatePem": PEM}),
                Err("missing field"),
            ),
            (
                &csr,
                json!({"certificateId": 5, "certificatePem": PEM, "certificateOwnershipToken": "t"}),
                Err("wrong type"),
            ),
            (
                &csr,
                json!({"certificateId": "ab12", "certificatePem": PEM, "certificateOwnershipToken": 7}),
                Err("wrong type"),
            ),
            (
                &csr,
                json!({"certificateId": "", "certificatePem": PEM, "certificateOwnershipToken": "t"}),
                Err("certificateId"),
            ),
            (
                &csr,
                json!({"certificateId": "a/b", "certificatePem": PEM, "certificateOwnershipToken": "t"}),
                Err("certificateId"),
            ),
            (
                &csr,
                json!({"certificateId": "ab", "certificatePem": "junk", "certificateOwnershipToken": "t"}),
                Err("certificatePem"),
            ),
            (
                &csr,
                json!({"certificateId": "ab", "certificatePem": PEM, "certificateOwnershipToken": ""}),
                Err("empty"),
            ),
            (&csr, json!([1, 2]), Err("wrong type")),
            (&csr, json!("string"), Err("wrong type")),
            (&csr, json!(null), Err("wrong type")),
        ];
        for (api, value, want) in rows {
            for (format, bytes) in both(&value) {
                let got = decode_certificate_reply(api, format, &bytes);
                match (&got, want) {
                    (Ok(c), Ok(has_key)) => {
                        assert_eq!(c.private_key.is_some(), has_key, "{value}");
                        assert_eq!(c.ownership_token.expose(), "tok");
                    }
                    (Err(e), Err(fragment)) => {
                        assert!(e.reason.contains(fragment), "{value} {format:?}: {e}");
                        // Never the secret values.
                        assert!(!e.to_string().contains("tok") && !e.to_string().contains("MIIE"));
                    }
                    _ => panic!("{value} {format:?}: got {got:?}, want {want:?}"),
                }
            }
        }
    }

    #[test]
    fn undecodable_payloads_table() {
        let api = Api::CreateCertificateFromCsr;
        let [_, (_, mut trailing)] = both(
            &json!({"certificateId": "a", "certificatePem": PEM, "certificateOwnershipToken": "t"}),
        );
        trailing.push(0);
        let rows: &[(Format, &[u8], &str)] = &[
            (Format::Json, b"", "truncated JSON"),
            (Format::Json, b"{\"certificateId\":", "truncated JSON"),
            (Format::Json, b"{]", "invalid JSON"),
            (Format::Json, b"\xff\xfe{}", "invalid JSON"),
            (
                Format::Json,
                b"{\"certificateId\":\"\xff\"}",
                "invalid JSON",
            ),
            (Format::Cbor, b"", "truncated CBOR"),
            (Format::Cbor, &[0xa1, 0x61], "truncated CBOR"),
            (Format::Cbor, &trailing, "after the CBOR item"),
            (Format::Cbor, &[0xff], "wrong type"),
            (Format::Cbor, &[0x61, 0xff], "wrong type"),
            (Format::Cbor, b"{}", "truncated CBOR"),
        ];
        for (format, bytes, fragment) in rows {
            let e = decode_certificate_reply(&api, *format, bytes).unwrap_err();
            assert!(e.reason.contains(fragment), "{format:?} {bytes:?}: {e}");
        }
        // A JSON reply handed to the CBOR decoder and vice versa.
        let json_payload = serde_json::to_vec(
            &json!({"certificateId": "a", "certificatePem": PEM, "certificateOwnershipToken": "t"}),
        )
        .unwrap();
        assert!(decode_certificate_reply(&api, Format::Cbor, &json_payload).is_err());
        let [_, (_, cbor_payload)] = both(
            &json!({"certificateId": "a", "certificatePem": PEM, "certificateOwnershipToken": "t"}),
        );
        assert!(decode_certificate_reply(&api, Format::Json, &cbor_payload).is_err());
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_crash() {
        let deep_json = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        assert!(decode_register_reply(Format::Json, deep_json.as_bytes()).is_err());
        let deep_cbor = vec![0x81u8; 100_000];
        assert!(decode_register_reply(Format::Cbor, &deep_cbor).is_err());
    }

    #[test]
    fn register_replies_table() {
        type Row<'a> = (Value, Result<(Option<&'a str>, usize), ()>);
        let rows: Vec<Row> = vec![
            (
                json!({"thingName": "t1", "deviceConfiguration": {"a": "b", "c": "d"}}),
                Ok((Some("t1"), 2)),
            ),
            (
                json!({"thingName": "t1", "deviceConfiguration": {}, "more": 1}),
                Ok((Some("t1"), 0)),
            ),
            (json!({"thingName": "t1"}), Ok((Some("t1"), 0))),
            (json!({"deviceConfiguration": {"a": "b"}}), Ok((None, 1))),
            (json!({"thingName": 1}), Err(())),
            (
                json!({"thingName": "t", "deviceConfiguration": {"a": 1}}),
                Err(()),
            ),
            (
                json!({"thingName": "t", "deviceConfiguration": ["a"]}),
                Err(()),
            ),
            (json!(5), Err(())),
        ];
        for (value, want) in rows {
            for (format, bytes) in both(&value) {
                let got = decode_register_reply(format, &bytes)
                    .map(|r| (r.thing_name, r.device_configuration.len()))
                    .map_err(|_| ());
                let want = want.map(|(t, n)| (t.map(str::to_owned), n));
                assert_eq!(got, want, "{value} {format:?}");
            }
        }
    }

    #[test]
    fn rejections_table() {
        let api = Api::RegisterThing {
            template: "T".into(),
        };
        type Row<'a> = (Value, Option<(u16, &'a str, &'a str)>);
        let rows: Vec<Row> = vec![
            (
                json!({"statusCode": 400, "errorCode": "InvalidCertificateOwnershipToken", "errorMessage": "Certificate ownership token cannot be empty."}),
                Some((
                    400,
                    "InvalidCertificateOwnershipToken",
                    "Certificate ownership token cannot be empty.",
                )),
            ),
            (
                json!({"statusCode": 429, "errorCode": "Throttling", "errorMessage": "Rate exceeded", "x": true}),
                Some((429, "Throttling", "Rate exceeded")),
            ),
            (json!({"statusCode": 500}), Some((500, "", ""))),
            (json!({"statusCode": "400", "errorCode": "X"}), None),
            (json!({"statusCode": -1}), None),
            (json!({"statusCode": 70000}), None),
            (json!({"errorCode": "X"}), None),
        ];
        for (value, want) in rows {
            for (format, bytes) in both(&value) {
                let got = decode_rejection(&api, format, &bytes)
                    .ok()
                    .map(|e| (e.status_code, e.error_code, e.error_message));
                let want = want.map(|(s, c, m)| (s, c.to_owned(), m.to_owned()));
                assert_eq!(got, want, "{value} {format:?}");
            }
        }
    }
}
