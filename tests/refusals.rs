//! Who refused what: a client certificate the service does not accept is a TLS error that names
//! the certificate and is not retried, over TLS 1.3 (the refusal arrives as an alert after the
//! handshake) and TLS 1.2 (during it); the lost-reply recovery tells an inactive certificate
//! from a connection problem over both; an untrusted server names the CA that did not trust it.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fleetprov::engine::flow::Progress;
use fleetprov::engine::Step;
use fleetprov::keys::KeyType;
use fleetprov::protocol::Format;
use fleetprov::provision::Hooks;
use fleetprov::{Error, Method, Request, Roots};
use fleetprov_emulator::{Config as EmuConfig, Emulator, KeyKind};

fn emulator(name: &str, tls12_only: bool, token_ttl: Duration, faults: &[&str]) -> Emulator {
    let dir = common::scratch("refusals", name);
    let mut config = EmuConfig::new(dir.join("emulator"));
    config.key_kind = KeyKind::EcP256;
    config.tls12_only = tls12_only;
    config.token_ttl = token_ttl;
    config.faults = faults.iter().map(|f| f.parse().unwrap()).collect();
    Emulator::start(config).expect("emulator starts")
}

/// A self-signed certificate the service has never seen, and its key.
fn stranger() -> (String, String) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let cert = rcgen::CertificateParams::new(vec!["stranger".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    (cert.pem(), key.serialize_pem())
}

fn provision(request: &Request) -> (Result<fleetprov::Provisioned, Error>, Vec<Progress>) {
    let progress = Arc::new(Mutex::new(Vec::new()));
    let p = progress.clone();
    let hooks = Hooks {
        progress: Some(Arc::new(move |x: &Progress| {
            p.lock().unwrap().push(x.clone())
        })),
        ..Hooks::default()
    };
    let result = fleetprov::provision(request, &hooks);
    let progress = progress.lock().unwrap().clone();
    (result, progress)
}

#[test]
fn an_unregistered_claim_certificate_is_a_tls_error_that_names_it_and_is_not_retried() {
    for tls12_only in [false, true] {
        let emu = emulator(
            &format!("stranger-{tls12_only}"),
            tls12_only,
            Duration::from_secs(3600),
            &[],
        );
        let (cert, key) = stranger();
        let connection = common::connection_with(&emu, cert, key, Format::Json);
        let mut request = Request::new(connection, "DemoTemplate", Method::Csr(KeyType::P256));
        request.parameters.insert("SerialNumber".into(), "s".into());
        let started = Instant::now();
        let (result, progress) = provision(&request);
        let what = if tls12_only { "TLS 1.2" } else { "TLS 1.3" };
        match &result {
            Err(Error::Tls(m)) => {
                assert!(m.contains("refused the claim certificate"), "{what}: {m}");
                assert!(
                    m.contains(&format!("localhost:{}", emu.port())),
                    "{what}: {m}"
                );
                assert!(m.contains("not registered and ACTIVE"), "{what}: {m}");
                assert!(m.contains("(1 attempt,"), "{what}: {m}");
            }
            other => panic!("{what}: {other:?}"),
        }
        assert!(
            progress.iter().all(|p| p.step != Step::Retrying),
            "{what}: not retried: {progress:?}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{what}: {:?}",
            started.elapsed()
        );
    }
}

#[test]
fn an_expired_token_with_an_inactive_certificate_starts_over_once_over_both_tls_versions() {
    for tls12_only in [false, true] {
        // The certificate's reply comes after its token (1 s) expired: RegisterThing refuses the
        // token, the flow connects with the certificate to see whether an earlier attempt
        // registered it, the service refuses the inactive certificate at TLS, and the flow
        // starts over once with a new certificate.
        let emu = emulator(
            &format!("expired-{tls12_only}"),
            tls12_only,
            Duration::from_secs(1),
            &["delay:1500@create*1"],
        );
        let mut request = Request::new(
            common::connection(&emu, Format::Json),
            "DemoTemplate",
            Method::CreateKeys,
        );
        request
            .parameters
            .insert("SerialNumber".into(), format!("e{tls12_only}"));
        request.connection.step_timeout = Duration::from_secs(5);
        let (result, progress) = provision(&request);
        let what = if tls12_only { "TLS 1.2" } else { "TLS 1.3" };
        let p = result.unwrap_or_else(|e| panic!("{what}: {e}"));
        let steps: Vec<Step> = progress.iter().map(|p| p.step).collect();
        let restarts = steps.iter().filter(|s| **s == Step::Restarting).count();
        assert_eq!(restarts, 1, "{what}: {steps:?}");
        assert!(
            !steps.contains(&Step::Retrying),
            "{what}: no blind retries: {steps:?}"
        );
        let certs = common::device_certificates(&emu);
        // The first certificate is deleted with its expired token, as AWS does.
        let active: Vec<_> = certs.iter().filter(|(_, s)| s == "ACTIVE").collect();
        assert_eq!(active.len(), 1, "{what}: {certs:?}");
        assert_eq!(active[0].0, p.certificate_id, "{what}");
    }
}

#[test]
fn an_untrusted_server_names_the_ca_that_did_not_trust_it() {
    let emu = emulator("untrusted", false, Duration::from_secs(3600), &[]);
    let (other_ca, _) = stranger();
    let dir = common::scratch("refusals", "untrusted-ca");
    std::fs::create_dir_all(&dir).unwrap();
    let ca_file = dir.join("wrong-ca.pem");
    std::fs::write(&ca_file, &other_ca).unwrap();
    let mut connection = common::connection(&emu, Format::Json);
    connection.roots = Roots::Pem(other_ca);
    connection.ca_file = Some(ca_file.clone());
    let mut request = Request::new(connection, "DemoTemplate", Method::Csr(KeyType::P256));
    request.parameters.insert("SerialNumber".into(), "u".into());
    let (result, progress) = provision(&request);
    match &result {
        Err(Error::Tls(m)) => {
            assert!(m.contains("is not trusted"), "{m}");
            assert!(
                m.contains(&format!("the CA file {}", ca_file.display())),
                "{m}"
            );
        }
        other => panic!("{other:?}"),
    }
    assert!(progress.iter().all(|p| p.step != Step::Retrying));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_connection_failure_names_the_endpoint_and_the_attempts() {
    // A port nobody listens on: bind one, note it, close it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let emu = emulator("refused", false, Duration::from_secs(3600), &[]);
    let mut connection = common::connection(&emu, Format::Json);
    connection.host = "127.0.0.1".into();
    connection.port = port;
    let mut request = Request::new(connection, "DemoTemplate", Method::Csr(KeyType::P256));
    request.parameters.insert("SerialNumber".into(), "r".into());
    request.retry = fleetprov::engine::retry::RetryPolicy {
        max_attempts: 3,
        initial_backoff: Duration::from_millis(30),
        max_backoff: Duration::from_millis(60),
    };
    let (result, progress) = provision(&request);
    match &result {
        Err(Error::Connection(m)) => {
            assert!(m.contains(&format!("127.0.0.1:{port}")), "{m}");
            assert!(m.contains("(3 attempts,"), "{m}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        progress.iter().filter(|p| p.step == Step::Retrying).count(),
        2
    );
}
