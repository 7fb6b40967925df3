#!/usr/bin/env python3
"""Provision a device whose keys never leave a PKCS#11 token (an HSM, a smart card, SoftHSM2).

    python examples/python/provision_pkcs11.py --module /usr/lib/softhsm/libsofthsm2.so \
        --token T --pin-env TOKEN_PIN --claim-label claim --device-label device \
        --cert DIR/claim.pem --ca DIR/ca.pem --endpoint localhost --port 8883 \
        --template DemoTemplate --param SerialNumber=0001 --state-dir ./provisioning

The claim certificate's key is the token's private key labelled --claim-label: it signs the
claim connection's TLS handshake (EC: CKM_ECDSA over the digest; RSA: CKM_SHA256_RSA_PKCS_PSS
for TLS 1.3, CKM_SHA256_RSA_PKCS for TLS 1.2). The device key is the token's key pair labelled
--device-label, generated there (EC P-256, sensitive, not extractable) unless it exists: it
signs the CSR and the handshake of the connection that checks the new certificate (CKM_ECDSA
over the digest). The issued certificate is stored in the token as an X.509 certificate object
with the device key's id and label. No private key is ever in this process or in a file.

With --state-dir, a run that fails after the certificate was created leaves a resume journal
there (it holds no key: the key is in the token); the next run, which finds the same key pair
in the token, resumes with that certificate instead of creating another.

Needs python-pkcs11 (pip install python-pkcs11) and the fleetprov package (pip install
./bindings/python; FLEETPROV_LIBRARY=/path/to/libfleetprov.so loads another library).
"""

from __future__ import annotations

import argparse
import getpass
import logging
import os
import ssl
import sys
from typing import Any, Callable, Optional

import pkcs11
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11.util.ec import encode_ec_public_key, encode_named_curve_parameters
from pkcs11.util.x509 import decode_x509_certificate

import fleetprov

# PKCS#11 mechanism parameters for RSASSA-PSS as TLS 1.3 uses it: SHA-256, MGF1-SHA-256, salt 32.
PSS_SHA256 = (Mechanism.SHA256, pkcs11.MGF.SHA256, 32)

# Key objects are typed Any: python-pkcs11's concrete key classes have sign(), its PrivateKey
# type does not say so.


