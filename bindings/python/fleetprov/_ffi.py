"""Loading of libfleetprov and the ctypes declarations of every C function used.

The library is loaded from the first of these places that has one:

1. the ``FLEETPROV_LIBRARY`` environment variable (the path of a ``libfleetprov`` shared
   library); when set, it is the only place tried;
2. the library bundled in the wheel, beside this module (``pip install`` builds it);
3. the system's, as ``ctypes.util.find_library("fleetprov")`` finds it (e.g. installed with
   ``cmake --install`` into a directory the dynamic loader searches).

``fleetprov_version()`` must then equal the package version, and every function this package
declares must be there; otherwise :class:`LibraryLoadError` says which library, which versions
and where else it looked.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from ctypes import (
    CFUNCTYPE,
    POINTER,
    c_bool,
    c_char_p,
    c_int,
    c_int32,
    c_size_t,
    c_uint16,
    c_uint32,
    c_uint8,
    c_uint64,
    c_void_p,
)
from pathlib import Path
from typing import Any, List, Optional, Tuple

__all__ = [
    "lib",
    "LIBRARY_PATH",
    "EXPECTED_VERSION",
    "LibraryLoadError",
    "ProgressStruct",
    "IdentityStruct",
    "HostCallbacksStruct",
    "IN_PROGRESS",
    "NO_TIMER",
]

#: The library version this package is written for (agrees with pyproject.toml).
EXPECTED_VERSION = "0.5.0"

if sys.platform == "darwin":
    BUNDLED_NAME = "libfleetprov.dylib"
elif sys.platform == "win32":
    BUNDLED_NAME = "fleetprov.dll"
else:
    BUNDLED_NAME = "libfleetprov.so"


class LibraryLoadError(ImportError):
    """libfleetprov could not be found, loaded, or is the wrong version."""


def _candidates() -> List[Tuple[str, str]]:
    """(where, path) to try in order, before the system's library."""
    # The wheel's own library first: it is the one built with this package, so a variable left
    # over from a development shell cannot make an installed wheel load another library. Then
    # the variable (a source checkout bundles none), then the system's.
    env = os.environ.get("FLEETPROV_LIBRARY")
    bundled = Path(__file__).resolve().parent / BUNDLED_NAME
    out = [("bundled", str(bundled))]
    if env:
        out.append(("FLEETPROV_LIBRARY", env))
    return out


def _system_library() -> Optional[str]:
    try:
        return ctypes.util.find_library("fleetprov")
    except Exception:  # find_library runs external tools; any failure means "none"
        return None


def _version_of(handle: ctypes.CDLL) -> Optional[str]:
    try:
        fn = handle.fleetprov_version
    except AttributeError:
        return None
    fn.restype = c_char_p
    fn.argtypes = []
    raw = fn()
    return raw.decode("utf-8", "replace") if raw else ""


def _load() -> Tuple[ctypes.CDLL, Path]:
    """The first library that loads and has the expected version, else LibraryLoadError."""
    candidates = _candidates()
    tried: List[str] = []

    def attempt(where: str, path: str) -> Optional[ctypes.CDLL]:
        if os.sep in path and not Path(path).is_file():
            tried.append(f"{where}: {path} (no such file)")
            return None
        try:
            handle = ctypes.CDLL(path)
        except OSError as e:
            tried.append(f"{where}: {path} (cannot load: {e})")
            return None
        version = _version_of(handle)
        if version != EXPECTED_VERSION:
            found = "no fleetprov_version()" if version is None else f"libfleetprov {version!r}"
            tried.append(f"{where}: {path} is {found}, but this package needs {EXPECTED_VERSION!r}")
            return None
        return handle

    for where, path in candidates:
        handle = attempt(where, path)
        if handle is not None:
            return handle, Path(path)
    name = _system_library()
    if name is None:
        tried.append("system: ctypes.util.find_library('fleetprov') found none")
    else:
        handle = attempt("system", name)
        if handle is not None:
            return handle, Path(getattr(handle, "_name", name))
    raise LibraryLoadError(
        f"no usable libfleetprov {EXPECTED_VERSION} (tried, in order: "
        + "; ".join(tried)
        + "). Install the fleetprov wheel, or set FLEETPROV_LIBRARY to the path of a matching library"
    )


lib, LIBRARY_PATH = _load()

# Opaque handles are c_void_p throughout: Python never looks inside them.
_H = c_void_p
_PH = POINTER(c_void_p)
_RES = c_int  # enum fleetprov_result


