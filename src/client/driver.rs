//! Runs a [`Flow`] over the built-in transport: rumqttc over rustls, on a current-thread tokio
//! runtime in the calling thread.

use std::collections::VecDeque;
use std::sync::Arc;

use rumqttc::{AsyncClient, Event as MqttEvent, EventLoop, Outgoing, Packet, QoS};

use super::{
    Cancel, Config, LogFn, LogLevel, ProgressFn, at_ms, connection_error, granted,
    leftover_publishes, now_ms, open_connection, tls,
};
use crate::engine::flow::{Flow, FlowAction, FlowEvent, Identity, Provisioned};
use crate::error::Error;

/// One connection the flow asked for.
struct Live {
    client: AsyncClient,
    events: EventLoop,
    /// Until CONNACK.
    connecting: bool,
    /// The SUBSCRIBE in flight: its filters, and its packet id once rumqttc assigns it.
    pending: Option<(Vec<String>, Option<u16>)>,
}

impl Live {
    fn close(self) {
        // Best effort: the DISCONNECT is queued; dropping the event loop closes the socket.
        let _ = self.client.try_disconnect();
    }
}

/// A current-thread runtime for the built-in transport. Its blocking pool (host name lookups)
/// lets idle threads go at once rather than keeping one per device for 10 s.
pub(crate) fn runtime() -> Result<tokio::runtime::Runtime, Error> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .thread_keep_alive(std::time::Duration::ZERO)
        .build()
        .map_err(|e| Error::Internal(format!("cannot start the I/O runtime: {e}")))
}

/// Performs the flow's actions and feeds it the connection's events until it is done, on a
/// runtime of its own in the calling thread.
pub(crate) fn run_flow(
    flow: Flow,
    config: &Config,
    progress: Option<&ProgressFn>,
    log: Option<&LogFn>,
    cancel: &Arc<Cancel>,
) -> Result<Provisioned, Error> {
    let runtime = runtime()?;
    runtime.block_on(drive(flow, config, progress, log, cancel))
}

/// How long a cancel waits for the reply of a request on the wire (a certificate request or
/// RegisterThing, see [`Flow::cancel_deferred`]) before it stops anyway.
const CANCEL_GRACE_MS: u64 = 1_000;

