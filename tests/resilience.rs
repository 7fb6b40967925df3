//! The fault matrix (issue 5): the one-call flow against the emulator's fault switches, over
//! real TLS on loopback. Every case must end with the device provisioned, exactly one ACTIVE
//! certificate for it, no certificate minted by a retry while a token was in hand, and the key
//! on disk matching the certificate (checked by connecting with the stored credentials).
//! Parts of it run again with the credentials and journal in a store of named blobs (the
//! firmware's own store) instead of files.

mod common;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::blobs::MemBlobs;
use fleetprov::engine::flow::Progress;
use fleetprov::engine::retry::RetryPolicy;
use fleetprov::engine::Step;
use fleetprov::keys::KeyType;
use fleetprov::protocol::{Format, MqttPacket};
use fleetprov::provision::Hooks;
use fleetprov::{Client, Error, Method, MqttVersion, Request, Secret};
use fleetprov_emulator::Emulator;
use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Api {
    Keys,
    Csr,
}

impl Api {
    fn rule(self) -> &'static str {
        match self {
            Api::Keys => "keys",
            Api::Csr => "csr",
        }
    }

    fn method(self) -> Method {
        match self {
            Api::Keys => Method::CreateKeys,
            Api::Csr => Method::Csr(KeyType::P256),
        }
    }
}

struct Case {
    /// Fault rule; `{api}` is replaced by the certificate API's filter.
    rule: &'static str,
    /// How many certificates may exist at the end: 1, or 2 when the first certificate's reply
    /// never reached the device (so it never had its token).
    certificates: usize,
    /// Whether the thing name may be unknown (RegisterThing's reply was lost after it was
    /// processed; the flow confirmed the registration by connecting).
    name_may_be_lost: bool,
}

const fn case(rule: &'static str, certificates: usize, name_may_be_lost: bool) -> Case {
    Case {
        rule,
        certificates,
        name_may_be_lost,
    }
}

/// The connection cut at each step; "after the request" both before and after the service
/// processed it.
const CUTS: &[Case] = &[
    case("close:connect*1", 1, false),
    case("close:suback*1", 1, false),
    case("close:request@{api}*1", 1, false),
    case("close:processed@{api}*1", 2, false),
    // The device may send RegisterThing between the certificate's reply and the cut, and the
    // service may process it (its reply is then lost with the connection): the flow confirms
    // the registration by connecting, without the thing name. Seen with a store that writes
    // the journal without fsync, so the request goes out sooner.
    case("close:reply@{api}*1", 1, true),
    case("close:request@register*1", 1, false),
    case("close:processed@register*1", 1, true),
    case("close:reply@register*1", 1, false),
];

/// Throttling and server errors, replies delayed past the step timeout, duplicates.
const OTHERS: &[Case] = &[
    case("reject:429@{api}*3", 1, false),
    case("reject:500@{api}*2", 1, false),
    case("reject:429@register*2", 1, false),
    case("reject:500@register*3", 1, false),
    case("reject:503*2", 1, false),
    case("delay:2000@{api}*1", 2, false),
    case("delay:2000@register*1", 1, true),
    case("duplicate@{api}", 1, false),
    case("duplicate@register", 1, false),
];

struct Run {
    result: Result<fleetprov::Provisioned, Error>,
    progress: Vec<Progress>,
    logs: Vec<String>,
    registry: Value,
    out: PathBuf,
    state: PathBuf,
    /// The blob store, when the run used one instead of files.
    blobs: Option<Arc<MemBlobs>>,
    emu: Emulator,
}

fn run(name: &str, api: Api, format: Format, rule: Option<&str>) -> Run {
    run_with(name, api, format, rule, None, MqttVersion::default())
}

