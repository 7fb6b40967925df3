//! The step-by-step client handle and its blocking and asynchronous operations.

use std::collections::BTreeMap;
use std::ffi::{c_char, c_void};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use super::config::*;
use super::operation::*;
use super::results::*;
use super::types::*;
use crate::client::{Cancel, Client};
use crate::error::Error;
use crate::keys::{self};
use crate::protocol::validate_template_name;
use crate::secret::Secret;

/// A connection for step-by-step provisioning. Create with fleetprov_client_new(), free with
/// fleetprov_client_free(). One operation at a time: a call while another (an `_async` one)
/// runs returns FLEETPROV_BUSY. fleetprov_client_cancel() may be called from any thread.
pub struct fleetprov_client {
    inner: Arc<Mutex<Client>>,
    cancel: Arc<Cancel>,
    busy: Arc<AtomicBool>,
    /// Worker threads of `_async` operations not yet joined, and whether the client is being
    /// freed (no new worker may start then).
    workers: Mutex<(Vec<JoinHandle<()>>, bool)>,
    parameters: BTreeMap<String, String>,
    template: Option<String>,
}

/// Creates a client from `config` (copied: endpoint, credentials, timeouts, format, callbacks,
/// template and parameters). Checks the credentials; does not connect yet. Writes it to `*out`.
#[no_mangle]
pub unsafe extern "C" fn fleetprov_client_new(
    config: *const fleetprov_config,
    out: *mut *mut fleetprov_client,
) -> fleetprov_result {
    guard(|| {
        // SAFETY: pointer per the header.
        let config = unsafe { config_ref(config)? };
        if out.is_null() {
            return Err(invalid("output pointer is NULL"));
        }
        let mut client = Client::new(config.connection()?)?;
        let hooks = config.hooks();
        client.set_progress(hooks.progress);
        client.set_log(hooks.log);
        let handle = Box::new(fleetprov_client {
            cancel: client.canceller(),
            inner: Arc::new(Mutex::new(client)),
            busy: Arc::new(AtomicBool::new(false)),
            // Room for the workers there can be at once (one finishing, one started from its
            // callback), so that no thread frees a buffer another grew (see spawn()).
            workers: Mutex::new((Vec::with_capacity(4), false)),
            parameters: config.parameters.clone(),
            template: config.template.clone(),
        });
        // SAFETY: checked non-NULL above; valid for writes per the header.
        unsafe { write_out(out, Box::into_raw(handle)) }
    })
}

/// Drops a client handle and with it, when no worker holds them any more, its connection and
/// runtime. Inside a progress or log callback the thread is inside another client's runtime,
/// where a runtime must not be dropped: the drop then happens on a short-lived thread.
fn drop_off_runtime(client: Box<fleetprov_client>) {
    #[cfg(not(feature = "transport"))]
    let inside_runtime = false;
    #[cfg(feature = "transport")]
    let inside_runtime = tokio::runtime::Handle::try_current().is_ok();
    if !inside_runtime {
        drop(client);
        return;
    }
    std::thread::scope(|scope| {
        // Without a thread to drop it on, the client is leaked rather than dropped here.
        let _ = std::thread::Builder::new().spawn_scoped(scope, move || drop(client));
    });
}

/// Cancels the client's running `_async` operations, waits for their callbacks (except the one
/// it is called from) and their userdata_free, disconnects and frees the client. NULL is a
/// no-op. From a progress or log callback of a blocking call on this client, the free is
/// deferred until that call returns (make no further call on the client). Otherwise it must not
/// run while another thread is inside a call on the same client.
#[no_mangle]
pub unsafe extern "C" fn fleetprov_client_free(client: *mut fleetprov_client) {
    guard_value((), || {
        if client.is_null() || defer_free(client) {
            return;
        }
        // SAFETY: created by fleetprov_client_new and freed once, per the header.
        let c = unsafe { Box::from_raw(client) };
        c.cancel.cancel();
        // From now on no new worker starts (an `_async` call from a completion callback gets
        // FLEETPROV_CANCELLED), so the workers taken here are all there will be.
        let workers = {
            let mut w = lock(&c.workers);
            w.1 = true;
            std::mem::take(&mut w.0)
        };
        for handle in workers {
            join_unless_self(Some(handle));
        }
        drop_off_runtime(c);
    })
}

