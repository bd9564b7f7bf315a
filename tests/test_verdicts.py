"""The verdict rules of the notebooks (diagnoses and training studies), at their edges."""

import math

import pandas as pd
import pytest

from rearlib.experiments.verdicts import (SMOKE_NOTE, best_of_verdict, cost_verdict, difference_verdict,
                                         differences_verdict, effect_verdict, final, join_notes,
                                         no_difference_verdict, significance_verdict, smoke_note, spread_effect)


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


# ------------------------------------------------------------------------------------------------ the training studies

def test_spread_effect_is_the_difference_plus_minus_the_spread():
    assert spread_effect(0.5, 0.2) == {"mean": 0.5, "lo": 0.3, "hi": 0.7}
    assert math.isnan(spread_effect(math.nan, 0.2)["mean"])
    with pytest.raises(ValueError, match="spread"):
        spread_effect(0.5, -0.1)


def test_a_difference_counts_only_beyond_the_spread_and_the_reason_says_why_not():
    assert difference_verdict(0.5, 0.2) == ("direction reproduced", "")
    # the interval 0.1 ± 0.2 straddles zero: no detectable difference
    assert difference_verdict(0.1, 0.2) == ("not reproduced", "within sampling noise")
    assert difference_verdict(-0.1, 0.2) == ("not reproduced", "within sampling noise")
    assert difference_verdict(0.2, 0.2) == ("not reproduced", "within sampling noise")  # touching is not beyond
    assert difference_verdict(-0.5, 0.2) == ("not reproduced", "opposite direction")     # wrong sign, beyond noise
    assert difference_verdict(0.0, 0.0) == ("not reproduced", "within sampling noise")
    assert difference_verdict(1e-9, 0.0) == ("direction reproduced", "")                  # no noise: the sign decides
    assert difference_verdict(0.1, 0.2, within="inside", opposite="against") == ("not reproduced", "inside")
    assert difference_verdict(math.nan, 0.2) == ("not tested", "not a finite number")
    assert difference_verdict(0.5, math.inf) == ("not tested", "not a finite number")
    assert difference_verdict(0.5, 0.2, smoke=True) == ("not tested", "")
    with pytest.raises(ValueError, match="spread"):
        difference_verdict(0.5, -0.2)


def test_a_claim_of_several_differences_needs_every_one():
    assert differences_verdict([0.5, 0.3], 0.2) == "direction reproduced"
    assert differences_verdict([0.5, 0.1], 0.2) == "not reproduced"   # one within the noise
    assert differences_verdict([0.5, -0.9], 0.2) == "not reproduced"  # one the wrong way
    assert differences_verdict([0.5, math.nan], 0.2) == "not tested"
    assert differences_verdict([0.5, 0.3], 0.2, smoke=True) == "not tested"
    with pytest.raises(ValueError, match="no differences"):
        differences_verdict([], 0.2)


def test_the_best_setting_must_beat_the_runner_up_by_more_than_the_spread():
    fid = {"final": 1.0, "a": 1.5, "b": 2.0}
    assert best_of_verdict(fid, "final", 0.2) == ("direction reproduced", "")
    assert best_of_verdict(fid, "final", 0.6) == ("not reproduced", "final is best but within the noise of a")
    assert best_of_verdict({**fid, "a": 0.9}, "final", 0.6, beaten="{runner_up} is lower") == \
        ("not reproduced", "a is lower")
    assert best_of_verdict({**fid, "a": 1.0}, "final", 0.0)[1] == "a is better"    # a tie is not a win
    # higher is better (e.g. IS): the best is the largest
    assert best_of_verdict({"final": 3.0, "a": 2.0}, "final", 0.5, lower_is_better=False)[0] == "direction reproduced"
    assert best_of_verdict({"final": 3.0, "a": 2.0}, "final", 0.5)[0] == "not reproduced"
    assert best_of_verdict({**fid, "b": math.nan}, "final", 0.2) == ("not tested", "not a finite number")
    assert best_of_verdict(fid, "final", 0.2, smoke=True) == ("not tested", "")
    with pytest.raises(ValueError, match="at least one other"):
        best_of_verdict({"final": 1.0}, "final", 0.2)


def test_the_best_of_rule_reads_a_pandas_series():
    fid = pd.Series({"rear": 1.0, "ar": 2.0})
    assert best_of_verdict(fid, "rear", 0.5) == ("direction reproduced", "")


def test_a_claim_of_no_difference_is_reproduced_when_every_interval_holds_zero():
    assert no_difference_verdict([0.1, -0.2], 0.2) == ("reproduced", "")
    assert no_difference_verdict([0.1, -0.3], 0.2, differs="λ matters") == ("not reproduced", "λ matters")
    assert no_difference_verdict([0.1, math.nan], 0.2) == ("not tested", "not a finite number")
    assert no_difference_verdict([0.1], 0.2, smoke=True) == ("not tested", "")


def test_a_significance_test_needs_the_direction_and_a_small_p():
    assert significance_verdict(True, 0.01) == ("direction reproduced", "")
    assert significance_verdict(True, 0.05) == ("not reproduced", "right direction but not beyond the seed spread")
    assert significance_verdict(False, 0.001) == ("not reproduced", "opposite direction")
    assert significance_verdict(True, math.nan) == ("not tested", "not a finite number")  # e.g. one seed per side
    assert significance_verdict(True, 0.01, smoke=True) == ("not tested", "")
    assert significance_verdict(True, 0.03, alpha=0.01)[0] == "not reproduced"
    with pytest.raises(ValueError, match="alpha"):
        significance_verdict(True, 0.01, alpha=1.5)


def test_a_cost_ratio_is_judged_on_one_kind_of_gpu_only():
    assert cost_verdict(1.004, {"H200"}) == "reproduced"
    assert cost_verdict(1.01, ["H200", "H200"]) == "reproduced"                      # the edge belongs to it
    assert cost_verdict(1.03, {"H200"}) == "direction reproduced"
    assert cost_verdict(1.2, {"H200"}) == "not reproduced"
    assert cost_verdict(1.004, {"H200", "H100"}) == "not tested"                      # two kinds of GPU
    assert cost_verdict(1.004, {"CPU"}) == "not tested"
    assert cost_verdict(math.nan, {"H200"}) == "not tested"
    assert cost_verdict(1.004, {"H200"}, smoke=True) == "not tested"


def test_notes_join_their_non_empty_parts_and_smoke_keeps_the_rule_visible():
    assert join_notes("a", "", "b") == "a; b" and join_notes("", "") == ""
    assert smoke_note("reproduced", smoke=True).startswith(SMOKE_NOTE)
