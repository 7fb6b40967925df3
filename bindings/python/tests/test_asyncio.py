"""provision_async(): a concurrent.futures.Future, awaitable in asyncio, whose task cancellation
cancels the flow; and the signatures of the public calls."""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import threading
import time
from typing import List

import pytest

import fleetprov
from fleetprov import Step

WAIT = 30.0


def test_await_provision_async(emulator):
    async def main() -> fleetprov.ProvisionResult:
        return await fleetprov.provision_async(
            **emulator.kwargs(template_name="DemoTemplate", parameters={"SerialNumber": "aw"})
        )

    result = asyncio.run(main())
    assert result.thing_name == "demo-aw"
    assert result.registration_confirmed and not result.already_provisioned


def test_gather_several(emulator):
    async def main() -> List[fleetprov.ProvisionResult]:
        ops = [
            fleetprov.provision_async(**emulator.kwargs(template_name="DemoTemplate", parameters={"SerialNumber": f"g{i}"}))
            for i in range(3)
        ]
        return await asyncio.gather(*ops)

    assert sorted(r.thing_name or "" for r in asyncio.run(main())) == ["demo-g0", "demo-g1", "demo-g2"]


def test_task_cancellation_cancels_the_flow_and_keeps_the_journal(emulator_factory, tmp_path):
    emu = emulator_factory("delay:5000@register")
    registering = threading.Event()
    kwargs = emu.kwargs(
        template_name="DemoTemplate", parameters={"SerialNumber": "tc"}, state_dir=tmp_path / "state",
        output_dir=tmp_path / "out",
    )

    def progress(p: fleetprov.Progress) -> None:
        if p.step == Step.REGISTERING:
            registering.set()

    async def main() -> tuple:
        op = fleetprov.provision_async(**kwargs, on_progress=progress)
        task = asyncio.ensure_future(op)
        assert await asyncio.to_thread(registering.wait, WAIT)
        started = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError) as info:
            await task
        return op, time.monotonic() - started, info.value

    op, took, cancelled = asyncio.run(main())
    assert took < 2.0, f"cancelling took {took:.2f} s (the reply was 5 s away)"
    # The flow has stopped (awaiting the task waited for that), with the library's cancellation.
    assert op.done() and isinstance(op.exception(), fleetprov.CancelledError)
    assert not hasattr(cancelled, "fleetprov_result")
    assert (tmp_path / "state" / "journal.json").exists()
    emu.ctl("clear")
    assert fleetprov.provision(**kwargs).resumed


def test_a_future(emulator_factory, emulator):
    done: List[concurrent.futures.Future] = []
    ops = [
        fleetprov.provision_async(**emulator.kwargs(template_name="DemoTemplate", parameters={"SerialNumber": f"f{i}"}))
        for i in range(2)
    ]
    for op in ops:
        assert isinstance(op, concurrent.futures.Future)
        op.add_done_callback(done.append)
    names = sorted(f.result().thing_name or "" for f in concurrent.futures.as_completed(ops, timeout=WAIT))
    assert names == ["demo-f0", "demo-f1"]
    assert sorted(map(id, done)) == sorted(map(id, ops))
    assert not ops[0].cancel(), "a finished operation cannot be cancelled"

    # cancel() of a running operation: True, then CancelledError, also a futures one.
    slow = emulator_factory("delay:5000@register")
    registering = threading.Event()
    op = fleetprov.provision_async(
        **slow.kwargs(template_name="DemoTemplate", parameters={"SerialNumber": "fc"}),
        on_progress=lambda p: p.step == Step.REGISTERING and registering.set(),
    )
    assert registering.wait(WAIT)
    assert op.cancel()
    with pytest.raises(concurrent.futures.CancelledError):
        op.result(WAIT)
    assert isinstance(op.exception(), fleetprov.CancelledError)
    assert not op.cancelled()  # it ran; it ended with the library's cancellation


def test_wrap_future(emulator):
    async def main() -> fleetprov.ProvisionResult:
        op = fleetprov.provision_async(**emulator.kwargs(template_name="DemoTemplate", parameters={"SerialNumber": "wf"}))
        return await asyncio.wrap_future(op)

    assert asyncio.run(main()).thing_name == "demo-wf"


SHARED = ["port", "payload_format", "timeout", "step_timeout", "key_type"]


def test_real_keyword_signatures_with_one_set_of_defaults():
    from fleetprov.paho import PahoTransport, provision_with_paho

    calls = [
        fleetprov.provision, fleetprov.provision_async, fleetprov.rotate, fleetprov.Client,
        fleetprov.HostFlow, provision_with_paho, PahoTransport,
    ]
    for fn in calls:
        params = inspect.signature(fn).parameters.values()
        assert not any(p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL) for p in params), fn
    assert inspect.signature(fleetprov.provision).parameters == inspect.signature(fleetprov.provision_async).parameters
    defaults = {
        "port": 8883, "payload_format": "json", "timeout": 60.0, "step_timeout": 10.0, "key_type": "p256",
    }
    for fn in calls:
        params = inspect.signature(fn).parameters
        for name in SHARED:
            if name in params:
                assert params[name].default == defaults[name], (fn, name)
    with pytest.raises(TypeError, match="bogus"):
        fleetprov.provision_async(endpoint="x", template_name="T", bogus=1)  # type: ignore[call-arg]
