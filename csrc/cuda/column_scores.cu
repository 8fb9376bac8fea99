// csrc/cuda/column_scores.cu: column scores of the SF-Attn softmax on CUDA (the column_scores op,
// H2O prefill scores): the kernel choice (common/kernel_rule.h), the sink-split workspace and the
// launches of column_scores_kernels.cuh. `out` [total_rows, Hkv] arrives zeroed; every key of every
// sequence is written exactly once (plain stores), so the result is deterministic.
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <climits>

#include "column_scores_kernels.cuh"
#include "common/device_props.h"
#include "common/dispatch.h"
#include "launch.h"

namespace sinklora {
namespace cuda {
namespace {

// Partial sums of the split sink tiles, from the caching allocator (stream ordered).
class ColumnPartWorkspace {
 public:
  ColumnPartWorkspace(const SfAttentionParams& p, int block_n, cudaStream_t stream)
      : split_(plan_sink_split(p, block_n)) {
    if (split_.chunks <= 1) return;
    const size_t elems = size_t(p.batch) * p.num_heads_kv * split_.ns * block_n * split_.chunks;
    mem_ = c10::cuda::CUDACachingAllocator::raw_alloc_with_stream(elems * sizeof(float), stream);
  }
  ~ColumnPartWorkspace() {
    if (mem_ != nullptr) c10::cuda::CUDACachingAllocator::raw_delete(mem_);
  }
  ColumnPartWorkspace(const ColumnPartWorkspace&) = delete;
  ColumnPartWorkspace& operator=(const ColumnPartWorkspace&) = delete;
  const SinkSplit& split() const { return split_; }
  float* part() const { return static_cast<float*>(mem_); }
  int blocks_per_seq(int num_tiles) const { return num_tiles + split_.ns * (split_.chunks - 1); }

 private:
  SinkSplit split_;
  void* mem_ = nullptr;
};

template <typename K>
void launch_column_scores_kernel(const SfAttentionParams& p, K kernel, int block_n, size_t smem, float* out, cudaStream_t stream) {
  const int num_tiles = (p.seqlen + block_n - 1) / block_n;
  ColumnPartWorkspace ws(p, block_n, stream);
  const int64_t x = int64_t(p.batch) * ws.blocks_per_seq(num_tiles);
  TORCH_CHECK(x <= INT_MAX, "column_scores (CUDA): batch * tiles (", x, ") exceeds the grid limit");
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  const dim3 grid(static_cast<unsigned>(x), p.num_heads_kv);
  launch_kernel(kernel, grid, 128, smem, stream, p, num_tiles, ws.split(), out, ws.part());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (ws.split().chunks > 1) {
    const int64_t total = int64_t(p.batch) * p.num_heads_kv * ws.split().ns * block_n;
    const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((total + 255) / 256, int64_t(1) << 16));
    launch_kernel(column_scores_finish_kernel, blocks, 256, 0, stream, p, ws.split(), block_n, ws.part(), out);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <typename T, int D>
void run_column_scores_mma(const SfAttentionParams& p, float* out, cudaStream_t stream) {
  using Cfg = ColMmaCfg<T, D>;
  launch_column_scores_kernel(p, column_scores_mma_kernel<T, D>, Cfg::kBN, Cfg::kSmem, out, stream);
}

template <typename T>
void run_column_scores_generic(const SfAttentionParams& p, float* out, cudaStream_t stream) {
  const size_t smem = column_scores_generic_smem(p.head_dim);
  TORCH_CHECK(smem <= size_t(current_device_props().max_smem_optin), "column_scores (CUDA): head_dim ", p.head_dim,
              " needs ", smem, " bytes of shared memory per block, more than this device allows");
  launch_column_scores_kernel(p, column_scores_generic_kernel<T>, kColGenB, smem, out, stream);
}

}  // namespace

Kernel column_scores_kernel(const SfAttentionParams& p, c10::ScalarType dtype) {
  const bool fixed = p.cu_seqlens == nullptr;
  const bool layout_ok = aligned16(p.q) && aligned16(p.k) &&
                         strides_ok(8, p.q_row_stride, p.q_head_stride, fixed ? p.q_batch_stride : 0) &&
                         strides_ok(8, p.k_row_stride, p.k_head_stride, fixed ? p.k_batch_stride : 0);
  return choose_kernel(KernelOp::kColumnScores, dtype, p.head_dim, 1, layout_ok, current_device_props());
}

void launch_column_scores(const SfAttentionParams& p, c10::ScalarType dtype, float* out, cudaStream_t stream) {
  if (p.batch <= 0 || p.seqlen <= 0 || p.total_rows <= 0) return;
  TORCH_CHECK(p.num_heads_kv <= 65535, "column_scores (CUDA): at most 65535 kv heads, got ", p.num_heads_kv);
  constexpr const char* op = "column_scores (CUDA)";
  if (column_scores_kernel(p, dtype) == Kernel::kMma) {
    CUDA_HALF_SWITCH(dtype, T, op, [&] {
      SINKLORA_HEAD_DIM_SWITCH(p.head_dim, D, op, [&] { run_column_scores_mma<T, D>(p, out, stream); });
    });
  } else {
    CUDA_DTYPE_SWITCH(dtype, T, op, [&] { run_column_scores_generic<T>(p, out, stream); });
  }
}

}  // namespace cuda
}  // namespace sinklora
