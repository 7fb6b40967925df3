"""Certificate rotation (fleetprov.rotate) against the emulator's RotationTemplate: the device
connects with its current credentials, gets a new certificate for the same thing, and its files
are replaced only after the new certificate connected."""

from __future__ import annotations

import hashlib
import ssl
from pathlib import Path
from typing import Any

import pytest

import fleetprov
from fleetprov import Step

FILES = ("certificate.pem", "private.key", "device.json")
FAST = fleetprov.Retry(max_attempts=3, initial_backoff=0.05, max_backoff=0.1)


def _provision(emu, tmp_path: Path, serial: str) -> tuple[Path, fleetprov.ProvisionResult]:
    creds = tmp_path / "creds"
    result = fleetprov.provision(
        **emu.kwargs(template_name="DemoTemplate", parameters={"SerialNumber": serial}, output_dir=creds)
    )
    return creds, result


def _rotate_kwargs(emu, thing: str, **extra: Any) -> dict:
    args = dict(
        endpoint="localhost", port=emu.port, ca_file=emu.ca_file, template_name="RotationTemplate",
        parameters={"ThingName": thing}, retry=FAST, step_timeout=5.0, timeout=30.0,
    )
    args.update(extra)
    return args


def _snapshot(creds: Path) -> dict[str, bytes]:
    return {f: (creds / f).read_bytes() for f in FILES}


def _cert_id(pem: str) -> str:
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(pem)).hexdigest()


def _connect(emu, creds: Path) -> None:
    """A TLS + MQTT connection with the credentials in `creds` (raises if refused)."""
    with fleetprov.Client(endpoint="localhost", port=emu.port, ca_file=emu.ca_file,
                          cert_file=creds / "certificate.pem", key_file=creds / "private.key",
                          step_timeout=5.0) as c:
        c.connect()


def _status(emu, cert_id: str) -> str:
    return {c["id"]: c["status"] for c in emu.registry()["certificates"]}[cert_id]


def _thing_certs(emu, thing: str) -> list[str]:
    return {t["name"]: t for t in emu.registry()["things"]}[thing]["certificates"]


@pytest.mark.parametrize("use_csr", [True, False], ids=["csr", "keys"])
def test_rotation_replaces_the_credentials(emulator, tmp_path, use_csr):
    creds, first = _provision(emulator, tmp_path, "rot")
    before = _snapshot(creds)
    seen: list[fleetprov.Progress] = []
    result = fleetprov.rotate(creds, **_rotate_kwargs(emulator, first.thing_name, use_csr=use_csr,
                                                      on_progress=seen.append))
    assert isinstance(result, fleetprov.ProvisionResult)
    assert result.thing_name == first.thing_name == "demo-rot"
    assert result.device_configuration.get("Rotated") == "true"
    assert result.certificate_id != first.certificate_id
    assert result.output_dir == creds
    after = _snapshot(creds)
    assert after["certificate.pem"] != before["certificate.pem"]
    assert after["private.key"] != before["private.key"]
    assert after["certificate.pem"].decode() == result.certificate_pem
    assert _cert_id(result.certificate_pem) == result.certificate_id
    assert [p.step for p in seen][-2:] == [Step.VERIFIED, Step.COMMITTED]
    # The thing holds both certificates, both active (retiring the old one is the backend's
    # call); the new credentials connect, and the journal is gone.
    assert sorted(_thing_certs(emulator, "demo-rot")) == sorted([first.certificate_id, result.certificate_id])
    assert _status(emulator, result.certificate_id) == "ACTIVE"
    assert _status(emulator, first.certificate_id) == "ACTIVE"
    _connect(emulator, creds)
    assert not (creds / "rotation-journal" / "journal.json").exists()


def test_rotation_into_another_directory_leaves_the_old_files(emulator, tmp_path):
    creds, first = _provision(emulator, tmp_path, "rot2")
    before = _snapshot(creds)
    new = tmp_path / "new"
    result = fleetprov.rotate(str(creds), **_rotate_kwargs(emulator, first.thing_name, output_dir=new))
    assert result.output_dir == new
    assert _snapshot(creds) == before
    assert (new / "certificate.pem").read_text() == result.certificate_pem
    _connect(emulator, new)
    _connect(emulator, creds)


def test_a_failed_rotation_leaves_the_files_byte_for_byte(emulator, tmp_path):
    creds, first = _provision(emulator, tmp_path, "rotfail")
    before = _snapshot(creds)
    emulator.ctl("fault reject:403@register")
    with pytest.raises(fleetprov.RejectedError) as info:
        fleetprov.rotate(creds, **_rotate_kwargs(emulator, first.thing_name))
    assert info.value.status_code == 403 and not info.value.retryable
    assert _snapshot(creds) == before, "byte for byte"
    emulator.ctl("clear")
    _connect(emulator, creds)
    assert _thing_certs(emulator, "demo-rotfail") == [first.certificate_id]


def test_an_interrupted_rotation_resumes(emulator, tmp_path):
    creds, first = _provision(emulator, tmp_path, "rotres")
    before = _snapshot(creds)
    emulator.ctl("fault close:request@register*1")
    with pytest.raises(fleetprov.FleetprovConnectionError):
        fleetprov.rotate(creds, **_rotate_kwargs(emulator, first.thing_name, retry=fleetprov.Retry(max_attempts=1)))
    assert _snapshot(creds) == before
    assert (creds / "rotation-journal" / "journal.json").is_file()
    result = fleetprov.rotate(creds, **_rotate_kwargs(emulator, first.thing_name))
    assert result.resumed
    # The claim certificate, the first device certificate, the rotated one: no fourth.
    assert len(emulator.registry()["certificates"]) == 3
    _connect(emulator, creds)


def test_rotation_needs_the_three_files(emulator, tmp_path):
    creds, first = _provision(emulator, tmp_path, "rotmiss")
    (creds / "device.json").unlink()
    with pytest.raises(fleetprov.StorageError, match="current credentials"):
        fleetprov.rotate(creds, **_rotate_kwargs(emulator, first.thing_name))
    assert not (creds / "device.json").exists()


# Each row: arguments to rotate() and the exception they raise.
BAD_ROTATE = [
    ("dir None", dict(credentials_dir=None), TypeError, "credentials_dir must be str"),
    ("dir empty", dict(credentials_dir=""), fleetprov.InvalidArgumentError, "credentials_dir is empty"),
    ("claim files", dict(cert_file="c.pem"), TypeError, "unexpected keyword argument 'cert_file'"),
    ("verify", dict(verify=False), TypeError, "unexpected keyword argument 'verify'"),
    ("no template", dict(template_name=None), fleetprov.InvalidArgumentError, "template_name is required"),
    ("use_csr str", dict(use_csr="yes"), TypeError, "use_csr must be bool"),
    ("bad key type", dict(key_type="rsa"), fleetprov.InvalidArgumentError, "key_type"),
    ("bad port", dict(port=70000), fleetprov.InvalidArgumentError, "port"),
]


@pytest.mark.parametrize("case,kwargs,exc,message", BAD_ROTATE, ids=[r[0] for r in BAD_ROTATE])
def test_bad_rotate_arguments(tmp_path, case, kwargs, exc, message):
    args: dict[str, Any] = dict(credentials_dir=tmp_path, endpoint="localhost", template_name="RotationTemplate")
    args.update(kwargs)
    credentials_dir = args.pop("credentials_dir")
    with pytest.raises(exc, match=message):
        fleetprov.rotate(credentials_dir, **args)
