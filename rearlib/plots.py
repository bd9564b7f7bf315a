"""Plotting for the diagnosis notebooks (05-08): means with confidence intervals, the paper's numbers next to ours,
grids of decoded images, and each notebook's figures.

The statistics come from :func:`rearlib.analysis.mean_ci` (long format: one row per group and metric with
``mean``, ``ci_low``, ``ci_high``, ``n``). :func:`wide_ci` turns that into one row per group, so a point can carry
a confidence interval on both axes (e.g. perceptual distance against *measured* CTR). Nothing here computes a
statistic; every function only draws what it is given.

The paper's values share an axis with ours only where the quantities are comparable - the same data, tokenizer
and metric, i.e. ``paper`` scale (and LPIPS for the perceptual axis), or a relative quantity such as a paired
difference; elsewhere they get panels of their own. Axes say whether lower or higher is better where one is. At
``smoke`` scale :meth:`rearlib.experiments.notebook.Context.save_fig` stamps every saved figure as not meaningful.
"""

from __future__ import annotations

from typing import Callable, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from rearlib.analysis import CKA_TARGETS, PROTOCOLS, REPLACEMENT_MODES
from rearlib.analysis import paper_numbers as PN

__all__ = ["wide_ci", "errorbar_ci", "paper_overlay", "image_grid", "decoded_examples",
           "exposure_bias_quality", "exposure_bias_perplexity", "exposure_bias_paired", "replacement_vs_rate",
           "replacement_models", "robustness_bars", "cka_curves"]

_CI_COLUMNS = ("metric", "mean", "ci_low", "ci_high", "n")
PROTOCOL_COLORS = {"perfect": "tab:blue", "imperfect": "tab:red"}
MODEL_COLORS = {"AR": "tab:gray", "reAR": "tab:green"}
_MODEL_MARKS = {"AR": dict(linestyle="-", marker="o", mfc=None), "reAR": dict(linestyle=":", marker="^", mfc="none")}
_MODE_STYLE = {"nearest": ("tab:green", "-", "o"), "random": ("tab:orange", "--", "s"),
               "farthest": ("tab:red", ":", "v")}
_PSNR_LABEL = "PSNR (dB, L = 255; higher is better)"


# ================================================================================================================
# Building blocks
# ================================================================================================================
def wide_ci(stats: pd.DataFrame, index: Sequence[str]) -> pd.DataFrame:
    """Pivot :func:`~rearlib.analysis.mean_ci` output to one row per group of ``index``.

    For every metric ``m`` the result has columns ``m`` (the mean), ``m_lo`` / ``m_hi`` (the CI bounds) and
    ``m_n`` (finite values). Raises ValueError if a column is missing or a (group, metric) pair repeats.
    """
    index = list(index)
    missing = [c for c in index + list(_CI_COLUMNS) if c not in stats.columns]
    if missing:
        raise ValueError(f"stats lacks columns {missing}; pass the output of rearlib.analysis.mean_ci")
    if stats.duplicated(index + ["metric"]).any():
        raise ValueError(f"stats has repeated (group, metric) rows for index {index}; group by more columns")
    out = None
    for metric, g in stats.groupby("metric", sort=False):
        part = g[index + ["mean", "ci_low", "ci_high", "n"]].rename(columns={
            "mean": metric, "ci_low": f"{metric}_lo", "ci_high": f"{metric}_hi", "n": f"{metric}_n"})
        out = part if out is None else out.merge(part, on=index, how="outer")
    if out is None:
        raise ValueError("stats is empty")
    return out.sort_values(index).reset_index(drop=True)


def _err(frame: pd.DataFrame, col: str):
    """Asymmetric error bars [2, n] from ``col_lo`` / ``col_hi``, or None if the frame has no CI for ``col``.
    A NaN bound (fewer than 2 values) draws no bar for that point."""
    if f"{col}_lo" not in frame or f"{col}_hi" not in frame:
        return None
    m = frame[col].to_numpy(float)
    lo = np.nan_to_num(m - frame[f"{col}_lo"].to_numpy(float), nan=0.0)
    hi = np.nan_to_num(frame[f"{col}_hi"].to_numpy(float) - m, nan=0.0)
    return np.vstack([lo, hi])


