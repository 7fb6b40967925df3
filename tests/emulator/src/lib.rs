//! `fleetprov-emulator`: an offline stand-in for the AWS IoT Core fleet provisioning endpoint.
//!
//! It speaks MQTT 3.1.1 and 5 over mutual TLS, answers CreateKeysAndCertificate,
//! CreateCertificateFromCsr and RegisterThing in JSON and CBOR like AWS, evaluates provisioning
//! templates, runs pre-provisioning hooks, keeps a registry of certificates, things and policies
//! that survives `kill -9`, and can misbehave on purpose (see [`faults`]).
//!
//! Rust tests start it in-process with [`Emulator::start`]; everyone else runs the
//! `fleetprov-emulator` binary. It is a separate crate so that nothing of it reaches the
//! `fleetprov` library.

pub mod faults;
pub mod pki;
pub mod topics;
pub mod wire;

mod broker;
mod control;
mod datadir;
mod errors;
mod hook;
pub mod policy;
mod resources;
mod service;
mod store;
mod template;
mod tls;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub use datadir::DataPaths;
pub use faults::{Fault, Faults};
pub use pki::{certificate_id, KeyKind};
pub use service::{decode, encode};
pub use topics::Format;

static VERBOSE: AtomicBool = AtomicBool::new(false);

/// Turns the emulator's log lines on stderr on or off (off by default). Log lines never carry
/// private keys or ownership tokens.
pub fn set_verbose(on: bool) {
    VERBOSE.store(on, Ordering::Relaxed);
}

#[doc(hidden)]
pub fn verbose() -> bool {
    VERBOSE.load(Ordering::Relaxed)
}

#[macro_export]
#[doc(hidden)]
macro_rules! log {
    ($($arg:tt)*) => {
        if $crate::verbose() {
            eprintln!("fleetprov-emulator: {}", format_args!($($arg)*));
        }
    };
}

/// How to run the emulator.
#[derive(Debug, Clone)]
pub struct Config {
    /// Holds the CA, the credentials, the templates and the registry; created on first start.
    pub data_dir: PathBuf,
    /// Address to listen on (default 127.0.0.1).
    pub bind: IpAddr,
    /// Port to listen on; 0 picks a free one.
    pub port: u16,
    /// Keys made by CreateKeysAndCertificate: RSA-2048 like AWS (default) or EC P-256 (fast).
    pub key_kind: KeyKind,
    /// Key of a CA made on first start: RSA-2048 with sha256WithRSAEncryption signatures, as
    /// AWS signs device certificates (default), or EC P-256 (fast). An existing CA is kept.
    pub ca_key_kind: KeyKind,
    /// Lifetime of ownership tokens (AWS: one hour).
    pub token_ttl: Duration,
    /// Time a pre-provisioning hook has to answer (AWS: 5 s).
    pub hook_timeout: Duration,
    /// Keep-alive values below this many seconds are raised to it, as AWS raises them to 30
    /// (default 30; tests of idle timeouts set it lower).
    pub min_keep_alive: u16,
    /// Refuse TLS clients that send no SNI, as AWS does (default false: clients that connect
    /// to an IP address, 127.0.0.1 included, send none).
    pub require_sni: bool,
    /// Least time between two accepted CONNECTs with the same client id: AWS IoT Core accepts
    /// one per second per client id and hangs up on more (default 1 s; zero turns it off).
    pub connect_interval: Duration,
    /// Refuse connections that did not negotiate ALPN `x-amzn-mqtt-ca` (as AWS on port 443).
    pub require_alpn: bool,
    /// Offer TLS 1.2 only (AWS IoT with a TLS 1.2-only security policy); default 1.3 and 1.2.
    pub tls12_only: bool,
    /// Fault rules in force from the start.
    pub faults: Vec<Fault>,
    /// Port of the control interface on the bind address; `None` for no control interface.
    pub control_port: Option<u16>,
    /// Delete certificates whose ownership token expired on a timer (default true); without
    /// it only the control interface's `sweep` does.
    pub auto_sweep: bool,
    /// Region in the ARNs policies are evaluated against (default us-east-1).
    pub region: String,
    /// Account id in those ARNs (default 123456789012, the one AWS's examples use).
    pub account_id: String,
    /// Local commands standing for Lambda pre-provisioning hooks: (targetArn, program and
    /// arguments), for templates as `aws iot describe-provisioning-template` prints them.
    pub hook_commands: Vec<(String, Vec<String>)>,
}

impl Config {
    /// Defaults: 127.0.0.1, a free port, RSA keys, 1 h tokens, 5 s hooks, no faults.
    pub fn new(data_dir: impl Into<PathBuf>) -> Config {
        Config {
            data_dir: data_dir.into(),
            bind: IpAddr::V4(Ipv4Addr::LOCALHOST),
            port: 0,
            key_kind: KeyKind::Rsa2048,
            ca_key_kind: KeyKind::Rsa2048,
            token_ttl: Duration::from_secs(3600),
            hook_timeout: Duration::from_secs(5),
            require_alpn: false,
            min_keep_alive: 30,
            require_sni: false,
            connect_interval: Duration::from_secs(1),
            tls12_only: false,
            faults: Vec::new(),
            control_port: None,
            auto_sweep: true,
            region: "us-east-1".into(),
            account_id: "123456789012".into(),
            hook_commands: Vec::new(),
        }
    }
}

