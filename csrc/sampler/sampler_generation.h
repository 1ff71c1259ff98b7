// One generate call's bookkeeping: the sequences, which samples are still running, the step loop.
//
// Context policy (the reference sampler's): the model sees at most the last block_size tokens.
// While the sequence fits the block, each step appends one position to the cache. Past the
// block the positions of every token shift, so each step re-prefills the cache from the last
// block_size tokens: the same logits as the no-cache reference, at its cost for those steps.
#pragma once

#include <torch/extension.h>

#include <exception>
#include <random>
#include <vector>

#include "sampler_forward.h"
#include "sampler_policy.h"
#include "sampler_weights.h"

namespace mingpt {
namespace sampler {

// Guided (guidance_idx defined), each sample s runs as two sequences: s under idx's prompt and
// batch + s under guidance_idx's; both take the token picked from the two rows of logits.
class Generation {
 public:
  // idx, guidance_idx: int64 prompts (batch, length), contiguous and checked (guidance_idx undefined:
  // unguided); logit_record: batch x max_new x vocab (the logits under idx's prompts), or null.
  Generation(const PackedGPT& model, const torch::Tensor& idx, const torch::Tensor& guidance_idx, int max_new,
             SamplingOptions opt, uint64_t seed, int n_threads, float* logit_record);

  // Runs every step in one OpenMP parallel region; returns the error a callback raised, if any.
  std::exception_ptr run(const pybind11::object& callback);

  torch::Tensor tokens() const;
  int steps() const { return step_; }

 private:
  void set_rows(bool prefill);
  const int64_t* sequence(int s) const { return tokens_.data() + size_t(s) * stride_; }
  void advance(const pybind11::object& callback);
  void retire(const pybind11::object& rows);

  const ModelConfig& c_;
  const SamplingOptions opt_;
  const int batch_, sequences_, max_new_, n_threads_, stride_;
  int length_, step_ = 0;
  float* logit_record_;
  bool stop_ = false;
  std::exception_ptr callback_error_;

  std::vector<int64_t> tokens_;  // sequences x stride: prompt, then the picked tokens
  std::vector<int> active_;      // the samples still generating
  std::vector<int64_t> next_;
  std::vector<bool> retired_;  // rows the callback stopped
  std::vector<std::mt19937_64> rngs_;
  StepRows rows_;  // this step's input; rows_.samples: the sequences of the active samples
  ForwardStep forward_;
  std::vector<TokenPicker> pickers_;  // one per thread
};

}  // namespace sampler
}  // namespace mingpt
