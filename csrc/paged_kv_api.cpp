// csrc/paged_kv_api.cpp: the device-agnostic half of the paged KV cache ops (paged_decode,
// paged_write_, select_evictions, plan_paged): argument checks (docs/errors.md), validation of the
// index tensors on the host, or of the step plan that validated them (docs/paged_kv.md), output
// allocation and the kernel parameters.
#include <ATen/ATen.h>

#include <algorithm>
#include <string>
#include <vector>

#include "api_checks.h"
#include "paged_kv_api.h"

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
  // Any other strides are honoured (vLLM's views of one kv tensor per layer: docs/paged_kv.md).
  TORCH_CHECK_VALUE(k_cache.stride(-1) == 1 && v_cache.stride(-1) == 1, op,
                    ": the last dimension of k_cache and v_cache must be dense (stride 1), got strides ",
                    k_cache.strides(), " and ", v_cache.strides());
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

// Every slot a sequence uses must map to a real block of the pool (host copies of the tables).
void check_tables_on_host(const int32_t* t, const int32_t* l, int64_t batch, int64_t max_blocks, int64_t block_size,
                          int64_t num_blocks, const char* op) {
  for (int64_t b = 0; b < batch; ++b) {
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

void check_slots_on_host(const int32_t* s, int64_t numel, int64_t heads_kv, int64_t num_slots, const char* op) {
  for (int64_t i = 0; i < numel; ++i)
    TORCH_CHECK_VALUE(s[i] >= -1 && s[i] < num_slots, op, ": slots[", i / heads_kv, ", ", i % heads_kv, "] = ", s[i],
                      " is outside the pool's slots [0, ", num_slots, ") (-1 skips)");
}

// The int32 tensors on the host, in one copy (one device sync on CUDA).
std::vector<at::Tensor> to_host(const std::vector<at::Tensor>& ts) {
  if (ts.empty()) return {};
  if (ts.front().is_cpu()) return ts;
  std::vector<at::Tensor> flat;
  std::vector<int64_t> sizes;
  for (const auto& t : ts) {
    flat.push_back(t.reshape(-1));
    sizes.push_back(t.numel());
  }
  const auto host = at::cat(flat).cpu();
  std::vector<at::Tensor> out;
  int64_t at = 0;
  for (size_t i = 0; i < ts.size(); ++i) {
    out.push_back(host.narrow(0, at, sizes[i]).view(ts[i].sizes()));
    at += sizes[i];
  }
  return out;
}

void check_tables(const at::Tensor& block_tables, const at::Tensor& seq_lens, int64_t block_size, int64_t num_blocks,
                  const char* op) {
  const auto host = to_host({block_tables, seq_lens});
  check_tables_on_host(host[0].data_ptr<int32_t>(), host[1].data_ptr<int32_t>(), seq_lens.size(0),
                       block_tables.size(1), block_size, num_blocks, op);
}

int64_t version_of(const at::Tensor& t) { return t.is_inference() ? -1 : static_cast<int64_t>(t._version()); }

int64_t address_of(const at::Tensor& t) { return static_cast<int64_t>(reinterpret_cast<uintptr_t>(t.data_ptr())); }

// The plan tensor's fields, after checking that it is one and that it was made for this pool.
const int64_t* plan_fields(const at::Tensor& plan, int64_t num_blocks, int64_t block_size, int64_t heads_kv,
                           const char* op) {
  TORCH_CHECK_VALUE(plan.is_cpu() && plan.scalar_type() == at::kLong && plan.dim() == 1 &&
                        plan.size(0) == kPlanFields && plan.is_contiguous() &&
                        plan.data_ptr<int64_t>()[kPlanMagic] == kPlanMagicValue,
                    op, ": plan is not a plan (make one with sinklora_ext.plan_paged)");
  const int64_t* f = plan.data_ptr<int64_t>();
  TORCH_CHECK_VALUE(f[kPlanNumBlocks] == num_blocks && f[kPlanBlockSize] == block_size && f[kPlanHeadsKv] == heads_kv,
                    op, ": the plan was made for a pool of ", f[kPlanNumBlocks], " blocks of ", f[kPlanBlockSize],
                    " slots and ", f[kPlanHeadsKv], " kv heads, not ", num_blocks, " x ", block_size, " x ", heads_kv);
  return f;
}

// The plan validated exactly these tensors, and they have not been written to since.
void check_planned(const int64_t* f, int ptr_field, int version_field, const at::Tensor& t, const char* name,
                   const char* op) {
  TORCH_CHECK_VALUE(f[ptr_field] == address_of(t), op, ": the plan was made for other ", name,
                    " (make a plan for the tensors of this step with sinklora_ext.plan_paged)");
  TORCH_CHECK_VALUE(f[version_field] == version_of(t), op, ": ", name,
                    " changed since the plan was made (version ", version_of(t), ", planned at ", f[version_field],
                    "); make a new plan with sinklora_ext.plan_paged");
}

void check_planned_tables(const int64_t* f, const at::Tensor& block_tables, const at::Tensor& seq_lens,
                          const char* op) {
  TORCH_CHECK_VALUE(f[kPlanBatch] >= 0, op, ": the plan does not cover block_tables and seq_lens (plan_paged was "
                    "not given them)");
  check_planned(f, kPlanTablesPtr, kPlanTablesVersion, block_tables, "block_tables", op);
  // seq_lens may be one row of the seq_lens the plan validated (per-layer lengths [layers, B])
  const int64_t begin = address_of(seq_lens), end = begin + seq_lens.numel() * int64_t(sizeof(int32_t));
  const int64_t row_bytes = f[kPlanBatch] * int64_t(sizeof(int32_t));
  TORCH_CHECK_VALUE(seq_lens.dim() == 1 && seq_lens.size(0) == f[kPlanBatch] && begin >= f[kPlanLensBegin] &&
                        end <= f[kPlanLensEnd] && (row_bytes == 0 || (begin - f[kPlanLensBegin]) % row_bytes == 0),
                    op, ": the plan was made for other seq_lens (make a plan for the tensors of this step with "
                    "sinklora_ext.plan_paged)");
  TORCH_CHECK_VALUE(f[kPlanLensVersion] == version_of(seq_lens), op, ": seq_lens changed since the plan was made "
                    "(version ", version_of(seq_lens), ", planned at ", f[kPlanLensVersion],
                    "); make a new plan with sinklora_ext.plan_paged");
  TORCH_CHECK_VALUE(f[kPlanBatch] == block_tables.size(0) && f[kPlanMaxBlocks] == block_tables.size(1), op,
                    ": the plan was made for block_tables [", f[kPlanBatch], ", ", f[kPlanMaxBlocks], "], got ",
                    block_tables.sizes());
}

PagedCacheView view_of(const at::Tensor& cache) {
  return {cache.stride(0), cache.stride(1), cache.stride(2)};
}

}  // namespace

PagedDecode prepare_paged_decode(const at::Tensor& q_in, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                 const at::Tensor& block_tables, const at::Tensor& seq_lens, double softmax_scale,
                                 const std::optional<at::Tensor>& scores, const std::optional<at::Tensor>& plan) {
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
  PagedDecode c;
  if (plan.has_value()) {
    const int64_t* f = plan_fields(*plan, k_cache.size(0), k_cache.size(1), heads_kv, op);
    check_planned_tables(f, block_tables, seq_lens, op);
    if (f[kPlanHeadsQ] != 0) {
      TORCH_CHECK_VALUE(f[kPlanHeadsQ] == heads_q, op, ": the plan was made for ", f[kPlanHeadsQ],
                        " query heads, q has ", heads_q);
      c.plan_heads_q = static_cast<int>(f[kPlanHeadsQ]);
      c.plan_splits = static_cast<int>(f[kPlanSplits]);
      c.plan_partition = static_cast<int>(f[kPlanPartition]);
    }
  } else {
    check_tables(block_tables, seq_lens, k_cache.size(1), k_cache.size(0), op);
  }

  c.q = last_dim_contiguous(q_in);
  c.out = at::empty({batch, heads_q, head_dim}, c.q.options());
  c.empty = batch == 0;
  if (c.empty) return c;

  PagedDecodeParams& p = c.params;
  p.q = c.q.data_ptr();
  p.out = c.out.data_ptr();
  p.k_cache = k_cache.data_ptr();
  p.v_cache = v_cache.data_ptr();
  p.scores = scores.has_value() ? scores->data_ptr<float>() : nullptr;
  p.block_tables = block_tables.data_ptr<int32_t>();
  p.seq_lens = seq_lens.data_ptr<int32_t>();
  p.q_batch_stride = c.q.stride(0);
  p.q_head_stride = c.q.stride(1);
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
  return c;
}

PagedWrite prepare_paged_write(const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& k_cache,
                               const at::Tensor& v_cache, const at::Tensor& slots,
                               const std::optional<at::Tensor>& scores, const std::optional<at::Tensor>& new_scores,
                               const std::optional<at::Tensor>& positions,
                               const std::optional<at::Tensor>& token_positions,
                               const std::optional<at::Tensor>& plan) {
  constexpr const char* op = "paged_write_";
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
  if (plan.has_value()) {
    const int64_t* f = plan_fields(*plan, k_cache.size(0), k_cache.size(1), heads_kv, op);
    // slots may be a view (one layer's rows) of the slots the plan validated
    const int64_t begin = address_of(slots), end = begin + slots.numel() * int64_t(sizeof(int32_t));
    TORCH_CHECK_VALUE(f[kPlanSlotsBegin] != f[kPlanSlotsEnd] || slots.numel() == 0, op,
                      ": the plan does not cover slots (plan_paged was not given them)");
    TORCH_CHECK_VALUE(slots.numel() == 0 || (begin >= f[kPlanSlotsBegin] && end <= f[kPlanSlotsEnd]), op,
                      ": the plan was made for other slots (make a plan for the tensors of this step with "
                      "sinklora_ext.plan_paged)");
    TORCH_CHECK_VALUE(slots.numel() == 0 || f[kPlanSlotsVersion] == version_of(slots), op,
                      ": slots changed since the plan was made (version ", version_of(slots), ", planned at ",
                      f[kPlanSlotsVersion], "); make a new plan with sinklora_ext.plan_paged");
  } else {
    const auto host = to_host({slots});
    check_slots_on_host(host[0].data_ptr<int32_t>(), slots.numel(), heads_kv, num_slots, op);
  }
  PagedWrite c;
  c.empty = rows == 0;
  if (c.empty) return c;
  c.k = last_dim_contiguous(k_in);
  c.v = last_dim_contiguous(v_in);

  PagedWriteParams& p = c.params;
  p.k = c.k.data_ptr();
  p.v = c.v.data_ptr();
  p.k_cache = k_cache.data_ptr();
  p.v_cache = v_cache.data_ptr();
  p.slots = slots.data_ptr<int32_t>();
  p.scores = scores.has_value() ? scores->data_ptr<float>() : nullptr;
  p.new_scores = new_scores.has_value() ? new_scores->data_ptr<float>() : nullptr;
  p.positions = positions.has_value() ? positions->data_ptr<int32_t>() : nullptr;
  p.token_positions = token_positions.has_value() ? token_positions->data_ptr<int32_t>() : nullptr;
  p.k_row_stride = c.k.stride(0);
  p.k_head_stride = c.k.stride(1);
  p.v_row_stride = c.v.stride(0);
  p.v_head_stride = c.v.stride(1);
  p.kc = view_of(k_cache);
  p.vc = view_of(v_cache);
  p.rows = static_cast<int>(rows);
  p.num_heads_kv = static_cast<int>(heads_kv);
  p.head_dim = static_cast<int>(k_cache.size(3));
  p.block_size = static_cast<int>(k_cache.size(1));
  p.num_slots = num_slots;
  return c;
}

SelectEvictions prepare_select_evictions(const at::Tensor& scores, const at::Tensor& positions,
                                         const at::Tensor& block_tables, const at::Tensor& seq_lens,
                                         int64_t num_sinks, int64_t recent, c10::string_view policy,
                                         double score_decay, const std::optional<at::Tensor>& plan) {
  constexpr const char* op = "select_evictions";
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
  } else if (policy == "mean") {
    pol = EvictPolicy::kMean;
  } else if (policy == "streaming") {
    pol = EvictPolicy::kStreaming;
  } else {
    TORCH_CHECK_VALUE(false, op, ": policy must be 'h2o', 'mean' or 'streaming', got '", std::string(policy), "'");
  }
  TORCH_CHECK_VALUE(score_decay >= 0.0 && score_decay <= 1.0, op, ": score_decay must be in [0, 1], got ", score_decay);
  if (plan.has_value()) {
    check_planned_tables(plan_fields(*plan, scores.size(0), scores.size(1), scores.size(2), op), block_tables,
                         seq_lens, op);
  } else {
    check_tables(block_tables, seq_lens, scores.size(1), scores.size(0), op);
  }
  const int64_t batch = seq_lens.size(0), heads_kv = scores.size(2);
  SelectEvictions c;
  c.victims = at::empty({batch, heads_kv}, seq_lens.options());
  c.empty = batch == 0;
  if (c.empty) return c;
  EvictParams& p = c.params;
  p.scores = scores.data_ptr<float>();
  p.positions = positions.data_ptr<int32_t>();
  p.block_tables = block_tables.data_ptr<int32_t>();
  p.seq_lens = seq_lens.data_ptr<int32_t>();
  p.victims = c.victims.data_ptr<int32_t>();
  p.batch = static_cast<int>(batch);
  p.num_heads_kv = static_cast<int>(heads_kv);
  p.block_size = static_cast<int>(scores.size(1));
  p.max_blocks_per_seq = static_cast<int>(block_tables.size(1));
  p.num_blocks = static_cast<int>(scores.size(0));
  p.num_sinks = static_cast<int>(num_sinks);
  p.recent = static_cast<int>(recent);
  p.policy = pol;
  p.score_decay = static_cast<float>(score_decay);
  return c;
}

