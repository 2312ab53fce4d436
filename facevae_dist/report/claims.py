"""The paper's testable claims (docs/paper.md, C1-C12) checked against evaluated runs.

Each claim is a set of directional comparisons "run A is better (lower) than run B on metric m", split into parts
that need different runs (C1: one part per loss). A comparison is judged on the paired per-image difference A - B
with its seed-level 95% t interval and p-value (stats.py; the seed variance pooled over the grid's hypotheses where
an arm has fewer than 3 seeds). Per claim and region, over all its tested comparisons:
- supported:    every comparison's 95% interval excludes 0 the claimed way (an intersection-union test: each at 95%
                keeps the claim's error at 5%, so no correction is needed); `no_worse` comparisons ("equal or better",
                C5) need not, but must not be contradicted.
- contradicted: at least one comparison excludes 0 the other way after a Holm correction over the claim's
                comparisons (two-sided p-values from the same t), so a contradiction too has at most a 5% chance
                when nothing differs, however many comparisons the claim makes (C3 makes 54).
- inconclusive: otherwise; "inconclusive (one seed)" where an arm has one seed and no pooled variance stands in
  for the seed spread (no interval, never a verdict).
Verdicts are given on the `face` region (raw output, face pixels: what the model itself reconstructs) and, beside
it, on `composite`; C1, the mask's own claim, also on `composite-gt`, where every arm is pasted through the same
binary GT mask, so that the mask's effect on the drawn face is told apart from the input its predicted soft mask
lets through on `composite`.

The claims the paper makes in words are made measurable and judged by the same rules (appearance.py):
- C9 (SSIM alone shifts skin colour toward magenta/red; adding l1/l2 fixes it), with and without the mask: the shift,
  SSIM alone's mean signed a* difference on skin pixels is above 0 (its interval excludes 0), and its repair, that of
  SSIM+l1 and of SSIM+l2 is lower than SSIM alone's (paired per image, excluding 0). Sizes are shown against a
  just-noticeable difference (CIE76 ΔE 2.3).
- C10 (mask models give sharper hair): for every loss the mask variant keeps more of the input's hair-interior detail
  (appearance.py `hair_detail`; judged as 1 − detail, lower is better), on the images whose hair interior has texture
  (`hair_texture` at or above the floor). Where fewer than half the images with a hair interior have any, the claim
  is "not testable on this data", with the numbers, never a verdict.
- C12 (the mask matters more for l1/l2 than for SSIM): the paired mask effect of l1 and of l2 minus that of SSIM
  (a difference of paired differences) is negative on every metric.
- C11 (no mask needed at inference) is a property of the method, shown rather than tested.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from facevae_dist.evaluate.appearance import HAIR_TEXTURE_FLOOR, JND_DELTA_E
from facevae_dist.report.paper import paper_result
from facevae_dist.report.results import COLUMN_KEYS, Group
from facevae_dist.stats import (
    POOL_BELOW,
    Interval,
    Pooled,
    difference_of_differences,
    group_intervals,
    holm,
    paired_differences,
    pool,
)

N, M = "none", "mask+decoder"
LOSSES = ("l1", "l2", "ssim", "ssim+l1", "ssim+l2")
PERCEPTUAL = ("1-ssim", "1-ms-ssim", "lpips", "1-vif")
PRIMARY_REGION = "face"
OTHER_REGIONS = ("composite",)
C1_REGIONS = ("composite", "composite-gt")  # the method's own composite and every arm through the GT mask
ONE_SEED = "inconclusive (one seed)"
NOT_TESTABLE = "not testable on this data"
UNTESTED = ("not tested", NOT_TESTABLE)
MIN_TEXTURED_SHARE = 0.5  # C10: at least this share of the images with a hair interior must have hair texture
METHOD_NOTE = (
    f"Seed variance: a hypothesis with fewer than {POOL_BELOW} seeds takes the one pooled over every hypothesis of "
    "the report (per metric and region), one with more its own (Welch). Pooling is what makes two seeds informative "
    "(alone, their one difference leaves 1 degree of freedom) but assumes about equal seed variance across "
    "hypotheses (table.md, Seed spread); with three seeds or more each hypothesis's own variance stays calibrated "
    "when seed variances differ, which pooling does not (simulated grids: tests/test_stats.py).")


@dataclass(frozen=True)
class Comparison:
    better: tuple[str, str]  # (loss, mask_mode) claimed lower
    worse: tuple[str, str]
    metric: str  # a COLUMN_KEYS entry
    kind: str = "better"  # "better" | "no_worse"


@dataclass(frozen=True)
class ClaimPart:
    """Comparisons that need the same runs (C1: one part per loss), tested only when all those runs are there."""

    label: str
    comparisons: tuple[Comparison, ...]

    def needs(self) -> set[tuple[str, str]]:
        return {h for c in self.comparisons for h in (c.better, c.worse)}


@dataclass(frozen=True)
class Claim:
    id: str
    text: str
    parts: tuple[ClaimPart, ...]
    regions: tuple[str, ...] = OTHER_REGIONS  # judged beside PRIMARY_REGION


def _on_metrics(better, worse, metrics=COLUMN_KEYS, kind="better"):
    """`better` against `worse` on each of `metrics`."""
    return tuple(Comparison(better, worse, m, kind) for m in metrics)


def _claims() -> tuple[Claim, ...]:
    c1 = tuple(ClaimPart(f"loss {loss}", _on_metrics((loss, M), (loss, N)))
               for loss in ("l1", "l2", "ssim+l1", "ssim+l2"))
    c2 = (ClaimPart("SSIM", _on_metrics(("ssim", N), ("ssim", M), ("1-ssim", "1-ms-ssim"))
                    + _on_metrics(("ssim", M), ("ssim", N), ("lpips", "1-vif", "10*l1", "10*l2"))),)
    h9 = ("ssim+l2", M)
    c3 = (ClaimPart("all ten runs", tuple(c for loss in LOSSES for mode in (N, M) if (loss, mode) != h9
                                          for c in _on_metrics(h9, (loss, mode)))),)
    c4 = (ClaimPart("the five no-mask runs",
                    tuple(c for loss in LOSSES if loss != "ssim"
                          for c in _on_metrics(("ssim", N), (loss, N), PERCEPTUAL))
                    + tuple(c for loss in LOSSES if loss != "ssim+l1"
                            for c in _on_metrics(("ssim+l1", N), (loss, N), ("10*l1", "10*l2")))),)
    c5 = (ClaimPart("with mask",
                    _on_metrics(("l2", M), ("ssim", M), ("1-ssim", "1-ms-ssim", "lpips"), kind="no_worse")
                    + _on_metrics(("l2", M), ("ssim", M), ("1-vif", "10*l1", "10*l2"))),)
    c6 = (ClaimPart("without mask", _on_metrics(("ssim", N), ("l2", N), ("1-ssim", "1-ms-ssim", "lpips"))),)
    c7 = (ClaimPart("with mask", _on_metrics(("l2", M), ("l1", M))),
          ClaimPart("without mask", _on_metrics(("l2", N), ("l1", N), COLUMN_KEYS[1:])
                    + _on_metrics(("l1", N), ("l2", N), ("1-ssim",))))
    c8 = (ClaimPart("with mask", _on_metrics(("ssim+l2", M), ("ssim+l1", M))),
          ClaimPart("without mask", _on_metrics(("ssim+l1", N), ("ssim+l2", N))))
    return (
        Claim("C1", "For l1, l2, SSIM+l1 and SSIM+l2, the mask variant beats the no-mask variant on all six "
              "metrics.", c1, C1_REGIONS),
        Claim("C2", "For SSIM alone, no-mask is better on 1−SSIM and 1−MS-SSIM; the mask variant is better on "
              "LPIPS, 1−VIF, l1 and l2.", c2),
        Claim("C3", "SSIM+l2 with mask (H9) is best of all ten runs on every metric.", c3),
        Claim("C4", "Without masks no run dominates: SSIM alone is best on 1−SSIM, 1−MS-SSIM, LPIPS and 1−VIF; "
              "SSIM+l1 is best on l1 and l2.", c4),
        Claim("C5", "With masks, l2 alone is equal to or better than SSIM alone on 1−SSIM, 1−MS-SSIM and LPIPS, "
              "and better on 1−VIF, l1 and l2.", c5),
        Claim("C6", "Without masks, l2 alone is worse than SSIM alone on 1−SSIM, 1−MS-SSIM and LPIPS.", c6),
        Claim("C7", "l2 beats l1 as a standalone loss, even on the l1 metric; without a mask l1 is better on "
              "1−SSIM only.", c7),
        Claim("C8", "With masks SSIM+l2 beats SSIM+l1 on all six metrics; without masks SSIM+l1 beats SSIM+l2 on "
              "all six.", c8),
    )


CLAIMS = _claims()

# The claims the paper makes in words (docs/paper.md), and how each is made measurable here.
WORDED_CLAIMS = {
    "C9": ("SSIM-only training shifts skin colour (toward magenta/red); adding l1 or l2 to SSIM fixes it.",
           "the mean signed CIELAB a* difference, reconstruction − input, on skin pixels of the shards' label maps "
           "(appearance.py `skin_da`; + is toward red/magenta): SSIM alone's above 0 (the shift), SSIM+l1's and "
           "SSIM+l2's below SSIM alone's (the repair), paired per image"),
    "C10": ("Mask models give sharper hair.",
            "hair detail lost = 1 − hair detail, where hair detail is <Lin, Lrec> / max(|Lin|², |Lrec|²) of the "
            "Laplacian of luma on hair-interior pixels (the label map's hair eroded from its outline; appearance.py "
            "`hair_detail`: 1 = the input's detail in phase, blur and noise score low), on images whose hair "
            "interior has texture; lower is sharper"),
    "C11": ("The mask decoder lets the model composite its output at test time with no mask input.",
            "a property of the method, shown rather than tested"),
    "C12": ("The mask matters more for the l_n losses than for SSIM (SSIM is less sensitive to the background).",
            "the paired mask effect (mask+decoder − none) of l1 and of l2 minus that of SSIM, per metric "
            "(a difference of paired differences)"),
}
C11_DEMONSTRATION = (
    "Shown, not tested: every mask+decoder model here is evaluated from the input image alone (the composite's "
    "alpha is the mask the model predicts; no mask is given to it at inference), and `comparison_composite.png` "
    "shows those composites. `facevae reconstruct` does the same for any photo.")
APPEARANCE_MODES = (N, M)


def _name(h: tuple[str, str]) -> str:
    return f"{h[0]}/{h[1]}"


def judge(comparisons: list[Comparison], intervals: list[Interval]) -> list[str]:
    """The result of each comparison of one claim in one region (its intervals: better − worse), the Holm
    correction taken over all of them."""
    tested = [i for i, d in enumerate(intervals) if d.p is not None]
    rejected = {i for i, r in zip(tested, holm([intervals[i].p for i in tested])) if r}
    out = []
    for i, (c, d) in enumerate(zip(comparisons, intervals)):
        if d.mean is None:
            out.append("inconclusive")  # undefined on these images (e.g. LPIPS below 31 px)
        elif d.one_seed:
            out.append(ONE_SEED)
        elif i in rejected and d.mean > 0:
            out.append("contradicted")
        elif c.kind == "no_worse":
            out.append("not contradicted")
        else:
            out.append("supported" if d.hi < 0 else "inconclusive")
    return out


def _verdict(results: list[str]) -> str:
    if "contradicted" in results:
        return "contradicted"
    if all(r in ("supported", "not contradicted") for r in results) and "supported" in results:
        return "supported"
    return ONE_SEED if ONE_SEED in results else "inconclusive"


class _Differences:
    """Paired differences better - worse for all six columns at once, cached per (better, worse, region), with the
    seed variance pooled over every hypothesis of the grid per region (computed once)."""

    def __init__(self, groups: list[Group], keys: list[str], pooled: dict[str, Pooled] | None = None):
        self.by = {(g.loss, g.mask_mode): g for g in groups}
        self.keys, self.pooled = keys, dict(pooled or {})
        self.cache: dict = {}

    def pooled_for(self, region: str) -> Pooled:
        if region not in self.pooled:
            self.pooled[region] = pool([g.matrix(self.keys, region) for g in self.by.values()])
        return self.pooled[region]

    def get(self, better, worse, region) -> dict[str, Interval]:
        k = (better, worse, region)
        if k not in self.cache:
            a = self.by[worse].matrix(self.keys, region)
            b = self.by[better].matrix(self.keys, region)
            self.cache[k] = dict(zip(COLUMN_KEYS, paired_differences(a, b, pooled=self.pooled_for(region))))
        return self.cache[k]


def _record(part: str, c: Comparison, d: Interval, paper: float | None, *, better: str | None = None,
            worse: str | None = None) -> tuple[Comparison, Interval, dict]:
    return c, d, {"part": part, "better": better or _name(c.better), "worse": worse or _name(c.worse),
                  "metric": c.metric, "kind": c.kind, "difference": d.mean,
                  "ci95": None if d.lo is None else [d.lo, d.hi], "p": d.p, "df": d.df, "pooled": d.pooled,
                  "per_seed": list(d.per_seed), "n_seeds": d.n_seeds, "n_images": d.n_images,
                  "paper_difference": paper}


def _judged(records: list[tuple[Comparison, Interval, dict]]) -> list[dict]:
    """The records of one claim in one region with their results (judged together: the Holm family)."""
    results = judge([c for c, _, _ in records], [d for _, d, _ in records])
    return [{**r, "result": res} for (_, _, r), res in zip(records, results)]


def _paper_diff(c: Comparison) -> float | None:
    pb, pw = paper_result(*c.better), paper_result(*c.worse)
    return None if pb is None or pw is None else round(pb[c.metric] - pw[c.metric], 3)


def check_claims(groups: list[Group], keys: list[str], *, pooled: dict[str, Pooled] | None = None) -> list[dict]:
    """One dict per claim C1-C12: verdict, region, scope, the numbers (C11: the demonstration). pooled: region ->
    the grid's pooled seed variance (`stats.pool` over `groups`), computed here where not given."""
    diffs = _Differences(groups, keys, pooled)
    have = set(diffs.by)
    regions_all = set.intersection(*(set(g.regions()) for g in groups)) if groups else set()
    out = []
    for claim in CLAIMS:
        testable = [p for p in claim.parts if p.needs() <= have]
        skipped = [p for p in claim.parts if not p.needs() <= have]
        missing = sorted({_name(h) for p in skipped for h in p.needs() - have})
        entry = {"id": claim.id, "claim": claim.text}
        if not testable:
            entry.update(verdict="not tested", region=None,
                         needs=f"runs of {', '.join(missing)} (evaluated on the same test images)")
            out.append(entry)
            continue
        per_region = {}
        for region in (PRIMARY_REGION, *claim.regions):
            if region not in regions_all:
                continue
            comps = _judged([_record(part.label, c, diffs.get(c.better, c.worse, region)[c.metric], _paper_diff(c))
                             for part in testable for c in part.comparisons])
            per_region[region] = {"verdict": _verdict([c["result"] for c in comps]), "comparisons": comps}
        primary = PRIMARY_REGION if PRIMARY_REGION in per_region else next(iter(per_region))
        entry.update(verdict=per_region[primary]["verdict"], region=primary,
                     scope="all parts" if not skipped else
                     f"tested: {', '.join(p.label for p in testable)}; not tested: "
                     f"{', '.join(p.label for p in skipped)} (needs runs of {', '.join(missing)})",
                     comparisons=per_region[primary]["comparisons"],
                     other_regions={r: v for r, v in per_region.items() if r != primary})
        out.append(entry)
    by = diffs.by
    out += [_skin_colour_shift_claim(by, keys), _hair_detail_claim(by, keys),
            {"id": "C11", "claim": WORDED_CLAIMS["C11"][0], "verdict": "shown", "region": None,
             "measure": WORDED_CLAIMS["C11"][1], "note": C11_DEMONSTRATION},
            _mask_effect_by_loss_claim(diffs, regions_all)]
    return out


