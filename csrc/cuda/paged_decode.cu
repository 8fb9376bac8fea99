// csrc/cuda/paged_decode.cu: paged decode on CUDA (docs/paged_kv.md): the kernel choice
// (common/kernel_rule.h), the split-KV sizes (decode_split, made once per step by plan_paged) and
// the launches of the generic and merge kernels (paged_decode_kernels.cuh; the tensor-core kernel
// is launched from paged_decode_mma.cu). No host synchronisation and no read of seq_lens on the
// host: a call can be captured in a CUDA graph and replayed with other lengths (up to the table's
// capacity).
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>

#include <climits>

#include "common/device_props.h"
#include "common/dispatch.h"
#include "launch.h"
#include "paged_decode_kernels.cuh"

namespace sinklora {
namespace cuda {
namespace {

template <typename T, int DC, bool SCORES>
void run_decode_generic(const PagedDecodeParams& p, const DecodePlan& plan, float* ws, cudaStream_t stream) {
  constexpr int VEC = 16 / sizeof(T);
  const bool vec = p.head_dim % VEC == 0 && aligned16(p.k_cache) && aligned16(p.v_cache) &&
                   strides_ok(VEC, p.k.block_stride, p.k.slot_stride, p.k.head_stride) &&
                   strides_ok(VEC, p.v.block_stride, p.v.slot_stride, p.v.head_stride);
  const size_t smem = decode_generic_smem(p.head_dim, DC, plan.group, plan.partition);
  TORCH_CHECK(smem <= size_t(current_device_props().max_smem_optin), "paged_decode (CUDA): ", plan.group,
              " query heads per kv head with head_dim ", p.head_dim, " need ", smem,
              " bytes of shared memory per block, more than this device allows");
  auto kernel = decode_generic_kernel<T, DC, SCORES>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  const int64_t blocks = int64_t(p.batch) * p.num_heads_kv * plan.splits;
  launch_kernel(kernel, static_cast<unsigned>(blocks), kDecodeThreads, smem, stream, p, plan, ws, vec);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void run_decode(const PagedDecodeParams& p, c10::ScalarType dtype, const DecodePlan& plan, float* ws,
                cudaStream_t stream) {
  if (paged_decode_kernel(p, dtype) == Kernel::kMma) {
    launch_decode_mma(p, dtype, plan, ws, stream);
  } else {
    SINKLORA_BOOL_SWITCH(p.scores != nullptr, SCORES, [&] {
      // fp32 gets head-dim specialisations (fp16/bf16 at 64 and 128 take the tensor-core kernel).
      if (std::is_same_v<T, float> && (p.head_dim == 64 || p.head_dim == 128)) {
        SINKLORA_HEAD_DIM_SWITCH(p.head_dim, D, "paged_decode (CUDA)",
                                 [&] { run_decode_generic<T, D, SCORES>(p, plan, ws, stream); });
      } else {
        run_decode_generic<T, 0, SCORES>(p, plan, ws, stream);
      }
    });
  }
  if (plan.splits > 1) {
    const int64_t blocks = int64_t(p.batch) * p.num_heads_kv * plan.splits;
    const size_t smem = sizeof(float) * 3 * size_t(plan.group);
    TORCH_CHECK(smem <= 48 * 1024, "paged_decode (CUDA): too many query heads per kv head (", plan.group, ")");
    launch_kernel(decode_merge_kernel<T>, static_cast<unsigned>(blocks), kDecodeThreads, smem, stream, p, plan, ws);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace

Kernel paged_decode_kernel(const PagedDecodeParams& p, c10::ScalarType dtype) {
  // 16-byte cp.async of q rows and cache rows; 4-byte stores of out pairs.
  const bool layout_ok = aligned16(p.q) && aligned16(p.k_cache) && aligned16(p.v_cache) &&
                         reinterpret_cast<uintptr_t>(p.out) % 4 == 0 &&
                         strides_ok(8, p.q_batch_stride, p.q_head_stride, 0) &&
                         strides_ok(8, p.k.block_stride, p.k.slot_stride, p.k.head_stride) &&
                         strides_ok(8, p.v.block_stride, p.v.slot_stride, p.v.head_stride);
  return choose_kernel(KernelOp::kPagedDecode, dtype, p.head_dim, p.num_heads_q / p.num_heads_kv, layout_ok,
                       current_device_props());
}

// S splits of P slots (P a multiple of the tile): enough blocks for about two per SM, and the
// logits of a split in shared memory (G * P floats <= 32 KiB); the splits of short sequences exit
// early.
DecodeSplit decode_split(const PagedDecodeParams& p) {
  const int64_t G = p.num_heads_q / p.num_heads_kv;
  const int64_t max_len = int64_t(p.max_blocks_per_seq) * p.block_size;
  const int64_t bh = std::max<int64_t>(1, int64_t(p.batch) * p.num_heads_kv);
  const int64_t tiles = std::max<int64_t>(1, (max_len + kDecodeTile - 1) / kDecodeTile);
  const int64_t cap = std::clamp<int64_t>(8192 / G / kDecodeTile * kDecodeTile, kDecodeTile, kDecodeMaxPartition);
  const int64_t target = 2 * int64_t(std::max(current_device_props().sm_count, 1));
  const int64_t s_occ = bh >= target ? 1 : (target + bh - 1) / bh;
  const int64_t s_mem = (max_len + cap - 1) / cap;
  int64_t s = std::min(std::max({s_occ, s_mem, int64_t(1)}), tiles);
  const int64_t per = (max_len + s - 1) / s;
  const int64_t P = std::max<int64_t>(kDecodeTile, (per + kDecodeTile - 1) / kDecodeTile * kDecodeTile);
  s = std::max<int64_t>(1, (max_len + P - 1) / P);
  return {static_cast<int>(s), static_cast<int>(P)};
}

// Workspace (fp32) of the split-KV path; 0 when one split per (sequence, kv head) suffices.
// With S = splits, P = slots per split, G = Hq / Hkv:
//   acc [B * Hkv][S][G][D]  unnormalised P V of each split
//   ml  [B * Hkv][S][G][2]  (max logit in log2 units, sum of 2^(logit - max)) of each split
//   e   [B * Hkv][S][G][P]  2^(logit - split max) of every slot, only when scores are given; the
//                           merge kernel rescales it by the global log-sum-exp into the scores
// Only splits that hold slots write their part, and the merge reads only those.
int64_t paged_decode_workspace_floats(const PagedDecodeParams& p, DecodeSplit split) {
  if (p.batch <= 0 || p.num_heads_kv <= 0) return 0;
  return make_decode_plan(p, split.splits, split.partition).total;
}

void launch_paged_decode(const PagedDecodeParams& p, c10::ScalarType dtype, DecodeSplit split, float* workspace,
                         cudaStream_t stream) {
  if (p.batch <= 0 || p.num_heads_kv <= 0) return;
  const DecodePlan plan = make_decode_plan(p, split.splits, split.partition);
  TORCH_CHECK(plan.splits == 1 || workspace != nullptr, "paged_decode (CUDA): a workspace of ", plan.total,
              " floats is required (paged_decode_workspace_floats)");
  const int64_t blocks = int64_t(p.batch) * p.num_heads_kv * plan.splits;
  TORCH_CHECK(blocks <= INT_MAX, "paged_decode (CUDA): batch * num_kv_heads * splits (", blocks,
              ") exceeds the grid limit");
  CUDA_DTYPE_SWITCH(dtype, T, "paged_decode (CUDA)", [&] { run_decode<T>(p, dtype, plan, workspace, stream); });
}

}  // namespace cuda
}  // namespace sinklora
