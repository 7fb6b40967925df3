//! Load benchmark of the emulator: `cargo bench -p fleetprov-emulator --bench load`.
//!
//! Starts the `fleetprov-emulator` binary as a separate process (fresh data directory, EC keys,
//! loopback only) so that its CPU time and memory are read from /proc apart from this client's,
//! then measures and prints:
//! 1. concurrent connections: N TLS + MQTT connections with the claim certificate, all held open
//!    and each proven alive with PINGREQ -> PINGRESP; time to open them, emulator RSS;
//! 2. provisioning throughput: C clients on persistent claim connections looping
//!    CreateKeysAndCertificate + RegisterThing, then CreateCertificateFromCsr + RegisterThing
//!    (CSRs made before the timed section), then the full flow with a new TLS connection per
//!    device; provisionings/s, p50/p99 latency, emulator CPU time per provisioning;
//! 3. whether the targets (1,000 connections held, >= 500 provisionings/s) were met.
//!
//! It prints figures and never fails because a target is missed: it exits non-zero only when
//! something is broken (a failed connection, a rejected or unanswered request, a registry that
//! does not hold what was provisioned).
//!
//! Environment (all optional): FLEETPROV_BENCH_CONNECTIONS (1000), FLEETPROV_BENCH_CLIENTS (32),
//! FLEETPROV_BENCH_SECONDS (10, per throughput phase), FLEETPROV_BENCH_OPEN_CONCURRENCY (64,
//! connections being opened at once), FLEETPROV_BENCH_MAX_SECONDS (300, the whole run),
//! FLEETPROV_BENCH_EMULATOR (path of the emulator binary).

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use fleetprov_emulator::wire::{self, Packet, Version, WireError};
use fleetprov_emulator::Format;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio::time::{timeout, timeout_at, Instant};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// Every single wait (a connection, a reply) is bounded by this.
const WAIT: Duration = Duration::from_secs(30);
/// Upper bound on provisionings per worker and phase (the deadline normally ends a phase first).
const MAX_PER_WORKER: u64 = 1_000_000;
/// What the issue asks of the emulator.
const TARGET_CONNECTIONS: usize = 1000;
const TARGET_RATE: f64 = 500.0;

const KEYS_TOPIC: &str = "$aws/certificates/create/json";
const CSR_TOPIC: &str = "$aws/certificates/create-from-csr/json";
const REGISTER_TOPIC: &str = "$aws/provisioning-templates/DemoTemplate/provision/json";

struct Params {
    connections: usize,
    open_concurrency: usize,
    clients: usize,
    seconds: u64,
    max_seconds: u64,
}

fn env_num(name: &str, default: u64) -> Result<u64, String> {
    match std::env::var(name) {
        Err(_) => Ok(default),
        Ok(v) => v
            .trim()
            .parse::<u64>()
            .ok()
            .filter(|n| *n > 0 && *n <= 1_000_000)
            .ok_or_else(|| format!("{name}: expected a positive integer, got {v:?}")),
    }
}

