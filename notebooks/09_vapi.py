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
import time

import matplotlib.pyplot as plt
import pandas as pd
import torch
from tqdm.auto import tqdm

import rearlib.metrics as M
from rearlib import scales, vapi, vapi_figures, vapi_report
from rearlib.data import NUM_CLASSES
from rearlib.experiments.evaluation import Evaluator, run_model_key
from rearlib.experiments.zoo import get_generator, run_dir, run_hash, train_config
from rearlib.metrics.classifier import EXTRACTOR_NAME, get_classifier
from rearlib.runtime import artifact_dir, config_hash
from rearlib.sample import generate
from rearlib.scales import GENERATOR_DATA as DATA
from rearlib.tokenizers import get_tokenizer

if ctx.scale == "paper":
    raise ValueError("09_vapi post-trains the zoo's AR and reAR generators, which exist at 'smoke' and 'small' only. "
                     "For LlamaGen/ImageNet use `python -m rearlib vapi --scale paper --generator ... --out ...` "
                     "(the released C2I recipe) and evaluate with `python -m rearlib sample fid`.")

# Per scale. steps: VA-π optimizer steps (the library's per-scale recipe, rearlib.scales.VAPI: a few at smoke,
# 100 at small as the paper's C2I run). vapi_seeds: VA-π runs per setting (seeds seed, seed + 1, ...; each is
# evaluated, so the table shows the run-to-run spread of post-training itself). fid_per_class: the target samples
# per class for one FID evaluation, lowered automatically when the measured sampling speed says the planned
# evaluations would not fit gen_budget_s.
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
# Each setting runs once per VA-π seed. All with the CE prior (β = 0.1), G samples per image, clip 0.2, advantage
# clip 5, no contextual noise (the C2I setting), the code's eval-mode rollout and train-mode update, and the scale's
# batch size and learning rate (`rearlib.scales.VAPI`; at `small` lr 1e-5, an untuned choice for our 8-block model,
# see the module). Images come from the `train` split, the one the generators were trained on. Runs are cached
# under `artifacts/vapi/` (keyed by the base generator's training recipe and the VA-π config) and resume if
# interrupted. "post-training time" is the run record's sum of step times (sampling, decoding, reward, update;
# checkpoint writes excluded), so a cached run reports the time of the run that did the work. Tables, figures and
# verdicts are computed by `rearlib.vapi_report` and `rearlib.vapi_figures`.

# %%
RUNS = {
    "AR + VA-π": ("AR", "MSE + perceptual", {}),
    "reAR + VA-π": ("reAR", "MSE + perceptual", {}),
    "AR + VA-π (MSE only)": ("AR", "MSE only", {"reward_perceptual_weight": 0.0}),
    "AR + VA-π (perceptual only)": ("AR", "perceptual only", {"reward_mse_weight": 0.0}),
}
source = vapi.EmbeddedSource(SETTINGS["data_size"], tok.resolution, "train", data_seed)
# The model part of evaluation keys: the base generators' training recipe and final step (rearlib.experiments.zoo),
# and for a post-trained model the hash of its VA-π run key (which holds the base recipe).
# Every model is named (model, VA-π seed); the base generators have no VA-π seed (None).
VAPI_SEEDS = [ctx.seed + i for i in range(SETTINGS["vapi_seeds"])]
model_keys = {(name, None): run_model_key(run_hash(ctx.scale, v, tok, generator_seed),
                                          train_config(ctx.scale, v, tok, generator_seed).steps)
              for name, v in VARIANTS.items()}
post, results = {}, {}
for run, (base, reward, overrides) in RUNS.items():
    for vseed in VAPI_SEEDS:
        cfg = base_cfg.replace(seed=vseed, **overrides)
        key = vapi_report.run_key(model_keys[(base, None)], tok.identity(), cfg, SETTINGS["steps"],
                                  SETTINGS["data_size"], data_seed, PERC, dev.type)
        out = artifact_dir("vapi", key)
        print(f"{run}, VA-π seed {vseed}: {out}")
        r = vapi.post_train(copy.deepcopy(base_models[base]), tok, source, cfg, SETTINGS["steps"], out, dev,
                            perceptual_fn=perceptual_fn, scale=ctx.scale, progress=True)
        if r["status"] != "completed":
            raise RuntimeError(f"{run} (VA-π seed {vseed}) stopped at step {r['step']} of {r['steps']}; "
                               "re-run this cell to resume")
        post[(run, vseed)], results[(run, vseed)] = r["model"], r
        model_keys[(run, vseed)] = {"kind": "vapi", "run": config_hash(key), "step": r["step"]}

