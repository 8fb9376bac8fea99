// csrc/api_checks.h: the argument rules the device-agnostic halves of the ops share
// (sf_attention_api.cpp, paged_kv_api.cpp, msa_conv_api.cpp; messages in docs/errors.md).
#pragma once

#include <ATen/ATen.h>

namespace sinklora {

// `a` (named `name`) has q's dtype and device; `op` starts the message.
inline void check_like(const at::Tensor& a, const char* name, const at::Tensor& q, const char* op) {
  TORCH_CHECK_VALUE(a.scalar_type() == q.scalar_type(), op, ": ", name, " has dtype ", a.scalar_type(),
                    " but q has dtype ", q.scalar_type(), "; they must match");
  TORCH_CHECK_VALUE(a.device() == q.device(), op, ": ", name, " is on ", a.device(), " but q is on ", q.device(),
                    "; they must be on the same device");
}

// Only the last dimension must be dense; any other strides are passed to the kernels.
inline at::Tensor last_dim_contiguous(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

}  // namespace sinklora
