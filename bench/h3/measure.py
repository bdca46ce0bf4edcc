#!/usr/bin/env python3
"""Run h3load while sampling the CPU time of server PIDs; print CPU per operation and per GiB.

    measure.py --label h3-small --pids 123,456 -- taskset -c 0 h3load --addr ... --duration 5

The command must print h3load's JSON line (ops, bytes, errors, ...). Output: that line plus
the CPU seconds of each PID (utime+stime of all threads, /proc/PID/stat), the foreign CPU
(other tenants: reject the run above 0.5 s, benchmarking notes 4.2), and for the first PID:
CPU-us per operation and CPU-ms per GiB moved.
"""
import argparse
import json
import os
import resource
import subprocess
import sys

CLK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK


def busy_seconds():
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    return (sum(v[:8]) - idle) / CLK


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pids", required=True)
    ap.add_argument("--label", default="")
    ap.add_argument("cmd", nargs=argparse.REMAINDER)
    a = ap.parse_args()
    cmd = a.cmd[1:] if a.cmd and a.cmd[0] == "--" else a.cmd
    pids = [int(p) for p in a.pids.split(",") if p]
    before = {p: cpu_seconds(p) for p in pids}
    busy0 = busy_seconds()
    child0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    child1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    busy1 = busy_seconds()
    after = {p: cpu_seconds(p) for p in pids}
    client = (child1.ru_utime + child1.ru_stime) - (child0.ru_utime + child0.ru_stime)
    ours = sum(after[p] - before[p] for p in pids)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    if not lines:
        sys.stderr.write(proc.stdout + proc.stderr)
        sys.exit(1)
    run = json.loads(lines[-1])
    first = pids[0]
    cpu_first = after[first] - before[first]
    run.update({
        "label": a.label,
        "cpu_s": {str(p): round(after[p] - before[p], 3) for p in pids},
        "client_cpu_s": round(client, 3),
        "foreign_cpu_s": round(max(0.0, (busy1 - busy0) - ours - client), 3),
        "cpu_us_per_op": round(cpu_first / run["ops"] * 1e6, 2) if run["ops"] else None,
        "cpu_ms_per_gib": round(cpu_first / (run["bytes"] / 2**30) * 1e3, 1) if run["bytes"] else None,
    })
    print(json.dumps(run))
    if not run["ops"] or run["errors"]:
        sys.stderr.write(proc.stderr)


if __name__ == "__main__":
    main()
