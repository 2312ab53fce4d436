"""One place that decides what a command shows while it runs: progress bars on a terminal, plain progress lines in a
log (a batch job's stderr), status lines and warnings (rank 0 only; --quiet silences all but warnings), a copy of
them in a file (a run's train.log), and a stdout that carries only the command's result.

Rich never wraps a line here: status lines are printed without wrapping, and a console that is not a terminal is
as wide as its longest line (rich would otherwise fold everything at 80 columns, a table's headers included)."""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import time
from pathlib import Path

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

PIPED_WIDTH = 100_000  # "unlimited": the width rich lays out to when the stream is not a terminal
PROGRESS_EVERY_ENV = "FACEVAE_PROGRESS_EVERY"  # seconds between plain progress lines (overrides the config's)


def _width(stream) -> int | None:
    """The terminal's width (None: rich asks the terminal), or unlimited when the stream is a file or a pipe."""
    try:
        return None if stream.isatty() else PIPED_WIDTH
    except (AttributeError, ValueError):  # closed, or not a real stream
        return PIPED_WIDTH


console = Console(stderr=True, soft_wrap=True, width=_width(sys.stderr))
_log_file = None  # a run's train.log while log_to() is active (rank 0)


def output_console() -> Console:
    """A console for a command's own output on stdout (tables): as wide as the terminal, or unlimited when piped, so
    that `facevae sweep status | less` keeps "hypothesis" whole."""
    return Console(width=_width(sys.stdout))


def set_quiet(quiet: bool) -> None:
    global _QUIET
    _QUIET = quiet


def is_quiet() -> bool:
    return _QUIET


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _bar_enabled() -> bool:
    return sys.stderr.isatty() or os.environ.get("FACEVAE_PROGRESS") == "1"


def make_progress(*extra_columns, transient: bool = False) -> Progress:
    """A rich Progress that is disabled when quiet, on ranks > 0, or when stderr is not a terminal
    and FACEVAE_PROGRESS is not set (so logs of batch jobs do not fill with redraws)."""
    enabled = not _QUIET and is_main_process() and _bar_enabled()
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
    """Print a status line on rank 0 unless quiet (train.log gets it either way)."""
    if not is_main_process():
        return
    if not _QUIET:
        console.print(msg)
    _to_log_file(msg)


def warn(msg: str) -> None:
    """A one-line warning on rank 0, shown even with --quiet: something the user must know (data skipped, a damaged
    checkpoint set aside), not a status line."""
    if is_main_process():
        console.print(f"facevae: warning: {msg}", markup=False, highlight=False, soft_wrap=True)
        _to_log_file(f"facevae: warning: {msg}")


def progress_every(configured: float) -> float:
    """Seconds between plain progress lines: $FACEVAE_PROGRESS_EVERY when set, else the configured value."""
    raw = os.environ.get(PROGRESS_EVERY_ENV, "").strip()
    if not raw:
        return configured
    try:
        value = float(raw)
        if value >= 0:
            return value
    except ValueError:
        pass
    from facevae_dist.errors import UsageError

    raise UsageError(f"{PROGRESS_EVERY_ENV}={raw!r}: expected seconds >= 0 (0 = a line at every log step)")


class ProgressLines:
    """Plain progress lines, for where no bar is drawn (a Slurm log) and for train.log: "step 120/1000 (12%)  loss
    0.1234  38.2 img/s  elapsed 3m10s  ETA 23m05s". One when `every` seconds have passed since the last (checked at
    every step: a clock read), at the first step that has a loss, and at the last step; every=0: at every log step.
    The loss and speed are those of the latest log step (reading them more often would cost a host sync)."""

    def __init__(self, total: int, start_step: int, every: float):
        self.total, self.start_step, self.every = total, start_step, every
        self.t0 = self.last = time.perf_counter()
        self.loss: float | None = None
        self.images_per_s: float | None = None
        self.on_console = not _QUIET and is_main_process() and not _bar_enabled()
        self.enabled = is_main_process()

    def logged(self, loss: float, images_per_s: float) -> None:
        first = self.loss is None
        self.loss, self.images_per_s = loss, images_per_s
        if first:
            self.last = -float("inf")  # the first loss gets its line at once

    def step(self, step: int, log_step: bool, last: bool = False) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        due = now - self.last >= self.every and (log_step or self.every > 0)
        if not (due or last) or self.loss is None and not last:
            return
        self.last = now
        line = self.format(step, now - self.t0)
        if self.on_console:
            console.print(line, markup=False, highlight=False)
        _to_log_file(line)

    def format(self, step: int, elapsed: float) -> str:
        parts = [f"step {step}/{self.total} ({100 * step / max(self.total, 1):.0f}%)"]
        if self.loss is not None:
            parts.append(f"loss {self.loss:.4f}")
        if self.images_per_s:
            parts.append(f"{self.images_per_s:.1f} img/s")
        parts.append(f"elapsed {duration(elapsed)}")
        done = step - self.start_step
        if 0 < done and step < self.total:
            parts.append(f"ETA {duration(elapsed / done * (self.total - step))}")
        return "  ".join(parts)


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


# ---- train.log and stdout --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def log_to(path: Path, enabled: bool = True, title: str = ""):
    """Within the block, append the status lines, warnings and plain progress lines (the console's, and those
    --quiet hides) to `path`, each with its time, and the error that ends the block if one does. Appends across
    resumes, with a header line per start."""
    global _log_file
    if not enabled or _log_file is not None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", buffering=1) as f:  # line-buffered: a killed run's log ends at its last line
        _log_file = f
        try:
            _to_log_file(f"---- {title or 'started'} (pid {os.getpid()} on {socket.gethostname()})")
            yield
        except BaseException as exc:
            from facevae_dist.errors import FaceVAEError

            _to_log_file(f"facevae: error: {exc}" if isinstance(exc, FaceVAEError)
                         else f"facevae: stopped by {type(exc).__name__}: {exc}")
            raise
        finally:
            _log_file = None


def _to_log_file(line: str) -> None:
    if _log_file is not None:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        _log_file.write("".join(f"{stamp} {part}\n" for part in str(line).splitlines() or [""]))


@contextlib.contextmanager
def stdout_for_result_only():
    """Within the block, whatever is written to stdout goes to stderr: Python's sys.stdout and file descriptor 1
    both, so library chatter (DeepSpeed's logger writes to stdout, C++ code to fd 1) cannot mix with the command's
    result, printed after the block."""
    sys.stdout.flush()
    try:
        saved = os.dup(1)
        os.dup2(2, 1)
    except OSError:  # no usable fd 1 or 2 (a daemon): nothing to keep apart
        saved = None
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stderr.flush()
        if saved is not None:
            os.dup2(saved, 1)
            os.close(saved)
