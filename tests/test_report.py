"""`facevae report` across seeds: intervals, paired mask effect, claims, legacy region names, evals of one test set
(the grouping by (hypothesis, seed) itself: test_results.py). Evaluations are written directly (metrics.json +
per_image.csv in eval's format) with known effects, so the statistics can be checked against the truth in a
second."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from facevae_dist.cli import main
from facevae_dist.evaluate import metrics as M
from facevae_dist.evaluate.scoring import FORMAT, PER_IMAGE_FILE, load_eval

N_IMAGES = 60
KEYS = [f"test-{i:06d}" for i in range(N_IMAGES)]


def write_eval(run_dir: Path, hypothesis: str, seed, scores: dict[str, np.ndarray], fmt: str = FORMAT,
               regions=tuple(M.REGIONS)) -> Path:
    """A run's eval/ as `facevae eval` writes it: per-image scores (region.metric columns) + metrics.json."""
    loss, mode = hypothesis.split("/")
    ev_dir = run_dir / "eval"
    ev_dir.mkdir(parents=True)
    columns = [f"{r}.{m}" for r in regions for m in M.METRICS]
    with (ev_dir / PER_IMAGE_FILE).open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["key", *columns])
        for i, key in enumerate(KEYS):
            w.writerow([key, *(f"{scores[c][i]:.6g}" for c in columns)])
    summary = {r: {m: {"mean": float(np.mean(scores[f"{r}.{m}"])), "ci95": None, "n": N_IMAGES, "n_undefined": 0}
                   for m in M.METRICS} for r in regions}
    settings = {**M.MetricSettings().to_dict(image_size=36), "lpips_weights": "test", "face_region": "GT >= 0.5",
                "latent": "z = mu"}
    meta = {"format": fmt, "run_dir": str(run_dir), "run_name": run_dir.name, "hypothesis": hypothesis,
            "loss": loss, "mask_mode": mode, "split": "test", "shards_dir": "shards/x", "n_images": N_IMAGES,
            "checkpoint": {"which": "best", "step": 100}, "settings": settings, "metrics": summary,
            "examples": {"file": "examples.safetensors", "keys": []}}
    if seed is not None:
        meta["seed"] = seed
    (ev_dir / "metrics.json").write_text(json.dumps(meta))
    return run_dir


def scores_for(rng, base: np.ndarray, shift: float, noise: float = 0.01, regions=tuple(M.REGIONS)) -> dict:
    """Per-image scores: every similarity metric = base - shift (+ noise), every error metric = 1 - that; a positive
    shift makes the run worse on all six columns."""
    out = {}
    for r in regions:
        sim = np.clip(base - shift + rng.normal(0, noise, base.shape), 0.01, 0.99)
        for m in M.METRICS:
            out[f"{r}.{m}"] = sim if m in ("ssim", "ms_ssim", "vif", "psnr") else 1 - sim
    return out


@pytest.fixture
def two_seed_runs(tmp_path) -> list[Path]:
    """l2 none vs mask+decoder, two seeds each: the mask is better by 0.05 on every metric (image noise 0.01)."""
    rng = np.random.default_rng(0)
    base = rng.uniform(0.4, 0.8, N_IMAGES)  # image difficulty, shared by every run (what pairing removes)
    runs = []
    for seed in (0, 1):
        runs.append(write_eval(tmp_path / f"none-{seed}", "l2/none", seed, scores_for(rng, base, 0.05)))
        runs.append(write_eval(tmp_path / f"mask-{seed}", "l2/mask+decoder", seed, scores_for(rng, base, 0.0)))
    return runs


