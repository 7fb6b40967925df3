"""Module-level ctypes trampolines and the thread-safe registry they look callables up in.

The C library only ever sees an integer key as userdata, never a pointer to a Python object.
Each registration gets its own key; the library's ``userdata_free`` removes it from the
registry, so a key lives exactly as long as the library may call back with it.
"""

from __future__ import annotations

import ctypes
import itertools
import logging
import threading
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

from . import _ffi

logger = logging.getLogger("fleetprov")
# A library does not print on its own: without configured logging, records are dropped.
logger.addHandler(logging.NullHandler())

_LEVELS = {
    1: logging.ERROR,
    2: logging.WARNING,
    3: logging.INFO,
    4: logging.DEBUG,
}

_registry: Dict[int, Any] = {}
_registry_lock = threading.Lock()
_keys = itertools.count(1)  # 0 would arrive as NULL / None


def register(obj: Any) -> int:
    """Stores `obj` under a new key and returns the key (to pass as userdata)."""
    with _registry_lock:
        key = next(_keys)
        _registry[key] = obj
        return key


def lookup(key: Optional[int]) -> Any:
    """The object stored under `key`, or None."""
    if not key:
        return None
    with _registry_lock:
        return _registry.get(key)


def unregister(key: Optional[int]) -> None:
    """Forgets `key` (idempotent)."""
    if not key:
        return
    with _registry_lock:
        _registry.pop(key, None)


_state = threading.local()


def in_callback() -> bool:
    """Whether this thread is running one of the library's callbacks (through a trampoline)."""
    return getattr(_state, "depth", 0) > 0


@contextmanager
def inside() -> Iterator[None]:
    """Marks this thread as running a library callback for the ``with`` block."""
    _state.depth = getattr(_state, "depth", 0) + 1
    try:
        yield
    finally:
        _state.depth -= 1


def registry_size() -> int:
    """Number of live registrations (for tests: proves userdata_free ran)."""
    with _registry_lock:
        return len(_registry)


class CallbackSlot:
    """What the log and progress trampolines need for one config (and the clients and
    operations made from it): the Python progress callable and the exceptions it raised."""

    def __init__(self, on_progress: Optional[Callable[[Any], None]]) -> None:
        self.on_progress = on_progress
        self._errors: List[BaseException] = []
        # Exceptions raised by a signer (claim_signer, device_signer): they do not cancel; the
        # library fails with FLEETPROV_SIGNER and the first becomes that error's __cause__.
        self._signer_errors: List[Tuple[str, Exception]] = []
        self._lock = threading.Lock()
        #: Called (from the callback's thread) after the first exception; e.g. cancels.
        self.on_error: Optional[Callable[[], None]] = None

    def record(self, exc: BaseException) -> None:
        with self._lock:
            first = not self._errors
            self._errors.append(exc)
            hook = self.on_error
        if first and hook is not None:
            try:
                hook()
            except Exception:  # pragma: no cover - cancelling must not raise into C
                pass

    @property
    def failed(self) -> bool:
        """Whether an exception was recorded (and not taken yet): ``on_progress`` is not called
        any more then."""
        with self._lock:
            return bool(self._errors)

    def record_signer(self, what: str, exc: Exception) -> None:
        """Keeps an exception the signer `what` ("claim signer", "device signer") raised, or
        one made for its wrong return value, for the error the library then reports."""
        with self._lock:
            self._signer_errors.append((what, exc))

    def take_signer_error(self) -> Optional[Tuple[str, Exception]]:
        """The first (what, exception) recorded by :meth:`record_signer` (clearing them), or
        None."""
        with self._lock:
            errors, self._signer_errors = self._signer_errors, []
        return errors[0] if errors else None

    def take_error(self) -> Optional[BaseException]:
        """The captured exception (clearing the list), or None: the first interrupt
        (KeyboardInterrupt, SystemExit: not an Exception) if there was one, else the first."""
        with self._lock:
            errors, self._errors = self._errors, []
        for e in errors:
            if not isinstance(e, Exception):
                return e
        return errors[0] if errors else None


def _log(userdata: Optional[int], level: int, message: Optional[int], length: int) -> None:
    slot = lookup(userdata)
    try:
        text = ctypes.string_at(message, length).decode("utf-8", "replace") if message else ""
        py_level = _LEVELS.get(level, logging.DEBUG)
        if logger.isEnabledFor(py_level):
            logger.log(py_level, "%s", text)
    except BaseException as e:  # never let an exception unwind into C
        if slot is not None:
            slot.record(e)


def _progress(userdata: Optional[int], progress: Any) -> None:
    """``progress`` is a borrowed ``POINTER(ProgressStruct)``: everything is copied out of it
    (the error included) before the Python callable runs."""
    slot = lookup(userdata)
    if slot is None or slot.on_progress is None or not progress or slot.failed:
        return  # not called again once it raised, nor once the call is being interrupted
    try:
        from ._api import Progress  # local import: _api imports this module

        with inside():
            slot.on_progress(Progress._from_c(progress.contents))
    except BaseException as e:
        slot.record(e)


