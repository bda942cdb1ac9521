"""The WKV-7 operator with state in and out: a plain-torch twin of the recurrence (the CPU path and the reference of
every test) and the dispatch to the CUDA kernel (src/models/rwkv7/wkv_cuda.py), which keeps the same contract.

Per batch b and head h, the state S is an N x N matrix (rows: value channels i, columns: key channels j), and each
token t does, as the `rwkv` package's RWKV_x070 (RWKV_x070_TMix_seq, its CPU loop) and BlinkDL's state-passing
reference (BlinkDL/RWKV-CUDA rwkv7_fast_fused/rwkv7_cuda_benchmark_state_passing.py) define it:

    S_t = S_{t-1} diag(decay_t) + (S_{t-1} a_t) b_t^T + v_t k_t^T          y_t = S_t r_t
    decay_t = exp(-exp(-softplus(-w_t) - 0.5)) = exp(-e^-0.5 * sigmoid(w_t))   (in (e^-0.607, 1): soft-clamped)

The model passes a = -kk and b = kk * a_rate (kk the normalised key, a_rate the in-context learning rate).

Shapes and dtypes (the contract every backend keeps):
    r, w, k, v, a, b   (B, T, H, N)   fp32 or bf16 (fp64 for gradient checks); w is the raw decay w0 + tanh(xw w1) w2
                                      before the soft clamp, as BlinkDL's clampw kernels take it
    s0                 (B, H, N, N)   fp32 (fp64 with fp64 inputs), or None for zeros
    returns y (B, T, H, N) in r's dtype and the final state sT (B, H, N, N) fp32 (fp64 for fp64 inputs).
Accumulation is fp32 for every input dtype. Gradients reach r, w, k, v, a, b and s0. Running a sequence in one call or
in pieces with the state passed on gives the same y, state and gradients, which --ctx_parts and --state_cp rely on.
"""
from typing import Optional

import torch
import torch.nn.functional as F


def decay_of(w: torch.Tensor) -> torch.Tensor:
    """The per-channel decay factor of the raw w, exp(-exp(-softplus(-w) - 0.5)), in w's dtype."""
    return torch.exp(-torch.exp(-F.softplus(-w) - 0.5))


def wkv7_torch(r: torch.Tensor, w: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
               s0: Optional[torch.Tensor] = None) -> tuple:
    """Reference backend: an explicit loop over time, differentiable by autograd. Computes in fp32, or in fp64 when
    r is fp64."""
    B, T, H, N = r.shape
    acc = torch.float64 if r.dtype == torch.float64 else torch.float32
    io_dtype = r.dtype
    decay = decay_of(w.to(acc))
    r, k, v, a, b = (t.to(acc) for t in (r, k, v, a, b))
    state = torch.zeros(B, H, N, N, dtype=acc, device=r.device) if s0 is None else s0.to(acc)
    ys = []
    for t in range(T):
        sa = state @ a[:, t, :, :, None]  # (B, H, N, 1): S_{t-1} a_t
        state = (state * decay[:, t, :, None, :] + sa * b[:, t, :, None, :]
                 + v[:, t, :, :, None] * k[:, t, :, None, :])
        ys.append((state @ r[:, t, :, :, None]).squeeze(-1))
    y = torch.stack(ys, dim=1) if ys else r.new_zeros(B, 0, H, N)
    return y.to(io_dtype), state


def _check_inputs(r, w, k, v, a, b, s0) -> None:
    if r.dim() != 4 or any(t.shape != r.shape for t in (w, k, v, a, b)):
        raise ValueError(f"wkv7: r, w, k, v, a, b must all be (B, T, H, N); got "
                         f"{[tuple(t.shape) for t in (r, w, k, v, a, b)]}")
    B, _, H, N = r.shape
    if s0 is not None and (s0.shape != (B, H, N, N) or s0.dtype not in (torch.float32, torch.float64)):
        raise ValueError(f"wkv7: the state must be ({B}, {H}, {N}, {N}) fp32; got {tuple(s0.shape)} {s0.dtype}")


def wkv7(r: torch.Tensor, w: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
         s0: Optional[torch.Tensor] = None, backend: str = "auto", part_len: Optional[int] = None) -> tuple:
    """WKV-7 with state: returns (y, sT). See the module docstring for shapes.

    backend: "torch" (the twin), "cuda" (the kernel: CUDA tensors, head size 64, fp32, bf16 or fp16; anything else
        is refused), "auto" (the kernel where it can run, the twin elsewhere: CPU tensors, other head sizes, fp64).
    part_len: run the operator in consecutive parts of at most this many tokens, passing the state between them
        (--ctx_parts); results are the same.
    """
    _check_inputs(r, w, k, v, a, b, s0)
    op = _resolve_backend(backend, r)
    T = r.shape[1]
    if not part_len or part_len >= T:
        return op(r, w, k, v, a, b, s0)
    ys, state = [], s0
    for start in range(0, T, part_len):
        part = slice(start, min(start + part_len, T))
        y, state = op(*(t[:, part] for t in (r, w, k, v, a, b)), state)
        ys.append(y)
    return torch.cat(ys, dim=1), state


def _resolve_backend(backend: str, r: torch.Tensor):
    """The function that runs `backend` on inputs like r, or a ValueError saying why it cannot."""
    if backend == "torch":
        return wkv7_torch
    if backend not in ("cuda", "auto"):
        raise ValueError(f"unknown wkv7 backend {backend!r}; choose auto, cuda or torch")
    from src.models.rwkv7 import wkv_cuda  # compiled on first use, not at import

    reason = wkv_cuda.unsupported(r)
    if backend == "auto":
        return wkv_cuda.op(fallback=wkv7_torch) if r.is_cuda and reason is None else wkv7_torch
    if reason:
        raise ValueError(f"wkv7 backend 'cuda': {reason}; backend 'auto' runs the torch twin for such inputs")
    if not r.is_cuda:
        raise ValueError("wkv7 backend 'cuda' needs CUDA tensors; use backend 'torch' (or 'auto') on CPU")
    return wkv_cuda.op()