impl Params {
    fn from_env() -> Result<Params, String> {
        let to_usize = |n: u64| usize::try_from(n).map_err(|e| e.to_string());
        Ok(Params {
            connections: to_usize(env_num("FLEETPROV_BENCH_CONNECTIONS", 1000)?)?,
            open_concurrency: to_usize(env_num("FLEETPROV_BENCH_OPEN_CONCURRENCY", 64)?)?,
            clients: to_usize(env_num("FLEETPROV_BENCH_CLIENTS", 32)?)?,
            seconds: env_num("FLEETPROV_BENCH_SECONDS", 10)?,
            max_seconds: env_num("FLEETPROV_BENCH_MAX_SECONDS", 300)?,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// The emulator process.

/// The emulator binary: FLEETPROV_BENCH_EMULATOR, else the one cargo built for this bench.
fn emulator_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("FLEETPROV_BENCH_EMULATOR") {
        return PathBuf::from(p);
    }
    if let Some(p) = option_env!("CARGO_BIN_EXE_fleetprov-emulator") {
        return PathBuf::from(p);
    }
    // target/<profile>/deps/load-HASH -> target/<profile>/fleetprov-emulator
    let exe = std::env::current_exe().unwrap_or_default();
    exe.parent()
        .and_then(Path::parent)
        .map(|d| d.join("fleetprov-emulator"))
        .unwrap_or_default()
}

struct Emulator {
    /// Shared with the watchdog, which kills the process if the run overstays.
    child: Arc<Mutex<Option<Child>>>,
    pid: u32,
    addr: SocketAddr,
    dir: PathBuf,
    bin: PathBuf,
}

impl Emulator {
    fn start(bin: &Path, dir: &Path) -> Result<Emulator, String> {
        let _ = std::fs::remove_dir_all(dir);
        let mut child = Command::new(bin)
            .arg("--data-dir")
            .arg(dir)
            .args(["--port", "0", "--bind", "127.0.0.1", "--key-type", "ec"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", bin.display()))?;
        let pid = child.id();
        let stdout = child.stdout.take().ok_or("no stdout")?;
        // From here on, dropping `emu` (on any error too) kills the process.
        let mut emu = Emulator {
            child: Arc::new(Mutex::new(Some(child))),
            pid,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            dir: dir.to_path_buf(),
            bin: bin.to_path_buf(),
        };
        // Read stdout on a thread (and keep draining it) so the wait for the line is bounded.
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = tx.send(line);
            }
        });
        let line = rx
            .recv_timeout(WAIT)
            .map_err(|_| "the emulator did not print `listening on HOST:PORT` in time")?;
        match line
            .strip_prefix("listening on ")
            .and_then(|a| a.trim().parse::<SocketAddr>().ok())
        {
            Some(addr) if addr.ip().is_loopback() => {
                emu.addr = addr;
                Ok(emu)
            }
            _ => Err(format!("unexpected first line from the emulator: {line:?}")),
        }
    }

    fn read(&self, name: &str) -> Result<String, String> {
        std::fs::read_to_string(self.dir.join(name))
            .map_err(|e| format!("{}: {e}", self.dir.join(name).display()))
    }

    fn alive(&self) -> bool {
        let mut guard = self.child.lock().unwrap_or_else(|e| e.into_inner());
        matches!(guard.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// Resident memory, in KB.
    fn rss_kb(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid)).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    }

    /// User + system CPU time consumed so far.
    fn cpu(&self) -> Duration {
        cpu_of(&format!("/proc/{}/stat", self.pid))
    }

    /// The registry as `fleetprov-emulator list` prints it (safe while the emulator runs).
    fn registry(&self) -> Result<Value, String> {
        let out = Command::new(&self.bin)
            .arg("list")
            .arg("--data-dir")
            .arg(&self.dir)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("list: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "list failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        serde_json::from_slice(&out.stdout).map_err(|e| format!("list printed bad JSON: {e}"))
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn clock_ticks_per_second() -> u64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(100)
}

static CLK_TCK: std::sync::OnceLock<u64> = std::sync::OnceLock::new();

/// utime + stime of a /proc/<pid>/stat file.
fn cpu_of(path: &str) -> Duration {
    let ticks = std::fs::read_to_string(path)
        .ok()
        .and_then(|s| {
            // Fields after the command name (which may hold spaces) start at field 3 (state);
            // utime and stime are fields 14 and 15.
            let rest = s.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
        })
        .unwrap_or(0);
    let hz = *CLK_TCK.get_or_init(clock_ticks_per_second);
    Duration::from_secs_f64(ticks as f64 / hz as f64)
}

fn own_cpu() -> Duration {
    cpu_of("/proc/self/stat")
}

// ---------------------------------------------------------------------------------------------
// A minimal MQTT 3.1.1 over TLS client on the emulator's `wire` module.

struct Mqtt {
    stream: TlsStream<TcpStream>,
    buf: BytesMut,
    /// Bytes to send with the next write (PUBACKs of received replies ride along).
    out: BytesMut,
    next_pkid: u16,
}

fn tls_config(ca_pem: &str, cert_pem: &str, key_pem: &str) -> Result<TlsConnector, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots
            .add(c.map_err(|e| format!("ca.pem: {e:?}"))?)
            .map_err(|e| format!("ca.pem: {e}"))?;
    }
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| format!("claim.pem: {e:?}"))?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| format!("claim.key: {e:?}"))?;
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_client_auth_cert(certs, key)
        .map_err(|e| e.to_string())?;
    // Every connection is a device's first: full handshakes, no session resumption.
    cfg.resumption = rustls::client::Resumption::disabled();
    Ok(TlsConnector::from(Arc::new(cfg)))
}

