//! The provisioning state machine, sans IO: events in, actions out.
//!
//! No sockets, threads or clocks: the driver (the built-in client, or firmware that owns its
//! MQTT connection) reports what happened ([`Event`]) with the current time in milliseconds from
//! any monotonic origin, performs the [`Action`]s returned, and calls again with [`Event::Tick`]
//! no later than [`Engine::wake_at`].

pub mod flow;
pub mod retry;

use std::collections::{BTreeMap, HashSet};

use zeroize::Zeroizing;

use crate::error::Error;
use crate::keys;
use crate::protocol::{
    self, decode_certificate_reply, decode_register_reply, decode_rejection, Api,
    CreatedCertificate, Format, Registered,
};
use crate::secret::Secret;

pub use crate::protocol::Step;

/// Severity of a log line the engine emits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[repr(C)]
pub enum LogLevel {
    Error = 1,
    Warn = 2,
    Info = 3,
    Debug = 4,
}

/// How the device gets its certificate.
#[derive(Debug, Clone)]
pub enum CertificateSource {
    /// CreateKeysAndCertificate: the service makes the key.
    CreateKeys,
    /// CreateCertificateFromCsr. `key` is the device key the CSR was made from, when the
    /// library holds it, so that the returned certificate can be checked against it; a CSR
    /// from a secure element comes without.
    Csr {
        csr_pem: String,
        key: Option<Secret>,
    },
}

/// What the engine is asked to do.
#[derive(Debug, Clone)]
pub enum Operation {
    /// One certificate API call.
    CreateCertificate(CertificateSource),
    /// RegisterThing with a token from an earlier call.
    RegisterThing {
        template: String,
        token: Secret,
        parameters: BTreeMap<String, String>,
    },
    /// Certificate then RegisterThing.
    Provision {
        source: CertificateSource,
        template: String,
        parameters: BTreeMap<String, String>,
    },
}

/// What a successful operation produced.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Certificate(CreatedCertificate),
    Registered(Registered),
    Provisioned {
        certificate: CreatedCertificate,
        registered: Registered,
    },
}

/// Timing and format.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    pub format: Format,
    /// Longest wait for one step (SUBACK, a reply), in ms.
    pub step_timeout_ms: u64,
    /// Absolute time (same clock as the events) by which everything must be done.
    pub deadline_ms: Option<u64>,
}

/// Something that happened.
#[derive(Debug, Clone, Copy)]
pub enum Event<'a> {
    /// The MQTT connection is up (CONNACK accepted).
    Connected,
    /// The SUBACK for the last [`Action::Subscribe`]: its return (MQTT 3.1.1) or reason
    /// (MQTT 5) codes, one per filter: below 0x80 granted, from 0x80 up refused.
    SubAck(&'a [u8]),
    /// An incoming PUBLISH.
    Message { topic: &'a str, payload: &'a [u8] },
    /// The connection is gone.
    Disconnected,
    /// Time passed.
    Tick,
}

/// Something the driver must do.
pub enum Action {
    /// Subscribe to all these filters in one SUBSCRIBE at QoS 1, then report [`Event::SubAck`].
    Subscribe(Vec<String>),
    /// Publish at QoS 1. The payload may hold an ownership token: it is wiped on drop.
    Publish {
        topic: String,
        payload: Zeroizing<Vec<u8>>,
    },
    /// Report a step reached.
    Progress(Step),
    /// Finished; no more actions will come.
    Done(Result<Outcome, Error>),
}

impl std::fmt::Debug for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Action::Subscribe(filters) => f.debug_tuple("Subscribe").field(filters).finish(),
            // The payload may carry an ownership token: show only its size.
            Action::Publish { topic, payload } => f
                .debug_struct("Publish")
                .field("topic", topic)
                .field("payload_len", &payload.len())
                .finish(),
            Action::Progress(step) => f.debug_tuple("Progress").field(step).finish(),
            Action::Done(result) => f.debug_tuple("Done").field(result).finish(),
        }
    }
}

#[derive(Debug)]
enum State {
    WaitConnect,
    WaitSubAck,
    WaitReply(Api),
    Finished,
}

/// The state machine for one operation over one connection.
#[derive(Debug)]
pub struct Engine {
    op: Operation,
    settings: Settings,
    state: State,
    filters: Vec<String>,
    step: Step,
    step_deadline: u64,
    certificate: Option<CreatedCertificate>,
}