class ProgressStruct(ctypes.Structure):
    """struct fleetprov_progress, borrowed by the progress callback for the call only."""

    _fields_ = [
        ("size", c_size_t),  # sizeof(fleetprov_progress) of the library that filled it
        ("step", ctypes.c_int32),  # fleetprov_step
        ("attempt", c_uint32),
        ("retry_in_ms", c_uint64),
        ("error", c_void_p),  # const fleetprov_error *, NULL unless retrying
    ]


class IdentityStruct(ctypes.Structure):
    """struct fleetprov_identity, borrowed by the host connect callback for the call only."""

    _fields_ = [
        ("size", c_size_t),  # sizeof(fleetprov_identity) of the library that filled it
        ("claim", c_bool),
        ("certificate_pem", c_char_p),  # NULL with claim
        ("private_key_pem", c_char_p),  # NULL with claim, or when the key is the host's own
        ("client_id", c_char_p),  # "" lets the host choose
    ]


#: FLEETPROV_IN_PROGRESS: fleetprov_host_result() before the flow finished.
IN_PROGRESS = 15
#: fleetprov_host_wake_at() when no timer is pending (UINT64_MAX).
NO_TIMER = 0xFFFFFFFFFFFFFFFF

# --- callback types (enums arrive as plain ints) ---------------------------------------------
LOG_CALLBACK = CFUNCTYPE(None, c_void_p, c_int, c_void_p, c_size_t)
USERDATA_FREE = CFUNCTYPE(None, c_void_p)
PROGRESS_CALLBACK = CFUNCTYPE(None, c_void_p, POINTER(ProgressStruct))
PROVISION_CALLBACK = CFUNCTYPE(None, c_void_p, c_int, c_void_p, c_void_p)
CERTIFICATE_CALLBACK = CFUNCTYPE(None, c_void_p, c_int, c_void_p, c_void_p)
REGISTRATION_CALLBACK = CFUNCTYPE(None, c_void_p, c_int, c_void_p, c_void_p)
# fleetprov_host_callbacks: size, connect, disconnect, subscribe, publish (payload as c_void_p +
# len).
HOST_CONNECT_CALLBACK = CFUNCTYPE(c_int32, c_void_p, POINTER(IdentityStruct))
HOST_DISCONNECT_CALLBACK = CFUNCTYPE(None, c_void_p)
HOST_SUBSCRIBE_CALLBACK = CFUNCTYPE(c_int32, c_void_p, POINTER(c_char_p), c_size_t)
HOST_PUBLISH_CALLBACK = CFUNCTYPE(c_int32, c_void_p, c_char_p, c_void_p, c_size_t)
# fleetprov_tls_sign_callback(userdata, scheme, message, message_len, digest, digest_len,
# signature, signature_len) and fleetprov_sign_callback (the same without the scheme): the
# buffers as c_void_p (read with string_at, written with memmove), the length in and out.
TLS_SIGN_CALLBACK = CFUNCTYPE(
    c_int32, c_void_p, c_int32, c_void_p, c_size_t, c_void_p, c_size_t, c_void_p, POINTER(c_size_t)
)
SIGN_CALLBACK = CFUNCTYPE(c_int32, c_void_p, c_void_p, c_size_t, c_void_p, c_size_t, c_void_p, POINTER(c_size_t))


class HostCallbacksStruct(ctypes.Structure):
    """struct fleetprov_host_callbacks (copied by fleetprov_host_new); ``size`` is
    ``ctypes.sizeof(HostCallbacksStruct)``."""

    _fields_ = [
        ("size", c_size_t),
        ("connect", HOST_CONNECT_CALLBACK),
        ("disconnect", HOST_DISCONNECT_CALLBACK),
        ("subscribe", HOST_SUBSCRIBE_CALLBACK),
        ("publish", HOST_PUBLISH_CALLBACK),
    ]



def _declare(name: str, restype: Any, *argtypes: Any) -> None:
    fn = getattr(lib, name)
    fn.restype = restype
    fn.argtypes = list(argtypes)


