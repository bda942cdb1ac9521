"""The WKV-7 CUDA kernel's own source (src/models/rwkv7/cuda/wkv7_cuda.cu) run on the CPU, against the twin.

The host C++ compiler builds the .cu with stand-ins for the little of CUDA it uses: a block is blockDim std::threads
meeting at a std::barrier for __syncthreads(), blocks run one after another (so __shared__ memory is one static copy),
threadIdx is thread-local, and each launch `kernel<F><<<grid, block, 0, stream>>>(args)` becomes a call that runs the
grid. A stand-in for the torch binding (wkv7_op.cpp) allocates the outputs as it does, filled with NaN so that an
element the kernel never writes shows up, and the real autograd Function of src/models/rwkv7/wkv_cuda.py runs on it.
This checks the kernel's indexing, chunking, barriers and arithmetic without a GPU, not its speed nor races that CPU
threads would not show: tests/models/rwkv7/test_wkv7_cuda.py checks the compiled kernel and the binding on a GPU.
Tolerances: wkv7_cases.py. Needs g++ with C++20's <barrier>; skipped without.
"""
import ctypes
import re
import shutil
import subprocess

import pytest
import torch

from src.models.rwkv7 import wkv_cuda
from wkv7_cases import FP32_TOL, INPUTS, NAMES, check_bf16, check_fp32, make_inputs, rel_rms, run

CUDA_DIR = wkv_cuda.EXTENSION.directory

CUDA_RUNTIME_STANDIN = r"""
#pragma once
#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <functional>
#include <thread>
#include <vector>
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(threads)
#define __shared__ static
typedef int cudaError_t;
constexpr cudaError_t cudaSuccess = 0;
typedef void* cudaStream_t;
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
struct ThreadIndex { unsigned x; };
inline thread_local ThreadIndex threadIdx;
inline ThreadIndex blockIdx;
inline std::barrier<>* block_barrier;
inline void __syncthreads() { block_barrier->arrive_and_wait(); }
struct float4 { float x, y, z, w; };
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
using std::min;
inline void run_grid(unsigned blocks, unsigned threads, const std::function<void()>& kernel) {
  for (unsigned b = 0; b < blocks; ++b) {
    blockIdx.x = b;
    std::barrier<> barrier(threads);
    block_barrier = &barrier;
    std::vector<std::thread> pool;
    for (unsigned t = 0; t < threads; ++t) pool.emplace_back([t, &kernel] { threadIdx.x = t; kernel(); });
    for (auto& thread : pool) thread.join();
  }
}
"""

BF16_STANDIN = r"""
#pragma once
#include <cstdint>
#include <cstring>
struct __nv_bfloat16 { uint16_t bits; };
inline float __bfloat162float(__nv_bfloat16 x) {
  const uint32_t u = uint32_t(x.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) {  // round to nearest even; NaN stays NaN
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return {uint16_t((u >> 16) | 0x40u)};
  return {uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16)};
}
"""

ENTRY_POINTS = r"""
extern "C" int host_forward(int bf16, int64_t B, int64_t T, int64_t H, const void* r, const void* w, const void* k,
                            const void* v, const void* a, const void* b, const float* s0, void* y, float* sT,
                            float* sa, float* states) {
  return wkv7::forward(bf16 ? wkv7::IoType::kBFloat16 : wkv7::IoType::kFloat, {B, T, H}, {r, w, k, v, a, b}, s0, y,
                       sT, sa, states, nullptr);
}
extern "C" int host_backward(int bf16, int64_t B, int64_t T, int64_t H, const void* r, const void* w, const void* k,
                             const void* v, const void* a, const void* b, const float* s0, const float* sa,
                             const float* states, const void* dy, const float* dsT, void* dr, void* dw, void* dk,
                             void* dv, void* da, void* db, float* ds0) {
  return wkv7::backward(bf16 ? wkv7::IoType::kBFloat16 : wkv7::IoType::kFloat, {B, T, H}, {r, w, k, v, a, b}, s0,
                        sa, states, dy, dsT, {dr, dw, dk, dv, da, db}, ds0, nullptr);
}
"""


def host_source(cuda_source: str) -> str:
    """The .cu with its two launches as run_grid calls, and C entry points for ctypes."""
    source, launches = re.subn(r"(\w+<F>)<<<(.*?), (.*?), 0, stream>>>\((.*?)\);",
                               r"run_grid(\2, \3, [&] { \1(\4); });", cuda_source, flags=re.S)
    assert launches == 2, "the kernel source's launches are not where this test expects them"
    return source + ENTRY_POINTS


def compile_cpp(compiler: str, source, output, *flags) -> subprocess.CompletedProcess:
    return subprocess.run([compiler, "-std=c++20", "-O2", "-pthread", *flags, str(source), "-o", str(output)],
                          capture_output=True, text=True)


