//! Fleet-provisioning templates: loading template files and evaluating a
//! template body for `RegisterThing`.
//!
//! The accepted template language follows AWS IoT's provisioning templates
//! (<https://docs.aws.amazon.com/iot/latest/developerguide/provision-template.html>):
//!
//! * `Parameters`: `{Name: {"Type": "String", "Default"?: string}}`. Only
//!   `String` parameters exist. A parameter is resolved only when the template
//!   uses it; request parameters that are not declared are ignored.
//! * Pseudo parameters, which always win over declared or supplied values:
//!   `AWS::IoT::Certificate::Id` (the certificate being registered), and the
//!   fixed emulator values `AWS::Region` = `us-east-1` and
//!   `AWS::AccountId` = `123456789012`.
//! * `Mappings`: `{Map: {TopKey: {SecondKey: string | [string]}}}`, read with
//!   `Fn::FindInMap`; no intrinsic functions inside.
//! * Intrinsic functions: `Ref`, `Fn::Join`, `Fn::Select`, `Fn::Split`,
//!   `Fn::Sub` and `Fn::FindInMap`, nested at most [`MAX_DEPTH`] levels.
//! * `Resources`: at most one `AWS::IoT::Thing`, at most one
//!   `AWS::IoT::Certificate` and any number of `AWS::IoT::Policy`.
//! * `DeviceConfiguration`: a flat map of names to strings.
//!
//! Nothing here panics or recurses without a bound, whatever the input.

use std::collections::BTreeMap;
use std::fmt;
use std::fmt::Write as _;

use serde_json::{Map, Value};

/// The demo template shipped with the emulator.
pub const DEMO_TEMPLATE: &str = include_str!("../templates/DemoTemplate.json");

/// How deeply values and intrinsic functions may nest inside a template
/// property before evaluation is refused.
pub const MAX_DEPTH: usize = 32;

/// How deeply an inline `PolicyDocument` object may nest.
const MAX_POLICY_DOCUMENT_DEPTH: usize = 64;

const CERTIFICATE_ID_PARAMETER: &str = "AWS::IoT::Certificate::Id";
const REGION_PARAMETER: &str = "AWS::Region";
const ACCOUNT_ID_PARAMETER: &str = "AWS::AccountId";
const EMULATOR_REGION: &str = "us-east-1";
const EMULATOR_ACCOUNT_ID: &str = "123456789012";

const INVALID_PARAMETERS: &str = "InvalidParameters";
const INVALID_REQUEST: &str = "InvalidRequest";

const THING_TYPE: &str = "AWS::IoT::Thing";
const CERTIFICATE_TYPE: &str = "AWS::IoT::Certificate";
const POLICY_TYPE: &str = "AWS::IoT::Policy";

/// Characters (besides ASCII letters and digits) AWS allows in thing, thing
/// type, thing group and billing group names.
const NAME_EXTRA: &str = ":_-";
/// Characters (besides ASCII letters and digits) allowed in attribute names.
const ATTRIBUTE_NAME_EXTRA: &str = "_.,@/:#-";
/// Characters (besides ASCII letters and digits) allowed in attribute values.
const ATTRIBUTE_VALUE_EXTRA: &str = "_.,@/:#=[]-";
/// Characters (besides ASCII letters and digits) allowed in policy names.
const POLICY_NAME_EXTRA: &str = "_+=,.@-";

/// An error that becomes a RegisterThing rejection: statusCode, errorCode, errorMessage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateError {
    pub status: u16,
    pub code: &'static str,
    pub message: String,
}

impl TemplateError {
    fn invalid_request(message: impl Into<String>) -> Self {
        Self {
            status: 400,
            code: INVALID_REQUEST,
            message: message.into(),
        }
    }

    fn invalid_parameters(message: impl Into<String>) -> Self {
        Self {
            status: 400,
            code: INVALID_PARAMETERS,
            message: message.into(),
        }
    }

    /// Prefixes a template-shape error with where in the template it happened.
    /// Parameter errors keep AWS's exact wording.
    fn within(mut self, path: &str) -> Self {
        if self.code == INVALID_REQUEST {
            self.message = format!("{path}: {}", self.message);
        }
        self
    }
}

impl fmt::Display for TemplateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {}", self.status, self.code, self.message)
    }
}

impl std::error::Error for TemplateError {}

/// What to do with a property of a thing that already exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Override {
    Merge,
    Replace,
    DoNothing,
    Fail,
}

/// A thing resource's `OverrideSettings`.
///
/// AWS documents the four actions but not what happens when a template has no
/// `OverrideSettings` (or leaves a property out). The emulator's default, per
/// property, is:
///
/// * `attribute_payload`: [`Override::Replace`]: re-provisioning leaves the
///   thing with exactly the attributes the template declares;
/// * `thing_groups`: [`Override::DoNothing`]: existing group memberships,
///   which may have been managed outside provisioning, are left alone;
/// * `thing_type_name`: [`Override::DoNothing`]: an existing thing keeps its
///   type (changing a type is the kind of change AWS asks for explicitly).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverrideSettings {
    pub attribute_payload: Override,
    pub thing_groups: Override,
    pub thing_type_name: Override,
}

impl Default for OverrideSettings {
    fn default() -> Self {
        Self {
            attribute_payload: Override::Replace,
            thing_groups: Override::DoNothing,
            thing_type_name: Override::DoNothing,
        }
    }
}

