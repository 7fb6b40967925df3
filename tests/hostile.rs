//! Hostile replies: the emulator processes each request, then spoils its accepted reply
//! (`mangle:KIND` fault rules), and the one-call flow must end in a typed error, or succeed where
//! the spoiling is a documented tolerance (unknown fields, an absent `thingName` or
//! `deviceConfiguration`), never panic or hang, and never leave credential files behind.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Once;
use std::time::{Duration, Instant};

use fleetprov::engine::retry::RetryPolicy;
use fleetprov::keys::KeyType;
use fleetprov::protocol::{DecodeError, Format};
use fleetprov::{Error, Method};
use fleetprov_emulator::{Config as EmuConfig, Emulator, KeyKind};

/// Panics on threads other than the tests' own: the library's worker threads and the emulator's.
/// (A panic on a test's thread, an assertion or the library's, fails that test by itself.)
static PANICS: AtomicUsize = AtomicUsize::new(0);

fn count_panics() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let name = std::thread::current().name().map(str::to_owned);
            if !name.is_some_and(|n| n.starts_with("hostile_")) {
                PANICS.fetch_add(1, Ordering::SeqCst);
            }
            default(info);
        }));
    });
}

struct Env {
    emu: Emulator,
    dir: PathBuf,
    ca_pem: String,
    claim_cert: String,
    claim_key: String,
}

