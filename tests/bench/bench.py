"""The benchmark driver (tests/bench/run.sh builds everything, then runs this).

Against one fleetprov-emulator, in one run, it measures this repository's library next to the
official AWS IoT Device SDK for Python v2, prints every figure as ours / theirs with the ratio,
checks the targets of issue 7 (printing by how much a missed one is missed) and writes the
results as JSON and as a Markdown table.

Every client runs in a fresh process (tests/bench/client.py), so the two never share memory;
every wait is bounded; the only addresses used are on loopback.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
from proxy import DelayProxy  # noqa: E402

START_TIMEOUT_S = 60.0
CLIENT_TIMEOUT_S = 300.0
STORM_TIMEOUT_S = 300.0
TEMPLATE = "DemoTemplate"

# Targets of issue 7, item 3.
TARGET_SPEEDUP = 10.0
TARGET_TURNS = 5
TARGET_SIZE_FRACTION = 1 / 5
TARGET_STORM_KB = 64.0


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --- the emulator ------------------------------------------------------------------------------


class Emulator:
    def __init__(self, binary: Path, data_dir: Path):
        self.data_dir = data_dir
        self.proc = subprocess.Popen(
            [str(binary), "--data-dir", str(data_dir), "--port", "0", "--bind", "127.0.0.1",
             "--key-type", "ec"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        lines: queue.Queue[str | None] = queue.Queue()
        self.output: list[str] = []

        def drain() -> None:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                self.output.append(line.rstrip("\n"))
                lines.put(line.rstrip("\n"))
            lines.put(None)

        threading.Thread(target=drain, name="emulator-output", daemon=True).start()
        deadline = time.monotonic() + START_TIMEOUT_S
        self.port = 0
        while not self.port:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.stop()
                raise RuntimeError(f"the emulator did not start: {self.output[-20:]}")
            try:
                line = lines.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                self.stop()
                raise RuntimeError(f"the emulator exited: {self.output[-20:]}")
            if line.startswith("listening on "):
                self.port = int(line.rsplit(":", 1)[1])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


# --- processes -------------------------------------------------------------------------------


MEASURE: Path | None = None  # tests/bench/c/measure.c, built by run.sh


def run_measured(argv: list[str], env: dict, timeout: float) -> dict:
    """Runs a command to its end through `measure` (wall time from fork to exit, the program's
    own CPU time and peak RSS; see measure.c for why not wait4 from here)."""
    assert MEASURE is not None
    with tempfile.TemporaryDirectory() as tmp:
        figures = Path(tmp) / "measure.json"
        full = [str(MEASURE), "--timeout", str(int(timeout)), "--out", str(figures), "--", *argv]
        try:
            done = subprocess.run(full, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                                  text=True, timeout=timeout + 30)
        except subprocess.TimeoutExpired as e:
            raise RuntimeError(f"{argv[0]} did not finish in {timeout} s") from e
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} exited {done.returncode}:\n{done.stderr[-3000:]}")
        m = json.loads(figures.read_text())
    m["stdout"], m["stderr"] = done.stdout, done.stderr
    return m


def client(args, env, impl: str, flow: str, port: int, runs: int, extra: list[str] = ()) -> dict:
    argv = [sys.executable, str(HERE / "client.py"), "--impl", impl, "--flow", flow,
            "--port", str(port), "--data-dir", str(args.emu_dir), "--runs", str(runs), *extra]
    r = run_measured(argv, env, CLIENT_TIMEOUT_S)
    d = json.loads(r["stdout"].strip().splitlines()[-1])
    d["process"] = {k: r[k] for k in ("wall_ms", "cpu_ms", "maxrss_kb")}
    if d["times_ms"]:
        d["median_ms"] = statistics.median(d["times_ms"])
    return d


# --- formatting ------------------------------------------------------------------------------


class Table:
    def __init__(self):
        self.rows: list[dict] = []
        self.sections: list[tuple[str, int]] = []

    def section(self, title: str) -> None:
        self.sections.append((title, len(self.rows)))

    def add(self, figure: str, ours: str, theirs: str, ratio: str, target: str = "") -> None:
        self.rows.append(dict(figure=figure, ours=ours, theirs=theirs, ratio=ratio, target=target))
        print(f"  {figure:<58} {ours:>14} {theirs:>14} {ratio:>9}  {target}", flush=True)

    def markdown(self) -> str:
        out = []
        starts = dict((i, t) for t, i in self.sections)
        for i, r in enumerate(self.rows):
            if i in starts:
                if out:
                    out.append("")
                out.append(f"**{starts[i]}**")
                out.append("")
                out.append("| figure | ours | theirs | theirs / ours | target |")
                out.append("|---|---:|---:|---:|---|")
            out.append(f"| {r['figure']} | {r['ours']} | {r['theirs']} | {r['ratio']} | {r['target']} |")
        return "\n".join(out) + "\n"


def ms(v: float) -> str:
    return f"{v:.1f} ms" if v < 100 else f"{v:.0f} ms"


def mb(kb: float) -> str:
    return f"{kb / 1024:.1f} MiB"


def size(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def ratio(theirs: float, ours: float) -> str:
    if not ours:
        return "-"
    return f"{theirs / ours:.1f}x"


# --- phases ----------------------------------------------------------------------------------


def phase_python(args, env, table: Table, results: dict, port: int, label: str, key: str,
                 proxy: DelayProxy | None) -> None:
    """Ours vs the SDK, CSR and keys, N runs each, in fresh processes."""
    runs = args.runs if proxy is None else args.rtt_runs
    results[key] = {}
    for flow in ("csr", "keys"):
        pair = {}
        for impl in ("ours", "sdk"):
            log(f"  {label}: {impl} {flow} x{runs} ...")
            d = client(args, env, impl, flow, port, runs)
            if proxy is not None:
                conns = proxy.take()
                d["connections"] = len(conns)
                d["turns"] = [c.turns for c in conns]
                d["turns_per_connection"] = statistics.median(d["turns"]) if conns else 0
                d["turns_per_run"] = sum(d["turns"]) / (runs + 1)  # + the warm-up run
                d["bytes_per_run"] = sum(c.bytes_up + c.bytes_down for c in conns) / (runs + 1)
            pair[impl] = d
        results[key][flow] = pair
        o, t = pair["ours"], pair["sdk"]
        api = "CreateCertificateFromCsr" if flow == "csr" else "CreateKeysAndCertificate"
        speedup = t["median_ms"] / o["median_ms"]
        if proxy is None:
            if speedup >= TARGET_SPEEDUP:
                verdict = f">= {TARGET_SPEEDUP:.0f}x: met"
            else:
                need = t["median_ms"] / TARGET_SPEEDUP
                verdict = (f">= {TARGET_SPEEDUP:.0f}x: MISSED by {TARGET_SPEEDUP / speedup:.1f}x "
                           f"(ours {o['median_ms'] - need:.1f} ms over {need:.1f} ms)")
        else:
            verdict = ""
        table.add(f"{api}: median provisioning time", ms(o["median_ms"]), ms(t["median_ms"]),
                  ratio(t["median_ms"], o["median_ms"]), verdict)
        table.add(f"{api}: CPU per provisioning", ms(o["cpu_ms_per_run"]), ms(t["cpu_ms_per_run"]),
                  ratio(t["cpu_ms_per_run"], o["cpu_ms_per_run"]))
        table.add(f"{api}: peak RSS of the process", mb(o["peak_rss_kb"]), mb(t["peak_rss_kb"]),
                  ratio(t["peak_rss_kb"], o["peak_rss_kb"]))
        table.add(f"{api}: peak RSS - RSS after imports", mb(o["peak_rss_kb"] - o["rss_before_kb"]),
                  mb(t["peak_rss_kb"] - t["rss_before_kb"]),
                  ratio(t["peak_rss_kb"] - t["rss_before_kb"], o["peak_rss_kb"] - o["rss_before_kb"]))
        if proxy is not None:
            turns_o, turns_t = o["turns_per_connection"], t["turns_per_connection"]
            if turns_o <= TARGET_TURNS:
                verdict = f"<= {TARGET_TURNS}: met"
            else:
                verdict = f"<= {TARGET_TURNS}: MISSED by {turns_o - TARGET_TURNS:g}"
            table.add(f"{api}: round trips after TCP connect", f"{turns_o:g}", f"{turns_t:g}",
                      ratio(turns_t, turns_o), verdict)
            table.add(f"{api}: connections per provisioning",
                      f"{o['connections'] / (runs + 1):g}", f"{t['connections'] / (runs + 1):g}", "")
            table.add(f"{api}: bytes on the wire per provisioning", f"{o['bytes_per_run']:.0f}",
                      f"{t['bytes_per_run']:.0f}", ratio(t["bytes_per_run"], o["bytes_per_run"]))


def phase_verify_rtt(args, env, table: Table, results: dict, port: int, proxy: DelayProxy) -> None:
    """Ours with the library's default verification connection, for its cost at 50 ms RTT."""
    log(f"  rtt: ours csr --verify x{args.rtt_runs} ...")
    d = client(args, env, "ours", "csr", port, args.rtt_runs, ["--verify"])
    conns = proxy.take()
    d["connections"] = len(conns)
    d["turns"] = [c.turns for c in conns]
    results["rtt_verify"] = d
    sdk = results["rtt"]["csr"]["sdk"]
    table.add("CreateCertificateFromCsr, ours with its verification connection",
              ms(d["median_ms"]), ms(sdk["median_ms"]), ratio(sdk["median_ms"], d["median_ms"]),
              f"turns per connection: {sorted(set(d['turns']))}")


