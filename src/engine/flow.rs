//! The whole provisioning, sans network IO: certificate, RegisterThing, a connection with the
//! new certificate, the commit of the credentials; with retries, backoff, and the resume
//! journal.
//!
//! The driver (the built-in client, or firmware with its own MQTT stack) performs the
//! [`FlowAction`]s, reports [`FlowEvent`]s with the current time in ms from any monotonic
//! origin, and calls [`Flow::handle`] with [`FlowEvent::Tick`] no later than
//! [`Flow::wake_at`]. Storage is an action like the network's: the flow asks for the journal
//! to be saved or removed and for the credentials to be committed ([`FlowAction::Store`]), and
//! waits for [`FlowEvent::Stored`] before it goes on. Where and how they are kept is the
//! driver's storage ([`crate::store::Storage`]): files by default, or the firmware's own store.
//!
//! What it guarantees:
//! - A certificate is persisted in the journal before RegisterThing is sent. While its ownership
//!   token is valid, no further certificate is created: retries, and later calls that find the
//!   journal, resume at RegisterThing.
//! - If RegisterThing refuses the token, an earlier attempt may have registered the certificate
//!   and lost the reply; the flow connects with the certificate to find out, and only starts
//!   over with a new certificate if the service refuses it.
//! - Credentials are committed (atomically) only after RegisterThing was accepted and, with
//!   `verify`, the new certificate connected; the journal is removed after that.
//! - Retryable failures (connection trouble, timeouts, 429, 5xx) are retried with exponential
//!   backoff and jitter, up to [`RetryPolicy::max_attempts`] and the deadline; no others.

use std::collections::{BTreeMap, HashSet};

use zeroize::Zeroizing;

use super::LogLevel;
use crate::engine::retry::{Jitter, RetryPolicy};
use crate::engine::{Action, CertificateSource, Engine, Event, Operation, Outcome, Settings, Step};
use crate::error::Error;
use crate::protocol::{Api, CreatedCertificate, Registered};
use crate::secret::Secret;
use crate::store::journal::{unix_now, Entry};
use crate::store::{Stored, StoredPaths};

/// The error code with which RegisterThing refuses an unknown, used or expired token.
const TOKEN_REFUSED: &str = "InvalidCertificateOwnershipToken";

/// A provisioned device.
#[derive(Debug, Clone)]
pub struct Provisioned {
    /// Empty if the template creates no thing, or if RegisterThing's reply was lost and the
    /// registration was confirmed by connecting with the certificate (see [`Flow`]).
    pub thing_name: String,
    pub certificate_id: String,
    pub certificate_pem: String,
    /// `None` when the key stays where the CSR came from.
    pub private_key_pem: Option<Secret>,
    pub device_configuration: BTreeMap<String, String>,
    /// Where the credentials were written, if they were.
    pub stored: Option<StoredPaths>,
    /// Attempts used (1 when nothing had to be retried).
    pub attempts: u32,
    /// false in one case only: RegisterThing refused the token after an earlier attempt sent
    /// it and lost the reply, and the certificate could not be tried because its key is not
    /// the library's (external CSR or signer on the built-in transport). The registration most
    /// likely went through (that attempt used the token); connect with the certificate to be sure.
    pub registration_confirmed: bool,
    /// Whether the certificate came from the resume journal.
    pub resumed: bool,
    /// The output directory already held a complete credential set and nothing was pending in
    /// the journal: it is returned as it is, with no connection made and no certificate minted
    /// ([`FlowSpec::existing`]).
    pub already_provisioned: bool,
}

/// Credentials for a connection.
pub enum Identity {
    /// The claim certificate of the configuration.
    Claim,
    /// The new certificate: to check that it works, or whether it was registered.
    Device {
        certificate_pem: String,
        /// `None` when the key is not the library's (a secure element): the driver connects
        /// with its own.
        private_key: Option<Secret>,
        /// The thing name if known (AWS policies often expect it), else empty.
        client_id: String,
    },
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Identity::Claim => f.write_str("Claim"),
            Identity::Device { client_id, .. } => f
                .debug_struct("Device")
                .field("client_id", client_id)
                .finish_non_exhaustive(),
        }
    }
}

/// A step reached, with the attempt it belongs to.
#[derive(Debug, Clone, PartialEq)]
pub struct Progress {
    pub step: Step,
    /// 1-based; grows with each retry.
    pub attempt: u32,
    /// With [`Step::Retrying`]: the pause before the next attempt, in ms.
    pub retry_in_ms: u64,
    /// With [`Step::Retrying`]: why the attempt failed.
    pub error: Option<Error>,
}

impl Progress {
    pub fn step(step: Step, attempt: u32) -> Progress {
        Progress {
            step,
            attempt,
            retry_in_ms: 0,
            error: None,
        }
    }
}

/// What the flow asks of the storage. Each is answered with one [`FlowEvent::Stored`], and the
/// flow waits for it: a storage action is never abandoned halfway by a timeout or a cancel.
#[derive(Debug)]
pub enum StoreAction {
    /// Replace the resume journal with this entry, atomically and durably.
    SaveJournal(Entry),
    /// Remove the resume journal (none is fine).
    RemoveJournal,
    /// Commit this credential set so that a reader sees the old set, or the new one whole, or
    /// none; answered with where it went ([`StoredPaths`] for files, else `None`).
    Commit(Stored),
}

