"""What one sweep element asks Slurm for, and the sbatch script submitit writes for it.

    SlurmOptions         the resources of one array element, validated (one-line UsageErrors)
    slurm_parameters()   SlurmOptions -> submitit SlurmExecutor parameters: always --requeue; GPUs as --gpus-per-node
                         or --gres; --slurm-option KEY[=VALUE] passed through; --setup lines and the snapshot's
                         PYTHONPATH before srun
    sbatch_script()      the text submitit would write for a submission (`facevae sweep submit --dry-run`)

The job runs `python -m submitit.core._submit` with SlurmOptions.python_command: by default the interpreter that
submits, so that path must exist on every node (shared storage); --python and --setup point the job elsewhere.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

from submitit.slurm.slurm import _make_sbatch_string  # what SlurmExecutor writes: --dry-run shows the same text

from facevae_dist.errors import UsageError

# sbatch options the sweep sets itself: a pass-through copy would contradict them. Value: what to use instead.
MANAGED_SBATCH_OPTIONS = {
    "time": "use --timeout-min",
    "nodes": "use --nodes",
    "ntasks": "use --tasks-per-node (or --elements-per-gpu)",
    "ntasks-per-node": "use --tasks-per-node (or --elements-per-gpu)",
    "cpus-per-task": "use --cpus-per-task",
    "gpus": "use --gpus-per-node or --gres",
    "gpus-per-node": "use --gpus-per-node",
    "gres": "use --gres",
    "mem": "use --mem-gb",
    "partition": "use --partition",
    "account": "use --account",
    "qos": "use --qos",
    "constraint": "use --constraint",
    "signal": "use --signal-delay-s (the element needs the signal it is given)",
    "array": "use --array-parallelism (the sweep numbers the array itself)",
    "output": "the sweep's logs go to SWEEP_DIR/logs",
    "error": "the sweep's logs go to SWEEP_DIR/logs",
    "open-mode": "the sweep's logs are appended to across requeues",
    "requeue": "the sweep always asks for --requeue",
    "no-requeue": "a preempted element must be requeued to resume",
    "chdir": "the jobs start in the code snapshot (SWEEP_DIR/code/)",
    "wrap": "the sweep writes the script itself",
}
# an sbatch long option, written without its leading `--`
_OPTION_KEY = re.compile(r"[a-z][a-z0-9]*(-[a-z0-9]+)*")
# one generic resource: NAME[:TYPE][:COUNT], e.g. gpu:a100:8 or gpu:1g.10gb:2
_GRES_ENTRY = re.compile(r"[A-Za-z][\w.-]*(:[\w.-]+)*")


@dataclass
class SlurmOptions:
    """Resources of ONE array element. Ranks inside an element: nodes x tasks_per_node, all training one run; or,
    with elements_per_gpu K > 1, K independent single-rank runs (K Slurm tasks) sharing one GPU (or the CPUs)."""

    partition: str | None = None
    nodes: int = 1
    gpus_per_node: int = 0  # 0 = CPU; otherwise one task (rank) per GPU
    tasks_per_node: int | None = None  # ranks per node; None = one per GPU (1 on CPU); >1 on CPU = gloo ranks
    cpus_per_task: int = 2
    mem_gb: float | None = None
    timeout_min: int = 24 * 60
    array_parallelism: int = 15  # elements running at once
    signal_delay_s: int = 120  # preemption signal this long before the time limit: room for a step + checkpoint
    max_num_timeout: int = 30  # requeues after time limits (preemptions do not count)
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    elements_per_gpu: int = 1  # runs sharing one element's GPU: a batch-32 run uses a fraction of an H100
    gres: str | None = None  # e.g. gpu:a100:8: GPUs asked for as --gres (clusters that schedule GPUs by type)
    slurm_options: list[str] = field(default_factory=list)  # KEY[=VALUE]: sbatch --KEY[=VALUE], as given
    python: str | None = None  # the job's python command; None = this interpreter (at the same path on every node)
    setup: list[str] = field(default_factory=list)  # shell lines run before srun: module load, source .../activate

    def validate(self) -> "SlurmOptions":
        """Checks every field (one-line UsageErrors); a --gres gpu entry sets gpus_per_node (or takes its count)."""
        for name in ("nodes", "cpus_per_task", "timeout_min", "array_parallelism"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be >= 1")
        if self.gpus_per_node < 0:
            raise UsageError(f"--gpus-per-node {self.gpus_per_node}: must be >= 0")
        if self.gres is not None:
            self.gres, self.gpus_per_node = resolve_gres(self.gres, self.gpus_per_node)
        if self.tasks_per_node is not None and self.tasks_per_node < 1:
            raise UsageError(f"--tasks-per-node {self.tasks_per_node}: must be >= 1")
        if self.tasks_per_node and self.gpus_per_node and self.tasks_per_node != self.gpus_per_node:
            raise UsageError(f"--tasks-per-node {self.tasks_per_node} with {self.gpus_per_node} GPUs per node: "
                             "the trainer runs one rank per GPU; leave --tasks-per-node out")
        if self.signal_delay_s < 0 or self.max_num_timeout < 0:
            raise UsageError("--signal-delay-s and --max-num-timeout must be >= 0")
        if self.elements_per_gpu < 1:
            raise UsageError(f"--elements-per-gpu {self.elements_per_gpu}: must be >= 1")
        if self.elements_per_gpu > 1 and (self.nodes > 1 or self.gpus_per_node > 1 or self.tasks_per_node):
            raise UsageError(f"--elements-per-gpu {self.elements_per_gpu}: each shared run has one rank on one GPU; "
                             "use it with --nodes 1, one GPU (or none) and no --tasks-per-node")
        passthrough_options(self.slurm_options)
        _check_python(self.python)
        for line in self.setup:
            if not line.strip() or "\n" in line or "\r" in line:
                raise UsageError(f"--setup {line!r}: give one non-empty shell line per --setup, e.g. "
                                 "--setup 'module load cuda/12.1'")
        return self

    @property
    def ranks_per_node(self) -> int:
        """Slurm tasks per node: the ranks of one run, or the K runs sharing the element (elements_per_gpu)."""
        if self.elements_per_gpu > 1:
            return self.elements_per_gpu
        return self.tasks_per_node or max(1, self.gpus_per_node)

    @property
    def gres_has_gpus(self) -> bool:
        return bool(self.gres) and any(entry.split(":")[0] == "gpu" for entry in self.gres.split(","))

    @property
    def python_command(self) -> str:
        """The shell words that start python in the job: --python as written (an existing file: quoted as one path),
        else this interpreter."""
        if self.python is None:
            return shlex.quote(sys.executable)
        return shlex.quote(self.python) if os.path.isfile(self.python) else self.python

    def srun_args(self) -> list[str]:
        """Slurm 22.05-23.02 do not pass the job's --cpus-per-task to srun's steps: without it every rank (and its
        data workers) may be bound to one core. --kill-on-bad-exit: a rank that dies ends its peers at once instead
        of leaving them in a collective until the process-group timeout; not for shared elements, whose runs are
        independent (one failing must not end the others)."""
        args = [f"--cpus-per-task={self.cpus_per_task}"]
        if self.elements_per_gpu == 1:
            args.append("--kill-on-bad-exit=1")
        return args


def resolve_gres(gres: str, gpus_per_node: int) -> tuple[str, int]:
    """`--gres gpu:a100:8` -> ("gpu:a100:8", 8): the GPUs per node it names, which must agree with --gpus-per-node
    when both are given. `gpu:a100` (no count) takes --gpus-per-node's. Other resources (`nvme:1`) pass as they are
    and leave the GPU count to --gpus-per-node."""
    entries = [entry.strip() for entry in gres.split(",")]
    if not all(_GRES_ENTRY.fullmatch(entry) for entry in entries):
        raise UsageError(f"--gres {gres!r}: expected NAME[:TYPE][:COUNT][,...], e.g. --gres gpu:a100:8")
    gpu = [i for i, entry in enumerate(entries) if entry.split(":")[0] == "gpu"]
    if not gpu:
        return ",".join(entries), gpus_per_node
    if len(gpu) > 1:
        raise UsageError(f"--gres {gres!r}: names gpu more than once; give one gpu[:TYPE]:COUNT")
    i = gpu[0]
    parts = entries[i].split(":")
    count = int(parts[-1]) if len(parts) > 1 and parts[-1].isdigit() else None
    if count is None:
        if not gpus_per_node:
            raise UsageError(f"--gres {gres!r}: no GPU count; write {entries[i]}:8 (GPUs per node) or add "
                             "--gpus-per-node 8")
        entries[i] += f":{gpus_per_node}"
        count = gpus_per_node
    elif count < 1:
        raise UsageError(f"--gres {gres!r}: the GPU count must be >= 1 (leave --gres out to train on CPU)")
    elif gpus_per_node and gpus_per_node != count:
        raise UsageError(f"--gres {gres!r} asks for {count} GPUs per node, --gpus-per-node {gpus_per_node} for "
                         f"{gpus_per_node}; give one of them (or the same count)")
    return ",".join(entries), count


def parse_slurm_option(text: str) -> tuple[str, str | bool]:
    """`--slurm-option mail-type=END` -> ("mail-type", "END"); `exclusive` -> ("exclusive", True). A leading `--`
    and underscores are accepted (`--mail_type=END`). Options the sweep sets itself are refused with the flag that
    sets them."""
    key, sep, value = text.partition("=")
    key = key.strip().removeprefix("--").replace("_", "-")
    if not _OPTION_KEY.fullmatch(key) or len(key) < 2 or (sep and not value.strip()) or re.search(r"[\n\r]", value):
        raise UsageError(f"--slurm-option {text!r}: expected KEY[=VALUE] with KEY one of sbatch's long options, "
                         "e.g. --slurm-option mail-type=END or --slurm-option exclusive")
    if key in MANAGED_SBATCH_OPTIONS:
        raise UsageError(f"--slurm-option {text!r}: --{key} is set by the sweep; {MANAGED_SBATCH_OPTIONS[key]}")
    return key, value if sep else True


def passthrough_options(texts: list[str]) -> dict[str, str | bool]:
    """Every --slurm-option, validated, as submitit's additional_parameters (its `_` keys are written as `-`)."""
    options = {}
    for text in texts:
        key, value = parse_slurm_option(text)
        if key.replace("-", "_") in options:
            raise UsageError(f"--slurm-option {text!r}: --{key} given more than once; give it once "
                             "(sbatch lists take commas, e.g. mail-type=END,FAIL)")
        options[key.replace("-", "_")] = value
    return options


