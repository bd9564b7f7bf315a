# Tried in session 6 and not kept: the causal attention over S = 258 as cuDNN over the 256 aligned positions
# [2, 258) plus the 2 prefix keys (CLS, class token) in closed form, merged through the log-sum-exp. The backward
# calls cuDNN's backward with the merged output and log-sum-exp (exact, as in ring attention) and adds the
# prefix terms. Forward + backward of one layer, compiled, B=128, H=16, d=48, bf16, attention dropout 0.1.
# usage (repository root, OUT set): python reports/small/bench/tried/prefix_split_microbench.py
import json, os, time, math, torch, torch.nn.functional as F
dev = "cuda"; B, H, S, D = 128, 16, 258, 48
aten = torch.ops.aten

class PrefixSplit(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, p, n_pre):
        scale = q.shape[-1] ** -0.5
        S = q.shape[2]; P = n_pre
        res = aten._scaled_dot_product_cudnn_attention(q[:, :, P:], k[:, :, P:], v[:, :, P:], None, True, p, True, False, scale=scale)
        om, lse_m, seed, offset = res[0], res[1], res[6], res[7]
        qf = q.float()
        s = torch.stack([(qf * k[:, :, j:j + 1].float()).sum(-1) for j in range(P)], -1) * scale  # [B,H,S,P]
        vis = torch.arange(P, device=q.device)[None, :] <= torch.arange(S, device=q.device)[:, None]
        s = s.masked_fill(~vis, float("-inf"))
        lse_main = F.pad(lse_m.squeeze(-1), (P, 0), value=float("-inf"))
        lse = torch.logaddexp(lse_main, torch.logsumexp(s, -1))  # [B,H,S]
        prob = torch.exp(s - lse[..., None])
        keep = torch.rand_like(prob) >= p if p > 0 else None
        pd = prob * keep / (1 - p) if p > 0 else prob
        op = sum(pd[..., j:j + 1] * v[:, :, j:j + 1].float() for j in range(P))  # [B,H,S,d]
        w = torch.exp(lse_m.squeeze(-1) - lse[:, :, P:])[..., None]
        out = torch.cat([op[:, :, :P], op[:, :, P:] + w * om.float()], 2)
        out = out.transpose(1, 2).to(q.dtype).transpose(1, 2)  # [B,S,H,d] in memory
        ctx.save_for_backward(q, k, v, out, lse, keep if keep is not None else lse, seed, offset)
        ctx.p, ctx.P, ctx.scale = p, P, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, keep, seed, offset = ctx.saved_tensors
        p, P, scale = ctx.p, ctx.P, ctx.scale
        S = q.shape[2]
        lse_m = lse[:, :, P:].unsqueeze(-1).contiguous()
        dqm, dkm, dvm = aten._scaled_dot_product_cudnn_attention_backward(
            dout[:, :, P:], q[:, :, P:], k[:, :, P:], v[:, :, P:], out[:, :, P:], lse_m, seed, offset,
            None, None, None, S - P, S - P, p, True, scale=scale)
        qf, dof = q.float(), dout.float()
        Dd = (dof * out.float()).sum(-1)  # [B,H,S]
        s = torch.stack([(qf * k[:, :, j:j + 1].float()).sum(-1) for j in range(P)], -1) * scale
        vis = torch.arange(P, device=q.device)[None, :] <= torch.arange(S, device=q.device)[:, None]
        s = s.masked_fill(~vis, float("-inf"))
        prob = torch.exp(s - lse[..., None])
        kp = keep / (1 - p) if p > 0 else None
        pd = prob * kp if p > 0 else prob
        dpd = torch.stack([(dof * v[:, :, j:j + 1].float()).sum(-1) for j in range(P)], -1)
        dprob = dpd * kp if p > 0 else dpd
        ds = prob * (dprob - Dd[..., None])
        dq = sum(ds[..., j:j + 1] * k[:, :, j:j + 1].float() for j in range(P)) * scale
        dq = dq + F.pad(dqm.float(), (0, 0, P, 0))
        dk_pre = torch.stack([(ds[..., j:j + 1] * qf).sum(2) for j in range(P)], 2) * scale
        dv_pre = torch.stack([(pd[..., j:j + 1] * dof).sum(2) for j in range(P)], 2)
        dk = torch.cat([dk_pre, dkm.float()], 2)
        dv = torch.cat([dv_pre, dvm.float()], 2)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None

def attn(kind, p):
    def f(qkv):
        Bq, Sq = qkv.shape[:2]
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        if kind == "full":
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)
        elif kind == "s256":
            o = F.scaled_dot_product_attention(q[:, :, :256], k[:, :, :256], v[:, :, :256], is_causal=True, dropout_p=p)
            Sq = 256
        else:
            o = PrefixSplit.apply(q, k, v, p, 2)
        return o.transpose(1, 2).reshape(Bq, Sq, -1)
    return f

res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
torch.manual_seed(0)
# exactness at p=0 (eager and compiled) against one SDPA call
for comp in (False, True):
    qkv = torch.randn(8, S, 3, H, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(8, S, H * D, device=dev, dtype=torch.bfloat16)
    outs = {}
    for kind in ("full", "prefix"):
        fn = attn(kind, 0.0); fn = torch.compile(fn) if comp else fn
        qkv.grad = None
        o = fn(qkv); o.backward(g)
        outs[kind] = (o.float(), qkv.grad.float().clone())
    # reference in float64 math
    q, k, v = qkv.detach().double().permute(2, 0, 3, 1, 4).unbind(0)
    sc = (q @ k.transpose(-1, -2)) / math.sqrt(D)
    sc = sc.masked_fill(torch.ones(S, S, dtype=torch.bool, device=dev).triu(1), float("-inf"))
    ref = (sc.softmax(-1) @ v).transpose(1, 2).reshape(8, S, -1)
    for kind in outs:
        res[f"p0 {'compiled' if comp else 'eager'} {kind} out maxdiff vs f64"] = float((outs[kind][0] - ref).abs().max())
    res[f"p0 {'compiled' if comp else 'eager'} grad maxdiff prefix vs full"] = float((outs["prefix"][1] - outs["full"][1]).abs().max())
    res[f"p0 grad max abs"] = float(outs["full"][1].abs().max())
print(json.dumps(res, indent=1), flush=True)

def bench(fn, reps=50):
    qkv = torch.randn(B, S, 3, H, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
    g = None
    def step():
        o = fn(qkv); o.backward(torch.ones_like(o))
    for _ in range(5): step()
    torch.cuda.synchronize(); t = time.perf_counter()
    for _ in range(reps): step()
    torch.cuda.synchronize(); return (time.perf_counter() - t) / reps * 1e3
for p in (0.1,):
    for rep in range(2):
        for kind in ("full", "s256", "prefix"):
            try:
                res[f"{kind} p{p} ms run{rep}"] = bench(torch.compile(attn(kind, p)))
            except Exception as e:
                res[f"{kind} p{p} ms run{rep}"] = repr(e)[:400]
            print(kind, p, res[f"{kind} p{p} ms run{rep}"], flush=True)
json.dump(res, open(os.environ.get("OUT", ".") + "/prefix_split.json", "w"), indent=1)
