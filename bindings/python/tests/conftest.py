"""Fixtures: the library path for the tests, and an emulator on an ephemeral port."""

from __future__ import annotations

import json
import os
import re
import queue
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

REPO = Path(__file__).resolve().parents[3]
# The crate's version: the package and the library it loads must both carry it.
CRATE_VERSION = re.search(r'^version = "([^"]+)"$', (REPO / "Cargo.toml").read_text(), re.M).group(1)

# The package of this tree, not a copy installed elsewhere (here and in the child processes the
# tests start), with the freshly built debug library unless told otherwise (both set before
# fleetprov is imported).
PACKAGE_ROOT = str(Path(__file__).resolve().parents[1])
sys.path.insert(0, PACKAGE_ROOT)
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [PACKAGE_ROOT, os.environ.get("PYTHONPATH")]))
os.environ.setdefault("FLEETPROV_LIBRARY", str(REPO / "target" / "debug" / "libfleetprov.so"))

EMULATOR = Path(os.environ.get("FLEETPROV_EMULATOR", REPO / "target" / "debug" / "fleetprov-emulator"))
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0


@dataclass
class Emulator:
    """A running fleetprov-emulator and what a client needs to reach it."""

    data_dir: Path
    host: str
    port: int
    lines: list[str]
    control: tuple[str, int]

    @property
    def ca_file(self) -> Path:
        return self.data_dir / "ca.pem"

    @property
    def claim_cert(self) -> Path:
        return self.data_dir / "claim.pem"

    @property
    def claim_key(self) -> Path:
        return self.data_dir / "claim.key"

    def kwargs(self, **extra) -> dict:
        """Connection keyword arguments for provision() / Client()."""
        args = dict(
            endpoint="localhost",
            port=self.port,
            ca_file=self.ca_file,
            cert_file=self.claim_cert,
            key_file=self.claim_key,
        )
        args.update(extra)
        return args

    def ctl(self, command: str) -> str:
        """One command of the emulator's control interface (e.g. ``fault RULE``, ``clear``);
        returns its answer line, failing the test on an ``error:`` answer."""
        with socket.create_connection(self.control, timeout=STOP_TIMEOUT) as sock:
            sock.sendall(command.encode() + b"\n")
            answer = sock.makefile("r", encoding="utf-8").readline().strip()
        if answer.startswith("error"):
            pytest.fail(f"emulator control {command!r}: {answer}")
        return answer

    def registry(self) -> dict:
        """The emulator's registry (`fleetprov-emulator list`)."""
        out = subprocess.run(
            [str(EMULATOR), "list", "--data-dir", str(self.data_dir)],
            capture_output=True, text=True, timeout=STOP_TIMEOUT, check=True,
        )
        return json.loads(out.stdout)


def _address(line: str, prefix: str) -> tuple[str, int]:
    host, _, port = line.split(prefix, 1)[1].strip().rpartition(":")
    return host.strip("[]"), int(port)


def _start(tmp_path: Path, faults: list[str], args: tuple[str, ...] = ()) -> Iterator[Emulator]:
    if not EMULATOR.is_file():
        pytest.fail(f"emulator not built: {EMULATOR} (cargo build -p fleetprov-emulator)")
    data_dir = tmp_path / "emulator"
    # An EC CA, quick to make for each test's emulator (the emulator's default, an RSA-2048 CA as
    # AWS's, costs about a second); the C examples and the interop suite use the default.
    cmd = [str(EMULATOR), "--data-dir", str(data_dir), "--port", "0", "--key-type", "ec", "--ca-key-type", "ec",
           "--control-port", "0", *args]
    for f in faults:
        cmd += ["--fault", f]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    ready: "queue.Queue[str | None]" = queue.Queue()

    def drain() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if line.startswith(("listening on ", "control on ")):
                ready.put(line)
        ready.put(None)

    reader = threading.Thread(target=drain, name="emulator-output", daemon=True)
    reader.start()
    try:
        found: dict[str, tuple[str, int]] = {}
        while len(found) < 2:  # "listening on HOST:PORT", then "control on HOST:PORT"
            try:
                line = ready.get(timeout=START_TIMEOUT)
            except queue.Empty:
                pytest.fail(f"emulator did not start within {START_TIMEOUT} s: {lines}")
            if line is None:
                pytest.fail(f"emulator exited before listening: {lines}")
            prefix = "listening on " if line.startswith("listening on ") else "control on "
            found[prefix] = _address(line, prefix)
        host, port = found["listening on "]
        yield Emulator(data_dir=data_dir, host=host, port=port, lines=lines, control=found["control on "])
    finally:
        proc.kill()
        proc.wait(timeout=STOP_TIMEOUT)
        reader.join(timeout=STOP_TIMEOUT)
        if proc.stdout is not None:
            proc.stdout.close()


@pytest.fixture
def emulator(tmp_path: Path) -> Iterator[Emulator]:
    """An emulator without faults."""
    yield from _start(tmp_path, [])


@pytest.fixture
def emulator_factory(tmp_path: Path):
    """Starts an emulator with the given fault rules: ``emulator_factory("delay:3000@register")``;
    ``args`` adds command-line options (``args=("--token-ttl", "0.2")``)."""
    gens = []

    def make(*faults: str, args: tuple[str, ...] = ()) -> Emulator:
        sub = tmp_path / f"e{len(gens)}"
        sub.mkdir()
        gen = _start(sub, list(faults), tuple(args))
        gens.append(gen)
        return next(gen)

    yield make
    for gen in gens:
        gen.close()


@pytest.fixture
def make_csr(tmp_path: Path):
    """Makes a P-256 key and CSR with the openssl CLI: returns (csr_pem, key_pem)."""

    def make(cn: str = "device") -> tuple[str, str]:
        key = tmp_path / f"{cn}.key"
        csr = tmp_path / f"{cn}.csr"
        subprocess.run(
            ["openssl", "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
             "-nodes", "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={cn}"],
            check=True, capture_output=True, timeout=30,
        )
        return csr.read_text(), key.read_text()

    return make
