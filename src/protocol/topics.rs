//! Topic names of the fleet provisioning API.

use std::fmt;

/// Payload format of a request and its replies: the last level of every topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Format {
    #[default]
    Json,
    Cbor,
}

impl Format {
    /// `json` or `cbor`.
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Json => "json",
            Format::Cbor => "cbor",
        }
    }

    /// Whether this build of the library encodes and decodes the format: CBOR needs the cargo
    /// feature `cbor` (on by default).
    pub fn available(self) -> bool {
        match self {
            Format::Json => true,
            Format::Cbor => cfg!(feature = "cbor"),
        }
    }

    /// `Ok` when [`Format::available`], else why not, for an `InvalidArgument` error.
    pub fn check_available(self) -> Result<(), String> {
        if self.available() {
            Ok(())
        } else {
            Err(format!(
                "{self} payloads are not in this build of the library (built without the cargo \
                 feature `{self}`)"
            ))
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One API call: which request topic it publishes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Api {
    CreateKeysAndCertificate,
    CreateCertificateFromCsr,
    RegisterThing { template: String },
}

impl Api {
    /// The request topic, e.g. `$aws/certificates/create/json`.
    pub fn request_topic(&self, format: Format) -> String {
        match self {
            Api::CreateKeysAndCertificate => format!("$aws/certificates/create/{format}"),
            Api::CreateCertificateFromCsr => format!("$aws/certificates/create-from-csr/{format}"),
            Api::RegisterThing { template } => {
                format!("$aws/provisioning-templates/{template}/provision/{format}")
            }
        }
    }

    /// `request/accepted`.
    pub fn accepted_topic(&self, format: Format) -> String {
        format!("{}/accepted", self.request_topic(format))
    }

    /// `request/rejected`.
    pub fn rejected_topic(&self, format: Format) -> String {
        format!("{}/rejected", self.request_topic(format))
    }

    /// Whether `topic` is this API's accepted reply (`Some(true)`), rejected reply
    /// (`Some(false)`) or neither (`None`).
    pub fn classify_reply(&self, format: Format, topic: &str) -> Option<bool> {
        let request = self.request_topic(format);
        match topic.strip_prefix(request.as_str())? {
            "/accepted" => Some(true),
            "/rejected" => Some(false),
            _ => None,
        }
    }

    /// Name used in progress reports and errors.
    pub fn name(&self) -> &'static str {
        match self {
            Api::CreateKeysAndCertificate => "CreateKeysAndCertificate",
            Api::CreateCertificateFromCsr => "CreateCertificateFromCsr",
            Api::RegisterThing { .. } => "RegisterThing",
        }
    }
}

/// Why a template name was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidTemplateName(pub String);

impl fmt::Display for InvalidTemplateName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Template names are 1-36 characters of `[0-9A-Za-z_-]`; checked before anything is sent.
pub fn validate_template_name(name: &str) -> Result<(), InvalidTemplateName> {
    if name.is_empty() || name.len() > 36 {
        return Err(InvalidTemplateName(format!(
            "template name must be 1-36 characters, got {}",
            name.len()
        )));
    }
    match name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '_' || *c == '-'))
    {
        Some(c) => Err(InvalidTemplateName(format!(
            "template name may only contain 0-9, A-Z, a-z, '_' and '-', found {c:?}"
        ))),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_of_every_api_and_format() {
        let reg = Api::RegisterThing {
            template: "Tpl_1".into(),
        };
        let rows = [
            (
                Api::CreateKeysAndCertificate,
                Format::Json,
                "$aws/certificates/create/json",
            ),
            (
                Api::CreateKeysAndCertificate,
                Format::Cbor,
                "$aws/certificates/create/cbor",
            ),
            (
                Api::CreateCertificateFromCsr,
                Format::Json,
                "$aws/certificates/create-from-csr/json",
            ),
            (
                Api::CreateCertificateFromCsr,
                Format::Cbor,
                "$aws/certificates/create-from-csr/cbor",
            ),
            (
                reg.clone(),
                Format::Json,
                "$aws/provisioning-templates/Tpl_1/provision/json",
            ),
            (
                reg,
                Format::Cbor,
                "$aws/provisioning-templates/Tpl_1/provision/cbor",
            ),
        ];
        for (api, fmt, topic) in rows {
            assert_eq!(api.request_topic(fmt), topic);
            assert_eq!(api.accepted_topic(fmt), format!("{topic}/accepted"));
            assert_eq!(api.rejected_topic(fmt), format!("{topic}/rejected"));
            assert_eq!(
                api.classify_reply(fmt, &format!("{topic}/accepted")),
                Some(true)
            );
            assert_eq!(
                api.classify_reply(fmt, &format!("{topic}/rejected")),
                Some(false)
            );
            assert_eq!(api.classify_reply(fmt, topic), None);
            assert_eq!(
                api.classify_reply(fmt, &format!("{topic}/accepted/x")),
                None
            );
            assert_eq!(api.classify_reply(fmt, &format!("{topic}x/accepted")), None);
        }
        // The other format's reply is not this request's.
        assert_eq!(
            Api::CreateKeysAndCertificate
                .classify_reply(Format::Json, "$aws/certificates/create/cbor/accepted"),
            None
        );
    }

    #[test]
    fn template_names() {
        let long = "a".repeat(36);
        let too_long = "a".repeat(37);
        let rows: &[(&str, bool)] = &[
            ("DemoTemplate", true),
            ("a", true),
            ("A-b_9", true),
            (&long, true),
            (&too_long, false),
            ("", false),
            ("a b", false),
            ("a/b", false),
            ("a+", false),
            ("#", false),
            ("é", false),
            ("a.b", false),
            ("a\0", false),
        ];
        for (name, ok) in rows {
            assert_eq!(validate_template_name(name).is_ok(), *ok, "{name:?}");
        }
    }
}