history = vapi_report.history_table(results, RUNS)
ctx.save_csv(history, "09_vapi_history")
runs = vapi_report.runs_table(results, RUNS, base_cfg)
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
fig = vapi_figures.reward_curves(results, RUNS, VAPI_SEEDS, PERC, window=max(1, SETTINGS["steps"] // 10),
                                 scale=ctx.scale, cfg=base_cfg)
ctx.save_fig(fig, "09_reward_curves")
plt.show()

# %% [markdown]
# ## 3 · What the reward measures, on held-out images
# For `n_heldout` validation images (never used in post-training): teacher-forced logits given the true prefix,
# one token drawn per position (the same random stream for every model), decoded and compared with the real image:
# MSE on [-1, 1] images, the perceptual distance, and R = -(MSE + perceptual) with the paper's unit weights; plus
# the teacher-forced CE and CTR (argmax = true token) of the ground-truth tokens.

# %%
ho_img, ho_lab, ho_tok = vapi_report.heldout_images(tok, SETTINGS["n_heldout"], data_seed, dev)
score_cfg = base_cfg.replace(reward_mse_weight=1.0, reward_perceptual_weight=1.0)
all_models = {**{(name, None): m for name, m in base_models.items()}, **post}
# The same random stream for every model (common random numbers).
heldout = vapi_report.heldout_table(all_models, tok, ho_img, ho_lab, ho_tok, score_cfg, perceptual_fn, PERC,
                                    seed=10_000 + ctx.seed)
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
plan = vapi_report.plan_fid(ips[False], ips[True], n_nocfg, n_cfg, NUM_CLASSES, SETTINGS["fid_per_class"],
                            SETTINGS["fid_min_per_class"], SETTINGS["gen_budget_s"])
n_pc, reduced = plan.per_class, plan.reduced
n_fid = n_pc * NUM_CLASSES
ctx.note(f"sampling speed: {ips[False]:.0f} images/s without CFG, {ips[True]:.0f} with CFG on {dev}; "
         f"{n_nocfg + n_cfg} evaluations x {n_fid} samples, estimated {n_pc * plan.seconds_per_class_sample:.0f} s of "
         f"generation (budget {SETTINGS['gen_budget_s']:.0f} s)"
         + (f"; REDUCED from the target {SETTINGS['fid_per_class'] * NUM_CLASSES} samples" if reduced else ""))
speed

# %% [markdown]
# ## 5 · Before and after: FID[rearlib-classifier], IS, KID, precision / recall, class consistency
# Against held-out real images (val). Without CFG, and with CFG at `rearlib.scales.SAMPLING[scale]`'s (g, p) (a
# constant g at small, printed below). Image i of a set: class i // n_per_class, seed `image_seed(seed, i)`, so
# every model gets identical random numbers.
# Cached as records under `artifacts/eval_records/` (`rearlib.experiments.evaluation`; the base generators' records
# are shared with notebooks 04 and 10).

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
fig = vapi_figures.before_after(evals[evals["sample_seed"] == ctx.seed],
                                list(dict.fromkeys(name for name, _ in all_models)),
                                (FID, "class consistency", IS), ("no CFG", f"g={CFG_G} p={CFG_P}"),
                                f"Before / after VA-π ({ctx.scale}; {n_fid} samples per point vs {n_ref} val "
                                f"images; bar = mean over VA-π seeds)")
ctx.save_fig(fig, "09_before_after")
plt.show()

# %%
k = SETTINGS["grid_per_class"]
grid_labels = torch.arange(NUM_CLASSES).repeat_interleave(k).to(dev)
grids = {}
for name in ["AR", "AR + VA-π", "reAR", "reAR + VA-π"]:
    model = base_models[name] if name in base_models else post[(name, VAPI_SEEDS[0])]
    # fast=False: the plain cached loop; this batch size would otherwise capture extra CUDA graphs.
    toks = generate(model, grid_labels, seed=ctx.seed, fast=False)
    with torch.no_grad():
        grids[name if name in base_models else f"{name} (VA-π seed {VAPI_SEEDS[0]})"] = tok.decode(toks).float().cpu()
fig = vapi_figures.sample_grids(grids, k, f"No CFG, identical image seeds (row = class; {ctx.scale})")
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
gen_train_s, gen_gpu = vapi_report.generator_train_time(
    base_models["AR"], lambda: run_dir(ctx.scale, "ar", tok, generator_seed) / "result.json")
for c in vapi_report.claims(runs=runs, heldout=heldout, evals=evals, base_models=list(base_models), fid_col=FID,
                            cfg_label=f"g={CFG_G} p={CFG_P}", perceptual=PERC, sample_seed=ctx.seed,
                            vapi_seeds=VAPI_SEEDS, n_fid=n_fid, reduced=reduced, steps=SETTINGS["steps"],
                            cfg=base_cfg, smoke=ctx.is_smoke, generator_train_s=gen_train_s, generator_gpu=gen_gpu):
    ctx.claim(**c)
print(f"total {time.time() - t_start:.1f} s")
pd.DataFrame(ctx.claims)[["claim", "ours", "verdict"]]
