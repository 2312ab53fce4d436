#!/usr/bin/env bash
# The grid's runs at the reference profile of commands.sh step 2, trained by the code of commit dcb19ab (the same
# trainer as commit 4875830, which trained the four l2 models of seeds 0,1), pinned in a clone OUTSIDE the checkout
# so that a new checkout or later work on main cannot lose or change them. Two phases:
#   seeds-0-1  the 16 runs of the 8 hypotheses other than l2, seeds 0 and 1 (two elements at a time: one
#              hypothesis, both seeds)
#   seed-2     the third seed of all ten hypotheses (two elements at a time: two hypotheses, seed 2)
# One CPU thread per element, at the lowest CPU priority. Resumable: rerun it after any interruption (a killed
# session, a reboot); finished elements are skipped and the others resume from their last checkpoint (every 1,000
# steps). The shards are rebuilt byte for byte from their seed where the grid directory is new.
#   usage: docs/reference/grid-runs.sh [GRID_DIR] [seeds-0-1|seed-2]
#          (defaults /root/facevae-grid and seed-2; run from the repository root)
set -euo pipefail
GRID=${1:-/root/facevae-grid}
PHASE=${2:-seed-2}
REPO=$PWD
PIN=dcb19ab
mkdir -p "$GRID"
if [ ! -d "$GRID/code" ]; then
  git clone -q "$REPO" "$GRID/code"
  git -C "$GRID/code" checkout -q "$PIN"
fi
[ "$(git -C "$GRID/code" rev-parse --short=7 HEAD)" = "$PIN" ] || { echo "$GRID/code is not at $PIN" >&2; exit 2; }
[ -f "$GRID/code/.venv/.installed" ] || make -C "$GRID/code" setup
export PATH="$GRID/code/.venv/bin:$PATH"
cd "$GRID"
[ -f shards/reference-36/manifest.json ] || \
  nice -n 19 facevae shards build --source synthetic --n 20000 --image-size 36 --image-format png \
    --out shards/reference-36
case "$PHASE" in
  seeds-0-1) SEEDS=0,1; BATCHES=(ssim+l2/mask+decoder ssim+l2/none ssim/mask+decoder ssim/none l1/mask+decoder l1/none
                                  ssim+l1/mask+decoder ssim+l1/none) ;;
  seed-2) SEEDS=2; BATCHES=(l2/none,l2/mask+decoder ssim/none,ssim/mask+decoder ssim+l2/none,ssim+l2/mask+decoder
                            ssim+l1/none,ssim+l1/mask+decoder l1/none,l1/mask+decoder) ;;
  *) echo "unknown phase '$PHASE': seeds-0-1 or seed-2" >&2; exit 2 ;;
esac
for hyps in "${BATCHES[@]}"; do
  nice -n 19 facevae sweep submit --hypotheses "$hyps" --seeds "$SEEDS" --shards shards/reference-36 \
    --out "$GRID/sweep" --cluster local --cpus-per-task 1 \
    --set model.image_size=36 --set model.width=0.25 --set optim.clip=none --set optim.lr=1e-3 \
    --set max_steps=20000 --set val_every=2000 --set val_batches=20 --set ckpt_every=1000 --set keep_last=100 \
    --set sample_every=2000 --set data.workers=0 --wait
done
facevae sweep status "$GRID/sweep"
