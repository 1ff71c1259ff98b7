// Mean cross-entropy over rows of logits with their softmax fused in: the forward reads each row once
// (in cache for its second sweep) and saves only its log-sum-exp; the backward writes
// (softmax - one_hot) * grad / count without a probability tensor in between. Target -1 is ignored.
#include "cpu_kernels.h"

#include <limits>
#include <vector>

namespace mingpt {
namespace {

template <typename T>
float row_logsumexp(const T* row, int64_t V) {
  float max = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : max)
  for (int64_t v = 0; v < V; ++v) max = max > to_float(row[v]) ? max : to_float(row[v]);
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t v = 0; v < V; ++v) sum += exp_approx(to_float(row[v]) - max);
  return max + std::log(sum);
}

template <typename T>
void cross_entropy_forward_kernel(const T* logits, const int64_t* targets, float* lse, float* row_loss,
                                  int64_t rows, int64_t V) {
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / V), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* row = logits + r * V;
      lse[r] = row_logsumexp(row, V);
      row_loss[r] = targets[r] == -1 ? 0.0f : lse[r] - to_float(row[targets[r]]);
    }
  });
}

template <typename T>
void cross_entropy_backward_kernel(const T* logits, const int64_t* targets, const float* lse, float scale,
                                   T* dlogits, int64_t rows, int64_t V) {
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / V), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* row = logits + r * V;
      T* drow = dlogits + r * V;
      const int64_t target = targets[r];
      const float row_scale = target == -1 ? 0.0f : scale, row_lse = lse[r];
#pragma omp simd
      for (int64_t v = 0; v < V; ++v) drow[v] = from_float<T>(exp_approx(to_float(row[v]) - row_lse) * row_scale);
      if (target != -1) drow[target] = from_float<T>((exp_approx(to_float(row[target]) - row_lse) - 1.0f) * scale);
    }
  });
}

// Rows whose target is not -1; fails on a target outside [-1, V).
int64_t count_targets(const at::Tensor& targets, int64_t V, const char* op) {
  const int64_t* t = targets.data_ptr<int64_t>();
  int64_t count = 0;
  for (int64_t r = 0; r < targets.numel(); ++r) {
    TORCH_CHECK_INDEX(t[r] >= -1 && t[r] < V, op, ": target ", t[r], " at row ", r, " is outside [0, ", V,
                      ") and is not the ignore index -1");
    count += t[r] != -1;
  }
  return count;
}

void check_inputs(const at::Tensor& logits, const at::Tensor& targets, const char* op) {
  check_cpu_float(logits, op, "logits");
  TORCH_CHECK(logits.dim() == 2 && logits.size(1) > 0, op, ": logits must have shape (rows, vocab), got ",
              logits.sizes());
  TORCH_CHECK(targets.device().is_cpu() && targets.scalar_type() == at::kLong, op,
              ": targets must be an int64 CPU tensor, got ", targets.scalar_type(), " on ", targets.device());
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == logits.size(0), op, ": targets must have shape (",
              logits.size(0), ",), got ", targets.sizes());
}

// Returns (loss, lse): the float32 mean loss over counted rows (NaN if none counts, as torch gives)
// and each row's float32 log-sum-exp.
std::tuple<at::Tensor, at::Tensor> cross_entropy_forward(const at::Tensor& logits, const at::Tensor& targets) {
  const char* op = "mingpt::cross_entropy_forward";
  check_inputs(logits, targets, op);
  const at::Tensor lc = logits.contiguous(), tc = targets.contiguous();
  const int64_t rows = lc.size(0), V = lc.size(1);
  const int64_t count = count_targets(tc, V, op);
  at::Tensor lse = at::empty({rows}, lc.options().dtype(at::kFloat));
  std::vector<float> row_loss(rows);
  MINGPT_DISPATCH_FLOAT_BF16(lc.scalar_type(), op, [&] {
    cross_entropy_forward_kernel<scalar_t>(lc.data_ptr<scalar_t>(), tc.data_ptr<int64_t>(), lse.data_ptr<float>(),
                                           row_loss.data(), rows, V);
  });
  double total = 0.0;
  for (float l : row_loss) total += l;
  const float mean = count ? float(total / count) : std::numeric_limits<float>::quiet_NaN();
  return {at::full({}, mean, lc.options().dtype(at::kFloat)), lse};
}

at::Tensor cross_entropy_backward(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& targets,
                                  const at::Tensor& lse) {
  const char* op = "mingpt::cross_entropy_backward";
  check_inputs(logits, targets, op);
  TORCH_CHECK(grad_loss.numel() == 1, op, ": grad_loss must hold one value, got shape ", grad_loss.sizes());
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.numel() == logits.size(0), op,
              ": lse must be the float32 log-sum-exp of cross_entropy_forward");
  const at::Tensor lc = logits.contiguous(), tc = targets.contiguous(), lse_c = lse.contiguous();
  const int64_t rows = lc.size(0), V = lc.size(1);
  const int64_t count = count_targets(tc, V, op);
  const float scale = grad_loss.item<float>() / float(count);
  at::Tensor dlogits = at::empty_like(lc);
  MINGPT_DISPATCH_FLOAT_BF16(lc.scalar_type(), op, [&] {
    cross_entropy_backward_kernel<scalar_t>(lc.data_ptr<scalar_t>(), tc.data_ptr<int64_t>(), lse_c.data_ptr<float>(),
                                            scale, dlogits.data_ptr<scalar_t>(), rows, V);
  });
  return dlogits;
}

}  // namespace
}  // namespace mingpt

TORCH_LIBRARY_FRAGMENT(mingpt, m) {
  m.def("cross_entropy_forward(Tensor logits, Tensor targets) -> (Tensor, Tensor)");
  m.def("cross_entropy_backward(Tensor grad_loss, Tensor logits, Tensor targets, Tensor lse) -> Tensor");
}

TORCH_LIBRARY_IMPL(mingpt, CPU, m) {
  m.impl("cross_entropy_forward", &mingpt::cross_entropy_forward);
  m.impl("cross_entropy_backward", &mingpt::cross_entropy_backward);
}
