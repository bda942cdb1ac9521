"""RWKV-7 ("x070", "Goose") as a record of the family registry (src/models/family.py): the answers come from this
package's config, anatomy and model modules. No torch import: the methods that build models import model.py when
called."""
from src.errors import UserInputError
from src.models.family import ModelFamily
from src.models.rwkv7 import anatomy
from src.models.rwkv7.config import (KERNEL_HEAD_SIZE, LOW_RANK_FACTORS, ForwardOptions, RWKV7Config,
                                     default_dim_ffn, low_rank_width)
from src.models.rwkv7.flags import Rwkv7ShapeFlags

# RWKV-4's shape flags that have no meaning here, with the value that leaves them off
_RWKV4_ONLY = {"tiny_att_dim": 0, "tiny_att_layer": -999, "pre_ffn": 0, "head_qk": 0, "my_pos_emb": 0}


class Rwkv7Family(ModelFamily):
    name = "rwkv7"
    title = "RWKV-7"
    my_testing = "x070"  # as BlinkDL's RWKV-v7 train scripts pass it
    lora_parts = anatomy.LORA_PARTS
    flag_group = Rwkv7ShapeFlags
    shape_flags = ("n_layer", "n_embd", "vocab_size", "head_size", "dim_ffn", "d_decay_lora", "d_aaa_lora",
                   "d_mv_lora", "d_gate_lora")
    hf_refusal = "transformers has no RWKV-7 class in-tree"

    def check_flags(self, flags) -> None:
        for name, off in _RWKV4_ONLY.items():
            if getattr(flags, name) != off:
                raise UserInputError(f"--{name} is an RWKV-4 flag, and --my_testing x070 trains RWKV-7, which has no "
                                     f"such part; remove --{name} {getattr(flags, name)}.")
        if flags.dim_att not in (0, flags.n_embd):  # RWKV-4's default fills it with n_embd, which is RWKV-7's width
            raise UserInputError(f"--dim_att is an RWKV-4 flag: RWKV-7's time-mix is --n_embd {flags.n_embd} wide "
                                 f"(heads of --head_size {flags.head_size}); remove --dim_att {flags.dim_att}.")
        if flags.n_embd % flags.head_size:
            raise UserInputError(f"--n_embd {flags.n_embd} must be a multiple of --head_size {flags.head_size}: "
                                 f"RWKV-7's heads split the channels evenly.")
        if flags.wkv_backend == "cuda" and flags.head_size != KERNEL_HEAD_SIZE:
            raise UserInputError(f"--wkv_backend cuda: the WKV-7 kernel is built for --head_size {KERNEL_HEAD_SIZE}, "
                                 f"not {flags.head_size}; use --wkv_backend auto (or torch), which runs the "
                                 f"plain-torch twin for other head sizes.")

    def fill_flag_defaults(self, flags) -> None:
        flags.dim_ffn = default_dim_ffn(flags.n_embd, flags.dim_ffn)
        for name, factor in LOW_RANK_FACTORS.items():
            setattr(flags, name, getattr(flags, name) or low_rank_width(flags.n_embd, factor))

    def shape_from_flags(self, flags, vocab_size: int) -> RWKV7Config:
        return RWKV7Config.from_flags(flags, vocab_size)

    def forward_options(self, flags) -> ForwardOptions:
        return ForwardOptions.from_flags(flags)

    def reference_options(self) -> ForwardOptions:
        return ForwardOptions(wkv_backend="torch")

    def detect(self, weights: dict) -> bool:
        return anatomy.is_rwkv7(weights)

    def canonical_weights(self, weights: dict) -> dict:
        return anatomy.without_unread(weights)

    def shape_of_weights(self, weights: dict, path: str = "base") -> RWKV7Config:
        return anatomy.config_of_weights(weights, path)

    def flags_of_weights(self, weights: dict, path: str = "base") -> dict:
        """The channel-mix and low-rank widths: releases made by older versions of BlinkDL's code differ from
        today's rule (the 0.4B's g1 is [1024, 128] where the rule gives 160). A one-block file has no v1, so no
        d_mv_lora to give."""
        shape = anatomy.config_of_weights(weights, path)
        return {name: getattr(shape, name) for name in ("dim_ffn", *LOW_RANK_FACTORS) if getattr(shape, name)}

    def build(self, shape: RWKV7Config, options=None):
        from src.models.rwkv7.model import RWKV7Model

        return RWKV7Model(shape, options)

    def init_weights(self, model, lr_init: float, device=None, dtype=None) -> dict:
        """BlinkDL's initialisation; lr_init plays no part (his x070 embedding starts in U(-1e-4, 1e-4))."""
        import torch

        from src.models.rwkv7.model import generate_init_weights

        return generate_init_weights(model, device=device, dtype=dtype or torch.float32)

    def piece_of(self, name: str):
        return anatomy.piece_of(name)

    def lr_multiplier(self, name: str, pile_stage_2: bool = False) -> float:
        return anatomy.lr_multiplier(name, pile_stage_2)

    def weight_decayed(self, name: str, shape) -> bool:
        """BlinkDL's weight-decay group: the projections' .weight matrices, not the low-rank w0/w1/... tensors."""
        return anatomy.weight_decayed(name, shape)

    def lora_projections(self, shape: RWKV7Config, parts, layers) -> list:
        return anatomy.lora_projections(shape, parts, layers)

    def trained_whole_part(self, name: str):
        return anatomy.trained_whole_part(name)

    def hf_format(self):
        return None

    def activation_bytes(self, shape: RWKV7Config, batch: int, tokens: int, dtype_bytes: int, checkpointed: bool,
                         inputs_on_device: bool = True, wkv_kernel: bool = True) -> int:
        return anatomy.activation_bytes(shape, batch, tokens, dtype_bytes, checkpointed, inputs_on_device, wkv_kernel)


RWKV7 = Rwkv7Family()
