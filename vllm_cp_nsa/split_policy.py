"""Per-batch choice between the CP split and head-split (TP) attention (issue 21, item 0).

A core module (torch-free even): ``resolve_split_policy`` runs once at startup from the
CP size, the KV-cache dtype, the user's options and whether the attention projections can
be sliced by head; the frozen ``AttentionSplitPolicy`` it returns holds the two numbers the
per-forward metadata already consumes (``split_decode`` and ``min_tokens_for_cp`` of
``nsa_attention.build_forward_metadata``), so the choice is made once per forward when the
split plan is built and every layer reads that plan.

Default thresholds (``decode_attention: auto``, ``min_tokens_for_cp: auto``), per CP size N
and KV dtype, and the measurement each comes from:

===  =====  ==============  ==================  ==============================================
N    KV     decode          min_tokens_for_cp   source
===  =====  ==============  ==================  ==============================================
2    bf16   tp (heads)      2048                decode: no N=2 bf16 decode point, tp chosen
                                                conservatively (tp within 5 % of native TP in
                                                every point measured). Prefill:
                                                eval/results/ttft_n2_h200.md, round-robin
                                                0.94x native TP at 1K, 1.23x at 4K: the
                                                crossover lies in (1K, 4K], 2048 is its middle.
2    fp8    tp (heads)      2048                decode: eval/compare_notes.md "decode within 5 %"
                                                row, N=2 fp8: split +18 % / +3 %, tp -4 % / -0.5 %
                                                (batch 1 / 8). Prefill: no fp8 1K point; bf16's.
4    bf16   split           1024                decode: same row, N=4 bf16: split -21 % / -24 %,
                                                tp +3 % / +4 %. Prefill: ttft_n4_h200.md,
                                                round-robin 1.27x at 1K (no point below 1K).
4    fp8    tp (heads)      1024                decode: same row, N=4 fp8: split +1 % / +12 %
                                                (+39 % with MTP); tp not measured at N=4 fp8
                                                (within 5 % elsewhere). Prefill: bf16's.
8    any    tp (heads)      2048                no measurement at N=8: conservative (native
                                                TP's layout for decode, N=2's prefill bound).
===  =====  ==============  ==================  ==============================================

Explicit values (``decode_attention: split|tp``, an integer ``min_tokens_for_cp``) are
honoured as given. Where heads cannot be split (``heads_split_blocker``: quantized
q_b_proj / o_proj, heads not divisible by N), ``auto`` falls back to split decode and the
startup line says why; an explicit ``tp`` there stays an error (raised by the caller).
Under ``mode: off`` (``cp_on=False``) no batch splits its rows, so ``auto`` has nothing to
choose and every rank keeps all heads, as ``mode: off`` always did; an explicit ``tp`` still
splits the heads.
"""

from __future__ import annotations

from dataclasses import dataclass

AUTO = "auto"
DECODE_ATTENTION_CHOICES = (AUTO, "split", "tp")


def is_min_tokens_option(value: object) -> bool:
    """``min_tokens_for_cp`` is ``auto`` or a non-negative integer (a bool is not one)."""
    return value == AUTO or (isinstance(value, int) and not isinstance(value, bool) and value >= 0)

# (cp_size, kv kind) -> (decode runs head-split, min_tokens_for_cp, source); see the table.
_MEASURED: dict[tuple[int, str], tuple[bool, int, str]] = {
    (2, "bf16"): (True, 2048, "decode unmeasured (conservative tp); prefill ttft_n2_h200 RR 0.94x@1K, 1.23x@4K"),
    (2, "fp8"): (True, 2048, "decode compare_notes N=2 fp8 split +18%/+3% vs tp -4%/-0.5%; prefill bf16's"),
    (4, "bf16"): (False, 1024, "decode compare_notes N=4 bf16 split -21%/-24% vs tp +3%/+4%; prefill ttft_n4_h200 RR 1.27x@1K"),
    (4, "fp8"): (True, 1024, "decode compare_notes N=4 fp8 split +1%/+12% (+39% MTP); prefill bf16's"),
}
_UNMEASURED = (True, 2048, "no measurement at this N: conservative")


def kv_kind(kv_cache_dtype: str) -> str:
    """``fp8`` for vLLM's fp8 KV caches (``fp8``, ``fp8_e4m3``, ``fp8_ds_mla``...), else ``bf16``."""
    return "fp8" if str(kv_cache_dtype).startswith("fp8") else "bf16"


