"""One benchmark client process: provisions RUNS devices in a row with one implementation and
prints one line of JSON with what it measured.

    python client.py --impl ours|sdk --flow csr|keys --port P --data-dir EMULATOR_DIR --runs N
                     [--format json|cbor] [--warmup-port P]

`ours` is this repository's Python binding (`fleetprov.provision`), `sdk` the official AWS IoT
Device SDK for Python v2 (`IotIdentityClientV2` over an MQTT 3.1.1 connection made with
`mqtt_connection_builder.mtls_from_path`, as the SDK's fleet provisioning sample does; MQTT 5 with
`--sdk-protocol mqtt5`). Both do the same thing per device: connect with the claim certificate,
make the certificate (CreateCertificateFromCsr with a P-256 key and CSR made in the process, or
CreateKeysAndCertificate), RegisterThing with DemoTemplate, disconnect. Ours is told not to
make its extra verification connection with the new certificate (`verify=False`) unless
`--verify` is given, since the SDK makes none.

`--format cbor` makes ours use the CBOR topics; the SDK's IotIdentityClientV2 has JSON topics
only, so `--format cbor` with `--impl sdk` is refused.

One warm-up provisioning comes first and is left out of the figures; `--warmup-port` sends it
to another port (the emulator itself rather than a slow proxy in front of it, so that the proxy
sees the timed provisionings only). Measured, per process:
the wall time of each provisioning (time.perf_counter), the CPU time of the RUNS provisionings
(getrusage(RUSAGE_SELF): every thread of the process, the SDK's event-loop threads included),
the resident set before the first provisioning (after imports and library loading) and the peak
(VmHWM) at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
import uuid
from pathlib import Path

TIMEOUT = 30.0  # seconds, for every single wait
TEMPLATE = "DemoTemplate"


def status_kb(field: str) -> int:
    """VmRSS / VmHWM of this process in KiB. (Not ru_maxrss: it starts from the parent's
    resident set at the fork, here the benchmark driver's, and so overstates a small child.)"""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def ours(args, paths):
    import fleetprov

    def once(serial: str, port: int) -> None:
        result = fleetprov.provision(
            endpoint=args.host,
            port=port,
            ca_file=paths["ca"],
            cert_file=paths["cert"],
            key_file=paths["key"],
            template_name=TEMPLATE,
            parameters={"SerialNumber": serial},
            use_csr=args.flow == "csr",
            payload_format=args.format,
            verify=args.verify,
            timeout=TIMEOUT,
            client_id=f"claim-{serial}",
        )
        if result.thing_name != f"demo-{serial}" or not result.private_key_pem:
            raise RuntimeError(f"unexpected result {result!r}")

    return once


def sdk(args, paths):
    import concurrent.futures

    from awscrt import mqtt5, mqtt_request_response
    from awsiot import iotidentity, mqtt5_client_builder, mqtt_connection_builder

    if args.flow == "csr":
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

    options = mqtt_request_response.ClientOptions(
        max_request_response_subscriptions=2,
        max_streaming_subscriptions=0,
        operation_timeout_in_seconds=int(TIMEOUT),
    )

    def connect_311(client_id: str, port: int):
        conn = mqtt_connection_builder.mtls_from_path(
            endpoint=args.host,
            port=port,
            cert_filepath=paths["cert"],
            pri_key_filepath=paths["key"],
            ca_filepath=paths["ca"],
            client_id=client_id,
            clean_session=True,
            keep_alive_secs=30,
        )
        conn.connect().result(TIMEOUT)
        return conn, lambda: conn.disconnect().result(TIMEOUT)

    def connect_5(client_id: str, port: int):
        connected: concurrent.futures.Future = concurrent.futures.Future()
        stopped: concurrent.futures.Future = concurrent.futures.Future()

        def on_success(_data):
            if not connected.done():
                connected.set_result(True)

        def on_failure(data):
            if not connected.done():
                connected.set_exception(data.exception or RuntimeError("connection failure"))

        def on_stopped(_data):
            if not stopped.done():
                stopped.set_result(True)

        client = mqtt5_client_builder.mtls_from_path(
            endpoint=args.host,
            port=port,
            cert_filepath=paths["cert"],
            pri_key_filepath=paths["key"],
            ca_filepath=paths["ca"],
            client_id=client_id,
            session_behavior=mqtt5.ClientSessionBehaviorType.CLEAN,
            on_lifecycle_connection_success=on_success,
            on_lifecycle_connection_failure=on_failure,
            on_lifecycle_stopped=on_stopped,
        )
        client.start()
        connected.result(TIMEOUT)

        def close():
            client.stop()
            stopped.result(TIMEOUT)

        return client, close

    connect = connect_5 if args.sdk_protocol == "mqtt5" else connect_311

    def once(serial: str, port: int) -> None:
        conn, close = connect(f"claim-{serial}", port)
        try:
            identity = iotidentity.IotIdentityClientV2(conn, options)
            if args.flow == "csr":
                key = ec.generate_private_key(ec.SECP256R1())
                csr = (
                    x509.CertificateSigningRequestBuilder()
                    .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fleetprov device")]))
                    .sign(key, hashes.SHA256())
                    .public_bytes(serialization.Encoding.PEM)
                    .decode()
                )
                created = identity.create_certificate_from_csr(
                    iotidentity.CreateCertificateFromCsrRequest(certificate_signing_request=csr)
                ).result(TIMEOUT)
                key_pem = key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                ).decode()
            else:
                created = identity.create_keys_and_certificate(
                    iotidentity.CreateKeysAndCertificateRequest()
                ).result(TIMEOUT)
                key_pem = created.private_key
            registered = identity.register_thing(
                iotidentity.RegisterThingRequest(
                    template_name=TEMPLATE,
                    certificate_ownership_token=created.certificate_ownership_token,
                    parameters={"SerialNumber": serial},
                )
            ).result(TIMEOUT)
            if registered.thing_name != f"demo-{serial}" or not key_pem:
                raise RuntimeError(f"unexpected result {registered!r}")
        finally:
            close()

    return once


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--impl", choices=["ours", "sdk"], required=True)
    p.add_argument("--flow", choices=["csr", "keys"], required=True)
    p.add_argument("--host", default="localhost")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--data-dir", type=Path, required=True, help="the emulator's data directory")
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--verify", action="store_true", help="ours: also connect with the new certificate")
    p.add_argument("--sdk-protocol", choices=["mqtt311", "mqtt5"], default="mqtt311")
    p.add_argument("--format", choices=["json", "cbor"], default="json", help="ours: the payload format")
    p.add_argument("--warmup-port", type=int, help="the warm-up provisioning's port (default: --port)")
    args = p.parse_args()
    if args.impl == "sdk" and args.format != "json":
        p.error("the SDK's IotIdentityClientV2 has JSON topics only")
    if not 0 <= args.runs <= 10000:
        p.error("--runs must be 0..10000 (0: the one warm-up provisioning only)")
    paths = {
        "ca": str(args.data_dir / "ca.pem"),
        "cert": str(args.data_dir / "claim.pem"),
        "key": str(args.data_dir / "claim.key"),
    }
    once = (ours if args.impl == "ours" else sdk)(args, paths)
    tag = uuid.uuid4().hex[:8]
    rss_before = status_kb("VmRSS")
    t0 = time.perf_counter()
    once(f"{args.impl}-{args.flow}-{tag}-warmup", args.warmup_port or args.port)
    first_ms = (time.perf_counter() - t0) * 1000
    times = []
    cpu0 = cpu_s()
    for i in range(args.runs):
        t = time.perf_counter()
        once(f"{args.impl}-{args.flow}-{tag}-{i}", args.port)
        times.append((time.perf_counter() - t) * 1000)
    cpu = cpu_s() - cpu0 if args.runs else 0.0
    peak = status_kb("VmHWM")
    print(json.dumps({
        "impl": args.impl,
        "flow": args.flow,
        "format": args.format,
        "warmup_port": args.warmup_port or args.port,
        "runs": args.runs,
        "first_ms": first_ms,
        "times_ms": times,
        "cpu_ms_per_run": cpu * 1000 / max(args.runs, 1),
        "rss_before_kb": rss_before,
        "peak_rss_kb": peak,
        "threads": len(os.listdir("/proc/self/task")),
    }))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
