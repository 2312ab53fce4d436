"""The paper's published test-set metrics (Toledo & Antonelo 2021), for the report to show beside ours.

Read off the authors' bar charts (cache/results_*.png) to 3 decimals; every reading fell within +-0.0002 of a
3-decimal value, so these should equal the paper's table up to rounding (docs/paper.md). All lower-is-better.
"mask: yes" in the paper = the full model (mask decoder + GT-mask compositing in training, predicted-mask
compositing at test), i.e. our mask_mode "mask+decoder"; our "mask" mode has no counterpart in the paper.
How the paper computed them (window, LPIPS net, VIF implementation, pixels evaluated) is not known; "10*l2" is most
likely 10 * RMSE, not 10 * MSE (it exceeds 10*l1 in every row).
"""

from __future__ import annotations

METRICS: tuple[str, ...] = ("1-ssim", "1-ms-ssim", "lpips", "1-vif", "10*l1", "10*l2")

# (loss, paper mask flag) -> metric values, in METRICS order.
_TABLE: dict[tuple[str, bool], tuple[float, ...]] = {
    ("l1", False): (0.373, 0.103, 0.174, 0.574, 0.587, 0.826),
    ("l1", True): (0.343, 0.095, 0.152, 0.541, 0.534, 0.774),
    ("l2", False): (0.377, 0.100, 0.172, 0.572, 0.577, 0.797),
    ("l2", True): (0.322, 0.082, 0.147, 0.527, 0.501, 0.694),
    ("ssim", False): (0.314, 0.085, 0.157, 0.550, 0.601, 0.852),  # H5
    ("ssim", True): (0.321, 0.093, 0.147, 0.537, 0.585, 0.836),  # H6
    ("ssim+l1", False): (0.338, 0.090, 0.162, 0.560, 0.546, 0.781),  # H1
    ("ssim+l1", True): (0.311, 0.082, 0.146, 0.529, 0.508, 0.732),
    ("ssim+l2", False): (0.359, 0.095, 0.169, 0.566, 0.562, 0.782),
    ("ssim+l2", True): (0.307, 0.077, 0.144, 0.523, 0.487, 0.682),  # H9, best on every metric
}

PAPER_RESULTS: dict[tuple[str, bool], dict[str, float]] = {
    key: dict(zip(METRICS, values)) for key, values in _TABLE.items()
}

SOURCE = ("Toledo & Antonelo 2021, test-set metrics read off the authors' result charts "
          "(docs/paper.md); evaluation protocol not published")


def paper_result(loss: str, mask_mode: str) -> dict[str, float] | None:
    """The paper's row for a (loss, mask_mode) pair, or None when the paper has no such run (mask_mode "mask")."""
    if mask_mode == "none":
        return dict(PAPER_RESULTS[(loss, False)])
    if mask_mode == "mask+decoder":
        return dict(PAPER_RESULTS[(loss, True)])
    return None
