//! The MQTT layer: routing between devices (wildcards, QoS, UNSUBSCRIBE, PING), client id
//! take-over, AWS IoT's limits (one CONNECT per second per client id among them), MQTT 5
//! CONNACK properties, topic aliases, wills, keep-alive, QoS 2 subscriptions and retained
//! publishes to reserved topics.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use fleetprov_emulator::wire::{self, Packet, Version, Will};
use fleetprov_emulator::Format;
use rumqttc::v5::mqttbytes::v5 as mqtt5;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

mod common;
use common::*;

const VERSIONS: [Version; 2] = [Version::V4, Version::V5];

/// A raw connection with the claim certificate whose CONNECT the test writes itself.
struct Conn {
    version: Version,
    stream: TlsStream<TcpStream>,
    buf: BytesMut,
}

fn connect_packet(client_id: &str, keep_alive: u16, will: Option<Will>) -> Packet {
    Packet::Connect {
        client_id: client_id.into(),
        keep_alive,
        clean: true,
        will,
    }
}

impl Conn {
    /// TLS with the claim certificate, then `connect`; returns the server's first answer too.
    async fn open(env: &Env, version: Version, connect: &Packet) -> (Conn, Recv) {
        let (cert, key) = env.claim();
        let stream = tokio::time::timeout(WAIT, tls(env, &cert, &key, &TlsOpts::default()))
            .await
            .expect("TLS in time")
            .expect("TLS with the claim certificate");
        let mut c = Conn {
            version,
            stream,
            buf: BytesMut::new(),
        };
        c.send(connect).await;
        let first = c.recv(WAIT).await;
        (c, first)
    }

    async fn send(&mut self, p: &Packet) {
        let mut out = BytesMut::new();
        wire::write(self.version, p, &mut out).expect("encodes");
        self.send_raw(&out).await;
    }

    async fn send_raw(&mut self, bytes: &[u8]) {
        let _ = self.stream.write_all(bytes).await;
        let _ = self.stream.flush().await;
    }

    async fn recv(&mut self, limit: Duration) -> Recv {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            match wire::read(self.version, &mut self.buf, 1 << 24) {
                Ok(p) => return Recv::Packet(p),
                Err(wire::WireError::Incomplete) => {}
                Err(e) => panic!("undecodable bytes from the server: {e}"),
            }
            match tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.buf)).await {
                Err(_) => return Recv::Timeout,
                Ok(Ok(0)) | Ok(Err(_)) => return Recv::Closed,
                Ok(Ok(_)) => {}
            }
        }
    }

    /// Every packet the server sends until it closes the connection (bounded by WAIT).
    async fn until_closed(&mut self) -> Vec<Packet> {
        let mut got = Vec::new();
        loop {
            match self.recv(WAIT).await {
                Recv::Packet(p) => got.push(p),
                Recv::Closed => return got,
                Recv::Timeout => panic!("the server did not close; got so far {got:?}"),
            }
        }
    }
}

/// What the server sends before closing when a limit is broken: MQTT 5 a DISCONNECT with the
/// reason, MQTT 3.1.1 nothing.
fn closing(version: Version, reason: u8) -> Option<u8> {
    (version == Version::V5).then_some(reason)
}

