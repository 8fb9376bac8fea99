// Paged decode on CUDA (SPEC §3): the entry points, the split plan and the launches of the
// generic and merge kernels (paged_decode_kernels.cuh; the tensor-core kernel is launched from
// paged_decode_mma.cu). No host synchronisation and no read of seq_lens on the host: a call can
// be captured in a CUDA graph and replayed with other lengths (up to the table's capacity).
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>

#include <climits>

#include "paged_decode_kernels.cuh"
#include "paged_kv_launch.h"

namespace sinklora {
namespace sfcuda {
namespace {

int device_sm_count() {
  int dev = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  return sms;
}

template <typename T, int DC, bool SCORES>
void run_decode_generic(const PagedDecodeParams& p, const DecodePlan& plan, float* ws, cudaStream_t stream) {
  constexpr int VEC = 16 / sizeof(T);
  const bool vec = p.head_dim % VEC == 0 && aligned16(p.k_cache) && aligned16(p.v_cache) &&
                   strides_ok(VEC, p.k.block_stride, p.k.slot_stride, p.k.head_stride) &&
                   strides_ok(VEC, p.v.block_stride, p.v.slot_stride, p.v.head_stride);
  const size_t smem = decode_generic_smem(p.head_dim, DC, plan.group, plan.partition);
  TORCH_CHECK(smem <= size_t(device_max_smem_optin()), "paged_decode (CUDA): ", plan.group,
              " query heads per kv head with head_dim ", p.head_dim, " need ", smem,
              " bytes of shared memory per block, more than this device allows");
  auto kernel = decode_generic_kernel<T, DC, SCORES>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  const int64_t blocks = int64_t(p.batch) * p.num_heads_kv * plan.splits;
  launch_kernel(kernel, static_cast<unsigned>(blocks), kDecodeThreads, smem, stream, p, plan, ws, vec);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, bool SCORES>
void run_decode_generic_d(const PagedDecodeParams& p, const DecodePlan& plan, float* ws, cudaStream_t stream) {
  // fp32 gets head-dim specialisations (fp16/bf16 at 64 and 128 take the tensor-core kernel).
  if constexpr (std::is_same_v<T, float>) {
    if (p.head_dim == 64) return run_decode_generic<T, 64, SCORES>(p, plan, ws, stream);
    if (p.head_dim == 128) return run_decode_generic<T, 128, SCORES>(p, plan, ws, stream);
  }
  run_decode_generic<T, 0, SCORES>(p, plan, ws, stream);
}

template <typename T>
void run_decode(const PagedDecodeParams& p, c10::ScalarType dtype, const DecodePlan& plan, float* ws,
                cudaStream_t stream) {
  if (!launch_decode_mma(p, dtype, plan, ws, stream)) {
    if (p.scores != nullptr) {
      run_decode_generic_d<T, true>(p, plan, ws, stream);
    } else {
      run_decode_generic_d<T, false>(p, plan, ws, stream);
    }
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
}  // namespace sfcuda

// Workspace (fp32) of the split-KV path; 0 when one split per (sequence, kv head) suffices.
// With S = splits, P = slots per split, G = Hq / Hkv (make_decode_plan; S and P depend only on
// max_blocks_per_seq * block_size, batch * Hkv, G and the SM count, never on seq_lens):
//   acc [B * Hkv][S][G][D]  unnormalised P V of each split
//   ml  [B * Hkv][S][G][2]  (max logit in log2 units, sum of 2^(logit - max)) of each split
//   e   [B * Hkv][S][G][P]  2^(logit - split max) of every slot, only when scores are given; the
//                           merge kernel rescales it by the global log-sum-exp into the scores
// Only splits that hold slots write their part, and the merge reads only those.
int64_t paged_decode_workspace_floats(const PagedDecodeParams& p) {
  if (p.batch <= 0 || p.num_heads_kv <= 0) return 0;
  return sfcuda::make_decode_plan(p, sfcuda::device_sm_count()).total;
}

void paged_decode_cuda(const PagedDecodeParams& p, c10::ScalarType dtype, float* workspace, void* stream_ptr) {
  if (p.batch <= 0 || p.num_heads_kv <= 0) return;
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  const sfcuda::DecodePlan plan = sfcuda::make_decode_plan(p, sfcuda::device_sm_count());
  TORCH_CHECK(plan.splits == 1 || workspace != nullptr, "paged_decode (CUDA): a workspace of ", plan.total,
              " floats is required (paged_decode_workspace_floats)");
  const int64_t blocks = int64_t(p.batch) * p.num_heads_kv * plan.splits;
  TORCH_CHECK(blocks <= INT_MAX, "paged_decode (CUDA): batch * num_kv_heads * splits (", blocks,
              ") exceeds the grid limit");
  switch (dtype) {
    case c10::ScalarType::Float:
      sfcuda::run_decode<float>(p, dtype, plan, workspace, stream);
      break;
    case c10::ScalarType::Half:
      sfcuda::run_decode<__half>(p, dtype, plan, workspace, stream);
      break;
    case c10::ScalarType::BFloat16:
      sfcuda::run_decode<__nv_bfloat16>(p, dtype, plan, workspace, stream);
      break;
    default:
      TORCH_CHECK(false, "paged_decode (CUDA): unsupported dtype ", dtype);
  }
}

}  // namespace sinklora
