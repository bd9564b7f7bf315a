"""Training our VQ tokenizer (:mod:`rearlib.tokenizers.vqgan_model`) on ShapeScenes-10, and the per-scale cache of
trained tokenizers (:func:`get_or_train`).

Loss: ``l1_weight * |x - x̂| + l2_weight * (x - x̂)^2 + grad_weight * |∇x - ∇x̂|`` (image finite differences, a
cheap offline edge term) ``+ ||sg(z) - e||^2 + beta * ||z - sg(e)||^2`` (``beta = 0.25``; straight-through
estimator ``z + sg(e - z)`` into the decoder), on the unit-norm vectors; optionally a PatchGAN hinge
adversarial term after a warm-up, weighted adaptively as in VQGAN (Esser et al. 2021). No pretrained network
is needed (nothing can be downloaded here), so there is no perceptual (LPIPS) loss.

The dead-code restarts that keep codebook usage high (defined in :mod:`rearlib.tokenizers.vqgan_model`'s
docstring) are done here, by ``_restart_codes``.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from rearlib import scales
from rearlib.data import render_batch
from rearlib.runtime import UnreadableFileError, artifact_dir, config_from_dict, hardware_info, resolve_device
from rearlib.scales import validate_scale
from rearlib.tokenizers.base import load_checkpoint, round_weights_, save_tokenizer
from rearlib.tokenizers.vqgan_metrics import evaluate
from rearlib.tokenizers.vqgan_model import VectorQuantizer, VQConfig, VQTokenizer

__all__ = ["TRAINER_VERSION", "VQTrainConfig", "PatchDiscriminator", "reconstruction_loss", "train_vq",
           "scale_configs", "get_or_train"]

TRAINER_VERSION = 1  # bump when training code changes what a config produces (invalidates smoke caches)


@dataclass
class VQTrainConfig:
    """Trainer settings. Data: ShapeScenes-10 ``train`` images rendered on the fly from indices drawn uniformly
    in ``[0, train_size)``; validation: the first ``val_size`` images of the ``val`` split."""

    steps: int = 6000
    batch_size: int = 128
    lr: float = 5e-4
    betas: tuple = (0.9, 0.99)
    warmup_steps: int = 200
    min_lr_ratio: float = 0.1          # cosine decay from lr to lr * min_lr_ratio
    l1_weight: float = 1.0
    l2_weight: float = 1.0
    grad_weight: float = 0.5
    adv_weight: float = 0.0            # 0 disables the discriminator entirely
    adv_start: float = 0.5             # fraction of the run after which the adversarial term is on
    restart_every: int = 50
    restart_until: float = 0.8         # fraction of the run after which no more restarts happen
    flip: bool = True                  # random horizontal flips
    train_size: int = 1_000_000
    val_size: int = 256
    data_seed: int = 0
    seed: int = 0
    time_budget_s: float | None = None  # if set, the schedule follows max(step/steps, elapsed/budget)
    compile: bool = False
    log_every: int = 100

    @classmethod
    def from_dict(cls, d: dict) -> "VQTrainConfig":
        return config_from_dict(cls, d, "keys")


# ----------------------------------------------------------------------------------------------------------
# Optional adversarial term
# ----------------------------------------------------------------------------------------------------------
class PatchDiscriminator(nn.Module):
    """A small PatchGAN (Isola et al. 2017): one real/fake logit per overlapping patch."""

    def __init__(self, base: int = 64, groups: int = 32):
        super().__init__()
        def block(cin, cout, stride, norm=True):
            return [nn.Conv2d(cin, cout, 4, stride, 1)] + ([nn.GroupNorm(min(groups, cout), cout)] if norm else []) \
                + [nn.LeakyReLU(0.2)]
        self.net = nn.Sequential(*block(3, base, 2, norm=False), *block(base, 2 * base, 2),
                                 *block(2 * base, 4 * base, 1), nn.Conv2d(4 * base, 1, 4, 1, 1))

    def forward(self, x):
        return self.net(x * 2.0 - 1.0)


# ----------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------
def _image_gradients(x):
    return x[..., :, 1:] - x[..., :, :-1], x[..., 1:, :] - x[..., :-1, :]


def reconstruction_loss(x: torch.Tensor, y: torch.Tensor, tc: VQTrainConfig) -> torch.Tensor:
    loss = tc.l1_weight * (x - y).abs().mean() + tc.l2_weight * ((x - y) ** 2).mean()
    if tc.grad_weight:
        (gx, gy), (hx, hy) = _image_gradients(x), _image_gradients(y)
        loss = loss + tc.grad_weight * ((gx - hx).abs().mean() + (gy - hy).abs().mean())
    return loss


def _render(indices, resolution, split, seed, device):
    images, _ = render_batch(indices, resolution=resolution, seed=seed, split=split, device=device)
    return images


def train_vq(model_cfg: VQConfig | dict, train_cfg: VQTrainConfig | dict, device="auto", progress: bool = True,
             round_to: torch.dtype | None = torch.float16) -> tuple[VQTokenizer, dict]:
    """Train a :class:`VQTokenizer` on ShapeScenes-10 and return ``(tokenizer in eval mode, metrics)``.

    ``round_to``: round the final weights to this dtype's precision (kept float32) *before* the validation
    metrics are computed, so that metrics describe exactly the weights a checkpoint of that dtype stores.

    bf16 autocast and channels-last on CUDA; float32 on CPU. The codebook lookup and all losses are float32.
    A non-finite loss raises ``FloatingPointError`` (nothing is written). ``metrics`` holds the validation
    PSNR/SSIM/usage/perplexity, the loss curve (every ``log_every`` steps), steps done, wall time and hardware.
    """
    mc = model_cfg if isinstance(model_cfg, VQConfig) else VQConfig.from_dict(dict(model_cfg))
    tc = train_cfg if isinstance(train_cfg, VQTrainConfig) else VQTrainConfig.from_dict(dict(train_cfg))
    device = resolve_device(device) if isinstance(device, (str, type(None))) else torch.device(device)
    cuda = device.type == "cuda"
    torch.manual_seed(tc.seed)
    model = VQTokenizer(mc).to(device)
    benchmark_flag = torch.backends.cudnn.benchmark
    if cuda:
        model = model.to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick the fastest kernels (restored below)
    net = torch.compile(model) if (tc.compile and cuda) else model
    opt = torch.optim.Adam(model.parameters(), lr=tc.lr, betas=tuple(tc.betas), fused=cuda or None)
    disc = d_opt = None
    if tc.adv_weight > 0:
        disc = PatchDiscriminator(base=min(64, 4 * mc.base_channels), groups=mc.norm_groups).to(device)
        d_opt = torch.optim.Adam(disc.parameters(), lr=tc.lr, betas=(0.5, 0.9), fused=cuda or None)
    gen = torch.Generator().manual_seed(tc.data_seed * 1_000_003 + tc.seed)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    K = mc.codebook_size
    window_counts = torch.zeros(K, dtype=torch.long, device=device)
    last_layer = model.decoder.conv_out.weight
    history, restarts = [], []
    t0 = time.time()
    step, progress_frac = 0, 0.0
    bar = tqdm(total=tc.steps, desc=f"train VQ tokenizer ({device.type})", disable=not progress, mininterval=1.0)
    model.train()
    while step < tc.steps:
        elapsed = time.time() - t0
        progress_frac = step / tc.steps
        if tc.time_budget_s:
            progress_frac = max(progress_frac, elapsed / tc.time_budget_s)
        if progress_frac >= 1.0:
            break  # only reachable through the time budget
        lr = tc.lr * min(1.0, (step + 1) / max(1, tc.warmup_steps))
        lr *= tc.min_lr_ratio + (1 - tc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress_frac))
        for g in opt.param_groups:
            g["lr"] = lr
        idx = torch.randint(0, tc.train_size, (tc.batch_size,), generator=gen)
        x = _render(idx, mc.resolution, "train", tc.data_seed, device)
        if tc.flip:
            flip = (torch.rand(tc.batch_size, generator=gen) < 0.5).to(device).view(-1, 1, 1, 1)
            x = torch.where(flip, x.flip(-1), x)
        if cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        with amp:
            rec, ids, vq_loss, z = net(x)
        rec = rec.float()
        rec_loss = reconstruction_loss(x, rec, tc)
        loss = rec_loss + vq_loss
        adv_on = disc is not None and progress_frac >= tc.adv_start
        g_adv = torch.zeros((), device=device)
        if adv_on:
            with amp:
                g_adv = -disc(rec).float().mean()
            # Adaptive weight (VQGAN): balance the adversarial gradient against the reconstruction gradient
            # at the decoder's last layer, so the GAN term can never swamp reconstruction.
            gr = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0].norm()
            ga = torch.autograd.grad(g_adv, last_layer, retain_graph=True)[0].norm()
            w = (gr / (ga + 1e-4)).clamp(0, 1e4).detach() * tc.adv_weight
            loss = loss + w * g_adv
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        d_loss = torch.zeros((), device=device)
        if adv_on:
            with amp:
                d_real, d_fake = disc(x).float(), disc(rec.detach()).float()
            d_loss = F.relu(1 - d_real).mean() + F.relu(1 + d_fake).mean()
            d_opt.zero_grad(set_to_none=True)
            d_loss.backward()
            d_opt.step()
        flat_ids = ids.flatten()
        window_counts.scatter_add_(0, flat_ids, torch.ones_like(flat_ids))  # bincount would sync on CUDA
        step += 1
        if step % tc.restart_every == 0:
            dead = (window_counts == 0).nonzero().flatten()
            if progress_frac < tc.restart_until and dead.numel() > 0:
                _restart_codes(model.quantizer, opt, dead, z.detach(), gen)
            restarts.append({"step": step, "dead": int(dead.numel()),
                             "restarted": int(dead.numel()) if progress_frac < tc.restart_until else 0})
            window_counts.zero_()
        if step % tc.log_every == 0 or step == tc.steps:
            # One host sync per log interval, not per step; a non-finite loss stops the run here (nothing
            # has been written yet, so no half-trained checkpoint can replace a good one).
            rec_v, vq_v, tot_v = float(rec_loss.detach()), float(vq_loss.detach()), float(loss.detach())
            if not math.isfinite(tot_v):
                bar.close()
                raise FloatingPointError(f"non-finite VQ tokenizer loss by step {step} (rec={rec_v:.4g}, "
                                         f"vq={vq_v:.4g}); lower lr (now {lr:.3g}) or disable adv_weight")
            history.append({"step": step, "rec_loss": rec_v, "vq_loss": vq_v, "lr": lr,
                            "adv_g": float(g_adv.detach()), "adv_d": float(d_loss.detach()),
                            "elapsed_s": time.time() - t0})
            bar.set_postfix(rec=f"{rec_v:.4f}", vq=f"{vq_v:.4f}", dead=restarts[-1]["dead"] if restarts else "-")
        bar.update(1)
    bar.close()
    if cuda:
        torch.cuda.synchronize()
        torch.backends.cudnn.benchmark = benchmark_flag
    train_s = time.time() - t0
    model.eval()
    model = model.to(memory_format=torch.contiguous_format)
    if round_to is not None:
        round_weights_(model, round_to)
    val_idx = torch.arange(tc.val_size)
    val = _render(val_idx, mc.resolution, "val", tc.data_seed, device)
    metrics = {
        "steps_done": step, "steps_planned": tc.steps, "stopped_by_time_budget": step < tc.steps,
        "train_wall_s": train_s, "images_per_s": step * tc.batch_size / max(train_s, 1e-9),
        "val": evaluate(model, val), "val_split": f"ShapeScenes-10 val[0:{tc.val_size}] seed {tc.data_seed}",
        "history": history, "restarts": restarts, "hardware": hardware_info(), "device": str(device),
        "model_config": model.config_dict(), "train_config": _jsonable(asdict(tc)),
        "weights_rounded_to": str(round_to).replace("torch.", "") if round_to is not None else None,
        "num_params": sum(p.numel() for p in model.parameters()),
    }
    return model, metrics


def _restart_codes(quantizer: VectorQuantizer, opt: torch.optim.Optimizer, dead: torch.Tensor,
                   z_unit: torch.Tensor, gen: torch.Generator) -> None:
    """Re-initialise ``dead`` codes to random unit-norm encoder outputs of the batch; zero their Adam moments."""
    D = z_unit.shape[1]
    pool = z_unit.permute(0, 2, 3, 1).reshape(-1, D).float()
    pick = torch.randint(0, pool.shape[0], (dead.numel(),), generator=gen).to(pool.device)
    noise = torch.randn(dead.numel(), D, generator=gen).to(pool.device) * 0.01
    w = quantizer.embedding.weight
    with torch.no_grad():
        w[dead] = F.normalize(pool[pick] + noise, dim=1).to(w.dtype)
    state = opt.state.get(w, {})
    for key in ("exp_avg", "exp_avg_sq"):
        if key in state:
            state[key][dead] = 0


def _jsonable(d):
    return json.loads(json.dumps(d, default=lambda o: list(o) if isinstance(o, tuple) else str(o)))


def scale_configs(scale: str) -> tuple[VQConfig, VQTrainConfig]:
    validate_scale(scale)
    if scales.VQ_TOKENIZER[scale] is None:
        raise ValueError(f"scale {scale!r} uses the MaskGIT-VQGAN (rearlib.tokenizers.maskgit_vqgan), not a trained VQ "
                         f"tokenizer; trainable scales: {[s for s, v in scales.VQ_TOKENIZER.items() if v]}")
    return VQConfig.from_dict(scales.VQ_TOKENIZER[scale]["model"]), VQTrainConfig.from_dict(scales.VQ_TOKENIZER[scale]["train"])


def get_or_train(scale: str = "smoke", device="auto", progress: bool = True, root=None) -> VQTokenizer:
    """The tokenizer of ``scale`` from ``artifacts/tokenizer/<hash>/tokenizer.pt``, training it first if absent."""
    mc, tc = scale_configs(scale)
    key = {"scale": scale, "model": asdict(mc), "train": asdict(tc), "trainer_version": TRAINER_VERSION}
    path = artifact_dir("tokenizer", key, root=root) / "tokenizer.pt"
    if path.is_file():
        try:
            return load_checkpoint(path, device)
        except UnreadableFileError as err:  # a damaged cache entry is ours to rebuild
            warnings.warn(f"{err}; training the {scale} tokenizer again", stacklevel=2)
    # Rounded to fp16 before evaluation: the cached weights are exactly the ones the metrics describe.
    model, metrics = train_vq(mc, tc, device=device, progress=progress, round_to=torch.float16)
    save_tokenizer(model, path, dtype=torch.float16, meta={"metrics": metrics})
    model.checkpoint_meta = json.loads(json.dumps({"metrics": metrics}, default=str))  # as load_tokenizer sets it
    return model

