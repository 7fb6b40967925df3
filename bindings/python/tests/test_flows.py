"""Every provisioning flow against the emulator: CSR and keys x JSON and CBOR, one call and step by step."""

from __future__ import annotations

import stat

import pytest

import fleetprov

FORMATS = ["json", "cbor"]


def _cert_status(emulator, cert_id: str) -> str:
    certs = {c["id"]: c for c in emulator.registry()["certificates"]}
    return certs[cert_id]["status"]


def _thing(emulator, name: str) -> dict:
    things = {t["name"]: t for t in emulator.registry()["things"]}
    return things[name]


@pytest.mark.parametrize("payload_format", FORMATS)
@pytest.mark.parametrize("use_csr", [True, False], ids=["csr", "keys"])
def test_provision_one_call(emulator, tmp_path, use_csr, payload_format):
    serial = f"one-{int(use_csr)}-{payload_format}"
    out = tmp_path / "creds"
    seen: list[fleetprov.Progress] = []
    result = fleetprov.provision(
        **emulator.kwargs(
            template_name="DemoTemplate",
            parameters={"SerialNumber": serial},
            use_csr=use_csr,
            payload_format=payload_format,
            output_dir=out,
            on_progress=seen.append,
        )
    )
    assert isinstance(result, fleetprov.ProvisionResult)
    assert result.thing_name == f"demo-{serial}"
    assert len(result.certificate_id) == 64
    assert "BEGIN CERTIFICATE" in result.certificate_pem
    assert result.private_key_pem is not None and "PRIVATE KEY" in result.private_key_pem
    assert result.device_configuration["LocationUrl"].endswith(f"/devices/{serial}")
    assert result.output_dir == out
    assert (out / "certificate.pem").read_text() == result.certificate_pem
    assert stat.S_IMODE((out / "private.key").stat().st_mode) == 0o600
    assert (out / "device.json").is_file()
    steps = [p.step for p in seen]
    assert steps[0] == fleetprov.Step.CONNECTING, steps
    assert steps[-2:] == [fleetprov.Step.VERIFIED, fleetprov.Step.COMMITTED], steps
    assert all(isinstance(s, fleetprov.Step) for s in steps)
    assert all(p.attempt == 1 and p.retry_in is None and p.error is None for p in seen), seen
    assert result.attempts == 1 and not result.resumed
    assert "PRIVATE KEY" not in repr(result)
    assert _cert_status(emulator, result.certificate_id) == "ACTIVE"
    assert result.certificate_id in _thing(emulator, result.thing_name)["certificates"]
    with pytest.raises(Exception):
        result.thing_name = "x"  # frozen


def test_provision_without_verify_or_output(emulator):
    result = fleetprov.provision(
        **emulator.kwargs(template_name="DemoTemplate", parameters={"SerialNumber": "nv"}, verify=False, timeout=None)
    )
    assert result.thing_name == "demo-nv"
    assert result.output_dir is None


def test_provision_external_csr(emulator, make_csr):
    csr, _key = make_csr("ext")
    result = fleetprov.provision(
        **emulator.kwargs(template_name="DemoTemplate", parameters={"SerialNumber": "ext"}, csr_pem=csr, verify=False)
    )
    assert result.thing_name == "demo-ext"
    assert result.private_key_pem is None


@pytest.mark.parametrize("payload_format", FORMATS)
def test_client_keys(emulator, payload_format):
    serial = f"k-{payload_format}"
    with fleetprov.Client(
        **emulator.kwargs(template_name="DemoTemplate", parameters={"SerialNumber": serial}, payload_format=payload_format)
    ) as client:
        client.connect()
        with client.create_keys_and_certificate() as cert:
            assert len(cert.certificate_id) == 64
            assert "PRIVATE KEY" in (cert.private_key_pem or "")
            assert "PRIVATE KEY" not in repr(cert)
            assert cert.ownership_token
            reg = client.register_thing(cert)
    assert isinstance(reg, fleetprov.Registration)
    assert reg.thing_name == f"demo-{serial}"
    assert reg.device_configuration["FallbackUrl"].startswith("https://")
    assert cert.certificate_id in _thing(emulator, reg.thing_name)["certificates"]


@pytest.mark.parametrize("payload_format", FORMATS)
def test_client_csr(emulator, make_csr, payload_format):
    serial = f"c-{payload_format}"
    csr, key = make_csr(serial)
    with fleetprov.Client(
        **emulator.kwargs(template_name="DemoTemplate", parameters={"SerialNumber": serial}, payload_format=payload_format)
    ) as client:
        cert = client.create_certificate_from_csr(csr, key_pem=key)
        assert cert.private_key_pem is None
        reg = client.register_thing(cert)
        cert.close()
    assert reg.thing_name == f"demo-{serial}"
    assert _cert_status(emulator, cert.certificate_id) == "ACTIVE"


def test_client_csr_mismatched_key(emulator, make_csr):
    csr, _ = make_csr("a")
    _, other_key = make_csr("b")
    with fleetprov.Client(**emulator.kwargs(template_name="DemoTemplate")) as client:
        with pytest.raises(fleetprov.CertificateMismatchError):
            client.create_certificate_from_csr(csr, key_pem=other_key)


def test_client_template_override(emulator):
    with fleetprov.Client(**emulator.kwargs(template_name="Nope", parameters={"SerialNumber": "ov"})) as client:
        cert = client.create_keys_and_certificate()
        reg = client.register_thing(cert, template_name="DemoTemplate")
    assert reg.thing_name == "demo-ov"


def test_closed_objects_raise(emulator):
    client = fleetprov.Client(**emulator.kwargs(template_name="DemoTemplate", parameters={"SerialNumber": "cl"}))
    cert = client.create_keys_and_certificate()
    cert.close()
    cert.close()  # idempotent
    with pytest.raises(fleetprov.ClosedError, match="Certificate has been closed"):
        client.register_thing(cert)
    with pytest.raises(fleetprov.ClosedError):
        cert.ownership_token
    assert not client.closed
    client.close()
    client.close()  # freed exactly once; a second close is a no-op
    assert client.closed
    client.cancel()  # no-op when closed
    for call in (client.connect, client.create_keys_and_certificate, lambda: client.create_certificate_from_csr("x")):
        with pytest.raises(fleetprov.ClosedError, match="Client has been closed"):
            call()
