//! After a device is provisioned through the C API and everything is freed, no copy of its
//! private key, its ownership token or the claim key is left in the process's writable memory.
//!
//! Three processes, so that the memory searched holds only what the library put there:
//! - this test (the parent) runs the emulator and does the matching; it may read the key and
//!   the token, as its own memory is not searched;
//! - a child, this same binary started with `--child`, provisions with
//!   CreateKeysAndCertificate (the reply carries the private key) through the C API, frees
//!   everything and waits; it never reads a secret outside the library;
//! - the parent reads the child's writable mappings (`/proc/PID/maps`, `/proc/PID/mem`).
//!
//! The parent learns the token from the journal: the child's first call is cut before
//! RegisterThing and fails, leaving the journal (token and key) in its state directory; the
//! parent reads it, then the child calls again, resumes and finishes.
//!
//! Secrets are searched as the base64 lines of the key's PEM, the key's private scalar (big and
//! little endian: any decoded copy or a parsed key holds it), and the token.

use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use std::ffi::{c_void, CString};
use std::ptr;
use std::sync::atomic::{AtomicI32, Ordering};

use fleetprov::ffi::*;
use fleetprov::store::journal::Journal;
use fleetprov_result::*;

mod common;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--child") {
        child();
        return;
    }
    // `cargo test` passes harness options (filters, --quiet); listing must list nothing extra.
    if args.iter().any(|a| a == "--list") {
        println!("memscan: test");
        return;
    }
    let filter = args.iter().skip(1).find(|a| !a.starts_with('-'));
    if filter.is_some_and(|filter| !"memscan".contains(filter.as_str())) {
        return;
    }
    if !cfg!(target_os = "linux") {
        println!("memscan: skipped (needs /proc)");
        return;
    }
    let mut failed = Vec::new();
    for (cbor, async_) in [(false, false), (true, false), (false, true), (true, true)] {
        let found = provision_in_child_and_scan(cbor, async_);
        let run = format!(
            "{}, {}",
            if cbor { "CBOR" } else { "JSON" },
            if async_ {
                "fleetprov_provision_async"
            } else {
                "fleetprov_provision"
            }
        );
        if found.is_empty() {
            println!("memscan {run}: no secret found in the child's writable memory");
        } else {
            failed.push(format!("{run}:\n  {}", found.join("\n  ")));
        }
    }
    if !failed.is_empty() {
        eprintln!(
            "secrets left in memory after everything was freed:\n{}",
            failed.join("\n")
        );
        std::process::exit(1);
    }
    println!("test memscan ... ok");
}

/// The outcome an fleetprov_provision_async callback recorded.
static ASYNC_RESULT: AtomicI32 = AtomicI32::new(-1);

unsafe extern "C" fn async_done(
    _: *mut c_void,
    result: fleetprov_result,
    provisioned: *mut fleetprov_provisioned,
    _: *const fleetprov_error,
) {
    // SAFETY: ours to free (NULL on failure, a no-op).
    unsafe { fleetprov_provisioned_free(provisioned) };
    ASYNC_RESULT.store(result as i32, Ordering::SeqCst);
}

/// One provisioning call, blocking or on a library worker thread; whether it succeeded.
///
/// # Safety
/// `c` is a live config.
unsafe fn provision(c: *const fleetprov_config, async_: bool) -> bool {
    // SAFETY: live config; the output pointers are this function's; every object freed once.
    unsafe {
        if async_ {
            let mut op = ptr::null_mut();
            let r = fleetprov_provision_async(c, Some(async_done), ptr::null_mut(), None, &mut op);
            assert_eq!(r, FLEETPROV_OK);
            assert_eq!(fleetprov_operation_wait(op), FLEETPROV_OK);
            fleetprov_operation_free(op);
            ASYNC_RESULT.swap(-1, Ordering::SeqCst) == FLEETPROV_OK as i32
        } else {
            let mut p = ptr::null_mut();
            let r = fleetprov_provision(c, &mut p);
            fleetprov_provisioned_free(p);
            r == FLEETPROV_OK
        }
    }
}

