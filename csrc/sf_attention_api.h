// csrc/sf_attention_api.h: the device-agnostic half of the SF-Attn ops (sf_attention_api.cpp):
// each prepare_* checks its arguments (docs/errors.md), allocates the outputs and fills the kernel
// parameters; the per-device entry points (csrc/cpu/, csrc/cuda/) then only run kernels.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "sf_attention.h"

namespace sinklora {

// The inputs (last dimension made contiguous) stay referenced for as long as the params point at
// them. `empty`: nothing to compute (the outputs are complete as allocated, params unset).
struct SfAttentionFwd {
  at::Tensor q, k, v, out, lse;  // out: q's shape; lse float32 [Hq, rows]
  SfAttentionParams params{};
  bool empty = true;
};

struct SfAttentionBwd {
  at::Tensor q, k, v, out, dout, dq, dk, dv, delta;  // delta: workspace float32 [Hq, rows]
  SfAttentionBwdParams params{};
  bool empty = true;
};

struct ColumnScores {
  at::Tensor q, k, out;  // out float32 [rows, Hkv], zeroed
  SfAttentionParams params{};
  bool empty = true;
};

SfAttentionFwd prepare_sf_attention_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                        const std::optional<at::Tensor>& cu_seqlens, int64_t max_seqlen,
                                        int64_t group_size, int64_t num_sinks, c10::string_view shift,
                                        double softmax_scale);

SfAttentionBwd prepare_sf_attention_bwd(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                                        const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                        const std::optional<at::Tensor>& cu_seqlens, int64_t max_seqlen,
                                        int64_t group_size, int64_t num_sinks, c10::string_view shift,
                                        double softmax_scale);

ColumnScores prepare_column_scores(const at::Tensor& q, const at::Tensor& k, const at::Tensor& lse,
                                   const std::optional<at::Tensor>& cu_seqlens, int64_t max_seqlen,
                                   int64_t group_size, int64_t num_sinks, c10::string_view shift,
                                   double softmax_scale);

}  // namespace sinklora
