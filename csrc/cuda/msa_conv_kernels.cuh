// csrc/cuda/msa_conv_kernels.cuh: MSA-Conv (TiC) on CUDA (the msa_conv2d_fwd / msa_conv2d_bwd ops,
// docs/msa_conv.md): device code, launched from msa_conv_fwd.cu and msa_conv_bwd.cu. The geometry is
// csrc/msa_conv.h's (MsaAxis::tap, MsaAxis::queries_of), as in the CPU kernels.
//
// One item (a query in the forward and dQ, a key in dK/dV) is served by a group of G lanes of one
// warp; lane g of the group holds the elements g, g + G, ..., of the head dimension in fp32
// registers, and dot products are summed over the group with shuffles. Per head dim: D = 32 takes
// 8 lanes x 4 elements, D = 64 16 x 4, any other D <= 256 a whole warp x 8 (guarded).
//
//   msa_fwd_generic_kernel       out and lse per query: one online softmax (fp32) over its Kh * Kw
//                                taps; zero padding adds n_pad * exp(-m) to the denominator, mask
//                                padding leaves the taps out, clamp windows come from MsaAxis::tap.
//   msa_bwd_dq_generic_kernel    delta = rowsum(dout * out) and dQ per query, probabilities
//                                recomputed from lse.
//   msa_bwd_dkdv_generic_kernel  dK and dV per key, gathered over the queries whose window holds
//                                it (MsaAxis::queries_of): plain stores, no atomics, deterministic.
//
// Shuffles name the whole warp, so every lane of a warp runs the same loop trip counts: the tap
// loops run over all Kh * Kw taps (padded taps and lanes past the last item are predicated off),
// and the clamp runs of dK/dV take the warp's longest run. kv_shift is index arithmetic on the
// rolled coordinates, from a per-head table passed by value (MsaShifts) or, for many heads, from
// params.shift in device memory.
#pragma once

#include <c10/util/Exception.h>

#include <climits>
#include <cmath>
#include <cstdint>

#include "common/tile.cuh"
#include "launch.h"
#include "msa_conv.h"

