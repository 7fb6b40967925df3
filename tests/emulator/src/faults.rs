//! Fault injection: rules that make the emulator misbehave on purpose, so clients can be tested
//! against the failures a real network and a real service produce.
//!
//! A rule is written `ACTION[@API][*COUNT]`:
//!
//! | action | effect |
//! |---|---|
//! | `delay:MS` | hold each matching reply for MS milliseconds |
//! | `reject:STATUS` | answer the request with a rejection (429 Throttling, 500 InternalError, 503 ServiceUnavailable, or any 4xx/5xx as InternalError-like) without processing it |
//! | `drop` | process the request but send no reply |
//! | `duplicate` | send the reply twice |
//! | `close:connect` | close the connection right after CONNACK |
//! | `close:suback` | close the connection right after a SUBACK |
//! | `close:request` | close the connection when a request arrives, before processing it |
//! | `close:processed` | process the request, then close before replying |
//! | `close:reply` | reply, then close the connection |
//! | `mangle:KIND` | process the request, then send hostile content instead of its accepted reply (same topic); see below |
//!
//! `API` is `keys`, `csr`, `create` (either certificate API), `register` or `any` (the default).
//! For `close:suback` the API is the one whose reply topics the SUBSCRIBE names. `COUNT` makes
//! the rule fire that many times and then vanish; without it the rule stays until cleared.
//!
//! `mangle` rules fire only on accepted replies (a rejection passes untouched and does not use up
//! a count) and only where their kind applies:
//!
//! | kind | accepted payload sent instead |
//! |---|---|
//! | `truncate` | the first half of the real payload |
//! | `garbage` | bytes that are neither JSON nor CBOR |
//! | `wrong-types[=FIELD]` | the real reply with FIELD a number (default `certificateId`, for RegisterThing `thingName`) |
//! | `missing[=FIELD]` | the real reply without FIELD (default `certificatePem`, for RegisterThing `thingName`) |
//! | `extra` | the real reply plus unknown fields: nested objects, arrays, numbers, booleans, null |
//! | `array` | the real reply's values as an array, in the order the API documents its fields |
//! | `bad-utf8` | the real reply with invalid UTF-8 inside a string (`certificateId`, for RegisterThing `thingName`): raw bytes in JSON, a CBOR text string with invalid bytes |
//! | `huge` | the real reply plus a 10 MiB string field |
//! | `other-format` | the real reply in CBOR to a JSON request and in JSON to a CBOR request |
//! | `foreign-cert` | certificate APIs only: the real reply with `certificatePem` and `certificateId` of a valid certificate from the same CA for another key |
//!
//! FIELD is `certificateId`, `certificatePem`, `certificateOwnershipToken` (certificate APIs),
//! `privateKey` (CreateKeysAndCertificate), `thingName` or `deviceConfiguration` (RegisterThing).

use std::fmt;
use std::str::FromStr;
use std::sync::Mutex;
use std::time::Duration;

use serde_json::{json, Value};

use crate::pki::{Ca, KeyKind};
use crate::service::encode;
use crate::topics::{Api, Format};

/// Where a `close` rule cuts the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Connect,
    Suback,
    Request,
    Processed,
    Reply,
}

impl Step {
    fn name(self) -> &'static str {
        match self {
            Step::Connect => "connect",
            Step::Suback => "suback",
            Step::Request => "request",
            Step::Processed => "processed",
            Step::Reply => "reply",
        }
    }
}

/// What a rule does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Delay(Duration),
    Reject(u16),
    Drop,
    Duplicate,
    Close(Step),
    Mangle(Mangle),
}

/// A field of an accepted reply, named by `mangle` rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    CertificateId,
    CertificatePem,
    CertificateOwnershipToken,
    PrivateKey,
    ThingName,
    DeviceConfiguration,
}

impl Field {
    const ALL: [Field; 6] = [
        Field::CertificateId,
        Field::CertificatePem,
        Field::CertificateOwnershipToken,
        Field::PrivateKey,
        Field::ThingName,
        Field::DeviceConfiguration,
    ];

