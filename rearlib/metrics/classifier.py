"""The in-project feature extractor: a small CNN classifier of the embedded dataset (ShapeScenes-10).

Why it exists. FID/IS/KID/precision-recall need a feature network, and LPIPS needs ImageNet backbones that
torchvision downloads. Offline machines (CI, many GPU boxes) have neither. This classifier is trained in-project
on the embedded dataset (10 classes), so it is always available and it knows the domain the small-scale
experiments work in. It serves three purposes:

* a torch-fidelity feature extractor, registered as ``"rearlib-classifier"``: feature ``"pool"`` (global average
  of the last stage, the analogue of Inception's pool3) for FID/KID/PR and ``"logits"`` for IS;
* the backbone of the DFD perceptual distance in :mod:`rearlib.metrics.perceptual` (multi-layer activations);
* a class-consistency score for conditional samples (:func:`class_consistency`).

Every number computed with it must be labeled with its name (and its identity hash), never as "Inception" or
"LPIPS". It is only meaningful on the embedded dataset; ImageNet-scale evaluation uses Inception.

Architecture: a 3x3 stem at full resolution, then residual stages that each halve the resolution, global
average pooling and a linear head. Inputs of any size are resized (bilinear, antialiased) to the classifier's
own resolution, so any image size goes through the same network. It is trained at the resolution the scale's
tokenizer and generator use (32 px at smoke, 64 px at small); ``train_resolutions`` can mix in renders at other
resolutions (resized) when robustness to resolution is wanted, at the price of some invariance to blur, which
would make FID less sensitive to it, so the shipped recipes do not. Training images are quantised to uint8
first, exactly as torch-fidelity will feed them at evaluation time.

CLI (GPU box, ~1-2 min on one H200):
    python -m rearlib classifier train --scale small --out data/checkpoints/classifier_small.pt
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from rearlib import scales
from rearlib.data import NUM_CLASSES, render_batch
from rearlib.runtime import (REPO_ROOT, artifact_dir, atomic_torch_save, atomic_write_text, hardware_info,
                             load_torch_file, resolve_device)
from rearlib.scales import validate_scale

#: Name under which the classifier is registered with torch-fidelity; every table uses it.
EXTRACTOR_NAME = "rearlib-classifier"
CHECKPOINT_FORMAT = "rearlib-classifier/1"


# Fixed input normalisation (no dataset statistics needed; the renders are roughly centred at 0.4).
_MEAN, _STD = 0.45, 0.25


# ----------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------
class _Block(nn.Module):
    """Residual block: conv3x3(stride) - BN - ReLU - conv3x3 - BN, plus a 1x1 projection when shapes change."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.skip = None
        if stride != 1 or cin != cout:
            self.skip = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        return F.relu(h + (x if self.skip is None else self.skip(x)))


