"""Our own VQ tokenizer (VQGAN-style CNN + vector quantizer) and its trainer.

Model
-----
Encoder: ``conv_in`` 3x3, then per level ``num_res_blocks`` ResBlocks (GroupNorm, SiLU, conv3x3, twice, plus a
1x1 projection of the input when the width changes) and, except after the last level, a stride-2 3x3 conv;
two ResBlocks in the middle; GroupNorm, SiLU, 1x1 conv to ``code_dim``. The decoder mirrors it with
nearest-neighbour 2x upsampling followed by a 3x3 conv. The downsampling factor is ``2**(len(channel_mult)-1)``.
Images enter as ``2x - 1`` and the decoder's output ``y`` is mapped back with ``(y + 1) / 2``.

Quantizer (what keeps codebook usage high)
------------------------------------------
* **l2-normalised lookup** (the ViT-VQGAN recipe, Yu et al. 2022): encoder outputs ``z`` and code vectors
  ``e_k`` are both projected onto the unit sphere and the code of ``z`` is ``argmax_k cos(z, e_k)``; the
  decoder consumes the unit-norm code vector. Codes can therefore never drift far from the encoder outputs in
  norm (the usual way codes die), and the lookup metric *is* the cosine similarity that reAR's analyses use for
  "nearest codebook neighbours", so those neighbours are neighbours for the decoder too.
  ``codebook`` returns these unit-norm vectors.
* **Dead-code restarts** (as in Jukebox, Dhariwal et al. 2020): every ``restart_every`` steps, codes that were
  assigned to no position during that window are re-initialised to randomly chosen (normalised) encoder
  outputs of the current batch, and their Adam moments are zeroed. Restarts stop after ``restart_until`` of the
  run so that the final codebook settles.
* A low code dimension (16-32) also helps usage, and keeps the generator's alignment targets small.
* Optional centring (``center=True``, used at ``smoke``): the raw encoder output minus a running mean (a
  buffer) is what gets normalised. Very short runs otherwise crowd all codes into a narrow cone (mean pairwise
  cosine 0.89 after 120 smoke steps, 0.77 with centring); the ``small`` run does not need it (mean pairwise
  cosine 0.07, all 1024 codes used).

Loss: ``l1_weight * |x - x̂| + l2_weight * (x - x̂)^2 + grad_weight * |∇x - ∇x̂|`` (image finite differences, a
cheap offline edge term) ``+ ||sg(z) - e||^2 + beta * ||z - sg(e)||^2`` (``beta = 0.25``; straight-through
estimator ``z + sg(e - z)`` into the decoder), on the unit-norm vectors; optionally a PatchGAN hinge
adversarial term after a warm-up, weighted adaptively as in VQGAN (Esser et al. 2021). No pretrained network
is needed (nothing can be downloaded here), so there is no perceptual (LPIPS) loss.

CLI: ``python -m rearlib vqgan train --scale small --out data/checkpoints/tokenizer_small.pt``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from rearlib.tokenizers.base import Tokenizer, load_checkpoint, round_weights_, save_tokenizer
from rearlib import scales

TRAINER_VERSION = 1  # bump when training code changes what a config produces (invalidates smoke caches)



@dataclass
class VQConfig:
    """Architecture of :class:`VQTokenizer`."""

    resolution: int = 64
    base_channels: int = 64
    channel_mult: tuple = (1, 2, 2)
    num_res_blocks: int = 2
    codebook_size: int = 1024
    code_dim: int = 32
    norm_groups: int = 32
    beta: float = 0.25
    # Subtract a running mean of the encoder output before l2-normalising (see VQTokenizer._to_unit). Off by
    # default so that configs written before the option existed keep their meaning and identity.
    center: bool = False
    center_momentum: float = 0.99

    def __post_init__(self):
        self.channel_mult = tuple(int(m) for m in self.channel_mult)
        if not self.channel_mult or min(self.channel_mult) < 1:
            raise ValueError(f"channel_mult must be a non-empty tuple of positive ints, got {self.channel_mult}")
        f = self.downsample_factor
        if self.resolution % f or self.resolution < f:
            raise ValueError(f"resolution {self.resolution} must be a positive multiple of the downsampling factor "
                             f"{f} (= 2**(len(channel_mult)-1))")
        if self.codebook_size < 2:
            raise ValueError(f"codebook_size must be >= 2, got {self.codebook_size}")
        if self.code_dim < 1 or self.num_res_blocks < 1:
            raise ValueError("code_dim and num_res_blocks must be >= 1")
        for c in [self.base_channels * m for m in self.channel_mult]:
            if c % self.norm_groups:
                raise ValueError(f"width {c} is not divisible by norm_groups={self.norm_groups}")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    @classmethod
    def from_dict(cls, d: dict) -> "VQConfig":
        from rearlib.runtime import config_from_dict

        return config_from_dict(cls, d, "keys")


@dataclass
class VQTrainConfig:
    """Trainer settings. Data: ShapeScenes-10 ``train`` images rendered on the fly from indices drawn uniformly
    in ``[0, train_size)``; validation: the first ``val_size`` images of the ``val`` split."""

    steps: int = 6000
    batch_size: int = 128
    lr: float = 5e-4
    betas: tuple = (0.9, 0.99)
    warmup_steps: int = 200
    min_lr_ratio: float = 0.1          # cosine decay from lr to lr * min_lr_ratio
    l1_weight: float = 1.0
    l2_weight: float = 1.0
    grad_weight: float = 0.5
    adv_weight: float = 0.0            # 0 disables the discriminator entirely
    adv_start: float = 0.5             # fraction of the run after which the adversarial term is on
    restart_every: int = 50
    restart_until: float = 0.8         # fraction of the run after which no more restarts happen
    flip: bool = True                  # random horizontal flips
    train_size: int = 1_000_000
    val_size: int = 256
    data_seed: int = 0
    seed: int = 0
    time_budget_s: float | None = None  # if set, the schedule follows max(step/steps, elapsed/budget)
    compile: bool = False
    log_every: int = 100

    @classmethod
    def from_dict(cls, d: dict) -> "VQTrainConfig":
        from rearlib.runtime import config_from_dict

        return config_from_dict(cls, d, "keys")


# ----------------------------------------------------------------------------------------------------------
# Network
# ----------------------------------------------------------------------------------------------------------
class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=1e-6)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, cout, eps=1e-6)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()
        # Start each residual branch near zero so the deep stack begins as (almost) the identity.
        nn.init.zeros_(self.conv2.bias)
        with torch.no_grad():
            self.conv2.weight.mul_(0.1)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class Encoder(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        C, g = cfg.base_channels, cfg.norm_groups
        self.conv_in = nn.Conv2d(3, C, 3, padding=1)
        layers, cin = [], C
        for i, m in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers.append(ResBlock(cin, C * m, g))
                cin = C * m
            if i < len(cfg.channel_mult) - 1:
                layers.append(nn.Conv2d(cin, cin, 3, stride=2, padding=1))
        layers += [ResBlock(cin, cin, g), ResBlock(cin, cin, g)]
        self.body = nn.Sequential(*layers)
        self.norm_out = nn.GroupNorm(g, cin, eps=1e-6)
        self.conv_out = nn.Conv2d(cin, cfg.code_dim, 1)

    def forward(self, x):
        return self.conv_out(F.silu(self.norm_out(self.body(self.conv_in(x)))))


class Upsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Decoder(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        C, g = cfg.base_channels, cfg.norm_groups
        cin = C * cfg.channel_mult[-1]
        self.conv_in = nn.Conv2d(cfg.code_dim, cin, 3, padding=1)
        layers = [ResBlock(cin, cin, g), ResBlock(cin, cin, g)]
        for i in reversed(range(len(cfg.channel_mult))):
            for _ in range(cfg.num_res_blocks):
                layers.append(ResBlock(cin, C * cfg.channel_mult[i], g))
                cin = C * cfg.channel_mult[i]
            if i > 0:
                layers.append(Upsample(cin))
        self.body = nn.Sequential(*layers)
        self.norm_out = nn.GroupNorm(g, cin, eps=1e-6)
        self.conv_out = nn.Conv2d(cin, 3, 3, padding=1)

    def forward(self, q):
        return self.conv_out(F.silu(self.norm_out(self.body(self.conv_in(q)))))


class VectorQuantizer(nn.Module):
    """l2-normalised codebook lookup with commitment loss and the straight-through estimator."""

    def __init__(self, codebook_size: int, code_dim: int, beta: float = 0.25):
        super().__init__()
        self.beta = beta
        self.embedding = nn.Embedding(codebook_size, code_dim)
        nn.init.normal_(self.embedding.weight)

    @property
    def codes(self) -> torch.Tensor:
        """Unit-norm code vectors ``[K, D]`` (what the decoder consumes)."""
        return F.normalize(self.embedding.weight.float(), dim=1)

    def lookup_ids(self, z_unit: torch.Tensor) -> torch.Tensor:
        """``z_unit`` ``[N, D]`` (unit norm) -> ids ``[N]`` of the code with the highest cosine similarity."""
        # Always float32: under bf16 autocast the similarities would round and near-ties would flip.
        with torch.autocast(z_unit.device.type, enabled=False):
            return (z_unit.float() @ self.codes.detach().T).argmax(dim=1)

    def forward(self, z_unit: torch.Tensor):
        """``z_unit`` ``[B, D, h, w]`` -> (straight-through codes ``[B, D, h, w]``, ids ``[B, h, w]``, vq loss)."""
        B, D, h, w = z_unit.shape
        with torch.autocast(z_unit.device.type, enabled=False):
            flat = z_unit.permute(0, 2, 3, 1).reshape(-1, D).float()
            ids = self.lookup_ids(flat.detach())
            q = self.codes[ids]
            codebook_loss = F.mse_loss(q, flat.detach())
            commit_loss = F.mse_loss(flat, q.detach())
            q_st = flat + (q - flat).detach()
        q_st = q_st.view(B, h, w, D).permute(0, 3, 1, 2)
        return q_st, ids.view(B, h, w), codebook_loss + self.beta * commit_loss


class VQTokenizer(Tokenizer):
    """Our VQGAN-style tokenizer; see the module docstring. Implements the :mod:`rearlib.tokenizers` interface."""

    kind = "vq"

    def __init__(self, config: VQConfig | dict | None = None):
        super().__init__()
        if config is None:
            config = VQConfig()
        elif isinstance(config, dict):
            config = VQConfig.from_dict(config)
        self.cfg = config
        self.resolution = config.resolution
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quantizer = VectorQuantizer(config.codebook_size, config.code_dim, config.beta)
        if config.center:
            # Running mean of the raw encoder output (and how many batches it has seen), see ``_to_unit``.
            self.register_buffer("z_mean", torch.zeros(config.code_dim))
            self.register_buffer("z_mean_count", torch.zeros((), dtype=torch.long))

    @classmethod
    def from_config(cls, config: dict) -> "VQTokenizer":
        return cls(config)

    def config_dict(self) -> dict:
        """The config as plain JSON types. Options that are off (``center=False``) are left out, so a model
        without them has the same config, hence the same ``identity()``, as before the option existed."""
        d = asdict(self.cfg)
        d["channel_mult"] = list(d["channel_mult"])
        if not d["center"]:
            del d["center"], d["center_momentum"]
        return d

    @property
    def codebook(self) -> torch.Tensor:
        return self.quantizer.codes

    @property
    def downsample_factor(self) -> int:
        return self.cfg.downsample_factor

    def _to_unit(self, z_raw: torch.Tensor, update: bool) -> torch.Tensor:
        """Centre the raw encoder output by its running mean, then l2-normalise (the lookup space).

        Why centre: without it the encoder outputs of a young network share a large common component, so
        their directions (and the codes restarted from them) crowd into a narrow cone where every code has
        cosine ~0.98 with every other; the codes are then barely distinguishable as alignment targets and
        "nearest neighbour" loses meaning. Subtracting the mean spreads the directions over the sphere.
        The mean is a buffer (a running average in training, fixed at inference), so encoding stays
        independent of the batch. It is a cumulative average for the first ``1/(1-momentum)`` updates, then
        an exponential moving average.
        """
        z = z_raw.float()
        if self.cfg.center:
            if update:
                with torch.no_grad():
                    # A tensor weight: no host sync per step on CUDA.
                    w = (1.0 / (self.z_mean_count + 1).float()).clamp_min(1.0 - self.cfg.center_momentum)
                    self.z_mean.lerp_(z.mean(dim=(0, 2, 3)), w)
                    self.z_mean_count += 1
            z = z - self.z_mean.view(1, -1, 1, 1)
        return F.normalize(z, dim=1)

    def encode_features(self, images: torch.Tensor) -> torch.Tensor:
        """Unit-norm (centred) encoder output ``[B, D, h, w]`` for images in [0, 1]: the lookup space."""
        return self._to_unit(self.encoder(images * 2.0 - 1.0), update=False)

    def quantize_features(self, z: torch.Tensor) -> torch.Tensor:
        B, D, h, w = z.shape
        return self.quantizer.lookup_ids(F.normalize(z.permute(0, 2, 3, 1).reshape(-1, D).float(), dim=1)).view(B, h, w)

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Decoder output in image units, *unclamped*, for code vectors ``[B, D, h, w]``."""
        return (self.decoder(codes).float() + 1.0) / 2.0

    def forward(self, images: torch.Tensor):
        """Training pass: images in [0, 1] -> (reconstruction (unclamped), ids, vq loss, unit encoder output)."""
        z = self._to_unit(self.encoder(images * 2.0 - 1.0), update=self.training)
        q, ids, vq_loss = self.quantizer(z)
        return (self.decoder(q.to(z.dtype)).float() + 1.0) / 2.0, ids, vq_loss, z


