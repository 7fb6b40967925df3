//! The fleet provisioning service: CreateKeysAndCertificate, CreateCertificateFromCsr and
//! RegisterThing, as AWS IoT Core answers them.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use crate::errors::ErrorTable;
use crate::hook::{self, Verdict};
use crate::pki::{Ca, KeyKind};
use crate::policy::{ConnThing, Context, Policy};
use crate::resources::Resources;
use crate::store::{RegisterError, Store};
use crate::template::{self, PolicySpec, TemplateFile, TemplateOutcome};
use crate::topics::{valid_template_name, Api, Format};

/// The answer to a request.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    Accepted(Value),
    Rejected {
        status: u16,
        code: String,
        message: String,
    },
}

impl Reply {
    pub fn rejected(status: u16, code: &str, message: impl Into<String>) -> Reply {
        Reply::Rejected {
            status,
            code: code.to_owned(),
            message: message.into(),
        }
    }

    /// The rejection AWS sends for an HTTP-like status (used by fault injection).
    pub fn for_status(status: u16) -> Reply {
        let (code, message) = match status {
            429 => ("Throttling", "Rate exceeded"),
            500 => ("InternalError", "Internal error"),
            503 => ("ServiceUnavailable", "Service unavailable"),
            s if s >= 500 => ("InternalError", "Internal error"),
            _ => ("InvalidRequest", "Request rejected"),
        };
        Reply::rejected(status, code, message)
    }

    pub fn is_accepted(&self) -> bool {
        matches!(self, Reply::Accepted(_))
    }

    /// The reply payload in `format`.
    pub fn encode(&self, format: Format) -> Vec<u8> {
        let value = match self {
            Reply::Accepted(v) => v.clone(),
            Reply::Rejected {
                status,
                code,
                message,
            } => json!({"statusCode": status, "errorCode": code, "errorMessage": message}),
        };
        encode(format, &value)
    }
}

/// Encodes a JSON value as JSON or CBOR.
pub fn encode(format: Format, value: &Value) -> Vec<u8> {
    match format {
        Format::Json => value.to_string().into_bytes(),
        Format::Cbor => {
            let mut out = Vec::new();
            // Writing a serde_json::Value into a Vec cannot fail.
            let _ = ciborium::ser::into_writer(value, &mut out);
            out
        }
    }
}

/// Decodes a request payload. The whole payload must be one JSON or CBOR item.
pub fn decode(format: Format, payload: &[u8]) -> Result<Value, String> {
    match format {
        Format::Json => serde_json::from_slice(payload).map_err(|e| {
            format!(
                "The payload is not valid JSON (line {}, column {}).",
                e.line(),
                e.column()
            )
        }),
        Format::Cbor => {
            let mut rest = payload;
            let v: Value = ciborium::de::from_reader(&mut rest)
                .map_err(|_| "The payload is not valid CBOR.")?;
            if !rest.is_empty() {
                return Err("The payload is not valid CBOR: bytes after the first item.".into());
            }
            Ok(v)
        }
    }
}

/// Settings of the service.
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    pub key_kind: KeyKind,
    pub token_ttl: Duration,
    pub hook_timeout: Duration,
    pub templates_dir: PathBuf,
    pub claim_policy: PathBuf,
    pub resources: PathBuf,
    pub policies_dir: PathBuf,
    pub region: String,
    pub account_id: String,
    /// `--hook-command ARN=COMMAND`: the local command that stands for a Lambda hook.
    pub hook_commands: Vec<(String, Vec<String>)>,
}

/// Who sent a request.
#[derive(Debug, Clone)]
pub struct Caller {
    pub client_id: String,
    pub certificate_id: String,
}

/// The service state shared by all connections.
#[derive(Debug)]
pub struct Service {
    pub ca: Arc<Ca>,
    pub store: Arc<Store>,
    pub config: ServiceConfig,
    /// `errors.json`: what the user changed of the rejections.
    pub errors: ErrorTable,
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Random bytes in a token: 345 bytes are 460 base64 characters.
const TOKEN_BYTES: usize = 345;

/// A new ownership token. AWS documents tokens as opaque strings; AWS's own fleet provisioning
/// demos hold them in 512-byte buffers (aws-iot-device-sdk-embedded-C,
/// `OWNERSHIP_TOKEN_BUFFER_LENGTH`), the FreeRTOS one in 1024. [inferred] Length and alphabet:
/// 460 characters of the base64 alphabet (`A-Z a-z 0-9 + /`), several hundred as real ones
/// are, so that firmware which sizes its buffer by a short test token fails here first.
fn new_token() -> Result<String, Reply> {
    use ring::rand::SecureRandom;
    let mut raw = [0u8; TOKEN_BYTES];
    ring::rand::SystemRandom::new()
        .fill(&mut raw)
        .map_err(|_| Reply::for_status(500))?;
    Ok(base64(&raw))
}

/// Standard base64 without padding (the input length is a multiple of 3 here).
fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..=chunk.len() {
            out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
        }
    }
    out
}

