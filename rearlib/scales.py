"""Every per-scale setting of the project, in one place.

Three scales (docs: README "Scales"): ``smoke`` proves the code paths run in CPU seconds (numbers meaningless),
``small`` is the embedded dataset at 64 px on one GPU (the committed reports), ``paper`` is ImageNet 256 px with the
authors' checkpoints. Each table below is keyed by scale; a scale a component does not support is absent or
``None``, and the component says so when asked for it. Modules read these tables; nothing else defines per-scale
numbers.
"""

from __future__ import annotations

from typing import Any

SCALE_NAMES = ("smoke", "small", "paper")

#: The paper's grids of the diagnosis analyses (docs/paper.md, reAR §2.1, §2.2): replacement ratios and
#: context-noise levels.
RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
R_PRIMES = (0.0, 0.2, 0.4, 0.6, 0.8)


#: The scales each notebook runs at. The others train models on the embedded dataset (or describe it) and have no
#: ``paper`` form: the runner reports them "skipped" there and :func:`rearlib.experiments.notebook.setup` refuses them.
NOTEBOOK_SCALES: dict[str, tuple[str, ...]] = {
    "01_data": ("smoke", "small"),
    "02_tokenizer": SCALE_NAMES,
    "03_metrics": SCALE_NAMES,
    "04_generators": ("smoke", "small"),
    "05_exposure_bias": SCALE_NAMES,
    "06_embedding_replacement": SCALE_NAMES,
    "07_robustness": SCALE_NAMES,
    "08_cka": SCALE_NAMES,
    "09_vapi": ("smoke", "small"),
    "10_main_comparison": ("smoke", "small"),
    "11_noise_ablation": ("smoke", "small"),
    "12_embedding_ablation": ("smoke", "small"),
    "13_scaling": ("smoke", "small"),
    "14_teaching": SCALE_NAMES,
    "15_table1": ("smoke", "paper"),
}


#: Notebooks that time work on the device (sampling speed, training throughput of runs they train, interaction
#: latency): ``reproduce --jobs`` runs them alone, after the others, so that no other notebook shares the device
#: while they measure.
TIMED_NOTEBOOKS: frozenset[str] = frozenset({"04_generators", "09_vapi", "10_main_comparison", "11_noise_ablation",
                                             "12_embedding_ablation", "13_scaling", "14_teaching", "15_table1"})


def notebook_scales(notebook: str) -> tuple[str, ...]:
    """The scales ``notebook`` (e.g. ``"04_generators"``) runs at; every scale for a notebook not listed."""
    return NOTEBOOK_SCALES.get(notebook, SCALE_NAMES)


def validate_scale(scale: str) -> str:
    """Return ``scale`` if it is one of :data:`SCALE_NAMES`, else raise a ValueError that lists them."""
    if scale not in SCALE_NAMES:
        raise ValueError(f"unknown scale {scale!r}; allowed values: {', '.join(SCALE_NAMES)}")
    return scale


# --------------------------------------------------------------------------------------------------------------
# Tokenizer per scale (rearlib.tokenizers.get_tokenizer)
# --------------------------------------------------------------------------------------------------------------
#: Per-scale settings of the facade. The model/training settings of our own tokenizer live in
#: ``rearlib.scales.VQ_TOKENIZER``; the MaskGIT-VQGAN architecture is inferred from its state dict.
TOKENIZER: dict[str, Any] = {
    "smoke": {"kind": "vq", "source": "trained on first use, cached under artifacts/tokenizer/<hash>/"},
    "small": {"kind": "vq", "checkpoint": "data/checkpoints/tokenizer_small.pt"},
    "paper": {
        "kind": "maskgit_vqgan",
        "resolution": 256,
        # Looked for in this order when no explicit path is given (first hit wins).
        "env": "REARLIB_MASKGIT_VQGAN",
        "filenames": ("maskgitvq.bin", "maskgit-vqgan-imagenet-f16-256.bin"),
        "folders": ("data/checkpoints", "ckpt"),
    },
}


