//! Credential files: modes, contents, atomic replacement, and failures that leave nothing
//! half-written. Tests may run as root, where permission bits do not stop writes: failures are
//! forced with paths under a regular file, directories in the way, and injected faults.

use std::cell::RefCell;
use std::os::unix::fs::MetadataExt;

use super::*;

thread_local! {
    /// (step, file name) to fail in this thread.
    static FAULT: RefCell<Option<(String, String)>> = const { RefCell::new(None) };
}

/// Makes `step` fail for files named `name` in this thread until the guard is dropped.
pub(super) fn inject_fault(step: &str, name: &str) -> impl Drop {
    struct Clear;
    impl Drop for Clear {
        fn drop(&mut self) {
            FAULT.with(|f| *f.borrow_mut() = None);
        }
    }
    FAULT.with(|f| *f.borrow_mut() = Some((step.into(), name.into())));
    Clear
}

pub(super) fn fault(step: &str, path: &Path) -> io::Result<()> {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
    FAULT.with(|f| match &*f.borrow() {
        Some((s, n)) if s == step && Some(n) == name.as_ref() => {
            Err(io::Error::other(format!("injected {step} fault")))
        }
        _ => Ok(()),
    })
}

/// A scratch directory, removed on drop.
struct Tmp(PathBuf);

impl Tmp {
    fn new(tag: &str) -> Tmp {
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "fleetprov-store-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p).unwrap();
        // As a device's credential directory is: private (an open one is refused).
        fs::set_permissions(&p, fs::Permissions::from_mode(0o700)).unwrap();
        Tmp(p)
    }
}

impl Drop for Tmp {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn mode(p: &Path) -> u32 {
    fs::metadata(p).unwrap().permissions().mode() & 0o7777
}

/// Everything in `dir`, sorted.
fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

const SET: [&str; 3] = [CERTIFICATE_FILE, METADATA_FILE, PRIVATE_KEY_FILE];

fn read(dir: &Path, name: &str) -> String {
    fs::read_to_string(dir.join(name)).unwrap()
}

/// The three files' contents.
fn contents(dir: &Path) -> Vec<String> {
    SET.iter().map(|n| read(dir, n)).collect()
}

struct Set {
    key: Secret,
    cert: String,
    id: String,
    thing: String,
    config: BTreeMap<String, String>,
}

impl Set {
    fn new(tag: &str) -> Set {
        Set {
            key: Secret::new(format!(
                "-----BEGIN PRIVATE KEY-----\nKEY{tag}SECRETMATERIAL\n-----END PRIVATE KEY-----\n"
            )),
            cert: format!("-----BEGIN CERTIFICATE-----\nCERT{tag}\n-----END CERTIFICATE-----\n"),
            id: format!("id-{tag}"),
            thing: format!("thing-{tag}"),
            config: BTreeMap::from([("set".to_string(), tag.to_string())]),
        }
    }

    fn credentials(&self) -> Credentials<'_> {
        Credentials {
            thing_name: &self.thing,
            certificate_id: &self.id,
            certificate_pem: &self.cert,
            private_key_pem: &self.key,
            device_configuration: &self.config,
        }
    }

    fn write(&self, dir: &Path) -> Result<StoredPaths, StoreError> {
        write_credentials(dir, &self.credentials())
    }
}

fn json(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&read(dir, METADATA_FILE)).unwrap()
}