impl Mqtt {
    /// TLS + CONNECT + successful CONNACK.
    async fn connect(
        addr: SocketAddr,
        tls: &TlsConnector,
        client_id: &str,
        keep_alive: u16,
    ) -> Result<Mqtt, String> {
        let handshake = async {
            let tcp = TcpStream::connect(addr)
                .await
                .map_err(|e| format!("TCP connect: {e}"))?;
            let _ = tcp.set_nodelay(true);
            let name = ServerName::try_from("localhost").map_err(|e| e.to_string())?;
            tls.connect(name, tcp)
                .await
                .map_err(|e| format!("TLS handshake: {e}"))
        };
        let stream = timeout(WAIT, handshake)
            .await
            .map_err(|_| "TLS handshake timed out".to_string())??;
        let mut m = Mqtt {
            stream,
            buf: BytesMut::with_capacity(4096),
            out: BytesMut::new(),
            next_pkid: 0,
        };
        m.send(&Packet::Connect {
            client_id: client_id.into(),
            keep_alive,
            clean: true,
            will: None,
        })
        .await?;
        match m.recv().await? {
            Packet::ConnAck { code: 0, .. } => Ok(m),
            other => Err(format!("CONNECT refused: {other:?}")),
        }
    }

    fn pkid(&mut self) -> u16 {
        self.next_pkid = self.next_pkid.wrapping_add(1).max(1);
        self.next_pkid
    }

    async fn send(&mut self, p: &Packet) -> Result<(), String> {
        wire::write(Version::V4, p, &mut self.out).map_err(|e| format!("encode: {e}"))?;
        let (stream, out) = (&mut self.stream, &self.out);
        let written = timeout(WAIT, async {
            stream.write_all(out).await?;
            stream.flush().await
        })
        .await;
        self.out.clear();
        match written {
            Err(_) => Err("write timed out".into()),
            Ok(Err(e)) => Err(format!("write: {e}")),
            Ok(Ok(())) => Ok(()),
        }
    }

    async fn recv(&mut self) -> Result<Packet, String> {
        let deadline = Instant::now() + WAIT;
        loop {
            match wire::read(Version::V4, &mut self.buf, 1 << 20) {
                Ok(p) => return Ok(p),
                Err(WireError::Incomplete) => {}
                Err(e) => return Err(format!("undecodable bytes from the emulator: {e}")),
            }
            match timeout_at(deadline, self.stream.read_buf(&mut self.buf)).await {
                Err(_) => return Err("no answer from the emulator in time".into()),
                Ok(Ok(0)) => return Err("the emulator closed the connection".into()),
                Ok(Err(e)) => return Err(format!("read: {e}")),
                Ok(Ok(_)) => {}
            }
        }
    }

    /// The next packet other than PUBACK / PINGRESP.
    async fn next(&mut self) -> Result<Packet, String> {
        for _ in 0..1000 {
            match self.recv().await? {
                Packet::PubAck { .. } | Packet::PingResp => {}
                p => return Ok(p),
            }
        }
        Err("too many acknowledgements without an answer".into())
    }

    async fn subscribe(&mut self, filters: &[&str]) -> Result<(), String> {
        let pkid = self.pkid();
        self.send(&Packet::Subscribe {
            pkid,
            filters: filters.iter().map(|f| (f.to_string(), 1)).collect(),
        })
        .await?;
        match self.next().await? {
            Packet::SubAck { pkid: got, codes }
                if got == pkid
                    && codes.len() == filters.len()
                    && codes.iter().all(|c| *c == Ok(1)) =>
            {
                Ok(())
            }
            other => Err(format!("SUBSCRIBE not granted: {other:?}")),
        }
    }

    async fn ping(&mut self) -> Result<(), String> {
        self.send(&Packet::PingReq).await?;
        match self.recv().await? {
            Packet::PingResp => Ok(()),
            other => Err(format!("expected PINGRESP, got {other:?}")),
        }
    }

