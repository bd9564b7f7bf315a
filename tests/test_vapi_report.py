"""Tests of notebook 09's study: its runs, tables, λ_p calibration and evaluation plan (rearlib.vapi_report), its
claims and verdicts (rearlib.vapi_claims) and its figures (rearlib.vapi_figures), on synthetic records.

The held-out reconstruction table, which needs a generator and a tokenizer, is tested with the reward in
tests/test_vapi.py.
"""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import torch

from rearlib import vapi_claims, vapi_figures, vapi_report
from rearlib.experiments.verdicts import SMOKE_NOTE, VERDICTS, seed_difference_verdict
from rearlib.vapi import VAPIConfig
from rearlib.vapi_report import METHOD, METHOD_REAR, StudyRun

PRIOR, SHUFFLED = "AR + VA-π (CE prior only)", "AR + VA-π (shuffled rewards)"
MSE_ONLY, PERC_ONLY = "AR + VA-π (MSE only)", "AR + VA-π (perceptual only)"
SWEEP = ["AR + VA-π (lr 1e-6, 128 images/step)", "AR + VA-π (lr 3e-6, 128 images/step)",
         "AR + VA-π (lr 1e-5, 128 images/step)"]


# ------------------------------------------------------------------------------------------------------------
# Runs and their tables
# ------------------------------------------------------------------------------------------------------------
def test_study_runs_are_the_method_controls_sweep_and_ablation():
    runs = vapi_report.study_runs("small", 0.25, seed=7)
    assert list(runs) == [METHOD, METHOD_REAR, PRIOR, SHUFFLED, *SWEEP, MSE_ONLY, PERC_ONLY]
    assert [s.group for s in runs.values()] == ["method"] * 2 + ["control"] * 2 + ["lr sweep"] * 3 + \
        ["reward ablation"] * 2
    assert {s.base for s in runs.values()} == {"AR", "reAR"} and runs[METHOD_REAR].base == "reAR"
    method = runs[METHOD].cfg
    assert (method.batch_size, method.group_size, method.lr, method.update_mode, method.perceptual) == \
        (32, 8, 1e-5, "eval", "st-lpips-alex")
    assert method.reward_terms == "both" and method.reward_perceptual_weight == 0.25 and method.seed == 7
    # Controls and the ablation differ from the method in one field only.
    assert runs[PRIOR].cfg == method.replace(control="prior_only")
    assert runs[SHUFFLED].cfg == method.replace(control="shuffled_rewards")
    assert runs[MSE_ONLY].cfg == method.replace(reward_terms="mse")
    assert runs[PERC_ONLY].cfg == method.replace(reward_terms="perceptual")
    assert {runs[r].steps for r in (METHOD, PRIOR, MSE_ONLY)} == {100}
    # The sweep: the paper's batch (128 images x G = 8, accumulated in micro-batches), 100 steps, one run per lr.
    for name, lr in zip(SWEEP, (1e-6, 3e-6, 1e-5)):
        c = runs[name].cfg
        assert (c.lr, c.batch_size, c.group_size, c.micro_batch_images, runs[name].steps) == (lr, 128, 8, 32, 100)
        assert c.reward_perceptual_weight == 0.25 and c.update_mode == "eval" and c.seed == 7
    assert "0.25 · perceptual" in runs[METHOD].reward and runs[MSE_ONLY].reward == "MSE only"

    smoke = vapi_report.study_runs("smoke", 1.0)
    sweep = [s for s in smoke.values() if s.group == "lr sweep"]
    assert len(smoke) == 8 and [(s.cfg.batch_size, s.cfg.group_size, s.steps) for s in sweep] == [(4, 4, 2)] * 2
    for bad in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="lambda_p"):
            vapi_report.study_runs("small", bad)


def test_lr_labels_and_run_names():
    assert [vapi_report.lr_label(x) for x in (1e-6, 3e-5, 1e-4, 0.5)] == ["1e-6", "3e-5", "0.0001", "0.5"]
    assert vapi_report.sweep_run_name(1e-6, 128) == "AR + VA-π (lr 1e-6, 128 images/step)"