def _worded(cid: str, region: str | None, comps: list[dict], scope: str, other: dict | None = None) -> dict:
    text, measure = WORDED_CLAIMS[cid]
    return {"id": cid, "claim": text, "measure": measure, "verdict": _verdict([c["result"] for c in comps]),
            "region": region, "scope": scope, "comparisons": comps, "other_regions": other or {}}


def _not_tested(cid: str, needs: str) -> dict:
    text, measure = WORDED_CLAIMS[cid]
    return {"id": cid, "claim": text, "measure": measure, "verdict": "not tested", "region": None, "needs": needs}


def _not_testable(cid: str, reason: str) -> dict:
    """The runs are there, but their test images cannot show what the claim is about (e.g. hair without texture)."""
    text, measure = WORDED_CLAIMS[cid]
    return {"id": cid, "claim": text, "measure": measure, "verdict": NOT_TESTABLE, "region": None, "reason": reason}


def _missing(by: dict, needed: list[tuple[str, str]]) -> list[str]:
    return [_name(h) for h in needed if h not in by]


def _appearance_pooled(by: dict, keys: list[str], measure: str, transform=lambda v: v) -> Pooled:
    return pool([transform(g.appearance(keys, (measure,))) for g in by.values() if g.has_appearance()])


def _no_region_reason(by: dict, what: str) -> str:
    """Why no image has a `what` region: what eval recorded about the shards' label maps where it found none."""
    for g in by.values():
        for run in g.runs:
            why = (run.ev.get("appearance") or {}).get("label_maps") or ""
            if why.startswith(("these shards", "no sample")):
                return why
    return f"no test image has enough {what} pixels in its label map (appearance.py)"


