# Which host sync does the first configuration of a process count (host_syncs_per_step = 1 on the first row only)?
import traceback, warnings, torch
import rearlib.bench as bench
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
