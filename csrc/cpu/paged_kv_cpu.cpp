// csrc/cpu/paged_kv_cpu.cpp: the paged KV cache on the CPU (the *_cpu entry points of paged_decode,
// paged_write_, select_evictions and plan_paged, and their kernels): decode with fused H2O score accumulation, cache writes, eviction.
//
// Decode is split-KV (flash-decoding): a work item is (sequence b, chunk of slots), all kv heads at
// once, so in the dense layout each slot's K row and V row of every head is one contiguous read and
// the walk goes block by block through the cache (any block, slot and head strides are honoured). An
// item computes its chunk's logits for every query head, the chunk max m and sum l per head,
// e = exp(logit - m) and acc = sum e V. With one chunk per sequence that is already exact; otherwise
// a second pass merges the chunks of a sequence (log-sum-exp) into the output and adds each slot's
// exact probability summed over its GQA group, e exp(m - M) / L, to the slot's score.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "ops.h"
#include "paged_kv_api.h"
#include "static_switch.h"
#include "vec_math.h"

namespace sinklora {
namespace {

// Four dot products at once: independent accumulators hide the FMA latency that one reduction
// chain per dot would expose.
template <typename T>
__attribute__((always_inline)) inline void dot4(const float* const* q, const T* const* k, int d, float* s) {
  const float *q0 = q[0], *q1 = q[1], *q2 = q[2], *q3 = q[3];
  const T *k0 = k[0], *k1 = k[1], *k2 = k[2], *k3 = k[3];
  float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
  for (int c = 0; c < d; ++c) {
    s0 += q0[c] * static_cast<float>(k0[c]);
    s1 += q1[c] * static_cast<float>(k1[c]);
    s2 += q2[c] * static_cast<float>(k2[c]);
    s3 += q3[c] * static_cast<float>(k3[c]);
  }
  s[0] = s0, s[1] = s1, s[2] = s2, s[3] = s3;
}

// The rows (all kv heads) of slots [ta, ta + 4) of sequence b; a short last tile repeats its last
// slot. Returns how many are real. Also asks for the rows two blocks (at least 32 slots) ahead: the
// walk jumps from block to block, which the hardware prefetcher does not follow.
template <typename T>
__attribute__((always_inline)) inline int slot_tile(const PagedDecodeParams& p, const PagedCacheView& view,
                                                    const T* cache, int b, int ta, int t1, const T** rows) {
  const int m = std::min(4, t1 - ta);
  for (int u = 0; u < 4; ++u) rows[u] = cache + p.slot_offset(view, b, ta + std::min(u, m - 1), 0);
  // Only the head_dim elements of each kv head: the heads of a slot need not be adjacent (vLLM's
  // HND pages put a whole block between them).
  const int ahead = ta + std::max(2 * p.block_size, 32);
  const int64_t bytes = int64_t(p.head_dim) * sizeof(T);
  for (int u = 0; u < 4 && ahead + u < t1; ++u) {
    const T* row = cache + p.slot_offset(view, b, ahead + u, 0);
    for (int h = 0; h < p.num_heads_kv; ++h) {
      const char* head = reinterpret_cast<const char*>(row + h * view.head_stride);
      for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(head + off);
    }
  }
  return m;
}

// Slots [t0, t1) of sequence b. qf [Hq, D] (pre-scaled) -> e [Hq, t1 - t0], ml [Hq, 2], acc [Hq, D].
template <typename T>
__attribute__((always_inline)) inline void decode_chunk(const PagedDecodeParams& p, int b, int t0, int t1,
                                                         const float* qf, float* e, float* ml, float* acc) {
  const int d = p.head_dim, hkv = p.num_heads_kv, group = p.num_heads_q / hkv, hq = p.num_heads_q;
  const int n = t1 - t0;
  const T* k_cache = static_cast<const T*>(p.k_cache);
  const T* v_cache = static_cast<const T*>(p.v_cache);
  // logits, four slots at a time per query head
  for (int ta = t0; ta < t1; ta += 4) {
    const T* rows[4];
    const int m = slot_tile(p, p.k, k_cache, b, ta, t1, rows);
    for (int hk = 0; hk < hkv; ++hk) {
      const T* ks[4] = {rows[0] + hk * p.k.head_stride, rows[1] + hk * p.k.head_stride,
                        rows[2] + hk * p.k.head_stride, rows[3] + hk * p.k.head_stride};
      for (int g = 0; g < group; ++g) {
        const int h = hk * group + g;
        const float* qh = qf + h * d;
        const float* qs[4] = {qh, qh, qh, qh};
        float s[4];
        dot4<T>(qs, ks, d, s);
        float* eh = e + int64_t(h) * n + (ta - t0);
        for (int u = 0; u < m; ++u) eh[u] = s[u];
      }
    }
  }
  for (int h = 0; h < hq; ++h) {
    float* l = e + int64_t(h) * n;
    float mx = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : mx)
    for (int t = 0; t < n; ++t) mx = std::max(mx, l[t]);
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int t = 0; t < n; ++t) {
      l[t] = exp_approx(l[t] - mx);
      sum += l[t];
    }
    ml[2 * h] = mx;
    ml[2 * h + 1] = sum;
  }
  // acc += e V, four slots at a time: one load and store of the accumulator per four V rows
  std::fill(acc, acc + int64_t(hq) * d, 0.f);
  for (int ta = t0; ta < t1; ta += 4) {
    const T* rows[4];
    const int m = slot_tile(p, p.v, v_cache, b, ta, t1, rows);
    for (int hk = 0; hk < hkv; ++hk) {
      const T *v0 = rows[0] + hk * p.v.head_stride, *v1 = rows[1] + hk * p.v.head_stride,
              *v2 = rows[2] + hk * p.v.head_stride, *v3 = rows[3] + hk * p.v.head_stride;
      for (int g = 0; g < group; ++g) {
        const int h = hk * group + g;
        const float* eh = e + int64_t(h) * n + (ta - t0);
        const float p0 = eh[0], p1 = m > 1 ? eh[1] : 0.f, p2 = m > 2 ? eh[2] : 0.f, p3 = m > 3 ? eh[3] : 0.f;
        float* ah = acc + h * d;
#pragma omp simd
        for (int c = 0; c < d; ++c)
          ah[c] += p0 * static_cast<float>(v0[c]) + p1 * static_cast<float>(v1[c]) +
                   p2 * static_cast<float>(v2[c]) + p3 * static_cast<float>(v3[c]);
      }
    }
  }
}

