"""The claims of the VA-π study (notebook 09) and their verdicts, from the tables of :mod:`rearlib.vapi_report`.

The repeated unit is the VA-π run: every setting is post-trained once per VA-π seed, and the run of seed s is
evaluated at sampling seed s, as is the base generator (:func:`rearlib.vapi_report.eval_items`). A difference
between two models is therefore paired by seed, and judged by :func:`rearlib.experiments.verdicts.
seed_difference_verdict` (its t-interval over the seeds, the sampling noise reported beside it). Two limits hold
for every verdict against the paper: there is one generator training seed, and FID here is measured with another
feature network on another dataset, so no magnitude is compared and a verdict stops at "direction reproduced".

When VA-π does not lower FID, the controls say why (:func:`explain`): the same update with the rewards shuffled
across the batch tells whether the reward drives the change, and the update with the CE prior alone tells
whether the prior does.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from rearlib.experiments.verdicts import (
    SMOKE_NOTE,
    SeedVerdict,
    final,
    insensitivity_verdict,
    join_notes,
    seed_difference_verdict,
    smoke_note,
)
from rearlib.vapi_report import (
    ABLATION_RUNS,
    CONTROL_RUNS,
    METHOD,
    METHOD_REAR,
    StudyRun,
    lr_label,
)

__all__ = [
    "NO_CFG",
    "SMOKE_NOTE",
    "WITH_CFG",
    "capped",
    "claims",
    "compare",
    "difference_text",
    "direction",
    "explain",
    "sampling_noise",
    "seed_fids",
    "spread",
    "sweep_verdict",
]

NO_CFG, WITH_CFG = "no CFG", "CFG"
PRIOR_ONLY, SHUFFLED = CONTROL_RUNS["prior_only"], CONTROL_RUNS["shuffled_rewards"]
CAP_NOTE = ("verdicts against the paper stop at 'direction reproduced': one generator training seed, and neither "
            "the paper's data nor its model scale")


def spread(x) -> str:
    """'mean' for one value, else 'mean ± sd (run values)'."""
    x = np.asarray(list(x.values()) if isinstance(x, dict) else x, dtype=float)
    if len(x) == 1:
        return f"{x[0]:.4g}"
    return f"{x.mean():.4g} ± {x.std(ddof=1):.2g} ({', '.join(f'{v:.3g}' for v in x)})"


def seed_fids(evals: pd.DataFrame, model: str, cfg: str, fid_col: str) -> dict[int, float]:
    """{sampling seed: FID} of ``model`` under ``cfg`` ("no CFG" or "CFG"), ordered by seed."""
    sel = evals[(evals["model"] == model) & (evals["CFG"] == cfg)].sort_values("sample_seed")
    if sel.empty:
        raise ValueError(f"no {cfg} evaluation of {model!r}")
    if sel["sample_seed"].duplicated().any():
        raise ValueError(f"{model!r} has two {cfg} evaluations at one sampling seed")
    return {int(s): float(v) for s, v in zip(sel["sample_seed"], sel[fid_col])}


def sampling_noise(evals: pd.DataFrame, base_models, fid_col: str, cfg: str = NO_CFG) -> float:
    """The largest FID change of a base model between its sampling seeds under ``cfg`` (NaN with one seed)."""
    rows = evals[(evals["CFG"] == cfg) & evals["model"].isin(list(base_models))]
    per_model = rows.groupby("model")[fid_col].agg(lambda s: s.max() - s.min() if len(s) > 1 else math.nan)
    return float(per_model.max()) if per_model.notna().any() else math.nan


def compare(evals: pd.DataFrame, baseline: str, variant: str, cfg: str, fid_col: str, *, noise: float,
            expected: str = "lower", level: float = 0.95) -> SeedVerdict:
    """The rule's verdict (never smoke-capped: the caller applies the scale) on variant - baseline, paired by
    sampling seed."""
    return seed_difference_verdict(seed_fids(evals, baseline, cfg, fid_col), seed_fids(evals, variant, cfg, fid_col),
                                   expected=expected, level=level,
                                   sampling_noise=noise if math.isfinite(noise) else None)


def direction(v: SeedVerdict) -> int:
    """-1 when the interval of variant - baseline lies below 0, +1 above, 0 when it holds 0 or does not exist."""
    if v.hi < 0:
        return -1
    if v.lo > 0:
        return 1
    return 0


def capped(verdict: str) -> str:
    """A verdict against the paper: at most "direction reproduced" (see the module docstring)."""
    return "direction reproduced" if verdict == "reproduced" else verdict


def difference_text(v: SeedVerdict) -> str:
    """'+1.2 [95% CI +0.4, +2]', or the difference alone when there is no interval."""
    if v.test == "none":
        return f"{v.diff:+.3g} (one seed on a side: no interval)"
    return f"{v.diff:+.3g} [{100 * v.level:.3g}% CI {v.lo:+.3g}, {v.hi:+.3g}]"


def explain(full_vs_base: SeedVerdict, full_vs_shuffled: SeedVerdict, shuffled_vs_base: SeedVerdict,
            prior_vs_base: SeedVerdict) -> str:
    """Which part of the update moves FID, read off the controls (all differences are FID, variant - baseline)."""
    d_full, d_reward = direction(full_vs_base), direction(full_vs_shuffled)
    d_shuffled, d_prior = direction(shuffled_vs_base), direction(prior_vs_base)
    if d_reward == -1:
        reward = (f"the reward drives the change: the full method's FID is {difference_text(full_vs_shuffled)} "
                  f"against the same update with shuffled rewards")
    else:
        reward = (f"the full method is no better than the same update with shuffled rewards "
                  f"({difference_text(full_vs_shuffled)}), so the reward does not drive the change")
    if d_prior == 1:
        prior = (f"the CE prior alone already raises FID ({difference_text(prior_vs_base)}): the prior's update at "
                 f"this learning rate accounts for at least part of it")
    elif d_prior == -1:
        prior = f"the CE prior alone lowers FID ({difference_text(prior_vs_base)})"
    else:
        prior = (f"the CE prior alone leaves FID unchanged within its interval ({difference_text(prior_vs_base)}), "
                 f"so the change comes from the policy-gradient step")
    shuffled = (f"with shuffled rewards FID rises too ({difference_text(shuffled_vs_base)}): the step itself, not "
                f"the reward's content, does the harm") if d_shuffled == 1 else ""
    if d_full == -1:
        head = f"VA-π lowers FID ({difference_text(full_vs_base)})"
        return join_notes(head, reward, prior if d_reward != -1 else "")
    if d_full == 1:
        head = f"VA-π raises FID ({difference_text(full_vs_base)})"
        if d_reward == -1:
            return join_notes(head, f"{reward}, but not enough to beat the base model", shuffled, prior)
        return join_notes(head, reward, shuffled, prior)
    head = f"no change of FID is established ({difference_text(full_vs_base)})"
    if d_reward == -1:
        versus = f"though it is lower than with shuffled rewards ({difference_text(full_vs_shuffled)})"
    else:
        versus = f"nor against the same update with shuffled rewards ({difference_text(full_vs_shuffled)})"
    return join_notes(head, versus, prior if d_prior != 0 else "")


def sweep_verdict(verdicts: dict[float, SeedVerdict]) -> tuple[str, str]:
    """(verdict, reason) of "some learning rate of the sweep lowers FID", each lr judged at a Bonferroni level:
    "direction reproduced" when one lr's interval lies below 0, "not reproduced" when every lr's lies above,
    else "inconclusive"."""
    dirs = {lr: direction(v) for lr, v in verdicts.items()}
    lower = [lr_label(lr) for lr, d in dirs.items() if d == -1]
    if lower:
        return "direction reproduced", f"FID is lower at lr {', '.join(lower)}"
    if all(d == 1 for d in dirs.values()):
        return "not reproduced", "FID is higher at every learning rate"
    return "inconclusive", "no learning rate lowers FID beyond its interval"


def _runs(runs_table: pd.DataFrame, run: str) -> pd.DataFrame:
    return runs_table[runs_table["run"] == run].sort_values("vapi_seed")


def _cost(runs_table: pd.DataFrame, run: str, generator_train_s: float | None) -> tuple[float, float, set]:
    """(median post-training seconds over the VA-π seeds, its fraction of the generator's training, GPUs)."""
    rows = _runs(runs_table, run)
    # The median, so that one slow run (for instance the first in a process) does not decide.
    t = float(np.median(rows["post-training time (s)"].to_numpy(dtype=float)))
    return t, (t / generator_train_s if generator_train_s else math.nan), set(rows["GPU"])


def claims(*, runs: dict[str, StudyRun], runs_table: pd.DataFrame, heldout: pd.DataFrame, evals: pd.DataFrame,
           fid_col: str, perceptual: str, lambda_p: float, cfg_note: str, vapi_seeds: list[int], n_fid: int,
           reduced: bool, smoke: bool, generator_train_s: float | None,
           generator_gpu: str | None) -> list[dict[str, Any]]:
    """The notebook's claims, each a dict of ``claim``, ``paper``, ``ours``, ``verdict`` and ``note``.

    ``runs``: :func:`rearlib.vapi_report.study_runs`; ``runs_table``: :func:`~rearlib.vapi_report.runs_table`;
    ``heldout``: :func:`~rearlib.vapi_report.heldout_table` (one draw per image); ``evals``: one row per FID
    evaluation with columns model, vapi_seed, CFG ("no CFG" / "CFG"), g, p, sample_seed and ``fid_col``, as
    :func:`~rearlib.vapi_report.eval_items` plans them. At smoke scale every verdict is "not tested" and the note
    keeps what the rule would have said.
    """
    cfg = runs[METHOD].cfg
    noise = {c: sampling_noise(evals, ("AR", "reAR"), fid_col, c) for c in (NO_CFG, WITH_CFG)}
    common = join_notes(
        f"one generator training seed; {len(vapi_seeds)} VA-π runs per setting (seeds {vapi_seeds}), the run of "
        f"seed s evaluated at sampling seed s as the base model is, so differences pair by seed "
        f"({{test}} t-interval over the seeds)",
        f"sampling noise (largest |ΔFID| of a base model between sampling seeds) {noise[NO_CFG]:.3g} without CFG, "
        f"{noise[WITH_CFG]:.3g} with CFG; {n_fid} samples per evaluation" + (" (reduced to fit the budget)"
                                                                             if reduced else ""),
        f"VA-π: {runs[METHOD].steps} steps x {cfg.batch_size} images x G={cfg.group_size}, lr {lr_label(cfg.lr)}, "
        f"update in {cfg.update_mode} mode; reward -(MSE + λ_p · {perceptual}), λ_p = {lambda_p:g} (calibrated)",
        CAP_NOTE)

    def row(claim: str, paper: str, ours: str, verdict: str, *notes: str, test: str = "paired") -> dict[str, Any]:
        return {"claim": claim, "paper": paper, "ours": ours, "verdict": final(verdict, smoke),
                "note": join_notes(*notes, common.replace("{test}", test), smoke_note(verdict, smoke))}

    def fids(model: str, c: str = NO_CFG) -> dict[int, float]:
        return seed_fids(evals, model, c, fid_col)

    def cmp(base: str, variant: str, c: str = NO_CFG, **kw) -> SeedVerdict:
        return compare(evals, base, variant, c, fid_col, noise=noise[c], **kw)

    out = []
    # Held-out reward: the base model is scored once with the same draws as every post-trained one.
    ho_base = float(heldout.loc[heldout["model"] == "AR", "held-out reward"].iloc[0])
    post_rows = heldout[heldout["model"] == METHOD].sort_values("vapi_seed")
    ho_post = {int(s): float(r) for s, r in zip(post_rows["vapi_seed"], post_rows["held-out reward"])}
    v = seed_difference_verdict({s: ho_base for s in ho_post}, ho_post, expected="higher")
    tr = _runs(runs_table, METHOD)
    n_rose = int((tr["reward last 10%"] > tr["reward first 10%"]).sum())
    out.append(row(
        "VA-π post-training raises the reconstruction reward",
        "Fig. 5: the reward rises steadily over post-training (100 steps, C2I)",
        f"AR + VA-π, held-out reward -(MSE + {lambda_p:g} · {perceptual}) on {int(heldout['n images'].iloc[0])} val "
        f"images: AR {ho_base:.4g} -> {spread(ho_post)}, difference {difference_text(v)}; training-batch reward "
        f"{spread(tr['reward first 10%'])} (first 10% of steps) -> {spread(tr['reward last 10%'])} (last 10%), rose "
        f"in {n_rose}/{len(tr)} runs",
        capped(v.verdict), v.reason, "the held-out reward is judged; the training curve is shown", test=v.test))

    full, full_cfg = cmp("AR", METHOD), cmp("AR", METHOD, WITH_CFG)
    vs_shuffled, shuffled = cmp(SHUFFLED, METHOD), cmp("AR", SHUFFLED)
    prior = cmp("AR", PRIOR_ONLY)
    why = explain(full, vs_shuffled, shuffled, prior)
    t_vapi, frac, gpus = _cost(runs_table, METHOD, generator_train_s)
    cost = (f"post-training: median {t_vapi:.1f} s on {', '.join(sorted(gpus))}, {frac:.1%} of the AR generator's "
            f"training ({generator_train_s or math.nan:.0f} s on {generator_gpu or 'CPU'})")
    out.append(row(
        "VA-π lowers FID without CFG",
        "Table 2: LlamaGen-XXL 14.36 -> 7.65, LlamaGen-XL 15.55 -> 9.23 (Inception FID, 50k)",
        f"{fid_col}: AR {spread(fids('AR'))} -> AR + VA-π {spread(fids(METHOD))}; {why}; {cost}",
        capped(full.verdict), full.reason, test=full.test))
    g = evals.loc[(evals["model"] == "AR") & (evals["CFG"] == WITH_CFG), ["g", "p"]].iloc[0]
    out.append(row(
        "VA-π lowers FID with CFG",
        "Table 2: XXL (cfg 1.75) 2.37 -> 2.28; but XL (cfg 2.0) 2.79 -> 2.94 (worse)",
        f"{fid_col}, g={g['g']:g} p={g['p']:g}: AR {spread(fids('AR', WITH_CFG))} -> AR + VA-π "
        f"{spread(fids(METHOD, WITH_CFG))}, difference {difference_text(full_cfg)}",
        capped(full_cfg.verdict), full_cfg.reason, cfg_note,
        "judged against the XXL direction (the paper's own XL row goes the other way)", test=full_cfg.test))

    rear, rear_cfg = cmp("reAR", METHOD_REAR), cmp("reAR", METHOD_REAR, WITH_CFG)
    out.append(row(
        "VA-π lowers FID on top of reAR (both attack the generator-tokenizer gap)",
        "not reported (VA-π post-trains LlamaGen; reAR has no post-training); judged against the method's premise",
        f"{fid_col} no CFG: reAR {spread(fids('reAR'))} -> reAR + VA-π {spread(fids(METHOD_REAR))}, difference "
        f"{difference_text(rear)}; with CFG: {spread(fids('reAR', WITH_CFG))} -> "
        f"{spread(fids(METHOD_REAR, WITH_CFG))}, difference {difference_text(rear_cfg)}",
        capped(rear.verdict), "verdict without CFG", rear.reason, test=rear.test))

    # The prior-only control: "no change" needs its whole interval inside the sampling noise.
    margin = noise[NO_CFG]
    if math.isfinite(margin) and margin > 0:
        iv = insensitivity_verdict(fids("AR"), fids(PRIOR_ONLY), margin=margin)
        verdict, reason = iv.verdict, iv.reason
    else:
        verdict, reason = "not tested", "no sampling noise measured, so no margin"
    out.append(row(
        "Control: the CE prior alone leaves FID at the base model's",
        "Table 4 row c (XXL, no CFG, CE prior without a reward): 14.36 -> 14.17; the full method 7.65",
        f"{fid_col} no CFG: AR {spread(fids('AR'))} -> AR + VA-π (CE prior only) {spread(fids(PRIOR_ONLY))}, "
        f"difference {difference_text(prior)}, margin ±{margin:.3g} (the sampling noise)",
        verdict, reason, test=prior.test))
    out.append(row(
        "Control: the reward drives the change (the full method beats the same update with shuffled rewards)",
        "implied by Table 4 (CE prior alone 14.17, with the reward 7.65); a shuffled-reward control is not reported",
        f"{fid_col} no CFG: AR + VA-π {spread(fids(METHOD))} vs AR + VA-π (shuffled rewards) "
        f"{spread(fids(SHUFFLED))}, difference {difference_text(vs_shuffled)}; shuffled rewards vs AR "
        f"{spread(fids('AR'))}: {difference_text(shuffled)}",
        capped(vs_shuffled.verdict),
        "" if direction(vs_shuffled) == -1 else "the reward does not drive the change: the same update with shuffled "
                                                "rewards gives the full method's FID or better",
        vs_shuffled.reason, test=vs_shuffled.test))

    sweep = {r: s for r, s in runs.items() if s.group == "lr sweep"}
    level = 1 - 0.05 / len(sweep)
    sv = {s.cfg.lr: cmp("AR", r, level=level) for r, s in sweep.items()}
    scfg = next(iter(sweep.values()))
    verdict, reason = sweep_verdict(sv)
    t_sweep, frac_sweep, _ = _cost(runs_table, next(iter(sweep)), generator_train_s)
    out.append(row(
        f"VA-π lowers FID at some learning rate of a sweep at {scfg.cfg.batch_size} images x G={scfg.cfg.group_size} "
        f"per step",
        "released recipe: lr 1e-6 constant, 128 images x G=8, 100 steps (LlamaGen-XXL, 1.4B): 14.36 -> 7.65",
        f"{fid_col} no CFG, {scfg.steps} steps: AR {spread(fids('AR'))}; "
        + "; ".join(f"lr {lr_label(s.cfg.lr)}: {spread(fids(r))}, difference {difference_text(sv[s.cfg.lr])}"
                    for r, s in sweep.items())
        + f"; post-training median {t_sweep:.1f} s per run at lr {lr_label(scfg.cfg.lr)} ({frac_sweep:.1%} of the "
          f"generator's training)",
        verdict, reason, f"each lr's interval at {level:.1%} (Bonferroni over {len(sweep)} learning rates)",
        test=next(iter(sv.values())).test))

    singles = (ABLATION_RUNS["mse"], ABLATION_RUNS["perceptual"])
    best = min(singles, key=lambda r: np.mean(list(fids(r).values())))
    both = cmp(best, METHOD)
    out.append(row(
        "Reward composition: MSE + perceptual beats either term alone",
        "Table 4 (XXL, no CFG, without the CE prior): MSE + LPIPS 38.63 vs one term 38.76 (which term is not "
        "recoverable); full method with CE prior 7.65; single-term runs with the prior not reported",
        f"{fid_col} no CFG (all with the CE prior): MSE only {spread(fids(singles[0]))}, perceptual only "
        f"{spread(fids(singles[1]))}, both {spread(fids(METHOD))} (AR before: {spread(fids('AR'))}); both - "
        f"{best.removeprefix('AR + VA-π ')}: {difference_text(both)}",
        capped(both.verdict), both.reason, f"judged against the better single term ({best.removeprefix('AR + VA-π ')})",
        f"λ_p = {lambda_p:g} gives the two terms the same within-group spread on the base AR", test=both.test))

    same_hw = len(gpus) == 1 and (generator_gpu or "CPU") in gpus
    out.append({
        "claim": "VA-π is cheap: a short post-training next to training the generator",
        "paper": "100 steps, 12.8k images (~1% of ImageNet), 25 min on 8xA100 for LlamaGen-XXL (20 min XL); "
                 "13.4% of AR-GRPO's time",
        "ours": f"AR + VA-π: median {t_vapi:.1f} s for {int(tr['steps'].iloc[0])} steps over {len(tr)} runs "
                f"({', '.join(f'{t:.1f}' for t in tr['post-training time (s)'])} s) on {', '.join(sorted(gpus))} = "
                f"{frac:.1%} of the AR generator's training time ({generator_train_s or math.nan:.0f} s on "
                f"{generator_gpu or 'CPU'})",
        "verdict": "not tested" if smoke or not same_hw or not math.isfinite(frac) else
                   ("direction reproduced" if frac < 0.10 else "not reproduced"),
        "note": join_notes("threshold: under 10% of the generator's training time on the same hardware; each run's "
                           "time is its sum of step times (a cached run reports the run that did the work); AR-GRPO "
                           "is not implemented here, so the 13.4% comparison is not tested",
                           SMOKE_NOTE if smoke else ""),
    })
    return out
