// Tile walks of the SF-Attn CUDA kernels, kept free of CUDA so the host can test them.
//
// The forward walks, for one query tile [q0, q1), the key tiles that cover key_spans(q0, q1); the
// backward walks, for one key tile [k0, k1), the (query head, query tile) pairs that cover
// query_spans(k0, k1) over the query heads of one kv head. Spans are disjoint, so every key (query)
// of a span lies in exactly one tile of the walk.
#pragma once

#include <climits>

#include "sf_attention.h"

namespace sinklora {

// The tiles [lo, hi) of width at most `step` that cover the spans of a SpanList, in order.
// A tile never crosses from one span into the next. (Span ends are read with constant indices so
// that device code keeps the walk in registers.)
struct SpanTileIter {
  int lo0, lo1, lo2, hi0, hi1, hi2;
  int count;
  int idx;
  int lo;
  int step;

  SF_HD SpanTileIter()
      : lo0(0), lo1(0), lo2(0), hi0(0), hi1(0), hi2(0), count(0), idx(0), lo(0), step(1) {}
  SF_HD SpanTileIter(const SpanList& s, int tile)
      : lo0(s.span[0].lo),
        lo1(s.span[1].lo),
        lo2(s.span[2].lo),
        hi0(s.span[0].hi),
        hi1(s.span[1].hi),
        hi2(s.span[2].hi),
        count(s.count),
        idx(0),
        lo(lo0),
        step(tile) {}
  SF_HD bool valid() const { return idx < count; }
  SF_HD int span_hi() const { return idx == 0 ? hi0 : idx == 1 ? hi1 : hi2; }
  SF_HD int hi() const {
    const int end = span_hi();
    return lo + step < end ? lo + step : end;
  }
  SF_HD void next() {
    lo += step;
    if (lo >= span_hi()) {
      ++idx;
      lo = idx == 1 ? lo1 : lo2;  // unused once idx == count
    }
  }
};

// The parts of the spans inside [lo, hi).
SF_HD SpanList clip_spans(const SpanList& s, int lo, int hi) {
  SpanList out{};
  out.count = 0;
  for (int t = 0; t < s.count; ++t) {
    const int a = s.span[t].lo > lo ? s.span[t].lo : lo;
    const int b = s.span[t].hi < hi ? s.span[t].hi : hi;
    if (a < b) out.span[out.count++] = Span{a, b};
  }
  return out;
}

// The (query head, query tile) pairs whose queries may see key tile [k0, k1): for each query head
// h in [h_begin, h_end), the tiles of query_spans(k0, k1) under head h's pattern, restricted to
// queries in [clip_lo, clip_hi) (a block's share of a split key tile).
struct QueryTileIter {
  int n, group, sinks, num_heads_q;
  ShiftMode shift;
  int k0, k1, h_end, clip_lo, clip_hi;
  int h;
  SpanTileIter tiles;

  SF_HD QueryTileIter(int n_, int group_, int sinks_, ShiftMode shift_, int num_heads_q_, int k0_,
                      int k1_, int h_begin, int h_end_, int step, int clip_lo_ = 0,
                      int clip_hi_ = INT_MAX)
      : n(n_),
        group(group_),
        sinks(sinks_),
        num_heads_q(num_heads_q_),
        shift(shift_),
        k0(k0_),
        k1(k1_),
        h_end(h_end_),
        clip_lo(clip_lo_),
        clip_hi(clip_hi_),
        h(h_begin),
        tiles() {
    tiles.step = step;
    seek();
  }
  SF_HD SfPattern pattern() const {
    return SfPattern::make(n, group, sinks, shift, h, num_heads_q);
  }
  SF_HD bool valid() const { return h < h_end; }
  SF_HD int head() const { return h; }
  SF_HD int lo() const { return tiles.lo; }
  SF_HD int hi() const { return tiles.hi(); }
  SF_HD void next() {
    tiles.next();
    if (!tiles.valid()) {
      ++h;
      seek();
    }
  }

 private:
  // Moves to the first head at or after h that has a query tile.
  SF_HD void seek() {
    for (; h < h_end; ++h) {
      tiles = SpanTileIter(clip_spans(pattern().query_spans(k0, k1), clip_lo, clip_hi), tiles.step);
      if (tiles.valid()) return;
    }
  }
};

// SfPattern::visible(i, j) for one fixed query row i, as bounds on j: j in [lo, i], or j <= i and
// j is a sink, or j >= tail (the wrapped tail of a `roll` row). Cheaper than visible() per element
// (no divisions); the host tests check it equals visible() for every pair of many sequences.
struct RowMask {
  int row, lo, sinks, tail;
  SF_HD static RowMask make(const SfPattern& p, int i) {
    if (p.wraps(i)) return RowMask{i, 0, p.sinks, p.n - p.g + p.s};
    return RowMask{i, p.segment_start(i), p.sinks, INT_MAX};
  }
  SF_HD bool operator()(int j) const { return (j <= row && (j >= lo || j < sinks)) || j >= tail; }
};

// SfPattern::visible(i, j) for one fixed key j, as bounds on i: i in [j, end) (end = one past the
// key's segment), or i >= j when j is a sink, or i < wrap_end (queries a `roll` segment wraps
// round to). Checked against visible() like RowMask.
struct ColMask {
  int col, end, wrap_end;
  bool sink;
  SF_HD static ColMask make(const SfPattern& p, int j) {
    const int end = p.segment_end_unclamped(j);
    const int wrap = p.mode == ShiftMode::kRoll && end > p.n ? end - p.n : 0;
    return ColMask{j, end, wrap, j < p.sinks};
  }
  SF_HD bool operator()(int i) const { return (i >= col && (i < end || sink)) || i < wrap_end; }
};

}  // namespace sinklora
