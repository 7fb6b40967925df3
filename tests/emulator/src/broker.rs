//! The MQTT broker: accepts TLS connections, speaks MQTT 3.1.1 and 5 with AWS IoT's limits,
//! routes ordinary publishes to subscribers and hands fleet provisioning requests to the service,
//! whose replies go only to the connection that asked.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;

use crate::faults::{Action, Faults, Step};
use crate::log;
use crate::policy::{self, Action as PolicyAction, Context, Decision, Policy};
use crate::service::{Caller, Reply, Service};
use crate::topics::{self, Api, Request};
use crate::wire::{self, Packet, Version, WireError};

/// How long a client has to finish the TLS handshake and send CONNECT.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Messages queued for one connection before it is judged too slow and dropped.
const QUEUE: usize = 1024;

/// Something another task asks a connection to do.
#[derive(Debug)]
enum Out {
    /// An ordinary message for a subscriber, already at the granted QoS.
    Message {
        topic: String,
        payload: Bytes,
        qos: u8,
    },
    /// A service reply: delivered only if this connection subscribes to its topic.
    Reply { topic: String, payload: Bytes },
    /// Close the connection at an injected fault step.
    Close(&'static str),
    /// Another connection took over this client id.
    TakenOver,
}

struct Peer {
    tx: mpsc::Sender<Out>,
    filters: Vec<(String, u8)>,
}

/// State shared by every connection.
pub struct Broker {
    pub service: Arc<Service>,
    pub faults: Arc<Faults>,
    pub require_alpn: bool,
    /// Keep-alive values below this are raised to it (AWS: 30 s).
    pub min_keep_alive: u16,
    /// Refuse TLS clients that sent no SNI, as AWS does.
    pub require_sni: bool,
    /// Least time between two accepted CONNECTs with the same client id (AWS: 1 s); zero for
    /// no limit.
    pub connect_interval: Duration,
    acceptor: TlsAcceptor,
    peers: RwLock<HashMap<u64, Peer>>,
    sessions: Mutex<HashMap<String, u64>>,
    /// When each client id last connected, for `connect_interval`.
    last_connects: Mutex<HashMap<String, Instant>>,
    next_id: AtomicU64,
}

impl Broker {
    pub fn new(
        service: Arc<Service>,
        faults: Arc<Faults>,
        tls: Arc<rustls::ServerConfig>,
        require_alpn: bool,
        min_keep_alive: u16,
        require_sni: bool,
        connect_interval: Duration,
    ) -> Broker {
        Broker {
            service,
            faults,
            require_alpn,
            min_keep_alive,
            require_sni,
            connect_interval,
            acceptor: TlsAcceptor::from(tls),
            peers: RwLock::new(HashMap::new()),
            sessions: Mutex::new(HashMap::new()),
            last_connects: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
        }
    }

    /// Whether a CONNECT with `client_id` may go on now (AWS IoT Core: one CONNECT per second
    /// per client id, a quota that cannot be raised); records it when it may.
    fn connect_allowed(&self, client_id: &str) -> bool {
        if self.connect_interval.is_zero() {
            return true;
        }
        let now = Instant::now();
        let mut last = self.last_connects.lock().unwrap_or_else(|e| e.into_inner());
        if last
            .get(client_id)
            .is_some_and(|t| now.duration_since(*t) < self.connect_interval)
        {
            return false;
        }
        if last.len() >= 4096 {
            let interval = self.connect_interval;
            last.retain(|_, t| now.duration_since(*t) < interval);
        }
        last.insert(client_id.to_owned(), now);
        true
    }

    /// Number of connections past CONNECT.
    pub fn connections(&self) -> usize {
        self.peers.read().map(|p| p.len()).unwrap_or(0)
    }

