"""Prefill attention time per layer on one GPU: KIVI-2/4's Triton prefill step against vLLM 0.26's FlashAttention 3
on bf16 and fp8 caches, for the prompt chunks a prefill-heavy engine step carries.

    python benchmarks/prefill_attention.py --out prefill_attention.json                 # H200: default cases, both shapes
    python benchmarks/prefill_attention.py --configs kivi2 --block-q 128 --prefill-warps 8   # KIVI options
    python benchmarks/prefill_attention.py --configs kivi2 --prefill-unpack bytes --bulk-groups 0   # previous kernel
    python benchmarks/prefill_attention.py --configs kivi2 --bulk-groups 4 --bulk-dot 16   # the bulk loop's options
    python benchmarks/prefill_attention.py --configs kivi2 --exact --flash-first-chunks   # exact, first chunks in FA
    python benchmarks/prefill_attention.py --configs kivi2 --store-warps 2 4 8 16   # the store's warps per program
    python benchmarks/prefill_attention.py --configs kivi2 --store-probe   # the store: phases, listed rows, floor
    python benchmarks/prefill_attention.py --configs kivi2 --store-rows-per-program 1 2 4 16   # rows per store program

Why: on kivi-bench's `long` workload (256 x (3584 + 512), Llama-2-7B shape) steps full of prompt chunks took
672-816 ms with KIVI against 401 ms with fp8 (docs/benchmarks.md), although a decode step is faster. With KIVI's
default streaming prefill every prompt token reads the groups completed before it dequantized, so all prompt
attention runs in ``kivi_vllm.kernels.prefill`` (one program per 64 query rows and KV head: the groups every row
reads dequantized ``bulk_groups`` at a time in a branch-free loop, the few groups around the rows' own one at a time;
keys and values dequantized in registers, TF32 dots). This script times that path in isolation.

A case ``BxC`` is B requests whose chunk is C prompt tokens with nothing cached before (a first chunk);
``BxC+P`` has P tokens cached before the chunk (a continuation chunk; P a multiple of 32, the cache bytes random).
One layer, bf16 activations, shapes "llama2-7b" (32 query / 32 KV heads) and "gqa" (32 / 8), head size 128.

* kivi2 / kivi4: ``kivi_vllm.kernels.forward`` for the whole step (prefill phase 0, the stores of the chunk's
  tokens over the rows with work, ``store_rows``, prefill phase 1, as the engine runs them, and its decode launches,
  which exit at once here) over ``PageLayout(512, 128, b, b, 32, "kv", bf16)``; its store part is timed
  alone too (``store_us``: phase 0 + phase 1). ``--exact`` runs prefill="exact" instead (a chunk's own tokens
  exact; only groups cached before it dequantized), the KIVI paper's prefill; ``--exact --flash-first-chunks``
  computes the first chunks' attention with vLLM's FlashAttention, as the engine does (``kivi_vllm.kernels.flash``;
  its stores still run, the prefill kernel skips those rows).
* fa3-bf16 / fa3-fp8: ``flash_attn_varlen_func(fa_version=3)`` as vLLM's FlashAttentionImpl calls it for a prefill
  batch (paged NHD cache of block size 16, causal, ``max_seqlen_q`` C, ``seqused_k`` P + C, descales 1.0; fp8: the
  query cast to e4m3 first, untimed). vLLM writes the chunk's K/V into the cache with a separate op
  (``reshape_and_cache_flash``), not timed here; KIVI's figure includes its store.

Timing as in ``decode_attention.py``: median of ``triton.testing.do_bench`` over a CUDA-graph replay (L2 flushed
between repetitions); the first call compiles and is not timed. TFLOP/s counts the causal attention's
multiply-adds: 4 x B x query heads x 128 x (C x P + C x (C + 1) / 2). ``--device cpu`` (hidden) checks the script
under the Triton interpreter on tiny shapes: ``--device cpu --cases 1x48+32 --shapes gqa --configs kivi2``.
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

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from decode_attention import FA_BLOCK, GIB, SHAPES, bench, free, load_fa3, log, random_bytes

CONFIGS = ("kivi2", "kivi4", "fa3-bf16", "fa3-fp8")
GROUP, KIVI_BLOCK = 32, 512
DEFAULT_CASES = ["4x4096", "16x1024", "4x2048+2048"]  # a 16k-token step of first chunks; a continuation chunk


def parse_case(text: str) -> tuple[int, int, int]:
    """``BxC`` or ``BxC+P`` -> (B, C, P); raises ValueError for other forms or P not a multiple of 32."""
    try:
        b, rest = text.split("x")
        c, p = (rest.split("+") + ["0"])[:2]
        b, c, p = int(b), int(c), int(p)
    except ValueError:
        raise ValueError(f"case {text!r}: expected BxC or BxC+P, e.g. 4x4096 or 4x2048+2048") from None
    if b < 1 or c < 2 or p < 0 or p % GROUP:
        raise ValueError(f"case {text!r}: need B >= 1, C >= 2 and P a multiple of {GROUP}")
    return b, c, p


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", nargs="+", default=DEFAULT_CASES, help="BxC or BxC+P (module docstring)")
    p.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    p.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    p.add_argument("--out", default="docs/measurements/prefill_attention.json")
    p.add_argument("--exact", action="store_true", help="KIVI prefill=\"exact\" instead of the streaming rule")
    p.add_argument("--block-q", type=int, default=None, help="KIVI prefill: query tokens per tile (default block_q_for)")
    p.add_argument("--prefill-warps", type=int, default=4, help="KIVI prefill: warps per program")
    p.add_argument("--prefill-unpack", choices=["bytes", "words"], default="words",
                   help="KIVI prefill: code unpacking (kivi_vllm.kernels.prefill.prefill's unpack)")
    p.add_argument("--bulk-groups", type=int, default=None,
                   help="KIVI prefill: groups per step of the bulk loop (prefill's bulk_groups; 0 = none)")
    p.add_argument("--bulk-dot", choices=["fp32", "16", "f16"], default="fp32",
                   help="KIVI prefill: the bulk loop's dot operands (prefill's bulk_dot)")
    p.add_argument("--flash-first-chunks", action="store_true",
                   help="with --exact: first chunks (cases without +P) through vLLM's FlashAttention, as the engine "
                        "runs them (kivi_vllm.kernels.flash)")
    p.add_argument("--store-warps", type=int, nargs="+", default=None,
                   help="KIVI: also time the stores with these warps per program (store's num_warps; store_us is "
                        "the default's)")
    p.add_argument("--store-rows-per-program", type=int, nargs="+", default=None,
                   help="KIVI: also time the stores with these rows per program (store's rows_per_program; "
                        "store_us is the default's, rows_per_program_for; same bytes checked)")
    p.add_argument("--store-probe", action="store_true",
                   help="KIVI: also time each store phase alone, the stores over every row instead of the listed "
                        "ones (store_rows; same bytes checked), and over every row with every slot -1 (each program "
                        "exits after its slot load: that grid's floor)")
    p.add_argument("--eager", action="store_true", help="time the Python call, not a CUDA-graph replay")
    p.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.flash_first_chunks and not a.exact:
        p.error("--flash-first-chunks needs --exact (the streaming rule reads a first chunk's own groups quantized)")
    a.cases = [parse_case(c) for c in a.cases]
    return a


def io_tensors(B, C, P, hq, h, d, device):
    """The step's tensors: query [B*C, hq, d], key and value [B*C, h, d] (bf16, seeded normal), output like the
    query, query_start_loc [B + 1] int32 on the device and on the host, seq_lens [B] int32 (P + C)."""
    T = B * C
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(T, hq, d, generator=g, device=device).to(torch.bfloat16)
    key = torch.randn(T, h, d, generator=g, device=device).to(torch.bfloat16)
    value = torch.randn(T, h, d, generator=g, device=device).to(torch.bfloat16)
    out = torch.empty_like(q)
    qsl_host = torch.arange(B + 1, dtype=torch.int32) * C
    seq_lens = torch.full((B,), P + C, dtype=torch.int32, device=device)
    return q, key, value, out, qsl_host.to(device), qsl_host, seq_lens


def kivi_inputs(bits, B, C, P, h, d, qsl_host, device, block_q):
    """The KIVI side of a case: page layout, a cache of random bytes [B * ceil((P + C) / 512), h, page_bytes] uint8
    (each request owns its blocks, shuffled), block table [B, blocks] int32, the chunk tokens' slots [B * C] int64,
    and the prefill tiles for ``block_q`` query tokens (on ``device``)."""
    from kivi_vllm.kernels.prefill import prefill_tiles
    from kivi_vllm.layout import PageLayout

    lay = PageLayout(block_size=KIVI_BLOCK, head_size=d, k_bits=bits, v_bits=bits, group_size=GROUP, residual="kv",
                     residual_dtype=torch.bfloat16)
    nblk = math.ceil((P + C) / KIVI_BLOCK)
    kv_cache = random_bytes(B * nblk * h * lay.page_bytes, device).view(B * nblk, h, lay.page_bytes)
    block_table = torch.randperm(B * nblk, device=device).to(torch.int32).view(B, nblk)
    pos = P + torch.arange(C, device=device)  # positions of the chunk's tokens, every request
    blk = block_table[:, (pos // KIVI_BLOCK)].to(torch.int64)  # [B, C]
    slot = (blk * KIVI_BLOCK + pos % KIVI_BLOCK).reshape(-1).contiguous()
    tiles = tuple(torch.from_numpy(t).to(device) for t in prefill_tiles(qsl_host.numpy(), block_q))
    return lay, kv_cache, block_table, slot, tiles


def kivi_cell(bits, B, C, P, hq, h, d, io, device, args):
    """Time KIVI-``bits``' prefill step (``kivi_vllm.kernels.forward``) and its stores alone over a random-byte
    cache (:func:`kivi_inputs`); returns the row's fields (times in µs)."""
    from kivi_vllm.kernels import forward, store
    from kivi_vllm.kernels.prefill import block_q_for, resolve_bulk_groups

    q, key, value, out, qsl, qsl_host, seq_lens = io
    bq = args.block_q or block_q_for(hq, h)
    lay, kv_cache, block_table, slot, tiles = kivi_inputs(bits, B, C, P, h, d, qsl_host, device, bq)
    flash, flash_what = None, None
    if args.flash_first_chunks and P == 0:  # as the metadata builder decides: only steps with first chunks
        from kivi_vllm.kernels.flash import first_chunk_attention

        flash, flash_what = first_chunk_attention(q.dtype, d)
        if flash is None:
            raise RuntimeError(f"--flash-first-chunks: {flash_what}")

    from kivi_vllm.kernels.store import store_rows

    rows = torch.from_numpy(store_rows(qsl_host.numpy(), seq_lens.cpu().numpy(), GROUP)).to(device)  # as the builder

    def step():
        forward(q, key, value, kv_cache, block_table, qsl, seq_lens, slot, lay, d**-0.5, out, tiles, store_rows=rows,
                streaming=not args.exact, block_q=bq, prefill_unpack=args.prefill_unpack,
                prefill_warps=args.prefill_warps, prefill_bulk_groups=args.bulk_groups,
                prefill_bulk_dot=args.bulk_dot, first_chunk_attention=flash, max_query_len=C)

    def stores(warps=4, slots=slot, phases=(0, 1), listed=rows, per=None):
        for ph in phases:
            store(kv_cache, key, value, slots, qsl, seq_lens, lay, ph, num_warps=warps, rows=listed,
                  rows_per_program=per)

    pristine = (kv_cache.clone() if args.store_warps or args.store_probe or args.store_rows_per_program
                else None)  # the random bytes
    ms, mode = bench(step, device, args.eager)
    sms, _ = bench(stores, device, args.eager)
    by_warps, same_bytes = {}, {}
    if pristine is not None:  # what the default writes over the random bytes, once
        kv_cache.copy_(pristine)
        stores()
        written = kv_cache.clone()
    for warps in args.store_warps or []:
        kv_cache.copy_(pristine)  # a variant that skipped a write would leave random bytes, not the default's
        stores(warps)
        same_bytes[warps] = bool(torch.equal(kv_cache, written))
        by_warps[warps] = bench(lambda warps=warps: stores(warps), device, args.eager)[0] * 1e3
        log(f"    store, {warps} warps per program: {by_warps[warps]:.1f} us, same bytes {same_bytes[warps]}")
    by_per, same_by_per = {}, {}
    for per in args.store_rows_per_program or []:
        kv_cache.copy_(pristine)
        stores(per=per)
        same_by_per[per] = bool(torch.equal(kv_cache, written))
        by_per[per] = bench(lambda per=per: stores(per=per), device, args.eager)[0] * 1e3
        log(f"    store, {per} rows per program: {by_per[per]:.1f} us, same bytes {same_by_per[per]}")
    probe = {}
    if args.store_probe:
        kv_cache.copy_(pristine)
        stores(listed=None)
        probe["no_rows_same_bytes"] = bool(torch.equal(kv_cache, written))
        none = torch.full_like(slot, -1)
        probe["rows"] = rows.numel()
        for name, kw in (("phase0", dict(phases=(0,))), ("phase1", dict(phases=(1,))), ("no_rows", dict(listed=None)),
                         ("all_slots_minus1", dict(slots=none, listed=None))):
            probe[name + "_us"] = bench(lambda kw=kw: stores(**kw), device, args.eager)[0] * 1e3
        log("    store probe: " + ", ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}"
                                           for k, v in probe.items()))
    return dict(status="ok", time_us=ms * 1e3, store_us=sms * 1e3, store_us_by_warps=by_warps,
                store_us_by_rows_per_program=by_per, store_same_bytes_by_rows_per_program=same_by_per,
                store_same_bytes_by_warps=same_bytes, store_probe=probe, timing=mode, block_q=bq,
                prefill_warps=args.prefill_warps, prefill_unpack=args.prefill_unpack,
                bulk_groups=resolve_bulk_groups(lay, args.bulk_groups, args.prefill_unpack),
                bulk_dot=args.bulk_dot,
                cache_gib=kv_cache.numel() / GIB, exact=args.exact, first_chunks_by=flash_what)


