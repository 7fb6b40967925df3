//! Bad input at every layer (TCP, TLS, MQTT, API payloads), each row with its exact outcome, and
//! after every row proof that the emulator still serves a fresh connection end to end.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use fleetprov_emulator::wire::{self, Packet, Version, WireError};
use fleetprov_emulator::Format;
use serde_json::json;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

mod common;
use common::*;

/// A fresh claim connection completes CreateKeysAndCertificate: the emulator still serves.
async fn still_serves(env: &Env, after: &str) {
    static N: AtomicU32 = AtomicU32::new(0);
    let id = format!("healthy-{}", N.fetch_add(1, Ordering::Relaxed));
    let (cert, key) = env.claim();
    let mut c = Client::connect(env, &cert, &key, Version::V4, &id)
        .await
        .unwrap_or_else(|e| panic!("after {after}: a fresh connection fails: {e}"));
    let (ok, v) = c
        .request(&keys_topic(Format::Json), Format::Json, b"")
        .await;
    assert!(ok, "after {after}: CreateKeysAndCertificate rejected: {v}");
    assert_eq!(
        v["certificateId"].as_str().map(str::len),
        Some(64),
        "{after}"
    );
}

/// Reads until the peer closes (EOF or error), bounded by `limit`; None on timeout.
async fn read_to_close<S: AsyncRead + Unpin>(s: &mut S, limit: Duration) -> Option<Vec<u8>> {
    let deadline = tokio::time::Instant::now() + limit;
    let mut got = Vec::new();
    loop {
        let mut chunk = [0u8; 4096];
        match tokio::time::timeout_at(deadline, s.read(&mut chunk)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(got),
            Ok(Ok(n)) => got.extend_from_slice(&chunk[..n]),
        }
    }
}

/// A TLS alert record (TLS 1.2 framing, as sent before encryption): fatal, `description`.
fn alert(description: u8) -> Vec<u8> {
    vec![0x15, 0x03, 0x03, 0x00, 0x02, 0x02, description]
}

/// An MQTT packet: `first` byte, remaining length (< 128), body.
fn packet(first: u8, body: &[u8]) -> Vec<u8> {
    assert!(body.len() < 128);
    let mut p = vec![first, body.len() as u8];
    p.extend_from_slice(body);
    p
}

/// A CONNECT with protocol `name` and `level`, client id "bad", keep-alive 60.
fn connect_with_protocol(name: &[u8], level: u8) -> Vec<u8> {
    let mut body = vec![0, name.len() as u8];
    body.extend_from_slice(name);
    body.extend_from_slice(&[level, 0x02, 0x00, 0x3c]);
    if level == 5 {
        body.push(0); // properties
    }
    body.extend_from_slice(&[0, 3, b'b', b'a', b'd']);
    packet(0x10, &body)
}

fn encoded(version: Version, p: &Packet) -> Vec<u8> {
    let mut out = BytesMut::new();
    wire::write(version, p, &mut out).unwrap();
    out.to_vec()
}

