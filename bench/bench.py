#!/usr/bin/env python3
"""Wraith benchmark harness: the same upstream measured directly, through Wraith, through nginx
and through HAProxy, in one run, reported as ratios.

Method (see docs/BENCHMARKS.md and the team's benchmarking notes):
  * proxies pinned to CPU 1 with one worker each; client (wrk/h2load) and upstream on CPU 0;
  * CPU time per request read from /proc/PID/stat (all threads) over >= 5 s runs;
  * ABBA rounds (order rotates every round) with a noise gate: a run during which other
    processes used more than --gate CPU-seconds is rejected and retried after a quiet window;
  * latency at a fixed offered rate (open loop, h2load --rps), reported as proxy-added p99
    (p99 through the proxy minus p99 direct).

Usage:
  python3 bench/bench.py --scenario h1 --rounds 6
  python3 bench/bench.py --scenario tls --rounds 6
  python3 bench/bench.py --scenario all --rounds 6 --markdown bench/results/latest.md
"""

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
PORTS = {
    "upstream": 18080,
    "wraith": 18085, "wraith-tls": 18445,
    "nginx": 18081, "nginx-tls": 18443,
    "haproxy": 18082, "haproxy-tls": 18444,
}


def log(*a):
    print(*a, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# /proc accounting

def proc_cpu_ticks(pid):
    """utime+stime of a process (all threads), in clock ticks."""
    with open(f"/proc/{pid}/stat") as f:
        rest = f.read().rsplit(")", 1)[1].split()
    return int(rest[11]) + int(rest[12])


def system_ticks():
    """(busy, total) ticks over all CPUs, and per-CPU busy list."""
    with open("/proc/stat") as f:
        lines = f.read().splitlines()
    per = []
    total_busy = total_all = 0
    for l in lines:
        if not l.startswith("cpu"):
            continue
        parts = l.split()
        vals = list(map(int, parts[1:9]))
        idle = vals[3] + vals[4]
        busy = sum(vals) - idle
        if parts[0] == "cpu":
            total_busy, total_all = busy, sum(vals)
        else:
            per.append(busy)
    return total_busy, total_all, per


def steal_ticks():
    """Ticks the hypervisor took from each CPU (the `steal` column of /proc/stat)."""
    with open("/proc/stat") as f:
        return [int(l.split()[8]) for l in f if l.startswith("cpu") and not l.startswith("cpu ")]


def children_ticks():
    r = os.times()
    return (r.children_user + r.children_system) * CLK_TCK


def wait_quiet(max_wait=120, threshold=0.10, seconds=3):
    """Waits for `seconds` consecutive seconds with the machine < threshold busy."""
    quiet = 0
    start = time.time()
    b0, t0, _ = system_ticks()
    while time.time() - start < max_wait:
        time.sleep(1)
        b1, t1, _ = system_ticks()
        frac = (b1 - b0) / max(1, t1 - t0)
        b0, t0 = b1, t1
        quiet = quiet + 1 if frac < threshold else 0
        if quiet >= seconds:
            return True
    return False


# ---------------------------------------------------------------------------------------------
# Processes

class Procs:
    def __init__(self):
        self.procs = []

    def start(self, name, cmd, cpu, env=None, cwd=None):
        full = ["taskset", "-c", str(cpu)] + cmd
        p = subprocess.Popen(full, stdout=subprocess.DEVNULL, stderr=open(f"{cwd or '.'}/{name}.log", "w"),
                             env=env, cwd=cwd, start_new_session=True)
        self.procs.append((name, p))
        return p

    def stop(self):
        for name, p in self.procs:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for name, p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)


def wait_port(port, timeout=20):
    import socket
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def fill(text, subst):
    """A config template with every `@KEY@` replaced by `subst[KEY]`."""
    for k, v in subst.items():
        text = text.replace("@" + k + "@", str(v))
    return text


def link_policies(work):
    """Wraith's bench configs use `[policy]` with the default `dir = "policies"`: link the
    permit-all set (answered at load, no Cedar call) next to them."""
    link = Path(work) / "policies"
    if not link.exists():
        link.symlink_to(ROOT / "bench" / "configs" / "policies")


