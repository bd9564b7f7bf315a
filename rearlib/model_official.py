"""Reading the authors' released generator state dicts: file formats and the architecture read off tensor shapes.

:func:`rearlib.model.load_official_state_dict` builds the :class:`~rearlib.model.Generator` and loads the weights
with strict name and shape checks.
"""

from __future__ import annotations

from pathlib import Path

import torch

from rearlib.checkpoints import StateDictMismatchError
from rearlib.model_config import PRESETS, GeneratorConfig

__all__ = ["read_state_dict", "infer_config_from_state_dict"]


def read_state_dict(path_or_sd) -> dict:
    """A state dict from a path (``torch.load`` with ``weights_only=True``; ``.safetensors`` too) or a dict;
    a ``{"state_dict": ...}`` wrapper is unwrapped."""
    if isinstance(path_or_sd, (str, Path)):
        path = Path(path_or_sd)
        if not path.exists():
            raise FileNotFoundError(f"no checkpoint at {path}")
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file  # optional dependency, only for .safetensors files
            return load_file(str(path))
        sd = torch.load(path, map_location="cpu", weights_only=True)
    else:
        sd = path_or_sd
    if not isinstance(sd, dict):
        raise TypeError(f"expected a state dict (dict of tensors), got {type(sd).__name__}")
    if "state_dict" in sd and isinstance(sd["state_dict"], dict):  # fixture / wrapped checkpoints
        sd = sd["state_dict"]
    return sd


def infer_config_from_state_dict(state_dict: dict, **overrides) -> GeneratorConfig:
    """Read the architecture off tensor shapes (K, M, N, C, depth, heads from the QK-norm size, MLP ratio,
    head widths). The block indices the alignment heads tap are *not* stored in the weights: when the shapes
    equal a preset's, that preset's indices are used, otherwise pass ``decode_align_layer=`` /
    ``encode_align_layer=`` (EN defaults to 0 as in every official config)."""
    sd = state_dict
    try:
        C = sd["embeddings.weight"].shape[1]
        K = sd["lm_head.weight"].shape[0]
        M = sd["embeddings.weight"].shape[0] - K - 2
        depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
        head_dim = sd["blocks.0.attn.q_norm.weight"].shape[0]
        mlp_hidden = sd["blocks.0.mlp.fc1.weight"].shape[0]
        pos_rows = sd["pos_embed"].shape[1]
        time_rows = sd["timesteps_embeddings"].shape[1]
    except KeyError as e:
        raise StateDictMismatchError(f"not a reAR/RAR generator state dict: missing {e.args[0]!r}") from None
    pos_extra, time_extra = overrides.get("pos_extra", 1024), overrides.get("time_extra", 100)
    N = pos_rows - pos_extra
    if "seq_len" not in overrides and time_rows - time_extra != N:
        raise StateDictMismatchError(f"cannot infer seq_len: pos_embed has {pos_rows} rows, timesteps_embeddings "
                                     f"{time_rows}; pass seq_len= (and pos_extra= / time_extra=)")
    fields = dict(hidden=C, depth=depth, heads=C // head_dim, codebook_size=K, num_classes=M, seq_len=N,
                  mlp_ratio=mlp_hidden / C)
    has_enc, has_dec = "encode_align_mlp.0.weight" in sd, "decode_align_mlp.0.weight" in sd
    for prefix, present in (("encode_align_mlp", has_enc), ("decode_align_mlp", has_dec)):
        if present:
            lin = sorted(int(k.split(".")[1]) for k in sd if k.startswith(prefix + ".") and k.endswith(".weight"))
            fields["projector_dim"] = sd[f"{prefix}.0.weight"].shape[0]
            fields["z_dim"] = sd[f"{prefix}.{lin[-1]}.weight"].shape[0]
            fields["align_head"] = "silu3" if len(lin) == 3 else "gelu2"
    fields = {**fields, **overrides}
    preset = next((p for p in PRESETS.values() if all(getattr(p, k) == v for k, v in fields.items()
                                                      if k in ("hidden", "depth", "heads", "codebook_size",
                                                               "num_classes", "seq_len", "projector_dim",
                                                               "z_dim"))), None)
    if "encode_align_layer" not in fields:
        fields["encode_align_layer"] = (preset.encode_align_layer if preset else 0) if has_enc else None
    if "decode_align_layer" not in fields:
        if has_dec and preset is None:
            raise StateDictMismatchError("the state dict has a decode alignment head but the block it taps is not "
                                         "stored in the weights; pass decode_align_layer=")
        fields["decode_align_layer"] = preset.decode_align_layer if has_dec else None
    return GeneratorConfig(**fields)
