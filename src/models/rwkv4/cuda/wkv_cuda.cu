// RWKV-4 WKV with state in and out: forward and backward, one source for fp32, fp16 and bf16 I/O.
//
// Per batch b and channel c (w = -exp(time_decay) < 0, u = time_first), over tokens t:
//     y_t = (a_{t-1} + e^{u+k_t} v_t) / (b_{t-1} + e^{u+k_t})
//     a_t = e^w a_{t-1} + e^{k_t} v_t,   b_t = e^w b_{t-1} + e^{k_t}
// The state is kept as (aa, bb, pp) with a = aa e^pp, b = bb e^pp, and every exponential is taken of a
// difference to the running maximum, so nothing overflows (same numerics as wkv_torch in
// src/models/rwkv4/wkv.py).
// All arithmetic, the state and the gradients of w and u are fp32 whatever the I/O type.
//
// Parallel over time. The recurrence is linear in (a, b), so a stretch of tokens can be summarised from
// the empty state and merged later: state after = (state before decayed by e^{n w}) + summary.
//   row   = kChunk tokens of one channel, walked sequentially by one thread (`chunk` in the identifiers:
//           kChunk, chunk_summary, chunk_plane);
//   tile  = kRows consecutive rows x kLanes consecutive channels = one block (one warp per row, so
//           each load instruction reads kLanes consecutive channels of one token: coalesced);
//   scan  = one thread per (b, c) walks the tiles' summaries in order: T / (kChunk kRows) steps.
// Forward: (1) each tile summarises its tokens; (2) the scan gives the state entering every tile and the
// final state; (3) each tile re-derives the state entering each of its rows and writes y.
//
// Backward. With ga_t = dL/da_t e^{pp_t} and gb_t = dL/db_t e^{pp_t} (adjoints scaled like the state,
// always finite) and, at token t, e1 = e^{pp_{t-1}-p}, e2 = e^{u+k_t-p}, p = max(pp_{t-1}, u+k_t),
// inv = 1/(e1 bb_{t-1} + e2), q = gy_t inv, f = e^{w+pp_{t-1}-pp_t}, ek = e^{k_t-pp_t}:
//     ga_{t-1} = f ga_t + q e1,          gb_{t-1} = f gb_t - q e1 y_t
//     gv_t = q e2 + ga_t ek,             gk_t = q e2 (v_t - y_t) + (ga_t v_t + gb_t) ek
//     gu  += q e2 (v_t - y_t),           gw  += f (ga_t aa_{t-1} + gb_t bb_{t-1})
// The adjoint recurrence is linear too: over a row entered with pp_in and left with pp_end,
// ga_in = F ga_end + G with F = e^{n w + pp_in - pp_end} <= 1 and G the row's own contribution.
// Backward steps: (1, 2) as the forward, for the states; (3) each row computes G, H (for gb) walking
// forward, and each tile merges them; (4) the scan, in reverse, gives the adjoint leaving every tile
// and the input state's gradient; (5) each tile re-derives the adjoint leaving each row, each row
// replays its states and walks back through its tokens writing gk, gv; (6) gw, gu partial sums (one
// per tile) are added in a fixed order: deterministic, no atomics.
#include "wkv.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace wkv {
namespace {

constexpr int kChunk = 16;                            // tokens per thread
constexpr int kRows = 8;                              // rows per tile
constexpr int kLanes = 32;                            // channels per tile
constexpr int kThreads = kRows * kLanes;              // threads per tile block
// Tile blocks resident per SM: the register budget (64 or 128 per thread) that lets several blocks overlap
// each other's load latency and single-warp phases.
constexpr int kLightBlocks = 4;                       // tile_summary, output
constexpr int kHeavyBlocks = 2;                       // chunk_adjoint, chunk_backward
constexpr int64_t kTileTokens = int64_t(kChunk) * kRows;
constexpr int kScanThreads = 128;
constexpr int kScanBatch = 8;                         // tiles whose summaries one scan thread loads at once
constexpr int kReduceRows = 8;
constexpr float kEmptyPP = -1e38f;                    // pp of the empty state: EMPTY_PP of src/models/rwkv4/state.py

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// Sizes derived from (B, T, C). Buffers of per-row or per-tile values are planes of (B, n, C) floats.
struct Grid {
  int64_t B, T, C;
  int64_t chunks;  // rows per sequence
  int64_t tiles;   // tiles per sequence
  int64_t groups;  // channel groups of kLanes
  __host__ __device__ int64_t chunk_plane() const { return B * chunks * C; }
  __host__ __device__ int64_t tile_plane() const { return B * tiles * C; }
  __host__ __device__ int chunk_len(int64_t j) const { return int(min(int64_t(kChunk), T - j * kChunk)); }
  __host__ __device__ int64_t tile_len(int64_t s) const { return min(kTileTokens, T - s * kTileTokens); }
};

Grid make_grid(Dims d) {
  Grid g{d.B, d.T, d.C, 0, 0, 0};
  g.chunks = (d.T + kChunk - 1) / kChunk;
  g.tiles = (g.chunks + kRows - 1) / kRows;
  g.groups = (d.C + kLanes - 1) / kLanes;
  return g;
}

struct State {
  float aa, bb, pp;
};

__device__ __forceinline__ State load_state(const float* __restrict__ buf, int64_t plane, int64_t at) {
  return {buf[at], buf[plane + at], buf[2 * plane + at]};
}

__device__ __forceinline__ void store_state(float* __restrict__ buf, int64_t plane, int64_t at, State s) {
  buf[at] = s.aa;
  buf[plane + at] = s.bb;
  buf[2 * plane + at] = s.pp;
}

// (e^{x1-m}, e^{x2-m}) with m = max(x1, x2), for one exp: one of the pair is exactly 1.
__device__ __forceinline__ void pair_exp(float x1, float x2, float& e1, float& e2) {
  const float d = x1 - x2;
  const float e = expf(-fabsf(d));
  const bool first_is_max = d >= 0.f;
  e1 = first_is_max ? 1.f : e;
  e2 = first_is_max ? e : 1.f;
}

// State s decayed by e^{decay}, then plus the summary `add` (both in max-exponent form).
__device__ __forceinline__ State merge(State s, float decay, State add) {
  const float decayed = s.pp + decay;
  float e1, e2;
  pair_exp(decayed, add.pp, e1, e2);
  return {e1 * s.aa + e2 * add.aa, e1 * s.bb + e2 * add.bb, fmaxf(decayed, add.pp)};
}

// One token into the state; f = e^{w+pp-pp'} and ek = e^{k-pp'} are what the backward pass needs.
struct Step {
  State next;
  float f, ek;
};

__device__ __forceinline__ Step step(State s, float w, float k, float v) {
  const float decayed = s.pp + w;
  Step r;
  pair_exp(decayed, k, r.f, r.ek);
  r.next = {r.f * s.aa + r.ek * v, r.f * s.bb + r.ek, fmaxf(decayed, k)};
  return r;
}

// The output at a token from the state before it: y, e1 = e^{pp-p}, e2 = e^{u+k-p}, inv = 1/(e1 bb + e2).
struct Out {
  float y, e1, e2, inv;
};

__device__ __forceinline__ Out output(State s, float u, float k, float v) {
  Out o;
  pair_exp(s.pp, u + k, o.e1, o.e2);
  o.inv = 1.f / (o.e1 * s.bb + o.e2);
  o.y = (o.e1 * s.aa + o.e2 * v) * o.inv;
  return o;
}

// Where a thread of a tile block works: row j = s kRows + r of batch b, channel c.
struct Tile {
  int64_t b, s, c, j;
  int r, lane;
  int n;         // tokens in this row; <= 0 past the end of the sequence
  int rows;      // rows in this tile (kRows except in the last tile)
  bool channel;  // c < C
  bool active;   // channel and n > 0
  int64_t token_at;  // offset of token (b, j kChunk, c) in (B, T, C)
  int64_t chunk_at;  // offset of (b, j, c) in a row plane
  int64_t tile_at;   // offset of (b, s, c) in a tile plane
};

__device__ __forceinline__ Tile tile_of(const Grid& g) {
  Tile t;
  int64_t block = blockIdx.x;
  const int64_t group = block % g.groups;
  block /= g.groups;
  t.s = block % g.tiles;
  t.b = block / g.tiles;
  t.lane = threadIdx.x % kLanes;
  t.r = threadIdx.x / kLanes;
  t.c = group * kLanes + t.lane;
  t.j = t.s * kRows + t.r;
  t.n = g.chunk_len(t.j);
  t.rows = int(min(int64_t(kRows), g.chunks - t.s * kRows));
  t.channel = t.c < g.C;
  t.active = t.channel && t.n > 0;
  t.token_at = (t.b * g.T + t.j * kChunk) * g.C + t.c;
  t.chunk_at = (t.b * g.chunks + t.j) * g.C + t.c;
  t.tile_at = (t.b * g.tiles + t.s) * g.C + t.c;
  return t;
}

// A row's tokens of x into registers (all loads issued before any use), 0 past the row's end.
template <typename T>
__device__ __forceinline__ void load_chunk(const T* __restrict__ x, const Tile& t, int64_t C, float (&out)[kChunk]) {
#pragma unroll
  for (int i = 0; i < kChunk; ++i) out[i] = (t.active && i < t.n) ? to_float(x[t.token_at + i * C]) : 0.f;
}

// The row's own summary: its tokens run into the empty state (the first one gives exactly (v, 1, k)).
__device__ __forceinline__ State chunk_summary(const float (&k)[kChunk], const float (&v)[kChunk], int n, float w) {
  State s{v[0], 1.f, k[0]};
#pragma unroll
  for (int i = 1; i < kChunk; ++i)
    if (i < n) s = step(s, w, k[i], v[i]).next;
  return s;
}

// Warp 0 of a tile: replace the row summaries in part[0..rows) by the states entering each row,
// given the state entering the tile.
__device__ __forceinline__ void states_entering_chunks(State (&part)[kRows][kLanes], State in, const Tile& t,
                                                       const Grid& g, float w) {
  for (int r = 0; r < t.rows; ++r) {
    const State local = part[r][t.lane];
    part[r][t.lane] = in;
    in = merge(in, g.chunk_len(t.s * kRows + r) * w, local);
  }
}

// Forward (1) and backward (1): the summary of each tile's tokens from the empty state.
template <typename T>
__global__ void __launch_bounds__(kThreads, kLightBlocks) tile_summary_kernel(Grid g, const float* __restrict__ w,
                                                                const T* __restrict__ k, const T* __restrict__ v,
                                                                float* __restrict__ tile_state) {
  __shared__ State part[kRows][kLanes];
  const Tile t = tile_of(g);
  const float ww = t.channel ? w[t.c] : 0.f;
  float kk[kChunk], vv[kChunk];
  load_chunk(k, t, g.C, kk);
  load_chunk(v, t, g.C, vv);
  if (t.active) part[t.r][t.lane] = chunk_summary(kk, vv, t.n, ww);
  __syncthreads();
  if (t.r == 0 && t.channel) {
    State acc = part[0][t.lane];
    for (int r = 1; r < t.rows; ++r) acc = merge(acc, g.chunk_len(t.s * kRows + r) * ww, part[r][t.lane]);
    store_state(tile_state, g.tile_plane(), t.tile_at, acc);
  }
}

// Forward (2): per (b, c), in order over tiles, replace each tile's summary by the state entering it;
// write the final state. Summaries are loaded kScanBatch tiles at a time so the loads overlap.
__global__ void __launch_bounds__(kScanThreads) state_scan_kernel(Grid g, const float* __restrict__ w,
                                                                  const float* __restrict__ state_in,
                                                                  float* __restrict__ tile_state,
                                                                  float* __restrict__ state_out) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i >= g.B * g.C) return;
  const int64_t b = i / g.C, c = i % g.C;
  const float ww = w[c];
  const int64_t plane = g.tile_plane();
  State s{state_in[3 * i], state_in[3 * i + 1], state_in[3 * i + 2]};
  for (int64_t s0 = 0; s0 < g.tiles; s0 += kScanBatch) {
    State local[kScanBatch];
#pragma unroll
    for (int q = 0; q < kScanBatch; ++q)
      if (s0 + q < g.tiles) local[q] = load_state(tile_state, plane, (b * g.tiles + s0 + q) * g.C + c);
#pragma unroll
    for (int q = 0; q < kScanBatch; ++q)
      if (s0 + q < g.tiles) {
        store_state(tile_state, plane, (b * g.tiles + s0 + q) * g.C + c, s);
        s = merge(s, g.tile_len(s0 + q) * ww, local[q]);
      }
  }
  state_out[3 * i] = s.aa;
  state_out[3 * i + 1] = s.bb;
  state_out[3 * i + 2] = s.pp;
}