def errorbar_ci(ax, frame: pd.DataFrame, x: str, y: str, *, label=None, color=None, marker: str = "o",
                linestyle: str = "-", capsize: float = 2.5, **kw):
    """Plot ``frame[y]`` against ``frame[x]`` with the CI of each (from :func:`wide_ci`) as error bars.

    ``x`` may be a plain column (a setting such as ``r_prime``) or a metric with ``x_lo`` / ``x_hi`` columns,
    which then get horizontal bars. Points are joined in the frame's order. Returns the ErrorbarContainer.
    """
    for c in (x, y):
        if c not in frame:
            raise ValueError(f"column {c!r} not in the frame (has {list(frame.columns)})")
    return ax.errorbar(frame[x].to_numpy(float), frame[y].to_numpy(float), yerr=_err(frame, y),
                       xerr=_err(frame, x), label=label, color=color, marker=marker, linestyle=linestyle,
                       capsize=capsize, markersize=4, linewidth=1.4, **kw)


def paper_overlay(ax, ref: pd.DataFrame, x: str, y: str, *, label: str = "paper (digitised)", color="0.45",
                  marker: str = "s", linestyle: str = "--", **kw):
    """The paper's numbers (a frame from :func:`~rearlib.analysis.paper_reference`) as a dashed grey line with
    hollow markers, so they read as a reference rather than as a measurement of ours."""
    for c in (x, y):
        if c not in ref:
            raise ValueError(f"column {c!r} not in the paper reference (has {list(ref.columns)})")
    r = ref.sort_values(x)
    return ax.plot(r[x].to_numpy(float), r[y].to_numpy(float), linestyle=linestyle, marker=marker,
                   markerfacecolor="none", color=color, label=label, linewidth=1.1, markersize=5, **kw)


def _to_array(x) -> np.ndarray:
    """A tensor (any device) or array as a float32 numpy array."""
    return np.asarray(x.detach().cpu() if hasattr(x, "detach") else x, dtype=np.float32)


def image_grid(images, row_labels: Sequence[str] | None = None, col_labels: Sequence[str] | None = None,
               captions=None, title: str | None = None, cell: float = 1.25):
    """A figure showing ``images`` as a grid: a float tensor/array ``[R, C, 3, H, W]`` in [0, 1], or a list of
    R rows, each a ``[C, 3, H, W]`` tensor. Optional ``row_labels`` (R), ``col_labels`` (C) and per-image
    ``captions`` (R lists of C strings, e.g. the measured CTR). Returns the matplotlib Figure."""
    rows = [_to_array(r) for r in images]
    if not rows or any(r.ndim != 4 or r.shape[1] not in (1, 3) for r in rows):
        raise ValueError("images must be [R, C, 3, H, W] (or a list of [C, 3, H, W] rows) with at least one row")
    R, C = len(rows), max(r.shape[0] for r in rows)
    for name, labels, n in (("row_labels", row_labels, R), ("col_labels", col_labels, C)):
        if labels is not None and len(labels) != n:
            raise ValueError(f"{name} has {len(labels)} entries for {n} {name[:3]}s")
    if captions is not None and (len(captions) != R or any(len(c) != r.shape[0] for c, r in zip(captions, rows))):
        raise ValueError("captions must be R lists with one string per image of the row")
    fig, axes = plt.subplots(R, C, figsize=(C * cell, R * cell + (0.35 if title else 0)), squeeze=False)
    for i, row in enumerate(rows):
        for j in range(C):
            ax = axes[i, j]
            ax.set_xticks([])
            ax.set_yticks([])
            if j >= row.shape[0]:
                ax.axis("off")
                continue
            ax.imshow(np.clip(row[j].transpose(1, 2, 0), 0, 1), interpolation="nearest")
            if captions is not None:
                ax.set_xlabel(captions[i][j], fontsize=6.5, labelpad=1.5)
            if i == 0 and col_labels is not None:
                ax.set_title(col_labels[j], fontsize=7)
        if row_labels is not None:
            axes[i, 0].set_ylabel(row_labels[i], fontsize=7, rotation=0, ha="right", va="center")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def _finish(fig, title: str):
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def _perceptual_label(metric: str) -> str:
    return f"{metric} (lower is better)"


