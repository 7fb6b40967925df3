//! The library driven through its exported C functions against the emulator over real TLS.
//!
//! Each `unsafe` block calls the C ABI with pointers this test owns; that is what is tested.

use std::ffi::{c_char, c_void, CStr, CString};
use std::path::PathBuf;
use std::ptr;
use std::sync::mpsc;
use std::sync::Mutex;
use std::time::Duration;

use fleetprov::ffi::*;
use fleetprov_emulator::{Config as EmuConfig, Emulator, KeyKind};
use fleetprov_result::*;

struct Env {
    emu: Emulator,
    dir: PathBuf,
}

impl Env {
    fn start() -> Env {
        Env::start_with(|_| {})
    }

    fn start_with(tweak: impl FnOnce(&mut EmuConfig)) -> Env {
        static N: Mutex<u32> = Mutex::new(0);
        let n = {
            let mut n = N.lock().unwrap();
            *n += 1;
            *n
        };
        let dir = std::env::temp_dir().join(format!("fleetprov-ffi-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut config = EmuConfig::new(dir.join("data"));
        config.key_kind = KeyKind::EcP256;
        tweak(&mut config);
        let emu = Emulator::start(config).expect("emulator starts");
        Env { emu, dir }
    }

    fn path(&self, p: &std::path::Path) -> CString {
        CString::new(p.to_str().unwrap()).unwrap()
    }

    /// A config for the emulator with the claim credentials and DemoTemplate.
    fn config(&self, serial: &str) -> Config {
        let c = Config::new();
        let paths = self.emu.paths();
        let host = CString::new("localhost").unwrap();
        // SAFETY: live config and NUL-terminated strings owned by this test.
        unsafe {
            ok(fleetprov_config_set_endpoint(
                c.0,
                host.as_ptr(),
                self.emu.port(),
            ));
            ok(fleetprov_config_set_ca_file(
                c.0,
                self.path(&paths.ca_cert).as_ptr(),
            ));
            ok(fleetprov_config_set_claim_files(
                c.0,
                self.path(&paths.claim_cert).as_ptr(),
                self.path(&paths.claim_key).as_ptr(),
            ));
            ok(fleetprov_config_set_template(c.0, c"DemoTemplate".as_ptr()));
            let serial = CString::new(serial).unwrap();
            ok(fleetprov_config_set_parameter(
                c.0,
                c"SerialNumber".as_ptr(),
                serial.as_ptr(),
            ));
            ok(fleetprov_config_set_timeouts(c.0, 10_000, 30_000));
        }
        c
    }

    fn thing(&self, name: &str) -> Option<serde_json::Value> {
        self.emu.registry().unwrap()["things"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["name"] == name)
            .cloned()
    }

    fn cert_status(&self, id: &str) -> Option<String> {
        self.emu.registry().unwrap()["certificates"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["id"] == id)
            .map(|c| c["status"].as_str().unwrap().to_owned())
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// An owned fleetprov_config.
struct Config(*mut fleetprov_config);

impl Config {
    fn new() -> Config {
        let mut c = ptr::null_mut();
        // SAFETY: valid output pointer.
        ok(unsafe { fleetprov_config_new(&mut c) });
        Config(c)
    }
}

impl Drop for Config {
    fn drop(&mut self) {
        // SAFETY: created by fleetprov_config_new, freed once.
        unsafe { fleetprov_config_free(self.0) }
    }
}

fn ok(r: fleetprov_result) {
    assert_eq!(r, FLEETPROV_OK, "{}", last_error());
}

fn last_error() -> String {
    let mut needed = 0usize;
    // SAFETY: NULL buffer with length 0 asks for the size.
    let r = unsafe { fleetprov_last_error_message(ptr::null_mut(), 0, &mut needed) };
    assert_eq!(r, FLEETPROV_BUFFER_TOO_SMALL);
    let mut buf = vec![0u8; needed];
    // SAFETY: buffer of `needed` bytes.
    let r =
        unsafe { fleetprov_last_error_message(buf.as_mut_ptr().cast(), buf.len(), &mut needed) };
    assert_eq!(r, FLEETPROV_OK);
    CStr::from_bytes_with_nul(&buf)
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned()
}

fn s(p: *const c_char) -> String {
    assert!(!p.is_null());
    // SAFETY: a borrowed string from a live library object.
    unsafe { CStr::from_ptr(p) }.to_str().unwrap().to_owned()
}

/// The last error's rejection fields.
fn last_rejection() -> (fleetprov_result, u16, String, String) {
    let e = fleetprov_last_error();
    assert!(!e.is_null());
    // SAFETY: a live error copy, freed below.
    let out = unsafe {
        (
            fleetprov_error_result(e),
            fleetprov_error_status_code(e),
            s(fleetprov_error_code(e)),
            s(fleetprov_error_service_message(e)),
        )
    };
    // SAFETY: freed once.
    unsafe { fleetprov_error_free(e) };
    out
}

fn set_format(c: &Config, format: fleetprov_format) {
    // SAFETY: live config.
    ok(unsafe { fleetprov_config_set_format(c.0, format as i32) });
}

fn set_method(c: &Config, method: fleetprov_method) {
    // SAFETY: live config.
    ok(unsafe { fleetprov_config_set_method(c.0, method as i32) });
}

extern "C" fn record_step(userdata: *mut c_void, progress: *const fleetprov_progress) {
    // SAFETY: userdata is the Mutex<Vec> the test registered, alive for the config's lifetime;
    // `progress` is valid during the call.
    let (steps, progress) = unsafe {
        (
            &*(userdata as *const Mutex<Vec<fleetprov_step>>),
            &*progress,
        )
    };
    assert!(progress.attempt >= 1);
    assert_eq!(
        progress.error.is_null(),
        progress.step != fleetprov_step::FLEETPROV_STEP_RETRYING
    );
    steps.lock().unwrap().push(progress.step);
}

extern "C" fn record_log(
    userdata: *mut c_void,
    level: fleetprov_log_level,
    msg: *const c_char,
    len: usize,
) {
    // SAFETY: userdata is the Mutex<Vec> the test registered.
    let lines = unsafe { &*(userdata as *const Mutex<Vec<(fleetprov_log_level, String)>>) };
    let text = s(msg);
    assert_eq!(text.len(), len);
    lines.lock().unwrap().push((level, text));
}

#[test]
fn one_call_both_methods_both_formats() {
    let env = Env::start();
    for method in [
        fleetprov_method::FLEETPROV_METHOD_CSR,
        fleetprov_method::FLEETPROV_METHOD_CREATE_KEYS,
    ] {
        for format in [
            fleetprov_format::FLEETPROV_FORMAT_JSON,
            fleetprov_format::FLEETPROV_FORMAT_CBOR,
        ] {
            let serial = format!("one-{method:?}-{format:?}");
            let c = env.config(&serial);
            set_method(&c, method);
            set_format(&c, format);
            let steps: Mutex<Vec<fleetprov_step>> = Mutex::new(Vec::new());
            let lines: Mutex<Vec<(fleetprov_log_level, String)>> = Mutex::new(Vec::new());
            let out_dir = env.dir.join(format!("out-{serial}"));
            // SAFETY: live config; the userdata pointers outlive every call using them (the
            // config is dropped at the end of this iteration, after provisioning).
            unsafe {
                ok(fleetprov_config_set_progress_callback(
                    c.0,
                    Some(record_step),
                    &steps as *const _ as *mut c_void,
                    None,
                ));
                ok(fleetprov_config_set_log_callback(
                    c.0,
                    Some(record_log),
                    &lines as *const _ as *mut c_void,
                    None,
                    fleetprov_log_level::FLEETPROV_LOG_DEBUG as i32,
                ));
                ok(fleetprov_config_set_output_dir(
                    c.0,
                    env.path(&out_dir).as_ptr(),
                ));
            }
            let mut p = ptr::null_mut();
            // SAFETY: live config, valid output pointer.
            ok(unsafe { fleetprov_provision(c.0, &mut p) });
            // SAFETY: `p` is a live result until freed below.
            let (thing, id, key, dir) = unsafe {
                (
                    s(fleetprov_provisioned_thing_name(p)),
                    s(fleetprov_provisioned_certificate_id(p)),
                    s(fleetprov_provisioned_private_key(p)),
                    s(fleetprov_provisioned_output_dir(p)),
                )
            };
            assert_eq!(thing, format!("demo-{serial}"));
            assert_eq!(env.cert_status(&id).as_deref(), Some("ACTIVE"));
            assert_eq!(env.thing(&thing).unwrap()["certificates"][0], id.as_str());
            // SAFETY: live result.
            let n = unsafe { fleetprov_provisioned_config_count(p) };
            assert_eq!(n, 2);
            let (mut k, mut v) = (ptr::null(), ptr::null());
            // SAFETY: live result and valid output pointers.
            ok(unsafe { fleetprov_provisioned_config_entry(p, 0, &mut k, &mut v) });
            assert_eq!(s(k), "FallbackUrl");
            assert_eq!(s(v), "https://www.example.com/fallback");
            // SAFETY: out of range: an error, outputs untouched.
            let r = unsafe { fleetprov_provisioned_config_entry(p, 2, &mut k, &mut v) };
            assert_eq!(r, FLEETPROV_INVALID_ARGUMENT);
            // SAFETY: freed once.
            unsafe { fleetprov_provisioned_free(p) };

            assert_eq!(PathBuf::from(&dir), out_dir);
            let stored_key = std::fs::read_to_string(out_dir.join("private.key")).unwrap();
            assert_eq!(stored_key, key);
            use std::os::unix::fs::PermissionsExt;
            let mode = |p: PathBuf| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode(out_dir.join("private.key")), 0o600);
            assert_eq!(mode(out_dir.clone()), 0o700);

            use fleetprov_step::*;
            assert_eq!(
                *steps.lock().unwrap(),
                vec![
                    FLEETPROV_STEP_CONNECTING,
                    FLEETPROV_STEP_SUBSCRIBING,
                    FLEETPROV_STEP_SUBSCRIBED,
                    FLEETPROV_STEP_CREATING_CERTIFICATE,
                    FLEETPROV_STEP_CERTIFICATE_CREATED,
                    FLEETPROV_STEP_REGISTERING,
                    FLEETPROV_STEP_REGISTERED,
                    FLEETPROV_STEP_VERIFYING,
                    FLEETPROV_STEP_VERIFIED,
                    FLEETPROV_STEP_COMMITTED,
                ]
            );
            let lines = lines.lock().unwrap();
            assert!(lines
                .iter()
                .any(|(l, t)| *l == fleetprov_log_level::FLEETPROV_LOG_INFO
                    && t.contains("connecting")));
            for (_, line) in lines.iter() {
                assert!(!line.contains("PRIVATE KEY"), "{line}");
            }
        }
    }
}

#[test]
fn step_by_step_both_apis_both_formats() {
    let env = Env::start();
    for format in [
        fleetprov_format::FLEETPROV_FORMAT_JSON,
        fleetprov_format::FLEETPROV_FORMAT_CBOR,
    ] {
        let c = env.config(&format!("steps-{format:?}"));
        set_format(&c, format);
        let mut client = ptr::null_mut();
        // SAFETY: live config, valid output pointer.
        ok(unsafe { fleetprov_client_new(c.0, &mut client) });
        drop(c); // the client copied what it needs
                 // SAFETY: live client.
        ok(unsafe { fleetprov_client_connect(client) });

        // CreateKeysAndCertificate, then RegisterThing.
        let mut cert = ptr::null_mut();
        // SAFETY: live client, valid output pointer.
        ok(unsafe { fleetprov_client_create_keys_and_certificate(client, &mut cert) });
        // SAFETY: live certificate.
        let (id, key, token) = unsafe {
            (
                s(fleetprov_certificate_id(cert)),
                s(fleetprov_certificate_private_key(cert)),
                s(fleetprov_certificate_ownership_token(cert)),
            )
        };
        assert_eq!(id.len(), 64);
        assert!(key.contains("PRIVATE KEY"));
        assert!(!token.is_empty());
        assert_eq!(env.cert_status(&id).as_deref(), Some("PENDING_ACTIVATION"));
        let mut reg = ptr::null_mut();
        // SAFETY: live client and certificate, valid output pointer; NULL template = config's.
        ok(unsafe { fleetprov_client_register_thing(client, cert, ptr::null(), &mut reg) });
        // SAFETY: live registration.
        let thing = unsafe { s(fleetprov_registration_thing_name(reg)) };
        assert_eq!(thing, format!("demo-steps-{format:?}"));
        // SAFETY: live registration.
        assert_eq!(unsafe { fleetprov_registration_config_count(reg) }, 2);
        assert_eq!(env.cert_status(&id).as_deref(), Some("ACTIVE"));

        // The token is single use: the service's rejection arrives with its fields.
        let mut again = ptr::null_mut();
        // SAFETY: as above.
        let r = unsafe { fleetprov_client_register_thing(client, cert, ptr::null(), &mut again) };
        assert_eq!(r, FLEETPROV_REJECTED);
        assert!(again.is_null(), "outputs are written only on success");
        let (code, status, error_code, _) = last_rejection();
        assert_eq!(
            (code, status, error_code.as_str()),
            (FLEETPROV_REJECTED, 400, "InvalidCertificateOwnershipToken")
        );
        // SAFETY: freed once each.
        unsafe {
            fleetprov_registration_free(reg);
            fleetprov_certificate_free(cert);
        }

        // CreateCertificateFromCsr with a key made here.
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let csr = rcgen::CertificateParams::new(Vec::<String>::new())
            .unwrap()
            .serialize_request(&key)
            .unwrap()
            .pem()
            .unwrap();
        let csr = CString::new(csr).unwrap();
        let key_pem = CString::new(key.serialize_pem()).unwrap();
        let mut cert = ptr::null_mut();
        // SAFETY: live client, NUL-terminated inputs, valid output pointer.
        ok(unsafe {
            fleetprov_client_create_certificate_from_csr(
                client,
                csr.as_ptr(),
                key_pem.as_ptr(),
                &mut cert,
            )
        });
        // SAFETY: live certificate.
        assert!(unsafe { fleetprov_certificate_private_key(cert) }.is_null());
        let mut reg = ptr::null_mut();
        // An unknown template: 404 with its fields.
        // SAFETY: as above.
        let r = unsafe {
            fleetprov_client_register_thing(client, cert, c"NoSuchTemplate".as_ptr(), &mut reg)
        };
        assert_eq!(r, FLEETPROV_REJECTED);
        let (_, status, error_code, message) = last_rejection();
        assert_eq!((status, error_code.as_str()), (404, "ResourceNotFound"));
        assert!(message.contains("NoSuchTemplate"));
        // SAFETY: as above; the certificate's token is still good.
        ok(unsafe {
            fleetprov_client_register_thing(client, cert, c"DemoTemplate".as_ptr(), &mut reg)
        });
        // SAFETY: freed once each.
        unsafe {
            fleetprov_registration_free(reg);
            fleetprov_certificate_free(cert);
            fleetprov_client_free(client);
        }
    }
}

#[test]
fn hook_denial_arrives_as_a_rejection() {
    let env = Env::start();
    let template = serde_json::json!({
        "preProvisioningHook": {"command": ["/bin/sh", "-c", "cat >/dev/null; echo '{\"allowProvisioning\": false}'"]},
        "templateBody": serde_json::from_str::<serde_json::Value>(fleetprov_emulator_demo()).unwrap(),
    });
    std::fs::write(
        env.emu.paths().templates.join("Guarded.json"),
        serde_json::to_vec(&template).unwrap(),
    )
    .unwrap();
    let c = env.config("guarded");
    // SAFETY: live config.
    ok(unsafe { fleetprov_config_set_template(c.0, c"Guarded".as_ptr()) });
    let mut p = ptr::null_mut();
    // SAFETY: live config, valid output pointer.
    let r = unsafe { fleetprov_provision(c.0, &mut p) };
    assert_eq!(r, FLEETPROV_REJECTED);
    assert!(p.is_null());
    let (_, status, code, _) = last_rejection();
    assert_eq!((status, code.as_str()), (403, "AccessDenied"));
}

fn fleetprov_emulator_demo() -> &'static str {
    include_str!("emulator/templates/DemoTemplate.json")
}

#[test]
fn step_timeout_and_overall_deadline() {
    let env = Env::start();
    env.emu.faults().add("delay:3000@register".parse().unwrap());
    let c = env.config("slow");
    // SAFETY: live config. One attempt: a timeout is retryable and would be retried.
    ok(unsafe { fleetprov_config_set_retry(c.0, 1, 100, 100) });
    // SAFETY: live config.
    ok(unsafe { fleetprov_config_set_timeouts(c.0, 500, 20_000) });
    let mut p = ptr::null_mut();
    // SAFETY: live config, valid output pointer.
    assert_eq!(
        unsafe { fleetprov_provision(c.0, &mut p) },
        FLEETPROV_TIMEOUT
    );
    assert!(last_error().contains("registering"), "{}", last_error());
    // SAFETY: live config.
    ok(unsafe { fleetprov_config_set_timeouts(c.0, 10_000, 1_000) });
    // SAFETY: as above.
    assert_eq!(
        unsafe { fleetprov_provision(c.0, &mut p) },
        FLEETPROV_DEADLINE
    );
    // SAFETY: an error object for a timeout says it is retryable.
    let e = fleetprov_last_error();
    // SAFETY: live error, freed once.
    unsafe {
        assert_eq!(fleetprov_error_status_code(e), 0);
        fleetprov_error_free(e);
    }
}

type Outcome = (fleetprov_result, Option<String>, Option<(u16, String)>);

extern "C" fn on_provisioned(
    userdata: *mut c_void,
    result: fleetprov_result,
    p: *mut fleetprov_provisioned,
    e: *const fleetprov_error,
) {
    // SAFETY: userdata is the Sender the test boxed; borrowed for this call only.
    let tx = unsafe { &*(userdata as *const mpsc::Sender<Outcome>) };
    // SAFETY: `p` is ours to free; `e` is borrowed for this call.
    let outcome = unsafe {
        let thing = (!p.is_null()).then(|| s(fleetprov_provisioned_thing_name(p)));
        fleetprov_provisioned_free(p);
        let rej = (!e.is_null()).then(|| {
            (
                fleetprov_error_status_code(e),
                s(fleetprov_error_message(e)),
            )
        });
        (result, thing, rej)
    };
    tx.send(outcome).unwrap();
}

extern "C" fn free_sender(userdata: *mut c_void) {
    // SAFETY: the Box the test leaked for this userdata; freed once by the library.
    drop(unsafe { Box::from_raw(userdata as *mut mpsc::Sender<Outcome>) });
}

#[test]
fn async_provision_completes_and_cancel_stops_it() {
    let env = Env::start();
    let c = env.config("async");
    let (tx, rx) = mpsc::channel::<Outcome>();
    let mut op = ptr::null_mut();
    let user = Box::into_raw(Box::new(tx.clone())) as *mut c_void;
    // SAFETY: live config; userdata freed by the library through free_sender.
    ok(unsafe {
        fleetprov_provision_async(c.0, Some(on_provisioned), user, Some(free_sender), &mut op)
    });
    drop(c);
    let (result, thing, _) = rx.recv_timeout(Duration::from_secs(60)).unwrap();
    assert_eq!(result, FLEETPROV_OK);
    assert_eq!(thing.as_deref(), Some("demo-async"));
    // SAFETY: live operation, freed once.
    unsafe {
        ok(fleetprov_operation_wait(op));
        fleetprov_operation_free(op);
    }

    // Cancel while RegisterThing is held back for a long time.
    env.emu
        .faults()
        .add("delay:30000@register*1".parse().unwrap());
    let c = env.config("cancelled");
    let steps: Mutex<Vec<fleetprov_step>> = Mutex::new(Vec::new());
    // SAFETY: `steps` outlives the operation (waited for below).
    ok(unsafe {
        fleetprov_config_set_progress_callback(
            c.0,
            Some(record_step),
            &steps as *const _ as *mut c_void,
            None,
        )
    });
    let user = Box::into_raw(Box::new(tx)) as *mut c_void;
    let mut op = ptr::null_mut();
    // SAFETY: as above.
    ok(unsafe {
        fleetprov_provision_async(c.0, Some(on_provisioned), user, Some(free_sender), &mut op)
    });
    // Wait (bounded) until the request is out, then cancel.
    let started = std::time::Instant::now();
    while !steps
        .lock()
        .unwrap()
        .contains(&fleetprov_step::FLEETPROV_STEP_REGISTERING)
    {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "never reached RegisterThing"
        );
        std::thread::yield_now();
    }
    // SAFETY: live operation.
    ok(unsafe { fleetprov_operation_cancel(op) });
    let (result, thing, _) = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("cancel is prompt");
    assert_eq!((result, thing), (FLEETPROV_CANCELLED, None));
    // SAFETY: freed once (waits for the finished worker).
    unsafe { fleetprov_operation_free(op) };
    drop(c);
}

/// What the message of each row of `bad_arguments_table` must say.
fn expected_message(row: &str) -> &'static str {
    match row {
        "config_new(NULL)" => "output pointer is NULL",
        "set_endpoint(NULL cfg)" => "config is NULL",
        "set_endpoint(NULL host)" => "host is NULL",
        "set_endpoint(port 0)" => "host must not be empty and port must not be 0",
        "set_endpoint(bad UTF-8)" => "host is not valid UTF-8",
        "set_template(\"\")" => "template name must be 1-36 characters, got 0",
        "set_template(37 chars)" => "template name must be 1-36 characters, got 37",
        "set_template(\"a/b\")" => {
            "template name may only contain 0-9, A-Z, a-z, '_' and '-', found '/'"
        }
        "set_template(\"a+#\")" => {
            "template name may only contain 0-9, A-Z, a-z, '_' and '-', found '+'"
        }
        "set_template(bad UTF-8)" => "name is not valid UTF-8",
        "set_ca_pem(\"\")" => "CA: invalid PEM: no CERTIFICATE block",
        "set_retry(0 attempts)" => "max_attempts is 0",
        "set_retry(max < initial)" => "max_backoff_ms is below initial_backoff_ms",
        "set_retry(NULL cfg)" => "config is NULL",
        "set_state_dir(\"\")" => "path is empty",
        "set_state_dir(bad UTF-8)" => "path is not valid UTF-8",
        "set_token_lifetime(NULL cfg)" => "config is NULL",
        "set_ca_pem(garbage)" => "CA: invalid PEM: a PEM block's base64 is corrupt (truncated?)",
        "set_ca_file(missing)" => {
            "cannot read CA file \"/nonexistent/ca.pem\": No such file or directory"
        }
        "set_claim_pem(empty cert)" => "claim certificate: invalid PEM: no CERTIFICATE block",
        "set_claim_pem(empty key)" => {
            "claim key: invalid PEM: no private key block (PKCS#1, SEC1 or PKCS#8)"
        }
        "set_claim_pem(garbage cert)" => {
            "claim certificate: invalid PEM: a PEM block's base64 is corrupt (truncated?)"
        }
        "set_claim_pem(key as cert)" => {
            "claim certificate: invalid PEM: no CERTIFICATE block (the text holds a private key)"
        }
        "set_claim_pem(wrong key)" => "the claim certificate does not match the claim key",
        "set_claim_files(NULL)" => "cert_path is NULL",
        "set_format(7)" => "unknown format 7",
        "set_format(-1)" => "unknown format -1",
        "set_method(9)" => "unknown method 9",
        "set_key_type(5)" => "unknown key type 5",
        "set_keep_alive(1)" => "keep-alive must be between 5 and 1200 seconds",
        "set_keep_alive(5000)" => "keep-alive must be between 5 and 1200 seconds",
        "set_timeouts(0)" => "the step timeout must be greater than 0",
        "set_client_id(129)" => "client_id is longer than 128 bytes",
        "set_parameter(NULL value)" => "value is NULL",
        "set_parameter(\"\" key)" => "parameter key is empty",
        "set_csr_pem(garbage)" => "CSR: invalid PEM: a PEM block's base64 is corrupt (truncated?)",
        "set_log_callback(level 9)" => "unknown log level 9",
        "set_output_dir(\"\")" => "path is empty",
        "provision(NULL cfg)" => "config is NULL",
        "provision(NULL out)" => "output pointer is NULL",
        "client_new(NULL out)" => "output pointer is NULL",
        "client_connect(NULL)" => "client is NULL",
        "client_cancel(NULL)" => "client is NULL",
        "register(NULL client)" => "client is NULL",
        "provision_async(NULL callback)" => "callback is NULL",
        "operation_cancel(NULL)" => "operation is NULL",
        other => panic!("no expected message for row {other}"),
    }
}

