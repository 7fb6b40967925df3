//! fleetprov: AWS IoT Core fleet provisioning over MQTT, for C firmware, Python and Rust.
//!
//! Layers, from the wire inwards: [`ffi`] (the C ABI), [`client`] (MQTT over TLS with rumqttc
//! and rustls), [`engine`] (a sans-IO state machine), [`protocol`] (topics, JSON/CBOR payloads,
//! service errors), and [`keys`] / [`store`] (keys, CSRs, credential files).

pub mod client;
pub mod driver;
pub mod engine;
pub mod error;
pub mod ffi;
pub mod keys;
mod pacing;
pub mod protocol;
pub mod provision;
pub mod secret;
pub mod store;

pub use client::{Cancel, Client, Config, MqttVersion, Roots};
pub use error::Error;
pub use keys::remote::{RemoteKey, Scheme, TlsSigner};
pub use provision::{provision, Method, Provisioned, Request};
pub use secret::Secret;

/// The library's version (Cargo package version).
pub fn version() -> &'static str {
    env!("CARGO_PKG_VERSION")
}