/// A failure inside the emulator: logged with its cause, answered without it (no SQLite or
/// Rust text reaches the device).
fn internal(e: impl std::fmt::Display) -> Reply {
    crate::log!("internal error: {e}");
    Reply::rejected(500, "InternalError", "Internal error")
}

fn invalid_payload(message: impl Into<String>) -> Reply {
    Reply::rejected(400, "InvalidPayload", message)
}

impl Service {
    /// Answers one request.
    pub async fn handle(
        &self,
        api: &Api,
        format: Format,
        payload: &[u8],
        caller: &Caller,
    ) -> Reply {
        let result = match api {
            Api::CreateKeysAndCertificate => self.create_keys(format, payload).await,
            Api::CreateCertificateFromCsr => self.create_from_csr(format, payload).await,
            Api::RegisterThing { template } => {
                self.register(template, format, payload, caller).await
            }
        };
        self.errors.apply(result.unwrap_or_else(|r| r))
    }

    async fn create_keys(&self, format: Format, payload: &[u8]) -> Result<Reply, Reply> {
        // AWS accepts an empty payload, `{}`, or a map with extra keys.
        if !payload.is_empty() {
            match decode(format, payload) {
                Ok(Value::Object(_)) => {}
                Ok(_) => return Err(invalid_payload("The payload must be an object")),
                Err(e) => return Err(invalid_payload(e)),
            }
        }
        let ca = self.ca.clone();
        let kind = self.config.key_kind;
        let (issued, key_pem) =
            tokio::task::spawn_blocking(move || ca.create_keys_and_certificate(kind))
                .await
                .map_err(internal)?
                .map_err(internal)?;
        let token = self.store_pending(&issued.id, &issued.pem, "CreateKeysAndCertificate")?;
        Ok(Reply::Accepted(json!({
            "certificateId": issued.id,
            "certificatePem": issued.pem,
            "privateKey": key_pem,
            "certificateOwnershipToken": token,
        })))
    }

    async fn create_from_csr(&self, format: Format, payload: &[u8]) -> Result<Reply, Reply> {
        let request = decode(format, payload).map_err(invalid_payload)?;
        if !request.is_object() {
            return Err(invalid_payload("The payload must be an object"));
        }
        let csr = match request.get("certificateSigningRequest") {
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            Some(Value::String(_)) | None | Some(Value::Null) => {
                return Err(Reply::rejected(
                    400,
                    "InvalidCertificateSigningRequest",
                    "Certificate signing request cannot be empty.",
                ));
            }
            Some(_) => {
                return Err(invalid_payload(
                    "certificateSigningRequest must be a string",
                ));
            }
        };
        let ca = self.ca.clone();
        let issued = tokio::task::spawn_blocking(move || ca.issue_from_csr(&csr))
            .await
            .map_err(internal)?
            .map_err(|e| Reply::rejected(400, "InvalidCertificateSigningRequest", e.0))?;
        let token = self.store_pending(&issued.id, &issued.pem, "CreateCertificateFromCsr")?;
        Ok(Reply::Accepted(json!({
            "certificateOwnershipToken": token,
            "certificateId": issued.id,
            "certificatePem": issued.pem,
        })))
    }

    fn store_pending(&self, id: &str, pem: &str, origin: &str) -> Result<String, Reply> {
        let token = new_token()?;
        let now = now_ms();
        let ttl = i64::try_from(self.config.token_ttl.as_millis()).unwrap_or(i64::MAX);
        self.store
            .insert_pending(id, pem, origin, &token, now, now.saturating_add(ttl))
            .map_err(internal)?;
        Ok(token)
    }

