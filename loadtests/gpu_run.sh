#!/usr/bin/env bash
# The GPU smoke checks, then the GPU benchmark, on a machine whose Python has torch/transformers/peft but
# not bitsandbytes: wheels placed in .whl/ (see README "Performance") are installed to a private target first.
#   bash loadtests/gpu_run.sh OUT_DIR [bench_gpu options...]     (e.g. --layers 32 for the full 7B depth)
# OUT_DIR/smoke: loadtests/gpu_smoke.py (a 2-layer 7B-width base, about a minute); OUT_DIR: bench_gpu.
set -euo pipefail
out_dir=${1:?usage: gpu_run.sh OUT_DIR [options]}; shift
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
PYTHONUNBUFFERED=1 python3 -m loadtests.gpu_smoke "$out_dir/smoke" || echo "gpu_smoke: some checks failed (see $out_dir/smoke/smoke.md)"
PYTHONUNBUFFERED=1 python3 -m loadtests.bench_gpu "$out_dir" "$@"
