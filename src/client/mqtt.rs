//! The built-in transport's connections: rumqttc over rustls, and [`Client`], the step-by-step
//! API over them (cargo feature `transport`).

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use super::link::{Fault, Link, LinkEvent};
use super::ProgressFn;
use super::{deadline_after, driver, now_ms, tls, Cancel, Config, LogFn, LogLevel};
use crate::engine::flow::Progress;
use crate::engine::{Action, CertificateSource, Engine, Event, Operation, Outcome, Settings, Step};
use crate::error::Error;
use crate::keys::remote::SignerFailure;
use crate::protocol::{validate_template_name, CreatedCertificate, Registered};
use crate::secret::Secret;

/// How often a running operation looks at its cancel flag.
const CANCEL_POLL: Duration = Duration::from_millis(20);

impl Cancel {
    /// Resolves once [`Cancel::cancel`] was called (within 20 ms).
    pub(crate) async fn wait(&self) {
        while !self.is_cancelled() {
            tokio::time::sleep(CANCEL_POLL).await;
        }
    }
}

pub(crate) fn at_ms(ms: u64) -> tokio::time::Instant {
    let now = now_ms();
    tokio::time::Instant::now() + Duration::from_millis(ms.saturating_sub(now))
}

struct Connection {
    link: Link,
    subscribed: HashSet<String>,
}

/// An MQTT connection to AWS IoT (or the emulator) and the provisioning operations over it.
pub struct Client {
    config: Config,
    tls: Arc<rustls::ClientConfig>,
    runtime: tokio::runtime::Runtime,
    conn: Option<Connection>,
    progress: Option<ProgressFn>,
    log: Option<LogFn>,
    cancel: Arc<Cancel>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("config", &self.config)
            .field("connected", &self.conn.is_some())
            .finish_non_exhaustive()
    }
}

/// Whose certificate a connection authenticates with, for messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Credential {
    /// The configuration's certificate: the claim certificate (or, when rotating, the current
    /// device certificate).
    Configured,
    /// The certificate the flow just obtained.
    New,
}

/// The rustls error somewhere in `e`'s chain: rumqttc nests it in its own errors and in
/// `io::Error`s (whose `source()` skips the error they wrap), differently for TLS 1.2 (during
/// the handshake) and TLS 1.3 (a client certificate refused after it).
fn find_rustls<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    let mut current = Some(e);
    // Bounded: error chains are a few links long.
    for _ in 0..16 {
        let err = current?;
        if let Some(tls) = err.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        current = match err
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            Some(inner) => Some(inner as &(dyn std::error::Error + 'static)),
            None => err.source(),
        };
    }
    None
}

/// A failed or lost connection as the user should read it: which side refused what, with the
/// endpoint, and typed so that only what can pass is retried.
pub(crate) fn connection_error(e: Fault, config: &Config, who: Credential) -> Error {
    use rustls::AlertDescription as Alert;
    let endpoint = format!("{}:{}", config.host, config.port);
    if let Some(tls) = match &e {
        Fault::Io(io) => find_rustls(io),
        _ => None,
    } {
        return match tls {
            rustls::Error::Other(other) => match other.0.downcast_ref::<SignerFailure>() {
                Some(failure) => Error::Signer(failure.0.clone()),
                None => Error::Tls(format!("TLS with {endpoint}: {tls}")),
            },
            rustls::Error::AlertReceived(
                alert @ (Alert::BadCertificate
                | Alert::UnsupportedCertificate
                | Alert::CertificateRevoked
                | Alert::CertificateExpired
                | Alert::CertificateUnknown
                | Alert::UnknownCA
                | Alert::AccessDenied
                | Alert::CertificateRequired
                | Alert::HandshakeFailure),
            ) => Error::Tls(match who {
                Credential::Configured => format!(
                    "{endpoint} refused the {} (TLS alert {alert:?}): the certificate, or the CA \
                     that issued it, is not registered and ACTIVE in the AWS account and Region \
                     of this endpoint, or it expired or was revoked",
                    config.certificate_name
                ),
                Credential::New => format!(
                    "{endpoint} refused the new device certificate (TLS alert {alert:?}): it is \
                     not active"
                ),
            }),
            rustls::Error::InvalidCertificate(why) => Error::Tls(format!(
                "the server at {endpoint} is not trusted: its certificate does not verify with \
                 {} ({why:?}); check the CA (AWS IoT Core: AmazonRootCA1.pem) and the endpoint",
                config.trust_name()
            )),
            other => Error::Tls(format!("TLS with {endpoint}: {other}")),
        };
    }
    match e {
        Fault::ServerName(why) => Error::Tls(format!(
            "TLS with {endpoint}: {:?} cannot be a TLS server name ({why})",
            config.host
        )),
        Fault::Refused(refusal) => Error::Refused(refusal),
        Fault::Io(io) if io.to_string().contains("lookup address") => Error::Connection(format!(
            "the endpoint host {:?} does not resolve ({io}); retried in case the network is \
                 still coming up",
            config.host
        )),
        Fault::Io(io) => Error::Connection(format!("{endpoint}: {io}")),
        Fault::Timeout => Error::Connection(format!(
            "{endpoint}: no CONNACK within the step timeout (TCP, TLS and MQTT connect)"
        )),
        Fault::Closed => Error::Connection(format!("{endpoint} closed the connection")),
        Fault::Protocol(what) => Error::Connection(format!("{endpoint}: {what}")),
    }
}