    /// The field's name in the reply.
    pub fn name(self) -> &'static str {
        match self {
            Field::CertificateId => "certificateId",
            Field::CertificatePem => "certificatePem",
            Field::CertificateOwnershipToken => "certificateOwnershipToken",
            Field::PrivateKey => "privateKey",
            Field::ThingName => "thingName",
            Field::DeviceConfiguration => "deviceConfiguration",
        }
    }

    /// Whether `api`'s accepted reply has this field.
    fn in_reply_of(self, api: &Api) -> bool {
        match api {
            Api::CreateKeysAndCertificate => {
                !matches!(self, Field::ThingName | Field::DeviceConfiguration)
            }
            Api::CreateCertificateFromCsr => matches!(
                self,
                Field::CertificateId | Field::CertificatePem | Field::CertificateOwnershipToken
            ),
            Api::RegisterThing { .. } => {
                matches!(self, Field::ThingName | Field::DeviceConfiguration)
            }
        }
    }
}

/// How a `mangle` rule spoils an accepted reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mangle {
    Truncate,
    Garbage,
    WrongTypes(Option<Field>),
    Missing(Option<Field>),
    Extra,
    Array,
    BadUtf8,
    Huge,
    OtherFormat,
    ForeignCert,
}

/// What `garbage` sends: a control character and bytes no JSON or CBOR item starts with
/// (0x1c is a reserved CBOR initial byte).
pub const GARBAGE: &[u8] = b"\x1c\xfe\xff<not JSON or CBOR>\x00";
/// Size of the string field `huge` adds.
pub const HUGE_BYTES: usize = 10 * 1024 * 1024;
/// Placeholder `bad-utf8` writes, then overwrites with [`BAD_UTF8`] in the encoded payload.
const BAD_UTF8_MARKER: &str = "BAD-UTF8-ABC";
/// Same length as the marker, so that a CBOR text string header stays right: a lone
/// continuation byte, an unfinished two-byte sequence and bytes never valid in UTF-8.
const BAD_UTF8: &[u8] = b"bad\x80\xc3(\xfe\xffutf8";
const _: () = assert!(BAD_UTF8.len() == BAD_UTF8_MARKER.len());

impl fmt::Display for Mangle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (kind, field) = match *self {
            Mangle::Truncate => ("truncate", None),
            Mangle::Garbage => ("garbage", None),
            Mangle::WrongTypes(field) => ("wrong-types", field),
            Mangle::Missing(field) => ("missing", field),
            Mangle::Extra => ("extra", None),
            Mangle::Array => ("array", None),
            Mangle::BadUtf8 => ("bad-utf8", None),
            Mangle::Huge => ("huge", None),
            Mangle::OtherFormat => ("other-format", None),
            Mangle::ForeignCert => ("foreign-cert", None),
        };
        f.write_str(kind)?;
        match field {
            Some(field) => write!(f, "={}", field.name()),
            None => Ok(()),
        }
    }
}

impl Mangle {
    fn parse(kind: &str) -> Option<Mangle> {
        let (kind, field) = match kind.split_once('=') {
            Some((kind, name)) => (
                kind,
                Some(Field::ALL.into_iter().find(|f| f.name() == name)?),
            ),
            None => (kind, None),
        };
        let mangle = match kind {
            "wrong-types" => return Some(Mangle::WrongTypes(field)),
            "missing" => return Some(Mangle::Missing(field)),
            "truncate" => Mangle::Truncate,
            "garbage" => Mangle::Garbage,
            "extra" => Mangle::Extra,
            "array" => Mangle::Array,
            "bad-utf8" => Mangle::BadUtf8,
            "huge" => Mangle::Huge,
            "other-format" => Mangle::OtherFormat,
            "foreign-cert" => Mangle::ForeignCert,
            _ => return None,
        };
        // Only the two field-taking kinds take a field.
        field.is_none().then_some(mangle)
    }

