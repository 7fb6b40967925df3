//! Connections to AWS IoT: the settings ([`Config`]), cancellation ([`Cancel`]) and, with the
//! cargo feature `transport` (on by default), the built-in transport: MQTT (rumqttc) over TLS
//! (rustls with ring) driving the engine.
//!
//! Every operation runs on a current-thread tokio runtime owned by the [`Client`], in the
//! calling thread; the callback flavours in the C API run it on a worker thread. Without the
//! feature the library has no MQTT and no TLS of its own: the firmware's stack drives the flow
//! through the host API ([`crate::ffi`]'s `fleetprov_host_*`), and every call that needs the
//! built-in transport fails with [`Error::InvalidArgument`] saying so.

#[cfg(not(feature = "transport"))]
mod absent;
#[cfg(feature = "transport")]
mod driver;
#[cfg(feature = "transport")]
mod link;
#[cfg(feature = "transport")]
mod mqtt;
pub mod tls;

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use once_cell::sync::Lazy;

use crate::error::Error;
use crate::keys::remote::RemoteKey;
use crate::keys::signer::ExternalKey;
use crate::protocol::Format;
use crate::secret::Secret;
#[cfg(not(feature = "transport"))]
pub(crate) use absent::run_flow;
#[cfg(not(feature = "transport"))]
pub use absent::Client;
#[cfg(feature = "transport")]
pub(crate) use driver::{drive, run_flow, runtime};
#[cfg(feature = "transport")]
pub use mqtt::Client;
#[cfg(feature = "transport")]
use mqtt::{at_ms, connection_error, Credential};
pub use tls::Roots;

/// Why a build without the cargo feature `transport` refuses what needs the built-in transport.
#[cfg_attr(feature = "transport", allow(dead_code))]
pub(crate) const NO_TRANSPORT: &str = "this build of the library has no MQTT or TLS of its own \
     (built without the cargo feature `transport`): drive the flow with the host API \
     (fleetprov_host_*) over the firmware's own MQTT connection";

pub use crate::engine::LogLevel;

pub use crate::driver::{LogFn, ProgressFn};

/// The MQTT version of the built-in transport's connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MqttVersion {
    /// MQTT 3.1.1: for brokers without MQTT 5. AWS IoT answers a refusal by closing the
    /// connection, without saying why.
    V311,
    /// MQTT 5 (the default; AWS IoT Core speaks it on every endpoint): the server says why it
    /// refuses a connection (CONNACK), a subscription (SUBACK) or a request (PUBACK), or ends
    /// a connection (DISCONNECT), with a reason code and often a reason string, which the
    /// library's errors carry ([`crate::Error::Refused`]). A policy that denies a request then
    /// fails at once, not after the retries a silent close costs.
    #[default]
    V5,
}

/// Connection settings.
#[derive(Clone)]
pub struct Config {
    /// Endpoint host name; also the TLS server name (SNI).
    pub host: String,
    /// 8883, or 443 with ALPN.
    pub port: u16,
    pub roots: Roots,
    /// Certificate (chain) the client authenticates with: the claim certificate to provision.
    pub cert_pem: String,
    /// The private key of `cert_pem` (unused when `claim_signer` is set).
    pub key_pem: Secret,
    /// The certificate's key behind a signing function (a secure element): when set, the
    /// connections with the claim certificate authenticate with it, and `cert_pem` and
    /// `key_pem` are not used ([`Config::with_signer`]).
    pub claim_signer: Option<RemoteKey>,
    /// The new device key behind a signing function (the one-call flow's
    /// [`crate::provision::Method::ExternalKey`]): the verification connection signs with it.
    pub(crate) device_signer: Option<ExternalKey>,
    pub client_id: String,
    pub keep_alive: Duration,
    /// Offer ALPN `x-amzn-mqtt-ca`; `None` means "when the port is 443".
    pub alpn: Option<bool>,
    /// The MQTT version the built-in transport speaks (default MQTT 5).
    pub mqtt_version: MqttVersion,
    pub format: Format,
    /// Longest wait for any one step (TCP+TLS+CONNACK, SUBACK, a reply).
    pub step_timeout: Duration,
    /// Longest time for a whole operation (the one-call flow: everything).
    pub overall_timeout: Option<Duration>,
    /// The file `roots` was read from, if any: named when the server is not trusted.
    pub ca_file: Option<std::path::PathBuf>,
    /// What `cert_pem` is, in messages: "claim certificate", or the device's current
    /// certificate when rotating.
    pub certificate_name: String,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("client_id", &self.client_id)
            .field("format", &self.format)
            .field("mqtt_version", &self.mqtt_version)
            .field("key_pem", &self.key_pem)
            .field("claim_signer", &self.claim_signer)
            .finish_non_exhaustive()
    }
}