SF_MULTIVERSION void decode_chunk_f32(const PagedDecodeParams& p, int b, int t0, int t1, const float* qf, float* e,
                                      float* ml, float* acc) {
  decode_chunk<float>(p, b, t0, t1, qf, e, ml, acc);
}
SF_MULTIVERSION void decode_chunk_f16(const PagedDecodeParams& p, int b, int t0, int t1, const float* qf, float* e,
                                      float* ml, float* acc) {
  decode_chunk<c10::Half>(p, b, t0, t1, qf, e, ml, acc);
}
SF_MULTIVERSION void decode_chunk_bf16(const PagedDecodeParams& p, int b, int t0, int t1, const float* qf, float* e,
                                       float* ml, float* acc) {
  decode_chunk<c10::BFloat16>(p, b, t0, t1, qf, e, ml, acc);
}

template <typename T>
void load_query(const PagedDecodeParams& p, int b, float* qf) {
  const T* q = static_cast<const T*>(p.q) + int64_t(b) * p.q_batch_stride;
  for (int h = 0; h < p.num_heads_q; ++h)
    for (int c = 0; c < p.head_dim; ++c)
      qf[h * p.head_dim + c] = static_cast<float>(q[int64_t(h) * p.q_head_stride + c]) * p.softmax_scale;
}

// scores[slot t of b, hk] += sum over the group's heads h of e[h, t - t0] * w[h]
void add_scores(const PagedDecodeParams& p, int b, int t0, int t1, const float* e, const float* w) {
  const int hkv = p.num_heads_kv, group = p.num_heads_q / hkv, n = t1 - t0;
  for (int t = t0; t < t1; ++t) {
    float* sc = p.scores + p.score_offset(b, t, 0);
    for (int hk = 0; hk < hkv; ++hk) {
      float mass = 0.f;
      for (int g = 0; g < group; ++g) mass += e[int64_t(hk * group + g) * n + (t - t0)] * w[hk * group + g];
      sc[hk] += mass;
    }
  }
}

template <typename T>
void store_out(const PagedDecodeParams& p, int b, const float* o) {
  T* out = static_cast<T*>(p.out) + int64_t(b) * p.num_heads_q * p.head_dim;
  for (int i = 0; i < p.num_heads_q * p.head_dim; ++i) out[i] = static_cast<T>(o[i]);
}

