"""Progress and log callbacks, exceptions raised in them, the async flavour and its threads."""

from __future__ import annotations

import logging
import threading

import pytest

import fleetprov
from fleetprov import _callbacks

WAIT = 30.0


class Boom(Exception):
    pass


def test_progress_exception_reraised_one_call(emulator):
    seen = []

    def progress(p):
        seen.append(p.step)
        if p.step == fleetprov.Step.CERTIFICATE_CREATED:
            raise Boom("from the progress callback")

    with pytest.raises(Boom, match="from the progress callback"):
        fleetprov.provision(
            **emulator.kwargs(template_name="DemoTemplate", parameters={"SerialNumber": "boom"}, on_progress=progress)
        )
    assert fleetprov.Step.CERTIFICATE_CREATED in seen


def test_progress_exception_reraised_client(emulator):
    def progress(p):
        if p.step == fleetprov.Step.SUBSCRIBED:
            raise Boom("client")

    with fleetprov.Client(**emulator.kwargs(template_name="DemoTemplate", on_progress=progress)) as c:
        with pytest.raises(Boom):
            c.create_keys_and_certificate()


def test_log_records(emulator, caplog):
    caplog.set_level(logging.DEBUG, logger="fleetprov")
    with fleetprov.Client(
        **emulator.kwargs(template_name="DemoTemplate", parameters={"SerialNumber": "log"})
    ) as c:
        cert = c.create_keys_and_certificate()
        token = cert.ownership_token
        c.register_thing(cert)
    fleetprov.provision(
        **emulator.kwargs(template_name="DemoTemplate", parameters={"SerialNumber": "log2"}, use_csr=True)
    )
    records = [r for r in caplog.records if r.name == "fleetprov"]
    assert records
    levels = {r.levelno for r in records}
    assert logging.INFO in levels and logging.DEBUG in levels
    for r in records:
        msg = r.getMessage()
        assert "PRIVATE KEY" not in msg
        assert token not in msg


def test_log_levels_filtered_by_logging(emulator, caplog):
    caplog.set_level(logging.INFO, logger="fleetprov")
    fleetprov.provision(**emulator.kwargs(template_name="DemoTemplate", parameters={"SerialNumber": "lv"}))
    assert caplog.records
    assert all(r.levelno >= logging.INFO for r in caplog.records if r.name == "fleetprov")


def test_error_is_logged(emulator, caplog):
    caplog.set_level(logging.DEBUG, logger="fleetprov")
    with fleetprov.Client(**emulator.kwargs(template_name="Missing", parameters={"SerialNumber": "x"})) as c:
        cert = c.create_keys_and_certificate()
        with pytest.raises(fleetprov.RejectedError):
            c.register_thing(cert)
    warnings = [r.getMessage() for r in caplog.records if r.name == "fleetprov" and r.levelno >= logging.WARNING]
    assert any("404" in w for w in warnings), warnings


def test_error_is_logged_one_call(emulator, caplog):
    caplog.set_level(logging.DEBUG, logger="fleetprov")
    with pytest.raises(fleetprov.RejectedError):
        fleetprov.provision(**emulator.kwargs(template_name="Missing", parameters={"SerialNumber": "x"}))
    warnings = [r.getMessage() for r in caplog.records if r.name == "fleetprov" and r.levelno >= logging.WARNING]
    assert any("404" in w for w in warnings), warnings


def test_registry_entries_released(emulator):
    before = _callbacks.registry_size()
    fleetprov.provision(
        **emulator.kwargs(template_name="DemoTemplate", parameters={"SerialNumber": "rel"}, on_progress=lambda p: None)
    )
    with fleetprov.Client(**emulator.kwargs(template_name="DemoTemplate", on_progress=lambda p: None)) as c:
        assert _callbacks.registry_size() == before + 2  # log + progress, shared with the client
        c.connect()
    with pytest.raises(fleetprov.InvalidArgumentError):
        fleetprov.Client(**emulator.kwargs(template_name="DemoTemplate", cert_file="/nonexistent"))
    op = fleetprov.provision_async(**emulator.kwargs(template_name="DemoTemplate", parameters={"SerialNumber": "rel2"}))
    op.result(WAIT)
    assert _callbacks.registry_size() == before


def test_async_callbacks_on_library_thread(emulator, caplog):
    caplog.set_level(logging.DEBUG, logger="fleetprov")
    main = threading.get_ident()
    progress_threads: set[int] = set()
    op = fleetprov.provision_async(
        **emulator.kwargs(
            template_name="DemoTemplate",
            parameters={"SerialNumber": "async"},
            payload_format="cbor",
            on_progress=lambda p: progress_threads.add(threading.get_ident()),
        )
    )
    with op:
        result = op.result(timeout=WAIT)
    assert op.done()
    assert result.thing_name == "demo-async"
    assert progress_threads and main not in progress_threads
    log_threads = {r.thread for r in caplog.records if r.name == "fleetprov"}
    assert log_threads and main not in log_threads


def test_async_progress_exception_reraised(emulator):
    def progress(p):
        if p.step == fleetprov.Step.SUBSCRIBED:
            raise Boom("async")

    op = fleetprov.provision_async(
        **emulator.kwargs(template_name="DemoTemplate", parameters={"SerialNumber": "ab"}, on_progress=progress)
    )
    with pytest.raises(Boom, match="async"):
        op.result(WAIT)


def test_async_error(emulator):
    op = fleetprov.provision_async(**emulator.kwargs(template_name="Unknown", parameters={"SerialNumber": "u"}))
    with pytest.raises(fleetprov.RejectedError) as info:
        op.result(WAIT)
    assert info.value.status_code == 404


def test_async_cancel_and_result_timeout(emulator_factory):
    emu = emulator_factory("delay:5000@register")
    registering = threading.Event()

    def progress(p):
        if p.step == fleetprov.Step.REGISTERING:
            registering.set()

    op = fleetprov.provision_async(
        **emu.kwargs(template_name="DemoTemplate", parameters={"SerialNumber": "ac"}, on_progress=progress)
    )
    assert registering.wait(WAIT)
    with pytest.raises(TimeoutError):
        op.result(timeout=0.05)
    op.cancel()
    with pytest.raises(fleetprov.CancelledError):
        op.result(WAIT)
    op.cancel()  # after completion: no-op
    op.close()


def test_async_bad_arguments():
    with pytest.raises(TypeError, match="unexpected keyword"):
        fleetprov.provision_async(endpoint="x", template_name="T", cert_file="a", key_file="b", nope=1)
    with pytest.raises(fleetprov.InvalidArgumentError, match="cannot read claim certificate file"):
        fleetprov.provision_async(endpoint="x", template_name="T", cert_file="/nonexistent", key_file="/nonexistent")


def test_async_abandoned_operation_at_exit(emulator_factory, tmp_path):
    """An operation still running at interpreter exit is cancelled and waited for: no crash."""
    import subprocess
    import sys

    emu = emulator_factory("delay:5000@register")
    script = tmp_path / "abandon.py"
    script.write_text(
        "import threading, fleetprov\n"
        "ev = threading.Event()\n"
        "op = fleetprov.provision_async(endpoint='localhost', port=%d, ca_file=%r, cert_file=%r, key_file=%r,\n"
        "    template_name='DemoTemplate', parameters={'SerialNumber': 'ab'},\n"
        "    on_progress=lambda p: p.step == fleetprov.Step.REGISTERING and ev.set())\n"
        "assert ev.wait(30)\n"
        "print('exiting')\n"
        % (emu.port, str(emu.ca_file), str(emu.claim_cert), str(emu.claim_key))
    )
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "exiting" in out.stdout
