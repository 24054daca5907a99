#!/usr/bin/env bash
# Issues the edge-tunnel PKI and writes it as Kubernetes Secret manifests.
#
#   docker/make-secrets.sh OUT_DIR [--server-dns NAME]... [--server-ip IP]... NODE=IP[,IP...]...
#
# OUT_DIR/pki/ca/{ca.crt,ca.key}           the CA (keep ca.key offline)
# OUT_DIR/tunnel-server-tls.yaml           Secret for the server Deployment
# OUT_DIR/tunnel-dnat-helper-tls.yaml      Secret for the redirectors (CN edge-tunnel:dnat-helper)
# OUT_DIR/agents/NODE/{tls.crt,tls.key,ca.crt}
#                                          per-node files for /etc/edge-tunnel/pki on NODE
# OUT_DIR/tunnel-agent-NODE.yaml           the same as a Secret, for provisioning tools
# OUT_DIR/tunnel-connect-tokens.yaml       Secret with the CONNECT ingress's proxy token
#                                          for Prometheus (proxy_url: http://prometheus:TOKEN@...)
#
# The server certificate always carries the in-cluster names agents and
# clients use (tunnel-server.edge-tunnel.svc, tunnel-server-headless...);
# add the public names/addresses agents dial with --server-dns/--server-ip.
# Running it again reuses OUT_DIR/pki/ca and never overwrites other files.
# Every file it writes is readable by its owner only (private keys inside).
set -euo pipefail
umask 077
usage() { sed -n '2,18p' "$0" >&2; exit 2; }
[ $# -ge 2 ] || usage
out=$1; shift
certs=${TUNNEL_CERTS:-$(command -v tunnel-certs || echo "$(dirname "$0")/../target/debug/tunnel-certs")}
[ -x "$certs" ] || { echo "tunnel-certs not found: build it (cargo build --bins) or set TUNNEL_CERTS" >&2; exit 1; }

dns=(tunnel-server.edge-tunnel.svc tunnel-server.edge-tunnel.svc.cluster.local
     tunnel-server-headless.edge-tunnel.svc tunnel-server-headless.edge-tunnel.svc.cluster.local)
ips=()
nodes=()
while [ $# -gt 0 ]; do
    case $1 in
        --server-dns) dns+=("$2"); shift 2 ;;
        --server-ip) ips+=("$2"); shift 2 ;;
        *=*) nodes+=("$1"); shift ;;
        *) echo "unexpected argument: $1" >&2; usage ;;
    esac
done
[ ${#nodes[@]} -gt 0 ] || { echo "give at least one NODE=IP" >&2; usage; }

mkdir -p "$out"
[ -f "$out/pki/ca/ca.key" ] || "$certs" ca --out "$out/pki/ca" >/dev/null
args=()
for d in "${dns[@]}"; do args+=(--dns "$d"); done
for i in "${ips[@]}"; do args+=(--ip "$i"); done
"$certs" server --ca "$out/pki/ca" --out "$out/pki/server" "${args[@]}" >/dev/null
"$certs" secret --dir "$out/pki/server" --name tunnel-server-tls > "$out/tunnel-server-tls.yaml"
for spec in "${nodes[@]}"; do
    node=${spec%%=*}
    node_ips=()
    IFS=, read -r -a node_ips <<< "${spec#*=}"
    nargs=()
    for i in "${node_ips[@]}"; do nargs+=(--ip "$i"); done
    "$certs" agent --ca "$out/pki/ca" --out "$out/agents/$node" --node "$node" "${nargs[@]}" >/dev/null
    "$certs" secret --dir "$out/agents/$node" --name "tunnel-agent-$node" > "$out/tunnel-agent-$node.yaml"
done
# The redirectors' client certificate (CN edge-tunnel:dnat-helper): the
# servers' agent feed and TLS CONNECT listener accept it.
"$certs" dnat-helper --ca "$out/pki/ca" --out "$out/pki/dnat-helper" --force >/dev/null
"$certs" secret --dir "$out/pki/dnat-helper" --name tunnel-dnat-helper-tls > "$out/tunnel-dnat-helper-tls.yaml"
# The CONNECT ingress's proxy credentials (--connect-token-file): one
# random token for Prometheus, written once (mode 0600, never overwritten).
tokens="$out/tunnel-connect-tokens.yaml"
if [ ! -e "$tokens" ]; then
    token=$(od -An -tx1 -N24 /dev/urandom | tr -d ' \n')
    (umask 077 && cat > "$tokens" <<YAML
apiVersion: v1
kind: Secret
metadata:
  name: tunnel-connect-tokens
  namespace: edge-tunnel
type: Opaque
stringData:
  tokens: |
    # name:token, one per line; the server reloads this file when it changes.
    prometheus:$token
YAML
    )
fi
echo "wrote $out: tunnel-server-tls.yaml, tunnel-dnat-helper-tls.yaml, ${#nodes[@]} agent certificate(s), tunnel-connect-tokens.yaml; keep $out/pki/ca/ca.key offline"
