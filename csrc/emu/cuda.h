// The CUDA C++ dialect and runtime API as the kernels use them, on the CPU: the emulator's view of
// the device (runtime.cpp runs every thread of a block as a fiber, with barriers, warp collectives
// and a shared-memory race and initialisation tracker). Included through the shim headers of
// include/ (cuda_runtime.h, cuda_fp16.h, cuda_bf16.h, c10/cuda/...), never directly by kernels.
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <type_traits>

#if defined(__CUDACC__) || defined(__CUDA_ARCH__)
#error "csrc/emu is the CPU emulation of CUDA: compile it with a host compiler, without CUDA"
#endif

// ---------------------------------------------------------------------------------------------
// The language: every function is a host function; kernel bodies see an sm_90 device.
#define __CUDA_ARCH__ 900
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define __restrict__ __restrict

struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(8) float2 {
  float x, y;
};
struct alignas(8) int2 {
  int x, y;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline float2 make_float2(float x, float y) { return {x, y}; }

// CUDA's overloaded min/max for mixed arithmetic types.
template <typename A, typename B, typename = std::enable_if_t<std::is_arithmetic_v<A> && std::is_arithmetic_v<B>>>
inline std::common_type_t<A, B> min(A a, B b) {
  using C = std::common_type_t<A, B>;
  return C(b) < C(a) ? C(b) : C(a);
}
template <typename A, typename B, typename = std::enable_if_t<std::is_arithmetic_v<A> && std::is_arithmetic_v<B>>>
inline std::common_type_t<A, B> max(A a, B b) {
  using C = std::common_type_t<A, B>;
  return C(a) < C(b) ? C(b) : C(a);
}

// 16-bit floating types: storage plus round-to-nearest-even conversions (as cuda_fp16.h and
// cuda_bf16.h; torch builds define __CUDA_NO_HALF_CONVERSIONS__, so kernels use the intrinsics).
struct alignas(2) __half {
  uint16_t bits;
};
struct alignas(4) __half2 {
  __half x, y;
};
struct alignas(2) __nv_bfloat16 {
  uint16_t bits;
};
struct alignas(4) __nv_bfloat162 {
  __nv_bfloat16 x, y;
};
inline float __half2float(__half h) { return c10::detail::fp16_ieee_to_fp32_value(h.bits); }
inline __half __float2half_rn(float f) { return __half{c10::detail::fp16_ieee_from_fp32_value(f)}; }
inline float __bfloat162float(__nv_bfloat16 h) { return c10::detail::f32_from_bits(h.bits); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  return __nv_bfloat16{c10::detail::round_to_nearest_even(f)};
}
inline __half2 __floats2half2_rn(float lo, float hi) { return {__float2half_rn(lo), __float2half_rn(hi)}; }
inline __nv_bfloat162 __floats2bfloat162_rn(float lo, float hi) {
  return {__float2bfloat16_rn(lo), __float2bfloat16_rn(hi)};
}
inline float __fdiv_rn(float a, float b) { return a / b; }  // IEEE division: the host's
inline unsigned __float_as_uint(float x) {
  unsigned u;
  std::memcpy(&u, &x, 4);
  return u;
}
inline float __uint_as_float(unsigned u) {
  float x;
  std::memcpy(&x, &u, 4);
  return x;
}

// ---------------------------------------------------------------------------------------------
// The emulator (runtime.cpp)
namespace sinklora_emu {

// The running thread's coordinates.
const uint3& thread_idx();
const uint3& block_idx();
const dim3& block_dim();
const dim3& grid_dim();

void syncthreads();
void syncwarp(unsigned mask);
// __shfl_sync / __shfl_xor_sync of one 32-bit value.
uint32_t shfl32(unsigned mask, uint32_t value, int lane_or_mask, bool xor_mode);
float atomic_add_f32(float* address, float value);  // returns the old value

// The shared window: offset of a pointer into the block's shared memory, and back.
uint32_t smem_offset(const void* p);
void* dynamic_smem();

// PTX (sm_80) collectives and async copies, from the PTX ISA's fragment layouts.
void cp_async_16(void* smem, const void* gmem, bool pred);
void cp_async_commit();
void cp_async_wait_group(int newest_in_flight);  // -1: cp.async.wait_all
void ldmatrix_x4(uint32_t (&r)[4], uint32_t saddr, bool trans);
enum class MmaType { kF16, kBF16 };
void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, MmaType type);

// The emulated device's properties (configurable from the tests).
struct DeviceProps {
  int major = 9, minor = 0;
  int sm_count = 132;
  int max_smem_optin = 227 * 1024;
  int ptx_version = 90;  // cudaFuncAttributes::ptxVersion of every kernel
};
DeviceProps& device_props();
void set_max_dynamic_smem(const void* kernel, int bytes);

// Runs grid x block threads of `body` (the kernel call) and checks everything it can; throws a
// c10::Error describing the first faults after the launch.
void launch(const void* kernel, dim3 grid, dim3 block, size_t smem, const std::function<void()>& body);

void* device_alloc(size_t bytes);  // poisoned (0xff bytes: NaN in every float format)
void device_free(void* p);

}  // namespace sinklora_emu

