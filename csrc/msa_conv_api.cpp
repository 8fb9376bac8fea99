// csrc/msa_conv_api.cpp: the device-agnostic half of the MSA-Conv ops (msa_conv2d_fwd,
// msa_conv2d_bwd): argument checks (docs/errors.md), output allocation and the kernel parameters.
// The per-device entry points (csrc/cpu/, csrc/cuda/) call these, then run.
#include <ATen/ATen.h>

#include <limits>
#include <string>

#include "api_checks.h"
#include "msa_conv_api.h"

namespace sinklora {
namespace {

constexpr int64_t kMaxHeadDim = 256;
constexpr int64_t kIntMax = std::numeric_limits<int32_t>::max();

MsaPadding parse_padding(c10::string_view padding) {
  if (padding == "zero") return MsaPadding::kZero;
  if (padding == "mask") return MsaPadding::kMask;
  if (padding == "clamp") return MsaPadding::kClamp;
  TORCH_CHECK_VALUE(false, "msa_conv2d: padding must be one of 'zero', 'mask', 'clamp', got '",
                    std::string(padding), "'");
}

void check_same(const at::Tensor& a, const char* name, const at::Tensor& q) {
  check_like(a, name, q, "msa_conv2d");
  TORCH_CHECK_VALUE(a.sizes() == q.sizes(), "msa_conv2d: ", name, " must have q's shape ", q.sizes(),
                    " [B, H, W, heads, D], got ", a.sizes());
}

struct Geometry {
  int64_t batch, height, width, heads, head_dim;
  MsaAxis rows, cols;
  MsaPadding padding;
};

Geometry check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, c10::IntArrayRef kernel_size,
                      c10::IntArrayRef dilation, c10::string_view padding_name) {
  const auto dtype = q.scalar_type();
  TORCH_CHECK_VALUE(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
                    "msa_conv2d: q must be float32, float16 or bfloat16, got ", dtype);
  TORCH_CHECK_VALUE(q.dim() == 5, "msa_conv2d: q must be [B, H, W, heads, D], got ", q.sizes());
  check_same(k, "k", q);
  check_same(v, "v", q);
  TORCH_CHECK_VALUE(kernel_size.size() == 2, "msa_conv2d: kernel_size must be an int or (Kh, Kw), got ",
                    kernel_size);
  TORCH_CHECK_VALUE(dilation.size() == 2, "msa_conv2d: dilation must be an int or (dh, dw), got ", dilation);
  for (int a = 0; a < 2; ++a) {
    TORCH_CHECK_VALUE(kernel_size[a] >= 1 && kernel_size[a] % 2 == 1 && kernel_size[a] <= kIntMax,
                      "msa_conv2d: kernel_size must be odd and >= 1 in each dimension, got ", kernel_size);
    TORCH_CHECK_VALUE(dilation[a] >= 1 && dilation[a] <= kIntMax,
                      "msa_conv2d: dilation must be >= 1 in each dimension, got ", dilation);
  }
  Geometry g{};
  g.padding = parse_padding(padding_name);
  g.batch = q.size(0);
  g.height = q.size(1);
  g.width = q.size(2);
  g.heads = q.size(3);
  g.head_dim = q.size(4);
  TORCH_CHECK_VALUE(g.head_dim >= 1 && g.head_dim <= kMaxHeadDim, "msa_conv2d: head_dim must be in [1, ",
                    kMaxHeadDim, "], got ", g.head_dim);
  TORCH_CHECK_VALUE(g.height <= kIntMax && g.width <= kIntMax && g.batch <= kIntMax && g.heads <= kIntMax,
                    "msa_conv2d: every dimension of q must be < 2^31, got ", q.sizes());
  const int64_t taps = kernel_size[0] * kernel_size[1];
  TORCH_CHECK_VALUE(taps <= (int64_t(1) << 16), "msa_conv2d: kernel_size has ", taps,
                    " taps; at most 65536 (Kh * Kw) are supported");
  if (g.padding == MsaPadding::kClamp) {
    TORCH_CHECK_VALUE(kernel_size[0] * dilation[0] <= g.height && kernel_size[1] * dilation[1] <= g.width,
                      "msa_conv2d: padding='clamp' requires kernel_size * dilation <= the map in each dimension "
                      "(NATTEN's rule), got kernel_size ",
                      kernel_size, ", dilation ", dilation, " on a ", g.height, "x", g.width,
                      " map; use padding='zero' or 'mask' for any size");
  }
  const auto axis = [&](int a, int64_t n) {
    const int kk = static_cast<int>(kernel_size[a]);
    return MsaAxis{static_cast<int>(n), kk, static_cast<int>(dilation[a]), (kk - 1) / 2, g.padding};
  };
  g.rows = axis(0, g.height);
  g.cols = axis(1, g.width);
  return g;
}

// kv_shift: flat [heads * 2] of (sy, sx); -> int32 CPU [heads, 2] in [0, H) x [0, W).
at::Tensor reduce_shift(at::OptionalIntArrayRef kv_shift, const Geometry& g) {
  if (!kv_shift.has_value()) return {};
  const auto s = *kv_shift;
  TORCH_CHECK_VALUE(static_cast<int64_t>(s.size()) == 2 * g.heads,
                    "msa_conv2d: kv_shift must be [heads, 2] integers (sy, sx) with heads = ", g.heads, ", got ",
                    s.size(), " values");
  auto out = at::empty({g.heads, 2}, at::TensorOptions().dtype(at::kInt));
  int32_t* o = out.data_ptr<int32_t>();
  const auto wrap = [](int64_t x, int64_t n) { return n == 0 ? int64_t(0) : ((x % n) + n) % n; };
  for (int64_t h = 0; h < g.heads; ++h) {
    o[2 * h] = static_cast<int32_t>(wrap(s[2 * h], g.height));
    o[2 * h + 1] = static_cast<int32_t>(wrap(s[2 * h + 1], g.width));
  }
  return out;
}

void strides(int64_t* dst, const at::Tensor& t) {
  for (int d = 0; d < 4; ++d) dst[d] = t.stride(d);
}

void fill_common(MsaConvParams& p, const Geometry& g, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                 const at::Tensor& out, const at::Tensor& lse, const at::Tensor& shift, double softmax_scale) {
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.out = out.defined() ? out.data_ptr() : nullptr;
  p.lse = lse.data_ptr<float>();
  strides(p.q_stride, q);
  strides(p.k_stride, k);
  strides(p.v_stride, v);
  strides(p.o_stride, out);
  p.batch = static_cast<int>(g.batch);
  p.height = static_cast<int>(g.height);
  p.width = static_cast<int>(g.width);
  p.heads = static_cast<int>(g.heads);
  p.head_dim = static_cast<int>(g.head_dim);
  p.rows = g.rows;
  p.cols = g.cols;
  p.shift = shift.defined() ? shift.data_ptr<int32_t>() : nullptr;
  p.softmax_scale = static_cast<float>(softmax_scale);
}

bool nothing_to_do(const Geometry& g) {
  return g.batch == 0 || g.height == 0 || g.width == 0 || g.heads == 0;
}

}  // namespace

