// The KV-cached sampler: one call generates every token of a batch of prompts in compiled code.
//
// Weights are packed once, when a KVSampler is built, into panels of 16 output rows stored
// k-major, so that a matrix times a few vectors reads each weight once per step, 16 lanes at a
// time, with one accumulator register per batch row. A generate call runs one OpenMP parallel
// region for all its steps: the threads split each matrix's panels (and the attention heads) and
// meet at a barrier between phases. Layer norm runs redundantly in every thread, which saves a
// barrier; bias, GELU and the residual add are fused into the matrix products.
//
// Context policy (the reference sampler's): the model sees at most the last block_size tokens.
// While the sequence fits the block, each step appends one position to the cache. Past the
// block the positions of every token shift, so each step re-prefills the cache from the last
// block_size tokens: the same logits as the no-cache reference, at its cost for those steps.
#include "sampler.h"

#include <omp.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <functional>
#include <limits>
#include <map>
#include <memory>
#include <random>
#include <set>
#include <string>
#include <utility>
#include <vector>

namespace py = pybind11;

namespace {

// 16 float lanes through GCC vector extensions: one AVX-512 register under -march=native on this
// machine, narrower registers (same results) where the build targets an older CPU.
typedef float v16 __attribute__((vector_size(64)));
typedef int32_t i16 __attribute__((vector_size(64)));
constexpr int kLanes = 16;
constexpr int kMaxTile = 12;  // batch rows per matrix tile: one accumulator register each
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

inline int round_up(int n, int m) { return (n + m - 1) / m * m; }
inline int part(int n, int i, int parts) { return static_cast<int>(int64_t(n) * i / parts); }
inline v16 load16(const float* p) { v16 v; std::memcpy(&v, p, sizeof v); return v; }
inline void store16(float* p, v16 v) { std::memcpy(p, &v, sizeof v); }
inline v16 splat(float x) { return v16{} + x; }

// exp: Cephes' polynomial on a range reduced by ln 2, relative error ~2 ulp; exactly 0 below -87.
inline v16 exp16(v16 x) {
  const v16 lo = splat(-87.0f), hi = splat(88.0f);
  const i16 underflow = x < lo;
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  const v16 shifter = splat(12582912.0f);  // 1.5 * 2^23: adding then subtracting it rounds
  const v16 n = (x * 1.44269504088896341f + shifter) - shifter;
  v16 r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  v16 p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const i16 two_to_n = (__builtin_convertvector(n, i16) + 127) << 23;
  const v16 result = p * (v16)two_to_n;
  return underflow ? v16{} : result;
}

// GELU, tanh approximation: 0.5 x (1 + tanh(u)) = x / (1 + exp(-2u)).
inline v16 gelu16(v16 x) {
  const v16 u = 0.7978845608028654f * (x + 0.044715f * x * x * x);
  return x / (1.0f + exp16(-2.0f * u));
}

void layer_norm(const float* x, const float* weight, const float* bias, float* out, int n) {
  float mean = 0.0f;
#pragma omp simd reduction(+ : mean)
  for (int i = 0; i < n; ++i) mean += x[i];
  mean /= n;
  float var = 0.0f;
#pragma omp simd reduction(+ : var)
  for (int i = 0; i < n; ++i) var += (x[i] - mean) * (x[i] - mean);
  const float rstd = 1.0f / std::sqrt(var / n + 1e-5f);
  for (int i = 0; i < n; ++i) out[i] = (x[i] - mean) * rstd * weight[i] + bias[i];
}

struct FreeDeleter {
  void operator()(float* p) const { std::free(p); }
};
using Floats = std::unique_ptr<float[], FreeDeleter>;

// 64-byte aligned, zero-filled.
Floats alloc_floats(size_t n) {
  const size_t bytes = std::max<size_t>(64, (n * sizeof(float) + 63) / 64 * 64);
  void* p = std::aligned_alloc(64, bytes);
  if (p == nullptr) throw std::bad_alloc();
  std::memset(p, 0, bytes);
  return Floats(static_cast<float*>(p));
}

// W (rows x cols) as ceil(rows / 16) panels; panel p holds rows 16p .. 16p+15 as [col][lane].
struct PackedMatrix {
  int rows = 0, cols = 0, panels = 0;
  Floats data;
  std::vector<float> bias;  // panels * 16 entries, zero past `rows` and in models without biases

