"""The example CLI against the emulator."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
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


def test_example_resume_with_state_dir(emulator_factory, tmp_path):
    emu = emulator_factory("close:request@register*1")
    state = tmp_path / "state"
    out = tmp_path / "dev"
    args = [*_common(emu), "--param", "SerialNumber=cli2", "--state-dir", str(state), "--out", str(out)]
    r = _run(*args, "--retry", "1")
    assert r.returncode == 1, r.stderr
    assert "error (FLEETPROV_CONNECTION)" in r.stderr
    assert f"the new certificate is kept in {state}: run again to resume" in r.stderr
    assert (state / "journal.json").is_file()
    r = _run(*args, "-v")
    assert r.returncode == 0, r.stderr
    assert f"resumed the certificate from the journal in {state}" in r.stdout
    assert "  .. resuming" in r.stderr and "  .. committed" in r.stderr
    assert not (state / "journal.json").exists()
    assert (out / "certificate.pem").is_file()


def test_example_retries(emulator_factory):
    emu = emulator_factory("reject:429@create*1")
    r = _run(*_common(emu), "--param", "SerialNumber=cli3", "--retry", "3:0.05:0.1")
    assert r.returncode == 0, r.stderr
    assert "  .. attempt 1 failed (CreateCertificateFromCsr rejected with 429 Throttling" in r.stderr
    # The backoff (0.05 s), stretched to a second after the last CONNECT: the retry reconnects,
    # and AWS IoT accepts one CONNECT per second per client id.
    pause = re.search(r"retrying in ([0-9.]+) s", r.stderr)
    assert pause is not None, r.stderr
    assert 0.025 <= float(pause.group(1)) <= 1.0, r.stderr
    assert "attempts: 2" in r.stdout


# Each row: a --retry value the example refuses, and a piece of its message.
BAD_RETRY = [
    ("0", "max_attempts must be between 1"),
    ("3:2:1", "below initial_backoff"),
    ("3:x", "with numbers"),
    ("3::1", "ATTEMPTS[:INITIAL[:MAX]]"),
    ("1:2:3:4", "ATTEMPTS[:INITIAL[:MAX]]"),
]


@pytest.mark.parametrize("value,message", BAD_RETRY, ids=[r[0] for r in BAD_RETRY])
def test_example_bad_retry(value, message):
    r = _run("--endpoint", "x", "--cert", "c", "--key", "k", "--template", "T", "--retry", value)
    assert r.returncode == 2
    assert message in r.stderr


def test_example_with_paho(emulator, tmp_path):
    out = tmp_path / "dev"
    r = _run(*_common(emulator), "--param", "SerialNumber=cli4", "--paho", "--out", str(out), "-v")
    assert r.returncode == 0, r.stderr
    assert "thing name: demo-cli4" in r.stdout
    assert "  .. committed" in r.stderr
    assert (out / "private.key").is_file()


def _rotate_common(emulator, thing: str) -> list[str]:
    return ["--endpoint", "localhost", "--port", str(emulator.port), "--ca", str(emulator.ca_file),
            "--template", "RotationTemplate", "--param", f"ThingName={thing}"]


def test_example_rotate(emulator, tmp_path):
    dev = tmp_path / "dev"
    r = _run(*_common(emulator), "--param", "SerialNumber=cli5", "--out", str(dev))
    assert r.returncode == 0, r.stderr
    old = (dev / "certificate.pem").read_text()
    r = _run(*_rotate_common(emulator, "demo-cli5"), "--rotate", str(dev))
    assert r.returncode == 0, r.stderr
    assert f"rotated the certificate of {dev}" in r.stdout
    assert "thing name: demo-cli5" in r.stdout
    assert f"credentials written to: {dev}" in r.stdout
    assert (dev / "certificate.pem").read_text() != old


def test_example_rotate_rejected_keeps_the_files(emulator, tmp_path):
    dev = tmp_path / "dev"
    r = _run(*_common(emulator), "--param", "SerialNumber=cli6", "--out", str(dev))
    assert r.returncode == 0, r.stderr
    before = {f.name: f.read_bytes() for f in dev.iterdir() if f.is_file()}
    emulator.ctl("fault reject:403@register")
    r = _run(*_rotate_common(emulator, "demo-cli6"), "--rotate", str(dev))
    assert r.returncode == 2
    assert "rejected: 403" in r.stderr
    assert f"the credentials in {dev} are unchanged" in r.stderr
    assert {f.name: f.read_bytes() for f in dev.iterdir() if f.is_file()} == before


# Each row: arguments the example refuses, and a piece of its message.
BAD_COMBINATIONS = [
    (["--template", "T"], "--cert and --key are required"),
    (["--template", "T", "--cert", "c"], "--cert and --key are required"),
    (["--template", "T", "--rotate", "d", "--cert", "c"], "--cert/--key are not used"),
    (["--template", "T", "--rotate", "d", "--paho"], "neither --paho nor --no-verify"),
    (["--template", "T", "--rotate", "d", "--no-verify"], "neither --paho nor --no-verify"),
]


@pytest.mark.parametrize("args,message", BAD_COMBINATIONS, ids=[" ".join(a[2:]) for a in BAD_COMBINATIONS])
def test_example_bad_combinations(args, message):
    r = _run("--endpoint", "x", *args)
    assert r.returncode == 2
    assert message in r.stderr
