# %% [markdown]
# # 02 · The tokenizer: images to token grids and back
#
# Every model in this project sees images only through a **vector-quantized tokenizer**: an encoder maps an
# image to a grid of continuous vectors, each is replaced by the nearest of `K` codebook vectors, and a decoder
# maps the grid of code vectors back to pixels. The generator predicts code *ids*; reAR additionally aligns its
# hidden states with the code *vectors* (the `codebook`), so the geometry of the codebook matters here.
#
# Which tokenizer, per scale:
# * `smoke`: a tiny VQ tokenizer trained on the spot (seconds on a CPU), cached under `artifacts/`.
#   Its numbers only prove that the code runs.
# * `small`: **our own** VQGAN-style tokenizer (64 px, 16×16 = 256 tokens as in the paper, K = 1024 codes of
#   dimension 32, l2-normalised codes), trained in-project on ShapeScenes-10 and shipped in `data/checkpoints/`.
# * `paper`: the **MaskGIT-VQGAN** the paper uses (ImageNet 256 px, f = 16, K = 1024, D = 256), loaded from its
#   official weights (`maskgit-vqgan-imagenet-f16-256.bin`, Hugging Face `fun-research/TiTok`; pass
#   `maskgit_path` or set `$REARLIB_MASKGIT_VQGAN`). Our port reproduces the authors' forward pass to float32
#   round-off (`tests/test_maskgit_conformance.py`).
#
# We check reconstruction quality (PSNR with L = 255 and SSIM, scikit-image, on uint8 images; rFID, the paper's
# tokenizer metric: FID between the reconstructions and the original images, with the Inception-v3 FID network; a
# perceptual distance, ST-LPIPS unless LPIPS can be built here), how much of the codebook is used, and whether **cosine-nearest codebook neighbours decode to similar pictures**: the
# "embedding-nearest replacement" analysis later in the project relies on that.

# %% tags=["parameters"]
scale = "smoke"        # smoke | small | paper
seed = 0
device = "auto"
reports_dir = "reports"
figures_dir = "figures"
maskgit_path = None    # paper scale: path to maskgit-vqgan-imagenet-f16-256.bin (else $REARLIB_MASKGIT_VQGAN)
data_root = None       # paper scale: ImageNet root (else $REARLIB_DATA/imagenet)
n_val = None           # validation images scored (None: the scale's setting below)
n_rfid = None          # images of the rFID (None: the scale's setting below; the paper uses all 50k val images)

# %%
from rearlib.experiments.notebook import check_int_param, setup

ctx = setup(notebook="02_tokenizer", scale=scale, seed=seed, device=device,
            reports_dir=reports_dir, figures_dir=figures_dir)

# %%
import time

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch

from rearlib.data import DatasetUnavailable, load_dataset, render_batch
from rearlib.tokenizers import get_tokenizer
from rearlib.tokenizers.vqgan import code_usage, psnr_ssim

# Per scale: validation images scored, images shown, codes shown in the neighbour picture, replacement rates;
# n_rfid: images of the rFID (the paper: all 50k ImageNet val images; the Inception network runs at ~6 images/s on
# a 2-core CPU, hence the tiny smoke set).
SETTINGS = {
    "smoke": dict(n_val=64, n_show=8, n_codes=5, n_neighbours=4, rates=(0.1, 0.25, 0.5), n_rfid=32),
    "small": dict(n_val=1000, n_show=8, n_codes=8, n_neighbours=5, rates=(0.1, 0.25, 0.5), n_rfid=10_000),
    "paper": dict(n_val=500, n_show=8, n_codes=8, n_neighbours=5, rates=(0.1, 0.25, 0.5), n_rfid=50_000),
}[ctx.scale]
SETTINGS["n_val"] = check_int_param("n_val", n_val, optional=True) or SETTINGS["n_val"]
SETTINGS["n_rfid"] = check_int_param("n_rfid", n_rfid, minimum=2, optional=True) or SETTINGS["n_rfid"]
t_start = time.time()
tok = get_tokenizer(ctx.scale, ctx.device, path=maskgit_path, data_root=data_root)
res, (gh, gw), K, D = tok.resolution, tok.grid_size, tok.codebook_size, tok.code_dim
n_params = sum(p.numel() for p in tok.parameters())
print(f"{type(tok).__name__}: {res}x{res} px -> {gh}x{gw} tokens, K={K} codes of dimension {D}, "
      f"{n_params / 1e6:.2f}M parameters, identity {tok.identity()}")
train_metrics = getattr(tok, "checkpoint_meta", {}).get("metrics")
if train_metrics:
    hw = train_metrics.get("hardware", {})
    print(f"trained for {train_metrics['steps_done']} steps in {train_metrics['train_wall_s']:.0f}s on "
          f"{hw.get('gpu') or 'CPU'}; validation at training time: PSNR {train_metrics['val']['psnr']:.2f} dB, "
          f"SSIM {train_metrics['val']['ssim']:.3f}")

