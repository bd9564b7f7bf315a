"""Small plotting helpers shared by the diagnosis notebooks (05-08): means with confidence intervals, the
paper's digitised numbers next to ours, and grids of decoded images.

The statistics come from :func:`rearlib.analysis.mean_ci` (long format: one row per group and metric with
``mean``, ``ci_low``, ``ci_high``, ``n``). :func:`wide_ci` turns that into one row per group, so a point can carry
a confidence interval on both axes (e.g. perceptual distance against *measured* CTR). Nothing here computes a
statistic; every function only draws what it is given.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

__all__ = ["wide_ci", "errorbar_ci", "paper_overlay", "image_grid"]

_CI_COLUMNS = ("metric", "mean", "ci_low", "ci_high", "n")


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


def image_grid(images, row_labels: Sequence[str] | None = None, col_labels: Sequence[str] | None = None,
               captions=None, title: str | None = None, cell: float = 1.25):
    """A figure showing ``images`` as a grid: a float tensor/array ``[R, C, 3, H, W]`` in [0, 1], or a list of
    R rows, each a ``[C, 3, H, W]`` tensor. Optional ``row_labels`` (R), ``col_labels`` (C) and per-image
    ``captions`` (R lists of C strings, e.g. the measured CTR). Returns the matplotlib Figure."""
    import matplotlib.pyplot as plt

    rows = [np.asarray(r.detach().cpu() if hasattr(r, "detach") else r, dtype=np.float32) for r in images]
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
