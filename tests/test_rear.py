"""Tests of rearlib.rear: noise schedules, token perturbation and the reAR alignment losses."""

from __future__ import annotations

import json
import math
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F

from rearlib.rear import (
    PRESETS,
    ReARConfig,
    get_rear_config,
    make_noisy_context,
    negative_cosine,
    noise_bound,
    perturb_tokens,
    rear_loss,
    sample_noise_levels,
)
from rearlib.runtime import config_hash
from rearlib.train_config import TrainConfig, generator_overrides
from rearlib.train_step import build_model


class Out(NamedTuple):
    """Stand-in with the fields of model.GeneratorOutput (rear_loss only reads these attributes)."""

    logits: torch.Tensor
    encode_z: torch.Tensor | None
    decode_z: torch.Tensor | None


def gen(seed: int = 0) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


# ------------------------------------------------------------------------------------------------ schedules

@pytest.mark.parametrize("t, expected", [(0.0, 1.0), (0.375, 0.5), (0.6, 0.2), (0.75, 0.0), (0.9, 0.0), (1.0, 0.0)])
def test_final_anneal_schedule_with_clamp(t, expected):
    cfg = PRESETS["rear"]
    assert noise_bound(cfg, t) == pytest.approx(expected, abs=1e-12)
    # the paper's formula max(0, 1 - 4t/3)
    assert noise_bound(cfg, t) == pytest.approx(max(0.0, 1.0 - 4.0 * t / 3.0), abs=1e-12)


@pytest.mark.parametrize("t", [0.0, 0.1, 0.5, 0.8, 1.0])
def test_linear_anneal_is_one_minus_t(t):
    assert noise_bound(PRESETS["anneal_linear"], t) == pytest.approx(1.0 - t, abs=1e-12)


def test_fixed_uniform_none_bounds_and_draws():
    t = 0.3
    assert noise_bound(PRESETS["ar"], t) == 0.0
    assert noise_bound(PRESETS["fixed_0.25"], t) == 0.25
    assert noise_bound(PRESETS["uniform_0.5"], t) == 0.5
    eps = sample_noise_levels(PRESETS["fixed_0.25"], 7, t, generator=gen(), device="cpu")
    assert torch.equal(eps, torch.full((7,), 0.25))
    eps = sample_noise_levels(PRESETS["uniform_0.5"], 20000, t, generator=gen(), device="cpu")
    assert eps.min() >= 0 and eps.max() <= 0.5
    assert eps.mean().item() == pytest.approx(0.25, abs=0.01)      # U(0, 0.5) has mean 0.25
    assert eps.std().item() == pytest.approx(0.5 / math.sqrt(12), abs=0.01)
    eps = sample_noise_levels(PRESETS["rear"], 20000, 0.375, generator=gen(), device="cpu")
    assert eps.max() <= 0.5 and eps.mean().item() == pytest.approx(0.25, abs=0.01)


def test_bad_progress_and_config_rejected():
    with pytest.raises(ValueError, match="progress"):
        noise_bound(PRESETS["rear"], 1.5)
    with pytest.raises(ValueError, match="noise schedule"):
        ReARConfig(noise="cosine")
    with pytest.raises(ValueError, match="perturb_mode"):
        ReARConfig(perturb_mode="drop")
    with pytest.raises(ValueError, match="noise_max"):
        ReARConfig(noise="fixed", noise_max=1.5)
    with pytest.raises(ValueError, match="unknown reAR preset"):
        get_rear_config("nope")
    with pytest.raises(ValueError, match="unknown ReARConfig fields"):
        get_rear_config("rear", lamda=2.0)


def test_presets_match_paper():
    r = PRESETS["rear"]
    assert (r.noise, r.noise_max, r.anneal_end, r.perturb_mode) == ("anneal", 1.0, 0.75, "switch")
    assert r.encode_align and r.decode_align and r.align_weight == 1.0 and r.encode_mask_noisy
    assert not r.official_fallback
    a = PRESETS["ar"]
    assert not a.uses_noise and not a.uses_alignment and not a.tied_codebook
    assert get_rear_config("rear", align_weight=0.5).align_weight == 0.5
    assert ReARConfig.from_dict(r.to_dict()) == r


