"""The one reading of --device for every command: what the name means and whether this machine has it.

Syntax is checked when the command line is parsed (cli/argtypes.device, no torch import); availability here, when
the command runs (torch is imported then anyway). Both fail with one line naming the flag and what to use instead.
"""

from __future__ import annotations

import os
import re

from facevae_dist.errors import UsageError

DEVICE_PATTERN = re.compile(r"(auto|cpu|cuda(:\d+)?|mps)")
DEVICE_HELP = "auto (cuda if available, else cpu), cpu, cuda, cuda:N or mps"


def check_device_name(name: str) -> str:
    if not DEVICE_PATTERN.fullmatch(name):
        raise UsageError(f"--device {name!r}: not a device; use {DEVICE_HELP}")
    return name


def resolve_device(name: str | None):
    """torch.device for a --device value (None or "auto": this rank's GPU when there is one, else the CPU)."""
    import torch

    if name is None or name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        return torch.device("cpu")
    check_device_name(name)
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: no CUDA GPU is available to this torch build (torch "
                             f"{torch.__version__}); use --device cpu, or leave --device out")
        index = int(name.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s) "
                             f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
        return torch.device("cuda", index)
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UsageError("--device mps: Apple's Metal backend is not available here; use --device cpu")
    return torch.device(name)