impl Config {
    /// Defaults: port 8883, system roots, keep-alive 60 s, JSON, 10 s per step, 60 s overall.
    pub fn new(host: impl Into<String>, cert_pem: impl Into<String>, key_pem: Secret) -> Config {
        Config {
            host: host.into(),
            port: 8883,
            roots: Roots::System,
            cert_pem: cert_pem.into(),
            key_pem,
            claim_signer: None,
            device_signer: None,
            client_id: String::new(),
            keep_alive: Duration::from_secs(60),
            alpn: None,
            mqtt_version: MqttVersion::default(),
            format: Format::Json,
            step_timeout: Duration::from_secs(10),
            overall_timeout: Some(Duration::from_secs(60)),
            ca_file: None,
            certificate_name: "claim certificate".into(),
        }
    }

    /// Defaults as [`Config::new`], authenticating with `claim`: a certificate whose key signs
    /// through a callback (a secure element, TPM or HSM).
    pub fn with_signer(host: impl Into<String>, claim: RemoteKey) -> Config {
        let mut c = Config::new(host, String::new(), Secret::new(String::new()));
        c.claim_signer = Some(claim);
        c
    }

    /// The credentials of the connections with the claim (or current) certificate.
    #[cfg(feature = "transport")]
    pub(crate) fn claim_key(&self) -> tls::ClientKey<'_> {
        match &self.claim_signer {
            Some(remote) => tls::ClientKey::Remote(remote),
            None => tls::ClientKey::Pem {
                cert_pem: &self.cert_pem,
                key_pem: &self.key_pem,
            },
        }
    }

    /// The trusted CAs in words: the CA file, the CA certificates given, or the system's.
    #[cfg_attr(not(feature = "transport"), allow(dead_code))]
    pub(crate) fn trust_name(&self) -> String {
        match (&self.roots, &self.ca_file) {
            (Roots::System, _) => "the system's trust store".into(),
            (Roots::Pem(_), Some(file)) => format!("the CA file {}", file.display()),
            (Roots::Pem(_), None) => "the CA certificates given".into(),
        }
    }

    pub(crate) fn validate(&self) -> Result<(), Error> {
        if self.host.is_empty() {
            return Err(Error::InvalidArgument("the endpoint host is empty".into()));
        }
        if self.port == 0 {
            return Err(Error::InvalidArgument("the port is 0".into()));
        }
        if self.client_id.len() > 128 {
            return Err(Error::InvalidArgument(
                "the client id is longer than 128 bytes".into(),
            ));
        }
        if self.keep_alive.as_secs() < 5 || self.keep_alive.as_secs() > 1200 {
            return Err(Error::InvalidArgument(
                "keep-alive must be between 5 and 1200 seconds".into(),
            ));
        }
        if self.step_timeout.is_zero() {
            return Err(Error::InvalidArgument("the step timeout is 0".into()));
        }
        self.format
            .check_available()
            .map_err(Error::InvalidArgument)?;
        // The roots are checked when the TLS configuration is made (a host transport has none).
        Ok(())
    }
}

/// Cancels a running operation from another thread, or from a signal handler.
///
/// [`Cancel::cancel`] only sets a flag, which the operation looks at every 20 ms while it waits:
/// so it is async-signal-safe, and it touches nothing the operation's thread owns (waking that
/// thread's event loop from outside would hand its wakers across threads through futexes that
/// ThreadSanitizer cannot see).
#[derive(Debug, Default)]
pub struct Cancel {
    flag: AtomicBool,
}

impl Cancel {
    /// Asks the running (or next) operation to stop with [`Error::Cancelled`]. Async-signal-safe:
    /// one atomic store.
    pub fn cancel(&self) {
        self.flag.store(true, Ordering::SeqCst);
    }

    /// Clears a cancellation so that later operations run.
    pub fn reset(&self) {
        self.flag.store(false, Ordering::SeqCst);
    }

    pub fn is_cancelled(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }
}

/// The engine-clock time `d` from now.
pub(crate) fn deadline_after(d: Duration) -> u64 {
    now_ms().saturating_add(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Milliseconds on the engine's clock.
fn now_ms() -> u64 {
    static ORIGIN: Lazy<Instant> = Lazy::new(Instant::now);
    u64::try_from(ORIGIN.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// A random u64 for client ids.
pub(crate) fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    // RandomState is seeded from the OS; good enough for a client id, not for secrets.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.finish()
}
