//! Registry resources a provisioning template can only name, never create: on AWS, thing
//! types, thing groups, billing groups and policies named by `PolicyName` are made beforehand
//! with the control plane (CreateThingType, CreateThingGroup, CreateBillingGroup, CreatePolicy),
//! and RegisterThing fails when one is missing (the control plane's AddThingToThingGroup,
//! AddThingToBillingGroup, CreateThing and AttachPolicy answer ResourceNotFoundException, 404,
//! for a resource that does not exist; API reference).
//!
//! The emulator reads them from the data directory at every RegisterThing:
//! - `resources.json`: `{"thingTypes": [..], "thingGroups": [..], "billingGroups": [..]}`
//!   (each optional; a missing file means none exist);
//! - `policies/NAME.json`: the policy NAME, a policy document or the JSON `aws iot get-policy`
//!   prints.

use std::collections::BTreeSet;
use std::path::Path;

use serde_json::Value;

/// The thing types, thing groups and billing groups that exist.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resources {
    pub thing_types: BTreeSet<String>,
    pub thing_groups: BTreeSet<String>,
    pub billing_groups: BTreeSet<String>,
}

impl Resources {
    /// Reads `resources.json`; a missing file is an empty registry.
    pub fn load(path: &Path) -> Result<Resources, String> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Resources::default()),
            Err(e) => return Err(format!("resources.json: {e}")),
        };
        Resources::parse(&text).map_err(|e| format!("resources.json: {e}"))
    }

    pub fn parse(text: &str) -> Result<Resources, String> {
        let value: Value =
            serde_json::from_str(text).map_err(|e| format!("not JSON (line {})", e.line()))?;
        let map = value.as_object().ok_or("must be a JSON object")?;
        let mut out = Resources::default();
        for (key, list) in map {
            let set = match key.as_str() {
                "thingTypes" => &mut out.thing_types,
                "thingGroups" => &mut out.thing_groups,
                "billingGroups" => &mut out.billing_groups,
                other => {
                    return Err(format!(
                        "unknown key {other:?} (expected thingTypes, thingGroups, billingGroups)"
                    ))
                }
            };
            let items = list
                .as_array()
                .ok_or_else(|| format!("{key} must be a list of names"))?;
            for item in items {
                let name = item
                    .as_str()
                    .ok_or_else(|| format!("{key} must be a list of names"))?;
                set.insert(name.to_owned());
            }
        }
        Ok(out)
    }
}

/// Reads `policies/NAME.json`: `Ok(None)` when there is no such policy.
pub fn load_policy(dir: &Path, name: &str) -> Result<Option<String>, String> {
    // Policy names are [\w+=,.@-]{1,128} (checked by the template): never a path.
    let path = dir.join(format!("{name}.json"));
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("policies/{name}.json: {e}")),
    };
    crate::policy::Policy::parse(name, &text)
        .map_err(|e| format!("policies/{name}.json is not a valid IoT policy: {e}"))?;
    Ok(Some(text))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_table() {
        let ok = Resources::parse(
            r#"{"thingTypes": ["t"], "thingGroups": ["g1", "g2"], "billingGroups": []}"#,
        )
        .unwrap();
        assert!(ok.thing_types.contains("t") && ok.thing_groups.len() == 2);
        for (text, want) in [
            ("[]", "JSON object"),
            (r#"{"groups": []}"#, "unknown key \"groups\""),
            (r#"{"thingGroups": "g"}"#, "list of names"),
            (r#"{"thingGroups": [1]}"#, "list of names"),
            ("{", "not JSON"),
        ] {
            let err = Resources::parse(text).unwrap_err();
            assert!(err.contains(want), "{text}: {err}");
        }
    }
}
