//! Storm: many devices provisioning at once through `fleetprov::provision` in one process.
//!
//! ```sh
//! cargo bench --bench storm      # or: bash tests/bench/run.sh (which runs it with the rest)
//! ```
//!
//! Starts the release `fleetprov-emulator` as a child process (`FLEETPROV_EMULATOR`, default
//! `target/release/fleetprov-emulator`; build it first) in a fresh temporary data directory with
//! `--key-type ec`, raises the open-file limit (each device holds a socket on both sides), then
//! starts one thread per device. The threads wait on a barrier and all call
//! `fleetprov::provision` at once: CreateCertificateFromCsr with a P-256 key made on the device,
//! RegisterThing with DemoTemplate, JSON. The public API is blocking (each call runs its own
//! current-thread I/O runtime), so a thread per device in flight is how an application drives
//! many at once.
//!
//! Prints one line of JSON: devices, seconds from the barrier to the last device done,
//! devices per second, the resident set before the threads were started (VmRSS) and its peak
//! (VmHWM) afterwards, the peak delta per device, and how many devices were connected at the
//! same time at most (between their CONNACK and the end of their call).
//!
//! With `FLEETPROV_STORM_HOLD_MS` > 0 the emulator holds every RegisterThing reply that long
//! (its fault rule `delay:MS@register`), so that all devices are connected at the same time at
//! the peak: the memory figure is then per device really in flight; without it, the first
//! devices may be done before the last ones connect.
//!
//! Settings (environment): `FLEETPROV_STORM_DEVICES` (default 1000), `FLEETPROV_STORM_METHOD`
//! (`csr` default, or `keys`), `FLEETPROV_STORM_VERIFY` (`0` default: no verification
//! connection with the new certificate, as in the rest of the benchmark; `1`: the library's
//! default), `FLEETPROV_STORM_STACK_KB` (thread stack size, default 256),
//! `FLEETPROV_STORM_MODE`:
//! - `threads` (default): a thread per device, each calling the blocking `fleetprov::provision`
//!   (which runs its own current-thread I/O runtime), all released at once by a barrier;
//! - `many`: `fleetprov::provision::provision_many`, the library's entry point for many devices
//!   on one thread, on `FLEETPROV_STORM_THREADS` threads (default 2), each with its share.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Barrier};
use std::time::{Duration, Instant};

use fleetprov::engine::flow::Progress;
use fleetprov::engine::Step;
use fleetprov::keys::KeyType;
use fleetprov::provision::Hooks;
use fleetprov::{Config, Method, Request, Roots, Secret};

const STARTUP: Duration = Duration::from_secs(30);

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

/// `VmRSS` and `VmHWM` of this process, in KiB.
fn memory_kb() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Raises the soft open-file limit to the hard one; returns the soft limit in force.
fn raise_nofile() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain libc calls with a valid pointer to a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        }
    }
    lim.rlim_cur
}

/// The emulator child, killed and its data directory removed on drop.
struct Emulator {
    child: Child,
    dir: PathBuf,
    port: u16,
}

