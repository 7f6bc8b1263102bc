"""Small Triton helpers shared by the kernels of this package (Triton >= 3.6).

Only torch and triton are imported here. fp8 (e4m3fn) encoding is done with integer
bit arithmetic so that the bytes are bit-identical to ``torch.Tensor.to(float8_e4m3fn)``
(round to nearest even) on every backend, the Triton CPU interpreter included (its native
fp8 conversion truncates). Decoding has both a native path (GPU) and a bit-arithmetic path
(interpreter); both are exact.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl


# Read once, when the kernel modules are imported: that is when ``@triton.jit`` decides
# between compiled and interpreted kernels, so the two always agree.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpreting() -> bool:
    """True when this package's Triton kernels run in the CPU interpreter
    (``TRITON_INTERPRET=1`` was set before they were imported)."""
    return _INTERPRET


def native_fp8(device: torch.device) -> bool:
    """Use the hardware fp8 conversions (GPU) rather than the bit-arithmetic ones."""
    return device.type == "cuda" and not interpreting()


def next_pow2(x: int) -> int:
    return 1 if x <= 1 else 1 << (int(x) - 1).bit_length()


@triton.jit
def pow2_round_up(x):
    """Smallest power of two >= x, for positive normal fp32 ``x`` (exact)."""
    bits = x.to(tl.int32, bitcast=True)
    exp = bits >> 23
    exp = exp + ((bits & 0x7FFFFF) != 0).to(tl.int32)
    return (exp << 23).to(tl.float32, bitcast=True)


@triton.jit
def pow2_reciprocal(p):
    """1/p for a power of two ``p`` in the normal range (exact)."""
    exp = p.to(tl.int32, bitcast=True) >> 23
    return ((254 - exp) << 23).to(tl.float32, bitcast=True)


@triton.jit
def fp32_to_e4m3_bits(x):
    """fp32 -> float8_e4m3fn byte (as int32 0..255), round to nearest even.

    Same rounding as c10's ``fp8e4m3fn_from_fp32_value``; finite values beyond 448
    saturate to +-448 like torch 2.13 does (the callers never exceed 448 after scaling).
    """
    bits = x.to(tl.int32, bitcast=True)
    sign = (bits >> 24) & 0x80
    absb = bits & 0x7FFFFFFF
    # subnormal range (|x| < 2^-6): add 2^14 as fp32 so that the fp32 rounding (RNE)
    # lands on a multiple of 2^-9, the fp8 subnormal step.
    absf = absb.to(tl.float32, bitcast=True)
    denorm = ((absf + 16384.0).to(tl.int32, bitcast=True) - (141 << 23)) & 0xFF
    mant_odd = (absb >> 20) & 1
    normal = ((absb - (120 << 23) + 0x7FFFF + mant_odd) >> 20) & 0xFF
    res = tl.where(absb < (121 << 23), denorm, normal)
    res = tl.where(absb > 0x43E00000, 0x7E, res)  # saturate to 448, as torch does
    return res | sign


@triton.jit
def quantize_rows_ue8m0(x):
    """fp32 rows [R, D] -> (e4m3fn bytes [R, D] uint8, fp32 scales [R]): per row the
    indexer recipe, scale = max(amax, 1e-4) / 448 rounded up to a power of two (correctly
    rounded division, as vLLM's kernels do), values x / scale, round to nearest even."""
    amax = tl.max(tl.abs(x), axis=1)
    scale = pow2_round_up(tl.math.div_rn(tl.maximum(amax, 1e-4), 448.0))
    return fp32_to_e4m3_bits(x * pow2_reciprocal(scale)[:, None]).to(tl.uint8), scale


@triton.jit
def e4m3_bits_to_fp32(b):
    """float8_e4m3fn byte (int32 0..255) -> fp32, exact (NaN bytes not handled)."""
    sign = (b & 0x80) << 24
    exp = (b >> 3) & 0xF
    man = b & 0x7
    normal = (sign | ((exp + 120) << 23) | (man << 20)).to(tl.float32, bitcast=True)
    sub = man.to(tl.float32) * 0.001953125  # man * 2^-9
    sub = tl.where(sign != 0, -sub, sub)
    return tl.where(exp == 0, sub, normal)


@triton.jit
def load_fp8_as_f32(ptr, mask, NATIVE: tl.constexpr):
    """Load float8_e4m3fn bytes from a uint8 pointer and return them as fp32."""
    raw = tl.load(ptr, mask=mask, other=0)
    if NATIVE:
        return raw.to(tl.float8e4nv, bitcast=True).to(tl.float32)
    else:
        return e4m3_bits_to_fp32(raw.to(tl.int32))


@triton.jit
def cast_rne(x, dtype: tl.constexpr):
    """``x.to(dtype)`` with round-to-nearest-even also for fp32 -> bf16 (the Triton
    interpreter truncates there); bit-identical to ``torch.Tensor.to``."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.float32).to(tl.int32, bitcast=True)
        r = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        return r.to(tl.int16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)


@triton.jit
def mma(a, b, acc, UPCAST: tl.constexpr):
    """``tl.dot(a, b, acc)``; with ``UPCAST`` the operands go through fp32 first (the Triton
    3.9 CPU interpreter multiplies bf16 operands as raw integers)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    else:
        return tl.dot(a, b, acc)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Multiprocessor count of a CUDA device (cached); 4 elsewhere."""
    if device.type != "cuda":
        return 4
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
