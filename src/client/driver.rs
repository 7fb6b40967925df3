//! The built-in transport as a host of the one driver ([`crate::driver::Driver`]): rumqttc over
//! rustls, on a current-thread tokio runtime in the calling thread.

use std::sync::Arc;

use super::link::{Link, LinkEvent};
use super::{at_ms, now_ms, tls, Cancel, Config, Credential, LogLevel};
use crate::driver::{Driver, LogFn, Transport};
use crate::engine::flow::{FlowEvent, Identity, Provisioned};
use crate::error::Error;
use crate::keys::remote::{EcSigner, RemoteKey};

/// A current-thread runtime for the built-in transport. Its blocking pool (host name lookups)
/// lets idle threads go at once rather than keeping one per device for 10 s.
pub(crate) fn runtime() -> Result<tokio::runtime::Runtime, Error> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .thread_keep_alive(std::time::Duration::ZERO)
        .build()
        .map_err(|e| Error::Internal(format!("cannot start the I/O runtime: {e}")))
}

/// Runs `driver` over the built-in transport until its flow is done, on a runtime of its own in
/// the calling thread.
pub(crate) fn run_flow(
    driver: Driver,
    config: &Config,
    log: Option<LogFn>,
    cancel: &Arc<Cancel>,
) -> Result<Provisioned, Error> {
    let runtime = runtime()?;
    runtime.block_on(drive(driver, config, log, cancel))
}

/// How long a cancel waits for the reply of a request on the wire (a certificate request or
/// RegisterThing, see [`crate::engine::flow::Flow::cancel_deferred`]) before it stops anyway.
const CANCEL_GRACE_MS: u64 = 1_000;

/// The flow's connections, made with rumqttc.
struct Builtin<'a> {
    config: &'a Config,
    claim_tls: Arc<rustls::ClientConfig>,
    alpn: bool,
    link: Option<Link>,
    /// `host:port`, and the client id of the connection being opened, for
    /// [`crate::pacing`].
    endpoint: String,
    client_id: String,
    log: Option<LogFn>,
}

impl Transport for Builtin<'_> {
    fn connect(&mut self, identity: Identity, subscribe: &[String]) -> Result<(), Error> {
        if let Some(old) = self.link.take() {
            old.abandon();
        }
        let (tls, client_id, who) = match identity {
            Identity::Claim => (
                self.claim_tls.clone(),
                self.config.client_id.clone(),
                Credential::Configured,
            ),
            Identity::Device {
                certificate_pem,
                private_key,
                client_id,
            } => {
                let roots = &self.config.roots;
                let tls = match (&private_key, &self.config.device_signer) {
                    (Some(key), _) => tls::client_config(
                        roots,
                        tls::ClientKey::Pem {
                            cert_pem: &certificate_pem,
                            key_pem: key,
                        },
                        self.alpn,
                    )?,
                    (None, Some(external)) => {
                        let signer = Arc::new(EcSigner(external.signer()));
                        let remote = RemoteKey::new(&certificate_pem, signer, "device key")?;
                        tls::client_config(roots, tls::ClientKey::Remote(&remote), self.alpn)?
                    }
                    (None, None) => {
                        return Err(Error::InvalidArgument(
                            "the built-in transport needs the device's private key or signer"
                                .into(),
                        ))
                    }
                };
                (tls, client_id, Credential::New)
            }
        };
        if let Some(log) = &self.log {
            let line = format!("connecting to {}:{}", self.config.host, self.config.port);
            log(LogLevel::Info, &line);
        }
        crate::pacing::record(&self.endpoint, &client_id);
        let mut link = Link::open(self.config, tls, &client_id, who);
        if !subscribe.is_empty() {
            // In the CONNECT's flight: the SUBACK comes a round trip sooner.
            link.subscribe_early(subscribe)?;
        }
        self.link = Some(link);
        self.client_id = client_id;
        Ok(())
    }

    fn disconnect(&mut self) {
        if let Some(old) = self.link.take() {
            old.abandon();
        }
    }

    fn subscribe(&mut self, filters: &[String]) -> Result<(), Error> {
        let Some(link) = &mut self.link else {
            return Ok(());
        };
        if link.take_early(filters) {
            // Sent with the CONNECT; its SUBACK (perhaps read already) answers this.
            return Ok(());
        }
        let result = link.subscribe(filters);
        if result.is_err() {
            self.link = None;
        }
        result
    }

    fn publish(&mut self, topic: &str, payload: &[u8]) -> Result<(), Error> {
        let Some(link) = &mut self.link else {
            return Ok(());
        };
        let result = link.publish(topic, payload);
        if result.is_err() {
            self.link = None;
        }
        result
    }
}

