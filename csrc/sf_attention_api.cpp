// csrc/sf_attention_api.cpp: the device-agnostic half of the SF-Attn ops (sf_attention_fwd,
// sf_attention_bwd, column_scores): argument checks (docs/errors.md), output allocation and the
// kernel parameters. The per-device entry points (csrc/cpu/, csrc/cuda/) call these, then run.
#include <ATen/ATen.h>

#include <limits>

#include "api_checks.h"
#include "sf_attention_api.h"

namespace sinklora {
namespace {

constexpr int64_t kMaxHeadDim = 256;

ShiftMode parse_shift(c10::string_view shift) {
  if (shift == "none") return ShiftMode::kNone;
  if (shift == "nowrap") return ShiftMode::kNoWrap;
  if (shift == "roll") return ShiftMode::kRoll;
  TORCH_CHECK_VALUE(false, "sf_attention: shift must be one of 'none', 'nowrap', 'roll', got '",
                    std::string(shift), "'");
}

void check_same(const at::Tensor& a, const char* name, const at::Tensor& q) { check_like(a, name, q, "sf_attention"); }

struct Layout {
  bool varlen;
  int64_t batch, seqlen, rows, heads_q, heads_kv, head_dim;
};

Layout check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    const std::optional<at::Tensor>& cu_seqlens, int64_t max_seqlen,
                    int64_t group_size, int64_t num_sinks, ShiftMode shift) {
  const auto dtype = q.scalar_type();
  TORCH_CHECK_VALUE(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
                    "sf_attention: q must be float32, float16 or bfloat16, got ", dtype);
  check_same(k, "k", q);
  check_same(v, "v", q);
  constexpr int64_t kIntMax = std::numeric_limits<int32_t>::max();
  TORCH_CHECK_VALUE(group_size >= 1 && group_size <= kIntMax, "sf_attention: group_size must be in [1, 2^31), got ",
                    group_size);
  TORCH_CHECK_VALUE(num_sinks >= 0 && num_sinks <= kIntMax, "sf_attention: num_sinks must be in [0, 2^31), got ",
                    num_sinks);
  TORCH_CHECK_VALUE(max_seqlen <= kIntMax, "sf_attention: max_seqlen must be < 2^31, got ", max_seqlen);

  Layout l{};
  l.varlen = cu_seqlens.has_value();
  const int64_t dims = l.varlen ? 3 : 4;
  const char* shape = l.varlen ? "[total, heads, head_dim]" : "[batch, seqlen, heads, head_dim]";
  TORCH_CHECK_VALUE(q.dim() == dims, "sf_attention: q must be ", shape, ", got ", q.sizes());
  TORCH_CHECK_VALUE(k.dim() == dims, "sf_attention: k must be ", shape, ", got ", k.sizes());
  TORCH_CHECK_VALUE(v.sizes() == k.sizes(), "sf_attention: v must have k's shape ", k.sizes(),
                    ", got ", v.sizes());
  for (int64_t d = 0; d < dims - 2; ++d) {
    TORCH_CHECK_VALUE(k.size(d) == q.size(d), "sf_attention: k and q disagree in dimension ", d,
                      " (", k.size(d), " vs ", q.size(d), "): ",
                      l.varlen ? "total tokens" : "batch and seqlen", " must match");
  }
  l.heads_q = q.size(-2);
  l.heads_kv = k.size(-2);
  l.head_dim = q.size(-1);
  TORCH_CHECK_VALUE(l.heads_kv >= 1 && l.heads_q % l.heads_kv == 0,
                    "sf_attention: the number of query heads (", l.heads_q,
                    ") must be a multiple of the number of kv heads (", l.heads_kv, ")");
  TORCH_CHECK_VALUE(k.size(-1) == l.head_dim, "sf_attention: k head_dim ", k.size(-1),
                    " must equal q head_dim ", l.head_dim);
  TORCH_CHECK_VALUE(l.head_dim >= 1 && l.head_dim <= kMaxHeadDim,
                    "sf_attention: head_dim must be in [1, 256], got ", l.head_dim);

  if (!l.varlen) {
    l.batch = q.size(0);
    l.seqlen = q.size(1);
    l.rows = l.batch * l.seqlen;
    TORCH_CHECK_VALUE(shift != ShiftMode::kRoll || l.seqlen % group_size == 0,
                      "sf_attention: shift='roll' requires seqlen % group_size == 0, got seqlen ",
                      l.seqlen, " and group_size ", group_size,
                      " (use shift='nowrap' for any length)");
    return l;
  }

  const auto& cu = *cu_seqlens;
  TORCH_CHECK_VALUE(cu.scalar_type() == at::kInt, "sf_attention_varlen: cu_seqlens must be int32, got ",
                    cu.scalar_type());
  TORCH_CHECK_VALUE(cu.dim() == 1 && cu.size(0) >= 1,
                    "sf_attention_varlen: cu_seqlens must be 1-D [batch + 1], got ", cu.sizes());
  TORCH_CHECK_VALUE(cu.is_contiguous(), "sf_attention_varlen: cu_seqlens must be contiguous");
  TORCH_CHECK_VALUE(cu.device() == q.device(), "sf_attention_varlen: cu_seqlens is on ", cu.device(),
                    " but q is on ", q.device());
  l.batch = cu.size(0) - 1;
  l.rows = q.size(0);
  l.seqlen = max_seqlen;
  TORCH_CHECK_VALUE(max_seqlen >= 0, "sf_attention_varlen: max_seqlen must be >= 0, got ", max_seqlen);
  // Validating the offsets needs them on the host: on CUDA one copy (a sync), so varlen calls are
  // not captured in CUDA graphs.
  {
    const auto host = cu.cpu();
    const int32_t* c = host.data_ptr<int32_t>();
    TORCH_CHECK_VALUE(c[0] == 0, "sf_attention_varlen: cu_seqlens[0] must be 0, got ", c[0]);
    TORCH_CHECK_VALUE(c[l.batch] == l.rows, "sf_attention_varlen: cu_seqlens[-1] (", c[l.batch],
                      ") must equal the number of tokens in q (", l.rows, ")");
    for (int64_t b = 0; b < l.batch; ++b) {
      const int64_t len = c[b + 1] - c[b];
      TORCH_CHECK_VALUE(len >= 0, "sf_attention_varlen: cu_seqlens must be non-decreasing, but ",
                        "cu_seqlens[", b + 1, "] < cu_seqlens[", b, "]");
      TORCH_CHECK_VALUE(len <= max_seqlen, "sf_attention_varlen: sequence ", b, " has length ", len,
                        " > max_seqlen ", max_seqlen);
      TORCH_CHECK_VALUE(shift != ShiftMode::kRoll || len % group_size == 0,
                        "sf_attention_varlen: shift='roll' requires every sequence length to be a ",
                        "multiple of group_size ", group_size, ", but sequence ", b, " has length ", len);
    }
  }
  return l;
}

void fill_common(SfAttentionParams& p, const Layout& l, const at::Tensor& q, const at::Tensor& k,
                 const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                 const std::optional<at::Tensor>& cu_seqlens, int64_t group_size,
                 int64_t num_sinks, ShiftMode shift, double softmax_scale) {
  const int64_t r = l.varlen ? 0 : 1;  // index of the row dimension
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.q_batch_stride = l.varlen ? 0 : q.stride(0);
  p.k_batch_stride = l.varlen ? 0 : k.stride(0);
  p.v_batch_stride = l.varlen ? 0 : v.stride(0);
  p.o_batch_stride = l.varlen ? 0 : out.stride(0);
  p.q_row_stride = q.stride(r);
  p.k_row_stride = k.stride(r);
  p.v_row_stride = v.stride(r);
  p.o_row_stride = out.stride(r);
  p.q_head_stride = q.stride(r + 1);
  p.k_head_stride = k.stride(r + 1);
  p.v_head_stride = v.stride(r + 1);
  p.o_head_stride = out.stride(r + 1);
  p.cu_seqlens = l.varlen ? cu_seqlens->data_ptr<int32_t>() : nullptr;
  p.batch = static_cast<int>(l.batch);
  p.seqlen = static_cast<int>(l.seqlen);
  p.total_rows = l.rows;
  p.num_heads_q = static_cast<int>(l.heads_q);
  p.num_heads_kv = static_cast<int>(l.heads_kv);
  p.head_dim = static_cast<int>(l.head_dim);
  p.group_size = static_cast<int>(group_size);
  p.num_sinks = static_cast<int>(num_sinks);
  p.shift = shift;
  p.softmax_scale = static_cast<float>(softmax_scale);
}

void check_lse(const at::Tensor& lse, const Layout& l, const at::Tensor& q, const char* op) {
  TORCH_CHECK_VALUE(lse.scalar_type() == at::kFloat && lse.dim() == 2 && lse.size(0) == l.heads_q &&
                        lse.size(1) == l.rows && lse.is_contiguous() && lse.device() == q.device(),
                    op, ": lse must be contiguous float32 [", l.heads_q, ", ", l.rows,
                    "] on q's device (from sf_attention_fwd), got ", lse.scalar_type(), " ", lse.sizes(), " on ",
                    lse.device());
}

}  // namespace

