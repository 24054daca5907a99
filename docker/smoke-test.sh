#!/usr/bin/env bash
# Runs the images docker/build-images.sh built, as containers on this
# machine's loopback, and moves data through them:
#
#   - tunnel-certs (from the image) issues the certificates and a bootstrap
#     token;
#   - a kubelet-like HTTPS target (sample-kubelet, mounted into the main
#     image), tunnel-server and tunnel-agent run as three containers with
#     --network host, each as uid 65532; the agent starts with an empty
#     certificate directory (prepared by `tunnel-certs prepare-dir` as the
#     DaemonSet's init container does) and enrolls with the token and the
#     CA pin;
#   - curl on the host reaches the target through the server's CONNECT
#     ingress, verifying the target's own certificate, and sends 32 MiB
#     through it and back (compared byte for byte);
#   - the DNAT image, in a network namespace of its own with NET_ADMIN and
#     NET_RAW only, installs its iptables rules for a static range, and a
#     second container from the same image reads them back with
#     iptables-save; SIGTERM stops it with exit status 0 (that the rules
#     are removed then is the netns tests' business).
#
#   bash docker/smoke-test.sh     # after docker/build-images.sh
set -euo pipefail
cd "$(dirname "$0")/.."

version=$(sed -n '/^\[workspace.package\]/,/^\[/s/^version = "\(.*\)"$/\1/p' Cargo.toml)
prefix=${IMAGE_PREFIX:-localhost}
# ARCH=arm64 runs the arm64 images (emulated: qemu-user-static's binfmt
# handlers must be registered, as `apt-get install qemu-user-static`
# does); the default is this host's, under the names the manifests use.
host_arch=$(dpkg --print-architecture)
arch=${ARCH:-$host_arch}
tag=$version
[ "$arch" = "$host_arch" ] || tag=$version-$arch
image=$prefix/edge-tunnel:$tag
dnat_image=$prefix/edge-tunnel-dnat:$tag
# shellcheck source=docker/podman-env.sh
source docker/podman-env.sh

# The images the manifests name are the ones tested here.
if [ "$arch" = "$host_arch" ] && command -v kubectl >/dev/null 2>&1; then
    named=$(kubectl kustomize docker/kubernetes | sed -n 's/^ *image: *//p' | sort -u)
    for want in "$image" "$dnat_image"; do
        grep -qx "$want" <<<"$named" ||
            { echo "the manifests do not name $want; they name: $named" >&2; exit 1; }
    done
fi

QUIC=${QUIC_PORT:-28443} CONNECT=${CONNECT_PORT:-28080} ADMIN=${ADMIN_PORT:-28081} KUBELET=${KUBELET_PORT:-30250}
kubelet_bin=${SAMPLE_KUBELET:-target/release/sample-kubelet}
[ -x "$kubelet_bin" ] || cargo build --release --locked -p e2e --bin sample-kubelet

work=$(mktemp -d)
chmod 755 "$work"
names=()
cleanup() {
    status=$?
    if [ $status -ne 0 ]; then
        for n in "${names[@]}"; do
            echo "---- logs of $n" >&2
            podman logs "$n" >&2 2>&1 || true
        done
    fi
    for n in "${names[@]}"; do podman rm -f -t 2 "$n" >/dev/null 2>&1 || true; done
    rm -rf "$work"
    exit $status
}
trap cleanup EXIT
run_id=$$

certs_out() { podman run --rm --arch "$arch" --network none --user "$(id -u):$(id -g)" -v "$work:/pki" \
    --entrypoint /usr/local/bin/tunnel-certs "$image" "$@"; }
certs() { certs_out "$@" >/dev/null; }
echo "==> certificates, issued by tunnel-certs in $image"
certs ca --out /pki/ca
certs server --ca /pki/ca --out /pki/server --ip 127.0.0.1 --dns localhost
certs ca --out /pki/enroll-ca --common-name "edge-tunnel enrollment CA"
cat "$work/ca/ca.crt" "$work/enroll-ca/ca.crt" > "$work/server/ca.crt"
mkdir -p "$work/bootstrap" "$work/state" "$work/agent-pki"
certs_out token create --tokens-file /pki/bootstrap/tokens --node edge-1 --ttl 10m 2>/dev/null > "$work/bootstrap/token"
pin=$(certs_out ca-hash --ca /pki/ca)
certs ca --out /pki/kubelet-ca --common-name "kubelet CA"
certs server --ca /pki/kubelet-ca --out /pki/kubelet --dns edge-1 --ip 127.0.0.1
# The containers run as 65532: let them read the keys of this throw-away
# PKI, and the server write its enrollment state.
chmod -R a+rX "$work"
chmod 777 "$work/state"
echo "==> the agent's certificate directory, as the DaemonSet's init container prepares it"
podman run --rm --arch "$arch" --network none --user 0:0 --cap-drop all --cap-add CHOWN,FOWNER \
    -v "$work/agent-pki:/var/lib/edge-tunnel/pki" --entrypoint /usr/local/bin/tunnel-certs "$image" \
    prepare-dir --dir /var/lib/edge-tunnel/pki --owner 65532:65532
