// csrc/cuda/sf_attention_kernels.cuh: what the SF-Attn CUDA kernels share beyond csrc/cuda/common/:
// the flat row offsets of SfAttentionParams, a sequence's rows of one head, and the query tile of
// a forward block (the key tile of the key-tile kernels is in sf_attention_bwd_kernels.cuh).
#pragma once

#include <cstdint>

#include "common/tile.cuh"
#include "sf_attention.h"
#include "sf_attention_tiles.h"

namespace sinklora {
namespace cuda {

// Element offset of flat row r (seq_start(b) + i) in a tensor with these strides. Varlen rows are
// r * row_stride; fixed-length rows are (b, i) = (r / seqlen, r % seqlen).
__host__ __device__ __forceinline__ int64_t flat_row_offset(const SfAttentionParams& p, int64_t r,
                                                            int64_t batch_stride,
                                                            int64_t row_stride) {
  if (p.cu_seqlens != nullptr) return r * row_stride;
  return (r / p.seqlen) * batch_stride + (r % p.seqlen) * row_stride;
}

// Row 0 of head `head` of sequence b in a [*, heads, D] tensor of T with these strides.
template <typename T>
__device__ __forceinline__ const T* head_rows(const SfAttentionParams& p, int b, const void* base,
                                              int64_t batch_stride, int64_t row_stride, int64_t head_stride,
                                              int head) {
  return static_cast<const T*>(base) + p.batch_offset(b, batch_stride, row_stride) + int64_t(head) * head_stride;
}

// The query tile one block of a forward kernel owns: rows [q0, q1) of query head h (kv head hk)
// in sequence b of length n, the longest rows first. empty(): the tile lies past the sequence.
struct QueryTile {
  int b, h, hk, n, q0, q1;
  SfPattern pat;
  float scale_log2;  // softmax_scale * log2(e)

  __device__ __forceinline__ bool empty() const { return q0 >= n; }
};

// This block's query tile (block_m rows): blockIdx.x = (sequence, tile), blockIdx.y = query head.
__device__ __forceinline__ QueryTile query_tile(const SfAttentionParams& p, int num_tiles, int block_m) {
  const int b = blockIdx.x / num_tiles;
  const int tile = num_tiles - 1 - int(blockIdx.x % num_tiles);
  const int h = blockIdx.y;
  const int n = p.seq_len(b);
  const int q0 = tile * block_m;
  return QueryTile{b, h, h / (p.num_heads_q / p.num_heads_kv), n, q0, min(q0 + block_m, n), p.pattern(b, h),
                   p.softmax_scale * kLog2e};
}

}  // namespace cuda
}  // namespace sinklora