/// The thing a template asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThingSpec {
    pub name: String,
    pub attributes: BTreeMap<String, String>,
    pub thing_type: Option<String>,
    /// In template order, duplicates removed.
    pub groups: Vec<String>,
    pub billing_group: Option<String>,
    pub overrides: OverrideSettings,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertStatus {
    Active,
    Inactive,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PolicySpec {
    /// `PolicyName`: attach an existing (or, in the emulator, auto-created) policy by name.
    Named(String),
    /// `PolicyDocument`: an inline policy; `name` is the lowercase hex SHA-256 of the document text as AWS names such policies.
    Document { name: String, document: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateOutcome {
    pub thing: Option<ThingSpec>,
    /// From the AWS::IoT::Certificate resource's Status; None when the template has no certificate resource.
    pub certificate_status: Option<CertStatus>,
    /// In order of the resources' logical ids, duplicates removed.
    pub policies: Vec<PolicySpec>,
    pub device_configuration: BTreeMap<String, String>,
}

/// Template metadata + body as stored in DATA_DIR/templates/NAME.json.
#[derive(Debug, Clone, PartialEq)]
pub struct TemplateFile {
    pub body: serde_json::Value,
    pub enabled: bool,
    pub hook: Option<HookSpec>,
}

/// A pre-provisioning hook: a local program run instead of AWS's Lambda.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookSpec {
    pub command: Vec<String>,
}

/// Parse a template file. Two accepted shapes:
/// (a) a bare AWS template body: {"Parameters":..., "Resources":..., ...}  => enabled = true, no hook;
/// (b) a wrapper like AWS's DescribeProvisioningTemplate output:
///     {"templateBody": <object, or a string containing the JSON body>, "enabled": bool (default true),
///      "preProvisioningHook": {"command": ["/path/prog", "arg", ...]}}   (command: non-empty array of strings)
///
/// Anything else (not JSON, body not an object, Resources missing or not an object, wrong types) is Err with a clear message.
///
/// A file is told to be a wrapper by its `templateBody` key; other wrapper
/// keys (`templateName`, `description`, ...) are ignored, and `null` counts as
/// absent for `enabled` and `preProvisioningHook`. The body is also checked
/// for everything that can be checked without parameters: the shapes of
/// `Parameters`, `Mappings`, `Resources` (types, property names,
/// `OverrideSettings`) and `DeviceConfiguration`.
pub fn parse_template_file(text: &str) -> Result<TemplateFile, String> {
    let value: Value =
        serde_json::from_str(text).map_err(|e| format!("template file is not valid JSON: {e}"))?;
    let Value::Object(mut top) = value else {
        return Err(format!(
            "template file must be a JSON object, found {}",
            kind_of(&value)
        ));
    };
    let (body, enabled, hook) = match top.remove("templateBody") {
        None => (Value::Object(top), true, None),
        Some(raw_body) => {
            let body = match raw_body {
                Value::Object(map) => Value::Object(map),
                Value::String(inner) => {
                    let parsed: Value = serde_json::from_str(&inner)
                        .map_err(|e| format!("templateBody is not valid JSON: {e}"))?;
                    if !parsed.is_object() {
                        return Err(format!(
                            "templateBody must contain a JSON object, found {}",
                            kind_of(&parsed)
                        ));
                    }
                    parsed
                }
                other => {
                    return Err(format!(
                        "templateBody must be an object or a string containing a JSON object, found {}",
                        kind_of(&other)
                    ));
                }
            };
            let enabled = match top.get("enabled") {
                None | Some(Value::Null) => true,
                Some(Value::Bool(b)) => *b,
                Some(other) => {
                    return Err(format!(
                        "enabled must be a boolean, found {}",
                        kind_of(other)
                    ));
                }
            };
            let hook = match top.get("preProvisioningHook") {
                None | Some(Value::Null) => None,
                Some(hook) => Some(parse_hook(hook)?),
            };
            (body, enabled, hook)
        }
    };
    validate_body(&body).map_err(|e| format!("invalid template body: {}", e.message))?;
    Ok(TemplateFile {
        body,
        enabled,
        hook,
    })
}

fn parse_hook(hook: &Value) -> Result<HookSpec, String> {
    const SHAPE: &str = "preProvisioningHook must be {\"command\": [\"/path/prog\", \"arg\", ...]}";
    let Value::Object(hook) = hook else {
        return Err(format!("{SHAPE}, found {}", kind_of(hook)));
    };
    let Some(Value::Array(items)) = hook.get("command") else {
        return Err(format!(
            "{SHAPE}: command is missing or not an array (a targetArn hook is not supported)"
        ));
    };
    let mut command = Vec::with_capacity(items.len());
    for item in items {
        match item {
            Value::String(s) => command.push(s.clone()),
            other => {
                return Err(format!(
                    "{SHAPE}: command items must be strings, found {}",
                    kind_of(other)
                ));
            }
        }
    }
    match command.first() {
        None => Err(format!("{SHAPE}: command must not be empty")),
        Some(program) if program.is_empty() => Err(format!(
            "{SHAPE}: the program (first item) must not be empty"
        )),
        Some(_) => Ok(HookSpec { command }),
    }
}

/// Checks everything about a body that does not need parameter values.
fn validate_body(body: &Value) -> Result<(), TemplateError> {
    let body = body_object(body)?;
    parse_parameters(body)?;
    parse_mappings(body)?;
    parse_resources(body)?;
    match body.get("DeviceConfiguration") {
        None | Some(Value::Null) | Some(Value::Object(_)) => Ok(()),
        Some(other) => Err(TemplateError::invalid_request(format!(
            "DeviceConfiguration must be an object, found {}",
            kind_of(other)
        ))),
    }
}

/// Evaluate a template body for RegisterThing. `params` are the request's parameters (already merged with any
/// pre-provisioning hook overrides); `certificate_id` is the id of the certificate being registered.
///
/// Every error has status 400 and one of two codes:
///
/// | code | when |
/// |---|---|
/// | `InvalidParameters` | a `Ref` or `${Var}` names a declared parameter that was not supplied and has no `Default` (`Missing parameter: NAME`), or names nothing declared (`Cannot resolve reference value: NAME`, AWS's own wording) |
/// | `InvalidRequest` | anything else wrong with the template, the message starting with where: a section or resource of the wrong shape; an unsupported resource type, property or `OverrideSettings` value; more than one thing or certificate; a missing `ThingName` or `CertificateId`; a `CertificateId` other than `certificate_id`; a `Status` other than Active/Inactive; a policy with both or neither of `PolicyName` and `PolicyDocument`, or a `PolicyDocument` string that is not a JSON object; a name or attribute that breaks AWS's length or character rules; an intrinsic function of the wrong shape or unknown (e.g. `Fn::If`, `Fn::GetAtt`); a `Fn::Select` index that is not a non-negative integer or is out of range; an empty `Fn::Split` delimiter; a `Fn::FindInMap` map or key that does not exist; a list where a string is needed (or the reverse); nesting deeper than [`MAX_DEPTH`] |
///
/// Defaults: a certificate resource without `Status` is `Active` (AWS: "Defaults
/// to ACTIVE"); a thing without `OverrideSettings` gets [`OverrideSettings::default`].
/// Only `CertificateId` can name the certificate (AWS: only certificate ids can
/// be used with a fleet provisioning template). `PackageVersions` on a thing is
/// accepted and ignored. An inline `PolicyDocument` object is taken as is
/// (intrinsics inside it are not evaluated) and written as compact JSON with
/// keys sorted, so its name does not depend on key order.
pub fn evaluate(
    body: &serde_json::Value,
    params: &BTreeMap<String, String>,
    certificate_id: &str,
) -> Result<TemplateOutcome, TemplateError> {
    let body = body_object(body)?;
    let declared = parse_parameters(body)?;
    let mappings = parse_mappings(body)?;
    let resources = parse_resources(body)?;
    let evaluator = Evaluator {
        declared,
        params,
        mappings,
        certificate_id,
    };
    let mut outcome = TemplateOutcome {
        thing: None,
        certificate_status: None,
        policies: Vec::new(),
        device_configuration: BTreeMap::new(),
    };
    for resource in &resources {
        match &resource.kind {
            ResourceKind::Thing(overrides) => {
                outcome.thing = Some(evaluator.thing(resource, overrides)?);
            }
            ResourceKind::Certificate => {
                outcome.certificate_status = Some(evaluator.certificate(resource)?);
            }
            ResourceKind::Policy => {
                let policy = evaluator.policy(resource)?;
                if !outcome.policies.contains(&policy) {
                    outcome.policies.push(policy);
                }
            }
        }
    }
    outcome.device_configuration =
        evaluator.device_configuration(body.get("DeviceConfiguration"))?;
    Ok(outcome)
}

fn body_object(body: &Value) -> Result<&Map<String, Value>, TemplateError> {
    match body {
        Value::Object(map) => Ok(map),
        other => Err(TemplateError::invalid_request(format!(
            "the template body must be a JSON object, found {}",
            kind_of(other)
        ))),
    }
}

/// Declared parameters and their defaults.
fn parse_parameters(
    body: &Map<String, Value>,
) -> Result<BTreeMap<&str, Option<&str>>, TemplateError> {
    let mut declared = BTreeMap::new();
    let section = match body.get("Parameters") {
        None | Some(Value::Null) => return Ok(declared),
        Some(Value::Object(section)) => section,
        Some(other) => {
            return Err(TemplateError::invalid_request(format!(
                "Parameters must be an object, found {}",
                kind_of(other)
            )));
        }
    };
    for (name, declaration) in section {
        let err =
            |what: String| TemplateError::invalid_request(format!("Parameters.{name}: {what}"));
        let Value::Object(declaration) = declaration else {
            return Err(err(format!(
                "must be an object like {{\"Type\": \"String\"}}, found {}",
                kind_of(declaration)
            )));
        };
        match declaration.get("Type") {
            Some(Value::String(t)) if t == "String" => {}
            Some(Value::String(t)) => {
                return Err(err(format!(
                    "unsupported Type '{t}' (only String is supported)"
                )));
            }
            None => return Err(err("Type is required".to_owned())),
            Some(other) => {
                return Err(err(format!(
                    "Type must be a string, found {}",
                    kind_of(other)
                )));
            }
        }
        let default = match declaration.get("Default") {
            None | Some(Value::Null) => None,
            Some(Value::String(d)) => Some(d.as_str()),
            Some(other) => {
                return Err(err(format!(
                    "Default must be a string, found {}",
                    kind_of(other)
                )));
            }
        };
        declared.insert(name.as_str(), default);
    }
    Ok(declared)
}

fn parse_mappings(body: &Map<String, Value>) -> Result<Option<&Map<String, Value>>, TemplateError> {
    let section = match body.get("Mappings") {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Object(section)) => section,
        Some(other) => {
            return Err(TemplateError::invalid_request(format!(
                "Mappings must be an object, found {}",
                kind_of(other)
            )));
        }
    };
    for (map_name, top) in section {
        let Value::Object(top) = top else {
            return Err(TemplateError::invalid_request(format!(
                "Mappings.{map_name} must be an object, found {}",
                kind_of(top)
            )));
        };
        for (top_key, second) in top {
            let Value::Object(second) = second else {
                return Err(TemplateError::invalid_request(format!(
                    "Mappings.{map_name}.{top_key} must be an object, found {}",
                    kind_of(second)
                )));
            };
            for (second_key, value) in second {
                let ok = match value {
                    Value::String(_) => true,
                    Value::Array(items) => items.iter().all(Value::is_string),
                    _ => false,
                };
                if !ok {
                    return Err(TemplateError::invalid_request(format!(
                        "Mappings.{map_name}.{top_key}.{second_key} must be a string or a list of strings \
                         (Mappings cannot use parameters or intrinsic functions)"
                    )));
                }
            }
        }
    }
    Ok(Some(section))
}

enum ResourceKind {
    Thing(OverrideSettings),
    Certificate,
    Policy,
}

struct Resource<'a> {
    id: &'a str,
    kind: ResourceKind,
    properties: Option<&'a Map<String, Value>>,
}

