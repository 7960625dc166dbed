// The launchers of ops.h: dtype dispatch onto the templated kernels.
#include <cuda_runtime.h>

#include "cache_write.cuh"

namespace sfpp {

template <template <class> class F, class P>
static int dispatch(DType dtype, const P& p, void* stream) {
  const auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::kF32: return int(F<float>::run(p, s));
    case DType::kF16: return int(F<__half>::run(p, s));
    case DType::kBF16: return int(F<__nv_bfloat16>::run(p, s));
  }
  return int(cudaErrorInvalidValue);
}

template <class T> struct CacheWrite {
  static cudaError_t run(const CacheWriteParams& p, cudaStream_t s) { return launch_cache_write<T>(p, s); }
};

int cache_write(const CacheWriteParams& p, void* stream) {
  if (p.head_dim % 2 || p.length == 0) return p.length == 0 ? 0 : int(cudaErrorInvalidValue);
  return dispatch<CacheWrite>(p.dtype, p, stream);
}
const char* error_string(int code) { return cudaGetErrorString(cudaError_t(code)); }

}  // namespace sfpp
