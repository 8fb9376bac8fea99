// csrc/cpu/sf_attention_cpu.cpp: SF-Attn on the CPU (the *_cpu entry points of sf_attention_fwd,
// sf_attention_bwd and column_scores, and their kernels): flash-style tiling with an online softmax, O(N) extra memory.
//
// Forward: one work item per (sequence, query head, query tile); it visits only the key tiles
// of SfPattern::key_spans and masks only tiles that are not fully visible. Tiles are converted
// to float32 and multiplied with torch's brgemm (MKL / oneDNN underneath).
// Backward: recomputes probabilities from the saved log-sum-exp, in two race-free passes:
// dK/dV per (sequence, kv head, key tile) over the query heads of its group, then dQ per query tile.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "ops.h"
#include "sf_attention_api.h"
#include "static_switch.h"
#include "vec_math.h"

namespace sinklora {
namespace {

constexpr int kBlockQ = 64;
constexpr int kBlockK = 64;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

template <typename T>
inline float to_float(T x) {
  return static_cast<float>(x);
}

template <typename T>
inline T from_float(float x) {
  return static_cast<T>(x);
}

// rows x d block at src (row stride in elements) -> dense float [rows, d].
template <typename T>
void load_rows(float* dst, const T* src, int rows, int64_t row_stride, int d) {
  for (int r = 0; r < rows; ++r) {
    const T* s = src + r * row_stride;
    float* o = dst + int64_t(r) * d;
    for (int c = 0; c < d; ++c) o[c] = to_float(s[c]);
  }
}

template <typename T>
void store_rows(T* dst, int64_t row_stride, const float* src, int rows, int d, float mul) {
  for (int r = 0; r < rows; ++r) {
    T* o = dst + r * row_stride;
    const float* s = src + int64_t(r) * d;
    for (int c = 0; c < d; ++c) o[c] = from_float<T>(s[c] * mul);
  }
}

// C[m, n] (+)= A[m, k] @ B[k, n], all row-major float.
inline void gemm(int m, int n, int k, const float* a, int lda, const float* b, int ldb, float* c, int ldc,
                 bool accumulate) {
  at::native::cpublas::brgemm(m, n, k, lda, ldb, ldc, accumulate, a, b, c, false);
}

// Set the entries of one score row outside `spans` to -inf: column c stands for position x0 + c.
SF_MULTIVERSION
void mask_row(float* s, int nk, int x0, const SpanList& spans) {
  const int lo0 = spans.span[0].lo, hi0 = spans.count > 0 ? spans.span[0].hi : lo0;
  const int lo1 = spans.count > 1 ? spans.span[1].lo : 0, hi1 = spans.count > 1 ? spans.span[1].hi : 0;
  const int lo2 = spans.count > 2 ? spans.span[2].lo : 0, hi2 = spans.count > 2 ? spans.span[2].hi : 0;
#pragma omp simd
  for (int c = 0; c < nk; ++c) {
    const int j = x0 + c;
    const bool keep = (j >= lo0 && j < hi0) | (j >= lo1 && j < hi1) | (j >= lo2 && j < hi2);
    s[c] = keep ? s[c] : kNegInf;
  }
}

// Online-softmax step for rows [0, m) of a score tile: S holds raw q·k; on return it holds the
// unnormalised probabilities and acc rows are rescaled. Returns false when no row sees the tile.
SF_MULTIVERSION
void softmax_tile(float* s, int lds, int m, int nk, float scale, float* row_max, float* row_sum,
                  float* acc, int d) {
  for (int r = 0; r < m; ++r) {
    float* sr = s + int64_t(r) * lds;
    float mx = kNegInf;
#pragma omp simd reduction(max : mx)
    for (int c = 0; c < nk; ++c) {
      sr[c] *= scale;
      mx = std::max(mx, sr[c]);
    }
    if (mx == kNegInf) {  // this row sees nothing in the tile
      std::fill(sr, sr + nk, 0.f);
      continue;
    }
    const float new_max = std::max(row_max[r], mx);
    const float alpha = exp_approx(row_max[r] - new_max);
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int c = 0; c < nk; ++c) {
      const float e = exp_approx(sr[c] - new_max);
      const float p = sr[c] == kNegInf ? 0.f : e;
      sr[c] = p;
      sum += p;
    }
    row_sum[r] = row_sum[r] * alpha + sum;
    row_max[r] = new_max;
    if (alpha != 1.f) {
      float* ar = acc + int64_t(r) * d;
#pragma omp simd
      for (int c = 0; c < d; ++c) ar[c] *= alpha;
    }
  }
}

// P = exp(scale * S - lse) over a score tile (masked entries must already be -inf). The query of
// entry (r, c) is row r (lse[r]) or, for a transposed tile (keys down, queries across), column c.
SF_MULTIVERSION
void probs_tile(float* s, int lds, int rows, int cols, float scale, const float* lse, bool transposed) {
  for (int r = 0; r < rows; ++r) {
    float* sr = s + int64_t(r) * lds;
    if (transposed) {
#pragma omp simd
      for (int c = 0; c < cols; ++c) {
        const float e = exp_approx(sr[c] * scale - lse[c]);
        sr[c] = sr[c] == kNegInf ? 0.f : e;
      }
    } else {
      const float l = lse[r];
#pragma omp simd
      for (int c = 0; c < cols; ++c) {
        const float e = exp_approx(sr[c] * scale - l);
        sr[c] = sr[c] == kNegInf ? 0.f : e;
      }
    }
  }
}

// dS = P * (dP - delta), in place in dp; delta indexed like lse in probs_tile.
SF_MULTIVERSION
void dscores_tile(float* dp, const float* p, int ld, int rows, int cols, const float* delta, bool transposed) {
  for (int r = 0; r < rows; ++r) {
    float* dr = dp + int64_t(r) * ld;
    const float* pr = p + int64_t(r) * ld;
    if (transposed) {
#pragma omp simd
      for (int c = 0; c < cols; ++c) dr[c] = pr[c] * (dr[c] - delta[c]);
    } else {
      const float dl = delta[r];
#pragma omp simd
      for (int c = 0; c < cols; ++c) dr[c] = pr[c] * (dr[c] - dl);
    }
  }
}

// Where the rows of one (sequence, head) live in a strided tensor.
struct RowView {
  int64_t base, row_stride;
};

inline RowView rows_of(const SfAttentionParams& p, int b, int h, int64_t batch_stride, int64_t row_stride,
                       int64_t head_stride) {
  return {p.batch_offset(b, batch_stride, row_stride) + h * head_stride, row_stride};
}

// A row-major float operand: the source itself for float inputs, else a converted copy.
struct FloatRows {
  const float* data;
  int64_t ld;
};

template <typename T>
FloatRows row_major(const T* src, int rows, int64_t row_stride, int d, float* buf) {
  if constexpr (std::is_same_v<T, float>) {
    return {src, row_stride};
  } else {
    load_rows(buf, src, rows, row_stride, d);
    return {buf, d};
  }
}

// A whole operand transposed to float [heads, d, total_rows] (column seq_start(b) + i holds row i
// of sequence b), built once per call so that no tile needs a transpose of its own.
struct Transposed {
  at::Tensor storage;
  int64_t ld;
  int d;
  const float* at(int head, int64_t row) const {
    return storage.data_ptr<float>() + int64_t(head) * d * ld + row;
  }
};

template <typename T>
Transposed transpose_operand(const SfAttentionParams& p, const void* data, int heads, int64_t batch_stride,
                             int64_t row_stride, int64_t head_stride) {
  constexpr int kRows = 64;
  const int d = p.head_dim;
  const int64_t ld = p.total_rows;
  auto storage = at::empty({heads, d, ld}, at::kFloat);
  float* dst = storage.data_ptr<float>();
  const T* src = static_cast<const T*>(data);
  const int blocks = (p.seqlen + kRows - 1) / kRows;
  at::parallel_for(0, int64_t(p.batch) * heads * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int blk = static_cast<int>(item % blocks);
      const int h = static_cast<int>((item / blocks) % heads);
      const int b = static_cast<int>(item / (int64_t(blocks) * heads));
      const int i0 = blk * kRows;
      const int rows = std::min(kRows, p.seq_len(b) - i0);
      if (rows <= 0) continue;
      const T* s = src + p.batch_offset(b, batch_stride, row_stride) + h * head_stride + i0 * row_stride;
      float* o = dst + int64_t(h) * d * ld + p.seq_start(b) + i0;
      for (int c = 0; c < d; ++c)
        for (int r = 0; r < rows; ++r) o[int64_t(c) * ld + r] = to_float(s[r * row_stride + c]);
    }
  });
  return {storage, ld, d};
}

