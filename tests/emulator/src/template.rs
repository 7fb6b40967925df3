//! Fleet-provisioning templates: loading template files and evaluating a
//! template body for `RegisterThing`.
//!
//! The accepted template language follows AWS IoT's provisioning templates
//! (<https://docs.aws.amazon.com/iot/latest/developerguide/provision-template.html>):
//!
//! * `Parameters`: `{Name: {"Type": "String", "Default"?: string}}`. Only
//!   `String` parameters exist. Every declared parameter needs a value, from
//!   the request or its `Default`, whether the template uses it or not
//!   (`400 InvalidParameters "Missing parameter: NAME"`) [inferred: AWS's
//!   provision-template page says only that a parameter without a default "is
//!   not replaced with a value"; the stricter reading never passes here what
//!   could fail on AWS]. Request parameters that are not declared are ignored.
//! * Pseudo parameter `AWS::IoT::Certificate::Id` (the certificate being
//!   registered), which always wins over declared or supplied values.
//!   `AWS::Region` and `AWS::AccountId` are not provided: AWS answers
//!   `400 InvalidParameters "Cannot resolve reference value: AWS::Region"` to
//!   a template that uses them without declaring them (a real exchange); a
//!   template that declares them gets the supplied value or the default.
//! * Checked as AWS checks a template when it is created: the body is at
//!   most 10,240 characters (CreateProvisioningTemplate's limit), and the
//!   CloudFormation constructs fleet provisioning templates do not have are
//!   refused instead of silently ignored: sections `Conditions`, `Outputs`,
//!   `Transform`, `Rules`; resource keys `Condition`, `DependsOn`,
//!   `DeletionPolicy`, `UpdatePolicy`, `UpdateReplacePolicy`,
//!   `CreationPolicy` [inferred: AWS documents only Parameters, Mappings,
//!   Resources and DeviceConfiguration; other keys such as `Description` are
//!   still accepted and ignored].
//! * `Mappings`: `{Map: {TopKey: {SecondKey: string | [string]}}}`, read with
//!   `Fn::FindInMap`; no intrinsic functions inside.
//! * Intrinsic functions: `Ref`, `Fn::Join`, `Fn::Select`, `Fn::Split`,
//!   `Fn::Sub` and `Fn::FindInMap`, nested at most 32 levels deep (a
//!   function and its argument list count as one level each).
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
/// A certificate rotation template: the thing named by the `ThingName` parameter gets the new
/// certificate, next to the one it has.
pub const ROTATION_TEMPLATE: &str = include_str!("../templates/RotationTemplate.json");

/// How deeply values and intrinsic functions may nest inside a template
/// property before evaluation is refused.
const MAX_DEPTH: usize = 32;

/// How deeply an inline `PolicyDocument` object may nest.
const MAX_POLICY_DOCUMENT_DEPTH: usize = 64;

const CERTIFICATE_ID_PARAMETER: &str = "AWS::IoT::Certificate::Id";
/// CreateProvisioningTemplate: templateBody, length 0-10240 (API reference).
pub const MAX_BODY_CHARS: usize = 10_240;
/// CloudFormation sections a fleet provisioning template does not have.
const UNSUPPORTED_SECTIONS: [&str; 4] = ["Conditions", "Outputs", "Transform", "Rules"];
/// CloudFormation resource keys a fleet provisioning template does not have.
const UNSUPPORTED_RESOURCE_KEYS: [&str; 6] = [
    "Condition",
    "DependsOn",
    "DeletionPolicy",
    "UpdatePolicy",
    "UpdateReplacePolicy",
    "CreationPolicy",
];

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
    /// `PolicyName`: attach an existing policy by name (`policies/NAME.json`; RegisterThing
    /// fails when there is none).
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
    /// The program and its arguments; empty for a `targetArn` hook until the emulator's
    /// `--hook-command ARN=COMMAND` maps it.
    pub command: Vec<String>,
    /// The Lambda function's ARN, as `describe-provisioning-template` prints it.
    pub target_arn: Option<String>,
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
    let value: Value = serde_json::from_str(text).map_err(|e| {
        format!(
            "template file is not valid JSON (line {}, column {})",
            e.line(),
            e.column()
        )
    })?;
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
                    let parsed: Value = serde_json::from_str(&inner).map_err(|e| {
                        format!(
                            "templateBody is not valid JSON (line {}, column {})",
                            e.line(),
                            e.column()
                        )
                    })?;
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
    // As AWS measures templateBody: the JSON text, here without insignificant whitespace.
    // (Serializing is safe: a parsed value nests at most 128 deep.)
    let length = serde_json::to_string(&body)
        .map(|t| t.chars().count())
        .unwrap_or(0);
    if length > MAX_BODY_CHARS {
        return Err(format!(
            "invalid template body: {length} characters, more than the {MAX_BODY_CHARS} AWS accepts"
        ));
    }
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
    if let (None, Some(arn)) = (hook.get("command"), hook.get("targetArn")) {
        // As `aws iot describe-provisioning-template` prints it ({targetArn, payloadVersion}):
        // the emulator runs the local command `--hook-command` maps the ARN to.
        let Value::String(arn) = arn else {
            return Err(format!(
                "preProvisioningHook.targetArn must be a string, found {}",
                kind_of(arn)
            ));
        };
        return Ok(HookSpec {
            command: Vec::new(),
            target_arn: Some(arn.clone()),
        });
    }
    let Some(Value::Array(items)) = hook.get("command") else {
        return Err(format!(
            "{SHAPE} or {{\"targetArn\": \"arn:…\"}}: command is missing or not an array"
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
        Some(_) => Ok(HookSpec {
            command,
            target_arn: None,
        }),
    }
}

/// Checks everything about a body that does not need parameter values.
/// The body as an object, with none of the CloudFormation sections it does not have.
fn checked_body(body: &Value) -> Result<&Map<String, Value>, TemplateError> {
    let body = body_object(body)?;
    if let Some(unknown) = body
        .keys()
        .find(|k| UNSUPPORTED_SECTIONS.contains(&k.as_str()))
    {
        return Err(TemplateError::invalid_request(format!(
            "section '{unknown}' is not supported in a provisioning template (it has \
             Parameters, Mappings, Resources and DeviceConfiguration)"
        )));
    }
    Ok(body)
}

fn validate_body(body: &Value) -> Result<(), TemplateError> {
    let body = checked_body(body)?;
    parse_parameters(body)?;
    parse_mappings(body)?;
    parse_resources(body)?;
    device_configuration_section(body)?;
    Ok(())
}

fn device_configuration_section(
    body: &Map<String, Value>,
) -> Result<Option<&Map<String, Value>>, TemplateError> {
    let not_an_object = |found: &str| {
        TemplateError::invalid_request(format!(
            "DeviceConfiguration must be an object of names to string values, found {found}"
        ))
    };
    match body.get("DeviceConfiguration") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(section)) => {
            if intrinsic(section)
                .map_err(|e| e.within("DeviceConfiguration"))?
                .is_some()
            {
                return Err(not_an_object("an intrinsic function"));
            }
            Ok(Some(section))
        }
        Some(other) => Err(not_an_object(kind_of(other))),
    }
}

