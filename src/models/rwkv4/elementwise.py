"""The elementwise work between a block's matrix products, and its fused twin.

Between the projections of an RWKV-4 block sit only elementwise operations: the token shift and the mixing of
each projection's input, the sigmoid gates, the squared ReLU, and a residual add. Run one PyTorch kernel per
operation, each reads and writes whole (B, T, C) or (B, T, F) tensors, and the backward pass does so again for
each of them (at L24 D1024 B4 T4096 in bf16: about 25 such passes per block in the forward, one of 32 MiB each,
128 MiB for the squared ReLU's (B, T, F)).

The functions below are the reference: plain PyTorch, the numerics the model has always had. `ops(fused, x)`
gives either them or the same functions compiled by torch.compile, whose Inductor backend writes each one's
forward and its backward as one fused kernel (shift and all mixes from one read of x; gate and residual in one
pass). The fused twin runs only on CUDA tensors, where it pays; tests/models/rwkv4/test_elementwise.py holds the two
together (outputs and every gradient, fp32 and bf16, odd shapes).
"""
import functools
from types import SimpleNamespace
from typing import Optional

import torch


def token_shift(x: torch.Tensor, last: Optional[torch.Tensor]) -> torch.Tensor:
    """x delayed by one step: (B, T, C) -> (B, T, C), with `last` (B, C) (or zeros) at t = 0."""
    first = torch.zeros_like(x[:, :1]) if last is None else last.unsqueeze(1).to(x.dtype)
    return torch.cat([first, x[:, :-1]], dim=1)


def shifted_mixes(x: torch.Tensor, last: Optional[torch.Tensor], mixes: tuple) -> tuple:
    """The inputs of a block's projections: for each mix m (1, 1, C), x * m + shift(x) * (1 - m), as one lerp.
    x (B, T, C), last (B, C) or None (the start) -> one (B, T, C) per mix."""
    xx = token_shift(x, last)
    return tuple(torch.lerp(xx, x, mix.to(x.dtype)) for mix in mixes)


def gate(r: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """sigmoid(r) * y, (B, T, C) each: the receptance gate of time-mix."""
    return torch.sigmoid(r) * y


def squared_relu(k: torch.Tensor) -> torch.Tensor:
    """relu(k)^2, (B, T, F): channel-mix's activation."""
    return torch.square(torch.relu(k))


def gated_residual(x: torch.Tensor, r: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """x + sigmoid(r) * v, (B, T, C) each: channel-mix's gate and the block's residual add."""
    return x + torch.sigmoid(r) * v


REFERENCE = SimpleNamespace(shifted_mixes=shifted_mixes, gate=gate, squared_relu=squared_relu,
                            gated_residual=gated_residual)


# The compiled functions take each mix as an argument of its own, and a separate function per number of mixes
# (time-mix three, channel-mix two): torch.compile keeps its compiled variants per function (one per grad mode,
# and per inputs that do or do not require gradients), up to a limit of 8 per function.
def _three_mixes(x, last, mix_1, mix_2, mix_3):
    return shifted_mixes(x, last, (mix_1, mix_2, mix_3))


def _two_mixes(x, last, mix_1, mix_2):
    return shifted_mixes(x, last, (mix_1, mix_2))


@functools.cache
def _fused() -> SimpleNamespace:
    """REFERENCE's functions compiled, once per process. dynamic=True: one compiled kernel serves every batch size
    and length (the last segment of --state_cp is shorter, held-out evaluation windows differ), instead of a compilation
    per shape. Without fullgraph, a function past torch.compile's limit of variants runs uncompiled (the same
    results, slower) instead of stopping the run."""
    three_mixes, two_mixes, fused_gate, fused_squared_relu, fused_gated_residual = (
        torch.compile(function, dynamic=True)
        for function in (_three_mixes, _two_mixes, gate, squared_relu, gated_residual))

    def fused_shifted_mixes(x: torch.Tensor, last: Optional[torch.Tensor], mixes: tuple) -> tuple:
        # `last` always a contiguous tensor in x's dtype (zeros at the start), so that the start, a state carried
        # on the GPU and one brought back from the host share one compiled variant
        last = x.new_zeros(x.shape[0], x.shape[2]) if last is None else last.to(x.dtype).contiguous()
        return (three_mixes if len(mixes) == 3 else two_mixes)(x, last, *mixes)

    return SimpleNamespace(shifted_mixes=fused_shifted_mixes, gate=fused_gate, squared_relu=fused_squared_relu,
                           gated_residual=fused_gated_residual)


def ops(fused: bool, x: torch.Tensor) -> SimpleNamespace:
    """The elementwise functions to run on x: the fused ones for CUDA tensors when `fused`, else the reference."""
    return _fused() if fused and x.is_cuda else REFERENCE
