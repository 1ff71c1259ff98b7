#include "sampler_weights.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <set>
#include <utility>

namespace py = pybind11;

namespace mingpt {
namespace sampler {

Floats alloc_floats(size_t n) {
  const size_t bytes = std::max<size_t>(64, (n * sizeof(float) + 63) / 64 * 64);
  void* p = std::aligned_alloc(64, bytes);
  if (p == nullptr) throw std::bad_alloc();
  std::memset(p, 0, bytes);
  return Floats(static_cast<float*>(p));
}

namespace {

// A row of W into its lane of a panel, in the format's layout (sampler_kernels.h); int8 sets its scale.
void pack_row(const float* w, int cols, WeightFormat format, float* scale, uint8_t* lane, int steps) {
  const auto at = [&](int s) { return lane + size_t(s) * kLanes * 4; };  // the lane's 4 bytes of k-step s
  if (format == WeightFormat::fp32) {
    for (int k = 0; k < cols; ++k) std::memcpy(at(k), &w[k], 4);
  } else if (format == WeightFormat::bf16) {
    for (int k = 0; k < cols; ++k) {
      const uint16_t half = to_bf16(w[k]);
      std::memcpy(at(k / 2) + 2 * (k % 2), &half, 2);
    }
  } else {
    float max = 0.0f;
    for (int k = 0; k < cols; ++k) max = std::max(max, std::fabs(w[k]));
    *scale = max > 0.0f ? max / 127.0f : 0.0f;
    const float inverse = max > 0.0f ? 127.0f / max : 0.0f;
    for (int s = 0; s < steps; ++s)
      for (int j = 0; j < 4; ++j) {
        const int k = 4 * s + j;
        at(s)[j] = uint8_t(128 + (k < cols ? int(std::nearbyint(w[k] * inverse)) : 0));
      }
  }
}

PackedMatrix pack_matrix(const torch::Tensor& weight, const torch::Tensor* bias, WeightFormat format, bool portable) {
  PackedMatrix m;
  m.rows = weight.size(0);
  m.cols = weight.size(1);
  m.panels = (m.rows + kLanes - 1) / kLanes;
  m.format = format;
  m.steps = (m.cols + values_per_step(format) - 1) / values_per_step(format);
  m.kernel = kernel_for(format, portable);
  m.data = alloc_floats(size_t(m.panels) * m.steps * kLanes);
  if (format == WeightFormat::int8) {
    TORCH_CHECK_VALUE(torch::isfinite(weight).all().item<bool>(), "KVSampler: int8 weights need finite values; ",
                      "this model has inf or NaN weights");
    m.scale.assign(m.padded_rows(), 0.0f);
    // Rows past `rows` hold zero weights, stored as the offset 128.
    std::memset(m.data.get(), 128, size_t(m.panels) * m.steps * kLanes * sizeof(float));
  }
  const torch::Tensor w = weight.contiguous();
  const float* src = w.data_ptr<float>();
  for (int row = 0; row < m.rows; ++row) {
    uint8_t* lane = reinterpret_cast<uint8_t*>(m.data.get() + size_t(row / kLanes) * m.steps * kLanes + row % kLanes);
    pack_row(src + size_t(row) * m.cols, m.cols, format, m.scale.empty() ? nullptr : &m.scale[row], lane, m.steps);
  }
  m.bias.assign(m.padded_rows(), 0.0f);
  if (bias != nullptr) {
    const torch::Tensor b = bias->contiguous();
    std::copy(b.data_ptr<float>(), b.data_ptr<float>() + m.rows, m.bias.begin());
  }
  return m;
}

const py::handle config_value(const py::dict& config, const char* key) {
  TORCH_CHECK_VALUE(config.contains(key), "KVSampler: config is missing '", key,
                    "' (pass dataclasses.asdict(model.config))");
  return config[key];
}

int config_int(const py::dict& config, const char* key, int minimum = 1) {
  const py::handle value = config_value(config, key);
  TORCH_CHECK_TYPE(py::isinstance<py::int_>(value) && !py::isinstance<py::bool_>(value), "KVSampler: config '",
                   key, "' must be an int, got ", std::string(py::str(value.get_type().attr("__name__"))));
  const int64_t n = value.cast<int64_t>();
  TORCH_CHECK_VALUE(n >= minimum, "KVSampler: config '", key, "' must be >= ", minimum, ", got ", n);
  TORCH_CHECK_VALUE(n < (1 << 24), "KVSampler: config '", key, "' must be below 2^24, got ", n);
  return int(n);
}

double config_float(const py::dict& config, const char* key) {
  const py::handle value = config_value(config, key);
  TORCH_CHECK_TYPE((py::isinstance<py::float_>(value) || py::isinstance<py::int_>(value)) &&
                       !py::isinstance<py::bool_>(value),
                   "KVSampler: config '", key, "' must be a float, got ",
                   std::string(py::str(value.get_type().attr("__name__"))));
  return value.cast<double>();
}

bool config_bool(const py::dict& config, const char* key) {
  const py::handle value = config_value(config, key);
  TORCH_CHECK_TYPE(py::isinstance<py::bool_>(value), "KVSampler: config '", key, "' must be a bool, got ",
                   std::string(py::str(value.get_type().attr("__name__"))));
  return value.cast<bool>();
}

// Whether the config's choice for `key` is `option`: the other one it may be is `gpt2` (GPT-2's).
bool config_choice(const py::dict& config, const char* key, const char* gpt2, const char* option) {
  const py::handle value = config_value(config, key);
  TORCH_CHECK_TYPE(py::isinstance<py::str>(value), "KVSampler: config '", key, "' must be a str, got ",
                   std::string(py::str(value.get_type().attr("__name__"))));
  const std::string choice = value.cast<std::string>();
  TORCH_CHECK_VALUE(choice == gpt2 || choice == option, "KVSampler: config '", key, "' must be one of ", gpt2, ", ",
                    option, ", got '", choice, "'");
  return choice == option;
}

// Reads the weights of a state dict, checking that they are exactly the config's.
class WeightReader {
 public:
  WeightReader(const std::map<std::string, torch::Tensor>& weights, WeightFormat format, bool portable)
      : weights_(weights), format_(format), portable_(portable) {}

