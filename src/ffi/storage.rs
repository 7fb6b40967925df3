//! The storage interface: the firmware keeps the resume journal and the credentials in a store
//! of its own (a secure element's slots, a raw flash partition, a TEE, an encrypted filesystem)
//! instead of the library's files.

use std::ffi::{c_char, c_void, CString};
use std::sync::{Arc, Mutex};

use zeroize::Zeroizing;

use super::config::{config_mut, fleetprov_config, remember};
use super::types::*;
use crate::store::{Blobs, SharedBlobs};

/// A storage callback's return value: done (a load found the blob).
pub const FLEETPROV_STORAGE_OK: i32 = 0;
/// A load callback's return value: there is no blob of that name (not an error).
pub const FLEETPROV_STORAGE_NOT_FOUND: i32 = 1;

/// Largest blob a load accepts (a journal or credential set is a few kilobytes).
const MAX_BLOB: usize = 1 << 20;

/// A store of named blobs the firmware owns, for fleetprov_config_set_storage().
///
/// The library stores four blobs, by these names:
/// - "journal": the resume journal (holds the private key and the ownership token while a
///   provisioning is in progress: keep it as secret as the key),
/// - "private.key": the device's private key, PEM (secret),
/// - "certificate.pem": the device certificate, PEM,
/// - "device.json": thingName, certificateId and deviceConfiguration, JSON.
///
/// A commit removes "device.json", stores "private.key" and "certificate.pem", then
/// "device.json": a present "device.json" means a complete, matching set.
///
/// Contract of each callback (all three are required):
/// - store: replace the blob `name` with `len` bytes at `data`, **atomically**: after a crash
///   or power loss at any point a later load gives the old content or the new, never a mix or
///   a truncation (write a new copy, then switch to it). Return FLEETPROV_STORAGE_OK, or any
///   other value on failure.
/// - load: if there is no blob `name`, return FLEETPROV_STORAGE_NOT_FOUND. Otherwise write its
///   size to `*len`, copy it into `buf` if it fits in `capacity` bytes, and return
///   FLEETPROV_STORAGE_OK; when it did not fit, the library calls again with a buffer of at
///   least `*len` bytes. Any other return value is a failure.
/// - remove: delete the blob `name`; no such blob is success. Return FLEETPROV_STORAGE_OK, or
///   any other value on failure.
///
/// A failure ends the provisioning with FLEETPROV_STORAGE and loses nothing: what was committed
/// stays, the journal keeps a pending certificate for the next call.
///
/// Thread: called on the thread running the provisioning (the caller of fleetprov_provision(),
/// fleetprov_rotate() or the fleetprov_host_* functions, or the worker thread of an `_async`
/// call), never two at once for one config. May not make blocking calls
/// (FLEETPROV_IN_CALLBACK, see fleetprov_userdata_free). `name` and the buffers are valid only
/// during the call; do not log `data` or `buf` (they hold keys and tokens).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct fleetprov_storage {
    /// sizeof(fleetprov_storage): lets later versions grow this struct without breaking
    /// callers built against this one.
    pub size: usize,
    pub load: Option<
        unsafe extern "C" fn(
            userdata: *mut c_void,
            name: *const c_char,
            buf: *mut u8,
            capacity: usize,
            len: *mut usize,
        ) -> i32,
    >,
    pub store: Option<
        unsafe extern "C" fn(
            userdata: *mut c_void,
            name: *const c_char,
            data: *const u8,
            len: usize,
        ) -> i32,
    >,
    pub remove: Option<unsafe extern "C" fn(userdata: *mut c_void, name: *const c_char) -> i32>,
}

/// The firmware's store behind [`Blobs`].
struct CallbackStorage {
    table: fleetprov_storage,
    user: UserData,
    /// One call at a time, whichever flow of the config makes it.
    lock: Mutex<()>,
}

impl CallbackStorage {
    fn serial<T>(&self, f: impl FnOnce() -> T) -> T {
        let _one = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        f()
    }
}

fn code(r: i32) -> String {
    format!("the storage callback returned {r}")
}