    /// Whether the rule can spoil `api`'s accepted reply: `foreign-cert` needs a certificate,
    /// a named field must be one of the reply's.
    pub fn applies_to(self, api: &Api) -> bool {
        match self {
            Mangle::ForeignCert => !matches!(api, Api::RegisterThing { .. }),
            Mangle::WrongTypes(Some(f)) | Mangle::Missing(Some(f)) => f.in_reply_of(api),
            _ => true,
        }
    }

    /// The hostile payload that replaces `reply` (`api`'s accepted reply, sent in `format`).
    /// `ca` issues the certificate of `foreign-cert`.
    pub fn apply(self, api: &Api, format: Format, reply: &Value, ca: &Ca) -> Vec<u8> {
        let register = matches!(api, Api::RegisterThing { .. });
        let main_field = if register {
            Field::ThingName
        } else {
            Field::CertificateId
        };
        let mut value = reply.clone();
        match self {
            Mangle::Truncate => {
                let mut bytes = encode(format, reply);
                bytes.truncate(bytes.len() / 2);
                return bytes;
            }
            Mangle::Garbage => return GARBAGE.to_vec(),
            Mangle::OtherFormat => {
                let other = match format {
                    Format::Json => Format::Cbor,
                    Format::Cbor => Format::Json,
                };
                return encode(other, reply);
            }
            Mangle::WrongTypes(field) => {
                value[field.unwrap_or(main_field).name()] = json!(12345);
            }
            Mangle::Missing(field) => {
                let default = if register {
                    Field::ThingName
                } else {
                    Field::CertificatePem
                };
                if let Some(map) = value.as_object_mut() {
                    map.remove(field.unwrap_or(default).name());
                }
            }
            Mangle::Extra => {
                value["x-amzn-unknown"] = json!({
                    "nested": {"deeper": {"list": [1, "two", null, true, 3.5, {"k": []}]}},
                    "empty": {},
                });
                value["anotherNewField"] = json!(["a", 1, [2, [3]], {"b": false}]);
                value["aNumber"] = json!(-7);
                value["aFloat"] = json!(1.5e300);
                value["aBool"] = json!(true);
                value["aNull"] = Value::Null;
                value["aString"] = json!("ignored");
            }
            Mangle::BadUtf8 => {
                value[main_field.name()] = json!(BAD_UTF8_MARKER);
                let mut bytes = encode(format, &value);
                if let Some(at) = bytes
                    .windows(BAD_UTF8.len())
                    .position(|w| w == BAD_UTF8_MARKER.as_bytes())
                {
                    bytes[at..at + BAD_UTF8.len()].copy_from_slice(BAD_UTF8);
                }
                return bytes;
            }
            Mangle::Array => {
                // The field order of the API's documentation.
                let order: &[&str] = match api {
                    Api::CreateKeysAndCertificate => &[
                        "certificateId",
                        "certificatePem",
                        "privateKey",
                        "certificateOwnershipToken",
                    ],
                    Api::CreateCertificateFromCsr => &[
                        "certificateOwnershipToken",
                        "certificateId",
                        "certificatePem",
                    ],
                    Api::RegisterThing { .. } => &["deviceConfiguration", "thingName"],
                };
                let values = order.iter().filter_map(|k| reply.get(*k).cloned());
                value = Value::Array(values.collect());
            }
            Mangle::Huge => {
                value["padding"] = json!("x".repeat(HUGE_BYTES));
            }
            Mangle::ForeignCert => {
                // A certificate from the same CA for a key nobody keeps. If issuing fails, the
                // certificate part of the reply is dropped, which is hostile as well.
                match ca.create_keys_and_certificate(KeyKind::EcP256) {
                    Ok((issued, _)) => {
                        value["certificatePem"] = json!(issued.pem);
                        value["certificateId"] = json!(issued.id);
                    }
                    Err(_) => {
                        if let Some(map) = value.as_object_mut() {
                            map.remove("certificatePem");
                        }
                    }
                }
            }
        }
        encode(format, &value)
    }
}

/// Which requests a rule applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApiFilter {
    Any,
    Keys,
    Csr,
    Create,
    Register,
}

