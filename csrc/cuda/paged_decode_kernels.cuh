// csrc/cuda/paged_decode_kernels.cuh: paged decode with fused H2O score accumulation
// (docs/paged_kv.md): device code, launched from
// paged_decode.cu (generic kernel, merge) and paged_decode_mma.cu (tensor-core kernel).
//
// Work split. One thread block per (sequence b, kv head hk, split s). Split s covers the logical
// slots [s * P, s * P + P) of the sequence (P = DecodePlan::partition, a multiple of 64); splits
// at or past seq_lens[b] exit at once. The number of splits comes from max_blocks_per_seq *
// block_size (an upper bound of every length) and B * Hkv against the SM count, never from
// seq_lens on the host, so the launch can be captured in a CUDA graph (decode_split in paged_decode.cu).
// The block serves all G = Hq / Hkv query heads of its kv head, so each K and V row is read once
// per step for the whole group (GQA).
//
// Phases of one block (both kernels):
//   0. physical block / offset of each slot of the split -> shared (sBlk, sOff). Slots past the
//      length, and slots whose table entry is not a block of the pool, get sBlk = -1: their K/V
//      rows are never read (zero-filled in shared memory) and their logits are -inf.
//   1. logits s[h][t] = scale * log2(e) * q_h . k_t for all G heads -> shared, fp32 [G][P + 8].
//   2. per head: m_h = max_t s, e[h][t] = 2^(s - m_h) (in place), l_h = sum_t e.
//      With scores, one split (splits == 1): every valid slot gains sum_h e[h][t] / l_h, the exact
//      probability of this step summed over the group (one fp32 atomicAdd per slot and kv head;
//      a slot is added to once per launch unless blocks are shared between sequences).
//      Several splits: e is written to the workspace, and the merge kernel rescales it with the
//      global log-sum-exp (no second pass over K).
//   3. o_h = sum_t e[h][t] v_t. One split: out = o_h / l_h. Several: o_h, m_h, l_h -> workspace.
// decode_merge_kernel then combines the splits of a (sequence, kv head) with the log-sum-exp
// merge: M_h = max_s m_sh, L_h = sum_s l_sh 2^(m_sh - M_h), out_h = sum_s o_sh 2^(m_sh - M_h) / L_h,
// and for the slots of its split c adds sum_h e_c[h][t] 2^(m_ch - M_h) / L_h to the scores.
//
// Workspace layout (fp32, only when splits > 1; offsets in DecodePlan):
//   acc [B * Hkv][S][G][D]   unnormalised o of each split
//   ml  [B * Hkv][S][G][2]   (m, l) of each split; m in log2 units, -inf when no slot is valid
//   e   [B * Hkv][S][G][P]   2^(s - m_split) per slot (only when scores are accumulated)
//
// Kernels:
//   * decode_mma_kernel<T, D, SCORES>: fp16/bf16, D in {64, 128}, G <= 16, sm_80+. 4 warps; K and
//     V tiles of 64 slots stream through a 3-4 stage cp.async ring (16-byte copies, XOR-swizzled),
//     K tiles first, then V tiles (the first V tiles load while the softmax runs). Q K^T and P V
//     with mma.sync m16n8k16 (the G heads are the M rows, padded to 16): in phase 1 warp w takes
//     slots [16w, 16w + 16) of each tile; in phase 3 warp w owns head dims [wD/4, (w+1)D/4).
//     P enters the second product as fp16/bf16 (as in flash attention); logits, softmax sums,
//     scores and the output accumulators are fp32.
//   * decode_generic_kernel<T, DC, SCORES>: any dtype, any D <= 256 (DC = D at compile time, or 0),
//     any G. CUDA cores, fp32 tiles of 16 slots in shared memory (16-byte loads when aligned).
#pragma once

#include <algorithm>
#include <cstdint>

#include <c10/core/ScalarType.h>

#include "common/tile.cuh"
#include "paged_kv.h"

