//! The control interface: one command per line over TCP, one line of answer.
//!
//! | command | answer |
//! |---|---|
//! | `fault RULE` | `ok` after adding the rule (syntax in [`crate::faults`]) |
//! | `clear` | `ok` after removing every rule |
//! | `faults` | the rules in force, as a JSON array of strings |
//! | `list` | the registry as one line of JSON |
//! | `sweep` | `ok N`: N certificates deleted because their token expired |
//!
//! Errors answer `error: TEXT`. Bind it to loopback only: it is unauthenticated.

use std::sync::Arc;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

use crate::faults::{Fault, Faults};
use crate::store::Store;

pub async fn serve(listener: TcpListener, faults: Arc<Faults>, store: Arc<Store>) {
    loop {
        let Ok((sock, _)) = listener.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        };
        tokio::spawn(session(sock, faults.clone(), store.clone()));
    }
}

/// Answers one command.
pub fn answer(line: &str, faults: &Faults, store: &Store) -> String {
    let line = line.trim();
    let (cmd, arg) = line.split_once(' ').unwrap_or((line, ""));
    match cmd {
        "fault" => match arg.parse::<Fault>() {
            Ok(f) => {
                faults.add(f);
                "ok".into()
            }
            Err(e) => format!("error: {e}"),
        },
        "clear" => {
            faults.clear();
            "ok".into()
        }
        "faults" => serde_json::Value::from(
            faults
                .list()
                .iter()
                .map(|f| f.to_string())
                .collect::<Vec<_>>(),
        )
        .to_string(),
        "list" => match store.snapshot() {
            Ok(v) => v.to_string(),
            Err(e) => format!("error: {e}"),
        },
        "sweep" => match store.sweep_expired(crate::service::now_ms()) {
            Ok(n) => format!("ok {n}"),
            Err(e) => format!("error: {e}"),
        },
        other => format!("error: unknown command {other:?}"),
    }
}

async fn session(sock: TcpStream, faults: Arc<Faults>, store: Arc<Store>) {
    let (r, mut w) = sock.into_split();
    let mut lines = BufReader::new(r.take(1 << 16)).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let mut reply = answer(&line, &faults, &store);
        reply.push('\n');
        if w.write_all(reply.as_bytes()).await.is_err() {
            return;
        }
    }
}
