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

// Column sums of the softmax of sf_attention_fwd (from its lse): [rows, Hkv] float32, summed over
// the query heads of each kv head. With the full pattern these are H2O's prefill scores.
at::Tensor sf_attention_column_scores(const at::Tensor& q, const at::Tensor& k, const at::Tensor& lse,
                                      const std::optional<at::Tensor>& cu_seqlens, int64_t max_seqlen,
                                      int64_t group_size, int64_t num_sinks, c10::string_view shift,
                                      double softmax_scale);

// Paged KV cache (SPEC §3). q [B, Hq, D]; caches [num_blocks, block_size, Hkv, D]; scores, when
// given, float32 [num_blocks, block_size, Hkv] gain each attended slot's probability (summed over
// the query heads of its kv head).
at::Tensor paged_decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                        const at::Tensor& block_tables, const at::Tensor& seq_lens, double softmax_scale,
                        const std::optional<at::Tensor>& scores);

// Writes k, v [T, Hkv, D] into physical slots [T, Hkv] (block * block_size + offset, -1 skips),
// with a fresh score (new_scores or 0) and the token's position when those caches are given.
void paged_write_kv_(const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_cache, const at::Tensor& v_cache,
                     const at::Tensor& slots, const std::optional<at::Tensor>& scores,
                     const std::optional<at::Tensor>& new_scores, const std::optional<at::Tensor>& positions,
                     const std::optional<at::Tensor>& token_positions);

// One eviction per (sequence, kv head); returns the logical slot evicted [B, Hkv] (-1: none).
at::Tensor h2o_evict(const at::Tensor& scores, const at::Tensor& positions, const at::Tensor& block_tables,
                     const at::Tensor& seq_lens, int64_t num_sinks, int64_t recent, c10::string_view policy);

// Host-side checks of the index tensors a CUDA call is given (block tables, slots, seq_lens,
// cu_seqlens) copy them to the host, a device sync. trust_tables(true) skips them in this thread
// (returns the previous setting); they are also skipped everywhere with SINKLORA_TRUST_TABLES=1 and
// while a CUDA graph is being captured. CPU calls are always checked.
bool trust_tables(bool enabled);
bool skip_device_checks(const at::Tensor& t);

}  // namespace sinklora
