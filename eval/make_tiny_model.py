#!/usr/bin/env python
"""Build a tiny random-weight DeepSeek-V3.2 checkpoint (Hugging Face format).

The checkpoint uses the real DeepSeek-V3.2 tensor names and the real per-token
cache geometry (``kv_lora_rank`` 512, ``qk_rope_head_dim`` 64,
``index_head_dim`` 128), with everything else shrunk so that it loads and runs
on CPU in seconds, both in HF transformers (``deepseek_v32``) and in vLLM.

Usage::

    python eval/make_tiny_model.py OUT_DIR [--seed S] [--num-layers L]
        [--index-topk K] [--num-nextn-predict-layers M]
        [--drop-tensor NAME ...] [--dtype float32|bfloat16]
        [--real-dims] [--device cpu|cuda]
        [--preset default|release] [--num-experts E] [--indexer-wk-bf16]
    python eval/make_tiny_model.py OUT_DIR --dequantize-from SRC [--device cpu|cuda]

``--preset release`` writes the official release's format (fp8 128x128 block
weights + ``weight_scale_inv``, grouped routing, YaRN at real dims; see
``release_checkpoint.py``); ``--dequantize-from SRC`` writes SRC's weights
dequantized to bf16 without ``quantization_config`` (the accuracy reference).

Importable: ``build_tiny_model(out_dir, **options) -> Path``.

``--real-dims`` keeps the tokenizer but gives every layer DeepSeek-V3.2's real
per-token dimensions (hidden 7168, 128 heads, q_lora 1536, indexer 64x128,
top-k 2048, 163840 positions; 16 experts of 2048 with 8 active + 1 shared, so a
token costs the real MoE FLOPs), 3 layers and bf16 by default: about 7 GB,
written as safetensors shards, for measuring vLLM's own paths against the
plugin on GPUs. ``--device cuda`` draws the random weights on the GPU
(deterministic per seed and device, not byte-equal to the CPU draw).

Weights are deterministic: every tensor is drawn from its own
``torch.Generator`` seeded from ``(seed, tensor name)``, so the same seed gives
byte-identical files, and the main-model weights do not depend on
``index_topk`` or on the number of MTP layers (handy for sparse-vs-dense and
with/without-MTP comparisons). The tokenizer is a byte-level BPE trained in
code on a fixed corpus (no downloads) and is independent of the seed.
"""

from __future__ import annotations

import argparse
import json
import random
import time
import zlib
from pathlib import Path

import torch

import release_checkpoint

BOS_TOKEN = "<｜begin▁of▁sentence｜>"
EOS_TOKEN = "<｜end▁of▁sentence｜>"
PAD_TOKEN = "<｜▁pad▁｜>"
USER_TOKEN = "<｜User｜>"
ASSISTANT_TOKEN = "<｜Assistant｜>"
# Order fixes the ids: BOS=0, EOS=1 (as in DeepSeek), PAD=2, User=3, Assistant=4.
SPECIAL_TOKENS = [BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, USER_TOKEN, ASSISTANT_TOKEN]

TOKENIZER_VOCAB_TARGET = 1500
VOCAB_MULTIPLE = 64
MODEL_MAX_LENGTH = 8192
# DeepSeek-V3.2's max_position_embeddings; the --real-dims tokenizer allows it too
# (vLLM caps max_model_len at the tokenizer's model_max_length).
REAL_MAX_POSITIONS = 163840
# Checkpoints larger than this are split into shards with an index file.
SHARD_BYTES = 4 << 30

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}{{ message['content'] }}"
    "{%- elif message['role'] == 'user' %}" + USER_TOKEN + "{{ message['content'] }}"
    "{%- elif message['role'] == 'assistant' %}" + ASSISTANT_TOKEN
    + "{{ message['content'] }}{{ eos_token }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}" + ASSISTANT_TOKEN + "{%- endif %}"
)

