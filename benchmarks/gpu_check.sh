#!/usr/bin/env bash
# The GPU check (one H200, under 8 minutes): DDP and FSDP2 on a real NCCL process group with devices=1, a 2-shot
# prune + KD run of SmolLM2 in bf16 with int8/nf4 teachers, the KD teacher check and the LLaMA-7B-shape FSDP2 timing.
# Writes benchmarks/results/gpu_check.json and prints one table; see benchmarks/gpu_check.py for the parts.
#
#   bash benchmarks/gpu_check.sh              # PYTHON=/path/to/python to use another interpreter
#   bash benchmarks/gpu_check.sh --dry-run    # print the commands only (any machine)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}"

if [[ " $* " != *" --dry-run "* ]]; then
  if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "error: no CUDA device visible to $PYTHON; this check needs one GPU (use --dry-run to see the commands)" >&2
    exit 2
  fi
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
# The parts carry their own deadlines (230 s + 200 s); this outer limit only guards against a hang of the driver.
exec timeout --signal=KILL 470 "$PYTHON" -m benchmarks.gpu_check "$@"
