// Paged KV cache ops: argument checks (SPEC §6), allocation, dispatch to the device kernels.
#include <ATen/ATen.h>
#include <torch/library.h>

#if defined(SINKLORA_WITH_CUDA) && !defined(SINKLORA_CUDA_EMULATION)
#include <c10/cuda/CUDAGraphsC10Utils.h>
#endif

#include <cstdlib>
#include <cstring>

#include "device_call.h"
#include "ops.h"
#include "paged_kv_launch.h"

namespace sinklora {
namespace {

void check_cache_pair(const at::Tensor& k_cache, const at::Tensor& v_cache, const char* op) {
  TORCH_CHECK_VALUE(k_cache.dim() == 4, op, ": k_cache must be [num_blocks, block_size, num_kv_heads, head_dim], got ",
                    k_cache.sizes());
  TORCH_CHECK_VALUE(v_cache.sizes() == k_cache.sizes(), op, ": v_cache must have k_cache's shape ", k_cache.sizes(),
                    ", got ", v_cache.sizes());
  TORCH_CHECK_VALUE(v_cache.scalar_type() == k_cache.scalar_type(), op, ": v_cache dtype ", v_cache.scalar_type(),
                    " must equal k_cache dtype ", k_cache.scalar_type());
  TORCH_CHECK_VALUE(v_cache.device() == k_cache.device(), op, ": v_cache and k_cache must be on the same device");
  const auto dtype = k_cache.scalar_type();
  TORCH_CHECK_VALUE(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, op,
                    ": caches must be float32, float16 or bfloat16, got ", dtype);
  TORCH_CHECK_VALUE(k_cache.stride(-1) == 1 && v_cache.stride(-1) == 1, op,
                    ": the last dimension of k_cache and v_cache must be contiguous");
  TORCH_CHECK_VALUE(k_cache.size(1) >= 1 && k_cache.size(2) >= 1, op,
                    ": block_size and num_kv_heads (k_cache dims 1 and 2) must be >= 1, got ", k_cache.sizes());
}

void check_int_table(const at::Tensor& t, const char* name, int64_t dims, const at::Device& device, const char* op) {
  TORCH_CHECK_VALUE(t.scalar_type() == at::kInt, op, ": ", name, " must be int32, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == dims, op, ": ", name, " must have ", dims, " dimensions, got ", t.sizes());
  TORCH_CHECK_VALUE(t.is_contiguous(), op, ": ", name, " must be contiguous");
  TORCH_CHECK_VALUE(t.device() == device, op, ": ", name, " is on ", t.device(), " but the cache is on ", device);
}

void check_scores(const at::Tensor& scores, const at::Tensor& k_cache, const char* name, at::ScalarType dtype,
                  const char* op) {
  TORCH_CHECK_VALUE(scores.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ", scores.scalar_type());
  TORCH_CHECK_VALUE(scores.dim() == 3 && scores.size(0) == k_cache.size(0) && scores.size(1) == k_cache.size(1) &&
                        scores.size(2) == k_cache.size(2),
                    op, ": ", name, " must be [num_blocks, block_size, num_kv_heads] = [", k_cache.size(0), ", ",
                    k_cache.size(1), ", ", k_cache.size(2), "], got ", scores.sizes());
  TORCH_CHECK_VALUE(scores.is_contiguous(), op, ": ", name, " must be contiguous");
  TORCH_CHECK_VALUE(scores.device() == k_cache.device(), op, ": ", name, " must be on the cache's device");
}

// Host-side validation of block tables and lengths: every slot a sequence uses must map to a real
// block of the pool.
void check_tables(const at::Tensor& block_tables, const at::Tensor& seq_lens, int64_t block_size, int64_t num_blocks,
                  const char* op) {
  if (skip_device_checks(block_tables)) return;
  const auto tables = block_tables.cpu();
  const auto lens = seq_lens.cpu();
  const int32_t* t = tables.data_ptr<int32_t>();
  const int32_t* l = lens.data_ptr<int32_t>();
  const int64_t max_blocks = block_tables.size(1);
  for (int64_t b = 0; b < lens.size(0); ++b) {
    TORCH_CHECK_VALUE(l[b] >= 0 && l[b] <= max_blocks * block_size, op, ": seq_lens[", b, "] = ", l[b],
                      " is outside [0, ", max_blocks * block_size, "] (the block table holds ", max_blocks,
                      " blocks of ", block_size, ")");
    const int64_t used = (l[b] + block_size - 1) / block_size;
    for (int64_t i = 0; i < used; ++i) {
      const int32_t block = t[b * max_blocks + i];
      TORCH_CHECK_VALUE(block >= 0 && block < num_blocks, op, ": block_tables[", b, ", ", i, "] = ", block,
                        " is not a block of the pool [0, ", num_blocks, ")");
    }
  }
}

PagedCacheView view_of(const at::Tensor& cache) {
  return {cache.stride(0), cache.stride(1), cache.stride(2)};
}

}  // namespace

at::Tensor paged_decode(const at::Tensor& q_in, const at::Tensor& k_cache, const at::Tensor& v_cache,
                        const at::Tensor& block_tables, const at::Tensor& seq_lens, double softmax_scale,
                        const std::optional<at::Tensor>& scores) {
  constexpr const char* op = "paged_decode";
  check_cache_pair(k_cache, v_cache, op);
  TORCH_CHECK_VALUE(q_in.dim() == 3, op, ": q must be [batch, num_heads, head_dim], got ", q_in.sizes());
  TORCH_CHECK_VALUE(q_in.scalar_type() == k_cache.scalar_type(), op, ": q dtype ", q_in.scalar_type(),
                    " must equal the cache dtype ", k_cache.scalar_type());
  TORCH_CHECK_VALUE(q_in.device() == k_cache.device(), op, ": q is on ", q_in.device(), " but the cache is on ",
                    k_cache.device());
  const int64_t batch = q_in.size(0), heads_q = q_in.size(1), head_dim = q_in.size(2);
  const int64_t heads_kv = k_cache.size(2);
  TORCH_CHECK_VALUE(k_cache.size(3) == head_dim, op, ": cache head_dim ", k_cache.size(3), " must equal q head_dim ",
                    head_dim);
  TORCH_CHECK_VALUE(head_dim >= 1 && head_dim <= 256, op, ": head_dim must be in [1, 256], got ", head_dim);
  TORCH_CHECK_VALUE(heads_q >= 1 && heads_q % heads_kv == 0, op, ": the number of query heads (", heads_q,
                    ") must be a multiple of the number of kv heads (", heads_kv, ")");
  check_int_table(block_tables, "block_tables", 2, k_cache.device(), op);
  check_int_table(seq_lens, "seq_lens", 1, k_cache.device(), op);
  TORCH_CHECK_VALUE(block_tables.size(0) == batch && seq_lens.size(0) == batch, op, ": block_tables [",
                    block_tables.size(0), ", ...] and seq_lens [", seq_lens.size(0), "] must have q's batch ", batch);
  if (scores.has_value()) check_scores(*scores, k_cache, "scores", at::kFloat, op);
  check_tables(block_tables, seq_lens, k_cache.size(1), k_cache.size(0), op);

  const auto q = q_in.stride(-1) == 1 ? q_in : q_in.contiguous();
  auto out = kernel_output({batch, heads_q, head_dim}, q.options());
  if (batch == 0) return out;

  PagedDecodeParams p{};
  p.q = q.data_ptr();
  p.out = out.data_ptr();
  p.k_cache = k_cache.data_ptr();
  p.v_cache = v_cache.data_ptr();
  p.scores = scores.has_value() ? scores->data_ptr<float>() : nullptr;
  p.block_tables = block_tables.data_ptr<int32_t>();
  p.seq_lens = seq_lens.data_ptr<int32_t>();
  p.q_batch_stride = q.stride(0);
  p.q_head_stride = q.stride(1);
  p.k = view_of(k_cache);
  p.v = view_of(v_cache);
  p.batch = static_cast<int>(batch);
  p.num_heads_q = static_cast<int>(heads_q);
  p.num_heads_kv = static_cast<int>(heads_kv);
  p.head_dim = static_cast<int>(head_dim);
  p.block_size = static_cast<int>(k_cache.size(1));
  p.max_blocks_per_seq = static_cast<int>(block_tables.size(1));
  p.num_blocks = static_cast<int>(k_cache.size(0));
  p.softmax_scale = static_cast<float>(softmax_scale);

#ifdef SINKLORA_WITH_CUDA
  if (runs_cuda_kernels(q)) {
    CudaCall call(q);
    auto workspace = kernel_output({paged_decode_workspace_floats(p)}, q.options().dtype(at::kFloat));
    paged_decode_cuda(p, q.scalar_type(), workspace.data_ptr<float>(), call.stream());
    return out;
  }
#endif
#ifndef SINKLORA_CUDA_EMULATION
  TORCH_CHECK(q.is_cpu(), op, ": no kernel for device ", q.device());
  paged_decode_cpu(p, q.scalar_type());
#endif
  return out;
}

void paged_write_kv_(const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& k_cache,
                     const at::Tensor& v_cache, const at::Tensor& slots, const std::optional<at::Tensor>& scores,
                     const std::optional<at::Tensor>& new_scores, const std::optional<at::Tensor>& positions,
                     const std::optional<at::Tensor>& token_positions) {
  constexpr const char* op = "paged_write_kv_";
  check_cache_pair(k_cache, v_cache, op);
  TORCH_CHECK_VALUE(k_in.dim() == 3 && v_in.sizes() == k_in.sizes(), op,
                    ": k and v must both be [tokens, num_kv_heads, head_dim], got ", k_in.sizes(), " and ",
                    v_in.sizes());
  TORCH_CHECK_VALUE(k_in.size(1) == k_cache.size(2) && k_in.size(2) == k_cache.size(3), op, ": k heads/head_dim ",
                    k_in.sizes(), " must match the cache ", k_cache.sizes());
  TORCH_CHECK_VALUE(k_in.scalar_type() == k_cache.scalar_type() && v_in.scalar_type() == k_cache.scalar_type(), op,
                    ": k and v must have the cache dtype ", k_cache.scalar_type());
  TORCH_CHECK_VALUE(k_in.device() == k_cache.device() && v_in.device() == k_cache.device(), op,
                    ": k and v must be on the cache's device");
  const int64_t rows = k_in.size(0), heads_kv = k_cache.size(2);
  check_int_table(slots, "slots", 2, k_cache.device(), op);
  TORCH_CHECK_VALUE(slots.size(0) == rows && slots.size(1) == heads_kv, op, ": slots must be [tokens, num_kv_heads] = [",
                    rows, ", ", heads_kv, "], got ", slots.sizes());
  if (scores.has_value()) check_scores(*scores, k_cache, "scores", at::kFloat, op);
  if (positions.has_value()) {
    check_scores(*positions, k_cache, "positions", at::kInt, op);
    TORCH_CHECK_VALUE(token_positions.has_value(), op, ": token_positions is required when positions is given");
    check_int_table(*token_positions, "token_positions", 1, k_cache.device(), op);
    TORCH_CHECK_VALUE(token_positions->size(0) == rows, op, ": token_positions must be [tokens] = [", rows, "]");
  }
  if (new_scores.has_value()) {
    TORCH_CHECK_VALUE(scores.has_value(), op, ": new_scores needs scores");
    TORCH_CHECK_VALUE(new_scores->scalar_type() == at::kFloat && new_scores->is_contiguous() &&
                          new_scores->sizes() == slots.sizes() && new_scores->device() == k_cache.device(),
                      op, ": new_scores must be contiguous float32 [tokens, num_kv_heads] on the cache's device");
  }
  const int64_t num_slots = k_cache.size(0) * k_cache.size(1);
  if (!skip_device_checks(slots)) {
    const auto host_slots = slots.cpu();
    const int32_t* s = host_slots.data_ptr<int32_t>();
    for (int64_t i = 0; i < slots.numel(); ++i)
      TORCH_CHECK_VALUE(s[i] >= -1 && s[i] < num_slots, op, ": slots[", i / heads_kv, ", ", i % heads_kv, "] = ", s[i],
                        " is outside the pool's slots [0, ", num_slots, ") (-1 skips)");
  }
  if (rows == 0) return;
  const auto k = k_in.stride(-1) == 1 ? k_in : k_in.contiguous();
  const auto v = v_in.stride(-1) == 1 ? v_in : v_in.contiguous();

  PagedWriteParams p{};
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.k_cache = k_cache.data_ptr();
  p.v_cache = v_cache.data_ptr();
  p.slots = slots.data_ptr<int32_t>();
  p.scores = scores.has_value() ? scores->data_ptr<float>() : nullptr;
  p.new_scores = new_scores.has_value() ? new_scores->data_ptr<float>() : nullptr;
  p.positions = positions.has_value() ? positions->data_ptr<int32_t>() : nullptr;
  p.token_positions = token_positions.has_value() ? token_positions->data_ptr<int32_t>() : nullptr;
  p.k_row_stride = k.stride(0);
  p.k_head_stride = k.stride(1);
  p.v_row_stride = v.stride(0);
  p.v_head_stride = v.stride(1);
  p.kc = view_of(k_cache);
  p.vc = view_of(v_cache);
  p.rows = static_cast<int>(rows);
  p.num_heads_kv = static_cast<int>(heads_kv);
  p.head_dim = static_cast<int>(k_cache.size(3));
  p.block_size = static_cast<int>(k_cache.size(1));
  p.num_slots = num_slots;
#ifdef SINKLORA_WITH_CUDA
  if (runs_cuda_kernels(k)) {
    CudaCall call(k);
    paged_write_cuda(p, k.scalar_type(), call.stream());
    return;
  }
#endif
#ifndef SINKLORA_CUDA_EMULATION
  TORCH_CHECK(k.is_cpu(), op, ": no kernel for device ", k.device());
  paged_write_cpu(p, k.scalar_type());
#endif
}

at::Tensor h2o_evict(const at::Tensor& scores, const at::Tensor& positions, const at::Tensor& block_tables,
                     const at::Tensor& seq_lens, int64_t num_sinks, int64_t recent, c10::string_view policy) {
  constexpr const char* op = "h2o_evict";
  TORCH_CHECK_VALUE(scores.scalar_type() == at::kFloat && scores.dim() == 3 && scores.is_contiguous(), op,
                    ": scores must be contiguous float32 [num_blocks, block_size, num_kv_heads], got ",
                    scores.scalar_type(), " ", scores.sizes());
  TORCH_CHECK_VALUE(positions.scalar_type() == at::kInt && positions.sizes() == scores.sizes() &&
                        positions.is_contiguous() && positions.device() == scores.device(),
                    op, ": positions must be contiguous int32 with scores' shape ", scores.sizes());
  TORCH_CHECK_VALUE(scores.size(1) >= 1 && scores.size(2) >= 1, op,
                    ": block_size and num_kv_heads (scores dims 1 and 2) must be >= 1, got ", scores.sizes());
  check_int_table(block_tables, "block_tables", 2, scores.device(), op);
  check_int_table(seq_lens, "seq_lens", 1, scores.device(), op);
  TORCH_CHECK_VALUE(block_tables.size(0) == seq_lens.size(0), op, ": block_tables and seq_lens disagree on the batch");
  TORCH_CHECK_VALUE(num_sinks >= 0 && recent >= 0, op, ": num_sinks and recent must be >= 0, got ", num_sinks, " and ",
                    recent);
  EvictPolicy pol;
  if (policy == "h2o") {
    pol = EvictPolicy::kH2O;
  } else if (policy == "streaming") {
    pol = EvictPolicy::kStreaming;
  } else {
    TORCH_CHECK_VALUE(false, op, ": policy must be 'h2o' or 'streaming', got '", std::string(policy), "'");
  }
  check_tables(block_tables, seq_lens, scores.size(1), scores.size(0), op);
  const int64_t batch = seq_lens.size(0), heads_kv = scores.size(2);
  auto victims = kernel_output({batch, heads_kv}, seq_lens.options());
  if (batch == 0) return victims;
  EvictParams p{};
  p.scores = scores.data_ptr<float>();
  p.positions = positions.data_ptr<int32_t>();
  p.block_tables = block_tables.data_ptr<int32_t>();
  p.seq_lens = seq_lens.data_ptr<int32_t>();
  p.victims = victims.data_ptr<int32_t>();
  p.batch = static_cast<int>(batch);
  p.num_heads_kv = static_cast<int>(heads_kv);
  p.block_size = static_cast<int>(scores.size(1));
  p.max_blocks_per_seq = static_cast<int>(block_tables.size(1));
  p.num_blocks = static_cast<int>(scores.size(0));
  p.num_sinks = static_cast<int>(num_sinks);
  p.recent = static_cast<int>(recent);
  p.policy = pol;
#ifdef SINKLORA_WITH_CUDA
  if (runs_cuda_kernels(scores)) {
    CudaCall call(scores);
    h2o_evict_cuda(p, call.stream());
    return victims;
  }
#endif
#ifndef SINKLORA_CUDA_EMULATION
  TORCH_CHECK(scores.is_cpu(), op, ": no kernel for device ", scores.device());
  h2o_evict_cpu(p);
#endif
  return victims;
}

namespace {
thread_local bool tables_trusted = false;
}  // namespace

bool trust_tables(bool enabled) {
  const bool previous = tables_trusted;
  tables_trusted = enabled;
  return previous;
}

bool skip_device_checks(const at::Tensor& t) {
  if (!runs_cuda_kernels(t)) return false;
  static const bool trust = [] {
    const char* v = std::getenv("SINKLORA_TRUST_TABLES");
    return v != nullptr && (std::strcmp(v, "1") == 0 || std::strcmp(v, "true") == 0 || std::strcmp(v, "yes") == 0);
  }();
  if (trust || tables_trusted) return true;
#if defined(SINKLORA_WITH_CUDA) && !defined(SINKLORA_CUDA_EMULATION)
  return c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
#else
  return false;
#endif
}

}  // namespace sinklora
