// csrc/cuda/sf_attention_kernels.cuh: what the SF-Attn CUDA kernels share beyond csrc/cuda/common/
// (the flat row offsets of SfAttentionParams).
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

}  // namespace cuda
}  // namespace sinklora