#[test]
fn bad_arguments_table() {
    let env = Env::start();
    let good = env.config("bad-args");
    let paths = env.emu.paths();
    let claim_cert = std::fs::read_to_string(&paths.claim_cert).unwrap();
    let claim_key = std::fs::read_to_string(&paths.claim_key).unwrap();
    let other_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .unwrap()
        .serialize_pem();
    let cs = |t: &str| CString::new(t).unwrap();
    let bad_utf8: &[u8] = b"\xff\xfe\0";
    let bad_utf8 = bad_utf8.as_ptr() as *const c_char;
    let (claim_cert, claim_key, other_key) = (cs(&claim_cert), cs(&claim_key), cs(&other_key));
    let long_name = cs(&"a".repeat(37));
    let garbage = cs("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n");
    let empty = cs("");
    let mut out_p = ptr::null_mut();
    let mut out_client: *mut fleetprov_client = ptr::null_mut();
    // Each row's call is made, then at once its code and this thread's last-error text are
    // taken; a successful call first clears the text left by the row before.
    macro_rules! rows {
        ($(($what:expr, $call:expr $(,)?)),* $(,)?) => {
            vec![$({
                ok(fleetprov_config_set_verify(good.0, true));
                assert_eq!(last_error(), "", "a success clears the last error");
                let got = $call;
                ($what, got, last_error())
            }),*]
        };
    }
    // SAFETY: each row passes pointers that are NULL, dangling-free, or owned by this test.
    let rows: Vec<(&str, fleetprov_result, String)> = unsafe {
        rows![
            ("config_new(NULL)", fleetprov_config_new(ptr::null_mut())),
            (
                "set_endpoint(NULL cfg)",
                fleetprov_config_set_endpoint(ptr::null_mut(), c"h".as_ptr(), 1),
            ),
            (
                "set_endpoint(NULL host)",
                fleetprov_config_set_endpoint(good.0, ptr::null(), 8883),
            ),
            (
                "set_endpoint(port 0)",
                fleetprov_config_set_endpoint(good.0, c"h".as_ptr(), 0),
            ),
            (
                "set_endpoint(bad UTF-8)",
                fleetprov_config_set_endpoint(good.0, bad_utf8, 8883),
            ),
            (
                "set_template(\"\")",
                fleetprov_config_set_template(good.0, empty.as_ptr()),
            ),
            (
                "set_template(37 chars)",
                fleetprov_config_set_template(good.0, long_name.as_ptr()),
            ),
            (
                "set_template(\"a/b\")",
                fleetprov_config_set_template(good.0, c"a/b".as_ptr()),
            ),
            (
                "set_template(\"a+#\")",
                fleetprov_config_set_template(good.0, c"a+#".as_ptr()),
            ),
            (
                "set_template(bad UTF-8)",
                fleetprov_config_set_template(good.0, bad_utf8),
            ),
            (
                "set_ca_pem(\"\")",
                fleetprov_config_set_ca_pem(good.0, empty.as_ptr()),
            ),
            (
                "set_retry(0 attempts)",
                fleetprov_config_set_retry(good.0, 0, 100, 1000),
            ),
            (
                "set_retry(max < initial)",
                fleetprov_config_set_retry(good.0, 3, 1000, 100),
            ),
            (
                "set_retry(NULL cfg)",
                fleetprov_config_set_retry(ptr::null_mut(), 3, 100, 1000),
            ),
            (
                "set_state_dir(\"\")",
                fleetprov_config_set_state_dir(good.0, empty.as_ptr()),
            ),
            (
                "set_state_dir(bad UTF-8)",
                fleetprov_config_set_state_dir(good.0, bad_utf8),
            ),
            (
                "set_token_lifetime(NULL cfg)",
                fleetprov_config_set_token_lifetime(ptr::null_mut(), 10),
            ),
            (
                "set_ca_pem(garbage)",
                fleetprov_config_set_ca_pem(good.0, garbage.as_ptr()),
            ),
            (
                "set_ca_file(missing)",
                fleetprov_config_set_ca_file(good.0, c"/nonexistent/ca.pem".as_ptr()),
            ),
            (
                "set_claim_pem(empty cert)",
                fleetprov_config_set_claim_pem(good.0, empty.as_ptr(), claim_key.as_ptr()),
            ),
            (
                "set_claim_pem(empty key)",
                fleetprov_config_set_claim_pem(good.0, claim_cert.as_ptr(), empty.as_ptr()),
            ),
            (
                "set_claim_pem(garbage cert)",
                fleetprov_config_set_claim_pem(good.0, garbage.as_ptr(), claim_key.as_ptr()),
            ),
            (
                "set_claim_pem(key as cert)",
                fleetprov_config_set_claim_pem(good.0, claim_key.as_ptr(), claim_key.as_ptr()),
            ),
            (
                "set_claim_pem(wrong key)",
                fleetprov_config_set_claim_pem(good.0, claim_cert.as_ptr(), other_key.as_ptr()),
            ),
            (
                "set_claim_files(NULL)",
                fleetprov_config_set_claim_files(good.0, ptr::null(), ptr::null()),
            ),
            ("set_format(7)", fleetprov_config_set_format(good.0, 7)),
            ("set_format(-1)", fleetprov_config_set_format(good.0, -1)),
            ("set_method(9)", fleetprov_config_set_method(good.0, 9)),
            ("set_key_type(5)", fleetprov_config_set_key_type(good.0, 5)),
            (
                "set_keep_alive(1)",
                fleetprov_config_set_keep_alive(good.0, 1),
            ),
            (
                "set_keep_alive(5000)",
                fleetprov_config_set_keep_alive(good.0, 5000),
            ),
            (
                "set_timeouts(0)",
                fleetprov_config_set_timeouts(good.0, 0, 0),
            ),
            (
                "set_client_id(129)",
                fleetprov_config_set_client_id(good.0, cs(&"c".repeat(129)).as_ptr()),
            ),
            (
                "set_parameter(NULL value)",
                fleetprov_config_set_parameter(good.0, c"k".as_ptr(), ptr::null()),
            ),
            (
                "set_parameter(\"\" key)",
                fleetprov_config_set_parameter(good.0, empty.as_ptr(), c"v".as_ptr()),
            ),
            (
                "set_csr_pem(garbage)",
                fleetprov_config_set_csr_pem(good.0, garbage.as_ptr()),
            ),
            (
                "set_log_callback(level 9)",
                fleetprov_config_set_log_callback(
                    good.0,
                    Some(record_log),
                    ptr::null_mut(),
                    None,
                    9,
                ),
            ),
            (
                "set_output_dir(\"\")",
                fleetprov_config_set_output_dir(good.0, empty.as_ptr()),
            ),
            (
                "provision(NULL cfg)",
                fleetprov_provision(ptr::null(), &mut out_p),
            ),
            (
                "provision(NULL out)",
                fleetprov_provision(good.0, ptr::null_mut()),
            ),
            (
                "client_new(NULL out)",
                fleetprov_client_new(good.0, ptr::null_mut()),
            ),
            (
                "client_connect(NULL)",
                fleetprov_client_connect(ptr::null_mut()),
            ),
            (
                "client_cancel(NULL)",
                fleetprov_client_cancel(ptr::null_mut())
            ),
            (
                "register(NULL client)",
                fleetprov_client_register_thing(
                    ptr::null_mut(),
                    ptr::null(),
                    ptr::null(),
                    ptr::null_mut(),
                ),
            ),
            (
                "provision_async(NULL callback)",
                fleetprov_provision_async(good.0, None, ptr::null_mut(), None, ptr::null_mut()),
            ),
            (
                "operation_cancel(NULL)",
                fleetprov_operation_cancel(ptr::null_mut()),
            ),
        ]
    };
    for (what, got, message) in &rows {
        let expected = expected_message(what);
        assert_eq!(*got, FLEETPROV_INVALID_ARGUMENT, "{what}: {message}");
        assert!(
            message.starts_with("invalid argument: ") && message.contains(expected),
            "{what}: the message {message:?} should contain {expected:?}"
        );
    }
    assert!(out_p.is_null(), "no output written on failure");
    // A getter's answer for NULL (it sets no last error: it is not a failing call).
    // SAFETY: NULL is documented for these getters.
    unsafe {
        assert_eq!(
            fleetprov_error_result(ptr::null()),
            FLEETPROV_INVALID_ARGUMENT
        );
    }

    // The config remembers the setters that failed (each with its last failure): using it
    // reports the first one to fail, not a later error its missing setting would cause.
    let mut p = ptr::null_mut();
    // SAFETY: live config, valid output pointer.
    let r = unsafe { fleetprov_provision(good.0, &mut p) };
    assert_eq!(r, FLEETPROV_INVALID_ARGUMENT);
    let message = last_error();
    assert!(
        message.starts_with(
            "invalid argument: fleetprov_config_set_endpoint() failed earlier, so the config \
             lacks what it was to set: host is not valid UTF-8"
        ),
        "{message}"
    );
    assert!(p.is_null());

    // A config without credentials or template.
    let bare = Config::new();
    // SAFETY: live config, valid output pointers.
    unsafe {
        assert_eq!(
            fleetprov_provision(bare.0, &mut p),
            FLEETPROV_INVALID_ARGUMENT
        );
        assert_eq!(
            fleetprov_client_new(bare.0, &mut out_client),
            FLEETPROV_INVALID_ARGUMENT
        );
    }
    assert!(out_client.is_null(), "no client written on failure");

    // Names of codes; unknown values.
    assert_eq!(s(fleetprov_result_name(0)), "FLEETPROV_OK");
    assert_eq!(s(fleetprov_result_name(6)), "FLEETPROV_REJECTED");
    assert_eq!(s(fleetprov_result_name(12345)), "FLEETPROV_UNKNOWN");
    assert_eq!(s(fleetprov_result_name(-1)), "FLEETPROV_UNKNOWN");
    // Every _free accepts NULL.
    // SAFETY: NULL is documented as a no-op.
    unsafe {
        fleetprov_config_free(ptr::null_mut());
        fleetprov_client_free(ptr::null_mut());
        fleetprov_certificate_free(ptr::null_mut());
        fleetprov_registration_free(ptr::null_mut());
        fleetprov_provisioned_free(ptr::null_mut());
        fleetprov_operation_free(ptr::null_mut());
        fleetprov_error_free(ptr::null_mut());
    }
}

