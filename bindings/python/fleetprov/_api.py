"""The Pythonic API: provision(), provision_async(), Client, and their result types."""

from __future__ import annotations

import atexit
import concurrent.futures
import contextlib
import ctypes
import enum
import os
import threading
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Generator, List, Mapping, Optional, Tuple, TypeVar, Union

from . import _callbacks
from ._callbacks import CallbackSlot
from ._ffi import ProgressStruct, lib
from .errors import (
    ClosedError,
    FleetprovError,
    InvalidArgumentError,
    check,
    error_from_handle,
    last_error,
)

StrPath = Union[str, "os.PathLike[str]"]
_T = TypeVar("_T")
_C = TypeVar("_C", bound="_Closeable")

# The defaults of the keyword arguments that provision(), provision_async(), rotate(), Client,
# HostFlow and provision_with_paho() share: in their signatures, from here only.
DEFAULT_PORT = 8883
DEFAULT_FORMAT = "json"
DEFAULT_TIMEOUT: Optional[float] = 60.0
DEFAULT_STEP_TIMEOUT = 10.0
DEFAULT_KEY_TYPE = "p256"

#: The attribute an exception carries when the flow it interrupted had already committed its
#: credentials: the :class:`ProvisionResult` (see :func:`provision`).
RESULT_ATTRIBUTE = "fleetprov_result"


class Step(enum.IntEnum):
    """Steps reported to the progress callback (fleetprov_step)."""

    CONNECTING = 0
    SUBSCRIBING = 1
    SUBSCRIBED = 2
    CREATING_CERTIFICATE = 3
    CERTIFICATE_CREATED = 4
    REGISTERING = 5
    REGISTERED = 6
    VERIFYING = 7
    VERIFIED = 8
    #: A certificate from the resume journal in ``state_dir`` is taken up (first step reported).
    RESUMING = 9
    #: The journal's certificate cannot be used (its ownership token expired, or it was refused
    #: and the certificate is not active): a new certificate is made.
    RESTARTING = 10
    #: An attempt failed with a retryable error; the next starts after ``Progress.retry_in``.
    RETRYING = 11
    #: The credentials are written and the journal removed.
    COMMITTED = 12


class Format(enum.IntEnum):
    """Payload format of requests and replies (fleetprov_format)."""

    JSON = 0
    CBOR = 1


class KeyType(enum.IntEnum):
    """Key generated on the device for the CSR flow (fleetprov_key_type)."""

    P256 = 0
    P384 = 1


class _Method(enum.IntEnum):
    CSR = 0
    CREATE_KEYS = 1
    EXTERNAL_CSR = 2
    EXTERNAL_SIGNER = 3


class SignatureScheme(enum.IntEnum):
    """The signature a ``claim_signer`` is asked for (fleetprov_signature_scheme): the claim
    key's type decides it (ECDSA for P-256 and P-384 keys; for RSA keys PSS with TLS 1.3,
    PKCS#1 v1.5 with TLS 1.2). With PKCS#11, what to sign with:"""

    #: ECDSA on P-256 with SHA-256: ``CKM_ECDSA`` over the digest. DER (ECDSA-Sig-Value) or raw
    #: ``r || s`` (64 bytes).
    ECDSA_P256_SHA256 = 1
    #: ECDSA on P-384 with SHA-384: ``CKM_ECDSA`` over the digest. DER or raw ``r || s`` (96 bytes).
    ECDSA_P384_SHA384 = 2
    #: RSASSA-PKCS1-v1_5 with SHA-256 (TLS 1.2): ``CKM_SHA256_RSA_PKCS`` over the message, or
    #: ``CKM_RSA_PKCS`` over the DER DigestInfo of the digest. As long as the modulus.
    RSA_PKCS1_SHA256 = 3
    #: RSASSA-PSS with SHA-256, MGF1-SHA-256 and a 32-byte salt (TLS 1.3):
    #: ``CKM_SHA256_RSA_PKCS_PSS`` over the message, or ``CKM_RSA_PKCS_PSS`` over the digest.
    #: As long as the modulus.
    RSA_PSS_SHA256 = 4


_BytesLike = Union[bytes, bytearray, memoryview]

#: What a signer may return: the signature.
Signature = _BytesLike

#: ``claim_signer(scheme, message, digest) -> signature``: signs one TLS handshake
#: (CertificateVerify) with the claim certificate's key, which stays in a token. ``message`` is
#: what to sign, ``digest`` its hash under the scheme (SHA-256, or SHA-384 for P-384), for
#: signers that take a digest. Return the signature (see :class:`SignatureScheme` for its
#: form); raise to refuse (the call then fails with :class:`SignerError`, your exception as
#: its ``__cause__``).
ClaimSigner = Callable[[SignatureScheme, bytes, bytes], Signature]

#: ``device_signer(message, digest) -> signature``: ECDSA with the device key (P-256 with
#: SHA-256, P-384 with SHA-384) over ``message``, whose hash ``digest`` is given for signers that
#: take a digest (PKCS#11 ``CKM_ECDSA``). Return DER (ECDSA-Sig-Value) or raw ``r || s``; raise
#: to refuse (:class:`SignerError`, your exception as its ``__cause__``).
DeviceSigner = Callable[[bytes, bytes], Signature]


class _LogLevel(enum.IntEnum):
    ERROR = 1
    WARN = 2
    INFO = 3
    DEBUG = 4


@dataclass(frozen=True)
class Progress:
    """A step reached, as given to ``on_progress``.

    ``step`` is the :class:`Step` (a plain int for a value this binding does not know);
    ``attempt`` the attempt it belongs to, from 1, growing with each retry. With
    :attr:`Step.RETRYING`, ``retry_in`` is the pause in seconds before the next attempt and
    ``error`` why the attempt failed: the :class:`FleetprovError` subclass the binding raises for
    that result code, with all its fields (e.g. a :class:`RejectedError` with ``status_code``
    429). Both are None for every other step.
    """

    step: Step
    attempt: int
    retry_in: Optional[float] = None
    error: Optional[FleetprovError] = None

    @classmethod
    def _from_c(cls, raw: ProgressStruct) -> "Progress":
        """Copies a borrowed struct fleetprov_progress (its error included) during the callback."""
        step: Any
        try:
            step = Step(raw.step)
        except ValueError:
            step = int(raw.step)
        error = None
        if raw.error:
            error = error_from_handle(int(lib.fleetprov_error_result(raw.error)), raw.error)
        retry_in = raw.retry_in_ms / 1000.0 if step == Step.RETRYING else None
        return cls(step=step, attempt=int(raw.attempt), retry_in=retry_in, error=error)


ProgressCallback = Callable[[Progress], None]


# --- results -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProvisionResult:
    """The outcome of the one-call flow.

    ``private_key_pem`` is None when the key is not the library's: a CSR supplied from outside
    (``csr_pem=``) or a key behind ``device_signer=``;
    ``output_dir`` is None unless ``output_dir=`` was given. The key is left out of ``repr``.
    ``attempts`` is how many attempts it took (1 when nothing was retried); ``resumed`` is True
    when the certificate came from the resume journal in ``state_dir`` (an earlier call created
    it). ``already_provisioned`` is True when ``output_dir`` already held the complete
    credentials of an earlier call: they were returned as they are, with no connection and no new
    certificate (``attempts`` 0; pass ``reprovision=True`` to make a new one).
    ``registration_confirmed`` is False in one case only: RegisterThing refused the token after an
    earlier attempt had sent it and lost the reply, and the certificate could not be tried (its
    key is not the library's): the registration is known only from the certificate being
    active. ``thing_name`` is then None (unknown) and ``device_configuration`` empty; otherwise
    ``thing_name`` is the registered thing's name.
    """

    thing_name: Optional[str]
    certificate_id: str
    device_configuration: dict[str, str]
    certificate_pem: str = field(repr=False)
    private_key_pem: Optional[str] = field(repr=False)
    output_dir: Optional[Path]
    attempts: int = 1
    resumed: bool = False
    already_provisioned: bool = False
    registration_confirmed: bool = True


