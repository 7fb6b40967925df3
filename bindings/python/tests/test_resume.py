"""The resume journal (state_dir), token expiry, retries with backoff, the busy state directory,
and the Progress objects that report them, against the emulator with fault rules."""

from __future__ import annotations

import logging
import stat
import threading
from pathlib import Path

import pytest

import fleetprov
from fleetprov import Step

WAIT = 30.0  # bound on every wait for another thread
FAST = fleetprov.Retry(max_attempts=5, initial_backoff=0.05, max_backoff=0.2)
NO_RETRY = fleetprov.Retry(max_attempts=1)
OUTPUT_FILES = ("certificate.pem", "private.key", "device.json")


def _device_certs(emu) -> list[dict]:
    """The registry's certificates other than the claim certificate, oldest first."""
    return [c for c in emu.registry()["certificates"] if c["origin"] != "claim"]


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _steps(seen: list[fleetprov.Progress]) -> list[Step]:
    return [p.step for p in seen]


def _run(runner: str, **kwargs) -> fleetprov.ProvisionResult:
    """provision() on this thread, or provision_async() waited for."""
    if runner == "blocking":
        return fleetprov.provision(**kwargs)
    with fleetprov.provision_async(**kwargs) as op:
        return op.result(WAIT)


def _cut_after_certificate(emu, tmp_path: Path, **extra) -> tuple[dict, Path, Path]:
    """A first call whose connection is cut when RegisterThing is sent, after the certificate
    was created: it fails, leaving the journal and no credentials. Returns (kwargs, state, out)."""
    state = tmp_path / "state"
    out = tmp_path / "out"
    kwargs = emu.kwargs(
        template_name="DemoTemplate", parameters={"SerialNumber": "res"}, state_dir=state, output_dir=out
    )
    seen: list[fleetprov.Progress] = []
    with pytest.raises(fleetprov.FleetprovConnectionError) as info:
        fleetprov.provision(**kwargs, retry=NO_RETRY, on_progress=seen.append, **extra)
    assert info.value.retryable
    steps = _steps(seen)
    assert steps[0] == Step.CONNECTING and steps[-1] == Step.REGISTERING, steps
    assert Step.CERTIFICATE_CREATED in steps and Step.RETRYING not in steps
    journal = state / "journal.json"
    assert journal.is_file()
    assert _mode(journal) == 0o600
    assert _mode(state) == 0o700
    assert not any((out / name).exists() for name in OUTPUT_FILES)
    pending = _device_certs(emu)
    assert [c["status"] for c in pending] == ["PENDING_ACTIVATION"]
    return kwargs, state, out


@pytest.mark.parametrize("runner", ["blocking", "async"])
def test_resume_after_cut(emulator_factory, tmp_path, runner):
    emu = emulator_factory("close:request@register*1")
    kwargs, state, out = _cut_after_certificate(emu, tmp_path)
    (created,) = _device_certs(emu)

    seen: list[fleetprov.Progress] = []
    result = _run(runner, **kwargs, on_progress=seen.append)
    steps = _steps(seen)
    assert steps[0] == Step.RESUMING, steps
    assert steps[-1] == Step.COMMITTED, steps
    assert Step.CREATING_CERTIFICATE not in steps and Step.RESTARTING not in steps
    assert result.resumed is True
    assert result.attempts == 1
    assert result.thing_name == "demo-res"
    assert result.certificate_id == created["id"]
    # Exactly one device certificate: the journal's, now active; no second one was made.
    assert [(c["id"], c["status"]) for c in _device_certs(emu)] == [(created["id"], "ACTIVE")]
    assert not (state / "journal.json").exists()
    assert (out / "certificate.pem").read_text() == result.certificate_pem
    assert _mode(out / "private.key") == 0o600


