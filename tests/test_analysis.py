"""Protocol invariants of rearlib.analysis (the paper's diagnosis experiments A-D) on tiny random models.

Models: PRESETS["tiny"] (16 tokens, K = 32) with random weights; tokenizer: a tiny random VQTokenizer (16 px,
4x4 grid, K = 32). Numbers are meaningless; only the protocols' definitions are checked.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

import rearlib.analysis as A
import rearlib.metrics as M
from rearlib.model import build_generator
from rearlib.tokenizers.vqgan import VQConfig, VQTokenizer

N, K = 16, 32


def _randomize(model, std=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model.eval()


@pytest.fixture(scope="module")
def tok():
    torch.manual_seed(0)
    return VQTokenizer(VQConfig(resolution=16, base_channels=8, channel_mult=(1, 2, 2), num_res_blocks=1,
                                codebook_size=K, code_dim=16, norm_groups=4)).eval()


@pytest.fixture(scope="module")
def model():
    return _randomize(build_generator("tiny"))


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, K, (4, N), generator=g)
    labels = torch.tensor([0, 3, 7, 9])
    return tokens, labels


@pytest.fixture(scope="module")
def clf():
    from rearlib.metrics.classifier import Classifier

    torch.manual_seed(0)
    return Classifier(widths=(8, 16), resolution=16).eval()


pytestmark = pytest.mark.usefixtures("one_torch_thread")


FAST = dict(metrics=(), progress=False)  # protocol checks that need no image metrics


# ---------------------------------------------------------------------------------------------------------------
# Experiment A
# ---------------------------------------------------------------------------------------------------------------
def test_perfect_and_imperfect_keep_exactly_the_forced_positions(model, tok, data):
    tokens, labels = data
    ratios = (0.25, 0.5, 0.75)
    df, out = A.exposure_bias(model, tok, tokens, labels, ratios=ratios, generator=3, return_outputs=True,
                              batch_size=5, **FAST)
    assert len(df) == 2 * len(ratios) * len(tokens)
    gt = tokens[df["image_id"].tolist()]
    xh, forced = out["tokens"], out["forced"]
    for row, rec in df.iterrows():
        k = math.floor(rec["ratio"] * N)
        assert rec["n_forced"] == k and int(forced[row].sum()) == k
        assert torch.equal(xh[row][forced[row]], gt[row][forced[row]])
        if rec["protocol"] == "perfect":
            assert forced[row, :k].all() and not forced[row, k:].any()
            assert rec["first_error"] >= k
        assert rec["ctr"] == pytest.approx(float((xh[row] == gt[row]).double().mean()))
    # The imperfect subsets are random, not front-loaded (P(all 12 rows are a prefix) is negligible).
    imp = (df["protocol"] == "imperfect").to_numpy()
    prefix = [bool(forced[i, :int(forced[i].sum())].all()) for i in np.nonzero(imp)[0]]
    assert not all(prefix)


def test_free_positions_are_model_draws_given_the_mixed_prefix(model, tok, data):
    """With argmax decoding every non-forced token is the argmax of the model given x̂_<t (teacher forcing on x̂)."""
    tokens, labels = data
    df, out = A.exposure_bias(model, tok, tokens, labels, ratios=(0.5,), protocols=("imperfect",),
                              sampling="argmax", generator=0, return_outputs=True, **FAST)
    xh, forced = out["tokens"], out["forced"]
    with torch.no_grad():
        logits = model(xh, labels).logits
    free = ~forced
    assert torch.equal(logits.argmax(-1)[free], xh[free])
    # Perplexities are those of x̂ and of x under the evaluated prefix (docs/paper.md, reAR §6 item 5), as
    # metrics defines them.
    pp = M.context_perplexities(logits, xh, tokens)
    np.testing.assert_allclose(df["ppl"], pp["evaluated"].numpy(), rtol=1e-4)
    np.testing.assert_allclose(df["ppl_gt"], pp["ground_truth"].numpy(), rtol=1e-4)


def test_ratio_one_is_the_ground_truth_and_zero_error(model, tok, data, clf):
    tokens, labels = data
    imgs = tok.decode(tokens)  # "real" images = reconstructions, so the real-image metrics are exact too
    df = A.exposure_bias(model, tok, tokens, labels, images=imgs, ratios=(1.0,), perceptual="dfd", classifier=clf,
                         generator=0, progress=False)
    assert (df["ctr"] == 1.0).all() and (df["first_error"] == N).all() and df["ctr_free"].isna().all()
    for ref in ("", "_recon"):
        assert np.isinf(df["psnr" + ref]).all()
        np.testing.assert_allclose(df["ssim" + ref], 1.0)
        np.testing.assert_allclose(df["perceptual" + ref], 0.0, atol=1e-9)
    assert (df["perceptual_metric"] == M.DFD_NAME).all()
    np.testing.assert_allclose(df["ppl"], df["ppl_gt"])


def test_cached_and_recomputed_decoding_agree_and_cfg_runs(model, tok, data):
    tokens, labels = data
    for cfg in (None, 2.5):
        a = A.exposure_bias(model, tok, tokens, labels, ratios=(0.3,), generator=5, cfg_scale=cfg, **FAST)
        b = A.exposure_bias(model, tok, tokens, labels, ratios=(0.3,), generator=5, cfg_scale=cfg, use_cache=False,
                            **FAST)
        pd.testing.assert_series_equal(a["ctr"], b["ctr"])
        np.testing.assert_allclose(a["ppl"], b["ppl"], rtol=1e-4)


def test_greedy_unforced_decoding_matches_the_sampler(model, data):
    """Cross-check with rearlib.sample: no forced positions + argmax = greedy sampling (with and without CFG)."""
    from rearlib.sample import generate

    tokens, labels = data
    none = torch.zeros(len(tokens), N, dtype=torch.bool)
    for cfg in (None, 3.0):
        xh, _, _ = A.forced_decode(model, tokens, none, labels, sampling="argmax", cfg_scale=cfg, cfg_power=0.0)
        ref = generate(model, labels, cfg_scale=cfg, temperature=0.0, fast=False)
        assert torch.equal(xh, ref)


def test_multinomial_draws_follow_the_model_distribution(model):
    """The inverse-CDF draw is an exact multinomial: empirical frequencies match softmax(logits / T)."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, K, generator=g) * 2
    R = 20000
    u = 1.0 - torch.rand(R, generator=g, dtype=torch.float64)
    ids = A._pick(logits.expand(R, K), u, "multinomial", 1.0)
    freq = torch.bincount(ids, minlength=K).double() / R
    p = torch.softmax(logits[0].double(), -1)
    assert float((freq - p).abs().max()) < 4 * math.sqrt(float(p.max()) / R)