# ----------------------------------------------------------------------------------------------------------
# Optional adversarial term
# ----------------------------------------------------------------------------------------------------------
class PatchDiscriminator(nn.Module):
    """A small PatchGAN (Isola et al. 2017): one real/fake logit per overlapping patch."""

    def __init__(self, base: int = 64, groups: int = 32):
        super().__init__()
        def block(cin, cout, stride, norm=True):
            return [nn.Conv2d(cin, cout, 4, stride, 1)] + ([nn.GroupNorm(min(groups, cout), cout)] if norm else []) \
                + [nn.LeakyReLU(0.2)]
        self.net = nn.Sequential(*block(3, base, 2, norm=False), *block(base, 2 * base, 2),
                                 *block(2 * base, 4 * base, 1), nn.Conv2d(4 * base, 1, 4, 1, 1))

    def forward(self, x):
        return self.net(x * 2.0 - 1.0)


# ----------------------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------------------
def to_uint8(images: torch.Tensor):
    """float [B,3,H,W] in [0,1] -> numpy uint8 [B,H,W,3], round(255 x) (as rearlib.metrics.to_uint8)."""
    return (images.detach().float().clamp(0, 1) * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def psnr_ssim(reference: torch.Tensor, reconstruction: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-image PSNR (dB, L = 255) and SSIM (scikit-image defaults, 7x7 window, channel_axis) on uint8 images."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    a, b = to_uint8(reference), to_uint8(reconstruction)
    psnr = [float(peak_signal_noise_ratio(x, y, data_range=255)) for x, y in zip(a, b)]
    ssim = [float(structural_similarity(x, y, data_range=255, channel_axis=-1)) for x, y in zip(a, b)]
    return psnr, ssim


def code_usage(tokens: torch.Tensor, codebook_size: int) -> dict:
    """``usage``: fraction of the K codes that occur at least once in ``tokens``; ``perplexity``:
    ``exp(-sum_k p_k log p_k)`` of the empirical code frequencies ``p`` (K when uniform, 1 when one code);
    ``counts``: the per-code counts (LongTensor [K], CPU)."""
    counts = torch.bincount(tokens.flatten().cpu(), minlength=codebook_size)
    p = counts.double() / counts.sum().clamp_min(1)
    ent = -(p[p > 0] * p[p > 0].log()).sum().item()
    return {"usage": float((counts > 0).double().mean()), "perplexity": float(math.exp(ent)), "counts": counts}


@torch.no_grad()
def evaluate(tokenizer: Tokenizer, images: torch.Tensor, batch_size: int = 256) -> dict:
    """Reconstruction PSNR/SSIM (means over images), L1/MSE in [0,1] units, and code usage/perplexity."""
    recs, toks = [], []
    for i in range(0, images.shape[0], batch_size):
        t = tokenizer.encode(images[i:i + batch_size])
        toks.append(t.cpu())
        recs.append(tokenizer.decode(t).cpu())
    rec, tok = torch.cat(recs), torch.cat(toks)
    ref = images.cpu().float()
    psnr, ssim = psnr_ssim(ref, rec)
    use = code_usage(tok, tokenizer.codebook_size)
    return {"n_images": int(images.shape[0]), "psnr": sum(psnr) / len(psnr), "ssim": sum(ssim) / len(ssim),
            "l1": float((rec - ref).abs().mean()), "mse": float(((rec - ref) ** 2).mean()),
            "usage": use["usage"], "perplexity": use["perplexity"]}


# ----------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------
def _image_gradients(x):
    return x[..., :, 1:] - x[..., :, :-1], x[..., 1:, :] - x[..., :-1, :]


def reconstruction_loss(x: torch.Tensor, y: torch.Tensor, tc: VQTrainConfig) -> torch.Tensor:
    loss = tc.l1_weight * (x - y).abs().mean() + tc.l2_weight * ((x - y) ** 2).mean()
    if tc.grad_weight:
        (gx, gy), (hx, hy) = _image_gradients(x), _image_gradients(y)
        loss = loss + tc.grad_weight * ((gx - hx).abs().mean() + (gy - hy).abs().mean())
    return loss


def _render(indices, resolution, split, seed, device):
    from rearlib.data import render_batch

    images, _ = render_batch(indices, resolution=resolution, seed=seed, split=split, device=device)
    return images


def train_vq(model_cfg: VQConfig | dict, train_cfg: VQTrainConfig | dict, device="auto", progress: bool = True,
             round_to: torch.dtype | None = torch.float16) -> tuple[VQTokenizer, dict]:
    """Train a :class:`VQTokenizer` on ShapeScenes-10 and return ``(tokenizer in eval mode, metrics)``.

    ``round_to``: round the final weights to this dtype's precision (kept float32) *before* the validation
    metrics are computed, so that metrics describe exactly the weights a checkpoint of that dtype stores.

    bf16 autocast and channels-last on CUDA; float32 on CPU. The codebook lookup and all losses are float32.
    A non-finite loss raises ``FloatingPointError`` (nothing is written). ``metrics`` holds the validation
    PSNR/SSIM/usage/perplexity, the loss curve (every ``log_every`` steps), steps done, wall time and hardware.
    """
    from tqdm.auto import tqdm

    from rearlib.runtime import hardware_info, resolve_device

    mc = model_cfg if isinstance(model_cfg, VQConfig) else VQConfig.from_dict(dict(model_cfg))
    tc = train_cfg if isinstance(train_cfg, VQTrainConfig) else VQTrainConfig.from_dict(dict(train_cfg))
    device = resolve_device(device) if isinstance(device, (str, type(None))) else torch.device(device)
    cuda = device.type == "cuda"
    torch.manual_seed(tc.seed)
    model = VQTokenizer(mc).to(device)
    benchmark_flag = torch.backends.cudnn.benchmark
    if cuda:
        model = model.to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick the fastest kernels (restored below)
    net = torch.compile(model) if (tc.compile and cuda) else model
    opt = torch.optim.Adam(model.parameters(), lr=tc.lr, betas=tuple(tc.betas), fused=cuda or None)
    disc = d_opt = None
    if tc.adv_weight > 0:
        disc = PatchDiscriminator(base=min(64, 4 * mc.base_channels), groups=mc.norm_groups).to(device)
        d_opt = torch.optim.Adam(disc.parameters(), lr=tc.lr, betas=(0.5, 0.9), fused=cuda or None)
    gen = torch.Generator().manual_seed(tc.data_seed * 1_000_003 + tc.seed)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    K = mc.codebook_size
    window_counts = torch.zeros(K, dtype=torch.long, device=device)
    last_layer = model.decoder.conv_out.weight
    history, restarts = [], []
    t0 = time.time()
    step, progress_frac = 0, 0.0
    bar = tqdm(total=tc.steps, desc=f"train VQ tokenizer ({device.type})", disable=not progress, mininterval=1.0)
    model.train()
    while step < tc.steps:
        elapsed = time.time() - t0
        progress_frac = step / tc.steps
        if tc.time_budget_s:
            progress_frac = max(progress_frac, elapsed / tc.time_budget_s)
        if progress_frac >= 1.0:
            break  # only reachable through the time budget
        lr = tc.lr * min(1.0, (step + 1) / max(1, tc.warmup_steps))
        lr *= tc.min_lr_ratio + (1 - tc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress_frac))
        for g in opt.param_groups:
            g["lr"] = lr
        idx = torch.randint(0, tc.train_size, (tc.batch_size,), generator=gen)
        x = _render(idx, mc.resolution, "train", tc.data_seed, device)
        if tc.flip:
            flip = (torch.rand(tc.batch_size, generator=gen) < 0.5).to(device).view(-1, 1, 1, 1)
            x = torch.where(flip, x.flip(-1), x)
        if cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        with amp:
            rec, ids, vq_loss, z = net(x)
        rec = rec.float()
        rec_loss = reconstruction_loss(x, rec, tc)
        loss = rec_loss + vq_loss
        adv_on = disc is not None and progress_frac >= tc.adv_start
        g_adv = torch.zeros((), device=device)
        if adv_on:
            with amp:
                g_adv = -disc(rec).float().mean()
            # Adaptive weight (VQGAN): balance the adversarial gradient against the reconstruction gradient
            # at the decoder's last layer, so the GAN term can never swamp reconstruction.
            gr = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0].norm()
            ga = torch.autograd.grad(g_adv, last_layer, retain_graph=True)[0].norm()
            w = (gr / (ga + 1e-4)).clamp(0, 1e4).detach() * tc.adv_weight
            loss = loss + w * g_adv
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        d_loss = torch.zeros((), device=device)
        if adv_on:
            with amp:
                d_real, d_fake = disc(x).float(), disc(rec.detach()).float()
            d_loss = F.relu(1 - d_real).mean() + F.relu(1 + d_fake).mean()
            d_opt.zero_grad(set_to_none=True)
            d_loss.backward()
            d_opt.step()
        flat_ids = ids.flatten()
        window_counts.scatter_add_(0, flat_ids, torch.ones_like(flat_ids))  # bincount would sync on CUDA
        step += 1
        if step % tc.restart_every == 0:
            dead = (window_counts == 0).nonzero().flatten()
            if progress_frac < tc.restart_until and dead.numel() > 0:
                _restart_codes(model.quantizer, opt, dead, z.detach(), gen)
            restarts.append({"step": step, "dead": int(dead.numel()),
                             "restarted": int(dead.numel()) if progress_frac < tc.restart_until else 0})
            window_counts.zero_()
        if step % tc.log_every == 0 or step == tc.steps:
            # One host sync per log interval, not per step; a non-finite loss stops the run here (nothing
            # has been written yet, so no half-trained checkpoint can replace a good one).
            rec_v, vq_v, tot_v = float(rec_loss.detach()), float(vq_loss.detach()), float(loss.detach())
            if not math.isfinite(tot_v):
                bar.close()
                raise FloatingPointError(f"non-finite VQ tokenizer loss by step {step} (rec={rec_v:.4g}, "
                                         f"vq={vq_v:.4g}); lower lr (now {lr:.3g}) or disable adv_weight")
            history.append({"step": step, "rec_loss": rec_v, "vq_loss": vq_v, "lr": lr,
                            "adv_g": float(g_adv.detach()), "adv_d": float(d_loss.detach()),
                            "elapsed_s": time.time() - t0})
            bar.set_postfix(rec=f"{rec_v:.4f}", vq=f"{vq_v:.4f}", dead=restarts[-1]["dead"] if restarts else "-")
        bar.update(1)
    bar.close()
    if cuda:
        torch.cuda.synchronize()
        torch.backends.cudnn.benchmark = benchmark_flag
    train_s = time.time() - t0
    model.eval()
    model = model.to(memory_format=torch.contiguous_format)
    if round_to is not None:
        round_weights_(model, round_to)
    val_idx = torch.arange(tc.val_size)
    val = _render(val_idx, mc.resolution, "val", tc.data_seed, device)
    metrics = {
        "steps_done": step, "steps_planned": tc.steps, "stopped_by_time_budget": step < tc.steps,
        "train_wall_s": train_s, "images_per_s": step * tc.batch_size / max(train_s, 1e-9),
        "val": evaluate(model, val), "val_split": f"ShapeScenes-10 val[0:{tc.val_size}] seed {tc.data_seed}",
        "history": history, "restarts": restarts, "hardware": hardware_info(), "device": str(device),
        "model_config": model.config_dict(), "train_config": _jsonable(asdict(tc)),
        "weights_rounded_to": str(round_to).replace("torch.", "") if round_to is not None else None,
        "num_params": sum(p.numel() for p in model.parameters()),
    }
    return model, metrics


