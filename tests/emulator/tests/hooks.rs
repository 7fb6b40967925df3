//! Pre-provisioning hooks: templates in wrapper form naming a local command that receives AWS's
//! hook input on stdin and answers AWS's hook output on stdout.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use fleetprov_emulator::wire::{Packet, Version};
use fleetprov_emulator::Format;
use serde_json::{json, Value};

mod common;
use common::*;

const FORMATS: [Format; 2] = [Format::Json, Format::Cbor];
const ALLOW: &str = r#"{"allowProvisioning": true}"#;

/// The template body every hook test uses: thing `hook-<SerialNumber>` with the serial and
/// location as attributes, the location as device configuration.
fn body() -> Value {
    json!({
        "Parameters": {
            "SerialNumber": {"Type": "String"},
            "Location": {"Type": "String", "Default": "lab"}
        },
        "Resources": {
            "thing": {
                "Type": "AWS::IoT::Thing",
                "Properties": {
                    "ThingName": {"Fn::Join": ["", ["hook-", {"Ref": "SerialNumber"}]]},
                    "AttributePayload": {
                        "serial": {"Ref": "SerialNumber"},
                        "location": {"Ref": "Location"}
                    }
                }
            },
            "certificate": {
                "Type": "AWS::IoT::Certificate",
                "Properties": {
                    "CertificateId": {"Ref": "AWS::IoT::Certificate::Id"},
                    "Status": "Active"
                }
            }
        },
        "DeviceConfiguration": {"location": {"Ref": "Location"}}
    })
}

/// The template in wrapper form with a hook running `command`.
fn hooked(command: Vec<String>) -> Value {
    json!({"templateBody": body(), "preProvisioningHook": {"command": command}})
}

fn sh(script: &str) -> Vec<String> {
    vec!["/bin/sh".into(), "-c".into(), script.into()]
}

fn path_arg(p: &Path) -> String {
    p.to_str().expect("UTF-8 temp path").to_owned()
}

fn status_of(env: &Env, id: &str) -> String {
    env.certificate(id).expect("certificate in the registry")["status"]
        .as_str()
        .unwrap()
        .to_owned()
}

fn register_payload(format: Format, token: &str, params: &Value) -> Vec<u8> {
    enc(
        format,
        &json!({"certificateOwnershipToken": token, "parameters": params}),
    )
}

