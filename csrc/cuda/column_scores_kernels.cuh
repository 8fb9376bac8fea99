// csrc/cuda/column_scores_kernels.cuh: column scores of the SF-Attn softmax (the column_scores op,
// H2O prefill scores, docs/paged_kv.md): device code, launched from column_scores.cu.
//
//   out[(seq_start + j) * Hkv + hk] = sum over the query heads h of kv head hk and the queries i
//                                     that see key j of exp(scale q_i . k_j - lse[h, seq_start + i])
//
// Flash style, O(N) memory: the structure of the backward's dK/dV kernels. One thread block per
// (key tile, kv head, sequence) walks the query heads of its group and the query tiles of
// query_spans (QueryTileIter), recomputes S^T = K Q^T tile by tile and keeps the column sums of
// its keys in registers. Key tiles holding sink keys, which every query sees, are split over
// several blocks (the backward's sink split, bwd_block); each of those blocks writes partial sums
// of its slice of queries to a workspace [batch][Hkv][ns * BN][chunks], which
// column_scores_finish_kernel adds up in a fixed order (deterministic, no atomics).
//
// column_scores_mma_kernel (fp16/bf16, D 64 or 128, sm_80+): 64 keys per block, 4 warps of 16 keys,
// query tiles of 64 rows double-buffered by cp.async, mma.sync m16n8k16 with K as the A operand
// held in registers; masks (ColMask) only on tiles that are not fully visible.
// column_scores_generic_kernel (any dtype, D <= 256): 16 keys x 16 queries per tile in fp32 shared
// memory; thread t owns key t % 16 and queries t / 16 and t / 16 + 8.
#pragma once

#include "sf_attention_bwd_kernels.cuh"

namespace sinklora {
namespace cuda {

template <typename T, int D>
struct ColMmaCfg {
  static constexpr int kBN = 64;  // keys per block (16 per warp)
  static constexpr int kBM = 64;  // query rows per tile
  static constexpr int kThreads = 128;
  static constexpr int kCPR = D / 8;
  // K fragments stay in registers for D = 64; for D = 128 they are re-read every tile.
  static constexpr bool kKInRegs = D <= 64;
  // K [kBN][D], Q [2][kBM][D] (T, swizzled); lse * log2(e) [2][kBM] (fp32).
  static constexpr size_t kSmemT = size_t(kBN * D + 2 * kBM * D) * sizeof(T);
  static constexpr size_t kSmem = kSmemT + size_t(2 * kBM) * sizeof(float);
};

// Chunk of a split sink tile handled by this block (see bwd_block); 0 otherwise.
__device__ __forceinline__ int column_scores_chunk(const SinkSplit& s, int num_tiles) {
  const int per_b = num_tiles + s.ns * (s.chunks - 1);
  return (static_cast<int>(blockIdx.x) % per_b) % s.chunks;
}

// Partial sums of split sink tiles: [batch][Hkv][ns * block_n][chunks].
__device__ __forceinline__ int64_t column_scores_part_index(const SinkSplit& s, int block_n, int b, int hk, int hkv,
                                                        int key, int chunk) {
  return ((int64_t(b) * hkv + hk) * s.ns * block_n + key) * s.chunks + chunk;
}

template <typename T, int D>
__global__ void __launch_bounds__(128)
    column_scores_mma_kernel(const SfAttentionParams p, int num_tiles, const SinkSplit split, float* out, float* part) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using Cfg = ColMmaCfg<T, D>;
  constexpr int BN = Cfg::kBN, BM = Cfg::kBM, CPR = Cfg::kCPR, NT = Cfg::kThreads;
  unsigned char* smem_raw = dynamic_smem<unsigned char>();
  T* sK = reinterpret_cast<T*>(smem_raw);
  T* sQ = sK + BN * D;  // [2][BM * D]
  float* sLse = reinterpret_cast<float*>(smem_raw + Cfg::kSmemT);  // [2][BM]
  constexpr uint32_t kTileBytes = BM * D * sizeof(T);
  const uint32_t sK_u = smem_u32(sK);
  const uint32_t sQ_u = sK_u + BN * D * sizeof(T);

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const KeyTile kt = key_tile(p, split, num_tiles, BM, BN);
  if (kt.empty()) return;
  const BwdBlock& blk = kt.blk;
  const int b = kt.b, hk = kt.hk, k0 = kt.k0, k1 = kt.k1, start = kt.start;
  const float scale_log2 = kt.scale_log2;
  const T* kg = kt.rows<T>(p, p.k, p.k_batch_stride, p.k_row_stride, p.k_head_stride, hk);
  const T* qb = kt.rows<T>(p, p.q, p.q_batch_stride, p.q_row_stride, 0, 0);

