"""HostFlow driven by hand through an in-memory transport: the calls it makes, its lifecycle,
arguments, exceptions raised by the transport, and the lock that serialises its calls. No
network: the events are fed by the test, with explicit times."""

from __future__ import annotations

import ctypes
import gc
import threading
from typing import Any, Callable, Optional

import pytest

import fleetprov
from fleetprov import _callbacks

T0 = 1000.0  # seconds on the flow's clock; every test passes `now` explicitly
STEP = 2.0
NO_RETRY = fleetprov.Retry(max_attempts=1)
FILTERS = [
    "$aws/certificates/create-from-csr/json/accepted",
    "$aws/certificates/create-from-csr/json/rejected",
    "$aws/provisioning-templates/DemoTemplate/provision/json/accepted",
    "$aws/provisioning-templates/DemoTemplate/provision/json/rejected",
]


class Boom(Exception):
    pass


class FakeTransport:
    """Records what the flow asks; ``hooks[name](*args)`` runs instead of the default (None)."""

    def __init__(self, **hooks: Callable[..., Any]) -> None:
        self.calls: list[tuple] = []
        self.hooks = hooks
        self.threads: set[int] = set()

    def _call(self, name: str, *args: Any) -> Any:
        self.calls.append((name, *args))
        self.threads.add(threading.get_ident())
        hook = self.hooks.get(name)
        return hook(*args) if hook else None

    def connect(self, identity: fleetprov.Identity) -> Optional[bool]:
        return self._call("connect", identity)

    def disconnect(self) -> None:
        self._call("disconnect")

    def subscribe(self, filters: list[str]) -> Optional[bool]:
        return self._call("subscribe", filters)

    def publish(self, topic: str, payload: bytes) -> Optional[bool]:
        return self._call("publish", topic, payload)

    def names(self) -> list[str]:
        return [c[0] for c in self.calls]


def _flow(transport: Any, **extra: Any) -> fleetprov.HostFlow:
    args: dict[str, Any] = dict(
        transport=transport, template_name="DemoTemplate", parameters={"SerialNumber": "fake"},
        step_timeout=STEP, timeout=60.0, retry=NO_RETRY,
    )
    args.update(extra)
    return fleetprov.HostFlow(**args)


def _to_publish(flow: fleetprov.HostFlow) -> None:
    """start, CONNACK, SUBACK: the flow then publishes CreateCertificateFromCsr."""
    flow.start(now=T0)
    flow.connected(now=T0 + 0.01)
    flow.suback([True] * 4, now=T0 + 0.02)


def test_the_flow_asks_the_transport_step_by_step():
    t = FakeTransport()
    with _flow(t) as flow:
        assert repr(flow) == "<fleetprov.HostFlow new>"
        assert flow.transport is t
        assert flow.result() is None and flow.wake_at is None and not flow.started
        flow.start(now=T0)
        assert flow.started and repr(flow) == "<fleetprov.HostFlow running>"
        assert t.calls == [("connect", fleetprov.Identity(claim=True, client_id=""))]
        assert flow.wake_at == pytest.approx(T0 + STEP), "the connect step timeout"
        flow.connected(now=T0 + 0.01)
        assert t.calls[1] == ("subscribe", FILTERS)
        flow.suback([True] * 4, now=T0 + 0.02)
        name, topic, payload = t.calls[2]
        assert (name, topic) == ("publish", "$aws/certificates/create-from-csr/json")
        assert payload.startswith(b'{"certificateSigningRequest":"-----BEGIN CERTIFICATE REQUEST')
        assert flow.wake_at == pytest.approx(T0 + 0.02 + STEP)
        # A message for another topic is ignored; so is a tick before the timer.
        flow.message("some/other/topic", b"\x00\xff", now=T0 + 0.03)
        flow.tick(now=T0 + 0.04)
        assert len(t.calls) == 3 and flow.result() is None


def test_the_callbacks_struct_starts_with_its_size():
    from fleetprov._ffi import HostCallbacksStruct
    from fleetprov._host import HOST_CALLBACKS

    assert HostCallbacksStruct._fields_[0][0] == "size"
    size = ctypes.sizeof(HostCallbacksStruct)
    assert HOST_CALLBACKS.size == size == 5 * ctypes.sizeof(ctypes.c_void_p)


