"""Experiment D - CKA between block outputs and codebook vectors (paper App. C.2, Fig. 9b-c; docs/paper.md,
reAR §2.4; notebook 08).

Rows = image-token positions pooled over images (reAR §6 item 9: clean input, CLS and class positions excluded).
X = output of block ℓ (0-based, before the final adaLN; :meth:`Generator.forward_features`) at the input position of
x_t. Targets: ``"encoded"`` Y = z(x_t) (the current token's codebook vector, t = 1..N); ``"decoded"`` Y = z(x_{t+1})
(the next token's, t = 1..N-1). Linear CKA (Eq. 13, the plug-in estimator of :func:`rearlib.metrics.linear_cka`) is
accumulated over batches from centred cross-products in float64 (:class:`StreamingLinearCKA`), so every position of
every image can be pooled without holding the rows. ``is_peak`` marks each curve's maximum.
"""

from __future__ import annotations

import pandas as pd
import torch

from rearlib.analysis.common import (STREAM_CKA_ROWS, base_seed, check_batch_size, check_choice, eval_mode,
                                     finish_frame, maybe_autocast, model_dims, prepare, progress_bar, row_gen)

CKA_TARGETS = ("encoded", "decoded")


class StreamingLinearCKA:
    """Linear CKA (Eq. 13) of row-paired matrices X [n, p], Y [n, q] fed in batches of rows.

    Keeps float64 sums of the shifted rows a = x - s_x, b = y - s_y (shifts = the first batch's means, for
    numerical safety) and of their cross-products; then the centred matrices are
    C_ab = Σ a bᵀ - (Σa)(Σb)ᵀ / n (likewise C_aa, C_bb) and CKA = ||C_ab||_F² / (||C_aa||_F ||C_bb||_F), which is
    exactly :func:`rearlib.metrics.linear_cka` on the stacked rows. Memory O(p² + q² + pq), whatever n is.
    """

    def __init__(self):
        self.n = 0
        self.sx = self.sy = None

    def update(self, X: torch.Tensor, Y: torch.Tensor) -> "StreamingLinearCKA":
        if X.ndim != 2 or Y.ndim != 2 or X.shape[0] != Y.shape[0]:
            raise ValueError(f"X, Y must be [n, p], [n, q] with the same n; got {tuple(X.shape)}, {tuple(Y.shape)}")
        if X.shape[0] == 0:
            return self
        X, Y = X.double(), Y.to(X.device).double()
        if self.sx is None:
            self.sx, self.sy = X.mean(0), Y.mean(0)
            p, q = X.shape[1], Y.shape[1]
            z = lambda *s: torch.zeros(*s, dtype=torch.float64, device=X.device)  # noqa: E731
            self.a, self.b, self.ab, self.aa, self.bb = z(p), z(q), z(p, q), z(p, p), z(q, q)
        elif X.shape[1] != self.a.shape[0] or Y.shape[1] != self.b.shape[0]:
            raise ValueError("feature dimensions changed between updates")
        a, b = X - self.sx, Y - self.sy
        self.a += a.sum(0)
        self.b += b.sum(0)
        self.ab += a.T @ b
        self.aa += a.T @ a
        self.bb += b.T @ b
        self.n += X.shape[0]
        return self

    def value(self) -> float:
        if self.n < 2:
            raise ValueError("CKA needs at least 2 rows")
        n = self.n
        cab = self.ab - torch.outer(self.a, self.b) / n
        caa = self.aa - torch.outer(self.a, self.a) / n
        cbb = self.bb - torch.outer(self.b, self.b) / n
        den = torch.linalg.matrix_norm(caa) * torch.linalg.matrix_norm(cbb)
        if den <= 0:
            raise ValueError("CKA is undefined when X or Y is constant across rows")
        return float(torch.linalg.matrix_norm(cab) ** 2 / den)


