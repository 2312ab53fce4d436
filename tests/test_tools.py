"""tools/: the peer-timing scripts behind docs/performance.md. Only their torch side can run here (TensorFlow is not a
dependency), on the same architecture at a small size."""

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