impl Env {
    fn start(tag: &str) -> Env {
        let dir =
            std::env::temp_dir().join(format!("fleetprov-hostile-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut config = EmuConfig::new(dir.join("data"));
        // EC keys from CreateKeysAndCertificate: RSA-2048 generation would dominate the run time.
        config.key_kind = KeyKind::EcP256;
        let emu = Emulator::start(config).expect("emulator starts");
        let read = |p: &Path| std::fs::read_to_string(p).unwrap();
        let paths = emu.paths();
        Env {
            ca_pem: read(&paths.ca_cert),
            claim_cert: read(&paths.claim_cert),
            claim_key: read(&paths.claim_key),
            emu,
            dir,
        }
    }

    fn request(&self, method: Method, format: Format, serial: &str) -> fleetprov::Request {
        let mut config = fleetprov::Config::new(
            "localhost",
            self.claim_cert.clone(),
            fleetprov::Secret::new(self.claim_key.clone()),
        );
        config.port = self.emu.port();
        config.roots = fleetprov::Roots::Pem(self.ca_pem.clone());
        config.format = format;
        config.step_timeout = Duration::from_secs(5);
        config.overall_timeout = Some(Duration::from_secs(20));
        let mut request = fleetprov::Request::new(config, "DemoTemplate", method);
        request
            .parameters
            .insert("SerialNumber".into(), serial.into());
        request.output_dir = Some(self.dir.join("out").join(serial));
        request.retry = RetryPolicy::none();
        request
    }

    fn registry_len(&self, what: &str) -> usize {
        self.emu.registry().unwrap()[what].as_array().unwrap().len()
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The files in `dir` (none if it does not exist).
fn files_in(dir: &Path) -> Vec<String> {
    match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => panic!("{}: {e}", dir.display()),
    }
}

/// What a row expects of the one-call flow.
#[derive(Debug, Clone, Copy)]
enum Want {
    /// `Error::MalformedReply` of the mangled API's accepted reply with this reason (per
    /// format: JSON, CBOR), not counting where in the payload (` at line 1 column 9`).
    Malformed([&'static str; 2]),
    /// `Error::CertificateMismatch`.
    Mismatch,
    /// `Error::Connection`: the client refuses a packet above its 130 KB limit.
    Connection,
    /// Success (a tolerance), with or without a thing name.
    Provisioned { thing: bool, config: bool },
}

/// The certificate APIs, as the one-call flow reaches them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Via {
    Keys,
    Csr,
    Register,
}

/// One row: a mangle kind, the APIs whose reply it spoils (each is one run per format), and the
/// outcome. Register rows use CreateKeysAndCertificate and spoil RegisterThing's reply.
type Row = (&'static str, &'static [Via], Want);

const CERT_APIS: &[Via] = &[Via::Keys, Via::Csr];
const REGISTER: &[Via] = &[Via::Register];

const ROWS: &[Row] = &[
    (
        "truncate",
        CERT_APIS,
        Want::Malformed(["truncated JSON", "truncated CBOR"]),
    ),
    (
        "garbage",
        CERT_APIS,
        Want::Malformed(["invalid JSON", "invalid CBOR"]),
    ),
    (
        "wrong-types",
        CERT_APIS,
        Want::Malformed(["certificateId is an integer, not a string"; 2]),
    ),
    (
        "wrong-types=certificatePem",
        CERT_APIS,
        Want::Malformed(["certificatePem is an integer, not a string"; 2]),
    ),
    (
        "wrong-types=certificateOwnershipToken",
        CERT_APIS,
        Want::Malformed(["certificateOwnershipToken is an integer, not a string"; 2]),
    ),
    (
        "wrong-types=privateKey",
        &[Via::Keys],
        Want::Malformed(["privateKey is an integer, not a string"; 2]),
    ),
    (
        "missing",
        CERT_APIS,
        Want::Malformed(["certificatePem is missing"; 2]),
    ),
    (
        "missing=certificateId",
        CERT_APIS,
        Want::Malformed(["certificateId is missing"; 2]),
    ),
    (
        "missing=certificateOwnershipToken",
        CERT_APIS,
        Want::Malformed(["certificateOwnershipToken is missing"; 2]),
    ),
    (
        "missing=privateKey",
        &[Via::Keys],
        Want::Malformed(["privateKey is missing"; 2]),
    ),
    (
        "extra",
        CERT_APIS,
        Want::Provisioned {
            thing: true,
            config: true,
        },
    ),
    (
        "array",
        CERT_APIS,
        Want::Malformed(["the reply is an array, not a map"; 2]),
    ),
    (
        "bad-utf8",
        CERT_APIS,
        Want::Malformed(["invalid JSON", "invalid CBOR"]),
    ),
    ("huge", CERT_APIS, Want::Connection),
    // A CBOR reply starts with a byte no JSON starts with; a JSON reply's `{"` is the head of an
    // enormous CBOR text string, which the payload ends.
    (
        "other-format",
        CERT_APIS,
        Want::Malformed(["invalid JSON", "truncated CBOR"]),
    ),
    ("foreign-cert", CERT_APIS, Want::Mismatch),
    (
        "truncate",
        REGISTER,
        Want::Malformed(["truncated JSON", "truncated CBOR"]),
    ),
    (
        "garbage",
        REGISTER,
        Want::Malformed(["invalid JSON", "invalid CBOR"]),
    ),
    (
        "wrong-types",
        REGISTER,
        Want::Malformed(["thingName is an integer, not a string"; 2]),
    ),
    (
        "wrong-types=deviceConfiguration",
        REGISTER,
        Want::Malformed(["deviceConfiguration is an integer, not a map of strings"; 2]),
    ),
    // A template without a thing gets no thingName, nor, without DeviceConfiguration, a
    // deviceConfiguration: both are optional.
    (
        "missing",
        REGISTER,
        Want::Provisioned {
            thing: false,
            config: true,
        },
    ),
    (
        "missing=deviceConfiguration",
        REGISTER,
        Want::Provisioned {
            thing: true,
            config: false,
        },
    ),
    (
        "extra",
        REGISTER,
        Want::Provisioned {
            thing: true,
            config: true,
        },
    ),
    (
        "array",
        REGISTER,
        Want::Malformed(["the reply is an array, not a map"; 2]),
    ),
    (
        "bad-utf8",
        REGISTER,
        Want::Malformed(["invalid JSON", "invalid CBOR"]),
    ),
    ("huge", REGISTER, Want::Connection),
    (
        "other-format",
        REGISTER,
        Want::Malformed(["invalid JSON", "truncated CBOR"]),
    ),
];

/// Runs the rows whose APIs `pick` keeps on one emulator, one after the other (fault rules are
/// global to an emulator).
fn run_rows(tag: &str, pick: impl Fn(Via) -> bool) {
    count_panics();
    let env = Env::start(tag);
    let started = Instant::now();
    let mut runs = 0;
    for (i, (kind, vias, want)) in ROWS.iter().enumerate() {
        for via in vias.iter().copied().filter(|v| pick(*v)) {
            for (f, format) in [Format::Json, Format::Cbor].into_iter().enumerate() {
                runs += 1;
                let serial = format!("{tag}-{i}-{via:?}-{f}");
                let what = format!("mangle:{kind} on {via:?} in {format:?}");
                let (method, filter, api_name) = match via {
                    Via::Keys => (Method::CreateKeys, "keys", "CreateKeysAndCertificate"),
                    Via::Csr => (
                        Method::Csr(KeyType::P256),
                        "csr",
                        "CreateCertificateFromCsr",
                    ),
                    Via::Register => (Method::CreateKeys, "register", "RegisterThing"),
                };
                let request = env.request(method, format, &serial);
                let out = request.output_dir.clone().unwrap();
                env.emu
                    .faults()
                    .add(format!("mangle:{kind}@{filter}*1").parse().unwrap());
                let certificates = env.registry_len("certificates");
                let things = env.registry_len("things");

                let result =
                    fleetprov::provision(&request, &fleetprov::provision::Hooks::default());

                // The rule fired: the reply was spoiled.
                assert!(env.emu.faults().list().is_empty(), "{what}: rule unused");
                // The service processed the request: only its reply was spoiled.
                assert_eq!(
                    env.registry_len("certificates"),
                    certificates + 1,
                    "{what}: one certificate created"
                );
                let registered = via == Via::Register || matches!(want, Want::Provisioned { .. });
                assert_eq!(
                    env.registry_len("things"),
                    things + usize::from(registered),
                    "{what}: thing registered only if RegisterThing was reached"
                );
                match (*want, result) {
                    (Want::Provisioned { thing, config }, Ok(p)) => {
                        let thing_name = format!("demo-{serial}");
                        assert_eq!(
                            p.thing_name,
                            if thing { &thing_name[..] } else { "" },
                            "{what}"
                        );
                        assert_eq!(!p.device_configuration.is_empty(), config, "{what}");
                        let mut files = files_in(&out);
                        files.sort();
                        assert_eq!(
                            files,
                            ["certificate.pem", "device.json", "private.key"],
                            "{what}"
                        );
                    }
                    (
                        Want::Malformed(reasons),
                        Err(Error::MalformedReply(DecodeError {
                            what: reply,
                            reason,
                        })),
                    ) => {
                        assert_eq!(reply, format!("{api_name} accepted"), "{what}");
                        let at = reason.find(" at ").unwrap_or(reason.len());
                        assert_eq!(&reason[..at], reasons[f], "{what}: {reason}");
                    }
                    (Want::Mismatch, Err(Error::CertificateMismatch)) => {}
                    (Want::Connection, Err(Error::Connection(m))) => {
                        // rumqttc's words for a packet above the limit, not any lost connection.
                        assert!(m.contains("size limit exceeded"), "{what}: {m}");
                    }
                    (want, got) => panic!("{what}: want {want:?}, got {got:?}"),
                }
                if !matches!(want, Want::Provisioned { .. }) {
                    assert_eq!(
                        files_in(&out),
                        Vec::<String>::new(),
                        "{what}: nothing written"
                    );
                }
            }
        }
    }
    assert_eq!(PANICS.load(Ordering::SeqCst), 0, "a thread panicked");
    eprintln!("{tag}: {runs} runs in {:?}", started.elapsed());
}

#[test]
fn hostile_create_keys_replies() {
    run_rows("keys", |v| v == Via::Keys);
}

#[test]
fn hostile_csr_replies() {
    run_rows("csr", |v| v == Via::Csr);
}

#[test]
fn hostile_register_replies() {
    run_rows("register", |v| v == Via::Register);
}
