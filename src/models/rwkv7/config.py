"""What an RWKV-7 ("x070", "Goose") model is (its shape) and how its forward runs, as two separate records. No torch
import, so command-line checks can ask the model's rules without loading torch.

RWKV7Config is the shape: it decides every state-dict key and tensor shape (src/models/rwkv7/model.py lists them).
The four low-rank widths of the time-mix (w1/w2, a1/a2, v1/v2, g1/g2) default to the rule of BlinkDL's
RWKV-v7/train_temp/src/model.py for n_embd; released files made with older versions of that code have other widths
(the 0.4B's g1 is [1024, 128] where today's rule gives 160), which a file's shape (anatomy.config_of_weights) reads
from the file itself.
ForwardOptions change how the forward is computed, never what.
"""
from dataclasses import dataclass
from typing import Optional

DEFAULT_HEAD_SIZE = 64
KERNEL_HEAD_SIZE = 64  # the one head size the WKV-7 CUDA kernel is built for (kHeadSize of cuda/wkv7.h)
# BlinkDL's D_DECAY_LORA, D_AAA_LORA, D_MV_LORA, D_GATE_LORA: max(32, round(factor * sqrt(C) / 32) * 32)
LOW_RANK_FACTORS = {"d_decay_lora": 2.5, "d_aaa_lora": 2.5, "d_mv_lora": 1.7, "d_gate_lora": 5.0}
LN_X_EPS = 64e-5  # the group norm of the time-mix output (BlinkDL: "notice eps value"; the rwkv package uses it too)


def low_rank_width(n_embd: int, factor: float) -> int:
    """BlinkDL's rule for a low-rank width, with Python's rounding as his code has it."""
    return max(32, int(round((factor * (n_embd ** 0.5)) / 32) * 32))


def default_dim_ffn(n_embd: int, dim_ffn: int) -> int:
    """The channel-mix width: 4 * n_embd for 0 (BlinkDL's RWKV_CMix_x070 builds n_embd * 4)."""
    return dim_ffn or 4 * n_embd


@dataclass
class RWKV7Config:
    vocab_size: int
    n_layer: int
    n_embd: int
    head_size: int = DEFAULT_HEAD_SIZE
    dim_ffn: int = 0  # 0 -> 4 * n_embd
    d_decay_lora: int = 0  # 0 -> BlinkDL's rule for n_embd (LOW_RANK_FACTORS)
    d_aaa_lora: int = 0
    d_mv_lora: int = 0
    d_gate_lora: int = 0

    def __post_init__(self):
        self.dim_ffn = default_dim_ffn(self.n_embd, self.dim_ffn)
        for name, factor in LOW_RANK_FACTORS.items():
            setattr(self, name, getattr(self, name) or low_rank_width(self.n_embd, factor))
        if self.head_size < 1 or self.n_embd % self.head_size:
            raise ValueError(f"n_embd {self.n_embd} is not a multiple of head_size {self.head_size}")

    @property
    def n_head(self) -> int:
        return self.n_embd // self.head_size

    @property
    def windowed_features(self) -> list:
        """Features that see the whole window at once: none (evaluate.py asks a model's shape this)."""
        return []

    @classmethod
    def from_flags(cls, flags, vocab_size: int) -> "RWKV7Config":
        """The shape train.py's flags describe, each field named: no other flag can reach the model."""
        return cls(vocab_size=vocab_size, n_layer=flags.n_layer, n_embd=flags.n_embd, head_size=flags.head_size,
                   dim_ffn=flags.dim_ffn, d_decay_lora=flags.d_decay_lora, d_aaa_lora=flags.d_aaa_lora,
                   d_mv_lora=flags.d_mv_lora, d_gate_lora=flags.d_gate_lora)


@dataclass
class ForwardOptions:
    """How the forward runs; outputs and gradients are the same for every choice (up to rounding)."""
    grad_cp: bool = False  # recompute each block's activations in the backward pass instead of keeping them
    wkv_backend: str = "auto"  # "cuda" kernel, "torch" twin, "auto": the kernel where it runs (src/models/rwkv7/wkv.py)
    ctx_part_len: Optional[int] = None  # run the WKV-7 operator in parts of at most this many tokens

    @classmethod
    def from_flags(cls, flags) -> "ForwardOptions":
        """--grad_cp, --wkv_backend and --ctx_parts (as its part length) of train.py's flags; --compile fuses nothing
        here yet."""
        return cls(grad_cp=bool(flags.grad_cp), wkv_backend=flags.wkv_backend, ctx_part_len=flags.ctx_part_len)