def test_run_key_names_the_recipe_and_the_reward_metric():
    cfg = VAPIConfig(group_size=4, batch_size=2, lr=1e-4)
    key = vapi_report.run_key({"run": "abc"}, "tok-1", cfg, 3, 20, 7, "ST-LPIPS(alex)", "cpu")
    assert key == {"base": {"run": "abc"}, "tokenizer": "tok-1", "vapi": cfg.to_dict(), "steps": 3,
                   "data": {"dataset": "ShapeScenes-10", "split": "train", "size": 20, "seed": 7},
                   "perceptual": "ST-LPIPS(alex)", "device": "cpu"}
    mse = vapi_report.run_key({}, "tok-1", cfg.replace(reward_terms="mse"), 3, 20, 7, "ST-LPIPS(alex)", "cpu")
    assert mse["perceptual"] == "none"
    assert vapi_report.run_key({}, "tok-1", cfg.replace(lr=2e-4), 3, 20, 7, "P", "cpu") != \
        vapi_report.run_key({}, "tok-1", cfg, 3, 20, 7, "P", "cpu")


def _fake_result(rewards, *, gpu=None, metric="P", train_time_s=2.0) -> dict:
    """What post_train returns, reduced to the fields the study reads."""
    n = len(rewards)
    h = pd.DataFrame({"step": range(1, n + 1), "reward_mean": rewards, "mse_mean": [0.5 - 0.01 * i for i in range(n)],
                      "perceptual_mean": [0.2] * n, "ce": [3.0] * n, "clip_frac": [0.1 * (i % 2) for i in range(n)]})
    return {"history_df": h, "step": n, "train_time_s": train_time_s, "gpu": gpu, "perceptual_metric": metric}


_CFG = VAPIConfig(group_size=4, batch_size=2, lr=1e-4)
STUDY_RUNS = {METHOD: StudyRun("AR", "MSE + perceptual", "method", _CFG, 20),
              MSE_ONLY: StudyRun("AR", "MSE only", "reward ablation", _CFG.replace(reward_terms="mse"), 20),
              "AR + VA-π (lr 0.001, 8 images/step)": StudyRun("AR", "MSE + perceptual", "lr sweep",
                                                              _CFG.replace(lr=1e-3, batch_size=8), 20)}


def _study_results() -> dict:
    rising = [-1.0 + 0.05 * i for i in range(20)]
    return {(METHOD, 0): _fake_result(rising), (METHOD, 1): _fake_result(rising[::-1], gpu="H100"),
            (MSE_ONLY, 0): _fake_result(rising, metric="none"),
            ("AR + VA-π (lr 0.001, 8 images/step)", 0): _fake_result(rising, train_time_s=8.0)}


def test_history_and_runs_tables():
    results = _study_results()
    hist = vapi_report.history_table(results, STUDY_RUNS)
    assert len(hist) == 80 and list(hist.columns[-4:]) == ["run", "vapi_seed", "group", "reward"]
    assert set(hist.loc[hist["run"] == MSE_ONLY, "reward"]) == {"MSE only"}
    assert set(hist.loc[hist["run"] == MSE_ONLY, "group"]) == {"reward ablation"}

    h = results[(METHOD, 0)]["history_df"]
    assert vapi_report.window_mean(h, "reward_mean", True) == pytest.approx((-1.0 - 0.95) / 2)  # 10% of 20 rows
    assert vapi_report.window_mean(h, "reward_mean", False) == pytest.approx((-0.1 - 0.05) / 2)
    assert vapi_report.window_mean(h.head(3), "reward_mean", False) == pytest.approx(-0.9)     # at least one row

    runs = vapi_report.runs_table(results, STUDY_RUNS)
    assert list(zip(runs["run"], runs["vapi_seed"])) == list(results)
    row = runs.iloc[0]
    assert (row["base"], row["group"], row["reward"], row["steps"], row["images/step"], row["G"], row["lr"]) == \
        ("AR", "method", "MSE + perceptual", 20, 2, 4, 1e-4)
    assert (row["control"], row["reward terms"], row["λ_p"], row["update mode"]) == ("full", "both", 1.0, "train")
    assert row["s/step"] == pytest.approx(0.1) and row["GPU"] == "CPU" and runs.iloc[1]["GPU"] == "H100"
    assert row["reward last 10%"] > row["reward first 10%"]  # seed 0 rose, seed 1 fell
    assert runs.iloc[1]["reward last 10%"] < runs.iloc[1]["reward first 10%"]
    assert row["clip fraction (mean)"] == pytest.approx(0.05)
    # Each run's own recipe: the sweep run's batch and lr, the ablation's reward terms.
    sweep = runs.iloc[3]
    assert (sweep["images/step"], sweep["lr"], sweep["s/step"]) == (8, 1e-3, pytest.approx(0.4))
    assert runs.iloc[2]["reward terms"] == "mse"


