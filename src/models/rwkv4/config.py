"""What an RWKV-4 model is (its shape) and how its forward runs, as two separate records. No torch import, so
command-line checks can ask the model's rules without loading torch.

RWKVConfig is the shape: it decides every state-dict key and tensor shape (src/models/rwkv4/model.py lists them).
ForwardOptions change how the forward is computed, never what: activation checkpointing, the WKV backend, the
length of the parts the WKV operator runs in (--ctx_parts), and whether the elementwise work runs as fused kernels.
A training knob therefore never changes the model.
"""
from dataclasses import dataclass
from typing import Optional


def default_widths(n_embd: int, dim_att: int, dim_ffn: int) -> tuple:
    """(dim_att, dim_ffn) with the v4neo defaults for 0: n_embd and 4 * n_embd."""
    return dim_att or n_embd, dim_ffn or 4 * n_embd


def windowed_features(n_layer: int, head_qk: int, tiny_att_dim: int, tiny_att_layer: int, my_pos_emb: int) -> list:
    """Flag names of the features that look at the whole input window at once, so a forward cannot continue
    them from a state (--state_cp cannot train them)."""
    names = [("head_qk", head_qk > 0), ("tiny_att_dim", tiny_att_dim > 0 and 0 <= tiny_att_layer < n_layer),
             ("my_pos_emb", my_pos_emb > 0)]
    return [name for name, on in names if on]


@dataclass
class RWKVConfig:
    vocab_size: int
    n_layer: int
    n_embd: int
    dim_att: int = 0  # 0 -> n_embd
    dim_ffn: int = 0  # 0 -> 4 * n_embd
    pre_ffn: int = 0
    head_qk: int = 0
    tiny_att_dim: int = 0
    tiny_att_layer: int = -999
    my_pos_emb: int = 0

    def __post_init__(self):
        self.dim_att, self.dim_ffn = default_widths(self.n_embd, self.dim_att, self.dim_ffn)

    @classmethod
    def from_flags(cls, flags, vocab_size: int) -> "RWKVConfig":
        """The shape train.py's flags describe, each field named: no other flag can reach the model."""
        return cls(vocab_size=vocab_size, n_layer=flags.n_layer, n_embd=flags.n_embd, dim_att=flags.dim_att,
                   dim_ffn=flags.dim_ffn, pre_ffn=flags.pre_ffn, head_qk=flags.head_qk,
                   tiny_att_dim=flags.tiny_att_dim, tiny_att_layer=flags.tiny_att_layer, my_pos_emb=flags.my_pos_emb)

    @property
    def has_tiny_att(self) -> bool:
        return self.tiny_att_dim > 0 and 0 <= self.tiny_att_layer < self.n_layer

    @property
    def windowed_features(self) -> list:
        return windowed_features(self.n_layer, self.head_qk, self.tiny_att_dim, self.tiny_att_layer, self.my_pos_emb)


@dataclass
class ForwardOptions:
    """How the forward runs; outputs and gradients are the same for every choice (up to rounding)."""
    grad_cp: bool = False  # recompute each block's activations in the backward pass instead of keeping them
    wkv_backend: str = "auto"  # "cuda" kernel, "torch" reference, "auto": the kernel for CUDA tensors
    ctx_part_len: Optional[int] = None  # run the WKV operator in parts of at most this many tokens
    fused: bool = False  # on CUDA tensors, the elementwise work between the projections as compiled fused kernels

    @classmethod
    def from_flags(cls, flags) -> "ForwardOptions":
        """--grad_cp, --wkv_backend, --ctx_parts (as its part length) and --compile of train.py's flags."""
        return cls(grad_cp=bool(flags.grad_cp), wkv_backend=flags.wkv_backend, ctx_part_len=flags.ctx_part_len,
                   fused=bool(flags.compile))
