#!/usr/bin/env python3
"""ctest driver: starts fleetprov-emulator, runs one C example against it, checks the outcome.

    emu_test.py --emulator PATH --work DIR --case CASE [--serial S] [--timeout SECS]
                [--arg=ARG]... [--fault RULE]... [--stop-at STEP]... -- [LAUNCHER...] PROGRAM

CASE is ok, cbor, reject, badargs, timeout, cancel, retry, lostreply, resume, crash, fault,
inactive, rotate, signer, signer_cbor or signer_broken (see the case_ functions); for the
provision_flash example ok, cbor, reject, badargs, cancel, resume, crash, fault, already or
store (see the flash_case_ functions: the checks read its flash partition, with the program's
--show and with read_flash()).
Everything after `--` is the command to run (a launcher such as valgrind may come first); the
driver appends the connection arguments. The emulator runs with `--data-dir WORK/emulator
--port 0 --key-type ec` (plus each --fault RULE; and `--ca-key-type ec` but for the ok, cbor,
reject and rotate cases, which keep its default RSA-2048 CA) and is always killed at the end.
Only the standard library is used.

The crash case (the `provision` and `provision_flash` examples): the program runs with
FLEETPROV_EXAMPLE_STOP_AT=STEP, which makes it print `stopped_at=STEP` and freeze inside the
library's flow when its progress callback sees STEP; the driver waits for that line (bounded),
kills the process with SIGKILL, checks what is on disk, and does the same for each further
--stop-at; then it runs the program once more without the variable, with the same --state-dir
and --out, and checks that the device ends up provisioned exactly once (see case_crash).
provision_flash also takes --stop-at store:NAME:N / remove:NAME:N: a power loss emulated in the
middle of its Nth flash write of blob NAME (see flash_case_crash).
"""
import argparse
import base64
import hashlib
import json
import os
import re
import select
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
import zlib

SANITIZER_MARKERS = ("ERROR: AddressSanitizer", "ERROR: LeakSanitizer", "runtime error:",
                     "ERROR: UndefinedBehaviorSanitizer", "WARNING: ThreadSanitizer")


class Failed(Exception):
    pass


def check(cond, msg):
    if not cond:
        raise Failed(msg)


class Emulator:
    def __init__(self, binary, data_dir, ca_key_type=None):
        self.binary, self.data_dir = binary, data_dir
        # None: the emulator's default CA (RSA-2048, as AWS's); "ec": quick to make.
        self.ca_key_type = ca_key_type
        self.proc = None
        self.port = None
        self.control_addr = None

    def start(self, extra=(), wait_s=60.0):
        """Starts it and waits for `listening on` (and `control on` with --control-port)."""
        if os.path.exists(self.data_dir):
            shutil.rmtree(self.data_dir)
        self.out_path = self.data_dir + ".out"
        out = open(self.out_path, "w")
        self.proc = subprocess.Popen(
            [self.binary, "--data-dir", self.data_dir, "--port", "0", "--key-type", "ec",
             *(["--ca-key-type", self.ca_key_type] if self.ca_key_type else []), *extra],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True)
        out.close()
        want_control = "--control-port" in extra
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            with open(self.out_path) as f:
                text = f.read()
            m = re.search(r"^listening on (\S+):(\d+)$", text, re.M)
            c = re.search(r"^control on (\S+):(\d+)$", text, re.M)
            if m and (c or not want_control):
                self.port = int(m.group(2))
                self.control_addr = (c.group(1), int(c.group(2))) if c else None
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

    def control(self, command, timeout_s=30.0):
        """One command over the control interface (started with --control-port 0)."""
        check(self.control_addr is not None, "the emulator has no control port")
        with socket.create_connection(self.control_addr, timeout=timeout_s) as c:
            c.sendall(command.encode() + b"\n")
            answer = b""
            while not answer.endswith(b"\n"):
                chunk = c.recv(4096)
                check(chunk, f"control: no answer to {command!r}")
                answer += chunk
        answer = answer.decode().strip()
        print(f"control: {command} -> {answer}")
        check(answer.startswith("ok"), f"control: {command!r} answered {answer!r}")
        return answer

    def registry(self):
        out = subprocess.run([self.binary, "list", "--data-dir", self.data_dir],
                             capture_output=True, text=True, timeout=60, check=True).stdout
        return json.loads(out)

    def path(self, name):
        return os.path.join(self.data_dir, name)


def run(cmd, timeout_s, env=None):
    print("+ " + " ".join(cmd), flush=True)
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s,
                           stdin=subprocess.DEVNULL, env=env)
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


def key_matches_certificate(cert, key, required=False):
    """With the openssl command (if installed): the key's public key is the certificate's."""
    if shutil.which("openssl") is None:
        check(not required, "the openssl command is needed (Debian: apt-get install openssl)")
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


def case_ok(cmd, emu, work, serial, fmt, timeout_s, state_dir=False):
    out_dir = os.path.join(work, "device")
    state = ["--state-dir", os.path.join(work, "state")] if state_dir else []
    p = run(cmd + connection_args(emu, out_dir, serial=serial) + ["--format", fmt] + state,
            timeout_s)
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
    if state_dir:
        check(not os.path.exists(os.path.join(work, "state", "journal.json")),
              "journal.json left in the state dir")
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


def case_denied(cmd, emu, work, serial, timeout_s):
    """A claim policy without iot:Publish on the CreateCertificateFromCsr topic. Over MQTT 5
    (the library's default) the broker says so with PUBACK 0x87: the program fails at once,
    not retryable, with the reason code in the error; nothing is written."""
    arn = "arn:aws:iot:us-east-1:123456789012"
    policy = {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": ["iot:Connect", "iot:Subscribe", "iot:Receive"],
         "Resource": "*"},
        {"Effect": "Allow", "Action": "iot:Publish",
         "Resource": f"{arn}:topic/$aws/provisioning-templates/*"}]}
    with open(emu.path("claim-policy.json"), "w", encoding="utf-8") as f:
        json.dump(policy, f)
    out_dir = os.path.join(work, "device")
    p = run(cmd + connection_args(emu, out_dir, serial=serial) + ["--method", "csr"], timeout_s)
    check(p.returncode == 1, f"exit code {p.returncode}, expected 1")
    f = fields(p.stdout)
    check(f.get("result") == "FLEETPROV_CONNECTION", f"result={f.get('result')}")
    check(f.get("mqtt_reason_code") == "0x87", f"mqtt_reason_code={f.get('mqtt_reason_code')}")
    check(f.get("retryable") == "0", f"retryable={f.get('retryable')}")
    error = f.get("error", "")
    check("PUBACK reason code 0x87 (not authorized)" in error and "iot:Publish" in error
          and "$aws/certificates/create-from-csr/json" in error, f"error={error}")
    check(not os.path.exists(os.path.join(out_dir, "private.key")), "credentials were written")
    check(not created_certificates(emu.registry()), "a certificate was created")
    print("ok: PUBACK 0x87, not authorized, reported at once")


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
        ("nothing listening", replace(good, "--port", str(free_port())) + ["--timeout", "3000"]
         + (["--retry", "2,50,100"] if program(cmd) in RETRYING else []),
         "FLEETPROV_CONNECTION"),
        ("no --endpoint", drop(good, "--endpoint"), None),
        ("no --out", drop(good, "--out"), None),
        ("bad --port", replace(good, "--port", "port"), None),
        ("unknown flag", good + ["--bogus", "1"], None),
        ("flag without value", good + ["--param"], None),
    ]
    failures = []
    for what, args, expected in table:
        if what == "no --out" and program(cmd) in ("provision", "provision_mosquitto"):
            continue  # --out is optional for these
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
    if program(cmd) == "provision":
        mistakes(cmd, emu, work, good, replace, timeout_s)