def fa3_cell(fp8, B, C, P, hq, h, d, io, device, args, fa):
    """Time FA3's varlen call on a paged bf16 or fp8 (e4m3) cache of random finite bytes, as vLLM 0.26's
    FlashAttentionImpl makes it for a prefill batch; returns the row's fields (time in µs)."""
    varlen, scheduler_metadata = fa
    q, _, _, out, qsl, _, seq_lens = io
    dt, isz = (torch.float8_e4m3fn, 1) if fp8 else (torch.bfloat16, 2)
    nblk = math.ceil((P + C) / FA_BLOCK)
    cache_bytes = B * nblk * FA_BLOCK * h * 2 * d * isz
    kv = random_bytes(cache_bytes, device).view(B * nblk, FA_BLOCK, h, 2 * d * isz).view(dt)
    k_cache, v_cache = kv[..., :d], kv[..., d:]
    block_table = torch.randperm(B * nblk, device=device).to(torch.int32).view(B, nblk)
    one = torch.ones((), dtype=torch.float32, device=device)
    descale = one.expand(B, h)
    qq = q.float().clamp(-448.0, 448.0).to(dt) if fp8 else q
    meta = scheduler_metadata(
        batch_size=B, max_seqlen_q=C, max_seqlen_k=P + C, num_heads_q=hq, num_heads_kv=h, headdim=d,
        cache_seqlens=seq_lens, qkv_dtype=dt, cu_seqlens_q=qsl, page_size=FA_BLOCK, causal=True,
        window_size=(-1, -1), num_splits=0)

    def fn():
        varlen(q=qq, k=k_cache, v=v_cache, out=out, cu_seqlens_q=qsl, max_seqlen_q=C, seqused_k=seq_lens,
               max_seqlen_k=P + C, softmax_scale=d**-0.5, causal=True, alibi_slopes=None, window_size=[-1, -1],
               block_table=block_table, softcap=0, scheduler_metadata=meta, fa_version=3, q_descale=descale,
               k_descale=descale, v_descale=descale, num_splits=0)

    ms, mode = bench(fn, device, args.eager)
    return dict(status="ok", time_us=ms * 1e3, timing=mode, cache_gib=cache_bytes / GIB)


