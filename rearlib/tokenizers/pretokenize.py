"""Pretokenization: encode a dataset once, store its token grids compactly, and reuse them.

Generator training never touches pixels: like RAR/reAR (``scripts/pretokenization.py``) every image is encoded
once, optionally in several augmented *views*, and the token ids are stored together with the identity of the
tokenizer that produced them. A cache made with another tokenizer (other weights or config) is refused with a
clear error instead of silently training on meaningless ids.

Views (``R`` = the tokenizer's resolution):

* default: one view, the image (resized to ``R`` with antialiasing if its size differs);
* ``flip=True``: two views, the image and its horizontal mirror (reAR's own pretokenization script);
* ``ten_crop=True``: ten views as RAR's ImageNet pretokenization: resize to ``S = int(crop_ratio * R)``
  (``crop_ratio = 1.1``: 256 -> 281 px, as RAR), then
  TenCrop(R) as torchvision defines it: the four corners and the centre, then the same five crops of the
  mirrored image (``flip`` is implied). For the embedded dataset render the source at ``S`` directly to avoid an
  upsampling blur.

File (``torch.save`` dict, written atomically): ``tokens`` ``[N, V, h*w]`` in the smallest integer dtype that
holds ``K`` (uint8 for K <= 256, int16 for K <= 32768, else int32), ``labels`` int64 ``[N]``,
``tokenizer_identity``, ``tokenizer_config``, ``grid_size``, ``codebook_size``, ``view_names``, ``options``,
``source`` (a description) and timing.

Encoding runs on the tokenizer's device in float32. On a GPU, cuDNN may use TF32 convolutions, so a rare
near-tie between two codes can resolve differently than on a CPU; the file records the device it was made on.

CLI: ``python -m rearlib pretokenize --scale small --split train --size 50000 --flip``.
"""

from __future__ import annotations

import argparse
import functools
import time
import warnings
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

# Imported as a module: get_tokenizer is looked up at call time, so tests can replace it.
from rearlib import tokenizers
from rearlib.data import EmbeddedDataset
from rearlib.runtime import UnreadableFileError, artifact_dir, atomic_torch_save, load_torch_file
from rearlib.tokenizers.base import TokenizerMismatchError

FORMAT = "rearlib-tokens"
VERSION = 1
TEN_CROP_NAMES = ("top_left", "top_right", "bottom_left", "bottom_right", "center",
                  "top_left_flip", "top_right_flip", "bottom_left_flip", "bottom_right_flip", "center_flip")


def storage_dtype(codebook_size: int) -> torch.dtype:
    """Smallest integer dtype that holds ids ``0 .. codebook_size - 1``."""
    if codebook_size <= 256:
        return torch.uint8
    if codebook_size <= 2**15:
        return torch.int16
    return torch.int32


def view_names(flip: bool = False, ten_crop: bool = False) -> tuple[str, ...]:
    if ten_crop:
        return TEN_CROP_NAMES
    return ("center", "center_flip") if flip else ("center",)


def _five_crops(x: torch.Tensor, R: int) -> list[torch.Tensor]:
    """torchvision's FiveCrop order and offsets: top-left, top-right, bottom-left, bottom-right, centre
    (centre offset ``int(round((S - R) / 2))``)."""
    H, W = x.shape[-2:]
    top, left = int(round((H - R) / 2.0)), int(round((W - R) / 2.0))
    return [x[..., :R, :R], x[..., :R, W - R:], x[..., H - R:, :R], x[..., H - R:, W - R:],
            x[..., top:top + R, left:left + R]]


def make_views(images: torch.Tensor, resolution: int, flip: bool = False, ten_crop: bool = False,
               crop_ratio: float = 1.1) -> torch.Tensor:
    """``[B, 3, H, W]`` -> ``[B, V, 3, R, R]`` views in the order of :func:`view_names`.

    Resizing is bilinear with antialiasing (what torchvision's tensor ``Resize`` does), clamped to [0, 1].
    """
    R = resolution

    def resize(x, size):
        if tuple(x.shape[-2:]) == (size, size):
            return x
        return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)

    if ten_crop:
        if crop_ratio < 1.0:
            raise ValueError(f"crop_ratio must be >= 1 for ten-crop, got {crop_ratio}")
        x = resize(images, int(crop_ratio * R))  # int(), not round(): RAR's int(1.1 * 256) = 281
        crops = _five_crops(x, R) + _five_crops(x.flip(-1), R)  # TenCrop: the five crops, then of the mirror
        return torch.stack(crops, dim=1)
    x = resize(images, R)
    return torch.stack([x, x.flip(-1)], dim=1) if flip else x[:, None]


