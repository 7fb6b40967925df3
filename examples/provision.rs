//! Provisions one device with fleetprov's Rust API.
//!
//! ```sh
//! cargo run --example provision -- --endpoint HOST [--port 8883] --ca CA.pem \
//!     --cert claim.pem --key claim.key --template NAME --param SerialNumber=ABC123 \
//!     [--method csr|keys] [--format json|cbor] [--out DIR]
//! ```

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use fleetprov::keys::KeyType;
use fleetprov::protocol::Format;
use fleetprov::provision::Hooks;
use fleetprov::{Config, Method, Request, Roots, Secret};

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("provision: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), String> {
    let mut args = std::env::args().skip(1);
    let (mut endpoint, mut port, mut ca, mut cert, mut key, mut template) =
        (None, 8883u16, None, None, None, None);
    let (mut params, mut method, mut format, mut out) = (
        BTreeMap::new(),
        Method::Csr(KeyType::P256),
        Format::Json,
        None,
    );
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--endpoint" => endpoint = Some(value()?),
            "--port" => port = value()?.parse().map_err(|_| "bad --port")?,
            "--ca" => ca = Some(value()?),
            "--cert" => cert = Some(value()?),
            "--key" => key = Some(value()?),
            "--template" => template = Some(value()?),
            "--param" => {
                let v = value()?;
                let (k, v) = v.split_once('=').ok_or("--param wants KEY=VALUE")?;
                params.insert(k.to_owned(), v.to_owned());
            }
            "--method" => {
                method = match value()?.as_str() {
                    "csr" => Method::Csr(KeyType::P256),
                    "keys" => Method::CreateKeys,
                    other => return Err(format!("unknown method {other}")),
                }
            }
            "--format" => {
                format = match value()?.as_str() {
                    "json" => Format::Json,
                    "cbor" => Format::Cbor,
                    other => return Err(format!("unknown format {other}")),
                }
            }
            "--out" => out = Some(PathBuf::from(value()?)),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    let read = |p: Option<String>, what: &str| -> Result<String, String> {
        let p = p.ok_or(format!("{what} is required"))?;
        std::fs::read_to_string(&p).map_err(|e| format!("{p}: {e}"))
    };
    let mut connection = Config::new(
        endpoint.ok_or("--endpoint is required")?,
        read(cert, "--cert")?,
        Secret::new(read(key, "--key")?),
    );
    connection.port = port;
    connection.format = format;
    if ca.is_some() {
        connection.roots = Roots::Pem(read(ca, "--ca")?);
    }
    let mut request = Request::new(
        connection,
        template.ok_or("--template is required")?,
        method,
    );
    request.parameters = params;
    request.output_dir = out;
    let hooks = Hooks {
        progress: Some(Arc::new(|p| match &p.error {
            Some(e) => eprintln!(
                "  .. attempt {} failed ({e}); retrying in {} ms",
                p.attempt, p.retry_in_ms
            ),
            None => eprintln!("  .. {}", p.step.doing()),
        })),
        ..Hooks::default()
    };
    let p = fleetprov::provision(&request, &hooks).map_err(|e| e.to_string())?;
    println!("thing name:     {}", p.thing_name);
    println!("certificate id: {}", p.certificate_id);
    match &p.stored {
        Some(s) => println!("credentials in: {}", s.dir.display()),
        None => println!("credentials:    not stored (no --out)"),
    }
    Ok(())
}
