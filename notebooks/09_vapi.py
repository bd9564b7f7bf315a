# %% [markdown]
# # 09 · VA-π: closing the generator-tokenizer gap after training
#
# reAR changes *training* so that a generator copes with its own imperfect prefixes and knows the geometry of the
# codebook. **VA-π** (Liao et al., arXiv 2512.19680; `docs/paper.md`, Part II) attacks the same gap
# *after* training, in pixel space: for a real image with ground-truth tokens x*, the generator predicts every
# token from the true prefix (teacher forcing), G token sequences are drawn independently per position, each is
# decoded by the frozen tokenizer and rewarded with R = -(MSE + λ_p · perceptual distance) against the real image;
# the group-normalised, clipped advantages drive a PPO-style clipped policy gradient, and a cross-entropy term on
# the ground-truth tokens (weight β = 0.1) keeps the model a good next-token predictor. No reference model, no
# external reward model. Implementation: `rearlib.vapi` (defaults = the released C2I code; see its docstring).
#
# Here we post-train the zoo's **AR** and **reAR** generators with VA-π and compare before / after:
# reward curves, the wall time of post-training, FID[rearlib-classifier] with and without CFG, class
# consistency, and the reconstruction the reward measures, on held-out images. Then the **reward-composition
# ablation** on AR: MSE only, perceptual only, both (the CE prior kept in all three).
#
# Perceptual distance. The paper's reward uses LPIPS-VGG. LPIPS needs torchvision's ImageNet VGG weights, which an
# offline machine may not have; then `rearlib` substitutes **DFD[rearlib-classifier]** (an LPIPS-style feature
# distance in the in-project classifier, *not* LPIPS, on another numeric scale: with λ_p = 1 it weighs the
# perceptual term very differently). Every perceptual number below carries the name of the metric actually used.
#
# FID here is computed with the in-project feature extractor and labeled `FID[rearlib-classifier]`; it is not the
# Inception FID of the paper and the values are not comparable. One training seed per generator and several VA-π
# runs per setting (VA-π seeds; three at `small`): a verdict needs every VA-π run to agree, and at most the
# *direction* of the paper's effects can be reproduced. (VA-π on a GPU is not bit-reproducible: two runs of the
# same recipe and seed on an H200 logged identical steps for the first 7-16 steps, then drifted apart, and ended
# 1-6 points of no-CFG FID apart (AR + VA-π: 10.6 and 16.4). One run cannot carry a verdict.)

# %% tags=["parameters"]
scale = "smoke"        # smoke | small | paper
seed = 0               # first VA-π seed (the runs use seed, seed + 1, ...) and the sampling seed
device = "auto"
reports_dir = "reports"
figures_dir = "figures"
generator_seed = 0     # training seed of the zoo generators (the shipped small checkpoints are seed 0)

# %%
from rearlib.experiments.notebook import setup

ctx = setup(notebook="09_vapi", scale=scale, seed=seed, device=device,
            reports_dir=reports_dir, figures_dir=figures_dir)

# %%
import copy
import json
import math
import time

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torchvision.utils import make_grid
from tqdm.auto import tqdm

import rearlib.metrics as M
from rearlib import vapi
from rearlib.data import NUM_CLASSES, render_batch
from rearlib import scales
from rearlib.experiments.evaluation import Evaluator, run_model_key
from rearlib.runtime import artifact_dir, config_hash
from rearlib.metrics.classifier import EXTRACTOR_NAME, get_classifier
from rearlib.sample import generate
from rearlib.tokenizers import get_tokenizer
from rearlib.scales import GENERATOR_DATA as DATA
from rearlib.experiments.zoo import get_generator, run_dir, run_hash, train_config

if ctx.scale == "paper":
    raise ValueError("09_vapi post-trains the zoo's AR and reAR generators, which exist at 'smoke' and 'small' only. "
                     "For LlamaGen/ImageNet use `python -m rearlib vapi --scale paper --generator ... --out ...` "
                     "(the released C2I recipe) and evaluate with `python -m rearlib sample fid`.")

