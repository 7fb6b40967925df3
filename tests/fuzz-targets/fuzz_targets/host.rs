//! The host-transport API through its C entry points (fleetprov_host_*), driven by a fake MQTT
//! stack: the input decodes into a setup and a sequence of events in any order, at any times,
//! with any SUBACK codes and messages (on the flow's own reply topics too, with arbitrary or
//! valid JSON/CBOR bodies); the fake stack's callbacks record what they are asked, and on
//! instruction return failures or re-enter the event functions (or free the host).
//! Layout: `fleetprov_fuzz::host`.
//!
//! Invariants: no panic (a FLEETPROV_PANIC result included); every call gives OK, IN_PROGRESS
//! or one failure code of a flow; the result never changes once given; wake_at is UINT64_MAX
//! before the start and after the end and never later than the overall deadline in between;
//! an event at or past the overall deadline ends the flow, and ticking past it at the end of
//! the input always does; everything is freed (the userdata exactly once; LeakSanitizer sees
//! the rest).

#![no_main]

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::ffi::{CStr, CString, c_char, c_void};
use std::ptr;

use fleetprov::ffi::fleetprov_result::*;
use fleetprov::ffi::*;
use fleetprov::protocol::Format;
use fleetprov_fuzz::host::*;
use fleetprov_fuzz::{
    Reader, TEMPLATE, apis, certificate_reply, encode, material, register_reply, rejection,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| run(data));

/// The fake MQTT stack: the callbacks' userdata.
#[derive(Default)]
struct Stack {
    host: Cell<*mut fleetprov_host>,
    now: Cell<u64>,
    auto: bool,
    /// Instructions for the next callbacks.
    directives: RefCell<VecDeque<u8>>,
    /// Filters in the last SUBSCRIBE; topic of the last publish.
    filters: Cell<usize>,
    last_publish: RefCell<Option<String>>,
    /// fleetprov_host_free() was called from a callback.
    freed: Cell<bool>,
    userdata_frees: Cell<u32>,
    /// The latest time of an event fed after the start.
    started_at: Cell<Option<u64>>,
    latest_event: Cell<u64>,
    in_callback: Cell<u32>,
}

#[derive(Clone, Copy)]
enum Callback {
    Connect,
    Disconnect,
    Subscribe,
    Publish,
}

fn stack<'a>(userdata: *mut c_void) -> &'a Stack {
    // SAFETY: the userdata is the driver's Stack, which outlives the host object.
    unsafe { &*(userdata as *const Stack) }
}

/// A C string argument: NUL-terminated, valid UTF-8.
fn text<'a>(p: *const c_char) -> &'a str {
    assert!(!p.is_null());
    // SAFETY: the library passes NUL-terminated strings valid during the callback.
    unsafe { CStr::from_ptr(p) }
        .to_str()
        .expect("UTF-8 from the library")
}

unsafe extern "C" fn on_connect(userdata: *mut c_void, identity: *const fleetprov_identity) -> i32 {
    // SAFETY: valid during the call.
    let id = unsafe { identity.as_ref() }.expect("identity");
    if id.claim {
        assert!(id.certificate_pem.is_null() && id.private_key_pem.is_null());
    } else {
        assert!(text(id.certificate_pem).contains("BEGIN CERTIFICATE"));
        if !id.private_key_pem.is_null() {
            assert!(text(id.private_key_pem).contains("PRIVATE KEY"));
        }
    }
    let _ = text(id.client_id);
    act(stack(userdata), Callback::Connect)
}

unsafe extern "C" fn on_disconnect(userdata: *mut c_void) {
    act(stack(userdata), Callback::Disconnect);
}

unsafe extern "C" fn on_subscribe(
    userdata: *mut c_void,
    filters: *const *const c_char,
    count: usize,
) -> i32 {
    assert!(count > 0 && !filters.is_null());
    // SAFETY: `count` pointers, valid during the call.
    for f in unsafe { std::slice::from_raw_parts(filters, count) } {
        assert!(text(*f).starts_with("$aws/"));
    }
    let s = stack(userdata);
    s.filters.set(count);
    act(s, Callback::Subscribe)
}

