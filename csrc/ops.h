// Every op of sinklora_ext, as implemented in C++. Schemas live in torch_bindings.cpp.
#pragma once

#include <optional>
#include <string>
#include <tuple>

#include <torch/library.h>

namespace sinklora {

// q [B, N, Hq, D] (cu_seqlens absent) or [total, Hq, D] (cu_seqlens int32 [B + 1]).
// Returns out (q's shape, contiguous) and lse float32 [Hq, rows].
std::tuple<at::Tensor, at::Tensor> sf_attention_fwd(const at::Tensor& q, const at::Tensor& k,
                                                    const at::Tensor& v,
                                                    const std::optional<at::Tensor>& cu_seqlens,
                                                    int64_t max_seqlen, int64_t group_size,
                                                    int64_t num_sinks, c10::string_view shift,
                                                    double softmax_scale);

std::tuple<at::Tensor, at::Tensor, at::Tensor> sf_attention_bwd(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& cu_seqlens,
    int64_t max_seqlen, int64_t group_size, int64_t num_sinks, c10::string_view shift,
    double softmax_scale);

}  // namespace sinklora