class Classifier(nn.Module):
    """Small ResNet-style classifier of [0,1] images.

    ``layer_features(x)`` returns the stem output and every stage output (post-ReLU), used by DFD;
    ``pool_and_logits(x)`` returns the global-average-pooled last stage ``[B, widths[-1]]`` and the logits.
    Attributes set by :func:`load_classifier`: ``identity`` (hash of weights + config), ``config``,
    ``checkpoint_path`` and ``metrics`` (validation accuracy etc.).
    """

    def __init__(self, widths=(32, 64, 128, 256), num_classes: int = 10, resolution: int = 64, stem_stride: int = 1):
        super().__init__()
        widths = tuple(int(w) for w in widths)
        if len(widths) < 1 or min(widths) < 1:
            raise ValueError(f"widths must be a non-empty tuple of positive ints, got {widths}")
        self.resolution = int(resolution)
        self.widths = widths
        self.num_classes = int(num_classes)
        self.stem_stride = int(stem_stride)
        # A strided stem (smoke) quarters the cost: CPU-only CI trains this in seconds.
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, self.stem_stride, 1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU())
        stages, cin = [], widths[0]
        for w in widths:
            stages.append(_Block(cin, w, stride=2))
            cin = w
        self.stages = nn.ModuleList(stages)
        self.head = nn.Linear(widths[-1], num_classes)
        self.identity = "untrained"
        self.config: dict = {"widths": list(widths), "num_classes": self.num_classes, "resolution": self.resolution,
                             "stem_stride": self.stem_stride}
        self.checkpoint_path: Path | None = None
        self.metrics: dict = {}

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """[B,3,H,W] float in [0,1] (any H, W) -> normalised input at the classifier's resolution."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected images [B, 3, H, W], got shape {tuple(x.shape)}")
        if x.dtype == torch.uint8:
            raise ValueError("expected float images in [0, 1]; convert uint8 with x.float() / 255")
        x = x.float()
        if x.shape[-2:] != (self.resolution, self.resolution):
            antialias = x.shape[-1] > self.resolution  # antialias only matters (and only helps) when shrinking
            x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bilinear", align_corners=False,
                              antialias=antialias)
        return (x - _MEAN) / _STD

    def layer_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Activations after the stem and after every stage (each post-ReLU), for x float in [0,1]."""
        h = self.stem(self.prepare(x))
        feats = [h]
        for stage in self.stages:
            h = stage(h)
            feats.append(h)
        return feats

    def pool_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.layer_features(x)[-1]
        pool = h.mean(dim=(2, 3))
        return pool, self.head(pool)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool_and_logits(x)[1]


def state_identity(state_dict: dict, config: dict) -> str:
    """Stable hash of weights (raw bytes, in name order) and config: names caches and labels results."""
    h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.hexdigest()[:12]


def build_classifier(cfg: dict) -> Classifier:
    return Classifier(cfg["widths"], cfg.get("num_classes", NUM_CLASSES), cfg["resolution"], cfg.get("stem_stride", 1))


def save_classifier(model: Classifier, path, metrics: dict | None = None) -> Path:
    """Write a checkpoint atomically: {format, config, state_dict, identity, metrics}."""
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    config = dict(model.config)
    config.update({"widths": list(model.widths), "num_classes": model.num_classes, "resolution": model.resolution,
                   "stem_stride": model.stem_stride})
    identity = state_identity(state, config)
    payload = {"format": CHECKPOINT_FORMAT, "config": config, "state_dict": state, "identity": identity,
               "metrics": dict(metrics or model.metrics)}
    path = Path(path)
    atomic_torch_save(payload, path)
    model.identity, model.checkpoint_path = identity, path
    return path


def load_classifier(path, device="cpu") -> Classifier:
    """Load a checkpoint written by :func:`save_classifier`; names and shapes are checked strictly."""
    path = Path(path)
    payload = load_torch_file(path, "classifier checkpoint",
                              "Delete it and train it again: python -m rearlib classifier train --scale SCALE "
                              "[--out PATH] (a deleted smoke classifier is retrained when next needed).")
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a rearlib classifier checkpoint (expected format {CHECKPOINT_FORMAT!r})")
    cfg = payload["config"]
    model = Classifier(cfg["widths"], cfg["num_classes"], cfg["resolution"], cfg.get("stem_stride", 1))
    model.config = dict(cfg)
    missing, unexpected = [], []
    own = model.state_dict()
    for k in own:
        if k not in payload["state_dict"]:
            missing.append(k)
        elif own[k].shape != payload["state_dict"][k].shape:
            raise ValueError(f"{path}: parameter {k} has shape {tuple(payload['state_dict'][k].shape)}, "
                             f"the model expects {tuple(own[k].shape)}")
    unexpected = [k for k in payload["state_dict"] if k not in own]
    if missing or unexpected:
        raise ValueError(f"{path}: state dict mismatch; missing {missing}, unexpected {unexpected}")
    model.load_state_dict(payload["state_dict"])
    model.identity = payload["identity"]
    model.metrics = dict(payload.get("metrics", {}))
    model.checkpoint_path = path
    return model.to(resolve_device(device) if isinstance(device, str) else device).eval()


