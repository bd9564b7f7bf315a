"""The sampling rule every path of :mod:`rearlib.sample` shares: the CFG schedule, per-image seeds and their
uniforms, the pick (CFG, temperature, top-k / top-p, Gumbel-max) and the checks of the sampling arguments.

Definitions (N = number of image tokens, K = codebook size, M = number of classes):

* **Raster next-token sampling**, one token per step, steps ``t = 0..N-1``; step ``t`` samples ``x_{t+1}``.
* **Classifier-free guidance** (docs/paper.md, reAR §1.9): the B conditional rows and B null-class rows run as one 2B
  batch; ``logits = uncond + (cond - uncond) * s_t`` with the power-cosine schedule (MDT / Zheng et al. 2023)
  ``s_t = 1 + (g - 1) * (1 - cos(pi * (t / N) ** p)) / 2``. ``p = 0`` gives a constant ``g`` (``0 ** 0 = 1``).
  ``cfg_scale`` of ``None`` or ``1.0`` switches guidance off (no doubled batch). The official code switches it
  off with ``g = 0`` instead; here ``g = 0`` is a (strange but valid) guidance value.
* Then ``logits / temperature`` (``temperature = 0``: greedy argmax), optional top-k (keep the k largest) and
  top-p (keep the smallest prefix of the sorted distribution whose mass reaches p; the top token always stays).
* **Sampling is Gumbel-max**: ``x = argmax(logits + G)``, ``G = -log(-log U)``, which is an exact draw from
  ``softmax(logits)`` restricted to the kept tokens (the official code draws the same distribution with
  ``torch.multinomial``; individual samples differ). ``U`` is pre-drawn per image from a generator seeded by
  the image's own seed, so an image depends only on (model, class, its seed, settings) - not on the batch it
  is in, the number of GPUs, or whether the KV cache is used - and the step needs no host sync.
* **Image seeds**: ``image_seed(seed, i)`` = SplitMix64(SplitMix64(seed) + i) truncated to 63 bits. ``generate``
  with ``seed=s`` gives row ``i`` the seed ``image_seed(s, i)``; FID generation uses the global image index.
"""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch
import torch.nn as nn

from rearlib.model import Generator

__all__ = ["PAPER_CFG", "cfg_scale_at", "cfg_schedule", "image_seed", "image_seeds"]

#: (g, p) of the paper's headline results [P App. A]; the released configs use 15.0 / 2.5 for B and L.
PAPER_CFG = {"rear_s": (22.0, 2.75), "rear_b": (14.5, 2.25), "rear_l": (10.0, 1.75)}


# ----------------------------------------------------------------------------------------------------------------
# CFG schedule and seeds
# ----------------------------------------------------------------------------------------------------------------
def cfg_scale_at(step: int, num_steps: int, scale: float, power: float) -> float:
    """``s_t = 1 + (g - 1) * (1 - cos(pi * (t / N) ** p)) / 2`` for step ``t`` of ``N``; ``p = 0`` -> ``g``."""
    if not 0 <= step < num_steps:
        raise ValueError(f"step must be in [0, {num_steps}), got {step}")
    if power < 0:
        raise ValueError(f"cfg power must be >= 0, got {power}")
    frac = 1.0 if power == 0 else (step / num_steps) ** power
    return 1.0 + (scale - 1.0) * (1.0 - math.cos(math.pi * frac)) / 2.0


def cfg_schedule(num_steps: int, scale: float, power: float, device=None) -> torch.Tensor:
    """float32 tensor ``[num_steps]`` of :func:`cfg_scale_at` (computed in float64)."""
    return torch.tensor([cfg_scale_at(t, num_steps, scale, power) for t in range(num_steps)],
                        dtype=torch.float64).to(device=device, dtype=torch.float32)


_MASK64 = (1 << 64) - 1


def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def image_seed(seed: int, index: int) -> int:
    """Seed of image ``index`` under run seed ``seed``: SplitMix64(SplitMix64(seed) + index) >> 1 (63 bits).

    SplitMix64 is a bijection of 64-bit integers, so distinct indices under one run seed never collide."""
    if index < 0:
        raise ValueError(f"image index must be >= 0, got {index}")
    return _splitmix64((_splitmix64(int(seed) & _MASK64) + int(index)) & _MASK64) >> 1


def image_seeds(seed: int, indices) -> list[int]:
    return [image_seed(seed, int(i)) for i in indices]


def _fill_uniform_(buf: torch.Tensor, seeds: list[int]) -> torch.Tensor:
    """Row i of ``buf`` ([B, ...] float32) <- U[0, 1) from a generator on buf's device seeded with seeds[i]."""
    for i, s in enumerate(seeds):
        g = torch.Generator(device=buf.device)
        g.manual_seed(int(s))
        buf[i].uniform_(0.0, 1.0, generator=g)
    return buf


# ----------------------------------------------------------------------------------------------------------------
# The sampling rule (pure; shared by every path, compiled on the fast path)
# ----------------------------------------------------------------------------------------------------------------
def _pick(logits: torch.Tensor, *, B: int, use_cfg: bool, scale: torch.Tensor, u: torch.Tensor,
          temperature: torch.Tensor, top_k: int | None, top_p: torch.Tensor | None, greedy: bool) -> torch.Tensor:
    """logits [R, K] float32 (R = 2B with CFG: cond rows then null rows) -> tokens [B] (int64).

    scale: [1] CFG scale of this step; u: [B, K] uniforms; temperature / top_p: 0-d tensors (so changing
    them does not recompile or re-capture); top_k: static int."""
    logits = logits.float()
    if use_cfg:
        cond, unc = logits[:B], logits[B:]
        logits = unc + (cond - unc) * scale
    if not greedy:
        logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        srt, idx = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(srt, dim=-1)
        # Mass strictly before each token; drop a token when that mass already reaches p (the top one stays).
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, idx, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    if greedy:
        return logits.argmax(-1)
    gumbel = -torch.log(-torch.log(u))  # u = 0 -> -inf (never picked); u < 1 always (uniform_ is [0, 1))
    return (logits + gumbel).argmax(-1)


