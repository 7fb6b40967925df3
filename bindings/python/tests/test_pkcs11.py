"""Keys that never leave a PKCS#11 token (SoftHSM2, through python-pkcs11): the claim key behind
``claim_signer``, the device key behind ``device_signer``, through the example and the API."""

from __future__ import annotations

import datetime
import os
import shutil
import ssl
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pkcs11
import pytest
from conftest import REPO, Emulator, _start
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11.util.ec import encode_ec_public_key, encode_named_curve_parameters

import fleetprov
from fleetprov import _callbacks

EXAMPLE = REPO / "examples" / "python" / "provision_pkcs11.py"
MODULE = os.environ.get("FLEETPROV_PKCS11_MODULE", "/usr/lib/softhsm/libsofthsm2.so")
SOFTHSM2_UTIL = shutil.which("softhsm2-util")
PIN = "1234"
WAIT = 120


@dataclass
class Token:
    """A SoftHSM2 token "T" in its own directory, and a logged-in read/write session on it."""

    conf: Path
    session: pkcs11.Session

    def env(self, **extra: str) -> dict:
        return {**os.environ, "SOFTHSM2_CONF": str(self.conf), **extra}

    def util(self, *args: str) -> None:
        subprocess.run([SOFTHSM2_UTIL, *args], env=self.env(), check=True, capture_output=True, timeout=WAIT)

    def import_claim(self, emulator: Emulator) -> pkcs11.PrivateKey:
        """The emulator's claim key, moved into the token (label "claim", id 01)."""
        self.util("--import", str(emulator.claim_key), "--token", "T", "--label", "claim", "--id", "01", "--pin", PIN)
        return self.session.get_key(object_class=ObjectClass.PRIVATE_KEY, label="claim")

    def certificates(self, label: str = "device") -> list:
        return list(self.session.get_objects({Attribute.CLASS: ObjectClass.CERTIFICATE, Attribute.LABEL: label}))


@pytest.fixture
def token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Token]:
    if SOFTHSM2_UTIL is None:
        pytest.skip("softhsm2-util is not installed (Debian package softhsm2)")
    tokens = tmp_path / "tokens"
    tokens.mkdir()
    conf = tmp_path / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\n")
    monkeypatch.setenv("SOFTHSM2_CONF", str(conf))
    subprocess.run(
        [SOFTHSM2_UTIL, "--init-token", "--free", "--label", "T", "--pin", PIN, "--so-pin", "5678"],
        check=True, capture_output=True, timeout=WAIT,
    )
    lib = pkcs11.lib(MODULE)
    lib.reinitialize()  # SoftHSM2 reads SOFTHSM2_CONF when initialised: this test's token directory
    tok = Token(conf=conf, session=lib.get_token(token_label="T").open(rw=True, user_pin=PIN))
    try:
        yield tok
    finally:
        tok.session.close()
        lib.finalize()


# --- signers over python-pkcs11 objects -------------------------------------------------------


class Calls:
    """Counts the calls of a signer."""

    def __init__(self) -> None:
        self.count = 0


def claim_signer(key: pkcs11.PrivateKey, calls: Calls | None = None) -> fleetprov.ClaimSigner:
    def sign(scheme: fleetprov.SignatureScheme, message: bytes, digest: bytes) -> bytes:
        if calls is not None:
            calls.count += 1
        assert scheme == fleetprov.SignatureScheme.ECDSA_P256_SHA256
        assert len(digest) == 32
        return key.sign(digest, mechanism=Mechanism.ECDSA)

    return sign


def device_signer(key: pkcs11.PrivateKey, calls: Calls | None = None) -> fleetprov.DeviceSigner:
    def sign(message: bytes, digest: bytes) -> bytes:
        if calls is not None:
            calls.count += 1
        return key.sign(digest, mechanism=Mechanism.ECDSA)

    return sign


def device_key(session: pkcs11.Session, label: str = "device") -> tuple[pkcs11.PublicKey, pkcs11.PrivateKey]:
    """A P-256 key pair made in the token: on the token, sensitive, never extractable."""
    params = session.create_domain_parameters(
        KeyType.EC, {Attribute.EC_PARAMS: encode_named_curve_parameters("secp256r1")}, local=True
    )
    return params.generate_keypair(
        id=os.urandom(8), label=label, store=True,
        private_template={Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False, Attribute.SIGN: True},
    )