unsafe extern "C" fn on_publish(
    userdata: *mut c_void,
    topic: *const c_char,
    payload: *const u8,
    len: usize,
) -> i32 {
    assert!(!payload.is_null() || len == 0);
    let s = stack(userdata);
    *s.last_publish.borrow_mut() = Some(text(topic).to_owned());
    act(s, Callback::Publish)
}

unsafe extern "C" fn on_userdata_free(userdata: *mut c_void) {
    let s = stack(userdata);
    s.userdata_frees.set(s.userdata_frees.get() + 1);
}

unsafe extern "C" fn on_log(
    _userdata: *mut c_void,
    _level: fleetprov_log_level,
    message: *const c_char,
    len: usize,
) {
    assert!(!message.is_null());
    // SAFETY: `len` bytes valid during the call.
    let line = unsafe { std::slice::from_raw_parts(message.cast::<u8>(), len) };
    assert!(std::str::from_utf8(line).is_ok());
    assert!(!String::from_utf8_lossy(line).contains(&material().token));
}

unsafe extern "C" fn on_progress(_userdata: *mut c_void, progress: *const fleetprov_progress) {
    // SAFETY: valid during the call.
    let p = unsafe { progress.as_ref() }.expect("progress");
    assert!(p.attempt >= 1);
}

const CALLBACKS: fleetprov_host_callbacks = fleetprov_host_callbacks {
    size: std::mem::size_of::<fleetprov_host_callbacks>(),
    connect: Some(on_connect),
    disconnect: Some(on_disconnect),
    subscribe: Some(on_subscribe),
    publish: Some(on_publish),
};

/// What a callback does: the next instruction, or (auto) what a good broker would do next.
fn act(s: &Stack, callback: Callback) -> i32 {
    s.in_callback.set(s.in_callback.get() + 1);
    let directive = s
        .directives
        .borrow_mut()
        .pop_front()
        .unwrap_or(match callback {
            _ if !s.auto => D_NOTHING,
            Callback::Connect => D_CONNECTED,
            Callback::Subscribe => D_SUBACK_GRANTED,
            Callback::Publish => D_REPLY_ACCEPTED,
            Callback::Disconnect => D_NOTHING,
        });
    if trace() {
        eprintln!("callback at {}: directive {directive:#04x}", s.now.get());
    }
    if !s.freed.get() {
        reenter(s, directive & !3);
    }
    s.in_callback.set(s.in_callback.get() - 1);
    match directive & 3 {
        2 => -1,
        3 => 7,
        _ => 0,
    }
}

/// An event function called from inside a callback: queued, so OK.
fn reenter(s: &Stack, what: u8) {
    let host = s.host.get();
    let now = s.now.get();
    let fed = |r: fleetprov_result, at: u64| {
        assert_eq!(r, FLEETPROV_OK, "an event from a callback");
        note_event(s, at);
    };
    // SAFETY: `host` is live (not freed: checked by the caller); the arguments are valid.
    unsafe {
        match what {
            D_CONNECTED => fed(fleetprov_host_connected(host, now), now),
            D_CONNECT_FAILED => fed(fleetprov_host_connect_failed(host, false, now), now),
            D_CONNECT_FAILED_TLS => fed(fleetprov_host_connect_failed(host, true, now), now),
            D_SUBACK_GRANTED | D_SUBACK_REFUSED => {
                let mut codes = vec![1u8; s.filters.get().max(1)];
                if what == D_SUBACK_REFUSED
                    && let Some(last) = codes.last_mut()
                {
                    *last = 0x80;
                }
                fed(
                    fleetprov_host_suback(host, codes.as_ptr(), codes.len(), now),
                    now,
                );
            }
            D_REPLY_ACCEPTED | D_REPLY_REJECTED | D_REPLY_TOKEN_REFUSED => {
                let Some(request) = s.last_publish.borrow().clone() else {
                    return;
                };
                let format = if request.ends_with("cbor") {
                    Format::Cbor
                } else {
                    Format::Json
                };
                let (topic, body) = match what {
                    D_REPLY_ACCEPTED if request.contains("/provision/") => {
                        ("accepted", register_reply("fuzz-thing"))
                    }
                    D_REPLY_ACCEPTED => (
                        "accepted",
                        certificate_reply(!request.contains("create-from-csr")),
                    ),
                    D_REPLY_REJECTED => ("rejected", rejection(503, "ServiceUnavailable")),
                    _ => (
                        "rejected",
                        rejection(400, "InvalidCertificateOwnershipToken"),
                    ),
                };
                let topic = format!("{request}/{topic}");
                let body = encode(format, &body);
                let r = fleetprov_host_message(
                    host,
                    topic.as_ptr(),
                    topic.len(),
                    body.as_ptr(),
                    body.len(),
                    now,
                );
                fed(r, now);
            }
            D_DISCONNECTED => fed(fleetprov_host_disconnected(host, now), now),
            D_TICK => fed(fleetprov_host_tick(host, now), now),
            D_TICK_LATE => {
                let late = now.saturating_add(10_000_000);
                fed(fleetprov_host_tick(host, late), late);
            }
            D_RESULT => {
                let mut out = ptr::null_mut();
                assert_eq!(fleetprov_host_result(host, &mut out), FLEETPROV_IN_PROGRESS);
                assert!(out.is_null());
            }
            D_WAKE_AT => {
                let mut out = 1u64;
                assert_eq!(fleetprov_host_wake_at(host, &mut out), FLEETPROV_OK);
                assert_eq!(out, 0, "tick now, while events are being handled");
            }
            D_FREE => {
                fleetprov_host_free(host);
                s.freed.set(true);
            }
            _ => {}
        }
    }
}

