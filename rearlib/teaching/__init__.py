"""Teaching widgets (notebook 14): the paper's diagnosis, live, on a laptop CPU.

The paper's point (paper §3.1; docs/paper.md, reAR §2.1-§2.2): a visual AR model is trained and judged on token
*indices*, but the tokenizer decodes code *vectors*. Two sequences with the same correct-token ratio (CTR) can
decode to very different images, and an error early in the context changes everything the model writes after it.

Three components, each a class with ``.widget`` (the ipywidgets box to display) and pure methods that compute
what the widget shows, so tests need no browser:

* :class:`TokenSurgery` - pick an image (dataset index or an uploaded file), see its token grid over the image,
  choose how many tokens are wrong and where (clicked cells, early / late / random), and how they are replaced
  (random code, embedding-nearest, embedding-farthest, or a generator's continuation after the first error);
  ``compute(...) -> SurgeryResult`` (decoded image, CTR, PSNR, SSIM, perceptual distance).
* :class:`SameCTR` - CTR held fixed, vary the embedding distance of the replacement (nearest / random /
  farthest) or the position of the wrong tokens (early / random / late); ``compute(...) -> (table, images)`` and a
  small live plot.
* :class:`ARvsReAR` - the AR and reAR generators sample from the same class and seed (KV cache; the same seed
  gives both models the same random numbers), and the same injected context errors are fed to both:
  ``generate(...)`` and ``context_errors(...)``.

They share a :class:`Lab`: tokenizer, generators, classifier, image source and caches (encodings,
reconstructions, teacher-forced predictions, samples).

Definitions (N tokens in raster order, K codes, x = the image's ground-truth (GT) tokens, z(k) = the tokenizer's
codebook vector of code k):

* **Error positions** (:func:`error_positions`): ``"early"`` = raster positions 0..k-1, ``"late"`` = N-k..N-1,
  ``"random"`` = k positions uniform without replacement (``torch.randperm`` seeded by ``seed``), ``"clicked"`` =
  the cells the user clicked (k is then their number).
* **Replacements** (:func:`replace_tokens`): ``"nearest"`` = the code of highest cosine similarity to z(x_t)
  other than x_t itself, ``"farthest"`` = the code of lowest cosine (both from
  :func:`rearlib.analysis.codebook_neighbours`, the tables of notebook 06); ``"random"`` = uniform over the K-1
  codes other than x_t, drawn once for every position from ``seed`` (:func:`random_codes`), so every placement
  uses the same code at the same position. None of them equals x_t, so **CTR = 1 - k/N exactly** (checked).
* **Continuation** (:func:`continue_after_error`, replacement ``"continue"``): positions before the first chosen
  position p keep x; position p gets the ``"random"`` code; the generator then writes p+1..N-1 itself in raster
  order given its own, mixed prefix (multinomial at temperature 1 without guidance, uniforms from ``seed``;
  :func:`rearlib.analysis.forced_decode` with its KV cache). This is the paper's exposure-bias setting
  (Experiment A) for one image; the other chosen positions are written by the model too, and CTR is measured.
* **Image metrics** of a decoded image against the original image (the paper's definition, not against the
  tokenizer's reconstruction): PSNR (dB, L = 255) and SSIM on uint8 images, and a perceptual distance - LPIPS-VGG
  when its weights are cached locally, otherwise ST-LPIPS(alex), a shift-tolerant LPIPS whose weights ship on PyPI -
  all through :func:`rearlib.analysis.image_metrics`.
* **Context errors** (:meth:`ARvsReAR.context_errors`, the paper's App. C.1 robustness probe on one image): k of
  the context tokens x_1..x_{N-1} (x_N is context for nothing) are replaced by random codes; each model predicts
  every token by teacher forcing, ``x̂_t = argmax p(· | x̃_{<t})``. ``ctr`` = (1/N) Σ 1[x̂_t = x_t] with the clean
  (``x̃ = x``) and the corrupted context; ``ctr_after_error`` = the same over the targets right after a corrupted
  token (in the clean rows: the same targets with the clean context, the baseline; NaN when k = 0); the N
  predictions are decoded into an image and compared with the original.

Responsiveness: every computation runs under ``torch.inference_mode`` with ``num_threads`` intra-op threads (1 by
default: on a shared, busy 2-core CPU a second thread made decoding 4x slower; ``"auto"`` measures which is faster);
encodings, reconstructions, predictions and samples are cached; sliders update on release
(``continuous_update=False``). :func:`measure_latency` times interactions in the kernel.

Browser tooling (used by ``tests/test_browser.py`` and ``python -m rearlib teaching screenshots``):
:func:`serve_voila` serves a notebook with Voila on 127.0.0.1 and always kills it; :func:`chromium_page` opens a
headless Debian Chromium through Playwright (never ``playwright install``).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import html
import io
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
from rearlib import scales

__all__ = [
    "PLACEMENTS", "REPLACEMENTS", "CONTEXT_PLACEMENTS", "FACTORS",
    "error_positions", "random_codes", "replace_tokens", "continue_after_error", "image_png",
    "Lab", "SurgeryResult", "TokenSurgery", "SameCTR", "ARvsReAR", "measure_latency", "latency_summary",
    "CHROMIUM_ARGS", "find_chromium", "chromium_page", "serve_voila", "take_screenshots",
]


PLACEMENTS = ("clicked", "early", "late", "random")
REPLACEMENTS = ("nearest", "random", "farthest", "continue")
CONTEXT_PLACEMENTS = ("random", "early", "late")
#: What :class:`SameCTR` varies at fixed CTR, and the levels of each factor (plotted in this order).
FACTORS = {"embedding distance": ("nearest", "random", "farthest"), "error position": ("early", "random", "late")}

_PLACEMENT_LABELS = {"clicked": "clicked cells", "early": "early (first k)", "late": "late (last k)",
                     "random": "random"}
_REPLACEMENT_LABELS = {"nearest": "embedding-nearest code", "random": "random code",
                       "farthest": "embedding-farthest code", "continue": "model continues after the 1st error"}
_DISPLAY_PX = 256          # the token-grid overlay and the main images are shown at this size
_SMALL_PX = 160            # side-by-side images
_STREAM_RANDOM_CODE, _STREAM_POSITIONS, _STREAM_CONTINUE = 1, 2, 3


# ================================================================================================================
# Pure primitives
# ================================================================================================================
def _stream_generator(seed: int, stream: int) -> torch.Generator:
    """A CPU generator for one purpose (``stream``) of a user seed: independent draws per purpose."""
    from rearlib.sample import image_seed

    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    g = torch.Generator()
    g.manual_seed(image_seed(int(seed), stream))
    return g


def _check_gt(gt, codebook_size: int | None = None) -> torch.Tensor:
    if not torch.is_tensor(gt) or gt.ndim != 1 or gt.is_floating_point() or gt.dtype == torch.bool:
        raise TypeError(f"gt must be a 1-D integer tensor of token ids [N] (raster order); got "
                        f"{tuple(gt.shape) if torch.is_tensor(gt) else type(gt).__name__}")
    if gt.numel() == 0:
        raise ValueError("gt is empty")
    if codebook_size is not None and (int(gt.min()) < 0 or int(gt.max()) >= codebook_size):
        raise ValueError(f"gt ids must be in [0, {codebook_size}); got [{int(gt.min())}, {int(gt.max())}]")
    return gt.long()


def _check_positions(positions, n_tokens: int) -> torch.Tensor:
    pos = torch.as_tensor(positions if positions is not None else [], dtype=torch.long).reshape(-1).cpu()
    if pos.numel() and (int(pos.min()) < 0 or int(pos.max()) >= n_tokens):
        raise ValueError(f"positions must be in [0, {n_tokens}); got [{int(pos.min())}, {int(pos.max())}]")
    if pos.unique().numel() != pos.numel():
        raise ValueError("positions must be distinct")
    return pos.sort().values


def error_positions(n_tokens: int, k: int, placement: str, *, seed: int = 0, clicked=None) -> torch.Tensor:
    """Sorted raster positions (LongTensor) of the wrong tokens; see the module docstring for each placement.

    ``k`` in [0, n_tokens] (ignored for ``"clicked"``, whose positions are ``clicked``)."""
    if isinstance(n_tokens, bool) or not isinstance(n_tokens, (int, np.integer)) or n_tokens < 1:
        raise ValueError(f"n_tokens must be a positive int, got {n_tokens!r}")
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
    if placement == "clicked":
        return _check_positions(sorted(set(int(c) for c in (clicked or ()))), n_tokens)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 0 <= k <= n_tokens:
        raise ValueError(f"k must be an int in [0, {n_tokens}], got {k!r}")
    k = int(k)
    if placement == "early":
        return torch.arange(k)
    if placement == "late":
        return torch.arange(n_tokens - k, n_tokens)
    return torch.randperm(n_tokens, generator=_stream_generator(seed, _STREAM_POSITIONS))[:k].sort().values


def random_codes(gt: torch.Tensor, codebook_size: int, seed: int = 0) -> torch.Tensor:
    """One code per position, uniform over the ``codebook_size - 1`` codes other than ``gt[t]`` ([N], CPU).

    Drawn as u_t ~ U{0..K-2} from ``seed``, then u_t + 1[u_t >= x_t] (which skips x_t): the code at a position
    depends only on (seed, position, x_t), never on which other positions are replaced."""
    gt = _check_gt(gt, codebook_size).cpu()
    if codebook_size < 2:
        raise ValueError("codebook_size must be >= 2")
    u = torch.randint(0, codebook_size - 1, (gt.numel(),), generator=_stream_generator(seed, _STREAM_RANDOM_CODE))
    return u + (u >= gt).long()


def replace_tokens(gt: torch.Tensor, positions, mode: str, *, codebook_size: int, neighbours: dict | None = None,
                   seed: int = 0) -> torch.Tensor:
    """``gt`` ([N]) with the tokens at ``positions`` replaced by their ``mode`` code ("nearest" / "farthest" /
    "random"; see the module docstring). ``neighbours``: :func:`rearlib.analysis.codebook_neighbours` of the
    tokenizer (needed for nearest / farthest). Returns a new CPU LongTensor [N]; every replaced token differs
    from the GT token (RuntimeError otherwise), so CTR = 1 - len(positions) / N."""
    gt = _check_gt(gt, codebook_size).cpu()
    pos = _check_positions(positions, gt.numel())
    if mode == "random":
        repl = random_codes(gt, codebook_size, seed)
    elif mode in ("nearest", "farthest"):
        if neighbours is None or mode not in neighbours:
            raise ValueError(f"mode {mode!r} needs neighbours=rearlib.analysis.codebook_neighbours(codebook)")
        table = neighbours[mode].cpu()
        if table.numel() != codebook_size:
            raise ValueError(f"neighbour table has {table.numel()} codes, codebook_size is {codebook_size}")
        repl = table[gt]
    else:
        raise ValueError(f"mode must be 'nearest', 'random' or 'farthest' (use continue_after_error for "
                         f"'continue'); got {mode!r}")
    out = gt.clone()
    out[pos] = repl[pos]
    if bool((out[pos] == gt[pos]).any()):
        raise RuntimeError(f"a {mode} replacement equals the true token (the neighbour table is wrong)")
    return out


def continue_after_error(model, gt: torch.Tensor, positions, label: int, *, seed: int = 0,
                         temperature: float = 1.0) -> tuple[torch.Tensor, int | None]:
    """The generator's continuation after the first wrong token (module docstring, "Continuation").

    Returns ``(tokens [N] on the CPU, p)`` with p the first error position, or ``(gt, None)`` without positions.
    """
    from rearlib.analysis import forced_decode

    cfg = model.config
    gt = _check_gt(gt, cfg.codebook_size).cpu()
    if gt.numel() != cfg.seq_len:
        raise ValueError(f"gt has {gt.numel()} tokens, the generator writes {cfg.seq_len}")
    pos = _check_positions(positions, gt.numel())
    if pos.numel() == 0:
        return gt.clone(), None
    p = int(pos[0])
    start = gt.clone()
    start[p] = random_codes(gt, cfg.codebook_size, seed)[p]
    forced = torch.zeros(1, gt.numel(), dtype=torch.bool)
    forced[0, :p + 1] = True
    # One uniform in (0, 1] per step (forced_decode's inverse-CDF draw needs u > 0).
    u = 1.0 - torch.rand(1, gt.numel(), generator=_stream_generator(seed, _STREAM_CONTINUE), dtype=torch.float64)
    dev = next(model.parameters()).device
    out, _, _ = forced_decode(model, start[None].to(dev), forced.to(dev), torch.tensor([int(label)], device=dev), u,
                              temperature=temperature)
    return out[0].cpu(), p


def image_png(image: torch.Tensor, size: int = _DISPLAY_PX, *, mark=None, mark_color=(255, 40, 40),
              alpha: float = 0.5) -> bytes:
    """PNG bytes of a float image [3, H, W] in [0, 1], upscaled to ``size`` px with nearest-neighbour (pixels stay
    visible). ``mark``: bool [h, w] token cells, tinted with ``mark_color`` at opacity ``alpha``."""
    from PIL import Image

    if not torch.is_tensor(image) or image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"image must be a float tensor [3, H, W]; got {getattr(image, 'shape', type(image))}")
    arr = (image.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    im = np.asarray(Image.fromarray(arr).resize((size, size), Image.NEAREST)).astype(np.float32)
    if mark is not None:
        m = torch.as_tensor(mark, dtype=torch.bool).cpu().numpy()
        if m.ndim != 2:
            raise ValueError(f"mark must be a bool grid [h, w]; got shape {m.shape}")
        h, w = m.shape
        m = m[(np.arange(size) * h // size)[:, None], (np.arange(size) * w // size)[None, :]]
        im[m] = (1 - alpha) * im[m] + alpha * np.asarray(mark_color, np.float32)
    buf = io.BytesIO()
    Image.fromarray(im.round().clip(0, 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@contextlib.contextmanager
def _compute_mode(num_threads: int | None):
    """inference_mode, and (CPU) ``num_threads`` intra-op threads for the duration (restored afterwards)."""
    old = torch.get_num_threads()
    if num_threads and num_threads != old:
        torch.set_num_threads(int(num_threads))
    try:
        with torch.inference_mode():
            yield
    finally:
        if num_threads and num_threads != old:
            torch.set_num_threads(old)


def _fmt(v: float, digits: int = 3, unit: str = "") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, float) and math.isinf(v):
        return "∞" + unit
    return f"{v:.{digits}f}{unit}"


# ================================================================================================================
# The shared lab: models, images, caches
# ================================================================================================================
class Lab:
    """Tokenizer, generators, image source, perceptual metric and caches that the widgets share.

    tokenizer: a rearlib tokenizer (encode / decode / codebook / grid_size / resolution). generators: ``{name:
    Generator}`` for the token surgery's continuation and :class:`ARvsReAR` (names such as "ar", "rear").
    images / labels: the image source ([n, 3, R, R] float in [0, 1] and [n] labels); by default ShapeScenes-10
    ``split`` images 0..n_images-1 rendered lazily with ``data_seed``. class_names: names of the labels
    (default ``rearlib.data.CLASS_NAMES`` when there are 10 classes, else the numbers). classifier: the
    in-project classifier (to name the class of samples / uploads, and for ``perceptual="dfd"``). perceptual:
    ``prefer`` of :func:`rearlib.metrics.perceptual_distance` (default ``"auto"``). num_threads: intra-op threads while computing
    (an int; ``"auto"``: the faster of 1 and torch's current count, measured once (:meth:`_pick_threads`); None:
    leave torch's setting alone).
    """

    DECODE_CACHE = 512

    def __init__(self, tokenizer, generators: dict, *, images=None, labels=None, n_images: int = 256,
                 data_seed: int = 0, split: str = "val", class_names: Sequence[str] | None = None,
                 classifier=None, perceptual: str = "auto", scale: str = "small",
                 num_threads: int | str | None = 1):
        from rearlib.analysis import codebook_neighbours
        from rearlib.metrics import perceptual_metric_name

        self.tokenizer = tokenizer.eval()
        if not generators:
            raise ValueError("generators must name at least one generator, e.g. {'ar': model}")
        self.generators = {str(k): m.eval() for k, m in generators.items()}
        h, w = tokenizer.grid_size
        self.grid = (int(h), int(w))
        self.N, self.K = self.grid[0] * self.grid[1], int(tokenizer.codebook_size)
        self.resolution = int(tokenizer.resolution)
        for name, m in self.generators.items():
            if m.config.codebook_size != self.K or m.config.seq_len != self.N:
                raise ValueError(f"generator {name!r} writes {m.config.seq_len} tokens of {m.config.codebook_size} "
                                 f"codes; the tokenizer has {self.N} tokens of {self.K} codes")
        self.num_classes = int(next(iter(self.generators.values())).config.num_classes)
        if images is not None:
            images = torch.as_tensor(images).detach().float().cpu()
            if images.ndim != 4 or tuple(images.shape[1:]) != (3, self.resolution, self.resolution):
                raise ValueError(f"images must be [n, 3, {self.resolution}, {self.resolution}]; got "
                                 f"{tuple(images.shape)}")
            labels = torch.as_tensor(labels if labels is not None else [0] * len(images)).long().cpu()
            if labels.numel() != len(images):
                raise ValueError(f"got {labels.numel()} labels for {len(images)} images")
            self._images, self._labels = images, labels
            self.n_images = len(images)
        else:
            if isinstance(n_images, bool) or not isinstance(n_images, int) or n_images < 1:
                raise ValueError(f"n_images must be a positive int, got {n_images!r}")
            self._images = self._labels = None
            self.n_images = n_images
        self.data_seed, self.split = int(data_seed), split
        if class_names is None:
            from rearlib.data import CLASS_NAMES

            class_names = CLASS_NAMES if self.num_classes == len(CLASS_NAMES) else [str(i) for i in
                                                                                    range(self.num_classes)]
        if len(class_names) != self.num_classes:
            raise ValueError(f"class_names has {len(class_names)} names for {self.num_classes} classes")
        self.class_names = tuple(str(c) for c in class_names)
        self.classifier = classifier.eval() if classifier is not None else None
        self.perceptual, self.scale = perceptual, scale
        self.thread_probe: dict = {}
        self.num_threads = self._pick_threads(num_threads)
        self.metric_name, self.metric_reason = perceptual_metric_name(perceptual)
        if self.metric_name.startswith("DFD") and self.classifier is None:
            raise ValueError(f"the perceptual metric {self.metric_name} ({self.metric_reason}) needs classifier=")
        with _compute_mode(self.num_threads):
            self.neighbours = codebook_neighbours(tokenizer.codebook.detach().float().cpu())
        self._cache: dict = {}
        self._decoded: OrderedDict = OrderedDict()

    def _pick_threads(self, num_threads) -> int | None:
        """``"auto"`` (CPU): time decoding one token grid with 1 thread and with torch's current count, 3 times
        each after a warm-up, and keep the faster median (``thread_probe`` holds the medians). On a busy shared
        CPU one thread wins; on an idle multi-core laptop more threads do."""
        if num_threads is None:
            return None
        if num_threads != "auto":
            if isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1:
                raise ValueError(f"num_threads must be a positive int, 'auto' or None; got {num_threads!r}")
            return num_threads
        n = torch.get_num_threads()
        if self.device.type != "cpu" or n <= 1:
            return 1 if self.device.type == "cpu" else None
        grid = torch.randint(0, self.K, (1, self.N), generator=torch.Generator().manual_seed(0))
        for t in (1, n):
            with _compute_mode(t):
                self.tokenizer.decode(grid.to(self.device))
                times = []
                for _ in range(3):
                    t0 = time.perf_counter()
                    self.tokenizer.decode(grid.to(self.device))
                    times.append(time.perf_counter() - t0)
            self.thread_probe[t] = float(np.median(times))
        return min(self.thread_probe, key=self.thread_probe.get)

    # ---- construction ------------------------------------------------------------------------------------------
    @classmethod
    def from_scale(cls, scale: str = "small", device="cpu", *, variants=("ar", "rear"), n_images: int | None = None,
                   **kw) -> "Lab":
        """The shipped small-scale models (tokenizer, ``variants`` generators, classifier) and ShapeScenes-10 val.

        ``smoke`` uses the same shipped models: they load on a CPU in seconds, whereas smoke's CPU-trained
        generators draw noise that teaches nothing. ``paper`` has no shipped models: build a Lab from the
        authors' checkpoints (``rearlib.experiments.assets``) yourself."""
        from rearlib.runtime import resolve_device
        from rearlib.scales import validate_scale
        from rearlib.metrics.classifier import get_classifier
        from rearlib.tokenizers import get_tokenizer
        from rearlib.scales import GENERATOR_DATA as DATA
        from rearlib.experiments.zoo import get_generator

        validate_scale(scale)
        if scale == "paper":
            raise ValueError("Lab.from_scale covers the shipped small models (smoke / small); at paper scale build "
                             "Lab(tokenizer, generators, images=..., labels=...) from rearlib.experiments.assets")
        dev = resolve_device(device) if isinstance(device, str) else device
        tok = get_tokenizer("small", dev, progress=False)
        gens = {v: get_generator("small", v, tokenizer=tok, device=dev, progress=False) for v in variants}
        clf = get_classifier("small", dev)
        n = n_images or scales.TEACHING[scale]["n_images"]
        return cls(tok, gens, n_images=n, data_seed=DATA["small"]["seed"], classifier=clf, scale="small", **kw)

    @property
    def device(self) -> torch.device:
        return next(self.tokenizer.parameters()).device

    def compute(self):
        """Context manager of every computation: inference mode and the lab's thread count."""
        return _compute_mode(self.num_threads)

    # ---- images -----------------------------------------------------------------------------------------------
    def _check_key(self, key):
        if isinstance(key, str):
            if ("upload", key) not in self._cache:
                raise KeyError(f"unknown uploaded image {key!r}")
            return key
        if isinstance(key, bool) or not isinstance(key, (int, np.integer)) or not 0 <= key < self.n_images:
            raise ValueError(f"image must be a dataset index in [0, {self.n_images}) or an upload key; got {key!r}")
        return int(key)

    def image(self, key) -> tuple[torch.Tensor, int, str]:
        """(image [3, R, R] float CPU, class label, description) of a dataset index or an upload key."""
        key = self._check_key(key)
        if isinstance(key, str):
            return self._cache[("upload", key)]
        if self._images is not None:
            return self._images[key], int(self._labels[key]), f"image {key}"
        ck = ("image", key)
        if ck not in self._cache:
            from rearlib.data import render_batch

            x, y = render_batch(torch.tensor([key]), self.resolution, seed=self.data_seed, split=self.split)
            self._cache[ck] = (x[0].cpu(), int(y[0]),
                               f"ShapeScenes-10 {self.split} #{key} ({self.class_names[int(y[0])]})")
        return self._cache[ck]

    def add_upload(self, content: bytes, name: str = "upload") -> str:
        """Register an image file's bytes (any format PIL reads): centre-cropped and resized to the tokenizer's
        resolution (rearlib.data.adm_center_crop). Its label is the classifier's guess (else 0). Returns its key."""
        from PIL import Image, UnidentifiedImageError

        from rearlib.data import adm_center_crop

        data = bytes(content)
        key = "upload:" + hashlib.sha1(data).hexdigest()[:12]
        if ("upload", key) in self._cache:
            return key
        try:
            pil = Image.open(io.BytesIO(data)).convert("RGB")
        except (UnidentifiedImageError, OSError) as err:
            raise ValueError(f"{name}: not an image file PIL can read ({err})") from None
        arr = np.asarray(adm_center_crop(pil, self.resolution), dtype=np.uint8)
        img = torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255
        label, desc = 0, f"uploaded {name}"
        if self.classifier is not None:
            pred, prob = self.classify(img[None])
            label = int(pred[0])
            desc += f" (classifier: {self.class_names[label]}, {prob[0]:.0%})"
        self._cache[("upload", key)] = (img, label, desc)
        return key

    def tokens(self, key) -> torch.Tensor:
        """The image's GT tokens [N] (CPU, cached)."""
        key = self._check_key(key)
        ck = ("tokens", key)
        if ck not in self._cache:
            img = self.image(key)[0]
            with self.compute():
                self._cache[ck] = self.tokenizer.encode(img[None].to(self.device)).reshape(-1).cpu()
        return self._cache[ck]

    def reconstruction(self, key) -> torch.Tensor:
        """The tokenizer's decoding of the image's GT tokens [3, R, R] (cached)."""
        key = self._check_key(key)
        ck = ("recon", key)
        if ck not in self._cache:
            self._cache[ck] = self.decode(self.tokens(key)[None])[0]
        return self._cache[ck]

    # ---- models -------------------------------------------------------------------------------------------------
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, N] -> images [B, 3, R, R] float CPU. Decoding dominates an interaction's cost (about 0.1 s
        per image on one CPU core at the small scale), so decoded sequences are kept in an LRU cache of
        ``DECODE_CACHE`` images; only the rows not in it are decoded (in one batch)."""
        t = torch.as_tensor(tokens).reshape(-1, self.N).long().cpu()
        keys = [hashlib.sha1(row.numpy().tobytes()).hexdigest() for row in t]
        lru = self._decoded
        missing = sorted({k: i for i, k in enumerate(keys) if k not in lru}.values())
        if missing:
            with self.compute():
                dec = self.tokenizer.decode(t[missing].to(self.device)).float().cpu()
            for i, im in zip(missing, dec):
                lru[keys[i]] = im
        out = []
        for k in keys:
            lru.move_to_end(k)
            out.append(lru[k])
        while len(lru) > self.DECODE_CACHE:
            lru.popitem(last=False)
        return torch.stack(out)

    def score(self, decoded: torch.Tensor, reference: torch.Tensor) -> dict:
        """``{"psnr", "ssim", "perceptual": lists of B floats, "perceptual_metric": name}`` of decoded [B, 3, R, R]
        against ``reference`` [3, R, R] (the original image) - :func:`rearlib.analysis.image_metrics`."""
        from rearlib.analysis import image_metrics

        ref = reference.reshape(1, *reference.shape[-3:]).expand(decoded.shape[0], -1, -1, -1)
        with self.compute(), warnings.catch_warnings():
            # A fallback's warning would repeat what the lab already says (metric_name / metric_reason) and
            # every widget label shows: which metric this is.
            warnings.filterwarnings("ignore", message=".*which is not LPIPS", category=UserWarning)
            vals, name = image_metrics(decoded.to(self.device), ref.to(self.device), perceptual=self.perceptual,
                                       classifier=self.classifier, scale=self.scale)
        out = {k: [float(x) for x in v] for k, v in vals.items()}
        out["perceptual_metric"] = name
        return out

    def model(self, name: str):
        if name not in self.generators:
            raise ValueError(f"unknown generator {name!r}; this lab has {sorted(self.generators)}")
        return self.generators[name]

    def teacher_forced(self, name: str, tokens: torch.Tensor, label: int) -> torch.Tensor:
        """argmax p(x_t | tokens_{<t}, label) for t = 1..N ([N], CPU; cached per (model, tokens, label))."""
        from rearlib.analysis import teacher_forced_predictions

        model = self.model(name)
        t = torch.as_tensor(tokens).reshape(-1).long().cpu()
        ck = ("tf", name, int(label), hashlib.sha1(t.numpy().tobytes()).hexdigest())
        if ck not in self._cache:
            dev = next(model.parameters()).device
            with self.compute():
                self._cache[ck] = teacher_forced_predictions(model, t[None].to(dev), torch.tensor([int(label)],
                                                             device=dev))[0].cpu()
        return self._cache[ck]

    def generate(self, name: str, label: int, seed: int, cfg_scale: float | None = None) -> torch.Tensor:
        """A sample's tokens [N] (CPU, cached) from ``rearlib.sample.generate`` with the KV cache (temperature 1,
        guidance ``cfg_scale``, None or 1 = off); row seed ``image_seed(seed, 0)``, so two models with the same
        (label, seed) draw from the same random numbers."""
        from rearlib.sample import generate

        model = self.model(name)
        if not 0 <= int(label) < self.num_classes:
            raise ValueError(f"label must be in [0, {self.num_classes}), got {label!r}")
        g = None if cfg_scale is None or float(cfg_scale) == 1.0 else float(cfg_scale)
        ck = ("gen", name, int(label), int(seed), g)
        if ck not in self._cache:
            dev = next(model.parameters()).device
            with self.compute():
                # fast=False: for one image the plain cached loop is quicker than compiling CUDA graphs (a GPU
                # run of the notebook would otherwise compile once per widget shape).
                self._cache[ck] = generate(model, torch.tensor([int(label)], device=dev), cfg_scale=g,
                                           seed=int(seed), fast=False)[0].cpu()
        return self._cache[ck]

    def generate_live(self, names: Sequence[str], label: int, seed: int, cfg_scale: float | None = None,
                      every: int = 32):
        """Sample with the models ``names`` at once, token by token: yields ``{model: (n_done, tokens [N])}`` every ``every``
        tokens (the models advance in lockstep) and fills the same cache as :meth:`generate` at the end. The same
        random numbers as :meth:`generate`, so the final tokens are identical. A CPU samples 256 tokens in seconds;
        this lets a display show the raster scan as it happens instead of waiting for it."""
        from rearlib.sample import generate_progressive

        if not 0 <= int(label) < self.num_classes:
            raise ValueError(f"label must be in [0, {self.num_classes}), got {label!r}")
        g = None if cfg_scale is None or float(cfg_scale) == 1.0 else float(cfg_scale)
        streams = {}
        for name in names:
            model = self.model(name)
            dev = next(model.parameters()).device
            streams[name] = generate_progressive(model, torch.tensor([int(label)], device=dev), cfg_scale=g,
                                                 seed=int(seed), every=int(every))
        state = {}
        while streams:
            with self.compute():
                for name in list(streams):
                    try:
                        done, toks = next(streams[name])
                        state[name] = (done, toks[0].cpu())
                    except StopIteration:
                        del streams[name]
            if streams:
                yield dict(state)
        for name, (done, toks) in state.items():
            self._cache[("gen", name, int(label), int(seed), g)] = toks
        yield dict(state)

    def partial_image(self, done: int, tokens: torch.Tensor) -> torch.Tensor:
        """Decode a partly sampled raster sequence: token rows not finished yet are shown grey."""
        t = tokens.clone()
        t[done:] = 0
        img = self.decode(t[None])[0]
        rows_done = done // self.grid[1]
        cut = rows_done * img.shape[-2] // self.grid[0]
        img[:, cut:] = 0.5
        return img

    def classify(self, images: torch.Tensor) -> tuple[list[int], list[float]]:
        """The classifier's argmax class and its softmax probability per image (needs ``classifier``)."""
        if self.classifier is None:
            raise ValueError("this lab has no classifier")
        dev = next(self.classifier.parameters()).device
        with self.compute():
            p = torch.softmax(self.classifier(images.to(dev).float()).float(), dim=-1).cpu()
        conf, pred = p.max(dim=-1)
        return pred.tolist(), conf.tolist()


