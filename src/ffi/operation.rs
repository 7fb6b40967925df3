//! Asynchronous provisioning: the worker thread, its completion, and the operation handle.

use std::cell::UnsafeCell;
use std::ffi::c_void;
use std::ptr;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use super::config::*;
use super::error::*;
use super::provision::*;
use super::types::*;
use crate::client::Cancel;
use crate::error::Error;
use crate::provision::{self};

/// Set once, when a worker thread is done with everything the caller gave it (its callback
/// returned and its userdata was released). Waits use pthread primitives rather than Rust's
/// (which use futexes directly), so that ThreadSanitizer, which intercepts pthread calls, sees a
/// callback's writes ordered before the return of a wait.
struct Completion {
    mutex: UnsafeCell<libc::pthread_mutex_t>,
    cond: UnsafeCell<libc::pthread_cond_t>,
    done: UnsafeCell<bool>,
}

// SAFETY: `done` is only accessed with `mutex` held; the pthread objects are made for sharing
// between threads and never move (the Completion lives in an Arc).
unsafe impl Sync for Completion {}
// SAFETY: as above.
unsafe impl Send for Completion {}

impl Completion {
    fn new() -> Arc<Completion> {
        Arc::new(Completion {
            mutex: UnsafeCell::new(libc::PTHREAD_MUTEX_INITIALIZER),
            cond: UnsafeCell::new(libc::PTHREAD_COND_INITIALIZER),
            done: UnsafeCell::new(false),
        })
    }

    fn finish(&self) {
        // SAFETY: statically initialised pthread objects at a fixed address; `done` is written
        // with the mutex held.
        unsafe {
            libc::pthread_mutex_lock(self.mutex.get());
            *self.done.get() = true;
            libc::pthread_cond_broadcast(self.cond.get());
            libc::pthread_mutex_unlock(self.mutex.get());
        }
    }

    fn wait(&self) {
        // SAFETY: as in finish(); `done` is read with the mutex held.
        unsafe {
            libc::pthread_mutex_lock(self.mutex.get());
            while !*self.done.get() {
                libc::pthread_cond_wait(self.cond.get(), self.mutex.get());
            }
            libc::pthread_mutex_unlock(self.mutex.get());
        }
    }
}

impl Drop for Completion {
    fn drop(&mut self) {
        // SAFETY: the last reference: no thread waits on or holds these any more.
        unsafe {
            libc::pthread_cond_destroy(self.cond.get());
            libc::pthread_mutex_destroy(self.mutex.get());
        }
    }
}

/// A running asynchronous operation: cancel it, wait for it, free it.
pub struct fleetprov_operation {
    cancel: Arc<Cancel>,
    completion: Arc<Completion>,
    worker: std::thread::ThreadId,
    thread: Mutex<Option<JoinHandle<()>>>,
}

pub(crate) fn join_unless_self(handle: Option<JoinHandle<()>>) {
    if let Some(h) = handle.filter(|h| h.thread().id() != std::thread::current().id()) {
        let _ = h.join();
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Only join handles live behind these locks; a panic cannot leave them half-changed.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Starts the one-call flow on a library worker thread and returns at once, writing an
/// operation handle to `*out`. `callback` is called exactly once, on the worker thread, with
/// the outcome (see fleetprov_provision_callback); progress and log callbacks also run there.
/// `userdata_free` (may be NULL) is called on `userdata` after the callback returned. The
/// config is copied: it may be freed right away.
#[no_mangle]
pub unsafe extern "C" fn fleetprov_provision_async(
    config: *const fleetprov_config,
    callback: fleetprov_provision_callback,
    userdata: *mut c_void,
    userdata_free: fleetprov_userdata_free,
    out: *mut *mut fleetprov_operation,
) -> fleetprov_result {
    guard(|| {
        let user = UserData::new(userdata, userdata_free);
        // SAFETY: pointer per the header.
        let config = unsafe { config_ref(config)? };
        let callback = callback.ok_or_else(|| invalid("callback is NULL"))?;
        if out.is_null() {
            return Err(invalid("output pointer is NULL"));
        }
        let request = config.request()?;
        let mut hooks = config.hooks();
        let cancel = Arc::new(Cancel::default());
        hooks.cancel = Some(cancel.clone());
        let completion = Completion::new();
        let done = completion.clone();
        let builder = std::thread::Builder::new()
            .name("fleetprov-provision".into())
            .stack_size(super::alloc::WORKER_STACK);
        let thread = super::inject::spawn_worker(builder, move || {
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                super::inject::point("provision-async");
                provision::provision(&request, &hooks)
            }));
            complete(callback, &user, outcome.map(|r| r.map(provisioned_object)));
            drop(hooks);
            drop(user);
            super::alloc::scrub_worker_stack();
            done.finish();
        })
        .map_err(|e| Error::Internal(format!("cannot start a worker thread: {e}")))?;
        let op = Box::new(fleetprov_operation {
            cancel,
            completion,
            worker: thread.thread().id(),
            thread: Mutex::new(Some(thread)),
        });
        // SAFETY: checked non-NULL above; valid for writes per the header.
        unsafe { write_out(out, Box::into_raw(op)) }
    })
}