namespace sinklora {
namespace cuda {

constexpr int kMsaThreads = 128;

// Lanes per item (G) and elements per lane (E) of head dim D (0: any head_dim <= 256).
template <int D>
struct MsaLanes {
  static constexpr int kG = 32, kE = 8;
};
template <>
struct MsaLanes<32> {
  static constexpr int kG = 8, kE = 4;
};
template <>
struct MsaLanes<64> {
  static constexpr int kG = 16, kE = 4;
};

// (sy, sx) of every head when heads <= kMsaInlineHeads (else params.shift holds them); all zero
// without kv_shift.
struct MsaShifts {
  int32_t yx[2 * kMsaInlineHeads];
};

inline MsaShifts msa_shifts(int heads, const int32_t* host_shift) {
  MsaShifts s{};
  if (host_shift != nullptr && heads <= kMsaInlineHeads)
    for (int i = 0; i < 2 * heads; ++i) s.yx[i] = host_shift[i];
  return s;
}

// Blocks of kMsaThreads for every item of [B, H, W, heads] with G lanes each.
inline unsigned msa_blocks(const MsaConvParams& p, int lanes, const char* op) {
  const int64_t items = int64_t(p.batch) * p.height * p.width * p.heads;
  const int64_t blocks = (items * lanes + kMsaThreads - 1) / kMsaThreads;
  TORCH_CHECK(blocks <= INT_MAX, op, ": B * H * W * heads (", items, ") exceeds the grid limit");
  return static_cast<unsigned>(blocks);
}

// One head's shift, reduced to [0, H) x [0, W).
struct MsaHeadShift {
  int sy, sx, height, width;
  __device__ __forceinline__ MsaHeadShift(const MsaConvParams& p, const MsaShifts& s, int h)
      : height(p.height), width(p.width) {
    if (p.heads <= kMsaInlineHeads) {
      sy = s.yx[2 * h];
      sx = s.yx[2 * h + 1];
    } else {
      sy = p.shift_y(h);
      sx = p.shift_x(h);
    }
  }
  // Rolled coordinate -> row / column of k and v.
  __device__ __forceinline__ int source_row(int y) const { return y + sy >= height ? y + sy - height : y + sy; }
  __device__ __forceinline__ int source_col(int x) const { return x + sx >= width ? x + sx - width : x + sx; }
  // Row / column of k and v -> rolled coordinate.
  __device__ __forceinline__ int rolled_row(int u) const { return u < sy ? u - sy + height : u - sy; }
  __device__ __forceinline__ int rolled_col(int u) const { return u < sx ? u - sx + width : u - sx; }
};

// The item of lane threadIdx.x: pixel (b, i, j) and head h, in the memory order of
// [B, H, W, heads]; a lane past the last item gets item 0 and active = false.
struct MsaItem {
  int b, i, j, h, g;
  bool active;
  template <int G>
  __device__ __forceinline__ static MsaItem of_thread(const MsaConvParams& p) {
    const int64_t total = int64_t(p.batch) * p.height * p.width * p.heads;
    int64_t n = (int64_t(blockIdx.x) * kMsaThreads + threadIdx.x) / G;
    MsaItem it;
    it.g = static_cast<int>(threadIdx.x % G);
    it.active = n < total;
    if (!it.active) n = 0;
    it.h = static_cast<int>(n % p.heads);
    n /= p.heads;
    it.j = static_cast<int>(n % p.width);
    n /= p.width;
    it.i = static_cast<int>(n % p.height);
    it.b = static_cast<int>(n / p.height);
    return it;
  }
};

template <typename T>
__device__ __forceinline__ const T* msa_at(const void* base, const int64_t* stride, int b, int y, int x, int h) {
  return static_cast<const T*>(base) + b * stride[0] + y * stride[1] + x * stride[2] + h * stride[3];
}
template <typename T>
__device__ __forceinline__ T* msa_at_mut(void* base, const int64_t* stride, int b, int y, int x, int h) {
  return static_cast<T*>(base) + b * stride[0] + y * stride[1] + x * stride[2] + h * stride[3];
}

// This lane's elements of one head-dim row (E registers, element g + e * G).
template <int D>
struct MsaVec {
  static constexpr int G = MsaLanes<D>::kG, E = MsaLanes<D>::kE;
  float x[E];

  __device__ __forceinline__ static bool has(int e, int g, int head_dim) {
    return D > 0 || e * G + g < head_dim;
  }
  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int e = 0; e < E; ++e) x[e] = 0.f;
  }
  template <typename T>
  __device__ __forceinline__ void load(const T* row, int g, int head_dim, float mul = 1.f) {
#pragma unroll
    for (int e = 0; e < E; ++e) x[e] = has(e, g, head_dim) ? to_float(row[e * G + g]) * mul : 0.f;
  }
  template <typename T>
  __device__ __forceinline__ void store(T* row, int g, int head_dim, float mul) const {
#pragma unroll
    for (int e = 0; e < E; ++e)
      if (has(e, g, head_dim)) row[e * G + g] = from_float<T>(x[e] * mul);
  }
  // This lane's part of the dot product with `o`.
  __device__ __forceinline__ float dot(const MsaVec& o) const {
    float s = 0.f;
#pragma unroll
    for (int e = 0; e < E; ++e) s = fmaf(x[e], o.x[e], s);
    return s;
  }
  __device__ __forceinline__ void scale_add(float scale, float w, const MsaVec& o) {  // x = x * scale + w * o
#pragma unroll
    for (int e = 0; e < E; ++e) x[e] = fmaf(w, o.x[e], x[e] * scale);
  }
  __device__ __forceinline__ void add(float w, const MsaVec& o) {
#pragma unroll
    for (int e = 0; e < E; ++e) x[e] = fmaf(w, o.x[e], x[e]);
  }
};

