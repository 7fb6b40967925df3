//! Writes the seed corpus, seeds/<target>/<name>, from the library's own encoders and the
//! layouts in `fleetprov_fuzz`: valid replies of every API in JSON and CBOR and their topics,
//! journals as the library writes them, and host event sequences that provision successfully.
//!
//! The certificate and key are made anew each time, so every file with them changes.
//!
//! From the repository root:
//! cargo +nightly fuzz build --fuzz-dir tests/fuzz-targets
//! tests/fuzz-targets/target/x86_64-unknown-linux-gnu/release/seeds

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use fleetprov::Secret;
use fleetprov::protocol::{CreatedCertificate, Format, Registered};
use fleetprov::store::journal::{Entry, JOURNAL_FILE, Journal};
use fleetprov_fuzz::host::*;
use fleetprov_fuzz::{apis, certificate_reply, decoders, encode, register_reply, rejection};

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds");
    let _ = fs::remove_dir_all(&root);
    decoder_seeds(&root.join("decoders"));
    journal_seeds(&root.join("journal"));
    host_seeds(&root.join("host"));
    println!("seeds written to {}", root.display());
}

fn write(dir: &Path, name: &str, bytes: &[u8]) {
    fs::create_dir_all(dir).expect("seed directory");
    fs::write(dir.join(name), bytes).expect("seed file");
}

fn decoder_seeds(dir: &Path) {
    let names = ["create-keys", "create-from-csr", "register"];
    for (i, api) in apis().iter().enumerate() {
        for format in [Format::Json, Format::Cbor] {
            let mut selector = i as u8;
            if format == Format::Cbor {
                selector |= decoders::CBOR;
            }
            let accepted = match i {
                0 => certificate_reply(true),
                1 => certificate_reply(false),
                _ => register_reply("fuzz-thing"),
            };
            let name = format!("{}-{format}", names[i]);
            for (suffix, value) in [
                ("accepted", accepted),
                (
                    "rejected",
                    rejection(400, "InvalidCertificateOwnershipToken"),
                ),
            ] {
                let mut seed = vec![selector];
                seed.extend(encode(format, &value));
                write(dir, &format!("{name}-{suffix}"), &seed);
            }
            for (suffix, topic) in [
                ("accepted", api.accepted_topic(format)),
                ("rejected", api.rejected_topic(format)),
            ] {
                let mut seed = vec![selector | decoders::TOPIC];
                seed.extend(topic.as_bytes());
                write(dir, &format!("{name}-topic-{suffix}"), &seed);
            }
        }
    }
}

/// Journals written by the library itself into a temporary state directory.
fn journal_seeds(dir: &Path) {
    let m = fleetprov_fuzz::material();
    let state = std::env::temp_dir().join(format!("fleetprov-fuzz-seeds-{}", std::process::id()));
    let journal = Journal::open(&state).expect("state directory");
    let certificate = CreatedCertificate {
        certificate_id: m.certificate_id.clone(),
        certificate_pem: m.certificate_pem.clone(),
        private_key: None,
        ownership_token: Secret::new("fuzz-ownership-token".into()),
    };
    let created = Entry {
        host: "abc123-ats.iot.eu-west-1.amazonaws.com".into(),
        certificate,
        private_key: Some(Secret::new(m.private_key_pem.clone())),
        created_unix: 1_790_000_000,
        token_expires_unix: 1_790_003_600,
        registered: None,
    };
    let registered = Entry {
        private_key: None,
        registered: Some(Registered {
            thing_name: Some("fuzz-thing".into()),
            device_configuration: BTreeMap::from([("fleet".into(), "fuzz".into())]),
        }),
        ..created.clone()
    };
    for (name, entry) in [("created", created), ("registered", registered)] {
        journal.save(&entry).expect("journal");
        let bytes = fs::read(state.join(JOURNAL_FILE)).expect("journal file");
        write(dir, name, &bytes);
    }
    drop(journal);
    fs::remove_dir_all(&state).expect("remove the state directory");
}

