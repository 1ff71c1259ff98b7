#include "sampler_policy.h"

#include <algorithm>
#include <functional>

#include "sampler_math.h"

namespace mingpt {
namespace sampler {

std::mt19937_64 sample_stream(uint64_t seed, int sample) {
  std::seed_seq seq{uint32_t(seed), uint32_t(seed >> 32), uint32_t(sample)};
  return std::mt19937_64(seq);
}

TokenPicker::TokenPicker(int vocab_size, int padded_vocab)
    : vocab_size_(vocab_size), padded_vocab_(padded_vocab), scaled_(padded_vocab), weights_(padded_vocab),
      kth_(vocab_size), order_(vocab_size) {}

// Logits below the k-th largest become -inf.
void TokenPicker::keep_top_k(float* z, int top_k) {
  std::copy(z, z + vocab_size_, kth_.begin());
  std::nth_element(kth_.begin(), kth_.begin() + top_k - 1, kth_.end(), std::greater<float>());
  const float kth = kth_[top_k - 1];
  for (int v = 0; v < vocab_size_; ++v)
    if (z[v] < kth) z[v] = kNegInf;
}

// Zeroes the weights outside the smallest set of likeliest tokens whose mass reaches top_p of the
// total; returns the mass kept.
double TokenPicker::keep_top_p(const float* z, float* w, double top_p) {
  double total = 0.0;
  for (int v = 0; v < vocab_size_; ++v) total += w[v];
  int n = 0;
  for (int v = 0; v < vocab_size_; ++v)
    if (w[v] > 0.0f) order_[n++] = v;
  std::sort(order_.begin(), order_.begin() + n, [z](int a, int b) { return z[a] > z[b]; });
  double before = 0.0;
  for (int i = 0; i < n; ++i) {
    const float p = w[order_[i]];
    if (before >= top_p * total) w[order_[i]] = 0.0f;
    before += p;
  }
  total = 0.0;
  for (int v = 0; v < vocab_size_; ++v) total += w[v];
  return total;
}

int64_t TokenPicker::pick(const float* logits, const SamplingOptions& opt, std::mt19937_64& rng) {
  const int V = vocab_size_;
  if (opt.temperature == 0.0f) return std::max_element(logits, logits + V) - logits;
  float* z = scaled_.data();
  for (int v = 0; v < V; ++v) z[v] = logits[v] / opt.temperature;
  std::fill(z + V, z + padded_vocab_, kNegInf);
  if (opt.top_k > 0 && opt.top_k < V) keep_top_k(z, opt.top_k);
  const int argmax = std::max_element(z, z + V) - z;
  const float zmax = z[argmax];
  float* w = weights_.data();
  for (int v = 0; v < padded_vocab_; v += kLanes) store(w + v, exp_approx(load<vec16>(z + v) - zmax));
  double total = 0.0;
  if (opt.top_p < 1.0) {
    total = keep_top_p(z, w, opt.top_p);
  } else {
    for (int v = 0; v < V; ++v) total += w[v];
  }
  const double u = double(rng() >> 11) * 0x1.0p-53 * total;
  double cumulative = 0.0;
  for (int v = 0; v < V; ++v) {
    cumulative += w[v];
    if (u < cumulative) return v;
  }
  return argmax;  // rounding left u at the very top, or non-finite logits
}

}  // namespace sampler
}  // namespace mingpt
