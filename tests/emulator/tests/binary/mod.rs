//! Shared by the suites that run the `fleetprov-emulator` binary (cli.rs, persistence.rs): a
//! child-process guard that waits for `listening on HOST:PORT`, a bounded command runner and a
//! small MQTT-over-TLS client for an address (errors instead of panics, so that clients of an
//! emulator killed on purpose can stop cleanly). Needs `mod common;` beside it.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex};

use bytes::BytesMut;
use fleetprov_emulator::wire::{self, Packet, Version, WireError};
use fleetprov_emulator::Format;
use rustls::pki_types::ServerName;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::common::{client_config, enc, keys_topic, register_topic, WAIT};

pub const BIN: &str = env!("CARGO_BIN_EXE_fleetprov-emulator");

/// Runs the binary with `args` to completion (bounded by `WAIT`; killed if it takes longer).
pub async fn run(args: &[&str]) -> Output {
    let child = Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("the binary starts");
    tokio::time::timeout(WAIT, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("`fleetprov-emulator {}` did not finish", args.join(" ")))
        .expect("output")
}

/// A running emulator process; killed (SIGKILL) when dropped, on every path.
pub struct Emu {
    child: Child,
    pub dir: PathBuf,
    /// The MQTT address from `listening on HOST:PORT` (once seen).
    pub addr: Option<SocketAddr>,
    /// The control address from `control on HOST:PORT` (if asked for).
    pub control: Option<SocketAddr>,
    lines: mpsc::UnboundedReceiver<String>,
    stderr: Arc<Mutex<String>>,
}

impl Drop for Emu {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

impl Emu {
    /// Spawns `fleetprov-emulator --data-dir DIR --port 0 --key-type ec EXTRA...` without
    /// waiting for anything.
    pub fn spawn(dir: &Path, extra: &[&str]) -> Emu {
        let mut args: Vec<&str> = vec![
            "--data-dir",
            dir.to_str().unwrap(),
            "--port",
            "0",
            "--key-type",
            "ec",
        ];
        args.extend_from_slice(extra);
        Emu::spawn_args(dir, &args)
    }

