#!/usr/bin/env python3
"""Load-balancing benchmark: Wraith with four upstream endpoints, one run per algorithm,
against nginx (least_conn) and HAProxy (leastconn) in front of the same four endpoints.

Uses the measurement machinery of bench.py (pinned processes, /proc CPU accounting, ABBA
rounds with a noise gate). Configs: bench/configs/lb/.

Scenarios:
  algorithms  wrk -t1 -c50 on /small through Wraith with each algorithm (round_robin,
              weighted 1:2:3:4, least_connections, ip_hash on the path, random p2c) and
              through nginx least_conn. Reports CPU µs/req per algorithm, each algorithm's
              ratio to round_robin (target: within 5 %), and Wraith least_connections vs
              nginx least_conn (target: <= 0.8x).
  stream      100 MiB of random bytes through Wraith (round_robin) and HAProxy, one curl at a
              time. Reports proxy CPU-ms per 100 MiB (target: Wraith <= HAProxy, which is
              ~70-110 ms here) and Wraith's VmHWM after 100 MiB and after 1 GiB (target: no
              growth with body size).

Usage:
  cargo build --release
  python3 bench/lb.py --scenario all --rounds 6 --markdown bench/results/lb.md
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench as b  # noqa: E402

ROOT = b.ROOT
PORTS = {
    "UP0": 18190, "UP1": 18191, "UP2": 18192, "UP3": 18193,
    "WRAITH": 18195, "NGINX": 18196, "HAPROXY": 18197,
}
ALGORITHMS = {
    "round_robin": "/rr/small",
    "weighted": "/weighted/small",
    "least_connections": "/lc/small",
    "ip_hash": "/hash/small",
    "random": "/random/small",
}


def vm_hwm_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def write_random(path, size):
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 16 << 20)
            f.write(os.urandom(n))
            left -= n


def setup(work, wraith_bin, need_huge, procs):
    """Writes the configs and the files to stream; starts upstream and proxies into `procs`."""
    subst = {"WORK": str(work), **{k: str(v) for k, v in PORTS.items()}}
    for name in ["upstream-nginx.conf", "wraith.toml", "nginx-proxy.conf", "haproxy.cfg"]:
        (work / name).write_text(b.fill((ROOT / "bench" / "configs" / "lb" / name).read_text(), subst))
    link = work / "policies"
    if not link.exists():
        link.symlink_to(ROOT / "bench" / "configs" / "policies")
    www = work / "www"
    www.mkdir(exist_ok=True)
    write_random(www / "big.bin", 100 << 20)
    if need_huge:
        write_random(www / "huge.bin", 1 << 30)
    pids = {}
    pids["upstream"] = procs.start("lb-upstream", ["nginx", "-c", str(work / "upstream-nginx.conf"), "-g", "daemon off;"], 0, cwd=work).pid
    for k in ["UP0", "UP1", "UP2", "UP3"]:
        b.wait_port(PORTS[k])
    pids["nginx"] = procs.start("lb-nginx", ["nginx", "-c", str(work / "nginx-proxy.conf"), "-g", "daemon off;"], 1, cwd=work).pid
    pids["haproxy"] = procs.start("lb-haproxy", ["haproxy", "-f", str(work / "haproxy.cfg")], 1, cwd=work).pid
    env = dict(os.environ, WRAITH_LOG="warn")
    pids["wraith"] = procs.start("lb-wraith", [wraith_bin, "serve", "-c", str(work / "wraith.toml")], 1, env=env, cwd=work).pid
    for k in ["WRAITH", "NGINX", "HAPROXY"]:
        b.wait_port(PORTS[k])
    return pids


def algorithms(args, pids):
    targets = {f"wraith-{a}": (PORTS["WRAITH"], path, "wraith") for a, path in ALGORITHMS.items()}
    targets["nginx-least_conn"] = (PORTS["NGINX"], "/small", "nginx")
    names = list(targets)
    rounds = []
    b.log(f"== algorithms: {args.rounds} rounds, {args.duration}s each, c={args.conns}")
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        if r % 2:
            order = order[::-1]
        rnd = {}
        for n in order:
            port, path, proc = targets[n]
            url = f"http://127.0.0.1:{port}{path}"
            cmd = b.wrk_cmd(url, args.conns, args.duration)
            warm = b.wrk_cmd(url, args.conns, 1)
            res = b.run_gated(n, cmd, {"proxy": pids[proc], "upstream": pids["upstream"]}, b.parse_wrk, args.gate, warm)
            rnd[n] = res
            b.log(f"  round {r} {n:26s} {res['rps']:9.0f} rps  {res['proxy_cpu_us_per_req']:6.2f} µs/req  errors {res['errors']}  foreign {res['foreign_cpu_s']:.2f}s")
        rounds.append(rnd)
    summary = {n: {"cpu_us_per_req_median": statistics.median(rd[n]["proxy_cpu_us_per_req"] for rd in rounds),
                   "rps_median": statistics.median(rd[n]["rps"] for rd in rounds),
                   "errors": sum(rd[n]["errors"] for rd in rounds),
                   "rejects": sum(rd[n].get("rejects", 0) for rd in rounds)} for n in names}

    def ratio(a, c):
        v = [rd[a]["proxy_cpu_us_per_req"] / rd[c]["proxy_cpu_us_per_req"] for rd in rounds]
        return {"median": statistics.median(v), "range": [min(v), max(v)]}

    vs_rr = {a: ratio(f"wraith-{a}", "wraith-round_robin") for a in ALGORITHMS if a != "round_robin"}
    vs_nginx = ratio("wraith-least_connections", "nginx-least_conn")
    return {"rounds": rounds, "summary": summary, "vs_round_robin": vs_rr, "least_conn_vs_nginx": vs_nginx}


def stream(args, pids):
    """CPU per 100 MiB through each proxy, one curl at a time, ABBA; then Wraith's VmHWM."""
    targets = {"wraith": (PORTS["WRAITH"], "/rr/big.bin"), "haproxy": (PORTS["HAPROXY"], "/big.bin")}
    runs = {n: [] for n in targets}
    b.log(f"== stream: {args.rounds} rounds of 100 MiB")
    hwm_start = vm_hwm_kib(pids["wraith"])
    for r in range(args.rounds):
        order = list(targets) if r % 2 == 0 else list(targets)[::-1]
        for n in order:
            port, path = targets[n]
            url = f"http://127.0.0.1:{port}{path}"
            cmd = ["curl", "-s", "-o", "/dev/null", "-w", "%{size_download} %{speed_download}\n", url]
            for _ in range(6):
                p0 = b.proc_cpu_ticks(pids[n])
                u0 = b.proc_cpu_ticks(pids["upstream"])
                bz0, _, _ = b.system_ticks()
                c0 = b.children_ticks()
                out = subprocess.run(["taskset", "-c", "0"] + cmd, capture_output=True, text=True).stdout.split()
                c1 = b.children_ticks()
                bz1, _, _ = b.system_ticks()
                p1 = b.proc_cpu_ticks(pids[n])
                up = b.proc_cpu_ticks(pids["upstream"]) - u0
                foreign = max(0, (bz1 - bz0) - (p1 - p0) - (c1 - c0) - up) / b.CLK_TCK
                if foreign <= args.gate:
                    break
                b.log(f"  {n}: rejected (foreign CPU {foreign:.2f}s)")
                b.wait_quiet()
            size = int(float(out[0])) if out else 0
            cpu_ms = (p1 - p0) / b.CLK_TCK * 1000 * (100 << 20) / max(1, size)
            runs[n].append({"cpu_ms_per_100mib": cpu_ms, "bytes": size, "speed": float(out[1]) if len(out) > 1 else 0})
            b.log(f"  round {r} {n:8s} {cpu_ms:7.1f} CPU-ms per 100 MiB  {size} bytes")
    hwm_100m = vm_hwm_kib(pids["wraith"])
    hwm_1g = None
    if args.huge:
        subprocess.run(["taskset", "-c", "0", "curl", "-s", "-o", "/dev/null", f"http://127.0.0.1:{PORTS['WRAITH']}/rr/huge.bin"])
        hwm_1g = vm_hwm_kib(pids["wraith"])
    med = {n: statistics.median(x["cpu_ms_per_100mib"] for x in v) for n, v in runs.items()}
    return {"runs": runs, "cpu_ms_per_100mib_median": med,
            "wraith_vs_haproxy": med["wraith"] / med["haproxy"] if med["haproxy"] else None,
            "wraith_vm_hwm_kib": {"before": hwm_start, "after_100mib": hwm_100m, "after_1gib": hwm_1g}}


