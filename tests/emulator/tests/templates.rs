//! RegisterThing against provisioning templates written into the data directory: parameters,
//! mappings, intrinsic functions, the thing, certificate and policy resources, OverrideSettings
//! on re-provisioning, DeviceConfiguration, template errors and the shipped DemoTemplate.
//! Every outcome is checked in the reply and in the registry.

use fleetprov_emulator::wire::{Packet, Version};
use fleetprov_emulator::Format;
use serde_json::{json, Value};

mod common;
use common::*;

const FORMATS: [Format; 2] = [Format::Json, Format::Cbor];
const IP: &str = "InvalidParameters";
const IR: &str = "InvalidRequest";
const IT: &str = "InvalidTemplate";

/// A claim connection that makes certificates from CSRs and registers them.
struct Device {
    c: Client,
    format: Format,
}

impl Device {
    async fn new(env: &Env, format: Format, tag: &str) -> Device {
        let client_id = format!("{tag}-{}", format_name(format));
        Device {
            c: env.claim_client(Version::V5, &client_id).await,
            format,
        }
    }

    /// A new PENDING certificate: (id, ownership token).
    async fn certificate(&mut self) -> (String, String) {
        let (id, _, _, token) = create_certificate(&mut self.c, CertApi::Csr, self.format).await;
        (id, token)
    }

    async fn register(&mut self, template: &str, token: &str, params: &Value) -> (bool, Value) {
        let mut request = json!({"certificateOwnershipToken": token});
        if !params.is_null() {
            request["parameters"] = params.clone();
        }
        let topic = register_topic(template, self.format);
        let reply = self
            .c
            .request(&topic, self.format, &enc(self.format, &request))
            .await;
        // As the official SDKs do between operations: a connection holds at most 50
        // subscriptions.
        let pkid = self.c.pkid();
        self.c
            .send(&Packet::Unsubscribe {
                pkid,
                filters: vec![format!("{topic}/accepted"), format!("{topic}/rejected")],
            })
            .await;
        assert!(matches!(self.c.next().await, Packet::UnsubAck { .. }));
        reply
    }

    /// A new certificate registered against `template`: (id, accepted, reply).
    async fn provision(&mut self, template: &str, params: &Value) -> (String, bool, Value) {
        let (id, token) = self.certificate().await;
        let (ok, reply) = self.register(template, &token, params).await;
        (id, ok, reply)
    }
}

fn certificate_resource() -> Value {
    json!({
        "Type": "AWS::IoT::Certificate",
        "Properties": {"CertificateId": {"Ref": "AWS::IoT::Certificate::Id"}, "Status": "Active"}
    })
}

