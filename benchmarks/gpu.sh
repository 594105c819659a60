#!/usr/bin/env bash
# One-GPU benchmark of raycollapse (benchmarks/README.md, "GPU"): exact selection and entropy
# on CUDA, unet48 generation and bf16 training throughput. Installs nothing.
#   benchmarks/gpu.sh [--out benchmarks/results/gpu.json] [--device cuda:0]
#   benchmarks/gpu.sh --cpu-smoke --out /tmp/gpu_smoke.json    # small sizes on the CPU
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${PYTHON:-}"
if [ -z "$py" ]; then
  if [ -x "$root/.venv/bin/python" ]; then py="$root/.venv/bin/python"; else py="python3"; fi
fi
if ! command -v "$py" >/dev/null 2>&1; then
  echo "gpu.sh: no Python interpreter '$py' (set PYTHON=...)" >&2
  exit 1
fi
cd "$root"
# the script exits 10 minutes in at the latest (the budget of one GPU session)
exec env PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" timeout 600 "$py" benchmarks/bench_gpu.py "$@"