// One work item of the key-tile passes: key tile `tile` of (sequence b, kv head hk).
struct KeyTile {
  int b, hk, k0, nk;
  int64_t seq0;
};

// Decodes work item `item` of the (sequence, kv head, key tile) grid; false when the tile lies past
// the end of its sequence.
inline bool key_tile(const SfAttentionParams& p, int64_t item, int k_tiles, KeyTile& t) {
  const int tile = static_cast<int>(item % k_tiles);
  t.hk = static_cast<int>((item / k_tiles) % p.num_heads_kv);
  t.b = static_cast<int>(item / (int64_t(k_tiles) * p.num_heads_kv));
  t.k0 = tile * kBlockK;
  const int n = p.seq_len(t.b);
  if (t.k0 >= n) return false;
  t.nk = std::min(kBlockK, n - t.k0);
  t.seq0 = p.seq_start(t.b);
  return true;
}

// For one key tile of (sequence b, kv head hk): every query tile of every query head of the group
// that sees it, as transposed probabilities P^T [nk, m] (keys down, queries across) recomputed from
// lse. fn(h, q0, m, row0, pt) consumes each tile; row0 indexes lse/delta rows of head h.
template <typename Fn>
void for_each_probs_tile_t(const SfAttentionParams& p, const Transposed& qt, const FloatRows& kf, int b, int hk,
                           int k0, int nk, float* pt, Fn&& fn) {
  const int d = p.head_dim;
  const int group = p.num_heads_q / p.num_heads_kv;
  const int64_t seq0 = p.seq_start(b);
  for (int h = hk * group; h < (hk + 1) * group; ++h) {
    const SfPattern pat = p.pattern(b, h);
    const int64_t row0 = int64_t(h) * p.total_rows + seq0;
    const SpanList spans = pat.query_spans(k0, k0 + nk);
    for (int t = 0; t < spans.count; ++t) {
      for (int q0 = spans.span[t].lo; q0 < spans.span[t].hi; q0 += kBlockQ) {
        const int m = std::min(kBlockQ, spans.span[t].hi - q0);
        gemm(nk, m, d, kf.data, kf.ld, qt.at(h, seq0 + q0), qt.ld, pt, kBlockQ, false);
        if (!pat.tile_fully_visible(q0, q0 + m, k0, k0 + nk))
          for (int c = 0; c < nk; ++c) mask_row(pt + c * kBlockQ, m, q0, pat.query_spans(k0 + c, k0 + c + 1));
        probs_tile(pt, kBlockQ, nk, m, p.softmax_scale, p.lse + row0 + q0, true);
        fn(h, q0, m, row0);
      }
    }
  }
}

