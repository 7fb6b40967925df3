//! Shared by the test suites: a small MQTT-over-TLS test client that speaks raw packets to the emulator, plus helpers.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use fleetprov_emulator::wire::{self, Packet, Version, WireError};
use fleetprov_emulator::{Config, Emulator, Format, KeyKind};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// Every wait in the tests is bounded by this.
pub const WAIT: Duration = Duration::from_secs(20);

/// A temporary directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "fleetprov-emu-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("temp dir");
        TempDir(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// An emulator in a fresh data directory with EC keys and an EC CA (fast) unless told otherwise.
pub struct Env {
    pub emu: Emulator,
    pub dir: TempDir,
}

impl Env {
    pub fn start() -> Env {
        Env::start_with(|_| {})
    }

    pub fn start_with(tweak: impl FnOnce(&mut Config)) -> Env {
        let dir = TempDir::new("env");
        let mut config = Config::new(dir.path().join("data"));
        config.key_kind = KeyKind::EcP256;
        config.ca_key_kind = KeyKind::EcP256;
        // The broker's tests reconnect with one client id at will; AWS's one CONNECT per
        // second per client id has its own test (mqtt.rs), which sets it.
        config.connect_interval = std::time::Duration::ZERO;
        tweak(&mut config);
        if std::env::var_os("EMULATOR_VERBOSE").is_some() {
            fleetprov_emulator::set_verbose(true);
        }
        let emu = Emulator::start(config).expect("emulator starts");
        Env { emu, dir }
    }

    /// An emulator whose claim certificate may do anything, for tests of the broker that use
    /// it as an ordinary device (IoT policies have their own tests in policies.rs).
    pub fn start_open() -> Env {
        let env = Env::start();
        env.set_claim_policy(&json!({"Version": "2012-10-17", "Statement": [
            {"Effect": "Allow", "Action": "iot:*", "Resource": "*"}
        ]}));
        env
    }

    /// Writes `resources.json`: the thing types, thing groups and billing groups that exist.
    pub fn write_resources(&self, resources: &Value) {
        std::fs::write(
            &self.emu.paths().resources,
            serde_json::to_vec_pretty(resources).unwrap(),
        )
        .unwrap();
    }

    /// Writes `policies/NAME.json`, the policy a template may attach by name; returns its text.
    pub fn write_policy(&self, name: &str, policy: &Value) -> String {
        let text = serde_json::to_string(policy).unwrap();
        std::fs::write(
            self.emu.paths().policies.join(format!("{name}.json")),
            &text,
        )
        .unwrap();
        text
    }

    /// Replaces the claim policy (read at every CONNECT of the claim certificate).
    pub fn set_claim_policy(&self, policy: &Value) {
        std::fs::write(
            &self.emu.paths().claim_policy,
            serde_json::to_vec_pretty(policy).unwrap(),
        )
        .unwrap();
    }

    pub fn claim(&self) -> (String, String) {
        let p = self.emu.paths();
        (
            std::fs::read_to_string(&p.claim_cert).unwrap(),
            std::fs::read_to_string(&p.claim_key).unwrap(),
        )
    }

    pub fn ca_pem(&self) -> String {
        std::fs::read_to_string(&self.emu.paths().ca_cert).unwrap()
    }

    pub fn write_template(&self, name: &str, body: &Value) {
        std::fs::write(
            self.emu.paths().templates.join(format!("{name}.json")),
            serde_json::to_vec_pretty(body).unwrap(),
        )
        .unwrap();
    }

    /// Connects with the claim certificate.
    pub async fn claim_client(&self, version: Version, client_id: &str) -> Client {
        let (cert, key) = self.claim();
        Client::connect(self, &cert, &key, version, client_id)
            .await
            .expect("claim connects")
    }

    /// The certificate with `id` in the registry.
    pub fn certificate(&self, id: &str) -> Option<Value> {
        self.emu.registry().unwrap()["certificates"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["id"] == id)
            .cloned()
    }

    pub fn thing(&self, name: &str) -> Option<Value> {
        self.emu.registry().unwrap()["things"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .cloned()
    }
}

/// A plain PUBLISH packet (no retain, dup or alias).
pub fn publish_packet(topic: &str, payload: impl Into<Bytes>, qos: u8, pkid: u16) -> Packet {
    Packet::Publish {
        topic: topic.into(),
        qos,
        pkid,
        retain: false,
        dup: false,
        payload: payload.into(),
        topic_alias: None,
    }
}

/// TLS options for a test connection.
#[derive(Default, Clone)]
pub struct TlsOpts {
    pub alpn: Option<Vec<u8>>,
    pub tls12_only: bool,
    pub tls13_only: bool,
}

pub fn client_config(
    ca_pem: &str,
    cert_pem: &str,
    key_pem: &str,
    opts: &TlsOpts,
) -> rustls::ClientConfig {
    client_config_for(ca_pem, Some((cert_pem, key_pem)), opts)
}

/// A client configuration trusting `ca_pem`, presenting `identity` (certificate and key PEM)
/// or no client certificate at all.
pub fn client_config_for(
    ca_pem: &str,
    identity: Option<(&str, &str)>,
    opts: &TlsOpts,
) -> rustls::ClientConfig {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let versions: &[&rustls::SupportedProtocolVersion] = if opts.tls12_only {
        &[&rustls::version::TLS12]
    } else if opts.tls13_only {
        &[&rustls::version::TLS13]
    } else {
        &[&rustls::version::TLS13, &rustls::version::TLS12]
    };
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots);
    let mut cfg = match identity {
        Some((cert_pem, key_pem)) => {
            let certs: Vec<CertificateDer<'static>> =
                CertificateDer::pem_slice_iter(cert_pem.as_bytes())
                    .collect::<Result<_, _>>()
                    .unwrap();
            let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap();
            builder.with_client_auth_cert(certs, key).unwrap()
        }
        None => builder.with_no_client_auth(),
    };
    if let Some(alpn) = &opts.alpn {
        cfg.alpn_protocols = vec![alpn.clone()];
    }
    cfg
}

/// Opens TLS to the emulator; the server may still reject the client certificate afterwards
/// (TLS 1.3 reports that on the first read).
pub async fn tls(
    env: &Env,
    cert: &str,
    key: &str,
    opts: &TlsOpts,
) -> std::io::Result<TlsStream<TcpStream>> {
    let cfg = client_config(&env.ca_pem(), cert, key, opts);
    let tcp = TcpStream::connect(env.emu.addr()).await?;
    TlsConnector::from(Arc::new(cfg))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
}

#[derive(Debug, PartialEq)]
pub enum Recv {
    Packet(Packet),
    Closed,
    Timeout,
}

pub struct Client {
    pub version: Version,
    pub stream: TlsStream<TcpStream>,
    buf: BytesMut,
    next_pkid: u16,
    pub connack: Packet,
}

impl Client {
    /// TLS + CONNECT; Err if TLS fails or the CONNACK is missing or refuses.
    pub async fn connect(
        env: &Env,
        cert: &str,
        key: &str,
        version: Version,
        client_id: &str,
    ) -> Result<Client, String> {
        Client::connect_opts(env, cert, key, version, client_id, &TlsOpts::default()).await
    }

    pub async fn connect_opts(
        env: &Env,
        cert: &str,
        key: &str,
        version: Version,
        client_id: &str,
        opts: &TlsOpts,
    ) -> Result<Client, String> {
        let stream = tokio::time::timeout(WAIT, tls(env, cert, key, opts))
            .await
            .map_err(|_| "TLS timed out".to_string())?
            .map_err(|e| format!("TLS: {e}"))?;
        let mut c = Client {
            version,
            stream,
            buf: BytesMut::new(),
            next_pkid: 0,
            connack: Packet::PingResp,
        };
        c.send(&Packet::Connect {
            client_id: client_id.into(),
            keep_alive: 60,
            clean: true,
            will: None,
        })
        .await;
        match c.recv(WAIT).await {
            Recv::Packet(p @ Packet::ConnAck { code: 0, .. }) => {
                c.connack = p;
                Ok(c)
            }
            other => Err(format!("no successful CONNACK: {other:?}")),
        }
    }

    /// A client on an open TLS stream, before CONNECT.
    pub fn from_stream(stream: TlsStream<TcpStream>, version: Version) -> Client {
        Client {
            version,
            stream,
            buf: BytesMut::new(),
            next_pkid: 0,
            connack: Packet::PingResp,
        }
    }

    pub fn pkid(&mut self) -> u16 {
        self.next_pkid = self.next_pkid.wrapping_add(1).max(1);
        self.next_pkid
    }

    pub async fn send(&mut self, p: &Packet) {
        let mut out = BytesMut::new();
        wire::write(self.version, p, &mut out).expect("encodes");
        let _ = self.stream.write_all(&out).await;
        let _ = self.stream.flush().await;
    }

    pub async fn send_raw(&mut self, bytes: &[u8]) {
        let _ = self.stream.write_all(bytes).await;
        let _ = self.stream.flush().await;
    }

    /// The next packet, or Closed / Timeout.
    pub async fn recv(&mut self, limit: Duration) -> Recv {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            match wire::read(self.version, &mut self.buf, 1 << 24) {
                Ok(p) => return Recv::Packet(p),
                Err(WireError::Incomplete) => {}
                Err(e) => panic!("client could not decode the server's bytes: {e}"),
            }
            match tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.buf)).await {
                Err(_) => return Recv::Timeout,
                Ok(Ok(0)) | Ok(Err(_)) => return Recv::Closed,
                Ok(Ok(_)) => {}
            }
        }
    }

    /// Waits for the server to close the connection, skipping other packets (a DISCONNECT
    /// included); returns the DISCONNECT reason if one came.
    pub async fn expect_closed(&mut self) -> Option<u8> {
        let mut reason = None;
        loop {
            match self.recv(WAIT).await {
                Recv::Closed => return reason,
                Recv::Timeout => panic!("the server did not close the connection"),
                Recv::Packet(Packet::Disconnect { reason: r }) => reason = Some(r),
                Recv::Packet(_) => {}
            }
        }
    }

    /// Next packet that is not a PUBACK/PINGRESP; panics on timeout or close.
    pub async fn next(&mut self) -> Packet {
        loop {
            match self.recv(WAIT).await {
                Recv::Packet(Packet::PubAck { .. } | Packet::PingResp) => {}
                Recv::Packet(p) => return p,
                other => panic!("expected a packet, got {other:?}"),
            }
        }
    }

    pub async fn subscribe(&mut self, filters: &[(&str, u8)]) -> Vec<Result<u8, u8>> {
        let pkid = self.pkid();
        self.send(&Packet::Subscribe {
            pkid,
            filters: filters.iter().map(|(f, q)| (f.to_string(), *q)).collect(),
        })
        .await;
        match self.next().await {
            Packet::SubAck { pkid: got, codes } if got == pkid => codes,
            other => panic!("expected SUBACK {pkid}, got {other:?}"),
        }
    }

    pub async fn publish(&mut self, topic: &str, payload: impl Into<Bytes>, qos: u8) {
        let pkid = if qos > 0 { self.pkid() } else { 0 };
        self.send(&publish_packet(topic, payload, qos, pkid)).await;
    }

    /// The next PUBLISH: (topic, payload).
    pub async fn next_publish(&mut self) -> (String, Bytes) {
        match self.next().await {
            Packet::Publish { topic, payload, .. } => (topic, payload),
            other => panic!("expected PUBLISH, got {other:?}"),
        }
    }

    /// Subscribes to `topic/accepted` and `topic/rejected`, publishes `payload` at QoS 1 and
    /// returns (accepted?, decoded reply).
    pub async fn request(&mut self, topic: &str, format: Format, payload: &[u8]) -> (bool, Value) {
        let codes = self
            .subscribe(&[
                (&format!("{topic}/accepted"), 1),
                (&format!("{topic}/rejected"), 1),
            ])
            .await;
        assert_eq!(codes, vec![Ok(1), Ok(1)]);
        self.request_subscribed(topic, format, payload).await
    }

    /// As `request`, when already subscribed.
    pub async fn request_subscribed(
        &mut self,
        topic: &str,
        format: Format,
        payload: &[u8],
    ) -> (bool, Value) {
        self.publish(topic, payload.to_vec(), 1).await;
        let (reply_topic, body) = self.next_publish().await;
        let accepted = if reply_topic == format!("{topic}/accepted") {
            true
        } else if reply_topic == format!("{topic}/rejected") {
            false
        } else {
            panic!("reply on unexpected topic {reply_topic}")
        };
        let value = fleetprov_emulator::decode(format, &body).expect("reply decodes");
        (accepted, value)
    }
}

