#!/usr/bin/env python3
"""Cost of the refusal stages on the request path (issue: decisions and rate limits).

Three Wraith instances in front of the same nginx upstream, measured in ABBA rounds with the
method and helpers of bench/bench.py (pinned CPUs, /proc CPU accounting, noise gate):

  empty    no decisions, no rate limits                         (the baseline)
  loaded   100,000 IP + 10,000 range decisions (IPv4 and IPv6)  (ban check on every request
           and at accept; the client is not banned: the common, miss path)
  limited  a per-client rate limit that never refuses            (one keyed GCRA check)

Acceptance: `loaded - empty` <= 1 µs CPU per request; `limited - empty` <= 1 µs. The identity
key needs client certificates (the mTLS work); until then `limited` uses key = "ip", whose
cost differs from an identity key only by hashing an address instead of a SPIFFE ID.

Usage:
  cargo build --release
  python3 bench/decisions.py --rounds 6 [--markdown bench/results/decisions.md]
"""

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench as B  # noqa: E402

PORTS = {"empty": 18185, "loaded": 18186, "limited": 18187}

WRAITH = """
[server]
worker_threads = 1
log_level = "warn"
{server_extra}

[decisions]
state_file = "{state}"

[[listener]]
name = "plain"
address = "127.0.0.1:{port}"
protocol = "http"

[[upstream]]
name = "up"
endpoints = ["127.0.0.1:{upstream}"]
max_idle_per_endpoint = 256

[policy]

[[route]]
name = "all"
upstream = "up"
{route_extra}
"""


def decisions_file(path, ips=100_000, ranges=10_000):
    """A state file with `ips` single addresses and `ranges` CIDRs, half IPv4, half IPv6,
    none covering 127.0.0.1 (the benchmark client)."""
    rnd = random.Random(7)
    until = int((time.time() + 7 * 86400) * 1000)
    out = []
    for i in range(ips):
        if i % 2:
            v = f"2001:db8:{rnd.randrange(1 << 16):x}:{rnd.randrange(1 << 16):x}::{rnd.randrange(1, 1 << 16):x}"
        else:
            v = f"{rnd.randrange(11, 126)}.{rnd.randrange(256)}.{rnd.randrange(256)}.{rnd.randrange(1, 255)}"
        out.append({"origin": "bench", "scope": "Ip", "value": v, "type": "ban", "until_ms": until})
    for i in range(ranges):
        if i % 2:
            v = f"2001:db8:{rnd.randrange(1 << 16):x}::/48"
        else:
            v = f"{rnd.randrange(11, 126)}.{rnd.randrange(256)}.{rnd.randrange(256)}.0/24"
        out.append({"origin": "bench", "scope": "Range", "value": v, "type": "ban", "until_ms": until})
    path.write_text(json.dumps({"version": 1, "decisions": out}))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--duration", type=int, default=5)
    ap.add_argument("--conns", type=int, default=50)
    ap.add_argument("--gate", type=float, default=0.5, help="max foreign CPU-seconds per run")
    ap.add_argument("--wraith", default=str(B.ROOT / "target" / "release" / "wraith"))
    ap.add_argument("--markdown")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="wraith-bench-decisions-"))
    procs = B.Procs()
    try:
        text = (B.ROOT / "bench" / "configs" / "upstream-nginx.conf").read_text()
        text = B.fill(text, {"WORK": work, "UPSTREAM": B.PORTS["upstream"]})
        (work / "upstream-nginx.conf").write_text(text)
        (work / "www").mkdir(exist_ok=True)
        B.link_policies(work)
        pids = {"upstream": procs.start("upstream", ["nginx", "-c", str(work / "upstream-nginx.conf"), "-g", "daemon off;"], 0, cwd=work).pid}
        B.wait_port(B.PORTS["upstream"])
        decisions_file(work / "loaded-decisions.json")
        limit = 'rate_limits = [{ name = "per-client", key = "ip", rate = "10000000/s", burst = 10000000 }]'
        for name in PORTS:
            cfg = WRAITH.format(
                port=PORTS[name], upstream=B.PORTS["upstream"], server_extra="",
                state=f"{name}-decisions.json", route_extra=limit if name == "limited" else "")
            (work / f"{name}.toml").write_text(cfg)
            pids[name] = procs.start(name, [args.wraith, "serve", "-c", str(work / f"{name}.toml")], 1, cwd=work).pid
            B.wait_port(PORTS[name], timeout=60)
        names = list(PORTS)
        rounds = []
        for r in range(args.rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            if r % 2:
                order = order[::-1]
            rnd = {}
            for n in order:
                url = f"http://127.0.0.1:{PORTS[n]}/small"
                res = B.run_gated(n, B.wrk_cmd(url, args.conns, args.duration),
                                  {"proxy": pids[n], "upstream": pids["upstream"]}, B.parse_wrk, args.gate,
                                  B.wrk_cmd(url, args.conns, 1))
                rnd[n] = res
                B.log(f"  round {r} {n:8s} {res['rps']:9.0f} rps  {res['proxy_cpu_us_per_req']:6.2f} µs/req  errors {res['errors']}")
            rounds.append(rnd)
        lines = [f"### Refusal stages ({args.rounds} ABBA rounds, wrk -t1 -c{args.conns} -d{args.duration}s, Wraith on one pinned core)\n",
                 "| instance | CPU µs/req (median) | added vs empty, per-round median (range) | req/s (median) |",
                 "|---|---|---|---|"]
        for n in names:
            cpu = [rd[n]["proxy_cpu_us_per_req"] for rd in rounds]
            delta = [rd[n]["proxy_cpu_us_per_req"] - rd["empty"]["proxy_cpu_us_per_req"] for rd in rounds]
            rps = [rd[n]["rps"] for rd in rounds]
            lines.append(f"| {n} | {statistics.median(cpu):.2f} | {statistics.median(delta):+.2f} ({min(delta):+.2f} … {max(delta):+.2f}) | {statistics.median(rps):.0f} |")
        report = "\n".join(lines) + "\n"
        print(report)
        if args.markdown:
            Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
            Path(args.markdown).write_text(report)
    finally:
        procs.stop()


if __name__ == "__main__":
    main()