#[test]
fn wrong_server_and_refused_certificate() {
    let env = Env::start();
    // A CA that did not issue the server's certificate.
    let c = env.config("tls");
    let other_ca = rcgen::CertificateParams::new(vec!["x".to_string()])
        .unwrap()
        .self_signed(&rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap())
        .unwrap()
        .pem();
    let other_ca = CString::new(other_ca).unwrap();
    let mut p = ptr::null_mut();
    // SAFETY: live config and strings.
    unsafe {
        ok(fleetprov_config_set_ca_pem(c.0, other_ca.as_ptr()));
        assert_eq!(
            fleetprov_provision(c.0, &mut p),
            FLEETPROV_TLS,
            "{}",
            last_error()
        );
    }
    // Nothing listens there.
    let c = env.config("refused");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    // SAFETY: live config. Connection failures are retried: two quick attempts.
    unsafe {
        ok(fleetprov_config_set_retry(c.0, 2, 50, 50));
        ok(fleetprov_config_set_endpoint(
            c.0,
            c"localhost".as_ptr(),
            port,
        ));
        assert_eq!(
            fleetprov_provision(c.0, &mut p),
            FLEETPROV_CONNECTION,
            "{}",
            last_error()
        );
    }
}

#[test]
fn alpn_on_request_and_required_by_the_server() {
    let env = Env::start_with(|c| c.require_alpn = true);
    let c = env.config("alpn-off");
    let mut p = ptr::null_mut();
    // SAFETY: live config, valid output pointer. A refusal may look like a connection failure,
    // which is retried: two quick attempts.
    let r = unsafe {
        ok(fleetprov_config_set_retry(c.0, 2, 50, 50));
        fleetprov_provision(c.0, &mut p)
    };
    assert!(
        matches!(r, FLEETPROV_CONNECTION | FLEETPROV_TLS),
        "{r:?}: {}",
        last_error()
    );
    let c = env.config("alpn-on");
    // SAFETY: live config, valid output pointer.
    unsafe {
        ok(fleetprov_config_set_alpn(c.0, true));
        ok(fleetprov_provision(c.0, &mut p));
        assert_eq!(s(fleetprov_provisioned_thing_name(p)), "demo-alpn-on");
        fleetprov_provisioned_free(p);
    }
}

