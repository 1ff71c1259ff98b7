// The sampler's model: its config, read from a dict of mingpt.config.GPTConfig's fields, and its
// weights, read from a state dict and packed once (in fp32, bf16 or int8) into panels of 16 output
// rows stored k-major, so that a matrix times a few vectors reads each weight once per step, 16 lanes
// at a time. The vectors (norms, QK-norm gains), the tables read a row at a time (positions, an untied
// token embedding, the bigram embedding) and the rotary angles stay float32.
#pragma once

#include <torch/extension.h>

#include <cstdlib>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "sampler_kernels.h"

namespace mingpt {
namespace sampler {

struct FreeDeleter {
  void operator()(float* p) const { std::free(p); }
};
using Floats = std::unique_ptr<float[], FreeDeleter>;

// 64-byte aligned, zero-filled.
Floats alloc_floats(size_t n);

WeightFormat parse_weight_format(const std::string& name);
const char* format_name(WeightFormat format);
const char* kernel_name(Kernel kernel);

// W (rows x cols) as ceil(rows / 16) panels; panel p holds rows 16p .. 16p+15 as [k-step][lane], each
// k-step one line of 16 x 4 bytes in the format's layout (sampler_kernels.h), zero past cols and rows.
struct PackedMatrix {
  int rows = 0, cols = 0, panels = 0, steps = 0;
  WeightFormat format = WeightFormat::fp32;
  Kernel kernel = Kernel::fp32;
  Floats data;
  std::vector<float> bias;   // panels * 16 entries, zero past `rows` and in models without biases
  std::vector<float> scale;  // int8: each row's scale (0 past `rows`); empty otherwise

  const float* panel(int p) const { return data.get() + size_t(p) * steps * kLanes; }
  int padded_rows() const { return panels * kLanes; }
  float value(int64_t row, int k) const;  // W[row][k] as this format holds it
  size_t bytes() const { return (size_t(panels) * steps * kLanes + bias.size() + scale.size()) * sizeof(float); }
};

// GPTConfig's fields; its architecture options (see mingpt/config.py) as what they switch on.
struct ModelConfig {
  int n_layer, n_head, n_embd, block_size, vocab_size, head_dim;
  bool bias;
  float layer_norm_eps;
  bool rms_norm;        // norm rmsnorm: RMSNorm (a weight, no mean, no bias) for LayerNorm
  bool rotary;          // positions rotary: queries and keys rotated by position, no position embedding
  bool qk_norm;         // each head's queries and keys RMS-normalised, with gains
  bool relu2;           // mlp relu2: ReLU squared for tanh-GELU
  bool tie_head;        // lm_head is the token embedding
  float logit_softcap;  // 0: off
  int bigram_buckets;   // 0: off
};

// The fields of mingpt.config.GPTConfig (dataclasses.asdict); dropout is accepted and ignored.
ModelConfig read_config(const pybind11::dict& config);

struct NormWeights {
  std::vector<float> weight, bias;  // bias: zeros in models without biases and in RMSNorm
};

struct Layer {
  NormWeights ln_1, ln_2;
  PackedMatrix qkv, attn_proj, fc, mlp_proj;
  std::vector<float> q_norm, k_norm;  // QK-norm's gains (head_dim each); empty without
};

struct PackedGPT {
  ModelConfig cfg;
  std::vector<float> wpe;                     // block_size x n_embd; empty with rotary positions
  std::vector<float> rotary_cos, rotary_sin;  // block_size x head_dim / 2; empty with learned positions
  std::vector<float> wte;                     // vocab_size x n_embd, untied only: tied, lm_head holds it
  std::vector<float> bigram;                  // (bigram_buckets + 1) x n_embd; empty without
  std::vector<Layer> layers;
  NormWeights ln_f;
  PackedMatrix lm_head;

  // x = the token's embedding.
  void embed_token(int64_t token, float* x) const;
  // The bigram embedding of a token after `previous` (-1: none, the sequence's first token).
  const float* bigram_row(int64_t previous, int64_t token) const;
  size_t bytes() const;           // everything held
  size_t streamed_bytes() const;  // what every step reads: the matrices
};

// Packs a state dict (float32, CPU, nanoGPT names) holding exactly cfg's weights, its matrices in `format`,
// read by that format's portable kernel or by the best one this build has.
PackedGPT pack_gpt(const std::map<std::string, torch::Tensor>& weights, const ModelConfig& cfg, WeightFormat format,
                   bool portable);

}  // namespace sampler
}  // namespace mingpt
