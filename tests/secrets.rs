//! Issue 5 item 7: every flow, with the most verbose logging, against the emulator; fails if a
//! private key or an ownership token appears in a log line, a progress report, an error text or
//! the `Debug` output of anything the library hands out.
//!
//! Secrets are checked in pieces: the token whole, and each base64 line of the key's PEM body
//! (a leak of any part of a key is a leak).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use fleetprov::engine::flow::Progress;
use fleetprov::engine::retry::RetryPolicy;
use fleetprov::keys::{DeviceKey, KeyType};
use fleetprov::protocol::Format;
use fleetprov::provision::Hooks;
use fleetprov::store::journal::Journal;
mod common;

use common::Env;
use fleetprov::{Client, Method, Request, Secret};

/// Everything the library said or showed during a test.
#[derive(Default, Clone)]
struct Said(Arc<Mutex<Vec<String>>>);

impl Said {
    fn push(&self, s: String) {
        self.0.lock().unwrap().push(s);
    }

    fn hooks(&self) -> Hooks {
        let (log, progress) = (self.clone(), self.clone());
        Hooks {
            log: Some(Arc::new(move |level, line: &str| {
                log.push(format!("{level:?} {line}"))
            })),
            progress: Some(Arc::new(move |p: &Progress| {
                progress.push(format!("{p:?}"));
                if let Some(e) = &p.error {
                    progress.push(e.to_string());
                }
            })),
            cancel: None,
        }
    }

    /// Records an outcome: its Debug and, for errors, Display.
    fn result<T: std::fmt::Debug, E: std::fmt::Debug + std::fmt::Display>(&self, r: &Result<T, E>) {
        self.push(format!("{r:?}"));
        if let Err(e) = r {
            self.push(e.to_string());
        }
    }

    fn lines(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }
}

/// The pieces of secrets that must not appear.
#[derive(Default)]
struct Secrets(Vec<String>);

impl Secrets {
    fn key(&mut self, pem: &str) {
        for line in pem.lines() {
            if !line.starts_with("-----") && line.len() >= 16 {
                self.0.push(line.to_owned());
            }
        }
    }

    fn token(&mut self, token: &str) {
        assert!(token.len() >= 16, "a real token");
        self.0.push(token.to_owned());
    }

    fn assert_absent(&self, said: &Said) {
        let lines = said.lines();
        assert!(
            lines.len() > 20,
            "verbose logging produced {} lines",
            lines.len()
        );
        assert!(!self.0.is_empty());
        for line in &lines {
            for secret in &self.0 {
                assert!(
                    !line.contains(secret.as_str()),
                    "a secret leaked into: {line}"
                );
            }
        }
    }
}

/// The one-call request for device `serial`, with output and state directories and quick retries.
fn request(env: &Env, format: Format, method: Method, serial: &str) -> Request {
    let mut r = Request::new(common::connection(&env.emu, format), "DemoTemplate", method);
    r.parameters.insert("SerialNumber".into(), serial.into());
    r.output_dir = Some(env.dir.join(format!("out-{serial}")));
    r.state_dir = Some(env.dir.join(format!("state-{serial}")));
    r.retry = RetryPolicy {
        max_attempts: 4,
        initial_backoff: Duration::from_millis(50),
        max_backoff: Duration::from_millis(100),
    };
    r
}