// Sum over the G lanes of an aligned group (every lane of the warp calls it).
template <int G>
__device__ __forceinline__ float msa_group_sum(float v) {
#pragma unroll
  for (int o = G / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ int msa_warp_max(int v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = max(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

__device__ __forceinline__ bool msa_inside(int y, int n) { return y >= 0 && y < n; }

template <typename T, int D>
__global__ void __launch_bounds__(kMsaThreads) msa_fwd_generic_kernel(const MsaConvParams p, const MsaShifts shifts) {
  using Vec = MsaVec<D>;
  constexpr int G = Vec::G;
  const MsaItem it = MsaItem::of_thread<G>(p);
  const MsaHeadShift sh(p, shifts, it.h);
  const int d = p.head_dim;
  Vec q, acc, kv;
  q.load(msa_at<T>(p.q, p.q_stride, it.b, it.i, it.j, it.h), it.g, d, p.softmax_scale);
  acc.zero();
  float m = -INFINITY, l = 0.f;
  int n_pad = 0;
  for (int a = 0; a < p.rows.k; ++a) {
    const int y = p.rows.tap(it.i, a);
    const bool row_in = msa_inside(y, p.height);
    const int u = row_in ? sh.source_row(y) : 0;
    for (int c = 0; c < p.cols.k; ++c) {
      const int x = p.cols.tap(it.j, c);
      const bool in = it.active && row_in && msa_inside(x, p.width);
      n_pad += !in;
      const int w = in ? sh.source_col(x) : 0;
      float s = 0.f;
      if (in) {
        kv.load(msa_at<T>(p.k, p.k_stride, it.b, u, w, it.h), it.g, d);
        s = q.dot(kv);
      }
      s = msa_group_sum<G>(s);
      if (in) {
        const float m_new = fmaxf(m, s);
        const float corr = expf(m - m_new), e = expf(s - m_new);
        l = l * corr + e;
        kv.load(msa_at<T>(p.v, p.v_stride, it.b, u, w, it.h), it.g, d);
        acc.scale_add(corr, e, kv);
        m = m_new;
      }
    }
  }
  if (!it.active) return;
  if (p.rows.padding == MsaPadding::kZero && n_pad > 0) {  // n_pad taps of logit 0
    if (m < 0.f) {
      const float corr = expf(m);
      l *= corr;
      acc.scale_add(corr, 0.f, acc);
      m = 0.f;
    }
    l += float(n_pad) * expf(-m);
  }
  acc.store(msa_at_mut<T>(p.out, p.o_stride, it.b, it.i, it.j, it.h), it.g, d, 1.f / l);
  if (it.g == 0) p.lse[p.lse_index(it.b, it.i, it.j, it.h)] = m + logf(l);
}

template <typename T, int D>
__global__ void __launch_bounds__(kMsaThreads)
    msa_bwd_dq_generic_kernel(const MsaConvBwdParams p, const MsaShifts shifts) {
  using Vec = MsaVec<D>;
  constexpr int G = Vec::G;
  const MsaItem it = MsaItem::of_thread<G>(p);
  const MsaHeadShift sh(p, shifts, it.h);
  const int d = p.head_dim;
  Vec q, dout, acc, kf, vf;
  dout.load(msa_at<T>(p.dout, p.do_stride, it.b, it.i, it.j, it.h), it.g, d);
  acc.load(msa_at<T>(p.out, p.o_stride, it.b, it.i, it.j, it.h), it.g, d);
  const float delta = msa_group_sum<G>(dout.dot(acc));
  q.load(msa_at<T>(p.q, p.q_stride, it.b, it.i, it.j, it.h), it.g, d, p.softmax_scale);
  const int64_t row = p.lse_index(it.b, it.i, it.j, it.h);
  const float lse = it.active ? p.lse[row] : 0.f;
  acc.zero();
  for (int a = 0; a < p.rows.k; ++a) {
    const int y = p.rows.tap(it.i, a);
    const bool row_in = msa_inside(y, p.height);
    const int u = row_in ? sh.source_row(y) : 0;
    for (int c = 0; c < p.cols.k; ++c) {
      const int x = p.cols.tap(it.j, c);
      const bool in = it.active && row_in && msa_inside(x, p.width);  // a padded tap has k = v = 0
      const int w = in ? sh.source_col(x) : 0;
      float s = 0.f, dp = 0.f;
      if (in) {
        kf.load(msa_at<T>(p.k, p.k_stride, it.b, u, w, it.h), it.g, d);
        vf.load(msa_at<T>(p.v, p.v_stride, it.b, u, w, it.h), it.g, d);
        s = q.dot(kf);
        dp = dout.dot(vf);
      }
      s = msa_group_sum<G>(s);
      dp = msa_group_sum<G>(dp);
      if (in) acc.add(expf(s - lse) * (dp - delta), kf);
    }
  }
  if (!it.active) return;
  acc.store(msa_at_mut<T>(p.dq, p.dq_stride, it.b, it.i, it.j, it.h), it.g, d, p.softmax_scale);
  if (it.g == 0) p.delta[row] = delta;
}

// Item (b, i, j, h) here is the key at row i, column j of k and v.
template <typename T, int D>
__global__ void __launch_bounds__(kMsaThreads)
    msa_bwd_dkdv_generic_kernel(const MsaConvBwdParams p, const MsaShifts shifts) {
  using Vec = MsaVec<D>;
  constexpr int G = Vec::G;
  const MsaItem it = MsaItem::of_thread<G>(p);
  const MsaHeadShift sh(p, shifts, it.h);
  const int d = p.head_dim;
  const bool clamp = p.rows.padding == MsaPadding::kClamp;  // otherwise runs of at most one query
  const int y = sh.rolled_row(it.i), x = sh.rolled_col(it.j);
  Vec kf, vf, qf, dof, dk, dv;
  kf.load(msa_at<T>(p.k, p.k_stride, it.b, it.i, it.j, it.h), it.g, d);
  vf.load(msa_at<T>(p.v, p.v_stride, it.b, it.i, it.j, it.h), it.g, d);
  dk.zero();
  dv.zero();
  for (int a = 0; a < p.rows.k; ++a) {
    int ilo, ihi;
    p.rows.queries_of(y, a, ilo, ihi);
    const int ni = it.active && ilo <= ihi ? (ihi - ilo) / p.rows.d + 1 : 0;
    const int ni_max = clamp ? msa_warp_max(ni) : 1;
    for (int ti = 0; ti < ni_max; ++ti) {
      const int qi = ilo + ti * p.rows.d;
      for (int c = 0; c < p.cols.k; ++c) {
        int jlo, jhi;
        p.cols.queries_of(x, c, jlo, jhi);
        const int nj = ti < ni && jlo <= jhi ? (jhi - jlo) / p.cols.d + 1 : 0;
        const int nj_max = clamp ? msa_warp_max(nj) : 1;
        for (int tj = 0; tj < nj_max; ++tj) {
          const int qj = jlo + tj * p.cols.d;
          const bool in = tj < nj;
          float s = 0.f, dp = 0.f;
          if (in) {
            qf.load(msa_at<T>(p.q, p.q_stride, it.b, qi, qj, it.h), it.g, d);
            dof.load(msa_at<T>(p.dout, p.do_stride, it.b, qi, qj, it.h), it.g, d);
            s = qf.dot(kf);
            dp = dof.dot(vf);
          }
          s = msa_group_sum<G>(s);
          dp = msa_group_sum<G>(dp);
          if (in) {
            const int64_t row = p.lse_index(it.b, qi, qj, it.h);
            const float prob = expf(s * p.softmax_scale - p.lse[row]);
            dv.add(prob, dof);
            dk.add(prob * (dp - p.delta[row]), qf);
          }
        }
      }
    }
  }
  if (!it.active) return;
  dk.store(msa_at_mut<T>(p.dk, p.dk_stride, it.b, it.i, it.j, it.h), it.g, d, p.softmax_scale);
  dv.store(msa_at_mut<T>(p.dv, p.dv_stride, it.b, it.i, it.j, it.h), it.g, d, 1.f);
}

}  // namespace cuda
}  // namespace sinklora
