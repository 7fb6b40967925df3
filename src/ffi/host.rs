//! The host-transport API: firmware that owns its MQTT connection (coreMQTT, Paho, libmosquitto)
//! drives the same provisioning flow as fleetprov_provision() — timeouts, retries, the resume
//! journal, the commit — through callbacks, without the library opening a socket.

use std::collections::VecDeque;
use std::ffi::{c_char, c_void, CString};
use std::ptr;
use std::sync::{Mutex, MutexGuard, TryLockError};

use super::config::{config_ref, fleetprov_config};
use super::provision::provisioned_object;
use super::results::*;
use super::types::*;
use crate::driver::{Driver, Transport};
use crate::engine::flow::{Flow, FlowEvent, FlowSpec, Identity, Provisioned};
use crate::error::Error;
use crate::provision::{self, Hooks};
use crate::store::Storage;

/// Credentials the host must connect with, as given to fleetprov_host_callbacks.connect. The
/// library fills it; later versions may add fields at the end: `size` says how many bytes of it
/// are valid.
#[repr(C)]
#[derive(Debug)]
pub struct fleetprov_identity {
    /// sizeof(fleetprov_identity) of the library that filled it.
    pub size: usize,
    /// true: connect with the host's claim certificate (certificate_pem and private_key_pem are
    /// NULL). false: connect with the new device certificate below, to check it works or to learn
    /// whether it was registered.
    pub claim: bool,
    /// The new certificate, PEM; NULL with `claim`.
    pub certificate_pem: *const c_char,
    /// Its private key, PEM; NULL with `claim`, and when the key is the host's own (an external
    /// CSR or signer: connect with the key in the secure element).
    pub private_key_pem: *const c_char,
    /// The MQTT client id to use (the thing name when known); "" lets the host choose.
    pub client_id: *const c_char,
}

/// What the library asks of the host's MQTT stack. All are required. Those returning int
/// return 0 when the operation was started and anything else when it could not be.
///
/// Thread: each is called from inside a fleetprov_host_* function, on the thread that called
/// it, never two at once for one host object. Each must return promptly without waiting for the
/// network: start the operation and report its outcome later through the fleetprov_host_* event
/// functions.
///
/// What a callback may call: the fleetprov_host_* event functions of this host (the event is
/// queued and handled before the outer call returns), fleetprov_host_result() and
/// fleetprov_host_wake_at() (IN_PROGRESS and "tick now" while events are being handled),
/// fleetprov_host_free() of this host (deferred: the host is freed when the outer call returns;
/// make no further call on it), and any non-blocking function. Blocking calls
/// (fleetprov_provision(), fleetprov_rotate(), the blocking fleetprov_client_* operations,
/// fleetprov_operation_wait()) return FLEETPROV_IN_CALLBACK.
///
/// A callback must return normally: no C++ exception, longjmp() or thread exit may leave it
/// (that would skip the library's cleanup and unwinding through Rust frames is undefined).
/// Pointers passed to a callback are valid only during the call.
///
/// Set `size` to sizeof(fleetprov_host_callbacks): fleetprov_host_new() refuses a smaller value
/// with FLEETPROV_INVALID_ARGUMENT. A larger one (from a later header, with more fields) is
/// accepted; this version reads only the fields it knows.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct fleetprov_host_callbacks {
    /// sizeof(fleetprov_host_callbacks): lets later versions grow this struct without breaking
    /// callers built against this one.
    pub size: usize,
    /// Drop any current connection and open one with `identity` (MQTT clean session).
    /// Report fleetprov_host_connected() on CONNACK, or fleetprov_host_connect_failed().
    /// A non-zero return counts as a failed connection attempt.
    pub connect: Option<
        unsafe extern "C" fn(userdata: *mut c_void, identity: *const fleetprov_identity) -> i32,
    >,
    /// Close the current connection (no event expected afterwards for it).
    pub disconnect: Option<unsafe extern "C" fn(userdata: *mut c_void)>,
    /// Send one SUBSCRIBE with these `count` filters at QoS 1; report the SUBACK with
    /// fleetprov_host_suback(). A non-zero return counts as a lost connection.
    pub subscribe: Option<
        unsafe extern "C" fn(
            userdata: *mut c_void,
            filters: *const *const c_char,
            count: usize,
        ) -> i32,
    >,
    /// Publish `len` bytes at QoS 1 (not retained). A non-zero return counts as a lost connection.
    /// The payload may hold an ownership token: do not log it.
    pub publish: Option<
        unsafe extern "C" fn(
            userdata: *mut c_void,
            topic: *const c_char,
            payload: *const u8,
            len: usize,
        ) -> i32,
    >,
}

