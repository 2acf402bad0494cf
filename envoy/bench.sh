#!/usr/bin/env bash
# Envoy + the Tollgate filter vs the same Envoy without it: interleaved rounds of wrk against the
# release mock upstream (wrk and the mock pinned to core 0, Envoy to core 1). Needs wrk
# (apt-get install wrk), the built module, scripts/install-envoy, and
# `cargo build --release -p tollgate-e2e --bin mock-upstream`. Prints requests/s, p99 and Envoy's
# CPU ticks (1/100 s) per round.
set -euo pipefail
R=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d); cd "$work"
trap 'rm -rf "$work"' EXIT
free() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
UP=$(free); taskset -c 0 $R/target/release/mock-upstream --listen 127.0.0.1:$UP > mock.log 2>&1 & MOCK=$!
cat > plugin.json <<'J'
{"filter": {"fail": "closed"},
 "policy": {"version": "bench", "defaults": {"llm": "allow", "tool": "require_approval", "other": "deny"},
  "limits": {"max_cost_per_request": "1.00"},
  "budgets": [{"id": "cc-daily", "scope": "cost_center", "period": "daily", "amount": "1000000.00"}]}}
J
start() { # $1 = with|without
  local L=$(free) A=$(free)
  LISTEN_PORT=$L ADMIN_PORT=$A UPSTREAM_PORT=$UP COLLECTOR_PORT=1 $R/envoy/run.sh --render plugin.json > with.yaml
  python3 - <<'P'
import re
y=open('with.yaml').read()
s=y.index('          - name: envoy.filters.http.wasm'); e=y.index('          - name: envoy.filters.http.router')
open('without.yaml','w').write(y[:s]+y[e:])
P
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
for round in 1 2 3; do
  for mode in without with; do
    read PID L < <(start $mode)
    for i in $(seq 100); do curl -s -o /dev/null localhost:$L/ && break; sleep 0.1; done
    curl -s -o /dev/null -w "$mode check %{http_code}\n" -X POST localhost:$L/v1/chat/completions -H 'x-agent-id: bench-bot' -H 'x-cost-center: CC-1234' -H 'x-project-id: PROJ-ABC123' -d '{"model":"gpt-4o-mini","max_tokens":50,"messages":[]}'
    taskset -c 0 wrk -t1 -c16 -d8s --latency -s post.lua http://127.0.0.1:$L/v1/chat/completions > wrk-$mode-$round.txt
    cpu=$(awk '{print $14+$15}' /proc/$PID/stat)
    reqs=$(grep -o '[0-9]* requests in' wrk-$mode-$round.txt | awk '{print $1}')
    echo "$mode round $round: $(grep Requests/sec wrk-$mode-$round.txt) p99 $(grep ' 99%' wrk-$mode-$round.txt | awk '{print $2}') non2xx: $(grep -c Non-2xx wrk-$mode-$round.txt || true) cpu_ticks=$cpu requests=$reqs"
    kill $PID; wait $PID 2>/dev/null || true
  done
done
kill $MOCK
