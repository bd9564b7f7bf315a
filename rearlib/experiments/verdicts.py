"""Verdicts on the paper's claims, from stated rules: one place, tested, used by every notebook that makes claims.

Every claim names the paper's number, ours with its interval, and the rule that turns the two into a verdict.

An *effect* is our estimate of a paper quantity with its 95% interval, ``{"mean", "lo", "hi"}`` (as returned by
:func:`rearlib.analysis.ci_of`). :func:`effect_verdict` compares it with the paper:

* **direction reproduced**: the mean has the paper's sign and the interval excludes 0;
* **reproduced**: additionally, when magnitudes are comparable (same data, tokenizer and metric, i.e. ``paper``
  scale with the paper's metric), the paper's own value lies inside our interval widened by ``tol`` (the precision
  with which the paper's number can be read, e.g. from a digitised figure);
* **not reproduced**: anything else (no detectable effect, or the opposite sign);
* **not tested**: the effect is not a finite number.

The training studies (notebooks 04, 10-13) measure differences between trained runs, with a yardstick of noise
instead of a confidence interval: the *spread* (e.g. the sampling noise, the FID change between two sampling seeds
of the same weights). A difference ``d`` with spread ``s`` is the effect ``d ± s`` (:func:`spread_effect`), with
``d > 0`` meaning "as the paper says", so the same rule applies:

* :func:`difference_verdict`: "direction reproduced" when ``d > s`` (the interval excludes 0 on the paper's side),
  else "not reproduced" with the reason: "within sampling noise" (the interval holds 0) or "opposite direction";
* :func:`differences_verdict`: a claim naming several differences, each of which must be beyond the spread;
* :func:`best_of_verdict`: the paper's best setting beats every other one by more than the spread;
* :func:`no_difference_verdict`: a claim of *no* difference is "reproduced" when every interval holds 0;
* :func:`significance_verdict`: with several training seeds, a two-sided test: the paper's direction and
  ``p < alpha`` (the test's interval excludes 0);
* :func:`cost_verdict`: a cost ratio against thresholds, only when every timing ran on one kind of GPU.

With several training seeds per variant, one rule judges a difference and one a claim of insensitivity, both on
the t-interval of the difference over seeds (paired when the seeds match, Welch's otherwise) and both returning a
:class:`SeedVerdict` whose :meth:`~SeedVerdict.row` is a table row (verdict, reason, difference and interval, the
spread over training seeds of each variant, the sampling noise apart):

* :func:`seed_difference_verdict`: "reproduced" (the interval excludes 0 on the paper's side and holds the paper's
  effect, when one is given), "direction reproduced" (excludes 0 on the paper's side, not the paper's magnitude),
  "inconclusive" (the interval holds 0, or one seed on a side: no interval) or "not reproduced" (excludes 0 on
  the other side);
* :func:`insensitivity_verdict`: "reproduced" only when the whole interval lies inside a stated margin, "not
  reproduced" when it lies wholly beyond it, else "inconclusive" (a difference not detected proves nothing).

At ``smoke`` scale no verdict is evidence: every rule takes ``smoke`` (or :func:`final` applies it) and gives
"not tested"; :func:`smoke_note` records what the rule would have said, and :data:`SMOKE_NOTE` marks the note.
A verdict's reasons and remarks become one note with :func:`join_notes`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Mapping

import numpy as np
from scipy.special import stdtrit

VERDICTS = ("reproduced", "direction reproduced", "inconclusive", "not reproduced", "not tested")
SMOKE_NOTE = "smoke scale: numbers are not meaningful"
NOT_FINITE = "not a finite number"


def effect_verdict(effect: dict, sign: int, paper_value: float | None = None, tol: float = 0.0,
                   comparable: bool = False) -> str:
    """The verdict of ``effect`` against a paper effect of sign ``sign`` (+1 or -1) (see the module docstring)."""
    if sign not in (1, -1):
        raise ValueError(f"sign must be +1 or -1, got {sign!r}")
    if tol < 0:
        raise ValueError(f"tol must be >= 0, got {tol!r}")
    m, lo, hi = (float(effect[k]) for k in ("mean", "lo", "hi"))
    if not all(math.isfinite(v) for v in (m, lo, hi)):
        return "not tested"
    if lo > hi:
        raise ValueError(f"interval [{lo}, {hi}] is empty")
    excludes_zero = lo > 0 or hi < 0
    if not (excludes_zero and math.copysign(1.0, m) == sign and m != 0):
        return "not reproduced"
    if comparable and paper_value is not None and lo - tol <= float(paper_value) <= hi + tol:
        return "reproduced"
    return "direction reproduced"


def final(verdict: str, smoke: bool) -> str:
    """``verdict``, or "not tested" at smoke scale."""
    if verdict not in VERDICTS:
        raise ValueError(f"unknown verdict {verdict!r}; allowed: {', '.join(VERDICTS)}")
    return "not tested" if smoke else verdict


def smoke_note(verdict: str, smoke: bool) -> str:
    """The note that keeps a smoke run's would-be verdict visible without claiming it."""
    return f"{SMOKE_NOTE} (the rule would give '{verdict}')" if smoke else ""


