// csrc/cuda/paged_kv.cu: paged KV cache writes (paged_write_) and the choice of evictions
// (select_evictions) on CUDA: launches of paged_kv_kernels.cuh.
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <climits>

#include "common/dispatch.h"
#include "launch.h"
#include "paged_kv_kernels.cuh"

namespace sinklora {
namespace cuda {
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

void launch_paged_write(const PagedWriteParams& p, c10::ScalarType dtype, cudaStream_t stream) {
  if (p.rows <= 0 || p.num_heads_kv <= 0) return;
  CUDA_DTYPE_SWITCH(dtype, T, "paged_write_ (CUDA)", [&] { run_write<T>(p, stream); });
}

void launch_select_evictions(const EvictParams& p, cudaStream_t stream) {
  if (p.batch <= 0 || p.num_heads_kv <= 0) return;
  const int64_t items = int64_t(p.batch) * p.num_heads_kv;
  const int64_t blocks = (items + kEvictThreads / 32 - 1) / (kEvictThreads / 32);
  TORCH_CHECK(blocks <= INT_MAX, "select_evictions (CUDA): batch * num_kv_heads (", items,
              ") exceeds the grid limit");
  launch_kernel(select_evictions_kernel, static_cast<unsigned>(blocks), kEvictThreads, 0, stream, p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda
}  // namespace sinklora
