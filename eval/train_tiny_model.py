#!/usr/bin/env python
"""Train a tiny DeepSeek-V3.2 on the synthetic tasks (CPU, minutes, deterministic).

The model is make_tiny_model's configuration (MLA with the real cache geometry,
lightning indexer, MoE with grouped noaux_tc routing and routed scaling, one MTP
layer) with a word-level tokenizer (eval/synthetic_tasks.py), YaRN rope and
``index_topk`` 16, several times shorter than the retrieval and copy prompts.

Training runs HF transformers' own ``deepseek_v32`` modules (the project's CPU
oracle, eval/hf_oracle.py), so the saved checkpoint gives in HF exactly the
logits it was trained with; the script checks that after writing. What the HF
modules do not train is added here, as DeepSeek-V3.2 / V3 describe it:

- indexer: HF's indexer runs under ``no_grad`` (only its top-k leaves it). Each
  attention layer's indexer learns a KL loss towards that layer's attention
  distribution (summed over heads), on detached inputs: dense attention while
  the model trains dense (``--dense-steps``), then the attention over the
  indexer's own top-k while the whole model trains sparse.
- MTP (``model.layers.{L}``): vLLM's DeepSeekMTP forward (embedding of token
  t+1, zeroed at position 0, and the main model's final-norm hidden of token t,
  through enorm / hnorm / eh_proj, one decoder layer, shared_head) predicts
  token t+2 (weight 0.3); at this size its gradient stays out of the main model (the
  hidden it reads is detached), where DeepSeek lets it flow.
- noaux_tc: each MoE gate's ``e_score_correction_bias`` follows the
  auxiliary-loss-free balancing rule (bias += rate * sign(mean load - load)).

Losses count only answer tokens (after the question). Usage::

    nice -n 15 .venv/bin/python eval/train_tiny_model.py eval/trained_tiny --threads 2
"""

from __future__ import annotations

import argparse
import copy as copy_module
import hashlib
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import synthetic_tasks  # noqa: E402
from make_tiny_model import (  # noqa: E402
    MODEL_MAX_LENGTH, SPECIAL_TOKENS, VOCAB_MULTIPLE, _round_up, _save_checkpoint, _shard_plan,
    _write_json, _write_tokenizer_files, make_config, tensor_specs)

INDEX_TOPK = 16
# YaRN as DeepSeek-V3.2 configures it (mscale == mscale_all_dim: cos / sin unscaled, softmax
# scale times mscale^2), with original_max_position_embeddings below the prompt lengths.
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 64.0, "original_max_position_embeddings": 128,
        "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}
EOS_ID, PAD_ID = 1, 2
MTP_LOSS_WEIGHT = 0.3
INDEXER_LOSS_WEIGHT = 1.0
INDUCTION_LOSS_WEIGHT = 1.0
BIAS_UPDATE_RATE = 1e-3
TASK_WEIGHTS = {"repeat": 2, "retrieval": 2, "copy": 1, "arithmetic": 1}


# Smaller per-token dimensions than make_tiny_model's (CPU training in minutes on a shared
# machine); the cache geometry (kv_lora_rank 512, qk_rope_head_dim 64, index_head_dim 128) stays real.
SMALL_DIMS = {"hidden_size": 128, "intermediate_size": 256, "moe_intermediate_size": 32,
              "q_lora_rank": 64, "index_n_heads": 4}


def model_config(vocab_size: int) -> dict:
    cfg = make_config(vocab_size, num_layers=2, index_topk=INDEX_TOPK, num_nextn_predict_layers=1)
    cfg.update(SMALL_DIMS)
    cfg["rope_parameters"] = dict(YARN)
    cfg["rope_theta"] = YARN["rope_theta"]
    cfg["max_position_embeddings"] = MODEL_MAX_LENGTH
    return cfg


# --------------------------------------------------------------------------
# Model: HF DeepseekV32ForCausalLM + the MTP layer vLLM runs
# --------------------------------------------------------------------------

