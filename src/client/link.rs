//! One connection of the built-in transport, as every loop of it sees it: which SUBSCRIBE is in
//! flight, its SUBACK matched by packet id, errors mapped to the library's, and the replies read
//! together with a close kept rather than lost.
//!
//! rumqttc's packet codecs (`mqttbytes`, MQTT 3.1.1 and 5) and its session state (`MqttState`:
//! packet ids, QoS 1 acknowledgements, keep-alive) do the MQTT; this file only moves their bytes
//! over rustls. Not rumqttc's `EventLoop`, because it waits for the CONNACK before it sends
//! anything else: here the flow's one SUBSCRIBE goes out in the same flight as the CONNECT
//! (section 3.1.4 of both versions allows it; a server that refuses the CONNECT drops it), which
//! saves a round trip.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rumqttc::tokio_rustls::{client::TlsStream, TlsConnector};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::{connection_error, Config, Credential, MqttVersion};
use crate::error::Error;
use crate::protocol::{MqttPacket, MqttRefusal};

use rumqttc::v5::mqttbytes::v5 as p5;

/// Largest packet sent or received: AWS IoT's 128 KB payload plus headers.
const MAX_PACKET: usize = 128 * 1024 + 2048;

/// How long a connection being closed may take to get its DISCONNECT out.
const DISCONNECT_GRACE: Duration = Duration::from_millis(300);

/// At most two requests are ever in flight; rumqttc sizes a table by this.
const MAX_INFLIGHT: u16 = 4;

/// An incoming PUBLISH.
pub(crate) struct Message {
    pub(crate) topic: String,
    pub(crate) payload: Bytes,
}

/// What a connection reported.
pub(crate) enum LinkEvent {
    /// The CONNACK of a connection being opened (accepted: a refusal is [`LinkEvent::Lost`]).
    Connected,
    /// The SUBACK of the SUBSCRIBE in flight: its filters, and their codes (below 0x80:
    /// granted).
    SubAck {
        filters: Vec<String>,
        codes: Vec<u8>,
    },
    /// An incoming PUBLISH.
    Message(Message),
    /// Anything else from the broker (PINGRESP, PUBACK): time passed.
    Other,
    /// The connection failed (`connecting`: before its CONNACK). `leftovers` are replies read
    /// in the same read as the close, in order: still worth handling.
    Lost {
        error: Error,
        connecting: bool,
        leftovers: Vec<Message>,
    },
}

/// Why a connection failed, before it is put in the user's words ([`connection_error`]).
#[derive(Debug)]
pub(crate) enum Fault {
    /// TCP, TLS (a TLS alert is inside) or a read or write.
    Io(std::io::Error),
    /// The host cannot be a TLS server name.
    ServerName(String),
    /// TCP, TLS and CONNACK took longer than the step timeout.
    Timeout,
    /// The server closed the connection.
    Closed,
    /// A reason code: CONNACK refusal, DISCONNECT, PUBACK refusal.
    Refused(MqttRefusal),
    /// What the server sent breaks the protocol (or no PINGRESP came in time).
    Protocol(String),
}

impl From<std::io::Error> for Fault {
    fn from(e: std::io::Error) -> Fault {
        Fault::Io(e)
    }
}

/// rumqttc's session state for the connection's MQTT version.
enum Session {
    V4(rumqttc::MqttState),
    V5(rumqttc::v5::MqttState),
}

/// A packet of either version (one at a time, briefly on the stack).
#[allow(clippy::large_enum_variant)]
enum Packet {
    V4(rumqttc::Packet),
    V5(p5::Packet),
}

/// A request not yet on the wire.
enum Out {
    Subscribe(Vec<String>),
    Publish { topic: String, payload: Vec<u8> },
    Ping,
    Disconnect,
}

type Stream = TlsStream<TcpStream>;
type Opening = Pin<Box<dyn Future<Output = Result<Stream, Fault>> + Send>>;

