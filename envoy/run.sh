#!/usr/bin/env bash
# Runs Envoy with the Tollgate filter in front of an upstream, from envoy/envoy.yaml.
#
#   envoy/run.sh [plugin.json]            # default: envoy/plugin.json
#   envoy/run.sh --render [plugin.json]   # print the rendered bootstrap and exit
#
# Environment (defaults): LISTEN_PORT=10000 ADMIN_PORT=9901 UPSTREAM_PORT=18080
# COLLECTOR_PORT=18090 POLICY_PORT=18091 CONCURRENCY=2 LOG_LEVEL=warning, WASM (the built module), ENVOY (binary).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
render_only=false
if [ "${1:-}" = "--render" ]; then render_only=true; shift; fi
plugin=${1:-$root/envoy/plugin.json}
wasm=${WASM:-$root/target/wasm32-wasip1/wasm/tollgate_wasm.wasm}
envoy=${ENVOY:-$root/target/envoy-venv/bin/envoy}

[ -f "$plugin" ] || { echo "run.sh: no plugin configuration at $plugin" >&2; exit 1; }
[ -f "$wasm" ] || {
  echo "run.sh: no module at $wasm; build it with:" >&2
  echo "  cargo build -p tollgate-wasm --target wasm32-wasip1 --profile wasm" >&2
  exit 1
}

render() {
  awk -v listen="${LISTEN_PORT:-10000}" -v admin="${ADMIN_PORT:-9901}" \
      -v upstream="${UPSTREAM_PORT:-18080}" -v collector="${COLLECTOR_PORT:-18090}" \
      -v policy="${POLICY_PORT:-18091}" \
      -v wasm="$wasm" -v plugin="$plugin" '
    /^\$\{PLUGIN_CONFIG\}$/ { while ((getline line < plugin) > 0) print "                    " line; next }
    {
      gsub(/\$\{LISTEN_PORT\}/, listen); gsub(/\$\{ADMIN_PORT\}/, admin)
      gsub(/\$\{UPSTREAM_PORT\}/, upstream); gsub(/\$\{COLLECTOR_PORT\}/, collector)
      gsub(/\$\{POLICY_PORT\}/, policy)
      gsub(/\$\{WASM\}/, wasm); print
    }' "$root/envoy/envoy.yaml"
}

if $render_only; then render; exit 0; fi
[ -x "$envoy" ] || { echo "run.sh: no Envoy at $envoy; install it with scripts/install-envoy" >&2; exit 1; }
dir=$(mktemp -d)
render > "$dir/envoy.yaml"
echo "run.sh: listener 127.0.0.1:${LISTEN_PORT:-10000}, admin 127.0.0.1:${ADMIN_PORT:-9901}, config $dir/envoy.yaml" >&2
exec "$envoy" -c "$dir/envoy.yaml" --concurrency "${CONCURRENCY:-2}" --disable-hot-restart \
  -l "${LOG_LEVEL:-warning}" --component-log-level wasm:info
