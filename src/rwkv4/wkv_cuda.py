"""CUDA backend of the WKV operator: the kernels in src/rwkv4/cuda/, compiled on first use.

`wkv_cuda(w, u, k, v, state)` has the contract of `src.wkv` (shapes, dtypes, fp32 state and
accumulation) and is checked against its twin `wkv_torch` in tests/test_wkv_cuda.py. `op(fallback)`
is what `src.wkv` calls: it builds the extension once per process (cached on disk by torch under a
name that hashes the sources and flags, so an edit rebuilds) and returns `wkv_cuda`; if the build
fails it returns `fallback` after one warning naming the cause, or raises when there is no fallback.
Nothing is compiled at import.

Algorithm (src/rwkv4/cuda/wkv_cuda.cu has the details and tests/test_wkv_chunked.py a PyTorch model of it):
the sequence is cut into chunks of 16 tokens and tiles of 8 chunks; chunks summarise their tokens
in parallel, a short scan over tiles carries the state, and every chunk then recomputes its outputs
from the state entering it. The backward pass does the same for the adjoint, in reverse. Any T runs
in one build; nothing is stored between forward and backward except the inputs.

State gradient. The state is (aa, bb, pp) with a = aa e^pp, b = bb e^pp. The input state's gradient
is the true one, what autograd through `wkv_torch` gives:
    g_aa_in = dL/da_in e^{pp_in},  g_bb_in = dL/db_in e^{pp_in},  g_pp_in = g_aa_in aa_in + g_bb_in bb_in
(all 0 for the empty state, pp = -1e38). The incoming gradient of the output state (gA, gB, gP) is
read as dL/da_out = gA e^{-pp_out}, dL/db_out = gB e^{-pp_out}, and gP is ignored. This is exact
whenever whatever consumes the output state depends on it only through (a, b) - the next wkv call,
or any function of a and b - because then gP = gA aa + gB bb carries no extra information. A loss on
pp alone, or on aa without pp, is not such a function and would get a wrong state gradient.

Gradients come back in the inputs' dtypes: gk, gv like k; w's and u's gradients are reduced over the
batch and the sequence in fp32 in a fixed order (deterministic, no atomics) and cast by autograd.
"""
import functools
import hashlib
import warnings
from pathlib import Path
from typing import Callable, Optional

import torch

from src.rwkv4.state import empty_state

_CUDA_DIR = Path(__file__).resolve().parent / "cuda"
_SOURCES = ("wkv_op.cpp", "wkv_cuda.cu")
_HEADERS = ("wkv.h",)
_CFLAGS = ["-O3"]
_CUDA_CFLAGS = ["-O3"]  # accurate expf and division: the kernel is bound by memory, not arithmetic


def _build():
    """Compile (or load from torch's extension cache) the module for the current device's architecture."""
    from torch.utils.cpp_extension import load

    major, minor = torch.cuda.get_device_capability()
    arch = f"{major}{minor}"
    cuda_cflags = _CUDA_CFLAGS + [f"-gencode=arch=compute_{arch},code=sm_{arch}"]
    digest = hashlib.sha256()
    for name in _SOURCES + _HEADERS:
        digest.update((_CUDA_DIR / name).read_bytes())
    digest.update(" ".join(_CFLAGS + cuda_cflags).encode())
    return load(name=f"wkv_{digest.hexdigest()[:16]}_sm{arch}", sources=[str(_CUDA_DIR / s) for s in _SOURCES],
                extra_cflags=_CFLAGS, extra_cuda_cflags=cuda_cflags, verbose=False)


@functools.cache
def _extension():
    """The compiled module, or the exception that stopped its build (so a failure is tried and reported once)."""
    try:
        return _build()
    except Exception as exc:  # a failed build must not stop training when a fallback exists
        return exc


def _failure_summary(exc: Exception, lines: int = 6) -> str:
    """The informative end of a build error: its compiler error lines if any, else its last lines."""
    text = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
    errors = [line for line in text if "error" in line.lower()]
    return " | ".join((errors or text)[-lines:])


@functools.cache
def _warn_fallback(cause: str) -> None:
    warnings.warn(f"WKV CUDA kernel unavailable ({cause}); using the torch reference backend instead, which is "
                  f"much slower. Use --wkv_backend torch to choose it explicitly.", RuntimeWarning, stacklevel=3)


def _module():
    """The compiled module; a RuntimeError naming the cause if it could not be built."""
    ext = _extension()
    if isinstance(ext, Exception):
        raise RuntimeError(f"the WKV CUDA kernel could not be built: {_failure_summary(ext)}") from ext
    return ext


def op(fallback: Optional[Callable] = None) -> Callable:
    """`wkv_cuda`, building the extension on first use. If the build fails: `fallback` after one warning, or
    a RuntimeError naming the cause when `fallback` is None."""
    ext = _extension()
    if isinstance(ext, Exception) and fallback is not None:
        _warn_fallback(_failure_summary(ext))
        return fallback
    _module()
    return wkv_cuda


class WKVFunction(torch.autograd.Function):
    """(w_eff, u, k, v, state) -> (y, state_out), w_eff = -exp(time_decay); all inputs contiguous, on one GPU."""

    @staticmethod
    def forward(ctx, w_eff, u, k, v, state):
        y, state_out = _module().forward(w_eff, u, k, v, state)
        ctx.save_for_backward(w_eff, u, k, v, state)  # y is recomputed in backward rather than kept
        return y, state_out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy, gstate):
        gw, gu, gk, gv, gstate_in = _module().backward(*ctx.saved_tensors, gy.contiguous(), gstate.contiguous())
        return gw, gu, gk, gv, gstate_in


def wkv_cuda(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             state: Optional[torch.Tensor] = None) -> tuple:
    """WKV on the GPU with the contract of `src.wkv.wkv_torch` (builds the extension on first use)."""
    B, T, C = k.shape
    if state is None:
        state = empty_state(B, C, k.device)
    w_eff = -torch.exp(w.float())  # autograd applies d w_eff / d w = w_eff and casts to w's dtype
    return WKVFunction.apply(w_eff.contiguous(), u.float().contiguous(), k.contiguous(),
                             v.to(k.dtype).contiguous(), state.float().contiguous())
