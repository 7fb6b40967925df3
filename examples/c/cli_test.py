#!/usr/bin/env python3
"""ctest driver for the installed `fleetprov` command: starts fleetprov-emulator, runs the
command against it, checks exit statuses, stdout (key=value lines or --json), the files written
and the emulator's registry.

    cli_test.py --emulator PATH --work DIR --case CASE [--examples DIR] [--timeout SECS]
                -- [LAUNCHER...] FLEETPROV

CASE: ok (--json, JSON payloads, then a second run that is a no-op), cbor (CBOR with
CreateKeysAndCertificate, key=value output), config (a configuration file, flags overriding it,
and a table of bad lines, options and input files with their exit statuses), reject (unknown
template: 77; a 503 without retries: 75), unreachable (a closed port: 69), busy (a second run
on the state directory of a running one: 75), interrupt and
sigterm (SIGINT / SIGTERM once RegisterThing is sent: 130 / 143, the journal kept, then a rerun
resumes, one certificate in all), rotate, systemd (the example unit checked with
`systemd-analyze verify` when available, and the example configuration file provisioning).
Everything after `--` is the command: a launcher (CMAKE_CROSSCOMPILING_EMULATOR such as
qemu-aarch64, or valgrind) may come before the program. Every run's stdout and stderr are
checked for secrets: no PEM private key, no line of the device's key, no ownership token.
"""
import argparse
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from emu_test import (SANITIZER_MARKERS, Emulator, Failed, check, check_provisioned,  # noqa: E402
                      created_certificates, fields, free_port, mode, pem_der, prepare, snapshot)

EX_USAGE, EX_DATAERR, EX_NOINPUT, EX_UNAVAILABLE = 64, 65, 66, 69
EX_CANTCREAT, EX_TEMPFAIL, EX_NOPERM = 73, 75, 77

# Every output seen, checked for secrets at the end (and after each run against what is known).
OUTPUTS = []


class Cli:
    def __init__(self, cmd, emu, work, timeout_s):
        self.cmd, self.emu, self.work, self.timeout_s = cmd, emu, work, timeout_s
        self.out = os.path.join(work, "device")
        self.state = os.path.join(work, "state")

    def conn(self, template="DemoTemplate", serial="X", port=None, claim=True):
        args = ["--endpoint", "localhost", "--port", str(port or self.emu.port),
                "--ca", self.emu.path("ca.pem"), "--template", template]
        if claim:
            args += ["--cert", self.emu.path("claim.pem"), "--key", self.emu.path("claim.key"),
                     "--param", f"SerialNumber={serial}"]
        return args

    def run(self, args, expect=None, what="run"):
        """Runs `fleetprov provision ARGS` (ARGS as they are when they start with rotate,
        --version or help)."""
        own = args[:1] in (["rotate"], ["--version"], ["help"])
        cmd = self.cmd + (args if own else ["provision"] + args)
        print("+ " + " ".join(cmd), flush=True)
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=self.timeout_s,
                               stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as e:
            raise Failed(f"{what}: timed out after {self.timeout_s} s: {e.stdout} {e.stderr}")
        sys.stdout.write(f"--- exit {p.returncode}\n--- stdout\n{p.stdout}--- stderr\n"
                         f"{p.stderr}---\n")
        sys.stdout.flush()
        OUTPUTS.append(p.stdout + p.stderr)
        for marker in SANITIZER_MARKERS:
            check(marker not in p.stderr, f"{what}: sanitizer report ({marker!r})")
        check(p.returncode != 99, f"{what}: valgrind reported errors (exit 99)")
        check(p.returncode >= 0, f"{what}: killed by signal {-p.returncode}")
        if expect is not None:
            check(p.returncode == expect, f"{what}: exit status {p.returncode}, expected {expect}")
        return p


def parse_json(p, what):
    lines = [line for line in p.stdout.splitlines() if line.strip()]
    check(len(lines) == 1, f"{what}: {len(lines)} lines on stdout, expected one JSON object")
    try:
        obj = json.loads(lines[0])
    except ValueError as e:
        raise Failed(f"{what}: stdout is not JSON: {e}")
    check(isinstance(obj, dict), f"{what}: stdout is not a JSON object")
    return obj