class MtpLayer(nn.Module):
    """vLLM's DeepSeekMultiTokenPredictorLayer (deepseek_mtp.py) on HF's decoder layer."""

    def __init__(self, config, layer_idx: int):
        from transformers.models.deepseek_v32.modeling_deepseek_v32 import (
            DeepseekV32DecoderLayer, DeepseekV32RMSNorm)

        super().__init__()
        H = config.hidden_size
        mtp_config = copy_module.deepcopy(config)
        mtp_config.mlp_layer_types = list(config.mlp_layer_types) + ["sparse"]
        self.enorm = DeepseekV32RMSNorm(H, config.rms_norm_eps)
        self.hnorm = DeepseekV32RMSNorm(H, config.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * H, H, bias=False)
        self.block = DeepseekV32DecoderLayer(mtp_config, layer_idx)
        self.shared_head_norm = DeepseekV32RMSNorm(H, config.rms_norm_eps)

    def forward(self, model, input_ids: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """Logits for token t+2 at positions t = 0..S-2 from the main model's final-norm hidden."""
        from transformers.masking_utils import create_causal_mask

        next_ids = input_ids[:, 1:]
        embeds = model.model.embed_tokens(next_ids)
        seq = next_ids.shape[1]
        positions = torch.arange(seq, device=input_ids.device).unsqueeze(0)
        embeds = torch.where(positions.unsqueeze(-1) == 0, 0.0, embeds)
        x = self.eh_proj(torch.cat([self.enorm(embeds), self.hnorm(hidden[:, :-1])], dim=-1))
        mask = create_causal_mask(config=model.config, inputs_embeds=x, attention_mask=None,
                                  past_key_values=None, position_ids=positions, allow_is_causal_skip=False)
        x = self.block(x, attention_mask=mask, position_embeddings=model.model.rotary_emb(x, positions),
                       position_ids=positions)
        return model.lm_head(self.shared_head_norm(x))


class IndexerDistillation:
    """Every DSA layer's indexer trains on KL(attention over heads || indexer softmax).

    While training, each indexer's ``forward`` is this object's ``select``: the same
    selection as HF's (top-k of the causally masked scores), with the scores kept,
    with gradients for the indexer's weights only (inputs detached), for the KL
    computed by a hook on the attention output. ``restore`` puts HF's forward back.
    """

    def __init__(self, attention_modules, induction_layer: int):
        self.losses: list[torch.Tensor] = []
        # Induction supervision: head 0 of ``induction_layer`` attends from (b, q) to src.
        self.induction_layer = induction_layer
        self.induction: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.induction_losses: list[torch.Tensor] = []
        self.valid: torch.Tensor | None = None  # [B, S] query rows that count
        self.modules = list(attention_modules)
        self.handles = [m.register_forward_hook(self._hook) for m in self.modules]
        for m in self.modules:
            m.indexer.forward = self._selector(m.indexer)

    def restore(self) -> None:
        for h in self.handles:
            h.remove()
        for m in self.modules:
            del m.indexer.forward  # back to the class's (HF's) forward

    @staticmethod
    def _selector(idx):
        def select(hidden_states, q_resid, position_embeddings, attention_mask, position_ids=None,
                   past_key_values=None):
            scores = index_scores(idx, hidden_states.detach(), q_resid.detach(), position_embeddings)
            if attention_mask.dtype == torch.bool:
                allowed = attention_mask
            else:
                allowed = attention_mask == 0
            masked = scores.detach().masked_fill(~allowed, float("-inf"))
            top = masked.topk(min(idx.index_topk, masked.shape[-1]), dim=-1).indices
            idx.last_selection = (scores, allowed.expand_as(scores), top)
            return top.to(torch.int32)
        return select

    def _hook(self, module, args, output):
        if not module.training:
            return
        attn = output[1]  # [B, heads, S, T] softmax after the causal + top-k mask
        if module.layer_idx == 0:  # head 0: the previous token, for every real query but BOS
            prev = torch.diagonal(attn[:, 0], offset=-1, dim1=-2, dim2=-1).float()  # [B, S-1]
            valid = self.valid[:, 1: prev.shape[1] + 1]
            self.induction_losses.append((-torch.log(prev + 1e-6) * valid).sum() / valid.sum())
        if module.layer_idx == self.induction_layer and self.induction is not None:
            b, q, src = self.induction
            self.induction_losses.append(-torch.log(attn[b, 0, q, src].float() + 1e-6).mean())
        scores, allowed, top = module.indexer.last_selection
        selected = torch.zeros_like(allowed).scatter(-1, top, True) & allowed
        target = attn.detach().float().sum(1) * selected
        target = target / target.sum(-1, keepdim=True).clamp_min(1e-12)
        log_q = torch.log_softmax(scores.masked_fill(~selected, -1e9), dim=-1)
        kl = torch.where(target > 0, target * (target.clamp_min(1e-12).log() - log_q), 0.0).sum(-1)  # [B, S]
        valid = self.valid[:, : kl.shape[1]]
        self.losses.append((kl * valid).sum() / valid.sum().clamp_min(1))


def index_scores(idx, hidden, q_resid, position_embeddings) -> torch.Tensor:
    """HF DeepseekV32Indexer.forward's scores (before the mask and top-k), with gradients."""
    from transformers.models.deepseek_v32.modeling_deepseek_v32 import apply_rotary_pos_emb

    B, S, _ = hidden.shape
    cos, sin = position_embeddings
    q = idx.wq_b(q_resid).view(B, S, idx.n_heads, idx.head_dim)
    q_rot, q_pass = torch.split(q, [idx.qk_rope_head_dim, idx.head_dim - idx.qk_rope_head_dim], dim=-1)
    k = idx.k_norm(idx.wk(hidden)).unsqueeze(2)
    k_rot, k_pass = torch.split(k, [idx.qk_rope_head_dim, idx.head_dim - idx.qk_rope_head_dim], dim=-1)
    q_rot, k_rot = apply_rotary_pos_emb(q_rot, k_rot, cos, sin, unsqueeze_dim=2)
    q = torch.cat([q_rot, q_pass], dim=-1)
    k = torch.cat([k_rot, k_pass], dim=-1).squeeze(2)
    # One [S*heads, D] x [D, T] product per sequence (HF broadcasts a tiny one per query row).
    scores = torch.bmm(q.float().reshape(B, S * idx.n_heads, -1), k.float().transpose(1, 2))
    scores = F.relu(scores * idx.softmax_scale).view(B, S, idx.n_heads, -1)
    weights = idx.weights_proj(hidden).float() * (idx.n_heads ** -0.5)
    return torch.einsum("bsh,bsht->bst", weights, scores)


def set_index_topk(model, mtp: MtpLayer, topk: int) -> None:
    for m in list(model.model.layers) + [mtp.block]:
        m.self_attn.indexer.index_topk = topk


def moe_gates(model, mtp: MtpLayer):
    from transformers.models.deepseek_v32.modeling_deepseek_v32 import DeepseekV32TopkRouter

    return [m for m in list(model.modules()) + list(mtp.modules()) if isinstance(m, DeepseekV32TopkRouter)]


# --------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------

def encode_example(tok, doc: dict) -> tuple[list[int], list[int]]:
    """Token ids (BOS question answer EOS) and a 0/1 loss weight per target position."""
    q = tok.encode(doc["question"]).ids
    full = tok.encode(doc["question"] + " " + doc["answer"] + "\n").ids + [EOS_ID]
    assert full[: len(q)] == q, doc
    # Further retrieval queries in the answer start with a random key: not something to learn.
    newline = tok.token_to_id("\n")
    return full, [0] * len(q) + [0 if full[j - 1] == newline else 1 for j in range(len(q), len(full))]


def make_batch(tok, rng: random.Random, task: str, batch_size: int, max_facts: int):
    docs = [synthetic_tasks.training_problem(task, rng, retrieval_queries=rng.randint(4, 16), max_facts=max_facts)
            for _ in range(batch_size)]
    encoded = [encode_example(tok, d) for d in docs]
    S = max(len(ids) for ids, _ in encoded)
    ids = torch.full((batch_size, S), PAD_ID, dtype=torch.long)
    weight = torch.zeros((batch_size, S))
    valid = torch.zeros((batch_size, S))
    for b, (x, w) in enumerate(encoded):
        ids[b, : len(x)] = torch.tensor(x)
        weight[b, : len(w)] = torch.tensor(w, dtype=torch.float)
        valid[b, : len(x)] = 1.0
    return ids, weight, valid, docs


def induction_pairs(ids: torch.Tensor, weight: torch.Tensor):
    """(batch, query, source) index tensors: where an answer token ``ids[p]`` continues a
    bigram ``ids[p-1], ids[p]`` that occurs exactly once before, the query at ``p-1``
    should attend to that earlier occurrence ``s`` of ``ids[p]`` (the induction step
    retrieval, copy and repeat rely on)."""
    out = ([], [], [])
    for b in range(ids.shape[0]):
        row = ids[b].tolist()
        first = {}
        for s in range(1, len(row)):
            first.setdefault((row[s - 1], row[s]), []).append(s)
        for p in torch.nonzero(weight[b]).flatten().tolist():
            sources = [s for s in first.get((row[p - 1], row[p]), []) if s < p - 1]
            if len(sources) == 1:
                for lst, v in zip(out, (b, p - 1, sources[0])):
                    lst.append(v)
    return tuple(torch.tensor(x, dtype=torch.long) for x in out) if out[0] else None


def masked_ce(logits: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), reduction="none")
    return (ce * weight.reshape(-1)).sum() / weight.sum().clamp_min(1)