@dataclass(frozen=True)
class AttentionSplitPolicy:
    """What unsplit batches do, resolved once at startup; consulted once per forward."""

    split_decode: bool
    """Pure decode / verify batches are split over the ranks (False: unsplit, heads split)."""
    min_tokens_for_cp: int
    """Batches with a prefill piece and fewer real tokens run unsplit."""
    decode_min_tokens: int
    """The same bound for pure decode / verify batches when they split: 0 under ``auto``
    (``split_decode`` alone decides), the user's ``min_tokens_for_cp`` when given (as before)."""
    heads_split: bool
    """Unsplit batches split the attention heads over the ranks (vLLM TP's layout)."""
    reason: str
    """Why: the measurement or the user's option, and any fallback."""

    def splits(self, num_real_tokens: int, is_decode: bool, cp_size: int) -> bool:
        """Whether a batch runs the CP split (the same rule ``build_forward_metadata`` applies)."""
        if cp_size < 2 or num_real_tokens < cp_size:
            return False
        if is_decode:
            return self.split_decode and num_real_tokens >= self.decode_min_tokens
        return num_real_tokens >= self.min_tokens_for_cp

    def describe(self, cp_size: int = 0) -> str:
        """The startup line's part: the resolved thresholds and why (``cp_size``: batches with
        fewer real tokens than ranks never split either)."""
        decode = "split over the ranks" if self.split_decode else "unsplit, heads split (TP)"
        unsplit = "heads split" if self.heads_split else "all heads on every rank"
        return (f"decode / verify batches {decode}; batches with < {max(cp_size, self.min_tokens_for_cp)} "
                f"real tokens unsplit ({unsplit}) [{self.reason}]")


def resolve_split_policy(
    decode_attention: str,
    min_tokens_for_cp: int | str,
    cp_size: int,
    kv_cache_dtype: str,
    heads_split_blocker: str | None = None,
    cp_on: bool = True,
) -> AttentionSplitPolicy:
    """Resolve the options (``auto`` or explicit) into thresholds for this N and KV dtype.

    ``heads_split_blocker``: why the attention heads cannot be split on this model (None if
    they can). ``auto`` then falls back to split decode and keeps all heads on unsplit batches.
    ``cp_on``: False under ``mode: off`` (rows never split; ``auto`` keeps all heads).
    """
    if decode_attention not in DECODE_ATTENTION_CHOICES:
        raise ValueError(f"decode_attention must be auto, split or tp, got {decode_attention!r}")
    if not is_min_tokens_option(min_tokens_for_cp):
        raise ValueError(f"min_tokens_for_cp must be 'auto' or a non-negative integer, got {min_tokens_for_cp!r}")
    if cp_size < 2 or (not cp_on and decode_attention == AUTO):
        bound = 0 if min_tokens_for_cp == AUTO else min_tokens_for_cp
        why = "one rank: nothing to split" if cp_size < 2 else "mode=off: rows never split, all heads on every rank"
        return AttentionSplitPolicy(True, bound, bound, False, why)
    kind = kv_kind(kv_cache_dtype)
    tp_decode, measured_min, source = _MEASURED.get((cp_size, kind), _UNMEASURED)
    reasons: list[str] = []
    if decode_attention == AUTO:
        # Unsplit batches (short prefills too) take vLLM TP's head split wherever it exists.
        heads_split = heads_split_blocker is None
        if tp_decode and heads_split_blocker:
            tp_decode = False
            reasons.append(f"auto decode falls back to split: {heads_split_blocker}")
    else:
        tp_decode = decode_attention == "tp"
        heads_split = tp_decode
        reasons.append(f"decode_attention={decode_attention} (user)")
    if min_tokens_for_cp == AUTO:
        min_tokens, decode_min = measured_min, 0
    else:
        min_tokens = decode_min = min_tokens_for_cp
        reasons.append(f"min_tokens_for_cp={min_tokens} (user)")
    if decode_attention == AUTO or min_tokens_for_cp == AUTO:
        reasons.insert(0, f"N={cp_size} {kind}: {source}")
    return AttentionSplitPolicy(not tp_decode, min_tokens, decode_min, heads_split, "; ".join(reasons))