impl<'a> Resource<'a> {
    /// A property's value; `null` counts as absent.
    fn property(&self, name: &str) -> Option<&'a Value> {
        self.properties
            .and_then(|p| p.get(name))
            .filter(|v| !v.is_null())
    }

    fn path(&self, property: &str) -> String {
        format!("Resources.{}.Properties.{property}", self.id)
    }

    fn error(&self, message: impl fmt::Display) -> TemplateError {
        TemplateError::invalid_request(format!("Resources.{}: {message}", self.id))
    }
}

/// The resources, sorted by logical id, with everything checked that does not
/// need parameter values.
fn parse_resources(body: &Map<String, Value>) -> Result<Vec<Resource<'_>>, TemplateError> {
    let section = match body.get("Resources") {
        Some(Value::Object(section)) => section,
        None => {
            return Err(TemplateError::invalid_request(
                "the template has no Resources section",
            ));
        }
        Some(other) => {
            return Err(TemplateError::invalid_request(format!(
                "Resources must be an object, found {}",
                kind_of(other)
            )));
        }
    };
    let mut resources = Vec::with_capacity(section.len());
    let (mut things, mut certificates) = (0usize, 0usize);
    for (id, declaration) in section {
        let err = |what: String| TemplateError::invalid_request(format!("Resources.{id}: {what}"));
        let Value::Object(declaration) = declaration else {
            return Err(err(format!(
                "a resource must be an object, found {}",
                kind_of(declaration)
            )));
        };
        let resource_type = match declaration.get("Type") {
            Some(Value::String(t)) => t.as_str(),
            None => return Err(err("Type is required".to_owned())),
            Some(other) => {
                return Err(err(format!(
                    "Type must be a string, found {}",
                    kind_of(other)
                )));
            }
        };
        let properties = match declaration.get("Properties") {
            None | Some(Value::Null) => None,
            Some(Value::Object(p)) => Some(p),
            Some(other) => {
                return Err(err(format!(
                    "Properties must be an object, found {}",
                    kind_of(other)
                )));
            }
        };
        let override_settings = declaration.get("OverrideSettings").filter(|v| !v.is_null());
        let kind = match resource_type {
            THING_TYPE => {
                things += 1;
                check_properties(
                    properties,
                    &[
                        "ThingName",
                        "AttributePayload",
                        "ThingTypeName",
                        "ThingGroups",
                        "BillingGroup",
                        "PackageVersions",
                    ],
                )
                .map_err(err)?;
                ResourceKind::Thing(parse_thing_overrides(override_settings).map_err(err)?)
            }
            CERTIFICATE_TYPE => {
                certificates += 1;
                for unsupported in [
                    "CertificateSigningRequest",
                    "CertificatePem",
                    "CACertificatePem",
                ] {
                    if properties.is_some_and(|p| p.contains_key(unsupported)) {
                        return Err(err(format!(
                            "{unsupported} cannot be used with fleet provisioning; \
                             use \"CertificateId\": {{\"Ref\": \"{CERTIFICATE_ID_PARAMETER}\"}}"
                        )));
                    }
                }
                check_properties(properties, &["CertificateId", "Status"]).map_err(err)?;
                check_certificate_overrides(override_settings).map_err(err)?;
                ResourceKind::Certificate
            }
            POLICY_TYPE => {
                check_properties(properties, &["PolicyName", "PolicyDocument"]).map_err(err)?;
                if override_settings.is_some() {
                    return Err(err(
                        "OverrideSettings are not available for policy resources".to_owned(),
                    ));
                }
                let present = |name: &str| {
                    properties
                        .and_then(|p| p.get(name))
                        .is_some_and(|v| !v.is_null())
                };
                match (present("PolicyName"), present("PolicyDocument")) {
                    (true, true) => {
                        return Err(err(
                            "specify PolicyName or PolicyDocument, not both".to_owned()
                        ));
                    }
                    (false, false) => {
                        return Err(err(
                            "either PolicyName or PolicyDocument is required".to_owned()
                        ));
                    }
                    _ => {}
                }
                ResourceKind::Policy
            }
            other => {
                return Err(err(format!(
                    "unsupported resource Type '{other}' (supported: {THING_TYPE}, \
                     {CERTIFICATE_TYPE}, {POLICY_TYPE})"
                )));
            }
        };
        resources.push(Resource {
            id: id.as_str(),
            kind,
            properties,
        });
    }
    if things > 1 {
        return Err(TemplateError::invalid_request(format!(
            "a template may declare at most one {THING_TYPE} resource, found {things}"
        )));
    }
    if certificates > 1 {
        return Err(TemplateError::invalid_request(format!(
            "a template may declare at most one {CERTIFICATE_TYPE} resource, found {certificates}"
        )));
    }
    resources.sort_by(|a, b| a.id.cmp(b.id));
    Ok(resources)
}