def setup(work, wraith_bin):
    """Writes configs and certificates; starts upstream and peers. Returns (procs, pids)."""
    certs = work / "certs"
    subprocess.run([wraith_bin, "certs", "init", "--dir", str(certs), "--force"], check=True,
                   stdout=subprocess.DEVNULL)
    # HAProxy wants certificate and key in one file.
    (certs / "server-combined.pem").write_text(
        (certs / "server.pem").read_text() + (certs / "server-key.pem").read_text())
    subst = {"WORK": str(work), "CERTS": str(certs), **{k.upper().replace("-", "_"): str(v) for k, v in PORTS.items()}}
    for name in ["upstream-nginx.conf", "nginx-proxy.conf", "haproxy.cfg", "wraith.toml"]:
        (work / name).write_text(fill((ROOT / "bench" / "configs" / name).read_text(), subst))
    (work / "www").mkdir(exist_ok=True)
    link_policies(work)
    procs = Procs()
    try:
        return procs, start_peers(procs, work, wraith_bin)
    except BaseException:
        # Nothing may outlive a failed start: a stray peer would hold the port and answer
        # for the next run's proxy.
        procs.stop()
        raise


def port_free(port):
    import socket
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return False
    except OSError:
        return True


def start_peers(procs, work, wraith_bin):
    busy = [p for p in PORTS.values() if not port_free(p)]
    if busy:
        raise RuntimeError(f"ports {busy} are already in use (a stray peer from an earlier run?)")
    pids = {}
    pids["upstream"] = procs.start("upstream", ["nginx", "-c", str(work / "upstream-nginx.conf"), "-g", "daemon off;"], 0, cwd=work).pid
    wait_port(PORTS["upstream"])
    pids["nginx"] = procs.start("nginx-proxy", ["nginx", "-c", str(work / "nginx-proxy.conf"), "-g", "daemon off;"], 1, cwd=work).pid
    pids["haproxy"] = procs.start("haproxy", ["haproxy", "-f", str(work / "haproxy.cfg")], 1, cwd=work).pid
    env = dict(os.environ, WRAITH_LOG="warn")
    pids["wraith"] = procs.start("wraith", [wraith_bin, "serve", "-c", str(work / "wraith.toml")], 1, env=env, cwd=work).pid
    for k in ["nginx", "nginx-tls", "haproxy", "haproxy-tls", "wraith", "wraith-tls"]:
        wait_port(PORTS[k])
    return pids


# ---------------------------------------------------------------------------------------------
# Measurements

WRK_RE = re.compile(r"(\d+) requests in ([\d.]+)s")


def parse_wrk(out):
    m = WRK_RE.search(out)
    reqs = int(m.group(1)) if m else 0
    lat = {}
    for pct in ["50", "75", "90", "99"]:
        mm = re.search(rf"^\s+{pct}(?:\.000)?%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        if mm:
            v = float(mm.group(1)) * {"us": 1, "ms": 1e3, "s": 1e6}[mm.group(2)]
            lat["p" + pct] = v
    errors = 0
    for pat in [r"Non-2xx or 3xx responses: (\d+)", r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)"]:
        mm = re.search(pat, out)
        if mm:
            errors += sum(int(x) for x in mm.groups())
    return reqs, lat, errors


def measure(cmd, pids, parse):
    """Runs `cmd` on CPU 0 while accounting CPU of `pids`; returns a dict of figures."""
    p0 = {k: proc_cpu_ticks(v) for k, v in pids.items()}
    b0, t0, per0 = system_ticks()
    c0 = children_ticks()
    start = time.time()
    out = subprocess.run(["taskset", "-c", "0"] + cmd, capture_output=True, text=True).stdout
    wall = time.time() - start
    c1 = children_ticks()
    b1, t1, per1 = system_ticks()
    p1 = {k: proc_cpu_ticks(v) for k, v in pids.items()}
    ours = sum(p1[k] - p0[k] for k in pids) + (c1 - c0)
    foreign = max(0, (b1 - b0) - ours) / CLK_TCK
    reqs, lat, errors = parse(out)
    res = {
        "requests": reqs, "rps": reqs / wall if wall else 0, "errors": errors, "latency_us": lat,
        "foreign_cpu_s": foreign, "client_cpu_s": (c1 - c0) / CLK_TCK,
        "cpu_busy": [(a - b) / CLK_TCK / wall for a, b in zip(per1, per0)],
    }
    for k in pids:
        res[f"{k}_cpu_us_per_req"] = (p1[k] - p0[k]) / CLK_TCK * 1e6 / max(1, reqs)
    return res, out


def wrk_cmd(url, conns, duration):
    return ["wrk", "-t1", f"-c{conns}", "--latency", f"-d{duration}s", url]


def run_gated(name, cmd, pids, parse, gate, warmup_cmd=None, retries=6):
    rejects = 0
    for _ in range(retries):
        if warmup_cmd:
            subprocess.run(["taskset", "-c", "0"] + warmup_cmd, capture_output=True)
        res, out = measure(cmd, pids, parse)
        if res["foreign_cpu_s"] <= gate:
            res["rejects"] = rejects
            return res
        rejects += 1
        log(f"  {name}: rejected (foreign CPU {res['foreign_cpu_s']:.2f}s); waiting for a quiet window")
        wait_quiet()
    res["rejects"] = rejects
    res["noisy"] = True
    return res


def h2load_latency(url, rate, conns, duration, work, h1=True, steal_gate=0.1, retries=3):
    """Open-loop latency at a fixed total rate; percentiles from h2load's per-request log.

    On a VM the hypervisor takes the proxy's CPU now and then (steal time): a run that lost
    more than `steal_gate` seconds of CPU 1 is repeated (up to `retries` times), since its
    tail is the hypervisor's, not the proxy's. Every run's steal is reported."""
    for attempt in range(retries):
        s0 = steal_ticks()
        res = h2load_latency_once(url, rate, conns, duration, work, h1)
        steal = (steal_ticks()[1] - s0[1]) / CLK_TCK if len(s0) > 1 else 0.0
        if res:
            res["steal_s"] = steal
            res["attempts"] = attempt + 1
        if steal <= steal_gate:
            return res
        log(f"  latency run on {url}: {steal:.2f}s stolen from CPU 1 by the hypervisor; again")
        wait_quiet()
    if res:
        res["noisy"] = True
    return res


def h2load_latency_once(url, rate, conns, duration, work, h1=True):
    logf = work / "h2load.log"
    per_client = max(1, rate // conns)
    # h2load appends to an existing log file: start each run from an empty one.
    logf.unlink(missing_ok=True)
    cmd = ["h2load", f"--rps={per_client}", f"-c{conns}", f"-D{duration}", f"--log-file={logf}", url]
    if h1:
        cmd.insert(1, "--h1")
    subprocess.run(["taskset", "-c", "0"] + cmd, capture_output=True, text=True)
    lat = []
    for line in logf.read_text().splitlines():
        parts = line.split("\t")
        if len(parts) >= 3 and parts[1].startswith("2"):
            lat.append(int(parts[2]))
    lat.sort()
    if not lat:
        return {}
    pick = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))]
    return {"n": len(lat), "p50": pick(0.50), "p99": pick(0.99), "p999": pick(0.999)}


