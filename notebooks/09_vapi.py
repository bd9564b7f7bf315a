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
# Here we post-train the zoo's **AR** and **reAR** generators and ask plainly: does VA-π lower FID on these
# generators, by how much, at what cost, and, where it does not, which part of the update is to blame. Besides the
# method the notebook runs two controls, a learning-rate sweep at the paper's batch and the reward-composition
# ablation (the table in §2).
#
# **The reward.** The paper's perceptual term is LPIPS-VGG, whose ImageNet weights an offline machine lacks. At
# `smoke` and `small` the reward uses **ST-LPIPS(alex)** (shift-tolerant LPIPS, ECCV 2022; its wheel ships the
# complete network), asked for by name so that a run's reward does not depend on which weights a machine caches;
# every perceptual number carries the metric's name. ST-LPIPS lives on another scale than LPIPS-VGG, and after group
# normalisation only each term's spread among the G samples of one image matters, so λ_p is not the released code's
# 1.0 but calibrated on the base AR before the runs (§1).
#
# **The update runs in eval mode at `smoke` and `small`** (`VAPIConfig.update_mode`), a documented deviation from
# the released code, which samples in eval mode and updates in train mode (dropout 0.1). In the code's arrangement
# the PPO ratio differs from 1 only through dropout: on the small generator (G = 8, 32 images per step) every run
# logged approx_kl 0.18-0.27 per token and a clip fraction of 0.63-0.70, and a policy gradient computed with shuffled
# rewards had cosine 0.68 with the real one (with the update in eval mode: -0.05). About half of each train-mode
# update does not depend on the reward. The `paper` scale keeps the code's train mode.
#
# **The step size.** The released recipe is lr 1e-6 at 128 images x G = 8 per step for LlamaGen-XXL (1.4B
# parameters), about 1% of its training lr. Our 11M-parameter generator ended pre-training at lr 1e-5 (the end of its
# cosine schedule), and the scale's VA-π runs use that lr at 32 images per step: steps as large as the last ones of
# pre-training, on a noisier gradient. At `small` the sweep repeats the method at the paper's batch with lr 1e-6, 3e-6
# and 1e-5.
#
# **The metrics.** At `small`, FID / KID / precision / recall come from the Inception-v3 FID network (plain names, as
# in the paper, though on our 10-class images and not comparable with ImageNet numbers); the in-project classifier's
# FID, IS, KID and precision / recall sit beside them as secondary columns, labeled `[rearlib-classifier]`, with class
# consistency. The reward's perceptual network (ST-LPIPS) is neither of them. At `smoke` the classifier is the only
# extractor, for CPU time. One training seed per generator and several VA-π runs per setting (VA-π seeds; three at
# `small`): every verdict rests on the interval of a difference over the VA-π seeds (§7). VA-π on a GPU is not
# bit-reproducible: two runs of the same recipe and seed on an H200 logged identical steps for the first 7-16
# steps, then drifted apart, and ended 1-6 points of no-CFG FID apart. One run cannot carry a verdict.
#
# **The work goes model by model** (`rearlib.vapi_units`): each run is post-trained, then at once scored on the
# held-out images, evaluated and, where shown, drawn. Every result is a small record keyed by the model's final
# weights, so an interrupted notebook resumes where it stopped, on this machine or on another that has the records.

# %% tags=["parameters"]
scale = "smoke"        # smoke | small | paper
seed = 0               # sampling seed of the guidance sweep; VA-π runs (and their samples) use seed + 1, ...
device = "auto"
reports_dir = "reports"
figures_dir = "figures"
generator_seed = 0     # training seed of the zoo generators (the shipped small checkpoints are seed 0)

# %%
from rearlib.experiments.notebook import setup

ctx = setup(notebook="09_vapi", scale=scale, seed=seed, device=device,
            reports_dir=reports_dir, figures_dir=figures_dir)

# %%
import time

import matplotlib.pyplot as plt
import pandas as pd
import torch

import rearlib.metrics as M
from rearlib import scales, vapi, vapi_claims, vapi_figures, vapi_report, vapi_units
from rearlib.experiments import studies_plan
from rearlib.data import NUM_CLASSES
from rearlib.experiments.evaluation import Evaluator, run_model_key
from rearlib.experiments.zoo import get_generator, run_dir, run_hash, train_config
from rearlib.metrics.classifier import EXTRACTOR_NAME as CLASSIFIER, get_classifier
from rearlib.scales import GENERATOR_DATA as DATA
from rearlib.tokenizers import get_tokenizer