def phase_c(args, env, table: Table, results: dict, port: int) -> None:
    """One provisioning per process: the C example (shared and static) vs python + SDK."""
    common = ["--endpoint", "localhost", "--port", str(port), "--ca", str(args.emu_dir / "ca.pem"),
              "--cert", str(args.emu_dir / "claim.pem"), "--key", str(args.emu_dir / "claim.key"),
              "--template", TEMPLATE, "--no-verify", "--timeout", "30000"]
    tag = os.getpid()
    kinds = {
        "c_shared": lambda i: [str(args.c_shared), *common, "--param", f"SerialNumber=cs-{tag}-{i}"],
        "c_static": lambda i: [str(args.c_static), *common, "--param", f"SerialNumber=ct-{tag}-{i}"],
        "python_ours": lambda i: [sys.executable, str(HERE / "client.py"), "--impl", "ours",
                                  "--flow", "csr", "--port", str(port), "--data-dir",
                                  str(args.emu_dir), "--runs", "0"],
        "python_sdk": lambda i: [sys.executable, str(HERE / "client.py"), "--impl", "sdk",
                                 "--flow", "csr", "--port", str(port), "--data-dir",
                                 str(args.emu_dir), "--runs", "0"],
    }
    res = {}
    for kind, argv in kinds.items():
        log(f"  process: {kind} x{args.runs} ...")
        samples = [run_measured(argv(i), env, CLIENT_TIMEOUT_S) for i in range(args.runs)]
        res[kind] = {
            "wall_ms": statistics.median(s["wall_ms"] for s in samples),
            "cpu_ms": statistics.median(s["cpu_ms"] for s in samples),
            "maxrss_kb": statistics.median(s["maxrss_kb"] for s in samples),
        }
    results["process"] = res
    t = res["python_sdk"]
    for kind, name in (("c_shared", "C example (shared lib)"), ("c_static", "C example (static)"),
                       ("python_ours", "Python + our binding")):
        o = res[kind]
        table.add(f"{name}: wall time, process start to exit", ms(o["wall_ms"]), ms(t["wall_ms"]),
                  ratio(t["wall_ms"], o["wall_ms"]))
        table.add(f"{name}: CPU time of the process", ms(o["cpu_ms"]), ms(t["cpu_ms"]),
                  ratio(t["cpu_ms"], o["cpu_ms"]))
        table.add(f"{name}: peak RSS of the process", mb(o["maxrss_kb"]), mb(t["maxrss_kb"]),
                  ratio(t["maxrss_kb"], o["maxrss_kb"]))