fn run_with(
    name: &str,
    api: Api,
    format: Format,
    rule: Option<&str>,
    blobs: Option<Arc<MemBlobs>>,
    version: MqttVersion,
) -> Run {
    let dir = common::scratch("resilience", name);
    let emu = common::emulator(&dir, rule.as_slice());
    let mut connection = common::connection(&emu, format);
    connection.mqtt_version = version;
    let mut request = Request::new(connection, "DemoTemplate", api.method());
    request
        .parameters
        .insert("SerialNumber".into(), name.replace(['*', ':', '@'], "-"));
    match &blobs {
        Some(b) => request.storage = Some(b.shared()),
        None => {
            request.output_dir = Some(dir.join("out"));
            request.state_dir = Some(dir.join("state"));
        }
    }
    request.retry = RetryPolicy {
        max_attempts: 6,
        initial_backoff: Duration::from_millis(50),
        max_backoff: Duration::from_millis(200),
    };
    let progress = Arc::new(Mutex::new(Vec::new()));
    let logs = Arc::new(Mutex::new(Vec::new()));
    let (p, l) = (progress.clone(), logs.clone());
    let hooks = Hooks {
        progress: Some(Arc::new(move |x: &Progress| {
            p.lock().unwrap().push(x.clone())
        })),
        log: Some(Arc::new(move |_, line: &str| {
            l.lock().unwrap().push(line.to_owned())
        })),
        cancel: None,
    };
    let result = fleetprov::provision(&request, &hooks);
    let registry = emu.registry().expect("registry");
    let progress = progress.lock().unwrap().clone();
    let logs = logs.lock().unwrap().clone();
    Run {
        result,
        progress,
        logs,
        registry,
        out: dir.join("out"),
        state: dir.join("state"),
        blobs,
        emu,
    }
}

/// Everything a finished case must show.
fn check(what: &str, r: &Run, case: &Case) {
    let p = match &r.result {
        Ok(p) => p,
        Err(e) => panic!("{what}: not provisioned: {e}\nlogs: {:#?}", r.logs),
    };
    let device = common::device_certificates(&r.emu);
    let active: Vec<_> = device.iter().filter(|(_, s)| s == "ACTIVE").collect();
    assert_eq!(
        active.len(),
        1,
        "{what}: one ACTIVE certificate: {device:?}"
    );
    assert_eq!(active[0].0, p.certificate_id, "{what}");
    assert!(
        device.len() <= case.certificates,
        "{what}: {} certificates, at most {} expected: {device:?}\nlogs: {:#?}",
        device.len(),
        case.certificates,
        r.logs
    );
    for (id, status) in &device {
        if *id != p.certificate_id {
            assert_eq!(status, "PENDING_ACTIVATION", "{what}: {id}");
        }
    }
    // The thing holds exactly that certificate.
    let things = r.registry["things"].as_array().unwrap();
    assert_eq!(things.len(), 1, "{what}: {things:?}");
    assert_eq!(
        things[0]["certificates"],
        serde_json::json!([p.certificate_id]),
        "{what}"
    );
    let thing = things[0]["name"].as_str().unwrap();
    if !(case.name_may_be_lost && p.thing_name.is_empty()) {
        assert_eq!(p.thing_name, thing, "{what}");
    }
    // Stored, and the stored key goes with the certificate: the emulator admits a TLS client
    // only if it proves possession of the key of an ACTIVE certificate.
    let (cert, key) = match &r.blobs {
        Some(b) => {
            let meta: Value = serde_json::from_str(&b.text("device.json").expect("device.json"))
                .expect("device.json is JSON");
            assert_eq!(meta["certificateId"], p.certificate_id.as_str(), "{what}");
            assert!(
                b.text("journal").is_none(),
                "{what}: journal removed after the commit"
            );
            (
                b.text("certificate.pem").expect("certificate.pem"),
                b.text("private.key").expect("private.key"),
            )
        }
        None => {
            let stored = p.stored.as_ref().expect("stored");
            (
                std::fs::read_to_string(&stored.certificate).unwrap(),
                std::fs::read_to_string(&stored.private_key).unwrap(),
            )
        }
    };
    assert_eq!(cert, p.certificate_pem, "{what}");
    fleetprov::keys::certificate_matches_key(&cert, &key).expect("key matches");
    let mut c = common::connection(&r.emu, Format::Json);
    c.cert_pem = cert;
    c.key_pem = Secret::new(key);
    let mut client = Client::new(c).unwrap();
    client
        .connect()
        .unwrap_or_else(|e| panic!("{what}: stored credentials connect: {e}"));
    client.disconnect();
    assert!(
        !r.state.join("journal.json").exists(),
        "{what}: journal removed after the commit"
    );
}

