# Attention microbench: cuDNN SDPA over S=258 vs an exact split (aligned causal head + small tail), fwd+bwd, compiled.
# usage (repository root, OUT set, tried/attention_split.diff not needed): python reports/small/bench/tried/attention_split_microbench.py
import json, os, time, torch, torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right
dev = "cuda"; B, H, S, D = 128, 16, 258, 48
res = {}
def tail_math(qt, k, v, A, p):
    L = qt.shape[2]
    s = (qt.float() @ k.float().transpose(-1, -2)) * D ** -0.5
    keep = torch.arange(S, device=qt.device)[None, :] <= (A + torch.arange(L, device=qt.device))[:, None]
    s = s.masked_fill(~keep, float("-inf"))
    pr = F.dropout(torch.softmax(s, -1), p)
    return (pr.to(v.dtype) @ v)
def make(kind, p):
    def f(q, k, v):
        if kind == "full":
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)
        if kind == "s256":
            return F.scaled_dot_product_attention(q[:, :, :256], k[:, :, :256], v[:, :, :256], is_causal=True, dropout_p=p)
        A = 256
        head = F.scaled_dot_product_attention(q[:, :, :A], k[:, :, :A], v[:, :, :A], is_causal=True, dropout_p=p)
        qt = q[:, :, A:]
        if kind == "split_lr":
            tail = F.scaled_dot_product_attention(qt, k, v, attn_mask=causal_lower_right(S - A, S), dropout_p=p)
        elif kind == "split_bool":
            keep = torch.arange(S, device=q.device)[None, :] <= (A + torch.arange(S - A, device=q.device))[:, None]
            tail = F.scaled_dot_product_attention(qt, k, v, attn_mask=keep, dropout_p=p)
        else:
            tail = tail_math(qt, k, v, A, p)
        return torch.cat([head, tail], 2)
    return f
def bench(fn, reps=50):
    qkv = torch.randn(B, S, 3, H, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
    def step():
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        o = fn(q, k, v); o.backward(torch.ones_like(o)); 
    for _ in range(5): step()
    torch.cuda.synchronize(); t = time.perf_counter()
    for _ in range(reps): step()
    torch.cuda.synchronize(); return (time.perf_counter() - t) / reps * 1e3
# exactness without dropout (eager, fp32-ish check in bf16 vs full)
q, k, v = torch.randn(3, 4, H, S, D, device=dev, dtype=torch.bfloat16).unbind(0)
ref = make("full", 0.0)(q, k, v).float()
for kind in ("split_lr", "split_bool", "split_math"):
    try:
        res[f"maxdiff {kind}"] = float((make(kind, 0.0)(q, k, v).float() - ref).abs().max())
    except Exception as e:
        res[f"maxdiff {kind}"] = repr(e)[:200]
print(res, flush=True)
for p in (0.1, 0.0):
    for kind in ("full", "s256", "split_lr", "split_bool", "split_math"):
        try:
            fn = torch.compile(make(kind, p))
            res[f"{kind} p{p} ms"] = bench(fn)
        except Exception as e:
            res[f"{kind} p{p} ms"] = repr(e)[:300]
        print(kind, p, res[f"{kind} p{p} ms"], flush=True)
json.dump(res, open(os.environ["OUT"] + "/attn_split.json", "w"), indent=1)
