// The panel kernels of each weight format: out (16 lanes) = panel . x for a tile of input rows.
//
// Every format stores a panel's k-step as one 64-byte line of 16 lanes (output rows) x 4 bytes: one
// fp32 weight per lane, two bf16 weights (the even k in the low half) or four int8 weights (k ascending
// from the low byte, stored offset by 128 as unsigned bytes: VNNI multiplies unsigned by signed bytes).
// Each format has a portable kernel (GCC vector code: AVX-512 or narrower, whatever the compiler targets;
// AVX2 intrinsics where that is the widest) that decodes the weights to fp32 and multiplies the fp32 rows;
// where the CPU has them, bf16
// and int8 also have a dot-product kernel (vdpbf16ps, vpdpbusd) that reads the rows rounded to bf16 or
// quantised to int8 (per row and group of 64 values).
#pragma once

// The AVX-512 paths below compile only where the compiler targets them; elsewhere (another x86 or a
// non-x86 machine such as ARM) the portable vector code serves, and there is no immintrin.h to include.
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <utility>
#include <vector>

#include "simd.h"

namespace mingpt {
namespace sampler {

constexpr int kLanes = lanes_of<vec16>;
// Batch rows per matrix tile: one accumulator (16 lanes) each, all of them in registers with the weights'
// line beside them: 32 512-bit registers hold 12; 16 256-bit registers (AVX2), two per accumulator, 6.
#if defined(__AVX512F__)
constexpr int kMaxTile = 12;
#elif defined(__AVX__)
constexpr int kMaxTile = 6;
#else
constexpr int kMaxTile = 3;
#endif
constexpr int kGroupSteps = 16;    // int8 dot products: k-steps (4 values each) per activation scale

enum class WeightFormat { fp32, bf16, int8 };
enum class Kernel { fp32, bf16_portable, bf16_dot, int8_portable, int8_vnni };

#if defined(__AVX512BF16__)
constexpr bool kHasBf16Dot = true;
#else
constexpr bool kHasBf16Dot = false;
#endif
#if defined(__AVX512VNNI__)
constexpr bool kHasVnni = true;
#else
constexpr bool kHasVnni = false;
#endif

// Values per lane in one k-step of a format.
inline int values_per_step(WeightFormat f) { return f == WeightFormat::fp32 ? 1 : f == WeightFormat::bf16 ? 2 : 4; }

// The kernel that reads a format: its dot-product one where this build has it, unless portable is asked for.
inline Kernel kernel_for(WeightFormat f, bool portable) {
  if (f == WeightFormat::bf16) return kHasBf16Dot && !portable ? Kernel::bf16_dot : Kernel::bf16_portable;
  if (f == WeightFormat::int8) return kHasVnni && !portable ? Kernel::int8_vnni : Kernel::int8_portable;
  return Kernel::fp32;
}

// fp32 to bf16, rounding to nearest even (NaN stays NaN).
inline uint16_t to_bf16(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  if (std::isnan(x)) return uint16_t((bits >> 16) | 0x40);
  return uint16_t((bits + 0x7fff + ((bits >> 16) & 1)) >> 16);
}

// The rows of one matrix product as its kernel reads them.
struct KernelInput {
  const float* x;            // the fp32 rows, stride ld (every kernel but the dot-product ones)
  int ld;
  const uint32_t* packed;    // bf16_dot: bf16 pairs, int8_vnni: signed int8 quads; one per k-step, stride steps
  int steps;
  const float* group_scale;  // int8_vnni: per row and group of kGroupSteps k-steps
  const int32_t* group_sum;  //   the sum of the group's quantised values (the offset of the weights' 128)
  int groups;
  const float* row_sum;      // int8_portable: the sum of each row's values
};

// One thread's buffers for the rows of a matrix product in the forms the kernels read.
class KernelScratch {
 public:
  KernelScratch(int max_rows, int max_cols)
      : packed_(size_t(max_rows) * (max_cols / 2 + 4)), scale_(size_t(max_rows) * groups_of(max_cols / 2 + 4)),
        sum_(scale_.size()), row_sum_(max_rows) {}

