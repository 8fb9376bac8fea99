// csrc/ops.h: the per-device entry points of every op, declared once for each device. Schemas are in
// torch_bindings.cpp (and docs/ops.md); each entry point calls the device-agnostic checks of
// sf_attention_api.h / paged_kv_api.h, then runs its device's kernels. *_cpu live in csrc/cpu/ and
// are registered under the CPU key (cpu/torch_bindings_cpu.cpp); *_cuda live in csrc/cuda/ and are
// registered under the CUDA key (cuda/torch_bindings_cuda.cpp, compiled only in CUDA builds; the
// emulator build registers them under its CPU key).
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>

#define SINKLORA_DECLARE_OPS(DEV)                                                                                   \
  std::tuple<at::Tensor, at::Tensor> sf_attention_fwd_##DEV(                                                       \
      const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& cu_seqlens,  \
      int64_t max_seqlen, int64_t group_size, int64_t num_sinks, c10::string_view shift, double softmax_scale);    \
  std::tuple<at::Tensor, at::Tensor, at::Tensor> sf_attention_bwd_##DEV(                                           \
      const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out, \
      const at::Tensor& lse, const std::optional<at::Tensor>& cu_seqlens, int64_t max_seqlen, int64_t group_size,  \
      int64_t num_sinks, c10::string_view shift, double softmax_scale);                                            \
  at::Tensor column_scores_##DEV(const at::Tensor& q, const at::Tensor& k, const at::Tensor& lse,                  \
                                 const std::optional<at::Tensor>& cu_seqlens, int64_t max_seqlen,                  \
                                 int64_t group_size, int64_t num_sinks, c10::string_view shift,                    \
                                 double softmax_scale);                                                            \
  at::Tensor paged_decode_##DEV(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,         \
                                const at::Tensor& block_tables, const at::Tensor& seq_lens, double softmax_scale,  \
                                const std::optional<at::Tensor>& scores, const std::optional<at::Tensor>& plan);   \
  void paged_write_##DEV(const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_cache,                      \
                         const at::Tensor& v_cache, const at::Tensor& slots, const std::optional<at::Tensor>& scores, \
                         const std::optional<at::Tensor>& new_scores, const std::optional<at::Tensor>& positions,  \
                         const std::optional<at::Tensor>& token_positions, const std::optional<at::Tensor>& plan); \
  at::Tensor select_evictions_##DEV(const at::Tensor& scores, const at::Tensor& positions,                         \
                                    const at::Tensor& block_tables, const at::Tensor& seq_lens, int64_t num_sinks, \
                                    int64_t recent, c10::string_view policy, double score_decay,                  \
                                    const std::optional<at::Tensor>& plan);                                          \
  at::Tensor plan_paged_##DEV(const at::Tensor& k_cache, const std::optional<at::Tensor>& block_tables,            \
                              const std::optional<at::Tensor>& seq_lens, const std::optional<at::Tensor>& slots,   \
                              int64_t num_heads_q);                                                                \
  std::tuple<at::Tensor, at::Tensor> msa_conv2d_fwd_##DEV(                                                         \
      const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, c10::IntArrayRef kernel_size,                 \
      c10::IntArrayRef dilation, c10::string_view padding, at::OptionalIntArrayRef kv_shift, double softmax_scale); \
  std::tuple<at::Tensor, at::Tensor, at::Tensor> msa_conv2d_bwd_##DEV(                                             \
      const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out, \
      const at::Tensor& lse, c10::IntArrayRef kernel_size, c10::IntArrayRef dilation, c10::string_view padding,    \
      at::OptionalIntArrayRef kv_shift, double softmax_scale);                                                     \
  std::string kernel_for_##DEV(const at::Tensor& like, c10::string_view op, int64_t head_dim, int64_t heads_per_kv);

// m.impl of every op with the entry points of DEV.
#define SINKLORA_REGISTER_OPS(m, DEV)                          \
  do {                                                         \
    m.impl("sf_attention_fwd", &sinklora::sf_attention_fwd_##DEV); \
    m.impl("sf_attention_bwd", &sinklora::sf_attention_bwd_##DEV); \
    m.impl("column_scores", &sinklora::column_scores_##DEV);   \
    m.impl("paged_decode", &sinklora::paged_decode_##DEV);     \
    m.impl("paged_write_", &sinklora::paged_write_##DEV);      \
    m.impl("select_evictions", &sinklora::select_evictions_##DEV); \
    m.impl("plan_paged", &sinklora::plan_paged_##DEV);         \
    m.impl("msa_conv2d_fwd", &sinklora::msa_conv2d_fwd_##DEV); \
    m.impl("msa_conv2d_bwd", &sinklora::msa_conv2d_bwd_##DEV); \
    m.impl("kernel_for", &sinklora::kernel_for_##DEV);         \
  } while (0)

namespace sinklora {

SINKLORA_DECLARE_OPS(cpu)
SINKLORA_DECLARE_OPS(cuda)

}  // namespace sinklora
