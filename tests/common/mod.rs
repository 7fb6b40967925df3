//! What the library's integration tests share: the in-process emulator in a scratch directory,
//! and client configurations for it.
// Each test crate uses part of this module.
#![allow(dead_code)]

pub mod blobs;
pub mod host;

use std::path::{Path, PathBuf};
use std::time::Duration;

use fleetprov::protocol::Format;
use fleetprov::{Config, Roots, Secret};
use fleetprov_emulator::{Config as EmuConfig, Emulator, KeyKind};

/// The step timeout of the test configurations: short, as everything runs on loopback.
pub const STEP_TIMEOUT: Duration = Duration::from_millis(1500);

/// An empty scratch directory for test `name` of `suite`.
pub fn scratch(suite: &str, name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("fleetprov-{suite}-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// The emulator, with its data in `dir/emulator`, and the directory.
pub struct Env {
    pub emu: Emulator,
    pub dir: PathBuf,
}

/// Starts an emulator with EC keys (RSA generation would dominate the run time) and these fault
/// rules in force, in a fresh scratch directory.
pub fn env(suite: &str, name: &str, faults: &[&str]) -> Env {
    let dir = scratch(suite, name);
    Env {
        emu: emulator(&dir, faults),
        dir,
    }
}

/// Starts an emulator as [`env`] does, with its data in `dir/emulator`.
pub fn emulator(dir: &Path, faults: &[&str]) -> Emulator {
    let mut config = EmuConfig::new(dir.join("emulator"));
    config.key_kind = KeyKind::EcP256;
    // An EC CA: quick to make for every test's emulator. The emulator's own tests and the C,
    // Python and interop suites use its default, an RSA-2048 CA as AWS's.
    config.ca_key_kind = KeyKind::EcP256;
    config.faults = faults
        .iter()
        .map(|f| f.parse().expect("fault rule"))
        .collect();
    Emulator::start(config).expect("emulator starts")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap()
}

/// A configuration for `emu` that authenticates with `cert_pem` and `key_pem`.
pub fn connection_with(
    emu: &Emulator,
    cert_pem: String,
    key_pem: String,
    format: Format,
) -> Config {
    let mut c = Config::new("localhost", cert_pem, Secret::new(key_pem));
    c.port = emu.port();
    c.roots = Roots::Pem(read(&emu.paths().ca_cert));
    c.format = format;
    c.step_timeout = STEP_TIMEOUT;
    c.overall_timeout = Some(Duration::from_secs(60));
    c
}

/// A configuration for `emu` with its claim credentials.
pub fn connection(emu: &Emulator, format: Format) -> Config {
    let paths = emu.paths();
    connection_with(emu, read(&paths.claim_cert), read(&paths.claim_key), format)
}

/// The ids and statuses of the registry's certificates other than the claim certificate.
pub fn device_certificates(emu: &Emulator) -> Vec<(String, String)> {
    let claim = fleetprov::keys::certificate_id(&read(&emu.paths().claim_cert)).unwrap();
    emu.registry().unwrap()["certificates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["id"].as_str().unwrap().to_owned(),
                c["status"].as_str().unwrap().to_owned(),
            )
        })
        .filter(|(id, _)| *id != claim)
        .collect()
}

/// This thread's last error text from the C API (`fleetprov_last_error_message`).
pub fn last_error() -> String {
    let mut buf = vec![0 as std::ffi::c_char; 512];
    // SAFETY: a buffer of the length given.
    unsafe {
        fleetprov::ffi::fleetprov_last_error_message(
            buf.as_mut_ptr(),
            buf.len(),
            std::ptr::null_mut(),
        )
    };
    // SAFETY: NUL-terminated by the library.
    unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

/// Asserts that a C API call succeeded, with the last error's text if not.
pub fn ok(r: fleetprov::ffi::fleetprov_result) {
    assert_eq!(
        r,
        fleetprov::ffi::fleetprov_result::FLEETPROV_OK,
        "{}",
        last_error()
    );
}
