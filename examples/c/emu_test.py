#!/usr/bin/env python3
"""ctest driver: starts fleetprov-emulator, runs one C example against it, checks the outcome.

    emu_test.py --emulator PATH --work DIR --case ok|cbor|reject|badargs|timeout|cancel [--serial S]
                [--timeout SECS] -- [LAUNCHER...] PROGRAM

Everything after `--` is the command to run (a launcher such as valgrind may come first); the
driver appends the connection arguments. The emulator runs with `--data-dir WORK/emulator
--port 0 --key-type ec` and is always killed at the end. Only the standard library is used.
"""
import argparse
import base64
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time

SANITIZER_MARKERS = ("ERROR: AddressSanitizer", "ERROR: LeakSanitizer", "runtime error:",
                     "ERROR: UndefinedBehaviorSanitizer", "WARNING: ThreadSanitizer")


class Failed(Exception):
    pass


def check(cond, msg):
    if not cond:
        raise Failed(msg)


class Emulator:
    def __init__(self, binary, data_dir):
        self.binary, self.data_dir = binary, data_dir
        self.proc = None
        self.port = None

    def start(self, extra=(), wait_s=60.0):
        if os.path.exists(self.data_dir):
            shutil.rmtree(self.data_dir)
        self.out_path = self.data_dir + ".out"
        out = open(self.out_path, "w")
        self.proc = subprocess.Popen(
            [self.binary, "--data-dir", self.data_dir, "--port", "0", "--key-type", "ec", *extra],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True)
        out.close()
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            with open(self.out_path) as f:
                m = re.search(r"^listening on (\S+):(\d+)$", f.read(), re.M)
            if m:
                self.port = int(m.group(2))
                return
            if self.proc.poll() is not None:
                raise Failed(f"the emulator exited with {self.proc.returncode}:\n"
                             + open(self.out_path).read())
            time.sleep(0.05)
        raise Failed(f"the emulator did not report its port within {wait_s} s")

    def stop(self):
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=5)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=5)

    def registry(self):
        out = subprocess.run([self.binary, "list", "--data-dir", self.data_dir],
                             capture_output=True, text=True, timeout=60, check=True).stdout
        return json.loads(out)

    def path(self, name):
        return os.path.join(self.data_dir, name)


def run(cmd, timeout_s):
    print("+ " + " ".join(cmd), flush=True)
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s,
                           stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as e:
        raise Failed(f"timed out after {timeout_s} s: {e.stdout} {e.stderr}")
    sys.stdout.write("--- stdout\n" + p.stdout + "--- stderr\n" + p.stderr + "---\n")
    sys.stdout.flush()
    for marker in SANITIZER_MARKERS:
        check(marker not in p.stderr, f"sanitizer report ({marker!r})")
    check(p.returncode != 99, "valgrind reported errors (exit 99)")
    check(p.returncode >= 0, f"killed by signal {-p.returncode}")
    return p


def fields(stdout):
    out = {}
    for line in stdout.splitlines():
        k, sep, v = line.partition("=")
        if sep:
            out[k] = v
    return out


def pem_der(path):
    text = open(path).read()
    m = re.search(r"-----BEGIN CERTIFICATE-----(.*?)-----END CERTIFICATE-----", text, re.S)
    check(m is not None, f"{path}: no certificate PEM")
    return base64.b64decode("".join(m.group(1).split()))


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def key_matches_certificate(cert, key):
    """With the openssl command (if installed): the key's public key is the certificate's."""
    if shutil.which("openssl") is None:
        print("openssl command not found: key/certificate match not checked")
        return
    a = subprocess.run(["openssl", "x509", "-noout", "-pubkey", "-in", cert],
                       capture_output=True, text=True, check=True, timeout=30).stdout
    b = subprocess.run(["openssl", "pkey", "-pubout", "-in", key],
                       capture_output=True, text=True, check=True, timeout=30).stdout
    check(a.strip() == b.strip() and a.strip(), "private.key does not match certificate.pem")


def connection_args(emu, out_dir, template="DemoTemplate", serial="X"):
    return ["--endpoint", "localhost", "--port", str(emu.port), "--ca", emu.path("ca.pem"),
            "--cert", emu.path("claim.pem"), "--key", emu.path("claim.key"),
            "--template", template, "--param", f"SerialNumber={serial}", "--out", out_dir]


