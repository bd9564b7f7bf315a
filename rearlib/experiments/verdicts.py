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

At ``smoke`` scale no verdict is evidence: every rule takes ``smoke`` (or :func:`final` applies it) and gives
"not tested"; :func:`smoke_note` records what the rule would have said, and :data:`SMOKE_NOTE` marks the note.
A verdict's reasons and remarks become one note with :func:`join_notes`.
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping

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
