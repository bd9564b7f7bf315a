"""The models every notebook shares, per scale: pretokenized data and trained AR / reAR generators.

    tok = get_tokenizer(scale)                       # rearlib.tokenizers
    data = get_tokens(scale, tok)                    # pretokenized embedded dataset (cached)
    ar = get_generator(scale, "ar", tokenizer=tok)   # plain AR
    rear = get_generator(scale, "rear", tokenizer=tok)

``smoke`` trains tiny generators on the CPU in seconds (cached under ``artifacts/``). ``small`` loads the
generators shipped in ``data/checkpoints/`` (fp16, sharded to stay under 16 MiB per file) and, when one is
missing and a GPU is present, trains it; on a CPU without the shipped file it says how to make it:

    python -m rearlib zoo train --scale small --variant ar,rear --seed 0 --export

``paper`` has no zoo: load the authors' released checkpoints with ``rearlib.model.load_official_state_dict``.

Every run is named by its *recipe* (:func:`run_key`: the full TrainConfig, the tokenizer identity and the data),
so a study can ask for any reAR preset (or a :class:`~rearlib.rear.ReARConfig`), model-size overrides
(``model_overrides={"hidden": 384, "depth": 12, "heads": 6}``) and TrainConfig overrides (``steps=2000``,
``snapshot_every=500``); :func:`training_result` and :func:`load_run` read a finished run back, and
:func:`rearlib.experiments.studies` keys its evaluation records by the same recipe hash (:func:`run_hash`).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

import torch

from rearlib import cli_types, scales
from rearlib.data import render_batch
from rearlib.model import GeneratorConfig, build_generator
from rearlib.rear import PRESETS
from rearlib.runtime import (REPO_ROOT, artifact_dir, artifacts_root, completed_record, config_hash, file_lock,
                             load_sharded, read_json, resolve_device, save_sharded)
from rearlib.scales import validate_scale
from rearlib.tokenizers import get_tokenizer
from rearlib.tokenizers.pretokenize import pretokenize
from rearlib.train import config_for_scale, load_generator, snapshot_path, train
from rearlib.train_checkpoints import resume_key

CHECKPOINTS = REPO_ROOT / "data" / "checkpoints"
#: The fields of a training result that a shipped generator keeps and `zoo train` prints.
RESULT_SUMMARY = ("status", "step", "steps", "train_time_s", "samples_per_s", "final", "gpu", "params")


def _check_scale(scale: str) -> None:
    validate_scale(scale)
    if scale == "paper":
        raise ValueError("the paper scale has no model zoo: load the authors' checkpoints with "
                         "rearlib.model.load_official_state_dict(path, 'rear_b') and tokenize ImageNet with "
                         "rearlib.tokenizers.pretokenize")


def get_tokens(scale: str, tokenizer, *, split: str = "train", size: int | None = None, progress: bool = True):
    """The embedded dataset of ``scale`` encoded by ``tokenizer`` (a cached :class:`TokenDataset`)."""
    _check_scale(scale)
    d = scales.GENERATOR_DATA[scale]
    n = size or (d["train_size"] if split == "train" else max(256, d["train_size"] // 10))
    render = functools.partial(render_batch, resolution=tokenizer.resolution, seed=d["seed"], split=split)
    key = f"ShapeScenes-10 split={split} seed={d['seed']} res={tokenizer.resolution}"
    return pretokenize(tokenizer, render, size=n, cache_key=key, flip=d["flip"] and split == "train",
                       batch_size=512 if tokenizer.device.type == "cuda" else 64, progress=progress)


def train_config(scale: str, variant, tokenizer, seed: int = 0, **overrides):
    """The TrainConfig of a zoo generator: the scale's recipe, the reAR preset ``variant``, the tokenizer's shapes.

    ``variant``: a :data:`rearlib.rear.PRESETS` name or a :class:`~rearlib.rear.ReARConfig`. ``overrides``:
    TrainConfig fields on top of :data:`rearlib.scales.GENERATOR_TRAINING` ``[scale]``; ``model_overrides`` (GeneratorConfig fields, e.g. a
    model size) is merged with the shapes the tokenizer and dataset fix (codebook size, code dimension, tokens
    per image, 10 classes), which it may not contradict.
    """
    _check_scale(scale)
    shapes = {"codebook_size": tokenizer.codebook_size, "z_dim": tokenizer.code_dim,
              "seq_len": tokenizer.num_tokens, "num_classes": 10}
    model_overrides = dict(overrides.pop("model_overrides", None) or {})
    clash = sorted(k for k in shapes if k in model_overrides and model_overrides[k] != shapes[k])
    if clash:
        raise ValueError(f"model_overrides {clash} contradict the tokenizer / dataset shapes "
                         f"{ {k: shapes[k] for k in clash} }")
    model_overrides.update(shapes)
    return config_for_scale(scale, variant, seed=seed, model_overrides=model_overrides, **overrides)


def recipe_key(scale: str, cfg, tokenizer_identity: str) -> dict:
    """The identity of a run: its full TrainConfig, the tokenizer identity and the training data of ``scale``."""
    return {"train": cfg.to_dict(), "tokenizer": tokenizer_identity, "data": scales.GENERATOR_DATA[scale]}


def run_key(scale: str, variant, tokenizer, seed: int = 0, **overrides) -> dict:
    """:func:`recipe_key` of the zoo run (``variant``, ``seed``, ``overrides``) on ``tokenizer``."""
    return recipe_key(scale, train_config(scale, variant, tokenizer, seed, **overrides), tokenizer.identity())


def run_hash(scale: str, variant, tokenizer, seed: int = 0, **overrides) -> str:
    """Short hash of :func:`run_key`: the name of the run's folder ``artifacts/generators/<hash>/``."""
    return config_hash(run_key(scale, variant, tokenizer, seed, **overrides))


