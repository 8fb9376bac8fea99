// csrc/cuda/paged_decode_mma.cu: launch of the tensor-core paged decode kernel (decode_mma_kernel
// in paged_decode_kernels.cuh), once choose_kernel picked it. A separate file from paged_decode.cu
// so that the two compile in parallel.
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>

#include "common/device_props.h"
#include "common/dispatch.h"
#include "paged_decode_kernels.cuh"

namespace sinklora {
namespace cuda {
namespace {

template <typename T, int D, bool SCORES>
void run_decode_mma(const PagedDecodeParams& p, const DecodePlan& plan, float* ws, cudaStream_t stream) {
  auto kernel = decode_mma_kernel<T, D, SCORES>;
  const size_t smem = decode_mma_smem(D, plan.group, plan.partition);
  TORCH_CHECK(smem <= size_t(current_device_props().max_smem_optin), "paged_decode (CUDA, mma): ", plan.group,
              " query heads per kv head need ", smem, " bytes of shared memory per block, more than this device "
              "allows");
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  const int64_t blocks = int64_t(p.batch) * p.num_heads_kv * plan.splits;
  launch_kernel(kernel, static_cast<unsigned>(blocks), kDecodeThreads, smem, stream, p, plan, ws);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void launch_decode_mma(const PagedDecodeParams& p, c10::ScalarType dtype, const DecodePlan& plan, float* ws,
                       cudaStream_t stream) {
  constexpr const char* op = "paged_decode (CUDA, mma)";
  CUDA_HALF_SWITCH(dtype, T, op, [&] {
    SINKLORA_HEAD_DIM_SWITCH(p.head_dim, D, op, [&] {
      SINKLORA_BOOL_SWITCH(p.scores != nullptr, SCORES, [&] { run_decode_mma<T, D, SCORES>(p, plan, ws, stream); });
    });
  });
}

}  // namespace cuda
}  // namespace sinklora
