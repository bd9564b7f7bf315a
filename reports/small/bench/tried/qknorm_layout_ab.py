# Session 6 A/B (kept): QK-norm on the BSHD views before the transpose vs after it. usage: OUT=... python reports/small/bench/tried/qknorm_layout_ab.py (DEV=cpu: the exactness check only)
# A/B in one process: QK-norm applied on the [B, S, H, d] views before the transpose (q, k, v reach SDPA as
# BSHD-strided views; cuDNN's O, dQ, dK, dV then come out BSHD) vs current (QK-norm after the permute: BHSD).
import json, os, time, torch, torch.nn.functional as F
from rearlib import model as M
from rearlib.bench import bench_training, peak_flops, _release
orig = M.Attention.forward

def bshd_forward(self, x, cache=None):
    if cache is not None:
        return orig(self, x, cache)
    B, S, C = x.shape
    q, k, v = self.qkv(x).view(B, S, 3, self.heads, self.head_dim).unbind(2)
    q, k = self.q_norm(q).transpose(1, 2), self.k_norm(k).transpose(1, 2)
    v = v.transpose(1, 2)
    o = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.attn_drop if self.training else 0.0)
    o = o.transpose(1, 2).reshape(B, S, C)
    if not torch.is_autocast_enabled(o.device.type) and o.dtype != x.dtype:
        o = o.to(x.dtype)
    return self.proj_drop(self.proj(o))

def grads_and_out(model, tokens, labels, fwd):
    M.Attention.forward = fwd
    model.zero_grad()
    out = model(tokens, labels).logits
    (out.float() * torch.linspace(-1, 1, out.shape[-1], device=out.device)).sum().backward()
    return out.detach().clone(), [p.grad.detach().clone() for p in model.parameters() if p.grad is not None]

def exactness(device, dtype=torch.float32):
    torch.manual_seed(0)
    m = M.build_generator("small").to(device, dtype).eval()
    with torch.no_grad():
        for p_ in m.parameters():
            p_.add_(0.02 * torch.randn_like(p_))  # adaLN-Zero init would make every block the identity
    t = torch.randint(0, m.config.codebook_size, (4, m.config.seq_len), device=device)
    y = torch.randint(0, m.config.num_classes, (4,), device=device)
    o1, g1 = grads_and_out(m, t, y, orig)
    o2, g2 = grads_and_out(m, t, y, bshd_forward)
    M.Attention.forward = orig
    return {"out_maxdiff": float((o1 - o2).abs().max()), "out_max": float(o1.abs().max()),
            "grad_maxdiff": max(float((a - b).abs().max()) for a, b in zip(g1, g2)),
            "grad_max": max(float(a.abs().max()) for a in g1)}

if __name__ == "__main__":
    dev = torch.device(os.environ.get("DEV", "cuda"))
    res = {"exactness_fp32_eval_small_preset": exactness(dev)}
    print(json.dumps(res), flush=True)
    if dev.type == "cuda":
        res.update(gpu=torch.cuda.get_device_name(0), torch=torch.__version__, rows=[])
        peak, _ = peak_flops(dev)
        for name, variant, fwd in [("bshd", "ar", bshd_forward), ("current", "ar", orig), ("bshd", "rear", bshd_forward),
                                   ("current", "rear", orig), ("bshd", "ar", bshd_forward)]:
            M.Attention.forward = fwd
            torch._dynamo.reset()
            r = bench_training("rear_b", variant, 128, fast=True, steps=20, warmup=5, device=dev, peak=peak)
            r["layout"] = name
            print(json.dumps({k: r.get(k) for k in ("layout", "variant", "samples_per_s", "ms_per_step", "peak_mem_gib", "warmup_s", "loss")}), flush=True)
            res["rows"].append(r); _release(dev)
            json.dump(res, open(os.environ["OUT"] + "/train_qknorm_layout_ab.json", "w"), indent=1, default=str)