    /// Publishes a request at QoS 1 (subscribed already) and returns the accepted reply.
    async fn request(&mut self, topic: &str, payload: Vec<u8>) -> Result<Value, String> {
        let pkid = self.pkid();
        self.send(&Packet::Publish {
            topic: topic.into(),
            qos: 1,
            pkid,
            retain: false,
            dup: false,
            payload: Bytes::from(payload),
            topic_alias: None,
        })
        .await?;
        let (reply_topic, body) = match self.next().await? {
            Packet::Publish {
                topic,
                payload,
                qos,
                pkid,
                ..
            } => {
                if qos == 1 {
                    wire::write(
                        Version::V4,
                        &Packet::PubAck { pkid, reason: 0 },
                        &mut self.out,
                    )
                    .map_err(|e| format!("encode: {e}"))?;
                }
                (topic, payload)
            }
            other => return Err(format!("expected a reply to {topic}, got {other:?}")),
        };
        let value = fleetprov_emulator::decode(Format::Json, &body)?;
        match reply_topic.strip_prefix(topic) {
            Some("/accepted") => Ok(value),
            Some("/rejected") => Err(format!("{topic} rejected: {value}")),
            _ => Err(format!("reply to {topic} on {reply_topic}")),
        }
    }

    async fn disconnect(mut self) {
        let _ = self.send(&Packet::Disconnect { reason: 0 }).await;
        let _ = timeout(WAIT, self.stream.shutdown()).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Provisioning.

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    /// CreateKeysAndCertificate + RegisterThing on a persistent claim connection.
    Keys,
    /// CreateCertificateFromCsr + RegisterThing on a persistent claim connection.
    Csr,
    /// A new claim connection (TLS + CONNECT + SUBSCRIBE) per device, then as `Keys`.
    FullFlow,
}

impl Mode {
    fn tag(self) -> &'static str {
        match self {
            Mode::Keys => "k",
            Mode::Csr => "c",
            Mode::FullFlow => "f",
        }
    }

    fn filters(self) -> [&'static str; 4] {
        let create = if self == Mode::Csr {
            [
                "$aws/certificates/create-from-csr/json/accepted",
                "$aws/certificates/create-from-csr/json/rejected",
            ]
        } else {
            [
                "$aws/certificates/create/json/accepted",
                "$aws/certificates/create/json/rejected",
            ]
        };
        [
            create[0],
            create[1],
            "$aws/provisioning-templates/DemoTemplate/provision/json/accepted",
            "$aws/provisioning-templates/DemoTemplate/provision/json/rejected",
        ]
    }
}

/// One device: create a certificate, then RegisterThing with DemoTemplate.
async fn provision_one(m: &mut Mqtt, serial: &str, csr: Option<String>) -> Result<(), String> {
    let created = match csr {
        None => {
            let v = m.request(KEYS_TOPIC, b"{}".to_vec()).await?;
            let key = v["privateKey"].as_str().unwrap_or_default();
            // P-256 keys come as PKCS#8; RSA ones would be `BEGIN RSA PRIVATE KEY`.
            if !key.starts_with("-----BEGIN PRIVATE KEY-----") {
                return Err(format!(
                    "CreateKeysAndCertificate: not an EC key: {key:.40}"
                ));
            }
            v
        }
        Some(csr) => {
            let body = json!({ "certificateSigningRequest": csr }).to_string();
            m.request(CSR_TOPIC, body.into_bytes()).await?
        }
    };
    let (Some(token), Some(_), Some(_)) = (
        created["certificateOwnershipToken"].as_str(),
        created["certificateId"].as_str(),
        created["certificatePem"].as_str(),
    ) else {
        return Err(format!("incomplete certificate reply: {created}"));
    };
    let body = json!({
        "certificateOwnershipToken": token,
        "parameters": { "SerialNumber": serial },
    })
    .to_string();
    let registered = m.request(REGISTER_TOPIC, body.into_bytes()).await?;
    if registered["thingName"] != json!(format!("demo-{serial}")) {
        return Err(format!("unexpected RegisterThing reply: {registered}"));
    }
    Ok(())
}

#[derive(Default)]
struct WorkerOut {
    latencies: Vec<Duration>,
    errors: Vec<String>,
    csrs_exhausted: bool,
}

struct Ctx {
    addr: SocketAddr,
    tls: TlsConnector,
}

/// Connects and subscribes a persistent claim connection.
async fn setup_client(ctx: &Ctx, mode: Mode, client_id: &str) -> Result<Mqtt, String> {
    let mut m = Mqtt::connect(ctx.addr, &ctx.tls, client_id, 1200).await?;
    m.subscribe(&mode.filters()).await?;
    Ok(m)
}