template <typename T>
void forward(const SfAttentionParams& p) {
  const int d = p.head_dim;
  const int group = p.num_heads_q / p.num_heads_kv;
  const int q_tiles = (p.seqlen + kBlockQ - 1) / kBlockQ;
  const int64_t items = int64_t(p.batch) * p.num_heads_q * q_tiles;
  const T* q = static_cast<const T*>(p.q);
  const T* v = static_cast<const T*>(p.v);
  T* out = static_cast<T*>(p.out);
  const Transposed kt = transpose_operand<T>(p, p.k, p.num_heads_kv, p.k_batch_stride, p.k_row_stride, p.k_head_stride);

  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qbuf(kBlockQ * d), vbuf(kBlockK * d), s(kBlockQ * kBlockK), acc(kBlockQ * d),
        row_max(kBlockQ), row_sum(kBlockQ);
    for (int64_t item = begin; item < end; ++item) {
      const int tile = static_cast<int>(item % q_tiles);
      const int h = static_cast<int>((item / q_tiles) % p.num_heads_q);
      const int b = static_cast<int>(item / (int64_t(q_tiles) * p.num_heads_q));
      const SfPattern pat = p.pattern(b, h);
      const int q0 = tile * kBlockQ;
      if (q0 >= pat.n) continue;
      const int m = std::min(kBlockQ, pat.n - q0);
      const int hk = h / group;
      const int64_t seq0 = p.seq_start(b);
      const RowView qv = rows_of(p, b, h, p.q_batch_stride, p.q_row_stride, p.q_head_stride);
      const RowView vv = rows_of(p, b, hk, p.v_batch_stride, p.v_row_stride, p.v_head_stride);
      const RowView ov = rows_of(p, b, h, p.o_batch_stride, p.o_row_stride, p.o_head_stride);

      const FloatRows qf = row_major(q + qv.base + q0 * qv.row_stride, m, qv.row_stride, d, qbuf.data());
      std::fill(acc.begin(), acc.end(), 0.f);
      std::fill(row_max.begin(), row_max.end(), kNegInf);
      std::fill(row_sum.begin(), row_sum.end(), 0.f);
      const SpanList spans = pat.key_spans(q0, q0 + m);
      for (int t = 0; t < spans.count; ++t) {
        for (int k0 = spans.span[t].lo; k0 < spans.span[t].hi; k0 += kBlockK) {
          const int nk = std::min(kBlockK, spans.span[t].hi - k0);
          gemm(m, nk, d, qf.data, qf.ld, kt.at(hk, seq0 + k0), kt.ld, s.data(), kBlockK, false);
          if (!pat.tile_fully_visible(q0, q0 + m, k0, k0 + nk))
            for (int r = 0; r < m; ++r) mask_row(s.data() + r * kBlockK, nk, k0, pat.row_key_spans(q0 + r));
          softmax_tile(s.data(), kBlockK, m, nk, p.softmax_scale, row_max.data(), row_sum.data(), acc.data(), d);
          const FloatRows vf = row_major(v + vv.base + k0 * vv.row_stride, nk, vv.row_stride, d, vbuf.data());
          gemm(m, d, nk, s.data(), kBlockK, vf.data, vf.ld, acc.data(), d, true);
        }
      }
      float* lse = p.lse + int64_t(h) * p.total_rows + seq0 + q0;
      for (int r = 0; r < m; ++r) {
        const float inv = 1.f / row_sum[r];
        float* ar = acc.data() + int64_t(r) * d;
        for (int c = 0; c < d; ++c) ar[c] *= inv;
        lse[r] = row_max[r] + std::log(row_sum[r]);
      }
      store_rows(out + ov.base + q0 * ov.row_stride, ov.row_stride, acc.data(), m, d, 1.f);
    }
  });
}

