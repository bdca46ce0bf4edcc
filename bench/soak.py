#!/usr/bin/env python3
"""Soak: does Wraith's memory stay flat under hostile variety for a long time?

Wraith (release build, one worker thread) runs in front of an nginx upstream with the state
that grows with what clients send switched on: per-address and per-header rate limits,
per-client connection counts, the JSON and SQLite access logs (SQLite with a row cap), the
metrics registry and the status window. Clients come from ever new addresses (127.0.0.0/8
gives 16 million), with random paths, query strings, header values and user agents, some for
routes that do not exist, some refused by a rate limit; every `--reload-every` seconds the
configuration is reloaded, alternating between two versions (a route and an upstream added
and removed, so their metric series come and go). The gateway's resident memory, open
descriptors and threads are sampled every few seconds.

What it reports: the samples (one a minute), the resident memory at the end of the warm-up
and at the end, and the slope of a least-squares line through the second half. A leak shows
as a slope that does not go to zero while the tables it could fill are capped; a flat line
after the caches and tables have reached their steady size is the expected result.

Usage (release build first):
  python3 bench/soak.py --minutes 10
  python3 bench/soak.py --minutes 2 --wraith /tmp/wraith   # a quick look
"""

import sys
from pathlib import Path

# bench/logging.py would shadow the standard library's `logging` (asyncio imports it): the
# standard modules are imported with this directory off the path.
HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]

import argparse  # noqa: E402
import asyncio  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

sys.path.insert(0, str(HERE))
import bench as b  # noqa: E402

ROOT = b.ROOT

UPSTREAM_CONF = """
worker_processes 1;
master_process off;
pid @WORK@/upstream.pid;
error_log @WORK@/upstream-error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    keepalive_requests 10000000;
    keepalive_timeout 300s;
    server {
        listen 127.0.0.1:@UPSTREAM@ backlog=4096;
        location / { return 200 "hello, world\\n"; }
    }
}
"""

WRAITH_CONF = """
[server]
worker_threads = 1
log_level = "warn"
pid_file = "@WORK@/wraith.pid"
admin_socket = "@WORK@/admin.sock"

[[listener]]
name = "plain"
address = "127.0.0.1:@WRAITH@"
protocol = "http"
limits = { max_connections_per_client = 8, idle_timeout = "5s" }

[[listener]]
name = "tls"
address = "127.0.0.1:@WRAITH_TLS@"
protocol = "https"
tls = { cert = "@WORK@/certs/server.pem", key = "@WORK@/certs/server-key.pem" }
limits = { idle_timeout = "5s" }
http3 = true

[metrics]
address = "127.0.0.1:@METRICS@"

[[upstream]]
name = "up"
endpoints = ["127.0.0.1:@UPSTREAM@"]

# One unconditional permit (bench/configs/policies): decided at load, no Cedar call.
[policy]

[rate_limit]
limits = [
  { name = "per-ip", key = "ip", rate = "20/s", burst = 10 },
  { name = "per-client-id", key = "header", header = "x-client-id", rate = "5/s", burst = 3 },
]
max_keys = 50000
cleanup_interval = "10s"

[log.json]
path = "@WORK@/access.json"

[log.sqlite]
path = "@WORK@/access.db"
max_rows = 200000

[[route]]
name = "api"
path = { prefix = "/api/" }
upstream = "up"

# The HTTP/2 churn (one client address): not rate limited.
[[route]]
name = "h2"
path = { prefix = "/h2/" }
upstream = "up"
rate_limits = []
"""

# The second version adds a route to a second upstream (same nginx, another name).
EXTRA = """
[[upstream]]
name = "up-b"
endpoints = ["127.0.0.1:@UPSTREAM@"]

[[route]]
name = "b"
path = { prefix = "/b/" }
upstream = "up-b"
"""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sample(pid):
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(l.split(":", 1) for l in status.splitlines() if ":" in l)
    kib = lambda k: int(fields[k].split()[0])
    return {
        "rss_kib": kib("VmRSS"),
        "hwm_kib": kib("VmHWM"),
        "threads": int(fields["Threads"]),
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
    }


def rand_token(n):
    return "".join(random.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(n))


