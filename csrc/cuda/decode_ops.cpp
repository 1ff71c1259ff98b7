// torch ops over the decode kernels (decode_kernels.cu), compiled only in CUDA builds:
//   torch.ops.mingpt.kv_cache_append(k_cache, v_cache, k, v, pos)   in place
//   torch.ops.mingpt.decode_attention(q, k_cache, v_cache, length) -> out
// with caches (batch, n_head, capacity, head_dim) and q, k, v, out (batch, n_head, 1, head_dim).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include "decode_kernels.h"

namespace {

void check_cache(const at::Tensor& cache, const char* name) {
  TORCH_CHECK_VALUE(cache.is_cuda(), name, " must be a CUDA tensor, got ", cache.device());
  TORCH_CHECK_TYPE(cache.scalar_type() == at::kFloat, name, " must be float32, got ", cache.scalar_type());
  TORCH_CHECK_VALUE(cache.dim() == 4 && cache.is_contiguous(), name,
                    " must be a contiguous (batch, n_head, capacity, head_dim) tensor, got ", cache.sizes());
}

// A (batch, n_head, 1, head_dim) step tensor matching the caches; returned contiguous.
at::Tensor check_step(const at::Tensor& t, const at::Tensor& cache, const char* name) {
  TORCH_CHECK_VALUE(t.device() == cache.device(), name, " is on ", t.device(), ", the cache on ", cache.device());
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 4 && t.size(0) == cache.size(0) && t.size(1) == cache.size(1) && t.size(2) == 1 &&
                        t.size(3) == cache.size(3),
                    name, " must have shape (", cache.size(0), ", ", cache.size(1), ", 1, ", cache.size(3), "), got ",
                    t.sizes());
  return t.contiguous();
}

void kv_cache_append(at::Tensor k_cache, at::Tensor v_cache, const at::Tensor& k, const at::Tensor& v, int64_t pos) {
  check_cache(k_cache, "k_cache");
  check_cache(v_cache, "v_cache");
  TORCH_CHECK_VALUE(k_cache.sizes() == v_cache.sizes() && k_cache.device() == v_cache.device(),
                    "k_cache and v_cache must match, got ", k_cache.sizes(), " and ", v_cache.sizes());
  TORCH_CHECK_VALUE(pos >= 0 && pos < k_cache.size(2), "pos ", pos, " is outside the cache of ", k_cache.size(2),
                    " positions");
  const at::Tensor keys = check_step(k, k_cache, "k"), values = check_step(v, k_cache, "v");
  const c10::cuda::CUDAGuard guard(k_cache.device());
  C10_CUDA_CHECK(mingpt_cuda::kv_cache_append(k_cache.data_ptr<float>(), v_cache.data_ptr<float>(),
                                              keys.data_ptr<float>(), values.data_ptr<float>(),
                                              k_cache.size(0) * k_cache.size(1), k_cache.size(2), k_cache.size(3), pos,
                                              c10::cuda::getCurrentCUDAStream()));
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, int64_t length) {
  check_cache(k_cache, "k_cache");
  check_cache(v_cache, "v_cache");
  TORCH_CHECK_VALUE(k_cache.sizes() == v_cache.sizes() && k_cache.device() == v_cache.device(),
                    "k_cache and v_cache must match, got ", k_cache.sizes(), " and ", v_cache.sizes());
  const int64_t head_dim = k_cache.size(3);
  TORCH_CHECK_VALUE(length >= 1 && length <= k_cache.size(2), "length ", length, " must be in [1, ",
                    k_cache.size(2), "]");
  TORCH_CHECK_VALUE(length <= mingpt_cuda::decode_attention_max_length(head_dim), "decode_attention takes at most ",
                    mingpt_cuda::decode_attention_max_length(head_dim), " positions for head_dim ", head_dim);
  const at::Tensor query = check_step(q, k_cache, "q");
  at::Tensor out = at::empty_like(query);
  const c10::cuda::CUDAGuard guard(k_cache.device());
  C10_CUDA_CHECK(mingpt_cuda::decode_attention(query.data_ptr<float>(), k_cache.data_ptr<float>(),
                                               v_cache.data_ptr<float>(), out.data_ptr<float>(),
                                               k_cache.size(0) * k_cache.size(1), k_cache.size(2), head_dim, length,
                                               c10::cuda::getCurrentCUDAStream()));
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mingpt, m) {
  m.def("kv_cache_append(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor k, Tensor v, int pos) -> ()");
  m.def("decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, int length) -> Tensor");
}

TORCH_LIBRARY_IMPL(mingpt, CUDA, m) {
  m.impl("kv_cache_append", &kv_cache_append);
  m.impl("decode_attention", &decode_attention);
}