def test_expired_journal_restarts(emulator_factory, tmp_path, caplog):
    emu = emulator_factory("close:request@register*1")
    kwargs, state, out = _cut_after_certificate(emu, tmp_path, token_lifetime=0)
    (stale,) = _device_certs(emu)

    caplog.set_level(logging.INFO, logger="fleetprov")
    seen: list[fleetprov.Progress] = []
    result = fleetprov.provision(**kwargs, on_progress=seen.append)
    steps = _steps(seen)
    assert steps[0] == Step.RESTARTING, steps
    assert Step.RESUMING not in steps and Step.CREATING_CERTIFICATE in steps
    assert steps[-1] == Step.COMMITTED
    assert result.resumed is False
    assert result.certificate_id != stale["id"]
    statuses = {c["id"]: c["status"] for c in _device_certs(emu)}
    assert statuses == {stale["id"]: "PENDING_ACTIVATION", result.certificate_id: "ACTIVE"}
    warnings = [r.getMessage() for r in caplog.records if r.name == "fleetprov" and r.levelno == logging.WARNING]
    assert any(stale["id"] in w and "expired" in w for w in warnings), warnings
    assert not (state / "journal.json").exists()
    assert (out / "certificate.pem").read_text() == result.certificate_pem


@pytest.mark.parametrize(
    "status,error_code",
    [(429, "Throttling"), (500, "InternalError"), (503, "ServiceUnavailable")],
)
def test_retryable_rejections_are_retried(emulator_factory, tmp_path, caplog, status, error_code):
    emu = emulator_factory(f"reject:{status}@register*2")
    caplog.set_level(logging.WARNING, logger="fleetprov")
    seen: list[fleetprov.Progress] = []
    result = fleetprov.provision(
        **emu.kwargs(
            template_name="DemoTemplate", parameters={"SerialNumber": f"r{status}"},
            state_dir=tmp_path / "state", retry=FAST, on_progress=seen.append,
        )
    )
    assert result.attempts == 3
    assert result.resumed is False
    retries = [p for p in seen if p.step == Step.RETRYING]
    assert [p.attempt for p in retries] == [1, 2]
    for p in retries:
        # The documented policy: the pause after failure n is drawn between half and all of
        # initial_backoff * 2**(n-1), capped at max_backoff; the retry connects again, so it is
        # stretched to a second after the last CONNECT (one per second per client id on AWS).
        full = min(FAST.initial_backoff * 2 ** (p.attempt - 1), FAST.max_backoff)
        assert full / 2 - 0.001 <= p.retry_in <= max(full, 1.0) + 0.001, p
        assert isinstance(p.error, fleetprov.RejectedError), p
        assert (p.error.status_code, p.error.error_code) == (status, error_code)
        assert p.error.retryable
        assert p.error.code_name == "FLEETPROV_REJECTED"
        assert str(status) in str(p.error)
    others = [p for p in seen if p.step != Step.RETRYING]
    assert all(p.retry_in is None and p.error is None for p in others)
    # Each step belongs to the attempt current when it was reached.
    assert [p.attempt for p in seen] == sorted(p.attempt for p in seen)
    assert seen[-1] == fleetprov.Progress(Step.COMMITTED, 3)
    # The certificate is created once and kept across attempts.
    assert _steps(seen).count(Step.CREATING_CERTIFICATE) == 1
    assert [(c["id"], c["status"]) for c in _device_certs(emu)] == [(result.certificate_id, "ACTIVE")]
    assert sum("retrying" in r.getMessage() for r in caplog.records if r.name == "fleetprov") == 2


def test_connection_cuts_are_retried(emulator_factory):
    emu = emulator_factory("close:request@create*1")
    seen: list[fleetprov.Progress] = []
    result = fleetprov.provision(
        **emu.kwargs(template_name="DemoTemplate", parameters={"SerialNumber": "cut"}, retry=FAST, on_progress=seen.append)
    )
    (retry,) = [p for p in seen if p.step == Step.RETRYING]
    assert retry.attempt == 1
    assert isinstance(retry.error, fleetprov.FleetprovConnectionError) and retry.error.retryable
    assert result.attempts == 2


@pytest.mark.parametrize("status", [400, 403, 404])
def test_other_rejections_are_not_retried(emulator_factory, status):
    emu = emulator_factory(f"reject:{status}@register*1")
    seen: list[fleetprov.Progress] = []
    with pytest.raises(fleetprov.RejectedError) as info:
        fleetprov.provision(
            **emu.kwargs(template_name="DemoTemplate", parameters={"SerialNumber": "nr"}, retry=FAST, on_progress=seen.append)
        )
    assert info.value.status_code == status
    assert not info.value.retryable
    assert Step.RETRYING not in _steps(seen)
    assert {p.attempt for p in seen} == {1}
    assert _steps(seen)[-1] == Step.REGISTERING