C9_REPAIRS = ("ssim+l1", "ssim+l2")
SKIN_SHIFT = ("skin_dl", "skin_da", "skin_db")


def _skin_colour_shift_claim(by, keys) -> dict:
    """C9: SSIM alone's skin colour shift and its repair by SSIM+l1 and SSIM+l2, with and without the mask."""
    needed = [(loss, mode) for mode in APPEARANCE_MODES for loss in ("ssim", *C9_REPAIRS)]
    missing = _missing(by, needed)
    if missing:
        return _not_tested("C9", f"runs of {', '.join(missing)} (evaluated on the same test images)")
    if not all(by[h].has_appearance() for h in needed):
        return _not_tested("C9", "skin colour measures: re-run `facevae eval` on these runs (older evals lack them)")
    da = {h: by[h].appearance(keys, ("skin_da",)) for h in needed}
    if all(np.isnan(v).all() for v in da.values()):
        return _not_testable("C9", _no_region_reason(by, "skin"))
    pooled = _appearance_pooled(by, keys, "skin_da")
    comps = []
    for mode in APPEARANCE_MODES:
        part = "with mask" if mode == M else "without mask"
        ssim = da[("ssim", mode)]
        # the shift: 0 − SSIM alone's Δa*, below 0 (supported) when SSIM alone moves skin toward red/magenta
        shift = group_intervals(-ssim, pooled=pooled)[0]
        comps.append(_record(part, Comparison(("ssim", mode), ("ssim", mode), "skin Δa*"), shift, None,
                             better="no shift (Δa* = 0)", worse=f"{_name(('ssim', mode))}: Δa*"))
        for loss in C9_REPAIRS:  # the repair: Δa* with l1/l2 added minus SSIM alone's, paired per image
            d = paired_differences(ssim, da[(loss, mode)], pooled=pooled)[0]
            comps.append(_record(part, Comparison((loss, mode), ("ssim", mode), "skin Δa*"), d, None))
    entry = _worded("C9", "skin", _judged(comps), "the shift of SSIM alone and its repair by SSIM+l1 and SSIM+l2, "
                    "with and without the mask")
    entry["sizes"] = [_shift_size(by[h], keys) for h in needed]
    return entry


