// csrc/paged_kv_api.h: the device-agnostic half of the paged KV cache ops (paged_kv_api.cpp):
// argument checks (docs/errors.md), the validation of index tensors (once per step with a plan,
// docs/paged_kv.md), output allocation and the kernel parameters. The per-device entry points
// (csrc/cpu/, csrc/cuda/) call these, then run kernels.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "paged_kv.h"
#include "paged_plan.h"

namespace sinklora {

// `empty`: nothing to compute (outputs complete as allocated, params unset).
struct PagedDecode {
  at::Tensor q, out;  // q: last dimension made contiguous
  PagedDecodeParams params{};
  int plan_heads_q = 0, plan_splits = 0, plan_partition = 0;  // split sizes from the plan (0: none)
  bool empty = true;
};

struct PagedWrite {
  at::Tensor k, v;
  PagedWriteParams params{};
  bool empty = true;
};

struct SelectEvictions {
  at::Tensor victims;  // int32 [B, Hkv]
  EvictParams params{};
  bool empty = true;
};

PagedDecode prepare_paged_decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                 const at::Tensor& block_tables, const at::Tensor& seq_lens, double softmax_scale,
                                 const std::optional<at::Tensor>& scores, const std::optional<at::Tensor>& plan);

PagedWrite prepare_paged_write(const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_cache,
                               const at::Tensor& v_cache, const at::Tensor& slots,
                               const std::optional<at::Tensor>& scores, const std::optional<at::Tensor>& new_scores,
                               const std::optional<at::Tensor>& positions,
                               const std::optional<at::Tensor>& token_positions,
                               const std::optional<at::Tensor>& plan);

SelectEvictions prepare_select_evictions(const at::Tensor& scores, const at::Tensor& positions,
                                         const at::Tensor& block_tables, const at::Tensor& seq_lens,
                                         int64_t num_sinks, int64_t recent, c10::string_view policy,
                                         double score_decay, const std::optional<at::Tensor>& plan);

// Validates the given index tensors against the pool of k_cache (one host copy of them all) and
// returns the plan tensor (paged_plan.h) without split sizes; the CUDA entry point adds them.
at::Tensor prepare_paged_plan(const at::Tensor& k_cache, const std::optional<at::Tensor>& block_tables,
                              const std::optional<at::Tensor>& seq_lens, const std::optional<at::Tensor>& slots,
                              int64_t num_heads_q);

}  // namespace sinklora
