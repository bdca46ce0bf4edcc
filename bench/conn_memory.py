#!/usr/bin/env python3
"""Memory per idle client connection: N connections opened to the proxy and left idle, the
growth of its RSS divided by N. Kinds: `tcp` (connected, nothing sent: a browser's unused
preconnection), `h1` (one request answered, the connection kept alive), `tls` (TLS
handshake done, nothing sent). Wraith and nginx (Debian's package) in the same run, each
answering `/` itself (no upstream: this is the client side's cost).

`--spike`: instead, N kept-alive connections are opened and closed, and the proxy's RSS is
read at the peak, then while it is idle (+2 s, +15 s), and after one more request (+27 s): how
much of the spike it gives back.

Usage:
  python3 bench/conn_memory.py [--wraith target/release/wraith] [-n 2000] [--kinds tcp,h1,tls]
  python3 bench/conn_memory.py --spike [-n 4000]
"""

import argparse
import os
import resource
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PORT_HTTP, PORT_TLS = 24696, 24697


def rss_kib(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1])
    return 0


def wait_port(port):
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port)).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port}")


def measure(pid, kind, n):
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    before = rss_kib(pid)
    socks = []
    for _ in range(n):
        if kind == "tls":
            s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", PORT_TLS)),
                                server_hostname="localhost")
        else:
            s = socket.create_connection(("127.0.0.1", PORT_HTTP))
            if kind == "h1":
                s.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
                s.recv(4096)
        socks.append(s)
    time.sleep(1.5)
    grown = rss_kib(pid) - before
    for s in socks:
        s.close()
    time.sleep(1)
    return grown / n


def spike(pid, n):
    def mib():
        return rss_kib(pid) // 1024
    base = mib()
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", PORT_HTTP))
        s.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        socks.append(s)
    for s in socks:
        s.recv(4096)
    peak = mib()
    for s in socks:
        s.close()
    time.sleep(2)
    at2 = mib()
    time.sleep(13)
    at15 = mib()
    s = socket.create_connection(("127.0.0.1", PORT_HTTP))
    s.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
    s.recv(4096)
    s.close()
    time.sleep(12)
    return base, peak, at2, at15, mib()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--wraith", default=str(ROOT / "target/release/wraith"))
    ap.add_argument("-n", type=int, default=2000)
    ap.add_argument("--kinds", default="tcp,h1,tls")
    ap.add_argument("--spike", action="store_true")
    args = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    work = Path(tempfile.mkdtemp(prefix="wraith-connmem-"))
    subprocess.run([args.wraith, "certs", "init", "--dir", str(work / "certs")], check=True,
                   stdout=subprocess.DEVNULL)
    limits = 'limits = { max_connections = 100000, idle_timeout = "300s", header_read_timeout = "300s" }'
    (work / "wraith.toml").write_text(f"""
[server]
worker_threads = 1
[[listener]]
name = "http"
address = "127.0.0.1:{PORT_HTTP}"
protocol = "http"
{limits}
[[listener]]
name = "https"
address = "127.0.0.1:{PORT_TLS}"
protocol = "https"
tls = {{ cert = "certs/server.pem", key = "certs/server-key.pem" }}
{limits}
[[route]]
name = "r"
respond = {{ status = 200, body = "ok" }}
""")
    (work / "nginx.conf").write_text(f"""
daemon off; worker_processes 1; error_log {work}/nginx-error.log; pid {work}/nginx.pid;
worker_rlimit_nofile 200000;
events {{ worker_connections 100000; }}
http {{
  access_log off; client_header_timeout 300s; keepalive_timeout 300s;
  server {{ listen 127.0.0.1:{PORT_HTTP}; location / {{ return 200 "ok"; }} }}
  server {{ listen 127.0.0.1:{PORT_TLS} ssl; ssl_protocols TLSv1.3;
    ssl_certificate {work}/certs/server.pem; ssl_certificate_key {work}/certs/server-key.pem;
    location / {{ return 200 "ok"; }} }}
}}
""")
    proxies = [("wraith", [args.wraith, "serve", "-c", str(work / "wraith.toml")])]
    if shutil.which("nginx"):
        proxies.append(("nginx", ["nginx", "-c", str(work / "nginx.conf")]))
    kinds = args.kinds.split(",")
    if args.spike:
        print(f"RSS MiB around a spike of {args.n} kept-alive connections (Wraith)")
        print("| base | peak | +2 s | +15 s | +27 s (after one request) |")
        print("|---|---|---|---|---|")
        proc = subprocess.Popen(proxies[0][1], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_port(PORT_HTTP)
            print("| " + " | ".join(str(v) for v in spike(proc.pid, args.n)) + " |")
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)
        return
    print(f"KiB per idle connection, {args.n} connections")
    print("| proxy | " + " | ".join(kinds) + " |")
    print("|---|" + "---|" * len(kinds))
    for name, cmd in proxies:
        row = []
        # A fresh process per kind: memory freed by one kind's connections would be reused
        # by the next one's and hide its cost.
        for kind in kinds:
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                wait_port(PORT_HTTP)
                wait_port(PORT_TLS)
                # nginx's worker is the process that holds the connections.
                pid = proc.pid
                if name == "nginx":
                    time.sleep(0.3)
                    pid = int(subprocess.check_output(["pgrep", "-P", str(proc.pid)]).split()[0])
                row.append(f"{measure(pid, kind, args.n):.1f}")
            finally:
                proc.terminate()
                proc.wait(timeout=30)
        print(f"| {name} | " + " | ".join(row) + " |")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    os.chdir(ROOT)
    main()
