"""The paper's tokenizer: a MaskGIT-VQGAN that loads the official ``maskgit-vqgan-imagenet-f16-256.bin``.

reAR tokenizes ImageNet with the MaskGIT VQGAN (Chang et al. 2022) as distributed by TiTok
(Hugging Face ``fun-research/TiTok``): a pure CNN, f = 16, 1024 codes of dimension 256, inputs in [0, 1],
decoder output clamped to [0, 1]. This module re-implements its forward pass from the published parameter
layout (``shared/reference/official_maskgit_vqgan_state_dict.json``) and the prose description, and is
verified tensor-by-tensor against a fixture computed with the authors' code
(``tests/test_maskgit_conformance.py``).

Architecture (``C = hidden_channels``, ``m = channel_mult``, ``L = len(m)`` levels, ``n = num_res_blocks``):

* ResBlock(cin -> cout): ``h = conv3x3(SiLU(GN(x)))`` (cin->cout, no bias), ``h = conv3x3(SiLU(GN(h)))``
  (no bias); output ``h + x`` when ``cin == cout``, else ``h + conv1x1(h)`` (``nin_shortcut``, no bias).
  The shortcut projection is applied to the block's *output*, not its input: that is how the original JAX
  MaskGIT code computes it, and the official weights (``nin_shortcut`` of shape ``[cout, cout, 1, 1]``)
  only fit that reading.
* Encoder: ``conv_in`` 3x3 (3 -> C, no bias); for level ``i``: ``n`` ResBlocks to ``C*m[i]`` channels, then a
  2x2 average pool (stride 2) except after the last level; ``mid``: ``n`` ResBlocks; GN, SiLU,
  ``conv_out`` 1x1 (with bias) to ``z_channels``.
* Quantizer: nearest code under squared Euclidean distance, ``argmin_k ||z - e_k||^2``; the decoder sees
  the raw code vector ``e_k`` (no normalisation).
* Decoder: ``conv_in`` 3x3 (z -> C*m[-1], bias); ``mid``: ``n`` ResBlocks; for level ``i = L-1 .. 0``:
  ``n`` ResBlocks to ``C*m[i]`` channels, then (``i > 0``) nearest-neighbour 2x upsampling followed by
  ``upsample_conv`` 3x3 (bias); GN, SiLU, ``conv_out`` 3x3 (bias) to 3 channels.
* GroupNorm: 32 groups, eps 1e-6, affine.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from rearlib.checkpoints import StateDictMismatchError, load_state_dict_strict
from rearlib.runtime import config_from_dict, load_torch_file
from rearlib.tokenizers.base import Tokenizer

#: The configuration of the released ImageNet checkpoint (``official_maskgit_vqgan_state_dict.json``).
OFFICIAL_CONFIG = {
    "channel_mult": [1, 1, 2, 2, 4], "num_resolutions": 5, "dropout": 0.0, "hidden_channels": 128,
    "num_channels": 3, "num_res_blocks": 2, "resolution": 256, "z_channels": 256, "codebook_size": 1024,
}
NUM_GROUPS = 32
GN_EPS = 1e-6


@dataclass
class MaskGITVQGANConfig:
    """Architecture hyper-parameters, named as in the official config (``codebook_size`` added)."""

    channel_mult: list = field(default_factory=lambda: [1, 1, 2, 2, 4])
    num_resolutions: int = 5
    dropout: float = 0.0
    hidden_channels: int = 128
    num_channels: int = 3
    num_res_blocks: int = 2
    resolution: int = 256
    z_channels: int = 256
    codebook_size: int = 1024

    def __post_init__(self):
        self.channel_mult = [int(m) for m in self.channel_mult]
        if self.num_resolutions != len(self.channel_mult):
            raise ValueError(f"num_resolutions={self.num_resolutions} but channel_mult has "
                             f"{len(self.channel_mult)} entries ({self.channel_mult})")
        if self.dropout != 0.0:
            raise ValueError("dropout != 0 is not supported: the released tokenizer is used for inference only")
        if self.num_channels != 3:
            raise ValueError(f"num_channels must be 3 (RGB), got {self.num_channels}")
        for c in [self.hidden_channels * m for m in self.channel_mult]:
            if c % NUM_GROUPS:
                raise ValueError(f"every width must be divisible by {NUM_GROUPS} (GroupNorm groups); got {c}")
        f = 2 ** (self.num_resolutions - 1)
        if self.resolution % f:
            raise ValueError(f"resolution {self.resolution} is not divisible by the downsampling factor {f}")

    @classmethod
    def from_dict(cls, d: dict) -> "MaskGITVQGANConfig":
        return config_from_dict(cls, d, "keys")


def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(NUM_GROUPS, c, eps=GN_EPS, affine=True)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1 = _norm(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.norm2 = _norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        # Official quirk (see module docstring): the 1x1 projection acts on the residual branch's output.
        self.nin_shortcut = nn.Conv2d(cout, cout, 1, bias=False) if cin != cout else None

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return h + (self.nin_shortcut(h) if self.nin_shortcut is not None else x)


class _Level(nn.Module):
    """One resolution level: ``block`` (ResBlocks) and, in the decoder, an optional ``upsample_conv``."""

    def __init__(self, cin: int, cout: int, n: int, upsample: bool = False):
        super().__init__()
        self.block = nn.ModuleList([ResBlock(cin if j == 0 else cout, cout) for j in range(n)])
        if upsample:
            self.upsample_conv = nn.Conv2d(cout, cout, 3, padding=1)


class Encoder(nn.Module):
    def __init__(self, cfg: MaskGITVQGANConfig):
        super().__init__()
        C, n = cfg.hidden_channels, cfg.num_res_blocks
        self.conv_in = nn.Conv2d(cfg.num_channels, C, 3, padding=1, bias=False)
        widths = [C * m for m in cfg.channel_mult]
        self.down = nn.ModuleList()
        cin = C
        for w in widths:
            self.down.append(_Level(cin, w, n))
            cin = w
        self.mid = nn.ModuleList([ResBlock(cin, cin) for _ in range(n)])
        self.norm_out = _norm(cin)
        self.conv_out = nn.Conv2d(cin, cfg.z_channels, 1)

    def forward(self, x):
        h = self.conv_in(x)
        for i, level in enumerate(self.down):
            for blk in level.block:
                h = blk(h)
            if i < len(self.down) - 1:
                h = F.avg_pool2d(h, 2, 2)
        for blk in self.mid:
            h = blk(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: MaskGITVQGANConfig):
        super().__init__()
        C, n = cfg.hidden_channels, cfg.num_res_blocks
        widths = [C * m for m in cfg.channel_mult]
        cin = widths[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, cin, 3, padding=1)
        self.mid = nn.ModuleList([ResBlock(cin, cin) for _ in range(n)])
        # Built in processing order (deepest level first) but stored at index = level, as the official names.
        levels = {}
        for i in reversed(range(len(widths))):
            levels[i] = _Level(cin, widths[i], n, upsample=i > 0)
            cin = widths[i]
        self.up = nn.ModuleList([levels[i] for i in range(len(widths))])
        self.norm_out = _norm(cin)
        self.conv_out = nn.Conv2d(cin, cfg.num_channels, 3, padding=1)

    def forward(self, z):
        h = self.conv_in(z)
        for blk in self.mid:
            h = blk(h)
        for i in reversed(range(len(self.up))):
            level = self.up[i]
            for blk in level.block:
                h = blk(h)
            if i > 0:
                h = level.upsample_conv(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.conv_out(F.silu(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    def __init__(self, codebook_size: int, dim: int):
        super().__init__()
        self.embedding = nn.Embedding(codebook_size, dim)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """``z`` ``[B, D, h, w]`` -> ids ``[B, h, w]`` of ``argmin_k ||z - e_k||^2``."""
        B, D, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, D).float()
        e = self.embedding.weight.float()
        # ||z||^2 is constant per row; argmin of ||e||^2 - 2 z.e gives the same ids with less round-off.
        d = (e * e).sum(1)[None, :] - 2.0 * flat @ e.T
        return d.argmin(dim=1).view(B, h, w)


class MaskGITVQGAN(Tokenizer):
    """MaskGIT-VQGAN with the official parameter names; see the module docstring for the exact forward."""

    kind = "maskgit_vqgan"

    def __init__(self, config: MaskGITVQGANConfig | dict | None = None):
        super().__init__()
        if config is None:
            config = MaskGITVQGANConfig()
        elif isinstance(config, dict):
            config = MaskGITVQGANConfig.from_dict(config)
        self.cfg = config
        self.resolution = config.resolution
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quantize = VectorQuantizer(config.codebook_size, config.z_channels)

    @classmethod
    def from_config(cls, config: dict) -> "MaskGITVQGAN":
        return cls(config)

    def config_dict(self) -> dict:
        return asdict(self.cfg)

    @property
    def codebook(self) -> torch.Tensor:
        return self.quantize.embedding.weight

    @property
    def downsample_factor(self) -> int:
        return 2 ** (self.cfg.num_resolutions - 1)

    def encode_features(self, images: torch.Tensor) -> torch.Tensor:
        """Continuous encoder output ``[B, z, h, w]`` for images in [0, 1] (no normalisation inside)."""
        return self.encoder(images)

    def quantize_features(self, z: torch.Tensor) -> torch.Tensor:
        return self.quantize(z)

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Decoder output, *unclamped*, for code vectors ``[B, z, h, w]``; ``decode`` clamps to [0, 1]."""
        return self.decoder(codes)


