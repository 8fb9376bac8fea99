// csrc/cuda/msa_conv_bwd.cu: MSA-Conv backward on CUDA (msa_conv2d_bwd): delta and dQ per query,
// then dK and dV per key (msa_conv_kernels.cuh), MSA-Conv's one kernel family
// (common/kernel_rule.h). Every output element is written once, by plain stores: deterministic.
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>

#include "common/device_props.h"
#include "common/dispatch.h"
#include "launch.h"
#include "msa_conv_kernels.cuh"

namespace sinklora {
namespace cuda {

Kernel msa_conv2d_bwd_kernel(c10::ScalarType dtype, int head_dim) {
  return choose_kernel(KernelOp::kMsaConv2dBwd, dtype, head_dim, 1, true, current_device_props());
}

void launch_msa_conv2d_bwd(const MsaConvBwdParams& p, const int32_t* host_shift, c10::ScalarType dtype,
                           cudaStream_t stream) {
  constexpr const char* op = "msa_conv2d_bwd (CUDA)";
  TORCH_CHECK(msa_conv2d_bwd_kernel(dtype, p.head_dim) == Kernel::kGeneric, op, ": no such kernel");
  const MsaShifts shifts = msa_shifts(p.heads, host_shift);
  CUDA_DTYPE_SWITCH(dtype, T, op, [&] {
    SINKLORA_FAST_HEAD_DIM_SWITCH(p.head_dim, D, [&] {
      const unsigned blocks = msa_blocks(p, MsaLanes<D>::kG, op);
      launch_kernel(msa_bwd_dq_generic_kernel<T, D>, blocks, kMsaThreads, 0, stream, p, shifts);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      launch_kernel(msa_bwd_dkdv_generic_kernel<T, D>, blocks, kMsaThreads, 0, stream, p, shifts);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

}  // namespace cuda
}  // namespace sinklora
