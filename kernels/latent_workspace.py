"""An fp8_ds_mla latent cache's blocks of a batch, dequantized into a bf16 workspace.

Prefill rows can then attend with FlashMLA's bf16 sparse prefill kernel instead of its fp8
decode kernel run as one long "batch" (vLLM does the same for 32 heads per rank or more:
``MIN_HEADS_FOR_BF16_PREFILL`` in its ``flashmla_sparse.py``; under CP every rank has all
heads). The workspace follows the block table: request ``r``'s position ``p`` is row
``r * width + p`` with ``width = block_table.shape[1] * block_size``, so top-k positions map
to workspace rows without slots. Rows of block-table entries past a request's last block are
dequantized too (whatever block they name) and never picked.

Dispatch: Triton for CUDA tensors, the torch reference elsewhere (tests force Triton under the
CPU interpreter). Both give the same bytes: fp8 x fp32 scale in fp32, rounded once to bf16
(exactly: an e4m3 value times a power-of-two scale fits bf16's mantissa, barring underflow).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_utils import cast_rne, load_fp8_as_f32, native_fp8
from .kv_cache_ref import FP8_DS_MLA_ROW_BYTES, LATENT_ROW_DIM, dequantize_fp8_ds_mla

_BLOCK_T = 16


@triton.jit
def _dequant_blocks_kernel(
    cache_u8_ptr,  # uint8 view of the cache, 656 bytes per slot
    cache_f32_ptr,  # fp32 view of the same bytes (164 per slot)
    cache_bf16_ptr,  # bf16 view of the same bytes (328 per slot)
    table_ptr,  # [R * C] block ids, row-major
    out_ptr,  # [R * C * block_size, 576] bf16
    block_size,
    BLOCK_T: tl.constexpr,
    NATIVE_FP8: tl.constexpr,
):
    entry = tl.program_id(0).to(tl.int64)
    offs_t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = offs_t < block_size
    block = tl.load(table_ptr + entry).to(tl.int64)
    slot = block * block_size + offs_t
    row = entry * block_size + offs_t
    offs_d = tl.arange(0, 512)
    values = load_fp8_as_f32(cache_u8_ptr + slot[:, None] * 656 + offs_d[None, :], t_ok[:, None], NATIVE_FP8)
    scales = tl.load(cache_f32_ptr + slot[:, None] * 164 + 128 + offs_d[None, :] // 128, mask=t_ok[:, None],
                     other=0.0)  # fmt: skip
    tl.store(out_ptr + row[:, None] * 576 + offs_d[None, :], cast_rne(values * scales, tl.bfloat16),
             mask=t_ok[:, None])  # fmt: skip
    offs_r = tl.arange(0, 64)
    rope = tl.load(cache_bf16_ptr + slot[:, None] * 328 + 264 + offs_r[None, :], mask=t_ok[:, None], other=0.0)
    tl.store(out_ptr + row[:, None] * 576 + 512 + offs_r[None, :], rope, mask=t_ok[:, None])


def latent_workspace_ref(cache: torch.Tensor, block_table: torch.Tensor, block_size: int) -> torch.Tensor:
    """Reference: ``[R * C * block_size, 576]`` bf16, the blocks of ``block_table`` [R, C]
    in row-major order, each dequantized."""
    blocks = cache.view(-1, block_size, FP8_DS_MLA_ROW_BYTES)[block_table.reshape(-1).long()]
    return dequantize_fp8_ds_mla(blocks.reshape(-1, FP8_DS_MLA_ROW_BYTES)).to(torch.bfloat16)


def latent_workspace(
    cache: torch.Tensor, block_table: torch.Tensor, block_size: int, use_triton: bool | None = None
) -> torch.Tensor:
    """Triton for CUDA tensors, :func:`latent_workspace_ref` otherwise; ``use_triton=True``
    runs the kernel anyway (the CPU interpreter in tests)."""
    if cache.dtype != torch.uint8 or cache.shape[-1] != FP8_DS_MLA_ROW_BYTES or not cache.is_contiguous():
        raise ValueError(f"cache must be contiguous uint8 [..., {FP8_DS_MLA_ROW_BYTES}], got "
                         f"{cache.dtype} {tuple(cache.shape)}")  # fmt: skip
    if block_table.dim() != 2 or (cache.numel() // FP8_DS_MLA_ROW_BYTES) % block_size:
        raise ValueError(f"block_table [R, C] over {block_size}-slot blocks; got {tuple(block_table.shape)}")
    if not (cache.is_cuda if use_triton is None else use_triton) or block_table.numel() == 0:
        return latent_workspace_ref(cache, block_table, block_size)
    table = block_table.to(torch.int32).contiguous()
    out = torch.empty((table.numel() * block_size, LATENT_ROW_DIM), dtype=torch.bfloat16, device=cache.device)
    flat = cache.view(-1)
    grid = (table.numel(), triton.cdiv(block_size, _BLOCK_T))
    _dequant_blocks_kernel[grid](
        flat, flat.view(torch.float32), flat.view(torch.bfloat16), table, out, block_size,
        BLOCK_T=_BLOCK_T, NATIVE_FP8=native_fp8(cache.device), num_warps=4,
    )  # fmt: skip
    return out


def workspace_rows(positions: torch.Tensor, row_req: torch.Tensor, width: int) -> torch.Tensor:
    """int32 workspace rows ``row_req[m] * width + positions[m, k]``; -1 for -1 picks and
    rows without a request."""
    valid = (positions >= 0) & (row_req >= 0)[:, None]
    rows = row_req.to(torch.int32)[:, None] * width + positions.to(torch.int32)
    return torch.where(valid, rows, -1)