if ctx.scale == "paper":
    raise ValueError("09_vapi post-trains the zoo's AR and reAR generators, which exist at 'smoke' and 'small' only. "
                     "For LlamaGen/ImageNet use `python -m rearlib vapi --scale paper --generator ... --out ...` "
                     "(the released C2I recipe) and evaluate with `python -m rearlib sample fid`.")

# Per scale. The VA-π recipes (steps, batch, lr, the sweep, the controls) are rearlib.scales.VAPI[scale].
# vapi_seeds: VA-π runs per setting (seeds seed, seed + 1, ...; the run of seed s is evaluated at sampling seed s,
# as the base models are, so differences pair by seed). fid_per_class: the target samples per class for one FID
# evaluation, lowered automatically when the measured sampling speed says the planned evaluations would not fit
# gen_budget_s (at small never: every machine that resumes the study evaluates with the same count, so that its
# records complete one study). n_heldout: val images for the teacher-forced reconstruction check; n_calib:
# the first n_calib of them, G draws each, calibrate λ_p. extractor / secondary: the feature networks of the
# distribution metrics. From rearlib.scales.EVALUATION (shared with 04 and 10-13): n_ref, held-out real images (val)
# for FID; batch, images per sampler call; sampler ("graph": CUDA graphs without torch.compile).
VSCALE = scales.VAPI[ctx.scale]
SETTINGS = {
    "smoke": dict(data_size=VSCALE["data_size"], vapi_seeds=2, fid_per_class=8, fid_min_per_class=4, n_heldout=32,
                  n_calib=8, gen_budget_s=30.0, grid_per_class=3, extractor=CLASSIFIER, secondary=None),
    "small": dict(data_size=VSCALE["data_size"], vapi_seeds=3, fid_per_class=1000, fid_min_per_class=1000,
                  n_heldout=1000, n_calib=128, gen_budget_s=3600.0, grid_per_class=6,
                  extractor="inception-v3-fid", secondary=CLASSIFIER),
}[ctx.scale]
SETTINGS.update({k: scales.EVALUATION[ctx.scale][k] for k in ("n_ref", "batch", "sampler")})
if ctx.device.type == "cpu":
    # On a busy 2-core machine OpenMP threads spin-waiting for each other made the sampler ~50x slower (measured);
    # one thread is faster and predictable.
    torch.set_num_threads(1)
dev = ctx.device
data_seed = DATA[ctx.scale]["seed"]
t_start = time.time()

tok = get_tokenizer(ctx.scale, dev, progress=False)
VARIANTS = vapi_report.BASE_VARIANTS
base_models = {name: get_generator(ctx.scale, v, tokenizer=tok, seed=generator_seed, device=dev, progress=False)
               for name, v in VARIANTS.items()}
classifier = get_classifier(ctx.scale, dev)
evaluator = Evaluator(ctx.scale, tok, classifier, dev, data_seed=data_seed, extractor=SETTINGS["extractor"],
                      secondary_extractor=SETTINGS["secondary"])
base_cfg = vapi.config_for_scale(ctx.scale, seed=ctx.seed)
perceptual_fn = vapi.make_perceptual_fn(base_cfg.perceptual, scale=ctx.scale, device=dev, classifier=classifier)
PERC = perceptual_fn.metric_name
FID = M.metric_label("fid", evaluator.extractor)
IS = M.metric_label("isc_mean", CLASSIFIER)
ctx.note(f"perceptual distance in the reward and in every perceptual column: {PERC} ({perceptual_fn.reason})")
ctx.note(f"distribution metrics: {FID} and its KID / precision / recall from {evaluator.extractor} "
         f"({evaluator.extractor_id or classifier.identity})"
         + (f"; secondary, labeled: the same from {evaluator.secondary}" if evaluator.secondary else "")
         + f"; IS and class consistency from {CLASSIFIER}:{classifier.identity}")
ctx.note(f"VA-π update in {base_cfg.update_mode} mode; the AR generator's pre-training ended at lr "
         f"{train_config(ctx.scale, 'ar', tok, generator_seed).end_lr:g}")

# %% [markdown]
# ## 1 · λ_p: both reward terms with the same weight in the advantages
# After group normalisation a reward term counts by its spread among the G samples of one image. On the base AR,
# for the first `n_calib` held-out images, G tokens are drawn per position from the true prefix (the rollout
# policy), decoded and scored; the mean within-image standard deviation of the MSE and of the perceptual distance
# give the λ_p that equalises them. The runs whose reward has both terms use it, rounded to two significant digits.

