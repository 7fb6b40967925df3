//! The `fleetprov-emulator` binary keeps its state across restarts, `kill -9` while clients
//! provision, and `kill -9` during its very first start.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::sync::Notify;

mod binary;
mod common;
use binary::*;
use common::{TempDir, WAIT};

/// Temporary files of `write_atomic` (`.NAME.tmpPID`) anywhere in the data directory.
fn temp_files(dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    for d in [dir.to_path_buf(), dir.join("templates")] {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries {
            let name = e.unwrap().file_name().to_string_lossy().into_owned();
            if name.starts_with('.') && name.contains(".tmp") {
                found.push(d.join(name).display().to_string());
            }
        }
    }
    found
}

/// `PRAGMA integrity_check` (and the foreign keys) of the registry.
fn check_registry_file(dir: &Path) {
    let db = rusqlite::Connection::open(dir.join("registry.sqlite3")).expect("registry opens");
    db.busy_timeout(WAIT).unwrap();
    let rows: Vec<String> = db
        .prepare("PRAGMA integrity_check")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(rows, vec!["ok".to_owned()], "integrity_check");
    let broken: usize = db
        .prepare("PRAGMA foreign_key_check")
        .unwrap()
        .query_map([], |_| Ok(()))
        .unwrap()
        .count();
    assert_eq!(broken, 0, "foreign_key_check finds dangling references");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_reuses_the_data_directory() {
    let tmp = TempDir::new("restart");
    let data = tmp.path().join("data");
    let mut emu = Emu::start(&data, &[]).await;
    let ca = std::fs::read(data.join("ca.pem")).unwrap();
    let claim = std::fs::read(data.join("claim.pem")).unwrap();
    let claim_key = std::fs::read(data.join("claim.key")).unwrap();
    let mut c = emu.claim_client("restart").await.unwrap();
    subscribe_provisioning(&mut c).await.unwrap();
    let dev = provision(&mut c, "restart")
        .await
        .unwrap()
        .expect("provisioned");
    drop(c);
    assert!(!emu.term().await.success(), "SIGTERM ends the emulator");
    drop(emu);

    let emu = Emu::start(&data, &[]).await;
    assert_eq!(std::fs::read(data.join("ca.pem")).unwrap(), ca, "same CA");
    assert_eq!(std::fs::read(data.join("claim.pem")).unwrap(), claim);
    assert_eq!(std::fs::read(data.join("claim.key")).unwrap(), claim_key);
    let registry = list(&data).await;
    assert_eq!(
        find_cert(&registry, &dev.certificate_id).unwrap()["status"],
        "ACTIVE"
    );
    assert_eq!(
        find_thing(&registry, &dev.thing_name).unwrap()["certificates"],
        json!([dev.certificate_id])
    );
    // The device connects with its new certificate, the claim still works.
    let mut d = emu
        .client(&dev.certificate_pem, &dev.key_pem, &dev.thing_name)
        .await
        .expect("the provisioned certificate connects after a restart");
    d.ping().await.unwrap();
    let mut c = emu.claim_client("restart-2").await.unwrap();
    subscribe_provisioning(&mut c).await.unwrap();
    provision(&mut c, "restart-2")
        .await
        .unwrap()
        .expect("provisioning works after a restart");
}

/// Everything a client saw accepted by RegisterThing: certificate id -> thing name.
type Accepted = Arc<Mutex<BTreeMap<String, String>>>;

/// After a restart: `list` works and shows every accepted registration; the SQLite file is
/// sound; no temporary files; the claim connects.
async fn verify_after_restart(emu: &Emu, data: &Path, accepted: &Accepted, round: usize) {
    let registry = list(data).await;
    let accepted = accepted.lock().unwrap().clone();
    for (cert, thing) in &accepted {
        let c = find_cert(&registry, cert)
            .unwrap_or_else(|| panic!("round {round}: accepted certificate {cert} is gone"));
        assert_eq!(c["status"], "ACTIVE", "round {round}: {cert}");
        let t = find_thing(&registry, thing)
            .unwrap_or_else(|| panic!("round {round}: accepted thing {thing} is gone"));
        assert!(
            t["certificates"].as_array().unwrap().contains(&json!(cert)),
            "round {round}: {cert} not attached to {thing}: {t}"
        );
    }
    check_registry_file(data);
    assert_eq!(temp_files(data), Vec::<String>::new(), "round {round}");
    let mut c = emu
        .claim_client(&format!("verify-{round}"))
        .await
        .unwrap_or_else(|e| panic!("round {round}: the claim does not connect: {e}"));
    c.ping().await.unwrap();
}

/// One client: provisions over one claim connection until the emulator dies. A rejection, or a
/// connection failure before the test killed the emulator, is an error.
async fn provisioner(
    emu_addr: std::net::SocketAddr,
    creds: [String; 3],
    name: String,
    accepted: Accepted,
    done: Arc<AtomicUsize>,
    progress: Arc<Notify>,
    killing: Arc<AtomicBool>,
) -> Result<(), String> {
    let [ca, cert, key] = creds;
    let failed = |e: String| {
        if killing.load(Ordering::SeqCst) {
            Ok(())
        } else {
            Err(format!("{name}: {e} before the kill"))
        }
    };
    let mut c = match binary::Mqtt::connect(emu_addr, &ca, &cert, &key, &name).await {
        Ok(c) => c,
        Err(e) => return failed(e),
    };
    if let Err(e) = subscribe_provisioning(&mut c).await {
        return failed(e);
    }
    // Bounded: the test kills the emulator long before.
    for n in 0..10_000 {
        let serial = format!("{name}-{n}");
        match provision(&mut c, &serial).await {
            Ok(Ok(dev)) => {
                accepted
                    .lock()
                    .unwrap()
                    .insert(dev.certificate_id, dev.thing_name);
                done.fetch_add(1, Ordering::SeqCst);
                progress.notify_one();
            }
            Ok(Err(rejection)) => return Err(format!("{serial}: rejected: {rejection}")),
            Err(e) => return failed(e),
        }
    }
    Err(format!("{name}: the emulator was never killed"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_while_provisioning_loses_nothing_accepted() {
    const ROUNDS: usize = 8;
    const CLIENTS: usize = 8;
    let started = Instant::now();
    let tmp = TempDir::new("kill9");
    let data = tmp.path().join("data");
    let accepted: Accepted = Arc::default();
    let mut emu = Emu::start(&data, &[]).await;
    for round in 0..ROUNDS {
        // Kill after a different number of completed provisionings each round.
        let target = 3 + 4 * round;
        let done = Arc::new(AtomicUsize::new(0));
        let progress = Arc::new(Notify::new());
        let killing = Arc::new(AtomicBool::new(false));
        let creds = [
            emu.read("ca.pem"),
            emu.read("claim.pem"),
            emu.read("claim.key"),
        ];
        let tasks: Vec<_> = (0..CLIENTS)
            .map(|i| {
                let run = provisioner(
                    emu.addr(),
                    creds.clone(),
                    format!("r{round}-c{i}"),
                    accepted.clone(),
                    done.clone(),
                    progress.clone(),
                    killing.clone(),
                );
                let progress = progress.clone();
                tokio::spawn(async move {
                    let result = run.await;
                    // A client that stops early wakes the test, which then reports it.
                    progress.notify_one();
                    result
                })
            })
            .collect();
        let deadline = tokio::time::Instant::now() + WAIT;
        while done.load(Ordering::SeqCst) < target && !tasks.iter().any(|t| t.is_finished()) {
            // Bounded wait for the next completion (notify_one keeps a permit, none is lost).
            if tokio::time::timeout_at(deadline, progress.notified())
                .await
                .is_err()
            {
                panic!(
                    "round {round}: only {} of {target} provisionings; stderr: {}",
                    done.load(Ordering::SeqCst),
                    emu.stderr()
                );
            }
        }
        killing.store(true, Ordering::SeqCst);
        emu.kill9().await;
        for t in tasks {
            tokio::time::timeout(WAIT, t)
                .await
                .expect("the client stops once the emulator is gone")
                .expect("client task")
                .unwrap_or_else(|e| panic!("round {round}: {e}"));
        }
        emu = Emu::start(&data, &[]).await;
        verify_after_restart(&emu, &data, &accepted, round).await;
    }
    let total = accepted.lock().unwrap().len();
    assert!(total >= (0..ROUNDS).map(|r| 3 + 4 * r).sum::<usize>());
    // Provisioning still works on the directory that survived all that.
    let mut c = emu.claim_client("after-kills").await.unwrap();
    subscribe_provisioning(&mut c).await.unwrap();
    let dev = provision(&mut c, "after-kills")
        .await
        .unwrap()
        .expect("provisioned");
    emu.client(&dev.certificate_pem, &dev.key_pem, &dev.thing_name)
        .await
        .unwrap()
        .ping()
        .await
        .unwrap();
    eprintln!(
        "{ROUNDS} kill -9 rounds, {total} accepted registrations, {:?}",
        started.elapsed()
    );
}

/// Where the first start is interrupted.
#[derive(Debug, Clone, Copy)]
enum KillPoint {
    RightAfterSpawn,
    /// Once this file or directory (relative to DIR's parent: "data", "data/ca.key") exists.
    Exists(&'static str),
    AfterListening,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_the_first_start_leaves_a_usable_directory() {
    let points = [
        KillPoint::RightAfterSpawn,
        KillPoint::Exists("data"),
        KillPoint::Exists("data/ca.key"),
        KillPoint::Exists("data/server.key"),
        KillPoint::Exists("data/registry.sqlite3"),
        KillPoint::Exists("data/claim.key"),
        KillPoint::Exists("data/templates"),
        KillPoint::AfterListening,
    ];
    for point in points {
        let tmp = TempDir::new("firstkill");
        let data = tmp.path().join("data");
        let mut emu = Emu::spawn(&data, &[]);
        match point {
            KillPoint::RightAfterSpawn => {}
            KillPoint::Exists(path) => {
                // Polls the observable condition; the first start is short, so the deadline
                // only guards against a hang.
                let path = tmp.path().join(path);
                let deadline = Instant::now() + WAIT;
                while !path.exists() {
                    assert!(Instant::now() < deadline, "{point:?}: never appeared");
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
            KillPoint::AfterListening => emu.wait_listening(false).await,
        }
        emu.kill9().await;
        drop(emu);

        let emu = Emu::start(&data, &[]).await;
        let mut c = emu
            .claim_client("first")
            .await
            .unwrap_or_else(|e| panic!("{point:?}: the claim does not connect: {e}"));
        subscribe_provisioning(&mut c).await.unwrap();
        let dev = provision(&mut c, "first")
            .await
            .unwrap()
            .unwrap_or_else(|r| panic!("{point:?}: provisioning rejected: {r}"));
        emu.client(&dev.certificate_pem, &dev.key_pem, &dev.thing_name)
            .await
            .unwrap_or_else(|e| panic!("{point:?}: the new certificate does not connect: {e}"))
            .ping()
            .await
            .unwrap();
        let registry: Value = list(&data).await;
        assert_eq!(
            find_cert(&registry, &dev.certificate_id).unwrap()["status"],
            "ACTIVE"
        );
        let claim_id = fleetprov_emulator::certificate_id(
            &fleetprov_emulator::pki::cert_der_from_pem(&emu.read("claim.pem")).unwrap(),
        );
        assert_eq!(
            find_cert(&registry, &claim_id).unwrap()["status"],
            "ACTIVE",
            "{point:?}: claim.pem is registered"
        );
        check_registry_file(&data);
        assert!(data.join("templates/DemoTemplate.json").exists());
    }
}
