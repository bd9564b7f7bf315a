"""Hand-written Triton kernels: speed only. Each kernel sits beside the PyTorch reference its tests compare it to,
and every caller falls back to that reference where Triton or CUDA is missing.

* :mod:`rearlib.kernels.ops`: decode attention for the sampler's KV cache and the training step's dropout masks
  (registered as ``rearlib::`` custom ops so that ``torch.compile`` and CUDA graphs see through them).
* :mod:`rearlib.kernels.flash_attention`: causal attention with dropout regenerated from a seed in the backward pass.
* :mod:`rearlib.kernels.fused_blocks`: the transformer block's element-wise tails fused into few launches.

docs/performance.md explains why each exists and what it is measured against.
"""
