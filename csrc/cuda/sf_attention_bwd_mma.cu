// csrc/cuda/sf_attention_bwd_mma.cu: launch of the tensor-core SF-Attn backward main kernel
// (bwd_mma_kernel in sf_attention_bwd_kernels.cuh), once choose_kernel picked it.
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>

#include <climits>

#include "common/dispatch.h"
#include "sf_attention_bwd_kernels.cuh"

namespace sinklora {
namespace cuda {

namespace {

template <typename T, int D>
void run_bwd_mma(const SfAttentionBwdParams& p, c10::ScalarType dtype, cudaStream_t stream) {
  using Cfg = BwdMmaCfg<T, D>;
  auto kernel = bwd_mma_kernel<T, D>;
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
}

}  // namespace

void launch_bwd_mma(const SfAttentionBwdParams& p, c10::ScalarType dtype, cudaStream_t stream) {
  constexpr const char* op = "sf_attention_bwd (CUDA, mma)";
  CUDA_HALF_SWITCH(dtype, T, op, [&] {
    SINKLORA_HEAD_DIM_SWITCH(p.head_dim, D, op, [&] { run_bwd_mma<T, D>(p, dtype, stream); });
  });
}

}  // namespace cuda
}  // namespace sinklora
