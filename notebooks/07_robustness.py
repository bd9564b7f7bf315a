# %% [markdown]
# # 07 · Robustness of next-token prediction: AR vs reAR
#
# Paper App. C.1, Fig. 9a (`docs/paper.md`, reAR §2.3). reAR trains on *noisy* context (a fraction of the
# input tokens replaced at random, annealed to zero) and aligns hidden states with the tokenizer's code
# vectors. If that works, the model should (a) predict the next token a little better on images it has never
# seen, i.e. generalize better, and (b) lose less accuracy when part of its context is wrong, the situation it
# faces during sampling.
#
# The measurement is the teacher-forced correct-token ratio (CTR, Eq. 8): the fraction of positions where
# `argmax p(· | x̃_<t)` equals the true token `x_t`, on
#
# * **trained data**: images the generator was trained on (here: the first images of its training set, the
#   un-flipped view), and **unseen data**: validation images;
# * **clean** context (x̃ = x) and **noisy** context: exactly 10% of the context tokens x_1..x_{N-1} replaced by a
#   uniformly drawn *different* code (the same corrupted positions and codes for AR and reAR, so the
#   comparison is paired per image).
#
# The paper's numbers (%): AR 12.8 / 11.8 (trained / unseen, clean), 9.1 / 8.3 (noisy); reAR 12.9 / 12.3 and
# 9.5 / 9.0. Model sizes and image counts are not stated there.

# %% tags=["parameters"]
scale = "smoke"        # smoke | small | paper
seed = 0
device = "auto"
reports_dir = "reports"
figures_dir = "figures"
n_images = None        # per data set; None: rearlib.scales.ANALYSIS[scale]["images"]
maskgit_path = None    # paper: maskgit-vqgan-imagenet-f16-256.bin (else $REARLIB_MASKGIT_VQGAN)
ar_checkpoint = None   # paper: the authors' vanilla AR state dict
rear_checkpoint = None  # paper: the authors' reAR state dict
generator_preset = "rear_s"  # paper: architecture of both checkpoints (None: infer from the tensor shapes)
data_root = None       # paper: ImageNet root with train/<wnid>/ and val/<wnid>/ (else $REARLIB_DATA/imagenet)

# %%
from rearlib import scales
from rearlib.experiments.notebook import check_int_param, setup

ctx = setup(notebook="07_robustness", scale=scale, seed=seed, device=device,
            reports_dir=reports_dir, figures_dir=figures_dir)
n_images = check_int_param("n_images", n_images, optional=True)

# %%
import time

import matplotlib.pyplot as plt
import pandas as pd
import torch
from IPython.display import Markdown, display

import rearlib.analysis as A
from rearlib import plots
from rearlib.analysis import paper_numbers as PN
from rearlib.experiments.assets import AnalysisAssets

t_start = time.time()
if ctx.is_smoke and ctx.device.type == "cpu":
    # Smoke tensors are tiny: on a shared 2-core machine extra intra-op threads only add synchronisation.
    torch.set_num_threads(1)
SETTINGS = dict(scales.ANALYSIS[ctx.scale])
if n_images is not None:
    SETTINGS["images"] = int(n_images)

# %% [markdown]
# ## Models and token sequences
# At `smoke` / `small` the "trained" tokens come from exactly the pipeline the zoo trained on
# (`rearlib.experiments.zoo.get_tokens`, first images, un-flipped view); at `paper` from ImageNet train images, ADM
# centre-cropped (the authors trained on augmented crops of them).

# %%
# At `paper` scale this first checks every input and names each missing one, before anything heavy is loaded.
assets = AnalysisAssets(ctx.scale, ctx.device, checkpoints={"ar": ar_checkpoint, "rear": rear_checkpoint},
                        preset=generator_preset, maskgit_path=maskgit_path, data_root=data_root,
                        splits=("train", "val"), batch_size=SETTINGS["batch_size"])