    /// Reads `templates/NAME.json`.
    pub fn load_template(&self, name: &str) -> Result<TemplateFile, Reply> {
        let not_found = || {
            Reply::rejected(
                404,
                "ResourceNotFound",
                format!("The provisioning template {name} does not exist."),
            )
        };
        if !valid_template_name(name) {
            return Err(not_found());
        }
        let path = self.config.templates_dir.join(format!("{name}.json"));
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(not_found()),
            Err(e) => return Err(internal(e)),
        };
        let file = template::parse_template_file(&text).map_err(|e| {
            Reply::rejected(
                400,
                "InvalidTemplate",
                format!("The provisioning template {name} is invalid: {e}"),
            )
        })?;
        let mut file = file;
        if let Some(hook) = &mut file.hook {
            if let Some(arn) = &hook.target_arn {
                hook.command = self
                    .config
                    .hook_commands
                    .iter()
                    .find(|(a, _)| a == arn)
                    .map(|(_, c)| c.clone())
                    .ok_or_else(|| {
                        Reply::rejected(
                            400,
                            "InvalidTemplate",
                            format!(
                                "The provisioning template {name} has a pre-provisioning hook \
                                 {arn} that the emulator has no --hook-command for."
                            ),
                        )
                    })?;
            }
        }
        if !file.enabled {
            return Err(Reply::rejected(
                404,
                "ResourceNotFound",
                format!("The provisioning template {name} is disabled."),
            ));
        }
        Ok(file)
    }

    /// Refuses an outcome that names a thing type, thing group, billing group or policy that
    /// does not exist, as AWS does; a policy named by `PolicyName` gets its document.
    /// [inferred] The status, code and messages: 404 ResourceNotFound, as the control plane's
    /// ResourceNotFoundException; the fleet provisioning service's own text is not public.
    fn check_resources(&self, outcome: &mut TemplateOutcome) -> Result<(), Reply> {
        let missing = |what: &str, name: &str| {
            Reply::rejected(
                404,
                "ResourceNotFound",
                format!("The {what} {name} does not exist."),
            )
        };
        let resources = Resources::load(&self.config.resources).map_err(internal)?;
        if let Some(thing) = &outcome.thing {
            // AWS IoT quotas: 3 attributes for a thing without a thing type, 50 with one; a
            // thing in at most 10 thing groups. [inferred] The rejection's status, code, text.
            let max_attributes = if thing.thing_type.is_some() { 50 } else { 3 };
            if thing.attributes.len() > max_attributes {
                return Err(Reply::rejected(
                    400,
                    "InvalidRequest",
                    format!(
                        "A thing {} can have at most {max_attributes} attributes; the template gives {}.",
                        if thing.thing_type.is_some() { "with a thing type" } else { "without a thing type" },
                        thing.attributes.len()
                    ),
                ));
            }
            if thing.groups.len() > 10 {
                return Err(Reply::rejected(
                    400,
                    "InvalidRequest",
                    format!(
                        "A thing can be in at most 10 thing groups; the template gives {}.",
                        thing.groups.len()
                    ),
                ));
            }
            if let Some(t) = &thing.thing_type {
                if !resources.thing_types.contains(t) {
                    return Err(missing("thing type", t));
                }
            }
            for g in &thing.groups {
                if !resources.thing_groups.contains(g) {
                    return Err(missing("thing group", g));
                }
            }
            if let Some(b) = &thing.billing_group {
                if !resources.billing_groups.contains(b) {
                    return Err(missing("billing group", b));
                }
            }
        }
        for policy in &mut outcome.policies {
            if let PolicySpec::Named(name) = policy {
                let document = crate::resources::load_policy(&self.config.policies_dir, name)
                    .map_err(internal)?
                    .ok_or_else(|| missing("policy", name))?;
                *policy = PolicySpec::Document {
                    name: name.clone(),
                    document,
                };
            }
        }
        Ok(())
    }

    /// The policies attached to a certificate: the claim policy file for the claim
    /// certificate, the registry's for the others. A document that does not parse (a policy
    /// edited by hand) allows nothing; the reason is logged.
    pub fn policies_for(&self, certificate_id: &str) -> Vec<Policy> {
        let claim = matches!(
            self.store.certificate_origin(certificate_id),
            Ok(Some(ref origin)) if origin == "claim"
        );
        if claim {
            let parsed = std::fs::read_to_string(&self.config.claim_policy)
                .map_err(|e| e.to_string())
                .and_then(|text| Policy::parse("claim", &text));
            return match parsed {
                Ok(p) => vec![p],
                Err(e) => {
                    crate::log!("claim-policy.json unusable, allowing nothing: {e}");
                    vec![Policy::empty("claim")]
                }
            };
        }
        match self.store.attached_policies(certificate_id) {
            Ok(rows) => rows
                .into_iter()
                .map(|(name, doc)| {
                    Policy::parse(&name, &doc).unwrap_or_else(|e| {
                        crate::log!("policy {name} unusable, allowing nothing: {e}");
                        Policy::empty(&name)
                    })
                })
                .collect(),
            Err(e) => {
                crate::log!("cannot read the policies of {certificate_id}: {e}");
                Vec::new()
            }
        }
    }

    /// What policy variables resolve to for a connection of `certificate_id` as `client_id`.
    pub fn policy_context(
        &self,
        certificate_id: &str,
        client_id: &str,
        cert_der: &[u8],
    ) -> Context {
        let thing = self
            .store
            .attached_thing(certificate_id, client_id)
            .ok()
            .flatten()
            .map(|(thing_type, attributes)| ConnThing {
                name: client_id.to_owned(),
                thing_type,
                attributes,
            });
        let (subject, issuer) = match x509_parser::parse_x509_certificate(cert_der) {
            Ok((_, cert)) => (
                crate::policy::name_fields(cert.subject()),
                crate::policy::name_fields(cert.issuer()),
            ),
            Err(_) => Default::default(),
        };
        Context {
            region: self.config.region.clone(),
            account: self.config.account_id.clone(),
            client_id: client_id.to_owned(),
            certificate_id: certificate_id.to_owned(),
            thing,
            subject,
            issuer,
        }
    }

    async fn register(
        &self,
        name: &str,
        format: Format,
        payload: &[u8],
        caller: &Caller,
    ) -> Result<Reply, Reply> {
        let request = decode(format, payload).map_err(invalid_payload)?;
        if !request.is_object() {
            return Err(invalid_payload("The payload must be an object"));
        }
        let token = match request.get("certificateOwnershipToken") {
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            Some(Value::String(_)) | None | Some(Value::Null) => {
                return Err(Reply::rejected(
                    400,
                    "InvalidCertificateOwnershipToken",
                    "Certificate ownership token cannot be empty.",
                ));
            }
            Some(_) => {
                return Err(invalid_payload(
                    "certificateOwnershipToken must be a string",
                ));
            }
        };
        let mut params = BTreeMap::new();
        match request.get("parameters") {
            None | Some(Value::Null) => {}
            Some(Value::Object(map)) => {
                for (k, v) in map {
                    let Value::String(s) = v else {
                        return Err(invalid_payload(format!("parameters.{k} must be a string")));
                    };
                    check_parameter_size(k, s)?;
                    params.insert(k.clone(), s.clone());
                }
            }
            Some(_) => return Err(invalid_payload("parameters must be an object")),
        }
        let file = self.load_template(name)?;
        let bad_token = || {
            Reply::rejected(
                400,
                "InvalidCertificateOwnershipToken",
                "Certificate ownership token is invalid, expired or already used.",
            )
        };
        let (cert_id, cert_pem) = self
            .store
            .token_certificate(&token, now_ms())
            .map_err(internal)?
            .ok_or_else(bad_token)?;
        if let Some(spec) = &file.hook {
            let input = json!({
                "claimCertificateId": caller.certificate_id,
                "certificateId": cert_id,
                "certificatePem": cert_pem,
                "templateArn": format!(
                    "arn:aws:iot:{}:{}:provisioningtemplate/{name}",
                    self.config.region, self.config.account_id
                ),
                "clientId": caller.client_id,
                "parameters": params,
            });
            match hook::run(&spec.command, &input, self.config.hook_timeout).await {
                Verdict::Allow(overrides) => params.extend(overrides),
                Verdict::Deny(why) => {
                    return Err(Reply::rejected(
                        403,
                        "AccessDenied",
                        format!("The pre-provisioning hook rejected the request: {why}"),
                    ));
                }
            }
        }
        let mut outcome = template::evaluate(&file.body, &params, &cert_id)
            .map_err(|e| Reply::rejected(e.status, e.code, e.message))?;
        self.check_resources(&mut outcome)?;
        match self.store.register(&token, &cert_id, &outcome, now_ms()) {
            Ok(()) => {}
            Err(RegisterError::BadToken) => return Err(bad_token()),
            Err(RegisterError::Conflict(m)) => {
                return Err(Reply::rejected(409, "ConflictingResourceUpdate", m));
            }
            Err(RegisterError::Store(m)) => return Err(internal(m)),
        }
        let mut accepted = json!({ "deviceConfiguration": outcome.device_configuration });
        if let Some(thing) = outcome.thing {
            accepted["thingName"] = Value::String(thing.name);
        }
        Ok(Reply::Accepted(accepted))
    }
}

