"""Generator: configuration, shapes, causality, init, input validation, tied codebook (both constructions), FLOPs,
KV cache + CFG."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import rearlib.model as M
from rearlib.model import (PRESETS, GeneratorOutput, StateDictMismatchError, build_generator,
                           count_parameters, estimate_flops_per_token, get_config, load_official_state_dict)
from rearlib.model_kv_cache import _single_query_attention
from rearlib.runtime import UnreadableFileError


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _randomize(model, seed=0, std=0.05):
    """Give every parameter (including the zero-initialised adaLN outputs) random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def _assert_close(a, b, rtol=1.3e-6, atol=1e-5):
    """Like torch.testing.assert_close for float tensors (without its ~10 s first import on a busy box)."""
    assert a.shape == b.shape, (a.shape, b.shape)
    err = (a - b).abs() - (atol + rtol * b.abs())
    assert err.max() <= 0, f"max abs diff {(a - b).abs().max().item():.3g}"


def _inputs(cfg, B=3, seed=0, L=None):
    g = torch.Generator().manual_seed(seed)
    L = cfg.seq_len if L is None else L
    return (torch.randint(0, cfg.codebook_size, (B, L), generator=g),
            torch.randint(0, cfg.num_classes, (B,), generator=g))


# ---- configuration ----------------------------------------------------------------------------------------------
def test_unknown_preset_lists_the_presets():
    with pytest.raises(ValueError) as e:
        build_generator("rear_xl")
    for name in PRESETS:
        assert name in str(e.value)


def test_presets_match_the_paper():
    for name, depth, width, de in (("rear_s", 20, 768, 15), ("rear_b", 24, 768, 18), ("rear_l", 24, 1024, 18)):
        c = PRESETS[name]
        assert (c.depth, c.hidden, c.heads, c.encode_align_layer, c.decode_align_layer) == (depth, width, 16, 0, de)
        assert (c.codebook_size, c.num_classes, c.seq_len, c.mlp_ratio, c.z_dim, c.projector_dim) == (
            1024, 1000, 256, 4.0, 256, 2048)
        assert (c.dropout, c.attn_dropout, c.align_head) == (0.1, 0.1, "silu3")


def test_overrides_and_bad_configs():
    cfg = get_config("tiny", codebook_size=64, seq_len=8)
    assert (cfg.codebook_size, cfg.seq_len, cfg.hidden) == (64, 8, 64)
    with pytest.raises(ValueError, match="unknown GeneratorConfig fields"):
        get_config("tiny", widht=3)
    with pytest.raises(ValueError, match="divisible"):
        get_config("tiny", heads=3)
    with pytest.raises(ValueError, match="decode_align_layer=4"):
        get_config("tiny", decode_align_layer=4)
    with pytest.raises(ValueError, match="align_head"):
        get_config("tiny", align_head="relu")
    assert build_generator({"hidden": 32, "depth": 1, "heads": 2, "codebook_size": 8, "num_classes": 3,
                            "seq_len": 4}).config.decode_align_layer is None


def test_alignment_head_variants():
    assert count_parameters(PRESETS["rear_s"], include_heads=True) - count_parameters(PRESETS["rear_s"]) == 2 * (
        768 * 2048 + 2048 + 2048 * 2048 + 2048 + 2048 * 256 + 256)  # 6.30M per head, docs/paper.md, reAR §1.6
    m = build_generator("tiny", align_head="gelu2")
    assert [type(x).__name__ for x in m.decode_align_mlp] == ["Linear", "GELU", "Linear"]
    big = count_parameters(get_config("rear_s", align_head="gelu2"), include_heads=True) - count_parameters("rear_s")
    assert round(big / 2 / 1e6, 2) == 2.10  # the paper's "2-layer MLP" would be 2.10M per head for S
    assert round((count_parameters("rear_l", include_heads=True) - count_parameters("rear_l")) / 2 / 1e6, 2) == 6.82


