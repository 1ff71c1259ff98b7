// Shared pieces of the C++ CPU training kernels (attention, layer norm, bias+GELU, cross-entropy):
// float32/bfloat16 element access, a vectorisable exp, input checks and the dtype dispatch.
// Every kernel reads its inputs in their own dtype, computes in float32 and rounds once on store.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>

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

// Vectors of 8 floats (GCC vector extensions: AVX2 or AVX-512 code from plain arithmetic), for loops
// the compiler would not vectorise well by itself: reductions over short rows, register-blocked products.
constexpr int64_t kLanes = 8;
typedef float vec8 __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t ivec8 __attribute__((vector_size(kLanes * sizeof(int32_t))));

inline vec8 load_vec(const float* p) {
  vec8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline void store_vec(float* p, vec8 v) { std::memcpy(p, &v, sizeof v); }

// exp(x) for x <= 0 within ~2 ulp; x below -87 counts as -87 (exp = 1.6e-38, not 0). Range reduction by
// ln 2 and a degree-7 Taylor polynomial: unlike std::exp it inlines and vectorises without -ffast-math.
template <typename F>
inline F exp_taylor7(F r) {
  F p = r * (1.0f / 5040.0f) + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  return p * r + 1.0f;
}

constexpr float kLog2e = 1.44269504088896341f, kLn2High = 0.693145751953125f, kLn2Low = 1.428606765330187e-06f;

inline float exp_nonpositive(float x) {
  x = x < -87.0f ? -87.0f : x;
  const float n = std::nearbyint(x * kLog2e);
  const uint32_t scale_bits = uint32_t(int32_t(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &scale_bits, sizeof scale);
  return exp_taylor7(x - n * kLn2High - n * kLn2Low) * scale;
}

inline vec8 exp_nonpositive(vec8 x) {
  const vec8 lowest = vec8{} - 87.0f, round_shift = vec8{} + 12582912.0f;  // 1.5 * 2^23 rounds to integers
  x = x < lowest ? lowest : x;
  const vec8 n = (x * kLog2e + round_shift) - round_shift;
  const ivec8 scale_bits = (__builtin_convertvector(n, ivec8) + 127) << 23;
  return exp_taylor7(x - n * kLn2High - n * kLn2Low) * (vec8)scale_bits;
}

inline int64_t round_up(int64_t n, int64_t multiple) { return (n + multiple - 1) / multiple * multiple; }

inline float horizontal_sum(vec8 v) { return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7])); }

inline float horizontal_max(vec8 v) {
  float out = v[0];
  for (int64_t l = 1; l < kLanes; ++l) out = v[l] > out ? v[l] : out;
  return out;
}

// Reductions over n floats, n a multiple of kLanes (rows in scratch, zero padded): four independent
// vector accumulators, so the adds pipeline instead of waiting on each other.
inline float dot_padded(const float* a, const float* b, int64_t n) {
  vec8 acc[4] = {};
  int64_t i = 0;
  for (; i + 4 * kLanes <= n; i += 4 * kLanes) {
    for (int k = 0; k < 4; ++k) acc[k] += load_vec(a + i + k * kLanes) * load_vec(b + i + k * kLanes);
  }
  for (; i < n; i += kLanes) acc[0] += load_vec(a + i) * load_vec(b + i);
  return horizontal_sum((acc[0] + acc[1]) + (acc[2] + acc[3]));
}

inline float sum_padded(const float* a, int64_t n) {
  vec8 acc[4] = {};
  int64_t i = 0;
  for (; i + 4 * kLanes <= n; i += 4 * kLanes) {
    for (int k = 0; k < 4; ++k) acc[k] += load_vec(a + i + k * kLanes);
  }
  for (; i < n; i += kLanes) acc[0] += load_vec(a + i);
  return horizontal_sum((acc[0] + acc[1]) + (acc[2] + acc[3]));
}

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
