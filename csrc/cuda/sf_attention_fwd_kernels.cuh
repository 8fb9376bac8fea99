// SF-Attn forward kernels (device code; launched from sf_attention_fwd.cu).
//
// One thread block per (query tile, query head, sequence). It walks only the key tiles of
// key_spans(q0, q1) (sinks, then the segment up to the diagonal, then for `roll` the wrapped tail),
// with an online softmax in fp32, and applies the element mask (RowMask) only on tiles that are
// not fully visible. Query tiles are launched last-first (longest walks first under `full`).
// Two kernels:
//   * fwd_mma_kernel: fp16/bf16, head dim 64 or 128, sm_80+. 64 query rows x 64 keys per tile,
//     4 warps (16 query rows each), mma.sync m16n8k16 with ldmatrix from swizzled shared memory,
//     cp.async loads (V of this tile overlaps QK^T, K of the next tile overlaps PV).
//   * fwd_generic_kernel: any dtype, any head dim <= 256, CUDA cores, fp32 math.
#pragma once

#include "sf_attention_kernels.cuh"

namespace sinklora {
namespace cuda {

// ---------------------------------------------------------------------------------------------
// Tensor-core forward

template <typename T, int D>
struct FwdMmaCfg {
  static constexpr int kBM = 64;  // query rows per block (16 per warp)
  static constexpr int kBN = 64;  // keys per tile
  static constexpr int kThreads = 128;
  static constexpr int kCPR = D / 8;  // 16-byte chunks per smem row
  // Q fragments stay in registers for D = 64; for D = 128 they are re-read from shared memory
  // every tile (32 registers fewer: O alone is 64 fp32 registers per thread there).
  static constexpr bool kQInRegs = D <= 64;
  static constexpr size_t kSmem = size_t(kBM + 2 * kBN) * D * sizeof(T);
};

template <typename T, int D>
__global__ void __launch_bounds__(128) fwd_mma_kernel(const SfAttentionParams p, int num_tiles) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using Cfg = FwdMmaCfg<T, D>;
  constexpr int BM = Cfg::kBM, BN = Cfg::kBN, CPR = Cfg::kCPR, NT = Cfg::kThreads;
  unsigned char* smem_raw = dynamic_smem<unsigned char>();
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + BM * D;
  T* sV = sK + BN * D;
  const uint32_t sQ_u = smem_u32(sQ);
  const uint32_t sK_u = sQ_u + BM * D * sizeof(T);
  const uint32_t sV_u = sK_u + BN * D * sizeof(T);

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const QueryTile qt = query_tile(p, num_tiles, BM);  // longest rows first
  if (qt.empty()) return;
  const int b = qt.b, h = qt.h, q0 = qt.q0, q1 = qt.q1;
  const SfPattern pat = qt.pat;
  const T* qg = head_rows<T>(p, b, p.q, p.q_batch_stride, p.q_row_stride, p.q_head_stride, h);
  const T* kg = head_rows<T>(p, b, p.k, p.k_batch_stride, p.k_row_stride, p.k_head_stride, qt.hk);
  const T* vg = head_rows<T>(p, b, p.v, p.v_batch_stride, p.v_row_stride, p.v_head_stride, qt.hk);
  const float scale_log2 = qt.scale_log2;

  SpanTileIter it(pat.key_spans(q0, q1), BN);
  cp_async_tile<BM, D, NT>(sQ, qg, p.q_row_stride, q0, q1 - q0, tid);
  cp_async_tile<BN, D, NT>(sK, kg, p.k_row_stride, it.lo, it.hi() - it.lo, tid);
  cp_async_commit();
  cp_async_wait_all();
  __syncthreads();

  const LdsmAddr<CPR, kPatA> addr_a(lane);
  const LdsmAddr<CPR, kPatB> addr_b(lane);
  const LdsmAddr<CPR, kPatT> addr_t(lane);
  const uint32_t sQw_u = sQ_u + warp * 16 * CPR * 16;  // this warp's 16 query rows

