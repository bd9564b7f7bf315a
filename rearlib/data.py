"""Datasets: the embedded default dataset ("ShapeScenes-10") and loaders for real data.

ShapeScenes-10 needs no download. Each image is one large object (10 shape classes) drawn over a crop of a
real photograph or texture shipped inside scikit-image. The object spans many tokens, so an early wrong token
visibly breaks its outline or colour; the background brings natural-image statistics.

Determinism. Every random parameter of image ``i`` comes from a counter-based integer hash of
``(seed, split, i, stream)`` computed in 31-bit integer arithmetic, so it is the same on any machine, on CPU
and GPU, and whatever the batch composition. Rendering is elementwise float32 work plus one ``grid_sample``;
on CPU the bytes are identical run to run and machine to machine for a given torch version (tested against
stored digests). On GPU, float round-off may differ from the CPU in the last bit; use the CPU ``Dataset`` when
bytes matter and ``render_batch`` on the GPU when speed does.

Class identity is carried by the shape (the global structure) and, loosely, by the hue: each class has a base
hue with +-18 degree jitter, so neighbouring classes overlap in colour and a model has to get the shape right.
"""

from __future__ import annotations

import math
import os
import pickle
import warnings
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

NUM_CLASSES = 10
CLASS_NAMES = (
    "disc", "square", "triangle", "ring", "cross", "star", "diamond", "hexagon", "crescent", "capsule",
)
SPLITS = {"train": 0, "val": 1, "test": 2}
DATASETS = ("embedded", "cifar10", "imagefolder", "imagenet")

# Lossless PNGs shipped in scikit-image's wheel (JPEGs are avoided: decoders may differ between versions).
_BACKGROUNDS = ("astronaut", "coffee", "chelsea", "immunohistochemistry", "brick", "grass", "gravel", "moon")
_BANK_SIZE = 160  # each background is stored at 160x160 and cropped/zoomed with grid_sample

_M31 = 0x7FFFFFFF


# ----------------------------------------------------------------------------------------------------------
# Counter-based randomness
# ----------------------------------------------------------------------------------------------------------
def _mix31(x: torch.Tensor) -> torch.Tensor:
    """An integer finaliser (xorshift-multiply, 3 rounds) kept inside 31 bits so int64 never overflows."""
    for _ in range(3):
        x = ((x >> 16) ^ x) & _M31
        x = (x * 0x45D9F3B) & _M31
    return ((x >> 16) ^ x) & _M31


def _uniform(seed: int, split: int, index: torch.Tensor, stream: int) -> torch.Tensor:
    """U[0,1) per index, a pure function of (seed, split, index, stream), identical on every device."""
    x = (index.to(torch.int64) * 0x9E37 + stream * 0x85EB + (seed & 0xFFFF) * 0xC2B2 + split * 0x27D4) & _M31
    x = _mix31(_mix31(x) ^ ((seed >> 16) & 0xFFFF))
    return x.to(torch.float64).div(2.0**31).to(torch.float32)