def run_dir(scale: str, variant, tokenizer, seed: int = 0, **overrides) -> Path:
    return artifact_dir("generators", run_key(scale, variant, tokenizer, seed, **overrides))


def train_generator(scale: str, variant, tokenizer, seed: int = 0, *, device="auto",
                    time_limit_s: float | None = None, progress: bool = True, **overrides) -> dict:
    """Train (or resume, or return the finished result of) a zoo generator in its artifact folder."""
    cfg = train_config(scale, variant, tokenizer, seed, **dict(overrides))
    data = get_tokens(scale, tokenizer, progress=progress)
    tokens, labels = data.tensors()
    tokens = tokens.reshape(-1, tokens.shape[-1]) if tokens.ndim == 3 else tokens
    out = run_dir(scale, variant, tokenizer, seed, **overrides)
    # Two processes asking for one run (two notebooks, two `studies run`) take turns: the second waits, then
    # finds the run finished (or resumes where the first stopped) instead of training it a second time.
    with file_lock(out.parent / f".{out.name}.lock"):
        return train(cfg, tokens, labels, tokenizer.codebook.detach().float().cpu(), out, device=device,
                     time_limit_s=time_limit_s, progress=progress)


def shipped_path(scale: str, variant: str, seed: int = 0) -> Path:
    return CHECKPOINTS / f"generator_{scale}_{variant}_seed{seed}.pt"


def export_generator(model_file: str | Path, out: str | Path) -> list[Path]:
    """Write a trained ``model.pt`` as fp16 shards (configs and the training result kept as metadata)."""
    ckpt = torch.load(model_file, map_location="cpu", weights_only=True)
    state = {f"model.{k}": (v.half() if v.is_floating_point() else v) for k, v in ckpt["model"].items()}
    state.update(format="rearlib.zoo/1", model_config=ckpt["model_config"], train_config=ckpt["train_config"],
                 step=ckpt["step"])
    result = Path(model_file).with_name("result.json")
    if result.is_file():
        r = read_json(result, "training result")
        state["result"] = json.dumps({k: r.get(k) for k in RESULT_SUMMARY})
    return save_sharded(state, out)


def load_shipped(path: str | Path, device="cpu"):
    """A generator from :func:`export_generator`'s files, in float32 and eval mode (strict name/shape check)."""
    state = load_sharded(path)
    if state.get("format") != "rearlib.zoo/1":
        raise ValueError(f"{path} is not a rearlib zoo generator")
    model = build_generator(GeneratorConfig(**state["model_config"]))
    sd = {k[len("model."):]: v.float() if v.is_floating_point() else v for k, v in state.items()
          if k.startswith("model.")}
    own = model.state_dict()
    bad = sorted(set(own) ^ set(sd)) + sorted(k for k in own if k in sd and own[k].shape != sd[k].shape)
    if bad:
        raise ValueError(f"{path} does not match its own model config; offending entries: {bad}")
    model.load_state_dict(sd, strict=True)
    model.zoo_info = {"path": str(path), "step": state.get("step"),
                      "result": json.loads(state["result"]) if "result" in state else None}
    return model.to(resolve_device(device) if isinstance(device, str) else device).eval()


