"""KIVI settings: one validated, frozen object read by every vLLM process.

Users set them with ``kivi-serve --kivi-bits 2 --kivi-group-size 32 ...`` or, with plain vLLM, through
``--additional-config '{"kivi": {"k_bits": 2, "v_bits": 2, "group_size": 32, "residual": "kv"}}'``
(vLLM pickles ``VllmConfig.additional_config`` to the engine core and every worker, and hashes it into the
torch.compile cache key; ``config/vllm.py`` in vLLM 0.26.0).

Errors name the flag and the allowed values, so a bad combination stops the server before any weights load.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

#: Key under ``additional_config`` that holds the KIVI settings.
ADDITIONAL_CONFIG_KEY = "kivi"

ALLOWED_BITS = (2, 4)
ALLOWED_GROUP_SIZES = (16, 32, 64, 128)
#: ``"kv"``: keys and values of the open group stay in the fp16 residual until the group completes (KIVI's
#: streaming scheme, §3.3). ``"k"``: only keys wait; values are quantized per token as soon as they arrive
#: (smaller pages, see docs/design.md).
ALLOWED_RESIDUALS = ("kv", "k")
#: ``"streaming"``: every query, in prefill as in decode, sees a key group dequantized once the group was complete
#: before its position (outputs independent of chunking and prefix caching). ``"exact"``: a prefill chunk attends
#: exactly to its own tokens, as the KIVI paper's one-shot prefill does (§3.3); outputs then depend on chunking.
ALLOWED_PREFILL = ("streaming", "exact")
#: Head sizes must be a multiple of 16 (packing and 16-byte aligned page regions); these are the ones tested.
MIN_HEAD_SIZE, MAX_HEAD_SIZE = 32, 256
#: Default tokens per page (vLLM block); see docs/design.md for the capacity table behind this choice.
DEFAULT_BLOCK_SIZE = 512

#: Flag names as ``kivi-serve`` spells them, used in error messages.
FLAG = {
    "k_bits": "--kivi-k-bits (or --kivi-bits)",
    "v_bits": "--kivi-v-bits (or --kivi-bits)",
    "group_size": "--kivi-group-size",
    "residual": "--kivi-residual",
    "prefill": "--kivi-prefill",
    "block_size": "--block-size",
}


class KiviConfigError(ValueError):
    """A KIVI setting is out of range. The message names the flag and the allowed values."""


@dataclass(frozen=True)
class KiviConfig:
    """Validated KIVI cache settings (KIVI paper §3; defaults from its experiments: 2 bits, G = 32).

    Attributes:
        k_bits: bits per key code, 2 or 4. Keys are quantized per channel over groups of ``group_size`` tokens.
        v_bits: bits per value code, 2 or 4. Values are quantized per token over groups of channels.
        group_size: G, the number of tokens that share one key scale/min per channel, and the number of channels
            that share one value scale/min per token (``gcd(G, head_size)`` when G does not divide the head size).
        residual: which tensors of the newest, still-open group stay unquantized: ``"kv"`` or ``"k"``.
        prefill: how prefill queries see the chunk's own tokens: ``"streaming"`` or ``"exact"``.

    Raises:
        KiviConfigError: on any value outside the allowed sets (see the module constants).
    """

    k_bits: int = 2
    v_bits: int = 2
    group_size: int = 32
    residual: str = "kv"
    prefill: str = "streaming"

    def __post_init__(self) -> None:
        for name in ("k_bits", "v_bits"):
            value = getattr(self, name)
            if type(value) is not int or value not in ALLOWED_BITS:
                raise KiviConfigError(
                    f"KIVI: {FLAG[name]}={value!r} is not supported; allowed values: {', '.join(map(str, ALLOWED_BITS))}"
                )
        if type(self.group_size) is not int or self.group_size not in ALLOWED_GROUP_SIZES:
            raise KiviConfigError(
                f"KIVI: {FLAG['group_size']}={self.group_size!r} is not supported; "
                f"allowed values: {', '.join(map(str, ALLOWED_GROUP_SIZES))}"
            )
        if self.residual not in ALLOWED_RESIDUALS:
            raise KiviConfigError(
                f"KIVI: {FLAG['residual']}={self.residual!r} is not supported; allowed values: "
                f"{', '.join(ALLOWED_RESIDUALS)}"
            )
        if self.prefill not in ALLOWED_PREFILL:
            raise KiviConfigError(
                f"KIVI: {FLAG['prefill']}={self.prefill!r} is not supported; allowed values: "
                f"{', '.join(ALLOWED_PREFILL)}"
            )

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dict(cls, raw: Mapping[str, Any] | None) -> "KiviConfig":
        """Build from the ``additional_config["kivi"]`` dict. ``bits`` sets both ``k_bits`` and ``v_bits``.

        Raises:
            KiviConfigError: unknown keys, or values outside the allowed sets.
        """
        raw = dict(raw or {})
        if "bits" in raw:
            bits = raw.pop("bits")
            raw.setdefault("k_bits", bits)
            raw.setdefault("v_bits", bits)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise KiviConfigError(
                f"KIVI: unknown key(s) {unknown} in --additional-config '{{\"{ADDITIONAL_CONFIG_KEY}\": ...}}'; "
                f"allowed keys: bits, {', '.join(sorted(known))}"
            )
        return cls(**raw)

    @classmethod
    def from_vllm_config(cls, vllm_config: Any) -> "KiviConfig":
        """Read the settings from ``vllm_config.additional_config["kivi"]`` (defaults when absent)."""
        additional = getattr(vllm_config, "additional_config", None) or {}
        return cls.from_dict(additional.get(ADDITIONAL_CONFIG_KEY))

    def to_dict(self) -> dict[str, Any]:
        """The ``additional_config["kivi"]`` form of these settings."""
        return dataclasses.asdict(self)

    # ------------------------------------------------------------------ checks that need the model
    def check_block_size(self, block_size: int) -> None:
        """Raise KiviConfigError unless ``block_size`` is a positive multiple of the group size."""
        if block_size <= 0 or block_size % self.group_size:
            raise KiviConfigError(
                f"KIVI: {FLAG['block_size']}={block_size} is not a multiple of the group size "
                f"{self.group_size} ({FLAG['group_size']}); use e.g. --block-size {DEFAULT_BLOCK_SIZE}"
            )

    @staticmethod
    def check_head_size(head_size: int) -> None:
        """Raise KiviConfigError unless the head size is a multiple of 16 in [32, 256]."""
        if head_size % 16 or not MIN_HEAD_SIZE <= head_size <= MAX_HEAD_SIZE:
            raise KiviConfigError(
                f"KIVI: head size {head_size} is not supported; supported: multiples of 16 from "
                f"{MIN_HEAD_SIZE} to {MAX_HEAD_SIZE} (e.g. 64, 80, 96, 128, 256)"
            )

    def describe(self) -> str:
        """One line for logs: ``KIVI k2/v2 G=32 residual=kv``."""
        return (
            f"KIVI k{self.k_bits}/v{self.v_bits} G={self.group_size} residual={self.residual} prefill={self.prefill}"
        )
