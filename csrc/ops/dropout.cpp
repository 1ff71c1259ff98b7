// Inverted dropout with a counter-based mask: element i is kept when a hash of (seed, i) clears the
// drop threshold. The backward recomputes the mask from the same seed, so nothing but the seed is
// saved, and every thread draws its elements independently (torch's bernoulli_ runs on one thread).
#include "cpu_kernels.h"

namespace mingpt {
namespace {

constexpr int64_t kGrain = 1 << 14;

// splitmix64's finaliser over seed + i * golden ratio: a bijection of the counter whose top 32 bits
// pass BigCrush, computed in a few multiplies that vectorise.
inline uint32_t element_hash(uint64_t seed, uint64_t i) {
  uint64_t z = seed + (i + 1) * 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return uint32_t((z ^ (z >> 31)) >> 32);
}

// Elements whose hash is below the threshold are dropped: P(drop) = threshold / 2^32, within 2^-32 of p.
uint64_t drop_threshold(double p) { return uint64_t(std::llround(p * 4294967296.0)); }

template <typename T>
void dropout_kernel(const T* in, T* out, int64_t n, double p, uint64_t seed) {
  const uint64_t threshold = drop_threshold(p);
  const float scale = float(1.0 / (1.0 - p));
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
#pragma omp simd
    for (int64_t i = begin; i < end; ++i) {
      const bool keep = element_hash(seed, uint64_t(i)) >= threshold;
      out[i] = from_float<T>(keep ? to_float(in[i]) * scale : 0.0f);
    }
  });
}

// The backward is this same op applied to the gradient with the same seed: the same mask, the same scale.
// The seed is an int64 scalar tensor, so that a compiled graph carries it as an input.
at::Tensor dropout(const at::Tensor& x, double p, const at::Tensor& seed_tensor) {
  const char* op = "mingpt::dropout";
  check_cpu_float(x, op, "x");
  TORCH_CHECK(p >= 0.0 && p < 1.0, op, ": p must be in [0, 1), got ", p);
  TORCH_CHECK(seed_tensor.device().is_cpu() && seed_tensor.scalar_type() == at::kLong && seed_tensor.numel() == 1,
              op, ": seed must be an int64 CPU tensor of one element, got ", seed_tensor.scalar_type(), " of shape ",
              seed_tensor.sizes(), " on ", seed_tensor.device());
  const int64_t seed = seed_tensor.item<int64_t>();
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty_like(xc);
  MINGPT_DISPATCH_FLOAT_BF16(x.scalar_type(), op, [&] {
    dropout_kernel<scalar_t>(xc.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), xc.numel(), p, uint64_t(seed));
  });
  return y;
}

}  // namespace
}  // namespace mingpt

TORCH_LIBRARY_FRAGMENT(mingpt, m) { m.def("dropout(Tensor x, float p, Tensor seed) -> Tensor"); }

TORCH_LIBRARY_IMPL(mingpt, CPU, m) { m.impl("dropout", &mingpt::dropout); }
