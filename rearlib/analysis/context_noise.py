"""Experiment C - robustness of next-token prediction to context noise (paper App. C.1, Fig. 9a; docs/paper.md,
reAR §2.3; notebook 07).

Teacher-forced CTR, Eq. 8, of ``argmax p_θ(· | x̃_{<t})`` against the clean ``x_t`` for t = 1..N. ``"clean"``:
x̃ = x. ``"noisy"``: exactly ``round(f (N - 1))`` of the context tokens x_1..x_{N-1} (x_N is context for nothing)
are chosen uniformly without replacement and replaced by a uniform code different from the original (so the
realised corruption rate is exactly f up to rounding; the paper's "10% replaced uniformly at random").
Columns: ``ctr``, ``n_replaced``, ``noise_rate`` (realised), ``ctr_after_noisy`` / ``ctr_after_clean`` = CTR over
targets x_{t+1} whose immediately preceding input x̃_t was / was not replaced (NaN for clean).
"""

from __future__ import annotations

from typing import Sequence

import pandas as pd
import torch

from rearlib.analysis.common import (STREAM_CONTEXT, base_seed, check_batch_size, check_choice, check_fracs,
                                     eval_mode, finish_frame, model_dims, prepare, progress_bar, row_gen,
                                     setting_key, teacher_forced_predictions)

CONDITIONS = ("clean", "noisy")


def perturb_context(tokens: torch.Tensor, fraction: float, codebook_size: int,
                    generators: Sequence[torch.Generator]):
    """Replace exactly ``round(fraction * (N - 1))`` of the context tokens x_1..x_{N-1} of each row, chosen
    uniformly without replacement, by a uniform code different from the original (one CPU generator per row).

    Returns ``(noisy [B, N], replaced [B, N] bool)``; x_N (context for no prediction) is never touched."""
    t = tokens
    B, N = t.shape
    if len(generators) != B:
        raise ValueError(f"need one generator per row ({B}), got {len(generators)}")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    n = int(round(fraction * (N - 1)))
    noisy = t.clone()
    replaced = torch.zeros(B, N, dtype=torch.bool)
    for b, g in enumerate(generators):
        pos = torch.randperm(N - 1, generator=g)[:n]
        new = torch.randint(0, codebook_size - 1, (n,), generator=g)
        pos_d = pos.to(t.device)
        orig = t[b, pos_d].cpu()
        new = new + (new >= orig).long()
        noisy[b, pos_d] = new.to(t.device)
        replaced[b, pos] = True
    return noisy, replaced.to(t.device)


def robustness(model, data, labels, *, tokenizer=None, noise_fraction: float = 0.1,
               conditions: Sequence[str] = CONDITIONS, repeats: int = 1, generator=None,
               batch_size: int = 128, dtype: torch.dtype | None = None, image_ids=None,
               progress: bool = True) -> pd.DataFrame:
    """Experiment C (module docstring): teacher-forced CTR with clean context and with ``noise_fraction`` of the
    context replaced at random. data: GT tokens ``[B, N]`` (or images, encoded with ``tokenizer``).
    Returns one row per (condition, repeat, image); "clean" rows have ``repeat = 0`` only."""
    N, K, M = model_dims(model)
    batch_size = check_batch_size(batch_size)
    tokens, labels, _, ids = prepare(model, tokenizer, data, labels, None, image_ids, batch_size)
    conditions = check_choice(conditions, CONDITIONS, "conditions")
    check_fracs([noise_fraction], "noise_fraction")
    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive int, got {repeats!r}")
    base = base_seed(generator)
    B = tokens.shape[0]
    lab_list = labels.tolist()
    jobs = [(c, rep) for c in conditions for rep in (range(repeats) if c == "noisy" else [0])]
    records = []
    chunks = [list(range(s, min(B, s + batch_size))) for s in range(0, B, batch_size)]
    with eval_mode(model):
        for cond, rep in jobs:
            for chunk in progress_bar(chunks, f"robustness ({cond})", len(chunks), progress):
                gt = tokens[chunk]
                if cond == "clean":
                    inp, replaced = gt, torch.zeros_like(gt, dtype=torch.bool)
                else:
                    gens = [row_gen(base, STREAM_CONTEXT, ids[i], setting_key(noise_fraction), rep) for i in chunk]
                    inp, replaced = perturb_context(gt, noise_fraction, K, gens)
                pred = teacher_forced_predictions(model, inp, labels[chunk], batch_size=batch_size, dtype=dtype)
                correct = pred == gt
                # Target x_{t+1} (column t) follows input x̃_t (column t-1); column 0 follows the class token.
                after_noisy = torch.zeros_like(replaced)
                after_noisy[:, 1:] = replaced[:, :-1]
                nan = torch.full((len(chunk),), float("nan"), dtype=torch.float64, device=gt.device)
                n_an, n_ac = after_noisy.sum(1), (~after_noisy).sum(1)
                c_an = torch.where(n_an > 0, (correct & after_noisy).sum(1) / n_an.clamp_min(1), nan)
                c_ac = (correct & ~after_noisy).sum(1) / n_ac.clamp_min(1) if cond == "noisy" else nan
                n_rep = replaced.sum(1).tolist()
                ctr, c_an, c_ac = correct.double().mean(1).tolist(), c_an.tolist(), c_ac.tolist()
                for row, i in enumerate(chunk):
                    records.append({
                        "image_id": ids[i], "label": lab_list[i], "condition": cond,
                        "noise_fraction": noise_fraction if cond == "noisy" else 0.0, "repeat": rep,
                        "n_tokens": N, "n_replaced": n_rep[row], "noise_rate": n_rep[row] / (N - 1),
                        "ctr": ctr[row], "ctr_after_noisy": c_an[row], "ctr_after_clean": c_ac[row],
                    })
    return finish_frame(records, None, dict(seed=base))
