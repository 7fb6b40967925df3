"""HostFlow: the provisioning flow over an MQTT connection the caller owns (fleetprov_host_*).

The library asks the caller's transport to connect, disconnect, subscribe and publish, through
module-level ctypes trampolines; the caller reports what its MQTT stack sees (CONNACK, SUBACK,
messages, a lost connection) and the passing of time. See :class:`HostFlow`.
"""

from __future__ import annotations

import ctypes
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Protocol, Sequence, Union, runtime_checkable

from . import _callbacks
from ._api import (
    DEFAULT_FORMAT,
    DEFAULT_KEY_TYPE,
    DEFAULT_STEP_TIMEOUT,
    DEFAULT_TIMEOUT,
    Format,
    KeyType,
    ProgressCallback,
    ProvisionResult,
    Retry,
    StrPath,
    _build_config,
    _Closeable,
    _method,
    _provisioned_to_result,
    _taken,
)
from ._callbacks import CallbackSlot
from ._ffi import (
    HOST_CONNECT_CALLBACK,
    HOST_DISCONNECT_CALLBACK,
    HOST_PUBLISH_CALLBACK,
    HOST_SUBSCRIBE_CALLBACK,
    IN_PROGRESS,
    NO_TIMER,
    HostCallbacksStruct,
    lib,
)
from .errors import ClosedError, FleetprovError, InvalidArgumentError, check, last_error

__all__ = ["HostFlow", "HostTransport", "Identity"]


@dataclass(frozen=True)
class Identity:
    """The credentials a :class:`HostFlow` asks its transport to connect with.

    ``claim`` True: the host's claim certificate (``certificate_pem`` and ``private_key_pem``
    are None). False: the new device certificate, to check that it works or to learn whether an
    earlier attempt registered it; ``private_key_pem`` is None when the key is the host's own
    (an external CSR). ``client_id`` is the MQTT client id to use (the thing name when known);
    "" lets the transport choose. The key is left out of ``repr``.
    """

    claim: bool
    certificate_pem: Optional[str] = field(default=None, repr=False)
    private_key_pem: Optional[str] = field(default=None, repr=False)
    client_id: str = ""


@runtime_checkable
class HostTransport(Protocol):
    """What a :class:`HostFlow` asks of the caller's MQTT stack.

    Each method is called from inside a :class:`HostFlow` method, on the thread that called it,
    and must return promptly without waiting for the network: start the operation and report its
    outcome later through the flow's event methods (calling them from inside these methods is
    allowed: the event is queued and handled before the outer call returns). Returning False
    means the operation could not be started (for ``connect`` a failed connection attempt, for
    ``subscribe`` and ``publish`` a lost connection); None or True means it was. An exception
    ends the flow: the :class:`HostFlow` method that ran the transport re-raises it, and so does
    every later :meth:`HostFlow.result`.
    """

    def connect(self, identity: Identity) -> Optional[bool]:
        """Drop any current connection and open one with ``identity`` (MQTT clean session);
        report :meth:`HostFlow.connected` on CONNACK or :meth:`HostFlow.connect_failed`."""

    def disconnect(self) -> None:
        """Close the current connection; no event is expected for it afterwards."""

    def subscribe(self, filters: list[str]) -> Optional[bool]:
        """Send one SUBSCRIBE with these filters at QoS 1; report :meth:`HostFlow.suback`."""

    def publish(self, topic: str, payload: bytes) -> Optional[bool]:
        """Publish ``payload`` at QoS 1, not retained. It may hold an ownership token: do not
        log it."""


class _HostState:
    """What the trampolines need for one host object (the registry holds this, not the
    HostFlow, so that an unclosed HostFlow can still be garbage collected)."""

    def __init__(self, transport: Any, slot: CallbackSlot) -> None:
        self.transport = transport
        self.slot = slot
        #: Set by the first exception in a callback: later callbacks no longer reach Python code.
        self.aborted = False
        slot.on_error = self._abort

    def _abort(self) -> None:
        self.aborted = True


def _text(raw: Optional[bytes]) -> Optional[str]:
    return None if raw is None else raw.decode("utf-8", "replace")


def _started(value: Any) -> int:
    """The C return code for a transport method's return value: only False means not started."""
    return 1 if value is False else 0


def _host_connect(userdata: Optional[int], identity: Any) -> int:
    state = _callbacks.lookup(userdata)
    if state is None or state.aborted or not identity:
        return 1
    try:
        raw = identity.contents
        ident = Identity(
            claim=bool(raw.claim),
            certificate_pem=_text(raw.certificate_pem),
            private_key_pem=_text(raw.private_key_pem),
            client_id=_text(raw.client_id) or "",
        )
        with _callbacks.inside():
            return _started(state.transport.connect(ident))
    except BaseException as e:  # never let an exception unwind into C
        state.slot.record(e)
        return 1