# --------------------------------------------------------------------------------------------------------------
# Our VQ tokenizer: model and training (rearlib.tokenizers.vqgan)
# --------------------------------------------------------------------------------------------------------------
#: Per-scale model and training settings. ``paper`` uses the MaskGIT-VQGAN (rearlib.tokenizers.maskgit_vqgan) instead.
VQ_TOKENIZER: dict[str, Any] = {
    "smoke": {
        "model": dict(resolution=32, base_channels=16, channel_mult=(1, 1, 2), num_res_blocks=1,
                      codebook_size=64, code_dim=16, norm_groups=8, center=True),
        "train": dict(steps=120, batch_size=16, lr=2e-3, warmup_steps=10, restart_every=20, val_size=64,
                      log_every=20),
    },
    "small": {
        # 64 px, f = 4 -> 16x16 = 256 tokens (as the paper's 256x256 / f16), K = 1024 codes of dimension 32.
        "model": dict(resolution=64, base_channels=64, channel_mult=(1, 2, 2), num_res_blocks=2,
                      codebook_size=1024, code_dim=32, norm_groups=32),
        # The shipped checkpoint was trained with exactly these settings on one H200 (bf16): ~2,100 images/s,
        # so the 290 s budget binds at ~4,750 of the 5,000 steps and the tail of the LR schedule follows the
        # clock (see VQTrainConfig.time_budget_s). For a step-determined run pass --steps 4500 (~275 s there).
        # Centering is off here: this config reached 100% usage / perplexity 929 of 1024 without it.
        "train": dict(steps=5000, batch_size=128, lr=5e-4, warmup_steps=200, restart_every=50, val_size=512,
                      log_every=100, time_budget_s=290.0),
    },
    "paper": None,
}


# --------------------------------------------------------------------------------------------------------------
# The in-project classifier (rearlib.metrics.classifier)
# --------------------------------------------------------------------------------------------------------------
# Per-scale settings. ``train_resolutions``: images are rendered at each of these and resized to ``resolution``.
CLASSIFIER: dict[str, Any] = {
    "smoke": {
        "resolution": 32, "train_resolutions": (32,), "widths": (16, 32, 64), "stem_stride": 2,
        "train_size": 1536, "val_size": 512, "epochs": 4, "batch_size": 64, "lr": 4e-3, "weight_decay": 5e-4,
    },
    "small": {
        "resolution": 64, "train_resolutions": (64,), "widths": (32, 64, 128, 256), "stem_stride": 1,
        "train_size": 120_000,
        "val_size": 10_000, "epochs": 12, "batch_size": 256, "lr": 3e-3, "weight_decay": 5e-4,
    },
    # ImageNet-scale evaluation uses Inception (torch-fidelity's "inception-v3-compat") and LPIPS; an embedded-
    # dataset classifier says nothing about ImageNet images. The entry exists so that scale handling is uniform.
    "paper": None,
}


# --------------------------------------------------------------------------------------------------------------
# Training data of the generators (the embedded dataset)
# --------------------------------------------------------------------------------------------------------------
#: Data each scale trains its generators on (the embedded dataset at the tokenizer's resolution).
GENERATOR_DATA: dict[str, Any] = {
    "smoke": dict(train_size=512, flip=False, seed=0),
    "small": dict(train_size=100_000, flip=True, seed=0),  # 200k sequences with the horizontal flips
}


# --------------------------------------------------------------------------------------------------------------
# Generator training recipe (rearlib.train.config_for_scale; the zoo's and the studies' base recipe)
# --------------------------------------------------------------------------------------------------------------
#: Per-scale defaults for :func:`config_for_scale` (TrainConfig fields). "paper" is the authors' reAR-B recipe:
#: 250k optimizer steps at a global batch of 2048 (= 128 per GPU x 8 GPUs x accumulation 2), 62.5k warm-up steps.
GENERATOR_TRAINING: dict[str, Any] = {
    "smoke": dict(model="tiny", steps=30, batch_size=16, grad_accum=1, warmup_steps=3, lr=1e-3,
                  log_every=10, ckpt_every=30),
    # The shipped small generators (data/checkpoints/) were trained with exactly this recipe: 5000 steps x 256 with
    # 5% warm-up. The full studies plan trains its rows, the main comparison included, with the paper's proportions
    # at 8000 steps (STUDIES["small"]["recipes"]["paper_shape"]).
    "small": dict(model="small", steps=5000, batch_size=256, grad_accum=1, warmup_steps=250, lr=4e-4,
                  log_every=100, ckpt_every=1000),
    "paper": dict(model="rear_b", steps=250_000, batch_size=128, grad_accum=2, warmup_steps=62_500, lr=4e-4,
                  seed=42, log_every=100, ckpt_every=5000),
}


