// RWKV-7 ("x070") WKV with state in and out: forward and backward, one source for fp32 and bf16 I/O.
//
// Per batch b and head h the state S is an N x N matrix (rows i: value channels, columns j: key channels). Tokens
// t = 0 .. T-1, S_{-1} = s0, S_{T-1} = sT, and decay_t = exp(-exp(-softplus(-w_t) - 0.5)) = exp(-e^{-0.5}
// sigmoid(w_t)), which lies in [e^{-e^{-0.5}}, 1) = [0.545, 1) (the soft clamp):
//     sa_t = S_{t-1} a_t                                         (N)
//     S_t  = S_{t-1} diag(decay_t) + sa_t b_t^T + v_t k_t^T
//     y_t  = S_t r_t
// The same recurrence as wkv7_torch in src/models/rwkv7/wkv.py. All arithmetic and the state are fp32 whatever the
// I/O type, with exact expf and division (the build has no fast-math flags).
//
// Layout: one block per (b, h) walks the tokens in order (N threads forward, 2 N backward); the inputs of kChunk
// tokens at a time are staged in shared memory (one global-load latency per chunk, not per token).
//
// Forward: thread i keeps row i of S in registers. Per token it writes y_t[i] and sa_t[i] (kept for the backward
// pass); after the last token of every chunk it writes row i of S as that chunk's snapshot.
//
// Backward, the adjoint recurrence. Let G_t = dL/dS_t (through y_t and S_{t+1}). Then
//     G_{T-1} = dsT + dy_{T-1} r_{T-1}^T
//     dr_t = S_t^T dy_t          dv_t = G_t k_t            dk_t = G_t^T v_t
//     dsa_t = G_t b_t            db_t = G_t^T sa_t         da_t = S_{t-1}^T dsa_t
//     ddecay_t[j] = sum_i G_t[i, j] S_{t-1}[i, j]        dw_t = ddecay_t decay_t (-e^{-0.5}) sigmoid(w_t) sigmoid(-w_t)
//     G_{t-1} = G_t diag(decay_t) + dsa_t a_t^T + dy_{t-1} r_{t-1}^T        (no dy r^T term for t = 0)
//     ds0 = G_{-1}
// The states are walked back by inverting each step with the stored sa_t (no matrix to invert, only the decay):
//     S_{t-1} = (S_t - v_t k_t^T - sa_t b_t^T) diag(1 / decay_t).
// Each inverse step multiplies the rounding errors it inherits by 1 / decay, up to e^{e^{-0.5}} = 1.83, so runs of
// inverse steps are kept short: the tokens of a chunk are taken in runs of kInverseRun, backwards, and each run starts
// from an exact state: the chunk's snapshot for its last run (sT for the last chunk), and for the others the state
// replayed forward from the state entering the chunk (the previous snapshot, or s0). With sa_t stored, a replayed step
// is local to a column, S_t[:, n] = S_{t-1}[:, n] decay_t[n] + sa_t b_t[n] + v_t k_t[n], and the forward's own
// arithmetic, so it gives the forward's states bit for bit. Errors grow by at most 1.83^8 ~ 126 (1.83^16 ~ 16000
// with inverse steps only, which the fp32 tests measured at ~2e-4 relative on the gradients of r, w, a).
// Most sums run over rows i (dr, dk, db, ddecay, da: columns of S and G), two over columns (dv, dsa: rows of G), so
// the backward block has two thread groups: column threads keep column n of S and of G in registers, row threads row
// n of G (two copies of G updated by the same operations, hence equal): every sum stays within a thread, and only
// dsa_t goes through shared memory (one barrier per token). tests/models/rwkv7/test_wkv7_backward_model.py checks
// this algorithm on the CPU, tests/models/rwkv7/test_wkv7_kernel_on_cpu.py this source compiled for the CPU.
#include "wkv7.h"

#include <cuda_bf16.h>