    /// Spawns the binary with exactly `args`; stdout lines are read (and drained) by a task.
    pub fn spawn_args(dir: &Path, args: &[&str]) -> Emu {
        let mut child = Command::new(BIN)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("the binary starts");
        let (tx, lines) = mpsc::unbounded_channel();
        let stdout = child.stdout.take().unwrap();
        tokio::spawn(async move {
            let mut out = BufReader::new(stdout).lines();
            // Keeps draining after the receiver is gone, until EOF.
            while let Ok(Some(line)) = out.next_line().await {
                let _ = tx.send(line);
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let errors = child.stderr.take().unwrap();
        let sink = stderr.clone();
        tokio::spawn(async move {
            let mut err = BufReader::new(errors).lines();
            while let Ok(Some(line)) = err.next_line().await {
                let mut s = sink.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
            }
        });
        Emu {
            child,
            dir: dir.to_path_buf(),
            addr: None,
            control: None,
            lines,
            stderr,
        }
    }

    /// Spawns and waits (bounded) for `listening on` (and `control on` when `--control-port`
    /// is among `extra`).
    pub async fn start(dir: &Path, extra: &[&str]) -> Emu {
        let mut emu = Emu::spawn(dir, extra);
        emu.wait_listening(extra.contains(&"--control-port")).await;
        emu
    }

    /// Waits for `listening on HOST:PORT` (and `control on HOST:PORT` if `control`).
    pub async fn wait_listening(&mut self, control: bool) {
        let deadline = tokio::time::Instant::now() + WAIT;
        while self.addr.is_none() || (control && self.control.is_none()) {
            let line = match tokio::time::timeout_at(deadline, self.lines.recv()).await {
                Ok(Some(line)) => line,
                Ok(None) => panic!(
                    "the emulator ended before listening; stderr: {}",
                    self.stderr()
                ),
                Err(_) => panic!("no `listening on` line in time; stderr: {}", self.stderr()),
            };
            let parse = |rest: &str| -> SocketAddr {
                rest.parse()
                    .unwrap_or_else(|e| panic!("{line:?}: not HOST:PORT: {e}"))
            };
            if let Some(rest) = line.strip_prefix("listening on ") {
                self.addr = Some(parse(rest));
            } else if let Some(rest) = line.strip_prefix("control on ") {
                self.control = Some(parse(rest));
            }
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr.expect("listening")
    }

    pub fn pid(&self) -> u32 {
        self.child.id().expect("still running")
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// SIGKILL, then waits (bounded) for the process to end.
    pub async fn kill9(&mut self) -> ExitStatus {
        let _ = self.child.start_kill();
        self.wait_exit().await
    }

    /// SIGTERM, then waits (bounded) for the process to end.
    pub async fn term(&mut self) -> ExitStatus {
        let status = tokio::time::timeout(
            WAIT,
            Command::new("kill")
                .args(["-TERM", &self.pid().to_string()])
                .status(),
        )
        .await
        .expect("kill in time")
        .expect("kill runs");
        assert!(status.success(), "kill -TERM failed");
        self.wait_exit().await
    }

    async fn wait_exit(&mut self) -> ExitStatus {
        tokio::time::timeout(WAIT, self.child.wait())
            .await
            .expect("the emulator ended in time")
            .expect("wait")
    }

    pub fn read(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
    }

    /// Connects with the claim certificate of the data directory.
    pub async fn claim_client(&self, client_id: &str) -> Result<Mqtt, String> {
        Mqtt::connect(
            self.addr(),
            &self.read("ca.pem"),
            &self.read("claim.pem"),
            &self.read("claim.key"),
            client_id,
        )
        .await
    }

    /// Connects with another certificate.
    pub async fn client(&self, cert: &str, key: &str, client_id: &str) -> Result<Mqtt, String> {
        Mqtt::connect(self.addr(), &self.read("ca.pem"), cert, key, client_id).await
    }
}

/// A minimal MQTT 3.1.1 client over TLS; every wait is bounded by `WAIT`.
pub struct Mqtt {
    stream: TlsStream<TcpStream>,
    buf: BytesMut,
    next_pkid: u16,
}

const V: Version = Version::V4;

impl Mqtt {
    pub async fn connect(
        addr: SocketAddr,
        ca: &str,
        cert: &str,
        key: &str,
        client_id: &str,
    ) -> Result<Mqtt, String> {
        let cfg = client_config(ca, cert, key, &Default::default());
        let stream = tokio::time::timeout(WAIT, async {
            let tcp = TcpStream::connect(addr).await?;
            TlsConnector::from(Arc::new(cfg))
                .connect(ServerName::try_from("localhost").unwrap(), tcp)
                .await
        })
        .await
        .map_err(|_| "TLS timed out".to_string())?
        .map_err(|e| format!("TLS: {e}"))?;
        let mut c = Mqtt {
            stream,
            buf: BytesMut::new(),
            next_pkid: 0,
        };
        c.send(&Packet::Connect {
            client_id: client_id.into(),
            keep_alive: 60,
            clean: true,
            will: None,
        })
        .await?;
        match c.recv().await? {
            Packet::ConnAck { code: 0, .. } => Ok(c),
            other => Err(format!("no successful CONNACK: {other:?}")),
        }
    }

    async fn send(&mut self, p: &Packet) -> Result<(), String> {
        let mut out = BytesMut::new();
        wire::write(V, p, &mut out).map_err(|e| e.to_string())?;
        self.stream
            .write_all(&out)
            .await
            .map_err(|e| format!("write: {e}"))?;
        self.stream.flush().await.map_err(|e| format!("flush: {e}"))
    }

    /// The next packet; Err on close, timeout or undecodable bytes.
    async fn recv(&mut self) -> Result<Packet, String> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match wire::read(V, &mut self.buf, 1 << 24) {
                Ok(p) => return Ok(p),
                Err(WireError::Incomplete) => {}
                Err(e) => return Err(format!("undecodable server bytes: {e}")),
            }
            match tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.buf)).await {
                Err(_) => return Err("timed out".into()),
                Ok(Ok(0)) => return Err("closed".into()),
                Ok(Err(e)) => return Err(format!("read: {e}")),
                Ok(Ok(_)) => {}
            }
        }
    }

    /// The next packet that is not a PUBACK.
    async fn next(&mut self) -> Result<Packet, String> {
        loop {
            match self.recv().await? {
                Packet::PubAck { .. } => {}
                p => return Ok(p),
            }
        }
    }

    fn pkid(&mut self) -> u16 {
        self.next_pkid = self.next_pkid.wrapping_add(1).max(1);
        self.next_pkid
    }

    /// Subscribes at QoS 1 to `topic/accepted` and `topic/rejected` of each request topic.
    pub async fn subscribe_replies(&mut self, topics: &[&str]) -> Result<(), String> {
        let pkid = self.pkid();
        let filters: Vec<(String, u8)> = topics
            .iter()
            .flat_map(|t| [(format!("{t}/accepted"), 1), (format!("{t}/rejected"), 1)])
            .collect();
        let n = filters.len();
        self.send(&Packet::Subscribe { pkid, filters }).await?;
        match self.next().await? {
            Packet::SubAck { pkid: got, codes } if got == pkid && codes == vec![Ok(1); n] => Ok(()),
            other => Err(format!("unexpected answer to SUBSCRIBE: {other:?}")),
        }
    }

    /// Publishes a request at QoS 1 (already subscribed) and returns (accepted?, reply).
    pub async fn request(
        &mut self,
        topic: &str,
        format: Format,
        payload: &[u8],
    ) -> Result<(bool, Value), String> {
        let pkid = self.pkid();
        self.send(&Packet::Publish {
            topic: topic.into(),
            qos: 1,
            pkid,
            retain: false,
            dup: false,
            payload: payload.to_vec().into(),
            topic_alias: None,
        })
        .await?;
        let (reply, body) = match self.next().await? {
            Packet::Publish { topic, payload, .. } => (topic, payload),
            other => return Err(format!("expected a reply, got {other:?}")),
        };
        let accepted = if reply == format!("{topic}/accepted") {
            true
        } else if reply == format!("{topic}/rejected") {
            false
        } else {
            return Err(format!("reply on unexpected topic {reply}"));
        };
        let value = fleetprov_emulator::decode(format, &body)?;
        Ok((accepted, value))
    }

    /// PINGREQ answered by PINGRESP: the connection is open and served.
    pub async fn ping(&mut self) -> Result<(), String> {
        self.send(&Packet::PingReq).await?;
        match self.next().await? {
            Packet::PingResp => Ok(()),
            other => Err(format!("expected PINGRESP, got {other:?}")),
        }
    }
}

/// A provisioned device.
#[derive(Debug, Clone)]
pub struct Device {
    pub thing_name: String,
    pub certificate_id: String,
    pub certificate_pem: String,
    pub key_pem: String,
}

/// Subscribes `c` to the reply topics used by [`provision`] (JSON, DemoTemplate).
pub async fn subscribe_provisioning(c: &mut Mqtt) -> Result<(), String> {
    c.subscribe_replies(&[
        &keys_topic(Format::Json),
        &register_topic("DemoTemplate", Format::Json),
    ])
    .await
}

/// CreateKeysAndCertificate + RegisterThing(DemoTemplate) over a subscribed connection. Err
/// for connection failures; a rejection is reported as `Ok(Err(reply))`.
pub async fn provision(c: &mut Mqtt, serial: &str) -> Result<Result<Device, Value>, String> {
    let (ok, v) = c
        .request(&keys_topic(Format::Json), Format::Json, b"")
        .await?;
    if !ok {
        return Ok(Err(v));
    }
    let field = |name: &str| {
        v[name]
            .as_str()
            .map(str::to_owned)
            .ok_or(format!("no {name} in {v}"))
    };
    let (id, pem, key, token) = (
        field("certificateId")?,
        field("certificatePem")?,
        field("privateKey")?,
        field("certificateOwnershipToken")?,
    );
    let payload = enc(
        Format::Json,
        &json!({"certificateOwnershipToken": token, "parameters": {"SerialNumber": serial}}),
    );
    let (ok, r) = c
        .request(
            &register_topic("DemoTemplate", Format::Json),
            Format::Json,
            &payload,
        )
        .await?;
    if !ok {
        return Ok(Err(r));
    }
    Ok(Ok(Device {
        thing_name: r["thingName"].as_str().unwrap_or_default().to_owned(),
        certificate_id: id,
        certificate_pem: pem,
        key_pem: key,
    }))
}

/// `fleetprov-emulator list --data-dir DIR`, which must succeed, parsed.
pub async fn list(dir: &Path) -> Value {
    let out = run(&["list", "--data-dir", dir.to_str().unwrap()]).await;
    assert!(
        out.status.success(),
        "list failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("list prints JSON")
}

/// The certificate `id` in a registry snapshot.
pub fn find_cert<'a>(registry: &'a Value, id: &str) -> Option<&'a Value> {
    registry["certificates"]
        .as_array()?
        .iter()
        .find(|c| c["id"] == id)
}

/// The thing `name` in a registry snapshot.
pub fn find_thing<'a>(registry: &'a Value, name: &str) -> Option<&'a Value> {
    registry["things"]
        .as_array()?
        .iter()
        .find(|t| t["name"] == name)
}