# --------------------------------------------------------------------------------------------------------------
# Sampling (rearlib.sample)
# --------------------------------------------------------------------------------------------------------------
#: Per-scale sampling settings. paper: the paper's headline CFG per model (App. A), 50 images per class.
#: small/smoke CFG values are our defaults for the embedded dataset (not from the paper).
SAMPLING: dict[str, Any] = {
    "smoke": {"num_per_class": 4, "batch_size": 8, "cfg_scale": 2.0, "cfg_power": 0.0},
    "small": {"num_per_class": 500, "batch_size": 250, "cfg_scale": 2.0, "cfg_power": 0.0},
    "paper": {"num_per_class": 50, "batch_size": 125, "cfg_scale": None, "cfg_power": None},
}


# --------------------------------------------------------------------------------------------------------------
# Evaluation of generators (rearlib.experiments.evaluation.Evaluator)
# --------------------------------------------------------------------------------------------------------------
#: Per-scale evaluation settings. n_ref: held-out real images (val) every FID is computed against. batch: images
#: per sampler call (fixed; the last batch is padded). sampler: ``fast=`` of :func:`rearlib.sample.generate`;
#: "graph" = CUDA graphs of the eager decode step (a torch.compile of the step costs about a minute per model and
#: CFG mode on an H200, more than the sampling itself at this size), None = the library default (plain loop on
#: CPU). n_per_class: samples per class of one evaluation (10 classes: 10k samples at small).
EVALUATION: dict[str, Any] = {
    "smoke": dict(n_ref=256, batch=80, sampler=None, n_per_class=8),
    "small": dict(n_ref=10_000, batch=500, sampler="graph", n_per_class=1000),
}


