#!/usr/bin/env python3
"""ctest driver for provision_pkcs11: keys in a PKCS#11 token (SoftHSM2), against the emulator.

    pkcs11_test.py --emulator PATH --work DIR --case CASE [--module LIBSOFTHSM2.so]
                   [--serial S] [--timeout SECS] -- [LAUNCHER...] provision_pkcs11

Each case makes its own SoftHSM2 configuration and token directory in WORK (SOFTHSM2_CONF),
initialises a token, imports the emulator's claim.key into it with softhsm2-util (label
"claim"), so that the program gets only the token and claim.pem, starts the emulator and runs
the program. The token's contents are read back with the program's own --show (object= lines:
class, label, CKA_ID and public attributes); certificates are checked with the openssl command.

CASE:
  json, cbor  provisioned (cbor: the claim certificate from the token, when pkcs11-tool can put
              it there): the certificate object is in the token with the device key's CKA_ID,
              its public key is the token's public key, the device key was generated in the
              token (CKA_ALWAYS_SENSITIVE, CKA_NEVER_EXTRACTABLE), the registry has the
              certificate ACTIVE and attached to the thing; one claim signature, two device
              signatures (CSR + the verification connection's handshake). A second run says
              already_provisioned=1 and changes nothing, in the token or the registry.
  resume      killed with SIGKILL at certificate_created (FLEETPROV_EXAMPLE_STOP_AT, as
              emu_test.py's crash case), run again with the same --state-dir: resumed=1, the
              same key pair, exactly one certificate created.
  rotate      provisioned, then --rotate demo-SERIAL: a new certificate for a new key, attached
              to the same thing; the token holds exactly one device key pair and certificate
              (labelled "device", none "device-next"); the certificate id changed.
  errors      a table of failures, each with its result= and error= text: a wrong PIN
              (CKR_PIN_INCORRECT, the PIN not printed), --break-signer fail and wrong
              (FLEETPROV_SIGNER), an Ed25519 claim certificate (FLEETPROV_INVALID_ARGUMENT
              naming Ed25519), an Ed25519 key behind a P-256 certificate, no such token, claim
              key or module, usage errors (exit 2); an RSA claim key (self-signed, unknown to
              the emulator) whose handshake signature (RSA-PSS, C_Sign) verifies, so the
              emulator's refusal (FLEETPROV_TLS) is what ends it. No certificate is created.

Every output is checked for the PIN and the claim key's secret; no file the runs leave (the
state directory's journal) holds a private key. Exits 77 (ctest: skipped) when SoftHSM2 is not
installed.
"""
import argparse
import base64
import glob
import hashlib
import os
import re
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from emu_test import (Emulator, Failed, check, check_registry, created_certificates,  # noqa: E402
                      fields, pem_der, prepare, run, stop_and_kill)

SKIP = 77
TOKEN = "fleetprov-test"
PIN = "user-pin-7305"  # distinctive, to look for in the outputs
SO_PIN = "so-pin-5678"
PIN_VAR = "FLEETPROV_TEST_PIN"
WRONG_PIN = "wrong-pin-4242"
# SubjectPublicKeyInfo of a P-256 key, up to the point: SEQUENCE { SEQUENCE { id-ecPublicKey,
# prime256v1 }, BIT STRING { 04 || X || Y } }.
P256_SPKI_PREFIX = bytes.fromhex("3059301306072a8648ce3d020106082a8648ce3d030107034200")
MODULES = ("/usr/lib/softhsm/libsofthsm2.so", "/usr/lib/*/softhsm/libsofthsm2.so",
           "/usr/lib64/pkcs11/libsofthsm2.so", "/usr/local/lib/softhsm/libsofthsm2.so")

# Every output of the program, checked for secrets at the end.
OUTPUTS = []


def find_module(given):
    if given:
        return given if os.path.exists(given) else None
    for pattern in MODULES:
        for path in sorted(glob.glob(pattern)):
            return path
    return None


def openssl(*args, stdin=None):
    check(shutil.which("openssl") is not None,
          "the openssl command is needed (Debian: apt-get install openssl)")
    p = subprocess.run(["openssl", *args], input=stdin, capture_output=True, timeout=60)
    check(p.returncode == 0, f"openssl {' '.join(args)}: {p.stderr.decode(errors='replace')}")
    return p.stdout