// Forward (3): the state entering each row, then y for its tokens.
template <typename T>
__global__ void __launch_bounds__(kThreads, kLightBlocks) output_kernel(Grid g, const float* __restrict__ w,
                                                          const float* __restrict__ u, const T* __restrict__ k,
                                                          const T* __restrict__ v,
                                                          const float* __restrict__ tile_state, T* __restrict__ y) {
  __shared__ State part[kRows][kLanes];
  const Tile t = tile_of(g);
  const float ww = t.channel ? w[t.c] : 0.f, uu = t.channel ? u[t.c] : 0.f;
  float kk[kChunk], vv[kChunk];
  load_chunk(k, t, g.C, kk);
  load_chunk(v, t, g.C, vv);
  if (t.active) part[t.r][t.lane] = chunk_summary(kk, vv, t.n, ww);
  __syncthreads();
  if (t.r == 0 && t.channel) states_entering_chunks(part, load_state(tile_state, g.tile_plane(), t.tile_at), t, g, ww);
  __syncthreads();
  if (!t.active) return;
  State s = part[t.r][t.lane];
#pragma unroll
  for (int i = 0; i < kChunk; ++i)
    if (i < t.n) {
      y[t.token_at + i * g.C] = from_float<T>(output(s, uu, kk[i], vv[i]).y);
      s = step(s, ww, kk[i], vv[i]).next;
    }
}

