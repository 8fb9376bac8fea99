// csrc/cuda/common/device_props.h: the properties of a CUDA device the host code of both kernel
// families reads (SM count, compute capability, opt-in shared memory, the PTX version this binary's
// kernels have on it), queried once per device and cached.
#pragma once

namespace sinklora {
namespace cuda {

struct DeviceProps {
  int sm_count;
  int major;           // compute capability
  int max_smem_optin;  // bytes of dynamic shared memory a block may opt in to
  int ptx_version;     // cudaFuncAttributes::ptxVersion of this binary's kernels on the device
};

// The current device's properties (the first call per device queries them).
const DeviceProps& current_device_props();

// Drops the cache (the emulator build calls it when its emulated device changes).
void forget_device_props();

}  // namespace cuda
}  // namespace sinklora
