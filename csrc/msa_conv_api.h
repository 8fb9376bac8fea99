// csrc/msa_conv_api.h: the device-agnostic half of the MSA-Conv ops (msa_conv_api.cpp): each
// prepare_* checks its arguments (docs/errors.md), allocates the outputs and fills the kernel
// parameters; the per-device entry points (csrc/cpu/, csrc/cuda/) then only run kernels.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "msa_conv.h"

namespace sinklora {

// The inputs (last dimension made contiguous) stay referenced for as long as the params point at
// them. `shift`: int32 [heads, 2] on the CPU, reduced to [0, H) x [0, W) (undefined when none);
// params.shift points at it, and a CUDA entry point replaces it with a device copy.
// `empty`: nothing to compute (the outputs are complete as allocated, params unset).
struct MsaConvFwd {
  at::Tensor q, k, v, out, lse, shift;  // out: q's shape; lse float32 [B, H, W, heads]
  MsaConvParams params{};
  bool empty = true;
};

struct MsaConvBwd {
  at::Tensor q, k, v, out, dout, dq, dk, dv, delta, shift;  // delta: workspace like lse
  MsaConvBwdParams params{};
  bool empty = true;
};

MsaConvFwd prepare_msa_conv2d_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  c10::IntArrayRef kernel_size, c10::IntArrayRef dilation,
                                  c10::string_view padding, at::OptionalIntArrayRef kv_shift,
                                  double softmax_scale);

MsaConvBwd prepare_msa_conv2d_bwd(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                                  const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                  c10::IntArrayRef kernel_size, c10::IntArrayRef dilation,
                                  c10::string_view padding, at::OptionalIntArrayRef kv_shift,
                                  double softmax_scale);

}  // namespace sinklora
