// csrc/static_switch.h: compile-time dispatch of run-time values (flash-attention's static_switch.h,
// FlashInfer's DISPATCH_*), one macro set for every dispatch site of the CPU and CUDA code. Each
// macro runs its trailing lambda with a type or constant bound to the value, and raises a
// ValueError naming `op` for a value it has no case for:
//
//   SINKLORA_DTYPE_SWITCH(dtype, T, F32, F16, BF16, op, [&] { run<T>(p); });  // the 3 float dtypes
//   SINKLORA_HALF_SWITCH(dtype, T, F16, BF16, op, [&] { run<T>(p); });      // fp16 / bf16 only
//   SINKLORA_HEAD_DIM_SWITCH(head_dim, D, op, [&] { run<D>(p); });           // 64 / 128
//   SINKLORA_FAST_HEAD_DIM_SWITCH(head_dim, D, [&] { run<D>(p); });          // 32 / 64 / 0 = any other
//   SINKLORA_BOOL_SWITCH(cond, B, [&] { run<B>(p); });
//
// csrc/cuda/common/dispatch.h and csrc/cpu/ name the element types of each device.
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#define SINKLORA_DTYPE_SWITCH(DTYPE, T, F32, F16, BF16, OP, ...)                                  \
  [&] {                                                                                           \
    switch (DTYPE) {                                                                              \
      case c10::ScalarType::Float: {                                                              \
        using T = F32;                                                                            \
        return __VA_ARGS__();                                                                     \
      }                                                                                           \
      case c10::ScalarType::Half: {                                                               \
        using T = F16;                                                                            \
        return __VA_ARGS__();                                                                     \
      }                                                                                           \
      case c10::ScalarType::BFloat16: {                                                           \
        using T = BF16;                                                                           \
        return __VA_ARGS__();                                                                     \
      }                                                                                           \
      default:                                                                                    \
        TORCH_CHECK_VALUE(false, OP, ": unsupported dtype ", DTYPE);                              \
    }                                                                                             \
  }()

#define SINKLORA_HALF_SWITCH(DTYPE, T, F16, BF16, OP, ...)                                        \
  [&] {                                                                                           \
    if ((DTYPE) == c10::ScalarType::Half) {                                                       \
      using T = F16;                                                                              \
      return __VA_ARGS__();                                                                       \
    }                                                                                             \
    TORCH_CHECK_VALUE((DTYPE) == c10::ScalarType::BFloat16, OP, ": no fp16/bf16 kernel for ", DTYPE); \
    using T = BF16;                                                                               \
    return __VA_ARGS__();                                                                         \
  }()

#define SINKLORA_HEAD_DIM_SWITCH(HEAD_DIM, D, OP, ...)                                            \
  [&] {                                                                                           \
    if ((HEAD_DIM) == 64) {                                                                       \
      constexpr static int D = 64;                                                                \
      return __VA_ARGS__();                                                                       \
    }                                                                                             \
    TORCH_CHECK_VALUE((HEAD_DIM) == 128, OP, ": no kernel specialised for head_dim ", HEAD_DIM);  \
    constexpr static int D = 128;                                                                 \
    return __VA_ARGS__();                                                                         \
  }()

// MSA-Conv's head-dim variants (CPU and CUDA): 32, 64, and 0 for a loop bound known only at run time.
#define SINKLORA_FAST_HEAD_DIM_SWITCH(HEAD_DIM, D, ...)                                           \
  [&] {                                                                                           \
    if ((HEAD_DIM) == 32) {                                                                       \
      constexpr static int D = 32;                                                                \
      return __VA_ARGS__();                                                                       \
    }                                                                                             \
    if ((HEAD_DIM) == 64) {                                                                       \
      constexpr static int D = 64;                                                                \
      return __VA_ARGS__();                                                                       \
    }                                                                                             \
    constexpr static int D = 0;                                                                   \
    return __VA_ARGS__();                                                                         \
  }()

#define SINKLORA_BOOL_SWITCH(COND, B, ...)                                                        \
  [&] {                                                                                           \
    if (COND) {                                                                                   \
      constexpr static bool B = true;                                                             \
      return __VA_ARGS__();                                                                       \
    }                                                                                             \
    constexpr static bool B = false;                                                             \
    return __VA_ARGS__();                                                                         \
  }()
