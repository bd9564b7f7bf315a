"""Statistics of the analyses' tidy rows: means with Student-t intervals per group (:func:`mean_ci`), of one
array (:func:`ci_of`), a Welch interval for two independent samples (:func:`welch_diff`), and an effect as text
(:func:`format_ci`). An *effect* is ``{"mean", "lo", "hi", "n"}``, the form :mod:`rearlib.experiments.verdicts`
judges.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import pandas as pd
from scipy import stats as scipy_stats


def mean_ci(df: pd.DataFrame, by: Sequence[str], values: Sequence[str], *, level: float = 0.95) -> pd.DataFrame:
    """Mean and Student-t confidence interval of each ``values`` column per group of ``by`` (tidy, long).

    Per (group, metric): ``n`` finite values, ``n_nonfinite`` (e.g. PSNR = inf for identical images, excluded),
    ``mean``, ``std`` (ddof 1), ``sem`` = std / sqrt(n), ``ci_low`` / ``ci_high`` = mean ∓ t_{(1+level)/2, n-1} sem
    (NaN when n < 2).
    """
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    by, values = list(by), list(values)
    missing = [c for c in by + values if c not in df.columns]
    if missing:
        raise ValueError(f"columns {missing} not in the DataFrame (has {list(df.columns)})")
    out = []
    for keys, g in (df.groupby(by, sort=True, dropna=False) if by else [((), df)]):
        keys = keys if isinstance(keys, tuple) else (keys,)
        for v in values:
            x = pd.to_numeric(g[v], errors="coerce").to_numpy(dtype=float)
            fin = x[np.isfinite(x)]
            n = len(fin)
            mean = float(fin.mean()) if n else float("nan")
            std = float(fin.std(ddof=1)) if n > 1 else float("nan")
            sem = std / math.sqrt(n) if n > 1 else float("nan")
            half = float(scipy_stats.t.ppf((1 + level) / 2, n - 1)) * sem if n > 1 else float("nan")
            out.append({**dict(zip(by, keys)), "metric": v, "n": n, "n_nonfinite": int(len(x) - n),
                        "mean": mean, "std": std, "sem": sem, "ci_low": mean - half, "ci_high": mean + half,
                        "level": level})
    return pd.DataFrame(out)


def ci_of(x, *, level: float = 0.95) -> dict:
    """Mean and Student-t interval of a 1-D array (non-finite values dropped, as :func:`mean_ci`):
    ``{"mean", "lo", "hi", "n"}``."""
    s = mean_ci(pd.DataFrame({"v": np.asarray(x, float)}), by=[], values=["v"], level=level).iloc[0]
    return {"mean": s["mean"], "lo": s["ci_low"], "hi": s["ci_high"], "n": int(s["n"])}


def welch_diff(a, b, *, level: float = 0.95) -> dict:
    """mean(a) - mean(b) of two independent samples with a Welch t-interval: ``{"mean", "lo", "hi", "n"}``
    (``n`` = both sample sizes together; an infinite number of degrees of freedom when both variances are 0)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    d, se = a.mean() - b.mean(), np.sqrt(va + vb)
    dof = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1)) if va + vb > 0 else np.inf
    h = scipy_stats.t.ppf((1 + level) / 2, dof) * se
    return {"mean": d, "lo": d - h, "hi": d + h, "n": len(a) + len(b)}


def format_ci(effect: dict, digits: int = 3, unit: str = "", *, words: bool = False) -> str:
    """An effect as text: ``+0.123 [95% CI +0.100, +0.150]`` (``unit`` after the mean, e.g. " pp"), or with
    ``words`` ``+0.123 (95% CI +0.100 to +0.150)``. The level printed is 95%, the default of :func:`ci_of`."""
    m, lo, hi = (f"{effect[k]:+.{digits}f}" for k in ("mean", "lo", "hi"))
    return f"{m}{unit} (95% CI {lo} to {hi})" if words else f"{m}{unit} [95% CI {lo}, {hi}]"