# Per scale. steps: VA-π optimizer steps (the library's per-scale recipe, rearlib.scales.VAPI: a few at smoke,
# 100 at small as the paper's C2I run). vapi_seeds: VA-π runs per setting (seeds seed, seed + 1, ...; each is
# evaluated, so the table shows the run-to-run spread of post-training itself). fid_per_class: the target samples per class for one FID evaluation, lowered
# automatically when the measured sampling speed says the planned evaluations would not fit gen_budget_s.
# n_heldout: val images for the teacher-forced reconstruction check. From rearlib.scales.EVALUATION (shared with
# 04 and 10-13): n_ref, held-out real images (val) for FID; batch, images per sampler call; sampler ("graph": CUDA
# graphs without torch.compile, whose compile time per model would not fit the budget; None: library default).
# cfg: the one CFG setting (g, p) used "with CFG", rearlib.sample's per-scale default (a constant g, as the VA-π
# paper's evaluation uses).
VSCALE = scales.VAPI[ctx.scale]
SETTINGS = {
    "smoke": dict(steps=VSCALE["steps"], data_size=VSCALE["data_size"], vapi_seeds=2, fid_per_class=8,
                  fid_min_per_class=4, n_heldout=32, gen_budget_s=30.0, grid_per_class=3),
    "small": dict(steps=VSCALE["steps"], data_size=VSCALE["data_size"], vapi_seeds=3, fid_per_class=1000,
                  fid_min_per_class=200, n_heldout=1000, gen_budget_s=400.0, grid_per_class=6),
}[ctx.scale]
SETTINGS.update({k: scales.EVALUATION[ctx.scale][k] for k in ("n_ref", "batch", "sampler")})
CFG_G, CFG_P = scales.SAMPLING[ctx.scale]["cfg_scale"], scales.SAMPLING[ctx.scale]["cfg_power"]
if ctx.device.type == "cpu":
    # On a busy 2-core machine OpenMP threads spin-waiting for each other made the sampler ~50x slower (measured);
    # one thread is faster and predictable.
    torch.set_num_threads(1)
dev = ctx.device
data_seed = DATA[ctx.scale]["seed"]
t_start = time.time()

tok = get_tokenizer(ctx.scale, dev, progress=False)
res, N, K = tok.resolution, math.prod(tok.grid_size), tok.codebook_size
VARIANTS = {"AR": "ar", "reAR": "rear"}
base_models = {name: get_generator(ctx.scale, v, tokenizer=tok, seed=generator_seed, device=dev, progress=False)
               for name, v in VARIANTS.items()}
classifier = get_classifier(ctx.scale, dev)
# FID / KID / precision-recall here still use the in-project classifier, asked for by name and labeled
# "[rearlib-classifier]": these generators' committed evaluations were scored with it. rearlib's default extractor
# is the Inception-v3 FID network (rearlib.metrics.inception).
evaluator = Evaluator(ctx.scale, tok, classifier, dev, data_seed=data_seed, extractor=EXTRACTOR_NAME)
base_cfg = vapi.config_for_scale(ctx.scale, seed=ctx.seed)
perceptual_fn = vapi.make_perceptual_fn(base_cfg.perceptual, scale=ctx.scale, device=dev, classifier=classifier)
PERC = perceptual_fn.metric_name
ctx.note(f"perceptual distance in the reward and in every perceptual column: {PERC} ({perceptual_fn.reason})")
ctx.note(f"feature extractor for FID/IS/KID/PR and class consistency: {EXTRACTOR_NAME}:{classifier.identity}")
print(f"VA-π config ({ctx.scale}): {base_cfg.to_dict()}; {SETTINGS['steps']} steps")

# %% [markdown]
# ## 1 · Post-training runs
# | run | starts from | reward |
# |---|---|---|
# | AR + VA-π | AR | MSE + λ_p · perceptual (the paper's reward) |
# | reAR + VA-π | reAR | MSE + λ_p · perceptual |
# | AR + VA-π (MSE only) | AR | MSE |
# | AR + VA-π (perceptual only) | AR | perceptual |
#
# Each setting runs once per VA-π seed. All with the CE prior (β = 0.1), G samples per image, clip 0.2, advantage clip 5, no contextual noise (the
# C2I setting), the code's eval-mode rollout and train-mode update, and the scale's batch size and learning rate
# (`rearlib.scales.VAPI`; at `small` lr 1e-5, an untuned choice for our 8-block model, see the module). Images
# come from the `train` split, the one the generators were trained on. Runs are cached under `artifacts/vapi/`
# (keyed by the base generator's training recipe and the VA-π config) and resume if interrupted. "post-training time" is the run record's sum of step times (sampling, decoding,
# reward, update; checkpoint writes excluded), so a cached run reports the time of the run that did the work.

