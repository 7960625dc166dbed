// Fused sampler step with in-kernel noise; see ops.h (NoiseStepParams) for the formula and layout.
#pragma once
#include "dtype.cuh"
#include "ops.h"
#include "philox.cuh"

namespace sfpp {

// One thread per Philox counter: the four consecutive elements that share it.
template <class T>
__global__ void noise_step_kernel(NoiseStepParams p) {
  const int64_t row = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t first = row * 4;
  if (first >= p.numel) return;
  float noise[4];
  philox_normal4(p.counter0 + uint64_t(row), p.seed, noise);
  const T* x = static_cast<const T*>(p.x);
  const T* flow = static_cast<const T*>(p.flow);
#pragma unroll
  for (int lane = 0; lane < 4; ++lane) {
    const int64_t i = first + lane;
    if (i >= p.numel) break;
    float sigma = p.sigma_val, sigma_next = p.sigma_next_val;
    if (p.sigma_next) {  // per (batch, frame)
      const int64_t bf = (i / p.sample_size) * p.frames + (i / p.frame_size) % p.frames;
      sigma = p.sigma[bf];
      sigma_next = p.sigma_next[bf];
    }
    float x0 = to_f32(x[i]);
    if (flow) x0 -= sigma * to_f32(flow[i]);
    if (p.x0) p.x0[i] = x0;
    p.x_next[i] = (1.f - sigma_next) * x0 + sigma_next * noise[lane];
  }
}

template <class T>
cudaError_t launch_noise_step(const NoiseStepParams& p, cudaStream_t stream) {
  const int threads = 256;
  const int64_t rows = (p.numel + 3) / 4;
  noise_step_kernel<T><<<unsigned((rows + threads - 1) / threads), threads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace sfpp
