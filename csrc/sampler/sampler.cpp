// The KV-cached sampler, mingpt._C.KVSampler: one call generates every token of a batch of prompts in
// compiled code. This file holds the Python-facing class; the rest is split by job:
//   sampler_weights    the config and the weights, packed once into panels
//   sampler_math.h     panel products, the norms, the activations, rotary positions, attention of one query
//   sampler_forward    one forward step of the active samples, with their KV cache
//   sampler_policy     temperature, top-k, top-p and each sample's random stream
//   sampler_generation the sequences and the step loop of one generate call
// and RunningRows, a KV cache of sequences that the server's running batch steps one forward at a time.
#include "sampler.h"

#include "openmp.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <map>
#include <optional>
#include <string>

#include "sampler_forward.h"
#include "sampler_generation.h"
#include "sampler_weights.h"

namespace py = pybind11;

namespace mingpt {
namespace sampler {
namespace {

// The checks of generate's arguments, whose errors name the argument.
void check_generate_args(const ModelConfig& c, const torch::Tensor& idx, int64_t max_new_tokens, double temperature,
                         int64_t top_k, double top_p, double min_p, int64_t eos_id, int64_t num_threads,
                         const py::object& callback) {
  TORCH_CHECK_TYPE(idx.scalar_type() == torch::kLong, "generate: idx must be int64 token ids, got ",
                   idx.scalar_type());
  TORCH_CHECK_VALUE(idx.device().is_cpu(), "generate: idx must be on the CPU, got ", idx.device());
  TORCH_CHECK_VALUE(idx.dim() == 2, "generate: idx must have shape (batch, prompt_length), got ", idx.sizes());
  TORCH_CHECK_VALUE(idx.size(0) >= 1 && idx.size(1) >= 1, "generate: idx must hold at least one prompt of at "
                    "least one token, got shape ", idx.sizes());
  TORCH_CHECK_VALUE(idx.size(1) <= c.block_size, "generate: the prompt has ", idx.size(1),
                    " tokens, more than the block size ", c.block_size);
  const torch::Tensor prompt = idx.contiguous();
  const auto [lowest, highest] = std::minmax_element(prompt.data_ptr<int64_t>(),
                                                     prompt.data_ptr<int64_t>() + prompt.numel());
  TORCH_CHECK_VALUE(*lowest >= 0 && *highest < c.vocab_size, "generate: idx holds token ids outside [0, ",
                    c.vocab_size, ")");
  TORCH_CHECK_VALUE(max_new_tokens >= 0, "generate: max_new_tokens must be >= 0, got ", max_new_tokens);
  TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature >= 0, "generate: temperature must be a finite "
                    "number >= 0, got ", temperature);
  TORCH_CHECK_VALUE(top_k >= 0, "generate: top_k must be >= 0 (0: no limit), got ", top_k);
  TORCH_CHECK_VALUE(top_p > 0 && top_p <= 1, "generate: top_p must be in (0, 1], got ", top_p);
  TORCH_CHECK_VALUE(min_p >= 0 && min_p <= 1, "generate: min_p must be in [0, 1] (0: no limit), got ", min_p);
  TORCH_CHECK_VALUE(eos_id >= -1 && eos_id < c.vocab_size, "generate: eos_id must be -1 (none) or a token id "
                    "below ", c.vocab_size, ", got ", eos_id);
  TORCH_CHECK_VALUE(num_threads >= 0 && num_threads <= 1024, "generate: num_threads must be in [0, 1024] (0: "
                    "OpenMP's default), got ", num_threads);
  TORCH_CHECK_TYPE(callback.is_none() || PyCallable_Check(callback.ptr()),
                   "generate: callback must be callable or None");
}

// The logit controls (see mingpt/sample/controls.py); returns guidance's second prompts, undefined
// when guidance is off.
torch::Tensor check_controls(const ModelConfig& c, const torch::Tensor& idx, double guidance,
                             const std::optional<torch::Tensor>& guidance_idx, int64_t guidance_tokens,
                             double guidance_after, double repetition_penalty, int64_t no_repeat_ngram_size) {
  TORCH_CHECK_VALUE(std::isfinite(guidance) && guidance >= 0, "generate: guidance must be a finite number >= 0 "
                    "(1: off), got ", guidance);
  TORCH_CHECK_VALUE(guidance_tokens >= 0 && guidance_tokens <= std::numeric_limits<int>::max(), "generate: "
                    "guidance_tokens must be an integer >= 0 (0: every token), got ", guidance_tokens);
  TORCH_CHECK_VALUE(std::isfinite(guidance_after) && guidance_after >= 0, "generate: guidance_after must be a "
                    "finite number >= 0 (1: off), got ", guidance_after);
  TORCH_CHECK_VALUE(std::isfinite(repetition_penalty) && repetition_penalty > 0, "generate: repetition_penalty "
                    "must be a finite number > 0 (1: off), got ", repetition_penalty);
  TORCH_CHECK_VALUE(no_repeat_ngram_size >= 0 && no_repeat_ngram_size <= c.block_size, "generate: "
                    "no_repeat_ngram_size must be in [0, block_size] (0: off), got ", no_repeat_ngram_size);
  if (guidance == 1.0 && (guidance_tokens == 0 || guidance_after == 1.0)) return torch::Tensor();
  TORCH_CHECK_VALUE(guidance_idx.has_value(), "generate: guidance needs guidance_idx, the prompts under the "
                    "second conditioning");
  const torch::Tensor& second = *guidance_idx;
  TORCH_CHECK_VALUE(second.scalar_type() == torch::kLong && second.device().is_cpu() && second.sizes() == idx.sizes(),
                    "generate: guidance_idx must be int64 token ids on the CPU of idx's shape ", idx.sizes(),
                    ", got ", second.scalar_type(), " ", second.sizes(), " on ", second.device());
  const torch::Tensor prompts = second.contiguous();
  const auto [lowest, highest] = std::minmax_element(prompts.data_ptr<int64_t>(),
                                                     prompts.data_ptr<int64_t>() + prompts.numel());
  TORCH_CHECK_VALUE(*lowest >= 0 && *highest < c.vocab_size, "generate: guidance_idx holds token ids outside [0, ",
                    c.vocab_size, ")");
  return prompts;
}

// A KV cache of `sequences` sequences over a KVSampler's packed weights, stepped by the caller: each forward
// continues some of them, each by its own tokens from its own position (a prompt joining, a token decoded, a
// window re-read from position 0), so that sequences join and leave between steps (continuous batching).
class RunningRows {
 public:
  RunningRows(const PackedGPT& model, int64_t sequences, int64_t num_threads)
      : c_(model.cfg), sequences_(checked_sequences(sequences)), threads_(checked_threads(num_threads)),
        forward_(model, sequences_, 1, model.cfg.block_size, threads_) {}

