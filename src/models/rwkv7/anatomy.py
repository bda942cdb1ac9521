"""The toolkit's questions about RWKV-7's parameters, answered from their names (src/models/rwkv7/model.py lists
them). Nothing outside src/models/rwkv7/ names a parameter of this model.

    is_rwkv7(weights)           whether a state dict has this family's keys
    without_unread(weights)     a state dict less the tensors BlinkDL's trainer writes that the model never reads
    piece_of(name)              which piece of the forward owns it: "embedding", a block number, or "head"
    layer_of(name)              the block number of a block's parameter, else None
    lr_multiplier(name)         BlinkDL's LR groups: att.w0 at 2x, everything else 1x
    weight_decayed(name, shape) BlinkDL's weight-decay group: the 2-D ".weight" matrices only
    lora_projections(cfg, ...)  the Linear layers LoRA wraps for each part (att, ffn)
    trained_whole_part(name)    the LoRA part that trains a tensor whole (time-mix tensors -> "time", norms -> "ln")
    config_of_weights(weights)  the RWKV7Config whose state dict has these keys and shapes
    activation_bytes(cfg, ...)  an estimate of the memory the blocks keep for their backward
No torch import: weights are read through their .shape only.
"""
import re
from typing import Optional, Union

from src.errors import UserInputError
from src.layer_spec import format_layers
from src.models.family import EMBEDDING, HEAD  # HEAD: ln_out and head, everything after the last block
from src.models.rwkv7.config import KERNEL_HEAD_SIZE, RWKV7Config

# LoRA parts (--lora_parts), applied to the layers of --lora_layers:
#   att   LoRA on the time-mix receptance, key, value and output
#   ffn   LoRA on the channel-mix key and value
#   time  the blocks' small time-mix tensors train whole: x_r..x_g, w0/w1/w2, a0/a1/a2, v0/v1/v2, g1/g2, k_k, k_a, r_k,
#         and the channel-mix's x_k
#   ln    the blocks' norms train whole: ln0 / ln1 / ln2 and the time-mix's ln_x (not ln_out)
LORA_PARTS = ("att", "ffn", "time", "ln")
LORA_PROJECTIONS = {"att": ("att", ("receptance", "key", "value", "output")), "ffn": ("ffn", ("key", "value"))}

_BLOCK_PARAMETER = re.compile(r"^blocks\.(\d+)\.")
_TIME_TENSOR = re.compile(r"^blocks\.\d+\.(?:att\.(?:x_[rwkvag]|[wav][012]|g[12]|k_k|k_a|r_k)|ffn\.x_k)$")
_BLOCK_NORM = re.compile(r"^blocks\.\d+\.(?:ln[012]|att\.ln_x)\.(?:weight|bias)$")


def is_rwkv7(weights: dict) -> bool:
    """An x070 state dict: an embedding, and block 0 with RWKV-7's time-mix (its decay base w0 or bonus r_k). Either
    one is enough, so that a file lacking the other is refused as the RWKV-7 model it is, naming the missing key."""
    return "emb.weight" in weights and any(key in weights for key in ("blocks.0.att.w0", "blocks.0.att.r_k"))


# BlinkDL's RWKV-v7/train_temp builds the value residual's v0/v1/v2 in every block, so his trainer's checkpoints hold
# them for block 0 too; block 0's value is v_first itself and never reads them. Released files leave them out, and so
# does our model.
UNREAD_IN_BLOCK_0 = ("blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2")


def without_unread(weights: dict) -> dict:
    """`weights` less block 0's v0/v1/v2 (UNREAD_IN_BLOCK_0): a checkpoint of BlinkDL's trainer in the released
    layout. Leaving them out changes no output."""
    return {k: v for k, v in weights.items() if k not in UNREAD_IN_BLOCK_0}


def layer_of(name: str) -> Optional[int]:
    """"blocks.3.att.key.weight" -> 3; None for parameters outside the blocks."""
    match = _BLOCK_PARAMETER.match(name)
    return int(match[1]) if match else None


def piece_of(name: str) -> Union[str, int]:
    """The piece of the forward whose computation uses the parameter: EMBEDDING (embed), a block number (run_block;
    block 0's ln0 included), or HEAD (ln_out, head)."""
    if name.startswith("emb."):
        return EMBEDDING
    layer = layer_of(name)
    return HEAD if layer is None else layer


def lr_multiplier(name: str, pile_stage_2: bool = False) -> float:
    """BlinkDL's configure_optimizers for x070: the decay base att.w0 trains at 2x the LR, everything else at 1x
    (his x070 code has no Pile-stage rule)."""
    return 2.0 if name.endswith(".att.w0") else 1.0


def weight_decayed(name: str, shape) -> bool:
    """BlinkDL's weight-decay group for x070: tensors of two or more dimensions once squeezed whose names hold
    ".weight" (emb, the projections, head); never att.w0, the low-rank w1..g2, r_k or the norms."""
    return len([d for d in shape if d != 1]) >= 2 and ".weight" in name and not name.endswith(".att.w0")