/// A connection opened by [`Link::open`]: not connected until [`LinkEvent::Connected`].
pub(crate) struct Link {
    /// The TCP connection and TLS handshake in progress (kept across polls, so that a
    /// [`Link::next`] dropped by a timer does not start them again).
    opening: Option<Opening>,
    stream: Option<Stream>,
    client_id: String,
    /// Until CONNACK.
    connecting: bool,
    /// When the connect times out: TCP, TLS and CONNACK together (set on the first poll).
    connect_deadline: Option<Instant>,
    connect_timeout: Duration,
    session: Session,
    /// Requests not yet on the wire, in order.
    queue: VecDeque<Out>,
    /// Bytes not yet written (kept across polls, so that nothing is written twice or lost).
    out: BytesMut,
    unflushed: bool,
    /// Bytes read, not yet a whole packet.
    input: BytesMut,
    /// Events to report, in order.
    ready: VecDeque<LinkEvent>,
    /// Reported lost: nothing more to do.
    dead: bool,
    keep_alive: Duration,
    ping_at: Option<Instant>,
    /// The SUBSCRIBE in flight: its filters, and its packet id once on the wire.
    pending: Option<(Vec<String>, Option<u16>)>,
    /// The filters of a SUBSCRIBE sent ahead of the flow's request for it.
    early: Option<Vec<String>>,
    /// The topics of the PUBLISHes awaiting their PUBACK, by packet id (for refusals).
    published: Vec<(u16, String)>,
    /// The endpoint and trust settings, for error messages.
    config: Config,
    /// Whose certificate this connection authenticates with.
    who: Credential,
}

impl Link {
    /// Opens a connection to `config`'s endpoint with credentials `tls`, the certificate of
    /// `who` (the first poll connects). An empty `client_id` gets a random one.
    pub(crate) fn open(
        config: &Config,
        tls: Arc<rustls::ClientConfig>,
        client_id: &str,
        who: Credential,
    ) -> Link {
        let client_id = if client_id.is_empty() {
            format!("fleetprov-{:016x}", super::random_u64())
        } else {
            client_id.to_owned()
        };
        // rumqttc makes room for 100 events up front (about 10 KB with MQTT 3.1.1 and 30 KB
        // with MQTT 5, whose packets are larger): a flow has a few at a time, so the queue
        // starts empty and grows as needed.
        let session = match config.mqtt_version {
            MqttVersion::V311 => {
                let mut state = rumqttc::MqttState::new(MAX_INFLIGHT, false);
                state.events = VecDeque::new();
                Session::V4(state)
            }
            MqttVersion::V5 => {
                let mut state = rumqttc::v5::MqttState::new(MAX_INFLIGHT, false);
                state.events = VecDeque::new();
                Session::V5(state)
            }
        };
        Link {
            opening: Some(Box::pin(open_stream(config.host.clone(), config.port, tls))),
            stream: None,
            client_id,
            connecting: true,
            connect_deadline: None,
            connect_timeout: Duration::from_secs(config.step_timeout.as_secs().max(1)),
            session,
            queue: VecDeque::new(),
            out: BytesMut::new(),
            unflushed: false,
            input: BytesMut::new(),
            ready: VecDeque::new(),
            dead: false,
            keep_alive: config.keep_alive,
            ping_at: None,
            pending: None,
            early: None,
            published: Vec::new(),
            config: config.clone(),
            who,
        }
    }

    fn mqtt5(&self) -> bool {
        matches!(self.session, Session::V5(_))
    }

    /// Queues one SUBSCRIBE (QoS 1) with `filters`. Before the CONNACK it goes out right
    /// behind the CONNECT.
    pub(crate) fn subscribe(&mut self, filters: &[String]) -> Result<(), Error> {
        self.queue.push_back(Out::Subscribe(filters.to_vec()));
        self.pending = Some((filters.to_vec(), None));
        Ok(())
    }

    /// [`Link::subscribe`] ahead of the flow, in the CONNECT's flight: the flow asks for the
    /// same filters once connected, and [`Link::take_early`] tells it they are on their way.
    pub(crate) fn subscribe_early(&mut self, filters: &[String]) -> Result<(), Error> {
        self.early = Some(filters.to_vec());
        self.subscribe(filters)
    }

