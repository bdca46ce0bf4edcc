#!/usr/bin/env bash
# bench/mtls-policy: what identity extraction and policy evaluation cost.
#
#   1. in process: CPU per identity extraction, per principal entity, per decision
#      (cargo run --release --example policy_cost)
#   2. scenario (h), policy layer: the same route decided by one permit-all policy (A, the
#      floor) and by the shipped policies (B); wrk over keep-alive HTTP/1.1, ABBA rounds;
#      Wraith CPU-us per request for each (wrk cannot present client certificates, so the
#      client-certificate principal is measured in step 1)
#   3. scenario (c), mTLS: server CPU per full handshake with a required ECDSA P-256 client
#      certificate, no resumption: Wraith vs nginx 1.22 (OpenSSL 3.0) vs Caddy (Go TLS), with
#      4 parallel `openssl s_time -new` clients
#
# Method: /work/shared/notes/benchmarking.md (one worker pinned to CPU 1, client and upstream
# on CPU 0, 1-s warm-up, 5-s runs, quiet machine). Needs: nginx, caddy, wrk, openssl, a
# release build. Results go to $WORK/results.jsonl; copy the figures to docs/BENCHMARKS.md.
#
# Usage: bench/mtls-policy/run.sh [ROUNDS]      (from anywhere; default 6 rounds)
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
ROUNDS="${1:-6}"
WORK="${WORK:-$ROOT/bench/results/mtls-policy}"
CERTS="$WORK/certs"
WRAITH="$ROOT/target/release/wraith"
MEASURE="$HERE/measure.py"
PIDS=()

cleanup() {
	for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
}
trap cleanup EXIT

need() { command -v "$1" >/dev/null || { echo "missing: $1" >&2; exit 1; }; }
for t in nginx caddy wrk openssl taskset python3 cargo; do need "$t"; done

mkdir -p "$WORK/caddy"
: >"$WORK/results.jsonl"

echo "== build (release)"
(cd "$ROOT" && cargo build --release --bin wraith --example policy_cost)

echo "== certificates (ECDSA P-256: dev CA, server, client)"
"$WRAITH" certs init --dir "$CERTS" --force >/dev/null

fill() { sed -e "s#@WORK@#$WORK#g" -e "s#@CERTS@#$CERTS#g" -e "s#@HERE@#$HERE#g" "$1" >"$2"; }
fill "$HERE/nginx-upstream.conf.in" "$WORK/nginx-upstream.conf"
fill "$HERE/nginx-mtls.conf.in" "$WORK/nginx-mtls.conf"
fill "$HERE/Caddyfile.in" "$WORK/Caddyfile"
fill "$HERE/wraith-mtls.toml.in" "$WORK/wraith-mtls.toml"

start() { # name, command...: starts in the background, remembers the pid
	local name="$1"; shift
	"$@" >"$WORK/$name.out" 2>"$WORK/$name.err" &
	PIDS+=("$!")
	eval "PID_${name//-/_}=$!"
}

echo "== start (all peers before the series, so start order does not matter)"
start upstream taskset -c 0 nginx -c "$WORK/nginx-upstream.conf"
start floor taskset -c 1 "$WRAITH" serve -c "$HERE/wraith-floor.toml"
start policies taskset -c 1 "$WRAITH" serve -c "$HERE/wraith-policies.toml"
start wmtls taskset -c 1 "$WRAITH" serve -c "$WORK/wraith-mtls.toml"
start nmtls taskset -c 1 nginx -c "$WORK/nginx-mtls.conf"
start cmtls env GOMAXPROCS=1 taskset -c 1 caddy run --adapter caddyfile --config "$WORK/Caddyfile"
sleep 2
for name in floor policies wmtls nmtls cmtls upstream; do
	pid_var="PID_$name"
	kill -0 "${!pid_var}" 2>/dev/null || { echo "$name did not start:"; cat "$WORK/$name.err"; exit 1; }
done
curl -sf http://127.0.0.1:8085/small >/dev/null && curl -sf http://127.0.0.1:8086/small >/dev/null

echo "== 1. in process"
(cd "$ROOT" && taskset -c 1 ./target/release/examples/policy_cost 500000) | tee "$WORK/policy_cost.txt"

echo "== 2. policy layer: floor (A) vs shipped policies (B), $ROUNDS ABBA rounds"
wrk_run() { # label, pid, port
	taskset -c 0 wrk -t1 -c50 -d1s "http://127.0.0.1:$3/small" >/dev/null
	python3 "$MEASURE" --label "$1" --pids "$2,$PID_upstream" --ops wrk -- \
		taskset -c 0 wrk -t1 -c50 -d5s --latency "http://127.0.0.1:$3/small" | tee -a "$WORK/results.jsonl"
}
# A run whose foreign_cpu_s is above 0.5 should be discarded and repeated in a quiet window.
for ((r = 0; r < ROUNDS; r++)); do
	if ((r % 2 == 0)); then
		wrk_run "h-floor" "$PID_floor" 8085; wrk_run "h-policies" "$PID_policies" 8086
	else
		wrk_run "h-policies" "$PID_policies" 8086; wrk_run "h-floor" "$PID_floor" 8085
	fi
done

echo "== 3. mTLS full handshakes: Wraith vs nginx vs Caddy"
stime_run() { # label, pid, port
	python3 "$MEASURE" --label "$1" --pids "$2" --ops s_time -- taskset -c 0 sh -c "
		for i in 1 2 3 4; do
			openssl s_time -connect 127.0.0.1:$3 -new -time 5 -cert $CERTS/client.pem \
				-key $CERTS/client-key.pem -CAfile $CERTS/ca.pem -www / 2>/dev/null | grep 'connections in' &
		done; wait" | tee -a "$WORK/results.jsonl"
}
for ((r = 0; r < ROUNDS; r++)); do
	stime_run "c-wraith" "$PID_wmtls" 9445
	stime_run "c-nginx" "$PID_nmtls" 9446
	stime_run "c-caddy" "$PID_cmtls" 9447
done

echo "== medians (CPU-us per op)"
python3 - "$WORK/results.jsonl" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
noisy = [r for r in rows if r.get("foreign_cpu_s", 0) > 0.5]
rows = [r for r in rows if r.get("foreign_cpu_s", 0) <= 0.5]
print(f"{len(noisy)} run(s) rejected for foreign CPU > 0.5 s")
by = {}
for r in rows:
    if r["cpu_us_per_op"] is not None:
        by.setdefault(r["label"], []).append(r["cpu_us_per_op"])
for k, v in sorted(by.items()):
    print(f"{k:<12} median {statistics.median(v):9.2f}  min {min(v):9.2f}  max {max(v):9.2f}  (n={len(v)})")
m = {k: statistics.median(v) for k, v in by.items()}
if "h-floor" in m and "h-policies" in m:
    print(f"policy layer, shipped policies vs floor: +{m['h-policies'] - m['h-floor']:.2f} us/request")
if "c-wraith" in m and "c-nginx" in m:
    print(f"mTLS handshake, Wraith / nginx: {m['c-wraith'] / m['c-nginx']:.2f}x (target <= 0.5x)")
if "c-wraith" in m and "c-caddy" in m:
    print(f"mTLS handshake, Wraith / Caddy: {m['c-wraith'] / m['c-caddy']:.2f}x")
PY