  const float* panel(int p) const { return data.get() + size_t(p) * cols * kLanes; }
  int padded_rows() const { return panels * kLanes; }
  size_t bytes() const { return (size_t(panels) * cols * kLanes + bias.size()) * sizeof(float); }
};

PackedMatrix pack_matrix(const torch::Tensor& weight, const torch::Tensor* bias) {
  PackedMatrix m;
  m.rows = weight.size(0);
  m.cols = weight.size(1);
  m.panels = (m.rows + kLanes - 1) / kLanes;
  m.data = alloc_floats(size_t(m.panels) * m.cols * kLanes);
  const torch::Tensor w = weight.contiguous();
  const float* src = w.data_ptr<float>();
  for (int row = 0; row < m.rows; ++row) {
    float* dst = m.data.get() + size_t(row / kLanes) * m.cols * kLanes + row % kLanes;
    for (int k = 0; k < m.cols; ++k) dst[size_t(k) * kLanes] = src[size_t(row) * m.cols + k];
  }
  m.bias.assign(m.padded_rows(), 0.0f);
  if (bias != nullptr) {
    const torch::Tensor b = bias->contiguous();
    std::copy(b.data_ptr<float>(), b.data_ptr<float>() + m.rows, m.bias.begin());
  }
  return m;
}

// out[b] (16 lanes) = panel . in[b] for NB batch rows, prefetching `ahead` (a later panel) line
// by line. Small tiles split k over several accumulators so that the FMA latency does not bound them.
template <int NB>
void panel_tile(const float* panel, int cols, const float* in, int ld, const float* ahead, v16* out) {
  constexpr int kSplit = NB == 1 ? 4 : NB <= 3 ? 2 : 1;
  v16 acc[kSplit][NB];
  for (int s = 0; s < kSplit; ++s)
    for (int b = 0; b < NB; ++b) acc[s][b] = v16{};
  int k = 0;
  for (; k + kSplit <= cols; k += kSplit) {
#pragma GCC unroll 4
    for (int s = 0; s < kSplit; ++s) {
      __builtin_prefetch(ahead + size_t(k + s) * kLanes);
      const v16 w = load16(panel + size_t(k + s) * kLanes);
#pragma GCC unroll 12
      for (int b = 0; b < NB; ++b) acc[s][b] += w * in[size_t(b) * ld + k + s];
    }
  }
  for (; k < cols; ++k) {
    const v16 w = load16(panel + size_t(k) * kLanes);
    for (int b = 0; b < NB; ++b) acc[0][b] += w * in[size_t(b) * ld + k];
  }
  for (int b = 0; b < NB; ++b) {
    v16 sum = acc[0][b];
    for (int s = 1; s < kSplit; ++s) sum += acc[s][b];
    out[b] = sum;
  }
}

using TileFn = void (*)(const float*, int, const float*, int, const float*, v16*);
template <int... N>
constexpr std::array<TileFn, sizeof...(N)> tile_table(std::integer_sequence<int, N...>) {
  return {&panel_tile<N + 1>...};
}
constexpr auto kTiles = tile_table(std::make_integer_sequence<int, kMaxTile>{});

// This thread's share of out = in . W^T + bias for `rows` input rows of stride ld: every panel it
// owns is read once, and epilogue(row, first column, 16 values) stores each result. Panels are
// prefetched two ahead, so that the memory keeps streaming while the cores compute.
template <class Epilogue>
void matmul(const PackedMatrix& m, const float* in, int ld, int rows, int tid, int nth, Epilogue&& epilogue) {
  const int tiles = (rows + kMaxTile - 1) / kMaxTile;
  v16 acc[kMaxTile];
  for (int p = part(m.panels, tid, nth); p < part(m.panels, tid + 1, nth); ++p) {
    const v16 bias = load16(m.bias.data() + p * kLanes);
    for (int t = 0; t < tiles; ++t) {
      const int r0 = part(rows, t, tiles), r1 = part(rows, t + 1, tiles);
      kTiles[r1 - r0 - 1](m.panel(p), m.cols, in + size_t(r0) * ld, ld, m.panel(std::min(p + 2, m.panels - 1)), acc);
      for (int r = r0; r < r1; ++r) epilogue(r, p * kLanes, acc[r - r0] + bias);
    }
  }
}

struct Config {
  int n_layer, n_head, n_embd, block_size, vocab_size, head_dim;
  bool bias;
};

struct Layer {
  std::vector<float> ln1_weight, ln1_bias, ln2_weight, ln2_bias;
  PackedMatrix qkv, attn_proj, fc, mlp_proj;
};

struct PackedGPT {
  Config cfg;
  std::vector<float> wpe;  // block_size x n_embd
  std::vector<Layer> layers;
  std::vector<float> lnf_weight, lnf_bias;
  PackedMatrix lm_head;  // tied to the token embedding, which is read from it