def test_runs_table_reports_the_reward_terms_spreads():
    results = _study_results()
    runs = vapi_report.runs_table(results, STUDY_RUNS)
    assert runs["MSE within-group std (mean)"].isna().all()  # not logged by these records
    h = results[(METHOD, 0)]["history_df"]
    h["mse_group_std"] = np.linspace(0.01, 0.03, len(h))
    h["perceptual_group_std"] = 0.5
    runs = vapi_report.runs_table(results, STUDY_RUNS)
    assert runs.iloc[0]["MSE within-group std (mean)"] == pytest.approx(0.02)
    assert runs.iloc[0]["perceptual within-group std (mean)"] == pytest.approx(0.5)


# ------------------------------------------------------------------------------------------------------------
# λ_p calibration, CFG setting and the evaluation plan
# ------------------------------------------------------------------------------------------------------------
def _calibration_table(ms: float, ps: float) -> pd.DataFrame:
    return pd.DataFrame([{"model": "AR", "vapi_seed": None, "held-out MSE spread": ms,
                          "held-out P spread": ps, "held-out λ_p": ms / ps if ps > 0 else math.nan,
                          "n images": 16}])


def test_calibrate_lambda_p_rounds_the_balancing_weight():
    cal = vapi_report.calibrate_lambda_p(_calibration_table(0.012, 0.0437), "P", 8)
    assert cal.exact == pytest.approx(0.012 / 0.0437) and cal.lambda_p == 0.27  # 0.2746 to two digits
    assert (cal.mse_spread, cal.perceptual_spread, cal.n_images, cal.samples_per_image) == (0.012, 0.0437, 16, 8)
    assert "λ_p = 0.27 in every run whose reward has both terms" in cal.note
    assert "16 val images x 8 draws" in cal.note and "of P 0.0437" in cal.note
    big = vapi_report.calibrate_lambda_p(_calibration_table(0.5, 0.0123), "P", 8, digits=1)
    assert big.lambda_p == 40.0  # 40.65 to one digit
    # A perceptual term that never varies has no balancing weight: the fallback, said so.
    flat = vapi_report.calibrate_lambda_p(_calibration_table(0.01, 0.0), "P", 8)
    assert math.isnan(flat.exact) and flat.lambda_p == 1.0 and "no balancing weight" in flat.note
    with pytest.raises(ValueError, match="samples_per_image"):
        vapi_report.calibrate_lambda_p(_calibration_table(0.01, 0.02), "P", 1)