type CertOutcome = (fleetprov_result, Option<(String, String)>);

extern "C" fn on_certificate(
    userdata: *mut c_void,
    result: fleetprov_result,
    cert: *mut fleetprov_certificate,
    _e: *const fleetprov_error,
) {
    // SAFETY: userdata is the Sender boxed by the test, alive until free_cert_sender.
    let tx = unsafe { &*(userdata as *const mpsc::Sender<(CertOutcome, usize)>) };
    // SAFETY: `cert` is ours: read it, then hand its address on (freed by the test thread).
    let value = unsafe {
        (!cert.is_null()).then(|| {
            (
                s(fleetprov_certificate_id(cert)),
                s(fleetprov_certificate_ownership_token(cert)),
            )
        })
    };
    tx.send(((result, value), cert as usize)).unwrap();
}

extern "C" fn free_cert_sender(userdata: *mut c_void) {
    // SAFETY: the Box leaked by the test for this userdata, freed once.
    drop(unsafe { Box::from_raw(userdata as *mut mpsc::Sender<(CertOutcome, usize)>) });
}

extern "C" fn on_registration(
    userdata: *mut c_void,
    result: fleetprov_result,
    reg: *mut fleetprov_registration,
    e: *const fleetprov_error,
) {
    // SAFETY: userdata is the Sender owned by the test for the duration of the call.
    let tx = unsafe { &*(userdata as *const mpsc::Sender<(fleetprov_result, String)>) };
    // SAFETY: `reg` is ours to free; `e` is borrowed for this call.
    let text = unsafe {
        let t = if reg.is_null() {
            s(fleetprov_error_code(e))
        } else {
            s(fleetprov_registration_thing_name(reg))
        };
        fleetprov_registration_free(reg);
        t
    };
    tx.send((result, text)).unwrap();
}

