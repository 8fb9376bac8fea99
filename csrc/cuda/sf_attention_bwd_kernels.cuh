// SF-Attn backward kernels (device code; launched from sf_attention_bwd.cu and
// sf_attention_bwd_mma.cu).
//
// Steps: (1) bwd_delta_kernel: delta[h, r] = sum_d dout * out; (2) one block per (key tile, kv
// head, sequence) walks the query heads of its group and the query tiles that may see its keys,
// keeping dK, dV of the tile on chip and adding unscaled dS K into the zeroed fp32 dq_accum
// [rows, Hq, D] with atomics (bwd_mma_kernel or bwd_generic_kernel); (3) bwd_dq_convert_kernel:
// dq = softmax_scale * dq_accum, in dq's dtype and strides. Key tiles holding sink keys, which
// every query sees, are the exception: they are split over several blocks (see "Sink split").
//
// bwd_mma_kernel (fp16/bf16, head dim 64 or 128, sm_80+):
// One thread block per (key tile of 64 keys, kv head, sequence), 4 warps, warp w owning keys
// [16w, 16w + 16) of the tile. The block walks the query heads of its kv head's group and, for
// each, the query tiles of query_spans(k0, k1), so dK and dV of the tile stay in registers for the
// whole walk (GQA needs no reduction). Key tiles are launched in order, so the heavy sink tiles
// start first. Per query tile [q0, q1) of BM rows:
//   S^T  = K Q^T,  dP^T = V dO^T                 (warp: 16 keys x BM queries)
//   P^T  = exp(scale S^T - lse),  dS^T = P^T (dP^T - delta)
//   dV  += P^T dO,  dK += dS^T Q                   (A operands straight from the accumulators)
//   dS^T -> shared,  dQ_tile = dS K  -> atomicAdd into dq_accum (fp32, unscaled)
// Q, dO, lse and delta are double-buffered: the next tile's loads overlap this tile's math.
// Masks only on tiles that are not fully visible, from ColMask (no divisions per element).
// BM = 64 for head dim 64 and 32 for head dim 128 (register budget: dK + dV alone are 2 * D / 2
// fp32 registers per thread).
#pragma once

#include <c10/core/ScalarType.h>

#include "sf_attention_kernels.cuh"