impl ApiFilter {
    fn admits(self, api: Option<&Api>) -> bool {
        match (self, api) {
            (ApiFilter::Any, _) => true,
            (_, None) => false,
            (ApiFilter::Keys, Some(Api::CreateKeysAndCertificate)) => true,
            (ApiFilter::Csr, Some(Api::CreateCertificateFromCsr)) => true,
            (ApiFilter::Create, Some(Api::CreateKeysAndCertificate))
            | (ApiFilter::Create, Some(Api::CreateCertificateFromCsr)) => true,
            (ApiFilter::Register, Some(Api::RegisterThing { .. })) => true,
            _ => false,
        }
    }

    fn name(self) -> &'static str {
        match self {
            ApiFilter::Any => "any",
            ApiFilter::Keys => "keys",
            ApiFilter::Csr => "csr",
            ApiFilter::Create => "create",
            ApiFilter::Register => "register",
        }
    }
}

/// One fault rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    pub action: Action,
    pub api: ApiFilter,
    /// How many more times the rule fires; `None` for always.
    pub remaining: Option<u32>,
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.action {
            Action::Delay(d) => write!(f, "delay:{}", d.as_millis())?,
            Action::Reject(s) => write!(f, "reject:{s}")?,
            Action::Drop => f.write_str("drop")?,
            Action::Duplicate => f.write_str("duplicate")?,
            Action::Close(step) => write!(f, "close:{}", step.name())?,
            Action::Mangle(kind) => write!(f, "mangle:{kind}")?,
        }
        if self.api != ApiFilter::Any {
            write!(f, "@{}", self.api.name())?;
        }
        if let Some(n) = self.remaining {
            write!(f, "*{n}")?;
        }
        Ok(())
    }
}

impl FromStr for Fault {
    type Err = String;

    fn from_str(text: &str) -> Result<Fault, String> {
        let text = text.trim();
        let (rest, remaining) = match text.rsplit_once('*') {
            Some((rest, n)) => {
                let n: u32 = n
                    .parse()
                    .map_err(|_| format!("bad count {n:?} in fault {text:?}"))?;
                if n == 0 {
                    return Err(format!("count must be at least 1 in fault {text:?}"));
                }
                (rest, Some(n))
            }
            None => (text, None),
        };
        let (rest, api) = match rest.split_once('@') {
            Some((rest, api)) => (
                rest,
                match api {
                    "any" => ApiFilter::Any,
                    "keys" => ApiFilter::Keys,
                    "csr" => ApiFilter::Csr,
                    "create" => ApiFilter::Create,
                    "register" => ApiFilter::Register,
                    other => return Err(format!("unknown API {other:?} in fault {text:?}")),
                },
            ),
            None => (rest, ApiFilter::Any),
        };
        let (name, arg) = match rest.split_once(':') {
            Some((n, a)) => (n, Some(a)),
            None => (rest, None),
        };
        let action = match (name, arg) {
            ("delay", Some(ms)) => Action::Delay(Duration::from_millis(
                ms.parse()
                    .map_err(|_| format!("bad delay {ms:?} in fault {text:?}"))?,
            )),
            ("reject", Some(status)) => {
                let s: u16 = status
                    .parse()
                    .map_err(|_| format!("bad status {status:?} in fault {text:?}"))?;
                if !(400..600).contains(&s) {
                    return Err(format!("status must be 4xx or 5xx in fault {text:?}"));
                }
                Action::Reject(s)
            }
            ("drop", None) => Action::Drop,
            ("duplicate", None) => Action::Duplicate,
            ("close", Some(step)) => Action::Close(match step {
                "connect" => Step::Connect,
                "suback" => Step::Suback,
                "request" => Step::Request,
                "processed" => Step::Processed,
                "reply" => Step::Reply,
                other => return Err(format!("unknown step {other:?} in fault {text:?}")),
            }),
            ("mangle", Some(kind)) => Action::Mangle(
                Mangle::parse(kind)
                    .ok_or_else(|| format!("unknown mangle kind {kind:?} in fault {text:?}"))?,
            ),
            _ => return Err(format!("unknown fault {text:?}")),
        };
        Ok(Fault {
            action,
            api,
            remaining,
        })
    }
}

