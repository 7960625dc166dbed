// Thin pybind11 bindings: Python (sfpp/engine/ops.py) passes raw device pointers, element strides, sizes and the CUDA
// stream as integers in a dict; no torch types cross this boundary.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "ops.h"

namespace py = pybind11;

namespace {

template <class T>
T* ptr(const py::dict& d, const char* key) {
  if (!d.contains(key) || d[key].is_none()) return nullptr;
  return reinterpret_cast<T*>(d[key].cast<std::uintptr_t>());
}

int64_t i64(const py::dict& d, const char* key) { return d[key].cast<int64_t>(); }

void check(int code, const char* op) {
  if (code != 0) throw std::runtime_error(std::string("sfpp ") + op + ": " + sfpp::error_string(code));
}

}  // namespace

PYBIND11_MODULE(_cuda_ops, m) {
  m.doc() = "sfpp CUDA C++ ops (cache write): raw pointers + strides + stream";

  m.def("cache_write", [](const py::dict& d, std::uintptr_t stream) {
    sfpp::CacheWriteParams p;
    p.q = ptr<const void>(d, "q");
    p.k = ptr<const void>(d, "k");
    p.v = ptr<const void>(d, "v");
    p.norm_q = ptr<const void>(d, "norm_q");
    p.norm_k = ptr<const void>(d, "norm_k");
    p.cos = ptr<const float>(d, "cos");
    p.sin = ptr<const float>(d, "sin");
    p.frame_pos = ptr<const int64_t>(d, "frame_pos");
    p.token_index = ptr<const int64_t>(d, "token_index");
    p.k_cache = ptr<void>(d, "k_cache");
    p.v_cache = ptr<void>(d, "v_cache");
    p.k_scale = ptr<float>(d, "k_scale");
    p.v_scale = ptr<float>(d, "v_scale");
    p.q_out = ptr<void>(d, "q_out");
    for (auto [field, key] : {std::pair{&p.batch, "batch"}, {&p.length, "length"}, {&p.heads, "heads"},
                              {&p.head_dim, "head_dim"}, {&p.height, "height"}, {&p.width, "width"},
                              {&p.t_half, "t_half"}, {&p.h_half, "h_half"}, {&p.q_sb, "q_sb"}, {&p.q_sl, "q_sl"},
                              {&p.k_sb, "k_sb"}, {&p.k_sl, "k_sl"}, {&p.v_sb, "v_sb"}, {&p.v_sl, "v_sl"},
                              {&p.c_sb, "c_sb"}, {&p.c_sl, "c_sl"}, {&p.c_sh, "c_sh"}, {&p.cv_sb, "cv_sb"},
                              {&p.cv_sl, "cv_sl"}, {&p.cv_sh, "cv_sh"}, {&p.cv_sd, "cv_sd"}, {&p.s_sb, "s_sb"},
                              {&p.s_sl, "s_sl"}, {&p.o_sb, "o_sb"}, {&p.o_sl, "o_sl"}})
      *field = i64(d, key);
    p.eps = d["eps"].cast<float>();
    p.dtype = static_cast<sfpp::DType>(i64(d, "dtype"));
    p.fp8 = p.k_scale != nullptr;
    check(sfpp::cache_write(p, reinterpret_cast<void*>(stream)), "cache_write");
  });
}
