//! The C ABI as a program sees it, checked with the real C compiler:
//! - a snapshot of the size and field offsets of every struct in the header, the size of every
//!   type, and the value of every constant (`tests/abi/<arch>.txt`): an ABI change shows up as a
//!   diff here, to be made on purpose (with FLEETPROV_ABI_VERSION raised) or not at all;
//! - the header compiles as C89, C99, C11 and C++;
//! - the shared library's SONAME carries FLEETPROV_ABI_VERSION, and fleetprov_abi_version()
//!   agrees with the header.
//!
//! `UPDATE_ABI=1 cargo test --test abi` rewrites the snapshot (refused when CI is set).

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn header() -> String {
    std::fs::read_to_string(root().join("include/fleetprov.h")).expect("the header")
}

fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("abi-{name}"));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The header without comments, one string.
fn code(header: &str) -> String {
    let mut out = String::new();
    let mut rest = header;
    while let Some(start) = rest.find("/*") {
        out.push_str(&rest[..start]);
        rest = rest[start..]
            .find("*/")
            .map_or("", |end| &rest[start + end + 2..]);
    }
    out.push_str(rest);
    out.lines()
        .map(|l| l.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

/// A struct and its fields' names.
type Struct = (String, Vec<String>);
/// A constant, and whether its value is a string.
type Constant = (String, bool);

/// The structs, type names and constants the header declares.
fn declarations(header: &str) -> (Vec<Struct>, Vec<String>, Vec<Constant>) {
    let code = code(header);
    let mut structs = Vec::new();
    let mut rest = code.as_str();
    while let Some(start) = rest.find("typedef struct ") {
        let after = &rest[start + "typedef struct ".len()..];
        let name: String = after
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        let head = &after[name.len()..];
        if head.trim_start().starts_with('{') {
            let open = head.find('{').unwrap();
            let close = head.find("} ").expect("struct end");
            let body = &head[open + 1..close];
            let fields = body
                .split(';')
                .map(str::trim)
                .filter(|m| !m.is_empty())
                .map(|m| match m.find("(*") {
                    Some(i) => m[i + 2..].split(')').next().unwrap().trim().to_string(),
                    None => m
                        .rsplit(|c: char| !(c.is_alphanumeric() || c == '_'))
                        .find(|t| !t.is_empty())
                        .unwrap()
                        .to_string(),
                })
                .collect();
            structs.push((name, fields));
            rest = &head[close..];
        } else {
            rest = head;
        }
    }
    let mut types = Vec::new();
    let mut constants = Vec::new();
    let mut in_enum = false;
    for line in code.lines() {
        let t = line.trim();
        if let Some(name) = t.strip_prefix("enum ").filter(|_| !t.contains(';')) {
            types.push(name.trim_end_matches(" {").trim().to_string());
            in_enum = true;
        } else if in_enum && t.starts_with("};") {
            in_enum = false;
        } else if in_enum && t.starts_with("FLEETPROV_") {
            let name = t.split(['=', ',', ' ']).next().unwrap();
            constants.push((name.to_string(), false));
        } else if let Some(def) = t.strip_prefix("#define FLEETPROV_") {
            let name = format!("FLEETPROV_{}", def.split([' ', '(']).next().unwrap());
            let value = def.split_once(' ').map_or("", |(_, v)| v.trim());
            // The version macros are not the ABI (FLEETPROV_ABI_VERSION is).
            let versions = name.starts_with("FLEETPROV_VERSION");
            if name != "FLEETPROV_H" && !versions && !def.split(' ').next().unwrap().contains('(') {
                constants.push((name, value.starts_with('"')));
            }
        } else if t.starts_with("typedef ")
            && !t.starts_with("typedef struct ")
            && t.ends_with(';')
            && !t.contains('(')
        {
            let name = t.trim_end_matches(';').rsplit(' ').next().unwrap();
            types.push(name.to_string());
        }
    }
    types.sort();
    types.dedup();
    (structs, types, constants)
}

fn cc() -> String {
    std::env::var("CC").unwrap_or_else(|_| "cc".into())
}

fn compile_and_run(name: &str, source: &str) -> String {
    let dir = scratch(name);
    let src = dir.join(format!("{name}.c"));
    let exe = dir.join(name);
    std::fs::write(&src, source).unwrap();
    let built = Command::new(cc())
        .args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-I"])
        .arg(root().join("include"))
        .arg(&src)
        .arg("-o")
        .arg(&exe)
        .output()
        .expect("the C compiler runs");
    assert!(
        built.status.success(),
        "{}",
        String::from_utf8_lossy(&built.stderr)
    );
    let ran = Command::new(&exe).output().expect("the probe runs");
    assert!(ran.status.success());
    String::from_utf8(ran.stdout).unwrap()
}

#[test]
fn abi_snapshot() {
    let (structs, types, constants) = declarations(&header());
    assert!(structs.iter().any(|(s, _)| s == "fleetprov_progress"));
    assert!(types.iter().any(|t| t == "fleetprov_result"));
    assert!(constants.iter().any(|(c, _)| c == "FLEETPROV_IN_CALLBACK"));
    let mut probe = String::from(
        "#include <stddef.h>\n#include <stdio.h>\n#include <fleetprov.h>\nint main(void) {\n",
    );
    for t in &types {
        probe += &format!("  printf(\"sizeof({t}) = %zu\\n\", sizeof({t}));\n");
    }
    for (s, fields) in &structs {
        probe += &format!("  printf(\"sizeof({s}) = %zu\\n\", sizeof({s}));\n");
        for f in fields {
            probe += &format!("  printf(\"  {s}.{f} at %zu\\n\", offsetof({s}, {f}));\n");
        }
    }
    for (c, string) in &constants {
        probe += &match string {
            true => format!("  printf(\"{c} = %s\\n\", {c});\n"),
            false => format!("  printf(\"{c} = %lld\\n\", (long long)({c}));\n"),
        };
    }
    probe += "  return 0;\n}\n";
    let fresh = compile_and_run("snapshot", &probe);
    let path = root()
        .join("tests/abi")
        .join(format!("{}.txt", std::env::consts::ARCH));
    if std::env::var_os("UPDATE_ABI").is_some() {
        assert!(
            std::env::var_os("CI").is_none(),
            "UPDATE_ABI is refused when CI is set: update the snapshot locally and commit it"
        );
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &fresh).unwrap();
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    if committed != fresh {
        let diff: Vec<String> = fresh
            .lines()
            .filter(|l| !committed.lines().any(|c| c == *l))
            .map(|l| format!("+ {l}"))
            .chain(
                committed
                    .lines()
                    .filter(|l| !fresh.lines().any(|f| f == *l))
                    .map(|l| format!("- {l}")),
            )
            .collect();
        panic!(
            "the C ABI differs from {} (an ABI change: raise FLEETPROV_ABI_VERSION if it breaks \
             callers, then `UPDATE_ABI=1 cargo test --test abi`):\n{}",
            path.display(),
            diff.join("\n")
        );
    }
}

#[test]
fn every_type_that_crosses_the_boundary_has_a_fixed_size() {
    let (_, types, _) = declarations(&header());
    let probe = format!(
        "#include <stdio.h>\n#include <fleetprov.h>\nint main(void) {{\n{}  return 0;\n}}\n",
        [
            "fleetprov_result",
            "fleetprov_step",
            "fleetprov_log_level",
            "fleetprov_format"
        ]
        .iter()
        .map(|t| format!("  printf(\"%zu\\n\", sizeof({t}));\n"))
        .collect::<String>()
    );
    let sizes = compile_and_run("sizes", &probe);
    assert!(sizes.lines().all(|l| l == "4"), "{sizes}");
    // The enums are int32_t typedefs in C, never a C enum type whose size the compiler picks.
    let header = header();
    for t in types
        .iter()
        .filter(|t| header.contains(&format!("enum {t}")))
    {
        assert!(
            header.contains(&format!("typedef int32_t {t};")),
            "{t} is not an int32_t in C"
        );
    }
}

#[test]
fn the_header_compiles_as_c89_c99_c11_and_cpp() {
    let dir = scratch("standards");
    let c = dir.join("use.c");
    std::fs::write(
        &c,
        "#include <fleetprov.h>\nint main(void) { return FLEETPROV_ABI_COMPATIBLE() ? 0 : 1; }\n",
    )
    .unwrap();
    let cpp = dir.join("use.cpp");
    std::fs::copy(&c, &cpp).unwrap();
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    for (compiler, std, src) in [
        (cc(), "-std=c89", &c),
        (cc(), "-std=c99", &c),
        (cc(), "-std=c11", &c),
        (cxx.clone(), "-std=c++11", &cpp),
        (cxx, "-std=c++17", &cpp),
    ] {
        let pedantic: &[&str] = if std == "-std=c89" {
            // C89 has no <stdint.h> or bool; GCC and Clang provide both. What is checked: no
            // // comments, no declarations after statements, nothing else newer than C89.
            &["-Werror=declaration-after-statement"]
        } else {
            &["-pedantic", "-Werror"]
        };
        let out = Command::new(&compiler)
            .args([std, "-Wall", "-Wextra", "-fsyntax-only"])
            .args(pedantic)
            .arg("-I")
            .arg(root().join("include"))
            .arg(src)
            .output()
            .expect("the compiler runs");
        assert!(
            out.status.success(),
            "{compiler} {std}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn the_soname_and_the_runtime_abi_version_agree_with_the_header() {
    let abi = fleetprov::ffi::FLEETPROV_ABI_VERSION;
    assert!(header().contains(&format!("#define FLEETPROV_ABI_VERSION {abi}")));
    assert_eq!(fleetprov::ffi::fleetprov_abi_version(), abi);
    // The cdylib cargo built next to this test.
    let exe = std::env::current_exe().unwrap();
    let deps = exe.parent().unwrap();
    let lib = [
        deps.join("libfleetprov.so"),
        deps.join("../libfleetprov.so"),
    ]
    .into_iter()
    .find(|p| p.exists())
    .expect("the cdylib next to the tests");
    let out = Command::new("readelf")
        .arg("-d")
        .arg(&lib)
        .output()
        .expect("readelf (binutils) runs");
    let dynamic = String::from_utf8_lossy(&out.stdout);
    assert!(
        dynamic.contains(&format!("Library soname: [libfleetprov.so.{abi}]")),
        "{}: {dynamic}",
        lib.display()
    );
}
