#!/usr/bin/env python3
"""User-space instructions per request, counted by valgrind's callgrind: deterministic (the
same binary and load give the same count whatever else the machine is doing), so small
changes to the hot path can be compared without ABBA rounds. It counts user-space work only:
system calls and the kernel's TCP work are not in it (bench.py's CPU time has them).

Each proxy runs under callgrind with instrumentation off; after a warm-up it is switched on
(`callgrind_control -i on`), a fixed number of requests is sent with h2load, and the counters
are dumped. Instructions per request = Ir of the measured window / requests.

Usage (release build first):
  python3 bench/instructions.py                  # wraith and nginx, h1, 20000 requests
  python3 bench/instructions.py --only wraith --requests 50000 --annotate 30
  python3 bench/instructions.py --only wraith --logging     # + JSON, combined and SQLite sinks
  python3 bench/instructions.py --lb                        # each balancing algorithm, nginx least_conn
  python3 bench/instructions.py --body 1024                 # POST requests with a 1 KiB body
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench as b  # noqa: E402

ROOT = b.ROOT


LOG_SINKS = """
[log.json]
path = "@WORK@/access.json"
[log.combined]
path = "@WORK@/access.log"
vhost = true
[log.sqlite]
path = "@WORK@/access.db"
"""


def callgrind(name, cmd, out, cwd, env=None):
    full = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}",
            "--dump-instr=no", "--trace-children=no"] + cmd
    return subprocess.Popen(full, cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                            stderr=open(Path(cwd) / f"{name}.valgrind.log", "w"))


def control(pid, *args):
    subprocess.run(["callgrind_control", *args, str(pid)], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def h2load(url, n, conns, data=None):
    """`data`: a file whose bytes each request POSTs (with a Content-Length)."""
    cmd = ["h2load", "--h1", "-n", str(n), "-c", str(conns)]
    if data:
        cmd += ["-d", str(data)]
    out = subprocess.run(cmd + [url], capture_output=True, text=True, timeout=600).stdout
    m = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded", out)
    if not m:
        raise RuntimeError(f"h2load output not understood:\n{out}")
    return int(m.group(2))


def dump_ir(path):
    """The total of one callgrind dump file (`summary:` is 0 after `callgrind_control -z`;
    `totals:` has the count)."""
    total = 0
    for line in Path(path).read_text(errors="replace").splitlines():
        if line.startswith("summary:") or line.startswith("totals:"):
            total = max(total, int(line.split()[1]))
    return total


def measure(name, cmd, port, work, requests, conns, env=None, paths=("/small",), data=None):
    """Instructions per request for each of `paths`, one callgrind dump per path (the
    counters are zeroed between them); returns ({path: instructions per request}, dump file
    of the last path)."""
    out = work / f"{name}.callgrind.out"
    p = callgrind(name, cmd, out, work, env)
    per_path = {}
    last = None
    try:
        b.wait_port(port, timeout=120)
        for path in paths:
            url = f"http://127.0.0.1:{port}{path}"
            h2load(url, 2000, conns, data)  # warm-up: pools, caches, lazy initialisation
            before = set(Path(out).parent.glob(Path(out).name + "*"))
            control(p.pid, "-z")
            control(p.pid, "-i", "on")
            done = h2load(url, requests, conns, data)
            control(p.pid, "-i", "off")
            control(p.pid, "-d")
            new = []
            for _ in range(60):
                new = sorted(set(Path(out).parent.glob(Path(out).name + "*")) - before)
                if new and dump_ir(new[-1]):
                    break
                time.sleep(0.5)
            if not new:
                raise RuntimeError(f"callgrind wrote no dump for {name} {path}")
            last = new[-1]
            per_path[path] = dump_ir(last) / done
    finally:
        p.terminate()
        try:
            p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            p.kill()
    return per_path, last


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--conns", type=int, default=10)
    ap.add_argument("--only", choices=["wraith", "nginx"])
    ap.add_argument("--wraith", default=str(ROOT / "target" / "release" / "wraith"))
    ap.add_argument("--config", default=str(ROOT / "bench" / "configs" / "wraith.toml"),
                    help="the Wraith config template (bench placeholders)")
    ap.add_argument("--annotate", type=int, default=0, help="print the top N functions of Wraith")
    ap.add_argument("--logging", action="store_true",
                    help="turn on the JSON, combined and SQLite access-log sinks (callgrind counts "
                         "the writer threads too)")
    ap.add_argument("--body", type=int, default=0, metavar="BYTES",
                    help="POST a body of BYTES with each request (Content-Length; the upstream "
                         "answers /small as for a GET)")
    ap.add_argument("--lb", action="store_true",
                    help="the load-balancing set-up (bench/configs/lb: four endpoints): Wraith "
                         "once per algorithm, nginx with least_conn")
    args = ap.parse_args()
    if args.lb:
        return main_lb(args)

    work = Path(tempfile.mkdtemp(prefix="wraith-instr-"))
    certs = work / "certs"
    subprocess.run([args.wraith, "certs", "init", "--dir", str(certs), "--force"], check=True,
                   stdout=subprocess.DEVNULL)
    subst = {"WORK": str(work), "CERTS": str(certs),
             **{k.upper().replace("-", "_"): str(v) for k, v in b.PORTS.items()}}
    for name, src in [("upstream-nginx.conf", ROOT / "bench/configs/upstream-nginx.conf"),
                      ("nginx-proxy.conf", ROOT / "bench/configs/nginx-proxy.conf"),
                      ("wraith.toml", Path(args.config))]:
        text = src.read_text()
        if name == "wraith.toml" and args.logging:
            text += LOG_SINKS
        (work / name).write_text(b.fill(text, subst))
    (work / "www").mkdir(exist_ok=True)
    b.link_policies(work)

    data = None
    if args.body:
        data = work / "body"
        data.write_bytes(os.urandom(args.body))
    procs = b.Procs()
    results = {}
    try:
        procs.start("upstream", ["nginx", "-c", str(work / "upstream-nginx.conf"), "-g", "daemon off;"], 0, cwd=work)
        b.wait_port(b.PORTS["upstream"])
        if args.only in (None, "wraith"):
            env = dict(os.environ, WRAITH_LOG="warn")
            results["wraith"] = measure("wraith", [args.wraith, "serve", "-c", str(work / "wraith.toml")],
                                        b.PORTS["wraith"], work, args.requests, args.conns, env, data=data)
        if args.only in (None, "nginx"):
            results["nginx"] = measure("nginx", ["nginx", "-c", str(work / "nginx-proxy.conf"), "-g", "daemon off;"],
                                       b.PORTS["nginx"], work, args.requests, args.conns, data=data)
    finally:
        procs.stop()

    results = {name: (per_path["/small"], dump) for name, (per_path, dump) in results.items()}
    for name, (ipr, _) in results.items():
        body = f", {args.body}-byte POST bodies" if args.body else ""
        print(f"{name}: {ipr:,.0f} instructions per request (user space, {args.requests} requests, h1 keep-alive{body})")
    if "wraith" in results and "nginx" in results:
        print(f"wraith / nginx: {results['wraith'][0] / results['nginx'][0]:.2f}")
    if args.annotate and "wraith" in results:
        annotate(results["wraith"][1], args.annotate)


def annotate(dump, n):
    text = subprocess.run(["callgrind_annotate", "--inclusive=no", str(dump)],
                          capture_output=True, text=True).stdout
    lines = [l for l in text.splitlines() if re.match(r"\s*[\d,]+ \(", l)]
    print("\n".join(lines[: n + 1]))


def main_lb(args):
    """Instructions per request of each balancing algorithm (and of nginx's least_conn) over
    the four endpoints of bench/configs/lb, same request, same upstream."""
    import lb
    work = Path(tempfile.mkdtemp(prefix="wraith-instr-lb-"))
    subst = {"WORK": str(work), **{k: str(v) for k, v in lb.PORTS.items()}}
    for name in ["upstream-nginx.conf", "wraith.toml", "nginx-proxy.conf"]:
        (work / name).write_text(b.fill((ROOT / "bench" / "configs" / "lb" / name).read_text(), subst))
    (work / "www").mkdir(exist_ok=True)
    b.link_policies(work)
    procs = b.Procs()
    try:
        procs.start("lb-upstream", ["nginx", "-c", str(work / "upstream-nginx.conf"), "-g", "daemon off;"], 0, cwd=work)
        for k in ["UP0", "UP1", "UP2", "UP3"]:
            b.wait_port(lb.PORTS[k])
        env = dict(os.environ, WRAITH_LOG="warn")
        paths = list(lb.ALGORITHMS.values())
        wraith, dump = measure("wraith", [args.wraith, "serve", "-c", str(work / "wraith.toml")],
                               lb.PORTS["WRAITH"], work, args.requests, args.conns, env, paths)
        nginx, _ = measure("nginx", ["nginx", "-c", str(work / "nginx-proxy.conf"), "-g", "daemon off;"],
                           lb.PORTS["NGINX"], work, args.requests, args.conns)
    finally:
        procs.stop()
    rr = wraith[lb.ALGORITHMS["round_robin"]]
    print(f"| algorithm | instructions per request | vs round_robin |")
    print(f"|---|---|---|")
    for algo, path in lb.ALGORITHMS.items():
        print(f"| {algo} | {wraith[path]:,.0f} | {wraith[path] / rr:.3f} |")
    ng = nginx["/small"]
    print(f"| nginx least_conn | {ng:,.0f} | wraith least_connections / nginx: "
          f"{wraith[lb.ALGORITHMS['least_connections']] / ng:.2f} |")
    if args.annotate:
        annotate(dump, args.annotate)


if __name__ == "__main__":
    main()
