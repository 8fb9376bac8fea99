// csrc/cpu/msa_conv_cpu.cpp: MSA-Conv on the CPU (the *_cpu entry points of msa_conv2d_fwd and
// msa_conv2d_bwd, and their kernels). Fused and race-free; one task is a row of one head
// (b, row, head), so every K/V row a task reads is converted to float once and reused by all
// the queries of the row. The forward keeps one query's logits (Kh * Kw floats) and writes out
// and the log-sum-exp. The backward recomputes probabilities from the log-sum-exp: dQ (and
// delta = rowsum(dout * out)) per query row, then dK/dV per key row over the queries whose
// window holds each key (MsaAxis::queries_of). kv_shift is index arithmetic
// (MsaConvParams::source_row / rolled_row). The head-dim loops are compiled for D = 32, 64 and
// any D, each for AVX-512, AVX2 and baseline x86-64 (SF_MULTIVERSION).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "msa_conv_api.h"
#include "ops.h"
#include "static_switch.h"
#include "vec_math.h"

namespace sinklora {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Head dims with a compile-time loop bound (0: the run-time head_dim).
template <int D>
inline int dim(int d) {
  return D > 0 ? D : d;
}

template <int D>
inline float dot(const float* a, const float* b, int d) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int c = 0; c < dim<D>(d); ++c) s += a[c] * b[c];
  return s;
}

using Vec8 = float __attribute__((vector_size(32)));
using Lanes8 = int __attribute__((vector_size(32)));

// out[t] = a . b[t] for t < n, four at a time. With D a multiple of 8 (the D = 32, 64 kernels),
// the four sums stay 8-lane vectors and one transpose-add of the four gives the four dots;
// otherwise the four reductions overlap.
template <int D>
inline void dots(const float* a, const float* const* b, int n, float* out, int d) {
  int t = 0;
  for (; t + 4 <= n; t += 4) {
    const float *b0 = b[t], *b1 = b[t + 1], *b2 = b[t + 2], *b3 = b[t + 3];
    if constexpr (D > 0 && D % 8 == 0) {
      Vec8 s0 = {}, s1 = {}, s2 = {}, s3 = {}, av, bv;
      for (int c = 0; c < D; c += 8) {
        __builtin_memcpy(&av, a + c, sizeof(av));
        __builtin_memcpy(&bv, b0 + c, sizeof(bv));
        s0 += av * bv;
        __builtin_memcpy(&bv, b1 + c, sizeof(bv));
        s1 += av * bv;
        __builtin_memcpy(&bv, b2 + c, sizeof(bv));
        s2 += av * bv;
        __builtin_memcpy(&bv, b3 + c, sizeof(bv));
        s3 += av * bv;
      }
      // pairs of lanes, then pairs of pairs: lane l of u is a quarter of dot (l % 4)
      const Vec8 s01 = __builtin_shuffle(s0, s1, Lanes8{0, 8, 2, 10, 4, 12, 6, 14}) +
                       __builtin_shuffle(s0, s1, Lanes8{1, 9, 3, 11, 5, 13, 7, 15});
      const Vec8 s23 = __builtin_shuffle(s2, s3, Lanes8{0, 8, 2, 10, 4, 12, 6, 14}) +
                       __builtin_shuffle(s2, s3, Lanes8{1, 9, 3, 11, 5, 13, 7, 15});
      const Vec8 u = __builtin_shuffle(s01, s23, Lanes8{0, 1, 8, 9, 4, 5, 12, 13}) +
                     __builtin_shuffle(s01, s23, Lanes8{2, 3, 10, 11, 6, 7, 14, 15});
      for (int l = 0; l < 4; ++l) out[t + l] = u[l] + u[l + 4];
    } else {
      float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
      for (int c = 0; c < dim<D>(d); ++c) {
        s0 += a[c] * b0[c];
        s1 += a[c] * b1[c];
        s2 += a[c] * b2[c];
        s3 += a[c] * b3[c];
      }
      out[t] = s0;
      out[t + 1] = s1;
      out[t + 2] = s2;
      out[t + 3] = s3;
    }
  }
  for (; t < n; ++t) out[t] = dot<D>(a, b[t], d);
}

