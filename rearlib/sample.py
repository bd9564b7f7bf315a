"""Sampling from a :class:`rearlib.model.Generator`: CFG schedule, KV-cached decoding, sharded FID samples.

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

Fast path (CUDA; gpt-fast's recipe): a bf16-weight copy of the model under bf16 autocast (the residual stream,
norms and the head stay float32), a static :class:`rearlib.model.KVCache` written by index, the one-token decode
step (model + CFG + sampling + writing the token) compiled with ``torch.compile`` and captured as CUDA graphs -
one per attention-window bucket, so early steps do not read the whole cache - replayed 255 times per batch with
no host synchronisation. CPU (and ``fast=False``) runs the same step eagerly in a plain loop; ``use_cache=False``
is the authors' evaluation behaviour (recompute the whole prefix every step), kept as a reference.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
import weakref
from pathlib import Path

import torch
import torch.nn as nn

from rearlib.runtime import tf32
from rearlib.kernels.ops import register_ops, triton_available
from rearlib.model import Generator
from rearlib import scales

__all__ = [
    "PAPER_CFG", "cfg_scale_at", "cfg_schedule", "image_seed", "image_seeds", "generate",
    "generate_fid_samples", "merge_fid_samples", "benchmark_sampling", "clear_sampler_cache", "last_fast_path_info",
]

#: (g, p) of the paper's headline results [P App. A]; the released configs use 15.0 / 2.5 for B and L.
PAPER_CFG = {"rear_s": (22.0, 2.75), "rear_b": (14.5, 2.25), "rear_l": (10.0, 1.75)}

H200_BANDWIDTH = 4.8e12  # bytes/s, HBM3e peak of one H200


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


def _validate_settings(model, classes, cfg_scale, cfg_power, temperature, top_k, top_p, num_tokens):
    M, N, K = model.config.num_classes, model.config.seq_len, model.config.codebook_size
    if classes.dim() != 1 or classes.numel() == 0:
        raise ValueError(f"classes must be a non-empty 1-D tensor of labels, got shape {tuple(classes.shape)}")
    if classes.is_floating_point():
        raise ValueError(f"classes must be integer labels, got {classes.dtype}")
    if bool(((classes < 0) | (classes > M)).any()):
        raise ValueError(f"class labels must be in [0, {M}] ({M} = null class); got values in "
                         f"[{int(classes.min())}, {int(classes.max())}]")
    if cfg_power is None or cfg_power < 0:
        raise ValueError(f"cfg_power must be >= 0, got {cfg_power}")
    if temperature is None or temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and not (isinstance(top_k, int) and 1 <= top_k):
        raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
    if top_p is not None and not (0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")
    num_tokens = N if num_tokens is None else int(num_tokens)
    if not 1 <= num_tokens <= N:
        raise ValueError(f"num_tokens must be in [1, {N}], got {num_tokens}")
    use_cfg = cfg_scale is not None and float(cfg_scale) != 1.0
    return use_cfg, num_tokens, K


def _resolve_seeds(B: int, seed, generator, image_seeds_arg) -> list[int]:
    given = (seed is not None) + (generator is not None) + (image_seeds_arg is not None)
    if given > 1:
        raise ValueError("pass at most one of seed=, generator=, image_seeds=")
    if image_seeds_arg is not None:
        seeds = [int(s) for s in (image_seeds_arg.tolist() if torch.is_tensor(image_seeds_arg) else image_seeds_arg)]
        if len(seeds) != B:
            raise ValueError(f"image_seeds has {len(seeds)} entries for {B} classes")
        return seeds
    if generator is not None:
        base = int(torch.randint(0, 2 ** 62, (1,), generator=generator).item())
        return image_seeds(base, range(B))
    return image_seeds(0 if seed is None else int(seed), range(B))


def _autocast(device: torch.device, dtype: torch.dtype | None):
    enabled = dtype is not None and dtype != torch.float32
    return torch.autocast(device.type, dtype=dtype if enabled else torch.bfloat16, enabled=enabled)


# ----------------------------------------------------------------------------------------------------------------
# Public entry point
# ----------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def generate(model: Generator, classes, *, cfg_scale: float | None = None, cfg_power: float = 0.0,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             seed: int | None = None, generator: torch.Generator | None = None, image_seeds=None,
             use_cache: bool = True, fast: bool | str | None = None, dtype: torch.dtype | None = None,
             num_tokens: int | None = None, kv_buckets: int = 4, decode_attention: str | None = None,
             deterministic: bool = False, progress: bool = False) -> torch.Tensor:
    """Sample token sequences ``[B, num_tokens]`` (default N) for class labels ``classes`` ([B], in [0, M]).

    cfg_scale / cfg_power: guidance g and schedule power p (``None`` or 1.0 = no guidance). temperature: 1.0 as
    the paper, 0 = greedy. top_k / top_p: optional filters. Randomness: ``seed`` (row i gets
    ``image_seed(seed, i)``), or ``generator`` (draws the run seed), or explicit ``image_seeds`` ([B] ints).
    use_cache=False: recompute the whole prefix every step (the authors' evaluation path; slow reference).
    fast: None = automatic (CUDA -> compiled CUDA-graph step, CPU -> plain loop); "graph" = CUDA graphs without
    torch.compile; False = plain eager loop. dtype: compute dtype (default bf16 on CUDA, float32 on CPU).
    decode_attention: the fast path's attention kernel (``rearlib.model.DECODE_ATTENTION``; default on CUDA when
    compiled: "triton" (one CUDA graph, ``kv_buckets`` unused), else "flex"; "sdpa" when not compiled); the plain
    loop always uses SDPA. kv_buckets: attention-window buckets (one CUDA graph each) for the other kernels.
    deterministic: compile the fast step in Inductor's deterministic mode (fixed reduction configs instead of
    per-process benchmarking, which can change round-off and so flip a sampled token between processes); FID
    sample generation turns it on. The measured speeds in the README are with it off.
    The model runs in eval mode (its mode is restored afterwards). Returns int64 tokens on the model's device.
    """
    model = _unwrap(model)
    device = model.pos_embed.device
    classes = torch.as_tensor(classes, device=device).long().flatten()
    use_cfg, n_tok, K = _validate_settings(model, classes, cfg_scale, cfg_power, temperature, top_k, top_p,
                                           num_tokens)
    seeds = _resolve_seeds(classes.numel(), seed, generator, image_seeds)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if fast is None:
        fast = device.type == "cuda"
    if fast and device.type != "cuda":
        fast = False  # CUDA graphs do not exist on CPU; the plain loop computes the same thing
    if fast and not use_cache:
        raise ValueError("the fast path is the cached one; use_cache=False needs fast=False")
    was_training = model.training
    model.eval()
    try:
        settings = dict(use_cfg=use_cfg, cfg_scale=float(cfg_scale) if use_cfg else 1.0, cfg_power=float(cfg_power),
                        temperature=float(temperature), top_k=top_k, top_p=top_p, num_tokens=n_tok)
        if fast:
            dec = _get_fast_decoder(model, classes.numel(), use_cfg=use_cfg, top_k=top_k, top_p_on=top_p is not None,
                                    greedy=temperature == 0, dtype=dtype, compile_step=(fast != "graph"),
                                    kv_buckets=kv_buckets, attention=decode_attention,
                                    deterministic=bool(deterministic))
            return dec.run(classes, seeds, settings)
        return _plain_generate(model, classes, seeds, settings, dtype=dtype, use_cache=use_cache,
                               kv_buckets=kv_buckets, progress=progress)
    finally:
        model.train(was_training)


def _buckets(n_positions: int, kv_buckets: int) -> list[int]:
    """Static attention-window sizes (multiples of 8 where possible, the last = n_positions)."""
    kv_buckets = max(1, int(kv_buckets))
    out = sorted({min(n_positions, int(math.ceil(n_positions * j / kv_buckets / 8.0)) * 8)
                  for j in range(1, kv_buckets + 1)} | {n_positions})
    return out


def _bucket_for(need: int, buckets: list[int]) -> int:
    return next(b for b in buckets if b >= need)


def _plain_generate(model, classes, seeds, st, *, dtype, use_cache, kv_buckets, progress):
    out = None
    for _, out in _plain_steps(model, classes, seeds, st, dtype=dtype, use_cache=use_cache, kv_buckets=kv_buckets,
                               progress=progress):
        pass
    return out


def _plain_steps(model, classes, seeds, st, *, dtype, use_cache, kv_buckets, progress):
    """The plain sampling loop as a generator: yields (tokens done, out [B, n_tok]) after every token (the same
    tensor, filled in place). Autocast is entered per step, so it never leaks into the consumer's code."""
    device = model.pos_embed.device
    B, N, K, n_tok = classes.numel(), model.config.seq_len, model.config.codebook_size, st["num_tokens"]
    use_cfg = st["use_cfg"]
    rows = torch.cat([classes, torch.full_like(classes, model.null_class)]) if use_cfg else classes
    scales = cfg_schedule(N, st["cfg_scale"], st["cfg_power"], device)
    u = _fill_uniform_(torch.empty(B, n_tok, K, device=device), seeds)
    temp = torch.tensor(st["temperature"] if st["temperature"] > 0 else 1.0, device=device)
    top_p = None if st["top_p"] is None else torch.tensor(float(st["top_p"]), device=device)
    pick = dict(B=B, use_cfg=use_cfg, temperature=temp, top_k=st["top_k"], top_p=top_p,
                greedy=st["temperature"] == 0)
    out = torch.empty(B, n_tok, dtype=torch.long, device=device)
    steps = range(n_tok)
    if progress:
        from tqdm.auto import tqdm
        steps = tqdm(steps, desc="sampling", leave=False)
    if use_cache:
        cache = model.new_kv_cache(rows.numel(), N + 1, dtype=dtype)
        buckets = _buckets(N + 1, kv_buckets)
    for t in steps:
        with torch.no_grad(), _autocast(device, dtype):
            if not use_cache:  # reference: recompute [CLS, class, x_1..x_t]
                prefix = out[:, :t]
                logits = model.next_token_logits(torch.cat([prefix, prefix]) if use_cfg else prefix, rows)
            elif t == 0:
                logits = model.prefill(out[:, :0].repeat(2 if use_cfg else 1, 1), rows, cache)
            else:
                tok = out[:, t - 1]
                pos = torch.full((1,), t + 1, dtype=torch.long, device=device)
                logits = model.decode_step(torch.cat([tok, tok]) if use_cfg else tok, pos, rows, cache,
                                           kv_len=_bucket_for(t + 2, buckets))
            out[:, t] = _pick(logits, scale=scales[t:t + 1], u=u[:, t], **pick)
        yield t + 1, out


