#!/usr/bin/env python3
"""Op consistency probe: flag_gems against native torch, with FlagGems' tolerances.

Usage: python3 ops_consistency.py [--ops mm,rms_norm,...] [--dtypes bf16,fp16,fp32]
                                  [--size default|small|tiny] [--warmup 3] [--iters 10]
                                  [--budget-s 420] [--seed 0] [--list]
       python3 ops_consistency.py --self-test [...]   (CPU harness check, see below)

For every (op, dtype, variant) case:
  * the reference is native torch on inputs upcast to fp64 (fp32 where fp64 is
    not supported), as FlagGems' own accuracy tests do (``to_reference(x, True)``);
  * the FlagGems result is the same torch call under ``flag_gems.use_gems()``
    (aten ops) or the flag_gems fused function itself (MoE routing ops);
  * they are compared with ``flag_gems.testing.assert_close(res, ref, dtype,
    reduce_dim)``: atol = 1e-4 * reduce_dim, rtol = FlagGems' RESOLUTION
    (bf16 0.016, fp16 1e-3, fp32 1.3e-6); exact ops (embedding, topk/sort values)
    use rtol = atol = 0; index outputs are checked by gathering;
  * native torch at the same dtype is compared to the same reference too
    (``torch_err_over_tol``), so a tolerance that even torch misses shows up;
  * both are timed with CUDA events (median of --iters after --warmup);
  * the op-list log (use_gems(record=True)) tells whether FlagGems really ran the
    op (``gems_dispatched``); a case where it did not is a skip, not a pass.
An op that raises (e.g. flag-gems 5.0.2's rms_norm without weight: TypeError)
is a per-case fail with the error text; the probe carries on.

Fused ops come from what the installed flag_gems exports (topk_softmax,
grouped_topk, moe_align_block_size, moe_sum, silu_and_mul, fused_add_rms_norm,
outplace_fused_experts / fused_experts_impl); a missing one is a skip.

status: skip when torch, CUDA or flag_gems is unavailable (with the reason);
fail when any case fails; pass otherwise. One JSON document on stdout; exit 0.

--self-test runs the harness without flag_gems on CPU (tiny shapes): the
"gems" side is native torch, so every aten case must pass; --inject-raise OP and
--inject-error OP break one op's "gems" side to show per-op reporting.
"""

import argparse
import contextlib
import json
import math
import os
import statistics
import sys
import tempfile
import time
import traceback

PROBE = "ops_consistency"
DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
# FlagGems' RESOLUTION (flag_gems/testing/__init__.py); used when flag_gems.testing is absent.
RTOL = {"bfloat16": 0.016, "float16": 1e-3, "float32": 1.3e-6, "float64": 1e-7}

torch = None
F = None


# ----------------------------------------------------------------------------- helpers
class Ctx:
    def __init__(self, args, fg, device):
        self.args = args
        self.fg = fg
        self.device = device
        self.cuda = device.type == "cuda"
        self.assert_close = None
        if fg is not None:
            try:
                from flag_gems.testing import assert_close
                self.assert_close = assert_close
            except Exception:  # noqa: BLE001
                self.assert_close = None

    def gems_ctx(self, record_path=None):
        if self.fg is None:
            return contextlib.nullcontext()
        if record_path:
            return self.fg.use_gems(record=True, path=record_path)
        return self.fg.use_gems()


def dtype_name(dt):
    return str(dt).replace("torch.", "")


def upcast(t, ctx):
    if not torch.is_tensor(t) or not t.is_floating_point():
        return t
    return t.to(torch.float64)


def err_stats(res, ref, rtol, atol):
    """max abs err, max rel err, max err / (atol + rtol*|ref|) over finite refs."""
    r = res.detach().to(torch.float64)
    f = ref.detach().to(torch.float64)
    if r.shape != f.shape:
        raise ValueError(f"shape {tuple(r.shape)} != reference {tuple(f.shape)}")
    nonfinite = int((~torch.isfinite(r)).sum().item())
    diff = (r - f).abs()
    diff = torch.where(torch.isnan(diff), torch.full_like(diff, float("inf")), diff)
    max_abs = float(diff.max().item()) if diff.numel() else 0.0
    rel = diff / f.abs().clamp_min(1e-30)
    max_rel = float(rel.max().item()) if rel.numel() else 0.0
    ratio = diff / (atol + rtol * f.abs())
    if atol == 0 and rtol == 0:
        ratio = torch.where(diff == 0, torch.zeros_like(diff), torch.full_like(diff, float("inf")))
    max_ratio = float(ratio.max().item()) if ratio.numel() else 0.0
    return {"max_abs_err": _num(max_abs), "max_rel_err": _num(max_rel),
            "err_over_tol": _num(max_ratio), "nonfinite": nonfinite}


def _num(x):
    if x is None or isinstance(x, bool):
        return x
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf"
    return float(f"{x:.4g}")