// acc += sum over t < n of w[t] * x[t]; four at a time, so that acc is loaded and stored once
// per four.
template <int D>
inline void axpys(float* acc, const float* w, const float* const* x, int n, int d) {
  int t = 0;
  for (; t + 4 <= n; t += 4) {
    const float *x0 = x[t], *x1 = x[t + 1], *x2 = x[t + 2], *x3 = x[t + 3];
    const float w0 = w[t], w1 = w[t + 1], w2 = w[t + 2], w3 = w[t + 3];
#pragma omp simd
    for (int c = 0; c < dim<D>(d); ++c) acc[c] += w0 * x0[c] + w1 * x1[c] + w2 * x2[c] + w3 * x3[c];
  }
  for (; t < n; ++t) {
    const float* xt = x[t];
    const float wt = w[t];
#pragma omp simd
    for (int c = 0; c < dim<D>(d); ++c) acc[c] += wt * xt[c];
  }
}

// The (b, y, ., h, .) row of a [B, H, W, heads, D] tensor with the given element strides.
template <typename T>
inline T* row_ptr(const void* base, const int64_t* stride, int b, int y, int h) {
  return const_cast<T*>(static_cast<const T*>(base)) + b * stride[0] + y * stride[1] + h * stride[3];
}

// One (b, y, h) row as float32, column x at data + x * col_stride: the tensor itself for float32,
// else converted into a buffer of width * D floats.
struct FloatRow {
  const float* data;
  int64_t col_stride;
  const float* at(int x) const { return data + x * col_stride; }
};

template <typename T>
FloatRow float_row(const void* base, const int64_t* stride, int b, int y, int h, int width, int d, float* buf,
                   float mul = 1.f) {
  const T* src = row_ptr<T>(base, stride, b, y, h);
  if constexpr (std::is_same_v<T, float>) {
    if (mul == 1.f) return {src, stride[2]};
  }
  for (int x = 0; x < width; ++x)
    for (int c = 0; c < d; ++c) buf[int64_t(x) * d + c] = static_cast<float>(src[x * stride[2] + c]) * mul;
  return {buf, d};
}

template <typename T>
void store_row(void* base, const int64_t* stride, int b, int y, int h, int width, int d, const float* src) {
  T* dst = row_ptr<T>(base, stride, b, y, h);
  for (int x = 0; x < width; ++x)
    for (int c = 0; c < d; ++c) dst[x * stride[2] + c] = static_cast<T>(src[int64_t(x) * d + c]);
}

// The column tables of head h, per (column, tap c) at [column * Kw + c]:
//   src (forward, dQ): the source column of k and v that tap c of query column j reads, or -1
//   for a padded tap;
//   query_lo / query_hi (dK/dV, `queries`): the query columns lo, lo + dw, ..., hi whose tap c
//   reads source column j of k and v.
struct ColumnTables {
  std::vector<int> src, query_lo, query_hi;
  int head = -1;
  void fill(const MsaConvParams& p, int h, bool queries) {
    if (head == h) return;
    head = h;
    const int kw = p.cols.k;
    src.resize(int64_t(p.width) * kw);
    query_lo.resize(src.size());
    query_hi.resize(src.size());
    for (int j = 0; j < p.width; ++j)
      for (int c = 0; c < kw; ++c) {
        const int x = p.cols.tap(j, c);
        src[j * kw + c] = (x >= 0 && x < p.width) ? p.source_col(x, h) : -1;
        if (queries) p.cols.queries_of(p.rolled_col(j, h), c, query_lo[j * kw + c], query_hi[j * kw + c]);
      }
  }
};

// The source row of k and v of tap a of query row i (-1 for a padded tap).
void fill_row_taps(const MsaConvParams& p, int i, int h, int* src) {
  for (int a = 0; a < p.rows.k; ++a) {
    const int y = p.rows.tap(i, a);
    src[a] = (y >= 0 && y < p.height) ? p.source_row(y, h) : -1;
  }
}