/// Something the host reported, queued until the flow takes it.
enum HostEvent {
    Start,
    Connected,
    ConnectFailed(Error),
    SubAck(Vec<u8>),
    /// Topic and payload, as the host's stack gave them (the topic need not be UTF-8).
    Message(Vec<u8>, Vec<u8>),
    Disconnected,
    Tick,
}

struct Inner {
    /// Until fleetprov_host_start().
    prepared: Option<(FlowSpec, Box<dyn Storage + Send>)>,
    overall_ms: Option<u64>,
    driver: Option<Driver>,
    result: Option<Result<Provisioned, Error>>,
    hooks: Hooks,
}

/// A provisioning flow driven by the host's own MQTT connection (coreMQTT, Paho, libmosquitto):
/// the same flow as fleetprov_provision() (step timeouts, overall deadline, retries with backoff,
/// the resume journal, the lost-reply probe, the commit), with no socket of the library's.
///
/// The event-loop contract:
/// 1. fleetprov_host_new() with the callbacks, then fleetprov_host_start(now_ms).
/// 2. The library asks through the callbacks: connect (with the claim or the new certificate),
///    disconnect, subscribe, publish. Start each in your MQTT stack and return at once.
/// 3. Report what your stack sees: fleetprov_host_connected() / _connect_failed() for a connect,
///    fleetprov_host_suback() for a subscribe, fleetprov_host_message() for every incoming
///    PUBLISH, fleetprov_host_disconnected() when the connection drops.
/// 4. Call fleetprov_host_tick(now_ms) no later than fleetprov_host_wake_at() (that is how
///    timeouts and retry pauses happen; the library has no timer of its own).
/// 5. After any call, fleetprov_host_result() says FLEETPROV_IN_PROGRESS or gives the outcome.
///
/// Time is one monotonic clock in milliseconds, the same origin in every call. The library never
/// blocks: no call waits for the network. Storage happens inside these calls, on the calling
/// thread: with files (the output and state directories) a write is fsynced; with a store of the
/// firmware's own (fleetprov_config_set_storage()) its callbacks are called.
/// Calls on one host object must not run on two threads at once; calling the event functions
/// from inside a callback is allowed (the event is queued and handled before the outer call
/// returns). Create with fleetprov_host_new(), free with fleetprov_host_free().
pub struct fleetprov_host {
    callbacks: fleetprov_host_callbacks,
    user: UserData,
    queue: Mutex<VecDeque<(HostEvent, u64)>>,
    inner: Mutex<Inner>,
}

/// Creates a host-transport flow from `config` (template, parameters, method, key type or CSR,
/// verify, output and state directories or storage, format, timeouts, retries, callbacks; the
/// claim credentials and port are the host's business and are not needed; the endpoint, if
/// set, names the endpoint the resume journal belongs to), and reads the resume journal and any
/// stored credentials (locking the state directory, generating the key). `callbacks` is copied;
/// its `size` must be sizeof(fleetprov_host_callbacks) (or more, from a later header: only the
/// fields this version knows are read), a smaller one is FLEETPROV_INVALID_ARGUMENT; every
/// callback is required. `userdata` is passed to each callback and released with
/// `userdata_free` (may be NULL) when the host object is freed, or at once if this function
/// fails. Nothing is sent before fleetprov_host_start().
#[no_mangle]
pub unsafe extern "C" fn fleetprov_host_new(
    config: *const fleetprov_config,
    callbacks: *const fleetprov_host_callbacks,
    userdata: *mut c_void,
    userdata_free: fleetprov_userdata_free,
    out: *mut *mut fleetprov_host,
) -> fleetprov_result {
    guard(|| {
        let user = UserData::new(userdata, userdata_free);
        // SAFETY: pointers per the header.
        let config = unsafe { config_ref(config)? };
        if callbacks.is_null() {
            return Err(invalid("callbacks is NULL"));
        }
        // SAFETY: non-NULL; the header requires at least the `size` field to be readable.
        let size = unsafe { callbacks.cast::<usize>().read_unaligned() };
        if size < std::mem::size_of::<fleetprov_host_callbacks>() {
            return Err(invalid(format!(
                "callbacks->size is {size}: set it to sizeof(fleetprov_host_callbacks) ({})",
                std::mem::size_of::<fleetprov_host_callbacks>()
            )));
        }
        // SAFETY: `size` says at least a whole fleetprov_host_callbacks is readable.
        let callbacks = unsafe { callbacks.read_unaligned() };
        if callbacks.connect.is_none()
            || callbacks.disconnect.is_none()
            || callbacks.subscribe.is_none()
            || callbacks.publish.is_none()
        {
            return Err(invalid("every host callback is required"));
        }
        if out.is_null() {
            return Err(invalid("output pointer is NULL"));
        }
        let request = config.host_request()?;
        let (mut spec, storage) = provision::prepare(&request)?;
        spec.external_key_connects = true;
        // The host's stack picks the claim connection's client id.
        spec.claim_client_id = None;
        let overall_ms = request
            .connection
            .overall_timeout
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let host = fleetprov_host {
            callbacks,
            user,
            queue: Mutex::new(VecDeque::new()),
            inner: Mutex::new(Inner {
                prepared: Some((spec, storage)),
                overall_ms,
                driver: None,
                result: None,
                hooks: config.hooks(),
            }),
        };
        // SAFETY: checked non-NULL above; valid for writes per the header.
        unsafe { write_out(out, Box::into_raw(Box::new(host))) }
    })
}