def _check_python(python: str | None) -> None:
    if python is None:
        return
    try:
        ok = bool(shlex.split(python)) and not re.search(r"[\n\r]", python)
    except ValueError:  # an unclosed quote
        ok = False
    if not ok:
        raise UsageError(f"--python {python!r}: give the command that runs python on the nodes, e.g. "
                         "--python /shared/envs/facevae/bin/python")


def slurm_parameters(slurm: SlurmOptions, code_dir: Path, name: str) -> dict:
    """submitit SlurmExecutor parameters (its own names, as update_parameters takes them) of one element."""
    setup = [*slurm.setup,  # the user's environment first; the snapshot then goes in front of whatever it exports
             f"export PYTHONPATH={code_dir}${{PYTHONPATH:+:$PYTHONPATH}}",
             "export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}"]
    params = dict(job_name=name, time=slurm.timeout_min, nodes=slurm.nodes, ntasks_per_node=slurm.ranks_per_node,
                  cpus_per_task=slurm.cpus_per_task, array_parallelism=slurm.array_parallelism,
                  signal_delay_s=slurm.signal_delay_s, srun_args=slurm.srun_args(), setup=setup,
                  # --requeue: a preempted element goes back to the queue (and resumes) whatever the cluster's
                  # JobRequeue default
                  additional_parameters={"requeue": True, **passthrough_options(slurm.slurm_options)})
    if slurm.gres:
        params["gres"] = slurm.gres
    if slurm.gpus_per_node and not slurm.gres_has_gpus:
        params["gpus_per_node"] = slurm.gpus_per_node
    if slurm.mem_gb:  # as submitit's AutoExecutor writes mem_gb
        mem = slurm.mem_gb
        params["mem"] = f"{int(mem)}GB" if mem == int(mem) else f"{int(mem * 1024)}MB"
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(slurm, key):
            params[key] = getattr(slurm, key)
    return params


def submitit_command(slurm: SlurmOptions, folder: Path) -> str:
    """The line the sbatch script runs on every task (as SlurmExecutor._submitit_command_str builds it)."""
    return " ".join([slurm.python_command, "-u -m submitit.core._submit", shlex.quote(str(folder))])


def sbatch_script(slurm: SlurmOptions, folder: Path, code_dir: Path, name: str, elements: int) -> str:
    """The sbatch script a submission of `elements` array elements writes (submitit submits a single element as a
    plain job, not an array). Built by the same submitit function the submission uses, with nothing written."""
    return _make_sbatch_string(command=submitit_command(slurm, folder), folder=folder,
                               map_count=elements if elements > 1 else None,
                               **slurm_parameters(slurm, code_dir, name))
