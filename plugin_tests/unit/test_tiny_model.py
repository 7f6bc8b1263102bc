"""Tests for eval/make_tiny_model.py (tiny random DeepSeek-V3.2 checkpoint) and eval/hf_oracle.py.

CPU only, no network. Run: .venv/bin/python -m pytest plugin_tests/unit/test_tiny_model.py -q
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

EVAL_DIR = Path(__file__).resolve().parents[2] / "eval"
if str(EVAL_DIR) not in sys.path:
    sys.path.insert(0, str(EVAL_DIR))

import hf_oracle  # noqa: E402
import make_tiny_model as mtm  # noqa: E402

from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

TOPK = 64
NUM_LAYERS = 2


def _keys(model_dir: Path) -> set[str]:
    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        return set(f.keys())


def _quiet():
    return hf_oracle._quiet_transformers()


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return mtm.build_tiny_model(tmp_path_factory.mktemp("tiny") / "m")


@pytest.fixture(scope="module")
def tiny_no_mtp(tmp_path_factory) -> Path:
    return mtm.build_tiny_model(tmp_path_factory.mktemp("tiny0") / "m", num_nextn_predict_layers=0)


@pytest.fixture(scope="module")
def hf_model(tiny):
    return hf_oracle.load_hf_model(tiny)


@pytest.fixture(scope="module")
def tokenizer(tiny):
    return hf_oracle.load_tokenizer(tiny)


# ----------------------------------------------------------------------------- config


def test_config_fields(tiny):
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.deepseek_v32 import DeepseekV32Config

    raw = json.loads((tiny / "config.json").read_text())
    assert raw["architectures"] == ["DeepseekV32ForCausalLM"]
    assert raw["model_type"] == "deepseek_v32"

    auto_cfg = AutoConfig.from_pretrained(tiny)
    assert auto_cfg.model_type == "deepseek_v32"
    # vLLM's get_config() re-registers AutoConfig["deepseek_v32"] -> DeepseekV3Config in-process;
    # only check the class when nothing in this pytest process has done that.
    if CONFIG_MAPPING["deepseek_v32"] is DeepseekV32Config:
        assert type(auto_cfg) is DeepseekV32Config
    cfg = DeepseekV32Config.from_pretrained(tiny)
    expected = dict(
        hidden_size=256, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=64,
        kv_lora_rank=512, qk_nope_head_dim=32, qk_rope_head_dim=64, v_head_dim=32,
        index_n_heads=16, index_head_dim=128, index_topk=TOPK, num_hidden_layers=NUM_LAYERS,
        first_k_dense_replace=1, intermediate_size=256, moe_intermediate_size=64,
        n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, n_group=2, topk_group=1,
        norm_topk_prob=True, routed_scaling_factor=2.5, hidden_act="silu", rms_norm_eps=1e-6,
        max_position_embeddings=40 * 64, tie_word_embeddings=False, attention_bias=False,
        bos_token_id=0, eos_token_id=1,
    )
    for c in (auto_cfg, cfg):
        got = {k: getattr(c, k) for k in expected}
        assert got == expected
        # Keys that DeepseekV32Config does not declare but vLLM reads: kept as extra attributes.
        assert c.scoring_func == "sigmoid"
        assert c.topk_method == "noaux_tc"
        assert c.num_nextn_predict_layers == 1
        assert c.moe_layer_freq == 1
        assert c.dtype == torch.float32
        # DeepSeek-V3.2's YaRN, its original context scaled down from 4096 to 64.
        assert c.rope_parameters == YARN_TINY
        assert c.vocab_size % 64 == 0
    assert cfg.mlp_layer_types == ["dense", "sparse"]
    assert cfg.layer_types == ["indexed_attention"] * NUM_LAYERS


YARN_TINY = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40, "original_max_position_embeddings": 64,
             "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}


def test_real_dims_config_has_the_release_rope():
    cfg = mtm.make_config(1536, real_dims=True)
    assert cfg["rope_parameters"] == {**YARN_TINY, "original_max_position_embeddings": 4096}
    assert cfg["max_position_embeddings"] == 163840


_VLLM_CHECK = r"""
import json, sys
from vllm.transformers_utils.config import get_config
from vllm.tokenizers import get_tokenizer
cfg = get_config(sys.argv[1], trust_remote_code=False)
tok = get_tokenizer(sys.argv[1])
keys = ["model_type", "index_topk", "index_n_heads", "index_head_dim", "kv_lora_rank", "qk_rope_head_dim",
        "scoring_func", "topk_method", "num_nextn_predict_layers", "first_k_dense_replace", "vocab_size"]
