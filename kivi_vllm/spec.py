"""The KV-cache spec that makes vLLM size and count KIVI pages.

vLLM derives the page size of every layer only from its ``KVCacheSpec`` (``v1/kv_cache_interface.py``); the
block count, the "KV cache size: N tokens" log, admission and metrics all follow from it. KIVI layers return this
``FullAttentionSpec`` subclass (see ``patches/kv_cache_spec.py``), so the uint8 page is exactly
``num_kv_heads * PageLayout.page_bytes`` bytes. Being a ``FullAttentionSpec`` subclass, it maps to vLLM's
``FullAttentionManager`` through the spec registry's MRO walk without registration.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from vllm.v1.kv_cache_interface import FullAttentionSpec

from .config import KiviConfig, KiviConfigError
from .layout import PageLayout


@dataclass(frozen=True, kw_only=True)
class KiviAttentionSpec(FullAttentionSpec):
    """``FullAttentionSpec`` whose page is a KIVI page (``dtype`` is ``torch.uint8``).

    Attributes (beyond vLLM's):
        k_bits, v_bits, group_size, residual: the KIVI settings (see :class:`kivi_vllm.config.KiviConfig`).
        residual_dtype: the model dtype, used for the exact residual stage.
    """

    k_bits: int = 2
    v_bits: int = 2
    group_size: int = 32
    residual: str = "kv"
    residual_dtype: torch.dtype = torch.bfloat16

    @classmethod
    def from_full_spec(cls, spec: FullAttentionSpec, cfg: KiviConfig, residual_dtype: torch.dtype) -> "KiviAttentionSpec":
        """Turn vLLM's bf16 spec for a layer into the KIVI spec with the same block size and heads.

        Raises:
            KiviConfigError: block size not a multiple of the group size, unsupported head size, or value head size
                different from the key head size.
        """
        if spec.head_size_v != spec.head_size:
            raise KiviConfigError(
                f"KIVI: value head size {spec.head_size_v} differs from key head size {spec.head_size}; "
                "the KIVI page needs both equal"
            )
        out = cls(
            block_size=spec.block_size,
            num_kv_heads=spec.num_kv_heads,
            head_size=spec.head_size,
            head_size_v=spec.head_size_v,
            dtype=torch.uint8,
            indexes_kv_by_block_stride=spec.indexes_kv_by_block_stride,
            k_bits=cfg.k_bits,
            v_bits=cfg.v_bits,
            group_size=cfg.group_size,
            residual=cfg.residual,
            residual_dtype=residual_dtype,
        )
        out.layout  # validates
        return out

    @property
    def layout(self) -> PageLayout:
        """The byte layout of one page for one KV head."""
        return PageLayout(
            self.block_size, self.head_size, self.k_bits, self.v_bits, self.group_size, self.residual,
            self.residual_dtype,
        )

    @property
    def real_page_size_bytes(self) -> int:
        return self.num_kv_heads * self.layout.page_bytes

    @classmethod
    def merge(cls, specs: list["KiviAttentionSpec"]) -> "KiviAttentionSpec":
        """vLLM's merge rebuilds the spec from base fields only; carry the KIVI fields over (all layers agree)."""
        merged = super().merge(specs)
        first = specs[0]
        kivi = ("k_bits", "v_bits", "group_size", "residual", "residual_dtype")
        for s in specs:
            assert all(getattr(s, f) == getattr(first, f) for f in kivi), (
                "All KIVI layers in one KV cache group must share the KIVI settings"
            )
        return replace(merged, **{f: getattr(first, f) for f in kivi})


    def for_layer(self, cfg: KiviConfig, index: int) -> KiviAttentionSpec | FullAttentionSpec:
        """This spec with decoder layer ``index``'s bits from ``cfg`` (``cfg.layers``; the global bits otherwise).

        An exact layer (``cfg.is_exact(index)``) gets vLLM's plain spec instead: a ``FullAttentionSpec`` of the same
        block size and heads in the model dtype (``residual_dtype``), as the engine allocates it for that layer.
        """
        if cfg.is_exact(index):
            return exact_spec(self)
        k_bits, v_bits = cfg.layer_bits(index)
        return self if (k_bits, v_bits) == (self.k_bits, self.v_bits) else replace(self, k_bits=k_bits, v_bits=v_bits)


def layer_specs(spec: KiviAttentionSpec, cfg: KiviConfig, num_layers: int) -> list[FullAttentionSpec]:
    """One spec per decoder layer ``0 .. num_layers - 1`` (:meth:`KiviAttentionSpec.for_layer`), or ``[spec]``
    standing for every layer when ``cfg`` gives no layer its own bits: the ``specs`` of :func:`capacity_summary`."""
    return [spec.for_layer(cfg, i) for i in range(num_layers)] if cfg.layers else [spec]


def exact_spec(spec: KiviAttentionSpec) -> FullAttentionSpec:
    """The ``FullAttentionSpec`` of an exact layer next to KIVI layers of ``spec``: same block size and heads, cache
    in the model dtype (``spec.residual_dtype``), page = block_size x num_kv_heads x 2 x head_size x itemsize bytes."""
    return FullAttentionSpec(block_size=spec.block_size, num_kv_heads=spec.num_kv_heads, head_size=spec.head_size,
                             head_size_v=spec.head_size_v, dtype=spec.residual_dtype)


def _dense_dtype(spec: FullAttentionSpec) -> torch.dtype:
    return spec.residual_dtype if isinstance(spec, KiviAttentionSpec) else spec.dtype


def capacity_summary(specs: FullAttentionSpec | Sequence[FullAttentionSpec], num_blocks: int) -> dict:
    """KV-cache capacity of ``num_blocks`` KIVI pages per layer, and what an unquantized (model dtype) cache would
    hold in the same memory.

    Args:
        specs: one spec per layer (their page sizes may differ: per-layer bits), or one spec that stands for
            every layer (all layers alike; the figures per layer are then the model's). KIVI layers have
            ``KiviAttentionSpec``s, exact layers plain ``FullAttentionSpec``s in the model dtype (counted at their
            full page size: 16 bits per value for bf16).
        num_blocks: vLLM's block count (every layer holds ``num_blocks`` pages: one block table for all layers).

    Returns:
        dict with ``blocks``, ``block_size``, ``tokens`` (KIVI: ``blocks x block_size``), ``bytes`` (the pages of
        every layer in ``specs``), ``dense_tokens`` (tokens at 2 * head_size * itemsize bytes per token per KV head
        per layer in the same bytes, before vLLM's block rounding), ``ratio`` (tokens / dense_tokens) and
        ``bytes_per_token_head`` (page bytes per token per KV head, averaged over the layers).

    Raises:
        ValueError: no specs, or specs with different block sizes.
    """
    specs = [specs] if isinstance(specs, FullAttentionSpec) else list(specs)
    if not specs or len({s.block_size for s in specs}) != 1:
        raise ValueError(f"KIVI capacity: expected specs of one block size, got {[s.block_size for s in specs]}")
    block_size = specs[0].block_size
    total = num_blocks * sum(s.page_size_bytes for s in specs)
    dense_per_token = sum(s.num_kv_heads * 2 * s.head_size * _dense_dtype(s).itemsize for s in specs)
    dense_tokens = total // dense_per_token
    tokens = num_blocks * block_size
    heads = sum(s.num_kv_heads for s in specs)
    per_token_head = sum(s.page_size_bytes for s in specs) / (heads * block_size)
    return dict(blocks=num_blocks, block_size=block_size, tokens=tokens, bytes=total, dense_tokens=dense_tokens,
                ratio=tokens / max(dense_tokens, 1), bytes_per_token_head=per_token_head)
