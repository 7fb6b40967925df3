//! The committed C header is what cbindgen generates from the sources, and the version macros
//! agree with Cargo.toml and fleetprov_version().

use std::path::Path;

fn generate() -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut config =
        cbindgen::Config::from_file(root.join("cbindgen.toml")).expect("cbindgen.toml");
    config.after_includes = Some(format!(
        "\n#define FLEETPROV_VERSION \"{}\"\n#define FLEETPROV_VERSION_MAJOR {}\n#define FLEETPROV_VERSION_MINOR {}\n#define FLEETPROV_VERSION_PATCH {}\n",
        env!("CARGO_PKG_VERSION"),
        env!("CARGO_PKG_VERSION_MAJOR"),
        env!("CARGO_PKG_VERSION_MINOR"),
        env!("CARGO_PKG_VERSION_PATCH"),
    ));
    let mut out = Vec::new();
    cbindgen::Builder::new()
        .with_crate(root)
        .with_config(config)
        .generate()
        .expect("cbindgen generates the header")
        .write(&mut out);
    let header = String::from_utf8(out).expect("UTF-8 header");
    // cbindgen labels some #endif lines with // comments; C89 has only /* */ comments.
    header
        .lines()
        .map(|line| match line.split_once("// ") {
            Some((code, label)) if code.trim_start().starts_with(['#', '}']) => {
                format!("{code}/* {label} */\n")
            }
            _ => format!("{line}\n"),
        })
        .collect()
}

#[test]
fn header_is_current() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("include/fleetprov.h");
    let fresh = generate();
    if std::env::var_os("UPDATE_HEADER").is_some() {
        // In CI the committed header is what is checked: rewriting it there would pass anything.
        assert!(
            std::env::var_os("CI").is_none(),
            "UPDATE_HEADER is refused when CI is set: regenerate the header locally and commit it"
        );
        std::fs::write(&path, &fresh).expect("write the header");
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == fresh,
        "include/fleetprov.h is stale: run `UPDATE_HEADER=1 cargo test --test header` and commit it"
    );
}

#[test]
fn version_macros_agree_with_the_library() {
    let header = generate();
    let version = env!("CARGO_PKG_VERSION");
    assert!(header.contains(&format!("#define FLEETPROV_VERSION \"{version}\"")));
    // SAFETY: fleetprov_version returns a static NUL-terminated string.
    let runtime = unsafe { std::ffi::CStr::from_ptr(fleetprov::ffi::fleetprov_version()) };
    assert_eq!(runtime.to_str().unwrap(), version);
    assert_eq!(fleetprov::version(), version);
}
