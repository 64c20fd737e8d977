#!/usr/bin/env bash
# Copy the generated CRD and the Grafana dashboard into the hub chart (Helm packages only
# files inside the chart folder, so the chart keeps copies). Run after regenerating
# crds/federatedjob.yaml or editing dashboards/fedsilo.json.
#
#   scripts/sync-chart-crd.sh          copy
#   scripts/sync-chart-crd.sh --check  exit 1 if a chart copy is stale (CI)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PAIRS=(
  "crds/federatedjob.yaml:charts/fedsilo/crds/federatedjob.yaml"
  "dashboards/fedsilo.json:charts/fedsilo/dashboards/fedsilo.json"
)
check=0
[[ "${1:-}" == "--check" ]] && check=1

status=0
for pair in "${PAIRS[@]}"; do
  src="$ROOT/${pair%%:*}"
  dst="$ROOT/${pair##*:}"
  if [[ ! -f "$src" ]]; then
    echo "skip ${pair%%:*}: not generated yet"
    continue
  fi
  if cmp -s "$src" "$dst"; then
    echo "up to date: ${pair##*:}"
  elif [[ $check == 1 ]]; then
    echo "stale: ${pair##*:} differs from ${pair%%:*}; run scripts/sync-chart-crd.sh" >&2
    status=1
  else
    mkdir -p "$(dirname "$dst")"
    cp "$src" "$dst"
    echo "copied ${pair%%:*} -> ${pair##*:}"
  fi
done
exit $status