fn matrix(api: Api, format: Format, cases: &[Case]) {
    matrix_in(api, format, cases, false, MqttVersion::default())
}

/// The matrix over `version`; with `blob_store`, each case keeps its journal and credentials
/// in a fresh store of named blobs.
fn matrix_in(api: Api, format: Format, cases: &[Case], blob_store: bool, version: MqttVersion) {
    for case in cases {
        let rule = case.rule.replace("{api}", api.rule());
        let name = format!("{api:?}-{format:?}-{rule}-{blob_store}-{version:?}");
        let blobs = blob_store.then(MemBlobs::new);
        let r = run_with(&name, api, format, Some(&rule), blobs, version);
        check(&name, &r, case);
        let p = r.result.as_ref().unwrap();
        // Every case here needs a second attempt and says so, except duplicates and cuts
        // after the last reply (the next step opens a new connection anyway).
        if !rule.starts_with("duplicate") && rule != "close:reply@register*1" {
            assert!(p.attempts >= 2, "{name}: {} attempts", p.attempts);
            let retry = r
                .progress
                .iter()
                .find(|x| x.step == Step::Retrying)
                .unwrap_or_else(|| panic!("{name}: no Retrying progress"));
            assert!(retry.error.as_ref().unwrap().is_retryable(), "{name}");
            // The backoff (25 to 200 ms), stretched to a second after the last connect.
            assert!(
                (25..=1000).contains(&retry.retry_in_ms),
                "{name}: {}",
                retry.retry_in_ms
            );
        }
        let _ = std::fs::remove_dir_all(r.out.parent().unwrap());
    }
}

#[test]
fn cuts_keys_json() {
    matrix(Api::Keys, Format::Json, CUTS);
}

#[test]
fn cuts_keys_cbor() {
    matrix(Api::Keys, Format::Cbor, CUTS);
}

#[test]
fn cuts_csr_json() {
    matrix(Api::Csr, Format::Json, CUTS);
}

#[test]
fn cuts_csr_cbor() {
    matrix(Api::Csr, Format::Cbor, CUTS);
}

// The matrices above run over MQTT 5, the default; these two over MQTT 3.1.1.
#[test]
fn cuts_keys_json_over_mqtt_3_1_1() {
    matrix_in(Api::Keys, Format::Json, CUTS, false, MqttVersion::V311);
}

#[test]
fn cuts_csr_cbor_over_mqtt_3_1_1() {
    matrix_in(Api::Csr, Format::Cbor, CUTS, false, MqttVersion::V311);
}

#[test]
fn cuts_csr_json_with_a_blob_store() {
    matrix_in(Api::Csr, Format::Json, CUTS, true, MqttVersion::V5);
}

#[test]
fn cuts_keys_cbor_with_a_blob_store() {
    matrix_in(Api::Keys, Format::Cbor, CUTS, true, MqttVersion::V5);
}

#[test]
fn throttling_errors_delays_and_duplicates_with_a_blob_store() {
    matrix_in(Api::Keys, Format::Json, OTHERS, true, MqttVersion::V5);
}

#[test]
fn throttling_errors_delays_and_duplicates_keys() {
    matrix(Api::Keys, Format::Json, OTHERS);
}

#[test]
fn throttling_errors_delays_and_duplicates_csr() {
    matrix(Api::Csr, Format::Cbor, OTHERS);
}

#[test]
fn non_retryable_rejections_are_not_retried_and_leave_no_files() {
    for (rule, status) in [
        ("reject:400@register", 400),
        ("reject:403@csr", 403),
        ("reject:404@register", 404),
    ] {
        let r = run(rule, Api::Csr, Format::Json, Some(rule));
        match &r.result {
            Err(Error::Rejected { error, .. }) => assert_eq!(error.status_code, status, "{rule}"),
            other => panic!("{rule}: {other:?}"),
        }
        assert!(
            r.progress.iter().all(|p| p.step != Step::Retrying),
            "{rule}"
        );
        assert!(!r.out.exists(), "{rule}: nothing committed");
    }
}