// delta[h, row] = sum_d dout * out, over every row of every head.
template <typename T>
void compute_delta(const SfAttentionBwdParams& p) {
  const T* dout = static_cast<const T*>(p.dout);
  const T* out = static_cast<const T*>(p.out);
  const int64_t items = int64_t(p.batch) * p.num_heads_q;
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int h = static_cast<int>(item % p.num_heads_q);
      const int b = static_cast<int>(item / p.num_heads_q);
      const int n = p.seq_len(b);
      const RowView dov = rows_of(p, b, h, p.do_batch_stride, p.do_row_stride, p.do_head_stride);
      const RowView ov = rows_of(p, b, h, p.o_batch_stride, p.o_row_stride, p.o_head_stride);
      float* delta = p.delta + int64_t(h) * p.total_rows + p.seq_start(b);
      for (int i = 0; i < n; ++i) {
        const T* a = dout + dov.base + i * dov.row_stride;
        const T* o = out + ov.base + i * ov.row_stride;
        float sum = 0.f;
        for (int c = 0; c < p.head_dim; ++c) sum += to_float(a[c]) * to_float(o[c]);
        delta[i] = sum;
      }
    }
  });
}

// dK and dV: one work item per (sequence, kv head, key tile), over the query heads of its group,
// computed in transposed space (keys down, queries across) so every operand is used as stored.
template <typename T>
void backward_dkdv(const SfAttentionBwdParams& p, const Transposed& qt, const Transposed& dot) {
  const int d = p.head_dim;
  const int k_tiles = (p.seqlen + kBlockK - 1) / kBlockK;
  const int64_t items = int64_t(p.batch) * p.num_heads_kv * k_tiles;
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  const T* dout = static_cast<const T*>(p.dout);
  T* dk = static_cast<T*>(p.dk);
  T* dv = static_cast<T*>(p.dv);

  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qbuf(kBlockQ * d), dobuf(kBlockQ * d), kbuf(kBlockK * d), vbuf(kBlockK * d),
        pt(kBlockK * kBlockQ), dpt(kBlockK * kBlockQ), dk_acc(kBlockK * d), dv_acc(kBlockK * d);
    for (int64_t item = begin; item < end; ++item) {
      KeyTile kt_item;
      if (!key_tile(p, item, k_tiles, kt_item)) continue;
      const auto [b, hk, k0, nk, seq0] = kt_item;
      const RowView kv = rows_of(p, b, hk, p.k_batch_stride, p.k_row_stride, p.k_head_stride);
      const RowView vv = rows_of(p, b, hk, p.v_batch_stride, p.v_row_stride, p.v_head_stride);
      const FloatRows kf = row_major(k + kv.base + k0 * kv.row_stride, nk, kv.row_stride, d, kbuf.data());
      const FloatRows vf = row_major(v + vv.base + k0 * vv.row_stride, nk, vv.row_stride, d, vbuf.data());
      std::fill(dk_acc.begin(), dk_acc.end(), 0.f);
      std::fill(dv_acc.begin(), dv_acc.end(), 0.f);

      for_each_probs_tile_t(p, qt, kf, b, hk, k0, nk, pt.data(), [&](int h, int q0, int m, int64_t row0) {
        const RowView qv = rows_of(p, b, h, p.q_batch_stride, p.q_row_stride, p.q_head_stride);
        const RowView dov = rows_of(p, b, h, p.do_batch_stride, p.do_row_stride, p.do_head_stride);
        const FloatRows qf = row_major(q + qv.base + q0 * qv.row_stride, m, qv.row_stride, d, qbuf.data());
        const FloatRows dof = row_major(dout + dov.base + q0 * dov.row_stride, m, dov.row_stride, d, dobuf.data());
        gemm(nk, d, m, pt.data(), kBlockQ, dof.data, dof.ld, dv_acc.data(), d, true);               // dV += P^T dO
        gemm(nk, m, d, vf.data, vf.ld, dot.at(h, seq0 + q0), dot.ld, dpt.data(), kBlockQ, false);  // dP^T
        dscores_tile(dpt.data(), pt.data(), kBlockQ, nk, m, p.delta + row0 + q0, true);
        gemm(nk, d, m, dpt.data(), kBlockQ, qf.data, qf.ld, dk_acc.data(), d, true);  // dK += dS^T Q
      });
      const RowView dkv = rows_of(p, b, hk, p.dk_batch_stride, p.dk_row_stride, p.dk_head_stride);
      const RowView dvv = rows_of(p, b, hk, p.dv_batch_stride, p.dv_row_stride, p.dv_head_stride);
      store_rows(dk + dkv.base + k0 * dkv.row_stride, dkv.row_stride, dk_acc.data(), nk, d, p.softmax_scale);
      store_rows(dv + dvv.base + k0 * dvv.row_stride, dvv.row_stride, dv_acc.data(), nk, d, 1.f);
    }
  });
}