def test_report_groups_seeds_and_supports_a_real_mask_effect(two_seed_runs, tmp_path):
    from facevae_dist.report.build import make_report

    out = tmp_path / "report"
    make_report(two_seed_runs, out, figures="effect")  # the CLI and every figure: test_evaluate's end-to-end test
    table = list(csv.DictReader((out / "table.csv").open()))
    assert len(table) == 2 * len(M.REGIONS)  # one row per (hypothesis, region), seeds pooled
    row = next(r for r in table if r["hypothesis"] == "l2/mask+decoder" and r["region"] == "face")
    assert row["seeds"] == "0,1" and row["n_images"] == str(N_IMAGES)
    lo, mean, hi = float(row["1-ssim_ci_lo"]), float(row["1-ssim"]), float(row["1-ssim_ci_hi"])
    assert lo < mean < hi
    claims = json.loads((out / "claims.json").read_text())
    assert claims["seeds"] == {"l2/none": [0, 1], "l2/mask+decoder": [0, 1]}
    c1 = next(c for c in claims["claims"] if c["id"] == "C1")
    assert c1["verdict"] == "supported" and c1["region"] == "face"
    assert c1["other_regions"]["composite"]["verdict"] == "supported"
    for comp in c1["comparisons"]:
        # paired per image: the image difficulty cancels, the interval is tight around the true -0.05 (x10 for l1/l2)
        scale = 10 if comp["metric"].startswith("10*") else 1
        assert comp["difference"] == pytest.approx(-0.05 * scale, abs=0.01 * scale)
        assert comp["ci95"][1] < 0 and len(comp["per_seed"]) == 2 and comp["n_seeds"] == 2
        assert comp["paper_difference"] is not None
    untested = {c["id"]: c for c in claims["claims"] if c["verdict"] == "not tested"}
    assert {"C2", "C3", "C4", "C5", "C6", "C7", "C8"} <= set(untested)
    assert "ssim+l2/mask+decoder" in untested["C3"]["needs"]
    md = (out / "claims.md").read_text()
    assert "| C1 | **supported** | supported |" in md and "not tested" in md
    im = Image.open(out / "figures" / "mask_effect.png")
    assert im.size[0] > 800 and np.asarray(im.convert("L")).std() > 5
    # the subtitle names the interval drawn (stats.py's), stored with the figure's words in the PNG
    assert "bars: 95% seed-level t interval (seed variance pooled over the hypotheses, fewer than 3 seeds each)" \
        in im.info["Title"] and "bootstrap" not in im.info["Description"]
    # deterministic: the same report twice
    again = tmp_path / "again"
    make_report(two_seed_runs, again, figures="effect")
    assert (again / "claims.json").read_text() == (out / "claims.json").read_text()
    assert (again / "table.md").read_text() == (out / "table.md").read_text()


def test_no_effect_is_inconclusive_and_the_wrong_direction_contradicts(tmp_path):
    rng = np.random.default_rng(1)
    base = rng.uniform(0.4, 0.8, N_IMAGES)
    runs = [write_eval(tmp_path / f"{h}-{s}", f"l2/{h}", s, scores_for(rng, base, 0.0, noise=0.05))
            for h in ("none", "mask+decoder") for s in (0, 1)]
    from facevae_dist.report.build import make_report

    c1 = next(c for c in make_report(runs, tmp_path / "r1", figures="none")["claims"] if c["id"] == "C1")
    assert c1["verdict"] == "inconclusive"
    # the mask makes it worse by 0.1 with every seed: the claim is contradicted
    worse = [write_eval(tmp_path / f"w-{s}", "l2/mask+decoder", s, scores_for(rng, base, 0.1)) for s in (0, 1)]
    c1 = next(c for c in make_report(runs[:2] + worse, tmp_path / "r2", figures="none")["claims"]
              if c["id"] == "C1")
    assert c1["verdict"] == "contradicted"


def test_legacy_eval_region_names_are_mapped(tmp_path):
    """An eval-v1 file (region `paper`, no `composite-face`, no seed) is read with `paper` as `composite`."""
    rng = np.random.default_rng(3)
    legacy_regions = ("whole", "face", "paper")
    run = write_eval(tmp_path / "old", "l2/none", None, scores_for(rng, np.full(N_IMAGES, 0.6), 0.0,
                                                                   regions=legacy_regions),
                     fmt="facevae-dist/eval-v1", regions=legacy_regions)
    ev = load_eval(run)
    assert set(ev["metrics"]) == {"whole", "face", "composite"} and ev["seed"] is None
    assert "'paper' read as 'composite'" in ev["legacy"]
    from facevae_dist.report.build import make_report

    res = make_report([run], tmp_path / "rep", figures="none")
    md = Path(res["table_md"]).read_text()
    assert "(`composite`)" in md and "composite-face" in md  # the missing region is named in a note
    assert "`paper`" not in md


