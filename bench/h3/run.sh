#!/usr/bin/env bash
# bench/h3: what HTTP/3 costs Wraith, against Wraith's own HTTP/2 and Caddy 2.6's HTTP/3.
#
#   a. small requests, keep-alive (10 connections x 10 streams): server CPU-us per request
#      for Wraith h3, Wraith h2 and Caddy h3 (target: Wraith h3 <= 0.7x Caddy h3)
#   b. bulk: 100 MiB downloads and uploads, one stream: server CPU-ms per GiB, same three
#   c. full handshakes (no resumption, one GET each, 4 loops): Wraith's CPU per handshake over
#      QUIC with X25519MLKEM768 vs X25519 (target <= 1.35x), and the same over TCP (h2)
#
# Method: /work/shared/notes/benchmarking.md: servers pinned to CPU 1 with one worker
# (Wraith worker_threads = 1, Caddy GOMAXPROCS=1), client and upstream on CPU 0, a 1-s
# warm-up run before each 5-s run, ABBA order, runs with foreign CPU > 0.5 s rejected.
# Needs: nginx, caddy, taskset, python3, cargo (release build of wraith and h3load).
# Results: $WORK/results.jsonl; the summary goes to docs/BENCHMARKS.md.
#
# Usage: bench/h3/run.sh [ROUNDS] [SECONDS]      (default 6 rounds of 5 s)
#        PROFILE=debug bench/h3/run.sh 1 1        (checks the script itself; figures meaningless)
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
ROUNDS="${1:-6}"
SECS="${2:-5}"
WORK="${WORK:-$ROOT/bench/results/h3}"
CERTS="$WORK/certs"
PROFILE="${PROFILE:-release}"
WRAITH="$ROOT/target/$PROFILE/wraith"
LOAD="$ROOT/target/$PROFILE/examples/h3load"
MEASURE="$HERE/measure.py"
PIDS=()

cleanup() {
	for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
}
trap cleanup EXIT

need() { command -v "$1" >/dev/null || { echo "missing: $1" >&2; exit 1; }; }
for t in nginx caddy taskset python3 cargo; do need "$t"; done

mkdir -p "$WORK/caddy" "$WORK/www" "$WORK/nginx-body"
: >"$WORK/results.jsonl"

echo "== build ($PROFILE)"
if [ "$PROFILE" = release ]; then
	(cd "$ROOT" && cargo build --release --bin wraith --example h3load)
else
	(cd "$ROOT" && cargo build --bin wraith --example h3load)
fi

echo "== certificates (ECDSA P-256) and the 100 MiB file"
"$WRAITH" certs init --dir "$CERTS" --force >/dev/null
[ -s "$WORK/www/big.bin" ] || head -c $((100 << 20)) /dev/urandom >"$WORK/www/big.bin"

fill() { sed -e "s#@WORK@#$WORK#g" -e "s#@CERTS@#$CERTS#g" -e "s#@HERE@#$HERE#g" "$1" >"$2"; }
fill "$HERE/nginx-upstream.conf.in" "$WORK/nginx-upstream.conf"
fill "$HERE/wraith-h3.toml.in" "$WORK/wraith-h3.toml"
fill "$HERE/Caddyfile.in" "$WORK/Caddyfile"

start() { # name, command...
	local name="$1"; shift
	"$@" >"$WORK/$name.out" 2>"$WORK/$name.err" &
	PIDS+=("$!")
	eval "PID_${name//-/_}=$!"
}

echo "== start (all peers before the series)"
start upstream taskset -c 0 nginx -c "$WORK/nginx-upstream.conf"
start wraith taskset -c 1 "$WRAITH" serve -c "$WORK/wraith-h3.toml"
start caddy env GOMAXPROCS=1 taskset -c 1 caddy run --adapter caddyfile --config "$WORK/Caddyfile"
sleep 2
for name in upstream wraith caddy; do
	pid_var="PID_$name"
	kill -0 "${!pid_var}" 2>/dev/null || { echo "$name did not start:"; cat "$WORK/$name.err"; exit 1; }
done

load() { # label pid port args...: 1-s warm-up, then the measured run
	local label="$1" pid="$2" port="$3"; shift 3
	taskset -c 0 "$LOAD" --addr "127.0.0.1:$port" --ca "$CERTS/ca.pem" --duration 1 "$@" >/dev/null
	python3 "$MEASURE" --label "$label" --pids "$pid,$PID_upstream" -- \
		taskset -c 0 "$LOAD" --addr "127.0.0.1:$port" --ca "$CERTS/ca.pem" --duration "$SECS" "$@" |
		tee -a "$WORK/results.jsonl"
}

