"""VA-π post-training: pixel-space alignment of an AR generator by a GRPO-style policy gradient.

VA-π (Liao et al., arXiv 2512.19680) fine-tunes a trained generator so that the images its tokens decode to match
the real images. Everything below follows ``docs/paper.md``, Part II (VA-π); where the paper (v1) and the
released code (github.com/Lil-Shake/VA-Pi @ 3be8fce, ``train_c2i_grpo.py``) disagree, **the code's behaviour is the
default and the paper's is an option** (each such field of :class:`VAPIConfig` says so).

One step (:func:`vapi_step`), for a batch of B reference images I_b with ground-truth tokens x*_b (N tokens each,
codebook size K) and class labels c_b, with G = ``group_size``:

1. **Noisy context** (docs/paper.md, VA-π §1.3): x~*_b = K_ξ(x*_b): each teacher-forcing input position is replaced
   with probability ξ (``noise_rate``) by a token drawn uniformly from all K codes (``noise_kernel="code"``) or from
   the K - 1 codes other than the GT one (``"paper"``, Eq. 28-29). The class token is never corrupted. Only the
   first N - 1 positions are corrupted: x_N is never read by any prediction (the code corrupts the TF input,
   which is x*_{1..N-1}). One context per image, shared by its G samples, the update and the CE term.
2. **Rollout** (docs/paper.md, VA-π §1.5): one teacher-forced forward pass on (c_b, x~*_b), by default in ``eval()``
   mode, without grad, under bf16 autocast on CUDA (``rollout_mode``), gives logits l_{b,t} for t = 1..N. Then G tokens
   are drawn **independently at every position**: x^{(g)}_{b,t} ~ softmax(l_{b,t} / τ). The policy is therefore
   a factorised categorical over positions conditioned on the noisy GT prefix; samples never condition on one
   another. Old per-token log-probs log π_old(x^{(g)}_{b,t}) are kept.
3. **Reward** (docs/paper.md, VA-π §1.4, :func:`compute_rewards`): every sample is decoded by the frozen tokenizer,
   Î = decode(x^{(g)}_b), and R = -(w_mse · MSE(Î, I) + w_p · D_p(Î, I)), with MSE the per-image mean over C×H×W
   of squared differences of the images mapped to [-1, 1] (i.e. 4× the MSE in [0, 1] units) and D_p a per-image
   perceptual distance (LPIPS-VGG in the paper's code; here :func:`rearlib.metrics.perceptual_distance`:
   ST-LPIPS(alex) at the smoke and small scales, LPIPS-VGG where its ImageNet trunk is on disk with
   ``perceptual="auto"``, the in-project classifier's DFD only when asked for by name; or any callable).
   ``reward_terms`` selects "mse", "perceptual" or "both"; w_p = λ_p is best set from the terms' within-group
   spreads (:func:`reward_spreads`), which every step logs.
4. **Advantages** (:func:`group_advantages`): A_{b,g} = clip((R_{b,g} - mean_g R_b) / (std_g R_b + 1e-8), ±5),
   std the unbiased (n - 1) standard deviation over the G samples of image b only (no batch normalisation).
5. **Update** (docs/paper.md, VA-π §1.6, :func:`vapi_loss`): a teacher-forced pass on the **same** contexts gives new
   log-probs - in train mode as the code (``update_mode="train"``, the paper scale: dropout and class-label
   dropout 0.1, so the ratio differs from 1 through dropout alone), or in eval mode (the smoke and small scales, a
   documented deviation: see :class:`VAPIConfig`, ``update_mode``); per-token ratio ρ = exp(log π_θ - log π_old);
   per-token PPO term
   -min(ρ A, clip(ρ, 1 - ε, 1 + ε) A), averaged over the N tokens of a sequence and then over sequences; plus
   β · CE(logits, x*) (next-token cross-entropy on the GT tokens under the noisy context, mean over tokens);
   plus, optionally, κ · KL to a frozen copy of the initial model (off by default, as the released launchers).
   One optimizer step per sampling round (``ppo_epochs = num_minibatches = 1``, the code's effective setting),
   gradient-norm clip 1.0, AdamW (0.9, 0.999), weight decay 1e-4 on matrices only, constant lr.

Controls (``control``, :mod:`rearlib.vapi_controls`): "prior_only" updates with the CE prior alone, "shuffled_rewards"
permutes the rewards across the batch before the advantages; both keep every seed of the method's run.

Compute note: when the update pass is deterministic (``update_mode="eval"``, or a model without dropout and
``class_dropout = 0``), the G copies of a context give identical logits, so the update runs one forward per image
and gathers the G samples from it - the same numbers as G forwards, G times cheaper. Otherwise (the default) it
runs one forward per sequence, as the code does, so every copy gets its own dropout and label-dropout draw.

Entry points: :class:`VAPIConfig`, :func:`config_for_scale`, :func:`lr_sweep_configs`, :func:`control_configs`,
:func:`corrupt_context`, :func:`compute_rewards`, :func:`reward_spreads`, :func:`group_advantages`,
:func:`shuffle_rewards`, :func:`vapi_loss`, :func:`vapi_step`, :func:`post_train`, :func:`make_perceptual_fn`,
:func:`heldout_reconstruction_reward`, :class:`EmbeddedSource`; CLI
``python -m rearlib vapi --scale small --generator MODEL.pt --out DIR``.

Layout: this module holds the loop (:func:`post_train`) and the CLI and re-exports the public names of its pieces:
:mod:`rearlib.vapi_config` (VAPIConfig, config_for_scale, the sweep and control configs), :mod:`rearlib.vapi_rewards`
(rewards, their spreads, perceptual distance, advantages, the held-out reward), :mod:`rearlib.vapi_controls` (the
controls), :mod:`rearlib.vapi_step` (context noise, loss, the step, the optimizer) and :mod:`rearlib.vapi_data` (the
data sources).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from rearlib import scales
from rearlib.data import load_dataset
from rearlib.runtime import atomic_torch_save, atomic_write_text, completed_record, resolve_device
from rearlib.scales import validate_scale
from rearlib.tokenizers import get_tokenizer
from rearlib.train_checkpoints import CHECKPOINT_FORMAT as TRAIN_FORMAT
from rearlib.train_checkpoints import load_generator
from rearlib.train_config import parse_overrides
from rearlib.vapi_config import (
    CONTROLS,
    KL_ESTIMATORS,
    MODES,
    NOISE_KERNELS,
    RATIO_LEVELS,
    REWARD_TERMS,
    VAPIConfig,
    config_for_scale,
    control_configs,
    lr_sweep_configs,
)
from rearlib.vapi_controls import shuffle_generator, shuffle_rewards
from rearlib.vapi_data import BatchSource, EmbeddedSource
from rearlib.vapi_rewards import (
    HeldoutRewards,
    RewardResult,
    RewardSpreads,
    compute_rewards,
    group_advantages,
    group_std_mean,
    heldout_reconstruction_reward,
    make_perceptual_fn,
    perceptual_name,
    reward_spreads,
)
from rearlib.vapi_step import build_optimizer, corrupt_context, vapi_loss, vapi_step

__all__ = [
    "CHECKPOINT_FORMAT", "CONTROLS", "KL_ESTIMATORS", "MODES", "NOISE_KERNELS", "RATIO_LEVELS", "REWARD_TERMS",
    "BatchSource", "EmbeddedSource", "HeldoutRewards", "RewardResult", "RewardSpreads", "VAPIConfig",
    "build_optimizer", "compute_rewards", "config_for_scale", "control_configs", "corrupt_context",
    "group_advantages", "group_std_mean", "heldout_reconstruction_reward", "lr_sweep_configs", "main",
    "make_perceptual_fn", "perceptual_name", "post_train", "reward_spreads", "shuffle_generator", "shuffle_rewards",
    "vapi_loss", "vapi_step",
]

CHECKPOINT_FORMAT = "rearlib.vapi/1"


def _weights_fingerprint(model_or_sd: nn.Module | dict) -> str:
    """Short SHA-256 of a generator's weights (names and float32 values), to tie a checkpoint to its start."""
    sd = model_or_sd.state_dict() if isinstance(model_or_sd, nn.Module) else model_or_sd
    h = hashlib.sha256()
    for name, t in sorted(sd.items()):
        h.update(name.encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _rng_state(data_gen: torch.Generator, step_gen: torch.Generator, shuffle_gen: torch.Generator,
               device: torch.device) -> dict[str, Any]:
    st = {"data": data_gen.get_state(), "step": step_gen.get_state(), "shuffle": shuffle_gen.get_state(),
          "torch_cpu": torch.get_rng_state()}
    if device.type == "cuda":
        st["torch_cuda"] = torch.cuda.get_rng_state(device)
    return st


def _set_rng_state(st: dict[str, Any], data_gen, step_gen, shuffle_gen, device: torch.device) -> None:
    data_gen.set_state(st["data"])
    step_gen.set_state(st["step"])
    shuffle_gen.set_state(st["shuffle"])
    torch.set_rng_state(st["torch_cpu"])
    if device.type == "cuda" and "torch_cuda" in st:
        torch.cuda.set_rng_state(st["torch_cuda"], device)


def post_train(model: nn.Module, tokenizer: nn.Module, data: Any, cfg: VAPIConfig, steps: int,
               out_dir: str | Path, device: str | torch.device = "auto", *, perceptual_fn: Callable | None = None,
               scale: str = "smoke", resume: bool = True, ckpt_every: int = 50, progress: bool = True,
               time_limit_s: float | None = None) -> dict[str, Any]:
    """Post-train ``model`` **in place** with VA-π for ``steps`` sampling rounds; resumable, atomic checkpoints.

    Args:
        model: the trained generator (its current weights are the starting point and, when ``cfg.kl_coef > 0``,
            the frozen reference). Moved to ``device``.
        tokenizer: the frozen tokenizer (moved to ``device``, set to eval, gradients off).
        data: a torch Dataset of (image [3, H, W] in [0, 1], label) items; a dict ``{"images", "labels"[,
            "tokens"]}`` or tuple ``(images, labels[, tokens])`` of tensors; or an object with ``__len__`` and
            ``fetch(indices, device) -> (images, labels[, tokens])`` such as :class:`EmbeddedSource`. Missing
            tokens are encoded on the fly with the tokenizer (as the code does).
        cfg: :class:`VAPIConfig`; each step draws ``cfg.batch_size`` distinct images uniformly at random (the code
            reshuffles the whole training set every step and takes its first batch).
        steps: total number of steps (a resumed run continues up to it).
        out_dir: receives ``checkpoint.pt`` (full state, every ``ckpt_every`` steps and at the end), ``model.pt``
            (final weights in the ``rearlib.train`` model format, loadable with ``rearlib.train.load_generator``),
            ``history.csv`` (one row per step) and ``result.json``.
        perceptual_fn: callable(a, b) -> [M]; default :func:`make_perceptual_fn` (``cfg.perceptual``, ``scale``)
            when the perceptual term enters the reward.
        scale: used only to find the substitute perceptual network when LPIPS is unavailable.
        resume: continue from ``out_dir/checkpoint.pt`` when its config and starting weights match.
        time_limit_s: stop with a checkpoint after the first step past this many seconds (chunked GPU runs).

    Randomness: the batch order comes from a CPU generator seeded with ``cfg.seed``, the noise / sampling / label
    dropout from a device generator seeded with ``cfg.seed + 1``, torch's global RNG (model dropout) is
    reseeded with ``cfg.seed + 2`` and the reward permutations of ``control="shuffled_rewards"`` come from a CPU
    generator seeded with ``cfg.seed + 3`` (so a control draws the same batches, contexts and first-step samples as
    the method); all four are checkpointed, so a resumed run equals an uninterrupted one
    (bit-exact on CPU; on CUDA up to nondeterministic kernels).

    Returns a dict: ``status`` ("completed" | "stopped"), ``step``, ``steps``, ``history`` (list of per-step
    dicts: step, reward_mean, ..., perceptual_metric, elapsed_s), ``history_df`` (pandas DataFrame of it),
    ``perceptual_metric``, ``wall_time_s`` (this call), ``train_time_s`` (all calls, excluding checkpoint I/O),
    ``steps_this_call``, file paths, ``base_fingerprint``, ``final_fingerprint`` (of the final weights; None
    unless completed) and ``model`` (the post-trained generator, eval mode).
    """
    if not isinstance(cfg, VAPIConfig):
        raise TypeError(f"cfg must be a VAPIConfig, got {type(cfg).__name__}")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if not isinstance(ckpt_every, int) or ckpt_every < 1:
        raise ValueError(f"ckpt_every must be an integer >= 1, got {ckpt_every!r}")
    t_call = time.perf_counter()
    device = resolve_device(str(device)) if not isinstance(device, torch.device) else device
    out_dir = Path(out_dir)
    ckpt_path, model_path = out_dir / "checkpoint.pt", out_dir / "model.pt"
    hist_path, result_path = out_dir / "history.csv", out_dir / "result.json"

    src = BatchSource(data)
    if len(src) < cfg.batch_size:
        raise ValueError(f"the data holds {len(src)} images, fewer than batch_size={cfg.batch_size}")
    model.to(device)
    tokenizer.to(device).eval().requires_grad_(False)
    if int(tokenizer.codebook_size) != model.config.codebook_size:
        raise ValueError(f"tokenizer has {tokenizer.codebook_size} codes, generator {model.config.codebook_size}")
    if math.prod(tokenizer.grid_size) != model.config.seq_len:
        raise ValueError(f"tokenizer grid {tokenizer.grid_size} != generator seq_len {model.config.seq_len}")
    base_fp = _weights_fingerprint(model)
    ref_model = None
    if cfg.kl_coef > 0:
        ref_model = copy.deepcopy(model).eval().requires_grad_(False)
    if perceptual_fn is None and cfg.uses_perceptual:
        perceptual_fn = make_perceptual_fn(cfg.perceptual, scale=scale, device=device)
    metric = perceptual_name(perceptual_fn) if cfg.uses_perceptual else "none"

    optimizer = build_optimizer(model, cfg, device)
    data_gen = torch.Generator(device="cpu")
    data_gen.manual_seed(cfg.seed)
    step_gen = torch.Generator(device=device)
    step_gen.manual_seed(cfg.seed + 1)
    shuffle_gen = shuffle_generator(cfg.seed)
    torch.manual_seed(cfg.seed + 2)  # dropout inside the model
    if device.type == "cuda":
        torch.cuda.manual_seed(cfg.seed + 2)

    step, history, train_time = 0, [], 0.0
    if resume and ckpt_path.exists():
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        if not isinstance(ck, dict) or ck.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{ckpt_path} is not a VA-pi checkpoint")
        if ck["vapi_config"] != cfg.to_dict():
            diff = sorted(k for k, v in cfg.to_dict().items() if ck["vapi_config"].get(k) != v)
            raise ValueError(f"{ckpt_path} was written with a different VAPIConfig (fields {diff}); use another "
                             f"out_dir or resume=False")
        if ck["base_fingerprint"] != base_fp and cfg.kl_coef == 0 and _weights_fingerprint(ck["model"]) == base_fp:
            # The same model object passed again after a stopped chunk (it was post-trained in place): continue.
            base_fp = ck["base_fingerprint"]
        if ck["base_fingerprint"] != base_fp:
            raise ValueError(f"{ckpt_path} post-trains a different starting model (fingerprint "
                             f"{ck['base_fingerprint']} vs {base_fp}); use another out_dir or resume=False")
        if ck["perceptual_metric"] != metric:
            raise ValueError(f"{ckpt_path} used perceptual metric {ck['perceptual_metric']}, now {metric}")
        model.load_state_dict(ck["model"], strict=True)
        optimizer.load_state_dict(ck["optimizer"])
        _set_rng_state(ck["rng"], data_gen, step_gen, shuffle_gen, device)
        step, history, train_time = int(ck["step"]), list(ck["history"]), float(ck["train_time_s"])
        del ck
    start_step = step

    out_dir.mkdir(parents=True, exist_ok=True)
    base = {"vapi_config": cfg.to_dict(), "model_config": asdict(model.config), "base_fingerprint": base_fp,
            "perceptual_metric": metric, "device": str(device),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "checkpoint": str(ckpt_path), "model_path": str(model_path), "history_path": str(hist_path)}

    def save_ckpt() -> None:
        atomic_torch_save({"format": CHECKPOINT_FORMAT, "vapi_config": cfg.to_dict(),
                           "model_config": asdict(model.config), "step": step, "model": model.state_dict(),
                           "optimizer": optimizer.state_dict(),
                           "rng": _rng_state(data_gen, step_gen, shuffle_gen, device),
                           "history": history, "train_time_s": train_time, "base_fingerprint": base_fp,
                           "perceptual_metric": metric}, ckpt_path)

    def write_history() -> None:
        atomic_write_text(hist_path, pd.DataFrame(history).to_csv(index=False))

    status = "completed"
    bar = tqdm(total=steps, initial=min(step, steps), disable=not progress, dynamic_ncols=True, desc="VA-pi")
    try:
        while step < steps:
            t_step = time.perf_counter()
            idx = torch.randperm(len(src), generator=data_gen)[:cfg.batch_size]
            images, labels, tokens = src.fetch(idx, device)
            stats = vapi_step(model, tokenizer, images, tokens, labels, optimizer, cfg, step_gen, perceptual_fn,
                              ref_model=ref_model, shuffle_generator=shuffle_gen)
            step += 1
            train_time += time.perf_counter() - t_step
            history.append({"step": step, "lr": optimizer.param_groups[0]["lr"], **stats,
                            "elapsed_s": train_time})
            bar.update(1)
            bar.set_postfix(reward=f"{stats['reward_mean']:.4f}", clip=f"{stats['clip_frac']:.3f}",
                            ce=f"{stats['ce']:.3f}")
            over = time_limit_s is not None and time.perf_counter() - t_call > time_limit_s
            if step % ckpt_every == 0 or step == steps or over:
                save_ckpt()
                write_history()
            if over and step < steps:
                status = "stopped"
                break
    finally:
        bar.close()
    if status == "completed":
        # The rearlib.train model format, so samplers/evaluators load it with rearlib.train.load_generator.
        atomic_torch_save({"format": TRAIN_FORMAT + "/model", "train_config": None,
                           "model_config": asdict(model.config), "step": step, "model": model.state_dict(),
                           "ema_model": None, "vapi_config": cfg.to_dict(), "vapi_base_fingerprint": base_fp,
                           "perceptual_metric": metric}, model_path)
        write_history()
    # The final weights' fingerprint ties every later record (evaluations, held-out scores) to this realisation:
    # on a GPU two runs of one recipe and seed end with different weights.
    final_fp = _weights_fingerprint(model) if status == "completed" else None
    result = {**base, "status": status, "step": step, "steps": steps, "steps_this_call": step - start_step,
              "final_fingerprint": final_fp,
              "history": history,
              "wall_time_s": time.perf_counter() - t_call, "train_time_s": train_time,
              "final": {k: history[-1].get(k) for k in ("reward_mean", "mse_mean", "perceptual_mean", "ce",
                                                        "clip_frac", "kl", "mse_group_std",
                                                        "perceptual_group_std")} if history else {}}
    atomic_write_text(result_path, json.dumps(result, indent=2, default=str))
    result["history_df"] = pd.DataFrame(history)
    result["model"] = model.eval()
    return result


def finished_run(out_dir: str | Path) -> dict[str, Any] | None:
    """The record of a completed :func:`post_train` run in ``out_dir`` (its ``result.json`` with ``history_df``
    added, no ``model``), or None when the run has not completed there. Needs no weights: a study continues from
    the records of runs whose weights stayed on another machine."""
    result = completed_record(Path(out_dir) / "result.json", "VA-pi run record")
    if result is None or not result.get("final_fingerprint"):
        return None
    result["history_df"] = pd.DataFrame(result.get("history") or [])
    return result


def _window_mean(history: list[dict], key: str, first: bool, frac: float = 0.1) -> float | None:
    """Mean of ``key`` over the first (or last) ``frac`` of the logged steps; None without history."""
    if not history:
        return None
    n = max(1, int(len(history) * frac))
    rows = history[:n] if first else history[-n:]
    return sum(r[key] for r in rows) / len(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m rearlib vapi", description=__doc__.split("\n\n")[0])
    p.add_argument("--scale", default="small", help="smoke | small | paper (tokenizer, data pool, defaults)")
    p.add_argument("--generator", required=True, help="trained generator: rearlib.train model.pt or checkpoint.pt")
    p.add_argument("--out", required=True, help="output folder (checkpoint.pt, model.pt, history.csv, result.json)")
    p.add_argument("--steps", type=int, default=None, help="default: scales.VAPI[scale]['steps']")
    p.add_argument("--set", nargs="*", default=[], metavar="K=V", help="VAPIConfig overrides (JSON values)")
    p.add_argument("--data-root", default=None, help="ImageNet root (paper scale)")
    p.add_argument("--data-size", type=int, default=None, help="embedded-data pool size (default per scale)")
    p.add_argument("--data-seed", type=int, default=0,
                   help="seed of the embedded dataset (the generator's training data used seed 0); not the VA-pi seed")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--ckpt-every", type=int, default=50, help="checkpoint interval in steps (default: %(default)s)")
    p.add_argument("--time-limit", type=float, default=None, help="seconds; stop with a checkpoint after this")
    p.add_argument("--fresh", action="store_true", help="do not resume from an existing checkpoint")
    args = p.parse_args(argv)

    scale = validate_scale(args.scale)
    device = resolve_device(args.device)
    cfg = config_for_scale(scale, **parse_overrides(args.set))
    steps = args.steps or scales.VAPI[scale]["steps"]
    tok = get_tokenizer(scale, device, data_root=args.data_root)
    model = load_generator(args.generator, device)
    if scale == "paper":
        data = load_dataset("imagenet", "train", tok.resolution, root=args.data_root)
    else:
        data = EmbeddedSource(args.data_size or scales.VAPI[scale]["data_size"], tok.resolution, "train",
                              args.data_seed)
    res = post_train(model, tok, data, cfg, steps, args.out, device, scale=scale, resume=not args.fresh,
                     ckpt_every=args.ckpt_every, time_limit_s=args.time_limit)
    h = res["history"]
    summary = {k: res[k] for k in ("status", "step", "steps", "wall_time_s", "train_time_s", "perceptual_metric",
                                   "gpu", "model_path", "history_path")}
    summary.update({"reward_first10pct": _window_mean(h, "reward_mean", True),
                    "reward_last10pct": _window_mean(h, "reward_mean", False),
                    "mse_first10pct": _window_mean(h, "mse_mean", True),
                    "mse_last10pct": _window_mean(h, "mse_mean", False),
                    "sec_per_step": (res["train_time_s"] / res["step"]) if res["step"] else None,
                    "lr": cfg.lr, "batch_size": cfg.batch_size, "group_size": cfg.group_size,
                    "control": cfg.control, "update_mode": cfg.update_mode, "reward_terms": cfg.reward_terms,
                    "reward_perceptual_weight": cfg.reward_perceptual_weight,
                    "mse_group_std_mean": _window_mean(h, "mse_group_std", True, 1.0),
                    "perceptual_group_std_mean": _window_mean(h, "perceptual_group_std", True, 1.0)})
    print(json.dumps(summary, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
