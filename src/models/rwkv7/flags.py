"""RWKV-7's shape flags beyond --n_layer, --n_embd and --dim_ffn: train.py's TrainConfig takes them from here
(src/models/__init__.py flag_groups), with the names of BlinkDL's RWKV-v7 train.py (--head_size) and of the constants
of his model (D_DECAY_LORA, ...). No torch import."""
from dataclasses import dataclass

from src.flags import MAX_WIDTH, Range, flag

GROUP = "rwkv7"  # train.py --help shows them under "model shape of RWKV-7"

WIDTH = Range(1, MAX_WIDTH)
LOW_RANK_WIDTH = Range(0, MAX_WIDTH)  # 0: BlinkDL's rule
_RULE = "0 = BlinkDL's rule for --n_embd; a released model's file says its own"


@dataclass
class Rwkv7ShapeFlags:
    head_size: int = flag(64, GROUP, "RWKV-7: channels per head of the WKV-7 state (--n_embd must be a multiple).",
                          valid=WIDTH)
    d_decay_lora: int = flag(0, GROUP, f"RWKV-7: width of the decay's low-rank projection w1/w2 ({_RULE}).",
                             valid=LOW_RANK_WIDTH)
    d_aaa_lora: int = flag(0, GROUP, f"RWKV-7: width of the in-context rate's projection a1/a2 ({_RULE}).",
                           valid=LOW_RANK_WIDTH)
    d_mv_lora: int = flag(0, GROUP, f"RWKV-7: width of the value residual's projection v1/v2 ({_RULE}).",
                          valid=LOW_RANK_WIDTH)
    d_gate_lora: int = flag(0, GROUP, f"RWKV-7: width of the output gate's projection g1/g2 ({_RULE}).",
                            valid=LOW_RANK_WIDTH)
