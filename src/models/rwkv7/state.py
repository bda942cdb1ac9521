"""The recurrent state of an RWKV-7 model.

Two tensors, so it can be detached, stored or passed through checkpointing as a unit:
    shift (n_layer, 2, B, C)        last (normalised) input of each layer's time-mix [.., 0] and channel-mix [.., 1]
    wkv   (n_layer, B, H, N, N)     fp32 WKV-7 state of each layer's time-mix (src/models/rwkv7/wkv.py: rows are value
                                    channels, columns key channels, as the `rwkv` package's att_kv state)
A block takes and returns its layer's part as a 3-tuple (att shift (B, C), wkv (B, H, N, N), ffn shift (B, C)).
v_first, which block 0 passes to the later blocks, is per token and not part of the state.
"""
from typing import NamedTuple

import torch

from src.models.rwkv7.config import RWKV7Config


class RWKV7State(NamedTuple):
    shift: torch.Tensor  # (n_layer, 2, B, C)
    wkv: torch.Tensor  # (n_layer, B, H, N, N) fp32

    def detach(self) -> "RWKV7State":
        return RWKV7State(self.shift.detach(), self.wkv.detach())

    def layer(self, i: int) -> tuple:
        """Layer i's state as a block takes it: (att shift (B, C), wkv (B, H, N, N), ffn shift (B, C))."""
        return self.shift[i, 0], self.wkv[i], self.shift[i, 1]

    @staticmethod
    def from_layers(layers) -> "RWKV7State":
        """The inverse of `layer`: [(att shift, wkv, ffn shift) for each layer] -> RWKV7State."""
        shifts = [torch.stack([att_shift, ffn_shift.to(att_shift.dtype)]) for att_shift, _, ffn_shift in layers]
        return RWKV7State(torch.stack(shifts), torch.stack([wkv_state for _, wkv_state, _ in layers]))


def initial_state(cfg: RWKV7Config, batch: int, device=None, dtype=torch.float32) -> RWKV7State:
    """The state before the first token: zeros."""
    shift = torch.zeros(cfg.n_layer, 2, batch, cfg.n_embd, dtype=dtype, device=device)
    wkv_state = torch.zeros(cfg.n_layer, batch, cfg.n_head, cfg.head_size, cfg.head_size, dtype=torch.float32,
                            device=device)
    return RWKV7State(shift, wkv_state)
