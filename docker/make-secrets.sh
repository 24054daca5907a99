#!/usr/bin/env bash
# Issues the edge-tunnel PKI and writes it as Kubernetes Secret manifests.
#
#   docker/make-secrets.sh OUT_DIR [--server-dns NAME]... [--server-ip IP]...
#       [--bootstrap GLOB [--bootstrap-uses N] [--bootstrap-ttl DUR]] [NODE=IP[,IP...]]...
#
# OUT_DIR/pki/ca/{ca.crt,ca.key}           the CA (keep ca.key offline)
# OUT_DIR/pki/enroll-ca/{ca.crt,ca.key}    the enrollment CA the servers sign agents with
# OUT_DIR/tunnel-server-tls.yaml           Secret for the server Deployment (its ca.crt
#                                          trusts agents of both CAs)
# OUT_DIR/tunnel-enroll-ca.yaml            Secret: the enrollment CA, for the servers
# OUT_DIR/tunnel-bootstrap-tokens.yaml     Secret: the bootstrap tokens file (hashes only)
# OUT_DIR/tunnel-agent-bootstrap.yaml      with --bootstrap: Secret for the agent DaemonSet,
#                                          a token for nodes matching GLOB (default 100
#                                          uses, 24h) and the CA pin; agents enroll with it
# OUT_DIR/tunnel-dnat-helper-tls.yaml      Secret for the redirectors (CN edge-tunnel:dnat-helper)
# OUT_DIR/agents/NODE/{tls.crt,tls.key,ca.crt}
#                                          per-node files for /var/lib/edge-tunnel/pki on NODE
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
usage() { sed -n '2,27p' "$0" >&2; exit 2; }
[ $# -ge 2 ] || usage
out=$1; shift
certs=${TUNNEL_CERTS:-$(command -v tunnel-certs || echo "$(dirname "$0")/../target/debug/tunnel-certs")}
[ -x "$certs" ] || { echo "tunnel-certs not found: build it (cargo build --bins) or set TUNNEL_CERTS" >&2; exit 1; }

dns=(tunnel-server.edge-tunnel.svc tunnel-server.edge-tunnel.svc.cluster.local
     tunnel-server-headless.edge-tunnel.svc tunnel-server-headless.edge-tunnel.svc.cluster.local)
ips=()
nodes=()
bootstrap=""
bootstrap_uses=100
bootstrap_ttl=24h
while [ $# -gt 0 ]; do
    case $1 in
        --server-dns) dns+=("$2"); shift 2 ;;
        --server-ip) ips+=("$2"); shift 2 ;;
        --bootstrap) bootstrap=$2; shift 2 ;;
        --bootstrap-uses) bootstrap_uses=$2; shift 2 ;;
        --bootstrap-ttl) bootstrap_ttl=$2; shift 2 ;;
        *=*) nodes+=("$1"); shift ;;
        *) echo "unexpected argument: $1" >&2; usage ;;
    esac
done
[ ${#nodes[@]} -gt 0 ] || [ -n "$bootstrap" ] || { echo "give NODE=IP or --bootstrap GLOB" >&2; usage; }

# secret NAME KEY=FILE...: an Opaque Secret holding the files.
secret() {
    local name=$1; shift
    printf 'apiVersion: v1\nkind: Secret\nmetadata:\n  name: %s\n  namespace: edge-tunnel\ntype: Opaque\nstringData:\n' "$name"
    for kv in "$@"; do
        printf '  %s: |\n' "${kv%%=*}"
        sed 's/^/    /' "${kv#*=}"
    done
}

mkdir -p "$out"
[ -f "$out/pki/ca/ca.key" ] || "$certs" ca --out "$out/pki/ca" >/dev/null
# The enrollment CA is online (the servers hold its key to sign agents);
# the CA above, which signs the server, stays offline. Dropping the
# enrollment CA from the servers' ca.crt revokes every enrolled agent.
[ -f "$out/pki/enroll-ca/ca.key" ] || "$certs" ca --out "$out/pki/enroll-ca" --common-name "edge-tunnel enrollment CA" >/dev/null
args=()
for d in "${dns[@]}"; do args+=(--dns "$d"); done
for i in "${ips[@]}"; do args+=(--ip "$i"); done
if [ -f "$out/pki/server/tls.key" ]; then
    # Issued by an earlier run: it must carry every name and address asked
    # for now (agents dialing a name it lacks fail to verify it).
    if command -v openssl >/dev/null; then
        # One SAN per line, whole lines compared.
        sans=$(openssl x509 -noout -ext subjectAltName -in "$out/pki/server/tls.crt" 2>/dev/null | tr ',' '\n' | sed 's/^ *//' || true)
        for d in "${dns[@]}"; do
            grep -qxF "DNS:$d" <<<"$sans" || { echo "$out/pki/server/tls.crt (from an earlier run) lacks DNS name $d: move $out/pki/server away to issue a new one" >&2; exit 1; }
        done
        for i in "${ips[@]}"; do
            # openssl spells IPv6 addresses its own way: IPv4 only.
            [[ $i == *:* ]] && continue
            grep -qixF "IP Address:$i" <<<"$sans" || { echo "$out/pki/server/tls.crt (from an earlier run) lacks address $i: move $out/pki/server away to issue a new one" >&2; exit 1; }
        done
    else
        echo "note: $out/pki/server/tls.crt is from an earlier run and kept; without openssl its names are not checked against --server-dns/--server-ip" >&2
    fi
else
    "$certs" server --ca "$out/pki/ca" --out "$out/pki/server" "${args[@]}" >/dev/null
fi
# Agents of both CAs are trusted; enrolled agents are given this bundle
# and verify the server against the CA that issued it.
cat "$out/pki/ca/ca.crt" "$out/pki/enroll-ca/ca.crt" > "$out/pki/server/ca.crt"
"$certs" secret --dir "$out/pki/server" --name tunnel-server-tls > "$out/tunnel-server-tls.yaml"
secret tunnel-enroll-ca ca.crt="$out/pki/enroll-ca/ca.crt" ca.key="$out/pki/enroll-ca/ca.key" > "$out/tunnel-enroll-ca.yaml"
tokens_file="$out/pki/bootstrap-tokens"
[ -f "$tokens_file" ] || echo "# edge-tunnel bootstrap tokens: the secrets are stored only as hashes" > "$tokens_file"
if [ -n "$bootstrap" ]; then
    token=$("$certs" token create --tokens-file "$tokens_file" --node-pattern "$bootstrap" --uses "$bootstrap_uses" --ttl "$bootstrap_ttl" 2>/dev/null)
    pin=$("$certs" ca-hash --ca "$out/pki/ca")
    printf '%s\n' "$token" > "$out/pki/agent-bootstrap-token"
    printf '%s\n' "$pin" > "$out/pki/agent-ca-cert-hash"
    secret tunnel-agent-bootstrap token="$out/pki/agent-bootstrap-token" ca-cert-hash="$out/pki/agent-ca-cert-hash" > "$out/tunnel-agent-bootstrap.yaml"
fi
secret tunnel-bootstrap-tokens tokens="$tokens_file" > "$out/tunnel-bootstrap-tokens.yaml"
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
echo "wrote $out: tunnel-server-tls.yaml, tunnel-enroll-ca.yaml, tunnel-bootstrap-tokens.yaml${bootstrap:+, tunnel-agent-bootstrap.yaml (nodes $bootstrap)}, tunnel-dnat-helper-tls.yaml, ${#nodes[@]} agent certificate(s), tunnel-connect-tokens.yaml; keep $out/pki/ca/ca.key offline"
