// csrc/paged_kv.h: paged KV cache (docs/paged_kv.md): parameters of the decode, write and eviction kernels, shared by the CPU
// and CUDA implementations. Layout is FlashInfer's NHD: cache [num_blocks, block_size, Hkv, D];
// slot t of sequence b lives in block block_tables[b, t / block_size] at offset t % block_size.
#pragma once

#include <cfloat>
#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define PKV_HD __host__ __device__ __forceinline__
#else
#define PKV_HD inline
#endif

namespace sinklora {

struct PagedCacheView {
  int64_t block_stride, slot_stride, head_stride;  // elements; the last dim is contiguous
};

struct PagedDecodeParams {
  const void* q;  // [B, Hq, D]
  void* out;      // [B, Hq, D] contiguous
  const void* k_cache;
  const void* v_cache;
  float* scores;  // [num_blocks, block_size, Hkv] contiguous, or nullptr
  const int32_t* block_tables;  // [B, max_blocks_per_seq] contiguous
  const int32_t* seq_lens;      // [B]

  int64_t q_batch_stride, q_head_stride;
  PagedCacheView k, v;

  int batch, num_heads_q, num_heads_kv, head_dim;
  int block_size, max_blocks_per_seq, num_blocks;
  float softmax_scale;

  PKV_HD int64_t slot_offset(const PagedCacheView& c, int b, int t, int head) const {
    const int block = block_tables[int64_t(b) * max_blocks_per_seq + t / block_size];
    return int64_t(block) * c.block_stride + int64_t(t % block_size) * c.slot_stride + head * c.head_stride;
  }
  PKV_HD int64_t score_offset(int b, int t, int head) const {
    const int block = block_tables[int64_t(b) * max_blocks_per_seq + t / block_size];
    return (int64_t(block) * block_size + t % block_size) * num_heads_kv + head;
  }
};

// Write one token's K/V per (row, kv head) into the physical slot slots[row, head]
// (block * block_size + offset; -1 = skip), with its position and a fresh score.
struct PagedWriteParams {
  const void* k;  // [T, Hkv, D]
  const void* v;
  void* k_cache;
  void* v_cache;
  const int32_t* slots;      // [T, Hkv]
  float* scores;             // [num_blocks, block_size, Hkv] or nullptr
  const float* new_scores;   // [T, Hkv] or nullptr (then 0)
  int32_t* positions;        // [num_blocks, block_size, Hkv] or nullptr
  const int32_t* token_positions;  // [T] (needed when positions is given)

  int64_t k_row_stride, k_head_stride, v_row_stride, v_head_stride;
  PagedCacheView kc, vc;
  int rows, num_heads_kv, head_dim, block_size;
  int64_t num_slots;  // num_blocks * block_size
};

// The rank of a key in the eviction (the lowest unprotected rank goes): kH2O its score, kMean its
// score per query that has seen it: over the weight those c = newest - pos + 1 queries carry in
// the score, c when scores accumulate (decay 1), (1 - decay^c) / (1 - decay) when they decay;
// kStreaming none (the oldest goes).
enum class EvictPolicy : int { kH2O = 0, kStreaming = 1, kMean = 2 };

// Denormals become 0 on the CPU as under CUDA's flush-to-zero (--use_fast_math), so that decayed
// scores rank the same on both.
PKV_HD float flush_denormal(float x) { return (x < FLT_MIN && x > -FLT_MIN) ? 0.f : x; }

// The weight of the `seen` queries that have seen a key (kMean): seen, or (1 - decay^seen) / (1 - decay).
PKV_HD float query_weight(int64_t seen, float decay) {
  const float c = static_cast<float>(seen);
#if defined(__CUDA_ARCH__)
  // IEEE division whatever the math flags; powf may differ from the CPU's in its last bit
  return decay == 1.f ? c : __fdiv_rn(1.f - powf(decay, c), 1.f - decay);
#else
  return decay == 1.f ? c : (1.f - std::pow(decay, c)) / (1.f - decay);
#endif
}

PKV_HD float mean_rank(float score, float weight) {
#if defined(__CUDA_ARCH__)
  return flush_denormal(__fdiv_rn(score, weight));
#else
  return flush_denormal(score / weight);
#endif
}

PKV_HD float eviction_rank(EvictPolicy policy, float score, int32_t pos, int32_t newest, float decay) {
  if (policy == EvictPolicy::kStreaming) return 0.f;
  if (policy == EvictPolicy::kH2O) return score;
  return mean_rank(score, query_weight(int64_t(newest) - pos + 1, decay));
}

// After the choice, every score of the sequence's slots becomes score * score_decay (1: unchanged;
// 0: only the next step's mass counts, TOVA), so the scores follow s <- decay * s + mass step by step.
PKV_HD float decayed_score(float score, float decay) { return flush_denormal(score * decay); }

// One decode-step eviction per (sequence, kv head) over slots [0, seq_lens[b]): the lowest-ranked
// slot whose position is neither a sink (< num_sinks) nor among the last `recent` positions
// (> newest - recent); ties go to the older position. Streaming: the oldest non-sink. Then the
// sequence's scores decay (score_decay != 1).
struct EvictParams {
  float* scores;  // decayed in place when score_decay != 1
  const int32_t* positions;
  const int32_t* block_tables;
  const int32_t* seq_lens;
  int32_t* victims;  // [B, Hkv]: logical slot evicted, or -1 when nothing may be evicted
  int batch, num_heads_kv, block_size, max_blocks_per_seq, num_blocks;
  int num_sinks, recent;
  EvictPolicy policy;
  float score_decay;

  // a table entry that is not a block of the pool (kept as a guard: the host checks, or the step plan, refuse such tables)
  PKV_HD bool missing(int b, int t) const {
    const int block = block_tables[int64_t(b) * max_blocks_per_seq + t / block_size];
    return block < 0 || block >= num_blocks;
  }

  PKV_HD int64_t meta_offset(int b, int t, int head) const {
    const int block = block_tables[int64_t(b) * max_blocks_per_seq + t / block_size];
    return (int64_t(block) * block_size + t % block_size) * num_heads_kv + head;
  }
};

}  // namespace sinklora
