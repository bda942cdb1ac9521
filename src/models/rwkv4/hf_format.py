"""RWKV-4 in the format of Hugging Face transformers (`RwkvForCausalLM`, model_type "rwkv"): parameter names,
config.json <-> RWKVConfig, and the v4neo features that format cannot hold.

The tensors are the same in both formats: same shapes, same values (time_decay is stored raw in both; each
applies -exp when it runs). Only the names differ, one dotted part at a time:

    v4neo                                   transformers
    emb.weight [V,C]                        rwkv.embeddings.weight
    blocks.0.ln0.{weight,bias}              rwkv.blocks.0.pre_ln.{weight,bias}
    blocks.i.ln1 / ln2.*                    rwkv.blocks.i.ln1 / ln2.*
    blocks.i.att.time_mix_k / _v / _r       rwkv.blocks.i.attention.time_mix_key / _value / _receptance
    blocks.i.att.{time_decay, time_first, key, value, receptance, output}     rwkv.blocks.i.attention.<same>
    blocks.i.ffn.time_mix_k / _r            rwkv.blocks.i.feed_forward.time_mix_key / _receptance
    blocks.i.ffn.{key, receptance, value}   rwkv.blocks.i.feed_forward.<same>
    ln_out.{weight,bias}                    rwkv.ln_out.{weight,bias}
    head.weight [V,C]                       head.weight

config.json: hidden_size = n_embd, num_hidden_layers = n_layer, attention_hidden_size = dim_att,
intermediate_size = dim_ffn, layer_norm_epsilon 1e-5 (nn.LayerNorm's default, which v4neo uses),
tie_word_embeddings false (RWKV-4 has its own head). rescale_every is written as 0: with N > 0,
transformers divides the residual stream by 2 after every N layers at inference (and the att.output /
ffn.value weights to match). That keeps fp16 activations of deep models in range, but it is not the same
function: LayerNorm(x / s) = (x - mean) / sqrt(var + eps * s^2), so the epsilon weighs s^2 times more and the
logits move away from the model as trained. With 0, transformers computes what RWKV-LM, the rwkv package
and this toolkit compute (fp32 logits agree to rounding); fp16 inference of a deep model in transformers
asks for rescale_every=6 at load time.
"""
from typing import Optional

import torch

from src.io.checkpoint import weight_mismatches
from src.errors import UserInputError
from src.models.rwkv4.config import RWKVConfig
from src.models.rwkv4.model import RWKV

MODEL_TYPE = "rwkv"  # transformers' model_type of RWKV-4 (RWKV-5 and later have other types)
CLASS_NAME = "RwkvForCausalLM"  # how messages name transformers' model class
LAYER_NORM_EPSILON = 1e-5  # nn.LayerNorm's default: every LayerNorm of v4neo
_TRANSFORMERS_PREFIX = "rwkv."  # RwkvForCausalLM's backbone; the head sits beside it

# v4neo name part -> transformers name part (parts not listed are the same in both)
_PART_TO_HF = {"emb": "embeddings", "ln0": "pre_ln", "att": "attention", "ffn": "feed_forward",
               "time_mix_k": "time_mix_key", "time_mix_v": "time_mix_value", "time_mix_r": "time_mix_receptance"}
_PART_FROM_HF = {hf: v4neo for v4neo, hf in _PART_TO_HF.items()}


def transformers_classes() -> tuple:
    """(config class, model class) of RWKV-4 in transformers (imported here: it takes seconds)."""
    from transformers import RwkvConfig, RwkvForCausalLM

    return RwkvConfig, RwkvForCausalLM


def hf_name(key: str) -> str:
    """"blocks.3.att.time_mix_k" -> "rwkv.blocks.3.attention.time_mix_key"."""
    renamed = ".".join(_PART_TO_HF.get(part, part) for part in key.split("."))
    return renamed if key.startswith("head.") else _TRANSFORMERS_PREFIX + renamed


def v4neo_name(hf_key: str) -> str:
    """The inverse of hf_name."""
    key = hf_key[len(_TRANSFORMERS_PREFIX):] if hf_key.startswith(_TRANSFORMERS_PREFIX) else hf_key
    return ".".join(_PART_FROM_HF.get(part, part) for part in key.split("."))


def missing_in_transformers(cfg: RWKVConfig) -> list:
    """Why RwkvForCausalLM cannot hold a model of `cfg`: one entry per feature it lacks ([] = it can)."""
    reasons = []
    if cfg.n_layer == 1:
        reasons.append("n_layer 1 (transformers' RWKV weight init divides by n_layer - 1, so from_pretrained fails "
                       "on one layer)")
    if cfg.pre_ffn:
        reasons.append("pre_ffn (layer 0 has a channel-mix, blocks.0.ffnPre, where RwkvForCausalLM has a time-mix)")
    if cfg.head_qk:
        reasons.append(f"head_qk {cfg.head_qk} (head_q/head_k add an attention over the window to the logits; "
                       f"RwkvForCausalLM's head is one Linear)")
    if cfg.has_tiny_att:
        reasons.append(f"tiny attention (tiny_att_dim {cfg.tiny_att_dim} in layer {cfg.tiny_att_layer}; "
                       f"RwkvForCausalLM has no attention)")
    if cfg.my_pos_emb:
        reasons.append(f"my_pos_emb {cfg.my_pos_emb} (learned positions after ln0; RwkvForCausalLM has none)")
    if cfg.dim_att != cfg.n_embd:
        reasons.append(f"dim_att {cfg.dim_att} != n_embd {cfg.n_embd} (transformers' recurrent state keeps n_embd "
                       f"channels for the WKV sums, so its generation fails on this model)")
    return reasons