# %%
RUNS = {
    "AR + VA-π": ("AR", "MSE + perceptual", {}),
    "reAR + VA-π": ("reAR", "MSE + perceptual", {}),
    "AR + VA-π (MSE only)": ("AR", "MSE only", {"reward_perceptual_weight": 0.0}),
    "AR + VA-π (perceptual only)": ("AR", "perceptual only", {"reward_mse_weight": 0.0}),
}
source = vapi.EmbeddedSource(SETTINGS["data_size"], res, "train", data_seed)
# The model part of evaluation keys: the base generators' training recipe and final step (rearlib.experiments.zoo), and for
# a post-trained model the hash of its VA-π run key (which holds the base recipe).
# Every model is named (model, VA-π seed); the base generators have no VA-π seed (None).
VAPI_SEEDS = [ctx.seed + i for i in range(SETTINGS["vapi_seeds"])]
model_keys = {(name, None): run_model_key(run_hash(ctx.scale, v, tok, generator_seed),
                                          train_config(ctx.scale, v, tok, generator_seed).steps)
              for name, v in VARIANTS.items()}
post, results = {}, {}
for run, (base, reward, overrides) in RUNS.items():
    for vseed in VAPI_SEEDS:
        cfg = base_cfg.replace(seed=vseed, **overrides)
        key = {"base": model_keys[(base, None)], "tokenizer": tok.identity(), "vapi": cfg.to_dict(),
               "steps": SETTINGS["steps"],
               "data": {"dataset": "ShapeScenes-10", "split": "train", "size": SETTINGS["data_size"],
                        "seed": data_seed},
               "perceptual": PERC if cfg.reward_perceptual_weight > 0 else "none", "device": dev.type}
        out = artifact_dir("vapi", key)
        print(f"{run}, VA-π seed {vseed}: {out}")
        r = vapi.post_train(copy.deepcopy(base_models[base]), tok, source, cfg, SETTINGS["steps"], out, dev,
                            perceptual_fn=perceptual_fn, scale=ctx.scale, progress=True)
        if r["status"] != "completed":
            raise RuntimeError(f"{run} (VA-π seed {vseed}) stopped at step {r['step']} of {r['steps']}; "
                               "re-run this cell to resume")
        post[(run, vseed)], results[(run, vseed)] = r["model"], r
        model_keys[(run, vseed)] = {"kind": "vapi", "run": config_hash(key), "step": r["step"]}

history = pd.concat([r["history_df"].assign(run=run, vapi_seed=vseed, reward=RUNS[run][1])
                     for (run, vseed), r in results.items()], ignore_index=True)
ctx.save_csv(history, "09_vapi_history")


def window_mean(h: pd.DataFrame, col: str, first: bool, frac: float = 0.1) -> float:
    n = max(1, int(len(h) * frac))
    return float((h.head(n) if first else h.tail(n))[col].mean())


run_rows = []
for (run, vseed), r in results.items():
    h = r["history_df"]
    run_rows.append({
        "run": run, "vapi_seed": vseed, "base": RUNS[run][0], "reward": RUNS[run][1], "steps": r["step"],
        "images/step": base_cfg.batch_size, "G": base_cfg.group_size, "lr": base_cfg.lr,
        "post-training time (s)": r["train_time_s"], "s/step": r["train_time_s"] / max(1, r["step"]),
        "GPU": r.get("gpu") or "CPU", "perceptual metric": r["perceptual_metric"],
        "reward first 10%": window_mean(h, "reward_mean", True),
        "reward last 10%": window_mean(h, "reward_mean", False),
        "MSE first 10%": window_mean(h, "mse_mean", True), "MSE last 10%": window_mean(h, "mse_mean", False),
        "CE first 10%": window_mean(h, "ce", True), "CE last 10%": window_mean(h, "ce", False),
        "clip fraction (mean)": float(h["clip_frac"].mean()),
    })
runs = pd.DataFrame(run_rows)
ctx.save_csv(runs, "09_vapi_runs")
runs.set_index(["run", "vapi_seed"]).T

