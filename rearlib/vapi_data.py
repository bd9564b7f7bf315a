"""The images VA-π post-trains on: :class:`EmbeddedSource` (the embedded dataset rendered on the device) and
:class:`BatchSource`, one way to fetch a batch from every data form :func:`rearlib.vapi.post_train` accepts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from rearlib.data import render_batch


@dataclass(frozen=True)
class EmbeddedSource:
    """The embedded ShapeScenes-10 split as a batch source rendered directly on the device (fast on GPU).

    ``fetch(indices, device) -> (images [B, 3, R, R] in [0, 1], labels [B])`` via :func:`rearlib.data.render_batch`.
    """

    size: int
    resolution: int
    split: str = "train"
    seed: int = 0

    def __len__(self) -> int:
        return self.size

    def fetch(self, indices: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
        return render_batch(indices, self.resolution, self.seed, self.split, device=device)


class BatchSource:
    """Uniform access to the data forms :func:`rearlib.vapi.post_train` accepts (see its docstring):
    ``fetch(indices, device) -> (images, labels, tokens or None)`` on ``device``."""

    def __init__(self, data: Any):
        self.tokens = None
        if hasattr(data, "fetch") and hasattr(data, "__len__"):
            self.kind, self.src = "source", data
        elif isinstance(data, dict):
            if "images" not in data or "labels" not in data:
                raise ValueError("a data dict needs 'images' [M, 3, H, W] and 'labels' [M] (optionally 'tokens')")
            self.kind, self.src = "tensors", (data["images"], data["labels"])
            self.tokens = data.get("tokens")
        elif isinstance(data, (tuple, list)) and len(data) in (2, 3) and all(torch.is_tensor(x) for x in data):
            self.kind, self.src = "tensors", (data[0], data[1])
            self.tokens = data[2] if len(data) == 3 else None
        elif hasattr(data, "__getitem__") and hasattr(data, "__len__"):
            self.kind, self.src = "dataset", data
        else:
            raise TypeError("data must be a Dataset of (image, label), a dict {'images', 'labels'[, 'tokens']}, a "
                            "tuple (images, labels[, tokens]) or an object with fetch(indices, device) and __len__")
        if self.kind == "tensors":
            im, lab = self.src
            if im.dim() != 4 or lab.dim() != 1 or im.shape[0] != lab.shape[0]:
                raise ValueError(f"images must be [M, 3, H, W] and labels [M]; got {tuple(im.shape)}, "
                                 f"{tuple(lab.shape)}")
            if self.tokens is not None and self.tokens.shape[0] != im.shape[0]:
                raise ValueError("tokens and images hold different numbers of items")

    def __len__(self) -> int:
        return len(self.src[0]) if self.kind == "tensors" else len(self.src)

    def fetch(self, idx: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        if self.kind == "source":
            out = self.src.fetch(idx, device)
            images, labels = out[0], out[1]
            tokens = out[2] if len(out) > 2 else None
        elif self.kind == "tensors":
            cpu = idx.cpu()
            images, labels = self.src[0][cpu.to(self.src[0].device)], self.src[1][cpu.to(self.src[1].device)]
            tokens = None if self.tokens is None else self.tokens[cpu.to(self.tokens.device)]
        else:
            tokens = None
            items = [self.src[int(i)] for i in idx]
            images = torch.stack([torch.as_tensor(it[0]) for it in items])
            labels = torch.as_tensor([int(it[1]) for it in items])
        return images.to(device), torch.as_tensor(labels).to(device), None if tokens is None else tokens.to(device)
