//! Topic names, filters and the fleet provisioning API topics, with AWS IoT's limits.

/// Largest payload AWS IoT accepts in one PUBLISH.
pub const MAX_PAYLOAD: usize = 128 * 1024;
/// Largest whole packet read from a client: the payload limit plus room for a topic and properties.
pub const MAX_PACKET: usize = MAX_PAYLOAD + 2048;
/// Topic names and filters are at most this many bytes.
pub const MAX_TOPIC_BYTES: usize = 256;
/// Topic names and filters have at most this many forward slashes.
pub const MAX_TOPIC_SLASHES: usize = 7;
/// At most this many filters in one SUBSCRIBE.
pub const MAX_FILTERS_PER_SUBSCRIBE: usize = 8;
/// Subscriptions one connection may hold (AWS IoT quota).
pub const MAX_SUBSCRIPTIONS: usize = 50;
/// Client ids are at most this many bytes.
pub const MAX_CLIENT_ID: usize = 128;
/// Longest keep-alive AWS IoT allows, in seconds; longer (or 0) is lowered to it.
pub const MAX_KEEP_ALIVE: u16 = 1200;

fn within_limits(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_TOPIC_BYTES
        && s.bytes().filter(|&b| b == b'/').count() <= MAX_TOPIC_SLASHES
        && !s.contains('\0')
}

/// A topic a client may publish to: no wildcards, within AWS's length and depth limits.
pub fn valid_topic(topic: &str) -> bool {
    within_limits(topic) && !topic.contains(['+', '#'])
}

/// A subscription filter: `+` fills a whole level, `#` only as the whole last level.
pub fn valid_filter(filter: &str) -> bool {
    if !within_limits(filter) {
        return false;
    }
    let levels: Vec<&str> = filter.split('/').collect();
    let last = levels.len() - 1;
    levels.iter().enumerate().all(|(i, level)| match *level {
        "#" => i == last,
        "+" => true,
        l => !l.contains(['+', '#']),
    })
}

/// Whether `topic` matches `filter`. Wildcards at the first level never match topics starting
/// with `$` (MQTT 3.1.1 section 4.7.2). Unlike the MQTT specification, `#` does not match its
/// parent level: AWS IoT delivers `sensor`, `sensor/` and `sensor/a` to `sensor/#` subscribers
/// except `sensor` ("the parent topic is not matched", AWS IoT's MQTT page, differences from
/// the specification; awsdocs/aws-iot-docs#59).
pub fn matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), t) => return t.is_some(),
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Payload format of a fleet provisioning request, the last level of its topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    Json,
    Cbor,
}

impl Format {
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Json => "json",
            Format::Cbor => "cbor",
        }
    }

    fn parse(s: &str) -> Option<Format> {
        match s {
            "json" => Some(Format::Json),
            "cbor" => Some(Format::Cbor),
            _ => None,
        }
    }
}

/// The three fleet provisioning APIs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Api {
    CreateKeysAndCertificate,
    CreateCertificateFromCsr,
    RegisterThing { template: String },
}

impl Api {
    /// Short name used by fault rules and logs.
    pub fn short(&self) -> &'static str {
        match self {
            Api::CreateKeysAndCertificate => "keys",
            Api::CreateCertificateFromCsr => "csr",
            Api::RegisterThing { .. } => "register",
        }
    }
}

/// A request topic of the fleet provisioning API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub api: Api,
    pub format: Format,
}

impl Request {
    /// Parses a request topic (`$aws/certificates/create/json`, ...). `None` for any other topic.
    pub fn parse(topic: &str) -> Option<Request> {
        let levels: Vec<&str> = topic.split('/').collect();
        let (api, fmt) = match levels.as_slice() {
            ["$aws", "certificates", "create", fmt] => (Api::CreateKeysAndCertificate, fmt),
            ["$aws", "certificates", "create-from-csr", fmt] => {
                (Api::CreateCertificateFromCsr, fmt)
            }
            ["$aws", "provisioning-templates", name, "provision", fmt] => (
                Api::RegisterThing {
                    template: (*name).to_owned(),
                },
                fmt,
            ),
            _ => return None,
        };
        Some(Request {
            api,
            format: Format::parse(fmt)?,
        })
    }