# ---------------------------------------------------------------------------------------------------------------
# The report pairs image by image only evals of one test set (real shards, real evals of exported
# untrained models: what is checked is what the evals scored, not what the models learned).

def _shards(out: Path, seed: int, size: int) -> Path:
    from facevae_dist.data.shards import ShardOptions, build_shards
    from facevae_dist.data.sources import SyntheticSource

    build_shards(SyntheticSource(n=20, seed=seed, split_ratios=(0.6, 0.2, 0.2)), out,
                 ShardOptions(image_size=size, shard_size=4, image_format="png"))
    return out


def _evaluated(model_dir: Path, hypothesis: str, size: int, shards: Path) -> Path:
    import torch

    from facevae_dist.model import FaceVAE, ModelConfig

    torch.manual_seed(0)
    loss, mode = hypothesis.split("/")
    FaceVAE(ModelConfig(image_size=size, width=0.125, latent_dim=8, mask_mode=mode)).eval().save_pretrained(model_dir)
    (model_dir / "export.json").write_text(json.dumps({"hypothesis": hypothesis, "seed": 0, "loss": loss}))
    assert main(["eval", str(model_dir), "--shards", str(shards), "--bootstrap", "100", "--batch-size", "4"]) == 0
    return model_dir


@pytest.fixture(scope="module")
def test_sets(tmp_path_factory):
    import torch

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("test-sets")
    a36, b36, a18 = _shards(root / "a36", 0, 36), _shards(root / "b36", 1, 36), _shards(root / "a18", 0, 18)
    return {"none@a36": _evaluated(root / "none-a36", "l2/none", 36, a36),
            "mask@a36": _evaluated(root / "mask-a36", "l2/mask+decoder", 36, a36),
            "mask@b36": _evaluated(root / "mask-b36", "l2/mask+decoder", 36, b36),
            "mask@a18": _evaluated(root / "mask-a18", "l2/mask+decoder", 18, a18)}