# ---- forward ------------------------------------------------------------------------------------------------------
def test_forward_shapes_and_outputs():
    m = build_generator("tiny").eval()
    cfg = m.config
    x, c = _inputs(cfg)
    out = m(x, c)
    assert isinstance(out, GeneratorOutput)
    assert out.logits.shape == (3, cfg.seq_len, cfg.codebook_size) and out.logits.dtype == torch.float32
    assert out.encode_z is None and out.decode_z is None
    out = m(x, c, align=True)
    assert out.encode_z.shape == out.decode_z.shape == (3, cfg.seq_len + 2, cfg.z_dim)
    # a [B, h, w] grid is the same as its raster flattening
    assert torch.equal(m(x.view(3, 4, 4), c).logits, m(x, c).logits)
    # heads disabled -> None even with align=True; EN and DE may share a block
    assert build_generator("tiny", encode_align_layer=None).eval()(x, c, align=True).encode_z is None
    same = _randomize(build_generator("tiny", encode_align_layer=1, decode_align_layer=1)).eval()
    o = same(x, c, align=True)
    feats = same.forward_features(x, c, [1])[1]
    _assert_close(o.encode_z, same.encode_align_mlp(feats))
    _assert_close(o.decode_z, same.decode_align_mlp(feats))


def test_fresh_init():
    m = build_generator("tiny")
    for blk in m.blocks:
        assert blk.adaLN_modulation[1].weight.abs().sum() == 0 and blk.adaLN_modulation[1].bias.abs().sum() == 0
    assert m.adaln_before_head.adaLN_modulation[1].weight.abs().sum() == 0
    big = build_generator("small", device="meta")  # shapes only; std is checked on a real (CPU) model below
    assert big.embeddings.weight.shape == (1024 + 1 + 10 + 1, PRESETS["small"].hidden)
    torch.manual_seed(0)
    m2 = build_generator("tiny", hidden=256, heads=4)
    w = m2.blocks[0].mlp.fc1.weight
    # trunc_normal_(std=0.02) truncates at +-2 in absolute units (as timm and the authors): at 0.02 that is a plain
    # normal, so about 0.27% of 262k weights lie beyond 3 std (a max-based bound would be flaky).
    beyond_3sd = (w.abs() > 0.06).float().mean().item()
    assert abs(w.std().item() - 0.02) < 0.002 and 0.001 < beyond_3sd < 0.005 and w.abs().max() <= 2.0
    assert m2.blocks[0].mlp.fc1.bias.abs().sum() == 0
    assert abs(m2.pos_embed.std().item() - 0.02) < 0.002
    assert torch.equal(m2.blocks[0].norm1.weight, torch.ones(256))
    # adaLN-Zero: every block is the identity at init, so block outputs equal the embedded sequence
    x, c = _inputs(m.config)
    feats = m.forward_features(x, c, [0, 3])
    emb, _ = m._embed(x, c)
    _assert_close(feats[0], emb)
    _assert_close(feats[3], emb)


def test_causality_and_prediction_alignment():
    """Output position i (0 = class token) depends on x_1..x_i only: changing x_j changes positions >= j only."""
    m = _randomize(build_generator("tiny")).eval()
    x, c = _inputs(m.config, B=2)
    base = m(x, c).logits
    for j in (1, 7, 16):  # 1-based token index
        x2 = x.clone()
        x2[:, j - 1] = (x2[:, j - 1] + 1) % m.config.codebook_size
        d = (m(x2, c).logits - base).abs().amax(dim=(0, 2))
        assert torch.all(d[:j] == 0), f"x_{j} leaked into earlier positions"
        if j < m.config.seq_len:
            assert d[j] > 0
    c2 = (c + 1) % m.config.num_classes
    assert (m(x, c2).logits - base).abs().amax(dim=(0, 2)).min() > 0  # the class reaches every position


def test_prefix_forward_matches_full_forward_on_its_positions():
    m = _randomize(build_generator("tiny")).eval()
    x, c = _inputs(m.config)
    full = m.full_logits(x, c)
    for L in (1, 5, 15):
        _assert_close(m(x[:, :L], c).logits, full[:, :L])
        _assert_close(m.next_token_logits(x[:, :L], c), full[:, L])


