#!/usr/bin/env bash
# Renders, validates (strict, offline) and checks the posture of every
# kustomize target. Needs kubectl and the PyPI package kubernetes-validate;
# without them it skips, and under CI=true it fails.
set -euo pipefail
cd "$(dirname "$0")"
missing=()
command -v kubectl >/dev/null 2>&1 || missing+=(kubectl)
command -v kubernetes-validate >/dev/null 2>&1 || missing+=("kubernetes-validate (pip install kubernetes-validate)")
if [ ${#missing[@]} -gt 0 ]; then
    if [ "${CI:-}" = "true" ]; then
        echo "manifest checks need: ${missing[*]}" >&2
        exit 1
    fi
    echo "SKIPPED manifest checks: missing ${missing[*]}"
    exit 0
fi
python3 check-manifests.py
# The Secret manifests make-secrets.sh writes are valid objects too.
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
bash make-secrets.sh "$tmp" --server-dns tunnel.example.com --bootstrap "edge-*" edge-1=198.18.1.2 edge-2=198.18.1.3,fd00::3 >/dev/null
# Running it again changes nothing it already wrote and still works.
bash make-secrets.sh "$tmp" edge-3=198.18.1.4 >/dev/null
kubernetes-validate --strict --quiet "$tmp"/*.yaml
# They hold private keys: readable by their owner only.
loose=$(find "$tmp" -type f -perm /077)
[ -z "$loose" ] || { echo "make-secrets.sh wrote files others can read:" >&2; echo "$loose" >&2; exit 1; }
echo "ok: make-secrets.sh output ($(ls "$tmp"/*.yaml | wc -l) Secrets)"