DEFAULTS = dict(
    seed=0,
    num_layers=2,
    index_topk=64,
    num_nextn_predict_layers=1,
    drop_tensor=(),
    dtype="float32",
)
# --real-dims: the defaults that differ, and the config fields that replace the tiny ones.
REAL_DIMS_DEFAULTS = dict(num_layers=3, index_topk=2048, dtype="bfloat16")
REAL_DIMS_CONFIG = {
    "hidden_size": 7168,
    "intermediate_size": 18432,
    "moe_intermediate_size": 2048,
    "num_attention_heads": 128,
    "num_key_value_heads": 128,
    "q_lora_rank": 1536,
    "qk_nope_head_dim": 128,
    "v_head_dim": 128,
    "index_n_heads": 64,
    # 8 routed experts per token as in V3.2 (out of 16, 4 groups, best 2 groups).
    "n_routed_experts": 16,
    "num_experts_per_tok": 8,
    "n_group": 4,
    "topk_group": 2,
    "max_position_embeddings": REAL_MAX_POSITIONS,
}

# --------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------

_CORPUS_PARAGRAPHS = """
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.
Once upon a time there was a small village at the edge of a great forest. The people of the village were
farmers and weavers, and every morning they walked to the fields while the sun rose over the hills.
In the evening they gathered around the fire to tell stories about dragons, kings, and clever children.
Attention is a mechanism that lets a model look back at earlier tokens in a sequence. Sparse attention
selects only the most relevant tokens, which saves memory and time when the context is very long.
A lightning indexer scores every previous token and keeps the top k of them for each query.
Context parallelism splits a long sequence across several devices so that each device stores only a
part of the key value cache. The devices exchange partial results and combine them with a log sum exp.
Water boils at one hundred degrees Celsius at sea level. Ice melts when the temperature rises above zero.
The moon orbits the earth, and the earth orbits the sun. There are eight planets in the solar system.
Mercury is the closest planet to the sun, and Neptune is the farthest. Jupiter is the largest planet.
She opened the window and listened to the rain. He wrote a letter to his brother who lived in the city.
They bought bread, cheese, apples, and milk at the market on Saturday morning before the shops closed.
Numbers can be written as digits: 0 1 2 3 4 5 6 7 8 9 10 11 12 42 100 256 1024 2048 4096 65536.
Mathematics studies patterns, structures, and change. Two plus two equals four. Seven times eight is 56.
Computers store information as bits. A byte has eight bits. Programs are written in languages such as
Python, C, Rust, and Go. A function takes arguments and returns a value. Errors should never pass silently.
def add(a, b):
    return a + b
for i in range(10):
    print(i * i)
if x > 0 and y < 0: result = {"key": [1, 2, 3], "value": None}
The history of science is full of surprises. Many discoveries happened by accident, when a careful
observer noticed something strange and asked why. Good questions are often more valuable than answers.
Music has rhythm, melody, and harmony. The piano, the violin, and the guitar are popular instruments.
Children learn languages quickly by listening, repeating, and playing games with their friends.
The library was quiet except for the sound of turning pages. An old clock ticked slowly on the wall.
Doctors recommend drinking water, sleeping well, eating vegetables, and walking every day.
Weather forecast: cloudy in the morning, sunny in the afternoon, with a light wind from the west.
The river flows from the mountains to the sea, carrying sand and stones along its long winding path.
Birds build nests in spring. Bees collect nectar from flowers and make honey in their hives.
Trains leave the station every fifteen minutes. Please keep your ticket until the end of the trip.
What is your name? Where do you live? How old are you? Why is the sky blue? When will we arrive?
Yes, no, maybe, always, never, sometimes, often, rarely, usually, today, tomorrow, yesterday.
Hello! Thank you very much. You are welcome. Good morning, good afternoon, good evening, good night.
Question: What is the capital of France? Answer: The capital of France is Paris.
Question: How many days are in a week? Answer: There are seven days in a week.
User: Can you help me write a short poem? Assistant: Of course! Here is a short poem about the sea.
The engineer measured the latency and throughput of the server under heavy load and wrote a report.
Memory bandwidth, cache size, and clock speed all influence the performance of modern processors.
A matrix multiplication combines rows and columns. A vector has a length and a direction.
Red, orange, yellow, green, blue, indigo, and violet are the colors of the rainbow.
January, February, March, April, May, June, July, August, September, October, November, December.
Monday, Tuesday, Wednesday, Thursday, Friday, Saturday, Sunday.
Café, naïve, résumé, jalapeño, Zürich, São Paulo, Kraków, Ελληνικά, Русский, 日本語, 中文, 한국어, 🙂.
"""

