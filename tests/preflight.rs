//! What can be checked is checked before the first request: an output location that cannot hold
//! the credentials fails before anything is sent. A commit that still fails at the end loses
//! nothing: without a state directory the credentials wait in a recovery file next to the
//! output, and the next call stores them instead of minting another certificate.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;

use fleetprov::engine::flow::Progress;
use fleetprov::engine::Step;
use fleetprov::keys::KeyType;
use fleetprov::protocol::Format;
use fleetprov::provision::Hooks;
use fleetprov::{Error, Method, Request};

fn request(env: &common::Env, serial: &str) -> Request {
    let mut r = Request::new(
        common::connection(&env.emu, Format::Json),
        "DemoTemplate",
        Method::Csr(KeyType::P256),
    );
    r.parameters.insert("SerialNumber".into(), serial.into());
    r
}

#[test]
fn an_output_location_that_cannot_hold_the_credentials_fails_before_anything_is_sent() {
    let env = common::env("preflight", "unwritable", &[]);
    std::fs::create_dir_all(&env.dir).unwrap();
    let file = env.dir.join("a-file");
    std::fs::write(&file, b"not a directory").unwrap();
    for (what, out) in [
        ("a regular file", file.clone()),
        ("under a regular file", file.join("credentials")),
    ] {
        let mut r = request(&env, "x");
        r.output_dir = Some(out.clone());
        match fleetprov::provision(&r, &Hooks::default()) {
            Err(Error::Storage(m)) => {
                assert!(
                    m.contains("cannot hold the credentials")
                        && m.contains(&*out.to_string_lossy()),
                    "{what}: {m}"
                )
            }
            other => panic!("{what}: {other:?}"),
        }
        assert!(
            common::device_certificates(&env.emu).is_empty(),
            "{what}: no certificate was requested"
        );
    }
    assert_eq!(
        std::fs::read(&file).unwrap(),
        b"not a directory",
        "left alone"
    );
}

#[test]
fn a_commit_that_fails_without_a_state_directory_is_finished_by_the_next_call() {
    let env = common::env("preflight", "recovery", &[]);
    let out = env.dir.join("credentials");
    let mut r = request(&env, "rec");
    r.output_dir = Some(out.clone());
    // Once the thing is registered, something takes the output directory's place.
    let sabotage = out.clone();
    let hooks = Hooks {
        progress: Some(Arc::new(move |p: &Progress| {
            if p.step == Step::Registered {
                let _ = std::fs::remove_dir_all(&sabotage);
                std::fs::write(&sabotage, b"in the way").unwrap();
            }
        })),
        ..Hooks::default()
    };
    let recovery = env.dir.join("credentials.fleetprov-recovery.json");
    match fleetprov::provision(&r, &hooks) {
        Err(Error::Storage(m)) => assert!(
            m.contains(&format!(
                "the credentials were saved to {}",
                recovery.display()
            )),
            "{m}"
        ),
        other => panic!("{other:?}"),
    }
    let mode = std::fs::metadata(&recovery).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let first = common::device_certificates(&env.emu);
    assert_eq!(first.len(), 1);

    // The obstacle goes; the next call stores the kept credentials and sends nothing.
    std::fs::remove_file(&out).unwrap();
    let p = fleetprov::provision(&r, &Hooks::default()).unwrap();
    assert!(p.already_provisioned);
    assert_eq!(p.certificate_id, first[0].0);
    assert_eq!(p.thing_name, "demo-rec");
    assert!(!recovery.exists(), "the recovery file is gone once stored");
    let key = std::fs::read_to_string(out.join("private.key")).unwrap();
    fleetprov::keys::certificate_matches_key(&p.certificate_pem, &key).unwrap();
    assert_eq!(
        common::device_certificates(&env.emu).len(),
        1,
        "no second certificate"
    );
    let _ = std::fs::remove_dir_all(&env.dir);
}