namespace wkv7 {
namespace {

constexpr int N = kHeadSize;
constexpr int kInverseRun = 8;  // backward: inverse steps in a row at most (kChunk is a multiple)
static_assert(kChunk % kInverseRun == 0, "runs of inverse steps must tile a chunk");
constexpr float kDecayScale = -0.60653065971263342f;  // -e^{-0.5}

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename F> __device__ __forceinline__ F from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// The inputs and gradients as typed pointers.
template <typename F> struct TypedInputs {
  const F *r, *w, *k, *v, *a, *b;
  explicit TypedInputs(Inputs in)
      : r(static_cast<const F*>(in.r)), w(static_cast<const F*>(in.w)), k(static_cast<const F*>(in.k)),
        v(static_cast<const F*>(in.v)), a(static_cast<const F*>(in.a)), b(static_cast<const F*>(in.b)) {}
};

template <typename F> struct TypedGradients {
  F *r, *w, *k, *v, *a, *b;
  explicit TypedGradients(Gradients g)
      : r(static_cast<F*>(g.r)), w(static_cast<F*>(g.w)), k(static_cast<F*>(g.k)), v(static_cast<F*>(g.v)),
        a(static_cast<F*>(g.a)), b(static_cast<F*>(g.b)) {}
};

// decay = exp(-e^{-0.5} sigmoid(w)) and its slope d decay / d w = decay (-e^{-0.5}) sigmoid(w) sigmoid(-w)
// (sigmoid(-w) computed as such, not as 1 - sigmoid(w), so the slope is accurate and finite for every w).
struct Decay {
  float value, slope;
};

__device__ __forceinline__ Decay decay_of(float w) {
  const float s = 1.0f / (1.0f + expf(-w));
  const float s_neg = 1.0f / (1.0f + expf(w));
  const float value = expf(kDecayScale * s);
  return {value, value * kDecayScale * s * s_neg};
}

// Offset of element (b, t, h, 0) of a (B, T, H, N) tensor.
__device__ __forceinline__ int64_t token_offset(const Dims& d, int64_t b, int64_t t, int64_t h) {
  return ((b * d.T + t) * d.H + h) * N;
}

__device__ __forceinline__ int64_t chunks_of(const Dims& d) { return (d.T + kChunk - 1) / kChunk; }

__device__ __forceinline__ float4 load4(const float* p, int j) { return *reinterpret_cast<const float4*>(p + j); }

// Component e of a float4 (e a constant once loops are unrolled).
__device__ __forceinline__ float part(const float4& q, int e) {
  return e == 0 ? q.x : e == 1 ? q.y : e == 2 ? q.z : q.w;
}

// A dot product kept as four partial sums (short FMA chains), added up at the end.
__device__ __forceinline__ float sum4(const float (&partial)[4]) {
  return (partial[0] + partial[1]) + (partial[2] + partial[3]);
}

// The loops over a row or column of N registers below go 4 channels at a time: one float4 read of each shared vector
// (the same address in every thread, a broadcast), then the 4 channels e, each summed into partial sum e. Every
// shared vector is read once per loop, so no copy of it has to stay in registers.

// ------------------------------------------------------------------------------------------------ forward

// One token's inputs in shared memory, every channel (decay in place of w).
struct alignas(16) ForwardToken {
  float r[N], decay[N], k[N], v[N], a[N], b[N];
};

// Channel i of the chunk's tokens [t0, t0 + len) into shared memory (unrolled, so the loads are all in flight).
template <typename F>
__device__ __forceinline__ void stage_forward(ForwardToken (&tokens)[kChunk], const TypedInputs<F>& in,
                                              const Dims& d, int64_t b, int64_t h, int64_t t0, int len, int i) {
#pragma unroll
  for (int s = 0; s < kChunk; ++s) {
    if (s < len) {
      const int64_t at = token_offset(d, b, t0 + s, h) + i;
      ForwardToken& x = tokens[s];
      x.r[i] = to_float(in.r[at]);
      x.decay[i] = decay_of(to_float(in.w[at])).value;
      x.k[i] = to_float(in.k[at]);
      x.v[i] = to_float(in.v[at]);
      x.a[i] = to_float(in.a[at]);
      x.b[i] = to_float(in.b[at]);
    }
  }
}

// Block (b, h), thread i: row i of the state. See the top of the file for the outputs.
template <typename F>
__global__ void __launch_bounds__(N) forward_kernel(Dims d, TypedInputs<F> in, const float* __restrict__ s0,
                                                    F* __restrict__ y, float* __restrict__ sT,
                                                    float* __restrict__ sa_out, float* __restrict__ states) {
  __shared__ ForwardToken tokens[kChunk];
  const int64_t b = blockIdx.x / d.H, h = blockIdx.x % d.H, head = blockIdx.x;
  const int i = threadIdx.x;
  const int64_t chunks = chunks_of(d);

  float state[N];  // S[i, :]
  const float* s0_row = s0 + (head * N + i) * N;
#pragma unroll
  for (int j = 0; j < N; ++j) state[j] = s0_row[j];

  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t t0 = c * kChunk;
    const int len = int(min(int64_t(kChunk), d.T - t0));
    __syncthreads();  // every thread is done with the previous chunk's tokens
    stage_forward(tokens, in, d, b, h, t0, len, i);
    __syncthreads();
    for (int s = 0; s < len; ++s) {
      const ForwardToken& x = tokens[s];
      float sa[4] = {}, y_i[4] = {};
#pragma unroll
      for (int j0 = 0; j0 < N; j0 += 4) {  // sa_i = S_{t-1}[i, :] . a_t
        const float4 a4 = load4(x.a, j0);
#pragma unroll
        for (int e = 0; e < 4; ++e) sa[e] = fmaf(state[j0 + e], part(a4, e), sa[e]);
      }
      const float sa_i = sum4(sa), v_i = x.v[i];
      // S_t[i, j] = S_{t-1}[i, j] decay_j + sa_i b_j + v_i k_j, and y_i = S_t[i, :] . r_t
#pragma unroll
      for (int j0 = 0; j0 < N; j0 += 4) {
        const float4 d4 = load4(x.decay, j0), b4 = load4(x.b, j0), k4 = load4(x.k, j0), r4 = load4(x.r, j0);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int j = j0 + e;
          state[j] = fmaf(v_i, part(k4, e), fmaf(sa_i, part(b4, e), state[j] * part(d4, e)));
          y_i[e] = fmaf(state[j], part(r4, e), y_i[e]);
        }
      }
      const int64_t at = token_offset(d, b, t0 + s, h) + i;
      y[at] = from_float<F>(sum4(y_i));
      sa_out[at] = sa_i;
    }
    float* snapshot_row = states + ((head * chunks + c) * N + i) * N;
#pragma unroll
    for (int j = 0; j < N; ++j) snapshot_row[j] = state[j];
  }
  float* sT_row = sT + (head * N + i) * N;
#pragma unroll
  for (int j = 0; j < N; ++j) sT_row[j] = state[j];
}