#[test]
fn files_modes_and_contents() {
    let t = Tmp::new("modes");
    let dir = t.0.join("a/b/creds");
    let set = Set {
        thing: "thing \"one\" é".into(),
        config: BTreeMap::from([
            ("k".to_string(), "v".to_string()),
            ("empty".to_string(), String::new()),
        ]),
        ..Set::new("1")
    };
    let p = set.write(&dir).unwrap();
    assert_eq!(
        p,
        StoredPaths {
            dir: dir.clone(),
            certificate: dir.join("certificate.pem"),
            private_key: dir.join("private.key"),
            metadata: dir.join("device.json"),
        }
    );
    assert_eq!(listing(&dir), SET);
    for d in [t.0.join("a"), t.0.join("a/b"), dir.clone()] {
        assert_eq!(mode(&d), 0o700, "{}", d.display());
    }
    assert_eq!(mode(&p.private_key), 0o600);
    assert_eq!(mode(&p.certificate), 0o644);
    assert_eq!(mode(&p.metadata), 0o644);
    assert_eq!(read(&dir, PRIVATE_KEY_FILE), set.key.expose());
    assert_eq!(read(&dir, CERTIFICATE_FILE), set.cert);
    let text = read(&dir, METADATA_FILE);
    assert!(text.ends_with("}\n"));
    assert_eq!(
        json(&dir),
        serde_json::json!({
            "thingName": "thing \"one\" é",
            "certificateId": "id-1",
            "deviceConfiguration": {"k": "v", "empty": ""},
        })
    );
    // Field order as documented.
    let order: Vec<usize> = ["thingName", "certificateId", "deviceConfiguration"]
        .iter()
        .map(|k| text.find(k).unwrap())
        .collect();
    assert!(order.windows(2).all(|w| w[0] < w[1]), "{text}");
}

#[test]
fn device_json_never_holds_the_key() {
    let t = Tmp::new("nokey");
    let key = crate::keys::DeviceKey::generate(crate::keys::KeyType::P256).unwrap();
    let set = Set {
        key: key.private_key_pem().clone(),
        ..Set::new("1")
    };
    let p = set.write(&t.0).unwrap();
    let meta = read(&t.0, METADATA_FILE);
    assert!(!meta.contains("PRIVATE"), "{meta}");
    for line in key.private_key_pem().expose().lines() {
        if !line.starts_with("-----") && line.len() >= 12 {
            assert!(!meta.contains(&line[..12]), "{meta}");
        }
    }
    assert_eq!(
        fs::read_to_string(&p.private_key).unwrap(),
        key.private_key_pem().expose()
    );
    // Nor does the certificate file, nor any other file but the key.
    assert!(!read(&t.0, CERTIFICATE_FILE).contains("PRIVATE"));
    assert_eq!(
        json(&t.0).as_object().map(|o| o.len()),
        Some(3),
        "only thingName, certificateId, deviceConfiguration"
    );
}

#[test]
fn existing_directories_are_left_alone_and_refused_when_open_to_others() {
    // (mode before, accepted)
    for (before, accepted) in [
        (0o755, false),
        (0o750, false),
        (0o777, false),
        (0o711, false),
        (0o701, false),
        (0o770, false),
        (0o710, false),
        (0o2700, true),
        (0o700, true),
    ] {
        let t = Tmp::new("loose");
        let dir = t.0.join("creds");
        fs::create_dir(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(before)).unwrap();
        let got = Set::new("1").write(&dir);
        assert_eq!(got.is_ok(), accepted, "{before:o}: {got:?}");
        if let Err(e) = got {
            assert_eq!(
                e.source.kind(),
                io::ErrorKind::PermissionDenied,
                "{before:o}"
            );
            assert!(
                e.to_string().contains(&format!("mode {before:04o}")),
                "{before:o}: {e}"
            );
            assert!(
                fs::read_dir(&dir).unwrap().next().is_none(),
                "nothing written"
            );
        }
        assert_eq!(mode(&dir), before, "{before:o}: the mode is never changed");
    }
    // The parent of an existing directory is not the store's business.
    let t = Tmp::new("parent");
    fs::set_permissions(&t.0, fs::Permissions::from_mode(0o755)).unwrap();
    ensure_private_dir(&t.0.join("creds")).unwrap();
    assert_eq!(mode(&t.0), 0o755);
    assert_eq!(mode(&t.0.join("creds")), 0o700);
}