def check_no_secrets(secret_texts):
    """No output holds a PEM private key, a line of a key's base64, or a token."""
    needles = []
    for text in secret_texts:
        if not text:
            continue
        if "PRIVATE KEY" in text:
            needles += [line for line in text.splitlines()
                        if len(line) >= 16 and "-----" not in line]
        else:
            needles.append(text)
    for out in OUTPUTS:
        check("PRIVATE KEY" not in out, "a private key PEM in the command's output")
        for n in needles:
            check(n not in out, "a secret (key line or ownership token) in the command's output")


def device_key(out_dir):
    path = os.path.join(out_dir, "private.key")
    return open(path).read() if os.path.exists(path) else ""


def check_success_json(cli, obj, serial, status="provisioned"):
    check(obj.get("status") == status, f"status={obj.get('status')}, expected {status}")
    check(obj.get("exit_code") == 0, f"exit_code={obj.get('exit_code')}")
    check(obj.get("thing_name") == f"demo-{serial}", f"thing_name={obj.get('thing_name')}")
    cert_id = obj.get("certificate_id") or ""
    check(re.fullmatch(r"[0-9a-f]{64}", cert_id), f"certificate_id={cert_id}")
    files = obj.get("files") or {}
    for key, name in (("certificate", "certificate.pem"), ("private_key", "private.key"),
                      ("device", "device.json")):
        path = files.get(key, "")
        check(os.path.realpath(path) == os.path.realpath(os.path.join(cli.out, name)),
              f"files.{key}={path}")
        check(os.path.exists(path), f"{path} does not exist")
    check(os.path.realpath(obj.get("output_dir", "")) == os.path.realpath(cli.out),
          f"output_dir={obj.get('output_dir')}")
    check(hashlib.sha256(pem_der(files["certificate"])).hexdigest() == cert_id,
          "certificate.pem is not the reported certificate")
    check(json.load(open(files["device"])).get("certificateId") == cert_id,
          "device.json does not name the reported certificate")
    return cert_id


def case_ok(cli, serial):
    """--json, --verbose, JSON payloads, a state directory: provisioned; the JSON object agrees
    with the files and the registry. Again: already provisioned, exit 0, nothing sent, nothing minted."""
    args = cli.conn(serial=serial) + ["--out", cli.out, "--state-dir", cli.state, "--json"]
    # --verbose: the library's log lines down to debug, checked for secrets like the rest.
    p = cli.run(args + ["--verbose"], expect=0, what="first run")
    check(re.search(r"^fleetprov: (debug|info): ", p.stderr, re.M), "--verbose: no log lines")
    obj = parse_json(p, "first run")
    cert_id = check_success_json(cli, obj, serial)
    check(obj.get("already_provisioned") is False, "first run: already_provisioned")
    check(obj.get("attempts") == 1, f"attempts={obj.get('attempts')}")
    check("step: registering (attempt 1)" in p.stderr, "no progress lines on stderr")
    check(check_provisioned(cli.emu, cli.out, serial, max_created=1, exact_created=1) == cert_id,
          "the registry's certificate is not the reported one")
    check(mode(cli.state) == 0o700, f"state dir has mode {oct(mode(cli.state))}")
    check(not os.path.exists(os.path.join(cli.state, "journal.json")), "journal left behind")
    before = snapshot(cli.out)

    p = cli.run(args, expect=0, what="second run")
    obj = parse_json(p, "second run")
    check(check_success_json(cli, obj, serial, status="already_provisioned") == cert_id,
          "second run: another certificate")
    check(obj.get("already_provisioned") is True, "second run: already_provisioned false")
    check(obj.get("attempts") == 0, f"second run: attempts={obj.get('attempts')}, expected 0")
    check("step: connecting" not in p.stderr, "second run connected")
    check(snapshot(cli.out) == before, "second run changed the credentials")
    check(len(created_certificates(cli.emu.registry())) == 1, "second run minted a certificate")

    p = cli.run(args[:-1] + ["--quiet"], expect=0, what="third run, --quiet")
    own = [line for line in p.stderr.splitlines() if not re.match(r"==\d+==", line)]
    check(not own, f"--quiet: stderr is not empty: {own!r}")  # valgrind's lines aside
    check(fields(p.stdout).get("status") == "already_provisioned", "--quiet: status")
    check_no_secrets([device_key(cli.out), open(cli.emu.path("claim.key")).read()])
    print(f"ok: provisioned {cert_id[:12]}…, then already provisioned twice")


