// csrc/msa_conv.h: MSA-Conv (TiC) window geometry and kernel parameters, shared by the CPU and CUDA
// kernels. The rule is docs/msa_conv.md, to the letter: query (i, j) of head h has the taps
// (a, c) in [0, Kh) x [0, Kw) at rows/columns MsaAxis::tap of its head's K/V map rolled by
// kv_shift[h]; one softmax over the taps. Rows and columns are independent (MsaAxis each).
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define MSA_HD __host__ __device__ __forceinline__
#else
#define MSA_HD inline
#endif

namespace sinklora {

enum class MsaPadding : int {
  kZero = 0,   // an outside tap is a key and value of zeros: logit 0, stays in the denominator
  kMask = 1,   // outside taps are left out of the softmax
  kClamp = 2,  // NATTEN: the window is shifted inside the map, per dilation group
};

// One axis (rows or columns) of the window: map length n, kernel k (odd), dilation d, radius r.
struct MsaAxis {
  int n, k, d, r;
  MsaPadding padding;

  // The coordinate of tap a (0 <= a < k) of query i in the rolled map; outside [0, n) only for
  // zero and mask padding (a padded tap).
  MSA_HD int tap(int i, int a) const {
    if (padding != MsaPadding::kClamp) return i + (a - r) * d;
    const int g = i % d, t = i / d;
    const int len = (n - g + d - 1) / d;  // length of the dilation group g
    int s = t - r;
    s = s < 0 ? 0 : s;
    s = s > len - k ? len - k : s;
    return (s + a) * d + g;
  }

  // The queries whose tap a is the rolled coordinate y (0 <= y < n): i = lo, lo + d, ..., hi
  // (none when lo > hi). Zero and mask padding: at most one query; clamp: a run of queries at
  // the map's borders share a window.
  MSA_HD void queries_of(int y, int a, int& lo, int& hi) const {
    if (padding != MsaPadding::kClamp) {
      const int i = y - (a - r) * d;
      lo = i;
      hi = (i >= 0 && i < n) ? i : i - 1;
      return;
    }
    const int g = y % d, u = y / d;
    const int len = (n - g + d - 1) / d;
    const int s = u - a;  // the window start every such query must have
    int t_lo = 1, t_hi = 0;
    if (s >= 0 && s <= len - k) {
      t_lo = s == 0 ? 0 : s + r;
      t_hi = s == len - k ? len - 1 : s + r;
    }
    lo = t_lo * d + g;
    hi = t_lo > t_hi ? lo - d : t_hi * d + g;
  }
};

// Forward parameters. q, k, v, out are [B, H, W, heads, D] with these element strides (last
// dimension contiguous); lse is float32 [B, H, W, heads], contiguous.
struct MsaConvParams {
  const void* q;
  const void* k;
  const void* v;
  void* out;
  float* lse;

  int64_t q_stride[4], k_stride[4], v_stride[4], o_stride[4];  // batch, row, column, head

  int batch, height, width, heads, head_dim;
  MsaAxis rows, cols;
  // [heads, 2] int32 (sy, sx) reduced to [0, H) x [0, W), or nullptr (no shift); on the device
  // of the tensors. Rolled coordinate y of head h reads row (y + sy) mod H of k and v.
  const int32_t* shift;
  float softmax_scale;

  MSA_HD int num_taps() const { return rows.k * cols.k; }
  MSA_HD int64_t lse_index(int b, int i, int j, int h) const {
    return ((int64_t(b) * height + i) * width + j) * heads + h;
  }
  MSA_HD int shift_y(int h) const { return shift ? shift[2 * h] : 0; }
  MSA_HD int shift_x(int h) const { return shift ? shift[2 * h + 1] : 0; }
  // Rolled coordinate -> the row / column of k and v it reads (y in [0, H)).
  MSA_HD int source_row(int y, int h) const {
    const int s = y + shift_y(h);
    return s >= height ? s - height : s;
  }
  MSA_HD int source_col(int x, int h) const {
    const int s = x + shift_x(h);
    return s >= width ? s - width : s;
  }
  // Row / column of k and v -> rolled coordinate.
  MSA_HD int rolled_row(int u, int h) const {
    const int s = u - shift_y(h);
    return s < 0 ? s + height : s;
  }
  MSA_HD int rolled_col(int u, int h) const {
    const int s = u - shift_x(h);
    return s < 0 ? s + width : s;
  }
};

// Backward: dout and out have their own strides ([B, H, W, heads, D]); dq, dk, dv have q's, k's
// and v's shapes with the strides given. delta is workspace float32 [B, H, W, heads]
// (rowsum(dout * out)), laid out like lse.
struct MsaConvBwdParams : MsaConvParams {
  const void* dout;
  void* dq;
  void* dk;
  void* dv;
  float* delta;
  int64_t do_stride[4], dq_stride[4], dk_stride[4], dv_stride[4];
};

}  // namespace sinklora