#define threadIdx (::sinklora_emu::thread_idx())
#define blockIdx (::sinklora_emu::block_idx())
#define blockDim (::sinklora_emu::block_dim())
#define gridDim (::sinklora_emu::grid_dim())

inline void __syncthreads() { sinklora_emu::syncthreads(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { sinklora_emu::syncwarp(mask); }

template <typename T>
inline T sinklora_emu_shfl(unsigned mask, T v, int lane, bool xor_mode) {
  static_assert(sizeof(T) == 4 && std::is_trivially_copyable_v<T>, "emulated shuffles move 32-bit values");
  uint32_t u;
  std::memcpy(&u, &v, 4);
  u = sinklora_emu::shfl32(mask, u, lane, xor_mode);
  std::memcpy(&v, &u, 4);
  return v;
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  TORCH_CHECK(width == 32, "emulated __shfl_xor_sync supports width 32 only");
  return sinklora_emu_shfl(mask, v, lane_mask, true);
}
template <typename T>
inline T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32) {
  TORCH_CHECK(width == 32, "emulated __shfl_sync supports width 32 only");
  return sinklora_emu_shfl(mask, v, src_lane, false);
}
inline float atomicAdd(float* address, float value) { return sinklora_emu::atomic_add_f32(address, value); }
inline size_t __cvta_generic_to_shared(const void* p) { return sinklora_emu::smem_offset(p); }

// ---------------------------------------------------------------------------------------------
// The runtime API
struct CUstream_st;
using cudaStream_t = CUstream_st*;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
enum cudaDeviceAttr {
  cudaDevAttrComputeCapabilityMajor,
  cudaDevAttrComputeCapabilityMinor,
  cudaDevAttrMultiProcessorCount,
  cudaDevAttrMaxSharedMemoryPerBlockOptin,
};
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize };
struct cudaFuncAttributes {
  int ptxVersion;
  int binaryVersion;
  int maxDynamicSharedSizeBytes;
};

inline const char* cudaGetErrorString(cudaError_t e) { return e == cudaSuccess ? "no error" : "invalid value"; }
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline cudaError_t cudaGetDevice(int* dev) {
  *dev = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (device != 0) return cudaErrorInvalidValue;
  const auto& d = sinklora_emu::device_props();
  switch (attr) {
    case cudaDevAttrComputeCapabilityMajor: *value = d.major; break;
    case cudaDevAttrComputeCapabilityMinor: *value = d.minor; break;
    case cudaDevAttrMultiProcessorCount: *value = d.sm_count; break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = d.max_smem_optin; break;
    default: return cudaErrorInvalidValue;
  }
  return cudaSuccess;
}
template <typename... P>
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attr, void (*kernel)(P...)) {
  (void)kernel;
  const auto& d = sinklora_emu::device_props();
  *attr = cudaFuncAttributes{d.ptx_version, d.major * 10 + d.minor, 48 * 1024};
  return cudaSuccess;
}
template <typename... P>
cudaError_t cudaFuncSetAttribute(void (*kernel)(P...), cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 ||
      value > sinklora_emu::device_props().max_smem_optin)
    return cudaErrorInvalidValue;
  sinklora_emu::set_max_dynamic_smem(reinterpret_cast<const void*>(kernel), value);
  return cudaSuccess;
}
inline cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t) {
  std::memset(p, value, bytes);
  return cudaSuccess;
}

#define C10_CUDA_CHECK(expr)                                                                   \
  do {                                                                                         \
    const cudaError_t sinklora_emu_err = (expr);                                               \
    TORCH_CHECK(sinklora_emu_err == cudaSuccess, "CUDA error (emulated): ",                    \
                cudaGetErrorString(sinklora_emu_err), " from ", #expr);                        \
  } while (0)
#define C10_CUDA_KERNEL_LAUNCH_CHECK() C10_CUDA_CHECK(cudaGetLastError())

namespace c10::cuda::CUDACachingAllocator {
inline void* raw_alloc_with_stream(size_t bytes, cudaStream_t) { return sinklora_emu::device_alloc(bytes); }
inline void raw_delete(void* p) { sinklora_emu::device_free(p); }
}  // namespace c10::cuda::CUDACachingAllocator
