"""Sharded FID sample generation: PNGs per global image index (independent of the number of ranks, resumable)
and their merge into an ADM-style npz.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from rearlib.model import Generator
from rearlib.runtime import atomic_write_text, tf32
from rearlib.sample_generate import generate
from rearlib.sample_rule import _check_sampling_args, _integer, _unwrap, image_seeds
from rearlib.tokenizers.base import weights_identity

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


#: Written into the output folder; samples there are resumed only under exactly this record.
CONFIG_NAME = "fid_config.json"
_CONFIG_FORMAT = "rearlib.fid_samples/1"


def _model_identity(model: Generator) -> str:
    return weights_identity("generator", dataclasses.asdict(model.config), model.state_dict())


def _tokenizer_identity(tokenizer) -> str:
    if callable(getattr(tokenizer, "identity", None)):
        return str(tokenizer.identity())
    if isinstance(tokenizer, torch.nn.Module):
        return weights_identity(type(tokenizer).__qualname__, {}, tokenizer.state_dict())
    return type(tokenizer).__qualname__


def _check_tokenizer(model: Generator, tokenizer) -> None:
    K, N = model.config.codebook_size, model.config.seq_len
    tk = getattr(tokenizer, "codebook_size", None)
    if tk is None:
        raise TypeError(f"the tokenizer ({type(tokenizer).__name__}) must expose codebook_size, so that it can be "
                        f"checked against the generator's ({K})")
    if int(tk) != K:
        # The decoder would index its own codebook with ids drawn for another one: images, but meaningless ones.
        raise ValueError(f"tokenizer codebook_size {int(tk)} != generator codebook_size {K}: the generator was not "
                         f"trained on this tokenizer's codes")
    grid = getattr(tokenizer, "grid_size", None)
    if grid is not None and int(grid[0]) * int(grid[1]) != N:
        raise ValueError(f"tokenizer grid {grid[0]}x{grid[1]} = {int(grid[0]) * int(grid[1])} tokens != generator "
                         f"seq_len {N}")


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _prepare_out_dir(out_dir: Path, config: dict, overwrite: bool) -> None:
    """Refuse to mix samples of two configurations in one folder, then record this run's configuration.

    Every rank reads the old record before rank 0 changes anything, so all ranks reach the same verdict (and raise
    together instead of leaving the others waiting at a barrier)."""
    path = out_dir / CONFIG_NAME
    old = None
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"{path} is unreadable ({e}); delete {out_dir} or pass overwrite=True (CLI: --overwrite) "
                             "to start clean") from e
    remedy = (f"Use another out_dir, delete {out_dir}, or pass overwrite=True (CLI: --overwrite) to replace "
              "those samples.")
    replace = False
    if old is None:
        found = sorted((out_dir / "images").glob("*.png")) if (out_dir / "images").is_dir() else []
        if found or (out_dir / "samples.npz").exists():
            if not overwrite:
                raise ValueError(f"{out_dir} holds {len(found)} PNG(s) but no record of the configuration that made "
                                 f"them ({CONFIG_NAME}), so they cannot be resumed safely. {remedy}")
            replace = True
    elif old != config:
        keys = list(config) + [k for k in old if k not in config]
        diff = [f"{k}: {_short(old.get(k, '(missing)'))} there, {_short(config.get(k, '(missing)'))} now"
                for k in keys if old.get(k, "(missing)") != config.get(k, "(missing)")]
        if not overwrite:
            raise ValueError(f"{out_dir} holds FID samples of another configuration ({'; '.join(diff)}). {remedy}")
        replace = True
    dist = torch.distributed.is_available() and torch.distributed.is_initialized()
    if dist:
        torch.distributed.barrier()
    if not dist or torch.distributed.get_rank() == 0:
        if replace:
            for f in (out_dir / "images").glob("*.png"):
                f.unlink()
            (out_dir / "samples.npz").unlink(missing_ok=True)
        if old != config:
            atomic_write_text(path, json.dumps(config, indent=2))
    if dist:
        torch.distributed.barrier()


@torch.no_grad()
def generate_fid_samples(model: Generator, tokenizer, num_per_class: int, out_dir, *, seed: int = 0,
                         rank: int | None = None, world_size: int | None = None, batch_size: int = 64,
                         classes=None, cfg_scale: float | None = None, cfg_power: float = 0.0,
                         temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                         fast: bool | str | None = None, merge: bool | None = None, progress: bool = True,
                         overwrite: bool = False) -> dict:
    """Generate ``num_per_class`` images per class as PNGs ``out_dir/images/{index:06d}.png`` and an npz.

    Global image ``i`` (0-based) has class ``classes[i // num_per_class]`` (classes in order, as the official
    script; default all ``M`` classes) and seed ``image_seed(seed, i)``. Rank ``r`` of ``world_size`` makes the
    images with ``i % world_size == r``, in batches of ``batch_size`` (the last padded to full size so that every
    batch has the same shape). Images therefore do not depend on the number of ranks. The run's configuration
    (model and tokenizer weights hashes, seed, classes, num_per_class, CFG, temperature, top-k / top-p) is written to
    ``out_dir/fid_config.json``; existing PNGs are kept only under the same configuration (a batch whose PNGs all
    exist is skipped), so an interrupted run resumes. A folder holding samples of another configuration, or PNGs
    without a record, is refused with the differing fields named; ``overwrite=True`` deletes those samples first
    (samples of this same configuration are still resumed, so every rank may pass it). rank / world_size default to
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
    rank, world_size = _integer(rank, "rank"), _integer(world_size, "world_size")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    num_per_class, batch_size = _integer(num_per_class, "num_per_class"), _integer(batch_size, "batch_size")
    if num_per_class <= 0 or batch_size <= 0:
        raise ValueError(f"num_per_class and batch_size must be positive, got {num_per_class}, {batch_size}")
    seed = _integer(seed, "seed")
    _check_sampling_args(cfg_scale, cfg_power, temperature, top_k, top_p)
    M = model.config.num_classes
    class_list = list(range(M)) if classes is None else [_integer(c, "classes entries") for c in classes]
    if not class_list or any(not 0 <= c < M for c in class_list):
        raise ValueError(f"classes must be labels in [0, {M})")
    _check_tokenizer(model, tokenizer)
    guided = cfg_scale is not None and float(cfg_scale) != 1.0
    # Everything an image depends on (rearlib.sample_rule: model, class, seed, settings). Batch size, ranks and the
    # sampling path are left out: the images do not depend on them.
    config = {"format": _CONFIG_FORMAT, "model": _model_identity(model), "tokenizer": _tokenizer_identity(tokenizer),
              "seed": seed, "num_per_class": num_per_class, "classes": class_list,
              "cfg_scale": float(cfg_scale) if guided else None, "cfg_power": float(cfg_power) if guided else 0.0,
              "temperature": float(temperature), "top_k": None if top_k is None else int(top_k),
              "top_p": None if top_p is None else float(top_p)}
    out_dir = Path(out_dir)
    _prepare_out_dir(out_dir, config, bool(overwrite))
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