/// Reply topic selectors (see `fleetprov_fuzz::host`).
const CREATE_KEYS_ACCEPTED: u8 = 0;
const CSR_ACCEPTED: u8 = 2;
const REGISTER_ACCEPTED: u8 = 4;
const REGISTER_REJECTED: u8 = 5;

fn host_seeds(dir: &Path) {
    let out = |name: &str, w: &Writer| write(dir, name, &w.0);
    for format in [Format::Json, Format::Cbor] {
        let cbor = if format == Format::Cbor { S_CBOR } else { 0 };
        // CreateKeysAndCertificate, verified with the new certificate: every event explicit.
        let mut w = Writer::setup(
            cbor | S_METHOD_CREATE_KEYS | S_VERIFY | S_HOOKS,
            1,
            20,
            40,
            0,
        );
        w.op(START).advance(3).op(CONNECTED).advance(2);
        w.op(SUBACK)
            .byte(4)
            .byte(1)
            .byte(1)
            .byte(1)
            .byte(1)
            .advance(7);
        w.message_raw(
            CREATE_KEYS_ACCEPTED,
            &encode(format, &certificate_reply(true)),
        );
        w.advance(9);
        w.message_raw(
            REGISTER_ACCEPTED,
            &encode(format, &register_reply("fuzz-thing")),
        );
        w.advance(4).op(CONNECTED).op(RESULT);
        out(&format!("create-keys-verified-{format}"), &w);

        // An external CSR, RegisterThing refused once with a retryable status, then accepted.
        let mut w = Writer::setup(cbor | S_METHOD_EXTERNAL_CSR | S_PARAMETER, 2, 20, 60, 10);
        w.op(START).op(CONNECTED);
        w.op(SUBACK).byte(4).byte(0).byte(1).byte(2).byte(1);
        w.message_certificate(CSR_ACCEPTED, false);
        w.message_raw(
            REGISTER_REJECTED,
            &encode(format, &rejection(503, "Throttling")),
        );
        w.op(TICK_AT_WAKE).op(CONNECTED);
        w.op(SUBACK).byte(2).byte(1).byte(1);
        w.message_raw(
            REGISTER_ACCEPTED,
            &encode(format, &register_reply("fuzz-thing")),
        );
        w.op(RESULT);
        out(&format!("external-csr-retried-{format}"), &w);
    }
    // The callbacks answer like a good broker and service: one START provisions.
    let mut w = Writer::setup(S_AUTO | S_VERIFY | S_HOOKS, 0, 10, 10, 0);
    w.op(START).op(RESULT);
    out("auto-create-keys", &w);
    // The same with callbacks that re-enter: a failed connect, a refused SUBACK, a free.
    let mut w = Writer::setup(S_AUTO | S_CBOR, 3, 10, 10, 0);
    w.op(DIRECTIVE).byte(D_CONNECT_FAILED);
    w.op(DIRECTIVE).byte(D_WAKE_AT);
    w.op(DIRECTIVE).byte(D_SUBACK_REFUSED | D_FAIL);
    w.op(START);
    for _ in 0..4 {
        w.op(TICK_AT_WAKE);
    }
    w.op(RESULT);
    out("auto-reentrant", &w);
    // fleetprov_host_free() from inside the connect callback.
    let mut w = Writer::setup(S_AUTO, 0, 10, 10, 0);
    w.op(DIRECTIVE).byte(D_FREE).op(START);
    out("free-in-callback", &w);
    // RegisterThing's connection drops; the retry's RegisterThing is refused the (used) token;
    // connecting with the new certificate shows it was registered.
    let mut w = Writer::setup(S_AUTO | S_VERIFY, 1, 10, 10, 0);
    for d in [
        D_CONNECTED,
        D_SUBACK_GRANTED,
        D_REPLY_ACCEPTED,
        D_DISCONNECTED,
        D_CONNECTED,
        D_SUBACK_GRANTED,
        D_REPLY_TOKEN_REFUSED,
    ] {
        w.op(DIRECTIVE).byte(d);
    }
    w.op(START).op(TICK_AT_WAKE).op(TICK_AT_WAKE).op(RESULT);
    out("token-refused-probe", &w);
}
