"""One warning when the launch asked for another number of processes than the run has.

The trap this catches: `accelerate launch --cpu --num_processes 2` starts ONE process. With --cpu (or `use_cpu:
true`, or a MULTI_CPU config without an MPI host file) accelerate takes its one-process launcher, which runs the
script once and sets no WORLD_SIZE/RANK at all (only ACCELERATE_USE_CPU, and MASTER_ADDR/MASTER_PORT because more
than one process was asked for): the run trains alone, its batch is half of what was meant, and nothing says so.
The number asked for is not in the child's environment, so it is read from the launcher's own command line (the
parent process: `accelerate launch` runs the script, or torchrun's agent inside it, as its child) and the config
file it names; without such a parent, from $ACCELERATE_NUM_PROCESSES or $WORLD_SIZE when set.
"""

from __future__ import annotations

import os
from pathlib import Path

from facevae_dist.progress import warn


def warn_if_launch_mismatch(world: int) -> None:
    message = launch_mismatch(world, os.environ, parent_argv())
    if message:
        warn(message)


def launch_mismatch(world: int, environ, launcher_argv: list[str] | None) -> str | None:
    """The warning (None when the launch got what it asked for). launcher_argv: the parent's command line."""
    asked = _accelerate_launch_request(launcher_argv) if launcher_argv else None
    if asked is None:
        for var in ("ACCELERATE_NUM_PROCESSES", "WORLD_SIZE"):
            if environ.get(var, "").strip().isdigit():
                asked = (int(environ[var]), f"{var}={environ[var].strip()}", False)
                break
    if asked is None or asked[0] == world:
        return None
    n, source, cpu_flag = asked
    if world == 1 and cpu_flag:
        return (f"the launch asked for {_processes(n)} ({source}) but started 1 process: accelerate launch with --cpu "
                f"(use_cpu) runs the script once, whatever num_processes says; for {n} CPU processes use "
                f"`accelerate launch --config_file launch/cpu-2proc.yaml` (MULTI_GPU: the trainer picks gloo itself) "
                f"or `torchrun --nproc_per_node {n}`")
    return (f"the launch asked for {_processes(n)} ({source}) but started {_processes(world)}; each process's batch "
            f"is --batch-size, so the global batch is {world}x it, not {n}x")


def _processes(n: int) -> str:
    return f"{n} process" + ("es" if n != 1 else "")


def parent_argv() -> list[str] | None:
    """The parent process's command line (Linux /proc), or None where it cannot be read."""
    try:
        raw = Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
    except OSError:
        return None
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a] or None


def _accelerate_launch_request(argv: list[str]) -> tuple[int, str, bool] | None:
    """(processes asked for, what asked, whether --cpu/use_cpu) when argv is an `accelerate launch`, else None."""
    args = _launch_args(argv)
    if args is None:
        return None
    flags = _flags(args)
    cpu = "--cpu" in flags
    config_file = flags.get("--config_file") or flags.get("--config-file")
    config, config_name = {}, None
    if config_file:
        config, config_name = _read_yaml(Path(config_file)), config_file
    elif not cpu:  # accelerate reads its default config unless --cpu (commands/launch.py)
        from accelerate.commands.config import default_config_file

        if Path(default_config_file).is_file():
            config, config_name = _read_yaml(Path(default_config_file)), default_config_file
    cpu = cpu or config.get("use_cpu") is True
    for flag in ("--num_processes", "--num-processes"):
        if str(flags.get(flag, "")).isdigit():
            return int(flags[flag]), f"{flag} {flags[flag]}", cpu
    n = config.get("num_processes")
    if isinstance(n, int) and not isinstance(n, bool) and n > 0:
        return n, f"num_processes: {n} in {config_name}", cpu
    return None


def _launch_args(argv: list[str]) -> list[str] | None:
    """The launcher's own arguments (up to the script or -m module) if argv is `accelerate launch ...` (also
    `python -m accelerate.commands.launch ...`)."""
    for i, arg in enumerate(argv):
        name = Path(arg).name
        if name == "accelerate" and i + 1 < len(argv) and argv[i + 1] == "launch":
            start = i + 2
            break
        if arg == "accelerate.commands.launch" and i > 0 and argv[i - 1] == "-m":
            start = i + 1
            break
    else:
        return None
    out = []
    for arg in argv[start:]:
        if arg in ("-m", "--module") or arg.endswith(".py") or not arg.startswith("-") and not out:
            break
        out.append(arg)
    return out


def _flags(args: list[str]) -> dict[str, str | bool]:
    """--flag value / --flag=value / --flag, as a dict (a flag followed by another flag is a switch)."""
    flags: dict[str, str | bool] = {}
    for i, arg in enumerate(args):
        if not arg.startswith("--"):
            continue
        name, eq, value = arg.partition("=")
        if eq:
            flags[name] = value
        elif i + 1 < len(args) and not args[i + 1].startswith("-"):
            flags[name] = args[i + 1]
        else:
            flags[name] = True
    return flags


def _read_yaml(path: Path) -> dict:
    import yaml  # accelerate's own dependency, as its config files are YAML

    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}
