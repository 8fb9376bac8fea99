// Small math shared by the CPU kernels, written so that loops calling it vectorise.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
// Hot loops are compiled for AVX-512, AVX2 and baseline x86-64, picked at load time.
#define SF_MULTIVERSION __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define SF_MULTIVERSION
#endif

namespace sinklora {

// exp(x) for x <= 88 to a few ulp (2^n * 2^f, f in [-1/2, 1/2], Taylor to degree 7); branch-free
// (the build passes -fno-trapping-math) so that loops calling it vectorise.
inline float exp_approx(float x) {
  x = x < -87.0f ? -87.0f : x;
  const float t = x * 1.44269504088896341f;
  const float n = (t + 12582912.0f) - 12582912.0f;  // round to nearest: 1.5 * 2^23 trick
  const float f = t - n;
  float p = 1.52527338040e-5f;
  p = p * f + 1.54035303934e-4f;
  p = p * f + 1.33335581464e-3f;
  p = p * f + 9.61812910763e-3f;
  p = p * f + 5.55041086648e-2f;
  p = p * f + 2.40226506959e-1f;
  p = p * f + 6.93147180560e-1f;
  p = p * f + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

}  // namespace sinklora