API = {"csr": "CreateCertificateFromCsr", "keys": "CreateKeysAndCertificate"}


def proxied(args, env, proxy: DelayProxy, impl: str, flow: str, fmt: str, port: int, runs: int,
            direct_port: int) -> dict:
    """`runs` provisionings through the proxy in one fresh process, the warm-up one straight to
    the emulator; what the proxy saw, per provisioning (one connection each: no verification)."""
    d = client(args, env, impl, flow, port, runs, ["--format", fmt, "--warmup-port", str(direct_port)])
    conns = proxy.take()
    if len(conns) != runs:
        raise RuntimeError(f"{impl} {flow} {fmt}: {len(conns)} connections through the proxy for {runs} "
                           "provisionings")
    d["connections"] = len(conns)
    d["turns"] = [c.turns for c in conns]
    d["turns_per_run"] = statistics.median(d["turns"])
    d["bytes_up"] = [c.bytes_up for c in conns]
    d["bytes_down"] = [c.bytes_down for c in conns]
    d["bytes_up_per_run"] = statistics.median(d["bytes_up"])
    d["bytes_down_per_run"] = statistics.median(d["bytes_down"])
    d["flights"] = conns[0].flights  # [direction, bytes, [[TLS content type, record size], ...]]
    return d


def tls_split(flights: list) -> dict:
    """The TLS 1.3 handshake's share of one connection's bytes, from its flights (see proxy.py):
    the client's first flight (ClientHello), the server's first flight (ServerHello, then
    encrypted: EncryptedExtensions, CertificateRequest, its certificate chain,
    CertificateVerify, Finished), and the start of the client's second flight: a
    ChangeCipherSpec if sent, then Certificate, CertificateVerify and Finished, in one record
    (rustls) or in three (s2n: a Finished record is 58 B with SHA-256, 74 B with SHA-384).
    The client's certificate record is that flight's largest; what follows the handshake in
    the flight (CONNECT, and whatever the client sends with it) and what the server sends
    after its first flight (a session ticket, if any) count as the rest."""
    up0, down0, up1 = flights[0], flights[1], flights[2]
    assert up0[0] == "up" and down0[0] == "down" and up1[0] == "up", flights[:3]
    records = up1[2]
    cert = max(range(len(records)), key=lambda i: records[i][1])
    end = cert + 2 if cert + 2 < len(records) and records[cert + 2][1] in (58, 74) else cert
    client_auth = sum(n for _, n in records[:end + 1])
    return {
        "client_hello": up0[1],
        "server_flight": down0[1],
        "client_auth_flight": client_auth,
        "after_auth_in_flight": up1[1] - client_auth,  # CONNECT and what goes with it
        "handshake_up": up0[1] + client_auth,
        "handshake_down": down0[1],
    }


