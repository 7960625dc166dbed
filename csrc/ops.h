// Launch parameters of the CUDA C++ ops: raw pointers, element strides, sizes. No torch, no CUDA headers, so the
// pybind11 bindings compile with the host compiler alone.
#pragma once
#include <cstdint>

namespace sfpp {

enum class DType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

// q/k RMSNorm over the model dim, 3D RoPE (adjacent pairs) at absolute frame positions, K/V written into the ring
// rows token_index[l] (fp8 e4m3 with per-token-per-head scales when fp8), normed roped q returned in q_out.
struct CacheWriteParams {
  const void *q = nullptr, *k = nullptr, *v = nullptr;  // [B, L, H*D], model dim contiguous
  const void *norm_q = nullptr, *norm_k = nullptr;      // [H*D]
  const float *cos = nullptr, *sin = nullptr;           // [P, D/2] RoPE tables
  const int64_t *frame_pos = nullptr, *token_index = nullptr;  // [Fc], [L]
  void *k_cache = nullptr, *v_cache = nullptr;          // [B, S*T, H, D]; K head dim contiguous, V any strides
  float *k_scale = nullptr, *v_scale = nullptr;         // [B, S*T, H], heads contiguous (fp8 only)
  void* q_out = nullptr;                                // [B, L, H, D]
  int64_t batch = 0, length = 0, heads = 0, head_dim = 0, height = 0, width = 0, t_half = 0, h_half = 0;
  int64_t q_sb = 0, q_sl = 0, k_sb = 0, k_sl = 0, v_sb = 0, v_sl = 0;  // input strides (batch, token)
  int64_t c_sb = 0, c_sl = 0, c_sh = 0;  // K cache strides (batch, row, head)
  int64_t cv_sb = 0, cv_sl = 0, cv_sh = 0, cv_sd = 1;  // V cache strides (an fp8 cache keeps V's rows contiguous)
  int64_t s_sb = 0, s_sl = 0;            // scale strides (batch, row)
  int64_t o_sb = 0, o_sl = 0;            // q_out strides (batch, token)
  float eps = 1e-6f;
  DType dtype = DType::kF32;
  bool fp8 = false;
};

// Returns 0 or a CUDA error code; error_string names it.
int cache_write(const CacheWriteParams& p, void* stream);
const char* error_string(int code);

}  // namespace sfpp