def _host_disconnect(userdata: Optional[int]) -> None:
    state = _callbacks.lookup(userdata)
    if state is None or state.aborted:
        return
    try:
        with _callbacks.inside():
            state.transport.disconnect()
    except BaseException as e:
        state.slot.record(e)


def _host_subscribe(userdata: Optional[int], filters: Any, count: int) -> int:
    state = _callbacks.lookup(userdata)
    if state is None or state.aborted:
        return 1
    try:
        names = [_text(filters[i]) or "" for i in range(count)]
        with _callbacks.inside():
            return _started(state.transport.subscribe(names))
    except BaseException as e:
        state.slot.record(e)
        return 1


def _host_publish(userdata: Optional[int], topic: Optional[bytes], payload: Optional[int], length: int) -> int:
    state = _callbacks.lookup(userdata)
    if state is None or state.aborted:
        return 1
    try:
        data = ctypes.string_at(payload, length) if length and payload else b""
        with _callbacks.inside():
            return _started(state.transport.publish(_text(topic) or "", data))
    except BaseException as e:
        state.slot.record(e)
        return 1


# Module-level so they live as long as the library can call them; fleetprov_host_new copies the
# struct.
HOST_CALLBACKS = HostCallbacksStruct(
    ctypes.sizeof(HostCallbacksStruct),
    HOST_CONNECT_CALLBACK(_host_connect),
    HOST_DISCONNECT_CALLBACK(_host_disconnect),
    HOST_SUBSCRIBE_CALLBACK(_host_subscribe),
    HOST_PUBLISH_CALLBACK(_host_publish),
)

_TRANSPORT_METHODS = ("connect", "disconnect", "subscribe", "publish")


def _now_ms(now: Optional[float]) -> int:
    """Milliseconds on the time.monotonic() clock for ``now`` (seconds; None: the current time)."""
    if now is None:
        now = time.monotonic()
    elif isinstance(now, bool) or not isinstance(now, (int, float)):
        raise TypeError(f"now must be a number of seconds (time.monotonic()), not {type(now).__name__}")
    if not 0 <= now < 2**53 / 1000:  # also NaN and infinity
        raise InvalidArgumentError(f"now out of range: {now}", code=1)
    return int(now * 1000)


