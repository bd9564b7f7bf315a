"""Sample sets, distribution metrics and cached evaluation records of class-conditional generators.

One :class:`Evaluator` per (scale, tokenizer, classifier, device) does what notebooks 04, 09 and 10-13 need:

* :meth:`Evaluator.sample_set`: ``n_per_class`` images of each of the 10 classes. Image ``i`` has class
  ``i // n_per_class`` and the seed :func:`rearlib.sample.image_seed` ``(sample_seed, i)`` (as
  ``rearlib.sample.generate_fid_samples`` would make them), temperature 1, no top-k / top-p, CFG on the
  power-cosine schedule. Batches have one fixed shape (the last is padded with repeats of its last image, which
  are dropped), so the GPU sampler captures its CUDA graphs once per model and CFG on/off.
* :meth:`Evaluator.score`: FID / KID / precision / recall through torch-fidelity against held-out real
  images (the ``val`` split, never used in training), with the evaluator's ``extractor``: by default the
  Inception-v3 FID network (:mod:`rearlib.metrics.inception`; keys "FID", "KID", ...; no IS, the network has no
  logits), or by name the in-project classifier (keys "FID[rearlib-classifier]", "IS[rearlib-classifier]", ...,
  a diagnostic). Plus class consistency (the in-project classifier's argmax equals the requested class), a
  secondary column, and with ``secondary_extractor`` the same distribution metrics from a second network,
  labeled with its name (e.g. "FID[rearlib-classifier]" beside the Inception "FID").
* :meth:`Evaluator.evaluate`: sample + score, cached as a small JSON **record** under
  ``artifacts/eval_records/<hash>/record.json``. The hash is of the record *key*: what was evaluated (a
  ``model_key``: for trained runs the *recipe* hash of :func:`rearlib.experiments.zoo.run_hash` and the step, see
  :func:`run_model_key`; never a hash of the weights, so a record made on a GPU machine whose weights are gone
  still completes a notebook elsewhere), the tokenizer and classifier identities, the reference set, the
  number of samples, (g, p), the sampling seed, the temperature, the scale's sampler setting and the scale, and
  the FID extractor's name and identity (records scored with the classifier keep their original key, which has
  only the classifier's identity) and the secondary extractor's name where there is one.
  When the record exists the model is never loaded: ``model`` may be a zero-argument callable that is only
  called on a miss.
* :meth:`Evaluator.evaluate_training_images`: the floors of FID for a generated set of that size: real training
  images, or their tokenizer reconstructions (cached the same way, keyed by the image set).

Besides: :func:`teacher_forced_metrics` (cross-entropy, perplexity and correct-token ratio of a generator given
the true prefix) and :func:`samples_per_class_within` (how many samples per class fit a generation budget).

Records do not depend on the device in their key: bf16 CUDA sampling and fp32 CPU sampling give slightly
different images for the same seeds; the record's ``provenance`` says where it was made.
"""

from __future__ import annotations

import functools
import json
import math
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import rearlib.metrics as M
from rearlib import scales
from rearlib.data import render_batch
from rearlib.metrics.classifier import class_consistency
from rearlib.runtime import (UnreadableFileError, artifact_dir, artifacts_root, atomic_write_text, config_hash,
                             hardware_info, read_json)
from rearlib.sample import generate, image_seeds, last_fast_path_info

__all__ = ["RECORD_KIND", "RECORD_FORMAT", "Evaluator", "setting_label", "canonical_cfg",
           "run_model_key", "record_path", "load_record", "save_record", "provenance", "iter_records",
           "teacher_forced_metrics", "samples_per_class_within"]

RECORD_KIND = "eval_records"
#: The network of IS when the FID extractor has no logits (the Inception FID network holds pool features only).
SECONDARY_IS = "rearlib-classifier"
RECORD_FORMAT = "rearlib.evaluation/1"
NUM_CLASSES = 10


