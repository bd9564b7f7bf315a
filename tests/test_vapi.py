"""Tests of VA-π post-training (rearlib.vapi): rewards, advantages, the PPO loss, the step and post_train.

The generator is the tiny preset (K = 32 codes, N = 16 tokens). The tokenizer is a stand-in built here that
implements the tokenizer contract exactly and is simple enough to compute expected rewards in closed form: a
palette of K colours, each token decoding to a 4x4 patch of its colour on a 4x4 grid (16x16 images). Because
decoded patches do not overlap, the image MSE is the mean of per-patch MSEs, so the expected -MSE reward of the
factorised rollout policy is an exact sum over positions and codes - no sampling noise in the "reward goes up"
check.
"""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rearlib import scales, vapi_report
from rearlib.metrics import DFD_NAME, resolve_perceptual
from rearlib.metrics.classifier import Classifier
from rearlib.metrics.perceptual import st_lpips_distance
from rearlib.model import PRESETS, build_generator
from rearlib.tokenizers.vqgan import VQConfig, VQTokenizer
from rearlib.train import load_generator
from rearlib.vapi import (
    CONTROLS,
    EmbeddedSource,
    VAPIConfig,
    build_optimizer,
    compute_rewards,
    config_for_scale,
    control_configs,
    corrupt_context,
    group_advantages,
    group_std_mean,
    heldout_reconstruction_reward,
    lr_sweep_configs,
    make_perceptual_fn,
    post_train,
    reward_spreads,
    shuffle_generator,
    shuffle_rewards,
    vapi_loss,
    vapi_step,
)

