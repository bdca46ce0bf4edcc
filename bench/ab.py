#!/usr/bin/env python3
"""Two Wraith builds against each other, in the same run: CPU time per request, ABBA rounds.

For a change whose effect is a few percent of CPU time: this VM's speed drifts by more than
that between two bench.py runs, so both builds are measured alternately, in one run, on the
same upstream, in bench.py's layout (upstream nginx on CPU 0 with the client, each Wraith
pinned to CPU 1 with one worker; only one of them is loaded at a time).

Usage:
  cp target/release/wraith /tmp/wraith-before     # build A
  ... change, cargo build --release ...           # build B
  python3 bench/ab.py /tmp/wraith-before target/release/wraith --rounds 8
"""

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench as b  # noqa: E402

PORTS = {"a": (18185, 18545), "b": (18186, 18546)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a", help="the first Wraith binary")
    ap.add_argument("b", help="the second Wraith binary")
    ap.add_argument("--scenario", default="h1", choices=["h1", "tls"])
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--duration", type=int, default=5)
    ap.add_argument("--conns", type=int, default=50)
    ap.add_argument("--gate", type=float, default=0.5, help="max foreign CPU-seconds per run")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="wraith-ab-"))
    certs = work / "certs"
    subprocess.run([args.a, "certs", "init", "--dir", str(certs), "--force"], check=True,
                   stdout=subprocess.DEVNULL)
    subst = {"WORK": str(work), "CERTS": str(certs), "UPSTREAM": str(b.PORTS["upstream"])}
    (work / "upstream-nginx.conf").write_text(
        b.fill((b.ROOT / "bench" / "configs" / "upstream-nginx.conf").read_text(), subst))
    (work / "www").mkdir()
    procs = b.Procs()
    try:
        for port in [b.PORTS["upstream"], *PORTS["a"], *PORTS["b"]]:
            if not b.port_free(port):
                sys.exit(f"port {port} is in use (a stray peer from an earlier run?)")
        pids = {"upstream": procs.start("upstream", ["nginx", "-c", str(work / "upstream-nginx.conf"),
                                                     "-g", "daemon off;"], 0, cwd=work).pid}
        b.wait_port(b.PORTS["upstream"])
        for name, binary in [("a", args.a), ("b", args.b)]:
            # Each in its own directory: the admin socket and pid file are relative paths.
            home = work / name
            home.mkdir()
            plain, tls = PORTS[name]
            cfg = b.fill((b.ROOT / "bench" / "configs" / "wraith.toml").read_text(),
                         {**subst, "WRAITH": str(plain), "WRAITH_TLS": str(tls)})
            (home / "wraith.toml").write_text(cfg)
            b.link_policies(home)
            env = dict(b.os.environ, WRAITH_LOG="warn")
            pids[name] = procs.start(name, [binary, "serve", "-c", str(home / "wraith.toml")], 1,
                                     env=env, cwd=home).pid
            b.wait_port(plain)
            b.wait_port(tls)

        cpu = {"a": [], "b": []}
        for r in range(args.rounds):
            order = ["a", "b"] if r % 2 == 0 else ["b", "a"]
            for name in order:
                plain, tls = PORTS[name]
                url = f"http://127.0.0.1:{plain}/small" if args.scenario == "h1" \
                    else f"https://localhost:{tls}/small"
                cmd = b.wrk_cmd(url, args.conns, args.duration)
                res = b.run_gated(name, cmd, {"proxy": pids[name], "upstream": pids["upstream"]},
                                  b.parse_wrk, args.gate, b.wrk_cmd(url, args.conns, 1))
                cpu[name].append(res["proxy_cpu_us_per_req"])
                b.log(f"  round {r} {name}  {res['rps']:9.0f} rps  {res['proxy_cpu_us_per_req']:6.2f} µs/req"
                      f"  errors {res['errors']}  foreign {res['foreign_cpu_s']:.2f}s")
        ratios = [y / x for x, y in zip(cpu["a"], cpu["b"])]
        print(f"a: {args.a}\n  CPU µs/req median {statistics.median(cpu['a']):.2f}  {[round(x, 2) for x in cpu['a']]}")
        print(f"b: {args.b}\n  CPU µs/req median {statistics.median(cpu['b']):.2f}  {[round(x, 2) for x in cpu['b']]}")
        print(f"b/a per round: median {statistics.median(ratios):.3f}  range {min(ratios):.3f}-{max(ratios):.3f}")
    finally:
        procs.stop()


if __name__ == "__main__":
    main()
