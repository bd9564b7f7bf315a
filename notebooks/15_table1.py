# %% [markdown]
# # 15 · Table 1: FID of the released reAR generators
#
# The paper's headline numbers (Table 1, ImageNet 256 × 256, class-conditional): reAR-S 2.00, reAR-B 1.91 and
# reAR-L 1.86 FID (IS 295.7 / 300.9 / 316.9) with the power-cosine guidance of its App. A. This notebook measures
# them on the authors' released checkpoints with the paper's protocol (`docs/paper.md`, reAR §1.9 and §4;
# `docs/paper-scale.md` for the assets):
#
# * raster-order sampling, temperature 1, no top-k / top-p, guidance s_t = 1 + (g − 1)(1 − cos(π (t/N)^p)) / 2;
#   `cfg_settings="released"` (default) takes (g, p) from the authors' released configs (S 22 / 2.75, B and L
#   15 / 2.5), `"paper"` from the paper's appendix (B 14.5 / 2.25, L 10 / 1.75);
# * 50 images per class × 1000 classes, decoded by MaskGIT-VQGAN, written as PNGs and an ADM-style `samples.npz`
#   (the TF evaluator reads it too); with `gpus > 1` the sampling runs under `torchrun`, one process per GPU;
# * FID against the stored statistics of the ADM reference batch `VIRTUAL_imagenet256_labeled.npz`, KID and
#   precision / recall against its 10k images, all with the Inception FID network; IS only where an Inception
#   with logits is on the machine.
#
# A FID is compared with the paper only at the full 50,000 samples (it is biased upward at fewer). At `smoke`
# the same code runs on the tiny generators of the embedded dataset against its validation images: the numbers
# mean nothing there.

# %% tags=["parameters"]
scale = "smoke"        # smoke | paper
seed = 0               # sampling seed: image i gets image_seed(seed, i)
device = "auto"
reports_dir = "reports"
figures_dir = "figures"
models = None          # paper: presets to run, e.g. "rear_b,rear_l"; None: every one whose checkpoint is found
num_per_class = None   # None: rearlib.scales.SAMPLING[scale]["num_per_class"] (paper: 50 -> 50,000 images)
n_classes = None       # None: every class of the model (1000 at paper); fewer only to rehearse the path
batch_size = None      # images per sampler call (None: the scale's)
cfg_settings = "released"  # released: the authors' configs | paper: the paper's App. A values
gpus = 1               # > 1: sample with torchrun over this many GPUs of this machine
rear_s_checkpoint = None  # paper: the released reAR-S state dict (else $REARLIB_REAR_S_CHECKPOINT)
rear_b_checkpoint = None  # paper: reAR-B (else $REARLIB_REAR_B_CHECKPOINT)
rear_l_checkpoint = None  # paper: reAR-L (else $REARLIB_REAR_L_CHECKPOINT)
generator_preset = "auto"  # paper: auto takes each slot's own layout; None infers it from the tensor shapes
maskgit_path = None    # paper: maskgit-vqgan-imagenet-f16-256.bin (else $REARLIB_MASKGIT_VQGAN)
reference_batch = None  # paper: VIRTUAL_imagenet256_labeled.npz (else $REARLIB_REFERENCE_BATCH)
samples_dir = None     # folder for each model's samples (None: artifacts/table1/<scale>/<model>-<settings>)

# %%
from rearlib.experiments.notebook import check_int_param, setup

ctx = setup(notebook="15_table1", scale=scale, seed=seed, device=device,
            reports_dir=reports_dir, figures_dir=figures_dir)
num_per_class = check_int_param("num_per_class", num_per_class, optional=True)
batch_size = check_int_param("batch_size", batch_size, optional=True)
n_classes = check_int_param("n_classes", n_classes, optional=True)
gpus = check_int_param("gpus", gpus)
if isinstance(models, str):
    models = [m.strip() for m in models.split(",") if m.strip()]

# %%
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch

from rearlib import scales
from rearlib.data import render_batch
from rearlib.experiments import table1 as T1
from rearlib.experiments.assets import check_paper_assets, paper_checkpoint, reference_batch_path
from rearlib.metrics import to_uint8
from rearlib.model import load_official_state_dict
from rearlib.tokenizers import find_maskgit_checkpoint, get_tokenizer

t_start = time.time()
S = scales.SAMPLING[ctx.scale]
n_per_class = num_per_class or S["num_per_class"]
bs = batch_size or S["batch_size"]
T1.guidance("rear_s", cfg_settings)  # checks the setting's name before anything heavy runs
if gpus > 1 and ctx.device.type != "cuda":
    raise ValueError(f"gpus={gpus} needs CUDA devices; this notebook runs on {ctx.device}")

# %% [markdown]
# ## Models, tokenizer and reference
# `paper`: every input is checked first and each missing one named. `smoke`: the zoo's AR and reAR generators and
# 100 validation images of the embedded dataset as the reference.