def der_size(pem: Path) -> int:
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    return len(x509.load_pem_x509_certificate(pem.read_bytes()).public_bytes(Encoding.DER))


def phase_slowlink(args, env, table: Table, results: dict, direct_port: int) -> None:
    """A slow link (LTE-M-like: --slow-rtt-ms with --slow-rate bytes/s each way) for every
    client/API/format, then the RTT sweep (no rate limit) and its plot."""
    res: dict = {"profile": {"rtt_ms": args.slow_rtt_ms, "rate_bytes_per_s": args.slow_rate,
                             "tcp_handshake": True, "runs": args.slow_runs}}
    proxy = DelayProxy("127.0.0.1", direct_port, delay=args.slow_rtt_ms / 2000, rate=args.slow_rate,
                       tcp_handshake=True)
    port = proxy.start()
    try:
        slow: dict = {}
        for flow in ("csr", "keys"):
            for impl, fmt in (("ours", "json"), ("ours", "cbor"), ("sdk", "json")):
                log(f"  slowlink: {impl} {flow} {fmt} x{args.slow_runs} ...")
                d = proxied(args, env, proxy, impl, flow, fmt, port, args.slow_runs, direct_port)
                d["tls"] = tls_split(d["flights"])
                slow[f"{impl}_{flow}_{fmt}"] = d
    finally:
        proxy.stop()
    res["slow"] = slow
    for flow in ("csr", "keys"):
        api = API[flow]
        for fmt in ("json", "cbor"):
            o = slow[f"ours_{flow}_{fmt}"]
            t = slow.get(f"sdk_{flow}_{fmt}")
            name = f"{api}, {fmt.upper()}"
            no = "(no CBOR)"
            table.add(f"{name}: time to provisioned", ms(o["median_ms"]),
                      ms(t["median_ms"]) if t else no, ratio(t["median_ms"], o["median_ms"]) if t else "")
            table.add(f"{name}: round trips after TCP", f"{o['turns_per_run']:g}",
                      f"{t['turns_per_run']:g}" if t else no,
                      ratio(t["turns_per_run"], o["turns_per_run"]) if t else "")
            for k, label in (("bytes_up_per_run", "bytes up (client -> server)"),
                             ("bytes_down_per_run", "bytes down (server -> client)")):
                table.add(f"{name}: {label}", f"{o[k]:.0f}", f"{t[k]:.0f}" if t else no,
                          ratio(t[k], o[k]) if t else "")
    # Where the bytes go: the TLS handshake against the rest (MQTT in TLS records), CSR, JSON.
    for flow in ("csr", "keys"):
        o, t = slow[f"ours_{flow}_json"], slow[f"sdk_{flow}_json"]
        for side in ("up", "down"):
            ho, ht = o["tls"][f"handshake_{side}"], t["tls"][f"handshake_{side}"]
            ro, rt = o[f"bytes_{side}_per_run"] - ho, t[f"bytes_{side}_per_run"] - ht
            table.add(f"{API[flow]}, JSON: TLS handshake bytes {side}", f"{ho}", f"{ht}", ratio(ht, ho))
            table.add(f"{API[flow]}, JSON: after the handshake (MQTT in TLS records) {side}",
                      f"{ro:.0f}", f"{rt:.0f}", ratio(rt, ro))
    fmt_tls = "{client_hello} / {server_flight} / {client_auth_flight} / {after_auth_in_flight}".format
    table.add("TLS bytes: ClientHello / server's flight / client's Certificate..Finished / CONNECT+",
              fmt_tls(**slow["ours_csr_json"]["tls"]), fmt_tls(**slow["sdk_csr_json"]["tls"]), "")
    certs = {name: der_size(args.emu_dir / f"{name}.pem") for name in ("claim", "server", "ca")}
    res["certificates_der"] = certs
    table.add("in those: the claim certificate (sent up) / the server's (down), DER",
              f"{certs['claim']} / {certs['server']}", "(the same)", "",
              f"the CA ({certs['ca']} B) is " + (
                  "sent too" if slow["ours_csr_json"]["tls"]["server_flight"] > certs["server"] + certs["ca"]
                  else "not sent"))

    # The sweep: the same profile's TCP handshake, no rate limit.
    rtts = [float(x) for x in args.sweep_rtts.split(",")]
    flows = args.sweep_flows.split(",")
    sweep: dict = {}
    for rtt in rtts:
        proxy = DelayProxy("127.0.0.1", direct_port, delay=rtt / 2000, tcp_handshake=True)
        port = proxy.start()
        try:
            for flow in flows:
                for impl in ("ours", "sdk"):
                    log(f"  sweep: RTT {rtt:g} ms, {impl} {flow} x{args.sweep_runs} ...")
                    d = proxied(args, env, proxy, impl, flow, "json", port, args.sweep_runs, direct_port)
                    d.pop("flights")
                    sweep.setdefault(f"{impl}_{flow}", []).append(dict(rtt_ms=rtt, **d))
        finally:
            proxy.stop()
    fits = {}
    for key, points in sweep.items():
        xs = [p_["rtt_ms"] for p_ in points]
        ys = [p_["median_ms"] for p_ in points]
        slope, intercept = linear_fit(xs, ys)
        # The turns at the largest RTT: on loopback the flights may split differently.
        fits[key] = {"slope_ms_per_ms": slope, "intercept_ms": intercept,
                     "turns": max(points, key=lambda p_: p_["rtt_ms"])["turns_per_run"]}
    res["sweep"] = sweep
    res["fits"] = fits
    res["sweep_rtts_ms"] = rtts
    results["slowlink"] = res
    table.section(f"Provisioning time against round-trip time, no rate limit, TCP handshake included "
                  f"(JSON, median of {args.sweep_runs} runs)")
    for flow in flows:
        o_pts, t_pts = sweep[f"ours_{flow}"], sweep[f"sdk_{flow}"]
        for po, pt in zip(o_pts, t_pts):
            table.add(f"{API[flow]} at {po['rtt_ms']:g} ms RTT: provisioning time", ms(po["median_ms"]),
                      ms(pt["median_ms"]), ratio(pt["median_ms"], po["median_ms"]))
        fo, ft = fits[f"ours_{flow}"], fits[f"sdk_{flow}"]
        if len(rtts) < 2:
            continue
        table.add(f"{API[flow]}: slope, ms per ms of RTT (least squares)", f"{fo['slope_ms_per_ms']:.2f}",
                  f"{ft['slope_ms_per_ms']:.2f}", ratio(ft["slope_ms_per_ms"], fo["slope_ms_per_ms"]),
                  f"round trips after TCP: {fo['turns']:g} / {ft['turns']:g}, + 1 for TCP's")
        table.add(f"{API[flow]}: intercept (time at 0 ms RTT, fitted)", ms(fo["intercept_ms"]),
                  ms(ft["intercept_ms"]), "")
    if args.plot and len(rtts) >= 2:
        plot_sweep(args, res)


