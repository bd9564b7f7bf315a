"""The verdict rules of the notebooks (diagnoses and training studies), at their edges."""

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as scipy_stats

from rearlib.experiments.verdicts import (SMOKE_NOTE, VERDICTS, best_of_verdict, cost_verdict, difference_verdict,
                                         differences_verdict, effect_verdict, final, insensitivity_verdict,
                                         join_notes, no_difference_verdict, seed_difference_verdict,
                                         significance_verdict, smoke_note, spread_effect)


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


# ------------------------------------------------------------------------------------------------ over training seeds

AR = {0: 38.0, 1: 38.6, 2: 37.7}                 # baseline FIDs of three training seeds


def test_the_paired_interval_is_the_t_interval_of_the_per_seed_differences():
    rear = {0: 36.0, 1: 36.9, 2: 35.4}            # differences -2.0, -1.7, -2.3
    r = seed_difference_verdict(AR, rear, expected="lower")
    d = np.array([-2.0, -1.7, -2.3])
    h = scipy_stats.t.ppf(0.975, 2) * d.std(ddof=1) / math.sqrt(3)
    assert r.test == "paired" and r.df == 2
    assert r.diff == pytest.approx(d.mean()) and (r.lo, r.hi) == pytest.approx((d.mean() - h, d.mean() + h))
    assert r.baseline_std == pytest.approx(np.std([38.0, 38.6, 37.7], ddof=1))
    assert r.variant_std == pytest.approx(np.std([36.0, 36.9, 35.4], ddof=1))
    # seeds are matched by name, not by order
    assert seed_difference_verdict(AR, {2: 35.4, 0: 36.0, 1: 36.9}, expected="lower").diff == pytest.approx(-2.0)
    # a 99% interval is wider
    wide = seed_difference_verdict(AR, rear, expected="lower", level=0.99)
    assert wide.lo < r.lo and wide.hi > r.hi and wide.level == 0.99


def test_the_four_outcomes_of_a_difference():
    rear = {0: 36.0, 1: 36.9, 2: 35.4}            # -2.0 +- 0.75
    # no paper magnitude: the direction is the claim
    assert seed_difference_verdict(AR, rear, expected="lower").verdict == "reproduced"
    # the paper's effect inside the interval: reproduced; far outside: only the direction
    assert seed_difference_verdict(AR, rear, expected="lower", paper_effect=-1.6).verdict == "reproduced"
    r = seed_difference_verdict(AR, rear, expected="lower", paper_effect=-0.2)
    assert r.verdict == "direction reproduced" and "-0.2 lies outside" in r.reason
    # tol widens the interval by the precision of the paper's number
    lo = seed_difference_verdict(AR, rear, expected="lower").lo
    assert seed_difference_verdict(AR, rear, expected="lower", paper_effect=lo - 0.05).verdict == "direction reproduced"
    assert seed_difference_verdict(AR, rear, expected="lower", paper_effect=lo - 0.05,
                                   tol=0.05).verdict == "reproduced"
    # a difference the seeds cannot resolve: inconclusive, whichever its sign
    noisy = {0: 37.0, 1: 39.5, 2: 37.9}           # differences -1.0, +0.9, +0.2
    r = seed_difference_verdict(AR, noisy, expected="lower")
    assert r.verdict == "inconclusive" and r.lo < 0 < r.hi and r.reason == "the interval holds 0"
    # the interval excludes 0 on the other side
    worse = {0: 40.0, 1: 40.5, 2: 39.8}
    r = seed_difference_verdict(AR, worse, expected="lower")
    assert r.verdict == "not reproduced" and r.lo > 0 and "opposite" in r.reason
    # "higher" (e.g. IS) mirrors it
    assert seed_difference_verdict(AR, worse, expected="higher").verdict == "reproduced"
    assert seed_difference_verdict(AR, rear, expected="higher").verdict == "not reproduced"


def test_an_interval_that_ends_at_zero_holds_it():
    # identical per-seed differences of 0: a point interval at 0
    r = seed_difference_verdict({0: 1.0, 1: 2.0}, {0: 1.0, 1: 2.0}, expected="lower")
    assert (r.lo, r.hi) == (0.0, 0.0) and r.verdict == "inconclusive"
    # identical non-zero differences: the point excludes 0
    assert seed_difference_verdict({0: 1.0, 1: 2.0}, {0: 0.5, 1: 1.5}, expected="lower").verdict == "reproduced"


