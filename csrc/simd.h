// The SIMD toolkit of every C++ kernel: float vectors through GCC vector extensions (AVX2 or
// AVX-512 code from plain arithmetic under -march=native, narrower registers with the same results
// elsewhere), their loads, stores and reductions, and the one exp. The training kernels use 8 lanes
// (short rows, register-blocked products); the sampler uses 16 (one AVX-512 register per panel row).
#pragma once

#include <cstdint>
#include <cstring>

namespace mingpt {

typedef float vec8 __attribute__((vector_size(8 * sizeof(float))));
typedef int32_t ivec8 __attribute__((vector_size(8 * sizeof(int32_t))));
typedef float vec16 __attribute__((vector_size(16 * sizeof(float))));
typedef int32_t ivec16 __attribute__((vector_size(16 * sizeof(int32_t))));

template <typename V>
constexpr int lanes_of = sizeof(V) / sizeof(float);

template <typename V>
inline V load(const float* p) {
  V v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

template <typename V>
inline void store(float* p, V v) { std::memcpy(p, &v, sizeof v); }

template <typename V>
inline V splat(float x) { return V{} + x; }

inline int64_t round_up(int64_t n, int64_t multiple) { return (n + multiple - 1) / multiple * multiple; }

// Sum of the lanes in lane order (the sampler's logits depend on it bit for bit).
template <typename V>
inline float horizontal_sum(V v) {
  float t = 0.0f;
  for (int l = 0; l < lanes_of<V>; ++l) t += v[l];
  return t;
}

template <typename V>
inline float horizontal_max(V v) {
  float out = v[0];
  for (int l = 1; l < lanes_of<V>; ++l) out = v[l] > out ? v[l] : out;
  return out;
}

// 2^n for whole numbers n in [-126, 127] (and 0 for n = -127), by building the float's exponent bits.
inline float exp2_whole(float n) {
  const uint32_t bits = uint32_t(int32_t(n) + 127) << 23;
  float out;
  std::memcpy(&out, &bits, sizeof out);
  return out;
}

inline vec8 exp2_whole(vec8 n) { return (vec8)((__builtin_convertvector(n, ivec8) + 127) << 23); }

inline vec16 exp2_whole(vec16 n) { return (vec16)((__builtin_convertvector(n, ivec16) + 127) << 23); }

// exp(x) for a float or a vector of them, relative error ~2 ulp: exactly 0 below -87.7 (there 2^n
// reaches 2^-127, whose exponent bits are those of 0) and exp(88) above 88. Cephes' polynomial on the
// range reduced by ln 2 (split in two parts, so the reduction is exact); unlike std::exp it inlines and
// vectorises without -ffast-math.
template <typename F>
inline F exp_approx(F x) {
  const F lowest = F{} - 88.0f, highest = F{} + 88.0f, round_shift = F{} + 12582912.0f;  // 1.5 * 2^23
  const F clamped = x < lowest ? lowest : (x > highest ? highest : x);
  const F n = (clamped * 1.44269504088896341f + round_shift) - round_shift;  // nearest whole number
  const F r = (clamped - n * 0.693359375f) + n * 2.12194440e-4f;
  F p = F{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  return p * exp2_whole(n);
}

// Reductions over n floats, n a multiple of the lanes (rows in scratch, zero padded): four independent
// vector accumulators, so the adds pipeline instead of waiting on each other.
template <typename V>
inline float dot_padded(const float* a, const float* b, int64_t n) {
  constexpr int L = lanes_of<V>;
  V acc[4] = {};
  int64_t i = 0;
  for (; i + 4 * L <= n; i += 4 * L) {
    for (int k = 0; k < 4; ++k) acc[k] += load<V>(a + i + k * L) * load<V>(b + i + k * L);
  }
  for (; i < n; i += L) acc[0] += load<V>(a + i) * load<V>(b + i);
  return horizontal_sum((acc[0] + acc[1]) + (acc[2] + acc[3]));
}

template <typename V>
inline float sum_padded(const float* a, int64_t n) {
  constexpr int L = lanes_of<V>;
  V acc[4] = {};
  int64_t i = 0;
  for (; i + 4 * L <= n; i += 4 * L) {
    for (int k = 0; k < 4; ++k) acc[k] += load<V>(a + i + k * L);
  }
  for (; i < n; i += L) acc[0] += load<V>(a + i);
  return horizontal_sum((acc[0] + acc[1]) + (acc[2] + acc[3]));
}

}  // namespace mingpt
