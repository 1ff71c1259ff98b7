#include "sampler_policy.h"

#include <algorithm>
#include <cmath>
#include <functional>

#include "sampler_math.h"

namespace mingpt {
namespace sampler {

std::mt19937_64 sample_stream(uint64_t seed, int sample) {
  std::seed_seq seq{uint32_t(seed), uint32_t(seed >> 32), uint32_t(sample)};
  return std::mt19937_64(seq);
}

TokenPicker::TokenPicker(int vocab_size, int padded_vocab)
    : vocab_size_(vocab_size), padded_vocab_(padded_vocab), shaped_(vocab_size), second_(vocab_size),
      scaled_(padded_vocab), weights_(padded_vocab), kth_(vocab_size), order_(vocab_size), seen_(vocab_size, 0) {}

void TokenPicker::log_softmax(const float* logits, float* out) {
  const float top = *std::max_element(logits, logits + vocab_size_);
  double total = 0.0;
  for (int v = 0; v < vocab_size_; ++v) total += std::exp(double(logits[v] - top));
  const float log_total = float(std::log(total));
  for (int v = 0; v < vocab_size_; ++v) out[v] = logits[v] - top - log_total;
}

// Each distinct token of the history once, as torch's gather/scatter does.
void TokenPicker::penalize_repetition(const int64_t* history, int history_length, float penalty, float* z) {
  for (int i = 0; i < history_length; ++i) {
    const int64_t t = history[i];
    if (seen_[t]) continue;
    seen_[t] = 1;
    z[t] = z[t] > 0 ? z[t] / penalty : z[t] * penalty;
  }
  for (int i = 0; i < history_length; ++i) seen_[history[i]] = 0;
}

void ban_repeated_ngrams(const int64_t* history, int length, int n, float* z) {
  if (length + 1 < n) return;
  const int64_t* prefix = history + length - (n - 1);
  for (int i = 0; i + n <= length; ++i)
    if (std::equal(history + i, history + i + n - 1, prefix)) z[history[i + n - 1]] = kNegInf;
}

// The logits after guidance, repetition penalty and n-gram bans: `logits` itself when all are off.
const float* TokenPicker::shape(const float* logits, const float* second, const int64_t* history,
                                int history_length, int step, const SamplingOptions& opt) {
  const bool penalized = opt.repetition_penalty != 1.0f, banning = opt.no_repeat_ngram_size > 0;
  if (second == nullptr && !penalized && !banning) return logits;
  float* z = shaped_.data();
  if (second != nullptr) {
    log_softmax(logits, z);
    log_softmax(second, second_.data());
    const float guidance = opt.guidance_at(step);
    for (int v = 0; v < vocab_size_; ++v) z[v] = second_[v] + guidance * (z[v] - second_[v]);
  } else {
    std::copy(logits, logits + vocab_size_, z);
  }
  if (penalized) penalize_repetition(history, history_length, opt.repetition_penalty, z);
  if (banning) ban_repeated_ngrams(history, history_length, opt.no_repeat_ngram_size, z);
  return z;
}

// Logits below the k-th largest become -inf.
void TokenPicker::keep_top_k(float* z, int top_k) {
  std::copy(z, z + vocab_size_, kth_.begin());
  std::nth_element(kth_.begin(), kth_.begin() + top_k - 1, kth_.end(), std::greater<float>());
  const float kth = kth_[top_k - 1];
  for (int v = 0; v < vocab_size_; ++v)
    if (z[v] < kth) z[v] = kNegInf;
}

// Zeroes the weights outside the smallest set of likeliest tokens whose mass reaches top_p of the total.
void TokenPicker::keep_top_p(const float* z, float* w, double top_p) {
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
}

int64_t TokenPicker::pick(const float* raw_logits, const float* second, const int64_t* history, int history_length,
                          int step, const SamplingOptions& opt, std::mt19937_64& rng) {
  const int V = vocab_size_;
  const float* logits = shape(raw_logits, second, history, history_length, step, opt);
  if (opt.temperature == 0.0f) return std::max_element(logits, logits + V) - logits;
  float* z = scaled_.data();
  for (int v = 0; v < V; ++v) z[v] = logits[v] / opt.temperature;
  std::fill(z + V, z + padded_vocab_, kNegInf);
  if (opt.top_k > 0 && opt.top_k < V) keep_top_k(z, opt.top_k);
  const int argmax = std::max_element(z, z + V) - z;
  const float zmax = z[argmax];
  float* w = weights_.data();
  for (int v = 0; v < padded_vocab_; v += kLanes) store(w + v, exp_approx(load<vec16>(z + v) - zmax));
  if (opt.top_p < 1.0) keep_top_p(z, w, opt.top_p);
  if (opt.min_p > 0.0f) {  // w is relative to the likeliest token's weight, 1
    for (int v = 0; v < V; ++v)
      if (w[v] < opt.min_p) w[v] = 0.0f;
  }
  double total = 0.0;
  for (int v = 0; v < V; ++v) total += w[v];
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