class TokenDataset(Dataset):
    """Pretokenized images: item ``i`` = (LongTensor ``[h*w]`` raster tokens, int label) of view ``i % V`` of
    image ``i // V``; ``len = N * V``.

    Attributes: ``tokens`` ``[N, V, h*w]`` (compact dtype, CPU unless moved), ``labels`` ``[N]`` int64,
    ``grid_size``, ``codebook_size``, ``view_names``, ``tokenizer_identity``, ``meta`` (everything else stored).
    """

    def __init__(self, tokens: torch.Tensor, labels: torch.Tensor, *, grid_size, codebook_size: int,
                 view_names, tokenizer_identity: str, meta: dict | None = None):
        if tokens.ndim != 3:
            raise ValueError(f"tokens must be [N, V, h*w], got {tuple(tokens.shape)}")
        if labels.shape != tokens.shape[:1]:
            raise ValueError(f"labels {tuple(labels.shape)} do not match {tokens.shape[0]} images")
        h, w = grid_size
        if tokens.shape[2] != h * w or tokens.shape[1] != len(view_names):
            raise ValueError(f"tokens {tuple(tokens.shape)} do not match grid {h}x{w} and {len(view_names)} views")
        self.tokens, self.labels = tokens, labels.long()
        self.grid_size, self.codebook_size = (int(h), int(w)), int(codebook_size)
        self.view_names, self.tokenizer_identity = tuple(view_names), tokenizer_identity
        self.meta = dict(meta or {})

    @property
    def num_images(self) -> int:
        return self.tokens.shape[0]

    @property
    def num_views(self) -> int:
        return self.tokens.shape[1]

    def __len__(self) -> int:
        return self.num_images * self.num_views

    def __getitem__(self, i: int):
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} token sequences")
        i %= len(self)
        n, v = divmod(i, self.num_views)
        return self.tokens[n, v].long(), int(self.labels[n])

    def tensors(self, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """All views flattened: (LongTensor ``[N*V, h*w]``, labels ``[N*V]``), image-major, on ``device``."""
        t = self.tokens.to(device).long().reshape(-1, self.tokens.shape[-1])
        return t, self.labels.to(device).repeat_interleave(self.num_views)

    def sample_views(self, generator: torch.Generator | None = None, device=None):
        """One random view per image (as RAR draws one crop per image per epoch): (``[N, h*w]`` long, ``[N]``)."""
        v = torch.randint(0, self.num_views, (self.num_images,), generator=generator)
        t = self.tokens[torch.arange(self.num_images), v]
        return t.to(device).long(), self.labels.to(device)

    def grids(self, view: int = 0) -> torch.Tensor:
        """Tokens of one view as grids LongTensor ``[N, h, w]``."""
        return self.tokens[:, view].long().reshape(-1, *self.grid_size)

    def to_dict(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "tokens": self.tokens.cpu(), "labels": self.labels.cpu(),
                "grid_size": list(self.grid_size), "codebook_size": self.codebook_size,
                "view_names": list(self.view_names), "tokenizer_identity": self.tokenizer_identity, **self.meta}

    def save(self, path) -> Path:
        return atomic_torch_save(self.to_dict(), path)

    def __repr__(self) -> str:
        h, w = self.grid_size
        return (f"TokenDataset({self.num_images} images x {self.num_views} views, grid {h}x{w}, "
                f"K={self.codebook_size}, tokens {self.tokens.dtype}, tokenizer {self.tokenizer_identity})")


def _identity_of(tokenizer) -> str:
    return tokenizer if isinstance(tokenizer, str) else tokenizer.identity()


def load_tokens(path, tokenizer) -> TokenDataset:
    """Load a pretokenized file and check that it was made by ``tokenizer`` (a tokenizer or its identity string).

    Raises ``FileNotFoundError`` if absent, ``ValueError`` if it is not a token file, and
    :class:`~rearlib.tokenizers.TokenizerMismatchError` if another tokenizer made it.
    """
    path = Path(path)
    d = load_torch_file(path, "pretokenized file", "Delete it to re-encode the images (a cached one under "
                        "artifacts/tokens/ is rebuilt on the next use).")
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise ValueError(f"{path} is not a rearlib pretokenized file (format {FORMAT!r})")
    if d.get("version") != VERSION:
        raise ValueError(f"{path}: token file version {d.get('version')} is not supported (expected {VERSION})")
    want = _identity_of(tokenizer)
    if d["tokenizer_identity"] != want:
        raise TokenizerMismatchError(
            f"{path} was tokenized with {d['tokenizer_identity']} but the tokenizer given is {want}: token ids "
            f"of different tokenizers mean different things. Re-run pretokenize() with this tokenizer (it writes "
            f"a new cache), or load the tokenizer that made the file.")
    meta = {k: v for k, v in d.items() if k not in ("format", "version", "tokens", "labels", "grid_size",
                                                    "codebook_size", "view_names", "tokenizer_identity")}
    return TokenDataset(d["tokens"], d["labels"], grid_size=tuple(d["grid_size"]), codebook_size=d["codebook_size"],
                        view_names=d["view_names"], tokenizer_identity=d["tokenizer_identity"], meta=meta)


def describe_source(source) -> str | None:
    """A stable description of a data source for cache keys, or None when there is none (no auto-caching).

    Datasets whose ``repr`` is informative (no memory address) and ``functools.partial`` objects of named
    functions with literal arguments (e.g. ``partial(render_batch, resolution=64, split="train", seed=0)``)
    have one; lambdas and default reprs do not.
    """
    if isinstance(source, functools.partial):
        fn = source.func
        name = f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', '?')}"
        if "<lambda>" in name or "<locals>" in name:
            return None
        args = [repr(a) for a in source.args] + [f"{k}={v!r}" for k, v in sorted(source.keywords.items())]
        return f"{name}({', '.join(args)})"
    if isinstance(source, Dataset):
        r = repr(source)
        return None if " at 0x" in r else r
    return None


def _batches(source, size: int, batch_size: int, device, num_workers: int):
    """Yield (images [B,3,H,W], labels [B]) on ``device`` for images ``0 .. size-1`` in order."""
    if isinstance(source, Dataset):
        if hasattr(source, "batch") and callable(source.batch):  # e.g. EmbeddedDataset renders whole batches
            for start in range(0, size, batch_size):
                x, y = source.batch(start, min(start + batch_size, size), device=device)
                yield x, y
            return
        ds = source if size == len(source) else Subset(source, range(size))
        loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                            pin_memory=device.type == "cuda")
        for x, y in loader:
            yield x.to(device, non_blocking=True), torch.as_tensor(y)
        return
    for start in range(0, size, batch_size):
        idx = torch.arange(start, min(start + batch_size, size))
        x, y = source(idx, device=device)
        yield x, y