    /// Whether `filters` were subscribed early (answered or not: the SUBACK may be in already);
    /// true once only.
    pub(crate) fn take_early(&mut self, filters: &[String]) -> bool {
        match &self.early {
            Some(early) if early == filters => {
                self.early = None;
                true
            }
            _ => false,
        }
    }

    /// Queues one PUBLISH (QoS 1, not retained).
    pub(crate) fn publish(&mut self, topic: &str, payload: &[u8]) -> Result<(), Error> {
        self.queue.push_back(Out::Publish {
            topic: topic.to_owned(),
            payload: payload.to_vec(),
        });
        Ok(())
    }

    /// Drives the connection until it reports something. Cancel-safe: a call dropped before it
    /// returns loses nothing, and the next call goes on where it stopped.
    pub(crate) async fn next(&mut self) -> LinkEvent {
        // Bounded: each turn reports, fails, or waits for the network or a timer.
        loop {
            if let Some(event) = self.ready.pop_front() {
                return event;
            }
            if self.dead {
                // The caller drops a lost link; until then it has nothing more to say.
                std::future::pending::<()>().await;
            }
            if let Err(e) = self.turn().await {
                self.fail(e);
            }
        }
    }

    /// One step: connect, write what is queued, or read (or ping).
    async fn turn(&mut self) -> Result<(), Fault> {
        let deadline = *self
            .connect_deadline
            .get_or_insert_with(|| Instant::now() + self.connect_timeout);
        if let Some(opening) = &mut self.opening {
            let stream = tokio::select! {
                r = opening => r?,
                _ = tokio::time::sleep_until(deadline) => return Err(Fault::Timeout),
            };
            self.opening = None;
            self.stream = Some(stream);
            self.write_connect()?;
        }
        // Everything queued goes out now, behind the CONNECT: before the CONNACK too.
        while let Some(out) = self.queue.pop_front() {
            self.send(out)?;
        }
        let Some(stream) = &mut self.stream else {
            return Err(Fault::Protocol("no connection".into()));
        };
        while !self.out.is_empty() {
            if stream.write_buf(&mut self.out).await? == 0 {
                return Err(std::io::Error::from(std::io::ErrorKind::WriteZero).into());
            }
        }
        if self.unflushed {
            stream.flush().await?;
            self.unflushed = false;
        }
        let wake = if self.connecting {
            Some(deadline)
        } else {
            self.ping_at
        };
        let read = tokio::select! {
            r = stream.read_buf(&mut self.input) => r?,
            _ = sleep_until(wake) => {
                if self.connecting {
                    return Err(Fault::Timeout);
                }
                self.ping_at = Some(Instant::now() + self.keep_alive);
                self.queue.push_back(Out::Ping);
                return Ok(());
            }
        };
        let parsed = self.parse();
        if read == 0 {
            parsed?;
            return Err(Fault::Closed);
        }
        parsed
    }

    fn write_connect(&mut self) -> Result<(), Fault> {
        let keep_alive = u16::try_from(self.keep_alive.as_secs()).unwrap_or(u16::MAX);
        let client_id = self.client_id.clone();
        match &self.session {
            Session::V4(_) => {
                let mut connect = rumqttc::Connect::new(client_id);
                connect.keep_alive = keep_alive;
                connect.clean_session = true;
                self.encode4(&rumqttc::Packet::Connect(connect))
            }
            Session::V5(_) => {
                let connect = p5::Connect {
                    keep_alive,
                    client_id,
                    clean_start: true,
                    properties: None,
                };
                self.encode5(&p5::Packet::Connect(connect, None, None))
            }
        }
    }