/// Asks the running operation of this client to stop with FLEETPROV_CANCELLED. Thread-safe.
#[no_mangle]
pub unsafe extern "C" fn fleetprov_client_cancel(
    client: *mut fleetprov_client,
) -> fleetprov_result {
    guard(|| {
        // SAFETY: pointer per the header.
        let c = unsafe { client.as_ref() }.ok_or_else(|| invalid("client is NULL"))?;
        c.cancel.cancel();
        Ok(())
    })
}

/// # Safety
/// `client` is NULL or a live client.
unsafe fn client_ref<'a>(client: *const fleetprov_client) -> Result<&'a fleetprov_client, Error> {
    // SAFETY: per the contract.
    unsafe { client.as_ref() }.ok_or_else(|| invalid("client is NULL"))
}

/// Clears the busy flag when dropped, also when the operation panicked.
struct NotBusy(Arc<AtomicBool>);

impl Drop for NotBusy {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

/// Runs `op` with the client's connection; a lock poisoned by an earlier panic (a bug) makes
/// every later operation FLEETPROV_PANIC.
fn with_client<T>(
    inner: &Mutex<Client>,
    op: impl FnOnce(&mut Client) -> Result<T, Error>,
) -> Result<T, Error> {
    match inner.lock() {
        Ok(mut c) => op(&mut c),
        Err(_) => Err(Error::Panicked),
    }
}

/// Runs a blocking operation on `client` on this thread, exclusive with other operations. A
/// fleetprov_client_free() from one of its callbacks meanwhile frees the client afterwards.
///
/// # Safety
/// `client` is NULL or a live client.
unsafe fn blocking<T>(
    client: *mut fleetprov_client,
    what: &'static str,
    op: impl FnOnce(&fleetprov_client, &mut Client) -> Result<T, Error>,
) -> Result<T, Error> {
    refuse_in_callback(what)?;
    // SAFETY: per the contract.
    let c = unsafe { client_ref(client)? };
    if c.busy.swap(true, Ordering::SeqCst) {
        return Err(busy_error());
    }
    let not_busy = NotBusy(c.busy.clone());
    c.cancel.reset();
    let (result, free_now) = while_in_use(client, || {
        with_client(&c.inner, |inner| {
            super::inject::point("client-blocking");
            op(c, inner)
        })
    });
    drop(not_busy);
    if free_now {
        // SAFETY: fleetprov_client_free() was called on it from one of its callbacks during
        // this call, the outermost on this thread that used it; nothing refers to it now.
        drop_off_runtime(unsafe { Box::from_raw(client) });
    }
    result
}

impl fleetprov_client {
    /// Runs `op` on a worker thread, then `callback` with its outcome.
    fn spawn<T: Send + 'static>(
        &self,
        op: impl FnOnce(&mut Client) -> Result<T, Error> + Send + 'static,
        callback: CompletionFn<T>,
        user: UserData,
    ) -> Result<(), Error> {
        let mut workers = lock(&self.workers);
        if workers.1 {
            return Err(Error::Cancelled);
        }
        if self.busy.swap(true, Ordering::SeqCst) {
            return Err(busy_error());
        }
        let not_busy = NotBusy(self.busy.clone());
        self.cancel.reset();
        // Join the workers that are done (one calling this from its callback is not). In place
        // and in the order they started: the list's buffer is never freed by a thread other
        // than the one that made it (ThreadSanitizer cannot see the futex behind this lock, but
        // sees thread starts and joins), and the room for the new worker is made before it starts.
        let mut i = 0;
        while i < workers.0.len() {
            if workers.0[i].is_finished() {
                join_unless_self(Some(workers.0.remove(i)));
            } else {
                i += 1;
            }
        }
        workers.0.reserve(1);
        let inner = self.inner.clone();
        let builder = std::thread::Builder::new()
            .name("fleetprov-client".into())
            .stack_size(super::alloc::WORKER_STACK);
        let spawned = super::inject::spawn_worker(builder, move || {
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                with_client(&inner, |c| {
                    super::inject::point("client-worker");
                    op(c)
                })
            }));
            // Not busy before the callback: it may start the next operation.
            drop(not_busy);
            complete(callback, &user, outcome);
            drop(user);
            super::alloc::scrub_worker_stack();
        });
        match spawned {
            Ok(h) => {
                // Stored before the lock is released: fleetprov_client_free() joins it.
                workers.0.push(h);
                Ok(())
            }
            Err(e) => Err(Error::Internal(format!(
                "cannot start a worker thread: {e}"
            ))),
        }
    }
}

