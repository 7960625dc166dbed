// fp32 <-> storage dtype, rounding to nearest even as torch does.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace sfpp {

__device__ inline float to_f32(float x) { return x; }
__device__ inline float to_f32(__half x) { return __half2float(x); }
__device__ inline float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }

template <class T> __device__ inline T from_f32(float x);
template <> __device__ inline float from_f32<float>(float x) { return x; }
template <> __device__ inline __half from_f32<__half>(float x) { return __float2half_rn(x); }
template <> __device__ inline __nv_bfloat16 from_f32<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// Round through T and back: the torch path stores each intermediate in the compute dtype.
template <class T> __device__ inline float round_to(float x) { return to_f32(from_f32<T>(x)); }

}  // namespace sfpp