def parse_param(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def claim_signer(key: Any) -> fleetprov.ClaimSigner:
    """Signs the claim connection's handshake with `key`, a private key object in the token."""
    key_type = key.key_type

    def sign(scheme: fleetprov.SignatureScheme, message: bytes, digest: bytes) -> bytes:
        if key_type == KeyType.EC and scheme in (
            fleetprov.SignatureScheme.ECDSA_P256_SHA256,
            fleetprov.SignatureScheme.ECDSA_P384_SHA384,
        ):
            return bytes(key.sign(digest, mechanism=Mechanism.ECDSA))  # raw r || s
        if key_type == KeyType.RSA and scheme == fleetprov.SignatureScheme.RSA_PSS_SHA256:
            return bytes(key.sign(message, mechanism=Mechanism.SHA256_RSA_PKCS_PSS, mechanism_param=PSS_SHA256))
        if key_type == KeyType.RSA and scheme == fleetprov.SignatureScheme.RSA_PKCS1_SHA256:
            return bytes(key.sign(message, mechanism=Mechanism.SHA256_RSA_PKCS))
        raise ValueError(f"the claim key is a {key_type.name} key: it cannot sign {scheme.name}")

    return sign


def device_signer(key: Any) -> fleetprov.DeviceSigner:
    """Signs the CSR and the verification handshake with `key`, the device's private key."""

    def sign(message: bytes, digest: bytes) -> bytes:
        return bytes(key.sign(digest, mechanism=Mechanism.ECDSA))  # raw r || s

    return sign


def device_key_pair(session: pkcs11.Session, label: str) -> tuple[Any, Any, bool]:
    """(public key, private key, made now): the pair labelled `label`, generated in the token
    (P-256, on the token, private, sensitive, never extractable) if there is none."""
    try:
        private = session.get_key(object_class=ObjectClass.PRIVATE_KEY, label=label)
    except pkcs11.NoSuchKey:
        pass
    else:
        if private.key_type != KeyType.EC:
            raise ValueError(f"the token's key {label!r} is a {private.key_type.name} key, not an EC one")
        public = session.get_key(object_class=ObjectClass.PUBLIC_KEY, id=private[Attribute.ID])
        return public, private, False
    params = session.create_domain_parameters(
        KeyType.EC, {Attribute.EC_PARAMS: encode_named_curve_parameters("secp256r1")}, local=True
    )
    public, private = params.generate_keypair(
        id=os.urandom(16),
        label=label,
        store=True,  # CKA_TOKEN: kept in the token, for the certificate and for a resumed run
        public_template={Attribute.VERIFY: True},
        private_template={
            Attribute.PRIVATE: True,
            Attribute.SENSITIVE: True,
            Attribute.EXTRACTABLE: False,
            Attribute.SIGN: True,
        },
    )
    return public, private, True


def claim_certificate(session: pkcs11.Session, path: Optional[str], label: str) -> str:
    """The claim certificate PEM: the file `path`, else the token's certificate labelled `label`."""
    if path is not None:
        with open(path, encoding="utf-8") as f:
            return f.read()
    try:
        cert = next(session.get_objects({Attribute.CLASS: ObjectClass.CERTIFICATE, Attribute.LABEL: label}))
    except StopIteration:
        raise ValueError(f"no --cert given, and the token has no certificate labelled {label!r}") from None
    return ssl.DER_cert_to_PEM_cert(bytes(cert[Attribute.VALUE]))


def store_certificate(session: pkcs11.Session, certificate_pem: str, key: Any, label: str) -> None:
    """Stores the issued certificate in the token next to `key` (same CKA_ID and label),
    replacing an older one with that label."""
    der = ssl.PEM_cert_to_DER_cert(certificate_pem)
    for old in list(session.get_objects({Attribute.CLASS: ObjectClass.CERTIFICATE, Attribute.LABEL: label})):
        old.destroy()
    attrs = decode_x509_certificate(der)
    attrs.update({Attribute.TOKEN: True, Attribute.PRIVATE: False, Attribute.LABEL: label,
                  Attribute.ID: key[Attribute.ID]})
    session.create_object(attrs)


def read_pin(args: argparse.Namespace, fail: Callable[[str], Any]) -> str:
    if args.pin is not None:
        return str(args.pin)
    if args.pin_env is not None:
        pin = os.environ.get(args.pin_env)
        if pin is None:
            fail(f"--pin-env {args.pin_env}: the variable is not set")
        return str(pin)
    if not sys.stdin.isatty():
        fail("give --pin or --pin-env (no terminal to ask on)")
    return getpass.getpass("token PIN: ")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--module", required=True, help="PKCS#11 module (e.g. /usr/lib/softhsm/libsofthsm2.so)")
    p.add_argument("--token", required=True, help="token label")
    pin = p.add_mutually_exclusive_group()
    pin.add_argument("--pin", help="user PIN (visible to other users in the process list: prefer --pin-env)")
    pin.add_argument("--pin-env", metavar="VAR", help="read the user PIN from environment variable VAR")
    p.add_argument("--claim-label", default="claim", help="label of the claim key in the token (default claim)")
    p.add_argument("--device-label", default="device",
                   help="label of the device key pair and certificate in the token (default device)")
    p.add_argument("--cert", help="claim certificate PEM file (default: the token's certificate with --claim-label)")
    p.add_argument("--endpoint", required=True, help="AWS IoT data endpoint (host name)")
    p.add_argument("--port", type=int, default=8883, help="MQTT over TLS port (default 8883)")
    p.add_argument("--ca", help="CA certificates PEM file (default: system roots)")
    p.add_argument("--template", required=True, help="provisioning template name")
    p.add_argument("--param", action="append", type=parse_param, default=[], metavar="KEY=VALUE",
                   help="template parameter (repeatable)")
    p.add_argument("--format", choices=["json", "cbor"], default="json", help="payload format")
    p.add_argument("--state-dir", metavar="DIR",
                   help="keep the resume journal here, so that a failed run can be resumed")
    p.add_argument("--client-id", help="MQTT client id")
    p.add_argument("--timeout", type=float, default=60.0, help="overall timeout, seconds")
    p.add_argument("-v", "--verbose", action="count", default=0, help="-v: info logs, -vv: debug logs")
    args = p.parse_args(argv)
    user_pin = read_pin(args, p.error)

    level = logging.WARNING if args.verbose == 0 else logging.INFO if args.verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    def progress(report: fleetprov.Progress) -> None:
        if args.verbose or report.step == fleetprov.Step.RETRYING:
            step = report.step.name.lower().replace("_", " ")
            print(f"  .. {step}" + (f" ({report.error})" if report.error else ""), file=sys.stderr)

    # The token: any failure here is PKCS#11's, reported by its exception's name (never the PIN).
    try:
        token = pkcs11.lib(args.module).get_token(token_label=args.token)
        session = token.open(rw=True, user_pin=user_pin)
    except pkcs11.PinIncorrect:
        print(f"pkcs11: wrong PIN for token {args.token!r} (PinIncorrect)", file=sys.stderr)
        return 1
    except pkcs11.NoSuchToken:
        print(f"pkcs11: no token labelled {args.token!r} in {args.module}", file=sys.stderr)
        return 1
    except (pkcs11.PKCS11Error, RuntimeError, OSError) as e:  # a module that does not load, ...
        print(f"pkcs11: {args.module}, token {args.token!r}: {type(e).__name__} {e}".rstrip(), file=sys.stderr)
        return 1

    with session:
        try:
            try:
                claim_key = session.get_key(object_class=ObjectClass.PRIVATE_KEY, label=args.claim_label)
            except pkcs11.NoSuchKey:
                raise ValueError(f"token {args.token!r} has no private key labelled {args.claim_label!r}") from None
            claim_pem = claim_certificate(session, args.cert, args.claim_label)
            public, private, made = device_key_pair(session, args.device_label)
            public_key = encode_ec_public_key(public)  # SubjectPublicKeyInfo, DER
        except ValueError as e:
            print(f"pkcs11: {e}", file=sys.stderr)
            return 1
        except (pkcs11.PKCS11Error, OSError) as e:
            print(f"pkcs11: {type(e).__name__}: {e}".rstrip(": "), file=sys.stderr)
            return 1
        what = "generated in the token" if made else "found in the token"
        print(f"device key {args.device_label!r}: {what} (id {bytes(private[Attribute.ID]).hex()})", file=sys.stderr)

        try:
            result = fleetprov.provision(
                endpoint=args.endpoint,
                port=args.port,
                ca_file=args.ca,
                cert_pem=claim_pem,
                claim_signer=claim_signer(claim_key),
                device_signer=device_signer(private),
                device_public_key=public_key,
                template_name=args.template,
                parameters=dict(args.param),
                payload_format=args.format,
                state_dir=args.state_dir,
                timeout=args.timeout,
                client_id=args.client_id,
                on_progress=progress,
            )
        except fleetprov.FleetprovError as e:
            if isinstance(e, fleetprov.RejectedError):
                print(f"rejected: {e.status_code} {e.error_code}: {e.error_message}", file=sys.stderr)
            else:
                print(f"error ({e.code_name}): {e}", file=sys.stderr)
            if e.__cause__ is not None:
                print(f"caused by: {type(e.__cause__).__name__}: {e.__cause__}".rstrip(": "), file=sys.stderr)
            if args.state_dir and os.path.isfile(os.path.join(args.state_dir, "journal.json")):
                print(f"the new certificate is kept in {args.state_dir}: run again to resume", file=sys.stderr)
            return 2 if isinstance(e, fleetprov.RejectedError) else 1

        try:
            store_certificate(session, result.certificate_pem, private, args.device_label)
        except pkcs11.PKCS11Error as e:
            print(f"pkcs11: storing the certificate: {type(e).__name__} {e}".rstrip(), file=sys.stderr)
            print(result.certificate_pem, end="")  # not lost: the service has registered it
            return 1

    print(f"thing name: {result.thing_name}")
    print(f"certificate id: {result.certificate_id}")
    if result.resumed:
        print(f"resumed the certificate from the journal in {args.state_dir}")
    if result.attempts > 1:
        print(f"attempts: {result.attempts}")
    print(f"certificate stored in token {args.token!r} as {args.device_label!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
