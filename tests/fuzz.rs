//! Property tests (stable-Rust fuzzing) of what comes from the network or the caller: reply
//! decoding, topic classification, template names, PEM handling, the resume journal's parser, and
//! the engine and the whole flow fed arbitrary event sequences. Nothing may panic; what is valid
//! must stay valid.
//!
//! The test command runs a bounded number of cases; a longer run:
//! `PROPTEST_CASES=100000 cargo test --release --test fuzz`.

use std::collections::{BTreeMap, HashSet};

use fleetprov::engine::flow::{Flow, FlowAction, FlowEvent, FlowSpec, Journaled};
use fleetprov::engine::retry::RetryPolicy;
use fleetprov::engine::{Action, CertificateSource, Engine, Event, Operation, Settings};
use fleetprov::error::Error;
use fleetprov::keys;
use fleetprov::protocol::{self, validate_template_name, Api, Format};
use fleetprov::secret::Secret;
use fleetprov::store::journal;
use proptest::prelude::*;
use serde_json::{json, Value};

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(512)
}

fn format() -> impl Strategy<Value = Format> {
    prop_oneof![Just(Format::Json), Just(Format::Cbor)]
}

fn api() -> impl Strategy<Value = Api> {
    prop_oneof![
        Just(Api::CreateKeysAndCertificate),
        Just(Api::CreateCertificateFromCsr),
        "[A-Za-z0-9_-]{1,36}".prop_map(|t| Api::RegisterThing { template: t }),
    ]
}

/// Arbitrary JSON values, nested a few levels.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| json!(f)),
        ".{0,40}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(
                prop_oneof![
                    Just("certificateId".to_string()),
                    Just("certificatePem".to_string()),
                    Just("privateKey".to_string()),
                    Just("certificateOwnershipToken".to_string()),
                    Just("thingName".to_string()),
                    Just("deviceConfiguration".to_string()),
                    Just("statusCode".to_string()),
                    Just("errorCode".to_string()),
                    ".{0,12}",
                ],
                inner,
                0..6
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn encode(format: Format, v: &Value) -> Vec<u8> {
    match format {
        Format::Json => serde_json::to_vec(v).unwrap(),
        Format::Cbor => {
            let mut out = Vec::new();
            ciborium::ser::into_writer(v, &mut out).unwrap();
            out
        }
    }
}

fn decode_all(api: &Api, format: Format, bytes: &[u8]) {
    let _ = protocol::decode_rejection(api, format, bytes);
    match api {
        Api::RegisterThing { .. } => {
            let _ = protocol::decode_register_reply(format, bytes);
        }
        _ => {
            let _ = protocol::decode_certificate_reply(api, format, bytes);
        }
    }
}