// ------------------------------------------------------------------------------------------------ backward

// One token's inputs (decay and its slope in place of w), stored sa, output gradient, and dsa once computed.
struct alignas(16) BackwardToken {
  float r[N], decay[N], slope[N], k[N], v[N], a[N], b[N], sa[N], dy[N], dsa[N];
};

// Channel n of the chunk's tokens [t0, t0 + len) into shared memory, the two thread groups sharing the arrays.
template <typename F>
__device__ __forceinline__ void stage_backward(BackwardToken (&tokens)[kChunk], const TypedInputs<F>& in,
                                               const float* __restrict__ sa, const F* __restrict__ dy,
                                               const Dims& d, int64_t b, int64_t h, int64_t t0, int len, int n,
                                               bool column_thread) {
#pragma unroll
  for (int s = 0; s < kChunk; ++s) {
    if (s < len) {
      const int64_t at = token_offset(d, b, t0 + s, h) + n;
      BackwardToken& x = tokens[s];
      if (column_thread) {
        const Decay decay = decay_of(to_float(in.w[at]));
        x.decay[n] = decay.value;
        x.slope[n] = decay.slope;
        x.r[n] = to_float(in.r[at]);
        x.k[n] = to_float(in.k[at]);
        x.v[n] = to_float(in.v[at]);
      } else {
        x.a[n] = to_float(in.a[at]);
        x.b[n] = to_float(in.b[at]);
        x.sa[n] = sa[at];
        x.dy[n] = to_float(dy[at]);
      }
    }
  }
}

// Token t, row thread n. On entry g_row = row n of the gradient reaching S_t through S_{t+1}; on exit row n of
// G_{t-1} less its dy_{t-1} r_{t-1}^T term (see the top of the file). Writes dsa_t[n] to shared memory and
// returns dv_t[n].
__device__ __forceinline__ float row_token(BackwardToken& x, int n, float (&g_row)[N]) {
  const float dy_n = x.dy[n];
  float dv[4] = {}, dsa[4] = {};
#pragma unroll
  for (int j0 = 0; j0 < N; j0 += 4) {
    const float4 r4 = load4(x.r, j0), k4 = load4(x.k, j0), b4 = load4(x.b, j0);
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int j = j0 + e;
      g_row[j] = fmaf(dy_n, part(r4, e), g_row[j]);  // G_t[n, j], with its y_t = S_t r_t term
      dv[e] = fmaf(g_row[j], part(k4, e), dv[e]);    // dv_t = G_t k_t
      dsa[e] = fmaf(g_row[j], part(b4, e), dsa[e]);  // dsa_t = G_t b_t
    }
  }
  const float dsa_n = sum4(dsa);
  x.dsa[n] = dsa_n;
