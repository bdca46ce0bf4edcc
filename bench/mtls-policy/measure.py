#!/usr/bin/env python3
"""Run a load command while sampling the CPU time of server PIDs; print CPU per operation.

    measure.py --pids 123,456 --ops wrk -- taskset -c 0 wrk -t1 -c50 -d5s URL
    measure.py --pids 123 --ops s_time -- sh -c 'openssl s_time ... & ...; wait'

--ops says how to count operations in the command's output: "wrk" (total requests) or
"s_time" (the sum of "N connections in" lines). Output: one JSON line with ops, the CPU
seconds of each PID (utime+stime of all threads, from /proc/PID/stat), the client's CPU,
the foreign CPU (other tenants; reject the run above 0.5 s) and CPU-us per op of the first
PID.
"""
import argparse
import json
import os
import re
import resource
import subprocess
import sys

CLK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # utime and stime are fields 14 and 15 (1-based); after the ")" split they are 11 and 12.
    return (int(fields[11]) + int(fields[12])) / CLK


def busy_seconds():
    """CPU time spent busy on the whole machine (all CPUs), from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    return (sum(v[:8]) - idle) / CLK


def count_ops(kind, out):
    if kind == "wrk":
        m = re.search(r"(\d+) requests in", out)
        return int(m.group(1)) if m else 0
    if kind == "s_time":
        return sum(int(n) for n in re.findall(r"(\d+) connections in", out))
    raise SystemExit(f"unknown --ops {kind}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pids", required=True)
    ap.add_argument("--ops", required=True, choices=["wrk", "s_time"])
    ap.add_argument("--label", default="")
    ap.add_argument("cmd", nargs=argparse.REMAINDER)
    a = ap.parse_args()
    cmd = a.cmd[1:] if a.cmd and a.cmd[0] == "--" else a.cmd
    pids = [int(p) for p in a.pids.split(",") if p]
    before = {p: cpu_seconds(p) for p in pids}
    busy0 = busy_seconds()
    child0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(cmd, capture_output=True, text=True).stdout
    child1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    busy1 = busy_seconds()
    after = {p: cpu_seconds(p) for p in pids}
    client = (child1.ru_utime + child1.ru_stime) - (child0.ru_utime + child0.ru_stime)
    ours = sum(after[p] - before[p] for p in pids)
    # Work on this machine that was neither the servers nor the client: reject runs where
    # it is above ~0.5 CPU-s (benchmarking notes, 4.2).
    foreign = max(0.0, (busy1 - busy0) - ours - client)
    ops = count_ops(a.ops, out)
    cpu = {str(p): round(after[p] - before[p], 3) for p in pids}
    first = pids[0]
    per_op = (after[first] - before[first]) / ops * 1e6 if ops else None
    print(json.dumps({"label": a.label, "ops": ops, "cpu_s": cpu,
                      "client_cpu_s": round(client, 3), "foreign_cpu_s": round(foreign, 3),
                      "cpu_us_per_op": round(per_op, 2) if per_op is not None else None}))
    if not ops:
        sys.stderr.write(out)
        sys.exit(1)


if __name__ == "__main__":
    main()