out = {k: getattr(cfg, k) for k in keys}
out.update(rope_parameters=cfg.rope_parameters, bos=tok.bos_token_id, eos=tok.eos_token_id, ntok=len(tok))
print("RESULT " + json.dumps(out))
"""


def test_config_loads_in_vllm(tiny):
    """vLLM 0.32 config + tokenizer loading (in a subprocess: it mutates transformers' AutoConfig registry)."""
    import importlib.util
    import subprocess

    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vllm not installed")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", _VLLM_CHECK, str(tiny)], capture_output=True, text=True,
                          timeout=120, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    got = json.loads(lines[-1][len("RESULT "):])
    assert got.pop("rope_parameters") == YARN_TINY
    raw = json.loads((tiny / "config.json").read_text())
    assert got == dict(model_type="deepseek_v32", index_topk=TOPK, index_n_heads=16, index_head_dim=128,
                       kv_lora_rank=512, qk_rope_head_dim=64, scoring_func="sigmoid", topk_method="noaux_tc",
                       num_nextn_predict_layers=1, first_k_dense_replace=1, vocab_size=raw["vocab_size"],
                       bos=0, eos=1, ntok=got["ntok"])
    assert got["ntok"] <= raw["vocab_size"]


# ----------------------------------------------------------------------------- tensor names


def _hf_checkpoint_keys(model) -> set[str]:
    """HF state-dict keys with the fused expert tensors expanded to DeepSeek per-expert names."""
    out = set()
    n_exp = model.config.n_routed_experts
    for k in model.state_dict().keys():
        m = re.fullmatch(r"(.*\.mlp\.experts\.)(gate_up_proj|down_proj)", k)
        if m is None:
            out.add(k)
            continue
        projs = ["gate_proj", "up_proj"] if m.group(2) == "gate_up_proj" else ["down_proj"]
        out.update(f"{m.group(1)}{e}.{p}.weight" for e in range(n_exp) for p in projs)
    return out


def _main_keys(keys: set[str], num_layers: int) -> set[str]:
    return {k for k in keys if not (m := re.match(r"model\.layers\.(\d+)\.", k)) or int(m.group(1)) < num_layers}


def test_tensor_names_match_hf(tiny, tiny_no_mtp, tmp_path):
    from transformers.models.deepseek_v32 import DeepseekV32Config, DeepseekV32ForCausalLM

    file_keys = _keys(tiny)
    main = _main_keys(file_keys, NUM_LAYERS)
    with _quiet():
        model = DeepseekV32ForCausalLM(DeepseekV32Config.from_pretrained(tiny))
    hf_keys = _hf_checkpoint_keys(model)
    assert main == hf_keys
    # Independent check: HF's own save_pretrained reverts its weight conversion to checkpoint names.
    with _quiet():
        model.save_pretrained(tmp_path / "hf_saved")
    assert _keys(tmp_path / "hf_saved") == main
    # Spot-check real DeepSeek-V3.2 names.
    for k in ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
              "model.layers.0.mlp.gate_proj.weight", "model.layers.1.mlp.gate.e_score_correction_bias",
              "model.layers.1.mlp.experts.7.down_proj.weight", "model.layers.1.mlp.shared_experts.up_proj.weight",
              "model.layers.0.self_attn.indexer.k_norm.bias", "model.layers.1.self_attn.kv_a_proj_with_mqa.weight"]:
        assert k in main, k

    # MTP layer (index == num_hidden_layers): DeepSeek extras + a full MoE decoder layer.
    mtp = file_keys - main
    p = f"model.layers.{NUM_LAYERS}."
    extras = {p + n for n in ["enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight",
                              "shared_head.head.weight", "embed_tokens.weight"]}
    moe_layer = {k.replace("model.layers.1.", p) for k in main if k.startswith("model.layers.1.")}
    assert mtp == extras | moe_layer
    assert any(".mlp.experts." in k for k in mtp) and any(".indexer." in k for k in mtp)

    # M = 0: no tensors beyond the main layers, main set unchanged.
    keys0 = _keys(tiny_no_mtp)
    assert keys0 == main
    assert json.loads((tiny_no_mtp / "config.json").read_text())["num_nextn_predict_layers"] == 0