    /// Puts one request on the wire (in `out`), through rumqttc's session state.
    fn send(&mut self, out: Out) -> Result<(), Fault> {
        let topic = match &out {
            Out::Publish { topic, .. } => Some(topic.clone()),
            _ => None,
        };
        let packet = match &mut self.session {
            Session::V4(state) => {
                use rumqttc::{QoS, Request};
                let request = match out {
                    Out::Subscribe(filters) => Request::Subscribe(rumqttc::Subscribe::new_many(
                        filters
                            .into_iter()
                            .map(|f| rumqttc::SubscribeFilter::new(f, QoS::AtLeastOnce)),
                    )),
                    Out::Publish { topic, payload } => {
                        Request::Publish(rumqttc::Publish::new(topic, QoS::AtLeastOnce, payload))
                    }
                    Out::Ping => Request::PingReq(rumqttc::PingReq),
                    Out::Disconnect => Request::Disconnect(rumqttc::Disconnect),
                };
                let packet = state.handle_outgoing_packet(request);
                // Only outgoing events: nothing to report.
                state.events.clear();
                packet
                    .map_err(|e| Fault::Protocol(e.to_string()))?
                    .map(Packet::V4)
            }
            Session::V5(state) => {
                use rumqttc::v5::mqttbytes::QoS;
                use rumqttc::v5::Request;
                let request = match out {
                    Out::Subscribe(filters) => Request::Subscribe(p5::Subscribe::new_many(
                        filters
                            .into_iter()
                            .map(|f| p5::Filter::new(f, QoS::AtLeastOnce)),
                        None,
                    )),
                    Out::Publish { topic, payload } => {
                        Request::Publish(p5::Publish::new(topic, QoS::AtLeastOnce, payload, None))
                    }
                    Out::Ping => Request::PingReq,
                    Out::Disconnect => Request::Disconnect,
                };
                let packet = state.handle_outgoing_packet(request);
                state.events.clear();
                packet
                    .map_err(|e| Fault::Protocol(e.to_string()))?
                    .map(Packet::V5)
            }
        };
        let Some(packet) = packet else {
            return Ok(());
        };
        let (pkid, subscribe) = match &packet {
            Packet::V4(rumqttc::Packet::Publish(p)) => (Some(p.pkid), false),
            Packet::V4(rumqttc::Packet::Subscribe(s)) => (Some(s.pkid), true),
            Packet::V5(p5::Packet::Publish(p)) => (Some(p.pkid), false),
            Packet::V5(p5::Packet::Subscribe(s)) => (Some(s.pkid), true),
            _ => (None, false),
        };
        match &packet {
            Packet::V4(p) => self.encode4(p)?,
            Packet::V5(p) => self.encode5(p)?,
        }
        if let Some(pkid) = pkid {
            if subscribe {
                if let Some((_, id @ None)) = &mut self.pending {
                    *id = Some(pkid);
                }
            } else if let Some(topic) = topic {
                self.published.retain(|(id, _)| *id != pkid);
                self.published.push((pkid, topic));
            }
        }
        Ok(())
    }

    /// Handles every whole packet read so far.
    fn parse(&mut self) -> Result<(), Fault> {
        // Bounded by the bytes read: each packet taken consumes some.
        loop {
            let more = match self.session {
                Session::V4(_) => self.parse4()?,
                Session::V5(_) => self.parse5()?,
            };
            if !more {
                return Ok(());
            }
        }
    }

