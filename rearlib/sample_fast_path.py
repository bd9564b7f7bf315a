"""The fast sampling path of :func:`rearlib.sample.generate` and the cache of its decoders.

Fast path (CUDA; gpt-fast's recipe): a bf16-weight copy of the model under bf16 autocast (the residual stream,
norms and the head stay float32), a static :class:`rearlib.model.KVCache` written by index, the one-token decode
step (model + CFG + sampling + writing the token) compiled with ``torch.compile`` and captured as CUDA graphs -
one per attention-window bucket, so early steps do not read the whole cache - replayed 255 times per batch with
no host synchronisation. CPU (and ``fast=False``) runs the same step eagerly in a plain loop; ``use_cache=False``
is the authors' evaluation behaviour (recompute the whole prefix every step), kept as a reference.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
import weakref

import torch
import torch.nn as nn

from rearlib.kernels.ops import register_ops, triton_available
from rearlib.model import Generator
from rearlib.sample_rule import _autocast, _fill_uniform_, _pick, cfg_schedule

__all__ = ["last_fast_path_info", "clear_sampler_cache"]


# ----------------------------------------------------------------------------------------------------------------
# Attention-window buckets (the plain cached loop uses them too)
# ----------------------------------------------------------------------------------------------------------------
def _buckets(n_positions: int, kv_buckets: int) -> list[int]:
    """Static attention-window sizes (multiples of 8 where possible, the last = n_positions)."""
    kv_buckets = max(1, int(kv_buckets))
    out = sorted({min(n_positions, int(math.ceil(n_positions * j / kv_buckets / 8.0)) * 8)
                  for j in range(1, kv_buckets + 1)} | {n_positions})
    return out


def _bucket_for(need: int, buckets: list[int]) -> int:
    return next(b for b in buckets if b >= need)


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
            # Here, not at the top: importing the compiler takes seconds and only compiled steps need it.
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