# ----------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------
def data_fingerprint() -> str:
    """Hash of a few CPU renders of the embedded dataset: a changed renderer invalidates cached classifiers."""
    imgs, labels = render_batch(torch.arange(4), 16, seed=0, split="train")
    h = hashlib.sha256(imgs.numpy().tobytes())
    h.update(labels.numpy().tobytes())
    return h.hexdigest()[:12]


def scale_config(scale: str, seed: int = 0) -> dict:
    validate_scale(scale)
    if scales.CLASSIFIER[scale] is None:
        raise ValueError(
            "the in-project classifier is trained on the 10-class embedded dataset and is not defined for "
            "scale 'paper' (ImageNet): use extractor='inception-v3-compat' and LPIPS there")
    cfg = dict(scales.CLASSIFIER[scale])
    cfg.update({"scale": scale, "seed": int(seed), "num_classes": NUM_CLASSES, "data": data_fingerprint()})
    cfg["train_resolutions"] = list(cfg["train_resolutions"])
    cfg["widths"] = list(cfg["widths"])
    return cfg


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


@torch.no_grad()
def _render_pool(split: str, size: int, cfg: dict, device, seed: int, progress: bool):
    """uint8 images [size, 3, R, R] at the classifier resolution, mixing cfg['train_resolutions'] by index."""
    R = cfg["resolution"]
    res_list = cfg["train_resolutions"]
    chunk = 4096 if device.type == "cuda" else 1024
    images = torch.empty(size, 3, R, R, dtype=torch.uint8, device=device)
    labels = torch.empty(size, dtype=torch.int64, device=device)
    res_of = torch.arange(size) % len(res_list)  # alternate resolutions so every class sees each of them
    it = range(0, size, chunk)
    for start in tqdm(it, desc=f"render {split} ({size})", disable=not progress, leave=False):
        idx = torch.arange(start, min(start + chunk, size))
        for k, r in enumerate(res_list):
            sel = idx[res_of[idx] == k]
            if sel.numel() == 0:
                continue
            x, y = render_batch(sel, r, seed=seed, split=split, device=device)
            if r != R:
                x = F.interpolate(_to_uint8(x).float() / 255, size=(R, R), mode="bilinear", align_corners=False,
                                  antialias=r > R)
            images[sel.to(device)] = _to_uint8(x)
            labels[sel.to(device)] = y.to(device)
    return images, labels


@torch.no_grad()
def evaluate_accuracy(model: Classifier, images_u8: torch.Tensor, labels: torch.Tensor, batch_size: int = 512) -> float:
    model.eval()
    correct = 0
    for s in range(0, len(images_u8), batch_size):
        x = images_u8[s:s + batch_size].float() / 255
        correct += (model(x).argmax(1) == labels[s:s + batch_size]).sum().item()
    return correct / max(1, len(images_u8))


@contextlib.contextmanager
def _cpu_threads(n: int):
    """Temporarily cap torch's intra-op threads. Tiny CPU convolutions gain little from a second thread, and
    on a busy 2-core machine OpenMP threads that spin-wait for each other made a smoke training step ~30x slower
    (1.7 s vs 0.05 s measured); one thread is both faster and predictable. The previous value is restored."""
    old = torch.get_num_threads()
    torch.set_num_threads(min(n, old))
    try:
        yield
    finally:
        torch.set_num_threads(old)


def train_classifier(scale: str = "smoke", device="auto", *, seed: int = 0, progress: bool = True,
                     cfg: dict | None = None) -> tuple[Classifier, dict]:
    """Train the classifier for ``scale`` from scratch; returns (model in eval mode, info dict).

    info holds ``val_accuracy`` (overall and per training resolution), ``wall_s``, ``steps``, ``device``, ``gpu``.
    """
    dev = resolve_device(device) if isinstance(device, str) else device
    if dev.type == "cpu":
        with _cpu_threads(1):
            return _train(scale, dev, seed, progress, cfg)
    return _train(scale, dev, seed, progress, cfg)


