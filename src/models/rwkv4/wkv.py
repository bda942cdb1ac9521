"""The RWKV-4 WKV operator with state in and out.

For each batch b and channel c, with w = -exp(time_decay) < 0 and u = time_first:

    y_t = (a_{t-1} + e^{u+k_t} v_t) / (b_{t-1} + e^{u+k_t})
    a_t = e^w a_{t-1} + e^{k_t} v_t          b_t = e^w b_{t-1} + e^{k_t}

i.e. y_t = (sum_{i<t} e^{(t-1-i)w + k_i} v_i + e^{u+k_t} v_t) / (sum_{i<t} e^{(t-1-i)w + k_i} + e^{u+k_t})
when the sums start empty. The running sums are stored scaled by their largest exponent so nothing
overflows: state (aa, bb, pp) means a = aa * e^pp, b = bb * e^pp. The empty state is (0, 0, -1e38)
(src/models/rwkv4/state.py).

Shapes and dtypes (the contract of every backend):
    w, u:   (C,)        raw time_decay and time_first, any float dtype (used in fp32)
    k, v:   (B, T, C)   fp32, fp16 or bf16
    state:  (B, C, 3)   fp32 (aa, bb, pp), or None for the empty state
    returns y (B, T, C) in k's dtype and the final state (B, C, 3) fp32.
Accumulation is fp32 for every input dtype. Gradients reach w, u, k, v and the input state; the
state gradient is the true gradient (what autograd through `wkv_torch` gives).
"""
from typing import Optional

import torch

from src.models.rwkv4.state import empty_state


def wkv_torch(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              state: Optional[torch.Tensor] = None) -> tuple:
    """Reference backend: one time step at a time, the same max-exponent numerics as the kernel.

    Differentiable by autograd; used on CPU and as the oracle of the CUDA kernel's tests.
    Computes in fp32, or in fp64 when k is fp64 (for gradcheck).
    """
    B, T, C = k.shape
    acc = torch.float64 if k.dtype == torch.float64 else torch.float32
    w = -torch.exp(w.to(acc))  # (C,)
    u = u.to(acc)
    io_dtype = k.dtype
    k, v = k.to(acc), v.to(acc)
    if state is None:
        state = empty_state(B, C, k.device)
    aa, bb, pp = state.to(acc).unbind(-1)  # each (B, C)
    ys = []
    for t in range(T):
        kt, vt = k[:, t], v[:, t]
        # output: mix the running sums with the current token, boosted by u
        uk = u + kt
        p = torch.maximum(pp, uk)
        e1, e2 = torch.exp(pp - p), torch.exp(uk - p)
        ys.append((e1 * aa + e2 * vt) / (e1 * bb + e2))
        # state update: decay the sums by e^w and add the current token
        decayed = pp + w
        p = torch.maximum(decayed, kt)
        e1, e2 = torch.exp(decayed - p), torch.exp(kt - p)
        aa, bb, pp = e1 * aa + e2 * vt, e1 * bb + e2, p
    y = torch.stack(ys, dim=1) if ys else k.new_zeros(B, 0, C)
    return y.to(io_dtype), torch.stack([aa, bb, pp], dim=-1)  # state in fp32 (fp64 for fp64 inputs)


def _check_inputs(w, u, k, v, state) -> None:
    if k.dim() != 3 or v.shape != k.shape:
        raise ValueError(f"wkv: k and v must both be (B, T, C); got {tuple(k.shape)} and {tuple(v.shape)}")
    B, T, C = k.shape
    if w.shape != (C,) or u.shape != (C,):
        raise ValueError(f"wkv: w and u must be ({C},); got {tuple(w.shape)} and {tuple(u.shape)}")
    if state is not None and (state.shape != (B, C, 3) or state.dtype not in (torch.float32, torch.float64)):
        raise ValueError(f"wkv: state must be ({B}, {C}, 3) fp32; got {tuple(state.shape)} {state.dtype}")


def wkv(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: Optional[torch.Tensor] = None,
        backend: str = "auto", part_len: Optional[int] = None) -> tuple:
    """WKV with state: returns (y, state_out). See the module docstring for shapes.

    backend: "torch" (reference), "cuda" (the kernel), "auto" (the kernel for CUDA tensors).
    part_len: run the operator in consecutive parts of at most this many tokens, passing the state
        between them (`--ctx_parts`); results are the same, peak memory of one call is smaller.
    """
    _check_inputs(w, u, k, v, state)
    op = _resolve_backend(backend, k)
    T = k.shape[1]
    if not part_len or part_len >= T:
        return op(w, u, k, v, state)
    ys = []
    for start in range(0, T, part_len):
        y, state = op(w, u, k[:, start:start + part_len], v[:, start:start + part_len], state)
        ys.append(y)
    return torch.cat(ys, dim=1), state


def _resolve_backend(backend: str, k: torch.Tensor):
    if backend == "torch":
        return wkv_torch
    if backend in ("cuda", "auto"):
        if k.is_cuda:
            from src.models.rwkv4 import wkv_cuda  # built lazily on first use
            return wkv_cuda.op(fallback=wkv_torch if backend == "auto" else None)
        if backend == "cuda":
            raise ValueError("wkv backend 'cuda' needs CUDA tensors; use backend 'torch' (or 'auto') on CPU")
        return wkv_torch
    raise ValueError(f"unknown wkv backend {backend!r}; choose auto, cuda or torch")


def wkv_formula(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                state: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The literal O(T^2) sum of the module docstring, without any rescaling (tests only, small values)."""
    B, T, C = k.shape
    w = -torch.exp(w.double())
    u, k, v = u.double(), k.double(), v.double()
    if state is None:
        a0 = b0 = torch.zeros(B, C, dtype=torch.float64, device=k.device)
    else:
        scale = torch.exp(state[..., 2].double())
        a0, b0 = state[..., 0].double() * scale, state[..., 1].double() * scale
    y = torch.empty(B, T, C, dtype=torch.float64, device=k.device)
    for t in range(T):
        num = torch.exp(t * w) * a0 + torch.exp(u + k[:, t]) * v[:, t]
        den = torch.exp(t * w) * b0 + torch.exp(u + k[:, t])
        for i in range(t):
            weight = torch.exp((t - 1 - i) * w + k[:, i])
            num = num + weight * v[:, i]
            den = den + weight
        y[:, t] = num / den
    return y