#[test]
fn async_client_operations_and_busy() {
    let env = Env::start();
    // Hold the certificate reply so the first operation is still running when the second starts.
    env.emu.faults().add("delay:1500@keys*1".parse().unwrap());
    let c = env.config("async-steps");
    let mut client = ptr::null_mut();
    // SAFETY: live config, valid output pointer.
    ok(unsafe { fleetprov_client_new(c.0, &mut client) });
    let (tx, rx) = mpsc::channel::<(CertOutcome, usize)>();
    let user = Box::into_raw(Box::new(tx)) as *mut c_void;
    // SAFETY: live client; userdata freed by the library.
    ok(unsafe {
        fleetprov_client_create_keys_and_certificate_async(
            client,
            Some(on_certificate),
            user,
            Some(free_cert_sender),
        )
    });
    // One operation at a time.
    let mut cert = ptr::null_mut();
    // SAFETY: live client, valid output pointer.
    assert_eq!(
        unsafe { fleetprov_client_create_keys_and_certificate(client, &mut cert) },
        FLEETPROV_BUSY
    );
    assert!(cert.is_null());
    let ((result, value), addr) = rx.recv_timeout(Duration::from_secs(30)).unwrap();
    assert_eq!(result, FLEETPROV_OK);
    let (id, _token) = value.unwrap();
    assert_eq!(env.cert_status(&id).as_deref(), Some("PENDING_ACTIVATION"));
    let cert = addr as *mut fleetprov_certificate;

    let (tx, rx) = mpsc::channel::<(fleetprov_result, String)>();
    // SAFETY: live client and certificate; `tx` outlives the operation (we wait for its result).
    ok(unsafe {
        fleetprov_client_register_thing_async(
            client,
            cert,
            ptr::null(),
            Some(on_registration),
            &tx as *const _ as *mut c_void,
            None,
        )
    });
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(30)).unwrap(),
        (FLEETPROV_OK, "demo-async-steps".to_string())
    );
    assert_eq!(env.cert_status(&id).as_deref(), Some("ACTIVE"));
    // Reusing the token: the rejection's errorCode arrives in the callback's error.
    // SAFETY: as above.
    ok(unsafe {
        fleetprov_client_register_thing_async(
            client,
            cert,
            ptr::null(),
            Some(on_registration),
            &tx as *const _ as *mut c_void,
            None,
        )
    });
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(30)).unwrap(),
        (
            FLEETPROV_REJECTED,
            "InvalidCertificateOwnershipToken".to_string()
        )
    );
    // SAFETY: freed once each; free waits for the finished worker.
    unsafe {
        fleetprov_certificate_free(cert);
        fleetprov_client_free(client);
    }
}

