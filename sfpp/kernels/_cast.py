"""Float conversions for kernels that round in registers, exact under Triton's interpreter too.

On a GPU these are the hardware conversions (round to nearest even). Triton's interpreter (TRITON_INTERPRET=1)
truncates fp32 -> bf16, and rounds fp32 -> fp8e4nv wrongly where the mantissa carries into the exponent (-7.75 ->
-4 instead of -8) and in the subnormal range. With INTERPRET the value is first rounded onto the target grid in
fp32 integer/float arithmetic, so that the conversion that follows is exact: the same result either way.
"""

import triton
import triton.language as tl


@triton.jit
def to_e4m3(x, INTERPRET: tl.constexpr):
    """fp32 x with |x| <= 448 -> float8e4nv, rounding to nearest even."""
    if INTERPRET:  # add and subtract 1.5 * 2^(ulp exponent + 23): what is left is a multiple of the ulp, ties even
        exponent = ((x.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127  # floor(log2|x|) for normal fp32
        ulp = tl.maximum(exponent, -6) - 3  # e4m3: 3 mantissa bits, subnormals below 2^-6 share the ulp 2^-9
        magic = (((ulp + 150) << 23) | 0x400000).to(tl.float32, bitcast=True)
        r = (tl.abs(x) + magic) - magic
        x = tl.where(x.to(tl.int32, bitcast=True) < 0, -r, r)  # the sign bit: -0 stays -0, as in hardware
    return x.to(tl.float8e4nv)


@triton.jit
def cast(x, DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    """fp32 x -> DTYPE, rounding to nearest even (bf16: round the low 16 bits away before truncating)."""
    if INTERPRET and DTYPE == tl.bfloat16:
        bits = x.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
        x = bits.to(tl.float32, bitcast=True)
    return x.to(DTYPE)
