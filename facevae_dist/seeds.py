"""Seeds: the valid range, checked up front, and the per-rank / per-resume seeds derived from a run's seed.

A seed reaches numpy's legacy seeding (accelerate.set_seed -> numpy.random.seed), which takes 0..2**32-1, so that
is the range a user may give. Derived seeds keep the old sums (seed + rank, + 1000 x step on a resume with more
ranks) wherever they stay in range, so every seed that worked before gives the same streams; only a sum that would
pass 2**32-1 is replaced by a SeedSequence hash of its parts (in range, and distinct per part with overwhelming
probability) instead of crashing in numpy.
"""

from __future__ import annotations

import argparse

import numpy as np

from facevae_dist.errors import UsageError

SEED_MAX = 2**32 - 1


def seed_problem(value) -> str | None:
    """Why `value` is not a valid seed, or None."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= SEED_MAX:
        return f"{value!r} is not a seed: give an integer from 0 to {SEED_MAX} (2**32-1)"
    return None


def check_seed(name: str, value) -> int:
    """`value` itself, or UsageError naming the field/flag and the valid range."""
    problem = seed_problem(value)
    if problem:
        raise UsageError(f"{name}={problem}")
    return value


def seed_arg(text: str) -> int:
    """argparse type for --seed: a usage error (exit 2) naming the valid range."""
    try:
        value = int(text)
    except ValueError:
        value = text
    problem = seed_problem(value)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return value


def derived_seed(seed: int, rank: int, step: int = 0) -> int:
    """The noise seed of `rank` (and of a resume at `step` whose ranks have no saved RNG state)."""
    old = seed + rank + 1000 * step
    if old <= SEED_MAX:
        return old
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1)[0])