  // This warp's 16 query rows as A fragments, for every 16-wide slice of the head dim.
  uint32_t qf[Cfg::kQInRegs ? D / 16 : 1][4];
  if constexpr (Cfg::kQInRegs) {
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) ldsm_x4(qf[kk], sQw_u + addr_a(0, kk * 2));
  }

  float o[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  float m[2] = {-INFINITY, -INFINITY};  // running max of scaled logits (log2 units), rows g, g + 8
  float l[2] = {0.f, 0.f};              // this thread's part of the running sum
  const int row_lo = q0 + warp * 16 + (lane >> 2);  // this thread's rows: row_lo, row_lo + 8
  const RowMask rmask[2] = {RowMask::make(pat, row_lo), RowMask::make(pat, row_lo + 8)};

  while (it.valid()) {
    const int k0 = it.lo, k1 = it.hi();
    cp_async_tile<BN, D, NT>(sV, vg, p.v_row_stride, k0, k1 - k0, tid);
    cp_async_commit();

    // S = Q K^T
    float s[BN / 8][4];
#pragma unroll
    for (int i = 0; i < BN / 8; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      const int qk = Cfg::kQInRegs ? kk : 0;
      if constexpr (!Cfg::kQInRegs) ldsm_x4(qf[0], sQw_u + addr_a(0, kk * 2));
#pragma unroll
      for (int nb2 = 0; nb2 < BN / 16; ++nb2) {
        uint32_t kb[4];
        ldsm_x4(kb, sK_u + addr_b(nb2 * 16, kk * 2));
        mma16816<T>(s[2 * nb2], qf[qk], kb[0], kb[1]);
        mma16816<T>(s[2 * nb2 + 1], qf[qk], kb[2], kb[3]);
      }
    }

    // Scale and mask. Padding keys (>= k1) are masked; padding rows (>= q1) are never stored.
    const bool need_mask = !(k1 - k0 == BN && pat.tile_fully_visible(q0, q1, k0, k1));
#pragma unroll
    for (int nb = 0; nb < BN / 8; ++nb) {
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const int key = k0 + nb * 8 + (lane & 3) * 2 + (c & 1);
        const bool vis = !need_mask || (key < k1 && rmask[c >> 1](key));
        s[nb][c] = vis ? s[nb][c] * scale_log2 : -INFINITY;
      }
    }

    // Online softmax. A row whose keys are all masked so far keeps m = -inf and subtracts 0.
    float alpha[2], m_use[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = m[r];
#pragma unroll
      for (int nb = 0; nb < BN / 8; ++nb) mx = fmaxf(mx, fmaxf(s[nb][2 * r], s[nb][2 * r + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      m_use[r] = mx == -INFINITY ? 0.f : mx;
      alpha[r] = exp2f(m[r] - m_use[r]);
      m[r] = mx;
      l[r] *= alpha[r];
    }
#pragma unroll
    for (int nb = 0; nb < BN / 8; ++nb) {
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        s[nb][c] = exp2f(s[nb][c] - m_use[c >> 1]);
        l[c >> 1] += s[nb][c];
      }
    }
#pragma unroll
    for (int nb = 0; nb < D / 8; ++nb) {
#pragma unroll
      for (int c = 0; c < 4; ++c) o[nb][c] *= alpha[c >> 1];
    }

    cp_async_wait_all();  // V of this tile
    __syncthreads();      // and every warp is done with K of this tile
    it.next();
    if (it.valid()) {
      cp_async_tile<BN, D, NT>(sK, kg, p.k_row_stride, it.lo, it.hi() - it.lo, tid);
      cp_async_commit();
    }

    // O += P V, P straight from the S accumulators.
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      uint32_t a[4];
      a[0] = pack2<T>(s[2 * kk][0], s[2 * kk][1]);
      a[1] = pack2<T>(s[2 * kk][2], s[2 * kk][3]);
      a[2] = pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
      a[3] = pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
      for (int nb2 = 0; nb2 < D / 16; ++nb2) {
        uint32_t vb[4];
        ldsm_x4_trans(vb, sV_u + addr_t(kk * 16, nb2 * 2));
        mma16816<T>(o[2 * nb2], a, vb[0], vb[1]);
        mma16816<T>(o[2 * nb2 + 1], a, vb[2], vb[3]);
      }
    }
    cp_async_wait_all();  // K of the next tile
    __syncthreads();      // and every warp is done with V
  }

  // Epilogue: normalise, write lse, stage O through this warp's rows of sQ, 16-byte stores.
  float inv[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
    inv[r] = l[r] > 0.f ? 1.f / l[r] : 0.f;
    const int row = row_lo + r * 8;
    if ((lane & 3) == 0 && row < q1) {
      p.lse[int64_t(h) * p.total_rows + p.seq_start(b) + row] =
          l[r] > 0.f ? (m[r] + log2f(l[r])) * kLn2 : -INFINITY;
    }
  }
#pragma unroll
  for (int nb = 0; nb < D / 8; ++nb) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = warp * 16 + (lane >> 2) + r * 8;
      *reinterpret_cast<uint32_t*>(sQ + swz<CPR>(row, nb) * 8 + (lane & 3) * 2) =
          pack2<T>(o[nb][2 * r] * inv[r], o[nb][2 * r + 1] * inv[r]);
    }
  }
  __syncwarp();
  T* og = static_cast<T*>(p.out) + p.batch_offset(b, p.o_batch_stride, p.o_row_stride) +
          int64_t(h) * p.o_head_stride;
