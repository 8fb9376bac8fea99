// csrc/cuda/sf_attention_bwd.cu: SF-Attn backward on CUDA: the kernel choice (common/kernel_rule.h),
// the sink-split workspace and the launches of the delta, generic main and dq conversion kernels
// (sf_attention_bwd_kernels.cuh). The tensor-core main kernel is launched from
// sf_attention_bwd_mma.cu, a separate file so that it compiles in parallel.
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <climits>

#include "common/device_props.h"
#include "common/dispatch.h"
#include "launch.h"
#include "sf_attention_bwd_kernels.cuh"

namespace sinklora {
namespace cuda {

SinkSplitWorkspace::SinkSplitWorkspace(const SfAttentionBwdParams& p, int block_n,
                                       cudaStream_t stream)
    : split_(plan_sink_split(p, block_n)), block_n_(block_n) {
  if (split_.chunks <= 1) return;
  const size_t elems = size_t(p.batch) * p.num_heads_kv * split_.ns * block_n * p.head_dim;
  const size_t bytes = 2 * elems * sizeof(float);
  mem_ = c10::cuda::CUDACachingAllocator::raw_alloc_with_stream(bytes, stream);
  const cudaError_t err = cudaMemsetAsync(mem_, 0, bytes, stream);
  if (err != cudaSuccess) {  // the destructor does not run when the constructor throws
    c10::cuda::CUDACachingAllocator::raw_delete(mem_);
    mem_ = nullptr;
    C10_CUDA_CHECK(err);
  }
  split_.dk = static_cast<float*>(mem_);
  split_.dv = split_.dk + elems;
}

SinkSplitWorkspace::~SinkSplitWorkspace() {
  if (mem_ != nullptr) c10::cuda::CUDACachingAllocator::raw_delete(mem_);
}

void SinkSplitWorkspace::finish(const SfAttentionBwdParams& p, c10::ScalarType dtype,
                                cudaStream_t stream) const {
  if (split_.chunks <= 1) return;
  const int64_t total = int64_t(p.batch) * p.num_heads_kv * split_.ns * block_n_ * p.head_dim;
  const unsigned blocks =
      static_cast<unsigned>(std::min<int64_t>((total + 255) / 256, int64_t(1) << 16));
  CUDA_DTYPE_SWITCH(dtype, T, "sf_attention_bwd (CUDA)", [&] {
    launch_kernel(bwd_sink_convert_kernel<T>, blocks, 256, 0, stream, p, split_, block_n_);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

namespace {

template <typename T>
void run_bwd(const SfAttentionBwdParams& p, c10::ScalarType dtype, cudaStream_t stream) {
  // (1) delta
  {
    const int64_t warps = p.total_rows * p.num_heads_q;
    const int64_t blocks = (warps + 7) / 8;
    TORCH_CHECK(blocks <= INT_MAX, "sf_attention_bwd (CUDA): too many rows");
    launch_kernel(bwd_delta_kernel<T>, static_cast<unsigned>(blocks), 256, 0, stream, p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  // (2) dK, dV and dq_accum (nothing to do when every sequence is empty)
  if (p.batch > 0 && p.seqlen > 0 && sf_attention_bwd_kernel(p, dtype) == Kernel::kMma) {
    launch_bwd_mma(p, dtype, stream);
  } else if (p.batch > 0 && p.seqlen > 0) {
    const int num_tiles = (p.seqlen + kGenB - 1) / kGenB;
    SinkSplitWorkspace ws(p, kGenB, stream);
    const int64_t x = int64_t(p.batch) * ws.blocks_per_seq(num_tiles);
    TORCH_CHECK(x <= INT_MAX, "sf_attention_bwd (CUDA): batch * tiles (", x,
                ") exceeds the grid limit");
    const size_t smem = gen_bwd_smem(p.head_dim);
    TORCH_CHECK(smem <= size_t(current_device_props().max_smem_optin), "sf_attention_bwd (CUDA): head_dim ",
                p.head_dim, " needs ", smem,
                " bytes of shared memory per block, more than this device allows");
    auto kernel = bwd_generic_kernel<T>;
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(smem)));
    const dim3 grid(static_cast<unsigned>(x), p.num_heads_kv);
    launch_kernel(kernel, grid, 128, smem, stream, p, num_tiles, ws.split());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    ws.finish(p, dtype, stream);
  }
  // (3) dq
  {
    const int64_t total = p.total_rows * p.num_heads_q * p.head_dim;
    const int64_t blocks = std::min<int64_t>((total + 255) / 256, int64_t(1) << 20);
    launch_kernel(bwd_dq_convert_kernel<T>, static_cast<unsigned>(blocks), 256, 0, stream, p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace

Kernel sf_attention_bwd_kernel(const SfAttentionBwdParams& p, c10::ScalarType dtype) {
  const bool fixed = p.cu_seqlens == nullptr;
  const bool layout_ok = aligned16(p.q) && aligned16(p.k) && aligned16(p.v) && aligned16(p.dout) &&
                         aligned16(p.dk) && aligned16(p.dv) &&
                         strides_ok(8, p.q_row_stride, p.q_head_stride, fixed ? p.q_batch_stride : 0) &&
                         strides_ok(8, p.k_row_stride, p.k_head_stride, fixed ? p.k_batch_stride : 0) &&
                         strides_ok(8, p.v_row_stride, p.v_head_stride, fixed ? p.v_batch_stride : 0) &&
                         strides_ok(8, p.do_row_stride, p.do_head_stride, fixed ? p.do_batch_stride : 0) &&
                         strides_ok(8, p.dk_row_stride, p.dk_head_stride, fixed ? p.dk_batch_stride : 0) &&
                         strides_ok(8, p.dv_row_stride, p.dv_head_stride, fixed ? p.dv_batch_stride : 0);
  return choose_kernel(KernelOp::kSfAttentionBwd, dtype, p.head_dim, 1, layout_ok, current_device_props());
}

void launch_sf_attention_bwd(const SfAttentionBwdParams& p, c10::ScalarType dtype, cudaStream_t stream) {
  // dq, dk, dv are uninitialised: dq is written whole from dq_accum even when no sequence has rows.
  if (p.total_rows <= 0) return;
  TORCH_CHECK(p.dq_accum != nullptr, "sf_attention_bwd (CUDA): dq_accum workspace is required");
  TORCH_CHECK(p.num_heads_kv <= 65535, "sf_attention_bwd (CUDA): at most 65535 kv heads, got ", p.num_heads_kv);
  CUDA_DTYPE_SWITCH(dtype, T, "sf_attention_bwd (CUDA)", [&] { run_bwd<T>(p, dtype, stream); });
}

}  // namespace cuda
}  // namespace sinklora