class Token:
    """A SoftHSM2 token of its own in WORK/softhsm (SOFTHSM2_CONF is set for this process and so
    for every program it starts)."""

    def __init__(self, work, module):
        self.module = module
        self.dir = os.path.join(work, "softhsm")
        os.makedirs(os.path.join(self.dir, "tokens"))
        conf = os.path.join(self.dir, "softhsm2.conf")
        with open(conf, "w") as f:
            f.write(f"directories.tokendir = {self.dir}/tokens\nobjectstore.backend = file\n"
                    "log.level = ERROR\nslots.removable = false\n")
        os.environ["SOFTHSM2_CONF"] = conf
        os.environ[PIN_VAR] = PIN
        self.util("--init-token", "--free", "--label", TOKEN, "--pin", PIN, "--so-pin", SO_PIN)

    def util(self, *args):
        p = subprocess.run(["softhsm2-util", *args], capture_output=True, text=True, timeout=60)
        check(p.returncode == 0, f"softhsm2-util {args[0]}: {p.stdout}{p.stderr}")

    def import_key(self, path, label, key_id):
        """A private key (PKCS#8 PEM) into the token: a private and a public key object."""
        self.util("--import", path, "--token", TOKEN, "--label", label, "--id", key_id,
                  "--pin", PIN)


class Pkcs11:
    def __init__(self, cmd, emu, work, serial, timeout_s, token):
        self.cmd, self.emu, self.work, self.timeout_s = cmd, emu, work, timeout_s
        self.token, self.serial = token, serial
        self.thing = f"demo-{serial}"
        self.state = os.path.join(work, "state")

    def token_args(self, pin=None):
        return ["--module", self.token.module, "--token", TOKEN] + (
            ["--pin", pin] if pin else ["--pin-env", PIN_VAR])

    def args(self, fmt="json", pin=None, state=True):
        """Provisioning through DemoTemplate; the claim certificate from the file, its key in the
        token."""
        return self.token_args(pin) + [
            "--endpoint", "localhost", "--port", str(self.emu.port), "--ca",
            self.emu.path("ca.pem"), "--cert", self.emu.path("claim.pem"), "--template",
            "DemoTemplate", "--param", f"SerialNumber={self.serial}", "--format", fmt] + (
            ["--state-dir", self.state] if state else [])

    def rotate_args(self):
        return self.token_args() + [
            "--endpoint", "localhost", "--port", str(self.emu.port), "--ca",
            self.emu.path("ca.pem"), "--rotate", self.thing, "--state-dir", self.state]

    def run(self, args, expect=None, what="run", env=None):
        p = run(self.cmd + args, self.timeout_s, env=env)
        OUTPUTS.append(p.stdout + p.stderr)
        if expect is not None:
            check(p.returncode == expect, f"{what}: exit code {p.returncode}, expected {expect}")
        return p

    def show(self):
        """The token's objects: one dict per object= line of --show."""
        p = self.run(["--show"] + self.token_args(), expect=0, what="--show")
        objects = []
        for line in p.stdout.splitlines():
            if line.startswith("object="):
                objects.append(dict(kv.split("=", 1) for kv in line.split(" ")))
        objects.sort(key=lambda o: (o["object"], o.get("label", ""), o["id"]))
        check(fields(p.stdout).get("objects") == str(len(objects)),
              f"--show: objects={fields(p.stdout).get('objects')}, {len(objects)} lines")
        return objects


def labelled(objects, label, cls=None):
    return [o for o in objects if o.get("label") == label and (cls is None or o["object"] == cls)]


def one(objects, label, cls):
    found = labelled(objects, label, cls)
    check(len(found) == 1, f"{len(found)} {cls} objects labelled {label!r}, expected 1: {found}")
    return found[0]


def ec_point(public_key):
    """The point of a public key object's CKA_EC_POINT (a DER OCTET STRING around it)."""
    raw = bytes.fromhex(public_key["ec_point"])
    check(raw[:2] == b"\x04\x41" and len(raw) == 67 and raw[2] == 4,
          f"CKA_EC_POINT {raw.hex()} is not an OCTET STRING around an uncompressed P-256 point")
    return raw[2:]