def case_cbor(cli, serial):
    args = cli.conn(serial=serial) + ["--out", cli.out, "--format", "cbor", "--method", "keys"]
    p = cli.run(args, expect=0)
    f = fields(p.stdout)
    check(f.get("status") == "provisioned", f"status={f.get('status')}")
    check(f.get("thing_name") == f"demo-{serial}", f"thing_name={f.get('thing_name')}")
    cert_id = check_provisioned(cli.emu, cli.out, serial, max_created=1, exact_created=1)
    check(f.get("certificate_id") == cert_id, f"certificate_id={f.get('certificate_id')}")
    for key, name in (("certificate", "certificate.pem"), ("private_key", "private.key"),
                      ("device", "device.json")):
        check(f.get(key) == os.path.join(cli.out, name), f"{key}={f.get(key)}")
    check(f.get("already_provisioned") == "0", "already_provisioned")
    check_no_secrets([device_key(cli.out)])
    print(f"ok: CBOR, CreateKeysAndCertificate, {cert_id[:12]}…")


def write(path, text):
    with open(path, "w") as f:
        f.write(text)
    return path


def case_config(cli, serial):
    """A configuration file holding everything, with a wrong template and serial number that
    the command line overrides; then bad lines, options and input files, each with its exit
    status and a message naming the cause (the line number for a file)."""
    emu = cli.emu
    conf = write(os.path.join(cli.work, "provision.conf"), f"""\
# a comment, then a blank line

endpoint = localhost
port = {emu.port}
ca = {emu.path('ca.pem')}
cert = {emu.path('claim.pem')}
key = {emu.path('claim.key')}
template = NoSuchTemplate
param = SerialNumber=from-the-file
param = Location=factory
out = {cli.out}
state-dir = {cli.state}
format = cbor
timeout = 5000
retry = 2,50,100
json = yes
credentials = {cli.out}
""")
    p = cli.run(["--config", conf, "--template", "DemoTemplate", "--param",
                 f"SerialNumber={serial}"], expect=0, what="config file + flags")
    obj = parse_json(p, "config file + flags")  # json = yes in the file
    cert_id = check_success_json(cli, obj, serial)
    check_provisioned(emu, cli.out, serial, max_created=1, exact_created=1)
    thing = {t["name"]: t for t in emu.registry()["things"]}[f"demo-{serial}"]
    attrs = thing.get("attributes", {})
    check(attrs.get("location") == "factory",
          f"the file's Location parameter was not sent: {attrs}")
    print(f"ok: config file with overrides: {cert_id[:12]}…")

    good = cli.conn(serial=serial) + ["--out", os.path.join(cli.work, "other")]
    missing = os.path.join(cli.work, "no-such-file.pem")

    def replace(args, flag, value):
        args = list(args)
        args[args.index(flag) + 1] = value
        return args

    def conf_with(name, *lines):
        return ["--config", write(os.path.join(cli.work, name), "".join(lines))]

    # (what, arguments, exit status, texts stderr must contain)
    table = [
        ("unknown key in the file", conf_with("c1", "# ok\n", "endpoint = x\n", "colour = blue\n"),
         EX_USAGE, ["c1:3: unknown key 'colour'"]),
        ("line without =", conf_with("c2", "endpoint localhost\n"), EX_USAGE,
         ["c2:1: expected `key = value`"]),
        ("bad port in the file", conf_with("c3", "\n", "port = eighty\n"), EX_USAGE,
         ["c3:2: port"]),
        ("key given twice", conf_with("c4", "template = A\n", "template = B\n"), EX_USAGE,
         ["c4:2: 'template' given twice (first on line 1)"]),
        ("switch that is not yes/no", conf_with("c5", "json = maybe\n"), EX_USAGE,
         ["c5:1: 'json' wants yes or no"]),
        ("key without value", conf_with("c6", "out =\n"), EX_USAGE, ["c6:1: 'out' has no value"]),
        ("parameter given twice", conf_with("c7", "param = A=1\n", "param = B=2\n",
                                            "param = A=3\n"), EX_USAGE,
         ["c7:3: parameter 'A' given twice (first on line 1)"]),
        ("unreadable config file", ["--config", missing], EX_NOINPUT,
         ["cannot read configuration file", "no-such-file.pem"]),
        ("unknown option", good + ["--bogus", "1"], EX_USAGE, ["unknown option '--bogus'"]),
        ("option without value", good + ["--param"], EX_USAGE, ["--param needs a value"]),
        ("no --out", good[:-2], EX_USAGE, ["--out is required"]),
        ("bad --format", good + ["--format", "xml"], EX_USAGE, ["json or cbor"]),
        ("bad --retry", good + ["--retry", "3"], EX_USAGE, ["ATTEMPTS,FIRST_MS,MAX_MS"]),
        ("param without =", good + ["--param", "novalue"], EX_USAGE, ["KEY=VALUE"]),
        ("rotate-only option", good + ["--credentials", cli.out], EX_USAGE,
         ["not an option of provision"]),
        ("missing CA file", replace(good, "--ca", missing), EX_NOINPUT, ["CA file", missing]),
        ("missing claim key", replace(good, "--key", missing), EX_NOINPUT, ["claim key", missing]),
        ("key that is not a key", replace(good, "--key", emu.path("ca.pem")), EX_DATAERR,
         ["FLEETPROV_INVALID_ARGUMENT"]),
        ("bad template name", replace(good, "--template", "no spaces"), EX_DATAERR,
         ["template name may only contain"]),
        # The emulator's server certificate: issued by its CA, but not a registered one.
        ("unregistered claim certificate",
         replace(replace(good, "--cert", emu.path("server.pem")), "--key", emu.path("server.key"))
         + ["--retry", "1,50,50"], EX_NOPERM, ["FLEETPROV_TLS", "refused the claim certificate"]),
        ("unwritable output directory", replace(good, "--out", "/proc/fleetprov-output"),
         EX_CANTCREAT, ["FLEETPROV_STORAGE", "cannot hold the credentials"]),
    ]
    failures = []
    for what, args, status, texts in table:
        print(f"\n# {what}")
        p = cli.run(args, what=what)
        if p.returncode != status:
            failures.append(f"{what}: exit status {p.returncode}, expected {status}")
        failures += [f"{what}: stderr lacks {t!r}" for t in texts if t not in p.stderr]
        if fields(p.stdout).get("exit_code") != str(status):
            failures.append(f"{what}: stdout has exit_code={fields(p.stdout).get('exit_code')}")
    # With --json a usage error is a JSON object too.
    p = cli.run(good + ["--bogus", "--json"], what="usage error with --json")
    obj = parse_json(p, "usage error with --json")
    if obj.get("status") != "failed" or obj.get("exit_code") != EX_USAGE:
        failures.append(f"usage error with --json: {obj}")
    check(not failures, "\n".join(failures))
    check(not os.path.exists(os.path.join(cli.work, "other")), "a failed run created --out")

    p = cli.run(["--version", "--json"], expect=0, what="--version --json")
    v = parse_json(p, "--version --json")
    check(v.get("compatible") is True and v.get("abi") == v.get("library_abi")
          and v.get("version") == v.get("library_version"), f"--version: {v}")
    p = cli.run(["help"], expect=0, what="help")
    for status in (0, 64, 65, 66, 69, 70, 73, 75, 76, 77, 130):
        check(re.search(rf"^  {status} ", p.stdout, re.M), f"help does not document {status}")
    check_no_secrets([device_key(cli.out)])
    print(f"ok: {len(table)} bad settings, each with its exit status and cause")