def test_bad_inputs():
    m = build_generator("tiny")
    K, Mc = m.config.codebook_size, m.config.num_classes
    x, c = _inputs(m.config)
    with pytest.raises(ValueError, match=rf"token ids must be in \[0, {K}\].*\[-1, "):
        m(torch.where(x == x[0, 0], -1, x), c)
    with pytest.raises(ValueError, match=rf"\[0, {K + 1}\]"):
        m(torch.full_like(x, K + 1).index_fill_(1, torch.tensor([0]), 0), c)
    m(torch.full_like(x, K), c)  # K = the mask token is a valid input id
    m(x, torch.full_like(c, Mc))  # the null class is a valid label
    with pytest.raises(ValueError, match=rf"class labels must be in \[0, {Mc}\].*\[0, {Mc + 1}\]"):
        m(x, torch.tensor([0, 1, Mc + 1]))
    with pytest.raises(ValueError, match="class labels"):
        m(x, torch.tensor([-2, 1, 1]))
    with pytest.raises(ValueError, match="at most 16"):
        m(torch.zeros(3, 17, dtype=torch.long), c)
    with pytest.raises(ValueError, match="integer"):
        m(x.float(), c)
    with pytest.raises(ValueError, match=r"classes must be \[B\]"):
        m(x, c[:2])
    with pytest.raises(ValueError, match="out of range"):
        m.forward_features(x, c, [4])


def test_training_mode_uses_is_causal_sdpa_without_a_mask(monkeypatch):
    calls = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kw):
        calls.append((attn_mask is None, is_causal, dropout_p))
        return real(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, **kw)

    monkeypatch.setattr(M.F, "scaled_dot_product_attention", spy)
    m = _randomize(build_generator("tiny")).train()
    x, c = _inputs(m.config)
    out = m(x, c, align=True)
    assert calls and all(cl == (True, True, 0.1) for cl in calls)
    # dropout is active in training and off in eval
    assert not torch.equal(out.logits, m(x, c, align=True).logits)
    m.eval()
    assert torch.equal(m(x, c).logits, m(x, c).logits)
    # gradients reach every parameter
    m.train()
    out = m(x, c, align=True)
    (F.cross_entropy(out.logits.flatten(0, 1), x.flatten()) + out.encode_z.square().mean()
     + out.decode_z.square().mean()).backward()
    for name, p in m.named_parameters():
        if name.startswith("decode_align_mlp") or name.startswith("encode_align_mlp") or "blocks" in name:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert m.embeddings.weight.grad.abs().sum() > 0


def test_bf16_autocast_forward():
    m = _randomize(build_generator("tiny")).eval()
    x, c = _inputs(m.config)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x, c, align=True)
    assert out.logits.dtype == torch.float32  # the head always runs in float32
    ref = m(x, c).logits
    assert (out.logits - ref).abs().max() < 0.05 * ref.abs().max()


# ---- tied codebook --------------------------------------------------------------------------------------------------
def test_tied_codebook_model():
    m = build_generator("tiny", tied_codebook=True)
    cfg = m.config
    names = dict(m.named_parameters())
    assert "lm_head.weight" not in names and names["lm_head.proj.weight"].shape == (cfg.z_dim, cfg.hidden)
    assert names["codebook_in.weight"].shape == (cfg.hidden, cfg.z_dim) and "codebook" in dict(m.named_buffers())
    x, c = _inputs(cfg)
    with pytest.raises(RuntimeError, match="set_codebook"):
        m(x, c)
    with pytest.raises(ValueError, match=r"\[32, 16\]"):
        m.set_codebook(torch.randn(32, 8))
    with pytest.raises(ValueError, match="only for tied"):
        build_generator("tiny").set_codebook(torch.randn(32, 16))
    g = torch.Generator().manual_seed(0)
    cb = torch.randn(cfg.codebook_size, cfg.z_dim, generator=g) * 7.0
    m.set_codebook(cb)
    _randomize(m)  # also overwrites nothing in buffers: the codebook stays
    assert torch.allclose(m.codebook.pow(2).mean(), torch.tensor(1.0))  # unit-RMS rescale
    m.eval()
    out = m(x, c)
    # output = proj(h) @ E^T + bias, input embedding = codebook_in(E[x]); check the head by hand
    h = m.forward_features(x, c, [cfg.depth - 1])[cfg.depth - 1]
    with torch.no_grad():
        hh = m.adaln_before_head(h[:, 1:-1], m._embed(x, c)[1][:, 1:-1])
        manual = m.lm_head.proj(hh) @ m.codebook.t() + m.lm_head.bias
    _assert_close(out.logits, manual)
    # the codebook is an input: permuting two codes changes the outputs; it is not trained
    cb2 = cb.clone()
    cb2[[0, 1]] = cb2[[1, 0]]
    m.set_codebook(cb2)
    assert not torch.allclose(m(x, c).logits, out.logits)
    assert "codebook" not in names
    # saving/loading carries the codebook
    m3 = load_official_state_dict(m.state_dict(), m.config)
    _assert_close(m3(x, c).logits, m(x, c).logits)


