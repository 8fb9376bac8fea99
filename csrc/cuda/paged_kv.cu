// Paged KV cache writes and H2O eviction on CUDA: launches of paged_kv_kernels.cuh.
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <climits>

#include "paged_kv_kernels.cuh"
#include "paged_kv_launch.h"

namespace sinklora {
namespace sfcuda {
namespace {

template <typename T>
void run_write(const PagedWriteParams& p, cudaStream_t stream) {
  constexpr int VEC = 16 / sizeof(T);
  const bool vec = p.head_dim % VEC == 0 && aligned16(p.k) && aligned16(p.v) && aligned16(p.k_cache) &&
                   aligned16(p.v_cache) && p.k_row_stride % VEC == 0 && p.k_head_stride % VEC == 0 &&
                   p.v_row_stride % VEC == 0 && p.v_head_stride % VEC == 0 &&
                   strides_ok(VEC, p.kc.block_stride, p.kc.slot_stride, p.kc.head_stride) &&
                   strides_ok(VEC, p.vc.block_stride, p.vc.slot_stride, p.vc.head_stride);
  const int64_t items = int64_t(p.rows) * p.num_heads_kv;
  const int64_t blocks = std::min<int64_t>((items + kWriteThreads / 32 - 1) / (kWriteThreads / 32), int64_t(1) << 20);
  launch_kernel(paged_write_kernel<T>, static_cast<unsigned>(blocks), kWriteThreads, 0, stream, p, vec);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace
}  // namespace sfcuda

void paged_write_cuda(const PagedWriteParams& p, c10::ScalarType dtype, void* stream_ptr) {
  if (p.rows <= 0 || p.num_heads_kv <= 0) return;
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  switch (dtype) {
    case c10::ScalarType::Float:
      sfcuda::run_write<float>(p, stream);
      break;
    case c10::ScalarType::Half:
      sfcuda::run_write<__half>(p, stream);
      break;
    case c10::ScalarType::BFloat16:
      sfcuda::run_write<__nv_bfloat16>(p, stream);
      break;
    default:
      TORCH_CHECK(false, "paged_write_kv_ (CUDA): unsupported dtype ", dtype);
  }
}

void h2o_evict_cuda(const EvictParams& p, void* stream_ptr) {
  if (p.batch <= 0 || p.num_heads_kv <= 0) return;
  const int64_t items = int64_t(p.batch) * p.num_heads_kv;
  const int64_t blocks = (items + sfcuda::kEvictThreads / 32 - 1) / (sfcuda::kEvictThreads / 32);
  TORCH_CHECK(blocks <= INT_MAX, "h2o_evict (CUDA): batch * num_kv_heads (", items, ") exceeds the grid limit");
  sfcuda::launch_kernel(sfcuda::h2o_evict_kernel, static_cast<unsigned>(blocks), sfcuda::kEvictThreads, 0, static_cast<cudaStream_t>(stream_ptr), p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace sinklora