# --------------------------------------------------------------------------------------------------------------
# Training studies of notebooks 10-13 (rearlib.experiments.studies)
# --------------------------------------------------------------------------------------------------------------
#: Per-scale plans. recipes: TrainConfig overrides on top of GENERATOR_TRAINING[scale] ("main" = the zoo's recipe
#: itself, so seed 0 is the zoo's (shipped) run). sizes: GeneratorConfig overrides of the scale's preset
#: (``base_size`` = the preset itself); a non-base size names its default DE block (3/4 depth, as the paper's
#: 15 of 20 and 18 of 24). noise_rows / embedding rows: see :func:`study_specs`. cfg_scales x cfg_powers: the
#: main study's CFG sweep, which grows at the edge holding the best FID (at most the plan's ``cfg_max_added`` scales per
#: power) until the best guidance is bracketed (rearlib.experiments.studies_plan.sweep_state). plans: how the ablation
#: studies (noise, embedding, scaling) train their rows: the recipe, the training seeds (every row gets each seed; runs
#: are ordered seed-major, so one seed of every row finishes first), the preset of Table 4's tied row, the FID extractor
#: of every study's evaluations, a secondary network whose FID / IS / KID / precision / recall are added as labeled
#: columns (not to the recipe study's learning curve) and the growth of the CFG sweep; ``plan`` is the default.
#: "short" is the one-seed, 1000-step plan of the committed small records (rank-limited tied row, the classifier's
#: FID, the fixed CFG grid); "full" the paper-proportioned recipe on several seeds, the tied row through a learned
#: projection, and at small the Inception FID network with the classifier's as secondary (at smoke the classifier
#: alone: its numbers mean nothing and a CPU scores it faster). Estimates
#: (``est_*``, for planning and the time limit only): training samples/s of the base size (measured on one H200: 9.5k
#: AR, 9.0k reAR), per-run overhead (compile, data, load), seconds per evaluation without / with CFG (sampling +
#: scoring), per-model sampler setup.
STUDIES: dict[str, Any] = {
    "smoke": dict(
        recipes={"main": {}, "short_main": {},
                 "ablation": dict(steps=12, warmup_steps=2, log_every=6, ckpt_every=12, snapshot_every=6),
                 "paper_shape": dict(steps=16, warmup_steps=4, log_every=8, ckpt_every=16, snapshot_every=8)},
        base_size="tiny",
        sizes={"xs": dict(hidden=32, depth=2, heads=2, projector_dim=64, decode_align_layer=1),
               "tiny": {},
               "medium": dict(hidden=96, depth=6, heads=4, projector_dim=192, decode_align_layer=4)},
        seeds=(0, 1, 2), cfg_scales=(3.0,), cfg_powers=(0.0, 2.0), align_weights=(0.5, 1.5),
        plans={"short": dict(recipe="ablation", main_recipe="short_main", seeds=(0,), tied="tied",
                             extractor="rearlib-classifier", secondary=None, cfg_max_added=0),
               "full": dict(recipe="paper_shape", main_recipe="main", seeds=(0, 1), tied="tied_projected",
                            extractor="rearlib-classifier", secondary=None, cfg_max_added=1)},
        plan="full",
        scaling_sizes=("xs", "tiny", "medium"),
        est_train_sps=120.0, est_run_overhead_s=3.0, est_eval_s=(1.0, 1.2), est_model_s=0.5),
    "small": dict(
        # 1000-step ablations (1.3 passes over the 200k training views) and two scaling sizes: what about 30 minutes
        # of one H200 afford for all four studies (measured: a 5000-step run 181 s, an evaluation 12 s);
        # the medium size (12 x 384) is defined for a longer budget.
        # paper_shape: the paper's proportions (warm-up a quarter of the run, cosine to the end LR, the noise
        # schedule over the whole run) at 8000 steps, with snapshots for the learning curve that sets the length of
        # the studies' recipe.
        # short_main: the 5000-step, 5%-warm-up recipe of the short plan's main comparison (its committed records).
        recipes={"main": {}, "short_main": dict(steps=5000, warmup_steps=250, snapshot_every=None),
                 "ablation": dict(steps=1000, warmup_steps=100, snapshot_every=250),
                 "paper_shape": dict(steps=8000, warmup_steps=2000, snapshot_every=1000)},
        base_size="small",
        sizes={"xs": dict(hidden=128, depth=4, heads=2, projector_dim=256, decode_align_layer=3),
               "small": {},
               "medium": dict(hidden=384, depth=12, heads=6, projector_dim=768, decode_align_layer=9)},
        seeds=(0, 1, 2), cfg_scales=(1.5, 2.0, 3.0), cfg_powers=(0.0, 2.0), align_weights=(0.5, 1.5),
        plans={"short": dict(recipe="ablation", main_recipe="short_main", seeds=(0,), tied="tied",
                             extractor="rearlib-classifier", secondary=None, cfg_max_added=0),
               "full": dict(recipe="paper_shape", main_recipe="paper_shape", seeds=(0, 1, 2), tied="tied_projected",
                            extractor="inception-v3-fid", secondary="rearlib-classifier", cfg_max_added=3)},
        plan="full",
        scaling_sizes=("xs", "small"),
        est_train_sps=9000.0, est_run_overhead_s=25.0, est_eval_s=(14.0, 16.0), est_model_s=4.0),
}