class HostFlow(_Closeable):
    """The provisioning flow of :func:`provision` — step timeouts, overall deadline, retries,
    the resume journal, the lost-reply probe, the commit — over an MQTT connection that the
    caller owns (e.g. a paho-mqtt client; :mod:`fleetprov.paho` has a ready-made driver).

    ``transport`` is a :class:`HostTransport`: the flow calls its ``connect(identity)``,
    ``disconnect()``, ``subscribe(filters)`` and ``publish(topic, payload)``. The caller:

    1. calls :meth:`start`;
    2. reports what its MQTT stack sees: :meth:`connected` or :meth:`connect_failed` for a
       connect, :meth:`suback` for a subscribe, :meth:`message` for every incoming PUBLISH,
       :meth:`disconnected` when the connection drops;
    3. calls :meth:`tick` no later than :attr:`wake_at` (timeouts and retry pauses happen there:
       the flow has no timer of its own);
    4. after any call, :meth:`result` is None while the flow runs, then the
       :class:`ProvisionResult`, or raises the failure.

    The other keyword arguments are those of :func:`provision` without the connection
    settings (endpoint, port, CA, claim credentials, client id, keep-alive, ALPN), which are
    the transport's business; ``endpoint``, if given, only names the endpoint a resume journal in
    ``state_dir`` belongs to. ``on_progress`` and the ``fleetprov`` logger get their calls on the
    thread calling the event methods.

    Every event method takes an optional ``now``: seconds on the :func:`time.monotonic` clock
    (default: the current time), never decreasing from call to call. Calls are serialised by a
    lock, so the event methods may be called from any thread (e.g. a network thread and a
    timer); the transport runs on the calling thread, inside the lock. Events before
    :meth:`start` and after the flow finished are ignored by the library.

    An exception raised by the transport or by ``on_progress`` ends the flow: the method that ran
    it re-raises it, later event calls are ignored, and :meth:`result` raises it again.

    Use as a context manager; :meth:`close` frees the library object (a journal it wrote stays
    for the next attempt) and must not be called from inside the transport.
    """

    def __init__(
        self,
        *,
        transport: HostTransport,
        template_name: str,
        parameters: Optional[Mapping[str, str]] = None,
        use_csr: bool = True,
        payload_format: Union[str, Format] = DEFAULT_FORMAT,
        output_dir: Optional[StrPath] = None,
        state_dir: Optional[StrPath] = None,
        retry: Optional[Retry] = None,
        token_lifetime: Optional[int] = None,
        reprovision: bool = False,
        timeout: Optional[float] = DEFAULT_TIMEOUT,
        step_timeout: float = DEFAULT_STEP_TIMEOUT,
        verify: bool = True,
        key_type: Union[str, KeyType] = DEFAULT_KEY_TYPE,
        csr_pem: Optional[str] = None,
        endpoint: Optional[str] = None,
        on_progress: Optional[ProgressCallback] = None,
    ) -> None:
        self._handle: Optional[int] = None
        self._lock = threading.RLock()
        self._depth = 0  # > 0 while a library call runs on the lock's owner (re-entry from a callback)
        self._started = False
        self._failure: Optional[BaseException] = None
        self._outcome: Union[ProvisionResult, FleetprovError, None] = None
        missing = [m for m in _TRANSPORT_METHODS if not callable(getattr(transport, m, None))]
        if missing:
            raise TypeError(f"transport lacks callable method(s): {', '.join(missing)}")
        method = _method(use_csr, template_name, csr_pem)
        config, slot = _build_config(
            endpoint=endpoint, port=8883, ca_file=None, ca_pem=None, cert_file=None, key_file=None,
            cert_pem=None, key_pem=None, template_name=template_name, parameters=parameters,
            payload_format=payload_format, timeout=timeout, step_timeout=step_timeout,
            client_id=None, keep_alive=None, alpn=None, on_progress=on_progress,
            method=int(method), key_type=key_type, csr_pem=csr_pem, verify=verify,
            output_dir=output_dir, state_dir=state_dir, retry=retry,
            token_lifetime=token_lifetime, reprovision=reprovision, claim=False, host_transport=True,
        )
        self._state = _HostState(transport, slot)
        with config:
            key = _callbacks.register(self._state)
            out = ctypes.c_void_p()
            # On failure the library has already called userdata_free (unregistering the key).
            code = lib.fleetprov_host_new(
                config.handle, ctypes.byref(HOST_CALLBACKS), key, _callbacks.USERDATA_FREE_TRAMPOLINE,
                ctypes.byref(out),
            )
            if code != 0:
                raise last_error(code)
            self._handle = out.value

    @property
    def transport(self) -> HostTransport:
        """The transport given at construction."""
        transport: HostTransport = self._state.transport
        return transport

    # -- lifetime --
    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._handle is None

    @property
    def started(self) -> bool:
        """Whether :meth:`start` was called."""
        return self._started

    def close(self) -> None:
        """Frees the library object (idempotent). Closes nothing of the transport's. Raises
        RuntimeError when called from inside the transport."""
        with self._lock:
            if self._depth:
                raise RuntimeError("a HostFlow cannot be closed from inside its transport")
            handle, self._handle = self._handle, None
        if handle:
            lib.fleetprov_host_free(handle)

    def _use(self) -> int:
        if self._handle is None:
            raise ClosedError("this HostFlow has been closed")
        return self._handle

    # -- events --
    def _feed(self, fn: Callable[..., int], *args: Any, now: Optional[float]) -> None:
        ms = _now_ms(now)
        with self._lock:
            handle = self._use()
            if self._failure is not None or self._state.aborted:
                return  # ended by an exception: nothing reaches the library any more
            self._depth += 1
            try:
                code = fn(handle, *args, ms)
                error = last_error(code) if code != 0 else None  # same thread, right after
            finally:
                self._depth -= 1
            if self._depth:
                # Re-entered from a callback: the outer call raises what the callbacks raised.
                if error is not None:
                    raise error
                return
            exc = self._state.slot.take_error()
            if exc is not None:
                self._failure = exc
                if error is not None:
                    raise exc from error
                raise exc
            if error is not None:
                raise error

    def start(self, *, now: Optional[float] = None) -> None:
        """Starts the flow: reads the journal, then asks the transport to connect. Raises
        RuntimeError when called a second time."""
        with self._lock:
            self._use()
            if self._started:
                raise RuntimeError("HostFlow.start() was already called")
            self._started = True
            self._feed(lib.fleetprov_host_start, now=now)

    def connected(self, *, now: Optional[float] = None) -> None:
        """The connection asked for by the last ``connect`` is up (CONNACK accepted)."""
        self._feed(lib.fleetprov_host_connected, now=now)

    def connect_failed(self, tls: bool, *, now: Optional[float] = None) -> None:
        """The connection asked for could not be made; ``tls`` True when the TLS handshake
        failed (the server refused the certificate, or it could not be verified): for a new
        certificate this tells the flow that it is not active."""
        if not isinstance(tls, bool):
            raise TypeError(f"tls must be bool, not {type(tls).__name__}")
        self._feed(lib.fleetprov_host_connect_failed, tls, now=now)

    def suback(self, codes: Sequence[Union[int, bool]], *, now: Optional[float] = None) -> None:
        """The SUBACK for the last ``subscribe``: one entry per filter, in order, the return
        code as the MQTT stack gives it (0-255: below 0x80 granted, 0x80 and above refused), or
        a bool (True granted, False refused)."""
        if isinstance(codes, (str, bytes)) or not isinstance(codes, Sequence):
            raise TypeError(f"codes must be a sequence of int or bool, not {type(codes).__name__}")
        raw = []
        for c in codes:
            if isinstance(c, bool):
                raw.append(0x01 if c else 0x80)
            elif isinstance(c, int) and 0 <= c <= 0xFF:
                raw.append(c)
            else:
                raise TypeError(f"a SUBACK return code must be an int from 0 to 255 or a bool, not {c!r}")
        array = (ctypes.c_uint8 * len(raw))(*raw)
        self._feed(lib.fleetprov_host_suback, array, len(raw), now=now)

    def message(
        self,
        topic: Union[str, bytes, bytearray, memoryview],
        payload: Union[bytes, bytearray, memoryview],
        *,
        now: Optional[float] = None,
    ) -> None:
        """An incoming PUBLISH on any topic (the flow ignores what is not for it). ``topic`` is a
        str, or the topic's bytes as the MQTT stack gives them; a topic that is not valid UTF-8
        (bytes, or a str with lone surrogates) cannot be one of the flow's, so its message is
        ignored like any other."""
        if isinstance(topic, str):
            topic_b = topic.encode("utf-8", "surrogatepass")
        elif isinstance(topic, (bytes, bytearray, memoryview)):
            topic_b = bytes(topic)
        else:
            raise TypeError(f"topic must be str or bytes, not {type(topic).__name__}")
        if not isinstance(payload, (bytes, bytearray, memoryview)):
            raise TypeError(f"payload must be bytes, not {type(payload).__name__}")
        data = bytes(payload)
        self._feed(lib.fleetprov_host_message, topic_b, len(topic_b), data, len(data), now=now)

    def disconnected(self, *, now: Optional[float] = None) -> None:
        """The connection dropped (not for one the flow asked to close)."""
        self._feed(lib.fleetprov_host_disconnected, now=now)

    def tick(self, *, now: Optional[float] = None) -> None:
        """Time passed: call at :attr:`wake_at` at the latest (more often is fine)."""
        self._feed(lib.fleetprov_host_tick, now=now)

    # -- state --
    @property
    def wake_at(self) -> Optional[float]:
        """When :meth:`tick` must be called at the latest, in seconds on the
        :func:`time.monotonic` clock (compare with ``time.monotonic()``); None when no timer is
        pending (not started, or finished). Inside the transport it is 0.0 ("tick now")."""
        with self._lock:
            handle = self._use()
            if self._failure is not None:
                return None
            out = ctypes.c_uint64()
            check(lib.fleetprov_host_wake_at(handle, ctypes.byref(out)))
            ms = int(out.value)
        return None if ms == NO_TIMER else ms / 1000.0

    def result(self) -> Optional[ProvisionResult]:
        """None while the flow runs (and inside the transport); then the
        :class:`ProvisionResult` (the same object on every call), or raises the failure: the
        :class:`FleetprovError` the flow ended with, or the exception the transport or
        ``on_progress`` raised."""
        with self._lock:
            handle = self._use()
            if self._failure is not None:
                raise self._failure
            if isinstance(self._outcome, ProvisionResult):
                return self._outcome
            if self._outcome is not None:
                raise self._outcome.with_traceback(None)
            out = ctypes.c_void_p()
            code = lib.fleetprov_host_result(handle, ctypes.byref(out))
            if code == IN_PROGRESS:
                return None
            if code != 0:
                self._outcome = last_error(code)
                raise self._outcome
            try:
                self._outcome = _provisioned_to_result(_taken(out))
            finally:
                lib.fleetprov_provisioned_free(out.value)
            return self._outcome

    def __repr__(self) -> str:
        if self._handle is None:
            state = "closed"
        elif self._failure is not None or self._outcome is not None:
            state = "finished"
        else:
            state = "running" if self._started else "new"
        return f"<fleetprov.HostFlow {state}>"
