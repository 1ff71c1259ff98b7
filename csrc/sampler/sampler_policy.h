// The sampler's token-picking policy: temperature, top-k, top-p, and each sample's random stream.
#pragma once

#include <cstdint>
#include <random>
#include <vector>

namespace mingpt {
namespace sampler {

struct SamplingOptions {
  float temperature;         // 0: greedy
  int top_k;                 // 0: no limit
  double top_p;              // 1: no limit
  float min_p;               // 0: no limit; else tokens below min_p times the likeliest one's probability are cut
  int64_t eos_id;            // -1: none
  float guidance;            // 1: off (see mingpt/sample/controls.py for these five)
  float repetition_penalty;  // 1: off
  int no_repeat_ngram_size;  // 0: off
  int guidance_tokens;       // 0: guidance scales every new token
  float guidance_after;      // the scale after the first guidance_tokens new tokens

  // The guidance scale of the step-th new token (0: the first).
  float guidance_at(int step) const {
    return guidance_tokens == 0 || step < guidance_tokens ? guidance : guidance_after;
  }
};

// One stream per sample, from the call's seed and the sample's row: the draws do not depend on threads.
std::mt19937_64 sample_stream(uint64_t seed, int sample);

// Picks tokens from rows of logits (vocab_size values, then room up to padded_vocab, a multiple of
// 16), as mingpt.sample.controls.apply_controls, then mingpt.sample.engine.next_token_probs (temperature,
// top-k, top-p, min-p) and a draw.
// One per thread: it holds scratch.
class TokenPicker {
 public:
  TokenPicker(int vocab_size, int padded_vocab);
  // second: the logits under guidance's second conditioning, or null; history: the row's tokens so far;
  // step: how many of them are new.
  int64_t pick(const float* logits, const float* second, const int64_t* history, int history_length, int step,
               const SamplingOptions& opt, std::mt19937_64& rng);

 private:
  const float* shape(const float* logits, const float* second, const int64_t* history, int history_length,
                     int step, const SamplingOptions& opt);
  void log_softmax(const float* logits, float* out);
  void penalize_repetition(const int64_t* history, int history_length, float penalty, float* z);
  void keep_top_k(float* z, int top_k);
  void keep_top_p(const float* z, float* weights, double top_p);

  int vocab_size_, padded_vocab_;
  std::vector<float> shaped_, second_, scaled_, weights_, kth_;
  std::vector<int> order_;
  std::vector<char> seen_;
};

// Bans (sets to -inf in z) every token that would repeat an n-gram of history[0, length).
void ban_repeated_ngrams(const int64_t* history, int length, int n, float* z);

}  // namespace sampler
}  // namespace mingpt
