"""``KiviAttentionBackend``: the static facts vLLM asks of an attention backend (name, shapes, what it supports).

Registered in vLLM's ``CUSTOM`` slot by :func:`kivi_vllm.register` and selected with
``--attention-backend CUSTOM`` (``kivi-serve`` does that). Interface: ``vllm/v1/attention/backend.py``.

Per-layer bits (``KiviConfig.layers``): vLLM asks the backend *class* for the cache shape
(``get_kv_cache_shape``, a static method that is not told the layer), so a layer whose bits differ from the global
ones gets its own subclass, :func:`backend_for_bits`, set on the layer by the KV-cache spec patch. The runners (V1
and V2) take each layer's backend from ``layer.get_attn_backend()`` and group layers by (backend class, spec), so
each distinct setting has its own attention group, metadata builder and :class:`PageLayout`.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from typing import ClassVar

import torch
from vllm.config import get_current_vllm_config_or_none
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionType,
    MultipleOf,
    subclass_attention_backend_with_overrides,
)

from ..config import DEFAULT_BLOCK_SIZE, KiviConfig, KiviConfigError
from ..layout import PageLayout


def _current_kivi_config() -> tuple[KiviConfig, torch.dtype]:
    vllm_config = get_current_vllm_config_or_none()
    if vllm_config is None or vllm_config.model_config is None:
        raise RuntimeError(
            "KIVI: the vLLM config is not set here; the KIVI page size depends on it "
            "(get_kv_cache_shape must run inside vLLM's set_current_vllm_config)"
        )
    return KiviConfig.from_vllm_config(vllm_config), vllm_config.model_config.dtype


class KiviAttentionBackend(AttentionBackend):
    """KIVI 2/4-bit paged KV cache (keys per channel, values per token, open group exact)."""

    #: Marks the backend for :mod:`kivi_vllm.patches` (KV-cache spec and CPU platform selection).
    IS_KIVI: ClassVar[bool] = True
    #: (k_bits, v_bits) of the layers this class serves; None: the global settings (:func:`backend_for_bits`).
    KIVI_BITS: ClassVar[tuple[int, int] | None] = None
    #: The store runs inside ``forward``: the open group's staged tokens must be read before the store quantizes a
    #: completed group over them (see :func:`kivi_vllm.reference.forward`), which a separate update op cannot do.
    forward_includes_kv_cache_update: bool = True
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]
    #: KIVI *is* the cache format: combining it with fp8 or another quantized cache dtype is refused.
    supported_kv_cache_dtypes: ClassVar[list[str]] = ["auto", "float16", "bfloat16"]

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"  # vLLM's single out-of-tree slot (attention.py looks the name up in AttentionBackendEnum)

    @staticmethod
    def get_impl_cls():
        from .impl import KiviAttentionImpl

        return KiviAttentionImpl

    @staticmethod
    def get_builder_cls():
        from .metadata import KiviMetadataBuilder

        return KiviMetadataBuilder

    @staticmethod
    def get_supported_kernel_block_sizes() -> list[int | MultipleOf]:
        # Any multiple of the group size, so vLLM never splits a page into smaller kernel blocks: one page has one
        # residual stage.
        vllm_config = get_current_vllm_config_or_none()
        group = KiviConfig.from_vllm_config(vllm_config).group_size if vllm_config else 16
        return [MultipleOf(group)]

    @classmethod
    def get_preferred_block_size(cls, default_block_size: int) -> int:
        return DEFAULT_BLOCK_SIZE

    @classmethod
    def supports_head_size(cls, head_size: int) -> bool:
        try:
            KiviConfig.check_head_size(head_size)
        except KiviConfigError:
            return False
        return True

    @classmethod
    def supports_kv_connector(cls) -> bool:
        return False  # KV transfer / offload connectors assume vLLM's own page formats

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER

    @classmethod
    def supports_combination(cls, head_size, dtype, kv_cache_dtype, block_size, use_mla, has_sink, use_sparse,
                             use_mm_prefix, device_capability) -> str | None:
        """KIVI's own checks, worded for users: settings, head size, block size (when the user set one)."""
        try:
            cfg = KiviConfig.from_vllm_config(get_current_vllm_config_or_none())
            cfg.check_head_size(head_size)
            if block_size is not None:
                cfg.check_block_size(block_size)
        except KiviConfigError as e:
            return str(e)
        return None

    @classmethod
    def get_kv_cache_shape(cls, num_blocks: int, block_size: int, num_kv_heads: int, head_size: int,
                           cache_dtype_str: str = "auto") -> tuple[int, ...]:
        """(num_blocks, num_kv_heads, page_bytes) uint8; page_bytes from :class:`PageLayout` of the global settings,
        or of ``KIVI_BITS`` in a per-layer subclass.

        ``cache_dtype_str`` is ignored on purpose: vLLM's runners pass different strings (V1 vs V2), the layout
        comes from the KIVI settings alone.
        """
        cfg, dtype = _current_kivi_config()
        if cls.KIVI_BITS is not None:
            cfg = dataclasses.replace(cfg, k_bits=cls.KIVI_BITS[0], v_bits=cls.KIVI_BITS[1], layers=())
        return (num_blocks, num_kv_heads, PageLayout.from_config(cfg, block_size, head_size, dtype).page_bytes)


def backend_for_bits(k_bits: int, v_bits: int) -> type[KiviAttentionBackend]:
    """The backend class of layers stored with ``k_bits``/``v_bits``: a subclass of :class:`KiviAttentionBackend`
    whose ``get_kv_cache_shape`` uses those bits (vLLM's ``subclass_attention_backend`` pattern). One class per
    setting, created once and kept in this module under its name (e.g. ``K4V2KiviAttentionBackend``), so the runners'
    grouping by ``full_cls_name()`` puts all layers of one setting together and the class pickles by name (the
    module's ``__getattr__`` creates it on lookup in a process that has not built it yet, e.g. on unpickling).

    Raises:
        KiviConfigError: bits outside 2 and 4.
    """
    KiviConfig(k_bits, v_bits)  # validates
    name = f"K{k_bits}V{v_bits}{KiviAttentionBackend.__name__}"
    cls = globals().get(name)
    if cls is None:
        cls = subclass_attention_backend_with_overrides(
            f"K{k_bits}V{v_bits}", KiviAttentionBackend,
            {"KIVI_BITS": (k_bits, v_bits), "__module__": __name__, "__qualname__": name},
        )
        setattr(sys.modules[__name__], name, cls)
    return cls


_SUBCLASS_NAME = re.compile(rf"K([0-9]+)V([0-9]+){KiviAttentionBackend.__name__}")


def __getattr__(name: str):
    """Module attribute lookup for the per-setting classes (PEP 562): ``K4V2KiviAttentionBackend`` resolves to
    :func:`backend_for_bits` (4, 2) in any process, so pickle can find the class by name where no layer made it."""
    m = _SUBCLASS_NAME.fullmatch(name)
    if m:
        try:
            return backend_for_bits(int(m.group(1)), int(m.group(2)))
        except KiviConfigError:
            pass
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