    /// Accepts connections until the runtime stops.
    pub async fn run(self: Arc<Self>, listener: TcpListener) {
        loop {
            match listener.accept().await {
                Ok((tcp, addr)) => {
                    let _ = tcp.set_nodelay(true);
                    tokio::spawn(self.clone().serve(tcp, addr));
                }
                Err(e) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    log!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    async fn serve(self: Arc<Self>, tcp: TcpStream, addr: SocketAddr) {
        let tls = match tokio::time::timeout(CONNECT_TIMEOUT, self.acceptor.accept(tcp)).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                log!("{addr}: TLS handshake failed: {e}");
                return;
            }
            Err(_) => {
                log!("{addr}: TLS handshake timed out");
                return;
            }
        };
        let (_, session) = tls.get_ref();
        if self.require_alpn && session.alpn_protocol() != Some(crate::tls::ALPN_MQTT) {
            log!("{addr}: refused: ALPN x-amzn-mqtt-ca required");
            return;
        }
        // AWS IoT: "Connection attempts that don't include SNI are refused" (mqtt.html).
        if self.require_sni && session.server_name().is_none() {
            log!("{addr}: refused: no SNI");
            return;
        }
        let Some(cert_der) = session
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| c.as_ref().to_vec())
        else {
            return;
        };
        let cert_id = crate::pki::certificate_id(&cert_der);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut conn = Conn {
            broker: self.clone(),
            id,
            addr,
            cert_id,
            cert_der,
            policies: Vec::new(),
            ctx: Context::default(),
            client_id: String::new(),
            version: Version::V4,
            filters: Vec::new(),
            next_pkid: 0,
            will: None,
            out: BytesMut::new(),
        };
        let (rx, tx_half) = tokio::io::split(tls);
        let end = conn.run(rx, tx_half).await;
        self.forget(&conn);
        log!("{addr} [{}]: closed: {end}", conn.client_id);
        if let Some(will) = conn.will.take().filter(|_| end.publish_will()) {
            self.route(&will.topic, will.payload, will.qos);
        }
    }

    fn forget(&self, conn: &Conn) {
        if let Ok(mut peers) = self.peers.write() {
            peers.remove(&conn.id);
        }
        if let Ok(mut sessions) = self.sessions.lock() {
            if sessions.get(&conn.client_id) == Some(&conn.id) {
                sessions.remove(&conn.client_id);
            }
        }
    }

    /// Delivers an ordinary publish to every connection subscribed to it.
    fn route(&self, topic: &str, payload: Bytes, qos: u8) {
        let Ok(peers) = self.peers.read() else {
            return;
        };
        for peer in peers.values() {
            let granted = peer
                .filters
                .iter()
                .filter(|(f, _)| topics::matches(f, topic))
                .map(|(_, q)| *q)
                .max();
            if let Some(sub_qos) = granted {
                // A subscriber that cannot keep up loses messages, as a QoS 0 subscriber would.
                let _ = peer.tx.try_send(Out::Message {
                    topic: topic.to_owned(),
                    payload: payload.clone(),
                    qos: qos.min(sub_qos),
                });
            }
        }
    }
}

/// Why a connection ended.
#[derive(Debug)]
enum End {
    ClientDisconnect,
    Eof,
    Io(String),
    Protocol(String),
    Limit(String),
    KeepAlive,
    TakenOver,
    Fault(&'static str),
    Refused(&'static str),
    /// An IoT policy denied an action; AWS closes the connection.
    Denied(String),
}

impl End {
    fn publish_will(&self) -> bool {
        !matches!(self, End::ClientDisconnect | End::Refused(_))
    }
}

impl std::fmt::Display for End {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            End::ClientDisconnect => f.write_str("client disconnected"),
            End::Eof => f.write_str("connection closed by client"),
            End::Io(e) => write!(f, "I/O error: {e}"),
            End::Protocol(e) => write!(f, "protocol error: {e}"),
            End::Limit(e) => write!(f, "limit exceeded: {e}"),
            End::KeepAlive => f.write_str("keep-alive timeout"),
            End::TakenOver => f.write_str("another connection took over the client id"),
            End::Fault(step) => write!(f, "fault injected at {step}"),
            End::Refused(why) => write!(f, "CONNECT refused: {why}"),
            End::Denied(what) => write!(f, "not authorized: {what}"),
        }
    }
}

struct Conn {
    broker: Arc<Broker>,
    id: u64,
    addr: SocketAddr,
    cert_id: String,
    cert_der: Vec<u8>,
    /// The policies attached to the certificate, read at CONNECT.
    policies: Vec<Policy>,
    /// What policy variables resolve to for this connection.
    ctx: Context,
    client_id: String,
    version: Version,
    filters: Vec<(String, u8)>,
    next_pkid: u16,
    will: Option<wire::Will>,
    out: BytesMut,
}

impl Conn {
    /// Evaluates a policy action for this connection; denials are logged as AWS logs an
    /// AUTHORIZATION_FAILURE.
    fn authorize(&self, action: PolicyAction, name: &str) -> bool {
        let decision = policy::evaluate(&self.policies, &self.ctx, action, name);
        if decision != Decision::Allowed {
            log!(
                "{} [{}]: {} {} denied ({})",
                self.addr,
                self.client_id,
                action.name(),
                self.ctx.resource(action, name),
                match &decision {
                    Decision::ExplicitDeny(p) => format!("explicit Deny in policy {p}"),
                    _ => "no policy allows it".to_owned(),
                }
            );
        }
        decision.allowed()
    }

