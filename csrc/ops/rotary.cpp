// Rotary positions inside the fused qkv projection: each head's queries and keys turned by their
// position's angles (channel i of a head's first half with channel i of its second half, the half-split
// layout of Llama and GPT-NeoX), the values copied, in one pass over (B, T, 3C). The backward is the
// same op turning the other way (inverse): a rotation's transpose is its inverse, and the values'
// gradient passes through.
#include "cpu_kernels.h"

namespace mingpt {
namespace {

template <typename T>
void rotary_kernel(const T* qkv, const float* cos, const float* sin, T* out, int64_t B, int64_t seq,
                   int64_t n_head, int64_t head_dim, int64_t angle_batch_stride, bool inverse) {
  const int64_t C = n_head * head_dim, half = head_dim / 2, rows = B * seq;
  const float turn = inverse ? -1.0f : 1.0f;
  at::parallel_for(0, rows, std::max<int64_t>(1, 8192 / (3 * C)), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t batch = r / seq, t = r % seq;
      const float* c = cos + batch * angle_batch_stride + t * half;
      const float* s = sin + batch * angle_batch_stride + t * half;
      const T* x = qkv + r * 3 * C;
      T* y = out + r * 3 * C;
      for (int64_t h = 0; h < 2 * n_head; ++h) {  // the queries' heads, then the keys'
        const T* first = x + h * head_dim;
        const T* second = first + half;
        T* y_first = y + h * head_dim;
        T* y_second = y_first + half;
#pragma omp simd
        for (int64_t i = 0; i < half; ++i) {
          const float a = to_float(first[i]), b = to_float(second[i]), si = turn * s[i];
          y_first[i] = from_float<T>(a * c[i] - b * si);
          y_second[i] = from_float<T>(a * si + b * c[i]);
        }
      }
      std::memcpy(y + 2 * C, x + 2 * C, C * sizeof(T));
    }
  });
}

void check_angles(const at::Tensor& angles, const at::Tensor& qkv, int64_t half, const char* op, const char* name) {
  TORCH_CHECK(angles.device().is_cpu() && angles.scalar_type() == at::kFloat, op, ": ", name,
              " must be a float32 CPU tensor, got ", angles.scalar_type(), " on ", angles.device());
  TORCH_CHECK(angles.dim() == 3 && (angles.size(0) == 1 || angles.size(0) == qkv.size(0)) &&
                  angles.size(1) == qkv.size(1) && angles.size(2) == half,
              op, ": ", name, " must have shape (1 or ", qkv.size(0), ", ", qkv.size(1), ", ", half, "), got ",
              angles.sizes());
}

at::Tensor rotary(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, int64_t n_head, bool inverse) {
  const char* op = "mingpt::rotary";
  check_cpu_float(qkv, op, "qkv");
  TORCH_CHECK(qkv.dim() == 3 && qkv.size(2) % 3 == 0, op, ": qkv must have shape (B, T, 3*C), got ", qkv.sizes());
  const int64_t C = qkv.size(2) / 3;
  TORCH_CHECK(n_head >= 1 && C % n_head == 0 && (C / n_head) % 2 == 0, op, ": C=", C, " must split into n_head=",
              n_head, " heads of an even size");
  const int64_t head_dim = C / n_head;
  check_angles(cos, qkv, head_dim / 2, op, "cos");
  check_angles(sin, qkv, head_dim / 2, op, "sin");
  TORCH_CHECK(cos.sizes() == sin.sizes(), op, ": cos has shape ", cos.sizes(), ", sin ", sin.sizes());
  const at::Tensor xc = qkv.contiguous(), cc = cos.contiguous(), sc = sin.contiguous();
  at::Tensor out = at::empty_like(xc);
  const int64_t angle_batch_stride = cc.size(0) == 1 ? 0 : cc.size(1) * cc.size(2);
  MINGPT_DISPATCH_FLOAT_BF16(qkv.scalar_type(), op, [&] {
    rotary_kernel<scalar_t>(xc.data_ptr<scalar_t>(), cc.data_ptr<float>(), sc.data_ptr<float>(),
                            out.data_ptr<scalar_t>(), xc.size(0), xc.size(1), n_head, head_dim, angle_batch_stride,
                            inverse);
  });
  return out;
}

}  // namespace
}  // namespace mingpt

TORCH_LIBRARY_FRAGMENT(mingpt, m) {
  m.def("rotary(Tensor qkv, Tensor cos, Tensor sin, int n_head, bool inverse) -> Tensor");
}

TORCH_LIBRARY_IMPL(mingpt, CPU, m) { m.impl("rotary", &mingpt::rotary); }
