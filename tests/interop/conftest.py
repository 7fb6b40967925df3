"""Fixtures for the interop tests: a fresh fleetprov-emulator per test.

The emulator binary is taken from $FLEETPROV_EMULATOR, else from
<repo>/target/debug/fleetprov-emulator (build it with
`cargo build -p fleetprov-emulator --bin fleetprov-emulator`).

A test may pass extra serve options with the marker
`@pytest.mark.emulator_args("--key-type", "ec")`.
"""

from __future__ import annotations

import collections
import json
import os
import queue
import re
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_BINARY = REPO_ROOT / "target" / "debug" / "fleetprov-emulator"

STARTUP_TIMEOUT_S = 30.0  # first start makes a CA, server and claim credentials
STOP_TIMEOUT_S = 10.0  # after SIGTERM, then SIGKILL
LIST_TIMEOUT_S = 30.0
LISTENING = re.compile(r"^listening on (?P<host>\S+):(?P<port>\d+)$")


def emulator_binary() -> Path:
    path = Path(os.environ.get("FLEETPROV_EMULATOR") or DEFAULT_BINARY)
    if not path.is_file() or not os.access(path, os.X_OK):
        pytest.fail(
            f"fleetprov-emulator binary not found or not executable at {path}; build it with "
            "`cargo build -p fleetprov-emulator --bin fleetprov-emulator` or set FLEETPROV_EMULATOR",
            pytrace=False,
        )
    return path


class _Drain(threading.Thread):
    """Reads one pipe of the emulator line by line until EOF so that it never fills.

    Every line is kept (bounded) for failure messages and also handed to `lines`
    (None marks EOF) so the startup code can wait for the `listening on` line."""

    def __init__(self, name: str, pipe, keep: int = 2000):
        super().__init__(name=name, daemon=True)
        self.pipe = pipe
        self.kept: collections.deque[str] = collections.deque(maxlen=keep)
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.lock = threading.Lock()
        # Notified at each line and at EOF, for wait_for().
        self.changed = threading.Condition(self.lock)
        self.done = False

    def run(self) -> None:
        try:
            for raw in self.pipe:
                line = raw.rstrip("\r\n")
                with self.lock:
                    self.kept.append(line)
                    self.changed.notify_all()
                self.lines.put(line)
        except (OSError, ValueError):
            pass
        finally:
            with self.lock:
                self.done = True
                self.changed.notify_all()
            self.lines.put(None)

    def tail(self, n: int) -> list[str]:
        with self.lock:
            return list(self.kept)[-n:]

    def wait_for(self, needles: tuple[str, ...], timeout: float) -> bool:
        """Whether a line holding every one of `needles` arrives within `timeout` seconds (or
        is there already); False at EOF without one."""
        def seen() -> bool:
            return self.done or any(all(n in line for n in needles) for line in self.kept)

        with self.changed:
            self.changed.wait_for(seen, timeout)
            return any(all(n in line for n in needles) for line in self.kept)


