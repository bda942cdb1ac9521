"""CUDA backend of the WKV-7 operator: the kernels in src/models/rwkv7/cuda/, compiled on first use.

`wkv7_cuda(r, w, k, v, a, b, s0)` has the contract of `src.models.rwkv7.wkv` (shapes, dtypes, fp32 state and
accumulation, gradients to every input and to s0) and is checked against its twin `wkv7_torch` in
tests/models/rwkv7/test_wkv7_cuda.py. `op(fallback)` is what `src.models.rwkv7.wkv` calls: it builds the extension
once per process (src/cuda_extension.py) and returns `wkv7_cuda`; if the build fails it returns `fallback` after one
warning naming the cause, or raises when there is no fallback. Nothing is compiled at import.

Algorithm (src/models/rwkv7/cuda/wkv7_cuda.cu has the details, tests/models/rwkv7/test_wkv7_backward_model.py a
PyTorch model of it): one block per (batch, head) walks the tokens in order with the N x N state in registers. The
forward pass keeps, for the backward, S_{t-1} a_t of every token (B, T, H, N fp32) and the state after every 16th
token (B, H, ceil(T / 16), N, N fp32: N^2 / 4 bytes per token and head, 1 KiB at N = 64); the backward pass walks
the tokens in reverse, recovering each earlier state by inverting one step, at most 8 in a row from an exact state
(a snapshot, or one replayed forward from the previous snapshot).

Head size 64 only (config.KERNEL_HEAD_SIZE). The kernel runs fp32 or bf16 inputs, all six in r's dtype (cast if they
differ); fp16 inputs run as fp32 (there is no fp16 build). y and the gradients come back in the inputs' own dtypes.
"""
from pathlib import Path
from typing import Callable, Optional

import torch

from src.cuda_extension import CudaExtension
from src.models.rwkv7.config import KERNEL_HEAD_SIZE

EXTENSION = CudaExtension("wkv7", "the WKV-7 CUDA kernel", Path(__file__).resolve().parent / "cuda",
                          sources=("wkv7_op.cpp", "wkv7_cuda.cu"), headers=("wkv7.h",))
# dtype of the inputs -> the dtype the kernel runs them in
KERNEL_DTYPE = {torch.float32: torch.float32, torch.bfloat16: torch.bfloat16, torch.float16: torch.float32}


def unsupported(r: torch.Tensor) -> Optional[str]:
    """Why the kernel cannot take inputs shaped and typed like r (B, T, H, N), or None if it can."""
    if r.shape[-1] != KERNEL_HEAD_SIZE:
        return (f"the WKV-7 kernel is built for head size {KERNEL_HEAD_SIZE}, and these heads have {r.shape[-1]} "
                f"channels")
    if r.dtype not in KERNEL_DTYPE:
        return f"the WKV-7 kernel takes fp32, bf16 or fp16 inputs, not {r.dtype}"
    return None


def op(fallback: Optional[Callable] = None) -> Callable:
    """`wkv7_cuda`, building the extension on first use. If the build fails: `fallback` after one warning, or a
    RuntimeError naming the cause when `fallback` is None."""
    return EXTENSION.choose(wkv7_cuda, fallback, "the plain-torch twin (--wkv_backend torch chooses it)")


class WKV7Function(torch.autograd.Function):
    """(r, w, k, v, a, b, s0) -> (y, sT): r..b (B, T, H, 64) contiguous, one dtype (fp32 or bf16), T >= 1;
    s0 (B, H, 64, 64) fp32 contiguous; all on one GPU."""

    @staticmethod
    def forward(ctx, r, w, k, v, a, b, s0):
        y, sT, sa, states = EXTENSION.module().forward(r, w, k, v, a, b, s0)
        ctx.save_for_backward(r, w, k, v, a, b, s0, sa, states)
        return y, sT

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy, dsT):
        saved = ctx.saved_tensors  # read once: under non-reentrant checkpointing (--grad_cp 1) each read unpacks
        return tuple(EXTENSION.module().backward(*saved, dy.to(saved[0].dtype).contiguous(),
                                                 dsT.float().contiguous()))


def wkv7_cuda(r: torch.Tensor, w: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
              s0: Optional[torch.Tensor] = None) -> tuple:
    """WKV-7 on the GPU with the contract of `src.models.rwkv7.wkv.wkv7_torch` (builds the extension on first use).
    Raises ValueError for inputs the kernel does not take (see `unsupported`)."""
    reason = unsupported(r)
    if reason:
        raise ValueError(f"wkv7_cuda: {reason}")
    B, T, H, N = r.shape
    if s0 is None:
        s0 = torch.zeros(B, H, N, N, dtype=torch.float32, device=r.device)
    if r.numel() == 0:  # no token (or no head): y is empty and the state passes through, as in the twin
        return r.new_zeros(r.shape), s0.float()
    dtype = KERNEL_DTYPE[r.dtype]
    inputs = (t.to(dtype).contiguous() for t in (r, w, k, v, a, b))  # autograd casts the gradients back
    y, sT = WKV7Function.apply(*inputs, s0.float().contiguous())
    return y.to(r.dtype), sT
