#!/usr/bin/env bash
# Runs edge-tunnel on this machine with nothing prepared: throw-away
# certificates, a tunnel-server, a tunnel-agent for node "edge-1", and a
# kubelet-like HTTPS endpoint behind the agent; then curl reaches that
# endpoint through the server's CONNECT ingress, verifying the endpoint's
# own certificate (TLS is end to end).
#
#   bash scripts/quickstart.sh          # demo, then clean up
#   bash scripts/quickstart.sh --keep   # leave it running until Ctrl-C
set -euo pipefail
cd "$(dirname "$0")/.."

keep=false
[ "${1:-}" = "--keep" ] && keep=true

echo "==> building (cargo build --bins)"
cargo build --quiet --bins
bin=target/debug

work=$(mktemp -d)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

# Ports on loopback; override if something already uses them.
QUIC=${QUIC_PORT:-18443} CONNECT=${CONNECT_PORT:-18080} ADMIN=${ADMIN_PORT:-18081} KUBELET=${KUBELET_PORT:-20250}

echo "==> certificates in $work"
"$bin/tunnel-certs" ca --out "$work/ca" >/dev/null
"$bin/tunnel-certs" server --ca "$work/ca" --out "$work/server" --ip 127.0.0.1 --dns localhost >/dev/null
"$bin/tunnel-certs" agent --ca "$work/ca" --out "$work/agent" --node edge-1 --ip 127.0.0.1 >/dev/null
# The endpoint behind the agent has its own CA, as a kubelet does.
"$bin/tunnel-certs" ca --out "$work/kubelet-ca" --common-name "kubelet CA" >/dev/null
"$bin/tunnel-certs" server --ca "$work/kubelet-ca" --out "$work/kubelet" --dns edge-1 --ip 127.0.0.1 >/dev/null

echo "==> sample kubelet on https://127.0.0.1:$KUBELET"
"$bin/sample-kubelet" --listen "127.0.0.1:$KUBELET" --cert-dir "$work/kubelet" 2>"$work/kubelet.log" &
pids+=($!)

echo "==> tunnel-server: QUIC 127.0.0.1:$QUIC, CONNECT 127.0.0.1:$CONNECT, admin 127.0.0.1:$ADMIN"
"$bin/tunnel-server" --listen "127.0.0.1:$QUIC" --cert-dir "$work/server" --allow-loopback-agents \
    --connect-listen "127.0.0.1:$CONNECT" --admin-listen "127.0.0.1:$ADMIN" 2>"$work/server.log" &
pids+=($!)

echo "==> tunnel-agent for node edge-1 (allow-list 127.0.0.1:$KUBELET)"
"$bin/tunnel-agent" --server "127.0.0.1:$QUIC" --server-name localhost --cert-dir "$work/agent" \
    --node-name edge-1 --allow "127.0.0.1:$KUBELET" 2>"$work/agent.log" &
pids+=($!)

for _ in $(seq 1 100); do
    agents=$(curl -fsS "http://127.0.0.1:$ADMIN/v1/agents" 2>/dev/null || true)
    if grep -q '"edge-1"' <<<"$agents"; then break; fi
    sleep 0.1
done
echo "==> registered agents (GET /v1/agents)"
curl -fsS "http://127.0.0.1:$ADMIN/v1/agents"; echo

run() { echo "\$ $*"; "$@"; }
echo
echo "==> through the tunnel, by node name, verifying the kubelet's certificate:"
run curl -fsS --cacert "$work/kubelet-ca/ca.crt" --proxytunnel -x "http://127.0.0.1:$CONNECT" \
    "https://edge-1:$KUBELET/healthz"
echo
echo "==> a streaming response (like kubectl logs -f; a line every 100 ms for 3 s):"
run curl -fsSN --cacert "$work/kubelet-ca/ca.crt" --proxytunnel -x "http://127.0.0.1:$CONNECT" \
    "https://edge-1:$KUBELET/logs"
echo
echo "==> a target outside the agent's allow-list is refused:"
run curl -sS -o /dev/null -w "CONNECT answered %{http_connect}\n" --proxytunnel -x "http://127.0.0.1:$CONNECT" \
    "https://127.0.0.1:22/" 2>/dev/null || true
echo
echo "==> metrics (excerpt):"
curl -fsS "http://127.0.0.1:$ADMIN/metrics" | grep -E '^edge_tunnel_(agents_connected|streams_total|dial_failures_total)'

if $keep; then
    echo
    echo "Running until Ctrl-C. Logs: $work/{server,agent,kubelet}.log"
    echo "Try: curl --cacert $work/kubelet-ca/ca.crt -p -x http://127.0.0.1:$CONNECT https://edge-1:$KUBELET/logs"
    wait
fi
echo "==> done; cleaning up"
