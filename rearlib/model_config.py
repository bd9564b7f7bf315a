"""Architecture of a :class:`rearlib.model.Generator`: :class:`GeneratorConfig`, the presets and their resolution.

The function the fields describe is defined in :mod:`rearlib.model`'s docstring.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from rearlib.kernels.ops import DROPOUT_KERNELS

__all__ = ["BLOCK_KERNELS", "TIED_CODEBOOK", "TIED_PROJECTED_MIN_DIM", "GeneratorConfig", "PRESETS", "get_config"]

#: GeneratorConfig.block_kernels: "auto" = the hand-scheduled block stack of :mod:`rearlib.kernels.fused_blocks` when
#: training on CUDA under bf16 autocast; "module" = always the Block modules (compiled by torch.compile).
BLOCK_KERNELS = ("auto", "module")

#: GeneratorConfig.tied_codebook values: False = untied; True (also spelled "codebook", stored as True) = input and
#: output through the codebook itself, rank <= z_dim; "projected" = through a learned lift of the codebook.
TIED_CODEBOOK = (False, True, "codebook", "projected")

#: Smallest width of the "projected" tied code table: the paper's codebook dimension (MaskGIT-VQGAN, 256), so the
#: logits' rank budget is at least the paper's whatever our tokenizer's z_dim.
TIED_PROJECTED_MIN_DIM = 256


@dataclass(frozen=True)
class GeneratorConfig:
    """Architecture of a :class:`~rearlib.model.Generator` (all sizes exact; see :mod:`rearlib.model`'s docstring
    for the function).

    hidden: width C. depth: number of blocks. heads: attention heads (C % heads == 0).
    codebook_size: K image-token ids. num_classes: M class labels (plus one null class).
    seq_len: N image tokens per image (raster order). mlp_ratio: MLP hidden = int(C * mlp_ratio).
    dropout: on the attention output projection and inside the MLP. attn_dropout: on attention probabilities.
    dropout_kernel: where the ``dropout`` masks come from: "auto" = :func:`rearlib.kernels.dropout_keep_mask` on
    CUDA (the distribution of ``nn.Dropout`` with p to 2^-17, a different random stream, eight mask elements per
    Philox call), ``F.dropout`` elsewhere; "torch" = ``F.dropout`` everywhere. Speed only; attention-probability
    dropout stays in SDPA.
    block_kernels: "auto" = in CUDA training under bf16 autocast the blocks run as :func:`rearlib.kernels.fused_blocks.
    fused_block_stack` (same function, hand-scheduled: one adaLN GEMM for all blocks, Triton kernels; +7% samples/s
    on reAR-B in one A/B, more once tuned, see docs/performance.md); "module" = always the Block modules. Speed only.
    encode_align_layer / decode_align_layer: 0-based block whose output feeds the encode ("EN") / decode ("DE")
    alignment head; ``None`` disables that head. They may be equal (the official code cannot do that).
    align_head: "silu3" = Linear(C,P)-SiLU-Linear(P,P)-SiLU-Linear(P,z) as in the released code (default);
    "gelu2" = Linear(C,P)-GELU-Linear(P,z) as the paper's App. A describes.
    projector_dim: P. z_dim: the tokenizer's code dimension (alignment targets; tied-codebook projection size).
    tied_codebook: the "tied codebook embedding" baseline (:mod:`rearlib.model`'s docstring), one of
    :data:`TIED_CODEBOOK`: False (untied), True (or "codebook": logits through the z-dimensional codebook) or
    "projected" (through a learned lift of the codebook to :attr:`tied_dim` dimensions). A string rather than a
    second field, so that every config written before "projected" existed keeps its dict and hash.
    pos_extra / time_extra: extra rows of the positional / timestep tables beyond N (1024 / 100 as RAR).

    ``decode_align_layer_source`` (not a field: it changes no numbers and is not saved) says where
    ``decode_align_layer`` came from when the config was read off a state dict, which does not store it
    (:func:`rearlib.model_official.infer_config_from_state_dict`): ``"preset 'NAME'"`` (taken from the preset whose
    shapes the weights have), ``"argument"`` (passed by the caller), or None (no decode head, or a config built
    directly).
    """

    decode_align_layer_source: ClassVar[str | None] = None

    hidden: int
    depth: int
    heads: int
    codebook_size: int
    num_classes: int
    seq_len: int
    mlp_ratio: float = 4.0
    dropout: float = 0.1
    attn_dropout: float = 0.1
    dropout_kernel: str = "auto"
    block_kernels: str = "auto"
    encode_align_layer: int | None = 0
    decode_align_layer: int | None = None
    align_head: str = "silu3"
    projector_dim: int = 2048
    z_dim: int = 256
    tied_codebook: bool | str = False
    pos_extra: int = 1024
    time_extra: int = 100

    def __post_init__(self):
        for name in ("hidden", "depth", "heads", "codebook_size", "num_classes", "seq_len", "projector_dim", "z_dim"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"GeneratorConfig.{name} must be a positive int, got {v!r}")
        if self.hidden % self.heads:
            raise ValueError(f"hidden={self.hidden} is not divisible by heads={self.heads}")
        for name in ("encode_align_layer", "decode_align_layer"):
            v = getattr(self, name)
            if v is not None and not (0 <= v < self.depth):
                raise ValueError(f"{name}={v} is not a block index in [0, {self.depth - 1}] (or None to disable)")
        if self.align_head not in ("silu3", "gelu2"):
            raise ValueError(f"align_head must be 'silu3' or 'gelu2', got {self.align_head!r}")
        for name in ("dropout", "attn_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.dropout_kernel not in DROPOUT_KERNELS:
            raise ValueError(f"dropout_kernel must be one of {DROPOUT_KERNELS}, got {self.dropout_kernel!r}")
        if self.block_kernels not in BLOCK_KERNELS:
            raise ValueError(f"block_kernels must be one of {BLOCK_KERNELS}, got {self.block_kernels!r}")
        if self.mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be > 0, got {self.mlp_ratio}")
        if not (isinstance(self.tied_codebook, bool) or self.tied_codebook in ("codebook", "projected")):
            raise ValueError(f"tied_codebook must be one of {TIED_CODEBOOK}, got {self.tied_codebook!r}")
        if self.tied_codebook == "codebook":
            object.__setattr__(self, "tied_codebook", True)  # one spelling per model, so one hash
        if self.pos_extra < 2 or self.time_extra < 2:
            raise ValueError("pos_extra and time_extra must be >= 2 (the sequence has N + 2 positions)")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden * self.mlp_ratio)

    @property
    def tied_mode(self) -> str | None:
        """None (untied), "codebook" or "projected"."""
        if self.tied_codebook is False:
            return None
        return "projected" if self.tied_codebook == "projected" else "codebook"

    @property
    def tied_dim(self) -> int | None:
        """Width D of the tied code table: z_dim ("codebook"), max(z_dim, 256) ("projected"), None (untied)."""
        mode = self.tied_mode
        if mode is None:
            return None
        return self.z_dim if mode == "codebook" else max(self.z_dim, TIED_PROJECTED_MIN_DIM)

    @property
    def vocab_size(self) -> int:
        """Rows of the shared embedding table: K image ids + mask + M classes + null."""
        return self.codebook_size + 1 + self.num_classes + 1

    def replace(self, **overrides) -> "GeneratorConfig":
        unknown = set(overrides) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"unknown GeneratorConfig fields {sorted(unknown)}; "
                             f"known: {[f.name for f in dataclasses.fields(self)]}")
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Presets. "tiny" is exactly the architecture of the official conformance fixture (so CPU tests and the fixture
# share one config; 0.45M parameters). "small" is ours for the 64 px embedded dataset (16x16 = 256 tokens):
# 8 x 256 with 4 heads (head dim 64, as the paper's models), DE at block 6 of 8 (the paper's 15/20 and 18/24 are
# both index/depth = 0.75), EN at 0; about 9.5M parameters without heads. It is sized by what this project can
# afford and ship: each AR/reAR run trains in a few minutes on one H200, the fp16 weights fit in two 16 MiB
# shards, and one decode step takes milliseconds on a laptop CPU (the teaching widgets sample live). The
# projector is 512 wide (2x hidden; the paper's 2048 is 2.7x its 768). Training overrides codebook_size /
# z_dim / num_classes to the tokenizer and dataset actually used. The "rear_*" presets are the released
# configs (configs/rear_{s,b,l}.yaml).
PRESETS: dict[str, GeneratorConfig] = {
    "tiny": GeneratorConfig(hidden=64, depth=4, heads=4, codebook_size=32, num_classes=10, seq_len=16,
                            encode_align_layer=0, decode_align_layer=2, projector_dim=128, z_dim=16),
    "small": GeneratorConfig(hidden=256, depth=8, heads=4, codebook_size=1024, num_classes=10, seq_len=256,
                             encode_align_layer=0, decode_align_layer=6, projector_dim=512, z_dim=32),
    "rear_s": GeneratorConfig(hidden=768, depth=20, heads=16, codebook_size=1024, num_classes=1000, seq_len=256,
                              encode_align_layer=0, decode_align_layer=15),
    "rear_b": GeneratorConfig(hidden=768, depth=24, heads=16, codebook_size=1024, num_classes=1000, seq_len=256,
                              encode_align_layer=0, decode_align_layer=18),
    "rear_l": GeneratorConfig(hidden=1024, depth=24, heads=16, codebook_size=1024, num_classes=1000, seq_len=256,
                              encode_align_layer=0, decode_align_layer=18),
}


def get_config(preset_or_config: str | GeneratorConfig | dict, **overrides) -> GeneratorConfig:
    """Resolve a preset name, a config or a dict of config fields, then apply ``overrides``."""
    if isinstance(preset_or_config, GeneratorConfig):
        cfg = preset_or_config
    elif isinstance(preset_or_config, dict):
        cfg = GeneratorConfig(**preset_or_config)
    elif isinstance(preset_or_config, str):
        if preset_or_config not in PRESETS:
            raise ValueError(f"unknown generator preset {preset_or_config!r}; presets: {sorted(PRESETS)}")
        cfg = PRESETS[preset_or_config]
    else:
        raise TypeError(f"expected a preset name, GeneratorConfig or dict, got {type(preset_or_config).__name__}")
    return cfg.replace(**overrides) if overrides else cfg