  float next_lse = 0.f;
  auto issue_query_tile = [&](int buf, int h, int q0, int q1) {
    cp_async_tile<BM, D, NT>(sQ + buf * BM * D, qb + int64_t(h) * p.q_head_stride, p.q_row_stride, q0, q1 - q0,
                             tid);
    cp_async_commit();
    if (tid < BM) next_lse = q0 + tid < q1 ? p.lse[int64_t(h) * p.total_rows + start + q0 + tid] * kLog2e : 0.f;
  };
  auto stage_lse = [&](int buf) {
    if (tid < BM) sLse[buf * BM + tid] = next_lse;
  };

  QueryTileIter it = kt.query_tiles(p, BM);
  cp_async_tile<BN, D, NT>(sK, kg, p.k_row_stride, k0, k1 - k0, tid);
  cp_async_commit();
  if (it.valid()) {
    issue_query_tile(0, it.head(), it.lo(), it.hi());
    stage_lse(0);
  }
  cp_async_wait_all();
  __syncthreads();

  const LdsmAddr<CPR, kPatA> addr_a(lane);
  const LdsmAddr<CPR, kPatB> addr_b(lane);
  const uint32_t sKw_u = sK_u + warp * 16 * CPR * 16;  // this warp's 16 keys (A operand)
  uint32_t kf[Cfg::kKInRegs ? D / 16 : 1][4];
  if constexpr (Cfg::kKInRegs) {
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) ldsm_x4(kf[kk], sKw_u + addr_a(0, kk * 2));
  }
  const int key_lo = k0 + warp * 16 + (lane >> 2);  // this thread's keys: key_lo, key_lo + 8
  const bool key_ok[2] = {key_lo < k1, key_lo + 8 < k1};
  float colsum[2] = {0.f, 0.f};
  int buf = 0;

  while (it.valid()) {
    const int q0 = it.lo(), q1 = it.hi();
    const SfPattern pat = it.pattern();
    it.next();
    const bool has_next = it.valid();
    if (has_next) issue_query_tile(buf ^ 1, it.head(), it.lo(), it.hi());
    const uint32_t cQ_u = sQ_u + buf * kTileBytes;
    const float* cL = sLse + buf * BM;

    float st[BM / 8][4];
#pragma unroll
    for (int i = 0; i < BM / 8; ++i) st[i][0] = st[i][1] = st[i][2] = st[i][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      const int ki = Cfg::kKInRegs ? kk : 0;
      if constexpr (!Cfg::kKInRegs) ldsm_x4(kf[0], sKw_u + addr_a(0, kk * 2));
#pragma unroll
      for (int nb2 = 0; nb2 < BM / 16; ++nb2) {
        uint32_t qf[4];
        ldsm_x4(qf, cQ_u + addr_b(nb2 * 16, kk * 2));
        mma16816<T>(st[2 * nb2], kf[ki], qf[0], qf[1]);
        mma16816<T>(st[2 * nb2 + 1], kf[ki], qf[2], qf[3]);
      }
    }
    const bool need_mask = !(q1 - q0 == BM && k1 - k0 == BN && pat.tile_fully_visible(q0, q1, k0, k1));
    const ColMask cmask[2] = {ColMask::make(pat, key_lo), ColMask::make(pat, key_lo + 8)};
#pragma unroll
    for (int nb = 0; nb < BM / 8; ++nb) {
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const int qi = nb * 8 + (lane & 3) * 2 + (c & 1);
        const bool vis = !need_mask || (q0 + qi < q1 && key_ok[c >> 1] && cmask[c >> 1](q0 + qi));
        colsum[c >> 1] += vis ? exp2f(st[nb][c] * scale_log2 - cL[qi]) : 0.f;
      }
    }
    if (has_next) stage_lse(buf ^ 1);
    cp_async_wait_all();  // the next tile's Q
    __syncthreads();      // everyone is done with this buffer
    buf ^= 1;
  }

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    colsum[r] += __shfl_xor_sync(0xffffffffu, colsum[r], 1);
    colsum[r] += __shfl_xor_sync(0xffffffffu, colsum[r], 2);
  }
  if ((lane & 3) == 0) {
    const int chunk = blk.split ? column_scores_chunk(split, num_tiles) : 0;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      if (!key_ok[r]) continue;
      const int key = key_lo + 8 * r;
      if (blk.split) {
        part[column_scores_part_index(split, BN, b, hk, p.num_heads_kv, key, chunk)] = colsum[r];
      } else {
        out[(int64_t(start) + key) * p.num_heads_kv + hk] = colsum[r];
      }
    }
  }