@torch.no_grad()
def pretokenize(tokenizer, dataset_or_render_fn: Dataset | Callable, *, size: int | None = None,
                path=None, cache_key=None, flip: bool = False, ten_crop: bool = False, crop_ratio: float = 1.1,
                batch_size: int = 256, num_workers: int = 0, overwrite: bool = False,
                progress: bool = True) -> TokenDataset:
    """Encode images ``0 .. size-1`` of a dataset (or a render function) into a :class:`TokenDataset`.

    ``dataset_or_render_fn``: a map-style Dataset with items ``(image [3,H,W] in [0,1], label)``, or a callable
    ``fn(indices: LongTensor, device=...) -> (images [B,3,H,W], labels [B])`` such as
    ``functools.partial(rearlib.data.render_batch, resolution=64, split="train", seed=0)`` (then ``size`` is
    required). Images are encoded in batches of ``batch_size`` source images on the tokenizer's device.

    Caching: with ``path`` the result is stored there; with ``path=None`` it goes to
    ``artifacts/tokens/<hash>/tokens.pt`` where the hash covers the tokenizer identity, the source description
    (``cache_key`` or :func:`describe_source`), ``size`` and the view options; with neither a path nor a
    describable source nothing is stored. An existing file made by the same tokenizer with the same options
    is loaded instead of recomputed; one made by another tokenizer raises
    :class:`~rearlib.tokenizers.TokenizerMismatchError`; different options raise ``ValueError`` unless
    ``overwrite=True``.
    """
    if size is None:
        if not isinstance(dataset_or_render_fn, Dataset):
            raise ValueError("size is required when a render function is given")
        size = len(dataset_or_render_fn)
    if isinstance(dataset_or_render_fn, Dataset) and size > len(dataset_or_render_fn):
        raise ValueError(f"size={size} exceeds the dataset's {len(dataset_or_render_fn)} images")
    if size <= 0 or batch_size <= 0:
        raise ValueError(f"size and batch_size must be positive, got {size}, {batch_size}")
    if not isinstance(dataset_or_render_fn, Dataset) and not callable(dataset_or_render_fn):
        raise TypeError("dataset_or_render_fn must be a torch Dataset or a callable (indices, device=) -> (x, y)")

    identity = tokenizer.identity()
    names = view_names(flip, ten_crop)
    options = {"flip": bool(flip) or bool(ten_crop), "ten_crop": bool(ten_crop),
               "crop_ratio": float(crop_ratio) if ten_crop else None, "resolution": tokenizer.resolution}
    source = cache_key if cache_key is not None else describe_source(dataset_or_render_fn)
    in_cache = path is None and source is not None
    if in_cache:
        key = {"tokenizer": identity, "source": source, "size": int(size), "options": options, "version": VERSION}
        path = artifact_dir("tokens", key) / "tokens.pt"
    cached = None
    if path is not None and Path(path).is_file() and not overwrite:
        try:
            cached = load_tokens(path, tokenizer if isinstance(tokenizer, str) else identity)
        except UnreadableFileError as err:
            if not in_cache:  # a file the caller named is theirs to fix; a damaged cache entry is ours to rebuild
                raise
            warnings.warn(f"{err}; encoding the images again", stacklevel=2)
    if cached is not None:
        stored = {"options": cached.meta.get("options"), "size": cached.num_images, "source": cached.meta.get("source")}
        asked = {"options": options, "size": int(size), "source": str(source) if source is not None else None}
        if stored != asked:
            raise ValueError(f"{path} holds tokens made with {stored}, not {asked}; pass overwrite=True to "
                             f"replace it or choose another path")
        return cached

    device = tokenizer.device
    L = tokenizer.num_tokens
    out = torch.empty(size, len(names), L, dtype=storage_dtype(tokenizer.codebook_size))
    labels = torch.empty(size, dtype=torch.long)
    t0 = time.time()
    done = 0
    n_batches = -(-size // batch_size)
    bar = tqdm(_batches(dataset_or_render_fn, size, batch_size, device, num_workers), total=n_batches,
               desc=f"pretokenize {size} images x {len(names)} views", disable=not progress)
    for x, y in bar:
        B = x.shape[0]
        views = make_views(x.to(device).float(), tokenizer.resolution, flip, ten_crop, crop_ratio)
        ids = tokenizer.encode(views.reshape(B * len(names), *views.shape[2:]))
        out[done:done + B] = ids.reshape(B, len(names), L).to("cpu", out.dtype)
        labels[done:done + B] = torch.as_tensor(y).reshape(-1).long().cpu()
        done += B
    bar.close()
    if done != size:
        raise RuntimeError(f"the source produced {done} images, expected {size}")
    meta = {"options": options, "source": str(source) if source is not None else None,
            "tokenizer_kind": tokenizer.kind, "tokenizer_config": tokenizer.config_dict(),
            "wall_s": time.time() - t0, "device": str(device)}
    ds = TokenDataset(out, labels, grid_size=tokenizer.grid_size, codebook_size=tokenizer.codebook_size,
                      view_names=names, tokenizer_identity=identity, meta=meta)
    if path is not None:
        ds.save(path)
        ds.meta["path"] = str(path)
    return ds


def main(argv=None) -> int:
    """``python -m rearlib pretokenize --scale small --split train --size 50000 [--flip | --ten-crop]``"""
    p = argparse.ArgumentParser(prog="python -m rearlib pretokenize",
                                description="encode ShapeScenes-10 images once with the scale's tokenizer")
    p.add_argument("--scale", default="small", choices=["smoke", "small"], help="whose tokenizer encodes the images")
    p.add_argument("--split", default="train", choices=["train", "val", "test"], help="ShapeScenes-10 split")
    p.add_argument("--size", type=int, required=True, help="number of images (indices 0..size-1)")
    p.add_argument("--seed", type=int, default=0, help="dataset seed")
    p.add_argument("--flip", action="store_true", help="also encode the horizontally flipped images")
    p.add_argument("--ten-crop", action="store_true", help="encode the ten crops of each image (the authors' ImageNet recipe)")
    p.add_argument("--out", default=None, help="file to write (default: artifacts/tokens/<hash>/tokens.pt)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--batch-size", type=int, default=512, help="images per encoder call")
    a = p.parse_args(argv)
    tok = tokenizers.get_tokenizer(a.scale, a.device)
    # Ten-crop renders the source at int(1.1 R) directly instead of upsampling R-pixel images.
    res = int(1.1 * tok.resolution) if a.ten_crop else tok.resolution
    ds = EmbeddedDataset(a.split, size=a.size, resolution=res, seed=a.seed)
    t0 = time.time()
    out = pretokenize(tok, ds, path=a.out, flip=a.flip, ten_crop=a.ten_crop, batch_size=a.batch_size)
    print(f"[pretokenize] {out} in {time.time() - t0:.1f}s on {tok.device}; file: {out.meta.get('path', a.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