/// Frees the host object (NULL is a no-op): closes nothing (the connection is the host's), but
/// drops the flow; a journal it wrote stays for the next attempt. Called from inside one of the
/// host's callbacks, the free is deferred until the fleetprov_host_* call that ran the callback
/// returns; make no further call on the host after this one.
#[no_mangle]
pub unsafe extern "C" fn fleetprov_host_free(host: *mut fleetprov_host) {
    guard_value((), || {
        if !host.is_null() && !defer_free(host) {
            // SAFETY: a pointer from fleetprov_host_new(), freed once, per the header.
            drop(unsafe { Box::from_raw(host) });
        }
    })
}

/// # Safety
/// `host` is NULL or a live host object.
unsafe fn host_ref<'a>(host: *const fleetprov_host) -> Result<&'a fleetprov_host, Error> {
    // SAFETY: per the contract above.
    unsafe { host.as_ref() }.ok_or_else(|| invalid("host is NULL"))
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The queue holds plain data, complete after every push and pop: usable after a panic.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl fleetprov_host {
    /// The flow's state, or None while a call on this host is handling events (re-entry from
    /// a callback, or another thread). A panic caught while events were being handled poisoned
    /// the lock: the flow's state is unknown then, so the flow ends with FLEETPROV_PANIC.
    fn state(&self) -> Option<MutexGuard<'_, Inner>> {
        match self.inner.try_lock() {
            Ok(inner) => Some(inner),
            Err(TryLockError::WouldBlock) => None,
            Err(TryLockError::Poisoned(poisoned)) => {
                // The lock stays poisoned (clearing it needs Rust 1.77): every later call
                // comes here and finds the same ended flow.
                let mut inner = poisoned.into_inner();
                inner.prepared = None;
                inner.driver = None;
                inner.result = Some(Err(Error::Panicked));
                lock(&self.queue).clear();
                Some(inner)
            }
        }
    }

    /// Queues `event` and, unless a call on this host is already handling events (re-entry
    /// from a callback), handles the queue.
    fn feed(&self, event: HostEvent, now: u64) {
        lock(&self.queue).push_back((event, now));
        loop {
            let Some(mut inner) = self.state() else {
                // Re-entered from a callback: the outer call takes the event.
                return;
            };
            // Bounded: each turn takes one queued event; callbacks add at most a few.
            for _ in 0..10_000 {
                let Some((event, now)) = lock(&self.queue).pop_front() else {
                    break;
                };
                self.handle(&mut inner, event, now);
            }
            drop(inner);
            // An event queued between the last pop and the unlock must not be stranded.
            if lock(&self.queue).is_empty() {
                return;
            }
        }
    }

    fn handle(&self, inner: &mut Inner, event: HostEvent, now: u64) {
        if matches!(event, HostEvent::Tick) {
            super::inject::point("host-event");
        }
        let mut transport = Callbacks {
            callbacks: &self.callbacks,
            user: self.user.ptr,
        };
        let t = &mut transport;
        match (&mut inner.driver, event) {
            (None, HostEvent::Start) => {
                let Some((mut spec, storage)) = inner.prepared.take() else {
                    return;
                };
                spec.settings.deadline_ms = inner.overall_ms.map(|d| now.saturating_add(d));
                let (progress, log) = (inner.hooks.progress.clone(), inner.hooks.log.clone());
                let driver =
                    inner
                        .driver
                        .insert(Driver::new(Flow::new(spec), storage, progress, log));
                driver.start(now, t);
            }
            (None, _) | (Some(_), HostEvent::Start) => return,
            (Some(driver), HostEvent::SubAck(codes)) => {
                // MQTT 3.1.1: 0x00-0x02 grant that QoS, 0x80 is a failure; MQTT 5: every
                // reason code from 0x80 up is a failure.
                driver.handle(FlowEvent::SubAck(&codes), now, t);
            }
            (Some(driver), event) => {
                let event = match &event {
                    HostEvent::Connected => FlowEvent::Connected,
                    HostEvent::ConnectFailed(e) => FlowEvent::ConnectFailed(e.clone()),
                    HostEvent::Message(topic, payload) => FlowEvent::Message {
                        // A topic that is not UTF-8 is none of the flow's (those are a request
                        // topic and "/accepted" or "/rejected"): the flow sees it as a topic of
                        // no interest, the empty one, and ignores the message like any other.
                        topic: std::str::from_utf8(topic).unwrap_or(""),
                        payload,
                    },
                    HostEvent::Disconnected => FlowEvent::Disconnected(Error::Connection(
                        "the host reported the connection lost".into(),
                    )),
                    HostEvent::Tick | HostEvent::Start | HostEvent::SubAck(_) => FlowEvent::Tick,
                };
                driver.handle(event, now, t);
            }
        }
        if let Some(result) = inner.driver.as_mut().and_then(Driver::take_result) {
            inner.result = Some(result);
        }
    }
}