[ "$(stat -c '%u:%g %a' "$work/agent-pki")" = "65532:65532 700" ] ||
    { echo "prepare-dir left $(stat -c '%u:%g %a' "$work/agent-pki")" >&2; exit 1; }

start() {
    local name=$1 run_arch=$2
    shift 2
    names+=("$name")
    podman run -d --name "$name" --arch "$run_arch" --network host --stop-timeout 10 -v "$work:/pki:ro" "$@" >/dev/null
}
# The target is a host binary: it runs in the host architecture's image.
start "et-kubelet-$run_id" "$host_arch" -v "$PWD/$kubelet_bin:/usr/local/bin/sample-kubelet:ro" \
    --entrypoint /usr/local/bin/sample-kubelet "$prefix/edge-tunnel:$version" --listen "127.0.0.1:$KUBELET" --cert-dir /pki/kubelet
start "et-server-$run_id" "$arch" -v "$work/state:/state" "$image" --listen "127.0.0.1:$QUIC" --cert-dir /pki/server \
    --allow-loopback-agents --connect-listen "127.0.0.1:$CONNECT" --admin-listen "127.0.0.1:$ADMIN" \
    --enroll-ca-dir /pki/enroll-ca --enroll-tokens-file /pki/bootstrap/tokens --enroll-state-file /state/enroll-state
start "et-agent-$run_id" "$arch" -v "$work/agent-pki:/var/lib/edge-tunnel/pki" \
    --tmpfs /run/edge-tunnel:rw,size=1m,mode=1777 \
    --entrypoint /usr/local/bin/tunnel-agent "$image" \
    --server "127.0.0.1:$QUIC" --server-name localhost --cert-dir /var/lib/edge-tunnel/pki \
    --instance-lock /var/lib/edge-tunnel/pki/agent.lock --status-file /run/edge-tunnel/status \
    --bootstrap-token-file /pki/bootstrap/token --ca-cert-hash "$pin" --node-ip 127.0.0.1 \
    --node-name edge-1 --allow "127.0.0.1:$KUBELET"

echo "==> waiting for the agent to enroll and register"
for i in $(seq 1 300); do
    # Captured, not piped: `grep -q` stops reading at the first match and,
    # under pipefail, curl's "Failed writing body" would fail the pipeline.
    agents=$(curl -fsS "http://127.0.0.1:$ADMIN/v1/agents" 2>/dev/null || true)
    if grep -q '"edge-1"' <<<"$agents"; then break; fi
    [ "$i" -eq 300 ] && { echo "the agent did not register within 30 s" >&2; exit 1; }
    sleep 0.1
done
[ "$(stat -c '%u %a' "$work/agent-pki/tls.key")" = "65532 600" ] ||
    { echo "the enrolled key is $(stat -c '%u %a' "$work/agent-pki/tls.key"), not 65532 600" >&2; exit 1; }
metrics=$(curl -fsS "http://127.0.0.1:$ADMIN/metrics")
grep -q '^edge_tunnel_enrollments_total{result="issued"} 1$' <<<"$metrics" ||
    { echo "the server counted no enrollment" >&2; exit 1; }
echo "    enrolled: $(grep -c BEGIN "$work/agent-pki/tls.crt") certificate written on the node, key 0600"
for n in "${names[@]}"; do
    [ "$(podman inspect --format '{{.Config.User}}' "$n")" = "65532:65532" ] ||
        { echo "$n does not run as 65532" >&2; exit 1; }
done