fn note_event(s: &Stack, at: u64) {
    if s.started_at.get().is_some() {
        s.latest_event.set(s.latest_event.get().max(at));
    }
}

/// The driver's view of the outcome.
#[derive(Default)]
struct Outcome {
    code: Option<fleetprov_result>,
    taken: bool,
}

/// The codes a flow can end with (a certificate reply whose PEM cannot be read is a
/// FLEETPROV_MALFORMED_REPLY like any other bad reply).
const FLOW_FAILURES: [fleetprov_result; 8] = [
    FLEETPROV_TLS,
    FLEETPROV_CONNECTION,
    FLEETPROV_TIMEOUT,
    FLEETPROV_DEADLINE,
    FLEETPROV_REJECTED,
    FLEETPROV_MALFORMED_REPLY,
    FLEETPROV_SUBSCRIBE_FAILED,
    FLEETPROV_CERTIFICATE_MISMATCH,
];

/// Asks for the result and checks it against what was seen before; true once it is final.
fn result(s: &Stack, outcome: &mut Outcome) -> bool {
    let mut out = ptr::null_mut();
    // SAFETY: a live host and a valid output pointer.
    let r = unsafe { fleetprov_host_result(s.host.get(), &mut out) };
    match (r, outcome.code) {
        (FLEETPROV_IN_PROGRESS, None) => {
            assert!(out.is_null());
            false
        }
        (FLEETPROV_OK, None) => {
            assert!(!out.is_null());
            // SAFETY: a result object from the library, read then freed once.
            unsafe {
                let _ = text(fleetprov_provisioned_thing_name(out));
                let id = text(fleetprov_provisioned_certificate_id(out));
                assert!(!id.is_empty());
                assert!(text(fleetprov_provisioned_certificate_pem(out)).contains("CERTIFICATE"));
                for i in 0..fleetprov_provisioned_config_count(out) {
                    let (mut k, mut v) = (ptr::null(), ptr::null());
                    assert_eq!(
                        fleetprov_provisioned_config_entry(out, i, &mut k, &mut v),
                        FLEETPROV_OK
                    );
                    let _ = (text(k), text(v));
                }
                assert!(fleetprov_provisioned_attempts(out) >= 1);
                fleetprov_provisioned_free(out);
            }
            outcome.code = Some(FLEETPROV_OK);
            outcome.taken = true;
            true
        }
        (FLEETPROV_INVALID_ARGUMENT, Some(FLEETPROV_OK)) if outcome.taken => {
            assert!(out.is_null());
            true
        }
        (code, None) if FLOW_FAILURES.contains(&code) => {
            assert!(out.is_null());
            check_last_error(code);
            outcome.code = Some(code);
            true
        }
        (code, Some(before)) if code == before && before != FLEETPROV_OK => {
            assert!(out.is_null());
            check_last_error(code);
            true
        }
        (code, before) => {
            let e = fleetprov_last_error();
            // SAFETY: NULL or an error object from the library.
            let message = (!e.is_null()).then(|| unsafe { text(fleetprov_error_message(e)) });
            panic!("fleetprov_host_result gave {code:?} ({message:?}) after {before:?}")
        }
    }
}

