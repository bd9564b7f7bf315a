"""Sampling speed of reAR-B (batch 128 with CFG, 256 tokens, random weights) for each decode-attention kernel of the
compiled CUDA-graph step, in one process: "fast" (the default: rearlib.kernels.ops' Triton decode attention),
"fast-flex" (FlexAttention), "fast-sdpa" (masked SDPA), "fast-deterministic" (the step as FID generation compiles
it), plus the eager step in CUDA graphs ("graph") and the eager KV-cached loop ("cached").
A thin wrapper around ``python -m rearlib bench --no-train``; extra arguments are passed on (e.g. --sample-modes).
Run from the repository root on a CUDA machine: python benchmarks/sampling/attention_kernels.py
Writes $OUT/sampling_attention_kernels.json and .csv (default OUT: artifacts/bench)."""
import os, sys
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from benchmarks.common import out_path
from rearlib.experiments.bench import main

args = ["--preset", "rear_b", "--batch", "128", "--no-train", "--out", out_path("sampling_attention_kernels.json")]
if not any(a.startswith("--sample-modes") for a in sys.argv[1:]):
    args += ["--sample-modes", "fast,fast-flex,fast-sdpa,fast-deterministic,graph,cached"]
sys.exit(main(args + sys.argv[1:]))
