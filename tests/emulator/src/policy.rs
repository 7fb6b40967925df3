//! AWS IoT Core policies: parsed from the JSON AWS takes, evaluated for `iot:Connect`,
//! `iot:Publish`, `iot:Subscribe` and `iot:Receive` as the message broker evaluates them.
//!
//! Sources (AWS IoT Core developer guide):
//! - policy-actions.html: the four MQTT actions and when each is checked (Receive on every
//!   delivery, so a subscription alone does not let a message through).
//! - iot-policy-variables.html: `*` matches any characters, `?` one character, `+` and `#` are
//!   literal characters in a policy; `$(*)`, `$(?)`, `$($)` stand for the literal characters.
//! - connect-policy.html, pub-sub-policy.html: resources `client/<clientId>`,
//!   `topic/<topic>` (Publish, Receive) and `topicfilter/<filter>` (Subscribe) under
//!   `arn:aws:iot:<region>:<account>:`.
//! - thing-policy-variables.html: `iot:Connection.Thing.*` resolve to the thing whose name is the
//!   client id, when that thing is attached to the connecting certificate; `IsAttached` says
//!   whether it is. thing-policy-examples.html: a thing variable that does not resolve "will
//!   result in an access denied error".
//! - cert-policy-variables.html, use-policy-variables.html: `iot:CertificateId`,
//!   `iot:Certificate.Subject.*`, `iot:Certificate.Issuer.*`; "the missing policy variable
//!   doesn't get evaluated in the policy statement".
//!
//! Evaluation is IAM's: an explicit Deny wins over any Allow, and without an Allow the answer
//! is deny. [inferred] A statement whose resource or condition uses a variable that does not
//! resolve does not apply (neither allows nor denies); a condition on a key the request does not
//! have is false. Condition operators the emulator does not know make the policy invalid rather
//! than silently different from AWS.

use std::collections::BTreeMap;

use serde_json::Value;

/// An MQTT action a policy can allow or deny.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Connect,
    Publish,
    Subscribe,
    Receive,
}