TINY = PRESETS["tiny"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


K, N = TINY.codebook_size, TINY.seq_len
GRID, PATCH = math.isqrt(N), 4


class PaletteTokenizer(nn.Module):
    """Contract-compatible stand-in: token k <-> a PATCH x PATCH patch of colour palette[k]."""

    kind = "palette"

    def __init__(self, codebook_size: int = K, grid: int = GRID, patch: int = PATCH, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("palette", torch.rand(codebook_size, 3, generator=g))
        self.patch, self.grid = patch, grid
        self.resolution = grid * patch
        self.grid_size = (grid, grid)

    @property
    def codebook(self) -> torch.Tensor:
        return self.palette

    @property
    def codebook_size(self) -> int:
        return self.palette.shape[0]

    @property
    def code_dim(self) -> int:
        return 3

    def identity(self) -> str:
        return "palette-test"

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        means = F.avg_pool2d(images.float(), self.patch)                         # [B, 3, g, g]
        d = (means.permute(0, 2, 3, 1)[..., None, :] - self.palette).pow(2).sum(-1)
        return d.argmin(-1)                                                        # [B, g, g]

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        t = tokens.reshape(tokens.shape[0], self.grid, self.grid).to(self.palette.device)
        img = self.palette[t].permute(0, 3, 1, 2)                                 # [B, 3, g, g]
        img = img.repeat_interleave(self.patch, 2).repeat_interleave(self.patch, 3)
        return img.float().clamp(0, 1)


def make_batch(B: int = 4, seed: int = 0, noise: float = 0.05):
    """Reference images near palette renders (so GT tokens are meaningful), their tokens, and labels."""
    tok = PaletteTokenizer()
    g = torch.Generator().manual_seed(seed)
    gt = torch.randint(0, K, (B, N), generator=g)
    images = (tok.decode(gt) + noise * torch.randn(B, 3, tok.resolution, tok.resolution, generator=g)).clamp(0, 1)
    labels = torch.randint(0, TINY.num_classes, (B,), generator=g)
    return tok, images, tok.encode(images), labels


def fresh_model(seed: int = 0):
    torch.manual_seed(seed)
    return build_generator("tiny")


def expected_mse_reward(model, tok: PaletteTokenizer, images, tokens, labels) -> float:
    """Exact E[-MSE] (MSE on [-1, 1] images) under the eval-mode factorised policy on the clean context."""
    was = model.training
    model.eval()
    with torch.no_grad():
        p = model(tokens.reshape(len(tokens), -1), labels).logits.softmax(-1)                       # [B, N, K]
        B = images.shape[0]
        patches = images.unfold(2, PATCH, PATCH).unfold(3, PATCH, PATCH)                      # [B,3,g,g,p,p]
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(B, N, 3, PATCH * PATCH)           # raster order
        col = tok.palette[None, None, :, :, None]                                              # [1,1,K,3,1]
        d = 4 * (col - patches[:, :, None]).pow(2).mean(dim=(-1, -2))                          # [B, N, K]
        r = -(p * d).sum(-1).mean(-1)
    model.train(was)
    return float(r.mean())


def mse_only(**kw) -> VAPIConfig:
    base = dict(group_size=8, batch_size=4, reward_perceptual_weight=0.0, lr=3e-3, ce_weight=0.0)
    base.update(kw)
    return VAPIConfig(**base)


# ------------------------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------------------------
def test_config_defaults_are_the_codes_and_validation():
    c = VAPIConfig()
    assert (c.group_size, c.clip_range, c.adv_clip, c.ce_weight, c.lr) == (8, 0.2, 5.0, 0.1, 1e-6)
    assert (c.noise_rate, c.noise_kernel, c.kl_coef, c.rollout_mode, c.update_mode) == (0.0, "code", 0.0, "eval",
                                                                                          "train")
    assert (c.reward_mse_weight, c.reward_perceptual_weight, c.ratio_level, c.ppo_epochs, c.num_minibatches) == \
        (1.0, 1.0, "token", 1, 1)
    assert (c.reward_terms, c.control, c.uses_mse, c.uses_perceptual) == ("both", "full", True, True)
    assert VAPIConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError, match="group_size"):
        VAPIConfig(group_size=1)
    with pytest.raises(ValueError, match="noise_kernel"):
        VAPIConfig(noise_kernel="gaussian")
    with pytest.raises(ValueError, match="noise_rate"):
        VAPIConfig(noise_rate=1.5)
    with pytest.raises(ValueError, match="both 0"):
        VAPIConfig(reward_mse_weight=0, reward_perceptual_weight=0)
    with pytest.raises(ValueError, match="unknown VAPIConfig fields"):
        c.replace(beta=0.1)
    with pytest.raises(ValueError, match="unknown scale"):
        config_for_scale("huge")
    assert config_for_scale("small", lr=2e-5).lr == 2e-5


def test_config_controls_reward_terms_and_their_validation():
    d = VAPIConfig(control="shuffled_rewards", reward_terms="mse").to_dict()
    assert (d["control"], d["reward_terms"]) == ("shuffled_rewards", "mse")
    assert VAPIConfig.from_dict(d) == VAPIConfig(control="shuffled_rewards", reward_terms="mse")
    assert VAPIConfig().to_dict() != VAPIConfig(control="prior_only").to_dict()  # a control is a different run
    for kw, msg in ((dict(control="no_reward"), "control"), (dict(reward_terms="lpips"), "reward_terms"),
                    (dict(control="prior_only", ce_weight=0.0), "ce_weight"),
                    (dict(reward_terms="mse", reward_mse_weight=0.0), "reward_mse_weight"),
                    (dict(reward_terms="perceptual", reward_perceptual_weight=0.0), "reward_perceptual_weight")):
        with pytest.raises(ValueError, match=msg):
            VAPIConfig(**kw)
    # A term enters the reward when it is selected and weighted.
    assert (VAPIConfig(reward_terms="mse").uses_mse, VAPIConfig(reward_terms="mse").uses_perceptual) == (True, False)
    assert (VAPIConfig(reward_terms="perceptual").uses_mse, VAPIConfig(reward_terms="perceptual").uses_perceptual) == \
        (False, True)
    assert not VAPIConfig(reward_perceptual_weight=0.0).uses_perceptual


def test_scale_settings_update_mode_perceptual_sweep_and_controls():
    # The update without dropout at smoke and small; the released code's train-mode update at paper scale.
    assert [config_for_scale(s).update_mode for s in ("smoke", "small", "paper")] == ["eval", "eval", "train"]
    # ST-LPIPS by name at smoke and small, not the classifier distance of the evaluator.
    assert config_for_scale("small").perceptual == config_for_scale("smoke").perceptual == "st-lpips-alex"
    # The small learning-rate sweep: 128 images x G = 8 per step, accumulated over micro-batches into one step.
    sweep = lr_sweep_configs("small", seed=4)
    assert list(sweep) == [1e-6, 3e-6, 1e-5] and scales.VAPI["small"]["sweep_steps"] == 100
    for lr, c in sweep.items():
        assert (c.lr, c.batch_size, c.group_size, c.seed) == (lr, 128, 8, 4)
        assert 0 < c.micro_batch_images < c.batch_size and c.batch_size % c.micro_batch_images == 0
        assert (c.num_minibatches, c.ppo_epochs) == (1, 1)  # every micro-batch accumulates into one step
        assert c.update_mode == "eval" and c.control == "full"
    with pytest.raises(ValueError, match="lr"):
        lr_sweep_configs("small", lr=1e-3)
    for s in ("smoke", "small", "paper"):
        assert tuple(scales.VAPI[s]["controls"]) == CONTROLS
        assert set(lr_sweep_configs(s)) == set(scales.VAPI[s]["lr_sweep"])
    runs = control_configs(config_for_scale("small", seed=2))
    assert list(runs) == list(CONTROLS)
    assert {k: v.replace(control="full") for k, v in runs.items()} == dict.fromkeys(CONTROLS,
                                                                                  config_for_scale("small", seed=2))
    with pytest.raises(ValueError, match="unknown controls"):
        control_configs(VAPIConfig(), ("full", "no_prior"))


# ------------------------------------------------------------------------------------------------------------
# Rewards
# ------------------------------------------------------------------------------------------------------------
def test_rewards_on_hand_made_images():
    H = 8
    black, white = torch.zeros(1, 3, H, H), torch.ones(1, 3, H, H)
    half = torch.full((1, 3, H, H), 0.5)
    left = torch.zeros(1, 3, H, H)
    left[..., : H // 2] = 1.0                               # half the pixels differ by 1 in [0,1] units
    decoded = torch.cat([black, half, left, white])
    reference = torch.cat([white, black, black, white])
    cfg = VAPIConfig(reward_perceptual_weight=0.0)
    rr = compute_rewards(decoded, reference, cfg)
    # MSE on [-1, 1] images: a difference d in [0, 1] units is 2d there, squared 4d^2.
    assert torch.allclose(rr.mse, torch.tensor([4.0, 1.0, 2.0, 0.0]))
    assert torch.allclose(rr.rewards, -rr.mse)
    assert rr.perceptual_metric == "none"

    def l1(a, b):
        return (a - b).abs().flatten(1).mean(1)

    l1.metric_name = "L1-test"
    cfg2 = VAPIConfig(reward_mse_weight=0.5, reward_perceptual_weight=2.0)
    rr2 = compute_rewards(decoded, reference, cfg2, l1)
    assert torch.allclose(rr2.perceptual, torch.tensor([1.0, 0.5, 0.5, 0.0]))
    assert torch.allclose(rr2.rewards, -(0.5 * rr.mse + 2.0 * rr2.perceptual))
    assert rr2.perceptual_metric == "L1-test"
    # A (values, name) return, like metrics.PerceptualResult, carries its own name.
    rr3 = compute_rewards(decoded, reference, cfg2, lambda a, b: (l1(a, b), "named-by-result"))
    assert rr3.perceptual_metric == "named-by-result"
    assert torch.equal(rr3.rewards, rr2.rewards)
    # Ordering: the closer image always gets the higher reward.
    assert rr2.rewards[3] > rr2.rewards[2] and rr2.rewards[1] > rr2.rewards[0]


def test_rewards_reject_bad_input():
    cfg = VAPIConfig(reward_perceptual_weight=0.0)
    x = torch.rand(2, 3, 8, 8)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        compute_rewards(x * 2 - 1, x, cfg)
    with pytest.raises(ValueError, match="shape"):
        compute_rewards(x, torch.rand(2, 3, 16, 16), cfg)
    with pytest.raises(ValueError, match="perceptual_fn"):
        compute_rewards(x, x, VAPIConfig())
    with pytest.raises(ValueError, match="returned"):
        compute_rewards(x, x, VAPIConfig(), lambda a, b: torch.zeros(3))


def test_reward_terms_select_what_enters_the_reward():
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(4, 3, 8, 8, generator=g), torch.rand(4, 3, 8, 8, generator=g)

    def l1(x, y):
        return (x - y).abs().flatten(1).mean(1)

    both = compute_rewards(a, b, VAPIConfig(reward_mse_weight=1.0, reward_perceptual_weight=3.0), l1)
    assert torch.allclose(both.rewards, -(both.mse + 3.0 * both.perceptual))
    only_mse = compute_rewards(a, b, VAPIConfig(reward_terms="mse", reward_perceptual_weight=3.0), l1)
    assert torch.equal(only_mse.rewards, -only_mse.mse) and only_mse.perceptual_metric == "none"
    assert torch.equal(only_mse.perceptual, torch.zeros(4))  # not computed: the MSE-only reward needs no network
    measured = compute_rewards(a, b, VAPIConfig(reward_terms="mse"), l1, measure_perceptual=True)
    assert torch.equal(measured.rewards, -measured.mse) and torch.allclose(measured.perceptual, both.perceptual)
    assert measured.perceptual_metric == "l1"
    only_p = compute_rewards(a, b, VAPIConfig(reward_terms="perceptual", reward_perceptual_weight=3.0), l1)
    assert torch.allclose(only_p.rewards, -3.0 * only_p.perceptual)
    assert torch.allclose(only_p.mse, both.mse)  # MSE is still measured and logged
    with pytest.raises(ValueError, match="perceptual_fn"):
        compute_rewards(a, b, VAPIConfig(reward_terms="perceptual"))


def test_reward_spreads_and_the_balancing_weight():
    B, G = 3, 4
    z = torch.tensor([-1.5, -0.5, 0.5, 1.5])
    z = z / z.std(correction=1)                                # unit unbiased std within a group
    mse_sd, perc_sd = torch.tensor([0.01, 0.02, 0.03]), torch.tensor([0.5, 1.0, 3.0])
    mse = 0.2 + mse_sd[:, None] * z                            # [B, G]
    perc = 0.7 + perc_sd[:, None] * z.flip(0)
    sp = reward_spreads(mse, perc, G)
    assert sp.groups == B
    assert sp.mse_spread == pytest.approx(0.02) and sp.perceptual_spread == pytest.approx(1.5)
    assert sp.lambda_p == pytest.approx(0.02 / 1.5)
    # With that weight the perceptual term's spread matches the MSE's (whatever their levels).
    assert group_std_mean(sp.lambda_p * perc, G) == pytest.approx(group_std_mean(mse, G))
    # Flat image-major input gives the same numbers; a weighted MSE scales lambda_p.
    assert reward_spreads(mse.flatten(), perc.flatten(), G) == sp
    assert reward_spreads(mse, perc, G, mse_weight=2.0).lambda_p == pytest.approx(2 * sp.lambda_p)
    # Levels do not matter, only within-group differences: shifting one group changes nothing.
    shifted = perc.clone()
    shifted[1] += 100
    assert reward_spreads(mse, shifted, G).lambda_p == pytest.approx(sp.lambda_p)
    with pytest.raises(ValueError, match="no spread"):
        reward_spreads(mse, torch.full((B, G), 0.3), G)
    with pytest.raises(ValueError, match="different samples"):
        reward_spreads(mse, perc[:2], G)
    with pytest.raises(ValueError, match="whole number of groups"):
        reward_spreads(mse.flatten()[:10], perc.flatten()[:10], G)


def test_make_perceptual_fn_uses_metrics_and_labels_substitute():
    torch.manual_seed(0)
    clf = Classifier(widths=(8, 16), resolution=16, stem_stride=2).eval()
    fn = make_perceptual_fn("dfd", classifier=clf)
    assert fn.metric_name == DFD_NAME
    a, b = torch.rand(3, 3, 16, 16), torch.rand(3, 3, 16, 16)
    d = fn(a, b)
    assert d.shape == (3,) and d.dtype == torch.float32
    assert torch.allclose(fn(a, a), torch.zeros(3), atol=1e-6) and bool((d > 0).all())
    rr = compute_rewards(a, b, VAPIConfig(), fn)
    assert rr.perceptual_metric == DFD_NAME


def test_reward_default_perceptual_term_is_not_the_evaluator():
    """By default the reward's perceptual term is LPIPS-VGG or ST-LPIPS, never the in-project classifier whose
    features also give the classifier-based FID."""
    assert VAPIConfig().perceptual == "auto"
    fn = make_perceptual_fn()
    assert fn.metric_name == resolve_perceptual("auto")[1]
    assert fn.metric_name.startswith(("LPIPS", "ST-LPIPS")) and "classifier" not in fn.metric_name
    a = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(fn(a, a), torch.zeros(2), atol=1e-6) and bool((fn(a, a.flip(0)) > 0).all())
    # The scales' explicit choice is the project's ST-LPIPS network, the same numbers as rearlib.metrics gives.
    st = make_perceptual_fn(config_for_scale("small").perceptual)
    assert st.metric_name == "ST-LPIPS(alex)"
    assert torch.allclose(st(a, a.flip(0)), st_lpips_distance(a, a.flip(0), "alex").float())


# ------------------------------------------------------------------------------------------------------------
# Advantages
# ------------------------------------------------------------------------------------------------------------
def test_group_advantages_normalise_per_group():
    g = torch.Generator().manual_seed(0)
    B, G = 5, 8
    r = torch.randn(B, G, generator=g) * torch.arange(1, B + 1)[:, None] + torch.arange(B)[:, None] * 10
    a = group_advantages(r, G, clip=None)
    assert torch.allclose(a.mean(1), torch.zeros(B), atol=1e-6)
    assert torch.allclose(a.std(1, correction=1), torch.ones(B), atol=1e-6)
    # Flat [B*G] input (image-major) gives the same numbers in the same layout.
    assert torch.allclose(group_advantages(r.flatten(), G, clip=None), a.flatten())
    # Groups are independent: rescaling / shifting another group changes nothing here.
    r2 = r.clone()
    r2[1] = r2[1] * 100 + 7
    assert torch.allclose(group_advantages(r2, G, None)[0], a[0]) and torch.allclose(group_advantages(r2, G, None)[1],
                                                                                      a[1], atol=1e-5)
    # All-tied group -> advantage 0, not NaN.
    tied = group_advantages(torch.full((1, G), 3.0), G, None)
    assert torch.equal(tied, torch.zeros(1, G))


def test_group_advantages_clipping():
    G = 64
    r = torch.zeros(1, G)
    r[0, 0] = 1.0                      # one outlier: its z-score is (G-1)/G / sqrt(1/G) = 7.875 > 5
    raw = group_advantages(r, G, clip=None)
    assert raw[0, 0] > 5
    a = group_advantages(r, G, clip=5.0)
    assert a[0, 0] == pytest.approx(5.0)
    assert torch.equal(a[0, 1:], raw[0, 1:])     # the others are inside the range and unchanged
    with pytest.raises(ValueError, match="whole number of groups"):
        group_advantages(torch.zeros(10), 4)
    with pytest.raises(ValueError, match=">= 2"):
        group_advantages(torch.zeros(10), 1)


# ------------------------------------------------------------------------------------------------------------
# Loss
# ------------------------------------------------------------------------------------------------------------
def test_loss_sign_and_gradient_direction():
    cfg = VAPIConfig(ce_weight=0.0)
    M, T = 2, 3
    old = torch.log(torch.full((M, T), 0.25))
    adv = torch.tensor([1.0, -1.0])
    new = old.clone().requires_grad_(True)
    loss, st = vapi_loss(new, old, adv, cfg)
    loss.backward()
    # At ratio 1: d loss / d new_logp = -A / (M T) per token (mean over tokens, then sequences).
    assert torch.allclose(new.grad[0], torch.full((T,), -1.0 / (M * T)))
    assert torch.allclose(new.grad[1], torch.full((T,), 1.0 / (M * T)))
    assert st["ratio_mean"] == pytest.approx(1.0) and st["clip_frac"] == 0
    # Raising the log-prob of the positive-advantage sample lowers the loss; of the negative one raises it.
    bump = torch.zeros(M, T)
    bump[0] = 0.05
    assert vapi_loss(old + bump, old, adv, cfg)[0] < loss
    assert vapi_loss(old + bump.flip(0), old, adv, cfg)[0] > loss


def test_ppo_clip_blocks_gradient_beyond_range():
    cfg = VAPIConfig(ce_weight=0.0, clip_range=0.2)
    old = torch.zeros(4, 1)
    # ratios 1.5 and 0.5 with both advantage signs
    new = torch.log(torch.tensor([[1.5], [1.5], [0.5], [0.5]])).requires_grad_(True)
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    loss, st = vapi_loss(new, old, adv, cfg)
    loss.backward()
    g = new.grad.flatten()
    assert g[0] == 0          # A > 0, ratio above 1 + eps: already pushed up enough, no more gradient
    assert g[3] == 0          # A < 0, ratio below 1 - eps: already pushed down enough
    assert g[1] > 0           # A < 0, ratio above the range: still pushed down (pessimistic bound)
    assert g[2] < 0           # A > 0, ratio below the range: still pushed up
    assert g[1] == pytest.approx(1.5 / 4) and g[2] == pytest.approx(-0.5 / 4)
    assert st["clip_frac"] == pytest.approx(1.0) and st["clip_active"] == pytest.approx(0.5)
    # Clipped objective value: -(mean of min(r A, clip(r) A)) = -(1.2 - 1.5 + 0.5 - 0.8) / 4
    assert float(loss.detach()) == pytest.approx(-(1.2 - 1.5 + 0.5 - 0.8) / 4)


def test_sequence_level_ratio_option_and_regularisers():
    old = torch.zeros(2, 3)
    new = torch.full((2, 3), math.log(1.05))
    adv = torch.tensor([1.0, -1.0])
    tok_loss, tok_st = vapi_loss(new, old, adv, VAPIConfig(ce_weight=0.0))
    seq_loss, seq_st = vapi_loss(new, old, adv, VAPIConfig(ce_weight=0.0, ratio_level="sequence"))
    # Per-token ratios 1.05 are inside the range; the sequence ratio 1.05^3 = 1.158 too; 1.05^5 would not be.
    assert tok_st["ratio_mean"] == pytest.approx(1.05) and seq_st["ratio_mean"] == pytest.approx(1.05 ** 3)
    assert float(tok_loss) == pytest.approx(0.0, abs=1e-6) and float(seq_loss) == pytest.approx(0.0, abs=1e-6)
    long_new = torch.full((2, 5), math.log(1.05))
    _, st5 = vapi_loss(long_new, torch.zeros(2, 5), adv, VAPIConfig(ce_weight=0.0, ratio_level="sequence"))
    assert st5["clip_frac"] == pytest.approx(1.0)
    # CE and KL enter with their weights.
    ce = torch.tensor(2.0)
    l_ce, st = vapi_loss(new, old, adv, VAPIConfig(ce_weight=0.1), ce=ce)
    assert float(l_ce - tok_loss) == pytest.approx(0.2) and st["ce"] == pytest.approx(2.0)
    with pytest.raises(ValueError, match="ce"):
        vapi_loss(new, old, adv, VAPIConfig(ce_weight=0.1))
    cfg_kl = VAPIConfig(ce_weight=0.0, kl_coef=0.5)
    newp = new.clone().requires_grad_(True)
    l_same, st_same = vapi_loss(newp, old, adv, cfg_kl, ref_logp=new.clone())
    assert st_same["kl"] == pytest.approx(0.0, abs=1e-7)
    _, st_far = vapi_loss(new, old, adv, cfg_kl, ref_logp=new - 0.3)
    assert st_far["kl"] == pytest.approx(math.exp(-0.3) + 0.3 - 1, rel=1e-5)
    with pytest.raises(ValueError, match="ref_logp"):
        vapi_loss(new, old, adv, cfg_kl)


def test_prior_only_loss_has_no_policy_gradient():
    old = torch.zeros(2, 3)
    new = torch.full((2, 3), math.log(1.1)).requires_grad_(True)
    adv = torch.tensor([1.0, -1.0])
    ce = torch.tensor(2.5, requires_grad=True)
    full, st_full = vapi_loss(new, old, adv, VAPIConfig(ce_weight=0.1), ce=ce)
    prior, st_prior = vapi_loss(new, old, adv, VAPIConfig(ce_weight=0.1, control="prior_only"), ce=ce)
    assert torch.autograd.grad(full, new)[0].abs().sum() > 0
    g_new, g_ce = torch.autograd.grad(prior, (new, ce), allow_unused=True)
    assert g_new is None and float(g_ce) == pytest.approx(0.1)  # only beta * CE carries gradient
    assert float(prior.detach()) == pytest.approx(0.25)
    assert st_prior["pg_loss"] == st_full["pg_loss"]  # still reported, for the logs


# ------------------------------------------------------------------------------------------------------------
# Controls
# ------------------------------------------------------------------------------------------------------------
def test_shuffle_rewards_permutes_across_the_batch_deterministically():
    B, G = 4, 8
    r = torch.arange(B * G, dtype=torch.float32).view(B, G) / 10
    s0 = shuffle_rewards(r, shuffle_generator(0))
    assert s0.shape == r.shape
    assert torch.equal(s0.flatten().sort().values, r.flatten())              # the same multiset of rewards
    assert not torch.equal(s0, r)                                             # assigned to other samples
    assert torch.equal(shuffle_rewards(r, shuffle_generator(0)), s0)          # the same seed, the same permutation
    assert not torch.equal(shuffle_rewards(r, shuffle_generator(1)), s0)
    # Across groups, not within: some group now holds rewards of another image.
    assert any(set(s0[b].tolist()) != set(r[b].tolist()) for b in range(B))
    assert torch.equal(shuffle_rewards(r.flatten(), shuffle_generator(0)), s0.flatten())
    with pytest.raises(ValueError, match="CPU torch.Generator"):
        shuffle_rewards(r, None)
    with pytest.raises(ValueError, match="at least 2"):
        shuffle_rewards(torch.zeros(1), shuffle_generator(0))


# ------------------------------------------------------------------------------------------------------------
# Context noise
# ------------------------------------------------------------------------------------------------------------
def test_corruption_kernels():
    Kc = 4
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, Kc, (64, 50), generator=g)
    # "paper": every replaced position differs from GT, and the replacement is uniform over the other K-1 ids.
    noisy, mask = corrupt_context(tokens, 1.0, Kc, "paper", generator=torch.Generator().manual_seed(1))
    assert bool(mask[:, :-1].all()) and not bool(mask[:, -1].any())
    assert bool((noisy[:, :-1] != tokens[:, :-1]).all()) and torch.equal(noisy[:, -1], tokens[:, -1])
    sel = tokens[:, :-1] == 0
    counts = torch.bincount(noisy[:, :-1][sel], minlength=Kc).float() / sel.sum()
    assert counts[0] == 0 and torch.allclose(counts[1:], torch.full((Kc - 1,), 1 / (Kc - 1)), atol=0.05)
    # "code": uniform over all K ids, so a replaced position keeps its GT id about 1/K of the time.
    noisy_c, mask_c = corrupt_context(tokens, 1.0, Kc, "code", generator=torch.Generator().manual_seed(1))
    same = (noisy_c[:, :-1] == tokens[:, :-1]).float().mean()
    assert bool(mask_c[:, :-1].all()) and abs(float(same) - 1 / Kc) < 0.05
    # Partial rate: the replaced fraction tracks xi; rate 0 is the identity and draws nothing.
    _, m3 = corrupt_context(tokens, 0.3, Kc, "paper", generator=torch.Generator().manual_seed(2))
    assert abs(float(m3[:, :-1].float().mean()) - 0.3) < 0.05
    gen = torch.Generator().manual_seed(3)
    state = gen.get_state()
    same0, m0 = corrupt_context(tokens, 0.0, Kc, "paper", generator=gen)
    assert torch.equal(same0, tokens) and not bool(m0.any()) and torch.equal(gen.get_state(), state)


# ------------------------------------------------------------------------------------------------------------
# The step
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("update_mode", ["train", "eval"])
def test_steps_increase_expected_reward(update_mode):
    """A few steps on a fixed batch raise the exact expected -MSE of the rollout policy (policy gradient only)."""
    tok, images, tokens, labels = make_batch(B=4, seed=0)
    model = fresh_model(0)
    cfg = mse_only(update_mode=update_mode)
    opt = build_optimizer(model, cfg)
    gen = torch.Generator().manual_seed(0)
    r0 = expected_mse_reward(model, tok, images, tokens, labels)
    st = vapi_step(model, tok, images, tokens, labels, opt, cfg, gen)
    r1 = expected_mse_reward(model, tok, images, tokens, labels)
    assert st["shared_forward"] == (update_mode == "eval")
    assert st["n_sequences"] == 4 * 8 and st["optimizer_steps"] == 1
    assert r1 > r0, (r0, r1)
    # The first round's sampled rewards estimate r0 without bias (same policy, decoded and scored by the
    # library): within 4 standard errors of the 32 independent samples.
    assert abs(st["reward_mean"] - r0) < 4 * st["reward_std"] / math.sqrt(st["n_sequences"])
    for _ in range(5):
        vapi_step(model, tok, images, tokens, labels, opt, cfg, gen)
    r6 = expected_mse_reward(model, tok, images, tokens, labels)
    assert r6 > r1, (r0, r1, r6)


def test_step_stats_and_eval_mode_ratio():
    tok, images, tokens, labels = make_batch(B=2, seed=1)
    model = fresh_model(1)
    # Eval-mode update: the update pass computes exactly the rollout's function, so every ratio is 1.
    cfg = mse_only(update_mode="eval", ce_weight=0.1, group_size=4)
    st = vapi_step(model, tok, images, tokens, labels, build_optimizer(model, cfg), cfg,
                   torch.Generator().manual_seed(0))
    assert st["ratio_min"] == pytest.approx(1.0, abs=1e-5) and st["ratio_max"] == pytest.approx(1.0, abs=1e-5)
    assert st["clip_frac"] == 0
    assert st["ce"] == pytest.approx(-st["gt_logp"], rel=1e-4)   # same function, same clean context
    assert st["entropy"] == pytest.approx(math.log(K), rel=0.05)  # a fresh model is near uniform
    assert 0 <= st["sample_gt_match"] <= 1 and st["context_replaced"] == 0
    assert model.training  # the step restores the caller's mode (a fresh model is in train mode)
    # Train-mode update (the code): dropout makes ratios differ from 1.
    cfg_t = mse_only(update_mode="train", group_size=4)
    st_t = vapi_step(model, tok, images, tokens, labels, build_optimizer(model, cfg_t), cfg_t,
                     torch.Generator().manual_seed(0))
    assert st_t["ratio_max"] > 1.0 + 1e-4 and not st_t["shared_forward"]
    for k in ("reward_mean", "reward_std", "pg_loss", "ce", "kl", "grad_norm", "approx_kl", "adv_abs_mean"):
        assert math.isfinite(st_t[k]), k


def test_eval_update_is_on_policy_and_train_update_is_not():
    """update_mode="eval": before the round's first optimizer step the update computes the rollout's function, so
    the ratio is exactly 1 (approx_kl 0, clip fraction 0); "train" with dropout > 0: it is not."""
    tok, images, tokens, labels = make_batch(B=2, seed=4)
    assert TINY.dropout > 0 and TINY.attn_dropout > 0
    base = fresh_model(4)

    def step(**kw):
        model = copy.deepcopy(base)
        cfg = mse_only(group_size=4, ce_weight=0.1, **kw)
        torch.manual_seed(0)
        return vapi_step(model, tok, images, tokens, labels, build_optimizer(model, cfg), cfg,
                         torch.Generator().manual_seed(0))

    ev = step(update_mode="eval", micro_batch_images=1)       # two micro-batches, one optimizer step
    assert ev["optimizer_steps"] == 1
    assert ev["ratio_min"] == 1.0 and ev["ratio_max"] == 1.0
    assert ev["approx_kl"] == 0.0 and ev["clip_frac"] == 0.0
    assert ev["approx_kl_first"] == 0.0 and ev["clip_frac_first"] == 0.0
    assert ev["rollout_logp_gap"] < 1e-5                         # the rollout's log-probs agree up to rounding
    tr = step(update_mode="train")
    assert tr["approx_kl_first"] > 1e-4 and tr["clip_frac_first"] > 0 and tr["ratio_max"] > 1.0
    assert tr["rollout_logp_gap"] > 100 * ev["rollout_logp_gap"]  # dropout, not rounding
    # After an optimizer step the policy has moved: the second minibatch's ratios leave 1, the first's do not.
    two = step(update_mode="eval", num_minibatches=2)
    assert two["optimizer_steps"] == 2 and two["approx_kl_first"] == 0.0
    assert two["ratio_max"] > 1.0 or two["ratio_min"] < 1.0


class _BatchRounding(nn.Module):
    """The generator, with logits that depend slightly on the batch size, as a differently batched bf16 forward
    rounds differently on a GPU."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.config = inner, inner.config

    def forward(self, tokens, labels):
        logits = self.inner(tokens, labels).logits
        return SimpleNamespace(logits=logits + 1e-3 * tokens.shape[0] * torch.linspace(0, 1, K))


def test_on_policy_ratio_does_not_depend_on_how_the_forward_is_batched():
    tok, images, tokens, labels = make_batch(B=2, seed=4)
    model = _BatchRounding(fresh_model(4))
    cfg = mse_only(group_size=4, update_mode="eval", micro_batch_images=1)  # rollout on 2 images, update on 1
    st = vapi_step(model, tok, images, tokens, labels, build_optimizer(model, cfg), cfg,
                   torch.Generator().manual_seed(0))
    assert st["rollout_logp_gap"] > 1e-5                       # the rollout's log-probs are off by the rounding
    assert st["ratio_min"] == st["ratio_max"] == 1.0 and st["approx_kl"] == 0.0


def test_accumulated_micro_batches_give_the_one_pass_update():
    """Images per step beyond memory: micro-batches accumulate into one optimizer step with the same result."""
    tok, images, tokens, labels = make_batch(B=4, seed=5)
    base = fresh_model(5)
    out = {}
    for micro in (0, 1, 3):
        model = copy.deepcopy(base)
        cfg = mse_only(group_size=4, update_mode="eval", ce_weight=0.1, micro_batch_images=micro)
        st = vapi_step(model, tok, images, tokens, labels, build_optimizer(model, cfg), cfg,
                       torch.Generator().manual_seed(0))
        assert st["optimizer_steps"] == 1
        out[micro] = (model.state_dict(), st)
    moved = max(float((out[0][0][k] - v).abs().max()) for k, v in base.state_dict().items())
    assert moved > 1e-4
    for micro in (1, 3):  # 4 micro-batches of 1 image; 3 + 1 (unequal shares)
        for k, v in out[0][0].items():
            assert torch.allclose(out[micro][0][k], v, atol=1e-6, rtol=1e-5), (micro, k)
        assert out[micro][1]["grad_norm"] == pytest.approx(out[0][1]["grad_norm"], rel=1e-5)
        assert out[micro][1]["ce"] == pytest.approx(out[0][1]["ce"], rel=1e-5)


def test_prior_only_control_is_a_ce_only_update():
    tok, images, tokens, labels = make_batch(B=3, seed=6)
    base = fresh_model(6)
    cfg = mse_only(group_size=4, update_mode="eval", ce_weight=0.1, control="prior_only")

    model = copy.deepcopy(base)
    st = vapi_step(model, tok, images, tokens, labels, build_optimizer(model, cfg), cfg,
                   torch.Generator().manual_seed(0))
    # The same optimizer step on beta * CE(logits, GT) alone, clean context, no dropout.
    ref = copy.deepcopy(base)
    opt = build_optimizer(ref, cfg)
    ref.eval()
    logits = ref(tokens.reshape(3, -1), labels).logits
    (cfg.ce_weight * F.cross_entropy(logits.reshape(-1, K), tokens.reshape(-1))).backward()
    torch.nn.utils.clip_grad_norm_(list(ref.parameters()), cfg.grad_clip)
    opt.step()
    for k, v in ref.state_dict().items():
        assert torch.allclose(model.state_dict()[k], v, atol=1e-7, rtol=1e-6), k
    # The rollout and its reward are still measured and logged.
    assert st["control"] == "prior_only" and st["reward_std"] > 0 and st["pg_loss"] != 0
    # The full method from the same start and seeds lands elsewhere: the comparison above can fail.
    full = copy.deepcopy(base)
    cfg_full = cfg.replace(control="full")
    vapi_step(full, tok, images, tokens, labels, build_optimizer(full, cfg_full), cfg_full,
              torch.Generator().manual_seed(0))
    assert max(float((full.state_dict()[k] - v).abs().max()) for k, v in ref.state_dict().items()) > 1e-5


def test_shuffled_rewards_control_keeps_the_samples_and_changes_the_update():
    tok, images, tokens, labels = make_batch(B=4, seed=7)
    base = fresh_model(7)
    cfg = mse_only(group_size=4, update_mode="eval")
    runs = {}
    for control in ("full", "shuffled_rewards"):
        model = copy.deepcopy(base)
        c = cfg.replace(control=control)
        st = vapi_step(model, tok, images, tokens, labels, build_optimizer(model, c), c,
                       torch.Generator().manual_seed(0), shuffle_generator=shuffle_generator(c.seed))
        runs[control] = (model, st)
    (m_full, s_full), (m_shuf, s_shuf) = runs["full"], runs["shuffled_rewards"]
    # The same contexts and samples (the shuffle has its own stream), so the same logged rewards ...
    for k in ("reward_mean", "reward_std", "mse_mean", "mse_group_std", "entropy", "sample_gt_match"):
        assert s_shuf[k] == s_full[k], k
    # ... but other advantages, hence another update.
    assert max(float((v - m_shuf.state_dict()[k]).abs().max()) for k, v in m_full.state_dict().items()) > 1e-5
    with pytest.raises(ValueError, match="shuffle_generator"):
        c = cfg.replace(control="shuffled_rewards")
        vapi_step(copy.deepcopy(base), tok, images, tokens, labels, build_optimizer(base, c), c)


def test_step_logs_the_spread_of_each_reward_term():
    tok, images, tokens, labels = make_batch(B=3, seed=8)

    def l1(a, b):
        return (a - b).abs().flatten(1).mean(1)

    def step(cfg, fn=None):
        model = fresh_model(8)
        return vapi_step(model, tok, images, tokens, labels, build_optimizer(model, cfg), cfg,
                         torch.Generator().manual_seed(0), fn)

    mse = step(mse_only(group_size=4))
    # With R = -MSE the reward's within-group spread is the MSE's; no perceptual term was measured.
    assert mse["mse_group_std"] > 0 and mse["reward_group_std"] == pytest.approx(mse["mse_group_std"], rel=1e-5)
    assert math.isnan(mse["perceptual_group_std"])
    perc = step(mse_only(group_size=4, reward_terms="perceptual", reward_perceptual_weight=2.0), l1)
    assert perc["reward_group_std"] == pytest.approx(2.0 * perc["perceptual_group_std"], rel=1e-5)
    both = step(mse_only(group_size=4, reward_perceptual_weight=1.0), l1)
    assert both["perceptual_group_std"] > 0 and both["mse_group_std"] == mse["mse_group_std"]


def test_step_noise_kl_and_minibatches():
    tok, images, tokens, labels = make_batch(B=4, seed=2)
    model = fresh_model(2)
    ref = copy.deepcopy(model).eval().requires_grad_(False)
    for est in ("k3", "full"):
        cfg = mse_only(noise_rate=0.5, noise_kernel="paper", kl_coef=0.1, kl_estimator=est, num_minibatches=2,
                       ppo_epochs=2, micro_batch_images=1, group_size=4)
        st = vapi_step(model, tok, images, tokens, labels, build_optimizer(model, cfg), cfg,
                       torch.Generator().manual_seed(0), ref_model=ref)
        assert st["optimizer_steps"] == 4
        assert 0.3 < st["context_replaced"] < 0.7
        assert st["kl"] > 0      # the policy moved away from the reference during the round
    with pytest.raises(ValueError, match="ref_model"):
        vapi_step(model, tok, images, tokens, labels, build_optimizer(model, cfg), cfg, None)


def test_step_with_real_vq_tokenizer_and_encoding():
    """Interface check with the project's own tokenizer class (random weights): tokens=None encodes on the fly."""
    torch.manual_seed(0)
    vq = VQTokenizer(VQConfig(resolution=16, base_channels=16, channel_mult=(1, 2, 2), num_res_blocks=1,
                              codebook_size=K, code_dim=16, norm_groups=8)).eval()
    assert vq.grid_size == (GRID, GRID)
    images = torch.rand(2, 3, 16, 16)
    labels = torch.tensor([0, 3])
    model = fresh_model(0)
    cfg = VAPIConfig(group_size=4, batch_size=2, lr=1e-4)

    def l1(a, b):
        return (a - b).abs().flatten(1).mean(1)

    st = vapi_step(model, vq, images, None, labels, build_optimizer(model, cfg), cfg,
                   torch.Generator().manual_seed(0), l1)
    assert st["perceptual_metric"] == "l1" and st["perceptual_mean"] > 0
    assert math.isfinite(st["reward_mean"]) and st["reward_std"] > 0


def test_step_rejects_bad_input():
    tok, images, tokens, labels = make_batch(B=2)
    model = fresh_model(0)
    cfg = mse_only()
    opt = build_optimizer(model, cfg)
    with pytest.raises(ValueError, match="labels"):
        vapi_step(model, tok, images, tokens, torch.tensor([0, TINY.num_classes]), opt, cfg)
    with pytest.raises(ValueError, match="tokens"):
        vapi_step(model, tok, images, tokens[:, :2], labels, opt, cfg)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        vapi_step(model, tok, images * 2 - 1, tokens, labels, opt, cfg)
    with pytest.raises(ValueError, match="perceptual_fn"):
        vapi_step(model, tok, images, tokens, labels, opt, VAPIConfig(batch_size=2))


def test_step_fails_clearly_on_broken_weights_and_restores_mode():
    tok, images, tokens, labels = make_batch(B=2)
    model = fresh_model(0).eval()
    with torch.no_grad():
        model.lm_head.bias[0] = float("nan")
    cfg = mse_only(group_size=4)
    with pytest.raises(FloatingPointError, match="non-finite logits"):
        vapi_step(model, tok, images, tokens, labels, build_optimizer(model, cfg), cfg)
    assert not model.training


def test_step_is_deterministic_given_seeds():
    tok, images, tokens, labels = make_batch(B=2, seed=3)

    def run(seed):
        model = fresh_model(0)
        cfg = mse_only(group_size=4, noise_rate=0.25)
        opt = build_optimizer(model, cfg)
        torch.manual_seed(123)  # dropout stream
        gen = torch.Generator().manual_seed(seed)
        stats = [vapi_step(model, tok, images, tokens, labels, opt, cfg, gen) for _ in range(2)]
        return model, stats

    m1, s1 = run(0)
    m2, s2 = run(0)
    m3, s3 = run(1)
    for a, b in zip(m1.state_dict().values(), m2.state_dict().values()):
        assert torch.equal(a, b)
    drop = {"step_time_s"}
    assert [{k: v for k, v in s.items() if k not in drop} for s in s1] == \
        [{k: v for k, v in s.items() if k not in drop} for s in s2]
    assert s3[0]["reward_mean"] != s1[0]["reward_mean"]


# ------------------------------------------------------------------------------------------------------------
# post_train
# ------------------------------------------------------------------------------------------------------------
def _data(M: int = 12, seed: int = 0):
    tok, images, tokens, labels = make_batch(B=M, seed=seed)
    return tok, {"images": images, "labels": labels}


def test_post_train_logs_checkpoints_and_resumes(tmp_path):
    tok, data = _data()
    base = fresh_model(0)
    cfg = mse_only(group_size=4, batch_size=3)

    full = post_train(copy.deepcopy(base), tok, data, cfg, 3, tmp_path / "a", "cpu", progress=False, ckpt_every=1)
    assert full["status"] == "completed" and full["step"] == 3
    assert [h["step"] for h in full["history"]] == [1, 2, 3]
    assert list(full["history_df"]["step"]) == [1, 2, 3]
    assert full["perceptual_metric"] == "none" and all(h["perceptual_metric"] == "none" for h in full["history"])
    assert full["wall_time_s"] > 0 and full["train_time_s"] > 0
    for f in ("checkpoint.pt", "model.pt", "history.csv", "result.json"):
        assert (tmp_path / "a" / f).is_file(), f
    loaded = load_generator(tmp_path / "a" / "model.pt")
    for k, v in full["model"].state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)
    assert not all(torch.equal(v, base.state_dict()[k]) for k, v in loaded.state_dict().items())

    # Interrupted after 2 steps, then resumed to 3 in a new call: identical to the uninterrupted run.
    part = post_train(copy.deepcopy(base), tok, data, cfg, 2, tmp_path / "b", "cpu", progress=False)
    assert part["step"] == 2
    resumed = post_train(copy.deepcopy(base), tok, data, cfg, 3, tmp_path / "b", "cpu", progress=False)
    assert resumed["step"] == 3 and len(resumed["history"]) == 3
    for k, v in full["model"].state_dict().items():
        assert torch.equal(resumed["model"].state_dict()[k], v), k
    assert resumed["history"][-1]["reward_mean"] == full["history"][-1]["reward_mean"]

    # A different config or a different starting model is refused, not silently mixed.
    with pytest.raises(ValueError, match="different VAPIConfig"):
        post_train(copy.deepcopy(base), tok, data, cfg.replace(lr=1e-3), 4, tmp_path / "b", "cpu", progress=False)
    with pytest.raises(ValueError, match="different starting model"):
        post_train(fresh_model(5), tok, data, cfg, 4, tmp_path / "b", "cpu", progress=False)


