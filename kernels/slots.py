"""Top-k positions -> cache slots, one Triton pass (the torch form is the reference).

``slots[m, k] = block_table[row_req[m], pos // block_size] * block_size + pos % block_size``,
``-1`` where ``pos < 0`` or the row has no request. In torch this was a per-layer gather of
every row's block-table row plus int64 temporaries over the [rows, 2048] picks (several full
passes); here each pick is read once and each slot written once. Dispatch: Triton for CUDA
tensors, the reference elsewhere (tests force Triton under the CPU interpreter).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .attention_ref import slots_from_positions

_BLOCK_K = 1024


@triton.jit
def slots_of(idx, row, req_ptr, table_ptr, stride_table, block_size, FROM_POSITIONS: tl.constexpr):
    """``idx`` as cache slots: itself, or (positions) its request's page * block_size + offset,
    -1 where the position or the row's request is negative."""
    if FROM_POSITIONS:
        req = tl.load(req_ptr + row + idx * 0).to(tl.int64)  # the row's request, as a vector
        valid = (idx >= 0) & (req >= 0)
        block = tl.load(table_ptr + tl.maximum(req, 0) * stride_table + tl.maximum(idx, 0) // block_size,
                        mask=valid, other=0)  # fmt: skip
        idx = tl.where(valid, block.to(tl.int64) * block_size + tl.maximum(idx, 0) % block_size, -1)
    return idx


@triton.jit
def _positions_to_slots_kernel(
    pos_ptr, req_ptr, table_ptr, out_ptr, topk, stride_pos, stride_table, stride_out, block_size,
    BLOCK_K: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    in_row = offs < topk
    pos = tl.load(pos_ptr + row * stride_pos + offs, mask=in_row, other=-1).to(tl.int64)
    slot = slots_of(pos, row, req_ptr, table_ptr, stride_table, block_size, True)
    tl.store(out_ptr + row * stride_out + offs, slot.to(tl.int32), mask=in_row)


def positions_to_slots_ref(
    positions: torch.Tensor, row_req: torch.Tensor, block_table: torch.Tensor, block_size: int
) -> torch.Tensor:
    """Reference: positions [M, K] (request-local, -1 = none), row_req [M] (-1 = padding
    row), block_table [R, B] -> int32 slots [M, K]."""
    rows_table = block_table[row_req.long().clamp(min=0)]
    slots = slots_from_positions(rows_table, positions, block_size)
    return torch.where((row_req >= 0)[:, None], slots, -1).to(torch.int32)


def positions_to_slots(
    positions: torch.Tensor, row_req: torch.Tensor, block_table: torch.Tensor, block_size: int,
    use_triton: bool | None = None,
) -> torch.Tensor:
    """Triton for CUDA tensors (capturable: no host sync), :func:`positions_to_slots_ref`
    otherwise; ``use_triton=True`` runs the kernel anyway (the CPU interpreter in tests)."""
    if positions.dim() != 2 or row_req.shape != positions.shape[:1] or block_table.dim() != 2:
        raise ValueError(f"positions [M, K], row_req [M], block_table [R, B]; got "
                         f"{tuple(positions.shape)}, {tuple(row_req.shape)}, {tuple(block_table.shape)}")  # fmt: skip
    if not (positions.is_cuda if use_triton is None else use_triton) or positions.numel() == 0:
        return positions_to_slots_ref(positions, row_req, block_table, block_size)
    positions = positions if positions.stride(-1) == 1 else positions.contiguous()
    table = block_table if block_table.stride(-1) == 1 else block_table.contiguous()
    row_req = row_req.contiguous()
    num_rows, topk = positions.shape
    out = torch.empty((num_rows, topk), dtype=torch.int32, device=positions.device)
    grid = (num_rows, triton.cdiv(topk, _BLOCK_K))
    _positions_to_slots_kernel[grid](
        positions, row_req, table, out, topk, positions.stride(0), table.stride(0), out.stride(0),
        block_size, BLOCK_K=_BLOCK_K, num_warps=4,
    )  # fmt: skip
    return out