impl Action {
    pub fn name(self) -> &'static str {
        match self {
            Action::Connect => "iot:Connect",
            Action::Publish => "iot:Publish",
            Action::Subscribe => "iot:Subscribe",
            Action::Receive => "iot:Receive",
        }
    }

    /// The resource type the action is checked against.
    fn resource_type(self) -> &'static str {
        match self {
            Action::Connect => "client",
            Action::Publish | Action::Receive => "topic",
            Action::Subscribe => "topicfilter",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Effect {
    Allow,
    Deny,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    StringEquals,
    StringNotEquals,
    StringEqualsIgnoreCase,
    StringNotEqualsIgnoreCase,
    StringLike,
    StringNotLike,
    Bool,
    Null,
}

impl Op {
    fn parse(name: &str) -> Option<Op> {
        Some(match name {
            "StringEquals" | "ArnEquals" => Op::StringEquals,
            "StringNotEquals" | "ArnNotEquals" => Op::StringNotEquals,
            "StringEqualsIgnoreCase" => Op::StringEqualsIgnoreCase,
            "StringNotEqualsIgnoreCase" => Op::StringNotEqualsIgnoreCase,
            "StringLike" | "ArnLike" => Op::StringLike,
            "StringNotLike" | "ArnNotLike" => Op::StringNotLike,
            "Bool" => Op::Bool,
            "Null" => Op::Null,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, PartialEq)]
struct Condition {
    op: Op,
    key: String,
    values: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
struct Statement {
    effect: Effect,
    actions: Vec<String>,
    not_action: bool,
    resources: Vec<String>,
    not_resource: bool,
    conditions: Vec<Condition>,
}

/// A parsed policy document.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub name: String,
    statements: Vec<Statement>,
}

/// The thing a connection is evaluated for: the thing named like the client id, attached to
/// the connecting certificate.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ConnThing {
    pub name: String,
    pub thing_type: Option<String>,
    pub attributes: BTreeMap<String, String>,
}

/// What policy variables resolve to for one connection.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Context {
    pub region: String,
    pub account: String,
    pub client_id: String,
    pub certificate_id: String,
    pub thing: Option<ConnThing>,
    /// `CommonName`, `Organization`, ... of the certificate's subject.
    pub subject: BTreeMap<String, String>,
    /// The same for its issuer.
    pub issuer: BTreeMap<String, String>,
}

impl Context {
    /// The value of a policy variable or condition key; `None` when it does not resolve.
    fn variable(&self, name: &str) -> Option<String> {
        let thing = self.thing.as_ref();
        match name {
            "iot:ClientId" => Some(self.client_id.clone()),
            "iot:CertificateId" => Some(self.certificate_id.clone()),
            "iot:Connection.Thing.ThingName" => thing.map(|t| t.name.clone()),
            "iot:Connection.Thing.IsAttached" => {
                Some(if thing.is_some() { "true" } else { "false" }.to_owned())
            }
            "iot:Connection.Thing.ThingTypeName" => thing.and_then(|t| t.thing_type.clone()),
            _ => {
                if let Some(attr) = name
                    .strip_prefix("iot:Connection.Thing.Attributes[")
                    .and_then(|r| r.strip_suffix(']'))
                {
                    return thing.and_then(|t| t.attributes.get(attr).cloned());
                }
                if let Some(field) = name.strip_prefix("iot:Certificate.Subject.") {
                    return self.subject.get(field).cloned();
                }
                if let Some(field) = name.strip_prefix("iot:Certificate.Issuer.") {
                    return self.issuer.get(field).cloned();
                }
                None
            }
        }
    }

    /// The ARN an action is checked against.
    pub fn resource(&self, action: Action, name: &str) -> String {
        format!(
            "arn:aws:iot:{}:{}:{}/{}",
            self.region,
            self.account,
            action.resource_type(),
            name
        )
    }
}

/// One piece of a resource pattern after variables are substituted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tok {
    Lit(char),
    Any,
    One,
}

/// Expands `${...}` variables and `$(*)`-style escapes; `*` and `?` outside them are wildcards,
/// what a variable resolves to is literal. `None` when a variable does not resolve.
fn expand(pattern: &str, ctx: &Context) -> Option<Vec<Tok>> {
    let mut out = Vec::with_capacity(pattern.len());
    let mut rest = pattern;
    while let Some(c) = rest.chars().next() {
        if let Some(after) = rest.strip_prefix("${") {
            let end = after.find('}')?;
            let value = ctx.variable(&after[..end])?;
            out.extend(value.chars().map(Tok::Lit));
            rest = &after[end + 1..];
            continue;
        }
        if let Some(after) = rest.strip_prefix("$(") {
            if after.len() >= 2 && after.as_bytes()[1] == b')' {
                let lit = after.as_bytes()[0];
                if matches!(lit, b'*' | b'?' | b'$') {
                    out.push(Tok::Lit(char::from(lit)));
                    rest = &after[2..];
                    continue;
                }
            }
        }
        out.push(match c {
            '*' => Tok::Any,
            '?' => Tok::One,
            c => Tok::Lit(c),
        });
        rest = &rest[c.len_utf8()..];
    }
    Some(out)
}

