//! The engine fed scripted events.

use std::collections::{BTreeMap, HashSet};

use serde_json::{json, Value};

use super::*;

const STEP: u64 = 1_000;

fn settings(format: Format) -> Settings {
    Settings {
        format,
        step_timeout_ms: STEP,
        deadline_ms: None,
    }
}

/// A P-256 key and a self-signed certificate for it, plus a second unrelated certificate.
struct Material {
    key_pem: String,
    cert_pem: String,
    other_cert_pem: String,
}

fn material() -> Material {
    let make = || {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["device".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        (key.serialize_pem(), cert.pem())
    };
    let (key_pem, cert_pem) = make();
    let (_, other_cert_pem) = make();
    Material {
        key_pem,
        cert_pem,
        other_cert_pem,
    }
}

fn enc(format: Format, v: &Value) -> Vec<u8> {
    match format {
        Format::Json => serde_json::to_vec(v).unwrap(),
        Format::Cbor => {
            let mut out = Vec::new();
            ciborium::ser::into_writer(v, &mut out).unwrap();
            out
        }
    }
}

fn provision_op(m: &Material) -> Operation {
    Operation::Provision {
        source: CertificateSource::Csr {
            csr_pem: "-----BEGIN CERTIFICATE REQUEST-----".into(),
            key: Some(Secret::new(m.key_pem.clone())),
        },
        template: "Tpl".into(),
        parameters: BTreeMap::from([("SerialNumber".into(), "S1".into())]),
    }
}

fn progress(actions: &[Action]) -> Vec<Step> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Progress(s) => Some(*s),
            _ => None,
        })
        .collect()
}

fn done(actions: &[Action]) -> Option<&Result<Outcome, Error>> {
    actions.iter().find_map(|a| match a {
        Action::Done(r) => Some(r),
        _ => None,
    })
}

fn published(actions: &[Action]) -> Vec<(String, Vec<u8>)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Publish { topic, payload } => Some((topic.clone(), payload.to_vec())),
            _ => None,
        })
        .collect()
}

fn csr_accepted(format: Format, cert_pem: &str) -> Vec<u8> {
    enc(
        format,
        &json!({"certificateId": "abc123", "certificatePem": cert_pem, "certificateOwnershipToken": "token-1"}),
    )
}

/// A provision flow (JSON) fed CONNACK, a full SUBACK and a CreateCertificateFromCsr reply
/// carrying `cert_pem`: the engine and the actions that reply produced.
fn after_csr_reply(m: &Material, cert_pem: &str) -> (Engine, Vec<Action>) {
    let mut e = Engine::new(provision_op(m), settings(Format::Json), 0, &HashSet::new());
    e.handle(Event::Connected, 0);
    e.handle(Event::SubAck(&[1; 4]), 0);
    let actions = e.handle(
        Event::Message {
            topic: "$aws/certificates/create-from-csr/json/accepted",
            payload: &csr_accepted(Format::Json, cert_pem),
        },
        0,
    );
    (e, actions)
}

/// Runs a provision flow up to the RegisterThing request; returns the engine.
fn to_register(m: &Material, format: Format) -> Engine {
    let mut e = Engine::new(provision_op(m), settings(format), 0, &HashSet::new());
    let a = e.handle(Event::Connected, 10);
    match &a[..] {
        [Action::Progress(Step::Subscribing), Action::Subscribe(filters)] => {
            let f = format.as_str();
            assert_eq!(
                filters,
                &vec![
                    format!("$aws/certificates/create-from-csr/{f}/accepted"),
                    format!("$aws/certificates/create-from-csr/{f}/rejected"),
                    format!("$aws/provisioning-templates/Tpl/provision/{f}/accepted"),
                    format!("$aws/provisioning-templates/Tpl/provision/{f}/rejected"),
                ],
                "every reply topic in one SUBSCRIBE, before any publish"
            );
        }
        other => panic!("{other:?}"),
    }
    let a = e.handle(Event::SubAck(&[1; 4]), 20);
    assert_eq!(
        progress(&a),
        vec![Step::Subscribed, Step::CreatingCertificate]
    );
    let p = published(&a);
    assert_eq!(p.len(), 1);
    assert_eq!(
        p[0].0,
        format!("$aws/certificates/create-from-csr/{}", format.as_str())
    );
    let a = e.handle(
        Event::Message {
            topic: &format!(
                "$aws/certificates/create-from-csr/{}/accepted",
                format.as_str()
            ),
            payload: &csr_accepted(format, &m.cert_pem),
        },
        30,
    );
    assert_eq!(
        progress(&a),
        vec![Step::CertificateCreated, Step::Registering]
    );
    let p = published(&a);
    assert_eq!(
        p[0].0,
        format!(
            "$aws/provisioning-templates/Tpl/provision/{}",
            format.as_str()
        )
    );
    e
}