    fn queue(&mut self, p: &Packet) {
        // Every packet the broker builds has an encoding in both versions.
        let _ = wire::write(self.version, p, &mut self.out);
    }

    async fn flush<W: AsyncWrite + Unpin>(&mut self, w: &mut W) -> Result<(), End> {
        if self.out.is_empty() {
            return Ok(());
        }
        let res = w.write_all(&self.out).await;
        self.out.clear();
        res.map_err(|e| End::Io(e.to_string()))?;
        w.flush().await.map_err(|e| End::Io(e.to_string()))
    }

    /// Sends a DISCONNECT (MQTT 5 only; 3.1.1 has no server DISCONNECT) and ends.
    async fn close<W: AsyncWrite + Unpin>(&mut self, w: &mut W, reason: u8, end: End) -> End {
        if self.version == Version::V5 {
            self.queue(&Packet::Disconnect { reason });
        }
        let _ = self.flush(w).await;
        let _ = w.shutdown().await;
        end
    }

    /// Refuses a CONNECT as AWS does: MQTT 3.1.1 closes the connection without a CONNACK,
    /// MQTT 5 sends a CONNACK with reason `code` first.
    async fn refuse_connect<W: AsyncWrite + Unpin>(
        &mut self,
        w: &mut W,
        code: u8,
        end: End,
    ) -> End {
        if self.version == Version::V5 {
            self.queue(&Packet::ConnAck {
                code,
                assigned_client_id: None,
                server_keep_alive: None,
            });
            let _ = self.flush(w).await;
        }
        let _ = w.shutdown().await;
        end
    }

    fn pkid(&mut self) -> u16 {
        self.next_pkid = self.next_pkid.checked_add(1).unwrap_or(1).max(1);
        self.next_pkid
    }