def case_reject(cli, serial):
    """Unknown template: 404, refused (77), nothing written. A 503 with no retries left:
    temporary (75)."""
    p = cli.run(cli.conn(template="NoSuchTemplate", serial=serial) + ["--out", cli.out, "--json"],
                expect=EX_NOPERM, what="unknown template")
    obj = parse_json(p, "unknown template")
    err = obj.get("error") or {}
    check(obj.get("status") == "failed" and obj.get("exit_code") == EX_NOPERM, f"{obj}")
    check(err.get("name") == "FLEETPROV_REJECTED" and err.get("code") == 6, f"error={err}")
    check(err.get("status_code") == 404 and err.get("error_code") == "ResourceNotFound",
          f"error={err}")
    check("NoSuchTemplate" in err.get("message", ""), f"message={err.get('message')}")
    check(err.get("retryable") is False, "a 404 retryable")
    check(not os.path.exists(os.path.join(cli.out, "private.key")), "credentials written")

    cli.emu.control("fault reject:503@register")
    p = cli.run(cli.conn(serial=serial) + ["--out", cli.out, "--retry", "1,100,100"],
                expect=EX_TEMPFAIL, what="503")
    f = fields(p.stdout)
    check(f.get("result") == "FLEETPROV_REJECTED" and f.get("status_code") == "503",
          f"503: result={f.get('result')} status_code={f.get('status_code')}")
    check(f.get("retryable") == "1", "503: not retryable")
    cli.emu.control("clear")
    check_no_secrets([])
    print("ok: 404 -> 77, 503 -> 75")