// Buffers of one worker: allocated once per parallel chunk.
struct Scratch {
  std::vector<float> q, k, v, out, dout, acc, acc2, s, dp;
  std::vector<const float*> kp, vp;
  std::vector<int> row_src, query;
  std::vector<FloatRow> kr, vr;
  ColumnTables cols;
  // kv_rows: how many K/V rows a task holds at once. A key is in the windows of at most 2 * Kw
  // query columns of one query row (clamp: the border columns share a window).
  Scratch(const MsaConvParams& p, int kv_rows) {
    const int64_t row = int64_t(p.width) * p.head_dim, taps = std::max(p.num_taps(), 2 * p.cols.k);
    for (auto* buf : {&q, &out, &dout, &acc, &acc2}) buf->resize(row);
    k.resize(kv_rows * row);
    v.resize(kv_rows * row);
    for (auto* buf : {&s, &dp}) buf->resize(taps);
    kp.resize(taps);
    vp.resize(taps);
    query.resize(taps);
    row_src.resize(p.rows.k);
    kr.resize(p.rows.k);
    vr.resize(p.rows.k);
  }
};

// The K and V rows of the window taps of query row i as float (w.kr[a], w.vr[a]; unset for a
// padded row a).
template <typename T>
void load_window_rows(const MsaConvParams& p, int b, int i, int h, Scratch& w) {
  fill_row_taps(p, i, h, w.row_src.data());
  const int64_t row = int64_t(p.width) * p.head_dim;
  for (int a = 0; a < p.rows.k; ++a) {
    const int u = w.row_src[a];
    if (u < 0) continue;
    w.kr[a] = float_row<T>(p.k, p.k_stride, b, u, h, p.width, p.head_dim, w.k.data() + a * row);
    w.vr[a] = float_row<T>(p.v, p.v_stride, b, u, h, p.width, p.head_dim, w.v.data() + a * row);
  }
}

// The key / value pointers of query column j's taps that are inside the map (w.kp, w.vp);
// returns their number. Needs load_window_rows of the query's row.
inline int window_taps(const MsaConvParams& p, int j, Scratch& w) {
  const int kw = p.cols.k;
  const int* col = w.cols.src.data() + int64_t(j) * kw;
  int n = 0;
  for (int a = 0; a < p.rows.k; ++a) {
    if (w.row_src[a] < 0) continue;
    for (int c = 0; c < kw; ++c) {
      if (col[c] < 0) continue;
      w.kp[n] = w.kr[a].at(col[c]);
      w.vp[n++] = w.vr[a].at(col[c]);
    }
  }
  return n;
}

// Forward of query row i of head h: out and lse of its W queries.
template <typename T, int D>
SF_MULTIVERSION void forward_row(const MsaConvParams& p, int b, int i, int h, Scratch& w) {
  const int d = p.head_dim;
  const bool zero_pad = p.rows.padding == MsaPadding::kZero;
  load_window_rows<T>(p, b, i, h, w);
  const FloatRow q = float_row<T>(p.q, p.q_stride, b, i, h, p.width, d, w.q.data(), p.softmax_scale);
  float* s = w.s.data();
  for (int j = 0; j < p.width; ++j) {
    const int n = window_taps(p, j, w);
    // zero padding: every padded tap is a logit of 0 and a value of zeros
    const int n_pad = zero_pad ? p.num_taps() - n : 0;
    const float* qj = q.at(j);
    dots<D>(qj, w.kp.data(), n, s, d);
    float m = n_pad > 0 ? 0.f : kNegInf;
    for (int t = 0; t < n; ++t) m = std::max(m, s[t]);
    float l = n_pad > 0 ? n_pad * exp_approx(-m) : 0.f;
#pragma omp simd reduction(+ : l)
    for (int t = 0; t < n; ++t) {
      s[t] = exp_approx(s[t] - m);
      l += s[t];
    }
    const float inv = 1.f / l;
#pragma omp simd
    for (int t = 0; t < n; ++t) s[t] *= inv;
    float* acc = w.acc.data() + int64_t(j) * d;
    std::fill(acc, acc + d, 0.f);
    axpys<D>(acc, s, w.vp.data(), n, d);
    p.lse[p.lse_index(b, i, j, h)] = m + std::log(l);
  }
  store_row<T>(p.out, p.o_stride, b, i, h, p.width, d, w.acc.data());
}