def test_one_seed_is_inconclusive_and_says_whether_the_difference_exceeds_the_sampling_noise():
    r = seed_difference_verdict({0: 38.0}, {0: 30.0}, expected="lower", sampling_noise=0.4)
    assert r.verdict == "inconclusive" and r.test == "none"
    assert math.isnan(r.lo) and math.isnan(r.hi) and math.isnan(r.baseline_std)
    assert r.diff == -8.0 and r.sampling_noise == 0.4
    assert "one training seed" in r.reason and "exceeds the sampling noise" in r.reason
    r = seed_difference_verdict({0: 38.0}, {0: 37.8}, expected="lower", sampling_noise=0.4)
    assert r.verdict == "inconclusive" and "within the sampling noise" in r.reason
    assert seed_difference_verdict({0: 38.0}, {0: 37.8}, expected="lower").reason == \
        "one training seed (baseline): no interval over seeds"
    # one seed on one side only: Welch needs two on each, so no interval either
    r = seed_difference_verdict(AR, {0: 30.0}, expected="lower")
    assert r.verdict == "inconclusive" and "(variant)" in r.reason and r.variant_std != r.variant_std


def test_unequal_or_unmatched_seeds_use_welch():
    rear = {0: 36.0, 1: 36.9}
    r = seed_difference_verdict(AR, rear, expected="lower")
    a, b = np.array(list(rear.values())), np.array(list(AR.values()))
    va, vb = a.var(ddof=1) / 2, b.var(ddof=1) / 3
    df = (va + vb) ** 2 / (va ** 2 / 1 + vb ** 2 / 2)
    h = scipy_stats.t.ppf(0.975, df) * math.sqrt(va + vb)
    assert r.test == "welch" and (r.n_baseline, r.n_variant) == (3, 2) and r.df == pytest.approx(df)
    assert (r.lo, r.hi) == pytest.approx((a.mean() - b.mean() - h, a.mean() - b.mean() + h))
    assert r.row()["seeds"] == "3 / 2"
    # same count, other seeds, or plain lists: not paired
    assert seed_difference_verdict(AR, {3: 36.0, 4: 36.9, 5: 35.4}, expected="lower").test == "welch"
    assert seed_difference_verdict([38.0, 38.6, 37.7], [36.0, 36.9, 35.4], expected="lower").test == "welch"
    # a pandas Series indexed by seed pairs like a dict
    assert seed_difference_verdict(pd.Series(AR), pd.Series({0: 36.0, 1: 36.9, 2: 35.4}),
                                   expected="lower").test == "paired"


def test_non_finite_and_bad_inputs_are_refused_naming_the_argument():
    with pytest.raises(ValueError, match=r"baseline holds a non-finite value \(nan\) at seed 1"):
        seed_difference_verdict({0: 38.0, 1: math.nan}, {0: 36.0, 1: 36.9}, expected="lower")
    with pytest.raises(ValueError, match="variant holds a non-finite value .* at position 2"):
        seed_difference_verdict([1.0, 2.0, 3.0], [1.0, 2.0, math.inf], expected="lower")
    with pytest.raises(ValueError, match="sampling_noise"):
        seed_difference_verdict(AR, AR, expected="lower", sampling_noise=math.nan)
    with pytest.raises(ValueError, match="paper_effect"):
        seed_difference_verdict(AR, AR, expected="lower", paper_effect=math.nan)
    with pytest.raises(ValueError, match="paper_effect"):
        seed_difference_verdict(AR, AR, expected="lower", paper_effect=+1.0)    # contradicts "lower"
    with pytest.raises(ValueError, match="expected"):
        seed_difference_verdict(AR, AR, expected="down")
    with pytest.raises(ValueError, match="level"):
        seed_difference_verdict(AR, AR, expected="lower", level=95)
    with pytest.raises(ValueError, match="tol"):
        seed_difference_verdict(AR, AR, expected="lower", tol=-0.1)
    with pytest.raises(ValueError, match="variant holds no values"):
        seed_difference_verdict(AR, {}, expected="lower")
    with pytest.raises(ValueError, match="twice"):
        seed_difference_verdict(pd.Series([1.0, 2.0], index=[0, 0]), AR, expected="lower")
    with pytest.raises(TypeError, match="baseline"):
        seed_difference_verdict(38.0, AR, expected="lower")


