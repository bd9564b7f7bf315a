"""The training studies of notebooks 10-13 at our scale: what to train, what to evaluate, and a resumable CLI.

Studies (``docs/paper.md``, reAR §3):

* ``main`` (Table 1's AR vs reAR, Table 5's cost): plain AR and reAR with the zoo's recipe (``rearlib.scales.GENERATOR_TRAINING``),
  training seeds ``seeds``. Without CFG on every seed; with CFG: a sweep of (g, p) on training seed 0 with the
  *selection* sampling seed, then each variant's best (g, p) on every training seed with the *reporting*
  sampling seed (so the reported numbers carry no selection bias).
* ``noise`` (Table 3): the noisy-context schedules of ``rearlib.rear.PRESETS`` with the ablation recipe.
* ``embedding`` (Tables 4 and 7): vanilla AR, tied codebook embedding, DE-only at several depths, EN + DE
  variants and lambda, with the ablation recipe, without CFG (as the paper).
* ``scaling`` (Fig. 4): AR and reAR at several model sizes with the ablation recipe, FID at every snapshot.

Sampling seeds: with base seed S (the notebooks' ``seed``), reported numbers use S + 1; S is a second draw, used
for the CFG selection sweep and to measure sampling noise (the FID change between two sampling seeds of the same
weights). Every evaluation is a cached record of :mod:`rearlib.experiments.evaluation`, keyed by the run's *recipe* (its
TrainConfig hash, :func:`rearlib.experiments.zoo.run_hash`) and the step, never by its weights: records made on a GPU
machine complete the notebooks anywhere, and a notebook whose records all exist loads no generator at all.

CLI (the GPU machine runs it in chunks; weights stay there, records travel)::

    python -m rearlib studies status --scale small [--study all]
    python -m rearlib studies run    --scale small --study main|noise|embedding|scaling|all [--time-limit S]
    python -m rearlib studies pack   --scale small --out records.tar.gz
    python -m rearlib studies unpack records.tar.gz

``run`` trains and evaluates whatever is missing, in a fixed order (study, run, evaluation), and stops cleanly
before ``--time-limit`` seconds (a training that would not finish stops with a resumable checkpoint at its next
log step; ``--whole-runs`` starts only trainings expected to finish together with their evaluations). It prints
one line per item and a table.

A record belongs to one realization of its recipe (GPU training is not bit-reproducible). Weights never leave the
machine that trained them, so a run whose evaluations were cut off there is retrained elsewhere, and its later
records come from another realization; evaluating a run right after training it, and ``--whole-runs`` on a
machine's last command, keep this rare.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import re
import tarfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable

from rearlib.runtime import artifacts_root, atomic_write_bytes, config_hash, resolve_device

from rearlib.scales import validate_scale
from rearlib.metrics import EXTRACTORS, metric_label
from rearlib import scales

STUDIES = ("main", "noise", "embedding", "scaling")
RECIPES = ("main", "ablation")

#: FID extractor of the studies' evaluations. The committed records of these recipes were scored with the in-project
#: classifier, and their tables say so ("FID[rearlib-classifier]"); they move to the Inception FID network together
#: with the longer recipes, which retrain every row. ``Workspace(extractor=...)`` and ``run --extractor`` choose
#: another one.
STUDIES_EXTRACTOR = "rearlib-classifier"


#: The paper's numbers (docs/paper.md, reAR §3; reAR-S, ImageNet 256, Inception FID, 50k samples).
PAPER_TABLE3 = {  # noise setting -> FID (400 epochs, presumably with CFG)
    "align_only": ("ε = 0 (embedding regularization only)", 2.12),
    "fixed_0.5": ("ε = 0.5 fixed", 3.15),
    "fixed_0.25": ("ε = 0.25 fixed", 2.08),
    "uniform_0.5": ("ε ~ U(0, 0.5)", 2.05),
    "anneal_linear": ("ε ~ U(0, f(t)), f(t) = 1 - t", 2.02),
    "rear": ("ε ~ U(0, f(t)), f(t) = max(0, 1 - 4t/3) (final)", 2.00),
    "noise_only": ("final noise without embedding regularization", 2.18),
}
#: Tables 4 and 7 (80 epochs, no CFG): (setting, paper depth-20 layers, FID, IS). Layers: (EN, DE) 0-based.
PAPER_TABLE4 = [
    ("Vanilla AR", "ar", None, None, 21.32, 57.3),
    ("+ tied codebook embedding", "tied", None, None, 21.08, 57.2),
    ("+ DE@10", "de_only", None, 10, 21.29, 57.5),
    ("+ DE@15", "de_only", None, 15, 20.03, 61.0),
    ("+ DE@20", "de_only", None, 20, 20.28, 61.2),
    ("+ EN@0 + DE@20", "rear", 0, 20, 19.83, 61.7),
    ("+ EN@5 + DE@15", "rear", 5, 15, 21.36, 57.4),
    ("+ EN@0 + DE@15 (final)", "rear", 0, 15, 19.72, 61.3),
    ("λ = 0.5", "rear", 0, 15, 19.79, 60.9),
    ("λ = 1.5", "rear", 0, 15, 19.74, 61.5),
]
PAPER_TABLE7 = [("DE@13", 13, 20.47, 59.4), ("DE@14", 14, 20.17, 60.8), ("DE@15", 15, 20.03, 61.0),
                ("DE@16", 16, 20.11, 60.5), ("DE@17", 17, 20.25, 61.1)]
#: Fig. 4 (digitised ±0.03; presumably with CFG): steps -> FID per model.
PAPER_FIG4 = {"reAR-S": {50_000: 3.72, 100_000: 2.65, 150_000: 2.26, 200_000: 2.13, 250_000: 2.00},
              "reAR-B": {50_000: 3.58, 100_000: 2.54, 150_000: 2.15, 200_000: 2.01, 250_000: 1.91},
              "reAR-L": {50_000: 3.42, 100_000: 2.27, 150_000: 1.94, 200_000: 1.90, 250_000: 1.86}}
#: Table 5: minutes per epoch on 8xA800 and FID.
PAPER_TABLE5 = {"AR-B": (8.11, 3.12), "reAR-B": (8.14, 1.91), "AR-L": (15.99, 3.02), "reAR-L": (16.05, 1.86)}
PAPER_DEPTH, PAPER_FINAL_DE = 20, 15  # reAR-S: 20 blocks, DE@15


def settings(scale: str) -> dict:
    validate_scale(scale)
    if scale not in scales.STUDIES:
        raise ValueError(f"the studies exist at {', '.join(scales.STUDIES)} only (paper scale: the authors' recipe needs "
                         f"8 GPUs for days; see rearlib.train's 'paper' settings)")
    return scales.STUDIES[scale]


# ----------------------------------------------------------------------------------------------------------------
# Run specifications
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunSpec:
    """One training run of a study.

    Attributes:
        name: row name, unique within a study (e.g. "de_only@5").
        rear: a ``rearlib.rear.PRESETS`` name; ``rear_overrides`` are ReARConfig fields on top (as a dict or
            sorted (field, value) pairs), e.g. ``{"decode_layer": 5}`` or ``{"align_weight": 0.5}``.
        size: a key of the scale's ``sizes`` (None = the scale's base size, the preset of the zoo).
        recipe: "main" (the zoo's recipe) or "ablation" (the scale's shorter recipe, with snapshots).
        seed: training seed.
        steps: optional override of the recipe's number of steps.
    """

    name: str
    rear: str = "rear"
    rear_overrides: Any = ()
    size: str | None = None
    recipe: str = "ablation"
    seed: int = 0
    steps: int | None = None

    def __post_init__(self) -> None:
        ov = self.rear_overrides
        if isinstance(ov, dict):
            ov = tuple(sorted(ov.items()))
        object.__setattr__(self, "rear_overrides", tuple(tuple(kv) for kv in ov))
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"RunSpec.name must be a non-empty string, got {self.name!r}")
        if self.recipe not in RECIPES:
            raise ValueError(f"unknown recipe {self.recipe!r}; allowed: {', '.join(RECIPES)}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {self.seed!r}")
        if self.steps is not None and (isinstance(self.steps, bool) or not isinstance(self.steps, int)
                                       or self.steps < 1):
            raise ValueError(f"steps must be None or an integer >= 1, got {self.steps!r}")

    @property
    def overrides(self) -> dict:
        return dict(self.rear_overrides)


@dataclass
class Resolved:
    """A RunSpec made concrete for a scale and tokenizer: the zoo arguments, the config and its hash."""

    spec: RunSpec
    variant: Any                # preset name (plain presets: the zoo may use a shipped checkpoint) or ReARConfig
    overrides: dict             # TrainConfig overrides for rearlib.experiments.zoo (model_overrides, recipe fields)
    cfg: Any                    # the TrainConfig
    run_hash: str
    depth: int
    hidden: int
    heads: int
    encode_layer: int | None    # effective tapped blocks (None: that head is off)
    decode_layer: int | None
    size: str

    @property
    def steps(self) -> int:
        return self.cfg.steps

    @property
    def snapshot_steps(self) -> list[int]:
        every = self.cfg.snapshot_every
        if every is None:
            return [self.steps]
        return sorted({s for s in range(every, self.steps + 1, every)} | {self.steps})

    @property
    def size_label(self) -> str:
        return f"{self.depth}x{self.hidden}"


def resolve(scale: str, spec: RunSpec, tokenizer) -> Resolved:
    """Validate ``spec`` and build its TrainConfig (zoo recipe + recipe overrides + size + reAR config).

    Canonical form, so equal runs share one hash: a layer equal to the size's default is expressed as "default"
    (ReARConfig layer None; for a non-base size its default DE goes into ``model_overrides``), and a plain preset
    without overrides stays a preset name (then seed 0 of the main recipe is the zoo's shipped run).
    """
    from rearlib.model import PRESETS as MODEL_PRESETS
    from rearlib.rear import PRESETS as REAR_PRESETS
    from rearlib.rear import get_rear_config
    from rearlib.experiments.zoo import recipe_key, train_config

    st = settings(scale)
    size = spec.size or st["base_size"]
    if size not in st["sizes"]:
        raise ValueError(f"unknown model size {size!r} at scale {scale!r}; sizes: {', '.join(st['sizes'])}")
    rear = get_rear_config(spec.rear, **spec.overrides)  # unknown preset / field -> ValueError listing them
    size_ov = dict(st["sizes"][size])
    zoo_preset = train_config(scale, "ar", tokenizer).model
    base = MODEL_PRESETS[zoo_preset]
    default_de = size_ov.pop("decode_align_layer", base.decode_align_layer)
    default_en = base.encode_align_layer
    depth = size_ov.get("depth", base.depth)
    hidden = size_ov.get("hidden", base.hidden)
    heads = size_ov.get("heads", base.heads)
    aligned = rear.uses_alignment
    layers = {}
    for which, on, given, default in (("encode", rear.encode_align, rear.encode_layer, default_en),
                                      ("decode", rear.decode_align, rear.decode_layer, default_de)):
        if given is not None and not (on and aligned):
            raise ValueError(f"{spec.name}: {which}_layer={given} is set but the {which} alignment term is off in "
                             f"preset {spec.rear!r}")
        eff = (given if given is not None else default) if (on and aligned) else None
        if eff is not None and not 0 <= eff < depth:
            raise ValueError(f"{spec.name}: {which} layer {eff} is out of range for a {depth}-block model "
                             f"(0-based blocks 0..{depth - 1})")
        layers[which] = eff
    canon = {}
    if rear.encode_layer is not None:
        canon["encode_layer"] = None if rear.encode_layer == default_en else rear.encode_layer
    if rear.decode_layer is not None:
        canon["decode_layer"] = None if rear.decode_layer == default_de else rear.decode_layer
    rear = replace(rear, **canon)
    model_ov = dict(size_ov)
    if layers["decode"] is not None and rear.decode_layer is None and "decode_align_layer" in st["sizes"][size]:
        model_ov["decode_align_layer"] = default_de
    overrides = dict(st["recipes"][spec.recipe])
    if spec.steps is not None:
        overrides["steps"] = spec.steps
        # a shorter run keeps the recipe's warm-up unless that would not fit
        overrides["warmup_steps"] = min(overrides.get("warmup_steps", scales.GENERATOR_TRAINING[scale]["warmup_steps"]), spec.steps)
    if model_ov:
        overrides["model_overrides"] = model_ov
    variant = spec.rear if rear == REAR_PRESETS[spec.rear] else rear
    cfg = train_config(scale, variant, tokenizer, spec.seed, **dict(overrides))
    run_hash = config_hash(recipe_key(scale, cfg, tokenizer.identity()))
    return Resolved(spec=spec, variant=variant, overrides=overrides, cfg=cfg, run_hash=run_hash, depth=depth,
                    hidden=hidden, heads=heads, encode_layer=layers["encode"], decode_layer=layers["decode"],
                    size=size)


def paper_layer(k: int, default_de: int, depth: int) -> int:
    """Our block for the paper's reAR-S block ``k``: round(k x default_DE / 15), at most the last block.

    Anchors the paper's final DE@15 on our model's own default DE (6 of 8 at small: DE@10 -> 4, DE@13 -> 5,
    DE@14..16 -> 6, DE@17 -> 7, DE@20 -> 7 (the last block; "DE@20" is not a valid 0-based index of a 20-block
    model, docs/paper.md, reAR §6 item 10), EN@5 -> 2).
    """
    return int(min(depth - 1, round(k * default_de / PAPER_FINAL_DE)))


def _base_layers(scale: str) -> tuple[int, int, int]:
    """(default EN, default DE, depth) of the scale's base model preset (the zoo's generator preset)."""
    from rearlib.model import PRESETS as MODEL_PRESETS

    base = MODEL_PRESETS[scales.GENERATOR_TRAINING[scale]["model"]]
    return base.encode_align_layer, base.decode_align_layer, base.depth


def embedding_rows(scale: str) -> list[dict]:
    """Rows of Tables 4 and 7 mapped to our depth: {"name", "spec", "paper": [(table, setting, FID, IS)]}.

    Several paper rows may map to one of our runs (e.g. DE@14, 15 and 16 are all block 6 of 8).
    """
    en0, de0, depth = _base_layers(scale)
    st = settings(scale)
    rows: dict[str, dict] = {}

    def add(name, spec, table, setting, fid, isc):
        rows.setdefault(name, {"name": name, "spec": spec, "paper": []})["paper"].append((table, setting, fid, isc))

    for setting, preset, en, de, fid, isc in PAPER_TABLE4:
        if preset in ("ar", "tied"):
            add(preset, RunSpec(preset, rear=preset), "Table 4", setting, fid, isc)
            continue
        ov = {}
        if de is not None:
            ov["decode_layer"] = paper_layer(de, de0, depth)
        if preset == "rear" and en:
            ov["encode_layer"] = paper_layer(en, de0, depth)
        if setting.startswith("λ"):
            w = float(setting.split("=")[1])
            ov["align_weight"] = w
        name = _row_name(preset, ov, de0, en0)
        add(name, RunSpec(name, rear=preset, rear_overrides=ov), "Table 4", setting, fid, isc)
    for setting, de, fid, isc in PAPER_TABLE7:
        ov = {"decode_layer": paper_layer(de, de0, depth)}
        name = _row_name("de_only", ov, de0, en0)
        add(name, RunSpec(name, rear="de_only", rear_overrides=ov), "Table 7", setting, fid, isc)
    extra = [w for w in st["align_weights"] if w not in (0.5, 1.5)]
    for w in extra:  # settings may ask for more lambdas than the paper's
        ov = {"align_weight": float(w)}
        name = _row_name("rear", ov, de0, en0)
        rows.setdefault(name, {"name": name, "spec": RunSpec(name, rear="rear", rear_overrides=ov), "paper": []})
    order = ["ar", "tied"] + sorted((n for n in rows if n.startswith("de_only")),
                                    key=lambda n: int(n.split("@")[1]))
    order += [n for n in rows if n not in order]
    return [rows[n] for n in order]


def _row_name(preset: str, ov: dict, de0: int, en0: int) -> str:
    if preset == "de_only":
        return f"de_only@{ov.get('decode_layer', de0)}"
    parts = [preset]
    if ov.get("encode_layer", en0) != en0:
        parts.append(f"EN@{ov['encode_layer']}")
    if ov.get("decode_layer", de0) != de0:
        parts.append(f"DE@{ov['decode_layer']}")
    if ov.get("align_weight", 1.0) != 1.0:
        parts.append(f"lambda={ov['align_weight']:g}")
    return " ".join(parts)


def study_specs(scale: str, study: str) -> list[RunSpec]:
    """The runs of a study, in execution order."""
    st = settings(scale)
    if study == "main":
        return [RunSpec(f"{v} seed{s}", rear=v, recipe="main", seed=s) for s in st["seeds"] for v in ("ar", "rear")]
    if study == "noise":
        return [RunSpec(name, rear=name) for name in PAPER_TABLE3]
    if study == "embedding":
        return [r["spec"] for r in embedding_rows(scale)]
    if study == "scaling":
        out = []
        for size in st["scaling_sizes"]:
            for v in ("ar", "rear"):
                # The base size has the canonical name of the ablation rows: the same run as Tables 3 and 4.
                name = v if size == st["base_size"] else f"{v} {size}"
                out.append(RunSpec(name, rear=v, size=None if size == st["base_size"] else size))
        return out
    raise ValueError(f"unknown study {study!r}; allowed: {', '.join(STUDIES)} or 'all'")


def _studies(study: str) -> list[str]:
    if study == "all":
        return list(STUDIES)
    if study not in STUDIES:
        raise ValueError(f"unknown study {study!r}; allowed: {', '.join(STUDIES)} or 'all'")
    return [study]


# ----------------------------------------------------------------------------------------------------------------
# Items: evaluations (and the implied trainings)
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Item:
    """One evaluation of a study: a run's weights at ``step``, (g, p), a sampling seed and its role.

    role: "report" (the reported number), "noise" (a second sampling seed of a reported row), "select" (the
    main study's CFG sweep) or "best" (the main study's best (g, p) on the reporting seed). ``pending``: a "best"
    item whose (g, p) is not known yet (its sweep is incomplete).
    """

    study: str
    run: Resolved | None
    step: int | None
    cfg_scale: float | None
    cfg_power: float | None
    sample_seed: int
    role: str
    pending: str = ""
    floor: bool = False
    key: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        from rearlib.experiments.evaluation import setting_label

        if self.floor:
            return "real train images (floor)"
        if self.pending:
            return self.pending
        return f"{setting_label(self.cfg_scale, self.cfg_power)} seed {self.sample_seed}"


class Workspace:
    """The tokenizer, classifier, evaluator and run resolution of one scale (and a one-model cache).

    ``sample_seed``: the base sampling seed S (reported numbers use S + 1, see the module docstring).
    """

    def __init__(self, scale: str, device="auto", *, sample_seed: int = 0, progress: bool = True,
                 extractor: str | None = None):
        import torch
        from rearlib.experiments.evaluation import Evaluator
        from rearlib.metrics.classifier import get_classifier
        from rearlib.tokenizers import get_tokenizer

        self.scale = scale
        self.st = settings(scale)
        if isinstance(sample_seed, bool) or not isinstance(sample_seed, int) or sample_seed < 0:
            raise ValueError(f"sample_seed must be an integer >= 0, got {sample_seed!r}")
        self.device = resolve_device(device) if isinstance(device, (str, type(None))) else torch.device(device)
        self.progress = progress
        self.tok = get_tokenizer(scale, self.device, progress=False)
        self.classifier = get_classifier(scale, self.device)
        self.extractor = extractor or STUDIES_EXTRACTOR
        self.evaluator = Evaluator(scale, self.tok, self.classifier, self.device, data_seed=scales.GENERATOR_DATA[scale]["seed"],
                                   progress=progress, extractor=self.extractor)
        self.n_per_class = scales.EVALUATION[scale]["n_per_class"]
        self.select_seed, self.report_seed = sample_seed, sample_seed + 1
        self._resolved: dict[RunSpec, Resolved] = {}
        self._model: tuple[str, int, Any] | None = None

    # -- runs --------------------------------------------------------------------------------------------
    def resolve(self, spec: RunSpec) -> Resolved:
        if spec not in self._resolved:
            self._resolved[spec] = resolve(self.scale, spec, self.tok)
        return self._resolved[spec]

    def training_result(self, run: Resolved) -> dict | None:
        from rearlib.experiments.zoo import training_result

        return training_result(self.scale, run.variant, self.tok, run.spec.seed, **run.overrides)

    def load_model(self, run: Resolved, step: int):
        """The run's weights at ``step`` (cached: consecutive evaluations of one model load it once)."""
        from rearlib.experiments.zoo import load_run

        if self._model is not None and self._model[:2] == (run.run_hash, step):
            return self._model[2]
        self.release_model()
        model = load_run(self.scale, run.variant, self.tok, run.spec.seed, step=step, device=self.device,
                         **run.overrides)
        self._model = (run.run_hash, step, model)
        return model

    def release_model(self) -> None:
        if self._model is not None:
            from rearlib.sample import clear_sampler_cache

            self._model = None
            clear_sampler_cache()  # the fast decoders hold a copy of the weights and their CUDA graphs

    def weights_available(self, run: Resolved, step: int) -> bool:
        from rearlib.train import snapshot_path
        from rearlib.experiments.zoo import _shipped_for

        folder = artifacts_root() / "generators" / run.run_hash
        if step == run.steps:
            if isinstance(run.variant, str) and not run.overrides:
                if _shipped_for(self.scale, run.variant, run.spec.seed, {}, run.cfg) is not None:
                    return True
            return (folder / "model.pt").is_file() and (folder / "result.json").is_file()
        return snapshot_path(folder, step).is_file()

    def train(self, run: Resolved, time_limit_s: float | None = None, *, deadline: float | None = None,
              reserve_s: float = 0.0) -> dict:
        """Train (or resume) ``run``; it stops with a checkpoint after ``time_limit_s`` seconds of training, or
        ``reserve_s`` before the ``time.monotonic()`` ``deadline`` (counted after the token data is ready)."""
        from rearlib.experiments.zoo import get_tokens, train_generator

        self.release_model()
        if deadline is not None:
            get_tokens(self.scale, self.tok, progress=self.progress)  # pretokenizing is not training time
            limit = deadline - time.monotonic() - reserve_s
            time_limit_s = limit if time_limit_s is None else min(time_limit_s, limit)
        if self.device.type == "cuda":
            import torch

            # Every run compiles as in a fresh process: dynamo's per-function recompile limit and its automatic
            # dynamic shapes (after a size change) would otherwise make later runs of one command slower or
            # eager, and their samples/s incomparable. Inductor's on-disk cache still makes repeats cheap.
            torch._dynamo.reset()
            torch.cuda.empty_cache()
        res = train_generator(self.scale, run.variant, self.tok, run.spec.seed, device=self.device,
                              time_limit_s=time_limit_s, progress=self.progress, **run.overrides)
        res.pop("model", None)
        return res

    # -- items -------------------------------------------------------------------------------------------
    def _eval_item(self, study, run, step, g, p, seed, role) -> Item:
        from rearlib.experiments.evaluation import run_model_key

        it = Item(study, run, step, g, p, seed, role)
        it.key = self.evaluator.key(run_model_key(run.run_hash, step), n_per_class=self.n_per_class,
                                    cfg_scale=g, cfg_power=p, sample_seed=seed)
        return it

    def floor_item(self, study: str) -> Item:
        it = Item(study, None, None, None, None, 0, "floor", floor=True)
        it.key = self.evaluator.floor_key(self.floor_subject(), self.n_per_class * 10)
        return it

    def floor_subject(self) -> dict:

        return {"kind": "real", "dataset": "ShapeScenes-10", "split": "train", "seed": scales.GENERATOR_DATA[self.scale]["seed"],
                "resolution": self.tok.resolution}

    def evaluate(self, item: Item) -> dict:
        """Sample and score ``item`` (loading its weights only if its record is missing); returns the record."""
        if item.floor:
            return self.evaluate_floor()
        return self.evaluator.evaluate_record(item.key["model"], lambda: self.load_model(item.run, item.step),
                                              n_per_class=self.n_per_class, cfg_scale=item.cfg_scale,
                                              cfg_power=item.cfg_power, sample_seed=item.sample_seed)

    def evaluate_floor(self) -> dict:
        """Real training images, as many as one generated set: the finite-sample floor of FID (cached)."""
        from rearlib.data import render_batch

        n = self.n_per_class * 10
        sub = self.floor_subject()

        def make():
            import torch

            with torch.no_grad():
                return render_batch(torch.arange(n), sub["resolution"], seed=sub["seed"], split="train",
                                    device=self.device)

        return self.evaluator.evaluate_images(sub, make, n)

    def is_done(self, item: Item) -> bool:
        from rearlib.experiments.evaluation import record_path

        return not item.pending and record_path(item.key).is_file()

    def best_cfg(self, run: Resolved) -> tuple[float, float] | None:
        """argmin FID over the sweep of ``run`` on the selection seed, or None while the sweep is incomplete."""
        from rearlib.experiments.evaluation import load_record

        best = None
        for g in self.st["cfg_scales"]:
            for p in self.st["cfg_powers"]:
                rec = load_record(self._eval_item("main", run, run.steps, g, p, self.select_seed, "select").key)
                if rec is None:
                    return None
                fid = float(rec["row"][metric_label("fid", self.extractor)])
                if best is None or fid < best[0]:
                    best = (fid, g, p)
        return best[1], best[2]

    def items(self, study: str) -> list[Item]:
        """The study's evaluations in execution order (run-major, so each model is loaded once)."""
        out: list[Item] = [self.floor_item(study)]
        S, R = self.select_seed, self.report_seed
        specs = study_specs(self.scale, study)
        if study == "main":
            best = {}
            for spec in specs:
                if spec.seed == self.st["seeds"][0]:
                    best[spec.rear] = self.best_cfg(self.resolve(spec))
            for spec in specs:
                run = self.resolve(spec)
                out.append(self._eval_item(study, run, run.steps, None, None, R, "report"))
                if spec.seed == self.st["seeds"][0]:
                    out.append(self._eval_item(study, run, run.steps, None, None, S, "noise"))
                    out += [self._eval_item(study, run, run.steps, g, p, S, "select")
                            for g in self.st["cfg_scales"] for p in self.st["cfg_powers"]]
                    best[spec.rear] = self.best_cfg(run)
                b = best.get(spec.rear)
                if b is None:
                    out.append(Item(study, run, run.steps, None, None, R, "best",
                                    pending=f"best CFG on seed {R} (after the {spec.rear} sweep)"))
                else:
                    out.append(self._eval_item(study, run, run.steps, b[0], b[1], R, "best"))
            return out
        noise_rows = {"noise": ("rear",), "embedding": ("ar", "rear"), "scaling": ("ar", "rear")}[study]
        for spec in specs:
            run = self.resolve(spec)
            steps = run.snapshot_steps if study == "scaling" else [run.steps]
            for step in steps:
                out.append(self._eval_item(study, run, step, None, None, R, "report"))
            if spec.name in noise_rows:
                out.append(self._eval_item(study, run, run.steps, None, None, S, "noise"))
        return out

    # -- estimates ---------------------------------------------------------------------------------------
    def estimate_train_s(self, run: Resolved) -> float:
        """Seconds to train ``run`` on the reference GPU: samples / (base samples/s x base FLOPs / run FLOPs)."""
        from rearlib.model import estimate_flops_per_token

        base = self.resolve(RunSpec("base", rear="rear"))
        f_run = estimate_flops_per_token(_model_config(run.cfg), align=run.cfg.rear.uses_alignment)
        f_base = estimate_flops_per_token(_model_config(base.cfg), align=True)
        sps = self.st["est_train_sps"] * f_base / f_run
        return self.st["est_run_overhead_s"] + run.steps * run.cfg.batch_size * run.cfg.grad_accum / sps

    def estimate_eval_s(self, item: Item) -> float:
        if item.floor:
            return self.st["est_eval_s"][0] / 2
        return self.st["est_eval_s"][0 if item.cfg_scale is None else 1]


