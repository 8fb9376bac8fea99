// csrc/cuda/sf_attention_cuda.cpp: the CUDA entry points of the SF-Attn ops (sf_attention_fwd,
// sf_attention_bwd, column_scores): the device-agnostic checks and allocation
// (sf_attention_api.h), then the launchers of launch.h on the tensors' device and stream.
#include <ATen/ATen.h>

#include "common/context.h"
#include "launch.h"
#include "ops.h"
#include "sf_attention_api.h"

namespace sinklora {

std::tuple<at::Tensor, at::Tensor> sf_attention_fwd_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                         const std::optional<at::Tensor>& cu_seqlens,
                                                         int64_t max_seqlen, int64_t group_size, int64_t num_sinks,
                                                         c10::string_view shift, double softmax_scale) {
  cuda::CudaCall call(q);
  auto c = prepare_sf_attention_fwd(q, k, v, cu_seqlens, max_seqlen, group_size, num_sinks, shift, softmax_scale);
  if (c.empty) return {c.out, c.lse};
  cuda::poison(c.out);
  cuda::poison(c.lse);
  cuda::launch_sf_attention_fwd(c.params, c.q.scalar_type(), static_cast<cudaStream_t>(call.stream()));
  return {c.out, c.lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sf_attention_bwd_cuda(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const std::optional<at::Tensor>& cu_seqlens, int64_t max_seqlen, int64_t group_size,
    int64_t num_sinks, c10::string_view shift, double softmax_scale) {
  cuda::CudaCall call(q);
  auto c = prepare_sf_attention_bwd(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, group_size, num_sinks, shift,
                                    softmax_scale);
  if (c.empty) return {c.dq, c.dk, c.dv};
  for (auto* t : {&c.dq, &c.dk, &c.dv, &c.delta}) cuda::poison(*t);
  auto dq_accum = at::zeros({c.params.total_rows, c.params.num_heads_q, c.params.head_dim},
                            c.q.options().dtype(at::kFloat));
  c.params.dq_accum = dq_accum.data_ptr<float>();
  cuda::launch_sf_attention_bwd(c.params, c.q.scalar_type(), static_cast<cudaStream_t>(call.stream()));
  return {c.dq, c.dk, c.dv};
}

at::Tensor column_scores_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& lse,
                              const std::optional<at::Tensor>& cu_seqlens, int64_t max_seqlen, int64_t group_size,
                              int64_t num_sinks, c10::string_view shift, double softmax_scale) {
  cuda::CudaCall call(q);
  auto c = prepare_column_scores(q, k, lse, cu_seqlens, max_seqlen, group_size, num_sinks, shift, softmax_scale);
  if (c.empty) return c.out;
  cuda::launch_column_scores(c.params, c.q.scalar_type(), c.out.data_ptr<float>(),
                             static_cast<cudaStream_t>(call.stream()));
  return c.out;
}

}  // namespace sinklora
