// csrc/cuda/common/device.cuh under SINKLORA_CUDA_EMULATION: the same seam, served by the emulator.
#pragma once

#include <cstdint>
#include <utility>

#include "cuda.h"

namespace sinklora {
namespace cuda {

template <typename T>
inline T* dynamic_smem() {
  return static_cast<T*>(sinklora_emu::dynamic_smem());
}
inline uint32_t smem_u32(const void* p) { return sinklora_emu::smem_offset(p); }
inline void cp_async_16(void* smem, const void* gmem, bool pred) { sinklora_emu::cp_async_16(smem, gmem, pred); }
inline void cp_async_commit() { sinklora_emu::cp_async_commit(); }
inline void cp_async_wait_all() { sinklora_emu::cp_async_wait_group(-1); }
template <int N>
inline void cp_async_wait_group() {
  static_assert(N >= 0, "cp.async.wait_group takes a non-negative count");
  sinklora_emu::cp_async_wait_group(N);
}
inline void ldsm_x4(uint32_t (&r)[4], uint32_t saddr) { sinklora_emu::ldmatrix_x4(r, saddr, false); }
inline void ldsm_x4_trans(uint32_t (&r)[4], uint32_t saddr) { sinklora_emu::ldmatrix_x4(r, saddr, true); }

template <typename T>
inline void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
template <>
inline void mma16816<__half>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  sinklora_emu::mma_m16n8k16(d, a, b0, b1, sinklora_emu::MmaType::kF16);
}
template <>
inline void mma16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  sinklora_emu::mma_m16n8k16(d, a, b0, b1, sinklora_emu::MmaType::kBF16);
}

template <typename... Params, typename... Args>
void launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t,
                   Args&&... args) {
  sinklora_emu::launch(reinterpret_cast<const void*>(kernel), grid, block, smem,
                       [&] { kernel(args...); });
}

}  // namespace cuda
}  // namespace sinklora
