"""The CP-aware MTP draft splits the target's hidden states with its own plan (CPU, -tp 2).

e2e/test_mtp.py's model passes only the next token's embedding through the MTP layer's
``eh_proj`` (so the random draft is often right); there the target's hidden states do not
reach the draft, and a draft that took the wrong rows of them would go unnoticed. Here
``eh_proj`` also mixes in the hidden states, so the drafts depend on them: the draft under
round-robin CP must propose exactly what the unsplit draft proposes, seen in equal
spec-decode counters (greedy tokens are right whatever the draft proposes).
"""

import pytest
import torch

from conftest import SPLIT_EVERY_BATCH, mixed_prompts, run_vllm
from make_tiny_model import build_tiny_model

pytestmark = pytest.mark.e2e

HIDDEN_MIX = 0.5


@pytest.fixture(scope="module")
def hidden_mixing_mtp_model(tmp_path_factory):
    from safetensors.torch import load_file, save_file

    model = build_tiny_model(tmp_path_factory.mktemp("mtp_mix") / "v32", seed=0, mtp_friendly=True)
    files = sorted(model.glob("*.safetensors"))
    changed = 0
    for path in files:
        tensors = load_file(path)
        for name, tensor in tensors.items():
            if name.endswith("eh_proj.weight"):  # [H, 2H] over [enorm(embedding); hnorm(hidden)]
                hidden = tensor.shape[0]
                tensor[:, hidden:] = HIDDEN_MIX * torch.eye(hidden, dtype=tensor.dtype)
                changed += 1
        save_file(tensors, path, metadata={"format": "pt"})
    assert changed == 1
    return model


def _mtp_run(model, prompts, tp, cp_nsa):
    return run_vllm({
        "llm": {"model": str(model), "dtype": "float32", "tensor_parallel_size": tp, "max_model_len": 2048,
                "enforce_eager": True, "max_num_batched_tokens": 128, "additional_config": {"cp_nsa": cp_nsa},
                "speculative_config": {"method": "mtp", "num_speculative_tokens": 2}},
        "prompts": prompts,
        "sampling": {"temperature": 0.0, "max_tokens": 12, "ignore_eos": True},
    })


def test_split_draft_proposes_what_the_unsplit_draft_does(hidden_mixing_mtp_model, tokenizer):
    prompts = mixed_prompts(tokenizer, index_topk=64)[:6]
    unsplit = _mtp_run(hidden_mixing_mtp_model, prompts, 1, {"mode": "off"})
    split = _mtp_run(hidden_mixing_mtp_model, prompts, 2, {"mode": "round-robin-split", **SPLIT_EVERY_BATCH})
    assert [o["token_ids"] for o in split["outputs"]] == [o["token_ids"] for o in unsplit["outputs"]]
    stats, expected = split["info"]["spec_decode"], unsplit["info"]["spec_decode"]
    print(f"acceptance split {stats}, unsplit {expected}")
    assert 0 < expected["accepted_tokens"] < expected["draft_tokens"]  # the draft is informative
    assert stats == expected
