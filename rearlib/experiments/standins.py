"""Stand-in paper-scale assets: files shaped like the real ones, for rehearsing the ``paper`` path without them.

A researcher's ``paper`` run needs the authors' generator checkpoints, the MaskGIT-VQGAN weights, ImageNet and the
ADM reference batch (``docs/paper-scale.md``). :func:`write_standins` writes a folder that has the same form:

* ``checkpoints/<preset>.bin``: random weights in the exact layout of the released reAR-S/B/L state dicts (plain
  ``torch.save`` of a name -> tensor dict, as published), plus ``ar.bin`` (the vanilla AR slot of the diagnosis
  notebooks, the reAR-S layout);
* ``checkpoints/maskgit-vqgan-imagenet-f16-256.bin``: random MaskGIT-VQGAN weights in the released layout;
* ``imagenet/{val,train}/<wnid>/*.JPEG``: 1000 class folders of rendered scenes (ImageFolder layout, larger than 256 px so
  the ADM centre crop applies);
* ``VIRTUAL_imagenet256_labeled.npz``: an ADM-style reference batch made from those images (``arr_0`` uint8 NHWC,
  ``mu`` / ``sigma`` of the Inception FID features), so FID runs against stored statistics as with the real file;
* ``env.sh`` / :func:`standin_environment`: the asset variables that point the runner at all of it.

``size="tiny"`` writes the same files at small widths (a 4-block, 64-wide generator without alignment heads and a
32-channel MaskGIT-VQGAN, still 256 tokens, 1024 codes and 1000 classes), so a CPU can walk the whole path in
minutes. Nothing here has any scientific meaning: every number computed from stand-ins is noise, and the
rehearsal record says so.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from rearlib.data import render_batch
from rearlib.metrics.image import to_uint8
from rearlib.model import Generator, get_config
from rearlib.runtime import atomic_torch_save, atomic_write_text, resolve_device
from rearlib.tokenizers.maskgit_vqgan import MaskGITVQGAN, MaskGITVQGANConfig

PAPER_PRESETS = ("rear_s", "rear_b", "rear_l")
MASKGIT_FILE = "maskgit-vqgan-imagenet-f16-256.bin"
REFERENCE_FILE = "VIRTUAL_imagenet256_labeled.npz"
NUM_CLASSES = 1000
SIZES = ("paper", "tiny")
#: The tiny generator: the released layout's names at small widths; no alignment heads, so no block to guess.
TINY_GENERATOR = dict(hidden=64, depth=4, heads=4, encode_align_layer=None, decode_align_layer=None)


def wnid(class_index: int) -> str:
    """A synthetic WordNet id; sorted like the real ones, so folder order is class order."""
    return f"n{class_index:08d}"


def _random_like(shapes: dict[str, torch.Size], seed: int) -> dict[str, torch.Tensor]:
    """Finite random float32 tensors of the given shapes: N(0, 0.02), plus 1 for the 1-D ``*norm*.weight`` (scales
    near one keep the activations from vanishing, so the network computes something non-degenerate)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in shapes.items():
        noise = 0.02 * torch.randn(shape, generator=g)
        out[name] = noise + 1.0 if len(shape) == 1 and "norm" in name and name.endswith("weight") else noise
    return out


def _generator_shapes(preset: str, size: str) -> dict[str, torch.Size]:
    cfg = get_config(preset, **(TINY_GENERATOR if size == "tiny" else {}))
    with torch.device("meta"):
        model = Generator(cfg)
    return {k: v.shape for k, v in model.state_dict().items()}


def _maskgit_shapes(size: str) -> dict[str, torch.Size]:
    cfg = MaskGITVQGANConfig(**({"hidden_channels": 32} if size == "tiny" else {}))
    with torch.device("meta"):
        model = MaskGITVQGAN(cfg)
    return {k: v.shape for k, v in model.state_dict().items()}