def linear_fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
    return slope, my - slope * mx


def plot_sweep(args, res: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.2), dpi=110)
    colors = {"ours": "tab:blue", "sdk": "tab:orange"}
    names = {"ours": "fleetprov (Python binding)", "sdk": "AWS IoT Device SDK v2 (IotIdentityClientV2)"}
    styles = {"csr": ("-", "o"), "keys": ("--", "s")}
    xmax = max(res["sweep_rtts_ms"])
    for key, points in res["sweep"].items():
        impl, flow = key.split("_")
        line, marker = styles[flow]
        fit = res["fits"][key]
        xs = [p_["rtt_ms"] for p_ in points]
        ax.plot(xs, [p_["median_ms"] / 1000 for p_ in points], linestyle=line, marker=marker,
                color=colors[impl], label=f"{names[impl]}, {API[flow]}: "
                f"{fit['slope_ms_per_ms']:.2f} ms per ms RTT")
        for p_ in points:  # every run, small
            ax.scatter([p_["rtt_ms"]] * len(p_["times_ms"]), [t / 1000 for t in p_["times_ms"]],
                       s=8, color=colors[impl], alpha=0.4, zorder=3)
    for impl in ("ours", "sdk"):  # one slope label per client, at the end of its lines
        keys = [k for k in res["sweep"] if k.startswith(impl + "_")]
        fit = res["fits"][keys[0]]
        slopes = ", ".join(f"{res['fits'][k]['slope_ms_per_ms']:.2f} ({k.split('_')[1]})" for k in keys)
        xa = xmax * 0.55
        ax.annotate(f"slope {slopes} ms per ms", (xa, (fit["intercept_ms"] + fit["slope_ms_per_ms"] * xa) / 1000),
                    textcoords="offset points", xytext=(-10, 10) if impl == "sdk" else (10, -14),
                    ha="right" if impl == "sdk" else "left", fontsize=8.5, color=colors[impl],
                    fontweight="bold")
    prof = res["profile"]
    for key, d in res["slow"].items():
        impl, flow, fmt = key.split("_")
        if fmt != "json" or flow not in {k.split("_")[1] for k in res["sweep"]}:
            continue
        ax.scatter([prof["rtt_ms"]], [d["median_ms"] / 1000], marker="*", s=110, color=colors[impl],
                   edgecolors="black", linewidths=0.5, zorder=4)
    ax.scatter([], [], marker="*", s=110, color="grey", edgecolors="black", linewidths=0.5,
               label=f"the slow-link profile: {prof['rtt_ms']:g} ms RTT and {prof['rate_bytes_per_s'] / 1000:g} kB/s "
                     "each way (JSON)")
    ax.set_xlabel("emulated round-trip time (ms); the TCP handshake's round trip included")
    ax.set_ylabel("time to provisioned (s), median; dots: each run")
    ax.set_title("Provisioning time against round-trip time (no rate limit)\n"
                 "slope = round trips the client waits for, TCP's included", fontsize=10)
    ax.set_xlim(left=-xmax * 0.02)
    ax.set_ylim(0, ax.get_ylim()[1] * 1.05)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7.5, loc="upper left")
    fig.tight_layout()
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.plot)
    plt.close(fig)
    log(f"  plot: {args.plot}")