def _shipped_for(scale: str, variant, seed: int, overrides: dict, cfg) -> Path | None:
    """The shipped checkpoint that *is* this recipe's run, or None.

    Only plain zoo runs (a preset name, no overrides) at ``small`` are shipped; the file's training config must
    equal the recipe up to fields that change no numbers (logging / checkpoint / snapshot intervals), so a stale
    shipped file is never mistaken for a changed recipe.
    """
    if scale != "small" or not isinstance(variant, str) or overrides:
        return None
    path = shipped_path(scale, variant, seed)
    if not path.is_file():
        return None
    meta = _shipped_meta(path)
    if resume_key(meta.get("train_config", {})) != resume_key(cfg.to_dict()):
        raise ValueError(f"{path} was trained with another recipe than rearlib.experiments.zoo's current {scale!r} recipe for "
                         f"{variant!r} seed {seed}; re-export it or restore the recipe")
    return path


def _shipped_meta(path: Path) -> dict:
    """The metadata of a shipped generator without reading its weight shards."""
    index = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(index, dict) or index.get("format") != "rearlib.sharded/1":
        raise ValueError(f"{path} is not a sharded rearlib checkpoint")
    return dict(index["meta"])


def _finished_record(path: Path) -> dict | None:
    """The run's ``result.json`` if it records a completed run; None if absent, unfinished or damaged (a damaged
    one is rewritten from the run's checkpoint the next time the run is trained or resumed)."""
    return completed_record(path, "training result", stacklevel=4)


def training_result(scale: str, variant, tokenizer, seed: int = 0, **overrides) -> dict | None:
    """The finished training record of a run without loading any weights, or None if it has not finished.

    From the run folder's ``result.json`` (status "completed"; also present after
    ``python -m rearlib studies unpack`` brought it from another machine), else from a matching shipped
    checkpoint's metadata (step, train_time_s, samples_per_s, gpu, params, final). ``"source"`` says which.
    """
    _check_scale(scale)
    cfg = train_config(scale, variant, tokenizer, seed, **dict(overrides))
    path = artifacts_root() / "generators" / config_hash(recipe_key(scale, cfg, tokenizer.identity())) / "result.json"
    record = _finished_record(path)
    if record is not None:
        return {**record, "source": str(path)}
    shipped = _shipped_for(scale, variant, seed, overrides, cfg)
    if shipped is not None:
        meta = _shipped_meta(shipped)
        if "result" in meta:
            return {**json.loads(meta["result"]), "source": str(shipped)}
    return None


def load_run(scale: str, variant, tokenizer, seed: int = 0, *, step: int | None = None, device="cpu",
             **overrides):
    """The weights of a finished run (``step=None`` or the last step) or of its snapshot ``model_step{step}.pt``.

    Raises FileNotFoundError when those weights are not on this machine (e.g. only records were unpacked).
    """
    _check_scale(scale)
    dev = resolve_device(device) if isinstance(device, str) else device
    cfg = train_config(scale, variant, tokenizer, seed, **dict(overrides))
    folder = artifacts_root() / "generators" / config_hash(recipe_key(scale, cfg, tokenizer.identity()))
    if step is None or step == cfg.steps:
        shipped = _shipped_for(scale, variant, seed, overrides, cfg)
        if shipped is not None:
            return load_shipped(shipped, dev)
        path = folder / "model.pt"
    else:
        path = snapshot_path(folder, step)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: the run has not been trained on this machine (or its "
                                f"weights were not kept)")
    model = load_generator(path, dev)
    model.zoo_info = {"path": str(path), "step": step or cfg.steps,
                      "result": training_result(scale, variant, tokenizer, seed, **overrides)}
    return model