    /// One MQTT 3.1.1 packet, if a whole one was read.
    fn parse4(&mut self) -> Result<bool, Fault> {
        use rumqttc::Packet;
        let packet = match Packet::read(&mut self.input, MAX_PACKET) {
            Ok(p) => p,
            Err(rumqttc::Error::InsufficientBytes(_)) => return Ok(false),
            Err(rumqttc::Error::PayloadSizeLimitExceeded(size)) => return Err(too_large(size)),
            Err(e) => return Err(Fault::Protocol(e.to_string())),
        };
        if self.connecting {
            let Packet::ConnAck(ack) = packet else {
                return Err(Fault::Protocol(format!(
                    "expected CONNACK, received {packet:?}"
                )));
            };
            let code = match ack.code {
                rumqttc::ConnectReturnCode::Success => {
                    self.connected(None);
                    return Ok(true);
                }
                rumqttc::ConnectReturnCode::RefusedProtocolVersion => 1,
                rumqttc::ConnectReturnCode::BadClientId => 2,
                rumqttc::ConnectReturnCode::ServiceUnavailable => 3,
                rumqttc::ConnectReturnCode::BadUserNamePassword => 4,
                rumqttc::ConnectReturnCode::NotAuthorized => 5,
            };
            return Err(self.refused(
                "refused the MQTT connection",
                MqttPacket::ConnAck,
                code,
                None,
            ));
        }
        let Session::V4(state) = &mut self.session else {
            return Ok(false);
        };
        let reply = state
            .handle_incoming_packet(packet)
            .map_err(|e| Fault::Protocol(e.to_string()))?;
        let events: Vec<rumqttc::Event> = state.events.drain(..).collect();
        if let Some(reply) = reply {
            self.encode4(&reply)?;
        }
        for event in events {
            let rumqttc::Event::Incoming(packet) = event else {
                continue;
            };
            match packet {
                Packet::SubAck(ack) => {
                    let codes = ack
                        .return_codes
                        .iter()
                        .map(|c| match c {
                            rumqttc::SubscribeReasonCode::Success(qos) => *qos as u8,
                            rumqttc::SubscribeReasonCode::Failure => 0x80,
                        })
                        .collect();
                    self.suback(ack.pkid, codes);
                }
                Packet::Publish(p) => self.ready.push_back(LinkEvent::Message(Message {
                    topic: p.topic,
                    payload: p.payload,
                })),
                Packet::PubAck(ack) => self.acked(ack.pkid),
                _ => self.ready.push_back(LinkEvent::Other),
            }
        }
        Ok(true)
    }

    /// One MQTT 5 packet, if a whole one was read.
    fn parse5(&mut self) -> Result<bool, Fault> {
        use p5::Packet;
        let max = Some(MAX_PACKET as u32);
        let packet = match Packet::read(&mut self.input, max) {
            Ok(p) => p,
            Err(rumqttc::v5::mqttbytes::Error::InsufficientBytes(_)) => return Ok(false),
            Err(rumqttc::v5::mqttbytes::Error::PayloadSizeLimitExceeded { pkt_size, .. }) => {
                return Err(too_large(pkt_size))
            }
            Err(e) => return Err(Fault::Protocol(e.to_string())),
        };
        match (&packet, self.connecting) {
            (Packet::ConnAck(ack), true) => {
                if ack.code != p5::ConnectReturnCode::Success {
                    let reason = ack
                        .properties
                        .as_ref()
                        .and_then(|p| p.reason_string.clone());
                    return Err(self.refused(
                        "refused the MQTT connection",
                        MqttPacket::ConnAck,
                        connack_code(ack.code),
                        reason,
                    ));
                }
                let server_keep_alive = ack.properties.as_ref().and_then(|p| p.server_keep_alive);
                if let Session::V5(state) = &mut self.session {
                    // Takes the server's limits (receive maximum, topic aliases).
                    let _ = state.handle_incoming_packet(packet);
                    state.events.clear();
                }
                self.connected(server_keep_alive);
                return Ok(true);
            }
            (_, true) => {
                return Err(Fault::Protocol(format!(
                    "expected CONNACK, received {packet:?}"
                )))
            }
            (Packet::Disconnect(d), false) => {
                let reason = d.properties.as_ref().and_then(|p| p.reason_string.clone());
                return Err(self.refused(
                    "ended the MQTT connection",
                    MqttPacket::Disconnect,
                    d.reason_code as u8,
                    reason,
                ));
            }
            (Packet::PubAck(ack), false) => {
                let code = puback_code(ack.reason);
                if code >= 0x80 {
                    let reason = ack
                        .properties
                        .as_ref()
                        .and_then(|p| p.reason_string.clone());
                    let topic = self
                        .published
                        .iter()
                        .find(|(id, _)| *id == ack.pkid)
                        .map(|(_, t)| t.clone())
                        .unwrap_or_default();
                    let what = format!("refused the PUBLISH to {topic}");
                    return Err(self.refused(&what, MqttPacket::PubAck, code, reason));
                }
            }
            _ => {}
        }
        let Session::V5(state) = &mut self.session else {
            return Ok(false);
        };
        let reply = state
            .handle_incoming_packet(packet)
            .map_err(|e| Fault::Protocol(e.to_string()))?;
        let events: Vec<rumqttc::v5::Event> = state.events.drain(..).collect();
        if let Some(reply) = reply {
            self.encode5(&reply)?;
        }
        for event in events {
            let rumqttc::v5::Event::Incoming(packet) = event else {
                continue;
            };
            match packet {
                Packet::SubAck(ack) => {
                    let codes = ack.return_codes.iter().map(|c| suback_code(*c)).collect();
                    self.suback(ack.pkid, codes);
                }
                Packet::Publish(p) => self.ready.push_back(LinkEvent::Message(Message {
                    topic: String::from_utf8_lossy(&p.topic).into_owned(),
                    payload: p.payload,
                })),
                Packet::PubAck(ack) => self.acked(ack.pkid),
                _ => self.ready.push_back(LinkEvent::Other),
            }
        }
        Ok(true)
    }

