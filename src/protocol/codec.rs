//! Request payloads out, reply payloads in, in JSON or CBOR.
//!
//! Replies are decoded into typed structs; unknown fields are ignored (AWS may add some), missing
//! or mistyped required fields are a [`DecodeError`]. Error texts name the field, never its
//! value, so a private key or token cannot leak through them.
//!
//! A reply must be a map (a JSON object, a CBOR map); its fields are found by their text keys.
//! The decoder walks it once: the fields it knows are read as the kind they must be, anything
//! else (other keys, other values) is parsed and dropped, CBOR tags are looked through. When a
//! field is of another kind, the error says which kind, never what it holds.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, Zeroizing};

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
        #[cfg(feature = "cbor")]
        Format::Cbor => {
            let mut out = Vec::new();
            let _ = ciborium::ser::into_writer(value, &mut out);
            out
        }
        // Refused when the configuration is made (Format::check_available): nothing is sent.
        #[cfg(not(feature = "cbor"))]
        Format::Cbor => Vec::new(),
    }
}

/// What a reply item must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Want {
    Text,
    /// A map of strings to strings.
    TextMap,
    Integer,
    /// The reply itself: a map with text keys.
    Reply,
}

impl Want {
    fn noun(self) -> &'static str {
        match self {
            Want::Text => "a string",
            Want::TextMap => "a map of strings",
            Want::Integer => "an integer",
            Want::Reply => "a map",
        }
    }
}

/// Every field of every reply. Names are unique across the APIs, so one walk of a reply serves
/// each decoder, which takes the fields of its API and leaves the others alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    CertificateId,
    CertificatePem,
    PrivateKey,
    OwnershipToken,
    ThingName,
    DeviceConfiguration,
    StatusCode,
    ErrorCode,
    ErrorMessage,
}

impl Field {
    const ALL: [Field; 9] = [
        Field::CertificateId,
        Field::CertificatePem,
        Field::PrivateKey,
        Field::OwnershipToken,
        Field::ThingName,
        Field::DeviceConfiguration,
        Field::StatusCode,
        Field::ErrorCode,
        Field::ErrorMessage,
    ];

    fn name(self) -> &'static str {
        match self {
            Field::CertificateId => "certificateId",
            Field::CertificatePem => "certificatePem",
            Field::PrivateKey => "privateKey",
            Field::OwnershipToken => "certificateOwnershipToken",
            Field::ThingName => "thingName",
            Field::DeviceConfiguration => "deviceConfiguration",
            Field::StatusCode => "statusCode",
            Field::ErrorCode => "errorCode",
            Field::ErrorMessage => "errorMessage",
        }
    }

    fn want(self) -> Want {
        match self {
            Field::DeviceConfiguration => Want::TextMap,
            Field::StatusCode => Want::Integer,
            _ => Want::Text,
        }
    }

    fn named(name: &str) -> Option<Field> {
        Field::ALL.into_iter().find(|f| f.name() == name)
    }
}

/// An item of the kind wanted.
enum Got {
    Text(String),
    TextMap(BTreeMap<String, String>),
    Integer(i128),
    Reply(Box<Found>),
}

/// One item as found: of the kind wanted, or the kind it is instead (never its content).
type Item = Result<Got, &'static str>;

/// The kind of a map that should hold only strings but does not.
const MIXED_MAP: &str = "a map with an item that is not a string";
/// The kind of JSON `null` and CBOR null or undefined.
const NULL: &str = "null";

/// The fields of a reply as found, indexed by [`Field`].
#[derive(Default)]
struct Found {
    items: [Option<Item>; Field::ALL.len()],
    /// Fields given more than once.
    repeated: [bool; Field::ALL.len()],
}

impl Drop for Found {
    /// Wipes the strings no decoder took: a token or a private key of a reply that failed.
    fn drop(&mut self) {
        for item in self.items.iter_mut().flatten() {
            match item {
                Ok(Got::Text(s)) => s.zeroize(),
                Ok(Got::TextMap(m)) => m.values_mut().for_each(Zeroize::zeroize),
                _ => {}
            }
        }
    }
}