namespace sinklora {
namespace cuda {

constexpr int kDecodeTile = 64;           // slots per mma tile; partitions are multiples of it
constexpr int kDecodeMaxPartition = 512;  // slots per split at most
constexpr int kDecodeThreads = 128;

struct DecodePlan {
  int splits;     // S >= 1
  int partition;  // P, slots per split
  int group;      // G = Hq / Hkv
  int64_t acc_off, ml_off, e_off, total;  // workspace offsets and size in floats (0 if S == 1)
};

// Host: the workspace layout of a split (splits, partition; see decode_split in paged_decode.cu).
inline DecodePlan make_decode_plan(const PagedDecodeParams& p, int splits, int partition) {
  DecodePlan pl{};
  pl.group = p.num_heads_q / p.num_heads_kv;
  pl.splits = splits;
  pl.partition = partition;
  if (splits > 1) {
    const int64_t units = std::max<int64_t>(1, int64_t(p.batch) * p.num_heads_kv) * splits * pl.group;
    pl.acc_off = 0;
    pl.ml_off = units * p.head_dim;
    pl.e_off = pl.ml_off + units * 2;
    pl.total = pl.e_off + (p.scores != nullptr ? units * partition : 0);
  }
  return pl;
}

// Shared memory of the kernels (bytes).
inline size_t decode_mma_smem(int D, int G, int P) {
  const int stages = D <= 64 ? 4 : 3;
  return size_t(2) * (16 * D + stages * kDecodeTile * D) + size_t(6) * G * (P + 8) + size_t(8) * P +
         sizeof(float) * (64 + 3 * 16);
}
// Lanes that share one (head, slot) dot product in the generic kernel's phase 1.
__host__ __device__ __forceinline__ int decode_gen_lanes(int G) {
  const int pairs = G * 16;
  return pairs <= 16 ? 8 : pairs <= 32 ? 4 : pairs <= 64 ? 2 : 1;
}

// Launcher of the tensor-core kernel (host): paged_decode_mma.cu.
void launch_decode_mma(const PagedDecodeParams& p, c10::ScalarType dtype, const DecodePlan& plan, float* ws,
                       cudaStream_t stream);

// ---------------------------------------------------------------------------------------------
// Device helpers shared by the kernels

struct DecodeBlock {
  int b, hk, bh, split, len, p0;
};

__device__ __forceinline__ DecodeBlock decode_block(const PagedDecodeParams& p, const DecodePlan& plan) {
  DecodeBlock d;
  const int x = static_cast<int>(blockIdx.x);
  d.split = x % plan.splits;
  d.bh = x / plan.splits;
  d.b = d.bh / p.num_heads_kv;
  d.hk = d.bh % p.num_heads_kv;
  // Lengths past the table are clamped to it (never read outside the table); negative ones are 0.
  const int64_t cap = int64_t(p.max_blocks_per_seq) * p.block_size;
  const int64_t len = p.seq_lens[d.b];
  d.len = static_cast<int>(len < 0 ? 0 : (len > cap ? cap : len));
  d.p0 = d.split * plan.partition;
  return d;
}

// out rows of the group of a sequence with no slot: zeros.
template <typename T>
__device__ __forceinline__ void decode_zero_out(const PagedDecodeParams& p, int b, int hk, int G) {
  T* og = static_cast<T*>(p.out) + (int64_t(b) * p.num_heads_q + int64_t(hk) * G) * p.head_dim;
  for (int e = threadIdx.x; e < G * p.head_dim; e += blockDim.x) og[e] = from_float<T>(0.f);
}

// Phase 0: physical block (or -1) and in-block offset of slots [p0, p0 + npad) -> shared.
__device__ __forceinline__ void decode_slot_table(const PagedDecodeParams& p, int b, int p0, int n_local, int npad,
                                                  int* sBlk, int* sOff) {
  const int32_t* table = p.block_tables + int64_t(b) * p.max_blocks_per_seq;
  for (int t = threadIdx.x; t < npad; t += blockDim.x) {
    int blk = -1, off = 0;
    if (t < n_local) {
      const int tok = p0 + t;
      blk = table[tok / p.block_size];
      off = tok % p.block_size;
      if (blk < 0 || blk >= p.num_blocks) blk = -1;
    }
    sBlk[t] = blk;
    sOff[t] = off;
  }
}

// The prologue both decode kernels share. A block whose split holds no slot returns false (the
// block of an empty sequence's only split zeroes its output); otherwise the split's slots, padded
// to whole tiles, and their table entries (sBlk, sOff; read after the next barrier).
struct DecodeSlots {
  int n_local, ntiles, npad;
};
template <typename T>
__device__ __forceinline__ bool decode_slots(const PagedDecodeParams& p, const DecodePlan& plan,
                                             const DecodeBlock& blk, int tile, int* sBlk, int* sOff,
                                             DecodeSlots& out) {
  if (blk.p0 >= blk.len) {
    if (blk.len == 0 && plan.splits == 1) decode_zero_out<T>(p, blk.b, blk.hk, plan.group);
    return false;
  }
  out.n_local = min(plan.partition, blk.len - blk.p0);
  out.ntiles = (out.n_local + tile - 1) / tile;
  out.npad = out.ntiles * tile;
  decode_slot_table(p, blk.b, blk.p0, out.n_local, out.npad, sBlk, sOff);
  return true;
}

// Phase 2 row pass for head h (one warp): e = 2^(s - m) in place over [0, npad), row sum.
// Returns the sum (in every lane). m = -inf (no valid slot) gives e = 0.
template <typename T, bool kStoreP>
__device__ __forceinline__ float decode_exp_row(float* row, T* prow, int npad, float m, int lane) {
  const float mu = m == -INFINITY ? 0.f : m;
  float sum = 0.f;
  for (int t = lane; t < npad; t += 32) {
    const float e = exp2f(row[t] - mu);
    row[t] = e;
    if constexpr (kStoreP) prow[t] = from_float<T>(e);
    sum += e;
  }
  return warp_sum(sum);
}

// Phase 2 scores: one split -> add the exact probabilities; several -> e to the workspace.
__device__ __forceinline__ void decode_scores(const PagedDecodeParams& p, const DecodePlan& plan,
                                              const DecodeBlock& blk, const float* sLog, int ld,
                                              const float* sInv, const int* sBlk, const int* sOff, int n_local,
                                              float* ws) {
  const int G = plan.group;
  if (plan.splits == 1) {
    for (int t = threadIdx.x; t < n_local; t += blockDim.x) {
      const int block = sBlk[t];
      if (block < 0) continue;
      float mass = 0.f;
      for (int h = 0; h < G; ++h) mass = fmaf(sLog[h * ld + t], sInv[h], mass);
      atomicAdd(p.scores + (int64_t(block) * p.block_size + sOff[t]) * p.num_heads_kv + blk.hk, mass);
    }
  } else {
    float* we = ws + plan.e_off + (int64_t(blk.bh) * plan.splits + blk.split) * G * plan.partition;
    for (int h = 0; h < G; ++h) {
      for (int t = threadIdx.x; t < n_local; t += blockDim.x) we[h * plan.partition + t] = sLog[h * ld + t];
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Tensor-core kernel

template <typename T, int D, bool SCORES>
__global__ void __launch_bounds__(kDecodeThreads)
    decode_mma_kernel(const PagedDecodeParams p, const DecodePlan plan, float* ws) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  constexpr int TILE = kDecodeTile, NT = kDecodeThreads, CPR = D / 8, NST = D <= 64 ? 4 : 3;
  unsigned char* smem_raw = dynamic_smem<unsigned char>();
  const int G = plan.group, P = plan.partition, LD = P + 8;
  T* sQ = reinterpret_cast<T*>(smem_raw);  // [16][D] swizzled, rows >= G zero
  T* sRing = sQ + 16 * D;                  // [NST][TILE][D] swizzled
  float* sLog = reinterpret_cast<float*>(sRing + NST * TILE * D);  // [G][LD]
  T* sP = reinterpret_cast<T*>(sLog + G * LD);                     // [G][LD]
  int* sBlk = reinterpret_cast<int*>(sP + G * LD);                 // [P]
  int* sOff = sBlk + P;                                            // [P]
  float* sRed = reinterpret_cast<float*>(sOff + P);                // [4][16]
  float* sM = sRed + 64;
  float* sL = sM + 16;
  float* sInv = sL + 16;

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const DecodeBlock blk = decode_block(p, plan);
  DecodeSlots slots;
  if (!decode_slots<T>(p, plan, blk, TILE, sBlk, sOff, slots)) return;
  const int n_local = slots.n_local, ntiles = slots.ntiles, npad = slots.npad;
  const T* qg = static_cast<const T*>(p.q) + int64_t(blk.b) * p.q_batch_stride +
                int64_t(blk.hk) * G * p.q_head_stride;
  cp_async_tile<16, D, NT>(sQ, qg, p.q_head_stride, 0, G, tid);  // committed with the first tile
  __syncthreads();  // sBlk, sOff

  const T* kbase = static_cast<const T*>(p.k_cache) + int64_t(blk.hk) * p.k.head_stride;
  const T* vbase = static_cast<const T*>(p.v_cache) + int64_t(blk.hk) * p.v.head_stride;
  const int total = 2 * ntiles;  // loads: K tiles 0..ntiles-1, then V tiles
  auto issue = [&](int j) {
    if (j < total) {
      const bool is_k = j < ntiles;
      const int t0 = (is_k ? j : j - ntiles) * TILE;
      const T* base = is_k ? kbase : vbase;
      const int64_t bstr = is_k ? p.k.block_stride : p.v.block_stride;
      const int64_t sstr = is_k ? p.k.slot_stride : p.v.slot_stride;
      T* dst = sRing + (j % NST) * TILE * D;
#pragma unroll
      for (int it = 0; it < TILE * CPR / NT; ++it) {
        const int idx = tid + it * NT;
        const int r = idx / CPR, c = idx % CPR;
        const int block = sBlk[t0 + r];
        const bool ok = block >= 0;
        const T* src = ok ? base + int64_t(block) * bstr + int64_t(sOff[t0 + r]) * sstr + c * 8 : base;
        cp_async_16(dst + swz<CPR>(r, c) * 8, src, ok);
      }
    }
    cp_async_commit();  // possibly empty: one group per stage keeps the wait counts uniform
  };
#pragma unroll 1
  for (int j = 0; j < NST - 1; ++j) issue(j);

  const LdsmAddr<CPR, kPatA> addr_a(lane);
  const LdsmAddr<CPR, kPatB> addr_b(lane);
  const uint32_t sQ_u = smem_u32(sQ), sRing_u = smem_u32(sRing);
  // B operand of P V (ldmatrix.trans, the kPatT pattern of LdsmAddr) for this warp's head dims:
  // lane row rl of the 16-slot step, 8-dim chunk warp * D / 32 + 2 nb2 + (lane >> 4), swizzled.
  // (Computed here: LdsmAddr would index its offsets with the warp-dependent chunk at run time.)
  uint32_t vofs[D / 64];
  {
    const int rl = (lane & 7) | (((lane >> 3) & 1) << 3);
#pragma unroll
    for (int nb2 = 0; nb2 < D / 64; ++nb2) {
      const int chunk = warp * (D / 32) + nb2 * 2 + (lane >> 4);
      vofs[nb2] = uint32_t((rl * CPR + (chunk ^ (rl & 7))) * 16);
    }
  }
  // A operand of P V: row (lane & 15) of P (rows >= G read row 0; their results are dropped),
  // 8-slot chunk (lane >> 4).
  const int arow = (lane & 15) < G ? (lane & 15) : 0;
  const uint32_t sPa_u = smem_u32(sP + arow * LD + (lane >> 4) * 8);
  const float scale_log2 = p.softmax_scale * kLog2e;

  uint32_t qf[D / 16][4];
  float o[D / 32][4];
#pragma unroll
  for (int i = 0; i < D / 32; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  float mrow[2] = {-INFINITY, -INFINITY};  // running max of rows (lane >> 2) and (lane >> 2) + 8

#pragma unroll 1
  for (int j = 0; j < total; ++j) {
    cp_async_wait_group<NST - 2>();  // load j (and Q) landed
    __syncthreads();                 // for every thread; and buffer (j - 1) % NST is free
    issue(j + NST - 1);
    const uint32_t buf_u = sRing_u + uint32_t((j % NST) * TILE * D * sizeof(T));
    if (j == 0) {
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) ldsm_x4(qf[kk], sQ_u + addr_a(0, kk * 2));
    }

    if (j < ntiles) {
      // Phase 1: S = Q K^T for slots [16 warp, 16 warp + 16) of tile j.
      float s[2][4];
#pragma unroll
      for (int i = 0; i < 2; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        uint32_t kb[4];
        ldsm_x4(kb, buf_u + addr_b(warp * 16, kk * 2));
        mma16816<T>(s[0], qf[kk], kb[0], kb[1]);
        mma16816<T>(s[1], qf[kk], kb[2], kb[3]);
      }
#pragma unroll
      for (int nb = 0; nb < 2; ++nb) {
        const int t = j * TILE + warp * 16 + nb * 8 + (lane & 3) * 2;
        const bool v0 = sBlk[t] >= 0, v1 = sBlk[t + 1] >= 0;
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int head = (lane >> 2) + 8 * r;
          const float x0 = v0 ? s[nb][2 * r] * scale_log2 : -INFINITY;
          const float x1 = v1 ? s[nb][2 * r + 1] * scale_log2 : -INFINITY;
          mrow[r] = fmaxf(mrow[r], fmaxf(x0, x1));
          if (head < G) *reinterpret_cast<float2*>(sLog + head * LD + t) = make_float2(x0, x1);
        }
      }
      continue;
    }

    if (j == ntiles) {
      // Phase 2 (the first V tiles are already loading).
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        mrow[r] = fmaxf(mrow[r], __shfl_xor_sync(0xffffffffu, mrow[r], 1));
        mrow[r] = fmaxf(mrow[r], __shfl_xor_sync(0xffffffffu, mrow[r], 2));
      }
      if ((lane & 3) == 0) {
        sRed[warp * 16 + (lane >> 2)] = mrow[0];
        sRed[warp * 16 + (lane >> 2) + 8] = mrow[1];
      }
      __syncthreads();
      if (tid < G) sM[tid] = fmaxf(fmaxf(sRed[tid], sRed[16 + tid]), fmaxf(sRed[32 + tid], sRed[48 + tid]));
      __syncthreads();
      for (int h = warp; h < G; h += 4) {
        const float sum = decode_exp_row<T, true>(sLog + h * LD, sP + h * LD, npad, sM[h], lane);
        if (lane == 0) {
          sL[h] = sum;
          sInv[h] = sum > 0.f ? 1.f / sum : 0.f;
        }
      }
      __syncthreads();
      if constexpr (SCORES) decode_scores(p, plan, blk, sLog, LD, sInv, sBlk, sOff, n_local, ws);
    }

    // Phase 3: O += P V for V tile j - ntiles, head dims [warp D/4, warp D/4 + D/4).
    const int t0 = (j - ntiles) * TILE;
#pragma unroll
    for (int ks = 0; ks < TILE / 16; ++ks) {
      uint32_t a[4];
      ldsm_x4(a, sPa_u + uint32_t((t0 + ks * 16) * sizeof(T)));
#pragma unroll
      for (int nb2 = 0; nb2 < D / 64; ++nb2) {
        uint32_t vb[4];
        ldsm_x4_trans(vb, buf_u + uint32_t(ks * 16 * CPR * 16) + vofs[nb2]);
        mma16816<T>(o[2 * nb2], a, vb[0], vb[1]);
        mma16816<T>(o[2 * nb2 + 1], a, vb[2], vb[3]);
      }
    }
  }

  // Epilogue: rows (heads) (lane >> 2) and + 8, dims warp * D / 4 + nb * 8 + (lane & 3) * 2.
  if (plan.splits == 1) {
    T* og = static_cast<T*>(p.out) + (int64_t(blk.b) * p.num_heads_q + int64_t(blk.hk) * G) * D;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int head = (lane >> 2) + 8 * r;
      if (head >= G) continue;
      const float inv = sInv[head];
#pragma unroll
      for (int nb = 0; nb < D / 32; ++nb) {
        const int d = warp * (D / 4) + nb * 8 + (lane & 3) * 2;
        *reinterpret_cast<uint32_t*>(og + head * D + d) = pack2<T>(o[nb][2 * r] * inv, o[nb][2 * r + 1] * inv);
      }
    }
  } else {
    const int64_t unit = int64_t(blk.bh) * plan.splits + blk.split;
    float* wacc = ws + plan.acc_off + unit * G * D;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int head = (lane >> 2) + 8 * r;
      if (head >= G) continue;
#pragma unroll
      for (int nb = 0; nb < D / 32; ++nb) {
        const int d = warp * (D / 4) + nb * 8 + (lane & 3) * 2;
        *reinterpret_cast<float2*>(wacc + head * D + d) = make_float2(o[nb][2 * r], o[nb][2 * r + 1]);
      }
    }
    if (tid < G) {
      float* wml = ws + plan.ml_off + (unit * G + tid) * 2;
      wml[0] = sM[tid];
      wml[1] = sL[tid];
    }
  }
#endif  // __CUDA_ARCH__ >= 800
}

