"""argparse types shared by the stage modules (one parser per kind of value)."""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    """An integer >= 1 (--limit, --batch-size, --bootstrap); argparse turns the error into one usage line."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def device(text: str) -> str:
    """--device: a known device name (availability is checked when the command runs: devices.resolve_device)."""
    from facevae_dist.devices import DEVICE_HELP, DEVICE_PATTERN

    if not DEVICE_PATTERN.fullmatch(text):
        raise argparse.ArgumentTypeError(f"not a device: {text!r}; use {DEVICE_HELP}")
    return text


def bounded_int(low: int, high: int):
    """An integer in [low, high]: counts that size an allocation (`sample --n`, `interpolate --steps`) get an upper
    bound, so a typo like 1e8 is a usage line, not a 200 GB allocation."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer in [{low}, {high}], got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"expected an integer in [{low}, {high}], got {value}")
        return value

    parse.__name__ = "integer"  # argparse names the type in its own messages
    return parse


def add_device_argument(parser, default: str | None = None) -> None:
    """The same --device flag on every command that runs a model."""
    from facevae_dist.devices import DEVICE_HELP

    parser.add_argument("--device", type=device, default=default, metavar="DEVICE",
                        help=f"{DEVICE_HELP} (default {default or 'auto'})")