/// The one-call flow, both methods and formats, with a resume from the journal (whose token
/// and key the test reads from the file) and retries of a throttled request.
#[test]
fn one_call_flows_with_resume_and_retries() {
    let said = Said::default();
    let mut secrets = Secrets::default();
    for (i, (format, method)) in [
        (Format::Json, Method::CreateKeys),
        (Format::Cbor, Method::CreateKeys),
        (Format::Json, Method::Csr(KeyType::P256)),
        (Format::Cbor, Method::Csr(KeyType::P384)),
    ]
    .into_iter()
    .enumerate()
    {
        // A cut before RegisterThing leaves a journal; a throttled RegisterThing is retried.
        let env = common::env(
            "secrets",
            &format!("one-{i}"),
            &["close:request@register*1", "reject:429@register*1"],
        );
        let mut request = request(&env, format, method.clone(), &format!("s{i}"));
        said.push(format!("{request:?}"));
        let mut no_retry = request.clone();
        no_retry.retry = RetryPolicy::none();
        let first = fleetprov::provision(&no_retry, &said.hooks());
        said.result(&first);
        assert!(first.is_err());
        // The journal has the token and the key: secrets to look for.
        let journal = Journal::open(request.state_dir.as_ref().unwrap()).unwrap();
        let entry = journal.load().unwrap().expect("a journal");
        said.push(format!("{entry:?}"));
        said.push(format!("{journal:?}"));
        secrets.token(entry.certificate.ownership_token.expose());
        secrets.key(entry.private_key.as_ref().unwrap().expose());
        drop(journal);
        request.verify = true;
        let second = fleetprov::provision(&request, &said.hooks());
        said.result(&second);
        let p = second.unwrap();
        assert!(p.resumed && p.attempts == 2, "{p:?}");
        // A third call with the same token can only be refused: an error text with the token's
        // refusal in it.
        let mut client = Client::new(common::connection(&env.emu, format)).unwrap();
        client.set_log(said.hooks().log);
        let again = client.register_thing(
            "DemoTemplate",
            &entry.certificate.ownership_token,
            &request.parameters,
        );
        said.result(&again);
        assert!(again.is_err());
        let claim_key = std::fs::read_to_string(&env.emu.paths().claim_key).unwrap();
        secrets.key(&claim_key);
    }
    secrets.assert_absent(&said);
}

/// The step-by-step client: both certificate APIs, RegisterThing, a refused token.
#[test]
fn step_by_step_client() {
    let said = Said::default();
    let mut secrets = Secrets::default();
    let env = common::env("secrets", "steps", &[]);
    for format in [Format::Json, Format::Cbor] {
        let mut client = Client::new(common::connection(&env.emu, format)).unwrap();
        client.set_log(said.hooks().log);
        client.set_progress(said.hooks().progress);
        said.push(format!("{client:?}"));
        let keys = client.create_keys_and_certificate();
        said.result(&keys);
        let keys = keys.unwrap();
        secrets.key(keys.private_key.as_ref().unwrap().expose());
        secrets.token(keys.ownership_token.expose());

        let device = DeviceKey::generate(KeyType::P256).unwrap();
        secrets.key(device.private_key_pem().expose());
        said.push(format!("{device:?}"));
        let csr = device.csr_pem("device").unwrap();
        let from_csr = client.create_certificate_from_csr(&csr, Some(device.private_key_pem()));
        said.result(&from_csr);
        let from_csr = from_csr.unwrap();
        secrets.token(from_csr.ownership_token.expose());

        let params = [("SerialNumber".to_string(), format!("{format:?}"))].into();
        for token in [&keys.ownership_token, &from_csr.ownership_token] {
            let r = client.register_thing("DemoTemplate", token, &params);
            said.result(&r);
        }
        // Used tokens are refused with a message about the token, not the token.
        let r = client.register_thing("DemoTemplate", &keys.ownership_token, &params);
        said.result(&r);
        assert!(r.is_err());
        // A certificate that does not match: the error must not show the key.
        let other = DeviceKey::generate(KeyType::P256).unwrap();
        secrets.key(other.private_key_pem().expose());
        let mismatch = fleetprov::keys::certificate_matches_key(
            &from_csr.certificate_pem,
            other.private_key_pem().expose(),
        );
        said.result(&mismatch);
        assert!(mismatch.is_err());
        // A malformed key in a configuration.
        let mut bad = common::connection(&env.emu, format);
        let bad_key = format!("{}garbage", other.private_key_pem().expose());
        bad.key_pem = Secret::new(bad_key);
        said.push(format!("{bad:?}"));
        let r = Client::new(bad);
        said.result(&r.map(|_| ()));
    }
    secrets.assert_absent(&said);
}