/// Something the driver must do.
#[derive(Debug)]
pub enum FlowAction {
    /// Open a connection with these credentials (after closing any other); report
    /// [`FlowEvent::Connected`] or [`FlowEvent::ConnectFailed`]. `subscribe`: the filters of
    /// the flow's first [`FlowAction::Subscribe`] once connected (empty: none), which a
    /// transport may send right behind the CONNECT, without waiting for the CONNACK (MQTT
    /// 3.1.1 and 5, section 3.1.4), to save a round trip; the flow still asks for them once
    /// connected, and takes the SUBACK as their answer.
    Connect {
        identity: Identity,
        subscribe: Vec<String>,
    },
    /// Close the connection; no event is expected.
    Disconnect,
    /// As [`Action::Subscribe`].
    Subscribe(Vec<String>),
    /// As [`Action::Publish`].
    Publish {
        topic: String,
        payload: Zeroizing<Vec<u8>>,
    },
    Progress(Progress),
    /// Perform this on the storage; report [`FlowEvent::Stored`].
    Store(StoreAction),
    /// A line for the log; never holds a key or a token.
    Log(LogLevel, String),
    /// Finished; no more actions will come.
    Done(Result<Provisioned, Error>),
}

/// Something that happened.
#[derive(Debug, Clone)]
pub enum FlowEvent<'a> {
    /// The connection asked for is up (CONNACK accepted).
    Connected,
    /// The connection asked for could not be made.
    ConnectFailed(Error),
    /// As [`Event::SubAck`]: the SUBACK's codes.
    SubAck(&'a [u8]),
    /// As [`Event::Message`].
    Message { topic: &'a str, payload: &'a [u8] },
    /// The connection broke.
    Disconnected(Error),
    /// The last [`FlowAction::Store`] is done: `Ok` with where a commit went, or the failure.
    Stored(Result<Option<StoredPaths>, Error>),
    /// Time passed.
    Tick,
}

/// The resume journal as the driver found it before the flow started.
#[derive(Debug, Clone)]
pub enum Journaled {
    /// No journal is kept (no state directory): nothing survives the call.
    Off,
    /// A journal is kept; this is what it held.
    Loaded(Option<Entry>),
    /// A journal is kept but could not be read: the flow ends with this error at once (the
    /// journal may hold the only copy of a key; it is left alone).
    Unreadable(Error),
}

/// What the flow is asked to do.
#[derive(Debug, Clone)]
pub struct FlowSpec {
    /// The endpoint; recorded in the journal, which is only resumed on the same endpoint.
    pub host: String,
    pub source: CertificateSource,
    /// The key the CSR was made from, when the library holds it.
    pub device_key: Option<Secret>,
    pub template: String,
    pub parameters: BTreeMap<String, String>,
    pub settings: Settings,
    pub retry: RetryPolicy,
    /// Connect with the new certificate before committing.
    pub verify: bool,
    /// The driver can connect with a certificate whose private key the library does not hold
    /// (a host transport with a secure element), so such certificates are verified too.
    pub external_key_connects: bool,
    /// With an external key (CSR or signer): its public key as a certificate for it carries it
    /// ([`crate::keys::csr_public_key`], or the point). Returned and journaled certificates
    /// must match it.
    pub external_public_key: Option<Vec<u8>>,
    /// How long a token is good after its certificate was created, in seconds.
    pub token_lifetime_s: u64,
    /// Commit the credentials to the storage (when the library holds the key).
    pub store_credentials: bool,
    /// The resume journal.
    pub journal: Journaled,
    /// Seeds the backoff jitter.
    pub seed: u64,
    /// The client id the claim connection uses, when the library picks the connection's
    /// (`None`: a host transport's, unknown here). Connects are spaced per client id
    /// ([`CONNECT_SPACING_MS`]); an unknown id counts as the same as any other.
    pub claim_client_id: Option<String>,
    /// Client ids this process connected with shortly before the flow, and how many ms before
    /// [`Flow::start`]: their next connects are spaced too.
    pub recent_connects: Vec<(String, u64)>,
    /// The credentials the output directory already holds: the flow ends at once with them.
    pub existing: Option<Provisioned>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Create,
    Register,
    /// Connect with the new certificate; `probe`: to learn whether it was registered.
    Verify {
        probe: bool,
    },
    Finished,
}

#[derive(Debug)]
enum Link {
    Down,
    Connecting {
        deadline: u64,
    },
    Up {
        subscribed: HashSet<String>,
        pending: Option<Vec<String>>,
    },
}

/// What comes after the storage action in progress.
#[derive(Debug)]
enum Then {
    /// The new certificate is journaled: register it.
    Register,
    /// The registration is journaled: verify or commit.
    Registered,
    /// The probe's finding is journaled: commit.
    Probed,
    /// The credentials are committed: remove the journal.
    Committed(Box<Provisioned>),
    /// The journal is gone after the commit: report success.
    Succeed(Box<Provisioned>),
    /// The journal of a dropped certificate is gone.
    Forgotten(AfterForget),
}