@dataclass(frozen=True)
class Registration:
    """The accepted reply of RegisterThing."""

    thing_name: str
    device_configuration: dict[str, str]


def _s(raw: Optional[bytes]) -> Optional[str]:
    return None if raw is None else raw.decode("utf-8", "replace")


def _entries(entry_fn: Callable[..., int], count_fn: Callable[[Any], int], handle: int) -> dict[str, str]:
    out: dict[str, str] = {}
    for i in range(count_fn(handle)):
        k = ctypes.c_char_p()
        v = ctypes.c_char_p()
        check(entry_fn(handle, i, ctypes.byref(k), ctypes.byref(v)))
        out[_s(k.value) or ""] = _s(v.value) or ""
    return out


def _taken(out: ctypes.c_void_p) -> int:
    """The handle a successful call wrote to its output parameter."""
    value = out.value
    if not value:  # pragma: no cover - the library writes outputs on success
        raise RuntimeError("libfleetprov reported success without an output")
    return value


def _provisioned_to_result(handle: int) -> ProvisionResult:
    """Copies everything out of a fleetprov_provisioned (the caller frees it)."""
    out_dir = _s(lib.fleetprov_provisioned_output_dir(handle))
    return ProvisionResult(
        thing_name=_s(lib.fleetprov_provisioned_thing_name(handle)) or None,
        certificate_id=_s(lib.fleetprov_provisioned_certificate_id(handle)) or "",
        device_configuration=_entries(
            lib.fleetprov_provisioned_config_entry, lib.fleetprov_provisioned_config_count, handle
        ),
        certificate_pem=_s(lib.fleetprov_provisioned_certificate_pem(handle)) or "",
        private_key_pem=_s(lib.fleetprov_provisioned_private_key(handle)),
        output_dir=Path(out_dir) if out_dir is not None else None,
        attempts=int(lib.fleetprov_provisioned_attempts(handle)),
        resumed=bool(lib.fleetprov_provisioned_resumed(handle)),
        already_provisioned=bool(lib.fleetprov_provisioned_already_provisioned(handle)),
        registration_confirmed=bool(lib.fleetprov_provisioned_registration_confirmed(handle)),
    )


# --- argument conversion ---------------------------------------------------------------------


def _cstr(value: Any, name: str) -> bytes:
    """UTF-8 bytes for a str or path argument; TypeError / InvalidArgumentError otherwise."""
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if isinstance(value, bytes):
        raise TypeError(f"{name} must be str, not bytes")
    if not isinstance(value, str):
        raise TypeError(f"{name} must be str, not {type(value).__name__}")
    if "\0" in value:
        raise InvalidArgumentError(f"{name} contains a NUL character", code=1)
    return value.encode("utf-8")


def _opt_cstr(value: Any, name: str) -> Optional[bytes]:
    return None if value is None else _cstr(value, name)