def _model_config(cfg):
    from rearlib.model import get_config
    from rearlib.train import generator_overrides

    return get_config(cfg.model, **generator_overrides(cfg))


# ----------------------------------------------------------------------------------------------------------------
# Running the plan
# ----------------------------------------------------------------------------------------------------------------
def _fmt_s(s: float | None) -> str:
    return "-" if s is None else f"{s:7.1f}"


def run_studies(scale: str, study: str = "all", *, device="auto", sample_seed: int = 0,
                time_limit_s: float | None = None, whole_runs: bool = False, progress: bool = True,
                t_start: float | None = None, ws: Workspace | None = None, extractor: str | None = None,
                log=print) -> dict:
    """Train and evaluate whatever is missing, in order, stopping cleanly before ``time_limit_s``.

    ``t_start``: the ``time.monotonic()`` the limit counts from (default: now). Returns {"stopped": bool,
    "reason": str, "items": [rows of the progress table], "missing": int}.
    """
    t0 = time.monotonic() if t_start is None else t_start
    deadline = None if time_limit_s is None else t0 + float(time_limit_s)
    ws = ws or Workspace(scale, device, sample_seed=sample_seed, progress=progress, extractor=extractor)
    reserve = ws.st["est_run_overhead_s"] + 5.0  # checkpoint write, model load, the last log window
    table: list[dict] = []
    stopped, reason = False, ""

    def left() -> float:
        return math.inf if deadline is None else deadline - time.monotonic()

    def note(row: dict) -> None:
        table.append(row)
        log(f"[{time.monotonic() - t0:7.1f} s] {row['study']:<9} {row['run']:<22} {row['what']:<34} "
            f"{row['status']:<26} {_fmt_s(row.get('wall s'))}")

    seen_keys: set[str] = set()
    for name in _studies(study):
        i = 0
        while True:
            items = ws.items(name)  # re-planned: the main study's best-CFG items appear after their sweep
            if i >= len(items):
                break
            item = items[i]
            i += 1
            run_name = item.run.spec.name if item.run else "-"
            what = item.label if item.floor or item.pending else f"step {item.step}: {item.label}"
            base = {"study": name, "run": run_name, "what": what}
            if item.pending:
                note({**base, "status": "pending", "wall s": None})
                continue
            k = config_hash(item.key)
            if k in seen_keys or ws.is_done(item):
                if k not in seen_keys:
                    note({**base, "status": "done", "wall s": None})
                seen_keys.add(k)
                continue
            if item.floor:
                if left() < ws.estimate_eval_s(item) + 5:
                    stopped, reason = True, "time limit (before an evaluation)"
                    break
                t = time.monotonic()
                ws.evaluate_floor()
                note({**base, "status": "evaluated", "wall s": time.monotonic() - t})
                seen_keys.add(k)
                continue
            run = item.run
            if not ws.weights_available(run, item.step):
                est = ws.estimate_train_s(run)
                if whole_runs:  # the run's evaluations too: weights that are gone cannot be evaluated later
                    est += sum(ws.estimate_eval_s(it) for it in items[i - 1:]
                               if it.run is not None and it.run.run_hash == run.run_hash and not ws.is_done(it))
                budget = left() - reserve
                if budget < min(60.0, est) or (whole_runs and budget < est):
                    stopped, reason = True, (f"time limit (training {run.spec.name} needs ~{est:.0f} s, "
                                             f"{max(0.0, budget):.0f} s left)")
                    break
                t = time.monotonic()
                res = ws.train(run, deadline=deadline, reserve_s=reserve)
                wall = time.monotonic() - t
                note({"study": name, "run": run.spec.name, "what": f"train {run.steps} steps ({run.size_label})",
                      "status": f"{res['status']} at step {res['step']}", "wall s": wall})
                if res["status"] != "completed":
                    stopped, reason = True, (f"time limit during training of {run.spec.name} (checkpoint at step "
                                             f"{res['step']}; the same command on this machine resumes it)")
                    break
                if not ws.weights_available(run, item.step):
                    raise RuntimeError(f"{run.spec.name} finished but its weights for step {item.step} are missing "
                                       f"in {artifacts_root() / 'generators' / run.run_hash}")
            est = ws.estimate_eval_s(item) + (ws.st["est_model_s"] if ws._model is None else 0.0)
            if left() < est:
                stopped, reason = True, "time limit (before an evaluation)"
                break
            t = time.monotonic()
            ws.evaluate(item)
            note({**base, "status": "evaluated", "wall s": time.monotonic() - t})
            seen_keys.add(k)
        if stopped:
            break
    ws.release_model()
    missing = sum(1 for it in _all_items(ws, study) if it.pending or not ws.is_done(it))
    log(f"{'stopped: ' + reason if stopped else 'finished'}; {missing} evaluation(s) missing; "
        f"{time.monotonic() - t0:.0f} s")
    return {"stopped": stopped, "reason": reason, "items": table, "missing": missing}


