"""KIVI settings: one validated, frozen object read by every vLLM process.

Users set them with ``kivi-serve --kivi-bits 2 --kivi-group-size 32 ...`` or, with plain vLLM, through
``--additional-config '{"kivi": {"k_bits": 2, "v_bits": 2, "group_size": 32, "residual": "kv"}}'``
(vLLM pickles ``VllmConfig.additional_config`` to the engine core and every worker, and hashes it into the
torch.compile cache key; ``config/vllm.py`` in vLLM 0.26.0).

Per-layer bits: ``"layers": {"0": {"k_bits": 4}, "29": {"bits": 4}}`` keeps the listed layers (decoder layer
indices, as in the model's ``model.layers.N``) at other key/value bits than the rest; a layer's unset bits are the
global ones. ``kivi-serve --kivi-layer 0,29=k4v2`` writes the same (:func:`parse_layer_setting`). Every layer has its
own page size then (docs/design.md §2, "Per-layer pages").

Exact layers: ``"layers": {"0": {"exact": true}}`` (``--kivi-layer 0,29=exact``) keeps a layer's KV cache unquantized,
in the model dtype, served by vLLM's own attention backend for that layer (``patches/kv_cache_spec.py``). Inside
``KiviConfig.layers`` such a layer is ``(index, EXACT_BITS, EXACT_BITS)``.

Errors name the flag and the allowed values, so a bad combination stops the server before any weights load.
"""

from __future__ import annotations

