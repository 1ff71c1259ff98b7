// CUDA kernels of the KV-cached decode step (see decode_kernels.h). No torch headers, so that
// `nvcc -c` compiles this file alone; csrc/cuda/decode_ops.cpp binds it to torch.
#include "decode_kernels.h"

#include <cfloat>
#include <cmath>

namespace mingpt_cuda {
namespace {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kSharedFloats = 48 * 1024 / sizeof(float);  // the default dynamic shared memory limit

__global__ void kv_cache_append_kernel(float* k_cache, float* v_cache, const float* k, const float* v, int heads,
                                       int capacity, int head_dim, int pos) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= heads * head_dim) return;
  const size_t dst = (size_t(i / head_dim) * capacity + pos) * head_dim + i % head_dim;
  k_cache[dst] = k[i];
  v_cache[dst] = v[i];
}

// All threads of the block get the reduction of `value` over the block; `scratch` holds kWarps floats.
template <bool kMax>
__device__ float block_reduce(float value, float* scratch) {
  for (int offset = 16; offset > 0; offset /= 2) {
    const float other = __shfl_xor_sync(0xffffffffu, value, offset);
    value = kMax ? fmaxf(value, other) : value + other;
  }
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = value;
  __syncthreads();
  value = scratch[0];
  for (int w = 1; w < kWarps; ++w) value = kMax ? fmaxf(value, scratch[w]) : value + scratch[w];
  __syncthreads();  // scratch is reused by the next reduction
  return value;
}

// One block per head. Shared memory: q (head_dim), the scores (length), reduction scratch.
__global__ void decode_attention_kernel(const float* q, const float* k_cache, const float* v_cache, float* out,
                                        int capacity, int head_dim, int length, float scale) {
  extern __shared__ float shared[];
  float* q_s = shared;
  float* scores = shared + head_dim;
  float* scratch = scores + length;
  const size_t head = blockIdx.x;
  const float* keys = k_cache + head * capacity * head_dim;
  const float* values = v_cache + head * capacity * head_dim;
  for (int d = threadIdx.x; d < head_dim; d += blockDim.x) q_s[d] = q[head * head_dim + d];
  __syncthreads();

  float local_max = -FLT_MAX;
  for (int t = threadIdx.x; t < length; t += blockDim.x) {
    float s = 0.0f;
    for (int d = 0; d < head_dim; ++d) s += q_s[d] * keys[size_t(t) * head_dim + d];
    scores[t] = s * scale;
    local_max = fmaxf(local_max, scores[t]);
  }
  const float max = block_reduce<true>(local_max, scratch);
  float local_sum = 0.0f;
  for (int t = threadIdx.x; t < length; t += blockDim.x) {
    scores[t] = expf(scores[t] - max);
    local_sum += scores[t];
  }
  const float total = block_reduce<false>(local_sum, scratch);  // its barrier publishes the scores

  for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
    float acc = 0.0f;
    for (int t = 0; t < length; ++t) acc += scores[t] * values[size_t(t) * head_dim + d];
    out[head * head_dim + d] = acc / total;
  }
}

}  // namespace

cudaError_t kv_cache_append(float* k_cache, float* v_cache, const float* k, const float* v, int heads,
                            int capacity, int head_dim, int pos, cudaStream_t stream) {
  const int n = heads * head_dim;
  kv_cache_append_kernel<<<(n + 255) / 256, 256, 0, stream>>>(k_cache, v_cache, k, v, heads, capacity, head_dim,
                                                              pos);
  return cudaGetLastError();
}

int decode_attention_max_length(int head_dim) { return kSharedFloats - head_dim - kWarps; }

cudaError_t decode_attention(const float* q, const float* k_cache, const float* v_cache, float* out, int heads,
                             int capacity, int head_dim, int length, cudaStream_t stream) {
  if (length < 1 || length > capacity || length > decode_attention_max_length(head_dim))
    return cudaErrorInvalidValue;
  const size_t shared_bytes = (head_dim + length + kWarps) * sizeof(float);
  decode_attention_kernel<<<heads, kThreads, shared_bytes, stream>>>(q, k_cache, v_cache, out, capacity, head_dim,
                                                                     length, 1.0f / std::sqrt(float(head_dim)));
  return cudaGetLastError();
}

}  // namespace mingpt_cuda
