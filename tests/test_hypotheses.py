"""The hypothesis grid: 15 unique names, aliases, grids, config pieces, the paper's table."""

import pytest

from facevae_dist.errors import UsageError
from facevae_dist.hypotheses import GRIDS, HYPOTHESES, resolve_grid, resolve_hypothesis
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
    assert GRIDS["paper15"] == list(HYPOTHESES)
    assert len(GRIDS["paper10"]) == 10 and all(HYPOTHESES[n].mask_mode != "mask" for n in GRIDS["paper10"])
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
