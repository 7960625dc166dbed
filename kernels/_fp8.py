"""fp8 e4m3 conversion shared by the kernels that quantize in registers."""

import triton
import triton.language as tl


@triton.jit
def to_e4m3(x, EMULATE: tl.constexpr):
    """fp32 x with |x| <= 448 -> float8e4nv, rounding to nearest even.

    On a GPU this is the hardware conversion. Triton's interpreter (TRITON_INTERPRET=1) rounds wrongly where the
    mantissa carries into the exponent (-7.75 -> -4 instead of -8) and in the subnormal range, so with EMULATE the
    value is first rounded onto the e4m3 grid in fp32 (add and subtract 1.5 * 2^(ulp exponent + 23), which leaves
    a multiple of the ulp, ties to even) and the conversion that follows is exact. Same result, either way.
    """
    if EMULATE:
        exponent = ((x.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127  # floor(log2|x|) for normal fp32
        ulp = tl.maximum(exponent, -6) - 3  # e4m3: 3 mantissa bits, subnormals below 2^-6 share the ulp 2^-9
        magic = (((ulp + 150) << 23) | 0x400000).to(tl.float32, bitcast=True)
        r = (tl.abs(x) + magic) - magic
        x = tl.where(x.to(tl.int32, bitcast=True) < 0, -r, r)  # the sign bit: -0 stays -0, as in hardware
    return x.to(tl.float8e4nv)