# ================================================================================================================
# Component base: controls, outputs, safe callbacks, timing
# ================================================================================================================
class _Component:
    """``widget`` (a VBox), ``controls`` ({name: ipywidget}), ``timings`` ([(interaction, seconds)]),
    ``last_error`` (the last callback exception, shown in the status line too)."""

    css_class = "rearlib-widget"

    def __init__(self, lab: Lab):
        self.lab = lab
        self.controls: dict = {}
        self.timings: list[tuple[str, float]] = []
        self.last_error: BaseException | None = None
        self._quiet = 0  # > 0 while controls are changed programmatically (no callbacks)
        import ipywidgets as W

        self.status = W.HTML(value="")
        self.status.add_class(f"{self.css_class}-status")

    def _watch(self, name: str, handler: Callable[[], None], what: str) -> None:
        self.controls[name].observe(lambda change: self._run(handler, what), names="value")

    def _run(self, handler: Callable[[], None], what: str) -> None:
        if self._quiet:
            return
        t0 = time.perf_counter()
        try:
            handler()
            self.last_error = None
        except Exception as err:  # a teaching UI shows the error instead of dying silently in the kernel log
            self.last_error = err
            self.status.value = f"<span style='color:#b00'>error: {type(err).__name__}: {html.escape(str(err))}</span>"
            return
        dt = time.perf_counter() - t0
        self.timings.append((what, dt))
        self.status.value = f"<small>updated in {dt * 1e3:.0f} ms ({what})</small>"

    @contextlib.contextmanager
    def _programmatic(self):
        self._quiet += 1
        try:
            yield
        finally:
            self._quiet -= 1