  float wte(int64_t token, int c) const {
    return lm_head.panel(token / kLanes)[size_t(c) * kLanes + token % kLanes];
  }
};

// Reads the weights of a state dict, checking that they are exactly the config's.
class WeightReader {
 public:
  explicit WeightReader(const std::map<std::string, torch::Tensor>& weights) : weights_(weights) {}

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

  std::vector<float> copy(const std::string& name, std::vector<int64_t> shape) {
    const torch::Tensor t = get(name, shape).contiguous();
    return std::vector<float>(t.data_ptr<float>(), t.data_ptr<float>() + t.numel());
  }

  // A layer norm's weight, and its bias or zeros.
  std::pair<std::vector<float>, std::vector<float>> layer_norm(const std::string& prefix, int n, bool bias) {
    return {copy(prefix + ".weight", {n}), bias ? copy(prefix + ".bias", {n}) : std::vector<float>(n, 0.0f)};
  }

  PackedMatrix linear(const std::string& prefix, int64_t out, int64_t in, bool bias) {
    const torch::Tensor& w = get(prefix + ".weight", {out, in});
    return bias ? pack_matrix(w, &get(prefix + ".bias", {out})) : pack_matrix(w, nullptr);
  }

  void check_all_used() const {
    std::string unused;
    for (const auto& kv : weights_)
      if (!used_.count(kv.first)) unused += (unused.empty() ? "" : ", ") + kv.first;
    TORCH_CHECK_VALUE(unused.empty(), "KVSampler: weights not in a model of this config: ", unused);
  }

