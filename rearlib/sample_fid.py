"""Sharded FID sample generation: PNGs per global image index (independent of the number of ranks, resumable)
and their merge into an ADM-style npz.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from rearlib.model import Generator
from rearlib.runtime import tf32
from rearlib.sample_generate import generate
from rearlib.sample_rule import _unwrap, image_seeds

__all__ = ["generate_fid_samples", "merge_fid_samples"]


def _dist_rank_world():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] float in [0, 1] -> [B, H, W, 3] uint8, rounding to nearest (x * 255 + 0.5, clamped)."""
    return (images.float() * 255.0 + 0.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu()


def _no_tf32():
    """Full float32 convolutions and matmuls inside (:func:`rearlib.experiments.tf32`; flags restored after).

    With TF32 (PyTorch's default for cuDNN convolutions) an H200 decoded the last two rows of a 64-image batch
    differently from the same images at other rows (one grey level after rounding), so FID images changed with the
    number of ranks, which moves images between rows. In float32 the decode did not depend on the row.
    """
    return tf32(False)


def _png_path(out_dir: Path, index: int) -> Path:
    return Path(out_dir) / "images" / f"{index:06d}.png"


def _save_png_atomic(array_hwc, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    Image.fromarray(array_hwc.numpy()).save(tmp, format="PNG")
    os.replace(tmp, path)


@torch.no_grad()
def generate_fid_samples(model: Generator, tokenizer, num_per_class: int, out_dir, *, seed: int = 0,
                         rank: int | None = None, world_size: int | None = None, batch_size: int = 64,
                         classes=None, cfg_scale: float | None = None, cfg_power: float = 0.0,
                         temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                         fast: bool | str | None = None, merge: bool | None = None, progress: bool = True) -> dict:
    """Generate ``num_per_class`` images per class as PNGs ``out_dir/images/{index:06d}.png`` and an npz.

    Global image ``i`` (0-based) has class ``classes[i // num_per_class]`` (classes in order, as the official
    script; default all ``M`` classes) and seed ``image_seed(seed, i)``. Rank ``r`` of ``world_size`` makes the
    images with ``i % world_size == r``, in batches of ``batch_size`` (the last padded to full size so that every
    batch has the same shape). Images therefore do not depend on the number of ranks. Existing PNGs are kept
    (a batch whose PNGs all exist is skipped), so an interrupted run resumes. rank / world_size default to
    torch.distributed's. ``merge`` (default: when this process can see all images - world_size 1, or rank 0
    after a ``dist.barrier()``) writes ``out_dir/samples.npz`` with ``arr_0`` uint8 [n, H, W, 3] (ADM format)
    and ``arr_1`` int64 labels; with simulated ranks call :func:`merge_fid_samples` yourself.
    Returns {"out_dir", "num_images", "generated", "skipped", "seconds", "npz"}.
    """
    model = _unwrap(model)
    if rank is None or world_size is None:
        r, w = _dist_rank_world()
        rank = r if rank is None else rank
        world_size = w if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    if num_per_class <= 0 or batch_size <= 0:
        raise ValueError(f"num_per_class and batch_size must be positive, got {num_per_class}, {batch_size}")
    M = model.config.num_classes
    class_list = list(range(M)) if classes is None else [int(c) for c in classes]
    if not class_list or any(not 0 <= c < M for c in class_list):
        raise ValueError(f"classes must be labels in [0, {M})")
    out_dir = Path(out_dir)
    total = len(class_list) * num_per_class
    mine = list(range(rank, total, world_size))
    device = model.pos_embed.device
    t0 = time.perf_counter()
    generated = skipped = 0
    batches = [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]
    it = batches
    if progress and rank == 0:
        it = tqdm(batches, desc=f"FID samples (rank {rank}/{world_size})")
    # PNG encoding (zlib releases the GIL) runs in threads while the GPU samples the next batch.
    with ThreadPoolExecutor(max_workers=max(1, min(8, (os.cpu_count() or 2) - 1))) as pool:
        pending = []
        for idx in it:
            if all(_png_path(out_dir, i).exists() for i in idx):
                skipped += len(idx)
                continue
            pad = batch_size - len(idx)
            full = idx + [idx[-1]] * pad  # padding rows repeat the last image (same seed -> same tokens; dropped)
            labels = torch.tensor([class_list[i // num_per_class] for i in full], device=device)
            tokens = generate(model, labels, cfg_scale=cfg_scale, cfg_power=cfg_power, temperature=temperature,
                              top_k=top_k, top_p=top_p, image_seeds=image_seeds(seed, full), fast=fast,
                              deterministic=True)
            # Decode the whole padded batch in float32: the decoder's kernels can depend on the batch size (cuDNN
            # picks its algorithm by shape) and, with TF32, on an image's row (see _no_tf32); either moved pixels
            # by one level between 1 and N ranks.
            with _no_tf32():
                images = tokenizer.decode(tokens)[:len(idx)]
            pending += [pool.submit(_save_png_atomic, arr, _png_path(out_dir, i))
                        for i, arr in zip(idx, _to_uint8(images))]
            generated += len(idx)
        for f in pending:
            f.result()  # re-raise any write error
    npz = None
    if merge is None:
        if world_size == 1:
            merge = True
        elif torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()
            merge = rank == 0
        else:
            merge = False
    if merge:
        npz = merge_fid_samples(out_dir, total, labels=[class_list[i // num_per_class] for i in range(total)])
    return {"out_dir": str(out_dir), "num_images": total, "generated": generated, "skipped": skipped,
            "seconds": time.perf_counter() - t0, "npz": None if npz is None else str(npz)}


def merge_fid_samples(out_dir, num_images: int, *, labels=None, npz_path=None) -> Path:
    """Stack PNGs 0..num_images-1 of ``out_dir/images`` into an ADM-style npz (``arr_0`` uint8 [n, H, W, 3],
    plus ``arr_1`` int64 labels when given), written atomically. Raises if any image is missing."""
    out_dir = Path(out_dir)
    missing = [i for i in range(num_images) if not _png_path(out_dir, i).exists()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {num_images} images missing in {out_dir / 'images'} "
                                f"(first: {missing[:5]}); run the remaining ranks first")
    arr = np.stack([np.asarray(Image.open(_png_path(out_dir, i)).convert("RGB")) for i in range(num_images)])
    npz_path = Path(npz_path) if npz_path is not None else out_dir / "samples.npz"
    npz_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = npz_path.with_name(f".{npz_path.stem}.{os.getpid()}.tmp.npz")
    payload = {"arr_0": arr}
    if labels is not None:
        payload["arr_1"] = np.asarray(labels, dtype=np.int64)
    np.savez(tmp, **payload)
    os.replace(tmp, npz_path)
    return npz_path

