"""Triton kernels (store, decode, prefill) against the PyTorch reference on the same pages.

On a machine without a GPU the kernels run under ``TRITON_INTERPRET=1`` (set by ``tests/conftest.py`` for the whole
session, before anything imports Triton). Shapes are small; the sweep over realistic shapes runs on the H200
(``scripts/kernel_sweep.py``).

Tolerances: the store must be bit-exact (codes, fp16 scale/min, stage rows: every byte of the cache equals the
reference's). Attention is compared with the reference's float64 attention over the same dequantized cache, with
float32 outputs on both sides so that no output rounding hides an error: the kernels dequantize exactly (codes *
fp16 scale + fp16 min in float32) and accumulate in float32, so under the interpreter (float32 dots) the relative
error is ~1e-6 and the bound is 1e-4. On a GPU the dots are TF32 (10-bit mantissa) and the bound is the issue's
1e-2 (measured <= 6.1e-3 with bf16 outputs). One test keeps bf16 outputs to cover the output cast.
"""

from __future__ import annotations

import importlib
import itertools
import zlib

import numpy as np
import pytest
import torch

from kivi_vllm import reference
from kivi_vllm.layout import PageLayout

DEV = "cuda" if torch.cuda.is_available() else "cpu"


# Without a GPU, tests/conftest.py has set TRITON_INTERPRET=1 before anything imported Triton or these modules, so
# their kernels run in Triton's interpreter.
K = importlib.import_module("kivi_vllm.kernels")
PREFILL = importlib.import_module("kivi_vllm.kernels.prefill")
DECODE = importlib.import_module("kivi_vllm.kernels.decode")
STORE = importlib.import_module("kivi_vllm.kernels.store")


# Decode splits per (request, KV head) of the tests' steps under the interpreter. The library's default for these
# small batches is 32 for the FMA kernel and 16 for the MMA kernel (num_splits_for, sized for the H200's SMs),
# which leaves nearly every program without groups, and the interpreter runs each program in Python (~0.1 s):
# 4 splits (a power of two, as decode requires) still give requests empty splits (a one-group request) and splits
# of several groups. The default itself runs in test_decode_variants_agree and on a GPU.
SPLITS = None if DEV == "cuda" else 4


