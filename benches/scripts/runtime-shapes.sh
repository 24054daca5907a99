#!/usr/bin/env bash
# Runs the quick benchmark for several server/agent runtime shapes, REPS
# times each, and prints the median tunnel ÷ direct ratio per workload.
#   bash benches/scripts/runtime-shapes.sh [REPS]
# Needs root; builds the release binaries first.
set -euo pipefail
cd "$(dirname "$0")/../.."
reps=${1:-2}
out=$(mktemp -d)
cargo build --release --bins
# name  server-runtime server-workers agent-runtime agent-workers
shapes=(
  "defaults(auto;server:cores/2,agent:1) - - - -"
  "server:1,agent:1 multi-thread 1 multi-thread 1"
  "server:2,agent:2 multi-thread 2 multi-thread 2"
  "current-thread(both) current-thread - current-thread -"
)
for shape in "${shapes[@]}"; do
  read -r name sr sw ar aw <<<"$shape"
  for rep in $(seq 1 "$reps"); do
    env_args=()
    [ "$sr" != - ] && env_args+=("BENCH_SERVER_RUNTIME=$sr")
    [ "$sw" != - ] && env_args+=("BENCH_SERVER_WORKERS=$sw")
    [ "$ar" != - ] && env_args+=("BENCH_AGENT_RUNTIME=$ar")
    [ "$aw" != - ] && env_args+=("BENCH_AGENT_WORKERS=$aw")
    echo "== $name, run $rep" >&2
    env "${env_args[@]}" target/release/benches --quick --fleet-agents 50 \
      --json "$out/$name.$rep.json" >/dev/null
  done
done
python3 - "$out" <<'PY'
import json, sys, glob, os, statistics
out = sys.argv[1]
runs = {}
for f in sorted(glob.glob(os.path.join(out, "*.json"))):
    name = os.path.basename(f).rsplit(".", 2)[0]
    runs.setdefault(name, []).append(json.load(open(f)))
names = list(runs)
workloads = [r["workload"].split(" (")[0] for r in runs[names[0]][0]["rows"]]
print("| runtime shape | " + " | ".join(workloads) + " |")
print("|---|" + "---:|" * len(workloads))
for name in names:
    cells = []
    for i in range(len(workloads)):
        cells.append("%.2f×" % statistics.median(r["rows"][i]["ratio"] for r in runs[name]))
    print(f"| {name} (n={len(runs[name])}) | " + " | ".join(cells) + " |")
PY
