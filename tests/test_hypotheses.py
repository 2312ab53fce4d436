"""The hypothesis grid: 15 unique names (the paper's 10 + our 5 ablations), aliases, grids, config pieces, the
paper's table."""

import pytest

from facevae_dist.errors import UsageError
from facevae_dist.hypotheses import DEFAULT_GRID, GRIDS, HYPOTHESES, resolve_grid, resolve_hypothesis
from facevae_dist.paper_results import METRICS, PAPER_RESULTS, paper_result


def test_fifteen_unique_names_and_aliases():
    assert len(HYPOTHESES) == 15
    assert len({h.slug for h in HYPOTHESES.values()}) == 15
    assert {h.mask_mode for h in HYPOTHESES.values()} == {"none", "mask", "mask+decoder"}
    aliases = [a for h in HYPOTHESES.values() for a in h.aliases]
    assert sorted(aliases) == ["H1", "H5", "H6", "H9"]
    for name, h in HYPOTHESES.items():
        assert h.name == name and "/" not in h.slug
        for key in (name, h.slug, *h.aliases, name.upper()):
            assert resolve_hypothesis(key) is h


def test_aliases_point_where_the_readme_says():
    assert resolve_hypothesis("H1").name == "ssim+l1/none"
    assert resolve_hypothesis("h5").name == "ssim/none"
    assert resolve_hypothesis("H6").name == "ssim/mask+decoder"
    h9 = resolve_hypothesis("H9")
    assert h9.name == "ssim+l2/mask+decoder" and h9.loss_terms == ("ssim", "l2")
    assert h9.paper_label == "SSIM + l2, w/ mask (H9)"


def test_bad_name_lists_valid_ones():
    with pytest.raises(UsageError) as exc:
        resolve_hypothesis("ssim+l3/mask")
    msg = str(exc.value)
    assert "ssim+l3/mask" in msg and all(n in msg for n in HYPOTHESES) and "H9=ssim+l2/mask+decoder" in msg
    with pytest.raises(UsageError, match="paper15"):
        resolve_grid("paper16")


def test_grids():
    # the paper ran 10: each loss without the mask and with mask + decoder (paper.md §4.1), the default sweep
    paper10 = GRIDS["paper10"]
    assert DEFAULT_GRID == "paper10"
    assert sorted((HYPOTHESES[n].loss, HYPOTHESES[n].mask_mode) for n in paper10) == sorted(
        (loss, mode) for loss in ("l1", "l2", "ssim", "ssim+l1", "ssim+l2") for mode in ("none", "mask+decoder"))
    assert all(HYPOTHESES[n].paper_result() is not None and HYPOTHESES[n].paper_label for n in paper10)
    # paper15 = paper10 first, then our 5 GT-mask-without-decoder ablations, which the paper has no result for
    assert GRIDS["paper15"][:10] == paper10 and sorted(GRIDS["paper15"]) == sorted(HYPOTHESES)
    assert all(HYPOTHESES[n].mask_mode == "mask" and HYPOTHESES[n].paper_result() is None
               and HYPOTHESES[n].paper_label is None for n in GRIDS["paper15"][10:])
    assert [h.aliases[0] for h in resolve_grid("named4")] == ["H5", "H6", "H1", "H9"]


def test_config_pieces():
    h = resolve_hypothesis("l2/mask")
    mc = h.model_config(width=0.25, mask_mode="none")  # the hypothesis wins over a conflicting override
    assert mc.mask_mode == "mask" and mc.width == 0.25
    lc = h.loss_config(w_l2=50.0)
    assert lc.terms == ("l2",) and lc.w_l2 == 50.0
    assert h.model_overrides() == {"mask_mode": "mask"} and h.loss_overrides() == {"terms": ("l2",)}


def test_paper_results_table():
    assert len(PAPER_RESULTS) == 10 and all(list(r) == list(METRICS) for r in PAPER_RESULTS.values())
    h9 = resolve_hypothesis("H9").paper_result()
    for metric in METRICS:  # claim C3: H9 is the best of all ten runs on every metric
        assert h9[metric] == min(r[metric] for r in PAPER_RESULTS.values())
    assert resolve_hypothesis("H5").paper_result()["1-ssim"] == 0.314
    assert resolve_hypothesis("ssim/mask").paper_result() is None
    assert sum(h.paper_result() is not None for h in HYPOTHESES.values()) == 10
    assert paper_result("l1", "none")["10*l2"] == 0.826