class Batch:
    """One engine step over several requests: context already in the cache (written by the reference store),
    this step's chunk per request, random garbage in every unwritten byte."""

    def __init__(self, layout, reqs, hq, hkv, dtype, seed, num_blocks=None, pad_tokens=0, pad_reqs=0,
                 out_dtype=None):
        g = torch.Generator().manual_seed(seed)
        B, D = layout.block_size, layout.head_size
        self.layout, self.reqs = layout, reqs
        pages = [-(-(c + n) // B) for c, n in reqs]
        num_blocks = num_blocks or sum(pages) + 3
        perm = torch.randperm(num_blocks, generator=g).tolist()
        self.block_table = torch.zeros(len(reqs), max(pages), dtype=torch.int32)
        k = 0
        for r, n in enumerate(pages):
            self.block_table[r, :n] = torch.tensor(perm[k : k + n])
            k += n
        self.cache = torch.randint(0, 256, (num_blocks, hkv, layout.page_bytes), dtype=torch.uint8, generator=g)

        def rnd(t, h):  # channel-dependent magnitudes, like real keys
            return (torch.randn(t, h, D, generator=g) * (0.5 + 3 * torch.rand(D, generator=g))).to(dtype)

        self.seqs = [(rnd(c + n, hq), rnd(c + n, hkv), rnd(c + n, hkv)) for c, n in reqs]
        # context written by earlier steps (the reference store is the ground truth for those bytes)
        for r, ((c, n), (_, ks, vs)) in enumerate(zip(reqs, self.seqs)):
            if c:
                reference.store(self.cache, ks[:c], vs[:c], self.slots(r, 0, c), layout)
        qsl = [0]
        for _, n in reqs:
            qsl.append(qsl[-1] + n)
        self.qsl_host = qsl
        cat = lambda i: torch.cat([s[i][c:] for (c, _), s in zip(reqs, self.seqs)])  # noqa: E731
        self.q, self.k, self.v = cat(0), cat(1), cat(2)
        self.slot_mapping = torch.cat([self.slots(r, c, c + n) for r, (c, n) in enumerate(reqs)])
        if pad_tokens:  # CUDA-graph style padding rows: slot -1, garbage values
            self.q, self.k, self.v = (torch.cat([x, rnd(pad_tokens, x.shape[1])]) for x in (self.q, self.k, self.v))
            self.slot_mapping = torch.cat([self.slot_mapping, torch.full((pad_tokens,), -1, dtype=torch.int64)])
        self.out_dtype = out_dtype or dtype
        # CUDA-graph style padding requests: query length 0, seq_len 0 (as vLLM pads)
        self.seq_lens = torch.tensor([c + n for c, n in reqs] + [0] * pad_reqs, dtype=torch.int32)
        self.qsl = torch.tensor(qsl + [qsl[-1]] * pad_reqs, dtype=torch.int32)
        self.block_table = torch.cat([self.block_table, torch.zeros(pad_reqs, self.block_table.shape[1],
                                                                     dtype=torch.int32)])

    def slots(self, r, a, b):
        pos = torch.arange(a, b)
        B = self.layout.block_size
        return self.block_table[r, pos // B].long() * B + pos % B

    def reference(self, streaming=True, device="cpu"):
        d = lambda x: x.to(device)  # noqa: E731
        cache = d(self.cache.clone())
        out = torch.zeros_like(d(self.q), dtype=self.out_dtype)
        n = self.qsl_host[-1]
        R = len(self.reqs)
        reference.forward(d(self.q[:n]), d(self.k[:n]), d(self.v[:n]), cache, d(self.block_table[:R]), self.qsl_host,
                          self.seq_lens[:R].tolist(), d(self.slot_mapping[:n]), self.layout,
                          self.layout.head_size ** -0.5, out=out[:n], streaming=streaming)
        return out.cpu(), cache.cpu()

    def kernels(self, streaming=True, block_q=None, num_splits=SPLITS, decode_stages=1, decode_kernel=None,
                decode_lane_rows=None, prefill_unpack="words", prefill_bulk_groups=None, prefill_bulk_dot="fp32",
                first_chunk_attention=None, decode_maxnreg=None, decode_rescale_slack=None,
                decode_work_target=None, work_seq_lens=None, store_rows=False):
        d = lambda x: x.to(DEV)  # noqa: E731
        cache = d(self.cache.clone())
        out = torch.full_like(d(self.q), float("nan"), dtype=self.out_dtype)  # poisoned: real rows must be written
        hq, hkv = self.q.shape[1], self.k.shape[1]
        bq = block_q or PREFILL.block_q_for(hq, hkv)
        tr, ts = PREFILL.prefill_tiles(np.array(self.qsl_host), bq)
        tiles = (d(torch.from_numpy(tr)), d(torch.from_numpy(ts))) if len(tr) else None
        K.forward(d(self.q), d(self.k), d(self.v), cache, d(self.block_table), d(self.qsl), d(self.seq_lens),
                  d(self.slot_mapping), self.layout, self.layout.head_size ** -0.5, out, tiles,
                  streaming=streaming, block_q=bq, num_splits=num_splits, decode_stages=decode_stages,
                  decode_kernel=decode_kernel, decode_lane_rows=decode_lane_rows, prefill_unpack=prefill_unpack,
                  prefill_bulk_groups=prefill_bulk_groups, prefill_bulk_dot=prefill_bulk_dot,
                  first_chunk_attention=first_chunk_attention, decode_maxnreg=decode_maxnreg,
                  decode_rescale_slack=decode_rescale_slack,
                  decode_work=None if decode_work_target is None else self.work(decode_work_target, num_splits,
                                                                                 decode_kernel, work_seq_lens),
                  max_query_len=max(b - a for a, b in itertools.pairwise(self.qsl_host)),
                  store_rows=d(torch.from_numpy(STORE.store_rows(self.qsl.numpy(), self.seq_lens.numpy(),
                                                                 self.layout.group_size))) if store_rows else None)
        return out.cpu(), cache.cpu()

    def stores(self, rows_per_program=None):
        """The cache after this step's store phases alone (``rows_per_program`` rows of the batch per program): the
        bytes :func:`kivi_vllm.kernels.forward` writes (its attention launches read the cache and never write it; it
        skips phase 1 in decode-only steps, where phase 1 has no work)."""
        cache = self.cache.to(DEV, copy=True)
        for phase in (0, 1):
            K.store(cache, self.k.to(DEV), self.v.to(DEV), self.slot_mapping.to(DEV), self.qsl.to(DEV),
                    self.seq_lens.to(DEV), self.layout, phase, rows_per_program=rows_per_program)
        return cache.cpu()

    def work(self, target, num_splits, kernel, seq_lens=None):
        """The decode work list of this batch on DEV, as the metadata builder makes it (host ``seq_lens`` default
        to the batch's own; a test may pass others, e.g. upper bounds)."""
        R, hkv = len(self.seq_lens), self.k.shape[1]
        splits = num_splits or DECODE.default_num_splits(kernel or "fma", R, hkv)
        seq = self.seq_lens.numpy() if seq_lens is None else np.asarray(seq_lens)
        items, counts = DECODE.decode_work(self.qsl.numpy(), seq, self.layout.group_size, R, hkv, target,
                                           splits)
        return torch.from_numpy(items).to(DEV), torch.from_numpy(counts).to(DEV)


TOL = 1e-4 if DEV == "cpu" else 1e-2  # float32 outputs; see the module docstring


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def seed_of(*args):
    return zlib.crc32(repr(args).encode())


# (context, chunk) per request: ends exactly at, just before and just after group (16/32) and block (64) edges
MIXES = {
    "decode": [(31, 1), (32, 1), (33, 1), (63, 1), (64, 1), (0, 1), (95, 1)],
    "first_chunks": [(0, 31), (0, 32), (0, 33), (0, 65), (0, 2)],
    "continuations": [(5, 27), (31, 2), (32, 40), (40, 88), (63, 66), (17, 3)],
    "mixed": [(40, 1), (0, 45), (31, 1), (33, 70), (64, 1), (10, 22)],
}


# every mix and residual at 2 bits; the 4-bit codes (keys and values, or keys only) on the mixed step; one program
# per row, or 4 rows (a program quantizing up to 4 groups one after the other) or 32 (the whole batch in one)
STORE_CASES = ([(mix, residual, (2, 2), rpp) for mix in sorted(MIXES) for residual, rpp in (("kv", 1), ("k", 4))]
               + [("mixed", residual, bits, rpp) for bits in ((4, 4), (4, 2)) for residual, rpp in (("kv", 4),
                                                                                                   ("k", 1))]
               + [("mixed", "kv", (2, 2), 32), ("decode", "kv", (2, 2), 4)])


@pytest.mark.parametrize("mix,residual,bits,rows_per_program", STORE_CASES,
                         ids=[f"{m}-{r}-k{b[0]}v{b[1]}-rpp{n}" for m, r, b, n in STORE_CASES])
def test_store_bit_exact(mix, residual, bits, rows_per_program):
    """The stores alone write the reference's bytes, whatever the rows per program. (With the attention launches
    between the phases, as the engine runs them: the attention tests, which compare the caches too.)"""
    lay = PageLayout(64, 64, bits[0], bits[1], 32, residual, torch.bfloat16)
    b = Batch(lay, MIXES[mix], 4, 2, torch.bfloat16, seed_of(mix, residual, bits), pad_tokens=3)
    _, cache_ref = b.reference()
    cache_ker = b.stores(rows_per_program)
    diff = (cache_ref != cache_ker).nonzero()
    assert diff.numel() == 0, f"{len(diff)} bytes differ, first at (block, head, byte) {diff[:4].tolist()}"


@pytest.mark.parametrize("mix", sorted(MIXES))
def test_store_rows_bit_exact(mix):
    """The stores over the listed rows only (store_rows: group-completing and open-group tokens, what the metadata
    builder gives steps with prompt chunks) write the reference's bytes, attention included."""
    lay = PageLayout(64, 64, 2, 2, 16, "kv", torch.bfloat16)
    b = Batch(lay, MIXES[mix], 4, 2, torch.bfloat16, seed_of("rows", mix), pad_tokens=3, out_dtype=torch.float32)
    out_ref, cache_ref = b.reference()
    out, cache = b.kernels(store_rows=True)
    n = b.qsl_host[-1]
    assert torch.equal(cache, cache_ref) and rel_err(out[:n], out_ref[:n]) < TOL


def test_store_rows_are_the_rows_with_work():
    """store_rows (vectorized over the batch) against a per-token loop over the same rule: position p of a request
    with seq_len s stores iff p % G == G - 1 or p >= (s // G) * G, or the request has one token; an empty request
    has no row. (The bytes such stores write: test_store_rows_bit_exact.)"""
    G = 16
    qsl = np.array([0, 1, 41, 42, 90, 90, 125])  # decode, 40-token first chunk, decode, continuation, empty, chunk
    seq = np.array([33, 40, 64, 100, 0, 35])
    want = []
    for r in range(len(seq)):
        L = qsl[r + 1] - qsl[r]
        for i in range(L):
            p = seq[r] - L + i
            if L == 1 or p % G == G - 1 or p >= seq[r] // G * G:
                want.append(qsl[r] + i)
    got = STORE.store_rows(qsl, seq, G)
    assert got.dtype == np.int32 and got.tolist() == want
    assert 0 in got and 41 in got  # both decode rows


def test_store_rows_per_program_checked():
    """rows_per_program must be a power of two up to 32 (one bit each of an int32 mask); on a GPU the default grows
    with the rows x heads until one wave of programs holds them (capped at 16); off CUDA it is 1."""
    lay = PageLayout(64, 64, 2, 2, 32, "kv", torch.bfloat16)
    b = Batch(lay, MIXES["decode"], 4, 2, torch.bfloat16, seed_of("rpp"))
    for bad in (0, 3, 64):
        with pytest.raises(ValueError, match="rows_per_program"):
            K.store(b.cache, b.k, b.v, b.slot_mapping, b.qsl, b.seq_lens, lay, 0, rows_per_program=bad)
    assert STORE.rows_per_program_for(4096, 32, torch.device("cpu")) == 1


def test_listed_store_rows_run_one_per_program(monkeypatch):
    """Steps with prompt chunks (listed rows) launch the store with one row per program whatever
    rows_per_program_for would give (their rows mostly complete a group, quantized one after the other within a
    program; and one value keeps one compiled specialization instead of one per row count); unlisted rows (decode
    steps) take rows_per_program_for's value."""
    lay = PageLayout(64, 64, 2, 2, 32, "kv", torch.bfloat16)
    b = Batch(lay, MIXES["decode"], 4, 2, torch.bfloat16, seed_of("listed"))
    monkeypatch.setattr(STORE, "rows_per_program_for", lambda *args: 16)
    launches = []

    class Spy:  # records the launch's constexprs instead of running the kernel
        def __getitem__(self, grid):
            return lambda *args, **kw: launches.append((grid, kw["ROWS_PER_PROGRAM"], kw["ROWS"]))

    monkeypatch.setattr(STORE, "_store_kernel", Spy())
    rows = torch.arange(b.k.shape[0], dtype=torch.int32, device=DEV)
    K.store(b.cache, b.k, b.v, b.slot_mapping, b.qsl, b.seq_lens, lay, 0, rows=rows)
    K.store(b.cache, b.k, b.v, b.slot_mapping, b.qsl, b.seq_lens, lay, 0)
    n = b.k.shape[0]
    assert launches == [((n, 2), 1, True), ((-(-n // 16), 2), 16, False)], launches


# one-token requests: the first row of the batch and of each 4-row program does not complete a group (positions 32
# and 64), rows 1, 3 and 6 do (positions 31, 63, 95); or none does
PDL_STORE_STEPS = {"completing": [(32, 1), (31, 1), (33, 1), (63, 1), (64, 1), (0, 1), (95, 1)],
                   "none": [(0, 1), (33, 1), (70, 1)]}


@pytest.mark.parametrize("residual", ["kv", "k"])
@pytest.mark.parametrize("step", sorted(PDL_STORE_STEPS))
def test_store_as_dependent_writes_only_after_the_wait(step, residual, monkeypatch):
    """store(pdl=True), the decode step's store as a programmatic dependent of the attention that reads the stage:
    every program calls griddepcontrol.wait exactly once, on the path with group-completing rows (the first of them
    not the program's first row) and without, the first program writes nothing before it, and the stores write the
    reference's bytes; with all rows in one program (one KV head) nothing at all is written before the wait. (The
    interpreter runs the kernel's Python, programs one after the other: gdc_wait is replaced by a probe that copies
    the cache.)"""
    lay = PageLayout(64, 64, 2, 2, 32, residual, torch.bfloat16)
    b = Batch(lay, PDL_STORE_STEPS[step], 2, 1, torch.bfloat16, seed_of("pdl-store", residual, step))
    _, cache_ref = b.reference()
    for per in (32, 4):
        cache = b.cache.to(DEV, copy=True)
        seen = []
        monkeypatch.setattr(STORE, "gdc_wait", lambda cache=cache, seen=seen: seen.append(cache.clone()))
        K.store(cache, b.k, b.v, b.slot_mapping, b.qsl, b.seq_lens, lay, 0, rows_per_program=per, pdl=True)
        assert len(seen) == -(-b.k.shape[0] // per), (per, len(seen))  # one wait per program (one KV head)
        assert torch.equal(seen[0], b.cache), per
        assert torch.equal(cache, cache_ref), per


@pytest.mark.parametrize("residual", ["kv", "k"])
def test_store_warm_up_writes_nothing(residual, monkeypatch):
    """store.warm_up (run by the backend in vLLM's first warm-up step) runs its launches over one row of slot -1
    and leaves every byte of the cache as it was (the real launches run: a stage or record write would show). The
    store kernel does not specialize on the row and request counts (a count of 1 or a multiple of 16 would compile
    another kernel mid-run)."""
    lay = PageLayout(64, 64, 2, 2, 32, residual, torch.bfloat16)
    b = Batch(lay, MIXES["mixed"], 4, 2, torch.bfloat16, seed_of("warm", residual))
    b.reference()  # fills the cache with a step's bytes
    b.cache.copy_(torch.randint(0, 256, b.cache.shape, dtype=torch.uint8, device=DEV))
    before = b.cache.clone()
    launches = []
    real = STORE._store_kernel

    class Spy:  # records each launch, then runs it
        def __getitem__(self, grid):
            def launch(*args, **kw):
                launches.append((grid, kw["PHASE"], kw["ROWS"], args[3].tolist()))
                return real[grid](*args, **kw)
            return launch

    monkeypatch.setattr(STORE, "_store_kernel", Spy())
    STORE.warm_up(b.cache, b.k, b.v, b.qsl, b.seq_lens, lay)
    assert torch.equal(b.cache, before)
    listed = residual == "kv"
    assert launches == [((1, 2), 0, listed, [-1]), ((1, 2), 1, listed, [-1])] + [((1, 2), 0, False, [-1])] * listed
    # (under the interpreter the decorator's arguments are kept as given; compiled, as ``params``)
    nospec = real.kwargs["do_not_specialize"] if hasattr(real, "kwargs") else [p.name for p in real.params
                                                                                if p.do_not_specialize]
    assert {"num_reqs", "num_rows"} <= set(nospec)


@pytest.mark.parametrize("residual", ["kv", "k"])
def test_store_warm_up_covers_every_launch_of_serving(residual, monkeypatch):
    """Every store launch forward() makes as the engine calls it - decode steps as a programmatic dependent,
    prompt steps over listed rows (residual "kv") or every row ("k"), at each rows-per-program a GPU's
    rows_per_program_for can pick - is one store.warm_up compiled: the same (phase, listed rows, rows per program,
    PDL), so the same Triton specialization."""
    lay = PageLayout(64, 64, 2, 2, 32, residual, torch.bfloat16)
    on_gpu = STORE.ROWS_PER_PROGRAM_CHOICES
    picks = iter(on_gpu * 8)
    launches = []

    class Spy:  # records the launch's specialization instead of running it
        def __getitem__(self, grid):
            return lambda *args, **kw: launches.append((kw["PHASE"], kw["ROWS"], kw["ROWS_PER_PROGRAM"], kw["PDL"]))

    monkeypatch.setattr(STORE, "_store_kernel", Spy())
    monkeypatch.setattr(STORE, "rows_per_program_for", lambda *args: next(picks))  # a GPU's picks, each in turn
    monkeypatch.setattr(STORE, "rows_per_program_choices", lambda device: on_gpu)
    monkeypatch.setattr(K, "pdl_for", lambda device: True)  # a Hopper GPU
    monkeypatch.setattr(K, "decode", lambda *args, **kw: None)  # the stores' launches only
    monkeypatch.setattr(K, "prefill", lambda *args, **kw: None)
    b = Batch(lay, MIXES["mixed"], 4, 2, torch.bfloat16, seed_of("warm-all", residual))
    STORE.warm_up(b.cache, b.k, b.v, b.qsl, b.seq_lens, lay, pdl=True)
    warmed, launches[:] = set(launches), []
    for mix in sorted(MIXES):
        step = Batch(lay, MIXES[mix], 4, 2, torch.bfloat16, seed_of("warm-all", residual, mix))
        for _ in on_gpu:  # listed rows as the metadata builder gives them: prompt steps, residual "kv"
            step.kernels(store_rows=residual == "kv" and mix != "decode")
    served = set(launches)
    assert {(0, False, per, True) for per in on_gpu} <= served  # the decode steps, as dependents
    assert served <= warmed, sorted(served - warmed)


# every mix with both residuals and both GQA ratios, each pairing of residual and ratio in two of the four mixes
ATTENTION_CASES = [(mix, residual, gqa) for i, mix in enumerate(sorted(MIXES))
                   for residual, gqa in ((("kv", 1), ("k", 3)), (("k", 1), ("kv", 3)))[i % 2]]


@pytest.mark.parametrize("mix,residual,gqa", ATTENTION_CASES)
def test_attention_matches_reference_bf16(mix, residual, gqa):
    """bf16 model, float32 outputs; two padding requests (query length 0, seq_len 0) as in a CUDA-graph batch."""
    lay = PageLayout(64, 64, 2, 2, 32, residual, torch.bfloat16)
    b = Batch(lay, MIXES[mix], 2 * gqa, 2, torch.bfloat16, seed_of(mix, residual, gqa), pad_tokens=2, pad_reqs=2,
              out_dtype=torch.float32)
    out_ref, cache_ref = b.reference()
    out, cache = b.kernels()
    n = b.qsl_host[-1]
    assert torch.equal(cache, cache_ref)
    assert not out[:n].isnan().any()
    assert rel_err(out[:n], out_ref[:n]) < TOL


def test_bf16_output_cast():
    lay = PageLayout(64, 64, 4, 2, 32, "kv", torch.bfloat16)
    b = Batch(lay, MIXES["mixed"], 4, 2, torch.bfloat16, seed_of("cast"))
    out_ref, _ = b.reference()
    out, _ = b.kernels()
    assert out.dtype == torch.bfloat16 and rel_err(out, out_ref) < 1e-2  # one bf16 ulp of two roundings


@pytest.mark.parametrize("case", [
    dict(head=32, group=16, block=32, bits=(2, 2), gqa=4),
    dict(head=64, group=16, block=48, bits=(4, 2), gqa=1),
    dict(head=80, group=16, block=64, bits=(2, 4), gqa=2),  # head size not a power of two: padded channels
    dict(head=128, group=32, block=64, bits=(4, 4), gqa=2),
])
def test_attention_fp32_shapes(case):
    lay = PageLayout(case["block"], case["head"], *case["bits"], case["group"], "kv", torch.float32)
    b = Batch(lay, MIXES["mixed"], 2 * case["gqa"], 2, torch.float32, seed_of(case))
    out_ref, cache_ref = b.reference()
    out, cache = b.kernels()
    assert torch.equal(cache, cache_ref)
    assert rel_err(out, out_ref) < TOL


@pytest.mark.parametrize("case", [
    dict(head=64, group=32, bits=(2, 2), gqa=1, residual="kv", mix="continuations", streaming=True),
    dict(head=80, group=16, bits=(4, 2), gqa=2, residual="k", mix="mixed", streaming=True),
    dict(head=128, group=32, bits=(2, 4), gqa=2, residual="kv", mix="continuations", streaming=False),
])
def test_prefill_unpack_bytes(case):
    """prefill(unpack="bytes") (one byte load per code; every other test runs the default, "words") gives the
    reference's attention too: head sizes whose words are padded (80), 2- and 4-bit codes for keys and values, both
    residuals and rules."""
    lay = PageLayout(64, case["head"], *case["bits"], case["group"], case["residual"], torch.float32)
    b = Batch(lay, MIXES[case["mix"]], 2 * case["gqa"], 2, torch.float32, seed_of("words", case))
    out_ref, cache_ref = b.reference(streaming=case["streaming"])
    out, cache = b.kernels(streaming=case["streaming"], prefill_unpack="bytes")
    assert torch.equal(cache, cache_ref)
    assert rel_err(out, out_ref) < TOL


@pytest.mark.parametrize("bulk_groups,bulk_dot,dtype,residual,streaming,head", [
    (0, "fp32", torch.float32, "kv", True, 64),
    (1, "fp32", torch.float32, "k", True, 64),
    (2, "fp32", torch.float32, "k", False, 64),
    (4, "fp32", torch.float32, "kv", True, 64),
    (4, "fp32", torch.float32, "kv", False, 80),  # head size 80: padded channels
    (2, "16", torch.float16, "kv", True, 64),
    (4, "16", torch.float16, "k", True, 80),
    (2, "f16", torch.bfloat16, "kv", True, 64),  # fp16 operands for a bf16 model
    (4, "f16", torch.bfloat16, "k", False, 80),
])
def test_prefill_bulk_loop(bulk_groups, bulk_dot, dtype, residual, streaming, head):
    """The groups below a tile's own groups go 1, 2 or 4 at a time through the bulk loop (or, with 0, one at a
    time through the general loop): contexts of several pages (128 tokens, 4 groups), tiles with and without such
    groups, both residuals and rules, head sizes 64 and 80 (padded channels). One group per step must give the
    general loop's output bit for bit; 2 and 4 must not (their longer dots sum in another order: proof that the bulk
    loop ran). With 16-bit operands ("16": the model's query, keys, values and
    probabilities rounded to bf16/fp16, float32 accumulation, as FlashAttention) the bound is the issue's bf16
    bound, 1e-2; the float32 bulk loop keeps the float32 bound. "f16" (fp16 operands for a bf16 model) runs
    here; "16" with fp16 models only: the Triton 3.6 interpreter's
    tl.dot of two bf16 tensors returns garbage (errors ~1e10 on a 16 x 16 product; fp16 and float32 are right), so
    the bf16 "16" path is checked on the GPU (``scripts/kernel_sweep.py --prefill-bulk-dot 16``); its code is the
    fp16 path's with another dtype."""
    lay = PageLayout(128, head, 2, 2, 32, residual, dtype)
    b = Batch(lay, [(200, 20), (130, 3), (0, 72), (96, 1), (33, 24), (256, 36)], 4, 2, dtype,
              seed_of("bulk", bulk_groups, bulk_dot, residual, head), out_dtype=torch.float32)
    out_ref, cache_ref = b.reference(streaming=streaming)
    out, cache = b.kernels(streaming=streaming, prefill_bulk_groups=bulk_groups, prefill_bulk_dot=bulk_dot)
    assert torch.equal(cache, cache_ref)
    err = rel_err(out, out_ref)
    assert err < (TOL if bulk_dot == "fp32" else 1e-2)
    if bulk_dot != "fp32" and DEV == "cpu":  # the 16-bit rounding is really there (the interpreter emulates it)
        assert err > 1e-4
    if bulk_groups and bulk_dot == "fp32":
        out0, _ = b.kernels(streaming=streaming, prefill_bulk_groups=0)
        if bulk_groups == 1:  # one group per step is the general loop's arithmetic, bit for bit
            assert torch.equal(out, out0)
        else:  # the bulk loop ran: longer dots, another summation order than without it
            assert not torch.equal(out, out0)


def test_prefill_bulk_groups_checked():
    lay = PageLayout(96, 64, 2, 2, 32, "kv", torch.bfloat16)  # 3 groups per page
    assert PREFILL.default_bulk_groups(lay) == 1
    assert PREFILL.default_bulk_groups(PageLayout(512, 64, 2, 2, 32, "kv", torch.bfloat16)) == PREFILL.BULK_GROUPS
    with pytest.raises(ValueError, match="power of two dividing the 3 groups"):
        PREFILL.check_bulk(lay, 2, "fp32", "words")
    with pytest.raises(ValueError, match="bulk_dot"):
        PREFILL.check_bulk(lay, 1, "bf16", "words")
    with pytest.raises(ValueError, match="needs unpack='words'"):
        PREFILL.check_bulk(lay, 1, "fp32", "bytes")


@pytest.mark.parametrize("residual", ["kv", "k"])
def test_exact_prefill_mode(residual):
    lay = PageLayout(64, 64, 2, 2, 32, residual, torch.bfloat16)
    b = Batch(lay, MIXES["continuations"] + [(20, 1)], 4, 2, torch.bfloat16, seed_of("exact", residual),
              out_dtype=torch.float32)
    out_ref, cache_ref = b.reference(streaming=False)
    out, cache = b.kernels(streaming=False)
    assert torch.equal(cache, cache_ref)
    assert rel_err(out, out_ref) < TOL
    # and it really is a different rule from streaming on these continuations
    assert rel_err(b.reference(streaming=True)[0], out_ref) > 1e-2


def causal_own_chunk(query, key, value, cu_seqlens, max_seqlen, scale, out):
    """Stand-in for vLLM's FlashAttention varlen (kivi_vllm.kernels.flash), float64: every request's rows attend
    causally to its own rows. Asserts what FlashAttention requires of its arguments."""
    assert out.dtype == query.dtype and cu_seqlens.dtype == torch.int32 and cu_seqlens.is_contiguous()
    cu = cu_seqlens.tolist()
    qpk = query.shape[1] // key.shape[1]
    for a, b in itertools.pairwise(cu):
        if b > a:
            assert b - a <= max_seqlen
            q, k, v = (x[a:b].double().transpose(0, 1) for x in (query, key, value))  # [heads, L, D]
            k, v = k.repeat_interleave(qpk, 0), v.repeat_interleave(qpk, 0)
            s = (q @ k.transpose(1, 2)) * scale
            s = s.masked_fill(torch.ones(b - a, b - a, dtype=torch.bool).triu(1).to(s.device), float("-inf"))
            out[a:b] = (s.softmax(-1) @ v).transpose(0, 1).to(out.dtype)


# first chunks (several, at group and block edges), continuation chunks and decode tokens in one step
FLASH_MIX = MIXES["mixed"] + [(0, 32), (0, 65), (5, 27), (0, 1)]


@pytest.mark.parametrize("residual", ["kv", "k"])
def test_exact_prefill_first_chunks_by_flash_attention(residual):
    """prefill="exact" with FlashAttention for first chunks (kernels.forward's first_chunk_attention): the same
    output as the reference's exact rule, the same cache bytes; and the prefill kernel leaves exactly the first
    chunks' rows to it (a stand-in that writes 7 everywhere: only first-chunk rows keep it)."""
    lay = PageLayout(64, 64, 2, 2, 32, residual, torch.bfloat16)
    b = Batch(lay, FLASH_MIX, 4, 2, torch.bfloat16, seed_of("flash", residual), pad_tokens=2, pad_reqs=2)
    out_ref, cache_ref = b.reference(streaming=False)
    calls = []
    out, cache = b.kernels(streaming=False, first_chunk_attention=lambda *a: (calls.append(a[3]),
                                                                              causal_own_chunk(*a)))
    n = b.qsl_host[-1]
    assert len(calls) == 1 and len(calls[0]) == len(FLASH_MIX) + 2 + 1  # every request, padding ones included
    assert torch.equal(cache, cache_ref)
    assert rel_err(out[:n], out_ref[:n]) < 1e-2  # bf16 outputs, as FlashAttention writes them

    out7, _ = b.kernels(streaming=False, first_chunk_attention=lambda *a: a[-1].fill_(7.0))
    first = torch.zeros(n, dtype=torch.bool)
    for (ctx, _), lo, hi in zip(FLASH_MIX, b.qsl_host, b.qsl_host[1:]):
        first[lo:hi] = ctx == 0 and hi - lo > 1  # a one-token request is a decode row, whatever its context
    assert (out7[:n][first] == 7).all()
    assert rel_err(out7[:n][~first], out_ref[:n][~first]) < 1e-2
    with pytest.raises(ValueError, match="needs prefill='exact'"):
        b.kernels(streaming=True, first_chunk_attention=causal_own_chunk)


# Decode variants: every (kernel, stages, lane_rows) with both residuals and both dtypes, and the split counts
# rotated over them (a Latin square) so that each variant meets each count, the library's default (None) included:
# 20 cases, where the full product has 80.
DECODE_VARIANTS = [("fma", 1, 1), ("fma", 1, 4), ("fma", 2, 4), ("mma", 1, 1), ("mma", 3, 1)]
DECODE_SPLITS = [1, 2, 8, None]
DECODE_CASES = [(DECODE_SPLITS[(v + c) % 4], dtype, *variant, residual)
                for v, variant in enumerate(DECODE_VARIANTS)
                for c, (dtype, residual) in enumerate(itertools.product([torch.float32, torch.bfloat16], ["kv", "k"]))]


@pytest.mark.parametrize("num_splits,dtype,kernel,decode_stages,lane_rows,residual", DECODE_CASES,
                         ids=["-".join(str(x).replace("torch.", "") for x in case) for case in DECODE_CASES])
def test_decode_variants_agree(num_splits, dtype, kernel, decode_stages, lane_rows, residual):
    """Both decode kernels (CUDA-core FMA, tensor-core MMA), split counts (None: decode()'s default, 32 splits for
    FMA and 16 for MMA at this batch), pipelining depths and the FMA kernel's per-lane partial value sums change
    only the summation order and the schedule: all give the reference's answer. (Every other test runs decode()'s
    defaults but 4 splits, SPLITS: with 2-bit values lane_rows 4 at 1 query head per KV head, 2 above; with 4-bit
    values 1.)"""
    lay = PageLayout(64, 64, 2, 2, 16, residual, dtype)
    b = Batch(lay, [(200, 1), (17, 1), (0, 1), (129, 1)], 4, 2, dtype, seed_of("splits", dtype),
              out_dtype=torch.float32, pad_reqs=1)
    out_ref, _ = b.reference()
    out, _ = b.kernels(num_splits=num_splits, decode_stages=decode_stages, decode_kernel=kernel,
                       decode_lane_rows=lane_rows)
    assert rel_err(out[:4], out_ref[:4]) < TOL


@pytest.mark.parametrize("open_kernel", ["light", "dot"])
@pytest.mark.parametrize("qpk,residual,dtype", [(1, "kv", torch.bfloat16), (3, "k", torch.float32)])
def test_open_group_kernels(open_kernel, qpk, residual, dtype, monkeypatch):
    """Both forms of the open group's launch (decode.open_kernel_for picks one by query heads per KV head; here
    each runs at 1 and 3) attend to the staged tokens and this step's, merge the FMA kernel's slots of a work list
    and of the split grid, and give the reference's answer; with residual "k" the open group's earlier values come
    dequantized from its record. Contexts end at, just before and just after group boundaries (the open group
    holds 1 to 16 tokens), and one request has no complete group (nothing to merge). The partials start as NaN (a
    slot read that no program wrote poisons the output), and the form asked for is the one launched."""
    monkeypatch.setattr(DECODE, "OPEN_KERNEL", open_kernel)
    launched = []

    class Spy:  # records which open-group form decode() launches
        def __init__(self, name, fn):
            self.name, self.fn = name, fn

        def __getitem__(self, grid):
            launched.append(self.name)
            return self.fn[grid]

    monkeypatch.setattr(DECODE, "_open_group_kernel", Spy("light", DECODE._open_group_kernel))
    monkeypatch.setattr(DECODE, "_decode_split_kernel", Spy("dot", DECODE._decode_split_kernel))
    lay = PageLayout(64, 64, 2, 2, 16, residual, dtype)
    b = Batch(lay, [(159, 1), (160, 1), (3, 1), (17, 1), (40, 9)], 2 * qpk, 2, dtype,
              seed_of("open", open_kernel, qpk), out_dtype=torch.float32, pad_reqs=1)
    out_ref, _ = b.reference()
    n = b.qsl_host[-1]
    empty, empty_like = torch.empty, torch.empty_like

    def nan(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    for target in (None, 8):  # the split grid, a work list
        launched.clear()
        monkeypatch.setattr(torch, "empty", lambda *a, **k: nan(empty(*a, **k)))
        monkeypatch.setattr(torch, "empty_like", lambda *a, **k: nan(empty_like(*a, **k)))
        out, _ = b.kernels(num_splits=4, decode_kernel="fma", decode_work_target=target)
        monkeypatch.setattr(torch, "empty", empty)
        monkeypatch.setattr(torch, "empty_like", empty_like)
        assert launched == [open_kernel], launched
        assert rel_err(out[:n], out_ref[:n]) < TOL, target


@pytest.mark.parametrize("kernel", ["fma", "tc"])
def test_pdl_launches_pair_the_constexpr_with_the_launch(kernel, monkeypatch):
    """Where decode.pdl_for allows it (a Hopper GPU; patched here), a pure-decode step's launches form one
    programmatic chain: the first kernel (``PDL``: lets its dependent start) -> the open group, either form
    (``PDL`` = it waits for the slots, and ``launch_pdl``) -> the store (``PDL`` = it waits before writing, and
    ``launch_pdl``); a kernel that waits but is launched plainly, or the reverse, would be a race or a stall. With
    pdl_for False none of them is. Prompt steps' stores are never dependents. (Launches are recorded, not run.)"""
    tc = importlib.import_module("kivi_vllm.kernels.decode_tc") if kernel == "tc" else None
    launches = []

    class Spy:  # records (kernel, PDL constexpr, launch_pdl) instead of running it
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *args, **kw: launches.append((self.name, kw.get("PDL"), kw.get("launch_pdl", False)))

    for name in ("_decode_fma_kernel", "_open_group_kernel", "_decode_split_kernel"):
        monkeypatch.setattr(DECODE, name, Spy(name))
    monkeypatch.setattr(STORE, "_store_kernel", Spy("store"))
    monkeypatch.setattr(K, "prefill", lambda *args, **kw: None)
    if tc is not None:
        monkeypatch.setattr(tc, "tc_kernel", lambda: Spy("tc"))
        monkeypatch.setattr(DECODE, "cuda_capability", lambda device: (9, 0))  # an H200
    first = "tc" if kernel == "tc" else "_decode_fma_kernel"
    for qpk, open_form in ((1, "_open_group_kernel"), (4, "_decode_split_kernel")):
        lay = PageLayout(64, 128, 2, 2, 32, "kv", torch.bfloat16)
        decode_step = Batch(lay, MIXES["decode"], 2 * qpk, 2, torch.bfloat16, seed_of("pdl", qpk))
        mixed_step = Batch(lay, MIXES["mixed"], 2 * qpk, 2, torch.bfloat16, seed_of("pdl-mixed", qpk))
        for pdl in (True, False):
            monkeypatch.setattr(DECODE, "pdl_for", lambda device, pdl=pdl: pdl)
            monkeypatch.setattr(K, "pdl_for", lambda device, pdl=pdl: pdl)
            launches.clear()
            decode_step.kernels(decode_kernel=kernel)
            assert launches == [(first, pdl, False), (open_form, pdl, pdl), ("store", pdl, pdl)], launches
            launches.clear()
            mixed_step.kernels(decode_kernel=kernel, store_rows=True)
            assert launches == [(first, pdl, False), (open_form, pdl, pdl), ("store", False, False),
                                ("store", False, False)], launches


@pytest.mark.parametrize("target", [1, 8, 40])
@pytest.mark.parametrize("host_seq", ["exact", "upper", "low"])
def test_decode_work_list(target, host_seq, monkeypatch):
    """The FMA kernel over a work list (decode_work, in waves of ``target`` programs) gives the reference's answer,
    the open group's launch merging only the slots the list names (the partials start as NaN), and request 0 (12
    complete groups, 4 splits) has a finite partial maximum in each of its items' slots that has keys. Host sequence
    lengths that are upper bounds (+40) or too low (17: one complete group, one item) still cover every group,
    because each request's last item runs to the end of what the device reads. A prefill request, a request without
    complete groups and a padding request get no item."""
    lay = PageLayout(64, 64, 2, 2, 16, "kv", torch.float32)
    b = Batch(lay, [(200, 1), (17, 1), (0, 1), (40, 9), (129, 1)], 4, 2, torch.float32,
              seed_of("work", target, host_seq), out_dtype=torch.float32, pad_reqs=1)
    out_ref, _ = b.reference()
    seq = b.seq_lens.numpy()
    seq = {"exact": seq, "upper": np.where(seq > 0, seq + 40, 0), "low": np.where(seq > 0, 17, 0)}[host_seq]
    made = []
    empty = torch.empty

    def recording_empty(*args, **kwargs):  # decode() allocates its partials (max first) with torch.empty
        t = empty(*args, **kwargs)
        if t.is_floating_point():  # NaN: a slot the open group's merge reads but no item wrote poisons the output
            t.fill_(float("nan"))
        made.append(t)
        return t

    monkeypatch.setattr(torch, "empty", recording_empty)
    out, _ = b.kernels(num_splits=4, decode_kernel="fma", decode_work_target=target, work_seq_lens=seq)
    monkeypatch.undo()
    n = b.qsl_host[-1]
    assert rel_err(out[:n], out_ref[:n]) < TOL
    items, counts = b.work(target, 4, "fma", seq)
    counts = counts.cpu()
    assert counts[3] == 0 and counts[5] == 0  # prefill, padding
    assert counts[2] == 0 or host_seq != "exact"  # no complete group (by the host's count)
    part_m = next(t for t in made if t.dtype == torch.float32 and t.numel() == 6 * 4 * 4).view(6, 4, 4)
    m0 = part_m[0, :, :4].cpu()  # request 0, query heads x its 4 split slots
    mine = items.cpu()[items.cpu()[:, 0] == 0]
    n0 = (201 - 1) // 16  # the groups request 0 has on the device
    # an item has keys iff its range, clamped to the device's groups, is not empty (upper bounds can empty the last)
    has_keys = mine[:, 2] < torch.clamp(mine[:, 3], max=n0)
    assert 1 <= len(mine) <= 4 and (torch.isfinite(m0[:, : len(mine)]) == has_keys[None, :]).all(), (mine, m0)
    assert has_keys.any()


def test_decode_work_partition():
    """decode_work's list, checked item by item: every decode request with complete groups has items in slot order
    that cover its groups [0, n) without overlap, none empty, the last ending at WORK_END, at most min(n,
    max_splits) of them; other requests have none; the list has work_capacity rows (whole waves), every row used
    unless every request is at its cap; the sizes balance (uniform batches: a wave of 1,056 programs at 8 KV heads
    is 132 rows: 2 items per request at batch 64, 8 at batch 16; a long request among short ones gets items of about
    the short ones' size)."""
    D = DECODE
    rng = np.random.default_rng(0)

    def check(qsl, seq, G, H, wave, splits):
        R = len(seq)
        items, counts = D.decode_work(qsl, seq, G, R, H, wave, splits)
        cap = D.work_capacity(R, H, wave)
        assert items.shape == (cap, 4) and counts.shape == (R,) and cap % max(1, wave // H) == 0 and cap >= R
        used = items[items[:, 0] >= 0]
        assert len(used) == counts.sum() and (items[len(used):, 0] == -1).all()
        n = np.where(np.diff(qsl) == 1, np.maximum(seq - 1, 0) // G, 0)
        for r in range(R):
            mine = used[used[:, 0] == r]
            assert len(mine) == counts[r]
            if n[r] == 0:
                assert counts[r] == 0
                continue
            assert 1 <= len(mine) <= min(n[r], splits) and (mine[:, 1] == np.arange(len(mine))).all()
            assert mine[0, 2] == 0 and (mine[1:, 2] == mine[:-1, 3]).all() and mine[-1, 3] == D.WORK_END
            ends = np.append(mine[:-1, 3], n[r])
            assert (ends > mine[:, 2]).all() and (ends <= n[r]).all()
        assert len(used) == cap or (counts == np.minimum(n, splits)).all()
        sizes = np.where(used[:, 3] == D.WORK_END, n[used[:, 0]], used[:, 3]) - used[:, 2]
        return counts, sizes

    for _ in range(50):
        R = int(rng.integers(1, 40))
        q_len = rng.choice([0, 1, 1, 1, 7], R)
        seq = np.where(q_len > 0, rng.integers(1, 5000, R) + q_len, 0)
        check(np.concatenate([[0], np.cumsum(q_len)]), seq, 32, int(rng.choice([1, 8, 32])),
              int(rng.choice([1, 64, 1056])), int(rng.choice([1, 4, 32])))
    ones = lambda R: np.arange(R + 1)  # noqa: E731
    c, sz = check(ones(64), np.full(64, 4096), 32, 8, 1056, 32)  # 127 groups each
    assert c.sum() == 132 and set(c) == {2, 3} and sz.max() == 64
    c, sz = check(ones(16), np.full(16, 1024), 32, 8, 1056, 32)
    assert c.sum() == 132 and set(c) == {8, 9}
    c, sz = check(ones(256), np.full(256, 4096), 32, 8, 1056, 8)  # 2 waves: 264 rows
    assert c.sum() == 264 and set(c) == {1, 2}
    c, sz = check(ones(64), np.array([16384] + [1024] * 63), 32, 8, 1056, 32)  # 511 and 31 groups
    assert c[0] == 17 and c.sum() == 132 and sz.max() == 31  # the long one in items no larger than a short one
    c, sz = check(ones(256), np.array([16384] + [1024] * 255), 32, 8, 1056, 8)
    assert c[0] == 8 and sz.max() == 64  # at most max_splits items: 511 / 8
    with pytest.raises(ValueError, match="decode_work"):
        D.decode_work(ones(2), np.array([5, 5]), 32, 2, 8, 0, 4)


def test_decode_work_checked():
    """A work list with the MMA kernel, of the wrong dtype or with fewer rows than requests is refused."""
    lay = PageLayout(64, 64, 2, 2, 16, "kv", torch.float32)
    b = Batch(lay, [(40, 1), (70, 1)], 2, 2, torch.float32, seed_of("work-checked"))
    good = (torch.full((4, 4), -1, dtype=torch.int32), torch.zeros(2, dtype=torch.int32))
    bad = {"'mma'": ("mma", good), "work must be": ("fma", (good[0].long(), good[1])),
           "work must be ": ("fma", (good[0][:1], good[1]))}
    for match, (kernel, work) in bad.items():
        with pytest.raises(ValueError, match=match.strip()):
            K.decode(b.q, b.k, b.v, b.cache, b.block_table, b.qsl, b.seq_lens, lay, 0.125, torch.empty_like(b.q),
                     kernel=kernel, work=work)


@pytest.mark.parametrize("lane_rows", [2, 4])
def test_decode_lane_rows_with_4bit_values(lane_rows):
    """With 4-bit values decode() defaults to lane_rows 1 (faster on the H200); the per-lane partial value sums still
    give the reference's answer there (4-bit values pack 8 codes per word, a different value tile)."""
    lay = PageLayout(64, 64, 4, 4, 16, "kv", torch.float32)
    b = Batch(lay, [(200, 1), (17, 1), (129, 1)], 4, 2, torch.float32, seed_of("lane4", lane_rows),
              out_dtype=torch.float32)
    out_ref, _ = b.reference()
    out, _ = b.kernels(decode_kernel="fma", decode_lane_rows=lane_rows)
    assert rel_err(out[:3], out_ref[:3]) < TOL


def test_kernels_read_codes():
    """Flipping stored key codes of a complete group changes the decode output (the kernel reads the codes)."""
    lay = PageLayout(64, 64, 2, 2, 32, "kv", torch.float32)
    b = Batch(lay, [(96, 1)], 2, 2, torch.float32, seed_of("flip"))
    out1, _ = b.kernels()
    blk = b.block_table[0, 0].item()
    lay.k_codes(b.cache[blk])[:, 1] ^= 0xFF
    out2, _ = b.kernels()
    assert rel_err(out2, out1) > 1e-3


def test_prefill_tiles():
    tr, ts = PREFILL.prefill_tiles(np.array([0, 1, 5, 6, 40]), 16)
    assert tr.tolist() == [1, 3, 3, 3] and ts.tolist() == [0, 0, 16, 32]
