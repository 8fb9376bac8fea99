// Paged KV cache on the CPU: decode with fused H2O score accumulation, cache writes, eviction.
//
// Decode: one work item per (sequence, kv head) reads each K and V row once for all query heads of
// its group (GQA), keeps the exact softmax probabilities of the step and adds their sum over the
// group into the slot's score, all in the same pass over V.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <vector>

#include "paged_kv_launch.h"
#include "vec_math.h"

namespace sinklora {
namespace {

template <typename T>
__attribute__((always_inline)) inline void decode_item(const PagedDecodeParams& p, int b, int hk, float* buf) {
  const int d = p.head_dim;
  const int group = p.num_heads_q / p.num_heads_kv;
  const int len = p.seq_lens[b];
  const T* q = static_cast<const T*>(p.q);
  const T* k_cache = static_cast<const T*>(p.k_cache);
  const T* v_cache = static_cast<const T*>(p.v_cache);
  T* out = static_cast<T*>(p.out) + (int64_t(b) * p.num_heads_q + int64_t(hk) * group) * d;

  float* qf = buf;                           // [group, d], pre-scaled
  float* acc = qf + group * d;               // [group, d]
  float* logits = acc + group * d;           // [group, len] -> probabilities
  for (int h = 0; h < group; ++h) {
    const T* qh = q + int64_t(b) * p.q_batch_stride + int64_t(hk * group + h) * p.q_head_stride;
    for (int c = 0; c < d; ++c) qf[h * d + c] = static_cast<float>(qh[c]) * p.softmax_scale;
  }
  std::fill(acc, acc + group * d, 0.f);
  if (len <= 0) {
    for (int i = 0; i < group * d; ++i) out[i] = static_cast<T>(0.f);
    return;
  }

  for (int t = 0; t < len; ++t) {
    const T* kr = k_cache + p.slot_offset(p.k, b, t, hk);
    for (int h = 0; h < group; ++h) {
      const float* qh = qf + h * d;
      float s = 0.f;
#pragma omp simd reduction(+ : s)
      for (int c = 0; c < d; ++c) s += qh[c] * static_cast<float>(kr[c]);
      logits[int64_t(h) * len + t] = s;
    }
  }
  for (int h = 0; h < group; ++h) {
    float* l = logits + int64_t(h) * len;
    float mx = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : mx)
    for (int t = 0; t < len; ++t) mx = std::max(mx, l[t]);
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int t = 0; t < len; ++t) {
      l[t] = exp_approx(l[t] - mx);
      sum += l[t];
    }
    const float inv = 1.f / sum;
#pragma omp simd
    for (int t = 0; t < len; ++t) l[t] *= inv;
  }
  for (int t = 0; t < len; ++t) {
    const T* vr = v_cache + p.slot_offset(p.v, b, t, hk);
    float mass = 0.f;
    for (int h = 0; h < group; ++h) {
      const float pr = logits[int64_t(h) * len + t];
      float* ah = acc + h * d;
      mass += pr;
#pragma omp simd
      for (int c = 0; c < d; ++c) ah[c] += pr * static_cast<float>(vr[c]);
    }
    if (p.scores) p.scores[p.score_offset(b, t, hk)] += mass;
  }
  for (int i = 0; i < group * d; ++i) out[i] = static_cast<T>(acc[i]);
}

SF_MULTIVERSION void decode_item_f32(const PagedDecodeParams& p, int b, int hk, float* buf) {
  decode_item<float>(p, b, hk, buf);
}
SF_MULTIVERSION void decode_item_f16(const PagedDecodeParams& p, int b, int hk, float* buf) {
  decode_item<c10::Half>(p, b, hk, buf);
}
SF_MULTIVERSION void decode_item_bf16(const PagedDecodeParams& p, int b, int hk, float* buf) {
  decode_item<c10::BFloat16>(p, b, hk, buf);
}