def main():
    args = parse_args()
    device = args.device
    if device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo, if not installed
    import triton

    try:
        from vllm.version import __version__ as vllm_version
    except Exception:  # noqa: BLE001
        vllm_version = None
    meta = dict(date=datetime.datetime.now().isoformat(timespec="seconds"), device=device, argv=sys.argv[1:],
                gpu=torch.cuda.get_device_name() if device == "cuda" else "cpu (Triton interpreter)",
                torch=torch.__version__, triton=triton.__version__, vllm=vllm_version)
    fa = None
    if any(c.startswith("fa3") for c in args.configs):
        try:
            *fa, meta["vllm_default_fa_version"] = load_fa3()
        except Exception as e:  # noqa: BLE001 - the KIVI rows must still be produced
            log(f"FA3 unavailable: {type(e).__name__}: {e}")
    rows = []
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    t_start = time.time()
    for config in args.configs:
        for shape in args.shapes:
            hq, h, d = SHAPES[shape]
            for B, C, P in args.cases:
                row = dict(config=config, shape=shape, batch=B, chunk=C, cached=P,
                           tflop=4 * B * hq * d * (C * P + C * (C + 1) / 2) / 1e12)
                try:
                    io = io_tensors(B, C, P, hq, h, d, device)
                    if config.startswith("kivi"):
                        row.update(kivi_cell(int(config[-1]), B, C, P, hq, h, d, io, device, args))
                    elif fa is None:
                        row.update(status="skipped (FA3 unavailable)")
                    else:
                        row.update(fa3_cell(config == "fa3-fp8", B, C, P, hq, h, d, io, device, args, fa))
                except Exception as e:  # noqa: BLE001 - record and go on
                    row.update(status=f"error: {type(e).__name__}: {e}", trace=traceback.format_exc()[-2000:])
                free(device)
                if row.get("status") == "ok":
                    row["tflops"] = row["tflop"] / (row["time_us"] * 1e-6)
                rows.append(row)
                log(f"{shape:<10} {B:>3}x{C:<6}+{P:<6} {config:<9} "
                    + (f"{row['time_us']:>10.1f} us {row['tflops']:>7.1f} TFLOP/s"
                       + (f"  store {row['store_us']:.1f} us" if "store_us" in row else "")
                       if row.get("status") == "ok" else row["status"]))
                with open(args.out, "w") as fh:
                    json.dump(dict(meta, elapsed_s=time.time() - t_start, rows=rows), fh, indent=1)
    by = {(r["shape"], r["batch"], r["chunk"], r["cached"], r["config"]): r for r in rows if r.get("status") == "ok"}
    for r in rows:
        ref = by.get((r["shape"], r["batch"], r["chunk"], r["cached"], "fa3-fp8"))
        if r.get("status") == "ok" and ref:
            r["x_fp8_time"] = r["time_us"] / ref["time_us"]
            log(f"{r['shape']:<10} {r['batch']}x{r['chunk']}+{r['cached']} {r['config']}: "
                f"{r['x_fp8_time']:.2f}x the fp8 FA3 time")
    with open(args.out, "w") as fh:
        json.dump(dict(meta, elapsed_s=time.time() - t_start, rows=rows), fh, indent=1)


if __name__ == "__main__":
    main()