def mistakes(cmd, emu, work, good, replace, timeout_s):
    """The mistakes a new user makes with the one-call example: each with the exact result code
    and the texts its error= line must contain (it names the cause)."""
    a_file = os.path.join(work, "a-file")
    with open(a_file, "w") as f:
        f.write("not a directory")
    port = free_port()
    quick = ["--retry", "2,50,100"]
    # (mistake, arguments, result, texts the error line must contain)
    table = [
        # The emulator's server certificate: issued by its CA, but no device or claim certificate.
        ("unregistered claim certificate",
         replace(replace(good, "--cert", emu.path("server.pem")), "--key", emu.path("server.key")),
         "FLEETPROV_TLS", ["refused the claim certificate", f"localhost:{emu.port}",
                           "not registered and ACTIVE", "(1 attempt,"]),
        ("wrong CA file", replace(good, "--ca", emu.path("claim.pem")),
         "FLEETPROV_TLS", ["is not trusted", "the CA file " + emu.path("claim.pem")]),
        ("missing CA file", replace(good, "--ca", os.path.join(work, "no-ca.pem")),
         "FLEETPROV_INVALID_ARGUMENT", ["cannot read CA file", "no-ca.pem"]),
        ("missing claim key", replace(good, "--key", os.path.join(work, "no.key")),
         "FLEETPROV_INVALID_ARGUMENT", ["cannot read claim key file", "no.key"]),
        ("mismatched claim key", replace(good, "--key", emu.path("server.key")),
         "FLEETPROV_INVALID_ARGUMENT", ["the claim certificate does not match the claim key"]),
        ("bad template name", replace(good, "--template", "no spaces"),
         "FLEETPROV_INVALID_ARGUMENT", ["template name may only contain"]),
        ("unknown template", replace(good, "--template", "NoSuchTemplate"),
         "FLEETPROV_REJECTED", ["404", "NoSuchTemplate does not exist"]),
        ("service down", replace(replace(good, "--endpoint", "127.0.0.1"), "--port", str(port))
         + quick, "FLEETPROV_CONNECTION", [f"127.0.0.1:{port}", "(2 attempts,"]),
        ("unresolvable host", replace(good, "--endpoint", "no-such-host.invalid") + quick,
         "FLEETPROV_CONNECTION", ['"no-such-host.invalid" does not resolve', "(2 attempts,"]),
        ("unwritable output directory", replace(good, "--out", "/proc/fleetprov-output"),
         "FLEETPROV_STORAGE", ["/proc/fleetprov-output cannot hold the credentials"]),
        ("output path that is a file", replace(good, "--out", a_file),
         "FLEETPROV_STORAGE", [a_file + " cannot hold the credentials",
                               "not a directory"]),
    ]
    failures = []
    seen = []
    for what, args, expected, texts in table:
        print(f"\n# mistake: {what}")
        p = run(cmd + args, timeout_s)
        f = fields(p.stdout)
        seen.append(f"{what}: {f.get('result')}: {f.get('error')}")
        if p.returncode != 1:
            failures.append(f"{what}: exit code {p.returncode}, expected 1")
        elif f.get("result") != expected:
            failures.append(f"{what}: result={f.get('result')}, expected {expected}")
        else:
            failures += [f"{what}: the error lacks {t!r}: {f.get('error')}"
                         for t in texts if t not in (f.get("error") or "")]
    print("\n".join(["", "mistakes and what the user sees:"] + seen))
    check(not failures, "\n".join(failures))
    print(f"ok: {len(table)} mistakes, each with its code and cause")

# The one-call examples (fleetprov_provision), which take --state-dir and --retry.
ONE_CALL = ("provision", "provision_with_csr")
# Examples whose flow retries (the one-call flow, the host transport): --retry applies.
RETRYING = ONE_CALL + ("provision_mosquitto", "provision_signer")


def program(cmd):
    return os.path.basename(cmd[-1])


def created_certificates(reg):
    """Certificates the service created (not the claim certificate)."""
    return [c for c in reg["certificates"] if c["origin"] != "claim"]


def check_provisioned(emu, out_dir, serial, max_created, exact_created=None, metadata=True):
    """The device is provisioned once: a complete credential set on disk (device.json too if
    `metadata`: the library writes it, provision_with_csr does not), its key matching its
    certificate, which is the only ACTIVE certificate the service created and the only one of
    the thing. Returns the certificate id."""
    cert, key = os.path.join(out_dir, "certificate.pem"), os.path.join(out_dir, "private.key")
    meta = os.path.join(out_dir, "device.json")
    for path in (cert, key) + ((meta,) if metadata else ()):
        check(os.path.exists(path), f"{path} is missing")
    check(mode(out_dir) == 0o700, f"{out_dir} has mode {oct(mode(out_dir))}")
    check(mode(key) == 0o600, f"private.key has mode {oct(mode(key))}")
    cert_id = hashlib.sha256(pem_der(cert)).hexdigest()
    if metadata:
        try:
            meta_id = json.load(open(meta)).get("certificateId")
        except ValueError as e:
            raise Failed(f"device.json is not JSON: {e}")
        check(meta_id == cert_id,
              f"device.json names certificate {meta_id}, certificate.pem is {cert_id}")
    key_matches_certificate(cert, key, required=True)
    check_registry(emu, serial, cert_id, max_created, exact_created)
    return cert_id


def check_registry(emu, serial, cert_id, max_created, exact_created=None):
    """In the emulator's registry: `cert_id` is the only ACTIVE certificate the service created
    and the only one of the thing demo-SERIAL; at most `max_created` (exactly `exact_created`)
    certificates were created."""
    reg = emu.registry()
    created = created_certificates(reg)
    summary = ", ".join(f"{c['id'][:12]}… {c['status']}" for c in created)
    print(f"certificates created: {len(created)} ({summary})")
    active = [c["id"] for c in created if c["status"] == "ACTIVE"]
    check(active == [cert_id], f"ACTIVE certificates {active}, expected exactly [{cert_id}]")
    if exact_created is not None:
        check(len(created) == exact_created,
              f"{len(created)} certificates created, expected {exact_created}")
    check(len(created) <= max_created,
          f"{len(created)} certificates created, expected at most {max_created}")
    things = {t["name"]: t for t in reg["things"]}
    check(f"demo-{serial}" in things, "the thing is not in the registry")
    attached = things[f"demo-{serial}"]["certificates"]
    check(attached == [cert_id], f"the thing has certificates {attached}, expected [{cert_id}]")


def case_retry(cmd, emu, work, serial, timeout_s, extra, lost_reply):
    """One-call examples (lost_reply: `provision` only, see CMakeLists.txt). Without lost_reply
    the emulator refuses the first RegisterThing with a retryable 503 (--fault
    reject:503@register*1): the flow reports RETRYING with the pause and the error and
    registers the same certificate on attempt 2. With lost_reply it processes the
    first RegisterThing but drops the reply (--fault drop@register*1): attempt 2's RegisterThing
    is refused (the token was used), the flow connects with the certificate, finds it active and
    commits it; the thing name is then unknown to the device."""
    out_dir = os.path.join(work, "device")
    p = run(cmd + connection_args(emu, out_dir, serial=serial) + extra, timeout_s)
    check(p.returncode == 0, f"exit code {p.returncode}, expected 0")
    f = fields(p.stdout)
    check(f.get("attempts") == "2", f"attempts={f.get('attempts')}, expected 2")
    check(f.get("resumed") == "0", f"resumed={f.get('resumed')}, expected 0")
    expected_error = "FLEETPROV_TIMEOUT" if lost_reply else "FLEETPROV_REJECTED"
    m = re.search(r"step: retrying \(attempt 1 failed, next in (\d+) ms\): (\w+): (.+)", p.stderr)
    check(m is not None, "no RETRYING step with its pause and error on stderr")
    check(m.group(2) == expected_error, f"retrying after {m.group(2)}, expected {expected_error}")
    check(re.search(r"step: registering \(attempt 2\)", p.stderr), "no attempt 2 at registering")
    thing = "" if lost_reply else f"demo-{serial}"
    check(f.get("thing_name") == thing, f"thing_name={f.get('thing_name')}, expected {thing!r}")
    cert_id = check_provisioned(emu, out_dir, serial, max_created=1, exact_created=1,
                                metadata=program(cmd) == "provision")
    check(f.get("certificate_id") == cert_id, f"certificate_id={f.get('certificate_id')}")
    print(f"ok: attempt 2 after {m.group(2)}, paused {m.group(1)} ms, one certificate")


def case_resume(cmd, emu, work, serial, timeout_s):
    """One-call examples with --state-dir: the first run gets a retryable 503 for RegisterThing
    (--fault reject:503@register*1) and has no retries left (--retry 1,...): it fails, keeping
    the certificate in the journal. The second run resumes it (resumed=1) instead of creating
    another; provision_with_csr reuses the key it kept in the state dir."""
    out_dir, state_dir = os.path.join(work, "device"), os.path.join(work, "state")
    args = cmd + connection_args(emu, out_dir, serial=serial) + ["--state-dir", state_dir]
    p = run(args + ["--retry", "1,100,100"], timeout_s)
    check(p.returncode == 1, f"first run: exit code {p.returncode}, expected 1")
    f = fields(p.stdout)
    check(f.get("result") == "FLEETPROV_REJECTED" and f.get("status_code") == "503",
          f"first run: result={f.get('result')} status_code={f.get('status_code')}")
    check(f.get("retryable") == "1", f"first run: retryable={f.get('retryable')}")
    journal = os.path.join(state_dir, "journal.json")
    check(os.path.exists(journal), "first run: no journal.json kept")
    check(mode(journal) == 0o600, f"journal.json has mode {oct(mode(journal))}")
    check(not os.path.exists(os.path.join(out_dir, "private.key")), "first run wrote credentials")
    p = run(args, timeout_s)
    check(p.returncode == 0, f"second run: exit code {p.returncode}, expected 0")
    f = fields(p.stdout)
    check(f.get("resumed") == "1", f"resumed={f.get('resumed')}, expected 1")
    check(f.get("attempts") == "1", f"attempts={f.get('attempts')}, expected 1")
    check(f.get("thing_name") == f"demo-{serial}", f"thing_name={f.get('thing_name')}")
    check("step: resuming (attempt 1)" in p.stderr, "no RESUMING step reported")
    cert_id = check_provisioned(emu, out_dir, serial, max_created=1, exact_created=1,
                                metadata=program(cmd) == "provision")
    check(f.get("certificate_id") == cert_id, f"certificate_id={f.get('certificate_id')}")
    check(not os.path.exists(journal), "journal.json left after success")
    print(f"ok: failed with a journal, then resumed certificate {cert_id[:12]}…")