@pytest.fixture(scope="module")
def host_build(tmp_path_factory):
    compiler = shutil.which("g++")
    if compiler is None:
        pytest.skip("no g++ to build the kernel source for the CPU")
    folder = tmp_path_factory.mktemp("wkv7_host")
    probe = folder / "probe.cpp"
    probe.write_text("#include <barrier>\nint main() { std::barrier<> b(1); b.arrive_and_wait(); }\n")
    if compile_cpp(compiler, probe, folder / "probe").returncode:
        pytest.skip("g++ has no C++20 <barrier>")
    (folder / "cuda_runtime_api.h").write_text(CUDA_RUNTIME_STANDIN)
    (folder / "cuda_bf16.h").write_text(BF16_STANDIN)
    source = folder / "wkv7_host.cpp"
    source.write_text(host_source((CUDA_DIR / "wkv7_cuda.cu").read_text()))
    library = folder / "libwkv7_host.so"
    done = compile_cpp(compiler, source, library, "-shared", "-fPIC", "-Wall", "-Wno-unknown-pragmas",
                       f"-I{folder}", f"-I{CUDA_DIR}")
    assert done.returncode == 0, done.stderr[-3000:]
    return ctypes.CDLL(str(library))


class HostBinding:
    """wkv7_op.cpp's forward and backward over the host build: the same outputs, allocated NaN-filled."""

    def __init__(self, library):
        self.library = library

    def _call(self, name, r, tensors):
        assert r.dtype in (torch.float32, torch.bfloat16) and all(t.is_contiguous() for t in tensors)
        B, T, H, _ = r.shape
        pointers = [ctypes.c_void_p(t.data_ptr()) for t in tensors]
        sizes = [ctypes.c_int64(n) for n in (B, T, H)]
        assert getattr(self.library, name)(int(r.dtype == torch.bfloat16), *sizes, *pointers) == 0

    def forward(self, r, w, k, v, a, b, s0):
        B, T, H, N = r.shape
        y, sT = torch.full_like(r, float("nan")), torch.full_like(s0, float("nan"))
        sa = torch.full(r.shape, float("nan"))
        states = torch.full((B, H, -(-T // 16), N, N), float("nan"))
        self._call("host_forward", r, (r, w, k, v, a, b, s0, y, sT, sa, states))
        return [y, sT, sa, states]

    def backward(self, r, w, k, v, a, b, s0, sa, states, dy, dsT):
        grads = [torch.full_like(r, float("nan")) for _ in INPUTS]
        ds0 = torch.full_like(dsT, float("nan"))
        self._call("host_backward", r, (r, w, k, v, a, b, s0, sa, states, dy, dsT, *grads, ds0))
        return [*grads, ds0]


@pytest.fixture
def kernel(host_build, monkeypatch):
    """wkv7_cuda running the host build of the kernel."""
    monkeypatch.setattr(wkv_cuda.EXTENSION, "_loaded", HostBinding(host_build))
    return wkv_cuda.wkv7_cuda


@pytest.mark.parametrize("T", [1, 15, 16, 17, 40])
def test_kernel_source_matches_the_twin(kernel, T):
    inp = make_inputs(2, T, 2)
    check_fp32(kernel, inp, f"T{T}")
    check_bf16(kernel, inp, f"T{T}")


def test_decays_at_the_floor(kernel):
    """Every decay near e^-0.607, where inverse steps grow rounding errors the most (wkv7_cases.py)."""
    check_fp32(kernel, make_inputs(1, 48, 1, w_shift=8.0), "decay floor")


def test_pieces_with_the_state_passed_equal_one_call(kernel):
    """The forward pass is the same arithmetic either way (y and sT equal exactly); the backward pass starts its
    inverse steps from other snapshots (gradients equal to rounding)."""
    inp = make_inputs(1, 40, 2)
    whole = run(kernel, inp, torch.float32)
    pieces = run(kernel, inp, torch.float32, split=(1, 16, 17, 33))
    assert torch.equal(pieces["y"], whole["y"]) and torch.equal(pieces["sT"], whole["sT"])
    for name in NAMES:
        assert rel_rms(pieces[name], whole[name]) <= FP32_TOL, name


def test_fp16_inputs_run_as_fp32(kernel):
    inp = make_inputs(1, 17, 1)
    half = run(kernel, inp, torch.float16)
    single = run(kernel, {n: t.half().float() if t.shape == inp["r"].shape else t for n, t in inp.items()},
                 torch.float32)
    assert all(half[n].dtype == torch.float16 for n in ("y", *INPUTS))
    for name in NAMES:
        assert rel_rms(half[name], single[name]) <= 1e-3, name  # fp16 rounding of y and the gradients


def test_recomputed_under_non_reentrant_checkpointing(kernel):
    """--grad_cp 1 recomputes each block under torch.utils.checkpoint (use_reentrant=False), whose saved tensors unpack
    once: the backward must read ctx.saved_tensors once (a second read raised CheckpointError under ZeRO-2 on the
    GPU). Gradients equal those of the plain call."""
    inp = make_inputs(1, 17, 1)
    plain = run(kernel, inp, torch.float32)

    def checkpointed(*args):
        return torch.utils.checkpoint.checkpoint(kernel, *args, use_reentrant=False)

    recomputed = run(checkpointed, inp, torch.float32)
    for name in NAMES:
        assert torch.equal(recomputed[name], plain[name]), name