def markdown(res, args):
    out = []
    if "algorithms" in res:
        a = res["algorithms"]
        out.append(f"### Load balancing, 4 endpoints ({args.rounds} ABBA rounds, wrk -t1 -c{args.conns} -d{args.duration}s)\n")
        out.append("| target | CPU µs/req (median) | req/s (median) | errors | rejected runs |")
        out.append("|---|---|---|---|---|")
        for n, s in a["summary"].items():
            out.append(f"| {n} | {s['cpu_us_per_req_median']:.2f} | {s['rps_median']:.0f} | {s['errors']} | {s['rejects']} |")
        out.append("\n| algorithm vs round_robin | CPU/req ratio median (range) |")
        out.append("|---|---|")
        for n, r in a["vs_round_robin"].items():
            out.append(f"| {n} | {r['median']:.3f} ({r['range'][0]:.3f}–{r['range'][1]:.3f}) |")
        r = a["least_conn_vs_nginx"]
        out.append(f"\nWraith least_connections / nginx least_conn, CPU per request: **{r['median']:.2f}** ({r['range'][0]:.2f}–{r['range'][1]:.2f})\n")
    if "stream" in res:
        s = res["stream"]
        out.append("### Streaming 100 MiB through 4-endpoint pools\n")
        out.append("| proxy | CPU-ms per 100 MiB (median) |")
        out.append("|---|---|")
        for n, v in s["cpu_ms_per_100mib_median"].items():
            out.append(f"| {n} | {v:.1f} |")
        h = s["wraith_vm_hwm_kib"]
        out.append(f"\nWraith / HAProxy CPU per byte: **{s['wraith_vs_haproxy']:.2f}**. Wraith VmHWM: "
                   f"{h['before']} KiB before, {h['after_100mib']} KiB after the 100 MiB runs, "
                   f"{h['after_1gib'] if h['after_1gib'] is not None else 'not measured'} KiB after 1 GiB.\n")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenario", default="all", choices=["all", "algorithms", "stream"])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--duration", type=int, default=5)
    ap.add_argument("--conns", type=int, default=50)
    ap.add_argument("--gate", type=float, default=0.5, help="max foreign CPU-seconds per run")
    ap.add_argument("--no-huge", dest="huge", action="store_false", help="skip the 1 GiB VmHWM check")
    ap.add_argument("--wraith", default=str(ROOT / "target" / "release" / "wraith"))
    ap.add_argument("--json")
    ap.add_argument("--markdown")
    args = ap.parse_args()
    for tool in ["nginx", "haproxy", "wrk", "curl", "taskset"]:
        if not shutil.which(tool):
            sys.exit(f"{tool} is missing: apt-get install -y nginx haproxy wrk curl util-linux")
    args.wraith = str(Path(args.wraith).resolve())
    if not Path(args.wraith).exists():
        sys.exit(f"{args.wraith} is missing: cargo build --release")
    for port in PORTS.values():
        try:
            b.wait_port(port, timeout=0.2)
            sys.exit(f"port {port} is already in use; stop whatever listens there first")
        except RuntimeError:
            pass
    work = Path(tempfile.mkdtemp(prefix="wraith-lb-bench-"))
    scenarios = ["stream", "algorithms"] if args.scenario == "all" else [args.scenario]
    results = {}
    procs = b.Procs()
    try:
        pids = setup(work, args.wraith, args.huge and "stream" in scenarios, procs)
        time.sleep(0.5)
        # Streaming first: Wraith's VmHWM must not include the 50-connection wrk load.
        for s in scenarios:
            results[s] = stream(args, pids) if s == "stream" else algorithms(args, pids)
    finally:
        procs.stop()
        shutil.rmtree(work, ignore_errors=True)
    md = markdown(results, args)
    print(md)
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(md)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