#[test]
fn replacing_a_set_is_atomic_per_file() {
    let t = Tmp::new("replace");
    let dir = t.0.join("creds");
    Set::new("old").write(&dir).unwrap();
    let old_inodes: Vec<u64> = SET
        .iter()
        .map(|n| fs::metadata(dir.join(n)).unwrap().ino())
        .collect();
    // A reader holding the old key open keeps reading the old key.
    let mut held = File::open(dir.join(PRIVATE_KEY_FILE)).unwrap();
    // Loosened modes on the old files are not inherited.
    fs::set_permissions(
        dir.join(PRIVATE_KEY_FILE),
        fs::Permissions::from_mode(0o666),
    )
    .unwrap();

    let new = Set::new("new");
    new.write(&dir).unwrap();
    assert_eq!(
        contents(&dir),
        vec![
            new.cert.clone(),
            read(&dir, METADATA_FILE),
            new.key.expose().to_string()
        ]
    );
    assert_eq!(json(&dir)["thingName"], "thing-new");
    assert_eq!(mode(&dir.join(PRIVATE_KEY_FILE)), 0o600);
    assert_eq!(listing(&dir), SET, "no temporary files");
    for (name, old) in SET.iter().zip(old_inodes) {
        assert_ne!(
            fs::metadata(dir.join(name)).unwrap().ino(),
            old,
            "{name} replaced, not rewritten"
        );
    }
    let mut old_key = String::new();
    io::Read::read_to_string(&mut held, &mut old_key).unwrap();
    assert!(old_key.contains("KEYoldSECRET"));
}

#[test]
fn a_path_under_a_regular_file_fails_cleanly() {
    let t = Tmp::new("underfile");
    let file = t.0.join("plain");
    fs::write(&file, b"x").unwrap();
    for dir in [file.join("creds"), file.join("a/b/creds"), file.clone()] {
        let e = Set::new("1").write(&dir).unwrap_err();
        assert_eq!(e.path, dir);
        let shown = e.to_string();
        assert!(
            shown.starts_with(&format!("{}: ", dir.display())),
            "{shown}"
        );
        assert!(
            shown.contains("ot a directory") || shown.contains("exists"),
            "{shown}"
        );
        assert!(std::error::Error::source(&e).is_some());
        assert!(!format!("{shown} {e:?}").contains("SECRET"));
    }
    assert_eq!(listing(&t.0), ["plain"]);
    assert_eq!(fs::read(&file).unwrap(), b"x");
}

#[test]
fn empty_directory_path_is_refused() {
    let e = Set::new("1").write(Path::new("")).unwrap_err();
    assert_eq!(e.source.kind(), io::ErrorKind::InvalidInput);
    assert_eq!(e.to_string(), ": empty directory path");
}

/// A failure at any step before the commit leaves the old set exactly as it was; at or after
/// it, the set is left without device.json (incomplete), never mixed; never a temporary file.
#[test]
fn failures_leave_the_old_set_or_an_incomplete_one() {
    enum After {
        Untouched,
        Incomplete,
    }
    use After::*;
    // (step, file, what the directory holds afterwards)
    let rows = [
        ("write", PRIVATE_KEY_FILE, Untouched),
        ("write", CERTIFICATE_FILE, Untouched),
        ("write", METADATA_FILE, Untouched),
        ("remove", METADATA_FILE, Untouched),
        ("rename", PRIVATE_KEY_FILE, Incomplete),
        ("rename", CERTIFICATE_FILE, Incomplete),
        ("rename", METADATA_FILE, Incomplete),
        ("sync", "creds", Incomplete),
    ];
    for (step, name, after) in rows {
        let t = Tmp::new("fault");
        let dir = t.0.join("creds");
        let old = Set::new("old");
        old.write(&dir).unwrap();
        let before = contents(&dir);

        let e = {
            let _fault = inject_fault(step, name);
            Set::new("new").write(&dir).unwrap_err()
        };
        assert!(
            e.to_string().contains(&format!("injected {step} fault")),
            "{e}"
        );
        assert!(!format!("{e} {e:?}").contains("SECRET"));
        match after {
            Untouched => {
                assert_eq!(listing(&dir), SET, "{step} {name}");
                assert_eq!(contents(&dir), before, "{step} {name}");
            }
            Incomplete => {
                let names = listing(&dir);
                assert!(
                    !names.contains(&METADATA_FILE.to_string()),
                    "{step} {name}: {names:?}"
                );
                assert!(
                    names.iter().all(|n| SET.contains(&n.as_str())),
                    "{step} {name}: {names:?}"
                );
            }
        }
        // The next attempt succeeds and leaves a whole new set.
        let retry = Set::new("retry");
        retry.write(&dir).unwrap();
        assert_eq!(listing(&dir), SET);
        assert_eq!(read(&dir, PRIVATE_KEY_FILE), retry.key.expose());
        assert_eq!(json(&dir)["certificateId"], "id-retry");
    }
}