# %% [markdown]
# ## 2 · Reward curves
# Per step, over the step's B·G sampled sequences: the mean reward and its parts (MSE on [-1, 1] images, the
# perceptual distance, each as logged before the step's update), and the CE prior. A moving mean smooths the curves
# when there are enough steps. The reward of the one-term runs is on a different scale (one term only), so the
# panels of the parts are the ones to compare across runs; the perceptual-distance panel has no line for the
# MSE-only run, whose step does not compute it.

# %%
panels = [("reward_mean", "mean reward"), ("mse_mean", "MSE ([-1, 1] images)"),
          ("perceptual_mean", f"perceptual distance ({PERC})"), ("ce", "CE prior (nats/token)")]
win = max(1, SETTINGS["steps"] // 10)
fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.0))
for ax, (col, label) in zip(axes, panels):
    for i, run in enumerate(RUNS):
        rs = [results[(run, vs)] for vs in VAPI_SEEDS]
        if col == "perceptual_mean" and rs[0]["perceptual_metric"] == "none":
            continue  # a fixed colour per setting, so that skipping a line here does not shift the others' colours
        # one line per setting: the mean over VA-π seeds, with the band between the lowest and highest seed
        curves = pd.concat([r["history_df"].set_index("step")[col].rolling(win, min_periods=1).mean()
                            for r in rs], axis=1)
        ax.plot(curves.index, curves.mean(axis=1), color=f"C{i}", label=run)
        ax.fill_between(curves.index, curves.min(axis=1), curves.max(axis=1), color=f"C{i}", alpha=0.2)
    ax.set_xlabel("VA-π step")
    ax.set_ylabel(label, fontsize=8)
    ax.grid(alpha=0.3)
axes[0].legend(fontsize=7)
fig.suptitle(f"VA-π post-training ({ctx.scale}; B={base_cfg.batch_size} images x G={base_cfg.group_size}; "
             f"moving mean over {win} steps; line = mean over {len(VAPI_SEEDS)} VA-π seeds, band = their range)",
             fontsize=9)
fig.tight_layout()
ctx.save_fig(fig, "09_reward_curves")
plt.show()

# %% [markdown]
# ## 3 · What the reward measures, on held-out images
# For `n_heldout` validation images (never used in post-training): teacher-forced logits given the true prefix,
# one token drawn per position (the same random stream for every model), decoded and compared with the real image:
# MSE on [-1, 1] images, the perceptual distance, and R = -(MSE + perceptual) with the paper's unit weights; plus
# the teacher-forced CE and CTR (argmax = true token) of the ground-truth tokens.

# %%
n_ho = SETTINGS["n_heldout"]
with torch.no_grad():
    ho_img, ho_lab = render_batch(torch.arange(n_ho), res, seed=data_seed, split="val", device=dev)
    ho_tok = torch.cat([tok.encode(ho_img[i:i + 250]).reshape(-1, N) for i in range(0, n_ho, 250)])
score_cfg = base_cfg.replace(reward_mse_weight=1.0, reward_perceptual_weight=1.0)


@torch.no_grad()
def heldout_reconstruction(model, batch: int = 250) -> dict:
    model.eval()
    gen = torch.Generator(device=dev).manual_seed(10_000 + ctx.seed)  # common random numbers across models
    sums = dict(mse=0.0, perc=0.0, ce=0.0, ctr=0.0)
    for s in range(0, n_ho, batch):
        t, y, img = ho_tok[s:s + batch], ho_lab[s:s + batch], ho_img[s:s + batch]
        logits = model(t, y).logits.float()  # logits[:, i] predicts x_{i+1} from the true prefix
        probs = logits.softmax(-1)
        draw = torch.multinomial(probs.reshape(-1, K), 1, generator=gen).view(len(t), N)
        rr = vapi.compute_rewards(tok.decode(draw).float(), img, score_cfg, perceptual_fn)
        sums["mse"] += float(rr.mse.sum())
        sums["perc"] += float(rr.perceptual.sum())
        sums["ce"] += float(F.cross_entropy(logits.transpose(1, 2), t, reduction="none").mean(1).sum())
        sums["ctr"] += float((logits.argmax(-1) == t).float().mean(1).sum())
    m = {k: v / n_ho for k, v in sums.items()}
    return {"held-out MSE": m["mse"], f"held-out {PERC}": m["perc"], "held-out reward": -(m["mse"] + m["perc"]),
            "held-out CE": m["ce"], "held-out CTR": m["ctr"]}


