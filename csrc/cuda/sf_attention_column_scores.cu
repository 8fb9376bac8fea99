// Column scores of the SF-Attn softmax on CUDA (H2O prefill scores): dispatch between the
// tensor-core and the generic kernel (sf_attention_column_scores.cuh), the sink-split workspace
// and the launches. `out` [total_rows, Hkv] arrives zeroed; every key of every sequence is
// written exactly once (plain stores), so the result is deterministic.
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <climits>

#include "sf_attention_column_scores.cuh"
#include "sf_attention_launch.h"

namespace sinklora {
namespace sfcuda {
namespace {

// Partial sums of the split sink tiles, from the caching allocator (stream ordered).
class ColPartWorkspace {
 public:
  ColPartWorkspace(const SfAttentionParams& p, int block_n, cudaStream_t stream)
      : split_(plan_sink_split(p, block_n)) {
    if (split_.chunks <= 1) return;
    const size_t elems = size_t(p.batch) * p.num_heads_kv * split_.ns * block_n * split_.chunks;
    mem_ = c10::cuda::CUDACachingAllocator::raw_alloc_with_stream(elems * sizeof(float), stream);
  }
  ~ColPartWorkspace() {
    if (mem_ != nullptr) c10::cuda::CUDACachingAllocator::raw_delete(mem_);
  }
  ColPartWorkspace(const ColPartWorkspace&) = delete;
  ColPartWorkspace& operator=(const ColPartWorkspace&) = delete;
  const SinkSplit& split() const { return split_; }
  float* part() const { return static_cast<float*>(mem_); }
  int blocks_per_seq(int num_tiles) const { return num_tiles + split_.ns * (split_.chunks - 1); }

 private:
  SinkSplit split_;
  void* mem_ = nullptr;
};

template <typename K>
void launch_colscores(const SfAttentionParams& p, K kernel, int block_n, size_t smem, float* out, cudaStream_t stream) {
  const int num_tiles = (p.seqlen + block_n - 1) / block_n;
  ColPartWorkspace ws(p, block_n, stream);
  const int64_t x = int64_t(p.batch) * ws.blocks_per_seq(num_tiles);
  TORCH_CHECK(x <= INT_MAX, "sf_attention_column_scores (CUDA): batch * tiles (", x, ") exceeds the grid limit");
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  const dim3 grid(static_cast<unsigned>(x), p.num_heads_kv);
  launch_kernel(kernel, grid, 128, smem, stream, p, num_tiles, ws.split(), out, ws.part());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (ws.split().chunks > 1) {
    const int64_t total = int64_t(p.batch) * p.num_heads_kv * ws.split().ns * block_n;
    const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((total + 255) / 256, int64_t(1) << 16));
    launch_kernel(colscores_finish_kernel, blocks, 256, 0, stream, p, ws.split(), block_n, ws.part(), out);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <typename T, int D>
bool run_colscores_mma(const SfAttentionParams& p, float* out, cudaStream_t stream) {
  using Cfg = ColMmaCfg<T, D>;
  auto kernel = colscores_mma_kernel<T, D>;
  // The kernel body exists only when compiled for sm_80+ (a JIT from older PTX would be empty).
  cudaFuncAttributes attr{};
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, kernel));
  if (attr.ptxVersion < 80) return false;
  launch_colscores(p, kernel, Cfg::kBN, Cfg::kSmem, out, stream);
  return true;
}

bool launch_colscores_mma(const SfAttentionParams& p, c10::ScalarType dtype, float* out, cudaStream_t stream) {
  if (dtype != c10::ScalarType::Half && dtype != c10::ScalarType::BFloat16) return false;
  if (p.head_dim != 64 && p.head_dim != 128) return false;
  if (!aligned16(p.q) || !aligned16(p.k)) return false;
  const bool fixed = p.cu_seqlens == nullptr;
  if (!strides_ok(8, p.q_row_stride, p.q_head_stride, fixed ? p.q_batch_stride : 0) ||
      !strides_ok(8, p.k_row_stride, p.k_head_stride, fixed ? p.k_batch_stride : 0))
    return false;
  if (!device_has_sm80()) return false;
  const bool half = dtype == c10::ScalarType::Half;
  if (p.head_dim == 64) {
    return half ? run_colscores_mma<__half, 64>(p, out, stream) : run_colscores_mma<__nv_bfloat16, 64>(p, out, stream);
  }
  return half ? run_colscores_mma<__half, 128>(p, out, stream) : run_colscores_mma<__nv_bfloat16, 128>(p, out, stream);
}

template <typename T>
void run_colscores_generic(const SfAttentionParams& p, float* out, cudaStream_t stream) {
  const size_t smem = colscores_generic_smem(p.head_dim);
  TORCH_CHECK(smem <= size_t(device_max_smem_optin()), "sf_attention_column_scores (CUDA): head_dim ", p.head_dim,
              " needs ", smem, " bytes of shared memory per block, more than this device allows");
  launch_colscores(p, colscores_generic_kernel<T>, kColGenB, smem, out, stream);
}

}  // namespace
}  // namespace sfcuda

void sf_attention_column_scores_cuda(const SfAttentionParams& p, c10::ScalarType dtype, float* out, void* stream_ptr) {
  if (p.batch <= 0 || p.seqlen <= 0 || p.total_rows <= 0) return;
  TORCH_CHECK(p.num_heads_kv <= 65535, "sf_attention_column_scores (CUDA): at most 65535 kv heads, got ",
              p.num_heads_kv);
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  if (sfcuda::launch_colscores_mma(p, dtype, out, stream)) return;
  switch (dtype) {
    case c10::ScalarType::Float:
      sfcuda::run_colscores_generic<float>(p, out, stream);
      break;
    case c10::ScalarType::Half:
      sfcuda::run_colscores_generic<__half>(p, out, stream);
      break;
    case c10::ScalarType::BFloat16:
      sfcuda::run_colscores_generic<__nv_bfloat16>(p, out, stream);
      break;
    default:
      TORCH_CHECK(false, "sf_attention_column_scores (CUDA): unsupported dtype ", dtype);
  }
}

}  // namespace sinklora
