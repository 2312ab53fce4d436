"""What a command shows while it runs, read the way a batch job's log reads it: plain progress lines off a terminal,
lines never wrapped by rich, tables not squeezed when piped, train.log, and a stdout that holds only the result."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from train_helpers import REPO

from facevae_dist import progress
from facevae_dist.errors import UsageError

LINE = re.compile(r"^step (\d+)/10 \(\d+%\)  loss \d+\.\d{4}  [\d.]+ img/s  elapsed \dm\d\ds(  ETA \dm\d\ds)?$")


@pytest.fixture
def not_quiet(monkeypatch):
    monkeypatch.setattr(progress, "_QUIET", False)
    monkeypatch.delenv("FACEVAE_PROGRESS", raising=False)  # no forced bar: stderr under pytest is not a terminal
    monkeypatch.delenv("RANK", raising=False)


def _run_steps(lines: progress.ProgressLines, log_every: int = 2, total: int = 10) -> None:
    for step in range(1, total + 1):
        log_step = step % log_every == 0 or step == total
        if log_step:
            lines.logged(1.0 / step, 50.0)
        lines.step(step, log_step, last=step == total)


def test_plain_progress_lines_at_each_log_step_or_every_n_seconds(not_quiet, capsys, tmp_path):
    _run_steps(progress.ProgressLines(total=10, start_step=0, every=0))  # 0: at every log step
    out = capsys.readouterr()
    got = out.err.splitlines()
    assert out.out == "" and all(LINE.match(line) for line in got), got
    assert [int(LINE.match(line)[1]) for line in got] == [2, 4, 6, 8, 10]
    assert "ETA" in got[0] and "ETA" not in got[-1] and got[-1].startswith("step 10/10 (100%)  loss 0.1000")

    # a long interval: the first line that has a loss, then nothing until the last step; train.log gets them too
    with progress.log_to(tmp_path / "train.log", title="test"):
        _run_steps(progress.ProgressLines(total=10, start_step=0, every=3600))
    got = capsys.readouterr().err.splitlines()
    assert [int(LINE.match(line)[1]) for line in got] == [2, 10]
    logged = (tmp_path / "train.log").read_text().splitlines()
    assert logged[0].endswith(f"---- test (pid {os.getpid()} on {os.uname().nodename})")
    assert [line.split(" ", 2)[2] for line in logged[1:]] == got  # each after its date and time


def test_no_console_lines_when_quiet_or_on_other_ranks_but_train_log_keeps_them(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(progress, "_QUIET", True)
    monkeypatch.delenv("RANK", raising=False)
    with progress.log_to(tmp_path / "train.log"):
        progress.info("a status line")
        _run_steps(progress.ProgressLines(total=10, start_step=0, every=0))
    assert capsys.readouterr().err == ""
    log = (tmp_path / "train.log").read_text()
    assert "a status line" in log and log.count(" step ") == 5
    monkeypatch.setenv("RANK", "1")
    with progress.log_to(tmp_path / "rank1.log", enabled=progress.is_main_process()):
        progress.warn("rank 1 says")
    assert not (tmp_path / "rank1.log").exists() and capsys.readouterr().err == ""


def test_train_log_records_the_error_that_ends_a_run(tmp_path):
    with pytest.raises(UsageError), progress.log_to(tmp_path / "train.log"):
        raise UsageError("--run-dir x is a file")
    assert (tmp_path / "train.log").read_text().splitlines()[-1].endswith("facevae: error: --run-dir x is a file")


def test_progress_interval_from_the_environment(monkeypatch):
    monkeypatch.delenv(progress.PROGRESS_EVERY_ENV, raising=False)
    assert progress.progress_every(30.0) == 30.0
    monkeypatch.setenv(progress.PROGRESS_EVERY_ENV, "5")
    assert progress.progress_every(30.0) == 5.0
    monkeypatch.setenv(progress.PROGRESS_EVERY_ENV, "soon")
    with pytest.raises(UsageError, match="FACEVAE_PROGRESS_EVERY='soon': expected seconds >= 0"):
        progress.progress_every(30.0)


def _piped(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**{k: v for k, v in os.environ.items() if k != "FACEVAE_QUIET"}, **env})


def test_status_lines_and_warnings_are_never_wrapped_in_a_log():
    proc = _piped("from facevae_dist.progress import info, warn\n"
                  "info('status ' + 'x' * 300)\nwarn('disk ' + 'y' * 300)", COLUMNS="40")
    lines = proc.stderr.splitlines()
    assert len(lines) == 2 and lines[0] == "status " + "x" * 300 and lines[1] == "facevae: warning: disk " + "y" * 300


def test_sweep_status_table_is_not_squeezed_when_piped(tmp_path):
    log = tmp_path / "logs" / ("a-rather-long-directory-name-" * 3) / "12345_0_log.err"
    elements = {f"{h}/seed-{s}": {"hypothesis": h, "seed": s, "run_dir": str(tmp_path / h.replace("/", "--")),
                                  "job_ids": [f"12345_{i}"], "cluster": "local", "max_steps": 400000,
                                  "log_err": str(log)}
                for i, (h, s) in enumerate([("ssim+l2/mask+decoder", 0), ("l1/none", 1)])}
    (tmp_path / "sweep.json").write_text(json.dumps({"elements": elements}))
    proc = subprocess.run([sys.executable, "-m", "facevae_dist", "sweep", "status", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "60"})
    assert proc.returncode == 0, proc.stderr
    header = next(line for line in proc.stdout.splitlines() if "hypothesis" in line)
    columns = ["hypothesis", "seed", "job", "state", "step", "loss", "img/s", "ETA", "log"]
    assert [c.strip() for c in header.strip("┃│ ").split("┃")] == columns, proc.stdout  # whole, on one line
    rows = [line for line in proc.stdout.splitlines() if "ssim+l2/mask+decoder" in line]
    assert len(rows) == 1 and str(log) in rows[0]  # one line per element, the log path whole