def case_interrupt(cmd, emu, work, serial, timeout_s):
    """provision with --state-dir, interrupted with SIGINT (Ctrl-C) once RegisterThing is sent
    (its reply held 600 ms by --fault delay:600@register*1): it waits for that reply, stops with
    FLEETPROV_CANCELLED (exit 1) and keeps the journal; the same command again resumes it, with
    one certificate in all and the thing name known."""
    out_dir, state_dir = os.path.join(work, "device"), os.path.join(work, "state")
    args = cmd + connection_args(emu, out_dir, serial=serial) + ["--state-dir", state_dir]
    print("+ " + " ".join(args), flush=True)
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL)
    killer = threading.Timer(timeout_s, proc.kill)  # bound on the whole run
    killer.start()
    try:
        seen = []
        for line in proc.stderr:  # ends when the program exits
            seen.append(line)
            if "step: registering" in line:
                proc.send_signal(signal.SIGINT)
                break
        out, err = proc.communicate()
    finally:
        killer.cancel()
    err = "".join(seen) + err
    sys.stdout.write("--- stdout\n" + out + "--- stderr\n" + err + "---\n")
    for marker in SANITIZER_MARKERS:
        check(marker not in err, f"sanitizer report ({marker!r})")
    check(any("step: registering" in line for line in seen), "never reached RegisterThing")
    check(proc.returncode == 1, f"interrupted run: exit code {proc.returncode}, expected 1")
    check(fields(out).get("result") == "FLEETPROV_CANCELLED", f"result={fields(out).get('result')}")
    check("run the same command again to resume" in err, "no word about resuming")
    check(os.path.exists(os.path.join(state_dir, "journal.json")), "the journal was not kept")
    check(not os.path.exists(os.path.join(out_dir, "device.json")), "committed despite the cancel")
    p = run(args, timeout_s)
    check(p.returncode == 0, f"second run: exit code {p.returncode}, expected 0")
    f = fields(p.stdout)
    check(f.get("resumed") == "1", f"resumed={f.get('resumed')}, expected 1")
    check(f.get("thing_name") == f"demo-{serial}", f"thing_name={f.get('thing_name')}")
    cert_id = check_provisioned(emu, out_dir, serial, max_created=1, exact_created=1)
    check(f.get("certificate_id") == cert_id, f"certificate_id={f.get('certificate_id')}")
    print(f"ok: interrupted after RegisterThing, then resumed certificate {cert_id[:12]}…")


# Steps the one-call flow reports on a first run, in order: the crash case's kill points.
CRASH_STEPS = ("connecting", "subscribing", "subscribed", "creating_certificate",
               "certificate_created", "registering", "registered", "verifying", "verified",
               "committed")
# Kill points at which the certificate must be in the resume journal, nothing committed yet.
JOURNALED = ("certificate_created", "registering", "registered", "verifying")
STOP_ENV = "FLEETPROV_EXAMPLE_STOP_AT"


def stop_and_kill(cmd, step, work, n, timeout_s):
    """Runs cmd with STOP_ENV=step, waits (bounded) for its `stopped_at=STEP` line, SIGKILLs it."""
    env = dict(os.environ, **{STOP_ENV: step})
    marker = f"stopped_at={step}\n".encode()
    err_path = os.path.join(work, f"killed-{n}.stderr")
    print(f"+ {STOP_ENV}={step} " + " ".join(cmd), flush=True)
    with open(err_path, "wb") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err,
                                stdin=subprocess.DEVNULL, env=env)
    out = b""
    try:
        deadline = time.monotonic() + timeout_s
        fd = proc.stdout.fileno()
        while marker not in out:
            left = deadline - time.monotonic()
            check(left > 0, f"no {marker!r} within {timeout_s} s")
            ready, _, _ = select.select([fd], [], [], min(left, 1.0))
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    code = proc.wait(timeout=max(left, 1.0))
                    raise Failed(f"the program exited with {code} before reaching {step}")
                out += chunk
        os.kill(proc.pid, signal.SIGKILL)
        code = proc.wait(timeout=30)
        check(code == -signal.SIGKILL, f"exit status {code} after SIGKILL")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        proc.stdout.close()
        sys.stdout.write("--- stdout\n" + out.decode(errors="replace") + "--- stderr\n"
                         + open(err_path, errors="replace").read() + "---\n")
        sys.stdout.flush()


def state_after_kill(emu, state_dir, out_dir, step, first):
    """Checks what a kill at `step` left on disk; returns (journal present, committed)."""
    journal = os.path.join(state_dir, "journal.json")
    has_journal = os.path.exists(journal)
    if has_journal:
        check(mode(state_dir) == 0o700, f"state dir has mode {oct(mode(state_dir))}")
        check(mode(journal) == 0o600, f"journal.json has mode {oct(mode(journal))}")
        try:
            json.load(open(journal))  # holds the key and the token: never printed
        except ValueError as e:
            raise Failed(f"journal.json is not JSON: {e}")
    committed = os.path.exists(os.path.join(out_dir, "device.json"))
    if committed:
        # Credentials are committed only after the new certificate connected.
        cert_id = hashlib.sha256(pem_der(os.path.join(out_dir, "certificate.pem"))).hexdigest()
        status = {c["id"]: c["status"] for c in emu.registry()["certificates"]}.get(cert_id)
        check(status == "ACTIVE", f"committed certificate {cert_id} is {status}, not ACTIVE")
    if first and step in JOURNALED:
        check(has_journal, f"killed at {step}: no journal.json in the state dir")
        check(not os.path.exists(os.path.join(out_dir, "private.key")),
              f"killed at {step}: credentials written before the certificate connected")
    elif first and step in CRASH_STEPS[:CRASH_STEPS.index("certificate_created")]:
        check(not has_journal, f"killed at {step}: a journal before any certificate")
        check(not os.path.exists(out_dir), f"killed at {step}: {out_dir} exists")
    elif step == "committed":
        check(committed and not has_journal, "COMMITTED reported before the commit was complete")
    elif step == "resuming":
        check(has_journal, "killed at resuming: the journal is gone")
    print(f"killed at {step}: journal {'present' if has_journal else 'absent'}, "
          f"credentials {'committed' if committed else 'not committed'}")
    return has_journal, committed


def case_crash(cmd, emu, work, serial, timeout_s, extra, stops):
    """The `provision` example killed with SIGKILL at each of `stops` in turn (each run with the
    same --state-dir and --out), then run to the end: the device ends up provisioned, with one
    ACTIVE certificate, the one on disk, whose key matches it; no second certificate once one
    was persisted (killed at or after certificate_created); no journal left."""
    check(program(cmd) == "provision", "the crash case runs the provision example")
    check(stops, "the crash case needs --stop-at")
    out_dir, state_dir = os.path.join(work, "device"), os.path.join(work, "state")
    args = cmd + connection_args(emu, out_dir, serial=serial) + ["--state-dir", state_dir] + extra
    persisted_first = False
    has_journal = committed = False
    for n, step in enumerate(stops):
        stop_and_kill(args, step, work, n + 1, timeout_s)
        has_journal, committed = state_after_kill(emu, state_dir, out_dir, step, n == 0)
        if n == 0:
            persisted_first = has_journal or committed
    env = dict(os.environ)
    env.pop(STOP_ENV, None)
    p = run(args, timeout_s, env=env)
    check(p.returncode == 0, f"exit code {p.returncode}, expected 0")
    f = fields(p.stdout)
    if f.get("already_provisioned") == "1":
        check(committed and not has_journal, "already_provisioned without committed credentials")
        what = "already provisioned"
    else:
        check(not committed or has_journal, "provisioned again over committed credentials")
        resumed = "1" if has_journal else "0"
        check(f.get("resumed") == resumed, f"resumed={f.get('resumed')}, expected {resumed}")
        check(re.fullmatch(r"[1-9]\d*", f.get("attempts", "")), f"attempts={f.get('attempts')}")
        check(f.get("thing_name") == f"demo-{serial}", f"thing_name={f.get('thing_name')}")
        what = f"resumed={resumed} attempts={f['attempts']}"
    first = stops[0]
    after_creation = CRASH_STEPS[CRASH_STEPS.index("certificate_created"):]
    persisted = persisted_first or first in after_creation
    # Each run killed before a certificate was persisted may have left one PENDING behind.
    cert_id = check_provisioned(emu, out_dir, serial, max_created=1 + len(stops),
                                exact_created=1 if persisted else None)
    if "certificate_id" in f:
        check(f["certificate_id"] == cert_id, f"certificate_id={f['certificate_id']}")
    check(not os.path.exists(os.path.join(state_dir, "journal.json")),
          "journal.json left in the state dir")
    print(f"ok: killed at {', '.join(stops)}; then {what}; "
          f"one ACTIVE certificate {cert_id[:12]}…")