def decoded_examples(real, reconstruction, table: pd.DataFrame, decoded, columns: Sequence[tuple[str, dict]],
                     caption: Callable[[pd.Series], str], *, title: str):
    """A grid of decoded examples: one row per real image ``real[i]`` (its rows in ``table`` have
    ``image_id == i``), columns "real", "reconstruction", then one per ``(label, selection)`` of ``columns``,
    showing ``decoded[k]`` for the row k of ``table`` with ``image_id == i`` and the selection's values (e.g.
    ``{"protocol": "perfect", "ratio": 0.5}``); ``table`` and ``decoded`` are aligned by position and
    ``caption(row)`` labels each decoded image. Raises ValueError if a selection matches no row."""
    grid, caps = [], []
    for i in range(len(real)):
        row, cap = [_to_array(real[i]), _to_array(reconstruction[i])], ["", "tokenizer"]
        for label, selection in columns:
            mask = (table["image_id"] == i).to_numpy()
            for col, value in selection.items():
                mask = mask & (table[col] == value).to_numpy()
            hits = np.flatnonzero(mask)
            if not len(hits):
                raise ValueError(f"no row of the table for image {i} and column {label!r} ({selection})")
            row.append(_to_array(decoded[hits[0]]))
            cap.append(caption(table.iloc[hits[0]]))
        grid.append(np.stack(row))
        caps.append(cap)
    return image_grid(grid, row_labels=[f"image {i}" for i in range(len(real))],
                      col_labels=["real", "reconstruction"] + [label for label, _ in columns], captions=caps,
                      title=title)


