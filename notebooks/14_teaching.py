# %% [markdown]
# # 14 · Teaching: the right token *index* can still make a bad image
#
# An image generator like reAR does not paint pixels. A **tokenizer** cuts the image into a grid of tokens
# (here 16 × 16 = 256), each one an entry of a codebook of 1,024 small vectors, and its decoder turns the grid of
# vectors back into pixels. The **generator** writes the grid one token at a time, in reading order, each token
# chosen from the ones before it.
#
# The generator is trained and judged by whether it picks the right token *index*: the share of right indices is
# the **correct-token ratio (CTR)**. But the decoder does not see indices, it sees *vectors*. A wrong index whose
# vector is close to the right one decodes to nearly the right pixels; a wrong index far away ruins the patch. And
# a wrong token early in the grid is *context* for everything written after it. The paper (reAR §3.1) calls this
# the *generator-tokenizer inconsistency*. Its fix, reAR, trains the generator on noisy contexts and asks its
# hidden states to know the codebook vectors. Notebooks 05-07 measure this on many images; here you can *see* it on
# one image at a time:
#
# 1. **Token surgery**: make some tokens of an image wrong, and choose how: a nearby code, a random code, a
#    far-away code, or let a generator continue from the first wrong token.
# 2. **Same CTR, different quality**: the same number of wrong tokens, different images.
# 3. **AR vs reAR**: the plain AR model and reAR, sampling from the same class and seed, and reading the same
#    corrupted context.
#
# The widgets run on a laptop CPU with the shipped `small` models (a 64 px tokenizer and two ~10M-parameter
# generators trained on the embedded ShapeScenes-10 dataset); nothing is downloaded. Sliders update when you
# release them. The last section runs without anyone clicking (papermill / CI): it writes tables, a figure and
# the measured response times. The perceptual distance is LPIPS-VGG only if its weights are cached on this
# machine; otherwise it is ST-LPIPS(alex), shift-tolerant LPIPS whose networks ship in a PyPI wheel (a learned
# metric of the same family, **not LPIPS**), and every label says which one you see.

# %% tags=["parameters"]
scale = "smoke"        # smoke | small | paper
seed = 0
device = "auto"
reports_dir = "reports"
figures_dir = "figures"
run_demo = True        # the non-interactive demonstration (tables, figure, latencies); set False for Voila
n_images = None        # demo images (None: rearlib.scales.TEACHING[scale]["images"])
num_threads = "auto"   # torch threads while a widget computes: an int, or "auto" (the faster of 1 and all, measured)
maskgit_path = None    # paper: maskgit-vqgan-imagenet-f16-256.bin (else $REARLIB_MASKGIT_VQGAN)
ar_checkpoint = None   # paper: the authors' vanilla AR state dict
rear_checkpoint = None  # paper: the authors' reAR state dict
generator_preset = "rear_s"  # paper: architecture of both checkpoints
data_root = None       # paper: ImageNet root holding val/<wnid>/*.JPEG (else $REARLIB_DATA/imagenet)
require_lpips = True   # paper: refuse to run without LPIPS-VGG (the paper's metric); False: ST-LPIPS(alex), labeled

# %%
from rearlib import scales
from rearlib.experiments.notebook import setup

ctx = setup(notebook="14_teaching", scale=scale, seed=seed, device=device,
            reports_dir=reports_dir, figures_dir=figures_dir)

# %% [markdown]
# ## The models
# `smoke` and `small` both use the **shipped small models** (`data/checkpoints/`): they load on a CPU in a few
# seconds, whereas smoke's own generators (trained for 30 steps on the CPU) draw noise and would teach nothing.
# The scales differ only in how many images the demonstration below uses (smoke: 2, so its numbers are **not
# meaningful** statistics). `paper` takes the authors' checkpoints, the MaskGIT-VQGAN and ImageNet (every input is
# checked first); the widgets then work, but at 256 tokens of a 200M+-parameter model a CPU is far from
# interactive.