def store_certificate(session: pkcs11.Session, pem: str, key: pkcs11.PrivateKey, label: str = "device") -> None:
    der = ssl.PEM_cert_to_DER_cert(pem)
    session.create_object({
        Attribute.CLASS: ObjectClass.CERTIFICATE, Attribute.CERTIFICATE_TYPE: pkcs11.CertificateType.X_509,
        Attribute.TOKEN: True, Attribute.LABEL: label, Attribute.ID: key[Attribute.ID], Attribute.VALUE: der,
        Attribute.SUBJECT: x509.load_der_x509_certificate(der).subject.public_bytes(),
    })


def assert_stored_and_matching(tok: Token, certificate_pem: str, label: str = "device") -> None:
    """The token holds `certificate_pem` as the certificate labelled `label`, with the id of the
    key pair of that label, whose public key is the certificate's; the private key is sensitive
    and was never extractable."""
    [cert] = tok.certificates(label)
    private = tok.session.get_key(object_class=ObjectClass.PRIVATE_KEY, label=label)
    public = tok.session.get_key(object_class=ObjectClass.PUBLIC_KEY, label=label)
    der = bytes(cert[Attribute.VALUE])
    assert der == ssl.PEM_cert_to_DER_cert(certificate_pem)
    assert bytes(cert[Attribute.ID]) == bytes(private[Attribute.ID]) == bytes(public[Attribute.ID])
    spki = x509.load_der_x509_certificate(der).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert spki == encode_ec_public_key(public)
    assert private[Attribute.TOKEN] and private[Attribute.SENSITIVE] and private[Attribute.NEVER_EXTRACTABLE]
    assert not private[Attribute.EXTRACTABLE]


def device_certificates(emulator: Emulator) -> list[dict]:
    return [c for c in emulator.registry()["certificates"] if c["origin"] != "claim"]


def provision_args(emulator: Emulator, serial: str, **extra) -> dict:
    """provision()'s arguments with the claim certificate and no claim key."""
    args = dict(
        endpoint="localhost", port=emulator.port, ca_file=emulator.ca_file, cert_file=emulator.claim_cert,
        template_name="DemoTemplate", parameters={"SerialNumber": serial},
    )
    args.update(extra)
    return args


# --- through the API ---------------------------------------------------------------------------


@pytest.mark.parametrize("payload_format", ["json", "cbor"])
def test_api_both_keys_in_the_token(emulator, token, payload_format):
    claim_key = token.import_claim(emulator)
    public, private = device_key(token.session)
    claim_calls, device_calls = Calls(), Calls()
    args = provision_args(
        emulator, f"api-{payload_format}", payload_format=payload_format,
        claim_signer=claim_signer(claim_key, claim_calls),
        device_signer=device_signer(private, device_calls), device_public_key=encode_ec_public_key(public),
    )
    if payload_format == "json":
        result = fleetprov.provision(**args)
    else:  # the async flavour: the signers run on the library's worker thread
        with fleetprov.provision_async(**args) as op:
            result = op.result(timeout=WAIT)
    assert result.thing_name == f"demo-api-{payload_format}"
    assert result.private_key_pem is None and result.output_dir is None
    assert (claim_calls.count, device_calls.count) == (1, 2)  # claim handshake; CSR + verification
    store_certificate(token.session, result.certificate_pem, private)
    assert_stored_and_matching(token, result.certificate_pem)
    [cert] = device_certificates(emulator)
    assert cert["id"] == result.certificate_id and cert["status"] == "ACTIVE"


def test_client_with_a_claim_signer(emulator, token):
    claim_key = token.import_claim(emulator)
    calls = Calls()
    with fleetprov.Client(
        endpoint="localhost", port=emulator.port, ca_file=emulator.ca_file, cert_pem=emulator.claim_cert.read_text(),
        claim_signer=claim_signer(claim_key, calls), template_name="DemoTemplate",
        parameters={"SerialNumber": "client"},
    ) as client:
        cert = client.create_keys_and_certificate()
        assert client.register_thing(cert).thing_name == "demo-client"
    assert calls.count == 1