#pragma unroll
  for (int i = 0; i < 16 * CPR / 32; ++i) {
    const int idx = lane + 32 * i;
    const int row = warp * 16 + idx / CPR;
    const int c = idx % CPR;
    if (q0 + row < q1) {
      *reinterpret_cast<uint4*>(og + int64_t(q0 + row) * p.o_row_stride + c * 8) =
          *reinterpret_cast<const uint4*>(sQ + swz<CPR>(row, c) * 8);
    }
  }
#endif  // __CUDA_ARCH__ >= 800
}

// ---------------------------------------------------------------------------------------------
// Generic forward: fp32 math on CUDA cores, any head dim up to 256.
//
// 4 warps, 16 query rows per block (4 per warp), 32 keys per tile (one per lane). Shared memory
// (fp32): Q [16][D], K [32][D + 1] (padded: lane j reads row j), V [32][D].

constexpr int kGenFwdBM = 16;
constexpr int kGenFwdBN = 32;
constexpr int kGenMaxT = 8;  // head dim slices of 32 per lane (D <= 256)

inline size_t gen_fwd_smem(int D) {
  return sizeof(float) *
         (size_t(kGenFwdBM) * D + size_t(kGenFwdBN) * (D + 1) + size_t(kGenFwdBN) * D);
}

