// csrc/cuda/common/tile.cuh: device helpers both kernel families (SF-Attn, paged KV) share: dtype
// conversions, warp reductions, the swizzled shared-memory tiles of the tensor-core kernels and the
// alignment tests that decide whether a layout can take them.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "device.cuh"

namespace sinklora {
namespace cuda {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// ---------------------------------------------------------------------------------------------
// dtype helpers (explicit intrinsics: torch builds with __CUDA_NO_HALF_CONVERSIONS__ and friends)

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Two floats as one 32-bit register of two 16-bit values, `lo` in the low half (the mma layout).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// ---------------------------------------------------------------------------------------------
// Shared-memory tiles of the tensor-core kernels (sm_80+; the primitives are in
// common/device.cuh).

// Shared tiles are rows of CPR 16-byte chunks; chunk c of row r is stored at chunk
// swz<CPR>(r, c). The XOR makes the 8 rows of one ldmatrix 8x8 matrix (same logical chunk,
// 8 consecutive rows starting at a multiple of 8) hit 8 distinct 16-byte bank groups.
template <int CPR>
__device__ __forceinline__ int swz(int row, int chunk) {
  static_assert(CPR == 4 || CPR % 8 == 0, "unsupported smem row width");
  if constexpr (CPR == 4) {
    return row * CPR + (chunk ^ ((row >> 1) & 3));
  } else {
    return row * CPR + (chunk ^ (row & 7));
  }
}

// Per-lane byte offsets for ldmatrix.x4 on a swizzled tile. Lane l addresses row R0 + rl(l) and
// chunk C0 + cl(l), with R0 a multiple of 8 and C0 even; after unrolling R0 and C0 are constants,
// so each address is one of four per-lane registers plus an immediate (instead of one register
// per (R0, C0)). Uses: kPatA for A operands (16 rows x 2 chunks), kPatB for non-transposed B
// operands (two n-blocks of 8 rows x 2 chunks), kPatT for transposed B operands (16 rows x two
// n-blocks of one chunk).
enum LdsmPattern { kPatA, kPatB, kPatT };

template <int CPR, LdsmPattern P>
struct LdsmAddr {
  uint32_t off[4];
  __device__ __forceinline__ explicit LdsmAddr(int lane) {
    const int rl = P == kPatA   ? (lane & 15)
                   : P == kPatB ? ((lane & 7) | ((lane >> 4) << 3))
                                : ((lane & 7) | (((lane >> 3) & 1) << 3));
    const int cl = P == kPatB ? ((lane >> 3) & 1) : (lane >> 4);
    // (2m + cl) ^ x == 2m ^ (cl ^ x) for x < 8: only the XOR with the lane's row bits varies.
    const int y = cl ^ (CPR == 4 ? ((rl >> 1) & 3) : (rl & 7));
#pragma unroll
    for (int m = 0; m < 4; ++m) off[m] = uint32_t((rl * CPR + ((2 * m) ^ y)) * 16);
  }
  // Byte offset, from the tile's start, of this lane's row of the x4 load at (R0, C0).
  __device__ __forceinline__ uint32_t operator()(int R0, int C0) const {
    return uint32_t(R0 * CPR * 16 + (C0 >> 3) * 128) + off[(C0 & 7) >> 1];
  }
};

// Async copy of rows [row0, row0 + nvalid) of a [*, D] global tile (row stride in elements, last
// dim contiguous) into a swizzled ROWS x D shared tile; rows >= nvalid are zero-filled.
template <int ROWS, int D, int THREADS, typename T>
__device__ __forceinline__ void cp_async_tile(T* smem, const T* gbase, int64_t row_stride, int row0,
                                              int nvalid, int tid) {
  constexpr int CPR = D / 8;
  constexpr int TOTAL = ROWS * CPR;
#pragma unroll
  for (int it = 0; it < (TOTAL + THREADS - 1) / THREADS; ++it) {
    const int idx = tid + it * THREADS;
    if (TOTAL % THREADS == 0 || idx < TOTAL) {
      const int r = idx / CPR;
      const int c = idx % CPR;
      const bool ok = r < nvalid;
      const T* src = ok ? gbase + int64_t(row0 + r) * row_stride + c * 8 : gbase;
      cp_async_16(smem + swz<CPR>(r, c) * 8, src, ok);
    }
  }
}

// True when ptr is 16-byte aligned and every stride is a multiple of `elems` elements.
inline bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }
inline bool strides_ok(int64_t elems, int64_t a, int64_t b, int64_t c) {
  return a % elems == 0 && b % elems == 0 && c % elems == 0;
}

}  // namespace cuda
}  // namespace sinklora
