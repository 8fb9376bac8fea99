// csrc/sf_attention.h: SF-Attn / S²-Attn pattern and kernel parameters, shared by the CPU and CUDA kernels.
// The visibility rule is docs/attention.md, to the letter; everything else here is a tiling aid derived from it.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define SF_HD __host__ __device__ __forceinline__
#else
#define SF_HD inline
#endif

namespace sinklora {

enum class ShiftMode : int { kNone = 0, kNoWrap = 1, kRoll = 2 };

// Half-open interval [lo, hi) of token positions within one sequence.
struct Span {
  int lo, hi;
};

// Up to three disjoint, sorted spans (sinks, the segment, the wrapped tail of `roll`).
struct SpanList {
  Span span[3];
  int count;

  SF_HD void add(int lo, int hi) {
    if (lo >= hi) return;
    // Spans are added in any order; keep them sorted and merged.
    Span s{lo, hi};
    Span merged[4];
    int n = 0;
    bool placed = false;
    for (int t = 0; t < count; ++t) {
      if (!placed && s.lo < span[t].lo) { merged[n++] = s; placed = true; }
      merged[n++] = span[t];
    }
    if (!placed) merged[n++] = s;
    count = 0;
    for (int t = 0; t < n; ++t) {
      if (count > 0 && merged[t].lo <= span[count - 1].hi) {
        if (merged[t].hi > span[count - 1].hi) span[count - 1].hi = merged[t].hi;
      } else {
        span[count++] = merged[t];
      }
    }
  }
};

// The pattern one query head follows over one sequence of length n.
struct SfPattern {
  int n;           // sequence length
  int g;           // group size (>= 1)
  int sinks;       // number of sink tokens
  int s;           // shift: g / 2 on shifted heads, 0 otherwise
  ShiftMode mode;  // kNone on unshifted heads

  SF_HD static SfPattern make(int n, int g, int sinks, ShiftMode shift, int head, int num_heads_q) {
    const bool shifted = shift != ShiftMode::kNone && head >= num_heads_q / 2;
    return SfPattern{n, g, sinks, shifted ? g / 2 : 0, shifted ? shift : ShiftMode::kNone};
  }

  SF_HD bool visible(int i, int j) const {
    if (mode == ShiftMode::kRoll) {
      const int pi = (i - s + n) % n;
      const int pj = (j - s + n) % n;
      return (pi / g == pj / g && pj <= pi) || (j < sinks && j <= i);
    }
    if (j > i) return false;
    return (i + s) / g == (j + s) / g || j < sinks;
  }

  // True when query i's segment wraps round the end of the sequence (`roll` only).
  SF_HD bool wraps(int i) const { return mode == ShiftMode::kRoll && i < s; }

  // First position of query i's segment (for rows that do not wrap).
  SF_HD int segment_start(int i) const {
    if (mode == ShiftMode::kRoll) return ((i - s) / g) * g + s;
    const int start = ((i + s) / g) * g - s;
    return start < 0 ? 0 : start;
  }

  // One past the last position of key j's segment, unclamped (may exceed n for `roll`).
  SF_HD int segment_end_unclamped(int j) const {
    if (mode == ShiftMode::kRoll) return j < s ? s : ((j - s) / g) * g + s + g;
    return ((j + s) / g) * g - s + g;
  }

  // Exactly the keys query i sees, as sorted disjoint spans.
  SF_HD SpanList row_key_spans(int i) const {
    SpanList out{};
    out.count = 0;
    out.add(0, sinks < i + 1 ? sinks : i + 1);
    if (wraps(i)) {
      out.add(0, i + 1);
      out.add(n - g + s, n);
    } else {
      out.add(segment_start(i), i + 1);
    }
    return out;
  }

  // Keys that some query in [q0, q1) may see: a superset, exact up to tile granularity.
  SF_HD SpanList key_spans(int q0, int q1) const {
    SpanList out{};
    out.count = 0;
    out.add(0, sinks < q1 ? sinks : q1);
    if (wraps(q0)) {
      out.add(0, q1);              // rows < s see [0, i]; rows >= s in this tile see [s, i]
      out.add(n - g + s, n);       // the wrapped tail of the last rolled group
    } else {
      out.add(segment_start(q0), q1);
    }
    return out;
  }