#[test]
fn secrets_stay_out_of_logs_errors_and_debug() {
    let env = Env::start();
    let lines: Mutex<Vec<(fleetprov_log_level, String)>> = Mutex::new(Vec::new());
    let c = env.config("secrets");
    set_method(&c, fleetprov_method::FLEETPROV_METHOD_CREATE_KEYS);
    // SAFETY: `lines` outlives the config.
    ok(unsafe {
        fleetprov_config_set_log_callback(
            c.0,
            Some(record_log),
            &lines as *const _ as *mut c_void,
            None,
            fleetprov_log_level::FLEETPROV_LOG_DEBUG as i32,
        )
    });
    let mut client = ptr::null_mut();
    // SAFETY: live config, valid output pointer.
    ok(unsafe { fleetprov_client_new(c.0, &mut client) });
    let mut cert = ptr::null_mut();
    // SAFETY: live client.
    ok(unsafe { fleetprov_client_create_keys_and_certificate(client, &mut cert) });
    // SAFETY: live certificate.
    let (key, token) = unsafe {
        (
            s(fleetprov_certificate_private_key(cert)),
            s(fleetprov_certificate_ownership_token(cert)),
        )
    };
    let mut reg = ptr::null_mut();
    // SAFETY: as above; then a second (rejected) use of the token produces an error text.
    unsafe {
        ok(fleetprov_client_register_thing(
            client,
            cert,
            ptr::null(),
            &mut reg,
        ));
        assert_eq!(
            fleetprov_client_register_thing(client, cert, ptr::null(), &mut reg),
            FLEETPROV_REJECTED
        );
    }
    let error_text = last_error();
    let key_body: String = key.lines().nth(1).unwrap().to_owned();
    let lines = lines.lock().unwrap();
    assert!(lines.len() > 5, "debug logging produced lines");
    for text in lines
        .iter()
        .map(|(_, t)| t.as_str())
        .chain([error_text.as_str()])
    {
        assert!(!text.contains(&token), "token leaked: {text}");
        assert!(!text.contains(&key_body), "key leaked: {text}");
    }
    // SAFETY: freed once each.
    unsafe {
        fleetprov_registration_free(reg);
        fleetprov_certificate_free(cert);
        fleetprov_client_free(client);
    }
}