# --------------------------------------------------------------------------------------------------------------
# VA-π post-training (rearlib.vapi)
# --------------------------------------------------------------------------------------------------------------
#: Per-scale settings: VAPIConfig overrides, post-training steps and the size of the embedded-data pool.
#: "paper" is the released C2I recipe (128 images x G = 8 per step, 100 steps, lr 1e-6 for a 1.4B model, dropout in
#: the update pass as the code runs it). "small" is our choice for the 11M-parameter "small" generator: lr 1e-5
#: because a model trained at peak lr 4e-4 for minutes moves very little at 1e-6 in 100 steps (the paper's 1e-6 is
#: ~1% of LlamaGen's training lr 1e-4; 1e-5 is ~2.5% of ours); the update in eval mode (no dropout), a documented
#: deviation from the code (see VAPIConfig.update_mode: with dropout on, about half of each update ignores the
#: reward); the perceptual term ST-LPIPS(alex) by name, whatever weights a machine caches. "smoke" only proves the
#: code paths run.
#: Studies of the method: ``lr_sweep`` (learning rates) run with the scale's config plus ``sweep_config`` for
#: ``sweep_steps`` steps (at small: 128 images x G = 8 per step, 4 accumulated micro-batches of 32 images, the
#: paper's batch); ``controls`` are the runs that tell what the reward contributes (VAPIConfig.control), each with
#: the same seeds. rearlib.vapi_config.lr_sweep_configs / control_configs build the configs.
VAPI: dict[str, Any] = {
    "smoke": {"config": dict(batch_size=2, group_size=4, lr=1e-4, decode_batch=64, update_mode="eval",
                             perceptual="st-lpips-alex"),
              "steps": 3, "data_size": 64,
              "lr_sweep": (1e-4, 3e-4), "sweep_config": dict(batch_size=4, group_size=4, micro_batch_images=2),
              "sweep_steps": 2, "controls": ("full", "prior_only", "shuffled_rewards")},
    "small": {"config": dict(batch_size=32, group_size=8, lr=1e-5, micro_batch_images=0, decode_batch=256,
                             update_mode="eval", perceptual="st-lpips-alex"),
              "steps": 100, "data_size": 100_000,
              "lr_sweep": (1e-6, 3e-6, 1e-5), "sweep_config": dict(batch_size=128, group_size=8, micro_batch_images=32),
              "sweep_steps": 100, "controls": ("full", "prior_only", "shuffled_rewards")},
    "paper": {"config": dict(batch_size=128, group_size=8, lr=1e-6, micro_batch_images=1, decode_batch=64,
                             update_mode="train"),
              "steps": 100, "data_size": None,
              "lr_sweep": (1e-6,), "sweep_config": {}, "sweep_steps": 100,
              "controls": ("full", "prior_only", "shuffled_rewards")},
}


# --------------------------------------------------------------------------------------------------------------
# Diagnosis analyses of notebooks 05-08 (rearlib.analysis)
# --------------------------------------------------------------------------------------------------------------
#: Per-scale settings for the notebooks. ``images``: images per analysis (A, B, C use ``images``; D pools
#: ``cka_images``); ``batch_size``: rows per forward / decoding batch. smoke: CPU seconds, numbers meaningless.
#: small: one H200 (see ``python -m rearlib analysis benchmark`` for the measured cost). paper: N >= 1000
#: (docs/paper.md, reAR §6 item 2).
ANALYSIS: dict[str, Any] = {
    "smoke": {"images": 6, "ratios": (0.1, 0.5, 0.9), "r_primes": (0.0, 0.4, 0.8), "noise_fraction": 0.1,
              "cka_images": 6, "batch_size": 32, "repeats": 1},
    "small": {"images": 1000, "ratios": RATIOS, "r_primes": R_PRIMES, "noise_fraction": 0.1,
              "cka_images": 500, "batch_size": 512, "repeats": 1},
    "paper": {"images": 1000, "ratios": RATIOS, "r_primes": R_PRIMES, "noise_fraction": 0.1,
              "cka_images": 50, "batch_size": 128, "repeats": 1},
}


# --------------------------------------------------------------------------------------------------------------
# Teaching notebook 14 (rearlib.teaching)
# --------------------------------------------------------------------------------------------------------------
#: Sizes of notebook 14's non-interactive demonstration (papermill) per scale. ``images``: dataset images in
#: the sweeps; ``ctrs``: CTR levels of the replacement sweep; ``context_fractions``: fractions of corrupted
#: context tokens; ``latency_repeats``: interactions timed per kind; ``n_images``: range of the image sliders.
#: smoke uses the shipped small models too (see the notebook); its statistics come from 2 images.
TEACHING: dict[str, Any] = {
    "smoke": {"images": 2, "ctrs": (0.95, 0.8), "context_fractions": (0.0, 0.1), "latency_repeats": 3,
              "n_images": 64},
    "small": {"images": 32, "ctrs": (0.99, 0.95, 0.9, 0.8, 0.7, 0.5), "context_fractions": (0.0, 0.05, 0.1, 0.2),
              "latency_repeats": 15, "n_images": 256},
    "paper": {"images": 8, "ctrs": (0.95, 0.9, 0.8, 0.5), "context_fractions": (0.0, 0.1), "latency_repeats": 5,
              "n_images": 64},
}
