// Interface between the torch binding (wkv_op.cpp) and the kernels (wkv_cuda.cu).
// No torch types here, so the kernels compile and can be checked without torch headers.
#pragma once

#include <cstdint>
#include <cuda_runtime_api.h>

namespace wkv {

enum class IoType { kFloat, kHalf, kBFloat16 };  // dtype of k, v, y, gy, gk, gv

struct Dims {
  int64_t B, T, C;  // k, v: (B, T, C), C contiguous; T >= 1
};

// fp32 scratch the launchers need, in floats (allocated by the caller, contents ignored).
int64_t forward_scratch_floats(Dims d);
int64_t backward_scratch_floats(Dims d);

// w: (C,) fp32, already -exp(time_decay); u: (C,) fp32; state_in, state_out: (B, C, 3) fp32 (aa, bb, pp).
cudaError_t forward(IoType io, Dims d, const float* w, const float* u, const void* k, const void* v,
                    const float* state_in, void* y, float* state_out, float* scratch, cudaStream_t stream);

// gy: (B, T, C) io; gstate_out: (B, C, 3) fp32, entry 2 ignored (see src/models/rwkv4/wkv_cuda.py).
// Writes gw, gu (C,) fp32 (gw with respect to w = -exp(time_decay)), gk, gv (B, T, C) io, gstate_in (B, C, 3).
cudaError_t backward(IoType io, Dims d, const float* w, const float* u, const void* k, const void* v,
                     const float* state_in, const void* gy, const float* gstate_out, float* gw, float* gu,
                     void* gk, void* gv, float* gstate_in, float* scratch, cudaStream_t stream);

}  // namespace wkv