def case_fault(cmd, emu, work, serial, timeout_s):
    """The emulator misbehaves once (the --fault rules given, e.g. close:request@register*1: the
    connection closed when RegisterThing arrives, nothing processed); the flow retries and the
    device ends up provisioned with exactly one certificate, ACTIVE."""
    out_dir = os.path.join(work, "device")
    p = run(cmd + connection_args(emu, out_dir, serial=serial) + ["--retry", "3,50,200"],
            timeout_s)
    check(p.returncode == 0, f"exit code {p.returncode}, expected 0")
    f = fields(p.stdout)
    check(f.get("attempts") == "2", f"attempts={f.get('attempts')}, expected 2")
    check(f.get("thing_name") == f"demo-{serial}", f"thing_name={f.get('thing_name')}")
    check("step: retrying (attempt 1 failed" in p.stderr, "no RETRYING step reported")
    cert_id = check_provisioned(emu, out_dir, serial, max_created=1, exact_created=1)
    check(f.get("certificate_id") == cert_id, f"certificate_id={f.get('certificate_id')}")
    print(f"ok: retried after the fault, one certificate {cert_id[:12]}…")


def case_inactive(cmd, emu, work, serial, timeout_s):
    """A template that registers the certificate INACTIVE: the connection with it fails in the
    TLS handshake, which the host reports as such (fleetprov_host_connect_failed with tls), and
    the flow gives up with FLEETPROV_CONNECTION without writing credentials."""
    with open(emu.path("templates/DemoTemplate.json")) as f:
        body = json.load(f)
    body["Resources"]["certificate"]["Properties"]["Status"] = "Inactive"
    with open(emu.path("templates/InactiveTemplate.json"), "w") as f:
        json.dump(body, f)
    out_dir = os.path.join(work, "device")
    args = connection_args(emu, out_dir, template="InactiveTemplate", serial=serial)
    p = run(cmd + args + ["--retry", "2,50,100"], timeout_s)
    check(p.returncode == 1, f"exit code {p.returncode}, expected 1")
    f = fields(p.stdout)
    check(f.get("result") == "FLEETPROV_CONNECTION", f"result={f.get('result')}")
    check("TLS handshake" in f.get("error", ""), f"error={f.get('error')}: TLS not reported")
    check("connection failed" in p.stderr and "(TLS)" in p.stderr,
          "no failed connection with a TLS error on stderr")
    check(not os.path.exists(os.path.join(out_dir, "private.key")), "credentials were written")
    print("ok: the inactive certificate's handshake failure reported as TLS")


def snapshot(dir_):
    return {name: open(os.path.join(dir_, name), "rb").read()
            for name in ("certificate.pem", "private.key", "device.json")}


def case_rotate(cmd, emu, work, serial, timeout_s):
    """`provision --rotate DIR`: provisioned through DemoTemplate into DIR; a rotation whose
    RegisterThing is refused (403, through the control interface) fails and leaves the three
    files byte for byte; then a rotation through RotationTemplate replaces all three: the new
    certificate is ACTIVE and attached to the thing next to the old one (which stays ACTIVE),
    device.json names it, the new key matches it, and no rotation journal is left."""
    check(program(cmd) == "provision", "the rotate case runs the provision example")
    creds = os.path.join(work, "device")
    p = run(cmd + connection_args(emu, creds, serial=serial), timeout_s)
    check(p.returncode == 0, f"provisioning: exit code {p.returncode}, expected 0")
    thing = f"demo-{serial}"
    old_id = check_provisioned(emu, creds, serial, max_created=1, exact_created=1)
    before = snapshot(creds)
    rotate = cmd + ["--endpoint", "localhost", "--port", str(emu.port), "--ca", emu.path("ca.pem"),
                    "--template", "RotationTemplate", "--param", f"ThingName={thing}",
                    "--rotate", creds, "--retry", "2,50,100"]

    emu.control("fault reject:403@register")
    p = run(rotate, timeout_s)
    check(p.returncode == 1, f"refused rotation: exit code {p.returncode}, expected 1")
    f = fields(p.stdout)
    check(f.get("result") == "FLEETPROV_REJECTED" and f.get("status_code") == "403",
          f"refused rotation: result={f.get('result')} status_code={f.get('status_code')}")
    check(snapshot(creds) == before, "a failed rotation changed the credentials")
    check(mode(os.path.join(creds, "private.key")) == 0o600, "private.key mode changed")
    emu.control("clear")

    p = run(rotate, timeout_s)
    check(p.returncode == 0, f"rotation: exit code {p.returncode}, expected 0")
    f = fields(p.stdout)
    check(f.get("rotated") == "1", f"rotated={f.get('rotated')}")
    check(f.get("thing_name") == thing, f"thing_name={f.get('thing_name')}")
    after = snapshot(creds)
    for name in before:
        check(after[name] != before[name], f"{name} did not change")
    cert, key = os.path.join(creds, "certificate.pem"), os.path.join(creds, "private.key")
    new_id = hashlib.sha256(pem_der(cert)).hexdigest()
    check(f.get("certificate_id") == new_id, f"certificate_id={f.get('certificate_id')}, "
          f"certificate.pem is {new_id}")
    check(new_id != old_id, "the same certificate")
    check(json.loads(after["device.json"]).get("certificateId") == new_id,
          "device.json does not name the new certificate")
    check(mode(key) == 0o600, f"private.key has mode {oct(mode(key))}")
    key_matches_certificate(cert, key, required=True)
    reg = emu.registry()
    status = {c["id"]: c["status"] for c in reg["certificates"]}
    check(status.get(new_id) == "ACTIVE", f"the new certificate is {status.get(new_id)}")
    check(status.get(old_id) == "ACTIVE", f"the old certificate is {status.get(old_id)}")
    attached = {t["name"]: t for t in reg["things"]}[thing]["certificates"]
    check(sorted(attached) == sorted([old_id, new_id]),
          f"the thing has certificates {attached}, expected the old and the new one")
    # The refused rotation may leave its certificate in the rotation journal: the next one then
    # takes it up (resumed=1) instead of creating another.
    created = len(created_certificates(reg))
    expected = 2 if f.get("resumed") == "1" else 3
    check(created == expected, f"{created} certificates created, expected {expected} "
          f"(resumed={f.get('resumed')})")
    check(not os.path.exists(os.path.join(creds, "rotation-journal", "journal.json")),
          "rotation journal left behind")
    print(f"ok: refused rotation left the files alone; rotated {old_id[:12]}… -> {new_id[:12]}…")


def make_p256_key(path):
    """A P-256 key with the openssl command (the device key the test hands provision_signer)."""
    check(shutil.which("openssl") is not None,
          "the openssl command is needed (Debian: apt-get install openssl)")
    subprocess.run(["openssl", "genpkey", "-algorithm", "EC", "-pkeyopt",
                    "ec_paramgen_curve:P-256", "-out", path], check=True, timeout=30,
                   capture_output=True)
    os.chmod(path, 0o600)


def case_signer(cmd, emu, work, serial, fmt, key_file, timeout_s):
    """provision_signer: the key stays with the program (OpenSSL). With key_file the test makes
    the key and checks the returned certificate against it with the openssl command; without,
    the program's own checks (EVP_PKEY_eq, X509_check_private_key) are what there is. Two
    signatures (the CSR, and the TLS handshake of the verification connection, which the
    library makes with the new certificate and the program's key); the registration confirmed;
    the certificate ACTIVE and attached to the thing; no private key written anywhere."""
    out_dir = os.path.join(work, "device")
    extra = ["--format", fmt]
    key = os.path.join(work, "device.key")
    if key_file:
        make_p256_key(key)
        extra += ["--key-file", key]
    p = run(cmd + connection_args(emu, out_dir, serial=serial) + extra, timeout_s)
    check(p.returncode == 0, f"exit code {p.returncode}, expected 0")
    f = fields(p.stdout)
    check(f.get("thing_name") == f"demo-{serial}", f"thing_name={f.get('thing_name')}")
    check(f.get("registration_confirmed") == "1",
          f"registration_confirmed={f.get('registration_confirmed')}")
    check(f.get("signatures") == "2",
          f"signatures={f.get('signatures')}, expected 2 (CSR, verification handshake)")
    cert = os.path.join(out_dir, "certificate.pem")
    cert_id = hashlib.sha256(pem_der(cert)).hexdigest()
    check(f.get("certificate_id") == cert_id, f"certificate_id={f.get('certificate_id')}")
    check(sorted(os.listdir(out_dir)) == ["certificate.pem"],
          f"{out_dir} holds {sorted(os.listdir(out_dir))}, expected the certificate only")
    if key_file:
        key_matches_certificate(cert, key, required=True)
    reg = emu.registry()
    created = created_certificates(reg)
    check([(c["id"], c["status"], c["origin"]) for c in created]
          == [(cert_id, "ACTIVE", "CreateCertificateFromCsr")],
          f"certificates created: {created}")
    attached = {t["name"]: t for t in reg["things"]}[f"demo-{serial}"]["certificates"]
    check(attached == [cert_id], f"the thing has certificates {attached}")
    print(f"ok: certificate {cert_id[:12]}… for the program's key"
          + (" (checked with openssl)" if key_file else ""))