/// Glob match of `text` against `pattern` (`Any` = any run, `One` = one character), iterative
/// with one backtrack point, so linear-ish and never recursive.
fn glob(pattern: &[Tok], text: &str, ignore_case: bool) -> bool {
    let text: Vec<char> = text.chars().collect();
    let eq = |a: char, b: char| {
        if ignore_case {
            a.to_lowercase().eq(b.to_lowercase())
        } else {
            a == b
        }
    };
    let (mut p, mut t) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        match pattern.get(p) {
            Some(Tok::One) => {
                p += 1;
                t += 1;
            }
            Some(Tok::Lit(c)) if eq(*c, text[t]) => {
                p += 1;
                t += 1;
            }
            Some(Tok::Any) => {
                star = Some((p, t));
                p += 1;
            }
            _ => match star {
                Some((sp, st)) => {
                    p = sp + 1;
                    t = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    pattern[p.min(pattern.len())..]
        .iter()
        .all(|t| *t == Tok::Any)
}

fn literal(text: &str) -> Vec<Tok> {
    text.chars().map(Tok::Lit).collect()
}

fn strings(value: &Value, what: &str) -> Result<Vec<String>, String> {
    match value {
        Value::String(s) => Ok(vec![s.clone()]),
        Value::Array(items) if !items.is_empty() => items
            .iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.clone()),
                _ => Err(format!("{what} must hold strings")),
            })
            .collect(),
        _ => Err(format!(
            "{what} must be a string or a non-empty list of strings"
        )),
    }
}

fn condition_values(value: &Value, what: &str) -> Result<Vec<String>, String> {
    let one = |v: &Value| match v {
        Value::String(s) => Ok(s.clone()),
        Value::Bool(b) => Ok(b.to_string()),
        Value::Number(n) => Ok(n.to_string()),
        _ => Err(format!(
            "{what} must be a string, a boolean or a list of them"
        )),
    };
    match value {
        Value::Array(items) if !items.is_empty() => items.iter().map(one).collect(),
        Value::Array(_) => Err(format!("{what} must not be empty")),
        v => Ok(vec![one(v)?]),
    }
}

impl Policy {
    /// Parses a policy document, or the JSON `aws iot get-policy` prints (its `policyDocument`
    /// is the document as a string; its `policyName` names the policy).
    pub fn parse(name: &str, text: &str) -> Result<Policy, String> {
        let value: Value =
            serde_json::from_str(text).map_err(|e| format!("not JSON (line {})", e.line()))?;
        Policy::from_value(name, &value)
    }

    pub fn from_value(name: &str, value: &Value) -> Result<Policy, String> {
        if let Some(doc) = value.get("policyDocument") {
            let text = doc
                .as_str()
                .ok_or("policyDocument must be the document as a string")?;
            let name = value
                .get("policyName")
                .and_then(Value::as_str)
                .unwrap_or(name);
            return Policy::parse(name, text);
        }
        let map = value.as_object().ok_or("a policy must be a JSON object")?;
        for key in map.keys() {
            if !matches!(key.as_str(), "Version" | "Statement" | "Id") {
                return Err(format!("unknown policy element {key:?}"));
            }
        }
        match map.get("Version").and_then(Value::as_str) {
            Some("2012-10-17" | "2008-10-17") | None => {}
            Some(v) => return Err(format!("unsupported policy Version {v:?}")),
        }
        let statements = match map.get("Statement") {
            Some(Value::Array(items)) => items.iter().collect::<Vec<_>>(),
            Some(v @ Value::Object(_)) => vec![v],
            _ => return Err("Statement must be an object or a list of objects".into()),
        };
        let statements = statements
            .into_iter()
            .enumerate()
            .map(|(i, s)| Statement::parse(s).map_err(|e| format!("Statement[{i}]: {e}")))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Policy {
            name: name.to_owned(),
            statements,
        })
    }

    /// A policy with no statements: allows nothing.
    pub fn empty(name: &str) -> Policy {
        Policy {
            name: name.to_owned(),
            statements: Vec::new(),
        }
    }
}

