"""CUDA backend of the WKV operator: the kernels in src/models/rwkv4/cuda/, compiled on first use.

`wkv_cuda(w, u, k, v, state)` has the contract of `src.models.rwkv4.wkv` (shapes, dtypes, fp32 state and
accumulation) and is checked against its twin `wkv_torch` in tests/models/rwkv4/test_wkv_cuda.py. `op(fallback)` is
what `src.models.rwkv4.wkv` calls: it builds the extension once per process (src/cuda_extension.py) and returns
`wkv_cuda`; if the build fails it returns `fallback` after one warning naming the cause, or raises when there is no
fallback. Nothing is compiled at import.

Algorithm (src/models/rwkv4/cuda/wkv_cuda.cu has the details, tests/models/rwkv4/test_wkv_chunked.py a PyTorch
model of it): the sequence is cut into tiles of 128 tokens, each of 8 rows of 16 tokens; rows summarise their
tokens in parallel, a short scan over tiles carries the state, and every row then recomputes its outputs from the
state entering it. The backward pass does the same for the adjoint, in reverse. Any T runs in one build; nothing
is stored between forward and backward except the inputs.

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
from pathlib import Path
from typing import Callable, Optional

import torch

from src.cuda_extension import CudaExtension
from src.models.rwkv4.state import empty_state

EXTENSION = CudaExtension("wkv", "the WKV CUDA kernel", Path(__file__).resolve().parent / "cuda",
                          sources=("wkv_op.cpp", "wkv_cuda.cu"), headers=("wkv.h",))


def op(fallback: Optional[Callable] = None) -> Callable:
    """`wkv_cuda`, building the extension on first use. If the build fails: `fallback` after one warning, or
    a RuntimeError naming the cause when `fallback` is None."""
    return EXTENSION.choose(wkv_cuda, fallback, "the torch reference backend (--wkv_backend torch chooses it)")


class WKVFunction(torch.autograd.Function):
    """(w_eff, u, k, v, state) -> (y, state_out), w_eff = -exp(time_decay); all inputs contiguous, on one GPU."""

    @staticmethod
    def forward(ctx, w_eff, u, k, v, state):
        y, state_out = EXTENSION.module().forward(w_eff, u, k, v, state)
        ctx.save_for_backward(w_eff, u, k, v, state)  # y is recomputed in backward rather than kept
        return y, state_out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy, gstate):
        gw, gu, gk, gv, gstate_in = EXTENSION.module().backward(*ctx.saved_tensors, gy.contiguous(),
                                                                gstate.contiguous())
        return gw, gu, gk, gv, gstate_in


def wkv_cuda(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             state: Optional[torch.Tensor] = None) -> tuple:
    """WKV on the GPU with the contract of `src.models.rwkv4.wkv.wkv_torch` (builds the extension on first use)."""
    B, T, C = k.shape
    if state is None:
        state = empty_state(B, C, k.device)
    w_eff = -torch.exp(w.float())  # autograd applies d w_eff / d w = w_eff and casts to w's dtype
    return WKVFunction.apply(w_eff.contiguous(), u.float().contiguous(), k.contiguous(),
                             v.to(k.dtype).contiguous(), state.float().contiguous())