def case_signer_broken(cmd, emu, work, serial, timeout_s):
    """provision_signer --break-signer fail (the callback reports a failure) and wrong (it
    returns a signature that does not verify): the library refuses the CSR's signature
    (FLEETPROV_SIGNER) before anything is sent, so the service creates no certificate."""
    out_dir = os.path.join(work, "device")
    failures = []
    for how, expected in (("fail", "FLEETPROV_SIGNER"), ("wrong", "FLEETPROV_SIGNER")):
        print(f"\n# --break-signer {how}")
        p = run(cmd + connection_args(emu, out_dir, serial=serial) + ["--break-signer", how],
                timeout_s)
        f = fields(p.stdout)
        if p.returncode != 1:
            failures.append(f"{how}: exit code {p.returncode}, expected 1")
        elif f.get("result") != expected:
            failures.append(f"{how}: result={f.get('result')}, expected {expected}")
        elif not f.get("error"):
            failures.append(f"{how}: no error text")
        elif f.get("signatures") != "1":
            failures.append(f"{how}: signatures={f.get('signatures')}, expected 1")
    check(not failures, "\n".join(failures))
    created = created_certificates(emu.registry())
    check(created == [], f"certificates were created: {created}")
    check(not os.path.exists(out_dir), f"{out_dir} was created")
    print("ok: a failing and a wrong signer refused, no certificate created")


# ---------------------------------------------------------------------------------------------
# provision_flash: the journal and the credentials kept through fleetprov_config_set_storage in
# an emulated NOR flash partition (one file). The checks read the partition two ways: the
# program's own `--show`, and read_flash() below, a second reader of the layout written from
# its description at the top of provision_flash.c; the two must agree. Every run's output is
# kept and checked at the end for the secrets the partition held (key lines, ownership token).

FLASH = "provision_flash"
FLASH_NAMES = ("journal", "private.key", "certificate.pem", "device.json")
FLASH_SLOT_SIZE = 8192
FLASH_SLOTS_PER_NAME = 2
FLASH_PARTITION_SIZE = FLASH_SLOT_SIZE * FLASH_SLOTS_PER_NAME * len(FLASH_NAMES)
FLASH_MAGIC = 0x31465046  # "FPF1"
FLASH_HEADER = 36
FLASH_TOMBSTONE = 1


class FlashImage:
    """A partition as read_flash() finds it: `blobs` (name -> content of the newest valid data
    record), `slots` (one (name, slot, state, seq, flags) per slot, state erased, invalid or
    valid) and `newest` (name -> (seq, flags) of its newest valid record)."""

    def __init__(self, blobs, slots, newest):
        self.blobs, self.slots, self.newest = blobs, slots, newest

    def invalid(self, name=None):
        return [s for s in self.slots if s[2] == "invalid" and (name is None or s[0] == name)]


def read_flash(path):
    check(os.path.exists(path), f"{path}: no partition")
    check(mode(path) == 0o600, f"{path} has mode {oct(mode(path))}, expected 0o600")
    data = open(path, "rb").read()
    check(len(data) == FLASH_PARTITION_SIZE,
          f"{path} is {len(data)} bytes, expected {FLASH_PARTITION_SIZE}")
    blobs, slots, newest = {}, [], {}
    for i, name in enumerate(FLASH_NAMES):
        best = None
        for k in range(FLASH_SLOTS_PER_NAME):
            slot = i * FLASH_SLOTS_PER_NAME + k
            raw = data[slot * FLASH_SLOT_SIZE:(slot + 1) * FLASH_SLOT_SIZE]
            if raw == b"\xff" * FLASH_SLOT_SIZE:
                slots.append((name, slot, "erased", None, None))
                continue
            (magic,) = struct.unpack_from("<I", raw, 0)
            seq, flags, length, crc = struct.unpack_from("<IIII", raw, 20)
            body = raw[FLASH_HEADER:FLASH_HEADER + length]
            valid = (magic == FLASH_MAGIC and raw[4:20] == name.encode().ljust(16, b"\0")
                     and length <= FLASH_SLOT_SIZE - FLASH_HEADER
                     and (flags == 0 or (flags == FLASH_TOMBSTONE and length == 0))
                     and zlib.crc32(raw[:32] + body) == crc)
            if not valid:
                slots.append((name, slot, "invalid", None, None))
                continue
            slots.append((name, slot, "valid", seq, flags))
            check(best is None or best[0] != seq, f"{name}: two records with sequence {seq}")
            if best is None or seq > best[0]:
                best = (seq, flags, body)
        if best is not None:
            newest[name] = best[:2]
            if best[1] != FLASH_TOMBSTONE:
                blobs[name] = best[2]
    return FlashImage(blobs, slots, newest)


def pem_der_text(text, what):
    m = re.search(r"-----BEGIN CERTIFICATE-----(.*?)-----END CERTIFICATE-----", text, re.S)
    check(m is not None, f"{what}: no certificate PEM")
    return base64.b64decode("".join(m.group(1).split()))


def secret_strings(blobs):
    """What must never be printed: the lines of every private key PEM the blobs hold, and the
    ownership token of the journal."""
    keys, found = [], set()
    if "private.key" in blobs:
        keys.append(blobs["private.key"].decode(errors="replace"))
    if "journal" in blobs:
        try:
            j = json.loads(blobs["journal"])
        except ValueError as e:
            raise Failed(f"the journal blob is not JSON: {e}")
        keys.append(j.get("private_key_pem") or "")
        token = j.get("ownership_token") or ""
        check(len(token) >= 16, "the journal blob holds no ownership token")
        found.add(token)
    for pem in keys:
        found |= {line for line in pem.splitlines() if len(line) >= 32 and "-----" not in line}
    return found


def pem_key_matches(cert_pem, key_pem):
    """With the openssl command, through pipes (no key file written): the key is the cert's."""
    check(shutil.which("openssl") is not None,
          "the openssl command is needed (Debian: apt-get install openssl)")
    a = subprocess.run(["openssl", "x509", "-noout", "-pubkey"], input=cert_pem,
                       capture_output=True, check=True, timeout=30).stdout
    b = subprocess.run(["openssl", "pkey", "-pubout"], input=key_pem,
                       capture_output=True, check=True, timeout=30).stdout
    check(a.strip() == b.strip() and a.strip(), "private.key does not match certificate.pem")


class Flash:
    """One provision_flash case: the command (launcher included), the emulator, the partition
    WORK/flash.img, and every run's output."""

    def __init__(self, cmd, emu, work, serial, timeout_s):
        self.cmd, self.emu, self.work, self.serial = cmd, emu, work, serial
        self.timeout_s = timeout_s
        self.path = os.path.join(work, "flash.img")
        self.thing = f"demo-{serial}"
        self.outputs = []
        self.secrets = set()

    def args(self, template="DemoTemplate", port=None, extra=()):
        emu = self.emu
        return self.cmd + ["--endpoint", "localhost", "--port", str(port or emu.port),
                           "--ca", emu.path("ca.pem"), "--cert", emu.path("claim.pem"),
                           "--key", emu.path("claim.key"), "--template", template,
                           "--param", f"SerialNumber={self.serial}",
                           "--flash", self.path] + list(extra)

    def run(self, args, env=None):
        p = run(args, self.timeout_s, env=env)
        self.outputs.append(p.stdout + p.stderr)
        return p

    def image(self):
        img = read_flash(self.path)
        self.secrets |= secret_strings(img.blobs)
        return img

    def show(self):
        """`--show`, checked against read_flash(): (complete, its fields, the image)."""
        p = self.run(self.cmd + ["--show", "--flash", self.path])
        check(p.returncode in (0, 2), f"--show: exit code {p.returncode}, expected 0 or 2")
        f = fields(p.stdout)
        img = self.image()
        meta = None
        if "device.json" in img.blobs:
            try:
                meta = json.loads(img.blobs["device.json"])
            except ValueError:
                meta = None
        for name, key in (("certificate.pem", "certificate_pem"), ("private.key", "private_key"),
                          ("journal", "journal"), ("device.json", "device_json")):
            want = "present" if name in img.blobs else "absent"
            if name == "device.json" and want == "present" and meta is None:
                want = "invalid"
            check(f.get(key) == want, f"--show says {key}={f.get(key)}, the partition {want}")
        check(f.get("invalid_slots") == str(len(img.invalid())),
              f"--show says invalid_slots={f.get('invalid_slots')}, the partition has "
              f"{len(img.invalid())}")
        complete = (meta is not None and "certificate.pem" in img.blobs
                    and "private.key" in img.blobs)
        check(f.get("complete") == ("1" if complete else "0") and
              p.returncode == (0 if complete else 2),
              f"--show: complete={f.get('complete')}, exit {p.returncode}; the partition "
              f"{'holds' if complete else 'does not hold'} a complete set")
        if meta is not None:
            check(f.get("thing_name") == meta.get("thingName")
                  and f.get("certificate_id") == meta.get("certificateId"),
                  f"--show: thing_name={f.get('thing_name')} certificate_id="
                  f"{f.get('certificate_id')}; device.json says {meta}")
        return complete, f, img

    def check_provisioned(self, max_created, exact_created=None, thing=None, registry=True):
        """A complete set in flash and no journal (its data scrubbed); device.json names the
        certificate, whose key matches it; in the registry the device is provisioned once.
        Returns (certificate id, device.json)."""
        complete, f, img = self.show()
        check(complete, "--show: no complete credential set in flash")
        check(f.get("journal") == "absent", "a journal is left in flash")
        journal_data = [s for s in img.slots if s[0] == "journal" and s[2] == "valid"
                        and s[4] != FLASH_TOMBSTONE]
        check(not journal_data, f"the removed journal's data is still in slot {journal_data}")
        cert_pem = img.blobs["certificate.pem"]
        cert_id = hashlib.sha256(pem_der_text(cert_pem.decode(), "certificate.pem")).hexdigest()
        meta = json.loads(img.blobs["device.json"])
        check(meta.get("certificateId") == cert_id,
              f"device.json names {meta.get('certificateId')}, certificate.pem is {cert_id}")
        want_thing = self.thing if thing is None else thing
        check(meta.get("thingName") == want_thing,
              f"device.json thingName={meta.get('thingName')!r}, expected {want_thing!r}")
        pem_key_matches(cert_pem, img.blobs["private.key"])
        if registry:
            check_registry(self.emu, self.serial, cert_id, max_created, exact_created)
        return cert_id, meta

    def finish(self):
        """No run printed a secret the partition held at any check."""
        texts = list(self.outputs)
        for name in sorted(os.listdir(self.work)):
            if name.startswith("killed-") and name.endswith(".stderr"):
                texts.append(open(os.path.join(self.work, name), errors="replace").read())
        check(self.secrets, "no secret was ever seen in flash")
        for text in texts:
            for secret in self.secrets:
                check(secret not in text, "a run printed a secret held in flash (a key line or "
                                          "the ownership token)")
        print(f"ok: {len(texts)} outputs hold none of the {len(self.secrets)} secrets")


