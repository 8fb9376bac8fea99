// SF-Attn forward on CUDA: dispatch between the tensor-core and the generic kernel
// (sf_attention_fwd_kernels.cuh) and their launches.
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>

#include <climits>

#include "sf_attention_fwd_kernels.cuh"
#include "sf_attention_launch.h"

namespace sinklora {
namespace sfcuda {

// ---------------------------------------------------------------------------------------------
// Host side

bool device_has_sm80() {
  int dev = 0, major = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
  return major >= 8;
}

int device_max_smem_optin() {
  int dev = 0, bytes = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  return bytes;
}

namespace {

int num_blocks_x(int batch, int num_tiles) {
  const int64_t x = int64_t(batch) * num_tiles;
  TORCH_CHECK(x <= INT_MAX, "sf_attention (CUDA): batch * tiles (", x, ") exceeds the grid limit");
  return static_cast<int>(x);
}

template <typename T, int D>
bool run_fwd_mma(const SfAttentionParams& p, cudaStream_t stream) {
  using Cfg = FwdMmaCfg<T, D>;
  const int num_tiles = (p.seqlen + Cfg::kBM - 1) / Cfg::kBM;
  auto kernel = fwd_mma_kernel<T, D>;
  // The kernel body exists only when compiled for sm_80+ (a JIT from older PTX would be empty).
  cudaFuncAttributes attr{};
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, kernel));
  if (attr.ptxVersion < 80) return false;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(Cfg::kSmem)));
  const dim3 grid(num_blocks_x(p.batch, num_tiles), p.num_heads_q);
  launch_kernel(kernel, grid, Cfg::kThreads, Cfg::kSmem, stream, p, num_tiles);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return true;
}

template <typename T>
void run_fwd_generic(const SfAttentionParams& p, cudaStream_t stream) {
  const int num_tiles = (p.seqlen + kGenFwdBM - 1) / kGenFwdBM;
  const size_t smem = gen_fwd_smem(p.head_dim);
  TORCH_CHECK(smem <= size_t(device_max_smem_optin()), "sf_attention (CUDA): head_dim ", p.head_dim,
              " needs ", smem, " bytes of shared memory per block, more than this device allows");
  auto kernel = fwd_generic_kernel<T>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(smem)));
  const dim3 grid(num_blocks_x(p.batch, num_tiles), p.num_heads_q);
  launch_kernel(kernel, grid, 128, smem, stream, p, num_tiles);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

bool launch_fwd_mma(const SfAttentionParams& p, c10::ScalarType dtype, cudaStream_t stream) {
  if (dtype != c10::ScalarType::Half && dtype != c10::ScalarType::BFloat16) return false;
  if (p.head_dim != 64 && p.head_dim != 128) return false;
  if (!aligned16(p.q) || !aligned16(p.k) || !aligned16(p.v) || !aligned16(p.out)) return false;
  const bool fixed = p.cu_seqlens == nullptr;
  if (!strides_ok(8, p.q_row_stride, p.q_head_stride, fixed ? p.q_batch_stride : 0) ||
      !strides_ok(8, p.k_row_stride, p.k_head_stride, fixed ? p.k_batch_stride : 0) ||
      !strides_ok(8, p.v_row_stride, p.v_head_stride, fixed ? p.v_batch_stride : 0) ||
      !strides_ok(8, p.o_row_stride, p.o_head_stride, fixed ? p.o_batch_stride : 0))
    return false;
  if (!device_has_sm80()) return false;
  const bool half = dtype == c10::ScalarType::Half;
  if (p.head_dim == 64) {
    return half ? run_fwd_mma<__half, 64>(p, stream) : run_fwd_mma<__nv_bfloat16, 64>(p, stream);
  }
  return half ? run_fwd_mma<__half, 128>(p, stream) : run_fwd_mma<__nv_bfloat16, 128>(p, stream);
}

}  // namespace sfcuda

void sf_attention_fwd_cuda(const SfAttentionParams& p, c10::ScalarType dtype, void* stream_ptr) {
  if (p.batch <= 0 || p.seqlen <= 0 || p.total_rows <= 0) return;
  TORCH_CHECK(p.num_heads_q <= 65535, "sf_attention (CUDA): at most 65535 query heads, got ",
              p.num_heads_q);
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  if (sfcuda::launch_fwd_mma(p, dtype, stream)) return;
  switch (dtype) {
    case c10::ScalarType::Float:
      sfcuda::run_fwd_generic<float>(p, stream);
      break;
    case c10::ScalarType::Half:
      sfcuda::run_fwd_generic<__half>(p, stream);
      break;
    case c10::ScalarType::BFloat16:
      sfcuda::run_fwd_generic<__nv_bfloat16>(p, stream);
      break;
    default:
      TORCH_CHECK(false, "sf_attention (CUDA): unsupported dtype ", dtype);
  }
}

}  // namespace sinklora