# ----------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------
def infer_config(state_dict: dict, resolution: int | None = None) -> dict:
    """Read the architecture off an official-layout state dict (names and shapes only).

    ``resolution`` cannot be inferred (the network is fully convolutional); it defaults to 256.
    Raises :class:`StateDictMismatchError` if the keys needed for inference are absent.
    """
    need = ["encoder.conv_in.weight", "encoder.conv_out.weight", "quantize.embedding.weight"]
    missing = [k for k in need if k not in state_dict]
    if missing:
        raise StateDictMismatchError(
            f"not a MaskGIT-VQGAN state dict: cannot infer the architecture, missing keys {missing}"
            + (f" (first keys given: {list(state_dict)[:5]})" if state_dict else " (the dict is empty)"),
            missing=missing)
    conv_in = state_dict["encoder.conv_in.weight"]
    C, in_ch = int(conv_in.shape[0]), int(conv_in.shape[1])
    levels = sorted({int(m.group(1)) for k in state_dict if (m := re.match(r"encoder\.down\.(\d+)\.", k))})
    if not levels or levels != list(range(len(levels))):
        raise StateDictMismatchError(f"cannot infer the encoder levels: found encoder.down indices {levels}")
    blocks = {int(m.group(1)) for k in state_dict if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k))}
    mult = []
    for i in levels:
        key = f"encoder.down.{i}.block.0.conv1.weight"
        if key not in state_dict:
            raise StateDictMismatchError(f"cannot infer the width of level {i}: missing {key}", missing=[key])
        w = int(state_dict[key].shape[0])
        if w % C:
            raise StateDictMismatchError(f"{key} has {w} output channels, not a multiple of {C}")
        mult.append(w // C)
    K, D = (int(s) for s in state_dict["quantize.embedding.weight"].shape)
    return {
        "channel_mult": mult, "num_resolutions": len(mult), "dropout": 0.0, "hidden_channels": C,
        "num_channels": in_ch, "num_res_blocks": len(blocks),
        "resolution": int(resolution) if resolution is not None else OFFICIAL_CONFIG["resolution"],
        "z_channels": int(state_dict["encoder.conv_out.weight"].shape[0]), "codebook_size": K,
    }


def _read_state_dict(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"MaskGIT-VQGAN weights {path} not found")
    if path.suffix == ".safetensors":
        try:  # safetensors is optional: only .safetensors weights need it
            from safetensors.torch import load_file
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise ImportError(f"{path} is a safetensors file; pip install safetensors to read it") from err
        return load_file(str(path))
    obj = load_torch_file(path, "MaskGIT-VQGAN weights", "Download maskgit-vqgan-imagenet-f16-256.bin again from "
                          "the Hugging Face repo fun-research/TiTok.")
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ValueError(f"{path} does not hold a state dict (got {type(obj).__name__})")
    return obj


def load_maskgit_vqgan(path_or_state_dict, config: dict | MaskGITVQGANConfig | None = None) -> MaskGITVQGAN:
    """Build a :class:`MaskGITVQGAN` and load official-layout weights, strictly.

    ``path_or_state_dict``: a ``.bin``/``.pt`` file (``torch.load``-able, optionally ``{"state_dict": ...}``),
    a ``.safetensors`` file, or a dict of tensors. ``config``: a full or partial config dict (e.g.
    ``{"resolution": 256}``); keys not given are inferred from the state dict's shapes. A full config that
    disagrees with the weights, or weights with missing/unexpected/mis-shaped keys, raise
    :class:`~rearlib.tokenizers.StateDictMismatchError` naming every offending key. Returns the model in eval
    mode on the CPU.
    """
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        sd = _read_state_dict(path_or_state_dict)
        what = f"MaskGIT-VQGAN weights {path_or_state_dict}"
    elif isinstance(path_or_state_dict, dict):
        sd, what = path_or_state_dict, "MaskGIT-VQGAN state dict"
    else:
        raise TypeError(f"expected a path or a state dict, got {type(path_or_state_dict).__name__}")
    if isinstance(config, MaskGITVQGANConfig):
        config = asdict(config)
    config = dict(config or {})
    full = {f.name for f in fields(MaskGITVQGANConfig)}
    if not full <= set(config):
        try:
            inferred = infer_config(sd, resolution=config.get("resolution"))
        except StateDictMismatchError:
            if not config:
                raise
            inferred = {}
        # Given keys win: a config that disagrees with the weights is then caught by the strict check below.
        config = {**inferred, **config}
    model = MaskGITVQGAN(MaskGITVQGANConfig.from_dict(config))
    load_state_dict_strict(model, sd, what=what)
    return model.eval()
