//! The library against a claim policy that lacks one permission, as the emulator enforces IoT
//! policies like AWS IoT Core: provisioning fails, and the error names the step and the topic the
//! policy denied, so the fix (the policy statement to add) can be read off the message.

mod common;

use fleetprov::engine::retry::RetryPolicy;
use fleetprov::keys::KeyType;
use fleetprov::protocol::Format;
use fleetprov::provision::{self, Hooks};
use fleetprov::{Error, Method, Request};
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

fn request(env: &common::Env, method: Method) -> Request {
    let mut r = Request::new(
        common::connection(&env.emu, Format::Json),
        "DemoTemplate",
        method,
    );
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
    for (lacks, statements, method, want) in rows {
        set_claim_policy(&env, statements);
        let err = provision::provision(&request(&env, method), &Hooks::default()).expect_err(lacks);
        let text = err.to_string();
        for w in &want {
            assert!(
                text.contains(w),
                "lacking {lacks}: {w:?} not in {text:?} ({err:?})"
            );
        }
        assert!(
            matches!(err, Error::SubscribeFailed(_) | Error::Connection(_)),
            "lacking {lacks}: {err:?}"
        );
    }
    // With the default claim policy the same emulator provisions both ways.
    std::fs::remove_file(&env.emu.paths().claim_policy).unwrap();
    std::fs::write(
        &env.emu.paths().claim_policy,
        fleetprov_emulator::policy::default_claim_policy("us-east-1", "123456789012"),
    )
    .unwrap();
    for method in [csr(), Method::CreateKeys] {
        provision::provision(&request(&env, method), &Hooks::default()).expect("default policy");
    }
}