def stripped_size(path: Path, work: Path) -> int:
    copy = work / (path.name + ".stripped")
    subprocess.run(["strip", "-o", str(copy), str(path)], check=True, timeout=60)
    n = copy.stat().st_size
    copy.unlink()
    return n


def tree_size(path: Path, suffix: str = ".py") -> int:
    return sum(p.stat().st_size for p in path.rglob(f"*{suffix}") if p.is_file())


def phase_footprint(args, table: Table, results: dict) -> None:
    import awscrt
    import awsiot

    site = Path(awscrt.__file__).resolve().parents[1]
    native = sorted(site.glob("_awscrt*.so"))
    if not native:
        raise RuntimeError(f"no _awscrt*.so in {site}")
    work = args.work
    ours_so = stripped_size(args.library, work)
    theirs_so = stripped_size(native[0], work)
    static = stripped_size(args.c_static, work)
    shared_exe = stripped_size(args.c_shared, work)
    ours_py = tree_size(REPO / "bindings" / "python" / "fleetprov")
    theirs_py = tree_size(Path(awscrt.__file__).parent) + tree_size(Path(awsiot.__file__).parent)
    results["footprint"] = dict(cdylib=ours_so, awscrt_native=theirs_so, awscrt_native_unstripped=native[0].stat().st_size,
                                c_static=static, c_shared_exe=shared_exe, ours_py=ours_py, theirs_py=theirs_py,
                                awscrt_native_name=native[0].name)
    limit = theirs_so * TARGET_SIZE_FRACTION
    if ours_so <= limit:
        verdict = "<= 1/5: met"
    else:
        verdict = f"<= 1/5 ({size(int(limit))}): MISSED by {size(int(ours_so - limit))} ({(ours_so / limit - 1) * 100:.0f}%)"
    table.add("stripped cdylib vs stripped " + native[0].name, size(ours_so), size(theirs_so),
              ratio(theirs_so, ours_so), verdict)
    unstripped = native[0].stat().st_size
    table.add(f"stripped cdylib vs {native[0].name} as installed", size(ours_so), size(unstripped),
              ratio(unstripped, ours_so),
              "<= 1/5: met" if ours_so <= unstripped / 5 else
              f"<= 1/5 ({size(int(unstripped / 5))}): missed by {size(int(ours_so - unstripped / 5))}")
    table.add("statically linked C example (stripped) vs stripped native module", size(static), size(theirs_so),
              ratio(theirs_so, static))
    table.add("C example linked to the shared library (stripped exe)", f"{shared_exe / 1e3:.1f} kB", "", "")
    table.add("Python package: .py files + stripped native library",
              size(ours_py + ours_so), size(theirs_py + theirs_so), ratio(theirs_py + theirs_so, ours_py + ours_so))