def case_unreachable(cli, serial):
    port = free_port()
    p = cli.run(cli.conn(serial=serial, port=port) + ["--out", cli.out, "--retry", "2,50,100",
                "--json"], expect=EX_UNAVAILABLE, what="closed port")
    obj = parse_json(p, "closed port")
    err = obj.get("error") or {}
    check(err.get("name") == "FLEETPROV_CONNECTION", f"error={err}")
    check(str(port) in err.get("message", ""), f"message={err.get('message')}")
    check("step: retrying (attempt 1 failed" in p.stderr, "no retry reported on stderr")
    check(not os.path.exists(cli.out), f"{cli.out} was created")
    print(f"ok: nothing listening on {port} -> 69")


def case_interrupt(cli, serial, sig):
    """SIGINT (or SIGTERM) once RegisterThing is sent (its reply held 600 ms by the emulator):
    exit 130 (143), the journal kept, nothing committed; the same command again resumes it:
    one certificate in all."""
    args = cli.cmd + ["provision"] + cli.conn(serial=serial) + [
        "--out", cli.out, "--state-dir", cli.state, "--json"]
    print("+ " + " ".join(args), flush=True)
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL)
    killer = threading.Timer(cli.timeout_s, proc.kill)
    killer.start()
    try:
        seen = []
        for line in proc.stderr:
            seen.append(line)
            if "step: registering" in line:
                proc.send_signal(sig)
                break
        out, err = proc.communicate()
    finally:
        killer.cancel()
    err = "".join(seen) + err
    sys.stdout.write(f"--- exit {proc.returncode}\n--- stdout\n{out}--- stderr\n{err}---\n")
    OUTPUTS.append(out + err)
    for marker in SANITIZER_MARKERS:
        check(marker not in err, f"interrupted run: sanitizer report ({marker!r})")
    name = "SIGINT" if sig == signal.SIGINT else "SIGTERM"
    expected = 130 if sig == signal.SIGINT else 143
    check(any("step: registering" in line for line in seen), "never reached RegisterThing")
    check(proc.returncode == expected, f"exit status {proc.returncode}, expected {expected}")
    obj = parse_json(subprocess.CompletedProcess(args, proc.returncode, out, err), "interrupted")
    e = obj.get("error") or {}
    check(e.get("name") == "FLEETPROV_CANCELLED" and e.get("signal") == name, f"error={e}")
    check(obj.get("exit_code") == expected, f"exit_code={obj.get('exit_code')}")
    check("run the same command again to resume" in err, "no word about resuming")
    journal_path = os.path.join(cli.state, "journal.json")
    check(os.path.exists(journal_path), "the journal was not kept")
    journal = json.load(open(journal_path))
    check(not os.path.exists(os.path.join(cli.out, "device.json")), "committed despite the cancel")

    p = cli.run(args[len(cli.cmd) + 1:], expect=0, what="rerun")
    obj = parse_json(p, "rerun")
    cert_id = check_success_json(cli, obj, serial)
    check(obj.get("resumed") is True, f"rerun: resumed={obj.get('resumed')}")
    check(check_provisioned(cli.emu, cli.out, serial, max_created=1, exact_created=1) == cert_id,
          "not the reported certificate")
    check_no_secrets([journal.get("ownership_token"), journal.get("private_key_pem"),
                      device_key(cli.out)])
    print(f"ok: {name} -> {expected}, journal kept, rerun resumed {cert_id[:12]}…")


