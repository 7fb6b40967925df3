//! The host-transport C API (`fleetprov_host_*`) driven by a host MQTT stack of its own: here a
//! separate rumqttc client, owned by the test as firmware would own coreMQTT or libmosquitto,
//! against the emulator over TLS. The library opens no socket in these tests.

use std::collections::VecDeque;
use std::ffi::{CStr, CString, c_char, c_void};
use std::ptr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

mod common;

use common::Env;
use fleetprov::client::tls::client_config;
use fleetprov::ffi::*;
use fleetprov::{Roots, Secret};
use fleetprov_result::*;
use rumqttc::{ConnectionError, Event, MqttOptions, Packet, QoS, RecvTimeoutError};

/// What the library asked the host to do, queued by the callbacks.
#[derive(Debug)]
enum Cmd {
    Connect {
        claim: bool,
        cert: Option<String>,
        key: Option<String>,
        client_id: String,
    },
    Disconnect,
    Subscribe(Vec<String>),
    Publish(String, Vec<u8>),
}

#[derive(Default)]
struct Host {
    cmds: Mutex<VecDeque<Cmd>>,
}

fn host_of<'a>(userdata: *mut c_void) -> &'a Host {
    // SAFETY: userdata is the test's Host, alive for the whole flow.
    unsafe { &*(userdata as *const Host) }
}

fn opt(p: *const c_char) -> Option<String> {
    // SAFETY: NULL or a NUL-terminated string valid during the callback.
    (!p.is_null()).then(|| unsafe { CStr::from_ptr(p) }.to_str().unwrap().to_owned())
}

extern "C" fn on_connect(userdata: *mut c_void, identity: *const fleetprov_identity) -> i32 {
    // SAFETY: valid during the call.
    let id = unsafe { &*identity };
    let cmd = Cmd::Connect {
        claim: id.claim,
        cert: opt(id.certificate_pem),
        key: opt(id.private_key_pem),
        client_id: opt(id.client_id).unwrap_or_default(),
    };
    host_of(userdata).cmds.lock().unwrap().push_back(cmd);
    0
}

extern "C" fn on_disconnect(userdata: *mut c_void) {
    host_of(userdata)
        .cmds
        .lock()
        .unwrap()
        .push_back(Cmd::Disconnect);
}

extern "C" fn on_subscribe(userdata: *mut c_void, filters: *const *const c_char, n: usize) -> i32 {
    // SAFETY: `n` filter pointers valid during the call.
    let list = unsafe { std::slice::from_raw_parts(filters, n) };
    let list = list.iter().map(|f| opt(*f).unwrap()).collect();
    host_of(userdata)
        .cmds
        .lock()
        .unwrap()
        .push_back(Cmd::Subscribe(list));
    0
}

extern "C" fn on_publish(
    userdata: *mut c_void,
    topic: *const c_char,
    p: *const u8,
    n: usize,
) -> i32 {
    // SAFETY: valid during the call.
    let payload = unsafe { std::slice::from_raw_parts(p, n) }.to_vec();
    let cmd = Cmd::Publish(opt(topic).unwrap(), payload);
    host_of(userdata).cmds.lock().unwrap().push_back(cmd);
    0
}

const CALLBACKS: fleetprov_host_callbacks = fleetprov_host_callbacks {
    connect: Some(on_connect),
    disconnect: Some(on_disconnect),
    subscribe: Some(on_subscribe),
    publish: Some(on_publish),
};

fn cs(s: &str) -> CString {
    CString::new(s).unwrap()
}

/// fleetprov_host_wake_at(), which must succeed.
fn wake_at(h: *const fleetprov_host) -> u64 {
    let mut wake = 0;
    // SAFETY: a live host object and a valid output pointer.
    assert_eq!(
        unsafe { fleetprov_host_wake_at(h, &mut wake) },
        FLEETPROV_OK
    );
    wake
}

fn ok(r: fleetprov_result) {
    assert_eq!(r, FLEETPROV_OK);
}