/// What follows dropping a certificate and its journal.
#[derive(Debug)]
enum AfterForget {
    /// Connect with the claim certificate for a new one.
    Connect,
    /// End the flow with this error.
    Fail(Error),
}

/// The certificate in hand.
#[derive(Debug)]
struct Held {
    entry: Entry,
    resumed: bool,
}

/// The provisioning state machine.
#[derive(Debug)]
pub struct Flow {
    spec: FlowSpec,
    /// A journal is kept.
    journaled: bool,
    /// A storage action is in progress; its continuation.
    storing: Option<Then>,
    jitter: Jitter,
    attempt: u32,
    phase: Phase,
    link: Link,
    engine: Option<Engine>,
    held: Option<Held>,
    wait_until: Option<u64>,
    step: Step,
    restarted: bool,
    /// A RegisterThing request went out for the certificate in hand during this flow.
    register_sent: bool,
    /// A certificate request is on the wire and its reply not yet in.
    create_sent: bool,
    /// Cleared when the registration is inferred rather than seen (see [`Provisioned`]).
    confirmed: bool,
    /// When the flow started.
    started: u64,
    /// Client ids of the connects asked for (`None`: not known here) and when; only the last
    /// second's matter.
    connects: Vec<(Option<String>, u64)>,
}

/// AWS IoT Core accepts one CONNECT per second per client id and hangs up on a second one
/// within that second (a quota that cannot be raised): connects that may use the same client
/// id are at least this far apart, whatever the retry policy says.
pub(crate) const CONNECT_SPACING_MS: u64 = 1000;

impl Flow {
    /// A flow for `spec`; with a journal ([`FlowSpec::journal`]), the certificate in hand is
    /// journaled before it is registered.
    pub fn new(spec: FlowSpec) -> Flow {
        let jitter = Jitter::new(spec.seed);
        Flow {
            journaled: !matches!(spec.journal, Journaled::Off),
            storing: None,
            spec,
            jitter,
            attempt: 1,
            phase: Phase::Create,
            link: Link::Down,
            engine: None,
            held: None,
            wait_until: None,
            step: Step::Connecting,
            restarted: false,
            register_sent: false,
            create_sent: false,
            confirmed: true,
            started: 0,
            connects: Vec::new(),
        }
    }

    /// Starts: reads the journal, then asks for the first connection.
    pub fn start(&mut self, now: u64) -> Vec<FlowAction> {
        let mut out = Vec::new();
        self.started = now;
        self.connects = self
            .spec
            .recent_connects
            .iter()
            .map(|(id, ago)| (Some(id.clone()), now.saturating_sub(*ago)))
            .collect();
        if let Some(existing) = self.spec.existing.take() {
            let line = format!(
                "already provisioned: certificate {} of thing {:?} is in place; nothing to do",
                existing.certificate_id, existing.thing_name
            );
            self.log(LogLevel::Info, line, &mut out);
            self.finish(Ok(existing), &mut out);
            return out;
        }
        match std::mem::replace(&mut self.spec.journal, Journaled::Loaded(None)) {
            Journaled::Unreadable(e) => self.finish(Err(e), &mut out),
            Journaled::Loaded(Some(entry)) => self.resume(entry, now, &mut out),
            Journaled::Loaded(None) | Journaled::Off => {}
        }
        // Unless the journal's certificate is being dropped (that connects when done) or
        // committed: connect.
        if self.phase != Phase::Finished
            && self.storing.is_none()
            && matches!(self.link, Link::Down)
        {
            self.connect(now, &mut out);
        }
        out
    }

    /// Whether a cancellation must wait: a request is on the wire whose reply the device needs.
    /// Stopping before a certificate request's reply would leave the certificate the service
    /// makes unknown to the device (a rerun would mint another); before RegisterThing's, the
    /// thing name and device configuration would be lost (a rerun could only confirm the
    /// registration by connecting). The driver honours a cancel once this is false again: when
    /// the reply is in and journaled, or the step timed out, or the connection dropped.
    /// A storage action in progress is waited for as well.
    pub fn cancel_deferred(&self) -> bool {
        self.storing.is_some()
            || self.engine.is_some()
                && match self.phase {
                    Phase::Create => self.create_sent,
                    Phase::Register => self.register_sent,
                    Phase::Verify { .. } | Phase::Finished => false,
                }
    }

    /// Whether the flow is over.
    pub fn is_finished(&self) -> bool {
        self.phase == Phase::Finished
    }

