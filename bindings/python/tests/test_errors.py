"""Rejections, bad arguments, timeouts, cancellation."""

from __future__ import annotations

import socket
import threading
import time

import pytest

import fleetprov

WAIT = 30.0  # bound on every wait for another thread


def test_unknown_template_rejected(emulator):
    with pytest.raises(fleetprov.RejectedError) as info:
        fleetprov.provision(**emulator.kwargs(template_name="NoSuchTemplate", parameters={"SerialNumber": "1"}))
    e = info.value
    assert e.status_code == 404
    assert e.error_code == "ResourceNotFound"
    assert "NoSuchTemplate" in e.error_message
    assert e.code == 6 and e.code_name == "FLEETPROV_REJECTED"
    assert not e.retryable
    assert "404" in str(e)


def test_reused_token_rejected(emulator):
    with fleetprov.Client(**emulator.kwargs(template_name="DemoTemplate", parameters={"SerialNumber": "r"})) as c:
        cert = c.create_keys_and_certificate()
        c.register_thing(cert)
        with pytest.raises(fleetprov.RejectedError) as info:
            c.register_thing(cert)
    assert info.value.status_code == 400
    assert info.value.error_code == "InvalidCertificateOwnershipToken"


def test_missing_parameter_rejected(emulator):
    with pytest.raises(fleetprov.RejectedError) as info:
        fleetprov.provision(**emulator.kwargs(template_name="DemoTemplate", parameters={}))
    assert (info.value.status_code, info.value.error_code) == (400, "InvalidParameters")


def test_throttling_is_retryable(emulator_factory):
    emu = emulator_factory("reject:429@register")
    with pytest.raises(fleetprov.RejectedError) as info:
        fleetprov.provision(
            **emu.kwargs(template_name="DemoTemplate", parameters={"SerialNumber": "t"}, retry=fleetprov.Retry(max_attempts=1))
        )
    assert info.value.status_code == 429
    assert info.value.error_code == "Throttling"
    assert info.value.retryable


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Each row: overrides of a valid call, the exception expected, and a piece of its message.
BAD_ARGUMENTS = [
    ("bad template chars", dict(template_name="bad name!"), fleetprov.InvalidArgumentError, "template name"),
    ("template too long", dict(template_name="x" * 37), fleetprov.InvalidArgumentError, "1-36"),
    ("template empty", dict(template_name=""), fleetprov.InvalidArgumentError, "template name"),
    ("template None", dict(template_name=None), fleetprov.InvalidArgumentError, "template_name is required"),
    ("missing CA", dict(ca_file="/nonexistent/ca.pem"), fleetprov.InvalidArgumentError, "cannot read CA file"),
    ("missing cert", dict(cert_file="/nonexistent/c.pem"), fleetprov.InvalidArgumentError, "cannot read claim certificate file"),
    ("missing key", dict(key_file="/nonexistent/c.key"), fleetprov.InvalidArgumentError, "cannot read claim key file"),
    ("no claim key", dict(key_file=None), fleetprov.InvalidArgumentError, "both a certificate and a key"),
    ("zero step timeout", dict(step_timeout=0), fleetprov.InvalidArgumentError, "step timeout"),
    ("negative timeout", dict(timeout=-1), fleetprov.InvalidArgumentError, "timeout out of range"),
    ("client id too long", dict(client_id="x" * 200), fleetprov.InvalidArgumentError, "128"),
    ("NUL in endpoint", dict(endpoint="local\0host"), fleetprov.InvalidArgumentError, "NUL"),
    ("port zero", dict(port=0), fleetprov.InvalidArgumentError, "port must be between"),
    ("port too big", dict(port=70000), fleetprov.InvalidArgumentError, "port must be between"),
    ("unknown format", dict(payload_format="xml"), fleetprov.InvalidArgumentError, "payload_format"),
    ("unknown key type", dict(key_type="rsa"), fleetprov.InvalidArgumentError, "key_type"),
    ("port as str", dict(port="8883"), TypeError, "port must be int"),
    ("port as bool", dict(port=True), TypeError, "port must be int"),
    ("endpoint None", dict(endpoint=None), TypeError, "endpoint must be str"),
    ("endpoint bytes", dict(endpoint=b"localhost"), TypeError, "not bytes"),
    ("parameter value int", dict(parameters={"SerialNumber": 5}), TypeError, "parameter 'SerialNumber'"),
    ("parameters list", dict(parameters=["SerialNumber"]), TypeError, "parameters must be a mapping"),
    ("format int", dict(payload_format=3), TypeError, "payload_format"),
    ("timeout str", dict(timeout="10"), TypeError, "timeout"),
    ("verify str", dict(verify="yes"), TypeError, "verify must be bool"),
    ("use_csr int", dict(use_csr=1), TypeError, "use_csr must be bool"),
    ("progress not callable", dict(on_progress=5), TypeError, "on_progress must be callable"),
    ("cert_file int", dict(cert_file=3), TypeError, "cert_file must be str"),
    ("state_dir empty", dict(state_dir=""), fleetprov.InvalidArgumentError, "path is empty"),
    ("state_dir NUL", dict(state_dir="a\0b"), fleetprov.InvalidArgumentError, "state_dir contains a NUL"),
    ("state_dir int", dict(state_dir=3), TypeError, "state_dir must be str"),
    ("retry int", dict(retry=3), TypeError, "retry must be a fleetprov.Retry"),
    ("retry tuple", dict(retry=(1, 0.1, 0.2)), TypeError, "retry must be a fleetprov.Retry"),
    ("negative token lifetime", dict(token_lifetime=-1), fleetprov.InvalidArgumentError, "token_lifetime must be between"),
    ("token lifetime over u32", dict(token_lifetime=2**32), fleetprov.InvalidArgumentError, "token_lifetime must be between"),
    ("token lifetime float", dict(token_lifetime=60.0), TypeError, "token_lifetime must be int"),
]


