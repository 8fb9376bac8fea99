// csrc/cuda/common/kernel_rule.h: the one rule that picks the tensor-core ("mma") or the generic
// CUDA kernel of an op, used by the forward, the backward, the column scores and paged decode, and
// answered by kernel_for (docs/ops.md). A launch never falls back: the kernel chosen here runs, or
// the call raises.
#pragma once

#include <c10/core/ScalarType.h>

#include "device_props.h"
#include "kernel_choice.h"

namespace sinklora {
namespace cuda {

enum class Kernel { kMma, kGeneric };

inline const char* kernel_name(Kernel k) { return k == Kernel::kMma ? "mma" : "generic"; }

// The mma kernels take fp16/bf16 at head_dim 64 or 128, on a device of compute capability 8.0 or
// more whose binary of these kernels was built for sm_80 or later (ptxVersion >= 80; older PTX JIT
// would give empty bodies), with operands 16-byte aligned and strides multiples of 8 elements
// (`layout_ok`, which the op tests on its own tensors; the public API's dense tensors pass).
// Paged decode also needs at most 16 query heads per kv head (`group`). Writes, evictions and
// MSA-Conv (msa_conv_kernels.cuh: the forward, and dQ then dK/dV in the backward) have only
// "generic" kernels.
inline Kernel choose_kernel(KernelOp op, c10::ScalarType dtype, int head_dim, int group, bool layout_ok,
                            const DeviceProps& d) {
  if (op == KernelOp::kPagedWrite || op == KernelOp::kSelectEvictions || op == KernelOp::kMsaConv2dFwd ||
      op == KernelOp::kMsaConv2dBwd)
    return Kernel::kGeneric;
  const bool half = dtype == c10::ScalarType::Half || dtype == c10::ScalarType::BFloat16;
  const bool dims = head_dim == 64 || head_dim == 128;
  const bool device = d.major >= 8 && d.ptx_version >= 80;
  const bool heads = op != KernelOp::kPagedDecode || group <= 16;
  return half && dims && device && heads && layout_ok ? Kernel::kMma : Kernel::kGeneric;
}

}  // namespace cuda
}  // namespace sinklora
