// csrc/cuda/msa_conv_cuda.cpp: the CUDA entry points of the MSA-Conv ops (msa_conv2d_fwd,
// msa_conv2d_bwd): the device-agnostic checks and allocation (msa_conv_api.h), then the launchers
// of launch.h on the tensors' device and stream.
#include <ATen/ATen.h>

#include "common/context.h"
#include "launch.h"
#include "msa_conv_api.h"
#include "ops.h"

namespace sinklora {
namespace {

// The kv_shift table for the launchers: the CPU table of prepare_* goes by value; with more than
// kMsaInlineHeads heads, params.shift is pointed at a device copy (returned, to keep it alive).
at::Tensor place_shift(const at::Tensor& shift, const at::Tensor& like, MsaConvParams& p, const char* op) {
  if (!shift.defined() || p.heads <= cuda::kMsaInlineHeads) {
    p.shift = nullptr;
    return {};
  }
  TORCH_CHECK(!cuda::stream_is_capturing(), op, ": kv_shift with more than ", cuda::kMsaInlineHeads,
              " heads is copied to the device on every call, which a CUDA graph cannot capture; got ", p.heads,
              " heads");
  at::Tensor on_device = shift.to(like.device(), /*non_blocking=*/true);
  p.shift = on_device.data_ptr<int32_t>();
  return on_device;
}

const int32_t* host_table(const at::Tensor& shift) { return shift.defined() ? shift.data_ptr<int32_t>() : nullptr; }

}  // namespace

std::tuple<at::Tensor, at::Tensor> msa_conv2d_fwd_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                       c10::IntArrayRef kernel_size, c10::IntArrayRef dilation,
                                                       c10::string_view padding, at::OptionalIntArrayRef kv_shift,
                                                       double softmax_scale) {
  cuda::CudaCall call(q);
  auto c = prepare_msa_conv2d_fwd(q, k, v, kernel_size, dilation, padding, kv_shift, softmax_scale);
  if (c.empty) return {c.out, c.lse};
  cuda::poison(c.out);
  cuda::poison(c.lse);
  const at::Tensor device_shift = place_shift(c.shift, c.q, c.params, "msa_conv2d");
  cuda::launch_msa_conv2d_fwd(c.params, host_table(c.shift), c.q.scalar_type(),
                              static_cast<cudaStream_t>(call.stream()));
  return {c.out, c.lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> msa_conv2d_bwd_cuda(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, c10::IntArrayRef kernel_size, c10::IntArrayRef dilation, c10::string_view padding,
    at::OptionalIntArrayRef kv_shift, double softmax_scale) {
  cuda::CudaCall call(q);
  auto c = prepare_msa_conv2d_bwd(dout, q, k, v, out, lse, kernel_size, dilation, padding, kv_shift, softmax_scale);
  if (c.empty) return {c.dq, c.dk, c.dv};
  for (auto* t : {&c.dq, &c.dk, &c.dv, &c.delta}) cuda::poison(*t);
  const at::Tensor device_shift = place_shift(c.shift, c.q, c.params, "msa_conv2d_bwd");
  cuda::launch_msa_conv2d_bwd(c.params, host_table(c.shift), c.q.scalar_type(),
                              static_cast<cudaStream_t>(call.stream()));
  return {c.dq, c.dk, c.dv};
}

}  // namespace sinklora
