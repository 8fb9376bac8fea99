// csrc/cuda/common/dispatch.h: csrc/static_switch.h with the CUDA element types of each dtype
// (float, __half, __nv_bfloat16), for every dtype dispatch of the CUDA host code.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "static_switch.h"

#define CUDA_DTYPE_SWITCH(DTYPE, T, OP, ...) \
  SINKLORA_DTYPE_SWITCH(DTYPE, T, float, __half, __nv_bfloat16, OP, __VA_ARGS__)
#define CUDA_HALF_SWITCH(DTYPE, T, OP, ...) SINKLORA_HALF_SWITCH(DTYPE, T, __half, __nv_bfloat16, OP, __VA_ARGS__)
