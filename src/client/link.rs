//! One connection of the built-in transport, as every loop of it sees it: which SUBSCRIBE is in
//! flight, its SUBACK matched by packet id, errors mapped to the library's, and the replies read
//! together with a close kept rather than lost.
//!
//! rumqttc's packet codec (`mqttbytes`) and its session state ([`MqttState`]: packet ids, QoS 1
//! acknowledgements, keep-alive) do the MQTT; this file only moves their bytes over rustls. Not
//! rumqttc's `EventLoop`, because it waits for the CONNACK before it sends anything else: here the
//! flow's one SUBSCRIBE goes out in the same flight as the CONNECT (MQTT 3.1.1 section 3.1.4
//! allows it; the server drops it if it refuses the CONNECT), which saves a round trip.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use rumqttc::tokio_rustls::{client::TlsStream, TlsConnector};
use rumqttc::{
    Connect, ConnectReturnCode, ConnectionError, Disconnect, Event as MqttEvent, MqttState, Packet,
    PingReq, Publish, QoS, Request, StateError, Subscribe, SubscribeFilter,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::{connection_error, granted, Config, Credential};
use crate::error::Error;

/// Largest packet sent or received: AWS IoT's 128 KB payload plus headers.
const MAX_PACKET: usize = 128 * 1024 + 2048;

/// How long a connection being closed may take to get its DISCONNECT out.
const DISCONNECT_GRACE: Duration = Duration::from_millis(300);

/// At most two requests are ever in flight; rumqttc sizes a table by this.
const MAX_INFLIGHT: u16 = 4;

/// What a connection reported.
pub(crate) enum LinkEvent {
    /// The CONNACK of a connection being opened (accepted: a refusal is [`LinkEvent::Lost`]).
    Connected,
    /// The SUBACK of the SUBSCRIBE in flight: its filters, and each granted (true) or refused.
    SubAck {
        filters: Vec<String>,
        granted: Vec<bool>,
    },
    /// An incoming PUBLISH.
    Message(rumqttc::Publish),
    /// Anything else from the broker (PINGRESP, PUBACK): time passed.
    Other,
    /// The connection failed (`connecting`: before its CONNACK). `leftovers` are replies read
    /// in the same read as the close, in order: still worth handling.
    Lost {
        error: Error,
        connecting: bool,
        leftovers: Vec<rumqttc::Publish>,
    },
}

type Stream = TlsStream<TcpStream>;
type Opening = Pin<Box<dyn Future<Output = Result<Stream, ConnectionError>> + Send>>;

/// A connection opened by [`Link::open`]: not connected until [`LinkEvent::Connected`].
pub(crate) struct Link {
    /// The TCP connection and TLS handshake in progress (kept across polls, so that a
    /// [`Link::next`] dropped by a timer does not start them again).
    opening: Option<Opening>,
    stream: Option<Stream>,
    /// The CONNECT, written first once the stream is up.
    connect: Option<Connect>,
    /// Until CONNACK.
    connecting: bool,
    /// When the connect times out: TCP, TLS and CONNACK together (set on the first poll).
    connect_deadline: Option<Instant>,
    connect_timeout: Duration,
    state: MqttState,
    /// Requests not yet on the wire, in order.
    queue: VecDeque<Request>,
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
    /// The endpoint and trust settings, for error messages.
    config: Config,
    /// Whose certificate this connection authenticates with.
    who: Credential,
}

// rumqttc's ConnectionError is large; it is made only when a connection fails.
#[allow(clippy::result_large_err)]
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
        let mut connect = Connect::new(client_id);
        connect.keep_alive = u16::try_from(config.keep_alive.as_secs()).unwrap_or(u16::MAX);
        connect.clean_session = true;
        Link {
            opening: Some(Box::pin(open_stream(config.host.clone(), config.port, tls))),
            stream: None,
            connect: Some(connect),
            connecting: true,
            connect_deadline: None,
            connect_timeout: Duration::from_secs(config.step_timeout.as_secs().max(1)),
            state: MqttState::new(MAX_INFLIGHT, false),
            queue: VecDeque::new(),
            out: BytesMut::new(),
            unflushed: false,
            input: BytesMut::new(),
            ready: VecDeque::new(),
            dead: false,
            keep_alive: config.keep_alive,
            ping_at: None,
            pending: None,
            config: config.clone(),
            who,
        }
    }

    /// Queues one SUBSCRIBE (QoS 1) with `filters`. Before the CONNACK it goes out right
    /// behind the CONNECT.
    pub(crate) fn subscribe(&mut self, filters: &[String]) -> Result<(), Error> {
        let subs = filters
            .iter()
            .map(|f| SubscribeFilter::new(f.clone(), QoS::AtLeastOnce));
        self.queue
            .push_back(Request::Subscribe(Subscribe::new_many(subs)));
        self.pending = Some((filters.to_vec(), None));
        Ok(())
    }

    /// Whether a SUBSCRIBE with exactly `filters` is in flight and not yet answered.
    pub(crate) fn subscribing(&self, filters: &[String]) -> bool {
        matches!(&self.pending, Some((f, _)) if f == filters)
    }

    /// Queues one PUBLISH (QoS 1, not retained).
    pub(crate) fn publish(&mut self, topic: &str, payload: &[u8]) -> Result<(), Error> {
        let publish = Publish::new(topic, QoS::AtLeastOnce, payload.to_vec());
        self.queue.push_back(Request::Publish(publish));
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
    async fn turn(&mut self) -> Result<(), ConnectionError> {
        let deadline = *self
            .connect_deadline
            .get_or_insert_with(|| Instant::now() + self.connect_timeout);
        if let Some(opening) = &mut self.opening {
            let stream = tokio::select! {
                r = opening => r?,
                _ = tokio::time::sleep_until(deadline) => return Err(ConnectionError::NetworkTimeout),
            };
            self.opening = None;
            self.stream = Some(stream);
            if let Some(connect) = self.connect.take() {
                self.encode(&Packet::Connect(connect))?;
            }
        }
        // Everything queued goes out now, behind the CONNECT: before the CONNACK too.
        while let Some(request) = self.queue.pop_front() {
            if let Some(packet) = self.state.handle_outgoing_packet(request)? {
                if let Packet::Subscribe(s) = &packet {
                    if let Some((_, id @ None)) = &mut self.pending {
                        *id = Some(s.pkid);
                    }
                }
                self.encode(&packet)?;
            }
            // Only outgoing events: nothing to report.
            self.state.events.clear();
        }
        let Some(stream) = &mut self.stream else {
            return Err(ConnectionError::MqttState(StateError::InvalidState));
        };
        while !self.out.is_empty() {
            if stream.write_buf(&mut self.out).await? == 0 {
                return Err(ConnectionError::Io(std::io::ErrorKind::WriteZero.into()));
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
                    return Err(ConnectionError::NetworkTimeout);
                }
                self.ping_at = Some(Instant::now() + self.keep_alive);
                self.queue.push_back(Request::PingReq(PingReq));
                return Ok(());
            }
        };
        let parsed = self.parse();
        if read == 0 {
            parsed?;
            return Err(ConnectionError::MqttState(StateError::ConnectionAborted));
        }
        parsed
    }

    /// Handles every whole packet read so far.
    fn parse(&mut self) -> Result<(), ConnectionError> {
        // Bounded by the bytes read: each packet taken consumes some.
        loop {
            let packet = match Packet::read(&mut self.input, MAX_PACKET) {
                Ok(p) => p,
                Err(rumqttc::Error::InsufficientBytes(_)) => return Ok(()),
                Err(e) => return Err(StateError::Deserialization(e).into()),
            };
            if self.connecting {
                match packet {
                    Packet::ConnAck(ack) if ack.code == ConnectReturnCode::Success => {
                        self.connecting = false;
                        if !self.keep_alive.is_zero() {
                            self.ping_at = Some(Instant::now() + self.keep_alive);
                        }
                        self.ready.push_back(LinkEvent::Connected);
                    }
                    Packet::ConnAck(ack) => {
                        return Err(ConnectionError::ConnectionRefused(ack.code))
                    }
                    other => return Err(ConnectionError::NotConnAck(other)),
                }
                continue;
            }
            if let Some(reply) = self.state.handle_incoming_packet(packet)? {
                self.encode(&reply)?;
            }
            let events: Vec<MqttEvent> = self.state.events.drain(..).collect();
            for event in events {
                let MqttEvent::Incoming(packet) = event else {
                    continue;
                };
                let event = match packet {
                    Packet::SubAck(ack) => match self.pending.take() {
                        Some((filters, Some(pkid))) if pkid == ack.pkid => LinkEvent::SubAck {
                            filters,
                            granted: granted(&ack),
                        },
                        other => {
                            self.pending = other;
                            LinkEvent::Other
                        }
                    },
                    Packet::Publish(p) => LinkEvent::Message(p),
                    _ => LinkEvent::Other,
                };
                self.ready.push_back(event);
            }
        }
    }

    /// Serialises `packet` behind what is waiting to be written.
    fn encode(&mut self, packet: &Packet) -> Result<(), ConnectionError> {
        packet
            .write(&mut self.out, MAX_PACKET)
            .map_err(|e| ConnectionError::MqttState(StateError::Deserialization(e)))?;
        self.unflushed = true;
        Ok(())
    }

    /// The connection failed with `e`: replies read before it stay to be handled (as
    /// [`LinkEvent::Lost`]'s leftovers, with nothing else after them).
    fn fail(&mut self, e: ConnectionError) {
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
            error: connection_error(e, &self.config, self.who),
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
            self.queue.push_back(Request::Disconnect(Disconnect));
            while let Some(request) = self.queue.pop_front() {
                if let Ok(Some(packet)) = self.state.handle_outgoing_packet(request) {
                    self.encode(&packet).ok()?;
                }
            }
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
) -> Result<Stream, ConnectionError> {
    let tcp = TcpStream::connect((host.as_str(), port)).await?;
    // Nagle's algorithm only delays the RegisterThing request behind the certificate reply's
    // PUBACK until the server's delayed ACK (40 ms on Linux).
    tcp.set_nodelay(true)?;
    let name = rustls::pki_types::ServerName::try_from(host)
        .map_err(|e| ConnectionError::Tls(rumqttc::TlsError::DNSName(e)))?;
    Ok(TlsConnector::from(tls).connect(name, tcp).await?)
}
