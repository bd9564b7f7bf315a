"""rearlib.plots draws exactly the statistics it is given (CI bars, paper overlays, image grids) and puts the
paper's numbers on our axes only where they are comparable."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import rearlib.plots as P  # noqa: E402
from rearlib.analysis import mean_ci, paper_reference  # noqa: E402
from rearlib.analysis import paper_numbers as PN  # noqa: E402
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
    line, _, (xbars, ybars) = cont.lines[0], cont.lines[1], cont.lines[2]
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


# ---------------------------------------------------------------------------------------------------------------
# The notebooks' figures
# ---------------------------------------------------------------------------------------------------------------
def _paper_lines(ax):
    return [l for l in ax.get_lines() if l.get_label().startswith("paper")]


@pytest.fixture
def exposure_wide():
    rows = [{"model": m, "protocol": p, "ratio": r, "ctr": r + 0.01 * k, "perceptual": 0.6 - r / 2 + 0.01 * k,
             "psnr": 14 + 5 * r + 0.1 * k, "ppl": 30 + 10 * r + k} for m in ("AR", "reAR")
            for p in ("perfect", "imperfect") for r in (0.1, 0.5, 0.9) for k in range(3)]
    stats = mean_ci(pd.DataFrame(rows), by=["model", "protocol", "ratio"], values=["ctr", "perceptual", "psnr", "ppl"])
    return wide_ci(stats, ["model", "protocol", "ratio"])


@pytest.mark.parametrize("scale, metric, n_axes, overlaid, separate", [
    ("smoke", "ST-LPIPS(alex)", 4, [], ["perceptual", "psnr"]),
    ("small", "LPIPS-VGG", 4, [], ["perceptual", "psnr"]),        # LPIPS, but other images and tokenizer
    ("paper", "ST-LPIPS(alex)", 4, ["psnr"], ["perceptual"]),
    ("paper", "LPIPS-VGG", 2, ["perceptual", "psnr"], []),
])
def test_exposure_bias_quality_puts_paper_values_on_our_axes_only_where_comparable(exposure_wide, scale, metric,
                                                                                  n_axes, overlaid, separate):
    ref = paper_reference("A")
    fig = P.exposure_bias_quality(exposure_wide, ref, metric, scale=scale, title="t")
    axes = fig.axes
    assert len(axes) == n_axes
    ours = dict(zip(("perceptual", "psnr"), axes[:2]))
    assert "lower is better" in ours["perceptual"].get_ylabel() and metric in ours["perceptual"].get_ylabel()
    assert "higher is better" in ours["psnr"].get_ylabel()
    for col, ax in ours.items():
        assert len(_paper_lines(ax)) == (2 if col in overlaid else 0)
    for col, ax in zip(separate, axes[2:]):
        lines = {l.get_label(): l for l in _paper_lines(ax)}
        assert set(lines) == {"paper, perfect", "paper, imperfect"} and "not comparable" in ax.get_title()
        imp = ref[ref.protocol == "imperfect"].sort_values("ctr")
        np.testing.assert_allclose(lines["paper, imperfect"].get_ydata(), imp[col])
    assert all(not ax.axison for ax in axes[2 + len(separate):])
    plt.close(fig)


def test_exposure_bias_perplexity_labels_the_ratio_of_every_ar_point(exposure_wide):
    fig = P.exposure_bias_perplexity(exposure_wide, "ST-LPIPS(alex)", title="t")
    ax = fig.axes[0]
    assert sorted(t.get_text() for t in ax.texts) == sorted(["0.1", "0.5", "0.9"] * 2)  # AR, both protocols
    assert not _paper_lines(ax) and "lower is better" in ax.get_ylabel()
    plt.close(fig)


def test_exposure_bias_paired_overlays_the_paper_difference_where_the_metric_allows():
    per_ratio = pd.DataFrame([{"model": m, "metric": c, "ratio": r, "mean": 0.1, "lo": 0.0, "hi": 0.2}
                              for m in ("AR", "reAR") for c in ("perceptual", "psnr") for r in (0.1, 0.5)])
    gap = PN.exposure_bias_gap()
    fig = P.exposure_bias_paired(per_ratio, gap, "ST-LPIPS(alex)", title="t")
    lp, ps = fig.axes
    assert not _paper_lines(lp)
    (line,) = _paper_lines(ps)
    np.testing.assert_allclose(line.get_ydata(), gap["psnr"])
    plt.close(fig)
    fig = P.exposure_bias_paired(per_ratio, gap, "LPIPS-VGG", title="t")
    np.testing.assert_allclose(_paper_lines(fig.axes[0])[0].get_ydata(), gap["perceptual"])
    plt.close(fig)


@pytest.fixture
def replacement_wide():
    rows = [{"model": m, "mode": mode, "r_prime": r, "ctr": 0.2, "perceptual": 0.6 - 0.1 * r * (mode == "nearest"),
             "psnr": 15 + r, "emb_sim_wrong": 0.5 + 0.1 * r + 0.01 * k, "ppl_delta": 10 * r + k}
            for m in ("AR", "reAR") for mode in ("nearest", "random", "farthest") for r in (0.0, 0.8)
            for k in range(3)]
    stats = mean_ci(pd.DataFrame(rows), by=["model", "mode", "r_prime"],
                    values=["ctr", "perceptual", "psnr", "emb_sim_wrong", "ppl_delta"])
    return wide_ci(stats, ["model", "mode", "r_prime"])


def test_replacement_vs_rate(replacement_wide):
    ref = paper_reference("B")
    fig = P.replacement_vs_rate(replacement_wide, ref, "ST-LPIPS(alex)", scale="small", title="t")
    top, bottom = fig.axes[:4], fig.axes[4:]
    assert len(bottom) == 4 and not any(_paper_lines(ax) for ax in top)
    assert all(len(ax.containers) == 3 for ax in top)                   # nearest, random, farthest
    np.testing.assert_allclose(_paper_lines(bottom[1])[0].get_ydata(), ref["psnr"])
    np.testing.assert_allclose(_paper_lines(bottom[3])[0].get_ydata(), ref["ppl_delta"])
    assert "lower is better" in top[0].get_ylabel() and "higher is better" in top[1].get_ylabel()
    plt.close(fig)
    fig = P.replacement_vs_rate(replacement_wide, ref, "LPIPS-VGG", scale="paper", title="t")
    assert len(fig.axes) == 4 and all(len(_paper_lines(ax)) == 1 for ax in fig.axes)
    plt.close(fig)


def test_replacement_models(replacement_wide):
    fig = P.replacement_models(replacement_wide, "ST-LPIPS(alex)", title="t")
    labels = fig.axes[0].get_legend_handles_labels()[1]
    assert labels == ["AR (teacher-forced CTR 20.0%)", "reAR (teacher-forced CTR 20.0%)"]
    plt.close(fig)


def test_decoded_examples_picks_the_selected_rows():
    real, recon = torch.zeros(2, 3, 4, 4), torch.full((2, 3, 4, 4), 0.5)
    table = pd.DataFrame({"image_id": [0, 0, 1, 1], "mode": ["a", "b", "a", "b"], "ctr": [0.1, 0.2, 0.3, 0.4]})
    decoded = torch.stack([torch.full((3, 4, 4), v) for v in (0.1, 0.2, 0.3, 0.4)])
    fig = P.decoded_examples(real, recon, table, decoded, [("only b", {"mode": "b"})],
                             lambda row: f"CTR {row['ctr']:.0%}", title="t")
    axes = fig.axes
    assert len(axes) == 6 and axes[2].get_title() == "only b"
    assert axes[5].get_xlabel() == "CTR 40%" and axes[4].get_xlabel() == "tokenizer"
    np.testing.assert_allclose(axes[5].images[0].get_array(), 0.4)
    plt.close(fig)
    with pytest.raises(ValueError, match="no row"):
        P.decoded_examples(real, recon, table, decoded, [("c", {"mode": "c"})], str, title="t")


def test_robustness_bars_show_our_means_and_the_paper_values():
    rows = [{"model": m, "data": d, "condition": c, "ctr_percent": 10 + (m == "reAR") + 2 * (c == "clean") + k}
            for m in ("AR", "reAR") for d in ("trained", "unseen") for c in ("clean", "noisy") for k in (-1, 0, 1)]
    stats = mean_ci(pd.DataFrame(rows), by=["model", "data", "condition"], values=["ctr_percent"])
    fig = P.robustness_bars(stats, paper_reference("C"), 0.1, ours_title="ours")
    ours, paper = fig.axes
    heights = [b.get_height() for b in ours.patches]
    assert heights == pytest.approx([12, 12, 10, 10, 13, 13, 11, 11])       # AR then reAR, groups in order
    assert [b.get_height() for b in paper.patches] == [12.8, 11.8, 9.1, 8.3, 12.9, 12.3, 9.5, 9.0]
    assert "higher is better" in ours.get_ylabel() and ours.get_xticklabels()[2].get_text() == "trained\nnoisy (10%)"
    plt.close(fig)


def test_cka_curves_mark_the_peaks_and_the_paper_layer():
    rows = [{"model": m, "target": t, "layer": l, "cka": 0.5 - 0.1 * l if t == "encoded" else 0.1 + 0.05 * l}
            for m in ("AR", "reAR") for t in ("encoded", "decoded") for l in range(3)]
    wide = pd.DataFrame(rows)
    wide["relative_depth"] = wide["layer"] / 2
    peaks = {(m, "encoded"): 0 for m in ("AR", "reAR")} | {(m, "decoded"): 2 for m in ("AR", "reAR")}
    fig = P.cka_curves(wide, paper_reference("D"), peaks, depth=3, encode_layer=0, decode_layer=1, title="t")
    enc, dec = fig.axes
    stars = [l for l in dec.get_lines() if l.get_marker() == "*"]
    assert [tuple(s.get_xydata()[0]) for s in stars] == [(1.0, pytest.approx(0.2))] * 2
    vlines = {l.get_label(): l.get_xdata()[0] for l in dec.get_lines() if l.get_label().startswith(("our", "paper DE"))}
    assert vlines == {"our reAR DE@1": 0.5, "paper DE@15 of 20": pytest.approx(15 / 19)}
    assert len(_paper_lines(enc)) == 0 and len([l for l in enc.get_lines() if "(paper" in l.get_label()]) == 2
    plt.close(fig)
