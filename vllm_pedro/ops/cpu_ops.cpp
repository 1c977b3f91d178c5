// PEDRO's CPU ops, as torch custom ops in the vllm_pedro_cpu namespace:
//   pool_prompts  the prefill pooler (below)
//   scale_rows_   the in-place gather-multiply of the decode path (at the end of the file)
//
// pool_prompts:
// Each prompt is a span of the step's flat batch x[T, d]: tokens starts[s] .. starts[s] +
// lengths[s] - 1, read in place (no gather of the hidden states). One task per prompt:
//   attention: scores x_t . pool_w[row] for its tokens, softmax, weighted sum
//   mean:      the sum of its tokens times 1/n
//   last:      its last token
// The prompt's tokens are read twice by the attention pooler (scores, then the weighted
// sum); the second pass finds them in the core's cache. Math in float32 for every input
// dtype; out[S, d] is float32. The pooler codes are vllm_pedro.generator.POOLER_CODES.
//
// Built on first use by vllm_pedro/ops/cpu.py (torch.utils.cpp_extension.load), with the
// vector ISA the machine has; the `omp simd` reductions let the compiler vectorise the dot
// products without -ffast-math (only these sums are reordered).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

constexpr int64_t ATTENTION = 0, LAST = 1, MEAN = 2;

template <typename T>
inline float dot(const T* x, const float* w, int64_t d) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t k = 0; k < d; ++k) acc += static_cast<float>(x[k]) * w[k];
  return acc;
}

template <typename T>
inline void axpy(float a, const T* x, float* y, int64_t d) {
#pragma omp simd
  for (int64_t k = 0; k < d; ++k) y[k] += a * static_cast<float>(x[k]);
}

template <typename T>
void pool(const at::Tensor& x, const int64_t* start, const int64_t* len, const int64_t* row, const int64_t* code,
          const T* pool_w, int64_t w_stride, float* out, int64_t S) {
  const int64_t d = x.size(1), xs = x.stride(0);
  const T* X = x.data_ptr<T>();
  at::parallel_for(0, S, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> w(d), p;
    for (int64_t s = begin; s < end; ++s) {
      float* o = out + s * d;
      std::fill(o, o + d, 0.f);
      const int64_t n = len[s], c = code[row[s]];
      const T* x0 = X + start[s] * xs;
      if (n <= 0) continue;
      if (c == LAST) {
        axpy(1.f, x0 + (n - 1) * xs, o, d);
        continue;
      }
      p.assign(n, 1.f / static_cast<float>(n));  // mean: the reference's weights 1/n
      if (c == ATTENTION) {
        const T* pw = pool_w + row[s] * w_stride;
        for (int64_t k = 0; k < d; ++k) w[k] = static_cast<float>(pw[k]);
        float m = -std::numeric_limits<float>::infinity(), z = 0.f;
        for (int64_t t = 0; t < n; ++t) m = std::max(m, p[t] = dot(x0 + t * xs, w.data(), d));
        for (int64_t t = 0; t < n; ++t) z += (p[t] = std::exp(p[t] - m));
        for (int64_t t = 0; t < n; ++t) p[t] /= z;
      }
      for (int64_t t = 0; t < n; ++t) axpy(p[t], x0 + t * xs, o, d);
    }
  });
}

void pool_prompts(const at::Tensor& x, const at::Tensor& starts, const at::Tensor& lengths, const at::Tensor& rows,
                  const at::Tensor& pooler_code, const std::optional<at::Tensor>& pool_w, const at::Tensor& out) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "x must be [T, d] with a contiguous last dim");
  for (const at::Tensor* t : {&starts, &lengths, &rows, &pooler_code})
    TORCH_CHECK(t->dim() == 1 && t->scalar_type() == at::kLong && t->is_contiguous(), "index tensors must be 1-D int64");
  const int64_t S = starts.size(0);
  TORCH_CHECK(lengths.size(0) == S && rows.size(0) == S, "starts, lengths and rows must have one entry per prompt");
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.is_contiguous() && out.dim() == 2 && out.size(0) == S &&
                  out.size(1) == x.size(1), "out must be a contiguous float32 [S, d]");
  const bool has_w = pool_w.has_value() && pool_w->defined();
  if (has_w)
    TORCH_CHECK(pool_w->dim() == 2 && pool_w->size(1) == x.size(1) && pool_w->stride(1) == 1 &&
                    pool_w->scalar_type() == x.scalar_type(), "pool_w must be [R, d] in x's dtype");
  // Values are read here, on the CPU, where that costs no synchronisation; an out-of-range
  // span or row would read outside the tensors, so refuse it.
  const int64_t *st = starts.data_ptr<int64_t>(), *ln = lengths.data_ptr<int64_t>(), *rw = rows.data_ptr<int64_t>();
  const int64_t *cd = pooler_code.data_ptr<int64_t>(), R = pooler_code.size(0), T = x.size(0);
  for (int64_t s = 0; s < S; ++s) {
    TORCH_CHECK(st[s] >= 0 && ln[s] >= 1 && st[s] + ln[s] <= T, "prompt ", s, " spans tokens outside x");
    TORCH_CHECK(rw[s] >= 0 && rw[s] < R, "prompt ", s, " has row ", rw[s], " of ", R);
    TORCH_CHECK(cd[rw[s]] == LAST || cd[rw[s]] == MEAN || (cd[rw[s]] == ATTENTION && has_w && rw[s] < pool_w->size(0)),
                "prompt ", s, ": pooler code ", cd[rw[s]], " needs pool_w");
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "pool_prompts", [&] {
    pool<scalar_t>(x, st, ln, rw, cd, has_w ? pool_w->data_ptr<scalar_t>() : nullptr, has_w ? pool_w->stride(0) : 0,
                   out.data_ptr<float>(), S);
  });
}

