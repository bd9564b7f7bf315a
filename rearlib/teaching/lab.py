"""The lab the teaching widgets share: tokenizer, generators, classifier, image source and caches.

Responsiveness: every computation runs under ``torch.inference_mode`` with ``num_threads`` intra-op threads (1 by
default: on a shared, busy 2-core CPU a second thread made decoding 4x slower; ``"auto"`` measures which is faster);
encodings, reconstructions, predictions and samples are cached.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import time
import warnings
from collections import OrderedDict
from typing import Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from rearlib import scales
from rearlib.analysis import codebook_neighbours, image_metrics, teacher_forced_predictions
from rearlib.data import CLASS_NAMES, adm_center_crop, render_batch
from rearlib.experiments.zoo import get_generator
from rearlib.metrics import perceptual_metric_name
from rearlib.metrics.classifier import get_classifier
from rearlib.runtime import resolve_device
from rearlib.sample import generate as generate_tokens
from rearlib.sample import generate_progressive
from rearlib.tokenizers import get_tokenizer


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


class Lab:
    """Tokenizer, generators, image source, perceptual metric and caches that the widgets share.

    tokenizer: a rearlib tokenizer (encode / decode / codebook / grid_size / resolution). generators: ``{name:
    Generator}`` for the token surgery's continuation and :class:`~rearlib.teaching.widgets.ARvsReAR`
    (names such as "ar", "rear").
    images / labels: the image source ([n, 3, R, R] float in [0, 1] and [n] labels); by default ShapeScenes-10
    ``split`` images 0..n_images-1 rendered lazily with ``data_seed``. class_names: names of the labels
    (default ``rearlib.data.CLASS_NAMES`` when there are 10 classes, else the numbers). classifier: the
    in-project classifier (to name the class of samples / uploads, and for ``perceptual="dfd"``). perceptual:
    ``prefer`` of :func:`rearlib.metrics.perceptual_distance` (default ``"auto"``). num_threads: intra-op threads
    while computing (an int; ``"auto"``: the faster of 1 and torch's current count, measured once
    (:meth:`_pick_threads`); None: leave torch's setting alone).
    """

    DECODE_CACHE = 512

    def __init__(self, tokenizer, generators: dict, *, images=None, labels=None, n_images: int = 256,
                 data_seed: int = 0, split: str = "val", class_names: Sequence[str] | None = None,
                 classifier=None, perceptual: str = "auto", scale: str = "small",
                 num_threads: int | str | None = 1):
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
        scales.validate_scale(scale)
        if scale == "paper":
            raise ValueError("Lab.from_scale covers the shipped small models (smoke / small); at paper scale build "
                             "Lab(tokenizer, generators, images=..., labels=...) from rearlib.experiments.assets")
        dev = resolve_device(device) if isinstance(device, str) else device
        tok = get_tokenizer("small", dev, progress=False)
        gens = {v: get_generator("small", v, tokenizer=tok, device=dev, progress=False) for v in variants}
        clf = get_classifier("small", dev)
        n = n_images or scales.TEACHING[scale]["n_images"]
        return cls(tok, gens, n_images=n, data_seed=scales.GENERATOR_DATA["small"]["seed"], classifier=clf,
                   scale="small", **kw)

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
            x, y = render_batch(torch.tensor([key]), self.resolution, seed=self.data_seed, split=self.split)
            self._cache[ck] = (x[0].cpu(), int(y[0]),
                               f"ShapeScenes-10 {self.split} #{key} ({self.class_names[int(y[0])]})")
        return self._cache[ck]

    def add_upload(self, content: bytes, name: str = "upload") -> str:
        """Register an image file's bytes (any format PIL reads): centre-cropped and resized to the tokenizer's
        resolution (rearlib.data.adm_center_crop). Its label is the classifier's guess (else 0). Returns its key."""
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
                self._cache[ck] = generate_tokens(model, torch.tensor([int(label)], device=dev), cfg_scale=g,
                                                  seed=int(seed), fast=False)[0].cpu()
        return self._cache[ck]

    def generate_live(self, names: Sequence[str], label: int, seed: int, cfg_scale: float | None = None,
                      every: int = 32):
        """Sample with the models ``names`` at once, token by token: yields ``{model: (n_done, tokens [N])}`` every
        ``every`` tokens (the models advance in lockstep) and fills the same cache as :meth:`generate` at the end. The
        same random numbers as :meth:`generate`, so the final tokens are identical. A CPU samples 256 tokens in
        seconds; this lets a display show the raster scan as it happens instead of waiting for it."""
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
