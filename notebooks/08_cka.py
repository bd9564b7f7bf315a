# %% [markdown]
# # 08 · Where do hidden states look like code vectors? A CKA layer analysis
#
# Paper App. C.2, Fig. 9b-c (`docs/paper.md`, reAR §2.4). reAR aligns two hidden layers of the generator
# with the tokenizer's codebook: an early layer with the **current** token's code vector (encoding, "EN") and a
# late layer with the **next** token's code vector (decoding, "DE"). The paper picks EN at layer 0 and DE at
# about ¾ depth (layer 15 of 20) because of this analysis: linear CKA (Eq. 13) between every block's output and
#
# * the *encoded* embedding z(x_t), the codebook vector of the token at the input position, and
# * the *decoded* embedding z(x_{t+1}), the codebook vector of the token to be predicted.
#
# The paper's findings: (1) the decoded CKA is lower than the encoded one; (2) the encoded CKA peaks at the
# input layer and decays; (3) the decoded CKA peaks around ¾ depth and (4) drops again in the last layers;
# and reAR raises both curves where it aligns them (encoded 0.39 → 0.74 at layer 0, decoded 0.099 → 0.130 at
# layer 15).
#
# Our choices (`docs/paper.md`, reAR §6 item 9): clean validation input, image-token positions only (CLS and class
# positions excluded), block outputs before the final adaLN, all positions of every image pooled (rows = positions),
# linear CKA accumulated exactly in float64. For confidence intervals the images are split into disjoint folds and CKA
# is computed per fold; points are the mean over folds with a 95% t-interval (the all-images value is saved
# too). AR and reAR see the same images and folds, so their differences are paired per fold.

# %% tags=["parameters"]
scale = "smoke"        # smoke | small | paper
seed = 0
device = "auto"
reports_dir = "reports"
figures_dir = "figures"
n_images = None        # None: rearlib.scales.ANALYSIS[scale]["cka_images"]
n_folds = 5            # disjoint image folds for the confidence intervals
maskgit_path = None    # paper: maskgit-vqgan-imagenet-f16-256.bin (else $REARLIB_MASKGIT_VQGAN)
ar_checkpoint = None   # paper: the authors' vanilla AR state dict
rear_checkpoint = None  # paper: the authors' reAR state dict
generator_preset = "rear_s"  # paper: architecture of both checkpoints (None: infer from the tensor shapes)
data_root = None       # paper: ImageNet root holding val/<wnid>/*.JPEG (else $REARLIB_DATA/imagenet)

# %%
from rearlib import scales
from rearlib.experiments.notebook import check_int_param, setup

ctx = setup(notebook="08_cka", scale=scale, seed=seed, device=device,
            reports_dir=reports_dir, figures_dir=figures_dir)
# two images at least: the confidence intervals need two folds
n_images = check_int_param("n_images", n_images, minimum=2, optional=True)
n_folds = check_int_param("n_folds", n_folds, minimum=2)

# %%
import time

import matplotlib.pyplot as plt
import numpy as np
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
n_use = int(n_images) if n_images is not None else SETTINGS["cka_images"]
if not isinstance(n_folds, int) or n_folds < 2:
    raise ValueError(f"n_folds must be an integer >= 2 (folds give the confidence intervals), got {n_folds!r}")

# %% [markdown]
# ## Models and token sequences

# %%
# At `paper` scale this first checks every input and names each missing one, before anything heavy is loaded.
assets = AnalysisAssets(ctx.scale, ctx.device, checkpoints={"ar": ar_checkpoint, "rear": rear_checkpoint},
                        preset=generator_preset, maskgit_path=maskgit_path, data_root=data_root,
                        batch_size=SETTINGS["batch_size"])
tok = assets.tokenizer
models = assets.generators()
tokens, labels, data_desc = assets.tokens("val", n_use)
n_img = len(tokens)
depth = models["ar"].config.depth
if models["rear"].config.depth != depth:
    raise ValueError("AR and reAR must have the same depth for a layer-by-layer comparison")
rear_cfg = models["rear"].config
# Our reAR's alignment layers; an unaligned model falls back to the paper's rule (EN at the input, DE at 3/4 depth).
en_layer = rear_cfg.encode_align_layer if rear_cfg.encode_align_layer is not None else PN.ENCODE_LAYER
de_layer = rear_cfg.decode_align_layer if rear_cfg.decode_align_layer is not None else round(
    PN.DECODE_LAYER / PN.ANALYSIS_DEPTH * (depth - 1))
folds = [f.tolist() for f in np.array_split(np.arange(n_img), min(n_folds, n_img))]
print(f"{data_desc}; {depth}-block generators (hidden {rear_cfg.hidden}); codebook {tuple(tok.codebook.shape)}; "
      f"reAR aligns EN@{en_layer}, DE@{de_layer}; {len(folds)} folds of {min(map(len, folds))}-"
      f"{max(map(len, folds))} images")

# %% [markdown]
# ## CKA of every block, both targets, AR and reAR
# One row per (model, fold, target, layer); fold `all` pools every image. Rows per fold: images × positions.

# %%
frames = []
for v, model in models.items():
    for f, idx in enumerate(folds + [list(range(n_img))]):
        df = A.cka_layers(model, tok.codebook, tokens[idx].to(ctx.device), labels[idx], image_ids=idx,
                          batch_size=SETTINGS["batch_size"], progress=False)
        df.insert(0, "model", A.MODEL_NAMES[v])
        df.insert(1, "fold", str(f) if f < len(folds) else "all")
        frames.append(df)