def test_topics_are_str_or_bytes_and_look_alikes_are_ignored():
    """A topic goes to the library as bytes and a length: one that is not UTF-8, or holds a NUL,
    is a topic of no interest (ignored, not an error), never cut down to the reply's topic."""
    reply = "$aws/certificates/create-from-csr/json/accepted"
    t = FakeTransport()
    with _flow(t) as flow:
        _to_publish(flow)
        for look_alike in [
            reply.encode() + b"\xff",
            bytearray(reply.encode() + b"\0"),
            reply + "\0/accepted",
            reply + "\ud800",  # a lone surrogate: not UTF-8 either
            b"",
        ]:
            flow.message(look_alike, b"not a reply", now=T0 + 0.03)
        assert flow.result() is None, "each look-alike was ignored"
        # The reply's topic as bytes (here a memoryview): taken for the reply, whose body is none.
        flow.message(memoryview(reply.encode()), b"not a reply", now=T0 + 0.04)
        with pytest.raises(fleetprov.MalformedReplyError):
            flow.result()


def test_a_step_timeout_ends_the_flow_and_later_events_are_ignored():
    t = FakeTransport()
    with _flow(t) as flow:
        _to_publish(flow)
        flow.tick(now=flow.wake_at)
        assert t.names()[-1] == "disconnect"
        with pytest.raises(fleetprov.StepTimeoutError) as first:
            flow.result()
        with pytest.raises(fleetprov.StepTimeoutError) as again:
            flow.result()
        assert again.value is first.value, "the outcome is kept"
        assert flow.wake_at is None and repr(flow) == "<fleetprov.HostFlow finished>"
        before = list(t.calls)
        flow.connected(now=T0 + 10)
        flow.suback([True], now=T0 + 10)
        flow.message("$aws/certificates/create-from-csr/json/accepted", b"{}", now=T0 + 10)
        flow.disconnected(now=T0 + 10)
        flow.connect_failed(True, now=T0 + 10)
        flow.tick(now=T0 + 100)
        assert t.calls == before, "nothing reaches the transport after the end"


def test_a_refused_connect_is_retried_after_the_pause():
    t = FakeTransport(connect=lambda identity: False)
    with _flow(t, retry=fleetprov.Retry(max_attempts=2, initial_backoff=0.5, max_backoff=0.5)) as flow:
        flow.start(now=T0)
        assert t.names() == ["connect"]
        wake = flow.wake_at
        # The pause (0.25 to 0.5 s with jitter) is stretched to a second after the CONNECT:
        # AWS IoT accepts one CONNECT per second per client id, and the host's stack picks it.
        assert wake == pytest.approx(T0 + 1.0), "the retry pause, stretched to a second"
        flow.tick(now=wake - 0.01)
        assert t.names() == ["connect"], "not before the pause is over"
        flow.tick(now=wake)
        assert t.names() == ["connect", "connect"]
        with pytest.raises(fleetprov.FleetprovConnectionError) as info:
            flow.result()
        assert info.value.retryable


def test_start_twice_and_events_before_start():
    t = FakeTransport()
    with _flow(t) as flow:
        # The library ignores events before start.
        flow.connected(now=T0)
        flow.tick(now=T0)
        assert t.calls == [] and flow.result() is None
        flow.start(now=T0)
        with pytest.raises(RuntimeError, match="already called"):
            flow.start(now=T0)
        assert t.names() == ["connect"]


def test_the_transport_may_report_events_from_inside_its_methods():
    """A transport whose stack answers at once feeds the flow re-entrantly (queued by the
    library): one start() runs the flow up to the first request."""
    holder: dict[str, fleetprov.HostFlow] = {}
    t = FakeTransport(
        connect=lambda identity: holder["flow"].connected(now=T0),
        subscribe=lambda filters: holder["flow"].suback([True] * len(filters), now=T0),
        publish=lambda topic, payload: (holder["flow"].result(), holder["flow"].wake_at),
    )
    with _flow(t) as flow:
        holder["flow"] = flow
        flow.start(now=T0)
        assert t.names() == ["connect", "subscribe", "publish"]
        assert flow.result() is None
        assert flow.wake_at == pytest.approx(T0 + STEP)


def _raise(*_: Any) -> None:
    raise Boom("from the transport")


# Each row: the transport method that raises, and the events that make the flow call it.
RAISING = [
    ("connect", lambda f: f.start(now=T0)),
    ("subscribe", lambda f: (f.start(now=T0), f.connected(now=T0))),
    ("publish", _to_publish),
    ("disconnect", lambda f: (f.start(now=T0), f.connected(now=T0), f.suback([False] * 4, now=T0))),
]