async fn worker(
    ctx: Arc<Ctx>,
    mode: Mode,
    w: usize,
    mut client: Option<Mqtt>,
    mut csrs: Vec<String>,
    deadline: Instant,
) -> WorkerOut {
    let mut out = WorkerOut::default();
    let mut n: u64 = 0;
    while Instant::now() < deadline && n < MAX_PER_WORKER {
        let serial = format!("{}-{w}-{n}", mode.tag());
        let csr = if mode == Mode::Csr {
            match csrs.pop() {
                Some(c) => Some(c),
                None => {
                    out.csrs_exhausted = true;
                    break;
                }
            }
        } else {
            None
        };
        let started = Instant::now();
        let result = match mode {
            Mode::FullFlow => {
                // A client id of its own per device, as real devices have.
                let device = async {
                    let mut m = setup_client(&ctx, mode, &format!("bench-{serial}")).await?;
                    provision_one(&mut m, &serial, None).await?;
                    m.disconnect().await;
                    Ok::<(), String>(())
                };
                device.await
            }
            Mode::Keys | Mode::Csr => match client.as_mut() {
                Some(m) => provision_one(m, &serial, csr).await,
                None => Err("no connection".into()),
            },
        };
        match result {
            Ok(()) => out.latencies.push(started.elapsed()),
            Err(e) => {
                out.errors.push(format!("worker {w}, device {serial}: {e}"));
                break;
            }
        }
        n += 1;
    }
    if let Some(m) = client {
        m.disconnect().await;
    }
    out
}

struct Phase {
    ok: usize,
    elapsed: Duration,
    latencies: Vec<Duration>,
    errors: Vec<String>,
    server_cpu: Duration,
    client_cpu: Duration,
    csrs_exhausted: bool,
}

async fn run_phase(
    ctx: &Arc<Ctx>,
    emu: &Emulator,
    mode: Mode,
    p: &Params,
    mut csr_pools: Vec<Vec<String>>,
) -> Phase {
    let mut errors = Vec::new();
    // Persistent connections are opened and subscribed before the clock starts.
    let mut clients: Vec<Option<Mqtt>> = (0..p.clients).map(|_| None).collect();
    if mode != Mode::FullFlow {
        let mut set = JoinSet::new();
        for w in 0..p.clients {
            let ctx = ctx.clone();
            set.spawn(async move {
                let id = format!("bench-{}-{w}", mode.tag());
                (w, setup_client(&ctx, mode, &id).await)
            });
        }
        while let Some(joined) = set.join_next().await {
            match joined {
                Ok((w, Ok(m))) => clients[w] = Some(m),
                Ok((w, Err(e))) => errors.push(format!("worker {w}: setup: {e}")),
                Err(e) => errors.push(format!("setup task: {e}")),
            }
        }
    }
    let cpu0 = (emu.cpu(), own_cpu());
    let start = Instant::now();
    let deadline = start + Duration::from_secs(p.seconds);
    let mut set = JoinSet::new();
    for (w, client) in clients.into_iter().enumerate() {
        if mode != Mode::FullFlow && client.is_none() {
            continue;
        }
        let csrs = csr_pools.pop().unwrap_or_default();
        set.spawn(worker(ctx.clone(), mode, w, client, csrs, deadline));
    }
    let mut latencies = Vec::new();
    let mut csrs_exhausted = false;
    while let Some(joined) = set.join_next().await {
        match joined {
            Ok(out) => {
                latencies.extend(out.latencies);
                errors.extend(out.errors);
                csrs_exhausted |= out.csrs_exhausted;
            }
            Err(e) => errors.push(format!("worker task: {e}")),
        }
    }
    let elapsed = start.elapsed();
    let cpu1 = (emu.cpu(), own_cpu());
    latencies.sort();
    Phase {
        ok: latencies.len(),
        elapsed,
        latencies,
        errors,
        server_cpu: cpu1.0.saturating_sub(cpu0.0),
        client_cpu: cpu1.1.saturating_sub(cpu0.1),
        csrs_exhausted,
    }
}

fn percentile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// `count` P-256 CSRs, made on both cores before the timed section.
fn make_csrs(count: usize) -> Result<Vec<String>, String> {
    let threads = 2;
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let n = count / threads + usize::from(t < count % threads);
            std::thread::spawn(move || -> Result<Vec<String>, String> {
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
                        .map_err(|e| e.to_string())?;
                    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())
                        .map_err(|e| e.to_string())?;
                    params
                        .distinguished_name
                        .push(rcgen::DnType::CommonName, "bench-device");
                    let csr = params.serialize_request(&key).map_err(|e| e.to_string())?;
                    v.push(csr.pem().map_err(|e| e.to_string())?);
                }
                Ok(v)
            })
        })
        .collect();
    let mut all = Vec::with_capacity(count);
    for h in handles {
        all.extend(h.join().map_err(|_| "CSR thread panicked".to_string())??);
    }
    Ok(all)
}

