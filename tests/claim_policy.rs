//! The library against a claim policy that lacks one permission, as the emulator enforces IoT
//! policies like AWS IoT Core: provisioning fails, and the error names the step and the topic the
//! policy denied, so the fix (the policy statement to add) can be read off the message.

mod common;

use fleetprov::engine::retry::RetryPolicy;
use fleetprov::keys::KeyType;
use fleetprov::protocol::{Format, MqttPacket};
use fleetprov::provision::{self, Hooks};
use fleetprov::{Error, Method, MqttVersion, Request};
use serde_json::{json, Value};

const ARN: &str = "arn:aws:iot:us-east-1:123456789012";

fn set_claim_policy(env: &common::Env, statements: Value) {
    let doc = json!({"Version": "2012-10-17", "Statement": statements});
    std::fs::write(
        &env.emu.paths().claim_policy,
        serde_json::to_vec_pretty(&doc).unwrap(),
    )
    .unwrap();
}

fn request(env: &common::Env, method: Method, version: MqttVersion) -> Request {
    let mut connection = common::connection(&env.emu, Format::Json);
    connection.mqtt_version = version;
    let mut r = Request::new(connection, "DemoTemplate", method);
    r.parameters
        .insert("SerialNumber".into(), "policy-1".into());
    // A denied publish costs the connection; retrying cannot help and only slows the test.
    r.retry = RetryPolicy::none();
    r
}

#[test]
fn a_claim_policy_lacking_one_permission_fails_naming_the_step_and_the_topic() {
    let env = common::env("claim_policy", "lacking", &[]);
    let csr = || Method::Csr(KeyType::P256);
    // (what the policy lacks, its statements, the method, what the error must say)
    let rows: Vec<(&str, Value, Method, Vec<&str>)> = vec![
        (
            // Over MQTT 5 a CONNACK says so; over 3.1.1 the connection just closes.
            "iot:Connect",
            json!([
                {"Effect": "Allow", "Action": ["iot:Publish", "iot:Subscribe", "iot:Receive"], "Resource": "*"},
            ]),
            csr(),
            vec![],
        ),
        (
            // AWS's documented claim policy as it is: no CreateCertificateFromCsr topics.
            "the CSR topics (AWS's documented claim policy unchanged)",
            json!([
                {"Effect": "Allow", "Action": ["iot:Connect"], "Resource": "*"},
                {"Effect": "Allow", "Action": ["iot:Publish", "iot:Receive"], "Resource": [
                    format!("{ARN}:topic/$aws/certificates/create/*"),
                    format!("{ARN}:topic/$aws/provisioning-templates/DemoTemplate/provision/*")]},
                {"Effect": "Allow", "Action": "iot:Subscribe", "Resource": [
                    format!("{ARN}:topicfilter/$aws/certificates/create/*"),
                    format!("{ARN}:topicfilter/$aws/provisioning-templates/DemoTemplate/provision/*")]},
            ]),
            csr(),
            vec![
                "subscription",
                "$aws/certificates/create-from-csr/json/accepted",
            ],
        ),
        (
            "iot:Subscribe on the RegisterThing replies",
            json!([
                {"Effect": "Allow", "Action": ["iot:Connect", "iot:Publish", "iot:Receive"], "Resource": "*"},
                {"Effect": "Allow", "Action": "iot:Subscribe", "Resource":
                    format!("{ARN}:topicfilter/$aws/certificates/*")},
            ]),
            Method::CreateKeys,
            vec![
                "subscription",
                "$aws/provisioning-templates/DemoTemplate/provision/json/",
            ],
        ),
        (
            "iot:Publish on the CreateCertificateFromCsr request",
            json!([
                {"Effect": "Allow", "Action": ["iot:Connect", "iot:Subscribe", "iot:Receive"], "Resource": "*"},
                {"Effect": "Allow", "Action": "iot:Publish", "Resource":
                    format!("{ARN}:topic/$aws/provisioning-templates/*")},
            ]),
            csr(),
            vec![
                "creating the certificate",
                "$aws/certificates/create-from-csr/json",
            ],
        ),
        (
            "iot:Publish on the RegisterThing request",
            json!([
                {"Effect": "Allow", "Action": ["iot:Connect", "iot:Subscribe", "iot:Receive"], "Resource": "*"},
                {"Effect": "Allow", "Action": "iot:Publish", "Resource":
                    format!("{ARN}:topic/$aws/certificates/*")},
            ]),
            Method::CreateKeys,
            vec![
                "registering the thing",
                "$aws/provisioning-templates/DemoTemplate/provision/json",
            ],
        ),
    ];
    for (version, (lacks, statements, method, want)) in [MqttVersion::V5, MqttVersion::V311]
        .into_iter()
        .flat_map(|v| rows.iter().map(move |row| (v, row)))
    {
        set_claim_policy(&env, statements.clone());
        let err = provision::provision(&request(&env, method.clone(), version), &Hooks::default())
            .expect_err(lacks);
        let text = err.to_string();
        for w in want {
            assert!(
                text.contains(w),
                "{version:?}, lacking {lacks}: {w:?} not in {text:?} ({err:?})"
            );
        }
        match (version, &err) {
            // MQTT 5: the server says why, with reason code 0x87 (not authorized).
            (MqttVersion::V5, Error::Refused(r)) => {
                assert_eq!(r.reason_code, 0x87, "{lacks}: {err:?}");
                assert!(!err.is_retryable(), "{lacks}: {err:?}");
                let action = match r.packet {
                    MqttPacket::ConnAck => {
                        "CONNACK reason code 0x87 (not authorized): the \
                                            certificate's policy does not allow iot:Connect"
                    }
                    MqttPacket::PubAck => {
                        "PUBACK reason code 0x87 (not authorized): the \
                                           policy does not allow iot:Publish"
                    }
                    other => panic!("{lacks}: {other:?}"),
                };
                assert!(text.contains(action), "{lacks}: {text}");
            }
            (MqttVersion::V5, Error::SubscribeFailed(_)) => {
                assert!(
                    text.contains("SUBACK code 0x87, not authorized"),
                    "{lacks}: {text}"
                );
                assert!(text.contains("iot:Subscribe"), "{lacks}: {text}");
            }
            // MQTT 3.1.1: SUBACK 0x80, or the connection closed.
            (MqttVersion::V311, Error::SubscribeFailed(_)) => {
                assert!(text.contains("SUBACK code 0x80"), "{lacks}: {text}");
            }
            (MqttVersion::V311, Error::Connection(_)) => {}
            _ => panic!("{version:?}, lacking {lacks}: {err:?}"),
        }
    }
    // With the default claim policy the same emulator provisions both ways.
    std::fs::remove_file(&env.emu.paths().claim_policy).unwrap();
    std::fs::write(
        &env.emu.paths().claim_policy,
        fleetprov_emulator::policy::default_claim_policy("us-east-1", "123456789012"),
    )
    .unwrap();
    for version in [MqttVersion::V5, MqttVersion::V311] {
        for method in [csr(), Method::CreateKeys] {
            provision::provision(&request(&env, method, version), &Hooks::default())
                .expect("default policy");
        }
    }
}
