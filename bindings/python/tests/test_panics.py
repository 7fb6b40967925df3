"""What a panic or an internal failure inside the library becomes in Python: the library built
with the cargo feature ``test-panics`` (``FLEETPROV_TEST_PANICS_LIBRARY`` names it; the README's
test command builds it) fails on request (``FLEETPROV_TEST_PANIC`` / ``FLEETPROV_TEST_FAIL``).
Each case runs in a subprocess, which loads that library; the process lives on after the failure
and its next call works."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import fleetprov

LIB = os.environ.get("FLEETPROV_TEST_PANICS_LIBRARY")
pytestmark = pytest.mark.skipif(
    not LIB, reason="FLEETPROV_TEST_PANICS_LIBRARY is not set (tests/run.sh sets it)"
)

SCRIPT = r"""
import json, os, sys
import fleetprov

args = json.loads(sys.argv[1])
variable, site, runner = sys.argv[2:5]
args["retry"] = fleetprov.Retry(max_attempts=1)

def attempt():
    if runner == "blocking":
        return fleetprov.provision(**args)
    with fleetprov.provision_async(**args) as op:
        return op.result(30)

os.environ[variable] = site
try:
    attempt()
    failure = None
except fleetprov.FleetprovError as e:
    failure = {"type": type(e).__name__, "code": e.code, "retryable": e.retryable,
               "message": str(e)}
del os.environ[variable]
after = attempt()  # the same call, nothing injected: it works
print(json.dumps({"failure": failure, "after": after.thing_name}))
"""

CASES = [
    ("FLEETPROV_TEST_PANIC", "provision", "blocking", "PanicError", 14, "the library panicked"),
    ("FLEETPROV_TEST_PANIC", "provision-async", "async", "PanicError", 14, "the library panicked"),
    ("FLEETPROV_TEST_FAIL", "thread-spawn", "async", "InternalError", 16,
     "cannot start a worker thread"),
]


@pytest.mark.parametrize("variable,site,runner,kind,code,text", CASES, ids=[c[1] for c in CASES])
def test_an_internal_failure_is_its_own_exception_and_the_process_goes_on(
    emulator, variable, site, runner, kind, code, text
):
    args = {k: str(v) if not isinstance(v, int) else v for k, v in emulator.kwargs().items()}
    args.update(template_name="DemoTemplate", parameters={"SerialNumber": f"panic-{site}"})
    env = dict(os.environ, FLEETPROV_LIBRARY=str(LIB))
    p = subprocess.run(
        [sys.executable, "-c", SCRIPT, json.dumps(args), variable, site, runner],
        capture_output=True, text=True, timeout=120, env=env,
    )
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout.strip().splitlines()[-1])
    failure = out["failure"]
    assert failure is not None, "the injected failure did not happen"
    assert (failure["type"], failure["code"], failure["retryable"]) == (kind, code, False)
    assert text in failure["message"]
    assert out["after"] == f"demo-panic-{site}"
    assert issubclass(getattr(fleetprov, kind), fleetprov.FleetprovError)