def _report_error(runs, out: Path, capsys) -> str:
    assert main(["report", *map(str, runs), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_report_pairs_evals_of_the_same_shards(test_sets, tmp_path, capsys):
    a, b = load_eval(test_sets["none@a36"]), load_eval(test_sets["mask@a36"])
    assert a["test_set"] == b["test_set"] and len(a["test_set"]["fingerprint"]) == 64
    assert a["test_set"]["image_size"] == 36 and a["test_set"]["split"] == "test" and a["test_set"]["limit"] is None
    assert a["test_set"]["regions"] == list(M.REGIONS)
    capsys.readouterr()
    assert main(["report", str(test_sets["none@a36"]), str(test_sets["mask@a36"]), "--out", str(tmp_path / "r")]) == 0
    claims = json.loads((tmp_path / "r" / "claims.json").read_text())
    assert claims["n_images"] == 4 and next(c for c in claims["claims"] if c["id"] == "C1")["verdict"] != "not tested"
    assert "no test-set fingerprint" not in capsys.readouterr().err


def test_report_refuses_shards_rebuilt_with_other_images_under_the_same_keys(test_sets, tmp_path, capsys):
    from facevae_dist.evaluate.scoring import load_per_image

    a, b = load_eval(test_sets["none@a36"]), load_eval(test_sets["mask@b36"])
    assert load_per_image(a)[0] == load_per_image(b)[0]  # the same keys: only the fingerprint tells them apart
    capsys.readouterr()
    line = _report_error([test_sets["none@a36"], test_sets["mask@b36"]], tmp_path / "r", capsys)
    assert a["path"] in line and b["path"] in line and "scored different images" in line, line
    assert "--shards" in line and not (tmp_path / "r" / "claims.json").exists()


def test_report_refuses_evals_at_other_image_sizes(test_sets, tmp_path, capsys):
    a, b = load_eval(test_sets["none@a36"]), load_eval(test_sets["mask@a18"])
    capsys.readouterr()
    line = _report_error([test_sets["none@a36"], test_sets["mask@a18"]], tmp_path / "r", capsys)
    assert a["path"] in line and b["path"] in line and "(36 px)" in line and "(18 px)" in line, line


def test_evals_without_a_fingerprint_are_paired_with_a_note(two_seed_runs, tmp_path, capsys):
    """metrics.json written before the fingerprint: paired by key as before, and the report says it could not check."""
    from facevae_dist.report.build import make_report

    res = make_report(two_seed_runs, tmp_path / "rep", figures="none")
    note = "4 eval(s) recorded no test-set fingerprint"
    assert note in Path(res["table_md"]).read_text() and note in capsys.readouterr().err


def test_c1_on_the_gt_composite_tells_the_face_from_the_predicted_masks_leak(tmp_path):
    """A mask model whose drawn face is no better (face and composite-gt: no effect) but whose soft mask lets the
    input through (composite: 0.03 better): C1 holds on `composite` only, and the report says which mask each arm
    was pasted through."""
    from facevae_dist.report.build import make_report

    rng = np.random.default_rng(3)
    base = rng.uniform(0.4, 0.8, N_IMAGES)
    leak = {"composite", "composite-face"}
    runs = []
    for seed in (0, 1):
        for mode, gain in (("none", 0.0), ("mask+decoder", 0.03)):
            scores = {**scores_for(rng, base, 0.0, noise=0.005, regions=tuple(r for r in M.REGIONS if r not in leak)),
                      **scores_for(rng, base, -gain, noise=0.005, regions=tuple(leak))}
            run = write_eval(tmp_path / f"{mode}-{seed}", f"l2/{mode}", seed, scores)
            per_image = run / "eval" / PER_IMAGE_FILE
            rows = list(csv.reader(per_image.open()))
            rows[0] += ["alpha.face", "alpha.background"]
            for row in rows[1:]:
                row += ["0.93", "0.02"] if mode == "mask+decoder" else ["1", "0"]
            with per_image.open("w", newline="") as f:
                csv.writer(f).writerows(rows)
            runs.append(run)
    out = make_report(runs, tmp_path / "r", figures="none")
    c1 = next(c for c in out["claims"] if c["id"] == "C1")
    assert c1["verdict"] == "inconclusive"  # the raw face: no effect
    assert c1["other_regions"]["composite"]["verdict"] == "supported"
    assert c1["other_regions"]["composite-gt"]["verdict"] == "inconclusive"
    from facevae_dist.report.claims import CLAIMS
    assert [c.id for c in CLAIMS if "composite-gt" in c.regions] == ["C1"]  # the mask's own claim
    table = (tmp_path / "r" / "table.md").read_text()
    assert ("Alpha: the binary GT mask for l2/none; its own predicted soft mask for l2/mask+decoder (mean 0.93 on "
            "face pixels, 0.02 on the background)") in table
    assert "Alpha: the binary GT mask (>= 0.5), for every arm alike." in table
    md = (tmp_path / "r" / "claims.md").read_text()
    assert "| C1 | **inconclusive** | supported | inconclusive |" in md


@pytest.mark.parametrize("edit, expected", [
    (lambda m: m.update(seed="zero"), "field 'seed' is \"zero\", expected an integer or null"),
    (lambda m: m.update(hypothesis=["l2", "none"]), "field 'hypothesis' is [\"l2\", \"none\"], expected a string"),
    (lambda m: m.update(checkpoint=100), "field 'checkpoint' is 100, expected an object"),
    (lambda m: m.pop("split"), "field 'split' missing"),
    (None, "not UTF-8 text"),
], ids=["seed-string", "hypothesis-list", "checkpoint-int", "no-split", "binary"])
def test_a_mistyped_or_binary_metrics_json_is_one_line_in_report(tmp_path, capsys, edit, expected):
    rng = np.random.default_rng(0)
    run = write_eval(tmp_path / "run", "l2/none", 0, scores_for(rng, rng.uniform(0.3, 0.9, N_IMAGES), 0.0))
    path = run / "eval" / "metrics.json"
    if edit is None:
        path.write_bytes(path.read_bytes().replace(b'"test"', b'"t\xffst"'))
    else:
        meta = json.loads(path.read_text())
        edit(meta)
        path.write_text(json.dumps(meta))
    assert main(["report", str(run), "--out", str(tmp_path / "rep")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"facevae: error: {path}: ") and expected in err[0], err