def test_determinism_and_batch_independence(model, tok, data):
    tokens, labels = data
    kw = dict(ratios=(0.2, 0.6), **FAST)
    a = A.exposure_bias(model, tok, tokens, labels, generator=torch.Generator().manual_seed(11), batch_size=64, **kw)
    b = A.exposure_bias(model, tok, tokens, labels, generator=torch.Generator().manual_seed(11), batch_size=3, **kw)
    c = A.exposure_bias(model, tok, tokens, labels, generator=torch.Generator().manual_seed(12), **kw)
    pd.testing.assert_frame_equal(a.drop(columns="ppl"), b.drop(columns="ppl"))
    np.testing.assert_allclose(a["ppl"], b["ppl"], rtol=1e-5)
    assert not a["ppl"].equals(c["ppl"])
    # Common random numbers: at r = 0 both protocols are the same free-running draw.
    z = A.exposure_bias(model, tok, tokens, labels, ratios=(0.0,), generator=4, **FAST)
    pd.testing.assert_series_equal(z[z.protocol == "perfect"]["ctr"].reset_index(drop=True),
                                   z[z.protocol == "imperfect"]["ctr"].reset_index(drop=True))


# ---------------------------------------------------------------------------------------------------------------
# Experiment B
# ---------------------------------------------------------------------------------------------------------------
def test_codebook_neighbours_match_brute_force_and_tokenizer(tok):
    nb = A.codebook_neighbours(tok)
    z = torch.nn.functional.normalize(tok.codebook.double(), dim=1)
    sim = z @ z.T
    for k in range(K):
        others = [j for j in range(K) if j != k]
        s = sim[k, others]
        assert others[int(s.argmax())] == int(nb["nearest"][k])
        assert others[int(s.argmin())] == int(nb["farthest"][k])
    assert torch.equal(nb["nearest"], tok.nearest_codes(1)[:, 0])
    assert (nb["nearest"] != torch.arange(K)).all() and (nb["farthest"] != torch.arange(K)).all()


