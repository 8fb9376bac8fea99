// Kernel entry points of SF-Attn, one per device. The API (sf_attention_api.cpp) checks and allocates;
// these only compute.
#pragma once

#include <c10/core/ScalarType.h>

#include "sf_attention.h"

namespace sinklora {

void sf_attention_fwd_cpu(const SfAttentionParams& params, c10::ScalarType dtype);
void sf_attention_bwd_cpu(const SfAttentionBwdParams& params, c10::ScalarType dtype);
// out: float32 [total_rows, Hkv], every row written (rows outside every sequence excepted).
void sf_attention_column_scores_cpu(const SfAttentionParams& params, c10::ScalarType dtype, float* out);

#ifdef SINKLORA_WITH_CUDA
// `stream` is a cudaStream_t. dq_accum in params is a zeroed fp32 workspace [total_rows, Hq, D].
void sf_attention_fwd_cuda(const SfAttentionParams& params, c10::ScalarType dtype, void* stream);
void sf_attention_bwd_cuda(const SfAttentionBwdParams& params, c10::ScalarType dtype, void* stream);
void sf_attention_column_scores_cuda(const SfAttentionParams& params, c10::ScalarType dtype, float* out, void* stream);
#endif

}  // namespace sinklora
