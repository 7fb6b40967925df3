"""Ctrl-C and exceptions raised by on_progress: the flow is cancelled within a fraction of a
second, the resume journal is kept, and a result whose credentials were committed is never lost.

The SIGINT tests run provision() in a child process against the emulator and send it a real
SIGINT while it is at a given step; then run it again with the same arguments. Whatever the step,
exactly one device certificate is minted in all, and its key is on disk, matching it."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import List, Optional

import pytest

import fleetprov
from fleetprov import Step

WAIT = 30.0  # bound on every wait for the child or another thread
# How long a cancelled flow may take to stop once it is free to notice (the library checks its
# cancel switch about every 20 ms; the rest is a loaded 2-core machine).
STOP_WITHIN = 1.5

CHILD = textwrap.dedent(
    """
    import logging, sys
    import fleetprov

    port, ca, cert, key, state, out, target = sys.argv[1:8]


    class Cancelling(logging.Handler):
        def emit(self, record):
            if "cancelling the flow" in record.getMessage():
                print("CANCELLING", flush=True)


    log = logging.getLogger("fleetprov")
    log.setLevel(logging.INFO)
    log.addHandler(Cancelling())


    def progress(p):
        print("STEP", p.step.name, flush=True)
        if p.step.name == target:
            sys.stdin.readline()  # held here until the parent has interrupted this process


    try:
        r = fleetprov.provision(
            endpoint="localhost", port=int(port), ca_file=ca, cert_file=cert, key_file=key,
            template_name="DemoTemplate", parameters={"SerialNumber": "sigint"},
            state_dir=state, output_dir=out, on_progress=progress, timeout=20, step_timeout=5,
        )
    except KeyboardInterrupt as e:
        committed = getattr(e, "fleetprov_result", None)
        print("INTERRUPTED", committed.certificate_id if committed else "-", flush=True)
        sys.exit(130)
    print("RESULT", r.certificate_id, r.resumed, r.already_provisioned, flush=True)
    """
)

# Every step of a first provisioning with a key made on the device.
STEPS = [
    Step.CONNECTING, Step.SUBSCRIBING, Step.SUBSCRIBED, Step.CREATING_CERTIFICATE,
    Step.CERTIFICATE_CREATED, Step.REGISTERING, Step.REGISTERED, Step.VERIFYING, Step.VERIFIED,
    Step.COMMITTED,
]


class Child:
    """The child process, its stdout lines in a queue."""

    def __init__(self, script: Path, emu, state: Path, out: Path, target: str) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [sys.executable, str(script), str(emu.port), str(emu.ca_file), str(emu.claim_cert),
             str(emu.claim_key), str(state), str(out), target],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )
        self.lines: "queue.Queue[Optional[str]]" = queue.Queue()
        self.seen: List[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def wait_for(self, prefix: str) -> str:
        deadline = time.monotonic() + WAIT
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self.proc.kill()
                pytest.fail(f"no {prefix!r} from the child within {WAIT} s; saw {self.seen}")
            if line is None:
                err = self.proc.stderr.read() if self.proc.stderr else ""
                pytest.fail(f"the child ended before {prefix!r}; saw {self.seen}; stderr: {err}")
            self.seen.append(line)
            if line.startswith(prefix):
                return line

    def finish(self) -> int:
        try:
            return self.proc.wait(timeout=WAIT)
        finally:
            for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
                if f is not None:
                    f.close()


def _device_certs(emu) -> list:
    return [c for c in emu.registry()["certificates"] if c["origin"] != "claim"]


def _public_key(args: List[str], pem_file: Path) -> str:
    out = subprocess.run(["openssl", *args, "-in", str(pem_file)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.mark.parametrize("step", STEPS, ids=lambda s: s.name)
def test_sigint_at_each_step_then_rerun(emulator, tmp_path, step):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    state, out = tmp_path / "state", tmp_path / "out"

    child = Child(script, emulator, state, out, step.name)
    child.wait_for(f"STEP {step.name}")
    child.proc.send_signal(signal.SIGINT)
    child.wait_for("CANCELLING")  # the main thread has the interrupt and has cancelled the flow
    assert child.proc.stdin is not None
    released = time.monotonic()
    child.proc.stdin.write("\n")  # let on_progress return: the flow sees the cancel
    child.proc.stdin.flush()
    interrupted = child.wait_for("INTERRUPTED")
    stopped_in = time.monotonic() - released
    assert child.finish() == 130
    assert stopped_in < STOP_WITHIN, f"the flow took {stopped_in:.2f} s to stop"
    # No step after the interrupted one was reported to on_progress.
    steps = [line.split()[1] for line in child.seen if line.startswith("STEP ")]
    assert steps[-1] == step.name, child.seen
    committed_id = interrupted.split()[1]
    if step == Step.COMMITTED:
        # Interrupted after the commit: the result came with the KeyboardInterrupt.
        assert committed_id != "-"
    elif STEPS.index(step) < STEPS.index(Step.VERIFIED):
        assert committed_id == "-"
    # After VERIFIED only the local commit is left: the library finishes it, and the result
    # comes with the KeyboardInterrupt.

    rerun = Child(script, emulator, state, out, "none")
    result = rerun.wait_for("RESULT").split()
    assert rerun.finish() == 0
    certificate_id, resumed, already = result[1], result[2] == "True", result[3] == "True"

    certs = _device_certs(emulator)
    assert [c["id"] for c in certs] == [certificate_id], "exactly one certificate minted in all"
    assert certs[0]["status"] == "ACTIVE"
    if committed_id != "-":
        assert (certificate_id, already) == (committed_id, True)
    elif STEPS.index(step) >= STEPS.index(Step.CERTIFICATE_CREATED):
        assert resumed, "the rerun took the journal's certificate up"
    assert not (state / "journal.json").exists()
    cert_file, key_file = out / "certificate.pem", out / "private.key"
    assert _public_key(["x509", "-noout", "-pubkey"], cert_file) == _public_key(["pkey", "-pubout"], key_file)


class Boom(Exception):
    pass


def test_progress_exception_cancels_at_once_and_keeps_the_journal(emulator_factory, tmp_path):
    emu = emulator_factory("delay:5000@register")
    state = tmp_path / "state"
    seen: List[Step] = []

    def progress(p: fleetprov.Progress) -> None:
        seen.append(p.step)
        if p.step == Step.REGISTERING:
            raise Boom("stop here")

    kwargs = emu.kwargs(
        template_name="DemoTemplate", parameters={"SerialNumber": "boom"}, state_dir=state,
        output_dir=tmp_path / "out", step_timeout=10.0,
    )
    started = time.monotonic()
    with pytest.raises(Boom) as info:
        fleetprov.provision(**kwargs, on_progress=progress)
    # The RegisterThing reply is 5 s away: the flow did not wait for it.
    assert time.monotonic() - started < 4.0
    assert isinstance(info.value.__cause__, fleetprov.CancelledError)
    assert seen[-1] == Step.REGISTERING, "on_progress is not called again once it raised"
    assert not hasattr(info.value, "fleetprov_result")
    assert (state / "journal.json").exists()

    emu.ctl("clear")
    result = fleetprov.provision(**kwargs)
    assert result.resumed
    assert [c["id"] for c in _device_certs(emu)] == [result.certificate_id]


def test_progress_exception_after_the_commit_carries_the_result(emulator, tmp_path):
    def progress(p: fleetprov.Progress) -> None:
        if p.step == Step.COMMITTED:
            raise Boom("too late")

    with pytest.raises(Boom) as info:
        fleetprov.provision(
            **emulator.kwargs(template_name="DemoTemplate", parameters={"SerialNumber": "late"}),
            output_dir=tmp_path / "out", on_progress=progress,
        )
    result = info.value.fleetprov_result  # type: ignore[attr-defined]
    assert isinstance(result, fleetprov.ProvisionResult)
    assert result.thing_name == "demo-late"
    assert (tmp_path / "out" / "certificate.pem").read_text() == result.certificate_pem


def test_client_operation_interrupted_from_on_progress(emulator_factory):
    """A client operation is cancelled the same way (the exception cancels it at once)."""
    emu = emulator_factory("delay:5000@create")
    calls: List[Step] = []

    def progress(p: fleetprov.Progress) -> None:
        calls.append(p.step)
        if p.step == Step.CREATING_CERTIFICATE:
            raise Boom("client")

    with fleetprov.Client(**emu.kwargs(template_name="DemoTemplate", on_progress=progress)) as c:
        started = time.monotonic()
        with pytest.raises(Boom):
            c.create_keys_and_certificate()
        assert time.monotonic() - started < 4.0
    assert calls[-1] == Step.CREATING_CERTIFICATE


def test_sigint_while_waiting_for_a_reply(emulator_factory, tmp_path):
    """Ctrl-C while the flow waits on the network (RegisterThing's reply 5 s away, nothing held
    in a callback): the interrupt stops it at once, and the rerun resumes with its certificate."""
    emu = emulator_factory("delay:5000@register*1")
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    state, out = tmp_path / "state", tmp_path / "out"
    child = Child(script, emu, state, out, "none")
    child.wait_for(f"STEP {Step.REGISTERING.name}")
    sent = time.monotonic()
    child.proc.send_signal(signal.SIGINT)
    assert child.wait_for("INTERRUPTED") == "INTERRUPTED -"
    took = time.monotonic() - sent
    assert child.finish() == 130
    assert took < STOP_WITHIN, f"the flow took {took:.2f} s to stop"
    assert (state / "journal.json").exists()

    rerun = Child(script, emu, state, out, "none")
    result = rerun.wait_for("RESULT").split()
    assert rerun.finish() == 0
    assert result[2] == "True", "resumed"
    assert [c["id"] for c in _device_certs(emu)] == [result[1]]