 private:
  const std::map<std::string, torch::Tensor>& weights_;
  std::set<std::string> used_;
};

PackedGPT pack_gpt(const std::map<std::string, torch::Tensor>& weights, int64_t n_layer, int64_t n_head,
                   int64_t n_embd, int64_t block_size, int64_t vocab_size, bool bias) {
  TORCH_CHECK_VALUE(n_layer >= 1 && n_head >= 1 && n_embd >= 1 && block_size >= 1 && vocab_size >= 1,
                    "KVSampler: n_layer, n_head, n_embd, block_size and vocab_size must be >= 1");
  TORCH_CHECK_VALUE(n_embd % n_head == 0, "KVSampler: n_embd (", n_embd, ") must be divisible by n_head (",
                    n_head, ")");
  const int64_t C = n_embd;
  PackedGPT g;
  g.cfg = {int(n_layer), int(n_head), int(C), int(block_size), int(vocab_size), int(C / n_head), bias};
  WeightReader reader(weights);
  const torch::Tensor& wte = reader.get("transformer.wte.weight", {vocab_size, C});
  if (weights.count("lm_head.weight")) {
    const torch::Tensor& lm = reader.get("lm_head.weight", {vocab_size, C});
    TORCH_CHECK_VALUE(lm.is_same(wte) || torch::equal(lm, wte),
                      "KVSampler: lm_head.weight differs from transformer.wte.weight; the sampler needs "
                      "the tied embedding of GPT");
  }
  g.lm_head = pack_matrix(wte, nullptr);
  g.wpe = reader.copy("transformer.wpe.weight", {block_size, C});
  for (int i = 0; i < n_layer; ++i) {
    const std::string p = "transformer.h." + std::to_string(i);
    Layer layer;
    std::tie(layer.ln1_weight, layer.ln1_bias) = reader.layer_norm(p + ".ln_1", C, bias);
    std::tie(layer.ln2_weight, layer.ln2_bias) = reader.layer_norm(p + ".ln_2", C, bias);
    layer.qkv = reader.linear(p + ".attn.c_attn", 3 * C, C, bias);
    layer.attn_proj = reader.linear(p + ".attn.c_proj", C, C, bias);
    layer.fc = reader.linear(p + ".mlp.c_fc", 4 * C, C, bias);
    layer.mlp_proj = reader.linear(p + ".mlp.c_proj", C, 4 * C, bias);
    g.layers.push_back(std::move(layer));
  }
  std::tie(g.lnf_weight, g.lnf_bias) = reader.layer_norm("transformer.ln_f", C, bias);
  reader.check_all_used();
  return g;
}

struct SamplingOptions {
  float temperature;
  int top_k;
  double top_p;
  int64_t eos_id;  // -1: none
};

// Per-thread buffers for picking tokens.
struct PickScratch {
  std::vector<float> scaled, weights, kth;
  std::vector<int> order;
};

// One generate call: the sequences, the KV cache, the activations, and the step loop.
class Generation {
 public:
  Generation(const PackedGPT& model, const torch::Tensor& idx, int max_new, SamplingOptions opt, uint64_t seed,
             int n_threads, float* logit_record)
      : g_(model), c_(model.cfg), opt_(opt), batch_(idx.size(0)), max_new_(max_new), n_threads_(n_threads),
        stride_(idx.size(1) + max_new), length_(idx.size(1)), logit_record_(logit_record) {
    const int C = c_.n_embd;
    ld_c_ = round_up(C, kLanes);
    ld_qkv_ = g_.layers[0].qkv.padded_rows();
    ld_hidden_ = g_.layers[0].fc.padded_rows();
    ld_vocab_ = g_.lm_head.padded_rows();
    // Positions the cache must hold, and the rows of the largest step (a prefill, or a window).
    const int positions = std::min(c_.block_size, length_ + max_new - 1);
    const bool slides = length_ + max_new - 1 > c_.block_size;
    ld_t_ = round_up(std::max(positions, length_), kLanes);
    max_rows_ = batch_ * (slides ? c_.block_size : length_);
    tokens_.assign(size_t(batch_) * stride_, 0);
    const int64_t* prompt = idx.data_ptr<int64_t>();
    for (int s = 0; s < batch_; ++s)
      std::copy(prompt + size_t(s) * length_, prompt + size_t(s + 1) * length_, tokens_.begin() + size_t(s) * stride_);
    finished_.assign(batch_, 0);
    next_.assign(batch_, 0);
    for (int s = 0; s < batch_; ++s) {
      active_.push_back(s);
      std::seed_seq seq{uint32_t(seed), uint32_t(seed >> 32), uint32_t(s)};
      rngs_.emplace_back(seq);
    }
    row_tokens_.reserve(max_rows_);
    x_ = alloc_floats(size_t(max_rows_) * ld_c_);
    normed_ = alloc_floats(size_t(n_threads) * max_rows_ * ld_c_);
    qkv_ = alloc_floats(size_t(max_rows_) * ld_qkv_);
    attn_out_ = alloc_floats(size_t(max_rows_) * ld_c_);
    hidden_ = alloc_floats(size_t(max_rows_) * ld_hidden_);
    logits_ = alloc_floats(size_t(batch_) * ld_vocab_);
    head_cache_ = 2 * size_t(c_.head_dim) * ld_t_ + kLanes;  // + lanes: whole-vector reads past the end
    kv_cache_ = alloc_floats(size_t(batch_) * c_.n_layer * c_.n_head * head_cache_);
    scores_ = alloc_floats(size_t(n_threads) * ld_t_);
    scratch_.resize(n_threads);
    for (PickScratch& s : scratch_) {
      s.scaled.resize(ld_vocab_);
      s.weights.resize(ld_vocab_);
      s.kth.resize(c_.vocab_size);
      s.order.resize(c_.vocab_size);
    }
    set_rows(/*prefill=*/true);
  }

  // Runs every step; returns the error a callback raised, if any.
  std::exception_ptr run(const py::object& callback) {
    if (max_new_ == 0) return nullptr;
#pragma omp parallel num_threads(n_threads_)
    {
      const int tid = omp_get_thread_num(), nth = omp_get_num_threads();
      while (true) {
        forward(tid, nth);
        const int n = active_.size();
        for (int i = part(n, tid, nth); i < part(n, tid + 1, nth); ++i)
          next_[active_[i]] = pick(logits_.get() + size_t(i) * ld_vocab_, scratch_[tid], rngs_[active_[i]]);
#pragma omp barrier
        if (tid == 0) advance(callback);
#pragma omp barrier
        if (stop_) break;
      }
    }
    return callback_error_;
  }