#[test]
fn a_directory_in_the_way_fails_before_anything_changes() {
    for blocked in SET {
        let t = Tmp::new("inway");
        let dir = t.0.join("creds");
        Set::new("old").write(&dir).unwrap();
        fs::remove_file(dir.join(blocked)).unwrap();
        fs::create_dir(dir.join(blocked)).unwrap();
        fs::write(dir.join(blocked).join("x"), b"x").unwrap();
        let before: Vec<(String, Option<String>)> = SET
            .iter()
            .map(|n| (n.to_string(), fs::read_to_string(dir.join(n)).ok()))
            .collect();

        let e = Set::new("new").write(&dir).unwrap_err();
        assert_eq!(e.path, dir.join(blocked));
        assert_eq!(e.source.kind(), io::ErrorKind::IsADirectory);
        let after: Vec<(String, Option<String>)> = SET
            .iter()
            .map(|n| (n.to_string(), fs::read_to_string(dir.join(n)).ok()))
            .collect();
        assert_eq!(after, before, "{blocked}");
        assert_eq!(listing(&dir), SET, "no temporary files ({blocked})");
    }
}

#[test]
fn write_atomic_table() {
    let t = Tmp::new("atomic");
    let file = t.0.join("plain");
    fs::write(&file, b"x").unwrap();
    fs::create_dir(t.0.join("dir")).unwrap();
    let existing = t.0.join("existing");
    fs::write(&existing, b"old").unwrap();
    fs::set_permissions(&existing, fs::Permissions::from_mode(0o666)).unwrap();
    // (path, mode, expected: Ok(mode on disk) or Err(kind))
    let rows: Vec<(PathBuf, u32, Result<u32, io::ErrorKind>)> = vec![
        (t.0.join("new-600"), 0o600, Ok(0o600)),
        (t.0.join("new-644"), 0o644, Ok(0o644)),
        (t.0.join("new-640"), 0o640, Ok(0o640)),
        (t.0.join("setuid"), 0o4755, Ok(0o755)),
        (existing.clone(), 0o600, Ok(0o600)),
        (t.0.join("dir"), 0o600, Err(io::ErrorKind::IsADirectory)),
        (t.0.join("missing/f"), 0o600, Err(io::ErrorKind::NotFound)),
        (file.join("f"), 0o600, Err(io::ErrorKind::NotADirectory)),
        (t.0.join(".."), 0o600, Err(io::ErrorKind::InvalidInput)),
        (PathBuf::from("/"), 0o600, Err(io::ErrorKind::InvalidInput)),
    ];
    for (path, m, want) in rows {
        let got = write_atomic(&path, b"data", m).map(|()| mode(&path));
        assert_eq!(got.map_err(|e| e.kind()), want, "{}", path.display());
        if want.is_ok() {
            assert_eq!(fs::read(&path).unwrap(), b"data");
        }
    }
    let mut names = listing(&t.0);
    names.retain(|n| n.ends_with(".tmp"));
    assert!(names.is_empty(), "{names:?}");
    assert_eq!(fs::read(&file).unwrap(), b"x");
}