// ---------------------------------------------------------------------------------------------
// Generic kernel: CUDA cores, fp32 shared tiles of 16 slots.
//
// Shared (fp32): Q [G][QS] (pre-scaled by scale * log2 e), tile [16][DS] (K, then V),
// logits [G][P + 8], m, l, 1/l [G]; int block / offset [P].
// Phase 1 gives each (head, slot) dot product LP adjacent lanes (LP = 8, 4, 2, 1 as G grows).
// Phase 3: each thread owns output elements (head, dim) of up to 16 accumulators, heads in passes
// (one pass when G * D <= 2048).
// With the head dim known at compile time (DC = 64 or 128, used for fp32) rows are read as float4:
// lane sub of a pair reads 4-dim chunks sub + LP i, DS = DC + (4 LP mod 32) keeps the 8 lanes of a
// quarter warp on distinct banks; in phase 3 a thread owns one 4-dim chunk of up to 4 heads (one
// float4 of V serves 4 heads). With a run-time head dim everything is scalar:
// DS = ceil32(D) + LP, lane sub reads dims sub + LP i, and thread t owns elements t + 128 u.

constexpr int kGenDecTile = 16;
constexpr int kGenDecElems = 16;

__host__ __device__ __forceinline__ int decode_gen_row_stride(int D, int DC, int LP) {
  return DC > 0 ? DC + (4 * LP) % 32 : (D + 31) / 32 * 32 + LP;
}
inline size_t decode_generic_smem(int D, int DC, int G, int P) {
  const int lp = decode_gen_lanes(G);
  const size_t ds = size_t(decode_gen_row_stride(D, DC, lp));
  const size_t qs = size_t(DC > 0 ? DC + 4 : D + 1);
  return sizeof(float) * (size_t(G) * qs + kGenDecTile * ds + size_t(G) * (P + 8) + 3 * size_t(G) + 2 * size_t(P));
}