# ---------------------------------------------------------------------------------------------
# Scenarios

SCENARIOS = {
    # name: (targets {label: (port key, scheme)}, path)
    "h1": {"wraith": ("wraith", "http"), "nginx": ("nginx", "http"), "haproxy": ("haproxy", "http")},
    "tls": {"wraith": ("wraith-tls", "https"), "nginx": ("nginx-tls", "https"), "haproxy": ("haproxy-tls", "https")},
}


def url_for(port_key, scheme, path="/small"):
    return f"{scheme}://127.0.0.1:{PORTS[port_key]}{path}"


def run_scenario(scn, args, pids, work):
    targets = SCENARIOS[scn]
    names = list(targets)
    rounds = []
    log(f"== scenario {scn}: {args.rounds} rounds, {args.duration}s each, c={args.conns}")
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        if r % 2:
            order = order[::-1]
        rnd = {}
        for n in order:
            port_key, scheme = targets[n]
            url = url_for(port_key, scheme)
            cmd = wrk_cmd(url, args.conns, args.duration)
            warm = wrk_cmd(url, args.conns, 1)
            proxy_pid = {"proxy": pids[n], "upstream": pids["upstream"]}
            res = run_gated(n, cmd, proxy_pid, parse_wrk, args.gate, warm)
            rnd[n] = res
            log(f"  round {r} {n:8s} {res['rps']:9.0f} rps  {res['proxy_cpu_us_per_req']:6.2f} µs/req  "
                f"p99 {res['latency_us'].get('p99', 0)/1000:.2f} ms  busy {['%.0f%%' % (b*100) for b in res['cpu_busy']]}"
                f"  errors {res['errors']}  foreign {res['foreign_cpu_s']:.2f}s")
        rounds.append(rnd)
    summary = {}
    for n in names:
        cpu = [rd[n]["proxy_cpu_us_per_req"] for rd in rounds]
        rps = [rd[n]["rps"] for rd in rounds]
        summary[n] = {"cpu_us_per_req_median": statistics.median(cpu), "rps_median": statistics.median(rps),
                      "errors": sum(rd[n]["errors"] for rd in rounds),
                      "rejects": sum(rd[n].get("rejects", 0) for rd in rounds),
                      "cpu1_busy_median": statistics.median(rd[n]["cpu_busy"][1] for rd in rounds if len(rd[n]["cpu_busy"]) > 1)}
    ratios = {}
    for peer in [n for n in names if n != "wraith"]:
        cpu_r = [rd["wraith"]["proxy_cpu_us_per_req"] / rd[peer]["proxy_cpu_us_per_req"] for rd in rounds]
        rps_r = [rd["wraith"]["rps"] / rd[peer]["rps"] for rd in rounds]
        ratios[peer] = {"cpu_ratio_median": statistics.median(cpu_r), "cpu_ratio_range": [min(cpu_r), max(cpu_r)],
                        "rps_ratio_median": statistics.median(rps_r), "rps_ratio_range": [min(rps_r), max(rps_r)]}
    # Open-loop latency at a fixed rate, below every peer's capacity.
    latency = {}
    if args.latency_rate:
        h1 = True
        direct = h2load_latency(f"http://127.0.0.1:{PORTS['upstream']}/small", args.latency_rate, 20, args.latency_duration, work, h1)
        latency["direct"] = direct
        for n in names:
            port_key, scheme = targets[n]
            latency[n] = h2load_latency(url_for(port_key, scheme), args.latency_rate, 20, args.latency_duration, work, h1)
            if direct and latency[n]:
                latency[n]["added_p99"] = latency[n]["p99"] - direct["p99"]
                latency[n]["added_p50"] = latency[n]["p50"] - direct["p50"]
    return {"rounds": rounds, "summary": summary, "ratios": ratios, "latency": latency}


