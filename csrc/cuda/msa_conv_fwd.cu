// csrc/cuda/msa_conv_fwd.cu: MSA-Conv forward on CUDA (msa_conv2d_fwd): the launch of
// msa_fwd_generic_kernel (msa_conv_kernels.cuh), MSA-Conv's one kernel (common/kernel_rule.h).
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>

#include "common/device_props.h"
#include "common/dispatch.h"
#include "launch.h"
#include "msa_conv_kernels.cuh"

namespace sinklora {
namespace cuda {

Kernel msa_conv2d_fwd_kernel(c10::ScalarType dtype, int head_dim) {
  return choose_kernel(KernelOp::kMsaConv2dFwd, dtype, head_dim, 1, true, current_device_props());
}

void launch_msa_conv2d_fwd(const MsaConvParams& p, const int32_t* host_shift, c10::ScalarType dtype,
                           cudaStream_t stream) {
  constexpr const char* op = "msa_conv2d (CUDA)";
  TORCH_CHECK(msa_conv2d_fwd_kernel(dtype, p.head_dim) == Kernel::kGeneric, op, ": no such kernel");
  const MsaShifts shifts = msa_shifts(p.heads, host_shift);
  CUDA_DTYPE_SWITCH(dtype, T, op, [&] {
    SINKLORA_FAST_HEAD_DIM_SWITCH(p.head_dim, D, [&] {
      launch_kernel(msa_fwd_generic_kernel<T, D>, msa_blocks(p, MsaLanes<D>::kG, op), kMsaThreads, 0, stream, p,
                    shifts);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

}  // namespace cuda
}  // namespace sinklora