# %%
import time

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from IPython.display import display

import rearlib.teaching as Wd

t_start = time.time()
SET = dict(scales.TEACHING[ctx.scale])
if n_images is not None:
    SET["images"] = int(n_images)
if ctx.scale == "paper":
    import rearlib.experiments.assets as assets
    from rearlib.tokenizers import get_tokenizer

    assets.check_paper_assets({"ar_checkpoint": ar_checkpoint, "rear_checkpoint": rear_checkpoint}, maskgit_path,
                              data_root, splits=("val",), need_lpips=require_lpips)
    tok = get_tokenizer("paper", ctx.device, path=maskgit_path, data_root=data_root, progress=False)
    gens = assets.load_generators("paper", ["ar", "rear"], tok, ctx.device, preset=generator_preset,
                                  checkpoints={"ar": ar_checkpoint, "rear": rear_checkpoint})
    imgs, labs, _ = assets.load_images("paper", tok, "val", SET["n_images"], ctx.device, data_root=data_root)
    lab = Wd.Lab(tok, gens, images=imgs, labels=labs, scale="paper", num_threads=num_threads)
else:
    lab = Wd.Lab.from_scale(ctx.scale, ctx.device, num_threads=num_threads)
ctx.note(f"perceptual metric: {lab.metric_name} ({lab.metric_reason})")
print(f"tokenizer: {lab.resolution} px -> {lab.grid[0]}x{lab.grid[1]} = {lab.N} tokens, K = {lab.K} codes; "
      f"generators: {', '.join(lab.generators)}; loaded in {time.time() - t_start:.1f} s")

# %% [markdown]
# ## 1 · Token surgery
# The left picture is the original image under its token grid: **click cells** to make those tokens wrong (or
# choose *early*, *late* or *random* and a number *k*). Then choose what the wrong tokens become:
#
# * **embedding-nearest code**: the code whose vector points most nearly the same way as the right one (the
#   paper's Experiment B);
# * **random code**; **embedding-farthest code**: the one pointing most the other way;
# * **model continues after the 1st error**: the first chosen token gets a random code, and then a generator
#   (AR or reAR, conditioned on the class you choose) writes every later token itself, as it would while
#   sampling (the paper's Experiment A, exposure bias). Its CTR is measured; it takes a moment, as the model writes
#   up to 256 tokens one by one.
#
# With the first three, CTR = 1 − k/256 exactly, whatever the code. Watch PSNR, SSIM and the perceptual distance
# move while CTR stays put. The middle picture decodes the right tokens: even it is not the original, because
# the tokenizer itself loses a little.