/// A config for the host transport: template, parameters, method, directories; no claim files
/// (the host has them), no port.
fn host_config(
    env: &Env,
    serial: &str,
    method: fleetprov_method,
    cbor: bool,
) -> *mut fleetprov_config {
    let mut c = ptr::null_mut();
    let dir = |d: &str| cs(env.dir.join(d).to_str().unwrap());
    // SAFETY: a config this test owns; NUL-terminated strings that outlive each call.
    unsafe {
        ok(fleetprov_config_new(&mut c));
        ok(fleetprov_config_set_template(c, c"DemoTemplate".as_ptr()));
        ok(fleetprov_config_set_parameter(
            c,
            c"SerialNumber".as_ptr(),
            cs(serial).as_ptr(),
        ));
        ok(fleetprov_config_set_method(c, method as i32));
        ok(fleetprov_config_set_format(c, i32::from(cbor)));
        ok(fleetprov_config_set_output_dir(c, dir("out").as_ptr()));
        ok(fleetprov_config_set_state_dir(c, dir("state").as_ptr()));
        ok(fleetprov_config_set_timeouts(c, 2_000, 30_000));
        ok(fleetprov_config_set_retry(c, 5, 50, 200));
    }
    c
}

struct Link {
    client: rumqttc::Client,
    conn: rumqttc::Connection,
    connecting: bool,
}