    async fn run<R, W>(&mut self, mut r: R, mut w: W) -> End
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let mut buf = BytesMut::with_capacity(4096);
        // CONNECT, within CONNECT_TIMEOUT.
        let deadline = Instant::now() + CONNECT_TIMEOUT;
        let version = loop {
            match wire::peek_connect_version(&buf) {
                Ok(Some(v)) => break v,
                Ok(None) => {}
                Err(WireError::UnsupportedProtocol(level)) => {
                    // MQTT 3.1 and others: refuse in 3.1.1 terms, the oldest we speak.
                    self.queue(&Packet::ConnAck {
                        code: 0x84,
                        assigned_client_id: None,
                        server_keep_alive: None,
                    });
                    let _ = self.flush(&mut w).await;
                    log!("{}: unsupported protocol level {level}", self.addr);
                    return End::Refused("unsupported protocol version");
                }
                Err(e) => return End::Protocol(e.to_string()),
            }
            if buf.len() > topics::MAX_PACKET {
                return End::Limit("CONNECT too large".into());
            }
            match tokio::time::timeout_at(deadline, r.read_buf(&mut buf)).await {
                Err(_) => return End::Protocol("no CONNECT in time".into()),
                Ok(Ok(0)) => return End::Eof,
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return End::Io(e.to_string()),
            }
        };
        self.version = version;
        let connect = loop {
            match wire::read(version, &mut buf, topics::MAX_PACKET) {
                Ok(p) => break p,
                Err(WireError::Incomplete) => {}
                Err(e) => return End::Protocol(e.to_string()),
            }
            match tokio::time::timeout_at(deadline, r.read_buf(&mut buf)).await {
                Err(_) => return End::Protocol("no CONNECT in time".into()),
                Ok(Ok(0)) => return End::Eof,
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return End::Io(e.to_string()),
            }
        };
        let Packet::Connect {
            client_id,
            keep_alive,
            will,
            ..
        } = connect
        else {
            return End::Protocol("first packet is not CONNECT".into());
        };
        if client_id.len() > topics::MAX_CLIENT_ID {
            self.queue(&Packet::ConnAck {
                code: 0x85,
                assigned_client_id: None,
                server_keep_alive: None,
            });
            let _ = self.flush(&mut w).await;
            return End::Refused("client id longer than 128 bytes");
        }
        if will
            .as_ref()
            .is_some_and(|will| !topics::valid_topic(&will.topic) || will.qos > 1)
        {
            return self.close(&mut w, 0x90, End::Refused("invalid will")).await;
        }
        self.will = will;
        let assigned = client_id
            .is_empty()
            .then(|| format!("emulator-{}", self.id));
        self.client_id = assigned.clone().unwrap_or(client_id);
        self.policies = self.broker.service.policies_for(&self.cert_id);
        self.ctx =
            self.broker
                .service
                .policy_context(&self.cert_id, &self.client_id, &self.cert_der);
        if assigned.is_none() && !self.broker.connect_allowed(&self.client_id) {
            // AWS IoT Core accepts one CONNECT per second per client id (quotas page, message
            // broker limits; not adjustable) and "will hang up on you" beyond it (AWS staff in
            // aws-iot-device-sdk-java#127; CloudWatch counts ClientIdThrottle). MQTT 3.1.1:
            // closed without a CONNACK. MQTT 5 [inferred]: CONNACK 0x97 Quota exceeded, the
            // only code of AWS's CONNACK table that fits.
            log!(
                "{} [{}]: CONNECT refused: more than one per {} ms for this client id",
                self.addr,
                self.client_id,
                self.broker.connect_interval.as_millis()
            );
            let end = End::Refused("more than one CONNECT per second for this client id");
            return self.refuse_connect(&mut w, 0x97, end).await;
        }
        if !self.authorize(PolicyAction::Connect, &self.client_id.clone()) {
            // MQTT 3.1.1: AWS closes the connection without a CONNACK (clients see "connection
            // closed unexpectedly": aws-iot-device-sdk-js-v2#101). MQTT 5: CONNACK 0x87 Not
            // authorized (AWS's CONNACK reason codes; also observed, shamblett/mqtt5_client#131).
            let end = End::Refused("iot:Connect not allowed by the certificate's policies");
            return self.refuse_connect(&mut w, 0x87, end).await;
        }
        // AWS IoT quotas: keep-alive at most 1200 s (0 means 1200), and a value below 30 s is
        // treated as 30 (message broker limits; also in re:Post QU_ER8srIYQRaZNNH9od_Q1g).
        let keep_alive_eff = if keep_alive == 0 || keep_alive > topics::MAX_KEEP_ALIVE {
            topics::MAX_KEEP_ALIVE
        } else {
            keep_alive.max(self.broker.min_keep_alive)
        };
        let (tx, mut rx) = mpsc::channel(QUEUE);
        // Register, taking the client id over from an earlier connection.
        let previous = {
            let mut sessions = self
                .broker
                .sessions
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            sessions.insert(self.client_id.clone(), self.id)
        };
        {
            let mut peers = self.broker.peers.write().unwrap_or_else(|e| e.into_inner());
            if let Some(old) = previous.and_then(|old| peers.get(&old)) {
                let _ = old.tx.try_send(Out::TakenOver);
            }
            peers.insert(
                self.id,
                Peer {
                    tx: tx.clone(),
                    filters: Vec::new(),
                },
            );
        }
        self.queue(&Packet::ConnAck {
            code: 0,
            assigned_client_id: assigned,
            server_keep_alive: (keep_alive_eff != keep_alive).then_some(keep_alive_eff),
        });
        if let Err(e) = self.flush(&mut w).await {
            return e;
        }
        log!(
            "{} [{}]: connected ({:?})",
            self.addr,
            self.client_id,
            version
        );
        if self.broker.faults.close_at(Step::Connect, None) {
            return self.close(&mut w, 0x80, End::Fault("connect")).await;
        }