def _image_widget(px: int, css: str):
    import ipywidgets as W

    w = W.Image(format="png", layout=W.Layout(width=f"{px}px", height=f"{px}px"))
    w.add_class(css)
    return w


def _captioned(widget, caption_html: str, css: str | None = None):
    import ipywidgets as W

    cap = W.HTML(value=caption_html)
    if css:
        cap.add_class(css)
    return W.VBox([cap, widget], layout=W.Layout(align_items="center", margin="0 6px")), cap


_SLIDER_STYLE = {"description_width": "initial"}


def _row(children):
    """An HBox that wraps onto the next line in a narrow notebook column instead of overflowing."""
    import ipywidgets as W

    return W.HBox(children, layout=W.Layout(flex_flow="row wrap", align_items="flex-start"))


def _slider_layout():
    import ipywidgets as W

    return W.Layout(width="380px")


# ================================================================================================================
# 1. Token surgery
# ================================================================================================================
@dataclass
class SurgeryResult:
    """What :meth:`TokenSurgery.compute` returns. Images are float [3, R, R] CPU; metrics against ``original``."""

    image: object
    label: int
    placement: str
    replacement: str
    model: str | None
    seed: int
    gt: torch.Tensor
    tokens: torch.Tensor
    positions: torch.Tensor
    first_error: int | None
    original: torch.Tensor
    reconstruction: torch.Tensor
    decoded: torch.Tensor
    ctr: float
    psnr: float
    ssim: float
    perceptual: float
    recon_psnr: float
    recon_ssim: float
    recon_perceptual: float
    perceptual_metric: str
    seconds: float = 0.0

    @property
    def k(self) -> int:
        return int(self.positions.numel())

    def row(self) -> dict:
        """A flat record (no tensors) for a DataFrame."""
        return {"image": self.image, "label": self.label, "placement": self.placement,
                "replacement": self.replacement, "model": self.model, "seed": self.seed, "k": self.k,
                "n_tokens": int(self.gt.numel()), "first_error": self.first_error, "ctr": self.ctr,
                "psnr": self.psnr, "ssim": self.ssim, "perceptual": self.perceptual,
                "recon_psnr": self.recon_psnr, "recon_ssim": self.recon_ssim,
                "recon_perceptual": self.recon_perceptual, "perceptual_metric": self.perceptual_metric,
                "seconds": self.seconds}


