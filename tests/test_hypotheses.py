"""The hypothesis grid: 15 unique names (the paper's 10 + our 5 ablations), aliases, grids, config pieces (the
paper's published table: test_paper.py)."""

import pytest

from facevae_dist.config import TrainConfig
from facevae_dist.errors import UsageError
from facevae_dist.hypotheses import DEFAULT_GRID, GRIDS, HYPOTHESES, resolve_grid, resolve_hypothesis
from facevae_dist.report.paper import paper_result


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
    # the paper ran 10: each loss without the mask and with mask + decoder (docs/paper.md), the default sweep
    paper10 = GRIDS["paper10"]
    assert DEFAULT_GRID == "paper10"
    assert sorted((HYPOTHESES[n].loss, HYPOTHESES[n].mask_mode) for n in paper10) == sorted(
        (loss, mode) for loss in ("l1", "l2", "ssim", "ssim+l1", "ssim+l2") for mode in ("none", "mask+decoder"))
    assert all(paper_result(HYPOTHESES[n].loss, HYPOTHESES[n].mask_mode) is not None and HYPOTHESES[n].paper_label for n in paper10)
    # paper15 = paper10 first, then our 5 GT-mask-without-decoder ablations, which the paper has no result for
    assert GRIDS["paper15"][:10] == paper10 and sorted(GRIDS["paper15"]) == sorted(HYPOTHESES)
    assert all(HYPOTHESES[n].mask_mode == "mask" and paper_result(HYPOTHESES[n].loss, HYPOTHESES[n].mask_mode) is None
               and HYPOTHESES[n].paper_label is None for n in GRIDS["paper15"][10:])
    assert [h.aliases[0] for h in resolve_grid("named4")] == ["H5", "H6", "H1", "H9"]


def test_config_pieces():
    h = resolve_hypothesis("l2/mask")
    cfg = TrainConfig.from_hypothesis("l2/mask", model={"width": 0.25}, loss={"w_l2": 50.0})
    assert cfg.model.mask_mode == "mask" and cfg.model.width == 0.25
    assert cfg.loss.terms == ("l2",) and cfg.loss.w_l2 == 50.0
    assert h.model_overrides() == {"mask_mode": "mask"} and h.loss_overrides() == {"terms": ("l2",)}