def join_notes(*parts: str) -> str:
    """The non-empty ``parts`` of a claim's note, joined with "; "."""
    return "; ".join(p for p in parts if p)


# ----------------------------------------------------------------------------------------------------------------
# Differences against a spread (the training studies)
# ----------------------------------------------------------------------------------------------------------------
def spread_effect(diff: float, spread: float) -> dict:
    """The effect ``diff ± spread``; ``spread`` is a noise yardstick >= 0 (NaN passes through: "not tested")."""
    diff, spread = float(diff), float(spread)
    if spread < 0:
        raise ValueError(f"spread must be >= 0, got {spread!r}")
    return {"mean": diff, "lo": diff - spread, "hi": diff + spread}


def _finite(*values: float) -> bool:
    return all(math.isfinite(float(v)) for v in values)


def difference_verdict(diff: float, spread: float, *, smoke: bool = False, within: str = "within sampling noise",
                       opposite: str = "opposite direction") -> tuple[str, str]:
    """(verdict, reason) of one difference (``diff > 0``: the paper's direction) against ``spread``.

    "direction reproduced" when ``diff > spread``; otherwise "not reproduced", the reason ``within`` when
    ``|diff| <= spread`` and ``opposite`` else; "not tested" for a non-finite number or at smoke scale (the
    reason is empty unless the verdict is "not reproduced" or the input is not finite).
    """
    verdict = effect_verdict(spread_effect(diff, spread), +1)
    if smoke:
        return "not tested", ""
    if verdict == "not tested":
        return verdict, NOT_FINITE
    if verdict == "not reproduced":
        return verdict, within if abs(float(diff)) <= float(spread) else opposite
    return verdict, ""


def differences_verdict(diffs: Iterable[float], spread: float, *, smoke: bool = False) -> str:
    """A claim naming several differences: "direction reproduced" only when every one is beyond ``spread``."""
    verdicts = [difference_verdict(d, spread)[0] for d in diffs]
    if not verdicts:
        raise ValueError("no differences to judge")
    if "not tested" in verdicts:
        return final("not tested", smoke)
    return final("direction reproduced" if set(verdicts) == {"direction reproduced"} else "not reproduced", smoke)