_WORDS = """
time person year way day thing man world life hand part child eye woman place work week case point
government company number group problem fact be have do say get make go know take see come think look
want give use find tell ask seem feel try leave call good new first last long great little own other old
right big high different small large next early young important few public bad same able to of in for on
with at by from up about into over after beneath under above the and a that I it not he as you this but
his they her she or an will my one all would there their what so out if who which go me when can like
just him people your some could them see other than then now only its also back after two how our well
even because any these give day most us house garden kitchen window door table chair book paper pen
river mountain ocean island desert valley forest city village road bridge tower castle market school
teacher student doctor nurse farmer baker painter writer singer driver pilot sailor soldier scientist
apple banana cherry grape lemon mango orange peach pear plum potato tomato carrot onion garlic pepper
dog cat horse cow sheep goat pig chicken duck rabbit mouse lion tiger bear wolf fox deer eagle owl whale
red green blue yellow black white brown purple pink gray silver golden bright dark warm cold soft hard
quickly slowly carefully quietly loudly happily sadly gently suddenly finally almost already again
run walk jump swim fly climb read write sing dance play build break open close begin finish carry hold
model token layer attention sparse dense index cache memory device kernel tensor vector matrix batch
sequence context parallel prefill decode sample greedy logits probability gradient weight bias norm
""".split()


def _corpus_lines() -> list[str]:
    lines = [ln for ln in _CORPUS_PARAGRAPHS.strip("\n").split("\n")]
    rng = random.Random(1234)  # fixed: the tokenizer does not depend on --seed
    for _ in range(600):
        n = rng.randint(4, 14)
        words = [rng.choice(_WORDS) for _ in range(n)]
        sent = " ".join(words)
        lines.append(sent[0].upper() + sent[1:] + rng.choice([".", "!", "?", ",", ";", ":"]))
    return lines