        let idle = Duration::from_millis(u64::from(keep_alive_eff) * 1500);
        let mut last_heard = Instant::now();
        loop {
            // Handle every complete packet already buffered.
            loop {
                match wire::read(version, &mut buf, topics::MAX_PACKET) {
                    Ok(p) => {
                        last_heard = Instant::now();
                        if let Err(end) = self.handle(p, &tx, &mut w).await {
                            return end;
                        }
                    }
                    Err(WireError::Incomplete) => break,
                    Err(WireError::TooLarge) => {
                        return self
                            .close(&mut w, 0x95, End::Limit("packet larger than 128 KB".into()))
                            .await;
                    }
                    Err(e) => {
                        return self.close(&mut w, 0x81, End::Protocol(e.to_string())).await;
                    }
                }
            }
            if let Err(e) = self.flush(&mut w).await {
                return e;
            }
            tokio::select! {
                read = r.read_buf(&mut buf) => match read {
                    Ok(0) => return End::Eof,
                    Ok(_) => {}
                    Err(e) => return End::Io(e.to_string()),
                },
                out = rx.recv() => match out {
                    Some(Out::Message { topic, payload, qos }) => {
                        self.deliver_if_allowed(topic, payload, qos)
                    }
                    Some(Out::Reply { topic, payload }) => {
                        let granted = self
                            .filters
                            .iter()
                            .filter(|(f, _)| topics::matches(f, &topic))
                            .map(|(_, q)| *q)
                            .max();
                        if let Some(qos) = granted {
                            self.deliver_if_allowed(topic, payload, qos);
                        }
                    }
                    Some(Out::TakenOver) => return self.close(&mut w, 0x8E, End::TakenOver).await,
                    Some(Out::Close(step)) => {
                        let end = self.close(&mut w, 0x80, End::Fault(step)).await;
                        linger(&mut r).await;
                        return end;
                    }
                    None => {}
                },
                _ = tokio::time::sleep_until(last_heard + idle) => {
                    return self.close(&mut w, 0x8D, End::KeepAlive).await;
                }
            }
        }
    }

    /// iot:Receive is checked on every delivery (policy-actions.html); a message the policy
    /// does not let through is dropped silently.
    fn deliver_if_allowed(&mut self, topic: String, payload: Bytes, qos: u8) {
        if self.authorize(PolicyAction::Receive, &topic) {
            self.deliver(topic, payload, qos);
        }
    }