at::Tensor prepare_paged_plan(const at::Tensor& k_cache, const std::optional<at::Tensor>& block_tables,
                              const std::optional<at::Tensor>& seq_lens, const std::optional<at::Tensor>& slots,
                              int64_t num_heads_q) {
  constexpr const char* op = "plan_paged";
  TORCH_CHECK_VALUE(k_cache.dim() == 4, op, ": k_cache must be [num_blocks, block_size, num_kv_heads, head_dim], got ",
                    k_cache.sizes());
  TORCH_CHECK_VALUE(k_cache.size(1) >= 1 && k_cache.size(2) >= 1, op,
                    ": block_size and num_kv_heads (k_cache dims 1 and 2) must be >= 1, got ", k_cache.sizes());
  TORCH_CHECK_VALUE(block_tables.has_value() == seq_lens.has_value(), op,
                    ": block_tables and seq_lens are planned together (give both or neither)");
  const int64_t num_blocks = k_cache.size(0), block_size = k_cache.size(1), heads_kv = k_cache.size(2);
  TORCH_CHECK_VALUE(num_heads_q >= 0 && (num_heads_q == 0 || num_heads_q % heads_kv == 0), op,
                    ": num_heads_q (", num_heads_q, ") must be a multiple of the number of kv heads (", heads_kv, ")");
  std::vector<at::Tensor> index;
  if (block_tables.has_value()) {
    check_int_table(*block_tables, "block_tables", 2, k_cache.device(), op);
    TORCH_CHECK_VALUE(seq_lens->dim() == 1 || seq_lens->dim() == 2, op,
                      ": seq_lens must be [batch] or [rows, batch] (e.g. one row per layer), got ", seq_lens->sizes());
    check_int_table(*seq_lens, "seq_lens", seq_lens->dim(), k_cache.device(), op);
    TORCH_CHECK_VALUE(block_tables->size(0) == seq_lens->size(-1), op,
                      ": block_tables and seq_lens disagree on the batch");
    index.push_back(*block_tables);
    index.push_back(*seq_lens);
  }
  if (slots.has_value()) {
    TORCH_CHECK_VALUE(slots->scalar_type() == at::kInt && slots->is_contiguous() && slots->dim() >= 1 &&
                          slots->size(-1) == heads_kv && slots->device() == k_cache.device(),
                      op, ": slots must be contiguous int32 [..., num_kv_heads] on the cache's device, got ",
                      slots->scalar_type(), " ", slots->sizes());
    index.push_back(*slots);
  }
  const auto host = to_host(index);
  auto plan = at::zeros({kPlanFields}, at::TensorOptions().dtype(at::kLong));
  int64_t* f = plan.data_ptr<int64_t>();
  f[kPlanMagic] = kPlanMagicValue;
  f[kPlanNumBlocks] = num_blocks;
  f[kPlanBlockSize] = block_size;
  f[kPlanHeadsKv] = heads_kv;
  f[kPlanBatch] = -1;  // no tables
  size_t next = 0;
  if (block_tables.has_value()) {
    const int64_t batch = block_tables->size(0);
    for (int64_t row = 0; row < seq_lens->numel() / std::max<int64_t>(batch, 1); ++row)
      check_tables_on_host(host[0].data_ptr<int32_t>(), host[1].data_ptr<int32_t>() + row * batch, batch,
                           block_tables->size(1), block_size, num_blocks, op);
    f[kPlanTablesPtr] = address_of(*block_tables);
    f[kPlanTablesVersion] = version_of(*block_tables);
    f[kPlanBatch] = block_tables->size(0);
    f[kPlanMaxBlocks] = block_tables->size(1);
    f[kPlanLensBegin] = address_of(*seq_lens);
    f[kPlanLensEnd] = f[kPlanLensBegin] + seq_lens->numel() * int64_t(sizeof(int32_t));
    f[kPlanLensVersion] = version_of(*seq_lens);
    f[kPlanHeadsQ] = num_heads_q;
    next = 2;
  }
  if (slots.has_value()) {
    check_slots_on_host(host[next].data_ptr<int32_t>(), slots->numel(), heads_kv, num_blocks * block_size, op);
    f[kPlanSlotsBegin] = address_of(*slots);
    f[kPlanSlotsEnd] = f[kPlanSlotsBegin] + slots->numel() * int64_t(sizeof(int32_t));
    f[kPlanSlotsVersion] = version_of(*slots);
  }
  return plan;
}

}  // namespace sinklora
