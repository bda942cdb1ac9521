"""The recurrent state of an RWKV-4 model, and the WKV state inside it.

The WKV operator's state (B, C, 3) fp32 holds (aa, bb, pp) per batch and channel: the running sums of
src/models/rwkv4/wkv.py are a = aa * e^pp and b = bb * e^pp, stored scaled by their largest exponent so nothing
overflows. Both backends of the operator start from `empty_state`.

The state of a whole model (RWKVState) is two tensors, so it can be detached, stored or passed through
checkpointing as a unit:
    shift (n_layer, 2, B, C)  last input of each layer's time-mix [.., 0] and channel-mix [.., 1]
    wkv   (n_layer, B, A, 3)  fp32 WKV state of each layer's time-mix
A block takes and returns its layer's part as a 3-tuple (att shift (B, C), wkv (B, A, 3), ffn shift (B, C)).
"""
from typing import NamedTuple

import torch

from src.models.rwkv4.config import RWKVConfig

EMPTY_PP = -1e38  # exponent of the empty state: e^-1e38 == 0 in fp32 and fp64


def empty_state(batch: int, channels: int, device=None) -> torch.Tensor:
    """The WKV state before the first token: aa = bb = 0, pp = -1e38. Shape (B, C, 3), fp32."""
    state = torch.zeros(batch, channels, 3, dtype=torch.float32, device=device)
    state[..., 2] = EMPTY_PP
    return state


class RWKVState(NamedTuple):
    shift: torch.Tensor  # (n_layer, 2, B, C)
    wkv: torch.Tensor  # (n_layer, B, A, 3) fp32

    def detach(self) -> "RWKVState":
        return RWKVState(self.shift.detach(), self.wkv.detach())

    def layer(self, i: int) -> tuple:
        """Layer i's state as a block takes it: (att shift (B, C), wkv (B, A, 3), ffn shift (B, C))."""
        return self.shift[i, 0], self.wkv[i], self.shift[i, 1]

    @staticmethod
    def from_layers(layers) -> "RWKVState":
        """The inverse of `layer`: [(att shift, wkv, ffn shift) for each layer] -> RWKVState."""
        shifts = [torch.stack([att_shift, ffn_shift.to(att_shift.dtype)]) for att_shift, _, ffn_shift in layers]
        return RWKVState(torch.stack(shifts), torch.stack([wkv_state for _, wkv_state, _ in layers]))


def initial_state(cfg: RWKVConfig, batch: int, device=None, dtype=torch.float32) -> RWKVState:
    """The state before the first token: zero shifts, empty WKV sums."""
    shift = torch.zeros(cfg.n_layer, 2, batch, cfg.n_embd, dtype=dtype, device=device)
    wkv_state = empty_state(batch, cfg.dim_att, device).unsqueeze(0).repeat(cfg.n_layer, 1, 1, 1)
    return RWKVState(shift, wkv_state)
