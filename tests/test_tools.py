"""tools/: the peer-timing scripts behind docs/performance.md (only their torch side can run here: TensorFlow is not a
dependency; on the same architecture at a small size) and the copier of the reference report's numbers into the
READMEs."""

import importlib.util
import json
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[1] / "tools"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_layer_times_times_every_layer_kind_of_the_model(capsys):
    kinds = {"conv, encoder", "conv, decoders", "transposed conv", "batchnorm", "elu", "maxpool", "dense", "losses", "clip + adam"}
    assert load("layer_times").main(["torch", "--model", "mask+decoder", "--image-size", "18", "--batch-size", "4",
                                     "--repeats", "1"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["ms"]) == kinds and all(v > 0 for v in result["ms"].values()), result
    assert result["sum_ms"] == pytest.approx(sum(result["ms"].values()), abs=0.5)
    assert result["full_step_ms"] > 0 and (result["image_size"], result["batch_size"]) == (18, 4)


def test_tools_refuse_what_they_cannot_time(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        load("layer_times").main(["tf", "--code", str(tmp_path)])
    assert exc.value.code == 2 and "layer_times.py: error: tf needs --code" in capsys.readouterr().err
    (tmp_path / "training.py").write_text("")
    with pytest.raises(SystemExit) as exc:  # the authors' TF model exists at 144 px only
        load("layer_times").main(["tf", "--code", str(tmp_path), "--image-size", "18"])
    assert exc.value.code == 2 and "144 px, batch 32" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        load("paper_tf_fit").main([str(tmp_path / "elsewhere")])
    assert exc.value.code == 2 and "no training.py" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        load("paper_tf_fit").main([str(tmp_path), "--epochs", "1"])
    assert exc.value.code == 2 and "the first is warm-up" in capsys.readouterr().err


TABLE_MD = """# Reconstruction metrics

## Face pixels, raw decoder output (`face`)

| Loss | Mask | seeds | 1−SSIM | LPIPS | 10·RMSE (paper: 10·l2) |
|---|---|---|---:|---:|---:|
| SSIM + l1 | no | 0,1,2 | **0.240 [0.230, 0.250]** (0.338) | 0.064 [0.050, 0.078] (0.162) | 0.656 [0.632, 0.680] (0.781) |
| SSIM + l1 | yes (mask decoder) | 0,1,2 | 0.334 [0.327, 0.341] (0.311) | 0.183 [0.167, 0.199] (0.146) | 0.518 [0.494, 0.542] (0.732) |

## Composite (`composite`)

| Loss | Mask | seeds | 1−SSIM | LPIPS | 10·RMSE (paper: 10·l2) |
|---|---|---|---:|---:|---:|
| SSIM + l1 | no | 0,1,2 | 0.074 [0.071, 0.078] (0.338) | 0.01 [0.00, 0.02] (0.162) | 0.7 [0.6, 0.8] (0.781) |
| SSIM + l1 | yes (mask decoder) | 0,1,2 | 0.041 [0.038, 0.045] (0.311) | 0.02 [0.01, 0.03] (0.146) | 0.5 [0.4, 0.6] (0.732) |
"""


def test_readme_tables_take_every_cell_from_the_report():
    tables = load("readme_tables")
    cells = tables.report_cells(TABLE_MD)
    assert cells[("face", "10·RMSE")][("SSIM+l1", "yes")] == "0.518 [0.494, 0.542]"  # the paper's value dropped
    readme = ("Intro.\n\n| loss | mask | face 1−SSIM | composite 1−SSIM |\n|---|---|---:|---:|\n"
              "| SSIM+l1 | no | 0.999 [0.1, 0.2] | stale |\n| SSIM+l1 | yes | x | y |\n\nAfter | a bar.\n")
    new = tables.rewrite(readme, cells, "README.md")
    assert new == ("Intro.\n\n| loss | mask | face 1−SSIM | composite 1−SSIM |\n|---|---|---:|---:|\n"
                   "| SSIM+l1 | no | **0.240 [0.230, 0.250]** | 0.074 [0.071, 0.078] |\n"
                   "| SSIM+l1 | yes | 0.334 [0.327, 0.341] | 0.041 [0.038, 0.045] |\n\nAfter | a bar.\n")
    assert tables.rewrite(new, cells, "README.md") == new
    with pytest.raises(ValueError, match=r"README.md:1: no column whole 1−VIF in table.md"):
        tables.rewrite("| loss | mask | whole 1−VIF |\n", cells, "README.md")
    with pytest.raises(ValueError, match=r"README.md:3: no row l2/no in table.md"):
        tables.rewrite("| loss | mask | face LPIPS |\n|---|---|---:|\n| l2 | no | 0.1 |\n", cells, "README.md")


def test_the_readmes_show_the_committed_reports_numbers(capsys):
    assert load("readme_tables").main(["--check"]) == 0, capsys.readouterr().out
