"""The wheel: installed into a fresh venv, outside the source tree and with no environment
variable, it brings its own library and provisions against the emulator.

Runs when FLEETPROV_TEST_WHEEL is the path of a built wheel (the test command builds one with
``pip wheel ./bindings/python``); skipped otherwise."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest
from conftest import CRATE_VERSION

WHEEL = os.environ.get("FLEETPROV_TEST_WHEEL")

pytestmark = pytest.mark.skipif(not WHEEL, reason="FLEETPROV_TEST_WHEEL (a built wheel) not given")

SCRIPT = """
import json, sys
import fleetprov
port, ca, cert, key, out = sys.argv[1:6]
r = fleetprov.provision(endpoint="localhost", port=int(port), ca_file=ca, cert_file=cert, key_file=key,
                        template_name="DemoTemplate", parameters={"SerialNumber": "wheel"}, output_dir=out)
print(json.dumps({"library": str(fleetprov.LIBRARY_PATH), "package": fleetprov.__file__,
                  "thing": r.thing_name, "version": fleetprov.library_version()}))
"""


def test_the_wheel_carries_its_library_and_licence():
    assert WHEEL is not None
    name = Path(WHEEL).name
    assert name.startswith(f"fleetprov-{CRATE_VERSION}-py3-none-") and "linux" in name and not name.endswith("-any.whl")
    with zipfile.ZipFile(WHEEL) as whl:
        names = whl.namelist()
        assert "fleetprov/libfleetprov.so" in names
        assert "fleetprov/py.typed" in names
        licence = whl.read(f"fleetprov-{CRATE_VERSION}.dist-info/licenses/LICENSE").decode()
        metadata = whl.read(f"fleetprov-{CRATE_VERSION}.dist-info/METADATA").decode()
    assert "Apache License" in licence and "Version 2.0, January 2004" in licence
    assert "License-Expression: Apache-2.0" in metadata
    assert "Requires-Python: >=3.9" in metadata


def test_installed_in_a_fresh_venv_it_provisions(emulator, tmp_path):
    assert WHEEL is not None
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("FLEETPROV_", "PYTHON", "LD_LIBRARY"))}
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--no-index", "--disable-pip-version-check", WHEEL],
        env=clean, cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert install.returncode == 0, install.stderr
    (tmp_path / "provision.py").write_text(SCRIPT)
    run = subprocess.run(
        [str(python), "provision.py", str(emulator.port), str(emulator.ca_file), str(emulator.claim_cert),
         str(emulator.claim_key), str(tmp_path / "out")],
        env=clean, cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 0, run.stderr
    seen = json.loads(run.stdout)
    site = str(env_dir)
    assert seen["package"].startswith(site) and seen["library"].startswith(site), seen
    assert seen["library"].endswith("fleetprov/libfleetprov.so")
    assert (seen["thing"], seen["version"]) == ("demo-wheel", CRATE_VERSION)
    assert (tmp_path / "out" / "certificate.pem").is_file()
    assert sys.prefix not in seen["library"]

    # The bundled library comes first: a FLEETPROV_LIBRARY left over from a development shell
    # (here: no such file) does not change what the installed wheel loads.
    stale = dict(clean, FLEETPROV_LIBRARY=str(tmp_path / "old" / "libfleetprov.so"))
    code = "import fleetprov; print(fleetprov.LIBRARY_PATH)"
    run = subprocess.run([str(python), "-c", code], env=stale, cwd=tmp_path, capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().startswith(site) and run.stdout.strip().endswith("fleetprov/libfleetprov.so")
