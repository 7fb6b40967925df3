//! Certificate rotation against the emulator: a provisioned device gets a new
//! certificate with its current one, through RotationTemplate, and its credentials are replaced
//! only after the new certificate connected.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use fleetprov::engine::retry::RetryPolicy;
use fleetprov::keys::KeyType;
use fleetprov::protocol::Format;
use fleetprov::provision::{rotate, Hooks};
mod common;

use common::Env;
use fleetprov::{Client, Error, Method, Request};

impl Env {
    /// Provisions `demo-SERIAL` into `creds`.
    fn provision(&self, serial: &str) -> PathBuf {
        let creds = self.dir.join("creds");
        let mut r = Request::new(
            common::connection(&self.emu, Format::Json),
            "DemoTemplate",
            Method::Csr(KeyType::P256),
        );
        r.parameters.insert("SerialNumber".into(), serial.into());
        r.output_dir = Some(creds.clone());
        fleetprov::provision(&r, &Hooks::default()).unwrap();
        creds
    }

    /// A rotation request for thing `thing` (no claim credentials: rotate() fills them in).
    fn rotation(&self, thing: &str) -> Request {
        let mut r = Request::new(
            common::connection_with(&self.emu, String::new(), String::new(), Format::Json),
            "RotationTemplate",
            Method::Csr(KeyType::P256),
        );
        r.parameters = BTreeMap::from([("ThingName".into(), thing.into())]);
        r.retry = RetryPolicy {
            max_attempts: 3,
            initial_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_millis(100),
        };
        r
    }

    fn thing_certificates(&self, thing: &str) -> Vec<String> {
        let registry = self.emu.registry().unwrap();
        let t = registry["things"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["name"] == thing)
            .unwrap()
            .clone();
        t["certificates"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_str().unwrap().to_owned())
            .collect()
    }

    fn status(&self, id: &str) -> String {
        let registry = self.emu.registry().unwrap();
        registry["certificates"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["id"] == id)
            .map(|c| c["status"].as_str().unwrap().to_owned())
            .unwrap_or_default()
    }

    /// Whether the credentials in `dir` connect.
    fn connects(&self, dir: &Path) -> Result<(), Error> {
        let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap();
        let mut client = Client::new(common::connection_with(
            &self.emu,
            read("certificate.pem"),
            read("private.key"),
            Format::Json,
        ))?;
        client.connect()
    }
}

fn snapshot(dir: &Path) -> [String; 3] {
    ["certificate.pem", "private.key", "device.json"]
        .map(|f| std::fs::read_to_string(dir.join(f)).unwrap())
}

#[test]
fn a_device_rotates_its_certificate_and_keeps_the_old_one_until_the_new_one_connected() {
    let env = common::env("rotation", "ok", &[]);
    let creds = env.provision("r1");
    let before = snapshot(&creds);
    let old_id = fleetprov::keys::certificate_id(&before[0]).unwrap();
    let p = rotate(&env.rotation("demo-r1"), &creds, &Hooks::default()).unwrap();
    assert_eq!(p.thing_name, "demo-r1");
    assert_eq!(
        p.device_configuration.get("Rotated").map(String::as_str),
        Some("true")
    );
    let after = snapshot(&creds);
    assert_ne!(after[0], before[0], "new certificate");
    assert_ne!(after[1], before[1], "new key");
    assert_eq!(
        fleetprov::keys::certificate_id(&after[0]).unwrap(),
        p.certificate_id
    );
    fleetprov::keys::certificate_matches_key(&after[0], &after[1]).unwrap();
    // The thing holds both certificates; both are active (retiring the old one is the
    // backend's call); the new credentials connect.
    let mut certs = env.thing_certificates("demo-r1");
    certs.sort();
    let mut want = vec![old_id.clone(), p.certificate_id.clone()];
    want.sort();
    assert_eq!(certs, want);
    assert_eq!(env.status(&p.certificate_id), "ACTIVE");
    env.connects(&creds).unwrap();
    assert!(!creds.join("rotation-journal/journal.json").exists());
}

#[test]
fn a_failed_rotation_leaves_the_old_credentials_untouched() {
    let env = common::env("rotation", "fail", &[]);
    let creds = env.provision("r2");
    let before = snapshot(&creds);
    env.emu.faults().add("reject:403@register".parse().unwrap());
    let err = rotate(&env.rotation("demo-r2"), &creds, &Hooks::default()).unwrap_err();
    assert!(matches!(err, Error::Rejected { .. }), "{err:?}");
    assert_eq!(snapshot(&creds), before, "byte for byte");
    env.emu.faults().clear();
    env.connects(&creds).unwrap();
}

#[test]
fn an_interrupted_rotation_resumes_without_a_second_certificate() {
    let env = common::env("rotation", "resume", &[]);
    let creds = env.provision("r3");
    let before = snapshot(&creds);
    env.emu
        .faults()
        .add("close:request@register*1".parse().unwrap());
    let mut once = env.rotation("demo-r3");
    once.retry = RetryPolicy::none();
    assert!(rotate(&once, &creds, &Hooks::default()).is_err());
    assert_eq!(snapshot(&creds), before);
    assert!(creds.join("rotation-journal/journal.json").exists());
    let p = rotate(&env.rotation("demo-r3"), &creds, &Hooks::default()).unwrap();
    assert!(p.resumed);
    // The claim certificate, the first device certificate, the rotated one: no fourth.
    let all = env.emu.registry().unwrap()["certificates"]
        .as_array()
        .unwrap()
        .len();
    assert_eq!(all, 3);
    env.connects(&creds).unwrap();
}

#[test]
fn rotation_needs_a_complete_credential_set() {
    let env = common::env("rotation", "missing", &[]);
    let dir = env.dir.join("nothing");
    std::fs::create_dir_all(&dir).unwrap();
    let err = rotate(&env.rotation("x"), &dir, &Hooks::default()).unwrap_err();
    assert!(matches!(err, Error::Storage(_)), "{err:?}");
}