def test_weight_shapes_and_dtypes(tiny, tmp_path):
    w = load_file(str(tiny / "model.safetensors"))
    cfg = json.loads((tiny / "config.json").read_text())
    assert w["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"].shape == (512 + 64, 256)
    assert w["model.layers.0.self_attn.kv_b_proj.weight"].shape == (4 * (32 + 32), 512)
    assert w["model.layers.0.self_attn.q_b_proj.weight"].shape == (4 * (32 + 64), 64)
    assert w["model.layers.0.self_attn.indexer.wq_b.weight"].shape == (16 * 128, 64)
    assert w["model.layers.0.self_attn.indexer.wk.weight"].shape == (128, 256)
    assert w["model.layers.0.self_attn.indexer.weights_proj.weight"].shape == (16, 256)
    assert w["lm_head.weight"].shape == (cfg["vocab_size"], 256)
    assert all(t.dtype == torch.float32 for t in w.values())
    assert all(torch.isfinite(t).all() for t in w.values())
    # MTP copies of the shared embedding / head.
    assert torch.equal(w["model.layers.2.embed_tokens.weight"], w["model.embed_tokens.weight"])
    assert torch.equal(w["model.layers.2.shared_head.head.weight"], w["lm_head.weight"])

    bf = mtm.build_tiny_model(tmp_path / "bf16", dtype="bfloat16", num_nextn_predict_layers=0)
    wb = load_file(str(bf / "model.safetensors"))
    assert json.loads((bf / "config.json").read_text())["torch_dtype"] == "bfloat16"
    for k, t in wb.items():
        want = torch.float32 if k.endswith("e_score_correction_bias") else torch.bfloat16
        assert t.dtype == want, k
    # bf16 model loads in HF and runs.
    m = hf_oracle.load_hf_model(bf, dtype=torch.bfloat16)
    logits = hf_oracle.full_logits(m, list(range(5, 5 + 3 * TOPK)))
    assert torch.isfinite(logits).all() and logits[-1].std() > 0.5


# ----------------------------------------------------------------------------- HF load / forward


def test_hf_loads_exact_weights(tiny, hf_model):
    w = load_file(str(tiny / "model.safetensors"))
    sd = hf_model.state_dict()
    n_exp = hf_model.config.n_routed_experts
    for k, v in sd.items():
        if k.endswith("experts.gate_up_proj"):
            p = k[: -len("gate_up_proj")]
            ref = torch.stack([torch.cat([w[f"{p}{e}.gate_proj.weight"], w[f"{p}{e}.up_proj.weight"]]) for e in range(n_exp)])
        elif k.endswith("experts.down_proj"):
            p = k[: -len("down_proj")]
            ref = torch.stack([w[f"{p}{e}.down_proj.weight"] for e in range(n_exp)])
        else:
            ref = w[k]
        assert torch.equal(ref, v), k


def test_forward_long_prompt_exercises_sparsity(hf_model):
    S = 3 * TOPK
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(len(mtm.SPECIAL_TOKENS), 1000, (S,), generator=g).tolist()

    logits = hf_oracle.full_logits(hf_model, ids)
    assert logits.shape == (S, hf_model.config.vocab_size)
    assert torch.isfinite(logits).all()
    assert logits[-1].std() > 1.0  # not all equal
    assert len(set(logits.argmax(-1).tolist())) > S // 4  # predictions vary across positions

    caps = hf_oracle.capture_indexer_topk(hf_model, ids)
    assert sorted(caps) == list(range(NUM_LAYERS))
    for layer, tk in caps.items():
        assert tk.shape == (S, TOPK)
        sets = hf_oracle.valid_topk_sets(tk)
        # Last query: exactly index_topk keys out of S candidates.
        assert len(sets[-1]) == TOPK < S
        assert len(set(tk[-1].tolist())) == TOPK and max(tk[-1].tolist()) < S
        # Causal semantics: query t sees min(topk, t+1) keys among 0..t.
        assert [len(s) for s in sets] == [min(TOPK, t + 1) for t in range(S)]
        # Selection is content dependent: not just the most recent window.
        assert sets[-1] != set(range(S - TOPK, S))
        assert len({frozenset(s) for s in sets[TOPK:]}) > 1

    # Same weights with the indexer made dense: identical for t < topk, different after.
    idx_mods = [m for m in hf_model.modules() if hasattr(m, "index_topk")]
    assert len(idx_mods) == NUM_LAYERS
    try:
        for m in idx_mods:
            m.index_topk = 10**6
        dense = hf_oracle.full_logits(hf_model, ids)
    finally:
        for m in idx_mods:
            m.index_topk = TOPK
    assert torch.allclose(dense[:TOPK], logits[:TOPK], atol=1e-5, rtol=0)
    assert (dense[TOPK:] - logits[TOPK:]).abs().max() > 1e-2


