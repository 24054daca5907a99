#!/usr/bin/env bash
# Runs every check and test edge-tunnel has: formatting, clippy with
# warnings denied, the whole test suite (unit, property, loopback
# end-to-end, and real-NAT end-to-end in network namespaces, which need
# root, iptables, curl, prometheus and prometheus-node-exporter: skipped
# without them, a failure under CI=true), and the quickstart as a smoke
# test. This is what CI runs (.ci/run installs the system packages first).
set -euo pipefail
cd "$(dirname "$0")/.."

echo "==> cargo fmt --check"
cargo fmt --all -- --check
echo "==> cargo clippy --all-targets -- -D warnings"
cargo clippy --workspace --all-targets -- -D warnings
echo "==> cargo build --bins (the network-namespace tests run the real binaries)"
cargo build --workspace --bins
echo "==> cargo test --workspace"
cargo test --workspace
echo "==> Kubernetes manifests: render, validate strictly, check security posture"
bash docker/check-manifests.sh
echo "==> quickstart smoke test"
bash scripts/quickstart.sh >/dev/null
echo "==> all checks passed"
