// Kernel entry points of the paged KV cache ops, one per device (see paged_kv.h).
#pragma once

#include <c10/core/ScalarType.h>

#include "paged_kv.h"

namespace sinklora {

void paged_decode_cpu(const PagedDecodeParams& params, c10::ScalarType dtype);
void paged_write_cpu(const PagedWriteParams& params, c10::ScalarType dtype);
void h2o_evict_cpu(const EvictParams& params);

#ifdef SINKLORA_WITH_CUDA
// `stream` is a cudaStream_t. `workspace` is fp32 scratch of paged_decode_workspace_floats() floats
// (split-KV partial results), allocated by the caller. Grid sizes come from max_blocks_per_seq (no
// host sync on seq_lens, so the call can be captured in a CUDA graph).
int64_t paged_decode_workspace_floats(const PagedDecodeParams& params);
void paged_decode_cuda(const PagedDecodeParams& params, c10::ScalarType dtype, float* workspace, void* stream);
void paged_write_cuda(const PagedWriteParams& params, c10::ScalarType dtype, void* stream);
void h2o_evict_cuda(const EvictParams& params, void* stream);
#endif

}  // namespace sinklora