def case_busy(cli, serial):
    """A second run while the first holds the state directory (its RegisterThing reply held 3 s
    by the emulator): FLEETPROV_BUSY, temporary (75), and the first one still provisions."""
    args = cli.cmd + ["provision"] + cli.conn(serial=serial) + [
        "--out", cli.out, "--state-dir", cli.state, "--timeout", "20000"]
    print("+ " + " ".join(args), flush=True)
    first = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             stdin=subprocess.DEVNULL)
    killer = threading.Timer(cli.timeout_s, first.kill)
    killer.start()
    try:
        seen = []
        for line in first.stderr:
            seen.append(line)
            if "step: registering" in line:
                break
        check(any("step: registering" in line for line in seen), "never reached RegisterThing")
        p = cli.run(args[len(cli.cmd) + 1:] + ["--json"], expect=EX_TEMPFAIL, what="second run")
        err = parse_json(p, "second run").get("error") or {}
        check(err.get("name") == "FLEETPROV_BUSY", f"second run: error={err}")
        out, rest = first.communicate()
    finally:
        killer.cancel()
    sys.stdout.write(f"--- first run: exit {first.returncode}\n--- stdout\n{out}--- stderr\n"
                     f"{''.join(seen) + rest}---\n")
    OUTPUTS.append(out + "".join(seen) + rest)
    check(first.returncode == 0, f"first run: exit status {first.returncode}, expected 0")
    check_provisioned(cli.emu, cli.out, serial, max_created=1, exact_created=1)
    check_no_secrets([device_key(cli.out)])
    print("ok: a second run on a busy state directory -> 75, the first provisioned")


def case_rotate(cli, serial):
    cli.run(cli.conn(serial=serial) + ["--out", cli.out], expect=0, what="provision")
    old_id = check_provisioned(cli.emu, cli.out, serial, max_created=1, exact_created=1)
    old_key = device_key(cli.out)
    before = snapshot(cli.out)
    thing = f"demo-{serial}"
    rotate = ["rotate"] + cli.conn(template="RotationTemplate", claim=False) + [
        "--param", f"ThingName={thing}", "--out", cli.out, "--retry", "2,50,100", "--json"]
    p = cli.run(rotate, expect=0, what="rotate")
    obj = parse_json(p, "rotate")
    check(obj.get("status") == "rotated" and obj.get("command") == "rotate", f"{obj}")
    new_id = check_success_json(cli, obj, serial, status="rotated")
    check(new_id != old_id, "the same certificate")
    after = snapshot(cli.out)
    for name in before:
        check(after[name] != before[name], f"{name} did not change")
    status = {c["id"]: c["status"] for c in cli.emu.registry()["certificates"]}
    check(status.get(new_id) == "ACTIVE", f"the new certificate is {status.get(new_id)}")
    p = cli.run(rotate[:1] + ["--cert", "x"] + rotate[1:], expect=EX_USAGE, what="rotate --cert")
    check("not an option of rotate" in p.stderr, "rotate --cert: no message")
    check_no_secrets([old_key, device_key(cli.out)])
    print(f"ok: rotated {old_id[:12]}… -> {new_id[:12]}…")