/// The cancellation switch a progress callback triggers at FLEETPROV_STEP_REGISTERING.
extern "C" fn cancel_at_registering(userdata: *mut c_void, progress: *const fleetprov_progress) {
    // SAFETY: userdata is the live switch the test registered; `progress` is valid for the call.
    unsafe {
        if (*progress).step == fleetprov_step::FLEETPROV_STEP_REGISTERING {
            fleetprov_cancel_trigger(userdata as *const fleetprov_cancel);
        }
    }
}

#[test]
fn provisioned_devices_are_not_provisioned_again_and_blocking_calls_cancel() {
    let env = Env::start_with(|c| c.faults = vec!["delay:200@register*1".parse().unwrap()]);
    let c = env.config("idem");
    let out_dir = env.path(&env.dir.join("out-idem"));
    let state_dir = env.path(&env.dir.join("state-idem"));
    let mut cancel = ptr::null_mut();
    // SAFETY: live config and switch; strings and the switch outlive the calls.
    unsafe {
        ok(fleetprov_config_set_output_dir(c.0, out_dir.as_ptr()));
        ok(fleetprov_config_set_state_dir(c.0, state_dir.as_ptr()));
        ok(fleetprov_cancel_new(&mut cancel));
        ok(fleetprov_config_set_cancel(c.0, cancel));
        ok(fleetprov_config_set_progress_callback(
            c.0,
            Some(cancel_at_registering),
            cancel as *mut c_void,
            None,
        ));
    }
    let mut p = ptr::null_mut();
    // SAFETY: live config, valid output pointer.
    unsafe {
        // Cancelled while RegisterThing's reply is delayed: the journal stays.
        assert_eq!(fleetprov_provision(c.0, &mut p), FLEETPROV_CANCELLED);
        assert!(p.is_null());
        assert!(fleetprov_cancel_is_triggered(cancel));
        assert!(env.dir.join("state-idem/journal.json").exists());
        // Still triggered: the next call stops before it starts.
        assert_eq!(fleetprov_provision(c.0, &mut p), FLEETPROV_CANCELLED);
        ok(fleetprov_cancel_reset(cancel));
        ok(fleetprov_config_set_progress_callback(
            c.0,
            None,
            ptr::null_mut(),
            None,
        ));
        ok(fleetprov_provision(c.0, &mut p));
        assert!(fleetprov_provisioned_resumed(p));
        assert!(!fleetprov_provisioned_already_provisioned(p));
        let first = s(fleetprov_provisioned_certificate_id(p));
        fleetprov_provisioned_free(p);

        // At the next boot: the same credentials, nothing sent.
        ok(fleetprov_provision(c.0, &mut p));
        assert!(fleetprov_provisioned_already_provisioned(p));
        assert_eq!(fleetprov_provisioned_attempts(p), 0);
        assert_eq!(s(fleetprov_provisioned_certificate_id(p)), first);
        assert_eq!(s(fleetprov_provisioned_thing_name(p)), "demo-idem");
        assert!(!fleetprov_provisioned_private_key(p).is_null());
        fleetprov_provisioned_free(p);
        assert_eq!(device_certificate_count(&env), 1);

        // Asked for: a new one.
        ok(fleetprov_config_set_reprovision(c.0, true));
        ok(fleetprov_provision(c.0, &mut p));
        assert!(!fleetprov_provisioned_already_provisioned(p));
        assert_ne!(s(fleetprov_provisioned_certificate_id(p)), first);
        fleetprov_provisioned_free(p);
        assert_eq!(device_certificate_count(&env), 2);

        assert_eq!(
            fleetprov_config_set_cancel(ptr::null_mut(), cancel),
            FLEETPROV_INVALID_ARGUMENT
        );
        assert_eq!(
            fleetprov_cancel_reset(ptr::null_mut()),
            FLEETPROV_INVALID_ARGUMENT
        );
        assert_eq!(
            fleetprov_cancel_new(ptr::null_mut()),
            FLEETPROV_INVALID_ARGUMENT
        );
        assert!(!fleetprov_cancel_is_triggered(ptr::null()));
        fleetprov_cancel_trigger(ptr::null());
        fleetprov_cancel_free(cancel); // the config keeps its reference
        ok(fleetprov_config_set_cancel(c.0, ptr::null()));
        fleetprov_cancel_free(ptr::null_mut());
    }
}