def _all_items(ws: Workspace, study: str) -> list[Item]:
    seen, out = set(), []
    for name in _studies(study):
        for it in ws.items(name):
            k = config_hash(it.key) if it.key else f"pending:{name}:{it.pending}:{it.run.run_hash if it.run else ''}"
            if k not in seen:
                seen.add(k)
                out.append(it)
    return out


def status(scale: str, study: str = "all", *, sample_seed: int = 0, device="cpu", ws: Workspace | None = None,
           extractor: str | None = None, log=print) -> dict:
    """Print what is done and missing (and the estimated GPU time of the missing work); nothing is computed."""
    ws = ws or Workspace(scale, device, sample_seed=sample_seed, progress=False, extractor=extractor)
    rows, est_total = [], 0.0
    trained_est: set[str] = set()  # shared runs and records are counted once, by the first study that needs them
    counted: set[str] = set()
    for name in _studies(study):
        est = 0.0
        done = missing = 0
        for it in ws.items(name):
            ok = ws.is_done(it)
            done += ok
            missing += not ok
            k = config_hash(it.key) if it.key else f"pending:{id(it)}"
            if not ok and k not in counted:
                counted.add(k)
                if it.run is not None and not ws.weights_available(it.run, it.step or it.run.steps) \
                        and it.run.run_hash not in trained_est:
                    trained_est.add(it.run.run_hash)
                    est += ws.estimate_train_s(it.run)
                est += ws.estimate_eval_s(it)
            rows.append({"study": name, "run": it.run.spec.name if it.run else "-",
                         "what": it.label if it.floor or it.pending else f"step {it.step}: {it.label}",
                         "status": "done" if ok else ("pending" if it.pending else "missing")})
        log(f"{name:<10} done {done:3d}, missing {missing:3d}; estimated {est / 60:5.1f} min of GPU work "
            f"(one H200, from session-1 rates; runs shared with an earlier study not counted again)")
        est_total += est
    for r in rows:
        if r["status"] != "done":
            log(f"   {r['study']:<9} {r['run']:<22} {r['what']:<40} {r['status']}")
    log(f"total estimated {est_total / 60:.1f} min")
    return {"rows": rows, "estimated_s": est_total}


