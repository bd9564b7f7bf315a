"""Verdicts on the paper's claims, from stated rules: one place, tested, used by every diagnosis notebook.

An *effect* is our estimate of a paper quantity with its 95% interval, ``{"mean", "lo", "hi"}`` (as returned by
:func:`rearlib.analysis.ci_of`). :func:`effect_verdict` compares it with the paper:

* **direction reproduced**: the mean has the paper's sign and the interval excludes 0;
* **reproduced**: additionally, when magnitudes are comparable (same data, tokenizer and metric, i.e. ``paper``
  scale with the paper's metric), the paper's own value lies inside our interval widened by ``tol`` (the precision
  with which the paper's number can be read, e.g. from a digitised figure);
* **not reproduced**: anything else (no detectable effect, or the opposite sign);
* **not tested**: the effect is not a finite number.

At ``smoke`` scale no verdict is evidence: :func:`final` turns every verdict into "not tested" and
:func:`smoke_note` records what the rule would have said.
"""

from __future__ import annotations

import math

VERDICTS = ("reproduced", "direction reproduced", "inconclusive", "not reproduced", "not tested")


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
    return f"smoke scale: numbers are not meaningful (the rule would give '{verdict}')" if smoke else ""