// Backward (3): per row, the state entering it (kept in chunk_state for step 5), its own adjoint
// contribution G, H and the exponent pp_end it leaves with (in chunk_adj); per tile, the merged
// contribution in tile_adj. G = sum_t R_t q_t e1_t, H = -sum_t R_t q_t e1_t y_t, where
// R_t = e^{(t-s)w + pp_in - pp_{t-1}} <= 1 carries token t's term back to the row's entry.
template <typename T>
__global__ void __launch_bounds__(kThreads, kHeavyBlocks) chunk_adjoint_kernel(
    Grid g, const float* __restrict__ w, const float* __restrict__ u, const T* __restrict__ k,
    const T* __restrict__ v, const T* __restrict__ gy, const float* __restrict__ tile_state,
    const float* __restrict__ state_out, float* __restrict__ chunk_state, float* __restrict__ chunk_adj,
    float* __restrict__ tile_adj) {
  __shared__ State part[kRows][kLanes];
  __shared__ float3 fgh[kRows][kLanes];  // (F, G, H) of each row
  const Tile t = tile_of(g);
  const float ww = t.channel ? w[t.c] : 0.f, uu = t.channel ? u[t.c] : 0.f;
  float kk[kChunk], vv[kChunk], gg[kChunk];
  load_chunk(k, t, g.C, kk);
  load_chunk(v, t, g.C, vv);
  load_chunk(gy, t, g.C, gg);
  if (t.active) part[t.r][t.lane] = chunk_summary(kk, vv, t.n, ww);
  __syncthreads();
  if (t.r == 0 && t.channel) states_entering_chunks(part, load_state(tile_state, g.tile_plane(), t.tile_at), t, g, ww);
  __syncthreads();
  if (t.active) {
    const State in = part[t.r][t.lane];
    State s = in;
    float reach = 1.f, G = 0.f, H = 0.f;
#pragma unroll
    for (int i = 0; i < kChunk; ++i)
      if (i < t.n) {
        const Out o = output(s, uu, kk[i], vv[i]);
        const float q = gg[i] * o.inv * o.e1;
        G += reach * q;
        H -= reach * q * o.y;
        const Step st = step(s, ww, kk[i], vv[i]);
        s = st.next;
        reach *= st.f;
      }
    // the exponent of the state leaving this row, as the next row (or the final state) has it
    float pp_end;
    if (t.r + 1 < t.rows) pp_end = part[t.r + 1][t.lane].pp;
    else if (t.s + 1 < g.tiles) pp_end = tile_state[2 * g.tile_plane() + t.tile_at + g.C];
    else pp_end = state_out[3 * (t.b * g.C + t.c) + 2];
    const int64_t plane = g.chunk_plane();
    store_state(chunk_state, plane, t.chunk_at, in);
    chunk_adj[t.chunk_at] = G;
    chunk_adj[plane + t.chunk_at] = H;
    chunk_adj[2 * plane + t.chunk_at] = pp_end;
    fgh[t.r][t.lane] = make_float3(expf(t.n * ww + in.pp - pp_end), G, H);
  }
  __syncthreads();
  if (t.r == 0 && t.channel) {
    float ga = 0.f, gb = 0.f;
    for (int r = t.rows - 1; r >= 0; --r) {
      const float3 x = fgh[r][t.lane];
      ga = x.x * ga + x.y;
      gb = x.x * gb + x.z;
    }
    tile_adj[t.tile_at] = ga;
    tile_adj[g.tile_plane() + t.tile_at] = gb;
  }
}

