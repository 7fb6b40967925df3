//! A slow cellular link (LTE-M, NB-IoT): 2 s round trips and 20 kB/s each way, emulated by a
//! proxy between the library and the emulator. With the library's defaults (step timeout,
//! keep-alive, retry policy) a provisioning succeeds at the first attempt, with both certificate
//! APIs and both formats, and the emulator's RSA-2048 CA (certificates as large as AWS's).
//!
//! The proxy is a delay line: every chunk is forwarded one second after it arrived (one way),
//! and no faster than the rate allows, the way a network delays traffic; chunks queue behind
//! each other only for the rate, not for the delay. The TCP handshake with the proxy happens on
//! loopback, so the client's first bytes are held one round trip longer: they reach the server
//! when they would have after a handshake over the slow link.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use fleetprov::keys::KeyType;
use fleetprov::protocol::Format;
use fleetprov::provision::{self, Hooks};
use fleetprov::{Config, Method, Request, Roots, Secret};
use fleetprov_emulator::{Config as EmuConfig, Emulator, KeyKind};

/// One way: half the round trip.
const ONE_WAY: Duration = Duration::from_millis(1000);
/// Bytes per second, each way.
const RATE: u64 = 20_000;

/// A proxy to `upstream` with [`ONE_WAY`] latency and [`RATE`] each way; returns its port.
fn slow_proxy(upstream: u16) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    thread::spawn(move || {
        // Bounded: two connections per provisioning (claim, verification), a few spare.
        for client in listener.incoming().take(16) {
            let Ok(client) = client else { return };
            let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
                return;
            };
            for (from, to, handshake) in [
                (
                    client.try_clone().unwrap(),
                    server.try_clone().unwrap(),
                    2 * ONE_WAY,
                ),
                (server, client, Duration::ZERO),
            ] {
                delay_line(from, to, handshake);
            }
        }
    });
    port
}

/// Forwards `from` to `to` through a reader thread (stamps each chunk with its arrival) and a
/// writer thread (sends it at arrival + ONE_WAY, and not before the rate allows). The first
/// chunk is held `handshake` longer.
fn delay_line(mut from: TcpStream, mut to: TcpStream, handshake: Duration) {
    let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
    thread::spawn(move || {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if tx.send((Instant::now(), buf[..n].to_vec())).is_err() {
                        break;
                    }
                }
            }
        }
    });
    thread::spawn(move || {
        let mut line_free = Instant::now() + handshake;
        let mut extra = handshake;
        while let Ok((arrived, bytes)) = rx.recv() {
            // The emulated network, not synchronisation: the chunk is on the wire this long.
            let due = arrived + ONE_WAY + std::mem::take(&mut extra);
            let sending = line_free.max(arrived);
            line_free = sending + Duration::from_micros(bytes.len() as u64 * 1_000_000 / RATE);
            let at = due.max(line_free);
            thread::sleep(at.saturating_duration_since(Instant::now()));
            if to.write_all(&bytes).is_err() {
                break;
            }
        }
        let _ = to.shutdown(Shutdown::Write);
    });
}

#[test]
fn a_two_second_round_trip_link_provisions_with_the_defaults() {
    let dir = common::scratch("slow-link", "defaults");
    let mut emu_config = EmuConfig::new(dir.join("emulator"));
    emu_config.key_kind = KeyKind::EcP256;
    let emu = Emulator::start(emu_config).expect("emulator starts");
    let paths = emu.paths();
    let rows = [
        (Method::Csr(KeyType::P256), Format::Json),
        (Method::CreateKeys, Format::Cbor),
    ];
    // Both rows at once: each waits on the link, not on the CPU.
    let runs: Vec<_> = rows
        .into_iter()
        .enumerate()
        .map(|(i, (method, format))| {
            let mut c = Config::new(
                "localhost",
                std::fs::read_to_string(&paths.claim_cert).unwrap(),
                Secret::new(std::fs::read_to_string(&paths.claim_key).unwrap()),
            );
            // Everything else as a user gets it: step timeout, keep-alive, retry policy.
            c.port = slow_proxy(emu.port());
            c.roots = Roots::Pem(std::fs::read_to_string(&paths.ca_cert).unwrap());
            c.format = format;
            c.client_id = format!("slow-{i}");
            let defaults = Config::new("x", String::new(), Secret::new(String::new()));
            assert_eq!(
                (c.step_timeout, c.keep_alive, c.overall_timeout),
                (
                    defaults.step_timeout,
                    defaults.keep_alive,
                    defaults.overall_timeout
                )
            );
            let mut r = Request::new(c, "DemoTemplate", method.clone());
            r.parameters
                .insert("SerialNumber".into(), format!("slow-{i}"));
            thread::spawn(move || {
                let started = Instant::now();
                let result = provision::provision(&r, &Hooks::default());
                (method, format, result, started.elapsed())
            })
        })
        .collect();
    for run in runs {
        let (method, format, result, took) = run.join().unwrap();
        let p = result.unwrap_or_else(|e| panic!("{method:?} {format:?}: {e}"));
        assert_eq!(p.attempts, 1, "{method:?} {format:?}: no retry needed");
        assert!(p.thing_name.starts_with("demo-slow-"), "{}", p.thing_name);
        // Five round trips on the claim connection (TCP, TLS 1.3, CONNECT with SUBSCRIBE, the
        // certificate, RegisterThing), three on the verification connection: about 16 s.
        eprintln!("{method:?} {format:?}: provisioned over a 2 s RTT link in {took:.1?}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