impl Blobs for CallbackStorage {
    fn load(&self, name: &str) -> Result<Option<Zeroizing<Vec<u8>>>, String> {
        let (Some(load), name) = (self.table.load, cstring(name)) else {
            return Err("no load callback".into());
        };
        let mut buf = Zeroizing::new(vec![0u8; 4096]);
        // Bounded: a blob that keeps growing between calls is an error after three tries.
        for _ in 0..3 {
            let mut len = 0usize;
            let user = self.user.ptr;
            // SAFETY: the callback and userdata were registered together; `name` is
            // NUL-terminated, `buf` has `buf.len()` writable bytes and `len` is writable.
            let r = self.serial(|| {
                in_callback(|| unsafe {
                    load(user, name.as_ptr(), buf.as_mut_ptr(), buf.len(), &mut len)
                })
            });
            match r {
                FLEETPROV_STORAGE_NOT_FOUND => return Ok(None),
                FLEETPROV_STORAGE_OK => {}
                r => return Err(code(r)),
            }
            if len <= buf.len() {
                buf.truncate(len);
                return Ok(Some(buf));
            }
            if len > MAX_BLOB {
                return Err(format!("the blob is {len} bytes, more than {MAX_BLOB}"));
            }
            buf = Zeroizing::new(vec![0u8; len]);
        }
        Err("the blob's size kept changing between calls".into())
    }

    fn store(&self, name: &str, data: &[u8]) -> Result<(), String> {
        let (Some(store), name) = (self.table.store, cstring(name)) else {
            return Err("no store callback".into());
        };
        let user = self.user.ptr;
        // SAFETY: the callback and userdata were registered together; `name` is
        // NUL-terminated and `data` holds `data.len()` readable bytes.
        let r = self.serial(|| {
            in_callback(|| unsafe { store(user, name.as_ptr(), data.as_ptr(), data.len()) })
        });
        if r == FLEETPROV_STORAGE_OK {
            Ok(())
        } else {
            Err(code(r))
        }
    }

    fn remove(&self, name: &str) -> Result<(), String> {
        let (Some(remove), name) = (self.table.remove, cstring(name)) else {
            return Err("no remove callback".into());
        };
        let user = self.user.ptr;
        // SAFETY: the callback and userdata were registered together; `name` is NUL-terminated.
        let r = self.serial(|| in_callback(|| unsafe { remove(user, name.as_ptr()) }));
        if r == FLEETPROV_STORAGE_OK {
            Ok(())
        } else {
            Err(code(r))
        }
    }
}

fn cstring(s: &str) -> CString {
    // Blob names are the library's own constants: no NUL inside.
    CString::new(s).unwrap_or_default()
}

/// Keeps the resume journal and the credentials in the firmware's own store (see
/// fleetprov_storage) instead of files: for fleetprov_provision(), fleetprov_provision_async(),
/// fleetprov_rotate() (the current credentials are read from the store and replaced there) and
/// the host transport. `storage` is copied; its `size` must be sizeof(fleetprov_storage) (or
/// more, from a later header). Excludes fleetprov_config_set_output_dir() and
/// fleetprov_config_set_state_dir(): a provisioning with both fails with
/// FLEETPROV_INVALID_ARGUMENT. No state lock is taken: one provisioning at a time per store is
/// the firmware's to ensure. NULL `storage` goes back to files (and releases the userdata).
/// `userdata` is passed to every callback and released with `userdata_free` (may be NULL) when
/// the config and every provisioning started from it are done with it, or at once if this
/// function fails.
#[no_mangle]
pub unsafe extern "C" fn fleetprov_config_set_storage(
    config: *mut fleetprov_config,
    storage: *const fleetprov_storage,
    userdata: *mut c_void,
    userdata_free: fleetprov_userdata_free,
) -> fleetprov_result {
    remember(config, "fleetprov_config_set_storage", || {
        let user = UserData::new(userdata, userdata_free);
        // SAFETY: pointer per the header.
        let config = unsafe { config_mut(config)? };
        if storage.is_null() {
            config.storage = None;
            return Ok(());
        }
        // SAFETY: non-NULL; the header requires at least the `size` field to be readable.
        let size = unsafe { storage.cast::<usize>().read_unaligned() };
        if size < std::mem::size_of::<fleetprov_storage>() {
            return Err(invalid(format!(
                "storage->size is {size}: set it to sizeof(fleetprov_storage) ({})",
                std::mem::size_of::<fleetprov_storage>()
            )));
        }
        // SAFETY: `size` says at least a whole fleetprov_storage is readable.
        let table = unsafe { *storage };
        if table.load.is_none() || table.store.is_none() || table.remove.is_none() {
            return Err(invalid(
                "every storage callback (load, store, remove) is required",
            ));
        }
        config.storage = Some(SharedBlobs(Arc::new(CallbackStorage {
            table,
            user,
            lock: Mutex::new(()),
        })));
        Ok(())
    })
}