// Backward (4): per (b, c), tiles in reverse: replace each tile's contribution by the adjoint leaving the
// tile (relative to the pp it leaves with), starting from the output state's gradient; write the input
// state's gradient (ga, gb, ga aa_in + gb bb_in).
__global__ void __launch_bounds__(kScanThreads) adjoint_scan_kernel(
    Grid g, const float* __restrict__ w, const float* __restrict__ state_in, const float* __restrict__ tile_state,
    const float* __restrict__ state_out, const float* __restrict__ gstate_out, float* __restrict__ tile_adj,
    float* __restrict__ gstate_in) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i >= g.B * g.C) return;
  const int64_t b = i / g.C, c = i % g.C;
  const float ww = w[c];
  const int64_t plane = g.tile_plane();
  float ga = gstate_out[3 * i], gb = gstate_out[3 * i + 1];
  float pp_end = state_out[3 * i + 2];
  for (int64_t top = g.tiles - 1; top >= 0; top -= kScanBatch) {
    float adj_a[kScanBatch], adj_b[kScanBatch], pp_in[kScanBatch];
#pragma unroll
    for (int q = 0; q < kScanBatch; ++q)
      if (top - q >= 0) {
        const int64_t at = (b * g.tiles + top - q) * g.C + c;
        adj_a[q] = tile_adj[at];
        adj_b[q] = tile_adj[plane + at];
        pp_in[q] = tile_state[2 * plane + at];
      }
#pragma unroll
    for (int q = 0; q < kScanBatch; ++q)
      if (top - q >= 0) {
        const int64_t at = (b * g.tiles + top - q) * g.C + c;
        tile_adj[at] = ga;
        tile_adj[plane + at] = gb;
        const float F = expf(g.tile_len(top - q) * ww + pp_in[q] - pp_end);
        ga = F * ga + adj_a[q];
        gb = F * gb + adj_b[q];
        pp_end = pp_in[q];
      }
  }
  gstate_in[3 * i] = ga;
  gstate_in[3 * i + 1] = gb;
  gstate_in[3 * i + 2] = ga * state_in[3 * i] + gb * state_in[3 * i + 1];
}

