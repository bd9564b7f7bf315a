"""Figures of the training studies (notebooks 04 and 10-13) that explain themselves.

Every FID axis says that lower is better (:func:`label_fid`); AR and reAR keep one colour each in every figure
(:data:`VARIANT_COLORS`). At ``smoke`` scale, :meth:`rearlib.experiments.notebook.Context.save_fig` stamps every
saved figure as not meaningful, since smoke numbers only prove that the code runs.
"""

from __future__ import annotations

from typing import Sequence

import matplotlib.pyplot as plt
import pandas as pd

from rearlib.experiments.studies_plan import PAPER_FIG4

VARIANT_COLORS = {"AR": "tab:blue", "reAR": "tab:orange"}
VARIANT_LINES = {"AR": "--", "reAR": "-"}
VARIANT_MARKERS = {"AR": "o", "reAR": "s"}


def label_fid(ax, label: str, axis: str = "y", fontsize: float = 8) -> None:
    """Label an FID-like axis with ``label`` and "(lower is better)"."""
    text = f"{label} (lower is better)"
    (ax.set_ylabel if axis == "y" else ax.set_xlabel)(text, fontsize=fontsize)


def plot_fid_vs_steps(curve: pd.DataFrame, *, sizes: Sequence[str], fid: str, cc: str, noise: float,
                      floor_fid: float, scale: str):
    """FID (top row) and class consistency (bottom row) against training steps, one column per model size with
    AR and reAR in their colours (the mean over training seeds, each seed a faint point; FID with ± the sampling
    ``noise``), and the paper's Fig. 4 in the last column.

    ``curve``: one row per evaluation with "size", "model", "variant" ("AR" / "reAR"), "step" and the metric
    columns. Linear axes, shared across sizes: the floor of FID (real training images of the same count,
    ``floor_fid``) is far below generated sets and is stated beside the panels instead of drawn.
    """
    n = len(sizes)
    fig, axes = plt.subplots(2, n + 1, figsize=(3.3 * (n + 1), 5.6), squeeze=False)
    for j in range(1, n):  # one scale per row across sizes, so the sizes can be compared
        axes[0, j].sharey(axes[0, 0])
        axes[1, j].sharey(axes[1, 0])
    for j, size in enumerate(sizes):
        for row, metric in enumerate((fid, cc)):
            ax = axes[row, j]
            for variant in VARIANT_COLORS:
                d = curve[(curve["size"] == size) & (curve["variant"] == variant)].sort_values("step")
                if d.empty:
                    continue
                mean = d.groupby("step")[metric].mean()  # over training seeds
                ax.errorbar(mean.index, mean.to_numpy(), yerr=noise if metric == fid else None, capsize=2, ms=4,
                            color=VARIANT_COLORS[variant], ls=VARIANT_LINES[variant],
                            marker=VARIANT_MARKERS[variant], label=variant)
                if "seed" in d and d["seed"].nunique() > 1:  # each training seed as a faint point
                    ax.scatter(d["step"], d[metric], s=7, color=VARIANT_COLORS[variant], alpha=0.35, lw=0)
            model = curve.loc[curve["size"] == size, "model"]  # "<blocks>x<width>"
            if row == 0 and len(model):
                blocks, width = str(model.iloc[0]).split("x")
                ax.set_title(f"size {size}: {blocks} blocks, width {width}", fontsize=9)
            if row == 1:
                ax.set_xlabel("training step", fontsize=8)
            if j == 0 and row == 0:
                label_fid(ax, fid)
            elif j == 0:
                ax.set_ylabel(f"{cc} (higher is better)", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7, title="variant", title_fontsize=7)
    ax = axes[0, n]
    for (name, pts), ls, marker in zip(PAPER_FIG4.items(), ("-", "--", ":"), ("o", "s", "^")):
        ax.plot([s / 1000 for s in pts], list(pts.values()), color=VARIANT_COLORS["reAR"], ls=ls, marker=marker,
                ms=4, label=name)
    ax.set_title("paper Fig. 4 (digitised; reAR only,\npresumably with CFG)", fontsize=9)
    ax.set_xlabel("training step (thousands)", fontsize=8)
    label_fid(ax, "paper FID (Inception)")
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    axes[1, n].axis("off")
    axes[1, n].text(0.0, 0.5, f"ours: no CFG, bars = ± sampling noise ({noise:.3g})\n"
                              f"real train images of the same count:\n{fid} = {floor_fid:.3g} (the floor)\n"
                              f"values are not comparable with the paper's", fontsize=8, va="center")
    fig.suptitle(f"FID against training steps per model size, AR vs reAR ({scale})", fontsize=10)
    fig.tight_layout()
    return fig