/// The host's event loop: performs the library's requests with its own MQTT client and reports
/// what happens, until the flow is done. Returns the result code and the provisioned object.
fn drive(
    env: &Env,
    config: *const fleetprov_config,
    own_key: Option<String>,
) -> (fleetprov_result, *mut fleetprov_provisioned, Vec<String>) {
    let host = Host::default();
    let mut h = ptr::null_mut();
    // SAFETY: live config; `host` outlives the host object (freed below).
    ok(unsafe {
        fleetprov_host_new(
            config,
            &CALLBACKS,
            &host as *const Host as *mut c_void,
            None,
            &mut h,
        )
    });
    let origin = Instant::now();
    let now = || origin.elapsed().as_millis() as u64;
    let paths = env.emu.paths();
    let read = |p: &std::path::Path| std::fs::read_to_string(p).unwrap();
    let (claim_cert, claim_key, ca) = (
        read(&paths.claim_cert),
        read(&paths.claim_key),
        read(&paths.ca_cert),
    );
    // SAFETY: live host object.
    ok(unsafe { fleetprov_host_start(h, now()) });
    let mut link: Option<Link> = None;
    let mut out = ptr::null_mut();
    let mut result = FLEETPROV_IN_PROGRESS;
    let mut seen = Vec::new();
    // Bounded in steps and in time: a flow that stalls fails the test in two minutes.
    for _ in 0..20_000 {
        assert!(
            origin.elapsed() < Duration::from_secs(120),
            "the flow did not finish in 120 s: {seen:#?}"
        );
        loop {
            let Some(cmd) = host.cmds.lock().unwrap().pop_front() else {
                break;
            };
            seen.push(match &cmd {
                Cmd::Connect { claim, .. } => format!("connect claim={claim}"),
                Cmd::Disconnect => "disconnect".into(),
                Cmd::Subscribe(f) => format!("subscribe {}", f.len()),
                Cmd::Publish(t, _) => format!("publish {t}"),
            });
            match cmd {
                Cmd::Connect {
                    claim,
                    cert,
                    key,
                    client_id,
                } => {
                    let (cert, key) = if claim {
                        (claim_cert.clone(), claim_key.clone())
                    } else {
                        // No key from the library: the host's own (its "secure element").
                        (
                            cert.unwrap(),
                            key.or_else(|| own_key.clone()).expect("a key"),
                        )
                    };
                    let tls =
                        client_config(&Roots::Pem(ca.clone()), &cert, &Secret::new(key), false)
                            .unwrap();
                    let id = if client_id.is_empty() {
                        format!("host-{}", now())
                    } else {
                        client_id
                    };
                    let mut o = MqttOptions::new(id, "localhost", env.emu.port());
                    o.set_keep_alive(Duration::from_secs(30));
                    o.set_transport(rumqttc::Transport::Tls(rumqttc::TlsConfiguration::Rustls(
                        tls,
                    )));
                    let (client, conn) = rumqttc::Client::new(o, 16);
                    link = Some(Link {
                        client,
                        conn,
                        connecting: true,
                    });
                }
                Cmd::Disconnect => {
                    if let Some(l) = link.take() {
                        let _ = l.client.try_disconnect();
                    }
                }
                Cmd::Subscribe(filters) => {
                    let l = link.as_ref().expect("subscribe on a connection");
                    l.client
                        .subscribe_many(
                            filters
                                .into_iter()
                                .map(|f| rumqttc::SubscribeFilter::new(f, QoS::AtLeastOnce)),
                        )
                        .unwrap();
                }
                Cmd::Publish(topic, payload) => {
                    let l = link.as_ref().expect("publish on a connection");
                    l.client
                        .publish(topic, QoS::AtLeastOnce, false, payload)
                        .unwrap();
                }
            }
        }
        // SAFETY: live host object, valid output pointer.
        result = unsafe { fleetprov_host_result(h, &mut out) };
        if result != FLEETPROV_IN_PROGRESS {
            break;
        }
        let wake = wake_at(h);
        let wait = Duration::from_millis(wake.saturating_sub(now()).min(200));
        let r = match &mut link {
            // Waiting for the flow's own timer (a backoff pause): nothing else can happen.
            None => {
                std::thread::sleep(wait);
                // SAFETY: live host object.
                unsafe { fleetprov_host_tick(h, now()) }
            }
            Some(l) => match l.conn.recv_timeout(wait) {
                Err(RecvTimeoutError::Timeout) | Ok(Ok(Event::Outgoing(_))) => {
                    // SAFETY: live host object.
                    unsafe { fleetprov_host_tick(h, now()) }
                }
                Err(RecvTimeoutError::Disconnected) => panic!("rumqttc's channel closed"),
                Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) if l.connecting => {
                    l.connecting = false;
                    // SAFETY: live host object.
                    unsafe { fleetprov_host_connected(h, now()) }
                }
                Ok(Ok(Event::Incoming(Packet::SubAck(ack)))) => {
                    // The return codes as they are on the wire: the QoS granted, or 0x80.
                    let codes: Vec<u8> = ack
                        .return_codes
                        .iter()
                        .map(|c| match c {
                            rumqttc::SubscribeReasonCode::Success(qos) => *qos as u8,
                            rumqttc::SubscribeReasonCode::Failure => 0x80,
                        })
                        .collect();
                    // SAFETY: live host object; `codes` outlives the call.
                    unsafe { fleetprov_host_suback(h, codes.as_ptr(), codes.len(), now()) }
                }
                Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                    let topic = cs(&p.topic);
                    // SAFETY: live host object; the strings outlive the call.
                    unsafe {
                        fleetprov_host_message(
                            h,
                            topic.as_ptr(),
                            p.payload.as_ptr(),
                            p.payload.len(),
                            now(),
                        )
                    }
                }
                Ok(Ok(Event::Incoming(_))) => FLEETPROV_OK,
                Ok(Err(e)) => {
                    let connecting = l.connecting;
                    link = None;
                    let tls = matches!(&e, ConnectionError::Tls(_))
                        || matches!(&e, ConnectionError::Io(io) if io.get_ref().is_some_and(|i| i.downcast_ref::<rustls::Error>().is_some()));
                    seen.push(format!("connection error (tls={tls})"));
                    // SAFETY: live host object.
                    unsafe {
                        if connecting {
                            fleetprov_host_connect_failed(h, tls, now())
                        } else {
                            fleetprov_host_disconnected(h, now())
                        }
                    }
                }
            },
        };
        ok(r);
    }
    // SAFETY: freed once; `host` is still alive.
    unsafe { fleetprov_host_free(h) };
    (result, out, seen)
}

