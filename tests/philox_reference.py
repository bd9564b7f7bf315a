"""Philox-4x32-10 in numpy: the independent reference the dropout-mask tests compare the Triton kernels with."""

import numpy as np


def philox4x32_10(c0, c1, key):
    """Philox-4x32-10 (Salmon et al. 2011) in numpy on uint32 counters (c0, c1, 0, 0), key = 62-bit int: the
    generator Triton's ``tl.random.philox`` implements, written from the paper's round function."""
    m = np.uint64(0xFFFFFFFF)
    x0, x1 = c0.astype(np.uint64), c1.astype(np.uint64)
    x2, x3 = np.zeros_like(x0), np.zeros_like(x0)
    k0, k1 = np.uint64(key & 0xFFFFFFFF), np.uint64(key >> 32)
    for _ in range(10):
        p0, p2 = np.uint64(0xD2511F53) * x0, np.uint64(0xCD9E8D57) * x2
        x0, x1, x2, x3 = (p2 >> np.uint64(32)) ^ x1 ^ k0, p2 & m, (p0 >> np.uint64(32)) ^ x3 ^ k1, p0 & m
        k0, k1 = (k0 + np.uint64(0x9E3779B9)) & m, (k1 + np.uint64(0xBB67AE85)) & m
    return x0, x1, x2, x3


def kept(c0, c1, key, t, thresh):
    """Decision ``t`` (0..7) of the Philox call at counter (c0, c1): its 16-bit draw t (the low then the high
    half of word t // 2) >= ``thresh``, as the mask kernels of rearlib.kernels.ops and rearlib.kernels.flash_attention."""
    word = np.choose(t // 2, philox4x32_10(c0, c1, key))
    draw = np.where(t % 2 == 0, word & np.uint64(0xFFFF), word >> np.uint64(16))
    return draw >= np.uint64(thresh)
