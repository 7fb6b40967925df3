//! A host MQTT stack for the host-transport C API (`fleetprov_host_*`): a separate rumqttc
//! client, owned by the test as firmware would own coreMQTT or libmosquitto, performing what the
//! library asks through its callbacks; and a "secure element" for the external signer.

use std::collections::VecDeque;
use std::ffi::{c_char, c_void, CStr, CString};
use std::ptr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::Env;
use fleetprov::ffi::*;
use fleetprov_result::*;
use rumqttc::{ConnectionError, Event, MqttOptions, Packet, QoS, RecvTimeoutError};

/// What the library asked the host to do, queued by the callbacks.
#[derive(Debug)]
pub enum Cmd {
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
pub struct Host {
    pub cmds: Mutex<VecDeque<Cmd>>,
}

pub fn host_of<'a>(userdata: *mut c_void) -> &'a Host {
    // SAFETY: userdata is the test's Host, alive for the whole flow.
    unsafe { &*(userdata as *const Host) }
}

pub fn opt(p: *const c_char) -> Option<String> {
    // SAFETY: NULL or a NUL-terminated string valid during the callback.
    (!p.is_null()).then(|| unsafe { CStr::from_ptr(p) }.to_str().unwrap().to_owned())
}

pub extern "C" fn on_connect(userdata: *mut c_void, identity: *const fleetprov_identity) -> i32 {
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

pub extern "C" fn on_disconnect(userdata: *mut c_void) {
    host_of(userdata)
        .cmds
        .lock()
        .unwrap()
        .push_back(Cmd::Disconnect);
}

pub extern "C" fn on_subscribe(
    userdata: *mut c_void,
    filters: *const *const c_char,
    n: usize,
) -> i32 {
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

pub extern "C" fn on_publish(
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

pub const CALLBACKS: fleetprov_host_callbacks = fleetprov_host_callbacks {
    size: std::mem::size_of::<fleetprov_host_callbacks>(),
    connect: Some(on_connect),
    disconnect: Some(on_disconnect),
    subscribe: Some(on_subscribe),
    publish: Some(on_publish),
};

pub fn cs(s: &str) -> CString {
    CString::new(s).unwrap()
}

/// fleetprov_host_wake_at(), which must succeed.
pub fn wake_at(h: *const fleetprov_host) -> u64 {
    let mut wake = 0;
    // SAFETY: a live host object and a valid output pointer.
    assert_eq!(
        unsafe { fleetprov_host_wake_at(h, &mut wake) },
        FLEETPROV_OK
    );
    wake
}

pub fn ok(r: fleetprov_result) {
    assert_eq!(r, FLEETPROV_OK, "{}", super::last_error());
}

/// A config for the host transport: template, parameters, method, directories; no claim files
/// (the host has them), no port.
pub fn host_config(
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

/// The host's own TLS, as firmware has its own (not the library's, which a build without the
/// `transport` feature lacks): rustls with ring, trusting `ca_pem`, authenticating with
/// `cert_pem` and `key_pem`.
fn host_tls(ca_pem: &str, cert_pem: &str, key_pem: &str) -> std::sync::Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(ca.expect("the CA's PEM")).unwrap();
    }
    let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .expect("the certificate's PEM");
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).expect("the key's PEM");
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .expect("the host's credentials");
    std::sync::Arc::new(config)
}

pub struct Link {
    client: rumqttc::Client,
    conn: rumqttc::Connection,
    connecting: bool,
}

/// The host's event loop: performs the library's requests with its own MQTT client and reports
/// what happens, until the flow is done. Returns the result code and the provisioned object.
pub fn drive(
    env: &Env,
    config: *const fleetprov_config,
    own_key: Option<String>,
) -> (fleetprov_result, *mut fleetprov_provisioned, Vec<String>) {
    drive_with(env, config, own_key, false)
}

/// The body of a message a correct library ignores: taken for a reply, it would fail the step
/// (JSON and CBOR alike).
pub const NOT_A_REPLY: &[u8] = b"\xff not a reply";

/// [`drive`]; `noisy`: every incoming PUBLISH is reported after two look-alikes the flow must
/// ignore, each with the body [`NOT_A_REPLY`] — its topic followed by a byte that is not UTF-8,
/// and followed by a NUL and more — and then from a buffer holding its topic and more bytes
/// ("#garbage"), with a `topic_len` that covers the topic only.
pub fn drive_with(
    env: &Env,
    config: *const fleetprov_config,
    own_key: Option<String>,
    noisy: bool,
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
                    let tls = host_tls(&ca, &cert, &key);
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
                    let topic = p.topic.as_bytes();
                    let mut buf = topic.to_vec();
                    if noisy {
                        for suffix in [&b"\xff"[..], b"\0/accepted"] {
                            let look_alike = [topic, suffix].concat();
                            // SAFETY: live host object; the buffers outlive the call.
                            ok(unsafe {
                                fleetprov_host_message(
                                    h,
                                    look_alike.as_ptr(),
                                    look_alike.len(),
                                    NOT_A_REPLY.as_ptr(),
                                    NOT_A_REPLY.len(),
                                    now(),
                                )
                            });
                        }
                        buf.extend_from_slice(b"#garbage");
                    }
                    // SAFETY: live host object; `buf` holds at least `topic.len()` bytes and
                    // outlives the call, as does the payload.
                    unsafe {
                        fleetprov_host_message(
                            h,
                            buf.as_ptr(),
                            topic.len(),
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
/// The "secure element" of the signer test: a ring P-256 key the library never sees.
pub struct Element {
    pub pair: ring::signature::EcdsaKeyPair,
    pub signed: Mutex<u32>,
}

pub extern "C" fn element_sign(
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

/// PKCS#8 DER as PEM.
pub fn pem_of(der: &[u8]) -> String {
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
