"""The WKV state's representation, shared by both backends of the operator (src/wkv.py, src/wkv_cuda.py).

A state (B, C, 3) fp32 holds (aa, bb, pp) per batch and channel: the running sums of src/wkv.py are
a = aa * e^pp and b = bb * e^pp, stored scaled by their largest exponent so nothing overflows.
"""
import torch

EMPTY_PP = -1e38  # exponent of the empty state: e^-1e38 == 0 in fp32 and fp64


def empty_state(batch: int, channels: int, device=None) -> torch.Tensor:
    """The state before the first token: aa = bb = 0, pp = -1e38. Shape (B, C, 3), fp32."""
    state = torch.zeros(batch, channels, 3, dtype=torch.float32, device=device)
    state[..., 2] = EMPTY_PP
    return state