# --------------------------------------------------------------------------
# Checkpoint
# --------------------------------------------------------------------------

def checkpoint_tensors(model, mtp: MtpLayer, cfg: dict) -> dict[str, torch.Tensor]:
    """HF / vLLM DeepSeek-V3.2 tensor names (make_tiny_model.tensor_specs) -> trained tensors."""
    L = cfg["num_hidden_layers"]
    state = {k: v.detach() for k, v in model.state_dict().items()}
    mtp_state = {k: v.detach() for k, v in mtp.state_dict().items()}
    p = f"model.layers.{L}."
    state[p + "embed_tokens.weight"] = state["model.embed_tokens.weight"]
    state[p + "shared_head.head.weight"] = state["lm_head.weight"]
    for name in ("enorm.weight", "hnorm.weight", "eh_proj.weight"):
        state[p + name] = mtp_state[name]
    state[p + "shared_head.norm.weight"] = mtp_state["shared_head_norm.weight"]
    for k, v in mtp_state.items():
        if k.startswith("block."):
            state[p + k[len("block."):]] = v
    inter = cfg["moe_intermediate_size"]
    out = {}
    for name, shape, kind, _ in tensor_specs(cfg):
        if ".mlp.experts." in name:
            prefix, rest = name.split(".mlp.experts.")
            e, proj = int(rest.split(".")[0]), rest.split(".")[1]
            if proj == "down_proj":
                t = state[f"{prefix}.mlp.experts.down_proj"][e]
            else:
                gate_up = state[f"{prefix}.mlp.experts.gate_up_proj"][e]
                t = gate_up[:inter] if proj == "gate_proj" else gate_up[inter:]
        else:
            t = state[name]
        if tuple(t.shape) != tuple(shape):
            raise RuntimeError(f"{name}: trained shape {tuple(t.shape)} != checkpoint shape {shape}")
        out[name] = t.float().contiguous().clone()
    return out