def _tied(mode, codebook_seed=0, **overrides):
    m = build_generator("tiny", tied_codebook=mode, **overrides)
    g = torch.Generator().manual_seed(codebook_seed)
    m.set_codebook(torch.randn(m.config.codebook_size, m.config.z_dim, generator=g))
    return m


@torch.no_grad()
def test_projected_tied_logits_are_not_rank_limited_by_the_code_dimension():
    """Logits over 128 positions of a K = 32 model with a 4-d codebook: through the codebook itself they span at
    most z + 1 = 5 dimensions; through the lifted codebook they span far more, both fresh and trained-like."""
    shapes = dict(z_dim=4, codebook_size=32, hidden=64)
    x, c = _inputs(get_config("tiny", **shapes), B=8, seed=1)

    def rank(m):
        logits = m.eval().full_logits(x, c).reshape(-1, 32)
        assert logits.shape[0] == 8 * 17
        return int(torch.linalg.matrix_rank(logits.double(), rtol=1e-6))

    assert rank(_tied(True, **shapes)) <= 4                               # fresh: bias 0, so <= z
    assert rank(_randomize(_tied(True, **shapes), seed=2)) <= 5             # + the bias
    fresh = _tied("projected", **shapes)
    assert fresh.config.tied_dim == 256 and rank(fresh) > 16
    assert rank(_randomize(_tied("projected", **shapes), seed=2, std=0.3)) > 16
    # the code table itself: K unit vectors spanning more than z dimensions
    table = fresh._code_table(fresh.codebook)
    assert table.shape == (32, 256) and torch.allclose(table.norm(dim=1), torch.ones(32))
    assert int(torch.linalg.matrix_rank(table.double(), rtol=1e-6)) > 16


def test_projected_tied_model_layout_head_and_round_trip(tmp_path):
    m = build_generator("tiny", tied_codebook="projected")
    cfg = m.config
    D = cfg.tied_dim
    assert cfg.tied_mode == "projected" and D == max(256, cfg.z_dim)
    names = dict(m.named_parameters())
    assert "lm_head.weight" not in names and names["lm_head.proj.weight"].shape == (D, cfg.hidden)
    assert names["codebook_in.weight"].shape == (cfg.hidden, D)
    assert names["code_lift.fc1.weight"].shape == (D, cfg.z_dim) and names["code_lift.fc2.weight"].shape == (D, D)
    # fc1 starts at unit-variance pre-activations (std 1/sqrt(z)), unlike the 0.02 of other layers
    assert 0.7 < names["code_lift.fc1.weight"].std().item() * cfg.z_dim ** 0.5 < 1.3
    assert "codebook" in dict(m.named_buffers()) and "codebook" not in names
    x, c = _inputs(cfg)
    with pytest.raises(RuntimeError, match="set_codebook"):
        m(x, c)
    m.set_codebook(torch.randn(cfg.codebook_size, cfg.z_dim) * 3.0)
    _randomize(m).eval()
    out = m(x, c)
    # by hand: U = normalize(fc2(gelu(fc1(E)))), input codebook_in(U[x]), logits proj(h) @ U^T + bias
    with torch.no_grad():
        lift = m.code_lift
        U = F.normalize(lift.fc2(F.gelu(lift.fc1(m.codebook))), dim=-1)
        _assert_close(m._embed_tokens(x), m.codebook_in(U[x]))
        h = m.forward_features(x, c, [cfg.depth - 1])[cfg.depth - 1]
        hh = m.adaln_before_head(h[:, 1:-1], m._embed(x, c)[1][:, 1:-1])
        _assert_close(out.logits, m.lm_head.proj(hh) @ U.t() + m.lm_head.bias)
    # the codebook is an input of the lift: swapping two codes changes the outputs
    cb2 = m.codebook.clone()
    cb2[[0, 1]] = cb2[[1, 0]]
    m2 = load_official_state_dict({**m.state_dict(), "codebook": cb2}, cfg)
    assert not torch.allclose(m2(x, c).logits, out.logits)
    # state dict round trip through a file, strict names and shapes
    path = tmp_path / "tied.pt"
    torch.save(m.state_dict(), path)
    m3 = load_official_state_dict(path, cfg)
    assert m3.state_dict().keys() == m.state_dict().keys()
    _assert_close(m3(x, c).logits, out.logits, rtol=0, atol=0)
    # a "codebook" state dict does not load into a "projected" model: the mismatch is named
    with pytest.raises(StateDictMismatchError, match="code_lift"):
        load_official_state_dict(_tied(True).state_dict(), cfg)