/// The failure code a SUBACK carries: MQTT 3.1.1 has only 0x80, MQTT 5 says 0x8F (filter invalid).
fn sub_failure(version: Version) -> u8 {
    match version {
        Version::V4 => 0x80,
        Version::V5 => 0x8F,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wildcard_filters_route_between_devices() {
    let env = Env::start_open();
    // (filter, topic, delivered?)
    let rows: &[(&str, &str, bool)] = &[
        ("a/b", "a/b", true),
        ("a/b", "A/b", false),
        ("a/b", "a/b/c", false),
        ("sensors/+/temp", "sensors/kitchen/temp", true),
        ("sensors/+/temp", "sensors/kitchen/humidity", false),
        ("sensors/+/temp", "sensors/a/b/temp", false),
        ("sensors/+", "sensors", false),
        ("sensors/+", "sensors/x", true),
        ("+/b", "/b", true),
        ("+", "a/b", false),
        ("+/+", "a/b", true),
        // AWS IoT: `#` does not match its parent level (the MQTT specification says it does).
        ("sensors/#", "sensors", false),
        ("sensors/#", "sensors/", true),
        ("sensors/#", "sensors/a/b/c", true),
        ("sensors/#", "sensorsX/a", false),
        ("#", "any/topic/at/all", true),
    ];
    for (sub_version, pub_version) in [(Version::V5, Version::V4), (Version::V4, Version::V5)] {
        let mut sub = env.claim_client(sub_version, "subscriber").await;
        let mut publ = env.claim_client(pub_version, "publisher").await;
        for (i, (filter, topic, delivered)) in rows.iter().enumerate() {
            let marker = format!("marker/{i}");
            let ctx = format!("{filter} vs {topic} ({sub_version:?} <- {pub_version:?})");
            assert_eq!(
                sub.subscribe(&[(filter, 1), (&marker, 0)]).await,
                vec![Ok(1), Ok(0)],
                "{ctx}"
            );
            // Messages from one publisher reach a subscriber in order: the marker, published
            // last, proves whether the topic was delivered.
            publ.publish(topic, format!("m{i}"), 1).await;
            publ.publish(&marker, &b"end"[..], 0).await;
            if *delivered {
                let (t, body) = sub.next_publish().await;
                assert_eq!(
                    (t.as_str(), &body[..]),
                    (*topic, format!("m{i}").as_bytes()),
                    "{ctx}"
                );
            }
            let (t, _) = sub.next_publish().await;
            assert_eq!(t, marker, "{ctx}: nothing but the marker expected");
            let pkid = sub.pkid();
            sub.send(&Packet::Unsubscribe {
                pkid,
                filters: vec![filter.to_string(), marker.clone()],
            })
            .await;
            match sub.next().await {
                Packet::UnsubAck { pkid: got, .. } => assert_eq!(got, pkid, "{ctx}"),
                other => panic!("{ctx}: expected UNSUBACK, got {other:?}"),
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_level_wildcards_do_not_match_dollar_topics() {
    let env = Env::start_open();
    let topic = keys_topic(Format::Json);
    let accepted = format!("{topic}/accepted");
    // Each row subscribes the exact reply topic at QoS 0 and the row's filter at QoS 1: a reply
    // delivered at QoS 1 proves that the filter matched it, at QoS 0 that it did not.
    let rows: &[(&str, bool)] = &[
        ("#", false),
        ("+/#", false),
        ("+/certificates/create/json/accepted", false),
        ("+/+/+/+/+", false),
        ("$aws/#", true),
        ("$aws/certificates/+/json/accepted", true),
        ("$aws/certificates/create/json/+", true),
        ("$aws/+/create/#", true),
    ];
    for version in VERSIONS {
        for (filter, matches) in rows {
            let mut c = env.claim_client(version, "dollar").await;
            assert_eq!(
                c.subscribe(&[(filter, 1), (&accepted, 0)]).await,
                vec![Ok(1), Ok(0)]
            );
            c.publish(&topic, Bytes::new(), 1).await;
            match c.next().await {
                Packet::Publish {
                    topic: t,
                    qos,
                    pkid,
                    ..
                } => {
                    assert_eq!(t, accepted, "{filter}");
                    let want = u8::from(*matches);
                    assert_eq!(qos, want, "{filter} {version:?}: matched = {}", qos == 1);
                    if qos == 1 {
                        c.send(&Packet::PubAck { pkid, reason: 0 }).await;
                    }
                }
                other => panic!("{filter}: expected the reply, got {other:?}"),
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos_is_the_lower_of_publish_and_granted_and_puback_echoes_pkid() {
    let env = Env::start_open();
    for (sub_version, pub_version) in [(Version::V4, Version::V5), (Version::V5, Version::V4)] {
        let mut sub = env.claim_client(sub_version, "qos-sub").await;
        let mut publ = env.claim_client(pub_version, "qos-pub").await;
        assert_eq!(
            sub.subscribe(&[("q/zero", 0), ("q/one", 1)]).await,
            vec![Ok(0), Ok(1)]
        );
        // (topic, publish QoS, pkid, delivered QoS)
        let rows: &[(&str, u8, u16, u8)] = &[
            ("q/zero", 0, 0, 0),
            ("q/zero", 1, 4242, 0),
            ("q/one", 0, 0, 0),
            ("q/one", 1, 7, 1),
            ("q/one", 1, 65535, 1),
        ];
        for (i, (topic, qos, pkid, delivered)) in rows.iter().enumerate() {
            let ctx = format!("{topic} at QoS {qos} ({pub_version:?} -> {sub_version:?})");
            publ.send(&publish_packet(topic, format!("p{i}"), *qos, *pkid))
                .await;
            // PUBACK for QoS 1 with the same pkid; for QoS 0 none: the PINGRESP comes first.
            publ.send(&Packet::PingReq).await;
            if *qos == 1 {
                assert_eq!(
                    publ.recv(WAIT).await,
                    Recv::Packet(Packet::PubAck {
                        pkid: *pkid,
                        reason: 0
                    }),
                    "{ctx}"
                );
            }
            assert_eq!(
                publ.recv(WAIT).await,
                Recv::Packet(Packet::PingResp),
                "{ctx}"
            );
            match sub.next().await {
                Packet::Publish {
                    topic: t,
                    qos: got,
                    pkid,
                    payload,
                    retain,
                    ..
                } => {
                    assert_eq!(
                        (t.as_str(), got, &payload[..], retain),
                        (*topic, *delivered, format!("p{i}").as_bytes(), false),
                        "{ctx}"
                    );
                    assert_eq!(pkid != 0, got == 1, "{ctx}: pkid {pkid}");
                    if got == 1 {
                        sub.send(&Packet::PubAck { pkid, reason: 0 }).await;
                    }
                }
                other => panic!("{ctx}: expected PUBLISH, got {other:?}"),
            }
        }
        sub.send(&Packet::PingReq).await;
        assert_eq!(sub.recv(WAIT).await, Recv::Packet(Packet::PingResp));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsubscribe_stops_delivery() {
    let env = Env::start_open();
    for version in VERSIONS {
        let mut sub = env.claim_client(version, "unsub-sub").await;
        let mut publ = env.claim_client(Version::V4, "unsub-pub").await;
        assert_eq!(
            sub.subscribe(&[("u/a", 1), ("u/+/x", 1), ("u/b", 0)]).await,
            vec![Ok(1), Ok(1), Ok(0)]
        );
        publ.publish("u/a", &b"1"[..], 0).await;
        assert_eq!(sub.next_publish().await.0, "u/a");
        sub.send(&Packet::Unsubscribe {
            pkid: 99,
            filters: vec!["u/a".into(), "u/+/x".into()],
        })
        .await;
        // MQTT 5 carries one reason per filter; MQTT 3.1.1 none.
        let count = if version == Version::V5 { 2 } else { 0 };
        assert_eq!(
            sub.recv(WAIT).await,
            Recv::Packet(Packet::UnsubAck { pkid: 99, count })
        );
        publ.publish("u/a", &b"2"[..], 1).await;
        publ.publish("u/q/x", &b"3"[..], 1).await;
        publ.publish("u/b", &b"4"[..], 0).await;
        let (topic, body) = sub.next_publish().await;
        assert_eq!(
            (topic.as_str(), &body[..]),
            ("u/b", &b"4"[..]),
            "{version:?}"
        );
        sub.send(&Packet::PingReq).await;
        assert_eq!(sub.recv(WAIT).await, Recv::Packet(Packet::PingResp));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_connection_with_the_same_client_id_takes_over() {
    let env = Env::start_open();
    for version in VERSIONS {
        let mut first = env.claim_client(version, "twin").await;
        let mut second = env.claim_client(version, "twin").await;
        assert_eq!(
            first.expect_closed().await,
            closing(version, 0x8E),
            "{version:?}: the first is disconnected (MQTT 5: session taken over)"
        );
        // The second keeps working, for pub/sub and for the API.
        second.send(&Packet::PingReq).await;
        assert_eq!(second.recv(WAIT).await, Recv::Packet(Packet::PingResp));
        assert_eq!(second.subscribe(&[("twin/t", 1)]).await, vec![Ok(1)]);
        second.publish("twin/t", &b"still here"[..], 1).await;
        assert_eq!(second.next_publish().await.0, "twin/t");
        create_certificate(&mut second, CertApi::Keys, Format::Json).await;
    }
    // Another client id is not affected by a take-over.
    let mut bystander = env.claim_client(Version::V5, "bystander").await;
    let _twin = env.claim_client(Version::V5, "twin").await;
    bystander.send(&Packet::PingReq).await;
    assert_eq!(bystander.recv(WAIT).await, Recv::Packet(Packet::PingResp));
}

/// What a limit row does on a fresh connection.
enum Act {
    Publish { topic: String, len: usize, qos: u8 },
    Subscribe(Vec<(String, u8)>),
}

/// What the row expects: `SubAck` codes with `None` for a failure.
#[derive(Debug)]
enum Want {
    PubAck,
    SubAck(Vec<Option<u8>>),
    /// The server closes the connection, MQTT 5 with a DISCONNECT carrying this reason.
    Closed(u8),
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aws_limits() {
    let env = Env::start_open();
    let topic_of = |len: usize| format!("t/{}", "a".repeat(len - 2));
    let filters = |n: usize| (0..n).map(|i| (format!("f/{i}"), 1)).collect::<Vec<_>>();
    let publ = |topic: &str, len: usize, qos: u8| Act::Publish {
        topic: topic.into(),
        len,
        qos,
    };
    let rows: Vec<(&str, Act, Want)> = vec![
        (
            "payload 128 KiB",
            publ("big/p", 128 * 1024, 1),
            Want::PubAck,
        ),
        (
            "payload 128 KiB + 1",
            publ("big/p", 128 * 1024 + 1, 1),
            Want::Closed(0x95),
        ),
        (
            "payload 128 KiB + 1 at QoS 0",
            publ("big/p", 128 * 1024 + 1, 0),
            Want::Closed(0x95),
        ),
        (
            "8 filters",
            Act::Subscribe(filters(8)),
            Want::SubAck(vec![Some(1); 8]),
        ),
        ("9 filters", Act::Subscribe(filters(9)), Want::Closed(0x97)),
        ("topic 256 bytes", publ(&topic_of(256), 3, 1), Want::PubAck),
        (
            "topic 257 bytes",
            publ(&topic_of(257), 3, 1),
            Want::Closed(0x90),
        ),
        ("7 slashes", publ("a/b/c/d/e/f/g/h", 3, 1), Want::PubAck),
        (
            "8 slashes",
            publ("a/b/c/d/e/f/g/h/i", 3, 1),
            Want::Closed(0x90),
        ),
        (
            "wildcard in a topic",
            publ("a/+/c", 3, 1),
            Want::Closed(0x90),
        ),
        ("QoS 2 PUBLISH", publ("q/2", 3, 2), Want::Closed(0x9B)),
        (
            "filters: length and depth",
            Act::Subscribe(vec![
                (topic_of(256), 1),
                (topic_of(257), 1),
                ("a/b/c/d/e/f/g/#".into(), 0),
                ("a/b/c/d/e/f/g/h/#".into(), 0),
            ]),
            Want::SubAck(vec![Some(1), None, Some(0), None]),
        ),
        (
            "invalid filters beside valid ones",
            Act::Subscribe(vec![
                ("a/#/b".into(), 1),
                ("ok/1".into(), 1),
                ("a+".into(), 1),
                ("ok/+/2".into(), 0),
                ("".into(), 1),
                ("#".into(), 1),
                ("a/b#".into(), 1),
                ("+/ok/#".into(), 1),
            ]),
            Want::SubAck(vec![
                None,
                Some(1),
                None,
                Some(0),
                None,
                Some(1),
                None,
                Some(1),
            ]),
        ),
    ];
    for version in VERSIONS {
        for (i, (what, act, want)) in rows.iter().enumerate() {
            let ctx = format!("{what} ({version:?})");
            let mut c = env.claim_client(version, &format!("limits-{i}")).await;
            match act {
                Act::Publish { topic, len, qos } => {
                    if matches!(want, Want::PubAck) {
                        assert_eq!(c.subscribe(&[(topic, 1)]).await, vec![Ok(1)], "{ctx}");
                    }
                    c.send(&publish_packet(topic, vec![b'x'; *len], *qos, 31))
                        .await;
                }
                Act::Subscribe(filters) => {
                    c.send(&Packet::Subscribe {
                        pkid: 32,
                        filters: filters.clone(),
                    })
                    .await;
                }
            }
            match want {
                Want::PubAck => {
                    let Act::Publish { topic, len, .. } = act else {
                        unreachable!()
                    };
                    // The PUBACK and the message itself (the connection subscribes to it).
                    let (mut acked, mut echoed) = (false, false);
                    while !(acked && echoed) {
                        match c.recv(WAIT).await {
                            Recv::Packet(Packet::PubAck {
                                pkid: 31,
                                reason: 0,
                            }) => acked = true,
                            Recv::Packet(Packet::Publish {
                                topic: t,
                                payload,
                                pkid,
                                ..
                            }) => {
                                assert_eq!((&t, payload.len()), (topic, *len), "{ctx}");
                                c.send(&Packet::PubAck { pkid, reason: 0 }).await;
                                echoed = true;
                            }
                            other => panic!("{ctx}: got {other:?}"),
                        }
                    }
                }
                Want::SubAck(codes) => {
                    let codes: Vec<Result<u8, u8>> = codes
                        .iter()
                        .map(|c| c.ok_or(sub_failure(version)))
                        .collect();
                    assert_eq!(
                        c.recv(WAIT).await,
                        Recv::Packet(Packet::SubAck { pkid: 32, codes }),
                        "{ctx}"
                    );
                }
                Want::Closed(reason) => {
                    assert_eq!(c.expect_closed().await, closing(version, *reason), "{ctx}");
                    continue;
                }
            }
            // Rows within the limits leave the connection working.
            c.send(&Packet::PingReq).await;
            assert_eq!(c.recv(WAIT).await, Recv::Packet(Packet::PingResp), "{ctx}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_id_of_129_bytes_is_refused_in_connack() {
    let env = Env::start_open();
    for version in VERSIONS {
        // (client id, CONNACK code)
        let rows = [("c".repeat(128), 0u8), ("c".repeat(129), 0x85)];
        for (id, code) in rows {
            let ctx = format!("{} bytes ({version:?})", id.len());
            let (mut c, first) = Conn::open(&env, version, &connect_packet(&id, 60, None)).await;
            match first {
                Recv::Packet(Packet::ConnAck { code: got, .. }) => {
                    assert_eq!(got, code, "{ctx}")
                }
                other => panic!("{ctx}: expected CONNACK, got {other:?}"),
            }
            if code == 0 {
                c.send(&Packet::PingReq).await;
                assert_eq!(c.recv(WAIT).await, Recv::Packet(Packet::PingResp), "{ctx}");
            } else {
                assert_eq!(
                    c.until_closed().await,
                    vec![],
                    "{ctx}: closed after CONNACK"
                );
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_above_1200_is_lowered_and_below_30_raised() {
    let env = Env::start_open();
    // (requested keep-alive, MQTT 5 CONNACK server_keep_alive)
    let rows: &[(u16, Option<u16>)] = &[
        (1, Some(30)),
        (29, Some(30)),
        (30, None),
        (1200, None),
        (1201, Some(1200)),
        (u16::MAX, Some(1200)),
        (0, Some(1200)),
    ];
    for version in VERSIONS {
        for (keep_alive, want) in rows {
            let (mut c, first) = Conn::open(
                &env,
                version,
                &connect_packet("keepalive", *keep_alive, None),
            )
            .await;
            let want = if version == Version::V5 { *want } else { None };
            assert_eq!(
                first,
                Recv::Packet(Packet::ConnAck {
                    code: 0,
                    assigned_client_id: None,
                    server_keep_alive: want,
                }),
                "keep-alive {keep_alive} ({version:?})"
            );
            c.send(&Packet::PingReq).await;
            assert_eq!(c.recv(WAIT).await, Recv::Packet(Packet::PingResp));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connection_is_closed_after_one_and_a_half_keep_alives() {
    // Without AWS's 30 s minimum, so that a 1 s keep-alive is kept.
    let env = Env::start_with(|c| c.min_keep_alive = 1);
    let run = |version: Version| {
        let env = &env;
        async move {
            let (mut c, first) = Conn::open(env, version, &connect_packet("", 1, None)).await;
            assert!(matches!(
                first,
                Recv::Packet(Packet::ConnAck { code: 0, .. })
            ));
            let start = tokio::time::Instant::now();
            let got = c.until_closed().await;
            let want: Vec<Packet> = closing(version, 0x8D)
                .map(|reason| Packet::Disconnect { reason })
                .into_iter()
                .collect();
            assert_eq!(got, want, "{version:?}");
            // 1.5 s after the last packet heard; the lower bound only rules out "at once".
            assert!(start.elapsed() >= Duration::from_secs(1), "{version:?}");
        }
    };
    tokio::join!(run(Version::V4), run(Version::V5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connack_advertises_what_the_emulator_supports() {
    let env = Env::start_open();
    // MQTT 3.1.1: exactly "accepted, no session present".
    let (cert, key) = env.claim();
    for (version, client_id) in [
        (Version::V4, "props"),
        (Version::V5, "props"),
        (Version::V5, ""),
    ] {
        let mut s = tls(&env, &cert, &key, &TlsOpts::default()).await.unwrap();
        let mut out = BytesMut::new();
        wire::write(version, &connect_packet(client_id, 60, None), &mut out).unwrap();
        s.write_all(&out).await.unwrap();
        let mut buf = BytesMut::new();
        let deadline = tokio::time::Instant::now() + WAIT;
        let raw = loop {
            let n = tokio::time::timeout_at(deadline, s.read_buf(&mut buf))
                .await
                .expect("CONNACK in time")
                .unwrap();
            assert_ne!(n, 0, "closed before CONNACK");
            if version == Version::V4 && buf.len() >= 4 {
                break buf.to_vec();
            }
            if version == Version::V5 && mqtt5::check(buf.iter(), None).is_ok() {
                break buf.to_vec();
            }
        };
        if version == Version::V4 {
            assert_eq!(raw, [0x20, 0x02, 0x00, 0x00]);
            continue;
        }
        let mut b = BytesMut::from(&raw[..]);
        let mqtt5::Packet::ConnAck(ack) = mqtt5::Packet::read(&mut b, None).unwrap() else {
            panic!("not a CONNACK: {raw:02x?}");
        };
        assert!(b.is_empty(), "one packet only");
        assert_eq!(ack.code, mqtt5::ConnectReturnCode::Success);
        assert!(!ack.session_present);
        let p = ack.properties.expect("CONNACK properties");
        assert_eq!(p.max_qos, Some(1), "maximum QoS 1");
        assert_eq!(p.retain_available, Some(0), "no retain");
        assert_eq!(p.topic_alias_max.unwrap_or(0), 0, "no topic aliases");
        assert_eq!(p.shared_subscription_available, Some(0));
        assert_eq!(p.wildcard_subscription_available, Some(1));
        let max = p.max_packet_size.expect("maximum packet size") as usize;
        assert!(max > 128 * 1024, "room for a 128 KiB payload: {max}");
        if client_id.is_empty() {
            let assigned = p.assigned_client_identifier.expect("an id is assigned");
            assert!(!assigned.is_empty() && assigned.len() <= 128, "{assigned}");
        } else {
            assert_eq!(p.assigned_client_identifier, None);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_with_a_topic_alias_is_refused() {
    let env = Env::start_open();
    let mut watcher = env.claim_client(Version::V4, "alias-watcher").await;
    watcher.subscribe(&[("alias/#", 1)]).await;
    let mut c = env.claim_client(Version::V5, "alias").await;
    c.send(&Packet::Publish {
        topic: "alias/t".into(),
        qos: 1,
        pkid: 5,
        retain: false,
        dup: false,
        payload: Bytes::from_static(b"aliased"),
        topic_alias: Some(1),
    })
    .await;
    assert_eq!(c.expect_closed().await, Some(0x94));
    // Nothing was routed: the watcher's next message is its own marker.
    watcher.publish("alias/marker", &b"m"[..], 0).await;
    assert_eq!(watcher.next_publish().await.0, "alias/marker");
}

/// How a connection with a will ends.
enum Ending {
    /// The client sends these bytes (a DISCONNECT) and waits for the server to close.
    Disconnect(&'static [u8]),
    /// The client drops the connection without DISCONNECT.
    Drop,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn will_is_published_only_when_the_connection_ends_abnormally() {
    let env = Env::start_open();
    let mut watcher = env.claim_client(Version::V4, "will-watcher").await;
    assert_eq!(watcher.subscribe(&[("wills/#", 1)]).await, vec![Ok(1)]);
    // (what, version, ending, will published?)
    let rows: &[(&str, Version, Ending, bool)] = &[
        (
            "3.1.1 DISCONNECT",
            Version::V4,
            Ending::Disconnect(&[0xE0, 0x00]),
            false,
        ),
        (
            "5 DISCONNECT, short form (remaining length 0, as rumqttc sends it)",
            Version::V5,
            Ending::Disconnect(&[0xE0, 0x00]),
            false,
        ),
        (
            "5 DISCONNECT 0x00 with empty properties",
            Version::V5,
            Ending::Disconnect(&[0xE0, 0x02, 0x00, 0x00]),
            false,
        ),
        (
            "5 DISCONNECT 0x04 (with will message)",
            Version::V5,
            Ending::Disconnect(&[0xE0, 0x02, 0x04, 0x00]),
            true,
        ),
        ("3.1.1 dropped", Version::V4, Ending::Drop, true),
        ("5 dropped", Version::V5, Ending::Drop, true),
    ];
    for (i, (what, version, ending, published)) in rows.iter().enumerate() {
        let will_topic = format!("wills/{i}");
        let will = Will {
            topic: will_topic.clone(),
            payload: Bytes::from(format!("gone {i}")),
            qos: 1,
        };
        let (mut c, first) = Conn::open(
            &env,
            *version,
            &connect_packet(&format!("will-{i}"), 60, Some(will)),
        )
        .await;
        assert!(
            matches!(first, Recv::Packet(Packet::ConnAck { code: 0, .. })),
            "{what}: {first:?}"
        );
        match ending {
            Ending::Disconnect(bytes) => {
                c.send_raw(bytes).await;
                assert_eq!(
                    c.until_closed().await,
                    vec![],
                    "{what}: the server closes without answering"
                );
            }
            Ending::Drop => drop(c),
        }
        if *published {
            let (topic, body) = watcher.next_publish().await;
            assert_eq!(
                (topic.as_str(), &body[..]),
                (will_topic.as_str(), format!("gone {i}").as_bytes()),
                "{what}"
            );
        } else {
            // The will would have been routed when the connection closed, before this marker.
            let marker = format!("wills/marker-{i}");
            watcher.publish(&marker, &b"m"[..], 0).await;
            assert_eq!(watcher.next_publish().await.0, marker, "{what}: no will");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_most_50_subscriptions_per_connection() {
    let env = Env::start_open();
    for version in [Version::V4, Version::V5] {
        let mut c = env
            .claim_client(version, &format!("subs-{version:?}"))
            .await;
        let names: Vec<String> = (0..50).map(|i| format!("s/{i}")).collect();
        for chunk in names.chunks(8) {
            let filters: Vec<(&str, u8)> = chunk.iter().map(|f| (f.as_str(), 1)).collect();
            assert_eq!(c.subscribe(&filters).await, vec![Ok(1); chunk.len()]);
        }
        let over = if version == Version::V5 { 0x97 } else { 0x80 };
        // The 51st fails; subscribing again to one held is no new subscription.
        assert_eq!(
            c.subscribe(&[("s/50", 1), ("s/0", 0)]).await,
            vec![Err(over), Ok(0)],
            "{version:?}"
        );
        let pkid = c.pkid();
        c.send(&Packet::Unsubscribe {
            pkid,
            filters: vec!["s/1".into()],
        })
        .await;
        assert!(matches!(c.next().await, Packet::UnsubAck { .. }));
        assert_eq!(
            c.subscribe(&[("s/50", 1)]).await,
            vec![Ok(1)],
            "{version:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos_2_subscribe_gets_no_suback_and_subscribes_nothing() {
    let env = Env::start_open();
    for version in VERSIONS {
        let id = format!("qos2-{version:?}");
        let mut c = env.claim_client(version, &id).await;
        let pkid = c.pkid();
        c.send(&Packet::Subscribe {
            pkid,
            filters: vec![("q/x".into(), 2), ("q/y".into(), 1)],
        })
        .await;
        // The PINGRESP comes first: no SUBACK was sent before it, none after (the connection
        // is then used on and sees none).
        c.send(&Packet::PingReq).await;
        assert_eq!(
            c.recv(WAIT).await,
            Recv::Packet(Packet::PingResp),
            "{version:?}"
        );
        assert_eq!(
            c.subscribe(&[("marker", 1)]).await,
            vec![Ok(1)],
            "{version:?}"
        );
        // Neither filter of that SUBSCRIBE was subscribed: only the marker comes back.
        c.publish("q/x", &b"x"[..], 0).await;
        c.publish("q/y", &b"y"[..], 0).await;
        c.publish("marker", &b"end"[..], 0).await;
        assert_eq!(c.next_publish().await.0, "marker", "{version:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_publish_to_a_reserved_topic_closes_the_connection() {
    let env = Env::start_open();
    for version in VERSIONS {
        for qos in [0u8, 1] {
            let id = format!("retain-{version:?}-{qos}");
            let mut c = env.claim_client(version, &id).await;
            // Retained to an ordinary topic: accepted.
            let mut ok = publish_packet("plain/retained", &b"r"[..], 1, c.pkid());
            if let Packet::Publish { retain, .. } = &mut ok {
                *retain = true;
            }
            c.send(&ok).await;
            assert!(
                matches!(
                    c.recv(WAIT).await,
                    Recv::Packet(Packet::PubAck { reason: 0, .. })
                ),
                "{version:?}"
            );
            let mut reserved =
                publish_packet("$aws/things/t/shadow/update", &b"{}"[..], qos, c.pkid());
            if let Packet::Publish { retain, .. } = &mut reserved {
                *retain = true;
            }
            c.send(&reserved).await;
            assert_eq!(
                c.expect_closed().await,
                closing(version, 0x90),
                "{version:?} QoS {qos}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_connect_per_second_per_client_id() {
    // An interval far longer than the test: the second CONNECT is surely inside it.
    let env = Env::start_with(|c| c.connect_interval = Duration::from_secs(600));
    env.set_claim_policy(&serde_json::json!({"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": "iot:*", "Resource": "*"}
    ]}));
    for version in VERSIONS {
        let id = format!("rate-{version:?}");
        let first = env.claim_client(version, &id).await;
        let (mut again, answer) = Conn::open(&env, version, &connect_packet(&id, 60, None)).await;
        match version {
            // MQTT 3.1.1: hung up on without a CONNACK.
            Version::V4 => assert_eq!(answer, Recv::Closed),
            // MQTT 5: CONNACK 0x97 Quota exceeded, then closed.
            Version::V5 => {
                assert!(
                    matches!(answer, Recv::Packet(Packet::ConnAck { code: 0x97, .. })),
                    "{answer:?}"
                );
                assert_eq!(again.recv(WAIT).await, Recv::Closed);
            }
        }
        // The refused CONNECT did not take the client id over.
        let mut first = first;
        first.send(&Packet::PingReq).await;
        assert_eq!(first.recv(WAIT).await, Recv::Packet(Packet::PingResp));
        // Other client ids, and clients that let the server assign one, are not limited.
        env.claim_client(version, &format!("{id}-other")).await;
        for _ in 0..2 {
            env.claim_client(version, "").await;
        }
    }
    // Once the interval has passed, the client id may connect again.
    let env = Env::start_with(|c| c.connect_interval = Duration::from_millis(200));
    env.set_claim_policy(&serde_json::json!({"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": "iot:*", "Resource": "*"}
    ]}));
    env.claim_client(Version::V4, "later").await;
    // Waiting out the server's rate window (counted from before its CONNACK) is what this
    // checks, not a stand-in for a signal.
    tokio::time::sleep(Duration::from_millis(250)).await;
    env.claim_client(Version::V4, "later").await;
}
