"""reAR regularization: noisy-context token perturbation and codebook-embedding alignment losses.

Definitions follow the reAR paper (arXiv 2510.04450, §3.2 Eq. 4-7) and, where paper and released code differ,
the released code (github.com/QY-H00/reAR @ 61cc871), with the paper's variant offered as an option. See
``docs/paper.md``, reAR §1.5-§1.8 and §6, for the sources of every choice below.

Noisy context (paper Eq. 4-5)
    For each sequence b a noise level ``eps_b`` is drawn once; every image token is then independently replaced
    with probability ``eps_b``.  Schedules (``t`` = normalised training progress = optimizer step / total steps):

    ========== ===========================================================
    "none"     eps = 0 (no perturbation, the RNG is not touched)
    "fixed"    eps = c
    "uniform"  eps ~ U(0, c)
    "anneal"   eps ~ U(0, c * f(t)),  f(t) = max(0, 1 - t / t_end)
    ========== ===========================================================

    With ``c = 1`` and ``t_end = 0.75`` "anneal" is the paper's final f(t) = max(0, 1 - 4t/3) and equals the
    code's ``random_ratio`` (linear 1 -> 0 over steps 0..187,500 of 250,000); ``t_end = 1`` gives f(t) = 1 - t.
    Modes: "switch" replaces a chosen position by a uniform random id in [0, K) (it may equal the original id and
    still counts as perturbed, exactly as the code); "mask" replaces it by the mask id K. Labels stay clean.

Codebook-embedding regularization (paper Eq. 6)
    With z(x) the raw tokenizer codebook vector of token x, L2-normalised, and h the projection-head outputs
    (``GeneratorOutput.encode_z`` / ``decode_z``, shape [B, N+2, D] over [CLS, class, x~_1..x~_N]), L2-normalised:

        L_enc = -(1 / (B N)) sum_{b,i} w_{b,i} cos(h^enc_{b, i+1}, z(x_{b,i}))       i = 1..N  (positions 2..N+1)
        L_dec = -(1 / (B N)) sum_{b,i}         cos(h^dec_{b, i},   z(x_{b,i}))       i = 1..N  (positions 1..N)

    i.e. the encode head at the input position of x~_i is pulled towards the CLEAN current token, the decode head at
    the position that predicts x_i (the class position predicts x_1) towards the clean next token. CLS is unused.
    ``w = 1 - perturb_mask`` by default (the code: perturbed inputs do not contribute to the encode term, yet the
    mean still divides by all B*N entries, docs/paper.md, reAR §6 item 20); ``encode_mask_noisy=False`` gives the
    paper's variant (w = 1: "we align the hidden feature of noisy tokens to the embedding of the ground truth token as
    well", §3.2). The loss is -cos in [-1, 1]; the paper's cosine distance 1 - cos has the same gradient.

    Total:  L = CE + lambda * (L_enc + L_dec),   CE = mean over all B*N next-token predictions of the clean tokens.

    Encode-only / decode-only configurations compute ONLY their own term. The released code instead copies the
    other head into the missing slot (DE-only: L = masked-mean(-cos_dec) + mean(-cos_dec), i.e. the decode term
    counted twice, once with the encode mask; EN-only symmetrically); ``official_fallback=True`` reproduces that.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import torch
import torch.nn.functional as F

from rearlib.runtime import config_from_dict

NOISE_SCHEDULES = ("none", "fixed", "uniform", "anneal")
PERTURB_MODES = ("switch", "mask")


@dataclass(frozen=True)
class ReARConfig:
    """Every switch of the reAR objective used in the paper's ablations (Tables 3, 4 and 7).

    Attributes:
        noise: noise-level schedule, one of :data:`NOISE_SCHEDULES` (see the module docstring).
        noise_max: ``c``: the constant (fixed), the upper bound (uniform) or the scale of f(t) (anneal). In [0, 1].
        anneal_end: ``t_end`` of f(t) = max(0, 1 - t / t_end); 0.75 is the paper's final setting, 1.0 gives 1 - t.
        perturb_mode: "switch" (uniform random codebook id, the paper) or "mask" (mask id K, unused in the paper).
        encode_align: enable the encode ("EN") alignment term.
        decode_align: enable the decode ("DE") alignment term.
        encode_layer: 0-based block whose output feeds the encode head; None keeps the model preset's
            ``encode_align_layer``. Forwarded to ``GeneratorConfig.encode_align_layer`` by the training loop.
        decode_layer: same for the decode head ("DE@15" = 15).
        align_weight: lambda in L = CE + lambda (L_enc + L_dec).
        encode_mask_noisy: True (the code): perturbed positions contribute 0 to L_enc; False: the paper's text.
        official_fallback: True reproduces the code's double counting when exactly one head is enabled.
        tied_codebook: Table 4's "+ tied codebook embedding" baseline, forwarded to
            ``GeneratorConfig.tied_codebook`` (constructions in :mod:`rearlib.model`'s docstring): False (none),
            True (or "codebook": logits through the codebook itself, rank <= z_dim + 1; the preset "tied") or
            "projected" (through a learned nonlinear lift of the codebook to >= 256 dimensions; the preset
            "tied_projected").
    """

    noise: str = "none"
    noise_max: float = 1.0
    anneal_end: float = 0.75
    perturb_mode: str = "switch"
    encode_align: bool = False
    decode_align: bool = False
    encode_layer: int | None = None
    decode_layer: int | None = None
    align_weight: float = 1.0
    encode_mask_noisy: bool = True
    official_fallback: bool = False
    tied_codebook: bool | str = False

    def __post_init__(self) -> None:
        if self.noise not in NOISE_SCHEDULES:
            raise ValueError(f"unknown noise schedule {self.noise!r}; allowed: {', '.join(NOISE_SCHEDULES)}")
        if self.perturb_mode not in PERTURB_MODES:
            raise ValueError(f"unknown perturb_mode {self.perturb_mode!r}; allowed: {', '.join(PERTURB_MODES)}")
        if not 0.0 <= self.noise_max <= 1.0:
            raise ValueError(f"noise_max must lie in [0, 1] (it bounds a probability), got {self.noise_max}")
        if not self.anneal_end > 0.0:
            raise ValueError(f"anneal_end must be > 0 (fraction of training at which noise reaches 0), "
                             f"got {self.anneal_end}")
        if self.align_weight < 0:
            raise ValueError(f"align_weight (lambda) must be >= 0, got {self.align_weight}")
        for name in ("encode_layer", "decode_layer"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 0):
                raise ValueError(f"{name} must be None or a 0-based block index >= 0, got {v!r}")
        if not (isinstance(self.tied_codebook, bool) or self.tied_codebook in ("codebook", "projected")):
            raise ValueError(f"tied_codebook must be False, True, 'codebook' or 'projected', "
                             f"got {self.tied_codebook!r}")
        if self.tied_codebook == "codebook":
            # One spelling per setting: a run's hash (its artifact folder) must not depend on the spelling.
            object.__setattr__(self, "tied_codebook", True)

    @property
    def uses_noise(self) -> bool:
        return self.noise != "none"

    @property
    def uses_alignment(self) -> bool:
        return (self.encode_align or self.decode_align) and self.align_weight > 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ReARConfig":
        return config_from_dict(cls, d, "fields")


_FULL_ALIGN = dict(encode_align=True, decode_align=True)
_FINAL_NOISE = dict(noise="anneal", noise_max=1.0, anneal_end=0.75)

#: Named settings. "ar" and "rear" are the paper's baseline and final method; the others are the ablation rows
#: (Table 3: noise schedules on top of EN+DE alignment; Table 4/7: alignment variants; layer indices for the
#: "@k" rows are set with ``get_rear_config("de_only", decode_layer=k)``). Whether Table 4's rows had noise on
#: is not stated (docs/paper.md, reAR §6 item 11); these presets keep the final noise for reAR rows and none
#: for "ar"/"tied"/"tied_projected". "tied" is the rank-limited construction the committed records used;
#: "tied_projected" the one that is not limited by the tokenizer's code dimension (model.py's docstring).
PRESETS: dict[str, ReARConfig] = {
    "ar": ReARConfig(),
    "rear": ReARConfig(**_FINAL_NOISE, **_FULL_ALIGN),
    "rear_paper_encode": ReARConfig(**_FINAL_NOISE, **_FULL_ALIGN, encode_mask_noisy=False),
    # Table 3
    "align_only": ReARConfig(**_FULL_ALIGN),                                       # eps = 0
    "fixed_0.5": ReARConfig(noise="fixed", noise_max=0.5, **_FULL_ALIGN),
    "fixed_0.25": ReARConfig(noise="fixed", noise_max=0.25, **_FULL_ALIGN),
    "uniform_0.5": ReARConfig(noise="uniform", noise_max=0.5, **_FULL_ALIGN),
    "anneal_linear": ReARConfig(noise="anneal", noise_max=1.0, anneal_end=1.0, **_FULL_ALIGN),  # f(t) = 1 - t
    "noise_only": ReARConfig(**_FINAL_NOISE),
    # Table 4 / 7
    "tied": ReARConfig(tied_codebook=True),
    "tied_projected": ReARConfig(tied_codebook="projected"),
    "de_only": ReARConfig(**_FINAL_NOISE, decode_align=True),
    "en_only": ReARConfig(**_FINAL_NOISE, encode_align=True),
}


def get_rear_config(name: str | ReARConfig = "rear", **overrides: Any) -> ReARConfig:
    """A preset by name (or a config) with field overrides, e.g. ``get_rear_config("rear", align_weight=0.5)``."""
    if isinstance(name, ReARConfig):
        base = name
    else:
        if name not in PRESETS:
            raise ValueError(f"unknown reAR preset {name!r}; available: {', '.join(PRESETS)}")
        base = PRESETS[name]
    known = {f.name for f in fields(ReARConfig)}
    bad = set(overrides) - known
    if bad:
        raise ValueError(f"unknown ReARConfig fields {sorted(bad)}; known: {sorted(known)}")
    return replace(base, **overrides)


# ----------------------------------------------------------------------------------------------------------------
# Noisy context
# ----------------------------------------------------------------------------------------------------------------

def noise_bound(cfg: ReARConfig, t: float) -> float:
    """Upper end of the per-sequence noise level at training progress ``t`` in [0, 1].

    "fixed": c (the level itself); "uniform": c; "anneal": c * max(0, 1 - t / t_end); "none": 0.
    A Python float: the schedule is evaluated on the host from the step counter, so it never syncs the device.
    """
    if not (0.0 <= t <= 1.0) or math.isnan(t):
        raise ValueError(f"training progress t must lie in [0, 1], got {t}")
    if cfg.noise == "none":
        return 0.0
    if cfg.noise in ("fixed", "uniform"):
        return float(cfg.noise_max)
    return float(cfg.noise_max) * max(0.0, 1.0 - t / cfg.anneal_end)


def sample_noise_levels(cfg: ReARConfig, batch: int, t: float, *, generator: torch.Generator,
                        device: torch.device | str) -> torch.Tensor:
    """Per-sequence noise levels eps [batch] (float32) for progress ``t``; drawn from ``generator`` on ``device``.

    "fixed" draws nothing; "uniform"/"anneal" draw eps = U(0, 1) * bound as the code does (one uniform per
    sequence, so the stream of random numbers does not depend on the bound).
    """
    bound = noise_bound(cfg, t)
    if cfg.noise in ("none", "fixed"):
        return torch.full((batch,), bound, dtype=torch.float32, device=device)
    return torch.rand(batch, generator=generator, device=device, dtype=torch.float32) * bound


def perturb_tokens(tokens: torch.Tensor, eps: torch.Tensor, *, codebook_size: int, mode: str = "switch",
                   generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy context x~: position (b, i) is perturbed with probability eps[b], independently.

    Args:
        tokens: clean image tokens, LongTensor [B, N] with ids in [0, codebook_size).
        eps: per-sequence perturbation probabilities, [B] in [0, 1].
        codebook_size: K; "switch" draws replacements uniformly from [0, K), "mask" writes id K.
        generator: the torch.Generator (on ``tokens.device``) that drives every random draw.

    Returns:
        (noisy_tokens [B, N] long, perturb_mask [B, N] bool). A "switch" replacement can equal the original token
        (probability 1/K) and is still marked perturbed, as in the released code. No host synchronisation.
    """
    if tokens.dim() != 2:
        raise ValueError(f"tokens must be [B, N], got shape {tuple(tokens.shape)}")
    if eps.shape != tokens.shape[:1]:
        raise ValueError(f"eps must have shape [B]={tokens.shape[0]}, got {tuple(eps.shape)}")
    if mode not in PERTURB_MODES:
        raise ValueError(f"unknown perturb mode {mode!r}; allowed: {', '.join(PERTURB_MODES)}")
    b, n = tokens.shape
    u = torch.rand(b, n, generator=generator, device=tokens.device, dtype=torch.float32)
    mask = u < eps.to(torch.float32).unsqueeze(1)
    if mode == "switch":
        # Drawn for every position (not only the masked ones) so the work is shape-static: no sync, no nonzero().
        repl = torch.randint(0, codebook_size, (b, n), generator=generator, device=tokens.device,
                             dtype=tokens.dtype)
    else:
        repl = torch.full_like(tokens, codebook_size)
    return torch.where(mask, repl, tokens), mask


def make_noisy_context(cfg: ReARConfig, tokens: torch.Tensor, t: float, *, codebook_size: int,
                       generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw eps per sequence and perturb: returns (noisy_tokens, perturb_mask, eps).

    With ``noise="none"`` the tokens are returned unchanged with an all-False mask and the generator is untouched.
    """
    b = tokens.shape[0]
    if not cfg.uses_noise:
        return tokens, torch.zeros_like(tokens, dtype=torch.bool), torch.zeros(b, device=tokens.device)
    eps = sample_noise_levels(cfg, b, t, generator=generator, device=tokens.device)
    noisy, mask = perturb_tokens(tokens, eps, codebook_size=codebook_size, mode=cfg.perturb_mode,
                                 generator=generator)
    return noisy, mask, eps


# ----------------------------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------------------------

def negative_cosine(pred: torch.Tensor, target_unit: torch.Tensor) -> torch.Tensor:
    """-cos(pred, target) per position: pred [..., D] is L2-normalised here (fp32), target must already be unit."""
    p = F.normalize(pred.float(), dim=-1)
    return -(p * target_unit).sum(dim=-1)


def _align_terms(encode_z: torch.Tensor | None, decode_z: torch.Tensor | None, targets_unit: torch.Tensor,
                 perturb_mask: torch.Tensor, cfg: ReARConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_enc, L_dec) as defined in the module docstring; a disabled term is an exact 0 (no compute)."""
    n = targets_unit.shape[1]
    zero = targets_unit.new_zeros(())
    # Weight of the encode term per position: 1 - perturb_mask (code) or 1 (paper's text).
    w_enc = (~perturb_mask).to(torch.float32) if cfg.encode_mask_noisy else None

    def check(z: torch.Tensor, name: str) -> None:
        if z.dim() != 3 or z.shape[1] != n + 2 or z.shape[0] != targets_unit.shape[0]:
            raise ValueError(f"{name} must be [B, N+2, D] = [{targets_unit.shape[0]}, {n + 2}, D], "
                             f"got {tuple(z.shape)}")
        if z.shape[2] != targets_unit.shape[2]:
            raise ValueError(f"{name} has width {z.shape[2]} but the codebook vectors have dimension "
                             f"{targets_unit.shape[2]}; build the generator with z_dim = codebook dim")

    def masked_mean(c: torch.Tensor) -> torch.Tensor:
        # Divides by B*N even where w = 0 (code's normalisation, docs/paper.md, reAR §6 item 20).
        return (c * w_enc).mean() if w_enc is not None else c.mean()

    enc_cos = dec_cos = None
    if cfg.encode_align:
        if encode_z is None:
            raise ValueError("encode_align=True but the model returned encode_z=None: build the generator with an "
                             "encode head (encode_align_layer) and call it with align=True")
        check(encode_z, "encode_z")
        enc_cos = negative_cosine(encode_z[:, 2:], targets_unit)       # inputs x~_1..x~_N vs z(x_i)
    if cfg.decode_align:
        if decode_z is None:
            raise ValueError("decode_align=True but the model returned decode_z=None: build the generator with a "
                             "decode head (decode_align_layer) and call it with align=True")
        check(decode_z, "decode_z")
        dec_cos = negative_cosine(decode_z[:, 1:n + 1], targets_unit)  # class, x~_1..x~_{N-1} vs z(x_i)

    if enc_cos is not None and dec_cos is not None:
        return masked_mean(enc_cos), dec_cos.mean()
    if enc_cos is not None:
        # Official fallback: the missing decode slot receives the encode head's features, unmasked.
        return masked_mean(enc_cos), (enc_cos.mean() if cfg.official_fallback else zero)
    if dec_cos is not None:
        # Official fallback: the missing encode slot receives the decode head's features, with the encode mask.
        return (masked_mean(dec_cos) if cfg.official_fallback else zero), dec_cos.mean()
    return zero, zero


def rear_loss(out: Any, targets: torch.Tensor, perturb_mask: torch.Tensor | None, codebook: torch.Tensor | None,
              cfg: ReARConfig, *, eps: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L = CE + lambda (L_enc + L_dec) and its logged statistics.

    Args:
        out: a GeneratorOutput (``logits`` [B, N, K], ``encode_z`` / ``decode_z`` [B, N+2, D] or None); logits[:, i]
            predicts x_{i+1}.
        targets: the CLEAN tokens x [B, N] (labels are never noisy).
        perturb_mask: [B, N] bool from :func:`perturb_tokens` (None = nothing perturbed).
        codebook: tokenizer codebook [K, D] (raw vectors; normalised here). May be None when no alignment is used.
        cfg: the :class:`ReARConfig`.
        eps: optional per-sequence noise levels [B], only for the logged mean.

    Returns:
        (loss, stats) with stats 0-dim detached tensors: "loss", "ce", "enc", "dec" (unweighted L_enc, L_dec),
        "acc" (teacher-forced argmax accuracy on the noisy input), "eps" (mean noise level), "perturbed" (fraction
        of perturbed positions). Nothing is read back to the host.
    """
    logits = out.logits
    if logits.dim() != 3 or logits.shape[:2] != targets.shape:
        raise ValueError(f"logits must be [B, N, K] matching targets {tuple(targets.shape)}, "
                         f"got {tuple(logits.shape)}")
    if perturb_mask is None:
        perturb_mask = torch.zeros_like(targets, dtype=torch.bool)
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))
    loss = ce
    enc = dec = logits.new_zeros((), dtype=torch.float32)
    if cfg.uses_alignment:
        if codebook is None:
            raise ValueError("alignment is enabled but no codebook [K, D] was given")
        if codebook.dim() != 2 or codebook.shape[0] < logits.shape[-1]:
            raise ValueError(f"codebook must be [K, D] with K >= {logits.shape[-1]}, got {tuple(codebook.shape)}")
        # Normalising K rows then gathering is cheaper than normalising B*N gathered rows.
        targets_unit = F.embedding(targets, F.normalize(codebook.float(), dim=-1))
        enc, dec = _align_terms(out.encode_z, out.decode_z, targets_unit, perturb_mask, cfg)
        loss = ce + cfg.align_weight * (enc + dec)
    with torch.no_grad():
        acc = (logits.argmax(dim=-1) == targets).float().mean()
        stats = {
            "loss": loss.detach(),
            "ce": ce.detach(),
            "enc": enc.detach(),
            "dec": dec.detach(),
            "acc": acc,
            "eps": eps.float().mean() if eps is not None else logits.new_zeros((), dtype=torch.float32),
            "perturbed": perturb_mask.float().mean(),
        }
    return loss, stats
