# bf16 fused stack vs Block modules (both against an fp32 module reference), on one GPU
import json, os, time, torch
import torch.nn.functional as F
from rearlib.model import build_generator
import rearlib.model as M
from rearlib import fused_blocks as NEW
try:  # an earlier stack to compare with (see session9/README.md), when present
    from rearlib import fused_blocks_old as OLD
except ImportError:
    OLD = None
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
        M.fused_block_stack = OLD.fused_block_stack if kernels == "old" else NEW.fused_block_stack
        kernels = "auto" if kernels == "old" else kernels
        m.config = cfg.replace(block_kernels=kernels)
        m.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            assert m._use_fused_stack(tokens, None) == (amp and kernels == "auto")
            o = m(tokens, classes, align=True)
            loss = F.cross_entropy(o.logits.float().flatten(0, 1), tokens.flatten()) + o.encode_z.float().square().mean() + o.decode_z.float().square().mean()
        loss.backward()
        return loss.item(), {n: p.grad.detach().float().clone() for n, p in m.named_parameters() if p.grad is not None}
    ref_loss, ref = run("module", False)
    for kernels in ("module", "auto") + (("old",) if OLD else ()):
        t = time.time(); loss, g = run(kernels, True)
        rel = {n: ((g[n] - ref[n]).norm() / ref[n].norm().clamp_min(1e-30)).item() for n in ref}
        worst = sorted(rel.items(), key=lambda kv: -kv[1])[:5]
        row = {"preset": preset, "kernels": kernels, "loss": loss, "ref_loss_fp32": ref_loss,
               "missing_grads": sorted(set(ref) - set(g)), "median_rel_grad_err": sorted(rel.values())[len(rel) // 2],
               "worst5": worst, "s": time.time() - t}
        print(json.dumps(row), flush=True); out["rows"].append(row)
json.dump(out, open(os.environ.get("OUT", "/tmp") + "/gpu_check.json", "w"), indent=1)