  torch::Tensor forward(const std::vector<int64_t>& sequences, const std::vector<int64_t>& starts,
                        const std::vector<std::vector<int64_t>>& tokens) {
    const size_t n = sequences.size();
    TORCH_CHECK_VALUE(n >= 1 && starts.size() == n && tokens.size() == n, "RunningRows.forward: sequences, starts "
                      "and tokens must be lists of one equal length >= 1, got ", n, ", ", starts.size(), " and ",
                      tokens.size());
    std::vector<bool> seen(sequences_, false);
    rows_.clear();
    for (size_t i = 0; i < n; ++i) {
      const int64_t s = sequences[i], start = starts[i], count = tokens[i].size();
      TORCH_CHECK_VALUE(s >= 0 && s < sequences_ && !seen[s], "RunningRows.forward: sequences must be distinct, in "
                        "[0, ", sequences_, "), got ", s);
      seen[s] = true;
      TORCH_CHECK_VALUE(count >= 1 && start >= 0 && start + count <= c_.block_size, "RunningRows.forward: sequence ",
                        s, " continues at position ", start, " by ", count, " tokens; it must take at least one, "
                        "within the block of ", c_.block_size);
      for (const int64_t token : tokens[i])
        TORCH_CHECK_VALUE(token >= 0 && token < c_.vocab_size, "RunningRows.forward: token id ", token,
                          " is outside [0, ", c_.vocab_size, ")");
      rows_.add(int(s), int(start), tokens[i].data(), int(count));
    }
    forward_.reserve_rows(rows_.rows());
    {
      py::gil_scoped_release release;
#pragma omp parallel num_threads(threads_)
      forward_.run(rows_, omp_get_thread_num(), omp_get_num_threads());
    }
    torch::Tensor logits = torch::empty({int64_t(n), c_.vocab_size});
    for (size_t i = 0; i < n; ++i)
      std::copy(forward_.logits(i), forward_.logits(i) + c_.vocab_size, logits[i].data_ptr<float>());
    return logits;
  }

