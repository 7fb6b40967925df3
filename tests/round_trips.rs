//! Performance that can be checked without a clock: the number of round trips a provisioning
//! takes, counted by a proxy between the library and the emulator, and TCP_NODELAY on the
//! library's socket (without it, Nagle's algorithm held every RegisterThing behind the
//! server's delayed ACK: 40 ms a provisioning). Timings themselves belong to the benchmark.
//!
//! A *turn* is counted each time the traffic of a connection flips from client->server to
//! server->client: one round trip the client had to wait for. The proxy forwards each chunk
//! after a few milliseconds, so that writes the client makes back to back reach the server
//! before any reply can come back, as they do over a real network. A connection's turns are read
//! when the flow has what it needed from it (the claim connection at REGISTERED, the
//! verification connection at VERIFIED): what the server sends while the client closes it (a
//! TLS close_notify answering the client's close) is no round trip anyone waits for, and its
//! timing against the close varies.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use fleetprov::engine::flow::Progress;
use fleetprov::engine::Step;
use fleetprov::keys::KeyType;
use fleetprov::protocol::Format;
use fleetprov::provision::{self, Hooks};
use fleetprov::{Method, MqttVersion, Request};

/// The emulated one-way latency. Long enough that a client which writes two packets back to back
/// (TLS 1.3's Finished, then CONNECT) has both at the server before any answer could return,
/// even when the client's thread is descheduled between the two writes: with 10 ms, about one
/// run in twenty counted TLS 1.3's session tickets, which the client never waits for, as a turn.
const DELAY: Duration = Duration::from_millis(30);

#[derive(Default)]
struct Conn {
    turns: usize,
    last_up: bool,
}

/// A proxy to `upstream` on a loopback port; per connection (in accept order), its turns.
struct Proxy {
    port: u16,
    conns: Arc<Mutex<Vec<Conn>>>,
}

impl Proxy {
    fn start(upstream: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let conns = Arc::new(Mutex::new(Vec::new()));
        let table = conns.clone();
        thread::spawn(move || {
            // Bounded: a provisioning opens two connections (claim, verification); a few more
            // are tolerated for retries, then the proxy stops accepting.
            for client in listener.incoming().take(8) {
                let Ok(client) = client else { return };
                let server = TcpStream::connect(("127.0.0.1", upstream)).unwrap();
                let index = {
                    let mut t = table.lock().unwrap();
                    t.push(Conn::default());
                    t.len() - 1
                };
                for (from, to, up) in [
                    (
                        client.try_clone().unwrap(),
                        server.try_clone().unwrap(),
                        true,
                    ),
                    (server, client, false),
                ] {
                    let table = table.clone();
                    thread::spawn(move || pump(from, to, up, index, &table));
                }
            }
        });
        Proxy { port, conns }
    }

    fn turns(&self) -> Vec<usize> {
        turns_of(&self.conns)
    }
}

fn turns_of(conns: &Mutex<Vec<Conn>>) -> Vec<usize> {
    conns.lock().unwrap().iter().map(|c| c.turns).collect()
}

/// Forwards `from` to `to`, each chunk after DELAY, counting flips to server->client.
fn pump(mut from: TcpStream, mut to: TcpStream, up: bool, index: usize, table: &Mutex<Vec<Conn>>) {
    let mut buf = vec![0u8; 65536];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        {
            let mut t = table.lock().unwrap();
            let c = &mut t[index];
            if !up && c.last_up {
                c.turns += 1;
            }
            c.last_up = up;
        }
        thread::sleep(DELAY); // the emulated network, not synchronisation
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

/// Whether the library's socket connected to `port` has TCP_NODELAY, read from the socket
/// itself (found among this process's descriptors by its peer address).
fn nodelay_towards(port: u16) -> Option<bool> {
    for entry in std::fs::read_dir("/proc/self/fd").ok()?.flatten() {
        let Ok(fd) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        // SAFETY: sockaddr_in is plain data, valid all-zero.
        let mut addr: libc::sockaddr_in = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        // SAFETY: getpeername writes at most `len` bytes into `addr`; a descriptor that is no
        // socket (or closed meanwhile) makes it fail, which is handled.
        let r = unsafe { libc::getpeername(fd, (&raw mut addr).cast(), &mut len) };
        if r != 0
            || i32::from(addr.sin_family) != libc::AF_INET
            || u16::from_be(addr.sin_port) != port
        {
            continue;
        }
        let mut on: libc::c_int = 0;
        let mut size = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt writes one c_int into `on`.
        let r = unsafe {
            libc::getsockopt(
                fd,
                libc::IPPROTO_TCP,
                libc::TCP_NODELAY,
                (&raw mut on).cast(),
                &mut size,
            )
        };
        if r == 0 {
            return Some(on != 0);
        }
    }
    None
}

#[test]
fn provisioning_takes_the_round_trips_it_took_and_sets_tcp_nodelay() {
    // (method, format, MQTT version, turns of the claim connection, of the verification
    // connection): the TLS 1.3 handshake, CONNECT and SUBSCRIBE in one flight, then the two
    // requests; both APIs in both formats over each version.
    let rows = [
        (
            Method::Csr(KeyType::P256),
            Format::Json,
            MqttVersion::V5,
            4,
            2,
        ),
        (Method::CreateKeys, Format::Cbor, MqttVersion::V5, 4, 2),
        (
            Method::Csr(KeyType::P256),
            Format::Cbor,
            MqttVersion::V311,
            4,
            2,
        ),
        (Method::CreateKeys, Format::Json, MqttVersion::V311, 4, 2),
    ];
    for (method, format, version, claim_turns, verify_turns) in rows {
        let name = format!("{method:?}-{format:?}-{version:?}").replace(['(', ')'], "");
        let env = common::env("round-trips", &name, &[]);
        let proxy = Proxy::start(env.emu.port());
        let mut connection = common::connection(&env.emu, format);
        connection.port = proxy.port;
        connection.mqtt_version = version;
        let mut r = Request::new(connection, "DemoTemplate", method);
        r.parameters.insert("SerialNumber".into(), name.clone());
        let nodelay = Arc::new(Mutex::new(Vec::new()));
        let seen = nodelay.clone();
        let port = proxy.port;
        // Each connection's turns once the flow is done with it: [claim, verification].
        let turns = Arc::new(Mutex::new(Vec::new()));
        let (taken, conns) = (turns.clone(), proxy.conns.clone());
        let hooks = Hooks {
            progress: Some(Arc::new(move |p: &Progress| {
                // Connected (with the claim certificate) at this step: look at the socket. The
                // verification connection is opened by the same code.
                if p.step == Step::Subscribed {
                    seen.lock().unwrap().push(nodelay_towards(port));
                }
                // A turn is counted when the proxy reads a reply, before the client has it: the
                // reply the step reports on is counted already.
                let index = match p.step {
                    Step::Registered => 0,
                    Step::Verified => 1,
                    _ => return,
                };
                if let Some(n) = turns_of(&conns).get(index) {
                    taken.lock().unwrap().push(*n);
                }
            })),
            ..Hooks::default()
        };
        let p = provision::provision(&r, &hooks).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(p.attempts, 1, "{name}");
        assert_eq!(
            *nodelay.lock().unwrap(),
            vec![Some(true)],
            "{name}: TCP_NODELAY on the library's socket"
        );
        let turns = turns.lock().unwrap().clone();
        assert_eq!(
            turns,
            vec![claim_turns, verify_turns],
            "{name}: round trips of the claim and the verification connection (all turns, the \
             closes included: {:?})",
            proxy.turns()
        );
        let _ = std::fs::remove_dir_all(&env.dir);
    }
}
