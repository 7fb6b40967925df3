//! Rejections the emulator sends, and `errors.json`: a file in the data directory that changes
//! them, so that users can match what they see on AWS where the emulator's answer is inferred.
//!
//! ```json
//! {"InvalidPayload": {"statusCode": 400, "errorCode": "InvalidRequest",
//!                     "errorMessage": "Bad payload: {message}"}}
//! ```
//!
//! Each key is an errorCode the emulator sends; each field of its value is optional and
//! replaces that field of every such rejection (`{message}` in `errorMessage` stands for the
//! emulator's own text). The README's rejection table says which codes and messages are
//! documented by AWS, observed in a real exchange, or inferred.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::Value;

use crate::service::Reply;

/// The codes the emulator sends (and so the keys `errors.json` may have).
pub const CODES: [&str; 12] = [
    "InvalidPayload",
    "InvalidCertificateSigningRequest",
    "InvalidCertificateOwnershipToken",
    "InvalidParameters",
    "InvalidRequest",
    "InvalidTemplate",
    "AccessDenied",
    "ResourceNotFound",
    "ConflictingResourceUpdate",
    "Throttling",
    "InternalError",
    "ServiceUnavailable",
];

#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Override {
    status: Option<u16>,
    code: Option<String>,
    message: Option<String>,
}

/// The overrides of `errors.json` (none without the file).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ErrorTable(BTreeMap<String, Override>);

impl ErrorTable {
    pub fn load(path: &Path) -> Result<ErrorTable, String> {
        match std::fs::read_to_string(path) {
            Ok(text) => ErrorTable::parse(&text).map_err(|e| format!("errors.json: {e}")),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(ErrorTable::default()),
            Err(e) => Err(format!("errors.json: {e}")),
        }
    }

    pub fn parse(text: &str) -> Result<ErrorTable, String> {
        let value: Value =
            serde_json::from_str(text).map_err(|e| format!("not JSON (line {})", e.line()))?;
        let map = value.as_object().ok_or("must be a JSON object")?;
        let mut table = BTreeMap::new();
        for (code, fields) in map {
            if !CODES.contains(&code.as_str()) {
                return Err(format!(
                    "{code:?} is not an errorCode the emulator sends ({})",
                    CODES.join(", ")
                ));
            }
            let fields = fields
                .as_object()
                .ok_or_else(|| format!("{code} must be an object"))?;
            let mut o = Override::default();
            for (k, v) in fields {
                match k.as_str() {
                    "statusCode" => {
                        o.status = Some(
                            v.as_u64()
                                .and_then(|n| u16::try_from(n).ok())
                                .filter(|n| (400..600).contains(n))
                                .ok_or_else(|| {
                                    format!("{code}.statusCode must be a number from 400 to 599")
                                })?,
                        )
                    }
                    "errorCode" => {
                        o.code = Some(
                            v.as_str()
                                .filter(|s| !s.is_empty())
                                .ok_or_else(|| format!("{code}.errorCode must be a string"))?
                                .to_owned(),
                        )
                    }
                    "errorMessage" => {
                        o.message = Some(
                            v.as_str()
                                .ok_or_else(|| format!("{code}.errorMessage must be a string"))?
                                .to_owned(),
                        )
                    }
                    other => {
                        return Err(format!(
                            "{code}: unknown field {other:?} (statusCode, errorCode, errorMessage)"
                        ))
                    }
                }
            }
            table.insert(code.clone(), o);
        }
        Ok(ErrorTable(table))
    }

    /// `reply` with the overrides for its errorCode applied.
    pub fn apply(&self, reply: Reply) -> Reply {
        let Reply::Rejected {
            status,
            code,
            message,
        } = reply
        else {
            return reply;
        };
        match self.0.get(&code) {
            None => Reply::Rejected {
                status,
                code,
                message,
            },
            Some(o) => Reply::Rejected {
                status: o.status.unwrap_or(status),
                code: o.code.clone().unwrap_or(code),
                message: o
                    .message
                    .as_ref()
                    .map(|m| m.replace("{message}", &message))
                    .unwrap_or(message),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_apply_to_their_code_only() {
        let t = ErrorTable::parse(
            r#"{"InvalidPayload": {"statusCode": 422, "errorCode": "BadInput", "errorMessage": "x: {message}"},
                "AccessDenied": {"errorMessage": "no"}}"#,
        )
        .unwrap();
        let r = |s, c: &str, m: &str| Reply::rejected(s, c, m);
        assert_eq!(
            t.apply(r(400, "InvalidPayload", "m")),
            r(422, "BadInput", "x: m")
        );
        assert_eq!(
            t.apply(r(403, "AccessDenied", "m")),
            r(403, "AccessDenied", "no")
        );
        assert_eq!(
            t.apply(r(404, "ResourceNotFound", "m")),
            r(404, "ResourceNotFound", "m")
        );
        for (text, want) in [
            (r#"{"Nope": {}}"#, "not an errorCode"),
            (r#"{"InvalidPayload": {"statusCode": 200}}"#, "400 to 599"),
            (r#"{"InvalidPayload": {"code": "x"}}"#, "unknown field"),
            ("[]", "JSON object"),
        ] {
            let err = ErrorTable::parse(text).unwrap_err();
            assert!(err.contains(want), "{text}: {err}");
        }
    }
}