def canonical_cfg(cfg_scale: float | None, cfg_power: float | None) -> tuple[float | None, float | None]:
    """(g, p) as stored in keys: no guidance (g None or 1.0) -> (None, None); else (float g, float p)."""
    if cfg_scale is None or float(cfg_scale) == 1.0:
        return None, None
    if cfg_power is None or not math.isfinite(float(cfg_power)) or float(cfg_power) < 0:
        raise ValueError(f"cfg_power must be a finite number >= 0 with guidance, got {cfg_power!r}")
    return float(cfg_scale), float(cfg_power)


def setting_label(cfg_scale: float | None, cfg_power: float | None = 0.0) -> str:
    """``"no CFG"`` or ``"CFG g=3.0 p=2.0"`` (the labels notebooks 04 and 10 use)."""
    g, p = canonical_cfg(cfg_scale, cfg_power)
    return "no CFG" if g is None else f"CFG g={g} p={p}"


def run_model_key(run_hash: str, step: int) -> dict:
    """The ``model_key`` of a trained run's weights after optimizer step ``step`` (recipe, not weights)."""
    if not isinstance(run_hash, str) or not run_hash:
        raise ValueError(f"run_hash must be a non-empty string, got {run_hash!r}")
    if int(step) < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return {"kind": "run", "run": run_hash, "step": int(step)}


def record_path(key: dict, root=None) -> Path:
    """``artifacts/eval_records/<config_hash(key)>/record.json`` (nothing is created)."""
    return artifacts_root(root) / RECORD_KIND / config_hash(key) / "record.json"


def load_record(key: dict, root=None) -> dict | None:
    """The stored record ``{"format", "key", "row", "provenance"}`` of ``key``, or None."""
    path = record_path(key, root)
    if not path.is_file():
        return None
    try:
        record = read_json(path, "evaluation record")
    except UnreadableFileError as err:  # a cache entry: evaluated again and rewritten
        warnings.warn(f"{err}; evaluating again", stacklevel=2)
        return None
    if record.get("format") != RECORD_FORMAT:
        raise ValueError(f"{path} is not a {RECORD_FORMAT} record")
    return record


def save_record(key: dict, row: dict, provenance: dict, root=None) -> dict:
    """Write a record atomically (its folder also gets ``config.json`` = the key) and return it."""
    folder = artifact_dir(RECORD_KIND, key, root)
    record = {"format": RECORD_FORMAT, "key": key, "row": row, "provenance": provenance}
    atomic_write_text(folder / "record.json", json.dumps(record, indent=2, default=str))
    return record


def iter_records(root=None, scale: str | None = None) -> Iterator[tuple[Path, dict]]:
    """Every stored record (optionally only those of ``scale``), as (path, record)."""
    base = artifacts_root(root) / RECORD_KIND
    if not base.is_dir():
        return
    for path in sorted(base.glob("*/record.json")):
        try:
            record = json.loads(path.read_text())
        except json.JSONDecodeError:
            continue  # a foreign or broken file: not ours to judge here
        if record.get("format") != RECORD_FORMAT:
            continue
        if scale is None or record.get("key", {}).get("scale") == scale:
            yield path, record


def provenance(device: torch.device) -> dict:
    """Where and when a record is made: device, GPU name (on CUDA), torch version, time."""
    hw = hardware_info()
    return {"device": str(device), "gpu": hw.get("gpu") if device.type == "cuda" else None, "torch": hw["torch"],
            "created": time.strftime("%Y-%m-%dT%H:%M:%S")}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@functools.lru_cache(maxsize=1)
def _reference_images(n: int, resolution: int, seed: int, device: str) -> torch.Tensor:
    imgs = render_batch(torch.arange(n), resolution, seed=seed, split="val", device=torch.device(device))[0]
    return M.to_uint8(imgs).cpu()


