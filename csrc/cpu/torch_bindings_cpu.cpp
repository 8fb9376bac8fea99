// csrc/cpu/torch_bindings_cpu.cpp: the CPU entry points (csrc/cpu/) registered under the CPU key,
// and kernel_for on the CPU (every op has one CPU kernel).
#include <torch/library.h>

#include "kernel_choice.h"
#include "ops.h"

namespace sinklora {

std::string kernel_for_cpu(const at::Tensor&, c10::string_view op, int64_t, int64_t) {
  kernel_op(op);  // known op
  return "cpu";
}

}  // namespace sinklora

TORCH_LIBRARY_IMPL(sinklora_ext, CPU, m) { SINKLORA_REGISTER_OPS(m, cpu); }