@torch.no_grad()
def test_projected_tied_kv_cache_equals_recomputation():
    m = _randomize(_tied("projected", seq_len=8), seed=5).eval()
    x, c = _inputs(m.config, B=2, seed=3)
    cache = m.new_kv_cache(2)
    logits = [m.prefill(x[:, :0], c, cache)]
    for t in range(1, m.config.seq_len):
        logits.append(m.decode_step(x[:, t - 1], torch.tensor([t + 1]), c, cache))
    ref = torch.stack([m.next_token_logits(x[:, :L], c) for L in range(m.config.seq_len)], 1)
    _assert_close(torch.stack(logits, 1), ref, rtol=1e-5, atol=1e-5)


def test_tied_codebook_values_and_unchanged_untied_configs():
    assert get_config("tiny", tied_codebook="codebook").tied_codebook is True   # one spelling, one hash
    assert get_config("tiny", tied_codebook="codebook") == get_config("tiny", tied_codebook=True)
    assert get_config("tiny").tied_mode is None and get_config("tiny").tied_dim is None
    assert get_config("tiny", tied_codebook=True).tied_dim == 16
    assert get_config("tiny", tied_codebook="projected", z_dim=512).tied_dim == 512
    for bad in ("tied", 1, None):
        with pytest.raises(ValueError, match="tied_codebook must be one of"):
            get_config("tiny", tied_codebook=bad)
    # the option adds no field: configs written before it keep their dict (and the cache keys built from it)
    keys = {"hidden", "depth", "heads", "codebook_size", "num_classes", "seq_len", "mlp_ratio", "dropout",
            "attn_dropout", "dropout_kernel", "block_kernels", "encode_align_layer", "decode_align_layer",
            "align_head", "projector_dim", "z_dim", "tied_codebook", "pos_extra", "time_extra"}
    for cfg in PRESETS.values():
        assert set(cfg.to_dict()) == keys and cfg.to_dict()["tied_codebook"] is False
    assert sorted(dict(build_generator("tiny").named_parameters())) == sorted(
        dict(build_generator("tiny", tied_codebook=False).named_parameters()))
    assert not any(k.startswith(("code_lift", "codebook")) for k in build_generator("tiny").state_dict())


# ---- counts and FLOPs -----------------------------------------------------------------------------------------------
def test_flops_formula_matches_a_flop_counter():
    """Our closed form equals torch's FlopCounterMode on a real forward for every matmul; the causal-attention
    term (which the counter does not see for the CPU SDPA kernel, and counts as a full square on GPU) is the
    closed form depth x 4 x C x S(S+1)/2 per image."""
    for overrides in ({}, {"encode_align_layer": None, "align_head": "gelu2"}, {"tied_codebook": True},
                      {"tied_codebook": "projected"}):
        m = build_generator("tiny", **overrides).eval()
        cfg = m.config
        if cfg.tied_codebook:
            m.set_codebook(torch.randn(cfg.codebook_size, cfg.z_dim))
        B = 2
        x, c = _inputs(cfg, B=B)
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            m(x, c, align=True)
        counts = fc.get_flop_counts()["Global"]
        matmul = sum(v for k, v in counts.items() if "attention" not in str(k))
        S, N = cfg.seq_len + 2, cfg.seq_len
        attn = cfg.depth * 4 * cfg.hidden * S * (S + 1) / 2
        # the "projected" head lifts the K codes once per pass, not per token (see the docstring)
        lift = 0
        if cfg.tied_mode == "projected":
            lift = 2 * cfg.codebook_size * (cfg.z_dim * cfg.tied_dim + cfg.tied_dim ** 2)
        want = (estimate_flops_per_token(cfg, training=False) * N - attn) * B + lift
        assert abs(matmul - want) / want < 1e-9, (overrides, matmul, want)
        # without the heads the estimate drops by exactly their matmuls
        no_heads = estimate_flops_per_token(cfg, training=False, align=False) * N - attn
        head_flops = sum(v for k, v in fc.get_flop_counts().items() if k.endswith("_align_mlp")
                         for v in v.values())
        assert abs((want - lift - no_heads * B) - head_flops) < 1e-6 * want
    assert estimate_flops_per_token("tiny") == 3 * estimate_flops_per_token("tiny", training=False)