def test_cfg_choice_sweeps_until_each_optimum_is_bracketed():
    # AR: FID is lowest at g = 4 with p = 2 (outside the base grid: the sweep grows upward to bracket it) and at
    # g = 1.5 with p = 0; reAR: guidance only hurts, so the best is g = 1 (no guidance).
    curves = {"AR": {0.0: lambda g: 5 + (g - 1.5) ** 2, 2.0: lambda g: 3 + (g - 4.0) ** 2},
              "reAR": {0.0: lambda g: 2 + g, 2.0: lambda g: 2 + 2 * g}}
    calls = []

    def fid_at(name, g, p):
        calls.append((name, g, p))
        return curves[name][p](g)

    ch = vapi_report.cfg_choice(fid_at, ["AR", "reAR"], (1.5, 2.0, 3.0), (0.0, 2.0), 3, "FID on seed 0")
    assert ch.by_model == {"AR": (4.0, 2.0), "reAR": (None, 0.0)}
    assert len(calls) == len(set(calls))  # every setting evaluated once
    assert ("AR", 4.0, 2.0) in calls and ("AR", 5.0, 2.0) in calls  # grown past the optimum: bracketed
    ar, rear = ch.note.split(" | ")
    assert "AR: g=4 p=2" in ar and "p=2: g in {1.5, 2, 3, 4, 5}, best g=4 (FID 3, bracketed)" in ar
    assert "p=0: g in {1, 1.5, 2, 3}, best g=1.5 (FID 5, bracketed)" in ar and "reAR: no guidance" in rear
    # With no room to grow the optimum stays at the edge, and the note says so.
    ch = vapi_report.cfg_choice(fid_at, ["AR"], (1.5, 2.0, 3.0), (2.0,), 0, "FID on seed 0")
    assert ch.by_model == {"AR": (3.0, 2.0)} and "NOT bracketed" in ch.note


def test_eval_items_pair_every_run_with_the_base_at_its_seed():
    runs = {METHOD: StudyRun("AR", "", "method", _CFG, 3), MSE_ONLY: StudyRun("AR", "", "reward ablation", _CFG, 3)}
    models = [("AR", None), (METHOD, 0), (METHOD, 1), (MSE_ONLY, 1)]
    items = vapi_report.eval_items(models, [0, 1], runs)
    assert [(it.model, it.cfg, it.sample_seed) for it in items] == [
        (("AR", None), False, 0), (("AR", None), True, 0), (("AR", None), False, 1), (("AR", None), True, 1),
        ((METHOD, 0), False, 0), ((METHOD, 0), True, 0), ((METHOD, 1), False, 1), ((METHOD, 1), True, 1),
        ((MSE_ONLY, 1), False, 1)]  # the reward ablation without CFG only
    with pytest.raises(ValueError, match="VA-π seed 5"):
        vapi_report.eval_items([(METHOD, 5)], [0, 1], runs)


def test_fid_plan_keeps_the_target_when_it_fits_else_rounds_down():
    fits = vapi_report.plan_fid(100.0, 50.0, 3, 2, 10, 8, 4, 30.0)
    assert fits.per_class == 8 and not fits.reduced
    assert fits.seconds_per_class_sample == pytest.approx(10 * (3 / 100 + 2 / 50))
    # 1000 per class would take 50 s; 29.9 s allow 598, rounded down to a multiple of 10.
    cut = vapi_report.plan_fid(1000.0, 1000.0, 3, 2, 10, 1000, 200, 29.9)
    assert cut.per_class == 590 and cut.reduced
    floor = vapi_report.plan_fid(1.0, 1.0, 3, 2, 10, 8, 4, 30.0)
    assert floor.per_class == 4 and floor.reduced  # never below the minimum


def test_generator_train_time_prefers_the_loaded_record(tmp_path):
    def unused():
        raise AssertionError("the record of the loaded model suffices")

    with_record = SimpleNamespace(zoo_info={"result": {"train_time_s": 12.5, "gpu": "H200"}})
    assert vapi_report.generator_train_time(with_record, unused) == (12.5, "H200")
    (tmp_path / "result.json").write_text(json.dumps({"train_time_s": 3.0, "gpu": None}))
    assert vapi_report.generator_train_time(object(), lambda: tmp_path / "result.json") == (3.0, None)


def test_fid_summary_is_per_model_and_setting_in_order():
    evals = pd.DataFrame({"model": ["B", "B", "A", "A", "A"], "CFG": ["no CFG", "no CFG", "no CFG", "CFG", "no CFG"],
                          "FID": [3.0, 5.0, 1.0, 0.5, 2.0]})
    s = vapi_report.fid_summary(evals, "FID", ["A", "B"])
    assert list(zip(s["model"], s["CFG"])) == [("A", "no CFG"), ("A", "CFG"), ("B", "no CFG")]
    assert s["mean"].tolist() == [1.5, 0.5, 4.0] and s["count"].tolist() == [2, 1, 2]
    assert s["std"].iloc[2] == pytest.approx(math.sqrt(2))