// scale_rows_: x[t, :] *= vectors[slot[t], col : col + x.size(1)] in place, for every token t
// whose slot is not `skip` (the row of ones: a base-model token is neither read nor written,
// so it keeps its bits and costs nothing). The product is taken in float32 and rounded once
// to x's dtype, the rule of every PEDRO op. In place, so torch.compile hands the projection's
// output buffer on unchanged (no second buffer of its size per layer, as a traced product
// would need when the attention reads a slice of it).
template <typename T, typename I>
void scale_rows(T* X, int64_t xs, const T* V, int64_t vs, const I* slot, int64_t n, int64_t w, int64_t skip) {
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(w, 1));  // small batches: one thread
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t s = static_cast<int64_t>(slot[t]);
      if (s == skip) continue;
      T* x = X + t * xs;
      const T* v = V + s * vs;
#pragma omp simd
      for (int64_t k = 0; k < w; ++k) x[k] = static_cast<T>(static_cast<float>(x[k]) * static_cast<float>(v[k]));
    }
  });
}

void scale_rows_(const at::Tensor& x, const at::Tensor& vectors, const at::Tensor& slot_idx, int64_t col,
                 int64_t skip) {
  TORCH_CHECK(x.dim() == 2 && (x.size(1) <= 1 || x.stride(1) == 1), "x must be [T, W] with a contiguous last dim");
  TORCH_CHECK(vectors.dim() == 2 && (vectors.size(1) <= 1 || vectors.stride(1) == 1) &&
                  vectors.scalar_type() == x.scalar_type(), "vectors must be [S, width] in x's dtype");
  TORCH_CHECK(slot_idx.dim() == 1 && slot_idx.is_contiguous() &&
                  (slot_idx.scalar_type() == at::kInt || slot_idx.scalar_type() == at::kLong),
              "slot_idx must be a contiguous 1-D int32 or int64 tensor");
  const int64_t n = x.size(0), w = x.size(1), rows = vectors.size(0);
  TORCH_CHECK(slot_idx.size(0) >= n, "slot_idx has ", slot_idx.size(0), " entries for ", n, " tokens");
  TORCH_CHECK(col >= 0 && col + w <= vectors.size(1), "columns [", col, ", ", col + w, ") exceed the vectors' ",
              vectors.size(1));
  if (n == 0 || w == 0) return;
  AT_DISPATCH_INDEX_TYPES(slot_idx.scalar_type(), "scale_rows_", [&] {
    const index_t* slot = slot_idx.data_ptr<index_t>();
    // Values are read on the CPU (no synchronisation): a slot outside the table would read
    // outside it, so refuse it.
    for (int64_t t = 0; t < n; ++t)
      TORCH_CHECK(slot[t] == skip || (slot[t] >= 0 && slot[t] < rows), "token ", t, " has slot ", slot[t], " of ",
                  rows);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "scale_rows_", [&] {
      scale_rows<scalar_t, index_t>(x.data_ptr<scalar_t>(), x.stride(0), vectors.data_ptr<scalar_t>() + col,
                                    vectors.stride(0), slot, n, w, skip);
    });
  });
}

void scale_rows_meta(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, int64_t) {}

}  // namespace

TORCH_LIBRARY(vllm_pedro_cpu, m) {
  m.def("pool_prompts(Tensor x, Tensor starts, Tensor lengths, Tensor rows, Tensor pooler_code, Tensor? pool_w, "
        "Tensor(a!) out) -> ()");
  m.impl("pool_prompts", c10::DispatchKey::CPU, &pool_prompts);
  m.def("scale_rows_(Tensor(a!) x, Tensor vectors, Tensor slot_idx, int col, int skip) -> ()");
  m.impl("scale_rows_", c10::DispatchKey::CPU, &scale_rows_);
  m.impl("scale_rows_", c10::DispatchKey::Meta, &scale_rows_meta);  // torch.compile traces it with fake tensors
}