def _int_arg(value: Any, name: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be int, not {type(value).__name__}")
    if not lo <= value <= hi:
        raise InvalidArgumentError(f"{name} must be between {lo} and {hi}, got {value}", code=1)
    return value


def _ms(value: Any, name: str, allow_none: bool) -> int:
    if value is None and allow_none:
        return 0
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds, not {type(value).__name__}")
    ms = round(value * 1000)
    if value < 0 or ms > 0xFFFFFFFF:
        raise InvalidArgumentError(f"{name} out of range: {value}", code=1)
    if value > 0 and ms == 0:
        ms = 1
    return ms


def _enum_arg(value: Any, enum_cls: type[enum.IntEnum], name: str, aliases: Mapping[str, int]) -> int:
    if isinstance(value, enum_cls):
        return int(value)
    if isinstance(value, str) and value.lower() in aliases:
        return aliases[value.lower()]
    choices = ", ".join(repr(a) for a in aliases)
    if isinstance(value, str):
        raise InvalidArgumentError(f"{name} must be one of {choices}, got {value!r}", code=1)
    raise TypeError(f"{name} must be one of {choices} or a {enum_cls.__name__}, not {type(value).__name__}")


# --- retry policy ----------------------------------------------------------------------------


def _u32_ms(value: Any, name: str) -> int:
    """Milliseconds (a C uint32) for a non-negative number of seconds."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds, not {type(value).__name__}")
    if not value >= 0:  # also NaN
        raise InvalidArgumentError(f"{name} must not be negative, got {value}", code=1)
    if value * 1000 > 0xFFFFFFFF:  # also infinity
        raise InvalidArgumentError(f"{name} too large: {value}", code=1)
    return round(value * 1000)


@dataclass(frozen=True)
class Retry:
    """How the one-call flow retries retryable failures (connection trouble, timeouts, 429 and
    5xx rejections; never other rejections).

    At most ``max_attempts`` attempts in all (1: no retries); the pause after the first failure
    is ``initial_backoff`` seconds, doubling up to ``max_backoff``, each drawn between half and
    all of that (jitter), never under 25 ms and never past the overall ``timeout``.
    ``Retry()`` is the library's default. Checked on construction: ``max_attempts`` below 1 or
    ``max_backoff`` below ``initial_backoff`` raise :class:`InvalidArgumentError`.
    """

    max_attempts: int = 5
    initial_backoff: float = 1.0
    max_backoff: float = 30.0

    def __post_init__(self) -> None:
        _int_arg(self.max_attempts, "max_attempts", 1, 0xFFFFFFFF)
        initial = _u32_ms(self.initial_backoff, "initial_backoff")
        maximum = _u32_ms(self.max_backoff, "max_backoff")
        if maximum < initial:
            raise InvalidArgumentError(
                f"max_backoff ({self.max_backoff}) is below initial_backoff ({self.initial_backoff})", code=1
            )

    def _c_args(self) -> tuple[int, int, int]:
        """(max_attempts, initial_backoff_ms, max_backoff_ms) for fleetprov_config_set_retry."""
        return (
            self.max_attempts,
            _u32_ms(self.initial_backoff, "initial_backoff"),
            _u32_ms(self.max_backoff, "max_backoff"),
        )


class _Closeable:
    """Context-manager lifetime for objects owning a library handle: ``with`` and garbage
    collection both call ``close()``, which subclasses make idempotent."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self: _C) -> _C:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def _check_callable(value: Any, name: str) -> None:
    if value is not None and not callable(value):
        raise TypeError(f"{name} must be callable or None")


class _Config:
    """Owns a fleetprov_config for the time it takes to build a client or start a call."""

    def __init__(self) -> None:
        handle = ctypes.c_void_p()
        check(lib.fleetprov_config_new(ctypes.byref(handle)))
        self.handle: Optional[int] = handle.value

    def __enter__(self) -> "_Config":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.free()

    def free(self) -> None:
        handle, self.handle = self.handle, None
        if handle:
            lib.fleetprov_config_free(handle)


# fleetprov_mqtt_version values: the protocol level byte of each version's CONNECT.
_MQTT_VERSIONS = {5: 5, "5": 5, "3.1.1": 4}


def _cert_text(cert_file: Optional[StrPath], cert_pem: Optional[str]) -> bytes:
    """The claim certificate PEM for a claim signer (the library takes it as text): ``cert_pem``,
    or ``cert_file`` read here (InvalidArgumentError when it cannot be)."""
    if cert_pem is not None:
        return _cstr(cert_pem, "cert_pem")
    path = _cstr(cert_file, "cert_file").decode("utf-8")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidArgumentError(f"cannot read the claim certificate file {path}: {e}", code=1) from e
    return _cstr(text, "cert_file's content")


def _mqtt_version(value: Union[int, str, None]) -> Optional[int]:
    """``mqtt_version``: None (the library's default, MQTT 5), 5 or "5", or "3.1.1"."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise TypeError(f"mqtt_version must be 5 or \"3.1.1\", not {type(value).__name__}")
    if value not in _MQTT_VERSIONS:
        raise InvalidArgumentError(f"unknown MQTT version {value!r}: use 5 or \"3.1.1\"", code=1)
    return _MQTT_VERSIONS[value]


def _build_config(
    *,
    endpoint: Optional[str],
    port: int,
    ca_file: Optional[StrPath],
    ca_pem: Optional[str],
    cert_file: Optional[StrPath],
    key_file: Optional[StrPath],
    cert_pem: Optional[str],
    key_pem: Optional[str],
    template_name: Optional[str],
    parameters: Optional[Mapping[str, str]],
    payload_format: Union[str, Format],
    timeout: Optional[float],
    step_timeout: float,
    client_id: Optional[str],
    keep_alive: Optional[int],
    alpn: Optional[bool],
    on_progress: Optional[ProgressCallback],
    method: Optional[int] = None,
    mqtt_version: Union[int, str, None] = None,
    key_type: Union[str, KeyType, None] = None,
    csr_pem: Optional[str] = None,
    verify: Optional[bool] = None,
    output_dir: Optional[StrPath] = None,
    state_dir: Optional[StrPath] = None,
    retry: Optional[Retry] = None,
    token_lifetime: Optional[int] = None,
    reprovision: bool = False,
    claim: bool = True,
    host_transport: bool = False,
    claim_signer: Optional[ClaimSigner] = None,
    device_signer: Optional[DeviceSigner] = None,
    device_public_key: Optional[_BytesLike] = None,
) -> tuple[_Config, CallbackSlot]:
    """Validates every argument in Python first (TypeError for wrong types), then fills a
    fleetprov_config (library errors become FleetprovError subclasses).

    ``claim=False`` is for flows that connect with other credentials (rotation: the device's
    own; a host transport: the host's), where claim credentials are refused. With
    ``host_transport`` the endpoint may be None (left unset)."""
    host = None if endpoint is None and host_transport else _cstr(endpoint, "endpoint")
    port_v = _int_arg(port, "port", 1, 65535)
    ca_file_b = _opt_cstr(ca_file, "ca_file")
    ca_pem_b = _opt_cstr(ca_pem, "ca_pem")
    if ca_file_b is not None and ca_pem_b is not None:
        raise InvalidArgumentError("give ca_file or ca_pem, not both", code=1)
    claim_v: Optional[tuple[bytes, bytes, bool]] = None
    claim_signer_cert: Optional[bytes] = None
    if claim_signer is not None:
        if not claim:
            raise InvalidArgumentError("claim credentials are not taken here: no claim_signer", code=1)
        if not callable(claim_signer):
            raise TypeError(f"claim_signer must be callable, not {type(claim_signer).__name__}")
        if key_file is not None or key_pem is not None:
            raise InvalidArgumentError(
                "claim_signer replaces the claim key: give cert_file or cert_pem without key_file/key_pem", code=1
            )
        if (cert_file is None) == (cert_pem is None):
            raise InvalidArgumentError(
                "claim_signer needs the claim certificate: cert_file or cert_pem (one of them)", code=1
            )
        claim_signer_cert = _cert_text(cert_file, cert_pem)
    else:
        if (cert_file is None) != (key_file is None) or (cert_pem is None) != (key_pem is None):
            raise InvalidArgumentError(
                "claim credentials need both a certificate and a key (or claim_signer for a key in a token)", code=1
            )
        if cert_file is not None and cert_pem is not None:
            raise InvalidArgumentError("give cert_file/key_file or cert_pem/key_pem, not both", code=1)
        if not claim:
            if cert_file is not None or cert_pem is not None:
                raise InvalidArgumentError("claim credentials are not taken here", code=1)
        elif cert_file is None and cert_pem is None:
            raise InvalidArgumentError(
                "claim credentials are required: cert_file and key_file (or cert_file and claim_signer)", code=1
            )
        else:
            claim_v = (
                (_cstr(cert_file, "cert_file"), _cstr(key_file, "key_file"), True)
                if cert_file is not None
                else (_cstr(cert_pem, "cert_pem"), _cstr(key_pem, "key_pem"), False)
            )
    if (device_signer is None) != (device_public_key is None):
        raise InvalidArgumentError("device_signer and device_public_key go together", code=1)
    public_key_b: Optional[bytes] = None
    if device_signer is not None:
        if not callable(device_signer):
            raise TypeError(f"device_signer must be callable, not {type(device_signer).__name__}")
        if not isinstance(device_public_key, (bytes, bytearray, memoryview)):
            raise TypeError(
                "device_public_key must be bytes (a SubjectPublicKeyInfo in DER, or an uncompressed point), "
                f"not {type(device_public_key).__name__}"
            )
        public_key_b = bytes(device_public_key)
        if csr_pem is not None:
            raise InvalidArgumentError("give csr_pem or device_signer, not both", code=1)
    template_b = _opt_cstr(template_name, "template_name")
    params: list[tuple[bytes, bytes]] = []
    if parameters is not None:
        if not isinstance(parameters, Mapping):
            raise TypeError(f"parameters must be a mapping of str to str, not {type(parameters).__name__}")
        for k, v in parameters.items():
            params.append((_cstr(k, "parameter name"), _cstr(v, f"parameter {k!r}")))
    fmt = _enum_arg(payload_format, Format, "payload_format", {"json": 0, "cbor": 1})
    overall_ms = _ms(timeout, "timeout", allow_none=True)
    step_ms = _ms(step_timeout, "step_timeout", allow_none=False)
    client_id_b = _opt_cstr(client_id, "client_id")
    keep_alive_v = None if keep_alive is None else _int_arg(keep_alive, "keep_alive", 0, 65535)
    if alpn is not None and not isinstance(alpn, bool):
        raise TypeError("alpn must be bool or None")
    mqtt_version_v = _mqtt_version(mqtt_version)
    if verify is not None and not isinstance(verify, bool):
        raise TypeError("verify must be bool")
    if not isinstance(reprovision, bool):
        raise TypeError("reprovision must be bool")
    _check_callable(on_progress, "on_progress")
    key_type_v = None if key_type is None else _enum_arg(key_type, KeyType, "key_type", {"p256": 0, "p384": 1})
    csr_b = _opt_cstr(csr_pem, "csr_pem")
    out_b = _opt_cstr(output_dir, "output_dir")
    state_b = _opt_cstr(state_dir, "state_dir")
    if retry is not None and not isinstance(retry, Retry):
        raise TypeError(f"retry must be a fleetprov.Retry or None, not {type(retry).__name__}")
    lifetime_v = None if token_lifetime is None else _int_arg(token_lifetime, "token_lifetime", 0, 0xFFFFFFFF)

    config = _Config()
    slot = CallbackSlot(on_progress)
    try:
        h = config.handle
        if host is not None:
            check(lib.fleetprov_config_set_endpoint(h, host, port_v))
        if ca_file_b is not None:
            check(lib.fleetprov_config_set_ca_file(h, ca_file_b))
        elif ca_pem_b is not None:
            check(lib.fleetprov_config_set_ca_pem(h, ca_pem_b))
        if claim_v is not None and claim_v[2]:
            check(lib.fleetprov_config_set_claim_files(h, claim_v[0], claim_v[1]))
        elif claim_v is not None:
            check(lib.fleetprov_config_set_claim_pem(h, claim_v[0], claim_v[1]))
        if client_id_b is not None:
            check(lib.fleetprov_config_set_client_id(h, client_id_b))
        if keep_alive_v is not None:
            check(lib.fleetprov_config_set_keep_alive(h, keep_alive_v))
        if alpn is not None:
            check(lib.fleetprov_config_set_alpn(h, alpn))
        if mqtt_version_v is not None:
            check(lib.fleetprov_config_set_mqtt_version(h, mqtt_version_v))
        check(lib.fleetprov_config_set_format(h, fmt))
        check(lib.fleetprov_config_set_timeouts(h, step_ms, overall_ms))
        if template_b is not None:
            check(lib.fleetprov_config_set_template(h, template_b))
        for name_b, value_b in params:
            check(lib.fleetprov_config_set_parameter(h, name_b, value_b))
        if method is not None:
            check(lib.fleetprov_config_set_method(h, method))
        if key_type_v is not None:
            check(lib.fleetprov_config_set_key_type(h, key_type_v))
        if csr_b is not None:
            check(lib.fleetprov_config_set_csr_pem(h, csr_b))
        # Signers: one registry key each, removed by the library's userdata_free when the config
        # and every operation using it are done (also when the setter fails).
        if claim_signer is not None:
            entry = _callbacks.SignerEntry(slot, claim_signer, "claim signer")
            check(
                lib.fleetprov_config_set_claim_signer(
                    h, claim_signer_cert, _callbacks.TLS_SIGN_TRAMPOLINE, _callbacks.register(entry),
                    _callbacks.USERDATA_FREE_TRAMPOLINE,
                )
            )
        if device_signer is not None:
            assert public_key_b is not None
            entry = _callbacks.SignerEntry(slot, device_signer, "device signer")
            check(
                lib.fleetprov_config_set_signer(
                    h, public_key_b, len(public_key_b), _callbacks.SIGN_TRAMPOLINE, _callbacks.register(entry),
                    _callbacks.USERDATA_FREE_TRAMPOLINE,
                )
            )
        if verify is not None:
            check(lib.fleetprov_config_set_verify(h, verify))
        if out_b is not None:
            check(lib.fleetprov_config_set_output_dir(h, out_b))
        if state_b is not None:
            check(lib.fleetprov_config_set_state_dir(h, state_b))
        if retry is not None:
            check(lib.fleetprov_config_set_retry(h, *retry._c_args()))
        if lifetime_v is not None:
            check(lib.fleetprov_config_set_token_lifetime(h, lifetime_v))
        if reprovision:
            check(lib.fleetprov_config_set_reprovision(h, True))

        # Callbacks: one registry key per registration (each has its own userdata_free).
        log_key = _callbacks.register(slot)
        check(
            lib.fleetprov_config_set_log_callback(
                h, _callbacks.LOG_TRAMPOLINE, log_key, _callbacks.USERDATA_FREE_TRAMPOLINE, int(_LogLevel.DEBUG)
            )
        )
        if on_progress is not None:
            progress_key = _callbacks.register(slot)
            check(
                lib.fleetprov_config_set_progress_callback(
                    h, _callbacks.PROGRESS_TRAMPOLINE, progress_key, _callbacks.USERDATA_FREE_TRAMPOLINE
                )
            )
        return config, slot
    except BaseException:
        config.free()
        raise


def _attach(exc: BaseException, result: ProvisionResult) -> None:
    """Hangs a committed result on the exception that ended the call, so it is not lost."""
    try:
        setattr(exc, RESULT_ATTRIBUTE, result)
    except AttributeError:  # pragma: no cover - an exception type without a __dict__
        return
    note = getattr(exc, "add_note", None)  # Python 3.11+
    if note is not None:
        note(
            f"fleetprov: the credentials were committed before this ended the call "
            f"(certificate {result.certificate_id[:12]}…); the result is in .{RESULT_ATTRIBUTE}"
        )


def _outcome_error(
    slot: CallbackSlot, error: Optional[BaseException], result: Optional[ProvisionResult] = None
) -> Optional[BaseException]:
    """The exception a call ends with: one raised in a callback or an interrupt (chained to the
    library error, if any, and carrying a committed ``result``), else the library error."""
    signer_failure = slot.take_signer_error()
    if signer_failure is not None and error is not None and error.__cause__ is None:
        # What a signer raised is why the library failed (FLEETPROV_SIGNER): its cause.
        what, signer_exc = signer_failure
        error.__cause__ = signer_exc
        note = getattr(error, "add_note", None)  # Python 3.11+
        if note is not None:
            note(f"fleetprov: the {what} raised {type(signer_exc).__name__}: {signer_exc}")
    cb_exc = slot.take_error()
    if cb_exc is None:
        return error
    if result is not None:
        _attach(cb_exc, result)
    if error is not None and error is not cb_exc and cb_exc.__cause__ is None:
        cb_exc.__cause__ = error
    return cb_exc


def _raise_outcome(
    slot: CallbackSlot, error: Optional[BaseException], result: Optional[ProvisionResult] = None
) -> None:
    exc = _outcome_error(slot, error, result)
    if exc is not None:
        raise exc


def _interruptible(call: Callable[[], _T], slot: CallbackSlot) -> _T:
    """Runs ``call`` (a blocking library call) on a helper thread while this thread waits, so
    that Ctrl-C (KeyboardInterrupt) or any exception a signal handler raises reaches the caller:
    it is recorded in ``slot``, whose ``on_error`` hook cancels the call, and the call is waited
    for (it stops within a fraction of a second) so that nothing it committed is lost. The
    caller then raises it with :func:`_raise_outcome`.

    From inside one of the library's callbacks the call runs on this thread, where the library
    refuses blocking calls (:class:`InCallbackError`)."""
    if _callbacks.in_callback():
        return call()
    box: List[Tuple[bool, Any]] = []
    finished = threading.Event()

    def run() -> None:
        try:
            box.append((True, call()))
        except BaseException as e:  # handed to the waiting thread
            box.append((False, e))
        finally:
            finished.set()

    worker = threading.Thread(target=run, name="fleetprov-call", daemon=True)
    worker.start()
    while True:
        try:
            finished.wait()
            worker.join()
            break
        except BaseException as e:  # KeyboardInterrupt, or what a signal handler raised
            slot.record(e)
            _callbacks.logger.info("%s: cancelling the flow and waiting for it to stop", type(e).__name__)
    ok, value = box[0]
    if not ok:
        raise value
    return value  # type: ignore[no-any-return]


# --- one-call flow ---------------------------------------------------------------------------


class _CancelSwitch:
    """A fleetprov_cancel set on a config: ``trigger()`` (any thread) stops its blocking call."""

    def __init__(self, config: _Config) -> None:
        handle = ctypes.c_void_p()
        check(lib.fleetprov_cancel_new(ctypes.byref(handle)))
        self.handle: Optional[int] = handle.value
        try:
            check(lib.fleetprov_config_set_cancel(config.handle, self.handle))
        except BaseException:
            self.free()
            raise

    def trigger(self) -> None:
        lib.fleetprov_cancel_trigger(self.handle)

    def free(self) -> None:
        handle, self.handle = self.handle, None
        lib.fleetprov_cancel_free(handle)  # the config keeps its own reference


def _run_blocking(config: _Config, slot: CallbackSlot, fn: Callable[..., int], *args: Any) -> ProvisionResult:
    """Runs ``fn(config, *args, &out)`` (fleetprov_provision or fleetprov_rotate), interruptibly
    (see :func:`_interruptible`), frees the config, and returns the copied result or raises
    (a callback's exception or an interrupt first, carrying a committed result)."""
    try:
        switch = _CancelSwitch(config)
    except BaseException:
        config.free()
        raise
    slot.on_error = switch.trigger

    def call() -> Tuple[Optional[ProvisionResult], Optional[FleetprovError]]:
        with config:
            out = ctypes.c_void_p()
            code = fn(config.handle, *args, ctypes.byref(out))
            error = last_error(code) if code != 0 else None  # read at once, same thread
        if code != 0:
            return None, error
        try:
            return _provisioned_to_result(_taken(out)), None
        finally:
            lib.fleetprov_provisioned_free(out.value)

    try:
        result, error = _interruptible(call, slot)
    finally:
        switch.free()
    _raise_outcome(slot, error, result)
    assert result is not None
    return result




def _method(use_csr: Any, template_name: Any, csr_pem: Optional[str] = None, device_signer: Any = None) -> _Method:
    """Checks the arguments every one-call flow shares and picks its certificate method: a key
    behind ``device_signer`` or a given CSR win, then ``use_csr`` (CSR with a key made here) or
    CreateKeysAndCertificate."""
    if not isinstance(use_csr, bool):
        raise TypeError("use_csr must be bool")
    if template_name is None:
        raise InvalidArgumentError("template_name is required", code=1)
    if device_signer is not None:
        if not use_csr:
            raise InvalidArgumentError(
                "device_signer makes a CSR for the key in the token: it does not go with use_csr=False", code=1
            )
        return _Method.EXTERNAL_SIGNER
    if csr_pem is not None:
        return _Method.EXTERNAL_CSR
    return _Method.CSR if use_csr else _Method.CREATE_KEYS


def _provision_config(
    *,
    endpoint: str,
    port: int = DEFAULT_PORT,
    ca_file: Optional[StrPath] = None,
    cert_file: Optional[StrPath] = None,
    key_file: Optional[StrPath] = None,
    template_name: str,
    parameters: Optional[Mapping[str, str]] = None,
    use_csr: bool = True,
    payload_format: Union[str, Format] = DEFAULT_FORMAT,
    output_dir: Optional[StrPath] = None,
    timeout: Optional[float] = DEFAULT_TIMEOUT,
    step_timeout: float = DEFAULT_STEP_TIMEOUT,
    client_id: Optional[str] = None,
    verify: bool = True,
    on_progress: Optional[ProgressCallback] = None,
    ca_pem: Optional[str] = None,
    cert_pem: Optional[str] = None,
    key_pem: Optional[str] = None,
    key_type: Union[str, KeyType] = DEFAULT_KEY_TYPE,
    csr_pem: Optional[str] = None,
    keep_alive: Optional[int] = None,
    alpn: Optional[bool] = None,
    mqtt_version: Union[int, str, None] = None,
    state_dir: Optional[StrPath] = None,
    retry: Optional[Retry] = None,
    token_lifetime: Optional[int] = None,
    reprovision: bool = False,
    claim_signer: Optional[ClaimSigner] = None,
    device_signer: Optional[DeviceSigner] = None,
    device_public_key: Optional[_BytesLike] = None,
) -> Tuple[_Config, CallbackSlot]:
    """The config of a one-call flow: :func:`provision`'s and :func:`provision_async`'s."""
    method = _method(use_csr, template_name, csr_pem, device_signer)
    return _build_config(
        endpoint=endpoint, port=port, ca_file=ca_file, ca_pem=ca_pem, cert_file=cert_file,
        key_file=key_file, cert_pem=cert_pem, key_pem=key_pem, template_name=template_name,
        parameters=parameters, payload_format=payload_format, timeout=timeout,
        step_timeout=step_timeout, client_id=client_id, keep_alive=keep_alive, alpn=alpn,
        mqtt_version=mqtt_version,
        on_progress=on_progress, method=int(method), key_type=key_type, csr_pem=csr_pem,
        verify=verify, output_dir=output_dir, state_dir=state_dir, retry=retry,
        token_lifetime=token_lifetime, reprovision=reprovision, claim_signer=claim_signer,
        device_signer=device_signer, device_public_key=device_public_key,
    )


def provision(
    *,
    endpoint: str,
    port: int = DEFAULT_PORT,
    ca_file: Optional[StrPath] = None,
    cert_file: Optional[StrPath] = None,
    key_file: Optional[StrPath] = None,
    template_name: str,
    parameters: Optional[Mapping[str, str]] = None,
    use_csr: bool = True,
    payload_format: Union[str, Format] = DEFAULT_FORMAT,
    output_dir: Optional[StrPath] = None,
    timeout: Optional[float] = DEFAULT_TIMEOUT,
    step_timeout: float = DEFAULT_STEP_TIMEOUT,
    client_id: Optional[str] = None,
    verify: bool = True,
    on_progress: Optional[ProgressCallback] = None,
    ca_pem: Optional[str] = None,
    cert_pem: Optional[str] = None,
    key_pem: Optional[str] = None,
    key_type: Union[str, KeyType] = DEFAULT_KEY_TYPE,
    csr_pem: Optional[str] = None,
    keep_alive: Optional[int] = None,
    alpn: Optional[bool] = None,
    mqtt_version: Union[int, str, None] = None,
    state_dir: Optional[StrPath] = None,
    retry: Optional[Retry] = None,
    token_lifetime: Optional[int] = None,
    reprovision: bool = False,
    claim_signer: Optional[ClaimSigner] = None,
    device_signer: Optional[DeviceSigner] = None,
    device_public_key: Optional[_BytesLike] = None,
) -> ProvisionResult:
    """Provisions a device in one blocking call.

    Connects to ``endpoint:port`` over TLS with the claim certificate (``cert_file``/``key_file``,
    or ``cert_pem``/``key_pem``), trusting ``ca_file`` (or ``ca_pem``; default: system roots);
    gets a certificate (CreateCertificateFromCsr with a key made on the device when ``use_csr``,
    of ``key_type`` "p256" or "p384"; with ``csr_pem`` given, that CSR; else
    CreateKeysAndCertificate); registers the thing with ``template_name`` and ``parameters``;
    checks the certificate against the key; connects once with the new credentials unless
    ``verify`` is False; and writes ``certificate.pem``, ``private.key`` and ``device.json`` to
    ``output_dir`` if given.

    With ``state_dir`` (created 0700), a certificate the service returns is first written to
    ``state_dir/journal.json`` (0600, atomically) with its key and ownership token, before
    RegisterThing; a later call that finds that journal, while the token is younger than
    ``token_lifetime`` seconds (default 3600, as on AWS), resumes with that certificate instead
    of creating another (:attr:`Step.RESUMING`, ``resumed`` True in the result); with an expired
    token it starts over (:attr:`Step.RESTARTING`). The credentials reach ``output_dir`` only
    after the new certificate connected, then the journal is removed (:attr:`Step.COMMITTED`).
    One flow at a time may use a state directory: another gets :class:`BusyError`.

    When ``output_dir`` already holds the complete credentials of an earlier call (and no
    certificate is pending in ``state_dir``), they are returned as they are, without a connection
    or a new certificate (``already_provisioned`` True in the result): firmware and factory
    scripts can run this at every start. ``reprovision=True`` makes a new certificate anyway.

    Retryable failures (connection trouble, timeouts, 429 and 5xx rejections) are retried as
    ``retry`` (a :class:`Retry`; default ``Retry()``: 5 attempts, 1 s doubling up to 30 s)
    says, each reported as :attr:`Step.RETRYING` with the pause and the error; other rejections
    are not retried.

    Keys that never leave a token (PKCS#11, a TPM, a secure element): ``claim_signer`` with the
    claim certificate as ``cert_file`` or ``cert_pem`` and no key. It is a :data:`ClaimSigner`,
    ``claim_signer(scheme, message, digest) -> signature``, called once for each TLS handshake
    made with the claim certificate; the claim key must be P-256, P-384 or RSA of 2048 to 4096
    bits (:class:`InvalidArgumentError` naming the type otherwise). ``device_signer`` with
    ``device_public_key`` (a SubjectPublicKeyInfo in DER, or an uncompressed EC point; P-256 or
    P-384): the certificate is made from a CSR the library builds for that key and has signed by
    ``device_signer(message, digest) -> signature`` (a :data:`DeviceSigner`), which also signs
    the verification connection's handshake (two calls; one with ``verify=False``). The
    result's ``private_key_pem`` is then None: keep the certificate next to the key, in the
    token (``output_dir`` is refused, as there is no key to write; ``state_dir`` works, and a
    resumed call must sign with the same key). Signers run on the thread running the flow (see
    below); an exception one raises, a return value that is not a signature, or a signature that
    does not verify fails the call with :class:`SignerError` (not retried; nothing is sent with
    it), whose ``__cause__`` is the signer's exception. Rotating a device whose key is in a
    token goes through this call too: ``claim_signer`` with the device's current certificate and
    key, ``client_id`` the thing name, the rotation template with its parameters, and the new
    key (made in the token) as ``device_signer``; store the new certificate after it returned.

    ``mqtt_version`` is 5 (the default) or ``"3.1.1"``: over MQTT 5 a refusal (a CONNACK,
    SUBACK, PUBACK or DISCONNECT with a reason code such as 0x87, not authorized) fails at once
    with that code in the error (``mqtt_reason_code``, ``mqtt_reason_string``).

    ``timeout`` is the overall deadline in seconds (None or 0: none); ``step_timeout`` bounds
    each step. ``on_progress(progress)`` is called with a :class:`Progress` for each step
    reached. The flow runs on a helper thread while this one waits, so progress, log and signer
    callbacks run there, and Ctrl-C works: a KeyboardInterrupt (or an exception raised by
    ``on_progress``, which is then not called again) cancels the flow within a fraction of a
    second, keeping the journal in ``state_dir`` for the next call, and is raised here once the
    flow stopped. If the credentials had been committed by then, the exception carries the
    :class:`ProvisionResult` as its ``fleetprov_result`` attribute. Log lines go to the
    ``fleetprov`` logger.

    Raises :class:`FleetprovError` subclasses (e.g. :class:`RejectedError`,
    :class:`StepTimeoutError`, :class:`SignerError`), :class:`TypeError` for arguments of the
    wrong type.
    """
    config, slot = _provision_config(
        endpoint=endpoint, port=port, ca_file=ca_file, cert_file=cert_file, key_file=key_file,
        template_name=template_name, parameters=parameters, use_csr=use_csr,
        payload_format=payload_format, output_dir=output_dir, timeout=timeout,
        step_timeout=step_timeout, client_id=client_id, verify=verify, on_progress=on_progress,
        ca_pem=ca_pem, cert_pem=cert_pem, key_pem=key_pem, key_type=key_type, csr_pem=csr_pem,
        keep_alive=keep_alive, alpn=alpn, mqtt_version=mqtt_version,
        state_dir=state_dir, retry=retry,
        token_lifetime=token_lifetime, reprovision=reprovision, claim_signer=claim_signer,
        device_signer=device_signer, device_public_key=device_public_key,
    )
    return _run_blocking(config, slot, lib.fleetprov_provision)


def rotate(
    credentials_dir: StrPath,
    *,
    endpoint: str,
    port: int = DEFAULT_PORT,
    ca_file: Optional[StrPath] = None,
    template_name: str,
    parameters: Optional[Mapping[str, str]] = None,
    use_csr: bool = True,
    payload_format: Union[str, Format] = DEFAULT_FORMAT,
    output_dir: Optional[StrPath] = None,
    state_dir: Optional[StrPath] = None,
    retry: Optional[Retry] = None,
    token_lifetime: Optional[int] = None,
    timeout: Optional[float] = DEFAULT_TIMEOUT,
    step_timeout: float = DEFAULT_STEP_TIMEOUT,
    client_id: Optional[str] = None,
    on_progress: Optional[ProgressCallback] = None,
    ca_pem: Optional[str] = None,
    key_type: Union[str, KeyType] = DEFAULT_KEY_TYPE,
    keep_alive: Optional[int] = None,
    alpn: Optional[bool] = None,
    mqtt_version: Union[int, str, None] = None,
) -> ProvisionResult:
    """Rotates the certificate of a provisioned device in one blocking call.

    Connects with the credentials in ``credentials_dir`` (``certificate.pem``, ``private.key``
    and ``device.json`` as :func:`provision` wrote them to its ``output_dir``) instead of claim
    credentials, which are not taken here; the thing name in ``device.json`` is the MQTT client
    id unless ``client_id`` is given. Makes a new certificate (a key made here for a CSR when
    ``use_csr``, of ``key_type``; else CreateKeysAndCertificate), registers it through
    ``template_name`` — a rotation template, e.g. one taking the thing name as a parameter —
    with ``parameters``, connects with it, and only then replaces the three files in
    ``credentials_dir`` (or writes them to ``output_dir`` if given), each atomically. Until that
    moment the old files stay byte for byte as they were, also when the call fails. The old
    certificate stays active in AWS IoT: retiring it is the backend's call.

    The resume journal lives in ``credentials_dir/rotation-journal`` unless ``state_dir`` says
    otherwise, so an interrupted rotation resumes with the same new certificate
    (``resumed`` in the result). ``retry``, ``token_lifetime``, ``timeout``, ``step_timeout``,
    ``on_progress`` and the connection settings are as for :func:`provision`; the verification
    connection cannot be turned off here.

    Returns a :class:`ProvisionResult` for the new certificate. Raises the same exceptions as
    :func:`provision` (:class:`StorageError` when ``credentials_dir`` lacks a file), and is
    interrupted the same way (Ctrl-C, an exception raised by ``on_progress``).
    """
    dir_b = _cstr(credentials_dir, "credentials_dir")
    method = _method(use_csr, template_name)
    config, slot = _build_config(
        endpoint=endpoint, port=port, ca_file=ca_file, ca_pem=ca_pem, cert_file=None,
        key_file=None, cert_pem=None, key_pem=None, template_name=template_name,
        parameters=parameters, payload_format=payload_format, timeout=timeout,
        step_timeout=step_timeout, client_id=client_id, keep_alive=keep_alive, alpn=alpn,
        mqtt_version=mqtt_version,
        on_progress=on_progress, method=int(method), key_type=key_type, output_dir=output_dir,
        state_dir=state_dir, retry=retry, token_lifetime=token_lifetime, claim=False,
    )
    return _run_blocking(config, slot, lib.fleetprov_rotate, dir_b)




def provision_async(
    *,
    endpoint: str,
    port: int = DEFAULT_PORT,
    ca_file: Optional[StrPath] = None,
    cert_file: Optional[StrPath] = None,
    key_file: Optional[StrPath] = None,
    template_name: str,
    parameters: Optional[Mapping[str, str]] = None,
    use_csr: bool = True,
    payload_format: Union[str, Format] = DEFAULT_FORMAT,
    output_dir: Optional[StrPath] = None,
    timeout: Optional[float] = DEFAULT_TIMEOUT,
    step_timeout: float = DEFAULT_STEP_TIMEOUT,
    client_id: Optional[str] = None,
    verify: bool = True,
    on_progress: Optional[ProgressCallback] = None,
    ca_pem: Optional[str] = None,
    cert_pem: Optional[str] = None,
    key_pem: Optional[str] = None,
    key_type: Union[str, KeyType] = DEFAULT_KEY_TYPE,
    csr_pem: Optional[str] = None,
    keep_alive: Optional[int] = None,
    alpn: Optional[bool] = None,
    mqtt_version: Union[int, str, None] = None,
    state_dir: Optional[StrPath] = None,
    retry: Optional[Retry] = None,
    token_lifetime: Optional[int] = None,
    reprovision: bool = False,
    claim_signer: Optional[ClaimSigner] = None,
    device_signer: Optional[DeviceSigner] = None,
    device_public_key: Optional[_BytesLike] = None,
) -> ProvisionOperation:
    """Starts :func:`provision` (the same arguments) on a library worker thread and returns a
    :class:`ProvisionOperation` (a :class:`concurrent.futures.Future`) at once; ``await`` it in
    asyncio. Progress, log and signer callbacks run on the worker thread; an exception raised by
    ``on_progress`` cancels the operation and is raised by :meth:`ProvisionOperation.result`,
    one raised by a signer fails it with :class:`SignerError` (its ``__cause__``)."""
    config, slot = _provision_config(
        endpoint=endpoint, port=port, ca_file=ca_file, cert_file=cert_file, key_file=key_file,
        template_name=template_name, parameters=parameters, use_csr=use_csr,
        payload_format=payload_format, output_dir=output_dir, timeout=timeout,
        step_timeout=step_timeout, client_id=client_id, verify=verify, on_progress=on_progress,
        ca_pem=ca_pem, cert_pem=cert_pem, key_pem=key_pem, key_type=key_type, csr_pem=csr_pem,
        keep_alive=keep_alive, alpn=alpn, mqtt_version=mqtt_version,
        state_dir=state_dir, retry=retry,
        token_lifetime=token_lifetime, reprovision=reprovision, claim_signer=claim_signer,
        device_signer=device_signer, device_public_key=device_public_key,
    )
    op = ProvisionOperation(slot)
    _live_operations.add(op)
    key = _callbacks.register(op)
    with config:
        out = ctypes.c_void_p()
        # The operation's lock orders this write before the callback reads _handle via cancel().
        with op._lock:
            code = lib.fleetprov_provision_async(
                config.handle, _callbacks.PROVISION_TRAMPOLINE, key, _callbacks.USERDATA_FREE_TRAMPOLINE, ctypes.byref(out)
            )
            if code == 0:
                op._handle = out.value
        if code != 0:
            raise last_error(code)
    return op


class ProvisionOperation(concurrent.futures.Future, _Closeable):  # type: ignore[type-arg]
    """A running :func:`provision_async` call: a :class:`concurrent.futures.Future` of a
    :class:`ProvisionResult` (done callbacks, :func:`concurrent.futures.as_completed`,
    :func:`asyncio.wrap_future`), and awaitable.

    ``result(timeout)`` waits for and returns the :class:`ProvisionResult` (or raises; the
    builtin :class:`TimeoutError` when it did not finish in time: it keeps running).
    ``cancel()`` asks the flow to stop and returns True if it was still running: it then ends
    with :class:`CancelledError` (also a :class:`concurrent.futures.CancelledError`), or with
    its result when the credentials had already been committed; ``cancelled()`` stays False,
    since the flow did run. ``await op`` in a task: cancelling the task cancels the flow and
    waits for it to stop (a fraction of a second); if the credentials had been committed, the
    :class:`asyncio.CancelledError` carries the result as ``fleetprov_result``.
    ``close()`` (or leaving a ``with`` block) cancels if needed, waits and frees the handle.
    Callbacks, done callbacks included, run on a library worker thread.
    """

    def __init__(self, slot: CallbackSlot) -> None:
        super().__init__()
        self._slot = slot
        self._lock = threading.Lock()
        self._handle: Optional[int] = None
        self._worker_thread: Optional[int] = None
        slot.on_error = self._cancel_flow
        self.set_running_or_notify_cancel()

    # called on the worker thread by the completion trampoline
    def _complete(self, code: int, provisioned: Optional[int], error: Optional[int]) -> None:
        self._worker_thread = threading.get_ident()
        result: Optional[ProvisionResult] = None
        failure: Optional[BaseException] = None
        try:
            if code == 0 and provisioned:
                try:
                    result = _provisioned_to_result(provisioned)
                finally:
                    lib.fleetprov_provisioned_free(provisioned)
            else:
                failure = error_from_handle(code, error)
        except BaseException as e:  # pragma: no cover
            failure = e
        failure = _outcome_error(self._slot, failure, result)
        if failure is not None:
            self.set_exception(failure)
        else:
            self.set_result(result)

    def _fail(self, exc: BaseException) -> None:  # pragma: no cover
        if not self.done():
            self.set_exception(exc)

    def _cancel_flow(self) -> None:
        with self._lock:
            if self._handle:
                lib.fleetprov_operation_cancel(self._handle)

    def cancel(self) -> bool:
        """Asks the flow to stop; True if it was still running. Safe from any thread, callbacks
        included."""
        if self.done():
            return False
        self._cancel_flow()
        return True

    def result(self, timeout: Optional[float] = None) -> ProvisionResult:
        """Waits up to `timeout` seconds (None: forever) for the outcome and returns it.

        Raises :class:`TimeoutError` (the builtin) if it has not finished in time (the operation
        keeps running), the operation's :class:`FleetprovError`, or an exception raised by the
        progress callback.
        """
        try:
            value: ProvisionResult = super().result(timeout)
        except concurrent.futures.TimeoutError:
            raise TimeoutError(f"provisioning did not finish within {timeout} s") from None
        finally:
            if self.done() and threading.get_ident() != self._worker_thread:
                self.close()
        return value

    def __await__(self) -> Generator[Any, None, ProvisionResult]:
        return self._wait_async().__await__()

    async def _wait_async(self) -> ProvisionResult:
        import asyncio

        loop = asyncio.get_running_loop()
        try:
            return await asyncio.wrap_future(self, loop=loop)  # cancels this future when cancelled
        except asyncio.CancelledError as cancelled:
            self.cancel()
            stopped = loop.create_future()

            def settle() -> None:
                if not stopped.done():
                    stopped.set_result(None)

            def wake(_: Any) -> None:
                loop.call_soon_threadsafe(settle)

            self.add_done_callback(wake)
            while not stopped.done():
                try:
                    await asyncio.shield(stopped)
                except asyncio.CancelledError:
                    continue  # cancelled again: the flow stops within a fraction of a second anyway
            if self.exception() is None:
                _attach(cancelled, self.result())
            raise

    def close(self) -> None:
        """Cancels the operation if still running, waits for its callback and frees the handle.
        Idempotent."""
        with self._lock:
            handle, self._handle = self._handle, None
        if handle:
            lib.fleetprov_operation_free(handle)

    def __del__(self) -> None:
        handle = self._handle
        if not handle:
            return
        if threading.get_ident() == self._worker_thread:
            # Dropped by the library's own worker thread (in userdata_free): operation_free would
            # wait for that thread, so free from another one.
            self._handle = None
            threading.Thread(target=lib.fleetprov_operation_free, args=(handle,), daemon=True).start()
            return
        super().__del__()


# Operations still open at interpreter exit are cancelled and waited for, so no worker thread
# calls into a finalising interpreter.
_live_operations: "weakref.WeakSet[ProvisionOperation]" = weakref.WeakSet()


@atexit.register
def _close_live_operations() -> None:
    for op in list(_live_operations):
        try:
            op.close()
        except Exception:
            pass


# --- step-by-step client ---------------------------------------------------------------------


def _parameter_arrays(parameters: Mapping[str, str]) -> Tuple[Any, Any, int]:
    """(names, values, count) C arrays for fleetprov_client_register_thing_with."""
    if not isinstance(parameters, Mapping):
        raise TypeError(f"parameters must be a mapping of str to str, not {type(parameters).__name__}")
    pairs = [(_cstr(k, "parameter name"), _cstr(v, f"parameter {k!r}")) for k, v in parameters.items()]
    array = ctypes.c_char_p * max(len(pairs), 1)
    names = array(*(k for k, _ in pairs))
    values = array(*(v for _, v in pairs))
    return names, values, len(pairs)


class Certificate(_Closeable):
    """A certificate from :meth:`Client.create_keys_and_certificate` or
    :meth:`Client.create_certificate_from_csr`, holding the library object that
    :meth:`Client.register_thing` needs (its ownership token).

    ``certificate_id``, ``certificate_pem`` and ``private_key_pem`` (None for a CSR) are copied
    out. ``close()`` (or a ``with`` block) frees it and wipes the token; it is also freed when
    garbage collected.
    """

    def __init__(self, handle: int) -> None:
        self._lock = threading.RLock()
        self._handle: Optional[int] = handle
        self.certificate_id: str = _s(lib.fleetprov_certificate_id(handle)) or ""
        self.certificate_pem: str = _s(lib.fleetprov_certificate_pem(handle)) or ""
        self.private_key_pem: Optional[str] = _s(lib.fleetprov_certificate_private_key(handle))

    @property
    def ownership_token(self) -> str:
        """The ownership token (a secret, valid one hour), read from the library on demand."""
        with self._lock:
            return _s(lib.fleetprov_certificate_ownership_token(self._use())) or ""

    @property
    def closed(self) -> bool:
        return self._handle is None

    def _use(self) -> int:
        if self._handle is None:
            raise ClosedError("this Certificate has been closed")
        return self._handle

    def close(self) -> None:
        """Frees the library object (idempotent)."""
        with self._lock:
            handle, self._handle = self._handle, None
        if handle:
            lib.fleetprov_certificate_free(handle)

    def __repr__(self) -> str:
        state = "closed" if self._handle is None else "open"
        return f"<fleetprov.Certificate {self.certificate_id[:12]}… {state}>"


class Client(_Closeable):
    """A connection for step-by-step provisioning.

    Takes the connection settings, and ``template_name`` and ``parameters`` as the defaults of
    :meth:`register_thing`, which can override both per call (a factory station registers many
    boards over one claim connection).

    Use as a context manager (``with Client(...) as c:``); ``close()`` frees the handle exactly
    once and using a closed client raises :class:`ClosedError`. One operation runs at a time
    (another thread gets :class:`BusyError`); :meth:`cancel` may be called from any thread.
    Each operation runs on a helper thread while the calling thread waits, so Ctrl-C cancels it
    (the KeyboardInterrupt is raised once it stopped); callbacks run on that helper thread.
    ``on_progress`` receives a :class:`Progress` for each step; an exception it raises cancels
    the operation and is re-raised by it.
    The resume journal and retries (``state_dir``, ``retry``, ``token_lifetime``) belong to the
    one-call flow and are not taken here. ``claim_signer`` with ``cert_file`` or ``cert_pem``
    (and no key) connects with a claim key kept in a token, as for :func:`provision`; it runs
    on the helper thread at each connection.
    """

    def __init__(
        self,
        *,
        endpoint: str,
        port: int = DEFAULT_PORT,
        ca_file: Optional[StrPath] = None,
        cert_file: Optional[StrPath] = None,
        key_file: Optional[StrPath] = None,
        template_name: Optional[str] = None,
        parameters: Optional[Mapping[str, str]] = None,
        payload_format: Union[str, Format] = DEFAULT_FORMAT,
        timeout: Optional[float] = DEFAULT_TIMEOUT,
        step_timeout: float = DEFAULT_STEP_TIMEOUT,
        client_id: Optional[str] = None,
        on_progress: Optional[ProgressCallback] = None,
        ca_pem: Optional[str] = None,
        cert_pem: Optional[str] = None,
        key_pem: Optional[str] = None,
        keep_alive: Optional[int] = None,
        alpn: Optional[bool] = None,
        mqtt_version: Union[int, str, None] = None,
        claim_signer: Optional[ClaimSigner] = None,
    ) -> None:
        self._handle: Optional[int] = None
        self._cond = threading.Condition()
        self._inflight = 0
        self._inflight_threads: set[int] = set()
        config, slot = _build_config(
            endpoint=endpoint, port=port, ca_file=ca_file, ca_pem=ca_pem, cert_file=cert_file,
            key_file=key_file, cert_pem=cert_pem, key_pem=key_pem, template_name=template_name,
            parameters=parameters, payload_format=payload_format, timeout=timeout,
            step_timeout=step_timeout, client_id=client_id, keep_alive=keep_alive, alpn=alpn,
            mqtt_version=mqtt_version, claim_signer=claim_signer,
            on_progress=on_progress,
        )
        self._slot = slot
        self._parameters: Mapping[str, str] = dict(parameters or {})
        with config:
            out = ctypes.c_void_p()
            check(lib.fleetprov_client_new(config.handle, ctypes.byref(out)))
            self._handle = out.value
        slot.on_error = self.cancel

    # -- lifetime --
    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._handle is None

    def close(self) -> None:
        """Cancels a running operation, waits for it, disconnects and frees the client.
        Idempotent; safe from any thread."""
        with self._cond:
            handle, self._handle = self._handle, None
            if not handle:
                return
            if threading.get_ident() in self._inflight_threads:
                self._handle = handle
                raise RuntimeError("a Client cannot be closed from its own callback")
            while self._inflight:
                lib.fleetprov_client_cancel(handle)
                self._cond.wait(0.2)  # re-cancel in case the call had not started yet
        lib.fleetprov_client_free(handle)

    def cancel(self) -> None:
        """Asks the running operation to stop with :class:`CancelledError`. Any thread; a no-op
        when the client is closed or idle."""
        with self._cond:
            if self._handle:
                lib.fleetprov_client_cancel(self._handle)

    def _call(self, fn: Callable[..., int], *args: Any) -> None:
        with self._cond:
            if self._handle is None:
                raise ClosedError("this Client has been closed")
            handle = self._handle
            self._inflight += 1

        def call() -> Optional[FleetprovError]:
            me = threading.get_ident()
            with self._cond:
                self._inflight_threads.add(me)
            try:
                code = fn(handle, *args)
                return last_error(code) if code != 0 else None  # same thread, right after
            finally:
                with self._cond:
                    self._inflight_threads.discard(me)

        try:
            error = _interruptible(call, self._slot)
        finally:
            with self._cond:
                self._inflight -= 1
                self._cond.notify_all()
        _raise_outcome(self._slot, error)

    # -- operations --
    def connect(self) -> None:
        """Connects now (operations also connect when needed)."""
        self._call(lib.fleetprov_client_connect)

    def create_keys_and_certificate(self) -> Certificate:
        """CreateKeysAndCertificate: the service makes the key (``private_key_pem``)."""
        out = ctypes.c_void_p()
        try:
            self._call(lib.fleetprov_client_create_keys_and_certificate, ctypes.byref(out))
        except BaseException:
            lib.fleetprov_certificate_free(out.value)  # written only on success; NULL is a no-op
            raise
        return Certificate(_taken(out))

    def create_certificate_from_csr(self, csr_pem: str, key_pem: Optional[str] = None) -> Certificate:
        """CreateCertificateFromCsr with `csr_pem`. When `key_pem` (the CSR's key) is given the
        returned certificate is checked against it (:class:`CertificateMismatchError`)."""
        csr_b = _cstr(csr_pem, "csr_pem")
        key_b = _opt_cstr(key_pem, "key_pem")
        out = ctypes.c_void_p()
        try:
            self._call(lib.fleetprov_client_create_certificate_from_csr, csr_b, key_b, ctypes.byref(out))
        except BaseException:
            lib.fleetprov_certificate_free(out.value)
            raise
        return Certificate(_taken(out))

    def register_thing(
        self,
        certificate: Union[Certificate, str],
        template_name: Optional[str] = None,
        *,
        parameters: Optional[Mapping[str, str]] = None,
    ) -> Registration:
        """RegisterThing with `certificate`'s ownership token — a :class:`Certificate`, or the
        token itself as text (e.g. :attr:`Certificate.ownership_token` saved earlier; AWS
        accepts it for an hour) — through the template given at construction (or
        `template_name`) with `parameters`: when given, they replace the construction's
        ``parameters`` for this call only."""
        if isinstance(certificate, str):
            token: Optional[bytes] = _cstr(certificate, "ownership_token")
        elif isinstance(certificate, Certificate):
            token = None
        else:
            raise TypeError(
                f"certificate must be a fleetprov.Certificate or an ownership token (str), not {type(certificate).__name__}"
            )
        template_b = _opt_cstr(template_name, "template_name")
        params = None
        if parameters is not None or token is not None:
            params = _parameter_arrays(self._parameters if parameters is None else parameters)
        out = ctypes.c_void_p()
        with contextlib.ExitStack() as stack:
            if isinstance(certificate, Certificate):
                stack.enter_context(certificate._lock)
                cert_handle = certificate._use()
                if params is not None:
                    token = lib.fleetprov_certificate_ownership_token(cert_handle)
            try:
                if params is None:
                    self._call(lib.fleetprov_client_register_thing, cert_handle, template_b, ctypes.byref(out))
                else:
                    names, values, count = params
                    self._call(
                        lib.fleetprov_client_register_thing_with, token, template_b, names, values, count,
                        ctypes.byref(out),
                    )
            except BaseException:
                lib.fleetprov_registration_free(out.value)
                raise
        handle = _taken(out)
        try:
            return Registration(
                thing_name=_s(lib.fleetprov_registration_thing_name(handle)) or "",
                device_configuration=_entries(
                    lib.fleetprov_registration_config_entry, lib.fleetprov_registration_config_count, handle
                ),
            )
        finally:
            lib.fleetprov_registration_free(out.value)
