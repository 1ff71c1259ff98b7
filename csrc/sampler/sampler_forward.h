// One forward step of the packed model over the new rows of the active samples, with their KV cache.
//
// All threads of the generate call's parallel region run a step together: they split each matrix's
// panels (and the attention heads) and meet at a barrier between phases. The norms run redundantly
// in every thread, which saves a barrier; bias, the activation and the residual add are fused into the
// matrix products. The cache holds each sequence's keys (rotated, with rotary positions), values and tokens
// (the bigram embedding reads the token before each new one).
#pragma once

#include <vector>

#include "sampler_weights.h"

namespace mingpt {
namespace sampler {

// The input rows of one step: for each of its samples (a sequence of the cache), tokens at consecutive
// positions (one to decode, a prompt to prefill, a window to re-read); the logits are of each one's last.
struct StepRows {
  std::vector<int> samples;           // the cache's sequences, in the order of their logits
  std::vector<int> first_row{0};      // sample i's rows are first_row[i] .. first_row[i + 1] - 1
  std::vector<int64_t> tokens;        // one a row
  std::vector<int> positions;         // one a row

  void clear();
  void add(int sample, int first_pos, const int64_t* sample_tokens, int count);
  int rows() const { return int(tokens.size()); }
};

class ForwardStep {
 public:
  // Buffers for `batch` samples, steps of up to max_rows rows, and a cache of `positions` positions.
  ForwardStep(const PackedGPT& model, int batch, int max_rows, int positions, int n_threads);

  // Room for steps of `rows` rows; outside the parallel region.
  void reserve_rows(int rows);
  // Copies sequence `source`'s cache (its tokens too) onto sequence `target`'s.
  void copy_cache(int source, int target);

  // Every thread of the team calls it; the logits are ready after it returns (it ends at a barrier).
  void run(const StepRows& step, int tid, int nth);

  // The logits of active sample i's last row.
  const float* logits(int i) const { return logits_.get() + size_t(i) * ld_vocab_; }
  int padded_vocab() const { return ld_vocab_; }

 private:
  void embed(const StepRows& step, int tid, int nth);
  void attention(const StepRows& step, int layer, int tid, int nth);
  void normalise_and_rotate(float* q, float* k, const Layer& layer, int pos) const;
  float* head_cache(int sample, int layer, int head) const;
  int64_t* sequence_tokens(int sample) { return tokens_.data() + size_t(sample) * c_.block_size; }

  const PackedGPT& g_;
  const ModelConfig& c_;
  const int n_threads_;
  int ld_c_, ld_qkv_, ld_hidden_, ld_vocab_, ld_t_, max_rows_ = 0;
  size_t head_cache_;
  Floats x_, normed_, qkv_, attn_out_, hidden_, logits_, kv_cache_, scores_;
  std::vector<int64_t> tokens_;  // batch x block_size: each sequence's token at each position
  std::vector<KernelScratch> scratch_;  // one per thread
};

}  // namespace sampler
}  // namespace mingpt
