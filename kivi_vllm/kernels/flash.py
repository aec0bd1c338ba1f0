"""First prefill chunks under prefill="exact" through vLLM's FlashAttention (issue 3, item 3).

Under prefill="exact" (the KIVI paper's one-shot prefill, §3.3) a chunk's queries see the groups completed before
the chunk dequantized and everything after exactly. A request with nothing cached before the step (a first chunk)
therefore attends exactly and causally to its own chunk: plain causal attention over this step's key and value
rows, which vLLM's FlashAttention computes (``vllm.v1.attention.backends.fa_utils.flash_attn_varlen_func``, the
function and version choice of vLLM's own FlashAttention backend: FA3 on Hopper, FA2 on Ampere, FA4 on
Blackwell, which compiles just in time on its first call, outside vLLM's warm-up). The KIVI store
still quantizes those tokens into the pages; only the attention of their rows moves to FlashAttention
(:func:`kivi_vllm.kernels.forward` orders the launches). The streaming rule, the default, reads a first chunk's own
completed groups dequantized, which FlashAttention cannot; it keeps the Triton prefill kernel.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

#: Model dtypes FlashAttention takes.
FLASH_DTYPES = (torch.float16, torch.bfloat16)


@functools.lru_cache(maxsize=8)
def first_chunk_attention(dtype: torch.dtype, head_size: int) -> tuple[Callable | None, str]:
    """vLLM's FlashAttention as :func:`kivi_vllm.kernels.forward`'s ``first_chunk_attention``, if it runs here.

    Args:
        dtype: the model dtype (query, key and value rows).
        head_size: the attention head size.

    Returns:
        ``(fn, what)``: ``fn(query, key, value, cu_seqlens, max_seqlen, scale, out)`` writes, for every request
        (rows ``cu_seqlens[r]`` to ``cu_seqlens[r + 1]``, int32 on the device), causal attention of its query rows
        ([T, num_heads, head_size]) over its own key/value rows ([T, num_kv_heads, head_size]) with softmax scale
        ``scale`` into ``out`` ([T, num_heads, head_size]); ``max_seqlen`` is the longest request (host int).
        ``what`` names the FlashAttention version, or says why ``fn`` is None (not a CUDA platform, a GPU below
        compute capability 8.0, no vLLM FlashAttention build, a float32 model).
    """
    from vllm.platforms import current_platform

    if not current_platform.is_cuda():
        return None, "vLLM's FlashAttention runs on CUDA only"
    if dtype not in FLASH_DTYPES:
        return None, f"FlashAttention takes fp16/bf16, the model is {dtype}"
    if not current_platform.has_device_capability(80):
        return None, "vLLM's FlashAttention needs compute capability 8.0 or newer"
    try:
        from vllm.v1.attention.backends import fa_utils  # imports vllm.vllm_flash_attn's compiled library
    except ImportError as e:
        return None, f"no vLLM FlashAttention build here ({e})"
    if not fa_utils.is_flash_attn_varlen_func_available():
        return None, "no vLLM FlashAttention build here"
    version = fa_utils.get_flash_attn_version(head_size=head_size)
    if version is None:
        return None, "vLLM picks no FlashAttention version for this GPU"
    return functools.partial(_causal_own_chunk, varlen=fa_utils.flash_attn_varlen_func, fa_version=version), (
        f"FlashAttention {version} (vLLM's flash_attn_varlen_func)")


def _causal_own_chunk(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seqlens: torch.Tensor,
                      max_seqlen: int, scale: float, out: torch.Tensor, *, varlen: Callable, fa_version: int) -> None:
    varlen(query, key, value, max_seqlen_q=max_seqlen, cu_seqlens_q=cu_seqlens, max_seqlen_k=max_seqlen,
           cu_seqlens_k=cu_seqlens, softmax_scale=scale, causal=True, out=out, fa_version=fa_version)
