#!/usr/bin/env bash
# The reference experiment, exactly as it was run (docs/reference/README.md), from the repository root after
# `make setup` (or `pip install -e .`). About 2 hours of training on a 2-core CPU (4 CPU-hours), then a few minutes
# for the learning curve, export, report and the fresh-face check. Every step is resumable: rerun this script after an
# interruption and finished work is skipped (the sweep resumes its elements from their last checkpoints).
set -euo pipefail
export PATH="$PWD/.venv/bin:$PATH"

# 1. 20,000 synthetic faces (16,000 train / 2,000 val / 2,000 test), squashed to 36 px, stored losslessly
[ -f shards/reference-36/manifest.json ] || \
  facevae shards build --source synthetic --n 20000 --image-size 36 --image-format png --out shards/reference-36

# 2. the paper's question, l2 without vs with the face mask (+ the mask decoder), two seeds each: four elements,
#    one CPU thread each, run as local jobs through the sweep's own submission and preemption path; each element
#    evaluates itself on the whole test split when it finishes. The profile (README "Profile") is everything after
#    --set. Rerunning the same command resubmits only unfinished elements, which resume from their checkpoints.
facevae sweep submit --hypotheses l2/none,l2/mask+decoder --seeds 0,1 --shards shards/reference-36 \
  --out sweeps/reference --cluster local --cpus-per-task 1 \
  --set model.image_size=36 --set model.width=0.25 --set optim.clip=none --set optim.lr=1e-3 \
  --set max_steps=20000 --set val_every=2000 --set val_batches=20 --set ckpt_every=1000 --set keep_last=100 \
  --set sample_every=2000 --set data.workers=0 --wait
facevae sweep status sweeps/reference

RUNS=(sweeps/reference/l2--none/seed-0 sweeps/reference/l2--none/seed-1
      sweeps/reference/l2--mask+decoder/seed-0 sweeps/reference/l2--mask+decoder/seed-1)

# 3. learning curves: every kept checkpoint (each 1,000 steps) scored on the first 300 test faces
OMP_NUM_THREADS=2 facevae curve "${RUNS[@]}" --out sweeps/reference/curve --device cpu --target 0.40
mkdir -p docs/reference/curve
cp sweeps/reference/curve/curve.csv sweeps/reference/curve/curve.json sweeps/reference/curve/learning_curve.png \
  docs/reference/curve/

# 4. the models, as standalone directories (model.safetensors + config.json + export.json), best by validation
for run in "${RUNS[@]}"; do
  name="$(basename "$(dirname "$run")")--$(basename "$run")"
  facevae export "$run" --out "docs/reference/models/$name"
done

# 5. the report over seeds: tables per region, the paired mask effect, the paper's claims, figures
facevae report "${RUNS[@]}" --out docs/reference/report

# 6. re-evaluate the exported models on faces generated afresh (another generator seed), as a user handed the
#    models would (tests/test_reference.py repeats this and checks the recorded numbers)
[ -f shards/fresh-36/manifest.json ] || \
  facevae shards build --source synthetic --n 300 --seed 2026 --split-ratios 0,0,1 --image-size 36 \
    --image-format png --out shards/fresh-36
for model in docs/reference/models/*/; do
  facevae eval "$model" --shards shards/fresh-36 --device cpu --bootstrap 200 \
    --out "sweeps/reference/fresh/$(basename "$model")/metrics.json"
done

# 7. results.json: the numbers the README quotes and tests/test_reference.py checks
python - <<'PY'
import json, pathlib
ref, sweep = pathlib.Path("docs/reference"), pathlib.Path("sweeps/reference")
def face(path):
    m = json.loads(pathlib.Path(path).read_text())
    return m, round(1 - m["metrics"]["face"]["ssim"]["mean"], 6)
models = sorted(p.name for p in (ref / "models").iterdir() if p.is_dir())
test, fresh = {}, {}
for name in models:
    hyp, seed = name.rsplit("--seed-", 1)
    m, test[name] = face(sweep / hyp / f"seed-{seed}" / "eval" / "metrics.json")
    test_n = m["n_images"]
    _, fresh[name] = face(sweep / "fresh" / name / "metrics.json")
results = {"target_face_1-ssim": 0.40, "image_size": 36,
           "metric": "1-SSIM of the raw decoder output on ground-truth face pixels (facevae eval, region face)",
           "test_split": {"n": test_n, "face_1-ssim": test},
           "fresh_faces": {"n": 300, "seed": 2026, "face_1-ssim": fresh}}
(ref / "results.json").write_text(json.dumps(results, indent=2) + "\n")
print(json.dumps(results, indent=2))
PY