_SIGNATURES: List[Tuple[Any, ...]] = [
    # config
    ("fleetprov_config_new", _RES, _PH),
    ("fleetprov_config_free", None, _H),
    ("fleetprov_config_set_endpoint", _RES, _H, c_char_p, c_uint16),
    ("fleetprov_config_set_ca_file", _RES, _H, c_char_p),
    ("fleetprov_config_set_ca_pem", _RES, _H, c_char_p),
    ("fleetprov_config_use_system_roots", _RES, _H),
    ("fleetprov_config_set_claim_files", _RES, _H, c_char_p, c_char_p),
    ("fleetprov_config_set_claim_pem", _RES, _H, c_char_p, c_char_p),
    ("fleetprov_config_set_claim_signer", _RES, _H, c_char_p, TLS_SIGN_CALLBACK, c_void_p, USERDATA_FREE),
    ("fleetprov_config_set_client_id", _RES, _H, c_char_p),
    ("fleetprov_config_set_keep_alive", _RES, _H, c_uint16),
    ("fleetprov_config_set_alpn", _RES, _H, c_bool),
    ("fleetprov_config_set_mqtt_version", _RES, _H, c_int32),
    ("fleetprov_config_set_format", _RES, _H, c_int32),
    ("fleetprov_config_set_timeouts", _RES, _H, c_uint32, c_uint32),
    ("fleetprov_config_set_template", _RES, _H, c_char_p),
    ("fleetprov_config_set_parameter", _RES, _H, c_char_p, c_char_p),
    ("fleetprov_config_clear_parameters", _RES, _H),
    ("fleetprov_config_set_method", _RES, _H, c_int32),
    ("fleetprov_config_set_key_type", _RES, _H, c_int32),
    ("fleetprov_config_set_csr_pem", _RES, _H, c_char_p),
    # public_key as c_char_p: bytes, passed with their length (they may hold NULs)
    ("fleetprov_config_set_signer", _RES, _H, c_char_p, c_size_t, SIGN_CALLBACK, c_void_p, USERDATA_FREE),
    ("fleetprov_config_set_verify", _RES, _H, c_bool),
    ("fleetprov_config_set_output_dir", _RES, _H, c_char_p),
    ("fleetprov_config_set_state_dir", _RES, _H, c_char_p),
    ("fleetprov_config_set_retry", _RES, _H, c_uint32, c_uint32, c_uint32),
    ("fleetprov_config_set_token_lifetime", _RES, _H, c_uint32),
    ("fleetprov_config_set_log_callback", _RES, _H, LOG_CALLBACK, c_void_p, USERDATA_FREE, c_int32),
    ("fleetprov_config_set_progress_callback", _RES, _H, PROGRESS_CALLBACK, c_void_p, USERDATA_FREE),
    # one-call flow
    ("fleetprov_provision", _RES, _H, _PH),
    ("fleetprov_rotate", _RES, _H, c_char_p, _PH),
    ("fleetprov_provision_async", _RES, _H, PROVISION_CALLBACK, c_void_p, USERDATA_FREE, _PH),
    ("fleetprov_operation_cancel", _RES, _H),
    ("fleetprov_operation_wait", _RES, _H),
    ("fleetprov_operation_free", None, _H),
    # host transport (every event function takes now_ms last)
    ("fleetprov_host_new", _RES, _H, POINTER(HostCallbacksStruct), c_void_p, USERDATA_FREE, _PH),
    ("fleetprov_host_free", None, _H),
    ("fleetprov_host_start", _RES, _H, c_uint64),
    ("fleetprov_host_connected", _RES, _H, c_uint64),
    ("fleetprov_host_connect_failed", _RES, _H, c_bool, c_uint64),
    ("fleetprov_host_suback", _RES, _H, POINTER(c_uint8), c_size_t, c_uint64),
    ("fleetprov_host_message", _RES, _H, c_void_p, c_size_t, c_void_p, c_size_t, c_uint64),
    ("fleetprov_host_disconnected", _RES, _H, c_uint64),
    ("fleetprov_host_tick", _RES, _H, c_uint64),
    ("fleetprov_host_wake_at", _RES, _H, POINTER(c_uint64)),
    ("fleetprov_host_result", _RES, _H, _PH),
    # cancellation switch for the blocking calls
    ("fleetprov_cancel_new", _RES, _PH),
    ("fleetprov_cancel_trigger", None, _H),
    ("fleetprov_cancel_is_triggered", c_bool, _H),
    ("fleetprov_cancel_reset", _RES, _H),
    ("fleetprov_cancel_free", None, _H),
    ("fleetprov_config_set_cancel", _RES, _H, _H),
    ("fleetprov_config_set_reprovision", _RES, _H, c_bool),
    ("fleetprov_provisioned_already_provisioned", c_bool, _H),
    # client
    ("fleetprov_client_new", _RES, _H, _PH),
    ("fleetprov_client_free", None, _H),
    ("fleetprov_client_cancel", _RES, _H),
    ("fleetprov_client_connect", _RES, _H),
    ("fleetprov_client_create_keys_and_certificate", _RES, _H, _PH),
    ("fleetprov_client_create_certificate_from_csr", _RES, _H, c_char_p, c_char_p, _PH),
    ("fleetprov_client_register_thing", _RES, _H, _H, c_char_p, _PH),
    ("fleetprov_client_register_thing_with", _RES, _H, c_char_p, c_char_p, POINTER(c_char_p), POINTER(c_char_p), c_size_t, _PH),
    # errors and misc
    ("fleetprov_result_name", c_char_p, c_int32),
    ("fleetprov_version", c_char_p),
    ("fleetprov_last_error_message", _RES, c_char_p, c_size_t, POINTER(c_size_t)),
    ("fleetprov_last_error", _H),
    ("fleetprov_error_result", _RES, _H),
    ("fleetprov_error_message", c_char_p, _H),
    ("fleetprov_error_code", c_char_p, _H),
    ("fleetprov_error_service_message", c_char_p, _H),
    ("fleetprov_error_status_code", c_uint16, _H),
    ("fleetprov_error_is_retryable", c_bool, _H),
    ("fleetprov_error_mqtt_reason_code", c_int32, _H),
    ("fleetprov_error_mqtt_reason_string", c_char_p, _H),
    ("fleetprov_error_free", None, _H),
    # certificate
    ("fleetprov_certificate_id", c_char_p, _H),
    ("fleetprov_certificate_pem", c_char_p, _H),
    ("fleetprov_certificate_ownership_token", c_char_p, _H),
    ("fleetprov_certificate_private_key", c_char_p, _H),
    ("fleetprov_certificate_free", None, _H),
    # registration
    ("fleetprov_registration_thing_name", c_char_p, _H),
    ("fleetprov_registration_config_count", c_size_t, _H),
    ("fleetprov_registration_config_entry", _RES, _H, c_size_t, POINTER(c_char_p), POINTER(c_char_p)),
    ("fleetprov_registration_free", None, _H),
    # provisioned
    ("fleetprov_provisioned_thing_name", c_char_p, _H),
    ("fleetprov_provisioned_certificate_id", c_char_p, _H),
    ("fleetprov_provisioned_certificate_pem", c_char_p, _H),
    ("fleetprov_provisioned_private_key", c_char_p, _H),
    ("fleetprov_provisioned_output_dir", c_char_p, _H),
    ("fleetprov_provisioned_attempts", c_uint32, _H),
    ("fleetprov_provisioned_resumed", c_bool, _H),
    ("fleetprov_provisioned_registration_confirmed", c_bool, _H),
    ("fleetprov_provisioned_config_count", c_size_t, _H),
    ("fleetprov_provisioned_config_entry", _RES, _H, c_size_t, POINTER(c_char_p), POINTER(c_char_p)),
    ("fleetprov_provisioned_free", None, _H),
]

_missing = [sig[0] for sig in _SIGNATURES if not hasattr(lib, sig[0])]
if _missing:
    raise LibraryLoadError(
        f"{LIBRARY_PATH} says it is libfleetprov {EXPECTED_VERSION!r} but lacks "
        + ", ".join(_missing)
        + "; it does not match this package: rebuild it, or set FLEETPROV_LIBRARY to a matching library"
    )
for _sig in _SIGNATURES:
    _declare(*_sig)
del _sig

# Note on borrowed strings: getters declared with restype c_char_p return a Python bytes copy
# made by ctypes at the moment of the call, so borrowed pointers never outlive their owner.


def library_version() -> str:
    """The version string reported by the loaded library."""
    raw = lib.fleetprov_version()
    return raw.decode("utf-8") if raw else ""


def check_version(actual: str, expected: str = EXPECTED_VERSION) -> None:
    """Raises LibraryLoadError unless the library's version is the one this package wraps."""
    if actual != expected:
        raise LibraryLoadError(
            f"{LIBRARY_PATH} is libfleetprov {actual!r} but the fleetprov Python package "
            f"{expected!r} needs exactly that version; point FLEETPROV_LIBRARY at a matching library"
        )


check_version(library_version())
