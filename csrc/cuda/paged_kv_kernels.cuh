// csrc/cuda/paged_kv_kernels.cuh: paged KV cache writes (paged_write_) and the choice of evictions
// for H2O and streaming (select_evictions, docs/paged_kv.md): device code, launched from paged_kv.cu.
//
// paged_write_kernel: one warp per (row, kv head). Lanes copy the K and V rows (head_dim elements
// each) into physical slot slots[row, head] (16-byte chunks when every row is 16-byte aligned,
// elements otherwise); lane 0 sets the slot's score (new_scores or 0) and position. Slots < 0 are
// skipped, and so are slots past the pool (the API checks them on the host, or the step plan did).
//
// select_evictions_kernel: one warp per (sequence, kv head), 4 per block (neighbouring heads share the
// sectors of scores / positions). Pass 1: newest = max position over slots [0, len). Pass 2: each
// lane keeps the best candidate of its slots under the order (rank, position, slot), and the
// warp reduces it (rank: eviction_rank of paged_kv.h); the lane that reads a score writes it back
// decayed in the same pass (score_decay != 1); the order is total on non-NaN scores, so the result does not depend on the
// reduction tree and equals the CPU loop (the first slot wins full ties). NaN scores follow the
// CPU loop too: a NaN can only win as the first candidate (in slot order), and then it stays.
#pragma once

#include <climits>
#include <cstdint>

#include "paged_kv.h"
#include "common/tile.cuh"

namespace sinklora {
namespace cuda {

constexpr int kWriteThreads = 256;
constexpr int kEvictThreads = 128;

template <typename T>
__global__ void __launch_bounds__(kWriteThreads) paged_write_kernel(const PagedWriteParams p, bool vec) {
  const int lane = threadIdx.x & 31;
  const int64_t items = int64_t(p.rows) * p.num_heads_kv;
  const int64_t warps = int64_t(gridDim.x) * (kWriteThreads / 32);
  const int D = p.head_dim;
  for (int64_t item = int64_t(blockIdx.x) * (kWriteThreads / 32) + (threadIdx.x >> 5); item < items;
       item += warps) {
    const int64_t slot = p.slots[item];
    if (slot < 0 || slot >= p.num_slots) continue;
    const int64_t r = item / p.num_heads_kv;
    const int h = static_cast<int>(item % p.num_heads_kv);
    const int64_t block = slot / p.block_size, off = slot % p.block_size;
    const T* ks = static_cast<const T*>(p.k) + r * p.k_row_stride + h * p.k_head_stride;
    const T* vs = static_cast<const T*>(p.v) + r * p.v_row_stride + h * p.v_head_stride;
    T* kd = static_cast<T*>(p.k_cache) + block * p.kc.block_stride + off * p.kc.slot_stride + h * p.kc.head_stride;
    T* vd = static_cast<T*>(p.v_cache) + block * p.vc.block_stride + off * p.vc.slot_stride + h * p.vc.head_stride;
    if (vec) {
      constexpr int VEC = 16 / sizeof(T);
      const int nc = D / VEC;
      for (int c = lane; c < 2 * nc; c += 32) {
        const bool is_k = c < nc;
        const int cc = is_k ? c : c - nc;
        const uint4 val = *reinterpret_cast<const uint4*>((is_k ? ks : vs) + cc * VEC);
        *reinterpret_cast<uint4*>((is_k ? kd : vd) + cc * VEC) = val;
      }
    } else {
      for (int e = lane; e < 2 * D; e += 32) {
        if (e < D) {
          kd[e] = ks[e];
        } else {
          vd[e - D] = vs[e - D];
        }
      }
    }
    if (lane == 0) {
      const int64_t meta = slot * p.num_heads_kv + h;
      if (p.scores != nullptr) p.scores[meta] = p.new_scores != nullptr ? p.new_scores[item] : 0.f;
      if (p.positions != nullptr) p.positions[meta] = p.token_positions[r];
    }
  }
}

// Candidate order of the eviction: lower score, then older position, then lower slot.
struct EvictCand {
  float score;
  int pos, slot;  // slot == INT_MAX: none
};

// NaN test on the bits (independent of any floating-point compiler mode).
__device__ __forceinline__ bool is_nan_bits(float x) { return (__float_as_uint(x) & 0x7fffffffu) > 0x7f800000u; }

__device__ __forceinline__ bool evict_better(const EvictCand& a, const EvictCand& b) {
  if (a.slot == INT_MAX) return false;
  if (b.slot == INT_MAX) return true;
  if (a.score != b.score) return a.score < b.score;
  if (a.pos != b.pos) return a.pos < b.pos;
  return a.slot < b.slot;
}

__device__ __forceinline__ int warp_max_int(int v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = max(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

__global__ void __launch_bounds__(kEvictThreads) select_evictions_kernel(const EvictParams p) {
  const int lane = threadIdx.x & 31;
  const int64_t item = int64_t(blockIdx.x) * (kEvictThreads / 32) + (threadIdx.x >> 5);
  if (item >= int64_t(p.batch) * p.num_heads_kv) return;
  const int b = static_cast<int>(item / p.num_heads_kv);
  const int h = static_cast<int>(item % p.num_heads_kv);
  const int64_t cap = int64_t(p.max_blocks_per_seq) * p.block_size;
  const int64_t len64 = p.seq_lens[b];
  const int len = static_cast<int>(len64 < 0 ? 0 : (len64 > cap ? cap : len64));

  // Slots whose table entry is not a block of the pool are skipped rather than read.
  int newest = INT_MIN;
  for (int t = lane; t < len; t += 32) {
    if (!p.missing(b, t)) newest = max(newest, p.positions[p.meta_offset(b, t, h)]);
  }
  newest = warp_max_int(newest);
  const int64_t last_evictable = int64_t(newest) - p.recent;

  EvictCand best{0.f, 0, INT_MAX};  // best non-NaN candidate of this lane
  int first = INT_MAX;              // this lane's first candidate slot (any score) and its score
  float first_score = 0.f;
  const bool decays = p.score_decay != 1.f;
  for (int t = lane; t < len; t += 32) {
    if (p.missing(b, t)) continue;
    const int64_t m = p.meta_offset(b, t, h);
    const int pos = p.positions[m];
    const float raw = p.scores[m];
    if (decays) p.scores[m] = decayed_score(raw, p.score_decay);  // this lane alone reads slot t
    if (pos < p.num_sinks || int64_t(pos) > last_evictable) continue;
    const float score = eviction_rank(p.policy, raw, pos, newest, p.score_decay);
    if (first == INT_MAX) {
      first = t;
      first_score = score;
    }
    const EvictCand c{score, pos, t};
    if (!is_nan_bits(score) && evict_better(c, best)) best = c;
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    EvictCand other;
    other.score = __shfl_xor_sync(0xffffffffu, best.score, o);
    other.pos = __shfl_xor_sync(0xffffffffu, best.pos, o);
    other.slot = __shfl_xor_sync(0xffffffffu, best.slot, o);
    if (evict_better(other, best)) best = other;
    const int f = __shfl_xor_sync(0xffffffffu, first, o);
    const float fs = __shfl_xor_sync(0xffffffffu, first_score, o);
    if (f < first) {
      first = f;
      first_score = fs;
    }
  }
  if (lane == 0) {
    int victim = -1;
    if (first != INT_MAX) victim = is_nan_bits(first_score) ? first : best.slot;
    p.victims[item] = victim;
  }
}

}  // namespace cuda
}  // namespace sinklora