  torch::Tensor tokens() const {
    torch::Tensor out = torch::empty({batch_, length_}, torch::kLong);
    int64_t* dst = out.data_ptr<int64_t>();
    for (int s = 0; s < batch_; ++s)
      std::copy(tokens_.begin() + size_t(s) * stride_, tokens_.begin() + size_t(s) * stride_ + length_,
                dst + size_t(s) * length_);
    return out;
  }

  int steps() const { return step_; }

 private:
  // The input rows of the next step: the newest token of every active sample, or (first step, and
  // past the block) a prefill of each active sample's last min(length, block_size) tokens.
  void set_rows(bool prefill) {
    const int start = std::max(0, length_ - c_.block_size);
    prefill = prefill || start > 0;
    first_pos_ = prefill ? 0 : length_ - 1;
    rows_per_sample_ = prefill ? length_ - start : 1;
    row_tokens_.clear();
    for (int s : active_)
      for (int t = 0; t < rows_per_sample_; ++t)
        row_tokens_.push_back(tokens_[size_t(s) * stride_ + (prefill ? start : length_ - 1) + t]);
  }

  void forward(int tid, int nth) {
    const int C = c_.n_embd, rows = row_tokens_.size();
    for (int r = part(rows, tid, nth); r < part(rows, tid + 1, nth); ++r) {
      const int pos = first_pos_ + r % rows_per_sample_;
      float* x = x_.get() + size_t(r) * ld_c_;
      for (int c = 0; c < C; ++c) x[c] = g_.wte(row_tokens_[r], c) + g_.wpe[size_t(pos) * C + c];
    }
#pragma omp barrier
    float* normed = normed_.get() + size_t(tid) * max_rows_ * ld_c_;
    const auto add_to_residual = [&](int r, int n0, v16 y) {
      float* x = x_.get() + size_t(r) * ld_c_ + n0;
      store16(x, load16(x) + y);
    };
    for (int l = 0; l < c_.n_layer; ++l) {
      const Layer& layer = g_.layers[l];
      for (int r = 0; r < rows; ++r)
        layer_norm(x_.get() + size_t(r) * ld_c_, layer.ln1_weight.data(), layer.ln1_bias.data(),
                   normed + size_t(r) * ld_c_, C);
      matmul(layer.qkv, normed, ld_c_, rows, tid, nth,
             [&](int r, int n0, v16 y) { store16(qkv_.get() + size_t(r) * ld_qkv_ + n0, y); });
#pragma omp barrier
      attention(l, tid, nth);
#pragma omp barrier
      matmul(layer.attn_proj, attn_out_.get(), ld_c_, rows, tid, nth, add_to_residual);
#pragma omp barrier
      for (int r = 0; r < rows; ++r)
        layer_norm(x_.get() + size_t(r) * ld_c_, layer.ln2_weight.data(), layer.ln2_bias.data(),
                   normed + size_t(r) * ld_c_, C);
      matmul(layer.fc, normed, ld_c_, rows, tid, nth,
             [&](int r, int n0, v16 y) { store16(hidden_.get() + size_t(r) * ld_hidden_ + n0, gelu16(y)); });
#pragma omp barrier
      matmul(layer.mlp_proj, hidden_.get(), ld_hidden_, rows, tid, nth, add_to_residual);
#pragma omp barrier
    }
    const int n = active_.size();  // one logit row per sample: its last
    for (int i = 0; i < n; ++i)
      layer_norm(x_.get() + size_t(i * rows_per_sample_ + rows_per_sample_ - 1) * ld_c_, g_.lnf_weight.data(),
                 g_.lnf_bias.data(), normed + size_t(i) * ld_c_, C);
    matmul(g_.lm_head, normed, ld_c_, n, tid, nth,
           [&](int i, int n0, v16 y) { store16(logits_.get() + size_t(i) * ld_vocab_ + n0, y); });
#pragma omp barrier
  }