const PEM: &str = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn reply_decoders_never_panic_on_bytes(api in api(), format in format(), bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        decode_all(&api, format, &bytes);
    }

    #[test]
    fn reply_decoders_never_panic_on_values(api in api(), format in format(), value in json_value()) {
        decode_all(&api, format, &encode(format, &value));
    }

    #[test]
    fn valid_replies_decode_whatever_extra_fields_they_carry(
        format in format(),
        extra in prop::collection::btree_map("x[a-z]{0,8}", json_value(), 0..4),
        id in "[0-9a-f]{64}",
        token in "[A-Za-z0-9+/=]{1,200}",
        status in 400u16..600,
    ) {
        let mut cert = json!({"certificateId": id, "certificatePem": PEM, "certificateOwnershipToken": token});
        let mut rejection = json!({"statusCode": status, "errorCode": "E", "errorMessage": "m"});
        for (k, v) in &extra {
            cert[k] = v.clone();
            rejection[k] = v.clone();
        }
        let c = protocol::decode_certificate_reply(&Api::CreateCertificateFromCsr, format, &encode(format, &cert)).unwrap();
        prop_assert_eq!(c.certificate_id, id);
        prop_assert_eq!(c.ownership_token.expose(), token.as_str());
        let e = protocol::decode_rejection(&Api::CreateKeysAndCertificate, format, &encode(format, &rejection)).unwrap();
        prop_assert_eq!(e.status_code, status);
        prop_assert_eq!(e.is_retryable(), status == 429 || status >= 500);
    }

    #[test]
    fn decode_errors_never_show_the_secrets(format in format(), token in "[A-Za-z]{16,40}") {
        // A reply whose secret fields have the wrong neighbours: the error must not quote them.
        let bad = json!({"certificateId": 5, "certificatePem": PEM, "privateKey": token, "certificateOwnershipToken": token});
        let e = protocol::decode_certificate_reply(&Api::CreateKeysAndCertificate, format, &encode(format, &bad)).unwrap_err();
        prop_assert!(!e.to_string().contains(&token));
    }

    #[test]
    fn reply_topics_classify_exactly(api in api(), format in format(), suffix in ".{0,20}") {
        prop_assert_eq!(api.classify_reply(format, &api.accepted_topic(format)), Some(true));
        prop_assert_eq!(api.classify_reply(format, &api.rejected_topic(format)), Some(false));
        let other = format!("{}{suffix}", api.request_topic(format));
        let want = match suffix.as_str() {
            "/accepted" => Some(true),
            "/rejected" => Some(false),
            _ => None,
        };
        prop_assert_eq!(api.classify_reply(format, &other), want);
    }

    #[test]
    fn template_names_follow_the_rule(name in ".{0,40}") {
        let rule = (1..=36).contains(&name.len())
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        prop_assert_eq!(validate_template_name(&name).is_ok(), rule);
    }

    #[test]
    fn pem_checks_never_panic(text in ".{0,300}", label in prop_oneof![
        Just("CERTIFICATE"), Just("PRIVATE KEY"), Just("RSA PRIVATE KEY"), Just("EC PRIVATE KEY"),
        Just("CERTIFICATE REQUEST"), Just("NEW CERTIFICATE REQUEST"),
    ], body in "[A-Za-z0-9+/=\n]{0,400}") {
        let wrapped = format!("-----BEGIN {label}-----\n{body}\n-----END {label}-----\n");
        for input in [text.as_str(), wrapped.as_str()] {
            let _ = keys::parse_certificate_pem(input);
            let _ = keys::parse_private_key_pem(input);
            let _ = keys::check_csr_pem(input);
            let _ = keys::certificate_id(input);
            let _ = keys::certificate_matches_key(input, input);
            let _ = keys::DeviceKey::from_pem(input);
        }
    }

    #[test]
    fn engine_survives_any_event_sequence(
        format in format(),
        events in prop::collection::vec((0u8..6, 0u64..5_000, prop::collection::vec(any::<u8>(), 0..6), json_value(), 0usize..8), 0..40),
    ) {
        let topics = [
            "$aws/certificates/create/json/accepted",
            "$aws/certificates/create/cbor/rejected",
            "$aws/certificates/create-from-csr/json/accepted",
            "$aws/certificates/create-from-csr/cbor/accepted",
            "$aws/provisioning-templates/T/provision/json/accepted",
            "$aws/provisioning-templates/T/provision/cbor/rejected",
            "devices/x",
            "",
        ];
        let settings = Settings { format, step_timeout_ms: 1_000, deadline_ms: Some(20_000) };
        for op in [
            Operation::Provision {
                source: CertificateSource::CreateKeys,
                template: "T".into(),
                parameters: BTreeMap::new(),
            },
            Operation::CreateCertificate(CertificateSource::Csr { csr_pem: "csr".into(), key: None }),
            Operation::RegisterThing { template: "T".into(), token: Secret::new("t".into()), parameters: BTreeMap::new() },
        ] {
            let mut engine = Engine::new(op, settings, 0, &HashSet::new());
            let mut now = 0u64;
            let mut done = 0;
            for (kind, dt, granted, value, topic) in &events {
                now += dt;
                let payload = encode(format, value);
                let event = match kind {
                    0 => Event::Connected,
                    1 => Event::SubAck(granted),
                    2 | 3 => Event::Message { topic: topics[*topic], payload: &payload },
                    4 => Event::Disconnected,
                    _ => Event::Tick,
                };
                for action in engine.handle(event, now) {
                    if matches!(action, Action::Done(_)) {
                        done += 1;
                    }
                }
            }
            prop_assert!(done <= 1, "Done at most once");
            prop_assert_eq!(done == 1, engine.is_finished());
        }
    }

    #[test]
    fn journal_parser_never_panics_and_never_shows_content(
        bytes in prop::collection::vec(any::<u8>(), 0..400),
        value in json_value(),
    ) {
        let _ = journal::parse(&bytes);
        let text = serde_json::to_vec(&value).unwrap();
        if let Err(reason) = journal::parse(&text) {
            // Reasons name what is wrong, never quote the file.
            if let Value::String(s) = &value {
                prop_assume!(s.len() > 3);
                prop_assert!(!reason.contains(s.as_str()), "{reason}");
            }
        }
    }

    #[test]
    fn journal_fields_of_any_type_are_rejected_not_trusted(
        field in prop_oneof![Just("version"), Just("host"), Just("certificate_id"), Just("certificate_pem"),
            Just("private_key_pem"), Just("ownership_token"), Just("created_unix"), Just("token_expires_unix"), Just("registered")],
        value in json_value(),
    ) {
        let mut good = json!({
            "version": 1, "host": "h", "certificate_id": "ab",
            "certificate_pem": "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
            "private_key_pem": null, "ownership_token": "t", "created_unix": 1,
            "token_expires_unix": 2, "registered": null,
        });
        prop_assert!(journal::parse(&serde_json::to_vec(&good).unwrap()).is_ok());
        good[field] = value;
        // Whatever it parses to, it must not panic; a parsed journal has a certificate and a token.
        if let Ok(entry) = journal::parse(&serde_json::to_vec(&good).unwrap()) {
            prop_assert!(!entry.certificate.ownership_token.is_empty());
            prop_assert!(entry.certificate.certificate_pem.contains("BEGIN CERTIFICATE"));
        }
    }

    #[test]
    fn flow_survives_any_event_sequence_and_finishes_once(
        format in format(),
        events in prop::collection::vec((0u8..9, 0u64..3_000, prop::collection::vec(any::<u8>(), 0..6), json_value(), 0usize..6), 0..60),
    ) {
        let topics = [
            "$aws/certificates/create/json/accepted",
            "$aws/certificates/create/cbor/accepted",
            "$aws/certificates/create/json/rejected",
            "$aws/provisioning-templates/T/provision/json/accepted",
            "$aws/provisioning-templates/T/provision/cbor/rejected",
            "devices/x",
        ];
        let spec = FlowSpec {
            host: "h".into(),
            source: CertificateSource::CreateKeys,
            device_key: None,
            template: "T".into(),
            parameters: BTreeMap::new(),
            settings: Settings { format, step_timeout_ms: 1_000, deadline_ms: Some(60_000) },
            retry: RetryPolicy { max_attempts: 4, ..RetryPolicy::default() },
            verify: true,
            external_key_connects: false,
            external_public_key: None,
            token_lifetime_s: 3600,
            store_credentials: true,
            journal: Journaled::Loaded(None),
            seed: 7,
            claim_client_id: Some("fuzz".into()),
            recent_connects: Vec::new(),
            existing: None,
        };
        let mut flow = Flow::new(spec);
        let mut done = 0;
        let mut count = |actions: Vec<FlowAction>| {
            for a in actions {
                if matches!(a, FlowAction::Done(_)) {
                    done += 1;
                }
            }
        };
        count(flow.start(0));
        let mut now = 0u64;
        for (kind, dt, granted, value, topic) in &events {
            now += dt;
            let payload = encode(format, value);
            let event = match kind {
                0 => FlowEvent::Connected,
                1 => FlowEvent::ConnectFailed(Error::Connection("x".into())),
                2 => FlowEvent::SubAck(granted),
                3 | 4 => FlowEvent::Message { topic: topics[*topic], payload: &payload },
                5 => FlowEvent::Disconnected(Error::Connection("y".into())),
                6 => FlowEvent::Stored(Ok(None)),
                7 => FlowEvent::Stored(Err(Error::Storage("z".into()))),
                _ => FlowEvent::Tick,
            };
            count(flow.handle(event, now));
        }
        // Whatever happened, ticking to each wake time (and completing a storage action the
        // flow waits for) ends it within the deadline.
        for _ in 0..100 {
            if flow.is_finished() {
                break;
            }
            match flow.wake_at() {
                Some(w) => {
                    now = now.max(w);
                    count(flow.handle(FlowEvent::Tick, now));
                }
                None => count(flow.handle(FlowEvent::Stored(Ok(None)), now)),
            }
        }
        prop_assert!(flow.is_finished(), "finished after ticking past the deadline");
        prop_assert_eq!(done, 1, "Done exactly once");
    }
}
