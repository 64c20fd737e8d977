#!/usr/bin/env bash
# GPU path check: a 2-silo causal-LM federation (SmolLM2-135M-Instruct) with bf16 compute,
# 4-bit QLoRA and gradient checkpointing, run by `fedsilo run` on this machine's CUDA device.
# Where no CUDA device exists it prints one "no GPU" line and exits 0, so it can sit in any
# pipeline. Needs the `gpu` extra (bitsandbytes): pip install -e '.[gpu]' (or the image's cuda target).
#
#   bash scripts/gpu-check.sh [rounds] [localSteps]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
ROUNDS=${1:-2}
STEPS=${2:-20}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "gpu-check: no GPU (torch.cuda.is_available() is false): skipped"
    exit 0
fi
"$PY" -c 'import bitsandbytes' 2>/dev/null || {
    echo "gpu-check: bitsandbytes is missing: pip install -e '.[gpu]'" >&2
    exit 1
}
"$PY" -c 'import torch; p = torch.cuda.get_device_properties(0); print(f"gpu-check: {p.name}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}")'

"$PY" examples/prepare_models.py --smollm2 >/dev/null
"$PY" examples/prepare_chatterbot.py >/dev/null
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cat > "$work/gpu-check.yaml" <<YAML
apiVersion: fedsilo.io/v1alpha1
kind: FederatedJob
metadata: {name: gpu-check}
spec:
  baseModel: {path: $PWD/examples/data/models/SmolLM2-135M-Instruct}
  task: {type: causal-lm, evalPrompts: ["What is a computer?"], maxNewTokens: 16}
  peft: {method: lora, r: 16, alpha: 32, dropout: 0.0, targetModules: [q_proj, k_proj, v_proj, o_proj]}
  training:
    rounds: $ROUNDS
    localSteps: $STEPS
    batchSize: 8
    learningRate: 0.0005
    maxLength: 256
    precision: bf16
    loadIn4bit: true
    gradientCheckpointing: true
    seed: 0
  aggregation: {strategy: fedavg, minSilos: 2, roundTimeoutSeconds: 900}
  silos:
    - {name: helpdesk, data: {path: $PWD/examples/data/chatterbot/helpdesk.jsonl, validationSplit: 0.05}}
    - {name: academy, data: {path: $PWD/examples/data/chatterbot/academy.jsonl, validationSplit: 0.05}}
YAML
started=$(date +%s)
"$PY" -m fedsilo run "$work/gpu-check.yaml" --out "$work/runs"
echo "gpu-check: ${ROUNDS} rounds in $(( $(date +%s) - started )) s"
column -s, -t < "$work/runs/gpu-check/latest/rounds.csv"
grep -h "memory estimate\|peak" "$work"/runs/gpu-check/latest/*.log 2>/dev/null | head -4 || true
echo "gpu-check: passed"