@torch.no_grad()
def load_trained(model, mtp: MtpLayer, cfg: dict, path: Path) -> None:
    """Inverse of checkpoint_tensors: continue training from a written checkpoint."""
    from safetensors.torch import load_file

    tensors = load_file(str(path / "model.safetensors"))
    L, inter = cfg["num_hidden_layers"], cfg["moe_intermediate_size"]
    p = f"model.layers.{L}."

    mtp_names = {p + "enorm.weight": "enorm.weight", p + "hnorm.weight": "hnorm.weight",
                 p + "eh_proj.weight": "eh_proj.weight", p + "shared_head.norm.weight": "shared_head_norm.weight"}
    mtp_state = mtp.state_dict()
    main_state = model.state_dict()
    for name, t in tensors.items():
        if name in (p + "embed_tokens.weight", p + "shared_head.head.weight"):
            continue
        if name in mtp_names:
            mtp_state[mtp_names[name]].copy_(t)
            continue
        state, key = (mtp_state, "block." + name[len(p):]) if name.startswith(p) else (main_state, name)
        if ".mlp.experts." in key:
            prefix, rest = key.split(".mlp.experts.")
            e, proj = int(rest.split(".")[0]), rest.split(".")[1]
            if proj == "down_proj":
                state[f"{prefix}.mlp.experts.down_proj"][e].copy_(t)
            else:
                rows = slice(0, inter) if proj == "gate_proj" else slice(inter, 2 * inter)
                state[f"{prefix}.mlp.experts.gate_up_proj"][e, rows].copy_(t)
        else:
            state[key].copy_(t)