    fn deliver(&mut self, topic: String, payload: Bytes, qos: u8) {
        let pkid = if qos > 0 { self.pkid() } else { 0 };
        self.queue(&Packet::Publish {
            topic,
            qos,
            pkid,
            retain: false,
            dup: false,
            payload,
            topic_alias: None,
        });
    }

    async fn handle<W: AsyncWrite + Unpin>(
        &mut self,
        packet: Packet,
        tx: &mpsc::Sender<Out>,
        w: &mut W,
    ) -> Result<(), End> {
        match packet {
            Packet::Publish {
                topic,
                qos,
                pkid,
                payload,
                topic_alias,
                retain,
                ..
            } => {
                if qos > 1 {
                    return Err(self
                        .close(w, 0x9B, End::Limit("QoS 2 is not supported".into()))
                        .await);
                }
                if topic_alias.is_some() {
                    return Err(self
                        .close(
                            w,
                            0x94,
                            End::Protocol("topic aliases are not allowed".into()),
                        )
                        .await);
                }
                if payload.len() > topics::MAX_PAYLOAD {
                    return Err(self
                        .close(w, 0x95, End::Limit("payload larger than 128 KB".into()))
                        .await);
                }
                if !topics::valid_topic(&topic) {
                    return Err(self
                        .close(w, 0x90, End::Limit(format!("invalid topic {topic:?}")))
                        .await);
                }
                if retain && topic.starts_with('$') {
                    // "You can't publish to a reserved topic with the RETAIN flag set" (AWS
                    // IoT's MQTT page, retained messages). How it is refused [inferred]: the
                    // connection is closed, as AWS closed it for any retained PUBLISH before it
                    // supported them; MQTT 5: DISCONNECT 0x90 Topic Name invalid.
                    return Err(self
                        .close(
                            w,
                            0x90,
                            End::Limit(format!("retained PUBLISH to reserved topic {topic}")),
                        )
                        .await);
                }
                if !self.authorize(PolicyAction::Publish, &topic) {
                    // MQTT 5, QoS 1: PUBACK 0x87 Not authorized (AWS IoT's MQTT page, PUBACK
                    // reason codes); the connection stays.
                    if self.version == Version::V5 && qos == 1 {
                        log!(
                            "{} [{}]: denied: iot:Publish to {topic} (PUBACK 0x87)",
                            self.addr,
                            self.client_id
                        );
                        self.queue(&Packet::PubAck { pkid, reason: 0x87 });
                        return Ok(());
                    }
                    // MQTT 3.1.1: AWS disconnects a client whose PUBLISH its policies deny, at
                    // QoS 0 and 1 alike, without a PUBACK (aws-iot-device-sdk-python-v2#260:
                    // QoS 0 sees AWS_ERROR_MQTT_UNEXPECTED_HANGUP, QoS 1 a reconnect loop as the
                    // message is retried). MQTT 5, QoS 0 [inferred]: DISCONNECT 0x87 Not
                    // authorized (no acknowledgement can carry it).
                    return Err(self
                        .close(w, 0x87, End::Denied(format!("iot:Publish to {topic}")))
                        .await);
                }
                match Request::parse(&topic) {
                    Some(request) => {
                        if self
                            .broker
                            .faults
                            .close_at(Step::Request, Some(&request.api))
                        {
                            return Err(self.close(w, 0x80, End::Fault("request")).await);
                        }
                        if qos == 1 {
                            self.queue(&Packet::PubAck { pkid, reason: 0 });
                        }
                        self.spawn_request(topic, request, payload, tx.clone());
                    }
                    None => {
                        if qos == 1 {
                            self.queue(&Packet::PubAck { pkid, reason: 0 });
                        }
                        // Other reserved topics are AWS's own; the emulator ignores them.
                        if !topic.starts_with('$') {
                            self.broker.route(&topic, payload, qos);
                        }
                    }
                }
            }
            Packet::Subscribe { pkid, filters } => {
                if filters.len() > topics::MAX_FILTERS_PER_SUBSCRIBE {
                    return Err(self
                        .close(
                            w,
                            0x97,
                            End::Limit(format!("{} filters in one SUBSCRIBE", filters.len())),
                        )
                        .await);
                }
                if filters.iter().any(|(_, qos)| *qos > 1) {
                    // "When QoS level 2 is requested, the message broker doesn't send a PUBACK
                    // or SUBACK" (AWS IoT's MQTT page, differences from the specification): no
                    // SUBACK, nothing subscribed, the connection stays. Both MQTT versions
                    // [inferred for MQTT 5: the page does not tell them apart].
                    log!(
                        "{} [{}]: SUBSCRIBE with QoS 2 ignored (no SUBACK, as AWS)",
                        self.addr,
                        self.client_id
                    );
                    return Ok(());
                }
                let mut codes = Vec::with_capacity(filters.len());
                let mut fault_api: Option<Api> = None;
                for (filter, qos) in filters {
                    if !topics::valid_filter(&filter) {
                        codes.push(Err(0x8F));
                        continue;
                    }
                    if !self.authorize(PolicyAction::Subscribe, &filter) {
                        // A denied filter fails in the SUBACK and the connection stays:
                        // 0x80 in MQTT 3.1.1, 0x87 Not authorized in MQTT 5. (In 2017 AWS
                        // closed the connection instead: aws-iot-device-sdk-js#125.)
                        codes.push(Err(0x87));
                        continue;
                    }
                    if !self.filters.iter().any(|(f, _)| *f == filter)
                        && self.filters.len() >= topics::MAX_SUBSCRIPTIONS
                    {
                        // AWS IoT quota: 50 subscriptions per connection. [inferred] A filter
                        // beyond it fails in the SUBACK (MQTT 5: 0x97 Quota exceeded).
                        codes.push(Err(0x97));
                        continue;
                    }
                    let granted = qos;
                    if fault_api.is_none() {
                        fault_api = Request::api_of_reply_filter(&filter);
                    }
                    self.filters.retain(|(f, _)| *f != filter);
                    self.filters.push((filter, granted));
                    codes.push(Ok(granted));
                }
                self.publish_filters();
                self.queue(&Packet::SubAck { pkid, codes });
                if self
                    .broker
                    .faults
                    .fire(fault_api.as_ref(), |a| *a == Action::Close(Step::Suback))
                    .is_some()
                {
                    return Err(self.close(w, 0x80, End::Fault("suback")).await);
                }
            }
            Packet::Unsubscribe { pkid, filters } => {
                if filters.is_empty() {
                    return Err(self
                        .close(w, 0x82, End::Protocol("UNSUBSCRIBE without filters".into()))
                        .await);
                }
                let count = filters.len();
                self.filters.retain(|(f, _)| !filters.contains(f));
                self.publish_filters();
                self.queue(&Packet::UnsubAck { pkid, count });
            }
            Packet::PingReq => self.queue(&Packet::PingResp),
            Packet::PubAck { .. } => {}
            Packet::Disconnect { reason } => {
                if reason == 0x04 {
                    return Err(End::Eof);
                }
                self.will = None;
                return Err(End::ClientDisconnect);
            }
            Packet::Connect { .. } => {
                return Err(self
                    .close(w, 0x82, End::Protocol("second CONNECT".into()))
                    .await);
            }
            Packet::Unsupported(what) => {
                // QoS 2 flow packets: QoS not supported; AUTH without an authentication method
                // in CONNECT: protocol error (MQTT 5 section 4.12).
                let reason = if what == "AUTH" { 0x82 } else { 0x9B };
                return Err(self
                    .close(w, reason, End::Protocol(format!("{what} is not supported")))
                    .await);
            }
            other => {
                return Err(self
                    .close(w, 0x82, End::Protocol(format!("unexpected {other:?}")))
                    .await);
            }
        }
        Ok(())
    }

