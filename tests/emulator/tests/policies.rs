//! IoT policies as the broker enforces them: the claim policy from `claim-policy.json`, the
//! policies a template attaches for device certificates, and what a client sees for each denied
//! action in MQTT 3.1.1 and 5 (policy × operation × version tables).

mod common;

use bytes::Bytes;
use common::*;
use fleetprov_emulator::wire::{Packet, Version};
use fleetprov_emulator::Format;
use serde_json::{json, Value};

const ARN: &str = "arn:aws:iot:us-east-1:123456789012";
const JSON: Format = Format::Json;

/// What happened to one operation.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    /// CONNACK 0 / SUBACK granted / PUBACK / message delivered.
    Ok,
    /// CONNECT: the connection closed without a CONNACK (3.1.1) or with CONNACK 0x87 (5).
    ConnectRefused,
    /// SUBSCRIBE: this failure code in the SUBACK, connection still open.
    SubAckFailure(u8),
    /// PUBLISH: the server closed the connection (with this DISCONNECT reason in MQTT 5).
    Disconnected(Option<u8>),
    /// PUBLISH at QoS 1, MQTT 5: this failure code in the PUBACK, connection still open.
    PubAckFailure(u8),
    /// RECEIVE: the message was not delivered.
    NotDelivered,
}

