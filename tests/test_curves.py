"""`facevae curve` (report/curves.py): every kept step checkpoint of real (tiny) training runs scored like `facevae
eval` would, the scores reused on a second call, and write_curve's CSV, JSON and figure from scored rows."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from facevae_dist.cli import main
from facevae_dist.report.curves import CURVE_CSV, CURVE_JSON, CURVE_PNG, FIELDS, write_curve


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


def _rows(hypothesis: str, seeds=(0, 1), steps=(1000, 2000, 4000)) -> list[dict]:
    """Scored rows (FIELDS) of a run per seed, improving with steps."""
    return [{"run": f"{hypothesis.replace('/', '--')}--seed-{s}", "hypothesis": hypothesis, "seed": s, "step": step,
             "samples_seen": 32 * step, "train_hours": step / 1e4, "cpu_hours": step / 2e4, "n_images": 4,
             "face_1-ssim": 0.6 - step / 1e5, "face_1-ssim_lo": 0.55 - step / 1e5,
             "face_1-ssim_hi": 0.65 - step / 1e5, "face_lpips": 0.3, "composite_1-ssim": 0.2}
            for s in seeds for step in steps]


def test_learning_curve_scores_every_kept_checkpoint(tiny_runs, tiny_shards, tmp_path):
    """`facevae curve`: every kept step checkpoint scored like `facevae eval` would, with the trainer's cost counters
    beside it; a second call reuses the scores instead of evaluating again."""
    out = tmp_path / "curve"
    args = ["curve", *[str(r) for r in tiny_runs.values()], "--out", str(out), "--limit", "4", "--device", "cpu",
            "--target", "0.4"]
    assert main(args) == 0
    rows = list(csv.DictReader((out / "curve.csv").open()))
    assert [(r["hypothesis"], int(r["step"])) for r in rows] == [
        ("l2/none", 2), ("l2/none", 4), ("l2/mask+decoder", 2), ("l2/mask+decoder", 4)]
    for first, last in (rows[0:2], rows[2:4]):
        assert 0 < float(first["cpu_hours"]) < float(last["cpu_hours"])
        assert 0 < float(first["train_hours"]) <= float(last["train_hours"])
        assert int(last["samples_seen"]) == 2 * int(first["samples_seen"]) == 16
    direct = tmp_path / "direct.json"
    assert main(["eval", str(tiny_runs["l2/mask+decoder"]), "--checkpoint", "step_4", "--limit", "4", "--device", "cpu",
                 "--out", str(direct)]) == 0
    face_ssim = json.loads(direct.read_text())["metrics"]["face"]["ssim"]["mean"]
    assert float(rows[3]["face_1-ssim"]) == pytest.approx(1 - face_ssim, abs=1e-6)
    assert float(rows[3]["face_1-ssim_lo"]) <= float(rows[3]["face_1-ssim"]) <= float(rows[3]["face_1-ssim_hi"])
    with Image.open(out / "learning_curve.png") as png:
        assert png.size[0] > 1000 and png.size[1] > 400

    cached = sorted((out / "evals").rglob("metrics.json"))
    assert len(cached) == 4
    stamps = [p.stat().st_mtime_ns for p in cached]
    assert main(args) == 0
    assert [p.stat().st_mtime_ns for p in cached] == stamps, "the second call evaluated again"
    # the shards rebuilt with other images under the same keys (their manifest's hashes change): scored again
    original = (tiny_shards / "manifest.json").read_bytes()
    try:
        changed = json.loads(original)
        changed["splits"]["test"]["shards"][0]["sha256"] = "0" * 64
        (tiny_shards / "manifest.json").write_text(json.dumps(changed))
        assert main(args) == 0
        assert all(p.stat().st_mtime_ns != s for p, s in zip(cached, stamps)), "scores of other shards reused"
    finally:
        (tiny_shards / "manifest.json").write_bytes(original)


def test_curve_of_several_losses_gets_a_column_per_loss(tmp_path):
    """write_curve (also used by docs/reference/grid-report.sh to draw earlier-scored runs beside new ones): the
    rows go to the CSV and JSON unchanged, and a grid of several losses is drawn as a column per loss over two rows
    (steps, CPU-hours) instead of every run on one panel."""
    grid = [r for h in ("ssim+l2/none", "l1/mask+decoder", "l1/none") for r in _rows(h)]
    write_curve(grid, tmp_path / "grid", {"split": "test", "limit": 4, "shards": None}, 0.4)
    written = list(csv.DictReader((tmp_path / "grid" / "curve.csv").open()))
    assert [(r["run"], int(r["step"])) for r in written] == [(r["run"], r["step"]) for r in grid]
    assert list(written[0]) == list(FIELDS)
    assert json.loads((tmp_path / "grid" / "curve.json").read_text())["rows"] == grid
    write_curve(_rows("l2/none"), tmp_path / "one", {"split": "test", "limit": 4, "shards": None}, None)
    with Image.open(tmp_path / "grid" / "learning_curve.png") as by_loss, \
            Image.open(tmp_path / "one" / "learning_curve.png") as one:
        assert by_loss.size[1] > 1.4 * one.size[1], "several losses: four rows of panels"
        assert one.size[0] > 1000
        for png in (by_loss, one):  # the composite beside the face pixels, in both layouts
            words = png.info["Description"]
            assert "face-pixel 1−SSIM\n(raw output)" in words and "composite 1−SSIM\n(output on" in words


def test_learning_curve_of_a_directory_without_checkpoints_is_one_line(tmp_path, capsys):
    assert main(["curve", str(tmp_path), "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no checkpoints/" in err


def test_write_curve_writes_every_field_and_a_figure_without_cpu_hours(tmp_path):
    """Rows of runs scored before the trainer counted its cost (no seed, no samples or hours): empty CSV cells, the
    values as given in the JSON beside the command's settings, floats to 6 significant digits, and a figure all the
    same; nothing else is left in OUT."""
    rows = [{**r, "seed": None, "samples_seen": None, "train_hours": None, "cpu_hours": None,
             "face_1-ssim": 0.123456789} for r in _rows("l2/none", seeds=(0,), steps=(10, 20))]
    out = tmp_path / "curve"
    result = write_curve(rows, out, {"split": "val", "limit": 4, "shards": "shards/x"}, None)
    assert result == {"rows": rows, "csv": str(out / CURVE_CSV), "png": str(out / CURVE_PNG)}
    assert sorted(p.name for p in out.iterdir()) == sorted((CURVE_CSV, CURVE_JSON, CURVE_PNG))
    written = list(csv.DictReader((out / CURVE_CSV).open()))
    assert list(written[0]) == list(FIELDS) and [r["step"] for r in written] == ["10", "20"]
    assert written[0]["seed"] == written[0]["cpu_hours"] == written[0]["train_hours"] == ""
    assert written[0]["face_1-ssim"] == "0.123457" and written[0]["n_images"] == "4"
    doc = json.loads((out / CURVE_JSON).read_text())
    assert doc["split"] == "val" and doc["limit"] == 4 and doc["shards"] == "shards/x" and doc["target"] is None
    assert "face pixels" in doc["metric"] and doc["rows"] == rows
    with Image.open(out / CURVE_PNG) as png:
        assert png.size[0] > 1000 and np.asarray(png.convert("L")).std() > 5