def _restart_codes(quantizer: VectorQuantizer, opt: torch.optim.Optimizer, dead: torch.Tensor,
                   z_unit: torch.Tensor, gen: torch.Generator) -> None:
    """Re-initialise ``dead`` codes to random unit-norm encoder outputs of the batch; zero their Adam moments."""
    D = z_unit.shape[1]
    pool = z_unit.permute(0, 2, 3, 1).reshape(-1, D).float()
    pick = torch.randint(0, pool.shape[0], (dead.numel(),), generator=gen).to(pool.device)
    noise = torch.randn(dead.numel(), D, generator=gen).to(pool.device) * 0.01
    w = quantizer.embedding.weight
    with torch.no_grad():
        w[dead] = F.normalize(pool[pick] + noise, dim=1).to(w.dtype)
    state = opt.state.get(w, {})
    for key in ("exp_avg", "exp_avg_sq"):
        if key in state:
            state[key][dead] = 0


def _jsonable(d):
    return json.loads(json.dumps(d, default=lambda o: list(o) if isinstance(o, tuple) else str(o)))


def scale_configs(scale: str) -> tuple[VQConfig, VQTrainConfig]:
    from rearlib.scales import validate_scale

    validate_scale(scale)
    if scales.VQ_TOKENIZER[scale] is None:
        raise ValueError(f"scale {scale!r} uses the MaskGIT-VQGAN (rearlib.tokenizers.maskgit_vqgan), not a trained VQ "
                         f"tokenizer; trainable scales: {[s for s, v in scales.VQ_TOKENIZER.items() if v]}")
    return VQConfig.from_dict(scales.VQ_TOKENIZER[scale]["model"]), VQTrainConfig.from_dict(scales.VQ_TOKENIZER[scale]["train"])