impl Statement {
    fn parse(value: &Value) -> Result<Statement, String> {
        let map = value.as_object().ok_or("must be an object")?;
        for key in map.keys() {
            if !matches!(
                key.as_str(),
                "Sid"
                    | "Effect"
                    | "Action"
                    | "NotAction"
                    | "Resource"
                    | "NotResource"
                    | "Condition"
            ) {
                return Err(format!("unknown element {key:?}"));
            }
        }
        let effect = match map.get("Effect").and_then(Value::as_str) {
            Some("Allow") => Effect::Allow,
            Some("Deny") => Effect::Deny,
            _ => return Err("Effect must be \"Allow\" or \"Deny\"".into()),
        };
        let (actions, not_action) = match (map.get("Action"), map.get("NotAction")) {
            (Some(a), None) => (strings(a, "Action")?, false),
            (None, Some(a)) => (strings(a, "NotAction")?, true),
            _ => return Err("exactly one of Action and NotAction is required".into()),
        };
        let (resources, not_resource) = match (map.get("Resource"), map.get("NotResource")) {
            (Some(r), None) => (strings(r, "Resource")?, false),
            (None, Some(r)) => (strings(r, "NotResource")?, true),
            _ => return Err("exactly one of Resource and NotResource is required".into()),
        };
        let mut conditions = Vec::new();
        if let Some(cond) = map.get("Condition") {
            let ops = cond.as_object().ok_or("Condition must be an object")?;
            for (op_name, keys) in ops {
                let op = Op::parse(op_name)
                    .ok_or_else(|| format!("condition operator {op_name:?} is not emulated"))?;
                let keys = keys
                    .as_object()
                    .ok_or_else(|| format!("Condition.{op_name} must be an object"))?;
                for (key, values) in keys {
                    conditions.push(Condition {
                        op,
                        key: key.clone(),
                        values: condition_values(values, &format!("Condition.{op_name}.{key}"))?,
                    });
                }
            }
        }
        Ok(Statement {
            effect,
            actions,
            not_action,
            resources,
            not_resource,
            conditions,
        })
    }

    fn action_matches(&self, action: Action) -> bool {
        let name = action.name();
        let hit = self
            .actions
            .iter()
            .any(|a| glob(&literal_or_wild(a), name, true));
        hit != self.not_action
    }

    /// `Some(true)` applies, `Some(false)` does not, `None`: a variable did not resolve.
    fn resource_matches(&self, resource: &str, ctx: &Context) -> Option<bool> {
        let mut hit = false;
        for pattern in &self.resources {
            let toks = expand(pattern, ctx)?;
            if glob(&toks, resource, false) {
                hit = true;
            }
        }
        Some(hit != self.not_resource)
    }

    fn conditions_hold(&self, ctx: &Context) -> Option<bool> {
        for c in &self.conditions {
            let actual = ctx.variable(&c.key);
            let holds = match c.op {
                Op::Null => {
                    let want_null = c.values.iter().any(|v| v == "true");
                    actual.is_none() == want_null
                }
                _ => {
                    let Some(actual) = actual else {
                        return Some(false);
                    };
                    let mut any = false;
                    for v in &c.values {
                        let expected = match c.op {
                            Op::StringLike | Op::StringNotLike => expand(v, ctx)?,
                            _ => literal(&expand_plain(v, ctx)?),
                        };
                        let ignore_case = matches!(
                            c.op,
                            Op::StringEqualsIgnoreCase | Op::StringNotEqualsIgnoreCase | Op::Bool
                        );
                        if glob(&expected, &actual, ignore_case) {
                            any = true;
                        }
                    }
                    match c.op {
                        Op::StringNotEquals | Op::StringNotEqualsIgnoreCase | Op::StringNotLike => {
                            !any
                        }
                        _ => any,
                    }
                }
            };
            if !holds {
                return Some(false);
            }
        }
        Some(true)
    }
}

/// Action names take `*` and `?` and no variables.
fn literal_or_wild(pattern: &str) -> Vec<Tok> {
    pattern
        .chars()
        .map(|c| match c {
            '*' => Tok::Any,
            '?' => Tok::One,
            c => Tok::Lit(c),
        })
        .collect()
}

/// A condition value with its variables substituted, as plain text.
fn expand_plain(value: &str, ctx: &Context) -> Option<String> {
    Some(
        expand(value, ctx)?
            .into_iter()
            .map(|t| match t {
                Tok::Lit(c) => c,
                Tok::Any => '*',
                Tok::One => '?',
            })
            .collect(),
    )
}

/// The answer for one action on one resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allowed,
    /// No statement allows it.
    ImplicitDeny,
    /// A Deny statement of this policy matches.
    ExplicitDeny(String),
}

