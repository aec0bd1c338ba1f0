"""KIVI settings: defaults, additional_config parsing, and errors that name the flag and the allowed values."""

import pytest

from kivi_vllm.config import KiviConfig, KiviConfigError


def test_defaults_are_the_papers():
    c = KiviConfig()
    assert (c.k_bits, c.v_bits, c.group_size, c.residual, c.prefill) == (2, 2, 32, "kv", "streaming")


def test_from_additional_config():
    class V:  # the two attributes KiviConfig reads from a VllmConfig
        additional_config = {"kivi": {"bits": 4, "v_bits": 2, "group_size": 64}}

    c = KiviConfig.from_vllm_config(V())
    assert (c.k_bits, c.v_bits, c.group_size) == (4, 2, 64)
    assert KiviConfig.from_dict(c.to_dict()) == c
    assert KiviConfig.from_vllm_config(type("W", (), {"additional_config": {}})()) == KiviConfig()


@pytest.mark.parametrize("raw,match", [
    ({"bits": 3}, r"--kivi-k-bits \(or --kivi-bits\)=3 is not supported; allowed values: 2, 4"),
    ({"v_bits": 8}, r"--kivi-v-bits .*allowed values: 2, 4"),
    ({"group_size": 24}, r"--kivi-group-size=24 .*allowed values: 16, 32, 64, 128"),
    ({"residual": "none"}, r"--kivi-residual='none' .*allowed values: kv, k"),
    ({"prefill": "fast"}, r"--kivi-prefill='fast' .*allowed values: streaming, exact"),
    ({"bitz": 2}, r"unknown key\(s\) \['bitz'\]"),
    ({"k_bits": "2"}, r"--kivi-k-bits"),
])
def test_errors_name_flag_and_allowed_values(raw, match):
    with pytest.raises(KiviConfigError, match=match):
        KiviConfig.from_dict(raw)


def test_block_and_head_size_checks():
    c = KiviConfig(group_size=64)
    c.check_block_size(512)
    with pytest.raises(KiviConfigError, match="--block-size=96 is not a multiple of the group size 64"):
        c.check_block_size(96)
    for ok in (64, 80, 96, 128, 256):
        KiviConfig.check_head_size(ok)
    for bad in (40, 72, 512):
        with pytest.raises(KiviConfigError, match=f"head size {bad} is not supported"):
            KiviConfig.check_head_size(bad)


def parse_kivi_flags(argv, additional=None, **engine):
    import argparse

    from kivi_vllm.serving.cli import add_kivi_args

    p = argparse.ArgumentParser()
    add_kivi_args(p)
    ns = p.parse_args(argv)
    ns.additional_config = additional
    ns.kv_cache_dtype = engine.get("kv_cache_dtype", "auto")
    ns.block_size = engine.get("block_size")
    ns.attention_backend = engine.get("attention_backend")
    return ns


def test_kivi_serve_flags_merge_with_additional_config():
    from kivi_vllm.serving.cli import check_engine_args, kivi_config_from_args

    assert kivi_config_from_args(parse_kivi_flags([])) == KiviConfig()
    c = kivi_config_from_args(parse_kivi_flags(["--kivi-bits", "4", "--kivi-v-bits", "2", "--kivi-prefill", "exact"]))
    assert (c.k_bits, c.v_bits, c.prefill) == (4, 2, "exact")
    # flags win over --additional-config, which fills in the rest
    c = kivi_config_from_args(parse_kivi_flags(["--kivi-group-size", "64"], {"kivi": {"bits": 4, "group_size": 16}}))
    assert (c.k_bits, c.v_bits, c.group_size) == (4, 4, 64)
    check_engine_args(parse_kivi_flags([], block_size=512, attention_backend="CUSTOM"), KiviConfig())
    with pytest.raises(KiviConfigError, match="--block-size=100"):
        check_engine_args(parse_kivi_flags([], block_size=100), KiviConfig())
    with pytest.raises(KiviConfigError, match="--kv-cache-dtype fp8_e4m3 cannot be combined"):
        check_engine_args(parse_kivi_flags([], kv_cache_dtype="fp8_e4m3"), KiviConfig())
