// Shared pieces of the C++ CPU training kernels (attention, layer norm, bias+GELU, cross-entropy,
// dropout): float32/bfloat16 element access, input checks and the dtype dispatch; the vectors and
// the exp are simd.h's.
// Every kernel reads its inputs in their own dtype, computes in float32 and rounds once on store.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#include "simd.h"

namespace mingpt {

using bf16 = c10::BFloat16;

inline float to_float(float x) { return x; }

inline float to_float(bf16 x) {
  uint32_t bits = uint32_t(x.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

template <typename T>
inline T from_float(float x);

template <>
inline float from_float<float>(float x) { return x; }

// Round to nearest even, as torch does; NaN stays NaN. Branch-free so that loops vectorise.
template <>
inline bf16 from_float<bf16>(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  uint16_t out = x != x ? uint16_t(0x7FC0) : uint16_t(rounded);
  return bf16(out, bf16::from_bits());
}

// The training kernels' vectors: 8 floats, enough for their short rows and register-blocked products.
constexpr int64_t kLanes = lanes_of<vec8>;

inline void check_cpu_float(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got one on ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, op, ": ", name,
              " must be float32 or bfloat16, got ", t.scalar_type());
}

inline void check_same_shape(const at::Tensor& a, const at::Tensor& b, const char* op, const char* what) {
  TORCH_CHECK(a.sizes() == b.sizes(), op, ": ", what, " has shape ", b.sizes(), ", expected ", a.sizes());
}

// Runs BODY with `scalar_t` bound to the element type of TYPE (float or bf16).
#define MINGPT_DISPATCH_FLOAT_BF16(TYPE, OP, ...)                                    \
  [&] {                                                                             \
    switch (TYPE) {                                                                 \
      case at::kFloat: { using scalar_t = float; return __VA_ARGS__(); }            \
      case at::kBFloat16: { using scalar_t = ::mingpt::bf16; return __VA_ARGS__(); } \
      default: TORCH_CHECK(false, OP, ": unsupported dtype ", TYPE);                \
    }                                                                               \
  }()

}  // namespace mingpt