# ----------------------------------------------------------------------------------------------------------------
# Results for the notebooks
# ----------------------------------------------------------------------------------------------------------------
def _noise_text(r) -> str:
    if r.noise == "none":
        return "none"
    if r.noise == "fixed":
        return f"fixed {r.noise_max:g}"
    if r.noise == "uniform":
        return f"U(0, {r.noise_max:g})"
    return f"U(0, {r.noise_max:g}·max(0, 1 - t/{r.anneal_end:g}))"


def provenance_note(result: dict) -> str:
    """Where a collected study's trainings and evaluation records were made (a notebook may only tabulate them)."""
    gpus = sorted({str(g) for g in result["runs"].get("GPU", []) if g is not None})
    ev = result["evals"]
    where = sorted({str(g if isinstance(g, str) and g else d) for g, d in zip(ev.get("eval GPU", []),
                                                                          ev.get("eval device", []))})
    return (f"trainings ran on: {', '.join(gpus) or 'unknown'}; evaluation records made on: "
            f"{', '.join(where) or 'unknown'} (this notebook tabulates the cached records and loads no model "
            f"when all of them exist)")


def collect(scale: str, study: str, *, device="auto", sample_seed: int = 0, compute: bool = True,
            progress: bool = True, ws: Workspace | None = None, extractor: str | None = None) -> dict:
    """Everything a study notebook shows, from records; missing records are computed first when ``compute``.

    Returns {"runs": DataFrame (one row per run: spec, layers, training record), "evals": DataFrame (one row
    per evaluation: run, step, setting, role, labeled metrics, provenance), "floor": dict (real training images,
    the same count), "workspace": the Workspace}. At ``small`` without a GPU, missing records raise a
    FileNotFoundError that says how to make them (``python -m rearlib studies run`` on a GPU, or ``unpack``).
    """
    import pandas as pd

    from rearlib.experiments.evaluation import load_record

    if study not in STUDIES:
        raise ValueError(f"unknown study {study!r}; allowed: {', '.join(STUDIES)}")
    ws = ws or Workspace(scale, device, sample_seed=sample_seed, progress=progress, extractor=extractor)
    missing = [it for it in ws.items(study) if it.pending or not ws.is_done(it)]
    if missing and compute:
        if scale != "smoke" and ws.device.type != "cuda":
            raise FileNotFoundError(
                f"{len(missing)} evaluation record(s) of the {study!r} study are missing at scale {scale!r} and this "
                f"machine has no GPU. On a GPU: python -m rearlib studies run --scale {scale} --study {study}; "
                f"then bring them here with `python -m rearlib studies pack/unpack`.")
        res = run_studies(scale, study, ws=ws, progress=progress, log=(print if progress else (lambda *a: None)))
        if res["missing"]:
            raise RuntimeError(f"{res['missing']} evaluation(s) of {study!r} are still missing: {res['reason']}")
    elif missing:
        raise FileNotFoundError(f"{len(missing)} evaluation record(s) of the {study!r} study are missing "
                                f"(compute=False)")
    run_rows, seen = [], set()
    for spec in study_specs(scale, study):
        run = ws.resolve(spec)
        if run.run_hash in seen:
            continue
        seen.add(run.run_hash)
        r = ws.training_result(run) or {}
        rc = run.cfg.rear
        final = r.get("final") or {}
        run_rows.append({
            "run": spec.name, "preset": spec.rear, "overrides": json.dumps(spec.overrides) if spec.overrides else "",
            "seed": spec.seed, "recipe": spec.recipe, "size": run.size, "model": run.size_label,
            "heads": run.heads, "EN": run.encode_layer, "DE": run.decode_layer,
            "lambda": rc.align_weight if rc.uses_alignment else 0.0, "noise": _noise_text(rc),
            "tied": rc.tied_codebook, "steps": run.steps, "batch": run.cfg.batch_size * run.cfg.grad_accum,
            "params": r.get("params"), "train time (s)": r.get("train_time_s"),
            "wall time (s)": r.get("wall_time_s"), "samples/s": r.get("samples_per_s"), "GPU": r.get("gpu") or "CPU",
            "final loss": final.get("loss"), "final CE": final.get("ce"), "run hash": run.run_hash,
            "trained": bool(r), "source": r.get("source", ""),
        })
    eval_rows = []
    floor = None
    for it in ws.items(study):
        rec = load_record(it.key)
        if it.floor:
            floor = dict(rec["row"]) if rec else None
            continue
        if rec is None:
            continue
        from rearlib.experiments.evaluation import setting_label

        prov = rec.get("provenance", {})
        eval_rows.append({
            "run": it.run.spec.name, "preset": it.run.spec.rear, "seed": it.run.spec.seed, "size": it.run.size,
            "model": it.run.size_label, "step": it.step, "steps": it.run.steps,
            "setting": setting_label(it.cfg_scale, it.cfg_power),
            "cfg_scale": it.cfg_scale if it.cfg_scale is not None else 1.0,
            "cfg_power": it.cfg_power if it.cfg_scale is not None else float("nan"),
            "sample_seed": it.sample_seed, "role": it.role, **rec["row"],
            "eval device": prov.get("device"), "eval GPU": prov.get("gpu"), "run hash": it.run.run_hash,
        })
    return {"runs": pd.DataFrame(run_rows), "evals": pd.DataFrame(eval_rows), "floor": floor, "workspace": ws}


