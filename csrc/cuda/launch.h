// csrc/cuda/launch.h: the CUDA launchers (csrc/cuda/*.cu) the CUDA entry points (*_cuda.cpp) call
// once the device-agnostic half of an op has checked its arguments and filled the parameters. Each
// picks its kernel with choose_kernel (common/kernel_rule.h), which the *_kernel functions report.
#pragma once

#include <c10/core/ScalarType.h>
#include <cuda_runtime.h>

#include "common/kernel_rule.h"
#include "msa_conv.h"
#include "paged_kv.h"
#include "sf_attention.h"

namespace sinklora {
namespace cuda {

// The kernel these parameters take on the current device.
Kernel sf_attention_fwd_kernel(const SfAttentionParams& p, c10::ScalarType dtype);
Kernel sf_attention_bwd_kernel(const SfAttentionBwdParams& p, c10::ScalarType dtype);
Kernel column_scores_kernel(const SfAttentionParams& p, c10::ScalarType dtype);
Kernel paged_decode_kernel(const PagedDecodeParams& p, c10::ScalarType dtype);
Kernel msa_conv2d_fwd_kernel(c10::ScalarType dtype, int head_dim);
Kernel msa_conv2d_bwd_kernel(c10::ScalarType dtype, int head_dim);

void launch_sf_attention_fwd(const SfAttentionParams& p, c10::ScalarType dtype, cudaStream_t stream);
// dq_accum in p is a zeroed fp32 workspace [total_rows, Hq, D].
void launch_sf_attention_bwd(const SfAttentionBwdParams& p, c10::ScalarType dtype, cudaStream_t stream);
// out: float32 [total_rows, Hkv], zeroed.
void launch_column_scores(const SfAttentionParams& p, c10::ScalarType dtype, float* out, cudaStream_t stream);

// Split-KV sizes of paged decode (paged_decode.cu): a function of the table's capacity, batch * Hkv,
// G = Hq / Hkv and the SM count only, never of seq_lens, so that a plan made once holds for a step.
struct DecodeSplit {
  int splits, partition;
};
DecodeSplit decode_split(const PagedDecodeParams& p);
// fp32 workspace floats of the split-KV path for these sizes (0 with one split).
int64_t paged_decode_workspace_floats(const PagedDecodeParams& p, DecodeSplit split);
void launch_paged_decode(const PagedDecodeParams& p, c10::ScalarType dtype, DecodeSplit split, float* workspace,
                         cudaStream_t stream);
void launch_paged_write(const PagedWriteParams& p, c10::ScalarType dtype, cudaStream_t stream);
void launch_select_evictions(const EvictParams& p, cudaStream_t stream);

// MSA-Conv (msa_conv_fwd.cu, msa_conv_bwd.cu). kv_shift of up to kMsaInlineHeads heads travels by
// value in the kernels' arguments, from host_shift (the CPU [heads, 2] table of prepare_*, or
// nullptr without kv_shift), so the launch copies nothing and can be captured into a CUDA graph;
// with more heads the kernels read p.shift, which must then point at a device copy of that table.
constexpr int kMsaInlineHeads = 64;
void launch_msa_conv2d_fwd(const MsaConvParams& p, const int32_t* host_shift, c10::ScalarType dtype,
                           cudaStream_t stream);
// p.delta is a float32 workspace [B, H, W, heads].
void launch_msa_conv2d_bwd(const MsaConvBwdParams& p, const int32_t* host_shift, c10::ScalarType dtype,
                           cudaStream_t stream);

}  // namespace cuda
}  // namespace sinklora