namespace sinklora {
namespace cuda {

// One warp per (row, query head).
template <typename T>
__global__ void __launch_bounds__(256) bwd_delta_kernel(const SfAttentionBwdParams p) {
  const int64_t w = int64_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x & 31;
  if (w >= p.total_rows * p.num_heads_q) return;
  const int64_t r = w / p.num_heads_q;
  const int h = static_cast<int>(w % p.num_heads_q);
  const T* dO = static_cast<const T*>(p.dout) +
                flat_row_offset(p, r, p.do_batch_stride, p.do_row_stride) +
                int64_t(h) * p.do_head_stride;
  const T* o = static_cast<const T*>(p.out) +
               flat_row_offset(p, r, p.o_batch_stride, p.o_row_stride) +
               int64_t(h) * p.o_head_stride;
  float acc = 0.f;
  for (int d = lane; d < p.head_dim; d += 32) acc = fmaf(to_float(dO[d]), to_float(o[d]), acc);
  acc = warp_sum(acc);
  if (lane == 0) p.delta[int64_t(h) * p.total_rows + r] = acc;
}

// dq[r, h, d] = scale * dq_accum[r, h, d].
template <typename T>
__global__ void __launch_bounds__(256) bwd_dq_convert_kernel(const SfAttentionBwdParams p) {
  const int D = p.head_dim;
  const int64_t total = p.total_rows * p.num_heads_q * D;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int d = static_cast<int>(i % D);
    const int64_t rh = i / D;
    const int h = static_cast<int>(rh % p.num_heads_q);
    const int64_t r = rh / p.num_heads_q;
    T* dst = static_cast<T*>(p.dq) + flat_row_offset(p, r, p.dq_batch_stride, p.dq_row_stride) +
             int64_t(h) * p.dq_head_stride + d;
    *dst = from_float<T>(p.dq_accum[i] * p.softmax_scale);
  }
}

// ---------------------------------------------------------------------------------------------
// Sink split. Every query sees the sink keys, so a key tile holding sinks walks all n queries
// while any other walks about one segment; with sinks on, such a block alone would set the
// backward's time. Those tiles are therefore split over `chunks` blocks, each walking the queries
// of one slice [clip_lo, clip_hi) of the sequence, and their dK, dV are summed with fp32 atomics
// in a zeroed workspace that bwd_sink_convert_kernel writes out afterwards. Other tiles keep dK,
// dV on chip.

struct SinkSplit {
  int ns;      // number of split key tiles (those with k0 < num_sinks); 0 when not splitting
  int chunks;  // blocks per split tile; 1 when not splitting
  float* dk;   // fp32 workspace [batch, Hkv, ns * block_n, D]: unscaled dK of the split tiles
  float* dv;   // same layout, dV
};

// The split for key tiles of block_n keys: chunks ~ the walk of a sink tile over that of a
// segment tile. (Host; the workspace is allocated by the caller.)
inline SinkSplit plan_sink_split(const SfAttentionParams& p, int block_n) {
  SinkSplit s{0, 1, nullptr, nullptr};
  const int n = p.seqlen;
  if (p.num_sinks <= 0 || n <= 0) return s;
  const int64_t segment = int64_t(p.group_size < n ? p.group_size : n) + block_n;
  const int64_t chunks = (n + segment - 1) / segment;
  if (chunks <= 1) return s;
  const int sinks = p.num_sinks < n ? p.num_sinks : n;
  s.ns = (sinks + block_n - 1) / block_n;
  s.chunks = chunks < 32 ? int(chunks) : 32;
  return s;
}

// Host: plans the sink split for key tiles of block_n keys, allocates and zeroes its workspace
// (from the caching allocator, released in stream order when this object dies), and after the
// main kernel, finish() writes the split tiles' dk and dv (sf_attention_bwd.cu).
// The tensor-core main kernel (sf_attention_bwd_mma.cu); delta must already be computed.
void launch_bwd_mma(const SfAttentionBwdParams& p, c10::ScalarType dtype, cudaStream_t stream);

class SinkSplitWorkspace {
 public:
  SinkSplitWorkspace(const SfAttentionBwdParams& p, int block_n, cudaStream_t stream);
  ~SinkSplitWorkspace();
  SinkSplitWorkspace(const SinkSplitWorkspace&) = delete;
  SinkSplitWorkspace& operator=(const SinkSplitWorkspace&) = delete;
  const SinkSplit& split() const { return split_; }
  // Blocks per sequence of the main kernel.
  int blocks_per_seq(int num_tiles) const { return num_tiles + split_.ns * (split_.chunks - 1); }
  void finish(const SfAttentionBwdParams& p, c10::ScalarType dtype, cudaStream_t stream) const;

 private:
  SinkSplit split_;
  int block_n_;
  void* mem_ = nullptr;
};

// What one block of a backward main kernel does: key tile `tile` of sequence b, walking the
// queries in [clip_lo, clip_hi) (all of them unless the tile is split).
struct BwdBlock {
  int b, tile, clip_lo, clip_hi;
  bool split;
};

// Blocks per sequence: num_tiles + ns * (chunks - 1); the first ns * chunks are the split tiles'.
// Query slices are multiples of block_m long.
__device__ __forceinline__ BwdBlock bwd_block(const SfAttentionParams& p, const SinkSplit& s,
                                              int num_tiles, int block_m) {
  const int per_b = num_tiles + s.ns * (s.chunks - 1);
  const int b = blockIdx.x / per_b;
  const int t = blockIdx.x % per_b;
  if (s.chunks > 1 && t < s.ns * s.chunks) {
    const int chunk = t % s.chunks;
    const int per_chunk = (p.seq_len(b) + s.chunks - 1) / s.chunks;
    const int len = (per_chunk + block_m - 1) / block_m * block_m;
    return BwdBlock{b, t / s.chunks, chunk * len, chunk * len + len, true};
  }
  return BwdBlock{b, t - s.ns * (s.chunks - 1), 0, INT_MAX, false};
}

// The key tile one block of a key-tile kernel (the backward's dK/dV kernels, the column scores)
// owns: keys [k0, k1) of kv head hk in sequence b (rows from `start`, length n), and its walk over
// the (query head, query tile) pairs that may see them. empty(): the tile lies past the sequence.
struct KeyTile {
  BwdBlock blk;
  int b, hk, n, k0, k1, group, start;
  float scale_log2;  // softmax_scale * log2(e)

