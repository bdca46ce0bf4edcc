#!/usr/bin/env python3
"""System calls per request, for each proxy, in the bench.py layout.

Most of a small-response proxy's CPU is in the kernel (loopback sends and receives, waking the
peer), so the number of system calls per request is the first thing to compare. strace slows the
traced process down a lot; the counts per request are what matter, not the throughput.

Usage:
  python3 bench/syscalls.py [--scenario h1|tls] [--duration 3] [--conns 50]
"""

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402


def strace_counts(pid, cmd):
    """Runs `cmd` on CPU 0 while counting the system calls of `pid` (all threads)."""
    with tempfile.NamedTemporaryFile("r", suffix=".strace") as f:
        tracer = subprocess.Popen(["strace", "-c", "-f", "-q", "-o", f.name, "-p", str(pid)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)
        out = subprocess.run(["taskset", "-c", "0"] + cmd, capture_output=True, text=True).stdout
        tracer.send_signal(2)
        tracer.wait(timeout=20)
        counts = {}
        for line in Path(f.name).read_text().splitlines():
            parts = line.split()
            # % time, seconds, usecs/call, calls, [errors], syscall
            if len(parts) >= 5 and re.match(r"^[\d.]+$", parts[0]) and parts[-1] != "total":
                errors = int(parts[4]) if len(parts) == 6 else 0
                counts[parts[-1]] = (int(parts[3]), errors)
    reqs, _, _ = bench.parse_wrk(out)
    return reqs, counts


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenario", default="h1", choices=list(bench.SCENARIOS))
    ap.add_argument("--duration", type=int, default=3)
    ap.add_argument("--conns", type=int, default=50)
    ap.add_argument("--wraith", default=str(bench.ROOT / "target" / "release" / "wraith"))
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="wraith-syscalls-"))
    procs, pids = bench.setup(work, args.wraith)
    try:
        table = {}
        for name, (port_key, scheme) in bench.SCENARIOS[args.scenario].items():
            url = bench.url_for(port_key, scheme)
            subprocess.run(["taskset", "-c", "0"] + bench.wrk_cmd(url, args.conns, 1), capture_output=True)
            reqs, counts = strace_counts(pids[name], bench.wrk_cmd(url, args.conns, args.duration))
            table[name] = (reqs, counts)
        names = sorted({s for _, c in table.values() for s in c},
                       key=lambda s: -max(c.get(s, (0, 0))[0] / max(1, r) for r, c in table.values()))
        print(f"system calls per request, scenario {args.scenario}, wrk -t1 -c{args.conns} -d{args.duration}s under strace -c -f")
        print(f"{'syscall':22s}" + "".join(f"{n:>12s}" for n in table))
        for s in names:
            row = []
            for r, c in table.values():
                calls, errors = c.get(s, (0, 0))
                row.append(f"{calls / max(1, r):8.2f}" + (f"({errors / max(1, r):.1f}e)" if errors else "    "))
            print(f"{s:22s}" + "".join(f"{x:>12s}" for x in row))
        print(f"{'total':22s}" + "".join(
            f"{sum(v[0] for v in c.values()) / max(1, r):8.2f}    " for r, c in table.values()))
        print(f"{'requests traced':22s}" + "".join(f"{r:8d}    " for r, _ in table.values()))
    finally:
        procs.stop()


if __name__ == "__main__":
    main()