fn check_properties(
    properties: Option<&Map<String, Value>>,
    allowed: &[&str],
) -> Result<(), String> {
    let Some(properties) = properties else {
        return Ok(());
    };
    match properties.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(unknown) => Err(format!(
            "unsupported property '{unknown}' (supported: {})",
            allowed.join(", ")
        )),
        None => Ok(()),
    }
}

fn parse_override_value(key: &str, value: &Value, merge_allowed: bool) -> Result<Override, String> {
    let Value::String(text) = value else {
        return Err(format!(
            "OverrideSettings.{key} must be a string, found {}",
            kind_of(value)
        ));
    };
    let parsed = [
        ("MERGE", Override::Merge),
        ("REPLACE", Override::Replace),
        ("DO_NOTHING", Override::DoNothing),
        ("FAIL", Override::Fail),
    ]
    .into_iter()
    .find(|(name, _)| name.eq_ignore_ascii_case(text))
    .map(|(_, o)| o);
    match parsed {
        Some(Override::Merge) if !merge_allowed => Err(format!(
            "OverrideSettings.{key}: MERGE is valid only for AttributePayload and ThingGroups"
        )),
        Some(o) => Ok(o),
        None => Err(format!(
            "OverrideSettings.{key}: unknown value '{text}' (expected MERGE, REPLACE, DO_NOTHING or FAIL)"
        )),
    }
}