def flash_success(fl, p):
    check(p.returncode == 0, f"exit code {p.returncode}, expected 0")
    f = fields(p.stdout)
    check(f.get("flash") == fl.path, f"flash={f.get('flash')}")
    check(re.fullmatch(r"[0-9a-f]{64}", f.get("certificate_id", "")),
          f"certificate_id={f.get('certificate_id')}")
    return f


def flash_case_ok(fl, fmt, extra):
    """Provisioned into an empty partition (created 0600): the journal stored and removed, the
    three credential blobs stored; the device provisioned once."""
    check(not os.path.exists(fl.path), "the partition exists before the first run")
    p = fl.run(fl.args(extra=["--format", fmt] + extra))
    f = flash_success(fl, p)
    check(f.get("thing_name") == fl.thing, f"thing_name={f.get('thing_name')}")
    check(f.get("attempts") == "1" and f.get("resumed") == "0",
          f"attempts={f.get('attempts')} resumed={f.get('resumed')}")
    check(int(f.get("flash_stores", "0")) >= 4, f"flash_stores={f.get('flash_stores')}")
    check(f.get("flash_removes") != "0", f"flash_removes={f.get('flash_removes')}")
    img = fl.image()
    check(img.newest.get("journal", (0, 0))[1] == FLASH_TOMBSTONE,
          "the journal was not stored and then removed (no tombstone)")
    cert_id, _ = fl.check_provisioned(max_created=1, exact_created=1)
    check(f.get("certificate_id") == cert_id, f"certificate_id={f.get('certificate_id')}")
    print(f"ok: {fl.thing} with ACTIVE certificate {cert_id[:12]}… in flash ({fmt})")


def flash_case_reject(fl):
    p = fl.run(fl.args(template="NoSuchTemplate"))
    check(p.returncode == 1, f"exit code {p.returncode}, expected 1")
    f = fields(p.stdout)
    check(f.get("result") == "FLEETPROV_REJECTED", f"result={f.get('result')}")
    check(f.get("status_code") == "404", f"status_code={f.get('status_code')}")
    check(f.get("error_code") == "ResourceNotFound", f"error_code={f.get('error_code')}")
    complete, s, img = fl.show()
    check(not complete and s.get("device_json") == "absent", "credentials were committed")
    check("private.key" not in img.blobs, "a private.key blob was stored")
    things = [t["name"] for t in fl.emu.registry()["things"]]
    check(fl.thing not in things, "a thing was registered")
    print(f"ok: rejected with 404 ResourceNotFound; journal {s.get('journal')}")


def flash_case_resume(fl):
    """A retryable 503 for RegisterThing with no retry left: the run fails and the certificate
    stays in the journal blob; the next run resumes it (no second certificate)."""
    args = fl.args()
    p = fl.run(args + ["--retry", "1,100,100"])
    check(p.returncode == 1, f"first run: exit code {p.returncode}, expected 1")
    f = fields(p.stdout)
    check(f.get("result") == "FLEETPROV_REJECTED" and f.get("status_code") == "503",
          f"first run: result={f.get('result')} status_code={f.get('status_code')}")
    complete, s, _ = fl.show()
    check(s.get("journal") == "present" and not complete,
          f"first run: journal={s.get('journal')} complete={s.get('complete')}")
    p = fl.run(args)
    f = flash_success(fl, p)
    check(f.get("resumed") == "1" and f.get("attempts") == "1",
          f"resumed={f.get('resumed')} attempts={f.get('attempts')}, expected 1 and 1")
    check("step: resuming (attempt 1)" in p.stderr, "no RESUMING step reported")
    cert_id, _ = fl.check_provisioned(max_created=1, exact_created=1)
    check(f.get("certificate_id") == cert_id, f"certificate_id={f.get('certificate_id')}")
    print(f"ok: failed with a journal in flash, then resumed certificate {cert_id[:12]}…")


def flash_case_cancel(fl):
    """SIGTERM once RegisterThing is sent (its reply held 600 ms by the emulator): the program
    cancels through fleetprov_cancel (exit 1, FLEETPROV_CANCELLED), the journal stays in flash,
    nothing is committed; the same command again resumes with no second certificate."""
    args = fl.args()
    print("+ " + " ".join(args), flush=True)
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL)
    killer = threading.Timer(fl.timeout_s, proc.kill)  # bound on the whole run
    killer.start()
    try:
        seen = []
        for line in proc.stderr:  # ends when the program exits
            seen.append(line)
            if "step: registering" in line:
                proc.send_signal(signal.SIGTERM)
                break
        out, err = proc.communicate()
    finally:
        killer.cancel()
    err = "".join(seen) + err
    fl.outputs.append(out + err)
    sys.stdout.write("--- stdout\n" + out + "--- stderr\n" + err + "---\n")
    for marker in SANITIZER_MARKERS:
        check(marker not in err, f"sanitizer report ({marker!r})")
    check(any("step: registering" in line for line in seen), "never reached RegisterThing")
    check(proc.returncode == 1, f"cancelled run: exit code {proc.returncode}, expected 1")
    check(fields(out).get("result") == "FLEETPROV_CANCELLED",
          f"result={fields(out).get('result')}")
    check("run the same command again to resume" in err, "no word about resuming")
    complete, s, _ = fl.show()
    check(s.get("journal") == "present", "the cancelled run left no journal in flash")
    check(not complete and s.get("device_json") == "absent", "committed despite the cancel")
    p = fl.run(args)
    f = flash_success(fl, p)
    check(f.get("resumed") == "1", f"resumed={f.get('resumed')}, expected 1")
    check(f.get("thing_name") == fl.thing, f"thing_name={f.get('thing_name')}")
    cert_id, _ = fl.check_provisioned(max_created=1, exact_created=1)
    check(f.get("certificate_id") == cert_id, f"certificate_id={f.get('certificate_id')}")
    print(f"ok: cancelled with a journal in flash, then resumed certificate {cert_id[:12]}…")


def flash_case_fault(fl, rules, step_ms):
    """The emulator misbehaves once (each rule has *1): the flow retries and the device ends up
    provisioned with one certificate. A dropped RegisterThing reply (drop@register*1) is the
    lost-reply path: the token is refused on attempt 2, the flow confirms the registration by
    connecting, and the thing name stays unknown to the device ("")."""
    lost_reply = any(r.startswith("drop@register") for r in rules)
    extra = ["--retry", "3,50,200"] + (["--timeout", step_ms] if lost_reply else [])
    p = fl.run(fl.args(extra=extra))
    f = flash_success(fl, p)
    check(f.get("attempts") == "2", f"attempts={f.get('attempts')}, expected 2")
    check("step: retrying (attempt 1 failed" in p.stderr, "no RETRYING step reported")
    thing = "" if lost_reply else fl.thing
    check(f.get("thing_name") == thing, f"thing_name={f.get('thing_name')}, expected {thing!r}")
    cert_id, _ = fl.check_provisioned(max_created=1, exact_created=1, thing=thing)
    check(f.get("certificate_id") == cert_id, f"certificate_id={f.get('certificate_id')}")
    print(f"ok: {', '.join(rules)}: attempt 2, one certificate {cert_id[:12]}…")


