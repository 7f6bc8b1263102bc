#!/usr/bin/env python
"""vLLM-free reference ("oracle") for DeepSeek-V3.2 checkpoints using HF transformers.

Everything runs on CPU with eager attention and **without any KV cache**: every
call is one full causal forward over the whole sequence, so the oracle does not
depend on HF's DSA cache path (``DynamicIndexedLayer`` / ``update_indexer``).

HF's eager DSA path (transformers 5.19, ``modeling_deepseek_v32.py``): the
indexer scores keys with the *causal* mask already added, then keeps
``min(index_topk, num_keys)`` keys per query; those keys are unmasked on top of
the causal mask. So query position ``t`` attends to the ``min(index_topk, t+1)``
highest-scoring keys among positions ``0..t`` (itself included); sparsity only
kicks in for ``t >= index_topk``.

HF's rope equals vLLM's own V3.2's (which the plugin follows) for ``default`` and for
DeepSeek's YaRN; ``load_hf_model`` refuses a checkpoint whose rope the two would apply
differently (``rope_differences_from_vllm``), so a comparison never silently diverges.

Library use::

    from hf_oracle import load_hf_model, prompt_logprobs, greedy_generate
    model = load_hf_model("path/to/tiny")
    lps = prompt_logprobs(model, ids)           # [None, lp1, lp2, ...]
    new = greedy_generate(model, ids, 16)        # generated ids only

CLI::

    python eval/hf_oracle.py MODEL_DIR --prompt "text" --max-new-tokens N
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@contextlib.contextmanager
def _quiet_transformers():
    """Silence the load report (MTP tensors are UNEXPECTED for HF) while loading."""
    import transformers

    old = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(old)


def load_hf_model(model_dir, dtype: torch.dtype = torch.float32):
    """Load a DeepSeek-V3.2 checkpoint with HF transformers (CPU, eager attention, eval mode).

    MTP tensors (``model.layers.{num_hidden_layers}.*``) are ignored by HF.
    Uses the ``DeepseekV32*`` classes explicitly rather than ``AutoModel``: once
    vLLM's ``get_config`` has run in a process it re-registers
    ``AutoConfig["deepseek_v32"]`` to transformers' ``DeepseekV3Config`` (dense
    MLA, no indexer), which would silently turn the oracle dense.
    """
    from transformers.models.deepseek_v32 import DeepseekV32Config, DeepseekV32ForCausalLM

    with _quiet_transformers():
        config = DeepseekV32Config.from_pretrained(str(model_dir))
        model, info = DeepseekV32ForCausalLM.from_pretrained(
            str(model_dir), config=config, dtype=dtype, attn_implementation="eager", device_map=None,
            output_loading_info=True,
        )
    # HF would silently random-init missing tensors; the oracle must not.
    bad = {k: sorted(v) for k in ("missing_keys", "mismatched_keys") if (v := info.get(k))}
    if bad:
        raise RuntimeError(f"{model_dir}: checkpoint does not match DeepseekV32ForCausalLM: {bad}")
    if type(model) is not DeepseekV32ForCausalLM or config.model_type != "deepseek_v32":
        raise RuntimeError(f"expected DeepseekV32ForCausalLM, got {type(model).__name__}")
    differences = rope_differences_from_vllm(config.rope_parameters)
    if differences:
        raise RuntimeError(f"{model_dir}: HF's rope would not be vLLM's DeepSeek-V3.2 rope: {'; '.join(differences)}")
    model.eval()
    return model


def rope_differences_from_vllm(rope_parameters: dict) -> list[str]:
    """Where HF's deepseek_v32 rope departs from vLLM's own V3.2 (which the plugin follows).

    Both apply the same YaRN (cos/sin magnitude ``mscale(mscale) / mscale(mscale_all_dim)``,
    MLA softmax scale times ``mscale(mscale_all_dim) ** 2``, interleaved MLA rope, NeoX
    indexer rope) for ``default`` and for ``yarn`` as DeepSeek ships it. vLLM's V3.2 runs
    every other scaled rope type as DeepSeek YaRN, ignores ``truncate``, defaults
    ``mscale`` to 1 and ``mscale_all_dim`` to 0 where HF wants both or neither, and reads
    ``attention_factor`` 1.0 as "no softmax mscale" where HF scales cos/sin by it.
    """
    rope_type = rope_parameters.get("rope_type", "default")
    if rope_type == "default":
        return []
    out = []
    if rope_type != "yarn":
        out.append(f"rope_type '{rope_type}' (vLLM's V3.2 runs it as DeepSeek YaRN)")
    if "attention_factor" in rope_parameters:
        out.append("attention_factor set (HF scales cos/sin by it, vLLM's V3.2 maps 1.0 to "
                   "deepseek_llama_scaling and otherwise ignores it)")
    if rope_parameters.get("truncate", True) is not True:
        out.append("truncate false (vLLM's V3.2 always truncates the YaRN correction range)")
    factor, mscale, mscale_all_dim = (rope_parameters.get(k) for k in ("factor", "mscale", "mscale_all_dim"))
    if factor is None:
        return out + ["no factor (vLLM's V3.2 needs it)"]

    def get_mscale(m):
        return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0

    hf = get_mscale(mscale) / get_mscale(mscale_all_dim) if mscale and mscale_all_dim else get_mscale(1)
    vllm = get_mscale(1 if mscale is None else mscale) / get_mscale(0 if mscale_all_dim is None else mscale_all_dim)
    if not math.isclose(hf, vllm, rel_tol=1e-9):
        out.append(f"cos/sin magnitude {hf:.6g} in HF, {vllm:.6g} in vLLM's V3.2 "
                   f"(mscale {mscale}, mscale_all_dim {mscale_all_dim})")
    return out


def yarn_original_context(model_dir) -> int | None:
    """The checkpoint's YaRN ``original_max_position_embeddings`` (None without YaRN):
    a comparison tests the rope where positions run past it."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    is_yarn = rope.get("rope_type", rope.get("type")) == "yarn"
    return rope["original_max_position_embeddings"] if is_yarn else None