fn busy_error() -> Error {
    Error::Busy
}

/// Connects now (operations also connect when needed). Blocking; callbacks on this thread.
#[no_mangle]
pub unsafe extern "C" fn fleetprov_client_connect(
    client: *mut fleetprov_client,
) -> fleetprov_result {
    guard(|| {
        // SAFETY: pointer per the header.
        unsafe { blocking(client, "fleetprov_client_connect()", |_, c| c.connect()) }
    })
}

fn certificate_object(c: crate::protocol::CreatedCertificate) -> fleetprov_certificate {
    fleetprov_certificate {
        id: cstring(&c.certificate_id),
        pem: cstring(&c.certificate_pem),
        private_key: c
            .private_key
            .as_ref()
            .map(|k| SecretCString::new(k.expose())),
        token: SecretCString::new(c.ownership_token.expose()),
        inner: c,
    }
}

fn registration_object(r: crate::protocol::Registered) -> fleetprov_registration {
    fleetprov_registration {
        thing_name: cstring(r.thing_name.as_deref().unwrap_or("")),
        config: config_entries(&r.device_configuration),
    }
}

/// CreateKeysAndCertificate, blocking. On success writes a new certificate (with its private
/// key) to `*out`; free it with fleetprov_certificate_free().
#[no_mangle]
pub unsafe extern "C" fn fleetprov_client_create_keys_and_certificate(
    client: *mut fleetprov_client,
    out: *mut *mut fleetprov_certificate,
) -> fleetprov_result {
    guard(|| {
        if out.is_null() {
            return Err(invalid("output pointer is NULL"));
        }
        // SAFETY: pointer per the header.
        let cert = unsafe {
            blocking(
                client,
                "fleetprov_client_create_keys_and_certificate()",
                |_, c| c.create_keys_and_certificate(),
            )?
        };
        // SAFETY: checked non-NULL; valid for writes per the header.
        unsafe { write_out(out, Box::into_raw(Box::new(certificate_object(cert)))) }
    })
}

/// CreateKeysAndCertificate on a worker thread; `callback` gets the outcome (see
/// fleetprov_certificate_callback), then `userdata_free` (may be NULL) is called on `userdata`.
#[no_mangle]
pub unsafe extern "C" fn fleetprov_client_create_keys_and_certificate_async(
    client: *mut fleetprov_client,
    callback: fleetprov_certificate_callback,
    userdata: *mut c_void,
    userdata_free: fleetprov_userdata_free,
) -> fleetprov_result {
    guard(|| {
        let user = UserData::new(userdata, userdata_free);
        // SAFETY: pointer per the header.
        let c = unsafe { client_ref(client)? };
        let callback = callback.ok_or_else(|| invalid("callback is NULL"))?;
        c.spawn(
            |c| c.create_keys_and_certificate().map(certificate_object),
            callback,
            user,
        )
    })
}