def test_post_train_shuffled_control_is_seeded_and_resumes(tmp_path):
    tok, data = _data(M=8, seed=1)
    base = fresh_model(1)
    cfg = mse_only(group_size=4, batch_size=2, update_mode="eval", control="shuffled_rewards")
    full = post_train(copy.deepcopy(base), tok, data, cfg, 3, tmp_path / "a", "cpu", progress=False)
    post_train(copy.deepcopy(base), tok, data, cfg, 2, tmp_path / "b", "cpu", progress=False)
    resumed = post_train(copy.deepcopy(base), tok, data, cfg, 3, tmp_path / "b", "cpu", progress=False)
    for k, v in full["model"].state_dict().items():
        assert torch.equal(resumed["model"].state_dict()[k], v), k
    assert [h["grad_norm"] for h in resumed["history"]] == [h["grad_norm"] for h in full["history"]]
    assert {h["control"] for h in full["history"]} == {"shuffled_rewards"}
    # The method with the same seeds draws the same first batch and samples; only the update differs.
    one = post_train(copy.deepcopy(base), tok, data, cfg, 1, tmp_path / "d", "cpu", progress=False)
    method = post_train(copy.deepcopy(base), tok, data, cfg.replace(control="full"), 1, tmp_path / "c", "cpu",
                        progress=False)
    assert method["history"][0]["reward_mean"] == one["history"][0]["reward_mean"]
    assert max(float((v - one["model"].state_dict()[k]).abs().max())
               for k, v in method["model"].state_dict().items()) > 1e-5