impl Engine {
    /// Starts `op` at time `now`. `subscribed` lists filters the connection already holds (a
    /// client doing several operations on one connection); they are not subscribed again.
    pub fn new(
        op: Operation,
        settings: Settings,
        now: u64,
        subscribed: &HashSet<String>,
    ) -> Engine {
        let format = settings.format;
        let mut apis = Vec::new();
        match &op {
            Operation::CreateCertificate(source) => apis.push(cert_api(source)),
            Operation::RegisterThing { template, .. } => apis.push(Api::RegisterThing {
                template: template.clone(),
            }),
            Operation::Provision {
                source, template, ..
            } => {
                apis.push(cert_api(source));
                apis.push(Api::RegisterThing {
                    template: template.clone(),
                });
            }
        }
        let filters = apis
            .iter()
            .flat_map(|a| [a.accepted_topic(format), a.rejected_topic(format)])
            .filter(|f| !subscribed.contains(f))
            .collect();
        Engine {
            op,
            settings,
            state: State::WaitConnect,
            filters,
            step: Step::Connecting,
            step_deadline: now.saturating_add(settings.step_timeout_ms),
            certificate: None,
        }
    }

    /// Adds the reply filters of `apis` (those not in `subscribed`) to this operation's one
    /// SUBSCRIBE, so that a later operation on the same connection needs none. Call before the
    /// first event.
    pub fn also_subscribe(&mut self, apis: &[Api], subscribed: &HashSet<String>) {
        let format = self.settings.format;
        for api in apis {
            for f in [api.accepted_topic(format), api.rejected_topic(format)] {
                if !subscribed.contains(&f) && !self.filters.contains(&f) {
                    self.filters.push(f);
                }
            }
        }
    }

    /// The filters this operation subscribes to (those not already held).
    pub fn filters(&self) -> &[String] {
        &self.filters
    }

    /// When the driver must call with [`Event::Tick`] at the latest; `None` once finished.
    pub fn wake_at(&self) -> Option<u64> {
        if matches!(self.state, State::Finished) {
            return None;
        }
        Some(match self.settings.deadline_ms {
            Some(d) => d.min(self.step_deadline),
            None => self.step_deadline,
        })
    }

    /// Whether the operation is over.
    pub fn is_finished(&self) -> bool {
        matches!(self.state, State::Finished)
    }

    /// The step the operation is in.
    pub fn step(&self) -> Step {
        self.step
    }

    /// The topic of the request published last, while its reply is awaited.
    pub fn awaited_request(&self) -> Option<String> {
        match &self.state {
            State::WaitReply(api) => Some(api.request_topic(self.settings.format)),
            _ => None,
        }
    }

    fn enter(&mut self, step: Step, now: u64, out: &mut Vec<Action>) {
        self.step = step;
        self.step_deadline = now.saturating_add(self.settings.step_timeout_ms);
        out.push(Action::Progress(step));
    }

    fn finish(&mut self, result: Result<Outcome, Error>, out: &mut Vec<Action>) {
        self.state = State::Finished;
        out.push(Action::Done(result));
    }

    /// Feeds one event; returns what to do.
    pub fn handle(&mut self, event: Event<'_>, now: u64) -> Vec<Action> {
        let mut out = Vec::new();
        if self.is_finished() {
            return out;
        }
        if self
            .settings
            .deadline_ms
            .is_some_and(|deadline| now >= deadline)
        {
            self.finish(Err(Error::Deadline(self.step)), &mut out);
            return out;
        }
        match (event, &self.state) {
            (Event::Tick, _) if now >= self.step_deadline => {
                self.finish(Err(Error::Timeout(self.step)), &mut out);
            }
            (Event::Disconnected, _) => {
                let step = self.step;
                self.finish(
                    Err(Error::Connection(format!(
                        "connection lost while {}",
                        step.doing()
                    ))),
                    &mut out,
                );
            }
            (Event::Connected, State::WaitConnect) => {
                if self.filters.is_empty() {
                    self.start_first_request(now, &mut out);
                } else {
                    self.state = State::WaitSubAck;
                    self.enter(Step::Subscribing, now, &mut out);
                    out.push(Action::Subscribe(self.filters.clone()));
                }
            }
            (Event::SubAck(granted), State::WaitSubAck) => {
                if granted.len() != self.filters.len() {
                    self.finish(
                        Err(Error::SubscribeFailed(format!(
                            "{} filters (SUBACK has {} return codes for {})",
                            self.filters.len(),
                            granted.len(),
                            self.filters.len()
                        ))),
                        &mut out,
                    );
                } else if let Some(i) = granted.iter().position(|code| *code >= 0x80) {
                    let refusal = protocol::reason::suback_refusal(&self.filters[i], granted[i]);
                    self.finish(Err(Error::SubscribeFailed(refusal)), &mut out);
                } else {
                    self.enter(Step::Subscribed, now, &mut out);
                    self.start_first_request(now, &mut out);
                }
            }
            (Event::Message { topic, payload }, State::WaitReply(api)) => {
                let api = api.clone();
                match api.classify_reply(self.settings.format, topic) {
                    // Unrelated, a late duplicate of an earlier reply, or another format.
                    None => {}
                    Some(false) => {
                        let result = match decode_rejection(&api, self.settings.format, payload) {
                            Ok(error) => Err(Error::Rejected {
                                api: api.name(),
                                error,
                            }),
                            Err(e) => Err(Error::MalformedReply(e)),
                        };
                        self.finish(result, &mut out);
                    }
                    Some(true) => self.accepted(&api, payload, now, &mut out),
                }
            }
            // Anything else is out of order for this state (a stray SUBACK, a second CONNACK,
            // a message before our request): ignore it.
            _ => {}
        }
        out
    }