def get_generator(scale: str, variant="rear", *, tokenizer, seed: int = 0, device="cpu", progress: bool = True,
                  **overrides):
    """The ``variant`` ("ar", "rear", any rearlib.rear preset or a ReARConfig) generator of ``scale``, in eval mode.

    Loads the shipped checkpoint (``small``, plain presets) or the finished run; otherwise trains it (``small``
    only on a GPU). ``overrides`` as in :func:`train_config`.
    """
    _check_scale(scale)
    dev = resolve_device(device) if isinstance(device, str) else device
    cfg = train_config(scale, variant, tokenizer, seed, **dict(overrides))
    shipped = _shipped_for(scale, variant, seed, overrides, cfg)
    if shipped is not None:
        return load_shipped(shipped, dev)
    # A finished run is loaded directly: building the trainer would import torch._dynamo (seconds) for nothing.
    done = run_dir(scale, variant, tokenizer, seed, **overrides)
    record = _finished_record(done / "result.json")
    if record is not None and (done / "model.pt").is_file():
        model = load_generator(done / "model.pt", dev)
        model.zoo_info = {"path": str(done / "model.pt"), "step": record.get("step"), "result": record}
        return model
    if scale == "small" and dev.type != "cuda":
        what = variant if isinstance(variant, str) else "a custom ReARConfig"
        raise FileNotFoundError(
            f"the small {what} generator (seed {seed}, overrides {overrides}) is not shipped and not trained "
            f"here. Train it on a GPU: python -m rearlib zoo train --scale small --variant {what} --seed {seed} "
            f"--export (plain presets) or python -m rearlib studies run --scale small")
    result = train_generator(scale, variant, tokenizer, seed, device=dev, progress=progress, **overrides)
    if result["status"] != "completed":
        raise RuntimeError(f"training of {variant!r} stopped at step {result['step']} of {result['steps']}; "
                           f"call again to resume")
    model = load_generator(result["model_path"], dev)
    model.zoo_info = {"path": str(result["model_path"]), "step": result.get("step"),
                      "result": {k: v for k, v in result.items() if k != "model"}}
    return model


def _export_target(export: str, scale: str, variant: str, seed: int, n_variants: int) -> Path:
    """Where ``--export`` writes a variant: the shipped path by default, a file ``*.pt`` (one variant), or a folder."""
    if not export:
        return shipped_path(scale, variant, seed)
    out = Path(export)
    if out.suffix == ".pt":
        if n_variants > 1:
            raise SystemExit(f"--export {export}: one file cannot hold {n_variants} variants; name a folder")
        return out
    return out / shipped_path(scale, variant, seed).name


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rearlib zoo", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train (or resume) zoo generators; --export ships them to data/checkpoints")
    t.add_argument("--scale", default="small", choices=("smoke", "small"), help="the zoo exists at smoke and small only")
    t.add_argument("--variant", default="rear",
                   help="reAR presets of rearlib.rear.PRESETS, comma-separated and trained one after the other "
                        "(each alone on the device, so its samples/s is its own), e.g. ar,rear: the shipped pair")
    t.add_argument("--seed", type=int, default=0, help="training seed (seed 0 is the shipped generator)")
    t.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    t.add_argument("--time-limit", type=cli_types.positive_seconds, default=None,
                   help="seconds for the whole command: a run still training then stops with a checkpoint and the "
                        "variants not started wait; call again to resume (the exit status is 3 until all finished)")
    t.add_argument("--export", nargs="?", const="", default=None,
                   help="write each finished generator as fp16 shards: by default to "
                        "data/checkpoints/generator_<scale>_<variant>_seed<seed>.pt, else into the folder given or, "
                        "for one variant, to the *.pt file given")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    variants = [v.strip() for v in args.variant.split(",") if v.strip()]
    unknown = [v for v in variants if v not in PRESETS]
    if not variants:
        raise SystemExit(f"--variant {args.variant!r}: name at least one preset of {sorted(PRESETS)}")
    if unknown:
        raise SystemExit(f"--variant {args.variant!r}: unknown preset(s) {unknown}; choose from {sorted(PRESETS)}")
    targets = {v: _export_target(args.export, args.scale, v, args.seed, len(variants))
               for v in variants} if args.export is not None else {}
    dev = resolve_device(args.device)
    tok = get_tokenizer(args.scale, dev, progress=not args.no_progress)
    t0, unfinished = time.perf_counter(), []
    for variant in variants:
        left = None if args.time_limit is None else args.time_limit - (time.perf_counter() - t0)
        if left is not None and left <= 0:
            print(f"{variant}: not started (--time-limit {args.time_limit:g} s reached); call again to train it")
            unfinished.append(variant)
            continue
        result = train_generator(args.scale, variant, tok, args.seed, device=dev, time_limit_s=left,
                                 progress=not args.no_progress)
        print(json.dumps({"variant": variant, **{k: result.get(k) for k in RESULT_SUMMARY}}, indent=2, default=str))
        if result["status"] != "completed":
            unfinished.append(variant)
        elif variant in targets:
            for p in export_generator(result["model_path"], targets[variant]):
                print(f"wrote {p} ({p.stat().st_size / 2**20:.2f} MiB)")
    if unfinished:  # a script chaining on this command must not take a half-trained run for a finished one
        print(f"not finished: {', '.join(unfinished)} (call again to resume)", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