  void move(const std::vector<int64_t>& sources, const std::vector<int64_t>& targets) {
    TORCH_CHECK_VALUE(sources.size() == targets.size(), "RunningRows.move: sources and targets must be of one "
                      "length, got ", sources.size(), " and ", targets.size());
    std::vector<bool> source(sequences_, false);
    for (const int64_t s : sources) {
      TORCH_CHECK_VALUE(s >= 0 && s < sequences_, "RunningRows.move: source ", s, " is outside [0, ", sequences_, ")");
      source[s] = true;
    }
    for (const int64_t t : targets)
      TORCH_CHECK_VALUE(t >= 0 && t < sequences_ && !source[t], "RunningRows.move: target ", t, " must be in [0, ",
                        sequences_, ") and not a source");
    for (size_t i = 0; i < sources.size(); ++i) forward_.copy_cache(int(sources[i]), int(targets[i]));
  }

  int64_t sequences() const { return sequences_; }

 private:
  static int checked_sequences(int64_t sequences) {
    TORCH_CHECK_VALUE(sequences >= 1 && sequences <= (1 << 20), "running_rows: sequences must be in [1, 2^20], got ",
                      sequences);
    return int(sequences);
  }
  static int checked_threads(int64_t num_threads) {
    TORCH_CHECK_VALUE(num_threads >= 0 && num_threads <= 1024, "running_rows: num_threads must be in [0, 1024] (0: "
                      "OpenMP's default), got ", num_threads);
    return num_threads > 0 ? int(num_threads) : omp_get_max_threads();
  }

  const ModelConfig& c_;
  const int sequences_, threads_;
  ForwardStep forward_;
  StepRows rows_;
};

class KVSampler {
 public:
  KVSampler(const std::map<std::string, torch::Tensor>& weights, const py::dict& config,
            const std::string& weight_format, bool portable)
      : g_(pack_gpt(weights, read_config(config), parse_weight_format(weight_format), portable)) {}

  py::object generate(const torch::Tensor& idx, int64_t max_new_tokens, double temperature, int64_t top_k,
                      double top_p, int64_t eos_id, uint64_t seed, int64_t num_threads, const py::object& callback,
                      bool record_logits, double guidance, const std::optional<torch::Tensor>& guidance_idx,
                      int64_t guidance_tokens, double guidance_after, double repetition_penalty,
                      int64_t no_repeat_ngram_size, double min_p) const {
    const ModelConfig& c = g_.cfg;
    check_generate_args(c, idx, max_new_tokens, temperature, top_k, top_p, min_p, eos_id, num_threads, callback);
    const torch::Tensor second = check_controls(c, idx, guidance, guidance_idx, guidance_tokens, guidance_after,
                                                repetition_penalty, no_repeat_ngram_size);
    const int threads = num_threads > 0 ? int(num_threads) : omp_get_max_threads();
    const int max_new = int(std::min<int64_t>(max_new_tokens, std::numeric_limits<int>::max() - idx.size(1)));
    torch::Tensor record;
    if (record_logits)
      record = torch::full({idx.size(0), max_new, c.vocab_size}, std::numeric_limits<float>::quiet_NaN());
    const SamplingOptions opt{float(temperature), int(std::min<int64_t>(top_k, c.vocab_size)), top_p, float(min_p),
                              eos_id, float(guidance), float(repetition_penalty), int(no_repeat_ngram_size),
                              int(guidance_tokens), float(guidance_after)};
    Generation run(g_, idx.contiguous(), second, max_new, opt, seed, threads,
                   record_logits ? record.data_ptr<float>() : nullptr);
    std::exception_ptr callback_error;
    {
      py::gil_scoped_release release;
      callback_error = run.run(callback);
    }
    if (callback_error) std::rethrow_exception(callback_error);
    if (!record_logits) return py::cast(run.tokens());
    return py::make_tuple(run.tokens(), record.narrow(1, 0, run.steps()));
  }

  RunningRows running_rows(int64_t sequences, int64_t num_threads) const {
    return RunningRows(g_, sequences, num_threads);
  }

  int64_t packed_bytes() const { return g_.bytes(); }
  int64_t streamed_bytes() const { return g_.streamed_bytes(); }
  std::string weight_format() const { return format_name(g_.lm_head.format); }
  std::string kernel() const { return kernel_name(g_.lm_head.kernel); }

 private:
  const PackedGPT g_;
};

}  // namespace
}  // namespace sampler
}  // namespace mingpt

