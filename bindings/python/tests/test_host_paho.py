"""The host transport with paho-mqtt as the MQTT stack (fleetprov.paho) against the emulator:
every method and format, retries through the host's connection, the lost-reply probe with a
refused certificate, rejections, TLS trouble, and where the keys go on disk."""

from __future__ import annotations

import hashlib
import os
import ssl
import stat
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

import fleetprov
from fleetprov import Step
from fleetprov.paho import PahoTransport, default_client, provision_with_paho

FAST = fleetprov.Retry(max_attempts=5, initial_backoff=0.05, max_backoff=0.2)
OUTPUT_FILES = ("certificate.pem", "private.key", "device.json")


class Boom(Exception):
    pass


def _paho_kwargs(emu, **extra: Any) -> dict:
    args = dict(
        endpoint="localhost", port=emu.port, ca_file=emu.ca_file, cert_file=emu.claim_cert,
        key_file=emu.claim_key, template_name="DemoTemplate", step_timeout=5.0, timeout=30.0,
        retry=FAST,
    )
    args.update(extra)
    return args


def _device_certs(emu) -> list[dict]:
    return [c for c in emu.registry()["certificates"] if c["origin"] != "claim"]


def _cert_id(pem: str) -> str:
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(pem)).hexdigest()


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def key_loads(monkeypatch):
    """Every ssl.SSLContext.load_cert_chain call: (certfile, keyfile, file modes, dir mode)."""
    seen: list[dict] = []
    original = ssl.SSLContext.load_cert_chain

    def recording(self, certfile, keyfile=None, password=None):
        cert, key = Path(certfile), Path(keyfile)
        seen.append(dict(cert=cert, key=key, modes=(_mode(cert), _mode(key)), dir_mode=_mode(key.parent)))
        return original(self, certfile, keyfile, password)

    monkeypatch.setattr(ssl.SSLContext, "load_cert_chain", recording)
    return seen


@pytest.mark.parametrize("payload_format", ["json", "cbor"])
@pytest.mark.parametrize("use_csr", [True, False], ids=["csr", "keys"])
def test_paho_provisions(emulator, tmp_path, key_loads, use_csr, payload_format):
    serial = f"paho-{int(use_csr)}-{payload_format}"
    out, state = tmp_path / "creds", tmp_path / "state"
    seen: list[fleetprov.Progress] = []
    result = provision_with_paho(**_paho_kwargs(
        emulator, parameters={"SerialNumber": serial}, use_csr=use_csr, payload_format=payload_format,
        output_dir=out, state_dir=state, on_progress=seen.append,
    ))
    assert result.thing_name == f"demo-{serial}"
    assert result.device_configuration["LocationUrl"].endswith(f"/devices/{serial}")
    assert result.attempts == 1 and not result.resumed
    assert result.output_dir == out
    assert (out / "certificate.pem").read_text() == result.certificate_pem
    assert (out / "private.key").read_text() == result.private_key_pem
    assert _mode(out / "private.key") == 0o600
    assert _cert_id(result.certificate_pem) == result.certificate_id
    assert not (state / "journal.json").exists()
    steps = [p.step for p in seen]
    assert steps[0] == Step.CONNECTING and steps[-2:] == [Step.VERIFIED, Step.COMMITTED], steps
    # Exactly one device certificate, active and attached to the thing.
    certs = _device_certs(emulator)
    assert [(c["id"], c["status"]) for c in certs] == [(result.certificate_id, "ACTIVE")]
    thing = {t["name"]: t for t in emulator.registry()["things"]}[result.thing_name]
    assert result.certificate_id in thing["certificates"]
    # paho loaded the claim files where they are, and the new key from a private directory
    # (0700, files 0600) that is gone now.
    assert [(l["cert"], l["key"]) for l in key_loads[:1]] == [(emulator.claim_cert, emulator.claim_key)]
    new = [l for l in key_loads if l["cert"] != emulator.claim_cert]
    assert len(new) == 1, key_loads
    assert new[0]["modes"] == (0o600, 0o600) and new[0]["dir_mode"] == 0o700
    assert not new[0]["key"].exists() and not new[0]["key"].parent.exists()