/// Evaluate a template body for RegisterThing. `params` are the request's parameters (already merged with any
/// pre-provisioning hook overrides); `certificate_id` is the id of the certificate being registered.
///
/// Every error has status 400 and one of two codes:
///
/// | code | when |
/// |---|---|
/// | `InvalidParameters` | a declared parameter was not supplied and has no `Default`, used or not (`Missing parameter: NAME`), or a `Ref` or `${Var}` names nothing declared (`Cannot resolve reference value: NAME`, AWS's own wording) |
/// | `InvalidRequest` | anything else wrong with the template, the message starting with where: a section or resource of the wrong shape; an unsupported resource type, property or `OverrideSettings` value; more than one thing or certificate; a missing `ThingName` or `CertificateId`; a `CertificateId` other than `certificate_id`; a `Status` other than Active/Inactive; a policy with both or neither of `PolicyName` and `PolicyDocument`, or a `PolicyDocument` string that is not a JSON object; a name or attribute that breaks AWS's length or character rules; an intrinsic function of the wrong shape or unknown (e.g. `Fn::If`, `Fn::GetAtt`); a `Fn::Select` index that is not a non-negative integer or is out of range; an empty `Fn::Split` delimiter; a `Fn::FindInMap` map or key that does not exist; a list where a string is needed (or the reverse); nesting deeper than 32 levels |
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
    let body = checked_body(body)?;
    let declared = parse_parameters(body)?;
    let mappings = parse_mappings(body)?;
    let resources = parse_resources(body)?;
    if let Some(name) = declared.iter().find_map(|(name, default)| {
        (default.is_none() && *name != CERTIFICATE_ID_PARAMETER && !params.contains_key(*name))
            .then_some(*name)
    }) {
        return Err(TemplateError::invalid_parameters(format!(
            "Missing parameter: {name}"
        )));
    }
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
    outcome.device_configuration = evaluator.device_configuration(body)?;
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
        if let Some(unknown) = declaration
            .keys()
            .find(|k| UNSUPPORTED_RESOURCE_KEYS.contains(&k.as_str()))
        {
            return Err(err(format!(
                "'{unknown}' is not supported in a provisioning template (a resource has \
                 Type, Properties and OverrideSettings)"
            )));
        }
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
        body: &Map<String, Value>,
    ) -> Result<BTreeMap<String, String>, TemplateError> {
        let mut out = BTreeMap::new();
        let Some(section) = device_configuration_section(body)? else {
            return Ok(out);
        };
        for (key, value) in section {
            let path = format!("DeviceConfiguration.{key}");
            let nested = match value {
                Value::Object(map) => intrinsic(map).map_err(|e| e.within(&path))?.is_none(),
                _ => false,
            };
            if nested {
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
        if name == CERTIFICATE_ID_PARAMETER {
            return Ok(self.certificate_id.to_owned());
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const CERT: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    const IP: &str = "InvalidParameters";
    const IR: &str = "InvalidRequest";

    /// Request parameters of a table row.
    type Pairs<'a> = &'a [(&'a str, &'a str)];
    /// A row's expectation: a value, or the code of a 400 error.
    type Expect<'a, T> = Result<T, &'a str>;
    /// A row of an evaluation table: name, template part, parameters, expectation.
    type Row<'a, T> = (&'a str, Value, Pairs<'a>, Expect<'a, T>);

    fn params(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    /// Evaluates and reduces an error to its code, checking it is a 400.
    fn run(body: &Value, pairs: &[(&str, &str)]) -> Result<TemplateOutcome, &'static str> {
        evaluate(body, &params(pairs), CERT).map_err(|e| {
            assert_eq!(e.status, 400, "{e}");
            assert!(!e.message.is_empty());
            e.code
        })
    }

    /// Takes a value apart without recursion, so that dropping a very deep
    /// value cannot overflow the test's stack.
    fn drop_deep(value: Value) {
        let mut stack = vec![value];
        while let Some(value) = stack.pop() {
            match value {
                Value::Array(items) => stack.extend(items),
                Value::Object(map) => stack.extend(map.into_iter().map(|(_, v)| v)),
                _ => {}
            }
        }
    }

    /// An object from entries. Unlike `json!`, which copies an embedded value
    /// by serializing it recursively, this moves the values in, so it can
    /// build very deep values.
    fn object(entries: Vec<(&str, Value)>) -> Value {
        Value::Object(
            entries
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v))
                .collect(),
        )
    }

    fn nested_join(levels: usize) -> Value {
        let mut value = json!("x");
        for _ in 0..levels {
            value = object(vec![(
                "Fn::Join",
                Value::Array(vec![json!(""), Value::Array(vec![value])]),
            )]);
        }
        value
    }

    /// Declares `names` without a default when `part` mentions them: every declared
    /// parameter needs a value, so rows about other things must not declare them.
    fn declare_used(body: &mut Value, part: &Value, names: &[&str]) {
        let text = part.to_string();
        for name in names {
            if text.contains(name) {
                body["Parameters"][*name] = json!({"Type": "String"});
            }
        }
    }

    fn intrinsic_body(expr: Value) -> Value {
        let mut body = json!({
            "Parameters": {
                "Loc": {"Type": "String", "Default": "lab"},
                "Csv": {"Type": "String", "Default": "a,b,c"},
                "Idx": {"Type": "String", "Default": "1"},
                "Empty": {"Type": "String", "Default": ""}
            },
            "Mappings": {
                "Sites": {
                    "lab": {"Url": "https://lab.example.com", "Hosts": ["h1", "h2"]},
                    "tokyo": {"Url": "https://tokyo.example.com", "Hosts": ["t1"]}
                }
            },
            "Resources": {},
            "DeviceConfiguration": {"v": expr.clone()}
        });
        declare_used(&mut body, &expr, &["Serial"]);
        body
    }

    #[test]
    fn intrinsic_functions() {
        let cert_x = format!("{CERT}/x");
        let s1: &[(&str, &str)] = &[("Serial", "S1")];
        let none: &[(&str, &str)] = &[];
        let rows: Vec<Row<&str>> = vec![
            // Ref
            ("ref supplied", json!({"Ref": "Serial"}), s1, Ok("S1")),
            ("ref default", json!({"Ref": "Loc"}), none, Ok("lab")),
            (
                "ref supplied beats default",
                json!({"Ref": "Loc"}),
                &[("Loc", "tokyo")],
                Ok("tokyo"),
            ),
            ("ref empty default", json!({"Ref": "Empty"}), none, Ok("")),
            ("ref missing", json!({"Ref": "Serial"}), none, Err(IP)),
            (
                "ref undeclared though supplied",
                json!({"Ref": "Extra"}),
                &[("Extra", "x")],
                Err(IP),
            ),
            (
                "ref certificate id",
                json!({"Ref": "AWS::IoT::Certificate::Id"}),
                none,
                Ok(CERT),
            ),
            (
                "certificate id cannot be supplied",
                json!({"Ref": "AWS::IoT::Certificate::Id"}),
                &[("AWS::IoT::Certificate::Id", "evil")],
                Ok(CERT),
            ),
            // Not declared: AWS cannot resolve them (a real exchange).
            ("ref region", json!({"Ref": "AWS::Region"}), none, Err(IP)),
            (
                "ref account",
                json!({"Ref": "AWS::AccountId"}),
                none,
                Err(IP),
            ),
            (
                "ref unknown pseudo",
                json!({"Ref": "AWS::Partition"}),
                none,
                Err(IP),
            ),
            ("ref number", json!({"Ref": 1}), none, Err(IR)),
            ("ref list", json!({"Ref": ["Serial"]}), s1, Err(IR)),
            // Fn::Join
            (
                "join",
                json!({"Fn::Join": ["-", ["a", {"Ref": "Loc"}, "c"]]}),
                none,
                Ok("a-lab-c"),
            ),
            (
                "join empty delimiter",
                json!({"Fn::Join": ["", ["x", "y"]]}),
                none,
                Ok("xy"),
            ),
            (
                "join empty list",
                json!({"Fn::Join": [",", []]}),
                none,
                Ok(""),
            ),
            (
                "join a split",
                json!({"Fn::Join": ["+", {"Fn::Split": [",", {"Ref": "Csv"}]}]}),
                none,
                Ok("a+b+c"),
            ),
            (
                "join a mapped list",
                json!({"Fn::Join": ["+", {"Fn::FindInMap": ["Sites", "lab", "Hosts"]}]}),
                none,
                Ok("h1+h2"),
            ),
            ("join not a list", json!({"Fn::Join": "abc"}), none, Err(IR)),
            (
                "join three arguments",
                json!({"Fn::Join": ["-", ["a"], "x"]}),
                none,
                Err(IR),
            ),
            (
                "join values not a list",
                json!({"Fn::Join": ["-", "abc"]}),
                none,
                Err(IR),
            ),
            (
                "join nested list",
                json!({"Fn::Join": ["-", [["a"]]]}),
                none,
                Err(IR),
            ),
            (
                "join number",
                json!({"Fn::Join": ["-", [1]]}),
                none,
                Err(IR),
            ),
            (
                "join delimiter list",
                json!({"Fn::Join": [["-"], ["a"]]}),
                none,
                Err(IR),
            ),
            (
                "join missing parameter",
                json!({"Fn::Join": ["-", [{"Ref": "Serial"}]]}),
                none,
                Err(IP),
            ),
            // Fn::Select
            (
                "select number",
                json!({"Fn::Select": [1, ["x", "y", "z"]]}),
                none,
                Ok("y"),
            ),
            (
                "select numeric string",
                json!({"Fn::Select": ["2", ["x", "y", "z"]]}),
                none,
                Ok("z"),
            ),
            (
                "select ref index from split",
                json!({"Fn::Select": [{"Ref": "Idx"}, {"Fn::Split": [",", {"Ref": "Csv"}]}]}),
                none,
                Ok("b"),
            ),
            (
                "select from mapping",
                json!({"Fn::Select": [0, {"Fn::FindInMap": ["Sites", {"Ref": "Loc"}, "Hosts"]}]}),
                none,
                Ok("h1"),
            ),
            (
                "select out of range",
                json!({"Fn::Select": [3, ["x", "y", "z"]]}),
                none,
                Err(IR),
            ),
            (
                "select empty list",
                json!({"Fn::Select": [0, []]}),
                none,
                Err(IR),
            ),
            (
                "select huge index",
                json!({"Fn::Select": [u64::MAX, ["x"]]}),
                none,
                Err(IR),
            ),
            (
                "select negative",
                json!({"Fn::Select": [-1, ["x"]]}),
                none,
                Err(IR),
            ),
            (
                "select fraction",
                json!({"Fn::Select": [0.5, ["x"]]}),
                none,
                Err(IR),
            ),
            (
                "select plus sign",
                json!({"Fn::Select": ["+0", ["x"]]}),
                none,
                Err(IR),
            ),
            (
                "select word",
                json!({"Fn::Select": ["one", ["x"]]}),
                none,
                Err(IR),
            ),
            (
                "select empty index",
                json!({"Fn::Select": ["", ["x"]]}),
                none,
                Err(IR),
            ),
            (
                "select boolean index",
                json!({"Fn::Select": [true, ["x"]]}),
                none,
                Err(IR),
            ),
            (
                "select from string",
                json!({"Fn::Select": [0, "x"]}),
                none,
                Err(IR),
            ),
            (
                "select one argument",
                json!({"Fn::Select": [0]}),
                none,
                Err(IR),
            ),
            // Fn::Split
            (
                "split in string context",
                json!({"Fn::Split": [",", "a,b"]}),
                none,
                Err(IR),
            ),
            (
                "split without delimiter in source",
                json!({"Fn::Select": [0, {"Fn::Split": ["|", "abc"]}]}),
                none,
                Ok("abc"),
            ),
            (
                "split keeps empty pieces",
                json!({"Fn::Select": [2, {"Fn::Split": [",", "a,b,"]}]}),
                none,
                Ok(""),
            ),
            (
                "split multi-character delimiter",
                json!({"Fn::Select": [1, {"Fn::Split": ["::", "a::b::c"]}]}),
                none,
                Ok("b"),
            ),
            (
                "split empty delimiter",
                json!({"Fn::Select": [0, {"Fn::Split": ["", "ab"]}]}),
                none,
                Err(IR),
            ),
            (
                "split a list",
                json!({"Fn::Select": [0, {"Fn::Split": [",", ["a"]]}]}),
                none,
                Err(IR),
            ),
            (
                "split one argument",
                json!({"Fn::Select": [0, {"Fn::Split": [","]}]}),
                none,
                Err(IR),
            ),
            // Fn::Sub
            (
                "sub parameter",
                json!({"Fn::Sub": "id-${Serial}"}),
                s1,
                Ok("id-S1"),
            ),
            (
                "sub pseudo parameter",
                json!({"Fn::Sub": "${AWS::IoT::Certificate::Id}/x"}),
                none,
                Ok(&cert_x),
            ),
            (
                "sub undeclared region",
                json!({"Fn::Sub": "${AWS::Region}"}),
                none,
                Err(IP),
            ),
            (
                "sub variable map with nested functions",
                json!({"Fn::Sub": ["${Host}:${Serial}", {"Host": {"Fn::Select": [1, {"Fn::FindInMap": ["Sites", "lab", "Hosts"]}]}}]}),
                s1,
                Ok("h2:S1"),
            ),
            (
                "sub map beats parameter",
                json!({"Fn::Sub": ["${Serial}", {"Serial": "mapped"}]}),
                s1,
                Ok("mapped"),
            ),
            (
                "sub escape",
                json!({"Fn::Sub": "${!Literal}-${Serial}"}),
                s1,
                Ok("${Literal}-S1"),
            ),
            (
                "sub escape of a parameter",
                json!({"Fn::Sub": "${!Serial}"}),
                s1,
                Ok("${Serial}"),
            ),
            (
                "sub plain dollars",
                json!({"Fn::Sub": "cost $5 {x} $"}),
                none,
                Ok("cost $5 {x} $"),
            ),
            (
                "sub unterminated",
                json!({"Fn::Sub": "open ${Serial"}),
                s1,
                Ok("open ${Serial"),
            ),
            (
                "sub no variables",
                json!({"Fn::Sub": "plain"}),
                none,
                Ok("plain"),
            ),
            (
                "sub repeated",
                json!({"Fn::Sub": "${Loc}${Loc}"}),
                none,
                Ok("lablab"),
            ),
            (
                "sub non-ascii",
                json!({"Fn::Sub": "é-${Loc}-ü"}),
                none,
                Ok("é-lab-ü"),
            ),
            (
                "sub unknown variable",
                json!({"Fn::Sub": "${Missing}"}),
                none,
                Err(IP),
            ),
            (
                "sub missing parameter",
                json!({"Fn::Sub": "${Serial}"}),
                none,
                Err(IP),
            ),
            (
                "sub resource attribute",
                json!({"Fn::Sub": "${thing.Arn}"}),
                none,
                Err(IP),
            ),
            (
                "sub empty variable",
                json!({"Fn::Sub": "${}"}),
                none,
                Err(IR),
            ),
            ("sub empty list", json!({"Fn::Sub": []}), none, Err(IR)),
            ("sub one element", json!({"Fn::Sub": ["a"]}), none, Err(IR)),
            (
                "sub map not an object",
                json!({"Fn::Sub": ["a", "b"]}),
                none,
                Err(IR),
            ),
            (
                "sub text not a string",
                json!({"Fn::Sub": [1, {}]}),
                none,
                Err(IR),
            ),
            ("sub number", json!({"Fn::Sub": 5}), none, Err(IR)),
            (
                "sub list variable",
                json!({"Fn::Sub": ["${X}", {"X": ["a"]}]}),
                none,
                Err(IR),
            ),
            (
                "sub variable missing parameter",
                json!({"Fn::Sub": ["${X}", {"X": {"Ref": "Serial"}}]}),
                none,
                Err(IP),
            ),
            // Fn::FindInMap
            (
                "find in map",
                json!({"Fn::FindInMap": ["Sites", {"Ref": "Loc"}, "Url"]}),
                none,
                Ok("https://lab.example.com"),
            ),
            (
                "find in map with parameter",
                json!({"Fn::FindInMap": ["Sites", {"Ref": "Loc"}, "Url"]}),
                &[("Loc", "tokyo")],
                Ok("https://tokyo.example.com"),
            ),
            (
                "find in map unknown map",
                json!({"Fn::FindInMap": ["Nope", "lab", "Url"]}),
                none,
                Err(IR),
            ),
            (
                "find in map unknown top key",
                json!({"Fn::FindInMap": ["Sites", {"Ref": "Loc"}, "Url"]}),
                &[("Loc", "paris")],
                Err(IR),
            ),
            (
                "find in map unknown second key",
                json!({"Fn::FindInMap": ["Sites", "lab", "Nope"]}),
                none,
                Err(IR),
            ),
            (
                "find in map two arguments",
                json!({"Fn::FindInMap": ["Sites", "lab"]}),
                none,
                Err(IR),
            ),
            (
                "find in map list in string context",
                json!({"Fn::FindInMap": ["Sites", "lab", "Hosts"]}),
                none,
                Err(IR),
            ),
            // Everything else
            (
                "unknown function",
                json!({"Fn::If": ["c", "a", "b"]}),
                none,
                Err(IR),
            ),
            (
                "get att",
                json!({"Fn::GetAtt": ["thing", "Arn"]}),
                none,
                Err(IR),
            ),
            (
                "two functions in one object",
                json!({"Ref": "Loc", "Fn::Join": ["", []]}),
                none,
                Err(IR),
            ),
            (
                "function with extra key",
                json!({"Ref": "Loc", "extra": 1}),
                none,
                Err(IR),
            ),
            ("nested object", json!({"foo": "bar"}), none, Err(IR)),
            ("number", json!(42), none, Err(IR)),
            ("boolean", json!(true), none, Err(IR)),
            ("null", Value::Null, none, Err(IR)),
            ("list", json!(["a"]), none, Err(IR)),
            (
                "everything nested",
                json!({"Fn::Join": ["/", [
                    {"Fn::Sub": ["${A}", {"A": {"Fn::Select": [{"Ref": "Idx"}, {"Fn::Split": [",", {"Fn::Join": [",", ["p", {"Fn::FindInMap": ["Sites", {"Ref": "Loc"}, "Url"]}]]}]}]}}]},
                    {"Ref": "Serial"}
                ]]}),
                s1,
                Ok("https://lab.example.com/S1"),
            ),
            ("16 nested joins", nested_join(16), none, Ok("x")),
            ("17 nested joins", nested_join(17), none, Err(IR)),
        ];
        for (name, expr, pairs, expected) in rows {
            let got = run(&intrinsic_body(expr), pairs);
            let got = got.as_ref().map(|o| {
                assert_eq!(o.device_configuration.len(), 1, "{name}");
                o.device_configuration
                    .get("v")
                    .map(String::as_str)
                    .unwrap_or("<absent>")
            });
            assert_eq!(got.map_err(|e| *e), expected, "{name}");
        }
    }

    #[test]
    fn every_declared_parameter_needs_a_value() {
        let body = json!({
            "Parameters": {
                "Used": {"Type": "String"},
                "Unused": {"Type": "String"},
                "Defaulted": {"Type": "String", "Default": "d"},
                "AWS::IoT::Certificate::Id": {"Type": "String"}
            },
            "Resources": {},
            "DeviceConfiguration": {"v": {"Ref": "Used"}}
        });
        let rows: &[(Pairs, Result<&str, &str>)] = &[
            (&[("Used", "u"), ("Unused", "x")], Ok("u")),
            // Declared, not used, no default: fails like a used one.
            (&[("Used", "u")], Err("Missing parameter: Unused")),
            (&[("Unused", "x")], Err("Missing parameter: Used")),
            // A supplied empty string is a value.
            (&[("Used", ""), ("Unused", "")], Ok("")),
        ];
        for (pairs, want) in rows {
            let got = evaluate(&body, &params(pairs), CERT)
                .map(|o| o.device_configuration["v"].clone())
                .map_err(|e| {
                    assert_eq!((e.status, e.code), (400, IP), "{pairs:?}");
                    e.message
                });
            assert_eq!(
                got.as_deref().map_err(String::as_str),
                want.as_ref().map(|s| *s).map_err(|s| *s),
                "{pairs:?}"
            );
        }
    }

    #[test]
    fn parameter_error_messages() {
        let rows = [
            (json!({"Ref": "Serial"}), "Missing parameter: Serial"),
            (
                json!({"Fn::Sub": "${Nope}"}),
                "Cannot resolve reference value: Nope",
            ),
            (
                json!({"Ref": "AWS::Partition"}),
                "Cannot resolve reference value: AWS::Partition",
            ),
        ];
        for (expr, message) in rows {
            let err = evaluate(&intrinsic_body(expr), &params(&[]), CERT).unwrap_err();
            assert_eq!(
                err,
                TemplateError {
                    status: 400,
                    code: IP,
                    message: message.to_owned()
                }
            );
        }
        let err = evaluate(
            &intrinsic_body(json!({"Fn::Select": [5, ["x"]]})),
            &params(&[]),
            CERT,
        )
        .unwrap_err();
        assert_eq!(
            err.message,
            "DeviceConfiguration.v: Fn::Select index 5 is out of range for a list of 1 element(s)"
        );
        assert_eq!(
            err.to_string(),
            "400 InvalidRequest: DeviceConfiguration.v: Fn::Select index 5 is out of range for a list of 1 element(s)"
        );
    }

    fn resources_body(resources: Value) -> Value {
        let mut body = json!({
            "Parameters": {
                "Loc": {"Type": "String", "Default": "lab"},
                "Groups": {"Type": "String", "Default": "g1,g2,g1"},
                "Stat": {"Type": "String", "Default": "INACTIVE"},
                "Policy": {"Type": "String", "Default": "from-param"}
            },
            "Resources": resources.clone()
        });
        declare_used(&mut body, &resources, &["Serial", "CertId"]);
        body
    }

    fn thing(name: &str) -> ThingSpec {
        ThingSpec {
            name: name.to_owned(),
            attributes: BTreeMap::new(),
            thing_type: None,
            groups: Vec::new(),
            billing_group: None,
            overrides: OverrideSettings::default(),
        }
    }

    fn thing_resource(properties: Value) -> Value {
        json!({"thing": {"Type": "AWS::IoT::Thing", "Properties": properties}})
    }

    #[test]
    fn thing_resources() {
        let s1: &[(&str, &str)] = &[("Serial", "S1")];
        let none: &[(&str, &str)] = &[];
        let full = ThingSpec {
            name: "dev-S1".to_owned(),
            attributes: [("fixed", "v1"), ("loc", "lab"), ("serial", "S1")]
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
            thing_type: Some("sensor".to_owned()),
            groups: vec!["grp-a".to_owned(), "lab".to_owned()],
            billing_group: Some("bg".to_owned()),
            overrides: OverrideSettings {
                attribute_payload: Override::Merge,
                thing_groups: Override::Fail,
                thing_type_name: Override::Replace,
            },
        };
        let split_groups = ThingSpec {
            groups: vec!["g1".to_owned(), "g2".to_owned()],
            ..thing("t1")
        };
        let empty_value = ThingSpec {
            attributes: [("k".to_owned(), String::new())].into_iter().collect(),
            ..thing("t1")
        };
        let long_name = "a".repeat(129);
        let max_name = "a".repeat(128);
        let rows: Vec<Row<Option<ThingSpec>>> = vec![
            (
                "minimal",
                thing_resource(json!({"ThingName": "t1"})),
                none,
                Ok(Some(thing("t1"))),
            ),
            (
                "full",
                json!({"thing": {
                    "Type": "AWS::IoT::Thing",
                    "Properties": {
                        "ThingName": {"Fn::Join": ["", ["dev-", {"Ref": "Serial"}]]},
                        "AttributePayload": {"serial": {"Ref": "Serial"}, "loc": {"Ref": "Loc"}, "fixed": "v1"},
                        "ThingTypeName": "sensor",
                        "ThingGroups": ["grp-a", {"Ref": "Loc"}],
                        "BillingGroup": "bg"
                    },
                    "OverrideSettings": {"AttributePayload": "MERGE", "ThingTypeName": "REPLACE", "ThingGroups": "FAIL"}
                }}),
                s1,
                Ok(Some(full)),
            ),
            (
                "groups from split, duplicates removed",
                thing_resource(
                    json!({"ThingName": "t1", "ThingGroups": {"Fn::Split": [",", {"Ref": "Groups"}]}}),
                ),
                none,
                Ok(Some(split_groups)),
            ),
            (
                "empty groups",
                thing_resource(json!({"ThingName": "t1", "ThingGroups": []})),
                none,
                Ok(Some(thing("t1"))),
            ),
            (
                "package versions ignored",
                thing_resource(json!({"ThingName": "t1", "PackageVersions": {"pkg": "1.0"}})),
                none,
                Ok(Some(thing("t1"))),
            ),
            (
                "null optional properties",
                thing_resource(
                    json!({"ThingName": "t1", "ThingTypeName": null, "BillingGroup": null, "ThingGroups": null, "AttributePayload": null}),
                ),
                none,
                Ok(Some(thing("t1"))),
            ),
            (
                "empty attributes",
                thing_resource(json!({"ThingName": "t1", "AttributePayload": {}})),
                none,
                Ok(Some(thing("t1"))),
            ),
            (
                "empty attribute value",
                thing_resource(json!({"ThingName": "t1", "AttributePayload": {"k": ""}})),
                none,
                Ok(Some(empty_value)),
            ),
            (
                "128-character name",
                thing_resource(json!({"ThingName": max_name})),
                none,
                Ok(Some(thing(&max_name))),
            ),
            ("no thing", json!({}), none, Ok(None)),
            ("missing name", thing_resource(json!({})), none, Err(IR)),
            (
                "no properties",
                json!({"thing": {"Type": "AWS::IoT::Thing"}}),
                none,
                Err(IR),
            ),
            (
                "name with space",
                thing_resource(json!({"ThingName": "bad name"})),
                none,
                Err(IR),
            ),
            (
                "empty name",
                thing_resource(json!({"ThingName": ""})),
                none,
                Err(IR),
            ),
            (
                "129-character name",
                thing_resource(json!({"ThingName": long_name})),
                none,
                Err(IR),
            ),
            (
                "name is a list",
                thing_resource(json!({"ThingName": ["t1"]})),
                none,
                Err(IR),
            ),
            (
                "name parameter missing",
                thing_resource(json!({"ThingName": {"Ref": "Serial"}})),
                none,
                Err(IP),
            ),
            (
                "attributes a string",
                thing_resource(json!({"ThingName": "t1", "AttributePayload": "x"})),
                none,
                Err(IR),
            ),
            (
                "attributes a list",
                thing_resource(json!({"ThingName": "t1", "AttributePayload": ["x"]})),
                none,
                Err(IR),
            ),
            (
                "attributes an intrinsic",
                thing_resource(json!({"ThingName": "t1", "AttributePayload": {"Ref": "Serial"}})),
                s1,
                Err(IR),
            ),
            (
                "attribute value a number",
                thing_resource(json!({"ThingName": "t1", "AttributePayload": {"k": 1}})),
                none,
                Err(IR),
            ),
            (
                "attribute value with a space",
                thing_resource(json!({"ThingName": "t1", "AttributePayload": {"k": "a b"}})),
                none,
                Err(IR),
            ),
            (
                "attribute name with a bang",
                thing_resource(json!({"ThingName": "t1", "AttributePayload": {"bad!": "v"}})),
                none,
                Err(IR),
            ),
            (
                "groups a string",
                thing_resource(json!({"ThingName": "t1", "ThingGroups": "g1"})),
                none,
                Err(IR),
            ),
            (
                "group a number",
                thing_resource(json!({"ThingName": "t1", "ThingGroups": [1]})),
                none,
                Err(IR),
            ),
            (
                "group name with a space",
                thing_resource(json!({"ThingName": "t1", "ThingGroups": ["a b"]})),
                none,
                Err(IR),
            ),
            (
                "empty thing type",
                thing_resource(json!({"ThingName": "t1", "ThingTypeName": ""})),
                none,
                Err(IR),
            ),
            (
                "bad billing group",
                thing_resource(json!({"ThingName": "t1", "BillingGroup": "b/g"})),
                none,
                Err(IR),
            ),
            (
                "unknown property",
                thing_resource(json!({"ThingName": "t1", "ThingGroup": ["g"]})),
                none,
                Err(IR),
            ),
            (
                "two things",
                json!({
                    "a": {"Type": "AWS::IoT::Thing", "Properties": {"ThingName": "a"}},
                    "b": {"Type": "AWS::IoT::Thing", "Properties": {"ThingName": "b"}}
                }),
                none,
                Err(IR),
            ),
        ];
        for (name, resources, pairs, expected) in rows {
            let got = run(&resources_body(resources), pairs).map(|o| o.thing);
            assert_eq!(got, expected, "{name}");
        }
    }

    #[test]
    fn override_settings() {
        use Override::{DoNothing, Fail, Merge, Replace};
        let settings = |attribute_payload, thing_groups, thing_type_name| OverrideSettings {
            attribute_payload,
            thing_groups,
            thing_type_name,
        };
        assert_eq!(
            OverrideSettings::default(),
            settings(Replace, DoNothing, DoNothing)
        );
        let rows: Vec<(&str, Option<Value>, Result<OverrideSettings, &str>)> = vec![
            ("absent", None, Ok(settings(Replace, DoNothing, DoNothing))),
            (
                "null",
                Some(Value::Null),
                Ok(settings(Replace, DoNothing, DoNothing)),
            ),
            (
                "empty",
                Some(json!({})),
                Ok(settings(Replace, DoNothing, DoNothing)),
            ),
            (
                "partial, lower case",
                Some(json!({"AttributePayload": "merge"})),
                Ok(settings(Merge, DoNothing, DoNothing)),
            ),
            (
                "all, upper-case keys",
                Some(
                    json!({"ATTRIBUTE_PAYLOAD": "DO_NOTHING", "THING_GROUPS": "MERGE", "THING_TYPE_NAME": "FAIL"}),
                ),
                Ok(settings(DoNothing, Merge, Fail)),
            ),
            (
                "all, mixed case values",
                Some(
                    json!({"AttributePayload": "Fail", "ThingGroups": "replace", "ThingTypeName": "REPLACE"}),
                ),
                Ok(settings(Fail, Replace, Replace)),
            ),
            (
                "merge thing type",
                Some(json!({"ThingTypeName": "MERGE"})),
                Err(IR),
            ),
            (
                "unknown action",
                Some(json!({"AttributePayload": "OVERWRITE"})),
                Err(IR),
            ),
            (
                "action not a string",
                Some(json!({"AttributePayload": 1})),
                Err(IR),
            ),
            ("unknown key", Some(json!({"Status": "REPLACE"})), Err(IR)),
            ("not an object", Some(json!("MERGE")), Err(IR)),
        ];
        for (name, overrides, expected) in rows {
            let mut resource =
                json!({"Type": "AWS::IoT::Thing", "Properties": {"ThingName": "t1"}});
            if let (Some(overrides), Some(map)) = (overrides, resource.as_object_mut()) {
                map.insert("OverrideSettings".to_owned(), overrides);
            }
            let body = resources_body(json!({ "thing": resource }));
            let got = run(&body, &[]).map(|o| o.thing.map(|t| t.overrides));
            assert_eq!(got, expected.map(Some), "{name}");
            assert_eq!(
                parse_template_file(&body.to_string()).is_ok(),
                got.is_ok(),
                "{name}"
            );
        }
    }

    fn certificate_resource(properties: Value) -> Value {
        json!({"certificate": {"Type": "AWS::IoT::Certificate", "Properties": properties}})
    }

    #[test]
    fn certificate_resources() {
        use CertStatus::{Active, Inactive};
        let by_ref = json!({"Ref": "AWS::IoT::Certificate::Id"});
        let none: &[(&str, &str)] = &[];
        let rows: Vec<Row<Option<CertStatus>>> = vec![
            (
                "Active",
                certificate_resource(json!({"CertificateId": by_ref, "Status": "Active"})),
                none,
                Ok(Some(Active)),
            ),
            (
                "ACTIVE",
                certificate_resource(json!({"CertificateId": by_ref, "Status": "ACTIVE"})),
                none,
                Ok(Some(Active)),
            ),
            (
                "active",
                certificate_resource(json!({"CertificateId": by_ref, "Status": "active"})),
                none,
                Ok(Some(Active)),
            ),
            (
                "Inactive",
                certificate_resource(json!({"CertificateId": by_ref, "Status": "Inactive"})),
                none,
                Ok(Some(Inactive)),
            ),
            (
                "INACTIVE",
                certificate_resource(json!({"CertificateId": by_ref, "Status": "INACTIVE"})),
                none,
                Ok(Some(Inactive)),
            ),
            (
                "status absent",
                certificate_resource(json!({"CertificateId": by_ref})),
                none,
                Ok(Some(Active)),
            ),
            (
                "status null",
                certificate_resource(json!({"CertificateId": by_ref, "Status": null})),
                none,
                Ok(Some(Active)),
            ),
            (
                "status from a parameter",
                certificate_resource(json!({"CertificateId": by_ref, "Status": {"Ref": "Stat"}})),
                none,
                Ok(Some(Inactive)),
            ),
            (
                "literal id",
                certificate_resource(json!({"CertificateId": CERT})),
                none,
                Ok(Some(Active)),
            ),
            (
                "id from a parameter",
                certificate_resource(json!({"CertificateId": {"Ref": "CertId"}})),
                &[("CertId", CERT)],
                Ok(Some(Active)),
            ),
            (
                "override settings for status",
                json!({"certificate": {
                    "Type": "AWS::IoT::Certificate",
                    "Properties": {"CertificateId": by_ref},
                    "OverrideSettings": {"Status": "DO_NOTHING"}
                }}),
                none,
                Ok(Some(Active)),
            ),
            ("no certificate", json!({}), none, Ok(None)),
            (
                "another certificate",
                certificate_resource(json!({"CertificateId": {"Ref": "CertId"}})),
                &[("CertId", "ffff")],
                Err(IR),
            ),
            (
                "id parameter missing",
                certificate_resource(json!({"CertificateId": {"Ref": "CertId"}})),
                none,
                Err(IP),
            ),
            (
                "id missing",
                certificate_resource(json!({"Status": "Active"})),
                none,
                Err(IR),
            ),
            (
                "no properties",
                json!({"certificate": {"Type": "AWS::IoT::Certificate"}}),
                none,
                Err(IR),
            ),
            (
                "revoked",
                certificate_resource(json!({"CertificateId": by_ref, "Status": "REVOKED"})),
                none,
                Err(IR),
            ),
            (
                "pending activation",
                certificate_resource(
                    json!({"CertificateId": by_ref, "Status": "PENDING_ACTIVATION"}),
                ),
                none,
                Err(IR),
            ),
            (
                "status a number",
                certificate_resource(json!({"CertificateId": by_ref, "Status": 1})),
                none,
                Err(IR),
            ),
            (
                "csr",
                certificate_resource(
                    json!({"CertificateSigningRequest": {"Ref": "Serial"}, "Status": "ACTIVE"}),
                ),
                none,
                Err(IR),
            ),
            (
                "certificate pem",
                certificate_resource(json!({"CertificatePem": "pem"})),
                none,
                Err(IR),
            ),
            (
                "unknown property",
                certificate_resource(json!({"CertificateId": by_ref, "Foo": "x"})),
                none,
                Err(IR),
            ),
            (
                "merge status",
                json!({"certificate": {
                    "Type": "AWS::IoT::Certificate",
                    "Properties": {"CertificateId": by_ref},
                    "OverrideSettings": {"Status": "MERGE"}
                }}),
                none,
                Err(IR),
            ),
            (
                "unknown override",
                json!({"certificate": {
                    "Type": "AWS::IoT::Certificate",
                    "Properties": {"CertificateId": by_ref},
                    "OverrideSettings": {"ThingGroups": "REPLACE"}
                }}),
                none,
                Err(IR),
            ),
            (
                "two certificates",
                json!({
                    "a": {"Type": "AWS::IoT::Certificate", "Properties": {"CertificateId": by_ref}},
                    "b": {"Type": "AWS::IoT::Certificate", "Properties": {"CertificateId": by_ref}}
                }),
                none,
                Err(IR),
            ),
        ];
        for (name, resources, pairs, expected) in rows {
            let got = run(&resources_body(resources), pairs).map(|o| o.certificate_status);
            assert_eq!(got, expected, "{name}");
        }
    }

    fn policy_resource(properties: Value) -> Value {
        json!({"policy": {"Type": "AWS::IoT::Policy", "Properties": properties}})
    }

    fn named(name: &str) -> PolicySpec {
        PolicySpec::Named(name.to_owned())
    }

    fn document(name: &str, document: &str) -> PolicySpec {
        PolicySpec::Document {
            name: name.to_owned(),
            document: document.to_owned(),
        }
    }

    #[test]
    fn policy_resources() {
        const EMPTY_DOC: &str = r#"{"Version":"2012-10-17","Statement":[]}"#;
        const EMPTY_DOC_SHA: &str =
            "8f907b489532ad56fb7c52f3acc89b27680ed51296bf03984ce78d2b7b96076a";
        const CLIENT_DOC: &str = r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"iot:*","Resource":"arn:aws:iot:us-east-1:123456789012:client/S1"}]}"#;
        const CLIENT_DOC_SHA: &str =
            "83209aac2209f5f25f6275d2da874abc18a6c020ba2aefaffcd6d2828346a33a";
        const TOPIC_DOC: &str = r#"{"Statement":[{"Action":"iot:Publish","Effect":"Allow","Resource":"arn:aws:iot:us-east-1:123456789012:topic/S1"}],"Version":"2012-10-17"}"#;
        const TOPIC_DOC_SHA: &str =
            "6b1fbfd4a83ecf6849dfaaef106290fece5eec02d72ab70a8e3856e142777b18";
        let s1: &[(&str, &str)] = &[("Serial", "S1")];
        let none: &[(&str, &str)] = &[];
        let mut deep_document = json!("x");
        for _ in 0..70 {
            deep_document = json!({ "a": deep_document });
        }
        let rows: Vec<Row<Vec<PolicySpec>>> = vec![
            (
                "name",
                policy_resource(json!({"PolicyName": "DevicePolicy"})),
                none,
                Ok(vec![named("DevicePolicy")]),
            ),
            (
                "name from a parameter",
                policy_resource(json!({"PolicyName": {"Ref": "Policy"}})),
                none,
                Ok(vec![named("from-param")]),
            ),
            (
                "name with every allowed symbol",
                policy_resource(json!({"PolicyName": "a_b+c=d,e.f@g-h"})),
                none,
                Ok(vec![named("a_b+c=d,e.f@g-h")]),
            ),
            (
                "document string",
                policy_resource(json!({"PolicyDocument": EMPTY_DOC})),
                none,
                Ok(vec![document(EMPTY_DOC_SHA, EMPTY_DOC)]),
            ),
            (
                "document from Fn::Sub",
                policy_resource(
                    json!({"PolicyDocument": {"Fn::Sub": r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"iot:*","Resource":"arn:aws:iot:us-east-1:123456789012:client/${Serial}"}]}"#}}),
                ),
                s1,
                Ok(vec![document(CLIENT_DOC_SHA, CLIENT_DOC)]),
            ),
            (
                "document from Fn::Join",
                policy_resource(
                    json!({"PolicyDocument": {"Fn::Join": ["", [r#"{"Version":"2012-10-17","#, r#""Statement":[]}"#]]}}),
                ),
                none,
                Ok(vec![document(EMPTY_DOC_SHA, EMPTY_DOC)]),
            ),
            (
                "document object, keys sorted",
                policy_resource(json!({"PolicyDocument": {
                    "Version": "2012-10-17",
                    "Statement": [{"Resource": "arn:aws:iot:us-east-1:123456789012:topic/S1", "Effect": "Allow", "Action": "iot:Publish"}]
                }})),
                none,
                Ok(vec![document(TOPIC_DOC_SHA, TOPIC_DOC)]),
            ),
            (
                "several policies by logical id, duplicates removed",
                json!({
                    "p3": {"Type": "AWS::IoT::Policy", "Properties": {"PolicyName": "A"}},
                    "p2": {"Type": "AWS::IoT::Policy", "Properties": {"PolicyDocument": EMPTY_DOC}},
                    "p1": {"Type": "AWS::IoT::Policy", "Properties": {"PolicyName": "A"}},
                    "p0": {"Type": "AWS::IoT::Policy", "Properties": {"PolicyName": "B"}}
                }),
                none,
                Ok(vec![
                    named("B"),
                    named("A"),
                    document(EMPTY_DOC_SHA, EMPTY_DOC),
                ]),
            ),
            ("no policy", json!({}), none, Ok(vec![])),
            (
                "both",
                policy_resource(json!({"PolicyName": "A", "PolicyDocument": EMPTY_DOC})),
                none,
                Err(IR),
            ),
            ("neither", policy_resource(json!({})), none, Err(IR)),
            (
                "no properties",
                json!({"policy": {"Type": "AWS::IoT::Policy"}}),
                none,
                Err(IR),
            ),
            (
                "document not JSON",
                policy_resource(json!({"PolicyDocument": "Allow all"})),
                none,
                Err(IR),
            ),
            (
                "document a JSON list",
                policy_resource(json!({"PolicyDocument": "[1]"})),
                none,
                Err(IR),
            ),
            (
                "document a number",
                policy_resource(json!({"PolicyDocument": 5})),
                none,
                Err(IR),
            ),
            (
                "document a list",
                policy_resource(json!({"PolicyDocument": [EMPTY_DOC]})),
                none,
                Err(IR),
            ),
            (
                "document too deep",
                policy_resource(json!({"PolicyDocument": deep_document})),
                none,
                Err(IR),
            ),
            (
                "name with a space",
                policy_resource(json!({"PolicyName": "my policy"})),
                none,
                Err(IR),
            ),
            (
                "name parameter missing",
                policy_resource(json!({"PolicyName": {"Ref": "Serial"}})),
                none,
                Err(IP),
            ),
            (
                "unknown property",
                policy_resource(json!({"PolicyName": "A", "Tags": []})),
                none,
                Err(IR),
            ),
            (
                "override settings",
                json!({"policy": {"Type": "AWS::IoT::Policy", "Properties": {"PolicyName": "A"}, "OverrideSettings": {}}}),
                none,
                Err(IR),
            ),
        ];
        for (name, resources, pairs, expected) in rows {
            let got = run(&resources_body(resources), pairs).map(|o| o.policies);
            assert_eq!(got, expected, "{name}");
        }
    }

    #[test]
    fn device_configuration() {
        type Config = BTreeMap<String, String>;
        let config = |pairs: &[(&str, &str)]| -> Config { params(pairs) };
        let rows: Vec<(&str, Value, Expect<Config>)> = vec![
            ("absent", json!({"Resources": {}}), Ok(config(&[]))),
            (
                "null",
                json!({"Resources": {}, "DeviceConfiguration": null}),
                Ok(config(&[])),
            ),
            (
                "empty",
                json!({"Resources": {}, "DeviceConfiguration": {}}),
                Ok(config(&[])),
            ),
            (
                "literals and intrinsics",
                json!({
                    "Parameters": {"Loc": {"Type": "String", "Default": "lab"}},
                    "Resources": {},
                    "DeviceConfiguration": {"Foo": "Bar", "Where": {"Fn::Sub": "in-${Loc}"}, "Empty": ""}
                }),
                Ok(config(&[
                    ("Empty", ""),
                    ("Foo", "Bar"),
                    ("Where", "in-lab"),
                ])),
            ),
            (
                "a list",
                json!({"Resources": {}, "DeviceConfiguration": ["a"]}),
                Err(IR),
            ),
            (
                "a string",
                json!({"Resources": {}, "DeviceConfiguration": "a"}),
                Err(IR),
            ),
            (
                "an intrinsic",
                json!({"Resources": {}, "DeviceConfiguration": {"Fn::Sub": "x"}}),
                Err(IR),
            ),
            (
                "nested object",
                json!({"Resources": {}, "DeviceConfiguration": {"a": {"b": "c"}}}),
                Err(IR),
            ),
            (
                "number value",
                json!({"Resources": {}, "DeviceConfiguration": {"a": 1}}),
                Err(IR),
            ),
        ];
        for (name, body, expected) in rows {
            let got = run(&body, &[]).map(|o| o.device_configuration);
            assert_eq!(got, expected, "{name}");
        }
    }

    /// Template sections of the wrong shape: `evaluate` and
    /// `parse_template_file` must agree.
    #[test]
    fn describe_provisioning_template_output() {
        // What `aws iot describe-provisioning-template` prints: the body as an escaped string,
        // metadata, and a Lambda hook.
        let body = json!({"Resources": {}});
        let text = json!({
            "templateArn": "arn:aws:iot:us-east-1:123456789012:provisioningtemplate/T",
            "templateName": "T",
            "description": "d",
            "creationDate": "2024-01-01T00:00:00+00:00",
            "lastModifiedDate": "2024-01-01T00:00:00+00:00",
            "defaultVersionId": 1,
            "templateBody": body.to_string(),
            "enabled": false,
            "provisioningRoleArn": "arn:aws:iam::123456789012:role/r",
            "preProvisioningHook": {"targetArn": "arn:aws:lambda:us-east-1:123456789012:function:f", "payloadVersion": "2020-04-01"},
            "type": "FLEET_PROVISIONING"
        })
        .to_string();
        let file = parse_template_file(&text).unwrap();
        assert_eq!(file.body, body);
        assert!(!file.enabled);
        assert_eq!(
            file.hook,
            Some(HookSpec {
                command: Vec::new(),
                target_arn: Some("arn:aws:lambda:us-east-1:123456789012:function:f".into()),
            })
        );
    }

    #[test]
    fn body_length_limit() {
        // {"DeviceConfiguration":{"k":"xxx…"},"Resources":{}}: 47 characters besides the x's.
        let body = |n: usize| json!({"Resources": {}, "DeviceConfiguration": {"k": "x".repeat(n)}});
        assert!(parse_template_file(&body(MAX_BODY_CHARS - 47).to_string()).is_ok());
        let err = parse_template_file(&body(MAX_BODY_CHARS - 46).to_string()).unwrap_err();
        assert!(err.contains("10241 characters"), "{err}");
    }

    #[test]
    fn template_sections() {
        let rows: Vec<(&str, Value, Result<(), &str>)> = vec![
            ("only resources", json!({"Resources": {}}), Ok(())),
            (
                "extra top-level keys",
                json!({"Description": "d", "Version": "1", "Resources": {}}),
                Ok(()),
            ),
            (
                "Conditions",
                json!({"Conditions": {}, "Resources": {}}),
                Err(IR),
            ),
            ("Outputs", json!({"Outputs": {}, "Resources": {}}), Err(IR)),
            (
                "Transform",
                json!({"Transform": "x", "Resources": {}}),
                Err(IR),
            ),
            (
                "resource Condition",
                json!({"Resources": {"t": {"Type": "AWS::IoT::Thing", "Condition": "c", "Properties": {"ThingName": "x"}}}}),
                Err(IR),
            ),
            (
                "resource DependsOn",
                json!({"Resources": {"t": {"Type": "AWS::IoT::Thing", "DependsOn": "c", "Properties": {"ThingName": "x"}}}}),
                Err(IR),
            ),
            (
                "parameter with description",
                json!({"Parameters": {"P": {"Type": "String", "Description": "d", "Default": "x"}}, "Resources": {}}),
                Ok(()),
            ),
            (
                "mapping with a list",
                json!({"Mappings": {"M": {"k": {"s": ["a", "b"]}}}, "Resources": {}}),
                Ok(()),
            ),
            (
                "resource with extra keys",
                json!({"Resources": {"p": {"Type": "AWS::IoT::Policy", "Properties": {"PolicyName": "A"}, "Metadata": {}}}}),
                Ok(()),
            ),
            ("not an object", json!([]), Err(IR)),
            ("a string", json!("x"), Err(IR)),
            ("no resources", json!({"Parameters": {}}), Err(IR)),
            ("resources a list", json!({"Resources": []}), Err(IR)),
            (
                "resource a string",
                json!({"Resources": {"r": "x"}}),
                Err(IR),
            ),
            (
                "resource without type",
                json!({"Resources": {"r": {}}}),
                Err(IR),
            ),
            (
                "resource type a number",
                json!({"Resources": {"r": {"Type": 1}}}),
                Err(IR),
            ),
            (
                "unsupported resource type",
                json!({"Resources": {"r": {"Type": "AWS::IoT::ThingGroup"}}}),
                Err(IR),
            ),
            (
                "properties a string",
                json!({"Resources": {"r": {"Type": "AWS::IoT::Policy", "Properties": "x"}}}),
                Err(IR),
            ),
            (
                "parameters a list",
                json!({"Parameters": [], "Resources": {}}),
                Err(IR),
            ),
            (
                "parameter a string",
                json!({"Parameters": {"P": "String"}, "Resources": {}}),
                Err(IR),
            ),
            (
                "parameter without type",
                json!({"Parameters": {"P": {}}, "Resources": {}}),
                Err(IR),
            ),
            (
                "parameter of type Number",
                json!({"Parameters": {"P": {"Type": "Number"}}, "Resources": {}}),
                Err(IR),
            ),
            (
                "parameter type a list",
                json!({"Parameters": {"P": {"Type": ["String"]}}, "Resources": {}}),
                Err(IR),
            ),
            (
                "parameter default a number",
                json!({"Parameters": {"P": {"Type": "String", "Default": 1}}, "Resources": {}}),
                Err(IR),
            ),
            (
                "mappings a list",
                json!({"Mappings": [], "Resources": {}}),
                Err(IR),
            ),
            (
                "mapping a list",
                json!({"Mappings": {"M": []}, "Resources": {}}),
                Err(IR),
            ),
            (
                "mapping top key a string",
                json!({"Mappings": {"M": {"k": "v"}}, "Resources": {}}),
                Err(IR),
            ),
            (
                "mapping value a number",
                json!({"Mappings": {"M": {"k": {"s": 1}}}, "Resources": {}}),
                Err(IR),
            ),
            (
                "mapping value an intrinsic",
                json!({"Mappings": {"M": {"k": {"s": {"Ref": "P"}}}}, "Resources": {}}),
                Err(IR),
            ),
            (
                "mapping list of numbers",
                json!({"Mappings": {"M": {"k": {"s": [1]}}}, "Resources": {}}),
                Err(IR),
            ),
            (
                "device configuration a list",
                json!({"Resources": {}, "DeviceConfiguration": []}),
                Err(IR),
            ),
        ];
        for (name, body, expected) in rows {
            let got = run(&body, &[]).map(|_| ());
            assert_eq!(got, expected, "{name}");
            let parsed = parse_template_file(&body.to_string());
            assert_eq!(parsed.is_ok(), expected.is_ok(), "{name}: {parsed:?}");
        }
    }

    #[test]
    fn template_files() {
        let minimal = json!({"Resources": {}});
        let full = json!({
            "Parameters": {"P": {"Type": "String", "Default": "d"}},
            "Mappings": {"M": {"k": {"s": "v"}}},
            "Resources": {"p": {"Type": "AWS::IoT::Policy", "Properties": {"PolicyName": "A"}}},
            "DeviceConfiguration": {"a": "b"}
        });
        type Expected = Result<(bool, Option<Vec<&'static str>>, Value), &'static str>;
        let rows: Vec<(&str, String, Expected)> = vec![
            ("bare", minimal.to_string(), Ok((true, None, minimal.clone()))),
            ("bare, every section", full.to_string(), Ok((true, None, full.clone()))),
            (
                "wrapper with an object",
                json!({"templateBody": full}).to_string(),
                Ok((true, None, full.clone())),
            ),
            (
                "wrapper with a string, disabled",
                json!({"templateBody": full.to_string(), "enabled": false}).to_string(),
                Ok((false, None, full.clone())),
            ),
            (
                "wrapper with a hook",
                json!({"templateBody": minimal, "enabled": true, "preProvisioningHook": {"command": ["/bin/hook", "--flag"]}}).to_string(),
                Ok((true, Some(vec!["/bin/hook", "--flag"]), minimal.clone())),
            ),
            (
                "wrapper with other keys and nulls",
                json!({"templateName": "T", "description": "d", "templateBody": minimal, "enabled": null, "preProvisioningHook": null}).to_string(),
                Ok((true, None, minimal.clone())),
            ),
            ("not JSON", "templateBody: x".to_owned(), Err("not valid JSON")),
            ("empty", String::new(), Err("not valid JSON")),
            ("trailing text", format!("{minimal} x"), Err("not valid JSON")),
            ("a list", "[]".to_owned(), Err("must be a JSON object")),
            ("no resources", "{}".to_owned(), Err("no Resources")),
            ("resources a list", r#"{"Resources": []}"#.to_owned(), Err("Resources must be an object")),
            ("body a number", r#"{"templateBody": 5}"#.to_owned(), Err("templateBody must be")),
            ("body null", r#"{"templateBody": null}"#.to_owned(), Err("templateBody must be")),
            ("body string not JSON", r#"{"templateBody": "nope"}"#.to_owned(), Err("templateBody is not valid JSON")),
            ("body string a list", r#"{"templateBody": "[1]"}"#.to_owned(), Err("templateBody must contain a JSON object")),
            ("body without resources", r#"{"templateBody": "{}"}"#.to_owned(), Err("no Resources")),
            (
                "enabled a string",
                json!({"templateBody": minimal, "enabled": "yes"}).to_string(),
                Err("enabled must be a boolean"),
            ),
            (
                "hook a string",
                json!({"templateBody": minimal, "preProvisioningHook": "/bin/hook"}).to_string(),
                Err("preProvisioningHook must be"),
            ),
            (
                "hook without command",
                json!({"templateBody": minimal, "preProvisioningHook": {}}).to_string(),
                Err("command is missing"),
            ),
            (
                "lambda hook ARN not a string",
                json!({"templateBody": minimal, "preProvisioningHook": {"targetArn": 5}}).to_string(),
                Err("targetArn must be a string"),
            ),
            (
                "hook command a string",
                json!({"templateBody": minimal, "preProvisioningHook": {"command": "/bin/hook"}}).to_string(),
                Err("command is missing"),
            ),
            (
                "hook command empty",
                json!({"templateBody": minimal, "preProvisioningHook": {"command": []}}).to_string(),
                Err("must not be empty"),
            ),
            (
                "hook command with a number",
                json!({"templateBody": minimal, "preProvisioningHook": {"command": ["/bin/hook", 1]}}).to_string(),
                Err("must be strings"),
            ),
            (
                "hook program empty",
                json!({"templateBody": minimal, "preProvisioningHook": {"command": [""]}}).to_string(),
                Err("must not be empty"),
            ),
            (
                "unsupported resource",
                json!({"Resources": {"g": {"Type": "AWS::IoT::ThingGroup"}}}).to_string(),
                Err("unsupported resource Type"),
            ),
        ];
        for (name, text, expected) in rows {
            let got = parse_template_file(&text);
            match (got, expected) {
                (Ok(file), Ok((enabled, hook, body))) => {
                    let hook = hook.map(|command| HookSpec {
                        command: command.into_iter().map(str::to_owned).collect(),
                        target_arn: None,
                    });
                    assert_eq!(
                        file,
                        TemplateFile {
                            body,
                            enabled,
                            hook
                        },
                        "{name}"
                    );
                }
                (Err(message), Err(part)) => {
                    assert!(message.contains(part), "{name}: {message:?} lacks {part:?}");
                }
                (got, expected) => panic!("{name}: got {got:?}, expected {expected:?}"),
            }
        }
    }

    #[test]
    fn demo_template() {
        let file = parse_template_file(DEMO_TEMPLATE).expect("demo template parses");
        assert!(file.enabled);
        assert_eq!(file.hook, None);

        let expected = |location: &str, url: &str| TemplateOutcome {
            thing: Some(ThingSpec {
                name: "demo-ABC123".to_owned(),
                attributes: params(&[("location", location), ("serial", "ABC123")]),
                thing_type: None,
                groups: Vec::new(),
                billing_group: None,
                overrides: OverrideSettings {
                    attribute_payload: Override::Merge,
                    thing_groups: Override::DoNothing,
                    thing_type_name: Override::Replace,
                },
            }),
            certificate_status: Some(CertStatus::Active),
            policies: vec![document(
                "cc934fb5f7d677666c113964faf87378b65e3ddfbf32148a5deca0baaccd1498",
                r#"{"Statement":[{"Action":["iot:Connect","iot:Publish","iot:Subscribe","iot:Receive"],"Effect":"Allow","Resource":"*"}],"Version":"2012-10-17"}"#,
            )],
            device_configuration: params(&[
                ("FallbackUrl", "https://www.example.com/fallback"),
                ("LocationUrl", url),
            ]),
        };
        let rows: Vec<(Pairs, Expect<TemplateOutcome>)> = vec![
            (
                &[("SerialNumber", "ABC123")],
                Ok(expected("lab", "https://lab.example.com/devices/ABC123")),
            ),
            (
                &[
                    ("SerialNumber", "ABC123"),
                    ("Location", "factory"),
                    ("Unused", "x"),
                ],
                Ok(expected(
                    "factory",
                    "https://factory.example.com/devices/ABC123",
                )),
            ),
            (&[], Err(IP)),
            (
                &[("SerialNumber", "ABC123"), ("Location", "paris")],
                Err(IR),
            ),
            (&[("SerialNumber", "ABC 123")], Err(IR)),
        ];
        for (pairs, expected) in rows {
            assert_eq!(run(&file.body, pairs), expected, "{pairs:?}");
        }
        let missing = evaluate(&file.body, &params(&[]), CERT).unwrap_err();
        assert_eq!(missing.message, "Missing parameter: SerialNumber");
    }

    #[test]
    fn deep_input_is_an_error_not_a_stack_overflow() {
        const DEPTH: usize = 10_000;

        // Through the file parser, as text.
        let arrays = format!(
            r#"{{"Resources": {{}}, "DeviceConfiguration": {{"v": {}"x"{}}}}}"#,
            "[".repeat(DEPTH),
            "]".repeat(DEPTH)
        );
        assert!(parse_template_file(&arrays).is_err());
        let joins = format!(
            r#"{{"Resources": {{}}, "DeviceConfiguration": {{"v": {}"x"{}}}}}"#,
            r#"{"Fn::Join": ["", ["#.repeat(DEPTH),
            "]]}".repeat(DEPTH)
        );
        assert!(parse_template_file(&joins).is_err());
        let wrapped = json!({ "templateBody": joins }).to_string();
        assert!(parse_template_file(&wrapped).is_err());

        // Through the evaluator, as values built without the parser's limit.
        let deep_list = || {
            let mut value = json!("x");
            for _ in 0..DEPTH {
                value = Value::Array(vec![value]);
            }
            value
        };
        let deep_object = || {
            let mut value = json!("x");
            for _ in 0..DEPTH {
                value = object(vec![("a", value)]);
            }
            value
        };
        let config = |value: Value| {
            object(vec![
                ("Resources", json!({})),
                ("DeviceConfiguration", object(vec![("v", value)])),
            ])
        };
        let resource = |kind: &str, properties: Value| {
            object(vec![(
                "Resources",
                object(vec![(
                    "r",
                    object(vec![("Type", json!(kind)), ("Properties", properties)]),
                )]),
            )])
        };
        let bodies = [
            config(nested_join(DEPTH)),
            config(object(vec![(
                "Fn::Sub",
                Value::Array(vec![json!("${A}"), object(vec![("A", nested_join(DEPTH))])]),
            )])),
            config(object(vec![(
                "Fn::Select",
                Value::Array(vec![nested_join(DEPTH), json!(["x"])]),
            )])),
            config(deep_list()),
            resource(
                "AWS::IoT::Thing",
                object(vec![("ThingName", nested_join(DEPTH))]),
            ),
            resource(
                "AWS::IoT::Thing",
                object(vec![
                    ("ThingName", json!("t")),
                    ("AttributePayload", object(vec![("a", nested_join(DEPTH))])),
                ]),
            ),
            resource(
                "AWS::IoT::Thing",
                object(vec![
                    ("ThingName", json!("t")),
                    ("ThingGroups", deep_list()),
                ]),
            ),
            resource(
                "AWS::IoT::Policy",
                object(vec![("PolicyDocument", deep_object())]),
            ),
            resource(
                "AWS::IoT::Policy",
                object(vec![("PolicyName", nested_join(DEPTH))]),
            ),
            resource(
                "AWS::IoT::Certificate",
                object(vec![("CertificateId", nested_join(DEPTH))]),
            ),
        ];
        for body in bodies {
            let err = evaluate(&body, &params(&[]), CERT).unwrap_err();
            assert_eq!((err.status, err.code), (400, IR), "{}", err.message);
            assert!(err.message.contains("deeper than"), "{}", err.message);
            drop_deep(body);
        }
    }
}