def check_close(ctx, res, ref, dtype, reduce_dim=1, exact=False):
    """FlagGems' comparison. Returns (ok, stats, message)."""
    rtol = 0.0 if exact else RTOL[dtype_name(dtype)]
    atol = 0.0 if exact else 1e-4 * reduce_dim
    stats = err_stats(res, ref, rtol, atol)
    stats.update({"rtol": rtol, "atol": atol, "reduce_dim": reduce_dim})
    refc = ref.to(res.dtype)
    try:
        if exact:
            torch.testing.assert_close(res, refc, atol=0, rtol=0)
        elif ctx.assert_close is not None:
            ctx.assert_close(res, refc, res.dtype, reduce_dim=reduce_dim)
        else:
            torch.testing.assert_close(res, refc, atol=atol, rtol=rtol)
        return True, stats, ""
    except AssertionError as exc:
        return False, stats, " ".join(str(exc).split())[:300]


def timeit(ctx, fn, cm_factory=None):
    """median ms of fn() over iters after warmup; cm_factory() wraps the loop."""
    warm, iters = ctx.args.warmup, ctx.args.iters
    cm = cm_factory() if cm_factory else contextlib.nullcontext()
    with cm:
        for _ in range(warm):
            fn()
        times = []
        if ctx.cuda:
            torch.cuda.synchronize()
            evs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                   for _ in range(iters)]
            for s, e in evs:
                s.record()
                fn()
                e.record()
            torch.cuda.synchronize()
            times = [s.elapsed_time(e) for s, e in evs]
        else:
            for _ in range(iters):
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


# ----------------------------------------------------------------------------- cases
def shape(ctx, default, small, tiny):
    return {"default": default, "small": small, "tiny": tiny}[ctx.args.size]


def randn(ctx, *shp, dtype, scale=1.0):
    return (torch.randn(*shp, device=ctx.device, dtype=torch.float32) * scale).to(dtype)


class Case:
    """name/dtype/variant + build() -> inputs dict, run(inputs, upcast) -> output,
    check(ctx, gems_out, ref_out, torch_out, inputs) -> (ok, values, msg)."""

    def __init__(self, op, dtype, variant, build, run, check, fused=None, native=None):
        self.op, self.dtype, self.variant = op, dtype, variant
        self.build, self.run, self.check = build, run, check
        self.native = native or run  # native torch at the input dtype (timed as 'torch')
        self.fused = fused  # name of the flag_gems function, None for aten ops

    @property
    def name(self):
        return "{}[{}{}]".format(self.op, dtype_name(self.dtype) if self.dtype else "-",
                             "," + self.variant if self.variant else "")


def close_check(reduce_dim_fn=lambda inp: 1, exact=False):
    def check(ctx, res, ref, nat, inp, dtype):
        rd = reduce_dim_fn(inp)
        ok, st, msg = check_close(ctx, res, ref, dtype, rd, exact)
        _, tst, _ = check_close(ctx, nat, ref, dtype, rd, exact)
        st["torch_err_over_tol"] = tst["err_over_tol"]
        st["torch_max_abs_err"] = tst["max_abs_err"]
        return ok, st, msg
    return check


def values_indices_check(ctx, res, ref, nat, inp, dtype):
    """topk/sort: values exact vs reference; indices must gather those values."""
    vals, idx = res
    rvals = ref[0]
    ok, st, msg = check_close(ctx, vals, rvals.to(vals.dtype), dtype, exact=True)
    x = inp["x"]
    gathered = torch.gather(x, inp.get("dim", -1), idx.long())
    bad_idx = int((gathered != vals).sum().item())
    st["index_mismatch"] = bad_idx
    if bad_idx:
        ok = False
        msg = (msg + "; " if msg else "") + "%d indices do not gather their values" % bad_idx
    return ok, st, msg