/// [`run_flow`] as a future, for running many flows on one runtime.
pub(crate) async fn drive(
    mut flow: Flow,
    config: &Config,
    progress: Option<&ProgressFn>,
    log: Option<&LogFn>,
    cancel: &Arc<Cancel>,
) -> Result<Provisioned, Error> {
    let say = |level: LogLevel, line: &str| {
        if let Some(log) = log {
            log(level, line);
        }
    };
    let alpn = config.alpn.unwrap_or(config.port == 443);
    let claim_tls = tls::client_config(&config.roots, &config.cert_pem, &config.key_pem, alpn)?;
    let mut actions: VecDeque<FlowAction> = flow.start(now_ms()).into();
    let mut conn: Option<Live> = None;
    // When a deferred cancel stops waiting for the reply in flight.
    let mut grace_until: Option<u64> = None;
    let result = async {
        loop {
            while let Some(action) = actions.pop_front() {
                match action {
                    FlowAction::Connect(identity) => {
                        if let Some(old) = conn.take() {
                            old.close();
                        }
                        let (tls, client_id) = match identity {
                            Identity::Claim => (claim_tls.clone(), config.client_id.clone()),
                            Identity::Device {
                                certificate_pem,
                                private_key,
                                client_id,
                            } => {
                                let tls = match &private_key {
                                    Some(key) => tls::client_config(
                                        &config.roots,
                                        &certificate_pem,
                                        key,
                                        alpn,
                                    ),
                                    None => Err(Error::InvalidArgument(
                                        "the built-in transport needs the private key".into(),
                                    )),
                                };
                                match tls {
                                    Ok(tls) => (tls, client_id),
                                    Err(e) => {
                                        actions.extend(
                                            flow.handle(FlowEvent::ConnectFailed(e), now_ms()),
                                        );
                                        continue;
                                    }
                                }
                            }
                        };
                        say(
                            LogLevel::Info,
                            &format!("connecting to {}:{}", config.host, config.port),
                        );
                        let (client, events) = open_connection(config, tls, &client_id);
                        conn = Some(Live {
                            client,
                            events,
                            connecting: true,
                            pending: None,
                        });
                    }
                    FlowAction::Disconnect => {
                        if let Some(old) = conn.take() {
                            old.close();
                        }
                    }
                    FlowAction::Subscribe(filters) => {
                        say(LogLevel::Debug, &format!("subscribing to {filters:?}"));
                        if let Some(c) = &mut conn {
                            let subs = filters.iter().map(|f| {
                                rumqttc::SubscribeFilter::new(f.clone(), QoS::AtLeastOnce)
                            });
                            if let Err(e) = c.client.try_subscribe_many(subs) {
                                conn = None;
                                let e = Error::Connection(e.to_string());
                                actions.extend(flow.handle(FlowEvent::Disconnected(e), now_ms()));
                                continue;
                            }
                            c.pending = Some((filters, None));
                        }
                    }
                    FlowAction::Publish { topic, payload } => {
                        say(
                            LogLevel::Debug,
                            &format!("publishing to {topic} ({} bytes)", payload.len()),
                        );
                        if let Some(c) = &mut conn
                            && let Err(e) = c.client.try_publish(
                                topic,
                                QoS::AtLeastOnce,
                                false,
                                payload.to_vec(),
                            )
                        {
                            conn = None;
                            let e = Error::Connection(e.to_string());
                            actions.extend(flow.handle(FlowEvent::Disconnected(e), now_ms()));
                        }
                    }
                    FlowAction::Progress(p) => {
                        say(LogLevel::Debug, &format!("step: {}", p.step.doing()));
                        if let Some(cb) = progress {
                            cb(&p);
                        }
                    }
                    FlowAction::Log(level, line) => say(level, &line),
                    FlowAction::Done(result) => return result,
                }
            }
            // Bounded by the flow: every wait ends at its wake time at the latest.
            let mut wake = flow
                .wake_at()
                .unwrap_or_else(|| now_ms().saturating_add(1000));
            // A cancel is honoured between steps. While a request whose reply the device needs
            // is on the wire (Flow::cancel_deferred) it waits for that reply, CANCEL_GRACE_MS at
            // most.
            let deferred = flow.cancel_deferred();
            if cancel.is_cancelled() {
                if !deferred {
                    return Err(Error::Cancelled);
                }
                let until = *grace_until.get_or_insert_with(|| now_ms() + CANCEL_GRACE_MS);
                if now_ms() >= until {
                    return Err(Error::Cancelled);
                }
                wake = wake.min(until);
            }
            // Past this point a cancel seen is a deferred one: wake for new cancels only.
            let cancellable = !cancel.is_cancelled();
            let event = match &mut conn {
                Some(c) => tokio::select! {
                    ev = c.events.poll() => Some(ev),
                    _ = tokio::time::sleep_until(at_ms(wake)) => None,
                    _ = cancel.wait(), if cancellable => continue,
                },
                None => tokio::select! {
                    _ = tokio::time::sleep_until(at_ms(wake)) => None,
                    _ = cancel.wait(), if cancellable => continue,
                },
            };
            let now = now_ms();
            let produced = match (event, &mut conn) {
                (None, _) | (Some(_), None) => flow.handle(FlowEvent::Tick, now),
                (Some(Ok(MqttEvent::Incoming(Packet::ConnAck(_)))), Some(c)) if c.connecting => {
                    c.connecting = false;
                    say(LogLevel::Info, "connected");
                    flow.handle(FlowEvent::Connected, now)
                }
                (Some(Ok(MqttEvent::Outgoing(Outgoing::Subscribe(pkid)))), Some(c)) => {
                    if let Some((_, id @ None)) = &mut c.pending {
                        *id = Some(pkid);
                    }
                    Vec::new()
                }
                (Some(Ok(MqttEvent::Incoming(Packet::SubAck(ack)))), Some(c)) => match &c.pending {
                    Some((_, Some(pkid))) if *pkid == ack.pkid => {
                        c.pending = None;
                        flow.handle(FlowEvent::SubAck(&granted(&ack)), now)
                    }
                    _ => Vec::new(),
                },
                (Some(Ok(MqttEvent::Incoming(Packet::Publish(p)))), Some(_)) => {
                    say(
                        LogLevel::Debug,
                        &format!("received on {} ({} bytes)", p.topic, p.payload.len()),
                    );
                    flow.handle(
                        FlowEvent::Message {
                            topic: &p.topic,
                            payload: &p.payload,
                        },
                        now,
                    )
                }
                (Some(Ok(_)), Some(_)) => flow.handle(FlowEvent::Tick, now),
                (Some(Err(e)), Some(c)) => {
                    let connecting = c.connecting;
                    // Replies read in the same read as the close are still worth having.
                    let mut produced = Vec::new();
                    for p in leftover_publishes(&mut c.events) {
                        produced.extend(flow.handle(
                            FlowEvent::Message {
                                topic: &p.topic,
                                payload: &p.payload,
                            },
                            now,
                        ));
                    }
                    conn = None;
                    let err = connection_error(e);
                    if connecting {
                        say(LogLevel::Warn, &format!("connection failed: {err}"));
                        produced.extend(flow.handle(FlowEvent::ConnectFailed(err), now));
                    } else {
                        say(LogLevel::Warn, &format!("connection lost: {err}"));
                        produced.extend(flow.handle(FlowEvent::Disconnected(err), now));
                    }
                    produced
                }
            };
            actions.extend(produced);
        }
    }
    .await;
    if let Some(Live {
        client, mut events, ..
    }) = conn.take()
    {
        super::close(&client, &mut events).await;
    }
    result
}
