"""Notebook 09's work one model at a time: post-train, score on held-out images, evaluate, draw a sample grid.

Each model of the VA-π study is a *unit*: a base generator ("AR", "reAR") or one post-training run (a run of
:func:`rearlib.vapi_report.study_runs` at one VA-π seed). A unit is finished when its records exist:

* the run's ``result.json`` (:func:`rearlib.vapi.finished_run`: history, times, the final weights' fingerprint);
* its held-out reconstruction record (:func:`rearlib.vapi_report.heldout_reconstruction`, one draw per image);
* its FID evaluation records (:meth:`rearlib.experiments.evaluation.Evaluator.evaluate_record`), as
  :func:`rearlib.vapi_report.eval_items` plans them;
* for the models shown side by side, its sample grid.

All are small files under the artifact folder, keyed by what was scored. A post-trained model's key holds the
fingerprint of its final weights, so a study may stop anywhere and continue on another machine from its records
alone: a finished unit loads no weights, and a unit whose weights are gone is trained again and scored under the
new weights' key, never mixed with the records of another realisation (VA-π on a GPU is not bit-reproducible).
Each unit is scored as soon as it is trained, so an interrupted study loses at most the unit in progress.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple

import pandas as pd
import torch

import rearlib.metrics as M
from rearlib import vapi
from rearlib.experiments.evaluation import Evaluator, load_record, provenance, record_path, save_record
from rearlib.runtime import (artifact_dir, artifacts_root, atomic_torch_save, config_hash, load_torch_file)
from rearlib.sample import generate
from rearlib.vapi_config import VAPIConfig
from rearlib.vapi_report import StudyRun, eval_items, heldout_reconstruction, run_key

NUM_CLASSES = 10
GRID_KIND = "vapi_grids"


def cached_table(key: dict, make: Callable[[], pd.DataFrame], device) -> pd.DataFrame:
    """The table stored as the record of ``key``, else ``make()``'s, stored (e.g. the λ_p calibration, whose value
    enters every run's key: read back, it cannot differ in the last digit on another machine)."""
    stored = load_record(key)
    if stored is not None:
        return pd.DataFrame(stored["row"]["rows"])
    table = make()
    rows = table.astype(object).where(table.notna(), None).to_dict("records")
    save_record(key, {"rows": rows}, provenance(torch.device(device)))
    return table


class Unit(NamedTuple):
    """What one model of the study produced: its name ``(name, vapi_seed)`` (seed None for a base model), the
    run record (None for a base model), the held-out row, the evaluation rows, the sample grid (uint8 [k·10, 3, H,
    W] or None) and what this call did: "records" (all read), "scored" (weights loaded, some records made) or
    "trained" (post-trained here, then scored)."""

    model: tuple
    result: dict | None
    heldout: dict
    evals: list[dict]
    grid: torch.Tensor | None
    work: str


