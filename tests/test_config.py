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


# ------------------------------------------------------------------------------------------------ per-layer bits
def test_per_layer_bits_from_additional_config():
    c = KiviConfig.from_dict({"bits": 2, "layers": {"29": {"bits": 4}, "0": {"k_bits": 4}, 5: {"v_bits": 4}}})
    assert c.layers == ((0, 4, 2), (5, 2, 4), (29, 4, 4))  # unset bits are the global ones; sorted by layer
    assert [c.layer_bits(i) for i in (0, 1, 5, 29)] == [(4, 2), (2, 2), (2, 4), (4, 4)]
    assert c.for_layer(0) == KiviConfig(k_bits=4, v_bits=2) and c.for_layer(7) == KiviConfig()
    assert c.settings_by_layer(30) == {(2, 2): [i for i in range(30) if i not in (0, 5, 29)], (4, 2): [0],
                                       (2, 4): [5], (4, 4): [29]}
    assert KiviConfig.from_dict(c.to_dict()) == c
    assert c.to_dict()["layers"] == {"0": {"k_bits": 4, "v_bits": 2}, "5": {"k_bits": 2, "v_bits": 4},
                                     "29": {"k_bits": 4, "v_bits": 4}}
    assert "layers" not in KiviConfig().to_dict()
    assert KiviConfig(layers=[(0, 4, 2)]).layers == ((0, 4, 2),)  # a tuple, so the config stays hashable
    hash(KiviConfig(layers=[(0, 4, 2)]))
    assert c.describe().endswith("layers 0=k4v2 5=k2v4 29=k4v4")
    # global KIVI-4 with one layer at 2 bits: a layer inherits the global bits it does not set
    assert KiviConfig.from_dict({"bits": 4, "layers": {"3": {"k_bits": 2}}}).layers == ((3, 2, 4),)
    c.check_num_layers(30)
    with pytest.raises(KiviConfigError, match=r"--kivi-layer: layer\(s\) 29 beyond the model's 29 layers "
                                              r"\(indices 0 to 28\)"):
        c.check_num_layers(29)


@pytest.mark.parametrize("layers,match", [
    ({"0": {"k_bits": 3}}, r"--kivi-layer: layer 0: k_bits=3 is not supported; allowed values: 2, 4"),
    ({"0": {"bits": 8}}, r"layer 0: k_bits=8 is not supported"),
    ({"-1": {"k_bits": 4}}, r"layer index -1 is not a non-negative integer"),
    ({"last": {"k_bits": 4}}, r"layer index 'last' is not an integer"),
    ({True: {"k_bits": 4}}, r"layer index True is not an integer"),
    ({1.7: {"k_bits": 4}}, r"layer index 1.7 is not an integer"),
    ({"1_0": {"k_bits": 4}}, r"layer index '1_0' is not an integer"),
    ({"0": {"group_size": 16}}, r"layer 0: expected a dict of bits, k_bits, v_bits"),
    ({"0": 4}, r"layer 0: expected a dict of bits, k_bits, v_bits"),
    ({"0": {}}, r"layer 0: expected a dict"),
    ({"0": {"k_bits": 4}, 0: {"k_bits": 2}}, r"layer 0 is listed twice"),
    ([0, 29], r'"layers" must map layer indices to settings'),
])
def test_per_layer_errors(layers, match):
    with pytest.raises(KiviConfigError, match=match):
        KiviConfig.from_dict({"layers": layers})


def test_layer_setting_syntax():
    from kivi_vllm.config import parse_layer_setting

    assert parse_layer_setting("0,29=k4v2") == {"0": {"k_bits": 4, "v_bits": 2}, "29": {"k_bits": 4, "v_bits": 2}}
    assert parse_layer_setting("0-2=k4") == {str(i): {"k_bits": 4} for i in range(3)}
    assert parse_layer_setting("5=v4") == {"5": {"v_bits": 4}} and parse_layer_setting("5=4") == {"5": {"bits": 4}}
    for bad in ("0,29", "0=", "=k4", "a=k4", "0=k4x", "3-1=k4", "0=q4", "0-999999999=k4"):
        with pytest.raises(KiviConfigError, match="--kivi-layer"):
            parse_layer_setting(bad)
    c = KiviConfig.from_dict({"layers": parse_layer_setting("0,29=k4v2")})
    assert KiviConfig.from_dict({"layers": parse_layer_setting(c.describe_layers())}) == c