@torch.no_grad()
def cka_layers(model, codebook, data, labels, *, tokenizer=None, layers=None, targets=CKA_TARGETS,
               include_class_position: bool = False, max_rows_per_image: int | None = None, generator=None,
               batch_size: int = 64, dtype: torch.dtype | None = None, image_ids=None,
               progress: bool = True) -> pd.DataFrame:
    """Experiment D (module docstring): linear CKA between every block's output and the current ("encoded") /
    next ("decoded") token's codebook vectors, pooled over images and positions.

    codebook: ``[K, D]`` raw code vectors or a tokenizer (its ``.codebook``; then image data are encoded with it).
    layers: block indices (default all, 0..depth-1). include_class_position: also pair the class-token position
    with z(x_1) in the "decoded" rows (the reAR decode loss covers it; default off: image-token positions only).
    max_rows_per_image: optional random subset of positions per image (shared by all layers and targets).
    Returns one row per (target, layer) with ``cka``, ``n_rows``, ``n_images``, ``depth``, ``relative_depth``
    (layer / (depth - 1)) and ``is_peak`` (the layer of highest CKA per target).
    """
    N, K, M = model_dims(model)
    batch_size = check_batch_size(batch_size)
    is_tok = hasattr(codebook, "codebook") and not torch.is_tensor(codebook)
    tok = codebook if is_tok else tokenizer
    cb = codebook.codebook.detach() if is_tok else torch.as_tensor(codebook).detach()
    if cb.ndim != 2 or cb.shape[0] != K:
        raise ValueError(f"codebook must be [K={K}, D]; got {tuple(cb.shape)}")
    tokens, labels, _, ids = prepare(model, tok, data, labels, None, image_ids, batch_size)
    targets = check_choice(targets, CKA_TARGETS, "targets")
    depth = model.config.depth
    layers = list(range(depth)) if layers is None else [int(l) % depth for l in layers]
    if not layers or len(set(layers)) != len(layers):
        raise ValueError(f"layers must be a non-empty list of distinct block indices; got {layers}")
    if max_rows_per_image is not None and (not isinstance(max_rows_per_image, int) or max_rows_per_image < 1):
        raise ValueError(f"max_rows_per_image must be a positive int or None, got {max_rows_per_image!r}")
    base = base_seed(generator)
    dev = tokens.device
    cb = cb.to(dev).float()
    acc = {(t, l): StreamingLinearCKA() for t in targets for l in layers}
    n_rows = {t: 0 for t in targets}
    B = tokens.shape[0]
    chunks = [list(range(s, min(B, s + batch_size))) for s in range(0, B, batch_size)]
    with eval_mode(model), maybe_autocast(dev, dtype):
        for chunk in progress_bar(chunks, "CKA", len(chunks), progress):
            gt = tokens[chunk]
            feats = model.forward_features(gt, labels[chunk], layers)   # {l: [b, N + 2, C]}
            b = len(chunk)
            # Rows: (image, input position of x_t) for t = 1..N -> sequence position t + 1.
            keep = torch.ones(b, N, dtype=torch.bool)
            if max_rows_per_image is not None and max_rows_per_image < N:
                keep.zero_()
                for r, i in enumerate(chunk):
                    keep[r, torch.randperm(N, generator=row_gen(base, STREAM_CKA_ROWS, ids[i]))
                         [:max_rows_per_image]] = True
            keep = keep.to(dev)
            z = cb[gt]                                                    # [b, N, D]
            for t in targets:
                if t == "encoded":
                    m = keep                                              # x_t with z(x_t), t = 1..N
                    ys = z[m]
                else:
                    m = keep.clone()
                    m[:, -1] = False                                      # x_N has no next token
                    ys = torch.roll(z, -1, dims=1)[m]                     # x_t with z(x_{t+1})
                for l in layers:
                    h = feats[l][:, 2:].float()                           # image-token positions
                    xs = h[m]
                    if t == "decoded" and include_class_position:
                        xs = torch.cat([xs, feats[l][:, 1].float()])
                        ys_l = torch.cat([ys, z[:, 0]])
                    else:
                        ys_l = ys
                    acc[(t, l)].update(xs, ys_l)
                n_rows[t] += int(m.sum()) + (b if t == "decoded" and include_class_position else 0)
    records = []
    for t in targets:
        vals = {l: acc[(t, l)].value() for l in layers}
        peak = max(vals, key=vals.get)
        for l in layers:
            records.append({"target": t, "layer": l, "cka": vals[l], "n_rows": n_rows[t], "n_images": B,
                            "depth": depth, "relative_depth": l / max(1, depth - 1), "is_peak": l == peak})
    return finish_frame(records, None, dict(include_class_position=include_class_position, method="linear (plug-in)"))