@pytest.mark.parametrize("overrides,exc,message", [r[1:] for r in BAD_ARGUMENTS], ids=[r[0] for r in BAD_ARGUMENTS])
def test_bad_arguments(emulator, overrides, exc, message):
    kwargs = emulator.kwargs(template_name="DemoTemplate", parameters={"SerialNumber": "bad"})
    kwargs.update(overrides)
    with pytest.raises(exc, match=message):
        fleetprov.provision(**kwargs)


def test_bad_key_pem_is_invalid_argument(emulator):
    with pytest.raises(fleetprov.InvalidArgumentError, match="claim key"):
        fleetprov.provision(**emulator.kwargs(template_name="DemoTemplate", key_file=emulator.ca_file))


def test_unexpected_keyword():
    with pytest.raises(TypeError):
        fleetprov.provision(endpoint="x", template_name="T", cert_file="a", key_file="b", bogus=1)


def test_client_bad_arguments(emulator):
    with pytest.raises(fleetprov.InvalidArgumentError, match="template name"):
        fleetprov.Client(**emulator.kwargs(template_name="no spaces allowed"))
    with fleetprov.Client(**emulator.kwargs(template_name="DemoTemplate")) as c:
        with pytest.raises(TypeError, match="fleetprov.Certificate or an ownership token"):
            c.register_thing(b"bytes are not a token")  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="parameters must be a mapping"):
            c.register_thing("token", parameters=[("SerialNumber", "1")])  # type: ignore[arg-type]
        # Any text is sent as a token: the service refuses this one, with its fields.
        with pytest.raises(fleetprov.RejectedError) as info:
            c.register_thing("not a token", parameters={"SerialNumber": "x"})
        assert (info.value.status_code, info.value.error_code) == (400, "InvalidCertificateOwnershipToken")
        with pytest.raises(TypeError, match="csr_pem must be str"):
            c.create_certificate_from_csr(None)
        with pytest.raises(fleetprov.InvalidArgumentError):
            c.create_certificate_from_csr("not a CSR")


