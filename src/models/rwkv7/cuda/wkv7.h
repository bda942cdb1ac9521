// Interface between the torch binding (wkv7_op.cpp) and the WKV-7 kernels (wkv7_cuda.cu).
// No torch types here, so the kernels compile and can be checked without torch headers.
#pragma once

#include <cstdint>
#include <cuda_runtime_api.h>

namespace wkv7 {

constexpr int kHeadSize = 64;  // N: channels per head, one thread per channel (the one size built)
constexpr int kChunk = 16;     // tokens between two state snapshots of the forward pass

enum class IoType { kFloat, kBFloat16 };  // dtype of r, w, k, v, a, b, y, dy and the input gradients

struct Dims {
  int64_t B, T, H;  // r, w, k, v, a, b: (B, T, H, kHeadSize), contiguous; B, T, H >= 1
};

inline int64_t chunk_count(int64_t T) { return (T + kChunk - 1) / kChunk; }

// The six per-token inputs, each (B, T, H, N) of the I/O type; w is raw (before the soft clamp of the decay).
struct Inputs {
  const void *r, *w, *k, *v, *a, *b;
};

// Their gradients, same shapes and type.
struct Gradients {
  void *r, *w, *k, *v, *a, *b;
};

// s0: (B, H, N, N) fp32, rows = value channels, columns = key channels.
// Writes y (B, T, H, N) io, sT (B, H, N, N) fp32, and what the backward pass needs:
//   sa     (B, T, H, N) fp32: S_{t-1} a_t of every token;
//   states (B, H, chunk_count(T), N, N) fp32: the state after the last token of every chunk of kChunk tokens.
cudaError_t forward(IoType io, Dims d, Inputs in, const float* s0, void* y, float* sT, float* sa, float* states,
                    cudaStream_t stream);

// s0, sa, states: as given to and written by `forward`; dy: (B, T, H, N) io; dsT: (B, H, N, N) fp32, the gradient
// reaching the final state. Writes the six input gradients (io) and ds0 (B, H, N, N) fp32, the initial state's.
cudaError_t backward(IoType io, Dims d, Inputs in, const float* s0, const float* sa, const float* states,
                     const void* dy, const float* dsT, Gradients grads, float* ds0, cudaStream_t stream);

}  // namespace wkv7
