// The sampler's arithmetic on packed weights: the matrix product of a matrix with a few rows, layer norm
// and RMS norm of one row, GELU and ReLU², rotary positions, and softmax attention of one query over a
// cached head.
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>

#include "sampler_weights.h"
#include "simd.h"

namespace mingpt {
namespace sampler {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// The start of share i of n items split into `parts` nearly equal shares.
inline int part(int n, int i, int parts) { return static_cast<int>(int64_t(n) * i / parts); }

// GELU, tanh approximation: 0.5 x (1 + tanh(u)) = x / (1 + exp(-2u)).
inline vec16 gelu16(vec16 x) {
  const vec16 u = 0.7978845608028654f * (x + 0.044715f * x * x * x);
  return x / (1.0f + exp_approx(-2.0f * u));
}

// ReLU squared.
inline vec16 relu2_16(vec16 x) {
  const vec16 positive = x > 0.0f ? x : vec16{};
  return positive * positive;
}

inline void layer_norm_row(const float* x, const NormWeights& ln, float eps, float* out, int n) {
  float mean = 0.0f;
#pragma omp simd reduction(+ : mean)
  for (int i = 0; i < n; ++i) mean += x[i];
  mean /= n;
  float var = 0.0f;
#pragma omp simd reduction(+ : var)
  for (int i = 0; i < n; ++i) var += (x[i] - mean) * (x[i] - mean);
  const float rstd = 1.0f / std::sqrt(var / n + eps);
  for (int i = 0; i < n; ++i) out[i] = (x[i] - mean) * rstd * ln.weight[i] + ln.bias[i];
}

// out may be x.
inline void rms_norm_row(const float* x, const float* weight, float eps, float* out, int n) {
  float squares = 0.0f;
#pragma omp simd reduction(+ : squares)
  for (int i = 0; i < n; ++i) squares += x[i] * x[i];
  const float rstd = 1.0f / std::sqrt(squares / n + eps);
  for (int i = 0; i < n; ++i) out[i] = x[i] * rstd * weight[i];
}

// The model's norm (ln_1, ln_2, ln_f) of one row: LayerNorm, or RMSNorm.
inline void norm_row(const float* x, const NormWeights& w, const ModelConfig& c, float* out) {
  if (c.rms_norm)
    rms_norm_row(x, w.weight.data(), c.layer_norm_eps, out, c.n_embd);
  else
    layer_norm_row(x, w, c.layer_norm_eps, out, c.n_embd);
}

// Rotary positions, in place: channel i of the head's first half turns with channel i of its second by
// the angle whose cos and sin are cos[i] and sin[i].
inline void rotate_head(float* x, const float* cos, const float* sin, int half) {
  for (int i = 0; i < half; ++i) {
    const float first = x[i], second = x[i + half];
    x[i] = first * cos[i] - second * sin[i];
    x[i + half] = first * sin[i] + second * cos[i];
  }
}

// This thread's share of out = in . W^T + bias for `rows` input rows of stride ld: every panel it
// owns is read once, and epilogue(row, first column, 16 values) stores each result. Panels are
// prefetched two ahead, so that the memory keeps streaming while the cores compute. The rows are
// first put in the form the matrix's kernel reads, in this thread's scratch.
template <class Epilogue>
void matmul(const PackedMatrix& m, const float* in, int ld, int rows, int tid, int nth, KernelScratch& scratch,
            Epilogue&& epilogue) {
  const int first = part(m.panels, tid, nth), last = part(m.panels, tid + 1, nth);
  if (first == last) return;
  const KernelInput input = scratch.prepare(m.kernel, in, ld, rows, m.steps);
  const TileTable& tile = tiles_of(m.kernel);
  const int tiles = (rows + kMaxTile - 1) / kMaxTile;
  vec16 acc[kMaxTile];
  for (int p = first; p < last; ++p) {
    const vec16 bias = load<vec16>(m.bias.data() + p * kLanes);
    const vec16 scale = m.scale.empty() ? vec16{} : load<vec16>(m.scale.data() + p * kLanes);
    for (int t = 0; t < tiles; ++t) {
      const int r0 = part(rows, t, tiles), r1 = part(rows, t + 1, tiles);
      tile[r1 - r0 - 1](m.panel(p), m.steps, input, r0, m.panel(std::min(p + 2, m.panels - 1)), acc);
      for (int r = r0; r < r1; ++r)
        epilogue(r, p * kLanes, m.scale.empty() ? acc[r - r0] + bias : acc[r - r0] * scale + bias);
    }
  }
}

// out = softmax(q . keys * scale) . values over the first n_keys positions of a head's cache: keys in
// blocks of 16 positions [block][dim][16], values [position][dim]. `scores` holds n_keys rounded up to 16.
inline void attend_row(const float* q, const float* keys, const float* values, int n_keys, int hd, float scale,
                       float* scores, float* out) {
  const ivec16 lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  vec16 max = splat<vec16>(kNegInf);
  for (int t0 = 0; t0 < n_keys; t0 += 4 * kLanes) {  // 4 blocks at once: independent FMA chains
    const int blocks = std::min(4, (n_keys - t0 + kLanes - 1) / kLanes);
    const float* block = keys + size_t(t0 / kLanes) * hd * kLanes;
    vec16 s[4] = {};
    for (int d = 0; d < hd; ++d)
#pragma GCC unroll 4
      for (int b = 0; b < 4; ++b)
        if (b < blocks) s[b] += q[d] * load<vec16>(block + size_t(b * hd + d) * kLanes);
    for (int b = 0; b < blocks; ++b) {
      const vec16 masked = lane < n_keys - t0 - b * kLanes ? s[b] * scale : splat<vec16>(kNegInf);
      max = masked > max ? masked : max;
      store(scores + t0 + b * kLanes, masked);
    }
  }
  const float m = horizontal_max(max);
  vec16 sum{};
  for (int t0 = 0; t0 < n_keys; t0 += kLanes) {
    const vec16 e = exp_approx(load<vec16>(scores + t0) - m);
    sum += e;
    store(scores + t0, e);
  }
  const float total = horizontal_sum(sum);
  // 16 dims at a time; lanes past hd read the next position's values and are dropped.
  for (int d0 = 0; d0 < hd; d0 += kLanes) {
    vec16 acc[4] = {};
    int k = 0;
    for (; k + 4 <= n_keys; k += 4)
#pragma GCC unroll 4
      for (int u = 0; u < 4; ++u) acc[u] += scores[k + u] * load<vec16>(values + size_t(k + u) * hd + d0);
    for (; k < n_keys; ++k) acc[0] += scores[k] * load<vec16>(values + size_t(k) * hd + d0);
    const vec16 weighted = ((acc[0] + acc[1]) + (acc[2] + acc[3])) / total;
    for (int d = d0; d < std::min(hd, d0 + kLanes); ++d) out[d] = weighted[d - d0];
  }
}

}  // namespace sampler
}  // namespace mingpt