tok = assets.tokenizer
models = assets.generators()
sets = {"trained": assets.tokens("train", SETTINGS["images"]), "unseen": assets.tokens("val", SETTINGS["images"])}
n_img = {k: len(v[0]) for k, v in sets.items()}
for k, (t, y, desc) in sets.items():
    print(f"{k}: {desc}, tokens {tuple(t.shape)}")
if ctx.scale != "paper":
    DATA, RECIPE = scales.GENERATOR_DATA[ctx.scale], scales.GENERATOR_TRAINING[ctx.scale]
    views = 2 if DATA["flip"] else 1
    epochs = RECIPE["steps"] * RECIPE["batch_size"] / (DATA["train_size"] * views)
    train_desc = (f"{RECIPE['steps']} steps x batch {RECIPE['batch_size']} over "
                  f"{DATA['train_size']} images x {views} view(s) = {epochs:.1f} passes")
else:
    train_desc = f"the authors' schedule ({PN.TRAINING_EPOCHS} epochs per the paper)"
print("training:", train_desc)

# %% [markdown]
# ## Teacher-forced CTR, clean and noisy
# One row per (model, data, condition, image). `ctr_after_noisy` / `ctr_after_clean` split the noisy rows by
# whether the token right before the target was one of the corrupted ones.

# %%
frames = []
for v, model in models.items():
    for data_name, (tokens, labels, desc) in sets.items():
        # Image ids differ between the two sets so that their noise draws are independent.
        offset = 0 if data_name == "trained" else 10_000_000
        df = A.robustness(model, tokens.to(ctx.device), labels, noise_fraction=SETTINGS["noise_fraction"],
                          repeats=SETTINGS["repeats"], generator=ctx.seed, batch_size=SETTINGS["batch_size"],
                          image_ids=list(range(offset, offset + len(tokens))), progress=False)
        df.insert(0, "model", A.MODEL_NAMES[v])
        df.insert(1, "data", data_name)
        df["dataset"] = desc
        frames.append(df)
rows = pd.concat(frames, ignore_index=True)
rows["scale"] = ctx.scale
rows["ctr_percent"] = 100 * rows["ctr"]
ctx.save_csv(rows, "07_robustness_rows")
stats = A.mean_ci(rows, by=["model", "data", "condition"], values=["ctr_percent", "noise_rate", "ctr_after_noisy",
                                                                  "ctr_after_clean"])
ctx.save_csv(stats, "07_robustness_summary")
stats[stats.metric == "ctr_percent"].pivot_table(index=["data", "condition"], columns="model", values="mean").round(2)

# %% [markdown]
# ## Fig. 9a, ours next to the paper's
# Bars: mean teacher-forced CTR (%) with 95% t-intervals over images; higher is better. The two panels have their
# own y-axes: absolute CTR depends on the data and the tokenizer (a synthetic one-object dataset is far more
# predictable than ImageNet), so only the *differences* between bars are comparable in kind.

# %%
fig = plots.robustness_bars(stats, A.paper_reference("C"), SETTINGS["noise_fraction"],
                            ours_title=f"ours ({ctx.scale}; n = {n_img['trained']} trained + {n_img['unseen']} "
                                       "unseen images)")
ctx.save_fig(fig, "07_robustness")
plt.show()

# %% [markdown]
# ## Verdicts
# All effects are differences in percentage points (pp) of CTR (`rearlib.analysis.robustness_findings`):
#
# * reAR − AR on the same images (paired per image);
# * the generalization gap (trained − unseen) of AR minus that of reAR: a difference of two independent means
#   of the per-image differences, with a Welch interval;
# * the drop under noise (clean − noisy) of AR minus that of reAR (paired per image, same corrupted context).
#
# **Rule** (`rearlib.experiments.verdicts`). *direction reproduced*: the mean effect has the paper's sign and its
# 95% interval excludes 0. *reproduced*: additionally the paper's value lies in our interval widened by ±0.1 pp
# (the paper prints one decimal) - possible only at `paper` scale; at `small` scale absolute CTR depends on data
# and tokenizer, so magnitudes are not comparable. *not reproduced*: anything else. At `smoke` scale verdicts are
# *not tested*.