# %%
ho_img, ho_lab, ho_tok = vapi_report.heldout_images(tok, SETTINGS["n_heldout"], data_seed, dev)
n_cal, G = SETTINGS["n_calib"], base_cfg.group_size
RUN_HASHES = {name: run_hash(ctx.scale, v, tok, generator_seed) for name, v in VARIANTS.items()}
BASE_KEYS = {name: run_model_key(RUN_HASHES[name], train_config(ctx.scale, v, tok, generator_seed).steps)
             for name, v in VARIANTS.items()}
calib_key = {"scale": ctx.scale, "model": BASE_KEYS["AR"], "tokenizer": tok.identity(), "lambda_p calibration": {
    "n": n_cal, "samples_per_image": G, "seed": 20_000 + ctx.seed, "data_seed": data_seed,
    "reward": base_cfg.to_dict(), "perceptual": PERC}}
calib = vapi_units.cached_table(calib_key, lambda: vapi_report.heldout_table(
    {("AR", None): base_models["AR"]}, tok, ho_img[:n_cal], ho_lab[:n_cal], ho_tok[:n_cal], base_cfg, perceptual_fn,
    PERC, seed=20_000 + ctx.seed, samples_per_image=G), dev)
cal = vapi_report.calibrate_lambda_p(calib, PERC, G)
calib["λ_p used"] = cal.lambda_p
ctx.save_csv(calib, "09_lambda_p_calibration")
ctx.note(cal.note)
calib.T

# %% [markdown]
# ## 2 · The runs, and how each model is evaluated
# | run | starts from | what differs from "AR + VA-π" |
# |---|---|---|
# | AR + VA-π | AR | the method: reward -(MSE + λ_p · ST-LPIPS(alex)), CE prior β = 0.1 |
# | reAR + VA-π | reAR | the base model |
# | AR + VA-π (CE prior only) | AR | control: the update is β · CE alone; rewards are computed and logged only |
# | AR + VA-π (shuffled rewards) | AR | control: the rewards are permuted across the batch before the advantages |
# | AR + VA-π (lr ..., N images/step) | AR | the sweep: the paper's batch (128 images x G = 8 at `small`), one run per lr |
# | AR + VA-π (MSE only) / (perceptual only) | AR | the reward ablation; "both" is the method's run |
#
# Each setting runs once per VA-π seed, with the same seeds in every setting (the controls draw the same batches,
# contexts and first samples as the method). All: G samples per image, clip 0.2, advantage clip 5, no contextual
# noise (the C2I setting), eval-mode rollout, and the update mode, batch and learning rate of
# `rearlib.scales.VAPI[scale]`. Images come from the `train` split, the one the generators were trained on.
#
# Every model is evaluated against held-out real images (val): each base model at every VA-π seed's sampling seed,
# without and with CFG; each post-trained model at its own seed's, without CFG and, except the reward ablation (the
# paper's Table 4 is without CFG), with CFG. With CFG, each base model's (g, p) is the best of a guidance sweep that
# grows at the edge holding the best FID until the optimum is bracketed (the rule and the records of the studies'
# main comparison; the note lists the scales and says whether each power's optimum is bracketed); a post-trained
# model uses its base model's. Image i of a set: class i // n_per_class, seed `image_seed(sample_seed, i)`, so two
# models evaluated at one sampling seed get identical random numbers. Below: one timed batch with and without CFG
# (after a warm-up call that builds the sampler), then the samples per evaluation: the target if all planned
# evaluations fit the generation budget, else fewer.

# %%
RUNS = vapi_report.study_runs(ctx.scale, cal.lambda_p)
VAPI_SEEDS = [ctx.seed + 1 + i for i in range(SETTINGS["vapi_seeds"])]
# Base models first, then seed-major: every run's first VA-π seed before any run's second, so that a study cut short
# covers every setting.
MODELS = [(name, None) for name in VARIANTS] + [(run, s) for s in VAPI_SEEDS for run in RUNS]
# The guidance of the "with CFG" evaluations is chosen on sampling seed `seed`, apart from the evaluations' seeds, by
# the studies' rule with the studies' evaluator (the default plan's feature networks), so that where notebook 10's
# main comparison sweeps these very generators, each notebook reuses the other's records.
PLAN = studies_plan.plan_settings(ctx.scale)
sweep_primary, sweep_secondary = studies_plan.plan_extractors(ctx.scale)
sweep_ev = Evaluator(ctx.scale, tok, classifier, dev, data_seed=data_seed, extractor=sweep_primary,
                     secondary_extractor=sweep_secondary, progress=False)
SWEEP_FID = M.metric_label("fid", sweep_ev.extractor)
N_SWEEP = scales.EVALUATION[ctx.scale]["n_per_class"]


