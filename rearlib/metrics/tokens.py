"""Token metrics: correct-token ratio, perplexities and codebook-embedding similarity (docs/paper.md, reAR §2, §6).

Tokens in: LongTensor ``[B, N]`` (raster order) or ``[B, h, w]`` (flattened row-major); ``[N]`` is one sequence.
Per-sample functions return a float64 tensor ``[B]``; ``reduction="mean"`` aggregates (skipping NaNs where a value
can be undefined, documented per function).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _as_sequences(tokens, name: str) -> torch.Tensor:
    """[N] -> [1, N]; [B, N] as is; [B, h, w] -> [B, h*w] (row-major = raster order)."""
    t = torch.as_tensor(tokens)
    if t.dtype.is_floating_point or t.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer token ids, got dtype {t.dtype}")
    if t.ndim == 1:
        t = t.unsqueeze(0)
    elif t.ndim == 3:
        t = t.reshape(t.shape[0], -1)
    elif t.ndim != 2:
        raise ValueError(f"{name} must be [N], [B, N] or [B, h, w]; got shape {tuple(t.shape)}")
    if t.shape[1] == 0:
        raise ValueError(f"{name} has no positions")
    return t.long()


def _check_pair(pred, target) -> tuple[torch.Tensor, torch.Tensor]:
    p, t = _as_sequences(pred, "pred"), _as_sequences(target, "target")
    if p.shape != t.shape:
        raise ValueError(f"pred and target must have the same shape after flattening; got {tuple(p.shape)} "
                         f"and {tuple(t.shape)}")
    return p, t.to(p.device)


def _check_range(tokens: torch.Tensor, K: int, name: str) -> None:
    lo, hi = int(tokens.min()), int(tokens.max())
    if lo < 0 or hi >= K:
        raise ValueError(f"{name} ids must lie in [0, {K}); found range [{lo}, {hi}]")


def correct_token_ratio(pred, target, reduction: str = "none") -> torch.Tensor:
    """Correct-token ratio, CTR = (1/N) * sum_i 1[pred_i == target_i] (docs/paper.md, reAR §2; Eq. 8).

    Per sequence: ``[B]`` (``reduction="none"``). ``reduction="mean"`` returns the mean over sequences, which for
    equal-length sequences equals the pooled fraction of correct positions. Under teacher forcing ``pred`` is the
    argmax prediction at every position; in the exposure-bias protocol it is the final decoded sequence.
    """
    p, t = _check_pair(pred, target)
    ctr = (p == t).double().mean(dim=1)
    return _reduce(ctr, reduction)


def _reduce(x: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return x
    if reduction == "mean":
        return x.nanmean()
    raise ValueError(f"reduction must be 'none' or 'mean', got {reduction!r}")


def token_log_probs(logits: torch.Tensor, tokens) -> torch.Tensor:
    """log p(tokens_i | logits_i) per position: ``[B, N]`` float64.

    ``logits[:, i]`` must be the distribution *for* ``tokens[:, i]``. With the generator's output
    (``logits[:, i]`` predicts x_{i+1}, position 0 = class token) that is ``logits[:, :N]`` against ``x_1..x_N``.
    """
    t = _as_sequences(tokens, "tokens").to(logits.device)
    if logits.ndim == 2:
        logits = logits.unsqueeze(0)
    if logits.ndim != 3 or logits.shape[:2] != t.shape:
        raise ValueError(f"logits must be [B, N, K] matching tokens [B, N]={tuple(t.shape)}; got {tuple(logits.shape)}")
    _check_range(t, logits.shape[-1], "tokens")
    logp = torch.log_softmax(logits.double(), dim=-1)
    return logp.gather(-1, t.unsqueeze(-1)).squeeze(-1)


def sequence_perplexity(logits: torch.Tensor, tokens, reduction: str = "none") -> torch.Tensor:
    """Perplexity of ``tokens`` under ``logits``: exp(-(1/N) * sum_i log p(tokens_i | logits_i)) (Eq. 9).

    Per sequence ``[B]``; ``reduction="mean"`` averages the per-sequence perplexities (it does not pool log
    probabilities). Whatever context produced ``logits`` is the context the perplexity is conditioned on.
    """
    return _reduce(token_log_probs(logits, tokens).mean(dim=1).neg().exp(), reduction)


def context_perplexities(logits_given_evaluated: torch.Tensor, evaluated, ground_truth) -> dict:
    """The two perplexities of docs/paper.md, reAR §6 item 5, both under the *evaluated* context.

    ``logits_given_evaluated``: generator logits obtained by feeding the evaluated sequence x̂ (teacher-forced
    on x̂, i.e. logits[:, i] = p(. | x̂_{<i})). Returns per-sequence ``[B]`` tensors:

    * ``"evaluated"``: PPL(x̂) = exp(-mean_i log p(x̂_i | x̂_{<i})), the perplexity of the evaluated sequence
      itself. This is our reading of the paper's Fig. 8 x-axis (its values, ~1450-1950 > K = 1024, cannot be a
      reasonable model's teacher-forced ground-truth perplexity); it is what we plot and label "PPL(x̂ | x̂<i)".
    * ``"ground_truth"``: exp(-mean_i log p(x_i | x̂_{<i})), the perplexity of the ground-truth tokens given the
      evaluated prefix; logged alongside, labeled "PPL(x | x̂<i)".
    """
    ev, gt = _check_pair(evaluated, ground_truth)
    return {"evaluated": sequence_perplexity(logits_given_evaluated, ev),
            "ground_truth": sequence_perplexity(logits_given_evaluated, gt)}


def embedding_similarity(pred, target, codebook: torch.Tensor, over: str = "wrong",
                         reduction: str = "none") -> torch.Tensor:
    """Mean cosine similarity between the codebook vectors of predicted and true tokens.

    s_i = cos(z[pred_i], z[target_i]) with ``z = codebook`` ``[K, D]`` (raw code vectors, as the tokenizer stores
    them). Per sequence:

    * ``over="wrong"`` (our default; docs/paper.md, reAR §6 item 6): mean of s_i over positions with pred_i !=
      target_i. A sequence without wrong positions has no value: NaN (``reduction="mean"`` skips NaNs).
    * ``over="all"``: mean of s_i over all N positions; correct positions contribute exactly 1, so this mixes
      CTR into the number: all = CTR + (1 - CTR) * wrong.

    The paper's Fig. 3b/8e "embedding similarity" is undefined in the text; we report ``wrong`` and also ``all``.
    """
    if over not in ("wrong", "all"):
        raise ValueError(f"over must be 'wrong' or 'all', got {over!r}")
    p, t = _check_pair(pred, target)
    if codebook.ndim != 2:
        raise ValueError(f"codebook must be [K, D], got shape {tuple(codebook.shape)}")
    K = codebook.shape[0]
    _check_range(p, K, "pred")
    _check_range(t, K, "target")
    z = F.normalize(codebook.double(), dim=-1).to(p.device)
    cos = (z[p] * z[t]).sum(-1)
    correct = p == t
    cos = torch.where(correct, torch.ones_like(cos), cos)  # exactly 1 even for a zero code vector
    if over == "all":
        return _reduce(cos.mean(dim=1), reduction)
    wrong = (~correct).double()
    n_wrong = wrong.sum(dim=1)
    val = (cos * wrong).sum(dim=1) / n_wrong.clamp_min(1)
    val = torch.where(n_wrong > 0, val, torch.full_like(val, float("nan")))
    return _reduce(val, reduction)
