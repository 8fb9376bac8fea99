// csrc/kernel_choice.h: the ops whose kernel can be asked for (kernel_for, docs/ops.md), by name.
#pragma once

#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <string>

namespace sinklora {

enum class KernelOp { kSfAttentionFwd, kSfAttentionBwd, kColumnScores, kPagedDecode, kPagedWrite, kSelectEvictions,
                      kMsaConv2dFwd, kMsaConv2dBwd };

inline KernelOp kernel_op(c10::string_view name) {
  if (name == "sf_attention_fwd") return KernelOp::kSfAttentionFwd;
  if (name == "sf_attention_bwd") return KernelOp::kSfAttentionBwd;
  if (name == "column_scores") return KernelOp::kColumnScores;
  if (name == "paged_decode") return KernelOp::kPagedDecode;
  if (name == "paged_write_") return KernelOp::kPagedWrite;
  if (name == "select_evictions") return KernelOp::kSelectEvictions;
  if (name == "msa_conv2d_fwd") return KernelOp::kMsaConv2dFwd;
  if (name == "msa_conv2d_bwd") return KernelOp::kMsaConv2dBwd;
  TORCH_CHECK_VALUE(false, "kernel_for: unknown op '", std::string(name),
                    "' (sf_attention_fwd, sf_attention_bwd, column_scores, paged_decode, paged_write_, "
                    "select_evictions, msa_conv2d_fwd, msa_conv2d_bwd)");
}

}  // namespace sinklora