# %%
found = A.robustness_findings(rows, SETTINGS["noise_fraction"], ctx.scale, n_img, train_desc)
for claim in found.claims:
    ctx.claim(**claim)
for name, table in found.tables.items():
    ctx.save_csv(table, name)
found.tables["07_robustness_effects"]

# %% [markdown]
# ## Where the noise hurts
# In the noisy condition, the CTR of targets right after a corrupted token versus after an intact one. A model
# that leans on the immediately preceding token loses most right after a corruption.

# %%
local = stats[(stats.condition == "noisy") & stats.metric.isin(["ctr_after_noisy", "ctr_after_clean"])]
local_tab = local.pivot_table(index=["model", "data"], columns="metric", values="mean")
local_tab["difference (pp)"] = 100 * (local_tab["ctr_after_clean"] - local_tab["ctr_after_noisy"])
local_tab.round(4)

# %% [markdown]
# ## Reading the numbers
# The text below is generated from the computed results.

# %%
def fmt(e):
    return A.format_ci(e, 2, " pp")


def cell(m, d, c):
    return A.robustness_per_image(rows, m, d, c).mean()


e1, e2, e3 = (found.effects[k] for k in found.values["paper_diff"])
p1, p2, p3 = found.values["paper_diff"].values()
P, gap_ar = found.values["paper"], found.values["gap_ar"]
lines = [f"**{n_img['trained']} trained + {n_img['unseen']} unseen images, scale `{ctx.scale}`.**", ""]
if ctx.is_smoke:
    lines.append("At smoke scale the models are seconds old and the image sets are tiny: nothing below is evidence.")
lines.append(
    f"Clean teacher-forced CTR: AR {cell('AR', 'trained', 'clean'):.1f}% / {cell('AR', 'unseen', 'clean'):.1f}% "
    f"(trained / unseen), reAR {cell('reAR', 'trained', 'clean'):.1f}% / {cell('reAR', 'unseen', 'clean'):.1f}%; "
    f"the paper's models reach {P[:, :, 'clean'].min():.1f}-{P[:, :, 'clean'].max():.1f}%. With "
    f"{SETTINGS['noise_fraction']:.0%} of the context corrupted: AR "
    f"{cell('AR', 'unseen', 'noisy'):.1f}%, reAR {cell('reAR', 'unseen', 'noisy'):.1f}% on unseen images.")
if ctx.scale != "paper":
    lines.append(
        "Absolute CTR is not comparable with the paper's: ShapeScenes-10 images (one object on a texture crop) "
        f"tokenized by our f = {tok.resolution // tok.grid_size[0]}, K = {tok.codebook_size} tokenizer are a "
        f"different prediction problem from ImageNet under {PN.TOKENIZER['name']}.")
lines.append(f"reAR - AR on unseen clean images: {fmt(e1)} (paper {p1:+.1f} pp).")
if e1["hi"] < 0:
    lines.append("Here reAR is *less* accurate than AR under teacher forcing. Its training objective spends "
                 "capacity on noisy inputs and on the alignment heads; with a small model and a short schedule "
                 "that cost can outweigh the regularization benefit the paper sees on ImageNet.")
lines.append(f"AR's own generalization gap is {fmt(gap_ar)}; the gap difference AR - reAR is {fmt(e2)} "
             f"(paper {p2:+.1f} pp, clean).")
if ctx.scale != "paper" and gap_ar["lo"] <= 0:
    lines.append(f"Our AR shows no clear overfitting (the CI of its gap reaches 0; training: {train_desc}), so there "
                 f"is little gap for reAR to close; the paper's models train for {PN.TRAINING_EPOCHS} epochs, where "
                 "overfitting is real.")
lines.append(f"Under noise, AR loses {fmt(e3)} more than reAR on unseen images (paper {p3:+.1f} pp).")
display(Markdown("\n\n".join(lines)))
ctx.note(f"07: {n_img['trained']} trained + {n_img['unseen']} unseen images, noise {SETTINGS['noise_fraction']:.0%}, "
         f"{SETTINGS['repeats']} noise draw(s), in {time.time() - t_start:.0f}s")
