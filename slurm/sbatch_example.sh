#!/bin/bash
# The hypothesis grid as a plain Slurm job array, without submitit: what `facevae sweep submit` does, in one file.
# Array element i trains hypothesis i of the grid in SWEEP_DIR/<hypothesis>/ (srun: one rank per task, i.e. per
# GPU, on one or more nodes), then evaluates it. Before the time limit Slurm sends USR2 to this script; it passes
# the signal to every rank, each rank saves a checkpoint at the next step boundary, and the element requeues
# itself; the requeued run resumes from that checkpoint (the trainer's resume=auto). An element whose evaluation
# exists exits at once, so submitting the same command again only redoes what is unfinished.
#
# Submit from the repository root; resources go on the command line so this file fits any cluster:
#   SHARDS=/shared/shards/celeba SWEEP_DIR=/shared/sweeps/paper10 \
#   sbatch --array=0-9%4 --partition=gpu --nodes=1 --ntasks-per-node=8 --gpus-per-node=8 --cpus-per-task=8 \
#          --mem=200G --time=24:00:00 slurm/sbatch_example.sh --max-steps 100000 --mixed-precision bf16
# Arguments after the script go to `facevae train` (see `facevae train --help`). GRID=paper15 (default paper10) or
# HYPOTHESES=l2/none,H9 (names or aliases) choose other hypotheses; --array must be 0..count-1.
# SHARDS and SWEEP_DIR must be on a filesystem every node sees. PYTHON=/path/to/venv/bin/python if the job's
# PATH has no environment with facevae_dist installed.
#
# Try it on this machine with the local one-node cluster (slurm/local-cluster/start.sh), on CPU:
#   SHARDS=shards/synthetic SWEEP_DIR=sweeps/sbatch HYPOTHESES=l2/none,l2/mask+decoder \
#   sbatch --array=0-1 --cpus-per-task=1 --time=30 slurm/sbatch_example.sh --max-steps 20 --set model.width=0.25
# Watch: squeue; tail -f facevae-grid-<jobid>_<i>.out. Preempt element 0 by hand (it requeues and resumes):
#   scancel --batch --signal=USR2 <jobid>_0
#
#SBATCH --job-name=facevae-grid
#SBATCH --output=%x-%A_%a.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR2@180
# B:USR2@180: the signal goes to this script (which forwards it), 180 s before the limit: room for a step and a
# checkpoint. Size it to your step time + checkpoint time; Slurm may send it up to ~30 s early.
set -uo pipefail

: "${SHARDS:?set SHARDS to the shards directory (facevae shards build)}"
: "${SWEEP_DIR:?set SWEEP_DIR to the sweep output directory}"
: "${SLURM_ARRAY_TASK_ID:?submit with sbatch --array=0-<count-1>}"
PYTHON=${PYTHON:-python}

# hypothesis number SLURM_ARRAY_TASK_ID of the grid: "<name> <run dir name>"
spec=$("$PYTHON" - "$SLURM_ARRAY_TASK_ID" <<'EOF'
import os, sys
from facevae_dist.hypotheses import GRIDS, resolve_hypothesis
from facevae_dist import hypotheses
grid = os.environ.get("GRID") or getattr(hypotheses, "DEFAULT_GRID", "paper10")
names = [h for h in os.environ.get("HYPOTHESES", "").split(",") if h.strip()] or GRIDS[grid]
i = int(sys.argv[1])
if i >= len(names):
    sys.exit(f"array index {i}: only {len(names)} hypotheses, submit with --array=0-{len(names) - 1}")
h = resolve_hypothesis(names[i])
print(h.name, h.slug)
EOF
) || exit 2
read -r NAME SLUG <<<"$spec"
RUN_DIR=$SWEEP_DIR/$SLUG
if [ -f "$RUN_DIR/eval/metrics.json" ]; then
  echo "$NAME: already finished ($RUN_DIR/eval/metrics.json)"
  exit 0
fi
echo "$NAME -> $RUN_DIR (job ${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}, run $(( ${SLURM_RESTART_COUNT:-0} + 1 )))"

# Rendezvous of this element's ranks: the first node, a port from the job id (array elements differ), in
# 20000-32767: below Linux's ephemeral range (32768-60999), where an outgoing connection could hold it (as
# facevae_dist/sweep/submit.py:rendezvous_port does for the submitit path).
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
export MASTER_ADDR
export MASTER_PORT=$(( 20000 + SLURM_JOB_ID % 12768 ))
export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}

requeue=0
step_pid=
on_usr2() {
  echo "USR2 (time limit or preemption): every rank checkpoints, then this element is requeued"
  requeue=1
  [ -n "$step_pid" ] && kill -USR2 "$step_pid" 2>/dev/null   # srun forwards it to every rank
}
trap on_usr2 USR2

# One rank per task, wired like torchrun does it (RANK, LOCAL_RANK, WORLD_SIZE + MASTER_ADDR/PORT); Accelerate in
# the trainer reads them. Runs in the background so that this script can take the signal while srun runs.
# --cpus-per-task: Slurm 22.05-23.02 do not hand sbatch's value to srun, so without it each rank (and its data
# workers) may be bound to one core. --kill-on-bad-exit: a rank that dies ends the others at once, instead of
# leaving them in a collective until the process-group timeout.
run_ranks() {
  srun --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" --kill-on-bad-exit=1 bash -c 'export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS
    export LOCAL_WORLD_SIZE=${SLURM_NTASKS_PER_NODE:-$(( SLURM_NTASKS / SLURM_NNODES ))}; exec "$@"' rank "$@" &
  step_pid=$!
  local rc
  while :; do
    wait "$step_pid"; rc=$?
    kill -0 "$step_pid" 2>/dev/null || break   # a trapped signal interrupts `wait`; wait again until srun ends
  done
  step_pid=
  return "$rc"
}

requeue_if_signalled() {
  if [ "$requeue" = 1 ]; then
    scontrol requeue "${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}" && echo "requeued"
    exit 0
  fi
}

run_ranks "$PYTHON" -m facevae_dist train --hypothesis "$NAME" --shards "$SHARDS" --run-dir "$RUN_DIR" "$@"
rc=$?
requeue_if_signalled
[ "$rc" = 0 ] || { echo "$NAME: training failed (exit $rc); see the lines above"; exit "$rc"; }

run_ranks "$PYTHON" -m facevae_dist eval "$RUN_DIR" --shards "$SHARDS" --split "${EVAL_SPLIT:-test}"
rc=$?
requeue_if_signalled   # a requeued element finds training finished and evaluates again
[ "$rc" = 0 ] || { echo "$NAME: evaluation failed (exit $rc)"; exit "$rc"; }
echo "$NAME: finished ($RUN_DIR/eval/metrics.json)"
