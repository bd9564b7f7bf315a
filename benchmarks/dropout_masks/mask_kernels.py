"""How long drawing one reAR-B training step's dropout decisions takes (batch 128, 24 blocks, p = 0.1), per kernel
and launch configuration (CUDA events, median of n x inner calls, two interleaved rounds):

* the block stack's masks, packed one bit per decision (rearlib.kernels.dropout_keep_bits), for each
  DROPOUT_BITS_BLOCK, against the byte masks the module path uses (rearlib.kernels.dropout_keep_mask), for the
  24 x 33024 x 4608 decisions of a step (after the attention projection, inside the MLP, after fc2);
* the attention-dropout words of all 24 layers from one launch (rearlib.kernels.flash_attention.attention_dropout_bits,
  causal triangle only), for each (bits_block, bits_warps).

Run from the repository root on a CUDA machine: python benchmarks/dropout_masks/mask_kernels.py
Writes $OUT/dropout_mask_kernels.json (default OUT: artifacts/bench). The defaults are restored at the end."""
import json, os, sys
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import torch
from benchmarks.common import cuda_ms, out_path
from rearlib import flash_attention as fa, kernels

dev = torch.device("cuda")
res = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "stack_masks": [], "attention_words": []}


def save():
    json.dump(res, open(out_path("dropout_mask_kernels.json"), "w"), indent=1, default=str)


# The block stack's masks: one bit per decision against one byte per decision.
n = 24 * 33024 * 4608
seed = torch.tensor([123, 456], device=dev)
w = kernels.dropout_keep_bits(n, 0.1, seed)
res["keep_rate_bits"] = kernels.unpack_keep(w[:10**7], (32 * 10**7,)).float().mean().item()
del w
default_block = kernels.DROPOUT_BITS_BLOCK
for rnd in range(2):
    for blk in (128, 256, 512, 1024):
        kernels.DROPOUT_BITS_BLOCK = blk
        res["stack_masks"].append({"round": rnd, "kernel": f"bits block {blk}",
                                   "ms": cuda_ms(lambda: kernels.dropout_keep_bits(n, 0.1, seed), 10, 3)})
    res["stack_masks"].append({"round": rnd, "kernel": "bytes (module path)",
                               "ms": cuda_ms(lambda: kernels.dropout_keep_mask((24, n // 24), 0.1, dev), 10, 3)})
    print(res["stack_masks"][-5:], flush=True)
kernels.DROPOUT_BITS_BLOCK = default_block
save()

# The attention-dropout words: all 24 layers' decisions from one launch.
B, H, S, L = 128, 16, 258, 24
lseed = fa.attention_seed(dev, L)
default_cfg = fa.FLASH_CONFIG["bits_block"], fa.FLASH_CONFIG["bits_warps"]
for rnd in range(2):
    for blk, wp in [(64, 2), (128, 4), (64, 1), (32, 1), (128, 2), (256, 4), (256, 8)]:
        fa.FLASH_CONFIG["bits_block"], fa.FLASH_CONFIG["bits_warps"] = blk, wp
        res["attention_words"].append({"round": rnd, "block": blk, "warps": wp,
                                       "ms": cuda_ms(lambda: fa.attention_dropout_bits(B, H, S, 0.1, lseed))})
    print(res["attention_words"][-7:], flush=True)
fa.FLASH_CONFIG["bits_block"], fa.FLASH_CONFIG["bits_warps"] = default_cfg
save()
