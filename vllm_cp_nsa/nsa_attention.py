"""NSA attention under CP for one layer, on this rank's rows (vLLM-free).

Per layer, given the projections of this rank's rows:
1. all-gather the new latent (512 + 64) and indexer key (128) rows, restore token
   order, write every real token into this rank's full caches;
2. indexer top-k for the local queries over their request's keys ``[0, pos]``;
3. sparse MLA (absorbed MQA form, 576/512) over the selected slots, then W_UV.
Only the rows of step 1 cross ranks; queries, top-k and outputs stay local. A batch whose rows
all have at most ``topk`` keys skips the indexer (step 2 would select every key); if it is
whole prompts, unsplit, steps 2-3 are a dense causal prefill (``dense_prefill_attention``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

import torch

from .bounds_check import bounds_checks_enabled, check_batch_bounds
from .communicator import CpGroup, gather_token_rows
from .kernels.kv_cache_ref import INDEX_HEAD_DIM, LATENT_DIM, ROPE_DIM, QuantizedIndexerQuery
from .split_plan import SplitPlan, SplitStrategy, build_split_plan, unsplit_plan


@dataclass(frozen=True)
class WholePrompts:
    """An unsplit batch of prompts with nothing cached before them: each request's keys are
    exactly its rows of this forward (token order), so its attention can run as vLLM's MLA
    prefill does, dense and causal over the up-projected keys (``dense_prefill_attention``)."""

    cu_seqlens: torch.Tensor
    """[num_reqs + 1] int32 on the device: request ``i`` is rows ``[cu[i], cu[i+1])``."""
    max_len: int
    num_tokens: int


@dataclass(frozen=True)
class NsaForwardMetadata:
    """Everything a layer needs about the batch; built once per forward."""

    plan: SplitPlan
    slot_mapping: torch.Tensor
    """[T] cache slot of every real token (token order); -1 writes nothing."""
    block_table: torch.Tensor
    """[num_reqs, max_blocks] int32."""
    block_size: int
    local_req: torch.Tensor
    """[rows_per_rank] request of each local row, -1 for padding rows."""
    use_decode_kernel: bool
    """Every request has at most ``1 + num_speculative_tokens`` query tokens
    (decode / target-verify): run the decode attention path."""
    max_seq_len: int | None = None
    """An upper bound of the batch's sequence lengths (vLLM's, on the host); None: unknown."""
    whole_prompts: WholePrompts | None = None
    local_rows_host: tuple[torch.Tensor, torch.Tensor] | None = None
    """``(local_req, kv_len)`` of the local rows on the host, where the batch states them
    exactly (prefill batches: vLLM's host sequence lengths are exact for prefill rows), so a
    kernel provider can plan its work without reading the device; None elsewhere."""
    decode_next_n: int = 0
    """A decode / verify batch run unsplit whose requests (graph padding included) all have
    this many query rows, consecutive and in request order: vLLM's uniform decode batches and
    every FULL-graph capture. A kernel provider may then score the rows as [requests, next_n]
    (``indexer_topk_decode``). 0 for every other batch."""
    _per_forward: dict = field(default_factory=dict, init=False, compare=False, repr=False)

    @property
    def num_local_rows(self) -> int:
        return self.local_req.shape[0]

    def per_forward_value(self, key: str, build):
        """``build()`` once per forward (per metadata object), the same object for every layer."""
        if key not in self._per_forward:
            self._per_forward[key] = build()
        return self._per_forward[key]

    def local_kv_len(self, local_positions: torch.Tensor) -> torch.Tensor:
        """[rows] keys each local row attends over: its position + 1, at most the block table's
        width, 0 for padding rows.

        Every layer passes the same positions tensor, so this is computed once per forward
        and every layer's indexer gets the same tensor (a kernel provider may key per-forward
        host work on it, as ``vllm-deepgemm`` does).

        The cap keeps every key read inside the block table whatever the positions say: vLLM
        0.34's V2 model runner captures the MTP drafter's prefill graphs with a dummy batch
        built in the target's buffers (one block-table column) while the drafter reads its own
        positions buffer, still holding an earlier batch's positions (up to max_model_len - 1);
        uncapped, the fp8 cache's kernels read past the table (the illegal memory access of
        2026-12-03, named by ``VLLM_CP_NSA_CHECK_BOUNDS=1`` on 2026-12-05). A real batch's
        positions lie inside its table (vLLM's sequence lengths bound both): the cap changes nothing."""
        hit = self._per_forward.get("kv_len")
        if hit is None or hit[0] is not local_positions:
            table_width = self.block_table.shape[1] * self.block_size
            kv_len = torch.where(self.local_req >= 0, (local_positions.long() + 1).clamp_(max=table_width), 0)
            hit = self._per_forward["kv_len"] = (local_positions, kv_len)
        return hit[1]

    def every_key_width(self, topk: int) -> int:
        """``max_seq_len`` when every row of this batch has at most ``topk`` keys, so that the
        indexer would select all of them; else 0.

        Only for batches with a prefill piece outside a CUDA-graph capture: the decision is
        taken on the host per batch, which a captured graph (decode / verify batches) could
        not repeat on replay."""
        if self.use_decode_kernel or self.max_seq_len is None:
            return 0
        if self.local_req.is_cuda and torch.cuda.is_current_stream_capturing():
            return 0
        return self.max_seq_len if 0 < self.max_seq_len <= topk else 0


def build_forward_metadata(
    query_lens: Sequence[int],
    slot_mapping: torch.Tensor,
    block_table: torch.Tensor,
    block_size: int,
    cp_size: int,
    cp_rank: int,
    strategy: SplitStrategy | None,
    min_tokens_for_cp: int,
    max_decode_query_len: int,
    device: torch.device | str,
    num_input_tokens: int | None = None,
    graph_padded: bool = False,
    buffers: "MetadataBuffers | None" = None,
    max_seq_len: int | None = None,
    split_decode: bool = True,
    decode_min_tokens: int | None = None,
    seq_lens: Sequence[int] | None = None,
) -> NsaForwardMetadata:
    """The forward's metadata; ``graph_padded`` for a batch vLLM padded to a FULL
    CUDA-graph size (``num_input_tokens`` rows, the extra ones with slot -1).

    A graph replays the layout captured for its size, where every token was real
    and every request had ``max_decode_query_len`` tokens. So the padding tokens of
    a graph-padded batch join the split as requests of that length: the plan has
    the captured shape (same rows per rank, same token count), and those tokens
    belong to no request (``local_req == -1``: no KV write, no keys, no effect on
    real rows). With ``buffers`` the index tensors land in persistent device
    buffers, so a replay reads this batch's values at the captured addresses.

    ``max_seq_len`` (an upper bound of the batch's sequence lengths): a batch with a
    prefill piece (never captured in a graph) keeps only the block-table columns it
    needs, so the indexer kernels size their work by this batch, not by max_model_len.
    Decode / verify batches keep the full table: a captured graph must fit any later one.

    ``split_decode=False`` (``decode_attention: tp``): decode / verify batches run unsplit,
    every rank holding every row (their attention then splits the heads instead).
    ``decode_min_tokens`` (``split_policy``, ``min_tokens_for_cp: auto``): the bound decode /
    verify batches use instead of ``min_tokens_for_cp`` when they split (None: the same).
    ``seq_lens`` (host, per request, optional): a prefill batch that runs unsplit and whose
    sequences are exactly its query tokens gets ``whole_prompts``; a batch whose lengths are
    exact gets ``local_rows_host`` (``_exact_host_lengths``).
    """
    query_lens = [int(n) for n in query_lens]
    num_real_tokens = sum(query_lens)
    split_lens = query_lens
    if graph_padded and num_input_tokens is not None and num_input_tokens > num_real_tokens:
        split_lens = query_lens + _padding_requests(num_input_tokens - num_real_tokens, max_decode_query_len)
    is_decode = num_real_tokens > 0 and max(split_lens) <= max_decode_query_len
    if is_decode and not split_decode and cp_size > 1:
        plan = unsplit_plan(sum(split_lens), cp_size, cp_rank, "decode attention on a TP partition")
    else:
        bound = decode_min_tokens if is_decode and decode_min_tokens is not None else min_tokens_for_cp
        plan = build_split_plan(split_lens, cp_size, cp_rank, strategy, bound, num_input_tokens)
    token_req = _token_requests(query_lens, plan.num_tokens)
    idx = plan.local_token_idx
    if plan.is_split:
        local_req = torch.where(idx >= 0, token_req[idx.clamp(min=0)], -1) if plan.num_tokens else idx
    else:  # an unsplit plan's rows are the tokens in order (local_token_idx = arange)
        local_req = token_req
    slots = slot_mapping[: plan.num_tokens]
    if slots.shape[0] < plan.num_tokens:  # callers that pass only the real tokens' slots
        slots = torch.cat([slots, slots.new_full((plan.num_tokens - slots.shape[0],), -1)])
    if max_seq_len is not None and not is_decode:
        block_table = block_table[:, : max(1, -(-max_seq_len // block_size))]
    whole_prompts = None
    if (not is_decode and not plan.is_split and plan.num_tokens == num_real_tokens > 0
            and seq_lens is not None and [int(n) for n in seq_lens] == query_lens):  # fmt: skip
        cu_seqlens = torch.tensor([0] + query_lens, dtype=torch.int32).cumsum(0, dtype=torch.int32)
        whole_prompts = WholePrompts(cu_seqlens.to(device, non_blocking=True), max(query_lens), num_real_tokens)
    local_rows_host = None
    if not is_decode and _exact_host_lengths(query_lens, seq_lens, max_decode_query_len):
        # a token's position = its request's cached tokens + its offset in the request's query
        context = torch.as_tensor([int(s) - n for s, n in zip(seq_lens, query_lens)], dtype=torch.long)
        token_kv_len = torch.zeros(plan.num_tokens, dtype=torch.long)
        starts = torch.as_tensor([0] + query_lens[:-1], dtype=torch.long).cumsum(0)
        req = token_req[:num_real_tokens]
        token_kv_len[:num_real_tokens] = context[req] + torch.arange(num_real_tokens) - starts[req] + 1
        kv_len = torch.where(local_req >= 0, token_kv_len[idx.clamp(min=0)], 0) if plan.num_tokens else idx
        local_rows_host = (local_req, kv_len)
    if buffers is None:
        plan, local_req, slots = plan.to(device), local_req.to(device), slots.long()
    else:
        # an unsplit plan's request map is a function of the query lengths: a step that repeats
        # the last one's (decode steps of one batch) finds it staged already
        same_map = None if plan.is_split else (tuple(query_lens), plan.num_tokens)
        plan, local_req, slots = buffers.stage(plan, local_req, slots, local_req_key=same_map)
    uniform = is_decode and not plan.is_split and plan.num_tokens == sum(split_lens) and len(set(split_lens)) == 1
    return NsaForwardMetadata(
        plan=plan,
        slot_mapping=slots,
        block_table=block_table[: len(query_lens)],
        block_size=block_size,
        local_req=local_req,
        use_decode_kernel=is_decode,
        max_seq_len=max_seq_len,
        whole_prompts=whole_prompts,
        local_rows_host=local_rows_host,
        decode_next_n=split_lens[0] if uniform else 0,
    )


def _exact_host_lengths(query_lens: Sequence[int], seq_lens: Sequence[int] | None, max_decode_query_len: int) -> bool:
    """Whether vLLM's host sequence lengths are exact for every request of the batch: they
    are an upper bound only for rows extending a sequence by speculative tokens (async
    scheduling learns the accepted count later), which a request of at most
    ``max_decode_query_len`` tokens may be when speculative decoding is on."""
    if seq_lens is None or len(seq_lens) != len(query_lens) or not query_lens:
        return False
    return max_decode_query_len == 1 or min(query_lens) > max_decode_query_len


# Up to this many tokens a batch's token -> request map is built from a Python list (one
# tensor construction); torch.repeat_interleave cost 58 us of a 2 ms decode step's host
# time on the H200 host (1204j trace) and milliseconds on a busy 2-core CPU.
_LIST_BUILT_TOKENS = 512


def _token_requests(query_lens: Sequence[int], num_tokens: int) -> torch.Tensor:
    """[num_tokens] int64 host tensor: each real token's request index, then -1 (padding)."""
    num_real = sum(query_lens)
    if num_tokens <= _LIST_BUILT_TOKENS:
        reqs = [r for r, n in enumerate(query_lens) for _ in range(n)]
        return torch.tensor(reqs + [-1] * (num_tokens - num_real), dtype=torch.long)
    token_req = torch.full((num_tokens,), -1, dtype=torch.long)
    token_req[:num_real] = torch.repeat_interleave(torch.arange(len(query_lens)),
                                                   torch.as_tensor(query_lens, dtype=torch.long))
    return token_req


def _padding_requests(num_padding_tokens: int, request_len: int) -> list[int]:
    full, rest = divmod(num_padding_tokens, request_len)
    return [request_len] * full + ([rest] if rest else [])


class MetadataBuffers:
    """Persistent device buffers for the per-forward index tensors.

    A CUDA graph replays the addresses it captured; every forward's plan, request
    map and slot mapping are copied into views that start at the same addresses,
    so graphs read the current batch. Eager forwards use them the same way.
    """

    NAMES = ("local_token_idx", "token_to_gathered_row", "local_req", "slot_mapping")

    def __init__(self, capacity: int, device: torch.device | str):
        self.device = torch.device(device)
        self._buffers = {name: torch.zeros(capacity, dtype=torch.long, device=self.device)
                         for name in self.NAMES}
        self._keys: dict[str, object] = {}
        """Per buffer, the key of the values it holds (``_put``'s ``key``), if any; for
        local_token_idx, n: it starts with 0, 1, ..., n - 1 (an unsplit plan's rows)."""

    def stage(self, plan: SplitPlan, local_req: torch.Tensor, slots: torch.Tensor, local_req_key=None):
        """``local_req_key``: a hashable value that determines ``local_req`` (None: none does);
        when the buffer holds the values of an equal key, they are not copied again."""
        gathered = plan.token_to_gathered_row
        staged_plan = replace(
            plan,
            local_token_idx=self._stage_rows(plan),
            token_to_gathered_row=None if gathered is None else self._put("token_to_gathered_row", gathered),
        )
        return staged_plan, self._put("local_req", local_req, local_req_key), self._put("slot_mapping", slots)

    def _stage_rows(self, plan: SplitPlan) -> torch.Tensor:
        """An unsplit plan's rows (0, 1, 2, ...) are read where a longer or equal run of them
        lies already: one host-to-device copy a decode step fewer."""
        if plan.is_split:
            return self._put("local_token_idx", plan.local_token_idx)
        n = plan.local_token_idx.shape[0]
        held = self._keys.get("local_token_idx")
        if held is not None and n <= held:
            return self._buffers["local_token_idx"][:n]
        return self._put("local_token_idx", plan.local_token_idx, key=n)

    def _put(self, name: str, values: torch.Tensor, key=None) -> torch.Tensor:
        buf = self._buffers[name]
        n = values.shape[0]
        if n > buf.shape[0]:  # only batches larger than any capture size get here
            buf = self._buffers[name] = torch.zeros(n, dtype=torch.long, device=self.device)
            self._keys.pop(name, None)
        view = buf[:n]
        if key is not None and self._keys.get(name) == key:
            return view
        view.copy_(values, non_blocking=True)
        self._keys[name] = key
        return view


@dataclass(frozen=True)
class NsaCaches:
    latent: torch.Tensor
    """[num_blocks, block_size, 576] (model dtype) or [.., 656] uint8 (fp8_ds_mla)."""
    index: torch.Tensor
    """[num_blocks, block_size, 128] (model dtype) or [num_blocks, block_size * 132] uint8."""
    kv_cache_dtype: str
    index_fp8: bool


def write_new_tokens(
    kv_c: torch.Tensor,
    k_pe: torch.Tensor,
    index_k: torch.Tensor,
    meta: NsaForwardMetadata,
    caches: NsaCaches,
    group: CpGroup,
    ops,
) -> None:
    """Gather every rank's new latent / indexer-key rows and write all real tokens (an
    unsplit batch has them all already: written from its own tensors, no packing copy)."""
    if meta.plan.is_split:
        packed = torch.cat([kv_c, k_pe, index_k.to(kv_c.dtype)], dim=-1)
        rows = gather_token_rows(packed, meta.plan, group)
        latent, rope, key = rows.split([LATENT_DIM, ROPE_DIM, INDEX_HEAD_DIM], dim=-1)
    else:
        n = meta.plan.num_tokens
        latent, rope, key = kv_c[:n], k_pe[:n], index_k[:n].to(kv_c.dtype)
    ops.write_token_caches(caches.latent, latent, rope, caches.kv_cache_dtype, caches.index, key, caches.index_fp8,
                           meta.slot_mapping, meta.block_size)  # fmt: skip


def select_topk_positions(
    index_q: torch.Tensor,
    index_weights: torch.Tensor,
    local_positions: torch.Tensor,
    meta: NsaForwardMetadata,
    caches: NsaCaches,
    topk: int,
    ops,
    index_q_fp8: QuantizedIndexerQuery | None = None,
) -> torch.Tensor:
    """[rows, width] request-local positions each local query attends to (-1 padded).

    When every row has at most ``topk`` keys the indexer would pick them all: the rows get
    all their keys without scoring any (as vLLM's own model skips its indexer for prefills of
    at most ``topk`` tokens), ``width`` = the batch's longest sequence instead of ``topk``
    (sparse kernels that do the work of every index slot do half of it for a 1K batch), built
    once per forward. Otherwise the indexer's top-k, ``width`` = ``topk``. ``index_q_fp8``: the
    same query in fp8, for providers that asked for it (``NsaOps.indexer_query_fp8_heads``)."""
    kv_len = meta.local_kv_len(local_positions)
    width = meta.every_key_width(topk)
    if width:
        hit = meta.per_forward_value("every_key", dict)
        if hit.get("kv_len") is not kv_len:
            hit.update(kv_len=kv_len, positions=every_key_positions(kv_len, width))
        return hit["positions"]
    quantized = {} if index_q_fp8 is None else {"quantized": index_q_fp8}  # only to providers that ask
    if meta.decode_next_n:
        return ops.indexer_topk_decode(
            index_q, index_weights, caches.index, meta.block_table, meta.local_req, kv_len,
            meta.decode_next_n, topk, meta.block_size, caches.index_fp8, **quantized,
        )  # fmt: skip
    return ops.indexer_topk(
        index_q, index_weights, caches.index, meta.block_table, meta.local_req, kv_len,
        topk, meta.block_size, caches.index_fp8, host_rows=meta.local_rows_host, **quantized,
    )  # fmt: skip


def every_key_positions(kv_len: torch.Tensor, width: int) -> torch.Tensor:
    """[rows, width] int32: row ``m`` holds ``0 .. kv_len[m] - 1``, then -1."""
    cols = torch.arange(width, dtype=torch.int32, device=kv_len.device)
    return torch.where(cols < kv_len[:, None], cols, -1)


def absorbed_query(q_nope: torch.Tensor, q_pe: torch.Tensor, w_uk_t: torch.Tensor,
                   into: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """[n, H, 512 + 64] attention query: q_nope absorbed into the latent space, then q_pe.

    The head-batched matmul writes straight into the token-major query buffer (as vLLM's
    MLA does), so the [n, H, 576] query is written once instead of bmm + concat. ``into``: a
    buffer whose last 64 dims already hold q_pe (the CUDA path's query rope writes them
    there), so only the matmul writes it."""
    n, num_heads, _ = q_nope.shape
    latent = w_uk_t.shape[-1]
    q = q_nope.new_empty((n, num_heads, latent + q_pe.shape[-1])) if into is None else into
    torch.bmm(q_nope.transpose(0, 1), w_uk_t, out=q[..., :latent].transpose(0, 1))
    if into is None:
        q[..., latent:] = q_pe
    return q


def sparse_attention(
    q: torch.Tensor,
    topk_positions: torch.Tensor,
    meta: NsaForwardMetadata,
    caches: NsaCaches,
    sm_scale: float,
    ops,
) -> torch.Tensor:
    """[rows, H, 512] sparse MLA output for q [rows, H, 576] (decode kernel for decode /
    verify batches, over cache slots; prefill rows hand the provider their positions)."""
    if meta.use_decode_kernel:
        out, _ = ops.sparse_mla_decode_positions(
            q.unsqueeze(1), caches.latent, topk_positions.unsqueeze(1), meta.local_req, meta.block_table,
            meta.block_size, sm_scale, LATENT_DIM, caches.kv_cache_dtype,
            forward_state=meta.per_forward_value("sparse_mla_decode", dict),
        )  # fmt: skip
        return out.squeeze(1)
    out, _ = ops.sparse_mla_prefill_positions(
        q, caches.latent, topk_positions, meta.local_req, meta.block_table, meta.block_size, sm_scale,
        LATENT_DIM, caches.kv_cache_dtype,
    )  # fmt: skip
    return out


def nsa_attention(
    *,
    q_nope: torch.Tensor,
    q_pe: torch.Tensor,
    kv_c: torch.Tensor,
    k_pe: torch.Tensor,
    index_q: torch.Tensor,
    index_weights: torch.Tensor,
    index_k: torch.Tensor,
    local_positions: torch.Tensor,
    w_uk_t: torch.Tensor,
    w_uv: torch.Tensor,
    meta: NsaForwardMetadata,
    caches: NsaCaches,
    topk: int,
    sm_scale: float,
    group: CpGroup,
    ops,
    out: torch.Tensor | None = None,
    kv_up_proj: Callable[[torch.Tensor], torch.Tensor] | None = None,
    q_latent: torch.Tensor | None = None,
    index_q_fp8: QuantizedIndexerQuery | None = None,
    caches_written: bool = False,
) -> torch.Tensor:
    """One layer of NSA attention for this rank's rows -> ``[rows, H * v_head_dim]``
    (written into ``out`` when given: a CUDA graph's static buffer).

    ``q_latent`` [n, H, 512 + 64]: the latent query's buffer with q_pe already in its last 64
    dims (``absorbed_query``'s ``into``). ``index_q_fp8``: index_q already quantized for the
    provider's fp8 indexer (``select_topk_positions``). ``caches_written``: the new tokens are in
    the caches already (the layer's prologue kernel wrote them: an unsplit batch).

    ``kv_up_proj`` (the layer's kv_b_proj: kv_c [n, 512] -> [n, H * (P + V)]): with it, a
    batch of whole prompts whose rows all select every key runs ``dense_prefill_attention``.

    q_nope [n, H, P], q_pe [n, H, 64], kv_c [n, 512], k_pe [n, 64] (roped),
    index_q [n, Hi, 128] (roped), index_weights [n, Hi] (all scales folded),
    index_k [n, 128] (roped); w_uk_t [H, P, 512], w_uv [H, 512, V].
    """
    if bounds_checks_enabled():
        check_batch_bounds(meta.local_req, meta.local_kv_len(local_positions), meta.slot_mapping, meta.block_table,
                           meta.block_size, min(caches.latent.shape[0], caches.index.shape[0]))  # fmt: skip
    if not caches_written:
        write_new_tokens(kv_c, k_pe, index_k, meta, caches, group, ops)
    n, num_heads, v_dim = q_nope.shape[0], w_uv.shape[0], w_uv.shape[-1]
    values = q_nope.new_empty((n, num_heads * v_dim), dtype=w_uv.dtype) if out is None else out
    if kv_up_proj is not None and meta.whole_prompts is not None and meta.every_key_width(topk):
        dense_prefill_attention(q_nope, q_pe, kv_c, k_pe, kv_up_proj, meta.whole_prompts, sm_scale, ops, values)
        return values
    topk_positions = select_topk_positions(index_q, index_weights, local_positions, meta, caches, topk, ops,
                                           index_q_fp8)  # fmt: skip
    q = absorbed_query(q_nope, q_pe, w_uk_t, q_latent)
    latent_out = sparse_attention(q, topk_positions, meta, caches, sm_scale, ops)
    # [H, n, 512] x [H, 512, V] written token-major: no copy for the reshape to [n, H * V]
    torch.bmm(latent_out.transpose(0, 1).to(w_uv.dtype), w_uv, out=values.view(n, num_heads, v_dim).transpose(0, 1))
    return values


def dense_prefill_attention(
    q_nope: torch.Tensor,
    q_pe: torch.Tensor,
    kv_c: torch.Tensor,
    k_pe: torch.Tensor,
    kv_up_proj: Callable[[torch.Tensor], torch.Tensor],
    prompts: WholePrompts,
    sm_scale: float,
    ops,
    values: torch.Tensor,
) -> None:
    """Whole prompts of at most ``index_topk`` tokens: every row attends to all its earlier
    rows, so the sparse attention is plain causal attention, run as vLLM's own model runs it
    (its dense MHA prefill): keys and values up-projected from the latent (kv_b_proj), q / k
    [n, H, P + 64] and v [n, H, V] through the provider's ``dense_causal_attention``. Same
    scores as the absorbed form (q_nope . W_UK kv_c = q_nope . k_nope), a third of its
    multiply-adds at 128 heads; the output is already per head in V, no W_UV.
    Writes ``values`` [rows, H * V] (rows = the prompts' tokens: such a batch has no padding rows)."""
    n = prompts.num_tokens
    num_heads, nope_dim = q_nope.shape[1], q_nope.shape[2]
    v_dim = values.shape[1] // num_heads
    kv = kv_up_proj(kv_c[:n]).view(n, num_heads, nope_dim + v_dim)
    k_nope, v = kv.split([nope_dim, v_dim], dim=-1)
    q = joined_last_dim(q_nope[:n], q_pe[:n])
    if q is None:
        q = torch.cat([q_nope[:n], q_pe[:n]], dim=-1)
    k = torch.cat([k_nope, k_pe[:n, None, :].expand(n, num_heads, k_pe.shape[-1])], dim=-1)
    attn = ops.dense_causal_attention(q, k, v, prompts.cu_seqlens, prompts.max_len, sm_scale)
    values.view(n, num_heads, v_dim).copy_(attn)


def joined_last_dim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor | None:
    """``torch.cat([a, b], -1)`` as a view, when ``b`` lies right after ``a`` in every row of one
    buffer (the query's nope and rope parts, split from one projection and roped in place, as
    on CUDA): no copy, no launch. None otherwise."""
    if (a.dtype != b.dtype or a.device != b.device or a.shape[:-1] != b.shape[:-1] or a.stride() != b.stride()
            or a.stride(-1) != 1 or a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr()
            or b.storage_offset() != a.storage_offset() + a.shape[-1]):
        return None
    return a.as_strided((*a.shape[:-1], a.shape[-1] + b.shape[-1]), a.stride(), a.storage_offset())