template <typename T>
void write_rows(const PagedWriteParams& p) {
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  T* kc = static_cast<T*>(p.k_cache);
  T* vc = static_cast<T*>(p.v_cache);
  const int64_t items = int64_t(p.rows) * p.num_heads_kv;
  at::parallel_for(0, items, 64, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int r = static_cast<int>(item / p.num_heads_kv);
      const int h = static_cast<int>(item % p.num_heads_kv);
      const int32_t slot = p.slots[item];
      if (slot < 0) continue;
      const int64_t block = slot / p.block_size, off = slot % p.block_size;
      std::memcpy(kc + block * p.kc.block_stride + off * p.kc.slot_stride + h * p.kc.head_stride,
                  k + r * p.k_row_stride + h * p.k_head_stride, sizeof(T) * p.head_dim);
      std::memcpy(vc + block * p.vc.block_stride + off * p.vc.slot_stride + h * p.vc.head_stride,
                  v + r * p.v_row_stride + h * p.v_head_stride, sizeof(T) * p.head_dim);
      const int64_t meta = int64_t(slot) * p.num_heads_kv + h;
      if (p.scores) p.scores[meta] = p.new_scores ? p.new_scores[item] : 0.f;
      if (p.positions) p.positions[meta] = p.token_positions[r];
    }
  });
}

}  // namespace

void paged_decode_cpu(const PagedDecodeParams& p, c10::ScalarType dtype) {
  const int group = p.num_heads_q / p.num_heads_kv;
  const int64_t max_len = int64_t(p.max_blocks_per_seq) * p.block_size;
  const int64_t buf_floats = 2 * int64_t(group) * p.head_dim + int64_t(group) * max_len;
  auto item = dtype == c10::ScalarType::Float  ? decode_item_f32
              : dtype == c10::ScalarType::Half ? decode_item_f16
                                               : decode_item_bf16;
  TORCH_CHECK(dtype == c10::ScalarType::Float || dtype == c10::ScalarType::Half || dtype == c10::ScalarType::BFloat16,
              "paged_decode_cpu: unsupported dtype ", dtype);
  at::parallel_for(0, int64_t(p.batch) * p.num_heads_kv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(buf_floats);
    for (int64_t i = begin; i < end; ++i)
      item(p, static_cast<int>(i / p.num_heads_kv), static_cast<int>(i % p.num_heads_kv), buf.data());
  });
}

void paged_write_cpu(const PagedWriteParams& p, c10::ScalarType dtype) {
  switch (dtype) {
    case c10::ScalarType::Float: write_rows<float>(p); break;
    case c10::ScalarType::Half: write_rows<c10::Half>(p); break;
    case c10::ScalarType::BFloat16: write_rows<c10::BFloat16>(p); break;
    default: TORCH_CHECK(false, "paged_write_cpu: unsupported dtype ", dtype);
  }
}

void h2o_evict_cpu(const EvictParams& p) {
  at::parallel_for(0, int64_t(p.batch) * p.num_heads_kv, 16, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int b = static_cast<int>(item / p.num_heads_kv);
      const int h = static_cast<int>(item % p.num_heads_kv);
      const int len = p.seq_lens[b];
      int32_t newest = std::numeric_limits<int32_t>::min();
      for (int t = 0; t < len; ++t) newest = std::max(newest, p.positions[p.meta_offset(b, t, h)]);
      int victim = -1;
      float best_score = 0.f;
      int32_t best_pos = 0;
      for (int t = 0; t < len; ++t) {
        const int64_t m = p.meta_offset(b, t, h);
        const int32_t pos = p.positions[m];
        if (pos < p.num_sinks || int64_t(pos) > int64_t(newest) - p.recent) continue;
        const float score = p.policy == EvictPolicy::kH2O ? p.scores[m] : 0.f;
        if (victim < 0 || score < best_score || (score == best_score && pos < best_pos)) {
          victim = t;
          best_score = score;
          best_pos = pos;
        }
      }
      p.victims[item] = victim;
    }
  });
}

}  // namespace sinklora