all_models = {**{(name, None): m for name, m in base_models.items()}, **post}
heldout = pd.DataFrame([{"model": name, "vapi_seed": vseed, **heldout_reconstruction(m)}
                        for (name, vseed), m in all_models.items()])
heldout["vapi_seed"] = heldout["vapi_seed"].astype("Int64")
heldout["n images"] = n_ho
ctx.save_csv(heldout, "09_heldout_reconstruction")
heldout.set_index(["model", "vapi_seed"]).round(5)

# %% [markdown]
# ## 4 · Sampling speed, then how many samples fit
# As in 04: one timed batch with and without CFG (after a warm-up call that builds the sampler), then the number
# of samples per FID evaluation is the target if all planned evaluations fit the generation budget, else fewer.

# %%
speed = pd.DataFrame([{"model": "AR", "CFG": c, "batch": SETTINGS["batch"], "device": str(dev),
                       "images/s": evaluator.time_sampler(base_models["AR"], CFG_G if c else None, CFG_P,
                                                          seed=10_000 + ctx.seed)} for c in (False, True)])
ctx.save_csv(speed, "09_sampling_speed")
ips = speed.set_index("CFG")["images/s"]
# Plan: every model without and with CFG, plus each base model once more without CFG with another sampling seed.
n_nocfg, n_cfg = len(all_models) + len(base_models), len(all_models)
sec_per_class_sample = NUM_CLASSES * (n_nocfg / ips[False] + n_cfg / ips[True])
n_pc = SETTINGS["fid_per_class"]
if n_pc * sec_per_class_sample > SETTINGS["gen_budget_s"]:
    n_pc = max(SETTINGS["fid_min_per_class"], int(SETTINGS["gen_budget_s"] / sec_per_class_sample) // 10 * 10)
n_fid = n_pc * NUM_CLASSES
reduced = n_pc < SETTINGS["fid_per_class"]
ctx.note(f"sampling speed: {ips[False]:.0f} images/s without CFG, {ips[True]:.0f} with CFG on {dev}; "
         f"{n_nocfg + n_cfg} evaluations x {n_fid} samples, estimated {n_pc * sec_per_class_sample:.0f} s of "
         f"generation (budget {SETTINGS['gen_budget_s']:.0f} s)"
         + (f"; REDUCED from the target {SETTINGS['fid_per_class'] * NUM_CLASSES} samples" if reduced else ""))
speed

# %% [markdown]
# ## 5 · Before and after: FID[rearlib-classifier], IS, KID, precision / recall, class consistency
# Against held-out real images (val). Without CFG, and with CFG at `rearlib.scales.SAMPLING[scale]`'s (g, p) (a
# constant g at small, printed below). Image i of a set: class i // n_per_class, seed `image_seed(seed, i)`, so
# every model gets identical random numbers.
# Cached as records under `artifacts/eval_records/` (`rearlib.experiments.evaluation`; the base generators' records are shared
# with notebooks 04 and 10).

# %%
print(f"with CFG: g = {CFG_G}, p = {CFG_P}")
n_ref = SETTINGS["n_ref"]


def evaluate(key: tuple, model, g: float | None, p: float, sample_seed: int) -> dict:
    row = evaluator.evaluate(model_keys[key], model, n_per_class=n_pc, cfg_scale=g, cfg_power=p,
                             sample_seed=sample_seed)
    return {"model": key[0], "vapi_seed": key[1], "CFG": "no CFG" if g is None else f"g={g} p={p}",
            "sample_seed": sample_seed, **row}


rows = []
for key, m in tqdm(all_models.items(), desc="evaluate"):  # model-major: the GPU sampler's graphs stay warm
    seeds = [ctx.seed, ctx.seed + 1] if key[1] is None else [ctx.seed]
    rows += [evaluate(key, m, None, 0.0, s) for s in seeds]
    rows.append(evaluate(key, m, CFG_G, CFG_P, ctx.seed))
evals = pd.DataFrame(rows)
evals["vapi_seed"] = evals["vapi_seed"].astype("Int64")
evals["scale"], evals["vapi_steps"] = ctx.scale, SETTINGS["steps"]
evals["n target"] = SETTINGS["fid_per_class"] * NUM_CLASSES  # planned; "n generated" is what the budget allowed
ctx.save_csv(evals, "09_fid")
FID, IS = M.metric_label("fid", EXTRACTOR_NAME), M.metric_label("isc_mean", EXTRACTOR_NAME)
PREC, REC = M.metric_label("precision", EXTRACTOR_NAME), M.metric_label("recall", EXTRACTOR_NAME)
KID = M.metric_label("kid_mean", EXTRACTOR_NAME)
show = [FID, IS, KID, PREC, REC, "class consistency", "n generated", "n target"]
evals.set_index(["model", "vapi_seed", "CFG", "sample_seed"])[show].round(4)

# %%
main = evals[evals["sample_seed"] == ctx.seed]
order = list(dict.fromkeys(name for name, _ in all_models))
fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
for ax, metric in zip(axes, (FID, "class consistency", IS)):
    for j, (cfg_label, marker) in enumerate((("no CFG", "o"), (f"g={CFG_G} p={CFG_P}", "s"))):
        sub = main[main["CFG"] == cfg_label]
        x = sub["model"].map({m: i for i, m in enumerate(order)}) + (j - 0.5) * 0.2
        pts = ax.scatter(x, sub[metric], marker=marker, alpha=0.6, label=f"{cfg_label} (one point per VA-π seed)")
        means = sub.groupby("model")[metric].mean().reindex(order)
        ax.scatter(np.arange(len(order)) + (j - 0.5) * 0.2, means, marker="_", s=300, color=pts.get_facecolor()[0])
    ax.set_xticks(range(len(order)))
    ax.set_xticklabels(order, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel(metric, fontsize=8)
    ax.grid(alpha=0.3)
axes[0].legend(fontsize=7)
fig.suptitle(f"Before / after VA-π ({ctx.scale}; {n_fid} samples per point vs {n_ref} val images; "
             f"bar = mean over VA-π seeds)", fontsize=9)
fig.tight_layout()
ctx.save_fig(fig, "09_before_after")
plt.show()

# %%
k = SETTINGS["grid_per_class"]
grid_labels = torch.arange(NUM_CLASSES).repeat_interleave(k).to(dev)
shown = ["AR", "AR + VA-π", "reAR", "reAR + VA-π"]
fig, axes = plt.subplots(1, len(shown), figsize=(len(shown) * (0.45 * k + 0.4), 0.45 * NUM_CLASSES + 0.8))
for ax, name in zip(axes, shown):
    # fast=False: the plain cached loop; this batch size would otherwise capture extra CUDA graphs.
    model = base_models[name] if name in base_models else post[(name, VAPI_SEEDS[0])]
    toks = generate(model, grid_labels, seed=ctx.seed, fast=False)
    with torch.no_grad():
        ax.imshow(make_grid(tok.decode(toks).float().cpu(), nrow=k, padding=1, pad_value=1.0).permute(1, 2, 0))
    ax.set_title(name if name in base_models else f"{name} (VA-π seed {VAPI_SEEDS[0]})", fontsize=8)
    ax.axis("off")
fig.suptitle(f"No CFG, identical image seeds (row = class; {ctx.scale})", fontsize=9)
fig.tight_layout()
ctx.save_fig(fig, "09_samples")
plt.show()

# %% [markdown]
# ## 6 · Claims
# Verdicts are computed from the numbers above. "Sampling noise" is the larger FID change of the two base models
# between two sampling seeds without CFG: an FID difference smaller than that is not counted. Every setting has
# one run per VA-π seed, and a verdict needs **every** run to agree (each post-trained run better than the base by
# more than the sampling noise; for the reward ablation, every combined-reward run better than every run of the
# better single term). The training-seed spread of the base generators is unknown (one each), so the best
# verdict is "direction reproduced". Values are given as mean ± sd over the VA-π seeds, then the runs.

# %%
def fids(model: str, cfg_label: str) -> np.ndarray:
    """FID of ``model`` at the main sampling seed: one value per VA-π seed (one value for a base model)."""
    sel = main[(main["model"] == model) & (main["CFG"] == cfg_label)].sort_values("vapi_seed")
    return sel[FID].to_numpy(dtype=float)


def spread(x) -> str:
    """'mean' for one value, else 'mean ± sd (run values)'."""
    x = np.asarray(x, dtype=float)
    if len(x) == 1:
        return f"{x[0]:.4g}"
    return f"{x.mean():.4g} ± {x.std(ddof=1):.2g} ({', '.join(f'{v:.3g}' for v in x)})"


nocfg_base = evals[(evals["CFG"] == "no CFG") & evals["model"].isin(list(base_models))]
noise = float(nocfg_base.groupby("model")[FID].agg(lambda s: s.max() - s.min()).max())
CFGL = f"g={CFG_G} p={CFG_P}"
smoke_note = "smoke scale: numbers are not meaningful" if ctx.is_smoke else ""
common = (f"one generator training seed; {len(VAPI_SEEDS)} VA-π runs per setting (seeds {VAPI_SEEDS}); sampling "
          f"noise (|ΔFID| between two sampling seeds) {noise:.3g}; {n_fid} samples per evaluation"
          + (" (reduced to fit the budget)" if reduced else "")
          + f"; VA-π: {SETTINGS['steps']} steps x {base_cfg.batch_size} images x G={base_cfg.group_size}, "
            f"lr {base_cfg.lr:g}; reward perceptual term = {PERC}")


def lower_is_better(before: np.ndarray, after: np.ndarray) -> str:
    """Every post-trained run below the base by more than the sampling noise."""
    if ctx.is_smoke:
        return "not tested"
    return "direction reproduced" if bool((after < before.mean() - noise).all()) else "not reproduced"


def join(*parts):
    return "; ".join(p for p in parts if p)


ar_runs = runs[runs["run"] == "AR + VA-π"].sort_values("vapi_seed")
ho = heldout[heldout["model"].isin(["AR", "AR + VA-π"])]
ho_base = float(ho.loc[ho["model"] == "AR", "held-out reward"].iloc[0])
ho_post = ho[ho["model"] == "AR + VA-π"].sort_values("vapi_seed")["held-out reward"].to_numpy(dtype=float)
rose_train = (ar_runs["reward last 10%"] > ar_runs["reward first 10%"]).to_numpy()
rose_heldout = ho_post > ho_base
n_rose = int((rose_train & rose_heldout).sum())
ctx.claim(claim="VA-π post-training raises the reconstruction reward",
          paper="Fig. 5: the reward rises steadily over post-training (100 steps, C2I)",
          ours=f"AR + VA-π: training-batch reward {spread(ar_runs['reward first 10%'])} (first 10% of steps) -> "
               f"{spread(ar_runs['reward last 10%'])} (last 10%); held-out reward (-(MSE + {PERC}), {n_ho} val "
               f"images) {ho_base:.4g} -> {spread(ho_post)}; both rose in {n_rose}/{len(ho_post)} runs",
          verdict="not tested" if ctx.is_smoke else
                  ("direction reproduced" if n_rose == len(ho_post) else "not reproduced"),
          note=join("verdict needs both the training curve and the held-out reward to rise in every run", common,
                    smoke_note))
ctx.claim(claim="VA-π lowers FID without CFG",
          paper="Table 2: LlamaGen-XXL 14.36 -> 7.65, LlamaGen-XL 15.55 -> 9.23 (Inception FID, 50k)",
          ours=f"{FID}: AR {spread(fids('AR', 'no CFG'))} -> {spread(fids('AR + VA-π', 'no CFG'))}; "
               f"reAR {spread(fids('reAR', 'no CFG'))} -> {spread(fids('reAR + VA-π', 'no CFG'))}",
          verdict=lower_is_better(fids("AR", "no CFG"), fids("AR + VA-π", "no CFG")),
          note=join("verdict on AR (the paper post-trains plain AR models)", common, smoke_note))
ctx.claim(claim="VA-π lowers FID with CFG",
          paper="Table 2: XXL (cfg 1.75) 2.37 -> 2.28; but XL (cfg 2.0) 2.79 -> 2.94 (worse)",
          ours=f"{FID}, {CFGL}: AR {spread(fids('AR', CFGL))} -> {spread(fids('AR + VA-π', CFGL))}; "
               f"reAR {spread(fids('reAR', CFGL))} -> {spread(fids('reAR + VA-π', CFGL))}",
          verdict=lower_is_better(fids("AR", CFGL), fids("AR + VA-π", CFGL)),
          note=join("verdict on AR against the XXL direction (the paper's own XL row goes the other way)", common,
                    smoke_note))
ctx.claim(claim="VA-π on top of reAR (both attack the generator-tokenizer gap)",
          paper="not reported (VA-π post-trains LlamaGen; reAR has no post-training)",
          ours=f"{FID} no CFG: reAR {spread(fids('reAR', 'no CFG'))} -> {spread(fids('reAR + VA-π', 'no CFG'))}, "
               f"AR + VA-π {spread(fids('AR + VA-π', 'no CFG'))}; with CFG: reAR {spread(fids('reAR', CFGL))} -> "
               f"{spread(fids('reAR + VA-π', CFGL))}",
          verdict="not tested", note=join("no paper claim to test; reported for comparison",
                                          smoke_note))

ablation = {r: fids(r, "no CFG") for r in ("AR + VA-π (MSE only)", "AR + VA-π (perceptual only)", "AR + VA-π")}
best_single = min(("AR + VA-π (MSE only)", "AR + VA-π (perceptual only)"), key=lambda r: ablation[r].mean())
ho_ar = heldout[heldout["model"] == "AR"].iloc[0]
ratio = ho_ar[f"held-out {PERC}"] / max(ho_ar["held-out MSE"], 1e-12)
ctx.claim(claim="Reward composition: MSE + perceptual beats either term alone",
          paper="Table 4 (XXL, no CFG, without the CE prior): MSE + LPIPS 38.63 vs one term 38.76 (which term is not "
                "recoverable); full method with CE prior 7.65; single-term runs with the prior not reported",
          ours=f"{FID} no CFG (all with CE prior): MSE only {spread(ablation['AR + VA-π (MSE only)'])}, perceptual "
               f"only {spread(ablation['AR + VA-π (perceptual only)'])}, both {spread(ablation['AR + VA-π'])} (AR "
               f"before: {spread(fids('AR', 'no CFG'))})",
          verdict="not tested" if ctx.is_smoke else
                  ("direction reproduced" if ablation["AR + VA-π"].max() < ablation[best_single].min() - noise
                   else "not reproduced"),
          note=join(f"verdict needs every combined-reward run below every run of the better single term "
                    f"({best_single.removeprefix('AR + VA-π ')}) by more than the sampling noise",
                    f"on the base AR's held-out samples the perceptual distance is {ratio:.3g}x the MSE"
                    + (", so with unit weights it dominates the combined reward" if ratio > 3 else ""),
                    common, smoke_note))

rec_info = getattr(base_models["AR"], "zoo_info", None)
if rec_info and rec_info.get("result"):
    gen_train_s, gen_gpu = rec_info["result"].get("train_time_s"), rec_info["result"].get("gpu")
else:
    r0 = json.loads((run_dir(ctx.scale, "ar", tok, generator_seed) / "result.json").read_text())
    gen_train_s, gen_gpu = r0.get("train_time_s"), r0.get("gpu")
# The median over the VA-π seeds, so that one slow run (for instance the first in a process) does not decide.
vapi_times = ar_runs["post-training time (s)"].to_numpy(dtype=float)
vapi_s = float(np.median(vapi_times))
frac = vapi_s / gen_train_s if gen_train_s else float("nan")
gpus = set(ar_runs["GPU"])
same_hw = len(gpus) == 1 and (gen_gpu or "CPU") in gpus
ctx.claim(claim="VA-π is cheap: a short post-training next to training the generator",
          paper="100 steps, 12.8k images (~1% of ImageNet), 25 min on 8xA100 for LlamaGen-XXL (20 min XL); "
                "13.4% of AR-GRPO's time",
          ours=f"AR + VA-π: median {vapi_s:.1f} s for {int(ar_runs['steps'].iloc[0])} steps over "
               f"{len(vapi_times)} runs ({', '.join(f'{t:.1f}' for t in vapi_times)} s) on {', '.join(sorted(gpus))} "
               f"= {frac:.1%} of the AR generator's training time ({gen_train_s:.0f} s on {gen_gpu or 'CPU'})",
          verdict="not tested" if ctx.is_smoke or not same_hw or not math.isfinite(frac) else
                  ("direction reproduced" if frac < 0.10 else "not reproduced"),
          note=join("threshold: under 10% of the generator's training time on the same hardware; each run's time is "
                    "its sum of step times (a cached run reports the run that did the work); AR-GRPO is not "
                    "implemented here, so the 13.4% comparison is not tested", smoke_note))
print(f"total {time.time() - t_start:.1f} s")
pd.DataFrame(ctx.claims)[["claim", "ours", "verdict"]]