  // rows x (steps * values per step) of x, zero past the matrix's columns.
  KernelInput prepare(Kernel kernel, const float* x, int ld, int rows, int steps) {
    KernelInput in{x, ld, packed_.data(), steps, scale_.data(), sum_.data(), groups_of(steps), row_sum_.data()};
    for (int r = 0; r < rows; ++r) {
      const float* row = x + size_t(r) * ld;
      if (kernel == Kernel::bf16_dot) {
        round_row(row, steps, packed_.data() + size_t(r) * steps);
      } else if (kernel == Kernel::int8_vnni) {
        quantise_row(row, steps, packed_.data() + size_t(r) * steps, scale_.data() + size_t(r) * in.groups,
                     sum_.data() + size_t(r) * in.groups);
      } else if (kernel == Kernel::int8_portable) {
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int k = 0; k < 4 * steps; ++k) sum += row[k];
        row_sum_[r] = sum;
      }
    }
    return in;
  }

 private:
  static int groups_of(int steps) { return (steps + kGroupSteps - 1) / kGroupSteps; }

  // The row in bf16, the pairs of a k-step in one word (the even k in the low half).
  static void round_row(const float* row, int steps, uint32_t* pairs) {
    int k = 0;
#if defined(__AVX512BF16__)
    for (; 2 * k + 32 <= 2 * steps; k += 16) {
      const __m512bh both = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(row + 2 * k + 16), _mm512_loadu_ps(row + 2 * k));
      _mm512_storeu_si512(pairs + k, (__m512i)both);
    }
#endif
    for (; k < steps; ++k) pairs[k] = to_bf16(row[2 * k]) | uint32_t(to_bf16(row[2 * k + 1])) << 16;
  }

  // Symmetric int8 per group of kGroupSteps quads: q = round(x * 127 / max |x|).
  static void quantise_row(const float* row, int steps, uint32_t* quads, float* scales, int32_t* sums) {
    for (int g = 0; g * kGroupSteps < steps; ++g) {
      const int k0 = g * kGroupSteps * 4, k1 = std::min(steps, (g + 1) * kGroupSteps) * 4;
      float max = 0.0f;
      for (int k = k0; k < k1; ++k) max = std::max(max, std::fabs(row[k]));
      const float inverse = max > 0.0f ? 127.0f / max : 0.0f;
      scales[g] = max / 127.0f;
      if (k1 - k0 == 4 * kGroupSteps) {
        sums[g] = quantise_group(row + k0, inverse, quads + k0 / 4);
        continue;
      }
      int32_t sum = 0;
      for (int k = k0; k < k1; k += 4) {
        uint32_t quad = 0;
        for (int j = 0; j < 4; ++j) {
          const int q = int(std::nearbyint(row[k + j] * inverse));
          sum += q;
          quad |= uint32_t(uint8_t(int8_t(q))) << (8 * j);
        }
        quads[k / 4] = quad;
      }
      sums[g] = sum;
    }
  }

  // A whole group of 4 * kGroupSteps values, 16 at a time; returns the sum of their quantised values.
  static int32_t quantise_group(const float* values, float inverse, uint32_t* quads) {
    typedef int8_t bytes16 __attribute__((vector_size(16)));
    const float round_shift = 12582912.0f;  // 1.5 * 2^23: adding it rounds |x| < 2^22 to nearest even
    ivec16 sum{};
    for (int k = 0; k < 4 * kGroupSteps; k += kLanes) {
      const ivec16 q = __builtin_convertvector((load<vec16>(values + k) * inverse + round_shift) - round_shift, ivec16);
      sum += q;
      const bytes16 bytes = __builtin_convertvector(q, bytes16);
      std::memcpy(quads + k / 4, &bytes, sizeof bytes);
    }
    int32_t total = 0;
    for (int l = 0; l < kLanes; ++l) total += sum[l];
    return total;
  }

  std::vector<uint32_t> packed_;
  std::vector<float> scale_;
  std::vector<int32_t> sum_;
  std::vector<float> row_sum_;
};

// The kernels that accumulate in fp32: decode(line) reads a k-step's weights once for the whole tile,
// add(acc, weights, input, row, k) adds row's contribution at step k, finish corrects the sum.
struct Fp32Kernel {
  using Weights = vec16;
  static Weights decode(const float* line) { return load<vec16>(line); }
  static void add(vec16& acc, const Weights& w, const KernelInput& in, int row, int k) {
    acc += w * in.x[size_t(row) * in.ld + k];
  }
  static vec16 finish(vec16 sum, const KernelInput&, int) { return sum; }
};