def check_device(objects, label="device"):
    """The token holds one device key pair labelled `label`, generated in the token (sensitive,
    never extractable), and its certificate: same CKA_ID, and the certificate's public key is
    the key pair's. Returns (certificate id, CKA_ID, point)."""
    private = one(objects, label, "private_key")
    public = one(objects, label, "public_key")
    cert = one(objects, label, "certificate")
    check(private["key_type"] == "CKK_EC" and public["key_type"] == "CKK_EC",
          f"device key types {private['key_type']}, {public['key_type']}")
    flags = {k: private.get(k) for k in ("sensitive", "extractable", "always_sensitive",
                                         "never_extractable")}
    check(flags == {"sensitive": "1", "extractable": "0", "always_sensitive": "1",
                    "never_extractable": "1"},
          f"the device private key's flags {flags}: not generated in the token, or extractable")
    check(private["id"] == public["id"] == cert["id"] and private["id"],
          f"CKA_ID: private {private['id']}, public {public['id']}, certificate {cert['id']}")
    der = bytes.fromhex(cert["der"])
    cert_id = hashlib.sha256(der).hexdigest()
    check(cert["certificate_id"] == cert_id, "--show's certificate_id is not SHA-256 of the DER")
    spki = openssl("x509", "-inform", "DER", "-noout", "-pubkey", stdin=der).decode()
    m = re.search(r"-----BEGIN PUBLIC KEY-----(.*?)-----END PUBLIC KEY-----", spki, re.S)
    check(m is not None, "openssl printed no public key")
    point = ec_point(public)
    check(base64.b64decode("".join(m.group(1).split())) == P256_SPKI_PREFIX + point,
          "the certificate's public key is not the token's device public key")
    return cert_id, private["id"], point


def check_success(p, thing, what="run"):
    f = fields(p.stdout)
    check(p.returncode == 0, f"{what}: exit code {p.returncode}, expected 0")
    check(f.get("already_provisioned") == "0", f"{what}: already_provisioned="
          f"{f.get('already_provisioned')}")
    check(f.get("thing_name") == thing, f"{what}: thing_name={f.get('thing_name')}")
    check(re.fullmatch(r"[0-9a-f]{64}", f.get("certificate_id", "")),
          f"{what}: certificate_id={f.get('certificate_id')}")
    return f


def check_again(t, cert_id, objects):
    """A second run on a provisioned token: already_provisioned=1, nothing created or changed."""
    created = len(created_certificates(t.emu.registry()))
    p = t.run(t.args(), expect=0, what="second run")
    f = fields(p.stdout)
    check(f.get("already_provisioned") == "1",
          f"second run: already_provisioned={f.get('already_provisioned')}")
    check(f.get("certificate_id") == cert_id,
          f"second run: certificate_id={f.get('certificate_id')}")
    check("step: connecting" not in p.stderr, "second run: it connected")
    check(len(created_certificates(t.emu.registry())) == created, "second run: a certificate "
                                                                 "was created")
    check(t.show() == objects, "second run: the token's objects changed")


def case_provision(t, fmt):
    # JSON with the PIN from the environment and claim.pem from a file; CBOR with --pin (never
    # printed either way) and, when pkcs11-tool (OpenSC) can put it there, the claim
    # certificate from the token.
    args = t.args(fmt, pin=PIN if fmt == "cbor" else None)
    if fmt == "cbor" and shutil.which("pkcs11-tool") is not None:
        der = os.path.join(t.work, "claim.der")
        with open(der, "wb") as f:
            f.write(pem_der(t.emu.path("claim.pem")))
        tool = subprocess.run(["pkcs11-tool", "--module", t.token.module, "--token-label", TOKEN,
                               "--login", "--pin", PIN, "--write-object", der, "--type", "cert",
                               "--label", "claim", "--id", "01"],
                              capture_output=True, text=True, timeout=60)
        check(tool.returncode == 0, f"pkcs11-tool --write-object: {tool.stdout}{tool.stderr}")
        i = args.index("--cert")
        del args[i:i + 2]
        print("the claim certificate is in the token (pkcs11-tool), no --cert")
    elif fmt == "cbor":
        print("pkcs11-tool (OpenSC) not installed: claim certificate from a file, not the token")
    p = t.run(args, what="provisioning")
    f = check_success(p, t.thing)
    check((f.get("signatures_claim"), f.get("signatures_device")) == ("1", "2"),
          f"signatures_claim={f.get('signatures_claim')} signatures_device="
          f"{f.get('signatures_device')}, expected 1 (claim TLS) and 2 (CSR, verification TLS)")
    check(f.get("resumed") == "0", f"resumed={f.get('resumed')}")
    objects = t.show()
    cert_id, _, _ = check_device(objects)
    check(cert_id == f["certificate_id"], f"the token's certificate is {cert_id}, the program "
                                          f"printed {f['certificate_id']}")
    one(objects, "claim", "private_key")  # still there, untouched
    check(len(objects) == 5 + len(labelled(objects, "claim", "certificate")),
          f"objects besides the claim key and the device's: {objects}")
    check_registry(t.emu, t.serial, cert_id, max_created=1, exact_created=1)
    check(not os.path.exists(os.path.join(t.state, "journal.json")), "journal.json left behind")
    check_again(t, cert_id, objects)
    print(f"ok ({fmt}): certificate {cert_id[:12]}… in the token next to its key, ACTIVE; "
          "a second run did nothing")