/// The host's MQTT stack, reached through its callbacks.
struct Callbacks<'a> {
    callbacks: &'a fleetprov_host_callbacks,
    user: *mut c_void,
}

impl Transport for Callbacks<'_> {
    // The host's stack subscribes once its CONNACK is in: `_subscribe` comes again then.
    fn connect(&mut self, identity: Identity, _subscribe: &[String]) -> Result<(), Error> {
        let (claim, cert, key, client_id) = match &identity {
            Identity::Claim => (true, None, None, String::new()),
            Identity::Device {
                certificate_pem,
                private_key,
                client_id,
            } => (
                false,
                Some(cstring(certificate_pem)),
                private_key.as_ref().map(|k| SecretCString::new(k.expose())),
                client_id.clone(),
            ),
        };
        let client_id = cstring(&client_id);
        let view = fleetprov_identity {
            size: std::mem::size_of::<fleetprov_identity>(),
            claim,
            certificate_pem: cert.as_ref().map_or(ptr::null(), |c| c.as_ptr()),
            private_key_pem: key.as_ref().map_or(ptr::null(), |k| k.as_ptr()),
            client_id: client_id.as_ptr(),
        };
        let Some(connect) = self.callbacks.connect else {
            return Err(invalid("no connect callback"));
        };
        let user = self.user;
        // SAFETY: a callback the host registered; `view` and the strings it points to outlive
        // the call.
        let r = in_callback(|| unsafe { connect(user, &view) });
        if r != 0 {
            return Err(Error::Connection(format!(
                "the host's connect callback failed ({})",
                result_name(r)
            )));
        }
        Ok(())
    }

    fn disconnect(&mut self) {
        if let Some(disconnect) = self.callbacks.disconnect {
            let user = self.user;
            // SAFETY: a callback the host registered.
            in_callback(|| unsafe { disconnect(user) })
        }
    }

    fn subscribe(&mut self, filters: &[String]) -> Result<(), Error> {
        let owned: Vec<CString> = filters.iter().map(|f| cstring(f)).collect();
        let ptrs: Vec<*const c_char> = owned.iter().map(|c| c.as_ptr()).collect();
        let Some(subscribe) = self.callbacks.subscribe else {
            return Err(invalid("no subscribe callback"));
        };
        let user = self.user;
        // SAFETY: a callback the host registered; `ptrs` and `owned` outlive the call.
        let r = in_callback(|| unsafe { subscribe(user, ptrs.as_ptr(), ptrs.len()) });
        if r != 0 {
            return Err(Error::Connection(format!(
                "the host's subscribe callback failed ({r})"
            )));
        }
        Ok(())
    }

    fn publish(&mut self, topic: &str, payload: &[u8]) -> Result<(), Error> {
        let topic = cstring(topic);
        let Some(publish) = self.callbacks.publish else {
            return Err(invalid("no publish callback"));
        };
        let user = self.user;
        // SAFETY: a callback the host registered; `topic` and `payload` outlive the call.
        let r = in_callback(|| unsafe {
            publish(user, topic.as_ptr(), payload.as_ptr(), payload.len())
        });
        if r != 0 {
            return Err(Error::Connection(format!(
                "the host's publish callback failed ({r})"
            )));
        }
        Ok(())
    }
}