def fid_at(name: str, g: float, p: float) -> float:
    return sweep_ev.evaluate(BASE_KEYS[name], base_models[name], n_per_class=N_SWEEP, cfg_scale=g, cfg_power=p,
                             sample_seed=ctx.seed)[SWEEP_FID]


CFG_CHOICE = vapi_report.cfg_choice(fid_at, list(VARIANTS), scales.STUDIES[ctx.scale]["cfg_scales"],
                                    scales.STUDIES[ctx.scale]["cfg_powers"], PLAN["cfg_max_added"],
                                    f"{SWEEP_FID} on sampling seed {ctx.seed} ({N_SWEEP * NUM_CLASSES} samples)")
ctx.note(CFG_CHOICE.note)
g_ar, p_ar = CFG_CHOICE.by_model["AR"]
speed = pd.DataFrame([{"model": "AR", "CFG": c, "batch": SETTINGS["batch"], "device": str(dev),
                       "images/s": evaluator.time_sampler(base_models["AR"], g_ar if c else None, p_ar,
                                                          seed=10_000 + ctx.seed)} for c in (False, True)])
ctx.save_csv(speed, "09_sampling_speed")
ips = speed.set_index("CFG")["images/s"]
items = vapi_report.eval_items(MODELS, VAPI_SEEDS, RUNS)
n_cfg = sum(it.cfg for it in items)
plan = vapi_report.plan_fid(ips[False], ips[True], len(items) - n_cfg, n_cfg, NUM_CLASSES,
                            SETTINGS["fid_per_class"], SETTINGS["fid_min_per_class"], SETTINGS["gen_budget_s"])
n_pc, n_fid = plan.per_class, plan.per_class * NUM_CLASSES
ctx.note(f"sampling speed: {ips[False]:.0f} images/s without CFG, {ips[True]:.0f} with CFG on {dev}; "
         f"{len(items)} evaluations x {n_fid} samples, estimated {n_pc * plan.seconds_per_class_sample:.0f} s of "
         f"generation (budget {SETTINGS['gen_budget_s']:.0f} s)"
         + (f"; REDUCED from the target {SETTINGS['fid_per_class'] * NUM_CLASSES} samples" if plan.reduced else ""))
speed

# %% [markdown]
# ## 3 · Post-training and scoring, model by model
# Runs are cached under `artifacts/vapi/` (keyed by the base generator's training recipe and the VA-π config) and
# resume if interrupted; held-out scores and evaluations are records under `artifacts/eval_records/`, grids under
# `artifacts/vapi_grids/` (the base generators' evaluation records are shared with notebooks 04 and 10). Each line
# says what the model needed: its records only, scoring (weights at hand), or post-training first.
# "post-training time" in the tables is the run record's sum of step times (sampling, decoding, reward, update;
# checkpoint writes excluded), so a cached run reports the time of the run that did the work.

# %%
source = vapi.EmbeddedSource(SETTINGS["data_size"], tok.resolution, "train", data_seed)
GRID_MODELS = ("AR", "AR + VA-π", "AR + VA-π (shuffled rewards)", "reAR", "reAR + VA-π")
study = vapi_units.VAPIStudy(
    scale=ctx.scale, tokenizer=tok, evaluator=evaluator, base_models=base_models,
    base_keys=BASE_KEYS,
    runs=RUNS, seeds=VAPI_SEEDS, source=source, data_size=SETTINGS["data_size"], data_seed=data_seed,
    heldout=(ho_img, ho_lab, ho_tok), heldout_cfg=RUNS[vapi_report.METHOD].cfg, heldout_seed=10_000 + ctx.seed,
    perceptual_fn=perceptual_fn, perceptual=PERC, n_per_class=n_pc, cfg_by_model=CFG_CHOICE.by_model,
    grid_models=GRID_MODELS,
    grid_per_class=SETTINGS["grid_per_class"], grid_seed=ctx.seed, device=dev)
units = {}
for model in MODELS:
    t0 = time.time()
    units[model] = study.unit(model)
    name, vseed = model
    print(f"{name}{'' if vseed is None else f', VA-π seed {vseed}'}: {units[model].work} ({time.time() - t0:.0f} s)")

results = {(run, s): units[(run, s)].result for run in RUNS for s in VAPI_SEEDS}
ctx.save_csv(vapi_report.history_table(results, RUNS), "09_vapi_history")
runs = vapi_report.runs_table(results, RUNS)
ctx.save_csv(runs, "09_vapi_runs")
runs.set_index(["run", "vapi_seed"]).T

