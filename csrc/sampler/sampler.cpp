// The KV-cached sampler, mingpt._C.KVSampler: one call generates every token of a batch of prompts in
// compiled code. This file holds the Python-facing class; the rest is split by job:
//   sampler_weights    the config and the weights, packed once into panels
//   sampler_math.h     panel products, layer norm, GELU, attention of one query
//   sampler_forward    one forward step of the active samples, with their KV cache
//   sampler_policy     temperature, top-k, top-p and each sample's random stream
//   sampler_generation the sequences and the step loop of one generate call
#include "sampler.h"

#include "openmp.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <map>
#include <optional>
#include <string>

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
  m.attr("SAMPLER_VERSION") = 7;  // bump with any change to KVSampler's interface (see mingpt/sample/compiled.py)
  py::class_<KVSampler>(m, "KVSampler",
                        "A GPT's weights packed for the KV-cached sampler; build once, generate many times.")
      .def(py::init<const std::map<std::string, torch::Tensor>&, const py::dict&, const std::string&, bool>(),
           py::arg("weights"), py::arg("config"), py::arg("weight_format") = "fp32", py::arg("portable") = false,
           "weights: the model's state dict (float32, CPU, nanoGPT names, lm_head tied to wte); config: "
           "dataclasses.asdict(model.config), the fields of mingpt.config.GPTConfig (n_layer, n_head, n_embd, "
           "block_size, vocab_size, bias, layer_norm_eps; dropout is ignored); weight_format: the matrices "
           "held as 'fp32' (exact), 'bf16' or 'int8' (per-row scales); activations, norms and the KV cache "
           "stay fp32. portable: read bf16 and int8 with the portable kernels (decoded to fp32) even where "
           "this build has the bf16 or VNNI dot products")
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
      .def_property_readonly("packed_bytes", &KVSampler::packed_bytes, "bytes of packed weights held")
      .def_property_readonly("streamed_bytes", &KVSampler::streamed_bytes,
                             "bytes of weights every step reads: the matrices, their biases and scales")
      .def_property_readonly("weight_format", &KVSampler::weight_format, "fp32, bf16 or int8")
      .def_property_readonly("kernel", &KVSampler::kernel, "the kernel that reads the matrices");
}