fn parse_thing_overrides(settings: Option<&Value>) -> Result<OverrideSettings, String> {
    let mut overrides = OverrideSettings::default();
    let Some(settings) = settings else {
        return Ok(overrides);
    };
    let Value::Object(settings) = settings else {
        return Err(format!(
            "OverrideSettings must be an object, found {}",
            kind_of(settings)
        ));
    };
    for (key, value) in settings {
        match key.as_str() {
            "AttributePayload" | "ATTRIBUTE_PAYLOAD" => {
                overrides.attribute_payload = parse_override_value(key, value, true)?;
            }
            "ThingGroups" | "THING_GROUPS" => {
                overrides.thing_groups = parse_override_value(key, value, true)?;
            }
            "ThingTypeName" | "THING_TYPE_NAME" => {
                overrides.thing_type_name = parse_override_value(key, value, false)?;
            }
            other => {
                return Err(format!(
                    "unsupported OverrideSettings key '{other}' \
                     (supported: AttributePayload, ThingGroups, ThingTypeName)"
                ));
            }
        }
    }
    Ok(overrides)
}

/// A certificate's `OverrideSettings` (for `Status`) are checked, then ignored:
/// the emulator always sets the certificate's status.
fn check_certificate_overrides(settings: Option<&Value>) -> Result<(), String> {
    let Some(settings) = settings else {
        return Ok(());
    };
    let Value::Object(settings) = settings else {
        return Err(format!(
            "OverrideSettings must be an object, found {}",
            kind_of(settings)
        ));
    };
    for (key, value) in settings {
        match key.as_str() {
            "Status" | "STATUS" => {
                parse_override_value(key, value, false)?;
            }
            other => {
                return Err(format!(
                    "unsupported OverrideSettings key '{other}' for a certificate (supported: Status)"
                ));
            }
        }
    }
    Ok(())
}

/// The result of evaluating a template value.
#[derive(Debug)]
enum Val {
    Str(String),
    List(Vec<String>),
}

struct Evaluator<'a> {
    declared: BTreeMap<&'a str, Option<&'a str>>,
    params: &'a BTreeMap<String, String>,
    mappings: Option<&'a Map<String, Value>>,
    certificate_id: &'a str,
}

