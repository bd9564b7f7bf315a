"""The models every notebook shares, per scale: pretokenized data and trained AR / reAR generators.

    tok = get_tokenizer(scale)                       # rearlib.tokenizer
    data = get_tokens(scale, tok)                    # pretokenized embedded dataset (cached)
    ar = get_generator(scale, "ar", tokenizer=tok)   # plain AR
    rear = get_generator(scale, "rear", tokenizer=tok)

``smoke`` trains tiny generators on the CPU in seconds (cached under ``artifacts/``). ``small`` loads the
generators shipped in ``data/checkpoints/`` (fp16, sharded to stay under 16 MiB per file) and, when one is
missing and a GPU is present, trains it; on a CPU without the shipped file it says how to make it:

    python -m rearlib.zoo train --scale small --variant rear --seed 0 --export

``paper`` has no zoo: load the authors' released checkpoints with ``rearlib.model.load_official_state_dict``.
"""

from __future__ import annotations

import argparse
import functools
import json
from dataclasses import asdict
from pathlib import Path

import torch

from .experiments import artifact_dir, load_sharded, resolve_device, save_sharded, validate_scale

REPO_ROOT = Path(__file__).resolve().parent.parent
CHECKPOINTS = REPO_ROOT / "data" / "checkpoints"

#: Data each scale trains its generators on (the embedded dataset at the tokenizer's resolution).
DATA = {
    "smoke": dict(train_size=512, flip=False, seed=0),
    "small": dict(train_size=100_000, flip=True, seed=0),  # 200k sequences with the horizontal flips
}
#: Training-run overrides per scale on top of rearlib.train.SCALES (kept small enough for one GPU command).
TRAIN = {
    "smoke": dict(steps=30, batch_size=16, warmup_steps=3, ckpt_every=30, log_every=10),
    "small": dict(steps=5000, batch_size=256, warmup_steps=250, ckpt_every=1000, log_every=100),
}


def _check_scale(scale: str) -> None:
    validate_scale(scale)
    if scale == "paper":
        raise ValueError("the paper scale has no model zoo: load the authors' checkpoints with "
                         "rearlib.model.load_official_state_dict(path, 'rear_b') and tokenize ImageNet with "
                         "rearlib.pretokenize")