    /// The CONNACK accepted the connection; `server_keep_alive` (MQTT 5) replaces ours.
    fn connected(&mut self, server_keep_alive: Option<u16>) {
        self.connecting = false;
        if let Some(seconds) = server_keep_alive {
            self.keep_alive = Duration::from_secs(u64::from(seconds));
        }
        if !self.keep_alive.is_zero() {
            self.ping_at = Some(Instant::now() + self.keep_alive);
        }
        self.ready.push_back(LinkEvent::Connected);
    }

    fn suback(&mut self, pkid: u16, codes: Vec<u8>) {
        let event = match self.pending.take() {
            Some((filters, Some(id))) if id == pkid => LinkEvent::SubAck { filters, codes },
            other => {
                self.pending = other;
                LinkEvent::Other
            }
        };
        self.ready.push_back(event);
    }

    fn acked(&mut self, pkid: u16) {
        self.published.retain(|(id, _)| *id != pkid);
        self.ready.push_back(LinkEvent::Other);
    }

    /// The server's refusal: `what` it did ("refused the MQTT connection"), after the endpoint.
    fn refused(&self, what: &str, packet: MqttPacket, code: u8, reason: Option<String>) -> Fault {
        Fault::Refused(MqttRefusal {
            context: format!("{}:{} {what}", self.config.host, self.config.port),
            packet,
            reason_code: code,
            mqtt5: self.mqtt5(),
            reason_string: reason,
            note: String::new(),
        })
    }

    /// Serialises an MQTT 3.1.1 packet behind what is waiting to be written.
    fn encode4(&mut self, packet: &rumqttc::Packet) -> Result<(), Fault> {
        packet
            .write(&mut self.out, MAX_PACKET)
            .map_err(|e| Fault::Protocol(e.to_string()))?;
        self.unflushed = true;
        Ok(())
    }

    /// Serialises an MQTT 5 packet behind what is waiting to be written.
    fn encode5(&mut self, packet: &p5::Packet) -> Result<(), Fault> {
        packet
            .write(&mut self.out, Some(MAX_PACKET as u32))
            .map_err(|e| Fault::Protocol(e.to_string()))?;
        self.unflushed = true;
        Ok(())
    }

    /// The connection failed with `fault`: replies read before it stay to be handled (as
    /// [`LinkEvent::Lost`]'s leftovers, with nothing else after them).
    fn fail(&mut self, fault: Fault) {
        let mut leftovers = Vec::new();
        let mut connected = false;
        for event in self.ready.drain(..) {
            match event {
                LinkEvent::Message(p) => leftovers.push(p),
                LinkEvent::Connected => connected = true,
                _ => {}
            }
        }
        self.opening = None;
        self.stream = None;
        self.queue.clear();
        self.out.clear();
        if connected {
            // A CONNACK read together with the close: reported, then the loss.
            self.ready.push_back(LinkEvent::Connected);
        }
        self.ready.push_back(LinkEvent::Lost {
            error: connection_error(fault, &self.config, self.who),
            connecting: self.connecting,
            leftovers,
        });
        self.dead = true;
    }

    /// Sends DISCONNECT and lets it out, for [`DISCONNECT_GRACE`] at most.
    pub(crate) async fn close(mut self) {
        if self.connecting || self.dead || self.stream.is_none() {
            return;
        }
        let _ = tokio::time::timeout(DISCONNECT_GRACE, async {
            self.send(Out::Disconnect).ok()?;
            let stream = self.stream.as_mut()?;
            stream.write_all_buf(&mut self.out).await.ok()?;
            stream.flush().await.ok()?;
            stream.shutdown().await.ok()
        })
        .await;
    }

