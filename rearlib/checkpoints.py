"""Strict state-dict checks shared by every model class: a mismatch is one error that names every missing,
unexpected and mis-shaped key, raised before anything is loaded (no partial loads)."""

from __future__ import annotations

import torch
import torch.nn as nn


def check_state_dict(model: nn.Module, state_dict: dict, what: str = "state dict") -> None:
    """Raise ``KeyError``/``ValueError`` naming every missing, unexpected and mis-shaped key (no partial loads)."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    given = {k: tuple(v.shape) for k, v in state_dict.items() if torch.is_tensor(v)}
    non_tensor = sorted(k for k, v in state_dict.items() if not torch.is_tensor(v))
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    shapes = sorted(k for k in set(expected) & set(given) if expected[k] != given[k])
    if not (missing or unexpected or shapes or non_tensor):
        return

    def _list(keys, fmt=str, limit=25):
        body = "\n".join(f"    {fmt(k)}" for k in keys[:limit])
        return body + (f"\n    ... and {len(keys) - limit} more" if len(keys) > limit else "")

    parts = [f"{what} does not match {type(model).__name__} ({len(given)} tensors given, {len(expected)} expected)"]
    if missing:
        parts.append(f"  missing keys ({len(missing)}):\n" + _list(missing))
    if unexpected:
        parts.append(f"  unexpected keys ({len(unexpected)}):\n" + _list(unexpected))
    if shapes:
        parts.append(f"  mis-shaped keys ({len(shapes)}):\n"
                     + _list(shapes, lambda k: f"{k}: expected {expected[k]}, got {given[k]}"))
    if non_tensor:
        parts.append(f"  non-tensor entries ({len(non_tensor)}):\n" + _list(non_tensor))
    prefixes = {k.split(".", 1)[0] for k in unexpected}
    if missing and unexpected and len(prefixes) == 1 and all(k.split(".", 1)[-1] in expected for k in unexpected):
        parts.append(f"  hint: every unexpected key starts with {prefixes.pop()!r}.; strip that prefix first")
    raise StateDictMismatchError("\n".join(parts), missing=missing, unexpected=unexpected, mis_shaped=shapes)


class StateDictMismatchError(ValueError):
    """A state dict does not match a model; ``.missing``, ``.unexpected``, ``.mis_shaped`` list the keys."""

    def __init__(self, message: str, missing=(), unexpected=(), mis_shaped=()):
        super().__init__(message)
        self.missing, self.unexpected, self.mis_shaped = list(missing), list(unexpected), list(mis_shaped)


def load_state_dict_strict(model: nn.Module, state_dict: dict, what: str = "state dict") -> None:
    """Check names and shapes first (raising a full report), then load with ``strict=True``."""
    check_state_dict(model, state_dict, what)
    ref = model.state_dict()
    model.load_state_dict({k: v.to(ref[k].dtype) for k, v in state_dict.items()}, strict=True)
