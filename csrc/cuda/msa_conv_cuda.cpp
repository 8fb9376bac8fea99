// csrc/cuda/msa_conv_cuda.cpp: the CUDA entry points of the MSA-Conv ops (msa_conv2d_fwd,
// msa_conv2d_bwd): the device-agnostic checks and allocation (msa_conv_api.h), then the kernels.
#include <ATen/ATen.h>

#include "common/context.h"
#include "msa_conv_api.h"
#include "ops.h"

namespace sinklora {

std::tuple<at::Tensor, at::Tensor> msa_conv2d_fwd_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                       c10::IntArrayRef kernel_size, c10::IntArrayRef dilation,
                                                       c10::string_view padding, at::OptionalIntArrayRef kv_shift,
                                                       double softmax_scale) {
  cuda::CudaCall call(q);
  auto c = prepare_msa_conv2d_fwd(q, k, v, kernel_size, dilation, padding, kv_shift, softmax_scale);
  if (c.empty) return {c.out, c.lse};
  TORCH_CHECK_NOT_IMPLEMENTED(false, "msa_conv2d: the CUDA kernel is not built yet");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> msa_conv2d_bwd_cuda(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, c10::IntArrayRef kernel_size, c10::IntArrayRef dilation, c10::string_view padding,
    at::OptionalIntArrayRef kv_shift, double softmax_scale) {
  cuda::CudaCall call(q);
  auto c = prepare_msa_conv2d_bwd(dout, q, k, v, out, lse, kernel_size, dilation, padding, kv_shift, softmax_scale);
  if (c.empty) return {c.dq, c.dk, c.dv};
  TORCH_CHECK_NOT_IMPLEMENTED(false, "msa_conv2d_bwd: the CUDA kernel is not built yet");
}

}  // namespace sinklora