#[test]
fn provision_happy_path_both_formats() {
    let m = material();
    for format in [Format::Json, Format::Cbor] {
        let mut e = to_register(&m, format);
        let a = e.handle(
            Event::Message {
                topic: &format!(
                    "$aws/provisioning-templates/Tpl/provision/{}/accepted",
                    format.as_str()
                ),
                payload: &enc(
                    format,
                    &json!({"thingName": "t1", "deviceConfiguration": {"k": "v"}}),
                ),
            },
            40,
        );
        match done(&a) {
            Some(Ok(Outcome::Provisioned {
                certificate,
                registered,
            })) => {
                assert_eq!(certificate.certificate_id, "abc123");
                assert_eq!(registered.thing_name.as_deref(), Some("t1"));
                assert_eq!(registered.device_configuration["k"], "v");
            }
            other => panic!("{other:?}"),
        }
        assert!(e.is_finished());
        assert_eq!(e.wake_at(), None);
        // Nothing more after Done.
        assert!(e.handle(Event::Tick, 1_000_000).is_empty());
    }
}

#[test]
fn register_payload_carries_token_and_parameters() {
    let m = material();
    let (_, a) = after_csr_reply(&m, &m.cert_pem);
    let body: Value = serde_json::from_slice(&published(&a)[0].1).unwrap();
    assert_eq!(
        body,
        json!({"certificateOwnershipToken": "token-1", "parameters": {"SerialNumber": "S1"}})
    );
}

#[test]
fn suback_failures() {
    let m = material();
    // (SUBACK codes, expected failing topic index or None for count mismatch)
    let rows: Vec<(Vec<u8>, Option<usize>)> = vec![
        (vec![0x80, 1, 1, 1], Some(0)),
        (vec![1, 0, 1, 0x87], Some(3)),
        (vec![1, 2, 0x8F, 0x80], Some(2)),
        (vec![1, 1], None),
        (vec![1; 5], None),
    ];
    for (granted, failing) in rows {
        let mut e = Engine::new(provision_op(&m), settings(Format::Json), 0, &HashSet::new());
        e.handle(Event::Connected, 0);
        let filters = e.filters().to_vec();
        let a = e.handle(Event::SubAck(&granted), 5);
        match (done(&a), failing) {
            (Some(Err(Error::SubscribeFailed(refusal))), Some(i)) => {
                // The filter, then the code in words.
                let code = granted[i];
                assert!(
                    refusal.starts_with(&format!("{} (SUBACK code 0x{code:02X}, ", filters[i])),
                    "{refusal}"
                );
                if code == 0x87 {
                    assert!(
                        refusal.contains("policy does not allow iot:Subscribe"),
                        "{refusal}"
                    );
                }
            }
            (Some(Err(Error::SubscribeFailed(_))), None) => {}
            other => panic!("{granted:?}: {other:?}"),
        }
        assert!(
            published(&a).is_empty(),
            "nothing published after a failed SUBACK"
        );
    }
}