// ---------------------------------------------------------------------------------------------
// Output.

fn line(label: &str, value: impl std::fmt::Display) {
    println!("  {label:<62} {value}");
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

fn print_phase(title: &str, ph: &Phase) -> f64 {
    let rate = ph.ok as f64 / ph.elapsed.as_secs_f64().max(1e-9);
    let per = |d: Duration| {
        if ph.ok == 0 {
            "-".to_string()
        } else {
            format!("{:.2} ms", d.as_secs_f64() * 1000.0 / ph.ok as f64)
        }
    };
    println!("  {title}");
    line("  provisionings completed", ph.ok);
    line("  wall time", format!("{:.2} s", ph.elapsed.as_secs_f64()));
    line("  provisionings/s", format!("{rate:.0}"));
    line(
        "  latency per provisioning p50",
        ms(percentile(&ph.latencies, 0.50)),
    );
    line(
        "  latency per provisioning p99",
        ms(percentile(&ph.latencies, 0.99)),
    );
    line("  emulator CPU time per provisioning", per(ph.server_cpu));
    line(
        "  bench client CPU time per provisioning",
        per(ph.client_cpu),
    );
    if ph.ok > 0 && !ph.server_cpu.is_zero() {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get()) as f64;
        let capacity = cores * ph.ok as f64 / ph.server_cpu.as_secs_f64();
        line(
            &format!("  emulator-only capacity (all {cores} cores / CPU per prov.)"),
            format!("{capacity:.0}/s"),
        );
    }
    if ph.csrs_exhausted {
        line(
            "  note",
            "the pre-generated CSRs ran out before the deadline",
        );
    }
    if !ph.errors.is_empty() {
        line("  ERRORS", ph.errors.len());
    }
    rate
}

fn verdict(met: bool, what: String) -> String {
    format!("{} ({what})", if met { "MET" } else { "MISSED" })
}

// ---------------------------------------------------------------------------------------------

struct ConnResult {
    held: usize,
    errors: Vec<String>,
}

async fn connections_phase(ctx: &Arc<Ctx>, emu: &Emulator, p: &Params) -> ConnResult {
    let mut errors = Vec::new();
    // Baseline: after one connection has come and gone, so TLS and the runtime are warm.
    match Mqtt::connect(ctx.addr, &ctx.tls, "bench-warmup", 1200).await {
        Ok(mut m) => {
            if let Err(e) = m.ping().await {
                errors.push(format!("warm-up: {e}"));
            }
            m.disconnect().await;
        }
        Err(e) => errors.push(format!("warm-up: {e}")),
    }
    let rss0 = emu.rss_kb();
    let cpu0 = emu.cpu();
    let sem = Arc::new(tokio::sync::Semaphore::new(p.open_concurrency));
    let start = Instant::now();
    let mut set = JoinSet::new();
    for i in 0..p.connections {
        let ctx = ctx.clone();
        let sem = sem.clone();
        set.spawn(async move {
            let _permit = sem.acquire_owned().await.map_err(|e| e.to_string())?;
            Mqtt::connect(ctx.addr, &ctx.tls, &format!("bench-conn-{i}"), 1200).await
        });
    }
    let mut clients = Vec::with_capacity(p.connections);
    while let Some(joined) = set.join_next().await {
        match joined {
            Ok(Ok(m)) => clients.push(m),
            Ok(Err(e)) => errors.push(format!("connection: {e}")),
            Err(e) => errors.push(format!("connection task: {e}")),
        }
    }
    let open_time = start.elapsed();
    let cpu_open = emu.cpu().saturating_sub(cpu0);
    let opened = clients.len();
    // All open at once now; prove each still answers.
    let mut set = JoinSet::new();
    for mut m in clients {
        set.spawn(async move {
            let r = m.ping().await;
            (m, r)
        });
    }
    let mut held = Vec::with_capacity(opened);
    while let Some(joined) = set.join_next().await {
        match joined {
            Ok((m, Ok(()))) => held.push(m),
            Ok((_, Err(e))) => errors.push(format!("held connection: {e}")),
            Err(e) => errors.push(format!("ping task: {e}")),
        }
    }
    let rss1 = emu.rss_kb();
    let n = held.len();
    println!("1. Concurrent connections (TLS 1.3 + MQTT 3.1.1 CONNECT, claim certificate)");
    line("connections asked for", p.connections);
    line(
        "connections held open at once and answering PINGREQ",
        format!("{n} / {}", p.connections),
    );
    line(
        "time to open them all",
        format!(
            "{:.2} s ({} opening at a time)",
            open_time.as_secs_f64(),
            p.open_concurrency
        ),
    );
    line(
        "connections/s",
        format!("{:.0}", opened as f64 / open_time.as_secs_f64().max(1e-9)),
    );
    if opened > 0 {
        line(
            "emulator CPU time per connection (handshake + CONNECT)",
            format!("{:.2} ms", cpu_open.as_secs_f64() * 1000.0 / opened as f64),
        );
    }
    let kb = |v: Option<u64>| v.map_or("unknown".to_string(), |v| format!("{v} KB"));
    line(
        "emulator RSS before (idle, after one warm-up connection)",
        kb(rss0),
    );
    line(&format!("emulator RSS with {n} connections"), kb(rss1));
    if let (Some(a), Some(b), true) = (rss0, rss1, n > 0) {
        line(
            "emulator memory per connection",
            format!("{:.1} KB", b.saturating_sub(a) as f64 / n as f64),
        );
    }
    let mut set = JoinSet::new();
    for m in held {
        set.spawn(m.disconnect());
    }
    while set.join_next().await.is_some() {}
    ConnResult { held: n, errors }
}

