//! The one driver: performs a [`Flow`]'s actions on a [`Transport`] and a [`Storage`], feeds it
//! what they report, and hands progress and log lines to the caller's callbacks.
//!
//! Every transport is an adapter to this: the built-in one (rumqttc over rustls, in
//! [`crate::client`]) and the firmware's own MQTT stack behind the C host API
//! ([`crate::ffi`]'s `fleetprov_host`). What the flow does, in what order, with which logs, is
//! therefore the same whoever carries its packets.

use std::collections::VecDeque;

use crate::engine::flow::{
    Flow, FlowAction, FlowEvent, Identity, Progress, Provisioned, StoreAction,
};
use crate::engine::LogLevel;
use crate::error::Error;
use crate::store::{Storage, StoredPaths};

/// Receives log lines. Lines never contain private keys or ownership tokens.
pub type LogFn = std::sync::Arc<dyn Fn(LogLevel, &str) + Send + Sync>;
/// Receives each step reached, with its attempt (and, when retrying, the pause and the cause).
pub type ProgressFn = std::sync::Arc<dyn Fn(&Progress) + Send + Sync>;

/// An MQTT connection the flow's packets travel over. Each method starts the operation and
/// returns at once; what then happens comes back to [`Driver::handle`] as a [`FlowEvent`].
pub trait Transport {
    /// Drops any current connection and opens one with `identity` (clean session). An error
    /// counts as a failed connection attempt ([`FlowEvent::ConnectFailed`]). `subscribe`: the
    /// filters the flow will subscribe to once connected, which the transport may send behind
    /// the CONNECT (see [`FlowAction::Connect`]) or ignore.
    fn connect(&mut self, identity: Identity, subscribe: &[String]) -> Result<(), Error>;
    /// Closes the current connection; no event is expected for it afterwards.
    fn disconnect(&mut self);
    /// Sends one SUBSCRIBE (QoS 1) with these filters. An error counts as a lost connection.
    fn subscribe(&mut self, filters: &[String]) -> Result<(), Error>;
    /// Publishes at QoS 1, not retained. An error counts as a lost connection.
    fn publish(&mut self, topic: &str, payload: &[u8]) -> Result<(), Error>;
}

/// A flow with its storage and the caller's callbacks.
pub struct Driver {
    flow: Flow,
    storage: Box<dyn Storage + Send>,
    progress: Option<ProgressFn>,
    log: Option<LogFn>,
    result: Option<Result<Provisioned, Error>>,
}

impl std::fmt::Debug for Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driver")
            .field("flow", &self.flow)
            .finish_non_exhaustive()
    }
}

/// Most actions one event can lead to, counting those the transport's failures feed back: a
/// bound on a loop that always ends far sooner (an event yields a handful).
const MAX_ACTIONS_PER_EVENT: usize = 10_000;

impl Driver {
    pub fn new(
        flow: Flow,
        storage: Box<dyn Storage + Send>,
        progress: Option<ProgressFn>,
        log: Option<LogFn>,
    ) -> Driver {
        Driver {
            flow,
            storage,
            progress,
            log,
            result: None,
        }
    }

    /// Starts the flow at `now` (ms on the caller's monotonic clock).
    pub fn start(&mut self, now: u64, transport: &mut dyn Transport) {
        let actions = self.flow.start(now);
        self.perform(actions, now, transport);
    }

    /// Feeds one event.
    pub fn handle(&mut self, event: FlowEvent<'_>, now: u64, transport: &mut dyn Transport) {
        if self.result.is_some() {
            return;
        }
        let actions = self.flow.handle(event, now);
        self.perform(actions, now, transport);
    }

    /// When [`Driver::handle`] must get [`FlowEvent::Tick`] at the latest.
    pub fn wake_at(&self) -> Option<u64> {
        self.flow.wake_at()
    }

    /// See [`Flow::cancel_deferred`].
    pub fn cancel_deferred(&self) -> bool {
        self.flow.cancel_deferred()
    }

    pub fn is_finished(&self) -> bool {
        self.flow.is_finished()
    }

    /// The outcome, once the flow finished (taken once).
    pub fn take_result(&mut self) -> Option<Result<Provisioned, Error>> {
        self.result.take()
    }

    /// A line for the caller's log.
    pub fn say(&self, level: LogLevel, line: &str) {
        if let Some(log) = &self.log {
            log(level, line);
        }
    }

    /// Performs a storage action; the result is the flow's [`FlowEvent::Stored`].
    fn store(&mut self, action: &StoreAction) -> Result<Option<StoredPaths>, Error> {
        let storage = self.storage.as_mut();
        match action {
            StoreAction::SaveJournal(entry) => storage.save_journal(entry).map(|()| None),
            StoreAction::RemoveJournal => storage.remove_journal().map(|()| None),
            StoreAction::Commit(set) => storage.commit(set),
        }
    }

    fn perform(&mut self, actions: Vec<FlowAction>, now: u64, transport: &mut dyn Transport) {
        let mut queue: VecDeque<FlowAction> = actions.into();
        for _ in 0..MAX_ACTIONS_PER_EVENT {
            let Some(action) = queue.pop_front() else {
                return;
            };
            let feed = match action {
                FlowAction::Connect {
                    identity,
                    subscribe,
                } => transport
                    .connect(identity, &subscribe)
                    .err()
                    .map(FlowEvent::ConnectFailed),
                FlowAction::Disconnect => {
                    transport.disconnect();
                    None
                }
                FlowAction::Subscribe(filters) => {
                    self.say(LogLevel::Debug, &format!("subscribing to {filters:?}"));
                    transport
                        .subscribe(&filters)
                        .err()
                        .map(FlowEvent::Disconnected)
                }
                FlowAction::Publish { topic, payload } => {
                    let line = format!("publishing to {topic} ({} bytes)", payload.len());
                    self.say(LogLevel::Debug, &line);
                    transport
                        .publish(&topic, &payload)
                        .err()
                        .map(FlowEvent::Disconnected)
                }
                FlowAction::Store(action) => Some(FlowEvent::Stored(self.store(&action))),
                FlowAction::Progress(p) => {
                    self.say(LogLevel::Debug, &format!("step: {}", p.step.doing()));
                    if let Some(cb) = &self.progress {
                        cb(&p);
                    }
                    None
                }
                FlowAction::Log(level, line) => {
                    self.say(level, &line);
                    None
                }
                FlowAction::Done(result) => {
                    self.result = Some(result);
                    None
                }
            };
            if let Some(event) = feed {
                queue.extend(self.flow.handle(event, now));
            }
        }
        // Unreachable in practice; a flow that will not settle is a bug, not a hang.
        self.result = Some(Err(Error::Internal(
            "the flow produced actions without end".into(),
        )));
    }
}