#[test]
fn timeouts_per_step_and_overall() {
    let m = material();
    // No CONNACK: times out while connecting.
    let mut e = Engine::new(
        provision_op(&m),
        settings(Format::Json),
        100,
        &HashSet::new(),
    );
    assert_eq!(e.wake_at(), Some(100 + STEP));
    assert!(e.handle(Event::Tick, 100 + STEP - 1).is_empty());
    assert!(matches!(
        done(&e.handle(Event::Tick, 100 + STEP)),
        Some(Err(Error::Timeout(Step::Connecting)))
    ));
    // No SUBACK.
    let mut e = Engine::new(provision_op(&m), settings(Format::Json), 0, &HashSet::new());
    e.handle(Event::Connected, 500);
    assert_eq!(
        e.wake_at(),
        Some(500 + STEP),
        "each step gets its own timeout"
    );
    assert!(matches!(
        done(&e.handle(Event::Tick, 500 + STEP)),
        Some(Err(Error::Timeout(Step::Subscribing)))
    ));
    // No RegisterThing reply.
    let mut e = to_register(&m, Format::Json);
    assert!(matches!(
        done(&e.handle(Event::Tick, 30 + STEP)),
        Some(Err(Error::Timeout(Step::Registering)))
    ));
    // Overall deadline before the step timeout.
    let mut s = settings(Format::Json);
    s.deadline_ms = Some(300);
    let mut e = Engine::new(provision_op(&m), s, 0, &HashSet::new());
    e.handle(Event::Connected, 100);
    assert_eq!(e.wake_at(), Some(300));
    assert!(matches!(
        done(&e.handle(Event::Tick, 300)),
        Some(Err(Error::Deadline(Step::Subscribing)))
    ));
    // A reply arriving after the deadline does not count.
    let mut s = settings(Format::Json);
    s.deadline_ms = Some(35);
    let mut e = Engine::new(provision_op(&m), s, 0, &HashSet::new());
    e.handle(Event::Connected, 0);
    e.handle(Event::SubAck(&[1; 4]), 0);
    let a = e.handle(
        Event::Message {
            topic: "$aws/certificates/create-from-csr/json/accepted",
            payload: &csr_accepted(Format::Json, &m.cert_pem),
        },
        40,
    );
    assert!(matches!(
        done(&a),
        Some(Err(Error::Deadline(Step::CreatingCertificate)))
    ));
}

#[test]
fn unrelated_duplicate_and_wrong_format_messages_are_ignored() {
    let m = material();
    let mut e = to_register(&m, Format::Json);
    let noise: Vec<(&str, Vec<u8>)> = vec![
        // A duplicate of the certificate reply, now stale.
        (
            "$aws/certificates/create-from-csr/json/accepted",
            csr_accepted(Format::Json, &m.cert_pem),
        ),
        // Unrelated topics.
        ("devices/x/cmd", b"garbage".to_vec()),
        (
            "$aws/provisioning-templates/Other/provision/json/accepted",
            b"{}".to_vec(),
        ),
        // The same API in the other format.
        (
            "$aws/provisioning-templates/Tpl/provision/cbor/rejected",
            b"\xff".to_vec(),
        ),
        (
            "$aws/provisioning-templates/Tpl/provision/json/accepted/extra",
            b"{}".to_vec(),
        ),
    ];
    for (topic, payload) in &noise {
        let a = e.handle(Event::Message { topic, payload }, 50);
        assert!(a.is_empty(), "{topic}: {a:?}");
    }
    // Stray protocol events are ignored too.
    assert!(e.handle(Event::Connected, 51).is_empty());
    assert!(e.handle(Event::SubAck(&[0x80]), 52).is_empty());
    let a = e.handle(
        Event::Message {
            topic: "$aws/provisioning-templates/Tpl/provision/json/accepted",
            payload: br#"{"thingName": "t", "deviceConfiguration": {}}"#,
        },
        60,
    );
    assert!(matches!(done(&a), Some(Ok(Outcome::Provisioned { .. }))));
    // A duplicate after Done: nothing.
    let a = e.handle(
        Event::Message {
            topic: "$aws/provisioning-templates/Tpl/provision/json/accepted",
            payload: br#"{"thingName": "t"}"#,
        },
        70,
    );
    assert!(a.is_empty());
}

#[test]
fn rejections_and_malformed_replies() {
    let m = material();
    for format in [Format::Json, Format::Cbor] {
        let f = format.as_str();
        let mut e = to_register(&m, format);
        let a = e.handle(
            Event::Message {
                topic: &format!("$aws/provisioning-templates/Tpl/provision/{f}/rejected"),
                payload: &enc(format, &json!({"statusCode": 404, "errorCode": "ResourceNotFound", "errorMessage": "no such template"})),
            },
            40,
        );
        match done(&a) {
            Some(Err(Error::Rejected { api, error })) => {
                assert_eq!(*api, "RegisterThing");
                assert_eq!(
                    (
                        error.status_code,
                        error.error_code.as_str(),
                        error.error_message.as_str()
                    ),
                    (404, "ResourceNotFound", "no such template")
                );
                assert!(!error.is_retryable());
            }
            other => panic!("{other:?}"),
        }
        let mut e = to_register(&m, format);
        let a = e.handle(
            Event::Message {
                topic: &format!("$aws/provisioning-templates/Tpl/provision/{f}/accepted"),
                payload: b"\x00not a reply",
            },
            40,
        );
        assert!(matches!(done(&a), Some(Err(Error::MalformedReply(_)))));
    }
}

