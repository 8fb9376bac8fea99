// csrc/cuda/torch_bindings_cuda.cpp: the CUDA entry points (csrc/cuda/*_cuda.cpp) registered under
// the CUDA key, and kernel_for on CUDA (common/kernel_rule.h). Compiled only in CUDA builds, and in
// the emulator build (csrc/emu/), which registers them under its own namespace's CPU key: CPU
// tensors run the CUDA kernels there.
#include <torch/library.h>

#include "common/context.h"
#include "common/device_props.h"
#include "common/kernel_rule.h"
#include "ops.h"

namespace sinklora {

std::string kernel_for_cuda(const at::Tensor& like, c10::string_view op, int64_t head_dim, int64_t heads_per_kv) {
  const KernelOp k = kernel_op(op);
  TORCH_CHECK_VALUE(head_dim >= 1 && heads_per_kv >= 1, "kernel_for: head_dim and heads_per_kv must be >= 1, got ",
                    head_dim, " and ", heads_per_kv);
  cuda::CudaCall call(like);
  return cuda::kernel_name(cuda::choose_kernel(k, like.scalar_type(), static_cast<int>(head_dim),
                                               static_cast<int>(heads_per_kv), true,
                                               cuda::current_device_props()));
}

}  // namespace sinklora

#if defined(SINKLORA_CUDA_EMULATION)
TORCH_LIBRARY_IMPL(sinklora_cuda_emu, CPU, m) { SINKLORA_REGISTER_OPS(m, cuda); }
#else
TORCH_LIBRARY_IMPL(sinklora_ext, CUDA, m) { SINKLORA_REGISTER_OPS(m, cuda); }
#endif