#[derive(Debug, Clone)]
enum Op {
    Connect(&'static str),
    Subscribe(&'static str),
    /// A PUBLISH at QoS 1.
    Publish(&'static str),
    /// A PUBLISH at QoS 0.
    Publish0(&'static str),
    /// Subscribes to the filter (allowed), publishes to the topic, checks delivery.
    Receive(&'static str, &'static str),
}

fn statement(effect: &str, actions: &[&str], resources: &[String]) -> Value {
    json!({"Effect": effect, "Action": actions, "Resource": resources})
}

fn doc(statements: Vec<Value>) -> Value {
    json!({"Version": "2012-10-17", "Statement": statements})
}

fn r(kind: &str, name: &str) -> String {
    format!("{ARN}:{kind}/{name}")
}

/// The claim policy of AWS's fleet provisioning guide, unchanged, for template `DemoTemplate`.
fn aws_documented_claim_policy() -> Value {
    doc(vec![
        statement("Allow", &["iot:Connect"], &["*".into()]),
        statement(
            "Allow",
            &["iot:Publish", "iot:Receive"],
            &[
                r("topic", "$aws/certificates/create/*"),
                r(
                    "topic",
                    "$aws/provisioning-templates/DemoTemplate/provision/*",
                ),
            ],
        ),
        statement(
            "Allow",
            &["iot:Subscribe"],
            &[
                r("topicfilter", "$aws/certificates/create/*"),
                r(
                    "topicfilter",
                    "$aws/provisioning-templates/DemoTemplate/provision/*",
                ),
            ],
        ),
    ])
}

/// Connects with the claim certificate; Err(outcome) when the CONNECT is refused.
async fn connect(env: &Env, version: Version, client_id: &str) -> Result<Client, Outcome> {
    let (cert, key) = env.claim();
    let stream = tls(env, &cert, &key, &TlsOpts::default())
        .await
        .expect("TLS");
    connect_on(stream, version, client_id).await
}

async fn connect_on(
    stream: tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    version: Version,
    client_id: &str,
) -> Result<Client, Outcome> {
    let mut c = Client::from_stream(stream, version);
    c.send(&Packet::Connect {
        client_id: client_id.into(),
        keep_alive: 60,
        clean: true,
        will: None,
    })
    .await;
    match c.recv(WAIT).await {
        Recv::Packet(Packet::ConnAck { code: 0, .. }) => Ok(c),
        Recv::Packet(Packet::ConnAck { code: 0x87, .. }) if version == Version::V5 => {
            assert_eq!(c.recv(WAIT).await, Recv::Closed);
            Err(Outcome::ConnectRefused)
        }
        Recv::Closed if version == Version::V4 => Err(Outcome::ConnectRefused),
        other => panic!("unexpected answer to CONNECT: {other:?}"),
    }
}

async fn run(env: &Env, version: Version, op: &Op) -> Outcome {
    let client_id = match op {
        Op::Connect(id) => id,
        _ => "dev-1",
    };
    let mut c = match connect(env, version, client_id).await {
        Ok(c) => c,
        Err(o) => return o,
    };
    match op {
        Op::Connect(_) => Outcome::Ok,
        Op::Subscribe(filter) => {
            let outcome = match c.subscribe(&[(filter, 1)]).await.as_slice() {
                [Ok(1)] => Outcome::Ok,
                [Err(code)] => Outcome::SubAckFailure(*code),
                other => panic!("SUBACK {other:?}"),
            };
            // A denied filter does not end the connection.
            c.send(&Packet::PingReq).await;
            assert_eq!(c.recv(WAIT).await, Recv::Packet(Packet::PingResp));
            outcome
        }
        Op::Publish(topic) => {
            // Not a request topic: only the PUBACK (or the close) answers.
            c.publish(topic, Bytes::from_static(b"{}"), 1).await;
            match c.recv(WAIT).await {
                Recv::Packet(Packet::PubAck { reason: 0, .. }) => Outcome::Ok,
                Recv::Packet(Packet::PubAck { reason, .. }) => {
                    // A failed PUBACK does not end the connection.
                    c.send(&Packet::PingReq).await;
                    assert_eq!(c.recv(WAIT).await, Recv::Packet(Packet::PingResp));
                    Outcome::PubAckFailure(reason)
                }
                Recv::Closed => Outcome::Disconnected(None),
                Recv::Packet(Packet::Disconnect { reason }) => {
                    assert_eq!(c.recv(WAIT).await, Recv::Closed);
                    Outcome::Disconnected(Some(reason))
                }
                other => panic!("answer to PUBLISH: {other:?}"),
            }
        }
        Op::Publish0(topic) => {
            // Nothing acknowledges QoS 0: a PINGRESP after it shows the connection lives on.
            c.publish(topic, Bytes::from_static(b"{}"), 0).await;
            c.send(&Packet::PingReq).await;
            match c.recv(WAIT).await {
                Recv::Packet(Packet::PingResp) => Outcome::Ok,
                Recv::Closed => Outcome::Disconnected(None),
                Recv::Packet(Packet::Disconnect { reason }) => {
                    assert_eq!(c.recv(WAIT).await, Recv::Closed);
                    Outcome::Disconnected(Some(reason))
                }
                other => panic!("answer to PUBLISH: {other:?}"),
            }
        }
        Op::Receive(filter, topic) => {
            assert_eq!(
                c.subscribe(&[(filter, 0), ("marker", 0)]).await,
                vec![Ok(0), Ok(0)]
            );
            c.publish(topic, Bytes::from_static(b"m"), 0).await;
            c.publish("marker", Bytes::from_static(b"end"), 0).await;
            // Messages to one subscriber arrive in order: the marker comes after the message
            // if the message was delivered at all.
            let (first, _) = c.next_publish().await;
            if first == "marker" {
                Outcome::NotDelivered
            } else {
                assert_eq!(first, *topic);
                assert_eq!(c.next_publish().await.0, "marker");
                Outcome::Ok
            }
        }
    }
}

fn denied_sub(version: Version) -> Outcome {
    Outcome::SubAckFailure(if version == Version::V5 { 0x87 } else { 0x80 })
}

/// A denied QoS 1 PUBLISH: MQTT 3.1.1 closes the connection (observed), MQTT 5 answers PUBACK
/// 0x87 Not authorized (AWS's PUBACK reason codes).
fn denied_pub(version: Version) -> Outcome {
    match version {
        Version::V4 => Outcome::Disconnected(None),
        Version::V5 => Outcome::PubAckFailure(0x87),
    }
}

/// A denied QoS 0 PUBLISH: closed, MQTT 5 with DISCONNECT 0x87 [inferred].
fn denied_pub0(version: Version) -> Outcome {
    Outcome::Disconnected((version == Version::V5).then_some(0x87))
}

#[derive(Clone, Copy)]
enum Want {
    Ok,
    ConnectRefused,
    SubDenied,
    PubDenied,
    NotDelivered,
}

fn want(w: Want, version: Version) -> Outcome {
    match w {
        Want::Ok => Outcome::Ok,
        Want::ConnectRefused => Outcome::ConnectRefused,
        Want::SubDenied => denied_sub(version),
        Want::PubDenied => denied_pub(version),
        Want::NotDelivered => Outcome::NotDelivered,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_operation_version_table() {
    let env = Env::start();
    let marker = || {
        statement(
            "Allow",
            &["iot:Subscribe", "iot:Publish", "iot:Receive"],
            &[r("topicfilter", "marker"), r("topic", "marker")],
        )
    };
    let rows: Vec<(&str, Value, Op, Want)> = vec![
        // AWS's documented claim policy: CreateKeysAndCertificate and the named template only.
        (
            "documented",
            aws_documented_claim_policy(),
            Op::Connect("anything"),
            Want::Ok,
        ),
        (
            "documented",
            aws_documented_claim_policy(),
            Op::Subscribe("$aws/certificates/create/json/accepted"),
            Want::Ok,
        ),
        (
            "documented",
            aws_documented_claim_policy(),
            Op::Subscribe("$aws/certificates/create-from-csr/json/accepted"),
            Want::SubDenied,
        ),
        (
            "documented",
            aws_documented_claim_policy(),
            Op::Subscribe("$aws/provisioning-templates/OtherTemplate/provision/json/accepted"),
            Want::SubDenied,
        ),
        (
            "documented",
            aws_documented_claim_policy(),
            Op::Subscribe("$aws/provisioning-templates/DemoTemplate/provision/json/+"),
            Want::Ok,
        ),
        (
            "documented",
            aws_documented_claim_policy(),
            Op::Publish("$aws/certificates/create-from-csr/json/x"),
            Want::PubDenied,
        ),
        (
            "documented",
            aws_documented_claim_policy(),
            Op::Publish("devices/dev-1"),
            Want::PubDenied,
        ),
        // `topic/` where `topicfilter/` belongs denies the subscription (aws-iot-device-sdk-python-v2#80).
        (
            "topic-for-filter",
            doc(vec![statement(
                "Allow",
                &["iot:Connect", "iot:Subscribe"],
                &[r("client", "*"), r("topic", "$aws/certificates/create/*")],
            )]),
            Op::Subscribe("$aws/certificates/create/json/accepted"),
            Want::SubDenied,
        ),
        // No policy statement at all: nothing is allowed, not even CONNECT.
        (
            "empty",
            doc(vec![]),
            Op::Connect("dev-1"),
            Want::ConnectRefused,
        ),
        // Connect restricted by client id, with a wildcard.
        (
            "client-ids",
            doc(vec![statement(
                "Allow",
                &["iot:Connect"],
                &[r("client", "dev-*")],
            )]),
            Op::Connect("dev-7"),
            Want::Ok,
        ),
        (
            "client-ids",
            doc(vec![statement(
                "Allow",
                &["iot:Connect"],
                &[r("client", "dev-*")],
            )]),
            Op::Connect("other"),
            Want::ConnectRefused,
        ),
        (
            "client-ids",
            doc(vec![statement(
                "Allow",
                &["iot:Connect"],
                &[r("client", "dev-?")],
            )]),
            Op::Connect("dev-12"),
            Want::ConnectRefused,
        ),
        // An explicit Deny wins over an Allow.
        (
            "deny-wins",
            doc(vec![
                statement("Allow", &["iot:*"], &["*".into()]),
                statement("Deny", &["iot:Connect"], &[r("client", "blocked")]),
                statement("Deny", &["iot:Publish"], &[r("topic", "x/secret")]),
                statement("Deny", &["iot:Subscribe"], &[r("topicfilter", "x/#")]),
                statement("Deny", &["iot:Receive"], &[r("topic", "x/hidden")]),
            ]),
            Op::Connect("blocked"),
            Want::ConnectRefused,
        ),
        (
            "deny-wins",
            Value::Null,
            Op::Publish("x/secret"),
            Want::PubDenied,
        ),
        ("deny-wins", Value::Null, Op::Publish("x/open"), Want::Ok),
        (
            "deny-wins",
            Value::Null,
            Op::Subscribe("x/#"),
            Want::SubDenied,
        ),
        ("deny-wins", Value::Null, Op::Subscribe("x/+"), Want::Ok),
        (
            "deny-wins",
            Value::Null,
            Op::Receive("x/+", "x/hidden"),
            Want::NotDelivered,
        ),
        (
            "deny-wins",
            Value::Null,
            Op::Receive("x/+", "x/shown"),
            Want::Ok,
        ),
        // `+` and `#` are literal in a policy; `?` is one character, `*` any run.
        (
            "literal-mqtt-wildcards",
            doc(vec![
                statement("Allow", &["iot:Connect"], &["*".into()]),
                statement(
                    "Allow",
                    &["iot:Subscribe"],
                    &[r("topicfilter", "s/?"), r("topicfilter", "h/#")],
                ),
                marker(),
            ]),
            Op::Subscribe("s/a"),
            Want::Ok,
        ),
        (
            "literal-mqtt-wildcards",
            Value::Null,
            Op::Subscribe("s/+"),
            Want::Ok,
        ),
        (
            "literal-mqtt-wildcards",
            Value::Null,
            Op::Subscribe("s/ab"),
            Want::SubDenied,
        ),
        (
            "literal-mqtt-wildcards",
            Value::Null,
            Op::Subscribe("h/#"),
            Want::Ok,
        ),
        (
            "literal-mqtt-wildcards",
            Value::Null,
            Op::Subscribe("h/a"),
            Want::SubDenied,
        ),
        // Subscribing is not receiving: iot:Receive is checked on every delivery.
        (
            "subscribe-without-receive",
            doc(vec![
                statement("Allow", &["iot:Connect"], &["*".into()]),
                statement("Allow", &["iot:Subscribe"], &[r("topicfilter", "d/*")]),
                statement("Allow", &["iot:Publish"], &[r("topic", "d/*")]),
                statement("Allow", &["iot:Receive"], &[r("topic", "d/ok")]),
                marker(),
            ]),
            Op::Receive("d/+", "d/ok"),
            Want::Ok,
        ),
        (
            "subscribe-without-receive",
            Value::Null,
            Op::Receive("d/+", "d/no"),
            Want::NotDelivered,
        ),
        // Policy variables: the client id and the claim certificate's subject.
        (
            "variables",
            doc(vec![
                statement("Allow", &["iot:Connect"], &[r("client", "${iot:ClientId}")]),
                statement(
                    "Allow",
                    &["iot:Publish"],
                    &[r("topic", "c/${iot:ClientId}/*")],
                ),
                json!({"Effect": "Allow", "Action": "iot:Subscribe", "Resource": r("topicfilter", "cn/*"),
                       "Condition": {"StringEquals": {"iot:Certificate.Subject.CommonName": "fleetprov claim"}}}),
                json!({"Effect": "Allow", "Action": "iot:Subscribe", "Resource": r("topicfilter", "other-cn/*"),
                       "Condition": {"StringEquals": {"iot:Certificate.Subject.CommonName": "someone else"}}}),
                // Not attached to any thing: a statement with a thing variable does not apply.
                statement(
                    "Allow",
                    &["iot:Subscribe"],
                    &[r("topicfilter", "t/${iot:Connection.Thing.ThingName}")],
                ),
            ]),
            Op::Publish("c/dev-1/x"),
            Want::Ok,
        ),
        (
            "variables",
            Value::Null,
            Op::Publish("c/dev-2/x"),
            Want::PubDenied,
        ),
        ("variables", Value::Null, Op::Subscribe("cn/a"), Want::Ok),
        (
            "variables",
            Value::Null,
            Op::Subscribe("other-cn/a"),
            Want::SubDenied,
        ),
        (
            "variables",
            Value::Null,
            Op::Subscribe("t/dev-1"),
            Want::SubDenied,
        ),
        (
            "variables",
            Value::Null,
            Op::Subscribe("t/"),
            Want::SubDenied,
        ),
        // The JSON `aws iot get-policy` prints is taken as it is.
        (
            "get-policy-output",
            json!({"policyName": "Claim", "policyArn": format!("{ARN}:policy/Claim"), "defaultVersionId": "1",
                   "policyDocument": doc(vec![statement("Allow", &["iot:Connect", "iot:Publish"], &["*".into()])]).to_string()}),
            Op::Publish("anything"),
            Want::Ok,
        ),
        (
            "get-policy-output",
            Value::Null,
            Op::Subscribe("anything"),
            Want::SubDenied,
        ),
    ];
    for version in [Version::V4, Version::V5] {
        let mut current = Value::Null;
        for (name, policy, op, w) in &rows {
            if !policy.is_null() {
                current = policy.clone();
            }
            env.set_claim_policy(&current);
            let got = run(&env, version, op).await;
            assert_eq!(got, want(*w, version), "{version:?} policy {name}: {op:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_claim_policy_is_written_and_allows_provisioning_both_ways() {
    let env = Env::start();
    let text = std::fs::read_to_string(&env.emu.paths().claim_policy).unwrap();
    let written: Value = serde_json::from_str(&text).unwrap();
    let statements = written["Statement"].as_array().unwrap();
    assert_eq!(statements.len(), 3, "{text}");
    for version in [Version::V4, Version::V5] {
        for api in [CertApi::Keys, CertApi::Csr] {
            provision(
                &env,
                version,
                api,
                JSON,
                &format!("default-{version:?}-{api:?}"),
            )
            .await;
        }
        // Beyond provisioning, the claim certificate may do nothing.
        assert_eq!(
            run(&env, version, &Op::Publish("devices/x")).await,
            denied_pub(version)
        );
        assert_eq!(
            run(&env, version, &Op::Publish0("devices/x")).await,
            denied_pub0(version)
        );
        assert_eq!(
            run(&env, version, &Op::Subscribe("#")).await,
            denied_sub(version)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_claim_policy_stops_the_start_with_the_reason() {
    let dir = TempDir::new("badpolicy");
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let rows = [
        ("{", "not JSON"),
        (
            r#"{"Statement": [{"Effect": "Allow", "Action": "iot:*"}]}"#,
            "Resource",
        ),
        (
            r#"{"Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*", "Condition": {"IpAddress": {"aws:SourceIp": "10.0.0.0/8"}}}]}"#,
            "condition operator \"IpAddress\" is not emulated",
        ),
    ];
    for (text, want) in rows {
        std::fs::write(data.join("claim-policy.json"), text).unwrap();
        let err = fleetprov_emulator::Emulator::start(fleetprov_emulator::Config::new(&data))
            .unwrap_err();
        assert!(
            err.contains("claim-policy.json") && err.contains(want),
            "{text}: {err}"
        );
    }
}

/// Provisions through `template` over a claim connection: (thing name, cert PEM, key PEM).
async fn provision_with(env: &Env, template: &str, thing: &str) -> (String, String) {
    let mut claim = env
        .claim_client(Version::V4, &format!("claim-{thing}"))
        .await;
    let (_, pem, key, token) = create_certificate(&mut claim, CertApi::Csr, JSON).await;
    let (ok, v) = claim
        .request(
            &register_topic(template, JSON),
            JSON,
            &enc(
                JSON,
                &json!({"certificateOwnershipToken": token, "parameters": {"ThingName": thing}}),
            ),
        )
        .await;
    assert!(ok, "RegisterThing: {v}");
    (pem, key)
}

async fn device_connect(
    env: &Env,
    cert: &str,
    key: &str,
    version: Version,
    client_id: &str,
) -> Result<Client, Outcome> {
    let stream = tls(env, cert, key, &TlsOpts::default()).await.expect("TLS");
    connect_on(stream, version, client_id).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_certificates_get_the_policies_their_template_attaches() {
    let env = Env::start();
    // The policy AWS recommends for registered devices: thing policy variables, IsAttached.
    let device_policy = doc(vec![
        json!({"Effect": "Allow", "Action": "iot:Connect", "Resource": r("client", "${iot:Connection.Thing.ThingName}"),
               "Condition": {"Bool": {"iot:Connection.Thing.IsAttached": "true"}}}),
        statement(
            "Allow",
            &["iot:Publish", "iot:Receive"],
            &[r("topic", "things/${iot:Connection.Thing.ThingName}/*")],
        ),
        statement(
            "Allow",
            &["iot:Subscribe"],
            &[r(
                "topicfilter",
                "things/${iot:Connection.Thing.ThingName}/*",
            )],
        ),
    ]);
    let base = |resources: Value| {
        json!({
            "Parameters": {"ThingName": {"Type": "String"}, "AWS::IoT::Certificate::Id": {"Type": "String"}},
            "Resources": resources,
        })
    };
    let thing_and_cert = json!({
        "thing": {"Type": "AWS::IoT::Thing", "Properties": {"ThingName": {"Ref": "ThingName"}}},
        "certificate": {"Type": "AWS::IoT::Certificate", "Properties": {
            "CertificateId": {"Ref": "AWS::IoT::Certificate::Id"}, "Status": "Active"}},
    });
    let mut with_policy = thing_and_cert.clone();
    with_policy["policy"] =
        json!({"Type": "AWS::IoT::Policy", "Properties": {"PolicyDocument": device_policy}});
    env.write_template("ThingPolicy", &base(with_policy));
    env.write_template("NoPolicy", &base(thing_and_cert));

    let (cert, key) = provision_with(&env, "ThingPolicy", "sensor-1").await;
    for version in [Version::V4, Version::V5] {
        // Another client id: no thing of that name is attached, IsAttached is false.
        assert_eq!(
            device_connect(&env, &cert, &key, version, "sensor-2")
                .await
                .err(),
            Some(Outcome::ConnectRefused),
            "{version:?}"
        );
        let mut c = device_connect(&env, &cert, &key, version, "sensor-1")
            .await
            .expect("the thing's own client id connects");
        assert_eq!(
            c.subscribe(&[("things/sensor-1/cmd", 1), ("things/sensor-2/cmd", 1)])
                .await,
            vec![Ok(1), Err(if version == Version::V5 { 0x87 } else { 0x80 })]
        );
        c.publish("things/sensor-1/cmd", Bytes::from_static(b"x"), 1)
            .await;
        let (topic, _) = c.next_publish().await;
        assert_eq!(topic, "things/sensor-1/cmd");
        c.publish("things/sensor-2/cmd", Bytes::from_static(b"x"), 1)
            .await;
        if version == Version::V5 {
            // MQTT 5: PUBACK 0x87, the connection stays; a denied QoS 0 PUBLISH ends it.
            assert!(matches!(
                c.recv(WAIT).await,
                Recv::Packet(Packet::PubAck { reason: 0x87, .. })
            ));
            c.publish("things/sensor-2/cmd", Bytes::from_static(b"x"), 0)
                .await;
        }
        assert_eq!(
            c.expect_closed().await,
            (version == Version::V5).then_some(0x87),
            "{version:?}: a denied publish ends the connection"
        );
    }
    // A certificate without any policy may not even connect, as on AWS.
    let (cert, key) = provision_with(&env, "NoPolicy", "bare-1").await;
    assert_eq!(
        device_connect(&env, &cert, &key, Version::V4, "bare-1")
            .await
            .err(),
        Some(Outcome::ConnectRefused)
    );
}