class SignerEntry:
    """What a signing trampoline needs: the Python callable, what it is (for messages), and
    the slot of the config it belongs to. Registered once per config; the library's
    ``userdata_free`` removes it when the config and every operation using it are done."""

    def __init__(self, slot: CallbackSlot, sign: Callable[..., Any], what: str) -> None:
        self.slot = slot
        self.sign = sign
        self.what = what

    def run(self, args: Callable[[], Tuple[Any, ...]], signature: Optional[int], signature_len: Any) -> int:
        """Calls the signer with ``args()`` and writes its signature to the library's buffer;
        0 on success. Nothing raised crosses into C: an ``Exception`` (the signer's, or a
        wrong return value) is kept for the error the library then reports (FLEETPROV_SIGNER)
        and -1 returned; an interrupt (KeyboardInterrupt, SystemExit) is recorded like one in
        ``on_progress``, which cancels the flow."""
        if self.slot.failed:
            return -1  # the call is being interrupted: sign nothing more
        try:
            with inside():
                raw = self.sign(*args())
            if not isinstance(raw, (bytes, bytearray, memoryview)):
                raise TypeError(f"the {self.what} must return the signature as bytes, not {type(raw).__name__}")
            sig = bytes(raw)
            room = int(signature_len[0]) if signature_len else 0
            if not sig:
                raise ValueError(f"the {self.what} returned an empty signature")
            if len(sig) > room or not signature:
                raise ValueError(
                    f"the {self.what} returned a signature of {len(sig)} bytes; the library has room for {room}"
                )
            ctypes.memmove(signature, sig, len(sig))
            signature_len[0] = len(sig)
            return 0
        except Exception as e:
            self.slot.record_signer(self.what, e)
        except BaseException as e:  # KeyboardInterrupt, SystemExit: never into C
            self.slot.record(e)
        return -1


def _bytes_at(ptr: Optional[int], length: int) -> bytes:
    """A copy of a borrowed ``(ptr, len)`` view (NULL with length 0: empty)."""
    return ctypes.string_at(ptr, length) if ptr and length else b""


def _tls_sign(
    userdata: Optional[int],
    scheme: int,
    message: Optional[int],
    message_len: int,
    digest: Optional[int],
    digest_len: int,
    signature: Optional[int],
    signature_len: Any,
) -> int:
    entry: Optional[SignerEntry] = lookup(userdata)
    if entry is None:
        return -1
    try:
        from ._api import SignatureScheme  # local import: _api imports this module

        def args() -> Tuple[Any, ...]:
            try:
                kind = SignatureScheme(scheme)
            except ValueError:
                raise ValueError(f"the library asked the claim signer for an unknown signature scheme {scheme}") from None
            return kind, _bytes_at(message, message_len), _bytes_at(digest, digest_len)

        return entry.run(args, signature, signature_len)
    except BaseException:  # pragma: no cover - run() guards itself
        return -1


def _sign(
    userdata: Optional[int],
    message: Optional[int],
    message_len: int,
    digest: Optional[int],
    digest_len: int,
    signature: Optional[int],
    signature_len: Any,
) -> int:
    entry: Optional[SignerEntry] = lookup(userdata)
    if entry is None:
        return -1
    try:
        return entry.run(
            lambda: (_bytes_at(message, message_len), _bytes_at(digest, digest_len)), signature, signature_len
        )
    except BaseException:  # pragma: no cover - run() guards itself
        return -1


def _userdata_free(userdata: Optional[int]) -> None:
    try:
        unregister(userdata)
    except BaseException:  # pragma: no cover
        pass


def _provision_done(userdata: Optional[int], result: int, provisioned: Optional[int], error: Optional[int]) -> None:
    op = lookup(userdata)
    try:
        if op is None:
            # Nobody to hand it to: free what we own.
            if provisioned:
                _ffi.lib.fleetprov_provisioned_free(provisioned)
            return
        with inside():
            op._complete(result, provisioned, error)
    except BaseException as e:  # pragma: no cover - _complete guards itself
        try:
            op._fail(e)
        except BaseException:
            pass


# Module-level so they live as long as the library can call them.
LOG_TRAMPOLINE = _ffi.LOG_CALLBACK(_log)
PROGRESS_TRAMPOLINE = _ffi.PROGRESS_CALLBACK(_progress)
USERDATA_FREE_TRAMPOLINE = _ffi.USERDATA_FREE(_userdata_free)
PROVISION_TRAMPOLINE = _ffi.PROVISION_CALLBACK(_provision_done)
TLS_SIGN_TRAMPOLINE = _ffi.TLS_SIGN_CALLBACK(_tls_sign)
SIGN_TRAMPOLINE = _ffi.SIGN_CALLBACK(_sign)
