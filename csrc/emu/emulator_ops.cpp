// Ops of the emulator build beyond the project's own: its configuration and counters, its
// fragment-layout tables, and small kernels that exercise each PTX emulation and each fault the
// tracker must catch (the tests run the faulty and the correct variant of each).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <string>

#include "../cuda/common/device.cuh"
#include "../cuda/common/device_props.h"

namespace sinklora_emu {
void mma_a_coord(int lane, int i, int& row, int& col);
void mma_b_coord(int lane, int i, int& row, int& col);
void mma_c_coord(int lane, int i, int& row, int& col);
void ldmatrix_source(int lane, int r, int h, bool trans, int& row_lane, int& element);
std::vector<int64_t> stats(bool reset);
std::vector<std::pair<std::string, int64_t>> kernel_launches();
}  // namespace sinklora_emu

namespace sinklora {
namespace cuda {
namespace {

// ---------------------------------------------------------------------------------------------
// PTX probes (one warp)

template <typename T>
__global__ void mma_probe_kernel(const uint32_t* a, const uint32_t* b, const float* c, float* d) {
  const int lane = threadIdx.x;
  uint32_t af[4];
  float acc[4];
  for (int i = 0; i < 4; ++i) af[i] = a[lane * 4 + i];
  for (int i = 0; i < 4; ++i) acc[i] = c[lane * 4 + i];
  mma16816<T>(acc, af, b[lane * 2], b[lane * 2 + 1]);
  for (int i = 0; i < 4; ++i) d[lane * 4 + i] = acc[i];
}

// Rows [32][8] of 16-bit values copied to shared memory; lane l gives the address of row l.
__global__ void ldmatrix_probe_kernel(const uint4* rows, uint32_t* out, bool trans) {
  uint4* s = dynamic_smem<uint4>();
  const int lane = threadIdx.x;
  s[lane] = rows[lane];
  __syncwarp();
  uint32_t r[4];
  if (trans) {
    ldsm_x4_trans(r, smem_u32(s + lane));
  } else {
    ldsm_x4(r, smem_u32(s + lane));
  }
  for (int i = 0; i < 4; ++i) out[lane * 4 + i] = r[i];
}

// 64 threads copy 64 rows of 16 bytes with cp.async in two commit groups; the second group is
// still in flight at the first wait.
__global__ void cp_async_probe_kernel(const uint4* src, uint4* dst) {
  uint4* s = dynamic_smem<uint4>();
  const int t = threadIdx.x;
  cp_async_16(s + t, src + t, true);
  cp_async_commit();
  cp_async_16(s + 64 + t, src + 64 + t, t % 2 == 0);  // odd rows zero-filled
  cp_async_commit();
  cp_async_wait_group<1>();
  __syncthreads();
  dst[t] = s[63 - t];
  cp_async_wait_group<0>();
  __syncthreads();
  dst[64 + t] = s[64 + 63 - t];
}

__global__ void shfl_probe_kernel(const float* in, float* out) {
  const int lane = threadIdx.x;
  const float v = in[lane];
  out[lane] = __shfl_xor_sync(0xffffffffu, v, 5);
  out[32 + lane] = __shfl_sync(0xffffffffu, v, (lane * 7) % 32);
}

// ---------------------------------------------------------------------------------------------
// Fault cases: `faulty` plants the bug, otherwise the kernel is correct.

__global__ void missing_barrier_kernel(float* out, bool faulty) {
  float* s = dynamic_smem<float>();
  const int t = threadIdx.x;
  s[t] = float(t);
  if (!faulty) __syncthreads();
  out[t] = s[(t + 32) % 64];  // another warp's element
}

__global__ void missing_barrier_before_overwrite_kernel(float* out, bool faulty) {
  float* s = dynamic_smem<float>();
  const int t = threadIdx.x;
  s[t] = float(t);
  __syncthreads();
  const float x = s[63 - t];
  if (!faulty) __syncthreads();
  s[t] = x * 2.f;  // overwrites what another thread may not have read yet
  __syncthreads();
  out[t] = s[t];
}

__global__ void uninitialised_smem_kernel(float* out, bool faulty) {
  float* s = dynamic_smem<float>();
  const int t = threadIdx.x;
  if (!faulty || t != 5) s[t] = float(t);
  __syncthreads();
  out[t] = s[63 - t];
}

__global__ void cp_async_no_wait_kernel(const uint4* src, uint4* out, bool faulty) {
  uint4* s = dynamic_smem<uint4>();
  const int t = threadIdx.x;
  cp_async_16(s + t, src + t, true);
  cp_async_commit();
  if (!faulty) cp_async_wait_all();
  __syncthreads();
  out[t] = s[63 - t];
}

__global__ void smem_out_of_bounds_kernel(float* out, bool faulty) {
  float* s = dynamic_smem<float>();
  const int t = threadIdx.x;
  s[t] = 1.f;
  __syncthreads();
  out[t] = s[faulty ? t + 1 : t];  // one past the end for the last thread
}

__global__ void blocks_overlap_kernel(float* out, bool faulty) {
  const int i = blockIdx.x * (faulty ? 63 : 64) + threadIdx.x;  // off by one: blocks share an element
  out[i] = float(i);
}

__global__ void divergent_barrier_kernel(float* out, bool faulty) {
  const int t = threadIdx.x;
  if (faulty && t < 32) {
    out[t] = 1.f;
    __syncthreads();
  } else {
    __syncthreads();
    out[t] = 2.f;
  }
}

__global__ void divergent_shuffle_kernel(float* out, bool faulty) {
  const int t = threadIdx.x;
  float v = float(t);
  if (!faulty || t % 2 == 0) v = __shfl_xor_sync(0xffffffffu, v, 1);
  out[t] = v;
}

__global__ void atomic_then_plain_kernel(float* out, bool faulty) {
  atomicAdd(out, 1.f);
  if (faulty && threadIdx.x == 0) out[0] = 0.f;  // a plain store racing other blocks' atomics
}

}  // namespace
}  // namespace cuda
}  // namespace sinklora

