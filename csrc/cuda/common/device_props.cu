// csrc/cuda/common/device_props.cu: the per-device cache of DeviceProps (device_props.h).
#include <c10/cuda/CUDAException.h>

#include <memory>
#include <mutex>
#include <vector>

#include "device_props.h"

namespace sinklora {
namespace cuda {
namespace {

// An empty kernel compiled with the same flags as every other: its ptxVersion is theirs.
__global__ void ptx_version_probe_kernel() {}

std::mutex cache_mutex;
std::vector<std::unique_ptr<DeviceProps>> cache;

DeviceProps query(int dev) {
  DeviceProps d{};
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&d.sm_count, cudaDevAttrMultiProcessorCount, dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&d.major, cudaDevAttrComputeCapabilityMajor, dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&d.max_smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  cudaFuncAttributes attr{};
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, ptx_version_probe_kernel));
  d.ptx_version = attr.ptxVersion;
  return d;
}

}  // namespace

const DeviceProps& current_device_props() {
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  std::lock_guard<std::mutex> lock(cache_mutex);
  if (cache.size() <= size_t(dev)) cache.resize(size_t(dev) + 1);
  if (!cache[dev]) cache[dev] = std::make_unique<DeviceProps>(query(dev));
  return *cache[dev];
}

void forget_device_props() {
  std::lock_guard<std::mutex> lock(cache_mutex);
  cache.clear();
}

}  // namespace cuda
}  // namespace sinklora
