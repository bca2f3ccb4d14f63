#!/usr/bin/env python3
"""Op consistency probe: flag_gems against native torch, with FlagGems' tolerances.

Usage: python3 ops_consistency.py [--all] [--ops linear,rms_norm,...] [--dtypes bf16,fp32]
                                  [--gpus 0,1,...] [--workers-per-gpu 1] [--case-timeout 150]
                                  [--budget-s 540] [--warmup 3] [--iters 10] [--seed 0]
                                  [--size default|small|tiny] [--out PATH] [--list]
       python3 ops_consistency.py --self-test [...]   (CPU harness check, see below)

Case sets:
  default  the ops ERNIE-4.5-300B-A47B runs on one GPU at tensor parallel 8, at its
           shapes (the ERNIE table below; 256 tokens = the release's max_num_seqs):
           the qkv / o_proj / lm_head GEMMs, rms_norm, fused_add_rms_norm,
           silu_and_mul, the vocabulary-shard embedding, softmax / sort (top-p) /
           top-k over the float32 logits, the router's top-k and topk_softmax,
           moe_align_block_size, fused_experts and moe_sum. Each op runs at one dtype
           and each kernel at one specialisation, so a cold cache compiles and tunes
           every kernel once.
  --all    the default set plus the wide sweep (every aten op at bf16, fp16 and fp32,
           4096-sized GEMMs, rms_norm without weight, grouped_topk, ...): minutes cold.

Parallel workers: the probe is a coordinator that starts one worker process per GPU
(``CUDA_VISIBLE_DEVICES`` = that GPU; ``--workers-per-gpu`` more) and hands the
cases out from one shared queue, heaviest first. A case running longer than
``--case-timeout`` is reported ``timeout`` with its elapsed time (exactly what the
old status ``fail`` meant, spelt out); its worker is killed with its process group
and a fresh one takes its place, and the queue carries on. A worker that dies
(segfault, CUDA error, OOM kill) fails only its case. After ``--budget-s`` the
cases still queued are reported skip; on SIGTERM every case not finished is
reported, so the document always lists every case.

For every case:
  * the reference is native torch on inputs upcast to fp64, as FlagGems' own accuracy
    tests do (``to_reference(x, True)``); fused ops compare with a torch composition;
  * the FlagGems result is the same torch call under ``flag_gems.use_gems()`` (aten
    ops) or the flag_gems fused function itself;
  * they are compared with ``flag_gems.testing.assert_close(res, ref, dtype,
    reduce_dim)``: atol = 1e-4 * reduce_dim, rtol = FlagGems' RESOLUTION (bf16 0.016,
    fp16 1e-3, fp32 1.3e-6); exact ops (embedding, topk/sort values) use 0/0 and index
    outputs are checked by gathering; every case reports ``err_over_tol`` (max error
    / (atol + rtol*|ref|); <= 1 passes), max_abs_err, rtol and atol;
  * native torch at the same dtype against the same reference (``torch_err_over_tol``);
  * both timed with CUDA events (median of --iters after --warmup);
  * ``compiled_kernels``: Triton kernels this case compiled (cache misses; 0 = warm);
  * the op-list log (use_gems(record=True)) tells whether FlagGems really ran the op
    (``gems_dispatched``); a case where it did not is a skip, not a pass.

Kernel cache: ``values.kernel_cache`` names the Triton cache (``TRITON_CACHE_DIR``,
the cluster-shared, keyed directory the container role mounts, or ~/.triton/cache),
its key (``FLAGOPS_KERNEL_CACHE_KEY``), entries before and after, the kernels
compiled, and ``state``: cold (it was empty), warm (nothing compiled) or partial.

status: skip when torch, CUDA or flag_gems is unavailable (with the reason); fail
when any case fails or times out; pass otherwise. One JSON document on stdout, exit 0.

--self-test runs the harness without flag_gems on CPU (tiny shapes): the "gems"
side is native torch, so every aten case must pass; --inject-raise OP and
--inject-error OP break one op's "gems" side to show per-op reporting.
"""

import argparse
import contextlib
import json
import math
import os
import selectors
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections import deque

PROBE = "ops_consistency"
DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
ALL_DTYPES = ("bfloat16", "float16", "float32")
# FlagGems' RESOLUTION (flag_gems/testing/__init__.py); used when flag_gems.testing is absent.
RTOL = {"bfloat16": 0.016, "float16": 1e-3, "float32": 1.3e-6, "float64": 1e-7}
# ERNIE-4.5-300B-A47B-PT's config.json (hidden_size, num_attention_heads, num_key_value_heads,
# vocab_size, moe_num_experts, moe_k, moe_intermediate_size, rms_norm_eps) and the
# release's serving shape (tensor_parallel_size 8, max_num_seqs 256).
ERNIE = {"hidden_size": 8192, "num_attention_heads": 64, "num_key_value_heads": 8,
         "vocab_size": 103424, "moe_num_experts": 64, "moe_k": 8, "moe_intermediate_size": 3584,
         "rms_norm_eps": 1e-5, "tp": 8, "tokens": 256, "sample_top_k": 50}
