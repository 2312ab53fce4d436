#!/usr/bin/env bash
# Plain-sbatch equivalent of `facevae sweep submit` for sites that do not want submitit: one array element per
# hypothesis, one node with 8 GPUs per element, requeue on USR2 (sent 120 s before the time limit, and on
# preemption where the admin enabled preempt_send_user_signal). Submit from the repository root:
#   sbatch slurm/sbatch_example.sh            (edit SHARDS / OUT / the #SBATCH lines first)
#SBATCH --job-name=facevae-paper15
#SBATCH --array=0-14%4
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR2@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=sweeps/paper15/logs/%A_%a.out
set -euo pipefail

SHARDS=${SHARDS:-/shared/shards/celeba}
OUT=${OUT:-/shared/sweeps/paper15}
# the grid, in the same order as `facevae_dist.hypotheses.GRIDS["paper15"]`
mapfile -t GRID < <(python -c 'from facevae_dist.hypotheses import GRIDS; print("\n".join(GRIDS["paper15"]))')
HYP=${GRID[$SLURM_ARRAY_TASK_ID]}
RUN_DIR="$OUT/${HYP//\//--}"
mkdir -p "$RUN_DIR"

# USR2 -> forward to the trainer (it checkpoints at the next step boundary and exits 0), then requeue this element.
# The rerun resumes from the checkpoint because --resume auto is the default.
requeue() {
  echo "USR2: checkpointing and requeueing ${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"
  kill -USR2 "$TRAIN_PID" 2>/dev/null || true
  wait "$TRAIN_PID" || true
  scontrol requeue "${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"
  exit 0
}
trap requeue USR2

srun --kill-on-bad-exit=1 torchrun --standalone --nproc_per_node "${SLURM_GPUS_ON_NODE:-8}" \
    -m facevae_dist.train --hypothesis "$HYP" --shards "$SHARDS" --run-dir "$RUN_DIR" \
    --batch-size 32 --max-steps 50000 --mixed-precision bf16 &
TRAIN_PID=$!
wait "$TRAIN_PID"

facevae eval "$RUN_DIR" --shards "$SHARDS" --split test