# ---- KV cache ---------------------------------------------------------------------------------------------------
@torch.no_grad()
def test_kv_cache_equals_recomputation_with_cfg_rows():
    """Doubled CFG batch (cond rows + null rows), random weights, a few window sizes: each cached step's logits
    equal recomputing the prefix; the cache is written in place (same storage throughout)."""
    m = _randomize(build_generator("tiny", seq_len=12), seed=3).eval()
    cfg = m.config
    x, c = _inputs(cfg, B=2, seed=1)
    rows_x, rows_c = torch.cat([x, x]), torch.cat([c, torch.full_like(c, m.null_class)])
    cache = m.new_kv_cache(4)
    ptrs = [t.data_ptr() for t in cache.k + cache.v]
    logits = [m.prefill(rows_x[:, :0], rows_c, cache)]
    for t in range(1, cfg.seq_len):
        kv_len = [8, 8, 13][min(2, (t + 1) // 8)] if t + 2 <= 8 else 13
        logits.append(m.decode_step(rows_x[:, t - 1], torch.tensor([t + 1]), rows_c, cache, kv_len=kv_len))
    ref = torch.stack([m.next_token_logits(rows_x[:, :L], rows_c) for L in range(cfg.seq_len)], 1)
    _assert_close(torch.stack(logits, 1), ref, rtol=1e-5, atol=1e-5)
    assert ptrs == [t.data_ptr() for t in cache.k + cache.v]
    assert cache.max_len == cfg.seq_len + 1 and cache.nbytes() == 2 * cfg.depth * 4 * cfg.hidden * 13 * 4
    with pytest.raises(ValueError, match="cache is"):
        m.prefill(x[:, :0], c, cache)  # 2 rows into a 4-row cache


@torch.no_grad()
def test_kv_cache_under_bf16_autocast_is_close():
    m = _randomize(build_generator("tiny"), seed=4).eval()
    x, c = _inputs(m.config, B=2)
    ref = m.next_token_logits(x[:, :3], c)
    cache = m.new_kv_cache(2, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        m.prefill(x[:, :0], c, cache)
        for t in range(1, 4):
            out = m.decode_step(x[:, t - 1], torch.tensor([t + 1]), c, cache)
    assert out.dtype == torch.float32 and (out - ref).abs().max() < 0.05 * ref.abs().max()


def test_state_dict_round_trip_and_errors(tmp_path):
    m = _randomize(build_generator("tiny", decode_align_layer=1)).eval()
    path = tmp_path / "m.pt"
    torch.save(m.state_dict(), path)
    m2 = load_official_state_dict(path, m.config)
    x, c = _inputs(m.config)
    _assert_close(m2(x, c, align=True).decode_z, m(x, c, align=True).decode_z)
    with pytest.raises(StateDictMismatchError, match="decode_align_layer="):
        M.infer_config_from_state_dict({k: v for k, v in m.state_dict().items()}, hidden=64, depth=4, projector_dim=64)
    no_heads = {k: v for k, v in m.state_dict().items() if "align_mlp" not in k}
    cfg = M.infer_config_from_state_dict(no_heads)
    assert cfg.encode_align_layer is None and cfg.decode_align_layer is None
    with pytest.raises(StateDictMismatchError, match="missing keys"):
        load_official_state_dict(no_heads, "tiny")


def test_single_query_attention_equals_masked_sdpa():
    """The compiled decode step's attention (two float32 reductions) is SDPA with the window mask."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 2, n, 8, generator=g) for n in (1, 10, 10))
    mask = (torch.arange(10) <= 6).view(1, 1, 1, 10)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    out = _single_query_attention(q, k, v, mask)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    # positions beyond the mask do not matter
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 7:] += 100.0
    v2[:, :, 7:] -= 50.0
    torch.testing.assert_close(_single_query_attention(q, k2, v2, mask), out)


# ---- authors'-layout state dicts: damaged files, damaged dicts, where the decode block came from -----------------
def _tiny_official_sd():
    return {k: v.clone() for k, v in _randomize(build_generator("tiny")).state_dict().items()}


def test_damaged_state_dict_files_are_named_with_what_to_do(tmp_path):
    good = tmp_path / "good.pt"
    torch.save(_tiny_official_sd(), good)
    data = good.read_bytes()
    g = torch.Generator().manual_seed(0)
    for name, content in (("empty.pt", b""), ("truncated.pt", data[:len(data) // 2]),
                          ("random.pt", bytes(torch.randint(0, 256, (4096,), generator=g).tolist()))):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(UnreadableFileError, match=rf"{name}[\s\S]*(download|copy)"):
            load_official_state_dict(tmp_path / name, "tiny")
        with pytest.raises(UnreadableFileError, match=name):
            M.read_state_dict(tmp_path / name)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        M.read_state_dict(tmp_path / "missing.pt")
    sd = _tiny_official_sd()
    sd["blocks.2.attn.proj.weight"][0, 0] = float("nan")
    torch.save(sd, tmp_path / "nan.pt")
    with pytest.raises(ValueError, match=r"nan\.pt[\s\S]*non-finite[\s\S]*blocks\.2\.attn\.proj\.weight"):
        load_official_state_dict(tmp_path / "nan.pt", "tiny")


def _first_named(msg: str, key: str) -> bool:
    """``key`` is named in ``msg`` before any advice to pass decode_align_layer=."""
    return key in msg and ("decode_align_layer=" not in msg or msg.index(key) < msg.index("decode_align_layer="))


@pytest.mark.parametrize("damage,key", [
    ("lm_head_rows", "lm_head.weight"),
    ("lm_head_width", "lm_head.weight"),
    ("embedding_rows", "embeddings.weight"),
    ("middle_block", "blocks.1."),
    ("last_block", "blocks.3."),
    ("one_block_tensor", "blocks.2.mlp.fc1.weight"),
])
def test_a_damaged_state_dict_names_the_offending_key_first(damage, key):
    sd = _tiny_official_sd()
    if damage == "lm_head_rows":
        sd["lm_head.weight"] = sd["lm_head.weight"][:-1]
    elif damage == "lm_head_width":
        sd["lm_head.weight"] = sd["lm_head.weight"][:, :-1]
    elif damage == "embedding_rows":
        sd["embeddings.weight"] = sd["embeddings.weight"][:-1]
    elif damage in ("middle_block", "last_block"):
        sd = {k: v for k, v in sd.items() if not k.startswith(key)}
    else:
        del sd[key]
    with pytest.raises(StateDictMismatchError) as err:
        M.infer_config_from_state_dict(sd)
    assert _first_named(str(err.value), key), str(err.value)


def test_the_decode_block_taken_from_a_preset_is_announced_and_recorded():
    sd = _tiny_official_sd()
    with pytest.warns(UserWarning, match=r"decode_align_layer=2[\s\S]*preset 'tiny'"):
        cfg = M.infer_config_from_state_dict(sd)
    assert cfg.decode_align_layer == 2 and cfg.decode_align_layer_source == "preset 'tiny'"
    with pytest.warns(UserWarning, match="preset 'tiny'"):
        model = load_official_state_dict(sd)
    assert model.config.decode_align_layer_source == "preset 'tiny'"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        given = M.infer_config_from_state_dict(sd, decode_align_layer=1)
        no_head = M.infer_config_from_state_dict({k: v for k, v in sd.items() if "decode_align" not in k})
    assert given.decode_align_layer == 1 and given.decode_align_layer_source == "argument"
    assert no_head.decode_align_layer is None and no_head.decode_align_layer_source is None
    assert get_config("tiny").decode_align_layer_source is None  # a config built directly names no source