/// CreateCertificateFromCsr, blocking, with `csr_pem`. `key_pem` (may be NULL) is the key the
/// CSR was made from; when given, the returned certificate is checked against it
/// (FLEETPROV_CERTIFICATE_MISMATCH). On success writes a new certificate to `*out`.
#[no_mangle]
pub unsafe extern "C" fn fleetprov_client_create_certificate_from_csr(
    client: *mut fleetprov_client,
    csr_pem: *const c_char,
    key_pem: *const c_char,
    out: *mut *mut fleetprov_certificate,
) -> fleetprov_result {
    guard(|| {
        // SAFETY: pointers per the header.
        let (_, csr, key) = unsafe {
            (
                client_ref(client)?,
                str_arg(csr_pem, "csr_pem")?,
                opt_str_arg(key_pem, "key_pem")?,
            )
        };
        if out.is_null() {
            return Err(invalid("output pointer is NULL"));
        }
        let key = key.map(|k| Secret::new(k.to_owned()));
        // SAFETY: pointer per the header.
        let cert = unsafe {
            blocking(
                client,
                "fleetprov_client_create_certificate_from_csr()",
                |_, c| c.create_certificate_from_csr(csr, key.as_ref()),
            )?
        };
        // SAFETY: checked non-NULL; valid for writes per the header.
        unsafe { write_out(out, Box::into_raw(Box::new(certificate_object(cert)))) }
    })
}

/// CreateCertificateFromCsr on a worker thread (arguments copied); see
/// fleetprov_client_create_keys_and_certificate_async().
#[no_mangle]
pub unsafe extern "C" fn fleetprov_client_create_certificate_from_csr_async(
    client: *mut fleetprov_client,
    csr_pem: *const c_char,
    key_pem: *const c_char,
    callback: fleetprov_certificate_callback,
    userdata: *mut c_void,
    userdata_free: fleetprov_userdata_free,
) -> fleetprov_result {
    guard(|| {
        let user = UserData::new(userdata, userdata_free);
        // SAFETY: pointers per the header.
        let (c, csr, key) = unsafe {
            (
                client_ref(client)?,
                str_arg(csr_pem, "csr_pem")?,
                opt_str_arg(key_pem, "key_pem")?,
            )
        };
        let callback = callback.ok_or_else(|| invalid("callback is NULL"))?;
        keys::check_csr_pem(csr).map_err(|e| invalid(format!("CSR: {e}")))?;
        let csr = csr.to_owned();
        let key = key.map(|k| Secret::new(k.to_owned()));
        c.spawn(
            move |c| {
                c.create_certificate_from_csr(&csr, key.as_ref())
                    .map(certificate_object)
            },
            callback,
            user,
        )
    })
}

fn register_args(
    c: &fleetprov_client,
    template: Option<&str>,
) -> Result<(String, BTreeMap<String, String>), Error> {
    let template = template
        .map(str::to_owned)
        .or_else(|| c.template.clone())
        .ok_or_else(|| invalid("no template given and none in the config"))?;
    validate_template_name(&template).map_err(|e| invalid(e.0))?;
    Ok((template, c.parameters.clone()))
}

/// RegisterThing, blocking, for `certificate` (its ownership token) with template
/// `template_name` (NULL: the config's) and the config's parameters. On success writes a new
/// registration to `*out` (free with fleetprov_registration_free()).
#[no_mangle]
pub unsafe extern "C" fn fleetprov_client_register_thing(
    client: *mut fleetprov_client,
    certificate: *const fleetprov_certificate,
    template_name: *const c_char,
    out: *mut *mut fleetprov_registration,
) -> fleetprov_result {
    guard(|| {
        // SAFETY: pointers per the header.
        let (_, cert, template) = unsafe {
            (
                client_ref(client)?,
                certificate
                    .as_ref()
                    .ok_or_else(|| invalid("certificate is NULL"))?,
                opt_str_arg(template_name, "template_name")?,
            )
        };
        if out.is_null() {
            return Err(invalid("output pointer is NULL"));
        }
        let token = cert.inner.ownership_token.clone();
        // SAFETY: pointer per the header.
        let r = unsafe {
            blocking(client, "fleetprov_client_register_thing()", |c, inner| {
                let (template, params) = register_args(c, template)?;
                inner.register_thing(&template, &token, &params)
            })?
        };
        // SAFETY: checked non-NULL; valid for writes per the header.
        unsafe { write_out(out, Box::into_raw(Box::new(registration_object(r)))) }
    })
}

