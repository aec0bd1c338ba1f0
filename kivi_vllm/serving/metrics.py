"""KIVI facts on vLLM's ``/metrics``: a ``vllm.stat_logger_plugins`` entry point (``pyproject.toml``).

vLLM's ``AsyncLLM`` (the API server's engine client) loads every stat-logger plugin next to its own Prometheus and
logging stat loggers (``v1/metrics/loggers.py``: ``load_stat_logger_plugin_factories``, ``StatLoggerManager``),
after the engine cores reported their KV-cache blocks. :class:`KiviStatLogger` then publishes, in the same
Prometheus registry, so that ``/metrics`` keeps every ``vllm:`` metric and adds:

* ``kivi:cache_config_info`` (1, labels ``k_bits``, ``v_bits``, ``group_size``, ``residual``, ``prefill``,
  ``block_size``, ``layers``): the KIVI settings, like vLLM's ``vllm:cache_config_info``; ``layers`` lists the
  layers with their own bits (``0,29=k4v2``, empty when none), ``k_bits``/``v_bits`` are every other layer's;
* ``kivi:kv_cache_capacity_tokens``: tokens the KV cache holds (vLLM's ``num_gpu_blocks x block_size``; summed over
  data-parallel engines, as vLLM sums ``num_gpu_blocks``);
* ``kivi:kv_cache_dense_capacity_tokens``: tokens an unquantized cache of the model dtype would hold in the same
  bytes;
* ``kivi:kv_cache_capacity_ratio``: the ratio of the two (4.20 for KIVI-2, G = 32, B = 512, bf16; with per-layer
  bits, over the page bytes of all layers).

The numbers come from :func:`kivi_vllm.spec.capacity_summary`, the function behind the workers' start-up line, so
the log and ``/metrics`` agree. Engines that do not use the KIVI backend get no ``kivi:`` metrics.
Side effect of any stat-logger plugin in vLLM 0.26: with ``--disable-log-stats`` vLLM still records statistics
for the plugin and for its Prometheus logger (it says so in one log line), but not its periodic log lines.
"""

from __future__ import annotations

from prometheus_client import REGISTRY, Gauge
from vllm.v1.metrics.loggers import AggregateStatLoggerBase

#: Prefix of every metric this module adds.
PREFIX = "kivi:"
INFO_LABELS = ("k_bits", "v_bits", "group_size", "residual", "prefill", "block_size", "layers")


def uses_kivi(vllm_config) -> bool:
    """True when the engine's attention backend is the CUSTOM slot holding the KIVI backend."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    from .. import BACKEND_PATH

    backend = getattr(vllm_config.attention_config, "backend", None)
    return backend == AttentionBackendEnum.CUSTOM and AttentionBackendEnum.CUSTOM.get_path() == BACKEND_PATH


def kivi_capacity(vllm_config) -> dict:
    """:func:`kivi_vllm.spec.capacity_summary` of the engine's KV cache, from the config the API server holds: one
    spec per decoder layer (``get_total_num_hidden_layers``), each with its own bits.

    Raises:
        ValueError: the engine reported no KV-cache blocks yet.
    """
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    from ..config import KiviConfig
    from ..spec import KiviAttentionSpec, capacity_summary, layer_specs

    cache, model = vllm_config.cache_config, vllm_config.model_config
    if not cache.num_gpu_blocks:
        raise ValueError("KIVI: the engine reported no KV-cache blocks")
    dense = FullAttentionSpec(block_size=cache.block_size, head_size=model.get_head_size(), dtype=model.dtype,
                              num_kv_heads=model.get_num_kv_heads(vllm_config.parallel_config))
    cfg = KiviConfig.from_vllm_config(vllm_config)
    spec = KiviAttentionSpec.from_full_spec(dense, cfg, model.dtype)
    return capacity_summary(layer_specs(spec, cfg, model.get_total_num_hidden_layers()), cache.num_gpu_blocks)


def _unregister_kivi_metrics() -> None:
    # A second engine in one process (tests, benchmarks) registers the gauges again; vLLM does the same for its
    # own metrics (v1/metrics/prometheus.py: unregister_vllm_metrics).
    for collector in list(REGISTRY._collector_to_names):
        if getattr(collector, "_name", "").startswith(PREFIX):
            REGISTRY.unregister(collector)


class KiviStatLogger(AggregateStatLoggerBase):
    """Publishes the KIVI cache facts (module docstring) once, when vLLM builds its stat loggers; records nothing
    per step (vLLM's own loggers do)."""

    def __init__(self, vllm_config, engine_indexes: list[int] | None = None) -> None:
        self.enabled = uses_kivi(vllm_config)
        if not self.enabled:
            return
        from ..config import KiviConfig

        _unregister_kivi_metrics()
        cfg = KiviConfig.from_vllm_config(vllm_config)
        model_name = vllm_config.model_config.served_model_name
        info = Gauge(PREFIX + "cache_config_info", "KIVI KV-cache settings (kivi-vllm)",
                     labelnames=["model_name", *INFO_LABELS], multiprocess_mode="mostrecent")
        info.labels(model_name=model_name, k_bits=cfg.k_bits, v_bits=cfg.v_bits, group_size=cfg.group_size,
                    residual=cfg.residual, prefill=cfg.prefill, block_size=vllm_config.cache_config.block_size,
                    layers=cfg.describe_layers()).set(1)
        try:
            cap = kivi_capacity(vllm_config)
        except ValueError as e:  # no blocks reported to this process: publish the settings only, never stop serving
            from vllm.logger import init_logger

            init_logger("vllm.kivi").warning("%s; /metrics shows the KIVI settings without the capacity", e)
            return
        for name, doc, value in (
            ("kv_cache_capacity_tokens", "Tokens the KIVI KV cache holds", cap["tokens"]),
            ("kv_cache_dense_capacity_tokens",
             "Tokens an unquantized KV cache of the model dtype would hold in the same memory", cap["dense_tokens"]),
            ("kv_cache_capacity_ratio", "KIVI capacity / unquantized capacity in the same memory", cap["ratio"]),
        ):
            Gauge(PREFIX + name, doc, labelnames=["model_name"], multiprocess_mode="mostrecent").labels(
                model_name=model_name).set(value)

    def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0) -> None:
        """Nothing per step: the KIVI facts are fixed once the cache is allocated."""

    def log_engine_initialized(self) -> None:
        """Nothing: the workers log the same facts in one line when they build the KIVI metadata."""