def get_tokens(scale: str, tokenizer, *, split: str = "train", size: int | None = None, progress: bool = True):
    """The embedded dataset of ``scale`` encoded by ``tokenizer`` (a cached :class:`TokenDataset`)."""
    from .data import render_batch
    from .pretokenize import pretokenize

    _check_scale(scale)
    d = DATA[scale]
    n = size or (d["train_size"] if split == "train" else max(256, d["train_size"] // 10))
    render = functools.partial(render_batch, resolution=tokenizer.resolution, seed=d["seed"], split=split)
    key = f"ShapeScenes-10 split={split} seed={d['seed']} res={tokenizer.resolution}"
    return pretokenize(tokenizer, render, size=n, cache_key=key, flip=d["flip"] and split == "train",
                       batch_size=512 if tokenizer.device.type == "cuda" else 64, progress=progress)


def train_config(scale: str, variant: str, tokenizer, seed: int = 0, **overrides):
    """The TrainConfig of a zoo generator: the scale's recipe, the reAR preset ``variant``, the tokenizer's shapes."""
    from .train import config_for_scale

    _check_scale(scale)
    model_overrides = {"codebook_size": tokenizer.codebook_size, "z_dim": tokenizer.code_dim,
                       "seq_len": tokenizer.num_tokens, "num_classes": 10}
    kw = dict(TRAIN[scale])
    kw.update(overrides)
    return config_for_scale(scale, variant, seed=seed, model_overrides=model_overrides, **kw)


def run_dir(scale: str, variant: str, tokenizer, seed: int = 0, **overrides) -> Path:
    cfg = train_config(scale, variant, tokenizer, seed, **overrides)
    return artifact_dir("generators", {"train": cfg.to_dict(), "tokenizer": tokenizer.identity(),
                                       "data": DATA[scale]})


def train_generator(scale: str, variant: str, tokenizer, seed: int = 0, *, device="auto",
                    time_limit_s: float | None = None, progress: bool = True, **overrides) -> dict:
    """Train (or resume, or return the finished result of) a zoo generator in its artifact folder."""
    from .train import train

    cfg = train_config(scale, variant, tokenizer, seed, **overrides)
    data = get_tokens(scale, tokenizer, progress=progress)
    tokens, labels = data.tensors()
    tokens = tokens.reshape(-1, tokens.shape[-1]) if tokens.ndim == 3 else tokens
    out = run_dir(scale, variant, tokenizer, seed, **overrides)
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
        r = json.loads(result.read_text())
        state["result"] = json.dumps({k: r.get(k) for k in ("status", "step", "steps", "train_time_s",
                                                             "samples_per_s", "final", "gpu", "params")})
    return save_sharded(state, out)


def load_shipped(path: str | Path, device="cpu"):
    """A generator from :func:`export_generator`'s files, in float32 and eval mode (strict name/shape check)."""
    from .model import GeneratorConfig, build_generator

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


def get_generator(scale: str, variant: str = "rear", *, tokenizer, seed: int = 0, device="cpu",
                  progress: bool = True):
    """The ``variant`` ("ar", "rear", or any rearlib.rear preset) generator of ``scale``, in eval mode."""
    _check_scale(scale)
    dev = resolve_device(device) if isinstance(device, str) else device
    if scale == "small":
        path = shipped_path(scale, variant, seed)
        if path.is_file():
            return load_shipped(path, dev)
        if dev.type != "cuda":
            raise FileNotFoundError(
                f"{path} is not shipped. Train it on a GPU: python -m rearlib.zoo train --scale small "
                f"--variant {variant} --seed {seed} --export")
    from .train import load_generator

    # A finished run is loaded directly: building the trainer would import torch._dynamo (seconds) for nothing.
    done = run_dir(scale, variant, tokenizer, seed)
    if (done / "model.pt").is_file() and (done / "result.json").is_file():
        record = json.loads((done / "result.json").read_text())
        if record.get("status") == "completed":
            model = load_generator(done / "model.pt", dev)
            model.zoo_info = {"path": str(done / "model.pt"), "step": record.get("step"), "result": record}
            return model
    result = train_generator(scale, variant, tokenizer, seed, device=dev, progress=progress)
    if result["status"] != "completed":
        raise RuntimeError(f"training of {variant!r} stopped at step {result['step']} of {result['steps']}; "
                           f"call again to resume")
    model = load_generator(result["model_path"], dev)
    model.zoo_info = {"path": str(result["model_path"]), "step": result.get("step"),
                      "result": {k: v for k, v in result.items() if k != "model"}}
    return model


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rearlib.zoo", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train (or resume) a zoo generator; --export ships it to data/checkpoints")
    t.add_argument("--scale", default="small", choices=("smoke", "small"))
    t.add_argument("--variant", default="rear")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="auto")
    t.add_argument("--time-limit", type=float, default=None, help="seconds; stop with a checkpoint, resume later")
    t.add_argument("--export", nargs="?", const="", default=None,
                   help="write fp16 shards (default path data/checkpoints/generator_<scale>_<variant>_seed<seed>.pt)")
    t.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    from .tokenizer import get_tokenizer

    dev = resolve_device(args.device)
    tok = get_tokenizer(args.scale, dev, progress=not args.no_progress)
    result = train_generator(args.scale, args.variant, tok, args.seed, device=dev, time_limit_s=args.time_limit,
                             progress=not args.no_progress)
    summary = {k: result.get(k) for k in ("status", "step", "steps", "train_time_s", "samples_per_s", "final",
                                          "gpu", "params")}
    print(json.dumps(summary, indent=2, default=str))
    if args.export is not None and result["status"] == "completed":
        out = Path(args.export) if args.export else shipped_path(args.scale, args.variant, args.seed)
        for p in export_generator(result["model_path"], out):
            print(f"wrote {p} ({p.stat().st_size / 2**20:.2f} MiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