/// The child's part: both provisioning calls through the C API, then it waits to be read.
fn child() {
    let var = |k: &str| CString::new(std::env::var(k).unwrap()).unwrap();
    let port: u16 = std::env::var("MEMSCAN_PORT").unwrap().parse().unwrap();
    let cbor = std::env::var("MEMSCAN_CBOR").unwrap() == "1";
    let async_ = std::env::var("MEMSCAN_ASYNC").unwrap() == "1";
    let stdin = std::io::stdin();
    let mut line = String::new();
    let mut wait = |expect: &str| {
        line.clear();
        stdin.lock().read_line(&mut line).unwrap();
        assert_eq!(line.trim(), expect);
    };
    let say = |what: &str| {
        let mut out = std::io::stdout().lock();
        writeln!(out, "{what}").unwrap();
        out.flush().unwrap();
    };
    // SAFETY: a config this process owns; NUL-terminated strings that outlive each call; every
    // object is freed once.
    unsafe {
        let mut c = ptr::null_mut();
        assert_eq!(fleetprov_config_new(&mut c), FLEETPROV_OK);
        let ok = |r| assert_eq!(r, FLEETPROV_OK);
        ok(fleetprov_config_set_endpoint(
            c,
            c"localhost".as_ptr(),
            port,
        ));
        ok(fleetprov_config_set_ca_file(c, var("MEMSCAN_CA").as_ptr()));
        ok(fleetprov_config_set_claim_files(
            c,
            var("MEMSCAN_CLAIM_CERT").as_ptr(),
            var("MEMSCAN_CLAIM_KEY").as_ptr(),
        ));
        ok(fleetprov_config_set_template(c, c"DemoTemplate".as_ptr()));
        ok(fleetprov_config_set_parameter(
            c,
            c"SerialNumber".as_ptr(),
            c"memscan".as_ptr(),
        ));
        ok(fleetprov_config_set_method(
            c,
            fleetprov_method::FLEETPROV_METHOD_CREATE_KEYS as i32,
        ));
        ok(fleetprov_config_set_format(c, i32::from(cbor)));
        ok(fleetprov_config_set_output_dir(
            c,
            var("MEMSCAN_OUT").as_ptr(),
        ));
        ok(fleetprov_config_set_state_dir(
            c,
            var("MEMSCAN_STATE").as_ptr(),
        ));
        ok(fleetprov_config_set_timeouts(c, 5_000, 30_000));
        // First call: no retries; the emulator cuts the connection before RegisterThing.
        ok(fleetprov_config_set_retry(c, 1, 50, 100));
        assert!(!provision(c, async_), "the first call is cut");
        say("journal");
        wait("go");
        ok(fleetprov_config_set_retry(c, 3, 50, 100));
        assert!(provision(c, async_), "the second call succeeds");
        fleetprov_config_free(c);
    }
    // Controls for the scan: a canary on the stack of a thread that has exited, and one in a
    // live heap block, must both be found (a scan that cannot see them proves nothing).
    let pid = std::process::id();
    std::thread::spawn(move || {
        let mut on_stack = [0u8; 32];
        on_stack.copy_from_slice(format!("canary-exited-stack-{pid:012}").as_bytes());
        std::hint::black_box(&mut on_stack);
    })
    .join()
    .unwrap();
    let live = std::hint::black_box(format!("canary-live-heap-block-{pid:012}"));
    say("done");
    wait("exit");
    drop(live);
}

struct Kid {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Kid {
    fn expect(&mut self, what: &str) {
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        assert_eq!(line.trim(), what, "the child's answer");
    }

    fn say(&mut self, what: &str) {
        writeln!(self.stdin, "{what}").unwrap();
        self.stdin.flush().unwrap();
    }
}

/// Provisions in a child process, then returns where the secrets were found in its memory.
fn provision_in_child_and_scan(cbor: bool, async_: bool) -> Vec<String> {
    let tag = format!("{}-{}", u8::from(cbor), u8::from(async_));
    let dir = common::scratch("memscan", &tag);
    let emu = common::emulator(&dir, &["close:request@register*1"]);
    let paths = emu.paths();
    let (out, state) = (dir.join("out"), dir.join("state"));
    let mut child = Command::new(std::env::current_exe().unwrap())
        .arg("--child")
        .env("MEMSCAN_PORT", emu.port().to_string())
        .env("MEMSCAN_CBOR", if cbor { "1" } else { "0" })
        .env("MEMSCAN_ASYNC", if async_ { "1" } else { "0" })
        .env("MEMSCAN_CA", &paths.ca_cert)
        .env("MEMSCAN_CLAIM_CERT", &paths.claim_cert)
        .env("MEMSCAN_CLAIM_KEY", &paths.claim_key)
        .env("MEMSCAN_OUT", &out)
        .env("MEMSCAN_STATE", &state)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("the child starts");
    let mut kid = Kid {
        stdin: child.stdin.take().unwrap(),
        stdout: BufReader::new(child.stdout.take().unwrap()),
        child,
    };
    kid.expect("journal");
    let mut needles = Needles::default();
    let device_key = {
        let journal = Journal::open(&state).unwrap();
        let entry = journal.load().unwrap().expect("a journal after the cut");
        needles.token(entry.certificate.ownership_token.expose());
        let key = entry.private_key.unwrap().expose().to_owned();
        needles.key("device key", &key);
        key
    };
    needles.key("claim key", &read(&paths.claim_key));
    kid.say("go");
    kid.expect("done");
    assert_eq!(
        read(&out.join("private.key")).trim(),
        device_key.trim(),
        "the written key is the journal's"
    );
    let pid = kid.child.id();
    for canary in ["canary-exited-stack", "canary-live-heap-block"] {
        let text = format!("{canary}-{pid:012}");
        needles.0.push((canary.into(), text.into_bytes()));
    }
    let mut found = scan(pid, &needles);
    for canary in ["canary-exited-stack", "canary-live-heap-block"] {
        let n = found.len();
        found.retain(|f| !f.starts_with(canary));
        assert!(
            found.len() < n,
            "the scan found no {canary}: it cannot see that memory"
        );
    }
    kid.say("exit");
    assert!(
        kid.child.wait().unwrap().success(),
        "the child exits cleanly"
    );
    emu.stop();
    let _ = std::fs::remove_dir_all(&dir);
    found
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap()
}

/// Byte strings that must not be found, each with a name.
#[derive(Default)]
struct Needles(Vec<(String, Vec<u8>)>);

impl Needles {
    fn token(&mut self, token: &str) {
        assert!(token.len() >= 16);
        self.0.push(("token".into(), token.as_bytes().to_vec()));
    }

