"""Accuracy of the block stack in training: gradients under bf16 autocast of the hand-scheduled stack
(block_kernels="auto") and of the Block modules (block_kernels="module", eager), both against the float32 Block
modules, for the small and reAR-B presets (dropout 0, alignment heads on, adaLN and norm weights perturbed so
that no block is the identity). Reports the median relative L2 error over parameter gradients and the five worst
(k_norm.bias gradients are zero in exact arithmetic, so their relative errors are huge on every path).
Run from the repository root on a CUDA machine: python benchmarks/fused_blocks/gradient_check.py
Writes $OUT/fused_stack_gradient_check.json (default OUT: artifacts/bench)."""
import json, os, sys, time
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import torch
import torch.nn.functional as F
from benchmarks.common import out_path
from rearlib.model import build_generator

dev = "cuda"
out = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "rows": []}
for preset, B in (("small", 8), ("rear_b", 4)):
    torch.manual_seed(0)
    m = build_generator(preset, dropout=0.0, attn_dropout=0.0, device=dev).train()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "adaLN" in n or "norm" in n:
                p.add_(0.02 * torch.randn_like(p))
    cfg = m.config
    tokens = torch.randint(0, cfg.codebook_size, (B, cfg.seq_len), device=dev)
    classes = torch.randint(0, cfg.num_classes, (B,), device=dev)

    def run(kernels, amp):
        m.config = cfg.replace(block_kernels=kernels)
        m.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            assert m._use_fused_stack(tokens, None) == (amp and kernels == "auto")
            o = m(tokens, classes, align=True)
            loss = (F.cross_entropy(o.logits.float().flatten(0, 1), tokens.flatten())
                    + o.encode_z.float().square().mean() + o.decode_z.float().square().mean())
        loss.backward()
        return loss.item(), {n: p.grad.detach().float().clone() for n, p in m.named_parameters() if p.grad is not None}

    ref_loss, ref = run("module", False)
    for kernels in ("module", "auto"):
        t = time.time()
        loss, g = run(kernels, True)
        rel = {n: ((g[n] - ref[n]).norm() / ref[n].norm().clamp_min(1e-30)).item() for n in ref}
        worst = sorted(rel.items(), key=lambda kv: -kv[1])[:5]
        row = {"preset": preset, "kernels": kernels, "loss": loss, "ref_loss_fp32": ref_loss,
               "missing_grads": sorted(set(ref) - set(g)), "median_rel_grad_err": sorted(rel.values())[len(rel) // 2],
               "worst5": worst, "s": time.time() - t}
        print(json.dumps(row), flush=True)
        out["rows"].append(row)
json.dump(out, open(out_path("fused_stack_gradient_check.json"), "w"), indent=1)