@pytest.mark.parametrize("method,events", RAISING, ids=[r[0] for r in RAISING])
def test_an_exception_in_the_transport_reaches_the_caller_and_ends_the_flow(method, events):
    t = FakeTransport(**{method: _raise})
    with _flow(t, retry=fleetprov.Retry(max_attempts=5, initial_backoff=0.05, max_backoff=0.05)) as flow:
        with pytest.raises(Boom, match="from the transport") as info:
            events(flow)
        assert t.names()[-1] == method
        calls = len(t.calls)
        with pytest.raises(Boom) as again:
            flow.result()
        assert again.value is info.value
        assert flow.wake_at is None
        flow.tick(now=T0 + 30)
        flow.connect_failed(False, now=T0 + 30)
        assert len(t.calls) == calls, "the flow is over: no retry reaches the transport"


def test_an_exception_in_on_progress_reaches_the_caller():
    def progress(p: fleetprov.Progress) -> None:
        if p.step == fleetprov.Step.SUBSCRIBED:
            raise Boom("from on_progress")

    seen: list[str] = []
    t = FakeTransport(publish=lambda topic, payload: seen.append(topic))
    with _flow(t, on_progress=progress) as flow:
        flow.start(now=T0)
        flow.connected(now=T0)
        with pytest.raises(Boom, match="from on_progress"):
            flow.suback([True] * 4, now=T0)
        assert seen == [], "after the exception the transport is not called any more"
        with pytest.raises(Boom):
            flow.result()


# Each row: a bad call and the exception it raises (checked in Python, before the library).
BAD_EVENTS = [
    ("connect_failed str", lambda f: f.connect_failed("yes"), TypeError, "tls must be bool"),
    ("suback 256", lambda f: f.suback([1, 256]), TypeError, "from 0 to 255"),
    ("suback -1", lambda f: f.suback([-1]), TypeError, "from 0 to 255"),
    ("suback float", lambda f: f.suback([1.0]), TypeError, "from 0 to 255"),
    ("suback str", lambda f: f.suback("11"), TypeError, "sequence of int or bool"),
    ("suback None", lambda f: f.suback(None), TypeError, "sequence of int or bool"),
    ("message int topic", lambda f: f.message(1, b""), TypeError, "topic must be str or bytes"),
    ("message None topic", lambda f: f.message(None, b""), TypeError, "topic must be str or bytes"),
    ("message str payload", lambda f: f.message("t", "x"), TypeError, "payload must be bytes"),
    ("negative now", lambda f: f.tick(now=-1.0), fleetprov.InvalidArgumentError, "now out of range"),
    ("NaN now", lambda f: f.tick(now=float("nan")), fleetprov.InvalidArgumentError, "now out of range"),
    ("str now", lambda f: f.tick(now="1"), TypeError, "now must be a number"),
]


@pytest.mark.parametrize("case,call,exc,message", BAD_EVENTS, ids=[r[0] for r in BAD_EVENTS])
def test_bad_event_arguments(case, call, exc, message):
    t = FakeTransport()
    with _flow(t) as flow:
        flow.start(now=T0)
        with pytest.raises(exc, match=message):
            call(flow)
        assert flow.result() is None, "the flow goes on"


class MissingPublish:
    def connect(self, identity): ...
    def disconnect(self): ...
    def subscribe(self, filters): ...


# Each row: constructor arguments and the exception they raise.
BAD_CONSTRUCTION = [
    ("no transport methods", dict(transport=object()), TypeError, "connect, disconnect, subscribe, publish"),
    ("no publish", dict(transport=MissingPublish()), TypeError, "lacks callable method.*publish"),
    ("claim files", dict(cert_file="c.pem"), TypeError, "unexpected keyword argument 'cert_file'"),
    ("no template", dict(template_name=None), fleetprov.InvalidArgumentError, "template_name is required"),
    ("bad template", dict(template_name="a/b"), fleetprov.InvalidArgumentError, "template"),
    ("use_csr int", dict(use_csr=1), TypeError, "use_csr must be bool"),
    ("bad format", dict(payload_format="xml"), fleetprov.InvalidArgumentError, "payload_format"),
    ("bad retry", dict(retry=3), TypeError, "retry must be a fleetprov.Retry"),
    ("parameters list", dict(parameters=[("a", "b")]), TypeError, "parameters must be a mapping"),
]


@pytest.mark.parametrize("case,kwargs,exc,message", BAD_CONSTRUCTION, ids=[r[0] for r in BAD_CONSTRUCTION])
def test_bad_construction(case, kwargs, exc, message):
    before = _callbacks.registry_size()
    args: dict[str, Any] = dict(transport=FakeTransport())
    args.update(kwargs)
    with pytest.raises(exc, match=message):
        _flow(**args)
    gc.collect()
    assert _callbacks.registry_size() == before, "no registration left behind"