def case_resume(t):
    args = t.args()
    stop_and_kill(t.cmd + args, "certificate_created", t.work, 1, t.timeout_s)
    journal = os.path.join(t.state, "journal.json")
    check(os.path.exists(journal), "killed at certificate_created: no journal.json")
    objects = t.show()
    private = one(objects, "device", "private_key")
    check(not labelled(objects, "device", "certificate"), "killed: a certificate in the token")
    env = dict(os.environ)
    env.pop("FLEETPROV_EXAMPLE_STOP_AT", None)
    p = t.run(args, what="rerun", env=env)
    f = check_success(p, t.thing, "rerun")
    check(f.get("resumed") == "1", f"rerun: resumed={f.get('resumed')}, expected 1")
    check("device key found in the token" in p.stderr, "rerun: the device key was not reused")
    objects = t.show()
    cert_id, key_id, _ = check_device(objects)
    check(key_id == private["id"], "rerun: another device key")
    check(cert_id == f["certificate_id"], f"rerun: certificate_id={f['certificate_id']}")
    check_registry(t.emu, t.serial, cert_id, max_created=1, exact_created=1)
    check(not os.path.exists(journal), "journal.json left after success")
    print(f"ok: killed at certificate_created, then resumed; one certificate {cert_id[:12]}… "
          f"(device signatures on the rerun: {f.get('signatures_device')})")


def case_rotate(t):
    p = t.run(t.args(), what="provisioning")
    old_id = check_success(p, t.thing, "provisioning")["certificate_id"]
    _, old_key, old_point = check_device(t.show())
    p = t.run(t.rotate_args(), what="rotation")
    f = check_success(p, t.thing, "rotation")
    check(f.get("rotated") == "1", f"rotation: rotated={f.get('rotated')}")
    # The old key signs each connection attempt's handshake (the emulator, as AWS, refuses a
    # second CONNECT with a client id within a second: the provisioning's verification
    # connection used the thing name just before, so attempt 1 may get CONNACK 0x97).
    check((f.get("signatures_claim"), f.get("signatures_device")) == (f.get("attempts"), "2"),
          f"rotation: signatures_claim={f.get('signatures_claim')} signatures_device="
          f"{f.get('signatures_device')}, expected attempts={f.get('attempts')} (old key, TLS) "
          "and 2 (new key: CSR, TLS)")
    new_id = f["certificate_id"]
    check(new_id != old_id, "rotation: the same certificate")
    objects = t.show()
    cert_id, new_key, new_point = check_device(objects)
    check(cert_id == new_id, f"the token's certificate is {cert_id}, the program printed {new_id}")
    check(new_key != old_key and new_point != old_point, "rotation: the same device key")
    check(not labelled(objects, "device-next"), "objects labelled device-next left")
    check(len([o for o in objects if o["object"] == "private_key"]) == 2,
          "private keys besides the claim key and the device key")
    reg = t.emu.registry()
    status = {c["id"]: c["status"] for c in reg["certificates"]}
    check(status.get(new_id) == "ACTIVE", f"the new certificate is {status.get(new_id)}")
    attached = {x["name"]: x for x in reg["things"]}[t.thing]["certificates"]
    check(sorted(attached) == sorted([old_id, new_id]),
          f"the thing has certificates {attached}, expected the old and the new one")
    check(len(created_certificates(reg)) == 2, f"{len(created_certificates(reg))} certificates "
                                               "created, expected 2")
    check_again(t, new_id, objects)
    print(f"ok: rotated {old_id[:12]}… -> {new_id[:12]}…, one device key pair in the token")