def test_replacement_keeps_ctr_and_uses_true_token_neighbours(model, tok, data, clf):
    tokens, labels = data
    df, out = A.embedding_replacement(model, tok, tokens, labels, r_primes=(0.0, 0.5, 1.0), generator=2,
                                      perceptual="dfd", classifier=clf, metrics=("psnr", "perceptual"),
                                      return_outputs=True, batch_size=10, progress=False)
    assert len(df) == 3 * 3 * len(tokens)
    pred = A.teacher_forced_predictions(model, tokens, labels)
    ctr_tf = (pred == tokens).double().mean(1)
    nb = A.codebook_neighbours(tok)
    for row, rec in df.iterrows():
        i = rec["image_id"]
        seq, gt, p = out["tokens"][row], tokens[i], pred[i]
        assert rec["ctr"] == pytest.approx(float(ctr_tf[i]))
        wrong = p != gt
        changed = seq != p
        assert not (changed & ~wrong).any()                      # only wrong positions are touched
        assert (seq[changed] != gt[changed]).all()
        if rec["mode"] in ("nearest", "farthest"):
            table = nb[rec["mode"]]
            assert torch.equal(seq[changed], table[gt[changed]])
            if rec["r_prime"] == 1.0:                            # every wrong position replaced
                assert torch.equal(seq[wrong], table[gt[wrong]])
        if rec["r_prime"] == 1.0:
            assert rec["n_replaced"] == rec["n_wrong"] == int(wrong.sum())
        if rec["r_prime"] == 0.0:
            assert torch.equal(seq, p) and rec["ppl_delta"] == 0.0 and rec["n_replaced"] == 0
        assert rec["n_changed"] == int(changed.sum())
    # Nested selections: the same positions for every mode at a given r'.
    for r in (0.5, 1.0):
        n = df[df.r_prime == r].pivot(index="image_id", columns="mode", values="n_replaced")
        assert (n.nunique(axis=1) == 1).all()
    assert (df["perceptual_metric"] == M.DFD_NAME).all() and "psnr" not in df  # no real images given
    assert df["psnr_recon"].notna().all() and df["ssim_recon"].isna().all()
    # Farthest codes are less similar to the truth than nearest ones (at equal positions and CTR).
    full = df[df.r_prime == 1.0].groupby("mode")["emb_sim_wrong"].mean()
    assert full["farthest"] < full["random"] < full["nearest"]
    assert (df[df.r_prime == 1.0].set_index(["image_id", "mode"])["emb_sim_all"].unstack()
            .pipe(lambda t: (t["farthest"] <= t["nearest"]).all()))


def test_replacement_raises_if_ctr_would_change(model, tok, data, monkeypatch):
    tokens, labels = data
    ident = torch.arange(K)
    monkeypatch.setattr(A, "codebook_neighbours", lambda cb: {"nearest": ident, "farthest": ident})
    with pytest.raises(RuntimeError, match="changed the CTR"):
        A.embedding_replacement(model, tok, tokens, labels, r_primes=(1.0,), modes=("nearest",), **FAST)


def test_replacement_is_deterministic(model, tok, data):
    tokens, labels = data
    kw = dict(r_primes=(0.4,), modes=("random", "nearest"), **FAST)
    a = A.embedding_replacement(model, tok, tokens, labels, generator=7, **kw)
    b = A.embedding_replacement(model, tok, tokens, labels, generator=7, batch_size=2, **kw)
    pd.testing.assert_frame_equal(a.drop(columns=[c for c in a if c.startswith("ppl")]),
                                  b.drop(columns=[c for c in b if c.startswith("ppl")]))
    assert list(a["r_prime"].unique()) == [0.4]  # r' = 0 computed as the baseline but not returned


