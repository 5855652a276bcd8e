#!/usr/bin/env bash
# Train the three demo experts on the default base (CPU is fine: a few minutes each).
# Usage: training/demo/train_all.sh   (from the repository root, with the venv's loraplex on PATH)
set -euo pipefail
seconds=()
cd "$(dirname "$0")"
python -m training.demo.make_data >/dev/null 2>&1 || (cd ../.. && python -m training.demo.make_data)
for name in json-answer pirate terse; do
  meta="$name/heldout.json"
  description=$(python -c "import json,sys; print(json.load(open('$meta'))['description'])")
  mapfile -t examples < <(python -c "import json; [print(e) for e in json.load(open('$meta'))['examples']]")
  args=()
  for e in "${examples[@]}"; do args+=(--example "$e"); done
  start=$(date +%s.%N)
  loraplex train --data "$name/train.jsonl" --name "$name" --out "$name/adapter" \
    --epochs 3 --rank 8 --lr 1e-3 --description "$description" "${args[@]}"
  seconds+=("$name=$(python -c "print(round($(date +%s.%N) - $start))")")
  echo "$name: ${seconds[-1]#*=} s"
done
# wall time per expert, model load included, for the README's Performance section
(cd ../.. && python - "${seconds[@]}" <<'PY'
import json, sys
from loadtests.provenance import stamp
record = {**stamp("training/demo/train_all.sh", []), "wall_s": {k: int(v) for k, v in (a.split("=") for a in sys.argv[1:])}}
record["command"] = "training/demo/train_all.sh"
open("loadtests/results/demo_training.json", "w").write(json.dumps(record, indent=2) + "\n")
PY
)
