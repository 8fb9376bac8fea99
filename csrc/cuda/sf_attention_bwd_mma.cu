// Launch of the tensor-core SF-Attn backward main kernel (bwd_mma_kernel in
// sf_attention_bwd_kernels.cuh): fp16/bf16, head dim 64 or 128, sm_80+.
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>

#include <climits>

#include "sf_attention_bwd_kernels.cuh"
#include "sf_attention_launch.h"

namespace sinklora {
namespace sfcuda {

namespace {

template <typename T, int D>
bool run_bwd_mma(const SfAttentionBwdParams& p, c10::ScalarType dtype, cudaStream_t stream) {
  using Cfg = BwdMmaCfg<T, D>;
  auto kernel = bwd_mma_kernel<T, D>;
  // The kernel body exists only when compiled for sm_80+ (a JIT from older PTX would be empty).
  cudaFuncAttributes attr{};
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, kernel));
  if (attr.ptxVersion < 80) return false;
  const int num_tiles = (p.seqlen + Cfg::kBN - 1) / Cfg::kBN;
  SinkSplitWorkspace ws(p, Cfg::kBN, stream);
  const int64_t x = int64_t(p.batch) * ws.blocks_per_seq(num_tiles);
  TORCH_CHECK(x <= INT_MAX, "sf_attention_bwd (CUDA): batch * tiles (", x,
              ") exceeds the grid limit");
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(Cfg::kSmem)));
  const dim3 grid(static_cast<unsigned>(x), p.num_heads_kv);
  launch_kernel(kernel, grid, Cfg::kThreads, Cfg::kSmem, stream, p, num_tiles, ws.split());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  ws.finish(p, dtype, stream);
  return true;
}

}  // namespace

bool launch_bwd_mma(const SfAttentionBwdParams& p, c10::ScalarType dtype, cudaStream_t stream) {
  if (dtype != c10::ScalarType::Half && dtype != c10::ScalarType::BFloat16) return false;
  if (p.head_dim != 64 && p.head_dim != 128) return false;
  if (!aligned16(p.q) || !aligned16(p.k) || !aligned16(p.v) || !aligned16(p.dout) ||
      !aligned16(p.dk) || !aligned16(p.dv))
    return false;
  const bool fixed = p.cu_seqlens == nullptr;
  if (!strides_ok(8, p.q_row_stride, p.q_head_stride, fixed ? p.q_batch_stride : 0) ||
      !strides_ok(8, p.k_row_stride, p.k_head_stride, fixed ? p.k_batch_stride : 0) ||
      !strides_ok(8, p.v_row_stride, p.v_head_stride, fixed ? p.v_batch_stride : 0) ||
      !strides_ok(8, p.do_row_stride, p.do_head_stride, fixed ? p.do_batch_stride : 0) ||
      !strides_ok(8, p.dk_row_stride, p.dk_head_stride, fixed ? p.dk_batch_stride : 0) ||
      !strides_ok(8, p.dv_row_stride, p.dv_head_stride, fixed ? p.dv_batch_stride : 0))
    return false;
  if (!device_has_sm80()) return false;
  const bool half = dtype == c10::ScalarType::Half;
  if (p.head_dim == 64) {
    return half ? run_bwd_mma<__half, 64>(p, dtype, stream)
                : run_bwd_mma<__nv_bfloat16, 64>(p, dtype, stream);
  }
  return half ? run_bwd_mma<__half, 128>(p, dtype, stream)
              : run_bwd_mma<__nv_bfloat16, 128>(p, dtype, stream);
}

}  // namespace sfcuda
}  // namespace sinklora