async fn run(p: &Params, emu: &Emulator) -> Result<Vec<String>, String> {
    let ctx = Arc::new(Ctx {
        addr: emu.addr,
        tls: tls_config(
            &emu.read("ca.pem")?,
            &emu.read("claim.pem")?,
            &emu.read("claim.key")?,
        )?,
    });
    let mut errors = Vec::new();

    let conns = connections_phase(&ctx, emu, p).await;
    errors.extend(conns.errors);
    println!();

    println!(
        "2. Provisioning throughput (EC P-256, DemoTemplate, JSON, {} concurrent clients, {} s each)",
        p.clients, p.seconds
    );
    let keys = run_phase(&ctx, emu, Mode::Keys, p, Vec::new()).await;
    let keys_rate = print_phase(
        "CreateKeysAndCertificate + RegisterThing, persistent claim connections:",
        &keys,
    );
    errors.extend(keys.errors.iter().cloned());

    // Enough CSRs for twice the keys rate, made before the clock starts.
    let per_worker = ((keys_rate * 2.0 * p.seconds as f64 / p.clients as f64).ceil() as usize)
        .clamp(50, 100_000 / p.clients.max(1) + 50);
    let csr_start = std::time::Instant::now();
    let csrs = make_csrs(per_worker * p.clients)?;
    let csr_time = csr_start.elapsed();
    let pools: Vec<Vec<String>> = csrs.chunks(per_worker).map(<[String]>::to_vec).collect();
    drop(csrs);
    let csr = run_phase(&ctx, emu, Mode::Csr, p, pools).await;
    print_phase(
        "CreateCertificateFromCsr + RegisterThing, persistent claim connections:",
        &csr,
    );
    line(
        "  (CSRs pre-generated, not timed)",
        format!(
            "{} in {:.2} s",
            per_worker * p.clients,
            csr_time.as_secs_f64()
        ),
    );
    errors.extend(csr.errors.iter().cloned());

    let full = run_phase(&ctx, emu, Mode::FullFlow, p, Vec::new()).await;
    let full_rate = print_phase(
        "Full flow, a new TLS claim connection per device (connect, subscribe, keys, register):",
        &full,
    );
    errors.extend(full.errors.iter().cloned());
    println!();

    // Everything reported as provisioned must be in the registry.
    let provisioned = keys.ok + csr.ok + full.ok;
    match emu.registry() {
        Ok(reg) => {
            let things = reg["things"].as_array().map_or(0, |t| {
                t.iter()
                    .filter(|t| t["name"].as_str().is_some_and(|n| n.starts_with("demo-")))
                    .count()
            });
            let active = reg["certificates"].as_array().map_or(0, |c| {
                c.iter()
                    .filter(|c| c["status"] == "ACTIVE" && c["origin"] != "claim")
                    .count()
            });
            if things != provisioned || active != provisioned {
                errors.push(format!(
                    "registry holds {things} demo things and {active} active device certificates, expected {provisioned} of each"
                ));
            }
            println!("Registry check");
            line(
                "things / active device certificates in the registry",
                format!("{things} / {active} (provisioned: {provisioned})"),
            );
        }
        Err(e) => errors.push(format!("registry: {e}")),
    }
    println!();

    println!("3. Targets");
    let conn_met = conns.held >= TARGET_CONNECTIONS;
    line(
        "1,000 concurrent connections held",
        if p.connections < TARGET_CONNECTIONS {
            format!(
                "NOT TESTED (FLEETPROV_BENCH_CONNECTIONS={}; {} held)",
                p.connections, conns.held
            )
        } else {
            verdict(
                conn_met,
                if conn_met {
                    format!("{} held", conns.held)
                } else {
                    format!(
                        "{} held, short by {}",
                        conns.held,
                        TARGET_CONNECTIONS - conns.held
                    )
                },
            )
        },
    );
    let rate_verdict = |rate: f64| {
        let met = rate >= TARGET_RATE;
        verdict(
            met,
            if met {
                format!("{rate:.0}/s")
            } else {
                format!(
                    "{rate:.0}/s, short by {:.0}/s ({:.0}%)",
                    TARGET_RATE - rate,
                    100.0 * (TARGET_RATE - rate) / TARGET_RATE
                )
            },
        )
    };
    line(
        ">= 500 provisionings/s, EC keys (CreateKeysAndCertificate)",
        rate_verdict(keys_rate),
    );
    line(
        "(for information) full flow with a TLS connection per device",
        rate_verdict(full_rate),
    );
    if !emu.alive() {
        errors.push("the emulator process died".into());
    }
    Ok(errors)
}

