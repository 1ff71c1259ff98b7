// The sampler's token-picking policy: temperature, top-k, top-p, and each sample's random stream.
#pragma once

#include <cstdint>
#include <random>
#include <vector>

namespace mingpt {
namespace sampler {

struct SamplingOptions {
  float temperature;  // 0: greedy
  int top_k;          // 0: no limit
  double top_p;       // 1: no limit
  int64_t eos_id;     // -1: none
};

// One stream per sample, from the call's seed and the sample's row: the draws do not depend on threads.
std::mt19937_64 sample_stream(uint64_t seed, int sample);

// Picks tokens from rows of logits (vocab_size values, then room up to padded_vocab, a multiple of
// 16), as mingpt.sampling.next_token_probs then a draw. One per thread: it holds scratch.
class TokenPicker {
 public:
  TokenPicker(int vocab_size, int padded_vocab);
  int64_t pick(const float* logits, const SamplingOptions& opt, std::mt19937_64& rng);

 private:
  void keep_top_k(float* z, int top_k);
  double keep_top_p(const float* z, float* weights, double top_p);

  int vocab_size_, padded_vocab_;
  std::vector<float> scaled_, weights_, kth_;
  std::vector<int> order_;
};

}  // namespace sampler
}  // namespace mingpt