echo "==> the agent's exec probes (the manifest's liveness and readiness)"
for i in $(seq 1 50); do
    if podman exec "et-agent-$run_id" /usr/local/bin/tunnel-agent check-status /run/edge-tunnel/status --ready \
        >/dev/null 2>&1; then break; fi
    [ "$i" -eq 50 ] && { echo "the agent's status file did not say ready within 5 s" >&2; exit 1; }
    sleep 0.1
done
podman exec "et-agent-$run_id" /usr/local/bin/tunnel-agent check-status /run/edge-tunnel/status --ready
podman exec "et-agent-$run_id" /usr/local/bin/tunnel-agent check-status /run/edge-tunnel/status --max-age=60s

echo "==> through the tunnel: GET /healthz"
curl -fsS --max-time 20 --cacert "$work/kubelet-ca/ca.crt" -p -x "http://127.0.0.1:$CONNECT" \
    "https://edge-1:$KUBELET/healthz"

echo "==> through the tunnel: 32 MiB there and back"
head -c $((32 << 20)) /dev/urandom >"$work/blob"
curl -fsS --max-time 60 --cacert "$work/kubelet-ca/ca.crt" -p -x "http://127.0.0.1:$CONNECT" \
    --data-binary "@$work/blob" -H 'Content-Type: application/octet-stream' \
    -o "$work/blob.back" "https://edge-1:$KUBELET/echo"
cmp "$work/blob" "$work/blob.back"
relayed=$(curl -fsS "http://127.0.0.1:$ADMIN/metrics" |
    awk '/^edge_tunnel_relayed_bytes_total\{direction="from_agent"\}/ { print $2 }')
echo "    identical; the server relayed ${relayed:-?} bytes from the agent"

echo "==> SIGTERM: every container exits 0"
for n in "et-agent-$run_id" "et-server-$run_id"; do
    podman stop -t 10 "$n" >/dev/null
    code=$(podman inspect --format '{{.State.ExitCode}}' "$n")
    [ "$code" = "0" ] || { echo "$n exited $code" >&2; exit 1; }
done

if [ "$arch" != "$host_arch" ]; then
    # qemu-user does not translate netfilter netlink sockets ("Failed to
    # initialize nft: Protocol not supported"), so an emulated DNAT helper
    # cannot install rules: check that its tools load and run (conntrack
    # opens a netlink socket even for --version and hangs under qemu).
    echo "==> $dnat_image (emulated): its tools run"
    for tool in /usr/sbin/iptables-nft-restore /usr/sbin/iptables-legacy-restore /usr/sbin/ip6tables-nft-restore \
        /usr/local/bin/tunnel-server; do
        out=$(timeout 60 podman run --rm --arch "$arch" --network none --entrypoint "$tool" "$dnat_image" --version 2>&1) ||
            { echo "$tool --version failed: $out" >&2; exit 1; }
        echo "    ${out%%$'\n'*}"
    done
    echo "==> images work ($arch, emulated)"
    exit 0
fi

echo "==> $dnat_image: DNAT rules in a namespace of its own"
dnat="et-dnat-$run_id"
names+=("$dnat")
podman run -d --name "$dnat" --arch "$arch" --network none --cap-drop all --cap-add NET_ADMIN,NET_RAW \
    -v "$work:/pki:ro" "$dnat_image" --listen 127.0.0.1:8443 --cert-dir /pki/server \
    --transparent-listen 127.0.0.1:8081 --dnat --dnat-ports 10250 --dnat-cidr 198.18.96.0/24 >/dev/null
rules=""
for i in $(seq 1 100); do
    rules=$(podman run --rm --arch "$arch" --network "container:$dnat" --cap-drop all --cap-add NET_ADMIN,NET_RAW \
        --entrypoint /usr/sbin/iptables-nft-save "$dnat_image" -t nat 2>/dev/null || true)
    if grep -q -- "-A TUNNEL-DNAT -d 198.18.96.0/24" <<<"$rules"; then break; fi
    [ "$i" -eq 100 ] && { echo "no DNAT rule for 198.18.96.0/24 within 10 s:" >&2; echo "$rules" >&2; exit 1; }
    sleep 0.1
done
grep -- "-A TUNNEL-DNAT" <<<"$rules" | sed 's/^/    /'
podman stop -t 10 "$dnat" >/dev/null
code=$(podman inspect --format '{{.State.ExitCode}}' "$dnat")
[ "$code" = "0" ] || { echo "$dnat exited $code" >&2; exit 1; }
echo "==> images work"