# %%
if ctx.scale == "paper":
    given = {"rear_s": rear_s_checkpoint, "rear_b": rear_b_checkpoint, "rear_l": rear_l_checkpoint}
    found = {m: paper_checkpoint(m, p) for m, p in given.items()}
    wanted = list(models) if models else [m for m, p in found.items() if p is not None]
    if set(wanted) - set(given):
        raise ValueError(f"models: {sorted(set(wanted) - set(given))} are not released models; choose from {list(given)}")
    if not wanted:
        raise FileNotFoundError("paper scale cannot run: no checkpoint given; set rear_s_checkpoint / "
                                "rear_b_checkpoint / rear_l_checkpoint or $REARLIB_REAR_{S,B,L}_CHECKPOINT")
    check_paper_assets({m: found[m] for m in wanted}, maskgit_path, splits=(), reference_batch=reference_batch,
                       need_reference=True)
    tok_path, ref_path = find_maskgit_checkpoint(maskgit_path), reference_batch_path(reference_batch)
    tok = get_tokenizer("paper", ctx.device, path=tok_path)
    reference, ref_name = str(ref_path), ref_path.name

    def load(name):
        preset = name if generator_preset == "auto" else generator_preset
        return load_official_state_dict(found[name], preset, device=ctx.device), preset
else:
    from rearlib.experiments.zoo import get_generator

    wanted = list(models) if models else ["ar", "rear"]
    tok, tok_path = get_tokenizer(ctx.scale, ctx.device, progress=False), None
    ref_imgs = render_batch(torch.arange(100), resolution=tok.resolution, split="val")[0]
    reference, ref_name = to_uint8(ref_imgs), "embedded-val-100"
    found = {m: None for m in wanted}

    def load(name):
        return get_generator(ctx.scale, name, tokenizer=tok, device=ctx.device, progress=False), None

print(f"models {wanted}; tokenizer {type(tok).__name__} ({tok.resolution}px); reference {ref_name}; "
      f"{n_per_class} per class; guidance: {cfg_settings}; GPUs: {gpus}")

# %% [markdown]
# ## Sample and score
# One folder per model: `images/{index:06d}.png` and `samples.npz`. An interrupted run resumes where it stopped.

# %%
rows, grids = [], {}
for name in wanted:
    model, preset = load(name)
    g, p = T1.guidance(name, cfg_settings) if ctx.scale == "paper" else (S["cfg_scale"], S["cfg_power"] or 0.0)
    out = Path(samples_dir) / name if samples_dir else T1.default_samples_dir(ctx.scale, name, cfg_settings)
    s = T1.sample_model(model, tok, out, num_per_class=n_per_class, seed=ctx.seed, batch_size=bs, cfg_scale=g,
                        cfg_power=p, gpus=gpus, checkpoint=found[name], preset=preset, scale=ctx.scale,
                        tokenizer_path=tok_path, n_classes=n_classes, progress=False)
    t0 = time.perf_counter()
    # The reference's features are cached after the first model (keyed by its content, not only this name).
    m = T1.score_samples(s["npz"], reference, device=ctx.device, scale=ctx.scale, cache_name=f"table1-{ref_name}")
    with np.load(s["npz"]) as z:
        grids[name] = z["arr_0"][:: max(1, len(z["arr_0"]) // 8)][:8]
    paper_fid, paper_is = T1.PAPER_TABLE1.get(name, (np.nan, np.nan))
    rows.append({"model": name, "params (M)": sum(q.numel() for q in model.parameters()) / 1e6, "g": g, "p": p,
                 "samples": s["num_images"], "FID": m["fid"], "KID": m["kid_mean"], "precision": m["precision"],
                 "recall": m["recall"], "IS": m["isc_mean"], "paper FID": paper_fid, "paper IS": paper_is,
                 "sampling s": s["seconds"], "images/s": s["images_per_s"], "GPUs": gpus,
                 "peak GPU memory (GiB)": s["peak_memory_gib"], "scoring s": time.perf_counter() - t0,
                 "FID reference": m["fid_reference"]})
    del model
    if ctx.device.type == "cuda":
        torch.cuda.empty_cache()
table = pd.DataFrame(rows)
ctx.save_csv(table, "15_table1")
ctx.note(m["is_note"])
table.drop(columns=["FID reference"]).round(3)

# %% [markdown]
# ## Samples
# Eight images per model, spread over the classes (index i has class i // images-per-class).

# %%
fig, axes = plt.subplots(len(grids), 1, figsize=(12, 1.7 * len(grids)), squeeze=False)
for ax, (name, imgs) in zip(axes[:, 0], grids.items()):
    ax.imshow(np.concatenate(list(imgs), axis=1))
    ax.set_title(f"{name}: FID {table.set_index('model').loc[name, 'FID']:.2f} "
                 f"({table.set_index('model').loc[name, 'samples']:,} samples)", fontsize=9)
    ax.axis("off")
ctx.save_fig(fig, "15_samples")
plt.show()

# %% [markdown]
# ## Against the paper
# A row is compared only at 50,000 samples and with the guidance the paper used for it.

# %%
for r in rows:
    if ctx.scale != "paper":
        continue
    paper_fid, _ = T1.PAPER_TABLE1[r["model"]]
    verdict, note = T1.fid_verdict(r["FID"], paper_fid, r["samples"])
    if (r["g"], r["p"]) != T1.GUIDANCE["paper"][r["model"]]:
        verdict, note = "not tested", f"guidance {r['g']}/{r['p']} (released config), the paper used " \
                                      f"{'/'.join(map(str, T1.GUIDANCE['paper'][r['model']]))}; " + note
    ctx.claim(claim=f"{r['model']} FID (Table 1)", paper=f"{paper_fid:.2f}", ours=f"{r['FID']:.2f}",
              verdict=verdict, note=note)
if ctx.scale != "paper":
    ctx.note("smoke: the Table 1 path (sampling, npz, Inception FID) ran on tiny generators; no claim is tested")
ctx.note(f"sampling and scoring took {time.time() - t_start:.0f} s on {ctx.device}")