rows = pd.concat(frames, ignore_index=True)
rows["scale"], rows["dataset"] = ctx.scale, data_desc
ctx.save_csv(rows, "08_cka_rows")
fold_rows = rows[rows.fold != "all"]
stats = A.mean_ci(fold_rows, by=["model", "target", "layer"], values=["cka"])
stats["relative_depth"] = stats["layer"] / max(1, depth - 1)
ctx.save_csv(stats, "08_cka_summary")
W = plots.wide_ci(stats, ["model", "target", "layer"])
W["relative_depth"] = W["layer"] / max(1, depth - 1)
W.pivot_table(index="layer", columns=["target", "model"], values="cka").round(4)

# %% [markdown]
# ## Fig. 9b-c, ours next to the paper's
# x: relative depth (layer / (depth − 1)), so our curves and the paper's 20-block ones (layers 0, 5, 10,
# 15, 19) share an axis. Points: mean over folds with 95% intervals; stars: each curve's peak. Vertical lines:
# our reAR's alignment layers and the paper's DE@15. The paper's curves are a reference for their *shape*: their
# level depends on the widths compared (see the text below).

# %%
found = A.cka_findings(fold_rows, W, depth, en_layer, de_layer, n_img, ctx.scale)
peaks = found.values["peaks"]
fig = plots.cka_curves(W, A.paper_reference("D"), peaks, depth=depth, encode_layer=en_layer, decode_layer=de_layer,
                       title=f"CKA of block outputs with codebook vectors ({ctx.scale}; {data_desc.split(',')[0]}, "
                             f"n = {n_img} images in {len(folds)} folds, {depth} blocks)")
ctx.save_fig(fig, "08_cka_layers")
plt.show()

# %% [markdown]
# ## Verdicts
# Statistics per fold (the same folds for both models): a quantity is computed on each fold and summarised by
# its mean and 95% t-interval over folds (`rearlib.analysis.cka_findings`).
#
# **Rules.** Qualitative claims (no number in the paper) are *reproduced* when they hold with the interval
# excluding 0 (for the peak location: within one block of the paper's relative position 15/19, and the last
# block below the peak), *direction reproduced* when only a weaker form holds (stated per claim), else *not
# reproduced*. The quantitative reAR − AR differences are *direction reproduced* when positive with an interval
# excluding 0, *reproduced* only at `paper` scale when the paper's digitised difference (±0.01) is inside our
# interval. At `smoke` scale every verdict is *not tested*.

# %%
for claim in found.claims:
    ctx.claim(**claim)
pd.DataFrame([{"effect": k, **v} for k, v in found.effects.items()])

# %% [markdown]
# ## Reading the numbers
# The text below is generated from the computed results.

# %%
P, enc0, target_layer = found.values["paper"], found.values["encoded_at_0"], found.values["target_layer"]
lines = [f"**{n_img} images in {len(folds)} folds, {depth}-block generators, scale `{ctx.scale}`.**", ""]
if ctx.is_smoke:
    lines.append("At smoke scale the models are seconds old and the image set is tiny: nothing below is evidence.")
lines.append(
    f"Encoded CKA at layer 0: AR {enc0['AR']:.3f}, reAR {enc0['reAR']:.3f} (paper {P[('AR', 'encoded', 0)]:.2f} and "
    f"{P[('reAR', 'encoded', 0)]:.2f}); the decoded curves peak at layer {peaks[('AR', 'decoded')]} (AR) and "
    f"{peaks[('reAR', 'decoded')]} (reAR) of {depth}, where the paper's rule ({PN.DECODE_LAYER} of "
    f"{PN.ANALYSIS_DEPTH}) would put layer {target_layer:.1f}.")
if ctx.scale != "paper":
    lines.append(
        f"Absolute CKA values depend on the widths compared: our hidden states have {rear_cfg.hidden} dimensions "
        f"and our code vectors {tok.code_dim} (the paper's reAR-S: {PN.ANALYSIS_HIDDEN}, and {PN.TOKENIZER['name']}'s "
        f"{PN.TOKENIZER['code_dim']}-dimensional codes), and linear CKA between a wide and a narrow "
        "representation is bounded by how much of the wide one's variance the narrow one can explain.")
    if not found.values["near"]:
        lines.append(
            f"The decoded peak sits away from ¾ depth. With only {depth} blocks each block is "
            f"{1 / max(1, depth - 1):.0%} of the depth, so 'about ¾' is a coarse target; and a "
            "small model trained briefly on a simple dataset may form its next-token prediction in different "
            f"blocks than a {PN.ANALYSIS_DEPTH}-block ImageNet model.")
    if rear_cfg.decode_align_layer is not None:
        lines.append(f"Our reAR is *trained* to align block {de_layer} with the next code vector, so its decoded "
                     f"CKA at that block is a direct readout of the alignment: reAR - AR = "
                     f"{A.format_ci(found.effects['reAR - AR, decoded'])}.")
display(Markdown("\n\n".join(lines)))
ctx.note(f"08: {n_img} images, {len(folds)} folds, {depth} layers x 2 targets x 2 models in "
         f"{time.time() - t_start:.0f}s")