/// [`run_flow`] as a future, for running many flows on one runtime.
pub(crate) async fn drive(
    mut driver: Driver,
    config: &Config,
    log: Option<LogFn>,
    cancel: &Arc<Cancel>,
) -> Result<Provisioned, Error> {
    let alpn = config.alpn.unwrap_or(config.port == 443);
    let claim_tls = tls::client_config(&config.roots, config.claim_key(), alpn)?;
    let mut t = Builtin {
        config,
        claim_tls,
        alpn,
        link: None,
        endpoint: crate::pacing::endpoint(&config.host, config.port),
        client_id: String::new(),
        log,
    };
    driver.start(now_ms(), &mut t);
    // When a deferred cancel stops waiting for the reply in flight.
    let mut grace_until: Option<u64> = None;
    let result = loop {
        if let Some(result) = driver.take_result() {
            break result;
        }
        // Bounded by the flow: every wait ends at its wake time at the latest.
        let mut wake = driver
            .wake_at()
            .unwrap_or_else(|| now_ms().saturating_add(1000));
        // A cancel is honoured between steps. While a request whose reply the device needs is
        // on the wire (Flow::cancel_deferred) it waits for that reply, CANCEL_GRACE_MS at most.
        if cancel.is_cancelled() {
            if !driver.cancel_deferred() {
                break Err(Error::Cancelled);
            }
            let until = *grace_until.get_or_insert_with(|| now_ms() + CANCEL_GRACE_MS);
            if now_ms() >= until {
                break Err(Error::Cancelled);
            }
            wake = wake.min(until);
        }
        // Past this point a cancel seen is a deferred one: wake for new cancels only.
        let cancellable = !cancel.is_cancelled();
        let event = match &mut t.link {
            Some(link) => tokio::select! {
                ev = link.next() => Some(ev),
                _ = tokio::time::sleep_until(at_ms(wake)) => None,
                _ = cancel.wait(), if cancellable => continue,
            },
            None => tokio::select! {
                _ = tokio::time::sleep_until(at_ms(wake)) => None,
                _ = cancel.wait(), if cancellable => continue,
            },
        };
        let now = now_ms();
        match event {
            None | Some(LinkEvent::Other) => driver.handle(FlowEvent::Tick, now, &mut t),
            Some(LinkEvent::Connected) => {
                // The server counted the CONNECT before its CONNACK came in: the next one with
                // this client id is spaced from now, not from when this one was opened.
                crate::pacing::record(&t.endpoint, &t.client_id);
                driver.say(LogLevel::Info, "connected");
                driver.handle(FlowEvent::Connected, now, &mut t);
            }
            Some(LinkEvent::SubAck { codes, .. }) => {
                driver.handle(FlowEvent::SubAck(&codes), now, &mut t)
            }
            Some(LinkEvent::Message(p)) => {
                let line = format!("received on {} ({} bytes)", p.topic, p.payload.len());
                driver.say(LogLevel::Debug, &line);
                let event = FlowEvent::Message {
                    topic: &p.topic,
                    payload: &p.payload,
                };
                driver.handle(event, now, &mut t);
            }
            Some(LinkEvent::Lost {
                error,
                connecting,
                leftovers,
            }) => {
                t.link = None;
                for p in &leftovers {
                    let event = FlowEvent::Message {
                        topic: &p.topic,
                        payload: &p.payload,
                    };
                    driver.handle(event, now, &mut t);
                }
                if connecting {
                    crate::pacing::record(&t.endpoint, &t.client_id);
                    driver.say(LogLevel::Warn, &format!("connection failed: {error}"));
                    driver.handle(FlowEvent::ConnectFailed(error), now, &mut t);
                } else {
                    driver.say(LogLevel::Warn, &format!("connection lost: {error}"));
                    driver.handle(FlowEvent::Disconnected(error), now, &mut t);
                }
            }
        }
    };
    if let Some(link) = t.link.take() {
        link.close().await;
    }
    result
}