#[test]
fn ensure_private_dir_table() {
    let t = Tmp::new("ensure");
    let file = t.0.join("plain");
    fs::write(&file, b"x").unwrap();
    let open = t.0.join("open");
    fs::create_dir(&open).unwrap();
    fs::set_permissions(&open, fs::Permissions::from_mode(0o755)).unwrap();
    let private = t.0.join("private");
    fs::create_dir(&private).unwrap();
    fs::set_permissions(&private, fs::Permissions::from_mode(0o700)).unwrap();
    let rows: Vec<(PathBuf, Result<(), io::ErrorKind>)> = vec![
        (t.0.join("new"), Ok(())),
        (t.0.join("x/y/z"), Ok(())),
        (private, Ok(())),
        (open, Err(io::ErrorKind::PermissionDenied)),
        (PathBuf::new(), Err(io::ErrorKind::InvalidInput)),
        (file.clone(), Err(io::ErrorKind::NotADirectory)),
        (file.join("d"), Err(io::ErrorKind::NotADirectory)),
    ];
    for (dir, want) in rows {
        let got = ensure_private_dir(&dir);
        assert_eq!(got.map_err(|e| e.kind()), want, "{}", dir.display());
        if want.is_ok() {
            assert_eq!(mode(&dir), 0o700);
        }
    }
}

#[test]
fn stale_temporary_files_are_removed() {
    let t = Tmp::new("stale");
    let dir = t.0.join("creds");
    ensure_private_dir(&dir).unwrap();
    let me = std::process::id();
    let hour_ago = SystemTime::now() - Duration::from_secs(3600);
    // (name, mtime an hour ago, removed)
    let rows = [
        // pid 99999999 is above any pid_max: its owner is gone.
        (".private.key.99999999.0.tmp".to_string(), false, true),
        (".device.json.99999999.3.tmp".to_string(), false, true),
        // Our pid but older than this process's first write: a previous boot's process.
        (format!(".certificate.pem.{me}.7.tmp"), true, true),
        // Ours and fresh: another thread's write in progress.
        (format!(".certificate.pem.{me}.8.tmp"), false, false),
        // Not ours to touch.
        (".other.99999999.0.tmp".to_string(), true, false),
        (".private.key.abc.0.tmp".to_string(), true, false),
        ("private.key.99999999.0.tmp".to_string(), true, false),
        ("notes.txt".to_string(), true, false),
    ];
    for (name, old, _) in &rows {
        let f = File::create(dir.join(name)).unwrap();
        if *old {
            f.set_modified(hour_ago).unwrap();
        }
    }
    let _ = process_start();
    Set::new("1").write(&dir).unwrap();
    // Without /proc, only the age tells.
    let proc_fs = Path::new("/proc/self").exists();
    for (name, old, removed) in &rows {
        let removed = *removed && (proc_fs || *old);
        assert_eq!(!dir.join(name).exists(), removed, "{name}");
    }
}

#[test]
fn temp_file_owner_table() {
    let rows = [
        (".private.key.123.0.tmp", Some(123)),
        (".certificate.pem.1.99.tmp", Some(1)),
        (".device.json.4294967295.1.tmp", Some(u32::MAX)),
        (".device.json.4294967296.1.tmp", None),
        (".device.json.12.tmp", None),
        (".device.json..1.tmp", None),
        (".device.json.1..tmp", None),
        (".device.json.-1.1.tmp", None),
        (".device.json.1.1.tmp.x", None),
        ("device.json.1.1.tmp", None),
        (".journal.json.1.1.tmp", None),
        ("", None),
    ];
    for (name, want) in rows {
        assert_eq!(temp_file_owner(name), want, "{name}");
    }
}
