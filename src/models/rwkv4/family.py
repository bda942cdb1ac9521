"""RWKV-4 ("v4neo") as a record of the family registry (src/models/family.py): the answers come from this
package's config, anatomy, model and hf_format modules. No torch import: the methods that build models import
model.py when called."""
from src.errors import UserInputError
from src.models.family import ModelFamily
from src.models.rwkv4 import anatomy
from src.models.rwkv4.config import ForwardOptions, RWKVConfig, default_widths, windowed_features
from src.models.rwkv4.flags import Rwkv4ShapeFlags


class Rwkv4Family(ModelFamily):
    name = "rwkv4"
    title = "RWKV-4"
    my_testing = ""  # the default family: the original trains RWKV-4 when --my_testing is empty
    lora_parts = anatomy.LORA_PARTS
    flag_group = Rwkv4ShapeFlags
    shape_flags = ("n_layer", "n_embd", "vocab_size", "dim_att", "dim_ffn", "pre_ffn", "head_qk")

    def check_flags(self, flags) -> None:
        if flags.tiny_att_dim > 0 and not 0 <= flags.tiny_att_layer < flags.n_layer:
            raise UserInputError(f"--tiny_att_layer {flags.tiny_att_layer} must name a block of the model (0 to "
                                 f"{flags.n_layer - 1} with --n_layer {flags.n_layer}) to host --tiny_att_dim "
                                 f"{flags.tiny_att_dim}.")

    def fill_flag_defaults(self, flags) -> None:
        flags.dim_att, flags.dim_ffn = default_widths(flags.n_embd, flags.dim_att, flags.dim_ffn)

    def windowed_features(self, flags) -> list:
        return windowed_features(flags.n_layer, flags.head_qk, flags.tiny_att_dim, flags.tiny_att_layer,
                                 flags.my_pos_emb)

    def shape_from_flags(self, flags, vocab_size: int) -> RWKVConfig:
        return RWKVConfig.from_flags(flags, vocab_size)

    def forward_options(self, flags) -> ForwardOptions:
        return ForwardOptions.from_flags(flags)

    def reference_options(self) -> ForwardOptions:
        return ForwardOptions(wkv_backend="torch")

    def detect(self, weights: dict) -> bool:
        return anatomy.is_rwkv4(weights)

    def shape_of_weights(self, weights: dict, path: str = "base") -> RWKVConfig:
        return anatomy.config_of_weights(weights, path)

    def identity(self, shape: RWKVConfig) -> dict:
        return anatomy.identity(shape)

    def build(self, shape: RWKVConfig, options=None):
        from src.models.rwkv4.model import RWKV

        return RWKV(shape, options)

    def init_weights(self, model, lr_init: float, device=None, dtype=None) -> dict:
        import torch

        from src.models.rwkv4.model import generate_init_weights

        return generate_init_weights(model, lr_init, device=device, dtype=dtype or torch.float32)

    def piece_of(self, name: str):
        return anatomy.piece_of(name)

    def lr_multiplier(self, name: str, pile_stage_2: bool = False) -> float:
        return anatomy.lr_multiplier(name, pile_stage_2)

    def lora_projections(self, shape: RWKVConfig, parts, layers) -> list:
        return anatomy.lora_projections(shape, parts, layers)

    def trained_whole_part(self, name: str):
        return anatomy.trained_whole_part(name)

    def hf_format(self):
        from src.models.rwkv4 import hf_format

        return hf_format

    def activation_bytes(self, shape: RWKVConfig, batch: int, tokens: int, dtype_bytes: int, checkpointed: bool,
                         inputs_on_device: bool = True, wkv_kernel: bool = True) -> int:
        return anatomy.activation_bytes(shape, batch, tokens, dtype_bytes, checkpointed, inputs_on_device)


RWKV4 = Rwkv4Family()