def test_wrong_ca_is_tls_error(emulator):
    with pytest.raises(fleetprov.TlsError, match="UnknownIssuer"):
        fleetprov.provision(**emulator.kwargs(template_name="DemoTemplate", ca_file=emulator.claim_cert))


def test_connection_refused(emulator):
    seen: list[fleetprov.Progress] = []
    retry = fleetprov.Retry(max_attempts=2, initial_backoff=0.05, max_backoff=0.05)
    with pytest.raises(fleetprov.FleetprovConnectionError) as info:
        fleetprov.provision(
            **emulator.kwargs(template_name="DemoTemplate", port=_free_port(), retry=retry, on_progress=seen.append)
        )
    assert info.value.retryable
    retrying = [p for p in seen if p.step == fleetprov.Step.RETRYING]
    assert len(retrying) == 1 and retrying[0].attempt == 1
    assert isinstance(retrying[0].error, fleetprov.FleetprovConnectionError)
    assert max(p.attempt for p in seen) == 2


def test_step_timeout(emulator_factory):
    emu = emulator_factory("delay:3000@register")
    start = time.monotonic()
    with pytest.raises(fleetprov.StepTimeoutError):
        fleetprov.provision(
            **emu.kwargs(
                template_name="DemoTemplate", parameters={"SerialNumber": "slow"}, step_timeout=0.5,
                retry=fleetprov.Retry(max_attempts=1),
            )
        )
    assert time.monotonic() - start < 3.0


def test_deadline(emulator_factory):
    emu = emulator_factory("delay:3000@register")
    with pytest.raises(fleetprov.DeadlineError):
        fleetprov.provision(
            **emu.kwargs(template_name="DemoTemplate", parameters={"SerialNumber": "dl"}, step_timeout=10, timeout=0.8)
        )


def _client_registering(emu, serial):
    """A client whose register_thing runs in a thread; returns (client, thread, outcome, registering-event)."""
    registering = threading.Event()

    def progress(p):
        if p.step == fleetprov.Step.REGISTERING:
            registering.set()

    client = fleetprov.Client(
        **emu.kwargs(template_name="DemoTemplate", parameters={"SerialNumber": serial}, on_progress=progress)
    )
    cert = client.create_keys_and_certificate()
    outcome: dict = {}

    def run():
        try:
            outcome["value"] = client.register_thing(cert)
        except BaseException as e:
            outcome["error"] = e

    t = threading.Thread(target=run)
    t.start()
    assert registering.wait(WAIT)
    return client, t, outcome


def test_cancel_from_another_thread(emulator_factory):
    emu = emulator_factory("delay:5000@register")
    client, t, outcome = _client_registering(emu, "cx")
    start = time.monotonic()
    client.cancel()
    t.join(WAIT)
    assert not t.is_alive()
    assert isinstance(outcome.get("error"), fleetprov.CancelledError)
    assert time.monotonic() - start < 4.0
    client.close()


def test_busy_while_another_operation_runs(emulator_factory):
    emu = emulator_factory("delay:5000@register")
    client, t, outcome = _client_registering(emu, "busy")
    with pytest.raises(fleetprov.BusyError):
        client.create_keys_and_certificate()
    client.close()  # cancels the running call, waits for it, frees once
    t.join(WAIT)
    assert not t.is_alive()
    assert isinstance(outcome.get("error"), fleetprov.CancelledError)
    assert client.closed


def test_unwritable_output_dir_is_storage_error(emulator, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(fleetprov.StorageError):
        fleetprov.provision(
            **emulator.kwargs(template_name="DemoTemplate", parameters={"SerialNumber": "st"}, output_dir=blocker / "sub")
        )


def test_close_from_own_callback_is_refused(emulator):
    holder = {}

    def progress(p):
        holder["client"].close()

    client = fleetprov.Client(**emulator.kwargs(template_name="DemoTemplate", on_progress=progress))
    holder["client"] = client
    with pytest.raises(RuntimeError, match="own callback"):
        client.connect()
    assert not client.closed
    client.close()
    assert client.closed