echo "== a. small requests, keep-alive"
for ((r = 0; r < ROUNDS; r++)); do
	order=(w3 w2 c3)
	((r % 2)) && order=(c3 w2 w3)
	for o in "${order[@]}"; do
		case $o in
		w3) load a-wraith-h3 "$PID_wraith" 9449 --proto h3 --path /small --conns 10 --streams 10 ;;
		w2) load a-wraith-h2 "$PID_wraith" 9449 --proto h2 --path /small --conns 10 --streams 10 ;;
		c3) load a-caddy-h3 "$PID_caddy" 9450 --proto h3 --path /small --conns 10 --streams 10 ;;
		esac
	done
done

echo "== b. bulk: 100 MiB down and up"
for ((r = 0; r < ROUNDS; r++)); do
	for peer in "wraith $PID_wraith 9449" "caddy $PID_caddy 9450"; do
		set -- $peer
		load "b-$1-h3-down" "$2" "$3" --proto h3 --path /big.bin --conns 1 --streams 1
		load "b-$1-h3-up" "$2" "$3" --proto h3 --path /sink --upload $((100 << 20)) --conns 1 --streams 1
	done
	load b-wraith-h2-down "$PID_wraith" 9449 --proto h2 --path /big.bin --conns 1 --streams 1
	load b-wraith-h2-up "$PID_wraith" 9449 --proto h2 --path /sink --upload $((100 << 20)) --conns 1 --streams 1
done

echo "== c. full handshakes: X25519MLKEM768 vs X25519"
for ((r = 0; r < ROUNDS; r++)); do
	groups=(x25519mlkem768 x25519)
	((r % 2)) && groups=(x25519 x25519mlkem768)
	for g in "${groups[@]}"; do
		load "c-wraith-h3-$g" "$PID_wraith" 9449 --proto h3 --path /small --handshakes --conns 4 --group "$g"
		load "c-wraith-h2-$g" "$PID_wraith" 9449 --proto h2 --path /small --handshakes --conns 4 --group "$g"
	done
	load "c-caddy-h3-x25519" "$PID_caddy" 9450 --proto h3 --path /small --handshakes --conns 4 --group x25519
done

echo "== medians"
python3 - "$WORK/results.jsonl" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
noisy = [r for r in rows if r.get("foreign_cpu_s", 0) > 0.5 or r.get("errors")]
rows = [r for r in rows if r not in noisy]
print(f"{len(noisy)} run(s) rejected (foreign CPU > 0.5 s, or errors)")
per_op, per_gib = {}, {}
for r in rows:
    if r["label"].startswith("b-"):
        per_gib.setdefault(r["label"], []).append(r["cpu_ms_per_gib"])
    elif r["cpu_us_per_op"] is not None:
        per_op.setdefault(r["label"], []).append(r["cpu_us_per_op"])
for k, v in sorted(per_op.items()):
    print(f"{k:<28} CPU-us/op  median {statistics.median(v):9.1f}  min {min(v):9.1f}  max {max(v):9.1f}  n={len(v)}")
for k, v in sorted(per_gib.items()):
    print(f"{k:<28} CPU-ms/GiB median {statistics.median(v):9.1f}  min {min(v):9.1f}  max {max(v):9.1f}  n={len(v)}")
m = {k: statistics.median(v) for k, v in {**per_op, **per_gib}.items()}
def ratio(a, b, what, target=None):
    if a in m and b in m:
        t = f" (target <= {target}x)" if target else ""
        print(f"{what}: {m[a] / m[b]:.2f}x{t}")
ratio("a-wraith-h3", "a-caddy-h3", "small requests, Wraith h3 / Caddy h3", 0.7)
ratio("a-wraith-h3", "a-wraith-h2", "small requests, Wraith h3 / Wraith h2")
ratio("b-wraith-h3-down", "b-caddy-h3-down", "download per GiB, Wraith h3 / Caddy h3")
ratio("b-wraith-h3-up", "b-caddy-h3-up", "upload per GiB, Wraith h3 / Caddy h3")
ratio("b-wraith-h3-down", "b-wraith-h2-down", "download per GiB, Wraith h3 / Wraith h2")
ratio("c-wraith-h3-x25519mlkem768", "c-wraith-h3-x25519", "QUIC full handshake, X25519MLKEM768 / X25519", 1.35)
ratio("c-wraith-h2-x25519mlkem768", "c-wraith-h2-x25519", "TCP full handshake, X25519MLKEM768 / X25519")
ratio("c-wraith-h3-x25519", "c-caddy-h3-x25519", "QUIC full handshake X25519, Wraith / Caddy")
PY
