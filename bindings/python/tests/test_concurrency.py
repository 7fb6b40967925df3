"""Many clients at once, from many Python threads."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import fleetprov

THREADS = 8
WAIT = 120.0


def test_concurrent_one_call(emulator):
    def run(i: int) -> fleetprov.ProvisionResult:
        return fleetprov.provision(
            **emulator.kwargs(
                template_name="DemoTemplate",
                parameters={"SerialNumber": f"par{i}"},
                use_csr=i % 2 == 0,
                payload_format="cbor" if i % 4 < 2 else "json",
            )
        )

    with ThreadPoolExecutor(THREADS) as pool:
        results = list(pool.map(run, range(THREADS), timeout=WAIT))
    assert sorted(r.thing_name for r in results) == sorted(f"demo-par{i}" for i in range(THREADS))
    assert len({r.certificate_id for r in results}) == THREADS
    things = {t["name"] for t in emulator.registry()["things"]}
    assert {r.thing_name for r in results} <= things


def test_concurrent_clients(emulator):
    def run(i: int) -> str:
        with fleetprov.Client(
            **emulator.kwargs(template_name="DemoTemplate", parameters={"SerialNumber": f"cl{i}"})
        ) as c:
            cert = c.create_keys_and_certificate()
            return c.register_thing(cert).thing_name

    with ThreadPoolExecutor(THREADS) as pool:
        names = list(pool.map(run, range(THREADS), timeout=WAIT))
    assert sorted(names) == sorted(f"demo-cl{i}" for i in range(THREADS))


def test_concurrent_async(emulator):
    ops = [
        fleetprov.provision_async(
            **emulator.kwargs(template_name="DemoTemplate", parameters={"SerialNumber": f"as{i}"})
        )
        for i in range(THREADS)
    ]
    names = [op.result(WAIT).thing_name for op in ops]
    assert names == [f"demo-as{i}" for i in range(THREADS)]
