"""The version-checked vLLM patches: they match the installed vLLM 0.26.0 and refuse anything else, loudly."""

import subprocess
import sys

import pytest
import torch

import kivi_vllm
from kivi_vllm import patches
from kivi_vllm.patches import cpu_platform, kv_cache_spec


def test_installed_vllm_is_the_supported_one():
    # Fails on any vLLM but 0.26.x: the patches below were written against its source.
    assert patches.vllm_version().startswith("0.26."), patches.vllm_version()


def test_patched_sources_match_vllm_0_26_0():
    from vllm.model_executor.layers.attention.attention import Attention
    from vllm.platforms.cpu import CpuPlatform

    kivi_vllm.register()  # idempotent; the wrappers keep the original in __wrapped__
    assert patches.source_fingerprint(Attention.get_kv_cache_spec) == kv_cache_spec.EXPECTED
    # what the per-layer backend swap relies on: get_attn_backend returns the attribute the patch sets, and layer
    # names map to indices as extract_layer_index does in 0.26.0
    from vllm.model_executor.models.utils import extract_layer_index

    assert patches.source_fingerprint(Attention.get_attn_backend) == kv_cache_spec.EXPECTED_GET_BACKEND
    assert patches.source_fingerprint(extract_layer_index) == kv_cache_spec.EXPECTED_LAYER_INDEX
    # what the exact-layer swap relies on: the impl arguments and attributes Attention.__init__ sets, forward reading
    # attn_backend per call, and the selector that picks vLLM's own backend
    from vllm.v1.attention.selector import _cached_get_attn_backend

    assert patches.source_fingerprint(Attention.__init__) == kv_cache_spec.EXPECTED_ATTN_INIT
    assert patches.source_fingerprint(Attention.forward) == kv_cache_spec.EXPECTED_ATTN_FORWARD
    assert patches.source_fingerprint(_cached_get_attn_backend) == kv_cache_spec.EXPECTED_SELECT_BACKEND
    assert patches.source_fingerprint(CpuPlatform.get_attn_backend_cls.__func__) == cpu_platform.EXPECTED_SELECT
    assert patches.source_fingerprint(CpuPlatform.update_block_size_for_backend.__func__) == cpu_platform.EXPECTED_BLOCK


@pytest.mark.parametrize("version", ["0.25.1", "0.27.0", "1.0.0", "0.2.6"])
def test_other_vllm_versions_are_refused(version):
    with pytest.raises(patches.VllmVersionError, match=f"supports vLLM 0.26.x only, found vLLM {version}"):
        patches.check_vllm_version(version)


def test_changed_source_is_refused():
    def get_kv_cache_spec(self, vllm_config):  # stands in for a different vLLM's version of the function
        return None

    with pytest.raises(patches.VllmVersionError, match="source differs from vLLM 0.26.0's"):
        patches.require_source(get_kv_cache_spec, kv_cache_spec.EXPECTED, "Attention.get_kv_cache_spec")


def test_register_is_idempotent_and_registers_custom():
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    from vllm.model_executor.layers.attention.attention import Attention
    from vllm.platforms.cpu import CpuPlatform

    kivi_vllm.register()
    kivi_vllm.register()
    assert AttentionBackendEnum.CUSTOM.get_path() == kivi_vllm.BACKEND_PATH
    # one wrapper each, around vLLM's own function: a second register() must not wrap the wrapper
    for fn in (Attention.get_kv_cache_spec, CpuPlatform.get_attn_backend_cls.__func__,
               CpuPlatform.update_block_size_for_backend.__func__):
        assert getattr(fn, "_kivi_patched", False) and not getattr(fn.__wrapped__, "_kivi_patched", False)


def test_layer_index_of_attention_layer_names():
    from kivi_vllm.config import KiviConfigError

    assert kv_cache_spec.layer_index("model.layers.29.self_attn.attn") == 29
    assert kv_cache_spec.layer_index("language_model.model.layers.3.self_attn.attn") == 3
    with pytest.raises(KiviConfigError, match="cannot tell the layer index of attention layer 'blocks.1.2.attn'"):
        kv_cache_spec.layer_index("blocks.1.2.attn")