impl Client {
    /// Checks the configuration and credentials; does not connect yet.
    pub fn new(config: Config) -> Result<Client, Error> {
        config.validate()?;
        let alpn = config.alpn.unwrap_or(config.port == 443);
        let tls = tls::client_config(&config.roots, config.claim_key(), alpn)?;
        let runtime = driver::runtime()?;
        Ok(Client {
            config,
            tls,
            runtime,
            conn: None,
            progress: None,
            log: None,
            cancel: Arc::new(Cancel::default()),
        })
    }

    /// Where each step reached is reported.
    pub fn set_progress(&mut self, progress: Option<ProgressFn>) {
        self.progress = progress;
    }

    /// Where log lines go.
    pub fn set_log(&mut self, log: Option<LogFn>) {
        self.log = log;
    }

    /// Shares a cancellation handle (the one-call flow uses one for both of its connections).
    pub fn set_cancel(&mut self, cancel: Arc<Cancel>) {
        self.cancel = cancel;
    }

    /// A handle that cancels this client's running operation from any thread.
    pub fn canceller(&self) -> Arc<Cancel> {
        self.cancel.clone()
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    fn log(&self, level: LogLevel, line: impl FnOnce() -> String) {
        if let Some(log) = &self.log {
            log(level, &line());
        }
    }

    fn progress(&self, step: Step) {
        self.log(LogLevel::Debug, || format!("step: {}", step.doing()));
        if let Some(p) = &self.progress {
            p(&Progress::step(step, 1));
        }
    }

    /// Connects now (operations connect on their own when needed).
    pub fn connect(&mut self) -> Result<(), Error> {
        let deadline = self.config.overall_timeout.map(deadline_after);
        self.ensure_connected(deadline)
    }

    /// Closes the connection, if any.
    pub fn disconnect(&mut self) {
        if let Some(conn) = self.conn.take() {
            self.runtime.block_on(conn.link.close());
        }
    }

    fn ensure_connected(&mut self, deadline: Option<u64>) -> Result<(), Error> {
        if self.conn.is_some() {
            return Ok(());
        }
        self.progress(Step::Connecting);
        self.log(LogLevel::Info, || {
            format!("connecting to {}:{}", self.config.host, self.config.port)
        });
        // AWS hangs up on a second CONNECT with one client id within a second.
        let endpoint = crate::pacing::endpoint(&self.config.host, self.config.port);
        let pause = crate::pacing::reserve(&endpoint, &self.config.client_id);
        let mut link = Link::open(
            &self.config,
            self.tls.clone(),
            &self.config.client_id,
            Credential::Configured,
        );
        // The step's time starts after the pause.
        let step_deadline = deadline_after(self.config.step_timeout.saturating_add(pause));
        let limit = deadline.map_or(step_deadline, |d| d.min(step_deadline));
        let cancel = self.cancel.clone();
        let result = self.runtime.block_on(async {
            let connect = async {
                tokio::time::sleep(pause).await;
                loop {
                    match link.next().await {
                        LinkEvent::Connected => return Ok(()),
                        LinkEvent::Lost { error, .. } => return Err(error),
                        _ => {}
                    }
                }
            };
            tokio::select! {
                r = connect => r,
                _ = tokio::time::sleep_until(at_ms(limit)) => Err(if Some(limit) == deadline {
                    Error::Deadline(Step::Connecting)
                } else {
                    Error::Timeout(Step::Connecting)
                }),
                _ = cancel.wait() => Err(Error::Cancelled),
            }
        });
        // The server counted the CONNECT (if it got one) before now: space the next from now.
        crate::pacing::record(&endpoint, &self.config.client_id);
        match result {
            Ok(()) => {
                self.log(LogLevel::Info, || "connected".into());
                self.conn = Some(Connection {
                    link,
                    subscribed: HashSet::new(),
                });
                Ok(())
            }
            Err(e) => {
                self.log(LogLevel::Warn, || format!("connection failed: {e}"));
                Err(e)
            }
        }
    }

    /// Runs one engine operation over the connection.
    fn run(&mut self, op: Operation, deadline: Option<u64>) -> Result<Outcome, Error> {
        if self.cancel.is_cancelled() {
            return Err(Error::Cancelled);
        }
        let deadline = deadline.or_else(|| self.config.overall_timeout.map(deadline_after));
        let reused = self.conn.is_some();
        let (result, stale) = self.run_once(op.clone(), deadline)?;
        if reused && stale {
            // The connection kept from an earlier operation had dropped while idle (nothing
            // came from the broker this time): reconnect and try once more.
            self.log(LogLevel::Info, || {
                "the connection had dropped since the last operation; reconnecting".into()
            });
            return self.run_once(op, deadline).map(|(r, _)| r)?;
        }
        result
    }

    /// One try of `run`: the outcome, and whether the connection failed before the broker sent
    /// anything in this try (so it was likely dead before we started).
    fn run_once(
        &mut self,
        op: Operation,
        deadline: Option<u64>,
    ) -> Result<(Result<Outcome, Error>, bool), Error> {
        self.ensure_connected(deadline)?;
        let settings = Settings {
            format: self.config.format,
            step_timeout_ms: self.config.step_timeout.as_millis() as u64,
            deadline_ms: deadline,
        };
        let Some(mut conn) = self.conn.take() else {
            return Err(Error::Connection("not connected".into()));
        };
        let mut engine = Engine::new(op, settings, now_ms(), &conn.subscribed);
        let mut actions = engine.handle(Event::Connected, now_ms());
        let cancel = self.cancel.clone();
        let progress = self.progress.clone();
        let log = self.log.clone();
        let say = |level: LogLevel, line: String| {
            if let Some(log) = &log {
                log(level, &line);
            }
        };
        let mut heard = false;
        let (result, healthy) = self.runtime.block_on(async {
            // The connection failed after a reply that completed the operation.
            let mut broken = false;
            loop {
                for action in actions.drain(..) {
                    match action {
                        Action::Subscribe(filters) => {
                            say(LogLevel::Debug, format!("subscribing to {filters:?}"));
                            if let Err(e) = conn.link.subscribe(&filters) {
                                return (Err(e), false);
                            }
                        }
                        Action::Publish { topic, payload } => {
                            say(
                                LogLevel::Debug,
                                format!("publishing to {topic} ({} bytes)", payload.len()),
                            );
                            if let Err(e) = conn.link.publish(&topic, &payload) {
                                return (Err(e), false);
                            }
                        }
                        Action::Progress(step) => {
                            say(LogLevel::Debug, format!("step: {}", step.doing()));
                            if let Some(p) = &progress {
                                p(&Progress::step(step, 1));
                            }
                        }
                        Action::Done(result) => {
                            let healthy = !broken
                                && !matches!(
                                    result,
                                    Err(Error::Connection(_)
                                        | Error::Refused(_)
                                        | Error::Timeout(_)
                                        | Error::Deadline(_))
                                );
                            return (result, healthy);
                        }
                    }
                }
                let wake = engine.wake_at().unwrap_or_else(now_ms);
                let event = tokio::select! {
                    ev = conn.link.next() => ev,
                    _ = tokio::time::sleep_until(at_ms(wake)) => {
                        actions = engine.handle(Event::Tick, now_ms());
                        continue;
                    }
                    _ = cancel.wait() => return (Err(Error::Cancelled), false),
                };
                let now = now_ms();
                if !matches!(event, LinkEvent::Lost { .. }) {
                    heard = true;
                }
                actions = match event {
                    LinkEvent::SubAck { filters, codes } => {
                        for (f, code) in filters.into_iter().zip(&codes) {
                            if *code < 0x80 {
                                conn.subscribed.insert(f);
                            }
                        }
                        engine.handle(Event::SubAck(&codes), now)
                    }
                    LinkEvent::Message(p) => {
                        say(
                            LogLevel::Debug,
                            format!("received on {} ({} bytes)", p.topic, p.payload.len()),
                        );
                        engine.handle(
                            Event::Message {
                                topic: &p.topic,
                                payload: &p.payload,
                            },
                            now,
                        )
                    }
                    LinkEvent::Connected | LinkEvent::Other => engine.handle(Event::Tick, now),
                    LinkEvent::Lost {
                        error, leftovers, ..
                    } => {
                        say(LogLevel::Warn, format!("connection lost: {error}"));
                        let mut a = Vec::new();
                        for p in &leftovers {
                            heard = true;
                            a.extend(engine.handle(
                                Event::Message {
                                    topic: &p.topic,
                                    payload: &p.payload,
                                },
                                now,
                            ));
                        }
                        if a.iter().any(|x| matches!(x, Action::Done(_))) {
                            // The reply completed the operation; the connection is gone.
                            broken = true;
                            actions = a;
                            continue;
                        }
                        a.extend(engine.handle(Event::Disconnected, now));
                        // Keep the precise cause rather than the engine's generic text.
                        if let Some(Action::Done(Err(Error::Connection(_)))) = a.last() {
                            a.pop();
                            a.push(Action::Done(Err(error)));
                        }
                        a
                    }
                };
            }
        });
        if healthy {
            self.conn = Some(conn);
        }
        let stale = !heard && matches!(result, Err(Error::Connection(_) | Error::Refused(_)));
        if let (Err(e), false) = (&result, stale) {
            self.log(LogLevel::Warn, || format!("operation failed: {e}"));
        }
        Ok((result, stale))
    }

    /// CreateKeysAndCertificate.
    pub fn create_keys_and_certificate(&mut self) -> Result<CreatedCertificate, Error> {
        match self.run(
            Operation::CreateCertificate(CertificateSource::CreateKeys),
            None,
        )? {
            Outcome::Certificate(c) => Ok(c),
            _ => Err(Error::Internal("unexpected outcome".into())),
        }
    }

    /// CreateCertificateFromCsr. With `key` (the key the CSR was made from) the returned
    /// certificate is checked against it.
    pub fn create_certificate_from_csr(
        &mut self,
        csr_pem: &str,
        key: Option<&Secret>,
    ) -> Result<CreatedCertificate, Error> {
        crate::keys::check_csr_pem(csr_pem)
            .map_err(|e| Error::InvalidArgument(format!("CSR: {e}")))?;
        let source = CertificateSource::Csr {
            csr_pem: csr_pem.to_owned(),
            key: key.cloned(),
        };
        match self.run(Operation::CreateCertificate(source), None)? {
            Outcome::Certificate(c) => Ok(c),
            _ => Err(Error::Internal("unexpected outcome".into())),
        }
    }

    /// RegisterThing.
    pub fn register_thing(
        &mut self,
        template: &str,
        token: &Secret,
        parameters: &BTreeMap<String, String>,
    ) -> Result<Registered, Error> {
        validate_template_name(template).map_err(|e| Error::InvalidArgument(e.0))?;
        if token.is_empty() {
            return Err(Error::InvalidArgument(
                "the ownership token is empty".into(),
            ));
        }
        let op = Operation::RegisterThing {
            template: template.to_owned(),
            token: token.clone(),
            parameters: parameters.clone(),
        };
        match self.run(op, None)? {
            Outcome::Registered(r) => Ok(r),
            _ => Err(Error::Internal("unexpected outcome".into())),
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.disconnect();
    }
}