@dataclass
class VAPIStudy:
    """The fixed parts of notebook 09's study; :meth:`unit` does the work of one model.

    ``base_models`` / ``base_keys``: the base generators by name and their evaluation model keys; ``runs``: the
    study's runs; ``seeds``: the VA-π seeds (the run of seed s is evaluated at sampling seed s); ``source``: the
    post-training images; ``heldout``: (images, labels, GT tokens) of the held-out check, scored under
    ``heldout_cfg``'s reward with ``heldout_seed``; ``n_per_class``: samples per class of every evaluation;
    ``cfg_by_model``: (g, p) of the "with CFG" evaluations per base model (a post-trained model uses its base
    model's); ``grid_models``: the model names whose grids are drawn (base models, and post-trained models at the
    first VA-π seed), ``grid_per_class`` images per class with ``grid_seed``.
    """

    scale: str
    tokenizer: Any
    evaluator: Evaluator
    base_models: dict[str, torch.nn.Module]
    base_keys: dict[str, dict]
    runs: dict[str, StudyRun]
    seeds: list[int]
    source: Any
    data_size: int
    data_seed: int
    heldout: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    heldout_cfg: VAPIConfig
    heldout_seed: int
    perceptual_fn: Callable | None
    perceptual: str
    n_per_class: int
    cfg_by_model: dict[str, tuple[float, float]]
    grid_models: tuple[str, ...] = ()
    grid_per_class: int = 6
    grid_seed: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    progress: bool = True

    # -- keys ------------------------------------------------------------------------------------------------
    def run_dir(self, run: str, vseed: int) -> Path:
        """The artifact folder of one post-training run (keyed by base recipe, tokenizer, config, steps, data)."""
        return artifact_dir("vapi", self._run_key(run, vseed))

    def _run_key(self, run: str, vseed: int) -> dict:
        spec = self.runs[run]
        return run_key(self.base_keys[spec.base], self.tokenizer.identity(), spec.cfg.replace(seed=vseed),
                       spec.steps, self.data_size, self.data_seed, self.perceptual, self.device.type)

    def model_key(self, model: tuple, result: dict | None = None) -> dict:
        """The evaluation key of a model: a base model's zoo key; a post-trained model's run hash, final step and
        the fingerprint of its final weights (``result``: its run record)."""
        name, vseed = model
        if vseed is None:
            return self.base_keys[name]
        return {"kind": "vapi", "run": config_hash(self._run_key(name, vseed)), "step": int(result["step"]),
                "weights": result["final_fingerprint"]}

    def _heldout_key(self, model_key: dict) -> dict:
        images, _, tokens = self.heldout
        return {"scale": self.scale, "heldout reconstruction": {
                    "n": len(tokens), "data_seed": self.data_seed, "seed": self.heldout_seed,
                    "reward": self.heldout_cfg.to_dict(), "perceptual": self.perceptual},
                "model": model_key, "tokenizer": self.tokenizer.identity()}

    def _grid_key(self, model_key: dict) -> dict:
        return {"scale": self.scale, "model": model_key, "tokenizer": self.tokenizer.identity(),
                "per_class": self.grid_per_class, "seed": self.grid_seed, "cfg": None}

    def _grid_path(self, model_key: dict) -> Path:
        """Where the grid of ``model_key`` is stored (nothing is created)."""
        return artifacts_root() / GRID_KIND / config_hash(self._grid_key(model_key)) / "grid.pt"

    def _wants_grid(self, model: tuple) -> bool:
        name, vseed = model
        return name in self.grid_models and vseed in (None, self.seeds[0])

    def _eval_settings(self, model: tuple) -> list[tuple[Any, dict]]:
        name, vseed = model
        base = name if vseed is None else self.runs[name].base
        out = []
        for it in eval_items([model], self.seeds, self.runs):
            g, p = self.cfg_by_model[base] if it.cfg else (None, 0.0)
            out.append((it, {"n_per_class": self.n_per_class, "cfg_scale": g, "cfg_power": p,
                             "sample_seed": it.sample_seed}))
        return out

    def is_scored(self, model: tuple, model_key: dict) -> bool:
        """Whether every record of ``model`` under ``model_key`` exists (nothing is loaded or made)."""
        return (record_path(self._heldout_key(model_key)).is_file()
                and all(self.evaluator.has(model_key, **s) for _, s in self._eval_settings(model))
                and (not self._wants_grid(model) or self._grid_path(model_key).is_file()))

    # -- work ------------------------------------------------------------------------------------------------
    def post_train(self, run: str, vseed: int) -> dict:
        """:func:`rearlib.vapi.post_train` of ``run`` at VA-π seed ``vseed`` from a copy of its base model
        (resumes from the run folder's checkpoint; a finished run with its checkpoint loads in seconds)."""
        spec = self.runs[run]
        r = vapi.post_train(copy.deepcopy(self.base_models[spec.base]), self.tokenizer, self.source,
                            spec.cfg.replace(seed=vseed), spec.steps, self.run_dir(run, vseed), self.device,
                            perceptual_fn=self.perceptual_fn, scale=self.scale, progress=self.progress)
        if r["status"] != "completed":
            raise RuntimeError(f"{run} (VA-π seed {vseed}) stopped at step {r['step']} of {r['steps']}; "
                               "run it again to resume")
        return r

    def unit(self, model: tuple) -> Unit:
        """The records of ``model`` = ``(name, vapi_seed)``: read where they exist, else made (post-training the
        run first when its records are incomplete and its weights are not at hand)."""
        name, vseed = model
        result, net, trained, scored = None, None, False, None
        if vseed is None:
            net = self.base_models[name]
        else:
            result = vapi.finished_run(self.run_dir(name, vseed))
            scored = result is not None and self.is_scored(model, self.model_key(model, result))
            if not scored:
                # Resumes from the run's checkpoint, or loads it when finished; without one it trains again.
                result = self.post_train(name, vseed)
                net, trained, scored = result.pop("model"), result["steps_this_call"] > 0, None
        key = self.model_key(model, result)
        if scored is None:
            scored = self.is_scored(model, key)
        work = "trained" if trained else "records" if scored else "scored"
        heldout = self._heldout_row(key, net)
        evals = [self._eval_row(model, it, s, key, net) for it, s in self._eval_settings(model)]
        grid = self._grid(key, net) if self._wants_grid(model) else None
        return Unit(model, result, {"model": name, "vapi_seed": vseed, **heldout}, evals, grid, work)

    def _heldout_row(self, model_key: dict, net) -> dict:
        key = self._heldout_key(model_key)
        stored = load_record(key)
        if stored is not None:
            return dict(stored["row"])
        images, labels, tokens = self.heldout
        row = heldout_reconstruction(net, self.tokenizer, images, labels, tokens, self.heldout_cfg,
                                     self.perceptual_fn, self.perceptual, seed=self.heldout_seed)
        row["n images"] = len(tokens)
        return dict(save_record(key, row, provenance(self.device))["row"])

    def _eval_row(self, model: tuple, it, settings: dict, model_key: dict, net) -> dict:
        name, vseed = model
        row = self.evaluator.evaluate(model_key, lambda: net, **settings)
        return {"model": name, "vapi_seed": vseed, "CFG": "CFG" if it.cfg else "no CFG",
                "g": settings["cfg_scale"], "p": settings["cfg_power"] if it.cfg else None,
                "sample_seed": it.sample_seed, **row}

    def _grid(self, model_key: dict, net) -> torch.Tensor:
        path = self._grid_path(model_key)
        if path.is_file():
            return load_torch_file(path, "sample grid")
        labels = torch.arange(NUM_CLASSES).repeat_interleave(self.grid_per_class).to(self.device)
        # fast=False: the plain cached loop; this batch size would otherwise capture extra CUDA graphs.
        toks = generate(net, labels, seed=self.grid_seed, fast=False)
        with torch.no_grad():
            grid = M.to_uint8(self.tokenizer.decode(toks)).cpu()
        atomic_torch_save(grid, artifact_dir(GRID_KIND, self._grid_key(model_key)) / "grid.pt")
        return grid