#[test]
fn a_host_stack_provisions_with_both_methods_and_formats() {
    for (i, (method, cbor)) in [
        (fleetprov_method::FLEETPROV_METHOD_CSR, false),
        (fleetprov_method::FLEETPROV_METHOD_CREATE_KEYS, true),
    ]
    .into_iter()
    .enumerate()
    {
        let env = common::env("host", &format!("ok-{i}"), &[]);
        let c = host_config(&env, &format!("host{i}"), method, cbor);
        let (r, p, seen) = drive(&env, c, None);
        assert_eq!(r, FLEETPROV_OK, "{seen:#?}");
        // SAFETY: a live result, freed once.
        unsafe {
            let name = CStr::from_ptr(fleetprov_provisioned_thing_name(p))
                .to_str()
                .unwrap();
            assert_eq!(name, format!("demo-host{i}"));
            assert!(!fleetprov_provisioned_output_dir(p).is_null());
            fleetprov_provisioned_free(p);
            fleetprov_config_free(c);
        }
        assert_eq!(
            seen,
            [
                "connect claim=true",
                "subscribe 4",
                &format!(
                    "publish $aws/certificates/{}/{}",
                    if i == 0 { "create-from-csr" } else { "create" },
                    if cbor { "cbor" } else { "json" }
                ),
                &format!(
                    "publish $aws/provisioning-templates/DemoTemplate/provision/{}",
                    if cbor { "cbor" } else { "json" }
                ),
                "disconnect",
                "connect claim=false",
                "disconnect",
            ]
        );
        let certs = common::device_certificates(&env.emu);
        assert_eq!(certs.len(), 1);
        assert_eq!(certs[0].1, "ACTIVE");
        assert!(env.dir.join("out/private.key").exists());
        assert!(!env.dir.join("state/journal.json").exists());

        // The next boot: the flow ends at start with the stored credentials; the host's stack
        // is asked for nothing.
        let c = host_config(&env, &format!("host{i}"), method, cbor);
        let (r, p, seen) = drive(&env, c, None);
        assert_eq!(r, FLEETPROV_OK, "{seen:#?}");
        assert!(seen.is_empty(), "{seen:#?}");
        // SAFETY: a live result, freed once.
        unsafe {
            assert!(fleetprov_provisioned_already_provisioned(p));
            assert_eq!(
                CStr::from_ptr(fleetprov_provisioned_certificate_id(p))
                    .to_str()
                    .unwrap(),
                certs[0].0
            );
            fleetprov_provisioned_free(p);
            fleetprov_config_free(c);
        }
        assert_eq!(common::device_certificates(&env.emu).len(), 1);
    }
}

#[test]
fn a_host_stack_gets_retries_and_the_lost_reply_probe() {
    let env = common::env(
        "host",
        "faults",
        // One rule per request: a rejection and a close on the same request would both fire
        // (the close wins), and the token would never be used up.
        &["close:request@register*1", "close:processed@register*1"],
    );
    let c = host_config(&env, "hostf", fleetprov_method::FLEETPROV_METHOD_CSR, false);
    let (r, p, seen) = drive(&env, c, None);
    assert_eq!(r, FLEETPROV_OK, "{seen:#?}");
    // SAFETY: a live result and config, freed once.
    let (name, confirmed) = unsafe {
        assert!(fleetprov_provisioned_attempts(p) >= 3, "{seen:#?}");
        let name = CStr::from_ptr(fleetprov_provisioned_thing_name(p))
            .to_string_lossy()
            .into_owned();
        let confirmed = fleetprov_provisioned_registration_confirmed(p);
        fleetprov_provisioned_free(p);
        fleetprov_config_free(c);
        (name, confirmed)
    };
    let certs = common::device_certificates(&env.emu);
    assert_eq!(
        certs,
        vec![(certs[0].0.clone(), "ACTIVE".to_string())],
        "one certificate: {seen:#?}"
    );
    // The probe: the last RegisterThing was refused (its token had been used by the attempt
    // whose reply was lost), and the flow connected with the new certificate to learn that it
    // was registered. An accepted RegisterThing would have given the thing name; the probe
    // cannot, so the name is empty and the registration confirmed.
    let last_register = seen
        .iter()
        .rposition(|s| s.starts_with("publish $aws/provisioning-templates/"))
        .expect("RegisterThing was sent");
    assert!(
        seen[last_register + 1..]
            .iter()
            .any(|s| s.starts_with("connect claim=false")),
        "{seen:#?}"
    );
    assert!(
        name.is_empty(),
        "the name came with the lost reply: {name:?}"
    );
    assert!(confirmed, "confirmed by connecting");
}