import dataclasses
import re
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
    "layers": "--kivi-layer",
}
#: Keys of one layer's entry under ``"layers"`` (``exact`` only alone, as ``"exact": true``).
LAYER_KEYS = ("bits", "k_bits", "v_bits", "exact")
#: The bits an exact layer has in ``KiviConfig.layers`` (both keys and values): its cache is the model dtype's
#: (16 bits for bf16/fp16 models), unquantized, in vLLM's own page format.
EXACT_BITS = 16


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
        layers: per-layer bits, ``((layer_index, k_bits, v_bits), ...)`` sorted by index, one entry per listed layer
            (every other layer uses ``k_bits``/``v_bits``); ``(layer_index, EXACT_BITS, EXACT_BITS)`` marks an exact
            (unquantized) layer. Built from the ``"layers"`` dict by :meth:`from_dict`.

    Raises:
        KiviConfigError: on any value outside the allowed sets (see the module constants).
    """

    k_bits: int = 2
    v_bits: int = 2
    group_size: int = 32
    residual: str = "kv"
    prefill: str = "streaming"
    layers: tuple[tuple[int, int, int], ...] = ()

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
        seen = set()
        for entry in self.layers:
            if not (isinstance(entry, tuple) and len(entry) == 3):
                raise KiviConfigError(f"KIVI: {FLAG['layers']}: expected (layer, k_bits, v_bits), got {entry!r}")
            index, k_bits, v_bits = entry
            if type(index) is not int or index < 0:
                raise KiviConfigError(f"KIVI: {FLAG['layers']}: layer index {index!r} is not a non-negative integer")
            if index in seen:
                raise KiviConfigError(f"KIVI: {FLAG['layers']}: layer {index} is listed twice")
            seen.add(index)
            if (k_bits, v_bits) == (EXACT_BITS, EXACT_BITS):
                continue
            for name, value in (("k_bits", k_bits), ("v_bits", v_bits)):
                if type(value) is not int or value not in ALLOWED_BITS:
                    raise KiviConfigError(
                        f"KIVI: {FLAG['layers']}: layer {index}: {name}={value!r} is not supported; allowed values: "
                        f"{', '.join(map(str, ALLOWED_BITS))} (or the whole layer exact: {index}=exact)"
                    )
        object.__setattr__(self, "layers", tuple(sorted(self.layers)))  # sorted, and hashable like the rest

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dict(cls, raw: Mapping[str, Any] | None) -> "KiviConfig":
        """Build from the ``additional_config["kivi"]`` dict. ``bits`` sets both ``k_bits`` and ``v_bits``.

        ``layers`` maps a layer index (an int, or a str of one: JSON keys are strings) to a dict of ``bits``,
        ``k_bits`` and/or ``v_bits`` for that layer; unset bits are the global ones. Example:
        ``{"bits": 2, "layers": {"0": {"k_bits": 4}, "29": {"bits": 4}}}`` -> layers ((0, 4, 2), (29, 4, 4)).
        ``{"exact": true}`` instead of bits makes the layer exact: ``{"layers": {"0": {"exact": true}}}`` -> layers
        ((0, EXACT_BITS, EXACT_BITS),).

        Raises:
            KiviConfigError: unknown keys, values outside the allowed sets, a layer index that is not a
                non-negative integer, a layer entry that is not a dict of ``bits``/``k_bits``/``v_bits``, or
                ``exact`` that is not ``true`` or comes with bits.
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
        if "layers" in raw:
            k_bits, v_bits = raw.get("k_bits", cls.k_bits), raw.get("v_bits", cls.v_bits)
            raw["layers"] = _layers_from_dict(raw["layers"], k_bits, v_bits)
        return cls(**raw)

    @classmethod
    def from_vllm_config(cls, vllm_config: Any) -> "KiviConfig":
        """Read the settings from ``vllm_config.additional_config["kivi"]`` (defaults when absent)."""
        additional = getattr(vllm_config, "additional_config", None) or {}
        return cls.from_dict(additional.get(ADDITIONAL_CONFIG_KEY))

    def to_dict(self) -> dict[str, Any]:
        """The ``additional_config["kivi"]`` form of these settings (``layers`` only when some layer is listed)."""
        out = dataclasses.asdict(self)
        layers = out.pop("layers")
        if layers:
            out["layers"] = {str(i): {"exact": True} if (k, v) == (EXACT_BITS, EXACT_BITS) else {"k_bits": k, "v_bits": v}
                             for i, k, v in layers}
        return out

    # ------------------------------------------------------------------ per layer
    def for_layer(self, index: int) -> KiviConfig:
        """The settings of decoder layer ``index``: this config with that layer's bits, and no ``layers``.

        Raises:
            KiviConfigError: the layer is exact (:meth:`is_exact`): it has no KIVI settings.
        """
        if self.is_exact(index):
            raise KiviConfigError(f"KIVI: {FLAG['layers']}: layer {index} is exact; it has no KIVI page settings")
        k_bits, v_bits = self.layer_bits(index)
        return dataclasses.replace(self, k_bits=k_bits, v_bits=v_bits, layers=())

    def layer_bits(self, index: int) -> tuple[int, int]:
        """(k_bits, v_bits) of decoder layer ``index``; ``(EXACT_BITS, EXACT_BITS)`` for an exact layer."""
        for i, k_bits, v_bits in self.layers:
            if i == index:
                return k_bits, v_bits
        return self.k_bits, self.v_bits

    def is_exact(self, index: int) -> bool:
        """Whether decoder layer ``index`` keeps an unquantized cache (``"exact": true``, ``--kivi-layer N=exact``)."""
        return self.layer_bits(index) == (EXACT_BITS, EXACT_BITS)

    @property
    def exact_layers(self) -> tuple[int, ...]:
        """Indices of the exact layers, sorted (empty when none)."""
        return tuple(i for i, k, v in self.layers if (k, v) == (EXACT_BITS, EXACT_BITS))

    def settings_by_layer(self, num_layers: int) -> dict[tuple[int, int], list[int]]:
        """{(k_bits, v_bits): [layer indices]} over layers 0 .. num_layers - 1, global setting first (exact layers
        under ``(EXACT_BITS, EXACT_BITS)``)."""
        out: dict[tuple[int, int], list[int]] = {(self.k_bits, self.v_bits): []}
        for i in range(num_layers):
            out.setdefault(self.layer_bits(i), []).append(i)
        return {bits: idx for bits, idx in out.items() if idx}

    def check_num_layers(self, num_layers: int) -> None:
        """Raise KiviConfigError if a listed layer index is not below the model's ``num_layers`` decoder layers."""
        bad = [i for i, _, _ in self.layers if i >= num_layers]
        if bad:
            raise KiviConfigError(
                f"KIVI: {FLAG['layers']}: layer(s) {', '.join(map(str, bad))} beyond the model's {num_layers} layers "
                f"(indices 0 to {num_layers - 1})"
            )

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
        """One line for logs: ``KIVI k2/v2 G=32 residual=kv prefill=streaming``, then ``layers 0,29=k4v2`` when
        some layers have their own bits."""
        line = f"KIVI k{self.k_bits}/v{self.v_bits} G={self.group_size} residual={self.residual} prefill={self.prefill}"
        return f"{line} layers {self.describe_layers()}" if self.layers else line

    def describe_layers(self) -> str:
        """The per-layer bits in :func:`parse_layer_setting`'s syntax, e.g. ``0,29=k4v2 5=k4v4 7=exact`` (empty when
        none)."""
        by_bits: dict[tuple[int, int], list[int]] = {}
        for i, k_bits, v_bits in self.layers:
            by_bits.setdefault((k_bits, v_bits), []).append(i)
        return " ".join(f"{','.join(map(str, idx))}=" + ("exact" if (k, v) == (EXACT_BITS, EXACT_BITS) else f"k{k}v{v}")
                        for (k, v), idx in by_bits.items())


