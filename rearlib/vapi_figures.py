"""The figures of the VA-π study (notebook 09): reward curves of the post-training runs, metrics before and after
VA-π, and grids of samples. Every function only draws what it is given and returns the matplotlib Figure; the
tables come from :mod:`rearlib.vapi_report`."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from torchvision.utils import make_grid

from rearlib.vapi_config import VAPIConfig


def reward_curves(results: dict[tuple, dict], runs: Iterable[str], seeds: Sequence[int], perceptual: str, *,
                  window: int, scale: str, cfg: VAPIConfig):
    """Per step: mean reward, MSE, perceptual distance and CE prior of every run (one panel each).

    One line per run: the mean over its VA-π ``seeds`` of a moving mean over ``window`` steps, with the band between
    the lowest and highest seed. ``results`` maps (run, seed) to :func:`rearlib.vapi.post_train` results. A run
    without a perceptual term has no line in the perceptual panel; every run keeps its colour in every panel.
    """
    panels = [("reward_mean", "mean reward"), ("mse_mean", "MSE ([-1, 1] images)"),
              ("perceptual_mean", f"perceptual distance ({perceptual})"), ("ce", "CE prior (nats/token)")]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.0))
    for ax, (col, label) in zip(axes, panels):
        for i, run in enumerate(runs):
            rs = [results[(run, vs)] for vs in seeds]
            if col == "perceptual_mean" and rs[0]["perceptual_metric"] == "none":
                continue
            curves = pd.concat([r["history_df"].set_index("step")[col].rolling(window, min_periods=1).mean()
                                for r in rs], axis=1)
            ax.plot(curves.index, curves.mean(axis=1), color=f"C{i}", label=run)
            ax.fill_between(curves.index, curves.min(axis=1), curves.max(axis=1), color=f"C{i}", alpha=0.2)
        ax.set_xlabel("VA-π step")
        ax.set_ylabel(label, fontsize=8)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"VA-π post-training ({scale}; B={cfg.batch_size} images x G={cfg.group_size}; "
                 f"moving mean over {window} steps; line = mean over {len(seeds)} VA-π seeds, band = their range)",
                 fontsize=9)
    fig.tight_layout()
    return fig


def before_after(evals: pd.DataFrame, order: Sequence[str], metrics: Sequence[str], cfg_labels: Sequence[str],
                 title: str):
    """One panel per metric, stacked (the study has dozens of models): a point per evaluation (one per seed) of
    every model in ``order``, for each CFG setting of ``cfg_labels`` (side by side, at most two), with a bar at the
    mean over the seeds. The model names label the bottom panel."""
    markers = ("o", "s")
    fig, axes = plt.subplots(len(metrics), 1, figsize=(max(7.0, 2.0 + 0.32 * len(order)), 2.3 * len(metrics) + 1.6),
                             sharex=True, squeeze=False)
    axes = axes[:, 0]
    for ax, metric in zip(axes, metrics):
        for j, (cfg_label, marker) in enumerate(zip(cfg_labels, markers)):
            sub = evals[(evals["CFG"] == cfg_label) & evals["model"].isin(order)]
            if sub.empty:
                continue
            x = sub["model"].map({m: i for i, m in enumerate(order)}) + (j - 0.5) * 0.2
            pts = ax.scatter(x, sub[metric], marker=marker, alpha=0.6, label=f"{cfg_label} (one point per seed)")
            means = sub.groupby("model")[metric].mean().reindex(order)
            ax.scatter(np.arange(len(order)) + (j - 0.5) * 0.2, means, marker="_", s=300,
                       color=pts.get_facecolor()[0])
        ax.set_ylabel(metric, fontsize=8)
        ax.grid(alpha=0.3)
    axes[-1].set_xticks(range(len(order)))
    axes[-1].set_xticklabels(order, rotation=40, ha="right", fontsize=7)
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def sample_grids(images: dict[str, torch.Tensor], per_row: int, title: str):
    """One panel per entry of ``images`` ({panel title: [n, 3, H, W] in [0, 1]}), ``per_row`` images per row."""
    rows = max(len(v) for v in images.values()) // per_row
    fig, axes = plt.subplots(1, len(images), figsize=(len(images) * (0.45 * per_row + 0.4), 0.45 * rows + 0.8))
    for ax, (name, imgs) in zip(np.atleast_1d(axes), images.items()):
        ax.imshow(make_grid(imgs, nrow=per_row, padding=1, pad_value=1.0).permute(1, 2, 0).numpy())
        ax.set_title(name, fontsize=8)
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig
