//! The flow driven by a scripted service: faults at each step, retries, the journal.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};

use serde_json::json;

use super::*;
use crate::protocol::Format;
use crate::store::journal::Journal;
use crate::store::{FileStorage, Storage};

const STEP: u64 = 1_000;
const TEMPLATE: &str = "Tpl";

/// A P-256 key and a self-signed certificate for it.
fn material() -> (String, String) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let cert = rcgen::CertificateParams::new(vec!["device".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    (key.serialize_pem(), cert.pem())
}

/// What the service answers: an event, or a message (topic, payload).
type Reaction = (FlowEvent<'static>, Option<(String, Vec<u8>)>);

/// What the scripted service does to one request or connection.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Fault {
    /// The connection attempt fails.
    Refuse,
    /// The connection attempt fails with a TLS error (a certificate refused).
    RefuseTls,
    /// The connection drops right after the request (before any processing).
    DropBeforeProcessing,
    /// The request is processed, then the connection drops before the reply.
    DropAfterProcessing,
    /// Rejected with this status.
    Reject(u16),
    /// Rejected with this status, then the connection drops.
    RejectThenDrop(u16),
    /// No reply at all (the flow times out).
    Silence,
}

/// A fake AWS: issues one certificate per processed certificate request, consumes tokens on
/// RegisterThing, activates the certificate.
struct Sim {
    key_pem: String,
    cert_pem: String,
    faults: VecDeque<(&'static str, Fault)>,
    now: u64,
    issued: Vec<String>,
    active: Vec<String>,
    tokens_used: Vec<String>,
    publishes: Vec<String>,
    connects: Vec<String>,
    /// Client id and time of every connect.
    connect_times: Vec<(String, u64)>,
    /// The claim connection's client id (as in the spec).
    claim_client_id: String,
    progress: Vec<Progress>,
    logs: Vec<String>,
    subscribes: Vec<Vec<String>>,
    /// The filters the last Connect announced, until the connection's first Subscribe.
    announced: Option<Vec<String>>,
}

impl Sim {
    fn new(faults: &[(&'static str, Fault)]) -> Sim {
        let (key_pem, cert_pem) = material();
        Sim {
            key_pem,
            cert_pem,
            faults: faults.iter().copied().collect(),
            now: 0,
            issued: Vec::new(),
            active: Vec::new(),
            tokens_used: Vec::new(),
            publishes: Vec::new(),
            connects: Vec::new(),
            connect_times: Vec::new(),
            claim_client_id: "claim-1".into(),
            progress: Vec::new(),
            logs: Vec::new(),
            subscribes: Vec::new(),
            announced: None,
        }
    }

    fn fault(&mut self, at: &str) -> Option<Fault> {
        match self.faults.front() {
            Some((where_, f)) if *where_ == at => {
                let f = *f;
                self.faults.pop_front();
                Some(f)
            }
            _ => None,
        }
    }

    fn spec(&self, dir: Option<&Path>) -> FlowSpec {
        FlowSpec {
            existing: None,
            host: "example.iot".into(),
            source: CertificateSource::Csr {
                csr_pem: "-----BEGIN CERTIFICATE REQUEST-----".into(),
                key: Some(Secret::new(self.key_pem.clone())),
            },
            device_key: Some(Secret::new(self.key_pem.clone())),
            template: TEMPLATE.into(),
            parameters: BTreeMap::from([("SerialNumber".into(), "S1".into())]),
            settings: Settings {
                format: Format::Json,
                step_timeout_ms: STEP,
                deadline_ms: None,
            },
            retry: RetryPolicy {
                max_attempts: 6,
                initial_backoff: std::time::Duration::from_millis(100),
                max_backoff: std::time::Duration::from_millis(400),
            },
            verify: true,
            external_key_connects: false,
            external_public_key: None,
            token_lifetime_s: 3600,
            store_credentials: dir.is_some(),
            journal: Journaled::Off,
            seed: 1,
            claim_client_id: Some(self.claim_client_id.clone()),
            recent_connects: Vec::new(),
        }
    }

    /// Runs the flow to the end; every loop is bounded.
    fn run(&mut self, tested: &mut Tested) -> Result<Provisioned, Error> {
        let Tested { flow, storage } = tested;
        // Connect spacing is checked within one flow: a new flow (a restart) knows nothing of
        // an earlier one's connects.
        self.connect_times.clear();
        let mut actions: VecDeque<FlowAction> = flow.start(self.now).into();
        let mut verifying = false;
        for _ in 0..1000 {
            let Some(action) = actions.pop_front() else {
                let wake = flow.wake_at().expect("a running flow has a wake time");
                assert!(wake >= self.now, "wake time in the past");
                self.now = wake;
                actions.extend(flow.handle(FlowEvent::Tick, self.now));
                continue;
            };
            let mut events: Vec<Reaction> = Vec::new();
            match action {
                FlowAction::Done(result) => return result,
                FlowAction::Progress(p) => self.progress.push(p),
                FlowAction::Log(_, line) => self.logs.push(line),
                FlowAction::Disconnect => {}
                FlowAction::Store(action) => {
                    let stored = match &action {
                        StoreAction::SaveJournal(entry) => {
                            storage.save_journal(entry).map(|()| None)
                        }
                        StoreAction::RemoveJournal => storage.remove_journal().map(|()| None),
                        StoreAction::Commit(set) => storage.commit(set),
                    };
                    actions.extend(flow.handle(FlowEvent::Stored(stored), self.now));
                }
                FlowAction::Connect {
                    identity,
                    subscribe,
                } => {
                    // The claim connection announces the SUBSCRIBE it will ask for (a transport
                    // may send it with the CONNECT); the verification connection has none.
                    assert_eq!(
                        subscribe.is_empty(),
                        matches!(identity, Identity::Device { .. }),
                        "{subscribe:?}"
                    );
                    self.announced = Some(subscribe);
                    let (name, tls_ok) = match &identity {
                        Identity::Claim => ("claim".to_string(), true),
                        Identity::Device {
                            certificate_pem, ..
                        } => {
                            assert_eq!(certificate_pem, &self.cert_pem);
                            let id = self.issued.last().cloned().unwrap_or_default();
                            ("device".to_string(), self.active.contains(&id))
                        }
                    };
                    verifying = name == "device";
                    // AWS hangs up on a second CONNECT with one client id within a second.
                    let client_id = match &identity {
                        Identity::Claim => self.claim_client_id.clone(),
                        Identity::Device { client_id, .. } => client_id.clone(),
                    };
                    if let Some((_, at)) = self
                        .connect_times
                        .iter()
                        .rev()
                        .find(|(id, _)| *id == client_id)
                    {
                        assert!(
                            self.now >= at + CONNECT_SPACING_MS,
                            "{client_id} connected at {at} and again at {}",
                            self.now
                        );
                    }
                    self.connect_times.push((client_id, self.now));
                    self.connects.push(name.clone());
                    let fault = self.fault(&format!("connect-{name}"));
                    match fault {
                        Some(Fault::Refuse) => events.push((
                            FlowEvent::ConnectFailed(Error::Connection("refused".into())),
                            None,
                        )),
                        Some(Fault::RefuseTls) => events.push((
                            FlowEvent::ConnectFailed(Error::Tls("bad certificate".into())),
                            None,
                        )),
                        Some(Fault::Silence) => {}
                        _ if !tls_ok => events.push((
                            FlowEvent::ConnectFailed(Error::Tls("certificate unknown".into())),
                            None,
                        )),
                        _ => events.push((FlowEvent::Connected, None)),
                    }
                }
                FlowAction::Subscribe(filters) => {
                    assert!(!verifying);
                    if let Some(announced) = self.announced.take() {
                        assert_eq!(
                            announced, filters,
                            "the SUBSCRIBE announced with the CONNECT"
                        );
                    }
                    let n = filters.len();
                    self.subscribes.push(filters);
                    self.now += 1;
                    let granted: &'static [u8] = Box::leak(vec![1; n].into_boxed_slice());
                    events.push((FlowEvent::SubAck(granted), None));
                }
                FlowAction::Publish { topic, payload } => {
                    self.publishes.push(topic.clone());
                    self.now += 1;
                    let api = if topic.contains("create-from-csr") {
                        "csr"
                    } else {
                        "register"
                    };
                    match self.fault(api) {
                        Some(Fault::DropBeforeProcessing) => {
                            events.push((
                                FlowEvent::Disconnected(Error::Connection("cut".into())),
                                None,
                            ));
                        }
                        Some(f @ (Fault::Reject(status) | Fault::RejectThenDrop(status))) => {
                            let body = json!({"statusCode": status, "errorCode": "Nope", "errorMessage": "no"});
                            events.push((
                                FlowEvent::Tick,
                                Some((
                                    format!("{topic}/rejected"),
                                    serde_json::to_vec(&body).unwrap(),
                                )),
                            ));
                            if matches!(f, Fault::RejectThenDrop(_)) {
                                events.push((
                                    FlowEvent::Disconnected(Error::Connection("cut".into())),
                                    None,
                                ));
                            }
                        }
                        Some(Fault::Silence) => {}
                        fault => {
                            let reply = self.process(api, &payload);
                            if fault == Some(Fault::DropAfterProcessing) {
                                events.push((
                                    FlowEvent::Disconnected(Error::Connection("cut".into())),
                                    None,
                                ));
                            } else {
                                events.push((
                                    FlowEvent::Tick,
                                    Some((format!("{topic}/{}", reply.0), reply.1)),
                                ));
                            }
                        }
                    }
                }
            }
            for (event, message) in events {
                let produced = match &message {
                    Some((topic, payload)) => {
                        flow.handle(FlowEvent::Message { topic, payload }, self.now)
                    }
                    None => flow.handle(event, self.now),
                };
                actions.extend(produced);
            }
        }
        panic!("the flow did not finish in 1000 actions");
    }

    fn process(&mut self, api: &str, payload: &[u8]) -> (&'static str, Vec<u8>) {
        if api == "csr" {
            let id = format!("cert{}", self.issued.len() + 1);
            self.issued.push(id.clone());
            let body = json!({"certificateId": id, "certificatePem": self.cert_pem,
                "certificateOwnershipToken": format!("token-{id}")});
            return ("accepted", serde_json::to_vec(&body).unwrap());
        }
        let request: serde_json::Value = serde_json::from_slice(payload).unwrap();
        let token = request["certificateOwnershipToken"]
            .as_str()
            .unwrap()
            .to_string();
        let id = token.trim_start_matches("token-").to_string();
        if self.tokens_used.contains(&token) || !self.issued.contains(&id) {
            let body = json!({"statusCode": 400, "errorCode": TOKEN_REFUSED,
                "errorMessage": "Certificate ownership token is invalid, expired or already used."});
            return ("rejected", serde_json::to_vec(&body).unwrap());
        }
        self.tokens_used.push(token);
        self.active.push(id);
        let body = json!({"thingName": "dev-S1", "deviceConfiguration": {"k": "v"}});
        ("accepted", serde_json::to_vec(&body).unwrap())
    }

    fn steps(&self) -> Vec<Step> {
        self.progress.iter().map(|p| p.step).collect()
    }

    /// The pause of each RETRYING progress report, in ms.
    fn retry_pauses(&self) -> Vec<u64> {
        self.progress
            .iter()
            .filter(|p| p.step == Step::Retrying)
            .map(|p| p.retry_in_ms)
            .collect()
    }

    fn csr_requests(&self) -> usize {
        self.publishes
            .iter()
            .filter(|t| t.contains("create-from-csr"))
            .count()
    }
}

fn temp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("fleetprov-flow-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn journal(dir: &Path) -> Journal {
    Journal::open(&dir.join("state")).unwrap()
}

/// A flow with the default file storage, as the drivers set it up.
#[derive(Debug)]
struct Tested {
    flow: Flow,
    storage: FileStorage,
}

/// A flow for `spec`; with `journal` (in `<dir>/state`), the credentials go to `<dir>/out`.
fn tested(mut spec: FlowSpec, journal: Option<Journal>) -> Tested {
    let out = match &journal {
        Some(j) if spec.store_credentials => j
            .path()
            .parent()
            .and_then(Path::parent)
            .map(|d| d.join("out")),
        _ => None,
    };
    spec.store_credentials = out.is_some();
    let mut storage = FileStorage::new(out, journal);
    spec.journal = if storage.keeps_journal() {
        match storage.load_journal() {
            Ok(entry) => Journaled::Loaded(entry),
            Err(e) => Journaled::Unreadable(e),
        }
    } else {
        Journaled::Off
    };
    Tested {
        flow: Flow::new(spec),
        storage,
    }
}

#[test]
fn clean_run_subscribes_once_persists_before_registering_and_commits() {
    let dir = temp("clean");
    let mut sim = Sim::new(&[]);
    let mut flow = tested(sim.spec(Some(&dir)), Some(journal(&dir)));
    let p = sim.run(&mut flow).unwrap();
    assert_eq!(p.thing_name, "dev-S1");
    assert_eq!((p.attempts, p.resumed), (1, false));
    assert_eq!(sim.subscribes.len(), 1, "one SUBSCRIBE for both requests");
    assert_eq!(sim.subscribes[0].len(), 4);
    assert_eq!(sim.connects, ["claim", "device"]);
    assert_eq!(
        sim.steps(),
        [
            Step::Connecting,
            Step::Subscribing,
            Step::Subscribed,
            Step::CreatingCertificate,
            Step::CertificateCreated,
            Step::Registering,
            Step::Registered,
            Step::Verifying,
            Step::Verified,
            Step::Committed,
        ]
    );
    let stored = p.stored.unwrap();
    assert_eq!(
        std::fs::read_to_string(stored.private_key).unwrap(),
        sim.key_pem
    );
    assert!(!dir.join("state").join("journal.json").exists());
}

/// Each cut point, once: the run ends provisioned, with at most one certificate per token
/// window (a second one only when the first reply never arrived).
#[test]
fn a_cut_at_each_step_is_retried_without_minting_a_second_certificate_once_one_is_held() {
    let rows: &[(&str, Fault, usize)] = &[
        ("connect-claim", Fault::Refuse, 1),
        ("connect-claim", Fault::Silence, 1),
        ("csr", Fault::DropBeforeProcessing, 1),
        // The first certificate was made but its reply never came: a second is unavoidable.
        ("csr", Fault::DropAfterProcessing, 2),
        ("csr", Fault::Silence, 1),
        ("register", Fault::DropBeforeProcessing, 1),
        ("register", Fault::Silence, 1),
        ("connect-device", Fault::Refuse, 1),
        // Not yet usable (AWS activates within moments): retried, not given up.
        ("connect-device", Fault::RefuseTls, 1),
    ];
    for (at, fault, certificates) in rows {
        let dir = temp("cut");
        let mut sim = Sim::new(&[(at, *fault)]);
        let mut flow = tested(sim.spec(Some(&dir)), Some(journal(&dir)));
        let p = sim
            .run(&mut flow)
            .unwrap_or_else(|e| panic!("{at} {fault:?}: {e}"));
        assert_eq!(sim.issued.len(), *certificates, "{at} {fault:?}");
        assert_eq!(sim.active.len(), 1, "{at} {fault:?}");
        assert_eq!(p.attempts, 2, "{at} {fault:?}");
        let retry = sim
            .progress
            .iter()
            .find(|p| p.step == Step::Retrying)
            .unwrap();
        assert!(retry.error.as_ref().unwrap().is_retryable());
        // The backoff (50 to 100 ms), stretched to a second after the last connect.
        assert!(
            (50..=CONNECT_SPACING_MS).contains(&retry.retry_in_ms),
            "{}",
            retry.retry_in_ms
        );
        assert!(p.stored.is_some());
    }
}

#[test]
fn a_lost_register_reply_is_confirmed_by_connecting_with_the_certificate() {
    let dir = temp("lost-reply");
    let mut sim = Sim::new(&[("register", Fault::DropAfterProcessing)]);
    let mut flow = tested(sim.spec(Some(&dir)), Some(journal(&dir)));
    let p = sim.run(&mut flow).unwrap();
    assert_eq!(sim.issued.len(), 1);
    assert_eq!(p.thing_name, "", "the reply with the thing name was lost");
    assert!(
        sim.logs.iter().any(|l| l.contains("reply was lost")),
        "{:?}",
        sim.logs
    );
    assert_eq!(sim.connects, ["claim", "claim", "device"]);
    assert!(p.stored.is_some());
}

#[test]
fn a_refused_token_for_a_certificate_that_is_not_active_starts_over_once() {
    let dir = temp("refused");
    let mut sim = Sim::new(&[]);
    let j = journal(&dir);
    // A journal whose certificate the service never issued.
    let spec = sim.spec(Some(&dir));
    j.save(&Entry {
        host: spec.host.clone(),
        certificate: CreatedCertificate {
            certificate_id: "ghost".into(),
            certificate_pem: sim.cert_pem.clone(),
            private_key: None,
            ownership_token: Secret::new("token-ghost".into()),
        },
        private_key: Some(Secret::new(sim.key_pem.clone())),
        created_unix: unix_now(),
        token_expires_unix: unix_now() + 3000,
        registered: None,
    })
    .unwrap();
    let mut flow = tested(spec, Some(j));
    let p = sim.run(&mut flow).unwrap();
    assert!(!p.resumed);
    assert_eq!(sim.issued.len(), 1);
    let steps = sim.steps();
    assert_eq!(steps[0], Step::Resuming);
    assert!(steps.contains(&Step::Restarting), "{steps:?}");
    assert_eq!(sim.connects, ["claim", "device", "claim", "device"]);
}

#[test]
fn a_journal_with_a_valid_token_resumes_at_register_thing() {
    let dir = temp("resume");
    // First run: the RegisterThing request is cut and retries are exhausted.
    let mut sim = Sim::new(&[("register", Fault::DropBeforeProcessing)]);
    let mut spec = sim.spec(Some(&dir));
    spec.retry = RetryPolicy::none();
    let mut flow = tested(spec, Some(journal(&dir)));
    assert!(matches!(sim.run(&mut flow), Err(Error::Connection(_))));
    // The flow holds the certificate, its key and token: its Debug shows neither.
    let shown = format!("{flow:?}");
    assert!(shown.contains("cert1"), "{shown}");
    let key_line = sim.key_pem.lines().nth(1).unwrap();
    assert!(
        !shown.contains(key_line) && !shown.contains("token-cert1"),
        "{shown}"
    );
    drop(flow);
    assert!(dir.join("state/journal.json").exists());
    assert!(!dir.join("out").exists(), "nothing committed");
    // Second run: no new certificate.
    sim.publishes.clear();
    sim.progress.clear();
    let mut flow = tested(sim.spec(Some(&dir)), Some(journal(&dir)));
    let p = sim.run(&mut flow).unwrap();
    assert!(p.resumed);
    assert_eq!(p.thing_name, "dev-S1");
    assert_eq!(sim.csr_requests(), 0);
    assert_eq!(sim.issued.len(), 1);
    assert_eq!(sim.steps()[0], Step::Resuming);
    assert!(!dir.join("state/journal.json").exists());
}

#[test]
fn an_expired_journal_starts_over_and_says_so() {
    let dir = temp("expired");
    let mut sim = Sim::new(&[("register", Fault::DropBeforeProcessing)]);
    let mut spec = sim.spec(Some(&dir));
    spec.retry = RetryPolicy::none();
    spec.token_lifetime_s = 0;
    let mut flow = tested(spec, Some(journal(&dir)));
    assert!(sim.run(&mut flow).is_err());
    drop(flow);
    sim.progress.clear();
    let mut flow = tested(sim.spec(Some(&dir)), Some(journal(&dir)));
    let p = sim.run(&mut flow).unwrap();
    assert!(!p.resumed);
    assert_eq!(sim.issued.len(), 2);
    assert_eq!(sim.steps()[0], Step::Restarting);
    assert!(
        sim.logs.iter().any(|l| l.contains("expired")),
        "{:?}",
        sim.logs
    );
}

#[test]
fn a_registered_journal_is_only_verified_and_committed() {
    let dir = temp("registered");
    let mut sim = Sim::new(&[("connect-device", Fault::Refuse)]);
    let mut spec = sim.spec(Some(&dir));
    spec.retry = RetryPolicy::none();
    let mut flow = tested(spec, Some(journal(&dir)));
    assert!(
        sim.run(&mut flow).is_err(),
        "the new certificate could not connect"
    );
    drop(flow);
    assert!(
        !dir.join("out").exists(),
        "not committed before it connected"
    );
    sim.publishes.clear();
    sim.connects.clear();
    let mut flow = tested(sim.spec(Some(&dir)), Some(journal(&dir)));
    let p = sim.run(&mut flow).unwrap();
    assert_eq!(p.thing_name, "dev-S1", "kept in the journal");
    assert!(sim.publishes.is_empty());
    assert_eq!(sim.connects, ["device"]);
}

#[test]
fn only_retryable_rejections_are_retried() {
    for (status, retried) in [
        (429, true),
        (500, true),
        (503, true),
        (400, false),
        (403, false),
        (404, false),
    ] {
        let mut sim = Sim::new(&[("csr", Fault::Reject(status))]);
        let mut flow = tested(sim.spec(None), None);
        let result = sim.run(&mut flow);
        assert_eq!(result.is_ok(), retried, "{status}");
        if !retried {
            match result {
                Err(Error::Rejected { error, .. }) => assert_eq!(error.status_code, status),
                other => panic!("{status}: {other:?}"),
            }
            assert_eq!(sim.csr_requests(), 1);
        }
    }
}

#[test]
fn backoff_grows_and_attempts_are_bounded() {
    let faults: Vec<_> = (0..10).map(|_| ("csr", Fault::Reject(429))).collect();
    let mut sim = Sim::new(&faults);
    // Steps above the one-second spacing of connects, so that the backoff alone shows.
    let mut spec = sim.spec(None);
    spec.retry.initial_backoff = std::time::Duration::from_millis(2000);
    spec.retry.max_backoff = std::time::Duration::from_millis(8000);
    let mut flow = tested(spec, None);
    let result = sim.run(&mut flow);
    assert!(matches!(result, Err(Error::Rejected { .. })));
    assert_eq!(sim.csr_requests(), 6, "max_attempts");
    let pauses = sim.retry_pauses();
    assert_eq!(pauses.len(), 5);
    for (i, pause) in pauses.iter().enumerate() {
        let step = (2000u64 << i).min(8000);
        assert!((step / 2..=step).contains(pause), "pause {i}: {pause}");
    }
    let attempts: Vec<u32> = sim
        .progress
        .iter()
        .filter(|p| p.step == Step::Retrying)
        .map(|p| p.attempt)
        .collect();
    assert_eq!(attempts, [1, 2, 3, 4, 5]);
}

#[test]
fn connects_with_one_client_id_are_a_second_apart() {
    // A quick retry: the backoff (100 ms) is stretched to a second after the last connect.
    let mut sim = Sim::new(&[("connect-claim", Fault::Refuse)]);
    let mut flow = tested(sim.spec(None), None);
    sim.run(&mut flow).unwrap();
    let claim: Vec<u64> = sim
        .connect_times
        .iter()
        .filter(|(id, _)| id == "claim-1")
        .map(|(_, at)| *at)
        .collect();
    assert_eq!(claim.len(), 2);
    assert_eq!(claim[1] - claim[0], CONNECT_SPACING_MS);
    let retry = sim.progress.iter().find(|p| p.step == Step::Retrying);
    assert_eq!(retry.map(|p| p.retry_in_ms), Some(CONNECT_SPACING_MS));

    // The verification connect waits only when the thing's name is the claim's client id.
    for (claim_id, waits) in [("claim-1", false), ("dev-S1", true)] {
        let mut sim = Sim::new(&[]);
        sim.claim_client_id = claim_id.into();
        let mut flow = tested(sim.spec(None), None);
        sim.run(&mut flow).unwrap();
        let times: Vec<u64> = sim.connect_times.iter().map(|(_, at)| *at).collect();
        assert_eq!(times.len(), 2, "{claim_id}");
        assert_eq!(
            times[1] - times[0] >= CONNECT_SPACING_MS,
            waits,
            "{claim_id}: {times:?}"
        );
        assert_eq!(
            sim.logs
                .iter()
                .any(|l| l.contains("one CONNECT per second")),
            waits,
            "{claim_id}"
        );
    }
}

#[test]
fn a_rejection_is_retried_on_the_connection_it_came_on() {
    for at in ["csr", "register"] {
        let mut sim = Sim::new(&[(at, Fault::Reject(429)), (at, Fault::Reject(503))]);
        let mut flow = tested(sim.spec(None), None);
        let p = sim.run(&mut flow).unwrap();
        assert_eq!(p.attempts, 3, "{at}");
        // One claim connection, subscribed once; then the verification connection.
        assert_eq!(sim.connects, ["claim", "device"], "{at}");
        assert_eq!(sim.subscribes.len(), 1, "{at}");
        // Pure backoff: no connect to space.
        let pauses = sim.retry_pauses();
        assert_eq!(pauses.len(), 2, "{at}");
        assert!((50..=100).contains(&pauses[0]), "{at}: {pauses:?}");
        assert!((100..=200).contains(&pauses[1]), "{at}: {pauses:?}");
    }
    // The connection lost during the pause: no attempt more, the retry connects again (the
    // scripted service checks it is a second after the last connect).
    let mut sim = Sim::new(&[("csr", Fault::RejectThenDrop(429))]);
    let mut flow = tested(sim.spec(None), None);
    let p = sim.run(&mut flow).unwrap();
    assert_eq!(p.attempts, 2);
    assert_eq!(sim.connects, ["claim", "claim", "device"]);
}

#[test]
fn the_deadline_stops_retries() {
    let faults: Vec<_> = (0..10).map(|_| ("connect-claim", Fault::Refuse)).collect();
    let mut sim = Sim::new(&faults);
    let mut spec = sim.spec(None);
    spec.settings.deadline_ms = Some(200);
    let mut flow = tested(spec, None);
    let result = sim.run(&mut flow);
    assert!(matches!(result, Err(Error::Connection(_))), "{result:?}");
    assert!(sim.now < 200);
    assert!(sim.logs.iter().any(|l| l.contains("no time left")));
}

#[test]
fn an_unreadable_journal_is_a_storage_error_and_is_kept() {
    let dir = temp("unreadable");
    let j = journal(&dir);
    std::fs::write(j.path(), b"{ not json").unwrap();
    let mut sim = Sim::new(&[]);
    let mut flow = tested(sim.spec(Some(&dir)), Some(j));
    assert!(matches!(sim.run(&mut flow), Err(Error::Storage(_))));
    assert!(sim.connects.is_empty());
    assert!(dir.join("state/journal.json").exists());
}

/// The spec of a device whose key is external: no key for the library, its public key known.
fn external_spec(sim: &Sim, dir: &Path) -> FlowSpec {
    let mut spec = sim.spec(Some(dir));
    let csr = crate::keys::DeviceKey::from_pem(&sim.key_pem)
        .unwrap()
        .csr_pem("d")
        .unwrap();
    spec.external_public_key = Some(crate::keys::csr_public_key(&csr).unwrap());
    spec.source = CertificateSource::Csr {
        csr_pem: csr,
        key: None,
    };
    spec.device_key = None;
    spec.store_credentials = false;
    spec
}

#[test]
fn an_external_key_with_a_lost_register_reply_is_handed_over_unconfirmed() {
    let dir = temp("external-lost");
    let mut sim = Sim::new(&[("register", Fault::DropAfterProcessing)]);
    let mut flow = tested(external_spec(&sim, &dir), Some(journal(&dir)));
    let p = sim.run(&mut flow).unwrap();
    assert!(!p.registration_confirmed);
    assert_eq!(p.certificate_pem, sim.cert_pem);
    assert_eq!(sim.issued.len(), 1, "no second certificate");
    assert!(sim.active.contains(&p.certificate_id));
    assert!(!dir.join("state/journal.json").exists());
    assert!(
        sim.connects.iter().all(|c| c == "claim"),
        "no key to connect with"
    );
    // A normal run is confirmed.
    let mut sim = Sim::new(&[]);
    let mut flow = tested(external_spec(&sim, &temp("external-ok")), None);
    assert!(sim.run(&mut flow).unwrap().registration_confirmed);
}

#[test]
fn an_external_key_refuses_certificates_and_journals_for_other_keys() {
    // The service returns a certificate for another key.
    let mut sim = Sim::new(&[]);
    let dir = temp("external-mismatch");
    let mut spec = external_spec(&sim, &dir);
    let (_, other_cert) = material();
    sim.cert_pem = other_cert;
    spec.retry = RetryPolicy::none();
    let mut flow = tested(spec, None);
    assert_eq!(sim.run(&mut flow).unwrap_err(), Error::CertificateMismatch);

    // A journal for another key: start over, not resume.
    let sim = Sim::new(&[]);
    let dir = temp("external-journal");
    let j = journal(&dir);
    let (_, other_cert) = material();
    j.save(&Entry {
        host: "example.iot".into(),
        certificate: CreatedCertificate {
            certificate_id: "old".into(),
            certificate_pem: other_cert,
            private_key: None,
            ownership_token: Secret::new("token-old".into()),
        },
        private_key: None,
        created_unix: unix_now(),
        token_expires_unix: unix_now() + 3000,
        registered: None,
    })
    .unwrap();
    let mut sim = sim;
    let mut flow = tested(external_spec(&sim, &dir), Some(j));
    let p = sim.run(&mut flow).unwrap();
    assert!(!p.resumed);
    assert_eq!(sim.steps()[0], Step::Restarting);
    assert!(
        sim.logs.iter().any(|l| l.contains("another key")),
        "{:?}",
        sim.logs
    );
}