class Load:
    def __init__(self, port):
        self.port = port
        self.requests = 0
        self.statuses = {}
        self.errors = 0
        self.stop = False

    async def client(self):
        """One client after another, each from a new address, a few requests each."""
        while not self.stop:
            ip = f"127.{random.randint(1, 254)}.{random.randint(0, 255)}.{random.randint(1, 254)}"
            try:
                sock = socket.socket()
                sock.setblocking(False)
                sock.bind((ip, 0))
                await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", self.port))
                reader, writer = await asyncio.open_connection(sock=sock)
            except OSError:
                self.errors += 1
                await asyncio.sleep(0.01)
                continue
            try:
                for _ in range(random.randint(1, 4)):
                    prefix = random.choice(["/api/", "/api/", "/api/", "/b/", "/nowhere/"])
                    path = f"{prefix}{rand_token(random.randint(1, 40))}?q={rand_token(8)}"
                    headers = [
                        f"GET {path} HTTP/1.1",
                        "Host: soak.example",
                        f"User-Agent: soak/{rand_token(12)}",
                        f"Referer: https://{rand_token(6)}.example/{rand_token(10)}",
                    ]
                    if random.random() < 0.5:
                        headers.append(f"X-Client-Id: {rand_token(16)}")
                    writer.write(("\r\n".join(headers) + "\r\n\r\n").encode())
                    await writer.drain()
                    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
                    lines = head.decode("latin-1").split("\r\n")
                    status = int(lines[0].split()[1])
                    length = 0
                    for l in lines[1:]:
                        if l.lower().startswith("content-length:"):
                            length = int(l.split(":", 1)[1])
                    if length:
                        await asyncio.wait_for(reader.readexactly(length), 10)
                    self.requests += 1
                    self.statuses[status] = self.statuses.get(status, 0) + 1
                    if any(l.lower() == "connection: close" for l in lines):
                        break
            except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError, IndexError):
                self.errors += 1
            finally:
                writer.close()


def h2_churn(port, stop, counts):
    """HTTP/2 over TLS beside the HTTP/1.1 clients: h2load runs one after another, each
    making 50 connections (a full TLS 1.3 handshake each) of 20 requests, 4 streams at a time,
    10 requests a second per connection."""
    while not stop.is_set():
        out = subprocess.run(["h2load", "-n", "1000", "-c", "50", "-m", "4", "--rps", "10",
                              f"https://127.0.0.1:{port}/h2/churn"],
                             capture_output=True, text=True, timeout=120).stdout
        for line in out.splitlines():
            if line.startswith("requests:"):
                # requests: 1000 total, 1000 started, 1000 done, 1000 succeeded, 0 failed, ...
                parts = line.replace(",", "").split()
                counts["h2"] += int(parts[7])
                counts["h2_failed"] += int(parts[9])


def h3_churn(h3load, port, ca, stop, counts):
    """HTTP/3 beside the rest: h3load's handshake mode, 4 loops each making QUIC connections
    (a full handshake, X25519MLKEM768) with one request each, in 10-second runs."""
    while not stop.is_set():
        out = subprocess.run([h3load, "--addr", f"127.0.0.1:{port}", "--ca", str(ca), "--path", "/h2/h3",
                              "--handshakes", "--conns", "4", "--duration", "10"],
                             capture_output=True, text=True, timeout=120).stdout
        for line in out.splitlines():
            if line.startswith("{"):
                r = json.loads(line)
                counts["h3"] += r.get("ops", 0)
                counts["h3_failed"] += r.get("errors", 0)


async def run(args, work, ports, wraith_pid):
    import threading
    load = Load(ports["WRAITH"])
    tasks = [asyncio.create_task(load.client()) for _ in range(args.clients)]
    churn_stop = threading.Event()
    load.h2 = {"h2": 0, "h2_failed": 0}
    churn = threading.Thread(target=h2_churn, args=(ports["WRAITH_TLS"], churn_stop, load.h2))
    if args.h2:
        churn.start()
    load.h3 = {"h3": 0, "h3_failed": 0}
    h3 = threading.Thread(target=h3_churn, args=(args.h3load, ports["WRAITH_TLS"], work / "certs" / "ca.pem",
                                                 churn_stop, load.h3))
    if args.h3load:
        h3.start()
    conf = work / "wraith.toml"
    base = conf.read_text()
    start = time.time()
    samples = []
    next_reload = start + args.reload_every
    reloads = 0
    extra = b.fill(EXTRA, {k: str(v) for k, v in ports.items()})
    try:
        while time.time() - start < args.minutes * 60:
            await asyncio.sleep(args.sample_every)
            now = time.time()
            if now >= next_reload:
                reloads += 1
                conf.write_text(base + (extra if reloads % 2 else ""))
                os.kill(wraith_pid, signal.SIGHUP)
                next_reload = now + args.reload_every
            s = sample(wraith_pid)
            s.update(t=now - start, requests=load.requests, errors=load.errors)
            samples.append(s)
            b.log(f"{s['t']:7.0f}s  rss {s['rss_kib'] / 1024:7.1f} MiB  fds {s['fds']:5}  "
                  f"threads {s['threads']:3}  requests {load.requests:9,}  errors {load.errors}  "
                  f"h2 {load.h2['h2']:,} ({load.h2['h2_failed']} failed)  "
                  f"h3 {load.h3['h3']:,} ({load.h3['h3_failed']} failed)")
    finally:
        load.stop = True
        churn_stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        for t in (churn, h3):
            if t.is_alive():
                t.join()
    return samples, load, reloads