# %% [markdown]
# ## Validation images
# ShapeScenes-10 `val` at the tokenizer's resolution (ImageNet val at `paper` scale when it is available).

# %%
n_val = SETTINGS["n_val"]
dataset_name = "ShapeScenes-10 val"
if ctx.scale == "paper":
    try:
        ds = load_dataset("imagenet", split="val", resolution=res, root=data_root)
        pick = torch.linspace(0, len(ds) - 1, min(n_val, len(ds))).long()  # spread over all classes
        images = torch.stack([ds[int(i)][0] for i in pick])
        n_val = len(images)
        dataset_name = "ImageNet val (ADM centre crop)"
    except DatasetUnavailable as err:
        ctx.note(f"ImageNet not available ({str(err).splitlines()[0]}); scoring ShapeScenes-10 at {res}px instead")
        images = render_batch(torch.arange(n_val), res, seed=ctx.seed, split="val")[0]
else:
    images = render_batch(torch.arange(n_val), res, seed=ctx.seed, split="val")[0]


def encode_decode(x, batch=128):
    toks, recs = [], []
    for i in range(0, len(x), batch):
        t = tok.encode(x[i:i + batch])
        toks.append(t.cpu())
        recs.append(tok.decode(t).cpu())
    return torch.cat(toks), torch.cat(recs)


tokens, recon = encode_decode(images)
psnr, ssim = psnr_ssim(images, recon)
per_image = pd.DataFrame({"image": range(n_val), "psnr_db": psnr, "ssim": ssim})
ctx.save_csv(per_image, "02_tokenizer_recon_per_image")
print(f"{dataset_name}, {n_val} images: PSNR {per_image.psnr_db.mean():.2f} ± {per_image.psnr_db.std():.2f} dB, "
      f"SSIM {per_image.ssim.mean():.3f} ± {per_image.ssim.std():.3f} (mean ± std over images)")

# %% [markdown]
# ## rFID and perceptual distance
# rFID is FID (Inception-v3 FID network, 2048-d pool features, torch-fidelity) between the reconstructions of
# `n_rfid` validation images and those same images: how far the tokenizer moves the image distribution. The
# perceptual distance compares each reconstruction with its own original.

# %%
import rearlib.metrics as M
from rearlib.metrics.inception import weights_info

n_rfid = SETTINGS["n_rfid"]
if ctx.scale == "paper" and dataset_name.startswith("ImageNet"):
    pick = torch.linspace(0, len(ds) - 1, min(n_rfid, len(ds))).long()
    rfid_images = torch.stack([ds[int(i)][0] for i in pick])
else:
    rfid_images = render_batch(torch.arange(n_rfid), res, seed=ctx.seed, split="val")[0]
n_rfid = len(rfid_images)
with torch.no_grad():
    rfid_recon = torch.cat([tok.decode(tok.encode(rfid_images[i:i + 256])).clamp(0, 1).cpu()
                            for i in range(0, n_rfid, 256)])
rfid = M.distribution_metrics(M.to_uint8(rfid_recon), M.to_uint8(rfid_images), isc=False, kid=False, prc=False,
                              device=ctx.device)["fid"]
perc_values, perc_name = M.perceptual_distance(recon, images, device=ctx.device)
fid_net = weights_info()
print(f"rFID {rfid:.3f} on {n_rfid} {dataset_name} images (Inception-v3 FID network, sha256 "
      f"{fid_net['sha256'][:12]}); {perc_name} reconstruction vs original {perc_values.mean():.4f} "
      f"(n={n_val})")

# %% [markdown]
# ## Reconstructions
# Top: originals; middle: `decode(encode(x))`; bottom: absolute error (amplified 3×), with each image's PSNR
# (higher is better).

# %%
n_show = SETTINGS["n_show"]
fig, axes = plt.subplots(3, n_show, figsize=(1.4 * n_show, 4.4))
for j in range(n_show):
    for r, img in enumerate([images[j], recon[j], ((images[j] - recon[j]).abs() * 3).clamp(0, 1)]):
        axes[r, j].imshow(img.permute(1, 2, 0).numpy())
        axes[r, j].set_xticks([]); axes[r, j].set_yticks([])
    axes[2, j].set_xlabel(f"PSNR {psnr[j]:.1f} dB", fontsize=8)
for r, name in enumerate(["original", "reconstruction", "|error| x3"]):
    axes[r, 0].set_ylabel(name, fontsize=9)
fig.suptitle(f"{type(tok).__name__} ({ctx.scale}): {res}px -> {gh}x{gw} tokens, K={K}")
fig.tight_layout()
ctx.save_fig(fig, "02_reconstructions")
plt.show()

