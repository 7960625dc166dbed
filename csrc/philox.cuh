// Counter-based Gaussian noise, the same stream as kernels/noise_step.py and sfpp.ops.philox_normal_ref.
#pragma once
#include <cstdint>

namespace sfpp {

// Philox4x32-10 (Salmon et al. 2011) of counter c under key (k0, k1), in place.
__host__ __device__ inline void philox4x32_10(uint32_t c[4], uint32_t k0, uint32_t k1) {
#pragma unroll
  for (int i = 0; i < 10; ++i) {
    const uint64_t pb = uint64_t(0xCD9E8D57u) * c[2];
    const uint64_t pa = uint64_t(0xD2511F53u) * c[0];
    const uint32_t c0 = uint32_t(pb >> 32) ^ c[1] ^ k0;
    const uint32_t c2 = uint32_t(pa >> 32) ^ c[3] ^ k1;
    c[1] = uint32_t(pb);
    c[3] = uint32_t(pa);
    c[0] = c0;
    c[2] = c2;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
}

// Four standard normals of one counter: u = ((w >> 8) + 0.5) / 2^24 in (0, 1), Box-Muller on (u0, u1), (u2, u3).
__device__ inline void philox_normal4(uint64_t counter, uint64_t seed, float out[4]) {
  uint32_t c[4] = {uint32_t(counter), uint32_t(counter >> 32), 0u, 0u};
  philox4x32_10(c, uint32_t(seed), uint32_t(seed >> 32));
  float u[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) u[i] = (float(c[i] >> 8) + 0.5f) * 5.9604644775390625e-08f;
#pragma unroll
  for (int i = 0; i < 4; i += 2) {
    const float r = sqrtf(-2.f * logf(u[i]));
    float s, co;
    sincosf(6.283185307179586f * u[i + 1], &s, &co);
    out[i] = r * co;
    out[i + 1] = r * s;
  }
}

}  // namespace sfpp