def test_tied_presets_select_the_two_constructions_and_existing_configs_keep_their_hash():
    assert PRESETS["tied"].tied_codebook is True and PRESETS["tied_projected"].tied_codebook == "projected"
    for name in ("tied", "tied_projected"):
        r = PRESETS[name]
        assert not r.uses_noise and not r.uses_alignment
        assert ReARConfig.from_dict(json.loads(json.dumps(r.to_dict()))) == r
    assert ReARConfig(tied_codebook="codebook") == PRESETS["tied"]              # one spelling, one hash
    with pytest.raises(ValueError, match="tied_codebook must be"):
        ReARConfig(tied_codebook="lifted")
    # the run hashes of the committed records: the option added no field and changed no preset
    assert {n: config_hash(PRESETS[n].to_dict()) for n in ("ar", "rear", "tied", "de_only")} == {
        "ar": "bf5d590ce78b", "rear": "e5ac198eba43", "tied": "79f04c383a07", "de_only": "ee2986253b44"}


def test_the_tied_projected_preset_reaches_the_generator():
    cfg = TrainConfig(model="tiny", rear="tied_projected", steps=2, batch_size=2, warmup_steps=0)
    assert generator_overrides(cfg)["tied_codebook"] == "projected"
    model = build_model(cfg, torch.randn(32, 16), torch.device("cpu"))
    assert model.config.tied_mode == "projected" and model.config.tied_dim == 256
    assert model.code_lift.fc1.in_features == 16 and torch.count_nonzero(model.codebook) > 0
    tokens = torch.randint(0, 32, (2, 16), generator=gen(0))
    assert model(tokens, torch.tensor([0, 1])).logits.shape == (2, 16, 32)


# ------------------------------------------------------------------------------------------------ perturbation

def test_perturbation_rate_follows_eps_per_sequence():
    b, n, k = 16, 4096, 64
    tokens = torch.randint(0, k, (b, n), generator=gen(1))
    eps = torch.linspace(0.0, 0.9, b)
    noisy, mask = perturb_tokens(tokens, eps, codebook_size=k, mode="switch", generator=gen(2))
    rate = mask.float().mean(dim=1)
    # binomial std at n = 4096 is <= 0.008; 5 sigma
    assert torch.allclose(rate, eps, atol=0.04), (rate, eps)
    assert rate[0] == 0  # eps = 0 never perturbs
    # unperturbed positions are untouched, replacements are in range and roughly uniform
    assert torch.equal(noisy[~mask], tokens[~mask])
    repl = noisy[mask]
    assert repl.min() >= 0 and repl.max() < k
    assert repl.float().mean().item() == pytest.approx((k - 1) / 2, rel=0.03)
    # a switch may draw the original id: still counted as perturbed (fraction ~ 1/K)
    same = (noisy == tokens) & mask
    assert same.sum() > 0
    assert same.sum().item() / mask.sum().item() == pytest.approx(1 / k, rel=0.3)


def test_mask_mode_writes_mask_id():
    k = 32
    tokens = torch.randint(0, k, (8, 256), generator=gen(3))
    noisy, mask = perturb_tokens(tokens, torch.full((8,), 0.5), codebook_size=k, mode="mask", generator=gen(4))
    assert mask.any() and (~mask).any()
    assert torch.all(noisy[mask] == k)
    assert torch.equal(noisy[~mask], tokens[~mask])


def test_perturbation_reproducible_and_labels_untouched():
    k = 32
    tokens = torch.randint(0, k, (4, 64), generator=gen(5))
    before = tokens.clone()
    cfg = PRESETS["rear"]
    a = make_noisy_context(cfg, tokens, 0.1, codebook_size=k, generator=gen(6))
    b = make_noisy_context(cfg, tokens, 0.1, codebook_size=k, generator=gen(6))
    c = make_noisy_context(cfg, tokens, 0.1, codebook_size=k, generator=gen(7))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[1], c[1])
    assert torch.equal(tokens, before)  # no in-place edits of the clean tokens / labels
    # "none" leaves tokens alone and does not consume random numbers
    g = gen(8)
    state = g.get_state()
    noisy, mask, eps = make_noisy_context(PRESETS["ar"], tokens, 0.1, codebook_size=k, generator=g)
    assert torch.equal(noisy, tokens) and not mask.any() and torch.equal(g.get_state(), state)


def test_perturb_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"\[B, N\]"):
        perturb_tokens(torch.zeros(4, dtype=torch.long), torch.zeros(4), codebook_size=8, generator=gen())
    with pytest.raises(ValueError, match="eps"):
        perturb_tokens(torch.zeros(4, 5, dtype=torch.long), torch.zeros(3), codebook_size=8, generator=gen())