def _layers_from_dict(raw: Any, k_bits: Any, v_bits: Any) -> tuple[tuple[int, Any, Any], ...]:
    """``{"0": {"k_bits": 4}, ...}`` -> ``((0, 4, v_bits), ...)``; unset bits are the global ``k_bits``/``v_bits``;
    ``{"0": {"exact": true}}`` -> ``((0, EXACT_BITS, EXACT_BITS),)``."""
    if not isinstance(raw, Mapping):
        raise KiviConfigError(
            f"KIVI: {FLAG['layers']}: \"layers\" must map layer indices to settings, e.g. "
            f"{{\"0\": {{\"k_bits\": 4}}}}; got {raw!r}"
        )
    out = []
    for key, entry in raw.items():
        # an int, or a str of one (JSON keys); not bools, floats or int()'s other spellings ("1_0")
        if type(key) is int:
            index = key
        elif isinstance(key, str) and re.fullmatch(r"\s*-?[0-9]+\s*", key):
            index = int(key)
        else:
            raise KiviConfigError(f"KIVI: {FLAG['layers']}: layer index {key!r} is not an integer")
        if not isinstance(entry, Mapping) or not entry or set(entry) - set(LAYER_KEYS):
            raise KiviConfigError(
                f"KIVI: {FLAG['layers']}: layer {key}: expected a dict of {', '.join(LAYER_KEYS)}, got {entry!r}"
            )
        if "exact" in entry:
            if entry["exact"] is not True or len(entry) > 1:
                raise KiviConfigError(
                    f"KIVI: {FLAG['layers']}: layer {key}: \"exact\" must be true and stand alone "
                    f"({{\"exact\": true}}: an unquantized layer), got {dict(entry)!r}"
                )
            out.append((index, EXACT_BITS, EXACT_BITS))
            continue
        if EXACT_BITS in entry.values():
            raise KiviConfigError(
                f"KIVI: {FLAG['layers']}: layer {key}: {EXACT_BITS} bits is written {{\"exact\": true}} "
                f"(--kivi-layer {key}=exact), got {dict(entry)!r}"
            )
        bits = entry.get("bits")
        out.append((index, entry.get("k_bits", k_bits if bits is None else bits),
                    entry.get("v_bits", v_bits if bits is None else bits)))
    return tuple(out)


MAX_LAYER_INDEX = 4096  # far above any decoder's layer count; bounds what a range like 0-999999999 would build


def parse_layer_setting(text: str) -> dict[str, dict[str, int | bool]]:
    """Parse the ``--kivi-layer`` syntax ``INDICES=SETTING`` into the ``"layers"`` dict of ``additional_config``.

    INDICES is a comma-separated list of decoder layer indices and ranges (``0,29`` or ``0-3,29``); SETTING is
    ``k4v2``, ``k4`` (keys only; values keep the global bits), ``v4``, ``4`` (both), or ``exact`` (unquantized: the
    model dtype, vLLM's own attention backend).

    Example: ``parse_layer_setting("0,29=k4v2")`` -> ``{"0": {"k_bits": 4, "v_bits": 2}, "29": {...}}``;
    ``parse_layer_setting("0=exact")`` -> ``{"0": {"exact": True}}``.

    Raises:
        KiviConfigError: anything else (the message shows the expected form).
    """

    form = f"expected INDICES=SETTING such as 0,29=k4v2, 0-3=k4, 5=4 or 0,29=exact, got {text!r}"
    indices, sep, setting = text.partition("=")
    m = re.fullmatch(r"(?:k(\d+))?(?:v(\d+))?|(\d+)|(exact)", setting.strip())
    if not sep or not setting.strip() or not m:
        raise KiviConfigError(f"KIVI: {FLAG['layers']}: {form}")
    entry: dict[str, int | bool] = {"bits": int(m.group(3))} if m.group(3) else {}
    if m.group(4):
        entry["exact"] = True
    if m.group(1):
        entry["k_bits"] = int(m.group(1))
    if m.group(2):
        entry["v_bits"] = int(m.group(2))
    out: dict[str, dict[str, int | bool]] = {}
    for part in indices.split(","):
        r = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not r:
            raise KiviConfigError(f"KIVI: {FLAG['layers']}: {form}")
        first, last = int(r.group(1)), int(r.group(2) or r.group(1))
        if last < first:
            raise KiviConfigError(f"KIVI: {FLAG['layers']}: empty range {part.strip()!r}; {form}")
        if last >= MAX_LAYER_INDEX:
            raise KiviConfigError(f"KIVI: {FLAG['layers']}: layer index {last} is not below {MAX_LAYER_INDEX}; {form}")
        for i in range(first, last + 1):
            out[str(i)] = dict(entry)
    return out
