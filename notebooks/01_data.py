# %% [markdown]
# # 01 · The embedded dataset: ShapeScenes-10
#
# reAR's argument is about *images*: a visual autoregressive model can predict most token indices right and
# still draw a broken picture, because a wrong token early in the raster order, or one whose codebook vector is
# far from the truth, breaks global structure. To see that without ImageNet we need images whose structure spans
# many tokens. **ShapeScenes-10** is generated from a seed, needs no download, and is identical on every machine:
# one large object per image (the class is its shape; its hue is loosely class-dependent) over a crop of a real
# photograph or texture shipped with scikit-image.

# %% tags=["parameters"]
scale = "smoke"        # smoke | small | paper
seed = 0
device = "auto"
reports_dir = "reports"
figures_dir = "figures"

# %%
from rearlib.experiments.notebook import setup

ctx = setup(notebook="01_data", scale=scale, seed=seed, device=device,
            reports_dir=reports_dir, figures_dir=figures_dir)

# %%
import matplotlib.pyplot as plt
import pandas as pd
import torch

from rearlib.data import CLASS_NAMES, NUM_CLASSES, EmbeddedDataset, dataset_statistics, render_batch

# Resolution and sample counts per scale: `small` is the resolution the project's tokenizer and generators use.
SETTINGS = {"smoke": dict(resolution=32, n_stats=200), "small": dict(resolution=64, n_stats=5000),
            "paper": dict(resolution=64, n_stats=5000)}[ctx.scale]
resolution = SETTINGS["resolution"]
train = EmbeddedDataset("train", size=50_000, resolution=resolution, seed=ctx.seed)
val = EmbeddedDataset("val", size=10_000, resolution=resolution, seed=ctx.seed)
print(train, val, sep="\n")

# %% [markdown]
# ## A gallery per class
# Each row is one class. Positions, sizes, rotations, hues, backgrounds and lighting vary; the shape does not.

# %%
per_class = 8
images, labels = render_batch(torch.arange(400), resolution=resolution, seed=ctx.seed, split="train")
fig, axes = plt.subplots(NUM_CLASSES, per_class, figsize=(per_class * 1.1, NUM_CLASSES * 1.15))
for c in range(NUM_CLASSES):
    picks = (labels == c).nonzero().flatten()[:per_class]
    for j, i in enumerate(picks):
        ax = axes[c, j]
        ax.imshow(images[i].permute(1, 2, 0).numpy())
        ax.set_xticks([]); ax.set_yticks([])
        if j == 0:
            ax.set_ylabel(CLASS_NAMES[c], rotation=0, ha="right", va="center", fontsize=9)
fig.suptitle(f"ShapeScenes-10 at {resolution}x{resolution} (seed {ctx.seed})")
fig.tight_layout()
ctx.save_fig(fig, "01_gallery")
plt.show()

# %% [markdown]
# ## Statistics
# Class balance, per-class colour means and a texture measure (mean absolute pixel gradient). A dataset with
# real-photo backgrounds has gradients well above those of flat synthetic shapes.

# %%
n = SETTINGS["n_stats"]
imgs, labs = render_batch(torch.arange(n), resolution=resolution, seed=ctx.seed, split="train", device=ctx.device)
imgs, labs = imgs.cpu(), labs.cpu()
rows = []
for c in range(NUM_CLASSES):
    sel = imgs[labs == c]
    rows.append({"class": CLASS_NAMES[c], "label": c, "count": len(sel), **dataset_statistics(sel)})
stats = pd.DataFrame(rows)
ctx.save_csv(stats, "01_dataset_stats")
stats.round(3)

# %%
fig, ax = plt.subplots(1, 2, figsize=(10, 3))
ax[0].bar(stats["class"], stats["count"]); ax[0].set_title(f"class counts in the first {n} images")
ax[0].tick_params(axis="x", rotation=60)
ax[1].bar(stats["class"], stats["mean_abs_gradient"]); ax[1].set_title("mean |pixel gradient| (texture)")
ax[1].tick_params(axis="x", rotation=60)
fig.tight_layout(); ctx.save_fig(fig, "01_stats"); plt.show()

# %% [markdown]
# ## Determinism
# The same seed gives the same bytes: the image parameters come from an integer hash of (seed, split, index),
# and rendering is elementwise on the CPU. Batched rendering equals item-by-item rendering.

# %%
a, _ = render_batch(torch.arange(16), resolution=resolution, seed=ctx.seed)
b = torch.stack([train[i][0] for i in range(16)])
assert torch.equal(a, b), "batched and per-item rendering differ"
import hashlib
digest = hashlib.sha256((a * 255).round().to(torch.uint8).numpy().tobytes()).hexdigest()[:16]
print("sha256 of the first 16 images (uint8):", digest)

# %% [markdown]
# ## Using real data instead
# Every notebook takes its data from `rearlib.data.load_dataset`, so switching is one argument:
# ```python
# from rearlib.data import load_dataset
# cifar = load_dataset("cifar10", split="train", resolution=32, root="~/data/cifar10")   # md5-verified, no download
# folder = load_dataset("imagefolder", resolution=64, root="~/data/my_images")           # root/<class>/<image>
# imnet = load_dataset("imagenet", split="val", resolution=256, root="~/data/imagenet")   # ADM centre crop
# ```
# A missing or corrupt dataset raises `DatasetUnavailable` with instructions to obtain it.

# %%
ctx.claim(claim="Embedded dataset: class-conditional, deterministic, structure spanning many tokens",
          paper="ImageNet-1k 256x256 (not used at this scale)",
          ours=f"ShapeScenes-10, {NUM_CLASSES} classes at {resolution}px; batched == per-item render",
          verdict="not tested", note="a substitute dataset; paper-scale runs use load_dataset('imagenet', ...)")