def best_of_verdict(values: Mapping[str, float], best: str, spread: float, *, smoke: bool = False,
                    lower_is_better: bool = True, close: str = "{best} is best but within the noise of {runner_up}",
                    beaten: str = "{runner_up} is better") -> tuple[str, str]:
    """(verdict, reason) of "``best`` is the best of ``values``": it beats the runner-up by more than ``spread``.

    Reasons of "not reproduced": ``close`` when ``best`` is ahead by at most ``spread``, ``beaten`` when another
    value is as good or better (both are ``str.format`` templates with ``best`` and ``runner_up``).
    """
    values = {k: float(v) for k, v in values.items()}  # a dict or a pandas Series
    if best not in values or len(values) < 2:
        raise ValueError(f"need {best!r} and at least one other value, got {list(values)}")
    if not _finite(spread, *values.values()):
        return final("not tested", smoke), ("" if smoke else NOT_FINITE)
    sign = 1.0 if lower_is_better else -1.0
    others = {k: v for k, v in values.items() if k != best}
    runner_up = min(others, key=lambda k: sign * others[k])
    diff = sign * (others[runner_up] - values[best])
    verdict, _ = difference_verdict(diff, spread, smoke=smoke)
    if verdict != "not reproduced":
        return verdict, ""
    return verdict, (close if diff > 0 else beaten).format(best=best, runner_up=runner_up)


def no_difference_verdict(diffs: Iterable[float], spread: float, *, smoke: bool = False,
                          differs: str = "at least one difference exceeds the noise") -> tuple[str, str]:
    """(verdict, reason) of a claim of *no* difference: "reproduced" when every ``|diff| <= spread``."""
    diffs = [float(d) for d in diffs]
    if not diffs:
        raise ValueError("no differences to judge")
    if smoke:
        return "not tested", ""
    if not _finite(spread, *diffs):
        return "not tested", NOT_FINITE
    if float(spread) < 0:
        raise ValueError(f"spread must be >= 0, got {spread!r}")
    if all(abs(d) <= float(spread) for d in diffs):
        return "reproduced", ""
    return "not reproduced", differs