#pragma unroll
  for (int j0 = 0; j0 < N; j0 += 4) {  // G_t diag(decay) + dsa a^T
    const float4 d4 = load4(x.decay, j0), a4 = load4(x.a, j0);
#pragma unroll
    for (int e = 0; e < 4; ++e) g_row[j0 + e] = fmaf(dsa_n, part(a4, e), g_row[j0 + e] * part(d4, e));
  }
  return sum4(dv);
}

struct ColumnGradients {
  float r, w, k, a, b;
};

// Token t, column thread n, once every dsa_t is in shared memory. On entry s_col = S_t[:, n] and g_col = column n of
// the gradient reaching S_t through S_{t+1}; on exit S_{t-1}[:, n] and column n of G_{t-1} less its dy_{t-1}
// r_{t-1}^T term. Returns the gradients at key channel n.
__device__ __forceinline__ ColumnGradients column_token(const BackwardToken& x, int n, float (&s_col)[N],
                                                        float (&g_col)[N]) {
  const float r_n = x.r[n], k_n = x.k[n], b_n = x.b[n], a_n = x.a[n], decay_n = x.decay[n];
  const float inv_decay = 1.0f / decay_n;
  float dr[4] = {}, dk[4] = {}, db[4] = {}, ddecay[4] = {}, da[4] = {};
#pragma unroll
  for (int i0 = 0; i0 < N; i0 += 4) {
    const float4 dy4 = load4(x.dy, i0), v4 = load4(x.v, i0), sa4 = load4(x.sa, i0);
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int i = i0 + e;
      const float dy_i = part(dy4, e), v_i = part(v4, e), sa_i = part(sa4, e);
      dr[e] = fmaf(dy_i, s_col[i], dr[e]);   // dr_t = S_t^T dy_t
      g_col[i] = fmaf(dy_i, r_n, g_col[i]);  // G_t[i, n], with its y_t = S_t r_t term
      dk[e] = fmaf(g_col[i], v_i, dk[e]);    // dk_t = G_t^T v_t
      db[e] = fmaf(g_col[i], sa_i, db[e]);   // db_t = G_t^T sa_t
      s_col[i] = fmaf(-sa_i, b_n, fmaf(-v_i, k_n, s_col[i])) * inv_decay;  // S_{t-1}[i, n]
      ddecay[e] = fmaf(g_col[i], s_col[i], ddecay[e]);                     // G_t[:, n] . S_{t-1}[:, n]
    }
  }
#pragma unroll
  for (int i0 = 0; i0 < N; i0 += 4) {
    const float4 dsa4 = load4(x.dsa, i0);
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int i = i0 + e;
      da[e] = fmaf(part(dsa4, e), s_col[i], da[e]);             // da_t = S_{t-1}^T dsa_t
      g_col[i] = fmaf(part(dsa4, e), a_n, g_col[i] * decay_n);  // G_t diag(decay) + dsa a^T
    }
  }
  return {sum4(dr), sum4(ddecay) * x.slope[n], sum4(dk), sum4(da), sum4(db)};
}

// Column thread n: S[:, n] after token `last` of the chunk, replayed from the state entering the chunk (N x N, rows
// value channels) with the forward's arithmetic and the stored sa, so exactly the forward's values.
__device__ __forceinline__ void replay_column(const BackwardToken (&tokens)[kChunk], int n,
                                              const float* __restrict__ chunk_start, int last, float (&s_col)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) s_col[i] = chunk_start[i * N + n];
  for (int s = 0; s <= last; ++s) {
    const BackwardToken& x = tokens[s];
    const float decay_n = x.decay[n], k_n = x.k[n], b_n = x.b[n];
#pragma unroll
    for (int i0 = 0; i0 < N; i0 += 4) {
      const float4 v4 = load4(x.v, i0), sa4 = load4(x.sa, i0);
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int i = i0 + e;
        s_col[i] = fmaf(part(v4, e), k_n, fmaf(part(sa4, e), b_n, s_col[i] * decay_n));
      }
    }
  }
}