impl Evaluator<'_> {
    fn thing(
        &self,
        resource: &Resource<'_>,
        overrides: &OverrideSettings,
    ) -> Result<ThingSpec, TemplateError> {
        let name_path = resource.path("ThingName");
        let name_value = resource
            .property("ThingName")
            .ok_or_else(|| resource.error("ThingName is required"))?;
        let name = self.string(name_value, &name_path)?;
        check_chars(&name_path, "thing name", &name, NAME_EXTRA, 1, 128)?;

        let mut attributes = BTreeMap::new();
        if let Some(payload) = resource.property("AttributePayload") {
            let path = resource.path("AttributePayload");
            let not_an_object = || {
                TemplateError::invalid_request(format!(
                    "{path}: must be an object of attribute names to values"
                ))
            };
            let Value::Object(payload) = payload else {
                return Err(not_an_object());
            };
            if intrinsic(payload).map_err(|e| e.within(&path))?.is_some() {
                return Err(not_an_object());
            }
            for (key, value) in payload {
                let path = format!("{path}.{key}");
                let value = self.string(value, &path)?;
                check_chars(&path, "attribute name", key, ATTRIBUTE_NAME_EXTRA, 1, 128)?;
                check_chars(
                    &path,
                    "attribute value",
                    &value,
                    ATTRIBUTE_VALUE_EXTRA,
                    0,
                    800,
                )?;
                attributes.insert(key.clone(), value);
            }
        }

        let thing_type = self.optional_name(resource, "ThingTypeName", "thing type name")?;

        let mut groups = Vec::new();
        if let Some(value) = resource.property("ThingGroups") {
            let path = resource.path("ThingGroups");
            let list = self
                .eval(value, 0)
                .and_then(|v| match v {
                    Val::List(list) => Ok(list),
                    Val::Str(_) => Err(TemplateError::invalid_request(
                        "must be a list of thing group names",
                    )),
                })
                .map_err(|e| e.within(&path))?;
            for group in list {
                check_chars(&path, "thing group name", &group, NAME_EXTRA, 1, 128)?;
                if !groups.contains(&group) {
                    groups.push(group);
                }
            }
        }

        let billing_group = self.optional_name(resource, "BillingGroup", "billing group name")?;

        Ok(ThingSpec {
            name,
            attributes,
            thing_type,
            groups,
            billing_group,
            overrides: overrides.clone(),
        })
    }

    fn optional_name(
        &self,
        resource: &Resource<'_>,
        property: &str,
        what: &str,
    ) -> Result<Option<String>, TemplateError> {
        let Some(value) = resource.property(property) else {
            return Ok(None);
        };
        let path = resource.path(property);
        let name = self.string(value, &path)?;
        check_chars(&path, what, &name, NAME_EXTRA, 1, 128)?;
        Ok(Some(name))
    }

    fn certificate(&self, resource: &Resource<'_>) -> Result<CertStatus, TemplateError> {
        let id_path = resource.path("CertificateId");
        let id_value = resource.property("CertificateId").ok_or_else(|| {
            resource.error(format_args!(
                "CertificateId is required (use {{\"Ref\": \"{CERTIFICATE_ID_PARAMETER}\"}})"
            ))
        })?;
        let id = self.string(id_value, &id_path)?;
        if id != self.certificate_id {
            return Err(TemplateError::invalid_request(format!(
                "{id_path}: '{id}' is not the certificate being registered ('{}')",
                self.certificate_id
            )));
        }
        let Some(status_value) = resource.property("Status") else {
            return Ok(CertStatus::Active);
        };
        let status_path = resource.path("Status");
        let status = self.string(status_value, &status_path)?;
        if status.eq_ignore_ascii_case("active") {
            Ok(CertStatus::Active)
        } else if status.eq_ignore_ascii_case("inactive") {
            Ok(CertStatus::Inactive)
        } else {
            Err(TemplateError::invalid_request(format!(
                "{status_path}: unsupported certificate status '{status}' (expected Active or Inactive)"
            )))
        }
    }

    fn policy(&self, resource: &Resource<'_>) -> Result<PolicySpec, TemplateError> {
        if let Some(value) = resource.property("PolicyName") {
            let path = resource.path("PolicyName");
            let name = self.string(value, &path)?;
            check_chars(&path, "policy name", &name, POLICY_NAME_EXTRA, 1, 128)?;
            return Ok(PolicySpec::Named(name));
        }
        let path = resource.path("PolicyDocument");
        let value = resource
            .property("PolicyDocument")
            .ok_or_else(|| resource.error("either PolicyName or PolicyDocument is required"))?;
        let document = match value {
            Value::Object(map) if intrinsic(map).map_err(|e| e.within(&path))?.is_none() => {
                let canonical = canonical_json(value, 0).map_err(|e| e.within(&path))?;
                serde_json::to_string(&canonical).map_err(|e| {
                    TemplateError::invalid_request(format!("{path}: cannot serialize: {e}"))
                })?
            }
            _ => {
                let text = self.string(value, &path)?;
                match serde_json::from_str::<Value>(&text) {
                    Ok(Value::Object(_)) => {}
                    _ => {
                        return Err(TemplateError::invalid_request(format!(
                            "{path}: the policy document is not a JSON object"
                        )));
                    }
                }
                text
            }
        };
        Ok(PolicySpec::Document {
            name: sha256_hex(&document),
            document,
        })
    }

    fn device_configuration(
        &self,
        section: Option<&Value>,
    ) -> Result<BTreeMap<String, String>, TemplateError> {
        let mut out = BTreeMap::new();
        let section = match section {
            None | Some(Value::Null) => return Ok(out),
            Some(Value::Object(section)) => section,
            Some(other) => {
                return Err(TemplateError::invalid_request(format!(
                    "DeviceConfiguration must be an object, found {}",
                    kind_of(other)
                )));
            }
        };
        for (key, value) in section {
            let path = format!("DeviceConfiguration.{key}");
            if let Value::Object(map) = value
                && intrinsic(map).map_err(|e| e.within(&path))?.is_none()
            {
                return Err(TemplateError::invalid_request(format!(
                    "{path}: DeviceConfiguration does not support nested objects"
                )));
            }
            out.insert(key.clone(), self.string(value, &path)?);
        }
        Ok(out)
    }

    /// Evaluates a property that must be a string, prefixing errors with `path`.
    fn string(&self, value: &Value, path: &str) -> Result<String, TemplateError> {
        self.eval_str(value, 0).map_err(|e| e.within(path))
    }

    fn eval_str(&self, value: &Value, depth: usize) -> Result<String, TemplateError> {
        match self.eval(value, depth)? {
            Val::Str(s) => Ok(s),
            Val::List(_) => Err(TemplateError::invalid_request(
                "expected a string, but the value is a list",
            )),
        }
    }

    fn eval_list(&self, value: &Value, depth: usize) -> Result<Vec<String>, TemplateError> {
        match self.eval(value, depth)? {
            Val::List(list) => Ok(list),
            Val::Str(_) => Err(TemplateError::invalid_request(
                "expected a list, but the value is a string",
            )),
        }
    }

    fn eval(&self, value: &Value, depth: usize) -> Result<Val, TemplateError> {
        if depth > MAX_DEPTH {
            return Err(TemplateError::invalid_request(format!(
                "values and intrinsic functions nest deeper than {MAX_DEPTH} levels"
            )));
        }
        match value {
            Value::String(s) => Ok(Val::Str(s.clone())),
            Value::Array(items) => items
                .iter()
                .map(|item| self.eval_str(item, depth + 1))
                .collect::<Result<Vec<_>, _>>()
                .map(Val::List),
            Value::Object(map) => match intrinsic(map)? {
                Some((function, argument)) => self.call(function, argument, depth + 1),
                None => Err(TemplateError::invalid_request(
                    "expected a string, a list or an intrinsic function, found an object",
                )),
            },
            other => Err(TemplateError::invalid_request(format!(
                "expected a string, found {}",
                kind_of(other)
            ))),
        }
    }

    fn call(&self, function: &str, argument: &Value, depth: usize) -> Result<Val, TemplateError> {
        match function {
            "Ref" => match argument {
                Value::String(name) => self.resolve(name).map(Val::Str),
                other => Err(TemplateError::invalid_request(format!(
                    "Ref takes a parameter name, found {}",
                    kind_of(other)
                ))),
            },
            "Fn::Join" => {
                let Some([delimiter, list]) = fixed_args::<2>(argument) else {
                    return Err(shape_error(function, "[delimiter, [values...]]"));
                };
                let delimiter = self.eval_str(delimiter, depth)?;
                let list = self.eval_list(list, depth)?;
                Ok(Val::Str(list.join(&delimiter)))
            }
            "Fn::Select" => {
                let Some([index, list]) = fixed_args::<2>(argument) else {
                    return Err(shape_error(function, "[index, [values...]]"));
                };
                let index = self.select_index(index, depth)?;
                let list = self.eval_list(list, depth)?;
                usize::try_from(index)
                    .ok()
                    .and_then(|i| list.get(i))
                    .cloned()
                    .map(Val::Str)
                    .ok_or_else(|| {
                        TemplateError::invalid_request(format!(
                            "Fn::Select index {index} is out of range for a list of {} element(s)",
                            list.len()
                        ))
                    })
            }
            "Fn::Split" => {
                let Some([delimiter, source]) = fixed_args::<2>(argument) else {
                    return Err(shape_error(function, "[delimiter, string]"));
                };
                let delimiter = self.eval_str(delimiter, depth)?;
                if delimiter.is_empty() {
                    return Err(TemplateError::invalid_request(
                        "Fn::Split delimiter must not be empty",
                    ));
                }
                let source = self.eval_str(source, depth)?;
                Ok(Val::List(
                    source
                        .split(delimiter.as_str())
                        .map(str::to_owned)
                        .collect(),
                ))
            }
            "Fn::Sub" => self.sub(argument, depth),
            "Fn::FindInMap" => {
                let Some([map_name, top_key, second_key]) = fixed_args::<3>(argument) else {
                    return Err(shape_error(
                        function,
                        "[MapName, TopLevelKey, SecondLevelKey]",
                    ));
                };
                let map_name = self.eval_str(map_name, depth)?;
                let top_key = self.eval_str(top_key, depth)?;
                let second_key = self.eval_str(second_key, depth)?;
                self.find_in_map(&map_name, &top_key, &second_key)
            }
            other => Err(TemplateError::invalid_request(format!(
                "unsupported intrinsic function '{other}' (supported: Ref, Fn::Join, Fn::Select, \
                 Fn::Split, Fn::Sub, Fn::FindInMap)"
            ))),
        }
    }

    fn select_index(&self, index: &Value, depth: usize) -> Result<u64, TemplateError> {
        let bad = |shown: &str| {
            TemplateError::invalid_request(format!(
                "Fn::Select index must be a non-negative integer, found {shown}"
            ))
        };
        match index {
            Value::Number(n) => n.as_u64().ok_or_else(|| bad(&n.to_string())),
            other => {
                let text = self.eval_str(other, depth)?;
                if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(bad(&format!("'{text}'")));
                }
                text.parse::<u64>().map_err(|_| bad(&format!("'{text}'")))
            }
        }
    }

    fn sub(&self, argument: &Value, depth: usize) -> Result<Val, TemplateError> {
        const SHAPE: &str = "\"text ${Name}\" or [\"text ${Var}\", {\"Var\": value}]";
        let (text, variables) = match argument {
            Value::String(text) => (text, BTreeMap::new()),
            Value::Array(items) => match items.as_slice() {
                [Value::String(text), Value::Object(vars)] => {
                    let mut variables = BTreeMap::new();
                    for (name, value) in vars {
                        let value = self.eval_str(value, depth).map_err(|e| {
                            if e.code == INVALID_REQUEST {
                                TemplateError::invalid_request(format!(
                                    "Fn::Sub variable '{name}': {}",
                                    e.message
                                ))
                            } else {
                                e
                            }
                        })?;
                        variables.insert(name.as_str(), value);
                    }
                    (text, variables)
                }
                _ => return Err(shape_error("Fn::Sub", SHAPE)),
            },
            _ => return Err(shape_error("Fn::Sub", SHAPE)),
        };
        let mut out = String::with_capacity(text.len());
        let mut rest = text.as_str();
        while let Some((before, after)) = rest.split_once("${") {
            out.push_str(before);
            if let Some(literal) = after.strip_prefix('!') {
                // `${!Literal}` is written out as `${Literal}`.
                out.push_str("${");
                rest = literal;
                continue;
            }
            let Some((name, after_name)) = after.split_once('}') else {
                // An unterminated `${` is plain text.
                out.push_str("${");
                rest = after;
                break;
            };
            if name.is_empty() {
                return Err(TemplateError::invalid_request(
                    "Fn::Sub: empty variable name '${}'",
                ));
            }
            match variables.get(name) {
                Some(value) => out.push_str(value),
                None => out.push_str(&self.resolve(name)?),
            }
            rest = after_name;
        }
        out.push_str(rest);
        Ok(Val::Str(out))
    }

    fn find_in_map(
        &self,
        map_name: &str,
        top_key: &str,
        second_key: &str,
    ) -> Result<Val, TemplateError> {
        let map = self
            .mappings
            .and_then(|m| m.get(map_name))
            .and_then(Value::as_object)
            .ok_or_else(|| {
                TemplateError::invalid_request(format!(
                    "Fn::FindInMap: no mapping named '{map_name}'"
                ))
            })?;
        let top = map.get(top_key).and_then(Value::as_object).ok_or_else(|| {
            TemplateError::invalid_request(format!(
                "Fn::FindInMap: mapping '{map_name}' has no key '{top_key}'"
            ))
        })?;
        let missing = || {
            TemplateError::invalid_request(format!(
                "Fn::FindInMap: mapping '{map_name}' has no key '{top_key}'.'{second_key}'"
            ))
        };
        match top.get(second_key).ok_or_else(missing)? {
            Value::String(s) => Ok(Val::Str(s.clone())),
            Value::Array(items) => items
                .iter()
                .map(|item| item.as_str().map(str::to_owned).ok_or_else(missing))
                .collect::<Result<Vec<_>, _>>()
                .map(Val::List),
            _ => Err(missing()),
        }
    }

    /// The value of a parameter or pseudo parameter.
    fn resolve(&self, name: &str) -> Result<String, TemplateError> {
        match name {
            CERTIFICATE_ID_PARAMETER => return Ok(self.certificate_id.to_owned()),
            REGION_PARAMETER => return Ok(EMULATOR_REGION.to_owned()),
            ACCOUNT_ID_PARAMETER => return Ok(EMULATOR_ACCOUNT_ID.to_owned()),
            _ => {}
        }
        match self.declared.get(name) {
            Some(default) => self
                .params
                .get(name)
                .map(String::as_str)
                .or(*default)
                .map(str::to_owned)
                .ok_or_else(|| {
                    TemplateError::invalid_parameters(format!("Missing parameter: {name}"))
                }),
            None => Err(TemplateError::invalid_parameters(format!(
                "Cannot resolve reference value: {name}"
            ))),
        }
    }
}