// dQ: one work item per (sequence, query head, query tile).
template <typename T>
void backward_dq(const SfAttentionBwdParams& p, const Transposed& kt, const Transposed& vt) {
  const int d = p.head_dim;
  const int group = p.num_heads_q / p.num_heads_kv;
  const int q_tiles = (p.seqlen + kBlockQ - 1) / kBlockQ;
  const int64_t items = int64_t(p.batch) * p.num_heads_q * q_tiles;
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* dout = static_cast<const T*>(p.dout);
  T* dq = static_cast<T*>(p.dq);

  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qbuf(kBlockQ * d), dobuf(kBlockQ * d), kbuf(kBlockK * d), s(kBlockQ * kBlockK),
        dp(kBlockQ * kBlockK), dq_acc(kBlockQ * d);
    for (int64_t item = begin; item < end; ++item) {
      const int tile = static_cast<int>(item % q_tiles);
      const int h = static_cast<int>((item / q_tiles) % p.num_heads_q);
      const int b = static_cast<int>(item / (int64_t(q_tiles) * p.num_heads_q));
      const SfPattern pat = p.pattern(b, h);
      const int q0 = tile * kBlockQ;
      if (q0 >= pat.n) continue;
      const int m = std::min(kBlockQ, pat.n - q0);
      const int hk = h / group;
      const int64_t seq0 = p.seq_start(b);
      const RowView qv = rows_of(p, b, h, p.q_batch_stride, p.q_row_stride, p.q_head_stride);
      const RowView dov = rows_of(p, b, h, p.do_batch_stride, p.do_row_stride, p.do_head_stride);
      const RowView kv = rows_of(p, b, hk, p.k_batch_stride, p.k_row_stride, p.k_head_stride);
      const int64_t row0 = int64_t(h) * p.total_rows + seq0 + q0;
      const FloatRows qf = row_major(q + qv.base + q0 * qv.row_stride, m, qv.row_stride, d, qbuf.data());
      const FloatRows dof = row_major(dout + dov.base + q0 * dov.row_stride, m, dov.row_stride, d, dobuf.data());
      std::fill(dq_acc.begin(), dq_acc.end(), 0.f);
      const SpanList spans = pat.key_spans(q0, q0 + m);
      for (int t = 0; t < spans.count; ++t) {
        for (int k0 = spans.span[t].lo; k0 < spans.span[t].hi; k0 += kBlockK) {
          const int nk = std::min(kBlockK, spans.span[t].hi - k0);
          gemm(m, nk, d, qf.data, qf.ld, kt.at(hk, seq0 + k0), kt.ld, s.data(), kBlockK, false);
          if (!pat.tile_fully_visible(q0, q0 + m, k0, k0 + nk))
            for (int r = 0; r < m; ++r) mask_row(s.data() + r * kBlockK, nk, k0, pat.row_key_spans(q0 + r));
          probs_tile(s.data(), kBlockK, m, nk, p.softmax_scale, p.lse + row0, false);
          gemm(m, nk, d, dof.data, dof.ld, vt.at(hk, seq0 + k0), vt.ld, dp.data(), kBlockK, false);
          dscores_tile(dp.data(), s.data(), kBlockK, m, nk, p.delta + row0, false);
          const FloatRows kf = row_major(k + kv.base + k0 * kv.row_stride, nk, kv.row_stride, d, kbuf.data());
          gemm(m, d, nk, dp.data(), kBlockK, kf.data, kf.ld, dq_acc.data(), d, true);
        }
      }
      const RowView dqv = rows_of(p, b, h, p.dq_batch_stride, p.dq_row_stride, p.dq_head_stride);
      store_rows(dq + dqv.base + q0 * dqv.row_stride, dqv.row_stride, dq_acc.data(), m, d, p.softmax_scale);
    }
  });
}

