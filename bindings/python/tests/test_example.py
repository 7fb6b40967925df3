"""The example CLI against the emulator."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO

EXAMPLE = REPO / "examples" / "python" / "provision.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(EXAMPLE), *args], capture_output=True, text=True, timeout=120)


def _common(emulator) -> list[str]:
    return [
        "--endpoint", "localhost", "--port", str(emulator.port), "--ca", str(emulator.ca_file),
        "--cert", str(emulator.claim_cert), "--key", str(emulator.claim_key), "--template", "DemoTemplate",
    ]


def test_example_keys_cbor(emulator, tmp_path):
    out = tmp_path / "dev"
    r = _run(*_common(emulator), "--param", "SerialNumber=cli1", "--format", "cbor", "--keys", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "thing name: demo-cli1" in r.stdout
    assert f"credentials written to: {out}" in r.stdout
    assert (out / "private.key").is_file()


def test_example_rejected(emulator):
    r = _run(*_common(emulator))  # no SerialNumber
    assert r.returncode == 2
    assert "rejected: 400 InvalidParameters" in r.stderr


def test_example_bad_param():
    r = _run("--endpoint", "x", "--cert", "c", "--key", "k", "--template", "T", "--param", "novalue")
    assert r.returncode == 2
    assert "KEY=VALUE" in r.stderr