def case_systemd(cli, serial, examples):
    """The example unit: systemd-analyze verify (with ExecStart pointing at the command under
    test), else its options read; then the example configuration file provisions, with the
    connection settings of this emulator given as overrides."""
    unit = os.path.join(examples, "systemd", "fleetprov-provision.service")
    text = open(unit).read()
    opts = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith("#"):
            k, _, v = line.partition("=")
            opts.setdefault(k.strip(), []).append(v.strip())
    exec_start = opts["ExecStart"][0].split()
    check(os.path.basename(exec_start[0]) == "fleetprov" and exec_start[1] == "provision",
          f"ExecStart={opts['ExecStart']}")
    check("--config" in exec_start, "ExecStart without --config")
    conf_path = exec_start[exec_start.index("--config") + 1]
    want = {"Type": "oneshot", "RemainAfterExit": "yes", "Restart": "on-failure",
            "After": "network-online.target", "Wants": "network-online.target",
            "StateDirectory": "fleetprov", "UMask": "0077", "NoNewPrivileges": "yes",
            "ProtectSystem": "strict", "ReadWritePaths": "/var/lib/fleetprov"}
    for k, v in want.items():
        check(any(v in x.split() for x in opts.get(k, [])), f"{k}={opts.get(k)}, expected {v}")
    conf = os.path.join(examples, "systemd", "provision.conf")
    out_line = [line for line in open(conf) if line.startswith("out =")]
    check(out_line, "provision.conf has no out line")
    out_dir = out_line[0].split("=", 1)[1].strip()
    check(opts.get("ConditionPathExists") == [f"!{out_dir}/device.json"],
          f"ConditionPathExists={opts.get('ConditionPathExists')}, expected !{out_dir}/device.json")
    check(conf_path == "/etc/fleetprov/provision.conf", f"--config {conf_path}")
    program = cli.cmd[-1]
    if shutil.which("systemd-analyze") and os.path.isabs(program) and len(cli.cmd) == 1:
        copy = os.path.join(cli.work, "fleetprov-provision.service")
        write(copy, text.replace(exec_start[0], program))
        p = subprocess.run(["systemd-analyze", "verify", "--man=no", copy],
                           capture_output=True, text=True, timeout=60)
        print(f"systemd-analyze verify: exit {p.returncode}\n{p.stdout}{p.stderr}")
        check(p.returncode == 0 and "fleetprov-provision.service" not in p.stderr,
              "systemd-analyze verify reported problems")
    else:
        print("systemd-analyze not used (not installed, or the command runs under a launcher)")

    overrides = cli.conn(serial=serial) + ["--out", cli.out, "--state-dir", cli.state]
    p = cli.run(["--config", conf] + overrides, expect=0, what="example configuration")
    obj = parse_json(p, "example configuration")  # json = yes in the example
    check_success_json(cli, obj, serial)
    p = cli.run(["--config", conf] + overrides, expect=0, what="example configuration, again")
    check(parse_json(p, "again").get("status") == "already_provisioned", "second start")
    check_no_secrets([device_key(cli.out)])
    print("ok: the example unit and configuration")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--emulator", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--case", required=True,
                    choices=["ok", "cbor", "config", "reject", "unreachable", "busy",
                             "interrupt", "sigterm", "rotate", "systemd"])
    ap.add_argument("--examples", default=os.path.join(os.path.dirname(
        os.path.abspath(__file__)), ".."), help="the examples directory (systemd/ in it)")
    ap.add_argument("--serial", default=None)
    ap.add_argument("--timeout", type=float, default=120.0, help="per run, seconds")
    ap.add_argument("command", nargs=argparse.REMAINDER)
    a = ap.parse_args()
    prepared = prepare(ap, a)
    if prepared is None:
        return 1
    cmd, serial = prepared
    emu = Emulator(os.path.abspath(a.emulator), os.path.join(a.work, "emulator"))
    started = time.monotonic()
    try:
        faults = {"interrupt": ["delay:600@register*1"], "sigterm": ["delay:600@register*1"],
                  "busy": ["delay:3000@register*1"]}
        extra = ["--control-port", "0"] if a.case == "reject" else []
        emu.start(extra + [x for rule in faults.get(a.case, []) for x in ("--fault", rule)])
        cli = Cli(cmd, emu, a.work, a.timeout)
        if a.case == "interrupt":
            case_interrupt(cli, serial, signal.SIGINT)
        elif a.case == "sigterm":
            case_interrupt(cli, serial, signal.SIGTERM)
        elif a.case == "systemd":
            case_systemd(cli, serial, os.path.abspath(a.examples))
        else:
            globals()[f"case_{a.case}"](cli, serial)
    except Failed as e:
        print(f"FAILED: {e}")
        return 1
    finally:
        emu.stop()
        print(f"({time.monotonic() - started:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