def test_the_device_signer_refuses_an_output_dir(emulator, token, tmp_path):
    claim_key = token.import_claim(emulator)
    public, private = device_key(token.session)
    with pytest.raises(fleetprov.InvalidArgumentError, match="output directory needs the private key"):
        fleetprov.provision(**provision_args(
            emulator, "od", claim_signer=claim_signer(claim_key), device_signer=device_signer(private),
            device_public_key=encode_ec_public_key(public), output_dir=tmp_path / "out",
        ))
    assert device_certificates(emulator) == []


class Boom(Exception):
    pass


def _raise(*_args: object) -> bytes:
    raise Boom("the token is gone")


def _flip(sign):
    """`sign`'s signature with one byte changed."""

    def flipped(*args):
        sig = bytearray(sign(*args))
        sig[5] ^= 0xFF
        return bytes(sig)

    return flipped


# Each row: which signer breaks, how, the exception expected as the SignerError's __cause__ (None:
# the library found the signature wrong itself), and a piece of the SignerError's message.
BROKEN_SIGNERS = [
    ("claim raises", "claim", lambda key, other: _raise, Boom, "claim key's signer"),
    ("claim returns text", "claim", lambda key, other: lambda *a: "sig", TypeError, "claim key's signer"),
    ("claim returns too much", "claim", lambda key, other: lambda *a: bytes(600), ValueError, "claim key's signer"),
    ("claim signs wrongly", "claim", lambda key, other: _flip(claim_signer(key)), None, "verify"),
    ("claim signs with another key", "claim", lambda key, other: claim_signer(other), None, "verify"),
    ("device raises", "device", lambda key, other: _raise, Boom, "signer"),
    ("device returns None", "device", lambda key, other: lambda *a: None, TypeError, "signer"),
    ("device signs with another key", "device", lambda key, other: device_signer(other), None, "verify"),
]


@pytest.mark.parametrize("which, make, cause, message", [r[1:] for r in BROKEN_SIGNERS], ids=[r[0] for r in BROKEN_SIGNERS])
def test_a_broken_signer_is_a_signer_error_and_nothing_is_created(emulator, token, which, make, cause, message):
    claim_key = token.import_claim(emulator)
    public, private = device_key(token.session)
    _other_public, other_private = device_key(token.session, "other")
    claim = make(claim_key, other_private) if which == "claim" else claim_signer(claim_key)
    device = make(private, other_private) if which == "device" else device_signer(private)
    before = _callbacks.registry_size()
    with pytest.raises(fleetprov.SignerError) as info:
        fleetprov.provision(**provision_args(
            emulator, "broken", claim_signer=claim, device_signer=device,
            device_public_key=encode_ec_public_key(public), retry=fleetprov.Retry(max_attempts=3),
        ))
    e = info.value
    assert e.code_name == "FLEETPROV_SIGNER" and not e.retryable
    assert message in e.message, e.message
    if cause is None:
        assert e.__cause__ is None
    else:
        assert isinstance(e.__cause__, cause), repr(e.__cause__)
        if sys.version_info >= (3, 11):  # add_note(): the traceback says it too
            assert any(f"the {which} signer raised {cause.__name__}" in n for n in e.__notes__), e.__notes__
    assert device_certificates(emulator) == []
    assert _callbacks.registry_size() == before


def test_a_signer_error_in_async_carries_the_cause(emulator, token):
    token.import_claim(emulator)
    with fleetprov.provision_async(**provision_args(emulator, "async", claim_signer=_raise)) as op:
        with pytest.raises(fleetprov.SignerError) as info:
            op.result(timeout=WAIT)
    assert isinstance(info.value.__cause__, Boom)
    assert device_certificates(emulator) == []


def test_a_wrong_pin_is_the_pkcs11_error(token):
    t = token.session.token
    token.session.close()  # logged out: a login is per process
    with pytest.raises(pkcs11.PinIncorrect):
        t.open(user_pin="0000")
    token.session = t.open(rw=True, user_pin=PIN)


def _self_signed(key, name: str) -> str:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1)).sign(key, algorithm)
    )
    return cert.public_bytes(serialization.Encoding.PEM).decode()


# Each row: a claim certificate's key the library does not take, and the type its message names.
UNSUPPORTED_CLAIM_KEYS = [
    ("Ed25519", lambda: ed25519.Ed25519PrivateKey.generate(), "Ed25519"),
    ("secp256k1", lambda: ec.generate_private_key(ec.SECP256K1()), "secp256k1"),
    ("RSA-1024", lambda: rsa.generate_private_key(public_exponent=65537, key_size=1024), "1024"),
]