def _shift_size(g: Group, keys: list[str]) -> dict:
    """One hypothesis's mean skin shift (over seeds of the per-seed image mean) and its CIE76 size beside a
    just-noticeable difference."""
    v = g.appearance(keys, SKIN_SHIFT)  # [k, n, 3]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a seed without any skin pixel: NaN, said as n/a
        dl, da, db = (float(x) for x in np.nanmean(v, axis=1).mean(axis=0))
    delta_e = float(np.sqrt(dl * dl + da * da + db * db))
    return {"hypothesis": _name((g.loss, g.mask_mode)), "dl": dl, "da": da, "db": db, "delta_e": delta_e,
            "jnd": JND_DELTA_E, "visible": bool(delta_e >= JND_DELTA_E)}


def _hair_detail_claim(by, keys) -> dict:
    """C10: the mask variant of each loss keeps more of the input's hair-interior detail."""
    losses = [loss for loss in LOSSES if (loss, N) in by and (loss, M) in by]
    if not losses:
        return _not_tested("C10", "a loss run both without and with the mask (evaluated on the same test images)")
    arms = [(loss, m) for loss in losses for m in (N, M)]
    if not all(by[h].has_appearance() for h in arms):
        return _not_tested("C10", "hair measures: re-run `facevae eval` on these runs (older evals lack them)")
    texture = by[arms[0]].appearance(keys, ("hair_texture",))[0, :, 0]  # the input's: the same in every run
    interior = ~np.isnan(texture)
    if not interior.any():
        return _not_testable("C10", _no_region_reason(by, "hair-interior"))
    textured = interior & (texture >= HAIR_TEXTURE_FLOOR)
    if textured.sum() < MIN_TEXTURED_SHARE * interior.sum():
        return _not_testable("C10", (
            f"the inputs' hair has no interior texture to keep: its RMS Laplacian of luma is below the floor "
            f"{HAIR_TEXTURE_FLOOR} in {int(interior.sum() - textured.sum())} of the {int(interior.sum())} test "
            f"images with a hair interior (median {float(np.median(texture[interior])):.4f}); a verdict needs "
            f"texture in at least {MIN_TEXTURED_SHARE:.0%} of them"))

    def lost(g: Group) -> np.ndarray:  # 1 − hair detail on the images with hair texture, NaN on the others
        return np.where(textured[None, :, None], 1.0 - g.appearance(keys, ("hair_detail",)), np.nan)

    pooled = pool([lost(g) for g in by.values() if g.has_appearance()])
    comps = []
    for loss in losses:
        d = paired_differences(lost(by[(loss, N)]), lost(by[(loss, M)]), pooled=pooled)[0]
        comps.append(_record(f"loss {loss}", Comparison((loss, M), (loss, N), "hair detail lost"), d, None))
    skipped = [loss for loss in LOSSES if loss not in losses]
    scope = "every loss" if not skipped else f"losses {', '.join(losses)} (not run both ways: {', '.join(skipped)})"
    return _worded("C10", "hair interior", _judged(comps),
                   f"{scope}; the {int(textured.sum())} of {len(keys)} images whose hair interior has texture")


