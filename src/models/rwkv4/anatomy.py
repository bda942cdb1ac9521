"""The toolkit's questions about RWKV-4's parameters, answered from their v4neo names (src/models/rwkv4/model.py lists
them). Nothing outside src/models/rwkv4/ names a parameter of this model; training, LoRA, merging and --state_cp ask here.

    is_rwkv4(weights)           whether a state dict has this family's keys
    piece_of(name)              which piece of the forward owns it: "embedding", a block number, or "head"
    layer_of(name)              the block number of a block's parameter, else None
    lr_multiplier(name, ...)    the original's layer-wise learning rates
    lora_projections(cfg, ...)  the Linear layers LoRA wraps for each part (att, ffn)
    trained_whole_part(name)    the LoRA part that trains a tensor whole (time_* -> "time", block norms -> "ln")
    config_of_weights(weights)  the RWKVConfig whose state dict has these keys and shapes
    identity(cfg)               what tells one base model's shape from another's (stored with a LoRA)
    activation_bytes(cfg, ...)  an estimate of the memory the blocks keep for their backward
No torch import: weights are read through their .shape only.
"""
import re
from typing import Optional, Union

from src.errors import UserInputError
from src.layer_spec import format_layers
from src.models.family import EMBEDDING, HEAD  # HEAD: ln_out, head and head_q/head_k, everything after the last block
from src.models.rwkv4.config import RWKVConfig

# LoRA parts (--lora_parts), applied to the layers of --lora_layers:
#   att   LoRA on the time-mix key, value, receptance (not output)
#   ffn   LoRA on the channel-mix key, receptance, value
#   time  the time_* parameters of those blocks train whole (time_decay, time_first, time_mix_*)
#   ln    the blocks' ln0 / ln1 / ln2 train whole (not ln_out)
LORA_PARTS = ("att", "ffn", "time", "ln")

_BLOCK_PARAMETER = re.compile(r"^blocks\.(\d+)\.")
# LoRA parts: the Linear layers wrapped for att and ffn (sub-module -> projections of each block)
LORA_PROJECTIONS = {"att": ("att", ("key", "value", "receptance")), "ffn": ("ffn", ("key", "receptance", "value"))}
# Tensors a LoRA trains whole instead of through a low-rank update: blocks' time_* (part "time") and norms ("ln").
_TIME_TENSOR = re.compile(r"^blocks\.\d+\.(?:att|ffn|ffnPre)\.time_\w+$")
_BLOCK_NORM = re.compile(r"^blocks\.\d+\.ln[012]\.(?:weight|bias)$")
# What identifies a base model (a World LoRA has the same A/B shapes as a Pile one).
IDENTITY_FIELDS = ("vocab_size", "n_layer", "n_embd", "dim_att", "dim_ffn", "pre_ffn", "head_qk")


def is_rwkv4(weights: dict) -> bool:
    """A v4neo state dict: an embedding, and block 0 with a v4 time-mix (or the channel-mix of --pre_ffn)."""
    return "emb.weight" in weights and any(key in weights for key in (
        "blocks.0.att.time_decay", "blocks.0.ffnPre.key.weight"))


def layer_of(name: str) -> Optional[int]:
    """"blocks.3.att.key.weight" -> 3; None for parameters outside the blocks."""
    match = _BLOCK_PARAMETER.match(name)
    return int(match[1]) if match else None


def piece_of(name: str) -> Union[str, int]:
    """The piece of the forward (src/models/rwkv4/model.py) whose computation uses the parameter: EMBEDDING (embed),
    a block number (run_block), or HEAD (logits, head_loss)."""
    if name.startswith("emb."):
        return EMBEDDING
    layer = layer_of(name)
    return HEAD if layer is None else layer


def lr_multiplier(name: str, pile_stage_2: bool = False) -> float:
    """The original's layer-wise learning rates (--layerwise_lr 1): time_decay trains at 2x and time_first at 3x
    the LR; in BlinkDL's Pile stage 2, time_mix, time_decay and time_first at 5x. Everything else at 1x."""
    leaf = name.rpartition(".")[2]
    if pile_stage_2 and leaf.startswith(("time_mix", "time_decay", "time_first")):
        return 5.0
    return {"time_decay": 2.0, "time_first": 3.0}.get(leaf, 1.0)


