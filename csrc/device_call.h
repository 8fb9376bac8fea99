// Which kernels an op runs, and the CUDA context of a call: one place, so that the CPU build, the
// CUDA build and the emulator build (csrc/emu/: the CUDA kernels run on CPU tensors by the CPU
// emulation of CUDA) dispatch alike.
#pragma once

#include <ATen/ATen.h>

#include <limits>

#if defined(SINKLORA_WITH_CUDA) && !defined(SINKLORA_CUDA_EMULATION)
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace sinklora {

// True when tensors on t's device run the CUDA kernels.
inline bool runs_cuda_kernels(const at::Tensor& t) {
#if defined(SINKLORA_CUDA_EMULATION)
  return t.is_cpu();
#elif defined(SINKLORA_WITH_CUDA)
  return t.is_cuda();
#else
  (void)t;
  return false;
#endif
}

// For the duration of a CUDA kernel call: t's device is current; stream() is its current stream.
class CudaCall {
 public:
#if defined(SINKLORA_WITH_CUDA) && !defined(SINKLORA_CUDA_EMULATION)
  explicit CudaCall(const at::Tensor& t) : guard_(t.device()) {}
  void* stream() const { return c10::cuda::getCurrentCUDAStream().stream(); }

 private:
  c10::cuda::CUDAGuard guard_;
#else
  explicit CudaCall(const at::Tensor&) {}
  void* stream() const { return nullptr; }
#endif
};

// A new tensor that the kernels write in full. The emulator build poisons it (NaN, or the lowest
// integer) so that an element no kernel wrote shows in the tests.
inline at::Tensor kernel_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  auto t = at::empty(sizes, options);
#if defined(SINKLORA_CUDA_EMULATION)
  if (at::isFloatingType(t.scalar_type())) {
    t.fill_(std::numeric_limits<float>::quiet_NaN());
  } else {
    t.fill_(std::numeric_limits<int32_t>::min());
  }
#endif
  return t;
}

}  // namespace sinklora