def case_errors(t):
    work = t.work
    # An Ed25519 claim key with a self-signed certificate; an RSA-2048 one likewise.
    ed_key, ed_cert = os.path.join(work, "ed25519.key"), os.path.join(work, "ed25519.pem")
    openssl("genpkey", "-algorithm", "ed25519", "-out", ed_key)
    openssl("req", "-x509", "-new", "-key", ed_key, "-subj", "/CN=ed25519 claim", "-days", "2",
            "-out", ed_cert)
    t.token.import_key(ed_key, "claim-ed25519", "02")
    rsa_key, rsa_cert = os.path.join(work, "rsa.key"), os.path.join(work, "rsa.pem")
    openssl("genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", rsa_key)
    openssl("req", "-x509", "-new", "-key", rsa_key, "-subj", "/CN=rsa claim", "-days", "2",
            "-out", rsa_cert)
    t.token.import_key(rsa_key, "claim-rsa", "03")
    good = t.args(state=False)

    def replace(args, flag, value):
        args = list(args)
        args[args.index(flag) + 1] = value
        return args

    def drop(args, flag):
        args = list(args)
        i = args.index(flag)
        del args[i:i + 2]
        return args

    # (what, arguments, exit code, result, texts error= must hold, more fields expected)
    table = [
        ("wrong PIN", drop(good, "--pin-env") + ["--pin", WRONG_PIN], 1, "pkcs11",
         ["C_Login: CKR_PIN_INCORRECT"], {}),
        ("claim signer fails", good + ["--break-signer", "fail"], 1, "FLEETPROV_SIGNER",
         ["claim key's signer failed"], {"signatures_claim": "1"}),
        ("claim signer signs wrong", good + ["--break-signer", "wrong"], 1, "FLEETPROV_SIGNER",
         ["does not verify"], {"signatures_claim": "1"}),
        ("Ed25519 claim certificate", replace(good, "--cert", ed_cert)
         + ["--claim-label", "claim-ed25519"], 1, "FLEETPROV_INVALID_ARGUMENT", ["Ed25519"], {}),
        ("Ed25519 key behind a P-256 certificate", good + ["--claim-label", "claim-ed25519"],
         1, "pkcs11", ["CKK_EC_EDWARDS", "not supported"], {}),
        ("no such claim key", good + ["--claim-label", "no-such-key"], 1, "pkcs11",
         ["C_FindObjects", "no-such-key"], {}),
        ("no such token", replace(good, "--token", "no-such-token"), 1, "pkcs11",
         ["C_GetTokenInfo", "no-such-token"], {}),
        ("no such module", replace(good, "--module", os.path.join(work, "no-such-module.so")),
         1, "pkcs11", ["dlopen"], {}),
        ("a library that is no PKCS#11 module",
         replace(good, "--module", glob.glob("/lib*/*/libm.so.6")[0]
                 if glob.glob("/lib*/*/libm.so.6") else "libm.so.6"),
         1, "pkcs11", ["dlsym", "C_GetFunctionList"], {}),
        # The RSA key signs the TLS 1.3 handshake (RSA-PSS through C_Sign); the library checks
        # that signature before sending it: a wrong one would be FLEETPROV_SIGNER. The emulator
        # then refuses the unknown certificate.
        ("RSA claim key, certificate unknown to the service", replace(good, "--cert", rsa_cert)
         + ["--claim-label", "claim-rsa"], 1, "FLEETPROV_TLS", ["refused the claim certificate"],
         {"signatures_claim": "1"}),
        ("no PIN", drop(good, "--pin-env"), 2, None, ["--pin"], {}),
        ("--key given", good + ["--key", t.emu.path("claim.key")], 2, None, ["--key"], {}),
        ("no --token", drop(good, "--token"), 2, None, ["--token is required"], {}),
        ("bad --break-signer", good + ["--break-signer", "sometimes"], 2, None,
         ["--break-signer wants fail or wrong"], {}),
    ]
    failures, seen = [], []
    for what, args, code, result, texts, more in table:
        print(f"\n# {what}")
        p = t.run(args, what=what)
        f = fields(p.stdout)
        seen.append(f"{what}: exit {p.returncode}: {f.get('result')}: {f.get('error')}")
        if p.returncode != code:
            failures.append(f"{what}: exit code {p.returncode}, expected {code}")
        elif result is None:
            failures += [f"{what}: {x!r} not on stderr" for x in texts if x not in p.stderr]
        elif f.get("result") != result:
            failures.append(f"{what}: result={f.get('result')}, expected {result}")
        else:
            failures += [f"{what}: the error lacks {x!r}: {f.get('error')}"
                         for x in texts if x not in (f.get("error") or "")]
            failures += [f"{what}: {k}={f.get(k)}, expected {v}" for k, v in more.items()
                         if f.get(k) != v]
        if WRONG_PIN in p.stdout + p.stderr:
            failures.append(f"{what}: the PIN given is printed")
    print("\n".join(["", "failures and what the user sees:"] + seen))
    check(not failures, "\n".join(failures))
    created = created_certificates(t.emu.registry())
    check(created == [], f"certificates were created: {created}")
    check(not labelled(t.show(), "device", "certificate"), "a device certificate was stored")
    print(f"ok: {len(table)} failures, each with its result and cause; no certificate created")