class TokenSurgery(_Component):
    """Widget 1: replace chosen tokens of an image and see what the decoder makes of it (module docstring).

    Controls: ``image`` (dataset index), ``upload``, ``k`` (how many wrong tokens), ``placement``,
    ``replacement``, ``model`` (for "continue"), ``label`` (class condition for "continue"), ``seed``, the
    clickable token-grid cells (``cells``) and ``clear``. Outputs: ``grid`` (the original image under the token
    grid, wrong cells tinted), ``recon_image``, ``decoded_image``, ``metrics`` (HTML).
    """

    css_class = "rearlib-surgery"

    def __init__(self, lab: Lab, *, image=0, k: int | None = None, placement: str = "random",
                 replacement: str = "nearest", model: str | None = None, seed: int = 0):
        import ipywidgets as W

        super().__init__(lab)
        N, (h, w) = lab.N, lab.grid
        models = list(lab.generators)
        c = self.controls
        c["image"] = W.IntSlider(value=int(image) if not isinstance(image, str) else 0, min=0,
                                 max=lab.n_images - 1, description="dataset image #", continuous_update=False,
                                 style=_SLIDER_STYLE, layout=_slider_layout())
        c["upload"] = W.FileUpload(accept="image/*", multiple=False, description="upload image")
        c["k"] = W.IntSlider(value=N // 8 if k is None else int(k), min=0, max=N, description="wrong tokens k",
                             continuous_update=False, style=_SLIDER_STYLE, layout=_slider_layout())
        c["placement"] = W.Dropdown(options=[(_PLACEMENT_LABELS[p], p) for p in PLACEMENTS], value=placement,
                                    description="where", style=_SLIDER_STYLE)
        c["replacement"] = W.Dropdown(options=[(_REPLACEMENT_LABELS[r], r) for r in REPLACEMENTS],
                                      value=replacement, description="replaced by", style=_SLIDER_STYLE)
        c["model"] = W.Dropdown(options=[(_model_label(m), m) for m in models], value=model or models[0],
                                description="generator", style=_SLIDER_STYLE)
        c["label"] = W.Dropdown(options=[(n, i) for i, n in enumerate(lab.class_names)], value=0,
                                description="class condition", style=_SLIDER_STYLE)
        c["seed"] = W.BoundedIntText(value=int(seed), min=0, max=2 ** 31 - 1, description="seed",
                                     layout=W.Layout(width="160px"))
        c["clear"] = W.Button(description="clear clicked cells", layout=W.Layout(width="160px"))
        for name in ("k", "placement", "replacement", "model", "label", "seed"):
            self._watch(name, self.refresh, name)
        self._watch("image", self._on_image, "image")
        self._watch("upload", self._on_upload, "upload")
        c["clear"].on_click(lambda _b: self._run(self._on_clear, "clear"))
        for name, ctl in c.items():
            ctl.add_class(f"{self.css_class}-{name}")

        # The token grid: one transparent toggle per token over the original image (a CSS background), so a click
        # on the picture selects that token. Works in JupyterLab and Voila (plain ipywidgets + a <style>).
        cell = _DISPLAY_PX // max(h, w)
        self._grid_css = f"rearlib-grid-{id(self):x}"
        self.cells = [W.ToggleButton(value=False, description="", tooltip=f"token {i} (row {i // w}, col {i % w})",
                                     layout=W.Layout(width=f"{cell}px", height=f"{cell}px", padding="0px",
                                                     margin="0px"))
                      for i in range(N)]
        for i, b in enumerate(self.cells):
            b.add_class("rearlib-cell")
            b.observe(lambda change, i=i: self._run(lambda: self._on_cell(i), "click"), names="value")
        self.grid = W.GridBox(self.cells, layout=W.Layout(
            grid_template_columns=f"repeat({w}, {cell}px)", grid_template_rows=f"repeat({h}, {cell}px)",
            grid_gap="0px", width=f"{cell * w}px", height=f"{cell * h}px"))
        self.grid.add_class(self._grid_css)
        self.grid.add_class(f"{self.css_class}-grid")
        self._grid_style = W.HTML(value="")
        self.recon_image = _image_widget(_DISPLAY_PX, f"{self.css_class}-recon")
        self.decoded_image = _image_widget(_DISPLAY_PX, f"{self.css_class}-decoded")
        self.metrics = W.HTML(value="")
        self.metrics.add_class(f"{self.css_class}-metrics")
        self.source = W.HTML(value="")
        grid_box, _ = _captioned(self.grid, "<b>original</b> - click tokens to make them wrong")
        recon_box, _ = _captioned(self.recon_image, "<b>all tokens right</b> (tokenizer reconstruction)")
        dec_box, self._dec_caption = _captioned(self.decoded_image, "<b>with wrong tokens</b>")
        row1 = _row([c["image"], c["upload"], self.source])
        row2 = _row([c["k"], c["placement"], c["replacement"]])
        row3 = _row([c["model"], c["label"], c["seed"], c["clear"]])
        self.widget = W.VBox([self._grid_style, W.HTML("<h4>Token surgery</h4>"), row1, row2, row3,
                              _row([grid_box, recon_box, dec_box]), self.metrics, self.status])
        self.widget.add_class(self.css_class)
        self._image_key = image if isinstance(image, str) else int(image)
        self.result: SurgeryResult | None = None
        self._sync_label()
        self._run(self.refresh, "initial")

    # ---- pure -------------------------------------------------------------------------------------------------
    def state(self) -> dict:
        c = self.controls
        return dict(image=self._image_key, k=c["k"].value, placement=c["placement"].value,
                    replacement=c["replacement"].value, model=c["model"].value, label=c["label"].value,
                    seed=c["seed"].value, clicked=tuple(i for i, b in enumerate(self.cells) if b.value))

    def compute(self, image=0, k: int = 32, placement: str = "random", replacement: str = "nearest",
                model: str | None = None, label: int | None = None, seed: int = 0, clicked=()) -> SurgeryResult:
        """The surgery for one state (no widgets involved). ``label`` (class condition of "continue") defaults to
        the image's label; ``model`` to the lab's first generator."""
        lab = self.lab
        t0 = time.perf_counter()
        if replacement not in REPLACEMENTS:
            raise ValueError(f"replacement must be one of {REPLACEMENTS}, got {replacement!r}")
        original, img_label, _ = lab.image(image)
        label = img_label if label is None else int(label)
        gt = lab.tokens(image)
        pos = error_positions(lab.N, int(k), placement, seed=int(seed), clicked=clicked)
        first = int(pos[0]) if pos.numel() else None
        name = None
        if replacement == "continue":
            name = model or next(iter(lab.generators))
            with lab.compute():
                tokens, first = continue_after_error(lab.model(name), gt, pos, label, seed=int(seed))
        else:
            tokens = replace_tokens(gt, pos, replacement, codebook_size=lab.K, neighbours=lab.neighbours,
                                    seed=int(seed))
        ctr = float((tokens == gt).double().mean())
        if replacement != "continue" and abs(ctr - (1 - pos.numel() / lab.N)) > 1e-12:
            raise RuntimeError(f"CTR {ctr} != 1 - k/N with k = {pos.numel()}")
        recon = lab.reconstruction(image)
        if bool((tokens == gt).all()):
            decoded = recon
        else:
            decoded = lab.decode(tokens[None])[0]
        m = lab.score(torch.stack([decoded, recon]), original)
        return SurgeryResult(image=image, label=label, placement=placement, replacement=replacement, model=name,
                             seed=int(seed), gt=gt, tokens=tokens, positions=pos, first_error=first,
                             original=original, reconstruction=recon, decoded=decoded, ctr=ctr,
                             psnr=m["psnr"][0], ssim=m["ssim"][0], perceptual=m["perceptual"][0],
                             recon_psnr=m["psnr"][1], recon_ssim=m["ssim"][1], recon_perceptual=m["perceptual"][1],
                             perceptual_metric=m["perceptual_metric"], seconds=time.perf_counter() - t0)

    # ---- callbacks --------------------------------------------------------------------------------------------
    def refresh(self) -> SurgeryResult:
        st = self.state()
        c = self.controls
        c["k"].disabled = st["placement"] == "clicked"
        cont = st["replacement"] == "continue"
        c["model"].disabled = c["label"].disabled = not cont
        r = self.result = self.compute(**st)
        lab = self.lab
        h, w = lab.grid
        mark = torch.zeros(lab.N, dtype=torch.bool)
        if cont and r.first_error is not None:
            mark[r.first_error:] = True  # everything from the first error on is written by the model
        else:
            mark[r.positions] = True
        self._set_grid_background(r.original, mark.reshape(h, w))
        self.recon_image.value = image_png(r.reconstruction)
        self.decoded_image.value = image_png(r.decoded)
        what = (f"{_model_label(r.model)} continues from token {r.first_error}" if cont and r.first_error is not None
                else f"{r.k} wrong token{'' if r.k == 1 else 's'} "
                     f"({_REPLACEMENT_LABELS.get(r.replacement, r.replacement)})")
        self._dec_caption.value = f"<b>with wrong tokens</b>: {what}"
        self.metrics.value = _metrics_table(r, lab)
        return r

    def _set_grid_background(self, image: torch.Tensor, mark: torch.Tensor) -> None:
        b64 = base64.b64encode(image_png(image, mark=mark, alpha=0.45)).decode()
        css = self._grid_css
        self._grid_style.value = (
            "<style>"
            f".{css} {{background-image: url(data:image/png;base64,{b64}); background-size: 100% 100%;"
            f" image-rendering: pixelated; cursor: crosshair;}}"
            f".{css} .rearlib-cell {{background: transparent !important; box-shadow: none !important;"
            f" border: 1px solid rgba(255,255,255,0.28) !important; border-radius: 0 !important; min-width: 0;"
            f" padding: 0 !important; margin: 0 !important;}}"
            f".{css} .rearlib-cell:hover {{border: 1px solid #ffeb3b !important;}}"
            f".{css} .rearlib-cell.mod-active {{border: 2px solid #ffeb3b !important;}}"
            "</style>")

    def _sync_label(self) -> None:
        with self._programmatic():
            self.controls["label"].value = self.lab.image(self._image_key)[1]
        self.source.value = f"<small>{self.lab.image(self._image_key)[2]}</small>"

    def _on_image(self) -> None:
        self._image_key = int(self.controls["image"].value)
        self._sync_label()
        self.refresh()

    def _on_upload(self) -> None:
        files = self.controls["upload"].value
        if not files:
            return
        f = files[0] if isinstance(files, (list, tuple)) else next(iter(files.values()))
        self._image_key = self.lab.add_upload(f["content"], f.get("name", "upload"))
        self._sync_label()
        self.refresh()

    def _on_cell(self, i: int) -> None:
        if self.controls["placement"].value != "clicked":
            with self._programmatic():
                self.controls["placement"].value = "clicked"
        self.refresh()

    def _on_clear(self) -> None:
        with self._programmatic():
            for b in self.cells:
                b.value = False
        self.refresh()

    def set_clicked(self, positions) -> None:
        """Click cells programmatically (then one refresh): placement becomes "clicked"."""
        pos = set(_check_positions(sorted(set(int(p) for p in positions)), self.lab.N).tolist())
        with self._programmatic():
            for i, b in enumerate(self.cells):
                b.value = i in pos
            self.controls["placement"].value = "clicked"
        self._run(self.refresh, "click")