struct Bf16PortableKernel {
  using Weights = std::array<vec16, 2>;
  static Weights decode(const float* line) {
    const ivec16 pairs = load<ivec16>(line);
    return {(vec16)(pairs << 16), (vec16)(pairs & int32_t(0xffff0000u))};
  }
  static void add(vec16& acc, const Weights& w, const KernelInput& in, int row, int k) {
    const float* x = in.x + size_t(row) * in.ld + 2 * k;
    acc += w[0] * x[0];
    acc += w[1] * x[1];
  }
  static vec16 finish(vec16 sum, const KernelInput&, int) { return sum; }
};

// Accumulates sum (w + 128) x; finish subtracts 128 sum x.
struct Int8PortableKernel {
  using Weights = std::array<vec16, 4>;
  static Weights decode(const float* line) {
    const ivec16 quads = load<ivec16>(line);
    Weights w;
    for (int j = 0; j < 4; ++j) w[j] = __builtin_convertvector((quads >> (8 * j)) & 0xff, vec16);
    return w;
  }
  static void add(vec16& acc, const Weights& w, const KernelInput& in, int row, int k) {
    const float* x = in.x + size_t(row) * in.ld + 4 * k;
    for (int j = 0; j < 4; ++j) acc += w[j] * x[j];
  }
  static vec16 finish(vec16 sum, const KernelInput& in, int row) { return sum - 128.0f * in.row_sum[row]; }
};

#if defined(__AVX512BF16__)
struct Bf16DotKernel {
  using Weights = __m512bh;
  static Weights decode(const float* line) { return (__m512bh)_mm512_loadu_si512(line); }
  static void add(vec16& acc, const Weights& w, const KernelInput& in, int row, int k) {
    const __m512i pair = _mm512_set1_epi32(int(in.packed[size_t(row) * in.steps + k]));
    acc = (vec16)_mm512_dpbf16_ps((__m512)acc, w, (__m512bh)pair);
  }
  static vec16 finish(vec16 sum, const KernelInput&, int) { return sum; }
};
#endif

// out[b] (16 lanes) = panel . row r0 + b for NB rows over `steps` k-steps, prefetching `ahead` (a later
// panel) line by line. Small tiles split k over several accumulators so that the latency of the
// multiply-adds does not bound them.
template <class K, int NB>
void float_tile(const float* panel, int steps, const KernelInput& in, int r0, const float* ahead, vec16* out) {
  constexpr int kSplit = NB == 1 ? 4 : NB <= 3 ? 2 : 1;
  vec16 acc[kSplit][NB];
  for (int s = 0; s < kSplit; ++s)
    for (int b = 0; b < NB; ++b) acc[s][b] = vec16{};
  int k = 0;
  for (; k + kSplit <= steps; k += kSplit) {
#pragma GCC unroll 4
    for (int s = 0; s < kSplit; ++s) {
      __builtin_prefetch(ahead + size_t(k + s) * kLanes);
      const typename K::Weights w = K::decode(panel + size_t(k + s) * kLanes);
#pragma GCC unroll 12
      for (int b = 0; b < NB; ++b) K::add(acc[s][b], w, in, r0 + b, k + s);
    }
  }
  for (; k < steps; ++k) {
    const typename K::Weights w = K::decode(panel + size_t(k) * kLanes);
    for (int b = 0; b < NB; ++b) K::add(acc[0][b], w, in, r0 + b, k);
  }
  for (int b = 0; b < NB; ++b) {
    vec16 sum = acc[0][b];
    for (int s = 1; s < kSplit; ++s) sum += acc[s][b];
    out[b] = K::finish(sum, in, r0 + b);
  }
}

#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
// The portable kernels for 256-bit registers: each accumulator as two named halves. GCC keeps arrays of
// 16-lane vectors it has to split in two on the stack (every multiply-add a store and a reload); these
// stay in registers. The same multiply-adds in the same order: the same sums, bit for bit. Each format's
// `decode(line, j, lo, hi)` gives the j-th of its kValues weights a lane in a k-step.
struct Fp32Avx2 {
  static constexpr int kValues = 1;
  static void decode(const float* line, int, __m256& lo, __m256& hi) {
    lo = _mm256_loadu_ps(line);
    hi = _mm256_loadu_ps(line + 8);
  }
  static float correction(const KernelInput&, int) { return 0.0f; }
};

struct Bf16Avx2 {
  static constexpr int kValues = 2;
  static void decode(const float* line, int j, __m256& lo, __m256& hi) {
    const __m256i mask = _mm256_set1_epi32(int32_t(0xffff0000u));
    const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(line));
    const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(line + 8));
    lo = _mm256_castsi256_ps(j == 0 ? _mm256_slli_epi32(a, 16) : _mm256_and_si256(a, mask));
    hi = _mm256_castsi256_ps(j == 0 ? _mm256_slli_epi32(b, 16) : _mm256_and_si256(b, mask));
  }
  static float correction(const KernelInput&, int) { return 0.0f; }
};