// Backward (5): the adjoint leaving each row, then each row replays its states and walks back through
// its tokens: gk, gv, and the tile's partial sums of gw, gu.
template <typename T>
__global__ void __launch_bounds__(kThreads, kHeavyBlocks) chunk_backward_kernel(
    Grid g, const float* __restrict__ w, const float* __restrict__ u, const T* __restrict__ k,
    const T* __restrict__ v, const T* __restrict__ gy, const float* __restrict__ chunk_state,
    const float* __restrict__ chunk_adj, const float* __restrict__ tile_adj, T* __restrict__ gk,
    T* __restrict__ gv, float* __restrict__ partial) {
  __shared__ float3 fgh[kRows][kLanes];
  __shared__ float2 leaving[kRows][kLanes];  // (ga, gb) leaving each row, relative to its pp_end
  __shared__ float2 sums[kRows][kLanes];     // (gw, gu) of each row
  const Tile t = tile_of(g);
  const float ww = t.channel ? w[t.c] : 0.f, uu = t.channel ? u[t.c] : 0.f;
  const int64_t plane = g.chunk_plane();
  State in{0.f, 0.f, kEmptyPP};
  float pp_end = 0.f;
  if (t.active) {
    in = load_state(chunk_state, plane, t.chunk_at);
    pp_end = chunk_adj[2 * plane + t.chunk_at];
    fgh[t.r][t.lane] = make_float3(expf(t.n * ww + in.pp - pp_end), chunk_adj[t.chunk_at], chunk_adj[plane + t.chunk_at]);
  }
  __syncthreads();
  if (t.r == 0 && t.channel) {
    float ga = tile_adj[t.tile_at], gb = tile_adj[g.tile_plane() + t.tile_at];
    for (int r = t.rows - 1; r >= 0; --r) {
      leaving[r][t.lane] = make_float2(ga, gb);
      const float3 x = fgh[r][t.lane];
      ga = x.x * ga + x.y;
      gb = x.x * gb + x.z;
    }
  }
  __syncthreads();
  float gw_sum = 0.f, gu_sum = 0.f;
  if (t.active) {
    float kk[kChunk], vv[kChunk], gg[kChunk];
    load_chunk(k, t, g.C, kk);
    load_chunk(v, t, g.C, vv);
    load_chunk(gy, t, g.C, gg);
    State before[kChunk];  // the state before each token
    State s = in;
#pragma unroll
    for (int i = 0; i < kChunk; ++i) {
      before[i] = s;
      if (i < t.n) s = step(s, ww, kk[i], vv[i]).next;
    }
    // the adjoint leaving the row, rescaled from the scan's pp_end to the replayed one (equal up to rounding)
    const float rescale = expf(s.pp - pp_end);
    float ga = leaving[t.r][t.lane].x * rescale, gb = leaving[t.r][t.lane].y * rescale;
#pragma unroll
    for (int i = kChunk - 1; i >= 0; --i)
      if (i < t.n) {
        const State p = before[i];
        const Out o = output(p, uu, kk[i], vv[i]);
        const Step st = step(p, ww, kk[i], vv[i]);
        const float q = gg[i] * o.inv;
        const float gu_t = q * o.e2 * (vv[i] - o.y);
        gk[t.token_at + i * g.C] = from_float<T>(gu_t + (ga * vv[i] + gb) * st.ek);
        gv[t.token_at + i * g.C] = from_float<T>(q * o.e2 + ga * st.ek);
        gu_sum += gu_t;
        gw_sum += st.f * (ga * p.aa + gb * p.bb);
        ga = st.f * ga + q * o.e1;
        gb = st.f * gb - q * o.e1 * o.y;
      }
  }
  sums[t.r][t.lane] = make_float2(gw_sum, gu_sum);
  __syncthreads();
  if (t.r == 0 && t.channel) {
    float2 acc = sums[0][t.lane];
    for (int r = 1; r < kRows; ++r) {
      acc.x += sums[r][t.lane].x;
      acc.y += sums[r][t.lane].y;
    }
    partial[t.tile_at] = acc.x;
    partial[g.tile_plane() + t.tile_at] = acc.y;
  }
}