// K or V rows of slots [t0, t0 + 16) -> sT (fp32, row stride ds); rows of invalid slots are zero.
template <typename T, int DC>
__device__ __forceinline__ void decode_gen_load_tile(float* sT, int ds, const T* base, const PagedCacheView& cv,
                                                     const int* sBlk, const int* sOff, int t0, int D, bool vec) {
  constexpr int TILE = kGenDecTile, NT = kDecodeThreads;
  const int tid = threadIdx.x;
  if (vec) {
    constexpr int VEC = 16 / sizeof(T);
    // 16-byte chunks per thread and round (all of them in one round for a compile-time D).
    constexpr int MAXC = DC > 0 ? (TILE * DC / VEC + NT - 1) / NT : 4;
    const int cpr = D / VEC;
    const int n = TILE * cpr;
    for (int round = 0; round < n; round += MAXC * NT) {
    uint4 raw[MAXC];
#pragma unroll
    for (int u = 0; u < MAXC; ++u) {
      const int idx = round + tid + u * NT;
      raw[u] = make_uint4(0u, 0u, 0u, 0u);
      if (idx < n) {
        const int r = idx / cpr, c = idx % cpr;
        const int block = sBlk[t0 + r];
        if (block >= 0) {
          raw[u] = *reinterpret_cast<const uint4*>(base + int64_t(block) * cv.block_stride +
                                                   int64_t(sOff[t0 + r]) * cv.slot_stride + c * VEC);
        }
      }
    }
#pragma unroll
    for (int u = 0; u < MAXC; ++u) {
      const int idx = round + tid + u * NT;
      if (idx < n) {
        const int r = idx / cpr, c = idx % cpr;
        float* dst = sT + r * ds + c * VEC;
        if constexpr (VEC == 4) {
          if (DC > 0) {
            *reinterpret_cast<uint4*>(dst) = raw[u];  // fp32, 16-byte aligned rows
            continue;
          }
        }
        const T* e = reinterpret_cast<const T*>(&raw[u]);
#pragma unroll
        for (int i = 0; i < VEC; ++i) dst[i] = to_float(e[i]);
      }
    }
    }
  } else {
    for (int idx = tid; idx < TILE * D; idx += NT) {
      const int r = idx / D, d = idx % D;
      const int block = sBlk[t0 + r];
      sT[r * ds + d] = block >= 0 ? to_float(base[int64_t(block) * cv.block_stride +
                                                  int64_t(sOff[t0 + r]) * cv.slot_stride + d])
                                  : 0.f;
    }
  }
}