# ------------------------------------------------------------------------------------------------ exact layers
def test_exact_layers_from_additional_config_and_flag():
    from kivi_vllm.config import EXACT_BITS, parse_layer_setting
    from kivi_vllm.serving.cli import kivi_config_from_args

    c = KiviConfig.from_dict({"bits": 2, "layers": {"29": {"exact": True}, "0": {"exact": True}, "5": {"k_bits": 4}}})
    assert c.layers == ((0, EXACT_BITS, EXACT_BITS), (5, 4, 2), (29, EXACT_BITS, EXACT_BITS)) and EXACT_BITS == 16
    assert c.exact_layers == (0, 29) and [c.is_exact(i) for i in (0, 1, 5, 29)] == [True, False, False, True]
    assert c.layer_bits(0) == (16, 16) and c.for_layer(5) == KiviConfig(k_bits=4) and c.for_layer(1) == KiviConfig()
    with pytest.raises(KiviConfigError, match="--kivi-layer: layer 0 is exact; it has no KIVI page settings"):
        c.for_layer(0)
    assert c.to_dict()["layers"] == {"0": {"exact": True}, "5": {"k_bits": 4, "v_bits": 2}, "29": {"exact": True}}
    assert KiviConfig.from_dict(c.to_dict()) == c
    assert c.describe().endswith("layers 0,29=exact 5=k4v2")
    parts = [parse_layer_setting(part) for part in c.describe_layers().split()]
    assert KiviConfig.from_dict({"layers": {k: v for p in parts for k, v in p.items()}}) == c
    assert c.settings_by_layer(30)[(16, 16)] == [0, 29]
    # the flag syntax: INDICES=exact, also in ranges and next to bits
    assert parse_layer_setting("0,29=exact") == {"0": {"exact": True}, "29": {"exact": True}}
    assert parse_layer_setting("0-2=exact") == {str(i): {"exact": True} for i in range(3)}
    f = kivi_config_from_args(parse_kivi_flags(["--kivi-layer", "0,29=exact", "--kivi-layer", "29=k4"]))
    assert f.layers == ((0, 16, 16), (29, 4, 2))  # a later flag wins for its layers
    c.check_num_layers(30)
    with pytest.raises(KiviConfigError, match=r"layer\(s\) 29 beyond the model's 29 layers"):
        c.check_num_layers(29)


@pytest.mark.parametrize("layers,match", [
    ({"0": {"exact": False}}, r'layer 0: "exact" must be true and stand alone'),
    ({"0": {"exact": 1}}, r'layer 0: "exact" must be true'),
    ({"0": {"exact": True, "k_bits": 4}}, r'layer 0: "exact" must be true and stand alone'),
    ({"0": {"bits": 16}}, r'layer 0: 16 bits is written {"exact": true} \(--kivi-layer 0=exact\)'),
    ({"0": {"k_bits": 16}}, r"16 bits is written"),
    ({"0": {"exact": True}, 0: {"k_bits": 4}}, r"layer 0 is listed twice"),
])
def test_exact_layer_errors(layers, match):
    with pytest.raises(KiviConfigError, match=match):
        KiviConfig.from_dict({"layers": layers})


def test_exact_layer_flag_errors():
    from kivi_vllm.config import parse_layer_setting

    for bad in ("0=exactly", "0=k4exact", "exact", "0=Exact", "0=exact=1"):
        with pytest.raises(KiviConfigError, match="--kivi-layer: expected INDICES=SETTING such as .* 0,29=exact"):
            parse_layer_setting(bad)
    # an exact layer cannot be half exact: 16-bit keys with 2-bit values are refused (no backend stores that)
    with pytest.raises(KiviConfigError, match=r"layer 3: k_bits=16 is not supported; allowed values: 2, 4 \(or the "
                                              r"whole layer exact: 3=exact\)"):
        KiviConfig(layers=((3, 16, 2),))


def test_capacity_counts_exact_pages():
    """capacity_summary over KIVI-2 layers and two exact (bf16) layers, against hand arithmetic for SmolLM2."""
    import torch
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    from kivi_vllm.spec import KiviAttentionSpec, capacity_summary

    cfg = KiviConfig.from_dict({"bits": 2, "layers": {"0": {"exact": True}, "29": {"exact": True}}})
    dense = FullAttentionSpec(block_size=512, num_kv_heads=3, head_size=64, dtype=torch.bfloat16)
    spec = KiviAttentionSpec.from_full_spec(dense, cfg.for_layer(1), torch.bfloat16)
    specs = [spec.for_layer(cfg, i) for i in range(30)]
    assert type(specs[0]) is FullAttentionSpec and specs[0] == dense and type(specs[1]) is KiviAttentionSpec
    exact_page, kivi_page = 3 * 512 * 2 * 64 * 2, 3 * 31_232  # bytes per block: bf16 K and V; a KIVI-2 page
    assert specs[0].page_size_bytes == exact_page and specs[1].page_size_bytes == kivi_page
    blocks = 2**30 // (2 * exact_page + 28 * kivi_page)
    assert blocks == 314
    c = capacity_summary(specs, blocks)
    assert c["tokens"] == 314 * 512 and c["bytes"] == blocks * (2 * exact_page + 28 * kivi_page)
    assert c["dense_tokens"] == c["bytes"] // (30 * 3 * 2 * 64 * 2)
    assert c["bytes_per_token_head"] == pytest.approx((2 * 256 + 28 * 61) / 30)  # 256 B exact, 61 B KIVI-2


def test_kivi_serve_layer_flag():
    from kivi_vllm.serving.cli import kivi_config_from_args

    c = kivi_config_from_args(parse_kivi_flags(["--kivi-layer", "0,29=k4v2", "--kivi-layer", "29=4"]))
    assert c.layers == ((0, 4, 2), (29, 4, 4))  # a later flag wins for its layers
    # the flag adds to --additional-config's "layers" and wins per layer
    c = kivi_config_from_args(parse_kivi_flags(["--kivi-layer", "1=k4"], {"kivi": {"layers": {"1": {"bits": 4},
                                                                                               "2": {"bits": 4}}}}))
    assert c.layers == ((1, 4, 2), (2, 4, 4))
    with pytest.raises(KiviConfigError, match="--kivi-layer: expected INDICES=SETTING"):
        kivi_config_from_args(parse_kivi_flags(["--kivi-layer", "0:k4"]))
