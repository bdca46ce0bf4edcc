#!/usr/bin/env python3
"""Access-log cost: Wraith against itself, logging off (A) versus the JSON, combined and SQLite
sinks all on (B), same binary, same upstream, ABBA rounds with bench.py's noise gate.

Reports, per round and as medians:
  * CPU µs per request of the whole Wraith process (request thread + the sinks' writer
    threads) for A and B, and the difference B - A (acceptance: <= 3 µs);
  * the same split by thread: the request thread (`wraith-worker`/main) and the writer
    threads (`wraith-log-*`), from /proc/PID/task/*/stat;
  * a saturation run of B alone: requests/s and the SQLite sink's written and dropped counts
    from the admin socket (acceptance: SQLite keeps up at the proxy's maximum rate, 0 drops).

Usage (release build first: cargo build --release):
  python3 bench/logging.py --rounds 6
  python3 bench/logging.py --rounds 6 --markdown bench/results/logging.md
"""

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench as b  # noqa: E402  (the shared harness: pinning, /proc accounting, noise gate)

ROOT = b.ROOT
PORTS = {"off": 18095, "on": 18096}

SINKS = """
[log.json]
path = "@WORK@/@NAME@/access.json"
[log.combined]
path = "@WORK@/@NAME@/access.log"
vhost = true
[log.sqlite]
path = "@WORK@/@NAME@/access.db"
"""


def thread_ticks(pid):
    """{thread name: utime+stime ticks} for every thread of `pid`."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        rest = stat.rsplit(")", 1)[1].split()
        out[name] = out.get(name, 0) + int(rest[11]) + int(rest[12])
    return out


def admin_metrics(sock):
    """GET /v1/metrics over the admin unix socket."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(sock)
    s.sendall(b"GET /v1/metrics HTTP/1.1\r\nHost: wraith\r\nConnection: close\r\n\r\n")
    data = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    s.close()
    return data.split(b"\r\n\r\n", 1)[1].decode()