def generate_progressive(model: Generator, classes, *, every: int = 32, cfg_scale: float | None = None,
                         cfg_power: float = 0.0, temperature: float = 1.0, top_k: int | None = None,
                         top_p: float | None = None, seed: int | None = None, image_seeds=None,
                         num_tokens: int | None = None, dtype: torch.dtype | None = None, kv_buckets: int = 4):
    """:func:`generate`'s plain cached loop, yielding ``(n_done, tokens [B, n_tok])`` every ``every`` tokens and at
    the end (positions >= n_done are not sampled yet). Same settings and random numbers as ``generate(...,
    fast=False)``, so the last yield equals its result; for live displays (e.g. rearlib.teaching on a CPU)."""
    model = _unwrap(model)
    device = model.pos_embed.device
    if int(every) < 1:
        raise ValueError(f"every must be >= 1, got {every!r}")
    classes = torch.as_tensor(classes, device=device).long().flatten()
    use_cfg, n_tok, K = _validate_settings(model, classes, cfg_scale, cfg_power, temperature, top_k, top_p,
                                           num_tokens)
    seeds = _resolve_seeds(classes.numel(), seed, None, image_seeds)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    settings = dict(use_cfg=use_cfg, cfg_scale=float(cfg_scale) if use_cfg else 1.0, cfg_power=float(cfg_power),
                    temperature=float(temperature), top_k=top_k, top_p=top_p, num_tokens=n_tok)
    was_training = model.training
    model.eval()
    try:
        for done, out in _plain_steps(model, classes, seeds, settings, dtype=dtype, use_cache=True,
                                      kv_buckets=kv_buckets, progress=False):
            if done % int(every) == 0 or done == n_tok:
                yield done, out.clone()
    finally:
        model.train(was_training)