impl Decision {
    pub fn allowed(&self) -> bool {
        *self == Decision::Allowed
    }
}

/// Evaluates `action` on the resource `name` (client id, topic or topic filter) against every
/// policy attached to the principal.
pub fn evaluate(policies: &[Policy], ctx: &Context, action: Action, name: &str) -> Decision {
    let resource = ctx.resource(action, name);
    let mut allowed = false;
    for policy in policies {
        for s in &policy.statements {
            if !s.action_matches(action) {
                continue;
            }
            if s.resource_matches(&resource, ctx) != Some(true) {
                continue;
            }
            if s.conditions_hold(ctx) != Some(true) {
                continue;
            }
            match s.effect {
                Effect::Deny => return Decision::ExplicitDeny(policy.name.clone()),
                Effect::Allow => allowed = true,
            }
        }
    }
    if allowed {
        Decision::Allowed
    } else {
        Decision::ImplicitDeny
    }
}

/// The claim policy the emulator writes on first start: the one AWS's fleet provisioning guide
/// shows for the claim certificate (provision-wo-cert.html, "Provisioning by claim"), with the
/// template name `*` (any template of the emulator) and the topics of CreateCertificateFromCsr
/// added as the device provisioning MQTT API page (fleet-provision-api.html) shows them, so
/// that both ways of making a certificate work out of the box. `{region}` and `{account}` are
/// the emulator's.
pub fn default_claim_policy(region: &str, account: &str) -> String {
    let arn = format!("arn:aws:iot:{region}:{account}");
    format!(
        r#"{{
  "Version": "2012-10-17",
  "Statement": [
    {{
      "Effect": "Allow",
      "Action": ["iot:Connect"],
      "Resource": "*"
    }},
    {{
      "Effect": "Allow",
      "Action": ["iot:Publish", "iot:Receive"],
      "Resource": [
        "{arn}:topic/$aws/certificates/create/*",
        "{arn}:topic/$aws/certificates/create-from-csr/*",
        "{arn}:topic/$aws/provisioning-templates/*/provision/*"
      ]
    }},
    {{
      "Effect": "Allow",
      "Action": "iot:Subscribe",
      "Resource": [
        "{arn}:topicfilter/$aws/certificates/create/*",
        "{arn}:topicfilter/$aws/certificates/create-from-csr/*",
        "{arn}:topicfilter/$aws/provisioning-templates/*/provision/*"
      ]
    }}
  ]
}}
"#
    )
}

