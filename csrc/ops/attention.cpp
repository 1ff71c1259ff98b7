// Causal self-attention for small heads, reading the fused qkv projection (B, T, 3C) = [q | k | v] as it
// is and writing heads merged (B, T, C). One task per (batch, head): its q, k, v are copied to float32
// scratch that stays in cache, and the products run on blocks of rows held in vector registers.
// The forward keeps only a block of rows of scores at a time and saves the log-sum-exp of each row;
// the backward recomputes the probabilities from it.
// Packed rows: with `starts` (B, T), query i sees only keys starts[b, i]..i (its own review), and a
// block of queries computes scores only from its first row's start (starts do not decrease along T).
#include "cpu_kernels.h"

#include <algorithm>
#include <limits>
#include <vector>

namespace mingpt {
namespace {

constexpr int64_t kRows = 8;  // rows per block: the rows of a product that share each load of the other operand, and
                              // enough independent sums to keep both FMA pipes busy
static_assert(kRows == kLanes, "a block of key rows must be a vector of score columns: the backward reads "
                                "the key block j0 of a query block that starts its scores at the vector holding its start");

const vec8 kKeyIndex = {0, 1, 2, 3, 4, 5, 6, 7};  // the lanes' offsets within a vector of keys

// The lanes of keys j..j+7 that a query sees none of: before its review's start, or after the query.
inline ivec8 hidden_keys(int64_t j, int64_t start, int64_t query) {
  const vec8 key = kKeyIndex + float(j);
  return (key < float(start)) | (key > float(query));
}

// Where the review of position i begins: starts[i] for one batch element, 0 without packing.
inline int64_t start_of(const int64_t* starts, int64_t i) { return starts ? starts[i] : 0; }

// c[r][0..n) = sum over k < K of a[r * a_row + k * a_k] * b[k * ldb + 0..n), for the kRows rows r of a block;
// n is a multiple of kLanes. Each kRows x kLanes tile of c is summed in registers.
inline void block_product(const float* a, int64_t a_row, int64_t a_k, const float* b, int64_t ldb, int64_t K,
                          int64_t n, float* c, int64_t ldc) {
  for (int64_t x = 0; x < n; x += kLanes) {
    vec8 acc[kRows] = {};
    for (int64_t k = 0; k < K; ++k) {
      const vec8 panel = load<vec8>(b + k * ldb + x);
      for (int64_t r = 0; r < kRows; ++r) acc[r] += a[r * a_row + k * a_k] * panel;
    }
    for (int64_t r = 0; r < kRows; ++r) store(c + r * ldc + x, acc[r]);
  }
}

// One head's layout in scratch: rows of q, k, v (and of their gradients) are `width` floats, head_dim
// rounded up to a vector and zero padded, and there are `padded_T` of them (T rounded up to a block);
// k and v transposed are head_dim rows of `keys` floats (T rounded up to a vector), as are rows of scores.
struct HeadShape {
  int64_t T, C, head_dim, width, padded_T, keys;
  HeadShape(int64_t T, int64_t C, int64_t head_dim)
      : T(T), C(C), head_dim(head_dim), width(round_up(head_dim, kLanes)), padded_T(round_up(T, kRows)),
        keys(round_up(T, kLanes)) {}
  int64_t rows_size() const { return padded_T * width; }
  int64_t transposed_size() const { return head_dim * keys; }
  int64_t scores_size() const { return padded_T * keys; }
};

// Batch elements per task: at least about a million multiply-adds, below which another thread costs
// more than it saves.
int64_t batch_grain(const HeadShape& s) {
  return std::max<int64_t>(1, (int64_t(1) << 20) / std::max<int64_t>(1, s.T * s.T * s.C));
}

// One batch element of a (T, parts * C) tensor, each row `parts` slices of C = H * head_dim, to float32
// rows head after head: part p to parts_rows[p]. It reads the source once, in order. Padding columns
// of the rows are never written, so they keep the zeros the scratch starts with.
template <typename T>
void load_heads(const T* src, int parts, const HeadShape& s, int64_t H, float* const* parts_rows) {
  for (int64_t t = 0; t < s.T; ++t) {
    for (int p = 0; p < parts; ++p) {
      for (int64_t h = 0; h < H; ++h) {
        const T* x = src + (t * parts + p) * s.C + h * s.head_dim;
        float* dst = parts_rows[p] + (h * s.padded_T + t) * s.width;
#pragma omp simd
        for (int64_t d = 0; d < s.head_dim; ++d) dst[d] = to_float(x[d]);
      }
    }
  }
}

// The inverse of load_heads: rows head after head, part p from parts_rows[p], to one batch element.
template <typename T>
void store_heads(const float* const* parts_rows, int parts, const HeadShape& s, int64_t H, T* dst) {
  for (int64_t t = 0; t < s.T; ++t) {
    for (int p = 0; p < parts; ++p) {
      for (int64_t h = 0; h < H; ++h) {
        const float* row = parts_rows[p] + (h * s.padded_T + t) * s.width;
        T* y = dst + (t * parts + p) * s.C + h * s.head_dim;
#pragma omp simd
        for (int64_t d = 0; d < s.head_dim; ++d) y[d] = from_float<T>(row[d]);
      }
    }
  }
}

// transposed[d][t] = scale * rows[t][d] for one head
void transpose_head(const float* rows, const HeadShape& s, float scale, float* transposed) {
  for (int64_t d = 0; d < s.head_dim; ++d) {
#pragma omp simd
    for (int64_t t = 0; t < s.T; ++t) transposed[d * s.keys + t] = scale * rows[t * s.width + d];
  }
}

// Softmax attention of one head: out rows = softmax(q kt) v, where kt carries the 1/sqrt(head_dim).
// The keys of a block of rows run from its first row's start (from the vector holding it, for the
// scores) to its last row.
void attend_head(const float* q, const float* kt, const float* v, const int64_t* starts, const HeadShape& s,
                 float* p, float* out, float* lse) {
  for (int64_t i0 = 0; i0 < s.T; i0 += kRows) {
    const int64_t first = start_of(starts, i0), first_vector = first / kLanes * kLanes;
    const int64_t seen = std::min(i0 + kRows, s.T);  // keys that some row of the block sees
    const int64_t seen_padded = round_up(seen, kLanes);
    block_product(q + i0 * s.width, s.width, 1, kt + first_vector, s.keys, s.head_dim, seen_padded - first_vector,
                  p + first_vector, s.keys);
    float inverse_sum[kRows] = {};
    for (int64_t r = 0; r < kRows && i0 + r < s.T; ++r) {
      const int64_t i = i0 + r, start = start_of(starts, i);
      float* p_r = p + r * s.keys;
      vec8 max = vec8{} - std::numeric_limits<float>::infinity();
      for (int64_t j = first_vector; j < seen_padded; j += kLanes) {
        const vec8 score = hidden_keys(j, start, i) ? max : load<vec8>(p_r + j);
        max = score > max ? score : max;
      }
      const float row_max = horizontal_max(max);
      vec8 sum = {};
      for (int64_t j = first_vector; j < seen_padded; j += kLanes) {
        const vec8 e = hidden_keys(j, start, i) ? vec8{} : exp_approx(load<vec8>(p_r + j) - row_max);
        store(p_r + j, e);
        sum += e;
      }
      const float row_sum = horizontal_sum(sum);
      inverse_sum[r] = 1.0f / row_sum;
      lse[i] = row_max + std::log(row_sum);
    }
    float* out_block = out + i0 * s.width;
    block_product(p + first, s.keys, 1, v + first * s.width, s.width, seen - first, s.width, out_block, s.width);
    for (int64_t r = 0; r < kRows; ++r) {
#pragma omp simd
      for (int64_t d = 0; d < s.width; ++d) out_block[r * s.width + d] *= inverse_sum[r];
    }
  }
}

// starts: (B, T), or null for plain causal attention.
template <typename T>
void attention_forward_kernel(const T* qkv, const int64_t* starts, T* out, float* lse, int64_t B, int64_t H,
                              const HeadShape s) {
  const float scale = 1.0f / std::sqrt(float(s.head_dim));
  const int64_t head_rows = s.rows_size();
  at::parallel_for(0, B, batch_grain(s), [&](int64_t begin, int64_t end) {
    std::vector<float> q(H * head_rows), k(H * head_rows), v(H * head_rows), o(H * head_rows);
    std::vector<float> kt(s.transposed_size()), p(kRows * s.keys);
    for (int64_t b = begin; b < end; ++b) {
      float* qkv_rows[] = {q.data(), k.data(), v.data()};
      load_heads(qkv + b * s.T * 3 * s.C, 3, s, H, qkv_rows);
      for (int64_t h = 0; h < H; ++h) {
        transpose_head(k.data() + h * head_rows, s, scale, kt.data());
        attend_head(q.data() + h * head_rows, kt.data(), v.data() + h * head_rows, starts ? starts + b * s.T : nullptr,
                    s, p.data(), o.data() + h * head_rows, lse + (b * H + h) * s.T);
      }
      const float* out_rows[] = {o.data()};
      store_heads(out_rows, 1, s, H, out + b * s.T * s.C);
    }
  });
}

// Gradients of one head. With S = q kt (kt scaled), P = softmax(S) and dP = dO v^T:
// dS = P * (dP - rowsum(P * dP)), dq = scale * dS k, dk = scale * dS^T q, dv = P^T dO.
// A sweep over blocks of query rows recomputes P from lse and forms dS (times scale) and dq, over the
// keys the forward visited; a sweep over blocks of key rows then forms dk and dv from dS and P (both
// zero above the diagonal and before each query's start) over the queries that see some key of the block.
// The scores scratch outlives a head: only the columns this head's query blocks wrote are read.
void attend_head_backward(const float* q, const float* k, const float* kt, const float* vt, const float* dout,
                          const float* lse, const int64_t* starts, const HeadShape& s, float scale, float* p,
                          float* ds, float* dq, float* dk, float* dv) {
  for (int64_t i0 = 0; i0 < s.T; i0 += kRows) {
    const int64_t first = start_of(starts, i0), first_vector = first / kLanes * kLanes;
    const int64_t seen = std::min(i0 + kRows, s.T);
    const int64_t seen_padded = round_up(seen, kLanes), columns = seen_padded - first_vector;
    float* p_block = p + i0 * s.keys + first_vector;
    float* ds_block = ds + i0 * s.keys + first_vector;
    block_product(q + i0 * s.width, s.width, 1, kt + first_vector, s.keys, s.head_dim, columns, p_block, s.keys);
    block_product(dout + i0 * s.width, s.width, 1, vt + first_vector, s.keys, s.head_dim, columns, ds_block, s.keys);
    for (int64_t r = 0; r < kRows && i0 + r < s.T; ++r) {
      const int64_t i = i0 + r, start = start_of(starts, i);
      float* p_r = p_block + r * s.keys;
      float* ds_r = ds_block + r * s.keys;
      for (int64_t j = 0; j < columns; j += kLanes) {
        store(p_r + j, hidden_keys(first_vector + j, start, i) ? vec8{} : exp_approx(load<vec8>(p_r + j) - lse[i]));
      }
      const float p_dp = dot_padded<vec8>(p_r, ds_r, columns);
#pragma omp simd
      for (int64_t j = 0; j < columns; ++j) ds_r[j] = scale * p_r[j] * (ds_r[j] - p_dp);
    }
    const int64_t skipped = first - first_vector;
    block_product(ds_block + skipped, s.keys, 1, k + first * s.width, s.width, seen - first, s.width,
                  dq + i0 * s.width, s.width);
  }
  for (int64_t j0 = 0; j0 < s.T; j0 += kRows) {
    // the queries past the last that starts at or before this block's last key see none of it
    const int64_t end = starts ? std::upper_bound(starts + j0, starts + s.T, j0 + kRows - 1) - starts : s.T;
    const int64_t diagonal = j0 * s.keys + j0, queries = end - j0;
    block_product(ds + diagonal, 1, s.keys, q + j0 * s.width, s.width, queries, s.width, dk + j0 * s.width, s.width);
    block_product(p + diagonal, 1, s.keys, dout + j0 * s.width, s.width, queries, s.width, dv + j0 * s.width,
                  s.width);
  }
}

template <typename T>
void attention_backward_kernel(const T* dout, const T* qkv, const float* lse, const int64_t* starts, T* dqkv,
                               int64_t B, int64_t H, const HeadShape s) {
  const float scale = 1.0f / std::sqrt(float(s.head_dim));
  const int64_t head_rows = s.rows_size();
  at::parallel_for(0, B, batch_grain(s), [&](int64_t begin, int64_t end) {
    std::vector<float> q(H * head_rows), k(H * head_rows), v(H * head_rows), dout_rows(H * head_rows);
    std::vector<float> dq(H * head_rows), dk(H * head_rows), dv(H * head_rows);
    std::vector<float> kt(s.transposed_size()), vt(s.transposed_size()), p(s.scores_size()), ds(s.scores_size());
    for (int64_t b = begin; b < end; ++b) {
      float* qkv_rows[] = {q.data(), k.data(), v.data()};
      load_heads(qkv + b * s.T * 3 * s.C, 3, s, H, qkv_rows);
      float* dout_parts[] = {dout_rows.data()};
      load_heads(dout + b * s.T * s.C, 1, s, H, dout_parts);
      for (int64_t h = 0; h < H; ++h) {
        const int64_t at = h * head_rows;
        transpose_head(k.data() + at, s, scale, kt.data());
        transpose_head(v.data() + at, s, 1.0f, vt.data());
        attend_head_backward(q.data() + at, k.data() + at, kt.data(), vt.data(), dout_rows.data() + at,
                             lse + (b * H + h) * s.T, starts ? starts + b * s.T : nullptr, s, scale, p.data(),
                             ds.data(), dq.data() + at, dk.data() + at, dv.data() + at);
      }
      const float* dqkv_rows[] = {dq.data(), dk.data(), dv.data()};
      store_heads(dqkv_rows, 3, s, H, dqkv + b * s.T * 3 * s.C);
    }
  });
}

HeadShape check_qkv(const at::Tensor& qkv, int64_t n_head, const char* op) {
  check_cpu_float(qkv, op, "qkv");
  TORCH_CHECK(qkv.dim() == 3 && qkv.size(2) % 3 == 0, op, ": qkv must have shape (B, T, 3*C), got ", qkv.sizes());
  const int64_t C = qkv.size(2) / 3;
  TORCH_CHECK(n_head >= 1 && C % n_head == 0, op, ": C=", C, " is not divisible by n_head=", n_head);
  return HeadShape(qkv.size(1), C, C / n_head);
}

// starts, contiguous, or an undefined tensor without them. The kernels read only within a row's review,
// so its bounds and order are checked here too, not only by the Python wrapper.
at::Tensor check_starts(const std::optional<at::Tensor>& starts, int64_t B, int64_t T, const char* op) {
  if (!starts.has_value()) return at::Tensor();
  const at::Tensor& t = *starts;
  TORCH_CHECK(t.device().is_cpu(), op, ": starts must be a CPU tensor, got one on ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kLong, op, ": starts must be int64, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 2 && t.size(0) == B && t.size(1) == T, op, ": starts must have shape (", B, ", ", T,
              "), got ", t.sizes());
  at::Tensor c = t.contiguous();
  const int64_t* row = c.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b, row += T) {
    for (int64_t i = 0; i < T; ++i) {
      TORCH_CHECK(row[i] >= 0 && row[i] <= i, op, ": starts[", b, ", ", i, "] = ", row[i], " is outside 0..", i,
                  " (a review starts at or before each position it holds)");
      TORCH_CHECK(i == 0 || row[i] >= row[i - 1], op, ": starts decreases along T at [", b, ", ", i, "] (",
                  row[i - 1], " then ", row[i], ")");
    }
  }
  return c;
}

const int64_t* starts_data(const at::Tensor& starts) { return starts.defined() ? starts.data_ptr<int64_t>() : nullptr; }

// Returns (out, lse): out (B, T, C) in qkv's dtype, lse (B, n_head, T) float32.
std::tuple<at::Tensor, at::Tensor> causal_attention_forward(const at::Tensor& qkv, int64_t n_head,
                                                            const std::optional<at::Tensor>& starts) {
  const char* op = "mingpt::causal_attention_forward";
  const HeadShape s = check_qkv(qkv, n_head, op);
  const int64_t B = qkv.size(0);
  const at::Tensor starts_c = check_starts(starts, B, s.T, op);
  const at::Tensor qkv_c = qkv.contiguous();
  at::Tensor out = at::empty({B, s.T, s.C}, qkv.options());
  at::Tensor lse = at::zeros({B, n_head, s.T}, qkv.options().dtype(at::kFloat));
  if (qkv.numel() == 0) return {out, lse};
  MINGPT_DISPATCH_FLOAT_BF16(qkv.scalar_type(), op, [&] {
    attention_forward_kernel<scalar_t>(qkv_c.data_ptr<scalar_t>(), starts_data(starts_c), out.data_ptr<scalar_t>(),
                                       lse.data_ptr<float>(), B, n_head, s);
  });
  return {out, lse};
}

at::Tensor causal_attention_backward(const at::Tensor& grad_out, const at::Tensor& qkv, const at::Tensor& lse,
                                     int64_t n_head, const std::optional<at::Tensor>& starts) {
  const char* op = "mingpt::causal_attention_backward";
  const HeadShape s = check_qkv(qkv, n_head, op);
  const int64_t B = qkv.size(0);
  TORCH_CHECK(grad_out.dim() == 3 && grad_out.size(0) == B && grad_out.size(1) == s.T && grad_out.size(2) == s.C &&
                  grad_out.scalar_type() == qkv.scalar_type(),
              op, ": grad_out must be ", qkv.scalar_type(), " of shape (", B, ", ", s.T, ", ", s.C, "), got ",
              grad_out.scalar_type(), " of shape ", grad_out.sizes());
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.numel() == B * n_head * s.T, op,
              ": lse must be the float32 log-sum-exp of causal_attention_forward");
  const at::Tensor starts_c = check_starts(starts, B, s.T, op);
  const at::Tensor qkv_c = qkv.contiguous(), dout_c = grad_out.contiguous(), lse_c = lse.contiguous();
  at::Tensor dqkv = at::empty_like(qkv_c);
  if (qkv.numel() == 0) return dqkv;
  MINGPT_DISPATCH_FLOAT_BF16(qkv.scalar_type(), op, [&] {
    attention_backward_kernel<scalar_t>(dout_c.data_ptr<scalar_t>(), qkv_c.data_ptr<scalar_t>(),
                                        lse_c.data_ptr<float>(), starts_data(starts_c), dqkv.data_ptr<scalar_t>(), B,
                                        n_head, s);
  });
  return dqkv;
}

}  // namespace
}  // namespace mingpt

TORCH_LIBRARY_FRAGMENT(mingpt, m) {
  m.def("causal_attention_forward(Tensor qkv, int n_head, Tensor? starts=None) -> (Tensor, Tensor)");
  m.def("causal_attention_backward(Tensor grad_out, Tensor qkv, Tensor lse, int n_head, Tensor? starts=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(mingpt, CPU, m) {
  m.impl("causal_attention_forward", &mingpt::causal_attention_forward);
  m.impl("causal_attention_backward", &mingpt::causal_attention_backward);
}