def sampling_noise(evals, fid_col: str, rows: Iterable[str], report_seed: int, noise_seed: int) -> float:
    """max over ``rows`` of |FID(report seed) - FID(noise seed)| of the final weights, without CFG."""
    d = evals[(evals["setting"] == "no CFG") & (evals["step"] == evals["steps"]) & evals["run"].isin(list(rows))]
    out = []
    for _, g in d.groupby("run"):
        a = g.loc[g["sample_seed"] == report_seed, fid_col]
        b = g.loc[g["sample_seed"] == noise_seed, fid_col]
        if len(a) and len(b):
            out.append(abs(float(a.iloc[0]) - float(b.iloc[0])))
    if not out:
        raise ValueError(f"no pair of sampling seeds ({report_seed}, {noise_seed}) for rows {list(rows)}")
    return max(out)


# ----------------------------------------------------------------------------------------------------------------
# Moving records between machines
# ----------------------------------------------------------------------------------------------------------------
_MEMBER = re.compile(r"^(eval_records|generators)/[0-9a-f]{12}/(record|config|result)\.json$")
_MAX_MEMBER_BYTES = 8 * 2**20


def pack(scale: str, out: str | Path, *, ws: Workspace | None = None, log=print) -> dict:
    """Write every evaluation record of ``scale`` and each study run's ``result.json`` (no weights) to a tar.gz.

    Paths inside are relative to the artifact root (``eval_records/<hash>/record.json``,
    ``generators/<hash>/result.json`` with their ``config.json``). Written atomically.
    """
    from rearlib.experiments.evaluation import RECORD_KIND, iter_records

    ws = ws or Workspace(scale, "cpu", progress=False)
    root = artifacts_root()
    files: list[Path] = []
    for path, _ in iter_records(scale=scale):
        files += [path, path.with_name("config.json")]
    runs = set()
    for name in STUDIES:
        for spec in study_specs(scale, name):
            runs.add(ws.resolve(spec).run_hash)
    for h in sorted(runs):
        folder = root / "generators" / h
        if (folder / "result.json").is_file():
            files += [folder / "result.json", folder / "config.json"]
    buf = io.BytesIO()
    n_records = n_results = 0
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for f in files:
            if not f.is_file():
                continue
            rel = f.relative_to(root).as_posix()
            tar.add(f, arcname=rel, recursive=False)
            n_records += rel.startswith(RECORD_KIND) and rel.endswith("record.json")
            n_results += rel.endswith("result.json")
    atomic_write_bytes(out, buf.getvalue())
    log(f"wrote {out}: {n_records} evaluation records, {n_results} training results "
        f"({len(buf.getvalue()) / 1024:.0f} KiB)")
    return {"records": n_records, "results": n_results, "path": str(out)}


