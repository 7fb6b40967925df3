//! Every flow, with the most verbose logging, against the emulator; fails if a
//! private key or an ownership token appears in a log line, a progress report, an error text or
//! the `Debug` output of anything the library hands out.
//!
//! The flows: the one-call flow, the step-by-step client, rotation, the host transport (a host
//! MQTT stack driving `fleetprov_host_*`) and the external signer.
//!
//! Secrets are checked in pieces: the token whole, and each base64 line of the key's PEM body
//! (a leak of any part of a key is a leak).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use fleetprov::engine::flow::Progress;
use fleetprov::engine::retry::RetryPolicy;
use fleetprov::keys::{DeviceKey, KeyType};
use fleetprov::protocol::Format;
use fleetprov::provision::{rotate, Hooks};
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
            assert!(r.is_ok(), "RegisterThing: {r:?}");
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

fn read(p: &std::path::Path) -> String {
    std::fs::read_to_string(p).unwrap()
}

/// Rotation: a provisioned device gets a new key and certificate with its current ones; neither
/// key shows.
#[test]
fn rotation() {
    let said = Said::default();
    let mut secrets = Secrets::default();
    let env = common::env("secrets", "rotation", &[]);
    let creds = env.dir.join("creds");
    let mut first = request(&env, Format::Json, Method::Csr(KeyType::P256), "rot");
    first.output_dir = Some(creds.clone());
    let r = fleetprov::provision(&first, &said.hooks());
    said.result(&r);
    r.unwrap();
    secrets.key(&read(&creds.join("private.key")));
    secrets.key(&read(&env.emu.paths().claim_key));
    for format in [Format::Json, Format::Cbor] {
        let mut rotation = Request::new(
            common::connection_with(&env.emu, String::new(), String::new(), format),
            "RotationTemplate",
            Method::Csr(KeyType::P256),
        );
        rotation.parameters = [("ThingName".to_string(), "demo-rot".to_string())].into();
        said.push(format!("{rotation:?}"));
        let r = rotate(&rotation, &creds, &said.hooks());
        said.result(&r);
        assert!(r.is_ok(), "rotation: {r:?}");
        secrets.key(&read(&creds.join("private.key")));
    }
    secrets.assert_absent(&said);
}

mod host {
    use std::ffi::{c_char, c_void, CStr};
    use std::ptr;
    use std::sync::Mutex;

    use super::common::host::*;
    use super::{common, read, Said, Secrets};
    use fleetprov::ffi::*;
    use fleetprov_result::*;

    unsafe extern "C" fn log_line(
        userdata: *mut c_void,
        level: fleetprov_log_level,
        message: *const c_char,
        len: usize,
    ) {
        // SAFETY: userdata is the test's Said, alive while the config is; `message` has `len`
        // bytes valid during the call.
        let (said, line) = unsafe {
            (
                &*(userdata as *const Said),
                std::slice::from_raw_parts(message.cast::<u8>(), len),
            )
        };
        said.push(format!(
            "{} {}",
            level as i32,
            String::from_utf8_lossy(line)
        ));
    }

    unsafe extern "C" fn progress(userdata: *mut c_void, p: *const fleetprov_progress) {
        // SAFETY: userdata is the test's Said; `p` and its error are valid during the call.
        unsafe {
            let (said, p) = (&*(userdata as *const Said), &*p);
            said.push(format!("step {} attempt {}", p.step as i32, p.attempt));
            if !p.error.is_null() {
                let text = CStr::from_ptr(fleetprov_error_message(p.error));
                said.push(text.to_string_lossy().into_owned());
            }
        }
    }

    /// Adds the log callback, at the most verbose level, and the progress callback (with the
    /// text of each error) to a host config.
    fn log_to(c: *mut fleetprov_config, said: &Said) {
        let user = said as *const Said as *mut c_void;
        // SAFETY: a live config; `said` outlives it (the tests free the config first).
        unsafe {
            ok(fleetprov_config_set_log_callback(
                c,
                Some(log_line),
                user,
                None,
                fleetprov_log_level::FLEETPROV_LOG_DEBUG as i32,
            ));
            ok(fleetprov_config_set_progress_callback(
                c,
                Some(progress),
                user,
                None,
            ));
        }
    }

    /// The host transport, both methods and formats, and the external signer: the keys the
    /// library made or was given, the claim key and the element's key stay out of its log.
    #[test]
    fn host_transport_and_external_signer() {
        let said = Said::default();
        let mut secrets = Secrets::default();
        for (i, (method, cbor)) in [
            (fleetprov_method::FLEETPROV_METHOD_CREATE_KEYS, false),
            (fleetprov_method::FLEETPROV_METHOD_CREATE_KEYS, true),
            (fleetprov_method::FLEETPROV_METHOD_CSR, true),
        ]
        .into_iter()
        .enumerate()
        {
            let env = common::env("secrets", &format!("host-{i}"), &["reject:429@register*1"]);
            let c = host_config(&env, &format!("sh{i}"), method, cbor);
            log_to(c, &said);
            let (r, p, seen) = drive(&env, c, None);
            said.push(format!("{seen:?}"));
            assert_eq!(r, FLEETPROV_OK, "{seen:#?}");
            // SAFETY: a live result and config, freed once.
            unsafe {
                let key = CStr::from_ptr(fleetprov_provisioned_private_key(p));
                secrets.key(key.to_str().unwrap());
                fleetprov_provisioned_free(p);
                fleetprov_config_free(c);
            }
            secrets.key(&read(&env.emu.paths().claim_key));
        }

        // The external signer: the element's key is the host's; the library signs through it.
        use ring::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
        let env = common::env("secrets", "signer", &[]);
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
            .unwrap();
        let point = pair.public_key().as_ref().to_vec();
        let own_pem = pem_of(pkcs8.as_ref());
        secrets.key(&own_pem);
        let el = Element {
            pair,
            signed: Mutex::new(0),
        };
        let c = host_config(&env, "ssig", fleetprov_method::FLEETPROV_METHOD_CSR, true);
        log_to(c, &said);
        // SAFETY: live config; `el` outlives the flow.
        unsafe {
            ok(fleetprov_config_set_output_dir(c, ptr::null()));
            ok(fleetprov_config_set_signer(
                c,
                point.as_ptr(),
                point.len(),
                Some(element_sign),
                &el as *const Element as *mut c_void,
                None,
            ));
        }
        let (r, p, seen) = drive(&env, c, Some(own_pem));
        said.push(format!("{seen:?}"));
        assert_eq!(r, FLEETPROV_OK, "{seen:#?}");
        assert_eq!(*el.signed.lock().unwrap(), 1, "one CSR signature");
        // SAFETY: a live result and config, freed once.
        unsafe {
            assert!(fleetprov_provisioned_private_key(p).is_null());
            fleetprov_provisioned_free(p);
            fleetprov_config_free(c);
        }
        secrets.assert_absent(&said);
    }
}