async fn register(
    c: &mut Client,
    template: &str,
    format: Format,
    token: &str,
    params: &Value,
) -> (bool, Value) {
    c.request(
        &register_topic(template, format),
        format,
        &register_payload(format, token, params),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hook_receives_aws_input_on_stdin() {
    let env = Env::start();
    let script = env.dir.path().join("record-hook.sh");
    std::fs::write(
        &script,
        format!("#!/bin/sh\ncat > \"$1\"\necho '{ALLOW}'\n"),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let (claim_pem, _) = env.claim();
    let claim_der = rustls::pki_types::pem::PemObject::from_pem_slice(claim_pem.as_bytes())
        .map(|c: rustls::pki_types::CertificateDer<'static>| c.to_vec())
        .unwrap();
    let claim_id = fleetprov_emulator::certificate_id(&claim_der);
    assert_eq!(env.certificate(&claim_id).unwrap()["status"], "ACTIVE");

    for format in FORMATS {
        let fmt = format_name(format);
        let template = format!("Record-{fmt}");
        let input_file = env.dir.path().join(format!("input-{fmt}.json"));
        env.write_template(
            &template,
            &hooked(vec![path_arg(&script), path_arg(&input_file)]),
        );
        let client_id = format!("hook-input-client-{fmt}");
        let mut c = env.claim_client(Version::V5, &client_id).await;
        let (id, pem, _, token) = create_certificate(&mut c, CertApi::Csr, format).await;
        let params = json!({"SerialNumber": format!("in-{fmt}"), "Location": "dock"});
        let (ok, reply) = register(&mut c, &template, format, &token, &params).await;
        assert!(ok, "{reply}");
        assert_eq!(reply["thingName"], json!(format!("hook-in-{fmt}")));

        let input: Value = serde_json::from_slice(&std::fs::read(&input_file).unwrap())
            .expect("the hook got JSON on stdin");
        assert_eq!(
            input,
            json!({
                "claimCertificateId": claim_id,
                "certificateId": id,
                "certificatePem": pem,
                "templateArn": format!(
                    "arn:aws:iot:us-east-1:123456789012:provisioningtemplate/{template}"
                ),
                "clientId": client_id,
                "parameters": params
            })
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowed_with_parameter_overrides_merged() {
    let env = Env::start();
    for format in FORMATS {
        let fmt = format_name(format);
        // (request parameters, the hook's parameterOverrides, thing name, attributes)
        let rows: Vec<(Value, Value, String, Value)> = vec![
            (
                json!({"SerialNumber": format!("orig-{fmt}"), "Location": "attic"}),
                json!({"SerialNumber": format!("over-{fmt}")}),
                format!("hook-over-{fmt}"),
                json!({"serial": format!("over-{fmt}"), "location": "attic"}),
            ),
            (
                json!({"SerialNumber": format!("loc-{fmt}")}),
                json!({"Location": "dock"}),
                format!("hook-loc-{fmt}"),
                json!({"serial": format!("loc-{fmt}"), "location": "dock"}),
            ),
            (
                json!({"SerialNumber": format!("none-{fmt}")}),
                json!({}),
                format!("hook-none-{fmt}"),
                json!({"serial": format!("none-{fmt}"), "location": "lab"}),
            ),
        ];
        let mut c = env
            .claim_client(Version::V4, &format!("overrides-{fmt}"))
            .await;
        for (i, (params, overrides, name, attributes)) in rows.into_iter().enumerate() {
            let template = format!("Override{i}-{fmt}");
            let answer = json!({"allowProvisioning": true, "parameterOverrides": overrides});
            env.write_template(
                &template,
                &hooked(sh(&format!("cat >/dev/null; echo '{answer}'"))),
            );
            let (id, _, _, token) = create_certificate(&mut c, CertApi::Csr, format).await;
            let (ok, reply) = register(&mut c, &template, format, &token, &params).await;
            assert!(ok, "{overrides}: {reply}");
            assert_eq!(
                reply,
                json!({
                    "thingName": name,
                    "deviceConfiguration": {"location": attributes["location"]}
                })
            );
            let thing = env.thing(&name).expect("the thing the overrides name");
            assert_eq!(thing["attributes"], attributes);
            assert_eq!(thing["certificates"], json!([id]));
            assert_eq!(status_of(&env, &id), "ACTIVE");
        }
        assert!(env.thing(&format!("hook-orig-{fmt}")).is_none());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusing_failing_or_slow_hooks_deny_without_consuming_the_token() {
    const HOOK_TIMEOUT: Duration = Duration::from_secs(1);
    let env = Env::start_with(|c| c.hook_timeout = HOOK_TIMEOUT);
    env.write_template("NoHook", &body());
    // (row, hook command, how the rejection's message starts after AWS's prefix)
    let rows: Vec<(&str, Vec<String>, &str)> = vec![
        (
            "denied",
            sh(r#"cat >/dev/null; echo '{"allowProvisioning": false}'"#),
            "the hook denied provisioning",
        ),
        (
            "non-zero exit",
            sh(&format!("cat >/dev/null; echo '{ALLOW}'; exit 3")),
            "the hook exited with exit status: 3",
        ),
        (
            "killed by SIGKILL",
            sh("kill -9 $$"),
            "the hook exited with signal: 9 (SIGKILL)",
        ),
        (
            "garbage output",
            sh("cat >/dev/null; echo 'allow, please {'"),
            "the hook's output is not JSON",
        ),
        (
            "no verdict",
            sh(r#"cat >/dev/null; echo '{"parameterOverrides": {}}'"#),
            "the hook's output has no boolean allowProvisioning",
        ),
        (
            "override not a string",
            sh(
                r#"cat >/dev/null; echo '{"allowProvisioning": true, "parameterOverrides": {"Location": 1}}'"#,
            ),
            "the hook's parameterOverrides.Location is not a string",
        ),
        (
            "program missing",
            vec!["/nonexistent/fleetprov-hook".into()],
            "the hook could not start",
        ),
        (
            "slower than the hook timeout",
            // exec: the emulator's kill on timeout reaches the sleep itself.
            sh("cat >/dev/null; exec sleep 30"),
            "the hook did not answer within 1s",
        ),
    ];
    for (i, (_, command, _)) in rows.iter().enumerate() {
        env.write_template(&format!("Deny{i}"), &hooked(command.clone()));
    }
    for format in FORMATS {
        let fmt = format_name(format);
        let mut c = env.claim_client(Version::V5, &format!("deny-{fmt}")).await;
        let (id, _, _, token) = create_certificate(&mut c, CertApi::Csr, format).await;
        let params = json!({"SerialNumber": format!("deny-{fmt}")});
        for (i, (row, _, why)) in rows.iter().enumerate() {
            let started = Instant::now();
            let (ok, reply) = register(&mut c, &format!("Deny{i}"), format, &token, &params).await;
            assert!(!ok, "{row}: {reply}");
            assert_eq!(
                (&reply["statusCode"], &reply["errorCode"]),
                (&json!(403), &json!("AccessDenied")),
                "{row} ({fmt}): {reply}"
            );
            let message = reply["errorMessage"].as_str().unwrap();
            assert!(
                message.starts_with(&format!(
                    "The pre-provisioning hook rejected the request: {why}"
                )),
                "{row} ({fmt}): {message}"
            );
            if why.contains("did not answer") {
                assert!(
                    started.elapsed() >= HOOK_TIMEOUT,
                    "{row}: waited the timeout"
                );
            }
            assert_eq!(status_of(&env, &id), "PENDING_ACTIVATION", "{row}");
            assert!(env.thing(&format!("hook-deny-{fmt}")).is_none(), "{row}");
        }
        // The token still works with a template without hook.
        let (ok, reply) = register(&mut c, "NoHook", format, &token, &params).await;
        assert!(ok, "{reply}");
        assert_eq!(reply["thingName"], json!(format!("hook-deny-{fmt}")));
        assert_eq!(status_of(&env, &id), "ACTIVE");
    }
}

/// Asserts that nothing but PUBACKs arrives on `c` for a moment.
async fn assert_no_reply_yet(c: &mut Client) {
    for _ in 0..10 {
        match c.recv(Duration::from_millis(100)).await {
            Recv::Packet(Packet::PubAck { .. }) => {}
            Recv::Timeout => return,
            other => panic!("expected no reply yet, got {other:?}"),
        }
    }
    panic!("a stream of packets instead of silence");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_hook_does_not_block_other_connections() {
    // The hook waits for the test's go (or the timeout): no timing is involved.
    let env = Env::start_with(|c| c.hook_timeout = WAIT);
    env.write_template("NoHook", &body());
    let waiting_hook = r#"cat >/dev/null
: > "$1"
i=0
while [ ! -e "$2" ] && [ "$i" -lt 600 ]; do sleep 0.05; i=$((i + 1)); done
echo '{"allowProvisioning": true}'"#;
    for format in FORMATS {
        let fmt = format_name(format);
        let started = env.dir.path().join(format!("started-{fmt}"));
        let release = env.dir.path().join(format!("release-{fmt}"));
        let template = format!("Waiting-{fmt}");
        let mut command = sh(waiting_hook);
        command.extend(["hook".into(), path_arg(&started), path_arg(&release)]);
        env.write_template(&template, &hooked(command));

        let mut slow = env.claim_client(Version::V5, &format!("slow-{fmt}")).await;
        let (slow_id, _, _, slow_token) = create_certificate(&mut slow, CertApi::Csr, format).await;
        let topic = register_topic(&template, format);
        slow.subscribe(&[
            (&format!("{topic}/accepted"), 1),
            (&format!("{topic}/rejected"), 1),
        ])
        .await;
        let params = json!({"SerialNumber": format!("slow-{fmt}")});
        slow.publish(&topic, register_payload(format, &slow_token, &params), 1)
            .await;
        let deadline = Instant::now() + WAIT;
        while !started.exists() {
            assert!(Instant::now() < deadline, "the hook did not start");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }

        // While the hook runs, another device goes through all three APIs.
        let mut other = env.claim_client(Version::V4, &format!("other-{fmt}")).await;
        let (other_id, _, _, _) = create_certificate(&mut other, CertApi::Keys, format).await;
        assert_eq!(status_of(&env, &other_id), "PENDING_ACTIVATION");
        let (other_id, _, _, other_token) =
            create_certificate(&mut other, CertApi::Csr, format).await;
        let (ok, reply) = register(
            &mut other,
            "NoHook",
            format,
            &other_token,
            &json!({"SerialNumber": format!("other-{fmt}")}),
        )
        .await;
        assert!(ok, "{reply}");
        assert_eq!(status_of(&env, &other_id), "ACTIVE");

        assert_no_reply_yet(&mut slow).await;
        assert_eq!(status_of(&env, &slow_id), "PENDING_ACTIVATION");
        std::fs::write(&release, b"").unwrap();
        let (reply_topic, body) = slow.next_publish().await;
        assert_eq!(
            reply_topic,
            format!("{topic}/accepted"),
            "{:?}",
            fleetprov_emulator::decode(format, &body)
        );
        assert_eq!(status_of(&env, &slow_id), "ACTIVE");
        assert!(env.thing(&format!("hook-slow-{fmt}")).is_some());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lambda_hooks_of_described_templates_run_the_mapped_command() {
    const ARN: &str = "arn:aws:lambda:us-east-1:123456789012:function:check-serial";
    let deny = sh("echo '{\"allowProvisioning\": false}'");
    let env = Env::start_with(|c| c.hook_commands = vec![(ARN.to_owned(), deny)]);
    // As `aws iot describe-provisioning-template` prints it: the body as an escaped string.
    let described = |arn: &str| {
        json!({
            "templateArn": "arn:aws:iot:us-east-1:123456789012:provisioningtemplate/T",
            "templateName": "T",
            "templateBody": body().to_string(),
            "enabled": true,
            "provisioningRoleArn": "arn:aws:iam::123456789012:role/provisioning",
            "preProvisioningHook": {"targetArn": arn, "payloadVersion": "2020-04-01"},
            "type": "FLEET_PROVISIONING"
        })
    };
    env.write_template("Described", &described(ARN));
    env.write_template(
        "Unmapped",
        &described("arn:aws:lambda:us-east-1:123456789012:function:other"),
    );
    let mut c = env.claim_client(Version::V4, "described").await;
    let params = json!({"SerialNumber": "lambda-1"});
    let (_, _, _, token) = create_certificate(&mut c, CertApi::Csr, Format::Json).await;
    let (ok, reply) = register(&mut c, "Described", Format::Json, &token, &params).await;
    assert!(!ok);
    assert_eq!(
        (reply["statusCode"].clone(), reply["errorCode"].clone()),
        (json!(403), json!("AccessDenied")),
        "{reply}"
    );
    let (ok, reply) = register(&mut c, "Unmapped", Format::Json, &token, &params).await;
    assert!(!ok);
    assert_eq!(reply["errorCode"], json!("InvalidTemplate"), "{reply}");
    assert!(
        reply["errorMessage"]
            .as_str()
            .unwrap()
            .contains("--hook-command"),
        "{reply}"
    );
}