def significance_verdict(right_direction: bool, p: float, *, alpha: float = 0.05, smoke: bool = False,
                         within: str = "right direction but not beyond the seed spread",
                         opposite: str = "opposite direction") -> tuple[str, str]:
    """(verdict, reason) of a two-sided test: "direction reproduced" when the estimate has the paper's direction
    and ``p < alpha``; "not tested" when ``p`` is not a number (fewer than two values, or none of them vary)."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
    if smoke:
        return "not tested", ""
    if not _finite(p):
        return "not tested", NOT_FINITE
    if right_direction and float(p) < alpha:
        return "direction reproduced", ""
    return "not reproduced", within if right_direction else opposite


def cost_verdict(ratio: float, devices: Iterable[str], *, smoke: bool = False, reproduced_at: float = 1.01,
                 direction_at: float = 1.05) -> str:
    """A cost ratio (reAR / AR time) against thresholds: <= ``reproduced_at`` "reproduced", <= ``direction_at``
    "direction reproduced", else "not reproduced"; "not tested" unless every timing ran on one kind of GPU
    (``devices`` names them; "CPU" is not a GPU) and the ratio is finite."""
    devices = set(devices)
    if smoke or len(devices) != 1 or "CPU" in devices or not _finite(ratio):
        return "not tested"
    if ratio <= reproduced_at:
        return "reproduced"
    return "direction reproduced" if ratio <= direction_at else "not reproduced"


# ----------------------------------------------------------------------------------------------------------------
# Training seeds: a difference between two variants, and a claim of insensitivity
# ----------------------------------------------------------------------------------------------------------------
#: What the paper says of the variant's metric against the baseline's.
DIRECTIONS = ("lower", "higher")


@dataclass(frozen=True)
class SeedVerdict:
    """A verdict on two variants measured over training seeds, and the numbers its table row shows.

    ``diff`` is mean(variant) - mean(baseline) (the mean of the per-seed differences when paired), ``lo`` / ``hi``
    its t-interval at ``level`` (NaN when no interval exists) and ``df`` its degrees of freedom. With ``relative``
    these three, ``sampling_noise`` and ``margin`` are fractions of the baseline's mean. ``test``: "paired" (same
    seeds on both sides), "welch" (independent samples) or "none" (a side with one seed). The stds are the
    training-seed spread of each variant (ddof 1; NaN for one seed) in the metric's units; ``sampling_noise`` is kept
    apart from them because it measures something else (e.g. |ΔFID| between two sampling seeds of one run).
    """

    verdict: str
    reason: str
    rule: str
    test: str
    level: float
    relative: bool
    diff: float
    lo: float
    hi: float
    df: float
    n_baseline: int
    n_variant: int
    baseline_mean: float
    baseline_std: float
    variant_mean: float
    variant_std: float
    sampling_noise: float | None = None
    paper_effect: float | None = None
    margin: float | None = None

    def row(self) -> dict:
        """One table row (plain Python values; None where a column does not apply)."""
        return {"verdict": self.verdict, "reason": self.reason, "test": self.test,
                "seeds": f"{self.n_baseline} / {self.n_variant}",
                "baseline": self.baseline_mean, "baseline std": self.baseline_std,
                "variant": self.variant_mean, "variant std": self.variant_std,
                "difference": self.diff, "ci low": self.lo, "ci high": self.hi, "ci level": self.level,
                "relative": self.relative, "sampling noise": self.sampling_noise, "paper effect": self.paper_effect,
                "margin": self.margin}


def _seed_values(name: str, values) -> tuple[list | None, np.ndarray]:
    """(seeds or None, values) of a {seed: value} mapping (or pandas Series) or an unlabelled sequence."""
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise TypeError(f"{name} must be a {{seed: value}} mapping or a sequence of values, got {values!r}")
    if hasattr(values, "items"):
        pairs = list(values.items())
        seeds = [k for k, _ in pairs]
        dup = next((k for i, k in enumerate(seeds) if k in seeds[:i]), None)
        if dup is not None:
            raise ValueError(f"{name} names training seed {dup} twice")
        vals = [v for _, v in pairs]
    else:
        seeds, vals = None, list(values)
    if not vals:
        raise ValueError(f"{name} holds no values")
    try:
        arr = np.array([float(v) for v in vals])
    except (TypeError, ValueError):
        raise TypeError(f"{name} must hold numbers, got {vals!r}") from None
    bad = np.flatnonzero(~np.isfinite(arr))
    if bad.size:
        where = f"seed {seeds[bad[0]]}" if seeds is not None else f"position {bad[0]}"
        raise ValueError(f"{name} holds a non-finite value ({arr[bad[0]]}) at {where}: drop the failed run or "
                         f"rerun it")
    return seeds, arr


def _optional_number(name: str, value, *, positive: bool = False) -> float | None:
    if value is None:
        return None
    v = float(value)
    if not math.isfinite(v) or v < 0 or (positive and v == 0):
        raise ValueError(f"{name} must be a finite number {'> 0' if positive else '>= 0'}, got {value!r}")
    return v


def _t_half_width(se: float, df: float, level: float) -> float:
    # A zero standard error (every run gave the same number) makes the interval the point itself.
    return 0.0 if se == 0 else float(stdtrit(df, (1 + level) / 2)) * se


def _compare(baseline, variant, level: float, relative: bool, sampling_noise) -> dict:
    """The difference variant - baseline over training seeds, its interval and each side's spread."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    bseeds, b = _seed_values("baseline", baseline)
    vseeds, v = _seed_values("variant", variant)
    noise = _optional_number("sampling_noise", sampling_noise)
    diff, lo, hi, df = float(v.mean() - b.mean()), math.nan, math.nan, math.nan
    if bseeds is not None and vseeds is not None and set(bseeds) == set(vseeds) and len(b) >= 2:
        # Same seeds: the per-seed differences cancel what a seed does to both variants (shared data order, init).
        vby = dict(zip(vseeds, v))
        d = np.array([vby[s] - x for s, x in zip(bseeds, b)])
        test, df = "paired", len(d) - 1
        h = _t_half_width(float(d.std(ddof=1)) / math.sqrt(len(d)), df, level)
        lo, hi = diff - h, diff + h
    elif len(b) >= 2 and len(v) >= 2:
        vb, vv = b.var(ddof=1) / len(b), v.var(ddof=1) / len(v)
        test = "welch"
        df = (vb + vv) ** 2 / (vb ** 2 / (len(b) - 1) + vv ** 2 / (len(v) - 1)) if vb + vv > 0 else math.inf
        h = _t_half_width(math.sqrt(vb + vv), df, level)
        lo, hi = diff - h, diff + h
    else:
        test = "none"
    scale = 1.0
    if relative:
        scale = abs(float(b.mean()))
        if scale == 0:
            raise ValueError("relative=True needs a baseline with a non-zero mean")
    def std(x: np.ndarray) -> float:
        return float(x.std(ddof=1)) if len(x) >= 2 else math.nan

    return dict(test=test, level=float(level), relative=bool(relative), diff=diff / scale, lo=lo / scale,
                hi=hi / scale, df=float(df), n_baseline=len(b), n_variant=len(v), baseline_mean=float(b.mean()),
                baseline_std=std(b), variant_mean=float(v.mean()), variant_std=std(v),
                sampling_noise=None if noise is None else noise / scale)