fn result_name(r: i32) -> String {
    format!("{r}")
}

/// Checks `host`, builds the event and feeds it; frees the host afterwards when a callback
/// asked for that meanwhile.
fn feed(
    host: *mut fleetprov_host,
    now_ms: u64,
    event: impl FnOnce() -> Result<HostEvent, Error>,
) -> fleetprov_result {
    guard(|| {
        // SAFETY: pointer per the header.
        let h = unsafe { host_ref(host)? };
        let event = event()?;
        let ((), free_now) = while_in_use(host, || h.feed(event, now_ms));
        if free_now {
            // SAFETY: fleetprov_host_free() was called on it from one of its callbacks during
            // this call, the outermost on this thread that used it; nothing refers to it now.
            drop(unsafe { Box::from_raw(host) });
        }
        Ok(())
    })
}

/// Starts the flow at `now_ms` (milliseconds from any monotonic origin, the same in every call):
/// asks for the first connection through the connect callback, or finishes at once when the
/// storage already holds the credentials.
#[no_mangle]
pub unsafe extern "C" fn fleetprov_host_start(
    host: *mut fleetprov_host,
    now_ms: u64,
) -> fleetprov_result {
    feed(host, now_ms, || Ok(HostEvent::Start))
}

/// The connection asked for by the last connect callback is up (CONNACK accepted).
#[no_mangle]
pub unsafe extern "C" fn fleetprov_host_connected(
    host: *mut fleetprov_host,
    now_ms: u64,
) -> fleetprov_result {
    feed(host, now_ms, || Ok(HostEvent::Connected))
}

/// The connection asked for could not be made. `tls` true when the TLS handshake failed (the
/// server refused the certificate, or it could not be verified): for a new certificate this
/// tells the flow it is not active.
#[no_mangle]
pub unsafe extern "C" fn fleetprov_host_connect_failed(
    host: *mut fleetprov_host,
    tls: bool,
    now_ms: u64,
) -> fleetprov_result {
    feed(host, now_ms, || {
        Ok(HostEvent::ConnectFailed(if tls {
            Error::Tls("the host's TLS handshake failed".into())
        } else {
            Error::Connection("the host could not connect".into())
        }))
    })
}

/// The SUBACK for the last subscribe callback: `count` return codes, one per filter in order,
/// as the MQTT stack gives them (MQTT 3.1.1: 0x00, 0x01, 0x02 granted, 0x80 failure; MQTT 5
/// reason codes: below 0x80 granted, 0x80 and above refused). Any byte value is accepted.
/// Copied. `codes` may be NULL when `count` is 0.
#[no_mangle]
pub unsafe extern "C" fn fleetprov_host_suback(
    host: *mut fleetprov_host,
    codes: *const u8,
    count: usize,
    now_ms: u64,
) -> fleetprov_result {
    feed(host, now_ms, || {
        // SAFETY: `count` readable bytes, per the header; every byte value is valid.
        let list = unsafe { bytes_arg(codes, count, "codes")? };
        Ok(HostEvent::SubAck(list))
    })
}

/// An incoming PUBLISH, on any topic (the flow ignores what is not for it).
///
/// `topic` is `topic_len` bytes as the MQTT stack gives them: no NUL terminator is needed and
/// none is looked for (coreMQTT's topic points into the packet buffer); the library reads no
/// byte past `topic_len`. A topic that is not valid UTF-8 cannot be one of the flow's: the
/// message is ignored (FLEETPROV_OK). `payload` is `len` bytes. A NULL pointer with a length of
/// 0 is empty; with a larger length it is FLEETPROV_INVALID_ARGUMENT. Topic and payload are
/// copied: both buffers may be reused as soon as the call returns.
#[no_mangle]
pub unsafe extern "C" fn fleetprov_host_message(
    host: *mut fleetprov_host,
    topic: *const u8,
    topic_len: usize,
    payload: *const u8,
    len: usize,
    now_ms: u64,
) -> fleetprov_result {
    feed(host, now_ms, || {
        // SAFETY: `topic_len` and `len` readable bytes, per the header.
        let (topic, payload) = unsafe {
            (
                bytes_arg(topic, topic_len, "topic")?,
                bytes_arg(payload, len, "payload")?,
            )
        };
        Ok(HostEvent::Message(topic, payload))
    })
}