  const torch::Tensor& get(const std::string& name, std::vector<int64_t> shape) {
    const auto it = weights_.find(name);
    TORCH_CHECK_VALUE(it != weights_.end(), "KVSampler: weight '", name,
                      "' is missing: the weights are not from a model with this config");
    const torch::Tensor& t = it->second;
    TORCH_CHECK_TYPE(t.scalar_type() == torch::kFloat, "KVSampler: weight '", name,
                     "' must be float32, got ", t.scalar_type());
    TORCH_CHECK_VALUE(t.device().is_cpu(), "KVSampler: weight '", name, "' must be on the CPU, got ",
                      t.device());
    TORCH_CHECK_VALUE(t.sizes() == torch::IntArrayRef(shape), "KVSampler: weight '", name, "' has shape ",
                      t.sizes(), " but the config needs ", torch::IntArrayRef(shape));
    used_.insert(name);
    return t;
  }

  bool has(const std::string& name) const { return weights_.count(name) > 0; }

  std::vector<float> copy(const std::string& name, std::vector<int64_t> shape) {
    const torch::Tensor t = get(name, shape).contiguous();
    return std::vector<float>(t.data_ptr<float>(), t.data_ptr<float>() + t.numel());
  }

  NormWeights norm(const std::string& prefix, int n, bool bias) {
    return {copy(prefix + ".weight", {n}), bias ? copy(prefix + ".bias", {n}) : std::vector<float>(n, 0.0f)};
  }

  PackedMatrix linear(const std::string& prefix, int64_t out, int64_t in, bool bias) {
    const torch::Tensor& w = get(prefix + ".weight", {out, in});
    return pack_matrix(w, bias ? &get(prefix + ".bias", {out}) : nullptr, format_, portable_);
  }

  void check_all_used() const {
    std::string unused;
    for (const auto& kv : weights_)
      if (!used_.count(kv.first)) unused += (unused.empty() ? "" : ", ") + kv.first;
    TORCH_CHECK_VALUE(unused.empty(), "KVSampler: weights not in a model of this config: ", unused);
  }