def test_oracle_prompt_logprobs_and_greedy(hf_model, tokenizer):
    ids = tokenizer("The quick brown fox jumps over the lazy dog")["input_ids"]
    lps = hf_oracle.prompt_logprobs(hf_model, ids)
    assert len(lps) == len(ids) and lps[0] is None
    assert all(isinstance(x, float) and x <= 0.0 for x in lps[1:])
    ref = torch.log_softmax(hf_oracle.full_logits(hf_model, ids), -1)
    for i in range(1, len(ids)):
        assert abs(lps[i] - ref[i - 1, ids[i]].item()) < 1e-5

    new = hf_oracle.greedy_generate(hf_model, ids, 6)
    assert len(new) == 6
    # Each greedy token is the argmax of the prefix's log-probs, seen through prompt_logprobs.
    lps2 = hf_oracle.prompt_logprobs(hf_model, ids + new)
    full = torch.log_softmax(hf_oracle.full_logits(hf_model, ids + new), -1)
    for i, t in enumerate(new):
        pos = len(ids) + i
        assert t == int(full[pos - 1].argmax())
        assert abs(lps2[pos] - full[pos - 1].max().item()) < 1e-5


def test_greedy_not_degenerate(hf_model, tokenizer):
    prompts = ["The quick brown fox", "Once upon a time", "Question: What is the capital of France? Answer:",
               "def add(a, b):"]
    n_special = len(mtm.SPECIAL_TOKENS)
    varied = 0
    for p in prompts:
        out = hf_oracle.greedy_generate(hf_model, tokenizer(p)["input_ids"], 16)
        assert len(out) == 16
        # Special tokens and vocab padding have zero lm_head rows: never greedily chosen.
        assert all(n_special <= t < len(tokenizer) for t in out), out
        varied += len(set(out)) >= 4
    assert varied >= 3


# ----------------------------------------------------------------------------- determinism / options


