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

class Generation {
 public:
  // idx: int64 prompts (batch, length), contiguous and checked; logit_record: batch x max_new x vocab, or null.
  Generation(const PackedGPT& model, const torch::Tensor& idx, int max_new, SamplingOptions opt, uint64_t seed,
             int n_threads, float* logit_record);

  // Runs every step in one OpenMP parallel region; returns the error a callback raised, if any.
  std::exception_ptr run(const pybind11::object& callback);

  torch::Tensor tokens() const;
  int steps() const { return step_; }

 private:
  void set_rows(bool prefill);
  void advance(const pybind11::object& callback);
  void retire(const pybind11::object& rows);

  const ModelConfig& c_;
  const SamplingOptions opt_;
  const int batch_, max_new_, n_threads_, stride_;
  int length_, step_ = 0;
  float* logit_record_;
  bool stop_ = false;
  std::exception_ptr callback_error_;

  std::vector<int64_t> tokens_;  // batch x stride: prompt, then the picked tokens
  std::vector<int64_t> next_;
  std::vector<bool> retired_;  // rows the callback stopped
  std::vector<std::mt19937_64> rngs_;
  StepRows rows_;  // this step's input; rows_.samples: the samples still generating
  ForwardStep forward_;
  std::vector<TokenPicker> pickers_;  // one per thread
};

}  // namespace sampler
}  // namespace mingpt