def aten_cases(ctx, dtypes):
    c = []
    fdt = [d for d in dtypes]

    def mm_b(dt):
        m, n, k = shape(ctx, (4096, 4096, 4096), (1024, 1024, 1024), (64, 48, 32))
        return {"a": randn(ctx, m, k, dtype=dt), "b": randn(ctx, k, n, dtype=dt), "K": k}
    for dt in fdt:
        c.append(Case("mm", dt, "", mm_b, lambda i: torch.mm(i["a"], i["b"]),
                      close_check(lambda i: i["K"])))

    def bmm_b(dt):
        b, m, n, k = shape(ctx, (32, 1024, 1024, 1024), (8, 256, 256, 256), (2, 16, 24, 32))
        return {"a": randn(ctx, b, m, k, dtype=dt), "b": randn(ctx, b, k, n, dtype=dt), "K": k}
    for dt in fdt:
        c.append(Case("bmm", dt, "", bmm_b, lambda i: torch.bmm(i["a"], i["b"]),
                      close_check(lambda i: i["K"])))

    def addmm_b(dt):
        m, n, k = shape(ctx, (4096, 4096, 4096), (1024, 1024, 1024), (64, 48, 32))
        return {"bias": randn(ctx, n, dtype=dt), "a": randn(ctx, m, k, dtype=dt),
                "b": randn(ctx, k, n, dtype=dt), "K": k}
    for dt in fdt:
        c.append(Case("addmm", dt, "", addmm_b, lambda i: torch.addmm(i["bias"], i["a"], i["b"]),
                      close_check(lambda i: i["K"])))

    def rows_b(default, small, tiny, scale=1.0):
        def b(dt):
            m, n = shape(ctx, default, small, tiny)
            return {"x": randn(ctx, m, n, dtype=dt, scale=scale)}
        return b
    for dt in fdt:
        c.append(Case("softmax", dt, "", rows_b((4096, 32768), (1024, 4096), (8, 64)),
                      lambda i: torch.softmax(i["x"], dim=-1), close_check()))
    for dt in fdt:
        c.append(Case("silu", dt, "", rows_b((4096, 14336), (1024, 4096), (8, 64)),
                      lambda i: F.silu(i["x"]), close_check()))
    for dt in fdt:
        c.append(Case("gelu", dt, "", rows_b((4096, 14336), (1024, 4096), (8, 64)),
                      lambda i: F.gelu(i["x"]), close_check()))
        c.append(Case("gelu", dt, "tanh", rows_b((4096, 14336), (1024, 4096), (8, 64)),
                      lambda i: F.gelu(i["x"], approximate="tanh"), close_check()))

    def norm_b(dt):
        m, n = shape(ctx, (8192, 4096), (1024, 4096), (8, 64))
        return {"x": randn(ctx, m, n, dtype=dt), "w": randn(ctx, n, dtype=dt),
                "bias": randn(ctx, n, dtype=dt), "N": n}
    for dt in fdt:
        c.append(Case("rms_norm", dt, "weight", norm_b,
                      lambda i: F.rms_norm(i["x"], (i["N"],), i["w"], eps=1e-6), close_check()))
        c.append(Case("rms_norm", dt, "no-weight", norm_b,
                      lambda i: F.rms_norm(i["x"], (i["N"],), eps=1e-6), close_check()))
        c.append(Case("rms_norm", dt, "no-weight,no-eps", norm_b,
                      lambda i: F.rms_norm(i["x"], (i["N"],)), close_check()))
    for dt in fdt:
        c.append(Case("layer_norm", dt, "", norm_b,
                      lambda i: F.layer_norm(i["x"], (i["N"],), i["w"], i["bias"], eps=1e-5),
                      close_check()))

    def emb_b(dt):
        v, h, t = shape(ctx, (103424, 4096, 8192), (32000, 1024, 1024), (100, 16, 32))
        return {"w": randn(ctx, v, h, dtype=dt),
                "idx": torch.randint(0, v, (t,), device=ctx.device, dtype=torch.int64)}
    for dt in fdt:
        c.append(Case("embedding", dt, "", emb_b, lambda i: F.embedding(i["idx"], i["w"]),
                      close_check(exact=True)))

    def topk_b(default, small, tiny, k):
        def b(dt):
            m, n = shape(ctx, default, small, tiny)
            return {"x": randn(ctx, m, n, dtype=dt), "k": k, "dim": -1}
        return b
    for dt in fdt:
        c.append(Case("topk", dt, "router-64e-k8", topk_b((8192, 64), (1024, 64), (8, 64), 8),
                      lambda i: tuple(torch.topk(i["x"], i["k"], dim=-1)), values_indices_check))
        c.append(Case("topk", dt, "vocab-k50", topk_b((64, 103424), (16, 32000), (4, 200), 50),
                      lambda i: tuple(torch.topk(i["x"], i["k"], dim=-1)), values_indices_check))
    for dt in fdt:
        c.append(Case("sort", dt, "desc", topk_b((64, 103424), (16, 32000), (4, 200), None),
                      lambda i: tuple(torch.sort(i["x"], dim=-1, descending=True)),
                      values_indices_check))

    def cumsum_b(dt):
        m, n = shape(ctx, (64, 103424), (16, 32000), (4, 200))
        x = torch.softmax(torch.randn(m, n, device=ctx.device, dtype=torch.float32), -1).to(dt)
        return {"x": x, "N": n}
    for dt in fdt:
        c.append(Case("cumsum", dt, "probs", cumsum_b, lambda i: torch.cumsum(i["x"], dim=-1),
                      close_check(lambda i: i["N"])))
    return c


# --- fused MoE routing ops (flag_gems functions; references in plain torch)
def ref_topk_softmax(g, k, renorm):
    p = torch.softmax(g.float(), dim=-1)
    w, idx = torch.topk(p, k, dim=-1)
    if renorm:
        w = w / w.sum(-1, keepdim=True)
    return w, idx


