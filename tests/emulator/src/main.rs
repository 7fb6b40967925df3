//! `fleetprov-emulator`: run the AWS IoT fleet provisioning emulator, list its registry, or
//! talk to its control interface. `fleetprov-emulator --help` tells how.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use fleetprov_emulator::{Config, Emulator, Fault, KeyKind};

const HELP: &str = "\
fleetprov-emulator: an offline AWS IoT Core fleet provisioning endpoint

USAGE:
    fleetprov-emulator [serve] --data-dir DIR [OPTIONS]
    fleetprov-emulator list --data-dir DIR
    fleetprov-emulator ctl --control HOST:PORT COMMAND...

SERVE OPTIONS:
    --data-dir DIR        state: CA, server and claim credentials, claim-policy.json, templates/, registry (created on first start)
    --port N              MQTT over TLS port (default 8883; 0 picks a free port)
    --bind ADDR           address to listen on (default 127.0.0.1)
    --key-type rsa|ec     keys made by CreateKeysAndCertificate: RSA-2048 PKCS#1 like AWS (default) or EC P-256
    --ca-key-type rsa|ec  key of the CA made on first start: RSA-2048, sha256WithRSAEncryption like AWS (default) or EC P-256
    --token-ttl SECS      ownership token lifetime in seconds, fractions allowed (default 3600)
    --hook-timeout SECS   time a pre-provisioning hook has to answer (default 5)
    --require-sni         refuse TLS clients that send no SNI, as AWS does (connect to a name, not an IP)
    --min-keep-alive SECS keep-alive values below SECS are raised to it (default 30, as AWS does)
    --connect-interval SECS
                          refuse a CONNECT that comes less than SECS after the last accepted one
                          with the same client id (default 1, as AWS does; 0: no limit)
    --require-alpn        refuse clients that do not negotiate ALPN x-amzn-mqtt-ca (as AWS on port 443)
    --tls12-only          offer TLS 1.2 only (as AWS with a TLS 1.2-only security policy)
    --fault RULE          fault rule in force from the start, repeatable (see README: Fault injection)
    --region NAME         region in the ARNs IoT policies are evaluated against (default us-east-1)
    --account-id ID       account id in those ARNs (default 123456789012)
    --hook-command ARN=COMMAND
                          run COMMAND (split at spaces) for the Lambda pre-provisioning hook ARN of a
                          template in describe-provisioning-template form; repeatable
    --control-port N      serve the line-based control interface on this port (0: a free port)
    --verbose             log connections and requests on stderr (never keys or tokens)

Prints `listening on HOST:PORT` (and `control on HOST:PORT`) on stdout once connections are accepted.

CONTROL COMMANDS (ctl):
    fault RULE | clear | faults | list | sweep
";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("fleetprov-emulator: {e}");
            ExitCode::from(2)
        }
    }
}

fn value<'a>(args: &'a [String], i: &mut usize, flag: &str) -> Result<&'a str, String> {
    *i += 1;
    args.get(*i)
        .map(String::as_str)
        .ok_or_else(|| format!("{flag} needs a value"))
}

fn seconds(text: &str, flag: &str) -> Result<Duration, String> {
    text.parse::<f64>()
        .ok()
        .filter(|s| s.is_finite() && *s > 0.0 && *s < 1e9)
        .map(Duration::from_secs_f64)
        .ok_or_else(|| format!("{flag}: expected a positive number of seconds, got {text:?}"))
}

