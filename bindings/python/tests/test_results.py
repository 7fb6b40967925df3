"""Results and errors that say everything; one claim connection registering many boards; ALPN on
the paho path."""

from __future__ import annotations

import concurrent.futures

import pytest

import fleetprov


@pytest.mark.parametrize(
    "cls, generic",
    [
        (fleetprov.StepTimeoutError, TimeoutError),
        (fleetprov.DeadlineError, TimeoutError),
        (fleetprov.FleetprovConnectionError, ConnectionError),
        (fleetprov.InvalidArgumentError, ValueError),
        (fleetprov.CancelledError, concurrent.futures.CancelledError),
        (fleetprov.ClosedError, RuntimeError),
    ],
)
def test_generic_handlers_catch_them(cls, generic):
    assert issubclass(cls, fleetprov.FleetprovError) and issubclass(cls, generic)
    with pytest.raises(generic):
        raise cls("x")


def test_a_step_timeout_is_caught_as_timeout_error(emulator_factory):
    emu = emulator_factory("drop@register")
    with pytest.raises(TimeoutError) as info:
        fleetprov.provision(
            **emu.kwargs(template_name="DemoTemplate", parameters={"SerialNumber": "to"}),
            step_timeout=0.3, retry=fleetprov.Retry(max_attempts=1),
        )
    assert isinstance(info.value, fleetprov.StepTimeoutError)
    assert info.value.code_name == "FLEETPROV_TIMEOUT"


def test_a_refused_connection_is_caught_as_connection_error(emulator):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    with pytest.raises(ConnectionError):
        fleetprov.provision(
            **emulator.kwargs(template_name="DemoTemplate", parameters={"SerialNumber": "cr"}, port=port),
            retry=fleetprov.Retry(max_attempts=1),
        )


def test_result_fields(emulator, tmp_path):
    out = tmp_path / "out"
    kwargs = emulator.kwargs(template_name="DemoTemplate", parameters={"SerialNumber": "rf"}, output_dir=out)
    first = fleetprov.provision(**kwargs)
    assert (first.thing_name, first.registration_confirmed, first.already_provisioned) == ("demo-rf", True, False)
    again = fleetprov.provision(**kwargs)
    assert again.already_provisioned and again.attempts == 0
    assert again.certificate_id == first.certificate_id


def test_unknown_thing_name_is_none(emulator_factory, make_csr):
    """RegisterThing's reply lost, its token used up, the certificate's key not the library's:
    the registration is known only from the certificate being active; the name is unknown."""
    emu = emulator_factory("close:processed@register*1")
    csr, _key = make_csr("unconfirmed")
    result = fleetprov.provision(
        **emu.kwargs(template_name="DemoTemplate", parameters={"SerialNumber": "uc"}),
        csr_pem=csr, retry=fleetprov.Retry(max_attempts=3, initial_backoff=0.05, max_backoff=0.1),
    )
    assert result.registration_confirmed is False
    assert result.thing_name is None
    assert result.device_configuration == {}


def test_one_client_registers_many_boards(emulator):
    things = {t["name"] for t in emulator.registry()["things"]}
    with fleetprov.Client(
        **emulator.kwargs(template_name="DemoTemplate", parameters={"SerialNumber": "default"})
    ) as c:
        certs = [c.create_keys_and_certificate() for _ in range(3)]
        saved = certs[2].ownership_token
        certs[2].close()  # only the saved token is left of the third
        regs = [
            c.register_thing(certs[0], parameters={"SerialNumber": "board-0"}),
            c.register_thing(certs[1], parameters={"SerialNumber": "board-1", "Location": "factory"}),
            c.register_thing(saved, parameters={"SerialNumber": "board-2"}),
        ]
        assert [r.thing_name for r in regs] == ["demo-board-0", "demo-board-1", "demo-board-2"]
        assert regs[1].device_configuration != regs[0].device_configuration  # Location: factory
        # Without parameters: the construction's.
        fourth = c.create_keys_and_certificate()
        assert c.register_thing(fourth.ownership_token).thing_name == "demo-default"
    names = {t["name"] for t in emulator.registry()["things"]} - things
    assert names == {"demo-board-0", "demo-board-1", "demo-board-2", "demo-default"}


def test_paho_offers_alpn(emulator_factory):
    pytest.importorskip("paho.mqtt.client")
    from fleetprov.paho import PahoTransport, provision_with_paho

    emu = emulator_factory(args=("--require-alpn",))
    kwargs = dict(
        endpoint="localhost", port=emu.port, ca_file=emu.ca_file, cert_file=emu.claim_cert,
        key_file=emu.claim_key, template_name="DemoTemplate", step_timeout=3.0, timeout=10.0,
        retry=fleetprov.Retry(max_attempts=1),
    )
    result = provision_with_paho(**kwargs, parameters={"SerialNumber": "alpn"}, alpn=True)
    assert result.thing_name == "demo-alpn"
    with pytest.raises(fleetprov.FleetprovError):
        provision_with_paho(**kwargs, parameters={"SerialNumber": "noalpn"}, alpn=False)
    # By default on exactly when the port is 443, as the library's own transport does.
    common = dict(cert_file=emu.claim_cert, key_file=emu.claim_key)
    with PahoTransport("localhost", 443, **common) as on, PahoTransport("localhost", 8883, **common) as off:
        assert (on._alpn, off._alpn) == (True, False)