# ---------------------------------------------------------------------------------------------------------------
# Experiment C
# ---------------------------------------------------------------------------------------------------------------
def test_perturb_context_noise_rate():
    g = torch.Generator().manual_seed(0)
    t = torch.randint(0, K, (50, N), generator=g)
    noisy, rep = A.perturb_context(t, 0.2, K, [torch.Generator().manual_seed(i) for i in range(50)])
    n = round(0.2 * (N - 1))
    assert (rep.sum(1) == n).all() and not rep[:, -1].any()
    assert torch.equal(noisy != t, rep)                           # every chosen token really changed
    assert torch.equal(noisy[~rep], t[~rep])


def test_robustness_rows(model, data):
    tokens, labels = data
    df = A.robustness(model, tokens, labels, noise_fraction=0.2, repeats=2, generator=1, progress=False)
    assert len(df) == len(tokens) * 3
    clean = df[df.condition == "clean"].sort_values("image_id")
    pred = A.teacher_forced_predictions(model, tokens, labels)
    np.testing.assert_allclose(clean["ctr"], (pred == tokens).double().mean(1).numpy())
    noisy = df[df.condition == "noisy"]
    assert (noisy["n_replaced"] == round(0.2 * (N - 1))).all()
    np.testing.assert_allclose(noisy["noise_rate"], round(0.2 * (N - 1)) / (N - 1))
    assert (clean["n_replaced"] == 0).all() and clean["ctr_after_noisy"].isna().all()
    again = A.robustness(model, tokens, labels, noise_fraction=0.2, repeats=2, generator=1, progress=False)
    pd.testing.assert_frame_equal(df, again)


# ---------------------------------------------------------------------------------------------------------------
# Experiment D
# ---------------------------------------------------------------------------------------------------------------
def test_streaming_cka_equals_metrics():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(300, 12, generator=g) + 5.0
    Y = X[:, :6] @ torch.randn(6, 9, generator=g) + 0.5 * torch.randn(300, 9, generator=g)
    acc = A.StreamingLinearCKA()
    for s in range(0, 300, 37):
        acc.update(X[s:s + 37], Y[s:s + 37])
    assert acc.value() == pytest.approx(M.linear_cka(X, Y), rel=1e-9)
    assert acc.value() == pytest.approx(M.linear_cka_gram(X, Y), rel=1e-9)
    Q, _ = torch.linalg.qr(torch.randn(12, 12, generator=g, dtype=torch.float64))
    assert A.StreamingLinearCKA().update(X, 3 * X.double() @ Q + 1).value() == pytest.approx(1.0, abs=1e-12)


def test_cka_is_one_for_an_isometric_copy_of_the_codebook(tok, data):
    """Tied-codebook model whose (identity, adaLN-Zero) blocks carry s * Q z(x_t): encoded CKA = 1 at every layer."""
    tokens, labels = data
    m = build_generator("tiny", tied_codebook=True).eval()
    m.set_codebook(tok.codebook)
    with torch.no_grad():
        m.pos_embed.zero_()
        m.target_aware_pos_embed.zero_()
        Q, _ = torch.linalg.qr(torch.randn(m.config.hidden, m.config.z_dim, generator=torch.Generator().manual_seed(0)))
        m.codebook_in.weight.copy_(2.0 * Q)
    df = A.cka_layers(m, tok, tokens, labels, progress=False)
    enc = df[df.target == "encoded"]
    np.testing.assert_allclose(enc["cka"], 1.0, atol=1e-9)
    assert (enc["n_rows"] == len(tokens) * N).all()
    dec = df[df.target == "decoded"]
    assert (dec["cka"] < 0.99).all() and (dec["n_rows"] == len(tokens) * (N - 1)).all()
    assert df.groupby("target")["is_peak"].sum().eq(1).all()