# %% [markdown]
# ## Codebook usage
# *Usage* is the fraction of the K codes that occur at least once in the validation tokens; *code perplexity*
# is `exp(entropy)` of the empirical code frequencies (K if all codes were equally frequent).

# %%
use = code_usage(tokens, K)
counts = use["counts"].numpy()
usage_df = pd.DataFrame({"code": np.arange(K), "count": counts, "frequency": counts / counts.sum()})
ctx.save_csv(usage_df, "02_codebook_usage")
print(f"{n_val * gh * gw} tokens: {use['usage']:.1%} of {K} codes used, code perplexity {use['perplexity']:.1f}")

fig, ax = plt.subplots(1, 2, figsize=(11, 3.2))
ax[0].bar(np.arange(K), np.sort(counts)[::-1], width=1.0)
ax[0].set_yscale("symlog"); ax[0].set_xlabel("code rank"); ax[0].set_ylabel("count")
ax[0].set_title(f"code frequency, sorted (usage {use['usage']:.0%}, perplexity {use['perplexity']:.0f})")
ax[1].hist(counts, bins=40)
ax[1].set_xlabel("times a code is used"); ax[1].set_ylabel("number of codes"); ax[1].set_title("usage histogram")
fig.tight_layout()
ctx.save_fig(fig, "02_codebook_usage")
plt.show()

# %% [markdown]
# ## The embedding space: do cosine-nearest codes look alike?
# For a few frequently used codes, each row shows the code and its nearest codebook neighbours (cosine
# similarity of the code vectors, excluding the code itself), each decoded as a **uniform token grid** (every
# position holds that code). The numbers are the cosine similarities.

# %%
n_codes, n_nb = SETTINGS["n_codes"], SETTINGS["n_neighbours"]
nb_ids, nb_sims = tok.nearest_codes(n_nb, return_similarity=True)
nb_ids, nb_sims = nb_ids.cpu(), nb_sims.cpu()
shown = torch.from_numpy(np.argsort(-counts)[:n_codes].copy())


def uniform_decode(codes):
    """Decode each code id in ``codes`` as a grid where every token is that id -> [len(codes), 3, R, R]."""
    grids = codes.view(-1, 1, 1).expand(-1, gh, gw).contiguous()
    return torch.cat([tok.decode(grids[i:i + 64]).cpu() for i in range(0, len(grids), 64)])


fig, axes = plt.subplots(n_codes, n_nb + 1, figsize=(1.5 * (n_nb + 1), 1.6 * n_codes))
for r, c in enumerate(shown.tolist()):
    row_ids = torch.cat([torch.tensor([c]), nb_ids[c]])
    pics = uniform_decode(row_ids)
    for j in range(n_nb + 1):
        ax = axes[r, j]
        ax.imshow(pics[j].permute(1, 2, 0).numpy()); ax.set_xticks([]); ax.set_yticks([])
        ax.set_title(f"code {c}" if j == 0 else f"#{j}: {int(row_ids[j])} ({nb_sims[c, j - 1]:.2f})", fontsize=7)
fig.suptitle("each code (left) and its cosine-nearest codebook neighbours, decoded as uniform grids")
fig.tight_layout()
ctx.save_fig(fig, "02_code_neighbours")
plt.show()

# %% [markdown]
# A number for "look alike": for every code, the mean squared pixel difference between its uniform-grid decode
# and (a) that of its nearest neighbour, (b) that of a random other code. Nearest neighbours should be much
# closer than random codes.

# %%
gen = torch.Generator().manual_seed(ctx.seed)
all_codes = torch.arange(K)
rand_other = (all_codes + torch.randint(1, K, (K,), generator=gen)) % K   # a random code != itself
base = uniform_decode(all_codes)
mse_nn = ((base - base[nb_ids[:, 0]]) ** 2).mean(dim=(1, 2, 3))
mse_rand = ((base - base[rand_other]) ** 2).mean(dim=(1, 2, 3))
nb_df = pd.DataFrame({"code": all_codes.numpy(), "nearest": nb_ids[:, 0].numpy(), "cosine_nearest": nb_sims[:, 0].numpy(),
                      "random_code": rand_other.numpy(), "mse_uniform_nearest": mse_nn.numpy(),
                      "mse_uniform_random": mse_rand.numpy(), "count": counts})
ctx.save_csv(nb_df, "02_neighbour_similarity")
frac_closer = float((mse_nn < mse_rand).float().mean())
print(f"uniform-grid pixel MSE: nearest neighbour {mse_nn.mean():.4f}, random code {mse_rand.mean():.4f}; "
      f"the nearest neighbour is closer than a random code for {frac_closer:.0%} of the {K} codes")