# ------------------------------------------------------------------------------------------------ losses

B, N, K, D = 3, 10, 16, 8


def setup_loss(seed: int = 0, requires_grad: bool = True):
    g = gen(seed)
    codebook = torch.randn(K, D, generator=g)
    targets = torch.randint(0, K, (B, N), generator=g)
    logits = torch.randn(B, N, K, generator=g, requires_grad=requires_grad)
    enc = torch.randn(B, N + 2, D, generator=g, requires_grad=requires_grad)
    dec = torch.randn(B, N + 2, D, generator=g, requires_grad=requires_grad)
    mask = torch.rand(B, N, generator=g) < 0.4
    return codebook, targets, logits, enc, dec, mask


def manual_cos(z, targets, codebook):
    return -(F.normalize(z, dim=-1) * F.normalize(codebook, dim=-1)[targets]).sum(-1)


def test_identical_vectors_give_minus_one():
    codebook, targets, logits, _, _, mask = setup_loss(requires_grad=False)
    zt = codebook[targets] * 3.7  # any positive scale: cosine is scale-free
    enc = torch.cat([torch.randn(B, 2, D), zt], dim=1)
    dec = torch.cat([torch.randn(B, 1, D), zt, torch.randn(B, 1, D)], dim=1)
    cfg = get_rear_config("rear", encode_mask_noisy=False)
    _, s = rear_loss(Out(logits, enc, dec), targets, mask, codebook, cfg)
    assert s["enc"].item() == pytest.approx(-1.0, abs=1e-6)
    assert s["dec"].item() == pytest.approx(-1.0, abs=1e-6)
    assert negative_cosine(zt, F.normalize(zt, dim=-1)).allclose(torch.full((B, N), -1.0))
    # code default: masked entries stay in the denominator, so perfect alignment gives -(unmasked fraction)
    _, s = rear_loss(Out(logits, enc, dec), targets, mask, codebook, PRESETS["rear"])
    assert s["enc"].item() == pytest.approx(-(~mask).float().mean().item(), abs=1e-6)


def test_loss_values_and_positions():
    codebook, targets, logits, enc, dec, mask = setup_loss()
    cfg = PRESETS["rear"]
    loss, s = rear_loss(Out(logits, enc, dec), targets, mask, codebook, cfg)
    ce = F.cross_entropy(logits.reshape(-1, K), targets.reshape(-1))      # labels are the clean tokens
    l_enc = (manual_cos(enc[:, 2:], targets, codebook) * (~mask).float()).sum() / (B * N)
    l_dec = manual_cos(dec[:, 1:N + 1], targets, codebook).mean()
    assert s["ce"].item() == pytest.approx(ce.item(), rel=1e-6)
    assert s["enc"].item() == pytest.approx(l_enc.item(), rel=1e-5)
    assert s["dec"].item() == pytest.approx(l_dec.item(), rel=1e-5)
    assert loss.item() == pytest.approx((ce + l_enc + l_dec).item(), rel=1e-5)
    assert s["acc"].item() == pytest.approx((logits.argmax(-1) == targets).float().mean().item())
    assert s["perturbed"].item() == pytest.approx(mask.float().mean().item())
    lam = get_rear_config("rear", align_weight=1.5)
    loss2, _ = rear_loss(Out(logits, enc, dec), targets, mask, codebook, lam)
    assert loss2.item() == pytest.approx((ce + 1.5 * (l_enc + l_dec)).item(), rel=1e-5)
    # CLS (position 0) never matters; the decode head's last position (after x~_N) never matters either
    loss.backward()
    assert enc.grad[:, :2].abs().max() == 0 and dec.grad[:, 0].abs().max() == 0 and dec.grad[:, -1].abs().max() == 0
    assert dec.grad[:, 1].abs().max() > 0  # the class position predicts z(x_1)


