"""Finding and checking the shared library."""

from __future__ import annotations

import os
import subprocess
import sys

import fleetprov
from conftest import CRATE_VERSION


def test_version_matches():
    assert fleetprov.__version__ == CRATE_VERSION
    assert fleetprov.library_version() == fleetprov.__version__
    assert fleetprov.LIBRARY_PATH.name == "libfleetprov.so"


def test_result_names():
    assert fleetprov.result_name(0) == "FLEETPROV_OK"
    assert fleetprov.result_name(6) == "FLEETPROV_REJECTED"
    assert fleetprov.result_name(999) == "FLEETPROV_UNKNOWN"
    assert fleetprov.RejectedError("x").code_name == "FLEETPROV_REJECTED"
    assert issubclass(fleetprov.InvalidArgumentError, ValueError)


def _import_with(library: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, FLEETPROV_LIBRARY=library)
    return subprocess.run(
        [sys.executable, "-c", "import fleetprov"], env=env, capture_output=True, text=True, timeout=60
    )


def test_missing_library_is_clear(tmp_path):
    out = _import_with(str(tmp_path / "nope.so"))
    assert out.returncode != 0
    assert "LibraryLoadError" in out.stderr and "FLEETPROV_LIBRARY" in out.stderr


def test_unloadable_library_is_clear(tmp_path):
    bogus = tmp_path / "libfleetprov.so"
    bogus.write_text("not a library")
    out = _import_with(str(bogus))
    assert out.returncode != 0
    assert "LibraryLoadError: " in out.stderr and f"FLEETPROV_LIBRARY: {bogus} (cannot load" in out.stderr


def test_version_mismatch_is_clear():
    import pytest

    from fleetprov import _ffi

    with pytest.raises(fleetprov.LibraryLoadError, match="is libfleetprov '9.9.9'.*needs exactly"):
        _ffi.check_version("9.9.9")
    _ffi.check_version(fleetprov.__version__)


PACKAGE_DIR = os.path.dirname(os.path.dirname(fleetprov.__file__))


def _import_from(env: dict, cwd: str) -> subprocess.CompletedProcess:
    """``import fleetprov`` (this source package, which bundles no library) in a fresh process."""
    code = "import sys; sys.path.insert(0, %r); import fleetprov; print(fleetprov.LIBRARY_PATH)" % PACKAGE_DIR
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=cwd, capture_output=True, text=True, timeout=60)


def _without_override() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("FLEETPROV_LIBRARY", "LD_LIBRARY_PATH")}
    return env


def test_the_system_library_is_found_without_the_variable(tmp_path):
    """A library installed where the dynamic loader looks (here: LD_LIBRARY_PATH, with the
    SONAME link `cmake --install` makes) is found through ctypes.util.find_library."""
    lib_dir = tmp_path / "lib"
    lib_dir.mkdir()
    real = lib_dir / "libfleetprov.so"
    real.write_bytes(fleetprov.LIBRARY_PATH.read_bytes())
    (lib_dir / "libfleetprov.so.3").symlink_to("libfleetprov.so")
    out = _import_from(dict(_without_override(), LD_LIBRARY_PATH=str(lib_dir)), str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().startswith("libfleetprov.so")


def test_none_found_names_every_place(tmp_path):
    out = _import_from(_without_override(), str(tmp_path))
    if out.returncode == 0:
        import pytest

        pytest.skip(f"a libfleetprov is installed on this system: {out.stdout.strip()}")
    err = out.stderr.strip().splitlines()[-1]
    assert err.startswith(f"fleetprov._ffi.LibraryLoadError: no usable libfleetprov {CRATE_VERSION}"), err
    assert "bundled: " in err and "libfleetprov.so (no such file)" in err
    assert "system: ctypes.util.find_library('fleetprov') found none" in err
    assert "FLEETPROV_LIBRARY" in err


def _fake_library(tmp_path, source: str):
    import shutil

    import pytest

    if shutil.which("cc") is None:
        pytest.skip("needs a C compiler")
    src = tmp_path / "fake.c"
    src.write_text(source)
    lib = tmp_path / "libfleetprov.so"
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(lib), str(src)], check=True, timeout=60)
    return lib


def test_an_old_library_says_both_versions(tmp_path):
    lib = _fake_library(tmp_path, 'const char *fleetprov_version(void) { return "0.2.0"; }\n')
    out = _import_with(str(lib))
    assert out.returncode != 0
    assert "AttributeError" not in out.stderr
    assert f"FLEETPROV_LIBRARY: {lib} is libfleetprov '0.2.0', but this package needs '{CRATE_VERSION}'" in out.stderr


def test_a_library_lacking_functions_is_a_load_error(tmp_path):
    lib = _fake_library(tmp_path, 'const char *fleetprov_version(void) { return "%s"; }\n' % CRATE_VERSION)
    out = _import_with(str(lib))
    assert out.returncode != 0
    assert "AttributeError" not in out.stderr
    assert "LibraryLoadError" in out.stderr and "lacks fleetprov_config_new," in out.stderr