 private:
  const std::map<std::string, torch::Tensor>& weights_;
  const WeightFormat format_;
  const bool portable_;
  std::set<std::string> used_;
};

// The head: the token embedding's packed matrix (tied), or lm_head.weight's beside a float32 embedding.
void pack_head(WeightReader& reader, WeightFormat format, bool portable, PackedGPT& g) {
  const int64_t C = g.cfg.n_embd, V = g.cfg.vocab_size;
  if (!g.cfg.tie_head) {
    g.wte = reader.copy("transformer.wte.weight", {V, C});
    g.lm_head = pack_matrix(reader.get("lm_head.weight", {V, C}), nullptr, format, portable);
    return;
  }
  const torch::Tensor& wte = reader.get("transformer.wte.weight", {V, C});
  if (reader.has("lm_head.weight")) {
    const torch::Tensor& lm = reader.get("lm_head.weight", {V, C});
    TORCH_CHECK_VALUE(lm.is_same(wte) || torch::equal(lm, wte),
                      "KVSampler: lm_head.weight differs from transformer.wte.weight, and the config has them "
                      "tied (tie_head)");
  }
  g.lm_head = pack_matrix(wte, nullptr, format, portable);
}

// cos and sin of position x 10000^(-2i / head_dim) for every position and i < head_dim / 2, computed in
// float64 and rounded, as mingpt.model.Rotary.
void rotary_tables(const ModelConfig& c, std::vector<float>& cos, std::vector<float>& sin) {
  const int half = c.head_dim / 2;
  cos.resize(size_t(c.block_size) * half);
  sin.resize(cos.size());
  for (int pos = 0; pos < c.block_size; ++pos)
    for (int i = 0; i < half; ++i) {
      const double angle = pos * std::pow(10000.0, -double(2 * i) / c.head_dim);
      cos[size_t(pos) * half + i] = float(std::cos(angle));
      sin[size_t(pos) * half + i] = float(std::sin(angle));
    }
}

}  // namespace

ModelConfig read_config(const py::dict& config) {
  static const std::set<std::string> known = {
      "n_layer", "n_head",    "n_embd",  "block_size", "vocab_size", "bias",          "layer_norm_eps", "dropout",
      "norm",    "positions", "qk_norm", "mlp",        "tie_head",   "logit_softcap", "bigram_buckets"};
  for (const auto& item : config) {
    const std::string key = py::str(item.first);
    TORCH_CHECK_VALUE(known.count(key), "KVSampler: config key '", key, "' is not one the sampler knows");
  }
  ModelConfig c;
  c.n_layer = config_int(config, "n_layer");
  c.n_head = config_int(config, "n_head");
  c.n_embd = config_int(config, "n_embd");
  c.block_size = config_int(config, "block_size");
  c.vocab_size = config_int(config, "vocab_size");
  c.bias = config_bool(config, "bias");
  const double eps = config_float(config, "layer_norm_eps");
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps > 0, "KVSampler: config 'layer_norm_eps' must be > 0, got ", eps);
  c.layer_norm_eps = float(eps);
  TORCH_CHECK_VALUE(c.n_embd % c.n_head == 0, "KVSampler: config 'n_embd' (", c.n_embd,
                    ") must be divisible by 'n_head' (", c.n_head, ")");
  c.head_dim = c.n_embd / c.n_head;
  c.rms_norm = config_choice(config, "norm", "layernorm", "rmsnorm");
  c.rotary = config_choice(config, "positions", "learned", "rotary");
  TORCH_CHECK_VALUE(!c.rotary || c.head_dim % 2 == 0, "KVSampler: config 'positions' rotary turns pairs of "
                    "channels: the head size ", c.head_dim, " must be even");
  c.qk_norm = config_bool(config, "qk_norm");
  c.relu2 = config_choice(config, "mlp", "gelu", "relu2");
  c.tie_head = config_bool(config, "tie_head");
  const double cap = config_float(config, "logit_softcap");
  TORCH_CHECK_VALUE(std::isfinite(cap) && cap >= 0, "KVSampler: config 'logit_softcap' must be a finite number "
                    ">= 0 (0: off), got ", cap);
  c.logit_softcap = float(cap);
  c.bigram_buckets = config_int(config, "bigram_buckets", 0);
  return c;
}

PackedGPT pack_gpt(const std::map<std::string, torch::Tensor>& weights, const ModelConfig& cfg, WeightFormat format,
                   bool portable) {
  const int64_t C = cfg.n_embd, hd = cfg.head_dim;
  const bool norm_bias = cfg.bias && !cfg.rms_norm;
  PackedGPT g;
  g.cfg = cfg;
  WeightReader reader(weights, format, portable);
  pack_head(reader, format, portable, g);
  if (cfg.rotary)
    rotary_tables(cfg, g.rotary_cos, g.rotary_sin);
  else
    g.wpe = reader.copy("transformer.wpe.weight", {cfg.block_size, C});
  if (cfg.bigram_buckets) g.bigram = reader.copy("bigram.weight", {cfg.bigram_buckets + 1, C});
  for (int i = 0; i < cfg.n_layer; ++i) {
    const std::string p = "transformer.h." + std::to_string(i);
    Layer layer;
    layer.ln_1 = reader.norm(p + ".ln_1", C, norm_bias);
    layer.ln_2 = reader.norm(p + ".ln_2", C, norm_bias);
    layer.qkv = reader.linear(p + ".attn.c_attn", 3 * C, C, cfg.bias);
    layer.attn_proj = reader.linear(p + ".attn.c_proj", C, C, cfg.bias);
    layer.fc = reader.linear(p + ".mlp.c_fc", 4 * C, C, cfg.bias);
    layer.mlp_proj = reader.linear(p + ".mlp.c_proj", C, 4 * C, cfg.bias);
    if (cfg.qk_norm) {
      layer.q_norm = reader.copy(p + ".attn.q_norm.weight", {hd});
      layer.k_norm = reader.copy(p + ".attn.k_norm.weight", {hd});
    }
    g.layers.push_back(std::move(layer));
  }
  g.ln_f = reader.norm("transformer.ln_f", C, norm_bias);
  reader.check_all_used();
  return g;
}

void PackedGPT::embed_token(int64_t token, float* x) const {
  const int C = cfg.n_embd;
  if (cfg.tie_head) {
    for (int c = 0; c < C; ++c) x[c] = lm_head.value(token, c);
  } else {
    std::copy(wte.begin() + token * C, wte.begin() + (token + 1) * C, x);
  }
}

const float* PackedGPT::bigram_row(int64_t previous, int64_t token) const {
  const int64_t buckets = cfg.bigram_buckets;
  const int64_t row = previous < 0 ? buckets : (previous * 1'000'003 + token) % buckets;
  return bigram.data() + row * cfg.n_embd;
}

float PackedMatrix::value(int64_t row, int k) const {
  const int per_step = values_per_step(format);
  const uint8_t* lane = reinterpret_cast<const uint8_t*>(panel(row / kLanes) + size_t(k / per_step) * kLanes + row % kLanes);
  if (per_step == 1) return *reinterpret_cast<const float*>(lane);
  if (per_step == 2) {
    const uint32_t bits = uint32_t(reinterpret_cast<const uint16_t*>(lane)[k % 2]) << 16;
    float out;
    std::memcpy(&out, &bits, sizeof out);
    return out;
  }
  return float(int(lane[k % 4]) - 128) * scale[row];
}

size_t PackedGPT::streamed_bytes() const {
  size_t n = lm_head.bytes();
  for (const Layer& l : layers) n += l.qkv.bytes() + l.attn_proj.bytes() + l.fc.bytes() + l.mlp_proj.bytes();
  return n;
}

size_t PackedGPT::bytes() const {
  size_t floats = wpe.size() + rotary_cos.size() + rotary_sin.size() + wte.size() + bigram.size() +
                  ln_f.weight.size() + ln_f.bias.size();
  for (const Layer& l : layers)
    floats += l.ln_1.weight.size() + l.ln_1.bias.size() + l.ln_2.weight.size() + l.ln_2.bias.size() +
              l.q_norm.size() + l.k_norm.size();
  return streamed_bytes() + floats * sizeof(float);
}

WeightFormat parse_weight_format(const std::string& name) {
  if (name == "fp32") return WeightFormat::fp32;
  if (name == "bf16") return WeightFormat::bf16;
  TORCH_CHECK_VALUE(name == "int8", "KVSampler: weight_format must be 'fp32', 'bf16' or 'int8', got '", name, "'");
  return WeightFormat::int8;
}

const char* format_name(WeightFormat format) {
  return format == WeightFormat::fp32 ? "fp32" : format == WeightFormat::bf16 ? "bf16" : "int8";
}

const char* kernel_name(Kernel kernel) {
  switch (kernel) {
    case Kernel::bf16_portable: return "bf16 portable";
    case Kernel::bf16_dot: return "bf16 avx512_bf16";
    case Kernel::int8_portable: return "int8 portable";
    case Kernel::int8_vnni: return "int8 avx512_vnni";
    default: return "fp32";
  }
}

}  // namespace sampler
}  // namespace mingpt
