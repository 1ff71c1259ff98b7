// CUDA kernels of the KV-cached decode step, callable without torch: plain pointers and a stream.
// Layouts: caches (heads, capacity, head_dim) and per-step tensors (heads, head_dim), float32,
// contiguous, where heads = batch * n_head.
#pragma once

#include <cuda_runtime.h>

namespace mingpt_cuda {

// k_cache[h][pos] = k[h] and v_cache[h][pos] = v[h] for every head h.
cudaError_t kv_cache_append(float* k_cache, float* v_cache, const float* k, const float* v, int heads,
                            int capacity, int head_dim, int pos, cudaStream_t stream);

// out[h] = softmax(q[h] . k_cache[h][0:length]^T / sqrt(head_dim)) . v_cache[h][0:length].
cudaError_t decode_attention(const float* q, const float* k_cache, const float* v_cache, float* out, int heads,
                             int capacity, int head_dim, int length, cudaStream_t stream);

// The most positions decode_attention takes for a head_dim (its scores live in shared memory).
int decode_attention_max_length(int head_dim);

}  // namespace mingpt_cuda