def _model_label(name: str | None) -> str:
    return {"ar": "AR", "rear": "reAR"}.get(name, str(name))


def _metric_note(name: str) -> str:
    """What a reader should know about the perceptual metric shown (empty for LPIPS itself)."""
    if name.startswith("ST-LPIPS"):
        return "(ST-LPIPS: shift-tolerant LPIPS, a learned perceptual metric of the LPIPS family; not LPIPS itself)"
    if name.startswith("DFD"):
        return "(a feature distance in the in-project classifier, <b>not</b> LPIPS)"
    return ""


def _metrics_table(r: SurgeryResult, lab: Lab) -> str:
    sub = _metric_note(r.perceptual_metric)
    sub = f" <small>{sub}</small>" if sub else ""
    rows = [("CTR (correct-token ratio)", "100%", f"{r.ctr:.1%}"),
            ("PSNR vs original (dB, higher is better)", _fmt(r.recon_psnr, 2), _fmt(r.psnr, 2)),
            ("SSIM vs original (higher is better)", _fmt(r.recon_ssim, 3), _fmt(r.ssim, 3)),
            (f"{r.perceptual_metric} vs original (lower is better){sub}", _fmt(r.recon_perceptual, 3),
             _fmt(r.perceptual, 3))]
    body = "".join(f"<tr><td style='text-align:left'>{a}</td><td>{b}</td><td><b>{c}</b></td></tr>"
                   for a, b, c in rows)
    return ("<table style='border-collapse:collapse' cellpadding='3'>"
            "<tr><th></th><th>all tokens right</th><th>with wrong tokens</th></tr>" + body + "</table>")