#[test]
fn a_failed_run_resumes_from_the_journal_without_a_second_certificate() {
    let dir = common::scratch("resilience", "resume");
    let emu = common::emulator(&dir, &["close:request@register*1"]);
    let mut request = Request::new(
        common::connection(&emu, Format::Json),
        "DemoTemplate",
        Method::CreateKeys,
    );
    request
        .parameters
        .insert("SerialNumber".into(), "resume".into());
    request.output_dir = Some(dir.join("out"));
    request.state_dir = Some(dir.join("state"));
    request.retry = RetryPolicy::none();
    let first = fleetprov::provision(&request, &Hooks::default());
    // The emulator ends the connection with DISCONNECT 0x80 (unspecified error) over MQTT 5.
    match &first {
        Err(Error::Refused(r)) => {
            assert_eq!((r.packet, r.reason_code), (MqttPacket::Disconnect, 0x80));
            assert!(r.is_retryable());
        }
        other => panic!("{other:?}"),
    }
    assert!(dir.join("state/journal.json").exists());
    assert!(!dir.join("out").exists(), "nothing committed");
    let pending = common::device_certificates(&emu);
    assert!(pending.iter().any(|(_, s)| s == "PENDING_ACTIVATION"));

    let steps = Arc::new(Mutex::new(Vec::new()));
    let s = steps.clone();
    let hooks = Hooks {
        progress: Some(Arc::new(move |p: &Progress| s.lock().unwrap().push(p.step))),
        ..Hooks::default()
    };
    let p = fleetprov::provision(&request, &hooks).unwrap();
    assert!(p.resumed);
    assert_eq!(p.thing_name, "demo-resume");
    let steps = steps.lock().unwrap().clone();
    assert_eq!(steps[0], Step::Resuming);
    assert!(!steps.contains(&Step::CreatingCertificate), "{steps:?}");
    let all = common::device_certificates(&emu);
    assert_eq!(all.len(), pending.len(), "no new certificate: {all:?}");
    assert!(!dir.join("state/journal.json").exists());
}

#[test]
fn an_expired_journal_starts_over_and_says_so() {
    let dir = common::scratch("resilience", "expired");
    let emu = common::emulator(&dir, &["close:request@register*1"]);
    let mut request = Request::new(
        common::connection(&emu, Format::Cbor),
        "DemoTemplate",
        Method::Csr(KeyType::P256),
    );
    request
        .parameters
        .insert("SerialNumber".into(), "expired".into());
    request.output_dir = Some(dir.join("out"));
    request.state_dir = Some(dir.join("state"));
    request.retry = RetryPolicy::none();
    request.token_lifetime = Duration::ZERO;
    assert!(fleetprov::provision(&request, &Hooks::default()).is_err());
    let logs = Arc::new(Mutex::new(Vec::new()));
    let l = logs.clone();
    let steps = Arc::new(Mutex::new(Vec::new()));
    let s = steps.clone();
    let hooks = Hooks {
        progress: Some(Arc::new(move |p: &Progress| s.lock().unwrap().push(p.step))),
        log: Some(Arc::new(move |_, line: &str| {
            l.lock().unwrap().push(line.to_owned())
        })),
        cancel: None,
    };
    let p = fleetprov::provision(&request, &hooks).unwrap();
    assert!(!p.resumed);
    assert_eq!(steps.lock().unwrap()[0], Step::Restarting);
    assert!(
        logs.lock().unwrap().iter().any(|l| l.contains("expired")),
        "the log says why"
    );
}

#[test]
fn a_state_directory_in_use_is_busy() {
    let dir = common::scratch("resilience", "busy");
    let held = fleetprov::store::journal::Journal::open(&dir.join("state")).unwrap();
    let emu = common::emulator(&dir, &[]);
    let mut request = Request::new(
        common::connection(&emu, Format::Json),
        "DemoTemplate",
        Method::CreateKeys,
    );
    request
        .parameters
        .insert("SerialNumber".into(), "busy".into());
    request.state_dir = Some(dir.join("state"));
    assert_eq!(
        fleetprov::provision(&request, &Hooks::default()).unwrap_err(),
        Error::Busy
    );
    drop(held);
    fleetprov::provision(&request, &Hooks::default()).unwrap();
}

