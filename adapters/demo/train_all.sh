#!/usr/bin/env bash
# Train the three demo experts on the default base (CPU is fine: a few minutes each).
# Usage: adapters/demo/train_all.sh   (from the repository root, with the venv's loraplex on PATH)
set -euo pipefail
cd "$(dirname "$0")"
python -m adapters.demo.make_data >/dev/null 2>&1 || (cd ../.. && python -m adapters.demo.make_data)
for name in json-answer pirate terse; do
  meta="$name/heldout.json"
  description=$(python -c "import json,sys; print(json.load(open('$meta'))['description'])")
  mapfile -t examples < <(python -c "import json; [print(e) for e in json.load(open('$meta'))['examples']]")
  args=()
  for e in "${examples[@]}"; do args+=(--example "$e"); done
  /usr/bin/time -f "$name: %e s" loraplex train --data "$name/train.jsonl" --name "$name" --out "$name/adapter" \
    --epochs 3 --rank 8 --lr 1e-3 --description "$description" "${args[@]}"
done
