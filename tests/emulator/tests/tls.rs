//! The TLS layer: TLS 1.2 and 1.3 with both MQTT versions, client certificates accepted only when
//! the registry holds them ACTIVE, and ALPN `x-amzn-mqtt-ca` (optional, or required).

use std::sync::Arc;

use bytes::BytesMut;
use fleetprov_emulator::wire::{self, Packet, Version, WireError};
use fleetprov_emulator::Format;
use rustls::pki_types::ServerName;
use rustls::ProtocolVersion;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

mod common;
use common::*;

const ALPN: &[u8] = b"x-amzn-mqtt-ca";

fn tls12() -> TlsOpts {
    TlsOpts {
        tls12_only: true,
        ..TlsOpts::default()
    }
}

fn tls13() -> TlsOpts {
    TlsOpts {
        tls13_only: true,
        ..TlsOpts::default()
    }
}

fn with_alpn(opts: TlsOpts, alpn: &[u8]) -> TlsOpts {
    TlsOpts {
        alpn: Some(alpn.to_vec()),
        ..opts
    }
}

/// How a connection attempt ended.
#[derive(Debug, PartialEq)]
enum Outcome {
    /// A CONNACK with code 0 arrived.
    Connected,
    /// TLS failed, or the server closed the connection before or at CONNACK (a CONNACK
    /// refusing counts too). The text says how, for failure messages.
    Refused(String),
}

impl Outcome {
    fn refused(&self) -> bool {
        matches!(self, Outcome::Refused(_))
    }
}

/// TLS with `cfg`, then CONNECT; waits (bounded) for a CONNACK or the end of the connection.
/// Panics if neither comes: a refusal must be visible, not a hang.
async fn attempt(env: &Env, cfg: rustls::ClientConfig, version: Version) -> Outcome {
    let tcp = TcpStream::connect(env.emu.addr())
        .await
        .expect("TCP connects");
    let handshake =
        TlsConnector::from(Arc::new(cfg)).connect(ServerName::try_from("localhost").unwrap(), tcp);
    let mut stream = match tokio::time::timeout(WAIT, handshake).await {
        Err(_) => panic!("TLS handshake neither finished nor failed in {WAIT:?}"),
        Ok(Err(e)) => return Outcome::Refused(format!("TLS handshake: {e}")),
        Ok(Ok(s)) => s,
    };
    let mut out = BytesMut::new();
    wire::write(
        version,
        &Packet::Connect {
            client_id: "tls-attempt".into(),
            keep_alive: 60,
            clean: true,
            will: None,
        },
        &mut out,
    )
    .unwrap();
    if let Err(e) = stream.write_all(&out).await {
        return Outcome::Refused(format!("write: {e}"));
    }
    let _ = stream.flush().await;
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut buf = BytesMut::new();
    loop {
        match wire::read(version, &mut buf, 1 << 20) {
            Ok(Packet::ConnAck { code: 0, .. }) => return Outcome::Connected,
            Ok(Packet::ConnAck { code, .. }) => {
                return Outcome::Refused(format!("CONNACK {code:#x}"));
            }
            Ok(other) => panic!("unexpected packet before CONNACK: {other:?}"),
            Err(WireError::Incomplete) => {}
            Err(e) => panic!("undecodable bytes from the server: {e}"),
        }
        match tokio::time::timeout_at(deadline, stream.read_buf(&mut buf)).await {
            Err(_) => panic!("neither CONNACK nor close in {WAIT:?}"),
            Ok(Ok(0)) => return Outcome::Refused("closed".into()),
            Ok(Err(e)) => return Outcome::Refused(format!("read: {e}")),
            Ok(Ok(_)) => {}
        }
    }
}

async fn attempt_with(
    env: &Env,
    cert: &str,
    key: &str,
    opts: &TlsOpts,
    version: Version,
) -> Outcome {
    attempt(env, client_config(&env.ca_pem(), cert, key, opts), version).await
}

