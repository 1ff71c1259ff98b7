// Inverted dropout with a counter-based mask: element i is kept when a hash of (seed, i) clears the
// drop threshold. The backward recomputes the mask from the same seed, so nothing but the seed is
// saved, and every thread draws its elements independently (torch's bernoulli_ runs on one thread).
#include "cpu_kernels.h"

namespace mingpt {
namespace {

constexpr int64_t kGrain = 1 << 14;
constexpr int kHashLanes = 16;

typedef uint32_t uvec16 __attribute__((vector_size(kHashLanes * sizeof(uint32_t))));
typedef uint16_t u16vec16 __attribute__((vector_size(kHashLanes * sizeof(uint16_t))));

// splitmix64's finaliser: the seed and the index's top 32 bits, once per 2^32 elements, become two keys.
inline uint64_t splitmix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// lowbias32 (Wellons' hash prospector): a bijection of 32-bit words with near-ideal avalanche, in 32-bit
// multiplies and shifts that run 16 lanes to a vector. Two rounds keyed by the seed hash the index's low
// 32 bits, so that neighbouring indices and neighbouring seeds give unrelated words.
template <typename U>
inline U lowbias32(U x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}

template <typename U>
inline U element_hash(U index_low, uint32_t key_a, uint32_t key_b) {
  return lowbias32(lowbias32(index_low ^ key_a) + key_b);
}

template <typename T>
inline void load16(const T* p, uvec16& bits);

template <>
inline void load16<float>(const float* p, uvec16& bits) { std::memcpy(&bits, p, sizeof bits); }

template <>
inline void load16<bf16>(const bf16* p, uvec16& bits) {
  u16vec16 halves;
  std::memcpy(&halves, p, sizeof halves);
  bits = __builtin_convertvector(halves, uvec16) << 16;
}

template <typename T>
inline void store16(T* p, vec16 x);

template <>
inline void store16<float>(float* p, vec16 x) { std::memcpy(p, &x, sizeof x); }

// from_float<bf16>'s rounding, 16 lanes at once.
template <>
inline void store16<bf16>(bf16* p, vec16 x) {
  const uvec16 bits = (uvec16)x;
  uvec16 rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  rounded = (uvec16)(x != x) & 0x7FC0u | ~(uvec16)(x != x) & rounded;
  const u16vec16 halves = __builtin_convertvector(rounded, u16vec16);
  std::memcpy(p, &halves, sizeof halves);
}

// Elements whose hash is below the threshold are dropped: P(drop) = threshold / 2^32, within 2^-32 of p.
uint32_t drop_threshold(double p) {
  return uint32_t(std::min<long long>(std::llround(p * 4294967296.0), 0xFFFFFFFFll));
}

template <typename T>
void dropout_span(const T* in, T* out, int64_t begin, int64_t end, uint32_t threshold, float scale, uint64_t seed) {
  const uint64_t key = splitmix64(seed + (uint64_t(begin) >> 32) * 0x9E3779B97F4A7C15ull);
  const uint32_t key_a = uint32_t(key), key_b = uint32_t(key >> 32);
  uvec16 lane;
  for (int l = 0; l < kHashLanes; ++l) lane[l] = uint32_t(l);
  int64_t i = begin;
  for (; i + kHashLanes <= end; i += kHashLanes) {
    const uvec16 keep = (uvec16)(element_hash(lane + uint32_t(i), key_a, key_b) >= threshold);
    uvec16 bits;
    load16(in + i, bits);
    store16(out + i, (vec16)((uvec16)((vec16)bits * scale) & keep));
  }
  for (; i < end; ++i) {
    const bool keep = element_hash(uint32_t(i), key_a, key_b) >= threshold;
    out[i] = from_float<T>(keep ? to_float(in[i]) * scale : 0.0f);
  }
}

template <typename T>
void dropout_kernel(const T* in, T* out, int64_t n, double p, uint64_t seed) {
  const uint32_t threshold = drop_threshold(p);
  const float scale = float(1.0 / (1.0 - p));
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    while (begin < end) {  // spans that do not cross a multiple of 2^32, where the keys change
      const int64_t span_end = std::min<int64_t>(end, ((begin >> 32) + 1) << 32);
      dropout_span(in, out, begin, span_end, threshold, scale, seed);
      begin = span_end;
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