  __device__ __forceinline__ bool empty() const { return k0 >= n; }

  // Row 0 of head `head` of this sequence (head_rows).
  template <typename T>
  __device__ __forceinline__ const T* rows(const SfAttentionParams& p, const void* base, int64_t batch_stride,
                                           int64_t row_stride, int64_t head_stride, int head) const {
    return head_rows<T>(p, b, base, batch_stride, row_stride, head_stride, head);
  }

  // The (query head, query tile of block_m rows) pairs of the walk.
  __device__ __forceinline__ QueryTileIter query_tiles(const SfAttentionParams& p, int block_m) const {
    return QueryTileIter(n, p.group_size, p.num_sinks, p.shift, p.num_heads_q, k0, k1, hk * group, hk * group + group,
                         block_m, blk.clip_lo, blk.clip_hi);
  }
};

// This block's key tile (block_n keys; split query slices of block_m rows), kv head blockIdx.y.
__device__ __forceinline__ KeyTile key_tile(const SfAttentionParams& p, const SinkSplit& s, int num_tiles,
                                            int block_m, int block_n) {
  KeyTile t;
  t.blk = bwd_block(p, s, num_tiles, block_m);
  t.b = t.blk.b;
  t.hk = blockIdx.y;
  t.n = p.seq_len(t.b);
  t.k0 = t.blk.tile * block_n;
  t.k1 = min(t.k0 + block_n, t.n);
  t.group = p.num_heads_q / p.num_heads_kv;
  t.start = p.seq_start(t.b);
  t.scale_log2 = p.softmax_scale * kLog2e;
  return t;
}

// Rows [lo, hi) of a [*, D] tensor of T (row stride in elements) as fp32 rows [rows][ld] of shared
// memory, rows past hi zero-filled (the generic kernels' tiles).
template <typename T>
__device__ __forceinline__ void load_rows_f32(float* dst, int ld, const T* src, int64_t row_stride, int lo, int hi,
                                              int rows, int D) {
  for (int idx = threadIdx.x; idx < rows * D; idx += blockDim.x) {
    const int r = idx / D, d = idx % D;
    dst[r * ld + d] = lo + r < hi ? to_float(src[int64_t(lo + r) * row_stride + d]) : 0.f;
  }
}

// dk, dv rows of the split tiles: dk = scale * ws_dk, dv = ws_dv.
template <typename T>
__global__ void __launch_bounds__(256)
    bwd_sink_convert_kernel(const SfAttentionBwdParams p, const SinkSplit s, int block_n) {
  const int D = p.head_dim;
  const int rows = s.ns * block_n;
  const int64_t total = int64_t(p.batch) * p.num_heads_kv * rows * D;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int d = static_cast<int>(i % D);
    int64_t t = i / D;
    const int key = static_cast<int>(t % rows);
    t /= rows;
    const int hk = static_cast<int>(t % p.num_heads_kv);
    const int b = static_cast<int>(t / p.num_heads_kv);
    if (key >= p.seq_len(b)) continue;
    const int64_t kofs = p.batch_offset(b, p.dk_batch_stride, p.dk_row_stride) +
                         int64_t(key) * p.dk_row_stride + int64_t(hk) * p.dk_head_stride + d;
    const int64_t vofs = p.batch_offset(b, p.dv_batch_stride, p.dv_row_stride) +
                         int64_t(key) * p.dv_row_stride + int64_t(hk) * p.dv_head_stride + d;
    static_cast<T*>(p.dk)[kofs] = from_float<T>(s.dk[i] * p.softmax_scale);
    static_cast<T*>(p.dv)[vofs] = from_float<T>(s.dv[i]);
  }
}

// ---------------------------------------------------------------------------------------------
// Generic main kernel. 128 threads; 16 keys per block, 16 query rows per tile. Shared (fp32):
// K, V, Q, dO [16][D + 1]; P, dS [16][17]; lse * log2(e), delta [16]. Thread t owns the elements
// e = t + 128 u (u < 32) of the 16 x D tiles: dK, dV (row e / D of the key tile) in registers,
// and dQ (row e / D of the query tile) for its atomics.

constexpr int kGenB = 16;      // keys per block and queries per tile
constexpr int kGenElems = 32;  // kGenB * 256 / 128

inline size_t gen_bwd_smem(int D) {
  return sizeof(float) *
         (size_t(4) * kGenB * (D + 1) + size_t(2) * kGenB * (kGenB + 1) + 2 * kGenB);
}

