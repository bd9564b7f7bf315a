"""Does the first training configuration of a fresh process synchronise with the host? rearlib.experiments.bench counts host
synchronisations of one step with CUDA's sync-debug mode in "warn"; this script runs that step (AR, then reAR, in a
fresh process) with the mode set to "error" instead, which raises at the first synchronising operation, and prints
"no sync at step N" or the traceback. Run from the repository root on a CUDA machine:
    python benchmarks/training_step/first_row_sync.py
It writes no file."""
import os, sys, traceback
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import torch
import rearlib.experiments.bench as bench
def count(stepper, step, device):
    torch.cuda.set_sync_debug_mode("error")
    try:
        stepper.step(step)
        print("no sync at step", step)
    except Exception:
        print(traceback.format_exc()[-5000:])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return 0
bench.count_host_syncs = count
dev = torch.device("cuda")
r = bench.bench_training("rear_b", "ar", 128, fast=True, steps=2, warmup=5, device=dev)
r = bench.bench_training("rear_b", "rear", 128, fast=True, steps=2, warmup=5, device=dev)
