//! The cancellation switch for the blocking calls.

use std::sync::Arc;

use super::types::*;
use crate::client::Cancel;

/// A cancellation switch for the blocking calls fleetprov_provision() and fleetprov_rotate()
/// (fleetprov_config_set_cancel()): triggered from another thread or a signal handler, the
/// running call stops within about 20 ms with FLEETPROV_CANCELLED. Create with
/// fleetprov_cancel_new(), free with fleetprov_cancel_free().
pub struct fleetprov_cancel {
    pub(crate) cancel: Arc<Cancel>,
}

/// Creates a cancellation switch, not triggered. Writes it to `*out`.
#[no_mangle]
pub unsafe extern "C" fn fleetprov_cancel_new(out: *mut *mut fleetprov_cancel) -> fleetprov_result {
    guard(|| {
        let cancel = Box::into_raw(Box::new(fleetprov_cancel {
            cancel: Arc::new(Cancel::default()),
        }));
        // SAFETY: `out` is NULL or valid for writes per the header.
        let written = unsafe { write_out(out, cancel) };
        if written.is_err() {
            // SAFETY: just created above and not handed out.
            drop(unsafe { Box::from_raw(cancel) });
        }
        written
    })
}

/// Triggers the switch: every blocking call of a config it is set on stops at its next step
/// with FLEETPROV_CANCELLED, keeping the resume journal (a later call resumes), and so does every
/// later call until fleetprov_cancel_reset(). A call whose credentials were already committed
/// reports its success. Async-signal-safe (one atomic store): it may be called from a signal
/// handler, and from any thread. NULL is a no-op.
#[no_mangle]
pub unsafe extern "C" fn fleetprov_cancel_trigger(cancel: *const fleetprov_cancel) {
    // No guard: nothing here can panic, and catch_unwind has no business in a signal handler.
    // SAFETY: NULL or a live switch, per the header.
    if let Some(c) = unsafe { cancel.as_ref() } {
        c.cancel.cancel();
    }
}

/// Whether the switch was triggered (and not reset since); false for NULL.
#[no_mangle]
pub unsafe extern "C" fn fleetprov_cancel_is_triggered(cancel: *const fleetprov_cancel) -> bool {
    guard_value(false, || {
        // SAFETY: NULL or a live switch, per the header.
        unsafe { cancel.as_ref() }.is_some_and(|c| c.cancel.is_cancelled())
    })
}

/// Untriggers the switch, so that later calls run.
#[no_mangle]
pub unsafe extern "C" fn fleetprov_cancel_reset(cancel: *mut fleetprov_cancel) -> fleetprov_result {
    guard(|| {
        // SAFETY: NULL or a live switch, per the header.
        let c = unsafe { cancel.as_ref() }.ok_or_else(|| invalid("cancel is NULL"))?;
        c.cancel.reset();
        Ok(())
    })
}

/// Frees the switch. A config it was set on keeps working with it (it holds a reference); a
/// signal handler must not trigger it after this. NULL is a no-op.
#[no_mangle]
pub unsafe extern "C" fn fleetprov_cancel_free(cancel: *mut fleetprov_cancel) {
    guard_value((), || {
        if !cancel.is_null() {
            // SAFETY: created by fleetprov_cancel_new and freed once, per the header.
            drop(unsafe { Box::from_raw(cancel) });
        }
    })
}