def build_tokenizer():
    """Train the byte-level BPE tokenizer (deterministic, offline)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_TARGET,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus_lines(), trainer=trainer)
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(t) == i, (t, tok.token_to_id(t))
    # Prepend BOS like DeepSeek's tokenizer (add_bos_token=True).
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B:1",
        special_tokens=[(BOS_TOKEN, 0)],
    )
    return tok


def _write_tokenizer_files(out: Path, tok, model_max_length: int = MODEL_MAX_LENGTH) -> int:
    tok.save(str(out / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "unk_token": None,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "chat_template": CHAT_TEMPLATE,
    }
    special_tokens_map = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN}
    _write_json(out / "tokenizer_config.json", tokenizer_config)
    _write_json(out / "special_tokens_map.json", special_tokens_map)
    return tok.get_vocab_size(with_added_tokens=True)


# --------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------


# DeepSeek-V3.2's YaRN factor; the tiny model's original context (the release's: 4096).
YARN_FACTOR = 40
TINY_ROPE_ORIGINAL_POSITIONS = 64


def make_config(
    vocab_size: int,
    num_layers: int = 2,
    index_topk: int = 64,
    num_nextn_predict_layers: int = 1,
    dtype: str = "float32",
    real_dims: bool = False,
) -> dict:
    cfg = {
        "architectures": ["DeepseekV32ForCausalLM"],
        "model_type": "deepseek_v32",
        "vocab_size": vocab_size,
        "hidden_size": 256,
        "intermediate_size": 256,
        "moe_intermediate_size": 64,
        "num_hidden_layers": num_layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "q_lora_rank": 64,
        "kv_lora_rank": 512,
        "qk_nope_head_dim": 32,
        "qk_rope_head_dim": 64,
        "v_head_dim": 32,
        "index_n_heads": 16,
        "index_head_dim": 128,
        "index_topk": index_topk,
        "first_k_dense_replace": 1,
        "moe_layer_freq": 1,
        "n_routed_experts": 8,
        "num_experts_per_tok": 2,
        "n_shared_experts": 1,
        "n_group": 2,
        "topk_group": 1,
        "scoring_func": "sigmoid",
        "topk_method": "noaux_tc",
        "norm_topk_prob": True,
        "routed_scaling_factor": 2.5,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        # DeepSeek-V3.2's YaRN with original_max_position_embeddings scaled down from
        # 4096 to TINY_ROPE_ORIGINAL_POSITIONS, so CPU prompts of a few hundred tokens
        # reach the extrapolated positions. max_position_embeddings = factor x original,
        # as in the release: vLLM's DeepSeek YaRN caches exactly that many positions.
        "max_position_embeddings": YARN_FACTOR * TINY_ROPE_ORIGINAL_POSITIONS,
        # transformers>=5 native form; vLLM 0.32 reads rope_parameters["rope_type"].
        "rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": YARN_FACTOR,
                            "original_max_position_embeddings": TINY_ROPE_ORIGINAL_POSITIONS,
                            "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "num_nextn_predict_layers": num_nextn_predict_layers,
        "initializer_range": 0.02,
        "use_cache": True,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "dtype": dtype,
        "torch_dtype": dtype,
    }
    if real_dims:
        cfg.update(REAL_DIMS_CONFIG)
        # the release's rope: 4096 x 40 = REAL_MAX_POSITIONS
        cfg["rope_parameters"]["original_max_position_embeddings"] = REAL_MAX_POSITIONS // YARN_FACTOR
    return cfg



# --------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------


def _layer_specs(cfg: dict, prefix: str, moe: bool) -> list[tuple[str, tuple, str, float]]:
    """(name, shape, kind, scale) for one decoder layer (attention + indexer + mlp)."""
    H = cfg["hidden_size"]
    nh = cfg["num_attention_heads"]
    qk_head = cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"]
    kv_lora = cfg["kv_lora_rank"]
    q_lora = cfg["q_lora_rank"]
    ih, idim = cfg["index_n_heads"], cfg["index_head_dim"]
    s: list[tuple[str, tuple, str, float]] = []
    a = prefix + "self_attn."
    s += [
        (prefix + "input_layernorm.weight", (H,), "norm", 0.1),
        (a + "q_a_proj.weight", (q_lora, H), "linear", 1.0),
        (a + "q_a_layernorm.weight", (q_lora,), "norm", 0.1),
        (a + "q_b_proj.weight", (nh * qk_head, q_lora), "linear", 1.0),
        (a + "kv_a_proj_with_mqa.weight", (kv_lora + cfg["qk_rope_head_dim"], H), "linear", 1.0),
        (a + "kv_a_layernorm.weight", (kv_lora,), "norm", 0.1),
        (a + "kv_b_proj.weight", (nh * (cfg["qk_nope_head_dim"] + cfg["v_head_dim"]), kv_lora), "linear", 1.0),
        (a + "o_proj.weight", (H, nh * cfg["v_head_dim"]), "linear", 1.0),
        (a + "indexer.wq_b.weight", (ih * idim, q_lora), "linear", 1.0),
        (a + "indexer.wk.weight", (idim, H), "linear", 1.0),
        (a + "indexer.k_norm.weight", (idim,), "norm", 0.1),
        (a + "indexer.k_norm.bias", (idim,), "normal", 0.1),
        (a + "indexer.weights_proj.weight", (ih, H), "linear", 1.0),
        (prefix + "post_attention_layernorm.weight", (H,), "norm", 0.1),
    ]
    m = prefix + "mlp."
    if not moe:
        inter = cfg["intermediate_size"]
        s += [
            (m + "gate_proj.weight", (inter, H), "linear", 1.0),
            (m + "up_proj.weight", (inter, H), "linear", 1.0),
            (m + "down_proj.weight", (H, inter), "linear", 1.0),
        ]
    else:
        E, inter = cfg["n_routed_experts"], cfg["moe_intermediate_size"]
        s += [
            (m + "gate.weight", (E, H), "linear", 1.0),
            (m + "gate.e_score_correction_bias", (E,), "normal_fp32", 0.05),
        ]
        for e in range(E):
            p = f"{m}experts.{e}."
            s += [
                (p + "gate_proj.weight", (inter, H), "linear", 1.0),
                (p + "up_proj.weight", (inter, H), "linear", 1.0),
                (p + "down_proj.weight", (H, inter), "linear", 1.0),
            ]
        sh = inter * cfg["n_shared_experts"]
        s += [
            (m + "shared_experts.gate_proj.weight", (sh, H), "linear", 1.0),
            (m + "shared_experts.up_proj.weight", (sh, H), "linear", 1.0),
            (m + "shared_experts.down_proj.weight", (H, sh), "linear", 1.0),
        ]
    return s


LM_HEAD_GAIN = 4.0


def tensor_specs(cfg: dict) -> list[tuple[str, tuple, str, float]]:
    """All checkpoint tensors in file-generation order: (name, shape, kind, scale)."""
    V, H = cfg["vocab_size"], cfg["hidden_size"]
    L = cfg["num_hidden_layers"]
    specs: list[tuple[str, tuple, str, float]] = [("model.embed_tokens.weight", (V, H), "normal", 1.0)]
    for i in range(L):
        specs += _layer_specs(cfg, f"model.layers.{i}.", moe=i >= cfg["first_k_dense_replace"])
    specs += [
        ("model.norm.weight", (H,), "norm", 0.1),
        ("lm_head.weight", (V, H), "linear", LM_HEAD_GAIN),
    ]
    for j in range(cfg["num_nextn_predict_layers"]):
        p = f"model.layers.{L + j}."
        specs += [
            # DeepSeek-V3 checkpoints carry copies of the shared embedding / head per MTP layer.
            (p + "embed_tokens.weight", (V, H), "copy:model.embed_tokens.weight", 0.0),
            (p + "enorm.weight", (H,), "norm", 0.1),
            (p + "hnorm.weight", (H,), "norm", 0.1),
            (p + "eh_proj.weight", (H, 2 * H), "linear", 1.0),
            (p + "shared_head.norm.weight", (H,), "norm", 0.1),
            (p + "shared_head.head.weight", (V, H), "copy:lm_head.weight", 0.0),
        ]
        specs += _layer_specs(cfg, p, moe=True)
    return specs


def _generator(seed: int, name: str, device: str = "cpu") -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed((zlib.crc32(f"{seed}:{name}".encode()) + (seed << 32)) & 0xFFFF_FFFF_FFFF_FFFF)
    return g


def iter_weights(cfg: dict, seed: int, dtype: torch.dtype, zero_logit_rows=(), device: str = "cpu"):
    """Random weights as (name, tensor) in file order, one tensor at a time, so a multi-GB
    checkpoint never sits in memory whole; tensors stay on ``device``. ``lm_head`` rows
    in ``zero_logit_rows`` are zeroed (logit exactly 0)."""
    copy_sources = {kind[5:] for _, _, kind, _ in tensor_specs(cfg) if kind.startswith("copy:")}
    kept: dict[str, torch.Tensor] = {}
    for name, shape, kind, scale in tensor_specs(cfg):
        if kind.startswith("copy:"):
            yield name, kept[kind[5:]].clone()
            continue
        g = _generator(seed, name, device)
        t = torch.randn(shape, generator=g, dtype=torch.float32, device=device)
        if kind == "linear":  # unit-variance outputs for unit-variance inputs, times a gain
            t = t * (scale / shape[1] ** 0.5)
        elif kind == "norm":  # weights around 1
            t = 1.0 + scale * t
        elif kind in ("normal", "normal_fp32"):
            t = scale * t
        else:
            raise ValueError(kind)
        if name == "lm_head.weight" and len(zero_logit_rows):
            t[torch.as_tensor(list(zero_logit_rows), dtype=torch.long, device=t.device)] = 0.0
        # DeepSeek keeps e_score_correction_bias in fp32 (HF: _keep_in_fp32_modules_strict).
        t = t.contiguous() if kind == "normal_fp32" else t.to(dtype).contiguous()
        if name in copy_sources:
            kept[name] = t
        yield name, t


def _mtp_friendly(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """See ``build_tiny_model(mtp_friendly=True)``."""
    if name.endswith(("o_proj.weight", "down_proj.weight")):
        return (tensor.float() * 0.1).to(tensor.dtype)
    if name.endswith("eh_proj.weight"):
        hidden = tensor.shape[0]
        eh = torch.zeros_like(tensor)
        eh[:, :hidden] = torch.eye(hidden, dtype=tensor.dtype, device=tensor.device)
        return eh
    return tensor


def _shard_plan(cfg: dict, dtype: torch.dtype, names: set[str]) -> tuple[dict[str, int], int]:
    """Shard index per tensor (file order, at most SHARD_BYTES a shard) and the shard count."""
    plan, shard, shard_bytes = {}, 0, 0
    for name, shape, kind, _ in tensor_specs(cfg):
        if name not in names:
            continue
        numel = 1
        for d in shape:
            numel *= d
        nbytes = numel * (4 if kind == "normal_fp32" else dtype.itemsize)
        if shard_bytes and shard_bytes + nbytes > SHARD_BYTES:
            shard, shard_bytes = shard + 1, 0
        plan[name] = shard
        shard_bytes += nbytes
    return plan, shard + 1


def _save_checkpoint(out: Path, named_tensors, plan: dict[str, int], num_shards: int) -> tuple[int, int]:
    """Write ``model.safetensors`` (one shard) or numbered shards plus the index
    (written last: its presence means the checkpoint is complete).
    Returns (parameters, tensors) written."""
    from safetensors.torch import save_file

    def file_name(shard: int) -> str:
        return "model.safetensors" if num_shards == 1 else f"model-{shard + 1:05d}-of-{num_shards:05d}.safetensors"

    def flush(shard: int, tensors: dict) -> None:
        save_file(tensors, str(out / file_name(shard)), metadata={"format": "pt"})
        (out / file_name(shard)).chmod(0o644)

    n_params = n_tensors = total_bytes = 0
    current, tensors = 0, {}
    for name, t in named_tensors:
        if plan[name] != current:
            flush(current, tensors)
            current, tensors = plan[name], {}
        tensors[name] = t.cpu()
        n_params += t.numel()
        n_tensors += 1
        total_bytes += t.numel() * t.element_size()
    flush(current, tensors)
    if num_shards > 1:
        _write_json(out / "model.safetensors.index.json", {
            "metadata": {"total_size": total_bytes},
            "weight_map": {name: file_name(shard) for name, shard in plan.items()},
        })
    return n_params, n_tensors


# --------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=False) + "\n", encoding="utf-8")


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def build_tiny_model(
    out_dir,
    *,
    seed: int = 0,
    num_layers: int | None = None,
    index_topk: int | None = None,
    num_nextn_predict_layers: int = 1,
    drop_tensor=(),
    dtype: str | None = None,
    mtp_friendly: bool = False,
    real_dims: bool = False,
    device: str = "cpu",
    verbose: bool = False,
    preset: str = "default",
    num_experts: int | None = None,
    indexer_wk_fp8: bool = True,
) -> Path:
    """Write the tiny DeepSeek-V3.2 checkpoint to ``out_dir`` and return its path.

    ``num_layers``, ``index_topk`` and ``dtype`` default to 2, 64, float32 (tiny)
    or 3, 2048, bfloat16 (``real_dims``: DeepSeek-V3.2's per-token dimensions).

    ``mtp_friendly``: shrink every layer's output projections (attention o_proj,
    MLP / expert down projections) by 10x so the next token depends mostly on the
    current one, and make the MTP layer's eh_proj pass the next token's embedding
    through: the random draft then agrees with the target often, so speculative
    decoding tests exercise accepted and rejected drafts.

    ``device``: where the random weights are drawn (``cuda`` draws a real-dims
    checkpoint in seconds, leaving the 7 GB write); the CPU draw is the one the
    tests pin byte for byte.

    ``preset="release"``: the official release's format (``release_checkpoint.py``),
    bfloat16 by default, ``num_experts`` routed experts (default 32),
    ``indexer_wk_fp8`` whether the indexer's ``wk`` is fp8 with a scale.
    """
    if preset not in ("default", "release"):
        raise ValueError(f"preset must be 'default' or 'release', got {preset!r}")
    release = preset == "release"
    if num_experts is not None and not release:
        raise ValueError("num_experts is a --preset release option")
    defaults = {**DEFAULTS, **(REAL_DIMS_DEFAULTS if real_dims else {})}
    num_layers = defaults["num_layers"] if num_layers is None else num_layers
    index_topk = defaults["index_topk"] if index_topk is None else index_topk
    dtype = ("bfloat16" if release else defaults["dtype"]) if dtype is None else dtype
    max_layers = 8 if real_dims else 4
    if not 2 <= num_layers <= max_layers:
        raise ValueError(f"num_layers must be in 2..{max_layers}, got {num_layers}")
    if num_nextn_predict_layers < 0:
        raise ValueError("num_nextn_predict_layers must be >= 0")
    if index_topk < 1:
        raise ValueError("index_topk must be >= 1")
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {list(_DTYPES)}")

    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tok = build_tokenizer()
    tok_size = _write_tokenizer_files(out, tok, REAL_MAX_POSITIONS if real_dims else MODEL_MAX_LENGTH)
    vocab_size = _round_up(tok_size, VOCAB_MULTIPLE)

    cfg = make_config(vocab_size, num_layers, index_topk, num_nextn_predict_layers, dtype, real_dims)
    if release:
        cfg = release_checkpoint.release_config(cfg, real_dims=real_dims, num_experts=num_experts)
    _write_json(out / "config.json", cfg)
    _write_json(
        out / "generation_config.json",
        # Deliberately no sampling defaults (vLLM applies generation_config defaults).
        {"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2},
    )

    drop = set(drop_tensor or ())
    all_names = [name for name, *_ in tensor_specs(cfg)]
    if release:
        all_names = release_checkpoint.tensor_names(all_names, indexer_wk_fp8)
    unknown = [n for n in drop_tensor or () if n not in all_names]
    if unknown:
        raise KeyError(f"--drop-tensor names not in checkpoint: {unknown}")
    if release:
        plan, num_shards = release_checkpoint.shard_plan(tensor_specs(cfg), _DTYPES[dtype], set(all_names) - drop,
                                                         SHARD_BYTES, indexer_wk_fp8)
    else:
        plan, num_shards = _shard_plan(cfg, _DTYPES[dtype], set(all_names) - drop)

    # Special tokens and vocab padding get an all-zero lm_head row: their logit is
    # exactly 0 while real tokens reach ~+10, so greedy decoding never emits
    # EOS/BOS/PAD/chat markers or ids the tokenizer cannot decode (generation
    # always runs to max_tokens).
    zero_rows = list(range(len(SPECIAL_TOKENS))) + list(range(tok_size, vocab_size))
    weights = iter_weights(cfg, seed, _DTYPES[dtype], zero_logit_rows=zero_rows, device=device)
    weights = ((name, _mtp_friendly(name, t) if mtp_friendly else t) for name, t in weights)
    if release:
        weights = release_checkpoint.quantize_weights(weights, indexer_wk_fp8)
    n_params, n_tensors = _save_checkpoint(
        out,
        ((name, t) for name, t in weights if name not in drop),
        plan,
        num_shards,
    )

    dt = time.perf_counter() - t0
    if verbose:
        print(
            f"{'real-dims' if real_dims else 'tiny'} DeepSeek-V3.2 ({preset}) -> {out} | params={n_params:,} "
            f"tensors={n_tensors} shards={num_shards} "
            f"| layers={num_layers} mtp={num_nextn_predict_layers} index_topk={index_topk} "
            f"| vocab={vocab_size} (tokenizer {tok_size}) dtype={dtype} seed={seed} device={device} | {dt:.2f}s"
        )
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out_dir")
    ap.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    ap.add_argument("--num-layers", type=int, default=None,
                    help="2..4 (tiny, default 2) or 2..8 (--real-dims, default 3)")
    ap.add_argument("--index-topk", type=int, default=None, help="default 64 (tiny) or 2048 (--real-dims)")
    ap.add_argument("--num-nextn-predict-layers", type=int, default=DEFAULTS["num_nextn_predict_layers"])
    ap.add_argument("--drop-tensor", action="extend", nargs="+", default=[], metavar="NAME",
                    help="omit these exact tensor names (space-separated and/or repeated flag)")
    ap.add_argument("--dtype", choices=list(_DTYPES), default=None,
                    help="default float32 (tiny) or bfloat16 (--real-dims)")
    ap.add_argument("--mtp-friendly", action="store_true",
                    help="weak layer outputs + pass-through eh_proj: the MTP draft is often accepted")
    ap.add_argument("--real-dims", action="store_true",
                    help="DeepSeek-V3.2's real per-token dimensions (about 7 GB at 3 layers, bf16)")
    ap.add_argument("--device", default="cpu", help="where to draw (or dequantize) the weights (cpu, cuda)")
    ap.add_argument("--preset", choices=["default", "release"], default="default",
                    help="release: the official release's format (fp8 block weights + scales, grouped routing)")
    ap.add_argument("--num-experts", type=int, default=None,
                    help="--preset release: routed experts, a multiple of 8, at least 16 (default 32)")
    ap.add_argument("--indexer-wk-bf16", action="store_true",
                    help="--preset release: keep the indexer's wk in bf16 (default: fp8 + scale)")
    ap.add_argument("--dequantize-from", metavar="SRC", default=None,
                    help="write SRC (a --preset release checkpoint) dequantized to bf16, no quantization_config")
    a = ap.parse_args(argv)
    if a.dequantize_from:
        release_checkpoint.dequantize_checkpoint(a.dequantize_from, a.out_dir, device=a.device)
        print(f"{a.dequantize_from} dequantized to bf16 -> {a.out_dir}")
        return
    build_tiny_model(
        a.out_dir,
        seed=a.seed,
        num_layers=a.num_layers,
        index_topk=a.index_topk,
        num_nextn_predict_layers=a.num_nextn_predict_layers,
        drop_tensor=a.drop_tensor,
        dtype=a.dtype,
        mtp_friendly=a.mtp_friendly,
        real_dims=a.real_dims,
        device=a.device,
        verbose=True,
        preset=a.preset,
        num_experts=a.num_experts,
        indexer_wk_fp8=not a.indexer_wk_bf16,
    )


if __name__ == "__main__":
    main()