def test_retries_exhausted_raise_the_last_error(emulator_factory):
    emu = emulator_factory("reject:429@register")  # every time
    seen: list[fleetprov.Progress] = []
    retry = fleetprov.Retry(max_attempts=3, initial_backoff=0.05, max_backoff=0.05)
    with pytest.raises(fleetprov.RejectedError) as info:
        fleetprov.provision(
            **emu.kwargs(template_name="DemoTemplate", parameters={"SerialNumber": "ex"}, retry=retry, on_progress=seen.append)
        )
    assert info.value.status_code == 429 and info.value.retryable
    assert [p.attempt for p in seen if p.step == Step.RETRYING] == [1, 2]
    assert max(p.attempt for p in seen) == 3


def test_busy_state_dir(emulator_factory, tmp_path):
    """A flow holding the state directory (its RegisterThing reply held back) makes a second one
    on the same directory fail with BusyError at once; once it is cancelled, the next call
    resumes its journal."""
    emu = emulator_factory("delay:10000@register*1")
    state = tmp_path / "state"
    kwargs = emu.kwargs(template_name="DemoTemplate", parameters={"SerialNumber": "busy"}, state_dir=state)
    registering = threading.Event()

    def progress(p: fleetprov.Progress) -> None:
        if p.step == Step.REGISTERING:
            registering.set()

    with fleetprov.provision_async(**kwargs, on_progress=progress) as first:
        assert registering.wait(WAIT)
        seen: list[fleetprov.Progress] = []
        with pytest.raises(fleetprov.BusyError) as info:
            fleetprov.provision(**kwargs, on_progress=seen.append)
        assert info.value.code_name == "FLEETPROV_BUSY"
        assert seen == []
        with pytest.raises(fleetprov.BusyError):
            fleetprov.provision_async(**kwargs).result(WAIT)
        assert not first.done()
        first.cancel()
        with pytest.raises(fleetprov.CancelledError):
            first.result(WAIT)
    assert (state / "journal.json").is_file()

    result = fleetprov.provision(**kwargs, retry=FAST)
    assert result.resumed
    assert [(c["id"], c["status"]) for c in _device_certs(emu)] == [(result.certificate_id, "ACTIVE")]


def test_progress_error_is_a_copy(emulator_factory):
    """The error in a Progress outlives the callback (the library's object is only borrowed)."""
    emu = emulator_factory("reject:429@create*1")
    kept: list[fleetprov.Progress] = []
    fleetprov.provision(
        **emu.kwargs(template_name="DemoTemplate", parameters={"SerialNumber": "cp"}, retry=FAST, on_progress=kept.append)
    )
    (retry,) = [p for p in kept if p.step == Step.RETRYING]
    assert isinstance(retry.error, fleetprov.RejectedError)
    assert retry.error.error_message == "Rate exceeded"
    assert "CreateCertificateFromCsr rejected with 429 Throttling" in retry.error.message
    with pytest.raises(Exception):
        retry.attempt = 2  # frozen