def test_perturbed_position_does_not_move_encode_term_but_paper_variant_does():
    codebook, targets, logits, enc, dec, mask = setup_loss()
    mask = torch.zeros(B, N, dtype=torch.bool)
    mask[1, 4] = True
    for cfg, expect_zero in ((PRESETS["rear"], True), (PRESETS["rear_paper_encode"], False)):
        enc_ = enc.detach().clone().requires_grad_(True)
        loss, s = rear_loss(Out(logits, enc_, dec), targets, mask, codebook, cfg)
        (g,) = torch.autograd.grad(loss, enc_)
        grad_at_perturbed = g[1, 4 + 2].abs().max().item()
        assert (grad_at_perturbed == 0) == expect_zero
        assert g[0, 4 + 2].abs().max() > 0  # unperturbed positions always contribute
        # moving the feature at the perturbed position changes L_enc only in the paper's variant
        moved = enc.detach().clone()
        moved[1, 4 + 2] = torch.randn(D)
        _, s2 = rear_loss(Out(logits, moved, dec), targets, mask, codebook, cfg)
        assert (s2["enc"].item() == s["enc"].item()) == expect_zero
    # the decode term is never masked
    dec_ = dec.detach().clone().requires_grad_(True)
    loss, _ = rear_loss(Out(logits, enc, dec_), targets, mask, codebook, PRESETS["rear"])
    (g,) = torch.autograd.grad(loss, dec_)
    assert g[1, 4 + 1].abs().max() > 0


def test_single_head_computes_only_its_term_and_fallback_double_counts():
    codebook, targets, logits, enc, dec, mask = setup_loss(requires_grad=False)
    ce = F.cross_entropy(logits.reshape(-1, K), targets.reshape(-1))
    c_dec = manual_cos(dec[:, 1:N + 1], targets, codebook)
    c_enc = manual_cos(enc[:, 2:], targets, codebook)
    w = (~mask).float()

    de = PRESETS["de_only"]
    loss, s = rear_loss(Out(logits, None, dec), targets, mask, codebook, de)
    assert s["enc"].item() == 0.0
    assert loss.item() == pytest.approx((ce + c_dec.mean()).item(), rel=1e-5)
    # an encode output that is present is ignored when the term is disabled
    loss_b, _ = rear_loss(Out(logits, enc, dec), targets, mask, codebook, de)
    assert loss_b.item() == loss.item()
    loss_f, s_f = rear_loss(Out(logits, None, dec), targets, mask, codebook,
                            get_rear_config("de_only", official_fallback=True))
    assert s_f["enc"].item() == pytest.approx(((c_dec * w).sum() / (B * N)).item(), rel=1e-5)
    assert loss_f.item() == pytest.approx((ce + (c_dec * w).mean() + c_dec.mean()).item(), rel=1e-5)

    en = PRESETS["en_only"]
    loss, s = rear_loss(Out(logits, enc, None), targets, mask, codebook, en)
    assert s["dec"].item() == 0.0
    assert loss.item() == pytest.approx((ce + (c_enc * w).mean()).item(), rel=1e-5)
    loss_f, _ = rear_loss(Out(logits, enc, None), targets, mask, codebook,
                          get_rear_config("en_only", official_fallback=True))
    assert loss_f.item() == pytest.approx((ce + (c_enc * w).mean() + c_enc.mean()).item(), rel=1e-5)
    # with both heads the fallback flag changes nothing
    a, _ = rear_loss(Out(logits, enc, dec), targets, mask, codebook, PRESETS["rear"])
    b, _ = rear_loss(Out(logits, enc, dec), targets, mask, codebook, get_rear_config("rear", official_fallback=True))
    assert a.item() == b.item()


def test_plain_ar_is_cross_entropy_only_and_errors_are_clear():
    codebook, targets, logits, enc, dec, mask = setup_loss(requires_grad=False)
    loss, s = rear_loss(Out(logits, None, None), targets, None, None, PRESETS["ar"])
    assert loss.item() == pytest.approx(F.cross_entropy(logits.reshape(-1, K), targets.reshape(-1)).item())
    assert s["enc"].item() == 0 and s["dec"].item() == 0 and s["perturbed"].item() == 0
    with pytest.raises(ValueError, match="encode_z=None"):
        rear_loss(Out(logits, None, dec), targets, mask, codebook, PRESETS["rear"])
    with pytest.raises(ValueError, match="codebook"):
        rear_loss(Out(logits, enc, dec), targets, mask, None, PRESETS["rear"])
    with pytest.raises(ValueError, match="z_dim"):
        rear_loss(Out(logits, enc, dec), targets, mask, torch.randn(K, D + 1), PRESETS["rear"])
    with pytest.raises(ValueError, match=r"N\+2"):
        rear_loss(Out(logits, enc[:, 1:], dec), targets, mask, codebook, PRESETS["rear"])