def _mask_effect_by_loss_claim(diffs: _Differences, regions) -> dict:
    """C12: the mask effect of l1 and of l2 is larger than that of SSIM (a difference of paired differences)."""
    by, keys = diffs.by, diffs.keys
    needed = [(loss, mode) for loss in ("ssim", "l1", "l2") for mode in (N, M)]
    missing = _missing(by, needed)
    if missing:
        return _not_tested("C12", f"runs of {', '.join(missing)} (evaluated on the same test images)")
    per_region = {}
    for region in (PRIMARY_REGION, *OTHER_REGIONS):
        if region not in regions:
            continue
        ssim = [by[("ssim", m)].matrix(keys, region) for m in (N, M)]
        comps = []
        for loss in ("l1", "l2"):
            ln = [by[(loss, m)].matrix(keys, region) for m in (N, M)]
            ivs = difference_of_differences(*ln, *ssim, pooled=diffs.pooled_for(region))
            for metric, d in zip(COLUMN_KEYS, ivs):
                c = Comparison((loss, "mask effect"), ("ssim", "mask effect"), metric)
                comps.append(_record(f"loss {loss}", c, d, _paper_effect_diff(loss, metric),
                                     better=f"{loss}: mask effect", worse="SSIM: mask effect"))
        comps = _judged(comps)
        per_region[region] = {"verdict": _verdict([c["result"] for c in comps]), "comparisons": comps}
    primary = PRIMARY_REGION if PRIMARY_REGION in per_region else next(iter(per_region))
    other = {r: v for r, v in per_region.items() if r != primary}
    return _worded("C12", primary, per_region[primary]["comparisons"], "l1 and l2 against SSIM, six metrics", other)