def _one_seed_reason(c: dict, margin: float | None = None) -> str:
    side = "baseline" if c["n_baseline"] < 2 else "variant"
    reason = f"one training seed ({side}): no interval over seeds"
    noise = c["sampling_noise"]
    if noise is not None:
        beyond = abs(c["diff"]) > noise
        reason += (f"; the difference {c['diff']:+.3g} {'exceeds' if beyond else 'is within'} the sampling noise "
                   f"{noise:.3g}")
        if beyond:
            reason += ", but the spread over training seeds, which includes the sampling noise, is unknown"
    return reason


def seed_difference_verdict(baseline, variant, *, expected: str, paper_effect: float | None = None,
                            tol: float = 0.0, level: float = 0.95, relative: bool = False,
                            sampling_noise: float | None = None, smoke: bool = False) -> SeedVerdict:
    """The verdict of "the variant's metric is ``expected`` ("lower" or "higher") than the baseline's".

    ``baseline`` / ``variant``: one value per training seed, as ``{seed: value}`` (a dict or pandas Series) or a
    plain sequence. When both name the same seeds (at least two) the interval is the paired t-interval of the
    per-seed differences; otherwise (unlabelled values, other seeds or other counts) Welch's t-interval of the
    difference of means, which needs two seeds on each side. ``relative`` expresses the difference (and the
    sampling noise) as a fraction of the baseline's mean, for comparing with a paper whose metric has another
    scale; the interval is then divided by that mean, whose own uncertainty is ignored (small next to the
    difference's when the baseline's spread is a small fraction of its mean).

    Verdicts, with [lo, hi] the interval of the difference at ``level``:

    * **reproduced**: the interval excludes 0 on the paper's side and, when ``paper_effect`` (the paper's
      variant - baseline, in the units of the difference) is given, the paper's effect is a value of the interval
      widened by ``tol`` on each side (``lo - tol <= paper_effect <= hi + tol``; ``tol`` is the precision of the
      paper's number, e.g. 0.01 for a difference of two FIDs printed to 0.01). Without ``paper_effect`` the claim
      is about the direction only; pass it whenever the paper gives a number comparable with ours.
    * **direction reproduced**: the interval excludes 0 on the paper's side but does not hold the paper's effect.
    * **inconclusive**: the interval holds 0 (an interval that ends at 0 holds it), or there is none: with one seed
      on a side the spread over training seeds is unknown, so no difference, however large, is claimed. The reason
      then says whether the difference exceeds ``sampling_noise``: the spread between runs includes the sampling
      noise and usually more, so exceeding it is necessary for a real effect but not sufficient.
    * **not reproduced**: the interval excludes 0 on the other side.

    Inputs that are not finite numbers are refused (ValueError naming the argument): a failed run must be
    dropped or rerun, not averaged. ``smoke`` gives "not tested" and keeps the rule's verdict in the reason.
    """
    if expected not in DIRECTIONS:
        raise ValueError(f"expected must be one of {DIRECTIONS}, got {expected!r}")
    sign = -1.0 if expected == "lower" else 1.0
    if paper_effect is not None:
        paper_effect = float(paper_effect)
        if not math.isfinite(paper_effect) or paper_effect * sign <= 0:
            raise ValueError(f"paper_effect={paper_effect!r} must be a finite number on the {expected!r} side of 0 "
                             f"(variant - baseline)")
    tol = _optional_number("tol", tol) or 0.0
    c = _compare(baseline, variant, level, relative, sampling_noise)
    lo, hi = c["lo"], c["hi"]
    if c["test"] == "none":
        verdict, reason = "inconclusive", _one_seed_reason(c)
    elif lo > 0 or hi < 0:
        if (lo > 0) != (sign > 0):
            verdict, reason = "not reproduced", "the interval excludes 0 on the side opposite to the paper's"
        elif paper_effect is None:
            verdict, reason = "reproduced", "the interval excludes 0 on the paper's side (no paper magnitude given)"
        elif lo - tol <= paper_effect <= hi + tol:
            verdict, reason = "reproduced", "the interval excludes 0 on the paper's side and holds the paper's effect"
        else:
            verdict = "direction reproduced"
            reason = f"the paper's effect {paper_effect:+.3g} lies outside the interval [{lo:+.3g}, {hi:+.3g}]"
    else:
        verdict, reason = "inconclusive", "the interval holds 0"
    if smoke:
        verdict, reason = "not tested", smoke_note(verdict, True)
    return SeedVerdict(verdict, reason, "difference", paper_effect=paper_effect, **c)