def markdown(results, args):
    out = []
    for scn, res in results.items():
        out.append(f"### Scenario `{scn}` ({args.rounds} ABBA rounds, wrk -t1 -c{args.conns} -d{args.duration}s)\n")
        out.append("| proxy | CPU µs/req (median) | req/s (median) | CPU1 busy | errors | rejected runs |")
        out.append("|---|---|---|---|---|---|")
        for n, s in res["summary"].items():
            out.append(f"| {n} | {s['cpu_us_per_req_median']:.2f} | {s['rps_median']:.0f} | {s['cpu1_busy_median']*100:.0f}% | {s['errors']} | {s['rejects']} |")
        out.append("")
        out.append("| Wraith vs | CPU/req ratio median (range) | req/s ratio median (range) |")
        out.append("|---|---|---|")
        for peer, r in res["ratios"].items():
            out.append(f"| {peer} | {r['cpu_ratio_median']:.2f} ({r['cpu_ratio_range'][0]:.2f}–{r['cpu_ratio_range'][1]:.2f}) | "
                       f"{r['rps_ratio_median']:.2f} ({r['rps_ratio_range'][0]:.2f}–{r['rps_ratio_range'][1]:.2f}) |")
        if res["latency"]:
            out.append("")
            out.append(f"Open-loop latency at {args.latency_rate} req/s (h2load --h1 -c20, {args.latency_duration}s), µs:\n")
            out.append("| target | p50 | p99 | p99.9 | added p50 | added p99 | CPU 1 stolen (s), runs |")
            out.append("|---|---|---|---|---|---|---|")
            for n, l in res["latency"].items():
                if l:
                    noisy = " (noisy)" if l.get("noisy") else ""
                    out.append(f"| {n} | {l['p50']} | {l['p99']} | {l['p999']} | {l.get('added_p50', '-')} | {l.get('added_p99', '-')} | "
                               f"{l.get('steal_s', 0):.2f}, {l.get('attempts', 1)}{noisy} |")
        out.append("")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenario", default="all", choices=["all"] + list(SCENARIOS))
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--duration", type=int, default=5)
    ap.add_argument("--conns", type=int, default=50)
    ap.add_argument("--gate", type=float, default=0.5, help="max foreign CPU-seconds per run")
    ap.add_argument("--latency-rate", type=int, default=10000, help="total req/s for the open-loop latency run (0: skip)")
    ap.add_argument("--latency-duration", type=int, default=10)
    ap.add_argument("--wraith", default=str(ROOT / "target" / "release" / "wraith"))
    ap.add_argument("--json", help="write raw results here")
    ap.add_argument("--markdown", help="write the markdown tables here")
    args = ap.parse_args()
    for tool in ["nginx", "haproxy", "wrk", "h2load", "taskset"]:
        if not shutil.which(tool):
            sys.exit(f"{tool} is missing: apt-get install -y nginx haproxy wrk nghttp2-client util-linux")
    if not Path(args.wraith).exists():
        sys.exit(f"{args.wraith} is missing: cargo build --release")
    work = Path(tempfile.mkdtemp(prefix="wraith-bench-"))
    procs, pids = setup(work, args.wraith)
    try:
        time.sleep(0.5)
        scns = list(SCENARIOS) if args.scenario == "all" else [args.scenario]
        results = {s: run_scenario(s, args, pids, work) for s in scns}
    finally:
        procs.stop()
    md = markdown(results, args)
    print(md)
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(md)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
