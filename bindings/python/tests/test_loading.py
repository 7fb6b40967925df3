"""Finding and checking the shared library."""

from __future__ import annotations

import os
import subprocess
import sys

import fleetprov


def test_version_matches():
    assert fleetprov.__version__ == "0.3.0"
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
    assert "LibraryLoadError: cannot load" in out.stderr


def test_version_mismatch_is_clear():
    import pytest

    from fleetprov import _ffi

    with pytest.raises(fleetprov.LibraryLoadError, match="is libfleetprov '9.9.9'.*needs exactly"):
        _ffi.check_version("9.9.9")
    _ffi.check_version(fleetprov.__version__)