@dataclass
class Emulator:
    """A running fleetprov-emulator, as the tests see it."""

    binary: Path
    data_dir: Path
    process: subprocess.Popen
    host: str = "localhost"
    port: int = 0
    bound: str = ""  # the `listening on` line's HOST:PORT, verbatim
    args: list[str] = field(default_factory=list)
    _stdout: _Drain | None = None
    _stderr: _Drain | None = None

    @property
    def ca_pem(self) -> Path:
        return self.data_dir / "ca.pem"

    @property
    def claim_pem(self) -> Path:
        return self.data_dir / "claim.pem"

    @property
    def claim_key(self) -> Path:
        return self.data_dir / "claim.key"

    @property
    def templates_dir(self) -> Path:
        return self.data_dir / "templates"

    def stderr_tail(self, n: int = 40) -> str:
        lines = self._stderr.tail(n) if self._stderr else []
        return "\n".join(lines) if lines else "(emulator wrote nothing on stderr)"

    def wait_for_stderr(self, *needles: str, timeout: float = 10.0) -> bool:
        """Whether the emulator writes a line on stderr holding all of `needles`, within
        `timeout` seconds: its log lines reach us through a pipe, after what they log."""
        return self._stderr is not None and self._stderr.wait_for(needles, timeout)

    def stdout_tail(self, n: int = 20) -> str:
        lines = self._stdout.tail(n) if self._stdout else []
        return "\n".join(lines) if lines else "(nothing)"

    def context(self, n: int = 40) -> str:
        """Text to append to an assertion message: where the emulator is and what it said."""
        state = "running" if self.process.poll() is None else f"EXITED with {self.process.returncode}"
        return (
            f"\n--- emulator ({state}; {' '.join(self.args)}; listening on {self.bound}) "
            f"stderr, last {n} lines ---\n{self.stderr_tail(n)}\n--- end of emulator stderr ---"
        )

    def registry(self) -> dict:
        """`fleetprov-emulator list --data-dir DIR`, parsed."""
        cmd = [str(self.binary), "list", "--data-dir", str(self.data_dir)]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=LIST_TIMEOUT_S)
        except subprocess.TimeoutExpired as e:
            raise AssertionError(f"`{' '.join(cmd)}` did not finish in {LIST_TIMEOUT_S} s") from e
        assert done.returncode == 0, (
            f"`{' '.join(cmd)}` exited {done.returncode}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}"
            + self.context()
        )
        try:
            return json.loads(done.stdout)
        except json.JSONDecodeError as e:
            raise AssertionError(f"`{' '.join(cmd)}` printed no JSON ({e}):\n{done.stdout}") from e

    def stop(self) -> None:
        proc = self.process
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=STOP_TIMEOUT_S)
        for drain in (self._stdout, self._stderr):
            if drain is not None:
                drain.join(timeout=STOP_TIMEOUT_S)
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                try:
                    pipe.close()
                except OSError:
                    pass


def start_emulator(data_dir: Path, extra_args: list[str]) -> Emulator:
    binary = emulator_binary()
    data_dir.mkdir(parents=True, exist_ok=True)
    args = [str(binary), "--data-dir", str(data_dir), "--port", "0", "--bind", "127.0.0.1",
            "--verbose", *extra_args]
    proc = subprocess.Popen(
        args,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        bufsize=1,
    )
    emu = Emulator(binary=binary, data_dir=data_dir, process=proc, args=args[1:])
    emu._stdout = _Drain("emulator-stdout", proc.stdout)
    emu._stderr = _Drain("emulator-stderr", proc.stderr)
    emu._stdout.start()
    emu._stderr.start()

    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(
                    f"emulator printed no `listening on HOST:PORT` line within {STARTUP_TIMEOUT_S} s; "
                    f"stdout so far:\n{emu.stdout_tail()}" + emu.context()
                )
            try:
                line = emu._stdout.lines.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                try:
                    proc.wait(timeout=STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    pass
                emu._stderr.join(timeout=STOP_TIMEOUT_S)
                raise AssertionError(
                    f"emulator closed stdout before `listening on`; stdout:\n{emu.stdout_tail()}"
                    + emu.context()
                )
            m = LISTENING.match(line)
            if m:
                emu.port = int(m.group("port"))
                emu.bound = f"{m.group('host')}:{m.group('port')}"
                break
        for name in ("ca.pem", "claim.pem", "claim.key", "templates/DemoTemplate.json"):
            assert (data_dir / name).is_file(), f"emulator did not create {name} in {data_dir}" + emu.context()
    except BaseException:
        emu.stop()
        raise
    return emu


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "emulator_args(*args): extra command-line options for the emulator fixture"
    )


@pytest.fixture
def emulator(request, tmp_path):
    marker = request.node.get_closest_marker("emulator_args")
    extra = [str(a) for a in marker.args] if marker else []
    emu = start_emulator(tmp_path / "emulator-data", extra)
    request.node._fleetprov_emulator = emu
    try:
        yield emu
    finally:
        emu.stop()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """On failure, attach the emulator's whole stderr (bounded) to the test report."""
    outcome = yield
    report = outcome.get_result()
    emu = getattr(item, "_fleetprov_emulator", None)
    if emu is not None and report.failed and report.when in ("call", "setup"):
        report.sections.append(("emulator stderr", emu.stderr_tail(400)))