def flash_case_already(fl):
    """A complete set in flash: the next run (pointed at a port nothing listens on, so that any
    connection would fail) returns it with attempts=0 and writes nothing; --reprovision then
    makes a new certificate and replaces the set. The template (DemoTemplate plus large
    deviceConfiguration entries) makes device.json larger than the library's first load
    buffer (4096 bytes), so the second run reads it through the load protocol's size retry."""
    with open(fl.emu.path("templates/DemoTemplate.json")) as f:
        body = json.load(f)
    big = {f"Blob{i}": f"https://example.com/{i}/" + chr(ord("a") + i) * 700 for i in range(7)}
    body["DeviceConfiguration"].update(big)
    with open(fl.emu.path("templates/BigConfigTemplate.json"), "w") as f:
        json.dump(body, f)
    args = fl.args(template="BigConfigTemplate")
    flash_success(fl, fl.run(args))
    old_id, meta = fl.check_provisioned(max_created=1, exact_created=1)
    check(meta.get("deviceConfiguration", {}).get("Blob6") == big["Blob6"],
          "device.json lacks the template's deviceConfiguration")
    size = len(fl.image().blobs["device.json"])
    check(size > 4096, f"device.json is {size} bytes, not more than the first load buffer")
    before = open(fl.path, "rb").read()
    p = fl.run(fl.args(template="BigConfigTemplate", port=free_port()))
    f = flash_success(fl, p)
    check(f.get("already_provisioned") == "1",
          f"already_provisioned={f.get('already_provisioned')}")
    check(f.get("attempts") == "0", f"attempts={f.get('attempts')}, expected 0")
    check(int(f.get("flash_load_retries", "0")) >= 1,
          f"flash_load_retries={f.get('flash_load_retries')}: device.json ({size} bytes) was "
          "not loaded through the size retry")
    check(all(f.get(f"device_config.{k}") == v for k, v in big.items()),
          "the deviceConfiguration read back from flash differs")
    check(f.get("certificate_id") == old_id and f.get("thing_name") == fl.thing,
          f"certificate_id={f.get('certificate_id')} thing_name={f.get('thing_name')}")
    check(f.get("flash_stores") == "0" and f.get("flash_removes") == "0",
          f"flash_stores={f.get('flash_stores')} flash_removes={f.get('flash_removes')}")
    check(open(fl.path, "rb").read() == before, "the partition changed")
    check(len(created_certificates(fl.emu.registry())) == 1, "a certificate was created")
    p = fl.run(args + ["--reprovision"])
    f = flash_success(fl, p)
    check("already_provisioned" not in f, "--reprovision: already_provisioned")
    new_id, _ = fl.check_provisioned(max_created=2, registry=False)
    check(new_id != old_id, "--reprovision: the same certificate")
    check(f.get("certificate_id") == new_id, f"certificate_id={f.get('certificate_id')}")
    reg = fl.emu.registry()
    status = {c["id"]: c["status"] for c in created_certificates(reg)}
    check(status == {old_id: "ACTIVE", new_id: "ACTIVE"}, f"certificates created: {status}")
    attached = {t["name"]: t for t in reg["things"]}[fl.thing]["certificates"]
    check(sorted(attached) == sorted([old_id, new_id]), f"the thing has certificates {attached}")
    print(f"ok: second run sent and wrote nothing; --reprovision {old_id[:12]}… -> "
          f"{new_id[:12]}…")


def flash_case_badargs(fl):
    good = fl.args()
    not_flash = os.path.join(fl.work, "not-a-partition.bin")
    with open(not_flash, "wb") as f:
        f.write(b"firmware image, not a partition\n" * 3)
    not_flash_bytes = open(not_flash, "rb").read()
    missing_dir = os.path.join(fl.work, "no-such-dir", "flash.img")
    unused = os.path.join(fl.work, "unused.img")  # the arguments are checked before it is made

    def replace(args, flag, value):
        args = list(args)
        args[args.index(flag) + 1] = value
        return args

    def drop(args, flag):
        args = list(args)
        i = args.index(flag)
        del args[i:i + 2]
        return args

    show = fl.cmd + ["--show"]
    # (what, arguments, environment addition, expected result= line or a text on stderr)
    table = [
        ("no --flash", drop(good, "--flash"), {}, "--flash is required"),
        ("--out as well", good + ["--out", os.path.join(fl.work, "out")], {}, "no --out"),
        ("--state-dir as well", good + ["--state-dir", os.path.join(fl.work, "st")], {},
         "no --out or --state-dir"),
        ("no --endpoint", drop(good, "--endpoint"), {}, "--endpoint is required"),
        ("a file that is not a partition", replace(good, "--flash", not_flash), {},
         "not a flash partition"),
        ("a partition in a missing directory", replace(good, "--flash", missing_dir), {},
         "No such file or directory"),
        ("missing CA file", replace(replace(good, "--ca", os.path.join(fl.work, "nope.pem")),
                                    "--flash", unused), {}, "FLEETPROV_INVALID_ARGUMENT"),
        ("nothing listening", replace(good, "--port", str(free_port()))
         + ["--timeout", "3000", "--retry", "2,50,100"], {}, "FLEETPROV_CONNECTION"),
        ("a stop point that is none", good, {STOP_ENV: "store:nosuch:1"}, "names no step"),
        ("--show of a missing partition", show + ["--flash", missing_dir], {},
         "No such file or directory"),
        ("--show of a file that is not a partition", show + ["--flash", not_flash], {},
         "not a flash partition"),
        ("--show with another flag", show + ["--flash", fl.path, "--port", "1"], {},
         "take --flash PATH only"),
        ("--show and --self-test", show + ["--self-test", "--flash", fl.path], {}, "usage:"),
    ]
    failures = []
    for what, args, env_add, expected in table:
        print(f"\n# {what}")
        p = fl.run(args, env=dict(os.environ, **env_add))
        f = fields(p.stdout)
        if p.returncode != 1:
            failures.append(f"{what}: exit code {p.returncode}, expected 1")
        elif expected.startswith("FLEETPROV_"):
            if f.get("result") != expected or not f.get("error"):
                failures.append(f"{what}: result={f.get('result')}, expected {expected}")
        elif expected not in p.stderr:
            failures.append(f"{what}: {expected!r} not on stderr")
    check(not failures, "\n".join(failures))
    check(open(not_flash, "rb").read() == not_flash_bytes, "the file that is not a partition "
                                                           "was changed")
    check(not os.path.exists(os.path.dirname(missing_dir)), "a missing directory was created")
    check(not os.path.exists(unused), "a partition was created for a run with a bad argument")
    check(not os.path.exists(os.path.join(fl.work, "out")), "an --out directory was created")
    print(f"ok: {len(table)} bad-argument rows")


def flash_case_store(fl):
    """--self-test on a fresh partition (the store's callbacks called directly: the load
    protocol's size retry, replacement, tombstones, a write cut short, a bad CRC, a blob too
    big); then read_flash() must find what the self-test left, byte for byte: a second,
    independent reader of the same layout (CRC-32 from zlib)."""
    p = fl.run(fl.cmd + ["--self-test", "--flash", fl.path])
    check(p.returncode == 0 and fields(p.stdout).get("self_test") == "ok",
          f"exit code {p.returncode}, self_test={fields(p.stdout).get('self_test')}")
    img = read_flash(fl.path)
    pattern = bytes((i * 7 + 1) & 0xFF for i in range(FLASH_SLOT_SIZE))
    want = {"journal": pattern[4:404], "private.key": pattern[2:12],
            "certificate.pem": pattern[:FLASH_SLOT_SIZE - FLASH_HEADER], "device.json": b""}
    for name, content in want.items():
        check(img.blobs.get(name) == content,
              f"{name}: read_flash found {len(img.blobs.get(name) or b'')} bytes, the self-test "
              f"left {len(content)}")
    check([s[1] for s in img.invalid()] == [s[1] for s in img.invalid("journal")]
          and len(img.invalid()) == 1, f"invalid slots {img.invalid()}, expected the journal's "
                                       "record with the flipped bit")
    print("ok: self-test passed, and read_flash() reads what it left")


def parse_tear(stop):
    """store:NAME:N / remove:NAME:N -> (op, name, n); a step name -> None."""
    m = re.fullmatch(r"(store|remove):([a-z.]+):([1-9][0-9]*)", stop)
    return (m.group(1), m.group(2), int(m.group(3))) if m else None


def flash_after_kill(fl, stop, first):
    """What a kill at `stop` left in flash; returns (journal present, committed)."""
    committed, s, img = fl.show()
    has_journal = "journal" in img.blobs
    if committed:
        # Credentials are committed only after the new certificate connected.
        cert_id = s.get("certificate_id")
        status = {c["id"]: c["status"] for c in fl.emu.registry()["certificates"]}.get(cert_id)
        check(status == "ACTIVE", f"committed certificate {cert_id} is {status}, not ACTIVE")
    tear = parse_tear(stop)
    if tear is not None:
        op, name, n = tear
        check(img.invalid(name), f"killed at {stop}: no record cut short in {name}'s slots")
        if first:
            # On a fresh partition the blob had a record before this write iff an earlier
            # write of this run made one: the new record must not have destroyed it.
            before = n >= 2 or op == "remove"
            check((name in img.blobs) == before,
                  f"killed at {stop}: {name} is {'present' if name in img.blobs else 'absent'}, "
                  f"expected {'its previous record' if before else 'absent'}")
    elif first and stop in JOURNALED:
        check(has_journal, f"killed at {stop}: no journal in flash")
        check("private.key" not in img.blobs,
              f"killed at {stop}: credentials stored before the certificate connected")
    elif first and stop in CRASH_STEPS[:CRASH_STEPS.index("certificate_created")]:
        check(not has_journal, f"killed at {stop}: a journal before any certificate")
        check(all(sl[2] == "erased" for sl in img.slots), f"killed at {stop}: flash written")
    elif stop == "committed":
        check(committed and not has_journal, "COMMITTED reported before the commit was complete")
    elif stop == "resuming":
        check(has_journal, "killed at resuming: the journal is gone")
    print(f"killed at {stop}: journal {'present' if has_journal else 'absent'}, "
          f"credentials {'committed' if committed else 'not committed'}")
    return has_journal, committed