def unpack(archive: str | Path, *, log=print) -> dict:
    """Extract a :func:`pack` archive into the artifact root; existing files are kept (never overwritten).

    Only regular files named ``eval_records|generators/<12 hex>/(record|config|result).json`` holding JSON are
    accepted; anything else raises ValueError before a file is written.
    """
    from rearlib.runtime import atomic_write_bytes as write

    root = artifacts_root()
    members = []
    with tarfile.open(archive, mode="r:gz") as tar:
        for m in tar.getmembers():
            if m.isdir():
                continue
            if not m.isfile() or not _MEMBER.match(m.name) or m.size > _MAX_MEMBER_BYTES:
                raise ValueError(f"{archive}: unexpected member {m.name!r} (type {m.type!r}, {m.size} bytes); "
                                 f"not a rearlib.experiments.studies pack")
            data = tar.extractfile(m).read()
            try:
                json.loads(data)
            except json.JSONDecodeError as err:
                raise ValueError(f"{archive}: {m.name} is not JSON ({err})") from err
            members.append((m.name, data))
    written = kept = 0
    for name, data in members:
        target = root / name
        if target.exists():
            kept += 1
            continue
        write(target, data)
        written += 1
    log(f"unpacked {archive}: {written} file(s) written, {kept} already present (kept)")
    return {"written": written, "kept": kept}