def get_or_train(scale: str = "smoke", device="auto", progress: bool = True, root=None) -> VQTokenizer:
    """The tokenizer of ``scale`` from ``artifacts/tokenizer/<hash>/tokenizer.pt``, training it first if absent."""
    from rearlib.runtime import artifact_dir

    mc, tc = scale_configs(scale)
    key = {"scale": scale, "model": asdict(mc), "train": asdict(tc), "trainer_version": TRAINER_VERSION}
    path = artifact_dir("tokenizer", key, root=root) / "tokenizer.pt"
    if path.is_file():
        return load_checkpoint(path, device)
    # Rounded to fp16 before evaluation: the cached weights are exactly the ones the metrics describe.
    model, metrics = train_vq(mc, tc, device=device, progress=progress, round_to=torch.float16)
    save_tokenizer(model, path, dtype=torch.float16, meta={"metrics": metrics})
    model.checkpoint_meta = json.loads(json.dumps({"metrics": metrics}, default=str))  # as load_tokenizer sets it
    return model


# ----------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m rearlib vqgan", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train a VQ tokenizer and write a checkpoint + metrics JSON")
    t.add_argument("--scale", default="small", choices=[s for s, v in scales.VQ_TOKENIZER.items() if v])
    t.add_argument("--out", required=True, help="checkpoint path (.pt); metrics go to the same path with .json")
    t.add_argument("--device", default="auto")
    t.add_argument("--steps", type=int, default=None, help="override the scale's number of steps")
    t.add_argument("--time-budget", type=float, default=None, help="seconds; overrides the scale's budget")
    t.add_argument("--adv-weight", type=float, default=None, help="> 0 enables the PatchGAN term")
    t.add_argument("--compile", action="store_true", help="torch.compile the network (CUDA only)")
    t.add_argument("--seed", type=int, default=None)
    t.add_argument("--no-progress", action="store_true")
    e = sub.add_parser("eval", help="evaluate a tokenizer checkpoint on ShapeScenes-10 val")
    e.add_argument("checkpoint")
    e.add_argument("--n", type=int, default=512)
    e.add_argument("--device", default="auto")
    a = p.parse_args(argv)

    from rearlib.runtime import atomic_write_text

    if a.cmd == "eval":
        tok = load_checkpoint(a.checkpoint, a.device)
        val = _render(torch.arange(a.n), tok.resolution, "val", 0, tok.device)
        print(json.dumps(evaluate(tok, val), indent=2))
        return 0

    mc, tc = scale_configs(a.scale)
    over = {"steps": a.steps, "time_budget_s": a.time_budget, "adv_weight": a.adv_weight, "seed": a.seed}
    tc = VQTrainConfig.from_dict({**asdict(tc), **{k: v for k, v in over.items() if v is not None},
                                **({"compile": True} if a.compile else {})})
    out = Path(a.out)
    # Ship fp16 weights (half the size); the weights are rounded before evaluation, so the printed metrics
    # describe exactly the shipped file.
    model, metrics = train_vq(mc, tc, device=a.device, progress=not a.no_progress, round_to=torch.float16)
    metrics["identity"] = model.identity()
    metrics["checkpoint"] = str(out)
    ident = save_tokenizer(model, out, dtype=torch.float16, meta={"metrics": metrics})
    assert ident == metrics["identity"]
    metrics["checkpoint_bytes"] = out.stat().st_size
    summary = {k: v for k, v in metrics.items() if k not in ("history", "restarts")}
    summary["final_train_rec_loss"] = metrics["history"][-1]["rec_loss"] if metrics["history"] else None
    summary["restarted_codes_total"] = sum(r["restarted"] for r in metrics["restarts"])
    atomic_write_text(out.with_suffix(".json"), json.dumps(summary, indent=2))
    v = metrics["val"]
    gpu = metrics["hardware"].get("gpu") or "none (CPU)"
    print(f"[vqgan] {a.scale}: {mc.resolution}px, grid {mc.resolution // mc.downsample_factor}x"
          f"{mc.resolution // mc.downsample_factor}, K={mc.codebook_size}, D={mc.code_dim}, "
          f"{metrics['num_params'] / 1e6:.2f}M params")
    print(f"[vqgan] steps {metrics['steps_done']}/{tc.steps} (batch {tc.batch_size}), train wall "
          f"{metrics['train_wall_s']:.1f}s, {metrics['images_per_s']:.0f} img/s, GPU: {gpu}"
          + ("  [stopped by the time budget]" if metrics["stopped_by_time_budget"] else ""))
    print(f"[vqgan] val ({v['n_images']} images): PSNR {v['psnr']:.2f} dB, SSIM {v['ssim']:.4f}, "
          f"codebook usage {v['usage']:.3f}, code perplexity {v['perplexity']:.1f} (of K={mc.codebook_size})")
    print(f"[vqgan] wrote {out} ({metrics['checkpoint_bytes'] / 2**20:.2f} MiB, identity {ident}) and "
          f"{out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