# ------------------------------------------------------------------------------------------------------------
# Claims (rearlib.vapi_claims)
# ------------------------------------------------------------------------------------------------------------
SEEDS = [0, 1, 2]
BASE_AR = [10.0, 10.3, 9.9]  # sampling noise (max - min) 0.4
FIDS = {"AR": BASE_AR, "reAR": [9.0, 9.2, 9.1],
        METHOD: [5.0, 5.4, 4.8], METHOD_REAR: [8.0, 8.3, 8.1],
        PRIOR: [10.01, 10.28, 9.9], SHUFFLED: [9.9, 10.4, 10.0],
        SWEEP[0]: [10.0, 10.2, 9.95], SWEEP[1]: [9.0, 9.4, 8.9], SWEEP[2]: [12.0, 12.5, 11.8],
        MSE_ONLY: [7.0, 7.3, 6.9], PERC_ONLY: [8.0, 8.4, 8.1]}


def _evals(fids: dict[str, list[float]]) -> pd.DataFrame:
    """Evaluations as eval_items plans them: CFG FID one lower; g = 1.5, p = 0 with CFG."""
    rows = []
    for model, values in fids.items():
        base = model in ("AR", "reAR")
        for s, f in zip(SEEDS, values):
            for c in ("no CFG", "CFG"):
                if c == "CFG" and model in (MSE_ONLY, PERC_ONLY):
                    continue
                rows.append({"model": model, "vapi_seed": None if base else s, "CFG": c,
                             "g": 1.5 if c == "CFG" else None, "p": 0.0 if c == "CFG" else None,
                             "sample_seed": s, "FID": f - (c == "CFG")})
    return pd.DataFrame(rows)


def _claim_inputs(smoke: bool = False, heldout_post=(-0.8, -0.85, -0.82), gpu: str = "CPU", **fid_overrides):
    fids = {**FIDS, **fid_overrides}
    runs = vapi_report.study_runs("small", 0.3)
    table = pd.DataFrame([{"run": r, "vapi_seed": s, "reward first 10%": -1.0, "reward last 10%": -0.9 + 0.01 * s,
                           "post-training time (s)": 1.0 + s if runs[r].group != "lr sweep" else 4.0,
                           "GPU": gpu, "steps": runs[r].steps} for r in runs for s in SEEDS])
    heldout = pd.DataFrame({"model": ["AR", *[METHOD] * 3], "vapi_seed": [None, *SEEDS],
                            "held-out reward": [-1.0, *heldout_post], "n images": [64] * 4})
    return {"runs": runs, "runs_table": table, "heldout": heldout, "evals": _evals(fids), "fid_col": "FID",
            "perceptual": "P", "lambda_p": 0.3, "cfg_note": "with CFG, (g, p) per base model: ...",
            "vapi_seeds": SEEDS, "n_fid": 80, "reduced": False, "smoke": smoke, "generator_train_s": 100.0,
            "generator_gpu": None}


