#include "sampler_forward.h"

#include <algorithm>
#include <cmath>

#include "sampler_math.h"

namespace mingpt {
namespace sampler {

void StepRows::clear() {
  samples.clear();
  first_row.assign(1, 0);
  tokens.clear();
  positions.clear();
}

void StepRows::add(int sample, int first_pos, const int64_t* sample_tokens, int count) {
  samples.push_back(sample);
  tokens.insert(tokens.end(), sample_tokens, sample_tokens + count);
  for (int t = 0; t < count; ++t) positions.push_back(first_pos + t);
  first_row.push_back(rows());
}

ForwardStep::ForwardStep(const PackedGPT& model, int batch, int max_rows, int positions, int n_threads)
    : g_(model), c_(model.cfg), n_threads_(n_threads) {
  ld_c_ = round_up(c_.n_embd, kLanes);
  ld_qkv_ = g_.layers[0].qkv.padded_rows();
  ld_hidden_ = g_.layers[0].fc.padded_rows();
  ld_vocab_ = g_.lm_head.padded_rows();
  ld_t_ = round_up(positions, kLanes);
  logits_ = alloc_floats(size_t(batch) * ld_vocab_);
  head_cache_ = 2 * size_t(c_.head_dim) * ld_t_ + kLanes;  // + lanes: whole-vector reads past the end
  kv_cache_ = alloc_floats(size_t(batch) * c_.n_layer * c_.n_head * head_cache_);
  scores_ = alloc_floats(size_t(n_threads) * ld_t_);
  tokens_.assign(size_t(batch) * c_.block_size, 0);
  reserve_rows(max_rows);
}

void ForwardStep::reserve_rows(int rows) {
  if (rows <= max_rows_) return;
  max_rows_ = rows;
  x_ = alloc_floats(size_t(max_rows_) * ld_c_);
  normed_ = alloc_floats(size_t(n_threads_) * max_rows_ * ld_c_);
  qkv_ = alloc_floats(size_t(max_rows_) * ld_qkv_);
  attn_out_ = alloc_floats(size_t(max_rows_) * ld_c_);
  hidden_ = alloc_floats(size_t(max_rows_) * ld_hidden_);
  scratch_.assign(n_threads_, KernelScratch(max_rows_, ld_hidden_));
}

void ForwardStep::copy_cache(int source, int target) {
  const size_t sequence = size_t(c_.n_layer) * c_.n_head * head_cache_;
  std::copy(head_cache(source, 0, 0), head_cache(source, 0, 0) + sequence, head_cache(target, 0, 0));
  std::copy(sequence_tokens(source), sequence_tokens(source) + c_.block_size, sequence_tokens(target));
}

// Each sample's rows in one thread: a row's bigram reads the token its sequence holds before it.
void ForwardStep::embed(const StepRows& step, int tid, int nth) {
  const int C = c_.n_embd, n = step.samples.size();
  for (int i = part(n, tid, nth); i < part(n, tid + 1, nth); ++i) {
    int64_t* tokens = sequence_tokens(step.samples[i]);
    for (int r = step.first_row[i]; r < step.first_row[i + 1]; ++r) {
      const int pos = step.positions[r];
      const int64_t token = step.tokens[r];
      float* x = x_.get() + size_t(r) * ld_c_;
      g_.embed_token(token, x);
      if (!c_.rotary)
        for (int c = 0; c < C; ++c) x[c] += g_.wpe[size_t(pos) * C + c];
      if (c_.bigram_buckets) {
        const float* pair = g_.bigram_row(pos > 0 ? tokens[pos - 1] : -1, token);
        for (int c = 0; c < C; ++c) x[c] += pair[c];
      }
      tokens[pos] = token;
    }
  }
}

void ForwardStep::run(const StepRows& step, int tid, int nth) {
  const int rows = step.rows();
  embed(step, tid, nth);
#pragma omp barrier
  float* normed = normed_.get() + size_t(tid) * max_rows_ * ld_c_;
  KernelScratch& scratch = scratch_[tid];
  const auto add_to_residual = [&](int r, int n0, vec16 y) {
    float* x = x_.get() + size_t(r) * ld_c_ + n0;
    store(x, load<vec16>(x) + y);
  };
  for (int l = 0; l < c_.n_layer; ++l) {
    const Layer& layer = g_.layers[l];
    for (int r = 0; r < rows; ++r) norm_row(x_.get() + size_t(r) * ld_c_, layer.ln_1, c_, normed + size_t(r) * ld_c_);
    matmul(layer.qkv, normed, ld_c_, rows, tid, nth, scratch,
           [&](int r, int n0, vec16 y) { store(qkv_.get() + size_t(r) * ld_qkv_ + n0, y); });
#pragma omp barrier
    attention(step, l, tid, nth);
#pragma omp barrier
    matmul(layer.attn_proj, attn_out_.get(), ld_c_, rows, tid, nth, scratch, add_to_residual);
#pragma omp barrier
    for (int r = 0; r < rows; ++r) norm_row(x_.get() + size_t(r) * ld_c_, layer.ln_2, c_, normed + size_t(r) * ld_c_);
    const auto hidden_at = [&](int r, int n0) { return hidden_.get() + size_t(r) * ld_hidden_ + n0; };
    if (c_.relu2)
      matmul(layer.fc, normed, ld_c_, rows, tid, nth, scratch,
             [&](int r, int n0, vec16 y) { store(hidden_at(r, n0), relu2_16(y)); });
    else
      matmul(layer.fc, normed, ld_c_, rows, tid, nth, scratch,
             [&](int r, int n0, vec16 y) { store(hidden_at(r, n0), gelu16(y)); });
#pragma omp barrier
    matmul(layer.mlp_proj, hidden_.get(), ld_hidden_, rows, tid, nth, scratch, add_to_residual);
#pragma omp barrier
  }
  const int n = step.samples.size();  // one logit row per sample: its last
  for (int i = 0; i < n; ++i)
    norm_row(x_.get() + size_t(step.first_row[i + 1] - 1) * ld_c_, g_.ln_f, c_, normed + size_t(i) * ld_c_);
  const auto logits_at = [&](int i, int n0) { return logits_.get() + size_t(i) * ld_vocab_ + n0; };
  const float cap = c_.logit_softcap;
  if (cap > 0.0f)
    matmul(g_.lm_head, normed, ld_c_, n, tid, nth, scratch, [&](int i, int n0, vec16 y) {
      for (int v = 0; v < kLanes; ++v) y[v] = cap * std::tanh(y[v] / cap);
      store(logits_at(i, n0), y);
    });
  else
    matmul(g_.lm_head, normed, ld_c_, n, tid, nth, scratch,
           [&](int i, int n0, vec16 y) { store(logits_at(i, n0), y); });
#pragma omp barrier
}

// A head's query and key of one row at position pos, in place: QK-norm, then rotary positions.
void ForwardStep::normalise_and_rotate(float* q, float* k, const Layer& layer, int pos) const {
  const int hd = c_.head_dim, half = hd / 2;
  if (c_.qk_norm) {
    rms_norm_row(q, layer.q_norm.data(), c_.layer_norm_eps, q, hd);
    rms_norm_row(k, layer.k_norm.data(), c_.layer_norm_eps, k, hd);
  }
  if (c_.rotary) {
    const float* cos = g_.rotary_cos.data() + size_t(pos) * half;
    const float* sin = g_.rotary_sin.data() + size_t(pos) * half;
    rotate_head(q, cos, sin, half);
    rotate_head(k, cos, sin, half);
  }
}

// A (sample, head) pair's cache: keys in blocks of 16 positions, [block][dim][16], so that scores
// vectorise over positions, then values [position][dim]: the first n positions of either are one prefix.
float* ForwardStep::head_cache(int sample, int layer, int head) const {
  return kv_cache_.get() + ((size_t(sample) * c_.n_layer + layer) * c_.n_head + head) * head_cache_;
}

// Appends this step's keys and values to the cache and attends, one (sample, head) pair at a time,
// so the rows of a prefill see each other's keys without another barrier.
void ForwardStep::attention(const StepRows& step, int l, int tid, int nth) {
  const int C = c_.n_embd, H = c_.n_head, hd = c_.head_dim, pairs = step.samples.size() * H;
  const int end = part(pairs, tid + 1, nth);
  const float scale = 1.0f / std::sqrt(float(hd));
  float* scores = scores_.get() + size_t(tid) * ld_t_;
  for (int pair = part(pairs, tid, nth); pair < end; ++pair) {
    const int i = pair / H, h = pair % H, first = step.first_row[i], last = step.first_row[i + 1];
    float* keys = head_cache(step.samples[i], l, h);
    float* values = keys + size_t(ld_t_) * hd;
    if (pair + 1 < end) {  // the next pair's cache, which the hardware would fetch only on demand
      const int next_sample = (pair + 1) / H, n_keys = step.positions[step.first_row[next_sample + 1] - 1] + 1;
      const float* next = head_cache(step.samples[next_sample], l, (pair + 1) % H);
      for (int k = 0; k < round_up(n_keys, kLanes) * hd; k += kLanes) __builtin_prefetch(next + k);
      for (int k = 0; k < n_keys * hd; k += kLanes) __builtin_prefetch(next + size_t(ld_t_) * hd + k);
    }
    for (int r = first; r < last; ++r) {
      float* src = qkv_.get() + size_t(r) * ld_qkv_ + h * hd;
      const int pos = step.positions[r];
      if (c_.qk_norm || c_.rotary) normalise_and_rotate(src, src + C, g_.layers[l], pos);
      float* key = keys + size_t(pos / kLanes) * hd * kLanes + pos % kLanes;
      for (int d = 0; d < hd; ++d) {
        key[d * kLanes] = src[C + d];
        values[size_t(pos) * hd + d] = src[2 * C + d];
      }
    }
    for (int r = first; r < last; ++r)
      attend_row(qkv_.get() + size_t(r) * ld_qkv_ + h * hd, keys, values, step.positions[r] + 1, hd, scale, scores,
                 attn_out_.get() + size_t(r) * ld_c_ + h * hd);
  }
}

}  // namespace sampler
}  // namespace mingpt