def metric(text, name, sink):
    m = re.search(rf'^{name}{{sink="{sink}"}} (\S+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


def start_wraith(procs, work, wraith_bin, name, sinks):
    text = (ROOT / "bench" / "configs" / "wraith-logging.toml").read_text()
    text = text.replace("@SINKS@", sinks)
    text = b.fill(text, {"WORK": work, "NAME": name, "PORT": PORTS[name],
                         "UPSTREAM": b.PORTS["upstream"]})
    (work / name).mkdir(exist_ok=True)
    cfg = work / f"wraith-{name}.toml"
    cfg.write_text(text)
    env = dict(os.environ, WRAITH_LOG="warn")
    pid = procs.start(f"wraith-{name}", [wraith_bin, "serve", "-c", str(cfg)], 1, env=env, cwd=work).pid
    b.wait_port(PORTS[name])
    return pid


def run(args):
    work = Path(tempfile.mkdtemp(prefix="wraith-bench-logging-"))
    text = (ROOT / "bench" / "configs" / "upstream-nginx.conf").read_text()
    text = text.replace("@WORK@", str(work)).replace("@UPSTREAM@", str(b.PORTS["upstream"]))
    (work / "upstream-nginx.conf").write_text(text)
    (work / "www").mkdir(exist_ok=True)
    b.link_policies(work)
    procs = b.Procs()
    try:
        up = procs.start("upstream", ["nginx", "-c", str(work / "upstream-nginx.conf"), "-g", "daemon off;"], 0, cwd=work).pid
        b.wait_port(b.PORTS["upstream"])
        pids = {"off": start_wraith(procs, work, args.wraith, "off", ""),
                "on": start_wraith(procs, work, args.wraith, "on", SINKS)}
        rounds = []
        for r in range(args.rounds):
            order = ["off", "on"] if r % 2 == 0 else ["on", "off"]
            rnd = {}
            for n in order:
                url = f"http://127.0.0.1:{PORTS[n]}/small"
                t0 = thread_ticks(pids[n])
                res = b.run_gated(n, b.wrk_cmd(url, args.conns, args.duration),
                                  {"proxy": pids[n], "upstream": up}, b.parse_wrk, args.gate,
                                  b.wrk_cmd(url, args.conns, 1))
                t1 = thread_ticks(pids[n])
                # Thread split over the whole gated measurement (warm-up runs included on
                # both sides, so it is a ratio of the same work).
                writer = sum(t1.get(k, 0) - t0.get(k, 0) for k in t1 if k.startswith("wraith-log"))
                total = sum(t1.values()) - sum(t0.values())
                res["writer_share"] = writer / total if total else 0.0
                rnd[n] = res
                b.log(f"  round {r} {n:4s} {res['rps']:9.0f} rps  {res['proxy_cpu_us_per_req']:6.2f} µs/req  "
                      f"writers {res['writer_share']*100:4.1f}%  errors {res['errors']}  foreign {res['foreign_cpu_s']:.2f}s")
            rounds.append(rnd)
        delta = [rd["on"]["proxy_cpu_us_per_req"] - rd["off"]["proxy_cpu_us_per_req"] for rd in rounds]
        request_thread_delta = [
            rd["on"]["proxy_cpu_us_per_req"] * (1 - rd["on"]["writer_share"]) - rd["off"]["proxy_cpu_us_per_req"]
            for rd in rounds]
        # Saturation: B alone, longer, then the SQLite sink's counts.
        sock = str(work / "on.sock")
        before = admin_metrics(sock)
        sat, _ = b.measure(b.wrk_cmd(f"http://127.0.0.1:{PORTS['on']}/small", args.conns, args.saturation),
                           {"proxy": pids["on"], "upstream": up}, b.parse_wrk)
        after = admin_metrics(sock)
        written = metric(after, "wraith_log_records_written_total", "sqlite") - metric(before, "wraith_log_records_written_total", "sqlite")
        dropped = metric(after, "wraith_log_records_dropped_total", "sqlite") - metric(before, "wraith_log_records_dropped_total", "sqlite")
        result = {
            "rounds": rounds,
            "cpu_us_per_req_off_median": statistics.median(rd["off"]["proxy_cpu_us_per_req"] for rd in rounds),
            "cpu_us_per_req_on_median": statistics.median(rd["on"]["proxy_cpu_us_per_req"] for rd in rounds),
            "delta_us_median": statistics.median(delta), "delta_us_range": [min(delta), max(delta)],
            "request_thread_delta_us_median": statistics.median(request_thread_delta),
            "saturation": {"rps": sat["rps"], "requests": sat["requests"], "sqlite_written": written,
                           "sqlite_dropped": dropped, "cpu_busy": sat["cpu_busy"]},
        }
        return result
    finally:
        procs.stop()


def markdown(r, args):
    s = r["saturation"]
    return "\n".join([
        f"### Access-log cost ({args.rounds} ABBA rounds, wrk -t1 -c{args.conns} -d{args.duration}s, /small)\n",
        "| | CPU µs/req (median) |",
        "|---|---|",
        f"| logging off | {r['cpu_us_per_req_off_median']:.2f} |",
        f"| JSON + combined + SQLite | {r['cpu_us_per_req_on_median']:.2f} |",
        f"| difference (whole process) | {r['delta_us_median']:.2f} ({r['delta_us_range'][0]:.2f}–{r['delta_us_range'][1]:.2f}) |",
        f"| difference (request thread only) | {r['request_thread_delta_us_median']:.2f} |",
        "",
        f"SQLite at saturation ({args.saturation}s): {s['rps']:.0f} req/s, {s['sqlite_written']:.0f} rows written, "
        f"{s['sqlite_dropped']:.0f} dropped; CPU busy {['%.0f%%' % (x * 100) for x in s['cpu_busy']]}.",
    ])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--duration", type=int, default=5)
    ap.add_argument("--saturation", type=int, default=15, help="seconds of the SQLite keep-up run")
    ap.add_argument("--conns", type=int, default=50)
    ap.add_argument("--gate", type=float, default=0.5)
    ap.add_argument("--wraith", default=str(ROOT / "target" / "release" / "wraith"))
    ap.add_argument("--json")
    ap.add_argument("--markdown")
    args = ap.parse_args()
    r = run(args)
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=2))
    md = markdown(r, args)
    print(md)
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(md + "\n")


if __name__ == "__main__":
    main()
