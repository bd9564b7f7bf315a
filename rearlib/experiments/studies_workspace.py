"""Where the training studies happen: the evaluations a study needs, and the Workspace that trains and scores them.

A study is a list of :class:`Item` evaluations (a run's weights at a step, (g, p), a sampling seed and the role of
the number), in execution order: :meth:`Workspace.items`. The :class:`Workspace` of a scale holds the tokenizer,
the classifier and the :class:`~rearlib.experiments.evaluation.Evaluator`; it resolves run specifications, trains
or resumes runs through :mod:`rearlib.experiments.zoo`, evaluates items into cached records (loading a model only
when a record is missing, and one model at a time) and estimates the GPU time of missing work from the measured
rates of :data:`rearlib.scales.STUDIES`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from rearlib import scales
from rearlib.experiments import zoo
from rearlib.experiments.evaluation import Evaluator, load_record, record_path, run_model_key, setting_label
from rearlib.experiments.studies_plan import (Resolved, RunSpec, SweepState, best_guidance, plan_extractors,
                                              plan_settings, resolve, settings, study_specs, sweep_state)
from rearlib.metrics import metric_label
from rearlib.metrics.classifier import get_classifier
from rearlib.model import estimate_flops_per_token, get_config
from rearlib.runtime import artifacts_root, resolve_device
from rearlib.sample import clear_sampler_cache
from rearlib.tokenizers import get_tokenizer
from rearlib.train import generator_overrides, snapshot_path

NUM_CLASSES = 10


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
        if self.floor:
            return "real train images (floor)"
        if self.pending:
            return self.pending
        return f"{setting_label(self.cfg_scale, self.cfg_power)} seed {self.sample_seed}"


class Workspace:
    """The tokenizer, classifier, evaluator and run resolution of one scale (and a one-model cache).

    ``sample_seed``: the base sampling seed S (reported numbers use S + 1, selection and noise use S). ``plan``:
    how the ablation studies train their rows (:func:`~rearlib.experiments.studies_plan.plan_settings`).
    """

    def __init__(self, scale: str, device="auto", *, sample_seed: int = 0, progress: bool = True,
                 extractor: str | None = None, plan: str | None = None):
        self.scale = scale
        self.st = settings(scale)
        self.plan = plan_settings(scale, plan)  # recipe, seeds, tied row, FID network, CFG sweep growth
        if isinstance(sample_seed, bool) or not isinstance(sample_seed, int) or sample_seed < 0:
            raise ValueError(f"sample_seed must be an integer >= 0, got {sample_seed!r}")
        self.device = resolve_device(device) if isinstance(device, (str, type(None))) else torch.device(device)
        self.progress = progress
        self.tok = get_tokenizer(scale, self.device, progress=False)
        self.classifier = get_classifier(scale, self.device)
        self.extractor, self.secondary = plan_extractors(scale, self.plan["name"], extractor)
        common = dict(data_seed=scales.GENERATOR_DATA[scale]["seed"], progress=progress, extractor=self.extractor)
        self.evaluator = Evaluator(scale, self.tok, self.classifier, self.device, secondary_extractor=self.secondary,
                                   **common)
        # The recipe study scores with the primary network alone: its learning curve needs one FID, and its
        # snapshots are not kept, so a second network could not be added to its records later.
        self.curve_evaluator = (self.evaluator if self.secondary is None else
                                Evaluator(scale, self.tok, self.classifier, self.device, **common))
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
        return zoo.training_result(self.scale, run.variant, self.tok, run.spec.seed, **run.overrides)

    def load_model(self, run: Resolved, step: int):
        """The run's weights at ``step`` (cached: consecutive evaluations of one model load it once)."""
        if self._model is not None and self._model[:2] == (run.run_hash, step):
            return self._model[2]
        self.release_model()
        model = zoo.load_run(self.scale, run.variant, self.tok, run.spec.seed, step=step, device=self.device,
                             **run.overrides)
        self._model = (run.run_hash, step, model)
        return model

    def release_model(self) -> None:
        if self._model is not None:
            self._model = None
            clear_sampler_cache()  # the fast decoders hold a copy of the weights and their CUDA graphs

    def weights_available(self, run: Resolved, step: int) -> bool:
        folder = artifacts_root() / "generators" / run.run_hash
        if step == run.steps:
            if isinstance(run.variant, str) and not run.overrides:
                if zoo._shipped_for(self.scale, run.variant, run.spec.seed, {}, run.cfg) is not None:
                    return True
            return (folder / "model.pt").is_file() and (folder / "result.json").is_file()
        return snapshot_path(folder, step).is_file()

    def train(self, run: Resolved, time_limit_s: float | None = None, *, deadline: float | None = None,
              reserve_s: float = 0.0) -> dict:
        """Train (or resume) ``run``; it stops with a checkpoint after ``time_limit_s`` seconds of training, or
        ``reserve_s`` before the ``time.monotonic()`` ``deadline`` (counted after the token data is ready)."""
        self.release_model()
        if deadline is not None:
            zoo.get_tokens(self.scale, self.tok, progress=self.progress)  # pretokenizing is not training time
            limit = deadline - time.monotonic() - reserve_s
            time_limit_s = limit if time_limit_s is None else min(time_limit_s, limit)
        if self.device.type == "cuda":
            # Every run compiles as in a fresh process: dynamo's per-function recompile limit and its automatic
            # dynamic shapes (after a size change) would otherwise make later runs of one command slower or
            # eager, and their samples/s incomparable. Inductor's on-disk cache still makes repeats cheap.
            torch._dynamo.reset()
            torch.cuda.empty_cache()
        res = zoo.train_generator(self.scale, run.variant, self.tok, run.spec.seed, device=self.device,
                                  time_limit_s=time_limit_s, progress=self.progress, **run.overrides)
        res.pop("model", None)
        return res

    # -- items -------------------------------------------------------------------------------------------
    def evaluator_for(self, study: str) -> Evaluator:
        """The evaluator of ``study``'s records: the plan's networks, the recipe study's primary network alone."""
        return self.curve_evaluator if study == "recipe" else self.evaluator

    def _eval_item(self, study, run, step, g, p, seed, role) -> Item:
        it = Item(study, run, step, g, p, seed, role)
        it.key = self.evaluator_for(study).key(run_model_key(run.run_hash, step), n_per_class=self.n_per_class,
                                               cfg_scale=g, cfg_power=p, sample_seed=seed)
        return it

    def floor_item(self, study: str) -> Item:
        it = Item(study, None, None, None, None, 0, "floor", floor=True)
        ev = self.evaluator_for(study)
        it.key = ev.floor_key(ev.training_images_subject(), self.n_per_class * NUM_CLASSES)
        return it

    def evaluate(self, item: Item) -> dict:
        """Sample and score ``item`` (loading its weights only if its record is missing); returns the record."""
        ev = self.evaluator_for(item.study)
        if item.floor:  # real training images, as many as one generated set: the finite-sample floor of FID
            return ev.evaluate_training_images(self.n_per_class * NUM_CLASSES)
        return ev.evaluate_record(item.key["model"], lambda: self.load_model(item.run, item.step),
                                  n_per_class=self.n_per_class, cfg_scale=item.cfg_scale, cfg_power=item.cfg_power,
                                  sample_seed=item.sample_seed)

    def is_done(self, item: Item) -> bool:
        return not item.pending and record_path(item.key).is_file()

    def cfg_sweep(self, run: Resolved) -> dict[float, SweepState]:
        """Per schedule power, the state of ``run``'s guidance sweep on the selection seed: the scale grid grows at
        the edge holding the best FID until the best is bracketed (:func:`sweep_state`); g = 1 is the no-CFG
        record of the same sampling seed (guidance at scale 1 is no guidance, for every power)."""
        fid_key = metric_label("fid", self.extractor)

        def fid_of(p):
            def f(g):  # g = 1 has the key of the no-CFG record (evaluation.canonical_cfg)
                rec = load_record(self._eval_item("main", run, run.steps, g, p, self.select_seed, "select").key)
                return None if rec is None else float(rec["row"][fid_key])
            return f

        return {p: sweep_state(self.st["cfg_scales"], fid_of(p), self.plan["cfg_max_added"])
                for p in self.st["cfg_powers"]}

    def best_cfg(self, run: Resolved) -> tuple[float, float] | None:
        """The (g, p) of lowest FID over ``run``'s sweep on the selection seed, or None while the sweep goes on."""
        states = self.cfg_sweep(run)
        if any(s.next_scale is not None for s in states.values()):
            return None
        g, p, _ = best_guidance(states)
        return g, p

    def items(self, study: str) -> list[Item]:
        """The study's evaluations in execution order (run-major, so each model is loaded once)."""
        out: list[Item] = [self.floor_item(study)]
        S, R = self.select_seed, self.report_seed
        specs = study_specs(self.scale, study, self.plan["name"])
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
                            for p, state in self.cfg_sweep(run).items() for g in state.scales if g != 1.0]
                    best[spec.rear] = self.best_cfg(run)
                b = best.get(spec.rear)
                if b is None:
                    out.append(Item(study, run, run.steps, None, None, R, "best",
                                    pending=f"best CFG on seed {R} (after the {spec.rear} sweep)"))
                else:
                    out.append(self._eval_item(study, run, run.steps, b[0], b[1], R, "best"))
            return out
        noise_rows = {"noise": ("rear",), "embedding": ("ar", "rear"), "scaling": ("ar", "rear"),
                      "recipe": ("ar paper-shape", "rear paper-shape")}[study]
        for spec in specs:
            run = self.resolve(spec)
            steps = run.snapshot_steps if study in ("scaling", "recipe") else [run.steps]
            for step in steps:
                out.append(self._eval_item(study, run, step, None, None, R, "report"))
            if spec.name in noise_rows and spec.seed == specs[0].seed:
                out.append(self._eval_item(study, run, run.steps, None, None, S, "noise"))
        return out

    # -- estimates ---------------------------------------------------------------------------------------
    def estimate_train_s(self, run: Resolved) -> float:
        """Seconds to train ``run`` on the reference GPU: samples / (base samples/s x base FLOPs / run FLOPs)."""
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
    """The GeneratorConfig a TrainConfig trains."""
    return get_config(cfg.model, **generator_overrides(cfg))