    fn key(&mut self, name: &str, pem: &str) {
        let mut b64 = String::new();
        for (i, line) in pem.lines().filter(|l| !l.starts_with("-----")).enumerate() {
            b64.push_str(line);
            if line.len() >= 16 {
                self.0
                    .push((format!("{name} PEM line {i}"), line.as_bytes().to_vec()));
            }
        }
        let der = base64_decode(&b64);
        // SEC1 and PKCS#8 EC keys: version 1, then the private scalar as an OCTET STRING.
        let at = der
            .windows(4)
            .position(|w| w[..3] == [0x02, 0x01, 0x01] && w[3] == 0x04)
            .expect("an EC private key");
        let len = der[at + 4] as usize;
        let scalar = der[at + 5..at + 5 + len].to_vec();
        assert!(scalar.len() >= 32);
        let mut reversed = scalar.clone();
        reversed.reverse();
        self.0.push((format!("{name} scalar"), scalar));
        self.0
            .push((format!("{name} scalar (little endian)"), reversed));
    }
}

fn base64_decode(s: &str) -> Vec<u8> {
    let val = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("not base64"),
    };
    let bytes: Vec<u8> = s.bytes().filter(|c| *c != b'=').map(val).collect();
    let mut out = Vec::new();
    for chunk in bytes.chunks(4) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, v)| acc | (u32::from(*v) << (18 - 6 * i)));
        for i in 0..chunk.len() - 1 {
            out.push((n >> (16 - 8 * i)) as u8);
        }
    }
    out
}

/// Searches every writable mapping of process `pid` for the needles. Each hit is described by
/// the needle's name, the mapping (its path or `[anon]`), the mapping's range and the offset.
fn scan(pid: u32, needles: &Needles) -> Vec<String> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let mut mem =
        std::fs::File::open(format!("/proc/{pid}/mem")).expect("/proc/PID/mem of a child");
    let mut found = Vec::new();
    let mut scanned = 0usize;
    for line in maps.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (range, perms) = (fields[0], fields[1]);
        if !perms.starts_with("rw") {
            continue;
        }
        let name = fields.get(5).copied().unwrap_or("[anon]");
        let (start, end) = range.split_once('-').unwrap();
        let start = u64::from_str_radix(start, 16).unwrap();
        let end = u64::from_str_radix(end, 16).unwrap();
        let mut buf = vec![0u8; (end - start) as usize];
        if mem.seek(SeekFrom::Start(start)).is_err() || mem.read_exact(&mut buf).is_err() {
            // [vvar]-like mappings cannot be read; nothing of ours is in them.
            continue;
        }
        scanned += buf.len();
        for (what, needle) in &needles.0 {
            let mut from = 0;
            while let Some(i) = find(&buf[from..], needle) {
                found.push(format!("{what} in {name} ({range}) at +{:#x}", from + i));
                from += i + 1;
            }
        }
    }
    assert!(scanned > 1 << 20, "scanned only {scanned} bytes");
    found
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    let mut from = 0;
    while let Some(i) = hay[from..].iter().position(|b| *b == needle[0]) {
        let at = from + i;
        if hay[at..].starts_with(needle) {
            return Some(at);
        }
        from = at + 1;
    }
    None
}