@pytest.mark.parametrize("make, named", [r[1:] for r in UNSUPPORTED_CLAIM_KEYS], ids=[r[0] for r in UNSUPPORTED_CLAIM_KEYS])
def test_an_unsupported_claim_key_type_is_refused_before_connecting(make, named):
    calls = Calls()

    def never(*_args: object) -> bytes:
        calls.count += 1
        return b""

    before = _callbacks.registry_size()
    with pytest.raises(fleetprov.InvalidArgumentError) as info:
        fleetprov.provision(
            endpoint="localhost", port=1, cert_pem=_self_signed(make(), "claim"), claim_signer=never,
            template_name="DemoTemplate",
        )
    assert named in info.value.message and "P-256, P-384 or RSA" in info.value.message, info.value.message
    assert calls.count == 0
    assert _callbacks.registry_size() == before  # the library let go of the signer


def test_resume_after_the_device_signer_failed_at_the_verification(emulator, token, tmp_path):
    claim_key = token.import_claim(emulator)
    public, private = device_key(token.session)
    state = tmp_path / "state"
    works = device_signer(private)
    calls = Calls()

    def fails_second(message: bytes, digest: bytes) -> bytes:
        calls.count += 1
        if calls.count == 2:  # the verification connection's handshake; the first signed the CSR
            raise pkcs11.DeviceRemoved("the token was pulled out")
        return works(message, digest)

    args = provision_args(
        emulator, "resume", claim_signer=claim_signer(claim_key), device_public_key=encode_ec_public_key(public),
        state_dir=state, retry=fleetprov.Retry(max_attempts=1),
    )
    with pytest.raises(fleetprov.SignerError) as info:
        fleetprov.provision(**args, device_signer=fails_second)
    assert isinstance(info.value.__cause__, pkcs11.DeviceRemoved)
    assert calls.count == 2
    assert (state / "journal.json").is_file()
    [first] = device_certificates(emulator)

    result = fleetprov.provision(**args, device_signer=works)
    assert result.resumed and result.certificate_id == first["id"]
    assert [c["id"] for c in device_certificates(emulator)] == [first["id"]]  # one certificate in all
    assert not (state / "journal.json").exists()
    store_certificate(token.session, result.certificate_pem, private)
    assert_stored_and_matching(token, result.certificate_pem)


# Each row: arguments that do not go together (beside a template and an endpoint), the exception
# and a piece of its message. Checked before anything is set up: no signer is left registered.
BAD_ARGUMENTS = [
    ("signer and key", dict(cert_pem="x", key_pem="y", claim_signer=_raise), fleetprov.InvalidArgumentError,
     "claim_signer replaces the claim key"),
    ("signer without certificate", dict(claim_signer=_raise), fleetprov.InvalidArgumentError,
     "claim_signer needs the claim certificate"),
    ("signer and two certificates", dict(cert_pem="x", cert_file="y", claim_signer=_raise),
     fleetprov.InvalidArgumentError, "one of them"),
    ("certificate file missing", dict(cert_file="/nonexistent/claim.pem", claim_signer=_raise),
     fleetprov.InvalidArgumentError, "cannot read the claim certificate file /nonexistent/claim.pem"),
    ("signer not callable", dict(cert_pem="x", claim_signer=b"sig"), TypeError, "claim_signer must be callable"),
    ("certificate only", dict(cert_pem="x"), fleetprov.InvalidArgumentError, "or claim_signer for a key in a token"),
    ("device signer without public key", dict(cert_pem="x", key_pem="y", device_signer=_raise),
     fleetprov.InvalidArgumentError, "device_signer and device_public_key go together"),
    ("public key without signer", dict(cert_pem="x", key_pem="y", device_public_key=b"k"),
     fleetprov.InvalidArgumentError, "go together"),
    ("public key as text", dict(cert_pem="x", key_pem="y", device_signer=_raise, device_public_key="04ab"),
     TypeError, "device_public_key must be bytes"),
    ("device signer not callable", dict(cert_pem="x", key_pem="y", device_signer=1, device_public_key=b"k"),
     TypeError, "device_signer must be callable"),
    ("device signer and CSR", dict(cert_pem="x", key_pem="y", device_signer=_raise, device_public_key=b"k",
                                   csr_pem="csr"), fleetprov.InvalidArgumentError, "csr_pem or device_signer"),
    ("device signer without CSR", dict(cert_pem="x", key_pem="y", device_signer=_raise, device_public_key=b"k",
                                       use_csr=False), fleetprov.InvalidArgumentError, "use_csr=False"),
]