# Each row: Retry() arguments, the exception expected, and a piece of its message.
BAD_RETRY = [
    ("zero attempts", dict(max_attempts=0), fleetprov.InvalidArgumentError, "max_attempts must be between 1"),
    ("negative attempts", dict(max_attempts=-1), fleetprov.InvalidArgumentError, "max_attempts must be between 1"),
    ("attempts over u32", dict(max_attempts=2**32), fleetprov.InvalidArgumentError, "max_attempts must be between 1"),
    ("max below initial", dict(initial_backoff=2.0, max_backoff=1.0), fleetprov.InvalidArgumentError, "below initial_backoff"),
    ("max below default initial", dict(max_backoff=0.5), fleetprov.InvalidArgumentError, "below initial_backoff"),
    ("negative initial", dict(initial_backoff=-0.1), fleetprov.InvalidArgumentError, "initial_backoff must not be negative"),
    ("NaN max", dict(max_backoff=float("nan")), fleetprov.InvalidArgumentError, "max_backoff must not be negative"),
    ("infinite max", dict(max_backoff=float("inf")), fleetprov.InvalidArgumentError, "max_backoff too large"),
    ("max over u32 ms", dict(max_backoff=5_000_000.0), fleetprov.InvalidArgumentError, "max_backoff too large"),
    ("attempts float", dict(max_attempts=2.0), TypeError, "max_attempts must be int"),
    ("attempts bool", dict(max_attempts=True), TypeError, "max_attempts must be int"),
    ("initial str", dict(initial_backoff="1"), TypeError, "initial_backoff must be a number of seconds"),
    ("max None", dict(max_backoff=None), TypeError, "max_backoff must be a number of seconds"),
]


@pytest.mark.parametrize("kwargs,exc,message", [r[1:] for r in BAD_RETRY], ids=[r[0] for r in BAD_RETRY])
def test_bad_retry(kwargs, exc, message):
    with pytest.raises(exc, match=message):
        fleetprov.Retry(**kwargs)


def test_retry_values():
    assert fleetprov.Retry() == fleetprov.Retry(5, 1.0, 30.0)
    assert fleetprov.Retry(1, 0, 0)._c_args() == (1, 0, 0)
    assert FAST._c_args() == (5, 50, 200)
    with pytest.raises(Exception):
        FAST.max_attempts = 2  # frozen


@pytest.mark.parametrize("runner", ["blocking", "async"])
def test_a_provisioned_device_gets_its_credentials_back_without_a_new_certificate(emulator, tmp_path, runner):
    out = tmp_path / "out"
    kwargs = emulator.kwargs(
        template_name="DemoTemplate", parameters={"SerialNumber": "again"}, output_dir=out,
        state_dir=tmp_path / "state",
    )
    first = _run(runner, **kwargs)
    assert not first.already_provisioned and first.registration_confirmed
    files = {name: (out / name).read_bytes() for name in OUTPUT_FILES}

    seen: list[fleetprov.Progress] = []
    again = _run(runner, **kwargs, on_progress=seen.append)
    assert again.already_provisioned
    assert seen == [], "no step: nothing was sent"
    assert (again.certificate_id, again.thing_name, again.device_configuration) == (
        first.certificate_id, first.thing_name, first.device_configuration,
    )
    assert again.private_key_pem == first.private_key_pem and again.attempts == 0
    assert {name: (out / name).read_bytes() for name in OUTPUT_FILES} == files
    assert len(_device_certs(emulator)) == 1

    renewed = _run(runner, **kwargs, reprovision=True)
    assert not renewed.already_provisioned
    assert renewed.certificate_id != first.certificate_id
    assert len(_device_certs(emulator)) == 2
    assert (out / "certificate.pem").read_text() == renewed.certificate_pem


def test_reprovision_must_be_bool(emulator, tmp_path):
    with pytest.raises(TypeError, match="reprovision must be bool"):
        fleetprov.provision(**emulator.kwargs(template_name="DemoTemplate"), reprovision=1)


def test_a_blocking_call_from_on_progress_is_refused(emulator, tmp_path):
    """Inside a callback of the library, a blocking call (here provision() itself) raises
    InCallbackError at once instead of running a flow inside the flow."""
    kwargs = emulator.kwargs(template_name="DemoTemplate", parameters={"SerialNumber": "inside"})
    refused: list[BaseException] = []

    def progress(p: fleetprov.Progress) -> None:
        if p.step == Step.CONNECTING and not refused:
            try:
                fleetprov.provision(**kwargs)
            except fleetprov.InCallbackError as e:
                refused.append(e)

    result = fleetprov.provision(**kwargs, on_progress=progress)
    assert result.thing_name == "demo-inside"
    assert len(refused) == 1
    assert refused[0].code == 17 and not refused[0].retryable
    assert "must not be called from inside a fleetprov callback" in str(refused[0])
    assert len(_device_certs(emulator)) == 1, "the refused call made nothing"