MsaConvFwd prepare_msa_conv2d_fwd(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                                  c10::IntArrayRef kernel_size, c10::IntArrayRef dilation,
                                  c10::string_view padding, at::OptionalIntArrayRef kv_shift,
                                  double softmax_scale) {
  const Geometry g = check_inputs(q_in, k_in, v_in, kernel_size, dilation, padding);
  MsaConvFwd c;
  c.shift = reduce_shift(kv_shift, g);
  c.q = last_dim_contiguous(q_in);
  c.k = last_dim_contiguous(k_in);
  c.v = last_dim_contiguous(v_in);
  c.out = at::empty(c.q.sizes(), c.q.options());
  c.lse = at::empty({g.batch, g.height, g.width, g.heads}, c.q.options().dtype(at::kFloat));
  c.empty = nothing_to_do(g);
  if (!c.empty) fill_common(c.params, g, c.q, c.k, c.v, c.out, c.lse, c.shift, softmax_scale);
  return c;
}

MsaConvBwd prepare_msa_conv2d_bwd(const at::Tensor& dout_in, const at::Tensor& q_in, const at::Tensor& k_in,
                                  const at::Tensor& v_in, const at::Tensor& out_in, const at::Tensor& lse,
                                  c10::IntArrayRef kernel_size, c10::IntArrayRef dilation,
                                  c10::string_view padding, at::OptionalIntArrayRef kv_shift,
                                  double softmax_scale) {
  const Geometry g = check_inputs(q_in, k_in, v_in, kernel_size, dilation, padding);
  check_same(dout_in, "dout", q_in);
  check_same(out_in, "out", q_in);
  TORCH_CHECK_VALUE(lse.scalar_type() == at::kFloat && lse.dim() == 4 && lse.size(0) == g.batch &&
                        lse.size(1) == g.height && lse.size(2) == g.width && lse.size(3) == g.heads &&
                        lse.is_contiguous() && lse.device() == q_in.device(),
                    "msa_conv2d_bwd: lse must be contiguous float32 [", g.batch, ", ", g.height, ", ", g.width, ", ",
                    g.heads, "] on q's device (from msa_conv2d_fwd), got ", lse.scalar_type(), " ", lse.sizes(),
                    " on ", lse.device());
  MsaConvBwd c;
  c.shift = reduce_shift(kv_shift, g);
  c.q = last_dim_contiguous(q_in);
  c.k = last_dim_contiguous(k_in);
  c.v = last_dim_contiguous(v_in);
  c.out = last_dim_contiguous(out_in);
  c.dout = last_dim_contiguous(dout_in);
  c.dq = at::empty(c.q.sizes(), c.q.options());
  c.dk = at::empty(c.k.sizes(), c.k.options());
  c.dv = at::empty(c.v.sizes(), c.v.options());
  c.empty = nothing_to_do(g);
  if (c.empty) {
    c.dq.zero_();
    c.dk.zero_();
    c.dv.zero_();
    return c;
  }
  c.delta = at::empty({g.batch, g.height, g.width, g.heads}, c.q.options().dtype(at::kFloat));
  auto& p = c.params;
  fill_common(p, g, c.q, c.k, c.v, c.out, lse, c.shift, softmax_scale);
  p.dout = c.dout.data_ptr();
  p.dq = c.dq.data_ptr();
  p.dk = c.dk.data_ptr();
  p.dv = c.dv.data_ptr();
  p.delta = c.delta.data_ptr<float>();
  strides(p.do_stride, c.dout);
  strides(p.dq_stride, c.dq);
  strides(p.dk_stride, c.dk);
  strides(p.dv_stride, c.dv);
  return c;
}

}  // namespace sinklora
