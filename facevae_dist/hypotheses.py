"""The grid's vocabulary, once: {l1, l2, ssim, ssim+l1, ssim+l2} x {none, mask, mask+decoder} = 15 named runs.

The single definition used by config, train, sweep and report: losses, mask modes, their labels and display order,
the named grids and the default. Imports no torch. Names are "<loss>/<mask_mode>"; the paper's H-numbers are aliases
where the paper pins them down (H1, H5, H6, H9; the others cannot be assigned: docs/paper.md).
The paper ran 10 hypotheses: 5 losses x {without mask = "none", with mask = "mask+decoder"} (grid `paper10`, the
default sweep). "mask" (GT-mask compositing without the mask decoder) is our ablation, not the paper's; `paper15` =
paper10 + those 5 ablations.
"""

from __future__ import annotations

from dataclasses import dataclass

from facevae_dist.errors import UsageError

MASK_MODES = ("none", "mask", "mask+decoder")  # in display order
LOSSES: dict[str, tuple[str, ...]] = {  # name -> image loss terms (LossConfig.terms), in display order
    "l1": ("l1",),
    "l2": ("l2",),
    "ssim": ("ssim",),
    "ssim+l1": ("ssim", "l1"),
    "ssim+l2": ("ssim", "l2"),
}
LOSS_ORDER = tuple(LOSSES)
MODE_ORDER = MASK_MODES
LOSS_LABELS = {"l1": "l1", "l2": "l2", "ssim": "SSIM", "ssim+l1": "SSIM + l1", "ssim+l2": "SSIM + l2"}
MODE_LABELS = {"none": "no", "mask": "GT mask only (ablation)", "mask+decoder": "yes (mask decoder)"}
_ALIASES = {"ssim+l1/none": ("H1",), "ssim/none": ("H5",), "ssim/mask+decoder": ("H6",),
            "ssim+l2/mask+decoder": ("H9",)}


@dataclass(frozen=True)
class Hypothesis:
    name: str  # "<loss>/<mask_mode>", e.g. "ssim+l2/mask+decoder"
    loss: str  # key of LOSSES, e.g. "ssim+l2"
    loss_terms: tuple[str, ...]  # image loss terms for LossConfig.terms
    mask_mode: str  # ModelConfig.mask_mode
    aliases: tuple[str, ...] = ()
    paper_label: str | None = None  # how the paper names this run; None if the paper has no such run

    @property
    def slug(self) -> str:
        """File-name-safe form of the name (no '/'): "ssim+l2--mask+decoder"."""
        return self.name.replace("/", "--")

    def model_overrides(self) -> dict:
        """The ModelConfig fields this hypothesis fixes (merge into a config's model section)."""
        return {"mask_mode": self.mask_mode}

    def loss_overrides(self) -> dict:
        """The LossConfig fields this hypothesis fixes."""
        return {"terms": self.loss_terms}


def _build() -> dict[str, Hypothesis]:
    grid = {}
    for loss, terms in LOSSES.items():
        for mode in MASK_MODES:
            name = f"{loss}/{mode}"
            aliases = _ALIASES.get(name, ())
            label = None
            if mode != "mask":
                label = f"{LOSS_LABELS[loss]}, {'w/ mask' if mode == 'mask+decoder' else 'w/o mask'}"
                if aliases:
                    label += f" ({', '.join(aliases)})"
            grid[name] = Hypothesis(name, loss, terms, mode, aliases, label)
    return grid


HYPOTHESES: dict[str, Hypothesis] = _build()

_PAPER10 = [n for n, h in HYPOTHESES.items() if h.mask_mode != "mask"]  # the runs the paper reports
GRIDS: dict[str, list[str]] = {
    "paper10": _PAPER10,
    "paper15": _PAPER10 + [n for n, h in HYPOTHESES.items() if h.mask_mode == "mask"],  # + our 5 ablations
    "named4": [n for n, h in HYPOTHESES.items() if h.aliases],  # H1, H5, H6, H9
}

DEFAULT_GRID = "paper10"  # what `facevae sweep submit` runs without --grid/--hypotheses

_LOOKUP: dict[str, Hypothesis] = {}
for _h in HYPOTHESES.values():
    for _key in (_h.name, _h.slug, *_h.aliases):
        _LOOKUP[_key.lower()] = _h


def resolve_hypothesis(name_or_alias: str) -> Hypothesis:
    """A grid name ("ssim+l2/mask+decoder"), its slug ("ssim+l2--mask+decoder") or an alias ("H9", any case)."""
    h = _LOOKUP.get(str(name_or_alias).strip().lower())
    if h is None:
        aliases = ", ".join(f"{a}={h.name}" for h in HYPOTHESES.values() for a in h.aliases)
        raise UsageError(f"unknown hypothesis {name_or_alias!r}; valid: {', '.join(HYPOTHESES)} "
                         f"(aliases: {aliases})")
    return h


def resolve_grid(grid: str | None = None, hypotheses: list[str] | None = None) -> list[Hypothesis]:
    """The hypotheses to run: an explicit list of names or aliases (de-duplicated, in order), else the named grid
    (None: DEFAULT_GRID)."""
    if hypotheses:
        return list({h.name: h for h in map(resolve_hypothesis, hypotheses)}.values())
    grid = grid or DEFAULT_GRID
    if grid not in GRIDS:
        raise UsageError(f"unknown grid {grid!r}; valid: {', '.join(GRIDS)}")
    return [HYPOTHESES[n] for n in GRIDS[grid]]


def in_order(present, order: tuple[str, ...]) -> list[str]:
    """The `present` losses (or mask modes) in the grid's `order`, any others after them, sorted."""
    present = set(present)
    return [x for x in order if x in present] + sorted(present - set(order))