def test_relative_differences_are_fractions_of_the_baseline_mean():
    rear = {0: 35.0, 1: 35.9, 2: 34.8}            # -3.0, -2.7, -2.9: about -7.5% of 38.1
    absolute = seed_difference_verdict(AR, rear, expected="lower", sampling_noise=0.4)
    r = seed_difference_verdict(AR, rear, expected="lower", relative=True, sampling_noise=0.4,
                                paper_effect=(19.72 - 21.32) / 21.32)
    m = np.mean(list(AR.values()))
    assert (r.diff, r.lo, r.hi) == pytest.approx((absolute.diff / m, absolute.lo / m, absolute.hi / m))
    assert r.sampling_noise == pytest.approx(0.4 / m) and r.baseline_mean == pytest.approx(m)  # means stay in units
    assert r.verdict == "reproduced"                                           # the paper's -7.5% is inside
    # in the metric's units the paper's -1.60 FID is far from our -2.87
    assert seed_difference_verdict(AR, rear, expected="lower", paper_effect=19.72 - 21.32).verdict == \
        "direction reproduced"
    with pytest.raises(ValueError, match="non-zero mean"):
        seed_difference_verdict({0: 1.0, 1: -1.0}, {0: 1.0, 1: 2.0}, expected="lower", relative=True)


def test_smoke_keeps_the_rule_visible_and_the_row_prints():
    r = seed_difference_verdict(AR, {0: 36.0, 1: 36.9, 2: 35.4}, expected="lower", smoke=True)
    assert r.verdict == "not tested" and r.reason.startswith(SMOKE_NOTE) and "'reproduced'" in r.reason
    row = r.row()
    assert row["verdict"] == "not tested" and row["difference"] == pytest.approx(-2.0)
    assert {"baseline std", "variant std", "ci low", "ci high", "sampling noise", "paper effect"} <= set(row)
    assert pd.DataFrame([row]).shape == (1, len(row))
    assert r.verdict in VERDICTS


def test_insensitivity_needs_the_whole_interval_inside_the_margin():
    base = {0: 20.0, 1: 20.4, 2: 19.8}
    close = {0: 20.1, 1: 20.4, 2: 19.9}            # differences +0.1, 0, +0.1: tight around 0
    r = insensitivity_verdict(base, close, margin=0.05, relative=True)   # +-5% of the baseline
    assert r.verdict == "reproduced" and -0.05 <= r.lo and r.hi <= 0.05 and r.margin == 0.05
    # the same data in the metric's units, a margin of 1 FID
    assert insensitivity_verdict(base, close, margin=1.0).verdict == "reproduced"
    # far beyond the margin on either side
    r = insensitivity_verdict(base, {0: 25.0, 1: 25.5, 2: 24.9}, margin=1.0)
    assert r.verdict == "not reproduced" and r.lo > 1.0
    assert insensitivity_verdict(base, {0: 15.0, 1: 15.5, 2: 14.9}, margin=1.0).verdict == "not reproduced"
    # not significant but wide: an interval holding 0 that crosses the margin proves nothing
    wide = {0: 18.0, 1: 22.9, 2: 19.5}             # differences -2, +2.5, -0.3
    r = insensitivity_verdict(base, wide, margin=1.0)
    assert r.lo < 0 < r.hi and r.verdict == "inconclusive" and "not excluded" in r.reason
    assert seed_difference_verdict(base, wide, expected="lower").verdict == "inconclusive"
    # interval straddling the margin but not 0
    r = insensitivity_verdict(base, {0: 20.6, 1: 21.1, 2: 20.45}, margin=0.6)   # +0.6, +0.7, +0.65
    assert r.lo > 0 and r.lo < 0.6 < r.hi and r.verdict == "inconclusive" and "not excluded" not in r.reason


def test_insensitivity_with_one_seed_or_bad_margins():
    r = insensitivity_verdict({0: 20.0}, {0: 20.01}, margin=1.0, sampling_noise=0.3)
    assert r.verdict == "inconclusive" and "one training seed" in r.reason and r.rule == "insensitivity"
    for bad in (0.0, -1.0, math.nan, None):
        with pytest.raises(ValueError, match="margin"):
            insensitivity_verdict({0: 20.0, 1: 21.0}, {0: 20.0, 1: 21.0}, margin=bad)
    with pytest.raises(ValueError, match="baseline holds a non-finite"):
        insensitivity_verdict({0: math.nan, 1: 1.0}, {0: 20.0, 1: 21.0}, margin=1.0)
    assert insensitivity_verdict({0: 20.0, 1: 20.4}, {0: 20.1, 1: 20.4}, margin=1.0,
                                 smoke=True).verdict == "not tested"