def test_same_seed_identical_bytes_and_seed_changes_weights(tiny, tmp_path):
    import subprocess

    # Rebuild through the CLI in a fresh process (also checks cross-process determinism).
    again = tmp_path / "again"
    proc = subprocess.run([sys.executable, str(EVAL_DIR / "make_tiny_model.py"), str(again), "--seed", "0"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert str(again) in proc.stdout and "index_topk=64" in proc.stdout
    for name in ["model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "generation_config.json"]:
        assert (again / name).read_bytes() == (tiny / name).read_bytes(), name

    other = mtm.build_tiny_model(tmp_path / "seed1", seed=1)
    assert (other / "model.safetensors").read_bytes() != (tiny / "model.safetensors").read_bytes()
    a, b = load_file(str(tiny / "model.safetensors")), load_file(str(other / "model.safetensors"))
    assert a.keys() == b.keys()
    assert not torch.equal(a["model.embed_tokens.weight"], b["model.embed_tokens.weight"])
    assert not torch.equal(a["model.layers.1.mlp.experts.3.up_proj.weight"], b["model.layers.1.mlp.experts.3.up_proj.weight"])


def test_main_weights_independent_of_topk_and_mtp(tiny, tiny_no_mtp, tmp_path):
    dense = mtm.build_tiny_model(tmp_path / "k4096", index_topk=4096)
    a, d, z = (load_file(str(p / "model.safetensors")) for p in (tiny, dense, tiny_no_mtp))
    assert a.keys() == d.keys()
    assert all(torch.equal(a[k], d[k]) for k in a)
    assert all(torch.equal(a[k], z[k]) for k in z)
    assert json.loads((dense / "config.json").read_text())["index_topk"] == 4096


def test_num_layers_option(tmp_path):
    m4 = mtm.build_tiny_model(tmp_path / "l4", num_layers=4, num_nextn_predict_layers=2)
    keys = _keys(m4)
    assert "model.layers.3.mlp.gate.weight" in keys
    assert "model.layers.4.eh_proj.weight" in keys and "model.layers.5.eh_proj.weight" in keys
    assert not any(k.startswith("model.layers.6.") for k in keys)
    assert json.loads((m4 / "config.json").read_text())["num_hidden_layers"] == 4
    with pytest.raises(ValueError):
        mtm.build_tiny_model(tmp_path / "l1", num_layers=1)


def test_drop_tensor_cli(tmp_path, capsys):
    drop = ["model.layers.1.self_attn.indexer.wk.weight", "lm_head.weight"]
    out = tmp_path / "dropped"
    mtm.main([str(out), "--drop-tensor", drop[0], "--drop-tensor", drop[1]])
    line = capsys.readouterr().out.strip()
    assert str(out) in line and "index_topk=64" in line and "layers=2" in line
    keys = _keys(out)
    assert not (set(drop) & keys)
    full = mtm.tensor_specs(json.loads((out / "config.json").read_text()))
    assert keys == {n for n, *_ in full} - set(drop)
    with pytest.raises(KeyError):
        mtm.build_tiny_model(tmp_path / "bad", drop_tensor=["no.such.tensor"])
    # The oracle refuses an incomplete checkpoint instead of random-initialising the hole.
    with pytest.raises(RuntimeError, match="indexer.wk.weight"):
        hf_oracle.load_hf_model(out)


# ----------------------------------------------------------------------------- tokenizer


def test_tokenizer_roundtrip_and_chat_template(tiny, tokenizer):
    cfg = json.loads((tiny / "config.json").read_text())
    gen = json.loads((tiny / "generation_config.json").read_text())
    assert 1000 <= len(tokenizer) <= 2000
    assert len(tokenizer) <= cfg["vocab_size"] < len(tokenizer) + 64
    assert tokenizer.bos_token == mtm.BOS_TOKEN and tokenizer.bos_token_id == cfg["bos_token_id"] == gen["bos_token_id"]
    assert tokenizer.eos_token == mtm.EOS_TOKEN and tokenizer.eos_token_id == cfg["eos_token_id"] == gen["eos_token_id"]
    assert tokenizer.pad_token_id is not None and tokenizer.pad_token_id not in (0, 1)
    assert tokenizer.model_max_length == 8192

    texts = ["Hello world!", "  leading and trailing spaces  ", "tabs\tand\nnewlines\r\n",
             "Ünïcödé — ελληνικά, 日本語テキスト, 한국어, emoji 🎉🦊👩‍👩‍👧", "\x00\x01\x7f odd controls",
             "".join(chr(c) for c in range(0x20, 0x2FF))]
    g = torch.Generator().manual_seed(0)
    for _ in range(5):  # random code points across the BMP and beyond (no surrogates)
        cps = torch.randint(1, 0x2FFFF, (40,), generator=g).tolist()
        texts.append("".join(chr(c) for c in cps if not 0xD800 <= c <= 0xDFFF))
    for t in texts:
        ids = tokenizer(t, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == t
    ids = tokenizer("Hello")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1

    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    text = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert text == f"{mtm.BOS_TOKEN}{mtm.USER_TOKEN}What is the capital of France?{mtm.ASSISTANT_TOKEN}"
    chat_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    user_id, asst_id = (tokenizer.convert_tokens_to_ids(t) for t in (mtm.USER_TOKEN, mtm.ASSISTANT_TOKEN))
    assert chat_ids[0] == 0 and chat_ids[1] == user_id and chat_ids[-1] == asst_id
    multi = msgs + [{"role": "assistant", "content": "Paris."}, {"role": "user", "content": "Thanks"}]
    text2 = tokenizer.apply_chat_template(multi, add_generation_prompt=False, tokenize=False)
    assert text2.count(mtm.EOS_TOKEN) == 1 and text2.endswith(f"{mtm.USER_TOKEN}Thanks")


# ----------------------------------------------------------------------------- oracle CLI


def test_oracle_cli(tiny, capsys):
    hf_oracle.main([str(tiny), "--prompt", "Once upon a time", "--max-new-tokens", "5", "--json"])
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["prompt_ids"][0] == 0 and len(res["generated_ids"]) == 5
    assert isinstance(res["generated_text"], str) and res["generated_text"]