def flash_case_crash(fl, extra, stops):
    """provision_flash killed with SIGKILL at each of `stops` in turn (a step, or a power loss
    emulated in the middle of a flash write: store:NAME:N / remove:NAME:N), each run on the same
    partition, then run to the end: one ACTIVE certificate, the one in flash, whose key matches
    it; no second certificate once one was persisted; --show reports a complete set and no
    journal."""
    check(stops, "the crash case needs --stop-at")
    args = fl.args(extra=extra)
    persisted_first = False
    has_journal = committed = False
    for n, stop in enumerate(stops):
        stop_and_kill(args, stop, fl.work, n + 1, fl.timeout_s)
        has_journal, committed = flash_after_kill(fl, stop, n == 0)
        if n == 0:
            persisted_first = has_journal or committed
    env = dict(os.environ)
    env.pop(STOP_ENV, None)
    p = fl.run(args, env=env)
    f = flash_success(fl, p)
    # A write of the journal's registration cut short leaves the record from before
    # RegisterThing: the token is refused when resumed (it was used), the flow confirms the
    # registration by connecting, and the thing name is unknown to the device.
    tear = parse_tear(stops[-1])
    lost_name = tear is not None and tear[:2] == ("store", "journal") and tear[2] >= 2
    if f.get("already_provisioned") == "1":
        check(committed and not has_journal, "already_provisioned without committed credentials")
        what, thing = "already provisioned", fl.thing
    else:
        check(not committed or has_journal, "provisioned again over committed credentials")
        resumed = "1" if has_journal else "0"
        check(f.get("resumed") == resumed, f"resumed={f.get('resumed')}, expected {resumed}")
        check(re.fullmatch(r"[1-9]\d*", f.get("attempts", "")), f"attempts={f.get('attempts')}")
        thing = f.get("thing_name")
        check(thing == fl.thing or (lost_name and thing == ""),
              f"thing_name={thing!r}, expected {fl.thing!r}")
        what = f"resumed={resumed} attempts={f['attempts']} thing_name={thing!r}"
    first = stops[0]
    after_creation = CRASH_STEPS[CRASH_STEPS.index("certificate_created"):]
    persisted = persisted_first or first in after_creation
    cert_id, _ = fl.check_provisioned(max_created=1 + len(stops),
                                      exact_created=1 if persisted else None, thing=thing)
    if "certificate_id" in f:
        check(f["certificate_id"] == cert_id, f"certificate_id={f['certificate_id']}")
    print(f"ok: killed at {', '.join(stops)}; then {what}; one ACTIVE certificate "
          f"{cert_id[:12]}…")


FLASH_FAULTS = {"cancel": ["delay:600@register*1"], "resume": ["reject:503@register*1"]}


def flash_main(a, cmd, emu, serial, step_ms):
    """The provision_flash cases (CMakeLists.txt: provision_flash_*)."""
    fl = Flash(cmd, emu, a.work, serial, a.timeout)
    if a.case in ("ok", "cbor"):
        flash_case_ok(fl, "json" if a.case == "ok" else "cbor", a.arg)
    elif a.case == "reject":
        flash_case_reject(fl)
    elif a.case == "resume":
        flash_case_resume(fl)
    elif a.case == "cancel":
        flash_case_cancel(fl)
    elif a.case == "fault":
        check(a.fault, "the fault case needs --fault")
        flash_case_fault(fl, a.fault, step_ms)
    elif a.case == "already":
        flash_case_already(fl)
    elif a.case == "crash":
        flash_case_crash(fl, a.arg, a.stop_at)
    elif a.case == "badargs":
        flash_case_badargs(fl)
        return  # nothing secret was ever stored
    elif a.case == "store":
        flash_case_store(fl)
        return  # test patterns, not secrets
    else:
        raise Failed(f"provision_flash has no {a.case} case")
    fl.finish()


def prepare(ap, a):
    """The start every driver shares: the command after `--`, a fresh --work directory and the
    serial; None (after saying why) when the emulator binary is missing."""
    cmd = a.command[1:] if a.command[:1] == ["--"] else a.command
    if not cmd:
        ap.error("no command after --")
    if not os.access(a.emulator, os.X_OK):
        print(f"emulator not found: {a.emulator} (cargo build -p fleetprov-emulator)")
        return None
    if os.path.exists(a.work):
        shutil.rmtree(a.work)
    os.makedirs(a.work)
    return cmd, a.serial or f"SN{os.getpid()}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--emulator", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--case", required=True,
                    choices=["ok", "cbor", "reject", "badargs", "timeout", "cancel", "retry",
                             "lostreply", "resume", "crash", "fault", "inactive", "rotate",
                             "interrupt", "already", "store", "denied",
                             "signer", "signer_cbor", "signer_broken"])
    ap.add_argument("--serial", default=None)
    ap.add_argument("--arg", action="append", default=[],
                    help="extra program argument for the ok, cbor, crash, fault, inactive, rotate "
                         "and signer cases (repeatable; --arg=--x)")
    ap.add_argument("--fault", action="append", default=[],
                    help="emulator fault rule (repeatable), added to the case's own")
    ap.add_argument("--stop-at", action="append", default=[],
                    help="crash case: step to kill the program at (repeatable: one run each)")
    ap.add_argument("--state-dir", action="store_true",
                    help="ok and cbor cases: run with --state-dir WORK/state (journal gone after)")
    ap.add_argument("--timeout", type=float, default=120.0, help="per program run, seconds")
    ap.add_argument("command", nargs=argparse.REMAINDER)
    a = ap.parse_args()
    prepared = prepare(ap, a)
    if prepared is None:
        return 1
    cmd, serial = prepared
    # The outcome cases run against the emulator's default RSA-2048 CA, as AWS's; the rest
    # (crash points, faults, arguments: most of the emulators started) with a quick EC CA.
    emu = Emulator(os.path.abspath(a.emulator), os.path.join(a.work, "emulator"),
                   ca_key_type=None if a.case in ("ok", "cbor", "reject", "rotate") else "ec")
    # The step timeout of the cases that wait for a reply that never comes: short, but under
    # valgrind (and a loaded machine) a TLS handshake alone can take a second or two.
    step_ms = str(6000 if any(os.path.basename(c) == "valgrind" for c in cmd) else 2000)
    started = time.monotonic()
    try:
        faults = {"timeout": ["drop@register"], "cancel": ["drop@register"],
                  "retry": ["reject:503@register*1"], "resume": ["reject:503@register*1"],
                  "lostreply": ["drop@register*1"], "interrupt": ["delay:600@register*1"]}
        if program(cmd) == FLASH:
            faults = FLASH_FAULTS
        extra = ["--control-port", "0"] if a.case == "rotate" else []
        emu.start(extra + [arg for rule in faults.get(a.case, []) + a.fault
                           for arg in ("--fault", rule)])
        if program(cmd) == FLASH:
            flash_main(a, cmd, emu, serial, step_ms)
        elif a.case in ("ok", "cbor"):
            case_ok(cmd + a.arg, emu, a.work, serial, "json" if a.case == "ok" else "cbor",
                    a.timeout, a.state_dir)
        elif a.case == "fault":
            check(a.fault, "the fault case needs --fault")
            case_fault(cmd + a.arg, emu, a.work, serial, a.timeout)
        elif a.case == "inactive":
            case_inactive(cmd + a.arg, emu, a.work, serial, a.timeout)
        elif a.case == "rotate":
            case_rotate(cmd + a.arg, emu, a.work, serial, a.timeout)
        elif a.case in ("signer", "signer_cbor"):
            case_signer(cmd + a.arg, emu, a.work, serial, "json" if a.case == "signer" else "cbor",
                        a.case == "signer", a.timeout)
        elif a.case == "signer_broken":
            case_signer_broken(cmd + a.arg, emu, a.work, serial, a.timeout)
        elif a.case == "denied":
            case_denied(cmd, emu, a.work, serial, a.timeout)
        elif a.case == "reject":
            case_reject(cmd, emu, a.work, serial, a.timeout)
        elif a.case == "timeout":
            # The one-call flow retries timeouts: one attempt only, so the timeout surfaces.
            no_retry = ["--retry", "1,1000,1000"] if program(cmd) in RETRYING else []
            case_no_reply(cmd, emu, a.work, serial, a.timeout, ["--timeout", step_ms] + no_retry,
                          "FLEETPROV_TIMEOUT")
        elif a.case in ("retry", "lostreply"):
            check(program(cmd) in ONE_CALL, f"the {a.case} case runs a one-call example")
            extra = ["--retry", "3,50,200"]
            if a.case == "lostreply":
                extra += ["--timeout", step_ms]
            case_retry(cmd, emu, a.work, serial, a.timeout, extra, a.case == "lostreply")
        elif a.case == "resume":
            check(program(cmd) in ONE_CALL, "the resume case runs a one-call example")
            case_resume(cmd, emu, a.work, serial, a.timeout)
        elif a.case == "interrupt":
            check(program(cmd) == "provision", "the interrupt case runs the provision example")
            case_interrupt(cmd, emu, a.work, serial, a.timeout)
        elif a.case == "crash":
            case_crash(cmd, emu, a.work, serial, a.timeout, a.arg, a.stop_at)
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