// dQ of query row i of head h, and delta (rowsum(dout * out)) of its queries for dkdv_row.
template <typename T, int D>
SF_MULTIVERSION void dq_row(const MsaConvBwdParams& p, int b, int i, int h, Scratch& w) {
  const int d = p.head_dim;
  load_window_rows<T>(p, b, i, h, w);
  const FloatRow q = float_row<T>(p.q, p.q_stride, b, i, h, p.width, d, w.q.data(), p.softmax_scale);
  const FloatRow dout = float_row<T>(p.dout, p.do_stride, b, i, h, p.width, d, w.dout.data());
  const FloatRow out = float_row<T>(p.out, p.o_stride, b, i, h, p.width, d, w.out.data());
  float *s = w.s.data(), *dp = w.dp.data();
  for (int j = 0; j < p.width; ++j) {
    const int n = window_taps(p, j, w);
    const int64_t r = p.lse_index(b, i, j, h);
    const float* qj = q.at(j);
    const float* doj = dout.at(j);
    const float lse = p.lse[r], delta = dot<D>(doj, out.at(j), d);
    p.delta[r] = delta;
    dots<D>(qj, w.kp.data(), n, s, d);
    dots<D>(doj, w.vp.data(), n, dp, d);
#pragma omp simd
    for (int t = 0; t < n; ++t) s[t] = exp_approx(s[t] - lse) * (dp[t] - delta) * p.softmax_scale;
    float* acc = w.acc.data() + int64_t(j) * d;
    std::fill(acc, acc + d, 0.f);
    axpys<D>(acc, s, w.kp.data(), n, d);
  }
  store_row<T>(p.dq, p.dq_stride, b, i, h, p.width, d, w.acc.data());
}

// dK and dV of key row u (of k and v) of head h: a sum over the queries whose window holds each
// key, row by row of queries.
template <typename T, int D>
SF_MULTIVERSION void dkdv_row(const MsaConvBwdParams& p, int b, int u, int h, Scratch& w) {
  const int d = p.head_dim, kw = p.cols.k;
  const int y = p.rolled_row(u, h);
  const FloatRow k = float_row<T>(p.k, p.k_stride, b, u, h, p.width, d, w.k.data());
  const FloatRow v = float_row<T>(p.v, p.v_stride, b, u, h, p.width, d, w.v.data());
  float *dk = w.acc.data(), *dv = w.acc2.data(), *s = w.s.data(), *dp = w.dp.data();
  std::fill(w.acc.begin(), w.acc.end(), 0.f);
  std::fill(w.acc2.begin(), w.acc2.end(), 0.f);
  for (int a = 0; a < p.rows.k; ++a) {
    int ilo, ihi;
    p.rows.queries_of(y, a, ilo, ihi);
    for (int i = ilo; i <= ihi; i += p.rows.d) {
      const FloatRow q = float_row<T>(p.q, p.q_stride, b, i, h, p.width, d, w.q.data(), p.softmax_scale);
      const FloatRow dout = float_row<T>(p.dout, p.do_stride, b, i, h, p.width, d, w.dout.data());
      const float* lse = p.lse + p.lse_index(b, i, 0, h);
      const float* delta = p.delta + p.lse_index(b, i, 0, h);
      for (int x = 0; x < p.width; ++x) {
        int n = 0;
        for (int c = 0; c < kw; ++c)
          for (int j = w.cols.query_lo[x * kw + c]; j <= w.cols.query_hi[x * kw + c]; j += p.cols.d) {
            w.query[n] = j;
            w.kp[n] = q.at(j);  // the queries' q and dout rows, in the key / value slots
            w.vp[n++] = dout.at(j);
          }
        dots<D>(k.at(x), w.kp.data(), n, s, d);
        dots<D>(v.at(x), w.vp.data(), n, dp, d);
        for (int t = 0; t < n; ++t) {
          const int64_t jh = int64_t(w.query[t]) * p.heads;
          s[t] = exp_approx(s[t] - lse[jh]);
          dp[t] = s[t] * (dp[t] - delta[jh]);
        }
        axpys<D>(dv + int64_t(x) * d, s, w.vp.data(), n, d);
        axpys<D>(dk + int64_t(x) * d, dp, w.kp.data(), n, d);
      }
    }
  }
  store_row<T>(p.dk, p.dk_stride, b, u, h, p.width, d, dk);
  store_row<T>(p.dv, p.dv_stride, b, u, h, p.width, d, dv);
}

