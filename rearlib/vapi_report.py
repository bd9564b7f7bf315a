"""The VA-π study of notebook 09: which runs it makes, its tables, the held-out reconstruction check, the λ_p
calibration, the CFG setting and the sample budget of the FID evaluations. The claims and their verdicts are in
:mod:`rearlib.vapi_claims`, the figures in :mod:`rearlib.vapi_figures`.

The study post-trains generators under several settings ("runs", :func:`study_runs`), each once per VA-π seed.
Throughout, ``runs`` maps a run name to its :class:`StudyRun` and ``results`` maps ``(run, vapi_seed)`` to the dict
:func:`rearlib.vapi.post_train` returned. Models are named ``(name, vapi_seed)``; a base generator ("AR", "reAR")
has no VA-π seed (None).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import pandas as pd
import torch

from rearlib import scales
from rearlib.data import render_batch
from rearlib.experiments.studies_plan import best_guidance, sweep_state
from rearlib.vapi_config import VAPIConfig, config_for_scale, lr_sweep_configs
from rearlib.vapi_rewards import heldout_reconstruction_reward

# ----------------------------------------------------------------------------------------------------------------
# Runs
# ----------------------------------------------------------------------------------------------------------------
#: The base generators the study post-trains, by model name: the zoo variant.
BASE_VARIANTS = {"AR": "ar", "reAR": "rear"}
METHOD = "AR + VA-π"
METHOD_REAR = "reAR + VA-π"
#: The run of each control of :data:`rearlib.vapi_config.CONTROLS` ("full" is the method itself).
CONTROL_RUNS = {"full": METHOD, "prior_only": "AR + VA-π (CE prior only)",
                "shuffled_rewards": "AR + VA-π (shuffled rewards)"}
#: The run of each reward composition; "both" is the method itself.
ABLATION_RUNS = {"mse": "AR + VA-π (MSE only)", "perceptual": "AR + VA-π (perceptual only)", "both": METHOD}
GROUPS = ("method", "control", "lr sweep", "reward ablation")


class StudyRun(NamedTuple):
    """One setting of the study: the base model's name, a label of the reward the update uses, the group
    (:data:`GROUPS`), the VA-π config (its ``seed`` is replaced by each VA-π seed) and the number of steps."""

    base: str
    reward: str
    group: str
    cfg: VAPIConfig
    steps: int


def lr_label(lr: float) -> str:
    """'1e-6', '3e-5', '0.0001': a learning rate as people write it."""
    return f"{lr:g}".replace("e-0", "e-")


def sweep_run_name(lr: float, images_per_step: int) -> str:
    return f"AR + VA-π (lr {lr_label(lr)}, {images_per_step} images/step)"


def study_runs(scale: str, lambda_p: float, **overrides: Any) -> dict[str, StudyRun]:
    """Every run of notebook 09 at ``scale``, in execution order.

    * method: "AR + VA-π" and "reAR + VA-π", the scale's config (:data:`rearlib.scales.VAPI`) with the reward
      -(MSE + ``lambda_p`` · perceptual);
    * controls on AR (the scale's ``controls`` other than "full"): "AR + VA-π (CE prior only)" and
      "AR + VA-π (shuffled rewards)", the method's config and seeds but for ``control``;
    * learning-rate sweep on AR: one run per lr of the scale's ``lr_sweep`` with its ``sweep_config`` (at small,
      the paper's batch: 128 images x G = 8) for ``sweep_steps`` steps;
    * reward ablation on AR: MSE only and perceptual only ("both" is the method run itself).

    ``overrides`` are VAPIConfig fields applied to every run (e.g. ``seed``).
    """
    if not (math.isfinite(lambda_p) and lambda_p > 0):
        raise ValueError(f"lambda_p must be a finite number > 0, got {lambda_p!r}")
    entry = scales.VAPI[scale]
    both = f"MSE + {lambda_p:g} · perceptual"
    cfg = config_for_scale(scale, reward_terms="both", reward_perceptual_weight=lambda_p, **overrides)
    steps = entry["steps"]
    runs = {METHOD: StudyRun("AR", both, "method", cfg, steps),
            METHOD_REAR: StudyRun("reAR", both, "method", cfg, steps)}
    control_reward = {"prior_only": "none (CE prior only)", "shuffled_rewards": f"{both}, shuffled across the batch"}
    for control in entry["controls"]:
        if control != "full":
            runs[CONTROL_RUNS[control]] = StudyRun("AR", control_reward[control], "control",
                                                   cfg.replace(control=control), steps)
    sweep = lr_sweep_configs(scale, reward_terms="both", reward_perceptual_weight=lambda_p, **overrides)
    for lr, c in sweep.items():
        runs[sweep_run_name(lr, c.batch_size)] = StudyRun("AR", both, "lr sweep", c, entry["sweep_steps"])
    for terms, label in (("mse", "MSE only"), ("perceptual", "perceptual only")):
        runs[ABLATION_RUNS[terms]] = StudyRun("AR", label, "reward ablation", cfg.replace(reward_terms=terms), steps)
    return runs


def run_key(base: dict, tokenizer_identity: Any, cfg: VAPIConfig, steps: int, data_size: int, data_seed: int,
            perceptual: str, device_type: str) -> dict[str, Any]:
    """The artifact key of one post-training run: base generator, tokenizer, VA-π config and steps, the training
    images (ShapeScenes-10 train split), the perceptual metric of the reward ("none" without a perceptual term)
    and the device type."""
    return {"base": base, "tokenizer": tokenizer_identity, "vapi": cfg.to_dict(), "steps": steps,
            "data": {"dataset": "ShapeScenes-10", "split": "train", "size": data_size, "seed": data_seed},
            "perceptual": perceptual if cfg.uses_perceptual else "none", "device": device_type}


def history_table(results: dict[tuple, dict], runs: dict[str, StudyRun]) -> pd.DataFrame:
    """Every logged step of every run, with columns ``run``, ``vapi_seed``, ``group`` and ``reward`` (its label)."""
    return pd.concat([r["history_df"].assign(run=run, vapi_seed=vseed, group=runs[run].group,
                                             reward=runs[run].reward)
                      for (run, vseed), r in results.items()], ignore_index=True)


def window_mean(h: pd.DataFrame, col: str, first: bool, frac: float = 0.1) -> float:
    """Mean of ``col`` over the first (``first``) or last ``frac`` of the rows of ``h`` (at least one row)."""
    n = max(1, int(len(h) * frac))
    return float((h.head(n) if first else h.tail(n))[col].mean())


def _mean_or_nan(h: pd.DataFrame, col: str) -> float:
    """Mean of column ``col`` of ``h``; NaN when the records do not log it."""
    return float(h[col].mean()) if col in h else math.nan


def runs_table(results: dict[tuple, dict], runs: dict[str, StudyRun]) -> pd.DataFrame:
    """One row per (run, VA-π seed): the recipe, the post-training time, the reward, MSE and CE over the first
    and last 10% of the steps, and the mean within-group spread of each reward term (NaN where not logged)."""
    rows = []
    for (run, vseed), r in results.items():
        h, spec = r["history_df"], runs[run]
        cfg = spec.cfg
        rows.append({
            "run": run, "vapi_seed": vseed, "base": spec.base, "group": spec.group, "reward": spec.reward,
            "control": cfg.control, "reward terms": cfg.reward_terms, "λ_p": cfg.reward_perceptual_weight,
            "steps": r["step"], "images/step": cfg.batch_size, "G": cfg.group_size, "lr": cfg.lr,
            "update mode": cfg.update_mode,
            "post-training time (s)": r["train_time_s"], "s/step": r["train_time_s"] / max(1, r["step"]),
            "GPU": r.get("gpu") or "CPU", "perceptual metric": r["perceptual_metric"],
            "reward first 10%": window_mean(h, "reward_mean", True),
            "reward last 10%": window_mean(h, "reward_mean", False),
            "MSE first 10%": window_mean(h, "mse_mean", True), "MSE last 10%": window_mean(h, "mse_mean", False),
            "CE first 10%": window_mean(h, "ce", True), "CE last 10%": window_mean(h, "ce", False),
            "clip fraction (mean)": float(h["clip_frac"].mean()),
            "MSE within-group std (mean)": _mean_or_nan(h, "mse_group_std"),
            "perceptual within-group std (mean)": _mean_or_nan(h, "perceptual_group_std"),
        })
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------------------------------------------
# What the reward measures, on held-out images
# ----------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def heldout_images(tokenizer, n: int, data_seed: int, device, chunk: int = 250
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The first ``n`` validation images of the embedded dataset at the tokenizer's resolution: (images, labels,
    GT tokens [n, N]), encoded ``chunk`` images at a time."""
    images, labels = render_batch(torch.arange(n), tokenizer.resolution, seed=data_seed, split="val", device=device)
    seq_len = math.prod(tokenizer.grid_size)
    tokens = torch.cat([tokenizer.encode(images[i:i + chunk]).reshape(-1, seq_len) for i in range(0, n, chunk)])
    return images, labels, tokens


def heldout_reconstruction(model, tokenizer, images: torch.Tensor, labels: torch.Tensor, tokens: torch.Tensor,
                           cfg: VAPIConfig, perceptual_fn: Callable | None, perceptual: str, *, seed: int,
                           batch: int = 250, samples_per_image: int = 1) -> dict[str, float]:
    """Means over held-out images of :func:`rearlib.vapi_rewards.heldout_reconstruction_reward` (teacher-forced
    draws from the true prefix, decoded and scored under ``cfg``; every model scored with the same ``seed`` gets the
    same random numbers).

    Returns ``held-out MSE``, ``held-out {perceptual}`` (the perceptual distance), ``held-out reward`` (the reward
    ``cfg`` defines: its terms and weights), ``held-out CE`` and ``held-out CTR`` (argmax = true token) of the GT
    tokens; with ``samples_per_image`` > 1 also each term's mean within-image spread (``held-out MSE spread``,
    ``held-out {perceptual} spread``) and ``held-out λ_p`` (the perceptual weight that equalises them; NaN where
    the perceptual term does not vary).
    """
    res = heldout_reconstruction_reward(model, tokenizer, images, labels, tokens, cfg, perceptual_fn, seed=seed,
                                        samples_per_image=samples_per_image, batch=batch)
    out = {"held-out MSE": float(res.mse.mean()), f"held-out {perceptual}": float(res.perceptual.mean()),
           "held-out reward": float(res.rewards.mean()), "held-out CE": float(res.ce.mean()),
           "held-out CTR": float(res.ctr.mean())}
    if samples_per_image > 1:
        ms = float(res.mse.std(1, correction=1).mean())
        ps = float(res.perceptual.std(1, correction=1).mean())
        out.update({"held-out MSE spread": ms, f"held-out {perceptual} spread": ps,
                    "held-out λ_p": ms / ps if ps > 0 else math.nan})
    return out


def heldout_table(models: dict[tuple, Any], tokenizer, images: torch.Tensor, labels: torch.Tensor,
                  tokens: torch.Tensor, cfg: VAPIConfig, perceptual_fn: Callable | None, perceptual: str, *,
                  seed: int, samples_per_image: int = 1) -> pd.DataFrame:
    """:func:`heldout_reconstruction` of every model of ``models`` ({(name, vapi_seed or None): model}), one row
    each, with the number of images."""
    table = pd.DataFrame([{"model": name, "vapi_seed": vseed,
                           **heldout_reconstruction(m, tokenizer, images, labels, tokens, cfg, perceptual_fn,
                                                    perceptual, seed=seed, samples_per_image=samples_per_image)}
                          for (name, vseed), m in models.items()])
    table["vapi_seed"] = table["vapi_seed"].astype("Int64")
    table["n images"] = len(tokens)
    return table


# ----------------------------------------------------------------------------------------------------------------
# How many samples an FID evaluation gets
# ----------------------------------------------------------------------------------------------------------------
class FIDPlan(NamedTuple):
    """Samples per class of every FID evaluation, the estimated generation seconds per sample of each class
    (summed over all planned evaluations), and whether the target had to be lowered to fit the budget."""

    per_class: int
    seconds_per_class_sample: float
    reduced: bool


def plan_fid(images_per_s_nocfg: float, images_per_s_cfg: float, n_nocfg: int, n_cfg: int, num_classes: int,
             target_per_class: int, min_per_class: int, budget_s: float) -> FIDPlan:
    """The target samples per class if ``n_nocfg`` evaluations without CFG and ``n_cfg`` with CFG fit
    ``budget_s`` seconds of generation at the measured speeds; else the most that fit, rounded down to a multiple of
    10, but at least ``min_per_class``."""
    sec = num_classes * (n_nocfg / images_per_s_nocfg + n_cfg / images_per_s_cfg)
    n_pc = target_per_class
    if n_pc * sec > budget_s:
        n_pc = max(min_per_class, int(budget_s / sec) // 10 * 10)
    return FIDPlan(n_pc, sec, n_pc < target_per_class)




# ----------------------------------------------------------------------------------------------------------------
# λ_p: the perceptual weight that gives both reward terms the same within-group spread
# ----------------------------------------------------------------------------------------------------------------
class LambdaCalibration(NamedTuple):
    """The within-image spreads (unbiased sd over the draws of one image, mean over images) of the two reward
    terms on a base model, the λ_p that equalises them (``exact``; NaN when undefined) and the λ_p the runs use
    (``lambda_p``: ``exact`` rounded, or the fallback), with a sentence for the notebook's notes."""

    model: str
    mse_spread: float
    perceptual_spread: float
    exact: float
    lambda_p: float
    n_images: int
    samples_per_image: int
    note: str


def calibrate_lambda_p(table: pd.DataFrame, perceptual: str, samples_per_image: int, *, digits: int = 2,
                       fallback: float = 1.0) -> LambdaCalibration:
    """λ_p from the first row of a :func:`heldout_table` computed with ``samples_per_image`` > 1 (the group size):
    the exact balancing weight rounded to ``digits`` significant digits, or ``fallback`` (the released code's
    λ_p = 1) when the perceptual term does not vary."""
    if samples_per_image < 2:
        raise ValueError(f"a within-image spread needs samples_per_image >= 2, got {samples_per_image}")
    row = table.iloc[0]
    ms, ps = float(row["held-out MSE spread"]), float(row[f"held-out {perceptual} spread"])
    exact = float(row["held-out λ_p"])
    n = int(row["n images"])
    where = (f"on the base {row['model']} ({n} val images x {samples_per_image} draws per image from the true "
             f"prefix, the rollout policy)")
    spreads = f"mean within-image sd of MSE {ms:.3g}, of {perceptual} {ps:.3g}"
    if math.isfinite(exact) and exact > 0:
        lam = float(f"{exact:.{digits}g}")
        note = (f"λ_p calibration {where}: {spreads}; the weight that equalises them is {exact:.4g}, used rounded to "
                f"{digits} significant digits: λ_p = {lam:g} in every run whose reward has both terms (the released "
                f"code's λ_p = 1 belongs to LPIPS-VGG)")
    else:
        lam = float(fallback)
        note = (f"λ_p calibration {where}: {spreads}; no balancing weight exists (the perceptual term does not vary), "
                f"so the runs use λ_p = {lam:g}")
    return LambdaCalibration(str(row["model"]), ms, ps, exact, lam, n, samples_per_image, note)


# ----------------------------------------------------------------------------------------------------------------
# Evaluation: the CFG setting and which evaluations run
# ----------------------------------------------------------------------------------------------------------------
class CFGChoice(NamedTuple):
    """(g, p) of the "with CFG" evaluations per base model, and where each came from."""

    by_model: dict[str, tuple[float, float]]
    note: str


def cfg_choice(fid_at: Callable[[str, float, float], float], models: list[str], cfg_scales: tuple[float, ...],
               cfg_powers: tuple[float, ...], max_added: int, what: str) -> CFGChoice:
    """Per base model, the (g, p) of lowest FID from a guidance sweep that brackets its optimum.

    For each power p the scales start at ``cfg_scales`` and grow by one grid step at the edge holding the best FID
    (down to g = 1, no guidance), at most ``max_added`` times (:func:`rearlib.experiments.studies_plan.
    sweep_state`, the rule of the studies' main comparison). ``fid_at(model, g, p)`` gives the FID on the selection
    sampling seed (the caller evaluates or reads a record). ``what`` names the FID and the seed in the note, which
    lists each power's scales, its best and whether that best is bracketed.
    """
    by_model, parts = {}, []
    for name in models:
        states = {p: sweep_state(cfg_scales, lambda g, p=p: fid_at(name, g, p), max_added) for p in cfg_powers}
        lines = [f"p={p:g}: g in {{{', '.join(f'{g:g}' for g in st.scales)}}}, best g={st.best:g} "
                 f"(FID {st.best_fid:.3g}, {'bracketed' if st.bracketed else 'NOT bracketed'})"
                 for p, st in states.items()]
        g, p, _ = best_guidance(states)
        by_model[name] = (None, 0.0) if g == 1.0 else (float(g), float(p))
        chosen = "no guidance" if g == 1.0 else f"g={g:g} p={p:g}"
        parts.append(f"{name}: {chosen} ({'; '.join(lines)})")
    note = (f"with CFG, (g, p) per base model from a sweep of {what}: " + " | ".join(parts)
            + "; each VA-π model is evaluated at its base model's (g, p), without a sweep of its own")
    return CFGChoice(by_model, note)


class EvalItem(NamedTuple):
    """One FID evaluation: the model ``(name, vapi_seed)``, with CFG or not, and the sampling seed."""

    model: tuple
    cfg: bool
    sample_seed: int


def eval_items(models, seeds: list[int], runs: dict[str, StudyRun]) -> list[EvalItem]:
    """The study's evaluations, model-major (the GPU sampler's graphs stay warm).

    A base model (VA-π seed None) is evaluated at every sampling seed of ``seeds``, without and with CFG. A
    post-trained model of VA-π seed s is evaluated at sampling seed s: the same random numbers as the base
    model's evaluation at s and as every other run of seed s, so that differences pair by seed. With CFG too,
    except the reward ablation (the paper's Table 4 is without CFG).
    """
    out = []
    for name, vseed in models:
        if vseed is None:
            out += [EvalItem((name, None), c, s) for s in seeds for c in (False, True)]
        else:
            if vseed not in seeds:
                raise ValueError(f"{name}: VA-π seed {vseed} is not one of the sampling seeds {seeds}")
            out.append(EvalItem((name, vseed), False, vseed))
            if runs[name].group != "reward ablation":
                out.append(EvalItem((name, vseed), True, vseed))
    return out


def generator_train_time(model, result_json: Callable[[], Path]) -> tuple[float | None, str | None]:
    """(training seconds, GPU name or None) of a zoo generator: from the record it was loaded with, else from
    its run's ``result.json`` (``result_json()`` gives the path)."""
    info = getattr(model, "zoo_info", None)
    if info and info.get("result"):
        return info["result"].get("train_time_s"), info["result"].get("gpu")
    r0 = json.loads(result_json().read_text())
    return r0.get("train_time_s"), r0.get("gpu")


def fid_summary(evals: pd.DataFrame, fid_col: str, order) -> pd.DataFrame:
    """Per model (in ``order``) and CFG setting: the mean, sd and number of ``fid_col`` values (over VA-π seeds for
    a post-trained model, over sampling seeds for a base model)."""
    out = evals.groupby(["model", "CFG"], sort=False)[fid_col].agg(["mean", "std", "count"]).reset_index()
    out["model"] = pd.Categorical(out["model"], categories=list(order), ordered=True)
    return out.sort_values(["model", "CFG"], ascending=[True, False]).reset_index(drop=True)
