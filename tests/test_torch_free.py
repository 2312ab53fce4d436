"""The ground floor imports no torch: `facevae --help`, `facevae sweep submit --help` and `facevae sweep status` read
configs and the grid's vocabulary without paying for it (a cluster login node runs them often)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from facevae_dist.sweep.records import MANIFEST

PROBE = """
import sys
from facevae_dist.cli import main
try:
    rc = main(sys.argv[1:])
except SystemExit as exc:  # argparse's --help
    rc = exc.code
heavy = sorted(m for m in ("torch", "accelerate", "deepspeed", "matplotlib") if m in sys.modules)
print("HEAVY=" + ",".join(heavy), file=sys.stderr)
sys.exit(rc)
"""


def _heavy_modules(*args: str) -> tuple[int, list[str]]:
    proc = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=300)
    line = [ln for ln in proc.stderr.splitlines() if ln.startswith("HEAVY=")]
    assert line, proc.stderr
    return proc.returncode, [m for m in line[-1].removeprefix("HEAVY=").split(",") if m]


@pytest.mark.parametrize("args", [["--help"], ["sweep", "submit", "--help"], ["train", "--help"]],
                         ids=["help", "sweep-submit-help", "train-help"])
def test_help_imports_no_torch(args):
    rc, heavy = _heavy_modules(*args)
    assert rc == 0 and heavy == []


def test_sweep_status_imports_no_torch(tmp_path):
    run_dir = tmp_path / "l2--none"
    run_dir.mkdir()
    (tmp_path / MANIFEST).write_text(json.dumps({"elements": {"l2/none": {
        "hypothesis": "l2/none", "seed": 0, "run_dir": str(run_dir), "job_ids": [], "max_steps": 10}}}))
    rc, heavy = _heavy_modules("sweep", "status", str(tmp_path))
    assert rc == 0 and heavy == []


def test_config_and_vocabulary_import_no_torch():
    code = ("import sys, facevae_dist.config, facevae_dist.hypotheses, facevae_dist.presets, facevae_dist.stats; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.stdout.strip() == "False", out.stderr