fn run(args: Vec<String>) -> Result<ExitCode, String> {
    let (command, rest) = match args.first().map(String::as_str) {
        Some("serve") => ("serve", &args[1..]),
        Some("list") => ("list", &args[1..]),
        Some("ctl") => ("ctl", &args[1..]),
        _ => ("serve", &args[..]),
    };
    let mut data_dir: Option<PathBuf> = None;
    let mut config = Config::new(PathBuf::new());
    config.port = 8883;
    let mut control: Option<String> = None;
    let mut words: Vec<String> = Vec::new();
    let mut i = 0;
    while i < rest.len() {
        let arg = rest[i].as_str();
        match arg {
            "-h" | "--help" => {
                print!("{HELP}");
                return Ok(ExitCode::SUCCESS);
            }
            "-V" | "--version" => {
                println!("fleetprov-emulator {}", env!("CARGO_PKG_VERSION"));
                return Ok(ExitCode::SUCCESS);
            }
            "--data-dir" => data_dir = Some(PathBuf::from(value(rest, &mut i, arg)?)),
            "--port" => {
                let v = value(rest, &mut i, arg)?;
                config.port = v.parse().map_err(|_| format!("--port: bad port {v:?}"))?;
            }
            "--bind" => {
                let v = value(rest, &mut i, arg)?;
                config.bind = v
                    .parse()
                    .map_err(|_| format!("--bind: bad address {v:?}"))?;
            }
            "--key-type" => {
                config.key_kind = match value(rest, &mut i, arg)? {
                    "rsa" => KeyKind::Rsa2048,
                    "ec" => KeyKind::EcP256,
                    other => return Err(format!("--key-type: expected rsa or ec, got {other:?}")),
                }
            }
            "--ca-key-type" => {
                config.ca_key_kind = match value(rest, &mut i, arg)? {
                    "rsa" => KeyKind::Rsa2048,
                    "ec" => KeyKind::EcP256,
                    other => {
                        return Err(format!("--ca-key-type: expected rsa or ec, got {other:?}"))
                    }
                }
            }
            "--token-ttl" => config.token_ttl = seconds(value(rest, &mut i, arg)?, arg)?,
            "--hook-timeout" => config.hook_timeout = seconds(value(rest, &mut i, arg)?, arg)?,
            "--require-alpn" => config.require_alpn = true,
            "--require-sni" => config.require_sni = true,
            "--min-keep-alive" => {
                let v = value(rest, &mut i, arg)?;
                config.min_keep_alive = v
                    .parse()
                    .ok()
                    .filter(|n| (1..=1200).contains(n))
                    .ok_or_else(|| format!("--min-keep-alive: expected 1 to 1200, got {v:?}"))?;
            }
            "--connect-interval" => {
                let v = value(rest, &mut i, arg)?;
                config.connect_interval = v
                    .parse::<f64>()
                    .ok()
                    .filter(|s| s.is_finite() && (0.0..=3600.0).contains(s))
                    .map(Duration::from_secs_f64)
                    .ok_or_else(|| {
                        format!("--connect-interval: expected 0 to 3600 seconds, got {v:?}")
                    })?;
            }
            "--tls12-only" => config.tls12_only = true,
            "--fault" => config
                .faults
                .push(value(rest, &mut i, arg)?.parse::<Fault>()?),
            "--control-port" => {
                let v = value(rest, &mut i, arg)?;
                config.control_port = Some(
                    v.parse()
                        .map_err(|_| format!("--control-port: bad port {v:?}"))?,
                );
            }
            "--hook-command" => {
                let v = value(rest, &mut i, arg)?;
                let (arn, command) = v
                    .split_once('=')
                    .filter(|(a, c)| !a.is_empty() && !c.trim().is_empty())
                    .ok_or_else(|| format!("--hook-command: expected ARN=COMMAND, got {v:?}"))?;
                config.hook_commands.push((
                    arn.to_owned(),
                    command.split_whitespace().map(str::to_owned).collect(),
                ));
            }
            "--region" => config.region = value(rest, &mut i, arg)?.to_owned(),
            "--account-id" => config.account_id = value(rest, &mut i, arg)?.to_owned(),
            "--control" => control = Some(value(rest, &mut i, arg)?.to_owned()),
            "--verbose" | "-v" => fleetprov_emulator::set_verbose(true),
            _ if command == "ctl" && !arg.starts_with("--") => words.push(arg.to_owned()),
            _ => return Err(format!("unknown argument {arg:?} (see --help)")),
        }
        i += 1;
    }
    match command {
        "ctl" => {
            let addr = control.ok_or("ctl needs --control HOST:PORT")?;
            if words.is_empty() {
                return Err("ctl needs a command".into());
            }
            let mut sock =
                TcpStream::connect(&addr).map_err(|e| format!("cannot reach {addr}: {e}"))?;
            let _ = sock.set_read_timeout(Some(Duration::from_secs(30)));
            writeln!(sock, "{}", words.join(" ")).map_err(|e| e.to_string())?;
            let mut line = String::new();
            BufReader::new(sock)
                .read_line(&mut line)
                .map_err(|e| e.to_string())?;
            print!("{line}");
            Ok(if line.starts_with("error") {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
        "list" => {
            let dir = data_dir.ok_or("list needs --data-dir DIR")?;
            let registry = fleetprov_emulator::list(&dir)?;
            println!(
                "{}",
                serde_json::to_string_pretty(&registry).map_err(|e| e.to_string())?
            );
            Ok(ExitCode::SUCCESS)
        }
        _ => {
            config.data_dir = data_dir.ok_or("--data-dir DIR is required (see --help)")?;
            let emulator = Emulator::start(config)?;
            let mut out = std::io::stdout().lock();
            let addr = emulator.addr();
            // SocketAddr's form: `[::1]:PORT` for IPv6, usable as `ctl --control HOST:PORT`.
            writeln!(out, "listening on {addr}").map_err(|e| e.to_string())?;
            if let Some(c) = emulator.control_addr() {
                writeln!(out, "control on {c}").map_err(|e| e.to_string())?;
            }
            out.flush().map_err(|e| e.to_string())?;
            drop(out);
            // Serve until killed; the registry is safe against any kind of stop.
            loop {
                std::thread::park();
            }
        }
    }
}
