// csrc/cuda/common/context.h: the CUDA context of one op call, for the CUDA entry points
// (csrc/cuda/*_cuda.cpp): the tensor's device made current and its current stream, whether that
// stream is being captured into a CUDA graph, and the poisoning of fresh outputs in the emulator
// build (csrc/emu/: CPU tensors, no streams, no graphs; outputs filled with NaN / the lowest int so
// that an element no kernel wrote shows in the tests).
#pragma once

#include <ATen/ATen.h>

#include <limits>

#if defined(SINKLORA_CUDA_EMULATION)

namespace sinklora {
namespace cuda {

class CudaCall {
 public:
  explicit CudaCall(const at::Tensor&) {}
  void* stream() const { return nullptr; }
};

inline bool stream_is_capturing() { return false; }

inline void poison(at::Tensor& t) {
  if (at::isFloatingType(t.scalar_type())) {
    t.fill_(std::numeric_limits<float>::quiet_NaN());
  } else {
    t.fill_(std::numeric_limits<int32_t>::min());
  }
}

}  // namespace cuda
}  // namespace sinklora

#else

#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

namespace sinklora {
namespace cuda {

class CudaCall {
 public:
  explicit CudaCall(const at::Tensor& t) : guard_(t.device()) {}
  void* stream() const { return c10::cuda::getCurrentCUDAStream().stream(); }

 private:
  c10::cuda::CUDAGuard guard_;
};

inline bool stream_is_capturing() {
  return c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
}

inline void poison(at::Tensor&) {}

}  // namespace cuda
}  // namespace sinklora

#endif
