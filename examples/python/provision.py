#!/usr/bin/env python3
"""Provision a device with AWS IoT Core fleet provisioning (or the fleetprov emulator).

    python examples/python/provision.py --endpoint localhost --port 8883 \
        --ca DIR/ca.pem --cert DIR/claim.pem --key DIR/claim.key \
        --template DemoTemplate --param SerialNumber=0001 --out ./device \
        --state-dir ./device/provisioning --retry 5:1:30

With --state-dir, a run that fails after the certificate was created (lost connection, crash,
power loss) leaves a resume journal there; the next run picks that certificate up instead of
creating another, as long as its ownership token is valid.

Certificate rotation, with the credentials a provisioning run wrote to ./device (no claim
certificate; the files are replaced only after the new certificate connected):

    python examples/python/provision.py --endpoint localhost --port 8883 --ca DIR/ca.pem \
        --rotate ./device --template RotationTemplate --param ThingName=demo-0001

With --paho the MQTT connection is paho-mqtt's (pip install 'paho-mqtt>=2,<3'), driven through
the library's host-transport API (fleetprov.paho), instead of the library's own.

Needs the fleetprov package: pip install ./bindings/python builds libfleetprov and bundles it
(FLEETPROV_LIBRARY=/path/to/libfleetprov.so loads another).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import fleetprov


def parse_param(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def parse_retry(text: str) -> fleetprov.Retry:
    """ATTEMPTS[:INITIAL[:MAX]] (seconds) -> fleetprov.Retry; unset parts keep their defaults."""
    parts = text.split(":")
    if len(parts) > 3 or not all(parts):
        raise argparse.ArgumentTypeError(f"expected ATTEMPTS[:INITIAL[:MAX]], got {text!r}")
    try:
        attempts = int(parts[0])
        backoffs = [float(x) for x in parts[1:]]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected ATTEMPTS[:INITIAL[:MAX]] with numbers, got {text!r}") from None
    defaults = fleetprov.Retry()
    initial = backoffs[0] if backoffs else defaults.initial_backoff
    maximum = backoffs[1] if len(backoffs) > 1 else max(defaults.max_backoff, initial)
    try:
        return fleetprov.Retry(max_attempts=attempts, initial_backoff=initial, max_backoff=maximum)
    except fleetprov.InvalidArgumentError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def describe(p: fleetprov.Progress) -> str:
    """One line for a progress report, e.g. "registering" or "attempt 1 failed (...); ..."."""
    if p.step == fleetprov.Step.RETRYING:
        return f"attempt {p.attempt} failed ({p.error}); retrying in {p.retry_in:.2f} s"
    step = p.step.name.lower().replace("_", " ") if isinstance(p.step, fleetprov.Step) else str(p.step)
    return f"{step} (attempt {p.attempt})" if p.attempt > 1 else step


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--endpoint", required=True, help="AWS IoT data endpoint (host name)")
    p.add_argument("--port", type=int, default=8883, help="MQTT over TLS port (default 8883)")
    p.add_argument("--ca", help="CA certificates PEM file (default: system roots)")
    p.add_argument("--cert", help="claim certificate PEM file (not with --rotate)")
    p.add_argument("--key", help="claim private key PEM file (not with --rotate)")
    p.add_argument("--rotate", metavar="DIR",
                   help="rotate the certificate of the device whose credentials are in DIR "
                        "(certificate.pem, private.key, device.json), replacing them there")
    p.add_argument("--paho", action="store_true",
                   help="connect with paho-mqtt through the host-transport API (needs paho-mqtt 2.x)")
    p.add_argument("--template", required=True, help="provisioning template name")
    p.add_argument("--param", action="append", type=parse_param, default=[], metavar="KEY=VALUE",
                   help="template parameter (repeatable)")
    p.add_argument("--format", choices=["json", "cbor"], default="json", help="payload format")
    p.add_argument("--keys", action="store_true",
                   help="use CreateKeysAndCertificate instead of a CSR with a key made here")
    p.add_argument("--out", metavar="DIR", help="write certificate.pem, private.key, device.json here")
    p.add_argument("--state-dir", metavar="DIR",
                   help="keep the resume journal here, so that a failed run can be resumed")
    p.add_argument("--retry", type=parse_retry, metavar="ATTEMPTS[:INITIAL[:MAX]]",
                   help="attempts in all (1: no retries) and the backoff in seconds, "
                        "doubling from INITIAL up to MAX (default 5:1:30)")
    p.add_argument("--client-id", help="MQTT client id")
    p.add_argument("--timeout", type=float, default=60.0, help="overall timeout, seconds")
    p.add_argument("--no-verify", action="store_true", help="skip the test connection with the new certificate")
    p.add_argument("-v", "--verbose", action="count", default=0, help="-v: info logs, -vv: debug logs")
    args = p.parse_args(argv)
    if args.rotate is None and (args.cert is None or args.key is None):
        p.error("--cert and --key are required (except with --rotate)")
    if args.rotate is not None:
        if args.cert is not None or args.key is not None:
            p.error("--rotate connects with the credentials in DIR: --cert/--key are not used")
        if args.paho or args.no_verify:
            p.error("--rotate takes neither --paho nor --no-verify")

    level = logging.WARNING if args.verbose == 0 else logging.INFO if args.verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    def progress(report: fleetprov.Progress) -> None:
        if args.verbose or report.step == fleetprov.Step.RETRYING:
            print(f"  .. {describe(report)}", file=sys.stderr)

    common = dict(
        endpoint=args.endpoint,
        port=args.port,
        ca_file=args.ca,
        template_name=args.template,
        parameters=dict(args.param),
        use_csr=not args.keys,
        payload_format=args.format,
        output_dir=args.out,
        timeout=args.timeout,
        client_id=args.client_id,
        state_dir=args.state_dir,
        retry=args.retry,
        on_progress=progress,
    )
    # Where a failed run leaves its resume journal.
    state_dir = args.state_dir or (str(Path(args.rotate) / "rotation-journal") if args.rotate else None)
    try:
        if args.rotate is not None:
            result = fleetprov.rotate(args.rotate, **common)
        elif args.paho:
            try:
                from fleetprov.paho import provision_with_paho
            except ImportError as e:
                print(f"--paho: {e}", file=sys.stderr)
                return 1
            result = provision_with_paho(cert_file=args.cert, key_file=args.key, verify=not args.no_verify, **common)
        else:
            result = fleetprov.provision(cert_file=args.cert, key_file=args.key, verify=not args.no_verify, **common)
    except fleetprov.BusyError as e:
        print(f"busy: another provisioning run uses {state_dir}: {e}", file=sys.stderr)
        return 1
    except fleetprov.FleetprovError as e:
        if isinstance(e, fleetprov.RejectedError):
            print(f"rejected: {e.status_code} {e.error_code}: {e.error_message}", file=sys.stderr)
        else:
            print(f"error ({e.code_name}): {e}", file=sys.stderr)
        if args.rotate is not None and not isinstance(e, fleetprov.StorageError):
            print(f"the credentials in {args.rotate} are unchanged", file=sys.stderr)
        if state_dir and (Path(state_dir) / "journal.json").is_file():
            print(f"the new certificate is kept in {state_dir}: run again to resume", file=sys.stderr)
        return 2 if isinstance(e, fleetprov.RejectedError) else 1

    if args.rotate is not None:
        print(f"rotated the certificate of {args.rotate}")
    print(f"thing name: {result.thing_name}")
    print(f"certificate id: {result.certificate_id}")
    if result.resumed:
        print(f"resumed the certificate from the journal in {state_dir}")
    if result.attempts > 1:
        print(f"attempts: {result.attempts}")
    if result.output_dir is not None:
        print(f"credentials written to: {result.output_dir}")
    else:
        print("credentials not written (use --out DIR to save them)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
