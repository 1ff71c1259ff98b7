// Layer norm over the last dimension, forward and backward, one pass per row.
// Forward saves only the per-row mean and 1/std (float32) for the backward.
#include "cpu_kernels.h"

#include <vector>

namespace mingpt {
namespace {

constexpr int64_t kRowsPerBlock = 32;  // rows per partial sum of the weight and bias gradients

// Rows are copied to float32 scratch `padded` = C rounded up to a vector wide, whose padding stays zero,
// so that the row sums run on whole vectors.
template <typename T>
void layer_norm_forward_kernel(const T* x, const float* weight, const float* bias, T* y, float* mean,
                               float* rstd, int64_t rows, int64_t C, float eps) {
  const int64_t padded = round_up(C, kLanes);
  at::parallel_for(0, rows, kRowsPerBlock, [&](int64_t begin, int64_t end) {
    std::vector<float> centred(padded, 0.0f);
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = x + r * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) centred[c] = to_float(xr[c]);
      const float mu = sum_padded<vec8>(centred.data(), padded) / C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) centred[c] -= mu;
      const float rs = 1.0f / std::sqrt(dot_padded<vec8>(centred.data(), centred.data(), padded) / C + eps);
      T* yr = y + r * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) yr[c] = from_float<T>(centred[c] * rs * weight[c] + bias[c]);
      mean[r] = mu;
      rstd[r] = rs;
    }
  });
}

// dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) with g = dy * weight; dweight = sum dy * xhat and
// dbias = sum dy over rows, summed per block of rows and then over blocks, in an order fixed by the
// shape alone (the same result whatever the thread count).
template <typename T>
void layer_norm_backward_kernel(const T* dy, const T* x, const float* weight, const float* mean,
                                const float* rstd, T* dx, float* dweight, float* dbias, int64_t rows,
                                int64_t C) {
  const int64_t blocks = (rows + kRowsPerBlock - 1) / kRowsPerBlock, padded = round_up(C, kLanes);
  std::vector<float> dweight_part(blocks * C, 0.0f), dbias_part(blocks * C, 0.0f);
  at::parallel_for(0, blocks, 1, [&](int64_t block_begin, int64_t block_end) {
    std::vector<float> xhat(padded, 0.0f), g(padded, 0.0f);
    for (int64_t blk = block_begin; blk < block_end; ++blk) {
      float* dw = dweight_part.data() + blk * C;
      float* db = dbias_part.data() + blk * C;
      for (int64_t r = blk * kRowsPerBlock; r < std::min(rows, (blk + 1) * kRowsPerBlock); ++r) {
        const T* xr = x + r * C;
        const T* dyr = dy + r * C;
        const float mu = mean[r], rs = rstd[r];
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          const float d = to_float(dyr[c]);
          xhat[c] = (to_float(xr[c]) - mu) * rs;
          g[c] = d * weight[c];
          dw[c] += d * xhat[c];
          db[c] += d;
        }
        const float g_mean = sum_padded<vec8>(g.data(), padded) / C;
        const float g_xhat_mean = dot_padded<vec8>(g.data(), xhat.data(), padded) / C;
        T* dxr = dx + r * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) dxr[c] = from_float<T>(rs * (g[c] - g_mean - xhat[c] * g_xhat_mean));
      }
    }
  });
  at::parallel_for(0, C, 64, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      float w = 0.0f, b = 0.0f;
      for (int64_t blk = 0; blk < blocks; ++blk) {
        w += dweight_part[blk * C + c];
        b += dbias_part[blk * C + c];
      }
      dweight[c] = w;
      dbias[c] = b;
    }
  });
}

void check_x(const at::Tensor& x, const char* op) {
  check_cpu_float(x, op, "x");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) > 0, op, ": x must have a non-empty last dimension, got shape ",
              x.sizes());
}

// weight or bias as float32 of shape (C,); `fill` where it is absent.
at::Tensor float_param(const at::Tensor& x, const c10::optional<at::Tensor>& param, float fill, const char* op,
                       const char* name) {
  const int64_t C = x.size(-1);
  if (!param.has_value()) return at::full({C}, fill, x.options().dtype(at::kFloat));
  check_cpu_float(*param, op, name);
  TORCH_CHECK(param->dim() == 1 && param->size(0) == C, op, ": ", name, " must have shape (", C, ",), got ",
              param->sizes());
  return param->to(at::kFloat).contiguous();
}

