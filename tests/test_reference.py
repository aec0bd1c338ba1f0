"""The PyTorch paged path (store, read, attention over KIVI pages) against the dense float64 oracle."""

import itertools
import zlib

import pytest
import torch

from kivi_vllm import reference
from kivi_vllm.layout import PageLayout

import oracle


def chunks_to_calls(lengths):
    bounds = list(itertools.accumulate([0, *lengths]))
    return list(zip(bounds[:-1], bounds[1:]))


def run_paged(layout, q, k, v, chunk_lengths, block_ids, streaming=True, num_blocks=16, seed=0, cache=None):
    """Feed one sequence through reference.forward chunk by chunk; return (output, cache)."""
    g = torch.Generator().manual_seed(seed)
    if cache is None:  # garbage everywhere: nothing may depend on unwritten bytes
        cache = torch.randint(0, 256, (num_blocks, k.shape[1], layout.page_bytes), dtype=torch.uint8, generator=g)
    bt = torch.tensor([block_ids], dtype=torch.int32)
    pos = torch.arange(q.shape[0])
    slots = bt[0, pos // layout.block_size].long() * layout.block_size + pos % layout.block_size
    out = torch.full_like(q, float("nan"))
    for a, b in chunks_to_calls(chunk_lengths):
        reference.forward(q[a:b], k[a:b], v[a:b], cache, bt, [0, b - a], [b], slots[a:b], layout,
                          q.shape[-1] ** -0.5, out=out[a:b], streaming=streaming)
    return out, cache


def rand_qkv(T, hq, hkv, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    mk = lambda h: (torch.randn(T, h, d, generator=g) * (1 + 3 * torch.rand(d, generator=g))).to(dtype)  # noqa: E731
    return mk(hq), mk(hkv), mk(hkv)


# chunk patterns that end exactly at, just before and just after group (32) and block (64) boundaries
PATTERNS = {
    "one_shot": [150],
    "decode_only": [1] * 150,
    "group_edges": [31, 1, 1, 31, 32, 33, 21],
    "block_edges": [63, 1, 64, 1, 21],
    "prefill_then_decode": [97] + [1] * 40 + [13],
}


@pytest.mark.parametrize("pattern", sorted(PATTERNS))
@pytest.mark.parametrize("residual", ["kv", "k"])
@pytest.mark.parametrize("bits", [(2, 2), (4, 4), (4, 2)])
def test_forward_matches_oracle(pattern, residual, bits):
    lay = PageLayout(64, 64, bits[0], bits[1], 32, residual, torch.bfloat16)
    q, k, v = rand_qkv(150, 6, 2, 64, torch.bfloat16, seed=zlib.crc32(f"{pattern}{residual}{bits}".encode()))
    out, _ = run_paged(lay, q, k, v, PATTERNS[pattern], [9, 3, 14])
    ref = oracle.attention(q, k, v, k_bits=bits[0], v_bits=bits[1], group=32, residual=residual)
    err = (out.double() - ref).abs().max() / ref.abs().max()
    assert err < 1e-2, err  # bf16 output rounding
    # and in float32 output precision the two agree to float32 rounding of the dot products
    out32, _ = run_paged(lay, q.float(), k.bfloat16().float(), v.bfloat16().float(), PATTERNS[pattern], [9, 3, 14])
    ref32 = oracle.attention(q.float(), k.float(), v.float(), k_bits=bits[0], v_bits=bits[1], group=32,
                             residual=residual)
    assert (out32.double() - ref32).abs().max() / ref32.abs().max() < 2e-5


@pytest.mark.parametrize("head_size", [64, 80, 96, 128, 256])
@pytest.mark.parametrize("gqa", [1, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_head_sizes_gqa_dtypes(head_size, gqa, dtype):
    lay = PageLayout(64, head_size, 2, 2, 32, "kv", dtype)  # the stage holds this dtype
    q, k, v = rand_qkv(100, 2 * gqa, 2, head_size, dtype, seed=head_size + gqa)
    out, _ = run_paged(lay, q, k, v, [40, 1, 1, 30, 28], [2, 0])
    ref = oracle.attention(q, k, v, k_bits=2, v_bits=2, group=32)
    assert out.dtype == dtype and not torch.isnan(out).any()
    # the only error is the final rounding to the output dtype (float32: BLAS vs float64 order, 2e-5)
    tol = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    assert (out.double() - ref).abs().max() / ref.abs().max() < tol


@pytest.mark.parametrize("residual", ["kv", "k"])
def test_prefill_exact_mode_matches_oracle(residual):
    lay = PageLayout(64, 64, 2, 2, 32, residual, torch.float32)
    q, k, v = rand_qkv(120, 4, 2, 64, torch.float32, seed=7)
    lengths = [45, 30, 1, 1, 43]
    out, _ = run_paged(lay, q, k, v, lengths, [5, 1], streaming=False)
    starts = list(itertools.accumulate([0, *lengths[:-1]]))
    ref = oracle.attention(q, k, v, k_bits=2, v_bits=2, group=32, residual=residual, prefill="exact",
                           chunk_starts=starts)
    assert (out.double() - ref).abs().max() / ref.abs().max() < 2e-5


def test_streaming_output_and_pages_do_not_depend_on_chunking():
    lay = PageLayout(64, 64, 2, 2, 32, "kv", torch.bfloat16)
    q, k, v = rand_qkv(150, 6, 2, 64, torch.bfloat16, seed=3)
    outs, caches = [], []
    for pattern in PATTERNS.values():
        o, c = run_paged(lay, q, k, v, pattern, [4, 2, 7], num_blocks=8, seed=11)  # same garbage everywhere
        outs.append(o)
        caches.append(c)
    for o, c in zip(outs[1:], caches[1:]):
        assert torch.equal(o, outs[0]), "a query's output depends on the chunk it was computed in"
        # the records of the complete pages are bit-identical (bytes past the records are stage leftovers)
        end = lay.num_groups * lay.record_bytes
        assert torch.equal(c[[4, 2], :, :end], caches[0][[4, 2], :, :end])
        # and so are the staged tokens 128..149 of the open group
        assert torch.equal(lay.k_stage(c[7])[:, :22], lay.k_stage(caches[0][7])[:, :22])
        assert torch.equal(lay.v_stage(c[7])[:, :22], lay.v_stage(caches[0][7])[:, :22])


def test_read_context_complete_groups_dequantized_open_group_exact():
    lay = PageLayout(64, 128, 4, 2, 32, "kv", torch.float16)
    q, k, v = rand_qkv(101, 2, 2, 128, torch.float16, seed=5)
    _, cache = run_paged(lay, q, k, v, [50, 51], [3, 0])
    kc, vc = reference.read_context(cache, torch.tensor([3, 0]), 101, lay)
    assert torch.equal(kc[:96].double(), oracle.dequantized_keys(k[:96], 4, 32))
    assert torch.equal(vc[:96].double(), oracle.dequantized_values(v[:96], 2, 32))
    assert torch.equal(kc[96:], k[96:].float()) and torch.equal(vc[96:], v[96:].float())


def test_requests_in_one_step_never_share_groups():
    """Two requests stored in the same step: each one's groups hold only its own tokens (per-request grouping)."""
    lay = PageLayout(64, 64, 2, 2, 32, "kv", torch.float32)
    qa, ka, va = rand_qkv(70, 2, 1, 64, torch.float32, seed=1)
    qb, kb, vb = rand_qkv(70, 2, 1, 64, torch.float32, seed=2)
    kb = kb * 10  # very different ranges: any mixing would show in the scales
    cache = torch.zeros(8, 1, lay.page_bytes, dtype=torch.uint8)
    bt = torch.tensor([[1, 5], [6, 2]], dtype=torch.int32)
    pos = torch.arange(70)
    slots_a = bt[0, pos // 64].long() * 64 + pos % 64
    slots_b = bt[1, pos // 64].long() * 64 + pos % 64
    out_a, out_b = torch.zeros(70, 2, 64), torch.zeros(70, 2, 64)
    for a, b in [(0, 20), (20, 45), (45, 70)]:  # both requests' chunks in every step
        n = b - a
        q = torch.cat([qa[a:b], qb[a:b]])
        kk, vv = torch.cat([ka[a:b], kb[a:b]]), torch.cat([va[a:b], vb[a:b]])
        o = reference.forward(q, kk, vv, cache, bt, [0, n, 2 * n], [b, b], torch.cat([slots_a[a:b], slots_b[a:b]]),
                              lay, 0.125)
        out_a[a:b], out_b[a:b] = o[:n], o[n:]
    for out, q, k, v in ((out_a, qa, ka, va), (out_b, qb, kb, vb)):
        ref = oracle.attention(q, k, v, k_bits=2, v_bits=2, group=32, scale=0.125)
        assert (out.double() - ref).abs().max() / ref.abs().max() < 2e-5
    for k, v, row in ((ka, va, bt[0]), (kb, vb, bt[1])):
        kc, vc = reference.read_context(cache, row, 70, lay)
        assert torch.equal(kc[:64].double(), oracle.dequantized_keys(k[:64], 2, 32))
        assert torch.equal(vc[:64].double(), oracle.dequantized_values(v[:64], 2, 32))
        assert torch.equal(kc[64:], k[64:]) and torch.equal(vc[64:], v[64:])


def test_padding_slots_and_empty_requests_are_ignored():
    lay = PageLayout(64, 64, 2, 2, 32, "kv", torch.float32)
    q, k, v = rand_qkv(40, 2, 1, 64, torch.float32, seed=9)
    cache = torch.zeros(4, 1, lay.page_bytes, dtype=torch.uint8)
    bt = torch.tensor([[2], [0]], dtype=torch.int32)
    slots = torch.cat([torch.arange(128, 168), torch.full((8,), -1)])  # 40 real tokens then CUDA-graph padding
    qp = torch.cat([q, torch.randn(8, 2, 64)])
    kp, vp = torch.cat([k, torch.randn(8, 1, 64)]), torch.cat([v, torch.randn(8, 1, 64)])
    out = torch.zeros(48, 2, 64)
    reference.forward(qp, kp, vp, cache, bt, [0, 40, 40], [40, 0], slots, lay, 0.125, out=out)
    ref = oracle.attention(q, k, v, k_bits=2, v_bits=2, group=32, scale=0.125)
    assert (out[:40].double() - ref).abs().max() / ref.abs().max() < 2e-5
    assert (out[40:] == 0).all() and (cache[[0, 1, 3]] == 0).all(), "padding wrote somewhere"


def test_unused_bytes_do_not_matter_and_codes_do():
    lay = PageLayout(64, 64, 2, 2, 32, "kv", torch.float32)
    q, k, v = rand_qkv(140, 2, 1, 64, torch.float32, seed=4)
    _, cache = run_paged(lay, q[:139], k[:139], v[:139], [139], [0, 1, 2], num_blocks=3)
    bt = torch.tensor([[0, 1, 2]], dtype=torch.int32)

    def decode(c):
        out = torch.zeros(1, 2, 64)
        reference.forward(q[139:], k[139:], v[139:], c.clone(), bt, [0, 1], [140], torch.tensor([139 - 128 + 128]),
                          lay, 0.125, out=out)
        return out

    base = decode(cache)
    junk = cache.clone()
    end = lay.num_groups * lay.record_bytes
    junk[:2, :, end:] = torch.randint(0, 256, junk[:2, :, end:].shape, dtype=torch.uint8)  # full pages: stage leftovers
    assert torch.equal(decode(junk), base)
    flipped = cache.clone()
    lay.k_codes(flipped)[0, :, 1] ^= 0xFF  # the codes of one complete key group
    assert not torch.allclose(decode(flipped), base, atol=1e-3)
