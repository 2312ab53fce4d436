#!/usr/bin/env bash
# From the grid's runs to docs/reference/: export every finished run of grid-runs.sh, score all the exported models
# (the four l2 ones included) with this checkout's `facevae eval` on the 2,000 test faces and on 300 faces generated
# afresh, learning curves of the new runs, the report over the grid and results.json. Rerunnable at any time:
# unfinished runs are skipped (and listed), work already done is reused.
#   usage: docs/reference/grid-report.sh [GRID_DIR]   (default /root/facevae-grid; run from the repository root
#          after `make setup`)
set -euo pipefail
GRID=${1:-/root/facevae-grid}
REF=docs/reference
export PATH="$PWD/.venv/bin:$PATH"
TRAINED=$GRID/shards/reference-36   # what the runs trained on (built by the pinned trainer's code)
# The faces are scored on the same 20,000-face set rebuilt by this checkout (same generator seed: the same images
# byte for byte), which also holds the label maps the skin and hair measures read; and on 300 faces generated afresh.
SHARDS=$GRID/shards/reference-36-eval
FRESH=$GRID/shards/fresh-36-eval
[ -f "$TRAINED/manifest.json" ] || { echo "$TRAINED: missing; run docs/reference/grid-runs.sh first" >&2; exit 2; }
[ -f "$SHARDS/manifest.json" ] || facevae -q shards build --source synthetic --n 20000 --image-size 36 \
  --image-format png --out "$SHARDS"

# 1. export each finished run (a run is finished when its sweep element evaluated it)
RUNS=()
for run in "$GRID"/sweep/*/seed-*; do
  name="$(basename "$(dirname "$run")")--$(basename "$run")"
  if [ ! -f "$run/eval/metrics.json" ]; then echo "not finished yet: $run"; continue; fi
  RUNS+=("$run")
  [ -f "$REF/models/$name/model.safetensors" ] || facevae -q export "$run" --out "$REF/models/$name"
done

# 2. every committed model scored by this code on the whole test split and on fresh faces (colour and hair
#    measures included); an eval newer than its model is reused
[ -f "$FRESH/manifest.json" ] || facevae -q shards build --source synthetic --n 300 --seed 2026 \
  --split-ratios 0,0,1 --image-size 36 --image-format png --out "$FRESH"
for model in "$REF"/models/*/; do
  name=$(basename "$model")
  for set in test fresh; do
    out="$GRID/evals/$set/$name/metrics.json"; shards=$SHARDS; [ $set = fresh ] && shards=$FRESH
    [ "$out" -nt "$model/model.safetensors" ] || \
      OMP_NUM_THREADS=1 facevae -q eval "$model" --shards "$shards" --device cpu --bootstrap 200 --out "$out"
  done
done

# 3. learning curves of the new runs (every kept checkpoint on the first 300 test faces; cached between reruns;
#    CURVES=0 skips them)
if [ ${#RUNS[@]} -gt 0 ] && [ "${CURVES:-1}" != 0 ]; then
  OMP_NUM_THREADS=1 facevae -q curve "${RUNS[@]}" --out "$GRID/curve" --device cpu --target 0.40
  # curve/grid/: these runs beside every committed row of a run not in this sweep directory (the seed-0/1 runs'
  # directories are gone; their rows were scored by the same protocol on the same 300 test faces of the same shards)
  python - "$GRID/curve/curve.json" "$REF/curve/grid/curve.json" "$REF/curve/grid" <<'PY'
import json, sys
from facevae_dist.report.curves import write_curve
new, old = (json.load(open(p)) for p in sys.argv[1:3])
assert (new["split"], new["limit"]) == (old["split"], old["limit"]), "the committed curves were scored on other faces"
runs = {r["run"] for r in new["rows"]}
kept = [r for r in old["rows"] if r["run"] not in runs]
write_curve(kept + new["rows"], sys.argv[3], {"split": new["split"], "limit": new["limit"], "shards": new["shards"],
            "scored_earlier": f"the rows of the {len({r['run'] for r in kept})} runs not in the sweep directory, by "
            "earlier runs of this script (the l2 ones first by commands.sh: docs/reference/curve/curve.json)"},
            new["target"])
PY
fi

# 4. the report over every scored model
facevae -q report "$GRID"/evals/test/*/metrics.json --out "$REF/report"

# 5. results.json: the numbers the README quotes and tests/test_reference.py checks
python - "$GRID" <<'PY'
import json, pathlib, sys
grid, ref = pathlib.Path(sys.argv[1]), pathlib.Path("docs/reference")
import csv
CHECK = 100  # tests/test_reference.py re-evaluates every model on the first CHECK fresh faces (keeps CI short)
def face(path):
    m = json.loads(path.read_text())
    return m["n_images"], round(1 - m["metrics"]["face"]["ssim"]["mean"], 6)
def first(path, n):
    with (path.parent / "per_image.csv").open() as f:
        rows = sorted(csv.DictReader(f), key=lambda r: r["key"])[:n]
    return round(1 - sum(float(r["face.ssim"]) for r in rows) / len(rows), 6)
models = sorted(p.name for p in (ref / "models").iterdir() if p.is_dir())
test = {n: face(grid / "evals" / "test" / n / "metrics.json") for n in models}
fresh = {n: face(grid / "evals" / "fresh" / n / "metrics.json") for n in models}
check = {n: first(grid / "evals" / "fresh" / n / "metrics.json", CHECK) for n in models}
results = {"target_face_1-ssim": 0.40, "image_size": 36,
           "metric": "1-SSIM of the raw decoder output on ground-truth face pixels (facevae eval, region face)",
           "test_split": {"n": next(iter(test.values()))[0], "face_1-ssim": {n: v[1] for n, v in test.items()}},
           "fresh_faces": {"n": 300, "seed": 2026, "face_1-ssim": {n: v[1] for n, v in fresh.items()},
                           "check_first": CHECK, "face_1-ssim_first": check}}
(ref / "results.json").write_text(json.dumps(results, indent=2) + "\n")
print(json.dumps(results, indent=2))
PY

# 6. the READMEs' answer tables from the new report (their prose is written by hand from report/)
python tools/readme_tables.py
