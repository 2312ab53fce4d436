"""One place that decides whether progress bars are shown (rank 0 only, silent with --quiet)."""

from __future__ import annotations

import os
import sys

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

_QUIET = os.environ.get("FACEVAE_QUIET", "") not in ("", "0")

console = Console(stderr=True)


def set_quiet(quiet: bool) -> None:
    global _QUIET
    _QUIET = quiet


def is_quiet() -> bool:
    return _QUIET


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def make_progress(*extra_columns, transient: bool = False) -> Progress:
    """A rich Progress that is disabled when quiet, on ranks > 0, or when stderr is not a terminal
    and FACEVAE_PROGRESS is not set (so logs of batch jobs do not fill with redraws)."""
    enabled = not _QUIET and is_main_process() and (sys.stderr.isatty() or os.environ.get("FACEVAE_PROGRESS") == "1")
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        *extra_columns,
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not enabled,
        transient=transient,
    )


def info(msg: str) -> None:
    """Print a status line on rank 0 unless quiet."""
    if not _QUIET and is_main_process():
        console.print(msg)


def warn(msg: str) -> None:
    """A one-line warning on rank 0, shown even with --quiet: something the user must know (data skipped, a damaged
    checkpoint set aside), not a status line."""
    if is_main_process():
        console.print(f"facevae: warning: {msg}", markup=False, highlight=False, soft_wrap=True)