template <typename T>
void backward(const SfAttentionBwdParams& p) {
  compute_delta<T>(p);
  {
    const Transposed qt = transpose_operand<T>(p, p.q, p.num_heads_q, p.q_batch_stride, p.q_row_stride, p.q_head_stride);
    const Transposed dot =
        transpose_operand<T>(p, p.dout, p.num_heads_q, p.do_batch_stride, p.do_row_stride, p.do_head_stride);
    backward_dkdv<T>(p, qt, dot);
  }
  const Transposed kt = transpose_operand<T>(p, p.k, p.num_heads_kv, p.k_batch_stride, p.k_row_stride, p.k_head_stride);
  const Transposed vt = transpose_operand<T>(p, p.v, p.num_heads_kv, p.v_batch_stride, p.v_row_stride, p.v_head_stride);
  backward_dq<T>(p, kt, vt);
}

// Column sums of the softmax: out[row j, kv head] = sum over the group's query heads and every query
// i that sees key j of P[i, j], recomputed from lse like the backward pass (keys down, queries across).
template <typename T>
void column_scores(const SfAttentionParams& p, float* out) {
  const int d = p.head_dim;
  const int k_tiles = (p.seqlen + kBlockK - 1) / kBlockK;
  const int64_t items = int64_t(p.batch) * p.num_heads_kv * k_tiles;
  const T* k = static_cast<const T*>(p.k);
  const Transposed qt = transpose_operand<T>(p, p.q, p.num_heads_q, p.q_batch_stride, p.q_row_stride, p.q_head_stride);

  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> kbuf(kBlockK * d), pt(kBlockK * kBlockQ), colsum(kBlockK);
    for (int64_t item = begin; item < end; ++item) {
      KeyTile kt_item;
      if (!key_tile(p, item, k_tiles, kt_item)) continue;
      const auto [b, hk, k0, nk, seq0] = kt_item;
      const RowView kv = rows_of(p, b, hk, p.k_batch_stride, p.k_row_stride, p.k_head_stride);
      const FloatRows kf = row_major(k + kv.base + k0 * kv.row_stride, nk, kv.row_stride, d, kbuf.data());
      std::fill(colsum.begin(), colsum.end(), 0.f);
      for_each_probs_tile_t(p, qt, kf, b, hk, k0, nk, pt.data(), [&](int, int, int m, int64_t) {
        for (int c = 0; c < nk; ++c) {
          const float* pr = pt.data() + c * kBlockQ;
          float sum = 0.f;
#pragma omp simd reduction(+ : sum)
          for (int r = 0; r < m; ++r) sum += pr[r];
          colsum[c] += sum;
        }
      });
      for (int c = 0; c < nk; ++c) out[(seq0 + k0 + c) * p.num_heads_kv + hk] = colsum[c];
    }
  });
}

}  // namespace