impl Found {
    /// Takes `field`: `Ok(None)` if absent or null, an error text if it is repeated or of
    /// another kind.
    fn take(&mut self, field: Field) -> Result<Option<Got>, String> {
        let name = field.name();
        if self.repeated[field as usize] {
            return Err(format!("{name} appears more than once"));
        }
        match self.items[field as usize].take() {
            None | Some(Err(NULL)) => Ok(None),
            Some(Ok(got)) => Ok(Some(got)),
            Some(Err(MIXED_MAP)) => Err(format!("{name} holds an item that is not a string")),
            Some(Err(kind)) => Err(format!("{name} is {kind}, not {}", field.want().noun())),
        }
    }

    fn text(&mut self, field: Field) -> Result<Option<String>, String> {
        Ok(match self.take(field)? {
            Some(Got::Text(s)) => Some(s),
            _ => None,
        })
    }

    fn required_text(&mut self, field: Field) -> Result<String, String> {
        self.text(field)?
            .ok_or_else(|| format!("{} is missing", field.name()))
    }
}

/// Reads one item as `Want`.
struct ItemSeed(Want);

impl<'de> DeserializeSeed<'de> for ItemSeed {
    type Value = Item;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Item, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ItemSeed {
    type Value = Item;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0.noun())
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Item, E> {
        Ok(Err("a boolean"))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Item, E> {
        self.visit_i128(i128::from(v))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Item, E> {
        self.visit_i128(i128::from(v))
    }

    fn visit_u128<E: de::Error>(self, v: u128) -> Result<Item, E> {
        // Out of range for every integer field anyway.
        self.visit_i128(i128::try_from(v).unwrap_or(i128::MAX))
    }

    fn visit_i128<E: de::Error>(self, v: i128) -> Result<Item, E> {
        Ok(match self.0 {
            Want::Integer => Ok(Got::Integer(v)),
            _ => Err("an integer"),
        })
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Item, E> {
        Ok(Err("a floating-point number"))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Item, E> {
        Ok(match self.0 {
            Want::Text => Ok(Got::Text(v.to_owned())),
            _ => Err("a string"),
        })
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Item, E> {
        Ok(match self.0 {
            Want::Text => Ok(Got::Text(v)),
            _ => Err("a string"),
        })
    }

    fn visit_bytes<E: de::Error>(self, _: &[u8]) -> Result<Item, E> {
        Ok(Err("a byte string"))
    }

    fn visit_none<E: de::Error>(self) -> Result<Item, E> {
        Ok(Err(NULL))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Item, E> {
        Ok(Err(NULL))
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Item, D::Error> {
        d.deserialize_any(self)
    }

    fn visit_newtype_struct<D: Deserializer<'de>>(self, d: D) -> Result<Item, D::Error> {
        d.deserialize_any(self)
    }

    /// A CBOR tag: the tagged item counts.
    fn visit_enum<A: de::EnumAccess<'de>>(self, data: A) -> Result<Item, A::Error> {
        let (IgnoredAny, item) = data.variant()?;
        de::VariantAccess::newtype_variant_seed(item, self)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Item, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Err("an array"))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Item, A::Error> {
        match self.0 {
            Want::TextMap => {
                let mut out = BTreeMap::new();
                let mut all_text = true;
                while let Some(key) = map.next_key_seed(ItemSeed(Want::Text))? {
                    match (key, map.next_value_seed(ItemSeed(Want::Text))?) {
                        (Ok(Got::Text(k)), Ok(Got::Text(v))) => {
                            out.insert(k, v);
                        }
                        _ => all_text = false,
                    }
                }
                Ok(match all_text {
                    true => Ok(Got::TextMap(out)),
                    false => Err(MIXED_MAP),
                })
            }
            Want::Reply => {
                let mut found = Found::default();
                while let Some(key) = map.next_key_seed(ItemSeed(Want::Text))? {
                    let known = match &key {
                        Ok(Got::Text(k)) => Field::named(k),
                        _ => None,
                    };
                    match known {
                        Some(field) => {
                            let item = map.next_value_seed(ItemSeed(field.want()))?;
                            let i = field as usize;
                            found.repeated[i] |= found.items[i].replace(item).is_some();
                        }
                        None => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(Ok(Got::Reply(Box::new(found))))
            }
            Want::Text | Want::Integer => {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Err("a map"))
            }
        }
    }
}

/// A whole reply: its fields, or the kind of item it is instead of a map.
struct Reply(Result<Found, &'static str>);

impl<'de> Deserialize<'de> for Reply {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Reply, D::Error> {
        Ok(Reply(match ItemSeed(Want::Reply).deserialize(d)? {
            Ok(Got::Reply(found)) => Ok(*found),
            Ok(_) => Err("an item of another kind"),
            Err(kind) => Err(kind),
        }))
    }
}

/// Walks a reply in `format`; `what` names it in errors.
fn decode(format: Format, payload: &[u8], what: &str) -> Result<Found, DecodeError> {
    let fail = |reason: String| DecodeError {
        what: what.to_owned(),
        reason,
    };
    let reply: Reply = match format {
        Format::Json => serde_json::from_slice(payload).map_err(|e| {
            let kind = match e.classify() {
                serde_json::error::Category::Io => "unreadable",
                serde_json::error::Category::Syntax => "invalid JSON",
                serde_json::error::Category::Eof => "truncated JSON",
                serde_json::error::Category::Data => "unexpected item",
            };
            fail(format!("{kind} at line {} column {}", e.line(), e.column()))
        })?,
        #[cfg(not(feature = "cbor"))]
        Format::Cbor => {
            return Err(fail(
                Format::Cbor.check_available().err().unwrap_or_default(),
            ));
        }
        #[cfg(feature = "cbor")]
        Format::Cbor => {
            let mut rest = payload;
            let reply = ciborium::de::from_reader(&mut rest).map_err(|e| {
                fail(match e {
                    ciborium::de::Error::Io(_) => "truncated CBOR".to_owned(),
                    ciborium::de::Error::Syntax(at) => format!("invalid CBOR at byte {at}"),
                    ciborium::de::Error::Semantic(Some(at), _) => {
                        format!("unexpected CBOR item at byte {at}")
                    }
                    ciborium::de::Error::Semantic(None, _) => "unexpected CBOR item".into(),
                    ciborium::de::Error::RecursionLimitExceeded => "nested too deeply".into(),
                })
            })?;
            if !rest.is_empty() {
                return Err(fail(format!("{} bytes after the CBOR item", rest.len())));
            }
            reply
        }
    };
    reply
        .0
        .map_err(|kind| fail(format!("the reply is {kind}, not a map")))
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

/// Decodes the accepted reply of `api` (one of the certificate APIs).
pub fn decode_certificate_reply(
    api: &Api,
    format: Format,
    payload: &[u8],
) -> Result<CreatedCertificate, DecodeError> {
    let what = format!("{} accepted", api.name());
    let mut r = decode(format, payload, &what)?;
    let fail = |reason: String| DecodeError {
        what: what.clone(),
        reason,
    };
    // The secrets go into wiping containers; what stays in `r` is wiped when it drops.
    let certificate_id = r.required_text(Field::CertificateId).map_err(&fail)?;
    let certificate_pem = r.required_text(Field::CertificatePem).map_err(&fail)?;
    let private_key = match api {
        Api::CreateKeysAndCertificate => r.text(Field::PrivateKey).map_err(&fail)?.map(Secret::new),
        // Not a field of this API's reply: left alone like any unknown field.
        _ => None,
    };
    let token = r
        .text(Field::OwnershipToken)
        .map_err(&fail)?
        .map(Secret::new)
        .ok_or_else(|| fail("certificateOwnershipToken is missing".into()))?;
    let fail = |reason: &str| fail(reason.to_owned());
    if certificate_id.is_empty() || !certificate_id.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err(fail("certificateId is empty or not an identifier"));
    }
    if !certificate_pem.contains("-----BEGIN CERTIFICATE-----") {
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
        certificate_id,
        certificate_pem,
        private_key,
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

/// Decodes RegisterThing's accepted reply. Both fields are optional: a template without a thing
/// gets no `thingName`, one without `DeviceConfiguration` may get no `deviceConfiguration`.
pub fn decode_register_reply(format: Format, payload: &[u8]) -> Result<Registered, DecodeError> {
    let what = "RegisterThing accepted";
    let fail = |reason| DecodeError {
        what: what.to_owned(),
        reason,
    };
    let mut r = decode(format, payload, what)?;
    let thing_name = r.text(Field::ThingName).map_err(fail)?;
    let device_configuration = match r.take(Field::DeviceConfiguration).map_err(fail)? {
        Some(Got::TextMap(m)) => m,
        _ => BTreeMap::new(),
    };
    Ok(Registered {
        thing_name,
        device_configuration,
    })
}

/// Decodes a `/rejected` payload of `api`. `statusCode` is required, `errorCode` and
/// `errorMessage` default to empty.
pub fn decode_rejection(
    api: &Api,
    format: Format,
    payload: &[u8],
) -> Result<ServiceError, DecodeError> {
    let what = format!("{} rejected", api.name());
    let fail = |reason| DecodeError {
        what: what.clone(),
        reason,
    };
    let mut r = decode(format, payload, &what)?;
    let status_code = match r.take(Field::StatusCode).map_err(fail)? {
        Some(Got::Integer(n)) => {
            u16::try_from(n).map_err(|_| fail("statusCode is out of range".into()))?
        }
        _ => return Err(fail("statusCode is missing".into())),
    };
    Ok(ServiceError {
        status_code,
        error_code: r.text(Field::ErrorCode).map_err(fail)?.unwrap_or_default(),
        error_message: r
            .text(Field::ErrorMessage)
            .map_err(fail)?
            .unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

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
        // (api, payload, Ok(has private key) | Err(reason))
        let rows: Vec<(&Api, Value, Result<bool, &str>)> = vec![
            (&keys, good_keys.clone(), Ok(true)),
            (&csr, good_csr.clone(), Ok(false)),
            (&csr, good_keys.clone(), Ok(false)),
            // privateKey is no field of CreateCertificateFromCsr: ignored whatever it holds.
            (
                &csr,
                json!({"certificateId": "ab12", "certificatePem": PEM, "privateKey": 5, "certificateOwnershipToken": "tok"}),
                Ok(false),
            ),
            // So are the fields of the other replies.
            (
                &csr,
                json!({"certificateId": "ab12", "certificatePem": PEM, "certificateOwnershipToken": "tok",
                    "thingName": [], "statusCode": "x", "deviceConfiguration": 1}),
                Ok(false),
            ),
            (&keys, good_csr.clone(), Err("privateKey is missing")),
            (
                &keys,
                json!({"certificateId": "ab12", "certificatePem": PEM, "privateKey": null, "certificateOwnershipToken": "t"}),
                Err("privateKey is missing"),
            ),
            (
                &keys,
                json!({"certificateId": "ab12", "certificatePem": PEM, "privateKey": "x", "certificateOwnershipToken": "t"}),
                Err("privateKey is not a PEM private key"),
            ),
            (
                &keys,
                json!({"certificateId": "ab12", "certificatePem": PEM, "privateKey": [KEY], "certificateOwnershipToken": "t"}),
                Err("privateKey is an array, not a string"),
            ),
            (
                &csr,
                json!({"certificatePem": PEM, "certificateOwnershipToken": "t"}),
                Err("certificateId is missing"),
            ),
            (
                &csr,
                json!({"certificateId": "ab12", "certificateOwnershipToken": "t"}),
                Err("certificatePem is missing"),
            ),
            (
                &csr,
                json!({"certificateId": "ab12", "certificatePem": PEM}),
                Err("certificateOwnershipToken is missing"),
            ),
            (
                &csr,
                json!({"certificateId": null, "certificatePem": PEM, "certificateOwnershipToken": "t"}),
                Err("certificateId is missing"),
            ),
            (
                &csr,
                json!({"certificateId": 5, "certificatePem": PEM, "certificateOwnershipToken": "t"}),
                Err("certificateId is an integer, not a string"),
            ),
            (
                &csr,
                json!({"certificateId": "ab12", "certificatePem": {"pem": PEM}, "certificateOwnershipToken": "t"}),
                Err("certificatePem is a map, not a string"),
            ),
            (
                &csr,
                json!({"certificateId": "ab12", "certificatePem": PEM, "certificateOwnershipToken": 7}),
                Err("certificateOwnershipToken is an integer, not a string"),
            ),
            (
                &csr,
                json!({"certificateId": "ab12", "certificatePem": PEM, "certificateOwnershipToken": true}),
                Err("certificateOwnershipToken is a boolean, not a string"),
            ),
            (
                &csr,
                json!({"certificateId": 1.5, "certificatePem": PEM, "certificateOwnershipToken": "t"}),
                Err("certificateId is a floating-point number, not a string"),
            ),
            (
                &csr,
                json!({"certificateId": "", "certificatePem": PEM, "certificateOwnershipToken": "t"}),
                Err("certificateId is empty or not an identifier"),
            ),
            (
                &csr,
                json!({"certificateId": "a/b", "certificatePem": PEM, "certificateOwnershipToken": "t"}),
                Err("certificateId is empty or not an identifier"),
            ),
            (
                &csr,
                json!({"certificateId": "ab", "certificatePem": "junk", "certificateOwnershipToken": "t"}),
                Err("certificatePem is not a PEM certificate"),
            ),
            (
                &csr,
                json!({"certificateId": "ab", "certificatePem": PEM, "certificateOwnershipToken": ""}),
                Err("certificateOwnershipToken is empty"),
            ),
            // The fields positionally, in the order the API documents them: this array was
            // accepted as a CreateKeysAndCertificate reply when the decoder was serde's derive.
            (
                &keys,
                json!(["ab12", PEM, KEY, "tok"]),
                Err("the reply is an array, not a map"),
            ),
            (
                &csr,
                json!(["ab12", PEM, "tok"]),
                Err("the reply is an array, not a map"),
            ),
            (&csr, json!([1, 2]), Err("the reply is an array, not a map")),
            (
                &csr,
                json!("string"),
                Err("the reply is a string, not a map"),
            ),
            (&csr, json!(null), Err("the reply is null, not a map")),
            (&csr, json!(5), Err("the reply is an integer, not a map")),
        ];
        for (api, value, want) in rows {
            for (format, bytes) in both(&value) {
                let got = decode_certificate_reply(api, format, &bytes);
                match (&got, want) {
                    (Ok(c), Ok(has_key)) => {
                        assert_eq!(c.private_key.is_some(), has_key, "{value}");
                        assert_eq!(c.ownership_token.expose(), "tok");
                        assert_eq!(c.certificate_id, "ab12");
                        assert_eq!(c.certificate_pem, PEM);
                    }
                    (Err(e), Err(reason)) => {
                        assert_eq!(e.reason, reason, "{value} {format:?}");
                        assert_eq!(e.what, format!("{} accepted", api.name()));
                        // Never the secret values.
                        assert!(!e.to_string().contains("tok") && !e.to_string().contains("MIIE"));
                    }
                    _ => panic!("{value} {format:?}: got {got:?}, want {want:?}"),
                }
            }
        }
    }

    /// CBOR that JSON cannot express.
    #[test]
    fn cbor_only_items_table() {
        use ciborium::Value as C;
        let text = |s: &str| C::Text(s.into());
        let reply = |entries: Vec<(C, C)>| {
            let mut out = Vec::new();
            ciborium::ser::into_writer(&C::Map(entries), &mut out).unwrap();
            out
        };
        let good = || {
            vec![
                (text("certificateId"), text("ab12")),
                (text("certificatePem"), text(PEM)),
                (text("certificateOwnershipToken"), text("tok")),
            ]
        };
        let with = |extra: Vec<(C, C)>| {
            let mut entries = good();
            entries.extend(extra);
            reply(entries)
        };
        let replace = |i: usize, value: C| {
            let mut entries = good();
            entries[i].1 = value;
            reply(entries)
        };
        let rows: Vec<(&str, Vec<u8>, Result<(), &str>)> = vec![
            ("plain", reply(good()), Ok(())),
            (
                "unknown keys of any kind, values of any kind",
                with(vec![
                    (C::Integer(0.into()), text("x")),
                    (C::Bytes(b"k".to_vec()), C::Bytes(vec![0, 1])),
                    (C::Array(vec![text("k")]), C::Map(vec![])),
                    (C::Bool(true), C::Null),
                    (text("tagged"), C::Tag(1, Box::new(C::Integer(5.into())))),
                    (text("float"), C::Float(0.5)),
                ]),
                Ok(()),
            ),
            (
                "a tagged field is its item",
                replace(0, C::Tag(32, Box::new(text("ab12")))),
                Ok(()),
            ),
            (
                "a byte string key is not the text key",
                reply(vec![
                    (C::Bytes(b"certificateId".to_vec()), text("ab12")),
                    (text("certificatePem"), text(PEM)),
                    (text("certificateOwnershipToken"), text("tok")),
                ]),
                Err("certificateId is missing"),
            ),
            (
                "integer keys are not field positions",
                reply(vec![
                    (C::Integer(0.into()), text("ab12")),
                    (C::Integer(1.into()), text(PEM)),
                    (C::Integer(3.into()), text("tok")),
                ]),
                Err("certificateId is missing"),
            ),
            (
                "a byte string value",
                replace(0, C::Bytes(b"ab12".to_vec())),
                Err("certificateId is a byte string, not a string"),
            ),
            (
                "a field twice",
                with(vec![(text("certificateId"), text("cd34"))]),
                Err("certificateId appears more than once"),
            ),
        ];
        let api = Api::CreateCertificateFromCsr;
        for (name, bytes, want) in rows {
            let got = decode_certificate_reply(&api, Format::Cbor, &bytes);
            match (&got, want) {
                (Ok(c), Ok(())) => {
                    assert_eq!(c.certificate_id, "ab12", "{name}");
                    assert_eq!(c.ownership_token.expose(), "tok", "{name}");
                }
                (Err(e), Err(reason)) => assert_eq!(e.reason, reason, "{name}"),
                _ => panic!("{name}: got {got:?}, want {want:?}"),
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
        let twice = br#"{"certificateId":"a","certificatePem":"x","certificateId":"b"}"#;
        let rows: &[(Format, &[u8], &str)] = &[
            (Format::Json, b"", "truncated JSON at line 1 column 0"),
            (
                Format::Json,
                b"{\"certificateId\":",
                "truncated JSON at line 1 column 17",
            ),
            (Format::Json, b"{]", "invalid JSON at line 1 column 2"),
            (
                Format::Json,
                b"\xff\xfe{}",
                "invalid JSON at line 1 column 1",
            ),
            (
                Format::Json,
                b"{\"certificateId\":\"\xff\"}",
                "invalid JSON at line 1 column 19",
            ),
            (Format::Json, b"{} x", "invalid JSON at line 1 column 4"),
            (Format::Json, twice, "certificateId appears more than once"),
            (Format::Cbor, b"", "truncated CBOR"),
            (Format::Cbor, &[0xa1, 0x61], "truncated CBOR"),
            (Format::Cbor, &trailing, "1 bytes after the CBOR item"),
            (Format::Cbor, &[0xff], "unexpected CBOR item"),
            (Format::Cbor, &[0x1c], "invalid CBOR at byte 0"),
            (Format::Cbor, &[0x61, 0xff], "invalid CBOR at byte 0"),
            (
                Format::Cbor,
                &[0xa1, 0x61, b'k', 0x62, 0xc3, 0x28],
                "invalid CBOR at byte 3",
            ),
            (Format::Cbor, b"{}", "truncated CBOR"),
        ];
        for (format, bytes, reason) in rows {
            let e = decode_certificate_reply(&api, *format, bytes).unwrap_err();
            assert_eq!(e.reason, *reason, "{format:?} {bytes:?}");
        }
        // A JSON reply handed to the CBOR decoder and vice versa.
        let json_payload = serde_json::to_vec(
            &json!({"certificateId": "a", "certificatePem": PEM, "certificateOwnershipToken": "t"}),
        )
        .unwrap();
        // `{"` is the head of a text string some 2.5 exabytes long: read in 4 KB pieces, it ends
        // with the payload.
        let e = decode_certificate_reply(&api, Format::Cbor, &json_payload).unwrap_err();
        assert_eq!(e.reason, "truncated CBOR");
        let [_, (_, cbor_payload)] = both(
            &json!({"certificateId": "a", "certificatePem": PEM, "certificateOwnershipToken": "t"}),
        );
        let e = decode_certificate_reply(&api, Format::Json, &cbor_payload).unwrap_err();
        assert_eq!(e.reason, "invalid JSON at line 1 column 1");
    }

    #[test]
    fn fields_index_their_table() {
        for (i, field) in Field::ALL.into_iter().enumerate() {
            assert_eq!(field as usize, i);
            assert_eq!(Field::named(field.name()), Some(field));
        }
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_crash() {
        let deep_json = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        assert!(decode_register_reply(Format::Json, deep_json.as_bytes()).is_err());
        let deep_cbor = vec![0x81u8; 100_000];
        assert!(decode_register_reply(Format::Cbor, &deep_cbor).is_err());
        // Inside an unknown field and inside a field, where the decoder skips the item: serde_json
        // skips without recursion (no limit needed), ciborium recurses up to its limit.
        let rows: &[(&str, Result<(), &str>)] = &[
            ("x", Ok(())),
            ("thingName", Err("thingName is an array, not a string")),
            (
                "deviceConfiguration",
                Err("deviceConfiguration is an array, not a map of strings"),
            ),
        ];
        for (field, json_want) in rows {
            let json = format!(
                "{{\"{field}\":{}{}}}",
                "[".repeat(100_000),
                "]".repeat(100_000)
            );
            let got = decode_register_reply(Format::Json, json.as_bytes());
            assert_eq!(
                got.map(|_| ()).map_err(|e| e.reason),
                json_want.map_err(str::to_owned),
                "{field}"
            );
            let mut cbor = vec![0xa1, 0x60 + field.len() as u8];
            cbor.extend_from_slice(field.as_bytes());
            cbor.extend(std::iter::repeat_n(0x81u8, 100_000));
            let e = decode_register_reply(Format::Cbor, &cbor).unwrap_err();
            assert_eq!(e.reason, "nested too deeply", "{field}");
        }
    }

    #[test]
    fn register_replies_table() {
        type Row<'a> = (Value, Result<(Option<&'a str>, usize), &'a str>);
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
            (json!({}), Ok((None, 0))),
            (
                json!({"thingName": null, "deviceConfiguration": null}),
                Ok((None, 0)),
            ),
            (
                json!({"thingName": 1}),
                Err("thingName is an integer, not a string"),
            ),
            (
                json!({"thingName": "t", "deviceConfiguration": {"a": 1}}),
                Err("deviceConfiguration holds an item that is not a string"),
            ),
            (
                json!({"thingName": "t", "deviceConfiguration": {"a": {"b": "c"}}}),
                Err("deviceConfiguration holds an item that is not a string"),
            ),
            (
                json!({"thingName": "t", "deviceConfiguration": ["a"]}),
                Err("deviceConfiguration is an array, not a map of strings"),
            ),
            (
                json!({"thingName": "t", "deviceConfiguration": "a=b"}),
                Err("deviceConfiguration is a string, not a map of strings"),
            ),
            (
                json!([{"a": "b"}, "t1"]),
                Err("the reply is an array, not a map"),
            ),
            (json!(5), Err("the reply is an integer, not a map")),
        ];
        for (value, want) in rows {
            for (format, bytes) in both(&value) {
                let got = decode_register_reply(format, &bytes)
                    .map(|r| (r.thing_name, r.device_configuration.len()))
                    .map_err(|e| e.reason);
                let want = want
                    .map(|(t, n)| (t.map(str::to_owned), n))
                    .map_err(str::to_owned);
                assert_eq!(got, want, "{value} {format:?}");
            }
        }
    }

    #[test]
    fn rejections_table() {
        let api = Api::RegisterThing {
            template: "T".into(),
        };
        type Row<'a> = (Value, Result<(u16, &'a str, &'a str), &'a str>);
        let rows: Vec<Row> = vec![
            (
                json!({"statusCode": 400, "errorCode": "InvalidCertificateOwnershipToken", "errorMessage": "Certificate ownership token cannot be empty."}),
                Ok((
                    400,
                    "InvalidCertificateOwnershipToken",
                    "Certificate ownership token cannot be empty.",
                )),
            ),
            (
                json!({"statusCode": 429, "errorCode": "Throttling", "errorMessage": "Rate exceeded", "x": true}),
                Ok((429, "Throttling", "Rate exceeded")),
            ),
            (json!({"statusCode": 500}), Ok((500, "", ""))),
            (
                json!({"statusCode": 503, "errorCode": null}),
                Ok((503, "", "")),
            ),
            (
                json!({"statusCode": "400", "errorCode": "X"}),
                Err("statusCode is a string, not an integer"),
            ),
            (
                json!({"statusCode": 400.0}),
                Err("statusCode is a floating-point number, not an integer"),
            ),
            (json!({"statusCode": -1}), Err("statusCode is out of range")),
            (
                json!({"statusCode": 70000}),
                Err("statusCode is out of range"),
            ),
            (
                json!({"statusCode": u64::MAX}),
                Err("statusCode is out of range"),
            ),
            (json!({"errorCode": "X"}), Err("statusCode is missing")),
            (json!({"statusCode": null}), Err("statusCode is missing")),
            (
                json!({"statusCode": 400, "errorMessage": 5}),
                Err("errorMessage is an integer, not a string"),
            ),
            (json!([400]), Err("the reply is an array, not a map")),
        ];
        for (value, want) in rows {
            for (format, bytes) in both(&value) {
                let got = decode_rejection(&api, format, &bytes)
                    .map(|e| (e.status_code, e.error_code, e.error_message))
                    .map_err(|e| e.reason);
                let want = want
                    .map(|(s, c, m)| (s, c.to_owned(), m.to_owned()))
                    .map_err(str::to_owned);
                assert_eq!(got, want, "{value} {format:?}");
            }
        }
    }
}