def test_paho_retries_through_a_cut_connection(emulator_factory, tmp_path):
    emu = emulator_factory("close:request@register*1")
    seen: list[fleetprov.Progress] = []
    made: list[str] = []

    def factory(client_id: str) -> mqtt.Client:
        made.append(client_id)
        return default_client(client_id)

    result = provision_with_paho(**_paho_kwargs(
        emu, parameters={"SerialNumber": "cut"}, output_dir=tmp_path / "creds", state_dir=tmp_path / "state",
        on_progress=seen.append, client_factory=factory,
    ))
    # A new client per connection: claim, claim again after the cut, then the new certificate;
    # a claim connection without client_id gets a random one each time.
    assert len(made) == 3 and made[2] == "demo-cut"
    assert all(m.startswith("fleetprov-") for m in made[:2]) and made[0] != made[1]
    assert result.thing_name == "demo-cut"
    assert result.attempts == 2
    retry = [p for p in seen if p.step == Step.RETRYING]
    assert len(retry) == 1 and isinstance(retry[0].error, fleetprov.FleetprovConnectionError)
    assert [(c["id"], c["status"]) for c in _device_certs(emu)] == [(result.certificate_id, "ACTIVE")]
    assert all((tmp_path / "creds" / f).is_file() for f in OUTPUT_FILES)


def test_paho_reports_a_refused_certificate_as_tls(emulator_factory, tmp_path):
    """The ownership token expires while the CreateCertificateFromCsr reply is held back, so
    RegisterThing refuses it; the flow connects with the certificate to see whether an earlier
    attempt registered it. The emulator refuses the certificate in TLS (with TLS 1.3 the alert
    arrives after the handshake), the transport reports that as a TLS failure, and the flow
    starts over with a new certificate instead of retrying the dead one."""
    emu = emulator_factory("delay:1500@create*1", args=("--token-ttl", "1"))
    seen: list[fleetprov.Progress] = []
    result = provision_with_paho(**_paho_kwargs(
        emu, parameters={"SerialNumber": "probe"}, output_dir=tmp_path / "creds", on_progress=seen.append,
    ))
    steps = [p.step for p in seen]
    assert Step.RESTARTING in steps, steps
    assert Step.RETRYING not in steps, steps
    assert result.thing_name == "demo-probe"
    active = [c["id"] for c in _device_certs(emu) if c["status"] == "ACTIVE"]
    assert active == [result.certificate_id]


def test_paho_rejection(emulator, tmp_path):
    out = tmp_path / "creds"
    with pytest.raises(fleetprov.RejectedError) as info:
        provision_with_paho(**_paho_kwargs(emulator, parameters={}, output_dir=out))
    assert (info.value.status_code, info.value.error_code) == (400, "InvalidParameters")
    assert not any((out / f).exists() for f in OUTPUT_FILES)


def test_paho_untrusted_server_is_a_tls_error(emulator):
    # The claim certificate is no CA of the server's certificate.
    with pytest.raises(fleetprov.TlsError):
        provision_with_paho(**_paho_kwargs(
            emulator, ca_file=emulator.claim_cert, parameters={"SerialNumber": "tls"},
            retry=fleetprov.Retry(max_attempts=1),
        ))
    assert _device_certs(emulator) == []


def test_paho_progress_exception_propagates(emulator, tmp_path):
    def progress(p: fleetprov.Progress) -> None:
        if p.step == Step.REGISTERED:
            raise Boom("stop here")

    out = tmp_path / "creds"
    with pytest.raises(Boom, match="stop here"):
        provision_with_paho(**_paho_kwargs(emulator, parameters={"SerialNumber": "boom"}, output_dir=out,
                                           on_progress=progress))
    assert not any((out / f).exists() for f in OUTPUT_FILES), "nothing committed"