/// A running emulator. Dropping it stops it.
pub struct Emulator {
    runtime: Option<tokio::runtime::Runtime>,
    addr: SocketAddr,
    control_addr: Option<SocketAddr>,
    paths: DataPaths,
    faults: Arc<Faults>,
    store: Arc<store::Store>,
    broker: Arc<broker::Broker>,
}

impl std::fmt::Debug for Emulator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Emulator")
            .field("addr", &self.addr)
            .field("data_dir", &self.paths.dir)
            .finish()
    }
}

impl Emulator {
    /// Prepares the data directory and starts listening; returns once connections are accepted.
    pub fn start(config: Config) -> Result<Emulator, String> {
        let paths = DataPaths::new(&config.data_dir);
        let prepared = datadir::prepare(
            &paths,
            config.ca_key_kind,
            &config.region,
            &config.account_id,
        )?;
        let store = Arc::new(prepared.store);
        let tls = tls::server_config(
            &prepared.server_cert_pem,
            &prepared.server_key_pem,
            store.clone(),
            config.tls12_only,
        )?;
        let faults = Arc::new(Faults::default());
        for f in &config.faults {
            faults.add(*f);
        }
        let service = Arc::new(service::Service {
            ca: Arc::new(prepared.ca),
            store: store.clone(),
            errors: errors::ErrorTable::load(&paths.errors)?,
            config: service::ServiceConfig {
                key_kind: config.key_kind,
                token_ttl: config.token_ttl,
                hook_timeout: config.hook_timeout,
                templates_dir: paths.templates.clone(),
                claim_policy: paths.claim_policy.clone(),
                resources: paths.resources.clone(),
                policies_dir: paths.policies.clone(),
                region: config.region.clone(),
                account_id: config.account_id.clone(),
                hook_commands: config.hook_commands.clone(),
            },
        });
        let broker = Arc::new(broker::Broker::new(
            service,
            faults.clone(),
            tls,
            config.require_alpn,
            config.min_keep_alive,
            config.require_sni,
            config.connect_interval,
        ));
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("fleetprov-emulator")
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start the runtime: {e}"))?;
        // Bound with std (no blocking on the runtime, so this works from async callers too),
        // then handed to tokio.
        let bind = |port: u16, what: &str| {
            let l = std::net::TcpListener::bind((config.bind, port))
                .map_err(|e| format!("cannot listen {what}on {}:{port}: {e}", config.bind))?;
            l.set_nonblocking(true).map_err(|e| e.to_string())?;
            Ok::<_, String>(l)
        };
        let listener = bind(config.port, "")?;
        let control = config
            .control_port
            .map(|port| bind(port, "for control "))
            .transpose()?;
        let _guard = runtime.enter();
        let listener = tokio::net::TcpListener::from_std(listener).map_err(|e| e.to_string())?;
        let control = control
            .map(tokio::net::TcpListener::from_std)
            .transpose()
            .map_err(|e| e.to_string())?;
        let addr = listener
            .local_addr()
            .map_err(|e| format!("local address: {e}"))?;
        let control_addr = control.as_ref().and_then(|c| c.local_addr().ok());
        runtime.spawn(broker.clone().run(listener));
        if let Some(control) = control {
            runtime.spawn(control::serve(control, faults.clone(), store.clone()));
        }
        if config.auto_sweep {
            runtime.spawn(sweep(store.clone(), config.token_ttl));
        }
        Ok(Emulator {
            runtime: Some(runtime),
            addr,
            control_addr,
            paths,
            faults,
            store,
            broker,
        })
    }

    /// The address MQTT clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The port MQTT clients connect to.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// The control interface's address, if one was asked for.
    pub fn control_addr(&self) -> Option<SocketAddr> {
        self.control_addr
    }

    /// The files of the data directory (CA, claim certificate and key, templates, ...).
    pub fn paths(&self) -> &DataPaths {
        &self.paths
    }

    /// The fault rules, to change while running.
    pub fn faults(&self) -> &Faults {
        &self.faults
    }

    /// Number of MQTT connections currently open (past CONNECT).
    pub fn connections(&self) -> usize {
        self.broker.connections()
    }

    /// The registry as JSON: `{"certificates": [...], "things": [...], "policies": [...]}`.
    pub fn registry(&self) -> Result<serde_json::Value, String> {
        self.store.snapshot().map_err(|e| e.to_string())
    }

    /// Deletes now the certificates whose ownership token expired unregistered (the emulator
    /// also does this on its own, several times per token lifetime). Returns how many.
    pub fn sweep_expired(&self) -> Result<usize, String> {
        self.store
            .sweep_expired(service::now_ms())
            .map_err(|e| e.to_string())
    }

    /// Stops accepting connections and closes every open one.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if let Some(rt) = self.runtime.take() {
            // Safe from inside another runtime too (tests run the emulator from async code).
            rt.shutdown_background();
        }
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Prints the registry of a data directory (works while an emulator runs on it).
pub fn list(data_dir: &Path) -> Result<serde_json::Value, String> {
    let paths = DataPaths::new(data_dir);
    if !paths.registry.exists() {
        return Err(format!("no registry in {}", data_dir.display()));
    }
    store::Store::open_read_only(&paths.registry)
        .and_then(|s| s.snapshot())
        .map_err(|e| e.to_string())
}

async fn sweep(store: Arc<store::Store>, ttl: Duration) {
    let every = (ttl / 4).clamp(Duration::from_millis(100), Duration::from_secs(30));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match store.sweep_expired(service::now_ms()) {
            Ok(0) => {}
            Ok(n) => log!("deleted {n} certificate(s) whose ownership token expired"),
            Err(e) => log!("sweep failed: {e}"),
        }
    }
}