template <typename T>
__global__ void __launch_bounds__(128)
    fwd_generic_kernel(const SfAttentionParams p, int num_tiles) {
  constexpr int BM = kGenFwdBM, BN = kGenFwdBN, RPW = BM / 4;  // rows per warp
  float* gsmem = dynamic_smem<float>();
  const int D = p.head_dim, DK = D + 1;
  float* sQ = gsmem;
  float* sK = sQ + BM * D;
  float* sV = sK + BN * DK;

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const QueryTile qt = query_tile(p, num_tiles, BM);  // longest rows first
  if (qt.empty()) return;
  const int b = qt.b, h = qt.h, q0 = qt.q0, q1 = qt.q1;
  const SfPattern pat = qt.pat;
  const T* qg = head_rows<T>(p, b, p.q, p.q_batch_stride, p.q_row_stride, p.q_head_stride, h);
  const T* kg = head_rows<T>(p, b, p.k, p.k_batch_stride, p.k_row_stride, p.k_head_stride, qt.hk);
  const T* vg = head_rows<T>(p, b, p.v, p.v_batch_stride, p.v_row_stride, p.v_head_stride, qt.hk);
  const float scale_log2 = qt.scale_log2;

  for (int idx = tid; idx < BM * D; idx += blockDim.x) {
    const int r = idx / D, d = idx % D;
    sQ[idx] = q0 + r < q1 ? to_float(qg[int64_t(q0 + r) * p.q_row_stride + d]) : 0.f;
  }

  float o[RPW][kGenMaxT];
  float m[RPW], l[RPW];
#pragma unroll
  for (int r = 0; r < RPW; ++r) {
    m[r] = -INFINITY;
    l[r] = 0.f;
#pragma unroll
    for (int t = 0; t < kGenMaxT; ++t) o[r][t] = 0.f;
  }
  const float* qw = sQ + warp * RPW * D;

  for (SpanTileIter it(pat.key_spans(q0, q1), BN); it.valid(); it.next()) {
    const int k0 = it.lo, k1 = it.hi();
    __syncthreads();  // the previous tile is consumed (and sQ is written, the first time)
    for (int idx = tid; idx < BN * D; idx += blockDim.x) {
      const int j = idx / D, d = idx % D;
      const bool ok = k0 + j < k1;
      sK[j * DK + d] = ok ? to_float(kg[int64_t(k0 + j) * p.k_row_stride + d]) : 0.f;
      sV[idx] = ok ? to_float(vg[int64_t(k0 + j) * p.v_row_stride + d]) : 0.f;
    }
    __syncthreads();

    float s[RPW];
#pragma unroll
    for (int r = 0; r < RPW; ++r) s[r] = 0.f;
    const float* kr = sK + lane * DK;
    for (int d = 0; d < D; ++d) {
      const float kv = kr[d];
#pragma unroll
      for (int r = 0; r < RPW; ++r) s[r] = fmaf(qw[r * D + d], kv, s[r]);
    }

    const bool need_mask = !(k1 - k0 == BN && pat.tile_fully_visible(q0, q1, k0, k1));
    const int key = k0 + lane;
#pragma unroll
    for (int r = 0; r < RPW; ++r) {
      const int row = q0 + warp * RPW + r;
      const bool vis = !need_mask || (key < k1 && pat.visible(row, key));
      const float sv = vis ? s[r] * scale_log2 : -INFINITY;
      const float mx = fmaxf(m[r], warp_max(sv));
      const float m_use = mx == -INFINITY ? 0.f : mx;
      const float alpha = exp2f(m[r] - m_use);
      m[r] = mx;
      s[r] = exp2f(sv - m_use);
      l[r] = l[r] * alpha + s[r];
#pragma unroll
      for (int t = 0; t < kGenMaxT; ++t) o[r][t] *= alpha;
    }

    const int nk = k1 - k0;
    for (int j = 0; j < nk; ++j) {
      float pj[RPW];
#pragma unroll
      for (int r = 0; r < RPW; ++r) pj[r] = __shfl_sync(0xffffffffu, s[r], j);
      const float* vr = sV + j * D;
#pragma unroll
      for (int t = 0; t < kGenMaxT; ++t) {
        const int d = lane + 32 * t;
        if (d < D) {
          const float vv = vr[d];
#pragma unroll
          for (int r = 0; r < RPW; ++r) o[r][t] = fmaf(pj[r], vv, o[r][t]);
        }
      }
    }
  }

  T* og = static_cast<T*>(p.out) + p.batch_offset(b, p.o_batch_stride, p.o_row_stride) +
          int64_t(h) * p.o_head_stride;
#pragma unroll
  for (int r = 0; r < RPW; ++r) {
    const float lsum = warp_sum(l[r]);
    const int row = q0 + warp * RPW + r;
    if (row >= q1) continue;
    const float inv = lsum > 0.f ? 1.f / lsum : 0.f;
#pragma unroll
    for (int t = 0; t < kGenMaxT; ++t) {
      const int d = lane + 32 * t;
      if (d < D) og[int64_t(row) * p.o_row_stride + d] = from_float<T>(o[r][t] * inv);
    }
    if (lane == 0) {
      p.lse[int64_t(h) * p.total_rows + p.seq_start(b) + row] =
          lsum > 0.f ? (m[r] + log2f(lsum)) * kLn2 : -INFINITY;
    }
  }
}

}  // namespace cuda
}  // namespace sinklora
