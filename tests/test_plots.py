"""rearlib.plots draws exactly the statistics it is given (CI bars, paper overlays, image grids)."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from rearlib.analysis import mean_ci, paper_reference  # noqa: E402
from rearlib.plots import errorbar_ci, image_grid, paper_overlay, wide_ci  # noqa: E402


@pytest.fixture
def stats():
    rows = [{"protocol": p, "ratio": r, "ctr": r + 0.01 * k, "perceptual": 1 - r + (0.1 if p == "imperfect" else 0)
             + 0.02 * k} for p in ("perfect", "imperfect") for r in (0.1, 0.5, 0.9) for k in range(4)]
    return mean_ci(pd.DataFrame(rows), by=["protocol", "ratio"], values=["ctr", "perceptual"])


def test_wide_ci_pivots_mean_and_bounds(stats):
    w = wide_ci(stats, ["protocol", "ratio"])
    assert len(w) == 6
    row = w[(w.protocol == "imperfect") & (w.ratio == 0.5)].iloc[0]
    src = stats[(stats.protocol == "imperfect") & (stats.ratio == 0.5) & (stats.metric == "perceptual")].iloc[0]
    assert row["perceptual"] == src["mean"]
    assert row["perceptual_lo"] == src["ci_low"] and row["perceptual_hi"] == src["ci_high"]
    assert row["perceptual_n"] == 4
    # mean of 0.5, 0.51, 0.52, 0.53
    assert row["ctr"] == pytest.approx(0.515)


def test_wide_ci_rejects_bad_input(stats):
    with pytest.raises(ValueError, match="lacks columns"):
        wide_ci(stats.drop(columns=["ci_low"]), ["protocol", "ratio"])
    with pytest.raises(ValueError, match="repeated"):
        wide_ci(stats, ["protocol"])  # three ratios per protocol collapse onto one key


def test_errorbar_ci_draws_the_interval_on_both_axes(stats):
    w = wide_ci(stats, ["protocol", "ratio"])
    sub = w[w.protocol == "perfect"]
    fig, ax = plt.subplots()
    cont = errorbar_ci(ax, sub, "ctr", "perceptual", label="perfect")
    line, caps, (xbars, ybars) = cont.lines[0], cont.lines[1], cont.lines[2]
    np.testing.assert_allclose(line.get_xdata(), sub["ctr"])
    np.testing.assert_allclose(line.get_ydata(), sub["perceptual"])
    # vertical segments span exactly [ci_low, ci_high] of the y metric
    segs = ybars.get_segments()
    for seg, lo, hi in zip(segs, sub["perceptual_lo"], sub["perceptual_hi"]):
        assert seg[0][1] == pytest.approx(lo) and seg[1][1] == pytest.approx(hi)
    hsegs = xbars.get_segments()
    for seg, lo, hi in zip(hsegs, sub["ctr_lo"], sub["ctr_hi"]):
        assert seg[0][0] == pytest.approx(lo) and seg[1][0] == pytest.approx(hi)
    plt.close(fig)


def test_errorbar_ci_with_a_setting_on_x_and_undefined_ci():
    frame = pd.DataFrame({"r_prime": [0.0, 0.4], "psnr": [14.0, 15.0], "psnr_lo": [np.nan, 14.5],
                          "psnr_hi": [np.nan, 15.5]})
    fig, ax = plt.subplots()
    cont = errorbar_ci(ax, frame, "r_prime", "psnr")
    assert cont.has_yerr and not cont.has_xerr
    segs = cont.lines[2][0].get_segments()
    assert segs[0][0][1] == segs[0][1][1] == 14.0  # NaN CI (n < 2): a zero-length bar, not a crash
    with pytest.raises(ValueError, match="not in the frame"):
        errorbar_ci(ax, frame, "ratio", "psnr")
    plt.close(fig)


def test_paper_overlay_plots_the_reference_sorted():
    ref = paper_reference("B")
    fig, ax = plt.subplots()
    (line,) = paper_overlay(ax, ref.iloc[::-1], "r_prime", "psnr")
    np.testing.assert_allclose(line.get_xdata(), [0, 0.2, 0.4, 0.6, 0.8])
    np.testing.assert_allclose(line.get_ydata(), [14.80, 15.47, 15.90, 16.23, 16.31])
    with pytest.raises(ValueError, match="not in the paper reference"):
        paper_overlay(ax, ref, "ratio", "psnr")
    plt.close(fig)


def test_image_grid_layout_labels_and_validation():
    imgs = torch.rand(2, 3, 3, 8, 8)
    fig = image_grid(imgs, row_labels=["a", "b"], col_labels=["x", "y", "z"],
                     captions=[["1", "2", "3"], ["4", "5", "6"]], title="t")
    axes = fig.axes
    assert len(axes) == 6
    assert axes[0].get_title() == "x" and axes[0].get_ylabel() == "a" and axes[4].get_xlabel() == "5"
    np.testing.assert_allclose(axes[5].images[0].get_array(), imgs[1, 2].permute(1, 2, 0).numpy(), rtol=1e-6)
    plt.close(fig)
    fig = image_grid([torch.rand(3, 3, 8, 8), torch.rand(1, 3, 8, 8)])  # ragged rows: blank cells
    assert not fig.axes[4].axison
    plt.close(fig)
    with pytest.raises(ValueError, match="row_labels"):
        image_grid(imgs, row_labels=["only one"])
    with pytest.raises(ValueError, match="captions"):
        image_grid(imgs, captions=[["1"], ["2"]])
    with pytest.raises(ValueError, match="images must be"):
        image_grid(torch.rand(2, 8, 8))