def _train(scale, dev, seed, progress, cfg):
    cfg = dict(cfg or scale_config(scale, seed))
    t0 = time.time()
    gen = torch.Generator().manual_seed(cfg["seed"])
    torch.manual_seed(cfg["seed"])
    model = build_classifier(cfg)
    model.config = dict(cfg)
    model = model.to(dev)
    cuda = dev.type == "cuda"
    if cuda:
        model = model.to(memory_format=torch.channels_last)

    train_x, train_y = _render_pool("train", cfg["train_size"], cfg, dev, cfg["seed"], progress)
    val_x, val_y = _render_pool("val", cfg["val_size"], cfg, dev, cfg["seed"], progress)

    steps_per_epoch = cfg["train_size"] // cfg["batch_size"]
    total = steps_per_epoch * cfg["epochs"]
    if total < 1:
        raise ValueError(f"nothing to train: train_size={cfg['train_size']} < batch_size={cfg['batch_size']} "
                         f"or epochs={cfg['epochs']} < 1")
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"],
                            **({"fused": True} if cuda else {}))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg["lr"], total_steps=total, pct_start=0.15)
    model.train()
    bar = tqdm(total=total, desc=f"train classifier [{cfg['scale']}]", disable=not progress, leave=False)
    loss_val = torch.zeros((), device=dev)
    for epoch in range(cfg["epochs"]):
        perm = torch.randperm(cfg["train_size"], generator=gen).to(dev)
        for s in range(steps_per_epoch):
            idx = perm[s * cfg["batch_size"]:(s + 1) * cfg["batch_size"]]
            x = train_x[idx].float() / 255
            # Horizontal flips are label-preserving here: every shape is drawn at a random rotation and every
            # class is mirror-symmetric up to rotation.
            flip = torch.rand(x.shape[0], device=dev, generator=None) < 0.5
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
            if cuda:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=cuda):
                loss = F.cross_entropy(model(x), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_val = loss.detach()
            bar.update(1)
        epoch_loss = float(loss_val.item())  # one host sync per epoch
        if not math.isfinite(epoch_loss):
            raise FloatingPointError(f"classifier training diverged in epoch {epoch + 1} (loss {epoch_loss}); "
                                     f"nothing was saved; lower cfg['lr']")
        bar.set_postfix(epoch=epoch + 1, loss=f"{epoch_loss:.3f}")
    bar.close()
    final_loss = float(loss_val.item())

    model = model.to(memory_format=torch.contiguous_format).eval()
    res_of = torch.arange(cfg["val_size"]) % len(cfg["train_resolutions"])
    acc_by_res = {}
    for k, r in enumerate(cfg["train_resolutions"]):
        sel = (res_of == k).nonzero().squeeze(1).to(dev)
        acc_by_res[str(r)] = evaluate_accuracy(model, val_x[sel], val_y[sel])
    if cuda:
        torch.cuda.synchronize()
    info = {
        "val_accuracy": evaluate_accuracy(model, val_x, val_y),
        "val_accuracy_by_resolution": acc_by_res,
        "val_size": cfg["val_size"],
        "final_train_loss": final_loss,
        "steps": total,
        "wall_s": round(time.time() - t0, 2),
        "device": str(dev),
        "gpu": torch.cuda.get_device_name(dev) if cuda else None,
        "params": sum(p.numel() for p in model.parameters()),
    }
    model.metrics = info
    return model, info


def default_checkpoint(scale: str) -> Path:
    """Where the classifier of ``scale`` lives: the artifact cache for smoke, the shipped file for small."""
    validate_scale(scale)
    if scale == "small":
        return REPO_ROOT / "data" / "checkpoints" / "classifier_small.pt"
    return artifact_dir("classifier", scale_config(scale)) / "classifier.pt"


def get_classifier(scale: str = "smoke", device="cpu", *, checkpoint=None, progress: bool = False) -> Classifier:
    """The classifier for ``scale`` on ``device`` (eval mode).

    * ``checkpoint`` given: load it.
    * ``smoke``: load from the artifact cache, training it first (seconds on CPU) when absent.
    * ``small``: load the shipped ``data/checkpoints/classifier_small.pt``; if missing, say how to make it.
    * ``paper``: not defined (see :data:`scales.CLASSIFIER`).
    """
    dev = resolve_device(device) if isinstance(device, str) else device
    if checkpoint is not None:
        return load_classifier(checkpoint, dev)
    path = default_checkpoint(scale)
    if path.is_file():
        return load_classifier(path, dev)
    if scale == "small":
        raise FileNotFoundError(
            f"{path} is missing. Train it on a GPU (about 1-2 min on one H200): "
            f"python -m rearlib classifier train --scale small --out {path.relative_to(REPO_ROOT)}")
    model, info = train_classifier(scale, dev, progress=progress)
    save_classifier(model, path, info)
    return load_classifier(path, dev)


# ----------------------------------------------------------------------------------------------------------
# Uses
# ----------------------------------------------------------------------------------------------------------
@torch.no_grad()
def class_consistency(images: torch.Tensor, labels: torch.Tensor, classifier: Classifier,
                      batch_size: int = 256) -> dict:
    """Fraction of conditional samples that ``classifier`` assigns (argmax) to the requested class.

    ``images`` float [B,3,H,W] in [0,1]; ``labels`` int [B], the class each sample was generated for.
    Returns ``{"class_consistency": float, "n": B, "per_class": {class: fraction or nan}, "classifier": id}``.
    Chance level is 1/num_classes; the classifier's own validation accuracy on real images is the ceiling to
    compare against (``classifier.metrics["val_accuracy"]``).
    """
    labels = torch.as_tensor(labels).long().view(-1)
    if images.ndim != 4 or images.shape[0] != labels.numel():
        raise ValueError(f"images [B,3,H,W] and labels [B] must match; got {tuple(images.shape)} and "
                         f"{tuple(labels.shape)}")
    if labels.numel() == 0:
        raise ValueError("class_consistency needs at least one sample")
    if labels.min() < 0 or labels.max() >= classifier.num_classes:
        raise ValueError(f"labels must lie in [0, {classifier.num_classes}); got range "
                         f"[{labels.min().item()}, {labels.max().item()}]")
    dev = next(classifier.parameters()).device
    classifier.eval()
    preds = torch.cat([classifier(images[s:s + batch_size].to(dev)).argmax(1).cpu()
                       for s in range(0, len(images), batch_size)])
    hit = (preds == labels).float()
    per_class = {}
    for c in range(classifier.num_classes):
        m = labels == c
        per_class[c] = hit[m].mean().item() if m.any() else float("nan")
    return {"class_consistency": hit.mean().item(), "n": int(labels.numel()), "per_class": per_class,
            "classifier": f"{EXTRACTOR_NAME}:{classifier.identity}"}


# ----------------------------------------------------------------------------------------------------------
# torch-fidelity integration
# ----------------------------------------------------------------------------------------------------------
def _fidelity_extractor_class():
    # Imported here, not at the top: torch_fidelity imports torchvision, which takes seconds.
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase
    from torch_fidelity.helpers import vassert

    class RearlibClassifierExtractor(FeatureExtractorBase):
        """torch-fidelity feature extractor around :class:`Classifier`.

        torch-fidelity instantiates it as ``cls(name, features_list, **calculate_metrics_kwargs)``; the
        checkpoint comes through the standard ``feature_extractor_weights_path`` keyword. Input: uint8
        [B,3,H,W] (torch-fidelity's convention). Features: ``"pool"`` [B, C] and ``"logits"`` [B, classes].
        """

        def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
            super().__init__(name, features_list)
            if feature_extractor_weights_path is None:
                raise ValueError(
                    f"feature extractor {EXTRACTOR_NAME!r} needs feature_extractor_weights_path=<classifier "
                    f"checkpoint> (see rearlib.metrics.classifier.default_checkpoint / get_classifier)")
            self.model = load_classifier(feature_extractor_weights_path, "cpu")
            self.requires_grad_(False)
            self.eval()

        def forward(self, x):
            vassert(torch.is_tensor(x) and x.dtype == torch.uint8,
                    "Expecting image as torch.Tensor with dtype=torch.uint8")
            vassert(x.dim() == 4 and x.shape[1] == 3, f"Input is not Bx3xHxW: {x.shape}")
            pool, logits = self.model.pool_and_logits(x.float() / 255)
            out = {"pool": pool.float(), "logits": logits.float()}
            return tuple(out[name] for name in self.features_list)

        @staticmethod
        def get_provided_features_list():
            return "pool", "logits"

        @staticmethod
        def get_default_feature_layer_for_metric(metric):
            return {"isc": "logits", "fid": "pool", "kid": "pool", "prc": "pool"}[metric]

        @staticmethod
        def can_be_compiled():
            return False

        @staticmethod
        def get_dummy_input_for_compile():
            return (torch.rand([1, 3, 32, 32]) * 255).to(torch.uint8)

    return RearlibClassifierExtractor


def register_with_torch_fidelity() -> str:
    """Register the extractor as ``"rearlib-classifier"`` (idempotent); returns the name."""
    # Imported here, not at the top: torch_fidelity imports torchvision, which takes seconds.
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

    if EXTRACTOR_NAME not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(EXTRACTOR_NAME, _fidelity_extractor_class())
    return EXTRACTOR_NAME


# ----------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------
def _cli_train(args) -> int:
    dev = resolve_device(args.device)
    cfg = scale_config(args.scale, args.seed)
    print(f"training {EXTRACTOR_NAME} [{args.scale}] on {dev}: {json.dumps(cfg)}", flush=True)
    model, info = train_classifier(args.scale, dev, seed=args.seed, progress=not args.quiet, cfg=cfg)
    out = Path(args.out) if args.out else default_checkpoint(args.scale)
    save_classifier(model, out, info)
    size_mib = out.stat().st_size / 2**20
    if size_mib > 16:
        print(f"WARNING: checkpoint is {size_mib:.1f} MiB, above the 16 MiB limit for shipped files", file=sys.stderr)
    report = {"checkpoint": str(out), "identity": model.identity, "size_mib": round(size_mib, 3),
              "config": cfg, **info, "hardware": hardware_info()}
    atomic_write_text(out.with_suffix(".json"), json.dumps(report, indent=2, default=str))
    print(f"val accuracy {info['val_accuracy']:.4f} (by resolution {info['val_accuracy_by_resolution']}, "
          f"n={info['val_size']}, chance {1 / cfg['num_classes']:.2f})")
    print(f"wall time {info['wall_s']:.1f} s for {info['steps']} steps; device {info['device']}; gpu {info['gpu']}")
    print(f"wrote {out} ({size_mib:.2f} MiB, identity {model.identity}) and {out.with_suffix('.json')}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m rearlib classifier", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train the in-project classifier and write a checkpoint + JSON report")
    t.add_argument("--scale", default="small", choices=("smoke", "small"),
                   help="which scale's recipe (scales.CLASSIFIER) to train (default: small)")
    t.add_argument("--out", default=None, help="checkpoint path (default: the scale's default location)")
    t.add_argument("--device", default="auto",
                   help='"auto" (a GPU if there is one; default), "cpu", "cuda" or "cuda:N"')
    t.add_argument("--seed", type=int, default=0,
                   help="random seed of the initial weights, the rendered data and the batch order (default: 0)")
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if args.cmd == "train":
        return _cli_train(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