def test_one_backend_class_per_layer_setting():
    import pickle

    from kivi_vllm.backend.backend import KiviAttentionBackend, backend_for_bits
    from kivi_vllm.config import KiviConfigError

    k4v2 = backend_for_bits(4, 2)
    assert k4v2 is backend_for_bits(4, 2) and k4v2 is not backend_for_bits(4, 4)
    assert issubclass(k4v2, KiviAttentionBackend) and k4v2.KIVI_BITS == (4, 2) and KiviAttentionBackend.KIVI_BITS is None
    # the runners group layers by full_cls_name(); the name is vLLM's CUSTOM slot for every setting
    assert k4v2.full_cls_name() == ("kivi_vllm.backend.backend", "K4V2KiviAttentionBackend")
    assert k4v2.get_name() == "CUSTOM" and pickle.loads(pickle.dumps(k4v2)) is k4v2
    with pytest.raises(KiviConfigError):
        backend_for_bits(3, 2)
    # a fresh process that never called backend_for_bits unpickles the class by name (module __getattr__)
    code = ("import pickle, sys; c = pickle.loads(sys.stdin.buffer.read()); "
            "print(c.__qualname__, c.KIVI_BITS, c.__mro__[1].__name__)")
    out = subprocess.run([sys.executable, "-c", code], input=pickle.dumps(backend_for_bits(2, 4)),
                         capture_output=True, timeout=300, check=True).stdout.decode()  # vLLM logs there too
    assert out.splitlines()[-1].split() == ["K2V4KiviAttentionBackend", "(2,", "4)", "KiviAttentionBackend"]
    import kivi_vllm.backend.backend as mod

    with pytest.raises(AttributeError):
        mod.K3V2KiviAttentionBackend


def test_exact_layer_refused_when_vllms_backend_refuses(monkeypatch):
    """use_vllm_backend stops with the backend's own reasons (e.g. the block size) instead of serving the layer;
    on CPU, CPU_ATTN takes every KIVI block size (multiples of 16), so a stand-in backend refuses here."""
    from types import SimpleNamespace

    from vllm.v1.attention import selector

    from kivi_vllm.config import KiviConfigError

    class Refusing:
        @staticmethod
        def get_name():
            return "STAND_IN"

        @classmethod
        def validate_configuration(cls, **kw):
            return [f"block_size not supported ({kw['block_size']})"]

    seen = {}

    def pick(backend, attn_selector_config, num_heads=None):
        seen.update(backend=backend, config=attn_selector_config, num_heads=num_heads)
        return Refusing

    monkeypatch.setattr(selector, "_cached_get_attn_backend", pick)
    layer = SimpleNamespace(head_size=64, dtype=torch.bfloat16, kv_cache_dtype="auto", has_sink=False,
                            use_mm_prefix=False, attn_type="decoder", sliding_window=None, num_heads=9,
                            layer_name="model.layers.0.self_attn.attn", impl=SimpleNamespace())
    cfg = SimpleNamespace(cache_config=SimpleNamespace(block_size=512),
                          attention_config=SimpleNamespace(use_non_causal=False),
                          parallel_config=SimpleNamespace(prefill_context_parallel_size=1))
    with pytest.raises(KiviConfigError, match=r"--kivi-layer: exact layer model.layers.0.self_attn.attn: vLLM's "
                                              r"STAND_IN attention backend cannot serve it at block size 512 "
                                              r"\(block_size not supported \(512\)\)"):
        kv_cache_spec.use_vllm_backend(layer, cfg)
    # vLLM's own choice (no backend forced), asked with the KIVI block size so that the backend checks it
    assert seen["backend"] is None and seen["config"].block_size == 512 and seen["num_heads"] == 9
    assert not hasattr(layer, "kivi_exact")  # the layer was left alone