def test_paho_with_pem_claim_and_a_client_factory(emulator):
    made: list[str] = []

    def factory(client_id: str) -> mqtt.Client:
        made.append(client_id)
        return default_client(client_id)

    result = provision_with_paho(**_paho_kwargs(
        emulator, ca_file=None, ca_pem=emulator.ca_file.read_text(), cert_file=None, key_file=None,
        cert_pem=emulator.claim_cert.read_text(), key_pem=emulator.claim_key.read_text(),
        parameters={"SerialNumber": "pem"}, client_factory=factory, payload_format="cbor",
        client_id="claim-conn",
    ))
    assert result.thing_name == "demo-pem"
    # The claim connection uses client_id; the new certificate connects as the thing.
    assert made == ["claim-conn", "demo-pem"]


def test_paho_transport_driven_by_hand(emulator, tmp_path):
    """PahoTransport.run() with a HostFlow made by the caller; the transport is reusable for
    inspection afterwards and close() removes its directory."""
    with PahoTransport("localhost", emulator.port, ca_file=emulator.ca_file, cert_file=emulator.claim_cert,
                       key_file=emulator.claim_key) as transport:
        with fleetprov.HostFlow(transport=transport, template_name="DemoTemplate",
                                parameters={"SerialNumber": "hand"}, use_csr=False) as flow:
            result = transport.run(flow, timeout=30)
            assert flow.result() is result
        workdir = transport.workdir
        assert workdir is not None and workdir.is_dir() and os.listdir(workdir) == []
    assert not workdir.exists()
    assert result.thing_name == "demo-hand"


# Each row: PahoTransport arguments and the exception they raise.
BAD_TRANSPORT = [
    ("no claim", dict(cert_file=None, key_file=None), fleetprov.InvalidArgumentError, "claim credentials"),
    ("half a claim", dict(key_file=None), fleetprov.InvalidArgumentError, "both a certificate and a key"),
    ("two claims", dict(cert_pem="x", key_pem="y"), fleetprov.InvalidArgumentError, "claim credentials"),
    ("two CAs", dict(ca_pem="x"), fleetprov.InvalidArgumentError, "ca_file or ca_pem"),
    ("port 0", dict(port=0), fleetprov.InvalidArgumentError, "port must be between 1 and 65535"),
    ("port str", dict(port="8883"), TypeError, "port must be int"),
    ("empty endpoint", dict(endpoint=""), fleetprov.InvalidArgumentError, "endpoint is empty"),
    ("endpoint bytes", dict(endpoint=b"localhost"), TypeError, "endpoint must be str"),
    ("connect_timeout 0", dict(connect_timeout=0), fleetprov.InvalidArgumentError, "connect_timeout"),
    ("keep_alive 0", dict(keep_alive=0), fleetprov.InvalidArgumentError, "keep_alive"),
    ("factory", dict(client_factory="paho"), TypeError, "client_factory must be callable"),
    ("client_id int", dict(client_id=5), TypeError, "client_id must be str"),
]


@pytest.mark.parametrize("case,kwargs,exc,message", BAD_TRANSPORT, ids=[r[0] for r in BAD_TRANSPORT])
def test_bad_transport_arguments(case, kwargs, exc, message):
    args: dict[str, Any] = dict(endpoint="localhost", port=8883, ca_file="ca.pem", cert_file="c.pem", key_file="k.pem")
    args.update(kwargs)
    endpoint, port = args.pop("endpoint"), args.pop("port")
    with pytest.raises(exc, match=message):
        PahoTransport(endpoint, port, **args)


def test_attach_needs_a_host_flow():
    with PahoTransport("localhost", cert_file="c.pem", key_file="k.pem") as transport:
        with pytest.raises(TypeError, match="fleetprov.HostFlow"):
            transport.attach(object())
