"""Exceptions: one class per fleetprov_result code, all deriving from FleetprovError."""

from __future__ import annotations

import concurrent.futures
from typing import Optional

from ._ffi import lib

__all__ = [
    "FleetprovError",
    "InvalidArgumentError",
    "TlsError",
    "FleetprovConnectionError",
    "StepTimeoutError",
    "DeadlineError",
    "RejectedError",
    "MalformedReplyError",
    "SubscribeFailedError",
    "CertificateMismatchError",
    "CancelledError",
    "StorageError",
    "BusyError",
    "BufferTooSmallError",
    "PanicError",
    "InternalError",
    "InCallbackError",
    "SignerError",
    "ClosedError",
    "result_name",
]


def result_name(code: int) -> str:
    """The library's name of a result code, e.g. ``"FLEETPROV_REJECTED"``."""
    raw = lib.fleetprov_result_name(int(code))
    return raw.decode("utf-8", "replace") if raw else "FLEETPROV_UNKNOWN"


class FleetprovError(Exception):
    """A failure reported by libfleetprov.

    ``code`` is the numeric fleetprov_result, ``code_name`` its name, ``message`` the library's
    full error text, and ``retryable`` whether retrying can help. When the broker refused with
    an MQTT reason code (a CONNACK refusing the connection, a DISCONNECT, or a PUBACK refusing
    a request over MQTT 5), ``mqtt_reason_code`` is that code (e.g. 0x87, not authorized; over
    MQTT 3.1.1 the CONNACK return code) and ``mqtt_reason_string`` the server's reason string
    ("" when it sent none); otherwise ``mqtt_reason_code`` is None.
    """

    #: The fleetprov_result this class stands for (None for the base class).
    result_code: Optional[int] = None

    def __init__(
        self,
        message: str,
        *,
        code: Optional[int] = None,
        retryable: bool = False,
        mqtt_reason_code: Optional[int] = None,
        mqtt_reason_string: str = "",
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code if code is not None else self.result_code
        self.code_name = result_name(self.code) if self.code is not None else "FLEETPROV_UNKNOWN"
        self.retryable = retryable
        self.mqtt_reason_code = mqtt_reason_code
        self.mqtt_reason_string = mqtt_reason_string


class InvalidArgumentError(FleetprovError, ValueError):
    """FLEETPROV_INVALID_ARGUMENT: a bad template name, unusable PEM, missing file..."""

    result_code = 1


class TlsError(FleetprovError):
    """FLEETPROV_TLS: TLS could not be set up or the handshake failed."""

    result_code = 2


class FleetprovConnectionError(FleetprovError, ConnectionError):
    """FLEETPROV_CONNECTION: the connection could not be made or was lost. Also a
    :class:`ConnectionError`."""

    result_code = 3


class StepTimeoutError(FleetprovError, TimeoutError):
    """FLEETPROV_TIMEOUT: a step took longer than the per-step timeout. Also a
    :class:`TimeoutError`."""

    result_code = 4


class DeadlineError(FleetprovError, TimeoutError):
    """FLEETPROV_DEADLINE: the overall deadline passed. Also a :class:`TimeoutError`."""

    result_code = 5


class RejectedError(FleetprovError):
    """FLEETPROV_REJECTED: the service rejected a request.

    ``status_code`` (e.g. 400, 404, 429), ``error_code`` (e.g. ``"ResourceNotFound"``) and
    ``error_message`` are the service's fields, intact.
    """

    result_code = 6

    def __init__(
        self,
        message: str,
        *,
        code: Optional[int] = None,
        retryable: bool = False,
        status_code: int = 0,
        error_code: str = "",
        error_message: str = "",
    ) -> None:
        super().__init__(message, code=code, retryable=retryable)
        self.status_code = status_code
        self.error_code = error_code
        self.error_message = error_message


class MalformedReplyError(FleetprovError):
    """FLEETPROV_MALFORMED_REPLY: a reply did not match the API."""

    result_code = 7


class SubscribeFailedError(FleetprovError):
    """FLEETPROV_SUBSCRIBE_FAILED: the broker refused a subscription."""

    result_code = 8


class CertificateMismatchError(FleetprovError):
    """FLEETPROV_CERTIFICATE_MISMATCH: the returned certificate does not match the key."""

    result_code = 9


class CancelledError(FleetprovError, concurrent.futures.CancelledError):
    """FLEETPROV_CANCELLED: cancelled by the caller (``cancel()``, Ctrl-C, an exception raised by
    ``on_progress``). Also a :class:`concurrent.futures.CancelledError`. A resume journal in
    ``state_dir`` is kept: the next call resumes."""

    result_code = 10


class StorageError(FleetprovError):
    """FLEETPROV_STORAGE: writing the credentials failed."""

    result_code = 11


class BusyError(FleetprovError):
    """FLEETPROV_BUSY: another operation is running on this client, or another provisioning
    flow is using the same ``state_dir``."""

    result_code = 12


class BufferTooSmallError(FleetprovError):
    """FLEETPROV_BUFFER_TOO_SMALL (only seen if the bindings have a bug)."""

    result_code = 13


class PanicError(FleetprovError):
    """FLEETPROV_PANIC: a bug in the library; the operation did not complete."""

    result_code = 14


class InternalError(FleetprovError):
    """FLEETPROV_INTERNAL: something inside the library failed that no change of input can fix
    (a thread that could not start, a key that could not be generated). Not retryable."""

    result_code = 16


class InCallbackError(FleetprovError):
    """FLEETPROV_IN_CALLBACK: a blocking call (provision, rotate, a client operation, waiting
    for an operation) was made from inside one of the library's callbacks; nothing was done."""

    result_code = 17


class SignerError(FleetprovError):
    """FLEETPROV_SIGNER: a key behind a signing callback (``claim_signer`` or ``device_signer``)
    could not sign: the callable raised, returned something that is not a signature, or a
    signature that does not verify with the certificate's or public key's key. Nothing was sent
    with it. Not retryable. When the callable raised, that exception is this one's
    ``__cause__``."""

    result_code = 18


class ClosedError(FleetprovError, RuntimeError):
    """The Python object was closed (its handle freed) and cannot be used any more."""


_BY_CODE: dict[int, type[FleetprovError]] = {
    cls.result_code: cls
    for cls in (
        InvalidArgumentError,
        TlsError,
        FleetprovConnectionError,
        StepTimeoutError,
        DeadlineError,
        RejectedError,
        MalformedReplyError,
        SubscribeFailedError,
        CertificateMismatchError,
        CancelledError,
        StorageError,
        BusyError,
        BufferTooSmallError,
        PanicError,
        InternalError,
        InCallbackError,
        SignerError,
    )
}


def _text(raw: Optional[bytes]) -> str:
    return raw.decode("utf-8", "replace") if raw else ""


def error_from_handle(code: int, err: Optional[int]) -> FleetprovError:
    """Builds the exception for `code` from a (borrowed) fleetprov_error pointer, copying all of it."""
    cls = _BY_CODE.get(code, FleetprovError)
    if not err:
        return cls(f"{result_name(code)} (no error details)", code=code)
    message = _text(lib.fleetprov_error_message(err)) or result_name(code)
    retryable = bool(lib.fleetprov_error_is_retryable(err))
    reason_code = int(lib.fleetprov_error_mqtt_reason_code(err))
    if reason_code >= 0:
        return cls(
            message,
            code=code,
            retryable=retryable,
            mqtt_reason_code=reason_code,
            mqtt_reason_string=_text(lib.fleetprov_error_mqtt_reason_string(err)),
        )
    if cls is RejectedError:
        return RejectedError(
            message,
            code=code,
            retryable=retryable,
            status_code=int(lib.fleetprov_error_status_code(err)),
            error_code=_text(lib.fleetprov_error_code(err)),
            error_message=_text(lib.fleetprov_error_service_message(err)),
        )
    return cls(message, code=code, retryable=retryable)


def last_error(code: int) -> FleetprovError:
    """The exception for a failing call that returned `code`; must be called right after it,
    on the same thread (the library's last error is thread-local)."""
    err = lib.fleetprov_last_error()
    try:
        return error_from_handle(code, err)
    finally:
        lib.fleetprov_error_free(err)


def check(code: int) -> None:
    """Raises the exception for a non-zero result code (reading the thread's last error)."""
    if code != 0:
        raise last_error(code)