#[test]
fn certificate_for_another_key_is_refused() {
    let m = material();
    let (_, a) = after_csr_reply(&m, &m.other_cert_pem);
    assert!(matches!(done(&a), Some(Err(Error::CertificateMismatch))));
    assert!(
        published(&a).is_empty(),
        "no RegisterThing for a wrong certificate"
    );
}

#[test]
fn a_certificate_that_cannot_be_read_is_a_malformed_reply() {
    let m = material();
    let garbage = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
    let (_, a) = after_csr_reply(&m, garbage);
    match done(&a) {
        Some(Err(Error::MalformedReply(e))) => {
            assert_eq!(e.what, "CreateCertificateFromCsr accepted");
        }
        other => panic!("{other:?}"),
    }
    assert!(published(&a).is_empty(), "no RegisterThing for it");
}

#[test]
fn create_keys_checks_the_returned_key_and_disconnect_fails() {
    let m = material();
    let op = Operation::CreateCertificate(CertificateSource::CreateKeys);
    for (cert, ok) in [(&m.cert_pem, true), (&m.other_cert_pem, false)] {
        let mut e = Engine::new(op.clone(), settings(Format::Cbor), 0, &HashSet::new());
        e.handle(Event::Connected, 0);
        let a = e.handle(Event::SubAck(&[1, 1]), 0);
        assert_eq!(published(&a)[0].1, vec![0xa0], "empty CBOR map");
        let a = e.handle(
            Event::Message {
                topic: "$aws/certificates/create/cbor/accepted",
                payload: &enc(
                    Format::Cbor,
                    &json!({"certificateId": "ab", "certificatePem": cert, "privateKey": m.key_pem, "certificateOwnershipToken": "t"}),
                ),
            },
            0,
        );
        match done(&a) {
            Some(Ok(Outcome::Certificate(c))) if ok => {
                assert_eq!(
                    c.private_key.as_ref().map(|k| k.expose()),
                    Some(m.key_pem.as_str())
                )
            }
            Some(Err(Error::CertificateMismatch)) if !ok => {}
            other => panic!("{other:?}"),
        }
    }
    let mut e = Engine::new(op, settings(Format::Json), 0, &HashSet::new());
    e.handle(Event::Connected, 0);
    assert!(matches!(
        done(&e.handle(Event::Disconnected, 1)),
        Some(Err(Error::Connection(_)))
    ));
}

#[test]
fn already_subscribed_filters_are_not_subscribed_again() {
    let held: HashSet<String> = [
        "$aws/provisioning-templates/T/provision/json/accepted".to_string(),
        "$aws/provisioning-templates/T/provision/json/rejected".to_string(),
    ]
    .into();
    let op = Operation::RegisterThing {
        template: "T".into(),
        token: Secret::new("tok".into()),
        parameters: BTreeMap::new(),
    };
    let mut e = Engine::new(op, settings(Format::Json), 0, &held);
    assert!(e.filters().is_empty());
    let a = e.handle(Event::Connected, 0);
    assert!(!a.iter().any(|x| matches!(x, Action::Subscribe(_))));
    assert_eq!(
        published(&a)[0].0,
        "$aws/provisioning-templates/T/provision/json"
    );
}

#[test]
fn debug_output_never_shows_the_token() {
    let m = material();
    let e = to_register(&m, Format::Json);
    let m2 = material();
    let (e2, actions) = after_csr_reply(&m2, &m2.cert_pem);
    assert!(!published(&actions).is_empty());
    let text = format!("{e:?} {e2:?} {actions:?}");
    assert!(!text.contains("token-1"), "{text}");
    assert!(!text.contains("PRIVATE KEY"));
}