    /// Closes the connection without waiting (dropping the socket).
    pub(crate) fn abandon(self) {}
}

/// An MQTT 5 CONNACK reason code's number.
fn connack_code(code: p5::ConnectReturnCode) -> u8 {
    use p5::ConnectReturnCode as C;
    match code {
        C::Success => 0x00,
        C::RefusedProtocolVersion | C::UnsupportedProtocolVersion => 0x84,
        C::BadClientId | C::ClientIdentifierNotValid => 0x85,
        C::ServiceUnavailable | C::ServerUnavailable => 0x88,
        C::UnspecifiedError => 0x80,
        C::MalformedPacket => 0x81,
        C::ProtocolError => 0x82,
        C::ImplementationSpecificError => 0x83,
        C::BadUserNamePassword => 0x86,
        C::NotAuthorized => 0x87,
        C::ServerBusy => 0x89,
        C::Banned => 0x8A,
        C::BadAuthenticationMethod => 0x8C,
        C::TopicNameInvalid => 0x90,
        C::PacketTooLarge => 0x95,
        C::QuotaExceeded => 0x97,
        C::PayloadFormatInvalid => 0x99,
        C::RetainNotSupported => 0x9A,
        C::QoSNotSupported => 0x9B,
        C::UseAnotherServer => 0x9C,
        C::ServerMoved => 0x9D,
        C::ConnectionRateExceeded => 0x9F,
    }
}

/// An MQTT 5 PUBACK reason code's number.
fn puback_code(code: p5::PubAckReason) -> u8 {
    use p5::PubAckReason as R;
    match code {
        R::Success => 0x00,
        R::NoMatchingSubscribers => 0x10,
        R::UnspecifiedError => 0x80,
        R::ImplementationSpecificError => 0x83,
        R::NotAuthorized => 0x87,
        R::TopicNameInvalid => 0x90,
        R::PacketIdentifierInUse => 0x91,
        R::QuotaExceeded => 0x97,
        R::PayloadFormatInvalid => 0x99,
    }
}

/// An MQTT 5 SUBACK reason code's number.
fn suback_code(code: p5::SubscribeReasonCode) -> u8 {
    use p5::SubscribeReasonCode as S;
    match code {
        S::Success(qos) => qos as u8,
        S::Failure | S::Unspecified => 0x80,
        S::ImplementationSpecific => 0x83,
        S::NotAuthorized => 0x87,
        S::TopicFilterInvalid => 0x8F,
        S::PkidInUse => 0x91,
        S::QuotaExceeded => 0x97,
        S::SharedSubscriptionsNotSupported => 0x9E,
        S::SubscriptionIdNotSupported => 0xA1,
        S::WildcardSubscriptionsNotSupported => 0xA2,
    }
}

/// An incoming packet above [`MAX_PACKET`] (AWS IoT's payload limit plus headers).
fn too_large(size: usize) -> Fault {
    Fault::Protocol(format!(
        "the server sent a packet of {size} bytes: payload size limit exceeded (at most \
         {MAX_PACKET} bytes, AWS IoT's 128 KB payload and headers)"
    ))
}

/// `sleep_until(at)`, or never.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// TCP (Nagle off: each packet is written whole) then TLS to `host:port`.
async fn open_stream(
    host: String,
    port: u16,
    tls: Arc<rustls::ClientConfig>,
) -> Result<Stream, Fault> {
    let tcp = TcpStream::connect((host.as_str(), port)).await?;
    // Nagle's algorithm only delays the RegisterThing request behind the certificate reply's
    // PUBACK until the server's delayed ACK (40 ms on Linux).
    tcp.set_nodelay(true)?;
    let name = rustls::pki_types::ServerName::try_from(host)
        .map_err(|e| Fault::ServerName(e.to_string()))?;
    Ok(TlsConnector::from(tls).connect(name, tcp).await?)
}