void init_sampler(py::module& m) {
  using mingpt::sampler::KVSampler;
  using mingpt::sampler::RunningRows;
  m.attr("SAMPLER_VERSION") = 9;  // bump with any change to KVSampler's interface (see mingpt/sample/compiled.py)
  py::class_<KVSampler>(m, "KVSampler",
                        "A GPT's weights packed for the KV-cached sampler; build once, generate many times.")
      .def(py::init<const std::map<std::string, torch::Tensor>&, const py::dict&, const std::string&, bool>(),
           py::arg("weights"), py::arg("config"), py::arg("weight_format") = "fp32", py::arg("portable") = false,
           "weights: the model's state dict (float32, CPU, nanoGPT names); config: dataclasses.asdict(model.config), "
           "every field of mingpt.config.GPTConfig (n_layer, n_head, n_embd, block_size, vocab_size, bias, "
           "layer_norm_eps, and the architecture options norm, positions, qk_norm, mlp, tie_head, logit_softcap, "
           "bigram_buckets; dropout is ignored); weight_format: the matrices held as 'fp32' (exact), 'bf16' or "
           "'int8' (per-row scales); activations, norms, QK-norm gains, rotary angles, the position, bigram and "
           "untied token embeddings and the KV cache stay fp32. portable: read bf16 and int8 with the portable "
           "kernels (decoded to fp32) even where this build has the bf16 or VNNI dot products")
      .def("generate", &KVSampler::generate, py::arg("idx"), py::arg("max_new_tokens"), py::arg("temperature") = 1.0,
           py::arg("top_k") = 0, py::arg("top_p") = 1.0, py::arg("eos_id") = -1, py::arg("seed") = 0,
           py::arg("num_threads") = 0, py::arg("callback") = py::none(), py::arg("record_logits") = false,
           py::kw_only(), py::arg("guidance") = 1.0, py::arg("guidance_idx") = py::none(),
           py::arg("guidance_tokens") = 0, py::arg("guidance_after") = 1.0, py::arg("repetition_penalty") = 1.0,
           py::arg("no_repeat_ngram_size") = 0, py::arg("min_p") = 0.0,
           "Continue each row of idx (int64, (batch, prompt_length <= block_size)) by up to max_new_tokens; a "
           "row that emits eos_id is padded with it, and the call stops when every row has. temperature 0 is "
           "greedy; top_k 0, top_p 1 and min_p 0 disable those filters. callback(tokens) gets each new column as a "
           "list and may return row indices to stop after it (padded with eos_id from then on). guidance (with "
           "guidance_idx), guidance_tokens, guidance_after, repetition_penalty and no_repeat_ngram_size: see "
           "mingpt/sample/controls.py. With record_logits, returns (tokens, logits of shape (batch, steps, "
           "vocab)), NaN for rows already finished.")
      .def("running_rows", &KVSampler::running_rows, py::arg("sequences"), py::arg("num_threads") = 0,
           py::keep_alive<0, 1>(),
           "A KV cache of `sequences` sequences over these weights, stepped one forward at a time (see RunningRows)")
      .def_property_readonly("packed_bytes", &KVSampler::packed_bytes, "bytes of packed weights held")
      .def_property_readonly("streamed_bytes", &KVSampler::streamed_bytes,
                             "bytes of weights every step reads: the matrices, their biases and scales")
      .def_property_readonly("weight_format", &KVSampler::weight_format, "fp32, bf16 or int8")
      .def_property_readonly("kernel", &KVSampler::kernel, "the kernel that reads the matrices");
  py::class_<RunningRows>(m, "RunningRows",
                          "A KV cache of sequences continued one forward at a time, each by its own tokens at its own "
                          "positions (continuous batching); made by KVSampler.running_rows.")
      .def("forward", &RunningRows::forward, py::arg("sequences"), py::arg("starts"), py::arg("tokens"),
           "Continue each listed sequence by its tokens (a list of ids) at positions starts[i].., after the "
           "positions before starts[i] its earlier forwards cached (0: a new sequence, or a window re-read); "
           "returns the float32 logits (len(sequences), vocab) of each one's last token.")
      .def("move", &RunningRows::move, py::arg("sources"), py::arg("targets"),
           "Copy the cache of each sequence in sources onto the sequence at the same place in targets (no target "
           "may be a source).")
      .def_property_readonly("sequences", &RunningRows::sequences, "how many sequences the cache holds");
}