def test_post_train_accepts_datasets_and_checks_sizes(tmp_path):
    tok, data = _data(M=6)
    ds = list(zip(data["images"], data["labels"].tolist()))  # a map-style "dataset" of (image, label)
    cfg = mse_only(group_size=4, batch_size=2)
    res = post_train(fresh_model(0), tok, ds, cfg, 1, tmp_path / "ds", "cpu", progress=False)
    assert res["step"] == 1
    # The on-device embedded-data source; tokens are encoded on the fly by the tokenizer.
    src = EmbeddedSource(size=20, resolution=tok.resolution)
    res2 = post_train(fresh_model(0), tok, src, cfg, 1, tmp_path / "emb", "cpu", progress=False)
    assert res2["step"] == 1 and math.isfinite(res2["history"][0]["reward_mean"])
    with pytest.raises(ValueError, match="fewer than batch_size"):
        post_train(fresh_model(0), tok, ds, cfg.replace(batch_size=7), 1, tmp_path / "x", "cpu", progress=False)


# ------------------------------------------------------------------------------------------------------------
# The held-out reward (rearlib.vapi_rewards, and its table in rearlib.vapi_report)
# ------------------------------------------------------------------------------------------------------------
class _FixedLogits(nn.Module):
    """A stand-in generator: logits ``scale`` * one-hot of the true token (0: uniform), from the true prefix."""

    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale

    def forward(self, tokens, labels):
        return SimpleNamespace(logits=self.scale * F.one_hot(tokens, K).float())


