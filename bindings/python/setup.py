"""Builds libfleetprov with cargo and bundles it in a platform wheel (metadata: pyproject.toml).

The package is ctypes over the C library, so the wheel holds one shared library and no Python
extension: it is tagged ``py3-none-<platform>`` (any Python 3, this platform only).

Where the Rust crate is: ``../../Cargo.toml`` in a source checkout, ``rust/`` in an sdist (the
sdist command copies the crate there). The build takes these environment variables:

``FLEETPROV_CARGO_PROFILE``
    cargo profile, ``release`` by default (``dev`` for a quick debug build, as the test command
    does); ``CARGO_TARGET_DIR`` (cargo's own) picks the target directory, e.g. a shared one.
``FLEETPROV_BUNDLE_LIBRARY``
    path of an already built library to bundle instead of running cargo.
``CARGO``
    the cargo command (default ``cargo``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Command, setup
from setuptools.command.build_py import build_py
from setuptools.command.sdist import sdist
from setuptools.dist import Distribution

try:
    from setuptools.command.bdist_wheel import bdist_wheel
except ImportError:  # setuptools < 70.1
    from wheel.bdist_wheel import bdist_wheel  # type: ignore[no-redef]

HERE = Path(__file__).resolve().parent
if sys.platform == "darwin":
    LIBRARY = "libfleetprov.dylib"
elif sys.platform == "win32":
    LIBRARY = "fleetprov.dll"
else:
    LIBRARY = "libfleetprov.so"

# What the crate needs to build, relative to its root (the sdist copies these). Cargo reads every
# target a manifest names, so the test and bench files named in Cargo.toml come along.
CRATE_FILES = ["Cargo.toml", "Cargo.lock", "build.rs", "cbindgen.toml", "LICENSE"]
CRATE_DIRS = ["src", "include", "tests"]


def crate_root() -> Path:
    for root in (HERE / "rust", HERE.parents[1]):
        if (root / "Cargo.toml").is_file() and (root / "src" / "lib.rs").is_file():
            return root
    raise SystemExit("fleetprov: the Rust crate is neither in ./rust (sdist) nor at ../../ (checkout)")


def build_library() -> Path:
    """Runs cargo and returns the path of the shared library it made."""
    prebuilt = os.environ.get("FLEETPROV_BUNDLE_LIBRARY")
    if prebuilt:
        return Path(prebuilt)
    root = crate_root()
    profile = os.environ.get("FLEETPROV_CARGO_PROFILE", "release")
    cmd = [
        os.environ.get("CARGO", "cargo"), "build", "--locked", "--lib", "-p", "fleetprov",
        "--manifest-path", str(root / "Cargo.toml"), "--profile", profile,
        "--message-format=json-render-diagnostics",
    ]
    print("fleetprov: " + " ".join(cmd), file=sys.stderr, flush=True)
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, check=True, cwd=root)
    except FileNotFoundError:
        raise SystemExit("fleetprov: building the native library needs Rust's cargo (https://rustup.rs)")
    for line in proc.stdout.decode("utf-8", "replace").splitlines():
        try:
            msg = json.loads(line)
        except ValueError:
            continue
        if msg.get("reason") == "compiler-artifact" and "cdylib" in msg.get("target", {}).get("kind", []):
            for name in msg.get("filenames", []):
                if Path(name).name == LIBRARY:
                    return Path(name)
    raise SystemExit(f"fleetprov: cargo reported no {LIBRARY}")


class BuildPyWithLibrary(build_py):
    """build_py, then the native library into the package (the loader's "bundled" place)."""

    def run(self) -> None:
        super().run()
        src = build_library()
        dst = Path(self.build_lib) / "fleetprov" / LIBRARY
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
        os.chmod(dst, 0o755)


class BinaryDistribution(Distribution):
    """Holds a native library: installed to platlib, never tagged pure."""

    def has_ext_modules(self) -> bool:
        return True


class PlatformWheel(bdist_wheel):
    """A wheel for this platform but any Python 3: the library does not use Python's ABI."""

    def get_tag(self) -> tuple[str, str, str]:
        _, _, plat = super().get_tag()
        return "py3", "none", plat


class SdistWithCrate(sdist):
    """The sdist carries the crate in rust/, so that it builds from source anywhere."""

    def make_release_tree(self, base_dir: str, files: list[str]) -> None:
        super().make_release_tree(base_dir, files)
        root = crate_root()
        dest = Path(base_dir) / "rust"
        for name in CRATE_FILES:
            if (root / name).is_file():
                dest.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(root / name, dest / name)
        ignore = shutil.ignore_patterns("target", "__pycache__", "*.pyc", "corpus", "artifacts", "coverage")
        for name in CRATE_DIRS:
            shutil.copytree(root / name, dest / name, ignore=ignore, dirs_exist_ok=True)



setup(distclass=BinaryDistribution, cmdclass={"build_py": BuildPyWithLibrary, "bdist_wheel": PlatformWheel, "sdist": SdistWithCrate})
