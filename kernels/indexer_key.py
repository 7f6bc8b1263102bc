"""Triton: the lightning indexer's key, LayerNorm (fp32 weight and bias) then rope over its
first ``rope_dim`` dims, one launch per layer.

On CUDA the plugin ran it as a cast copy of the projection's strided slice, vLLM's fp32
LayerNorm, a cast back, and its share of vLLM's rotary kernel: three launches more a layer
than this one (the 1204j b8 decode profile on one H200, ~5 us a layer; vLLM's own V3.2 fuses
the key into its norm-rope kernel). The arithmetic is that path's: the LayerNorm in fp32,
rounded to the key's dtype, then vLLM's rotary kernel, which reads cos / sin in that dtype
and rounds each product and each sum to it. Only the LayerNorm's fp32 reduction order may
differ. Reference: :func:`indexer_key_ref`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_utils import cast_rne


@triton.jit
def _indexer_key_kernel(
    x_ptr, w_ptr, b_ptr, pos_ptr, cs_ptr, out_ptr, stride_x, stride_cs, stride_out, eps,
    DIM: tl.constexpr, ROPE: tl.constexpr, NEOX: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, DIM)
    x = tl.load(x_ptr + row * stride_x + offs).to(tl.float32)
    mean = tl.sum(x, 0) / DIM
    centered = x - mean
    rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, 0) / DIM + eps)
    dtype = out_ptr.dtype.element_ty
    normed = cast_rne(centered * rstd * tl.load(w_ptr + offs) + tl.load(b_ptr + offs), dtype)
    tl.store(out_ptr + row * stride_out + offs, normed, mask=offs >= ROPE)
    # rope: pair i is (i, i + ROPE / 2) NeoX, (2i, 2i + 1) interleaved; its cos / sin are entry i
    pair = tl.arange(0, ROPE // 2)
    if NEOX:
        first, second = pair, pair + ROPE // 2
    else:
        first, second = 2 * pair, 2 * pair + 1
    a = _normed_at(x_ptr, w_ptr, b_ptr, row, stride_x, first, mean, rstd, dtype)
    b = _normed_at(x_ptr, w_ptr, b_ptr, row, stride_x, second, mean, rstd, dtype)
    pos = tl.load(pos_ptr + row + pair * 0).to(tl.int64)
    cos = cast_rne(tl.load(cs_ptr + pos * stride_cs + pair).to(tl.float32), dtype).to(tl.float32)
    sin = cast_rne(tl.load(cs_ptr + pos * stride_cs + ROPE // 2 + pair).to(tl.float32), dtype).to(tl.float32)
    out_a = cast_rne(a * cos, dtype).to(tl.float32) - cast_rne(b * sin, dtype).to(tl.float32)
    out_b = cast_rne(b * cos, dtype).to(tl.float32) + cast_rne(a * sin, dtype).to(tl.float32)
    tl.store(out_ptr + row * stride_out + first, cast_rne(out_a, dtype))
    tl.store(out_ptr + row * stride_out + second, cast_rne(out_b, dtype))


@triton.jit
def _normed_at(x_ptr, w_ptr, b_ptr, row, stride_x, cols, mean, rstd, dtype: tl.constexpr):
    """The LayerNorm's result at ``cols``, rounded to ``dtype``, back in fp32."""
    x = tl.load(x_ptr + row * stride_x + cols).to(tl.float32)
    return cast_rne((x - mean) * rstd * tl.load(w_ptr + cols) + tl.load(b_ptr + cols), dtype).to(tl.float32)


def indexer_key_ref(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, positions: torch.Tensor,
    cos_sin_cache: torch.Tensor, rope_dim: int, neox: bool,
) -> torch.Tensor:  # fmt: skip
    """Reference: x [n, D] -> [n, D] in x's dtype: ``F.layer_norm`` in fp32 rounded to the
    dtype, then the rotary arithmetic of vLLM's kernel over dims ``[0, rope_dim)`` (cos / sin
    rows of ``cos_sin_cache`` [positions, rope_dim] in the dtype, each product and sum rounded)."""
    dtype = x.dtype
    normed = torch.nn.functional.layer_norm(x.float(), x.shape[-1:], weight.float(), bias.float(), eps).to(dtype)
    half = rope_dim // 2
    pair = torch.arange(half, device=x.device)
    first, second = (pair, pair + half) if neox else (2 * pair, 2 * pair + 1)
    rows = cos_sin_cache.to(dtype)[positions.long()]
    cos, sin = rows[:, :half].float(), rows[:, half:rope_dim].float()
    a, b = normed[:, first].float(), normed[:, second].float()

    def rounded(t: torch.Tensor) -> torch.Tensor:
        return t.to(dtype).float()

    out = normed.clone()
    out[:, first] = (rounded(a * cos) - rounded(b * sin)).to(dtype)
    out[:, second] = (rounded(b * cos) + rounded(a * sin)).to(dtype)
    return out


def indexer_key(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, positions: torch.Tensor,
    cos_sin_cache: torch.Tensor, rope_dim: int, neox: bool, use_triton: bool | None = None,
) -> torch.Tensor:  # fmt: skip
    """The indexer key of rows ``x`` [n, D] (a strided slice of a projection is fine):
    LayerNorm with fp32 ``weight`` / ``bias`` [D], then rope at ``positions`` [n] over the
    first ``rope_dim`` dims -> contiguous [n, D] in x's dtype. Triton for CUDA tensors
    (capturable), :func:`indexer_key_ref` otherwise; ``use_triton=True`` runs the kernel anyway
    (the CPU interpreter in tests)."""
    if (x.dim() != 2 or x.stride(-1) != 1 or weight.shape != x.shape[-1:] or bias.shape != x.shape[-1:]
            or positions.shape != x.shape[:1] or cos_sin_cache.dim() != 2 or cos_sin_cache.stride(-1) != 1
            or rope_dim % 2 or not 0 < rope_dim <= min(x.shape[-1], cos_sin_cache.shape[-1])):
        raise ValueError(f"indexer_key: x [n, D] with unit last stride, weight / bias [D], positions [n], "
                         f"cos_sin_cache [P, >= rope_dim] with unit last stride, even rope_dim <= D; got x "
                         f"{tuple(x.shape)} stride {x.stride()}, weight {tuple(weight.shape)}, bias "
                         f"{tuple(bias.shape)}, positions {tuple(positions.shape)}, cos_sin_cache "
                         f"{tuple(cos_sin_cache.shape)}, rope_dim {rope_dim}")  # fmt: skip
    dim = x.shape[-1]
    pow2 = dim & (dim - 1) == 0 and rope_dim & (rope_dim - 1) == 0
    if not (x.is_cuda if use_triton is None else use_triton) or x.shape[0] == 0 or not pow2:
        return indexer_key_ref(x, weight, bias, eps, positions, cos_sin_cache, rope_dim, neox)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _indexer_key_kernel[(x.shape[0],)](
        x, weight.float().contiguous(), bias.float().contiguous(), positions.contiguous(), cos_sin_cache, out,
        x.stride(0), cos_sin_cache.stride(0), out.stride(0), eps, DIM=dim, ROPE=rope_dim, NEOX=neox, num_warps=1,
    )  # fmt: skip
    return out
