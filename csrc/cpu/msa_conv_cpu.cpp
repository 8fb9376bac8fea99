// csrc/cpu/msa_conv_cpu.cpp: MSA-Conv on the CPU (the *_cpu entry points of msa_conv2d_fwd and
// msa_conv2d_bwd, and their kernels). Fused: the forward keeps one query's logits (Kh * Kw floats)
// and writes out and the log-sum-exp; the backward recomputes probabilities from the log-sum-exp,
// race-free: dQ per query, dK/dV per key over the queries whose window holds it
// (MsaAxis::queries_of). kv_shift is index arithmetic (MsaConvParams::source_row / rolled_row).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "msa_conv_api.h"
#include "ops.h"
#include "static_switch.h"
#include "vec_math.h"

namespace sinklora {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Head dims with a compile-time loop bound (0: the run-time head_dim).
template <int D>
inline int dim(int d) {
  return D > 0 ? D : d;
}

template <int D, typename T>
inline void load(float* dst, const T* src, int d) {
  for (int c = 0; c < dim<D>(d); ++c) dst[c] = static_cast<float>(src[c]);
}

template <int D, typename T>
inline float dot(const float* a, const T* b, int d) {
  float s = 0.f;
  for (int c = 0; c < dim<D>(d); ++c) s += a[c] * static_cast<float>(b[c]);
  return s;
}

template <int D, typename T>
inline void axpy(float* acc, float w, const T* x, int d) {
  for (int c = 0; c < dim<D>(d); ++c) acc[c] += w * static_cast<float>(x[c]);
}

template <int D, typename T>
inline void store(T* dst, const float* src, float mul, int d) {
  for (int c = 0; c < dim<D>(d); ++c) dst[c] = static_cast<T>(src[c] * mul);
}

template <typename T>
inline const T* elem(const void* base, const int64_t* stride, int b, int y, int x, int h) {
  return static_cast<const T*>(base) + b * stride[0] + y * stride[1] + x * stride[2] + h * stride[3];
}

template <typename T>
inline T* elem_mut(void* base, const int64_t* stride, int b, int y, int x, int h) {
  return static_cast<T*>(base) + b * stride[0] + y * stride[1] + x * stride[2] + h * stride[3];
}

// One query's taps: the rolled rows / columns of its window (-1 for a padded tap) per axis.
struct Taps {
  std::vector<int> row, col;  // source row / column of k and v, or -1
  void resize(const MsaConvParams& p) {
    row.resize(p.rows.k);
    col.resize(p.cols.k);
  }
  // Fills the rows of query row i and returns the number of padded rows.
  int fill_rows(const MsaConvParams& p, int i, int h) {
    int pad = 0;
    for (int a = 0; a < p.rows.k; ++a) {
      const int y = p.rows.tap(i, a);
      row[a] = (y < 0 || y >= p.height) ? -1 : p.source_row(y, h);
      pad += row[a] < 0;
    }
    return pad;
  }
  int fill_cols(const MsaConvParams& p, int j, int h) {
    int pad = 0;
    for (int c = 0; c < p.cols.k; ++c) {
      const int x = p.cols.tap(j, c);
      col[c] = (x < 0 || x >= p.width) ? -1 : p.source_col(x, h);
      pad += col[c] < 0;
    }
    return pad;
  }
};

template <typename T, int D>
void forward(const MsaConvParams& p) {
  const int d = p.head_dim;
  const bool zero_pad = p.rows.padding == MsaPadding::kZero;
  at::parallel_for(0, int64_t(p.batch) * p.height, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(d), acc(d), logits(p.num_taps());
    Taps taps;
    taps.resize(p);
    for (int64_t bi = begin; bi < end; ++bi) {
      const int b = static_cast<int>(bi / p.height), i = static_cast<int>(bi % p.height);
      for (int h = 0; h < p.heads; ++h) {
        const int pad_rows = taps.fill_rows(p, i, h);
        for (int j = 0; j < p.width; ++j) {
          const int pad_cols = taps.fill_cols(p, j, h);
          load<D>(qf.data(), elem<T>(p.q, p.q_stride, b, i, j, h), d);
          for (int c = 0; c < d; ++c) qf[c] *= p.softmax_scale;
          // zero padding: every padded tap is a logit of 0
          const int n_pad = zero_pad ? p.rows.k * p.cols.k - (p.rows.k - pad_rows) * (p.cols.k - pad_cols) : 0;
          float m = n_pad > 0 ? 0.f : kNegInf;
          int n = 0;
          for (int a = 0; a < p.rows.k; ++a) {
            if (taps.row[a] < 0) continue;
            for (int c = 0; c < p.cols.k; ++c) {
              if (taps.col[c] < 0) continue;
              const float s = dot<D>(qf.data(), elem<T>(p.k, p.k_stride, b, taps.row[a], taps.col[c], h), d);
              logits[n++] = s;
              m = std::max(m, s);
            }
          }
          std::fill(acc.begin(), acc.end(), 0.f);
          float l = n_pad > 0 ? n_pad * std::exp(-m) : 0.f;
          n = 0;
          for (int a = 0; a < p.rows.k; ++a) {
            if (taps.row[a] < 0) continue;
            for (int c = 0; c < p.cols.k; ++c) {
              if (taps.col[c] < 0) continue;
              const float e = std::exp(logits[n++] - m);
              l += e;
              axpy<D>(acc.data(), e, elem<T>(p.v, p.v_stride, b, taps.row[a], taps.col[c], h), d);
            }
          }
          store<D>(elem_mut<T>(p.out, p.o_stride, b, i, j, h), acc.data(), 1.f / l, d);
          p.lse[p.lse_index(b, i, j, h)] = m + std::log(l);
        }
      }
    }
  });
}

