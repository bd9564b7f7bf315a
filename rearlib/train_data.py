"""Training data for the generator loop: reading pretokenized files, checking them against the generator, and
drawing batches on the device without a DataLoader or host synchronisation."""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rearlib.rear import ReARConfig
from rearlib.runtime import load_torch_file
from rearlib.tokenizers.pretokenize import load_tokens


def derive_seed(*parts: int) -> int:
    """A 63-bit seed that is a fixed function of the parts (stable across machines and Python versions)."""
    h = hashlib.sha256(":".join(str(int(p)) for p in parts).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


class DeviceBatches:
    """Batches of (tokens, labels) drawn from tensors held on the device, without a DataLoader or host sync.

    Every epoch uses one permutation of the M samples, shared by all ranks (its generator is seeded by ``seed``
    alone); rank r of W takes slice r of each block of W * batch consecutive indices, so ranks never see the same
    sample in one step. The remainder of an epoch that does not fill a block is dropped. Index arithmetic is
    host-side integers; the permutation and gathers run on the device.
    """

    def __init__(self, tokens: torch.Tensor, labels: torch.Tensor, batch: int, *, seed: int, rank: int,
                 world: int):
        self.tokens, self.labels, self.batch, self.rank, self.world = tokens, labels, batch, rank, world
        self.m = tokens.shape[0]
        self.block = batch * world
        # Epoch permutations cover at least one block even when M < W * batch (tiny test sets).
        self.reps = max(1, math.ceil(self.block / self.m))
        self.gen = torch.Generator(device=tokens.device)
        self.gen.manual_seed(derive_seed(seed, 0xDA7A))
        self.epoch_state = self.gen.get_state()
        self.cursor = 0
        self.epoch = 0
        self.perm = self._new_perm()

    def _new_perm(self) -> torch.Tensor:
        self.epoch_state = self.gen.get_state()
        return torch.cat([torch.randperm(self.m, generator=self.gen, device=self.tokens.device)
                          for _ in range(self.reps)])

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cursor + self.block > self.perm.numel():
            self.perm = self._new_perm()
            self.cursor = 0
            self.epoch += 1
        start = self.cursor + self.rank * self.batch
        idx = self.perm[start:start + self.batch]
        self.cursor += self.block
        return self.tokens[idx].long(), self.labels[idx].long()

    def state_dict(self) -> dict[str, Any]:
        # The permutation is rebuilt from the generator state at the epoch start (it can be hundreds of MB).
        return {"epoch_state": self.epoch_state, "cursor": self.cursor, "epoch": self.epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.gen.set_state(state["epoch_state"])
        self.perm = self._new_perm()
        self.cursor = int(state["cursor"])
        self.epoch = int(state["epoch"])


def data_fingerprint(tokens: torch.Tensor, labels: torch.Tensor) -> str:
    """Short hash of the training data (shape, dtype and content; large sets hashed on a fixed row subsample)."""
    h = hashlib.sha256(f"{tuple(tokens.shape)}|{tokens.dtype}|{tuple(labels.shape)}".encode())
    rows = tokens.shape[0]
    sel = torch.arange(rows) if rows <= 200_000 else torch.linspace(0, rows - 1, 200_000).long()
    h.update(tokens[sel.to(tokens.device)].to(torch.int32).cpu().numpy().tobytes())
    h.update(labels[sel.to(labels.device)].to(torch.int32).cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def validate_data(tokens: torch.Tensor, labels: torch.Tensor, codebook: torch.Tensor | None, model_cfg: Any,
                  rear: ReARConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Check shapes, dtypes and ranges against the generator config; flatten token grids to raster order."""
    if not isinstance(tokens, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise TypeError("tokens and labels must be torch tensors")
    if tokens.is_floating_point() or labels.is_floating_point():
        raise TypeError(f"tokens and labels must be integer tensors, got {tokens.dtype} and {labels.dtype}")
    if tokens.dim() == 3:
        tokens = tokens.reshape(tokens.shape[0], -1)  # [M, h, w] -> raster order [M, h*w]
    if tokens.dim() != 2:
        raise ValueError(f"tokens must be [M, N] or [M, h, w], got shape {tuple(tokens.shape)}")
    if labels.shape != tokens.shape[:1]:
        raise ValueError(f"labels must be [M] = [{tokens.shape[0]}], got {tuple(labels.shape)}")
    if tokens.shape[0] == 0:
        raise ValueError("no training samples")
    n, k, c = model_cfg.seq_len, model_cfg.codebook_size, model_cfg.num_classes
    if tokens.shape[1] != n:
        raise ValueError(f"tokens have {tokens.shape[1]} positions but the generator's seq_len is {n}; "
                         f"pass model_overrides={{'seq_len': {tokens.shape[1]}}}")
    tmin, tmax = int(tokens.min()), int(tokens.max())
    if tmin < 0 or tmax >= k:
        raise ValueError(f"token ids span [{tmin}, {tmax}] but the codebook size is {k}; ids must lie in [0, {k})")
    lmin, lmax = int(labels.min()), int(labels.max())
    if lmin < 0 or lmax >= c:
        raise ValueError(f"labels span [{lmin}, {lmax}] but num_classes is {c}; labels must lie in [0, {c})")
    if codebook is not None:
        if codebook.dim() != 2 or codebook.shape[0] != k:
            raise ValueError(f"codebook must be [K={k}, D], got {tuple(codebook.shape)}")
    elif rear.uses_alignment:
        raise ValueError("the reAR alignment loss needs the tokenizer codebook [K, D]; pass codebook=...")
    return tokens, labels


def load_pretokenized(path: str | os.PathLike, tokenizer: Any = None) -> dict[str, Any]:
    """Read training tokens from a file: returns {"tokens" [M, L] (compact dtype), "labels" [M], and optionally
    "codebook" [K, D], "num_classes"}.

    Accepted: a ``rearlib.tokenizers.pretokenize`` file (format "rearlib-tokens": tokens [N, V, L] with V views;
    every view becomes one training sample with its image's label; ``tokenizer`` (object or identity string) is checked
    against the file's tokenizer identity when given), or any torch / .npz dict with "tokens" ([M, L] or
    [M, h, w]) and "labels" [M] (and optionally "codebook", "num_classes").
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"pretokenized file {path} not found; create it first with "
                                f"rearlib.tokenizers.pretokenize.pretokenize(...)")
    if path.suffix == ".npz":
        with np.load(path) as z:
            d = {k: torch.from_numpy(z[k]) for k in z.files}
    else:
        d = load_torch_file(path, "pretokenized file", "Create it again with "
                            "rearlib.tokenizers.pretokenize.pretokenize(...) or copy it again.")
    if isinstance(d, dict) and d.get("format") == "rearlib-tokens":
        ds = load_tokens(path, tokenizer if tokenizer is not None else d["tokenizer_identity"])
        n, v, length = ds.tokens.shape
        return {"tokens": ds.tokens.reshape(n * v, length), "labels": ds.labels.repeat_interleave(v),
                "codebook_size": ds.codebook_size, "tokenizer_identity": ds.tokenizer_identity}
    if not isinstance(d, dict) or "tokens" not in d or "labels" not in d:
        raise ValueError(f"{path} must hold a dict with 'tokens' and 'labels' (optionally 'codebook')")
    tokens = d["tokens"]
    if tokens.dim() == 3:
        tokens = tokens.reshape(tokens.shape[0], -1)
    return {**d, "tokens": tokens}
