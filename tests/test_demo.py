"""The README's main job (`facevae demo`) end to end on a tiny configuration, and its resume-on-rerun promise."""

import json

import pytest

from facevae_dist.cli import main

pytestmark = pytest.mark.slow

TINY = ["--n", "160", "--steps", "4", "--width", "0.125", "--batch-size", "4", "--workers", "1",
        "--set", "mixed_precision=no"]


def test_demo_runs_every_stage_with_two_seeds_and_resumes(tmp_path, capsys):
    assert main(["demo", "--root", str(tmp_path), "--seeds", "0,1", *TINY]) == 0
    out = capsys.readouterr()
    printed = out.out + out.err
    report = tmp_path / "reports" / "demo"
    table = (report / "table.md").read_text()
    assert "| l2 | no | 0,1 |" in table and "| l2 | yes (mask decoder) | 0,1 |" in table
    # printed: the face-pixel table first, the composite named as such after it, then the claims with intervals
    face_at = printed.index("Face pixels, raw decoder output")
    assert face_at < printed.index("Composite: the output pasted onto the input's own background")
    assert "The paper's claims these runs can test" in printed and "C1 " in printed
    claims = json.loads((report / "claims.json").read_text())
    assert claims["seeds"] == {"l2/none": [0, 1], "l2/mask+decoder": [0, 1]}
    c1 = next(c for c in claims["claims"] if c["id"] == "C1")
    assert c1["verdict"] in ("supported", "contradicted", "inconclusive") and c1["comparisons"][0]["ci95"]
    assert (report / "table.csv").is_file() and (report / "dataset_contact_sheet.png").stat().st_size > 0
    assert (report / "figures" / "mask_effect.png").is_file() and (report / "figures" / "comparison_raw.png").is_file()
    for slug in ("l2--none", "l2--mask+decoder"):
        for seed in (0, 1):
            run = tmp_path / "runs" / "demo" / f"{slug}--seed{seed}"
            metrics = json.loads((run / "eval" / "metrics.json").read_text())
            assert metrics["n_images"] > 0 and metrics["seed"] == seed
            assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()][-1] >= 4

    # Rerun: shards are kept and finished runs are not retrained (their metrics logs do not grow).
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "shards").rglob("*.tar")}
    log = tmp_path / "runs" / "demo" / "l2--none--seed0" / "metrics.jsonl"
    text = log.read_text()
    assert main(["demo", "--root", str(tmp_path), "--seeds", "0,1", *TINY]) == 0
    assert {p: p.stat().st_mtime_ns for p in before} == before
    assert log.read_text() == text


def test_demo_rejects_unknown_hypothesis_and_bad_seeds(tmp_path, capsys):
    assert main(["demo", "--root", str(tmp_path), "--hypotheses", "l3/none"]) == 2
    err = capsys.readouterr().err
    assert "l3/none" in err and "Traceback" not in err
    assert main(["demo", "--root", str(tmp_path), "--seeds", "0,x"]) == 2
    assert "--seeds" in capsys.readouterr().err