fn status_of(env: &Env, id: &str) -> String {
    env.certificate(id).expect("certificate in the registry")["status"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// The reply is a 400..409 rejection with `code` whose message contains `fragment`.
#[track_caller]
fn assert_rejected(reply: &Value, status: u16, code: &str, fragment: &str, row: &str) {
    assert_eq!(
        (&reply["statusCode"], &reply["errorCode"]),
        (&json!(status), &json!(code)),
        "{row}: {reply}"
    );
    let message = reply["errorMessage"].as_str().unwrap();
    assert!(
        message.contains(fragment),
        "{row}: {message:?} lacks {fragment:?}"
    );
}

/// Rows expect either the value in the registry/reply, or a rejection (status, code, fragment).
type Outcome<T> = Result<T, (u16, &'static str, &'static str)>;

/// A table row: what it is, its input (parameters or a template), its expected outcome.
type Row<T> = (&'static str, Value, Outcome<T>);

// ---------------------------------------------------------------------------------------------
// Parameters, mappings, intrinsic functions

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parameters_defaults_missing_and_extra() {
    let env = Env::start();
    env.write_template(
        "Params",
        &json!({
            "Parameters": {
                "SerialNumber": {"Type": "String"},
                "Location": {"Type": "String", "Default": "lab"},
                // Never used, yet without a default it needs a value.
                "Unused": {"Type": "String"}
            },
            "Resources": {
                "thing": {
                    "Type": "AWS::IoT::Thing",
                    "Properties": {
                        "ThingName": {"Ref": "SerialNumber"},
                        "AttributePayload": {"location": {"Ref": "Location"}}
                    }
                },
                "certificate": certificate_resource()
            },
            "DeviceConfiguration": {"location": {"Ref": "Location"}}
        }),
    );
    for format in FORMATS {
        let fmt = format_name(format);
        let mut dev = Device::new(&env, format, "params").await;
        let rows: Vec<Row<(String, &str)>> = vec![
            (
                "default used",
                json!({"SerialNumber": format!("p-default-{fmt}"), "Unused": ""}),
                Ok((format!("p-default-{fmt}"), "lab")),
            ),
            (
                "given value, extra parameters ignored",
                json!({"SerialNumber": format!("p-given-{fmt}"), "Location": "dock",
                       "Unused": "u", "Extra": "x", "not a name!": "y"}),
                Ok((format!("p-given-{fmt}"), "dock")),
            ),
            (
                "required parameter missing",
                json!({"Location": "dock"}),
                Err((400, IP, "Missing parameter: SerialNumber")),
            ),
            (
                "declared parameter unused and missing",
                json!({"SerialNumber": format!("p-unused-{fmt}")}),
                Err((400, IP, "Missing parameter: Unused")),
            ),
            (
                "parameter key too long",
                json!({"SerialNumber": format!("p-key-{fmt}"), "Unused": "u",
                       "k".repeat(2049): "v"}),
                Err((400, IP, "")),
            ),
            (
                "parameter value too long",
                json!({"SerialNumber": format!("p-value-{fmt}"), "Unused": "u",
                       "Location": "v".repeat(4097)}),
                Err((400, IP, "")),
            ),
            (
                "longest key and value",
                json!({"SerialNumber": format!("p-long-{fmt}"), "Unused": "u",
                       "Extra": "v".repeat(4096), "k".repeat(2048): "v"}),
                Ok((format!("p-long-{fmt}"), "lab")),
            ),
            (
                "no parameters at all",
                Value::Null,
                Err((400, IP, "Missing parameter: SerialNumber")),
            ),
        ];
        for (row, params, want) in rows {
            let (id, ok, reply) = dev.provision("Params", &params).await;
            match want {
                Ok((name, location)) => {
                    assert!(ok, "{row}: {reply}");
                    assert_eq!(
                        reply,
                        json!({"thingName": name, "deviceConfiguration": {"location": location}}),
                        "{row}"
                    );
                    let thing = env.thing(&name).unwrap();
                    assert_eq!(thing["attributes"], json!({"location": location}), "{row}");
                    assert_eq!(thing["certificates"], json!([id]));
                    assert_eq!(status_of(&env, &id), "ACTIVE");
                }
                Err((status, code, message)) => {
                    assert!(!ok);
                    let mut reply = reply;
                    if message.is_empty() {
                        // Size limits: the message is ours, and must not echo the value.
                        let text = reply["errorMessage"].take();
                        let text = text.as_str().unwrap_or_default();
                        assert!(text.contains("characters long"), "{row}: {text}");
                        assert!(!text.contains("vvvvvvvv"), "{row}: {text}");
                        reply["errorMessage"] = json!("");
                    }
                    assert_eq!(
                        reply,
                        json!({"statusCode": status, "errorCode": code, "errorMessage": message}),
                        "{row}"
                    );
                    assert_eq!(status_of(&env, &id), "PENDING_ACTIVATION");
                }
            }
        }
    }
    // Only the accepted rows (three per format) made things.
    assert_eq!(
        env.emu.registry().unwrap()["things"]
            .as_array()
            .unwrap()
            .len(),
        6
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mappings_read_with_find_in_map() {
    let env = Env::start();
    env.write_resources(&json!({"thingGroups": ["lab-a", "lab-b", "line-1"]}));
    let url = json!({"Fn::FindInMap": ["Sites", {"Ref": "Site"}, "Url"]});
    let groups = json!({"Fn::FindInMap": ["Sites", {"Ref": "Site"}, "Groups"]});
    env.write_template(
        "Mapped",
        &json!({
            "Parameters": {
                "SerialNumber": {"Type": "String"},
                "Site": {"Type": "String", "Default": "lab"}
            },
            "Mappings": {
                "Sites": {
                    "lab": {"Url": "https://lab.example.com", "Groups": ["lab-a", "lab-b"]},
                    "factory": {"Url": "https://factory.example.com", "Groups": ["line-1"]}
                }
            },
            "Resources": {
                "thing": {
                    "Type": "AWS::IoT::Thing",
                    "Properties": {
                        "ThingName": {"Ref": "SerialNumber"},
                        "AttributePayload": {"url": url},
                        "ThingGroups": groups
                    }
                },
                "certificate": certificate_resource()
            },
            "DeviceConfiguration": {"url": url, "firstGroup": {"Fn::Select": [0, groups]}}
        }),
    );
    for format in FORMATS {
        let fmt = format_name(format);
        let mut dev = Device::new(&env, format, "mapped").await;
        type Want = (&'static str, Value);
        let rows: Vec<(Option<&str>, Outcome<Want>)> = vec![
            (
                None,
                Ok(("https://lab.example.com", json!(["lab-a", "lab-b"]))),
            ),
            (
                Some("factory"),
                Ok(("https://factory.example.com", json!(["line-1"]))),
            ),
            (
                Some("moon"),
                Err((400, IR, "Fn::FindInMap: mapping 'Sites' has no key 'moon'")),
            ),
        ];
        for (site, want) in rows {
            let serial = format!("map-{}-{fmt}", site.unwrap_or("default"));
            let mut params = json!({"SerialNumber": serial});
            if let Some(site) = site {
                params["Site"] = json!(site);
            }
            let (id, ok, reply) = dev.provision("Mapped", &params).await;
            let row = format!("{site:?} {fmt}");
            match want {
                Ok((url, groups)) => {
                    assert!(ok, "{row}: {reply}");
                    assert_eq!(
                        reply["deviceConfiguration"],
                        json!({"url": url, "firstGroup": groups[0]}),
                        "{row}"
                    );
                    let thing = env.thing(&serial).unwrap();
                    assert_eq!(thing["attributes"], json!({"url": url}), "{row}");
                    assert_eq!(thing["groups"], groups, "{row}");
                }
                Err((status, code, fragment)) => {
                    assert!(!ok);
                    assert_rejected(&reply, status, code, fragment, &row);
                    assert_eq!(status_of(&env, &id), "PENDING_ACTIVATION");
                    assert!(env.thing(&serial).is_none());
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn intrinsic_functions_and_their_nesting() {
    let env = Env::start();
    env.write_template(
        "Intrinsics",
        &json!({
            "Parameters": {
                "SerialNumber": {"Type": "String"},
                "Csv": {"Type": "String", "Default": "a,b,c"},
                "Index": {"Type": "String", "Default": "2"}
            },
            "Mappings": {"M": {"k": {"v": "mapped", "list": ["l0", "l1", "l2"]}}},
            "Resources": {
                "thing": {
                    "Type": "AWS::IoT::Thing",
                    "Properties": {
                        "ThingName": {"Fn::Sub": "int-${SerialNumber}"},
                        "AttributePayload": {
                            "joined": {"Fn::Join": [":", [{"Ref": "SerialNumber"}, "x"]]}
                        }
                    }
                },
                "certificate": certificate_resource()
            },
            "DeviceConfiguration": {
                "ref": {"Ref": "SerialNumber"},
                "certId": {"Ref": "AWS::IoT::Certificate::Id"},
                "join": {"Fn::Join": ["-", ["x", {"Ref": "SerialNumber"}, "y"]]},
                "joinEmpty": {"Fn::Join": ["", []]},
                "select": {"Fn::Select": [1, ["zero", "one", "two"]]},
                "selectTextIndex": {"Fn::Select": ["2", {"Fn::Split": [",", {"Ref": "Csv"}]}]},
                "split": {"Fn::Join": ["|", {"Fn::Split": [",", {"Ref": "Csv"}]}]},
                "subText": {"Fn::Sub": "dev/${SerialNumber}/${AWS::IoT::Certificate::Id}"},
                "subList": {"Fn::Sub": [
                    "${Greeting}, ${SerialNumber}! ${!Literal}",
                    {"Greeting": {"Fn::Select": [0, ["hello"]]}}
                ]},
                "nested": {"Fn::Join": ["/", [
                    {"Fn::Select": [1, {"Fn::Split": ["-", {"Fn::Sub": [
                        "${A}-${SerialNumber}",
                        {"A": {"Fn::FindInMap": ["M", "k", "v"]}}
                    ]}]}]},
                    {"Fn::Select": [{"Ref": "Index"}, {"Fn::FindInMap": ["M", "k", "list"]}]}
                ]]}
            }
        }),
    );
    for format in FORMATS {
        let serial = format!("int{}", format_name(format));
        let mut dev = Device::new(&env, format, "intrinsics").await;
        let (id, ok, reply) = dev
            .provision("Intrinsics", &json!({"SerialNumber": serial}))
            .await;
        assert!(ok, "{reply}");
        assert_eq!(
            reply,
            json!({
                "thingName": format!("int-{serial}"),
                "deviceConfiguration": {
                    "ref": serial,
                    "certId": id,
                    "join": format!("x-{serial}-y"),
                    "joinEmpty": "",
                    "select": "one",
                    "selectTextIndex": "c",
                    "split": "a|b|c",
                    "subText": format!("dev/{serial}/{id}"),
                    "subList": format!("hello, {serial}! ${{Literal}}"),
                    "nested": format!("{serial}/l2")
                }
            })
        );
        let thing = env.thing(&format!("int-{serial}")).unwrap();
        assert_eq!(
            thing["attributes"],
            json!({"joined": format!("{serial}:x")})
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Resources

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thing_resource_properties_reach_the_registry() {
    let env = Env::start();
    env.write_resources(&json!({"thingTypes": ["sensor"], "thingGroups": ["g1", "g2"], "billingGroups": ["billing-1"]}));
    env.write_template(
        "FullThing",
        &json!({
            "Parameters": {
                "SerialNumber": {"Type": "String"},
                "Group": {"Type": "String", "Default": "g2"}
            },
            "Resources": {
                "thing": {
                    "Type": "AWS::IoT::Thing",
                    "Properties": {
                        "ThingName": {"Fn::Join": ["", ["thing-", {"Ref": "SerialNumber"}]]},
                        "AttributePayload": {
                            "serial": {"Ref": "SerialNumber"},
                            "model": "m1",
                            "empty": ""
                        },
                        "ThingTypeName": "sensor",
                        "ThingGroups": ["g1", {"Ref": "Group"}, "g1"],
                        "BillingGroup": "billing-1"
                    }
                },
                "certificate": certificate_resource()
            }
        }),
    );
    env.write_template(
        "BareThing",
        &json!({
            "Parameters": {"SerialNumber": {"Type": "String"}},
            "Resources": {
                "thing": {
                    "Type": "AWS::IoT::Thing",
                    "Properties": {"ThingName": {"Ref": "SerialNumber"}}
                },
                "certificate": certificate_resource()
            }
        }),
    );
    for format in FORMATS {
        let fmt = format_name(format);
        let mut dev = Device::new(&env, format, "things").await;
        let serial = format!("full-{fmt}");
        let (id, ok, reply) = dev
            .provision("FullThing", &json!({"SerialNumber": serial}))
            .await;
        assert!(ok, "{reply}");
        let name = format!("thing-{serial}");
        assert_eq!(reply, json!({"thingName": name, "deviceConfiguration": {}}));
        assert_eq!(
            env.thing(&name).unwrap(),
            json!({
                "name": name,
                "attributes": {"serial": serial, "model": "m1", "empty": ""},
                "thingType": "sensor",
                "groups": ["g1", "g2"],
                "billingGroup": "billing-1",
                "certificates": [id]
            })
        );

        let name = format!("bare-{fmt}");
        let (id, ok, reply) = dev
            .provision("BareThing", &json!({"SerialNumber": name}))
            .await;
        assert!(ok, "{reply}");
        assert_eq!(
            env.thing(&name).unwrap(),
            json!({
                "name": name,
                "attributes": {},
                "thingType": null,
                "groups": [],
                "billingGroup": null,
                "certificates": [id]
            })
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_resource_sets_the_status() {
    let env = Env::start();
    let cert = |status: Option<Value>| {
        let mut properties = json!({"CertificateId": {"Ref": "AWS::IoT::Certificate::Id"}});
        if let Some(s) = status {
            properties["Status"] = s;
        }
        Some(json!({"Type": "AWS::IoT::Certificate", "Properties": properties}))
    };
    // (row, certificate resource, extra parameters, expected status)
    let rows: Vec<(&str, Option<Value>, Value, Outcome<&str>)> = vec![
        (
            "Active",
            cert(Some(json!("Active"))),
            json!({}),
            Ok("ACTIVE"),
        ),
        (
            "Inactive",
            cert(Some(json!("Inactive"))),
            json!({}),
            Ok("INACTIVE"),
        ),
        (
            "from a parameter",
            cert(Some(json!({"Ref": "Status"}))),
            json!({"Status": "Inactive"}),
            Ok("INACTIVE"),
        ),
        (
            "no Status: AWS's default",
            cert(None),
            json!({}),
            Ok("ACTIVE"),
        ),
        (
            "no certificate resource: not activated",
            None,
            json!({}),
            Ok("PENDING_ACTIVATION"),
        ),
        (
            "unknown status",
            cert(Some(json!("Revoked"))),
            json!({}),
            Err((400, IR, "unsupported certificate status 'Revoked'")),
        ),
        (
            "another certificate's id",
            Some(json!({
                "Type": "AWS::IoT::Certificate",
                "Properties": {"CertificateId": "0".repeat(64), "Status": "Active"}
            })),
            json!({}),
            Err((400, IR, "is not the certificate being registered")),
        ),
    ];
    for (i, (_, resource, _, _)) in rows.iter().enumerate() {
        let mut resources = json!({
            "thing": {"Type": "AWS::IoT::Thing", "Properties": {"ThingName": {"Ref": "SerialNumber"}}}
        });
        if let Some(r) = resource {
            resources["certificate"] = r.clone();
        }
        env.write_template(
            &format!("Status{i}"),
            &json!({
                "Parameters": {
                    "SerialNumber": {"Type": "String"},
                    // Every declared parameter needs a value: a default for the rows that do
                    // not give one.
                    "Status": {"Type": "String", "Default": "Active"}
                },
                "Resources": resources
            }),
        );
    }
    for format in FORMATS {
        let fmt = format_name(format);
        let mut dev = Device::new(&env, format, "status").await;
        for (i, (row, _, extra, want)) in rows.iter().enumerate() {
            let serial = format!("status{i}-{fmt}");
            let mut params = extra.clone();
            params["SerialNumber"] = json!(serial);
            let (id, ok, reply) = dev.provision(&format!("Status{i}"), &params).await;
            match want {
                Ok(status) => {
                    assert!(ok, "{row}: {reply}");
                    assert_eq!(status_of(&env, &id), *status, "{row}");
                    assert_eq!(env.thing(&serial).unwrap()["certificates"], json!([id]));
                }
                Err((status, code, fragment)) => {
                    assert!(!ok, "{row}");
                    assert_rejected(&reply, *status, code, fragment, row);
                    assert_eq!(status_of(&env, &id), "PENDING_ACTIVATION", "{row}");
                    assert!(env.thing(&serial).is_none(), "{row}");
                }
            }
        }
    }
}

fn sha256_hex(text: &str) -> String {
    ring::digest::digest(&ring::digest::SHA256, text.as_bytes())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_by_name_and_by_document() {
    let env = Env::start();
    let text_document = r#"{"Version":"2012-10-17","Statement":[]}"#;
    let device_policy = env.write_policy(
        "DevicePolicy",
        &json!({"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "iot:*", "Resource": "*"}]}),
    );
    // The JSON `aws iot get-policy` prints is taken as it is.
    let gold_policy = env.write_policy(
        "Policy-gold",
        &json!({"policyName": "Policy-gold", "defaultVersionId": "1", "policyDocument": text_document}),
    );
    env.write_template(
        "Policies",
        &json!({
            "Parameters": {
                "SerialNumber": {"Type": "String"},
                "Tier": {"Type": "String", "Default": "gold"}
            },
            "Resources": {
                "thing": {
                    "Type": "AWS::IoT::Thing",
                    "Properties": {"ThingName": {"Ref": "SerialNumber"}}
                },
                "certificate": certificate_resource(),
                "named": {"Type": "AWS::IoT::Policy", "Properties": {"PolicyName": "DevicePolicy"}},
                "namedBySub": {
                    "Type": "AWS::IoT::Policy",
                    "Properties": {"PolicyName": {"Fn::Sub": "Policy-${Tier}"}}
                },
                "inline": {
                    "Type": "AWS::IoT::Policy",
                    "Properties": {"PolicyDocument": {
                        "Version": "2012-10-17",
                        "Statement": [{"Resource": "*", "Effect": "Allow", "Action": "iot:Connect"}]
                    }}
                },
                "text": {"Type": "AWS::IoT::Policy", "Properties": {"PolicyDocument": text_document}}
            }
        }),
    );
    let mut ids = Vec::new();
    for format in FORMATS {
        let mut dev = Device::new(&env, format, "policies").await;
        let serial = format!("policies-{}", format_name(format));
        let (id, ok, reply) = dev
            .provision("Policies", &json!({"SerialNumber": serial}))
            .await;
        assert!(ok, "{reply}");
        ids.push(id);
    }
    ids.sort();
    // An inline document is stored as compact JSON with sorted keys, named by its SHA-256.
    let inline_document = r#"{"Statement":[{"Action":"iot:Connect","Effect":"Allow","Resource":"*"}],"Version":"2012-10-17"}"#;
    let mut want = vec![
        json!({"name": "DevicePolicy", "document": device_policy, "certificates": ids}),
        json!({"name": "Policy-gold", "document": gold_policy, "certificates": ids}),
        json!({"name": sha256_hex(inline_document), "document": inline_document, "certificates": ids}),
        json!({"name": sha256_hex(text_document), "document": text_document, "certificates": ids}),
    ];
    want.sort_by_key(|p| p["name"].as_str().unwrap().to_owned());
    let mut got = env.emu.registry().unwrap()["policies"]
        .as_array()
        .unwrap()
        .clone();
    for p in &mut got {
        let mut certs: Vec<String> =
            serde_json::from_value(p["certificates"].take()).expect("a list of ids");
        certs.sort();
        p["certificates"] = json!(certs);
    }
    assert_eq!(got, want, "each policy once, attached to both certificates");
}

// ---------------------------------------------------------------------------------------------
// OverrideSettings

fn override_body(
    attributes: Value,
    groups: &str,
    thing_type: &str,
    overrides: Option<Value>,
) -> Value {
    let mut thing = json!({
        "Type": "AWS::IoT::Thing",
        "Properties": {
            "ThingName": {"Ref": "SerialNumber"},
            "AttributePayload": attributes,
            "ThingGroups": [groups],
            "ThingTypeName": thing_type
        }
    });
    if let Some(o) = overrides {
        thing["OverrideSettings"] = o;
    }
    json!({
        "Parameters": {"SerialNumber": {"Type": "String"}},
        "Resources": {"thing": thing, "certificate": certificate_resource()}
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn override_settings_when_the_thing_exists() {
    let env = Env::start();
    env.write_resources(
        &json!({"thingTypes": ["t1", "t2"], "thingGroups": ["g1", "g2"], "billingGroups": ["b1"]}),
    );
    let first_attrs = json!({"serial": {"Ref": "SerialNumber"}, "color": "red"});
    let second_attrs = json!({"serial": {"Ref": "SerialNumber"}, "size": "big"});
    let mut base = override_body(first_attrs.clone(), "g1", "t1", None);
    base["Resources"]["thing"]["Properties"]["BillingGroup"] = json!("b1");
    env.write_template("OvBase", &base);
    let all =
        |rule: &str| json!({"AttributePayload": rule, "ThingGroups": rule, "ThingTypeName": rule});
    // (row, template of the second provisioning, expected thing: attributes (besides serial),
    // groups, type; or the rejection)
    type Want = (Value, Value, &'static str);
    let rows: Vec<Row<Want>> = vec![
        (
            "MERGE",
            override_body(
                second_attrs.clone(),
                "g2",
                "t2",
                Some(
                    json!({"AttributePayload": "MERGE", "ThingGroups": "MERGE", "ThingTypeName": "REPLACE"}),
                ),
            ),
            Ok((
                json!({"color": "red", "size": "big"}),
                json!(["g1", "g2"]),
                "t2",
            )),
        ),
        (
            "REPLACE",
            override_body(second_attrs.clone(), "g2", "t2", Some(all("REPLACE"))),
            Ok((json!({"size": "big"}), json!(["g2"]), "t2")),
        ),
        (
            "DO_NOTHING",
            override_body(second_attrs.clone(), "g2", "t2", Some(all("DO_NOTHING"))),
            Ok((json!({"color": "red"}), json!(["g1"]), "t1")),
        ),
        (
            "no OverrideSettings: attributes replaced, groups and type kept",
            override_body(second_attrs.clone(), "g2", "t2", None),
            Ok((json!({"size": "big"}), json!(["g1"]), "t1")),
        ),
        (
            "FAIL on attributes",
            override_body(
                second_attrs.clone(),
                "g1",
                "t1",
                Some(json!({"AttributePayload": "FAIL"})),
            ),
            Err((
                409,
                "ConflictingResourceUpdate",
                "exists with a different AttributePayload",
            )),
        ),
        (
            "FAIL on groups",
            override_body(
                first_attrs.clone(),
                "g2",
                "t1",
                Some(json!({"ThingGroups": "FAIL"})),
            ),
            Err((
                409,
                "ConflictingResourceUpdate",
                "exists with different ThingGroups",
            )),
        ),
        (
            "FAIL on type",
            override_body(
                first_attrs.clone(),
                "g1",
                "t2",
                Some(json!({"ThingTypeName": "FAIL"})),
            ),
            Err((
                409,
                "ConflictingResourceUpdate",
                "exists with a different ThingTypeName",
            )),
        ),
        (
            "FAIL without a change",
            override_body(first_attrs.clone(), "g1", "t1", Some(all("FAIL"))),
            Ok((json!({"color": "red"}), json!(["g1"]), "t1")),
        ),
    ];
    for (i, (_, body, _)) in rows.iter().enumerate() {
        env.write_template(&format!("Ov{i}"), body);
    }
    for format in FORMATS {
        let fmt = format_name(format);
        let mut dev = Device::new(&env, format, "override").await;
        for (i, (row, _, want)) in rows.iter().enumerate() {
            let serial = format!("ov{i}-{fmt}");
            let params = json!({"SerialNumber": serial});
            let (first, ok, reply) = dev.provision("OvBase", &params).await;
            assert!(ok, "{row}: {reply}");
            let before = env.thing(&serial).unwrap();
            assert_eq!(
                before["attributes"],
                json!({"serial": serial, "color": "red"})
            );

            let (second, token) = dev.certificate().await;
            let (ok, reply) = dev.register(&format!("Ov{i}"), &token, &params).await;
            match want {
                Ok((attrs, groups, thing_type)) => {
                    assert!(ok, "{row}: {reply}");
                    assert_eq!(reply["thingName"], json!(serial));
                    let mut attributes = attrs.clone();
                    attributes["serial"] = json!(serial);
                    let mut certificates = vec![first.clone(), second.clone()];
                    certificates.sort();
                    assert_eq!(
                        env.thing(&serial).unwrap(),
                        json!({
                            "name": serial,
                            "attributes": attributes,
                            "thingType": thing_type,
                            "groups": groups,
                            "billingGroup": "b1",
                            "certificates": certificates
                        }),
                        "{row} ({fmt})"
                    );
                    assert_eq!(status_of(&env, &second), "ACTIVE");
                }
                Err((status, code, fragment)) => {
                    assert!(!ok, "{row}");
                    assert_rejected(&reply, *status, code, fragment, row);
                    assert_eq!(
                        env.thing(&serial).unwrap(),
                        before,
                        "{row}: thing unchanged"
                    );
                    assert_eq!(status_of(&env, &second), "PENDING_ACTIVATION");
                    // The conflict did not consume the token.
                    let (ok, reply) = dev.register("Ov2", &token, &params).await;
                    assert!(ok, "{row}: retry with DO_NOTHING: {reply}");
                    assert_eq!(status_of(&env, &second), "ACTIVE");
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Errors

/// A template's file.
enum File {
    Absent,
    Json(Value),
    Raw(&'static str),
}

/// A valid template whose thing name is `name`.
fn named(name: Value) -> Value {
    json!({
        "Parameters": {"SerialNumber": {"Type": "String"}},
        "Mappings": {"M": {"k": {"v": "x"}}},
        "Resources": {
            "thing": {"Type": "AWS::IoT::Thing", "Properties": {"ThingName": name}},
            "certificate": certificate_resource()
        }
    })
}

fn with_resource(id: &str, resource: Value) -> Value {
    let mut body = named(json!({"Ref": "SerialNumber"}));
    body["Resources"][id] = resource;
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn template_errors() {
    use File::*;
    let env = Env::start();
    let good = named(json!({"Ref": "SerialNumber"}));
    env.write_template("Good", &good);
    let thing = |properties: Value| json!({"Type": "AWS::IoT::Thing", "Properties": properties});
    let rows: Vec<(&str, File, (u16, &str, &str))> = vec![
        (
            "NoSuchTemplate",
            Absent,
            (
                404,
                "ResourceNotFound",
                "The provisioning template NoSuchTemplate does not exist.",
            ),
        ),
        (
            "Disabled",
            Json(json!({"templateBody": good, "enabled": false})),
            (
                404,
                "ResourceNotFound",
                "The provisioning template Disabled is disabled.",
            ),
        ),
        (
            "DisabledText",
            Json(json!({"templateBody": good.to_string(), "enabled": false})),
            (
                404,
                "ResourceNotFound",
                "The provisioning template DisabledText is disabled.",
            ),
        ),
        (
            "BadJson",
            Raw(r#"{"Resources": {"#),
            (
                400,
                IT,
                "The provisioning template BadJson is invalid: template file is not valid JSON",
            ),
        ),
        ("NotAnObject", Raw("[]"), (400, IT, "must be a JSON object")),
        (
            "NoResources",
            Json(json!({"Parameters": {}})),
            (400, IT, "the template has no Resources section"),
        ),
        (
            "UnknownType",
            Json(with_resource("x", json!({"Type": "AWS::IoT::Whatever"}))),
            (400, IT, "unsupported resource Type 'AWS::IoT::Whatever'"),
        ),
        (
            "UnknownProperty",
            Json(with_resource(
                "thing",
                thing(json!({"ThingName": "a", "Color": "red"})),
            )),
            (400, IT, "unsupported property 'Color'"),
        ),
        (
            "TwoThings",
            Json(with_resource("thing2", thing(json!({"ThingName": "b"})))),
            (400, IT, "at most one AWS::IoT::Thing resource"),
        ),
        (
            "BadParameterType",
            Json(json!({"Parameters": {"N": {"Type": "Number"}}, "Resources": {}})),
            (400, IT, "unsupported Type 'Number'"),
        ),
        (
            "BadHook",
            Json(json!({"templateBody": good, "preProvisioningHook": {"command": []}})),
            (400, IT, "command must not be empty"),
        ),
        (
            "JoinNotAList",
            Json(named(json!({"Fn::Join": "abc"}))),
            (400, IR, "Fn::Join takes [delimiter, [values...]]"),
        ),
        (
            "SelectOneArgument",
            Json(named(json!({"Fn::Select": [0]}))),
            (400, IR, "Fn::Select takes [index, [values...]]"),
        ),
        (
            "SelectOutOfRange",
            Json(named(json!({"Fn::Select": [3, ["a", "b"]]}))),
            (
                400,
                IR,
                "Fn::Select index 3 is out of range for a list of 2 element(s)",
            ),
        ),
        (
            "SelectNegative",
            Json(named(json!({"Fn::Select": [-1, ["a"]]}))),
            (
                400,
                IR,
                "Fn::Select index must be a non-negative integer, found -1",
            ),
        ),
        (
            "SplitEmptyDelimiter",
            Json(named(json!({"Fn::Select": [0, {"Fn::Split": ["", "a"]}]}))),
            (400, IR, "Fn::Split delimiter must not be empty"),
        ),
        (
            "SubOneElement",
            Json(named(json!({"Fn::Sub": ["a"]}))),
            (400, IR, "Fn::Sub takes"),
        ),
        (
            "UnknownFunction",
            Json(named(json!({"Fn::If": ["c", "a", "b"]}))),
            (400, IR, "unsupported intrinsic function 'Fn::If'"),
        ),
        (
            "TwoKeyFunction",
            Json(named(json!({"Ref": "SerialNumber", "Fn::Join": ["", []]}))),
            (
                400,
                IR,
                "an intrinsic function object must have exactly one key",
            ),
        ),
        (
            "RefNotAName",
            Json(named(json!({"Ref": 1}))),
            (400, IR, "Ref takes a parameter name"),
        ),
        (
            "RefUndeclared",
            Json(named(json!({"Ref": "Nope"}))),
            (400, IP, "Cannot resolve reference value: Nope"),
        ),
        (
            "ListForText",
            Json(named(json!(["a", "b"]))),
            (400, IR, "expected a string, but the value is a list"),
        ),
        (
            "BadThingName",
            Json(named(json!("bad name!"))),
            (400, IR, "invalid thing name 'bad name!'"),
        ),
        (
            "FindInMapNoMap",
            Json(named(json!({"Fn::FindInMap": ["Nope", "k", "v"]}))),
            (400, IR, "Fn::FindInMap: no mapping named 'Nope'"),
        ),
        (
            "NestedDeviceConfiguration",
            Json({
                let mut body = good.clone();
                body["DeviceConfiguration"] = json!({"a": {"b": "c"}});
                body
            }),
            (
                400,
                IR,
                "DeviceConfiguration does not support nested objects",
            ),
        ),
    ];
    let templates = env.emu.paths().templates.clone();
    for (name, file, _) in &rows {
        let path = templates.join(format!("{name}.json"));
        match file {
            Absent => assert!(!path.exists()),
            Json(v) => env.write_template(name, v),
            Raw(text) => std::fs::write(&path, text).unwrap(),
        }
    }
    for format in FORMATS {
        let fmt = format_name(format);
        let mut dev = Device::new(&env, format, "errors").await;
        // One token for every row: a rejected RegisterThing does not consume it.
        let (id, token) = dev.certificate().await;
        let params = json!({"SerialNumber": format!("errors-{fmt}")});
        for (name, _, (status, code, fragment)) in &rows {
            let (ok, reply) = dev.register(name, &token, &params).await;
            assert!(!ok, "{name}: {reply}");
            assert_rejected(&reply, *status, code, fragment, &format!("{name} ({fmt})"));
            assert_eq!(status_of(&env, &id), "PENDING_ACTIVATION", "{name}");
        }
        assert!(env.thing(&format!("errors-{fmt}")).is_none());
        let (ok, reply) = dev.register("Good", &token, &params).await;
        assert!(ok, "the token survived every failed request: {reply}");
        assert_eq!(status_of(&env, &id), "ACTIVE");
    }
}

// ---------------------------------------------------------------------------------------------
// The shipped template

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_template_provisions_demo_things() {
    let env = Env::start();
    assert!(
        env.emu
            .paths()
            .templates
            .join("DemoTemplate.json")
            .is_file(),
        "shipped in the data directory"
    );
    for format in FORMATS {
        let serial = format!("D-{}", format_name(format));
        let name = format!("demo-{serial}");
        let mut dev = Device::new(&env, format, "demo").await;
        let (first, ok, reply) = dev
            .provision("DemoTemplate", &json!({"SerialNumber": serial}))
            .await;
        assert!(ok, "{reply}");
        assert_eq!(
            reply,
            json!({
                "thingName": name,
                "deviceConfiguration": {
                    "FallbackUrl": "https://www.example.com/fallback",
                    "LocationUrl": format!("https://lab.example.com/devices/{serial}")
                }
            })
        );
        assert_eq!(
            env.thing(&name).unwrap(),
            json!({
                "name": name,
                "attributes": {"serial": serial, "location": "lab"},
                "thingType": null,
                "groups": [],
                "billingGroup": null,
                "certificates": [first]
            })
        );
        assert_eq!(status_of(&env, &first), "ACTIVE");
        let policies = env.emu.registry().unwrap()["policies"].clone();
        let policy = policies
            .as_array()
            .unwrap()
            .iter()
            .find(|p| {
                p["certificates"]
                    .as_array()
                    .unwrap()
                    .contains(&json!(first))
            })
            .expect("a policy attached to the certificate");
        assert!(policy["document"].as_str().unwrap().contains("iot:Connect"));

        // Re-provisioning the same device elsewhere: attributes are merged.
        let (second, ok, reply) = dev
            .provision(
                "DemoTemplate",
                &json!({"SerialNumber": serial, "Location": "factory"}),
            )
            .await;
        assert!(ok, "{reply}");
        assert_eq!(
            reply["deviceConfiguration"]["LocationUrl"],
            json!(format!("https://factory.example.com/devices/{serial}"))
        );
        let thing = env.thing(&name).unwrap();
        assert_eq!(
            thing["attributes"],
            json!({"serial": serial, "location": "factory"})
        );
        let mut both = vec![first, second];
        both.sort();
        assert_eq!(thing["certificates"], json!(both));
    }
}

// ---------------------------------------------------------------------------------------------
// Resources that must exist beforehand

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn named_resources_must_exist_before_register_thing() {
    let env = Env::start();
    env.write_template(
        "Named",
        &json!({
            "Parameters": {
                "SerialNumber": {"Type": "String"},
                "Type": {"Type": "String", "Default": "sensor"},
                "Group": {"Type": "String", "Default": "fleet"},
                "Billing": {"Type": "String", "Default": "bill"},
                "Policy": {"Type": "String", "Default": "DevicePolicy"}
            },
            "Resources": {
                "thing": {
                    "Type": "AWS::IoT::Thing",
                    "Properties": {
                        "ThingName": {"Ref": "SerialNumber"},
                        "ThingTypeName": {"Ref": "Type"},
                        "ThingGroups": [{"Ref": "Group"}],
                        "BillingGroup": {"Ref": "Billing"}
                    }
                },
                "certificate": certificate_resource(),
                "policy": {"Type": "AWS::IoT::Policy", "Properties": {"PolicyName": {"Ref": "Policy"}}}
            }
        }),
    );
    // Nothing exists yet: the thing type is the first thing missing.
    let mut dev = Device::new(&env, Format::Json, "named").await;
    let (id, ok, reply) = dev
        .provision("Named", &json!({"SerialNumber": "n-0"}))
        .await;
    assert!(!ok);
    assert_rejected(
        &reply,
        404,
        "ResourceNotFound",
        "thing type sensor does not exist",
        "empty registry",
    );
    assert_eq!(status_of(&env, &id), "PENDING_ACTIVATION");

    env.write_resources(
        &json!({"thingTypes": ["sensor"], "thingGroups": ["fleet"], "billingGroups": ["bill"]}),
    );
    env.write_policy(
        "DevicePolicy",
        &json!({"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "iot:*", "Resource": "*"}]}),
    );
    let rows: Vec<(&str, Value, Option<&str>)> = vec![
        ("all exist", json!({}), None),
        (
            "thing type",
            json!({"Type": "actuator"}),
            Some("The thing type actuator does not exist."),
        ),
        (
            "thing group",
            json!({"Group": "elsewhere"}),
            Some("The thing group elsewhere does not exist."),
        ),
        (
            "billing group",
            json!({"Billing": "nobody"}),
            Some("The billing group nobody does not exist."),
        ),
        (
            "policy",
            json!({"Policy": "NoSuchPolicy"}),
            Some("The policy NoSuchPolicy does not exist."),
        ),
    ];
    for (i, (row, overrides, want)) in rows.into_iter().enumerate() {
        let serial = format!("n-{}", i + 1);
        let mut params = json!({"SerialNumber": serial});
        params
            .as_object_mut()
            .unwrap()
            .extend(overrides.as_object().unwrap().clone());
        let (id, ok, reply) = dev.provision("Named", &params).await;
        match want {
            None => {
                assert!(ok, "{row}: {reply}");
                let thing = env.thing(&serial).unwrap();
                assert_eq!(thing["thingType"], json!("sensor"), "{row}");
                assert_eq!(thing["groups"], json!(["fleet"]), "{row}");
                assert_eq!(thing["billingGroup"], json!("bill"), "{row}");
                assert_eq!(status_of(&env, &id), "ACTIVE", "{row}");
            }
            Some(message) => {
                assert!(!ok, "{row}");
                assert_eq!(
                    reply,
                    json!({"statusCode": 404, "errorCode": "ResourceNotFound", "errorMessage": message}),
                    "{row}"
                );
                assert!(env.thing(&serial).is_none(), "{row}: no thing is made");
                assert_eq!(status_of(&env, &id), "PENDING_ACTIVATION", "{row}");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn region_and_account_resolve_only_when_declared() {
    let env = Env::start();
    let body = |declare: bool| {
        let mut params = json!({"SerialNumber": {"Type": "String"}});
        if declare {
            params["AWS::Region"] = json!({"Type": "String", "Default": "eu-west-1"});
        }
        json!({
            "Parameters": params,
            "Resources": {
                "thing": {"Type": "AWS::IoT::Thing", "Properties": {
                    "ThingName": {"Ref": "SerialNumber"},
                    "AttributePayload": {"region": {"Ref": "AWS::Region"}}}},
                "certificate": certificate_resource()
            }
        })
    };
    env.write_template("Undeclared", &body(false));
    env.write_template("Declared", &body(true));
    let mut dev = Device::new(&env, Format::Json, "region").await;
    // As AWS answered in a real exchange.
    let (_, ok, reply) = dev
        .provision("Undeclared", &json!({"SerialNumber": "r-1"}))
        .await;
    assert!(!ok);
    assert_eq!(
        reply,
        json!({"statusCode": 400, "errorCode": "InvalidParameters",
               "errorMessage": "Cannot resolve reference value: AWS::Region"})
    );
    let (_, ok, reply) = dev
        .provision("Declared", &json!({"SerialNumber": "r-2"}))
        .await;
    assert!(ok, "{reply}");
    assert_eq!(
        env.thing("r-2").unwrap()["attributes"],
        json!({"region": "eu-west-1"})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attribute_and_group_limits() {
    let env = Env::start();
    env.write_resources(&json!({
        "thingTypes": ["typed"],
        "thingGroups": (0..11).map(|i| format!("g{i}")).collect::<Vec<_>>()
    }));
    let thing = |attrs: usize, typed: bool, groups: usize| {
        let mut props = json!({
            "ThingName": {"Ref": "SerialNumber"},
            "AttributePayload": (0..attrs).map(|i| (format!("a{i}"), json!("v"))).collect::<serde_json::Map<_, _>>(),
            "ThingGroups": (0..groups).map(|i| format!("g{i}")).collect::<Vec<_>>()
        });
        if typed {
            props["ThingTypeName"] = json!("typed");
        }
        json!({
            "Parameters": {"SerialNumber": {"Type": "String"}},
            "Resources": {"thing": {"Type": "AWS::IoT::Thing", "Properties": props},
                          "certificate": certificate_resource()}
        })
    };
    let rows: Vec<(&str, Value, Option<&str>)> = vec![
        ("3 attributes, no type", thing(3, false, 0), None),
        (
            "4 attributes, no type",
            thing(4, false, 0),
            Some("at most 3 attributes"),
        ),
        ("50 attributes with a type", thing(50, true, 0), None),
        (
            "51 attributes with a type",
            thing(51, true, 0),
            Some("at most 50 attributes"),
        ),
        ("10 groups", thing(0, false, 10), None),
        (
            "11 groups",
            thing(0, false, 11),
            Some("at most 10 thing groups"),
        ),
    ];
    let mut dev = Device::new(&env, Format::Json, "limits").await;
    for (i, (row, body, want)) in rows.into_iter().enumerate() {
        let name = format!("Limits{i}");
        env.write_template(&name, &body);
        let serial = format!("limit-{i}");
        let (_, ok, reply) = dev.provision(&name, &json!({"SerialNumber": serial})).await;
        match want {
            None => assert!(ok, "{row}: {reply}"),
            Some(fragment) => {
                assert!(!ok, "{row}");
                assert_rejected(&reply, 400, IR, fragment, row);
                assert!(env.thing(&serial).is_none(), "{row}");
            }
        }
    }
}