# ----------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    t_start = time.monotonic()
    parser = argparse.ArgumentParser(prog="python -m rearlib studies", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for cmd in ("status", "run"):
        p = sub.add_parser(cmd)
        p.add_argument("--scale", default="small", choices=tuple(scales.STUDIES))
        p.add_argument("--study", default="all", choices=STUDIES + ("all",))
        p.add_argument("--sample-seed", type=int, default=0, help="base sampling seed S (reports use S + 1)")
        p.add_argument("--device", default="auto" if cmd == "run" else "cpu")
        p.add_argument("--extractor", default=None, choices=EXTRACTORS,
                       help=f"FID feature extractor (default: {STUDIES_EXTRACTOR})")
        if cmd == "run":
            p.add_argument("--time-limit", type=float, default=None,
                           help="seconds from the start of this command; stop cleanly before it")
            p.add_argument("--whole-runs", action="store_true",
                           help="start a training only if it and the run's evaluations are expected to finish "
                                "within the limit (use it on a machine's last command: its weights are lost after)")
            p.add_argument("--no-progress", action="store_true")
    p = sub.add_parser("pack")
    p.add_argument("--scale", default="small", choices=tuple(scales.STUDIES))
    p.add_argument("--out", required=True)
    p = sub.add_parser("unpack")
    p.add_argument("archive")
    args = parser.parse_args(argv)

    if args.command == "unpack":
        unpack(args.archive)
        return 0
    if args.command == "pack":
        pack(args.scale, args.out)
        return 0
    dev = resolve_device(args.device)
    if dev.type == "cpu":
        import torch

        # On a busy CPU OpenMP threads spin-waiting for each other made the sampler ~50x slower (measured in
        # notebook 04); one thread is faster and predictable.
        torch.set_num_threads(1)
    if args.command == "status":
        status(args.scale, args.study, sample_seed=args.sample_seed, device=dev, extractor=args.extractor)
        return 0
    res = run_studies(args.scale, args.study, device=dev, sample_seed=args.sample_seed,
                      time_limit_s=args.time_limit, whole_runs=args.whole_runs, progress=not args.no_progress,
                      t_start=t_start, extractor=args.extractor)
    print("\nitem table:")
    for row in res["items"]:
        print(f"  {row['study']:<9} {row['run']:<22} {row['what']:<34} {row['status']:<26} "
              f"{_fmt_s(row.get('wall s'))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
