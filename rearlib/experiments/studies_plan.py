"""What the training studies of notebooks 10-13 train: the paper's numbers, run specifications and their recipes.

A :class:`RunSpec` names one training run of a study (a reAR preset with overrides, a model size, a recipe, a
seed); :func:`resolve` makes it concrete for a scale and tokenizer (the TrainConfig and its recipe hash, which
keys the run's folder and every evaluation record of it). :func:`study_specs` lists the runs of each study;
:func:`embedding_rows` maps the rows of the paper's Tables 4 and 7 onto our model depth with :func:`paper_layer`.
The per-scale plans (recipes, sizes, seeds, CFG sweep, estimates) live in :data:`rearlib.scales.STUDIES`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

from rearlib import scales
from rearlib.experiments.zoo import recipe_key, train_config
from rearlib.model import PRESETS as MODEL_PRESETS
from rearlib.rear import PRESETS as REAR_PRESETS
from rearlib.rear import get_rear_config
from rearlib.runtime import config_hash
from rearlib.scales import validate_scale

STUDIES = ("main", "noise", "embedding", "scaling", "recipe")
RECIPES = ("main", "short_main", "ablation", "paper_shape")

#: FID extractor of the short plan's evaluations (the committed small records; their tables say
#: "FID[rearlib-classifier]"). Each plan names its own (``plan_settings(...)["extractor"]``; the full plan at small:
#: the Inception FID network); ``Workspace(extractor=...)`` and ``run --extractor`` override it.
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
    """The studies' plan of ``scale`` (:data:`rearlib.scales.STUDIES`); the paper scale has none."""
    validate_scale(scale)
    if scale not in scales.STUDIES:
        raise ValueError(f"the studies exist at {', '.join(scales.STUDIES)} only (paper scale: the authors' recipe "
                         f"needs 8 GPUs for days; see rearlib.train's 'paper' settings)")
    return scales.STUDIES[scale]


def plan_settings(scale: str, plan: str | None = None) -> dict:
    """The studies' plan ``plan`` of ``scale`` (None: the scale's default): {"name", "recipe", "main_recipe",
    "seeds", "tied", "extractor", "secondary", "cfg_max_added"} (:data:`rearlib.scales.STUDIES`)."""
    st = settings(scale)
    name = st["plan"] if plan is None else plan
    if name not in st["plans"]:
        raise ValueError(f"unknown plan {plan!r} at scale {scale!r}; plans: {', '.join(st['plans'])}")
    return {"name": name, **st["plans"][name]}


def plan_extractors(scale: str, plan: str | None = None, extractor: str | None = None) -> tuple[str, str | None]:
    """(primary, secondary) feature networks of the plan's evaluations; ``extractor`` overrides the primary, and
    a secondary equal to the primary is dropped (None)."""
    pl = plan_settings(scale, plan)
    primary = extractor or pl["extractor"]
    return primary, (None if pl["secondary"] in (None, primary) else pl["secondary"])