def check_no_secrets(work, emu):
    """No output holds the PIN or a line of the claim key; no file the runs left (outside the
    emulator's and SoftHSM's directories) holds a private key."""
    claim = open(emu.path("claim.key")).read()
    secrets = [line for line in claim.splitlines() if line and "-----" not in line]
    secrets += [PIN, SO_PIN]
    for out in OUTPUTS:
        check("PRIVATE KEY" not in out, "a private key in an output")
        for s in secrets:
            check(s not in out, f"a secret in an output: {s[:6]}…")
    skip = {os.path.realpath(emu.data_dir), os.path.realpath(os.path.join(work, "softhsm"))}
    for root, dirs, files in os.walk(work):
        dirs[:] = [d for d in dirs if os.path.realpath(os.path.join(root, d)) not in skip]
        for name in files:
            path = os.path.join(root, name)
            if name.endswith(".key"):
                continue  # the test's own keys (errors case)
            with open(path, "rb") as f:
                check(b"PRIVATE KEY" not in f.read(), f"{path} holds a private key")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--emulator", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--case", required=True,
                    choices=["json", "cbor", "resume", "rotate", "errors"])
    ap.add_argument("--module", default="",
                    help="SoftHSM2's PKCS#11 module (default: where Debian puts it)")
    ap.add_argument("--serial", default=None)
    ap.add_argument("--timeout", type=float, default=120.0, help="per program run, seconds")
    ap.add_argument("command", nargs=argparse.REMAINDER)
    a = ap.parse_args()
    module = find_module(a.module)
    if shutil.which("softhsm2-util") is None or module is None:
        print("SKIP: SoftHSM2 is not installed (Debian: apt-get install softhsm2)")
        return SKIP
    prepared = prepare(ap, a)
    if prepared is None:
        return 1
    cmd, serial = prepared
    # The outcome cases against the emulator's default RSA-2048 CA, as AWS's; the rest with a
    # quick EC CA.
    emu = Emulator(os.path.abspath(a.emulator), os.path.join(a.work, "emulator"),
                   ca_key_type=None if a.case in ("json", "rotate") else "ec")
    started = time.monotonic()
    try:
        token = Token(a.work, module)
        emu.start()
        token.import_key(emu.path("claim.key"), "claim", "01")
        t = Pkcs11(cmd, emu, a.work, serial, a.timeout, token)
        if a.case in ("json", "cbor"):
            case_provision(t, a.case)
        elif a.case == "resume":
            case_resume(t)
        elif a.case == "rotate":
            case_rotate(t)
        else:
            case_errors(t)
        check_no_secrets(a.work, emu)
    except Failed as e:
        print(f"FAILED: {e}")
        return 1
    finally:
        emu.stop()
        print(f"({time.monotonic() - started:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