def write_checkpoint(out: Path, tok, cfg: dict, tensors: dict[str, torch.Tensor], tok_size: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    _write_tokenizer_files(out, tok)
    _write_json(out / "config.json", cfg)
    _write_json(out / "generation_config.json", {"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2})
    plan, shards = _shard_plan(cfg, torch.float32, set(tensors))
    _save_checkpoint(out, ((name, tensors[name]) for name, *_ in tensor_specs(cfg)), plan, shards)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------
# Greedy accuracy with the HF model (no vLLM): a quick check while training
# --------------------------------------------------------------------------

@torch.no_grad()
def greedy_accuracy(model, tok, docs: list[dict], max_new: int = 40) -> float:
    correct = 0
    for doc in docs:
        ids = tok.encode(doc["question"]).ids
        new = []
        for _ in range(max_new):
            nxt = int(model(input_ids=torch.tensor([ids + new]), use_cache=False).logits[0, -1].argmax())
            new.append(nxt)
            if nxt == EOS_ID or tok.decode(new).endswith("\n"):
                break
        text = tok.decode(new, skip_special_tokens=True)
        correct += synthetic_tasks.generated_answer(text) == synthetic_tasks.answer_number(doc)
    return correct / len(docs)


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------

def parse_task_weights(spec: str | None) -> dict[str, int]:
    """``copy=2,arithmetic=1`` -> {"copy": 2, "arithmetic": 1} (tasks of TASK_WEIGHTS only)."""
    out = {}
    for item in filter(None, (spec or "").split(",")):
        task, _, w = item.partition("=")
        if task not in TASK_WEIGHTS or not w.isdigit():
            raise ValueError(f"--task-weights: {item!r} (tasks: {', '.join(TASK_WEIGHTS)})")
        out[task] = int(w)
    return out


def train(a) -> Path:
    from transformers.models.deepseek_v32 import DeepseekV32Config, DeepseekV32ForCausalLM

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    # On CUDA some ops (HF's expert index_add_) have no deterministic kernel: warn there.
    torch.use_deterministic_algorithms(True, warn_only=a.device != "cpu")
    torch.utils.deterministic.fill_uninitialized_memory = False  # NaN-filling every empty() doubled a step
    t0 = time.perf_counter()

    tok = synthetic_tasks.build_tokenizer()
    tok_size = tok.get_vocab_size(with_added_tokens=True)
    cfg = model_config(_round_up(tok_size, VOCAB_MULTIPLE))
    config = DeepseekV32Config(**{k: v for k, v in cfg.items() if k not in ("architectures", "dtype", "torch_dtype")})
    config._attn_implementation = "eager"
    model = DeepseekV32ForCausalLM(config).float()  # drawn on the CPU: same start on every device
    mtp = MtpLayer(config, cfg["num_hidden_layers"]).float()
    mtp.block.apply(model._init_weights)
    nn.init.normal_(mtp.eh_proj.weight, std=config.initializer_range)
    if a.init_from:
        load_trained(model, mtp, cfg, Path(a.init_from))
    model.to(a.device).train()
    mtp.to(a.device).train()

    attention = [layer.self_attn for layer in model.model.layers] + [mtp.block.self_attn]
    distill = IndexerDistillation(attention, induction_layer=cfg["num_hidden_layers"] - 1)
    gates = moe_gates(model, mtp)
    loads: dict[int, torch.Tensor] = {}
    for g in gates:
        g.register_forward_hook(lambda m, i, o: loads.__setitem__(id(m), torch.bincount(
            o[2].reshape(-1), minlength=m.num_experts).float()))

    params = list(model.parameters()) + list(mtp.parameters())
    opt = torch.optim.AdamW(params, lr=a.lr, betas=(0.9, 0.95), weight_decay=0.01)
    warmup = max(1, a.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / a.steps)))))
    rng = random.Random(synthetic_tasks.TRAIN_SEED * 1000 + a.seed)
    weights = dict(TASK_WEIGHTS, **parse_task_weights(a.task_weights))
    schedule = [t for t, w in weights.items() for _ in range(w)]
    log_every = max(1, a.steps // 40)
    recent: dict[str, dict[str, float]] = {t: {} for t in TASK_WEIGHTS}  # moving averages for the log
    for step in range(a.steps):
        sparse = step >= a.dense_steps
        set_index_topk(model, mtp, INDEX_TOPK if sparse else 1 << 30)
        task = schedule[step % len(schedule)]
        # Curriculum: retrieval / copy contexts grow from 4 facts to all 32 over the first third.
        max_facts = min(synthetic_tasks.MAX_FACTS, 4 + (synthetic_tasks.MAX_FACTS - 4) * 3 * step // a.steps)
        if a.no_curriculum:  # a continuation stage: the model already reads full-length contexts
            max_facts = synthetic_tasks.MAX_FACTS
        ids, weight, valid, _ = (t.to(a.device) if torch.is_tensor(t) else t
                                 for t in make_batch(tok, rng, task, a.batch_size, max_facts))
        distill.losses.clear()
        distill.induction_losses.clear()
        pairs = induction_pairs(ids.cpu(), weight.cpu())
        distill.induction = None if pairs is None else tuple(t.to(a.device) for t in pairs)
        distill.valid = valid
        hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state  # after the final norm
        main_loss = masked_ce(model.lm_head(hidden)[:, :-1], ids[:, 1:], weight[:, 1:])
        distill.valid = valid[:, 1:]  # MTP row t reads token t+1
        mtp_logits = mtp(model, ids, hidden if a.mtp_into_main else hidden.detach())
        mtp_loss = masked_ce(mtp_logits[:, :-1], ids[:, 2:], weight[:, 2:])
        indexer_loss = torch.stack(distill.losses).mean()
        induction_loss = torch.stack(distill.induction_losses).mean() if distill.induction_losses else main_loss * 0
        loss = (main_loss + MTP_LOSS_WEIGHT * mtp_loss + INDEXER_LOSS_WEIGHT * indexer_loss
                + INDUCTION_LOSS_WEIGHT * induction_loss)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            for g in gates:
                load = loads[id(g)].to(g.e_score_correction_bias.device)
                g.e_score_correction_bias += BIAS_UPDATE_RATE * torch.sign(load.mean() - load)
        for name, value in (("main", main_loss), ("mtp", mtp_loss), ("indexer", indexer_loss),
                            ("induction", induction_loss)):
            recent[task][name] = 0.9 * recent[task].get(name, value.item()) + 0.1 * value.item()
        if a.stop_at is not None and step == a.stop_at:
            break
        if a.save_every and step and step % a.save_every == 0:
            set_index_topk(model, mtp, INDEX_TOPK)
            write_checkpoint(Path(a.out_dir), tok, cfg, checkpoint_tensors(model, mtp, cfg), tok_size)
            print(f"step {step}: checkpoint written", flush=True)
        if step % log_every == 0 or step == a.steps - 1:
            print(f"step {step:5d} {'sparse' if sparse else 'dense '} facts<={max_facts:2d} | " + " | ".join(
                f"{t} " + " ".join(f"{k} {v:.2f}" for k, v in r.items()) for t, r in recent.items())
                + f" | {time.perf_counter() - t0:.0f}s", flush=True)
    train_s = time.perf_counter() - t0
    set_index_topk(model, mtp, INDEX_TOPK)
    model.cpu().eval()
    mtp.cpu().eval()
    distill.restore()

    out = Path(a.out_dir)
    tensors = checkpoint_tensors(model, mtp, cfg)
    write_checkpoint(out, tok, cfg, tensors, tok_size)
    print(f"trained in {train_s:.0f}s; wrote {out}")
    check_oracle_logits(model, out, tok)
    return out


@torch.no_grad()
def check_oracle_logits(model, out: Path, tok) -> None:
    """The written checkpoint, loaded by the HF oracle (eval/hf_oracle.py), gives the trained
    model's logits exactly, on one held-out problem of each task (sparse: longer than top-k)."""
    import hf_oracle

    oracle = hf_oracle.load_hf_model(out)
    for task in synthetic_tasks.TASKS:
        doc = synthetic_tasks.eval_problems(task, 1)[0]
        ids = tok.encode(doc["question"] + " " + doc["answer"]).ids
        trained = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0]
        loaded = hf_oracle.full_logits(oracle, ids)
        diff = (trained - loaded).abs().max().item()
        if diff != 0.0:
            raise RuntimeError(f"{task}: HF oracle logits differ from the trained model's by {diff}")
    print("HF oracle logits == trained model logits (3 held-out problems, bit-exact)")


def verify(out: Path, n_per_task: int) -> dict:
    """The written checkpoint through the HF oracle: greedy accuracy on held-out problems."""
    import hf_oracle

    model = hf_oracle.load_hf_model(out)
    tok = synthetic_tasks.build_tokenizer()
    return {task: greedy_accuracy(model, tok, synthetic_tasks.eval_problems(task, n_per_task))
            for task in synthetic_tasks.TASKS}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out_dir")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--dense-steps", type=int, default=600, help="steps with dense attention before sparse")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--mtp-into-main", action="store_true",
                    help="let the MTP loss backpropagate into the main model (DeepSeek's way; off by default)")
    ap.add_argument("--stop-at", type=int, default=None, metavar="STEP",
                    help="stop after this step (the schedule still spans --steps): a stage of a longer run")
    ap.add_argument("--init-from", default=None, metavar="DIR",
                    help="start from this checkpoint (written by this script) instead of random weights")
    ap.add_argument("--no-curriculum", action="store_true",
                    help="full-length retrieval / copy / repeat contexts from the first step (for a continuation "
                         "stage with --init-from; the default grows them over the first third of --steps)")
    ap.add_argument("--task-weights", default=None, metavar="TASK=N,...",
                    help="batches per round of each training task, overriding TASK_WEIGHTS "
                         f"({','.join(f'{t}={w}' for t, w in TASK_WEIGHTS.items())})")
    ap.add_argument("--save-every", type=int, default=0, metavar="STEPS",
                    help="also write the checkpoint every STEPS steps (to evaluate a run in progress)")
    ap.add_argument("--device", default="cpu",
                    help="cpu (default; the shipped checkpoint) or cuda: the same training, many more steps a minute "
                         "(deterministic per device with CUBLAS_WORKSPACE_CONFIG=:4096:8)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: on a busy machine a second thread mostly spins)")
    ap.add_argument("--verify", type=int, default=20, metavar="N",
                    help="greedy accuracy of the written checkpoint in HF on N held-out problems per task")
    a = ap.parse_args(argv)
    out = train(a)
    if a.verify:
        print("HF oracle greedy accuracy:", json.dumps(verify(out, a.verify)))
    print(f"model.safetensors sha256 {sha256(out / 'model.safetensors')}")


if __name__ == "__main__":
    main()