/// Certificates in the emulator's registry other than the claim certificate.
fn device_certificate_count(env: &Env) -> usize {
    let claim = std::fs::read_to_string(&env.emu.paths().claim_cert).unwrap();
    let claim = fleetprov::keys::certificate_id(&claim).unwrap();
    env.emu.registry().unwrap()["certificates"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["id"].as_str() != Some(claim.as_str()))
        .count()
}

/// A registration with the given parameters (empty slices are passed as NULL arrays, whatever
/// `count` says); the thing name, or the result code and the last error's text.
fn register_with(
    client: *mut fleetprov_client,
    token: *const c_char,
    names: &[*const c_char],
    values: &[*const c_char],
    count: usize,
) -> Result<String, (fleetprov_result, String)> {
    let mut reg = ptr::null_mut();
    let (n, v) = if names.is_empty() {
        (ptr::null(), ptr::null())
    } else {
        (names.as_ptr(), values.as_ptr())
    };
    // SAFETY: live client; the arrays hold `count` pointers owned by the caller.
    let r = unsafe {
        fleetprov_client_register_thing_with(client, token, ptr::null(), n, v, count, &mut reg)
    };
    if r != FLEETPROV_OK {
        assert!(reg.is_null(), "outputs are written only on success");
        return Err((r, last_error()));
    }
    // SAFETY: live registration, freed once.
    unsafe {
        let name = s(fleetprov_registration_thing_name(reg));
        fleetprov_registration_free(reg);
        Ok(name)
    }
}

/// A row of bad input for fleetprov_client_register_thing_with(): token, names, values,
/// count, and the error text expected.
type BadRegistration = (
    *const c_char,
    Vec<*const c_char>,
    Vec<*const c_char>,
    usize,
    &'static str,
);

#[test]
fn one_client_registers_many_devices_with_their_own_parameters_and_saved_tokens() {
    let env = Env::start();
    let c = env.config("from-the-config");
    let mut client = ptr::null_mut();
    // SAFETY: live config, valid output pointer.
    ok(unsafe { fleetprov_client_new(c.0, &mut client) });
    drop(c);
    let serial = c"SerialNumber";
    let mut tokens = Vec::new();
    for _ in 0..3 {
        let mut cert = ptr::null_mut();
        // SAFETY: live client, valid output pointer.
        ok(unsafe { fleetprov_client_create_keys_and_certificate(client, &mut cert) });
        // SAFETY: live certificate; the token is copied before the free.
        tokens
            .push(CString::new(unsafe { s(fleetprov_certificate_ownership_token(cert)) }).unwrap());
        // SAFETY: freed once: from here on only the saved text of the token is used.
        unsafe { fleetprov_certificate_free(cert) };
    }
    // Bad input, each with the exact error; nothing is sent, the tokens stay good.
    let empty = c"";
    let board = c"board-1";
    let rows: [BadRegistration; 5] = [
        (ptr::null(), vec![], vec![], 0, "ownership_token is NULL"),
        (
            empty.as_ptr(),
            vec![],
            vec![],
            0,
            "ownership_token is empty",
        ),
        (
            tokens[0].as_ptr(),
            vec![],
            vec![],
            1,
            "parameter arrays are NULL with a non-zero count",
        ),
        (
            tokens[0].as_ptr(),
            vec![empty.as_ptr()],
            vec![board.as_ptr()],
            1,
            "parameter name is empty",
        ),
        (
            tokens[0].as_ptr(),
            vec![serial.as_ptr()],
            vec![ptr::null()],
            1,
            "parameter value is NULL",
        ),
    ];
    for (token, names, values, count, expected) in rows {
        let (code, message) = register_with(client, token, &names, &values, count).unwrap_err();
        assert_eq!(code, FLEETPROV_INVALID_ARGUMENT, "{expected}");
        assert!(
            message.contains(expected),
            "{message:?} should say {expected:?}"
        );
    }
    // One claim connection, three boards, each with its own serial number.
    for (i, token) in tokens.iter().enumerate() {
        let value = CString::new(format!("board-{i}")).unwrap();
        let thing = register_with(
            client,
            token.as_ptr(),
            &[serial.as_ptr()],
            &[value.as_ptr()],
            1,
        );
        assert_eq!(thing.unwrap(), format!("demo-board-{i}"));
    }
    // The config's parameters are replaced, not merged: without any, the template refuses.
    let mut cert = ptr::null_mut();
    // SAFETY: live client, valid output pointer.
    ok(unsafe { fleetprov_client_create_keys_and_certificate(client, &mut cert) });
    // SAFETY: live certificate.
    let token = CString::new(unsafe { s(fleetprov_certificate_ownership_token(cert)) }).unwrap();
    let (code, _) = register_with(client, token.as_ptr(), &[], &[], 0).unwrap_err();
    assert_eq!(code, FLEETPROV_REJECTED);
    // The old call still takes the config's.
    let mut reg = ptr::null_mut();
    // SAFETY: live client and certificate, valid output pointer.
    ok(unsafe { fleetprov_client_register_thing(client, cert, ptr::null(), &mut reg) });
    // SAFETY: live registration; everything freed once.
    unsafe {
        assert_eq!(
            s(fleetprov_registration_thing_name(reg)),
            "demo-from-the-config"
        );
        fleetprov_registration_free(reg);
        fleetprov_certificate_free(cert);
        fleetprov_client_free(client);
    }
}