/// The rules in force; shared by every connection.
#[derive(Debug, Default)]
pub struct Faults {
    rules: Mutex<Vec<Fault>>,
}

impl Faults {
    /// Adds a rule after those already there.
    pub fn add(&self, fault: Fault) {
        self.lock().push(fault);
    }

    /// Removes every rule.
    pub fn clear(&self) {
        self.lock().clear();
    }

    /// The rules in force, in order.
    pub fn list(&self) -> Vec<Fault> {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Fault>> {
        // A poisoned lock only means a panic elsewhere; the rule list itself stays consistent.
        self.rules.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Fires the first rule whose action satisfies `want` and whose API filter admits `api`,
    /// consuming one of its counts.
    pub fn fire(&self, api: Option<&Api>, want: impl Fn(&Action) -> bool) -> Option<Action> {
        let mut rules = self.lock();
        let idx = rules
            .iter()
            .position(|r| want(&r.action) && r.api.admits(api))?;
        let action = rules[idx].action;
        if let Some(n) = rules[idx].remaining.as_mut() {
            *n -= 1;
            if *n == 0 {
                rules.remove(idx);
            }
        }
        Some(action)
    }

    /// Fires a `close` rule for `step`.
    pub fn close_at(&self, step: Step, api: Option<&Api>) -> bool {
        self.fire(api, |a| *a == Action::Close(step)).is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_table() {
        let rows: &[(&str, Result<&str, ()>)] = &[
            ("delay:1500", Ok("delay:1500")),
            ("reject:429*3", Ok("reject:429*3")),
            ("reject:500@register*1", Ok("reject:500@register*1")),
            ("drop@keys", Ok("drop@keys")),
            ("duplicate@csr*2", Ok("duplicate@csr*2")),
            ("close:connect*1", Ok("close:connect*1")),
            ("close:suback@create", Ok("close:suback@create")),
            ("close:processed@register", Ok("close:processed@register")),
            ("close:reply@any", Ok("close:reply")),
            ("mangle:truncate@keys*1", Ok("mangle:truncate@keys*1")),
            ("mangle:garbage", Ok("mangle:garbage")),
            ("mangle:wrong-types@create", Ok("mangle:wrong-types@create")),
            (
                "mangle:wrong-types=thingName@register",
                Ok("mangle:wrong-types=thingName@register"),
            ),
            ("mangle:missing@csr*2", Ok("mangle:missing@csr*2")),
            (
                "mangle:missing=certificateOwnershipToken",
                Ok("mangle:missing=certificateOwnershipToken"),
            ),
            (
                "mangle:missing=privateKey@keys",
                Ok("mangle:missing=privateKey@keys"),
            ),
            ("mangle:extra@any", Ok("mangle:extra")),
            ("mangle:array@register", Ok("mangle:array@register")),
            ("mangle:bad-utf8@register", Ok("mangle:bad-utf8@register")),
            ("mangle:huge*1", Ok("mangle:huge*1")),
            ("mangle:other-format@keys", Ok("mangle:other-format@keys")),
            (
                "mangle:foreign-cert@create*1",
                Ok("mangle:foreign-cert@create*1"),
            ),
            ("mangle", Err(())),
            ("mangle:", Err(())),
            ("mangle:explode", Err(())),
            ("mangle:missing=", Err(())),
            ("mangle:missing=serialNumber", Err(())),
            ("mangle:truncate=thingName", Err(())),
            ("mangle:Truncate", Err(())),
            ("reject:200", Err(())),
            ("reject", Err(())),
            ("delay:x", Err(())),
            ("close:later", Err(())),
            ("drop@nowhere", Err(())),
            ("drop*0", Err(())),
            ("drop*-1", Err(())),
            ("explode", Err(())),
            ("", Err(())),
        ];
        for (text, want) in rows {
            let got = text.parse::<Fault>().map(|f| f.to_string()).map_err(|_| ());
            assert_eq!(got, want.map(str::to_owned), "{text}");
        }
    }

    #[test]
    fn counts_are_consumed_and_filters_apply() {
        let faults = Faults::default();
        faults.add("reject:429@register*2".parse().unwrap());
        let keys = Api::CreateKeysAndCertificate;
        let reg = Api::RegisterThing {
            template: "T".into(),
        };
        let is_reject = |a: &Action| matches!(a, Action::Reject(_));
        assert_eq!(faults.fire(Some(&keys), is_reject), None);
        assert_eq!(
            faults.fire(Some(&reg), is_reject),
            Some(Action::Reject(429))
        );
        assert_eq!(
            faults.fire(Some(&reg), is_reject),
            Some(Action::Reject(429))
        );
        assert_eq!(faults.fire(Some(&reg), is_reject), None);
        assert!(faults.list().is_empty());
        faults.add("close:connect".parse().unwrap());
        assert!(faults.close_at(Step::Connect, None));
        assert!(faults.close_at(Step::Connect, None));
        faults.clear();
        assert!(!faults.close_at(Step::Connect, None));
    }

    #[test]
    fn mangle_applies_where_its_kind_fits() {
        let keys = Api::CreateKeysAndCertificate;
        let csr = Api::CreateCertificateFromCsr;
        let reg = Api::RegisterThing {
            template: "T".into(),
        };
        // (rule, applies to keys, csr, register)
        let rows: &[(&str, [bool; 3])] = &[
            ("mangle:truncate", [true, true, true]),
            ("mangle:foreign-cert", [true, true, false]),
            ("mangle:missing", [true, true, true]),
            ("mangle:missing=privateKey", [true, false, false]),
            (
                "mangle:wrong-types=certificateOwnershipToken",
                [true, true, false],
            ),
            ("mangle:missing=deviceConfiguration", [false, false, true]),
        ];
        for (rule, want) in rows {
            let Ok(Fault {
                action: Action::Mangle(m),
                ..
            }) = rule.parse::<Fault>()
            else {
                panic!("{rule} parses as a mangle rule");
            };
            let got = [keys.clone(), csr.clone(), reg.clone()].map(|api| m.applies_to(&api));
            assert_eq!(&got, want, "{rule}");
        }
        // A rule that does not apply is neither fired nor consumed.
        let faults = Faults::default();
        faults.add("mangle:foreign-cert*1".parse().unwrap());
        let is_mangle = |api: &Api| {
            let api = api.clone();
            move |a: &Action| matches!(a, Action::Mangle(m) if m.applies_to(&api))
        };
        assert_eq!(faults.fire(Some(&reg), is_mangle(&reg)), None);
        assert_eq!(faults.list().len(), 1);
        assert_eq!(
            faults.fire(Some(&csr), is_mangle(&csr)),
            Some(Action::Mangle(Mangle::ForeignCert))
        );
        assert!(faults.list().is_empty());
    }

    fn decode(format: Format, bytes: &[u8]) -> Result<Value, String> {
        crate::service::decode(format, bytes)
    }

    fn mangle(kind: &str) -> Mangle {
        match format!("mangle:{kind}").parse::<Fault>().unwrap().action {
            Action::Mangle(m) => m,
            other => panic!("{other:?}"),
        }
    }

    fn public_key(pem: &str) -> Vec<u8> {
        use x509_parser::prelude::FromDer;
        let der = crate::pki::cert_der_from_pem(pem).unwrap();
        let (_, cert) = x509_parser::certificate::X509Certificate::from_der(&der).unwrap();
        cert.public_key().raw.to_vec()
    }

    #[test]
    fn mangled_payloads() {
        let ca = Ca::generate().unwrap();
        let (issued, key) = ca.create_keys_and_certificate(KeyKind::EcP256).unwrap();
        let keys = Api::CreateKeysAndCertificate;
        let reg = Api::RegisterThing {
            template: "T".into(),
        };
        let cert_reply = json!({"certificateId": issued.id, "certificatePem": issued.pem,
            "privateKey": key, "certificateOwnershipToken": "tok"});
        let reg_reply = json!({"thingName": "demo-1", "deviceConfiguration": {"a": "b"}});
        for format in [Format::Json, Format::Cbor] {
            let other = match format {
                Format::Json => Format::Cbor,
                Format::Cbor => Format::Json,
            };
            for (api, reply) in [(&keys, &cert_reply), (&reg, &reg_reply)] {
                let what = format!("{api:?} {format:?}");
                let real = encode(format, reply);
                let apply = |kind: &str| mangle(kind).apply(api, format, reply, &ca);
                let main = match api {
                    Api::RegisterThing { .. } => "thingName",
                    _ => "certificateId",
                };

                let cut = apply("truncate");
                assert_eq!(cut, real[..real.len() / 2], "{what}");
                assert!(decode(format, &cut).is_err(), "{what}");

                let garbage = apply("garbage");
                assert!(decode(Format::Json, &garbage).is_err(), "{what}");
                assert!(decode(Format::Cbor, &garbage).is_err(), "{what}");

                let wrong = decode(format, &apply("wrong-types")).unwrap();
                assert_eq!(wrong[main], json!(12345), "{what}");

                let missing = decode(format, &apply("missing")).unwrap();
                let dropped = match api {
                    Api::RegisterThing { .. } => "thingName",
                    _ => "certificatePem",
                };
                let mut want = reply.clone();
                want.as_object_mut().unwrap().remove(dropped);
                assert_eq!(missing, want, "{what}");

                let extra = decode(format, &apply("extra")).unwrap();
                let extra = extra.as_object().unwrap();
                for (k, v) in reply.as_object().unwrap() {
                    assert_eq!(extra.get(k), Some(v), "{what}: {k} kept");
                }
                assert!(extra["x-amzn-unknown"]["nested"].is_object(), "{what}");
                assert!(extra["anotherNewField"].is_array(), "{what}");

                let array = decode(format, &apply("array")).unwrap();
                let array = array.as_array().unwrap();
                assert_eq!(array.len(), reply.as_object().unwrap().len(), "{what}");
                assert!(array.contains(&reply[main]), "{what}");

                let bad = apply("bad-utf8");
                assert!(bad.windows(BAD_UTF8.len()).any(|w| w == BAD_UTF8), "{what}");
                assert!(decode(format, &bad).is_err(), "{what}");
                if format == Format::Cbor {
                    // Well-formed CBOR but for the UTF-8: a text string of 12 bytes (0x6c);
                    // made a byte string (0x4c), the payload decodes.
                    let at = bad.windows(BAD_UTF8.len()).position(|w| w == BAD_UTF8);
                    let header = at.unwrap() - 1;
                    assert_eq!(bad[header], 0x6c, "{what}");
                    let mut bytes = bad.clone();
                    bytes[header] = 0x4c;
                    let v: Result<ciborium::Value, _> = ciborium::de::from_reader(&bytes[..]);
                    assert!(v.is_ok(), "{what}");
                }

                let huge = apply("huge");
                assert!(huge.len() > HUGE_BYTES, "{what}");
                let huge = decode(format, &huge).unwrap();
                assert_eq!(huge[main], reply[main], "{what}");

                assert_eq!(
                    decode(other, &apply("other-format")).unwrap(),
                    *reply,
                    "{what}"
                );
            }
            let foreign = mangle("foreign-cert").apply(&keys, format, &cert_reply, &ca);
            let foreign = decode(format, &foreign).unwrap();
            let pem = foreign["certificatePem"].as_str().unwrap();
            assert_ne!(public_key(pem), public_key(&issued.pem));
            let der = crate::pki::cert_der_from_pem(pem).unwrap();
            assert_eq!(
                foreign["certificateId"],
                json!(crate::pki::certificate_id(&der))
            );
            assert_eq!(foreign["privateKey"], cert_reply["privateKey"]);
            assert_eq!(foreign["certificateOwnershipToken"], json!("tok"));
        }
    }
}