/// Subject or issuer fields as AWS's policy variables name them.
pub fn name_fields(name: &x509_parser::x509::X509Name<'_>) -> BTreeMap<String, String> {
    // Attribute type OIDs (X.520) of the fields AWS lists.
    let table = [
        ("2.5.4.3", "CommonName"),
        ("2.5.4.6", "Country"),
        ("2.5.4.10", "Organization"),
        ("2.5.4.11", "OrganizationalUnit"),
        ("2.5.4.8", "State"),
        ("2.5.4.7", "Locality"),
        ("2.5.4.5", "SerialNumber"),
        ("2.5.4.12", "Title"),
        ("2.5.4.4", "Surname"),
        ("2.5.4.42", "GivenName"),
        ("2.5.4.43", "Initials"),
        ("2.5.4.44", "GenerationQualifier"),
        ("2.5.4.46", "DistinguishedNameQualifier"),
        ("2.5.4.65", "Pseudonym"),
    ];
    let mut out = BTreeMap::new();
    for attr in name.iter_attributes() {
        let oid = attr.attr_type().to_id_string();
        if let Some((_, field)) = table.iter().find(|(o, _)| *o == oid) {
            if let Ok(text) = attr.as_str() {
                out.entry((*field).to_owned())
                    .or_insert_with(|| text.to_owned());
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ctx() -> Context {
        Context {
            region: "us-east-1".into(),
            account: "123456789012".into(),
            client_id: "dev-1".into(),
            certificate_id: "abc".into(),
            thing: None,
            subject: BTreeMap::from([("CommonName".to_owned(), "cn-1".to_owned())]),
            issuer: BTreeMap::new(),
        }
    }

    #[test]
    fn glob_table() {
        let rows = [
            ("*", "", true),
            ("*", "a/b/c", true),
            ("a/*", "a/b/c", true),
            ("a/*/c", "a/b/x/c", true),
            ("a/?", "a/b", true),
            ("a/?", "a/bc", false),
            ("a/+", "a/b", false),
            ("a/+", "a/+", true),
            ("a/#", "a/#", true),
            ("a/#", "a/b", false),
            (
                "$aws/certificates/create/*",
                "$aws/certificates/create-from-csr/json",
                false,
            ),
            ("*x*y", "axbyy", true),
            ("abc", "ab", false),
        ];
        for (p, t, want) in rows {
            assert_eq!(glob(&literal_or_wild(p), t, false), want, "{p} vs {t}");
        }
    }

    #[test]
    fn variables_and_escapes() {
        let c = ctx();
        let rows = [
            ("topic/${iot:ClientId}", Some("topic/dev-1")),
            ("x/${iot:CertificateId}", Some("x/abc")),
            ("${iot:Certificate.Subject.CommonName}", Some("cn-1")),
            ("$(*)$(?)$($)", Some("*?$")),
            ("${iot:Connection.Thing.ThingName}", None),
            ("${iot:Certificate.Subject.Title}", None),
            ("${iot:Nope}", None),
            ("${unterminated", None),
        ];
        for (p, want) in rows {
            assert_eq!(expand_plain(p, &c).as_deref(), want, "{p}");
        }
        // A value put in by a variable is literal: a client id of "*" matches only "*".
        let mut star = ctx();
        star.client_id = "*".into();
        let toks = expand("t/${iot:ClientId}", &star).unwrap();
        assert!(glob(&toks, "t/*", false));
        assert!(!glob(&toks, "t/anything", false));
    }

    #[test]
    fn policy_parse_errors() {
        let rows: Vec<(Value, &str)> = vec![
            (json!([]), "must be a JSON object"),
            (json!({"Statement": 1}), "Statement must be"),
            (
                json!({"Statement": [{"Effect": "Maybe", "Action": "*", "Resource": "*"}]}),
                "Effect",
            ),
            (
                json!({"Statement": [{"Effect": "Allow", "Resource": "*"}]}),
                "Action",
            ),
            (
                json!({"Statement": [{"Effect": "Allow", "Action": "*"}]}),
                "Resource",
            ),
            (
                json!({"Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*", "Condition": {"DateGreaterThan": {"a": "b"}}}]}),
                "not emulated",
            ),
            (
                json!({"Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*", "Principal": "*"}]}),
                "unknown element",
            ),
            (json!({"Version": "2020-01-01", "Statement": []}), "Version"),
            (json!({"policyDocument": 5}), "policyDocument"),
        ];
        for (doc, want) in rows {
            let err = Policy::from_value("p", &doc).unwrap_err();
            assert!(err.contains(want), "{doc}: {err}");
        }
        let got = Policy::from_value(
            "ignored",
            &json!({"policyName": "Real", "policyDocument": "{\"Version\":\"2012-10-17\",\"Statement\":[]}"}),
        )
        .unwrap();
        assert_eq!(got.name, "Real");
    }

    #[test]
    fn evaluation_table() {
        let arn = "arn:aws:iot:us-east-1:123456789012";
        let doc = json!({"Version": "2012-10-17", "Statement": [
            {"Effect": "Allow", "Action": "iot:Connect", "Resource": format!("{arn}:client/${{iot:ClientId}}")},
            {"Effect": "Allow", "Action": ["iot:Publish", "iot:Receive"], "Resource": format!("{arn}:topic/d/*")},
            {"Effect": "Deny", "Action": "iot:Publish", "Resource": format!("{arn}:topic/d/secret")},
            {"Effect": "Allow", "Action": "iot:Subscribe", "Resource": format!("{arn}:topicfilter/d/+")},
            {"Effect": "Allow", "Action": "iot:*", "Resource": format!("{arn}:topic/t/${{iot:Connection.Thing.ThingName}}")},
            {"Effect": "Allow", "Action": "iot:Publish", "Resource": "*",
             "Condition": {"StringEquals": {"iot:Certificate.Subject.CommonName": "admin"}}},
        ]});
        let p = Policy::from_value("P", &doc).unwrap();
        let c = ctx();
        let mut with_thing = ctx();
        with_thing.thing = Some(ConnThing {
            name: "dev-1".into(),
            ..ConnThing::default()
        });
        let mut admin = ctx();
        admin.subject.insert("CommonName".into(), "admin".into());
        use Action::*;
        let rows: Vec<(&Context, Action, &str, Decision)> = vec![
            (&c, Connect, "dev-1", Decision::Allowed),
            (&c, Connect, "dev-2", Decision::ImplicitDeny),
            (&c, Publish, "d/x/y", Decision::Allowed),
            (&c, Receive, "d/x", Decision::Allowed),
            (&c, Publish, "d/secret", Decision::ExplicitDeny("P".into())),
            (&c, Subscribe, "d/+", Decision::Allowed),
            (&c, Subscribe, "d/x", Decision::ImplicitDeny),
            (&c, Subscribe, "d/#", Decision::ImplicitDeny),
            (&c, Publish, "t/dev-1", Decision::ImplicitDeny),
            (&with_thing, Publish, "t/dev-1", Decision::Allowed),
            (&c, Publish, "elsewhere", Decision::ImplicitDeny),
            (&admin, Publish, "elsewhere", Decision::Allowed),
            (
                &admin,
                Publish,
                "d/secret",
                Decision::ExplicitDeny("P".into()),
            ),
        ];
        for (ctx, action, name, want) in rows {
            assert_eq!(
                evaluate(std::slice::from_ref(&p), ctx, action, name),
                want,
                "{action:?} {name}"
            );
        }
        assert_eq!(
            evaluate(&[], &c, Connect, "dev-1"),
            Decision::ImplicitDeny,
            "no policy, no access"
        );
    }

    #[test]
    fn is_attached_condition() {
        let doc = json!({"Statement": [{"Effect": "Allow", "Action": "iot:Connect", "Resource": "*",
            "Condition": {"Bool": {"iot:Connection.Thing.IsAttached": ["true"]}}}]});
        let p = Policy::from_value("P", &doc).unwrap();
        let mut c = ctx();
        assert!(!evaluate(std::slice::from_ref(&p), &c, Action::Connect, "dev-1").allowed());
        c.thing = Some(ConnThing {
            name: "dev-1".into(),
            ..ConnThing::default()
        });
        assert!(evaluate(std::slice::from_ref(&p), &c, Action::Connect, "dev-1").allowed());
    }

    #[test]
    fn default_claim_policy_allows_both_certificate_apis_and_any_template() {
        let p = Policy::parse("claim", &default_claim_policy("us-east-1", "123456789012")).unwrap();
        let c = ctx();
        let p = std::slice::from_ref(&p);
        for topic in [
            "$aws/certificates/create/json",
            "$aws/certificates/create-from-csr/cbor",
            "$aws/provisioning-templates/Any/provision/json",
        ] {
            assert!(evaluate(p, &c, Action::Publish, topic).allowed(), "{topic}");
            let reply = format!("{topic}/accepted");
            assert!(
                evaluate(p, &c, Action::Receive, &reply).allowed(),
                "{reply}"
            );
            assert!(
                evaluate(p, &c, Action::Subscribe, &reply).allowed(),
                "{reply}"
            );
        }
        assert!(!evaluate(p, &c, Action::Publish, "devices/x").allowed());
        assert!(!evaluate(p, &c, Action::Subscribe, "#").allowed());
    }
}
