// Launch of the tensor-core paged decode kernel (decode_mma_kernel in paged_decode_kernels.cuh):
// fp16/bf16, head dim 64 or 128, at most 16 query heads per kv head, sm_80+. A separate file from
// paged_decode.cu so that the two compile in parallel.
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>

#include "paged_decode_kernels.cuh"

namespace sinklora {
namespace sfcuda {

namespace {

template <typename T, int D, bool SCORES>
bool run_decode_mma(const PagedDecodeParams& p, const DecodePlan& plan, float* ws, cudaStream_t stream) {
  auto kernel = decode_mma_kernel<T, D, SCORES>;
  // The kernel body exists only when compiled for sm_80+ (a JIT from older PTX would be empty).
  cudaFuncAttributes attr{};
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, kernel));
  if (attr.ptxVersion < 80) return false;
  const size_t smem = decode_mma_smem(D, plan.group, plan.partition);
  if (smem > size_t(device_max_smem_optin())) return false;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  const int64_t blocks = int64_t(p.batch) * p.num_heads_kv * plan.splits;
  launch_kernel(kernel, static_cast<unsigned>(blocks), kDecodeThreads, smem, stream, p, plan, ws);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return true;
}

template <typename T, int D>
bool run_decode_mma_d(const PagedDecodeParams& p, const DecodePlan& plan, float* ws, cudaStream_t stream) {
  return p.scores != nullptr ? run_decode_mma<T, D, true>(p, plan, ws, stream)
                             : run_decode_mma<T, D, false>(p, plan, ws, stream);
}

}  // namespace

bool launch_decode_mma(const PagedDecodeParams& p, c10::ScalarType dtype, const DecodePlan& plan, float* ws,
                       cudaStream_t stream) {
  if (dtype != c10::ScalarType::Half && dtype != c10::ScalarType::BFloat16) return false;
  if (p.head_dim != 64 && p.head_dim != 128) return false;
  if (plan.group > 16) return false;
  // 16-byte cp.async of q rows and cache rows; 4-byte stores of out pairs.
  if (!aligned16(p.q) || !aligned16(p.k_cache) || !aligned16(p.v_cache) ||
      reinterpret_cast<uintptr_t>(p.out) % 4 != 0)
    return false;
  if (!strides_ok(8, p.q_batch_stride, p.q_head_stride, 0) ||
      !strides_ok(8, p.k.block_stride, p.k.slot_stride, p.k.head_stride) ||
      !strides_ok(8, p.v.block_stride, p.v.slot_stride, p.v.head_stride))
    return false;
  if (!device_has_sm80()) return false;
  const bool half = dtype == c10::ScalarType::Half;
  if (p.head_dim == 64) {
    return half ? run_decode_mma_d<__half, 64>(p, plan, ws, stream)
                : run_decode_mma_d<__nv_bfloat16, 64>(p, plan, ws, stream);
  }
  return half ? run_decode_mma_d<__half, 128>(p, plan, ws, stream)
              : run_decode_mma_d<__nv_bfloat16, 128>(p, plan, ws, stream);
}

}  // namespace sfcuda
}  // namespace sinklora