fn check_last_error(code: fleetprov_result) {
    let e = fleetprov_last_error();
    assert!(!e.is_null(), "a failure leaves its error");
    // SAFETY: an error object from the library, read then freed once.
    unsafe {
        assert_eq!(fleetprov_error_result(e), code);
        let message = text(fleetprov_error_message(e));
        assert!(!message.contains(&material().token), "{message}");
        fleetprov_error_free(e);
    }
}

/// After every call of the driver: wake_at, the deadline and the result agree.
fn check(s: &Stack, overall_ms: u64, outcome: &mut Outcome) {
    if s.freed.get() {
        return;
    }
    let mut wake = 0u64;
    // SAFETY: a live host and a valid output pointer.
    assert_eq!(
        unsafe { fleetprov_host_wake_at(s.host.get(), &mut wake) },
        FLEETPROV_OK
    );
    let Some(started) = s.started_at.get() else {
        assert_eq!(wake, u64::MAX, "no timer before the start");
        return;
    };
    let deadline = started + overall_ms;
    let finished = wake == u64::MAX;
    if !finished {
        assert!(
            wake <= deadline,
            "wake_at {wake} past the deadline {deadline}"
        );
        assert!(outcome.code.is_none(), "running again after a result");
    }
    if s.latest_event.get() >= deadline {
        assert!(
            finished,
            "an event at {} is past the deadline {deadline}",
            s.latest_event.get()
        );
    }
    assert_eq!(
        result(s, outcome),
        finished,
        "wake_at and the result disagree"
    );
}