impl Emulator {
    fn start(binary: &Path, hold_ms: u64) -> Result<Emulator, String> {
        let dir = std::env::temp_dir().join(format!("fleetprov-storm-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut command = Command::new(binary);
        command.args(["--port", "0", "--bind", "127.0.0.1", "--key-type", "ec"]);
        if hold_ms > 0 {
            command.args(["--fault", &format!("delay:{hold_ms}@register")]);
        }
        let mut child = command
            .arg("--data-dir")
            .arg(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| {
                format!(
                    "{}: {e} (cargo build --release -p fleetprov-emulator)",
                    binary.display()
                )
            })?;
        let stdout = child.stdout.take().expect("piped stdout");
        // Read the `listening on` line on a thread so the wait is bounded; keep draining after.
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(addr) = line.strip_prefix("listening on ") {
                    let _ = tx.send(addr.to_owned());
                }
            }
        });
        let mut emulator = Emulator {
            child,
            dir,
            port: 0,
        };
        let addr = rx
            .recv_timeout(STARTUP)
            .map_err(|_| "the emulator did not print `listening on` in time".to_owned())?;
        emulator.port = addr
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .ok_or(format!("bad address {addr}"))?;
        Ok(emulator)
    }

    fn read(&self, name: &str) -> Result<String, String> {
        let p = self.dir.join(name);
        std::fs::read_to_string(&p).map_err(|e| format!("{}: {e}", p.display()))
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// How many devices are connected now and at most, and how many attempts were retried.
#[derive(Default)]
struct Counters {
    connected: AtomicUsize,
    max_connected: AtomicUsize,
    retries: AtomicUsize,
}

impl Counters {
    /// Counts a device connected from its first SUBSCRIBING (CONNACK seen) on; `counted` is the
    /// device's own flag, so that `done` takes it off again.
    fn progress(&self, p: &Progress, counted: &AtomicUsize) {
        match p.step {
            Step::Subscribing if counted.swap(1, Ordering::SeqCst) == 0 => {
                let now = self.connected.fetch_add(1, Ordering::SeqCst) + 1;
                self.max_connected.fetch_max(now, Ordering::SeqCst);
            }
            Step::Retrying => {
                self.retries.fetch_add(1, Ordering::SeqCst);
            }
            _ => {}
        }
    }

    fn done(&self, counted: &AtomicUsize) {
        if counted.load(Ordering::SeqCst) == 1 {
            self.connected.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// `threads` mode: one device on this thread through the blocking one-call API.
fn provision_blocking(request: &Request, counters: &Arc<Counters>) -> Result<String, String> {
    let counted = Arc::new(AtomicUsize::new(0));
    let hooks = Hooks {
        progress: Some({
            let (counters, counted) = (Arc::clone(counters), Arc::clone(&counted));
            Arc::new(move |p| counters.progress(p, &counted))
        }),
        ..Hooks::default()
    };
    let result = fleetprov::provision(request, &hooks);
    counters.done(&counted);
    result.map(|p| p.thing_name).map_err(|e| e.to_string())
}

/// `many` mode: this thread's share of the devices through `fleetprov::provision::provision_many`
/// (the library's own entry point for many devices on one thread). Its hooks serve every device,
/// so a device counts as connected from SUBSCRIBING to COMMITTED.
fn provision_share_many(
    share: Vec<(usize, Request)>,
    counters: &Arc<Counters>,
) -> Vec<(usize, Result<String, String>)> {
    let requests: Vec<Request> = share.iter().map(|(_, r)| r.clone()).collect();
    let c = Arc::clone(counters);
    let hooks = Hooks {
        progress: Some(Arc::new(move |p: &Progress| match p.step {
            Step::Subscribing => {
                let now = c.connected.fetch_add(1, Ordering::SeqCst) + 1;
                c.max_connected.fetch_max(now, Ordering::SeqCst);
            }
            Step::Committed => {
                c.connected.fetch_sub(1, Ordering::SeqCst);
            }
            Step::Retrying => {
                c.retries.fetch_add(1, Ordering::SeqCst);
            }
            _ => {}
        })),
        ..Hooks::default()
    };
    let results = fleetprov::provision::provision_many(&requests, &hooks);
    share
        .iter()
        .zip(results)
        .map(|((i, _), r)| (*i, r.map(|p| p.thing_name).map_err(|e| e.to_string())))
        .collect()
}

fn main() {
    if let Err(e) = run() {
        eprintln!("storm: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), String> {
    // `cargo bench` passes `--bench`; nothing else is taken from the command line.
    let devices: usize = env_or("FLEETPROV_STORM_DEVICES", "1000")
        .parse()
        .map_err(|_| "FLEETPROV_STORM_DEVICES is not a number")?;
    if !(1..=5000).contains(&devices) {
        return Err("FLEETPROV_STORM_DEVICES must be 1..=5000".into());
    }
    let method = match env_or("FLEETPROV_STORM_METHOD", "csr").as_str() {
        "csr" => Method::Csr(KeyType::P256),
        "keys" => Method::CreateKeys,
        other => return Err(format!("FLEETPROV_STORM_METHOD {other}: csr or keys")),
    };
    let verify = env_or("FLEETPROV_STORM_VERIFY", "0") == "1";
    let stack_kb: usize = env_or("FLEETPROV_STORM_STACK_KB", "256")
        .parse()
        .map_err(|_| "FLEETPROV_STORM_STACK_KB is not a number")?;
    let hold_ms: u64 = env_or("FLEETPROV_STORM_HOLD_MS", "0")
        .parse()
        .map_err(|_| "FLEETPROV_STORM_HOLD_MS is not a number")?;
    let nofile = raise_nofile();
    if nofile < (devices as u64) * 2 + 64 {
        return Err(format!(
            "open-file limit {nofile} is too low for {devices} devices (ulimit -n)"
        ));
    }
    let binary = std::env::var_os("FLEETPROV_EMULATOR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("target/release/fleetprov-emulator")
        });
    let emulator = Emulator::start(&binary, hold_ms)?;
    let mut config = Config::new(
        "localhost",
        emulator.read("claim.pem")?,
        Secret::new(emulator.read("claim.key")?),
    );
    config.port = emulator.port;
    config.roots = Roots::Pem(emulator.read("ca.pem")?);
    // Generous, so that the figure measures the load rather than the timeouts.
    config.step_timeout = Duration::from_secs(60);
    config.overall_timeout = Some(Duration::from_secs(240));
    let template = Request::new(config, "DemoTemplate", method);
    let tag = std::process::id();

    let mode = env_or("FLEETPROV_STORM_MODE", "threads");
    let workers: usize = match mode.as_str() {
        "threads" => devices,
        "many" => env_or("FLEETPROV_STORM_THREADS", "2")
            .parse()
            .ok()
            .filter(|n| (1..=64).contains(n))
            .ok_or("FLEETPROV_STORM_THREADS must be 1..=64")?,
        other => {
            return Err(format!("FLEETPROV_STORM_MODE {other}: threads or many"));
        }
    };
    // Before anything per device exists (its request and credentials included).
    let (rss_before, _) = memory_kb();
    let requests: Vec<Request> = (0..devices)
        .map(|i| {
            let mut request = template.clone();
            request.verify = verify;
            request.connection.client_id = format!("storm-{tag}-{i}");
            request.parameters =
                BTreeMap::from([("SerialNumber".to_owned(), format!("storm-{tag}-{i}"))]);
            request
        })
        .collect();
    let counters = Arc::new(Counters::default());
    let barrier = Arc::new(Barrier::new(workers + 1));
    // Worker w provisions devices w, w + workers, w + 2 * workers, ...
    let mut handles = Vec::with_capacity(workers);
    let mut shares: Vec<Vec<(usize, Request)>> = (0..workers).map(|_| Vec::new()).collect();
    for (i, request) in requests.into_iter().enumerate() {
        shares[i % workers].push((i, request));
    }
    for (w, share) in shares.into_iter().enumerate() {
        let (barrier, counters) = (Arc::clone(&barrier), Arc::clone(&counters));
        let many = mode == "many";
        let t = std::thread::Builder::new()
            .name(format!("worker-{w}"))
            .stack_size(stack_kb * 1024)
            .spawn(move || -> Vec<(usize, Result<String, String>)> {
                barrier.wait();
                if many {
                    return provision_share_many(share, &counters);
                }
                share
                    .into_iter()
                    .map(|(i, r)| (i, provision_blocking(&r, &counters)))
                    .collect()
            })
            .map_err(|e| format!("thread {w}: {e}"))?;
        handles.push(t);
    }
    barrier.wait();
    let start = Instant::now();
    let mut failures = Vec::new();
    for t in handles {
        let Ok(results) = t.join() else {
            failures.push("a worker thread panicked".to_owned());
            continue;
        };
        for (i, result) in results {
            match result {
                Ok(name) if name == format!("demo-storm-{tag}-{i}") => {}
                Ok(name) => failures.push(format!("device {i}: thing {name}")),
                Err(e) => failures.push(format!("device {i}: {e}")),
            }
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    let (rss_after, hwm) = memory_kb();
    drop(emulator);
    let delta_kb = hwm.saturating_sub(rss_before);
    println!(
        "{{\"devices\": {devices}, \"failed\": {}, \"method\": \"{}\", \"verify\": {verify}, \
         \"seconds\": {seconds:.3}, \"devices_per_s\": {:.1}, \"rss_before_kb\": {rss_before}, \
         \"peak_rss_kb\": {hwm}, \"rss_after_kb\": {rss_after}, \"peak_delta_kb\": {delta_kb}, \
         \"kb_per_device\": {:.2}, \"max_connected\": {}, \"retries\": {}, \"stack_kb\": {stack_kb}, \
         \"hold_ms\": {hold_ms}, \"mode\": \"{mode}\", \"threads\": {workers}}}",
        failures.len(),
        if matches!(template.method, Method::CreateKeys) {
            "keys"
        } else {
            "csr"
        },
        (devices - failures.len()) as f64 / seconds,
        delta_kb as f64 / devices as f64,
        counters.max_connected.load(Ordering::SeqCst),
        counters.retries.load(Ordering::SeqCst),
    );
    for f in failures.iter().take(10) {
        eprintln!("storm: {f}");
    }
    if failures.is_empty() {
        Ok(())
    } else {
        Err(format!("{} of {devices} devices failed", failures.len()))
    }
}