def hf_config(cfg: RWKVConfig, context_length: int, end_of_text_id: Optional[int] = None) -> dict:
    """The fields of transformers' RwkvConfig for a model of `cfg`. `context_length` is not in the weights: the
    longest input transformers' CUDA kernel takes in one call, and what evaluation tools truncate to.
    `end_of_text_id` None means 0, which ends a document in both RWKV-4 vocabularies (GPT-NeoX 20B, World)."""
    end_of_text_id = 0 if end_of_text_id is None else end_of_text_id
    return {"vocab_size": cfg.vocab_size, "hidden_size": cfg.n_embd, "num_hidden_layers": cfg.n_layer,
            "attention_hidden_size": cfg.dim_att, "intermediate_size": cfg.dim_ffn,
            "layer_norm_epsilon": LAYER_NORM_EPSILON, "rescale_every": 0, "tie_word_embeddings": False,
            "context_length": context_length, "bos_token_id": end_of_text_id, "eos_token_id": end_of_text_id,
            "architectures": ["RwkvForCausalLM"]}


def config_from_hf(config: dict, where) -> RWKVConfig:
    """The RWKVConfig of a transformers config.json (as a dict); `where` names the file in messages."""
    model_type = config.get("model_type")
    if model_type != MODEL_TYPE:
        raise UserInputError(f"{where} describes a {model_type!r} model; this toolkit reads RWKV-4, whose "
                             f"transformers model_type is {MODEL_TYPE!r}.")
    sizes = {}
    for field in ("vocab_size", "hidden_size", "num_hidden_layers", "attention_hidden_size", "intermediate_size"):
        value = config.get(field)
        optional = field in ("attention_hidden_size", "intermediate_size")  # None: hidden_size, 4 * hidden_size
        if not (value is None and optional) and not (isinstance(value, int) and value > 0):
            raise UserInputError(f"{where}: {field} is {value!r}; an RWKV-4 config.json gives it as a positive "
                                 f"integer.")
        sizes[field] = value or 0  # 0: RWKVConfig's default
    epsilon = config.get("layer_norm_epsilon", LAYER_NORM_EPSILON)
    if epsilon != LAYER_NORM_EPSILON:
        raise UserInputError(f"{where}: layer_norm_epsilon is {epsilon}; RWKV-4 (v4neo) models use "
                             f"{LAYER_NORM_EPSILON}, so this model would compute other logits here.")
    if config.get("tie_word_embeddings"):
        raise UserInputError(f"{where}: tie_word_embeddings is true; RWKV-4 models have a head of their own, "
                             f"untied from the embeddings.")
    return RWKVConfig(vocab_size=sizes["vocab_size"], n_layer=sizes["num_hidden_layers"], n_embd=sizes["hidden_size"],
                      dim_att=sizes["attention_hidden_size"], dim_ffn=sizes["intermediate_size"])


def _expected_weights(cfg: RWKVConfig) -> dict:
    """The v4neo state dict of a model of `cfg`, as shapes (built on the meta device: nothing allocated)."""
    with torch.device("meta"):
        return {key: tuple(tensor.shape) for key, tensor in RWKV(cfg).state_dict().items()}


def to_hf(weights: dict, cfg: RWKVConfig, where) -> dict:
    """v4neo {key: tensor} -> transformers {name: tensor}, the same tensors. Keys and shapes must be exactly
    those of a model of `cfg`."""
    expected = _expected_weights(cfg)
    problems = weight_mismatches(expected, weights)
    if problems:
        raise UserInputError(f"{where} does not have the layout of an RWKV-4 model: {'; '.join(problems)}.")
    return {hf_name(key): weights[key] for key in expected}


def from_hf(hf_weights: dict, cfg: RWKVConfig, where) -> dict:
    """transformers {name: tensor} -> v4neo {key: tensor} in v4neo's order, the same tensors. The names and
    shapes must be exactly those of RwkvForCausalLM for `cfg`."""
    expected = {hf_name(key): shape for key, shape in _expected_weights(cfg).items()}
    problems = weight_mismatches(expected, hf_weights)
    if problems:
        raise UserInputError(f"{where} does not hold the weights of the RwkvForCausalLM its config.json describes: "
                             f"{'; '.join(problems)}.")
    return {v4neo_name(name): hf_weights[name] for name in expected}