class Evaluator:
    """Sampling, scoring and cached records for one scale (see the module docstring for every definition).

    Args:
        scale: "smoke" or "small" (the settings of :data:`scales.EVALUATION`; keyword arguments override them).
        tokenizer: decodes sampled tokens; its ``identity()`` is part of every key.
        classifier: the in-project classifier (``rearlib.metrics.classifier.get_classifier``) for class consistency
            (and for FID when ``extractor="rearlib-classifier"``); its ``identity`` is in every key.
        extractor: the feature extractor of FID / KID / precision / recall (:data:`rearlib.metrics.EXTRACTORS`).
        device: where sampling and scoring run.
        data_seed: seed of the embedded dataset (the reference images are ``val`` images 0..n_ref-1 of it).
        progress: tqdm bars while sampling.
        secondary_extractor: a second network whose FID / IS / KID / precision / recall are added to every row,
            labeled with its name (None: only the classifier's IS when the main extractor has no logits).
    """

    def __init__(self, scale: str, tokenizer, classifier, device, *, n_ref: int | None = None,
                 batch: int | None = None, sampler: str | bool | None = "scale", data_seed: int = 0,
                 progress: bool = True, extractor: str | None = None, secondary_extractor: str | None = None):
        if scale not in scales.EVALUATION:
            raise ValueError(f"no evaluation settings for scale {scale!r}; available: {', '.join(scales.EVALUATION)}")
        s = scales.EVALUATION[scale]
        self.scale = scale
        self.tokenizer, self.classifier = tokenizer, classifier
        self.device = torch.device(device) if not isinstance(device, torch.device) else device
        self.n_ref = int(n_ref if n_ref is not None else s["n_ref"])
        self.batch = int(batch if batch is not None else s["batch"])
        self.sampler = s["sampler"] if sampler == "scale" else sampler
        if self.n_ref < 2 or self.batch < 1:
            raise ValueError(f"need n_ref >= 2 and batch >= 1, got n_ref={self.n_ref}, batch={self.batch}")
        self.data_seed = int(data_seed)
        self.progress = progress
        self.resolution = int(tokenizer.resolution)
        self.tokenizer_id = tokenizer.identity()
        self.classifier_id = classifier.identity
        self.extractor = M.check_extractor(extractor or M.DEFAULT_EXTRACTOR)
        self.extractor_id = self._extractor_identity()
        self.secondary = M.check_extractor(secondary_extractor) if secondary_extractor else None
        if self.secondary == self.extractor:
            raise ValueError(f"secondary_extractor {secondary_extractor!r} is the main extractor; name another or None")
        self.reference = {"dataset": "ShapeScenes-10", "split": "val", "n": self.n_ref,
                          "resolution": self.resolution, "seed": self.data_seed}
        self.reference_name = f"embedded-val-r{self.resolution}-n{self.n_ref}-seed{self.data_seed}"
        self._ref_u8: torch.Tensor | None = None

    def _extractor_identity(self) -> str | None:
        if self.extractor == "rearlib-classifier":
            return None  # the classifier's identity is already in every key
        if self.extractor == "inception-v3-fid":
            return M.inception_fid_identity()
        return self.extractor

    def _key_extractor(self) -> dict:
        out = {} if self.extractor_id is None else {"extractor": {"name": self.extractor, "id": self.extractor_id}}
        if self.secondary:  # only then: records made without one keep their keys
            out["secondary_extractor"] = self.secondary
        return out

    # -- reference ---------------------------------------------------------------------------------------
    @property
    def reference_u8(self) -> torch.Tensor:
        """uint8 [n_ref, 3, H, W] held-out real images (rendered on first use, shared by the evaluators of one
        reference: a workspace or notebook that holds several renders it once)."""
        if self._ref_u8 is None:
            self._ref_u8 = _reference_images(self.n_ref, self.resolution, self.data_seed, str(self.device))
        return self._ref_u8

    # -- sampling and scoring ----------------------------------------------------------------------------
    @torch.no_grad()
    def sample_set(self, model, n_per_class: int, cfg_scale: float | None, cfg_power: float | None,
                   sample_seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 images [10 n, 3, H, W] and labels [10 n]: image i has class i // n and seed image_seed(seed, i)."""
        if int(n_per_class) < 1:
            raise ValueError(f"n_per_class must be >= 1, got {n_per_class}")
        g, p = canonical_cfg(cfg_scale, cfg_power)
        total, B = NUM_CLASSES * int(n_per_class), self.batch
        labels = torch.arange(total) // int(n_per_class)
        out = torch.empty(total, 3, self.resolution, self.resolution, dtype=torch.uint8)
        dev = next(model.parameters()).device
        for s in tqdm(range(0, total, B), desc=f"sampling {setting_label(g, p)}", leave=False,
                      disable=not self.progress):
            idx = list(range(s, min(s + B, total)))
            full = idx + [idx[-1]] * (B - len(idx))  # pad: one batch shape (padding rows repeat an image, dropped)
            toks = generate(model, labels[full].to(dev), cfg_scale=g, cfg_power=p if p is not None else 0.0,
                            image_seeds=image_seeds(sample_seed, full), fast=self.sampler)
            out[s:s + len(idx)] = M.to_uint8(self.tokenizer.decode(toks[:len(idx)])).cpu()
        return out, labels

    def score(self, images_u8: torch.Tensor, labels: torch.Tensor) -> dict:
        """Labeled FID / IS / KID / precision / recall against the reference, class consistency, counts."""
        metrics = ("fid", "isc_mean", "kid_mean", "precision", "recall")
        extractors = [e for e in (self.extractor, self.secondary) if e]
        row = {}
        for extractor in extractors:
            dm = M.distribution_metrics(images_u8, self.reference_u8, extractor=extractor,
                                        classifier=self.classifier, device=self.device,
                                        cache_name=self.reference_name,
                                        reference_name=f"ShapeScenes-10 val n={self.n_ref}")
            row.update({dm["labels"][k]: dm[k] for k in metrics if k in dm})
        if not any(M.extractor_has_logits(e) for e in extractors):  # no logits (the FID network): the classifier's IS
            isc = M.distribution_metrics(images_u8, self.reference_u8, extractor=SECONDARY_IS, fid=False, isc=True,
                                         kid=False, prc=False, classifier=self.classifier, device=self.device)
            row[isc["labels"]["isc_mean"]] = isc["isc_mean"]
        row["class consistency"] = class_consistency(images_u8.float() / 255, labels,
                                                     self.classifier)["class_consistency"]
        row.update({"n generated": len(images_u8), "n reference": self.n_ref})
        return row

    # -- records -----------------------------------------------------------------------------------------
    def key(self, model_key: dict, *, n_per_class: int, cfg_scale: float | None = None,
            cfg_power: float | None = 0.0, sample_seed: int = 0) -> dict:
        """The record key of one evaluation (see the module docstring)."""
        if not isinstance(model_key, dict) or not model_key:
            raise ValueError(f"model_key must be a non-empty dict (e.g. run_model_key(...)), got {model_key!r}")
        g, p = canonical_cfg(cfg_scale, cfg_power)
        return {"scale": self.scale, "model": model_key, "tokenizer": self.tokenizer_id,
                "classifier": self.classifier_id, "reference": self.reference, "n_per_class": int(n_per_class),
                "cfg_scale": g, "cfg_power": p, "sample_seed": int(sample_seed), "temperature": 1.0,
                "sampler": self.sampler or "default", **self._key_extractor()}

    def has(self, model_key: dict, **settings) -> bool:
        """Whether the record of this evaluation exists (nothing is loaded or created)."""
        return record_path(self.key(model_key, **settings)).is_file()

    def _provenance(self, t_gen: float | None, n: int) -> dict:
        prov = {**provenance(self.device), "generation s": t_gen, "images/s": (n / t_gen) if t_gen else None}
        if t_gen is not None and self.device.type == "cuda":
            prov["sampler mode"] = last_fast_path_info().get("mode")
        return prov

    def evaluate_record(self, model_key: dict, model: Any, *, n_per_class: int, cfg_scale: float | None = None,
                        cfg_power: float | None = 0.0, sample_seed: int = 0) -> dict:
        """The record of one evaluation: loaded when stored, else sampled, scored and stored.

        ``model``: a Generator, or a zero-argument callable returning one (called only on a miss, so a complete
        set of records never loads a model). The returned dict has ``"cached"`` (bool) besides the stored fields.
        """
        key = self.key(model_key, n_per_class=n_per_class, cfg_scale=cfg_scale, cfg_power=cfg_power,
                       sample_seed=sample_seed)
        stored = load_record(key)
        if stored is not None:
            return {**stored, "cached": True}
        net = model() if callable(model) and not isinstance(model, torch.nn.Module) else model
        if net is None:
            raise ValueError("no model to evaluate (the loader returned None)")
        _sync(self.device)
        t0 = time.perf_counter()
        imgs, labels = self.sample_set(net, n_per_class, key["cfg_scale"], key["cfg_power"], sample_seed)
        _sync(self.device)
        t_gen = time.perf_counter() - t0
        row = {**self.score(imgs, labels), "generation s": t_gen, "images/s": len(imgs) / t_gen}
        return {**save_record(key, row, self._provenance(t_gen, len(imgs))), "cached": False}

    def evaluate(self, model_key: dict, model: Any, *, n_per_class: int, cfg_scale: float | None = None,
                 cfg_power: float | None = 0.0, sample_seed: int = 0) -> dict:
        """:meth:`evaluate_record`'s metrics row only (labeled metrics, counts, generation s, images/s)."""
        return dict(self.evaluate_record(model_key, model, n_per_class=n_per_class, cfg_scale=cfg_scale,
                                         cfg_power=cfg_power, sample_seed=sample_seed)["row"])

    def evaluate_images(self, subject: dict, make_images: Callable[[], tuple[torch.Tensor, torch.Tensor]],
                        n_images: int) -> dict:
        """Score a fixed image set (e.g. real training images: the finite-sample floor of FID), cached.

        ``subject`` names the set (a dict, part of the key); ``make_images()`` returns (uint8 or [0, 1] float
        images [n, 3, H, W], labels [n]) and is only called when the record is missing.
        """
        key = self.floor_key(subject, n_images)
        stored = load_record(key)
        if stored is not None:
            return dict(stored["row"])
        imgs, labels = make_images()
        if imgs.dtype != torch.uint8:
            imgs = M.to_uint8(imgs)
        if len(imgs) != int(n_images) or len(labels) != len(imgs):
            raise ValueError(f"make_images returned {len(imgs)} images and {len(labels)} labels, "
                             f"expected {n_images}")
        row = self.score(imgs.cpu(), labels.cpu())
        return dict(save_record(key, row, self._provenance(None, len(imgs)))["row"])

    def floor_key(self, subject: dict, n_images: int) -> dict:
        """The record key of :meth:`evaluate_images` for ``subject`` and ``n_images``."""
        if not isinstance(subject, dict) or not subject:
            raise ValueError(f"subject must be a non-empty dict naming the image set, got {subject!r}")
        return {"scale": self.scale, "images": subject, "n": int(n_images), "tokenizer": self.tokenizer_id,
                "classifier": self.classifier_id, "reference": self.reference, **self._key_extractor()}

    # -- real training images: the floors of FID ---------------------------------------------------------
    def training_images(self, n_images: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Training images 0..n-1 of the embedded dataset (the evaluator's ``data_seed``) and their labels."""
        with torch.no_grad():
            return render_batch(torch.arange(int(n_images)), self.resolution, seed=self.data_seed, split="train",
                                device=self.device)

    def training_images_subject(self, kind: str = "real") -> dict:
        """The ``subject`` of :meth:`evaluate_images` for training images ("real") or their tokenizer
        reconstructions ("tokenizer reconstruction")."""
        if kind not in ("real", "tokenizer reconstruction"):
            raise ValueError(f"kind must be 'real' or 'tokenizer reconstruction', got {kind!r}")
        return {"kind": kind, "dataset": "ShapeScenes-10", "split": "train", "seed": self.data_seed,
                "resolution": self.resolution}

    def evaluate_training_images(self, n_images: int, kind: str = "real") -> dict:
        """Score ``n_images`` real training images (the finite-sample floor of FID for generated sets of that
        size) or, with ``kind="tokenizer reconstruction"``, their reconstructions by the tokenizer (the best a
        generator of tokens could do); cached like :meth:`evaluate_images`."""
        subject = self.training_images_subject(kind)

        def make():
            images, labels = self.training_images(n_images)
            if kind == "real":
                return images, labels
            with torch.no_grad():
                recon = [self.tokenizer.decode(self.tokenizer.encode(images[i:i + 500]))
                         for i in range(0, len(images), 500)]
            return torch.cat(recon), labels

        return self.evaluate_images(subject, make, n_images)

    def training_tokens(self, n_images: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Training images 0..n-1 encoded by the tokenizer: CPU tokens [n, N] and labels [n]."""
        images, labels = self.training_images(n_images)
        n_tokens = math.prod(self.tokenizer.grid_size)
        with torch.no_grad():
            tokens = torch.cat([self.tokenizer.encode(images[i:i + 500]).reshape(-1, n_tokens).cpu()
                                for i in range(0, len(images), 500)])
        return tokens, labels.cpu()

    @torch.no_grad()
    def time_sampler(self, model, cfg_scale: float | None, cfg_power: float = 0.0, seed: int = 10_000) -> float:
        """images/s of the evaluation sampler (tokens + decode) on one full batch, after one warm-up batch."""
        g, p = canonical_cfg(cfg_scale, cfg_power)
        dev = next(model.parameters()).device
        labels = torch.arange(self.batch, device=dev) % NUM_CLASSES
        kw = dict(cfg_scale=g, cfg_power=p if p is not None else 0.0, seed=seed, fast=self.sampler)
        self.tokenizer.decode(generate(model, labels, **kw))  # warm-up: builds (captures) the sampler
        _sync(self.device)
        t0 = time.perf_counter()
        self.tokenizer.decode(generate(model, labels, **kw))
        _sync(self.device)
        return self.batch / (time.perf_counter() - t0)


@torch.no_grad()
def teacher_forced_metrics(model, tokens: torch.Tensor, labels: torch.Tensor, batch: int = 500) -> dict:
    """Teacher-forced token metrics of ``model`` on ``tokens`` [n, N] with class ``labels`` [n].

    Returns cross-entropy in nats per token ("CE (nats/token)"), its "perplexity" exp(CE), the correct-token ratio
    "CTR" (argmax prediction given the true prefix = the true token), "n sequences", and "ce_by_position" (the mean
    CE at each raster position, a CPU tensor [N]).
    """
    model.eval()
    dev = next(model.parameters()).device
    n_pos = tokens.shape[1]
    ce_sum, hit, n_seq = torch.zeros(n_pos, dtype=torch.float64), torch.zeros(n_pos, dtype=torch.float64), 0
    for s in range(0, len(tokens), batch):
        t, y = tokens[s:s + batch].to(dev), labels[s:s + batch].to(dev)
        logits = model(t, y).logits.float()  # logits[:, i] predicts x_{i+1} from [class, x_1..x_i]
        ce_sum += F.cross_entropy(logits.transpose(1, 2), t, reduction="none").double().sum(0).cpu()
        hit += (logits.argmax(-1) == t).double().sum(0).cpu()
        n_seq += len(t)
    ce_pos = ce_sum / n_seq
    ce = float(ce_pos.mean())
    return {"CE (nats/token)": ce, "perplexity": math.exp(ce), "CTR": float(hit.sum() / (n_seq * n_pos)),
            "n sequences": n_seq, "ce_by_position": ce_pos}


def samples_per_class_within(budget_s: float, target: int, minimum: int, seconds_per_class_sample: float) -> int:
    """Samples per class of one evaluation: ``target`` when the planned evaluations fit ``budget_s`` seconds of
    generation (``seconds_per_class_sample``: their generation time per sample of each class), else as many as
    fit, rounded down to a multiple of 10, and at least ``minimum``."""
    if target * seconds_per_class_sample <= budget_s:
        return int(target)
    return max(int(minimum), int(budget_s / seconds_per_class_sample) // 10 * 10)