template <typename T>
void paged_decode_typed(const PagedDecodeParams& p) {
  using Chunk = void (*)(const PagedDecodeParams&, int, int, int, const float*, float*, float*, float*);
  const Chunk chunk_fn = std::is_same_v<T, float>       ? decode_chunk_f32
                         : std::is_same_v<T, c10::Half> ? decode_chunk_f16
                                                        : decode_chunk_bf16;
  const int hq = p.num_heads_q, d = p.head_dim, bs = p.block_size;
  const int capacity = p.max_blocks_per_seq * bs;
  auto len_of = [&](int b) { return std::clamp(p.seq_lens[b], 0, capacity); };
  int max_len = 0;
  for (int b = 0; b < p.batch; ++b) max_len = std::max(max_len, len_of(b));
  // enough items for every thread (4 per thread), chunks of at least 256 slots, whole blocks
  const int threads = at::get_num_threads();
  const int want = std::max(1, (4 * threads + p.batch - 1) / p.batch);
  const int splits = std::max(1, std::min(want, (max_len + 255) / 256));
  const int chunk = std::max(bs, (((max_len + splits - 1) / splits + bs - 1) / bs) * bs);
  const int64_t items = int64_t(p.batch) * splits;
  // several chunks per sequence: partial results wait for the merge
  std::vector<float> ml(splits > 1 ? items * hq * 2 : 0), acc(splits > 1 ? items * hq * d : 0);
  std::vector<float> e_all(splits > 1 && p.scores ? items * hq * chunk : 0);

  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(hq * d), local_e(e_all.empty() ? int64_t(hq) * chunk : 0), local_acc(hq * d),
        local_ml(2 * hq), w(hq);
    for (int64_t item = begin; item < end; ++item) {
      const int b = static_cast<int>(item / splits), c = static_cast<int>(item % splits);
      const int t0 = c * chunk, t1 = std::min(len_of(b), t0 + chunk);
      float* e = e_all.empty() ? local_e.data() : e_all.data() + item * hq * chunk;
      float* a = splits > 1 ? acc.data() + item * hq * d : local_acc.data();
      float* m = splits > 1 ? ml.data() + item * hq * 2 : local_ml.data();
      if (t0 >= t1) {
        for (int h = 0; h < hq; ++h) m[2 * h] = -std::numeric_limits<float>::infinity(), m[2 * h + 1] = 0.f;
        std::fill(a, a + hq * d, 0.f);
        if (splits == 1) store_out<T>(p, b, a);
        continue;
      }
      load_query<T>(p, b, qf.data());
      chunk_fn(p, b, t0, t1, qf.data(), e, m, a);
      if (splits > 1) continue;
      for (int h = 0; h < hq; ++h) {
        w[h] = 1.f / m[2 * h + 1];
        for (int i = 0; i < d; ++i) a[h * d + i] *= w[h];
      }
      store_out<T>(p, b, a);
      if (p.scores) add_scores(p, b, t0, t1, e, w.data());
    }
  });
  if (splits == 1) return;

  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> big_m(hq), big_l(hq), w(hq), o(hq * d);
    for (int64_t item = begin; item < end; ++item) {
      const int b = static_cast<int>(item / splits), c = static_cast<int>(item % splits);
      const float* seq_ml = ml.data() + int64_t(b) * splits * hq * 2;
      for (int h = 0; h < hq; ++h) {
        float mx = -std::numeric_limits<float>::infinity(), l = 0.f;
        for (int s = 0; s < splits; ++s) mx = std::max(mx, seq_ml[(s * hq + h) * 2]);
        for (int s = 0; s < splits; ++s)
          if (seq_ml[(s * hq + h) * 2 + 1] > 0.f) l += seq_ml[(s * hq + h) * 2 + 1] * std::exp(seq_ml[(s * hq + h) * 2] - mx);
        big_m[h] = mx, big_l[h] = l;
      }
      const int t0 = c * chunk, t1 = std::min(len_of(b), t0 + chunk);
      if (p.scores && t0 < t1) {
        const float* m = ml.data() + item * hq * 2;
        for (int h = 0; h < hq; ++h) w[h] = std::exp(m[2 * h] - big_m[h]) / big_l[h];
        add_scores(p, b, t0, t1, e_all.data() + item * hq * chunk, w.data());
      }
      if (c != 0) continue;
      std::fill(o.begin(), o.end(), 0.f);
      for (int s = 0; s < splits; ++s) {
        const float* m = seq_ml + s * hq * 2;
        const float* a = acc.data() + (int64_t(b) * splits + s) * hq * d;
        for (int h = 0; h < hq; ++h) {
          if (m[2 * h + 1] <= 0.f) continue;
          const float scale = std::exp(m[2 * h] - big_m[h]) / big_l[h];
          for (int i = 0; i < d; ++i) o[h * d + i] += a[h * d + i] * scale;
        }
      }
      store_out<T>(p, b, o.data());
    }
  });
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

