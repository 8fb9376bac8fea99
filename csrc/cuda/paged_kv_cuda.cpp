// csrc/cuda/paged_kv_cuda.cpp: the CUDA entry points of the paged KV cache ops (paged_decode,
// paged_write_, select_evictions, plan_paged): the device-agnostic checks and allocation
// (paged_kv_api.h), then the launchers of launch.h on the tensors' device and stream. Index tensors
// are validated on the host (a sync) unless a step plan validated them; during CUDA graph capture,
// where a sync is impossible, a plan is required.
#include <ATen/ATen.h>

#include "common/context.h"
#include "launch.h"
#include "ops.h"
#include "paged_kv_api.h"

namespace sinklora {
namespace {

void require_plan_when_capturing(const std::optional<at::Tensor>& plan, const char* op) {
  TORCH_CHECK_VALUE(plan.has_value() || !cuda::stream_is_capturing(), op,
                    ": a call captured in a CUDA graph needs a plan (sinklora_ext.plan_paged), made before the "
                    "capture: its index tensors cannot be checked on the host while capturing");
}

}  // namespace

at::Tensor paged_decode_cuda(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                             const at::Tensor& block_tables, const at::Tensor& seq_lens, double softmax_scale,
                             const std::optional<at::Tensor>& scores, const std::optional<at::Tensor>& plan) {
  cuda::CudaCall call(q);
  require_plan_when_capturing(plan, "paged_decode");
  auto c = prepare_paged_decode(q, k_cache, v_cache, block_tables, seq_lens, softmax_scale, scores, plan);
  if (c.empty) return c.out;
  cuda::poison(c.out);
  const cuda::DecodeSplit split =
      c.plan_heads_q != 0 ? cuda::DecodeSplit{c.plan_splits, c.plan_partition} : cuda::decode_split(c.params);
  auto workspace = at::empty({cuda::paged_decode_workspace_floats(c.params, split)}, c.q.options().dtype(at::kFloat));
  cuda::poison(workspace);
  cuda::launch_paged_decode(c.params, c.q.scalar_type(), split, workspace.data_ptr<float>(),
                            static_cast<cudaStream_t>(call.stream()));
  return c.out;
}

void paged_write_cuda(const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_cache, const at::Tensor& v_cache,
                      const at::Tensor& slots, const std::optional<at::Tensor>& scores,
                      const std::optional<at::Tensor>& new_scores, const std::optional<at::Tensor>& positions,
                      const std::optional<at::Tensor>& token_positions, const std::optional<at::Tensor>& plan) {
  cuda::CudaCall call(k);
  require_plan_when_capturing(plan, "paged_write_");
  auto c = prepare_paged_write(k, v, k_cache, v_cache, slots, scores, new_scores, positions, token_positions, plan);
  if (c.empty) return;
  cuda::launch_paged_write(c.params, c.k.scalar_type(), static_cast<cudaStream_t>(call.stream()));
}

at::Tensor select_evictions_cuda(const at::Tensor& scores, const at::Tensor& positions,
                                 const at::Tensor& block_tables, const at::Tensor& seq_lens, int64_t num_sinks,
                                 int64_t recent, c10::string_view policy, double score_decay,
                                 const std::optional<at::Tensor>& plan) {
  cuda::CudaCall call(scores);
  require_plan_when_capturing(plan, "select_evictions");
  auto c = prepare_select_evictions(scores, positions, block_tables, seq_lens, num_sinks, recent, policy,
                                    score_decay, plan);
  if (c.empty) return c.victims;
  cuda::poison(c.victims);
  cuda::launch_select_evictions(c.params, static_cast<cudaStream_t>(call.stream()));
  return c.victims;
}

// The plan of a step, with the split-KV sizes of its decode when the query heads are known.
at::Tensor plan_paged_cuda(const at::Tensor& k_cache, const std::optional<at::Tensor>& block_tables,
                           const std::optional<at::Tensor>& seq_lens, const std::optional<at::Tensor>& slots,
                           int64_t num_heads_q) {
  cuda::CudaCall call(k_cache);
  TORCH_CHECK_VALUE(!cuda::stream_is_capturing(), "plan_paged: make the plan before the CUDA graph capture");
  auto plan = prepare_paged_plan(k_cache, block_tables, seq_lens, slots, num_heads_q);
  int64_t* f = plan.data_ptr<int64_t>();
  if (f[kPlanBatch] > 0 && num_heads_q > 0) {
    PagedDecodeParams p{};
    p.batch = static_cast<int>(f[kPlanBatch]);
    p.num_heads_q = static_cast<int>(num_heads_q);
    p.num_heads_kv = static_cast<int>(k_cache.size(2));
    p.max_blocks_per_seq = static_cast<int>(f[kPlanMaxBlocks]);
    p.block_size = static_cast<int>(k_cache.size(1));
    const cuda::DecodeSplit split = cuda::decode_split(p);
    f[kPlanSplits] = split.splits;
    f[kPlanPartition] = split.partition;
  } else {
    f[kPlanHeadsQ] = 0;  // nothing to decode, or query heads unknown: the run sizes its splits
  }
  return plan;
}

}  // namespace sinklora