# %% [markdown]
# ## Replacing tokens in real images
# The same question on real token grids: replace a fraction `r` of the positions of each validation grid by
# (a) the cosine-nearest neighbour of the true code, or (b) a random other code (same positions for both), decode,
# and measure PSNR against the original image. This previews the paper's "embedding-nearest replacement"
# experiment (§3.1), without a generator.

# %%
rows = []
n_rep = min(n_val, 256)
for rate in SETTINGS["rates"]:
    mask = torch.rand(n_rep, gh, gw, generator=gen) < rate
    t = tokens[:n_rep]
    randc = (t + torch.randint(1, K, t.shape, generator=gen)) % K
    for mode, repl in [("nearest neighbour", nb_ids[:, 0][t]), ("random code", randc)]:
        damaged = torch.where(mask, repl, t)
        rec = torch.cat([tok.decode(damaged[i:i + 128]).cpu() for i in range(0, n_rep, 128)])
        p, s = psnr_ssim(images[:n_rep], rec)
        rows.append({"rate": rate, "replacement": mode, "psnr_db": float(np.mean(p)), "ssim": float(np.mean(s)),
                     "measured_rate": float(mask.float().mean()), "n_images": n_rep})
rep_df = pd.DataFrame(rows)
ctx.save_csv(rep_df, "02_token_replacement")
print(rep_df.round(3).to_string(index=False))

fig, ax = plt.subplots(figsize=(6, 3.2))
for mode, g in rep_df.groupby("replacement"):
    ax.plot(g["rate"], g["psnr_db"], marker="o", label=mode)
ax.axhline(per_image.psnr_db.mean(), color="gray", ls="--", label="no replacement")
ax.set_xlabel("fraction of tokens replaced"); ax.set_ylabel("PSNR vs original (dB)"); ax.legend()
ax.set_title(f"token replacement ({n_rep} {dataset_name} images)")
fig.tight_layout()
ctx.save_fig(fig, "02_token_replacement")
plt.show()

# %% [markdown]
# ## Summary

# %%
summary = pd.DataFrame([
    {"metric": "psnr_db_mean", "value": per_image.psnr_db.mean()},
    {"metric": "psnr_db_std", "value": per_image.psnr_db.std()},
    {"metric": "ssim_mean", "value": per_image.ssim.mean()},
    {"metric": "ssim_std", "value": per_image.ssim.std()},
    {"metric": "rFID", "value": rfid}, {"metric": "rFID_n_images", "value": n_rfid},
    {"metric": perc_name, "value": perc_values.mean().item()},
    {"metric": "codebook_usage", "value": use["usage"]},
    {"metric": "code_perplexity", "value": use["perplexity"]},
    {"metric": "nearest_closer_than_random", "value": frac_closer},
    {"metric": "codebook_size", "value": K}, {"metric": "code_dim", "value": D},
    {"metric": "tokens_per_image", "value": gh * gw}, {"metric": "resolution", "value": res},
    {"metric": "n_params", "value": n_params},
])
summary["n_images"] = n_val
summary["dataset"] = dataset_name
summary["tokenizer"] = tok.identity()
ctx.save_csv(summary, "02_tokenizer_summary")

ours = (f"{type(tok).__name__} at {res}px ({gh}x{gw} tokens, K={K}): PSNR {per_image.psnr_db.mean():.2f} dB, "
        f"SSIM {per_image.ssim.mean():.3f}, {perc_name} {perc_values.mean():.4f} on {n_val} {dataset_name} images; "
        f"rFID {rfid:.3f} on {n_rfid} images")
verdict = "not tested"
if tok.kind == "maskgit_vqgan" and dataset_name.startswith("ImageNet") and n_rfid >= 50_000:
    # The paper's tokenizer on the paper's data: reproduced within 10% of the published 1.97.
    verdict = "reproduced" if abs(rfid - 1.97) <= 0.197 else "not reproduced"
    note = "MaskGIT-VQGAN (our verified port) on 50k ImageNet val images, Inception-v3 FID network"
elif tok.kind == "maskgit_vqgan":
    note = (f"the paper's tokenizer with the weights given, but rFID on {n_rfid} {dataset_name} images, not the "
            f"paper's 50k ImageNet val images")
else:
    note = ("a different tokenizer (ours, trained in-project on ShapeScenes-10) on other data; its rFID is not "
            "comparable with the paper's ImageNet rFID")
if ctx.is_smoke:
    note += "; smoke scale: numbers are not meaningful"
ctx.claim(claim="Tokenizer reconstruction quality (MaskGIT-VQGAN, ImageNet 256, rFID)", paper="rFID 1.97",
          ours=ours, verdict=verdict, note=note)
ctx.note(f"codebook usage {use['usage']:.1%}, code perplexity {use['perplexity']:.1f} of K={K}; nearest "
         f"codebook neighbour decodes closer than a random code for {frac_closer:.0%} of codes "
         f"({time.time() - t_start:.0f}s)")
summary