def case_ok(cmd, emu, work, serial, fmt, timeout_s):
    out_dir = os.path.join(work, "device")
    p = run(cmd + connection_args(emu, out_dir, serial=serial) + ["--format", fmt], timeout_s)
    check(p.returncode == 0, f"exit code {p.returncode}, expected 0")
    f = fields(p.stdout)
    check(f.get("thing_name") == f"demo-{serial}", f"thing_name={f.get('thing_name')}")
    cert_id = f.get("certificate_id", "")
    check(re.fullmatch(r"[0-9a-f]{64}", cert_id), f"certificate_id={cert_id}")
    check(os.path.realpath(f.get("output_dir", "")) == os.path.realpath(out_dir),
          f"output_dir={f.get('output_dir')}")
    check(mode(out_dir) == 0o700, f"{out_dir} has mode {oct(mode(out_dir))}")
    cert, key = os.path.join(out_dir, "certificate.pem"), os.path.join(out_dir, "private.key")
    check(mode(key) == 0o600, f"private.key has mode {oct(mode(key))}")
    check(mode(cert) & 0o022 == 0, f"certificate.pem has mode {oct(mode(cert))}")
    check(hashlib.sha256(pem_der(cert)).hexdigest() == cert_id,
          "certificate.pem is not the printed certificate")
    key_matches_certificate(cert, key)
    reg = emu.registry()
    certs = {c["id"]: c for c in reg["certificates"]}
    check(cert_id in certs, "the certificate is not in the emulator's registry")
    check(certs[cert_id]["status"] == "ACTIVE", f"certificate status {certs[cert_id]['status']}")
    things = {t["name"]: t for t in reg["things"]}
    check(f"demo-{serial}" in things, "the thing is not in the registry")
    check(cert_id in things[f"demo-{serial}"]["certificates"],
          "the certificate is not attached to the thing")
    print(f"ok: demo-{serial} with ACTIVE certificate {cert_id[:12]}…")


def case_reject(cmd, emu, work, serial, timeout_s):
    out_dir = os.path.join(work, "device")
    p = run(cmd + connection_args(emu, out_dir, template="NoSuchTemplate", serial=serial),
            timeout_s)
    check(p.returncode == 1, f"exit code {p.returncode}, expected 1")
    f = fields(p.stdout)
    check(f.get("result") == "FLEETPROV_REJECTED", f"result={f.get('result')}")
    check(f.get("status_code") == "404", f"status_code={f.get('status_code')}")
    check(f.get("error_code") == "ResourceNotFound", f"error_code={f.get('error_code')}")
    check(f.get("error", "") != "", "no error text")
    check(not os.path.exists(os.path.join(out_dir, "private.key")), "credentials were written")
    things = [t["name"] for t in emu.registry()["things"]]
    check(f"demo-{serial}" not in things, "a thing was registered")
    print("ok: rejected with 404 ResourceNotFound")