fn main() -> ExitCode {
    // `cargo bench` passes `--bench`; a filter argument that excludes "load" skips the run.
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args
        .iter()
        .any(|a| !a.starts_with('-') && !"load".contains(a.as_str()))
    {
        return ExitCode::SUCCESS;
    }
    let p = match Params::from_env() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("load bench: {e}");
            return ExitCode::from(2);
        }
    };
    let bin = emulator_binary();
    let dir = std::env::temp_dir().join(format!("fleetprov-bench-{}", std::process::id()));
    let emu = match Emulator::start(&bin, &dir) {
        Ok(e) => e,
        Err(e) => {
            eprintln!("load bench: {e}");
            return ExitCode::FAILURE;
        }
    };
    // The whole run is bounded: past max_seconds the watchdog stops the emulator and exits.
    {
        let child = emu.child.clone();
        let (dir, limit) = (dir.clone(), p.max_seconds);
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(limit));
            eprintln!(
                "load bench: still running after {limit} s (FLEETPROV_BENCH_MAX_SECONDS); stopping"
            );
            if let Some(mut c) = child.lock().unwrap_or_else(|e| e.into_inner()).take() {
                let _ = c.kill();
                let _ = c.wait();
            }
            let _ = std::fs::remove_dir_all(&dir);
            std::process::exit(1);
        });
    }
    let fd_limit = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|l| {
            l.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| {
                    l.split_whitespace()
                        .nth(3)
                        .and_then(|v| v.parse::<usize>().ok())
                })
        });
    println!("fleetprov-emulator load benchmark");
    line("emulator", format!("{} (pid {})", bin.display(), emu.pid));
    line("listening on", emu.addr);
    line(
        "CreateKeysAndCertificate key type",
        "EC P-256 (--key-type ec)",
    );
    line(
        "CPUs (shared by the emulator and this client)",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
    );
    if let Some(limit) = fd_limit {
        line("open file limit", limit);
        if limit < p.connections + 100 {
            println!(
                "  WARNING: the open file limit is below the connections asked for (+100); raise it with `ulimit -n`"
            );
        }
    }
    println!();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("load bench: runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let errors = match runtime.block_on(run(&p, &emu)) {
        Ok(errors) => errors,
        Err(e) => vec![e],
    };
    drop(runtime);
    drop(emu);
    if errors.is_empty() {
        println!("\nno errors");
        ExitCode::SUCCESS
    } else {
        println!("\nBROKEN: {} error(s); the first ones:", errors.len());
        for e in errors.iter().take(10) {
            println!("  {e}");
        }
        ExitCode::FAILURE
    }
}