/// RegisterThing, blocking, with an ownership token given as text (e.g. one saved from an
/// earlier CreateKeysAndCertificate or CreateCertificateFromCsr, while it is valid: one hour on
/// AWS) and the parameters of this call: `parameter_count` pairs, `parameter_names[i]` =
/// `parameter_values[i]`, which replace the config's (NULL arrays with a count of 0: no
/// parameters; a name given twice: the last value). `template_name` NULL: the config's. Lets one
/// client register many devices, each with its own parameters. The arrays and strings are read
/// during the call only. On success writes a new registration to `*out` (free with
/// fleetprov_registration_free()).
#[no_mangle]
pub unsafe extern "C" fn fleetprov_client_register_thing_with(
    client: *mut fleetprov_client,
    ownership_token: *const c_char,
    template_name: *const c_char,
    parameter_names: *const *const c_char,
    parameter_values: *const *const c_char,
    parameter_count: usize,
    out: *mut *mut fleetprov_registration,
) -> fleetprov_result {
    guard(|| {
        // SAFETY: pointers per the header; each array holds `parameter_count` string pointers.
        let (_, token, template, params) = unsafe {
            (
                client_ref(client)?,
                str_arg(ownership_token, "ownership_token")?,
                opt_str_arg(template_name, "template_name")?,
                parameter_pairs(parameter_names, parameter_values, parameter_count)?,
            )
        };
        if out.is_null() {
            return Err(invalid("output pointer is NULL"));
        }
        if token.is_empty() {
            return Err(invalid("ownership_token is empty"));
        }
        let token = Secret::new(token.to_owned());
        // SAFETY: pointer per the header.
        let r = unsafe {
            blocking(
                client,
                "fleetprov_client_register_thing_with()",
                |c, inner| {
                    let (template, _) = register_args(c, template)?;
                    inner.register_thing(&template, &token, &params)
                },
            )?
        };
        // SAFETY: checked non-NULL; valid for writes per the header.
        unsafe { write_out(out, Box::into_raw(Box::new(registration_object(r)))) }
    })
}

/// The `(names, values, count)` arrays of fleetprov_client_register_thing_with() as a map.
///
/// # Safety
/// With a non-zero `count`, both arrays hold `count` readable pointers, each NULL or a
/// NUL-terminated string.
unsafe fn parameter_pairs(
    names: *const *const c_char,
    values: *const *const c_char,
    count: usize,
) -> Result<BTreeMap<String, String>, Error> {
    let mut params = BTreeMap::new();
    if count == 0 {
        return Ok(params);
    }
    if names.is_null() || values.is_null() {
        return Err(invalid("parameter arrays are NULL with a non-zero count"));
    }
    for i in 0..count {
        // SAFETY: `i < count`, and both arrays hold `count` pointers per the header.
        let (name, value) = unsafe {
            (
                str_arg(*names.add(i), "parameter name")?,
                str_arg(*values.add(i), "parameter value")?,
            )
        };
        if name.is_empty() {
            return Err(invalid("parameter name is empty"));
        }
        params.insert(name.to_owned(), value.to_owned());
    }
    Ok(params)
}

/// RegisterThing on a worker thread (arguments copied); `callback` gets the outcome (see
/// fleetprov_registration_callback), then `userdata_free` is called on `userdata`.
#[no_mangle]
pub unsafe extern "C" fn fleetprov_client_register_thing_async(
    client: *mut fleetprov_client,
    certificate: *const fleetprov_certificate,
    template_name: *const c_char,
    callback: fleetprov_registration_callback,
    userdata: *mut c_void,
    userdata_free: fleetprov_userdata_free,
) -> fleetprov_result {
    guard(|| {
        let user = UserData::new(userdata, userdata_free);
        // SAFETY: pointers per the header.
        let (c, cert, template) = unsafe {
            (
                client_ref(client)?,
                certificate
                    .as_ref()
                    .ok_or_else(|| invalid("certificate is NULL"))?,
                opt_str_arg(template_name, "template_name")?,
            )
        };
        let callback = callback.ok_or_else(|| invalid("callback is NULL"))?;
        let (template, params) = register_args(c, template)?;
        let token = cert.inner.ownership_token.clone();
        c.spawn(
            move |c| {
                c.register_thing(&template, &token, &params)
                    .map(registration_object)
            },
            callback,
            user,
        )
    })
}