def _unwrap(model) -> Generator:
    """Accept a Generator, or one wrapped by DistributedDataParallel (.module) / torch.compile (._orig_mod)."""
    for _ in range(3):
        if isinstance(model, Generator):
            return model
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            break
        model = inner
    raise TypeError(f"model must be a rearlib.model.Generator (or a DDP / torch.compile wrapper of one), "
                    f"got {type(model).__name__}")


def _scalar(value):
    """A 0-d tensor or 0-d numpy array as its Python number; anything else unchanged."""
    if (torch.is_tensor(value) or isinstance(value, np.ndarray)) and value.ndim == 0:
        return value.item()
    return value


def _finite(value, name: str, *, optional: bool = False) -> float | None:
    """``value`` as a finite float. Refused: bools and strings (``"3"`` or ``True`` would silently pass as numbers)
    and NaN / inf (a NaN guidance scale makes every logit NaN, so argmax returns token 0 everywhere; a NaN
    temperature fails both ``t > 0`` and ``t == 0``, so it silently samples at 1.0)."""
    value = _scalar(value)
    if value is None and optional:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number{' or None' if optional else ''}, got {value!r} "
                        f"({type(value).__name__})")
    if not math.isfinite(float(value)):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return float(value)


def _integer(value, name: str) -> int:
    """``value`` as an int; floats (1.5 would be truncated) and bools are refused."""
    value = _scalar(value)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    return int(value)


def _as_classes(classes, device) -> torch.Tensor:
    """Class labels as a flat int64 tensor on ``device``. Floats and bools are refused rather than cast: ``.long()``
    would turn 1.7 into class 1 and True / False into classes 1 / 0 without a word."""
    if not torch.is_tensor(classes):
        arr = np.asarray(classes)
        if arr.size == 0:
            raise ValueError("classes must be a non-empty 1-D tensor of labels, got no labels")
        if arr.dtype.kind not in "iu":
            raise TypeError(f"classes must be integer labels, got {arr.dtype} values {arr.ravel()[:4].tolist()}")
        classes = torch.as_tensor(arr)
    elif classes.is_floating_point() or classes.is_complex() or classes.dtype == torch.bool:
        raise TypeError(f"classes must be integer labels, got {classes.dtype}")
    return classes.to(device=device, dtype=torch.long).flatten()


def _check_sampling_args(cfg_scale, cfg_power, temperature, top_k, top_p) -> None:
    """The settings every sampling entry point shares (generate, generate_progressive, FID samples)."""
    _finite(cfg_scale, "cfg_scale", optional=True)
    if cfg_power is None or _finite(cfg_power, "cfg_power") < 0:
        raise ValueError(f"cfg_power must be >= 0, got {cfg_power}")
    if temperature is None or _finite(temperature, "temperature") < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    # A plain int only: top_k is a static argument of the compiled step, and True would pass as top-1.
    if top_k is not None and not (isinstance(top_k, int) and not isinstance(top_k, bool) and 1 <= top_k):
        raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
    top_p = _finite(top_p, "top_p", optional=True)
    if top_p is not None and not (0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")


def _validate_settings(model, classes, cfg_scale, cfg_power, temperature, top_k, top_p, num_tokens):
    M, N, K = model.config.num_classes, model.config.seq_len, model.config.codebook_size
    if classes.dim() != 1 or classes.numel() == 0:
        raise ValueError(f"classes must be a non-empty 1-D tensor of labels, got shape {tuple(classes.shape)}")
    if classes.is_floating_point() or classes.is_complex() or classes.dtype == torch.bool:
        raise TypeError(f"classes must be integer labels, got {classes.dtype}")
    if bool(((classes < 0) | (classes > M)).any()):
        raise ValueError(f"class labels must be in [0, {M}] ({M} = null class); got values in "
                         f"[{int(classes.min())}, {int(classes.max())}]")
    _check_sampling_args(cfg_scale, cfg_power, temperature, top_k, top_p)
    num_tokens = N if num_tokens is None else _integer(num_tokens, "num_tokens")
    if not 1 <= num_tokens <= N:
        raise ValueError(f"num_tokens must be in [1, {N}], got {num_tokens}")
    use_cfg = cfg_scale is not None and float(cfg_scale) != 1.0
    return use_cfg, num_tokens, K


def _resolve_seeds(B: int, seed, generator, image_seeds_arg) -> list[int]:
    given = (seed is not None) + (generator is not None) + (image_seeds_arg is not None)
    if given > 1:
        raise ValueError("pass at most one of seed=, generator=, image_seeds=")
    if image_seeds_arg is not None:
        raw = image_seeds_arg.tolist() if torch.is_tensor(image_seeds_arg) else image_seeds_arg
        seeds = [_integer(s, "image_seeds entries") for s in raw]
        if len(seeds) != B:
            raise ValueError(f"image_seeds has {len(seeds)} entries for {B} classes")
        return seeds
    if generator is not None:
        base = int(torch.randint(0, 2 ** 62, (1,), generator=generator).item())
        return image_seeds(base, range(B))
    return image_seeds(0 if seed is None else _integer(seed, "seed"), range(B))


def _autocast(device: torch.device, dtype: torch.dtype | None):
    enabled = dtype is not None and dtype != torch.float32
    return torch.autocast(device.type, dtype=dtype if enabled else torch.bfloat16, enabled=enabled)

