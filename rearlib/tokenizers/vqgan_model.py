"""Our VQ tokenizer's network: :class:`VQConfig`, the VQGAN-style CNN encoder / decoder, the l2-normalised vector
quantizer and :class:`VQTokenizer` (the :mod:`rearlib.tokenizers` interface). Training is in
:mod:`rearlib.tokenizers.vqgan_training`.

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
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from rearlib.runtime import config_from_dict
from rearlib.tokenizers.base import Tokenizer

__all__ = ["VQConfig", "VQTokenizer", "VectorQuantizer", "Encoder", "Decoder", "ResBlock", "Upsample"]


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