def test_close_is_idempotent_and_a_closed_flow_refuses_use():
    before = _callbacks.registry_size()
    flow = _flow(FakeTransport())
    flow.close()
    flow.close()
    assert flow.closed and repr(flow) == "<fleetprov.HostFlow closed>"
    for call in (lambda: flow.start(now=T0), lambda: flow.tick(now=T0), flow.result, lambda: flow.wake_at):
        with pytest.raises(fleetprov.ClosedError):
            call()
    gc.collect()
    assert _callbacks.registry_size() == before, "userdata_free ran"


def test_close_from_inside_the_transport_is_refused():
    holder: dict[str, fleetprov.HostFlow] = {}
    errors: list[BaseException] = []

    def connect(identity: fleetprov.Identity) -> None:
        try:
            holder["flow"].close()
        except RuntimeError as e:
            errors.append(e)

    with _flow(FakeTransport(connect=connect)) as flow:
        holder["flow"] = flow
        flow.start(now=T0)
        assert not flow.closed
        assert len(errors) == 1 and "inside its transport" in str(errors[0])


def test_an_unclosed_flow_is_freed_when_collected():
    before = _callbacks.registry_size()
    flow = _flow(FakeTransport())
    flow.start(now=T0)
    del flow
    gc.collect()
    assert _callbacks.registry_size() == before


class _WatchedLock:
    """The HostFlow's RLock, reporting when a thread has to wait for it."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self.contended = threading.Event()

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        if self._lock.acquire(blocking=False):
            return True
        self.contended.set()  # held by another thread: this one waits
        return self._lock.acquire(blocking, timeout)

    def release(self) -> None:
        self._lock.release()

    __enter__ = acquire

    def __exit__(self, *exc: object) -> None:
        self.release()


def test_calls_from_two_threads_are_serialised():
    """While one thread's call runs the transport, another thread's event waits for it; the
    transport always runs on the thread whose call made the request."""
    other_done = threading.Event()
    holder: dict[str, fleetprov.HostFlow] = {}
    lock = _WatchedLock()
    inside = []

    def other() -> None:
        holder["flow"].connected(now=T0 + 0.01)
        other_done.set()

    worker = threading.Thread(target=other)

    def connect(identity: fleetprov.Identity) -> None:
        inside.append(True)
        worker.start()
        # The worker's call reaches the flow's lock while this call holds it, and waits.
        assert lock.contended.wait(30), "the other thread never reached the lock"
        assert not other_done.is_set()
        inside.pop()

    def subscribe(filters: list[str]) -> None:
        assert not inside, "the worker's event ran while the first call was inside the transport"

    t = FakeTransport(connect=connect, subscribe=subscribe)
    with _flow(t) as flow:
        flow._lock = lock
        holder["flow"] = flow
        flow.start(now=T0)
        worker.join(30)
        assert not worker.is_alive()
        assert other_done.is_set()
        # The worker's CONNACK made the flow subscribe, on the worker's thread.
        assert t.names() == ["connect", "subscribe"]
        assert t.threads == {threading.get_ident(), worker.ident}


# Each row: SUBACK return codes as an MQTT stack gives them, and whether the flow goes on to
# publish (every code below 0x80 grants; 0x80 and MQTT 5's 0x87 "not authorized" refuse).
SUBACK_CODES = [
    ("qos 0 1 2", [0x00, 0x01, 0x02, 0x01], True),
    ("bools", [True, True, True, True], True),
    ("0x80 in the middle", [0x01, 0x80, 0x01, 0x01], False),
    ("0x87 not authorized", [0x01, 0x01, 0x01, 0x87], False),
    ("0xFF", [0xFF, 0x01, 0x01, 0x01], False),
    ("False", [True, False, True, True], False),
]


@pytest.mark.parametrize("case,codes,goes_on", SUBACK_CODES, ids=[r[0] for r in SUBACK_CODES])
def test_suback_takes_the_return_codes_as_the_stack_gives_them(case, codes, goes_on):
    t = FakeTransport()
    with _flow(t) as flow:
        flow.start(now=T0)
        flow.connected(now=T0 + 0.01)
        flow.suback(codes, now=T0 + 0.02)
        if goes_on:
            assert t.names()[-1] == "publish"
            assert flow.result() is None
        else:
            assert "publish" not in t.names()
            with pytest.raises(fleetprov.SubscribeFailedError):
                flow.result()
