"""Centred kernel alignment (CKA) between representations (docs/paper.md, reAR §2.4, Eq. 13; Fig. 9b-c).

:func:`linear_cka` is the plug-in estimator computed in feature space, :func:`linear_cka_gram` the literal n x n
Gram form (a reference for tests), :func:`minibatch_cka` the unbiased minibatch estimator, and :func:`cka_by_layer`
applies either to every layer's hidden states.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm


def _check_rows(X: torch.Tensor, Y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    X, Y = torch.as_tensor(X), torch.as_tensor(Y)
    if X.ndim != 2 or Y.ndim != 2:
        raise ValueError(f"CKA takes 2-D [n, features] matrices; got {tuple(X.shape)} and {tuple(Y.shape)}")
    if X.shape[0] != Y.shape[0]:
        raise ValueError(f"X and Y must have the same number of rows (examples); got {X.shape[0]} and {Y.shape[0]}")
    if X.shape[0] < 2:
        raise ValueError("CKA needs at least 2 rows")
    return X, Y


def linear_cka(X: torch.Tensor, Y: torch.Tensor, chunk: int = 65536) -> float:
    """Linear CKA (Kornblith et al. 2019; Eq. 13, docs/paper.md, reAR §2.4), computed in feature space.

    Eq. 13: K = X Xᵀ, L = Y Yᵀ, K_c = H K H, L_c = H L H with H = I - 11ᵀ/n, and
    CKA = <K_c, L_c>_F / (||K_c||_F ||L_c||_F). With column-centred X_c = H X, Y_c = H Y this equals
    ||Y_cᵀ X_c||_F² / (||X_cᵀ X_c||_F ||Y_cᵀ Y_c||_F), which costs O(n p q) time and O(p q) memory instead of
    O(n²): used here, in float64, accumulating over row chunks so that very large n fits. This is the (biased)
    plug-in estimator; see :func:`minibatch_cka` for the unbiased one.
    """
    X, Y = _check_rows(X, Y)
    n = X.shape[0]
    mx = sum(X[s:s + chunk].double().sum(0) for s in range(0, n, chunk)) / n
    my = sum(Y[s:s + chunk].double().sum(0) for s in range(0, n, chunk)) / n
    xy = xx = yy = 0
    for s in range(0, n, chunk):
        xc = X[s:s + chunk].double() - mx
        yc = Y[s:s + chunk].double() - my
        xy = xy + xc.T @ yc
        xx = xx + xc.T @ xc
        yy = yy + yc.T @ yc
    den = torch.linalg.matrix_norm(xx) * torch.linalg.matrix_norm(yy)
    if den <= 0:
        raise ValueError("CKA is undefined when X or Y is constant across rows")
    return float(torch.linalg.matrix_norm(xy) ** 2 / den)


def linear_cka_gram(X: torch.Tensor, Y: torch.Tensor) -> float:
    """Eq. 13 literally, with n x n Gram matrices (reference implementation for tests; O(n²) memory)."""
    X, Y = _check_rows(X, Y)
    X, Y = X.double(), Y.double()
    n = X.shape[0]
    H = torch.eye(n, dtype=torch.float64) - 1.0 / n
    Kc = H @ (X @ X.T) @ H
    Lc = H @ (Y @ Y.T) @ H
    return float((Kc * Lc).sum() / (torch.linalg.matrix_norm(Kc) * torch.linalg.matrix_norm(Lc)))


def unbiased_hsic(K: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    """Unbiased HSIC estimator (Song et al. 2012, as used for CKA by Nguyen et al. 2021), n > 3:

    HSIC_1 = [tr(K̃ L̃) + (1ᵀK̃1)(1ᵀL̃1) / ((n-1)(n-2)) - 2/(n-2) 1ᵀ K̃ L̃ 1] / (n (n-3)),
    with K̃, L̃ the Gram matrices with their diagonals set to zero.
    """
    n = K.shape[0]
    if n <= 3 or K.shape != (n, n) or L.shape != (n, n):
        raise ValueError(f"unbiased HSIC needs square n x n Gram matrices with n > 3; got {tuple(K.shape)}, "
                         f"{tuple(L.shape)}")
    Kt = K.clone().fill_diagonal_(0)
    Lt = L.clone().fill_diagonal_(0)
    term1 = (Kt * Lt).sum()  # tr(K̃ L̃) for symmetric matrices
    term2 = Kt.sum() * Lt.sum() / ((n - 1) * (n - 2))
    term3 = 2.0 / (n - 2) * (Kt.sum(0) @ Lt.sum(1))
    return (term1 + term2 - term3) / (n * (n - 3))


def minibatch_cka(X: torch.Tensor, Y: torch.Tensor, batch_size: int = 1024, *, seed: int = 0,
                  epochs: int = 1) -> float:
    """Minibatch linear CKA with the unbiased HSIC estimator (Nguyen, Raghu & Kornblith 2021).

    Rows are shuffled (``seed``) and split into minibatches of ``batch_size`` (a trailing batch of <= 3 rows is
    dropped); CKA = sum_b HSIC_1(K_b, L_b) / sqrt(sum_b HSIC_1(K_b, K_b) * sum_b HSIC_1(L_b, L_b)), linear
    kernels K_b = X_b X_bᵀ. Unbiased in each HSIC term, so it does not drift with the batch size the way the
    plug-in estimator does, and memory is O(batch_size²) whatever n is.
    """
    X, Y = _check_rows(X, Y)
    if batch_size < 4:
        raise ValueError("batch_size must be at least 4 for the unbiased HSIC estimator")
    n = X.shape[0]
    gen = torch.Generator().manual_seed(seed)
    sxy = sxx = syy = torch.zeros((), dtype=torch.float64)
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen)
        for s in range(0, n, batch_size):
            idx = perm[s:s + batch_size]
            if idx.numel() <= 3:
                continue
            xb, yb = X[idx.to(X.device)].double(), Y[idx.to(Y.device)].double()
            K, L = xb @ xb.T, yb @ yb.T
            sxy = sxy + unbiased_hsic(K, L).cpu()
            sxx = sxx + unbiased_hsic(K, K).cpu()
            syy = syy + unbiased_hsic(L, L).cpu()
    if sxx <= 0 or syy <= 0:
        raise ValueError("CKA is undefined: a representation has no variance across rows")
    return float(sxy / torch.sqrt(sxx * syy))


def cka_by_layer(hidden_by_layer: dict, targets: torch.Tensor, *, method: str = "linear",
                 batch_size: int = 1024, max_rows: int | None = None, seed: int = 0,
                 progress: bool = False) -> dict:
    """CKA between each layer's hidden states and target embeddings (docs/paper.md, reAR §2.4, Fig. 9b-c).

    ``hidden_by_layer``: {layer index: Tensor [n, C]} (rows = token positions pooled over images, the same rows
    for every layer); ``targets``: [n, D], e.g. codebook vectors of the current ("encoded") or next ("decoded")
    tokens. ``method``: ``"linear"`` (:func:`linear_cka`, Eq. 13) or ``"minibatch"`` (:func:`minibatch_cka`).
    ``max_rows``: optional random subsample of rows (``seed``), shared by all layers. Returns {layer: CKA}.
    """
    if method not in ("linear", "minibatch"):
        raise ValueError(f"method must be 'linear' or 'minibatch', got {method!r}")
    if not hidden_by_layer:
        raise ValueError("hidden_by_layer is empty")
    n = targets.shape[0]
    for layer, h in hidden_by_layer.items():
        if h.ndim != 2 or h.shape[0] != n:
            raise ValueError(f"layer {layer}: hidden states must be [n={n}, C]; got {tuple(h.shape)}")
    rows = None
    if max_rows is not None and max_rows < n:
        rows = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max_rows]
    tgt = targets if rows is None else targets[rows.to(targets.device)]
    out = {}
    for layer in tqdm(sorted(hidden_by_layer), desc="CKA by layer", disable=not progress, leave=False):
        h = hidden_by_layer[layer]
        h = h if rows is None else h[rows.to(h.device)]
        out[layer] = linear_cka(h, tgt) if method == "linear" else minibatch_cka(h, tgt, batch_size, seed=seed)
    return out