/// A copy of the `len` bytes at `p`: NULL with `len` 0 is empty, with more an invalid argument
/// named `what`.
///
/// # Safety
/// `p` is NULL or points to `len` readable bytes.
unsafe fn bytes_arg(p: *const u8, len: usize, what: &str) -> Result<Vec<u8>, Error> {
    if len == 0 {
        return Ok(Vec::new());
    }
    if p.is_null() {
        return Err(invalid(format!("{what} is NULL")));
    }
    // SAFETY: non-NULL and `len` readable bytes, per the contract above.
    Ok(unsafe { std::slice::from_raw_parts(p, len) }.to_vec())
}

/// The connection dropped.
#[no_mangle]
pub unsafe extern "C" fn fleetprov_host_disconnected(
    host: *mut fleetprov_host,
    now_ms: u64,
) -> fleetprov_result {
    feed(host, now_ms, || Ok(HostEvent::Disconnected))
}

/// Time passed: call at fleetprov_host_wake_at() at the latest (more often is fine).
#[no_mangle]
pub unsafe extern "C" fn fleetprov_host_tick(
    host: *mut fleetprov_host,
    now_ms: u64,
) -> fleetprov_result {
    feed(host, now_ms, || Ok(HostEvent::Tick))
}

/// Writes to `*out` when the host must call fleetprov_host_tick() at the latest (same clock as
/// `now_ms`): UINT64_MAX when no timer is pending (not started, or finished), 0 ("tick now")
/// while events are being handled (called from inside a callback). FLEETPROV_INVALID_ARGUMENT
/// (nothing written) for a NULL host or `out`.
#[no_mangle]
pub unsafe extern "C" fn fleetprov_host_wake_at(
    host: *const fleetprov_host,
    out: *mut u64,
) -> fleetprov_result {
    guard(|| {
        // SAFETY: pointer per the header.
        let h = unsafe { host_ref(host)? };
        let wake = match h.state() {
            None => 0,
            Some(inner) => inner
                .driver
                .as_ref()
                .and_then(Driver::wake_at)
                .unwrap_or(u64::MAX),
        };
        // SAFETY: NULL or valid for writes, per the header.
        unsafe { write_out(out, wake) }
    })
}

/// The outcome: FLEETPROV_IN_PROGRESS until the flow finished (and while events are being
/// handled, when called from inside a callback); then FLEETPROV_OK with a new
/// result in `*out` (free with fleetprov_provisioned_free(); it can be taken once, later calls
/// give FLEETPROV_INVALID_ARGUMENT), or the failure's code with the details in the thread's last
/// error (every call). FLEETPROV_PANIC when a panic inside the library (a bug) ended the flow.
#[no_mangle]
pub unsafe extern "C" fn fleetprov_host_result(
    host: *mut fleetprov_host,
    out: *mut *mut fleetprov_provisioned,
) -> fleetprov_result {
    let mut pending = false;
    let r = guard(|| {
        // SAFETY: pointer per the header.
        let h = unsafe { host_ref(host)? };
        if out.is_null() {
            return Err(invalid("output pointer is NULL"));
        }
        let Some(mut inner) = h.state() else {
            pending = true;
            return Ok(());
        };
        match inner.result.take() {
            None if inner.driver.as_ref().is_some_and(Driver::is_finished) => {
                Err(invalid("the result was already taken"))
            }
            None => {
                pending = true;
                Ok(())
            }
            Some(Ok(p)) => {
                // SAFETY: checked non-NULL above; valid for writes per the header.
                unsafe { write_out(out, Box::into_raw(Box::new(provisioned_object(p)))) }
            }
            Some(Err(e)) => {
                inner.result = Some(Err(e.clone()));
                Err(e)
            }
        }
    });
    if pending {
        fleetprov_result::FLEETPROV_IN_PROGRESS
    } else {
        r
    }
}