    fn start_first_request(&mut self, now: u64, out: &mut Vec<Action>) {
        match self.op.clone() {
            Operation::CreateCertificate(source) | Operation::Provision { source, .. } => {
                self.publish_certificate_request(&source, now, out)
            }
            Operation::RegisterThing {
                template,
                token,
                parameters,
            } => self.publish_register(&template, &token, &parameters, now, out),
        }
    }

    fn publish_certificate_request(
        &mut self,
        source: &CertificateSource,
        now: u64,
        out: &mut Vec<Action>,
    ) {
        let format = self.settings.format;
        let api = cert_api(source);
        let payload = match source {
            CertificateSource::CreateKeys => protocol::encode_create_keys_request(format),
            CertificateSource::Csr { csr_pem, .. } => protocol::encode_csr_request(format, csr_pem),
        };
        out.push(Action::Publish {
            topic: api.request_topic(format),
            payload: Zeroizing::new(payload),
        });
        self.state = State::WaitReply(api);
        self.enter(Step::CreatingCertificate, now, out);
    }

    fn publish_register(
        &mut self,
        template: &str,
        token: &Secret,
        parameters: &BTreeMap<String, String>,
        now: u64,
        out: &mut Vec<Action>,
    ) {
        let format = self.settings.format;
        let api = Api::RegisterThing {
            template: template.to_owned(),
        };
        out.push(Action::Publish {
            topic: api.request_topic(format),
            payload: protocol::encode_register_request(format, token, parameters),
        });
        self.state = State::WaitReply(api);
        self.enter(Step::Registering, now, out);
    }

    fn accepted(&mut self, api: &Api, payload: &[u8], now: u64, out: &mut Vec<Action>) {
        let format = self.settings.format;
        if let Api::RegisterThing { .. } = api {
            let registered = match decode_register_reply(format, payload) {
                Ok(r) => r,
                Err(e) => return self.finish(Err(Error::MalformedReply(e)), out),
            };
            self.enter(Step::Registered, now, out);
            let outcome = match self.certificate.take() {
                Some(certificate) => Outcome::Provisioned {
                    certificate,
                    registered,
                },
                None => Outcome::Registered(registered),
            };
            return self.finish(Ok(outcome), out);
        }
        let certificate = match decode_certificate_reply(api, format, payload) {
            Ok(c) => c,
            Err(e) => return self.finish(Err(Error::MalformedReply(e)), out),
        };
        // The certificate must be for the device's key.
        let key = match &self.op {
            Operation::CreateCertificate(CertificateSource::Csr { key, .. })
            | Operation::Provision {
                source: CertificateSource::Csr { key, .. },
                ..
            } => key.as_ref(),
            _ => certificate.private_key.as_ref(),
        };
        let checked = key
            .map(|key| keys::certificate_matches_key(&certificate.certificate_pem, key.expose()));
        if let Some(Err(e)) = checked {
            // The device's own key was checked before it was used: what cannot be read here
            // is the reply's certificate (or, from CreateKeysAndCertificate, its key).
            let e = match e {
                keys::KeyError::Mismatch => Error::CertificateMismatch,
                other => Error::MalformedReply(protocol::DecodeError {
                    what: format!("{} accepted", api.name()),
                    reason: other.to_string(),
                }),
            };
            return self.finish(Err(e), out);
        }
        self.enter(Step::CertificateCreated, now, out);
        match self.op.clone() {
            Operation::Provision {
                template,
                parameters,
                ..
            } => {
                let token = certificate.ownership_token.clone();
                self.certificate = Some(certificate);
                self.publish_register(&template, &token, &parameters, now, out);
            }
            _ => self.finish(Ok(Outcome::Certificate(certificate)), out),
        }
    }
}

fn cert_api(source: &CertificateSource) -> Api {
    match source {
        CertificateSource::CreateKeys => Api::CreateKeysAndCertificate,
        CertificateSource::Csr { .. } => Api::CreateCertificateFromCsr,
    }
}

#[cfg(test)]
mod tests;