# ----------------------------------------------------------------------------------------------------------
# Background bank
# ----------------------------------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def _background_bank_cpu() -> torch.Tensor:
    """(1, 3, S, S*n) float32 atlas of the shipped backgrounds, made deterministically on the CPU."""
    import skimage.data  # scikit-image takes a second to import; only rendering the embedded dataset needs it

    tiles = []
    for name in _BACKGROUNDS:
        img = np.asarray(getattr(skimage.data, name)())
        if img.ndim == 2:
            img = np.stack([img] * 3, axis=-1)
        img = img[..., :3]
        h, w = img.shape[:2]
        s = min(h, w)
        img = img[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
        t = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float().div(255.0)[None]
        tiles.append(F.interpolate(t, size=(_BANK_SIZE, _BANK_SIZE), mode="area"))
    return torch.cat(tiles, dim=3).contiguous()


_bank_by_device: dict = {}


def _background_bank(device: torch.device) -> torch.Tensor:
    key = str(device)
    if key not in _bank_by_device:
        _bank_by_device[key] = _background_bank_cpu().to(device)
    return _bank_by_device[key]


# ----------------------------------------------------------------------------------------------------------
# Shapes as signed distance functions in a local frame where the object has radius about 1
# ----------------------------------------------------------------------------------------------------------
def _polygon(px, py, n: int, apothem: float, phase: float):
    d = None
    for k in range(n):
        a = phase + 2 * math.pi * k / n
        dk = px * math.cos(a) + py * math.sin(a) - apothem
        d = dk if d is None else torch.maximum(d, dk)
    return d


def _box(px, py, hx: float, hy: float):
    return torch.maximum(px.abs() - hx, py.abs() - hy)


_SDFS = (
    lambda px, py, r, phi: r - 0.95,                                                        # disc
    lambda px, py, r, phi: _box(px, py, 0.78, 0.78),                                        # square
    lambda px, py, r, phi: _polygon(px, py, 3, 0.5, math.pi / 2),                           # triangle
    lambda px, py, r, phi: (r - 0.72).abs() - 0.24,                                         # ring
    lambda px, py, r, phi: torch.minimum(_box(px, py, 0.95, 0.3), _box(px, py, 0.3, 0.95)),  # cross
    lambda px, py, r, phi: r - (0.62 + 0.33 * torch.cos(5 * phi)),                          # star (five lobes)
    lambda px, py, r, phi: (px.abs() + py.abs()) * (1 / math.sqrt(2)) - 0.68,               # diamond
    lambda px, py, r, phi: _polygon(px, py, 6, 0.84, 0.0),                                  # hexagon
    lambda px, py, r, phi: torch.maximum(r - 0.95, -(torch.sqrt((px - 0.45) ** 2 + py * py + 1e-12) - 0.8)),
    lambda px, py, r, phi: torch.sqrt(torch.clamp(px.abs() - 0.55, min=0) ** 2 + py * py + 1e-12) - 0.42,
)


def _shape_sdf(cls: torch.Tensor, px: torch.Tensor, py: torch.Tensor) -> torch.Tensor:
    """Signed distance (local units) of each image's own shape, evaluated only for the images of each class."""
    r = torch.sqrt(px * px + py * py + 1e-12)
    phi = torch.atan2(py, px)
    out = torch.empty_like(px)
    for c in range(NUM_CLASSES):
        idx = (cls == c).nonzero().flatten()
        if idx.numel():
            out[idx] = _SDFS[c](px[idx], py[idx], r[idx], phi[idx])
    return out


def _hsv_to_rgb(h, s, v):
    """h in [0,1), s, v in [0,1]; shapes (B,). Returns (B, 3)."""
    k = torch.stack([(5 + h * 6) % 6, (3 + h * 6) % 6, (1 + h * 6) % 6], dim=-1)
    f = torch.clamp(torch.minimum(k, 4 - k), 0, 1)
    return v[:, None] - v[:, None] * s[:, None] * f


def render_batch(indices, resolution: int = 32, seed: int = 0, split: str = "train", device=None):
    """Render ShapeScenes-10 images ``indices`` of ``split``.

    Returns ``(images, labels)``: float32 ``[B, 3, H, W]`` in [0, 1] and int64 ``[B]``. The label of image ``i``
    is ``i mod 10`` shuffled per block of 10 (so any contiguous range is class-balanced).
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; allowed: {', '.join(SPLITS)}")
    if resolution < 8:
        raise ValueError(f"resolution must be >= 8 pixels, got {resolution}")
    idx = torch.as_tensor(indices, dtype=torch.int64)
    if idx.ndim != 1:
        raise ValueError("indices must be a 1-D sequence of image indices")
    if (idx < 0).any():
        raise ValueError("image indices must be non-negative")
    device = torch.device(device) if device is not None else idx.device
    idx = idx.to(device)
    sp = SPLITS[split]
    u = lambda stream: _uniform(seed, sp, idx, stream)  # noqa: E731 - one line reads best here

    # Class-balanced labels: a seeded rotation of 0..9 within each block of ten consecutive indices.
    block_shift = (_uniform(seed, sp, idx // NUM_CLASSES, 99) * NUM_CLASSES).long()
    labels = (idx + block_shift) % NUM_CLASSES

    B, R = idx.numel(), resolution
    lin = (torch.arange(R, device=device, dtype=torch.float32) + 0.5) / R * 2 - 1
    gy, gx = torch.meshgrid(lin, lin, indexing="ij")
    gx, gy = gx.expand(B, R, R), gy.expand(B, R, R)

    # Object placement: centre, size, rotation.
    cx = (u(1) - 0.5) * 0.5
    cy = (u(2) - 0.5) * 0.5
    size = 0.42 + 0.26 * u(3)
    theta = u(4) * 2 * math.pi
    dx, dy = gx - cx.view(-1, 1, 1), gy - cy.view(-1, 1, 1)
    c, s = torch.cos(theta).view(-1, 1, 1), torch.sin(theta).view(-1, 1, 1)
    px = (c * dx + s * dy) / size.view(-1, 1, 1)
    py = (-s * dx + c * dy) / size.view(-1, 1, 1)
    sdf = _shape_sdf(labels, px, py)

    # Antialiased coverage: the SDF in local units times size*R/2 is a distance in pixels.
    dist_px = sdf * (size.view(-1, 1, 1) * R / 2)
    alpha = torch.sigmoid(-dist_px / 0.6)

    # Colour: class base hue with jitter, strong saturation; a soft directional shading and a dark rim.
    hue = (labels.float() / NUM_CLASSES + (u(5) - 0.5) * 0.1 + 1.0) % 1.0
    rgb = _hsv_to_rgb(hue, 0.65 + 0.3 * u(6), 0.75 + 0.25 * u(7))
    light = u(8) * 2 * math.pi
    shade = 0.82 + 0.18 * (px * torch.cos(light).view(-1, 1, 1) + py * torch.sin(light).view(-1, 1, 1)).clamp(-1, 1)
    rim = torch.exp(-((dist_px + 0.8) / 0.9) ** 2)
    obj = rgb.view(B, 3, 1, 1) * (shade * (1 - 0.55 * rim)).unsqueeze(1)

    # Background: a zoomed, shifted crop of one bank image, desaturated and dimmed so the object stands out.
    bank = _background_bank(device)
    n_bank = len(_BACKGROUNDS)
    which = (u(9) * n_bank).long().clamp_max(n_bank - 1)
    zoom = 0.35 + 0.5 * u(10)                                 # fraction of the tile width shown
    ox = (u(11) * 2 - 1) * (1 - zoom)
    oy = (u(12) * 2 - 1) * (1 - zoom)
    # Atlas x coordinate in [-1, 1] over all tiles: tile k spans [k, k+1]/n.
    tile_x = (gx * zoom.view(-1, 1, 1) + ox.view(-1, 1, 1) + 1) / 2          # [0,1] within the tile
    atlas_x = (tile_x + which.view(-1, 1, 1).float()) / n_bank * 2 - 1
    atlas_y = gy * zoom.view(-1, 1, 1) + oy.view(-1, 1, 1)
    grid = torch.stack([atlas_x, atlas_y], dim=-1)
    bg = F.grid_sample(bank.expand(B, -1, -1, -1), grid, mode="bilinear", padding_mode="border",
                       align_corners=False)
    gray = bg.mean(dim=1, keepdim=True)
    sat = 0.25 + 0.45 * u(13)
    bright = 0.35 + 0.35 * u(14)
    bg = (gray + (bg - gray) * sat.view(-1, 1, 1, 1)) * bright.view(-1, 1, 1, 1)
    tint = _hsv_to_rgb(u(15), 0.3 * torch.ones_like(u(15)), torch.ones_like(u(15)))
    bg = bg * tint.view(B, 3, 1, 1)

    a = alpha.unsqueeze(1)
    img = (a * obj + (1 - a) * bg).clamp(0, 1)
    return img.contiguous(), labels


class EmbeddedDataset(Dataset):
    """ShapeScenes-10 as a map-style torch Dataset: item = (image float32 [3,H,W] in [0,1], label int)."""

    def __init__(self, split: str = "train", size: int = 10_000, resolution: int = 32, seed: int = 0):
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; allowed: {', '.join(SPLITS)}")
        _check_resolution_and_size(resolution, size)
        self.split, self.size, self.resolution, self.seed = split, int(size), int(resolution), int(seed)
        self.num_classes = NUM_CLASSES
        self.classes = list(CLASS_NAMES)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int):
        if not 0 <= i < self.size:
            raise IndexError(f"index {i} out of range for a dataset of {self.size} images")
        img, label = render_batch([i], self.resolution, self.seed, self.split)
        return img[0], int(label[0])

    def batch(self, start: int, stop: int, device=None):
        """Images ``start..stop-1`` in one batched render (optionally on a GPU)."""
        return render_batch(torch.arange(start, min(stop, self.size)), self.resolution, self.seed, self.split,
                            device=device)

    def __repr__(self) -> str:
        return (f"EmbeddedDataset(split={self.split!r}, size={self.size}, resolution={self.resolution}, "
                f"seed={self.seed}, classes={NUM_CLASSES})")


# ----------------------------------------------------------------------------------------------------------
# Real data
# ----------------------------------------------------------------------------------------------------------
class DatasetUnavailable(FileNotFoundError):
    """A real dataset is missing or corrupt; the message says how to obtain it."""


def adm_center_crop(pil_image, image_size: int):
    """Center crop of guided-diffusion (ADM), used by RAR/reAR for ImageNet: BOX-halve while the short side
    is >= 2x the target, BICUBIC-resize the short side to the target, then crop the centre square."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    cy, cx = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
    return Image.fromarray(arr[cy:cy + image_size, cx:cx + image_size])


def _to_unit_tensor(pil_image):
    arr = np.asarray(pil_image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div(255.0)


def _check_resolution_and_size(resolution, size) -> None:
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution <= 0:
        raise ValueError(f"resolution must be a positive integer (pixels), got {resolution!r}")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size <= 0):
        raise ValueError(f"size must be a positive integer (number of images) or None for all, got {size!r}")


class UnreadableImage(OSError):
    """An image file of a folder dataset cannot be decoded; the message names the file."""


class _Transformed(Dataset):
    """Wraps a torchvision dataset of PIL images: ADM crop to ``resolution``, then float [0,1] CHW.

    ``on_error``: what an unreadable (truncated, corrupt) image file does: ``"raise"`` an :class:`UnreadableImage`
    naming the file, or ``"skip"`` it (a warning names it, and the next readable image takes its place)."""

    def __init__(self, base, resolution: int, size: int | None = None, on_error: str = "raise"):
        _check_resolution_and_size(resolution, size)
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.base, self.resolution, self.on_error = base, resolution, on_error
        self.size = len(base) if size is None else min(size, len(base))
        self.classes = list(getattr(base, "classes", []))
        self.num_classes = len(self.classes)

    def __len__(self):
        return self.size

    def _path(self, i) -> str:
        samples = getattr(self.base, "samples", None)
        return samples[i][0] if samples else f"item {i} of {type(self.base).__name__}"

    def __getitem__(self, i):
        for j in range(i, len(self.base)):
            try:
                img, label = self.base[j]
                return _to_unit_tensor(adm_center_crop(img, self.resolution)), int(label)
            except (OSError, SyntaxError, ValueError) as err:  # PIL's errors for truncated / corrupt files
                if self.on_error == "raise":
                    raise UnreadableImage(f"cannot read image {self._path(j)}: {err} (load the dataset with "
                                          f"on_error='skip' to skip unreadable files)") from err
                warnings.warn(f"skipping unreadable image {self._path(j)}: {err}", stacklevel=2)
        raise UnreadableImage(f"no readable image at or after index {i} (last tried: {self._path(len(self.base) - 1)})")


def load_cifar10(root, split: str = "train", resolution: int = 32, size: int | None = None,
                 verify: bool = True) -> Dataset:
    """CIFAR-10 from torchvision's on-disk format (``root/cifar-10-batches-py``), md5-verified by default.

    Nothing is downloaded here; a missing or corrupt copy raises :class:`DatasetUnavailable` saying how to get one.
    """
    from torchvision.datasets import CIFAR10  # torchvision is needed by the real-data loaders only

    if split not in ("train", "val", "test"):
        raise ValueError(f"unknown split {split!r} for CIFAR-10; allowed: train, val (= test), test")
    root = Path(root)
    how = (f"Download it once on a machine with internet: python -c \"import torchvision; "
           f"torchvision.datasets.CIFAR10('{root}', download=True)\" (about 170 MB), then copy the folder here.")
    folder = root / CIFAR10.base_folder
    if not folder.is_dir():
        raise DatasetUnavailable(f"CIFAR-10 not found at {folder}. {how}")

    class _Unverified(CIFAR10):
        def _check_integrity(self):  # the file layout is still checked by the parser below
            return all((Path(self.root) / self.base_folder / f).is_file() for f, _ in self.train_list + self.test_list)

        def _load_meta(self):
            with open(Path(self.root) / self.base_folder / self.meta["filename"], "rb") as fh:
                meta = pickle.load(fh, encoding="latin1")
            self.classes = meta[self.meta["key"]]
            self.class_to_idx = {c: i for i, c in enumerate(self.classes)}

    cls = CIFAR10 if verify else _Unverified
    try:
        base = cls(str(root), train=(split == "train"), download=False)
    except RuntimeError as err:
        raise DatasetUnavailable(f"CIFAR-10 at {folder} is missing files or fails its md5 checksums ({err}). {how}") from err
    return _Transformed(base, resolution, size)


def load_imagefolder(root, resolution: int = 64, size: int | None = None, on_error: str = "raise") -> Dataset:
    """Any ``root/<class>/<image>`` folder (torchvision ImageFolder), ADM-centre-cropped to ``resolution``;
    ``on_error`` ("raise" or "skip") decides what an unreadable image file does."""
    from torchvision.datasets import ImageFolder  # torchvision is needed by the real-data loaders only

    _check_resolution_and_size(resolution, size)
    root = Path(root)
    if not root.is_dir():
        raise DatasetUnavailable(f"image folder {root} does not exist; expected root/<class_name>/<image files>")
    try:
        base = ImageFolder(str(root))
    except (FileNotFoundError, RuntimeError) as err:
        raise DatasetUnavailable(f"no images found under {root} ({err}); expected root/<class_name>/<image files>") from err
    return _Transformed(base, resolution, size, on_error)


def load_imagenet(root, split: str = "train", resolution: int = 256, size: int | None = None,
                  on_error: str = "raise") -> Dataset:
    """ImageNet-1k in ImageFolder layout (``root/train/nXXXXXXXX/*.JPEG``, ``root/val/nXXXXXXXX/*.JPEG``)
    with the ADM centre crop the paper's pretokenization uses. ``split``: "train" or "val"."""
    if split not in ("train", "val"):
        raise ValueError(f"unknown ImageNet split {split!r}; allowed: train, val")
    folder = Path(root) / split
    if not folder.is_dir():
        raise DatasetUnavailable(
            f"ImageNet split folder {folder} not found. Obtain ILSVRC2012 from image-net.org (registration "
            f"required) and arrange it as {Path(root)}/train/<wnid>/*.JPEG and {Path(root)}/val/<wnid>/*.JPEG "
            f"(the validation images sorted into class folders).")
    ds = load_imagefolder(folder, resolution, size, on_error)
    if ds.num_classes != 1000:
        warnings.warn(f"{folder} has {ds.num_classes} class folders, not ImageNet-1k's 1000", stacklevel=2)
    return ds


def load_dataset(name: str = "embedded", split: str = "train", resolution: int = 32, root=None,
                 size: int | None = None, seed: int = 0) -> Dataset:
    """One entry point for every dataset; items are (image float32 [3,H,W] in [0,1], label int)."""
    if name == "embedded":
        _check_resolution_and_size(resolution, size)
        return EmbeddedDataset(split, 10_000 if size is None else size, resolution, seed)
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; allowed: {', '.join(DATASETS)}")
    if root is None:
        env = os.environ.get("REARLIB_DATA")
        if env is None:
            raise DatasetUnavailable(f"dataset {name!r} needs root=... (or the REARLIB_DATA environment variable)")
        root = Path(env) / name
    if name == "cifar10":
        return load_cifar10(root, split, resolution, size)
    if name == "imagefolder":
        return load_imagefolder(root, resolution, size)
    return load_imagenet(root, split, resolution, size)


def dataset_statistics(images: torch.Tensor) -> dict:
    """Per-channel mean/std and mean absolute gradient (a cheap texture measure) of a [B,3,H,W] batch."""
    gx = (images[..., :, 1:] - images[..., :, :-1]).abs().mean().item()
    gy = (images[..., 1:, :] - images[..., :-1, :]).abs().mean().item()
    return {
        "mean_r": images[:, 0].mean().item(), "mean_g": images[:, 1].mean().item(), "mean_b": images[:, 2].mean().item(),
        "std": images.std().item(), "mean_abs_gradient": (gx + gy) / 2,
    }