def case_no_reply(cmd, emu, work, serial, timeout_s, extra, expected):
    """The emulator drops RegisterThing replies (--fault drop@register): the library's step
    timeout (timeout) or, for provision_steps, its own bounded wait and a cancel (cancel)."""
    out_dir = os.path.join(work, "device")
    p = run(cmd + connection_args(emu, out_dir, serial=serial) + extra, timeout_s)
    check(p.returncode == 1, f"exit code {p.returncode}, expected 1")
    f = fields(p.stdout)
    check(f.get("result") == expected, f"result={f.get('result')}, expected {expected}")
    check(f.get("error", "") != "", "no error text")
    check(not os.path.exists(os.path.join(out_dir, "private.key")), "credentials were written")
    print(f"ok: {expected}")


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def case_badargs(cmd, emu, work, serial, timeout_s):
    out_dir = os.path.join(work, "device")
    good = connection_args(emu, out_dir, serial=serial)

    def replace(args, flag, value):
        args = list(args)
        args[args.index(flag) + 1] = value
        return args

    def drop(args, flag):
        args = list(args)
        i = args.index(flag)
        del args[i:i + 2]
        return args

    missing = os.path.join(work, "does-not-exist.pem")
    # (what, arguments, expected result= line or None for a usage error)
    table = [
        ("missing CA file", replace(good, "--ca", missing), "FLEETPROV_INVALID_ARGUMENT"),
        ("missing claim certificate", replace(good, "--cert", missing),
         "FLEETPROV_INVALID_ARGUMENT"),
        ("missing claim key", replace(good, "--key", missing), "FLEETPROV_INVALID_ARGUMENT"),
        ("key that is not a key", replace(good, "--key", emu.path("ca.pem")),
         "FLEETPROV_INVALID_ARGUMENT"),
        ("invalid template name", replace(good, "--template", "no such/template!"),
         "FLEETPROV_INVALID_ARGUMENT"),
        ("nothing listening", replace(good, "--port", str(free_port())) + ["--timeout", "3000"],
         "FLEETPROV_CONNECTION"),
        ("no --endpoint", drop(good, "--endpoint"), None),
        ("no --out", drop(good, "--out"), None),
        ("bad --port", replace(good, "--port", "port"), None),
        ("unknown flag", good + ["--bogus", "1"], None),
        ("flag without value", good + ["--param"], None),
    ]
    failures = []
    for what, args, expected in table:
        if what == "no --out" and os.path.basename(cmd[-1]) == "provision":
            continue  # --out is optional for the one-call example
        print(f"\n# {what}")
        p = run(cmd + args, timeout_s)
        f = fields(p.stdout)
        if p.returncode != 1:
            failures.append(f"{what}: exit code {p.returncode}, expected 1")
        elif expected is not None and f.get("result") != expected:
            failures.append(f"{what}: result={f.get('result')}, expected {expected}")
        elif expected is not None and not f.get("error"):
            failures.append(f"{what}: no error text")
        elif expected is None and "usage:" not in p.stderr and "required" not in p.stderr \
                and "bad --port" not in p.stderr:
            failures.append(f"{what}: no usage message")
    check(not os.path.exists(out_dir), f"{out_dir} was created")
    check(not failures, "\n".join(failures))
    print(f"ok: {len(table)} bad-argument rows")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--emulator", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--case", required=True, choices=["ok", "cbor", "reject", "badargs", "timeout", "cancel"])
    ap.add_argument("--serial", default=None)
    ap.add_argument("--arg", action="append", default=[],
                    help="extra program argument for the ok/cbor cases (repeatable; --arg=--x)")
    ap.add_argument("--timeout", type=float, default=120.0, help="per program run, seconds")
    ap.add_argument("command", nargs=argparse.REMAINDER)
    a = ap.parse_args()
    cmd = a.command[1:] if a.command[:1] == ["--"] else a.command
    if not cmd:
        ap.error("no command after --")
    if not os.access(a.emulator, os.X_OK):
        print(f"emulator not found: {a.emulator} (cargo build -p fleetprov-emulator)")
        return 1
    if os.path.exists(a.work):
        shutil.rmtree(a.work)
    os.makedirs(a.work)
    serial = a.serial or f"SN{os.getpid()}"
    emu = Emulator(os.path.abspath(a.emulator), os.path.join(a.work, "emulator"))
    started = time.monotonic()
    try:
        emu.start(["--fault", "drop@register"] if a.case in ("timeout", "cancel") else [])
        if a.case in ("ok", "cbor"):
            case_ok(cmd + a.arg, emu, a.work, serial, "json" if a.case == "ok" else "cbor",
                    a.timeout)
        elif a.case == "reject":
            case_reject(cmd, emu, a.work, serial, a.timeout)
        elif a.case == "timeout":
            case_no_reply(cmd, emu, a.work, serial, a.timeout, ["--timeout", "2000"],
                          "FLEETPROV_TIMEOUT")
        elif a.case == "cancel":
            case_no_reply(cmd, emu, a.work, serial, a.timeout,
                          ["--timeout", "30000", "--wait", "2000"], "FLEETPROV_CANCELLED")
        else:
            case_badargs(cmd, emu, a.work, serial, a.timeout)
    except Failed as e:
        print(f"FAILED: {e}")
        return 1
    finally:
        emu.stop()
        print(f"({time.monotonic() - started:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