# Heaviest first (measured cold on one H200): the queue hands these out before the rest.
HEAVY_FIRST = ("topk", "fused_experts", "linear", "mm", "bmm", "addmm", "sort")

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

    def __init__(self, op, dtype, variant, build, run, check, fused=None, native=None, default=False):
        self.op, self.dtype, self.variant = op, dtype, variant
        self.default = default  # in the default (ERNIE-4.5-300B-A47B, TP8) set
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
    fdt = list(dtypes)

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
    lowp = [d for d in dtypes if d != "float32"] or list(dtypes)

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
    for dt in sorted({"float32", *lowp}):
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
    c.append(Case("grouped_topk", "float32", "256e-8g-top4g-k8-sigmoid", grouped_b,
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


# --- the default set: the ops ERNIE-4.5-300B-A47B runs per GPU at TP8 (see ERNIE below)
def ernie_cases(ctx):
    """One case per (op, shape) the served model runs, per tensor-parallel rank."""
    e = ERNIE
    tp = e["tp"]
    h, v = e["hidden_size"], e["vocab_size"]
    hd = h // e["num_attention_heads"]
    qkv = (e["num_attention_heads"] // tp + 2 * max(1, e["num_key_value_heads"] // tp)) * hd  # 1280
    o_in = e["num_attention_heads"] // tp * hd                                               # 1024
    moe_n = e["moe_intermediate_size"] // tp                                                 # 448
    vshard = v // tp                                                                         # 12928
    nexp, k = e["moe_num_experts"], e["moe_k"]
    tok = e["tokens"]
    c = []

    def sz(real, tiny):
        return tiny if ctx is not None and ctx.args.size == "tiny" else real

    def linear_b(m, kk, n):
        def b(dt):
            mm_, kk_, nn_ = sz((m, kk, n), (16, 32, 24))
            return {"x": randn(ctx, mm_, kk_, dtype=dt), "w": randn(ctx, nn_, kk_, dtype=dt), "K": kk_}
        return b
    # All three hit FlagGems' mm with the same dtype and 16-divisible dims and strides, so
    # they share compiled kernels; each shape only re-benchmarks the tuned configs.
    for label, kk, n in (("qkv", h, qkv), ("o_proj", o_in, h), ("lm_head", h, vshard)):
        c.append(Case("linear", "bfloat16", "%s-%dx%dx%d" % (label, tok, kk, n), linear_b(tok, kk, n),
                      lambda i: F.linear(i["x"], i["w"]), close_check(lambda i: i["K"]), default=True))

    def norm_b(dt):
        t, hh = sz((tok, h), (8, 64))
        return {"x": randn(ctx, t, hh, dtype=dt), "w": randn(ctx, hh, dtype=dt), "N": hh}
    c.append(Case("rms_norm", "bfloat16", "weight-%dx%d" % (tok, h), norm_b,
                  lambda i: F.rms_norm(i["x"], (i["N"],), i["w"], eps=e["rms_norm_eps"]), close_check(),
                  default=True))

    def farn_b(dt):
        t, hh = sz((tok, h), (8, 64))
        return {"x": randn(ctx, t, hh, dtype=dt), "r": randn(ctx, t, hh, dtype=dt),
                "w": randn(ctx, hh, dtype=dt), "H": hh}

    def farn_ref(i):
        r = i["x"] + i["r"]
        return torch.cat([F.rms_norm(r, (i["H"],), i["w"], eps=e["rms_norm_eps"]), r], dim=-1)

    def farn_gems(i):
        out, res = ctx.fg.fused_add_rms_norm(i["x"].clone(), i["r"].clone(), (i["H"],), i["w"],
                                             e["rms_norm_eps"])
        return torch.cat([out, res], dim=-1)
    c.append(Case("fused_add_rms_norm", "bfloat16", "%dx%d" % (tok, h), farn_b, farn_ref, close_check(),
                  fused=("fused_add_rms_norm", farn_gems), default=True))

    def sam_b(dt):
        t, n = sz((tok * k, moe_n), (16, 32))
        return {"a": randn(ctx, t, n, dtype=dt), "b": randn(ctx, t, n, dtype=dt)}
    c.append(Case("silu_and_mul", "bfloat16", "moe-%dx%d" % (tok * k, moe_n), sam_b,
                  lambda i: F.silu(i["a"]) * i["b"], close_check(),
                  fused=("silu_and_mul", lambda i: ctx.fg.silu_and_mul(i["a"], i["b"])), default=True))

    def emb_b(dt):
        vv, hh, t = sz((vshard, h, tok), (100, 16, 32))
        return {"w": randn(ctx, vv, hh, dtype=dt),
                "idx": torch.randint(0, vv, (t,), device=ctx.device, dtype=torch.int64)}
    c.append(Case("embedding", "bfloat16", "vocab-shard-%dx%d" % (vshard, h), emb_b,
                  lambda i: F.embedding(i["idx"], i["w"]), close_check(exact=True), default=True))

    def logits_b(dt):
        t, vv = sz((tok, v), (4, 200))
        return {"x": randn(ctx, t, vv, dtype=dt, scale=4.0), "dim": -1}
    # vLLM's sampler works on float32 logits over the whole (gathered) vocabulary.
    c.append(Case("softmax", "float32", "vocab-%dx%d" % (tok, v), logits_b,
                  lambda i: torch.softmax(i["x"], dim=-1), close_check(), default=True))
    c.append(Case("sort", "float32", "top-p-vocab-%dx%d" % (tok, v), logits_b,
                  lambda i: tuple(torch.sort(i["x"], dim=-1, descending=False)), values_indices_check,
                  default=True))

    def topk_vocab_b(dt):
        t, vv = sz((tok, v), (4, 200))
        return {"x": randn(ctx, t, vv, dtype=dt, scale=4.0), "k": e["sample_top_k"], "dim": -1}
    c.append(Case("topk", "float32", "top-k-vocab-%dx%d-k%d" % (tok, v, e["sample_top_k"]), topk_vocab_b,
                  lambda i: tuple(torch.topk(i["x"], i["k"], dim=-1)), values_indices_check, default=True))

    def router_b(dt):
        t, ee = sz((tok, nexp), (16, 16))
        return {"x": randn(ctx, t, ee, dtype=dt), "k": min(k, ee // 2), "dim": -1}
    # ERNIE's aux-free gate: vLLM's fused_topk_bias takes torch.topk of the biased scores.
    c.append(Case("topk", "float32", "router-%dx%d-k%d" % (tok, nexp, k), router_b,
                  lambda i: tuple(torch.topk(i["x"], i["k"], dim=-1)), values_indices_check, default=True))

    def gating_b(dt):
        t, ee = sz((tok, nexp), (16, 16))
        return {"g": randn(ctx, t, ee, dtype=dt), "k": min(k, ee // 2)}

    def topk_softmax_gems(i):
        t, kk = i["g"].shape[0], i["k"]
        w = torch.empty(t, kk, device=ctx.device, dtype=torch.float32)
        idx = torch.empty(t, kk, device=ctx.device, dtype=torch.int32)
        src = torch.empty(t, kk, device=ctx.device, dtype=torch.int32)
        ctx.fg.topk_softmax(w, idx, src, i["g"], True)
        return w, idx
    c.append(Case("topk_softmax", "float32", "router-%dx%d-k%d-renorm" % (tok, nexp, k), gating_b,
                  lambda i: ref_topk_softmax(i["g"], i["k"], True), routing_check,
                  fused=("topk_softmax", topk_softmax_gems), default=True))

    def align_b(dt):
        t, ee, kk = sz((tok, nexp, k), (16, 16, 4))
        ids = torch.rand(t, ee, device=ctx.device).topk(kk, dim=-1).indices.to(torch.int32)
        return {"topk_ids": ids, "block": 64, "E": ee}
    c.append(Case("moe_align_block_size", None, "%dx%de-k%d-block64" % (tok, nexp, k), align_b,
                  lambda i: ref_moe_align(i["topk_ids"], i["block"], i["E"]), moe_align_check,
                  fused=("moe_align_block_size",
                         lambda i: ctx.fg.moe_align_block_size(i["topk_ids"], i["block"], i["E"])),
                  native=lambda i: native_moe_align(i["topk_ids"], i["block"], i["E"]), default=True))

    def fe_b(dt):
        t, hh, n, ee, kk = sz((tok, h, moe_n, nexp, k), (16, 32, 16, 8, 2))
        x = randn(ctx, t, hh, dtype=dt)
        w1 = randn(ctx, ee, 2 * n, hh, dtype=dt, scale=hh ** -0.5)
        w2 = randn(ctx, ee, hh, n, dtype=dt, scale=n ** -0.5)
        tw, tid = ref_topk_softmax(torch.randn(t, ee, device=ctx.device), kk, True)
        return {"x": x, "w1": w1, "w2": w2, "tw": tw, "tid": tid.to(torch.int32), "N": n}

    def fe_gems(i):
        fn = getattr(ctx.fg, "outplace_fused_experts", None) or ctx.fg.fused_experts_impl
        return fn(i["x"], i["w1"], i["w2"], i["tw"], i["tid"])

    def fe_ref(i):
        out = ref_fused_experts(i["x"], i["w1"], i["w2"], i["tw"], i["tid"])
        return out if i["x"].dtype == torch.float64 else out.to(i["x"].dtype)
    c.append(Case("fused_experts", "bfloat16", "%dx%d-%de-k%d-n%d-silu" % (tok, h, nexp, k, moe_n), fe_b,
                  fe_ref, close_check(lambda i: i["N"]),
                  fused=(("outplace_fused_experts", "fused_experts_impl"), fe_gems), default=True))

    def moe_sum_b(dt):
        t, kk, hh = sz((tok, k, h), (16, 4, 32))
        return {"x": randn(ctx, t, kk, hh, dtype=dt), "k": kk}

    def moe_sum_gems(i):
        out = torch.empty(i["x"].shape[0], i["x"].shape[2], device=ctx.device, dtype=i["x"].dtype)
        ctx.fg.moe_sum(i["x"], out)
        return out
    c.append(Case("moe_sum", "bfloat16", "%dx%dx%d" % (tok, k, h), moe_sum_b, lambda i: i["x"].sum(1),
                  close_check(lambda i: i["k"]), fused=("moe_sum", moe_sum_gems), default=True))
    return c


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
    tdtype = getattr(torch, case.dtype) if case.dtype else None
    try:
        inp = case.build(tdtype)
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
        ok, st, msg = case.check(ctx, res, ref, nat, inp, tdtype)
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
    eot = st.get("err_over_tol")
    errtxt = (f"max err {eot:.3g} of tolerance") if isinstance(eot, float) else \
        (f"max err {eot} of tolerance" if eot is not None else "")
    if ok:
        return "pass", errtxt or "match", vals
    return "fail", (errtxt + ": " if errtxt else "") + (msg or "outside tolerance"), vals


# ----------------------------------------------------------------------------- case list
class FakeCase:
    """--fake-cases: torch-free cases that exercise the coordinator (tests): ok, sleep:S,
    crash (the worker exits 3), raise, env (reports CUDA_VISIBLE_DEVICES)."""

    def __init__(self, spec, n):
        self.spec = spec
        self.op = "fake"
        self.dtype = None
        self.variant = "%s#%d" % (spec, n)
        self.default = True

    @property
    def name(self):
        return f"fake[{self.variant}]"

    def execute(self):
        kind, _, arg = self.spec.partition(":")
        if kind == "sleep":
            time.sleep(float(arg))
        elif kind == "crash":
            os._exit(3)
        elif kind == "raise":
            raise RuntimeError("injected harness failure")
        elif kind == "fail":
            return "fail", "max err 2 of tolerance: injected", {"err_over_tol": 2.0}
        return "pass", "max err 0 of tolerance", {"err_over_tol": 0.0, "pid": os.getpid(),
                                                   "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}


def select_cases(args, ctx=None):
    """The cases of this run in queue order. Needs no torch (builders run only in workers)."""
    if args.fake_cases is not None:
        return [FakeCase(s.strip(), n) for n, s in enumerate(args.fake_cases.split(",")) if s.strip()]
    cases = ernie_cases(ctx)
    if args.all:
        cases += aten_cases(ctx, ALL_DTYPES) + fused_cases(ctx, ALL_DTYPES)
    if args.ops:
        wanted = {o.strip() for o in args.ops.split(",") if o.strip()}
        cases = [c for c in cases if c.op in wanted]
    if args.dtypes:
        keep = {DTYPE_NAMES[d.strip()] for d in args.dtypes.split(",") if d.strip()}
        cases = [c for c in cases if c.dtype is None or c.dtype in keep]
    names = [c.name for c in cases]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError("duplicate case names: {}".format(", ".join(dup)))

    def weight(c):
        return HEAVY_FIRST.index(c.op) if c.op in HEAVY_FIRST else len(HEAVY_FIRST)
    return sorted(cases, key=weight)  # stable: within a weight, the listed order


# ----------------------------------------------------------------------------- worker
def install_compile_counter():
    """Count Triton cache misses in this process: compile() stores a freshly built kernel
    with FileCacheManager.put_group and returns early, without it, on a cache hit."""
    try:
        from triton.runtime.cache import FileCacheManager
    except Exception:  # noqa: BLE001
        return None
    box = [0, []]
    orig = FileCacheManager.put_group

    def put_group(self, filename, *a, **k):
        box[0] += 1
        box[1].append(str(filename).rsplit(".", 1)[0])
        return orig(self, filename, *a, **k)
    FileCacheManager.put_group = put_group
    return box


def worker_setup(args):
    """(status, reason, values, ctx): status None when the worker can run cases."""
    global torch, F
    try:
        import torch as _torch
        import torch.nn.functional as _F
        torch, F = _torch, _F
    except Exception as exc:  # noqa: BLE001
        return "skip", f"torch not importable: {type(exc).__name__}: {exc}", {}, None
    values = {"torch": torch.__version__}
    fg = None
    if args.self_test:
        device = torch.device("cpu")
        values["mode"] = "self-test: native torch on CPU stands in for flag_gems"
    else:
        if not torch.cuda.is_available():
            return "skip", "no CUDA GPU visible to torch", values, None
        device = torch.device("cuda", 0)
        try:
            with contextlib.redirect_stdout(sys.stderr):
                import flag_gems
            fg = flag_gems
        except RuntimeError as exc:
            if "no device" in str(exc).lower():
                return "skip", f"flag_gems cannot load without a GPU: RuntimeError: {exc}", values, None
            return "fail", f"import flag_gems raised RuntimeError: {exc}", values, None
        except Exception as exc:  # noqa: BLE001
            return "fail", f"flag_gems not importable: {type(exc).__name__}: {exc}", values, None
        values["flag_gems"] = getattr(fg, "__version__", None)
        values["device"] = torch.cuda.get_device_name(device)
        try:
            import triton
            values["triton"] = triton.__version__
        except Exception:  # noqa: BLE001
            values["triton"] = None
        torch.cuda.set_device(device)
        if hasattr(fg, "fused"):
            values["fused_exports"] = sorted(getattr(fg.fused, "__all__", []))
    # FlagGems' accuracy tests keep torch's own matmuls in full fp32
    torch.backends.cuda.matmul.allow_tf32 = False
    ctx = Ctx(args, fg, device)
    values["tolerance_source"] = "flag_gems.testing.assert_close" if ctx.assert_close else \
        "built-in copy of FlagGems' RESOLUTION"
    return None, "", values, ctx


def worker_main(args):
    """One worker: hello, then one case per line on stdin, one JSON result per line out."""
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # flag_gems / triton chatter -> stderr; the pipe carries only our lines
    signal.signal(signal.SIGTERM, signal.SIG_DFL)

    def send(obj):
        proto.write(json.dumps(obj, sort_keys=True, default=str) + "\n")
        proto.flush()

    hello = {"hello": True, "pid": os.getpid(), "values": {}}
    if args.fake_cases is not None:
        ctx = None
        cases = {c.name: c for c in select_cases(args)}
    else:
        status, reason, values, ctx = worker_setup(args)
        hello["values"] = values
        if status is not None:
            hello.update(status=status, reason=reason)
            send(hello)
            return 0
        cases = {c.name: c for c in select_cases(args, ctx)}
    counter = install_compile_counter() if args.fake_cases is None else None
    send(hello)
    inject = {"raise": args.inject_raise, "error": args.inject_error}
    while True:
        line = sys.stdin.readline()
        if not line or line.strip() == "quit":
            return 0
        name = line.strip()
        case = cases.get(name)
        t0 = time.time()
        c0 = counter[0] if counter else None
        if counter:
            del counter[1][:]
        try:
            if case is None:
                status, reason, vals = "fail", f"probe harness error: unknown case {name!r}", {}
            elif isinstance(case, FakeCase):
                status, reason, vals = case.execute()
            else:
                status, reason, vals = run_case(ctx, case, inject)
        except Exception as exc:  # noqa: BLE001 - a harness bug in one case must not hide the rest
            err, where = short_tb(exc)
            status, reason, vals = "fail", f"probe harness error: {err}", {"error_where": where}
        if counter is not None:
            vals["compiled_kernels"] = counter[0] - c0
            if counter[1]:
                vals["compiled_names"] = sorted(set(counter[1]))  # kernel names: a handful per case
        vals["worker_s"] = round(time.time() - t0, 2)
        send({"name": name, "status": status, "reason": reason, "values": vals})


# ----------------------------------------------------------------------------- coordinator
class Interrupted(BaseException):
    pass


def _on_term(signum, frame):
    raise Interrupted("signal %d" % signum)


def own_source():
    """(path of this script, temp path to delete or None). The verify runner starts
    probes as ``python3 -c "$source"``; workers need a file, so write the source out."""
    f = globals().get("__file__")
    if f and os.path.isfile(f):
        return os.path.abspath(f), None
    argv = list(getattr(sys, "orig_argv", []))
    if "-c" in argv and argv.index("-c") + 1 < len(argv):
        fd, path = tempfile.mkstemp(prefix="ops_consistency_", suffix=".py")
        with os.fdopen(fd, "w") as fh:
            fh.write(argv[argv.index("-c") + 1])
        return path, path
    return None, None


class Worker:
    def __init__(self, slot, gpu, script, argv, env):
        self.slot, self.gpu = slot, gpu
        self.proc = subprocess.Popen([sys.executable, script, "--worker", *argv], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     start_new_session=True)  # its own group: kill takes it all
        self.buf = b""
        self.started = time.time()
        self.hello = None
        self.case = None
        self.t0 = None
        self.dead = False

    def send(self, text):
        try:
            self.proc.stdin.write((text + "\n").encode())
            self.proc.stdin.flush()
            return True
        except OSError:
            return False

    def kill(self):
        with contextlib.suppress(OSError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(Exception):
            self.proc.wait(timeout=10)
        self.dead = True

    def rc_text(self):
        rc = self.proc.poll()
        if rc is None:
            return "still running"
        if rc < 0:
            with contextlib.suppress(ValueError):
                return f"killed by {signal.Signals(-rc).name}"
        return "exit code %d" % rc


def list_gpus(spec):
    """CUDA_VISIBLE_DEVICES entries, one per worker: --gpus, else the inherited
    CUDA_VISIBLE_DEVICES, else nvidia-smi's indices; ["-"] (one worker, environment as
    inherited, torch decides) when none of those answers."""
    if spec:
        return [g.strip() for g in spec.split(",") if g.strip()]
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip()] or ["-"]
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        idx = [ln.strip() for ln in out.stdout.splitlines() if ln.strip().isdigit()]
        if out.returncode == 0 and idx:
            return idx
    except (OSError, subprocess.SubprocessError):
        pass
    return ["-"]


def kernel_cache_info():
    tdir = os.environ.get("TRITON_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".triton", "cache")
    fdir = os.environ.get("FLAGGEMS_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".flaggems")
    return {"triton_cache_dir": tdir, "flaggems_cache_dir": fdir,
            "key": os.environ.get("FLAGOPS_KERNEL_CACHE_KEY"), "entries_before": cache_entries(tdir)}


def cache_entries(path):
    try:
        return sum(1 for e in os.scandir(path) if e.is_dir())
    except OSError:
        return 0


def cached_kernel_names(path, limit=20000):
    """Names of the kernels the Triton cache holds (``<entry>/<kernel>.json``)."""
    names = set()
    try:
        entries = [e.path for e in os.scandir(path) if e.is_dir()]
    except OSError:
        return names
    for entry in entries[:limit]:
        with contextlib.suppress(OSError):
            names.update(f[:-5] for f in os.listdir(entry) if f.endswith(".json") and not f.startswith("__grp__"))
    return names


def cache_state(cache, items, known_before):
    """cold: the cache was empty; warm: nothing compiled, or only kernels the cache already
    held under another key (FlagGems 5.0.2's radix sort gets a new key in every process);
    partial: new kernels compiled into a cache that had entries."""
    compiled = [i["values"].get("compiled_kernels") for i in items
                if isinstance(i["values"].get("compiled_kernels"), int)]
    cache["compiled_kernels"] = sum(compiled) if compiled else None
    names = sorted({n for i in items for n in i["values"].get("compiled_names") or []})
    rebuilt = [n for n in names if n in known_before]
    cache["compiled_names"] = names[:40]
    if cache["compiled_kernels"] is None:
        cache["state"] = "unknown"
    elif cache["compiled_kernels"] == 0:
        cache["state"] = "warm"
    elif cache["entries_before"] == 0:
        cache["state"] = "cold"
    elif len(rebuilt) == len(names):
        cache["state"] = "warm"
        cache["rebuilt_every_process"] = rebuilt
    else:
        cache["state"] = "partial"
        cache["new_kernels"] = [n for n in names if n not in known_before][:40]
    return cache


def coordinate(args, cases, slots, script, worker_argv, env_for, values, on_item, log):
    """Run ``cases`` on one worker per slot from one shared queue. Returns the items in
    case order; every case gets one (pass/fail/skip/timeout)."""
    queue = deque(c.name for c in cases)
    results = {}
    sel = selectors.DefaultSelector()
    workers = {}
    respawns = {s: 0 for s in slots}
    t_start = time.time()
    fatal = [None]  # (status, reason) from a worker hello that cannot run anything

    def spawn(slot):
        w = Worker(slot, slots[slot], script, worker_argv, env_for(slots[slot]))
        workers[slot] = w
        sel.register(w.proc.stdout, selectors.EVENT_READ, w)
        return w

    def retire(w, respawn=True):
        with contextlib.suppress(Exception):
            sel.unregister(w.proc.stdout)
        w.kill()
        workers.pop(w.slot, None)
        if respawn and queue and fatal[0] is None:
            if respawns[w.slot] < args.max_respawns:
                respawns[w.slot] += 1
                spawn(w.slot)
            else:
                log("worker %s: gave up after %d restarts" % (w.slot, respawns[w.slot]))

    def record(name, status, reason, vals, w=None):
        vals = dict(vals or {})
        if w is not None:
            vals.setdefault("gpu", w.gpu)
        results[name] = {"name": name, "status": status, "reason": reason, "values": vals}
        done = len(results)
        log("t+%5.1fs [%*d/%d] %-6s %-58s %-7s %6.1fs %s" % (
            time.time() - t_start, len(str(len(cases))), done, len(cases), "gpu" + str(w.gpu) if w else "-",
            name[:58], status, vals.get("case_s", 0.0), reason[:100]))
        on_item(results)

    for slot in slots:
        spawn(slot)
    try:
        while (queue or any(w.case for w in workers.values())) and workers and fatal[0] is None:
            now = time.time()
            if now - t_start > args.budget_s:
                break
            for w in list(workers.values()):
                if w.hello is not None and w.case is None and queue:
                    name = queue.popleft()
                    if w.send(name):
                        w.case, w.t0 = name, time.time()
                    else:
                        queue.appendleft(name)
                        retire(w)
            for key, _ in sel.select(timeout=0.2):
                w = key.data
                try:
                    data = os.read(w.proc.stdout.fileno(), 1 << 16)
                except OSError:
                    data = b""
                if not data:  # the worker is gone
                    with contextlib.suppress(Exception):
                        w.proc.wait(timeout=5)
                    if w.case:
                        el = round(time.time() - w.t0, 1)
                        record(w.case, "fail", f"worker died ({w.rc_text()}) after {el:.1f} s in this case; "
                               "see stderr", {"case_s": el, "worker_died": True}, w)
                        w.case = None
                    elif w.hello is None and not results and len(workers) == 1 and respawns[w.slot] >= 1:
                        fatal[0] = ("fail", f"worker did not start ({w.rc_text()}); see stderr")
                    retire(w)
                    continue
                w.buf += data
                while b"\n" in w.buf:
                    line, w.buf = w.buf.split(b"\n", 1)
                    try:
                        msg = json.loads(line)
                    except ValueError:
                        continue
                    if msg.get("hello"):
                        w.hello = msg
                        if not values.get("worker"):
                            values["worker"] = msg.get("values") or {}
                        if msg.get("status"):
                            fatal[0] = (msg["status"], msg.get("reason", ""))
                    elif w.case and msg.get("name") == w.case:
                        vals = msg.get("values") or {}
                        vals["case_s"] = round(time.time() - w.t0, 2)
                        record(w.case, msg.get("status", "fail"), msg.get("reason", ""), vals, w)
                        w.case = None
            now = time.time()
            for w in list(workers.values()):
                if w.case and now - w.t0 > args.case_timeout:
                    el = round(now - w.t0, 1)
                    name = w.case
                    w.case = None
                    retire(w)
                    record(name, "timeout", f"timeout: still running after {el:.1f} s (limit "
                           f"{args.case_timeout:g} s); its worker was killed and replaced",
                           {"case_s": el, "timeout_s": args.case_timeout}, w)
                elif w.hello is None and now - w.started > args.case_timeout:
                    log(f"worker {w.slot}: no hello after {now - w.started:.0f} s, restarting")
                    retire(w)
    except (Interrupted, KeyboardInterrupt) as exc:
        values["interrupted"] = str(exc) or "SIGINT"
    finally:
        stop_reason = None
        if values.get("interrupted"):
            stop_reason = "probe interrupted ({})".format(values["interrupted"])
        elif time.time() - t_start > args.budget_s:
            stop_reason = f"the probe's budget of {args.budget_s:g} s was used up"
        elif fatal[0] is None and not workers and queue:
            stop_reason = "no worker left (each slot restarted %d times)" % args.max_respawns
        for w in list(workers.values()):
            if w.case:
                el = round(time.time() - w.t0, 1)
                # the budget ran out inside this case: a timeout; an interrupt: not finished
                st = "skip" if values.get("interrupted") else "timeout"
                word = "timeout" if st == "timeout" else "not finished"
                results[w.case] = {"name": w.case, "status": st,
                                   "reason": f"{word}: stopped after {el:.1f} s: {stop_reason or 'stopped'}",
                                   "values": {"case_s": el, "gpu": w.gpu}}
                w.case = None
            if w.hello is not None:
                w.send("quit")
        deadline = time.time() + 3
        for w in list(workers.values()):
            with contextlib.suppress(Exception):
                w.proc.wait(timeout=max(0.1, deadline - time.time()))
            w.kill()
        if fatal[0] is not None:
            values["fatal"] = fatal[0]
        for name in queue:
            results.setdefault(name, {"name": name, "status": "skip",
                                      "reason": "not run: %s" % (stop_reason or "stopped"), "values": {}})
    return [results.get(c.name) or {"name": c.name, "status": "skip", "reason": "not run", "values": {}}
            for c in cases]


# ----------------------------------------------------------------------------- main
def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--all", action="store_true", help="the wide sweep on top of the default set")
    ap.add_argument("--ops", default=None, help="comma list of op names")
    ap.add_argument("--dtypes", default=None, help="keep only these dtypes (bf16,fp16,fp32)")
    ap.add_argument("--size", choices=("default", "small", "tiny"), default=None)
    ap.add_argument("--gpus", default=None,
                    help="comma list of CUDA_VISIBLE_DEVICES entries, one worker each "
                         "(default: every GPU torch sees)")
    ap.add_argument("--workers-per-gpu", type=int, default=0,
                    help="worker processes per GPU (0: 2 on nodes with fewer than 4 GPUs, else 1; a cold "
                         "run is CPU-bound Triton compiling, so two processes halve it on one GPU)")
    ap.add_argument("--case-timeout", type=float, default=150.0,
                    help="seconds one case may take before it is reported timeout")
    ap.add_argument("--budget-s", type=float, default=540.0,
                    help="stop handing out cases after this many seconds (verify waits 600)")
    ap.add_argument("--max-respawns", type=int, default=8, help="restarts per worker slot")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--no-timing", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--list", action="store_true", help="list the cases and exit")
    ap.add_argument("--out", default=None,
                    help="also write the document here, rewritten after every case, so a run "
                         "killed from outside still leaves its finished cases (status fail)")
    ap.add_argument("--self-test", action="store_true",
                    help="CPU harness check without flag_gems (native vs fp64 reference)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--fake-cases", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--inject-raise", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--inject-error", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.size is None:
        args.size = "tiny" if args.self_test else "default"
    return args


def worker_argv(argv):
    return [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--worker"]


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        return worker_main(args)
    signal.signal(signal.SIGTERM, _on_term)
    real_out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # anything a library prints -> stderr; stdout carries only our JSON
    try:
        return _main(args, argv, real_out)
    except (Interrupted, KeyboardInterrupt) as exc:
        real_out.write(json.dumps({"probe": PROBE, "status": "fail", "items": [], "values": {},
                                   "reason": "interrupted (%s) before any case ran" % (exc or "SIGINT")},
                                  sort_keys=True) + "\n")
        real_out.flush()
        return 0


def _main(args, argv, real_out):
    out_path = args.out
    t_start = time.time()

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

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    values = {"case_set": "all" if args.all else "default"}
    try:
        if args.dtypes:
            for d in args.dtypes.split(","):
                if d.strip() and d.strip() not in DTYPE_NAMES:
                    raise KeyError(d.strip())
        cases = select_cases(args)
    except KeyError as exc:
        return emit("fail", f"unknown dtype {exc} (use bf16,fp16,fp32)", values)
    except ValueError as exc:
        return emit("fail", f"probe harness error: {exc}", values)
    values["cases"] = len(cases)
    if args.list:
        return emit("skip", "--list", values, [{"name": c.name, "status": "skip", "reason": "listed",
                                                "values": {"op": c.op, "dtype": c.dtype, "variant": c.variant,
                                                           "default": c.default}} for c in cases])
    if not cases:
        return emit("skip", "no case selected", values)

    # The coordinator never imports torch (seconds saved before the first worker starts):
    # the workers import it and say in their hello whether CUDA and flag_gems work.
    if args.fake_cases is not None:
        gpus = (args.gpus or "-").split(",")
    else:
        import importlib.util
        try:
            found = importlib.util.find_spec("torch") is not None
        except (ImportError, ValueError) as exc:
            return emit("skip", f"torch not importable: {type(exc).__name__}: {exc}", values)
        if not found:
            return emit("skip", "torch not importable: ModuleNotFoundError: No module named 'torch'", values)
        gpus = ["cpu"] if args.self_test else list_gpus(args.gpus)
    wpg = args.workers_per_gpu or (2 if len(gpus) < 4 and gpus not in (["cpu"], ["-"]) else 1)
    slots = {"%s.%d" % (g, j): g for g in gpus for j in range(max(1, wpg))}
    values.update(gpus=gpus, workers=len(slots), workers_per_gpu=wpg, case_timeout_s=args.case_timeout)
    cache = kernel_cache_info()
    values["kernel_cache"] = cache
    known_before = cached_kernel_names(cache["triton_cache_dir"]) if cache["entries_before"] else set()

    script, tmp_script = own_source()
    if script is None:
        return emit("fail", "probe harness error: cannot find the probe's own source to start workers", values)

    def env_for(gpu):
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        if gpu != "-":  # "-": the inherited environment decides
            env["CUDA_VISIBLE_DEVICES"] = "" if gpu == "cpu" else gpu
        return env

    def on_item(results):
        items = [results[c.name] for c in cases if c.name in results]
        write_out(document("fail", "partial: %d of %d cases done (run did not finish)"
                           % (len(items), len(cases)), values, items))

    try:
        items = coordinate(args, cases, slots, script, worker_argv(argv), env_for, values, on_item, log)
    finally:
        if tmp_script:
            with contextlib.suppress(OSError):
                os.unlink(tmp_script)
    worker_values = values.pop("worker", {}) or {}
    for k, v in worker_values.items():
        values.setdefault(k, v)
    cache["entries_after"] = cache_entries(cache["triton_cache_dir"])
    cache_state(cache, items, known_before)
    values["wall_s"] = round(time.time() - t_start, 1)
    fatal = values.pop("fatal", None)
    if fatal:
        return emit(fatal[0], fatal[1], values)
    summary_table(items, log)
    return finish(items, values, emit)


def summary_table(items, log):
    log("%-60s %-7s %8s %10s %9s" % ("case", "status", "case_s", "err/tol", "compiled"))
    for i in items:
        v = i["values"]
        log("%-60s %-7s %8s %10s %9s" % (i["name"][:60], i["status"], v.get("case_s", "-"),
                                         v.get("err_over_tol", "-"), v.get("compiled_kernels", "-")))


def finish(items, values, emit):
    counts = {s: sum(1 for i in items if i["status"] == s) for s in ("pass", "fail", "skip", "timeout")}
    values.update(counts)
    bad = [i["name"] for i in items if i["status"] in ("fail", "timeout")]
    summary = "%d pass, %d fail, %d timeout, %d skip in %.0f s" % (
        counts["pass"], counts["fail"], counts["timeout"], counts["skip"], values.get("wall_s", 0))
    kc = values.get("kernel_cache") or {}
    if kc.get("state") not in (None, "unknown"):
        summary += "; kernel cache {} ({} kernels compiled{})".format(
            kc["state"], kc.get("compiled_kernels"),
            ", all rebuilt in every process: " + ", ".join(kc["rebuilt_every_process"])
            if kc.get("rebuilt_every_process") else "")
    if values.get("interrupted"):
        return emit("fail", summary + "; interrupted ({}) before all cases ran".format(values["interrupted"]),
                    values, items)
    if bad:
        return emit("fail", summary + "; failed: " + ", ".join(bad), values, items)
    if not counts["pass"]:
        return emit("skip", summary + ": nothing compared", values, items)
    return emit("pass", summary, values, items)


if __name__ == "__main__":
    sys.exit(main())
