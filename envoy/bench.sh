#!/usr/bin/env bash
# Envoy + the Tollgate filter vs the same Envoy without it: interleaved rounds of wrk against the
# release mock upstream (wrk and the mock pinned to core 0, Envoy to core 1). Needs wrk
# (apt-get install wrk), the built module, scripts/install-envoy, and
# `cargo build --release -p tollgate-e2e --bin mock-upstream`.
#
#   envoy/bench.sh                                  # without vs with the built module
#   envoy/bench.sh before=/tmp/old.wasm after=target/wasm32-wasip1/wasm/tollgate_wasm.wasm
#   envoy/bench.sh with=<module> other=<module>,<plugin.json>
#
# Each named module is one more mode in every round, so several builds (or plugin
# configurations: the default one is below) are compared in one run.
# ROUNDS (3), SECONDS_PER_ROUND (8). Prints each round, then per mode the medians of requests/s,
# p99 and Envoy CPU per request (utime+stime over the round / requests), and the ratio of
# requests/s and CPU to Envoy without the filter.
set -euo pipefail
R=$(cd "$(dirname "$0")/.." && pwd)
modes=(without)
declare -A module plugin
if [ $# -eq 0 ]; then set -- "with=$R/target/wasm32-wasip1/wasm/tollgate_wasm.wasm"; fi
for arg in "$@"; do
  name=${arg%%=*}; spec=${arg#*=}; path=$(realpath "${spec%%,*}")
  [ -f "$path" ] || { echo "bench.sh: no module at $path" >&2; exit 1; }
  modes+=("$name"); module[$name]=$path
  if [ "$spec" != "${spec#*,}" ]; then plugin[$name]=$(realpath "${spec#*,}"); fi
done
work=$(mktemp -d); cd "$work"
MOCK=; PID=
trap 'kill $MOCK $PID 2>/dev/null || true; rm -rf "$work"' EXIT
free() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
UP=$(free); taskset -c 0 $R/target/release/mock-upstream --listen 127.0.0.1:$UP > mock.log 2>&1 & MOCK=$!
cat > plugin.json <<'J'
{"filter": {"fail": "closed"},
 "policy": {"version": "bench", "defaults": {"llm": "allow", "tool": "require_approval", "other": "deny"},
  "limits": {"max_cost_per_request": "1.00"},
  "budgets": [{"id": "cc-daily", "scope": "cost_center", "period": "daily", "amount": "1000000.00"}]}}
J
start() { # $1 = mode
  local L=$(free) A=$(free) wasm=${module[$1]:-$R/target/wasm32-wasip1/wasm/tollgate_wasm.wasm}
  WASM=$wasm LISTEN_PORT=$L ADMIN_PORT=$A UPSTREAM_PORT=$UP COLLECTOR_PORT=1 $R/envoy/run.sh --render ${plugin[$1]:-plugin.json} > $1.yaml
  if [ "$1" = without ]; then
    python3 - <<'P'
y=open('without.yaml').read()
s=y.index('          - name: envoy.filters.http.wasm'); e=y.index('          - name: envoy.filters.http.router')
open('without.yaml','w').write(y[:s]+y[e:])
P
  fi
  taskset -c 1 $R/target/envoy-venv/bin/envoy -c $1.yaml --concurrency 1 --disable-hot-restart -l error > envoy-$1.log 2>&1 &
  echo "$! $L"
}
cat > post.lua <<'LUA'
wrk.method = "POST"
wrk.body = '{"model":"gpt-4o-mini","max_tokens":50,"messages":[{"role":"user","content":"Say hello."}]}'
wrk.headers["content-type"] = "application/json"
wrk.headers["x-agent-id"] = "bench-bot"
wrk.headers["x-cost-center"] = "CC-1234"
wrk.headers["x-project-id"] = "PROJ-ABC123"
LUA
: > results.txt
for round in $(seq ${ROUNDS:-3}); do
  for mode in "${modes[@]}"; do
    read PID L < <(start $mode)
    for i in $(seq 100); do curl -s -o /dev/null localhost:$L/ && break; sleep 0.1; done
    code=$(curl -s -o /dev/null -w "%{http_code}" -X POST localhost:$L/v1/chat/completions -H 'x-agent-id: bench-bot' -H 'x-cost-center: CC-1234' -H 'x-project-id: PROJ-ABC123' -d '{"model":"gpt-4o-mini","max_tokens":50,"messages":[]}')
    [ "$code" = 200 ] || echo "$mode: check request answered $code" >&2
    cpu0=$(awk '{print $14+$15}' /proc/$PID/stat)
    taskset -c 0 wrk -t1 -c16 -d${SECONDS_PER_ROUND:-8}s --latency -s post.lua http://127.0.0.1:$L/v1/chat/completions > wrk-$mode-$round.txt
    cpu=$(( $(awk '{print $14+$15}' /proc/$PID/stat) - cpu0 ))
    reqs=$(grep -o '[0-9]* requests in' wrk-$mode-$round.txt | awk '{print $1}')
    rps=$(grep Requests/sec wrk-$mode-$round.txt | awk '{print $2}')
    p99=$(grep ' 99%' wrk-$mode-$round.txt | awk '{print $2}')
    non2xx=$(grep -o 'Non-2xx or 3xx responses: [0-9]*' wrk-$mode-$round.txt | awk '{print $NF}' || true)
    us=$(python3 -c "print(round($cpu*10000/$reqs,1))")
    echo "$mode round $round: $rps req/s, p99 $p99, $us us CPU/request, non-2xx ${non2xx:-0}"
    echo "$mode $rps $p99 $us" >> results.txt
    kill $PID; wait $PID 2>/dev/null || true
  done
done
kill $MOCK
python3 - <<'P'
import statistics as st
rows={}
for line in open('results.txt'):
    m,rps,p99,us=line.split()
    ms=float(p99[:-2]) if p99.endswith('ms') else float(p99[:-2])/1000 if p99.endswith('us') else float(p99[:-1])*1000
    rows.setdefault(m,[]).append((float(rps),ms,float(us)))
base=rows['without']
b_rps=st.median(r[0] for r in base); b_us=st.median(r[2] for r in base)
print(f"{'mode':<10} {'req/s':>9} {'ratio':>6} {'p99 ms':>7} {'CPU us/req':>10} {'CPU ratio':>9}")
for m,rs in rows.items():
    rps=st.median(r[0] for r in rs); p99=st.median(r[1] for r in rs); us=st.median(r[2] for r in rs)
    print(f"{m:<10} {rps:>9.0f} {rps/b_rps:>6.2f} {p99:>7.2f} {us:>10.1f} {us/b_us:>9.2f}")
P