# ----------------------------------------------------------------------------------------------------------------
# Fast path: compiled decode step captured as CUDA graphs
# ----------------------------------------------------------------------------------------------------------------
def _inference_copy(model: Generator, dtype: torch.dtype) -> Generator:
    """Eval-mode copy whose block Linear weights are stored in ``dtype`` (read once per step instead of being
    cast from float32 by autocast every step); embeddings, norms and the float32 head stay float32."""
    net = copy.deepcopy(model).eval().requires_grad_(False)
    for blk in net.blocks:
        for m in blk.modules():
            if isinstance(m, nn.Linear):
                m.to(dtype)
    if net.config.tied_codebook:
        net.codebook_in.to(dtype)
    return net


def _param_fingerprint(model: nn.Module) -> tuple:
    return tuple((p.data_ptr(), p._version) for p in model.parameters())


def _step_fn(net, cache_k, cache_v, tok, pos, cls, scales, noise, out, temp, top_p, adaln, *,
             kv_len, B, use_cfg, top_k, greedy, autocast_dtype, device_type, attention="sdpa"):
    """One decode step on static buffers: feed tok at sequence position pos (= t + 1), sample x_{t+1},
    write it to out[:, t] and to tok (both halves under CFG). Everything stays on the device."""
    cache = _CacheLists(cache_k, cache_v)
    with torch.autocast(device_type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        logits = net.decode_step(tok, pos, cls, cache, kv_len=kv_len, attention=attention, block_adaln=adaln)
    step = pos - 1
    new = _pick(logits, B=B, use_cfg=use_cfg, scale=scales.index_select(0, step),
                u=noise.index_select(1, step)[:, 0], temperature=temp, top_k=top_k, top_p=top_p, greedy=greedy)
    out.index_copy_(1, step, new[:, None])
    tok.copy_(torch.cat([new, new]) if use_cfg else new)


class _CacheLists:
    """Duck-typed KVCache view over lists of tensors (what decode_step reads: k, v, max_len)."""

    def __init__(self, k, v):
        self.k, self.v, self.max_len = k, v, k[0].shape[2]


class _FastDecoder:
    """Static buffers + per-bucket CUDA graphs for one (model, batch, settings) combination.

    ``use_graphs=False`` (the default off CUDA) calls the (optionally compiled) step directly - used by the CPU
    tests to check the compiled step and the static-buffer logic without a GPU."""

    def __init__(self, model: Generator, B: int, *, use_cfg: bool, top_k, top_p_on: bool, greedy: bool,
                 dtype: torch.dtype, compile_step: bool, kv_buckets: int, compile_backend: str = "inductor",
                 use_graphs: bool | None = None, attention: str | None = None, fuse_adaln: bool = True,
                 compile_mode: str | None = None, deterministic: bool = False):
        dev = model.pos_embed.device
        cfg = model.config
        N, K = cfg.seq_len, cfg.codebook_size
        R = 2 * B if use_cfg else B
        self.model_ref = weakref.ref(model)
        self.B, self.R, self.N, self.K, self.use_cfg, self.dtype = B, R, N, K, use_cfg, dtype
        self.greedy = greedy
        self.net = _inference_copy(model, dtype)
        self.fingerprint = _param_fingerprint(model)
        self.cache = self.net.new_kv_cache(R, N + 1, dtype=dtype)
        # All blocks' adaLN modulations in one GEMM per step (Generator.stacked_block_adaln).
        self.adaln = self.net.stacked_block_adaln() if fuse_adaln else None
        self.tok = torch.zeros(R, dtype=torch.long, device=dev)
        self.pos = torch.full((1,), 2, dtype=torch.long, device=dev)
        self.cls = torch.zeros(R, dtype=torch.long, device=dev)
        self.scales = torch.ones(N, device=dev)
        self.noise = torch.full((B, N, K), 0.5, device=dev)
        self.out = torch.zeros(B, N, dtype=torch.long, device=dev)
        self.temp = torch.ones((), device=dev)
        self.top_p = torch.ones((), device=dev) if top_p_on else None
        self.buckets = _buckets(N + 1, kv_buckets)
        if attention is None:
            # Measured on an H200 (reAR-B, batch 128, CFG; reports/small/bench/): our Triton kernel 262 img/s,
            # FlexAttention 199 (16 window buckets), fused reductions 161 and SDPA 149 (4 buckets) in the compiled
            # step; eagerly SDPA is the fastest.
            gpu_default = "triton" if triton_available() else "flex"
            attention = (gpu_default if dev.type == "cuda" else "reduce") if compile_step else "sdpa"
        if attention == "flex" and not (compile_step and dev.type == "cuda"):
            raise ValueError("attention='flex' needs a CUDA device and compile_step=True")
        if attention == "triton":
            if dev.type != "cuda" or not triton_available():
                raise ValueError("attention='triton' needs a CUDA device and Triton")
            register_ops()  # before the step is compiled
            self.buckets = [N + 1]  # the kernel reads exactly [0, pos]: one window (one graph) serves every step
        self.attention = attention
        self.static = dict(B=B, use_cfg=use_cfg, top_k=top_k, greedy=greedy, device_type=dev.type,
                           autocast_dtype=None if dtype == torch.float32 else dtype, attention=attention)
        self.device_type = dev.type
        fn = _step_fn
        if compile_step:
            import torch._dynamo as dynamo  # (a bare "import torch._dynamo" would rebind torch locally)
            # Each (batch, settings) combination and the symbolic-window recompile add cache entries for the one
            # _step_fn code object; the default limit (8) would silently fall back to eager in long sessions.
            cfg_dyn = dynamo.config
            cfg_dyn.cache_size_limit = max(cfg_dyn.cache_size_limit, 64)
            # Inductor's deterministic mode: otherwise each process benchmarks reduction configs (block size,
            # warps) and keeps the fastest, which changes the summation order. On two H200s one rank's images
            # then differed from a one-process run in 96 of 150 cases (token flips; each process was consistent
            # with its own cache). (mode= and options= exclude each other in torch.compile.)
            import torch._inductor.config as inductor_cfg
            if deterministic and (compile_mode is not None or not hasattr(inductor_cfg, "deterministic")):
                raise ValueError("deterministic=True needs compile_mode=None and a torch with Inductor's "
                                 "deterministic mode")
            opts = {"deterministic": True} if deterministic and compile_backend == "inductor" else None
            fn = torch.compile(_step_fn, fullgraph=True, backend=compile_backend, mode=compile_mode, options=opts)
        self.fn = fn
        self.use_graphs = (dev.type == "cuda") if use_graphs is None else use_graphs
        if self.use_graphs and dev.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.capture_seconds = self._capture() if self.use_graphs else 0.0
        self.mode = {(True, True): "compiled+graphs", (False, True): "graphs", (True, False): "compiled",
                     (False, False): "eager"}[(compile_step, self.use_graphs)] + f" ({attention} attention)"

    def _args(self):
        return (self.net, self.cache.k, self.cache.v, self.tok, self.pos, self.cls, self.scales, self.noise,
                self.out, self.temp, self.top_p, self.adaln)

    def _capture(self) -> float:
        """Warm up (compiles) and capture one graph per bucket. The warm-up writes garbage into the cache and
        buffers; every generation rewrites them from scratch (prefill, then each step writes before it reads)."""
        t0 = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for kv in self.buckets:
                self.pos.fill_(kv - 1)
                for _ in range(2):
                    self.fn(*self._args(), kv_len=kv, **self.static)
        torch.cuda.current_stream().wait_stream(s)
        torch.cuda.synchronize()
        for kv in self.buckets:
            g = torch.cuda.CUDAGraph()
            self.pos.fill_(kv - 1)
            with torch.cuda.graph(g, pool=pool):
                self.fn(*self._args(), kv_len=kv, **self.static)
            self.graphs[kv] = g
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    def _refresh_weights(self, model: Generator) -> None:
        fp = _param_fingerprint(model)
        if fp != self.fingerprint:  # copy in place: the graphs keep pointing at the same storage
            for p_fast, p in zip(self.net.parameters(), model.parameters()):
                p_fast.copy_(p)
            for b_fast, b in zip(self.net.buffers(), model.buffers()):
                b_fast.copy_(b)
            if self.adaln is not None:
                for t_fast, t in zip(self.adaln, self.net.stacked_block_adaln()):
                    t_fast.copy_(t)
            self.fingerprint = fp

    def run(self, classes: torch.Tensor, seeds: list[int], st: dict) -> torch.Tensor:
        model = self.model_ref()
        self._refresh_weights(model)
        B, N, n_tok = self.B, self.N, st["num_tokens"]
        net = self.net
        self.cls[:B].copy_(classes)
        if self.use_cfg:
            self.cls[B:].fill_(net.null_class)
            self.scales.copy_(cfg_schedule(N, st["cfg_scale"], st["cfg_power"], classes.device))
        self.temp.fill_(st["temperature"] if st["temperature"] > 0 else 1.0)
        if self.top_p is not None:
            self.top_p.fill_(float(st["top_p"]))
        _fill_uniform_(self.noise[:, :n_tok], seeds)
        # Prefill [CLS, class] eagerly (one call per batch), sample x_1.
        with _autocast(classes.device, self.dtype):
            logits = net.prefill(self.out[:, :0].repeat(2 if self.use_cfg else 1, 1), self.cls, self.cache)
        first = _pick(logits, B=B, use_cfg=self.use_cfg, scale=self.scales[:1], u=self.noise[:, 0],
                      temperature=self.temp, top_k=self.static["top_k"], top_p=self.top_p, greedy=self.greedy)
        self.out[:, 0] = first
        self.tok.copy_(torch.cat([first, first]) if self.use_cfg else first)
        for t in range(1, n_tok):  # replay; the only host work is one fill_ kernel launch per step
            self.pos.fill_(t + 1)
            kv = _bucket_for(t + 2, self.buckets)
            if self.use_graphs:
                self.graphs[kv].replay()
            else:
                self.fn(*self._args(), kv_len=kv, **self.static)
        return self.out[:, :n_tok].clone()


_FAST_DECODERS: dict = {}
_MAX_DECODERS = 2


_LAST_FAST: dict = {}


def _get_fast_decoder(model, B, **key) -> _FastDecoder:
    for dead in [k for k, d in _FAST_DECODERS.items() if d.model_ref() is None]:
        del _FAST_DECODERS[dead]  # its model is gone: free the copy, cache and graphs
    k = (id(model), B, tuple(sorted(key.items())))
    dec = _FAST_DECODERS.get(k)
    if dec is None or dec.model_ref() is not model:
        while len(_FAST_DECODERS) >= _MAX_DECODERS:
            _FAST_DECODERS.pop(next(iter(_FAST_DECODERS)))
        try:
            dec = _FastDecoder(model, B, **key)
        except Exception as e:  # e.g. no Triton / compiler on the box: keep sampling, but say so loudly
            if not key.get("compile_step"):
                raise
            import warnings

            att = key.get("attention")
            fallbacks = [{"deterministic": False}] if key.get("deterministic") else []
            if att in (None, "triton"):
                fallbacks.append({"attention": "flex"})
            if att in (None, "triton", "flex"):
                fallbacks.append({"attention": "reduce"})
            fallbacks.append({"compile_step": False, "attention": None})
            for fb in fallbacks:
                warnings.warn(f"the compiled decode step failed ({type(e).__name__}: {str(e)[:300]}); falling back "
                              f"to {fb} (slower)", RuntimeWarning)
                try:
                    dec = _FastDecoder(model, B, **{**key, **fb})
                    break
                except Exception as e2:  # noqa: PERF203 - a few tries at most
                    e = e2
            else:
                raise e
    _FAST_DECODERS[k] = _FAST_DECODERS.pop(k, dec)  # most recently used last
    _LAST_FAST.clear()
    _LAST_FAST.update(mode=dec.mode, attention=dec.attention, buckets=list(dec.buckets),
                      capture_seconds=dec.capture_seconds)
    return dec


def last_fast_path_info() -> dict:
    """What the last fast-path ``generate`` actually ran: mode ("compiled+graphs", "graphs", "compiled", "eager"),
    its attention kernel, attention-window buckets and the compile+capture time of its decoder (0 when it was
    reused)."""
    return dict(_LAST_FAST)


def clear_sampler_cache() -> None:
    """Free the cached fast decoders (model copies, KV caches, CUDA graphs)."""
    _FAST_DECODERS.clear()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------------------------
# Sharded FID sample generation
# ----------------------------------------------------------------------------------------------------------------
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
    from PIL import Image
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
        from tqdm.auto import tqdm
        it = tqdm(batches, desc=f"FID samples (rank {rank}/{world_size})")
    from concurrent.futures import ThreadPoolExecutor
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
    import numpy as np
    from PIL import Image
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


# ----------------------------------------------------------------------------------------------------------------
# Benchmark
# ----------------------------------------------------------------------------------------------------------------
def _decode_bytes_per_step(model: Generator, rows: int, kv_len: float, dtype: torch.dtype) -> float:
    """Bytes a decode step must move at least: block weights (in ``dtype``) + float32 head + the K/V window
    read (rows x layers x 2 x kv_len x C) + one K/V position written."""
    cfg = model.config
    el = torch.empty((), dtype=dtype).element_size()
    block_w = sum(p.numel() for n, p in model.named_parameters() if n.startswith("blocks.") and p.dim() == 2)
    head_w = sum(p.numel() for n, p in model.named_parameters()
                 if n.startswith(("adaln_before_head.", "lm_head.")))
    kv = rows * cfg.depth * 2 * (kv_len + 1) * cfg.hidden * el
    return block_w * el + head_w * 4 + kv


def benchmark_sampling(model: Generator, batch_size: int, *, cfg: bool = True, steps: int | None = None,
                       warmup: int = 1, repeats: int = 3, modes=None, cfg_scale: float = 4.0, cfg_power: float = 0.0,
                       kv_buckets: int = 4, seed: int = 0) -> dict:
    """Time token generation (tokenizer decoding excluded) for ``batch_size`` images with each path in ``modes``.

    modes: subset of ("fast", "fast-sdpa", "fast-flex", "fast-triton", "fast-deterministic", "graph", "cached",
    "no_cache"); default ("fast", "fast-triton", "graph", "cached", "no_cache") where available ("fast*" and "graph"
    need CUDA). "fast" is the compiled CUDA-graph step with its default attention kernel, "fast-sdpa" /
    "fast-flex" the same step with that kernel instead, "fast-deterministic" the step compiled in Inductor's
    deterministic mode as FID generation uses it (``generate(deterministic=True)``). steps: tokens per image
    (default N); images/s is extrapolated to N tokens when
    steps < N (``images_per_s_full``). Reports per mode: seconds per batch (median over ``repeats`` after
    ``warmup`` untimed runs, which include compilation/capture), ms/step, images/s, peak memory, and for the
    cached GPU paths the achieved bandwidth = (bytes a step must move, :func:`_decode_bytes_per_step`, at the
    mean attention window) / (time per step), also as a fraction of the H200's 4.8 TB/s.
    """
    model = _unwrap(model)
    device = model.pos_embed.device
    N = model.config.seq_len
    steps = N if steps is None else int(steps)
    avail = (("fast", "fast-sdpa", "fast-flex", "fast-triton", "fast-deterministic", "graph", "cached", "no_cache")
             if device.type == "cuda" else ("cached", "no_cache"))
    optional = ("fast-sdpa", "fast-flex", "fast-deterministic")
    modes = tuple(m for m in avail if m not in optional) if modes is None else tuple(modes)
    bad = [m for m in modes if m not in avail]
    if bad:
        raise ValueError(f"modes {bad} not available on {device.type}; available: {avail}")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    classes = torch.arange(batch_size, device=device) % model.config.num_classes
    kw = dict(cfg_scale=cfg_scale if cfg else None, cfg_power=cfg_power, seed=seed, num_tokens=steps,
              kv_buckets=kv_buckets, dtype=dtype)
    rows = 2 * batch_size if cfg else batch_size
    result = {"device": str(torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"),
              "batch_size": batch_size, "cfg": cfg, "steps": steps, "seq_len": N, "dtype": str(dtype),
              "params": sum(p.numel() for p in model.parameters()), "modes": {}}
    buckets = _buckets(N + 1, kv_buckets)
    mean_window = sum(_bucket_for(t + 2, buckets) for t in range(1, steps)) / max(1, steps - 1)
    exact_window = sum(t + 2 for t in range(1, steps)) / max(1, steps - 1)
    tokens_by_mode = {}
    for mode in modes:
        mkw = dict(kw, fast={"graph": "graph", "cached": False, "no_cache": False}.get(mode, True),
                   use_cache=mode != "no_cache")
        if mode == "fast-deterministic":
            mkw["deterministic"] = True
        elif mode.startswith("fast-"):
            mkw["decode_attention"] = mode.split("-", 1)[1]
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(device)
        t_setup = time.perf_counter()
        for _ in range(max(0, warmup)):
            tokens_by_mode[mode] = generate(model, classes, **mkw)
        if device.type == "cuda":
            torch.cuda.synchronize()
        setup = time.perf_counter() - t_setup
        times = []
        for _ in range(max(1, repeats)):
            t0 = time.perf_counter()
            tokens_by_mode[mode] = generate(model, classes, **mkw)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        sec = sorted(times)[len(times) // 2]
        r = {"seconds_per_batch": sec, "ms_per_step": 1e3 * sec / steps, "images_per_s": batch_size / sec,
             "images_per_s_full": batch_size / (sec * N / steps), "warmup_seconds": setup}
        fast_info = last_fast_path_info() if mode.startswith("fast") or mode == "graph" else {}
        if fast_info:
            r["path"] = fast_info.get("mode")
        if device.type == "cuda":
            r["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
            if mode != "no_cache":
                # the Triton kernel reads exactly the prefix; the other kernels read their bucket's window
                window = exact_window if fast_info.get("attention") == "triton" else mean_window
                bps = _decode_bytes_per_step(model, rows, window, dtype)
                bw = bps / (sec / steps)
                r.update(bytes_per_step=bps, achieved_bandwidth_tb_s=bw / 1e12, fraction_of_h200_bw=bw / H200_BANDWIDTH)
        result["modes"][mode] = r
    if len(tokens_by_mode) > 1:
        ref = next(iter(tokens_by_mode.values()))
        result["token_agreement_vs_first_mode"] = {
            m: float((t == ref).float().mean()) for m, t in tokens_by_mode.items()}
    return result


# ----------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    from rearlib.model import build_generator, load_official_state_dict
    ap = argparse.ArgumentParser(prog="python -m rearlib sample", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("benchmark", help="time sampling paths (random weights unless --checkpoint)")
    b.add_argument("--preset", default="rear_b")
    b.add_argument("--checkpoint", default=None, help="official-layout state dict (loaded strictly)")
    b.add_argument("--batch-size", type=int, default=128)
    b.add_argument("--no-cfg", action="store_true")
    b.add_argument("--steps", type=int, default=None)
    b.add_argument("--repeats", type=int, default=3)
    b.add_argument("--modes", default=None, help="comma list of fast,graph,cached,no_cache")
    b.add_argument("--kv-buckets", type=int, default=4)
    b.add_argument("--device", default="auto")
    b.add_argument("--out", default=None, help="write the result JSON here (atomically)")
    f = sub.add_parser("fid", help="sharded FID sample generation (PNGs + ADM npz); works under torchrun")
    f.add_argument("--generator", required=True,
                   help="rearlib.train model.pt / checkpoint.pt, or an official-layout state dict (see --preset)")
    f.add_argument("--preset", default=None, help="preset of an official state dict (default: infer from shapes)")
    f.add_argument("--scale", required=True, help="tokenizer scale: smoke | small | paper")
    f.add_argument("--tokenizer", default=None, help="tokenizer checkpoint path (default: the scale's)")
    f.add_argument("--num-per-class", type=int, default=None, help="default: scales.SAMPLING[scale]['num_per_class']")
    f.add_argument("--out", required=True)
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--batch-size", type=int, default=None)
    f.add_argument("--cfg-scale", type=float, default=None)
    f.add_argument("--cfg-power", type=float, default=None)
    f.add_argument("--temperature", type=float, default=1.0)
    f.add_argument("--ema", action="store_true", help="use the EMA weights of a rearlib.train checkpoint")
    a = ap.parse_args(argv)
    if a.cmd == "fid":
        _fid_cli(a)
    if a.cmd == "benchmark":
        device = torch.device("cuda" if (a.device == "auto" and torch.cuda.is_available()) else
                              ("cpu" if a.device == "auto" else a.device))
        if a.checkpoint:
            model = load_official_state_dict(a.checkpoint, a.preset, device=device)
        else:
            torch.manual_seed(0)
            model = build_generator(a.preset).to(device)
            # A fresh model has zero adaLN outputs (identity blocks); give every parameter random values so
            # the benchmark exercises a realistic, non-degenerate function (speed does not depend on values).
            with torch.no_grad():
                for p in model.parameters():
                    p.normal_(0.0, 0.02)
        res = benchmark_sampling(model, a.batch_size, cfg=not a.no_cfg, steps=a.steps, repeats=a.repeats,
                                 modes=None if a.modes is None else a.modes.split(","), kv_buckets=a.kv_buckets)
        res["preset"] = a.preset
        text = json.dumps(res, indent=2)
        print(text)
        if a.out:
            from rearlib.runtime import atomic_write_text
            atomic_write_text(a.out, text)


def _load_any_generator(path: str, preset, device, *, ema: bool = False):
    """A rearlib.train model/checkpoint, a shipped rearlib.experiments.zoo generator, or an official-layout state dict."""
    from rearlib.model import load_official_state_dict
    from rearlib.train import load_generator
    from rearlib.experiments.zoo import load_shipped

    errors = []
    loaders = [("a rearlib.train model/checkpoint", lambda: load_generator(path, device, ema=ema)),
               ("a shipped rearlib.experiments.zoo generator", lambda: load_shipped(path, device)),
               ("an official state dict", lambda: load_official_state_dict(path, preset, device=device))]
    for what, load in loaders[:1] if ema else loaders:  # only rearlib.train files keep EMA weights
        try:
            return load()
        except Exception as e:  # noqa: BLE001 - try the next format, report all
            errors.append(f" as {what}: {e}")
    raise SystemExit(f"cannot load {path}\n" + "\n".join(errors))


def _fid_cli(a) -> None:
    from rearlib.scales import validate_scale
    from rearlib.tokenizers import get_tokenizer
    validate_scale(a.scale)
    dist = torch.distributed
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)  # before the process group, so NCCL binds this rank's GPU
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    model = _load_any_generator(a.generator, a.preset, device, ema=a.ema)
    sc = scales.SAMPLING[a.scale]
    g, p = a.cfg_scale, a.cfg_power
    if g is None and a.scale == "paper":
        g, p = PAPER_CFG.get(a.preset or "", (None, None))
        if g is None:
            raise SystemExit(f"--cfg-scale/--cfg-power needed (paper headline settings exist for {list(PAPER_CFG)} "
                             f"via --preset)")
    g = sc["cfg_scale"] if g is None else g
    p = (sc["cfg_power"] if p is None else p) or 0.0
    tok = get_tokenizer(a.scale, device, path=a.tokenizer)
    res = generate_fid_samples(model, tok, a.num_per_class or sc["num_per_class"], a.out, seed=a.seed,
                               batch_size=a.batch_size or sc["batch_size"], cfg_scale=g, cfg_power=p,
                               temperature=a.temperature)
    res.update(cfg_scale=g, cfg_power=p, seed=a.seed)
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(json.dumps(res, indent=2))
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