namespace {

using namespace sinklora::cuda;

void check_probe(const at::Tensor& t, at::ScalarType dtype, int64_t numel, const char* name) {
  TORCH_CHECK_VALUE(t.is_cpu() && t.scalar_type() == dtype && t.is_contiguous() && t.numel() == numel,
                    "emulator probe: ", name, " must be a contiguous CPU ", dtype, " tensor of ", numel, " elements");
}

// d [32, 4] = mma(a [32, 4] int32 fragments, b [32, 2], c [32, 4] fp32) for one warp.
at::Tensor mma_probe(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c, bool bf16) {
  check_probe(a, at::kInt, 128, "a");
  check_probe(b, at::kInt, 64, "b");
  check_probe(c, at::kFloat, 128, "c");
  auto d = at::full({32, 4}, std::numeric_limits<float>::quiet_NaN(), c.options());
  const auto* ap = reinterpret_cast<const uint32_t*>(a.data_ptr<int32_t>());
  const auto* bp = reinterpret_cast<const uint32_t*>(b.data_ptr<int32_t>());
  if (bf16) {
    launch_kernel(mma_probe_kernel<__nv_bfloat16>, 1, 32, 0, nullptr, ap, bp, c.data_ptr<float>(), d.data_ptr<float>());
  } else {
    launch_kernel(mma_probe_kernel<__half>, 1, 32, 0, nullptr, ap, bp, c.data_ptr<float>(), d.data_ptr<float>());
  }
  return d;
}

// registers [32, 4] int32 of ldmatrix.x4 (.trans) over rows [32, 8] int16, lane l addressing row l.
at::Tensor ldmatrix_probe(const at::Tensor& rows, bool trans) {
  check_probe(rows, at::kShort, 256, "rows");
  auto out = at::full({32, 4}, -1, rows.options().dtype(at::kInt));
  launch_kernel(ldmatrix_probe_kernel, 1, 32, 32 * 16, nullptr, reinterpret_cast<const uint4*>(rows.data_ptr()),
                reinterpret_cast<uint32_t*>(out.data_ptr<int32_t>()), trans);
  return out;
}

at::Tensor cp_async_probe(const at::Tensor& src) {
  check_probe(src, at::kInt, 128 * 4, "src");
  auto out = at::full({128, 4}, -1, src.options());
  launch_kernel(cp_async_probe_kernel, 1, 64, 128 * 16, nullptr, reinterpret_cast<const uint4*>(src.data_ptr()),
                reinterpret_cast<uint4*>(out.data_ptr()));
  return out;
}

at::Tensor shfl_probe(const at::Tensor& in) {
  check_probe(in, at::kFloat, 32, "in");
  auto out = at::full({64}, std::numeric_limits<float>::quiet_NaN(), in.options());
  launch_kernel(shfl_probe_kernel, 1, 32, 0, nullptr, in.data_ptr<float>(), out.data_ptr<float>());
  return out;
}

// Runs fault case `name`, with the bug planted or not.
void fault_case(c10::string_view name_view, bool faulty) {
  const std::string name(name_view);
  auto out = at::zeros({4096}, at::kFloat);
  float* o = out.data_ptr<float>();
  auto src = at::arange(64 * 4, at::kInt);
  const auto* s = reinterpret_cast<const uint4*>(src.data_ptr());
  if (name == "missing_barrier") {
    launch_kernel(missing_barrier_kernel, 1, 64, 64 * 4, nullptr, o, faulty);
  } else if (name == "missing_barrier_before_overwrite") {
    launch_kernel(missing_barrier_before_overwrite_kernel, 1, 64, 64 * 4, nullptr, o, faulty);
  } else if (name == "uninitialised_smem") {
    launch_kernel(uninitialised_smem_kernel, 1, 64, 64 * 4, nullptr, o, faulty);
  } else if (name == "cp_async_no_wait") {
    launch_kernel(cp_async_no_wait_kernel, 1, 64, 64 * 16, nullptr, s, reinterpret_cast<uint4*>(o), faulty);
  } else if (name == "smem_out_of_bounds") {
    launch_kernel(smem_out_of_bounds_kernel, 1, 64, 64 * 4, nullptr, o, faulty);
  } else if (name == "blocks_overlap") {
    launch_kernel(blocks_overlap_kernel, 8, 64, 0, nullptr, o, faulty);
  } else if (name == "divergent_barrier") {
    launch_kernel(divergent_barrier_kernel, 1, 64, 0, nullptr, o, faulty);
  } else if (name == "divergent_shuffle") {
    launch_kernel(divergent_shuffle_kernel, 1, 64, 0, nullptr, o, faulty);
  } else if (name == "atomic_then_plain") {
    launch_kernel(atomic_then_plain_kernel, 4, 64, 0, nullptr, o, faulty);
  } else if (name == "smem_over_default_limit") {
    // 64 KiB of dynamic shared memory needs cudaFuncSetAttribute first, as on a GPU.
    if (!faulty) C10_CUDA_CHECK(cudaFuncSetAttribute(missing_barrier_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 64 * 1024));
    launch_kernel(missing_barrier_kernel, 1, 64, 64 * 1024, nullptr, o, false);
    C10_CUDA_CHECK(cudaFuncSetAttribute(missing_barrier_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 48 * 1024));
  } else {
    TORCH_CHECK_VALUE(false, "emulator fault_case: unknown case '", name, "'");
  }
}

// [32, 8, 2] (row, col) of A's elements, [32, 4, 2] of B's, [32, 4, 2] of C's per (lane, element).
std::vector<at::Tensor> mma_layouts() {
  auto a = at::empty({32, 8, 2}, at::kInt), b = at::empty({32, 4, 2}, at::kInt), c = at::empty({32, 4, 2}, at::kInt);
  for (int lane = 0; lane < 32; ++lane) {
    int r, col;
    for (int i = 0; i < 8; ++i) {
      sinklora_emu::mma_a_coord(lane, i, r, col);
      a[lane][i][0] = r;
      a[lane][i][1] = col;
    }
    for (int i = 0; i < 4; ++i) {
      sinklora_emu::mma_b_coord(lane, i, r, col);
      b[lane][i][0] = r;
      b[lane][i][1] = col;
      sinklora_emu::mma_c_coord(lane, i, r, col);
      c[lane][i][0] = r;
      c[lane][i][1] = col;
    }
  }
  return {a, b, c};
}

// [32, 4, 2, 2]: (source row lane, element) of half h of register r of each lane after ldmatrix.x4.
at::Tensor ldmatrix_layout(bool trans) {
  auto t = at::empty({32, 4, 2, 2}, at::kInt);
  for (int lane = 0; lane < 32; ++lane)
    for (int r = 0; r < 4; ++r)
      for (int h = 0; h < 2; ++h) {
        int row_lane, element;
        sinklora_emu::ldmatrix_source(lane, r, h, trans, row_lane, element);
        t[lane][r][h][0] = row_lane;
        t[lane][r][h][1] = element;
      }
  return t;
}

// Sets the emulated device: SM count, compute capability major, ptxVersion of every kernel.
void configure(int64_t sm_count, int64_t major, int64_t ptx_version) {
  TORCH_CHECK_VALUE(sm_count >= 1 && major >= 7 && ptx_version >= 70, "emulator configure: sm_count >= 1, major >= 7, "
                    "ptx_version >= 70");
  auto& d = sinklora_emu::device_props();
  d.sm_count = int(sm_count);
  d.major = int(major);
  d.ptx_version = int(ptx_version);
  sinklora::cuda::forget_device_props();  // the kernels' host code queries the new device
}

at::Tensor stats(bool reset) {
  const auto v = sinklora_emu::stats(reset);
  return at::tensor(v, at::kLong);
}

// Launches per kernel (demangled name) since the last emu_stats(reset=True).
std::tuple<std::vector<std::string>, std::vector<int64_t>> kernel_launches() {
  std::vector<std::string> names;
  std::vector<int64_t> counts;
  for (const auto& [name, count] : sinklora_emu::kernel_launches()) {
    names.push_back(name);
    counts.push_back(count);
  }
  return {names, counts};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sinklora_cuda_emu, m) {
  m.def("emu_configure(int sm_count, int major, int ptx_version) -> ()", &configure);
  m.def("emu_stats(bool reset) -> Tensor", &stats);
  m.def("emu_kernel_launches() -> (str[], int[])", &kernel_launches);
  m.def("emu_mma_layouts() -> Tensor[]", &mma_layouts);
  m.def("emu_ldmatrix_layout(bool trans) -> Tensor", &ldmatrix_layout);
  m.def("emu_mma_probe(Tensor a, Tensor b, Tensor c, bool bf16) -> Tensor", &mma_probe);
  m.def("emu_ldmatrix_probe(Tensor rows, bool trans) -> Tensor", &ldmatrix_probe);
  m.def("emu_cp_async_probe(Tensor src) -> Tensor", &cp_async_probe);
  m.def("emu_shfl_probe(Tensor input) -> Tensor", &shfl_probe);
  m.def("emu_fault_case(str name, bool faulty) -> ()", &fault_case);
}