# ================================================================================================================
# Notebook 05 - exposure bias
# ================================================================================================================
def exposure_bias_quality(wide: pd.DataFrame, paper: pd.DataFrame, metric: str, *, scale: str, title: str):
    """Perceptual distance and PSNR against the measured CTR (``wide``: :func:`wide_ci` of model, protocol, ratio),
    both protocols, every model. The paper's digitised Fig. 3a / 8a-b (``paper_reference("A")``) share an axis with
    ours only at ``paper`` scale (the perceptual one only when ``metric`` is LPIPS); otherwise they get a second
    row of panels, because our images, tokenizer and metric differ from the paper's."""
    comparable = {"perceptual": scale == "paper" and metric.startswith("LPIPS"), "psnr": scale == "paper"}
    separate = [c for c in ("perceptual", "psnr") if not comparable[c]]
    fig, axes = plt.subplots(1 + bool(separate), 2, figsize=(9.5, 3.8 * (1 + bool(separate))), squeeze=False)
    ylabel = {"perceptual": _perceptual_label(metric), "psnr": _PSNR_LABEL}
    for col, ax in zip(("perceptual", "psnr"), axes[0]):
        for mname in wide["model"].unique():
            for p in PROTOCOLS:
                sub = wide[(wide.model == mname) & (wide.protocol == p)]
                errorbar_ci(ax, sub, "ctr", col, label=f"{mname}, {p} context", color=PROTOCOL_COLORS[p],
                            **_MODEL_MARKS.get(mname, _MODEL_MARKS["AR"]))
        if comparable[col]:
            for p in PROTOCOLS:
                paper_overlay(ax, paper[paper.protocol == p], "ctr", col, color=PROTOCOL_COLORS[p],
                              label=f"paper, {p} (digitised)")
        ax.set_xlabel("measured correct-token ratio (CTR)")
        ax.set_ylabel(ylabel[col])
        ax.set_title("ours", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for col, ax in zip(separate, axes[-1] if separate else []):
        for p in PROTOCOLS:
            paper_overlay(ax, paper[paper.protocol == p], "ctr", col, color=PROTOCOL_COLORS[p], label=f"paper, {p}")
        ax.set_xlabel("CTR (paper)")
        ax.set_ylabel("LPIPS (paper; lower is better)" if col == "perceptual" else "PSNR (dB, paper; higher is better)")
        ax.set_title(f"paper, Fig. 3a / 8a-b (digitised; ImageNet {PN.TOKENIZER['resolution']} px): "
                     "not comparable with ours", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in (axes[-1][len(separate):] if separate else []):
        ax.axis("off")
    return _finish(fig, title)


def exposure_bias_perplexity(wide: pd.DataFrame, metric: str, *, title: str):
    """Perceptual distance and PSNR against the perplexity of the evaluated sequence (Fig. 8c-d), one point per
    (model, protocol, ratio) with 95% CIs on both axes; AR points carry their ratio r. No paper values: the paper's
    perplexities belong to its model and codebook."""
    fig, axes = plt.subplots(1, 2, figsize=(9.5, 3.8))
    ylabel = {"perceptual": _perceptual_label(metric), "psnr": _PSNR_LABEL}
    for col, ax in zip(("perceptual", "psnr"), axes):
        for mname in wide["model"].unique():
            marks = _MODEL_MARKS.get(mname, _MODEL_MARKS["AR"])
            for p in PROTOCOLS:
                sub = wide[(wide.model == mname) & (wide.protocol == p)]
                errorbar_ci(ax, sub, "ppl", col, label=f"{mname}, {p}", color=PROTOCOL_COLORS[p], linestyle="none",
                            marker=marks["marker"], mfc=marks["mfc"])
                if mname == "AR":
                    for _, r in sub.iterrows():
                        ax.annotate(f"{r['ratio']:.1f}", (r["ppl"], r[col]), fontsize=6, xytext=(3, 3),
                                    textcoords="offset points", color=PROTOCOL_COLORS[p])
        ax.set_xlabel("perplexity of the evaluated sequence")
        ax.set_ylabel(ylabel[col])
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    return _finish(fig, title)


def exposure_bias_paired(per_ratio: pd.DataFrame, paper_gap: pd.DataFrame, metric: str, *, title: str):
    """Imperfect - perfect per ratio with 95% CIs (``per_ratio``: model, metric, ratio, mean, lo, hi) for the
    perceptual distance and PSNR. A difference is a relative quantity, so the paper's (``paper_gap``: index ratio,
    columns perceptual, psnr) is drawn on the same axes - for the perceptual one only when ``metric`` is LPIPS."""
    fig, axes = plt.subplots(1, 2, figsize=(9.5, 3.5))
    gap = paper_gap.reset_index()
    for col, ax in zip(("perceptual", "psnr"), axes):
        for mname, c in (("AR", "tab:purple"), ("reAR", "tab:green")):
            sub = per_ratio[(per_ratio.model == mname) & (per_ratio.metric == col)].rename(
                columns={"mean": "d", "lo": "d_lo", "hi": "d_hi"})
            if len(sub):
                errorbar_ci(ax, sub, "ratio", "d", label=mname, color=c)
        if col == "psnr" or metric.startswith("LPIPS"):
            paper_overlay(ax, gap, "ratio", col, label=f"paper (digitised; ImageNet {PN.TOKENIZER['resolution']} px)")
        ax.axhline(0, color="k", linewidth=0.8)
        ax.set_xlabel("GT ratio r")
        ax.set_ylabel(f"Δ {metric}" if col == "perceptual" else "Δ PSNR (dB)")
        ax.set_title("imperfect − perfect " + ("(> 0: imperfect worse)" if col == "perceptual"
                                              else "(< 0: imperfect worse)"), fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _finish(fig, title)


# ================================================================================================================
# Notebook 06 - embedding-nearest replacement
# ================================================================================================================
def _replacement_panels(metric: str) -> list[tuple[str, str, str]]:
    """(our column, axis label, paper column) of the four quantities against r'."""
    return [("perceptual", f"{metric} to the real image (lower is better)", "perceptual"),
            ("psnr", _PSNR_LABEL, "psnr"),
            ("emb_sim_wrong", "embedding similarity (mean cos, wrong positions)", "emb_sim"),
            ("ppl_delta", "Δ perplexity vs r′ = 0", "ppl_delta")]


def replacement_vs_rate(wide: pd.DataFrame, paper: pd.DataFrame, metric: str, *, scale: str, title: str):
    """AR's perceptual distance, PSNR, embedding similarity and Δ perplexity against r' for the three replacement
    rules (``wide``: :func:`wide_ci` of model, mode, r_prime). The paper's values (``paper_reference("B")``,
    nearest rule) share the axes only at ``paper`` scale (the perceptual one only when ``metric`` is LPIPS);
    otherwise they are a second row of panels."""
    panels = _replacement_panels(metric)
    comparable = {col: scale == "paper" and (col != "perceptual" or metric.startswith("LPIPS"))
                  for col, _, _ in panels}
    separate = [p for p in panels if not comparable[p[0]]]
    nrows = 1 + bool(separate)
    fig, axes = plt.subplots(nrows, len(panels), figsize=(3.9 * len(panels), 3.5 * nrows), squeeze=False)
    ar = wide[wide.model == "AR"]
    for (col, label, paper_col), ax in zip(panels, axes[0]):
        for mode in REPLACEMENT_MODES:
            c, ls, mk = _MODE_STYLE[mode]
            errorbar_ci(ax, ar[ar["mode"] == mode], "r_prime", col, label=f"AR, {mode}", color=c, linestyle=ls,
                        marker=mk)
        if comparable[col]:
            paper_overlay(ax, paper, "r_prime", paper_col, label="paper, nearest")
        ax.set_xlabel("replacement rate r′ of wrong tokens")
        ax.set_ylabel(label, fontsize=8)
        ax.set_title("ours", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    for (col, label, paper_col), ax in zip(separate, axes[-1] if separate else []):
        paper_overlay(ax, paper, "r_prime", paper_col, label="paper, nearest")
        ax.set_xlabel("r′ (paper)")
        ax.set_ylabel("paper: " + ("LPIPS (lower is better)" if col == "perceptual" else label), fontsize=8)
        ax.set_title("paper, Fig. 3b / 8e-g: not comparable with ours", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in (axes[-1][len(separate):] if separate else []):
        ax.axis("off")
    return _finish(fig, title)


def replacement_models(wide: pd.DataFrame, metric: str, *, title: str):
    """The four quantities of :func:`replacement_vs_rate` for AR and reAR under the nearest rule (no paper values:
    the paper has no reAR curve)."""
    panels = _replacement_panels(metric)
    fig, axes = plt.subplots(1, len(panels), figsize=(3.9 * len(panels), 3.4))
    for (col, label, _), ax in zip(panels, axes):
        for mname, c in (("AR", "tab:green"), ("reAR", "tab:purple")):
            sub = wide[(wide.model == mname) & (wide["mode"] == "nearest")]
            errorbar_ci(ax, sub, "r_prime", col, label=f"{mname} (teacher-forced CTR {sub['ctr'].iloc[0]:.1%})",
                        color=c)
        ax.set_xlabel("replacement rate r′")
        ax.set_ylabel(label, fontsize=8)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    return _finish(fig, title)


# ================================================================================================================
# Notebook 07 - robustness
# ================================================================================================================
ROBUSTNESS_GROUPS = (("trained", "clean"), ("unseen", "clean"), ("trained", "noisy"), ("unseen", "noisy"))


def robustness_bars(stats: pd.DataFrame, paper: pd.DataFrame, noise_fraction: float, *, ours_title: str):
    """Fig. 9a, ours next to the paper's: mean teacher-forced CTR (%) per (data, condition) and model with 95%
    t-intervals (``stats``: :func:`~rearlib.analysis.mean_ci` rows of metric ``ctr_percent``), and the paper's
    printed values (``paper_reference("C")``) in a panel with its own y-axis (absolute CTR depends on the data and
    the tokenizer)."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    x = np.arange(len(ROBUSTNESS_GROUPS))
    for j, mname in enumerate(("AR", "reAR")):
        s = stats[(stats.metric == "ctr_percent") & (stats.model == mname)].set_index(["data", "condition"])
        m = np.array([s.loc[g, "mean"] for g in ROBUSTNESS_GROUPS])
        err = np.vstack([m - [s.loc[g, "ci_low"] for g in ROBUSTNESS_GROUPS],
                         [s.loc[g, "ci_high"] for g in ROBUSTNESS_GROUPS] - m])
        bars = axes[0].bar(x + (j - 0.5) * 0.38, m, 0.38, yerr=np.nan_to_num(err), capsize=3,
                           color=MODEL_COLORS[mname], label=mname)
        axes[0].bar_label(bars, fmt="%.1f", fontsize=7, label_type="center", color="white")
        p = paper[paper.model == mname].set_index(["data", "condition"])
        pb = axes[1].bar(x + (j - 0.5) * 0.38, [p.loc[g, "ctr_percent"] for g in ROBUSTNESS_GROUPS], 0.38,
                         color=MODEL_COLORS[mname], alpha=0.6, hatch="//", label=mname)
        axes[1].bar_label(pb, fmt="%.1f", fontsize=7, padding=2)
    paper_title = "paper, Fig. 9a (ImageNet, MaskGIT-VQGAN; exact printed values)"
    for ax, title in zip(axes, (ours_title, paper_title)):
        ax.set_xticks(x, [f"{d}\n{c}" + (f" ({noise_fraction:.0%})" if c == "noisy" else "")
                          for d, c in ROBUSTNESS_GROUPS], fontsize=8)
        ax.set_ylabel("teacher-forced CTR (%; higher is better)")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return fig


# ================================================================================================================
# Notebook 08 - CKA
# ================================================================================================================
def cka_curves(wide: pd.DataFrame, paper: pd.DataFrame, peaks: dict, *, depth: int, encode_layer: int,
               decode_layer: int, title: str):
    """Fig. 9b-c, ours next to the paper's: linear CKA of every block with the encoded / decoded embedding against
    the relative depth layer / (depth - 1), so our curves and the paper's 20-block ones (``paper_reference("D")``)
    share the x-axis. Points: ``wide`` (:func:`wide_ci` with ``relative_depth``); stars: ``peaks``
    ({(model, target): layer}); vertical lines: our reAR's alignment layers and the paper's DE layer."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.9))
    for ax, target in zip(axes, CKA_TARGETS):
        for mname in ("AR", "reAR"):
            sub = wide[(wide.model == mname) & (wide.target == target)].sort_values("layer")
            errorbar_ci(ax, sub, "relative_depth", "cka", label=f"{mname} (ours)", color=MODEL_COLORS[mname])
            pk = sub[sub.layer == peaks[(mname, target)]].iloc[0]
            ax.plot(pk["relative_depth"], pk["cka"], marker="*", markersize=13, color=MODEL_COLORS[mname],
                    linestyle="none")
            paper_overlay(ax, paper[(paper.model == mname) & (paper.target == target)], "relative_depth", "cka",
                          color=MODEL_COLORS[mname], label=f"{mname} (paper, {PN.ANALYSIS_DEPTH} blocks)")
        kind, layer = ("EN", encode_layer) if target == "encoded" else ("DE", decode_layer)
        ax.axvline(layer / max(1, depth - 1), color="tab:green", alpha=0.4, linestyle="-.",
                   label=f"our reAR {kind}@{layer}")
        if target == "decoded":
            ax.axvline(PN.DECODE_LAYER / (PN.ANALYSIS_DEPTH - 1), color="0.5", alpha=0.5, linestyle=":",
                       label=f"paper DE@{PN.DECODE_LAYER} of {PN.ANALYSIS_DEPTH}")
        ax.set_xlabel("relative depth of the block (layer / (depth - 1))")
        ax.set_ylabel(f"linear CKA with the {target} embedding")
        ax.set_title(f"{target}: z(x_t)" if target == "encoded" else f"{target}: z(x_(t+1))", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _finish(fig, title)