# %% [markdown]
# ## 4 · Reward curves
# Per step, over the step's B·G sampled sequences: the mean reward and its parts (MSE on [-1, 1] images, the
# perceptual distance, each as logged before the step's update), and the CE prior. The reward of the one-term runs
# is on another scale, so the panels of the parts are the ones to compare; the MSE-only run has no
# perceptual line. The CE-prior-only control logs rewards it does not train on. The sweep is drawn apart (its batch
# differs).

# %%
for name, groups in (("09_reward_curves", ("method", "control", "reward ablation")),
                     ("09_reward_curves_lr_sweep", ("lr sweep",))):
    shown = [r for r, s in RUNS.items() if s.group in groups]
    fig = vapi_figures.reward_curves(results, shown, VAPI_SEEDS, PERC, window=max(1, RUNS[shown[0]].steps // 10),
                                     scale=ctx.scale, cfg=RUNS[shown[0]].cfg)
    ctx.save_fig(fig, name)
    plt.show()

# %% [markdown]
# ## 5 · What the reward measures, on held-out images
# For `n_heldout` validation images (never used in post-training): teacher-forced logits given the true prefix,
# one token drawn per position (the same random stream for every model), decoded and compared with the real image:
# MSE on [-1, 1] images, the perceptual distance, and the runs' reward R = -(MSE + λ_p · perceptual); plus the
# teacher-forced CE and CTR (argmax = true token) of the ground-truth tokens.

# %%
heldout = pd.DataFrame([u.heldout for u in units.values()])
heldout["vapi_seed"] = heldout["vapi_seed"].astype("Int64")
ctx.save_csv(heldout, "09_heldout_reconstruction")
heldout.set_index(["model", "vapi_seed"]).round(5)

# %% [markdown]
# ## 6 · Before and after
# The primary FID and its KID / precision / recall, the secondary columns of the classifier (labeled), and class
# consistency, per model and CFG setting.

# %%
evals = pd.DataFrame([row for u in units.values() for row in u.evals])
evals["vapi_seed"] = evals["vapi_seed"].astype("Int64")
evals["scale"], evals["n target"] = ctx.scale, SETTINGS["fid_per_class"] * NUM_CLASSES
ctx.save_csv(evals, "09_fid")
order = list(dict.fromkeys(name for name, _ in MODELS))
vapi_report.fid_summary(evals, FID, order).round(3)

# %%
fig = vapi_figures.before_after(evals, order, (FID, "class consistency", IS), ("no CFG", "CFG"),
                                f"Before / after VA-π ({ctx.scale}; {n_fid} samples per point vs "
                                f"{SETTINGS['n_ref']} val images; bar = mean over seeds)")
ctx.save_fig(fig, "09_before_after")
plt.show()

# %%
k = SETTINGS["grid_per_class"]
shown = [(name, None if name in VARIANTS else VAPI_SEEDS[0]) for name in GRID_MODELS]
grids = {name if vseed is None else f"{name} (VA-π seed {vseed})": units[(name, vseed)].grid.float() / 255
         for name, vseed in shown}
fig = vapi_figures.sample_grids(grids, k, f"No CFG, identical image seeds (row = class; {ctx.scale})")
ctx.save_fig(fig, "09_samples")
plt.show()

# %% [markdown]
# ## 7 · Claims
# Computed by `rearlib.vapi_claims` from the tables above. A difference between two models is paired by seed (the
# VA-π run of seed s and the base model, both sampled at seed s) and judged by the t-interval over the VA-π seeds
# (`rearlib.experiments.verdicts.seed_difference_verdict`): "inconclusive" when the interval holds 0. The sampling
# noise (the largest FID change of a base model between sampling seeds) is reported beside it. With one generator
# training seed, other data and a far smaller model, a verdict against the paper stops at "direction reproduced". When VA-π
# does not lower FID, the note names the control that explains it: the shuffled-rewards run (does the reward drive
# the change?) and the CE-prior-only run (does the prior?).

# %%
gen_train_s, gen_gpu = vapi_report.generator_train_time(
    base_models["AR"], lambda: run_dir(ctx.scale, "ar", tok, generator_seed) / "result.json")
for c in vapi_claims.claims(runs=RUNS, runs_table=runs, heldout=heldout, evals=evals, fid_col=FID, perceptual=PERC,
                            lambda_p=cal.lambda_p, cfg_note=CFG_CHOICE.note, vapi_seeds=VAPI_SEEDS, n_fid=n_fid,
                            reduced=plan.reduced, smoke=ctx.is_smoke, generator_train_s=gen_train_s,
                            generator_gpu=gen_gpu):
    ctx.claim(**c)
print(f"total {time.time() - t_start:.1f} s")
pd.DataFrame(ctx.claims)[["claim", "ours", "verdict"]]