// Backward (6): gw[c], gu[c] = sums of the (B, tiles) partials, in a fixed order.
__global__ void __launch_bounds__(kReduceRows * kLanes) reduce_kernel(Grid g, const float* __restrict__ partial,
                                                                        float* __restrict__ gw, float* __restrict__ gu) {
  __shared__ float2 sums[kReduceRows][kLanes];
  const int lane = threadIdx.x % kLanes, r = threadIdx.x / kLanes;
  const int64_t c = blockIdx.x * int64_t(kLanes) + lane;
  const int64_t rows = g.B * g.tiles, plane = g.tile_plane();
  float2 acc = make_float2(0.f, 0.f);
  if (c < g.C)
    for (int64_t q = r; q < rows; q += kReduceRows) {
      acc.x += partial[q * g.C + c];
      acc.y += partial[plane + q * g.C + c];
    }
  sums[r][lane] = acc;
  __syncthreads();
  if (r == 0 && c < g.C) {
    for (int q = 1; q < kReduceRows; ++q) {
      acc.x += sums[q][lane].x;
      acc.y += sums[q][lane].y;
    }
    gw[c] = acc.x;
    gu[c] = acc.y;
  }
}

unsigned int tile_blocks(const Grid& g) { return unsigned(g.B * g.tiles * g.groups); }
unsigned int scan_blocks(const Grid& g) { return unsigned((g.B * g.C + kScanThreads - 1) / kScanThreads); }

template <typename T>
cudaError_t forward_impl(const Grid& g, const float* w, const float* u, const T* k, const T* v,
                         const float* state_in, T* y, float* state_out, float* scratch, cudaStream_t stream) {
  float* tile_state = scratch;  // 3 tile planes
  tile_summary_kernel<T><<<tile_blocks(g), kThreads, 0, stream>>>(g, w, k, v, tile_state);
  state_scan_kernel<<<scan_blocks(g), kScanThreads, 0, stream>>>(g, w, state_in, tile_state, state_out);
  output_kernel<T><<<tile_blocks(g), kThreads, 0, stream>>>(g, w, u, k, v, tile_state, y);
  return cudaGetLastError();
}