def lora_projections(cfg: RWKVConfig, parts, layers) -> list:
    """Names of the Linear layers LoRA wraps: the projections of `parts` (att, ffn) in `layers`, in order."""
    names = []
    for i in layers:
        for part in ("att", "ffn"):
            mix, projections = LORA_PROJECTIONS[part]
            no_att = part == "att" and i == 0 and cfg.pre_ffn > 0  # block 0 runs a channel-mix there (ffnPre)
            if part in parts and not no_att:
                names += [f"blocks.{i}.{mix}.{projection}" for projection in projections]
    return names


def trained_whole_part(name: str) -> Optional[str]:
    """The LoRA part that trains this tensor whole: "time" for a block's time_* parameters, "ln" for its norms
    (ln0, ln1, ln2); None for everything else."""
    if _TIME_TENSOR.match(name):
        return "time"
    if _BLOCK_NORM.match(name):
        return "ln"
    return None


def identity(cfg: RWKVConfig) -> dict:
    """The shape fields a LoRA records of its base, so it is not merged into another model."""
    fields = {name: getattr(cfg, name) for name in IDENTITY_FIELDS}
    fields["pre_ffn"] = bool(cfg.pre_ffn)
    return fields


def config_of_weights(weights: dict, path="base") -> RWKVConfig:
    """The RWKVConfig whose state dict has the keys and shapes of `weights` (a full v4neo model)."""
    if "emb.weight" not in weights:
        raise UserInputError(f"{path} is not a full RWKV-4 model (it has no emb.weight).")
    layers = sorted({layer for layer in map(layer_of, weights) if layer is not None})
    if not layers or layers != list(range(len(layers))):
        raise UserInputError(f"{path}: the blocks.N keys are not numbered 0..n-1 (found {format_layers(layers)}).")
    vocab_size, n_embd = weights["emb.weight"].shape
    att_keys = [f"blocks.{i}.att.key.weight" for i in layers if f"blocks.{i}.att.key.weight" in weights]
    tiny = [k for k in weights if k.endswith(".tiny_q.weight")]
    try:
        return RWKVConfig(
            vocab_size=vocab_size, n_layer=len(layers), n_embd=n_embd,
            dim_att=weights[att_keys[0]].shape[0] if att_keys else n_embd,
            dim_ffn=weights["blocks.0.ffn.key.weight"].shape[0],
            pre_ffn=int("blocks.0.ffnPre.key.weight" in weights),
            head_qk=weights["head_q.weight"].shape[0] if "head_q.weight" in weights else 0,
            tiny_att_dim=weights[tiny[0]].shape[0] if tiny else 0,
            tiny_att_layer=layer_of(tiny[0]) if tiny else -999,
            my_pos_emb=weights["blocks.0.pos_emb_x"].shape[1] if "blocks.0.pos_emb_x" in weights else 0)
    except KeyError as e:
        raise UserInputError(f"{path} is not a full RWKV-4 model (it has no {e.args[0]}).")


def activation_bytes(cfg: RWKVConfig, batch: int, tokens: int, dtype_bytes: int, checkpointed: bool,
                     inputs_on_device: bool = True) -> int:
    """An estimate of what the blocks keep for their backward over batch x tokens, in bytes.

    Per block and token the tensors its backward reads: 13 C + 5 A + 2 F values (the norms' inputs and outputs,
    the token shifts, the mixed inputs of the seven projections, k and v of the WKV operator, the sigmoid gates,
    y, the squared ReLU; the rest is rebuilt from these; BENCHMARKS.md compares it with a measured peak). Without
    checkpointing every block keeps them; with it (--grad_cp, and --state_cp's block by block backward) one block
    at a time does, plus each block's input where the inputs stay on the device (--grad_cp; --state_cp keeps them
    in host memory).
    """
    C, A, F = cfg.n_embd, cfg.dim_att, cfg.dim_ffn
    one_block = batch * tokens * (13 * C + 5 * A + 2 * F) * dtype_bytes
    if not checkpointed:
        return cfg.n_layer * one_block
    inputs = cfg.n_layer * batch * tokens * C * dtype_bytes if inputs_on_device else 0
    return inputs + one_block
