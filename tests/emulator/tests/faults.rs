//! Fault injection: every action (delay, reject, drop, duplicate, close at each step, mangle),
//! API filters, counts that are consumed, `clear`, and the line-based control interface.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use fleetprov_emulator::wire::{Packet, Version};
use fleetprov_emulator::Format;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

mod common;
use common::*;

const JSON: Format = Format::Json;
const CBOR: Format = Format::Cbor;

/// Adds a fault rule through the Rust API.
fn add_rule(env: &Env, rule: &str) {
    env.emu
        .faults()
        .add(rule.parse().unwrap_or_else(|e| panic!("{rule}: {e}")));
}

/// The rules in force, as their strings.
fn rules(env: &Env) -> Vec<String> {
    env.emu
        .faults()
        .list()
        .iter()
        .map(ToString::to_string)
        .collect()
}

/// The ids of every certificate in the registry.
fn cert_ids(env: &Env) -> BTreeSet<String> {
    env.emu.registry().unwrap()["certificates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap().to_owned())
        .collect()
}

fn thing_count(env: &Env) -> usize {
    env.emu.registry().unwrap()["things"]
        .as_array()
        .unwrap()
        .len()
}

/// Polls `cond` until it holds; panics after `WAIT`.
async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Subscribes to the accepted/rejected topics of `topic`.
async fn subscribe_replies(c: &mut Client, topic: &str) {
    let codes = c
        .subscribe(&[
            (&format!("{topic}/accepted"), 1),
            (&format!("{topic}/rejected"), 1),
        ])
        .await;
    assert_eq!(codes, vec![Ok(1), Ok(1)], "SUBACK for {topic}");
}

fn register_payload(format: Format, token: &str, serial: &str) -> Vec<u8> {
    enc(
        format,
        &json!({"certificateOwnershipToken": token, "parameters": {"SerialNumber": serial}}),
    )
}

fn csr_payload(format: Format) -> Vec<u8> {
    let (_, csr) = p256_csr();
    enc(format, &json!({"certificateSigningRequest": csr}))
}

/// Reads packets until the server closes the connection; panics if a PUBLISH (a reply) comes
/// first. Returns the MQTT 5 DISCONNECT reason if one came.
async fn closed_without_reply(c: &mut Client) -> Option<u8> {
    let mut reason = None;
    loop {
        match c.recv(WAIT).await {
            Recv::Closed => return reason,
            Recv::Timeout => panic!("the server did not close the connection"),
            Recv::Packet(Packet::Disconnect { reason: r }) => reason = Some(r),
            Recv::Packet(p @ Packet::Publish { .. }) => {
                panic!("no reply expected before the close, got {p:?}")
            }
            Recv::Packet(_) => {}
        }
    }
}

/// The connection is still open and served: a PINGREQ gets its PINGRESP next.
async fn still_open(c: &mut Client) {
    c.send(&Packet::PingReq).await;
    loop {
        match c.recv(WAIT).await {
            Recv::Packet(Packet::PingResp) => return,
            Recv::Packet(Packet::PubAck { .. }) => {}
            other => panic!("expected PINGRESP, got {other:?}"),
        }
    }
}

/// The close reason a connection of `version` reports for an injected fault.
fn fault_close_reason(version: Version) -> Option<u8> {
    match version {
        // "Unspecified error"; MQTT 3.1.1 has no server DISCONNECT.
        Version::V5 => Some(0x80),
        Version::V4 => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delay_holds_the_reply() {
    let env = Env::start();
    let mut c = env.claim_client(Version::V4, "delay").await;
    let topic = keys_topic(JSON);
    subscribe_replies(&mut c, &topic).await;
    add_rule(&env, "delay:800@keys*1");
    let started = Instant::now();
    let (ok, v) = c.request_subscribed(&topic, JSON, b"").await;
    let waited = started.elapsed();
    assert!(ok, "a delayed reply is still the real reply: {v}");
    assert!(
        waited >= Duration::from_millis(800),
        "reply came after {waited:?}, before the 800 ms delay"
    );
    assert_eq!(
        env.certificate(v["certificateId"].as_str().unwrap())
            .unwrap()["status"],
        "PENDING_ACTIVATION"
    );
    assert!(rules(&env).is_empty(), "the counted delay vanished");
    // A persistent delay applies to every matching reply until cleared.
    add_rule(&env, "delay:300");
    for _ in 0..2 {
        let started = Instant::now();
        let (ok, _) = c.request_subscribed(&topic, JSON, b"").await;
        assert!(ok);
        assert!(started.elapsed() >= Duration::from_millis(300));
    }
    assert_eq!(rules(&env), vec!["delay:300"]);
    env.emu.faults().clear();
    assert!(rules(&env).is_empty());
}

/// Which request a table row sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Keys,
    Csr,
    Register,
}

struct RejectRow {
    rule: &'static str,
    target: Target,
    format: Format,
    /// How many requests are rejected before one succeeds; for a rule without count the test
    /// clears it after that many.
    rejections: usize,
    counted: bool,
    expected: Value,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reject_answers_like_aws_without_processing() {
    let env = Env::start();
    let rows = [
        RejectRow {
            rule: "reject:429*2",
            target: Target::Keys,
            format: JSON,
            rejections: 2,
            counted: true,
            expected: json!({"statusCode": 429, "errorCode": "Throttling", "errorMessage": "Rate exceeded"}),
        },
        RejectRow {
            rule: "reject:500*1",
            target: Target::Csr,
            format: CBOR,
            rejections: 1,
            counted: true,
            expected: json!({"statusCode": 500, "errorCode": "InternalError", "errorMessage": "Internal error"}),
        },
        RejectRow {
            rule: "reject:503*3",
            target: Target::Register,
            format: JSON,
            rejections: 3,
            counted: true,
            expected: json!({"statusCode": 503, "errorCode": "ServiceUnavailable", "errorMessage": "Service unavailable"}),
        },
        RejectRow {
            rule: "reject:503",
            target: Target::Keys,
            format: CBOR,
            rejections: 3,
            counted: false,
            expected: json!({"statusCode": 503, "errorCode": "ServiceUnavailable", "errorMessage": "Service unavailable"}),
        },
        RejectRow {
            rule: "reject:429@register*1",
            target: Target::Register,
            format: CBOR,
            rejections: 1,
            counted: true,
            expected: json!({"statusCode": 429, "errorCode": "Throttling", "errorMessage": "Rate exceeded"}),
        },
        RejectRow {
            rule: "reject:502*1",
            target: Target::Csr,
            format: JSON,
            rejections: 1,
            counted: true,
            expected: json!({"statusCode": 502, "errorCode": "InternalError", "errorMessage": "Internal error"}),
        },
        RejectRow {
            rule: "reject:404*1",
            target: Target::Keys,
            format: JSON,
            rejections: 1,
            counted: true,
            expected: json!({"statusCode": 404, "errorCode": "InvalidRequest", "errorMessage": "Request rejected"}),
        },
    ];
    for (i, row) in rows.iter().enumerate() {
        let what = format!("row {i} {}", row.rule);
        let fmt = row.format;
        let mut c = env.claim_client(Version::V5, &format!("reject-{i}")).await;
        // For RegisterThing: a certificate made before the rule is in force.
        let (topic, payload, token_cert) = match row.target {
            Target::Keys => (keys_topic(fmt), Vec::new(), None),
            Target::Csr => (csr_topic(fmt), csr_payload(fmt), None),
            Target::Register => {
                let (id, _, _, token) = create_certificate(&mut c, CertApi::Keys, fmt).await;
                let serial = format!("reject-{i}");
                (
                    register_topic("DemoTemplate", fmt),
                    register_payload(fmt, &token, &serial),
                    Some((id, serial)),
                )
            }
        };
        subscribe_replies(&mut c, &topic).await;
        add_rule(&env, row.rule);
        let before = cert_ids(&env);
        let things_before = thing_count(&env);
        for n in 0..row.rejections {
            let (ok, v) = c.request_subscribed(&topic, fmt, &payload).await;
            assert!(!ok, "{what}: request {n} should be rejected: {v}");
            assert_eq!(v, row.expected, "{what}: rejection {n}");
            assert_eq!(cert_ids(&env), before, "{what}: nothing created");
            assert_eq!(
                thing_count(&env),
                things_before,
                "{what}: nothing registered"
            );
            if let Some((id, _)) = &token_cert {
                assert_eq!(
                    env.certificate(id).unwrap()["status"],
                    "PENDING_ACTIVATION",
                    "{what}"
                );
            }
        }
        if row.counted {
            assert!(rules(&env).is_empty(), "{what}: the count is used up");
        } else {
            assert_eq!(rules(&env), vec![row.rule], "{what}: stays until cleared");
            env.emu.faults().clear();
        }
        // The next request is processed normally; a rejected RegisterThing did not use the token.
        let (ok, v) = c.request_subscribed(&topic, fmt, &payload).await;
        assert!(ok, "{what}: accepted after the rejections: {v}");
        match &token_cert {
            Some((id, serial)) => {
                assert_eq!(v["thingName"], json!(format!("demo-{serial}")), "{what}");
                assert_eq!(env.certificate(id).unwrap()["status"], "ACTIVE", "{what}");
            }
            None => {
                let after = cert_ids(&env);
                let new: Vec<_> = after.difference(&before).cloned().collect();
                assert_eq!(
                    new,
                    vec![v["certificateId"].as_str().unwrap().to_owned()],
                    "{what}"
                );
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_processes_but_sends_no_reply() {
    let env = Env::start();
    let mut c = env.claim_client(Version::V4, "drop").await;
    let (id, _, _, token) = create_certificate(&mut c, CertApi::Keys, JSON).await;
    let register = register_topic("DemoTemplate", JSON);
    subscribe_replies(&mut c, &register).await;
    add_rule(&env, "drop*1");
    c.publish(&register, register_payload(JSON, &token, "dropped"), 1)
        .await;
    // The rule is consumed once the request went through; only then the next request, so that
    // it cannot be the one dropped.
    wait_for("the drop rule to fire", || rules(&env).is_empty()).await;
    let keys = keys_topic(JSON);
    c.publish(&keys, Vec::new(), 1).await;
    let (topic, body) = c.next_publish().await;
    assert_eq!(
        topic,
        format!("{keys}/accepted"),
        "the next reply answers the later request"
    );
    let v = fleetprov_emulator::decode(JSON, &body).unwrap();
    assert_ne!(v["certificateId"], json!(id));
    // The dropped RegisterThing was processed all the same.
    assert_eq!(env.certificate(&id).unwrap()["status"], "ACTIVE");
    let thing = env.thing("demo-dropped").expect("the thing was registered");
    assert_eq!(thing["certificates"], json!([id]));
    // ... and used its token.
    let (ok, v) = c
        .request_subscribed(&register, JSON, &register_payload(JSON, &token, "dropped"))
        .await;
    assert!(!ok);
    assert_eq!(v["errorCode"], "InvalidCertificateOwnershipToken");
    assert_eq!(v["statusCode"], 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mangle_spoils_the_accepted_reply_of_a_processed_request() {
    let env = Env::start();
    let mut c = env.claim_client(Version::V4, "mangle").await;

    // truncate: the accepted topic, half the payload, and the certificate exists.
    let keys = keys_topic(JSON);
    subscribe_replies(&mut c, &keys).await;
    add_rule(&env, "mangle:truncate@keys*1");
    let before = cert_ids(&env);
    c.publish(&keys, Vec::new(), 1).await;
    let (topic, body) = c.next_publish().await;
    assert_eq!(topic, format!("{keys}/accepted"));
    assert!(fleetprov_emulator::decode(JSON, &body).is_err());
    assert!(body.starts_with(b"{\""), "a prefix of the real reply");
    assert_eq!(cert_ids(&env).len(), before.len() + 1, "processed");
    assert!(rules(&env).is_empty());

    // huge: 10 MiB of padding in a CBOR reply that still decodes, with the real certificate.
    let csr = csr_topic(CBOR);
    subscribe_replies(&mut c, &csr).await;
    add_rule(&env, "mangle:huge@csr*1");
    c.publish(&csr, csr_payload(CBOR), 1).await;
    let (topic, body) = c.next_publish().await;
    assert_eq!(topic, format!("{csr}/accepted"));
    assert!(body.len() > 10 * 1024 * 1024, "{} bytes", body.len());
    let v = fleetprov_emulator::decode(CBOR, &body).unwrap();
    let id = v["certificateId"].as_str().unwrap();
    assert_eq!(env.certificate(id).unwrap()["status"], "PENDING_ACTIVATION");
    let (_, _, _, token) = create_certificate(&mut c, CertApi::Keys, JSON).await;

    // A rejection passes untouched and leaves the rule in force; the accepted reply that follows
    // is spoiled, though the thing is registered.
    let register = register_topic("DemoTemplate", JSON);
    subscribe_replies(&mut c, &register).await;
    add_rule(&env, "mangle:garbage@register*1");
    let (ok, v) = c
        .request_subscribed(&register, JSON, &register_payload(JSON, "unknown", "m1"))
        .await;
    assert!(!ok);
    assert_eq!(v["errorCode"], "InvalidCertificateOwnershipToken");
    assert_eq!(rules(&env), vec!["mangle:garbage@register*1"]);
    c.publish(&register, register_payload(JSON, &token, "m1"), 1)
        .await;
    let (topic, body) = c.next_publish().await;
    assert_eq!(topic, format!("{register}/accepted"));
    assert_eq!(&body[..], fleetprov_emulator::faults::GARBAGE);
    assert!(env.thing("demo-m1").is_some());
    assert!(rules(&env).is_empty());

    // A kind that does not apply to the API neither fires nor is consumed: foreign-cert leaves
    // RegisterThing alone and spoils the next certificate reply.
    let (_, _, _, token) = create_certificate(&mut c, CertApi::Keys, JSON).await;
    add_rule(&env, "mangle:foreign-cert*1");
    let (ok, v) = c
        .request_subscribed(&register, JSON, &register_payload(JSON, &token, "m2"))
        .await;
    assert!(ok, "{v}");
    assert_eq!(v["thingName"], "demo-m2");
    assert_eq!(rules(&env), vec!["mangle:foreign-cert*1"]);
    let before = cert_ids(&env);
    let (id, _, _, _) = create_certificate(&mut c, CertApi::Keys, JSON).await;
    assert!(rules(&env).is_empty());
    let made: Vec<_> = cert_ids(&env).difference(&before).cloned().collect();
    assert_eq!(made.len(), 1, "the real certificate was made");
    assert_ne!(made[0], id, "but another one was sent");
    assert!(env.certificate(&id).is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_sends_the_same_reply_twice() {
    let env = Env::start();
    for (version, format, api) in [
        (Version::V4, JSON, CertApi::Keys),
        (Version::V5, CBOR, CertApi::Csr),
    ] {
        let mut c = env.claim_client(version, &format!("dup-{version:?}")).await;
        let (topic, payload) = match api {
            CertApi::Keys => (keys_topic(format), Vec::new()),
            CertApi::Csr => (csr_topic(format), csr_payload(format)),
        };
        subscribe_replies(&mut c, &topic).await;
        add_rule(&env, "duplicate*1");
        let before = cert_ids(&env);
        c.publish(&topic, payload.clone(), 1).await;
        let first = c.next_publish().await;
        let second = c.next_publish().await;
        assert_eq!(first.0, format!("{topic}/accepted"));
        assert_eq!(first, second, "byte-identical copies");
        let v = fleetprov_emulator::decode(format, &first.1).unwrap();
        let id = v["certificateId"].as_str().unwrap().to_owned();
        let after = cert_ids(&env);
        assert_eq!(
            after.difference(&before).collect::<Vec<_>>(),
            vec![&id],
            "one certificate for the one request"
        );
        assert!(rules(&env).is_empty());
        // No third copy: the next reply answers the next request, once.
        c.publish(&topic, payload, 1).await;
        let (t, body) = c.next_publish().await;
        assert_eq!(t, format!("{topic}/accepted"));
        let next = fleetprov_emulator::decode(format, &body).unwrap();
        assert_ne!(next["certificateId"], json!(id));
        still_open(&mut c).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_at_connect() {
    let env = Env::start();
    for version in [Version::V4, Version::V5] {
        add_rule(&env, "close:connect*1");
        let mut c = env.claim_client(version, &format!("cc-{version:?}")).await;
        assert_eq!(
            closed_without_reply(&mut c).await,
            fault_close_reason(version),
            "{version:?}"
        );
        assert!(rules(&env).is_empty());
        // The next connection is not affected.
        let mut c = env.claim_client(version, &format!("cc2-{version:?}")).await;
        still_open(&mut c).await;
    }
    assert_eq!(cert_ids(&env).len(), 1, "only the claim certificate");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_after_suback_of_a_create_api() {
    let env = Env::start_open();
    let before = cert_ids(&env);
    for (version, topic) in [
        (Version::V5, keys_topic(JSON)),
        (Version::V4, csr_topic(CBOR)),
    ] {
        add_rule(&env, "close:suback@create*1");
        let mut c = env
            .claim_client(version, &format!("suback-{version:?}"))
            .await;
        // SUBACKs for other topics do not trigger it.
        subscribe_replies(&mut c, &register_topic("DemoTemplate", JSON)).await;
        assert_eq!(c.subscribe(&[("devices/x/#", 1)]).await, vec![Ok(1)]);
        still_open(&mut c).await;
        assert_eq!(rules(&env), vec!["close:suback@create*1"]);
        // The SUBACK for a certificate API's reply topics arrives, then the connection closes.
        subscribe_replies(&mut c, &topic).await;
        assert_eq!(
            closed_without_reply(&mut c).await,
            fault_close_reason(version),
            "{topic}"
        );
        assert!(rules(&env).is_empty());
    }
    assert_eq!(cert_ids(&env), before, "nothing created");
    // Once consumed, subscribing and requesting work.
    let mut c = env.claim_client(Version::V4, "suback-after").await;
    let (ok, _) = c.request(&keys_topic(JSON), JSON, b"").await;
    assert!(ok);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_when_a_keys_request_arrives() {
    let env = Env::start();
    for version in [Version::V4, Version::V5] {
        let mut c = env.claim_client(version, &format!("req-{version:?}")).await;
        let keys = keys_topic(JSON);
        let csr = csr_topic(JSON);
        subscribe_replies(&mut c, &keys).await;
        subscribe_replies(&mut c, &csr).await;
        add_rule(&env, "close:request@keys*1");
        // @keys leaves CreateCertificateFromCsr alone.
        let (ok, v) = c.request_subscribed(&csr, JSON, &csr_payload(JSON)).await;
        assert!(ok, "{v}");
        let before = cert_ids(&env);
        c.publish(&keys, Vec::new(), 1).await;
        assert_eq!(
            closed_without_reply(&mut c).await,
            fault_close_reason(version)
        );
        assert!(rules(&env).is_empty());
        assert_eq!(cert_ids(&env), before, "nothing created: {version:?}");
    }
    // A later request creates exactly one certificate: nothing was left in flight.
    let before = cert_ids(&env);
    let mut c = env.claim_client(Version::V4, "req-after").await;
    let (ok, v) = c.request(&keys_topic(JSON), JSON, b"").await;
    assert!(ok);
    let after = cert_ids(&env);
    assert_eq!(
        after.difference(&before).collect::<Vec<_>>(),
        vec![v["certificateId"].as_str().unwrap()]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_after_register_was_processed() {
    let env = Env::start();
    for version in [Version::V4, Version::V5] {
        let serial = format!("processed-{version:?}");
        let mut c = env.claim_client(version, &serial).await;
        let (id, pem, key, token) = create_certificate(&mut c, CertApi::Csr, JSON).await;
        let register = register_topic("DemoTemplate", JSON);
        subscribe_replies(&mut c, &register).await;
        add_rule(&env, "close:processed@register*1");
        c.publish(&register, register_payload(JSON, &token, &serial), 1)
            .await;
        assert_eq!(
            closed_without_reply(&mut c).await,
            fault_close_reason(version)
        );
        assert!(rules(&env).is_empty());
        // Registered although the device never heard of it.
        assert_eq!(env.certificate(&id).unwrap()["status"], "ACTIVE");
        let thing = env
            .thing(&format!("demo-{serial}"))
            .expect("the thing was registered");
        assert_eq!(thing["certificates"], json!([id]));
        // A retry with the same token finds it used; the new certificate works.
        let mut c = env.claim_client(version, &format!("{serial}-retry")).await;
        let (ok, v) = c
            .request(&register, JSON, &register_payload(JSON, &token, &serial))
            .await;
        assert!(!ok);
        assert_eq!(v["errorCode"], "InvalidCertificateOwnershipToken");
        let mut dev = Client::connect(&env, &pem, &key, version, &format!("demo-{serial}"))
            .await
            .expect("the registered certificate connects");
        still_open(&mut dev).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_after_the_csr_reply() {
    let env = Env::start();
    for version in [Version::V4, Version::V5] {
        let mut c = env
            .claim_client(version, &format!("reply-{version:?}"))
            .await;
        let csr = csr_topic(CBOR);
        subscribe_replies(&mut c, &csr).await;
        add_rule(&env, "close:reply@csr*1");
        c.publish(&csr, csr_payload(CBOR), 1).await;
        let (topic, body) = c.next_publish().await;
        assert_eq!(topic, format!("{csr}/accepted"), "the reply comes first");
        assert_eq!(
            closed_without_reply(&mut c).await,
            fault_close_reason(version),
            "then the close"
        );
        assert!(rules(&env).is_empty());
        let v = fleetprov_emulator::decode(CBOR, &body).unwrap();
        let id = v["certificateId"].as_str().unwrap();
        assert_eq!(env.certificate(id).unwrap()["status"], "PENDING_ACTIVATION");
        // The reply was real: its token registers over a new connection.
        let serial = format!("reply-{version:?}");
        let mut c = env.claim_client(version, &format!("{serial}-2")).await;
        let token = v["certificateOwnershipToken"].as_str().unwrap();
        let (ok, r) = c
            .request(
                &register_topic("DemoTemplate", CBOR),
                CBOR,
                &register_payload(CBOR, token, &serial),
            )
            .await;
        assert!(ok, "{r}");
        assert_eq!(env.certificate(id).unwrap()["status"], "ACTIVE");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_filters_select_requests() {
    let env = Env::start();
    let mut c = env.claim_client(Version::V5, "filters").await;
    let (_, _, _, token) = create_certificate(&mut c, CertApi::Keys, JSON).await;
    let keys = keys_topic(JSON);
    let csr = csr_topic(JSON);
    let register = register_topic("DemoTemplate", JSON);
    for t in [&keys, &csr, &register] {
        subscribe_replies(&mut c, t).await;
    }
    add_rule(&env, "reject:429@register*1");
    add_rule(&env, "reject:500@create*2");
    add_rule(&env, "reject:503@csr*1");
    // @register leaves the certificate APIs alone, @create hits both of them; the first rule
    // that fits fires.
    let (ok, v) = c.request_subscribed(&keys, JSON, b"").await;
    assert_eq!(
        (ok, v["statusCode"].clone()),
        (false, json!(500)),
        "keys: {v}"
    );
    let (ok, v) = c.request_subscribed(&csr, JSON, &csr_payload(JSON)).await;
    assert_eq!(
        (ok, v["statusCode"].clone()),
        (false, json!(500)),
        "csr: {v}"
    );
    assert_eq!(
        rules(&env),
        vec!["reject:429@register*1", "reject:503@csr*1"]
    );
    // @csr does not touch CreateKeysAndCertificate.
    let (ok, v) = c.request_subscribed(&keys, JSON, b"").await;
    assert!(ok, "keys: {v}");
    let (ok, v) = c.request_subscribed(&csr, JSON, &csr_payload(JSON)).await;
    assert_eq!(
        (ok, v["statusCode"].clone()),
        (false, json!(503)),
        "csr: {v}"
    );
    assert_eq!(rules(&env), vec!["reject:429@register*1"]);
    let payload = register_payload(JSON, &token, "filters");
    let (ok, v) = c.request_subscribed(&register, JSON, &payload).await;
    assert_eq!(
        (ok, v["statusCode"].clone()),
        (false, json!(429)),
        "register: {v}"
    );
    assert!(rules(&env).is_empty());
    let (ok, v) = c.request_subscribed(&register, JSON, &payload).await;
    assert!(ok, "register: {v}");
    let (ok, v) = c.request_subscribed(&csr, JSON, &csr_payload(JSON)).await;
    assert!(ok, "csr: {v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counts_are_consumed_and_clear_removes_rules() {
    let env = Env::start();
    let mut c = env.claim_client(Version::V4, "counts").await;
    let keys = keys_topic(JSON);
    subscribe_replies(&mut c, &keys).await;
    add_rule(&env, "reject:429*3");
    for left in ["reject:429*2", "reject:429*1"] {
        let (ok, _) = c.request_subscribed(&keys, JSON, b"").await;
        assert!(!ok);
        assert_eq!(rules(&env), vec![left]);
    }
    let (ok, _) = c.request_subscribed(&keys, JSON, b"").await;
    assert!(!ok);
    assert!(
        rules(&env).is_empty(),
        "the rule vanished with its last count"
    );
    let (ok, _) = c.request_subscribed(&keys, JSON, b"").await;
    assert!(ok);
    // Rules without a count stay until `clear`.
    add_rule(&env, "reject:500");
    add_rule(&env, "duplicate@keys");
    for _ in 0..3 {
        let (ok, v) = c.request_subscribed(&keys, JSON, b"").await;
        assert!(!ok);
        assert_eq!(v["statusCode"], 500);
        // duplicate@keys: the rejection also arrives twice.
        let (_, body) = c.next_publish().await;
        assert_eq!(fleetprov_emulator::decode(JSON, &body).unwrap(), v);
    }
    assert_eq!(rules(&env), vec!["reject:500", "duplicate@keys"]);
    env.emu.faults().clear();
    assert!(rules(&env).is_empty());
    let (ok, _) = c.request_subscribed(&keys, JSON, b"").await;
    assert!(ok);
    still_open(&mut c).await;
}

/// A line client of the control interface.
struct Control {
    lines: tokio::io::Lines<BufReader<OwnedReadHalf>>,
    w: OwnedWriteHalf,
}

impl Control {
    async fn connect(env: &Env) -> Control {
        let addr = env.emu.control_addr().expect("control interface");
        let sock = tokio::time::timeout(WAIT, TcpStream::connect(addr))
            .await
            .expect("control connect in time")
            .expect("control connects");
        let (r, w) = sock.into_split();
        Control {
            lines: BufReader::new(r).lines(),
            w,
        }
    }

    async fn cmd(&mut self, line: &str) -> String {
        self.w
            .write_all(format!("{line}\n").as_bytes())
            .await
            .unwrap();
        tokio::time::timeout(WAIT, self.lines.next_line())
            .await
            .unwrap_or_else(|_| panic!("no answer to {line:?} in time"))
            .unwrap()
            .unwrap_or_else(|| panic!("control closed after {line:?}"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_interface_commands() {
    let env = Env::start_with(|c| c.control_port = Some(0));
    let addr = env.emu.control_addr().unwrap();
    assert!(addr.ip().is_loopback() && addr.port() != 0, "{addr}");
    let mut ctl = Control::connect(&env).await;
    // Several commands over one connection.
    assert_eq!(ctl.cmd("faults").await, "[]");
    assert_eq!(ctl.cmd("fault reject:429@keys*1").await, "ok");
    assert_eq!(ctl.cmd("fault delay:20@register").await, "ok");
    assert_eq!(
        serde_json::from_str::<Value>(&ctl.cmd("faults").await).unwrap(),
        json!(["reject:429@keys*1", "delay:20@register"])
    );
    assert_eq!(rules(&env), vec!["reject:429@keys*1", "delay:20@register"]);
    // The rule added over the control interface acts on MQTT requests.
    let mut c = env.claim_client(Version::V4, "ctl").await;
    let (ok, v) = c.request(&keys_topic(JSON), JSON, b"").await;
    assert!(!ok);
    assert_eq!(v["statusCode"], 429);
    assert_eq!(v["errorCode"], "Throttling");
    assert_eq!(
        serde_json::from_str::<Value>(&ctl.cmd("faults").await).unwrap(),
        json!(["delay:20@register"])
    );
    assert_eq!(ctl.cmd("clear").await, "ok");
    assert_eq!(ctl.cmd("faults").await, "[]");
    // `list` is the registry, one line of JSON.
    let (ok, v) = c.request_subscribed(&keys_topic(JSON), JSON, b"").await;
    assert!(ok);
    let listed: Value = serde_json::from_str(&ctl.cmd("list").await).unwrap();
    assert_eq!(listed, env.emu.registry().unwrap());
    let certs = listed["certificates"].as_array().unwrap();
    assert!(certs
        .iter()
        .any(|c| c["id"] == v["certificateId"] && c["status"] == "PENDING_ACTIVATION"));
    assert!(certs
        .iter()
        .any(|c| c["origin"] == "claim" && c["status"] == "ACTIVE"));
    // Nothing has expired: `sweep` deletes nothing and the pending certificate stays.
    assert_eq!(ctl.cmd("sweep").await, "ok 0");
    assert!(env
        .certificate(v["certificateId"].as_str().unwrap())
        .is_some());
    // Bad commands answer an error and leave the connection usable.
    let bad = [
        "fault explode",
        "fault reject:200",
        "fault reject:429*0",
        "fault drop@nowhere",
        "fault",
        "frobnicate",
        "FAULTS",
        "",
    ];
    for line in bad {
        let answer = ctl.cmd(line).await;
        assert!(answer.starts_with("error:"), "{line:?} -> {answer:?}");
    }
    assert_eq!(ctl.cmd("faults").await, "[]", "bad rules were not added");
    // A second connection is served too.
    let mut other = Control::connect(&env).await;
    assert_eq!(other.cmd("fault drop*1").await, "ok");
    assert_eq!(ctl.cmd("faults").await, r#"["drop*1"]"#);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_sweep_deletes_expired_certificates() {
    let env = Env::start_with(|c| {
        c.control_port = Some(0);
        c.token_ttl = Duration::from_millis(300);
        // Only the control interface sweeps: what is deleted, it deleted.
        c.auto_sweep = false;
    });
    let mut ctl = Control::connect(&env).await;
    let mut c = env.claim_client(Version::V4, "sweep").await;
    let (id, _, _, _) = create_certificate(&mut c, CertApi::Keys, JSON).await;
    assert_eq!(ctl.cmd("sweep").await, "ok 0", "the token is still valid");
    assert!(env.certificate(&id).is_some());
    // Waiting past the token lifetime is the behaviour under test.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(env.certificate(&id).is_some(), "nothing sweeps on its own");
    assert_eq!(ctl.cmd("sweep").await, "ok 1");
    assert!(
        env.certificate(&id).is_none(),
        "expired certificate deleted"
    );
    assert_eq!(ctl.cmd("sweep").await, "ok 0");
}
