"""RWKV-4's shape flags beyond --n_layer and --n_embd: train.py's TrainConfig takes them from here
(src/models/__init__.py flag_groups), with the fork's names and defaults. No torch import."""
from dataclasses import dataclass

from src.flags import AT_LEAST_0, MAX_WIDTH, Range, flag

GROUP = "rwkv4"  # train.py --help shows them under "model shape of RWKV-4"
WIDTH_OR_0 = Range(0, MAX_WIDTH)


@dataclass
class Rwkv4ShapeFlags:
    dim_att: int = flag(0, GROUP, "Width of the time-mix key/value/receptance (0 = n_embd).", valid=WIDTH_OR_0)
    pre_ffn: int = flag(0, GROUP, ">0: block 0 uses a channel-mix (ffnPre) instead of time-mix.", valid=AT_LEAST_0)
    head_qk: int = flag(0, GROUP, ">0: the headQK copy mechanism with this inner size.", valid=WIDTH_OR_0)
    tiny_att_dim: int = flag(0, GROUP, ">0: tiny attention with this q/k size at --tiny_att_layer.", valid=WIDTH_OR_0)
    tiny_att_layer: int = flag(-999, GROUP, "Block that hosts the tiny attention (-999 = none).",
                               valid=Range(0, sentinels=(-999,)))
    my_pos_emb: int = flag(0, GROUP, ">0: factorised learned positional embedding of P*P positions.",
                           valid=WIDTH_OR_0)