def study_names(study: str) -> list[str]:
    """``study`` as a list of study names ("all" = every study, in order)."""
    if study == "all":
        return list(STUDIES)
    if study not in STUDIES:
        raise ValueError(f"unknown study {study!r}; allowed: {', '.join(STUDIES)} or 'all'")
    return [study]


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
        recipe: "main" (the zoo's recipe), "short_main" (the 5000-step recipe of the short plan's committed main
            comparison), "ablation" (the scale's shorter recipe, with snapshots) or "paper_shape" (the paper's
            proportions: warm-up a quarter of the run, with snapshots for a learning curve; at small the zoo's).
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
        warmup = overrides.get("warmup_steps", scales.GENERATOR_TRAINING[scale]["warmup_steps"])
        overrides["warmup_steps"] = min(warmup, spec.steps)
    if model_ov:
        overrides["model_overrides"] = model_ov
    variant = spec.rear if rear == REAR_PRESETS[spec.rear] else rear
    cfg = train_config(scale, variant, tokenizer, spec.seed, **dict(overrides))
    run_hash = config_hash(recipe_key(scale, cfg, tokenizer.identity()))
    return Resolved(spec=spec, variant=variant, overrides=overrides, cfg=cfg, run_hash=run_hash, depth=depth,
                    hidden=hidden, heads=heads, encode_layer=layers["encode"], decode_layer=layers["decode"],
                    size=size)


# ----------------------------------------------------------------------------------------------------------------
# The paper's layers on our depth, and the runs of each study
# ----------------------------------------------------------------------------------------------------------------
def paper_layer(k: int, default_de: int, depth: int) -> int:
    """Our block for the paper's reAR-S block ``k``: round(k x default_DE / 15), at most the last block.

    Anchors the paper's final DE@15 on our model's own default DE (6 of 8 at small: DE@10 -> 4, DE@13 -> 5,
    DE@14..16 -> 6, DE@17 -> 7, DE@20 -> 7 (the last block; "DE@20" is not a valid 0-based index of a 20-block
    model, docs/paper.md, reAR §6 item 10), EN@5 -> 2).
    """
    return int(min(depth - 1, round(k * default_de / PAPER_FINAL_DE)))


def base_layers(scale: str) -> tuple[int, int, int]:
    """(default EN, default DE, depth) of the scale's base model preset (the zoo's generator preset)."""
    base = MODEL_PRESETS[scales.GENERATOR_TRAINING[scale]["model"]]
    return base.encode_align_layer, base.decode_align_layer, base.depth


def embedding_rows(scale: str, plan: str | None = None) -> list[dict]:
    """Rows of Tables 4 and 7 mapped to our depth: {"name", "spec", "paper": [(table, setting, FID, IS)]}, each
    spec with the plan's recipe and its first seed.

    Several paper rows may map to one of our runs (e.g. DE@14, 15 and 16 are all block 6 of 8). The row "tied"
    trains the plan's tied preset (``tied``: logits through the codebook, rank-limited; ``tied_projected``:
    through a learned projection, see ``ReARConfig.tied_codebook``).
    """
    en0, de0, depth = base_layers(scale)
    st = settings(scale)
    pl = plan_settings(scale, plan)
    rows: dict[str, dict] = {}

    def spec_of(name, preset, ov=None):
        return RunSpec(name, rear=preset, rear_overrides=ov or {}, recipe=pl["recipe"], seed=pl["seeds"][0])

    def add(name, spec, table, setting, fid, isc):
        rows.setdefault(name, {"name": name, "spec": spec, "paper": []})["paper"].append((table, setting, fid, isc))

    for setting, preset, en, de, fid, isc in PAPER_TABLE4:
        if preset in ("ar", "tied"):
            add(preset, spec_of(preset, pl["tied"] if preset == "tied" else preset), "Table 4", setting, fid, isc)
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
        add(name, spec_of(name, preset, ov), "Table 4", setting, fid, isc)
    for setting, de, fid, isc in PAPER_TABLE7:
        ov = {"decode_layer": paper_layer(de, de0, depth)}
        name = _row_name("de_only", ov, de0, en0)
        add(name, spec_of(name, "de_only", ov), "Table 7", setting, fid, isc)
    extra = [w for w in st["align_weights"] if w not in (0.5, 1.5)]
    for w in extra:  # settings may ask for more lambdas than the paper's
        ov = {"align_weight": float(w)}
        name = _row_name("rear", ov, de0, en0)
        rows.setdefault(name, {"name": name, "spec": spec_of(name, "rear", ov), "paper": []})
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


def study_specs(scale: str, study: str, plan: str | None = None) -> list[RunSpec]:
    """The runs of a study, in execution order: seed-major (every row's first seed, then every row's second...),
    so that a study cut short has one seed of each row before it has three of any. The ablation studies (noise,
    embedding, scaling) follow ``plan`` (:func:`plan_settings`), the main study takes the plan's ``main_recipe`` on
    the scale's seeds, and the recipe study has its own runs."""
    st = settings(scale)
    if study == "main":
        recipe = plan_settings(scale, plan)["main_recipe"]
        return [RunSpec(f"{v} seed{s}", rear=v, recipe=recipe, seed=s) for s in st["seeds"] for v in ("ar", "rear")]
    if study == "recipe":
        # The learning curve of the paper-proportioned recipe, AR and reAR: where FID stops improving sets the
        # length of the recipe every other study should use.
        return [RunSpec(f"{v} paper-shape", rear=v, recipe="paper_shape") for v in ("ar", "rear")]
    pl = plan_settings(scale, plan)
    if study == "noise":
        rows = [RunSpec(name, rear=name, recipe=pl["recipe"]) for name in PAPER_TABLE3]
    elif study == "embedding":
        rows = [r["spec"] for r in embedding_rows(scale, plan)]
    elif study == "scaling":
        rows = []
        for size in st["scaling_sizes"]:
            for v in ("ar", "rear"):
                # The base size has the canonical name of the ablation rows: the same run as Tables 3 and 4.
                name = v if size == st["base_size"] else f"{v} {size}"
                rows.append(RunSpec(name, rear=v, size=None if size == st["base_size"] else size,
                                    recipe=pl["recipe"]))
    else:
        raise ValueError(f"unknown study {study!r}; allowed: {', '.join(STUDIES)} or 'all'")
    return [replace(r, seed=s) for s in pl["seeds"] for r in rows]


# ----------------------------------------------------------------------------------------------------------------
# The CFG sweep: a grid of guidance scales that grows until it brackets the optimum
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SweepState:
    """Where a guidance sweep at one schedule power stands.

    scales: the guidance scales of the sweep so far, ascending (1.0 = no guidance, scored by the no-CFG record).
    next_scale: the scale to evaluate next (a missing grid point or an extension), or None when the sweep is over.
    best: the scale with the lowest FID (None while a grid point is missing); best_fid: its FID.
    bracketed: the best scale has a worse neighbour on both sides (or is g = 1, below which guidance inverts).
    """

    scales: tuple[float, ...]
    next_scale: float | None
    best: float | None
    bracketed: bool
    best_fid: float | None = None


def best_guidance(states: dict[float, SweepState]) -> tuple[float, float, float]:
    """(g, p, FID) of the lowest best FID over the finished sweeps ``states`` ({power: state}); p = 0 when g = 1
    (no guidance has no power). On a tie the first power's best stays."""
    best = None
    for p, state in states.items():
        if best is None or state.best_fid < best[2]:
            best = (state.best, 0.0 if state.best == 1.0 else p, state.best_fid)
    return best


def sweep_state(base: Sequence[float], fid_of: Callable[[float], float | None], max_added: int) -> SweepState:
    """The state of a guidance sweep that starts at the scales ``base`` and extends at the edge holding the best
    FID by one grid step (down to g = 1 at most, up without bound), at most ``max_added`` times.

    ``fid_of(g)``: the FID at scale ``g`` on the selection seed, None while it is not evaluated. Scales are kept
    in ascending order; an extension below the lowest scale s0 is max(1, s0 - (s1 - s0)), above the highest
    s_n it is s_n + (s_n - s_(n-1)) (one step of the base grid's spacing at that edge).
    """
    scales_ = sorted({float(g) for g in base})
    if not scales_ or scales_[0] < 1.0:
        raise ValueError(f"guidance scales must be >= 1 (1 = no guidance), got {list(base)}")
    added, fids = 0, {}
    while True:
        for g in scales_:
            if fids.get(g) is None:  # each record is read once
                fids[g] = fid_of(g)
        missing = [g for g in scales_ if fids[g] is None]
        if missing:
            return SweepState(tuple(scales_), missing[0], None, False)
        best = min(scales_, key=lambda g: fids[g])
        i = scales_.index(best)
        at_low, at_high = i == 0 and best > 1.0, i == len(scales_) - 1
        if not (at_low or at_high) or added >= max_added:
            return SweepState(tuple(scales_), None, best, not (at_low or at_high), fids[best])
        if at_low:
            step = scales_[1] - scales_[0] if len(scales_) > 1 else 1.0
            new = max(1.0, round(best - step, 6))
        else:
            step = scales_[-1] - scales_[-2] if len(scales_) > 1 else 1.0
            new = round(best + step, 6)
        scales_ = sorted(scales_ + [new])
        added += 1