fn run(data: &[u8]) {
    let mut input = Reader::new(data);
    let setup: Vec<u8> = (0..SETUP_LEN).map(|_| input.u8()).collect();
    let flags = setup[0];
    let format = if flags & S_CBOR != 0 {
        Format::Cbor
    } else {
        Format::Json
    };
    let step_ms = 100 + 20 * u32::from(setup[2]);
    let overall_ms = 1000 + 100 * u32::from(setup[3]);
    let backoff_ms = 25 + u32::from(setup[4]);

    // SAFETY throughout: every pointer passed is valid for the call, as the header asks.
    let mut config = ptr::null_mut();
    unsafe {
        assert_eq!(fleetprov_config_new(&mut config), FLEETPROV_OK);
        let template = CString::new(TEMPLATE).expect("template");
        assert_eq!(
            fleetprov_config_set_template(config, template.as_ptr()),
            FLEETPROV_OK
        );
        let wire = match format {
            Format::Json => fleetprov_format::FLEETPROV_FORMAT_JSON,
            Format::Cbor => fleetprov_format::FLEETPROV_FORMAT_CBOR,
        };
        assert_eq!(
            fleetprov_config_set_format(config, wire as i32),
            FLEETPROV_OK
        );
        match flags & (3 << 1) {
            S_METHOD_EXTERNAL_CSR => {
                let csr = CString::new(material().csr_pem.as_str()).expect("CSR");
                assert_eq!(
                    fleetprov_config_set_csr_pem(config, csr.as_ptr()),
                    FLEETPROV_OK
                );
            }
            S_METHOD_CSR => {}
            _ => {
                let method = fleetprov_method::FLEETPROV_METHOD_CREATE_KEYS as i32;
                assert_eq!(fleetprov_config_set_method(config, method), FLEETPROV_OK);
            }
        }
        assert_eq!(
            fleetprov_config_set_verify(config, flags & S_VERIFY != 0),
            FLEETPROV_OK
        );
        assert_eq!(
            fleetprov_config_set_timeouts(config, step_ms, overall_ms),
            FLEETPROV_OK
        );
        let attempts = 1 + u32::from(setup[1] % 4);
        assert_eq!(
            fleetprov_config_set_retry(config, attempts, backoff_ms, 4 * backoff_ms),
            FLEETPROV_OK
        );
        if flags & S_HOOKS != 0 {
            let debug = fleetprov_log_level::FLEETPROV_LOG_DEBUG as i32;
            let r = fleetprov_config_set_log_callback(
                config,
                Some(on_log),
                ptr::null_mut(),
                None,
                debug,
            );
            assert_eq!(r, FLEETPROV_OK);
            let r = fleetprov_config_set_progress_callback(
                config,
                Some(on_progress),
                ptr::null_mut(),
                None,
            );
            assert_eq!(r, FLEETPROV_OK);
        }
        if flags & S_PARAMETER != 0 {
            let (k, v) = (c"SerialNumber", c"fuzz-0001");
            assert_eq!(
                fleetprov_config_set_parameter(config, k.as_ptr(), v.as_ptr()),
                FLEETPROV_OK
            );
        }
    }

    let s = Box::new(Stack {
        auto: flags & S_AUTO != 0,
        ..Stack::default()
    });
    s.now.set(1000 * u64::from(setup[5]));
    let userdata = &*s as *const Stack as *mut c_void;
    let mut host = ptr::null_mut();
    // SAFETY: valid pointers; the Stack outlives the host object.
    unsafe {
        let r = fleetprov_host_new(
            config,
            &CALLBACKS,
            userdata,
            Some(on_userdata_free),
            &mut host,
        );
        assert_eq!(r, FLEETPROV_OK);
        fleetprov_config_free(config);
    }
    s.host.set(host);
    let overall = u64::from(overall_ms);
    let mut outcome = Outcome::default();

    while !input.is_empty() && !s.freed.get() {
        let now = s.now.get();
        if trace() {
            eprintln!("at {now}: op {}", input_peek(&input));
        }
        // SAFETY: a live host (not freed: checked above) and valid arguments.
        let fed = unsafe {
            match input.u8() % OPS {
                START => {
                    if s.started_at.get().is_none() {
                        s.started_at.set(Some(now));
                    }
                    // Not an event of the flow's (a second start changes nothing): it does
                    // not count as an event at this time.
                    assert_eq!(fleetprov_host_start(host, now), FLEETPROV_OK);
                    None
                }
                CONNECTED => Some(fleetprov_host_connected(host, now)),
                CONNECT_FAILED => Some(fleetprov_host_connect_failed(
                    host,
                    input.u8() & 1 != 0,
                    now,
                )),
                SUBACK => {
                    let count = usize::from(input.u8() % 8);
                    let codes = input.bytes(count);
                    let p = if codes.is_empty() {
                        ptr::null()
                    } else {
                        codes.as_ptr()
                    };
                    Some(fleetprov_host_suback(host, p, codes.len(), now))
                }
                MESSAGE => message(&mut input, host, format, now),
                DISCONNECTED => Some(fleetprov_host_disconnected(host, now)),
                TICK => Some(fleetprov_host_tick(host, now)),
                TICK_AT_WAKE => {
                    let mut wake = 0;
                    assert_eq!(fleetprov_host_wake_at(host, &mut wake), FLEETPROV_OK);
                    let at = if wake == u64::MAX { now } else { now.max(wake) };
                    s.now.set(at);
                    Some(fleetprov_host_tick(host, at))
                }
                RESULT => {
                    result(&s, &mut outcome);
                    None
                }
                ADVANCE => {
                    s.now.set(now + u64::from(input.u8()));
                    None
                }
                ADVANCE_LONG => {
                    s.now.set(now + u64::from(input.u16()));
                    None
                }
                BACK => {
                    s.now.set(now.saturating_sub(10 * u64::from(input.u8())));
                    None
                }
                _ => {
                    s.directives.borrow_mut().push_back(input.u8());
                    None
                }
            }
        };
        if let Some(r) = fed {
            assert_eq!(r, FLEETPROV_OK, "an event function failed");
            note_event(&s, s.now.get());
        }
        check(&s, overall, &mut outcome);
    }

    // The end of the input: start if it never did, tick at each wake time a few times, then
    // past the overall deadline: the flow must be over.
    if !s.freed.get() {
        // SAFETY: a live host.
        unsafe {
            if s.started_at.get().is_none() {
                s.started_at.set(Some(s.now.get()));
                assert_eq!(fleetprov_host_start(host, s.now.get()), FLEETPROV_OK);
                check(&s, overall, &mut outcome);
            }
            for _ in 0..16 {
                if s.freed.get() {
                    break;
                }
                let mut wake = 0;
                assert_eq!(fleetprov_host_wake_at(host, &mut wake), FLEETPROV_OK);
                if wake == u64::MAX {
                    break;
                }
                s.now.set(s.now.get().max(wake));
                assert_eq!(fleetprov_host_tick(host, s.now.get()), FLEETPROV_OK);
                note_event(&s, s.now.get());
                check(&s, overall, &mut outcome);
            }
            if !s.freed.get() {
                let past = s.started_at.get().unwrap_or(0) + overall;
                s.now.set(s.now.get().max(past));
                assert_eq!(fleetprov_host_tick(host, s.now.get()), FLEETPROV_OK);
                note_event(&s, s.now.get());
                check(&s, overall, &mut outcome);
                assert!(outcome.code.is_some(), "the flow outlived its deadline");
            }
        }
    }
    if !s.freed.get() {
        // SAFETY: a live host, freed once.
        unsafe { fleetprov_host_free(host) };
    }
    assert_eq!(s.in_callback.get(), 0);
    assert_eq!(s.userdata_frees.get(), 1, "userdata_free runs exactly once");
    if trace() {
        eprintln!(
            "outcome {:?}, started at {:?}, clock {}, freed from a callback: {}",
            outcome.code,
            s.started_at.get(),
            s.now.get(),
            s.freed.get()
        );
    }
}