/// Longest parameter key and value, in characters (RegisterThing's `parameters`: "Key Length
/// Constraints: Maximum length of 2048", "Value Length Constraints: Maximum length of 4096",
/// AWS IoT API reference). The MQTT API's limits are not documented: the same are applied
/// [inferred], refused with 400 `InvalidParameters` [inferred].
const MAX_PARAMETER_KEY: usize = 2048;
const MAX_PARAMETER_VALUE: usize = 4096;

fn check_parameter_size(key: &str, value: &str) -> Result<(), Reply> {
    let key_chars = key.chars().count();
    let value_chars = value.chars().count();
    let shown: String = key.chars().take(64).collect();
    let shown = if key_chars > 64 {
        format!("{shown}…")
    } else {
        shown
    };
    let problem = if key_chars > MAX_PARAMETER_KEY {
        format!("parameter key {shown} is {key_chars} characters long; at most {MAX_PARAMETER_KEY} are allowed")
    } else if value_chars > MAX_PARAMETER_VALUE {
        format!("the value of parameter {shown} is {value_chars} characters long; at most {MAX_PARAMETER_VALUE} are allowed")
    } else {
        return Ok(());
    };
    Err(Reply::rejected(400, "InvalidParameters", problem))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_table() {
        let cbor_map = encode(Format::Cbor, &json!({"a": "b"}));
        let mut trailing = cbor_map.clone();
        trailing.push(0);
        let rows: Vec<(Format, Vec<u8>, Result<Value, ()>)> = vec![
            (
                Format::Json,
                b"{\"a\":\"b\"}".to_vec(),
                Ok(json!({"a": "b"})),
            ),
            (Format::Json, b"{".to_vec(), Err(())),
            (Format::Json, b"".to_vec(), Err(())),
            (Format::Json, b"\xff\xfe".to_vec(), Err(())),
            (Format::Cbor, cbor_map, Ok(json!({"a": "b"}))),
            (Format::Cbor, trailing, Err(())),
            (Format::Cbor, vec![0xa1], Err(())),
            (Format::Cbor, vec![0x61, 0xff], Err(())),
            (Format::Cbor, b"{\"a\":1}".to_vec(), Err(())),
        ];
        for (fmt, bytes, want) in rows {
            assert_eq!(
                decode(fmt, &bytes).map_err(|_| ()),
                want,
                "{fmt:?} {bytes:?}"
            );
        }
    }

    #[test]
    fn tokens_are_460_base64_characters() {
        assert_eq!(base64(b"Man"), "TWFu");
        assert_eq!(base64(b"Ma"), "TWE");
        assert_eq!(base64(&[0xfb, 0xff, 0xbf]), "+/+/");
        let a = new_token().unwrap();
        let b = new_token().unwrap();
        assert_eq!(a.len(), 460);
        assert_ne!(a, b);
        assert!(a
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'+' || c == b'/'));
    }

    #[test]
    fn parameter_sizes_as_the_api_reference_gives_them() {
        let long = |n: usize| "é".repeat(n);
        let code = |r: Result<(), Reply>| match r {
            Ok(()) => None,
            Err(Reply::Rejected { status, code, .. }) => Some((status, code)),
            Err(other) => panic!("{other:?}"),
        };
        let invalid = Some((400, "InvalidParameters".to_owned()));
        // Characters count, not bytes.
        assert_eq!(code(check_parameter_size(&long(2048), &long(4096))), None);
        assert_eq!(code(check_parameter_size(&long(2049), "v")), invalid);
        assert_eq!(code(check_parameter_size("k", &long(4097))), invalid);
        assert_eq!(code(check_parameter_size("", "")), None);
        // The message shows a long key cut short, and never the value.
        let Err(Reply::Rejected { message, .. }) = check_parameter_size("k", &"s".repeat(5000))
        else {
            panic!("refused")
        };
        assert!(!message.contains("sss"), "{message}");
        let Err(Reply::Rejected { message, .. }) = check_parameter_size(&"k".repeat(3000), "")
        else {
            panic!("refused")
        };
        assert!(message.len() < 200, "{message}");
    }

    #[test]
    fn rejection_payloads_carry_integer_status() {
        let r = Reply::for_status(429);
        for fmt in [Format::Json, Format::Cbor] {
            let v = decode(fmt, &r.encode(fmt)).unwrap();
            assert_eq!(v["statusCode"], json!(429));
            assert_eq!(v["errorCode"], json!("Throttling"));
        }
    }
}