def _paper_effect_diff(loss: str, metric: str) -> float | None:
    """The paper's (loss mask − loss none) − (SSIM mask − SSIM none) on `metric`."""
    vals = [paper_result(l, m) for l in (loss, "ssim") for m in (N, M)]
    if any(v is None for v in vals):
        return None
    a0, a1, b0, b1 = (v[metric] for v in vals)
    return round((a1 - a0) - (b1 - b0), 3)


def _fmt_ci(c: dict) -> str:
    if c["difference"] is None:
        return "n/a"
    if c["ci95"] is None:
        return f"{c['difference']:+.4f} [one seed]"
    return f"{c['difference']:+.4f} [{c['ci95'][0]:+.4f}, {c['ci95'][1]:+.4f}] p {c['p']:.2g}"


def claims_markdown(claims: list[dict], n_images: int, seeds_note: str) -> str:
    lines = ["# The paper's claims, checked", "",
             f"Differences are `better − worse` as claimed (lower is better, so a supported comparison is "
             f"negative), paired on the same {n_images} test images: the mean over seeds with a 95% t interval "
             f"whose unit is the seed (the spread of the per-seed differences, plus the image-sampling variance "
             f"they share); {seeds_note}. {METHOD_NOTE} A claim is **supported** when every comparison's interval "
             "excludes 0 the claimed way (no correction needed: all must hold), **contradicted** when at least one "
             "excludes 0 the other way after a Holm correction over the claim's comparisons (p-values from the same "
             "t), **inconclusive** otherwise; an \"equal or better\" comparison (≤) counts only when clearly worse. "
             "Verdicts are judged on the `face` region (raw output, face pixels); the `composite` verdict is given "
             "beside it, and for C1 the `composite-gt` one (every arm pasted through the same binary GT mask, so the "
             "input a predicted soft mask lets through counts for no arm).", "",
             "| Claim | Verdict (face) | Verdict (composite) | Verdict (composite-gt) | Scope / what is needed |",
             "|---|---|---|---|---|"]
    for c in claims:
        comp, gt = (c.get("other_regions", {}).get(r, {}).get("verdict", "—") for r in C1_REGIONS)
        region = f" ({c['region']} pixels)" if c.get("region") not in (None, PRIMARY_REGION) else ""
        lines.append(f"| {c['id']} | **{c['verdict']}**{region} | {comp} | {gt} | "
                     f"{c.get('scope') or c.get('needs') or c.get('reason') or c.get('note')} |")
    lines.append("")
    for c in claims:
        lines += [f"## {c['id']}: {c['verdict']}", "", c["claim"], ""]
        if c.get("measure"):
            lines += [f"Measured as: {c['measure']}.", ""]
        if c["verdict"] == "not tested":
            lines += [f"Not tested: needs {c['needs']}", ""]
            continue
        if c["verdict"] == NOT_TESTABLE:
            lines += [f"Not testable on this data: {c['reason']}.", ""]
            continue
        if "comparisons" not in c:
            lines += [c["note"], ""]
            continue
        others = list(c.get("other_regions", {}))
        primary = c["region"]
        lines += [f"Scope: {c['scope']}; judged on `{primary}` pixels.", "",
                  f"| Part | Better | Worse | Metric | {primary}: diff [95% CI] p | per seed | "
                  + "".join(f"{r}: diff [95% CI] p | " for r in others)
                  + f"paper diff | result ({' / '.join([primary, *others])}) |",
                  "|---|---|---|---|---:|---:|" + "---:|" * len(others) + "---:|---|"]
        for i, x in enumerate(c["comparisons"]):
            os_ = [(c["other_regions"][r]["comparisons"] + [None] * (i + 1))[i] for r in others]
            kind = " (≤)" if x["kind"] == "no_worse" else ""
            paper = "n/a" if x["paper_difference"] is None else f"{x['paper_difference']:+.3f}"
            seeds = ", ".join(f"{v:+.4f}" for v in x["per_seed"]) or "—"
            lines.append(f"| {x['part']} | {x['better']} | {x['worse']} | {x['metric']}{kind} | {_fmt_ci(x)} | "
                         f"{seeds} | " + "".join(f"{_fmt_ci(o) if o else '—'} | " for o in os_) + f"{paper} | "
                         + " / ".join([x["result"], *(o["result"] if o else "—" for o in os_)]) + " |")
        lines.append("")
        if c.get("sizes"):
            lines += [f"Mean skin shift per hypothesis (reconstruction − input, CIELAB; ΔE = the size of the mean "
                      f"shift, visible from about {JND_DELTA_E}):", "",
                      "| Hypothesis | ΔL* | Δa* (+ red/magenta) | Δb* (+ yellow) | ΔE of the mean shift |",
                      "|---|---:|---:|---:|---:|"]
            lines += [f"| {z['hypothesis']} | {z['dl']:+.2f} | {z['da']:+.2f} | {z['db']:+.2f} | {z['delta_e']:.2f}"
                      f"{' (visible)' if z['visible'] else ''} |" for z in c["sizes"]] + [""]
    return "\n".join(lines)


def summary_lines(claims: list[dict]) -> list[str]:
    """One line per tested claim (for the demo's closing print), intervals of its first comparisons."""
    out = []
    for c in claims:
        if "comparisons" not in c:
            continue
        nums = "; ".join(f"{x['metric']} {_fmt_ci(x)}" for x in c["comparisons"][:6])
        comp, gt = (c.get("other_regions", {}).get(r, {}).get("verdict") for r in C1_REGIONS)
        out.append(f"{c['id']} {c['verdict'].upper()} on {c['region']} pixels"
                   + (f" ({comp} on the composite" + (f", {gt} on the GT-mask composite" if gt else "") + ")"
                      if comp else "") + f" [{c['scope']}]: {nums}")
    return out