def phase_storm(args, env, table: Table, results: dict) -> None:
    """The storm in the two modes of storm.rs (a thread per device through the blocking API;
    provision_many on 2 threads), each twice: as fast as it goes (devices per second),
    then with every RegisterThing reply held --storm-hold-ms by the emulator so that all devices
    are connected at once at the peak (memory per device in flight)."""
    env = dict(env, FLEETPROV_EMULATOR=str(args.emulator), FLEETPROV_STORM_DEVICES=str(args.storm_devices))
    runs: dict = {}
    for mode in ("threads", "many"):
        for name, hold in (("throughput", 0), ("in_flight", args.storm_hold_ms)):
            log(f"  storm: {args.storm_devices} devices, {mode}, replies held {hold} ms ...")
            r = run_measured([str(args.storm)], dict(env, FLEETPROV_STORM_MODE=mode,
                                                     FLEETPROV_STORM_HOLD_MS=str(hold)), STORM_TIMEOUT_S)
            d = json.loads(r["stdout"].strip().splitlines()[-1])
            d["process_cpu_ms"] = r["cpu_ms"]
            runs[f"{mode}_{name}"] = d
    results["storm"] = runs
    labels = {"threads": "a thread per device, fleetprov::provision",
              "many": "fleetprov::provision::provision_many on 2 threads"}
    for mode, label in labels.items():
        fast, held = runs[f"{mode}_throughput"], runs[f"{mode}_in_flight"]
        table.add(f"{label}: devices per second", f"{fast['devices_per_s']:.0f}/s", "", "",
                  f"(at most {fast['max_connected']} connected at once; retries {fast['retries']}, "
                  f"failed {fast['failed']})")
        table.add(f"{label}: peak RSS delta / devices, as fast as it goes", f"{fast['kb_per_device']:.1f} KB",
                  "", "")
        kb = held["kb_per_device"]
        verdict = (f"< {TARGET_STORM_KB:.0f} KB: met" if kb < TARGET_STORM_KB
                   else f"< {TARGET_STORM_KB:.0f} KB: MISSED by {kb - TARGET_STORM_KB:.1f} KB "
                        f"({(kb / TARGET_STORM_KB - 1) * 100:.0f}%)")
        table.add(f"{label}: per device in flight ({held['max_connected']} connected at once)",
                  f"{kb:.1f} KB", "", "", verdict)


def phase_codec(args, env, table: Table, results: dict) -> None:
    log("  codec ...")
    ours = [json.loads(l) for l in run_measured([str(args.codec)], env, 120)["stdout"].splitlines()
            if l.startswith("{")]
    theirs = [json.loads(l) for l in run_measured([sys.executable, str(HERE / "sdk_codec.py")], env, 120)[
        "stdout"].splitlines() if l.startswith("{")]
    results["codec"] = {"ours": ours, "theirs": theirs}
    sdk = {c["case"]: c["ns_per_op"] for c in theirs}
    for c in ours:
        t = sdk.get(c["case"]) if c["format"] == "json" else None
        table.add(f"{c['case']} ({c['format'].upper()}, {c['bytes']} B)", f"{c['ns_per_op']:.0f} ns",
                  f"{t:.0f} ns" if t else "(no CBOR)" if c["format"] == "cbor" else "",
                  ratio(t, c["ns_per_op"]) if t else "")