// Runs row(p, b, i, h, scratch) for every row i of every (b, h), in parallel, h-major so that
// consecutive tasks share K/V rows and the column tables.
template <typename P, typename F>
void for_each_row(const P& p, int kv_rows, bool query_tables, F&& row) {
  const int64_t tasks = int64_t(p.batch) * p.heads * p.height;
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    Scratch w(p, kv_rows);
    for (int64_t t = begin; t < end; ++t) {
      const int i = static_cast<int>(t % p.height);
      const int h = static_cast<int>(t / p.height % p.heads);
      const int b = static_cast<int>(t / p.height / p.heads);
      w.cols.fill(p, h, query_tables);
      row(b, i, h, w);
    }
  });
}

template <typename T, int D>
void forward(const MsaConvParams& p) {
  for_each_row(p, p.rows.k, false, [&](int b, int i, int h, Scratch& w) { forward_row<T, D>(p, b, i, h, w); });
}

template <typename T, int D>
void backward(const MsaConvBwdParams& p) {
  for_each_row(p, p.rows.k, false, [&](int b, int i, int h, Scratch& w) { dq_row<T, D>(p, b, i, h, w); });
  for_each_row(p, 1, true, [&](int b, int u, int h, Scratch& w) { dkdv_row<T, D>(p, b, u, h, w); });
}

template <typename F>
void dispatch(at::ScalarType dtype, int head_dim, const char* op, F&& run) {
  SINKLORA_DTYPE_SWITCH(dtype, T, float, c10::Half, c10::BFloat16, op, [&] {
    SINKLORA_FAST_HEAD_DIM_SWITCH(head_dim, D, [&] { run.template operator()<T, D>(); });
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> msa_conv2d_fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                      c10::IntArrayRef kernel_size, c10::IntArrayRef dilation,
                                                      c10::string_view padding, at::OptionalIntArrayRef kv_shift,
                                                      double softmax_scale) {
  auto c = prepare_msa_conv2d_fwd(q, k, v, kernel_size, dilation, padding, kv_shift, softmax_scale);
  if (c.empty) return {c.out, c.lse};
  dispatch(c.q.scalar_type(), c.params.head_dim, "msa_conv2d",
           [&]<typename T, int D>() { forward<T, D>(c.params); });
  return {c.out, c.lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> msa_conv2d_bwd_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, c10::IntArrayRef kernel_size, c10::IntArrayRef dilation, c10::string_view padding,
    at::OptionalIntArrayRef kv_shift, double softmax_scale) {
  auto c = prepare_msa_conv2d_bwd(dout, q, k, v, out, lse, kernel_size, dilation, padding, kv_shift, softmax_scale);
  if (c.empty) return {c.dq, c.dk, c.dv};
  dispatch(c.q.scalar_type(), c.params.head_dim, "msa_conv2d_bwd",
           [&]<typename T, int D>() { backward<T, D>(c.params); });
  return {c.dq, c.dk, c.dv};
}

}  // namespace sinklora
