"""The sampling entry points of :mod:`rearlib.sample`: :func:`generate` (the fast path of
:mod:`rearlib.sample_fast_path` on CUDA, else the plain loop) and :func:`generate_progressive` (the plain loop,
yielding partial results), and the plain loop itself (KV-cached, or recomputing the prefix every step as the
authors' evaluation does). The sampling rule and its definitions are in :mod:`rearlib.sample_rule`.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from rearlib.model import Generator
from rearlib.sample_fast_path import _bucket_for, _buckets, _get_fast_decoder
from rearlib.sample_rule import (_as_classes, _autocast, _fill_uniform_, _pick, _resolve_seeds, _unwrap,
                                 _validate_settings, cfg_schedule)

__all__ = ["generate", "generate_progressive"]


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
    classes = _as_classes(classes, device)
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
    classes = _as_classes(classes, device)
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