#[test]
fn host_api_arguments_are_checked() {
    let env = common::env("host", "args", &[]);
    let c = host_config(&env, "args", fleetprov_method::FLEETPROV_METHOD_CSR, false);
    let mut h = ptr::null_mut();
    let missing = fleetprov_host_callbacks {
        publish: None,
        ..CALLBACKS
    };
    // SAFETY: each call passes NULL or live pointers owned by this test.
    unsafe {
        assert_eq!(
            fleetprov_host_new(c, &missing, ptr::null_mut(), None, &mut h),
            FLEETPROV_INVALID_ARGUMENT
        );
        assert_eq!(
            fleetprov_host_new(c, ptr::null(), ptr::null_mut(), None, &mut h),
            FLEETPROV_INVALID_ARGUMENT
        );
        assert_eq!(
            fleetprov_host_new(ptr::null(), &CALLBACKS, ptr::null_mut(), None, &mut h),
            FLEETPROV_INVALID_ARGUMENT
        );
        assert_eq!(
            fleetprov_host_new(c, &CALLBACKS, ptr::null_mut(), None, ptr::null_mut()),
            FLEETPROV_INVALID_ARGUMENT
        );
        assert_eq!(
            fleetprov_host_start(ptr::null_mut(), 0),
            FLEETPROV_INVALID_ARGUMENT
        );
        assert_eq!(
            fleetprov_host_tick(ptr::null_mut(), 0),
            FLEETPROV_INVALID_ARGUMENT
        );
        let mut wake = 7;
        assert_eq!(
            fleetprov_host_wake_at(ptr::null(), &mut wake),
            FLEETPROV_INVALID_ARGUMENT
        );
        assert_eq!(wake, 7, "nothing written on failure");
        let host = Host::default();
        ok(fleetprov_host_new(
            c,
            &CALLBACKS,
            &host as *const Host as *mut c_void,
            None,
            &mut h,
        ));
        let mut out = ptr::null_mut();
        assert_eq!(fleetprov_host_result(h, &mut out), FLEETPROV_IN_PROGRESS);
        assert_eq!(
            fleetprov_host_wake_at(h, ptr::null_mut()),
            FLEETPROV_INVALID_ARGUMENT
        );
        assert_eq!(wake_at(h), u64::MAX, "not started: no timer");
        assert_eq!(
            fleetprov_host_message(h, ptr::null(), ptr::null(), 0, 0),
            FLEETPROV_INVALID_ARGUMENT
        );
        assert_eq!(
            fleetprov_host_message(h, c"t".as_ptr(), ptr::null(), 5, 0),
            FLEETPROV_INVALID_ARGUMENT
        );
        assert_eq!(
            fleetprov_host_suback(h, ptr::null(), 2, 0),
            FLEETPROV_INVALID_ARGUMENT
        );
        ok(fleetprov_host_start(h, 0));
        assert_eq!(host.cmds.lock().unwrap().len(), 1, "asked to connect");
        assert!(wake_at(h) <= 2_000, "the connect step timeout is armed");
        // The connection never comes: the step times out and is retried after a pause.
        ok(fleetprov_host_tick(h, 2_000));
        assert_eq!(fleetprov_host_result(h, &mut out), FLEETPROV_IN_PROGRESS);
        fleetprov_host_free(h);
        fleetprov_host_free(ptr::null_mut());
        fleetprov_config_free(c);
    }
}