def git_describe() -> str:
    """The commit measured, with '+dirty' when the library's sources differ from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "src", "include", "bindings",
                                "Cargo.toml", "Cargo.lock"], cwd=REPO, capture_output=True, text=True,
                               timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
    return head + ("+dirty" if dirty else "")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--rtt-runs", type=int, default=None, help="runs under the emulated RTT (default: --runs)")
    p.add_argument("--rtt-ms", type=float, default=50.0)
    p.add_argument("--storm-devices", type=int, default=1000)
    p.add_argument("--storm-hold-ms", type=int, default=3000,
                   help="the in-flight storm: how long the emulator holds each RegisterThing reply")
    p.add_argument("--emulator", type=Path, required=True)
    p.add_argument("--library", type=Path, required=True)
    p.add_argument("--c-shared", type=Path, required=True)
    p.add_argument("--c-static", type=Path, required=True)
    p.add_argument("--storm", type=Path, required=True)
    p.add_argument("--codec", type=Path, required=True)
    p.add_argument("--measure", type=Path, required=True, help="tests/bench/c/measure.c, built")
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--slow-runs", type=int, default=3, help="slowlink: runs per client/API/format")
    p.add_argument("--slow-rtt-ms", type=float, default=600.0, help="slowlink: the slow link's round-trip time")
    p.add_argument("--slow-rate", type=float, default=20000.0,
                   help="slowlink: the slow link's bandwidth, bytes per second each way")
    p.add_argument("--sweep-rtts", default="0,50,300,600,2000", help="slowlink: the RTTs (ms) of the sweep")
    p.add_argument("--sweep-runs", type=int, default=3, help="slowlink: runs per RTT and client")
    p.add_argument("--sweep-flows", default="csr",
                   help="slowlink: the sweep's APIs, csr and/or keys (csr,keys: 1.5 more minutes)")
    p.add_argument("--plot", type=Path, help="slowlink: where to write the PNG of the sweep")
    p.add_argument("--phases", default="loopback,rtt,slowlink,process,footprint,storm,codec",
                   help="comma-separated subset of: loopback,rtt,slowlink,process,footprint,storm,codec")
    p.add_argument("--json", type=Path)
    p.add_argument("--markdown", type=Path)
    args = p.parse_args()
    if not 1 <= args.runs <= 1000:
        p.error("--runs must be 1..1000")
    args.rtt_runs = args.rtt_runs or args.runs
    if not 1 <= args.slow_runs <= 100 or not 1 <= args.sweep_runs <= 100:
        p.error("--slow-runs and --sweep-runs must be 1..100")
    if not set(args.sweep_flows.split(",")) <= {"csr", "keys"}:
        p.error("--sweep-flows: a comma-separated subset of csr,keys")
    global MEASURE
    MEASURE = args.measure
    args.work.mkdir(parents=True, exist_ok=True)
    args.emu_dir = args.work / "emulator"
    env = dict(os.environ)
    env["FLEETPROV_LIBRARY"] = str(args.library)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "bindings" / "python"), env.get("PYTHONPATH")]))

    started = time.monotonic()
    table = Table()
    results: dict = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": {"uname": " ".join(platform.uname()), "cpus": os.cpu_count(), "python": platform.python_version()},
        "runs": args.runs, "rtt_runs": args.rtt_runs, "rtt_ms": args.rtt_ms,
        "commit": git_describe(),
    }
    print(f"  {'figure':<58} {'ours':>14} {'theirs':>14} {'theirs/ours':>9}  target", flush=True)
    phases = set(args.phases.split(","))
    unknown = phases - {"loopback", "rtt", "slowlink", "process", "footprint", "storm", "codec"}
    if unknown:
        p.error(f"unknown phases {sorted(unknown)}")
    emu = Emulator(args.emulator, args.emu_dir)
    proxy = None
    try:
        log(f"emulator on 127.0.0.1:{emu.port}")
        if "loopback" in phases:
            table.section(f"Loopback: Python binding vs official SDK (IotIdentityClientV2, MQTT 3.1.1), "
                          f"median of {args.runs} runs each, fresh process per client")
            phase_python(args, env, table, results, emu.port, "loopback", "loopback", None)
        if "rtt" in phases:
            proxy = DelayProxy("127.0.0.1", emu.port, delay=args.rtt_ms / 2000)
            proxy_port = proxy.start()
            table.section(f"Emulated {args.rtt_ms:g} ms round-trip time (delaying proxy), "
                          f"median of {args.rtt_runs} runs")
            phase_python(args, env, table, results, proxy_port, "rtt", "rtt", proxy)
            phase_verify_rtt(args, env, table, results, proxy_port, proxy)
            proxy.stop()
            proxy = None
        if "slowlink" in phases:
            table.section(f"Slow link: {args.slow_rtt_ms:g} ms round-trip time and {args.slow_rate / 1000:g} kB/s "
                          f"each way, TCP handshake included, median of {args.slow_runs} runs; theirs: "
                          "IotIdentityClientV2, JSON only (it has no CBOR topics); bytes per provisioning")
            phase_slowlink(args, env, table, results, emu.port)
        if "process" in phases:
            table.section(f"One provisioning per process (CreateCertificateFromCsr), median of {args.runs} "
                          "processes; theirs: python + official SDK")
            phase_c(args, env, table, results, emu.port)
    finally:
        if proxy is not None:
            proxy.stop()
        emu.stop()

    if "footprint" in phases:
        table.section("Footprint")
        phase_footprint(args, table, results)
    if "storm" in phases:
        table.section(f"Storm: {args.storm_devices} devices provisioning at once in one process "
                      "(CreateCertificateFromCsr); no SDK counterpart")
        phase_storm(args, env, table, results)
    if "codec" in phases:
        table.section("Codec micro-benchmarks (median ns per operation); theirs: the SDK's Python JSON models")
        phase_codec(args, env, table, results)

    results["seconds"] = time.monotonic() - started
    results["table"] = table.rows
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    if args.markdown:
        args.markdown.write_text(table.markdown())
    missed = [r for r in table.rows if "MISSED" in r["target"]]
    print(f"\nmeasured in {results['seconds']:.0f} s; targets missed: {len(missed)}", flush=True)
    for r in missed:
        print(f"  {r['figure']}: {r['target']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