fn input_peek(input: &Reader<'_>) -> u8 {
    input.peek() % OPS
}

/// FLEETPROV_FUZZ_TRACE=1 prints each input's outcome (to check what a seed does).
fn trace() -> bool {
    static TRACE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *TRACE.get_or_init(|| std::env::var_os("FLEETPROV_FUZZ_TRACE").is_some())
}

/// A MESSAGE event: topic and body from the input.
///
/// # Safety
/// `host` is live.
unsafe fn message(
    input: &mut Reader<'_>,
    host: *mut fleetprov_host,
    flow_format: Format,
    now: u64,
) -> Option<fleetprov_result> {
    let selector = input.u8();
    let other = match flow_format {
        Format::Json => Format::Cbor,
        Format::Cbor => Format::Json,
    };
    let format = if selector & T_OTHER_FORMAT != 0 {
        other
    } else {
        flow_format
    };
    let topic: Vec<u8> = match selector % 8 {
        t if t < T_RAW => {
            let api = &apis()[usize::from(t / 2)];
            let topic = if t % 2 == 0 {
                api.accepted_topic(format)
            } else {
                api.rejected_topic(format)
            };
            topic.into_bytes()
        }
        _ => input.short().to_vec(),
    };
    // Exactly the topic's bytes in their own allocation: a read past `topic_len` is one
    // AddressSanitizer sees. Any bytes are a topic (one with a NUL or not UTF-8 is of no
    // interest to the flow): never an error.
    let topic = topic.into_boxed_slice();
    let body = match input.u8() % B_KINDS {
        B_RAW => input.blob().to_vec(),
        B_CERTIFICATE => encode(format, &certificate_reply(input.u8() & 1 != 0)),
        B_REGISTERED => {
            let name = String::from_utf8_lossy(input.short()).into_owned();
            encode(format, &register_reply(&name))
        }
        B_REJECTED => {
            let status = input.u16();
            let code = match input.u8() {
                0 => "InvalidCertificateOwnershipToken",
                1 => "Throttling",
                2 => "InternalFailure",
                _ => "Fuzz",
            };
            encode(format, &rejection(status, code))
        }
        _ => Vec::new(),
    };
    let payload = if body.is_empty() {
        ptr::null()
    } else {
        body.as_ptr()
    };
    let topic_ptr = if topic.is_empty() {
        ptr::null()
    } else {
        topic.as_ptr()
    };
    // SAFETY: `topic.len()` and `body.len()` bytes, valid for the call.
    Some(unsafe { fleetprov_host_message(host, topic_ptr, topic.len(), payload, body.len(), now) })
}