  // Appends this step's keys and values to the cache and attends, one (sample, head) pair at a
  // time, so the rows of a prefill see each other's keys without another barrier. A pair's cache
  // holds keys in blocks of 16 positions, [block][dim][16], so that scores vectorise over
  // positions, then values [position][dim]: the first n positions of either are one prefix.
  void attention(int l, int tid, int nth) {
    const int C = c_.n_embd, H = c_.n_head, hd = c_.head_dim, pairs = active_.size() * H;
    const int end = part(pairs, tid + 1, nth), n_keys = first_pos_ + rows_per_sample_;
    const float scale = 1.0f / std::sqrt(float(hd));
    float* scores = scores_.get() + size_t(tid) * ld_t_;
    const auto cache_of = [&](int pair) {
      return kv_cache_.get() + ((size_t(active_[pair / H]) * c_.n_layer + l) * H + pair % H) * head_cache_;
    };
    for (int pair = part(pairs, tid, nth); pair < end; ++pair) {
      const int i = pair / H, h = pair % H;
      float* keys = cache_of(pair);
      float* values = keys + size_t(ld_t_) * hd;
      if (pair + 1 < end) {  // the next pair's cache, which the hardware would fetch only on demand
        const float* next = cache_of(pair + 1);
        for (int k = 0; k < round_up(n_keys, kLanes) * hd; k += kLanes) __builtin_prefetch(next + k);
        for (int k = 0; k < n_keys * hd; k += kLanes) __builtin_prefetch(next + size_t(ld_t_) * hd + k);
      }
      for (int t = 0; t < rows_per_sample_; ++t) {
        const float* src = qkv_.get() + size_t(i * rows_per_sample_ + t) * ld_qkv_ + h * hd;
        const int pos = first_pos_ + t;
        float* key = keys + size_t(pos / kLanes) * hd * kLanes + pos % kLanes;
        for (int d = 0; d < hd; ++d) {
          key[d * kLanes] = src[C + d];
          values[size_t(pos) * hd + d] = src[2 * C + d];
        }
      }
      for (int t = 0; t < rows_per_sample_; ++t) {
        const int r = i * rows_per_sample_ + t;
        attend_row(qkv_.get() + size_t(r) * ld_qkv_ + h * hd, keys, values, first_pos_ + t + 1, scale, scores,
                   attn_out_.get() + size_t(r) * ld_c_ + h * hd);
      }
    }
  }

  // out = softmax(q . keys * scale) . values over the first n_keys positions of a pair's cache.
  void attend_row(const float* q, const float* keys, const float* values, int n_keys, float scale, float* scores,
                  float* out) const {
    const int hd = c_.head_dim;
    const i16 lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    v16 max = splat(kNegInf);
    for (int t0 = 0; t0 < n_keys; t0 += 4 * kLanes) {  // 4 blocks at once: independent FMA chains
      const int blocks = std::min(4, (n_keys - t0 + kLanes - 1) / kLanes);
      const float* block = keys + size_t(t0 / kLanes) * hd * kLanes;
      v16 s[4] = {};
      for (int d = 0; d < hd; ++d)
#pragma GCC unroll 4
        for (int b = 0; b < 4; ++b)
          if (b < blocks) s[b] += q[d] * load16(block + size_t(b * hd + d) * kLanes);
      for (int b = 0; b < blocks; ++b) {
        const v16 masked = lane < n_keys - t0 - b * kLanes ? s[b] * scale : splat(kNegInf);
        max = masked > max ? masked : max;
        store16(scores + t0 + b * kLanes, masked);
      }
    }
    float m = kNegInf;
    for (int j = 0; j < kLanes; ++j) m = std::max(m, max[j]);
    v16 sum{};
    for (int t0 = 0; t0 < n_keys; t0 += kLanes) {
      const v16 e = exp16(load16(scores + t0) - m);
      sum += e;
      store16(scores + t0, e);
    }
    float total = 0.0f;
    for (int j = 0; j < kLanes; ++j) total += sum[j];
    // 16 dims at a time; lanes past hd read the next position's values and are dropped.
    for (int d0 = 0; d0 < hd; d0 += kLanes) {
      v16 acc[4] = {};
      int k = 0;
      for (; k + 4 <= n_keys; k += 4)
#pragma GCC unroll 4
        for (int u = 0; u < 4; ++u) acc[u] += scores[k + u] * load16(values + size_t(k + u) * hd + d0);
      for (; k < n_keys; ++k) acc[0] += scores[k] * load16(values + size_t(k) * hd + d0);
      const v16 weighted = ((acc[0] + acc[1]) + (acc[2] + acc[3])) / total;
      for (int d = d0; d < std::min(hd, d0 + kLanes); ++d) out[d] = weighted[d - d0];
    }
  }