template <typename T>
__global__ void __launch_bounds__(128)
    bwd_generic_kernel(const SfAttentionBwdParams p, int num_tiles, const SinkSplit split) {
  constexpr int B = kGenB, PS = kGenB + 1;
  float* gsmem = dynamic_smem<float>();
  const int D = p.head_dim, DK = D + 1;
  float* sK = gsmem;
  float* sV = sK + B * DK;
  float* sQ = sV + B * DK;
  float* sdO = sQ + B * DK;
  float* sP = sdO + B * DK;
  float* sdS = sP + B * PS;
  float* sL = sdS + B * PS;
  float* sDl = sL + B;

  const int tid = threadIdx.x;
  const KeyTile kt = key_tile(p, split, num_tiles, B, B);
  if (kt.empty()) return;
  const BwdBlock& blk = kt.blk;
  const int b = kt.b, hk = kt.hk, k0 = kt.k0, k1 = kt.k1, start = kt.start;
  const float scale_log2 = kt.scale_log2;
  load_rows_f32(sK, DK, kt.rows<T>(p, p.k, p.k_batch_stride, p.k_row_stride, p.k_head_stride, hk), p.k_row_stride,
                k0, k1, B, D);
  load_rows_f32(sV, DK, kt.rows<T>(p, p.v, p.v_batch_stride, p.v_row_stride, p.v_head_stride, hk), p.v_row_stride,
                k0, k1, B, D);

  float dk[kGenElems], dv[kGenElems];
#pragma unroll
  for (int u = 0; u < kGenElems; ++u) dk[u] = dv[u] = 0.f;

  for (QueryTileIter it = kt.query_tiles(p, B); it.valid(); it.next()) {
    const int h = it.head(), q0 = it.lo(), q1 = it.hi();
    const SfPattern pat = it.pattern();
    __syncthreads();  // the previous tile is consumed (and K, V are written, the first time)
    load_rows_f32(sQ, DK, kt.rows<T>(p, p.q, p.q_batch_stride, p.q_row_stride, p.q_head_stride, h), p.q_row_stride,
                  q0, q1, B, D);
    load_rows_f32(sdO, DK, kt.rows<T>(p, p.dout, p.do_batch_stride, p.do_row_stride, p.do_head_stride, h),
                  p.do_row_stride, q0, q1, B, D);
    if (tid < B) {
      const bool ok = q0 + tid < q1;
      const int64_t idx = int64_t(h) * p.total_rows + start + q0 + tid;
      sL[tid] = ok ? p.lse[idx] * kLog2e : 0.f;
      sDl[tid] = ok ? p.delta[idx] : 0.f;
    }
    __syncthreads();

    // P and dS for the 16 x 16 (query, key) pairs, two per thread.
    const bool need_mask =
        !(q1 - q0 == B && k1 - k0 == B && pat.tile_fully_visible(q0, q1, k0, k1));
#pragma unroll
    for (int t = 0; t < (B * B) / 128; ++t) {
      const int pr = tid + 128 * t;
      const int r = pr / B, j = pr % B;
      const float* qr = sQ + r * DK;
      const float* kr = sK + j * DK;
      const float* gr = sdO + r * DK;
      const float* vr = sV + j * DK;
      float s = 0.f, dp = 0.f;
      for (int d = 0; d < D; ++d) {
        s = fmaf(qr[d], kr[d], s);
        dp = fmaf(gr[d], vr[d], dp);
      }
      const int query = q0 + r, key = k0 + j;
      const bool vis = !need_mask || (query < q1 && key < k1 && pat.visible(query, key));
      const float pv = vis ? exp2f(s * scale_log2 - sL[r]) : 0.f;
      sP[r * PS + j] = pv;
      sdS[r * PS + j] = pv * (dp - sDl[r]);
    }
    __syncthreads();

    // dV += P^T dO, dK += dS^T Q (unscaled), dQ += dS K (unscaled, atomics).
    float* dq_row_base = p.dq_accum + (int64_t(start + q0) * p.num_heads_q + h) * D;
#pragma unroll
    for (int u = 0; u < kGenElems; ++u) {
      const int e = tid + 128 * u;
      if (e < B * D) {
        const int row = e / D, d = e % D;  // key row for dK/dV, query row for dQ
        float av = 0.f, ak = 0.f, aq = 0.f;
#pragma unroll
        for (int i = 0; i < B; ++i) {
          av = fmaf(sP[i * PS + row], sdO[i * DK + d], av);
          ak = fmaf(sdS[i * PS + row], sQ[i * DK + d], ak);
          aq = fmaf(sdS[row * PS + i], sK[i * DK + d], aq);
        }
        dv[u] += av;
        dk[u] += ak;
        if (q0 + row < q1) atomicAdd(dq_row_base + int64_t(row) * p.num_heads_q * D + d, aq);
      }
    }
  }

  if (blk.split) {
    const int64_t ws = (int64_t(b) * p.num_heads_kv + hk) * split.ns * B * D;
#pragma unroll
    for (int u = 0; u < kGenElems; ++u) {
      const int e = tid + 128 * u;
      if (e < B * D && k0 + e / D < k1) {
        atomicAdd(split.dk + ws + int64_t(k0) * D + e, dk[u]);
        atomicAdd(split.dv + ws + int64_t(k0) * D + e, dv[u]);
      }
    }
    return;
  }
  T* dkg = static_cast<T*>(p.dk) + p.batch_offset(b, p.dk_batch_stride, p.dk_row_stride) +
           int64_t(hk) * p.dk_head_stride;
  T* dvg = static_cast<T*>(p.dv) + p.batch_offset(b, p.dv_batch_stride, p.dv_row_stride) +
           int64_t(hk) * p.dv_head_stride;
#pragma unroll
  for (int u = 0; u < kGenElems; ++u) {
    const int e = tid + 128 * u;
    if (e < B * D) {
      const int j = e / D, d = e % D;
      if (k0 + j < k1) {
        dkg[int64_t(k0 + j) * p.dk_row_stride + d] = from_float<T>(dk[u] * p.softmax_scale);
        dvg[int64_t(k0 + j) * p.dv_row_stride + d] = from_float<T>(dv[u]);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Tensor-core main kernel

template <typename T, int D>
struct BwdMmaCfg {
  static constexpr int kBN = 64;                 // keys per block (16 per warp)
  static constexpr int kBM = D <= 64 ? 64 : 32;  // query rows per tile
  static constexpr int kThreads = 128;
  static constexpr int kCPR = D / 8;     // chunks per row of K, V, Q, dO tiles
  static constexpr int kCPRS = kBM / 8;  // chunks per row of the dS^T tile [kBN][kBM]
  // Shared memory, in this order: K, V [kBN][D]; Q, dO [2][kBM][D]; dS^T [kBN][kBM] (all T);
  // lse * log2(e), delta [2][kBM] (fp32).
  static constexpr size_t kSmemT = size_t(2 * kBN * D + 4 * kBM * D + kBN * kBM) * sizeof(T);
  static constexpr size_t kSmem = kSmemT + size_t(4 * kBM) * sizeof(float);
};

template <typename T, int D>
__global__ void __launch_bounds__(128)
    bwd_mma_kernel(const SfAttentionBwdParams p, int num_tiles, const SinkSplit split) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using Cfg = BwdMmaCfg<T, D>;
  constexpr int BN = Cfg::kBN, BM = Cfg::kBM, CPR = Cfg::kCPR, CPRS = Cfg::kCPRS,
                NT = Cfg::kThreads;
  unsigned char* smem_raw = dynamic_smem<unsigned char>();
  T* sK = reinterpret_cast<T*>(smem_raw);
  T* sV = sK + BN * D;
  T* sQ = sV + BN * D;       // [2][BM * D]
  T* sdO = sQ + 2 * BM * D;  // [2][BM * D]
  T* sdST = sdO + 2 * BM * D;
  float* sLse = reinterpret_cast<float*>(smem_raw + Cfg::kSmemT);  // [2][BM]
  float* sDelta = sLse + 2 * BM;                                   // [2][BM]
  constexpr uint32_t kTileBytes = BM * D * sizeof(T);
  const uint32_t sK_u = smem_u32(sK);
  const uint32_t sV_u = sK_u + BN * D * sizeof(T);
  const uint32_t sQ_u = sV_u + BN * D * sizeof(T);
  const uint32_t sdO_u = sQ_u + 2 * kTileBytes;
  const uint32_t sdST_u = sdO_u + 2 * kTileBytes;

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const KeyTile kt = key_tile(p, split, num_tiles, BM, BN);
  if (kt.empty()) return;
  const BwdBlock& blk = kt.blk;
  const int b = kt.b, hk = kt.hk, k0 = kt.k0, k1 = kt.k1, start = kt.start;
  const float scale_log2 = kt.scale_log2;
  const T* kg = kt.rows<T>(p, p.k, p.k_batch_stride, p.k_row_stride, p.k_head_stride, hk);
  const T* vg = kt.rows<T>(p, p.v, p.v_batch_stride, p.v_row_stride, p.v_head_stride, hk);
  const T* qb = kt.rows<T>(p, p.q, p.q_batch_stride, p.q_row_stride, 0, 0);
  const T* dob = kt.rows<T>(p, p.dout, p.do_batch_stride, p.do_row_stride, 0, 0);

  // Loads of query tile [q0, q1) of head h for buffer `buf`: Q and dO by cp.async into shared
  // memory, lse and delta of row q0 + tid into registers, stored to shared memory only once the
  // math of the current tile has hidden their latency.
  float next_lse = 0.f, next_delta = 0.f;
  auto issue_query_tile = [&](int buf, int h, int q0, int q1) {
    cp_async_tile<BM, D, NT>(sQ + buf * BM * D, qb + int64_t(h) * p.q_head_stride, p.q_row_stride,
                             q0, q1 - q0, tid);
    cp_async_tile<BM, D, NT>(sdO + buf * BM * D, dob + int64_t(h) * p.do_head_stride,
                             p.do_row_stride, q0, q1 - q0, tid);
    cp_async_commit();
    if (tid < BM) {
      const bool ok = q0 + tid < q1;
      const int64_t idx = int64_t(h) * p.total_rows + start + q0 + tid;
      next_lse = ok ? p.lse[idx] * kLog2e : 0.f;
      next_delta = ok ? p.delta[idx] : 0.f;
    }
  };
  auto stage_stats = [&](int buf) {
    if (tid < BM) {
      sLse[buf * BM + tid] = next_lse;
      sDelta[buf * BM + tid] = next_delta;
    }
  };

  QueryTileIter it = kt.query_tiles(p, BM);
  cp_async_tile<BN, D, NT>(sK, kg, p.k_row_stride, k0, k1 - k0, tid);
  cp_async_tile<BN, D, NT>(sV, vg, p.v_row_stride, k0, k1 - k0, tid);
  cp_async_commit();
  if (it.valid()) {
    issue_query_tile(0, it.head(), it.lo(), it.hi());
    stage_stats(0);
  }
  cp_async_wait_all();
  __syncthreads();

  float dk[D / 8][4], dv[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i) {
#pragma unroll
    for (int c = 0; c < 4; ++c) dk[i][c] = dv[i][c] = 0.f;
  }
  const int key_lo = k0 + warp * 16 + (lane >> 2);  // this thread's keys: key_lo, key_lo + 8
  const bool key_ok[2] = {key_lo < k1, key_lo + 8 < k1};
  const LdsmAddr<CPR, kPatA> addr_a(lane);
  const LdsmAddr<CPR, kPatB> addr_b(lane);
  const LdsmAddr<CPR, kPatT> addr_t(lane);
  const LdsmAddr<CPRS, kPatB> addr_s(lane);
  const uint32_t sKw_u = sK_u + warp * 16 * CPR * 16;  // this warp's 16 keys
  const uint32_t sVw_u = sV_u + warp * 16 * CPR * 16;
  int buf = 0;

  while (it.valid()) {
    const int h = it.head(), q0 = it.lo(), q1 = it.hi();
    const SfPattern pat = it.pattern();
    it.next();
    const bool has_next = it.valid();
    if (has_next) issue_query_tile(buf ^ 1, it.head(), it.lo(), it.hi());

    const uint32_t cQ_u = sQ_u + buf * kTileBytes;
    const uint32_t cdO_u = sdO_u + buf * kTileBytes;
    const float* cL = sLse + buf * BM;
    const float* cD = sDelta + buf * BM;

    // S^T = K Q^T and dP^T = V dO^T for this warp's 16 keys.
    float st[BM / 8][4], dpt[BM / 8][4];
#pragma unroll
    for (int i = 0; i < BM / 8; ++i) {
#pragma unroll
      for (int c = 0; c < 4; ++c) st[i][c] = dpt[i][c] = 0.f;
    }
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t ka[4], va[4];
      ldsm_x4(ka, sKw_u + addr_a(0, kk * 2));
      ldsm_x4(va, sVw_u + addr_a(0, kk * 2));
#pragma unroll
      for (int nb2 = 0; nb2 < BM / 16; ++nb2) {
        const uint32_t off = addr_b(nb2 * 16, kk * 2);
        uint32_t qf[4], of[4];
        ldsm_x4(qf, cQ_u + off);
        ldsm_x4(of, cdO_u + off);
        mma16816<T>(st[2 * nb2], ka, qf[0], qf[1]);
        mma16816<T>(st[2 * nb2 + 1], ka, qf[2], qf[3]);
        mma16816<T>(dpt[2 * nb2], va, of[0], of[1]);
        mma16816<T>(dpt[2 * nb2 + 1], va, of[2], of[3]);
      }
    }

    // P^T and dS^T (in place). Masked pairs, padding keys and padding queries get P = 0.
    const bool need_mask =
        !(q1 - q0 == BM && k1 - k0 == BN && pat.tile_fully_visible(q0, q1, k0, k1));
    const ColMask cmask[2] = {ColMask::make(pat, key_lo), ColMask::make(pat, key_lo + 8)};
#pragma unroll
    for (int nb = 0; nb < BM / 8; ++nb) {
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const int qi = nb * 8 + (lane & 3) * 2 + (c & 1);
        const bool vis = !need_mask || (q0 + qi < q1 && key_ok[c >> 1] && cmask[c >> 1](q0 + qi));
        const float pv = vis ? exp2f(st[nb][c] * scale_log2 - cL[qi]) : 0.f;
        st[nb][c] = pv;
        dpt[nb][c] = pv * (dpt[nb][c] - cD[qi]);
      }
    }

    // dV += P^T dO, dK += dS^T Q.
#pragma unroll
    for (int kq = 0; kq < BM / 16; ++kq) {
      uint32_t pa[4], sa[4];
      pa[0] = pack2<T>(st[2 * kq][0], st[2 * kq][1]);
      pa[1] = pack2<T>(st[2 * kq][2], st[2 * kq][3]);
      pa[2] = pack2<T>(st[2 * kq + 1][0], st[2 * kq + 1][1]);
      pa[3] = pack2<T>(st[2 * kq + 1][2], st[2 * kq + 1][3]);
      sa[0] = pack2<T>(dpt[2 * kq][0], dpt[2 * kq][1]);
      sa[1] = pack2<T>(dpt[2 * kq][2], dpt[2 * kq][3]);
      sa[2] = pack2<T>(dpt[2 * kq + 1][0], dpt[2 * kq + 1][1]);
      sa[3] = pack2<T>(dpt[2 * kq + 1][2], dpt[2 * kq + 1][3]);
#pragma unroll
      for (int nb2 = 0; nb2 < D / 16; ++nb2) {
        const uint32_t off = addr_t(kq * 16, nb2 * 2);
        uint32_t of[4], qf[4];
        ldsm_x4_trans(of, cdO_u + off);
        ldsm_x4_trans(qf, cQ_u + off);
        mma16816<T>(dv[2 * nb2], pa, of[0], of[1]);
        mma16816<T>(dv[2 * nb2 + 1], pa, of[2], of[3]);
        mma16816<T>(dk[2 * nb2], sa, qf[0], qf[1]);
        mma16816<T>(dk[2 * nb2 + 1], sa, qf[2], qf[3]);
      }
    }

    // dS^T -> shared [BN keys][BM queries].
#pragma unroll
    for (int nb = 0; nb < BM / 8; ++nb) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int krow = warp * 16 + (lane >> 2) + r * 8;
        *reinterpret_cast<uint32_t*>(sdST + swz<CPRS>(krow, nb) * 8 + (lane & 3) * 2) =
            pack2<T>(dpt[nb][2 * r], dpt[nb][2 * r + 1]);
      }
    }
    __syncthreads();

    // dQ_tile = dS K, in units of (16 query rows) x (32 head dims), atomically added to dq_accum.
    constexpr int kUnits = (BM / 16) * (D / 32);
    static_assert(kUnits % 4 == 0, "units must split evenly over the 4 warps");
#pragma unroll
    for (int u = warp; u < kUnits; u += 4) {
      const int mi = u % (BM / 16), dc = u / (BM / 16);
      float acc[4][4];
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
#pragma unroll
      for (int kk = 0; kk < BN / 16; ++kk) {
        uint32_t a[4];
        ldsm_x4_trans(a, sdST_u + addr_s(kk * 16, mi * 2));
#pragma unroll
        for (int nb2 = 0; nb2 < 2; ++nb2) {
          uint32_t kf[4];
          ldsm_x4_trans(kf, sK_u + addr_t(kk * 16, dc * 4 + nb2 * 2));
          mma16816<T>(acc[2 * nb2], a, kf[0], kf[1]);
          mma16816<T>(acc[2 * nb2 + 1], a, kf[2], kf[3]);
        }
      }
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int row = q0 + mi * 16 + (lane >> 2) + r * 8;
        if (row < q1) {
          float* dst = p.dq_accum + (int64_t(start + row) * p.num_heads_q + h) * D + dc * 32 +
                       (lane & 3) * 2;
#pragma unroll
          for (int nb = 0; nb < 4; ++nb) {
            atomicAdd(dst + nb * 8, acc[nb][2 * r]);
            atomicAdd(dst + nb * 8 + 1, acc[nb][2 * r + 1]);
          }
        }
      }
    }

    if (has_next) stage_stats(buf ^ 1);
    cp_async_wait_all();  // the next tile's Q and dO
    __syncthreads();      // everyone is done with this buffer and with dS^T
    buf ^= 1;
  }

  if (blk.split) {  // partial sums of a split sink tile: fp32 atomics into the workspace
    const int64_t ws = (int64_t(b) * p.num_heads_kv + hk) * split.ns * BN * D;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      if (!key_ok[r]) continue;
      float* wk = split.dk + ws + int64_t(key_lo + r * 8) * D + (lane & 3) * 2;
      float* wv = split.dv + ws + int64_t(key_lo + r * 8) * D + (lane & 3) * 2;
#pragma unroll
      for (int nb = 0; nb < D / 8; ++nb) {
        atomicAdd(wk + nb * 8, dk[nb][2 * r]);
        atomicAdd(wk + nb * 8 + 1, dk[nb][2 * r + 1]);
        atomicAdd(wv + nb * 8, dv[nb][2 * r]);
        atomicAdd(wv + nb * 8 + 1, dv[nb][2 * r + 1]);
      }
    }
    return;
  }

  // Epilogue: dK *= scale; stage dK, dV through this warp's rows of sK, sV; 16-byte stores.
  // (The loop ended on a __syncthreads, so no warp still reads sK or sV.)