#define CPU_DTYPE_SWITCH(DTYPE, T, OP, ...) \
  SINKLORA_DTYPE_SWITCH(DTYPE, T, float, c10::Half, c10::BFloat16, OP, __VA_ARGS__)

std::tuple<at::Tensor, at::Tensor> sf_attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                        const std::optional<at::Tensor>& cu_seqlens,
                                                        int64_t max_seqlen, int64_t group_size, int64_t num_sinks,
                                                        c10::string_view shift, double softmax_scale) {
  auto c = prepare_sf_attention_fwd(q, k, v, cu_seqlens, max_seqlen, group_size, num_sinks, shift, softmax_scale);
  if (!c.empty) CPU_DTYPE_SWITCH(c.q.scalar_type(), T, "sf_attention_fwd", [&] { forward<T>(c.params); });
  return {c.out, c.lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sf_attention_bwd_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const std::optional<at::Tensor>& cu_seqlens, int64_t max_seqlen, int64_t group_size,
    int64_t num_sinks, c10::string_view shift, double softmax_scale) {
  auto c = prepare_sf_attention_bwd(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, group_size, num_sinks, shift,
                                    softmax_scale);
  if (!c.empty) CPU_DTYPE_SWITCH(c.q.scalar_type(), T, "sf_attention_bwd", [&] { backward<T>(c.params); });
  return {c.dq, c.dk, c.dv};
}

at::Tensor column_scores_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& lse,
                             const std::optional<at::Tensor>& cu_seqlens, int64_t max_seqlen, int64_t group_size,
                             int64_t num_sinks, c10::string_view shift, double softmax_scale) {
  auto c = prepare_column_scores(q, k, lse, cu_seqlens, max_seqlen, group_size, num_sinks, shift, softmax_scale);
  if (!c.empty) {
    CPU_DTYPE_SWITCH(c.q.scalar_type(), T, "column_scores",
                     [&] { column_scores<T>(c.params, c.out.data_ptr<float>()); });
  }
  return c.out;
}

}  // namespace sinklora