@pytest.mark.parametrize("kwargs, exc, message", [r[1:] for r in BAD_ARGUMENTS], ids=[r[0] for r in BAD_ARGUMENTS])
def test_signer_arguments_are_checked(kwargs, exc, message):
    before = _callbacks.registry_size()
    with pytest.raises(exc, match=message.replace("(", r"\(").replace(")", r"\)")):
        fleetprov.provision(endpoint="localhost", template_name="DemoTemplate", **kwargs)
    assert _callbacks.registry_size() == before


def test_a_public_key_the_library_cannot_read_is_refused(emulator):
    before = _callbacks.registry_size()
    with pytest.raises(fleetprov.InvalidArgumentError, match="public key"):
        fleetprov.provision(**emulator.kwargs(
            template_name="DemoTemplate", device_signer=_raise, device_public_key=b"\x04" + bytes(10),
        ))
    assert _callbacks.registry_size() == before


# --- through the example -----------------------------------------------------------------------


def _run(tok: Token, *args: str, pin: str = PIN) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(EXAMPLE), "--module", MODULE, "--token", "T", "--pin-env", "TOKEN_PIN", *args],
        env=tok.env(TOKEN_PIN=pin), capture_output=True, text=True, timeout=WAIT,
    )


def _example_args(emulator: Emulator, serial: str, *extra: str) -> list[str]:
    return [
        "--cert", str(emulator.claim_cert), "--ca", str(emulator.ca_file), "--endpoint", "localhost",
        "--port", str(emulator.port), "--template", "DemoTemplate", "--param", f"SerialNumber={serial}", *extra,
    ]


@pytest.mark.parametrize("payload_format", ["json", "cbor"])
def test_example_provisions_with_both_keys_in_the_token(emulator, token, tmp_path, payload_format):
    token.import_claim(emulator)
    serial = f"ex-{payload_format}"
    r = _run(token, *_example_args(emulator, serial, "--format", payload_format, "--state-dir", str(tmp_path / "st")))
    assert r.returncode == 0, r.stderr
    assert f"thing name: demo-{serial}" in r.stdout
    assert "device key 'device': generated in the token" in r.stderr
    assert "certificate stored in token 'T' as 'device'" in r.stdout
    [cert] = device_certificates(emulator)
    assert f"certificate id: {cert['id']}" in r.stdout
    pem = ssl.DER_cert_to_PEM_cert(bytes(token.certificates()[0][Attribute.VALUE]))
    assert_stored_and_matching(token, pem)
    assert "PRIVATE KEY" not in r.stdout + r.stderr
    assert not (tmp_path / "st" / "journal.json").exists()  # the journal is gone once committed

    # Again: the same key pair, a new certificate in place of the old one.
    r = _run(token, *_example_args(emulator, serial, "--format", payload_format))
    assert r.returncode == 0, r.stderr
    assert "device key 'device': found in the token" in r.stderr
    assert len(device_certificates(emulator)) == 2
    assert len(token.certificates()) == 1
    assert_stored_and_matching(token, ssl.DER_cert_to_PEM_cert(bytes(token.certificates()[0][Attribute.VALUE])))


def test_example_wrong_pin(emulator, token):
    token.import_claim(emulator)
    r = _run(token, *_example_args(emulator, "pin"), pin="98765")
    assert r.returncode == 1
    assert "pkcs11: wrong PIN for token 'T' (PinIncorrect)" in r.stderr
    assert "98765" not in r.stdout + r.stderr
    assert device_certificates(emulator) == []


def test_example_unsupported_claim_certificate(emulator, token, tmp_path):
    token.import_claim(emulator)
    cert = tmp_path / "ed25519.pem"
    cert.write_text(_self_signed(ed25519.Ed25519PrivateKey.generate(), "claim"))
    args = _example_args(emulator, "ed")
    args[1] = str(cert)
    r = _run(token, *args)
    assert r.returncode == 1
    assert "error (FLEETPROV_INVALID_ARGUMENT)" in r.stderr and "Ed25519" in r.stderr, r.stderr
    assert device_certificates(emulator) == []