# ================================================================================================================
# 2. Same CTR, different quality
# ================================================================================================================
class SameCTR(_Component):
    """Widget 2: CTR held fixed, one factor varied (module docstring, :data:`FACTORS`).

    ``k = round((1 - ctr) N)`` wrong tokens. "embedding distance": the same random positions, replaced by the
    nearest / a random / the farthest code. "error position": the same replacement rule (``replacement``) at the
    first k, k random, or the last k positions. Controls: ``image``, ``ctr``, ``factor``, ``replacement``,
    ``seed``. Outputs: one image per level, ``plot`` (perceptual distance and PSNR against the level), ``table``.
    """

    css_class = "rearlib-samectr"

    def __init__(self, lab: Lab, *, image: int = 0, ctr: float = 0.9, factor: str = "embedding distance",
                 replacement: str = "random", seed: int = 0):
        import ipywidgets as W

        super().__init__(lab)
        c = self.controls
        c["image"] = W.IntSlider(value=int(image), min=0, max=lab.n_images - 1, description="dataset image #",
                                 continuous_update=False, style=_SLIDER_STYLE, layout=_slider_layout())
        c["ctr"] = W.FloatSlider(value=float(ctr), min=0.5, max=1.0, step=0.01, description="CTR (held fixed)",
                                 continuous_update=False, readout_format=".2f", style=_SLIDER_STYLE,
                                 layout=_slider_layout())
        c["factor"] = W.ToggleButtons(options=list(FACTORS), value=factor, tooltips=[
            "same positions, nearest / random / farthest code", "same rule, first / random / last k tokens"],
            style={"button_width": "180px"})
        c["replacement"] = W.Dropdown(options=[(_REPLACEMENT_LABELS[r], r) for r in FACTORS["embedding distance"]],
                                      value=replacement, description="replaced by", style=_SLIDER_STYLE)
        c["seed"] = W.BoundedIntText(value=int(seed), min=0, max=2 ** 31 - 1, description="seed",
                                     layout=W.Layout(width="160px"))
        for name in c:
            self._watch(name, self.refresh, name)
            c[name].add_class(f"{self.css_class}-{name}")
        n_levels = max(len(v) for v in FACTORS.values())
        self.original_image = _image_widget(_SMALL_PX, f"{self.css_class}-original")
        self.level_images, self._captions, boxes = [], [], []
        orig_box, _ = _captioned(self.original_image, "<b>original</b>")
        for i in range(n_levels):
            im = _image_widget(_SMALL_PX, f"{self.css_class}-level{i}")
            box, cap = _captioned(im, "")
            self.level_images.append(im)
            self._captions.append(cap)
            boxes.append(box)
        self.plot = W.Image(format="png")
        self._plot = _LivePlot()
        self.plot.add_class(f"{self.css_class}-plot")
        self.table = W.HTML(value="")
        self.table.add_class(f"{self.css_class}-table")
        self.widget = W.VBox([W.HTML("<h4>Same CTR, different quality</h4>"),
                              _row([c["image"], c["ctr"], c["seed"]]),
                              _row([W.HTML("vary:&nbsp;"), c["factor"], c["replacement"]]),
                              _row([orig_box] + boxes), _row([self.plot, self.table]), self.status])
        self.widget.add_class(self.css_class)
        self.frame: pd.DataFrame | None = None
        self._run(self.refresh, "initial")

    def state(self) -> dict:
        c = self.controls
        return dict(image=int(c["image"].value), ctr=float(c["ctr"].value), factor=c["factor"].value,
                    replacement=c["replacement"].value, seed=int(c["seed"].value))

    def compute(self, image=0, ctr: float = 0.9, factor: str = "embedding distance", replacement: str = "random",
                seed: int = 0) -> tuple[pd.DataFrame, torch.Tensor]:
        """(one row per level: level, k, ctr, psnr, ssim, perceptual, perceptual_metric; decoded images
        [levels, 3, R, R]) for one state (no widgets involved)."""
        lab = self.lab
        if factor not in FACTORS:
            raise ValueError(f"factor must be one of {list(FACTORS)}, got {factor!r}")
        if not 0.0 <= float(ctr) <= 1.0:
            raise ValueError(f"ctr must be in [0, 1], got {ctr!r}")
        k = int(round((1.0 - float(ctr)) * lab.N))
        original, label, _ = lab.image(image)
        gt = lab.tokens(image)
        rows, seqs = [], []
        for level in FACTORS[factor]:
            if factor == "embedding distance":
                pos, mode = error_positions(lab.N, k, "random", seed=seed), level
            else:
                pos, mode = error_positions(lab.N, k, level, seed=seed), replacement
            seqs.append(replace_tokens(gt, pos, mode, codebook_size=lab.K, neighbours=lab.neighbours, seed=seed))
            rows.append({"image": image, "label": label, "factor": factor, "level": level, "replacement": mode,
                         "k": k, "n_tokens": lab.N, "seed": seed})
        seqs = torch.stack(seqs)
        decoded = lab.decode(seqs)
        m = lab.score(decoded, original)
        ctrs = (seqs == gt[None]).double().mean(1).tolist()
        for i, row in enumerate(rows):
            row.update(ctr=ctrs[i], psnr=m["psnr"][i], ssim=m["ssim"][i], perceptual=m["perceptual"][i],
                       perceptual_metric=m["perceptual_metric"])
        return pd.DataFrame(rows), decoded

    def refresh(self) -> pd.DataFrame:
        st = self.state()
        self.controls["replacement"].disabled = st["factor"] != "error position"
        df, decoded = self.compute(**st)
        self.frame = df
        original = self.lab.image(st["image"])[0]
        self.original_image.value = image_png(original, _SMALL_PX)
        for i, (im, cap) in enumerate(zip(self.level_images, self._captions)):
            if i < len(df):
                r = df.iloc[i]
                im.value = image_png(decoded[i], _SMALL_PX)
                im.layout.display = None
                cap.value = (f"<b>{r.level}</b><br><small>CTR {r.ctr:.1%} · PSNR {_fmt(r.psnr, 1)} dB<br>"
                             f"{r.perceptual_metric.split('[')[0]} {_fmt(r.perceptual, 3)}</small>")
            else:
                im.layout.display = "none"
                cap.value = ""
        self.plot.value = self._plot.png(df)
        name = df["perceptual_metric"].iloc[0]
        note = _metric_note(name)
        note = f" {note}" if note else ""
        self.table.value = (f"<small>k = {int(df.k.iloc[0])} of {self.lab.N} tokens wrong in every image: the same "
                            f"CTR of {df.ctr.iloc[0]:.1%}.<br>Perceptual distance: {name}{note}.</small>")
        return df


class _LivePlot:
    """The small plot of :class:`SameCTR`: perceptual distance and PSNR against the level. The figure (Agg, no
    pyplot) is built once and only its data change, which keeps a redraw near 50 ms instead of ~250 ms."""

    def __init__(self):
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        # Fixed margins: constrained/tight layout would re-measure every text on every redraw.
        self.fig = Figure(figsize=(5.4, 2.1), dpi=80)
        self.fig.subplots_adjust(left=0.11, right=0.98, bottom=0.16, top=0.86, wspace=0.38)
        FigureCanvasAgg(self.fig)
        self.ax1, self.ax2 = self.fig.subplots(1, 2)
        (self.l1,) = self.ax1.plot([], [], "o-", color="C3")
        (self.l2,) = self.ax2.plot([], [], "o-", color="C0")
        self.ax2.set_ylabel("PSNR (dB) ↑", fontsize=8)
        for ax in (self.ax1, self.ax2):
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)

    def png(self, df: pd.DataFrame) -> bytes:
        x = np.arange(len(df))
        self.l1.set_data(x, df["perceptual"].to_numpy(float))
        self.l2.set_data(x, df["psnr"].replace([np.inf], np.nan).to_numpy(float))
        self.ax1.set_ylabel(df["perceptual_metric"].iloc[0].split("[")[0] + " ↓", fontsize=8)
        for ax in (self.ax1, self.ax2):
            ax.set_xticks(x, df["level"], fontsize=8)
            ax.set_xlim(-0.3, len(df) - 0.7)
            ax.relim()
            ax.autoscale_view(scalex=False)
        self.fig.suptitle(f"{df['factor'].iloc[0]} at CTR {df['ctr'].iloc[0]:.1%}", fontsize=9)
        buf = io.BytesIO()
        self.fig.savefig(buf, format="png")
        return buf.getvalue()