def insensitivity_verdict(baseline, variant, *, margin: float, level: float = 0.95, relative: bool = False,
                          sampling_noise: float | None = None, smoke: bool = False) -> SeedVerdict:
    """The verdict of "the metric does not depend on the change from baseline to variant" (e.g. λ = 1 -> 1.5).

    Inputs and interval as :func:`seed_difference_verdict`; ``margin`` (> 0, in the units of the difference, so
    a fraction of the baseline's mean with ``relative``: ``margin=0.05, relative=True`` is ±5%) is the largest
    difference that still counts as "no effect". With [lo, hi] the interval at ``level``:

    * **reproduced**: the whole interval lies inside the margin, ``-margin <= lo`` and ``hi <= margin`` (an
      equivalence test: a 95% interval inside the margin is two one-sided tests at 2.5%);
    * **not reproduced**: the whole interval lies beyond it, ``lo > margin`` or ``hi < -margin``;
    * **inconclusive**: anything else, including one seed on a side (no interval). An interval that holds 0 but
      crosses the margin is inconclusive: failing to detect a difference is not evidence that there is none.
    """
    margin = _optional_number("margin", margin, positive=True)
    if margin is None:
        raise ValueError("margin must be a finite number > 0, got None")
    c = _compare(baseline, variant, level, relative, sampling_noise)
    lo, hi = c["lo"], c["hi"]
    if c["test"] == "none":
        verdict, reason = "inconclusive", _one_seed_reason(c)
    elif -margin <= lo and hi <= margin:
        verdict, reason = "reproduced", f"the whole interval lies within ±{margin:.3g}"
    elif lo > margin or hi < -margin:
        verdict, reason = "not reproduced", f"the whole interval lies beyond ±{margin:.3g}"
    else:
        verdict = "inconclusive"
        reason = f"the interval [{lo:+.3g}, {hi:+.3g}] crosses the margin ±{margin:.3g}"
        if lo <= 0 <= hi:
            reason += " (no difference is detected, but one beyond the margin is not excluded)"
    if smoke:
        verdict, reason = "not tested", smoke_note(verdict, True)
    return SeedVerdict(verdict, reason, "insensitivity", margin=margin, **c)