def ref_grouped_topk(scores, n_group, topk_group, topk, renorm, scale, bias):
    s = torch.sigmoid(scores.float())
    sc = s + bias.float()
    t, e = sc.shape
    g = sc.view(t, n_group, e // n_group).topk(2, dim=-1).values.sum(-1)
    gidx = g.topk(topk_group, dim=-1).indices
    gmask = torch.zeros_like(g).scatter_(1, gidx, 1.0)
    emask = gmask.unsqueeze(-1).expand(t, n_group, e // n_group).reshape(t, e)
    masked = sc.masked_fill(emask == 0, float("-inf"))
    idx = masked.topk(topk, dim=-1).indices
    w = s.gather(1, idx)
    if renorm:
        w = w / w.sum(-1, keepdim=True)
    return w * scale, idx


def routing_check(ctx, res, ref, nat, inp, dtype):
    """(weights, ids): ids as per-row sets must match; weights close (fp32 rtol)."""
    w, idx = res[0], res[1]
    rw, ridx = ref
    order = torch.argsort(idx.long(), dim=-1)
    rorder = torch.argsort(ridx.long(), dim=-1)
    ids_sorted, rids_sorted = idx.long().gather(1, order), ridx.long().gather(1, rorder)
    bad_rows = (ids_sorted != rids_sorted).any(-1)
    nbad = int(bad_rows.sum().item())
    good = ~bad_rows
    ok, st, msg = check_close(ctx, w.float().gather(1, order)[good], rw.float().gather(1, rorder)[good],
                              torch.float32, reduce_dim=1)
    st["rows_with_different_experts"] = nbad
    st["rows"] = int(idx.shape[0])
    # near-ties may legitimately pick another expert; allow 0.1 % of rows
    if nbad > max(0, int(0.001 * idx.shape[0])):
        ok = False
        msg = (msg + "; " if msg else "") + "%d/%d rows chose different experts" % (nbad, idx.shape[0])
    return ok, st, msg


def ref_moe_align(topk_ids, block, num_experts):
    flat = topk_ids.flatten().long()
    counts = torch.bincount(flat, minlength=num_experts)
    padded = (counts + block - 1) // block * block
    return counts, padded


def native_moe_align(topk_ids, block, num_experts):
    """vLLM's moe_align_block_size in plain torch: (sorted_ids, expert_ids, num_tokens_post_pad)."""
    flat = topk_ids.flatten().long()
    numel = flat.numel()
    counts = torch.bincount(flat, minlength=num_experts)
    padded = (counts + block - 1) // block * block
    order = torch.argsort(flat, stable=True)
    exp_sorted = flat[order]
    start_pad = torch.cumsum(padded, 0) - padded
    start_raw = torch.cumsum(counts, 0) - counts
    pos = start_pad[exp_sorted] + torch.arange(numel, device=flat.device) - start_raw[exp_sorted]
    max_padded = numel + num_experts * (block - 1)
    sorted_ids = torch.full((max_padded,), numel, dtype=torch.int32, device=flat.device)
    sorted_ids[pos] = order.to(torch.int32)
    blocks = torch.repeat_interleave(torch.arange(num_experts, device=flat.device), padded // block)
    expert_ids = torch.zeros((max_padded + block - 1) // block, dtype=torch.int32, device=flat.device)
    expert_ids[:blocks.numel()] = blocks.to(torch.int32)
    return sorted_ids, expert_ids, padded.sum().reshape(1).to(torch.int32)


def moe_align_check(ctx, res, ref, nat, inp, dtype):
    sorted_ids, expert_ids, ntp = [t.cpu() for t in res]
    topk_ids = inp["topk_ids"].cpu()
    block, e = inp["block"], inp["E"]
    counts, padded = [t.cpu() for t in ref]
    total = int(padded.sum())
    st = {"num_tokens_post_pad": int(ntp.item()), "expected_post_pad": total}
    problems = []
    if int(ntp.item()) != total:
        problems.append("num_tokens_post_pad %d != %d" % (int(ntp.item()), total))
    else:
        flat = topk_ids.flatten().long()
        numel = flat.numel()
        start, bad_experts = 0, 0
        for ex in range(e):
            seg = sorted_ids[start:start + int(padded[ex])].long()
            blocks = expert_ids[start // block:(start + int(padded[ex])) // block].long()
            real = seg[seg < numel]
            want = torch.nonzero(flat == ex).flatten()
            if (blocks != ex).any() or real.numel() != want.numel() or \
                    not torch.equal(torch.sort(real).values, want):
                bad_experts += 1
            start += int(padded[ex])
        st["experts_wrong"] = bad_experts
        if bad_experts:
            problems.append("%d experts with wrong token lists/block ids" % bad_experts)
    return (not problems), st, "; ".join(problems)


def ref_fused_experts(x, w1, w2, tw, tid):
    xf = x.float()
    out = torch.zeros(x.shape[0], w2.shape[1], device=x.device, dtype=torch.float32)
    n = w1.shape[1] // 2
    for e in range(w1.shape[0]):
        tok, slot = torch.nonzero(tid == e, as_tuple=True)
        if tok.numel() == 0:
            continue
        h = xf[tok] @ w1[e].float().t()
        a = F.silu(h[:, :n]) * h[:, n:]
        o = a @ w2[e].float().t()
        out.index_add_(0, tok, o * tw[tok, slot].float().unsqueeze(-1))
    return out


def fused_cases(ctx, dtypes):
    c = []
    lowp = [d for d in dtypes if d != torch.float32] or list(dtypes)

    def gating_b(dt):
        t, e = shape(ctx, (8192, 64), (1024, 64), (16, 16))
        return {"g": randn(ctx, t, e, dtype=dt), "k": min(8, e // 2)}

    def topk_softmax_gems(i):
        t, k = i["g"].shape[0], i["k"]
        w = torch.empty(t, k, device=ctx.device, dtype=torch.float32)
        idx = torch.empty(t, k, device=ctx.device, dtype=torch.int32)
        src = torch.empty(t, k, device=ctx.device, dtype=torch.int32)
        ctx.fg.topk_softmax(w, idx, src, i["g"], True)
        return w, idx
    for dt in sorted({torch.float32, *lowp}, key=str):
        c.append(Case("topk_softmax", dt, "64e-k8-renorm", gating_b,
                      lambda i: ref_topk_softmax(i["g"], i["k"], True), routing_check,
                      fused=("topk_softmax", topk_softmax_gems)))

    def grouped_b(dt):
        t, e = shape(ctx, (8192, 256), (1024, 256), (16, 64))
        return {"s": randn(ctx, t, e, dtype=dt), "bias": randn(ctx, e, dtype=dt, scale=0.1),
                "ng": 8, "tg": 4, "k": 8, "scale": 2.5}

    def grouped_gems(i):
        w, idx = ctx.fg.grouped_topk(i["s"], i["ng"], i["tg"], i["k"], True, i["scale"], i["bias"], 1)
        return w, idx
    c.append(Case("grouped_topk", torch.float32, "256e-8g-top4g-k8-sigmoid", grouped_b,
                  lambda i: ref_grouped_topk(i["s"], i["ng"], i["tg"], i["k"], True, i["scale"], i["bias"]),
                  routing_check, fused=("grouped_topk", grouped_gems)))

    def align_b(dt):
        t, e, k = shape(ctx, (8192, 64, 8), (1024, 64, 8), (16, 16, 4))
        ids = torch.rand(t, e, device=ctx.device).topk(k, dim=-1).indices.to(torch.int32)
        return {"topk_ids": ids, "block": 64, "E": e}

    def align_gems(i):
        return ctx.fg.moe_align_block_size(i["topk_ids"], i["block"], i["E"])
    c.append(Case("moe_align_block_size", None, "64e-k8-block64", align_b,
                  lambda i: ref_moe_align(i["topk_ids"], i["block"], i["E"]), moe_align_check,
                  fused=("moe_align_block_size", align_gems),
                  native=lambda i: native_moe_align(i["topk_ids"], i["block"], i["E"])))

    def moe_sum_b(dt):
        t, k, h = shape(ctx, (8192, 8, 4096), (1024, 8, 1024), (16, 4, 32))
        return {"x": randn(ctx, t, k, h, dtype=dt), "k": k}

    def moe_sum_gems(i):
        out = torch.empty(i["x"].shape[0], i["x"].shape[2], device=ctx.device, dtype=i["x"].dtype)
        ctx.fg.moe_sum(i["x"], out)
        return out
    for dt in lowp:
        c.append(Case("moe_sum", dt, "k8", moe_sum_b, lambda i: i["x"].sum(1),
                      close_check(lambda i: i["k"]), fused=("moe_sum", moe_sum_gems)))

    def sam_b(dt):
        t, n = shape(ctx, (8192, 7168), (1024, 1536), (16, 32))
        return {"a": randn(ctx, t, n, dtype=dt), "b": randn(ctx, t, n, dtype=dt)}
    for dt in lowp:
        c.append(Case("silu_and_mul", dt, "", sam_b, lambda i: F.silu(i["a"]) * i["b"], close_check(),
                      fused=("silu_and_mul", lambda i: ctx.fg.silu_and_mul(i["a"], i["b"]))))

    def farn_b(dt):
        t, h = shape(ctx, (8192, 4096), (1024, 4096), (16, 64))
        return {"x": randn(ctx, t, h, dtype=dt), "r": randn(ctx, t, h, dtype=dt),
                "w": randn(ctx, h, dtype=dt), "H": h}

    def farn_ref(i):
        r = i["x"] + i["r"]
        return torch.cat([F.rms_norm(r, (i["H"],), i["w"], eps=1e-6), r], dim=-1)

    def farn_gems(i):
        out, res = ctx.fg.fused_add_rms_norm(i["x"].clone(), i["r"].clone(), (i["H"],), i["w"], 1e-6)
        return torch.cat([out, res], dim=-1)
    for dt in lowp:
        c.append(Case("fused_add_rms_norm", dt, "", farn_b, farn_ref, close_check(),
                      fused=("fused_add_rms_norm", farn_gems)))

    def fe_b(dt):
        t, h, n, e, k = shape(ctx, (1024, 2560, 1536, 64, 6), (256, 1024, 512, 16, 4),
                              (16, 32, 16, 8, 2))
        x = randn(ctx, t, h, dtype=dt)
        w1 = randn(ctx, e, 2 * n, h, dtype=dt, scale=h ** -0.5)
        w2 = randn(ctx, e, h, n, dtype=dt, scale=n ** -0.5)
        tw, tid = ref_topk_softmax(torch.randn(t, e, device=ctx.device), k, True)
        return {"x": x, "w1": w1, "w2": w2, "tw": tw, "tid": tid.to(torch.int32), "N": n}

    def fe_gems(i):
        fn = getattr(ctx.fg, "outplace_fused_experts", None)
        if fn is None:
            return ctx.fg.fused_experts_impl(i["x"], i["w1"], i["w2"], i["tw"], i["tid"])
        return fn(i["x"], i["w1"], i["w2"], i["tw"], i["tid"])
    for dt in lowp:
        c.append(Case("fused_experts", dt, "ernie21b-64e-k6-silu", fe_b,
                      lambda i: ref_fused_experts(i["x"], i["w1"], i["w2"], i["tw"], i["tid"]).to(i["x"].dtype)
                      if i["x"].dtype != torch.float64 else
                      ref_fused_experts(i["x"], i["w1"], i["w2"], i["tw"], i["tid"]),
                      close_check(lambda i: i["N"]),
                      fused=(("outplace_fused_experts", "fused_experts_impl"), fe_gems)))
    return c


# ----------------------------------------------------------------------------- runner
def short_tb(exc):
    tb = traceback.extract_tb(exc.__traceback__)
    where = "%s:%d in %s" % (tb[-1].filename, tb[-1].lineno, tb[-1].name) if tb else ""
    return f"{type(exc).__name__}: {exc}", where


def fused_available(ctx, names):
    if ctx.fg is None:
        return None
    names = names if isinstance(names, tuple) else (names,)
    for n in names:
        if callable(getattr(ctx.fg, n, None)):
            return n
    return None


def run_case(ctx, case, inject):
    seed = ctx.args.seed
    torch.manual_seed(seed)
    vals = {"op": case.op, "dtype": dtype_name(case.dtype) if case.dtype else None,
            "variant": case.variant}
    fused_fn = None
    if case.fused is not None:
        names, fused_fn = case.fused
        if ctx.args.self_test:  # harness check: native torch stands in for the fused op
            fused_fn = case.native
        else:
            found = fused_available(ctx, names)
            if found is None:
                return "skip", "installed flag_gems exports no %s" % (
                    " / ".join(names) if isinstance(names, tuple) else names), vals
            vals["gems_function"] = "flag_gems." + found
    try:
        inp = case.build(case.dtype)
    except Exception as exc:  # noqa: BLE001
        err, where = short_tb(exc)
        return "fail", f"building inputs raised {err}", dict(vals, error=err, error_where=where)
    vals["shapes"] = {k: list(v.shape) for k, v in inp.items() if torch.is_tensor(v)}

    # reference: upcast (fp64) for aten ops; fused refs are fp32 torch compositions
    try:
        if case.fused is None:
            ref_inp = {k: upcast(v, ctx) for k, v in inp.items()}
            ref = case.run(ref_inp)
        else:
            ref = case.run(inp) if case.op in ("topk_softmax", "grouped_topk", "moe_align_block_size") \
                else case.run({k: upcast(v, ctx) if k not in ("tid",) else v for k, v in inp.items()})
        nat = case.native(inp)
        if ctx.cuda:
            torch.cuda.synchronize()
    except Exception as exc:  # noqa: BLE001
        err, where = short_tb(exc)
        return "skip", f"native torch reference raised {err}", dict(vals, error=err, error_where=where)

    def gems_call():
        if inject.get("raise") == case.op:
            raise TypeError(f"injected failure for {case.op}")
        out = fused_fn(inp) if fused_fn else case.run(inp)
        if inject.get("error") == case.op:
            out = tuple(o * 1.05 + 0.01 if o.is_floating_point() else o for o in out) \
                if isinstance(out, (tuple, list)) else out * 1.05 + 0.01
        return out

    log_path = None
    if ctx.fg is not None:
        fd, log_path = tempfile.mkstemp(prefix="gems_probe_", suffix=".log")
        os.close(fd)
    try:
        with ctx.gems_ctx(log_path):
            res = gems_call()
            if ctx.cuda:
                torch.cuda.synchronize()
    except Exception as exc:  # noqa: BLE001
        err, where = short_tb(exc)
        if ctx.cuda:
            with contextlib.suppress(Exception):
                torch.cuda.synchronize()
        return "fail", f"flag_gems raised {err}", dict(vals, raised=True, error=err, error_where=where)
    finally:
        log_lines = []
        if log_path:
            with contextlib.suppress(OSError):
                with open(log_path, errors="replace") as fh:
                    log_lines = [ln.strip() for ln in fh if ln.strip()]
                os.unlink(log_path)
    if ctx.fg is not None:
        vals["gems_dispatched"] = bool(log_lines)
        seen = []
        for ln in log_lines:
            ln = ln.split(": ", 1)[-1][:80]
            if ln not in seen:
                seen.append(ln)
            if len(seen) >= 4:
                break
        vals["gems_log"] = seen

    try:
        ok, st, msg = case.check(ctx, res, ref, nat, inp, case.dtype)
    except Exception as exc:  # noqa: BLE001
        err, where = short_tb(exc)
        return "fail", f"comparison raised {err} (result shape/dtype differs?)", \
            dict(vals, error=err, error_where=where)
    vals.update(st)

    if not ctx.args.no_timing:
        try:
            if fused_fn is not None:
                vals["gems_ms"] = _num(timeit(ctx, lambda: fused_fn(inp)))
            else:
                vals["gems_ms"] = _num(timeit(ctx, lambda: case.run(inp), ctx.gems_ctx))
            vals["torch_ms"] = _num(timeit(ctx, lambda: case.native(inp)))
            if vals["gems_ms"] and vals["torch_ms"]:
                vals["speedup"] = _num(vals["torch_ms"] / vals["gems_ms"])
        except Exception as exc:  # noqa: BLE001
            vals["timing_error"] = short_tb(exc)[0]

    if ctx.fg is not None and not vals.get("gems_dispatched"):
        return "skip", "flag_gems did not run this op (no op-log line): native torch was compared " \
                       "with itself (%s)" % ("ok" if ok else msg), vals
    if ok:
        return "pass", "max err %.3g of tolerance" % (st.get("err_over_tol") or 0) \
            if isinstance(st.get("err_over_tol"), float) else "match", vals
    return "fail", msg or "outside tolerance", vals


class Interrupted(BaseException):
    pass


def _on_term(signum, frame):
    raise Interrupted("signal %d" % signum)


def main(argv=None):
    import signal
    signal.signal(signal.SIGTERM, _on_term)
    real_out = os.fdopen(os.dup(1), "w")
    try:
        return _main(argv, real_out)
    except (Interrupted, KeyboardInterrupt) as exc:
        real_out.write(json.dumps({"probe": PROBE, "status": "fail", "items": [], "values": {},
                                   "reason": "interrupted (%s) before any op ran" % (exc or "SIGINT")}) + "\n")
        real_out.flush()
        return 0


def _main(argv, real_out):
    os.dup2(2, 1)  # flag_gems / triton chatter -> stderr; stdout carries only our JSON

    out_path = None

    def document(status, reason, values=None, items=None):
        return json.dumps({"probe": PROBE, "status": status, "reason": reason,
                           "values": values or {}, "items": items or []},
                          sort_keys=True, default=str) + "\n"

    def write_out(text):
        if out_path:
            tmp = out_path + ".tmp"
            with open(tmp, "w") as fh:
                fh.write(text)
            os.replace(tmp, out_path)

    def emit(status, reason, values=None, items=None):
        text = document(status, reason, values, items)
        write_out(text)
        real_out.write(text)
        real_out.flush()
        return 0

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ops", default=None, help="comma list of op names (default all)")
    ap.add_argument("--dtypes", default="bf16,fp16,fp32")
    ap.add_argument("--size", choices=("default", "small", "tiny"), default=None)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--no-timing", action="store_true")
    ap.add_argument("--budget-s", type=float, default=420.0,
                    help="skip the remaining cases after this many seconds")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--list", action="store_true", help="list the cases and exit")
    ap.add_argument("--out", default=None,
                    help="also write the document here, rewritten after every case, so a run "
                         "killed from outside still leaves its finished cases (status fail)")
    ap.add_argument("--self-test", action="store_true",
                    help="CPU harness check without flag_gems (native vs fp64 reference)")
    ap.add_argument("--inject-raise", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--inject-error", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    out_path = args.out
    if args.size is None:
        args.size = "tiny" if args.self_test else "default"
    t_start = time.time()

    global torch, F
    try:
        import torch as _torch
        import torch.nn.functional as _F
        torch, F = _torch, _F
    except Exception as exc:  # noqa: BLE001
        return emit("skip", f"torch not importable: {type(exc).__name__}: {exc}")
    values = {"torch": torch.__version__}
    try:
        dtypes = [getattr(torch, DTYPE_NAMES[d.strip()]) for d in args.dtypes.split(",") if d.strip()]
    except KeyError as exc:
        return emit("fail", f"unknown dtype {exc} (use bf16,fp16,fp32)", values)

    fg = None
    if args.self_test:
        device = torch.device("cpu")
        values["mode"] = "self-test: native torch on CPU stands in for flag_gems"
    else:
        if not torch.cuda.is_available():
            return emit("skip", "no CUDA GPU visible to torch", values)
        device = torch.device("cuda", 0)
        try:
            with contextlib.redirect_stdout(sys.stderr):
                import flag_gems
            fg = flag_gems
        except RuntimeError as exc:
            if "no device" in str(exc).lower():
                return emit("skip", f"flag_gems cannot load without a GPU: RuntimeError: {exc}", values)
            return emit("fail", f"import flag_gems raised RuntimeError: {exc}", values)
        except Exception as exc:  # noqa: BLE001
            return emit("fail", f"flag_gems not importable: {type(exc).__name__}: {exc}", values)
        values["flag_gems"] = getattr(fg, "__version__", None)
        values["device"] = torch.cuda.get_device_name(device)
        try:
            import triton
            values["triton"] = triton.__version__
        except Exception:  # noqa: BLE001
            values["triton"] = None
        torch.cuda.set_device(device)
    # FlagGems' accuracy tests keep torch's own matmuls in full fp32
    torch.backends.cuda.matmul.allow_tf32 = False

    ctx = Ctx(args, fg, device)
    values["tolerance_source"] = "flag_gems.testing.assert_close" if ctx.assert_close else \
        "built-in copy of FlagGems' RESOLUTION"
    cases = aten_cases(ctx, dtypes) + fused_cases(ctx, dtypes)
    if args.ops:
        wanted = {o.strip() for o in args.ops.split(",")}
        cases = [c for c in cases if c.op in wanted]
    if args.list:
        return emit("skip", "--list", values, [{"name": c.name, "status": "skip", "reason": "listed",
                                                "values": {}} for c in cases])
    if fg is not None and hasattr(fg, "fused"):
        values["fused_exports"] = sorted(n for n in getattr(fg.fused, "__all__", []))

    inject = {"raise": args.inject_raise, "error": args.inject_error}
    items = []

    try:
        run_all(ctx, cases, inject, items, t_start, args, values, document, write_out)
    except (Interrupted, KeyboardInterrupt) as exc:
        done = {i["name"] for i in items}
        for case in cases:
            if case.name not in done:
                items.append({"name": case.name, "status": "skip",
                              "reason": "not run: probe interrupted (%s)" % (exc or "SIGINT"),
                              "values": {}})
        values["interrupted"] = str(exc) or "SIGINT"
    values["wall_s"] = round(time.time() - t_start, 1)
    return finish(items, values, emit)


def run_all(ctx, cases, inject, items, t_start, args, values, document, write_out):
    for case in cases:
        if time.time() - t_start > args.budget_s:
            items.append({"name": case.name, "status": "skip",
                          "reason": f"time budget of {args.budget_s:.0f} s used up", "values": {}})
            continue
        t0 = time.time()
        try:
            status, reason, vals = run_case(ctx, case, inject)
        except Exception as exc:  # noqa: BLE001 - a harness bug in one case must not hide the rest
            err, where = short_tb(exc)
            status, reason, vals = "fail", f"probe harness error: {err}", {"error_where": where}
        vals["case_s"] = round(time.time() - t0, 2)
        items.append({"name": case.name, "status": status, "reason": reason, "values": vals})
        print("%-48s %-4s %s" % (case.name, status, reason[:120]), file=sys.stderr, flush=True)
        write_out(document("fail", "partial: %d of %d cases done (run did not finish)"
                           % (len(items), len(cases)), values, items))


def finish(items, values, emit):
    counts = {s: sum(1 for i in items if i["status"] == s) for s in ("pass", "fail", "skip")}
    values.update(counts)
    failed = [i["name"] for i in items if i["status"] == "fail"]
    summary = "%d pass, %d fail, %d skip" % (counts["pass"], counts["fail"], counts["skip"])
    if values.get("interrupted"):
        return emit("fail", summary + "; interrupted ({}) before all cases ran".format(values["interrupted"]),
                    values, items)
    if failed:
        return emit("fail", summary + "; failed: " + ", ".join(failed), values, items)
    if not counts["pass"]:
        return emit("skip", summary + ": nothing compared", values, items)
    return emit("pass", summary, values, items)


if __name__ == "__main__":
    sys.exit(main())