// Accumulates sum (w + 128) x; the correction subtracts 128 sum x.
struct Int8Avx2 {
  static constexpr int kValues = 4;
  static void decode(const float* line, int j, __m256& lo, __m256& hi) {
    const __m256i byte = _mm256_set1_epi32(0xff);
    const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(line));
    const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(line + 8));
    lo = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(a, 8 * j), byte));
    hi = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(b, 8 * j), byte));
  }
  static float correction(const KernelInput& in, int row) { return -128.0f * in.row_sum[row]; }
};

// Steps k0 .. k1 - 1 (a multiple of kSplit of them) into the accumulators, copied in and out: GCC keeps
// accumulators it can see read after the loop in memory, stored at every step.
template <class K, int NB, int kSplit>
inline void avx2_steps(const float* panel, int k0, int k1, const float* x, int ld, const float* ahead,
                       __m256 (&lo_io)[kSplit][NB], __m256 (&hi_io)[kSplit][NB]) {
  if (k0 >= k1) return;
  __m256 lo[kSplit][NB], hi[kSplit][NB];
  for (int s = 0; s < kSplit; ++s)
    for (int b = 0; b < NB; ++b) lo[s][b] = lo_io[s][b], hi[s][b] = hi_io[s][b];
  for (int k = k0; k < k1; k += kSplit) {
#pragma GCC unroll 4
    for (int s = 0; s < kSplit; ++s) {
      const float* line = panel + size_t(k + s) * kLanes;
      __builtin_prefetch(ahead + size_t(k + s) * kLanes);
#pragma GCC unroll 4
      for (int j = 0; j < K::kValues; ++j) {
        __m256 w_lo, w_hi;
        K::decode(line, j, w_lo, w_hi);
#pragma GCC unroll 12
        for (int b = 0; b < NB; ++b) {
          const __m256 xb = _mm256_broadcast_ss(x + size_t(b) * ld + K::kValues * (k + s) + j);
          lo[s][b] = _mm256_fmadd_ps(w_lo, xb, lo[s][b]);
          hi[s][b] = _mm256_fmadd_ps(w_hi, xb, hi[s][b]);
        }
      }
    }
  }
  for (int s = 0; s < kSplit; ++s)
    for (int b = 0; b < NB; ++b) lo_io[s][b] = lo[s][b], hi_io[s][b] = hi[s][b];
}

template <class K, int NB>
void avx2_tile(const float* panel, int steps, const KernelInput& in, int r0, const float* ahead, vec16* out) {
  constexpr int kSplit = NB == 1 ? 4 : NB <= 3 ? 2 : 1;
  __m256 lo[kSplit][NB], hi[kSplit][NB];
  for (int s = 0; s < kSplit; ++s)
    for (int b = 0; b < NB; ++b) lo[s][b] = hi[s][b] = _mm256_setzero_ps();
  const float* x = in.x + size_t(r0) * in.ld;
  const int split_steps = steps / kSplit * kSplit;
  avx2_steps<K, NB, kSplit>(panel, 0, split_steps, x, in.ld, ahead, lo, hi);
  if constexpr (kSplit > 1) {  // the last steps, fewer than kSplit, go to the first accumulators
    __m256(&lo0)[1][NB] = reinterpret_cast<__m256(&)[1][NB]>(lo[0]);
    __m256(&hi0)[1][NB] = reinterpret_cast<__m256(&)[1][NB]>(hi[0]);
    avx2_steps<K, NB, 1>(panel, split_steps, steps, x, in.ld, ahead, lo0, hi0);
  }
  for (int b = 0; b < NB; ++b) {
    __m256 sum_lo = lo[0][b], sum_hi = hi[0][b];
    for (int s = 1; s < kSplit; ++s) {
      sum_lo = _mm256_add_ps(sum_lo, lo[s][b]);
      sum_hi = _mm256_add_ps(sum_hi, hi[s][b]);
    }
    const __m256 correction = _mm256_set1_ps(K::correction(in, r0 + b));
    float* lanes = reinterpret_cast<float*>(out + b);
    _mm256_storeu_ps(lanes, _mm256_add_ps(sum_lo, correction));
    _mm256_storeu_ps(lanes + 8, _mm256_add_ps(sum_hi, correction));
  }
}
#endif