    /// When the driver must call with [`FlowEvent::Tick`] at the latest; `None` once finished,
    /// and while a storage action is in progress (the flow waits for [`FlowEvent::Stored`]).
    pub fn wake_at(&self) -> Option<u64> {
        if self.is_finished() || self.storing.is_some() {
            return None;
        }
        [
            self.spec.settings.deadline_ms,
            self.wait_until,
            match self.link {
                Link::Connecting { deadline } => Some(deadline),
                _ => None,
            },
            self.engine.as_ref().and_then(Engine::wake_at),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// The step the flow is in.
    pub fn step(&self) -> Step {
        self.step
    }

    /// Feeds one event; returns what to do.
    pub fn handle(&mut self, event: FlowEvent<'_>, now: u64) -> Vec<FlowAction> {
        let mut out = Vec::new();
        if self.is_finished() {
            return out;
        }
        if self.storing.is_some() {
            // Only the storage's answer moves the flow on; a lost connection is noted for
            // when it does. Time does not run out on a write in progress.
            match event {
                FlowEvent::Stored(result) => self.stored(result, now, &mut out),
                FlowEvent::Disconnected(_) => {
                    self.link = Link::Down;
                    self.engine = None;
                }
                _ => {}
            }
            return out;
        }
        if self
            .spec
            .settings
            .deadline_ms
            .is_some_and(|deadline| now >= deadline)
        {
            self.drop_link(&mut out);
            self.finish(Err(Error::Deadline(self.step)), &mut out);
            return out;
        }
        match event {
            FlowEvent::Tick => {
                if self.wait_until.is_some_and(|w| now >= w) {
                    self.wait_until = None;
                    if matches!(self.link, Link::Up { .. }) {
                        // A rejected request, retried on the connection it came on.
                        self.start_engine(now, &mut out);
                    } else {
                        self.connect(now, &mut out);
                    }
                } else if matches!(self.link, Link::Connecting { deadline } if now >= deadline) {
                    self.fail(Error::Timeout(self.step), now, &mut out);
                } else if self.engine.is_some() {
                    self.forward(Event::Tick, now, &mut out);
                }
            }
            FlowEvent::Connected => {
                if matches!(self.link, Link::Connecting { .. }) {
                    self.connect_answered(now);
                    match self.phase {
                        Phase::Verify { probe } => self.verified(probe, now, &mut out),
                        _ => {
                            self.link = Link::Up {
                                subscribed: HashSet::new(),
                                pending: None,
                            };
                            self.start_engine(now, &mut out);
                        }
                    }
                }
            }
            FlowEvent::ConnectFailed(e) => {
                if matches!(self.link, Link::Connecting { .. }) {
                    self.connect_answered(now);
                    self.link = Link::Down;
                    self.connect_failed(e, now, &mut out);
                }
            }
            FlowEvent::Disconnected(e) => {
                if matches!(self.link, Link::Up { .. })
                    && self.engine.is_none()
                    && self.wait_until.is_some()
                {
                    // Lost while pausing before a retry on it: the retry connects again.
                    self.link = Link::Down;
                } else if matches!(self.link, Link::Up { .. }) {
                    // A connection that ends while a reply is awaited: AWS IoT closes it when
                    // the certificate's policy does not allow the request's PUBLISH, so the
                    // error says which topic that was.
                    let awaited = self
                        .engine
                        .as_ref()
                        .and_then(|engine| Some((engine.step(), engine.awaited_request()?)));
                    let e = match (awaited, &e) {
                        // The refusal names the topic (a PUBACK or DISCONNECT over MQTT 5).
                        (Some((step, _)), Error::Refused(_)) => {
                            e.noted(&format!("while {}", step.doing()))
                        }
                        (Some((step, topic)), _) => e.noted(&format!(
                            "while {}, after publishing to {topic} (AWS IoT closes the \
                             connection when a policy denies a publish)",
                            step.doing()
                        )),
                        (None, _) => e,
                    };
                    self.link = Link::Down;
                    self.engine = None;
                    self.fail(e, now, &mut out);
                }
            }
            FlowEvent::SubAck(granted) => {
                let answered = match &mut self.link {
                    Link::Up {
                        subscribed,
                        pending,
                    } => pending.take().map(|filters| (subscribed, filters)),
                    _ => None,
                };
                if let Some((subscribed, filters)) = answered {
                    for (f, code) in filters.into_iter().zip(granted) {
                        if *code < 0x80 {
                            subscribed.insert(f);
                        }
                    }
                    self.forward(Event::SubAck(granted), now, &mut out);
                }
            }
            FlowEvent::Message { topic, payload } => {
                if matches!(self.link, Link::Up { .. }) {
                    self.forward(Event::Message { topic, payload }, now, &mut out);
                }
            }
            // Not waited for (see above): nothing to do.
            FlowEvent::Stored(_) => {}
        }
        out
    }

    /// Asks the storage for `action`; `then` runs once it is done.
    fn store(&mut self, action: StoreAction, then: Then, out: &mut Vec<FlowAction>) {
        self.storing = Some(then);
        out.push(FlowAction::Store(action));
    }

    /// The storage action in progress is done.
    fn stored(
        &mut self,
        result: Result<Option<StoredPaths>, Error>,
        now: u64,
        out: &mut Vec<FlowAction>,
    ) {
        let Some(then) = self.storing.take() else {
            return;
        };
        match (then, result) {
            (Then::Register, Ok(_)) => {
                self.progress(Step::CertificateCreated, out);
                self.phase = Phase::Register;
                if matches!(self.link, Link::Up { .. }) {
                    self.start_engine(now, out);
                } else {
                    let e = Error::Connection(
                        "the connection dropped while the certificate was journaled".into(),
                    );
                    self.fail(e, now, out);
                }
            }
            (Then::Registered, Ok(_)) => {
                self.progress(Step::Registered, out);
                self.drop_link(out);
                if self.wants_verify() {
                    self.phase = Phase::Verify { probe: false };
                    self.connect(now, out);
                } else {
                    self.commit(out);
                }
            }
            (Then::Probed, Ok(_)) => {
                self.progress(Step::Verified, out);
                self.commit(out);
            }
            (Then::Register | Then::Registered | Then::Probed, Err(e)) => {
                self.drop_link(out);
                let e = Error::Storage(format!("writing the resume journal: {}", storage_text(&e)));
                self.finish(Err(e), out);
            }
            (Then::Committed(mut provisioned), Ok(paths)) => {
                provisioned.stored = paths;
                if self.journaled {
                    self.store(StoreAction::RemoveJournal, Then::Succeed(provisioned), out);
                } else {
                    self.succeed(*provisioned, out);
                }
            }
            (Then::Committed(_), Err(e)) => {
                // The journal keeps everything for the next call.
                self.finish(Err(e), out);
            }
            (Then::Succeed(provisioned), result) => {
                self.removal_failed(result, out);
                self.succeed(*provisioned, out);
            }
            (Then::Forgotten(next), result) => {
                self.removal_failed(result, out);
                match next {
                    AfterForget::Connect => self.connect(now, out),
                    AfterForget::Fail(e) => self.finish(Err(e), out),
                }
            }
        }
    }

    /// A journal that could not be removed is worth a warning, not a failure: it holds nothing
    /// the next call would act on wrongly (a committed set, or a certificate given up).
    fn removal_failed(
        &self,
        result: Result<Option<StoredPaths>, Error>,
        out: &mut Vec<FlowAction>,
    ) {
        if let Err(e) = result {
            let line = format!("could not remove the resume journal: {}", storage_text(&e));
            self.log(LogLevel::Warn, line, out);
        }
    }

    fn progress(&mut self, step: Step, out: &mut Vec<FlowAction>) {
        self.step = step;
        out.push(FlowAction::Progress(Progress::step(step, self.attempt)));
    }

    fn log(&self, level: LogLevel, line: String, out: &mut Vec<FlowAction>) {
        out.push(FlowAction::Log(level, line));
    }

    fn finish(&mut self, result: Result<Provisioned, Error>, out: &mut Vec<FlowAction>) {
        if let Err(e) = &result {
            self.log(LogLevel::Warn, format!("provisioning failed: {e}"), out);
        }
        self.phase = Phase::Finished;
        self.engine = None;
        out.push(FlowAction::Done(result));
    }

    fn drop_link(&mut self, out: &mut Vec<FlowAction>) {
        if !matches!(self.link, Link::Down) {
            out.push(FlowAction::Disconnect);
        }
        self.link = Link::Down;
        self.engine = None;
        self.create_sent = false;
    }

    /// The id of the certificate in hand, for messages.
    fn held_id(&self) -> String {
        self.held
            .as_ref()
            .map(|h| h.entry.certificate.certificate_id.clone())
            .unwrap_or_default()
    }

    fn key(&self) -> Option<&Secret> {
        self.held
            .as_ref()
            .and_then(|h| h.entry.private_key.as_ref())
    }

    /// Takes up a journal found at the start.
    fn resume(&mut self, entry: Entry, now: u64, out: &mut Vec<FlowAction>) {
        let id = entry.certificate.certificate_id.clone();
        let margin = (self.spec.token_lifetime_s / 60).min(60);
        let reason = if entry.registered.is_some() {
            None
        } else if entry.private_key.is_none()
            && self
                .spec
                .external_public_key
                .as_ref()
                .is_some_and(|public| {
                    !crate::keys::certificate_contains_key(
                        &entry.certificate.certificate_pem,
                        public,
                    )
                })
        {
            Some(format!(
                "the resume journal's certificate {id} is for another key than this device's"
            ))
        } else if entry.host != self.spec.host {
            Some(format!(
                "the resume journal's certificate {id} is for endpoint {}, not {}",
                entry.host, self.spec.host
            ))
        } else if !entry.token_valid(unix_now(), margin) {
            Some(format!(
                "the ownership token of certificate {id} in the resume journal has expired"
            ))
        } else {
            None
        };
        if let Some(reason) = reason {
            self.log(
                LogLevel::Warn,
                format!("{reason}: starting over with a new certificate"),
                out,
            );
            self.progress(Step::Restarting, out);
            self.forget_certificate(AfterForget::Connect, now, out);
            return;
        }
        self.phase = if entry.registered.is_some() {
            self.log(
                LogLevel::Info,
                format!("resuming: certificate {id} was registered; committing it"),
                out,
            );
            Phase::Verify { probe: false }
        } else {
            self.log(
                LogLevel::Info,
                format!("resuming: certificate {id} from the resume journal; registering it"),
                out,
            );
            Phase::Register
        };
        self.held = Some(Held {
            entry,
            resumed: true,
        });
        self.progress(Step::Resuming, out);
        if self.phase == (Phase::Verify { probe: false }) && !self.wants_verify() {
            self.commit(out);
        }
    }

    fn wants_verify(&self) -> bool {
        self.spec.verify && (self.key().is_some() || self.spec.external_key_connects)
    }

    fn can_probe(&self) -> bool {
        self.key().is_some() || self.spec.external_key_connects
    }

    /// Drops the certificate in hand and its journal, then goes on with `next`.
    fn forget_certificate(&mut self, next: AfterForget, now: u64, out: &mut Vec<FlowAction>) {
        self.held = None;
        self.phase = Phase::Create;
        if self.journaled {
            self.store(StoreAction::RemoveJournal, Then::Forgotten(next), out);
        } else {
            self.stored_now(Then::Forgotten(next), now, out);
        }
    }

    /// Runs `then` as if its storage action had been done (nothing to store).
    fn stored_now(&mut self, then: Then, now: u64, out: &mut Vec<FlowAction>) {
        self.storing = Some(then);
        self.stored(Ok(None), now, out);
    }

    /// Asks for the connection the phase needs.
    fn connect(&mut self, now: u64, out: &mut Vec<FlowAction>) {
        let identity = match (self.phase, &self.held) {
            (Phase::Verify { .. }, Some(held)) => {
                let key = held.entry.private_key.clone();
                if key.is_none() && !self.spec.external_key_connects {
                    return self.finish(Err(Error::InvalidArgument("no private key".into())), out);
                }
                Identity::Device {
                    certificate_pem: held.entry.certificate.certificate_pem.clone(),
                    private_key: key,
                    client_id: held
                        .entry
                        .registered
                        .as_ref()
                        .and_then(|r| r.thing_name.clone())
                        .unwrap_or_default(),
                }
            }
            _ => Identity::Claim,
        };
        let client_id = match &identity {
            Identity::Claim => self.spec.claim_client_id.clone(),
            Identity::Device { client_id, .. } => Some(client_id.clone()),
        }
        .filter(|id| !id.is_empty());
        if let Some(at) = self.connect_not_before(client_id.as_deref()) {
            if now < at {
                let line = format!(
                    "connecting in {} ms: AWS IoT accepts one CONNECT per second per client id",
                    at - now
                );
                self.log(LogLevel::Debug, line, out);
                self.wait_until = Some(at);
                return;
            }
        }
        self.connects
            .retain(|(_, at)| at.saturating_add(CONNECT_SPACING_MS) > now);
        self.connects.push((client_id, now));
        let step = match identity {
            Identity::Claim => Step::Connecting,
            Identity::Device { .. } => Step::Verifying,
        };
        self.link = Link::Connecting {
            deadline: now.saturating_add(self.spec.settings.step_timeout_ms),
        };
        let subscribe = self
            .build_engine(now, &HashSet::new())
            .map(|e| e.filters().to_vec())
            .unwrap_or_default();
        out.push(FlowAction::Connect {
            identity,
            subscribe,
        });
        self.progress(step, out);
    }

    /// The connect in progress was answered (or failed) at `now`: the server counted it no
    /// later than that, so the next one with its client id is spaced from `now`.
    fn connect_answered(&mut self, now: u64) {
        if let Some((_, at)) = self.connects.last_mut() {
            *at = (*at).max(now);
        }
    }

    /// The earliest time a connect with `client_id` (`None`: not known) may go out.
    fn connect_not_before(&self, client_id: Option<&str>) -> Option<u64> {
        self.connects
            .iter()
            .filter(|(id, _)| match (id.as_deref(), client_id) {
                (Some(a), Some(b)) => a == b,
                _ => true,
            })
            .map(|(_, at)| at.saturating_add(CONNECT_SPACING_MS))
            .max()
    }

    fn start_engine(&mut self, now: u64, out: &mut Vec<FlowAction>) {
        let Link::Up { subscribed, .. } = &self.link else {
            return;
        };
        let Some(engine) = self.build_engine(now, subscribed) else {
            return;
        };
        self.engine = Some(engine);
        self.forward(Event::Connected, now, out);
    }

    /// The engine of the current phase on a connection holding `subscribed`.
    fn build_engine(&self, now: u64, subscribed: &HashSet<String>) -> Option<Engine> {
        let register = Api::RegisterThing {
            template: self.spec.template.clone(),
        };
        match (self.phase, &self.held) {
            (Phase::Create, _) => {
                let op = Operation::CreateCertificate(self.spec.source.clone());
                let mut e = Engine::new(op, self.spec.settings, now, subscribed);
                // One SUBSCRIBE for both requests.
                e.also_subscribe(&[register], subscribed);
                Some(e)
            }
            (Phase::Register, Some(held)) => {
                let op = Operation::RegisterThing {
                    template: self.spec.template.clone(),
                    token: held.entry.certificate.ownership_token.clone(),
                    parameters: self.spec.parameters.clone(),
                };
                Some(Engine::new(op, self.spec.settings, now, subscribed))
            }
            _ => None,
        }
    }

    fn forward(&mut self, event: Event<'_>, now: u64, out: &mut Vec<FlowAction>) {
        let Some(engine) = &mut self.engine else {
            return;
        };
        for action in engine.handle(event, now) {
            match action {
                Action::Subscribe(filters) => {
                    if let Link::Up { pending, .. } = &mut self.link {
                        *pending = Some(filters.clone());
                    }
                    out.push(FlowAction::Subscribe(filters));
                }
                Action::Publish { topic, payload } => {
                    match self.phase {
                        Phase::Register => self.register_sent = true,
                        Phase::Create => self.create_sent = true,
                        _ => {}
                    }
                    out.push(FlowAction::Publish { topic, payload })
                }
                // Reported by the flow once the result is persisted.
                Action::Progress(Step::CertificateCreated | Step::Registered) => {}
                Action::Progress(step) => self.progress(step, out),
                Action::Done(result) => {
                    self.engine = None;
                    self.engine_done(result, now, out);
                    return;
                }
            }
        }
    }

    /// Journals the certificate in hand (when a journal is kept), then runs `then`.
    fn save(&mut self, then: Then, now: u64, out: &mut Vec<FlowAction>) {
        match (&self.held, self.journaled) {
            (Some(held), true) => {
                let entry = held.entry.clone();
                self.store(StoreAction::SaveJournal(entry), then, out);
            }
            _ => self.stored_now(then, now, out),
        }
    }

    fn engine_done(&mut self, result: Result<Outcome, Error>, now: u64, out: &mut Vec<FlowAction>) {
        self.create_sent = false;
        match (self.phase, result) {
            (Phase::Create, Ok(Outcome::Certificate(certificate))) => {
                if self
                    .spec
                    .external_public_key
                    .as_ref()
                    .is_some_and(|public| {
                        !crate::keys::certificate_contains_key(&certificate.certificate_pem, public)
                    })
                {
                    self.drop_link(out);
                    return self.finish(Err(Error::CertificateMismatch), out);
                }
                self.took_certificate(certificate);
                self.save(Then::Register, now, out);
            }
            (Phase::Register, Ok(Outcome::Registered(registered))) => {
                if let Some(held) = &mut self.held {
                    held.entry.registered = Some(registered);
                }
                self.save(Then::Registered, now, out);
            }
            (Phase::Register, Err(Error::Rejected { api, error }))
                if error.status_code == 400 && error.error_code == TOKEN_REFUSED =>
            {
                self.token_refused(Error::Rejected { api, error }, now, out)
            }
            (_, Err(e)) => self.fail(e, now, out),
            (_, Ok(_)) => {
                self.drop_link(out);
                self.finish(Err(Error::Internal("unexpected outcome".into())), out);
            }
        }
    }

    fn took_certificate(&mut self, mut certificate: CreatedCertificate) {
        let private_key = self
            .spec
            .device_key
            .clone()
            .or_else(|| certificate.private_key.take());
        let created = unix_now();
        self.register_sent = false;
        self.held = Some(Held {
            entry: Entry {
                host: self.spec.host.clone(),
                certificate,
                private_key,
                created_unix: created,
                token_expires_unix: created.saturating_add(self.spec.token_lifetime_s),
                registered: None,
            },
            resumed: false,
        });
    }

    /// RegisterThing refused our token: unknown, used or expired. Used could mean that an
    /// earlier attempt was accepted and its reply lost; connecting with the certificate tells.
    fn token_refused(&mut self, e: Error, now: u64, out: &mut Vec<FlowAction>) {
        self.drop_link(out);
        let id = self.held_id();
        if !self.can_probe() {
            let resumed = self.held.as_ref().is_some_and(|h| h.resumed);
            if self.register_sent || resumed {
                // An earlier request with this token went out and its reply was lost: it most
                // likely used the token. Without the key nothing can confirm it; hand the
                // certificate over, marked unconfirmed, rather than dropping an active one.
                self.log(
                    LogLevel::Warn,
                    format!(
                        "RegisterThing refused the ownership token of certificate {id} after an \
                         earlier request with it lost its reply; it was most likely registered \
                         then, but its key is not the library's to confirm it: connect with it"
                    ),
                    out,
                );
                self.confirmed = false;
                if let Some(held) = &mut self.held {
                    held.entry.registered = Some(Registered::default());
                }
                return self.commit(out);
            }
            // Never sent: the token was bad from the start. The journal holds no key, so
            // dropping it loses nothing.
            return self.forget_certificate(AfterForget::Fail(e), now, out);
        }
        self.log(
            LogLevel::Warn,
            format!(
                "RegisterThing refused the ownership token of certificate {id}; \
                 connecting with the certificate to see whether an earlier attempt registered it"
            ),
            out,
        );
        self.phase = Phase::Verify { probe: true };
        self.connect(now, out);
    }

    fn connect_failed(&mut self, e: Error, now: u64, out: &mut Vec<FlowAction>) {
        match (self.phase, e) {
            (Phase::Verify { probe: true }, Error::Tls(m)) if !self.restarted => {
                let id = self.held_id();
                self.log(
                    LogLevel::Warn,
                    format!(
                        "certificate {id} was refused ({m}): it was never registered; \
                         starting over with a new certificate"
                    ),
                    out,
                );
                self.restarted = true;
                self.progress(Step::Restarting, out);
                self.forget_certificate(AfterForget::Connect, now, out);
            }
            (Phase::Verify { .. }, Error::Tls(m)) => self.fail(
                Error::Connection(format!("the new certificate could not connect: {m}")),
                now,
                out,
            ),
            (_, e) => self.fail(e, now, out),
        }
    }

    /// The new certificate connected.
    fn verified(&mut self, probe: bool, now: u64, out: &mut Vec<FlowAction>) {
        self.link = Link::Down;
        out.push(FlowAction::Disconnect);
        if probe {
            let id = self.held_id();
            self.log(
                LogLevel::Warn,
                format!(
                    "certificate {id} is active: an earlier RegisterThing was accepted but its \
                     reply was lost; the thing name and device configuration are unknown"
                ),
                out,
            );
            if let Some(held) = &mut self.held {
                held.entry.registered = Some(Registered::default());
            }
            return self.save(Then::Probed, now, out);
        }
        self.progress(Step::Verified, out);
        self.commit(out);
    }

    /// Commits the credentials (when the storage keeps them), removes the journal, reports
    /// success.
    fn commit(&mut self, out: &mut Vec<FlowAction>) {
        let Some(held) = self.held.take() else {
            return self.finish(
                Err(Error::Internal("commit without a certificate".into())),
                out,
            );
        };
        let Held { entry, resumed } = held;
        let registered = entry.registered.unwrap_or_default();
        let provisioned = Provisioned {
            thing_name: registered.thing_name.unwrap_or_default(),
            certificate_id: entry.certificate.certificate_id,
            certificate_pem: entry.certificate.certificate_pem,
            private_key_pem: entry.private_key,
            device_configuration: registered.device_configuration,
            stored: None,
            attempts: self.attempt,
            resumed,
            registration_confirmed: self.confirmed,
            already_provisioned: false,
        };
        let then = Then::Committed(Box::new(provisioned.clone()));
        match (&provisioned.private_key_pem, self.spec.store_credentials) {
            (Some(key), true) => {
                let set = Stored {
                    thing_name: provisioned.thing_name.clone(),
                    certificate_id: provisioned.certificate_id.clone(),
                    certificate_pem: provisioned.certificate_pem.clone(),
                    private_key_pem: key.clone(),
                    device_configuration: provisioned.device_configuration.clone(),
                };
                self.store(StoreAction::Commit(set), then, out);
            }
            // Nothing to store; the continuation of a commit does not use the time.
            _ => self.stored_now(then, 0, out),
        }
    }

    fn succeed(&mut self, provisioned: Provisioned, out: &mut Vec<FlowAction>) {
        self.progress(Step::Committed, out);
        self.finish(Ok(provisioned), out);
    }

    /// An attempt failed: retry after a pause if the failure is retryable and attempts and
    /// time are left; else give up with this error.
    fn fail(&mut self, e: Error, now: u64, out: &mut Vec<FlowAction>) {
        // A rejection (429, 5xx) says nothing against the connection: the next attempt goes
        // out on it after the pause, without a new TLS handshake, CONNECT and SUBSCRIBE (three
        // round trips, and AWS's one CONNECT per second per client id). Anything else, or no
        // next attempt, closes it.
        let keep_link = matches!(e, Error::Rejected { .. })
            && matches!(self.link, Link::Up { .. })
            && matches!(self.phase, Phase::Create | Phase::Register);
        if keep_link {
            self.engine = None;
            self.create_sent = false;
        } else {
            self.drop_link(out);
        }
        let spent = match now.saturating_sub(self.started) {
            ms if ms < 1000 => format!("{ms} ms"),
            ms => format!("{:.1} s", ms as f64 / 1000.0),
        };
        let tried = match self.attempt {
            1 => format!("(1 attempt, {spent})"),
            n => format!("({n} attempts, {spent})"),
        };
        if !e.is_retryable() {
            self.drop_link(out);
            return self.finish(Err(e.noted(&tried)), out);
        }
        if self.attempt >= self.spec.retry.max_attempts {
            self.drop_link(out);
            let line = format!("giving up after {} attempts: {e}", self.attempt);
            self.log(LogLevel::Warn, line, out);
            return self.finish(Err(e.noted(&tried)), out);
        }
        let backoff = self.spec.retry.backoff_ms(self.attempt, self.jitter.draw());
        // Otherwise the next attempt connects again, most likely with the same client id.
        let resume_at = if keep_link {
            now.saturating_add(backoff)
        } else {
            now.saturating_add(backoff)
                .max(self.connect_not_before(None).unwrap_or(0))
        };
        let pause = resume_at - now;
        if self
            .spec
            .settings
            .deadline_ms
            .is_some_and(|deadline| resume_at >= deadline)
        {
            self.drop_link(out);
            let line = format!("no time left for another attempt: {e}");
            self.log(LogLevel::Warn, line, out);
            return self.finish(Err(e.noted(&tried)), out);
        }
        self.log(
            LogLevel::Warn,
            format!(
                "attempt {} failed ({e}); retrying in {pause} ms",
                self.attempt
            ),
            out,
        );
        self.step = Step::Retrying;
        out.push(FlowAction::Progress(Progress {
            step: Step::Retrying,
            attempt: self.attempt,
            retry_in_ms: pause,
            error: Some(e),
        }));
        self.attempt += 1;
        self.wait_until = Some(resume_at);
    }
}

/// A storage failure's text without the "storage error" prefix its code adds.
fn storage_text(e: &Error) -> String {
    match e {
        Error::Storage(text) => text.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests;
