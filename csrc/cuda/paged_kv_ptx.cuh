// PTX the paged decode kernel adds to sf_attention_ptx.cuh: a cp.async wait that leaves the
// newest N commit groups in flight (multi-stage pipelines). sm_80+ only.
#pragma once

namespace sinklora {
namespace sfcuda {

template <int N>
__device__ __forceinline__ void cp_async_wait_group() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

}  // namespace sfcuda
}  // namespace sinklora