def test_seed_fids_sampling_noise_and_difference_text():
    evals = _evals(FIDS)
    assert vapi_claims.seed_fids(evals, "AR", "no CFG", "FID") == dict(zip(SEEDS, BASE_AR))
    assert vapi_claims.seed_fids(evals, "AR", "CFG", "FID") == {0: 9.0, 1: 9.3, 2: 8.9}
    assert vapi_claims.sampling_noise(evals, ["AR", "reAR"], "FID") == pytest.approx(0.4)
    assert math.isnan(vapi_claims.sampling_noise(evals[evals["sample_seed"] == 0], ["AR"], "FID"))
    with pytest.raises(ValueError, match="no CFG evaluation"):
        vapi_claims.seed_fids(evals, "nobody", "no CFG", "FID")
    with pytest.raises(ValueError, match="two no CFG evaluations"):
        vapi_claims.seed_fids(pd.concat([evals, evals]), "AR", "no CFG", "FID")
    v = vapi_claims.compare(evals, "AR", METHOD, "no CFG", "FID", noise=0.4)
    assert v.test == "paired" and v.diff == pytest.approx(np.mean(FIDS[METHOD]) - np.mean(BASE_AR))
    assert vapi_claims.direction(v) == -1 and vapi_claims.difference_text(v).startswith(f"{v.diff:+.3g} [95% CI")
    assert "[97.5% CI" in vapi_claims.difference_text(
        vapi_claims.compare(evals, "AR", METHOD, "no CFG", "FID", noise=0.4, level=0.975))
    one = seed_difference_verdict({0: 1.0}, {0: 2.0}, expected="lower")
    assert vapi_claims.direction(one) == 0 and "no interval" in vapi_claims.difference_text(one)
    assert vapi_claims.capped("reproduced") == "direction reproduced"
    assert vapi_claims.capped("inconclusive") == "inconclusive"
    assert vapi_claims.spread({0: 1.0, 1: 2.0, 2: 3.0}) == "2 ± 1 (1, 2, 3)" and vapi_claims.spread([1.23456]) == "1.235"


def test_claims_when_vapi_lowers_fid_and_the_reward_drives_it():
    rows = vapi_claims.claims(**_claim_inputs())
    assert [r["claim"].split(" (")[0].split(":")[0] for r in rows] == [
        "VA-π post-training raises the reconstruction reward", "VA-π lowers FID without CFG",
        "VA-π lowers FID with CFG", "VA-π lowers FID on top of reAR", "Control", "Control",
        "VA-π lowers FID at some learning rate of a sweep at 128 images x G=8 per step", "Reward composition",
        "VA-π is cheap"]
    assert all(set(r) == {"claim", "paper", "ours", "verdict", "note"} for r in rows)
    main = rows[1]
    # Capped at the direction although the interval excludes 0 (one generator seed, another FID network).
    assert main["verdict"] == "direction reproduced" and vapi_claims.CAP_NOTE in main["note"]
    assert "VA-π lowers FID (-5" in main["ours"] and "the reward drives the change" in main["ours"]
    assert "FID: AR 10.07 ± 0.21 (10, 10.3, 9.9) -> AR + VA-π 5.067 ± 0.31 (5, 5.4, 4.8)" in main["ours"]
    assert "post-training: median 2.0 s on CPU, 2.0% of the AR generator's training" in main["ours"]
    assert "sampling noise (largest |ΔFID| of a base model between sampling seeds) 0.4 without CFG" in main["note"]
    assert "(paired t-interval over the seeds)" in main["note"] and "λ_p = 0.3 (calibrated)" in main["note"]
    assert rows[0]["verdict"] == "direction reproduced" and "rose in 3/3 runs" in rows[0]["ours"]
    assert rows[2]["verdict"] == "direction reproduced" and "g=1.5 p=0" in rows[2]["ours"]
    assert rows[3]["verdict"] == "direction reproduced"
    # The prior-only control stays within the sampling noise: its claim is met.
    assert rows[4]["claim"].startswith("Control: the CE prior alone") and rows[4]["verdict"] == "reproduced"
    assert rows[5]["claim"].startswith("Control: the reward drives") and rows[5]["verdict"] == "direction reproduced"
    # The sweep: lr 3e-6 is lower at the Bonferroni level; each lr is listed.
    assert rows[6]["verdict"] == "direction reproduced" and "FID is lower at lr 3e-6" in rows[6]["note"]
    assert "98.3% (Bonferroni over 3 learning rates)" in rows[6]["note"] and "lr 1e-5: 12.1" in rows[6]["ours"]
    # Composition: both (5.07) against the better single term (MSE only, 7.07).
    assert rows[7]["verdict"] == "direction reproduced" and "better single term ((MSE only))" in rows[7]["note"]
    # Cost: the run and the generator were timed on one kind of hardware (CPU here).
    assert rows[8]["verdict"] == "direction reproduced" and "= 2.0% of the AR generator's" in rows[8]["ours"]


