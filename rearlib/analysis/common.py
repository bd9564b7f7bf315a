"""What the four analyses share: seeds, input checks, running the model, and assembling the result frame.

Randomness. An analysis's ``generator`` (a :class:`torch.Generator` or an int seed) yields one base seed
(:func:`base_seed`); every random draw of a row is made by a CPU generator seeded with SplitMix64(base seed,
stream, image id, setting) (:func:`row_gen`), so a row depends only on (model, image, settings, seed) - not on the
batch it is in or the other settings requested (up to float round-off of batched kernels). The ``STREAM_*``
constants keep the draws of different purposes independent.

These helpers are internal to :mod:`rearlib.analysis` (not re-exported), except :func:`encode_images` and
:func:`teacher_forced_predictions`.
"""

from __future__ import annotations

import contextlib
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

# Random streams (part of every row seed, so the draws of different purposes are independent).
STREAM_NOISE, STREAM_SUBSET, STREAM_SELECT, STREAM_RANDOM_CODE, STREAM_CONTEXT, STREAM_CKA_ROWS = range(1, 7)
_MASK64 = (1 << 64) - 1


# ----------------------------------------------------------------------------------------------------------------
# Seeds
# ----------------------------------------------------------------------------------------------------------------
def _splitmix(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def row_seed(*parts: int) -> int:
    """SplitMix64 fold of integers -> a 63-bit seed (order matters; negative ints are folded mod 2**64)."""
    z = 0
    for p in parts:
        z = _splitmix(z ^ (int(p) & _MASK64))
    return z >> 1


def row_gen(*parts: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(row_seed(*parts))
    return g


def base_seed(generator) -> int:
    """One base seed from a torch.Generator (advancing it), an int seed, or None (= seed 0)."""
    if generator is None:
        return 0
    if isinstance(generator, torch.Generator):
        return int(torch.randint(0, 2 ** 62, (1,), generator=generator, device=generator.device).item())
    if isinstance(generator, (int, np.integer)) and not isinstance(generator, bool):
        return int(generator)
    raise TypeError(f"generator must be a torch.Generator, an int seed or None; got {type(generator).__name__}")


def setting_key(x: float) -> int:
    """Integer key of a setting value (ratios are keyed in millionths, so 0.3 and 0.30000000000000004 agree)."""
    return int(round(float(x) * 1_000_000))


# ----------------------------------------------------------------------------------------------------------------
# Input checks
# ----------------------------------------------------------------------------------------------------------------
def model_device(model) -> torch.device:
    return next(model.parameters()).device


def model_dims(model) -> tuple[int, int, int]:
    cfg = getattr(model, "config", None)
    if cfg is None or not all(hasattr(cfg, a) for a in ("seq_len", "codebook_size", "num_classes")):
        raise TypeError("model must be a rearlib.model.Generator (needs .config with seq_len, codebook_size, "
                        f"num_classes); got {type(model).__name__}")
    return cfg.seq_len, cfg.codebook_size, cfg.num_classes


def check_pair(model, tokenizer) -> None:
    N, K, _ = model_dims(model)
    if tokenizer is None:
        return
    if int(tokenizer.codebook_size) != K:
        raise ValueError(f"tokenizer codebook_size {tokenizer.codebook_size} != generator codebook_size {K}: "
                         f"the generator was not trained on this tokenizer's codes")
    h, w = tokenizer.grid_size
    if h * w != N:
        raise ValueError(f"tokenizer grid {h}x{w} = {h * w} tokens != generator seq_len {N}")


def check_image_count(n, what: str = "n_images") -> int:
    """``n`` as a positive int number of images. Without this, 0 images surface deep inside an analysis as an empty
    ``torch.cat`` and a negative count as a ``torch.arange`` error, neither of which names the cause."""
    if isinstance(n, (bool, np.bool_)) or not isinstance(n, (int, np.integer)):
        raise TypeError(f"{what} must be an integer number of images, got {n!r}")
    if n < 1:
        raise ValueError(f"{what}: {int(n)} images, but at least one image is needed")
    return int(n)


def flat_tokens(tokens, N: int, K: int, name: str = "tokens") -> torch.Tensor:
    if not torch.is_tensor(tokens):
        raise TypeError(f"{name} must be a LongTensor [B, N] or [B, h, w], got {type(tokens).__name__}")
    if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer token ids, got {tokens.dtype}")
    t = tokens.reshape(tokens.shape[0], -1) if tokens.ndim == 3 else tokens
    if t.ndim != 2 or t.shape[1] != N:
        raise ValueError(f"{name} must be [B, {N}] or a [B, h, w] grid with h*w = {N}; got {tuple(tokens.shape)}")
    check_image_count(t.shape[0], name)
    if int(t.min()) < 0 or int(t.max()) >= K:
        raise ValueError(f"{name} ids must be image codes in [0, {K}); got range [{int(t.min())}, {int(t.max())}]")
    return t.long()


def check_labels(labels, B: int, M: int) -> torch.Tensor:
    lab = torch.as_tensor(labels)
    if lab.dtype.is_floating_point or lab.dtype == torch.bool:
        raise TypeError(f"labels must be integer class labels, got {lab.dtype}")
    lab = lab.reshape(-1).long()
    if lab.numel() != B:
        raise ValueError(f"got {lab.numel()} labels for {B} images")
    if int(lab.min()) < 0 or int(lab.max()) > M:
        raise ValueError(f"labels must be in [0, {M}] ({M} = null class); got [{int(lab.min())}, {int(lab.max())}]")
    return lab


def check_ids(image_ids, B: int) -> list[int]:
    if image_ids is None:
        return list(range(B))
    ids = [int(i) for i in (image_ids.tolist() if torch.is_tensor(image_ids) else image_ids)]
    if len(ids) != B:
        raise ValueError(f"got {len(ids)} image_ids for {B} images")
    if len(set(ids)) != B:
        raise ValueError("image_ids must be unique (they key the random draws and identify rows)")
    return ids


def check_fracs(values, name: str, *, allow_one: bool = True) -> list[float]:
    vals = [float(v) for v in ([values] if isinstance(values, (int, float)) else values)]
    if not vals:
        raise ValueError(f"{name} is empty")
    hi_ok = (lambda v: v <= 1.0) if allow_one else (lambda v: v < 1.0)
    bad = [v for v in vals if not (0.0 <= v and hi_ok(v)) or v != v]
    if bad:
        raise ValueError(f"{name} must lie in [0, 1{']' if allow_one else ')'}; got {bad}")
    if len(set(setting_key(v) for v in vals)) != len(vals):
        raise ValueError(f"{name} has duplicates: {vals}")
    return vals


def check_choice(values, allowed: Sequence[str], name: str) -> list[str]:
    vals = [values] if isinstance(values, str) else list(values)
    bad = [v for v in vals if v not in allowed]
    if bad or not vals:
        raise ValueError(f"{name} must be a non-empty subset of {list(allowed)}; got {vals}")
    if len(set(vals)) != len(vals):
        raise ValueError(f"{name} has duplicates: {vals}")
    return vals


def check_batch_size(batch_size) -> int:
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    return batch_size


# ----------------------------------------------------------------------------------------------------------------
# Running a model, preparing inputs, assembling the result
# ----------------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def eval_mode(*modules):
    """Evaluation mode (no dropout) for the duration; restores each module's mode afterwards."""
    states = [(m, m.training) for m in modules if m is not None and hasattr(m, "training")]
    for m, _ in states:
        m.eval()
    try:
        yield
    finally:
        for m, was in states:
            m.train(was)


def maybe_autocast(device: torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` to ``dtype`` (bf16, fp16); a no-op for None or float32."""
    enabled = dtype is not None and dtype != torch.float32
    return torch.autocast(device.type, dtype=dtype if enabled else torch.bfloat16, enabled=enabled)


def progress_bar(iterable, desc: str, total: int | None, progress: bool):
    """A tqdm bar over ``iterable`` (silent when ``progress`` is false); it closes itself (``leave=False``)."""
    return tqdm(iterable, desc=desc, total=total, disable=not progress, leave=False)


@torch.no_grad()
def encode_images(tokenizer, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """``tokenizer.encode`` in batches: float images ``[B, 3, R, R]`` in [0, 1] -> LongTensor ``[B, h*w]``."""
    check_batch_size(batch_size)
    if not torch.is_tensor(images) or not images.is_floating_point() or images.ndim != 4:
        raise TypeError("images must be a float tensor [B, 3, R, R] in [0, 1]")
    check_image_count(images.shape[0], "images")
    out = [tokenizer.encode(images[s:s + batch_size]).reshape(min(batch_size, len(images) - s), -1)
           for s in range(0, len(images), batch_size)]
    return torch.cat(out)


def prepare(model, tokenizer, data, labels, images, image_ids, batch_size):
    """-> tokens [B, N] (model device), labels [B] (model device), real images [B,3,R,R] or None, ids."""
    N, K, M = model_dims(model)
    check_pair(model, tokenizer)
    dev = model_device(model)
    if not torch.is_tensor(data):
        raise TypeError("data must be float images [B, 3, R, R] in [0, 1] or integer tokens [B, N] / [B, h, w]")
    if data.ndim:
        check_image_count(data.shape[0], "data")
    if data.is_floating_point():
        if images is not None:
            raise ValueError("data are images already; pass images= only together with token data")
        if tokenizer is None:
            raise ValueError("image data need a tokenizer to encode them")
        images = data
        tokens = encode_images(tokenizer, images, batch_size)
    else:
        tokens = data
    tokens = flat_tokens(tokens, N, K).to(dev)
    B = tokens.shape[0]
    if images is not None:
        if not torch.is_tensor(images) or not images.is_floating_point() or images.ndim != 4 or images.shape[0] != B:
            raise ValueError(f"images must be float [B={B}, 3, R, R] in [0, 1]; got "
                             f"{tuple(images.shape) if torch.is_tensor(images) else type(images).__name__}")
        if tokenizer is not None and tuple(images.shape[-2:]) != (tokenizer.resolution, tokenizer.resolution):
            raise ValueError(f"images are {tuple(images.shape[-2:])}, the tokenizer decodes "
                             f"{tokenizer.resolution}x{tokenizer.resolution}")
    return tokens, check_labels(labels, B, M).to(dev), images, check_ids(image_ids, B)


@torch.no_grad()
def teacher_forced_predictions(model, tokens: torch.Tensor, labels: torch.Tensor, *, batch_size: int = 64,
                               dtype: torch.dtype | None = None, return_log_probs: bool = False):
    """Teacher forcing on ``tokens`` ([B, N]): argmax predictions ``x̂_t = argmax p_θ(· | x_{<t})`` [B, N], and with
    ``return_log_probs`` the log-softmax ``[B, N, K]`` (float32, model device). Eval mode."""
    N, K, M = model_dims(model)
    dev = model_device(model)
    tokens = flat_tokens(tokens, N, K).to(dev)
    labels = check_labels(labels, tokens.shape[0], M).to(dev)
    preds, lps = [], []
    with eval_mode(model), maybe_autocast(dev, dtype):
        for s in range(0, tokens.shape[0], check_batch_size(batch_size)):
            logits = model(tokens[s:s + batch_size], labels[s:s + batch_size]).logits.float()
            preds.append(logits.argmax(-1))
            if return_log_probs:
                lps.append(torch.log_softmax(logits, dim=-1))
    pred = torch.cat(preds)
    return (pred, torch.cat(lps)) if return_log_probs else pred


def finish_frame(records: list[dict], scorer, constants: dict) -> pd.DataFrame:
    """The analysis result: one row per record, the image-metric columns of ``scorer`` (a
    :class:`rearlib.analysis.scoring.Scorer`, or None) filled with NaN where nothing was computed, the name of
    the perceptual metric, and ``constants`` as columns shared by every row."""
    df = pd.DataFrame.from_records(records)
    if scorer is not None:
        for c in scorer.columns:
            if c not in df:
                df[c] = float("nan")
        df["perceptual_metric"] = scorer.metric_name
    for k, v in constants.items():
        df[k] = v
    return df