/// `Some((function, argument))` when `map` is an intrinsic function call: an
/// object whose only key is `Ref` or starts with `Fn::`.
fn intrinsic(map: &Map<String, Value>) -> Result<Option<(&str, &Value)>, TemplateError> {
    let is_function = |key: &str| key == "Ref" || key.starts_with("Fn::");
    let mut entries = map.iter();
    match (entries.next(), entries.next()) {
        (Some((key, argument)), None) if is_function(key) => Ok(Some((key.as_str(), argument))),
        _ if map.keys().any(|k| is_function(k)) => Err(TemplateError::invalid_request(
            "an intrinsic function object must have exactly one key",
        )),
        _ => Ok(None),
    }
}

/// The elements of an array argument with exactly `N` elements.
fn fixed_args<const N: usize>(argument: &Value) -> Option<&[Value; N]> {
    argument
        .as_array()
        .and_then(|items| items.as_slice().try_into().ok())
}

fn shape_error(function: &str, shape: &str) -> TemplateError {
    TemplateError::invalid_request(format!("{function} takes {shape}"))
}

fn check_chars(
    path: &str,
    what: &str,
    value: &str,
    extra: &str,
    min: usize,
    max: usize,
) -> Result<(), TemplateError> {
    let chars_ok = value
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || extra.contains(c));
    let len = value.chars().count();
    if chars_ok && (min..=max).contains(&len) {
        Ok(())
    } else {
        Err(TemplateError::invalid_request(format!(
            "{path}: invalid {what} '{value}' (must be {min}-{max} characters from [a-zA-Z0-9{extra}])"
        )))
    }
}

/// A copy of `value` with object keys in sorted order, so that serializing it
/// gives the same text whatever order the keys were written in.
fn canonical_json(value: &Value, depth: usize) -> Result<Value, TemplateError> {
    if depth > MAX_POLICY_DOCUMENT_DEPTH {
        return Err(TemplateError::invalid_request(format!(
            "the policy document nests deeper than {MAX_POLICY_DOCUMENT_DEPTH} levels"
        )));
    }
    Ok(match value {
        Value::Array(items) => Value::Array(
            items
                .iter()
                .map(|item| canonical_json(item, depth + 1))
                .collect::<Result<_, _>>()?,
        ),
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            let mut sorted = Map::new();
            for (key, item) in entries {
                sorted.insert(key.clone(), canonical_json(item, depth + 1)?);
            }
            Value::Object(sorted)
        }
        other => other.clone(),
    })
}

fn sha256_hex(text: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, text.as_bytes());
    let mut hex = String::with_capacity(64);
    for byte in digest.as_ref() {
        // Writing to a String cannot fail.
        let _ = write!(hex, "{byte:02x}");
    }
    hex
}

fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}
