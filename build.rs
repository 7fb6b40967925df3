//! Gives the shared library its SONAME, libfleetprov.so.<ABI>, on ELF targets: programs record
//! that name, so one built against this ABI never loads a library of another. The number is
//! FLEETPROV_ABI_VERSION (src/ffi/types.rs); tests/abi.rs checks that the two agree.

const ABI_VERSION: u32 = 3;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    if matches!(
        os.as_str(),
        "linux" | "android" | "freebsd" | "netbsd" | "openbsd"
    ) {
        println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libfleetprov.so.{ABI_VERSION}");
    }
}