# %%
surgery = Wd.TokenSurgery(lab, image=0, k=lab.N // 8, placement="random", replacement="nearest", seed=ctx.seed)
display(surgery.widget)

# %% [markdown]
# ## 2 · Same CTR, different quality
# Hold CTR fixed with the slider. *Embedding distance*: the same positions get the nearest, a random or the
# farthest code. *Error position*: the same rule at the first k tokens (the top rows), k random ones, or the last
# k (the bottom rows). Every image has exactly the same CTR; the plot shows what a CTR-only view misses.

# %%
same_ctr = Wd.SameCTR(lab, image=0, ctr=0.9, factor="embedding distance", seed=ctx.seed)
display(same_ctr.widget)

# %% [markdown]
# ## 3 · AR vs reAR
# **Top**: both generators sample from the same class with the same seed. A seed fixes every random number of the
# sampler, so the two models make their choices from the same dice rolls; differences come from the models.
# Sampling writes 256 tokens one by one (with a key-value cache), so a new class or seed takes a few seconds on a
# CPU; samples are remembered afterwards. The classifier's guess shows whether the sample looks like its class.
#
# **Bottom**: the same real image, with k of its tokens replaced by random codes, is given to both models as
# context. Each model predicts every token from the tokens before it (teacher forcing), and the predictions are
# decoded into an image. reAR was trained on noisy contexts (the paper's App. C.1 expects a smaller CTR drop);
# compare the CTR and the images with a clean and a corrupted context.

# %%
ar_vs_rear = Wd.ARvsReAR(lab, models=("ar", "rear"), label=0, seed=ctx.seed, cfg=1.0, image=0)
display(ar_vs_rear.widget)

# %% [markdown]
# ## 4 · The same, without clicking
# Everything above is computed by pure methods (`compute`, `generate`, `context_errors`) that the widgets only
# display, so the same numbers can be produced in a loop. On a few dataset images:
#
# * **surgery sweep**: CTR levels × the three replacement rules at the same random positions;
# * **same CTR**: both factors at CTR 0.9;
# * **context errors**: both models, clean and with a fraction of the context corrupted;
# * **latency**: each kind of interaction is replayed through the widgets' own controls and timed in the kernel
#   (setting the control's value until every callback returned; the browser's drawing is not included).

# %%
if run_demo:
    ids = list(range(min(SET["images"], lab.n_images)))
    t0 = time.time()
    rows = []
    for i in ids:
        for ctr in SET["ctrs"]:
            k = int(round((1 - ctr) * lab.N))
            for mode in ("nearest", "random", "farthest"):
                rows.append(surgery.compute(image=i, k=k, placement="random", replacement=mode, seed=ctx.seed).row())
    surgery_rows = pd.DataFrame(rows)
    # CTR is 1 - k/N for every row, whatever the replacement: the widget's promise, checked on every row.
    assert np.allclose(surgery_rows["ctr"], 1 - surgery_rows["k"] / lab.N, rtol=0, atol=1e-12)
    ctx.save_csv(surgery_rows, "14_surgery")
    same_rows = pd.concat([same_ctr.compute(image=i, ctr=0.9, factor=f, replacement="random", seed=ctx.seed)[0]
                           for i in ids for f in Wd.FACTORS], ignore_index=True)
    assert same_rows.groupby(["image", "factor"])["ctr"].nunique().eq(1).all()
    ctx.save_csv(same_rows, "14_same_ctr")
    ctx_rows = pd.concat([ar_vs_rear.context_errors(image=i, k=int(round(f * (lab.N - 1))), placement="random",
                                                    error_seed=ctx.seed)[0].assign(fraction=f)
                          for i in ids for f in SET["context_fractions"]], ignore_index=True)
    ctx.save_csv(ctx_rows, "14_context_errors")
    print(f"sweeps over {len(ids)} images in {time.time() - t0:.1f} s")
    mean = lambda df, by, cols: df.groupby(by, sort=False)[cols].mean().reset_index()  # noqa: E731
    display(mean(surgery_rows, ["k", "ctr", "replacement"], ["psnr", "ssim", "perceptual"]).round(3))
    display(mean(same_rows, ["factor", "level"], ["ctr", "psnr", "ssim", "perceptual"]).round(3))
    display(mean(ctx_rows[ctx_rows.condition == "corrupted"], ["fraction", "model"],
                 ["ctr", "ctr_after_error", "psnr", "perceptual"]).round(3))

# %% [markdown]
# ### How responsive are the widgets?
# Each interaction kind is replayed `latency_repeats` times through the controls (new values every time, so
# nothing comes from a cache unless stated) and the median is reported. `surgery: continue (late k)` lets the AR
# model write the last k tokens, so its cost grows with k; sampling a new (class, seed) is the slowest interaction
# (256 sequential steps per model) and is measured once, when the widget was built.

# %%
if run_demo:
    R = SET["latency_repeats"]
    N = lab.N
    parts = []
    # Fresh images (not yet encoded or decoded) for the image-change interactions.
    fresh = [lab.n_images - 1 - j for j in range(3 * R)]
    surgery.controls["replacement"].value = "nearest"
    surgery.controls["placement"].value = "random"
    parts.append(Wd.measure_latency(surgery, [("k", N // 8 + 1 + j) for j in range(R)],
                                    interaction="surgery: k slider"))
    modes = ["random", "farthest", "nearest"]
    parts.append(Wd.measure_latency(surgery, [("replacement", modes[j % 3]) for j in range(R)],
                                    interaction="surgery: replacement (cycling: revisits are cached)"))
    parts.append(Wd.measure_latency(surgery, [("image", fresh[j]) for j in range(R)],
                                    interaction="surgery: new image (encode)"))
    t_click = []
    for j in range(R):  # one cell click each: what a user does on the grid
        b = surgery.cells[(37 * j + 11) % N]
        t1 = time.perf_counter()
        b.value = not b.value
        t_click.append(time.perf_counter() - t1)
        assert surgery.last_error is None
    parts.append(pd.DataFrame({"component": "TokenSurgery", "interaction": "surgery: click a cell", "control": "cell",
                               "value": "toggle", "seconds": t_click}))
    surgery.controls["placement"].value = "late"
    surgery.controls["k"].value = N // 16
    surgery.controls["replacement"].value = "continue"
    parts.append(Wd.measure_latency(surgery, [("seed", ctx.seed + 1 + j) for j in range(R)],
                                    interaction=f"surgery: continue (late k={N // 16})"))
    surgery.controls["replacement"].value = "nearest"
    parts.append(Wd.measure_latency(same_ctr, [("ctr", round(0.8 + 0.01 * (j + 1), 2)) for j in range(R)],
                                    interaction="same CTR: CTR slider"))
    parts.append(Wd.measure_latency(same_ctr, [("factor", list(Wd.FACTORS)[(j + 1) % 2]) for j in range(R)],
                                    interaction="same CTR: factor"))
    parts.append(Wd.measure_latency(ar_vs_rear, [("k", 5 + 3 * j) for j in range(R)],
                                    interaction="AR vs reAR: context k slider"))
    parts.append(Wd.measure_latency(ar_vs_rear, [("image", fresh[R + j]) for j in range(R)],
                                    interaction="AR vs reAR: new context image"))
    first_sample = [s for what, s in ar_vs_rear.timings if what == "initial samples"]
    parts.append(pd.DataFrame({"component": "ARvsReAR", "interaction": "AR vs reAR: sample a new class/seed (both)",
                               "control": "label/seed", "value": "initial", "seconds": first_sample}))
    t_cached = []
    for _ in range(R):  # showing an already sampled (class, seed) again: the samples come from the cache
        t1 = time.perf_counter()
        ar_vs_rear.refresh_samples()
        t_cached.append(time.perf_counter() - t1)
    parts.append(pd.DataFrame({"component": "ARvsReAR", "interaction": "AR vs reAR: revisit a sampled seed (cached)",
                               "control": "label/seed", "value": "cached", "seconds": t_cached}))
    latency = pd.concat(parts, ignore_index=True)
    latency["num_threads"] = num_threads
    latency["device"] = str(ctx.device)
    ctx.save_csv(latency, "14_latency")
    summary = Wd.latency_summary(latency)
    ctx.save_csv(summary, "14_latency_summary")
    display(summary.round(3))
    ctx.note("median kernel-side latency per interaction (s): " +
             "; ".join(f"{r.interaction} {r.median:.3f}" for r in summary.itertuples()))

# %% [markdown]
# ### One thread or more?
# Decoding a token grid is the most common cost. With `num_threads = "auto"` the lab timed it with one thread and
# with all of torch's threads when it was built, and uses the faster: on a busy shared CPU the extra threads
# mostly wait for other jobs, on an idle laptop they help.

# %%
probe = lab.thread_probe or {lab.num_threads: float("nan")}  # empty: fixed by num_threads, or 1 thread only
threads = pd.DataFrame([{"threads": t, "median_decode_s": s, "chosen": t == lab.num_threads,
                         "probed": bool(lab.thread_probe)} for t, s in probe.items()])
if run_demo:
    ctx.save_csv(threads, "14_threads")
threads

# %% [markdown]
# ## The figure
# Top: one image with 10% wrong tokens under the three replacement rules (the same positions), and both models
# continuing after an error at the start of the last quarter.
# Bottom left: the surgery sweep (mean over the demo images); bottom middle: CTR under context errors; bottom
# right: the two models' samples for the same class and seed.

# %%
if run_demo:
    i0 = ids[0]
    k0 = int(round(0.1 * lab.N))
    ex = {m: surgery.compute(image=i0, k=k0, placement="random", replacement=m, seed=ctx.seed)
          for m in ("nearest", "random", "farthest")}
    cont = {g: surgery.compute(image=i0, k=lab.N // 4, placement="late", replacement="continue", model=g,
                               seed=ctx.seed) for g in ("ar", "rear")}
    samples = ar_vs_rear.generate(label=0, seed=ctx.seed, cfg=1.0)
    metric = surgery_rows["perceptual_metric"].iloc[0]
    short = metric.split("[")[0]
    fig = plt.figure(figsize=(14, 7.4))
    gs = fig.add_gridspec(2, 7, height_ratios=[1, 1.15])
    panels = [("original", ex["nearest"].original, ""), ("all tokens right", ex["nearest"].reconstruction,
                                                         f"CTR 100%\nPSNR {ex['nearest'].recon_psnr:.1f}")]
    panels += [(f"{m} code", r.decoded, f"CTR {r.ctr:.0%}\nPSNR {r.psnr:.1f} · {short} {r.perceptual:.2f}")
               for m, r in ex.items()]
    panels += [(f"{Wd._model_label(g)} continues\nfrom token {r.first_error}", r.decoded,
                f"CTR {r.ctr:.0%}\nPSNR {r.psnr:.1f} · {short} {r.perceptual:.2f}") for g, r in cont.items()]
    for j, (title, im, cap) in enumerate(panels):
        ax = fig.add_subplot(gs[0, j])
        ax.imshow(im.permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(cap, fontsize=7.5)
        ax.set_xticks([]), ax.set_yticks([])
    ax = fig.add_subplot(gs[1, 0:2])
    sw = mean(surgery_rows, ["ctr", "replacement"], ["perceptual"])
    for m, c in (("nearest", "tab:green"), ("random", "tab:orange"), ("farthest", "tab:red")):
        s = sw[sw.replacement == m].sort_values("ctr")
        ax.plot(s["ctr"], s["perceptual"], "o-", color=c, label=m)
    ax.set_xlabel("CTR (same for all three rules)")
    ax.set_ylabel(f"{metric} to the original ↓", fontsize=8)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    ax = fig.add_subplot(gs[1, 2:4])
    cr = mean(ctx_rows[ctx_rows.condition == "corrupted"], ["fraction", "model"], ["ctr"])
    for m, c in (("ar", "tab:blue"), ("rear", "tab:purple")):
        s = cr[cr.model == m].sort_values("fraction")
        ax.plot(s["fraction"], 100 * s["ctr"], "o-", color=c, label={"ar": "AR", "rear": "reAR"}[m])
    ax.set_xlabel("fraction of context tokens corrupted")
    ax.set_ylabel("teacher-forced CTR (%)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    ax = fig.add_subplot(gs[1, 4:7])
    pair = torch.cat([samples["ar"]["image"], samples["rear"]["image"]], dim=2)
    ax.imshow(pair.permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
    ax.set_title(f"AR | reAR, class {lab.class_names[0]}, seed {ctx.seed}", fontsize=9)
    ax.set_xticks([]), ax.set_yticks([])
    fig.suptitle(f"Same CTR, different images ({ctx.scale} run; {len(ids)} demo images"
                 f"{' - not meaningful statistics' if ctx.is_smoke else ''})", fontsize=10)
    fig.tight_layout()
    ctx.save_fig(fig, "14_teaching")
    plt.show()
    print(f"demo done in {time.time() - t_start:.1f} s since the models were loaded")
