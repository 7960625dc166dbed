// Fused cache write; see ops.h (CacheWriteParams). One block per (token, batch row): Wan's q/k RMSNorm spans all
// heads, so the block reduces over the whole model dim; each thread then owns rotation pairs (2j, 2j+1).
#pragma once
#include <cuda_fp8.h>

#include "dtype.cuh"
#include "ops.h"

namespace sfpp {

constexpr float kFp8Max = 448.f;  // largest finite e4m3, as sfpp/kernels/fp8.py (FP8_MAX)

__device__ inline float block_sum(float v, float* shared) {  // all threads get the sum; shared has 32 floats
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // shared may still be read by a previous call
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  v = lane < int(blockDim.x / 32) ? shared[lane] : 0.f;
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <class T>
__device__ inline float rms_scale(const T* row, int64_t dim, float eps, float* shared) {
  float ss = 0.f;
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) ss += to_f32(row[i]) * to_f32(row[i]);
  return 1.f / sqrtf(block_sum(ss, shared) / float(dim) + eps);
}

// The normed, weighted, rotated pair (2j, 2j+1) of flattened pair index `pair`, each step rounded to T.
template <class T>
__device__ inline float2 norm_rope_pair(const T* row, const T* w, float r, int64_t pair, float c, float s) {
  const int64_t e = 2 * pair;
  const float x0 = round_to<T>(round_to<T>(to_f32(row[e]) * r) * to_f32(w[e]));
  const float x1 = round_to<T>(round_to<T>(to_f32(row[e + 1]) * r) * to_f32(w[e + 1]));
  return make_float2(round_to<T>(x0 * c - x1 * s), round_to<T>(x0 * s + x1 * c));
}

// Element strides of one cache: (batch, row, head, dim).
struct CacheStrides {
  int64_t b, l, h, d;
};

// Stores one head's pair into the cache, quantized against the head's amax when fp8 (amax [H] in shared memory).
template <class T>
__device__ inline void store_pair(const CacheWriteParams& p, void* cache, CacheStrides st, float* scale,
                                  const unsigned* amax, int64_t b, int64_t dst, int64_t h, int64_t j, float2 y) {
  const int64_t at = b * st.b + dst * st.l + h * st.h + 2 * j * st.d;
  if (!p.fp8) {
    static_cast<T*>(cache)[at] = from_f32<T>(y.x);
    static_cast<T*>(cache)[at + st.d] = from_f32<T>(y.y);
    return;
  }
  const float sc = fmaxf(__uint_as_float(amax[h]), 1e-12f) / kFp8Max;
  __nv_fp8_e4m3* out = static_cast<__nv_fp8_e4m3*>(cache);
  out[at] = __nv_fp8_e4m3(fminf(fmaxf(y.x / sc, -kFp8Max), kFp8Max));  // round to nearest even, as torch
  out[at + st.d] = __nv_fp8_e4m3(fminf(fmaxf(y.y / sc, -kFp8Max), kFp8Max));
  if (j == 0) scale[b * p.s_sb + dst * p.s_sl + h] = sc;
}

template <class T>
__global__ void cache_write_kernel(CacheWriteParams p) {
  extern __shared__ unsigned amax[];  // [2 * H]: per-head max |k|, |v| as float bits (non-negative: int order)
  __shared__ float red[32];
  const int64_t l = blockIdx.x, b = blockIdx.y;
  const int64_t d_half = p.head_dim / 2, dim = p.heads * p.head_dim, pairs = dim / 2;
  const T* q = static_cast<const T*>(p.q) + b * p.q_sb + l * p.q_sl;
  const T* k = static_cast<const T*>(p.k) + b * p.k_sb + l * p.k_sl;
  const T* v = static_cast<const T*>(p.v) + b * p.v_sb + l * p.v_sl;
  const float rq = rms_scale(q, dim, p.eps, red);
  const float rk = rms_scale(k, dim, p.eps, red);
  for (int64_t i = threadIdx.x; i < 2 * p.heads; i += blockDim.x) amax[i] = 0u;
  __syncthreads();

  const int64_t hw = p.height * p.width, frame = p.frame_pos[l / hw];
  const int64_t y_pos = (l / p.width) % p.height, x_pos = l % p.width, dst = p.token_index[l];
  T* q_out = static_cast<T*>(p.q_out) + b * p.o_sb + l * p.o_sl;
  for (int pass = 0; pass < (p.fp8 ? 2 : 1); ++pass) {  // fp8: the first pass finds each head's amax
    for (int64_t pair = threadIdx.x; pair < pairs; pair += blockDim.x) {
      const int64_t h = pair / d_half, j = pair % d_half;
      const int64_t pos = j < p.t_half ? frame : (j < p.t_half + p.h_half ? y_pos : x_pos);
      const float c = p.cos[pos * d_half + j], s = p.sin[pos * d_half + j];
      const float2 ky = norm_rope_pair(k, static_cast<const T*>(p.norm_k), rk, pair, c, s);
      const float2 vy = make_float2(to_f32(v[2 * pair]), to_f32(v[2 * pair + 1]));
      if (p.fp8 && pass == 0) {
        atomicMax(&amax[h], __float_as_uint(fmaxf(fabsf(ky.x), fabsf(ky.y))));
        atomicMax(&amax[p.heads + h], __float_as_uint(fmaxf(fabsf(vy.x), fabsf(vy.y))));
        continue;
      }
      store_pair<T>(p, p.k_cache, {p.c_sb, p.c_sl, p.c_sh, 1}, p.k_scale, amax, b, dst, h, j, ky);
      store_pair<T>(p, p.v_cache, {p.cv_sb, p.cv_sl, p.cv_sh, p.cv_sd}, p.v_scale, amax + p.heads, b, dst, h, j, vy);
      const float2 qy = norm_rope_pair(q, static_cast<const T*>(p.norm_q), rq, pair, c, s);
      q_out[2 * pair] = from_f32<T>(qy.x);
      q_out[2 * pair + 1] = from_f32<T>(qy.y);
    }
    __syncthreads();
  }
}

template <class T>
cudaError_t launch_cache_write(const CacheWriteParams& p, cudaStream_t stream) {
  const dim3 grid(unsigned(p.length), unsigned(p.batch));
  const size_t shared = 2 * size_t(p.heads) * sizeof(unsigned);
  cache_write_kernel<T><<<grid, 256, shared, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace sfpp