    fn publish_filters(&self) {
        if let Ok(mut peers) = self.broker.peers.write() {
            if let Some(peer) = peers.get_mut(&self.id) {
                peer.filters = self.filters.clone();
            }
        }
    }

    /// Processes a request on its own task, so that slow work (RSA keys, hooks, injected delays)
    /// never stalls the connection, then sends the reply through the connection's queue.
    fn spawn_request(
        &self,
        topic: String,
        request: Request,
        payload: Bytes,
        tx: mpsc::Sender<Out>,
    ) {
        let broker = self.broker.clone();
        let caller = Caller {
            client_id: self.client_id.clone(),
            certificate_id: self.cert_id.clone(),
        };
        let addr = self.addr;
        tokio::spawn(async move {
            let api = &request.api;
            let faults = &broker.faults;
            let reply = match faults.fire(Some(api), |a| matches!(a, Action::Reject(_))) {
                Some(Action::Reject(status)) => {
                    broker.service.errors.apply(Reply::for_status(status))
                }
                _ => {
                    broker
                        .service
                        .handle(api, request.format, &payload, &caller)
                        .await
                }
            };
            log!(
                "{addr} [{}]: {} -> {}",
                caller.client_id,
                topic,
                match &reply {
                    Reply::Accepted(_) => "accepted".to_string(),
                    Reply::Rejected { status, code, .. } => format!("rejected {status} {code}"),
                }
            );
            if let Some(Action::Delay(d)) =
                faults.fire(Some(api), |a| matches!(a, Action::Delay(_)))
            {
                tokio::time::sleep(d).await;
            }
            if faults.close_at(Step::Processed, Some(api)) {
                let _ = tx.send(Out::Close("processed")).await;
                return;
            }
            if faults.fire(Some(api), |a| *a == Action::Drop).is_some() {
                return;
            }
            let times = if faults
                .fire(Some(api), |a| *a == Action::Duplicate)
                .is_some()
            {
                2
            } else {
                1
            };
            let reply_topic = Request::reply_topic(&topic, reply.is_accepted());
            let mangle = match &reply {
                Reply::Accepted(value) => match faults.fire(
                    Some(api),
                    |a| matches!(a, Action::Mangle(m) if m.applies_to(api)),
                ) {
                    Some(Action::Mangle(kind)) => Some((kind, value.clone())),
                    _ => None,
                },
                Reply::Rejected { .. } => None,
            };
            let body = match mangle {
                Some((kind, value)) => {
                    log!("{addr} [{}]: reply mangled: {kind}", caller.client_id);
                    // A 10 MiB reply or a new key is work for a blocking thread.
                    let (ca, api, format) =
                        (broker.service.ca.clone(), api.clone(), request.format);
                    match tokio::task::spawn_blocking(move || kind.apply(&api, format, &value, &ca))
                        .await
                    {
                        Ok(bytes) => Bytes::from(bytes),
                        Err(_) => return,
                    }
                }
                None => Bytes::from(reply.encode(request.format)),
            };
            for _ in 0..times {
                let _ = tx
                    .send(Out::Reply {
                        topic: reply_topic.clone(),
                        payload: body.clone(),
                    })
                    .await;
            }
            if faults.close_at(Step::Reply, Some(api)) {
                let _ = tx.send(Out::Close("reply")).await;
            }
        });
    }
}

/// After a fault closed our side, reads until the client closes too (for at most a second), so
/// that what was sent before the close arrives: closing a socket with unread input (the
/// client's PUBACK for the last reply, say) makes the kernel send a reset, which can destroy
/// data the client has not read yet. A fault at "reply" means the reply arrived, then the cut.
async fn linger<R: AsyncRead + Unpin>(r: &mut R) {
    let mut sink = [0u8; 1024];
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        // Each read either makes progress or ends the loop; the timeout bounds it.
        while let Ok(n) = r.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
}
