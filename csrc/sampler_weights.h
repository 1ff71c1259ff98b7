// The sampler's model: its config, read from a dict of mingpt.config.GPTConfig's fields, and its
// weights, read from a state dict and packed once into panels of 16 output rows stored k-major, so
// that a matrix times a few vectors reads each weight once per step, 16 lanes at a time.
#pragma once

#include <torch/extension.h>

#include <cstdlib>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "simd.h"

namespace mingpt {
namespace sampler {

constexpr int kLanes = lanes_of<vec16>;

struct FreeDeleter {
  void operator()(float* p) const { std::free(p); }
};
using Floats = std::unique_ptr<float[], FreeDeleter>;

// 64-byte aligned, zero-filled.
Floats alloc_floats(size_t n);

// W (rows x cols) as ceil(rows / 16) panels; panel p holds rows 16p .. 16p+15 as [col][lane].
struct PackedMatrix {
  int rows = 0, cols = 0, panels = 0;
  Floats data;
  std::vector<float> bias;  // panels * 16 entries, zero past `rows` and in models without biases

  const float* panel(int p) const { return data.get() + size_t(p) * cols * kLanes; }
  int padded_rows() const { return panels * kLanes; }
  size_t bytes() const { return (size_t(panels) * cols * kLanes + bias.size()) * sizeof(float); }
};

struct ModelConfig {
  int n_layer, n_head, n_embd, block_size, vocab_size, head_dim;
  bool bias;
  float layer_norm_eps;
};

// The fields of mingpt.config.GPTConfig (dataclasses.asdict); dropout is accepted and ignored.
ModelConfig read_config(const pybind11::dict& config);

struct LayerNormWeights {
  std::vector<float> weight, bias;  // bias: zeros in models without biases
};

struct Layer {
  LayerNormWeights ln_1, ln_2;
  PackedMatrix qkv, attn_proj, fc, mlp_proj;
};

struct PackedGPT {
  ModelConfig cfg;
  std::vector<float> wpe;  // block_size x n_embd
  std::vector<Layer> layers;
  LayerNormWeights ln_f;
  PackedMatrix lm_head;  // tied to the token embedding, which is read from it

  float wte(int64_t token, int c) const {
    return lm_head.panel(token / kLanes)[size_t(c) * kLanes + token % kLanes];
  }
  size_t bytes() const;
};

// Packs a state dict (float32, CPU, nanoGPT names, lm_head tied to wte) holding exactly cfg's weights.
PackedGPT pack_gpt(const std::map<std::string, torch::Tensor>& weights, const ModelConfig& cfg);

}  // namespace sampler
}  // namespace mingpt