# ================================================================================================================
# 3. AR vs reAR
# ================================================================================================================
class ARvsReAR(_Component):
    """Widget 3: two generators side by side - samples from the same class and seed, and the same context errors.

    Controls: ``label``, ``seed``, ``cfg`` (the sampling part) and ``image``, ``k``, ``placement``,
    ``error_seed`` (the context-error part). Outputs: ``sample_images`` {model: Image}, ``context_image`` (the
    original with the corrupted tokens tinted), ``pred_images`` {(model, "clean" | "corrupted"): Image},
    ``context_table`` (HTML).
    """

    css_class = "rearlib-arvsrear"

    def __init__(self, lab: Lab, *, models: Sequence[str] = ("ar", "rear"), label: int = 0, seed: int = 0,
                 cfg: float = 1.0, image: int = 0, k: int | None = None, placement: str = "random",
                 error_seed: int = 0, live_every: int = 32):
        import ipywidgets as W

        super().__init__(lab)
        self.live_every = int(live_every)  # sampled tokens between two updates of the growing samples
        if not models:
            raise ValueError("models must name at least one generator")
        for m in models:
            lab.model(m)  # raises ValueError for an unknown name
        self.models = list(models)
        c = self.controls
        c["label"] = W.Dropdown(options=[(n, i) for i, n in enumerate(lab.class_names)], value=int(label),
                                description="class", style=_SLIDER_STYLE)
        c["seed"] = W.BoundedIntText(value=int(seed), min=0, max=2 ** 31 - 1, description="seed",
                                     layout=W.Layout(width="160px"))
        c["cfg"] = W.FloatSlider(value=float(cfg), min=1.0, max=4.0, step=0.5, description="guidance (1 = off)",
                                 continuous_update=False, style=_SLIDER_STYLE, layout=_slider_layout())
        c["image"] = W.IntSlider(value=int(image), min=0, max=lab.n_images - 1, description="dataset image #",
                                 continuous_update=False, style=_SLIDER_STYLE, layout=_slider_layout())
        c["k"] = W.IntSlider(value=(lab.N - 1) // 10 if k is None else int(k), min=0, max=lab.N - 1,
                             description="corrupted context tokens k", continuous_update=False,
                             style=_SLIDER_STYLE, layout=_slider_layout())
        c["placement"] = W.Dropdown(options=[(_PLACEMENT_LABELS[p], p) for p in CONTEXT_PLACEMENTS],
                                    value=placement, description="where", style=_SLIDER_STYLE)
        c["error_seed"] = W.BoundedIntText(value=int(error_seed), min=0, max=2 ** 31 - 1, description="seed",
                                           layout=W.Layout(width="160px"))
        for name in ("label", "seed", "cfg"):
            self._watch(name, self.refresh_samples, name)
        for name in ("image", "k", "placement", "error_seed"):
            self._watch(name, self.refresh_context, "context " + name)
        for name, ctl in c.items():
            ctl.add_class(f"{self.css_class}-{name}")
        self.sample_images, sample_boxes, self._sample_caps = {}, [], {}
        for m in self.models:
            self.sample_images[m] = _image_widget(_SMALL_PX, f"{self.css_class}-sample-{m}")
            box, self._sample_caps[m] = _captioned(self.sample_images[m], f"<b>{_model_label(m)}</b>")
            sample_boxes.append(box)
        self.context_image = _image_widget(_SMALL_PX, f"{self.css_class}-context")
        ctx_box, self._ctx_cap = _captioned(self.context_image, "<b>context</b>")
        self.pred_images, pred_boxes = {}, []
        for m in self.models:
            for cond in ("clean", "corrupted"):
                self.pred_images[(m, cond)] = _image_widget(_SMALL_PX, f"{self.css_class}-pred-{m}-{cond}")
                box, _ = _captioned(self.pred_images[(m, cond)],
                                    f"<b>{_model_label(m)}</b>, {cond} context<br><small>decoded predictions</small>")
                pred_boxes.append(box)
        self.context_table = W.HTML(value="")
        self.context_table.add_class(f"{self.css_class}-table")
        self.sample_status = W.HTML(value="")
        self.widget = W.VBox([
            W.HTML("<h4>AR vs reAR: same class, same seed</h4>"),
            _row([c["label"], c["seed"], c["cfg"]]), _row(sample_boxes), self.sample_status,
            W.HTML("<h4>AR vs reAR: the same errors in the context</h4>"),
            _row([c["image"], c["k"], c["placement"], c["error_seed"]]),
            _row([ctx_box] + pred_boxes), self.context_table, self.status])
        self.widget.add_class(self.css_class)
        self.samples: dict | None = None
        self.context: pd.DataFrame | None = None
        self._run(self.refresh_context, "initial context")
        self._run(self.refresh_samples, "initial samples")

    # ---- pure -------------------------------------------------------------------------------------------------
    def generate(self, label: int = 0, seed: int = 0, cfg: float = 1.0) -> dict:
        """``{model: {"tokens": [N], "image": [3, R, R], "class": classifier argmax or None, "prob": float}}``."""
        lab = self.lab
        out = {}
        toks = [lab.generate(m, int(label), int(seed), cfg) for m in self.models]
        images = lab.decode(torch.stack(toks))
        preds, probs = lab.classify(images) if lab.classifier is not None else ([None] * len(toks),
                                                                               [float("nan")] * len(toks))
        for m, t, im, p, q in zip(self.models, toks, images, preds, probs):
            out[m] = {"tokens": t, "image": im, "class": p, "prob": q}
        return out

    def context_errors(self, image=0, k: int = 25, placement: str = "random", error_seed: int = 0
                       ) -> tuple[pd.DataFrame, dict]:
        """Teacher-forced predictions of each model with the clean and the corrupted context (module docstring).

        Returns (one row per (model, condition): ctr, ctr_after_error, n_corrupted, psnr, ssim, perceptual,
        perceptual_metric; ``{"positions", "context": corrupted tokens, "images": {(model, condition): image}}``).
        """
        lab = self.lab
        if placement not in CONTEXT_PLACEMENTS:
            raise ValueError(f"placement must be one of {CONTEXT_PLACEMENTS}, got {placement!r}")
        original, label, _ = lab.image(image)
        gt = lab.tokens(image)
        pos = error_positions(lab.N - 1, int(k), placement, seed=int(error_seed))   # x_1..x_{N-1} only
        noisy = replace_tokens(gt, pos, "random", codebook_size=lab.K, seed=int(error_seed))
        after = torch.zeros(lab.N, dtype=torch.bool)
        after[pos + 1] = True        # target x_{t+1} follows the corrupted input x_t
        rows, preds, keys = [], [], []
        for m in self.models:
            for cond, ctx in (("clean", gt), ("corrupted", noisy)):
                p = lab.teacher_forced(m, ctx, label)
                correct = p == gt
                rows.append({"image": image, "label": label, "model": m, "condition": cond,
                             "placement": placement, "k": int(pos.numel()), "n_tokens": lab.N,
                             "error_seed": int(error_seed), "ctr": float(correct.double().mean()),
                             "ctr_after_error": float(correct[after].double().mean()) if pos.numel() else float("nan")})
                preds.append(p)
                keys.append((m, cond))
        decoded = lab.decode(torch.stack(preds))
        sc = lab.score(decoded, original)
        for i, row in enumerate(rows):
            row.update(psnr=sc["psnr"][i], ssim=sc["ssim"][i], perceptual=sc["perceptual"][i],
                       perceptual_metric=sc["perceptual_metric"])
        return pd.DataFrame(rows), {"positions": pos, "context": noisy,
                                    "images": {key: decoded[i] for i, key in enumerate(keys)}}

    # ---- callbacks --------------------------------------------------------------------------------------------
    def refresh_samples(self) -> dict:
        c = self.controls
        label, seed, cfg = int(c["label"].value), int(c["seed"].value), float(c["cfg"].value)
        cached = all(("gen", m, label, seed, None if cfg == 1.0 else cfg) in self.lab._cache for m in self.models)
        t0 = time.perf_counter()
        if not cached:
            # Show the raster scan as it happens (the first rows appear within a fraction of a second on a CPU);
            # the finished samples land in the lab's cache, so generate() below only decodes and classifies.
            for state in self.lab.generate_live(self.models, label, seed, cfg, every=self.live_every):
                done = min(d for d, _ in state.values())
                for m, (d, toks) in state.items():
                    self.sample_images[m].value = image_png(self.lab.partial_image(d, toks), _SMALL_PX)
                self.sample_status.value = (f"<small>sampling: {done} of {self.lab.N} tokens with each model, "
                                            f"{time.perf_counter() - t0:.1f} s (cached afterwards)…</small>")
        s = self.samples = self.generate(label, seed, cfg)
        for m in self.models:
            self.sample_images[m].value = image_png(s[m]["image"], _SMALL_PX)
            cls = s[m]["class"]
            guess = "" if cls is None else (f"<br><small>classifier: {self.lab.class_names[cls]} "
                                            f"({s[m]['prob']:.0%})</small>")
            self._sample_caps[m].value = f"<b>{_model_label(m)}</b>{guess}"
        self.sample_status.value = (f"<small>class {self.lab.class_names[label]}, seed {seed}, guidance {cfg:g}: "
                                    f"{'cached' if cached else 'sampled'} in {time.perf_counter() - t0:.2f} s. "
                                    f"Same seed = same random numbers for both models.</small>")
        return s

    def refresh_context(self) -> pd.DataFrame:
        c = self.controls
        df, out = self.context_errors(int(c["image"].value), int(c["k"].value), c["placement"].value,
                                      int(c["error_seed"].value))
        self.context = df
        lab = self.lab
        mark = torch.zeros(lab.N, dtype=torch.bool)
        mark[out["positions"]] = True
        self.context_image.value = image_png(lab.image(int(c["image"].value))[0], _SMALL_PX,
                                             mark=mark.reshape(lab.grid))
        self._ctx_cap.value = f"<b>context</b>: {int(mark.sum())} corrupted tokens (tinted)"
        for key, im in self.pred_images.items():
            im.value = image_png(out["images"][key], _SMALL_PX)
        self.context_table.value = _context_table(df)
        return df


def _context_table(df: pd.DataFrame) -> str:
    name = df["perceptual_metric"].iloc[0]
    head = ("<tr><th>model</th><th>context</th><th>teacher-forced CTR</th><th>CTR right after an error</th>"
            f"<th>PSNR (dB)</th><th>{name}</th></tr>")
    body = "".join(
        f"<tr><td>{_model_label(r.model)}</td><td>{r.condition}</td><td>{r.ctr:.1%}</td>"
        f"<td>{'–' if math.isnan(r.ctr_after_error) else f'{r.ctr_after_error:.1%}'}</td>"
        f"<td>{_fmt(r.psnr, 2)}</td><td>{_fmt(r.perceptual, 3)}</td></tr>" for r in df.itertuples())
    note = _metric_note(name)
    note = f" {note}" if note else ""
    return (f"<table cellpadding='3'>{head}{body}</table><small>Each model predicts every token from the "
            f"(clean or corrupted) tokens before it; images decode those predictions. 'Right after an error': the "
            f"tokens that directly follow a corrupted one (clean rows: the same tokens, clean context). "
            f"{name}{note}.</small>")


