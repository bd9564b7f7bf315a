"""The verdict rule of the diagnosis notebooks, at its edges."""

import math

import pytest

from rearlib.experiments.verdicts import effect_verdict, final, smoke_note


def eff(mean, lo, hi):
    return {"mean": mean, "lo": lo, "hi": hi}


def test_direction_needs_the_sign_and_an_interval_excluding_zero():
    assert effect_verdict(eff(0.3, 0.1, 0.5), +1) == "direction reproduced"
    assert effect_verdict(eff(-0.3, -0.5, -0.1), -1) == "direction reproduced"
    assert effect_verdict(eff(0.3, 0.1, 0.5), -1) == "not reproduced"        # opposite sign
    assert effect_verdict(eff(0.3, -0.1, 0.7), +1) == "not reproduced"       # interval holds 0
    assert effect_verdict(eff(0.3, 0.0, 0.6), +1) == "not reproduced"        # touching 0 is not excluding it


def test_reproduced_only_when_comparable_and_the_paper_value_is_inside_the_widened_interval():
    e = eff(0.30, 0.25, 0.35)
    assert effect_verdict(e, +1, paper_value=0.34, comparable=True) == "reproduced"
    assert effect_verdict(e, +1, paper_value=0.34, comparable=False) == "direction reproduced"
    assert effect_verdict(e, +1, paper_value=0.40, tol=0.02, comparable=True) == "direction reproduced"
    assert effect_verdict(e, +1, paper_value=0.37, tol=0.02, comparable=True) == "reproduced"   # edge: 0.35 + 0.02
    assert effect_verdict(e, +1, paper_value=0.23, tol=0.02, comparable=True) == "reproduced"   # edge: 0.25 - 0.02
    assert effect_verdict(e, +1, paper_value=None, comparable=True) == "direction reproduced"


def test_non_finite_effects_are_not_tested_and_bad_arguments_are_refused():
    assert effect_verdict(eff(math.nan, 0.1, 0.2), +1) == "not tested"
    assert effect_verdict(eff(0.1, -math.inf, 0.2), +1) == "not tested"
    with pytest.raises(ValueError, match="sign"):
        effect_verdict(eff(0.1, 0.05, 0.2), 0)
    with pytest.raises(ValueError, match="tol"):
        effect_verdict(eff(0.1, 0.05, 0.2), +1, tol=-1)
    with pytest.raises(ValueError, match="empty"):
        effect_verdict(eff(0.1, 0.3, 0.2), +1)


def test_smoke_runs_claim_nothing_but_keep_the_rule_visible():
    assert final("direction reproduced", smoke=True) == "not tested"
    assert final("direction reproduced", smoke=False) == "direction reproduced"
    assert "direction reproduced" in smoke_note("direction reproduced", smoke=True)
    assert smoke_note("reproduced", smoke=False) == ""
    with pytest.raises(ValueError, match="unknown verdict"):
        final("maybe", smoke=False)