def slope(points):
    """Least-squares slope of (x, y) points."""
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / sxx if sxx else 0.0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--warmup", type=float, default=2, help="minutes before the memory is judged")
    ap.add_argument("--clients", type=int, default=64, help="concurrent client loops")
    ap.add_argument("--reload-every", type=float, default=20, help="seconds between reloads")
    ap.add_argument("--sample-every", type=float, default=5)
    ap.add_argument("--no-h2", dest="h2", action="store_false",
                    help="leave out the HTTP/2-over-TLS connection churn (h2load)")
    ap.add_argument("--wraith", default=str(ROOT / "target" / "release" / "wraith"))
    ap.add_argument("--h3load", default=str(ROOT / "target" / "release" / "examples" / "h3load"),
                    help="bench/h3's client (`cargo build --release --example h3load`) for the HTTP/3 "
                         "handshake churn; left out if it is not there")
    ap.add_argument("--markdown", help="append the result as a Markdown section to this file")
    args = ap.parse_args()
    if args.h3load and not Path(args.h3load).exists():
        b.log(f"no {args.h3load}: no HTTP/3 churn (cargo build --release --example h3load)")
        args.h3load = None

    work = Path(tempfile.mkdtemp(prefix="wraith-soak-"))
    ports = {"WORK": str(work), "UPSTREAM": free_port(), "WRAITH": free_port(),
             "WRAITH_TLS": free_port(), "METRICS": free_port()}
    subprocess.run([args.wraith, "certs", "init", "--dir", str(work / "certs"), "--force"], check=True,
                   stdout=subprocess.DEVNULL)
    (work / "upstream-nginx.conf").write_text(b.fill(UPSTREAM_CONF, ports))
    (work / "wraith.toml").write_text(b.fill(WRAITH_CONF, ports))
    b.link_policies(work)
    procs = b.Procs()
    try:
        procs.start("upstream", ["nginx", "-c", str(work / "upstream-nginx.conf"), "-g", "daemon off;"], 0, cwd=work)
        b.wait_port(ports["UPSTREAM"])
        env = dict(os.environ, WRAITH_LOG="warn")
        wraith = procs.start("wraith", [args.wraith, "serve", "-c", str(work / "wraith.toml")], 1, env=env, cwd=work)
        b.wait_port(ports["WRAITH"])
        samples, load, reloads = asyncio.run(run(args, work, ports, wraith.pid))
        status = subprocess.run([args.wraith, "status", "--json", "-c", str(work / "wraith.toml")],
                                capture_output=True, text=True, cwd=work)
        alive = wraith.poll() is None
    finally:
        procs.stop()

    warm = [s for s in samples if s["t"] >= args.warmup * 60]
    second_half = [s for s in samples if s["t"] >= samples[-1]["t"] / 2]
    per_min = slope([(s["t"] / 60, s["rss_kib"] / 1024) for s in second_half]) if len(second_half) > 2 else 0.0
    reloads_ok = "?"
    try:
        st = json.loads(status.stdout)
        reloads_ok = f"{st.get('reloads_started', '?')} started, last {st.get('last_reload', {}).get('ok')}"
    except (ValueError, AttributeError):
        pass
    lines = [
        f"### Soak, {args.minutes:g} minutes (`python3 bench/soak.py --minutes {args.minutes:g}`)",
        "",
        f"{load.requests:,} requests from new client addresses ({args.clients} client loops, "
        f"1–4 requests per connection), statuses {dict(sorted(load.statuses.items()))}, "
        f"{load.errors} client-side errors; HTTP/2 over TLS: {load.h2['h2']:,} requests on new "
        f"connections of 20 ({load.h2['h2_failed']} failed); "
        + (f"HTTP/3: {load.h3['h3']:,} requests, each on a new QUIC connection ({load.h3['h3_failed']} failed); "
           if args.h3load else "") +
        f"{reloads} reloads ({reloads_ok}); gateway alive at the end: {alive}.",
        "",
        "| minute | RSS MiB | descriptors | threads | requests |",
        "|---|---|---|---|---|",
    ]
    shown = set()
    last = samples[-1]
    for s in samples:
        m = int(s["t"] // 60)
        if m not in shown or s is last:
            shown.add(m)
            lines.append(f"| {s['t'] / 60:.1f} | {s['rss_kib'] / 1024:.1f} | {s['fds']} | {s['threads']} | {s['requests']:,} |")
            if s is last:
                break
    if warm:
        lines += [
            "",
            f"RSS after the {args.warmup:g}-minute warm-up {warm[0]['rss_kib'] / 1024:.1f} MiB, at the end "
            f"{last['rss_kib'] / 1024:.1f} MiB (peak {last['hwm_kib'] / 1024:.1f} MiB); slope over the second half "
            f"**{per_min:+.2f} MiB/min**.",
        ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.markdown:
        with open(args.markdown, "a") as f:
            f.write(text + "\n")
    return 0 if alive else 1


if __name__ == "__main__":
    sys.exit(main())
