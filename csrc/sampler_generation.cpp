#include "sampler_generation.h"

#include "openmp.h"

#include <algorithm>

#include "sampler_math.h"

namespace py = pybind11;

namespace mingpt {
namespace sampler {
namespace {

// Positions the cache must hold: the prompt, and up to the block for the steps after it.
int cache_positions(int block_size, int length, int max_new) {
  return std::max(length, std::min(block_size, length + max_new - 1));
}

// Rows of the largest step: the prompt's prefill, or a whole block once the window slides.
int max_step_rows(int block_size, int batch, int length, int max_new) {
  const bool slides = length + max_new - 1 > block_size;
  return batch * (slides ? block_size : length);
}

}  // namespace

Generation::Generation(const PackedGPT& model, const torch::Tensor& idx, int max_new, SamplingOptions opt,
                       uint64_t seed, int n_threads, float* logit_record)
    : c_(model.cfg), opt_(opt), batch_(idx.size(0)), max_new_(max_new), n_threads_(n_threads),
      stride_(idx.size(1) + max_new), length_(idx.size(1)), logit_record_(logit_record),
      forward_(model, batch_, max_step_rows(c_.block_size, batch_, length_, max_new),
               cache_positions(c_.block_size, length_, max_new), n_threads) {
  tokens_.assign(size_t(batch_) * stride_, 0);
  const int64_t* prompt = idx.data_ptr<int64_t>();
  for (int s = 0; s < batch_; ++s) {
    std::copy(prompt + size_t(s) * length_, prompt + size_t(s + 1) * length_, tokens_.begin() + size_t(s) * stride_);
    rows_.samples.push_back(s);
    rngs_.push_back(sample_stream(seed, s));
  }
  next_.assign(batch_, 0);
  rows_.tokens.reserve(max_step_rows(c_.block_size, batch_, length_, max_new));
  pickers_.assign(n_threads, TokenPicker(c_.vocab_size, forward_.padded_vocab()));
  set_rows(/*prefill=*/true);
}

std::exception_ptr Generation::run(const py::object& callback) {
  if (max_new_ == 0) return nullptr;
#pragma omp parallel num_threads(n_threads_)
  {
    const int tid = omp_get_thread_num(), nth = omp_get_num_threads();
    while (true) {
      forward_.run(rows_, tid, nth);
      const std::vector<int>& active = rows_.samples;
      const int n = active.size();
      for (int i = part(n, tid, nth); i < part(n, tid + 1, nth); ++i)
        next_[active[i]] = pickers_[tid].pick(forward_.logits(i), opt_, rngs_[active[i]]);
#pragma omp barrier
      if (tid == 0) advance(callback);
#pragma omp barrier
      if (stop_) break;
    }
  }
  return callback_error_;
}

torch::Tensor Generation::tokens() const {
  torch::Tensor out = torch::empty({batch_, length_}, torch::kLong);
  int64_t* dst = out.data_ptr<int64_t>();
  for (int s = 0; s < batch_; ++s)
    std::copy(tokens_.begin() + size_t(s) * stride_, tokens_.begin() + size_t(s) * stride_ + length_,
              dst + size_t(s) * length_);
  return out;
}

// The input rows of the next step: the newest token of every active sample, or (first step, and
// past the block) a prefill of each active sample's last min(length, block_size) tokens.
void Generation::set_rows(bool prefill) {
  const int start = std::max(0, length_ - c_.block_size);
  prefill = prefill || start > 0;
  rows_.first_pos = prefill ? 0 : length_ - 1;
  rows_.per_sample = prefill ? length_ - start : 1;
  rows_.tokens.clear();
  for (int s : rows_.samples)
    for (int t = 0; t < rows_.per_sample; ++t)
      rows_.tokens.push_back(tokens_[size_t(s) * stride_ + (prefill ? start : length_ - 1) + t]);
}

// Master thread, between steps: record the picked tokens, call back, retire finished samples.
void Generation::advance(const py::object& callback) {
  std::vector<int>& active = rows_.samples;
  if (opt_.eos_id >= 0)
    for (int s = 0; s < batch_; ++s) tokens_[size_t(s) * stride_ + length_] = opt_.eos_id;
  for (size_t i = 0; i < active.size(); ++i) {
    const int s = active[i];
    tokens_[size_t(s) * stride_ + length_] = next_[s];
    if (logit_record_ != nullptr)
      std::copy(forward_.logits(i), forward_.logits(i) + c_.vocab_size,
                logit_record_ + (size_t(s) * max_new_ + step_) * c_.vocab_size);
  }
  ++length_;
  ++step_;
  if (!callback.is_none()) {
    py::gil_scoped_acquire gil;
    try {
      py::list column;
      for (int s = 0; s < batch_; ++s) column.append(tokens_[size_t(s) * stride_ + length_ - 1]);
      callback(column);
    } catch (...) {
      callback_error_ = std::current_exception();
    }
  }
  active.erase(std::remove_if(active.begin(), active.end(), [this](int s) { return next_[s] == opt_.eos_id; }),
               active.end());
  stop_ = step_ == max_new_ || active.empty() || callback_error_ != nullptr;
  if (!stop_) set_rows(/*prefill=*/false);
}

}  // namespace sampler
}  // namespace mingpt
