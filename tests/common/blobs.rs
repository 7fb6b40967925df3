//! A store of named blobs in memory, as firmware's own store would be, with failures on demand.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use fleetprov::store::{Blobs, SharedBlobs};
use zeroize::Zeroizing;

/// The stores and removals of a provisioning with a blob store, in order: the journal at the
/// certificate and again at the registration, then the commit (device.json removed first and
/// stored last), then the journal removed.
pub const STORES_OF_A_PROVISIONING: [&str; 7] = [
    "store journal",
    "store journal",
    "remove device.json",
    "store private.key",
    "store certificate.pem",
    "store device.json",
    "remove journal",
];

/// Blobs in a map: each store replaces one whole, as the storage contract asks.
#[derive(Default)]
pub struct MemBlobs {
    map: Mutex<BTreeMap<String, Vec<u8>>>,
    /// A store of this blob fails (once per entry).
    fail_store: Mutex<Vec<String>>,
    /// Every call, in order: "load journal", "store private.key", ...
    pub calls: Mutex<Vec<String>>,
}

impl MemBlobs {
    pub fn new() -> Arc<MemBlobs> {
        Arc::new(MemBlobs::default())
    }

    /// The store for a request.
    pub fn shared(self: &Arc<Self>) -> SharedBlobs {
        SharedBlobs(self.clone())
    }

    /// The blob's content as text.
    pub fn text(&self, name: &str) -> Option<String> {
        let map = self.map.lock().unwrap();
        map.get(name).map(|b| String::from_utf8(b.clone()).unwrap())
    }

    pub fn names(&self) -> Vec<String> {
        self.map.lock().unwrap().keys().cloned().collect()
    }

    /// The next store of `name` fails.
    pub fn fail_next_store(&self, name: &str) {
        self.fail_store.lock().unwrap().push(name.to_owned());
    }

    /// The calls made so far, and forgets them.
    pub fn take_calls(&self) -> Vec<String> {
        std::mem::take(&mut *self.calls.lock().unwrap())
    }
}

impl Blobs for MemBlobs {
    fn load(&self, name: &str) -> Result<Option<Zeroizing<Vec<u8>>>, String> {
        self.calls.lock().unwrap().push(format!("load {name}"));
        Ok(self
            .map
            .lock()
            .unwrap()
            .get(name)
            .map(|b| Zeroizing::new(b.clone())))
    }

    fn store(&self, name: &str, data: &[u8]) -> Result<(), String> {
        self.calls.lock().unwrap().push(format!("store {name}"));
        let mut fail = self.fail_store.lock().unwrap();
        if let Some(i) = fail.iter().position(|n| n == name) {
            fail.remove(i);
            return Err("the flash is worn out".into());
        }
        self.map
            .lock()
            .unwrap()
            .insert(name.to_owned(), data.to_vec());
        Ok(())
    }

    fn remove(&self, name: &str) -> Result<(), String> {
        self.calls.lock().unwrap().push(format!("remove {name}"));
        self.map.lock().unwrap().remove(name);
        Ok(())
    }
}