def load_tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


def _as_input(token_ids, model) -> torch.Tensor:
    ids = [int(t) for t in token_ids]
    if not ids:
        raise ValueError("token_ids must be non-empty")
    vocab = model.config.vocab_size
    if min(ids) < 0 or max(ids) >= vocab:
        raise ValueError(f"token id out of range [0, {vocab})")
    return torch.tensor([ids], dtype=torch.long, device=model.device)


@torch.inference_mode()
def full_logits(model, token_ids) -> torch.Tensor:
    """Logits ``[len(token_ids), vocab]`` (fp32) from one full causal forward, no KV cache."""
    x = _as_input(token_ids, model)
    out = model(input_ids=x, use_cache=False)
    return out.logits[0].float()


def prompt_logprobs(model, token_ids) -> list[float | None]:
    """Log-prob of each prompt token given its prefix; the first entry is ``None``.

    One full forward (no KV cache), log-softmax in fp32.
    """
    logits = full_logits(model, token_ids)
    lp = torch.log_softmax(logits[:-1], dim=-1)
    tgt = torch.tensor([int(t) for t in token_ids[1:]], dtype=torch.long)
    vals = lp.gather(-1, tgt[:, None])[:, 0].tolist() if len(token_ids) > 1 else []
    return [None] + [float(v) for v in vals]


def greedy_generate(model, token_ids, max_new_tokens: int, eos_token_id: int | None = None) -> list[int]:
    """Greedy decoding; returns only the generated ids.

    Each step recomputes a full forward over prompt + generated tokens WITHOUT a
    KV cache. Ties go to the lowest token id (``torch.argmax``). If
    ``eos_token_id`` is given, generation stops after emitting it (the EOS id is
    included, as in vLLM's ``token_ids``); by default it never stops early
    (like vLLM's ``ignore_eos=True``).
    """
    seq = [int(t) for t in token_ids]
    new: list[int] = []
    for _ in range(int(max_new_tokens)):
        nxt = int(torch.argmax(full_logits(model, seq)[-1]).item())
        seq.append(nxt)
        new.append(nxt)
        if eos_token_id is not None and nxt == eos_token_id:
            break
    return new


@torch.inference_mode()
def capture_indexer_topk(model, token_ids) -> dict[int, torch.Tensor]:
    """Run one full forward and return HF's DSA indexer selections per layer.

    Returns ``{layer_idx: int64 tensor [S, k]}`` with ``k = min(index_topk, S)``:
    row ``t`` holds the key positions selected for query ``t``. For
    ``t < k - 1`` some entries are future (causally masked) positions that the
    attention ignores; use ``valid_topk_sets`` to get the effective sets.
    """
    from transformers.models.deepseek_v32.modeling_deepseek_v32 import DeepseekV32Indexer

    captured: dict[int, torch.Tensor] = {}
    hooks = []

    def make_hook(idx):
        def hook(_mod, _inp, out):
            captured[idx] = out[0].to(torch.int64).cpu()

        return hook

    for mod in model.modules():
        if isinstance(mod, DeepseekV32Indexer):
            hooks.append(mod.register_forward_hook(make_hook(mod.layer_idx)))
    try:
        full_logits(model, token_ids)
    finally:
        for h in hooks:
            h.remove()
    return captured


def valid_topk_sets(topk: torch.Tensor) -> list[set[int]]:
    """Per query ``t``: the selected key positions that are causally visible (``<= t``)."""
    return [set(int(j) for j in row.tolist() if j <= t) for t, row in enumerate(topk)]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="HF transformers oracle for DeepSeek-V3.2 (CPU, no KV cache)")
    ap.add_argument("model_dir")
    ap.add_argument("--prompt", default="The quick brown fox")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--chat", action="store_true", help="wrap the prompt with the chat template")
    ap.add_argument("--stop-at-eos", action="store_true")
    ap.add_argument("--prompt-logprobs", action="store_true")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    a = ap.parse_args(argv)

    tok = load_tokenizer(a.model_dir)
    model = load_hf_model(a.model_dir, dtype=getattr(torch, a.dtype))
    if a.chat:
        ids = tok.apply_chat_template(
            [{"role": "user", "content": a.prompt}], add_generation_prompt=True, tokenize=False
        )
        ids = tok(ids, add_special_tokens=False)["input_ids"]
    else:
        ids = tok(a.prompt)["input_ids"]  # BOS is prepended by the tokenizer
    new = greedy_generate(model, ids, a.max_new_tokens, tok.eos_token_id if a.stop_at_eos else None)
    res = {
        "model_dir": str(Path(a.model_dir)),
        "prompt_ids": ids,
        "generated_ids": new,
        "generated_text": tok.decode(new, skip_special_tokens=True),
    }
    if a.prompt_logprobs:
        res["prompt_logprobs"] = prompt_logprobs(model, ids)
    if a.json:
        print(json.dumps(res))
    else:
        for k, v in res.items():
            print(f"{k}: {v!r}" if isinstance(v, str) else f"{k}: {v}")


if __name__ == "__main__":
    main()