def test_shuffled_control_explains_a_failure_when_full_equals_shuffled():
    # VA-π raises FID, and so does the same update with shuffled rewards; the CE prior alone does not.
    worse = [15.0, 15.6, 14.9]
    rows = vapi_claims.claims(**_claim_inputs(**{METHOD: worse, SHUFFLED: [15.1, 15.5, 15.0]}))
    main, reward = rows[1], rows[5]
    assert main["verdict"] == "not reproduced"
    assert "VA-π raises FID (+5" in main["ours"]
    assert "the full method is no better than the same update with shuffled rewards" in main["ours"]
    assert "so the reward does not drive the change" in main["ours"]
    assert "with shuffled rewards FID rises too" in main["ours"]
    assert "the CE prior alone leaves FID unchanged" in main["ours"]
    assert reward["verdict"] == "inconclusive"
    assert reward["note"].startswith("the reward does not drive the change")
    # Had the prior alone raised FID, the note would say so.
    rows = vapi_claims.claims(**_claim_inputs(**{METHOD: worse, SHUFFLED: [15.1, 15.5, 15.0],
                                                 PRIOR: [13.0, 13.2, 12.9]}))
    assert "the CE prior alone already raises FID" in rows[1]["ours"] and rows[4]["verdict"] == "not reproduced"


def test_every_verdict_outcome_is_reachable():
    seen = set()
    # direction reproduced / reproduced: the defaults (above).
    seen |= {r["verdict"] for r in vapi_claims.claims(**_claim_inputs())}
    # inconclusive: runs that disagree; not reproduced: every run worse.
    mixed = vapi_claims.claims(**_claim_inputs(**{METHOD: [8.0, 12.0, 10.2]}))
    assert mixed[1]["verdict"] == "inconclusive" and "the interval holds 0" in mixed[1]["note"]
    assert "no change of FID is established" in mixed[1]["ours"]
    assert "nor against the same update with shuffled rewards" in mixed[1]["ours"]
    worse = vapi_claims.claims(**_claim_inputs(**{METHOD: [15.0, 15.6, 14.9]}))
    assert worse[1]["verdict"] == "not reproduced"
    # The sweep's three outcomes.
    up = {SWEEP[0]: [12.0, 12.4, 11.9], SWEEP[1]: [13.0, 13.3, 12.9], SWEEP[2]: [14.0, 14.2, 13.8]}
    assert vapi_claims.claims(**_claim_inputs(**up))[6]["verdict"] == "not reproduced"
    flat = {SWEEP[0]: [9.0, 11.0, 10.1], SWEEP[1]: [10.5, 9.6, 10.2], SWEEP[2]: [14.0, 14.2, 13.8]}
    assert vapi_claims.claims(**_claim_inputs(**flat))[6]["verdict"] == "inconclusive"
    # A prior-only run that moves FID beyond the noise: the control fails; one that wanders: inconclusive.
    assert vapi_claims.claims(**_claim_inputs(**{PRIOR: [13.0, 13.2, 12.9]}))[4]["verdict"] == "not reproduced"
    assert vapi_claims.claims(**_claim_inputs(**{PRIOR: [9.5, 10.9, 10.0]}))[4]["verdict"] == "inconclusive"
    # Timings on different hardware are not compared.
    assert vapi_claims.claims(**_claim_inputs(gpu="H100"))[8]["verdict"] == "not tested"
    for rows in (mixed, worse):
        seen |= {r["verdict"] for r in rows}
    seen |= {r["verdict"] for r in vapi_claims.claims(**_claim_inputs(smoke=True))}
    assert seen == set(VERDICTS)


def test_at_smoke_every_verdict_is_not_tested_and_the_rule_is_kept_in_the_note():
    rows = vapi_claims.claims(**_claim_inputs(smoke=True))
    assert {r["verdict"] for r in rows} == {"not tested"}
    assert all(SMOKE_NOTE in r["note"] for r in rows)
    assert "(the rule would give 'direction reproduced')" in rows[1]["note"]


