// csrc/cuda/sf_attention_fwd.cu: SF-Attn forward on CUDA: the kernel choice (common/kernel_rule.h)
// and the launches of the tensor-core and the generic kernel (sf_attention_fwd_kernels.cuh).
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>

#include <climits>

#include "common/device_props.h"
#include "common/dispatch.h"
#include "launch.h"
#include "sf_attention_fwd_kernels.cuh"

namespace sinklora {
namespace cuda {
namespace {

int num_blocks_x(int batch, int num_tiles) {
  const int64_t x = int64_t(batch) * num_tiles;
  TORCH_CHECK(x <= INT_MAX, "sf_attention (CUDA): batch * tiles (", x, ") exceeds the grid limit");
  return static_cast<int>(x);
}

template <typename T, int D>
void run_fwd_mma(const SfAttentionParams& p, cudaStream_t stream) {
  using Cfg = FwdMmaCfg<T, D>;
  const int num_tiles = (p.seqlen + Cfg::kBM - 1) / Cfg::kBM;
  auto kernel = fwd_mma_kernel<T, D>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(Cfg::kSmem)));
  const dim3 grid(num_blocks_x(p.batch, num_tiles), p.num_heads_q);
  launch_kernel(kernel, grid, Cfg::kThreads, Cfg::kSmem, stream, p, num_tiles);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void run_fwd_generic(const SfAttentionParams& p, cudaStream_t stream) {
  const int num_tiles = (p.seqlen + kGenFwdBM - 1) / kGenFwdBM;
  const size_t smem = gen_fwd_smem(p.head_dim);
  TORCH_CHECK(smem <= size_t(current_device_props().max_smem_optin), "sf_attention (CUDA): head_dim ", p.head_dim,
              " needs ", smem, " bytes of shared memory per block, more than this device allows");
  auto kernel = fwd_generic_kernel<T>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(smem)));
  const dim3 grid(num_blocks_x(p.batch, num_tiles), p.num_heads_q);
  launch_kernel(kernel, grid, 128, smem, stream, p, num_tiles);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

Kernel sf_attention_fwd_kernel(const SfAttentionParams& p, c10::ScalarType dtype) {
  const bool fixed = p.cu_seqlens == nullptr;
  const bool layout_ok = aligned16(p.q) && aligned16(p.k) && aligned16(p.v) && aligned16(p.out) &&
                         strides_ok(8, p.q_row_stride, p.q_head_stride, fixed ? p.q_batch_stride : 0) &&
                         strides_ok(8, p.k_row_stride, p.k_head_stride, fixed ? p.k_batch_stride : 0) &&
                         strides_ok(8, p.v_row_stride, p.v_head_stride, fixed ? p.v_batch_stride : 0) &&
                         strides_ok(8, p.o_row_stride, p.o_head_stride, fixed ? p.o_batch_stride : 0);
  return choose_kernel(KernelOp::kSfAttentionFwd, dtype, p.head_dim, 1, layout_ok, current_device_props());
}

void launch_sf_attention_fwd(const SfAttentionParams& p, c10::ScalarType dtype, cudaStream_t stream) {
  if (p.batch <= 0 || p.seqlen <= 0 || p.total_rows <= 0) return;
  TORCH_CHECK(p.num_heads_q <= 65535, "sf_attention (CUDA): at most 65535 query heads, got ", p.num_heads_q);
  constexpr const char* op = "sf_attention_fwd (CUDA)";
  if (sf_attention_fwd_kernel(p, dtype) == Kernel::kMma) {
    CUDA_HALF_SWITCH(dtype, T, op, [&] {
      SINKLORA_HEAD_DIM_SWITCH(p.head_dim, D, op, [&] { run_fwd_mma<T, D>(p, stream); });
    });
  } else {
    CUDA_DTYPE_SWITCH(dtype, T, op, [&] { run_fwd_generic<T>(p, stream); });
  }
}

}  // namespace cuda
}  // namespace sinklora