  // The next token from one row of logits: temperature, top-k, top-p, as mingpt.sampling.next_token_probs.
  int64_t pick(const float* logits, PickScratch& s, std::mt19937_64& rng) const {
    const int V = c_.vocab_size;
    if (opt_.temperature == 0.0f) return std::max_element(logits, logits + V) - logits;
    float* z = s.scaled.data();
    for (int v = 0; v < V; ++v) z[v] = logits[v] / opt_.temperature;
    std::fill(z + V, z + ld_vocab_, kNegInf);
    if (opt_.top_k > 0 && opt_.top_k < V) {
      std::copy(z, z + V, s.kth.begin());
      std::nth_element(s.kth.begin(), s.kth.begin() + opt_.top_k - 1, s.kth.end(), std::greater<float>());
      const float kth = s.kth[opt_.top_k - 1];
      for (int v = 0; v < V; ++v)
        if (z[v] < kth) z[v] = kNegInf;
    }
    const int argmax = std::max_element(z, z + V) - z;
    const float zmax = z[argmax];
    float* w = s.weights.data();
    for (int v = 0; v < ld_vocab_; v += kLanes) store16(w + v, exp16(load16(z + v) - zmax));
    double total = 0.0;
    for (int v = 0; v < V; ++v) total += w[v];
    if (opt_.top_p < 1.0) {
      // Keep the smallest set of likeliest tokens whose mass reaches top_p.
      int n = 0;
      for (int v = 0; v < V; ++v)
        if (w[v] > 0.0f) s.order[n++] = v;
      std::sort(s.order.begin(), s.order.begin() + n, [z](int a, int b) { return z[a] > z[b]; });
      double before = 0.0;
      for (int i = 0; i < n; ++i) {
        const float p = w[s.order[i]];
        if (before >= opt_.top_p * total) w[s.order[i]] = 0.0f;
        before += p;
      }
      total = 0.0;
      for (int v = 0; v < V; ++v) total += w[v];
    }
    const double u = double(rng() >> 11) * 0x1.0p-53 * total;
    double cumulative = 0.0;
    for (int v = 0; v < V; ++v) {
      cumulative += w[v];
      if (u < cumulative) return v;
    }
    return argmax;  // rounding left u at the very top, or non-finite logits
  }