SfAttentionFwd prepare_sf_attention_fwd(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                                        const std::optional<at::Tensor>& cu_seqlens, int64_t max_seqlen,
                                        int64_t group_size, int64_t num_sinks, c10::string_view shift_name,
                                        double softmax_scale) {
  const ShiftMode shift = parse_shift(shift_name);
  const Layout l = check_inputs(q_in, k_in, v_in, cu_seqlens, max_seqlen, group_size, num_sinks, shift);
  SfAttentionFwd c;
  c.q = last_dim_contiguous(q_in);
  c.k = last_dim_contiguous(k_in);
  c.v = last_dim_contiguous(v_in);
  c.out = at::empty(c.q.sizes(), c.q.options());
  c.lse = at::empty({l.heads_q, l.rows}, c.q.options().dtype(at::kFloat));
  c.empty = l.rows == 0 || l.batch == 0 || l.heads_q == 0;
  if (!c.empty)
    fill_common(c.params, l, c.q, c.k, c.v, c.out, c.lse, cu_seqlens, group_size, num_sinks, shift, softmax_scale);
  return c;
}

SfAttentionBwd prepare_sf_attention_bwd(const at::Tensor& dout_in, const at::Tensor& q_in, const at::Tensor& k_in,
                                        const at::Tensor& v_in, const at::Tensor& out_in, const at::Tensor& lse,
                                        const std::optional<at::Tensor>& cu_seqlens, int64_t max_seqlen,
                                        int64_t group_size, int64_t num_sinks, c10::string_view shift_name,
                                        double softmax_scale) {
  const ShiftMode shift = parse_shift(shift_name);
  const Layout l = check_inputs(q_in, k_in, v_in, cu_seqlens, max_seqlen, group_size, num_sinks, shift);
  TORCH_CHECK_VALUE(dout_in.sizes() == q_in.sizes(), "sf_attention_bwd: dout must have q's shape ",
                    q_in.sizes(), ", got ", dout_in.sizes());
  TORCH_CHECK_VALUE(out_in.sizes() == q_in.sizes(), "sf_attention_bwd: out must have q's shape ",
                    q_in.sizes(), ", got ", out_in.sizes());
  check_same(dout_in, "dout", q_in);
  check_same(out_in, "out", q_in);
  check_lse(lse, l, q_in, "sf_attention_bwd");
  SfAttentionBwd c;
  c.q = last_dim_contiguous(q_in);
  c.k = last_dim_contiguous(k_in);
  c.v = last_dim_contiguous(v_in);
  c.out = last_dim_contiguous(out_in);
  c.dout = last_dim_contiguous(dout_in);
  c.dq = at::empty(c.q.sizes(), c.q.options());
  c.dk = at::empty(c.k.sizes(), c.k.options());
  c.dv = at::empty(c.v.sizes(), c.v.options());
  c.empty = l.rows == 0 || l.batch == 0 || l.heads_q == 0;
  if (c.empty) {
    c.dq.zero_();
    c.dk.zero_();
    c.dv.zero_();
    return c;
  }
  c.delta = at::empty({l.heads_q, l.rows}, c.q.options().dtype(at::kFloat));
  auto& p = c.params;
  // out's strides stand in for the forward output; the kernels read it only to form delta.
  fill_common(p, l, c.q, c.k, c.v, c.out, lse, cu_seqlens, group_size, num_sinks, shift, softmax_scale);
  const int64_t r = l.varlen ? 0 : 1;
  p.out = const_cast<void*>(c.out.data_ptr());
  p.dout = c.dout.data_ptr();
  p.dq = c.dq.data_ptr();
  p.dk = c.dk.data_ptr();
  p.dv = c.dv.data_ptr();
  p.delta = c.delta.data_ptr<float>();
  p.dq_accum = nullptr;
  p.do_batch_stride = l.varlen ? 0 : c.dout.stride(0);
  p.dq_batch_stride = l.varlen ? 0 : c.dq.stride(0);
  p.dk_batch_stride = l.varlen ? 0 : c.dk.stride(0);
  p.dv_batch_stride = l.varlen ? 0 : c.dv.stride(0);
  p.do_row_stride = c.dout.stride(r);
  p.dq_row_stride = c.dq.stride(r);
  p.dk_row_stride = c.dk.stride(r);
  p.dv_row_stride = c.dv.stride(r);
  p.do_head_stride = c.dout.stride(r + 1);
  p.dq_head_stride = c.dq.stride(r + 1);
  p.dk_head_stride = c.dk.stride(r + 1);
  p.dv_head_stride = c.dv.stride(r + 1);
  return c;
}

ColumnScores prepare_column_scores(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& lse,
                                   const std::optional<at::Tensor>& cu_seqlens, int64_t max_seqlen,
                                   int64_t group_size, int64_t num_sinks, c10::string_view shift_name,
                                   double softmax_scale) {
  const ShiftMode shift = parse_shift(shift_name);
  const Layout l = check_inputs(q_in, k_in, k_in, cu_seqlens, max_seqlen, group_size, num_sinks, shift);
  check_lse(lse, l, q_in, "column_scores");
  ColumnScores c;
  c.q = last_dim_contiguous(q_in);
  c.k = last_dim_contiguous(k_in);
  c.out = at::zeros({l.rows, l.heads_kv}, c.q.options().dtype(at::kFloat));
  c.empty = l.rows == 0 || l.batch == 0 || l.heads_q == 0;
  if (!c.empty) {
    fill_common(c.params, l, c.q, c.k, c.k, c.q, lse, cu_seqlens, group_size, num_sinks, shift, softmax_scale);
    c.params.out = nullptr;
  }
  return c;
}

}  // namespace sinklora