def lora_projections(cfg: RWKV7Config, parts, layers) -> list:
    """Names of the Linear layers LoRA wraps: the projections of `parts` (att, ffn) in `layers`, in order."""
    names = []
    for i in layers:
        for part in ("att", "ffn"):
            if part in parts:
                mix, projections = LORA_PROJECTIONS[part]
                names += [f"blocks.{i}.{mix}.{projection}" for projection in projections]
    return names


def trained_whole_part(name: str) -> Optional[str]:
    """The LoRA part that trains this tensor whole: "time" for a block's small time-mix tensors and the channel-mix's
    x_k, "ln" for its norms (ln0, ln1, ln2, att.ln_x); None for everything else."""
    if _TIME_TENSOR.match(name):
        return "time"
    if _BLOCK_NORM.match(name):
        return "ln"
    return None


def config_of_weights(weights: dict, path="base") -> RWKV7Config:
    """The RWKV7Config whose state dict has the keys and shapes of `weights` (a full x070 model): the head size from
    r_k [H, N], the channel-mix width from ffn.key, the low-rank widths from w1, a1, v1 (block 1) and g1."""
    if "emb.weight" not in weights:
        raise UserInputError(f"{path} is not a full RWKV-7 model (it has no emb.weight).")
    layers = sorted({layer for layer in map(layer_of, weights) if layer is not None})
    if not layers or layers != list(range(len(layers))):
        raise UserInputError(f"{path}: the blocks.N keys are not numbered 0..n-1 (found {format_layers(layers)}).")

    def matrix(key: str) -> tuple:
        """The shape of `key`, a 2-D tensor: a damaged file's tensor of another rank is refused, not met as an
        IndexError."""
        shape = tuple(weights[key].shape)
        if len(shape) != 2:
            raise UserInputError(f"{path} is not an RWKV-7 model this toolkit can read: its {key} has shape {shape}, "
                                 f"where an RWKV-7 model has a matrix; the file is damaged or of another model.")
        return shape

    try:
        vocab_size, n_embd = matrix("emb.weight")
        return RWKV7Config(
            vocab_size=vocab_size, n_layer=len(layers), n_embd=n_embd,
            head_size=matrix("blocks.0.att.r_k")[1],
            dim_ffn=matrix("blocks.0.ffn.key.weight")[0],
            d_decay_lora=matrix("blocks.0.att.w1")[1],
            d_aaa_lora=matrix("blocks.0.att.a1")[1],
            d_mv_lora=matrix("blocks.1.att.v1")[1] if len(layers) > 1 else 0,
            d_gate_lora=matrix("blocks.0.att.g1")[1])
    except KeyError as e:
        raise UserInputError(f"{path} is not a full RWKV-7 model (it has no {e.args[0]}).")
    except ValueError as e:
        raise UserInputError(f"{path} is not an RWKV-7 model this toolkit can read: {e}.")


def activation_bytes(cfg: RWKV7Config, batch: int, tokens: int, dtype_bytes: int, checkpointed: bool,
                     inputs_on_device: bool = True, wkv_kernel: bool = True) -> int:
    """An estimate of what the blocks keep for their backward over batch x tokens, in bytes.

    Per block and token: about 36 C values in the model's dtype (the norms' inputs and outputs, the shift, the six
    mixed inputs, r/w/k/v/a/g and their pre-activations, kk, the WKV-7 inputs and output, ln_x, the bonus, the gated
    output), the low-rank hidden values (Dw + Da + Dv + Dg) and the channel-mix's 2 F; plus what the WKV-7 operator
    keeps: with `wkv_kernel` (the CUDA kernel, head size 64) S a per token in fp32 (4 C bytes) and a state per 16
    tokens (4 N C / 16 bytes), else the torch twin's autograd, one fp32 state per token (4 N C bytes). Without
    checkpointing every block keeps them;
    with it (--grad_cp, --state_cp) one block at a time does, plus each block's input where the inputs stay on the
    device (--grad_cp).
    """
    C, N, F = cfg.n_embd, cfg.head_size, cfg.dim_ffn
    low_rank = cfg.d_decay_lora + cfg.d_aaa_lora + cfg.d_mv_lora + cfg.d_gate_lora
    kernel = wkv_kernel and N == KERNEL_HEAD_SIZE
    wkv = 4 * C + 4 * N * C // 16 if kernel else 4 * N * C
    per_token = (36 * C + low_rank + 2 * F) * dtype_bytes + wkv
    one_block = batch * tokens * per_token
    if not checkpointed:
        return cfg.n_layer * one_block
    inputs = cfg.n_layer * batch * tokens * C * dtype_bytes if inputs_on_device else 0
    return inputs + one_block