def test_heldout_images_and_reconstruction():
    tok = PaletteTokenizer()
    images, labels, tokens = vapi_report.heldout_images(tok, 7, data_seed=0, device="cpu", chunk=3)
    assert images.shape == (7, 3, tok.resolution, tok.resolution) and labels.shape == (7,)
    assert torch.equal(tokens, tok.encode(images).reshape(7, N))

    # Scored against the decoded GT tokens, a model that is certain of the true token reconstructs perfectly.
    target = tok.decode(tokens)
    cfg = VAPIConfig()
    perc = lambda a, b: (a - b).abs().flatten(1).mean(1)
    sure = vapi_report.heldout_reconstruction(_FixedLogits(30.0), tok, target, labels, tokens, cfg, perc, "P",
                                              seed=0, batch=4)
    assert sure["held-out MSE"] == 0 and sure["held-out P"] == 0 and sure["held-out reward"] == 0
    assert sure["held-out CTR"] == 1 and sure["held-out CE"] < 1e-9
    # A uniform model: CE = log K; the same seed draws the same tokens (common random numbers).
    flat = vapi_report.heldout_reconstruction(_FixedLogits(0.0), tok, target, labels, tokens, cfg, perc, "P", seed=3)
    assert flat["held-out CE"] == pytest.approx(math.log(K), rel=1e-6) and flat["held-out MSE"] > 0
    assert flat["held-out reward"] == pytest.approx(-(flat["held-out MSE"] + flat["held-out P"]))
    again = vapi_report.heldout_reconstruction(_FixedLogits(0.0), tok, target, labels, tokens, cfg, perc, "P", seed=3)
    assert again == flat

    table = vapi_report.heldout_table({("sure", None): _FixedLogits(30.0), ("flat", 1): _FixedLogits(0.0)}, tok,
                                      target, labels, tokens, cfg, perc, "P", seed=3)
    assert list(table["model"]) == ["sure", "flat"] and str(table["vapi_seed"].dtype) == "Int64"
    assert table["vapi_seed"].isna().tolist() == [True, False] and set(table["n images"]) == {7}
    assert table.iloc[1]["held-out CE"] == flat["held-out CE"]


