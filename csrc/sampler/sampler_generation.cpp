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

Generation::Generation(const PackedGPT& model, const torch::Tensor& idx, const torch::Tensor& guidance_idx,
                       int max_new, SamplingOptions opt, uint64_t seed, int n_threads, float* logit_record)
    : c_(model.cfg), opt_(opt), batch_(idx.size(0)), sequences_(guidance_idx.defined() ? 2 * batch_ : batch_),
      max_new_(max_new), n_threads_(n_threads), stride_(idx.size(1) + max_new), length_(idx.size(1)),
      logit_record_(logit_record),
      forward_(model, sequences_, max_step_rows(c_.block_size, sequences_, length_, max_new),
               cache_positions(c_.block_size, length_, max_new), n_threads) {
  tokens_.assign(size_t(sequences_) * stride_, 0);
  for (int s = 0; s < sequences_; ++s) {
    const int64_t* prompt = (s < batch_ ? idx : guidance_idx).data_ptr<int64_t>() + size_t(s % batch_) * length_;
    std::copy(prompt, prompt + length_, tokens_.begin() + size_t(s) * stride_);
  }
  for (int s = 0; s < batch_; ++s) {
    active_.push_back(s);
    rngs_.push_back(sample_stream(seed, s));
  }
  next_.assign(batch_, 0);
  retired_.assign(batch_, false);
  rows_.tokens.reserve(max_step_rows(c_.block_size, sequences_, length_, max_new));
  pickers_.assign(n_threads, TokenPicker(c_.vocab_size, forward_.padded_vocab()));
  set_rows(/*prefill=*/true);
}

std::exception_ptr Generation::run(const py::object& callback) {
  if (max_new_ == 0) return nullptr;
  const bool guided = sequences_ > batch_;
#pragma omp parallel num_threads(n_threads_)
  {
    const int tid = omp_get_thread_num(), nth = omp_get_num_threads();
    while (true) {
      forward_.run(rows_, tid, nth);
      const int n = active_.size();
      for (int i = part(n, tid, nth); i < part(n, tid + 1, nth); ++i) {
        const int s = active_[i];
        next_[s] = pickers_[tid].pick(forward_.logits(i), guided ? forward_.logits(n + i) : nullptr, sequence(s),
                                      length_, step_, opt_, rngs_[s]);
      }
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
  for (int s = 0; s < batch_; ++s) std::copy(sequence(s), sequence(s) + length_, dst + size_t(s) * length_);
  return out;
}

// The input rows of the next step, for the sequences of every active sample (guided: theirs, then
// their guidance sequences): the newest token, or (first step, and past the block) a prefill of the
// last min(length, block_size) tokens.
void Generation::set_rows(bool prefill) {
  const int start = std::max(0, length_ - c_.block_size);
  prefill = prefill || start > 0;
  const int first = prefill ? start : length_ - 1;
  rows_.clear();
  for (int offset = 0; offset < sequences_; offset += batch_)
    for (int s : active_) rows_.add(offset + s, first - start, sequence(offset + s) + first, length_ - first);
}

// Master thread, between steps: record the picked tokens, call back, retire finished samples.
void Generation::advance(const py::object& callback) {
  if (opt_.eos_id >= 0)
    for (int s = 0; s < sequences_; ++s) tokens_[size_t(s) * stride_ + length_] = opt_.eos_id;
  for (size_t i = 0; i < active_.size(); ++i) {
    const int s = active_[i];
    for (int seq = s; seq < sequences_; seq += batch_) tokens_[size_t(seq) * stride_ + length_] = next_[s];
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
      for (int s = 0; s < batch_; ++s) column.append(sequence(s)[length_ - 1]);
      retire(callback(column));
    } catch (...) {
      callback_error_ = std::current_exception();
    }
  }
  active_.erase(std::remove_if(active_.begin(), active_.end(),
                               [this](int s) { return next_[s] == opt_.eos_id || retired_[s]; }),
                active_.end());
  stop_ = step_ == max_new_ || active_.empty() || callback_error_ != nullptr;
  if (!stop_) set_rows(/*prefill=*/false);
}

// A callback's answer: None, or the rows to stop after this column (padded with eos_id from then on).
void Generation::retire(const py::object& rows) {
  if (rows.is_none()) return;
  for (const py::handle row : rows) {
    TORCH_CHECK_VALUE(py::isinstance<py::int_>(row) && !py::isinstance<py::bool_>(row),
                      "generate: a callback returns None or row indices, got an item ", py::repr(row).cast<std::string>());
    const int64_t s = row.cast<int64_t>();
    TORCH_CHECK_VALUE(s >= 0 && s < batch_, "generate: a callback returned row ", s, ", outside [0, ", batch_, ")");
    TORCH_CHECK_VALUE(opt_.eos_id >= 0, "generate: a callback retired rows, but there is no eos_id to pad them with");
    retired_[s] = true;
  }
}

}  // namespace sampler
}  // namespace mingpt