def write_generator(path: Path, preset: str, size: str = "paper", seed: int = 0) -> Path:
    """A random-weight generator state dict in the released layout of ``preset``, saved as the released files are."""
    sd = _random_like(_generator_shapes(preset, size), seed)
    return atomic_torch_save(sd, path)


def write_maskgit(path: Path, size: str = "paper", seed: int = 0) -> Path:
    sd = _random_like(_maskgit_shapes(size), seed)
    # A codebook of unit-scale vectors: the encoder's outputs then pick many different codes.
    sd["quantize.embedding.weight"] = torch.randn(sd["quantize.embedding.weight"].shape,
                                                  generator=torch.Generator().manual_seed(seed + 1))
    return atomic_torch_save(sd, path)


def write_imagenet_split(root: Path, split: str = "val", images_per_class: int = 1, resolution: int = 288,
                         seed: int = 0, progress: bool = True) -> Path:
    """``root/<split>/<wnid>/*.JPEG`` for 1000 classes: rendered scenes (class c uses scene index c * k + j)."""
    val = root / split
    n = NUM_CLASSES * images_per_class
    bar = tqdm(total=n, desc=f"stand-in ImageNet {split}", disable=not progress, leave=False)
    for start in range(0, n, 250):
        idx = torch.arange(start, min(n, start + 250))
        # Rendered small and enlarged: the scenes' content is irrelevant here, and rendering at full size is slow.
        imgs = render_batch(idx, resolution=64, seed=seed, split="val")[0]
        imgs = torch.nn.functional.interpolate(imgs, size=(resolution, resolution), mode="bilinear",
                                               align_corners=False)
        arr = to_uint8(imgs).permute(0, 2, 3, 1).numpy()
        for i, a in zip(idx.tolist(), arr):
            folder = val / wnid(i // images_per_class)
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(a).save(folder / f"ILSVRC2012_{split}_{i + 1:08d}.JPEG", quality=90)
        bar.update(len(idx))
    bar.close()
    return val


def write_reference_batch(path: Path, imagenet_root: Path, n_images: int, device="auto",
                          progress: bool = True) -> Path:
    """An ADM-style reference npz from the stand-in images: ``arr_0`` (their 256 px ADM centre crops, uint8 NHWC)
    and ``mu`` / ``sigma`` of the Inception FID features of the same images."""
    from rearlib.data import load_imagenet
    from rearlib.metrics.distribution import feature_statistics

    ds = load_imagenet(imagenet_root, "val", resolution=256)
    n = min(n_images, len(ds))
    # Spread over the classes: every k-th image of the class-sorted folder.
    picks = np.linspace(0, len(ds) - 1, n).round().astype(int)
    imgs = torch.stack([ds[int(i)][0] for i in tqdm(picks, desc="reference batch", disable=not progress,
                                                     leave=False)])
    u8 = to_uint8(imgs)
    stats = feature_statistics(u8, device=resolve_device(device) if isinstance(device, str) else device)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.npz")
    np.savez(tmp, arr_0=u8.permute(0, 2, 3, 1).numpy(), mu=stats["mu"], sigma=stats["sigma"])
    tmp.replace(path)
    return path


def standin_environment(folder: Path, presets=PAPER_PRESETS) -> dict[str, str]:
    """The asset variables (``rearlib.experiments.assets.ASSET_VARIABLES``) pointing at a stand-in folder."""
    folder = Path(folder).resolve()
    env = {"REARLIB_DATA": str(folder), "REARLIB_MASKGIT_VQGAN": str(folder / "checkpoints" / MASKGIT_FILE),
           "REARLIB_REFERENCE_BATCH": str(folder / REFERENCE_FILE),
           "REARLIB_AR_CHECKPOINT": str(folder / "checkpoints" / "ar.bin"),
           "REARLIB_REAR_CHECKPOINT": str(folder / "checkpoints" / "rear_s.bin")}
    for p in presets:
        env[f"REARLIB_{p.upper()}_CHECKPOINT"] = str(folder / "checkpoints" / f"{p}.bin")
    return env


def write_standins(folder, *, size: str = "paper", presets=PAPER_PRESETS, images_per_class: int = 1,
                   reference_images: int = 1000, device="auto", seed: int = 0, progress: bool = True) -> dict:
    """Write every stand-in asset under ``folder`` (files already there are kept) and return a manifest
    ``{"size", "presets", "files": {name: bytes}, "environment": {...}}``, also written as ``standins.json``."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    presets = tuple(presets)
    unknown = [p for p in presets if p not in PAPER_PRESETS]
    if unknown or not presets:
        raise ValueError(f"presets must be a non-empty subset of {PAPER_PRESETS}, got {presets}")
    if images_per_class < 1 or reference_images < 2:
        raise ValueError(f"images_per_class must be >= 1 and reference_images >= 2, got {images_per_class}, "
                         f"{reference_images}")
    folder = Path(folder)
    ckpt = folder / "checkpoints"
    todo = [(ckpt / f"{p}.bin", lambda path, p=p, i=i: write_generator(path, p, size, seed + 10 + i))
            for i, p in enumerate(presets)]
    todo += [(ckpt / "ar.bin", lambda path: write_generator(path, "rear_s", size, seed + 1)),
             (ckpt / MASKGIT_FILE, lambda path: write_maskgit(path, size, seed + 2))]
    if "rear_s" not in presets:  # the diagnosis notebooks' reAR slot uses the reAR-S layout
        todo.append((ckpt / "rear_s.bin", lambda path: write_generator(path, "rear_s", size, seed + 10)))
    for path, make in todo:
        if not path.is_file():
            make(path)
    for split, split_seed in (("val", seed), ("train", seed + 1)):
        if not (folder / "imagenet" / split).is_dir():
            write_imagenet_split(folder / "imagenet", split, images_per_class, seed=split_seed, progress=progress)
    if not (folder / REFERENCE_FILE).is_file():
        write_reference_batch(folder / REFERENCE_FILE, folder / "imagenet", reference_images, device, progress)
    env = standin_environment(folder, presets)
    manifest = {"size": size, "presets": list(presets), "images_per_class": images_per_class,
                "reference_images": reference_images,
                "tiny_generator": asdict(get_config("rear_s", **TINY_GENERATOR)) if size == "tiny" else None,
                "files": {str(p.relative_to(folder)): p.stat().st_size for p in sorted(ckpt.iterdir())},
                "environment": env,
                "meaning": "stand-in assets: random weights and rendered images; no scientific meaning"}
    atomic_write_text(folder / "standins.json", json.dumps(manifest, indent=2, default=str))
    atomic_write_text(folder / "env.sh", "".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items()))
    return manifest


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rearlib standins", description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="folder to write the stand-in assets into (existing files kept)")
    ap.add_argument("--size", choices=SIZES, default="paper",
                    help="paper: the released shapes (GBs of random weights); tiny: small widths for a CPU")
    ap.add_argument("--presets", default=",".join(PAPER_PRESETS),
                    help=f"comma list of generator layouts to write (default {','.join(PAPER_PRESETS)})")
    ap.add_argument("--images-per-class", type=int, default=1, help="stand-in ImageNet val images per class")
    ap.add_argument("--reference-images", type=int, default=1000, help="images in the stand-in reference batch")
    ap.add_argument("--device", default="auto", help="device for the reference batch's Inception features")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random weights and scenes")
    a = ap.parse_args(argv)
    manifest = write_standins(a.out, size=a.size, presets=[p for p in a.presets.split(",") if p],
                              images_per_class=a.images_per_class, reference_images=a.reference_images,
                              device=a.device, seed=a.seed)
    print(json.dumps(manifest, indent=2, default=str))
    print(f"\nsource {Path(a.out) / 'env.sh'}   # points the runner at these stand-ins")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