template <typename T, int D>
void backward(const MsaConvBwdParams& p) {
  const int d = p.head_dim;
  const int64_t rows = int64_t(p.batch) * p.height;
  // delta = rowsum(dout * out)
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> of(d);
    for (int64_t bi = begin; bi < end; ++bi) {
      const int b = static_cast<int>(bi / p.height), i = static_cast<int>(bi % p.height);
      for (int j = 0; j < p.width; ++j)
        for (int h = 0; h < p.heads; ++h) {
          load<D>(of.data(), elem<T>(p.out, p.o_stride, b, i, j, h), d);
          p.delta[p.lse_index(b, i, j, h)] = dot<D>(of.data(), elem<T>(p.dout, p.do_stride, b, i, j, h), d);
        }
    }
  });
  // dq per query
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(d), dof(d), acc(d);
    Taps taps;
    taps.resize(p);
    for (int64_t bi = begin; bi < end; ++bi) {
      const int b = static_cast<int>(bi / p.height), i = static_cast<int>(bi % p.height);
      for (int h = 0; h < p.heads; ++h) {
        taps.fill_rows(p, i, h);
        for (int j = 0; j < p.width; ++j) {
          taps.fill_cols(p, j, h);
          const int64_t r = p.lse_index(b, i, j, h);
          const float lse = p.lse[r], delta = p.delta[r];
          load<D>(qf.data(), elem<T>(p.q, p.q_stride, b, i, j, h), d);
          for (int c = 0; c < d; ++c) qf[c] *= p.softmax_scale;
          load<D>(dof.data(), elem<T>(p.dout, p.do_stride, b, i, j, h), d);
          std::fill(acc.begin(), acc.end(), 0.f);
          for (int a = 0; a < p.rows.k; ++a) {
            if (taps.row[a] < 0) continue;
            for (int c = 0; c < p.cols.k; ++c) {
              if (taps.col[c] < 0) continue;
              const T* kp = elem<T>(p.k, p.k_stride, b, taps.row[a], taps.col[c], h);
              const float prob = std::exp(dot<D>(qf.data(), kp, d) - lse);
              const float dp = dot<D>(dof.data(), elem<T>(p.v, p.v_stride, b, taps.row[a], taps.col[c], h), d);
              axpy<D>(acc.data(), prob * (dp - delta), kp, d);
            }
          }
          store<D>(elem_mut<T>(p.dq, p.dq_stride, b, i, j, h), acc.data(), p.softmax_scale, d);
        }
      }
    }
  });
  // dk, dv per key: the queries whose tap (a, c) is this key's rolled position
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> kf(d), vf(d), qf(d), dkacc(d), dvacc(d);
    for (int64_t bu = begin; bu < end; ++bu) {
      const int b = static_cast<int>(bu / p.height), u = static_cast<int>(bu % p.height);
      for (int w = 0; w < p.width; ++w)
        for (int h = 0; h < p.heads; ++h) {
          const int y = p.rolled_row(u, h), x = p.rolled_col(w, h);
          load<D>(kf.data(), elem<T>(p.k, p.k_stride, b, u, w, h), d);
          load<D>(vf.data(), elem<T>(p.v, p.v_stride, b, u, w, h), d);
          std::fill(dkacc.begin(), dkacc.end(), 0.f);
          std::fill(dvacc.begin(), dvacc.end(), 0.f);
          for (int a = 0; a < p.rows.k; ++a) {
            int ilo, ihi;
            p.rows.queries_of(y, a, ilo, ihi);
            for (int i = ilo; i <= ihi; i += p.rows.d) {
              for (int c = 0; c < p.cols.k; ++c) {
                int jlo, jhi;
                p.cols.queries_of(x, c, jlo, jhi);
                for (int j = jlo; j <= jhi; j += p.cols.d) {
                  const int64_t r = p.lse_index(b, i, j, h);
                  load<D>(qf.data(), elem<T>(p.q, p.q_stride, b, i, j, h), d);
                  const T* dop = elem<T>(p.dout, p.do_stride, b, i, j, h);
                  const float prob = std::exp(dot<D>(qf.data(), elem<T>(p.k, p.k_stride, b, u, w, h), d) *
                                                  p.softmax_scale -
                                              p.lse[r]);
                  axpy<D>(dvacc.data(), prob, dop, d);
                  const float dp = dot<D>(vf.data(), dop, d);
                  axpy<D>(dkacc.data(), prob * (dp - p.delta[r]), qf.data(), d);
                }
              }
            }
          }
          store<D>(elem_mut<T>(p.dk, p.dk_stride, b, u, w, h), dkacc.data(), p.softmax_scale, d);
          store<D>(elem_mut<T>(p.dv, p.dv_stride, b, u, w, h), dvacc.data(), 1.f, d);
        }
    }
  });
}