def test_example_missing_claim_key(emulator, token):
    r = _run(token, *_example_args(emulator, "nokey"))
    assert r.returncode == 1
    assert "pkcs11: token 'T' has no private key labelled 'claim'" in r.stderr


@pytest.fixture
def rsa_claim(tmp_path: Path, token: Token):
    """Starts an emulator whose claim certificate is for an RSA-2048 key made in the token
    (label "claim"): ``rsa_claim(tls12_only)`` -> Emulator."""
    gens = []

    def make(tls12_only: bool) -> Emulator:
        sub = tmp_path / "rsa"
        sub.mkdir()
        first = _start(sub, [])
        emu = next(first)  # makes the data directory: the CA
        first.close()
        public, _private = token.session.generate_keypair(
            KeyType.RSA, 2048, id=b"\x01", label="claim", store=True,
            private_template={Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False, Attribute.SIGN: True},
        )
        numbers = rsa.RSAPublicNumbers(
            int.from_bytes(public[Attribute.PUBLIC_EXPONENT], "big"), int.from_bytes(public[Attribute.MODULUS], "big")
        )
        ca_cert = x509.load_pem_x509_certificate(emu.ca_file.read_bytes())
        ca_key = serialization.load_pem_private_key((emu.data_dir / "ca.key").read_bytes(), None)
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fleetprov claim")]))
            .issuer_name(ca_cert.subject).public_key(numbers.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA256())
        )
        emu.claim_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))  # registered when it starts
        emu.claim_key.write_text("in the token\n")
        again = _start(sub, [], ("--tls12-only",) if tls12_only else ())
        gens.append(again)
        return next(again)

    yield make
    for gen in gens:
        gen.close()


@pytest.mark.parametrize("tls12_only", [False, True], ids=["tls13-pss", "tls12-pkcs1"])
def test_example_with_an_rsa_claim_key(rsa_claim, token, tls12_only):
    emu = rsa_claim(tls12_only)
    r = _run(token, *_example_args(emu, f"rsa-{int(tls12_only)}"))
    assert r.returncode == 0, r.stderr
    assert f"thing name: demo-rsa-{int(tls12_only)}" in r.stdout
    assert_stored_and_matching(token, ssl.DER_cert_to_PEM_cert(bytes(token.certificates()[0][Attribute.VALUE])))


def test_an_interrupt_in_a_signer_stays_an_interrupt(emulator):
    """Ctrl-C while a signer runs is raised as such (the flow stopped), not as a SignerError."""

    def interrupted(*_args: object) -> bytes:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt) as info:
        fleetprov.provision(**provision_args(emulator, "interrupted", claim_signer=interrupted))
    assert isinstance(info.value.__cause__, fleetprov.FleetprovError)
    assert device_certificates(emulator) == []


def test_rotation_with_both_keys_in_the_token(emulator, token):
    """The device's current key signs the connection, the new key (made in the token) the CSR
    and the verification; the caller stores the new certificate."""
    claim_key = token.import_claim(emulator)
    public, private = device_key(token.session)
    first = fleetprov.provision(**provision_args(
        emulator, "rot", claim_signer=claim_signer(claim_key), device_signer=device_signer(private),
        device_public_key=encode_ec_public_key(public),
    ))
    store_certificate(token.session, first.certificate_pem, private)
    new_public, new_private = device_key(token.session, "device-next")
    old_calls, new_calls = Calls(), Calls()
    second = fleetprov.provision(
        endpoint="localhost", port=emulator.port, ca_file=emulator.ca_file, cert_pem=first.certificate_pem,
        claim_signer=claim_signer(private, old_calls), client_id=first.thing_name,
        template_name="RotationTemplate", parameters={"ThingName": first.thing_name},
        device_signer=device_signer(new_private, new_calls), device_public_key=encode_ec_public_key(new_public),
    )
    assert second.thing_name == first.thing_name
    assert second.certificate_id != first.certificate_id
    assert (old_calls.count, new_calls.count) == (1, 2)
    store_certificate(token.session, second.certificate_pem, new_private, "device-next")
    assert_stored_and_matching(token, second.certificate_pem, "device-next")