pub(crate) type CompletionFn<T> =
    unsafe extern "C" fn(*mut c_void, fleetprov_result, *mut T, *const fleetprov_error);

/// Calls a completion callback with a result or an error (a panic counts as FLEETPROV_PANIC).
pub(crate) fn complete<T>(
    callback: CompletionFn<T>,
    user: &UserData,
    outcome: std::thread::Result<Result<T, Error>>,
) {
    match outcome {
        Ok(Ok(value)) => {
            let object = Box::into_raw(Box::new(value));
            // SAFETY: callback and userdata registered together; ownership of `object` passes
            // to the callee, as the header says.
            unsafe {
                callback(
                    user.ptr,
                    fleetprov_result::FLEETPROV_OK,
                    object,
                    ptr::null(),
                )
            }
        }
        Ok(Err(e)) => {
            let err = fleetprov_error::new(&e);
            // SAFETY: `err` outlives the call; documented as borrowed for the call.
            unsafe { callback(user.ptr, err.result, ptr::null_mut(), &err) }
        }
        Err(_) => {
            let err = fleetprov_error::panic();
            // SAFETY: as above.
            unsafe { callback(user.ptr, err.result, ptr::null_mut(), &err) }
        }
    }
}

/// Asks the operation to stop; its callback then reports FLEETPROV_CANCELLED (unless it had
/// already finished). Thread-safe; may be called from any thread, callbacks included.
#[no_mangle]
pub unsafe extern "C" fn fleetprov_operation_cancel(
    operation: *mut fleetprov_operation,
) -> fleetprov_result {
    guard(|| {
        // SAFETY: pointer per the header.
        let op = unsafe { operation.as_ref() }.ok_or_else(|| invalid("operation is NULL"))?;
        op.cancel.cancel();
        Ok(())
    })
}

/// Blocks until the operation's callback has returned and its userdata was released. Any
/// number of threads may wait at once; each returns only then. From the operation's own
/// callback (which would wait for itself) or from any progress or log callback it returns
/// FLEETPROV_IN_CALLBACK without waiting.
#[no_mangle]
pub unsafe extern "C" fn fleetprov_operation_wait(
    operation: *mut fleetprov_operation,
) -> fleetprov_result {
    guard(|| {
        // SAFETY: pointer per the header.
        let op = unsafe { operation.as_ref() }.ok_or_else(|| invalid("operation is NULL"))?;
        if op.worker == std::thread::current().id() {
            return Err(Error::InCallback(
                "fleetprov_operation_wait() of the operation whose callback is running",
            ));
        }
        refuse_in_callback("fleetprov_operation_wait()")?;
        op.completion.clone().wait();
        Ok(())
    })
}

/// Cancels the operation if still running, waits until its callback returned and its userdata
/// was released (unless called from that callback: then the worker finishes on its own) and frees
/// the handle. NULL is a no-op. Call it once, after every other call on the operation returned.
#[no_mangle]
pub unsafe extern "C" fn fleetprov_operation_free(operation: *mut fleetprov_operation) {
    guard_value((), || {
        if operation.is_null() {
            return;
        }
        // SAFETY: created by fleetprov_provision_async and freed once, per the header.
        let op = unsafe { Box::from_raw(operation) };
        op.cancel.cancel();
        if op.worker != std::thread::current().id() {
            op.completion.wait();
            join_unless_self(lock(&op.thread).take());
        }
    })
}