    /// The reply topic: the request topic with `/accepted` or `/rejected` appended.
    pub fn reply_topic(request_topic: &str, accepted: bool) -> String {
        let suffix = if accepted { "accepted" } else { "rejected" };
        format!("{request_topic}/{suffix}")
    }

    /// The API whose reply topics `filter` subscribes to, if any (used to aim fault rules).
    pub fn api_of_reply_filter(filter: &str) -> Option<Api> {
        let base = filter
            .strip_suffix("/accepted")
            .or_else(|| filter.strip_suffix("/rejected"))
            .or_else(|| filter.strip_suffix("/+"))
            .or_else(|| filter.strip_suffix("/#"))?;
        Request::parse(base).map(|r| r.api)
    }
}

/// Template names: 1-36 of `[0-9A-Za-z_-]`.
pub fn valid_template_name(name: &str) -> bool {
    (1..=36).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_matching() {
        let rows: &[(&str, &str, bool)] = &[
            ("a/b", "a/b", true),
            ("a/+", "a/b", true),
            ("a/+", "a/b/c", false),
            ("a/#", "a", false),
            ("a/#", "a/", true),
            ("a/b/#", "a/b", false),
            ("a/b/#", "a", false),
            ("a/#", "a/b/c", true),
            ("#", "a/b", true),
            ("#", "$aws/x", false),
            ("+/x", "$aws/x", false),
            (
                "$aws/certificates/create/json/+",
                "$aws/certificates/create/json/accepted",
                true,
            ),
            ("a/b", "a/c", false),
            ("a/b/c", "a/b", false),
            ("+", "", true),
        ];
        for (filter, topic, want) in rows {
            assert_eq!(matches(filter, topic), *want, "{filter} vs {topic}");
        }
    }

    #[test]
    fn filter_and_topic_validity() {
        let long = "a".repeat(257);
        let deep = "a/b/c/d/e/f/g/h/i";
        let rows: &[(&str, bool, bool)] = &[
            // (text, valid topic, valid filter)
            ("a/b", true, true),
            ("a/+/c", false, true),
            ("a/#", false, true),
            ("a/#/c", false, false),
            ("a+/b", false, false),
            ("", false, false),
            (&long, false, false),
            (deep, false, false),
            ("a/b/c/d/e/f/g/h", true, true),
            ("a\0b", false, false),
        ];
        for (text, topic, filter) in rows {
            assert_eq!(valid_topic(text), *topic, "topic {text:?}");
            assert_eq!(valid_filter(text), *filter, "filter {text:?}");
        }
    }

    #[test]
    fn request_topics() {
        let rows: &[(&str, Option<(&str, Format)>)] = &[
            (
                "$aws/certificates/create/json",
                Some(("keys", Format::Json)),
            ),
            (
                "$aws/certificates/create/cbor",
                Some(("keys", Format::Cbor)),
            ),
            (
                "$aws/certificates/create-from-csr/json",
                Some(("csr", Format::Json)),
            ),
            (
                "$aws/provisioning-templates/T1/provision/cbor",
                Some(("register", Format::Cbor)),
            ),
            ("$aws/certificates/create/xml", None),
            ("$aws/certificates/create/json/accepted", None),
            ("$aws/provisioning-templates/T1/provision", None),
            ("devices/x", None),
        ];
        for (topic, want) in rows {
            let got = Request::parse(topic).map(|r| (r.api.short(), r.format));
            assert_eq!(got, *want, "{topic}");
        }
        assert_eq!(
            Request::api_of_reply_filter("$aws/provisioning-templates/T/provision/json/accepted"),
            Some(Api::RegisterThing {
                template: "T".into()
            })
        );
        assert_eq!(Request::api_of_reply_filter("devices/+"), None);
    }

    #[test]
    fn template_names() {
        assert!(valid_template_name("DemoTemplate"));
        assert!(valid_template_name("a-b_c9"));
        assert!(valid_template_name(&"x".repeat(36)));
        assert!(!valid_template_name(&"x".repeat(37)));
        assert!(!valid_template_name(""));
        assert!(!valid_template_name("a.b"));
        assert!(!valid_template_name("a b"));
    }
}
