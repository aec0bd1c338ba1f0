"""Per-step metadata: what one forward step of every KIVI layer needs, built once per step from vLLM's
``CommonAttentionMetadata`` (``vllm/v1/attention/backend.py``)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
from vllm.logger import init_logger
from vllm.v1.attention.backend import AttentionCGSupport, AttentionMetadataBuilder, CommonAttentionMetadata
from vllm.v1.kv_cache_interface import FullAttentionSpec

from ..config import KiviConfig
from ..kernels.decode import (cuda_capability, decode_work, default_kernel, default_num_splits, wave_programs,
                              work_capacity)
from ..kernels.flash import first_chunk_attention
from ..kernels.prefill import block_q_for, prefill_tiles
from ..kernels.store import store_rows
from ..layout import PageLayout
from ..spec import KiviAttentionSpec, capacity_summary

logger = init_logger("vllm.kivi")
_capacity_logged = False
_path_logged = False

#: What each decode kernel is, for the start-up log (:func:`kivi_vllm.kernels.decode.decode`).
DECODE_KERNELS = {
    "fma": "CUDA cores, float32",
    "tc": "tensor cores, fp16 operands built in registers",
    "mma": "tensor cores, TF32",
}


def worker_layer_specs(spec: KiviAttentionSpec, cfg: KiviConfig, vllm_config) -> list[FullAttentionSpec]:
    """The spec of every attention layer of this worker that KIVI set up (its model's KIVI layers and exact layers),
    from one layer's ``spec`` and the per-layer bits of ``cfg``: ``KiviAttentionSpec``s, and plain
    ``FullAttentionSpec``s for exact layers; ``[spec]`` (standing for every layer) when no layer has its own bits."""
    if not cfg.layers:
        return [spec]
    from ..patches.kv_cache_spec import layer_index

    ctx = vllm_config.compilation_config.static_forward_context
    names = [name for name, layer in ctx.items()
             if (getattr(getattr(layer, "attn_backend", None), "IS_KIVI", False) or getattr(layer, "kivi_exact", False))
             and not getattr(layer, "kv_sharing_target_layer_name", None)]
    return [spec.for_layer(cfg, layer_index(name)) for name in names] or [spec]


def use_triton(device: torch.device | str) -> bool:
    """Whether the KIVI layers run the Triton kernels (``kivi_vllm.kernels``) or the PyTorch path
    (``kivi_vllm.reference``): Triton on CUDA devices unless ``KIVI_ATTENTION_PATH=torch`` (a debugging and
    comparison switch); PyTorch on every other device.

    Raises:
        ValueError: ``KIVI_ATTENTION_PATH`` set to something other than ``auto``, ``triton`` or ``torch``, or
            ``triton`` on a device that is not CUDA.
    """
    choice = os.environ.get("KIVI_ATTENTION_PATH", "auto")
    if choice not in ("auto", "triton", "torch"):
        raise ValueError(f"KIVI_ATTENTION_PATH must be auto, triton or torch, got {choice!r}")
    cuda = torch.device(device).type == "cuda"
    if choice == "triton" and not cuda:
        raise ValueError("KIVI_ATTENTION_PATH=triton needs a CUDA device; the PyTorch path runs everywhere else")
    return cuda and choice != "torch"


def attention_path_summary(layout: PageLayout, num_heads: int, num_kv_heads: int, triton: bool,
                           capability: tuple[int, int] | None = None,
                           first_chunks: tuple[bool, str] | None = None, prefill_rule: str = "streaming") -> str:
    """One line for the start-up log: which code runs the KIVI layers' attention on this worker.

    Args:
        layout: the page layout of the layers (head size and group size choose the decode kernel).
        num_heads, num_kv_heads: query and KV heads of one layer on this worker (after tensor parallelism).
        triton: the Triton kernels run (:func:`use_triton`); else the PyTorch path.
        capability: the CUDA device's (major, minor) (:func:`kivi_vllm.kernels.decode.cuda_capability`), None on
            the CPU and ROCm.
        first_chunks: under prefill="exact", :func:`kivi_vllm.kernels.flash.first_chunk_attention`'s
            ``(fn is not None, what)``; None under the streaming rule (the Triton prefill kernel does all).
        prefill_rule: "streaming" or "exact" (named on the PyTorch path, which computes every prefill row).

    Returns:
        e.g. ``"KIVI attention: Triton kernels; decode kernel 'tc' (tensor cores, ...) at 4 query heads per KV head,
        head size 128, group size 32, compute capability 9.0; prefill: Triton prefill kernel"``.
    """
    if not triton:
        why = ("KIVI_ATTENTION_PATH=torch" if os.environ.get("KIVI_ATTENTION_PATH") == "torch"
               else "the Triton kernels run on CUDA devices only")
        return (f"KIVI attention: PyTorch path (kivi_vllm.reference; {why}); steps are not captured in CUDA graphs; "
                f"prefill: PyTorch path, {prefill_rule} rule")
    qpk = num_heads // num_kv_heads
    kernel = default_kernel(layout, qpk, capability)
    prefill = "Triton prefill kernel"
    if first_chunks is not None:
        used, what = first_chunks
        prefill = (f"first chunks by {what}, continuation chunks by the Triton prefill kernel" if used
                   else f"Triton prefill kernel (FlashAttention not used for first chunks: {what})")
    where = f", compute capability {capability[0]}.{capability[1]}" if capability else ""
    return (f"KIVI attention: Triton kernels; decode kernel '{kernel}' ({DECODE_KERNELS[kernel]}) at {qpk} query "
            f"head{'s' if qpk > 1 else ''} per KV head, head size {layout.head_size}, group size "
            f"{layout.group_size}{where}; prefill: {prefill}")


@dataclass
class KiviMetadata:
    """One step of the batch, shared by all KIVI layers of a KV-cache group.

    Attributes:
        num_actual_tokens: tokens in this step (rows of query/key/value to use; under a full CUDA graph, the padded
            count).
        num_reqs: requests in this step (CUDA-graph padding included: such requests have query length 0).
        block_table: [num_reqs, max_blocks] int32 physical block ids.
        slot_mapping: [num_tokens] int64 cache slot of each new token, -1 for padding.
        query_start_loc: [num_reqs + 1] int32 on the device, request r owns rows [qsl[r], qsl[r+1]).
        seq_lens: [num_reqs] int32 on the device, context length after this step.
        layout: the page layout of this group's layers.
        triton: run the Triton kernels (else the PyTorch path with the host lists below).
        tiles: (tile_req, tile_start) int32 device tensors of the multi-token requests (Triton path), None when
            every request has one query token (the CUDA-graph case).
        block_q: query tokens per prefill tile (the tiles were made with it; set whenever ``tiles`` is).
        max_query_len: the longest query of the step (FlashAttention for first chunks under prefill="exact").
        store_rows: int32 device tensor of the rows the stores have work for
            (:func:`kivi_vllm.kernels.store.store_rows`), set with ``tiles`` under residual="kv" when the host knows
            the sequence lengths; else None (every row).
        has_first_chunks: a multi-token request had nothing cached before the step, by the host's
            ``seq_lens_cpu_upper_bound`` (worked out under prefill="exact" only; True when not worked out); only
            saves the FlashAttention launch when False: the kernels find first chunks on the device either way.
        query_start_loc_host, seq_lens_host: host copies for the PyTorch path (None on the Triton path, which
            never synchronizes with the device).
        decode_work: (items, counts), views of the builder's int32 device buffers holding this step's decode work
            list (:func:`kivi_vllm.kernels.decode.decode_work`, :func:`~kivi_vllm.kernels.decode.decode`'s
            ``work``), or None (the decode kernel has no entry in ``WORK_PROGRAMS_PER_SM``, or the batch is larger
            than the buffers: the split grid).
    """

    num_actual_tokens: int
    num_reqs: int
    block_table: torch.Tensor
    slot_mapping: torch.Tensor
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    layout: PageLayout
    triton: bool
    tiles: tuple[torch.Tensor, torch.Tensor] | None = None
    block_q: int = 0
    max_query_len: int = 1
    has_first_chunks: bool = True
    query_start_loc_host: list[int] | None = None
    seq_lens_host: list[int] | None = None
    decode_work: tuple[torch.Tensor, torch.Tensor] | None = None
    store_rows: torch.Tensor | None = None


class KiviMetadataBuilder(AttentionMetadataBuilder[KiviMetadata]):
    """Builds :class:`KiviMetadata`.

    CUDA graphs: on the Triton path a step whose requests all have one query token is a fixed sequence of launches
    whose grids depend only on the (padded) batch size and whose arguments are vLLM's persistent buffers
    (``query_start_loc``, ``seq_lens``, ``block_table``, ``slot_mapping``), so such steps are captured as full
    graphs (``UNIFORM_BATCH``; uniform batches of more than one token only arise with speculative decoding, which
    KIVI refuses). Mixed and prefill steps run between piecewise graphs. The PyTorch path (host loop) supports none.
    """

    @classmethod
    def get_cudagraph_support(cls, vllm_config, kv_cache_spec) -> AttentionCGSupport:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        return AttentionCGSupport.UNIFORM_BATCH if use_triton(device) else AttentionCGSupport.NEVER

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        if not isinstance(kv_cache_spec, KiviAttentionSpec):
            raise TypeError(
                f"KIVI: expected a KiviAttentionSpec for layers {layer_names[:2]}..., got {type(kv_cache_spec).__name__}; "
                "the KV-cache spec patch (kivi_vllm.patches.kv_cache_spec) did not run in this process"
            )
        self.layout = kv_cache_spec.layout
        self.triton = use_triton(device)
        cfg = KiviConfig.from_vllm_config(vllm_config)
        #: prefill="exact" on the Triton path: steps tell whether they hold first chunks (FlashAttention's launch)
        self.exact_triton = self.triton and cfg.prefill == "exact"
        mc = vllm_config.model_config
        heads = (mc.get_num_attention_heads(vllm_config.parallel_config),
                 mc.get_num_kv_heads(vllm_config.parallel_config))
        self.work = None
        if self.triton:
            self.block_q = block_q_for(*heads)
            self.decode_kernel = default_kernel(self.layout, heads[0] // heads[1], cuda_capability(torch.device(device)))
            self.work_wave = wave_programs(self.decode_kernel, torch.device(device))
            self.num_kv_heads = heads[1]
            if self.work_wave:
                # The decode work list, written every step and read by the decode kernels (so CUDA graphs replay
                # it), for batches of up to max(max_num_seqs, the largest CUDA-graph batch) requests; one pair of
                # buffers for every step (vLLM's micro-batching, two batches in flight per step, would need two: the
                # impl refuses it at model construction).
                cc = vllm_config.compilation_config
                self.work_reqs = max(vllm_config.scheduler_config.max_num_seqs, cc.max_cudagraph_capture_size or 0)
                cap = work_capacity(self.work_reqs, heads[1], self.work_wave)
                self.work = (torch.full((cap, 4), -1, dtype=torch.int32, device=device),
                             torch.zeros(self.work_reqs, dtype=torch.int32, device=device))
        global _capacity_logged, _path_logged
        if not _path_logged:
            _path_logged = True
            first = None
            if self.exact_triton:
                fn, what = first_chunk_attention(mc.dtype, self.layout.head_size)
                first = (fn is not None, what)
            logger.info("%s", attention_path_summary(self.layout, *heads, self.triton,
                                                     cuda_capability(torch.device(device)), first, cfg.prefill))
        num_blocks = vllm_config.cache_config.num_gpu_blocks
        if num_blocks and not _capacity_logged:
            _capacity_logged = True
            c = capacity_summary(worker_layer_specs(kv_cache_spec, cfg, vllm_config), num_blocks)
            logger.info(
                "%s: KV cache of %d blocks x %d tokens = %d tokens (%.1f B per token per KV head%s); an unquantized "
                "%s cache would hold %d tokens in the same memory: %.2fx",
                cfg.describe(), c["blocks"], c["block_size"], c["tokens"], c["bytes_per_token_head"],
                ", mean over layers" if cfg.layers else "", str(kv_cache_spec.residual_dtype).replace("torch.", ""),
                c["dense_tokens"], c["ratio"],
            )

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> KiviMetadata:
        cm = common_attn_metadata
        n = cm.num_reqs
        meta = KiviMetadata(
            num_actual_tokens=cm.num_actual_tokens, num_reqs=n, block_table=cm.block_table_tensor,
            slot_mapping=cm.slot_mapping, query_start_loc=cm.query_start_loc, seq_lens=cm.seq_lens,
            layout=self.layout, triton=self.triton, max_query_len=cm.max_query_len,
        )
        if not self.triton:
            meta.query_start_loc_host = cm.query_start_loc_cpu[: n + 1].tolist()
            meta.seq_lens_host = cm.seq_lens[:n].tolist()
            return meta
        qsl = np.asarray(cm.query_start_loc_cpu[: n + 1])  # host views, no copies
        # seq_lens_cpu_upper_bound is exact for prefill rows (KIVI refuses speculative decoding)
        seq = None if cm.seq_lens_cpu_upper_bound is None else np.asarray(cm.seq_lens_cpu_upper_bound[:n])
        if self.work is not None and n <= self.work_reqs:
            meta.decode_work = self._fill_work(qsl, seq, n)
        if cm.max_query_len > 1:
            if self.exact_triton and seq is not None:
                q_len = np.diff(qsl)
                meta.has_first_chunks = bool(((q_len > 1) & (seq == q_len)).any())
            tile_req, tile_start = prefill_tiles(qsl, self.block_q)
            if len(tile_req):
                meta.block_q = self.block_q
                meta.tiles = (torch.from_numpy(tile_req).to(self.device, non_blocking=True),
                              torch.from_numpy(tile_start).to(self.device, non_blocking=True))
                if self.layout.residual == "kv" and seq is not None:  # exact for prefill rows
                    meta.store_rows = torch.from_numpy(store_rows(qsl, seq, self.layout.group_size)).to(
                        self.device, non_blocking=True)
        return meta

    def _fill_work(self, qsl: np.ndarray, seq: np.ndarray | None, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This step's decode work list (:func:`kivi_vllm.kernels.decode.decode_work` for ``n`` requests, the
        launch's default ``num_splits``) copied into the builder's device buffers; views of them are returned.
        Without host sequence lengths (``seq`` None; vLLM 0.26 always gives them) every one-token request gets one
        item over all its groups: slower for long requests, never wrong."""
        if seq is None:  # 1 complete group each: one item, ending at WORK_END
            seq = np.where(np.diff(qsl) == 1, 1 + self.layout.group_size, 0)
        splits = default_num_splits(self.decode_kernel, n, self.num_kv_heads)
        items, counts = decode_work(qsl, seq, self.layout.group_size, n, self.num_kv_heads, self.work_wave, splits)
        dev_items, dev_counts = self.work[0][: len(items)], self.work[1][:n]
        dev_items.copy_(torch.from_numpy(items), non_blocking=True)
        dev_counts.copy_(torch.from_numpy(counts), non_blocking=True)
        return dev_items, dev_counts
