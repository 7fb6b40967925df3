"""The official SDK's side of the codec micro-benchmarks: what IotIdentityClientV2 does to a
payload, timed on the same payloads as tests/bench/codec.rs (fixtures/codec.json).

A request is `json.dumps(request.to_payload()).encode()` and an accepted reply
`Response.from_payload(json.loads(payload.decode()))` (awsiot/iotidentity.py and
awsiot/__init__.py, create_v2_service_modeled_future). The SDK has no CBOR. Prints one line of
JSON per case: the median round's nanoseconds per operation.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from awsiot import iotidentity

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "codec.json"
ROUNDS = 15


def measure(budget_s: float, f) -> tuple[float, int]:
    per_round = 1
    round_s = budget_s / ROUNDS
    while True:  # calibrate: calls that fill about a round (bounded)
        t = time.perf_counter()
        for _ in range(per_round):
            f()
        spent = time.perf_counter() - t
        if spent >= round_s / 4 or per_round >= 1 << 24:
            per_round = max(1, int(per_round * round_s / max(spent, 1e-9)))
            break
        per_round *= 4
    samples = []
    for _ in range(ROUNDS):
        t = time.perf_counter()
        for _ in range(per_round):
            f()
        samples.append((time.perf_counter() - t) * 1e9 / per_round)
    samples.sort()
    return samples[ROUNDS // 2], per_round * ROUNDS


def main() -> int:
    budget = int(os.environ.get("FLEETPROV_CODEC_MS", "200")) / 1000
    fx = json.loads(FIXTURES.read_text())
    csr_pem = fx["csr_pem"]
    token = fx["csr_reply"]["certificateOwnershipToken"]
    params = fx["register_parameters"]
    csr_reply = json.dumps(fx["csr_reply"], separators=(",", ":")).encode()
    keys_reply = json.dumps(fx["keys_reply"], separators=(",", ":")).encode()
    register_reply = json.dumps(fx["register_reply"], separators=(",", ":")).encode()
    rejection = json.dumps(fx["rejection"], separators=(",", ":")).encode()

    def enc(req):
        return json.dumps(req.to_payload()).encode()

    cases = [
        ("encode CreateKeysAndCertificate request",
         lambda: enc(iotidentity.CreateKeysAndCertificateRequest())),
        ("encode CreateCertificateFromCsr request",
         lambda: enc(iotidentity.CreateCertificateFromCsrRequest(certificate_signing_request=csr_pem))),
        ("encode RegisterThing request",
         lambda: enc(iotidentity.RegisterThingRequest(
             template_name="DemoTemplate", certificate_ownership_token=token, parameters=params))),
        ("decode CreateCertificateFromCsr accepted",
         lambda: iotidentity.CreateCertificateFromCsrResponse.from_payload(json.loads(csr_reply.decode()))),
        ("decode CreateKeysAndCertificate accepted",
         lambda: iotidentity.CreateKeysAndCertificateResponse.from_payload(json.loads(keys_reply.decode()))),
        ("decode RegisterThing accepted",
         lambda: iotidentity.RegisterThingResponse.from_payload(json.loads(register_reply.decode()))),
        ("decode RegisterThing rejected",
         lambda: iotidentity.V2ErrorResponse.from_payload(json.loads(rejection.decode()))),
    ]
    for name, f in cases:
        f()  # fails loudly before timing if the SDK rejects the payload
        ns, iterations = measure(budget, f)
        print(json.dumps({"case": name, "format": "json", "ns_per_op": round(ns, 1), "iterations": iterations}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
