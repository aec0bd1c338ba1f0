"""Decode attention time per step on one GPU: KIVI-2/4 (this package's Triton kernels) against vLLM 0.26's
FlashAttention 3 with a bf16 and an fp8 KV cache, on the same batch, with a copy-bandwidth ceiling.

    python benchmarks/decode_attention.py --out docs/measurements/decode_attention.json   # H200, full grid
    python benchmarks/decode_attention.py --quick                                         # B 16 64, L 1024 4096
    python benchmarks/decode_attention.py --configs kivi2 --work-target 0 --long-context 16384   # split grid

One layer, one decode step: B requests, each with context L (this step's token included) and one query token;
shapes "llama2-7b" (32 query heads, 32 KV heads, head size 128) and "gqa" (32 / 8 / 128); bf16 activations.

* kivi2 / kivi4: ``kivi_vllm.kernels.decode.decode`` (split kernel + open group's merge) over a cache [num_blocks, Hkv,
  page_bytes] uint8 of ``PageLayout(512, 128, b, b, group_size=32, residual="kv", residual_dtype=bf16)``; request r
  owns ceil(L/512) distinct blocks (a shuffled permutation). The store of the step's token
  (``kivi_vllm.kernels.store.store``, phase 0, slot = the token's slot) is timed on its own and reported as a
  fraction of the KIVI-2 decode time at the same shape/B/L. With L a multiple of 32 the new token completes its
  group, so the store takes its most expensive path (quantize the group from the stage, write one record).
* fa3-bf16 / fa3-fp8: ``vllm.vllm_flash_attn.flash_attn_varlen_func(fa_version=3)`` called as
  ``FlashAttentionImpl.forward`` (vllm/v1/attention/backends/flash_attn.py) calls it for a decode batch: NHD cache
  [num_blocks, 16, Hkv, 2*128] split into K | V views, block size 16, causal, scheduler_metadata from
  ``get_scheduler_metadata`` (as the metadata builder makes it, outside the timed call), num_splits =
  ``--fa-num-splits`` (default 32 = AttentionConfig.flash_attn_max_num_splits_for_cuda_graph, what vLLM passes when
  decode runs in full CUDA graphs; 0 = FA3's own heuristic, as in eager mode), q/k/v descales = a float32 1.0
  expanded to [num_seqs, Hkv]. fp8: float8_e4m3fn caches, and the query quantized to fp8 as vLLM 0.26 does for an
  fp8 KV cache (``Attention.forward``, QuantFP8 static per-tensor with _q_scale = 1.0) before the backend; that
  quantization is not timed (vLLM fuses it into the op before); the output stays bf16.

Cache contents: random bytes in [0, 60), so every fp16/bf16/fp8 value they form (scales, minima, stage, FA caches)
is finite and positive (no NaN/Inf), and KIVI codes are random. The store overwrites a few records; harmless.

Timing: ``triton.testing.do_bench(run, warmup=25, rep=100, return_mode="median")`` in ms (it memsets 256 MB
between reps to flush L2), where ``run`` replays a CUDA graph holding one call (vLLM runs decode in CUDA graphs;
this drops the Python launch overhead, e.g. the KIVI launcher's two Triton launches and three allocations, but keeps
the L2 flush). ``--eager`` times the Python call instead. The first call (Triton compilation) is never timed.

Bytes per step (for GB/s; "% copy" = against dst.copy_(src) of 2 GiB measured at the start, 2 x bytes / time):
  KIVI: B * Hkv * ((L-1)//32 * record_bytes + n_staged * 128 * 2 B * 2 (K and V stage)), n_staged = (L-1) % 32,
        + this step's key/value (B*Hkv*128*2 B*2) + query and output (B*32*128*2 B each). Not counted: block
        table, and the split partials (written by the split kernel, read by the open group's merge ("fma", "tc")
        or the reduction ("mma"); ``aux_bytes`` in JSON).
  FA3:  B * L * Hkv * 128 * 2 (K and V) * itemsize, + query (itemsize) and output (bf16), as for KIVI.
"x fp8" / "x bf16" = FA3 time / this row's time (> 1: faster than FA3); "st/kivi2" = store time / KIVI-2 decode time;
"step us" = this row's decode then the steady store, as kernels.forward() launches them (the store a programmatic
dependent of the attention on Hopper); "+st" / "+plain" = what the store adds to the decode time, so launched / as
a plain launch, as a fraction of the decode time.

Configs run outermost (all KIVI rows before any FA3 call); the JSON is rewritten after every row and a progress line
is printed, so a killed run leaves its rows. ``--device cpu`` (hidden) runs the KIVI path under the Triton
interpreter on tiny shapes to check the script, e.g. ``--device cpu --batches 2 --contexts 100 --shapes gqa``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time
import traceback

import numpy as np
import torch

SHAPES = {"llama2-7b": (32, 32, 128), "gqa": (32, 8, 128),  # query heads, KV heads, head size
          "gqa2": (32, 16, 128), "gqa3": (24, 8, 128), "gqa8": (32, 4, 128)}
CONFIGS = ("kivi2", "kivi4", "fa3-bf16", "fa3-fp8")
GROUP, KIVI_BLOCK, FA_BLOCK = 32, 512, 16
GIB = 2**30


def parse_args():
    p = argparse.ArgumentParser(description="Decode attention per step: KIVI-2/4 vs vLLM FA3 bf16/fp8.")
    p.add_argument("--batches", type=int, nargs="+", default=[16, 64, 256])
    p.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384])
    p.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    p.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    p.add_argument("--out", default="docs/measurements/decode_attention.json")
    p.add_argument("--quick", action="store_true", help="smoke run: batches 16 64, contexts 1024 4096")
    p.add_argument("--max-cache-gib", type=float, default=80.0, help="skip cells whose cache is larger")
    p.add_argument("--fa-num-splits", type=int, default=32, help="FA3 num_splits (vLLM full-CUDA-graph default)")
    p.add_argument("--num-stages", type=int, default=1, help="KIVI decode: Triton pipelining depth of the group loop")
    p.add_argument("--num-warps", type=int, default=None, help="KIVI decode: warps per program (default per kernel)")
    p.add_argument("--lane-rows", type=int, default=None,
                   help="KIVI fma decode: per-lane partial value sums (default decode()'s default_lane_rows)")
    p.add_argument("--kernel", choices=["fma", "mma", "tc"], default=None,
                   help="KIVI decode kernel (default decode()'s default_kernel)")
    p.add_argument("--num-splits", type=int, default=None, help="KIVI decode: splits (default default_num_splits)")
    p.add_argument("--maxnreg", type=int, default=None, help="KIVI fma/tc decode: register cap per thread")
    p.add_argument("--rescale-slack", type=float, default=None,
                   help="KIVI tc decode: conditional-rescaling slack, log2 units (default decode_tc.RESCALE_SLACK)")
    p.add_argument("--work-target", type=int, default=None,
                   help="KIVI fma/tc decode: a work list in waves of this many programs (decode.decode_work, as "
                        "the metadata builder makes it); default decode.wave_programs of the kernel (SMs x "
                        "WORK_PROGRAMS_PER_SM: 'tc' only), as the engine runs it; 0: the split grid")
    p.add_argument("--work-variant", choices=["as-built", "no-empty", "slot-major", "no-empty-slot-major"],
                   default="as-built", help="KIVI decode work list, for measurements: drop the unused rows (grid = "
                        "the items, not the capacity) and/or order the items slot-major (all requests' slot 0 first, "
                        "as the split grid orders its programs)")
    p.add_argument("--long-context", type=int, default=None,
                   help="request 0's context instead of L (one long request in a batch of L-token ones; the "
                        "store is then not timed; every request gets the long one's pages, so cache_gib counts "
                        "them and --max-cache-gib applies to that)")
    p.add_argument("--tc-prefetch", type=int, choices=[0, 1], default=None,
                   help="KIVI tc decode: decode_tc.PREFETCH (1: the next group's record loaded before the current "
                        "group's math; with --tc-stages >= 2 only the value scale/min)")
    p.add_argument("--tc-stages", type=int, default=None,
                   help="KIVI tc decode: decode_tc.STAGES (shared-memory stages of the key codes, key scale/min and "
                        "value codes, copied with cp.async; 0: none)")
    p.add_argument("--tc-transposed", type=int, choices=[0, 1], default=None,
                   help="KIVI tc decode: decode_tc.TRANSPOSED (1: S^T = K q^T and O^T = V^T P^T, query heads padded "
                        "to 8 columns; 0: query heads padded to 16 rows)")
    p.add_argument("--open-warps", type=int, default=None,
                   help="KIVI fma/tc decode: decode.OPEN_WARPS (warps per program of the open group's launch)")
    p.add_argument("--open-kernel", choices=["light", "dot"], default=None,
                   help="KIVI fma/tc decode: decode.OPEN_KERNEL (the open group's launch)")
    p.add_argument("--pdl", type=int, choices=[0, 1], default=None,
                   help="KIVI fma/tc decode: decode.PDL (1: the open group's launch as a programmatic dependent of "
                        "the first kernel, overlapping it; 0: a plain launch after it)")
    p.add_argument("--eager", action="store_true", help="time the Python call, not a CUDA-graph replay")
    p.add_argument("--profile", action="store_true",
                   help="KIVI: also print the GPU time of each kernel of the decode call (torch.profiler, mean of "
                        "20 eager calls; kernel_us in JSON)")
    p.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # "cpu": Triton-interpreter smoke run
    a = p.parse_args()
    if a.quick:
        a.batches, a.contexts = [16, 64], [1024, 4096]
    return a


def log(msg):
    print(msg, flush=True)


def random_bytes(n, device):
    """n bytes, each in [0, 60): finite as (the high byte of) any fp16/bf16/e4m3 value."""
    return torch.empty(n, dtype=torch.uint8, device=device).random_(0, 60)


def bench(fn, device, eager):
    """(median ms of fn, timing mode). The first call compiles and is not timed."""
    if device == "cpu":  # interpreter smoke run: the numbers are meaningless
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3, "cpu wall, 1 call (meaningless)"
    import triton.testing

    fn()
    torch.cuda.synchronize()
    run, mode, graph = fn, "do_bench eager", None
    if not eager:
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                fn()
            run, mode = graph.replay, "do_bench cuda-graph replay"
        except Exception as e:  # noqa: BLE001 - fall back to the eager call
            graph, mode = None, f"do_bench eager (graph capture failed: {type(e).__name__}: {e})"
            torch.cuda.synchronize()
    ms = triton.testing.do_bench(run, warmup=25, rep=100, return_mode="median")
    del graph
    return ms, mode


def kernel_times(fn, calls=20):
    """{kernel name (first 40 characters): mean GPU µs per call} of ``fn`` over ``calls`` eager calls
    (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    return {e.key[:40]: round(e.device_time_total / calls, 1) for e in prof.key_averages()
            if e.device_time_total > 0}


def free(device):
    if device == "cuda":
        try:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        except Exception as e:  # noqa: BLE001 - a sticky CUDA error: later cells record it, the table still prints
            log(f"free failed: {type(e).__name__}: {e}")


def copy_bandwidth(device):
    n = 2 * GIB if device == "cuda" else 64 * 2**20
    src, dst = random_bytes(n, device), torch.empty(n, dtype=torch.uint8, device=device)
    ms, _ = bench(lambda: dst.copy_(src), device, eager=True)
    del src, dst
    free(device)
    return 2 * n / (ms * 1e-3) / 1e9


def kivi_cell(bits, B, L, hq, h, d, io, device, args, kern):
    decode, store, PageLayout, default_num_splits, default_kernel, cuda_capability = kern
    q, key, value, out, qsl, seq_lens = io
    lay = PageLayout(block_size=KIVI_BLOCK, head_size=d, k_bits=bits, v_bits=bits, group_size=GROUP, residual="kv",
                     residual_dtype=torch.bfloat16)
    L0 = args.long_context or L  # request 0's context
    nblk = math.ceil(max(L, L0) / KIVI_BLOCK)
    cache_bytes = B * nblk * h * lay.page_bytes
    n_full, n_staged = (L - 1) // GROUP, (L - 1) % GROUP
    kv_bytes = B * h * (n_full * lay.record_bytes + n_staged * d * 2 * 2)
    kv_bytes += h * (((L0 - 1) // GROUP - n_full) * lay.record_bytes + ((L0 - 1) % GROUP - n_staged) * d * 2 * 2)
    io_bytes = B * h * d * 2 * 2 + 2 * B * hq * d * 2
    row = dict(cache_gib=cache_bytes / GIB, bytes=kv_bytes + io_bytes, page_bytes=lay.page_bytes,
               record_bytes=lay.record_bytes)
    if cache_bytes > args.max_cache_gib * GIB:
        return dict(row, status=f"skipped (cache {cache_bytes / GIB:.2f} GiB > {args.max_cache_gib} GiB)")
    kernel = args.kernel or default_kernel(lay, hq // h, cuda_capability(torch.device(device)))
    splits = args.num_splits or default_num_splits(kernel, B, h)  # decode()'s defaults, passed to it explicitly
    import triton  # imported by main() already, after the interpreter switch

    pad = triton.next_power_of_2(d)  # partials: m, l and a [HEAD_PAD] accumulator per (request, head, split), fp32
    row.update(kernel=kernel, num_splits=splits, aux_bytes=2 * B * hq * splits * (2 + pad) * 4)  # at most
    from kivi_vllm.kernels.decode import decode_work, open_launch, pdl_for, wave_programs

    if kernel != "mma":  # the open group's launch that runs (module options as the command line set them)
        row.update(zip(("open_kernel", "open_warps"), open_launch(hq // h)), pdl=pdl_for(torch.device(device)))

    target = (wave_programs(kernel, torch.device(device)) or 0) if args.work_target is None else args.work_target
    work = None
    if target and kernel != "mma":
        items, counts = decode_work(qsl.cpu().numpy(), seq_lens.cpu().numpy(), GROUP, B, h, target, splits)
        used = int(counts.sum())
        if "slot-major" in args.work_variant:
            items[:used] = items[:used][np.argsort(items[:used, 1], kind="stable")]
        if "no-empty" in args.work_variant:
            items = items[:max(used, B)]
        work = (torch.from_numpy(items).to(device), torch.from_numpy(counts).to(device))
        row.update(work_target=target, work_items=used, work_variant=args.work_variant)
    kv_cache = random_bytes(cache_bytes, device).view(B * nblk, h, lay.page_bytes)
    block_table = torch.randperm(B * nblk, device=device).to(torch.int32).view(B, nblk)
    def slots_at(pos):  # cache slot of each request's token at position pos[r]
        blk = block_table.gather(1, (pos // KIVI_BLOCK)[:, None]).squeeze(1).to(torch.int64)
        return (blk * KIVI_BLOCK + pos % KIVI_BLOCK).contiguous()

    p = L - 1
    slot = slots_at(torch.full((B,), p, device=device))
    scale = d**-0.5
    def run_decode():  # one decode step, as timed and profiled below
        return decode(q, key, value, kv_cache, block_table, qsl, seq_lens, lay, scale, out, num_splits=splits,
                      num_stages=args.num_stages, num_warps=args.num_warps, lane_rows=args.lane_rows, kernel=kernel,
                      maxnreg=args.maxnreg, rescale_slack=args.rescale_slack, work=work)

    ms, mode = bench(run_decode, device, args.eager)
    if args.profile and device == "cuda":
        row["kernel_us"] = kernel_times(run_decode)
        log(f"    kernels: {row['kernel_us']}")
    if args.long_context:  # the store's slots below assume context L everywhere
        return dict(row, status="ok", time_us=ms * 1e3, timing=mode, long_context=L0)
    sms, _ = bench(lambda: store(kv_cache, key, value, slot, qsl, seq_lens, lay, 0), device, args.eager)
    # the store in a steady state: request r at position L - 1 - (r mod G), so 1 request in G completes a group in
    # this step and the others only write a stage row (what a decode step of a running batch sees)
    pos = p - torch.arange(B, device=device) % GROUP
    seq_steady, slot_steady = (pos + 1).to(torch.int32), slots_at(pos)
    ssms, _ = bench(lambda: store(kv_cache, key, value, slot_steady, qsl, seq_steady, lay, 0), device, args.eager)
    row.update(status="ok", time_us=ms * 1e3, store_us=sms * 1e3, store_steady_us=ssms * 1e3, timing=mode)
    # the decode step as kernels.forward() runs it: the attention, then the steady store, a programmatic dependent
    # of it where decode.pdl_for allows (step_us); and with a plain store launch (step_plain_store_us)
    for name, dependent in (("step_us", pdl_for(torch.device(device))), ("step_plain_store_us", False)):
        sts, _ = bench(lambda dependent=dependent: (
            run_decode(), store(kv_cache, key, value, slot_steady, qsl, seq_steady, lay, 0, pdl=dependent)),
            device, args.eager)
        row[name] = sts * 1e3
    return row


def fa3_cell(fp8, B, L, hq, h, d, io, device, args, fa):
    varlen, scheduler_metadata = fa
    q, _, _, out, qsl, seq_lens = io
    dt, isz = (torch.float8_e4m3fn, 1) if fp8 else (torch.bfloat16, 2)
    L0 = args.long_context or L  # request 0's context
    nblk = math.ceil(max(L, L0) / FA_BLOCK)
    cache_bytes = B * nblk * FA_BLOCK * h * 2 * d * isz
    row = dict(cache_gib=cache_bytes / GIB, bytes=((B - 1) * L + L0) * h * d * 2 * isz + B * hq * d * (isz + 2))
    if cache_bytes > args.max_cache_gib * GIB:
        return dict(row, status=f"skipped (cache {cache_bytes / GIB:.2f} GiB > {args.max_cache_gib} GiB)")
    # vLLM 0.26, NHD: physical [num_blocks, block_size, Hkv, 2*D]; forward() splits the last dim into K | V views
    kv = random_bytes(cache_bytes, device).view(B * nblk, FA_BLOCK, h, 2 * d * isz).view(dt)
    k_cache, v_cache = kv[..., :d], kv[..., d:]
    block_table = torch.randperm(B * nblk, device=device).to(torch.int32).view(B, nblk)
    one = torch.ones((), dtype=torch.float32, device=device)  # layer._q_scale / _k_scale / _v_scale
    descale = one.expand(B, h)  # vLLM: layer._x_scale.expand((num_seqs, num_kv_heads)), for bf16 too
    # fp8 KV cache: vLLM 0.26 quantizes the query to fp8 (x / _q_scale, clamp to +-448, cast) before the backend
    qq = (q.float() / one).clamp(-448.0, 448.0).to(dt) if fp8 else q
    meta = scheduler_metadata(
        batch_size=B, max_seqlen_q=1, max_seqlen_k=max(L, L0), num_heads_q=hq, num_heads_kv=h, headdim=d,
        cache_seqlens=seq_lens, qkv_dtype=dt, cu_seqlens_q=qsl, page_size=FA_BLOCK, causal=True,
        window_size=(-1, -1), num_splits=args.fa_num_splits)

    def fn():
        varlen(q=qq, k=k_cache, v=v_cache, out=out, cu_seqlens_q=qsl, max_seqlen_q=1, seqused_k=seq_lens,
               max_seqlen_k=max(L, L0), softmax_scale=d**-0.5, causal=True, alibi_slopes=None, window_size=[-1, -1],
               block_table=block_table, softcap=0, scheduler_metadata=meta, fa_version=3, q_descale=descale,
               k_descale=descale, v_descale=descale, num_splits=args.fa_num_splits)

    ms, mode = bench(fn, device, args.eager)
    return dict(row, status="ok", time_us=ms * 1e3, timing=mode, long_context=args.long_context)


def load_fa3():
    """(flash_attn_varlen_func, get_scheduler_metadata, the version vLLM would pick) or raise with the reason."""
    from vllm.vllm_flash_attn import (fa_version_unsupported_reason, flash_attn_varlen_func, get_scheduler_metadata,
                                      is_fa_version_supported)

    if not is_fa_version_supported(3):
        raise RuntimeError(f"FA3 unsupported: {fa_version_unsupported_reason(3)}")
    try:  # informational only
        from vllm.v1.attention.backends.fa_utils import get_flash_attn_version

        picked = get_flash_attn_version(head_size=128)
    except Exception as e:  # noqa: BLE001
        picked = f"unknown ({type(e).__name__}: {e})"
    return flash_attn_varlen_func, get_scheduler_metadata, picked


def derive(rows, copy_gbps):
    """GB/s, % of copy, speedups vs FA3 fp8/bf16 and the store fraction, from the measured rows."""
    by = {(r["shape"], r["batch"], r["context"], r["config"]): r for r in rows}
    for r in rows:
        if r["status"] != "ok":
            continue
        r["gbps"] = r["bytes"] / (r["time_us"] * 1e-6) / 1e9
        r["pct_copy"] = 100 * r["gbps"] / copy_gbps
        key = (r["shape"], r["batch"], r["context"])
        for ref, name in (("fa3-fp8", "speedup_vs_fp8"), ("fa3-bf16", "speedup_vs_bf16")):
            o = by.get(key + (ref,))
            r[name] = o["time_us"] / r["time_us"] if o and o["status"] == "ok" else None
        k2 = by.get(key + ("kivi2",))
        if "store_us" in r:
            ok = k2 and k2["status"] == "ok"
            r["store_frac_of_kivi2_decode"] = r["store_us"] / k2["time_us"] if ok else None
            r["store_steady_frac_of_kivi2_decode"] = r["store_steady_us"] / k2["time_us"] if ok else None
        if "step_us" in r:  # what the steady store adds to this row's own decode step, as launched and plainly
            r["store_in_step_frac"] = (r["step_us"] - r["time_us"]) / r["time_us"]
            r["plain_store_in_step_frac"] = (r["step_plain_store_us"] - r["time_us"]) / r["time_us"]


def table(rows):
    f = lambda v, fmt: "-" if v is None else format(v, fmt)  # noqa: E731
    head = f"{'shape':<10}{'B':>5}{'L':>7}  {'config':<9}{'time us':>10}{'MB read':>10}{'GB/s':>8}{'% copy':>8}" \
           f"{'x fp8':>7}{'x bf16':>7}{'store us':>10}{'st/kivi2':>9}{'steady us':>10}{'sst/kivi2':>10}" \
           f"{'step us':>9}{'+st':>7}{'+plain':>7}"
    lines = [head, "-" * len(head)]
    order = {c: i for i, c in enumerate(CONFIGS)}
    for r in sorted(rows, key=lambda r: (r["shape"], r["batch"], r["context"], order[r["config"]])):
        pre = f"{r['shape']:<10}{r['batch']:>5}{r['context']:>7}  {r['config']:<9}"
        if r["status"] != "ok":
            lines.append(pre + f"  {r['status']}")
            continue
        lines.append(pre + f"{r['time_us']:>10.1f}{r['bytes'] / 1e6:>10.1f}{r['gbps']:>8.0f}{r['pct_copy']:>7.1f}%"
                     f"{f(r.get('speedup_vs_fp8'), '.2f'):>7}{f(r.get('speedup_vs_bf16'), '.2f'):>7}"
                     f"{f(r.get('store_us'), '.1f'):>10}{f(r.get('store_frac_of_kivi2_decode'), '.3f'):>9}"
                     f"{f(r.get('store_steady_us'), '.1f'):>10}"
                     f"{f(r.get('store_steady_frac_of_kivi2_decode'), '.3f'):>10}"
                     f"{f(r.get('step_us'), '.1f'):>9}{f(r.get('store_in_step_frac'), '.3f'):>7}"
                     f"{f(r.get('plain_store_in_step_frac'), '.3f'):>7}")
    return "\n".join(lines)


def main():
    args = parse_args()
    device = args.device
    if device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # read when kivi_vllm.kernels' @triton.jit run, i.e. at import below
    import triton

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo, if not installed
    from kivi_vllm.kernels.decode import cuda_capability, decode, default_kernel, default_num_splits, set_options
    from kivi_vllm.kernels.store import store
    from kivi_vllm.layout import PageLayout

    kern = (decode, store, PageLayout, default_num_splits, default_kernel, cuda_capability)
    set_options(args.open_kernel, args.open_warps, args.pdl, prefetch=args.tc_prefetch, stages=args.tc_stages,
                transposed=args.tc_transposed)
    try:
        from vllm.version import __version__ as vllm_version
    except Exception:  # noqa: BLE001
        vllm_version = None
    meta = dict(date=datetime.datetime.now().isoformat(timespec="seconds"), device=device,
                gpu=torch.cuda.get_device_name() if device == "cuda" else "cpu (Triton interpreter)",
                torch=torch.__version__, triton=triton.__version__, vllm=vllm_version, argv=sys.argv[1:],
                timing="cpu wall time of one interpreted call (meaningless)" if device == "cpu" else
                "triton.testing.do_bench(warmup=25, rep=100, return_mode='median'), L2 flushed per rep, "
                + ("eager Python call" if args.eager else "on a CUDA-graph replay of one call"),
                fa_block_size=FA_BLOCK, kivi_block_size=KIVI_BLOCK, fa_num_splits=args.fa_num_splits)
    fa, fa_error = None, None
    if any(c.startswith("fa3") for c in args.configs):
        try:
            *fa, meta["vllm_default_fa_version"] = load_fa3()
        except Exception as e:  # noqa: BLE001 - the KIVI rows must still be produced
            fa, fa_error = None, f"{type(e).__name__}: {e}"
            log(f"FA3 unavailable: {fa_error}")
    t_start = time.time()
    meta["copy_gbps"] = copy_bandwidth(device)
    log(f"copy bandwidth (2 x bytes / time): {meta['copy_gbps']:.0f} GB/s")
    rows = []
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)

    def save():
        derive(rows, meta["copy_gbps"])
        with open(args.out, "w") as fh:
            json.dump(dict(meta, elapsed_s=time.time() - t_start, rows=rows), fh, indent=1)

    # configs outermost: every KIVI row exists before FA3 runs (a CUDA fault there cannot cost them)
    for config in args.configs:
        for shape in args.shapes:
            hq, h, d = SHAPES[shape]
            for B in args.batches:
                for L in args.contexts:
                    base = dict(shape=shape, batch=B, context=L, config=config)
                    try:
                        q = torch.randn(B, hq, d, dtype=torch.bfloat16, device=device)
                        key, value = (torch.randn(B, h, d, dtype=torch.bfloat16, device=device) for _ in range(2))
                        out = torch.empty_like(q)
                        qsl = torch.arange(B + 1, dtype=torch.int32, device=device)
                        seq_lens = torch.full((B,), L, dtype=torch.int32, device=device)
                        if args.long_context:
                            seq_lens[0] = args.long_context
                        io = (q, key, value, out, qsl, seq_lens)
                        if config.startswith("kivi"):
                            row = kivi_cell(int(config[-1]), B, L, hq, h, d, io, device, args, kern)
                        elif fa is None:
                            row = dict(status=f"n/a ({fa_error})")
                        else:
                            row = fa3_cell(config == "fa3-fp8", B, L, hq, h, d, io, device, args, fa)
                    except Exception as e:  # noqa: BLE001 - record and go on
                        traceback.print_exc()
                        row = dict(status=f"n/a ({type(e).__name__}: {' '.join(str(e).split())[:300]})")
                    free(device)  # the cell's caches died with its frame (and the exception's traceback)
                    rows.append(dict(base, **row))
                    save()
                    t = f"{row['time_us']:.1f} us" if "time_us" in row else row["status"]
                    log(f"[{time.time() - t_start:6.1f}s] {shape} B={B} L={L} {config}: {t}")
    save()
    log(table(rows))
    log(f"copy bandwidth {meta['copy_gbps']:.0f} GB/s; timing: {meta['timing']}; JSON: {args.out}")


if __name__ == "__main__":
    main()