  // Master thread, between steps: record the picked tokens, call back, retire finished samples.
  void advance(const py::object& callback) {
    if (opt_.eos_id >= 0)
      for (int s = 0; s < batch_; ++s) tokens_[size_t(s) * stride_ + length_] = opt_.eos_id;
    for (size_t i = 0; i < active_.size(); ++i) {
      const int s = active_[i];
      tokens_[size_t(s) * stride_ + length_] = next_[s];
      finished_[s] = next_[s] == opt_.eos_id;
      if (logit_record_ != nullptr)
        std::copy(logits_.get() + i * ld_vocab_, logits_.get() + i * ld_vocab_ + c_.vocab_size,
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
    active_.erase(std::remove_if(active_.begin(), active_.end(), [this](int s) { return finished_[s] != 0; }),
                  active_.end());
    stop_ = step_ == max_new_ || active_.empty() || callback_error_ != nullptr;
    if (!stop_) set_rows(/*prefill=*/false);
  }

  const PackedGPT& g_;
  const Config& c_;
  const SamplingOptions opt_;
  const int batch_, max_new_, n_threads_, stride_;
  int length_, step_ = 0;
  float* logit_record_;  // batch x max_new x vocab, or null
  bool stop_ = false;
  std::exception_ptr callback_error_;

  std::vector<int64_t> tokens_;  // batch x stride: prompt, then the picked tokens
  std::vector<char> finished_;
  std::vector<int> active_;  // samples still generating, in batch order
  std::vector<int64_t> next_;
  std::vector<std::mt19937_64> rngs_;  // one stream per sample: the draws do not depend on threads

  // This step: rows_per_sample_ consecutive rows per active sample at positions first_pos_, ...
  std::vector<int64_t> row_tokens_;
  int first_pos_ = 0, rows_per_sample_ = 0;

  int ld_c_, ld_qkv_, ld_hidden_, ld_vocab_, ld_t_, max_rows_;
  size_t head_cache_;
  Floats x_, normed_, qkv_, attn_out_, hidden_, logits_, kv_cache_, scores_;
  std::vector<PickScratch> scratch_;
};

class KVSampler {
 public:
  KVSampler(const std::map<std::string, torch::Tensor>& weights, int64_t n_layer, int64_t n_head, int64_t n_embd,
            int64_t block_size, int64_t vocab_size, bool bias)
      : g_(pack_gpt(weights, n_layer, n_head, n_embd, block_size, vocab_size, bias)) {}

  py::object generate(const torch::Tensor& idx, int64_t max_new_tokens, double temperature, int64_t top_k,
                      double top_p, int64_t eos_id, uint64_t seed, int64_t num_threads, const py::object& callback,
                      bool record_logits) const {
    const Config& c = g_.cfg;
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
    TORCH_CHECK_VALUE(eos_id >= -1 && eos_id < c.vocab_size, "generate: eos_id must be -1 (none) or a token id "
                      "below ", c.vocab_size, ", got ", eos_id);
    TORCH_CHECK_VALUE(num_threads >= 0 && num_threads <= 1024, "generate: num_threads must be in [0, 1024] (0: "
                      "OpenMP's default), got ", num_threads);
    TORCH_CHECK_TYPE(callback.is_none() || PyCallable_Check(callback.ptr()),
                     "generate: callback must be callable or None");
    const int threads = num_threads > 0 ? int(num_threads) : omp_get_max_threads();
    const int max_new = int(std::min<int64_t>(max_new_tokens, std::numeric_limits<int>::max() - idx.size(1)));
    torch::Tensor record;
    if (record_logits)
      record = torch::full({idx.size(0), max_new, c.vocab_size}, std::numeric_limits<float>::quiet_NaN());
    const SamplingOptions opt{float(temperature), int(std::min<int64_t>(top_k, c.vocab_size)), top_p, eos_id};
    Generation run(g_, prompt, max_new, opt, seed, threads, record_logits ? record.data_ptr<float>() : nullptr);
    std::exception_ptr callback_error;
    {
      py::gil_scoped_release release;
      callback_error = run.run(callback);
    }
    if (callback_error) std::rethrow_exception(callback_error);
    if (!record_logits) return py::cast(run.tokens());
    return py::make_tuple(run.tokens(), record.narrow(1, 0, run.steps()));
  }

  int64_t packed_bytes() const {
    size_t n = g_.lm_head.bytes() + (g_.wpe.size() + 2 * g_.lnf_weight.size()) * sizeof(float);
    for (const Layer& l : g_.layers)
      n += l.qkv.bytes() + l.attn_proj.bytes() + l.fc.bytes() + l.mlp_proj.bytes() +
           4 * l.ln1_weight.size() * sizeof(float);
    return n;
  }

 private:
  const PackedGPT g_;
};

}  // namespace

void init_sampler(py::module& m) {
  m.attr("SAMPLER_VERSION") = 1;  // bump with any change to KVSampler's interface (see mingpt/sampling.py)
  py::class_<KVSampler>(m, "KVSampler",
                        "A GPT's weights packed for the KV-cached sampler; build once, generate many times.")
      .def(py::init<const std::map<std::string, torch::Tensor>&, int64_t, int64_t, int64_t, int64_t, int64_t, bool>(),
           py::arg("weights"), py::arg("n_layer"), py::arg("n_head"), py::arg("n_embd"), py::arg("block_size"),
           py::arg("vocab_size"), py::arg("bias"),
           "weights: the model's state dict (float32, CPU, nanoGPT names, lm_head tied to wte)")
      .def("generate", &KVSampler::generate, py::arg("idx"), py::arg("max_new_tokens"), py::arg("temperature") = 1.0,
           py::arg("top_k") = 0, py::arg("top_p") = 1.0, py::arg("eos_id") = -1, py::arg("seed") = 0,
           py::arg("num_threads") = 0, py::arg("callback") = py::none(), py::arg("record_logits") = false,
           "Continue each row of idx (int64, (batch, prompt_length <= block_size)) by up to max_new_tokens; a "
           "row that emits eos_id is padded with it, and the call stops when every row has. temperature 0 is "
           "greedy; top_k 0 and top_p 1 disable those filters. callback(tokens) gets each new column as a "
           "list. With record_logits, returns (tokens, logits of shape (batch, steps, vocab)), NaN for rows "
           "already finished.")
      .def_property_readonly("packed_bytes", &KVSampler::packed_bytes, "bytes of packed weights held");
}
