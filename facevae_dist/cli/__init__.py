"""The `facevae` command. Each stage has its own module here that only parses arguments and calls one library
function; this file wires them together and turns user errors into one line and an exit code."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

import facevae_dist
from facevae_dist import progress
from facevae_dist.errors import FaceVAEError, from_os_error
from facevae_dist.runinfo import git_revision

# Stage order = the pipeline's flow: data -> model/train -> evaluate -> report -> sweep.
COMMAND_MODULES = [
    "facevae_dist.cli.demo",
    "facevae_dist.cli.shards",
    "facevae_dist.cli.train",
    "facevae_dist.cli.evaluate",
    "facevae_dist.cli.report",
    "facevae_dist.cli.curve",
    "facevae_dist.cli.infer",
    "facevae_dist.cli.sweep",
    "facevae_dist.cli.bench",
]


class _Parser(argparse.ArgumentParser):
    """argparse prints usage + error on exit code 2 already; keep that, but make the error one line."""

    def error(self, message: str):  # noqa: D401
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


class _Version(argparse.Action):
    """--version: the package version and the git revision it runs from (looked up only when asked)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        rev = git_revision()
        print(f"facevae {facevae_dist.__version__}" + (f" (git {rev})" if rev else ""))
        parser.exit(0)


def _add_global_flags(parser: argparse.ArgumentParser, top: bool) -> None:
    """--debug / --quiet on the top parser (defaults False) and on every subcommand too, so a script can append
    them anywhere (`facevae shards build ... --quiet`); below the top they default to SUPPRESS, which leaves the
    top-level value alone when absent."""
    default = False if top else argparse.SUPPRESS
    if "--debug" not in parser._option_string_actions:
        parser.add_argument("--debug", action="store_true", default=default, help="show full tracebacks for errors")
    if "--quiet" not in parser._option_string_actions:
        flags = ["--quiet"] + ([] if "-q" in parser._option_string_actions else ["-q"])
        parser.add_argument(*flags, action="store_true", default=default,
                            help="no progress bars or status lines (for scripts)")
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _add_global_flags(child, top=False)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="facevae",
        description="Face reconstruction with a VAE and face masks (Toledo & Antonelo 2021), "
        "from shards to a Slurm sweep over the paper's hypothesis grid.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action=_Version, help="print the version (and git revision) and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    _add_global_flags(parser, top=True)
    return parser


def user_paths(args: argparse.Namespace) -> list[str]:
    """Every string argument of the command (paths among them): an OS error on one of these, or inside one, is the
    user's to fix (exit 2)."""
    found = []
    for key, value in vars(args).items():
        if key.startswith("_") or key in ("func", "command"):
            continue
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(v, (str, os.PathLike)) and str(v):
                found.append(os.fspath(v))
                if os.path.dirname(v) and not os.path.isdir(v):  # a file to write: its folder was chosen too
                    found.append(os.path.dirname(v))
    return found


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        # `facevae` or `facevae shards` alone: show the relevant help.
        (getattr(args, "_parser", None) or parser).print_help()
        return 2
    progress.set_quiet(args.quiet)
    if args.quiet:
        os.environ["FACEVAE_QUIET"] = "1"  # child processes (workers, launched ranks) inherit it
    try:
        rc = args.func(args)
        return int(rc or 0)
    except FaceVAEError as exc:
        if args.debug:
            raise
        print(f"facevae: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:  # a full disk, a read-only folder, a path through a file: the path and what to do
        if args.debug:
            raise
        error = from_os_error(exc, user_paths(args))
        print(f"facevae: error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("facevae: interrupted", file=sys.stderr)
        return 130


def run() -> None:  # pragma: no cover - console entry
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