static void select_evictions_kernel(const EvictParams& p) {
  const int64_t items = int64_t(p.batch) * p.num_heads_kv;
  std::vector<int32_t> newest(items, std::numeric_limits<int32_t>::min());
  std::vector<int64_t> span(items, 0);  // newest - oldest + 1: the most queries a slot's key has seen
  at::parallel_for(0, items, 16, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int b = static_cast<int>(item / p.num_heads_kv), h = static_cast<int>(item % p.num_heads_kv);
      int32_t hi = std::numeric_limits<int32_t>::min(), lo = std::numeric_limits<int32_t>::max();
      for (int t = 0; t < p.seq_lens[b]; ++t) {
        const int32_t pos = p.positions[p.meta_offset(b, t, h)];
        hi = std::max(hi, pos);
        lo = std::min(lo, pos);
      }
      newest[item] = hi;
      span[item] = p.seq_lens[b] > 0 ? int64_t(hi) - lo + 1 : 0;
    }
  });
  // A decaying mean rank (ema): one weight per age for the whole launch, the very values
  // query_weight gives per slot, instead of a powf per slot; ages past the table (no more entries
  // than the launch has slots) take query_weight itself.
  std::vector<float> weights;
  if (p.policy == EvictPolicy::kMean && p.score_decay != 1.f) {
    int64_t ages = 0, slots = 0;
    for (int64_t item = 0; item < items; ++item) {
      ages = std::max(ages, span[item]);
      slots += p.seq_lens[item / p.num_heads_kv];
    }
    ages = std::min(ages, slots);
    if (ages > 0) {
      weights.resize(ages + 1);
      at::parallel_for(1, ages + 1, 1024, [&](int64_t begin, int64_t end) {
        for (int64_t c = begin; c < end; ++c) weights[c] = query_weight(c, p.score_decay);
      });
    }
  }
  at::parallel_for(0, items, 16, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int b = static_cast<int>(item / p.num_heads_kv);
      const int h = static_cast<int>(item % p.num_heads_kv);
      const int len = p.seq_lens[b];
      const int32_t last = newest[item];
      int victim = -1;
      float best_score = 0.f;
      int32_t best_pos = 0;
      const bool decays = p.score_decay != 1.f;
      for (int t = 0; t < len; ++t) {
        const int64_t m = p.meta_offset(b, t, h);
        const int32_t pos = p.positions[m];
        const float raw = p.scores[m];
        if (decays) p.scores[m] = decayed_score(raw, p.score_decay);  // ranked on the score before it
        if (pos < p.num_sinks || int64_t(pos) > int64_t(last) - p.recent) continue;
        const int64_t age = int64_t(last) - pos + 1;
        const float score = age < int64_t(weights.size()) ? mean_rank(raw, weights[age])
                                                          : eviction_rank(p.policy, raw, pos, last, p.score_decay);
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

#define CPU_DTYPE_SWITCH(DTYPE, T, OP, ...) \
  SINKLORA_DTYPE_SWITCH(DTYPE, T, float, c10::Half, c10::BFloat16, OP, __VA_ARGS__)

at::Tensor paged_decode_cpu(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& block_tables, const at::Tensor& seq_lens, double softmax_scale,
                            const std::optional<at::Tensor>& scores, const std::optional<at::Tensor>& plan) {
  auto c = prepare_paged_decode(q, k_cache, v_cache, block_tables, seq_lens, softmax_scale, scores, plan);
  if (!c.empty) CPU_DTYPE_SWITCH(c.q.scalar_type(), T, "paged_decode", [&] { paged_decode_typed<T>(c.params); });
  return c.out;
}

void paged_write_cpu(const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_cache, const at::Tensor& v_cache,
                     const at::Tensor& slots, const std::optional<at::Tensor>& scores,
                     const std::optional<at::Tensor>& new_scores, const std::optional<at::Tensor>& positions,
                     const std::optional<at::Tensor>& token_positions, const std::optional<at::Tensor>& plan) {
  auto c = prepare_paged_write(k, v, k_cache, v_cache, slots, scores, new_scores, positions, token_positions, plan);
  if (!c.empty) CPU_DTYPE_SWITCH(c.k.scalar_type(), T, "paged_write_", [&] { write_rows<T>(c.params); });
}

at::Tensor select_evictions_cpu(const at::Tensor& scores, const at::Tensor& positions, const at::Tensor& block_tables,
                                const at::Tensor& seq_lens, int64_t num_sinks, int64_t recent,
                                c10::string_view policy, double score_decay, const std::optional<at::Tensor>& plan) {
  auto c = prepare_select_evictions(scores, positions, block_tables, seq_lens, num_sinks, recent, policy, score_decay,
                                    plan);
  if (!c.empty) select_evictions_kernel(c.params);
  return c.victims;
}

// CPU decode has no split sizes to plan: the plan only records what it validated.
at::Tensor plan_paged_cpu(const at::Tensor& k_cache, const std::optional<at::Tensor>& block_tables,
                          const std::optional<at::Tensor>& seq_lens, const std::optional<at::Tensor>& slots,
                          int64_t num_heads_q) {
  return prepare_paged_plan(k_cache, block_tables, seq_lens, slots, num_heads_q);
}

}  // namespace sinklora