#endif  // __CUDA_ARCH__ >= 800
}

constexpr int kColGenB = 16;  // keys per block and queries per tile

inline size_t column_scores_generic_smem(int D) {
  return sizeof(float) * (size_t(2) * kColGenB * (D + 1) + kColGenB + 128);
}

template <typename T>
__global__ void __launch_bounds__(128) column_scores_generic_kernel(const SfAttentionParams p, int num_tiles,
                                                                const SinkSplit split, float* out, float* part) {
  constexpr int B = kColGenB;
  float* gsmem = dynamic_smem<float>();
  const int D = p.head_dim, DK = D + 1;
  float* sK = gsmem;        // [B][DK]
  float* sQ = sK + B * DK;  // [B][DK]
  float* sL = sQ + B * DK;  // [B]
  float* sRed = sL + B;     // [128]

  const int tid = threadIdx.x;
  const KeyTile kt = key_tile(p, split, num_tiles, B, B);
  if (kt.empty()) return;
  const BwdBlock& blk = kt.blk;
  const int b = kt.b, hk = kt.hk, k0 = kt.k0, k1 = kt.k1, start = kt.start;
  const float scale_log2 = kt.scale_log2;
  load_rows_f32(sK, DK, kt.rows<T>(p, p.k, p.k_batch_stride, p.k_row_stride, p.k_head_stride, hk), p.k_row_stride,
                k0, k1, B, D);

  const int j = tid % B, r0 = tid / B;  // key k0 + j; query rows r0 and r0 + 8 of each tile
  const bool key_ok = k0 + j < k1;
  float colsum = 0.f;
  for (QueryTileIter it = kt.query_tiles(p, B); it.valid(); it.next()) {
    const int h = it.head(), q0 = it.lo(), q1 = it.hi();
    const SfPattern pat = it.pattern();
    __syncthreads();  // the previous tile is consumed (and sK is written, the first time)
    load_rows_f32(sQ, DK, kt.rows<T>(p, p.q, p.q_batch_stride, p.q_row_stride, p.q_head_stride, h), p.q_row_stride,
                  q0, q1, B, D);
    if (tid < B) sL[tid] = q0 + tid < q1 ? p.lse[int64_t(h) * p.total_rows + start + q0 + tid] * kLog2e : 0.f;
    __syncthreads();
    const bool need_mask = !(q1 - q0 == B && k1 - k0 == B && pat.tile_fully_visible(q0, q1, k0, k1));
    const ColMask cmask = ColMask::make(pat, k0 + j);
    const float* kr = sK + j * DK;
#pragma unroll
    for (int t = 0; t < 2; ++t) {
      const int r = r0 + 8 * t;
      const float* qr = sQ + r * DK;
      float s = 0.f;
      for (int d = 0; d < D; ++d) s = fmaf(qr[d], kr[d], s);
      const bool vis = !need_mask || (q0 + r < q1 && key_ok && cmask(q0 + r));
      colsum += vis ? exp2f(s * scale_log2 - sL[r]) : 0.f;
    }
  }
  sRed[tid] = colsum;
  __syncthreads();
  if (tid < B && key_ok) {
    float sum = 0.f;
#pragma unroll
    for (int i = 0; i < 128 / B; ++i) sum += sRed[tid + B * i];
    const int key = k0 + tid;
    if (blk.split) {
      part[column_scores_part_index(split, B, b, hk, p.num_heads_kv, key, column_scores_chunk(split, num_tiles))] = sum;
    } else {
      out[(int64_t(start) + key) * p.num_heads_kv + hk] = sum;
    }
  }
}

// out rows of the split sink tiles = the sum of their chunks' partial sums, in chunk order.
__global__ void __launch_bounds__(256)
    column_scores_finish_kernel(const SfAttentionParams p, const SinkSplit split, int block_n, const float* part,
                            float* out) {
  const int keys = split.ns * block_n;
  const int64_t total = int64_t(p.batch) * p.num_heads_kv * keys;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int key = static_cast<int>(i % keys);
    const int64_t bh = i / keys;
    const int hk = static_cast<int>(bh % p.num_heads_kv);
    const int b = static_cast<int>(bh / p.num_heads_kv);
    if (key >= p.seq_len(b)) continue;
    const float* src = part + i * split.chunks;
    float sum = 0.f;
    for (int c = 0; c < split.chunks; ++c) sum += src[c];
    out[(int64_t(p.seq_start(b)) + key) * p.num_heads_kv + hk] = sum;
  }
}

}  // namespace cuda
}  // namespace sinklora