# ================================================================================================================
# Latency
# ================================================================================================================
def measure_latency(component: _Component, changes: Sequence[tuple[str, object]], *,
                    interaction: str | None = None) -> pd.DataFrame:
    """Apply control changes one by one (``(control name, new value)``) and time each: the kernel-side wall time
    from setting the value until every callback returned (browser rendering not included). A change to the
    current value would run no callback, so it raises ValueError. Returns one row per change."""
    rows = []
    for name, value in changes:
        ctl = component.controls[name]
        if ctl.value == value:
            raise ValueError(f"{name} is already {value!r}: the change would not run any callback")
        n_before = len(component.timings)
        t0 = time.perf_counter()
        ctl.value = value
        dt = time.perf_counter() - t0
        if component.last_error is not None:
            raise RuntimeError(f"the callback of {name} = {value!r} failed") from component.last_error
        if len(component.timings) == n_before:
            raise RuntimeError(f"changing {name} ran no callback")
        rows.append({"component": type(component).__name__, "interaction": interaction or name, "control": name,
                     "value": str(value), "seconds": dt})
    return pd.DataFrame(rows)


def latency_summary(df: pd.DataFrame) -> pd.DataFrame:
    """Per (component, interaction): n, median, max and p90 (s) of :func:`measure_latency` rows."""
    g = df.groupby(["component", "interaction"], sort=False)["seconds"]
    out = g.agg(n="count", median="median", p90=lambda s: float(np.quantile(s, 0.9)), max="max").reset_index()
    return out


# ================================================================================================================
# Browser tooling: Voila server and headless Chromium (Playwright)
# ================================================================================================================
#: Chromium flags for CI and sandboxes (no GPU, no network chatter, runs as root).
CHROMIUM_ARGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run")


def find_chromium() -> str | None:
    """``$REARLIB_CHROMIUM``, else Debian's ``chromium`` on PATH (``apt-get install chromium``), else None."""
    env = os.environ.get("REARLIB_CHROMIUM")
    if env:
        return env if Path(env).is_file() else None
    return shutil.which("chromium") or (
        "/usr/bin/chromium" if Path("/usr/bin/chromium").is_file() else None)


@contextlib.contextmanager
def chromium_page(executable: str | None = None, *, width: int = 1500, height: int = 1100,
                  timeout_ms: int = 60_000):
    """A Playwright page in headless Chromium (the system binary; Playwright downloads nothing). Closed after."""
    from playwright.sync_api import sync_playwright

    exe = executable or find_chromium()
    if exe is None:
        raise FileNotFoundError("Chromium not found: install Debian's package (apt-get install chromium) or set "
                                "REARLIB_CHROMIUM")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=list(CHROMIUM_ARGS), timeout=timeout_ms)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.set_default_timeout(timeout_ms)
            yield page
        finally:
            browser.close()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _with_parameters(script: Path, params: dict, out: Path) -> Path:
    """Write ``script`` (jupytext .py or .ipynb) as a notebook whose parameters cell ends with ``params``."""
    import jupytext

    nb = jupytext.read(script)
    cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    if params and not cells:
        raise ValueError(f"{script} has no cell tagged 'parameters'")
    if params:
        cells[0].source += "\n# overrides\n" + "".join(f"{k} = {v!r}\n" for k, v in params.items())
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    jupytext.write(nb, out, fmt="ipynb")
    return out


@contextlib.contextmanager
def serve_voila(script, params: dict | None = None, *, timeout_s: float = 90.0, log_path=None):
    """Serve ``script`` (with ``params`` appended to its parameters cell) with Voila on 127.0.0.1 at a free port.

    Yields ``(url, log_tail)`` once the server answers: the notebook's URL and a function returning the end of
    the server's log (for error messages). The server runs in its own process group (its kernels are
    children); on exit that group is sent SIGTERM, then SIGKILL after 10 s - always, even on errors. Raises
    RuntimeError with the server log's tail if it exits or does not answer within ``timeout_s``.
    """
    import urllib.error
    import urllib.request

    script = Path(script).resolve()
    work = Path(tempfile.mkdtemp(prefix="rearlib-voila-"))
    nb = _with_parameters(script, params or {}, work / (script.stem + ".ipynb"))
    port = _free_port()
    log_file = Path(log_path) if log_path else work / "voila.log"
    env = dict(os.environ, MPLBACKEND="Agg", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "voila", str(nb.name), f"--port={port}", "--no-browser", "--Voila.ip=127.0.0.1",
           "--show_tracebacks=True", "--ServerApp.token=", "--ServerApp.password="]
    log = open(log_file, "wb")
    proc = subprocess.Popen(cmd, cwd=work, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def tail() -> str:
        log.flush()
        return log_file.read_text(errors="replace")[-3000:]

    try:
        base = f"http://127.0.0.1:{port}/"
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"voila exited with status {proc.returncode}:\n{tail()}")
            try:  # any HTTP answer means the server is up ("/" itself would start the notebook's kernel)
                with urllib.request.urlopen(base + "api/status", timeout=2):
                    break
            except urllib.error.HTTPError:
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"voila did not answer within {timeout_s:.0f} s:\n{tail()}")
            time.sleep(0.3)
        yield base, tail  # Voila serving one notebook renders it at the root
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        # Kernels started by the server share its process group; make sure none outlives it.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
        if log_path is None:
            shutil.rmtree(work, ignore_errors=True)
        else:
            for p in work.iterdir():
                if p != log_file:
                    p.unlink(missing_ok=True)


def wait_for_widgets(page, css_class: str, timeout_ms: int = 120_000):
    """Wait until the widget with ``css_class`` has rendered images with content; returns its locator."""
    loc = page.locator(f".{css_class}")
    loc.first.wait_for(state="visible", timeout=timeout_ms)
    page.wait_for_function(
        "cls => { const imgs = document.querySelectorAll('.' + cls + ' img');"
        " return imgs.length > 0 && Array.from(imgs).every(i => i.complete && i.naturalWidth > 0); }",
        arg=css_class, timeout=timeout_ms)
    return loc.first


def image_digest(page, selector: str) -> tuple[str, str]:
    """(src, sha1 of the bytes behind it) of the first <img> matching ``selector``. The widget's blob URL is read
    and fetched inside the page in one step, retried while an update revokes the URL between the two."""
    return tuple(page.evaluate(
        """async sel => {
             for (let attempt = 0; attempt < 20; attempt++) {
               const img = document.querySelector(sel);
               const src = img ? (img.getAttribute('src') || '') : '';
               try {
                 const b = await (await fetch(src)).arrayBuffer();
                 const h = await crypto.subtle.digest('SHA-1', b);
                 return [src, Array.from(new Uint8Array(h)).map(x => x.toString(16).padStart(2, '0')).join('')];
               } catch (e) {
                 await new Promise(r => setTimeout(r, 100));
               }
             }
             throw new Error('could not read the image behind ' + sel);
           }""", selector))


def take_screenshots(out_dir, *, script=None, timeout_s: float = 240.0) -> list[Path]:
    """Serve notebook 14 with Voila (no headless demo), click a few token cells, and save a PNG of each widget
    into ``out_dir`` (``teaching_surgery.png``, ``teaching_same_ctr.png``, ``teaching_ar_vs_rear.png``)."""
    from rearlib.experiments.notebook import NOTEBOOK_DIR

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    script = Path(script) if script else NOTEBOOK_DIR / "14_teaching.py"
    work = Path(tempfile.mkdtemp(prefix="rearlib-shots-"))
    params = {"run_demo": False, "reports_dir": str(work / "reports"), "figures_dir": str(work / "figures")}
    written = []
    try:
        with serve_voila(script, params, timeout_s=timeout_s) as (url, _tail), chromium_page() as page:
            page.goto(url, timeout=int(timeout_s * 1000))
            for css in (TokenSurgery.css_class, SameCTR.css_class, ARvsReAR.css_class):
                wait_for_widgets(page, css, int(timeout_s * 1000))
            # A diagonal stroke of clicked cells replaced by far codes, so the screenshot shows the clickable grid in
            # use and visible damage at a CTR of 97%.
            before = image_digest(page, f".{TokenSurgery.css_class}-decoded")[1]
            page.locator(f".{TokenSurgery.css_class}-replacement select").first.select_option(
                label=_REPLACEMENT_LABELS["farthest"])
            _wait_digest_change(page, f".{TokenSurgery.css_class}-decoded", before, 30.0)
            cells = page.locator(f".{TokenSurgery.css_class}-grid .rearlib-cell")
            w = int(round(math.sqrt(cells.count())))
            for i in [(r * w + c) for r, c in ((3, 4), (3, 5), (4, 5), (4, 6), (5, 6), (5, 7), (6, 7))]:
                before = image_digest(page, f".{TokenSurgery.css_class}-decoded")[1]
                cells.nth(i).click()
                _wait_digest_change(page, f".{TokenSurgery.css_class}-decoded", before, 30.0)
            for css, name in ((TokenSurgery.css_class, "teaching_surgery.png"),
                              (SameCTR.css_class, "teaching_same_ctr.png"),
                              (ARvsReAR.css_class, "teaching_ar_vs_rear.png")):
                path = out / name
                page.locator(f".{css}").first.screenshot(path=str(path))
                written.append(path)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return written


def _wait_digest_change(page, selector: str, before: str, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        d = image_digest(page, selector)[1]
        if d != before:
            return d
        time.sleep(0.1)
    raise TimeoutError(f"{selector} did not change within {timeout_s:.0f} s")


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m rearlib teaching", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("screenshots", help="serve notebook 14 with Voila and save PNGs of its widgets "
                                           "(needs Debian's chromium and the dev extra: voila, playwright)")
    s.add_argument("--out", default="figures/teaching")
    s.add_argument("--timeout", type=float, default=240.0)
    a = ap.parse_args(argv)
    for p in take_screenshots(a.out, timeout_s=a.timeout):
        print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