/// What a plain TCP client does.
enum Tcp {
    /// Sends these bytes, then waits for the server to close.
    Send(Vec<u8>),
    /// Sends these bytes and shuts its side down, then waits for the server to close.
    SendAndClose(Vec<u8>),
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_tls_at_all() {
    let env = Env::start();
    let mut garbage: Vec<u8> = (0u8..64).map(|i| i.wrapping_mul(37) ^ 0x5a).collect();
    garbage[0] = 0x42; // not a TLS record type
    let http = b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".to_vec();
    let mqtt = encoded(
        Version::V4,
        &Packet::Connect {
            client_id: "plaintext".into(),
            keep_alive: 60,
            clean: true,
            will: None,
        },
    );
    // A ClientHello record header that promises 512 bytes, then 10 of them.
    let mut partial_hello = vec![
        0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
    ];
    partial_hello.extend_from_slice(&[0u8; 5]);
    // (what, action, bytes the server sends before closing)
    let rows: Vec<(&str, Tcp, Vec<u8>)> = vec![
        ("garbage bytes", Tcp::Send(garbage), alert(50)),
        ("an HTTP request", Tcp::Send(http), alert(50)),
        ("plaintext MQTT CONNECT", Tcp::Send(mqtt), alert(50)),
        (
            "a TLS alert instead of a ClientHello",
            Tcp::Send(alert(40)),
            vec![],
        ),
        (
            "empty connection closed at once",
            Tcp::SendAndClose(vec![]),
            vec![],
        ),
        (
            "half a ClientHello, then close",
            Tcp::SendAndClose(partial_hello),
            vec![],
        ),
    ];
    for (what, act, want) in rows {
        let mut s = TcpStream::connect(env.emu.addr()).await.unwrap();
        match act {
            Tcp::Send(bytes) => s.write_all(&bytes).await.unwrap(),
            Tcp::SendAndClose(bytes) => {
                s.write_all(&bytes).await.unwrap();
                s.shutdown().await.unwrap();
            }
        }
        let got = read_to_close(&mut s, WAIT)
            .await
            .unwrap_or_else(|| panic!("{what}: the server did not close"));
        assert_eq!(got, want, "{what}");
        still_serves(&env, what).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_are_closed_after_the_connect_timeout() {
    let env = Env::start();
    let (cert, key) = env.claim();
    // The server gives 10 s for the TLS handshake and then 10 s for CONNECT.
    let bound = Duration::from_secs(30);
    let tcp_silent = async {
        let mut s = TcpStream::connect(env.emu.addr()).await.unwrap();
        let start = tokio::time::Instant::now();
        let got = read_to_close(&mut s, bound).await;
        (got, start.elapsed())
    };
    let tls_silent = async {
        let mut s = tls(&env, &cert, &key, &TlsOpts::default()).await.unwrap();
        let start = tokio::time::Instant::now();
        let got = read_to_close(&mut s, bound).await;
        (got, start.elapsed())
    };
    let tls_half_connect = async {
        let mut s = tls(&env, &cert, &key, &TlsOpts::default()).await.unwrap();
        let connect = connect_with_protocol(b"MQTT", 4);
        s.write_all(&connect[..connect.len() - 2]).await.unwrap();
        s.flush().await.unwrap();
        let start = tokio::time::Instant::now();
        let got = read_to_close(&mut s, bound).await;
        (got, start.elapsed())
    };
    let (a, b, c) = tokio::join!(tcp_silent, tls_silent, tls_half_connect);
    for (what, (got, elapsed)) in [
        ("TCP, nothing sent", a),
        ("TLS, nothing sent", b),
        ("TLS, half a CONNECT", c),
    ] {
        let got = got.unwrap_or_else(|| panic!("{what}: still open after {bound:?}"));
        assert_eq!(got, Vec::<u8>::new(), "{what}: closed without a word");
        // Not before the timeout (with slack for when each side starts counting).
        assert!(
            elapsed >= Duration::from_secs(8),
            "{what}: after {elapsed:?}"
        );
        still_serves(&env, what).await;
    }
}

/// One row of malformed MQTT after TLS.
struct MqttRow {
    what: &'static str,
    /// The version the CONNECT (if any) and the decoding of the server's answer use.
    version: Version,
    /// Connect normally first.
    connect_first: bool,
    bytes: Vec<u8>,
    /// Shut the client's side down after the bytes.
    then_close: bool,
    /// The packets the server sends before it closes the connection.
    want: Vec<Packet>,
}

fn disconnect(reason: u8) -> Vec<Packet> {
    vec![Packet::Disconnect { reason }]
}

/// Before CONNECT, in both versions' framing.
fn before_connect_rows() -> Vec<MqttRow> {
    let refused = vec![Packet::ConnAck {
        code: 0x84,
        assigned_client_id: None,
        server_keep_alive: None,
    }];
    let v4_connect = connect_with_protocol(b"MQTT", 4);
    let huge_connect = {
        // Remaining length 200 000 (> 128 KiB), then the start of a valid CONNECT.
        let mut p = vec![0x10, 0xc0, 0x9a, 0x0c];
        p.extend_from_slice(&[0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, 60]);
        p.extend(std::iter::repeat_n(b'x', 140_000));
        p
    };
    let row = |what, bytes, then_close, want| MqttRow {
        what,
        version: Version::V4,
        connect_first: false,
        bytes,
        then_close,
        want,
    };
    vec![
        row("PINGREQ first", vec![0xc0, 0x00], false, vec![]),
        row(
            "PUBLISH first",
            packet(0x30, &[0, 1, b'a', b'x']),
            false,
            vec![],
        ),
        row(
            "SUBSCRIBE first",
            packet(0x82, &[0, 1, 0, 1, b'a', 0]),
            false,
            vec![],
        ),
        row("packet type 0 first", vec![0x00, 0x00], false, vec![]),
        row("packet type 15 first", vec![0xf0, 0x00], false, vec![]),
        row(
            "CONNECT with a bad remaining length (5 x 0xff)",
            vec![0x10, 0xff, 0xff, 0xff, 0xff, 0xff],
            false,
            vec![],
        ),
        row(
            "MQTT 3.1 CONNECT (MQIsdp, level 3)",
            connect_with_protocol(b"MQIsdp", 3),
            false,
            refused.clone(),
        ),
        row(
            "CONNECT level 6",
            connect_with_protocol(b"MQTT", 6),
            false,
            refused.clone(),
        ),
        row(
            "CONNECT protocol name MQTX",
            connect_with_protocol(b"MQTX", 4),
            false,
            refused,
        ),
        row(
            "truncated CONNECT, then close",
            v4_connect[..v4_connect.len() - 3].to_vec(),
            true,
            vec![],
        ),
        row("CONNECT over 128 KiB", huge_connect, false, vec![]),
    ]
}

/// After a successful CONNECT: (what, bytes in 3.1.1 / in 5, close after?, 3.1.1 answer, 5 answer).
type AfterRow = (
    &'static str,
    Vec<u8>,
    Vec<u8>,
    bool,
    Vec<Packet>,
    Vec<Packet>,
);

fn after_connect_rows() -> Vec<AfterRow> {
    let second_connect = |v: Version| {
        encoded(
            v,
            &Packet::Connect {
                client_id: "again".into(),
                keep_alive: 60,
                clean: true,
                will: None,
            },
        )
    };
    vec![
        (
            "bad remaining length (5 x 0xff)",
            vec![0x30, 0xff, 0xff, 0xff, 0xff, 0xff],
            vec![0x30, 0xff, 0xff, 0xff, 0xff, 0xff],
            false,
            vec![],
            disconnect(0x81),
        ),
        (
            "remaining length beyond 128 KiB + 2 KiB",
            vec![0x30, 0xff, 0xff, 0x7f],
            vec![0x30, 0xff, 0xff, 0x7f],
            false,
            vec![],
            disconnect(0x95),
        ),
        (
            "truncated PUBLISH, then close",
            vec![0x30, 0x10, 0, 3, b'a', b'/', b'b'],
            vec![0x30, 0x10, 0, 3, b'a', b'/', b'b'],
            true,
            vec![],
            vec![],
        ),
        (
            "second CONNECT",
            second_connect(Version::V4),
            second_connect(Version::V5),
            false,
            vec![],
            disconnect(0x82),
        ),
        (
            "PUBREC",
            packet(0x50, &[0, 1]),
            packet(0x50, &[0, 1]),
            false,
            vec![],
            disconnect(0x9B),
        ),
        (
            "PUBREL",
            packet(0x62, &[0, 1]),
            packet(0x62, &[0, 1]),
            false,
            vec![],
            disconnect(0x9B),
        ),
        (
            "PUBCOMP",
            packet(0x70, &[0, 1]),
            packet(0x70, &[0, 1]),
            false,
            vec![],
            disconnect(0x9B),
        ),
        (
            "AUTH, short form (3.1.1: reserved type 15)",
            vec![0xf0, 0x00],
            vec![0xf0, 0x00],
            false,
            vec![],
            disconnect(0x82),
        ),
        (
            "AUTH with reason and properties",
            packet(0xf0, &[0, 0]),
            packet(0xf0, &[0, 0]),
            false,
            vec![],
            disconnect(0x82),
        ),
        (
            "SUBSCRIBE with zero filters",
            packet(0x82, &[0, 1]),
            packet(0x82, &[0, 1, 0]),
            false,
            vec![],
            disconnect(0x81),
        ),
        (
            "packet type 0",
            vec![0x00, 0x00],
            vec![0x00, 0x00],
            false,
            vec![],
            disconnect(0x81),
        ),
        (
            "CONNACK from the client",
            packet(0x20, &[0, 0]),
            packet(0x20, &[0, 0, 0]),
            false,
            vec![],
            disconnect(0x82),
        ),
        (
            "SUBACK from the client",
            packet(0x90, &[0, 1, 0]),
            packet(0x90, &[0, 1, 0, 0]),
            false,
            vec![],
            disconnect(0x82),
        ),
        (
            "PUBLISH with QoS 3",
            packet(0x36, &[0, 1, b'a', 0, 1, b'x']),
            packet(0x36, &[0, 1, b'a', 0, 1, 0, b'x']),
            false,
            vec![],
            disconnect(0x81),
        ),
        (
            "PUBLISH QoS 1 with packet id 0",
            packet(0x32, &[0, 1, b'a', 0, 0, b'x']),
            packet(0x32, &[0, 1, b'a', 0, 0, 0, b'x']),
            false,
            vec![],
            disconnect(0x81),
        ),
        (
            "PUBLISH topic not UTF-8",
            packet(0x30, &[0, 2, 0xff, 0xfe, b'x']),
            packet(0x30, &[0, 2, 0xff, 0xfe, 0, b'x']),
            false,
            vec![],
            disconnect(0x81),
        ),
        (
            "PUBLISH with a wildcard topic",
            packet(0x30, &[0, 3, b'a', b'/', b'+', b'x']),
            packet(0x30, &[0, 3, b'a', b'/', b'+', 0, b'x']),
            false,
            vec![],
            disconnect(0x90),
        ),
        (
            "PUBLISH with an empty topic",
            packet(0x30, &[0, 0, b'x']),
            packet(0x30, &[0, 0, 0, b'x']),
            false,
            vec![],
            disconnect(0x90),
        ),
        (
            "UNSUBSCRIBE with zero filters",
            packet(0xa2, &[0, 1]),
            packet(0xa2, &[0, 1, 0]),
            false,
            vec![],
            disconnect(0x82),
        ),
        (
            "DISCONNECT (clean close)",
            vec![0xe0, 0x00],
            vec![0xe0, 0x00],
            false,
            vec![],
            vec![],
        ),
    ]
}

async fn run_mqtt_row(env: &Env, row: &MqttRow) {
    let ctx = format!("{} ({:?})", row.what, row.version);
    let (cert, key) = env.claim();
    let mut s = tokio::time::timeout(WAIT, tls(env, &cert, &key, &TlsOpts::default()))
        .await
        .expect("TLS in time")
        .expect("TLS");
    let mut buf = BytesMut::new();
    if row.connect_first {
        let connect = encoded(
            row.version,
            &Packet::Connect {
                client_id: "malformed".into(),
                keep_alive: 60,
                clean: true,
                will: None,
            },
        );
        s.write_all(&connect).await.unwrap();
        match next_packet(&mut s, &mut buf, row.version).await {
            Some(Packet::ConnAck { code: 0, .. }) => {}
            other => panic!("{ctx}: CONNECT refused: {other:?}"),
        }
    }
    // The server may close while the bytes are still going out: write errors are fine.
    let _ = s.write_all(&row.bytes).await;
    let _ = s.flush().await;
    if row.then_close {
        let _ = s.shutdown().await;
    }
    let mut got = Vec::new();
    while let Some(p) = next_packet(&mut s, &mut buf, row.version).await {
        got.push(p);
    }
    assert_eq!(got, row.want, "{ctx}");
    assert!(buf.is_empty(), "{ctx}: stray bytes {buf:02x?}");
}

/// The next packet from the server; None when it closes. Panics on timeout or bytes that are
/// not MQTT.
async fn next_packet<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    buf: &mut BytesMut,
    version: Version,
) -> Option<Packet> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match wire::read(version, buf, 1 << 20) {
            Ok(p) => return Some(p),
            Err(WireError::Incomplete) => {}
            Err(e) => panic!("undecodable bytes from the server: {e}: {buf:02x?}"),
        }
        match tokio::time::timeout_at(deadline, s.read_buf(buf)).await {
            Err(_) => panic!("the server neither answered nor closed"),
            Ok(Ok(0)) | Ok(Err(_)) => return None,
            Ok(Ok(_)) => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_mqtt_before_connect() {
    let env = Env::start();
    for row in before_connect_rows() {
        run_mqtt_row(&env, &row).await;
        still_serves(&env, row.what).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_mqtt_after_connect() {
    let env = Env::start();
    for (what, v4_bytes, v5_bytes, then_close, v4_want, v5_want) in after_connect_rows() {
        for (version, bytes, want) in [
            (Version::V4, v4_bytes.clone(), v4_want.clone()),
            (Version::V5, v5_bytes.clone(), v5_want.clone()),
        ] {
            let row = MqttRow {
                what,
                version,
                connect_first: true,
                bytes,
                then_close,
                want,
            };
            run_mqtt_row(&env, &row).await;
            still_serves(&env, what).await;
        }
    }
}

/// The API a payload row goes to.
#[derive(Debug, Clone, Copy)]
enum Api {
    Keys,
    Csr,
    Register,
}

fn api_topic(api: Api, format: Format) -> String {
    match api {
        Api::Keys => keys_topic(format),
        Api::Csr => csr_topic(format),
        Api::Register => register_topic("DemoTemplate", format),
    }
}

/// (what, API, format, payload, statusCode, errorCode)
type PayloadRow = (&'static str, Api, Format, Vec<u8>, u16, &'static str);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_payloads_are_rejected_in_the_request_format() {
    const IP: &str = "InvalidPayload";
    const ICSR: &str = "InvalidCertificateSigningRequest";
    const ITOKEN: &str = "InvalidCertificateOwnershipToken";
    let env = Env::start();
    let j = |v: serde_json::Value| enc(Format::Json, &v);
    let c = |v: serde_json::Value| enc(Format::Cbor, &v);
    let mut cbor_trailing = c(json!({}));
    cbor_trailing.push(0x00);
    let mut csr_trailing = c(json!({"certificateSigningRequest": "x"}));
    csr_trailing.push(0xf6);
    // CBOR {"certificateSigningRequest": h'00'}: a byte string where text is expected.
    let mut csr_bytes = vec![0xa1, 0x78, 25];
    csr_bytes.extend_from_slice(b"certificateSigningRequest");
    csr_bytes.extend_from_slice(&[0x41, 0x00]);
    let rows: Vec<PayloadRow> = vec![
        // JSON
        (
            "invalid JSON",
            Api::Keys,
            Format::Json,
            b"{".to_vec(),
            400,
            IP,
        ),
        (
            "JSON array",
            Api::Keys,
            Format::Json,
            b"[]".to_vec(),
            400,
            IP,
        ),
        (
            "JSON string",
            Api::Keys,
            Format::Json,
            b"\"x\"".to_vec(),
            400,
            IP,
        ),
        (
            "JSON number",
            Api::Keys,
            Format::Json,
            b"42".to_vec(),
            400,
            IP,
        ),
        (
            "JSON null",
            Api::Keys,
            Format::Json,
            b"null".to_vec(),
            400,
            IP,
        ),
        (
            "invalid UTF-8 in JSON",
            Api::Keys,
            Format::Json,
            b"{\"a\":\"\xff\"}".to_vec(),
            400,
            IP,
        ),
        ("empty payload", Api::Csr, Format::Json, vec![], 400, IP),
        (
            "invalid JSON",
            Api::Csr,
            Format::Json,
            b"{\"c".to_vec(),
            400,
            IP,
        ),
        (
            "JSON array",
            Api::Csr,
            Format::Json,
            b"[1]".to_vec(),
            400,
            IP,
        ),
        (
            "JSON string",
            Api::Csr,
            Format::Json,
            b"\"x\"".to_vec(),
            400,
            IP,
        ),
        (
            "JSON number",
            Api::Csr,
            Format::Json,
            b"7".to_vec(),
            400,
            IP,
        ),
        (
            "certificateSigningRequest as number",
            Api::Csr,
            Format::Json,
            j(json!({"certificateSigningRequest": 12})),
            400,
            IP,
        ),
        (
            "certificateSigningRequest as object",
            Api::Csr,
            Format::Json,
            j(json!({"certificateSigningRequest": {"pem": "x"}})),
            400,
            IP,
        ),
        (
            "certificateSigningRequest empty",
            Api::Csr,
            Format::Json,
            j(json!({"certificateSigningRequest": ""})),
            400,
            ICSR,
        ),
        (
            "certificateSigningRequest not a CSR",
            Api::Csr,
            Format::Json,
            j(json!({"certificateSigningRequest": "hello"})),
            400,
            ICSR,
        ),
        (
            "invalid UTF-8 in JSON",
            Api::Csr,
            Format::Json,
            b"{\"certificateSigningRequest\":\"\xc3\x28\"}".to_vec(),
            400,
            IP,
        ),
        (
            "empty payload",
            Api::Register,
            Format::Json,
            vec![],
            400,
            IP,
        ),
        (
            "invalid JSON",
            Api::Register,
            Format::Json,
            b"}".to_vec(),
            400,
            IP,
        ),
        (
            "JSON array",
            Api::Register,
            Format::Json,
            b"[{}]".to_vec(),
            400,
            IP,
        ),
        (
            "JSON string",
            Api::Register,
            Format::Json,
            b"\"t\"".to_vec(),
            400,
            IP,
        ),
        (
            "JSON number",
            Api::Register,
            Format::Json,
            b"1.5".to_vec(),
            400,
            IP,
        ),
        (
            "certificateOwnershipToken as object",
            Api::Register,
            Format::Json,
            j(json!({"certificateOwnershipToken": {"t": "x"}})),
            400,
            IP,
        ),
        (
            "certificateOwnershipToken as number",
            Api::Register,
            Format::Json,
            j(json!({"certificateOwnershipToken": 5})),
            400,
            IP,
        ),
        (
            "parameters as a list",
            Api::Register,
            Format::Json,
            j(json!({"certificateOwnershipToken": "t", "parameters": ["SerialNumber"]})),
            400,
            IP,
        ),
        (
            "parameter value as number",
            Api::Register,
            Format::Json,
            j(json!({"certificateOwnershipToken": "t", "parameters": {"SerialNumber": 1}})),
            400,
            IP,
        ),
        (
            "invalid UTF-8 in JSON",
            Api::Register,
            Format::Json,
            b"{\"certificateOwnershipToken\":\"\xed\xa0\x80\"}".to_vec(),
            400,
            IP,
        ),
        (
            "no certificateOwnershipToken",
            Api::Register,
            Format::Json,
            j(json!({"parameters": {}})),
            400,
            ITOKEN,
        ),
        (
            "unknown certificateOwnershipToken",
            Api::Register,
            Format::Json,
            j(json!({"certificateOwnershipToken": "00ff"})),
            400,
            ITOKEN,
        ),
        // CBOR
        (
            "invalid CBOR (break)",
            Api::Keys,
            Format::Cbor,
            vec![0xff],
            400,
            IP,
        ),
        (
            "truncated CBOR map",
            Api::Keys,
            Format::Cbor,
            vec![0xa1],
            400,
            IP,
        ),
        (
            "CBOR with trailing bytes",
            Api::Keys,
            Format::Cbor,
            cbor_trailing,
            400,
            IP,
        ),
        ("CBOR array", Api::Keys, Format::Cbor, vec![0x80], 400, IP),
        (
            "CBOR text",
            Api::Keys,
            Format::Cbor,
            vec![0x61, b'x'],
            400,
            IP,
        ),
        (
            "CBOR number",
            Api::Keys,
            Format::Cbor,
            vec![0x18, 42],
            400,
            IP,
        ),
        (
            "JSON sent as CBOR",
            Api::Keys,
            Format::Cbor,
            b"{}".to_vec(),
            400,
            IP,
        ),
        (
            "invalid UTF-8 in CBOR text",
            Api::Keys,
            Format::Cbor,
            vec![0xa1, 0x61, b'a', 0x61, 0xff],
            400,
            IP,
        ),
        ("empty payload", Api::Csr, Format::Cbor, vec![], 400, IP),
        (
            "invalid CBOR (reserved)",
            Api::Csr,
            Format::Cbor,
            vec![0x1c],
            400,
            IP,
        ),
        (
            "CBOR with trailing bytes",
            Api::Csr,
            Format::Cbor,
            csr_trailing,
            400,
            IP,
        ),
        (
            "CBOR array",
            Api::Csr,
            Format::Cbor,
            vec![0x81, 0x01],
            400,
            IP,
        ),
        (
            "certificateSigningRequest as number",
            Api::Csr,
            Format::Cbor,
            c(json!({"certificateSigningRequest": 12})),
            400,
            IP,
        ),
        (
            "certificateSigningRequest as byte string",
            Api::Csr,
            Format::Cbor,
            csr_bytes,
            400,
            IP,
        ),
        (
            "invalid CBOR",
            Api::Register,
            Format::Cbor,
            vec![0xbf],
            400,
            IP,
        ),
        (
            "CBOR array",
            Api::Register,
            Format::Cbor,
            vec![0x80],
            400,
            IP,
        ),
        (
            "CBOR text",
            Api::Register,
            Format::Cbor,
            vec![0x60],
            400,
            IP,
        ),
        (
            "CBOR number",
            Api::Register,
            Format::Cbor,
            vec![0x01],
            400,
            IP,
        ),
        (
            "certificateOwnershipToken as object",
            Api::Register,
            Format::Cbor,
            c(json!({"certificateOwnershipToken": {}})),
            400,
            IP,
        ),
        (
            "parameters as a list",
            Api::Register,
            Format::Cbor,
            c(json!({"certificateOwnershipToken": "t", "parameters": []})),
            400,
            IP,
        ),
        (
            "parameter value as number",
            Api::Register,
            Format::Cbor,
            c(json!({"certificateOwnershipToken": "t", "parameters": {"SerialNumber": 7}})),
            400,
            IP,
        ),
        (
            "no certificateOwnershipToken",
            Api::Register,
            Format::Cbor,
            vec![0xa0],
            400,
            ITOKEN,
        ),
    ];
    // One connection per version takes every row and stays open throughout.
    for version in [Version::V4, Version::V5] {
        let mut conn = env.claim_client(version, "bad-payloads").await;
        let mut subscribed = HashSet::new();
        for (what, api, format, payload, status, code) in &rows {
            let ctx = format!("{what} on {api:?} {format:?} ({version:?})");
            let topic = api_topic(*api, *format);
            // `request_subscribed` decodes the reply in the request's format (and panics if
            // it is in the other one).
            let (accepted, reply) = if subscribed.insert(topic.clone()) {
                conn.request(&topic, *format, payload).await
            } else {
                conn.request_subscribed(&topic, *format, payload).await
            };
            assert!(!accepted, "{ctx}: accepted {reply}");
            assert_eq!(
                (&reply["statusCode"], &reply["errorCode"]),
                (&json!(status), &json!(code)),
                "{ctx}: {reply}"
            );
            let message = reply["errorMessage"].as_str().unwrap_or_default();
            assert!(!message.is_empty(), "{ctx}: {reply}");
            // What the device reads is the service's text, not a parser's or SQLite's.
            for leak in [
                "EOF while",
                "expected value",
                "invalid type",
                "Syntax(",
                "Semantic(",
                "Io(",
                "sqlite",
                "SQLite",
                "serde",
                "ciborium",
            ] {
                assert!(!message.contains(leak), "{ctx}: {leak:?} in {message:?}");
            }
            still_serves(&env, &ctx).await;
        }
        conn.send(&Packet::PingReq).await;
        assert_eq!(conn.recv(WAIT).await, Recv::Packet(Packet::PingResp));
        // The same connection still gets a certificate.
        create_certificate(&mut conn, CertApi::Keys, Format::Cbor).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_bad_connections_beside_many_good_ones() {
    const EACH: usize = 50;
    let env = Arc::new(Env::start());
    let before = env.emu.registry().unwrap()["certificates"]
        .as_array()
        .unwrap()
        .len();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..EACH {
        let bad_env = env.clone();
        tasks.spawn(async move {
            let env = bad_env;
            let mut s = TcpStream::connect(env.emu.addr()).await.unwrap();
            match i % 4 {
                0 => {
                    let _ = s.write_all(&[0x42; 100]).await;
                }
                1 => {
                    let _ = s.write_all(b"GET / HTTP/1.0\r\n\r\n").await;
                }
                2 => {
                    let _ = s.shutdown().await;
                }
                _ => {
                    // TLS, then a malformed packet.
                    drop(s);
                    let (cert, key) = env.claim();
                    let Ok(mut t) = tls(&env, &cert, &key, &TlsOpts::default()).await else {
                        return Err(format!("bad {i}: TLS failed"));
                    };
                    let _ = t.write_all(&[0x10, 0xff, 0xff, 0xff, 0xff, 0xff]).await;
                    return match read_to_close(&mut t, WAIT).await {
                        Some(_) => Ok(None),
                        None => Err(format!("bad {i}: not closed")),
                    };
                }
            }
            match read_to_close(&mut s, WAIT).await {
                Some(_) => Ok(None),
                None => Err(format!("bad {i}: not closed")),
            }
        });
        let good_env = env.clone();
        tasks.spawn(async move {
            let env = good_env;
            let version = if i % 2 == 0 { Version::V4 } else { Version::V5 };
            let format = if i % 3 == 0 {
                Format::Cbor
            } else {
                Format::Json
            };
            let (cert, key) = env.claim();
            let mut c = Client::connect(&env, &cert, &key, version, &format!("good-{i}"))
                .await
                .map_err(|e| format!("good {i}: {e}"))?;
            let (id, _, _, _) = create_certificate(&mut c, CertApi::Keys, format).await;
            Ok(Some(id))
        });
    }
    let results = tokio::time::timeout(Duration::from_secs(120), tasks.join_all())
        .await
        .expect("every connection finished in time");
    let mut ids = HashSet::new();
    for r in results {
        if let Some(id) = r.unwrap_or_else(|e| panic!("{e}")) {
            ids.insert(id);
        }
    }
    assert_eq!(
        ids.len(),
        EACH,
        "every good connection got its own certificate"
    );
    let certificates = env.emu.registry().unwrap()["certificates"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(certificates.len(), before + EACH);
    for id in &ids {
        assert!(
            certificates
                .iter()
                .any(|c| c["id"] == json!(id) && c["status"] == "PENDING_ACTIVATION"),
            "{id} registered as pending"
        );
    }
    still_serves(&env, "the crowd").await;
}