def test_explain_and_sweep_verdict_directly():
    def v(base, variant):
        return seed_difference_verdict(dict(zip(SEEDS, base)), dict(zip(SEEDS, variant)), expected="lower")

    base, same, lower, higher = [10.0, 10.2, 9.9], [10.05, 10.1, 10.0], [8.0, 8.1, 7.9], [12.0, 12.3, 11.9]
    # The reward helps against shuffled rewards but the update still harms.
    text = vapi_claims.explain(v(base, higher), v([14.0, 14.2, 14.1], higher), v(base, [14.0, 14.2, 14.1]),
                               v(base, same))
    assert text.startswith("VA-π raises FID") and "but not enough to beat the base model" in text
    # A gain that the shuffled control matches does not come from the reward.
    text = vapi_claims.explain(v(base, lower), v(lower, lower), v(base, lower), v(base, same))
    assert "VA-π lowers FID" in text and "the reward does not drive the change" in text
    verdict, reason = vapi_claims.sweep_verdict({1e-6: v(base, same), 1e-5: v(base, lower)})
    assert (verdict, reason) == ("direction reproduced", "FID is lower at lr 1e-5")
    assert vapi_claims.sweep_verdict({1e-6: v(base, higher)})[0] == "not reproduced"
    assert vapi_claims.sweep_verdict({1e-6: v(base, higher), 1e-5: v(base, same)})[0] == "inconclusive"


# ------------------------------------------------------------------------------------------------------------
# Figures
# ------------------------------------------------------------------------------------------------------------
@pytest.fixture
def agg_backend():
    before = plt.get_backend()
    plt.switch_backend("Agg")
    yield
    plt.close("all")
    plt.switch_backend(before)


def test_figures_draw_what_they_are_given(agg_backend):
    results = _study_results()
    seeds = [0, 1]
    results[(MSE_ONLY, 1)] = results[(MSE_ONLY, 0)]
    fig = vapi_figures.reward_curves(results, [METHOD, MSE_ONLY], seeds, "P", window=2, scale="smoke", cfg=_CFG)
    axes = fig.axes
    assert len(axes) == 4 and axes[2].get_ylabel() == "perceptual distance (P)"
    assert [len(ax.lines) for ax in axes] == [2, 2, 1, 2]  # the MSE-only run has no perceptual line
    mean_line = axes[0].lines[0].get_ydata()
    assert mean_line[0] == pytest.approx((-1.0 + -0.05) / 2)  # the mean of the two seeds' first moving mean

    evals = pd.DataFrame({"model": ["AR", "AR", "B", "B", "C"], "CFG": ["no CFG", "CFG", "no CFG", "CFG", "no CFG"],
                          "FID": [3.0, 2.0, 4.0, 1.0, 5.0], "IS": [1.0, 1.1, 1.2, 1.3, 1.4],
                          "cc": [0.1, 0.2, 0.3, 0.4, 0.5]})
    fig = vapi_figures.before_after(evals, ["AR", "B", "C"], ("FID", "cc", "IS"), ("no CFG", "CFG"), "title")
    assert [ax.get_ylabel() for ax in fig.axes] == ["FID", "cc", "IS"]  # stacked, one per metric
    assert all(len(ax.collections) == 4 for ax in fig.axes)  # points and mean bars of both CFG settings
    assert [t.get_text() for t in fig.axes[-1].get_xticklabels()] == ["AR", "B", "C"]
    no_cfg_points = fig.axes[0].collections[0].get_offsets()
    assert sorted(np.asarray(no_cfg_points)[:, 1].tolist()) == [3.0, 4.0, 5.0]

    grids = {"a": torch.rand(6, 3, 8, 8), "b": torch.rand(6, 3, 8, 8)}
    fig = vapi_figures.sample_grids(grids, 3, "samples")
    assert [ax.get_title() for ax in fig.axes] == ["a", "b"] and fig._suptitle.get_text() == "samples"
    assert fig.axes[0].images[0].get_array().shape[:2] == (2 * 9 + 1, 3 * 9 + 1)  # 2 rows x 3, 1-pixel padding