// Block (b, h) of 2 N threads walking the chunks and their tokens backwards: column threads n (warps 0, 1) keep
// S[:, n] and G[:, n], row threads N + n (warps 2, 3) keep G[n, :]. A row thread's work on a token needs nothing
// from the column threads, so it runs one token ahead of them (one barrier per token: dsa). Each thread's `g`
// is column n of G or row n of G by its role, one array so that registers hold 2 N floats, not 3 N.
template <typename F>
__global__ void __launch_bounds__(2 * N) backward_kernel(Dims d, TypedInputs<F> in, const float* __restrict__ s0,
                                                         const float* __restrict__ sa,
                                                         const float* __restrict__ states, const F* __restrict__ dy,
                                                         const float* __restrict__ dsT, TypedGradients<F> out,
                                                         float* __restrict__ ds0) {
  __shared__ BackwardToken tokens[kChunk];
  const int64_t b = blockIdx.x / d.H, h = blockIdx.x % d.H, head = blockIdx.x;
  const bool column_thread = threadIdx.x < N;
  const int n = threadIdx.x % N;
  const int64_t chunks = chunks_of(d);

  float s_col[N];  // column threads: S[:, n]
  float g[N];      // column threads: G[:, n]; row threads: G[n, :]
  const float* dsT_head = dsT + head * N * N;
#pragma unroll
  for (int i = 0; i < N; ++i) g[i] = column_thread ? dsT_head[i * N + n] : dsT_head[n * N + i];
  for (int64_t c = chunks - 1; c >= 0; --c) {
    const int64_t t0 = c * kChunk;
    const int len = int(min(int64_t(kChunk), d.T - t0));
    const float* chunk_end = states + (head * chunks + c) * N * N;  // S after the chunk's last token
    const float* chunk_start = c > 0 ? chunk_end - N * N : s0 + head * N * N;
    __syncthreads();  // every thread is done with the later chunk's tokens
    stage_backward(tokens, in, sa, dy, d, b, h, t0, len, n, column_thread);
    if (column_thread) {
#pragma unroll
      for (int i = 0; i < N; ++i) s_col[i] = chunk_end[i * N + n];
    }
    __syncthreads();
    for (int s = len - 1; s >= 0; --s) {
      const int64_t at = token_offset(d, b, t0 + s, h) + n;
      if (!column_thread) out.v[at] = from_float<F>(row_token(tokens[s], n, g));
      if (column_thread && s < len - 1 && (s + 1) % kInverseRun == 0) {
        replay_column(tokens, n, chunk_start, s, s_col);  // the last token of an earlier run: S exact again
      }
      __syncthreads();  // dsa_t of every row is in shared memory
      if (column_thread) {
        const ColumnGradients grad = column_token(tokens[s], n, s_col, g);
        out.r[at] = from_float<F>(grad.r);
        out.w[at] = from_float<F>(grad.w);
        out.k[at] = from_float<F>(grad.k);
        out.a[at] = from_float<F>(grad.a);
        out.b[at] = from_float<F>(grad.b);
      }
    }
  }
  if (column_thread) {
    float* ds0_head = ds0 + head * N * N;
#pragma unroll
    for (int i = 0; i < N; ++i) ds0_head[i * N + n] = g[i];
  }
}

template <typename F>
cudaError_t launch_forward(Dims d, Inputs in, const float* s0, void* y, float* sT, float* sa, float* states,
                           cudaStream_t stream) {
  forward_kernel<F><<<unsigned(d.B * d.H), N, 0, stream>>>(d, TypedInputs<F>(in), s0, static_cast<F*>(y), sT, sa,
                                                            states);
  return cudaGetLastError();
}

template <typename F>
cudaError_t launch_backward(Dims d, Inputs in, const float* s0, const float* sa, const float* states, const void* dy,
                            const float* dsT, Gradients grads, float* ds0, cudaStream_t stream) {
  backward_kernel<F><<<unsigned(d.B * d.H), 2 * N, 0, stream>>>(d, TypedInputs<F>(in), s0, sa, states,
                                                             static_cast<const F*>(dy), dsT,
                                                             TypedGradients<F>(grads), ds0);
  return cudaGetLastError();
}

}  // namespace

cudaError_t forward(IoType io, Dims d, Inputs in, const float* s0, void* y, float* sT, float* sa, float* states,
                    cudaStream_t stream) {
  return io == IoType::kFloat ? launch_forward<float>(d, in, s0, y, sT, sa, states, stream)
                              : launch_forward<__nv_bfloat16>(d, in, s0, y, sT, sa, states, stream);
}

cudaError_t backward(IoType io, Dims d, Inputs in, const float* s0, const float* sa, const float* states,
                     const void* dy, const float* dsT, Gradients grads, float* ds0, cudaStream_t stream) {
  return io == IoType::kFloat ? launch_backward<float>(d, in, s0, sa, states, dy, dsT, grads, ds0, stream)
                              : launch_backward<__nv_bfloat16>(d, in, s0, sa, states, dy, dsT, grads, ds0, stream);
}

}  // namespace wkv7