template <typename T>
cudaError_t backward_impl(const Grid& g, const float* w, const float* u, const T* k, const T* v,
                          const float* state_in, const T* gy, const float* gstate_out, float* gw, float* gu, T* gk,
                          T* gv, float* gstate_in, float* scratch, cudaStream_t stream) {
  float* tile_state = scratch;                            // 3 tile planes
  float* state_out = tile_state + 3 * g.tile_plane();     // (B, C, 3)
  float* tile_adj = state_out + 3 * g.B * g.C;            // 2 tile planes
  float* partial = tile_adj + 2 * g.tile_plane();         // 2 tile planes
  float* chunk_state = partial + 2 * g.tile_plane();      // 3 row planes
  float* chunk_adj = chunk_state + 3 * g.chunk_plane();   // 3 row planes
  tile_summary_kernel<T><<<tile_blocks(g), kThreads, 0, stream>>>(g, w, k, v, tile_state);
  state_scan_kernel<<<scan_blocks(g), kScanThreads, 0, stream>>>(g, w, state_in, tile_state, state_out);
  chunk_adjoint_kernel<T><<<tile_blocks(g), kThreads, 0, stream>>>(g, w, u, k, v, gy, tile_state, state_out,
                                                                    chunk_state, chunk_adj, tile_adj);
  adjoint_scan_kernel<<<scan_blocks(g), kScanThreads, 0, stream>>>(g, w, state_in, tile_state, state_out,
                                                                   gstate_out, tile_adj, gstate_in);
  chunk_backward_kernel<T><<<tile_blocks(g), kThreads, 0, stream>>>(g, w, u, k, v, gy, chunk_state, chunk_adj,
                                                                     tile_adj, gk, gv, partial);
  reduce_kernel<<<unsigned(g.groups), kReduceRows * kLanes, 0, stream>>>(g, partial, gw, gu);
  return cudaGetLastError();
}

}  // namespace

int64_t forward_scratch_floats(Dims d) { return 3 * make_grid(d).tile_plane(); }

int64_t backward_scratch_floats(Dims d) {
  const Grid g = make_grid(d);
  return 7 * g.tile_plane() + 3 * g.B * g.C + 6 * g.chunk_plane();
}

cudaError_t forward(IoType io, Dims d, const float* w, const float* u, const void* k, const void* v,
                    const float* state_in, void* y, float* state_out, float* scratch, cudaStream_t stream) {
  const Grid g = make_grid(d);
  switch (io) {
    case IoType::kFloat:
      return forward_impl(g, w, u, static_cast<const float*>(k), static_cast<const float*>(v), state_in,
                          static_cast<float*>(y), state_out, scratch, stream);
    case IoType::kHalf:
      return forward_impl(g, w, u, static_cast<const __half*>(k), static_cast<const __half*>(v), state_in,
                          static_cast<__half*>(y), state_out, scratch, stream);
    case IoType::kBFloat16:
      return forward_impl(g, w, u, static_cast<const __nv_bfloat16*>(k), static_cast<const __nv_bfloat16*>(v),
                          state_in, static_cast<__nv_bfloat16*>(y), state_out, scratch, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t backward(IoType io, Dims d, const float* w, const float* u, const void* k, const void* v,
                     const float* state_in, const void* gy, const float* gstate_out, float* gw, float* gu,
                     void* gk, void* gv, float* gstate_in, float* scratch, cudaStream_t stream) {
  const Grid g = make_grid(d);
  switch (io) {
    case IoType::kFloat:
      return backward_impl(g, w, u, static_cast<const float*>(k), static_cast<const float*>(v), state_in,
                           static_cast<const float*>(gy), gstate_out, gw, gu, static_cast<float*>(gk),
                           static_cast<float*>(gv), gstate_in, scratch, stream);
    case IoType::kHalf:
      return backward_impl(g, w, u, static_cast<const __half*>(k), static_cast<const __half*>(v), state_in,
                           static_cast<const __half*>(gy), gstate_out, gw, gu, static_cast<__half*>(gk),
                           static_cast<__half*>(gv), gstate_in, scratch, stream);
    case IoType::kBFloat16:
      return backward_impl(g, w, u, static_cast<const __nv_bfloat16*>(k), static_cast<const __nv_bfloat16*>(v),
                           state_in, static_cast<const __nv_bfloat16*>(gy), gstate_out, gw, gu,
                           static_cast<__nv_bfloat16*>(gk), static_cast<__nv_bfloat16*>(gv), gstate_in, scratch,
                           stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace wkv