def test_cka_rows_match_direct_computation(model, tok, data):
    tokens, labels = data
    df = A.cka_layers(model, tok, tokens, labels, layers=[1, 3], batch_size=3, include_class_position=True,
                      progress=False)
    with torch.no_grad():
        feats = model.forward_features(tokens, labels, [1, 3])
    z = tok.codebook.detach()[tokens]
    for l in (1, 3):
        h = feats[l]
        enc = M.linear_cka(h[:, 2:].reshape(-1, h.shape[-1]), z.reshape(-1, z.shape[-1]))
        Xd = torch.cat([h[:, 2:N + 1].reshape(-1, h.shape[-1]), h[:, 1]])
        Yd = torch.cat([z[:, 1:].reshape(-1, z.shape[-1]), z[:, 0]])
        got = df.set_index(["target", "layer"])["cka"]
        assert got[("encoded", l)] == pytest.approx(enc, rel=1e-6)
        assert got[("decoded", l)] == pytest.approx(M.linear_cka(Xd, Yd), rel=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Helpers and input checks
# ---------------------------------------------------------------------------------------------------------------
def test_mean_ci():
    df = pd.DataFrame({"g": ["a"] * 4 + ["b"] * 2, "v": [1.0, 2.0, 3.0, np.inf, 5.0, 7.0]})
    out = A.mean_ci(df, ["g"], ["v"]).set_index("g")
    from scipy import stats

    assert out.loc["a", "n"] == 3 and out.loc["a", "n_nonfinite"] == 1 and out.loc["a", "mean"] == 2.0
    half = stats.t.ppf(0.975, 2) * 1.0 / math.sqrt(3)
    assert out.loc["a", "ci_high"] == pytest.approx(2.0 + half)
    assert out.loc["b", "ci_low"] == pytest.approx(6.0 - stats.t.ppf(0.975, 1) * math.sqrt(2) / math.sqrt(2))


def test_paper_reference():
    a = A.paper_reference("exposure_bias")
    assert len(a) == 18 and set(a.protocol) == {"perfect", "imperfect"}
    # The paper's claim: at matched CTR the imperfect context is perceptually worse at every point.
    p = a.pivot(index="ratio", columns="protocol", values="perceptual")
    assert (p["imperfect"] > p["perfect"]).all()
    b = A.paper_reference("B")
    assert list(b.r_prime) == list(A.R_PRIMES) and b.perceptual.is_monotonic_decreasing
    c = A.paper_reference("C")
    assert len(c) == 8 and c.ctr.between(0, 1).all()
    d = A.paper_reference("cka")
    assert d[(d.model == "reAR") & (d.target == "decoded")].set_index("layer").cka.idxmax() == 15
    with pytest.raises(ValueError, match="unknown experiment"):
        A.paper_reference("E")


def test_bad_inputs(model, tok, data):
    tokens, labels = data
    with pytest.raises(ValueError, match="ratios"):
        A.exposure_bias(model, tok, tokens, labels, ratios=(1.5,), **FAST)
    with pytest.raises(ValueError, match="labels"):
        A.exposure_bias(model, tok, tokens, labels + 20, **FAST)
    with pytest.raises(ValueError, match="ids must be image codes"):
        A.robustness(model, tokens + K, labels, progress=False)
    with pytest.raises(ValueError, match="protocols"):
        A.exposure_bias(model, tok, tokens, labels, protocols=("front",), **FAST)
    other = VQTokenizer(VQConfig(resolution=16, base_channels=8, channel_mult=(1, 2, 2), num_res_blocks=1,
                                 codebook_size=64, code_dim=16, norm_groups=4))
    with pytest.raises(ValueError, match="codebook_size"):
        A.embedding_replacement(model, other, tokens, labels, **FAST)
    with pytest.raises(TypeError, match="generator"):
        A.robustness(model, tokens, labels, generator="seed", progress=False)


def test_image_data_are_encoded(model, tok, data):
    tokens, labels = data
    imgs = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    df = A.robustness(model, imgs, labels[:2], tokenizer=tok, progress=False)
    direct = A.robustness(model, tok.encode(imgs), labels[:2], progress=False)
    pd.testing.assert_frame_equal(df, direct)
    with pytest.raises(ValueError, match="tokenizer"):
        A.robustness(model, imgs, labels[:2], progress=False)