def plot_cfg_sweep(axes, sweep: pd.DataFrame, *, metrics: Sequence[str], fid: str, powers: Sequence[float],
                   floor_fid: float, no_cfg_role: str | None = None, no_cfg_seed: int | None = None,
                   no_cfg_lines: bool = False) -> None:
    """A guidance sweep per variant: ``metrics`` against g for each schedule power p (g = 1, no guidance, from the
    rows without CFG), AR and reAR in their colours, the FID floor (real training images) as a grey line.

    ``sweep``: rows with "model", "setting", "cfg_scale", "cfg_power", "sample_seed", "role" and the metrics. The
    g = 1 point is the no-CFG row of role ``no_cfg_role`` (when given) or of sampling seed ``no_cfg_seed``;
    ``no_cfg_lines`` adds a dotted line per no-CFG row (e.g. two sampling seeds).
    """
    for ax, metric in zip(axes, metrics):
        for name, color in VARIANT_COLORS.items():
            d = sweep[sweep["model"] == name]
            base = d[d["setting"] == "no CFG"]
            pick = base["role"] == no_cfg_role if no_cfg_role is not None else base["sample_seed"] == no_cfg_seed
            start = float(base.loc[pick, metric].iloc[0])
            for p, style in zip(powers, ("o-", "s--")):
                sp = d[(d["setting"] != "no CFG") & (d["cfg_power"] == p)].sort_values("cfg_scale")
                ax.plot([1.0] + sp["cfg_scale"].tolist(), [start] + sp[metric].tolist(), style, color=color,
                        label=f"{name}, p={p:g}")
            if no_cfg_lines:
                for v in base[metric]:
                    ax.axhline(v, color=color, ls=":", lw=1)
        if metric == fid:
            ax.axhline(floor_fid, color="gray", ls=":", lw=1.5, label="real train images")
            if floor_fid > 0:
                ax.set_yscale("log")  # the floor sits far below generated sets; a log axis keeps both readable
            label_fid(ax, metric)
        else:
            ax.set_ylabel(f"{metric} (higher is better)", fontsize=8)
        ax.set_xlabel("guidance g")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)


def plot_learning_curve(curve: pd.DataFrame, *, fid: str, floor_fid: float | None, noise: float):
    """FID against training step for AR and reAR (the recipe study), with ± the sampling ``noise`` and the FID of
    real training images of the same count (``floor_fid``) as a dotted line."""
    fig, ax = plt.subplots(figsize=(6.2, 3.6))
    for variant in VARIANT_COLORS:
        d = curve[curve["variant"] == variant].sort_values("step")
        if not d.empty:
            ax.errorbar(d["step"], d[fid], yerr=noise, capsize=2, ms=4, color=VARIANT_COLORS[variant],
                        ls=VARIANT_LINES[variant], marker=VARIANT_MARKERS[variant], label=variant)
    if floor_fid is not None:
        ax.axhline(floor_fid, color="0.4", ls=":", lw=1, label=f"real training images ({floor_fid:.3g})")
    label_fid(ax, fid)
    ax.set_xlabel("training step (snapshots of one run; warm-up ends at a quarter)", fontsize=8)
    ax.set_title("learning curve of the paper-proportioned recipe", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
