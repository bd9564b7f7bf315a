"""Experiment B - embedding-nearest replacement (paper §3.1 Fig. 3b, App. B Fig. 7, Fig. 8e-g; docs/paper.md,
reAR §2.2; notebook 06).

Teacher forcing on ``x`` gives ``x̂_t = argmax p_θ(· | x_{<t})`` (Eq. 8). Each wrong position (x̂_t != x_t) is
selected with probability ``r'`` and its token replaced by ``c(x_t)``; the sequence is decoded directly (no further
generation). ``z(k)`` is the tokenizer's raw codebook vector of code ``k`` (``tokenizer.codebook[k]``). ``mode``:
``"nearest"`` c = the code with the highest cosine similarity to z(x_t) other than x_t itself (the paper's
protocol; reAR §6 item 7: precomputed top-1 neighbour, ties -> lowest id); contrasts at the same positions:
``"farthest"`` (lowest cosine, other than x_t) and ``"random"`` (uniform over the K-1 codes other than x_t). A
replacement never equals x_t, so CTR is unchanged by construction; this is checked for every row and a violation
raises :class:`RuntimeError`. Selection uses one uniform ``v_t`` per (image, position, repeat) and selects
``v_t < r'``, so the selected sets are nested in ``r'`` and identical across modes (common random numbers).

Columns: ``ctr``; ``n_wrong``, ``n_replaced`` (selected), ``n_changed`` (selected positions whose token actually
changed: the neighbour may already be the prediction); ``emb_sim_wrong`` / ``emb_sim_all`` = mean
cos(z(x̂_t), z(x_t)) over wrong / all positions (reAR §6 item 6; "wrong" is our reading of the paper's "embedding
similarity"); ``ppl`` / ``ppl_gt`` as in experiment A (:mod:`rearlib.analysis.forced_decoding`) for the replaced
sequence (teacher-forced on it); ``ppl_tf`` = exp(-(1/N) Σ_t log p_θ(x̂_t | x_{<t})), the replaced tokens scored in
the GT context the predictions were made in; ``*_delta`` = value minus the same image's value at r' = 0 (the plain
teacher-forced argmax sequence; the paper's ΔPerplexity); image metrics (:mod:`rearlib.analysis.scoring`).
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from rearlib import scales
from rearlib.analysis.common import (STREAM_RANDOM_CODE, STREAM_SELECT, base_seed, check_batch_size, check_choice,
                                     check_fracs, eval_mode, finish_frame, maybe_autocast, model_device, model_dims,
                                     prepare, progress_bar, row_gen, setting_key, teacher_forced_predictions)
from rearlib.analysis.scoring import IMAGE_METRICS, Scorer
from rearlib.metrics import embedding_similarity

R_PRIMES = scales.R_PRIMES  # the paper's grid of replacement rates r'
REPLACEMENT_MODES = ("nearest", "random", "farthest")


@torch.no_grad()
def codebook_neighbours(codebook) -> dict:
    """Nearest and farthest code of every code under cosine similarity, the code itself excluded.

    codebook: ``[K, D]`` tensor or a tokenizer (its ``.codebook``). Returns ``{"nearest": [K] long,
    "nearest_cos": [K] float64, "farthest": [K] long, "farthest_cos": [K] float64}`` (CPU). Similarities in
    float64; ties go to the lowest id. A zero code vector has cosine 0 to everything.
    """
    cb = codebook.codebook if hasattr(codebook, "codebook") and not torch.is_tensor(codebook) else codebook
    if not torch.is_tensor(cb) or cb.ndim != 2 or cb.shape[0] < 2:
        raise ValueError("codebook must be a [K, D] tensor with K >= 2 (or a tokenizer)")
    z = F.normalize(cb.detach().double().cpu(), dim=1)
    sim = z @ z.T
    eye = torch.eye(sim.shape[0], dtype=torch.bool)
    near = sim.masked_fill(eye, float("-inf"))
    far = sim.masked_fill(eye, float("inf"))
    n_cos, n_id = near.max(dim=1)
    f_cos, f_id = far.min(dim=1)
    return {"nearest": n_id, "nearest_cos": n_cos, "farthest": f_id, "farthest_cos": f_cos}


@torch.no_grad()
def _sequence_log_probs(model, seqs, labels, others, batch_size, dtype):
    """Teacher forcing on ``seqs`` [R, N]: (log p(seqs_t | seqs_<t), log p(others_t | seqs_<t)), [R, N] float64
    each, computed batch by batch so that the [R, N, K] log-softmax is never held for all rows at once."""
    dev = model_device(model)
    a, b = [], []
    with eval_mode(model), maybe_autocast(dev, dtype):
        for s in range(0, seqs.shape[0], batch_size):
            lp = torch.log_softmax(model(seqs[s:s + batch_size], labels[s:s + batch_size]).logits.float(), dim=-1)
            a.append(lp.gather(-1, seqs[s:s + batch_size].unsqueeze(-1)).squeeze(-1).double())
            b.append(lp.gather(-1, others[s:s + batch_size].unsqueeze(-1)).squeeze(-1).double())
    return torch.cat(a), torch.cat(b)


def embedding_replacement(model, tokenizer, data, labels, *, images=None, r_primes=R_PRIMES,
                          modes=REPLACEMENT_MODES, repeats: int = 1, generator=None, batch_size: int = 64,
                          dtype: torch.dtype | None = None, metrics: Sequence[str] = IMAGE_METRICS,
                          perceptual: str | Callable | None = "auto", classifier=None, scale: str = "smoke",
                          references=("image", "reconstruction"), image_ids=None, return_outputs: bool = False,
                          progress: bool = True):
    """Experiment B (module docstring): teacher-forced argmax predictions whose wrong tokens are replaced with
    probability r' by the nearest / a random / the farthest code of the TRUE token, decoded directly.

    Arguments as :func:`exposure_bias`; ``r_primes`` in [0, 1] (r' = 0 is always computed: it is the baseline of
    the ``*_delta`` columns), ``modes`` ⊆ ("nearest", "random", "farthest"). Returns one row per (mode, r',
    repeat, image); with ``return_outputs`` also ``{"tokens", "images"}`` in row order (CPU). Raises
    RuntimeError if a replaced sequence's CTR differs from the teacher-forced CTR (cannot happen unless the
    neighbour tables are wrong).
    """
    N, K, M = model_dims(model)
    batch_size = check_batch_size(batch_size)
    if tokenizer is None:
        raise ValueError("embedding_replacement needs the tokenizer (codebook neighbours and decoding)")
    tokens, labels, real, ids = prepare(model, tokenizer, data, labels, images, image_ids, batch_size)
    r_primes = check_fracs(r_primes, "r_primes")
    modes = check_choice(modes, REPLACEMENT_MODES, "modes")
    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive int, got {repeats!r}")
    requested = set(setting_key(r) for r in r_primes)
    if 0 not in requested:
        r_primes = [0.0] + r_primes
    base = base_seed(generator)
    dev = tokens.device
    codebook = tokenizer.codebook.detach()
    nb = codebook_neighbours(codebook)
    table = {"nearest": nb["nearest"].to(dev), "farthest": nb["farthest"].to(dev)}
    B = tokens.shape[0]
    lab_list = labels.tolist()
    scorer = Scorer(tokenizer, real, tokens, which=metrics, perceptual=perceptual, classifier=classifier,
                     scale=scale, references=references)
    per_image = len(modes) * len(r_primes) * repeats
    img_chunk = max(1, batch_size // per_image)
    records, out_tok, out_img = [], [], []
    chunks = [list(range(s, min(B, s + img_chunk))) for s in range(0, B, img_chunk)]
    with eval_mode(model, tokenizer):
        for chunk in progress_bar(chunks, "embedding replacement", len(chunks), progress):
            gt = tokens[chunk]
            lab = labels[chunk]
            pred, lp_gt_ctx = teacher_forced_predictions(model, gt, lab, batch_size=batch_size, dtype=dtype,
                                                         return_log_probs=True)
            wrong = pred != gt
            ctr_tf = (~wrong).double().mean(1)
            rows, meta = [], []
            for rep in range(repeats):
                v = torch.stack([torch.rand(N, generator=row_gen(base, STREAM_SELECT, ids[i], rep),
                                            dtype=torch.float64) for i in chunk]).to(dev)
                # Uniform over the K - 1 codes other than the true one: draw in [0, K-1), skip the true id.
                rc = torch.stack([torch.randint(0, K - 1, (N,), generator=row_gen(base, STREAM_RANDOM_CODE,
                                                                                   ids[i], rep))
                                  for i in chunk]).to(dev)
                rc = rc + (rc >= gt).long()
                for mode in modes:
                    repl = rc if mode == "random" else table[mode][gt]
                    for rp in r_primes:
                        sel = wrong & (v < rp)
                        rows.append(torch.where(sel, repl, pred))
                        meta.append((mode, rp, rep, sel))
            seqs = torch.stack(rows, 1).reshape(-1, N)                      # [b * per_image, N], image-major
            n_per = len(rows)
            img_pos = [c for c in chunk for _ in range(n_per)]
            sel_all = torch.stack([m[3] for m in meta], 1).reshape(-1, N)
            rep_gt = gt.repeat_interleave(n_per, 0)
            rep_pred = pred.repeat_interleave(n_per, 0)
            ctr = (seqs == rep_gt).double().mean(1)
            ctr_ref = ctr_tf.repeat_interleave(n_per)
            if not torch.equal(ctr, ctr_ref):
                bad = int((ctr != ctr_ref).nonzero()[0])
                raise RuntimeError(f"replacement changed the CTR of row {bad} ({float(ctr_ref[bad]):.6f} -> "
                                   f"{float(ctr[bad]):.6f}); a replacement code equals the true token")
            lab_rows = lab.repeat_interleave(n_per)
            lp_self, lp_gt_rows = _sequence_log_probs(model, seqs, lab_rows, rep_gt, batch_size, dtype)
            # The replaced tokens scored in the GT context (the context the predictions were made in).
            local = torch.arange(len(chunk), device=dev).repeat_interleave(n_per)
            lp_tf = lp_gt_ctx[local[:, None], torch.arange(N, device=dev)[None, :], seqs].double()
            ctr = ctr.tolist()
            ppl = lp_self.mean(1).neg().exp().tolist()
            ppl_gt = lp_gt_rows.mean(1).neg().exp().tolist()
            ppl_tf = lp_tf.mean(1).neg().exp().tolist()
            sim_w = embedding_similarity(seqs, rep_gt, codebook, over="wrong").tolist()
            sim_a = embedding_similarity(seqs, rep_gt, codebook, over="all").tolist()
            n_wrong = (rep_pred != rep_gt).sum(1).tolist()
            n_sel = sel_all.sum(1).tolist()
            n_changed = (seqs != rep_pred).sum(1).tolist()
            cols, decs = {}, []
            for s in range(0, seqs.shape[0], batch_size):
                c, d = scorer(seqs[s:s + batch_size], img_pos[s:s + batch_size], need_images=return_outputs)
                for k, vals in c.items():
                    cols.setdefault(k, []).extend(vals)
                if return_outputs:
                    decs.append(d.cpu())
            for row in range(seqs.shape[0]):
                i = img_pos[row]
                mode, rp, rep, _ = meta[row % n_per]
                rec = {"image_id": ids[i], "label": lab_list[i], "mode": mode, "r_prime": rp, "repeat": rep,
                       "n_tokens": N, "ctr": ctr[row], "n_wrong": n_wrong[row], "n_replaced": n_sel[row],
                       "n_changed": n_changed[row], "emb_sim_wrong": sim_w[row], "emb_sim_all": sim_a[row],
                       "ppl": ppl[row], "ppl_gt": ppl_gt[row], "ppl_tf": ppl_tf[row]}
                rec.update({c: v[row] for c, v in cols.items()})
                records.append(rec)
            if return_outputs:
                out_tok.append(seqs.cpu())
                out_img.append(torch.cat(decs))
    df = finish_frame(records, scorer, dict(seed=base))
    # Deltas against the same (image, mode, repeat) at r' = 0.
    key = ["image_id", "mode", "repeat"]
    base_rows = df[df["r_prime"] == 0.0].set_index(key)
    for c in ["ppl", "ppl_gt", "ppl_tf", "emb_sim_wrong", "emb_sim_all"] + scorer.columns:
        ref = base_rows[c].reindex(pd.MultiIndex.from_frame(df[key])).to_numpy()
        with np.errstate(invalid="ignore"):
            df[c + "_delta"] = df[c].to_numpy() - ref
    if 0 not in requested:
        keep = df["r_prime"] != 0.0
        df = df[keep].reset_index(drop=True)
        if return_outputs:
            m = torch.as_tensor(keep.to_numpy())
            out_tok, out_img = [torch.cat(out_tok)[m]], [torch.cat(out_img)[m]]
    if return_outputs:
        return df, {"tokens": torch.cat(out_tok), "images": torch.cat(out_img)}
    return df
