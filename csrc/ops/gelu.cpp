// gelu_tanh(x + bias), forward and backward in one pass each; the backward recomputes x + bias
// rather than saving it.
#include "cpu_kernels.h"

#include <vector>

namespace mingpt {
namespace {

constexpr float kSqrt2OverPi = 0.7978845608028654f;
constexpr float kCubic = 0.044715f;
constexpr int64_t kRowsPerBlock = 32;  // rows per partial sum of the bias gradient

// tanh through exp(-2|z|): exact to ~1e-7 absolute, which is all 1 + tanh in GELU can resolve.
inline float tanh_via_exp(float z) {
  const float e = exp_approx(-2.0f * std::fabs(z));
  return std::copysign((1.0f - e) / (1.0f + e), z);
}

inline float gelu(float u) {
  return 0.5f * u * (1.0f + tanh_via_exp(kSqrt2OverPi * (u + kCubic * u * u * u)));
}

inline float gelu_derivative(float u) {
  const float t = tanh_via_exp(kSqrt2OverPi * (u + kCubic * u * u * u));
  return 0.5f * (1.0f + t) + 0.5f * u * (1.0f - t * t) * kSqrt2OverPi * (1.0f + 3.0f * kCubic * u * u);
}

template <typename In, typename Out>
void bias_gelu_forward_kernel(const In* x, const float* bias, Out* y, int64_t rows, int64_t C) {
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / C), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const In* xr = x + r * C;
      Out* yr = y + r * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) yr[c] = from_float<Out>(gelu(to_float(xr[c]) + bias[c]));
    }
  });
}

// dx = dy * gelu'(x + bias) in x's dtype; dbias = sum of the float32 dx over rows, per block of rows and
// then over blocks (an order fixed by the shape alone).
template <typename In, typename Out>
void bias_gelu_backward_kernel(const Out* dy, const In* x, const float* bias, In* dx, float* dbias, int64_t rows,
                               int64_t C) {
  const int64_t blocks = (rows + kRowsPerBlock - 1) / kRowsPerBlock;
  std::vector<float> dbias_part(blocks * C, 0.0f);
  at::parallel_for(0, blocks, 1, [&](int64_t block_begin, int64_t block_end) {
    for (int64_t blk = block_begin; blk < block_end; ++blk) {
      float* db = dbias_part.data() + blk * C;
      for (int64_t r = blk * kRowsPerBlock; r < std::min(rows, (blk + 1) * kRowsPerBlock); ++r) {
        const In* xr = x + r * C;
        const Out* dyr = dy + r * C;
        In* dxr = dx + r * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          const float d = to_float(dyr[c]) * gelu_derivative(to_float(xr[c]) + bias[c]);
          dxr[c] = from_float<In>(d);
          db[c] += d;
        }
      }
    }
  });
  for (int64_t c = 0; c < C; ++c) dbias[c] = 0.0f;
  for (int64_t blk = 0; blk < blocks; ++blk) {
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) dbias[c] += dbias_part[blk * C + c];
  }
}

// The output dtype is what x + bias would have: float32 if either is float32.
at::ScalarType output_dtype(const at::Tensor& x, const c10::optional<at::Tensor>& bias) {
  return bias.has_value() ? at::promote_types(x.scalar_type(), bias->scalar_type()) : x.scalar_type();
}

at::Tensor float_bias(const at::Tensor& x, const c10::optional<at::Tensor>& bias, const char* op) {
  const int64_t C = x.size(-1);
  if (!bias.has_value()) return at::zeros({C}, x.options().dtype(at::kFloat));
  check_cpu_float(*bias, op, "bias");
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == C, op, ": bias must have shape (", C, ",), got ",
              bias->sizes());
  return bias->to(at::kFloat).contiguous();
}

// Calls body(In*, Out*) with the element types of x and of the output.
template <typename Body>
void dispatch_in_out(at::ScalarType in, at::ScalarType out, Body body) {
  if (in == at::kFloat) {
    body(static_cast<float*>(nullptr), static_cast<float*>(nullptr));
  } else if (out == at::kFloat) {
    body(static_cast<bf16*>(nullptr), static_cast<float*>(nullptr));
  } else {
    body(static_cast<bf16*>(nullptr), static_cast<bf16*>(nullptr));
  }
}

void check_x(const at::Tensor& x, const char* op) {
  check_cpu_float(x, op, "x");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) > 0, op, ": x must have a non-empty last dimension, got shape ",
              x.sizes());
}

at::Tensor bias_gelu_forward(const at::Tensor& x, const c10::optional<at::Tensor>& bias) {
  const char* op = "mingpt::bias_gelu_forward";
  check_x(x, op);
  const at::Tensor bias_f = float_bias(x, bias, op), xc = x.contiguous();
  const int64_t C = x.size(-1), rows = x.numel() / C;
  at::Tensor y = at::empty(x.sizes(), x.options().dtype(output_dtype(x, bias)));
  dispatch_in_out(x.scalar_type(), y.scalar_type(), [&](auto* in_tag, auto* out_tag) {
    using In = std::remove_pointer_t<decltype(in_tag)>;
    using Out = std::remove_pointer_t<decltype(out_tag)>;
    bias_gelu_forward_kernel<In, Out>(xc.data_ptr<In>(), bias_f.data_ptr<float>(), y.data_ptr<Out>(), rows, C);
  });
  return y;
}

// Returns (dx, dbias): dx in x's dtype, dbias float32 (zeros' sum when there is no bias).
std::tuple<at::Tensor, at::Tensor> bias_gelu_backward(const at::Tensor& grad_y, const at::Tensor& x,
                                                      const c10::optional<at::Tensor>& bias) {
  const char* op = "mingpt::bias_gelu_backward";
  check_x(x, op);
  check_same_shape(x, grad_y, op, "grad_y");
  const at::ScalarType out_dtype = output_dtype(x, bias);
  TORCH_CHECK(grad_y.scalar_type() == out_dtype, op, ": grad_y is ", grad_y.scalar_type(), ", expected ",
              out_dtype);
  const at::Tensor bias_f = float_bias(x, bias, op), xc = x.contiguous(), dyc = grad_y.contiguous();
  const int64_t C = x.size(-1), rows = x.numel() / C;
  at::Tensor dx = at::empty_like(xc);
  at::Tensor dbias = at::empty({C}, x.options().dtype(at::kFloat));
  dispatch_in_out(x.scalar_type(), out_dtype, [&](auto* in_tag, auto* out_tag) {
    using In = std::remove_pointer_t<decltype(in_tag)>;
    using Out = std::remove_pointer_t<decltype(out_tag)>;
    bias_gelu_backward_kernel<In, Out>(dyc.data_ptr<Out>(), xc.data_ptr<In>(), bias_f.data_ptr<float>(),
                                       dx.data_ptr<In>(), dbias.data_ptr<float>(), rows, C);
  });
  return {dx, dbias};
}

}  // namespace
}  // namespace mingpt

TORCH_LIBRARY_FRAGMENT(mingpt, m) {
  m.def("bias_gelu_forward(Tensor x, Tensor? bias) -> Tensor");
  m.def("bias_gelu_backward(Tensor grad_y, Tensor x, Tensor? bias) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(mingpt, CPU, m) {
  m.impl("bias_gelu_forward", &mingpt::bias_gelu_forward);
  m.impl("bias_gelu_backward", &mingpt::bias_gelu_backward);
}