pub fn keys_topic(format: Format) -> String {
    format!("$aws/certificates/create/{}", format_name(format))
}

pub fn csr_topic(format: Format) -> String {
    format!("$aws/certificates/create-from-csr/{}", format_name(format))
}

pub fn register_topic(template: &str, format: Format) -> String {
    format!(
        "$aws/provisioning-templates/{template}/provision/{}",
        format_name(format)
    )
}

pub fn format_name(format: Format) -> &'static str {
    match format {
        Format::Json => "json",
        Format::Cbor => "cbor",
    }
}

pub fn enc(format: Format, v: &Value) -> Vec<u8> {
    fleetprov_emulator::encode(format, v)
}

/// A fresh P-256 key and a CSR for it: (key PEM, CSR PEM).
pub fn p256_csr() -> (String, String) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "device");
    let csr = params.serialize_request(&key).unwrap().pem().unwrap();
    (key.serialize_pem(), csr)
}

/// Which certificate API a test uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertApi {
    Keys,
    Csr,
}

/// What a provisioning run produced.
#[derive(Debug, Clone)]
pub struct Provisioned {
    pub thing_name: String,
    pub certificate_id: String,
    pub certificate_pem: String,
    pub key_pem: String,
    pub device_configuration: Value,
}

/// Creates a certificate over `client`: (certificateId, certificatePem, key PEM, token).
pub async fn create_certificate(
    client: &mut Client,
    api: CertApi,
    format: Format,
) -> (String, String, String, String) {
    match api {
        CertApi::Keys => {
            let (ok, v) = client.request(&keys_topic(format), format, b"").await;
            assert!(ok, "CreateKeysAndCertificate rejected: {v}");
            (
                v["certificateId"].as_str().unwrap().into(),
                v["certificatePem"].as_str().unwrap().into(),
                v["privateKey"].as_str().unwrap().into(),
                v["certificateOwnershipToken"].as_str().unwrap().into(),
            )
        }
        CertApi::Csr => {
            let (key, csr) = p256_csr();
            let (ok, v) = client
                .request(
                    &csr_topic(format),
                    format,
                    &enc(format, &json!({"certificateSigningRequest": csr})),
                )
                .await;
            assert!(ok, "CreateCertificateFromCsr rejected: {v}");
            assert!(v.get("privateKey").is_none());
            (
                v["certificateId"].as_str().unwrap().into(),
                v["certificatePem"].as_str().unwrap().into(),
                key,
                v["certificateOwnershipToken"].as_str().unwrap().into(),
            )
        }
    }
}

/// The whole flow over one claim connection with the demo template.
pub async fn provision(
    env: &Env,
    version: Version,
    api: CertApi,
    format: Format,
    serial: &str,
) -> Provisioned {
    let mut client = env.claim_client(version, &format!("claim-{serial}")).await;
    let (id, pem, key, token) = create_certificate(&mut client, api, format).await;
    let (ok, v) = client
        .request(
            &register_topic("DemoTemplate", format),
            format,
            &enc(format, &json!({"certificateOwnershipToken": token, "parameters": {"SerialNumber": serial}})),
        )
        .await;
    assert!(ok, "RegisterThing rejected: {v}");
    Provisioned {
        thing_name: v["thingName"].as_str().unwrap().into(),
        certificate_id: id,
        certificate_pem: pem,
        key_pem: key,
        device_configuration: v["deviceConfiguration"].clone(),
    }
}
