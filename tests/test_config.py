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
    assert KiviConfig().value_group_size(80) == 16 and KiviConfig().value_group_size(128) == 32