  // Queries that may see some key in [k0, k1): a superset, exact up to tile granularity.
  SF_HD SpanList query_spans(int k0, int k1) const {
    SpanList out{};
    out.count = 0;
    if (k0 < sinks) out.add(k0, n);  // sinks are seen by every later query
    if (mode == ShiftMode::kRoll) {
      if (k0 < s) out.add(k0, s);  // keys in [0, s) belong to the last rolled group
      const int last = k1 - 1;
      if (last >= s) {
        const int end = segment_end_unclamped(last);
        out.add(k0 > s ? k0 : s, end < n ? end : n);
        if (end > n) out.add(0, end - n);  // the last group wraps round to queries [0, s)
      }
      return out;
    }
    const int end = segment_end_unclamped(k1 - 1);
    out.add(k0, end < n ? end : n);
    return out;
  }

  // True when every (i, j) with i in [q0, q1) and j in [k0, k1) is visible.
  SF_HD bool tile_fully_visible(int q0, int q1, int k0, int k1) const {
    if (k1 - 1 > q0) return false;
    if (k1 <= sinks) return true;
    if (wraps(q0)) return false;
    return segment_start(q1 - 1) <= k0 && (mode != ShiftMode::kRoll || k0 >= s);
  }
};

// Strides are in elements. Sequence b's row i lives at
//   base + b * batch_stride + i * row_stride           when cu_seqlens == nullptr (fixed length seqlen),
//   base + (cu_seqlens[b] + i) * row_stride            otherwise (batch_stride unused).
struct SfAttentionParams {
  const void* q;
  const void* k;
  const void* v;
  void* out;
  float* lse;  // [num_heads_q, total_rows], row index = first row of the sequence + i

  int64_t q_batch_stride, q_row_stride, q_head_stride;
  int64_t k_batch_stride, k_row_stride, k_head_stride;
  int64_t v_batch_stride, v_row_stride, v_head_stride;
  int64_t o_batch_stride, o_row_stride, o_head_stride;

  const int32_t* cu_seqlens;  // [batch + 1] or nullptr
  int batch;
  int seqlen;      // fixed length, or max_seqlen for varlen
  int64_t total_rows;
  int num_heads_q, num_heads_kv, head_dim;

  int group_size, num_sinks;
  ShiftMode shift;
  float softmax_scale;

  SF_HD int seq_start(int b) const { return cu_seqlens ? cu_seqlens[b] : b * seqlen; }
  SF_HD int seq_len(int b) const { return cu_seqlens ? cu_seqlens[b + 1] - cu_seqlens[b] : seqlen; }
  SF_HD int64_t batch_offset(int b, int64_t batch_stride, int64_t row_stride) const {
    return cu_seqlens ? int64_t(cu_seqlens[b]) * row_stride : int64_t(b) * batch_stride;
  }
  SF_HD SfPattern pattern(int b, int head_q) const {
    return SfPattern::make(seq_len(b), group_size, num_sinks, shift, head_q, num_heads_q);
  }
};

// Backward: dq, dk, dv have the layouts (and strides) given here; dout and out share q's row/head
// structure with their own strides. delta is workspace [num_heads_q, total_rows] (rowsum(dout * out)).
struct SfAttentionBwdParams : SfAttentionParams {
  const void* dout;
  void* dq;
  void* dk;
  void* dv;
  float* delta;
  float* dq_accum;  // optional fp32 workspace [total_rows, num_heads_q, head_dim] (CUDA)

  int64_t do_batch_stride, do_row_stride, do_head_stride;
  int64_t dq_batch_stride, dq_row_stride, dq_head_stride;
  int64_t dk_batch_stride, dk_row_stride, dk_head_stride;
  int64_t dv_batch_stride, dv_row_stride, dv_head_stride;
};

}  // namespace sinklora
