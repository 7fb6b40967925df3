"""The mistakes a new user makes, each with the exception (code) and the text they see: the
message must name the cause, and nothing is retried that cannot pass."""

from __future__ import annotations

import datetime
import socket
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

import fleetprov
from fleetprov import (
    FleetprovConnectionError,
    InvalidArgumentError,
    RejectedError,
    StorageError,
    TlsError,
)


def _stranger(tmp: Path) -> tuple[Path, Path]:
    """A self-signed certificate no service has seen, and its key."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "stranger")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp / "stranger.pem", tmp / "stranger.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return cert_path, key_path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_mistakes_table(emulator, tmp_path: Path) -> None:
    stranger_cert, stranger_key = _stranger(tmp_path)
    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory")
    port = _free_port()
    quick = fleetprov.Retry(max_attempts=2, initial_backoff=0.05, max_backoff=0.1)
    # (mistake, arguments changed, exception, texts the message must contain)
    rows = [
        ("unregistered claim certificate", dict(cert_file=stranger_cert, key_file=stranger_key),
         TlsError, ["refused the claim certificate", f"localhost:{emulator.port}",
                    "not registered and ACTIVE", "(1 attempt,"]),
        ("wrong CA file", dict(ca_file=emulator.claim_cert),
         TlsError, ["is not trusted", f"the CA file {emulator.claim_cert}"]),
        ("missing CA file", dict(ca_file=tmp_path / "no-such-ca.pem"),
         InvalidArgumentError, ["CA file", "no-such-ca.pem"]),
        ("missing key", dict(key_file=tmp_path / "no-such.key"),
         InvalidArgumentError, ["no-such.key"]),
        ("mismatched key", dict(key_file=stranger_key),
         InvalidArgumentError, ["does not match"]),
        ("bad template name", dict(template_name="no spaces allowed"),
         InvalidArgumentError, ["template name"]),
        ("unknown template", dict(template_name="NoSuchTemplate"),
         RejectedError, ["NoSuchTemplate"]),
        ("emulator down", dict(endpoint="127.0.0.1", port=port, retry=quick),
         FleetprovConnectionError, [f"127.0.0.1:{port}", "(2 attempts,"]),
        ("unresolvable host", dict(endpoint="no-such-host.invalid", retry=quick),
         FleetprovConnectionError, ['"no-such-host.invalid" does not resolve', "(2 attempts,"]),
        ("unwritable output directory", dict(output_dir="/proc/fleetprov-output"),
         StorageError, ["/proc/fleetprov-output", "cannot hold the credentials"]),
        ("output path that is a file", dict(output_dir=a_file),
         StorageError, [str(a_file), "cannot hold the credentials"]),
    ]
    seen = []
    for mistake, changes, exception, texts in rows:
        kwargs = emulator.kwargs(template_name="DemoTemplate", parameters={"SerialNumber": "m"})
        kwargs.update(changes)
        with pytest.raises(fleetprov.FleetprovError) as raised:
            fleetprov.provision(**kwargs)
        error = raised.value
        seen.append(f"{mistake}: {type(error).__name__}: {error}")
        assert isinstance(error, exception), seen[-1]
        for text in texts:
            assert text in str(error), f"{seen[-1]}\n  missing: {text!r}"
    # Only the unknown template got as far as a certificate (the template is known only to the
    # service, at RegisterThing); it stays pending and goes with its token, as on AWS.
    pending = [c for c in emulator.registry()["certificates"] if c.get("status") == "PENDING_ACTIVATION"]
    assert len(pending) == 1, pending
    print("\n".join(seen))