/// The step-by-step client keeps its connection between calls; one that dropped while idle is
/// noticed and replaced by the next call instead of failing it.
#[test]
fn a_step_by_step_client_reconnects_after_an_idle_drop() {
    let dir = common::scratch("resilience", "idle-drop");
    let emu = common::emulator(&dir, &["close:connect*1"]);
    let logs = Arc::new(Mutex::new(Vec::new()));
    let l = logs.clone();
    let mut client = Client::new(common::connection(&emu, Format::Json)).unwrap();
    client.set_log(Some(Arc::new(move |_, line: &str| {
        l.lock().unwrap().push(line.to_owned())
    })));
    // CONNACK arrives, then the emulator closes the connection.
    client.connect().unwrap();
    let created = client.create_keys_and_certificate().unwrap();
    let params = [("SerialNumber".to_string(), "idle".to_string())].into();
    let registered = client
        .register_thing("DemoTemplate", &created.ownership_token, &params)
        .unwrap();
    assert_eq!(registered.thing_name.as_deref(), Some("demo-idle"));
    assert!(
        logs.lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("reconnecting")),
        "{:?}",
        logs.lock().unwrap()
    );
    // One certificate: the dead connection's request never reached the service.
    let device = common::device_certificates(&emu);
    assert_eq!(device.len(), 1, "{device:?}");
}

/// Many devices on one thread (`provision_many`): all provisioned, each with its own
/// certificate and thing, retries included.
#[test]
fn many_devices_at_once_on_one_thread() {
    let dir = common::scratch("resilience", "many");
    let emu = common::emulator(&dir, &["close:request@register*3", "reject:429@csr*3"]);
    let requests: Vec<Request> = (0..40)
        .map(|i| {
            let mut r = Request::new(
                common::connection(
                    &emu,
                    if i % 2 == 0 {
                        Format::Json
                    } else {
                        Format::Cbor
                    },
                ),
                "DemoTemplate",
                if i % 3 == 0 {
                    Method::CreateKeys
                } else {
                    Method::Csr(KeyType::P256)
                },
            );
            r.parameters
                .insert("SerialNumber".into(), format!("many{i}"));
            r.output_dir = Some(dir.join(format!("out{i}")));
            r.state_dir = Some(dir.join(format!("state{i}")));
            r.retry = RetryPolicy {
                max_attempts: 6,
                initial_backoff: Duration::from_millis(50),
                max_backoff: Duration::from_millis(200),
            };
            r
        })
        .collect();
    // Every device's flow runs on this thread: its progress callbacks say where they run.
    let threads = Arc::new(Mutex::new(std::collections::HashSet::new()));
    let seen = threads.clone();
    let hooks = Hooks {
        progress: Some(Arc::new(move |_: &Progress| {
            seen.lock().unwrap().insert(std::thread::current().id());
        })),
        ..Hooks::default()
    };
    let results = fleetprov::provision::provision_many(&requests, &hooks);
    assert_eq!(
        *threads.lock().unwrap(),
        std::collections::HashSet::from([std::thread::current().id()]),
        "every flow ran on the calling thread"
    );
    assert_eq!(results.len(), 40);
    let mut ids = std::collections::HashSet::new();
    for (i, r) in results.iter().enumerate() {
        let p = r.as_ref().unwrap_or_else(|e| panic!("device {i}: {e}"));
        assert_eq!(p.thing_name, format!("demo-many{i}"));
        assert!(ids.insert(p.certificate_id.clone()));
        assert!(dir.join(format!("out{i}/private.key")).exists());
    }
    let registry = emu.registry().unwrap();
    assert_eq!(registry["things"].as_array().unwrap().len(), 40);
    let retried = results
        .iter()
        .filter(|r| r.as_ref().unwrap().attempts > 1)
        .count();
    assert!(
        retried >= 3,
        "the faults made some devices retry ({retried})"
    );
}
