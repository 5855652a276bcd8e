#!/usr/bin/env bash
# The GPU kit in one command (issue 30): smoke checks, the end-to-end check of the real server, the benchmark.
#   bash loadtests/gpu_run.sh OUT_DIR          # the device machine: its python3 + the wheels in .whl/
#   bash loadtests/gpu_run.sh OUT_DIR --cpu    # a tiny model on this CPU: a check of the kit (tests/test_bench_gpu.py)
# The device image lacks what the server's HTTP edge, the NF4 base and the e2e check's client import: run
# loadtests/gpu_wheels.sh here first and carry .whl (README "The GPU kit"); they are installed into a private
# folder first (40 s at most). Each stage has a time limit (140, 140, 130 s: with the install, 7.5 minutes at
# worst), so one hang cannot eat a lent GPU's ~15 minutes; a stage stopped at its limit leaves what it wrote.
# OUT_DIR gets run.log (everything printed, as it goes), and per stage STAGE.md (its table) and STAGE.tgz (all its
# files), made when the stage ends: few files, as the device tool returns at most 8.
#   smoke  loadtests/gpu_smoke.py: a 2-layer Llama-2-7B-width NF4 base, each GPU path against a reference
#   e2e    loadtests/gpu_e2e.py: `loraplex serve` on a 4-layer 7B-width NF4 base, 8 experts, over HTTP
#   bench  loadtests/bench_gpu.py: engine throughput by batch size and adapter mix, 8 layers
# Environment: PYTHON (default python3), KIT_WHEELS (default .whl), KIT_LIMITS ("smoke e2e bench" seconds).
set -uo pipefail
out_dir=${1:?usage: gpu_run.sh OUT_DIR [--cpu]}
mode=${2:-gpu}
mkdir -p "$out_dir" && out_dir=$(cd "$out_dir" && pwd)
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
read -r limit_smoke limit_e2e limit_bench <<<"${KIT_LIMITS:-140 140 130}"
mkdir -p "$out_dir"
exec > >(tee -a "$out_dir/run.log") 2>&1
tee_pid=$!
started=$SECONDS

if [ "$mode" = "--cpu" ]; then
  tiny=(--shape tiny --device cpu)
  bench_args=(--batches 1,4 --prompt 16 --tokens 8)
else
  tiny=()
  bench_args=(--budget-s 75)
fi

wheels=${KIT_WHEELS:-.whl}
if compgen -G "$wheels/*.whl" >/dev/null; then
  timeout 40 "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/loraplex-site "$wheels"/*.whl || echo "== installing the wheels failed"
  export PYTHONPATH=/tmp/loraplex-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
timeout 20 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
"$PYTHON" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"

pack() {  # a stage's folder -> STAGE.md + STAGE.tgz beside it
  local name=$1
  [ -d "$out_dir/$name" ] || return 0
  for table in "$out_dir/$name"/*.md; do [ -f "$table" ] && cp "$table" "$out_dir/$name.md"; done
  tar -czf "$out_dir/$name.tgz" -C "$out_dir" "$name" && rm -rf "${out_dir:?}/$name"
}

stage() {  # NAME LIMIT_S COMMAND...: the command's whole process group is stopped at the limit
  local name=$1 limit=$2 began=$SECONDS rc
  shift 2
  echo "== $name: at most ${limit}s (kit at $((SECONDS - started))s)"
  timeout -k 15 "$limit" "$@"
  rc=$?
  case $rc in
    0) echo "== $name: passed in $((SECONDS - began))s" ;;
    124|137) echo "== $name: STOPPED at its ${limit}s limit" ;;
    *) echo "== $name: FAILED (exit $rc) after $((SECONDS - began))s" ;;
  esac
  pack "$name"
  failed+=$([ $rc -eq 0 ] || echo " $name")
}

failed=""
stage smoke "$limit_smoke" "$PYTHON" -m loadtests.gpu_smoke "$out_dir/smoke" "${tiny[@]}"
stage e2e "$limit_e2e" "$PYTHON" -m loadtests.gpu_e2e "$out_dir/e2e" "${tiny[@]}"
stage bench "$limit_bench" "$PYTHON" -m loadtests.bench_gpu "$out_dir/bench" "${tiny[@]}" "${bench_args[@]}"
echo "== kit done in $((SECONDS - started))s; ${failed:+not passed:$failed}${failed:-every stage passed}"
exec >&- 2>&-  # run.log complete before the script ends (tee reads to the end)
wait "$tee_pid" 2>/dev/null
[ -z "$failed" ]
