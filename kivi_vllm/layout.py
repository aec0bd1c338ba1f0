"""The one owner of KIVI page bytes: every offset of a page is computed here and nowhere else.

A vLLM KV-cache block ("page") of ``block_size`` = B tokens is, for each KV head, ``page_bytes`` bytes of uint8
(vLLM allocates ``num_blocks x num_kv_heads x page_bytes``; ``get_kv_cache_shape`` returns exactly that shape).
Inside one page and one head, with m = B / G groups of G consecutive tokens:

    offset 0          record of group 0
    GR                record of group 1
    ...
    (m-1) * GR        record of group m-1
    stage_offset      residual ("stage") in the model dtype: keys [G, D], then values [G, D] (residual="kv")

A group record (GR bytes) holds, in this order (D = head size, Gv = channels per value group):

    k_codes  [G, D*k_bits/8] uint8   one row per token; keys quantized per channel over the G tokens
    k_scale  [D]             fp16    per channel of this group
    k_min    [D]             fp16    per channel of this group (KIVI stores the float minimum, not a zero-point)
    v_codes  [G, D*v_bits/8] uint8   one row per token; values quantized per token
    v_scale  [G, D/Gv]       fp16    per token and channel group
    v_min    [G, D/Gv]       fp16

With residual="kv" the stage starts at the last group's record (stage_offset = (m-1)*GR): while a group is open,
the last record is either unused (the open group is an earlier one) or is the open group itself, so the stage
can borrow its bytes; the quantizer reads the whole stage before it writes that record. With residual="k" the
values of the open group are quantized at once into their record, so the stage sits after all records.

Bit packing (KIVI's order, ``quant/new_pack.py``, seen as bytes): element c of a row sits in byte
``c // (8/bits)`` at bits ``[(c % (8/bits)) * bits, +bits)``, lowest bits first.

Every region size is a multiple of 16 bytes (G and D are multiples of 16), so every region is 16-byte aligned.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch

from .config import KiviConfig

_ALIGN = 16


@dataclass(frozen=True)
class PageLayout:
    """Byte layout of one KIVI page for one KV head.

    Attributes:
        block_size: B, tokens per page; a multiple of ``group_size``.
        head_size: D, channels per head; a multiple of 16.
        k_bits, v_bits: bits per key / value code (2 or 4).
        group_size: G, tokens per key group and (up to gcd with D) channels per value group.
        residual: ``"kv"`` or ``"k"`` (see module docstring).
        residual_dtype: dtype of the stage (the model's activation dtype: bf16, fp16 or fp32), so staged tokens
            are stored exactly.

    Raises:
        KiviConfigError: block size not a multiple of G, or unsupported head size / bits / group size.
    """

    block_size: int
    head_size: int
    k_bits: int = 2
    v_bits: int = 2
    group_size: int = 32
    residual: str = "kv"
    residual_dtype: torch.dtype = torch.bfloat16

    def __post_init__(self) -> None:
        cfg = self.config  # validates bits, group size, residual
        cfg.check_block_size(self.block_size)
        cfg.check_head_size(self.head_size)
        for name, size in self.region_sizes().items():
            assert size % _ALIGN == 0, f"KIVI layout: region {name} of {size} bytes breaks 16-byte alignment"

    @classmethod
    def from_config(
        cls, cfg: KiviConfig, block_size: int, head_size: int, residual_dtype: torch.dtype
    ) -> "PageLayout":
        """Layout for a validated KiviConfig, a vLLM block size, a head size and the model dtype."""
        return cls(block_size, head_size, cfg.k_bits, cfg.v_bits, cfg.group_size, cfg.residual, residual_dtype)

    @property
    def config(self) -> KiviConfig:
        return KiviConfig(self.k_bits, self.v_bits, self.group_size, self.residual)

    # ------------------------------------------------------------------ sizes (bytes)
    @property
    def num_groups(self) -> int:
        """m = B / G, the key groups per page."""
        return self.block_size // self.group_size

    @property
    def v_group_size(self) -> int:
        """Gv, channels per value group: gcd(G, D)."""
        return math.gcd(self.group_size, self.head_size)

    @property
    def num_v_groups(self) -> int:
        """D / Gv, value scale/min pairs per token."""
        return self.head_size // self.v_group_size

    @property
    def k_row_bytes(self) -> int:
        """Bytes of packed key codes per token: D * k_bits / 8."""
        return self.head_size * self.k_bits // 8

    @property
    def v_row_bytes(self) -> int:
        """Bytes of packed value codes per token: D * v_bits / 8."""
        return self.head_size * self.v_bits // 8

    def region_sizes(self) -> dict[str, int]:
        """Bytes of each region of one group record, then of each stage tensor."""
        return dict(self._sizes)

    @cached_property
    def _sizes(self) -> dict[str, int]:
        g, d = self.group_size, self.head_size
        sizes = {
            "k_codes": g * self.k_row_bytes,
            "k_scale": 2 * d,
            "k_min": 2 * d,
            "v_codes": g * self.v_row_bytes,
            "v_scale": 2 * g * self.num_v_groups,
            "v_min": 2 * g * self.num_v_groups,
            "k_stage": g * d * self.residual_itemsize,
        }
        if self.residual == "kv":
            sizes["v_stage"] = g * d * self.residual_itemsize
        return sizes

    @property
    def residual_itemsize(self) -> int:
        return self.residual_dtype.itemsize

    @property
    def record_bytes(self) -> int:
        """GR, bytes of one quantized group record."""
        s = self._sizes
        return s["k_codes"] + s["k_scale"] + s["k_min"] + s["v_codes"] + s["v_scale"] + s["v_min"]

    @property
    def stage_bytes(self) -> int:
        """Bytes of the residual stage: G * D * itemsize for keys, the same again for values when residual="kv"."""
        s = self._sizes
        return s["k_stage"] + s.get("v_stage", 0)

    @property
    def stage_offset(self) -> int:
        """Byte offset of the stage: the last record (residual="kv") or the end of all records (residual="k")."""
        m = self.num_groups
        return (m - 1) * self.record_bytes if self.residual == "kv" else m * self.record_bytes

    @property
    def page_bytes(self) -> int:
        """Bytes per page per KV head: max(end of the stage, end of the records)."""
        return max(self.stage_offset + self.stage_bytes, self.num_groups * self.record_bytes)

    @property
    def bytes_per_token(self) -> float:
        """page_bytes / B: average bytes per token per KV head (K and V together)."""
        return self.page_bytes / self.block_size

    def ratio_vs(self, itemsize: int = 2) -> float:
        """Tokens per byte relative to an unquantized cache of ``itemsize`` bytes per element (2 = bf16/fp16)."""
        return 2 * self.head_size * itemsize / self.bytes_per_token

    # ------------------------------------------------------------------ offsets within a record
    @cached_property
    def _record_offsets(self) -> dict[str, int]:
        s, off, out = self._sizes, 0, {}
        for name in ("k_codes", "k_scale", "k_min", "v_codes", "v_scale", "v_min"):
            out[name] = off
            off += s[name]
        return out

    @property
    def kernel_offsets(self) -> dict[str, int]:
        """Byte offsets the Triton kernels address: each record region relative to its record start
        (``k_codes`` ... ``v_min``), ``record_bytes``, and the stage relative to the page start (``k_stage``,
        ``v_stage``; ``v_stage`` is -1 with residual="k")."""
        out = dict(self._record_offsets)
        out["record_bytes"] = self.record_bytes
        out["k_stage"] = self.stage_offset
        out["v_stage"] = self.stage_offset + self._sizes["k_stage"] if self.residual == "kv" else -1
        return out

    # ------------------------------------------------------------------ typed views of pages
    # ``pages`` is any uint8 tensor whose last dimension is one page of one head (page_bytes), e.g. the vLLM cache
    # [num_blocks, num_kv_heads, page_bytes] or a gathered subset of it. Views share storage with ``pages``, so
    # writing through them writes the cache.
    def _records(self, pages: torch.Tensor) -> torch.Tensor:
        assert pages.dtype == torch.uint8 and pages.shape[-1] == self.page_bytes, (
            f"expected uint8 pages with last dim {self.page_bytes}, got {pages.dtype} {tuple(pages.shape)}"
        )
        m, gr = self.num_groups, self.record_bytes
        return pages[..., : m * gr].unflatten(-1, (m, gr))

    def _region(self, pages: torch.Tensor, name: str) -> torch.Tensor:
        off = self._record_offsets[name]
        return self._records(pages)[..., off : off + self._sizes[name]]

    def k_codes(self, pages: torch.Tensor) -> torch.Tensor:
        """[..., m, G, D*k_bits/8] uint8 packed key codes."""
        return self._region(pages, "k_codes").unflatten(-1, (self.group_size, self.k_row_bytes))

    def v_codes(self, pages: torch.Tensor) -> torch.Tensor:
        """[..., m, G, D*v_bits/8] uint8 packed value codes."""
        return self._region(pages, "v_codes").unflatten(-1, (self.group_size, self.v_row_bytes))

    def k_scale(self, pages: torch.Tensor) -> torch.Tensor:
        """[..., m, D] fp16 key scale per group and channel."""
        return self._region(pages, "k_scale").view(torch.float16)

    def k_min(self, pages: torch.Tensor) -> torch.Tensor:
        """[..., m, D] fp16 key minimum per group and channel."""
        return self._region(pages, "k_min").view(torch.float16)

    def v_scale(self, pages: torch.Tensor) -> torch.Tensor:
        """[..., m, G, D/Gv] fp16 value scale per token and channel group."""
        return self._region(pages, "v_scale").view(torch.float16).unflatten(-1, (self.group_size, -1))

    def v_min(self, pages: torch.Tensor) -> torch.Tensor:
        """[..., m, G, D/Gv] fp16 value minimum per token and channel group."""
        return self._region(pages, "v_min").view(torch.float16).unflatten(-1, (self.group_size, -1))

    def k_stage(self, pages: torch.Tensor) -> torch.Tensor:
        """[..., G, D] residual keys of the page's open group (index = token position mod G)."""
        off = self.stage_offset
        n = self._sizes["k_stage"]
        return pages[..., off : off + n].view(self.residual_dtype).unflatten(-1, (self.group_size, self.head_size))

    def v_stage(self, pages: torch.Tensor) -> torch.Tensor:
        """[..., G, D] residual values of the open group; only with residual="kv"."""
        assert self.residual == "kv", "values have no stage with residual='k'"
        off = self.stage_offset + self._sizes["k_stage"]
        n = self._sizes["v_stage"]
        return pages[..., off : off + n].view(self.residual_dtype).unflatten(-1, (self.group_size, self.head_size))