template <typename F>
void dispatch(at::ScalarType dtype, int head_dim, const char* op, F&& run) {
  SINKLORA_DTYPE_SWITCH(dtype, T, float, c10::Half, c10::BFloat16, op, [&] {
    if (head_dim == 32) return run.template operator()<T, 32>();
    if (head_dim == 64) return run.template operator()<T, 64>();
    return run.template operator()<T, 0>();
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> msa_conv2d_fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                      c10::IntArrayRef kernel_size, c10::IntArrayRef dilation,
                                                      c10::string_view padding, at::OptionalIntArrayRef kv_shift,
                                                      double softmax_scale) {
  auto c = prepare_msa_conv2d_fwd(q, k, v, kernel_size, dilation, padding, kv_shift, softmax_scale);
  if (c.empty) return {c.out, c.lse};
  dispatch(c.q.scalar_type(), c.params.head_dim, "msa_conv2d",
           [&]<typename T, int D>() { forward<T, D>(c.params); });
  return {c.out, c.lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> msa_conv2d_bwd_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, c10::IntArrayRef kernel_size, c10::IntArrayRef dilation, c10::string_view padding,
    at::OptionalIntArrayRef kv_shift, double softmax_scale) {
  auto c = prepare_msa_conv2d_bwd(dout, q, k, v, out, lse, kernel_size, dilation, padding, kv_shift, softmax_scale);
  if (c.empty) return {c.dq, c.dk, c.dv};
  dispatch(c.q.scalar_type(), c.params.head_dim, "msa_conv2d_bwd",
           [&]<typename T, int D>() { backward<T, D>(c.params); });
  return {c.dq, c.dk, c.dv};
}

}  // namespace sinklora