#if defined(__AVX512VNNI__)
// int8 weights (offset by 128) times int8 rows: exact int32 sums per group of kGroupSteps k-steps, each
// corrected for the offset and scaled by its row's group scale into the fp32 total.
template <int NB>
void int8_vnni_tile(const float* panel, int steps, const KernelInput& in, int r0, const float* ahead, vec16* out) {
  constexpr int kSplit = NB == 1 ? 4 : NB <= 3 ? 2 : 1;
  vec16 total[NB];
  for (int b = 0; b < NB; ++b) total[b] = vec16{};
  for (int g = 0; g < in.groups; ++g) {
    const int k1 = std::min(steps, (g + 1) * kGroupSteps);
    __m512i acc[kSplit][NB];
    for (int s = 0; s < kSplit; ++s)
      for (int b = 0; b < NB; ++b) acc[s][b] = _mm512_setzero_si512();
    int k = g * kGroupSteps;
    const auto step = [&](int s, int k) {
      __builtin_prefetch(ahead + size_t(k) * kLanes);
      const __m512i w = _mm512_loadu_si512(panel + size_t(k) * kLanes);
#pragma GCC unroll 12
      for (int b = 0; b < NB; ++b)
        acc[s][b] = _mm512_dpbusd_epi32(acc[s][b], w, _mm512_set1_epi32(int(in.packed[size_t(r0 + b) * steps + k])));
    };
    for (; k + kSplit <= k1; k += kSplit)
#pragma GCC unroll 4
      for (int s = 0; s < kSplit; ++s) step(s, k + s);
    for (; k < k1; ++k) step(0, k);
    for (int b = 0; b < NB; ++b) {
      __m512i sum = acc[0][b];
      for (int s = 1; s < kSplit; ++s) sum = _mm512_add_epi32(sum, acc[s][b]);
      const size_t at = size_t(r0 + b) * in.groups + g;
      sum = _mm512_sub_epi32(sum, _mm512_set1_epi32(128 * in.group_sum[at]));
      total[b] += (vec16)_mm512_cvtepi32_ps(sum) * in.group_scale[at];
    }
  }
  for (int b = 0; b < NB; ++b) out[b] = total[b];
}
#endif

using TileFn = void (*)(const float*, int, const KernelInput&, int, const float*, vec16*);
using TileTable = std::array<TileFn, kMaxTile>;

template <class K, int... N>
constexpr TileTable float_tiles(std::integer_sequence<int, N...>) {
  return {&float_tile<K, N + 1>...};
}
#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
template <class K, int... N>
constexpr TileTable avx2_tiles(std::integer_sequence<int, N...>) {
  return {&avx2_tile<K, N + 1>...};
}
#endif
#if defined(__AVX512VNNI__)
template <int... N>
constexpr TileTable int8_vnni_tiles(std::integer_sequence<int, N...>) {
  return {&int8_vnni_tile<N + 1>...};
}
#endif

// The tile functions of a kernel, indexed by tile rows - 1.
inline const TileTable& tiles_of(Kernel kernel) {
  constexpr auto rows = std::make_integer_sequence<int, kMaxTile>{};
#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
  static constexpr TileTable fp32 = avx2_tiles<Fp32Avx2>(rows);
  static constexpr TileTable bf16_portable = avx2_tiles<Bf16Avx2>(rows);
  static constexpr TileTable int8_portable = avx2_tiles<Int8Avx2>(rows);
#else
  static constexpr TileTable fp32 = float_tiles<Fp32Kernel>(rows);
  static constexpr TileTable bf16_portable = float_tiles<Bf16PortableKernel>(rows);
  static constexpr TileTable int8_portable = float_tiles<Int8PortableKernel>(rows);
#endif
  switch (kernel) {
#if defined(__AVX512BF16__)
    case Kernel::bf16_dot: {
      static constexpr TileTable bf16_dot = float_tiles<Bf16DotKernel>(rows);
      return bf16_dot;
    }
#endif
#if defined(__AVX512VNNI__)
    case Kernel::int8_vnni: {
      static constexpr TileTable int8_vnni = int8_vnni_tiles(rows);
      return int8_vnni;
    }
#endif
    case Kernel::bf16_portable: return bf16_portable;
    case Kernel::int8_portable: return int8_portable;
    default: return fp32;
  }
}

}  // namespace sampler
}  // namespace mingpt
