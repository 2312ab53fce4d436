"""The README's main job (`facevae demo`) end to end on a tiny configuration, and its resume-on-rerun promise."""

import json

import pytest

from facevae_dist.cli import main

pytestmark = pytest.mark.slow

TINY = ["--n", "160", "--steps", "4", "--width", "0.125", "--batch-size", "4", "--workers", "1",
        "--set", "mixed_precision=no"]


def test_demo_runs_every_stage_and_resumes(tmp_path, capsys):
    assert main(["demo", "--root", str(tmp_path), *TINY]) == 0
    out = capsys.readouterr()
    report = tmp_path / "reports" / "demo"
    table = (report / "table.md").read_text()
    assert "| l2 | no |" in table and "| l2 | yes (mask decoder) |" in table
    assert "| l2 | no |" in out.out + out.err  # the main table is printed for the user
    assert (report / "table.csv").is_file() and (report / "dataset_contact_sheet.png").stat().st_size > 0
    assert any(p.suffix == ".png" for p in (report / "figures").iterdir())
    for slug in ("l2--none", "l2--mask+decoder"):
        run = tmp_path / "runs" / "demo" / slug
        metrics = json.loads((run / "eval" / "metrics.json").read_text())
        assert metrics["n_images"] > 0
        assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()][-1] >= 4

    # Rerun: shards are kept and finished runs are not retrained (their metrics logs do not grow).
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "shards" / "synthetic").rglob("*.tar")}
    logs = {s: (tmp_path / "runs" / "demo" / s / "metrics.jsonl").read_text() for s in ("l2--none",)}
    assert main(["demo", "--root", str(tmp_path), *TINY]) == 0
    assert {p: p.stat().st_mtime_ns for p in before} == before
    assert (tmp_path / "runs" / "demo" / "l2--none" / "metrics.jsonl").read_text() == logs["l2--none"]


def test_demo_rejects_unknown_hypothesis(tmp_path, capsys):
    assert main(["demo", "--root", str(tmp_path), "--hypotheses", "l3/none"]) == 2
    err = capsys.readouterr().err
    assert "l3/none" in err and "Traceback" not in err