// Returns (y, mean, rstd); y has x's dtype, mean and rstd are float32 of shape x.shape[:-1].
std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_forward(const at::Tensor& x,
                                                                  const c10::optional<at::Tensor>& weight,
                                                                  const c10::optional<at::Tensor>& bias,
                                                                  double eps) {
  const char* op = "mingpt::layer_norm_forward";
  check_x(x, op);
  const at::Tensor weight_f = float_param(x, weight, 1.0f, op, "weight");
  const at::Tensor bias_f = float_param(x, bias, 0.0f, op, "bias");
  const int64_t C = x.size(-1), rows = x.numel() / C;
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty_like(xc);
  at::Tensor mean = at::empty(x.sizes().slice(0, x.dim() - 1), x.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty_like(mean);
  MINGPT_DISPATCH_FLOAT_BF16(x.scalar_type(), op, [&] {
    layer_norm_forward_kernel<scalar_t>(xc.data_ptr<scalar_t>(), weight_f.data_ptr<float>(),
                                        bias_f.data_ptr<float>(), y.data_ptr<scalar_t>(),
                                        mean.data_ptr<float>(), rstd.data_ptr<float>(), rows, C, float(eps));
  });
  return {y, mean, rstd};
}

// Returns (dx, dweight, dbias); dx has x's dtype, dweight and dbias are float32 (whether or not the
// forward had a weight and a bias).
std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_backward(const at::Tensor& grad_y, const at::Tensor& x,
                                                                   const c10::optional<at::Tensor>& weight,
                                                                   const at::Tensor& mean, const at::Tensor& rstd) {
  const char* op = "mingpt::layer_norm_backward";
  check_x(x, op);
  check_same_shape(x, grad_y, op, "grad_y");
  TORCH_CHECK(grad_y.scalar_type() == x.scalar_type(), op, ": grad_y is ", grad_y.scalar_type(), ", x is ",
              x.scalar_type());
  const at::Tensor weight_f = float_param(x, weight, 1.0f, op, "weight");
  const int64_t C = x.size(-1), rows = x.numel() / C;
  TORCH_CHECK(mean.scalar_type() == at::kFloat && rstd.scalar_type() == at::kFloat && mean.numel() == rows &&
                  rstd.numel() == rows,
              op, ": mean and rstd must be the float32 statistics of layer_norm_forward");
  const at::Tensor xc = x.contiguous(), dyc = grad_y.contiguous();
  const at::Tensor mean_c = mean.contiguous(), rstd_c = rstd.contiguous();
  at::Tensor dx = at::empty_like(xc);
  at::Tensor dweight = at::empty({C}, x.options().dtype(at::kFloat)), dbias = at::empty_like(dweight);
  MINGPT_DISPATCH_FLOAT_BF16(x.scalar_type(), op, [&] {
    layer_norm_backward_kernel<scalar_t>(dyc.data_ptr<scalar_t>(), xc.data_ptr<scalar_t>(),
                                         weight_f.data_ptr<float>(), mean_c.data_ptr<float>(),
                                         rstd_c.data_ptr<float>(), dx.data_ptr<scalar_t>(),
                                         dweight.data_ptr<float>(), dbias.data_ptr<float>(), rows, C);
  });
  return {dx, dweight, dbias};
}

}  // namespace
}  // namespace mingpt

TORCH_LIBRARY_FRAGMENT(mingpt, m) {
  m.def("layer_norm_forward(Tensor x, Tensor? weight, Tensor? bias, float eps) -> (Tensor, Tensor, Tensor)");
  m.def("layer_norm_backward(Tensor grad_y, Tensor x, Tensor? weight, Tensor mean, Tensor rstd) "
        "-> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(mingpt, CPU, m) {
  m.impl("layer_norm_forward", &mingpt::layer_norm_forward);
  m.impl("layer_norm_backward", &mingpt::layer_norm_backward);
}
