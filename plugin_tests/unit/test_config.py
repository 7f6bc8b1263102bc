import pytest

from vllm_cp_nsa.config import CpNsaConfig, CpNsaConfigError


def test_absent_config_gives_defaults():
    for raw in (None, {}, {"other_plugin": {"x": 1}}):
        assert CpNsaConfig.from_additional_config(raw) == CpNsaConfig()
    assert CpNsaConfig().mode == "off"
    # The split policy chooses per N and KV dtype unless told (split_policy)
    assert (CpNsaConfig().decode_attention, CpNsaConfig().min_tokens_for_cp) == ("auto", "auto")


def test_values_are_parsed():
    cfg = CpNsaConfig.from_additional_config(
        {"cp_nsa": {"mode": "round-robin-split", "moe": "full", "kernels": "torch", "min_tokens_for_cp": 256}}
    )
    assert (cfg.mode, cfg.moe, cfg.kernels, cfg.min_tokens_for_cp) == ("round-robin-split", "full", "torch", 256)
    for decode_attention in ("auto", "split", "tp"):
        cfg = CpNsaConfig.from_additional_config({"cp_nsa": {"decode_attention": decode_attention,
                                                             "min_tokens_for_cp": "auto"}})
        assert (cfg.decode_attention, cfg.min_tokens_for_cp) == (decode_attention, "auto")
    assert CpNsaConfig.from_additional_config({"cp_nsa": {"min_tokens_for_cp": 0}}).min_tokens_for_cp == 0


@pytest.mark.parametrize("raw,expected", [
    ({"cp_nsa": {"mdoe": "x"}}, "unknown key 'mdoe'; allowed keys: mode, moe, kernels, min_tokens_for_cp, indexer_cache, "
                                  "decode_attention"),
    ({"cp_nsa": {"decode_attention": "heads"}}, "['decode_attention'] = 'heads'; allowed values: auto, split, tp"),
    ({"cp_nsa": {"decode_attention": True}}, "['decode_attention'] must be a string"),
    ({"cp_nsa": {"indexer_cache": "bf16"}}, "['indexer_cache'] = 'bf16'; allowed values: auto, fp8"),
    ({"cp_nsa": {"indexer_cache": 8}}, "['indexer_cache'] must be a string"),
    ({"cp_nsa": "round-robin-split"}, "must be a JSON object"),
    ({"cp_nsa": {"mode": 3}}, "['mode'] must be a string"),
    ({"cp_nsa": {"min_tokens_for_cp": -1}}, "['min_tokens_for_cp'] must be 'auto' or a non-negative integer, got -1"),
    ({"cp_nsa": {"min_tokens_for_cp": True}}, "must be 'auto' or a non-negative integer, got True"),
    ({"cp_nsa": {"min_tokens_for_cp": "8"}}, "must be 'auto' or a non-negative integer, got '8'"),
    ({"cp_nsa": {"min_tokens_for_cp": "AUTO"}}, "must be 'auto' or a non-negative integer"),
])
def test_malformed_config_names_key_and_allowed_values(raw, expected):
    with pytest.raises(CpNsaConfigError) as err:
        CpNsaConfig.from_additional_config(raw)
    assert expected in str(err.value)


@pytest.mark.parametrize("indexer_cache,kv_cache_dtype,provider_reads_fp8,fp8", [
    ("auto", "auto", False, False), ("auto", "fp8_ds_mla", False, True), ("auto", "auto", True, True),
    ("fp8", "auto", False, True), ("fp8", "fp8_ds_mla", False, True),
])
def test_indexer_cache_follows_kv_dtype_and_provider_unless_fp8_is_asked(indexer_cache, kv_cache_dtype,
                                                                        provider_reads_fp8, fp8):
    cfg = CpNsaConfig.from_additional_config({"cp_nsa": {"indexer_cache": indexer_cache}})
    assert cfg.indexer_cache == indexer_cache
    assert cfg.indexer_cache_fp8(kv_cache_dtype, provider_reads_fp8) is fp8


def test_check_choice_lists_registered_values():
    with pytest.raises(CpNsaConfigError, match="allowed values: auto, torch"):
        CpNsaConfig(kernels="cuda").check_choice("kernels", ["auto", "torch"])
    CpNsaConfig(kernels="torch").check_choice("kernels", ["auto", "torch"])