/// The "secure element" of the signer test: a ring P-256 key the library never sees.
struct Element {
    pair: ring::signature::EcdsaKeyPair,
    signed: Mutex<u32>,
}

extern "C" fn element_sign(
    userdata: *mut c_void,
    message: *const u8,
    message_len: usize,
    digest: *const u8,
    digest_len: usize,
    signature: *mut u8,
    signature_len: *mut usize,
) -> i32 {
    // SAFETY: userdata is the test's Element; the buffers are valid during the call.
    let (el, message, sig_room) = unsafe {
        (
            &*(userdata as *const Element),
            std::slice::from_raw_parts(message, message_len),
            *signature_len,
        )
    };
    assert_eq!(digest_len, 32);
    assert!(!digest.is_null());
    let sig = el
        .pair
        .sign(&ring::rand::SystemRandom::new(), message)
        .unwrap();
    let sig = sig.as_ref();
    assert!(sig.len() <= sig_room);
    // SAFETY: `signature` has `sig_room` writable bytes.
    unsafe {
        ptr::copy_nonoverlapping(sig.as_ptr(), signature, sig.len());
        *signature_len = sig.len();
    }
    *el.signed.lock().unwrap() += 1;
    0
}

#[test]
fn an_external_signer_with_a_host_stack_keeps_the_key_in_the_element() {
    use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
    let env = common::env("host", "signer", &[]);
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
    let pair =
        EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng).unwrap();
    let point = pair.public_key().as_ref().to_vec();
    let own_pem = pem_of(pkcs8.as_ref());
    let el = Element {
        pair,
        signed: Mutex::new(0),
    };
    let c = host_config(
        &env,
        "signer",
        fleetprov_method::FLEETPROV_METHOD_CSR,
        false,
    );
    // SAFETY: live config; `el` outlives the flow; the output directory must go (no key).
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
        // A public key that is not one.
        assert_eq!(
            fleetprov_config_set_signer(
                c,
                point.as_ptr(),
                10,
                Some(element_sign),
                ptr::null_mut(),
                None
            ),
            FLEETPROV_INVALID_ARGUMENT
        );
        assert_eq!(
            fleetprov_config_set_signer(
                c,
                point.as_ptr(),
                point.len(),
                None,
                ptr::null_mut(),
                None
            ),
            FLEETPROV_INVALID_ARGUMENT
        );
    }
    let (r, p, seen) = drive(&env, c, Some(own_pem));
    assert_eq!(r, FLEETPROV_OK, "{seen:#?}");
    assert_eq!(*el.signed.lock().unwrap(), 1, "one CSR signature");
    // The new certificate connected with the element's key (the library had none to give).
    assert!(
        seen.contains(&"connect claim=false".to_string()),
        "{seen:#?}"
    );
    // SAFETY: live result and config, freed once.
    unsafe {
        assert!(fleetprov_provisioned_private_key(p).is_null());
        let cert = CStr::from_ptr(fleetprov_provisioned_certificate_pem(p))
            .to_str()
            .unwrap();
        // The certificate holds the element's public key.
        let der: Vec<u8> = rustls::pki_types::pem::PemObject::from_pem_slice(cert.as_bytes())
            .map(|c: rustls::pki_types::CertificateDer<'static>| c.to_vec())
            .unwrap();
        assert!(der.windows(point.len()).any(|w| w == point.as_slice()));
        fleetprov_provisioned_free(p);
        fleetprov_config_free(c);
    }
}

/// PKCS#8 DER as PEM.
fn pem_of(der: &[u8]) -> String {
    const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = String::new();
    for chunk in der.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, b)| acc | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                b64.push(B64[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                b64.push('=');
            }
        }
    }
    let body: Vec<&str> = b64
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    format!(
        "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
        body.join("\n")
    )
}