#pragma unroll
  for (int nb = 0; nb < D / 8; ++nb) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int krow = warp * 16 + (lane >> 2) + r * 8;
      const int off = swz<CPR>(krow, nb) * 8 + (lane & 3) * 2;
      *reinterpret_cast<uint32_t*>(sK + off) =
          pack2<T>(dk[nb][2 * r] * p.softmax_scale, dk[nb][2 * r + 1] * p.softmax_scale);
      *reinterpret_cast<uint32_t*>(sV + off) = pack2<T>(dv[nb][2 * r], dv[nb][2 * r + 1]);
    }
  }
  __syncwarp();
  T* dkg = static_cast<T*>(p.dk) + p.batch_offset(b, p.dk_batch_stride, p.dk_row_stride) +
           int64_t(hk) * p.dk_head_stride;
  T* dvg = static_cast<T*>(p.dv) + p.batch_offset(b, p.dv_batch_stride, p.dv_row_stride) +
           int64_t(hk) * p.dv_head_stride;
#pragma unroll
  for (int i = 0; i < 16 * CPR / 32; ++i) {
    const int idx = lane + 32 * i;
    const int krow = warp * 16 + idx / CPR;
    const int c = idx % CPR;
    const int key = k0 + krow;
    if (key < k1) {
      *reinterpret_cast<uint4*>(dkg + int64_t(key) * p.dk_row_stride + c * 8) =
          *reinterpret_cast<const uint4*>(sK + swz<CPR>(krow, c) * 8);
      *reinterpret_cast<uint4*>(dvg + int64_t(key) * p.dv_row_stride + c * 8) =
          *reinterpret_cast<const uint4*>(sV + swz<CPR>(krow, c) * 8);
    }
  }
#endif  // __CUDA_ARCH__ >= 800
}

}  // namespace cuda
}  // namespace sinklora