def test_heldout_reconstruction_reward_is_the_runs_reward_on_unseen_images():
    tok = PaletteTokenizer()
    images, labels, tokens = vapi_report.heldout_images(tok, 6, data_seed=0, device="cpu")
    uniform = _FixedLogits(0.0).train()

    def l1(a, b):
        return (a - b).abs().flatten(1).mean(1)

    S = 64
    mse_run = VAPIConfig(reward_terms="mse")
    res = heldout_reconstruction_reward(uniform, tok, images, labels, tokens, mse_run, l1, seed=1,
                                        samples_per_image=S, batch=4)
    assert res.rewards.shape == res.mse.shape == res.perceptual.shape == (6, S) and res.ce.shape == (6,)
    assert uniform.training  # the caller's mode is restored
    # The reward is the run's (MSE only here); the perceptual distance is measured all the same.
    assert torch.equal(res.rewards, -res.mse) and bool((res.perceptual > 0).all()) and res.perceptual_metric == "l1"
    # Unbiased: the mean sampled MSE matches the exact expectation under the uniform policy.
    exact = -expected_mse_reward(uniform, tok, images, tokens, labels)
    assert abs(float(res.mse.mean()) - exact) < 4 * float(res.mse.std()) / math.sqrt(res.mse.numel())
    assert torch.allclose(res.ce, torch.full((6,), math.log(K)), rtol=1e-6) and bool((res.ctr <= 1).all())
    # Another reward definition rescores the same draws (same seed): -(MSE + 2 * perceptual).
    both = heldout_reconstruction_reward(uniform, tok, images, labels, tokens,
                                         VAPIConfig(reward_perceptual_weight=2.0), l1, seed=1, samples_per_image=S)
    assert torch.equal(both.mse, res.mse)
    assert torch.allclose(both.rewards, -(both.mse + 2.0 * both.perceptual))
    sp = reward_spreads(res.mse, res.perceptual, S)
    assert sp.mse_spread > 0 and sp.perceptual_spread > 0
    # The study's table: means, and with several draws per image the spreads and the balancing weight.
    row = vapi_report.heldout_reconstruction(uniform, tok, images, labels, tokens, mse_run, l1, "P", seed=1,
                                             samples_per_image=S)
    assert row["held-out reward"] == pytest.approx(-row["held-out MSE"])
    assert row["held-out MSE spread"] == pytest.approx(sp.mse_spread)
    assert row["held-out P spread"] == pytest.approx(sp.perceptual_spread)
    assert row["held-out λ_p"] == pytest.approx(sp.lambda_p)
    with pytest.raises(ValueError, match="samples_per_image"):
        heldout_reconstruction_reward(uniform, tok, images, labels, tokens, mse_run, l1, seed=1, samples_per_image=0)
    with pytest.raises(ValueError, match="tokens"):
        heldout_reconstruction_reward(uniform, tok, images, labels, tokens[:2], mse_run, l1, seed=1)