/// CreateKeysAndCertificate over `client`: proves MQTT works end to end on the connection.
async fn works(client: &mut Client) {
    let (id, pem, _, _) = create_certificate(client, CertApi::Keys, Format::Json).await;
    assert_eq!(id.len(), 64);
    assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls12_and_tls13_with_mqtt311_and_mqtt5() {
    let env = Env::start();
    let (cert, key) = env.claim();
    let rows = [
        (tls12(), ProtocolVersion::TLSv1_2),
        (tls13(), ProtocolVersion::TLSv1_3),
    ];
    for (opts, want) in rows {
        for version in [Version::V4, Version::V5] {
            let id = format!("tls-{want:?}-{version:?}");
            let mut c = Client::connect_opts(&env, &cert, &key, version, &id, &opts)
                .await
                .unwrap_or_else(|e| panic!("{id}: {e}"));
            let (_, session) = c.stream.get_ref();
            assert_eq!(session.protocol_version(), Some(want), "{id}");
            assert_eq!(session.alpn_protocol(), None, "{id}: no ALPN offered");
            works(&mut c).await;
        }
    }
}

/// (what, certificate and key PEM or None for no client certificate, connects?)
type CertRow<'a> = (&'a str, Option<(&'a str, &'a str)>, bool);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_certificates_active_in_the_registry_connect() {
    let env = Env::start();
    let (claim_cert, claim_key) = env.claim();

    // Certificates in every state, made through the emulator's own APIs.
    let mut claim = env.claim_client(Version::V4, "maker").await;
    let (csr_id, csr_pem, csr_key, _) =
        create_certificate(&mut claim, CertApi::Csr, Format::Json).await;
    let (keys_id, keys_pem, keys_key, _) =
        create_certificate(&mut claim, CertApi::Keys, Format::Cbor).await;
    env.write_template(
        "InactiveTemplate",
        &json!({
            "Parameters": {
                "SerialNumber": {"Type": "String"},
                "AWS::IoT::Certificate::Id": {"Type": "String"}
            },
            "Resources": {
                "thing": {
                    "Type": "AWS::IoT::Thing",
                    "Properties": {
                        "ThingName": {"Fn::Join": ["", ["inactive-", {"Ref": "SerialNumber"}]]}
                    }
                },
                "certificate": {
                    "Type": "AWS::IoT::Certificate",
                    "Properties": {
                        "CertificateId": {"Ref": "AWS::IoT::Certificate::Id"},
                        "Status": "Inactive"
                    }
                }
            }
        }),
    );
    let (inactive_id, inactive_pem, inactive_key, token) =
        create_certificate(&mut claim, CertApi::Keys, Format::Json).await;
    let (ok, v) = claim
        .request(
            &register_topic("InactiveTemplate", Format::Json),
            Format::Json,
            &enc(
                Format::Json,
                &json!({"certificateOwnershipToken": token, "parameters": {"SerialNumber": "i1"}}),
            ),
        )
        .await;
    assert!(ok, "RegisterThing with an inactive certificate: {v}");
    assert_eq!(v["thingName"], "inactive-i1");
    let active = provision(&env, Version::V5, CertApi::Csr, Format::Json, "act1").await;

    let status = |id: &str| env.certificate(id).map(|c| c["status"].clone());
    assert_eq!(status(&csr_id), Some(json!("PENDING_ACTIVATION")));
    assert_eq!(status(&keys_id), Some(json!("PENDING_ACTIVATION")));
    assert_eq!(status(&inactive_id), Some(json!("INACTIVE")));
    assert_eq!(status(&active.certificate_id), Some(json!("ACTIVE")));

    let self_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let self_signed = rcgen::CertificateParams::new(vec!["device".to_string()])
        .unwrap()
        .self_signed(&self_key)
        .unwrap();
    let (self_pem, self_key) = (self_signed.pem(), self_key.serialize_pem());
    let self_id = fleetprov_emulator::certificate_id(self_signed.der());
    assert_eq!(status(&self_id), None, "the self-signed one is unknown");

    let rows: Vec<CertRow> = vec![
        ("claim (ACTIVE)", Some((&claim_cert, &claim_key)), true),
        (
            "provisioned (ACTIVE)",
            Some((&active.certificate_pem, &active.key_pem)),
            true,
        ),
        (
            "from CSR, never registered (PENDING_ACTIVATION)",
            Some((&csr_pem, &csr_key)),
            false,
        ),
        (
            "from CreateKeys, never registered (PENDING_ACTIVATION, issued by the emulator's CA)",
            Some((&keys_pem, &keys_key)),
            false,
        ),
        (
            "registered INACTIVE",
            Some((&inactive_pem, &inactive_key)),
            false,
        ),
        ("unknown self-signed", Some((&self_pem, &self_key)), false),
        ("no client certificate", None, false),
    ];
    for (what, creds, connects) in &rows {
        for opts in [tls12(), tls13()] {
            for version in [Version::V4, Version::V5] {
                let cfg = client_config_for(&env.ca_pem(), *creds, &opts);
                let got = attempt(&env, cfg, version).await;
                let tls = if opts.tls12_only {
                    "TLS 1.2"
                } else {
                    "TLS 1.3"
                };
                if *connects {
                    assert_eq!(got, Outcome::Connected, "{what} over {tls} {version:?}");
                } else {
                    assert!(
                        got.refused(),
                        "{what} over {tls} {version:?}: must be refused, got {got:?}"
                    );
                }
            }
        }
    }

    // Refusals change nothing in the registry, and the server still serves.
    assert_eq!(status(&csr_id), Some(json!("PENDING_ACTIVATION")));
    assert_eq!(status(&inactive_id), Some(json!("INACTIVE")));
    assert_eq!(status(&self_id), None);
    works(&mut claim).await;
    let mut dev = Client::connect(
        &env,
        &active.certificate_pem,
        &active.key_pem,
        Version::V4,
        &active.thing_name,
    )
    .await
    .expect("the provisioned device connects");
    dev.send(&Packet::PingReq).await;
    assert_eq!(dev.recv(WAIT).await, Recv::Packet(Packet::PingResp));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alpn_is_accepted_when_offered_and_optional_by_default() {
    let env = Env::start();
    let (cert, key) = env.claim();
    for base in [tls12(), tls13()] {
        for version in [Version::V4, Version::V5] {
            let opts = with_alpn(base.clone(), ALPN);
            let mut c = Client::connect_opts(&env, &cert, &key, version, "alpn", &opts)
                .await
                .expect("ALPN x-amzn-mqtt-ca connects");
            assert_eq!(c.stream.get_ref().1.alpn_protocol(), Some(ALPN));
            works(&mut c).await;
            let mut plain = Client::connect_opts(&env, &cert, &key, version, "plain", &base)
                .await
                .expect("no ALPN connects when not required");
            assert_eq!(plain.stream.get_ref().1.alpn_protocol(), None);
            works(&mut plain).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn required_alpn_refuses_clients_that_do_not_offer_it() {
    let env = Env::start_with(|c| c.require_alpn = true);
    let (cert, key) = env.claim();
    for base in [tls12(), tls13()] {
        for version in [Version::V4, Version::V5] {
            let ctx = format!("TLS12 only {} {version:?}", base.tls12_only);
            // (offered ALPN, connects?)
            let rows: [(Option<&[u8]>, bool); 3] =
                [(Some(ALPN), true), (None, false), (Some(b"mqtt"), false)];
            for (alpn, connects) in rows {
                let opts = match alpn {
                    Some(a) => with_alpn(base.clone(), a),
                    None => base.clone(),
                };
                let got = attempt_with(&env, &cert, &key, &opts, version).await;
                if connects {
                    assert_eq!(got, Outcome::Connected, "{ctx} ALPN {alpn:?}");
                } else {
                    assert!(got.refused(), "{ctx} ALPN {alpn:?}: got {got:?}");
                }
            }
            let mut c = Client::connect_opts(
                &env,
                &cert,
                &key,
                version,
                "alpn-req",
                &with_alpn(base.clone(), ALPN),
            )
            .await
            .expect("offering ALPN connects");
            assert_eq!(c.stream.get_ref().1.alpn_protocol(), Some(ALPN));
            works(&mut c).await;
        }
    }
}

/// With `require_sni`, a client that sends no SNI (one connecting to an IP address) is refused
/// after the handshake, as AWS refuses it; one that names the host connects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_without_sni_are_refused_when_required() {
    let env = Env::start_with(|c| c.require_sni = true);
    let (cert, key) = env.claim();
    // By name: SNI "localhost".
    Client::connect(&env, &cert, &key, Version::V4, "sni-name")
        .await
        .expect("a client that sends SNI connects");
    // By IP address: rustls sends no SNI.
    let cfg = client_config(&env.ca_pem(), &cert, &key, &TlsOpts::default());
    let tcp = TcpStream::connect(env.emu.addr()).await.unwrap();
    let ip = ServerName::IpAddress(env.emu.addr().ip().into());
    let stream = TlsConnector::from(Arc::new(cfg))
        .connect(ip, tcp)
        .await
        .expect("the handshake itself completes");
    let mut c = Client::from_stream(stream, Version::V4);
    c.send(&Packet::Connect {
        client_id: "sni-ip".into(),
        keep_alive: 60,
        clean: true,
        will: None,
    })
    .await;
    assert_eq!(c.recv(WAIT).await, Recv::Closed);
}
