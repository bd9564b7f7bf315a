"""Reading the authors' released generator state dicts: file formats and the architecture read off tensor shapes.

:func:`rearlib.model.load_official_state_dict` builds the :class:`~rearlib.model.Generator` and loads the weights
with strict name and shape checks.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from rearlib.checkpoints import StateDictMismatchError
from rearlib.model_config import PRESETS, GeneratorConfig
from rearlib.runtime import UnreadableFileError, load_torch_file

__all__ = ["read_state_dict", "infer_config_from_state_dict"]

#: What to do about a damaged state-dict file, for :func:`read_state_dict`'s errors.
STATE_DICT_HINT = ("Download or copy it again (the authors' released weights, or a file written by rearlib), "
                   "and compare its size with the original's.")

#: GeneratorConfig fields read off the shapes that a preset must equal to lend its alignment-head block indices.
_SHAPE_FIELDS = ("hidden", "depth", "heads", "codebook_size", "num_classes", "seq_len", "projector_dim", "z_dim")


def read_state_dict(path_or_sd) -> dict:
    """A state dict from a path (``torch.load`` with ``weights_only=True``; ``.safetensors`` too) or a dict;
    a ``{"state_dict": ...}`` wrapper is unwrapped. A missing, empty, truncated or foreign file is an error that
    names it and says what to do."""
    if isinstance(path_or_sd, (str, Path)):
        path = Path(path_or_sd)
        if path.suffix == ".safetensors":
            sd = _read_safetensors(path)
        else:
            sd = load_torch_file(path, "generator state dict", STATE_DICT_HINT)
    else:
        sd = path_or_sd
    if not isinstance(sd, dict):
        raise TypeError(f"expected a state dict (dict of tensors), got {type(sd).__name__}")
    if "state_dict" in sd and isinstance(sd["state_dict"], dict):  # fixture / wrapped checkpoints
        sd = sd["state_dict"]
    return sd


def _read_safetensors(path: Path) -> dict:
    from safetensors.torch import load_file  # optional dependency, only for .safetensors files

    if not path.is_file():
        raise FileNotFoundError(f"generator state dict {path} not found. {STATE_DICT_HINT}")
    if path.stat().st_size == 0:
        raise UnreadableFileError(f"generator state dict {path} is empty (0 bytes). {STATE_DICT_HINT}")
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises its own SafetensorError (and OSError) on damaged files
        raise UnreadableFileError(f"generator state dict {path} ({path.stat().st_size:,} bytes) cannot be read: it "
                                  f"is truncated, corrupt or not a safetensors file ({type(err).__name__}: "
                                  f"{str(err)[:200]}). {STATE_DICT_HINT}") from err


def _check_consistent(sd: dict, C: int, K: int) -> int:
    """Shapes that contradict each other inside the state dict, named by key before anything is inferred from
    them (a damaged dict would otherwise read as an unknown architecture). Returns the number of blocks."""
    lm = tuple(sd["lm_head.weight"].shape)
    if len(lm) != 2 or lm[1] != C:
        raise StateDictMismatchError(f"lm_head.weight has shape {lm}, but embeddings.weight makes the width {C}: "
                                     f"expected ({K}, {C}); the state dict is damaged",
                                     mis_shaped=["lm_head.weight"])
    if "lm_head.bias" in sd and tuple(sd["lm_head.bias"].shape) != (K,):
        raise StateDictMismatchError(f"lm_head.weight has {K} rows (image tokens) but lm_head.bias has shape "
                                     f"{tuple(sd['lm_head.bias'].shape)}; one of them is damaged",
                                     mis_shaped=["lm_head.weight", "lm_head.bias"])
    rows = sd["embeddings.weight"].shape[0]
    if rows < K + 3:
        raise StateDictMismatchError(f"embeddings.weight has {rows} rows, but K = {K} image tokens (lm_head.weight) "
                                     f"+ mask + at least one class + null need {K + 3} or more",
                                     mis_shaped=["embeddings.weight"])
    blocks: dict[int, set[str]] = {}
    for k in sd:
        if k.startswith("blocks."):
            index, _, rest = k[len("blocks."):].partition(".")
            if not index.isdigit():
                raise StateDictMismatchError(f"{k} is not of the form blocks.<index>.<name>", unexpected=[k])
            blocks.setdefault(int(index), set()).add(rest)
    if not blocks:
        raise StateDictMismatchError("not a reAR/RAR generator state dict: no blocks.* keys")
    depth = max(blocks) + 1
    gaps = [i for i in range(depth) if i not in blocks]
    if gaps:
        raise StateDictMismatchError(f"blocks.{gaps[0]}.* missing: the state dict has blocks {sorted(blocks)} of "
                                     f"0..{depth - 1} (a dropped or renamed block?)",
                                     missing=[f"blocks.{i}.*" for i in gaps])
    names = set().union(*blocks.values())
    missing = sorted(f"blocks.{i}.{n}" for i, have in blocks.items() for n in names - have)
    if missing:
        raise StateDictMismatchError(f"{missing[0]} missing" + (f" (and {len(missing) - 1} more)" if len(missing) > 1
                                                                else "")
                                     + ": the other blocks have it; the state dict is damaged", missing=missing)
    return depth


def _by_block(keys: set[str], universe: dict) -> list[str]:
    """``keys`` sorted, with every key of a block that is entirely among them written once as ``blocks.N.*``."""
    out, whole = [], set()
    for k in sorted(keys):
        if k.startswith("blocks."):
            prefix = ".".join(k.split(".")[:2]) + "."
            if all(u in keys for u in universe if u.startswith(prefix)):
                if prefix not in whole:
                    whole.add(prefix)
                    out.append(prefix + "*")
                continue
        out.append(k)
    return out


def _closest_preset(sd: dict, fields: dict, has_enc: bool, has_dec: bool) -> tuple[str, list[str]] | None:
    """The preset (with the caller's other overrides) whose state-dict layout differs from ``sd`` in the fewest
    keys, and those differences as lines, mis-shaped keys first; None if no preset applies."""
    from rearlib.model import build_generator  # the model module imports this one

    given = {k: tuple(v.shape) for k, v in sd.items() if torch.is_tensor(v)}
    best = None
    for name, preset in PRESETS.items():
        extra = {k: v for k, v in fields.items()
                 if k not in _SHAPE_FIELDS and k in GeneratorConfig.__dataclass_fields__}
        extra.update(encode_align_layer=preset.encode_align_layer if has_enc else None,
                     decode_align_layer=preset.decode_align_layer if has_dec else None)
        try:
            want = {k: tuple(v.shape) for k, v in build_generator(preset.replace(**extra), device="meta")
                    .state_dict().items()}
        except (ValueError, TypeError):
            continue
        diffs = [f"{k} has shape {given[k]} where preset {name!r} has {want[k]}"
                 for k in sorted(set(want) & set(given)) if want[k] != given[k]]
        diffs += [f"{k} is missing (preset {name!r} has it)" for k in _by_block(set(want) - set(given), want)]
        diffs += [f"{k} is not in preset {name!r}" for k in _by_block(set(given) - set(want), given)]
        if best is None or len(diffs) < len(best[1]):
            best = (name, diffs)
    return best


def infer_config_from_state_dict(state_dict: dict, **overrides) -> GeneratorConfig:
    """Read the architecture off tensor shapes (K, M, N, C, depth, heads from the QK-norm size, MLP ratio,
    head widths). The block indices the alignment heads tap are *not* stored in the weights: when the shapes
    equal a preset's, that preset's indices are used (with a warning naming the preset and the block; the
    config's ``decode_align_layer_source`` records it), otherwise pass ``decode_align_layer=`` /
    ``encode_align_layer=`` (EN defaults to 0 as in every official config). Shapes that contradict each other,
    or a preset's where no preset matches, are named by key."""
    sd = state_dict
    try:
        C = sd["embeddings.weight"].shape[1]
        K = sd["lm_head.weight"].shape[0]
        M = sd["embeddings.weight"].shape[0] - K - 2
        head_dim = sd["blocks.0.attn.q_norm.weight"].shape[0]
        mlp_hidden = sd["blocks.0.mlp.fc1.weight"].shape[0]
        pos_rows = sd["pos_embed"].shape[1]
        time_rows = sd["timesteps_embeddings"].shape[1]
    except KeyError as e:
        raise StateDictMismatchError(f"not a reAR/RAR generator state dict: missing {e.args[0]!r}") from None
    depth = _check_consistent(sd, C, K)
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
    name = next((n for n, p in PRESETS.items()
                 if all(getattr(p, k) == v for k, v in fields.items() if k in _SHAPE_FIELDS)), None)
    preset = PRESETS[name] if name else None
    if "encode_align_layer" not in fields:
        fields["encode_align_layer"] = (preset.encode_align_layer if preset else 0) if has_enc else None
    source = None
    if "decode_align_layer" in fields:
        source = "argument" if fields["decode_align_layer"] is not None else None
    elif has_dec and preset is None:
        closest = _closest_preset(sd, fields, has_enc, has_dec)
        if closest and closest[1]:
            preset_name, diffs = closest
            more = ""
            if len(diffs) > 1:
                more = f" (and {len(diffs) - 1} more: {'; '.join(diffs[1:4])}{'; ...' if len(diffs) > 4 else ''})"
            raise StateDictMismatchError(
                f"{diffs[0]}{more}. No preset has this state dict's shapes (the closest is {preset_name!r}), so the "
                f"block its decode alignment head taps, which is not stored in the weights, is unknown. If the state "
                f"dict is damaged, use an intact copy; if it is another architecture, pass decode_align_layer=")
        raise StateDictMismatchError("the state dict has a decode alignment head but the block it taps is not "
                                     "stored in the weights; pass decode_align_layer=")
    else:
        fields["decode_align_layer"] = preset.decode_align_layer if has_dec else None
        if has_dec:
            source = f"preset {name!r}"
            warnings.warn(f"the state dict does not store which block its decode alignment head taps: took "
                          f"decode_align_layer={preset.decode_align_layer} from the preset {name!r}, whose shapes "
                          f"it has (pass decode_align_layer= if it was trained with another block)", stacklevel=2)
    cfg = GeneratorConfig(**fields)
    object.__setattr__(cfg, "decode_align_layer_source", source)  # frozen dataclass; not a field
    return cfg