template <typename T, int DC, bool SCORES>
__global__ void __launch_bounds__(kDecodeThreads)
    decode_generic_kernel(const PagedDecodeParams p, const DecodePlan plan, float* ws, bool vec) {
  static_assert(DC == 0 || DC == 64 || DC == 128, "compile-time head dims: 64, 128");
  constexpr int TILE = kGenDecTile, NT = kDecodeThreads, NE = kGenDecElems;
  float* gsmem = dynamic_smem<float>();
  const int D = DC > 0 ? DC : p.head_dim;
  const int G = plan.group, P = plan.partition, LD = P + 8;
  const int LP = decode_gen_lanes(G);
  const int QS = DC > 0 ? DC + 4 : D + 1;
  const int DS = decode_gen_row_stride(D, DC, LP);
  float* sQ = gsmem;             // [G][QS]
  float* sT = sQ + G * QS;       // [TILE][DS]
  float* sLog = sT + TILE * DS;  // [G][LD]
  float* sM = sLog + G * LD;
  float* sL = sM + G;
  float* sInv = sL + G;
  int* sBlk = reinterpret_cast<int*>(sInv + G);
  int* sOff = sBlk + P;

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const DecodeBlock blk = decode_block(p, plan);
  DecodeSlots slots;
  if (!decode_slots<T>(p, plan, blk, TILE, sBlk, sOff, slots)) return;
  const int n_local = slots.n_local, ntiles = slots.ntiles, npad = slots.npad;
  const float qscale = p.softmax_scale * kLog2e;
  const T* qg = static_cast<const T*>(p.q) + int64_t(blk.b) * p.q_batch_stride;
  for (int idx = tid; idx < G * D; idx += NT) {
    const int h = idx / D, d = idx % D;
    sQ[h * QS + d] = to_float(qg[int64_t(blk.hk * G + h) * p.q_head_stride + d]) * qscale;
  }
  const T* kbase = static_cast<const T*>(p.k_cache) + int64_t(blk.hk) * p.k.head_stride;
  const T* vbase = static_cast<const T*>(p.v_cache) + int64_t(blk.hk) * p.v.head_stride;

  // Phase 1: logits.
  const int npairs = G * TILE, per_pass = NT / LP, sub = tid % LP;
  for (int tt = 0; tt < ntiles; ++tt) {
    __syncthreads();  // sBlk, sQ (first tile); the previous tile is consumed
    decode_gen_load_tile<T, DC>(sT, DS, kbase, p.k, sBlk, sOff, tt * TILE, D, vec);
    __syncthreads();
    for (int pr0 = 0; pr0 < npairs; pr0 += per_pass) {
      const int pr = pr0 + tid / LP;
      float acc = 0.f;
      if (pr < npairs) {
        const float* qr = sQ + (pr / TILE) * QS;
        const float* kr = sT + (pr % TILE) * DS;
        if constexpr (DC > 0) {
          for (int c = sub; c < DC / 4; c += LP) {
            const float4 qv = *reinterpret_cast<const float4*>(qr + 4 * c);
            const float4 kv = *reinterpret_cast<const float4*>(kr + 4 * c);
            acc = fmaf(qv.x, kv.x, fmaf(qv.y, kv.y, fmaf(qv.z, kv.z, fmaf(qv.w, kv.w, acc))));
          }
        } else {
          for (int d = sub; d < D; d += LP) acc = fmaf(qr[d], kr[d], acc);
        }
      }
      for (int o = 1; o < LP; o <<= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
      if (sub == 0 && pr < npairs) {
        const int t = tt * TILE + pr % TILE;
        sLog[(pr / TILE) * LD + t] = sBlk[t] >= 0 ? acc : -INFINITY;
      }
    }
  }
  __syncthreads();

  // Phase 2.
  for (int h = warp; h < G; h += NT / 32) {
    float* row = sLog + h * LD;
    float m = -INFINITY;
    for (int t = lane; t < npad; t += 32) m = fmaxf(m, row[t]);
    m = warp_max(m);
    const float sum = decode_exp_row<T, false>(row, nullptr, npad, m, lane);
    if (lane == 0) {
      sM[h] = m;
      sL[h] = sum;
      sInv[h] = sum > 0.f ? 1.f / sum : 0.f;
    }
  }
  __syncthreads();
  if constexpr (SCORES) decode_scores(p, plan, blk, sLog, LD, sInv, sBlk, sOff, n_local, ws);

  // Phase 3.
  const int64_t unit = int64_t(blk.bh) * plan.splits + blk.split;
  T* og = static_cast<T*>(p.out) + (int64_t(blk.b) * p.num_heads_q + int64_t(blk.hk) * G) * D;
  float* wacc = ws + plan.acc_off + unit * G * D;  // used only when splits > 1
  if constexpr (DC > 0) {
    constexpr int NQ = DC / 4, HG = NT / NQ, HPT = NE / 4;  // quads, head groups, heads per thread
    const int quad = tid % NQ, hg = tid / NQ;
    for (int h0 = 0; h0 < G; h0 += HG * HPT) {
      float acc[HPT][4];
#pragma unroll
      for (int i = 0; i < HPT; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
      for (int tt = 0; tt < ntiles; ++tt) {
        __syncthreads();  // the previous tile is consumed
        decode_gen_load_tile<T, DC>(sT, DS, vbase, p.v, sBlk, sOff, tt * TILE, D, vec);
        __syncthreads();
        const float* pl = sLog + (h0 + hg) * LD + tt * TILE;
#pragma unroll 4
        for (int r = 0; r < TILE; ++r) {
          const float4 vv = *reinterpret_cast<const float4*>(sT + r * DS + 4 * quad);
#pragma unroll
          for (int i = 0; i < HPT; ++i) {
            if (h0 + hg + HG * i < G) {
              const float pv = pl[HG * i * LD + r];
              acc[i][0] = fmaf(pv, vv.x, acc[i][0]);
              acc[i][1] = fmaf(pv, vv.y, acc[i][1]);
              acc[i][2] = fmaf(pv, vv.z, acc[i][2]);
              acc[i][3] = fmaf(pv, vv.w, acc[i][3]);
            }
          }
        }
      }
#pragma unroll
      for (int i = 0; i < HPT; ++i) {
        const int h = h0 + hg + HG * i;
        if (h >= G) continue;
        if (plan.splits == 1) {
          const float inv = sInv[h];
#pragma unroll
          for (int k = 0; k < 4; ++k) og[h * DC + 4 * quad + k] = from_float<T>(acc[i][k] * inv);
        } else {
          *reinterpret_cast<float4*>(wacc + h * DC + 4 * quad) = make_float4(acc[i][0], acc[i][1], acc[i][2], acc[i][3]);
        }
      }
    }
  } else {
    const int HC = max(1, min(G, NE * NT / D));
    for (int h0 = 0; h0 < G; h0 += HC) {
      const int E = min(HC, G - h0) * D;
      float acc[NE];
      int pofs[NE], vofs[NE];  // element e = tid + u NT: (head e / D, dim e % D); pofs < 0 past E
#pragma unroll
      for (int u = 0; u < NE; ++u) {
        const int e = tid + u * NT;
        acc[u] = 0.f;
        pofs[u] = e < E ? (e / D) * LD : -1;
        vofs[u] = e % D;
      }
      for (int tt = 0; tt < ntiles; ++tt) {
        __syncthreads();  // the previous tile is consumed
        decode_gen_load_tile<T, DC>(sT, DS, vbase, p.v, sBlk, sOff, tt * TILE, D, vec);
        __syncthreads();
        const float* pl = sLog + h0 * LD + tt * TILE;
#pragma unroll 2
        for (int r = 0; r < TILE; ++r) {
#pragma unroll
          for (int u = 0; u < NE; ++u) {
            if (pofs[u] >= 0) acc[u] = fmaf(pl[pofs[u] + r], sT[r * DS + vofs[u]], acc[u]);
          }
        }
      }
#pragma unroll
      for (int u = 0; u < NE; ++u) {
        const int e = tid + u * NT;
        if (e >= E) continue;
        if (plan.splits == 1) {
          og[h0 * D + e] = from_float<T>(acc[u] * sInv[h0 + e / D]);
        } else {
          wacc[h0 * D + e] = acc[u];
        }
      }
    }
  }
  if (plan.splits > 1) {
    for (int h = tid; h < G; h += NT) {
      float* wml = ws + plan.ml_off + (unit * G + h) * 2;
      wml[0] = sM[h];
      wml[1] = sL[h];
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Split merge. One block per (sequence, kv head, split c) with c < ceil(len / P): the output
// elements of the group are shared out among those blocks, and block c adds the scores of the
// slots of split c. Shared (fp32): M, 1/L, the weight of split c [G].

template <typename T>
__global__ void __launch_bounds__(kDecodeThreads)
    decode_merge_kernel(const PagedDecodeParams p, const DecodePlan plan, const float* ws) {
  float* msmem = dynamic_smem<float>();
  const int G = plan.group, P = plan.partition, S = plan.splits, D = p.head_dim;
  float* sMx = msmem;
  float* sInv = sMx + G;
  float* sWc = sInv + G;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const DecodeBlock blk = decode_block(p, plan);
  const int c = blk.split;
  if (blk.len == 0) {
    if (c == 0) decode_zero_out<T>(p, blk.b, blk.hk, G);
    return;
  }
  const int n_act = (blk.len + P - 1) / P;
  if (c >= n_act) return;
  const float* ml = ws + plan.ml_off + int64_t(blk.bh) * S * G * 2;
  for (int h = warp; h < G; h += kDecodeThreads / 32) {
    float m = -INFINITY;
    for (int s = lane; s < n_act; s += 32) m = fmaxf(m, ml[(s * G + h) * 2]);
    m = warp_max(m);
    const float mu = m == -INFINITY ? 0.f : m;
    float l = 0.f;
    for (int s = lane; s < n_act; s += 32) l = fmaf(ml[(s * G + h) * 2 + 1], exp2f(ml[(s * G + h) * 2] - mu), l);
    l = warp_sum(l);
    if (lane == 0) {
      const float inv = l > 0.f ? 1.f / l : 0.f;
      sMx[h] = mu;
      sInv[h] = inv;
      sWc[h] = exp2f(ml[(c * G + h) * 2] - mu) * inv;
    }
  }
  __syncthreads();

  const int GD = G * D;
  const int chunk = (GD + n_act - 1) / n_act;
  const int e1 = min(GD, (c + 1) * chunk);
  const float* acc = ws + plan.acc_off + int64_t(blk.bh) * S * GD;
  T* og = static_cast<T*>(p.out) + (int64_t(blk.b) * p.num_heads_q + int64_t(blk.hk) * G) * D;
  for (int e = c * chunk + tid; e < e1; e += kDecodeThreads) {
    const int h = e / D;
    const float mu = sMx[h];
    float sum = 0.f;
    for (int s = 0; s < n_act; ++s) sum = fmaf(acc[int64_t(s) * GD + e], exp2f(ml[(s * G + h) * 2] - mu), sum);
    og[e] = from_float<T>(sum * sInv[h]);
  }

  if (p.scores != nullptr) {
    const float* we = ws + plan.e_off + (int64_t(blk.bh) * S + c) * G * P;
    const int t0 = c * P, t1 = min(blk.len, t0 + P);
    const int32_t* table = p.block_tables + int64_t(blk.b) * p.max_blocks_per_seq;
    for (int t = t0 + tid; t < t1; t += kDecodeThreads) {
      const int block = table[t / p.block_size];
      if (block < 0 || block >= p.num_blocks) continue;
      float mass = 0.f;
      for (int h = 0; h < G; ++h) mass = fmaf(we[h * P + (t - t0)], sWc[h], mass);
      atomicAdd(p.scores + (int64_t(block) * p.block_size + t % p.block_size) * p.num_heads_kv + blk.hk, mass);
    }
  }
}

}  // namespace cuda
}  // namespace sinklora
